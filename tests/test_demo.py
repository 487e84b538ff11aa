import pytest

from lmlab.demo import DEMO_DECODING, demo


@pytest.mark.slow
def test_short_demo_trains_reports_and_samples_every_way(tmp_path):
    out = tmp_path / "demo"
    result = demo(str(out), max_steps=25, progress=False)  # default prompt and length
    assert result.train.step == 25
    # 25 steps on characters: far from good, but clearly better than uniform over 65 chars
    assert result.val_loss < 4.17  # ln(65)
    assert set(result.samples) == set(DEMO_DECODING)
    assert all(len(text) == 120 for text in result.samples.values())  # 1 char per token
    for name in ("loss.png", "samples.md", "metrics.jsonl", "config.json"):
        assert (out / name).is_file()
    # a second call finds the finished run: no more steps, the same greedy text
    again = demo(str(out), max_steps=25, progress=False)
    assert again.train.step == 25 and again.samples["greedy"] == result.samples["greedy"]
    assert again.val_loss == result.val_loss
