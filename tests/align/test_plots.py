"""dpo.png and ppo.png stay readable with 0, 1 or 2 points: files written, markers on the
points, and an empty panel says why."""

import json

import pytest

from lmlab.align.plots import plot_dpo, plot_ppo

PNG = b"\x89PNG\r\n\x1a\n"


def texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def dpo_events(n: int, with_kl: bool = True) -> list[dict]:
    train = {"rewards_chosen": 0.1, "rewards_rejected": -0.1, "margin": 0.2}
    events = [
        {"event": "train", "step": s, **train, "reward_accuracy": 1.0} for s in range(1, n + 1)
    ]
    if n:
        val = {f"val_{k}": v for k, v in train.items()}
        events.append({"event": "eval", "step": n, **val, **({"val_kl": 0.01} if with_kl else {})})
    return events


@pytest.mark.parametrize("n", [0, 1, 2])
def test_dpo_plot_with_few_points(tmp_path, n):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in dpo_events(n)))
    fig = plot_dpo(path, tmp_path / "dpo.png", eval_interval=50)
    assert (tmp_path / "dpo.png").read_bytes()[:8] == PNG
    for ax in fig.axes:
        if n == 0:
            assert not ax.get_lines() and len(texts(ax)) == 1
        else:
            assert ax.get_lines() and texts(ax) == []
            assert all(line.get_marker() == "o" for line in ax.get_lines())
    if n == 0:
        assert texts(fig.axes[3]) == ["no validation yet: runs every 50 steps"]
        assert texts(fig.axes[0]) == ["no step logged yet:\nlogged every log_interval steps"]


def test_dpo_plot_says_when_the_kl_was_not_measured(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in dpo_events(2, with_kl=False)))
    fig = plot_dpo(path, tmp_path / "dpo.png", eval_interval=50)
    assert texts(fig.axes[3]) == ["not measured in this run:\nno reference weights to compare with"]


@pytest.mark.parametrize("n", [0, 1, 2])
def test_ppo_plot_with_few_points(tmp_path, n):
    records = [
        {"event": "ppo", "step": s, "score": 0.5 * s, "kl": 0.1 * s} for s in range(1, n + 1)
    ]
    fig = plot_ppo(records, tmp_path / "ppo.png")
    assert (tmp_path / "ppo.png").read_bytes()[:8] == PNG
    lines = [line for ax in fig.axes for line in ax.get_lines()]
    assert [len(line.get_xdata()) for line in lines] == ([n, n] if n else [])
    assert all(line.get_marker() in ("o", "s") for line in lines)
    assert [t for ax in fig.axes for t in texts(ax)] == ([] if n else ["no iteration finished yet"])
