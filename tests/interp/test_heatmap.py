"""Token heatmaps (``lmlab.interp.heatmap``): HTML that escapes what it shows, and a PNG."""

import pytest

from lmlab.errors import ConfigError
from lmlab.interp.heatmap import _rgb, heatmap_html, plot_heatmap, save_heatmap_html


def test_html_escapes_token_text():
    tokens = ["<script>", "alert(1)", "</script>", ' "&']
    page = heatmap_html(tokens, {"ig": [1.0, -0.5, 0.0, 0.25]}, title="<b>t</b>")
    assert "<script>" not in page and "</script>" not in page
    assert "&lt;script&gt;" in page and "&lt;/script&gt;" in page
    assert "&quot;&amp;" in page and "&lt;b&gt;t&lt;/b&gt;" in page
    assert page.count('class="tok"') == 4


def test_colours_follow_the_sign_and_each_rows_scale():
    page = heatmap_html(["a", "b", "c"], {"x": [2.0, -2.0, 0.0], "y": [0.1, 0.0, 0.0]})
    assert "rgb(255,64,64)" in page  # +max: full red
    assert "rgb(64,64,255)" in page  # -max: full blue
    assert page.count("rgb(255,255,255)") == 3  # zeros are white in both rows
    assert page.count("rgb(255,64,64)") == 2  # row y's 0.1 is its own maximum
    assert _rgb(1.0, 0.0) == (1.0, 1.0, 1.0)  # an all-zero row stays white


def test_files_are_written(tmp_path):
    tokens = ["The", " cat", "\n", ""]
    rows = {"ig": [0.1, -0.2, 0.3, 0.0], "saliency": [1, 2, 3, 4]}
    png = plot_heatmap(tmp_path / "h.png", tokens, rows, title="test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = save_heatmap_html(tmp_path / "h.html", tokens, rows).read_text()
    assert "\\n" in page and "saliency" in page


def test_a_row_of_the_wrong_length_is_an_error():
    with pytest.raises(ConfigError, match="2 values for 3 tokens"):
        heatmap_html(["a", "b", "c"], {"ig": [1, 2]})
