"""Token heatmaps: a prompt's tokens coloured by one number each (an attribution, a probe's
score), as a PNG (matplotlib) and as a self-contained HTML page.

Each row (one method) is scaled by its own largest absolute value: red for positive, blue
for negative, white for zero, so rows with different units (a gradient norm, a drop in
log-probability) can sit side by side. The exact numbers are in each span's tooltip (HTML).

    >>> html = heatmap_html(["The", " cat"], {"ig": [0.5, -1.0]}, title="ig")
"""

from __future__ import annotations

import html as html_lib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from lmlab.errors import ConfigError
from lmlab.fileio import atomic_write_text

Rows = Mapping[str, Sequence[float]]


def _checked(tokens: Sequence[str], rows: Rows) -> dict[str, list[float]]:
    out = {}
    for name, values in rows.items():
        values = [float(v) for v in values]
        if len(values) != len(tokens):
            raise ConfigError(
                f"heatmap row {name!r} has {len(values)} values for {len(tokens)} tokens"
            )
        out[name] = values
    return out


def _rgb(value: float, scale: float) -> tuple[float, float, float]:
    """White at 0, red at +scale, blue at -scale (channels in [0, 1])."""
    x = max(-1.0, min(1.0, value / scale)) if scale > 0 else 0.0
    if x >= 0:
        return 1.0, 1.0 - 0.75 * x, 1.0 - 0.75 * x
    return 1.0 + 0.75 * x, 1.0 + 0.75 * x, 1.0


def _shown(token: str) -> str:
    """A token as printed: newlines and tabs visible, an empty token as a middle dot."""
    return token.replace("\n", "\\n").replace("\t", "\\t") or "\u00b7"


def heatmap_html(tokens: Sequence[str], rows: Rows, title: str = "") -> str:
    """A self-contained HTML page: one line of coloured token spans per row; every token
    text is escaped (a prompt holding ``<script>`` shows it, never runs it)."""
    rows = _checked(tokens, rows)
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{html_lib.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}"
        ".row{margin:0.8em 0}.name{font-weight:bold;display:inline-block;width:7em}"
        ".tok{font-family:monospace;white-space:pre;padding:2px 1px;border-radius:3px}"
        "</style></head><body>",
        f"<h2>{html_lib.escape(title)}</h2>",
    ]
    for name, values in rows.items():
        scale = max((abs(v) for v in values), default=0.0)
        spans = []
        for token, value in zip(tokens, values, strict=True):
            r, g, b = (round(255 * c) for c in _rgb(value, scale))
            spans.append(
                f'<span class="tok" style="background:rgb({r},{g},{b})" '
                f'title="{value:.4g}">{html_lib.escape(_shown(token))}</span>'
            )
        parts.append(
            f'<div class="row"><span class="name">{html_lib.escape(name)}</span>'
            + "".join(spans)
            + "</div>"
        )
    parts.append("<p>Each row is scaled by its largest |value|: red positive, blue negative.</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def save_heatmap_html(
    path: str | os.PathLike, tokens: Sequence[str], rows: Rows, title: str = ""
) -> Path:
    """Write ``heatmap_html(...)`` to ``path`` atomically; returns the path."""
    path = Path(path)
    atomic_write_text(path, heatmap_html(tokens, rows, title))
    return path


def plot_heatmap(
    png: str | os.PathLike,
    tokens: Sequence[str],
    rows: Rows,
    title: str = "",
    width: int = 60,
) -> Path:
    """Draw each row as the prompt's tokens in boxes coloured by value, wrapped at about
    ``width`` characters, and save it as ``png`` (dpi 100). Returns the path."""
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    rows = _checked(tokens, rows)
    shown = [_shown(t) for t in tokens]
    # lay the tokens out on a character grid (monospace), wrapping at `width`
    lines, line, used = [], [], 0
    for i, text in enumerate(shown):
        cell = max(len(text), 6) + 1  # room for the value printed under the token
        if line and used + cell > width:
            lines.append(line)
            line, used = [], 0
        line.append((i, used))
        used += cell
    lines.append(line)
    cols = max(x + max(len(shown[i]), 6) for line in lines for i, x in line)
    label = max(len(name) for name in rows) + 2
    n_lines = len(lines) * len(rows) * 1.6 + (len(rows) - 1) * 0.5 + 0.4
    fig = Figure(figsize=(0.085 * (cols + label) + 0.3, 0.36 * n_lines + (0.5 if title else 0.1)))
    ax = fig.add_axes((0.01, 0, 0.98, 1 - (0.45 if title else 0.05) / fig.get_figheight()))
    ax.set_xlim(-label, cols)
    ax.set_ylim(n_lines, 0)
    ax.axis("off")
    y = 0.5
    for name, values in rows.items():
        scale = max((abs(v) for v in values), default=0.0)
        ax.text(-label, y, name, fontsize=10, fontweight="bold", va="center")
        for line in lines:
            for i, x in line:
                box = dict(boxstyle="square,pad=0.15", fc=_rgb(values[i], scale), ec="none")
                ax.text(x, y, shown[i], family="monospace", fontsize=10, va="center", bbox=box)
                ax.text(x, y + 0.7, f"{values[i]:.3g}", fontsize=7, va="center", color="0.3")
            y += 1.6
        y += 0.5
    if title:
        fig.suptitle(title, fontsize=10)
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    return png
