"""Activation patching and causal tracing (``lmlab.interp.patching``).

The planted-mechanism tests train tiny models on the copy task of ``tests/planted.py``
(the last position must output the token at position P) and check that the sweeps find
where the token is: at P before it moves, at the last position after, and in the one
head that can read it. The invariant tests check the sweeps against patching by hand,
one variant at a time.
"""

import importlib.util
import zlib
from pathlib import Path

import pytest
import torch

from lmlab.errors import ConfigError
from lmlab.interp.hooks import hooks, run_with_cache
from lmlab.interp.patching import (
    PromptPairs,
    causal_trace,
    ioi_pairs,
    logit_diff,
    make_pairs,
    patch_heads,
    patch_residual,
    subject_positions,
)
from lmlab.models import build_model, get_preset
from planted import COPY_HEAD, P, T, blind, copy_model, copy_pairs


@pytest.fixture(scope="module")
def two_layer():
    torch.manual_seed(0)
    model, accuracy = copy_model(n_layers=2, n_heads=2, seed=0)
    assert accuracy > 0.95  # it learned the task, so there is a mechanism to find
    return model


@pytest.fixture(scope="module")
def one_layer_blinded():
    torch.manual_seed(0)
    model, accuracy = copy_model(n_layers=1, n_heads=4, seed=0, blinded=True)
    assert accuracy > 0.95
    return model


def test_residual_sweep_finds_the_copied_token_before_and_after_it_moves(two_layer):
    pairs = copy_pairs(16)
    before = patch_residual(two_layer, pairs, point="resid_pre")
    after = patch_residual(two_layer, pairs, point="resid_post")
    assert before.effect.shape == (2, T) and after.effect.shape == (2, T)
    # Into block 0 the token is only at P: restoring it there restores the answer.
    torch.testing.assert_close(before.effect[0, P], torch.tensor(1.0), atol=1e-4, rtol=0)
    # After the last block it is only at the last position (the copy happened).
    torch.testing.assert_close(after.effect[-1, -1], torch.tensor(1.0), atol=1e-4, rtol=0)
    # Everywhere the effect lives at P or at the last position (other positions, whose
    # attention glances at P, carry a trace of it at most), and each layer's row is one of
    # the two places (what moves the token is one attention step).
    for result in (before, after):
        others = [t for t in range(T) if t not in (P, T - 1)]
        assert result.effect[:, others].abs().max() < 0.02
        assert ((result.effect[:, P] + result.effect[:, -1]) > 0.9).all()


def test_head_sweep_finds_the_copying_head(one_layer_blinded):
    model = one_layer_blinded
    with blind(model, 4):
        result = patch_heads(model, copy_pairs(16))
    assert result.effect.shape == (1, 4)
    assert int(result.effect[0].argmax()) == COPY_HEAD
    assert result.effect[0, COPY_HEAD] > 0.9
    others = [h for h in range(4) if h != COPY_HEAD]
    # The others cannot read the token; it reaches them only through their softmax's
    # normaliser (its score at P still counts there), a trace.
    assert result.effect[0, others].abs().max() < 0.05


def test_unblinded_heads_share_the_copy():
    # The honest caveat of head patching: when the mechanism is spread over heads, each
    # alone restores only part of it, though together they carry all of it.
    model, accuracy = copy_model(n_layers=1, n_heads=2, seed=0)
    assert accuracy > 0.95
    pairs = copy_pairs(16)
    result = patch_heads(model, pairs)
    assert (result.effect[0] < 0.95).all()
    with torch.no_grad():
        _, cache = run_with_cache(model, pairs.clean, names="blocks.0.attn.hook_z")
        with hooks(model, replace={"blocks.0.attn.hook_z": cache["blocks.0.attn.hook_z"]}):
            both = logit_diff(model(pairs.corrupt), pairs.answer, pairs.wrong).mean()
    effect_both = (both - result.corrupt_diff) / (result.clean_diff - result.corrupt_diff)
    torch.testing.assert_close(effect_both, torch.tensor(1.0), atol=1e-4, rtol=0)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    spec = {**get_preset("llama-small"), "vocab_size": 40, "n_layers": 2, "d_model": 32}
    return build_model({**spec, "n_heads": 4, "n_kv_heads": 2}).eval()


