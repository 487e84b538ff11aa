"""The logit lens and the tuned lens (``lmlab.interp.lens``)."""

import pytest
import torch
import torch.nn.functional as F

from lmlab.errors import CheckpointError, ConfigError, DataNotFoundError
from lmlab.interp.hooks import run_with_cache
from lmlab.interp.lens import (
    TunedLens,
    corpus_windows,
    logit_lens,
    mean_kl_per_layer,
    plot_kl_per_layer,
    plot_lens,
    train_tuned_lens,
    tuned_lens,
)
from lmlab.models import build_model, get_preset

V = 40


def tiny(name="llama-small", seed=0, **extra):
    torch.manual_seed(seed)
    spec = {**get_preset(name), "vocab_size": V, "n_layers": 3, "d_model": 32, "n_heads": 4}
    return build_model({**spec, **extra}).eval()


def prompt(seed=1, T=10):
    return torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["llama-small", "gpt-char-tiny"])
def test_logit_lens_reads_each_layer_through_the_final_norm_and_unembedding(name):
    model, ids = tiny(name), prompt()
    result = logit_lens(model, ids)
    assert result.labels == ["embed", "0", "1", "2"] and result.kl.shape == (4, 10)
    with torch.no_grad():
        logits, cache = run_with_cache(model, ids)
        by_hand = model.lm_head(model.norm(cache["blocks.1.hook_resid_post"][0]))
        lp = F.log_softmax(by_hand, -1)
        final = F.log_softmax(logits[0], -1)
    # Row 2 (after block 1): the same top tokens and KL as computed by hand (float32).
    assert torch.equal(result.top_ids[2], by_hand.argmax(-1))
    kl = F.kl_div(lp, final, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(result.kl[2], kl, atol=1e-5, rtol=1e-4)
    # The last row is the model's own prediction.
    assert torch.equal(result.top_ids[-1], logits[0].argmax(-1))
    assert result.kl[-1].abs().max() < 1e-5
    # Targets: the next prompt token (none at the end), with its rank and log-probability.
    assert result.target_ids.tolist() == ids[0, 1:].tolist() + [-1]
    rank = int((final[0] > final[0, ids[0, 1]]).sum())
    assert result.target_ranks[-1, 0] == rank and result.target_ranks[-1, -1] == -1
    torch.testing.assert_close(result.target_logprobs[-1, 0], final[0, ids[0, 1]])


def test_logit_lens_on_a_recurrent_model_and_refusal_elsewhere():
    lstm = build_model({**get_preset("lstm-char"), "vocab_size": V, "d_model": 16, "n_layers": 2})
    result = logit_lens(lstm.eval(), prompt(), target=5)
    assert result.labels == ["embed", "0", "1"] and result.kl[-1].abs().max() < 1e-5
    assert (result.target_ids == 5).all()
    mlp = build_model({**get_preset("mlp-char"), "vocab_size": V, "d_model": 8, "d_ff": 16})
    with pytest.raises(ConfigError, match="stream of layers"):
        logit_lens(mlp, prompt())
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        logit_lens(lstm, prompt(), target=V)


def test_an_untrained_tuned_lens_is_the_logit_lens():
    model, ids = tiny(), prompt()
    plain = logit_lens(model, ids)
    zero = tuned_lens(model, ids, TunedLens(4, 32))
    assert torch.equal(zero.top_ids, plain.top_ids)
    torch.testing.assert_close(zero.kl, plain.kl)


def test_tuned_lens_is_closer_to_the_output_than_the_logit_lens_at_every_layer(tmp_path):
    # A model whose blocks change the stream a lot (init std 0.1), so the logit lens is
    # visibly off; translators trained on one set of windows, judged on another.
    model = tiny(init_std=0.1)
    stream = torch.randint(0, V, (4000,), generator=torch.Generator().manual_seed(0))
    train, held_out = stream[:3000], stream[3000:]
    windows = corpus_windows(train, 16, 64, seed=0)
    lens, losses = train_tuned_lens(model, windows, steps=60, batch_size=8, lr=3e-3, progress=False)
    assert losses[-1] < 0.8 * losses[0]
    test_windows = corpus_windows(held_out, 16, 16, seed=1)
    logit_kl = mean_kl_per_layer(model, test_windows)
    tuned_kl = mean_kl_per_layer(model, test_windows, lens)
    assert (tuned_kl[:-1] < logit_kl[:-1]).all(), (tuned_kl, logit_kl)
    assert tuned_kl[-1] < 1e-5 and logit_kl[-1] < 1e-5  # the last row is the output itself
    # Saved and loaded bit for bit; the shape is checked against the model.
    lens.save(tmp_path / "lens.safetensors", meta={"model": "tiny"})
    again = TunedLens.load(tmp_path / "lens.safetensors")
    assert torch.equal(again.weight, lens.weight) and torch.equal(again.bias, lens.bias)
    with pytest.raises(ConfigError, match="trained for 3 layers of width 32"):
        tuned_lens(tiny(n_layers=2), prompt(), again)
    # Seeded: the same seed trains the same lens.
    same, _ = train_tuned_lens(model, windows, steps=3, batch_size=8, progress=False)
    same2, _ = train_tuned_lens(model, windows, steps=3, batch_size=8, progress=False)
    assert torch.equal(same.weight, same2.weight)


def test_tuned_lens_files_are_checked(tmp_path):
    with pytest.raises(DataNotFoundError, match="lens-train"):
        TunedLens.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a tuned lens"):
        TunedLens.load(bad)


def test_lens_figures_are_written(tmp_path):
    model, ids = tiny(), prompt()
    result = logit_lens(model, ids)
    plot_lens(result, [str(i) for i in ids[0].tolist()], str, tmp_path / "lens.png")
    curves = {"logit lens": result.kl_per_layer}
    plot_kl_per_layer(curves, result.labels, tmp_path / "kl.png")
    assert (tmp_path / "lens.png").stat().st_size > 1000
    assert (tmp_path / "kl.png").stat().st_size > 1000
