import dataclasses

import pytest

from lmlab.api import train
from lmlab.demo import DEMO_DECODING, DEMO_TRAIN, demo, plan_demo
from lmlab.train.optim import lr_at


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
    # without --max_steps it keeps the run's own 25 steps (it does not train on to 900)
    kept = demo(str(out), progress=False)
    assert kept.train.step == 25 and "finished" in kept.plan


def test_demo_after_a_shorter_run_says_what_it_found_and_keeps_its_length(tmp_path):
    """Regression: `lmlab demo` after a shorter demo run trained on to 900 steps, silently,
    with the learning rate jumping from about 4e-4 back to 3.9e-3. The short run here is a
    tiny model with the demo's own settings (plan_demo's config), for speed."""
    out = str(tmp_path / "demo")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question. " * 200)
    first = plan_demo(out, max_steps=10, progress=False)
    assert first.found_step is None and "training gpt-char-tiny for 10 steps" in first.message
    tiny = {"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32}
    small = dataclasses.replace(
        first.config, batch_size=2, seq_len=32, eval_batches=1, warmup_steps=2, precision="fp32"
    )
    train("gpt-char-tiny", str(corpus), "char", model_overrides=tiny, config=small)

    again = plan_demo(out, progress=False)  # `lmlab demo` with no --max_steps
    assert again.found_step == 10 and again.config.max_steps == 10
    assert "at step 10 (finished): decoding from it" in again.message
    assert again.config.lr == DEMO_TRAIN["lr"] and again.config.resume == "auto"

    longer = plan_demo(out, max_steps=900, progress=False)
    assert longer.config.max_steps == 900
    assert "training on to step 900" in longer.message
    last, next_ = lr_at(9, small), lr_at(10, longer.config)
    assert next_ > 5 * last  # the jump the message states
    assert f"lr {last:.1e} at its last step -> {next_:.1e}" in longer.message