def random_pairs(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 40, (n, 6), generator=g)
    corrupt = clean.clone()
    corrupt[:, 1] = torch.randint(0, 40, (n,), generator=g)
    return PromptPairs(clean, corrupt, torch.tensor([3, 4, 5][:n]), torch.tensor([7, 8, 9][:n]))


@pytest.mark.parametrize("noising", [False, True])
def test_batched_sweeps_equal_patching_one_cell_at_a_time(noising):
    # Each cell of the batched sweep against a plain loop of replace hooks, one run per
    # cell: float32, same numbers up to batching's rounding (atol 1e-4 on values ~1).
    model, pairs = tiny_llama(), random_pairs()
    base, source = (pairs.clean, pairs.corrupt) if noising else (pairs.corrupt, pairs.clean)
    resid = patch_residual(model, pairs, point="resid_mid", noising=noising, batch_size=7)
    heads = patch_heads(model, pairs, noising=noising, batch_size=5)
    gap = resid.clean_diff - resid.corrupt_diff
    _, cache = run_with_cache(model, base)
    _, other = run_with_cache(model, source)

    def effect(name, cell):
        value = cache[name].clone()
        value[cell] = other[name][cell]
        with torch.no_grad(), hooks(model, replace={name: value}):
            ld = logit_diff(model(base), pairs.answer, pairs.wrong).mean()
        return (ld - resid.corrupt_diff) / gap

    for layer in range(2):
        for p in range(6):
            expected = effect(f"blocks.{layer}.hook_resid_mid", (slice(None), p))
            torch.testing.assert_close(resid.effect[layer, p], expected, atol=1e-4, rtol=0)
        for h in range(4):
            expected = effect(f"blocks.{layer}.attn.hook_z", (slice(None), slice(None), h))
            torch.testing.assert_close(heads.effect[layer, h], expected, atol=1e-4, rtol=0)


def test_patching_the_whole_last_residual_restores_exactly():
    # Denoising the last position after the last block gives the clean logits: effect 1.
    model, pairs = tiny_llama(), random_pairs()
    result = patch_residual(model, pairs, point="resid_post")
    torch.testing.assert_close(result.effect[-1, -1], torch.tensor(1.0), atol=1e-5, rtol=0)
    # Positions before the corrupted one carry the same activations in both runs.
    assert result.effect[:, 0].abs().max() < 1e-5


def test_pairs_must_match_in_length_and_answers_be_one_token():
    class Words:
        def encode(self, text):
            return [len(w) for w in text.split()]

    tok = Words()
    with pytest.raises(ConfigError, match="same number of tokens"):
        make_pairs(tok, "a bb ccc", "a bb", "x", "y")
    with pytest.raises(ConfigError, match="exactly one"):
        make_pairs(tok, "a bb", "c dd", "two words", "y")
    with pytest.raises(ConfigError, match="as many"):
        make_pairs(tok, ["a b", "c d"], ["e f"], "x", "y")
    pairs = make_pairs(tok, "a bb", "cc d", "xyz", "y")
    assert pairs.clean.tolist() == [[1, 2]] and pairs.answer.tolist() == [3]


def test_identical_prompts_are_refused():
    model, pairs = tiny_llama(), random_pairs()
    same = PromptPairs(pairs.clean, pairs.clean, pairs.answer, pairs.wrong)
    with pytest.raises(ConfigError, match="nothing to patch"):
        patch_residual(model, same)


def test_patching_needs_a_transformer():
    lstm = build_model({**get_preset("lstm-char"), "vocab_size": 40, "d_model": 8})
    with pytest.raises(ConfigError, match="transformer decoders"):
        patch_heads(lstm, random_pairs())


# ----------------------------------------------------------------------------- tracing


