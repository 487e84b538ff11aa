"""The encoder-decoder Transformer: masks, causality, the cache, decoding through generate."""

import math

import pytest
import torch

from lmlab.errors import ConfigError
from lmlab.generate import SamplingParams
from lmlab.generate.seq2seq import seq2seq_generate
from lmlab.models import build_model
from lmlab.models.seq2seq import sinusoids

V = 30


def tiny(norm="post", seed=0):
    torch.manual_seed(seed)
    spec = {
        "family": "seq2seq",
        "vocab_size": V,
        "d_model": 32,
        "n_heads": 4,
        "n_encoder_layers": 2,
        "n_decoder_layers": 2,
        "d_ff": 64,
        "max_seq_len": 40,
        "norm": norm,
    }
    return build_model(spec).eval()


def test_sinusoids_follow_the_papers_formula():
    table = sinusoids(50, 16)
    pos, i = 37, 3
    assert table[pos, 2 * i].item() == pytest.approx(
        math.sin(pos / 10000 ** (2 * i / 16)), abs=1e-5
    )
    assert table[pos, 2 * i + 1].item() == pytest.approx(
        math.cos(pos / 10000 ** (2 * i / 16)), abs=1e-5
    )


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_targets_are_causal_and_source_padding_is_invisible(norm):
    model = tiny(norm)
    g = torch.Generator().manual_seed(1)
    src = torch.randint(3, V, (2, 9), generator=g)
    tgt = torch.randint(3, V, (2, 7), generator=g)
    with torch.no_grad():
        base = model(src, tgt)
        changed = tgt.clone()
        changed[:, 4:] = torch.randint(3, V, (2, 3), generator=g)
        torch.testing.assert_close(model(src, changed)[:, :4], base[:, :4])  # no peeking ahead
        assert not torch.allclose(model(src, changed)[:, 4:], base[:, 4:])
        padded = torch.cat([src, torch.zeros(2, 5, dtype=torch.long)], dim=1)  # pad_id 0
        torch.testing.assert_close(model(padded, tgt), base, atol=1e-5, rtol=1e-5)
        other_src = src.clone()
        other_src[:, 0] = (src[:, 0] + 1) % V
        assert not torch.allclose(model(other_src, tgt), base)  # the source matters


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_decoding_with_the_cache_equals_the_full_forward(norm):
    model = tiny(norm, seed=2)
    g = torch.Generator().manual_seed(3)
    src = torch.randint(3, V, (3, 8), generator=g)
    tgt = torch.randint(3, V, (3, 6), generator=g)
    view = model.conditioned(src)
    with torch.no_grad():
        full = model(src, tgt)
        cache = view.new_cache(3, 10)
        steps = [view(tgt[:, :2], cache=cache)] + [
            view(tgt[:, t : t + 1], cache=cache) for t in range(2, 6)
        ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_greedy_and_beam_search_run_through_generate():
    model = tiny(seed=4)
    sources = [[5, 6, 7, 8], [9, 10]]
    greedy = seq2seq_generate(model, sources, SamplingParams(max_new_tokens=6, temperature=0)).ids
    # greedy by hand: argmax of the full forward, one token at a time
    for src, row in zip(sources, greedy):
        tgt = [model.config.bos_id]
        with torch.no_grad():
            for _ in range(6):
                tgt.append(int(model(torch.tensor([src]), torch.tensor([tgt]))[0, -1].argmax()))
        assert row == tgt[1:]
    one_beam = seq2seq_generate(
        model, sources, SamplingParams(max_new_tokens=6, num_beams=1, temperature=0)
    ).ids
    assert one_beam == greedy
    beams = seq2seq_generate(model, sources, SamplingParams(max_new_tokens=6, num_beams=3)).ids
    assert len(beams) == 2 and all(len(r) == 6 for r in beams)
    assert not model.training  # decoding left the model's mode alone


def test_the_contract_points_causal_entry_points_to_conditioned():
    model = tiny()
    from lmlab.generate.likelihood import token_nll

    with pytest.raises(ConfigError, match="encoder-decoder.*conditioned"):
        token_nll(model, torch.tensor([1, 2, 3]))
    with pytest.raises(ConfigError, match="n_heads=5 must divide"):
        build_model({"family": "seq2seq", "vocab_size": V, "d_model": 32, "n_heads": 5})


def test_relative_buckets_match_t5s_and_the_docstring_example():
    from transformers.models.t5.modeling_t5 import T5Attention

    from lmlab.models.seq2seq import relative_bucket

    offsets = torch.tensor([-20, -9, -5, -3, -1, 0, 1, 3, 9])
    assert relative_bucket(offsets, True, 8, 16).tolist() == [3, 3, 2, 2, 1, 0, 5, 6, 7]
    assert relative_bucket(offsets, False, 8, 16).tolist() == [7, 6, 4, 3, 1, 0, 0, 0, 0]
    offsets = torch.arange(-300, 300)
    for bidirectional in (True, False):
        for n_buckets, max_distance in ((32, 128), (8, 20), (6, 7), (4, 3)):
            theirs = T5Attention._relative_position_bucket(
                offsets, bidirectional, n_buckets, max_distance
            )
            assert torch.equal(
                relative_bucket(offsets, bidirectional, n_buckets, max_distance), theirs
            )


@pytest.mark.parametrize(
    "change,field",
    [
        (dict(positions="rotary"), "positions"),
        (dict(norm_kind="batchnorm"), "norm_kind"),
        (dict(activation="tanh"), "activation"),
        (dict(relative_buckets=2), "relative_buckets"),
        (dict(relative_buckets=32, relative_max_distance=16), "relative_max_distance"),
        (dict(output_scale=0.0), "output_scale"),
        (dict(eos_id=V), "eos_id"),
        (dict(d_head=0), "d_head"),
        (dict(n_heads=3), "n_heads"),
    ],
)
def test_invalid_settings_are_one_line_errors_naming_the_field(change, field):
    spec = {"family": "seq2seq", "vocab_size": V, "d_model": 32, "n_heads": 4, **change}
    with pytest.raises(ConfigError, match=field) as info:
        build_model(spec)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("positions", ["learned", "relative"])
def test_cached_decoding_equals_full_recomputation_with_other_positions(positions):
    torch.manual_seed(0)
    spec = {"family": "seq2seq", "vocab_size": V, "d_model": 32, "n_heads": 4, "d_ff": 64}
    spec |= {"positions": positions, "position_offset": 2, "relative_buckets": 8}
    spec |= {"relative_max_distance": 12, "norm": "pre", "gated": True, "bias": False}
    model = build_model(spec).eval()
    g = torch.Generator().manual_seed(2)
    src, tgt = torch.randint(3, V, (2, 9), generator=g), torch.randint(3, V, (2, 14), generator=g)
    src[1, 5:] = 0
    with torch.no_grad():
        full = model(src, tgt)
        view = model.conditioned(src)
        cache = view.new_cache(2, 20)
        steps = [view(tgt[:, i : i + 1], cache) for i in range(tgt.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