def test_causal_trace_restoring_the_subject_state_before_the_model_restores_it(two_layer):
    ids = torch.tensor([[3, 1, 7, 0, 5, 2, 9, 4]])  # the answer is ids[0, P] = 7
    answer = int(ids[0, P])
    result = causal_trace(two_layer, ids, answer, subject=[P], samples=6, noise=3.0, seed=0)
    assert result.probs.shape == (2, T)
    assert result.p_clean > 0.9 and result.p_corrupt < 0.5  # the noise hides the token
    # Restoring the last block's output at the last position gives the clean run back.
    torch.testing.assert_close(
        result.probs[-1, -1], torch.tensor(result.p_clean), atol=1e-5, rtol=0
    )
    # Restoring a position the noise did not touch before the move changes nothing.
    torch.testing.assert_close(
        result.probs[0, 0], torch.tensor(result.p_corrupt), atol=1e-5, rtol=0
    )
    # Seeded: the same seed gives the same numbers, another seed other noise.
    again = causal_trace(two_layer, ids, answer, subject=[P], samples=6, seed=0)
    assert torch.equal(again.probs, result.probs)
    other = causal_trace(two_layer, ids, answer, subject=[P], samples=6, seed=1)
    assert other.p_corrupt != result.p_corrupt


def test_causal_trace_windows_and_errors():
    model = tiny_llama()
    ids = torch.randint(0, 40, (1, 6), generator=torch.Generator().manual_seed(3))
    for kind in ("mlp", "attn"):
        result = causal_trace(model, ids, 5, subject=[1, 2], kind=kind, samples=2, window=2)
        assert result.probs.shape == (2, 6) and result.kind == kind
    with pytest.raises(ConfigError, match="within the prompt"):
        causal_trace(model, ids, 5, subject=[9])
    with pytest.raises(ConfigError, match="kind"):
        causal_trace(model, ids, 5, subject=[1], kind="heads")


def test_subject_positions_from_text():
    class Chars:
        def encode(self, text):
            return [ord(c) for c in text]

    # The space before the subject counts as part of it (BPE tokens carry their space).
    assert subject_positions(Chars(), "The Eiffel Tower is in", "Eiffel Tower") == list(
        range(3, 16)
    )
    with pytest.raises(ConfigError, match="not in the prompt"):
        subject_positions(Chars(), "The Eiffel Tower", "Louvre")

    prompt = "The Eiffel Tower is in"
    assert subject_positions(Words(), prompt, "Eiffel Tower") == [1, 2]
    assert subject_positions(Words(), prompt, "The Eiffel") == [0, 1]


class Words:
    """A word-level stand-in for BPE: each word is one token that carries its space."""

    def encode(self, text):
        return [zlib.crc32(w.encode()) for w in text.replace(" ", "\0 ").split("\0") if w]


def test_ioi_pairs_swap_the_second_name():
    pairs, texts = ioi_pairs(Words(), n=3, seed=0)
    assert pairs.clean.shape == pairs.corrupt.shape == (3, 13)
    for (clean, corrupt), answer in zip(texts, pairs.answer.tolist(), strict=True):
        a, b = clean.split(" and ")[0].split()[-1], clean.split(" and ")[1].split()[0]
        assert clean.endswith(f"{b} gave a drink to") and corrupt.endswith(f"{a} gave a drink to")
        assert answer == Words().encode(" " + a)[0]
    assert ioi_pairs(Words(), n=3, seed=0)[1] == texts  # seeded


def test_bench_script_runs_quick_and_agrees_with_patching_by_hand(capsys):
    # bench/interp_patch.py in its quick mode (a tiny model): runs, and its batched sweep
    # gives the numbers of the one-forward-per-cell loop. No timing is checked.
    path = Path(__file__).resolve().parents[2] / "bench" / "interp_patch.py"
    spec = importlib.util.spec_from_file_location("interp_patch", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(quick=True)
    assert result["same_numbers"] and "ratio" in capsys.readouterr().out
