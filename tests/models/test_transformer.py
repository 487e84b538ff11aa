import dataclasses
import math

import pytest
import torch
import transformers

from hf_models import tiny_llama as shared_tiny_llama
from lmlab.checkpoint.hf import from_transformers, to_hf
from lmlab.errors import ConfigError
from lmlab.models import PRESETS, build_model, get_preset, model_spec

# float32 on CPU: the same maths in a different order (fused vs split qkv, sdpa kernels)
# differs by a few ulps per layer; 1e-5 absolute on logits of size ~1 leaves room for that
# and still catches any real mismatch (a wrong layout gives errors of order 1).
ATOL, RTOL = 1e-5, 1e-5


def tiny_gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=97,
        n_embd=48,
        n_layer=3,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_llama(**kw):
    return shared_tiny_llama(n_layers=3, **kw)


def tiny_spec(**overrides):
    base = {**get_preset("gpt-char-tiny"), "vocab_size": 50, "d_model": 32, "n_layers": 2}
    return {**base, "n_heads": 4, "d_ff": 64, "max_seq_len": 32, **overrides}


@pytest.mark.parametrize(
    "make", [tiny_gpt2, tiny_llama, lambda: tiny_llama(tie_word_embeddings=True)]
)
def test_logits_match_transformers(make):
    hf = make()
    ours = from_transformers(hf)
    ids = torch.randint(0, 97, (3, 40))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


def test_padded_batch_matches_transformers_attention_mask():
    hf = tiny_llama()
    ours = from_transformers(hf)
    ids = torch.randint(1, 97, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, :4] = False  # left padding on row 0
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask.long()).logits
        got = ours(ids, mask=mask)
    torch.testing.assert_close(got[mask], expected[mask], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", ["gpt-char-tiny", "llama-small"])
def test_export_round_trip_through_transformers(name):
    ours = build_model({**get_preset(name), "vocab_size": 61, "n_layers": 2}).eval()
    cfg, state = to_hf(ours)
    config_cls = {"gpt2": transformers.GPT2Config, "llama": transformers.LlamaConfig}[
        cfg["model_type"]
    ]
    model_cls = {"gpt2": transformers.GPT2LMHeadModel, "llama": transformers.LlamaForCausalLM}
    hf = model_cls[cfg["model_type"]](config_cls(**cfg)).eval()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("attn.bias") for k in missing)
    ids = torch.randint(0, 61, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=ATOL, rtol=RTOL)
    back = from_transformers(hf)
    for (k, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize(
    "variant",
    [{}, {"norm": "rmsnorm", "mlp": "swiglu", "pos": "rope", "n_kv_heads": 2, "bias": False}],
)
def test_explicit_attention_equals_sdpa(variant):
    model = build_model(tiny_spec(**variant)).eval()
    ids = torch.randint(0, 50, (2, 20))
    fast = model(ids)
    model.use_explicit_attention(True)
    torch.testing.assert_close(model(ids), fast, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variant", [{}, {"pos": "rope", "n_kv_heads": 1, "norm": "rmsnorm"}])
def test_cached_decoding_equals_full_recomputation(variant):
    model = build_model(tiny_spec(**variant)).eval()
    ids = torch.randint(0, 50, (2, 24))
    full = model(ids)
    cache = model.new_cache(2, 32)
    steps = [model(ids[:, :10], cache=cache)] + [
        model(ids[:, t : t + 1], cache=cache) for t in range(10, 24)
    ]
    assert cache.length == 24
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-6, rtol=1e-5)


def test_logits_to_keep_gives_the_last_positions_logits_and_the_same_cache():
    """As transformers' argument: the logits of the last k positions, those of the full
    pass; the cache holds every position either way."""
    model = build_model(tiny_spec(pos="rope", norm="rmsnorm")).eval()
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    full_cache, cut_cache = model.new_cache(2, 16), model.new_cache(2, 16)
    full = model(ids, cache=full_cache)
    for k in (1, 4):
        # fewer rows in the output layer's float32 product: the same sums up to rounding
        kept = model(ids, logits_to_keep=k)
        assert kept.shape == (2, k, 50)
        torch.testing.assert_close(kept, full[:, -k:], atol=1e-6, rtol=1e-5)
    assert model(ids, cache=cut_cache, logits_to_keep=1).shape == (2, 1, 50)
    step = ids[:, :1]
    assert torch.equal(model(step, cache=cut_cache), model(step, cache=full_cache))


@pytest.mark.parametrize("kv_heads", [None, 2], ids=["mha", "gqa"])
def test_left_padded_rows_equal_rows_alone_with_cache(kv_heads):
    """Also with grouped-query heads: a one-token step then attends through each key/value
    head's rows of queries, under the padding mask."""
    spec = tiny_spec(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=kv_heads)
    model = build_model(spec).eval()
    a, b = torch.randint(0, 50, (1, 9)), torch.randint(0, 50, (1, 5))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :4] = False
    cache = model.new_cache(2, 16)
    first = model(ids, cache=cache, mask=mask)
    nxt = torch.randint(0, 50, (2, 1))
    second = model(nxt, cache=cache)
    torch.testing.assert_close(first[0], model(a)[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(first[1, 4:], model(b)[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(
        second[1, 0], model(torch.cat([b, nxt[1:]], 1))[0, -1], atol=1e-6, rtol=1e-5
    )


def test_cache_reorder_selects_rows():
    model = build_model(tiny_spec()).eval()
    ids = torch.randint(0, 50, (3, 6))
    cache = model.new_cache(3, 16)
    model(ids, cache=cache)
    cache.reorder(torch.tensor([2, 2, 0]))
    nxt = torch.randint(0, 50, (3, 1))
    out = model(nxt, cache=cache)[:, 0]
    for row, src in enumerate([2, 2, 0]):
        alone = model(torch.cat([ids[src : src + 1], nxt[row : row + 1]], 1))[0, -1]
        torch.testing.assert_close(out[row], alone, atol=1e-6, rtol=1e-5)


def test_hook_points_read_and_replace():
    model = build_model(tiny_spec()).eval()
    names = {n for n, _ in model.named_modules() if n.split(".")[-1].startswith("hook_")}
    for expected in (
        "hook_embed",
        "blocks.0.hook_resid_pre",
        "blocks.1.attn.hook_pattern",
        "blocks.0.hook_mlp_out",
    ):
        assert expected in names
    ids = torch.randint(0, 50, (1, 7))
    seen = {}
    handle = model.blocks[0].attn.hook_pattern.register_forward_hook(
        lambda m, i, o: seen.setdefault("p", o)
    )
    model(ids)
    handle.remove()
    pattern = seen["p"]  # (B, H, T, S): rows sum to 1, nothing above the diagonal
    assert pattern.shape == (1, 4, 7, 7)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(1, 4, 7))
    assert torch.all(pattern.triu(1) == 0)
    # replacing the MLP output of the last block with zeros changes the logits
    base = model(ids)
    handle = model.blocks[1].hook_mlp_out.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    assert not torch.allclose(model(ids), base)
    handle.remove()
    torch.testing.assert_close(model(ids), base)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds(name):
    spec = get_preset(name)
    spec["vocab_size"] = spec["vocab_size"] or 65
    model = build_model(spec)
    if name in ("gpt2-124m", "smollm2-135m"):
        expected = {"gpt2-124m": 124_439_808, "smollm2-135m": 134_515_008}[name]
        assert sum(p.numel() for p in model.parameters()) == expected
    defaults = {f.name: f.default for f in dataclasses.fields(type(model.config))}
    assert model_spec(model) == {**defaults, **spec}
    assert build_model(model_spec(model)).config == model.config


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="n_kv_heads"):
        build_model(tiny_spec(n_kv_heads=3))
    with pytest.raises(ConfigError, match="did you mean 'd_model'"):
        build_model(tiny_spec(d_modle=3))
    with pytest.raises(ConfigError, match="unknown model preset 'gpt-tiny'"):
        get_preset("gpt-tiny")
    model = build_model(tiny_spec())
    with pytest.raises(ConfigError, match="context window"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_empty_build_has_the_same_structure_and_keeps_ties():
    spec = {**get_preset("gpt-char-tiny"), "vocab_size": 50}
    full, empty = build_model(spec), build_model(spec, empty=True)
    assert empty.lm_head.weight is empty.tok_emb.weight  # tied embeddings stay tied
    assert {k: v.shape for k, v in full.state_dict().items()} == {
        k: v.shape for k, v in empty.state_dict().items()
    }
    assert all(p.device.type == "cpu" for p in empty.parameters())
    empty.load_state_dict(full.state_dict())
    ids = torch.randint(0, 50, (1, 8))
    torch.testing.assert_close(empty.eval()(ids), full.eval()(ids), atol=0, rtol=0)


@pytest.mark.parametrize("preset", ["gpt-char-tiny", "llama-small"])
def test_packed_row_with_segments_equals_its_examples_alone(preset):
    torch.manual_seed(0)
    spec = {**get_preset(preset), "vocab_size": 50, "n_layers": 2, "dropout": 0.0}
    model = build_model(spec).eval()
    a, b = torch.randint(0, 50, (1, 5)), torch.randint(0, 50, (1, 3))
    packed = torch.cat([a, b, torch.zeros(1, 2, dtype=torch.long)], dim=1)  # 2 padding
    segments = torch.tensor([[1] * 5 + [2] * 3 + [0] * 2])
    out = model(packed, segments=segments)
    torch.testing.assert_close(out[:, :5], model(a), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 5:8], model(b), rtol=1e-5, atol=1e-5)
    plain = model(packed)  # without segments the second example sees the first
    assert not torch.allclose(plain[:, 5:8], model(b), atol=1e-3)
    with pytest.raises(ConfigError, match="segments"):
        model(packed, mask=segments > 0, segments=segments)


def test_segment_positions_restart_at_each_example():
    from lmlab.models.layers import segment_positions

    got = segment_positions(torch.tensor([[1, 1, 2, 2, 2, 0], [1, 2, 3, 3, 0, 0]]))
    assert got.tolist() == [[0, 1, 0, 1, 2, 0], [0, 0, 0, 1, 0, 1]]


LLAMA = {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "n_kv_heads": 2}


@pytest.mark.parametrize(
    "variant, bits",
    [(LLAMA, 4), ({}, 4), (LLAMA, 16), ({**LLAMA, "n_kv_heads": 1}, 16)],
    ids=["llama-4bit", "gpt2-4bit", "llama-bf16", "llama-mqa-bf16"],
)
def test_fast_decoding_gives_the_plain_paths_numbers(variant, bits):
    """The decoding shortcuts (4-bit q/k/v and gate/up in one kernel call) give the logits,
    bit for bit, and so the greedy tokens of the plain path: batched, left-padded (a
    mask), cached. GPT-2 style: learned positions, biases everywhere."""
    from lmlab.generate import SamplingParams, generate_ids
    from lmlab.quant import quantize_model

    spec = tiny_spec(d_model=64, d_ff=128, n_layers=3, max_seq_len=48, **variant)
    model = build_model(spec).eval()
    if bits == 4:
        model = quantize_model(model, "int4", dtype=torch.bfloat16)
    else:
        model = model.to(torch.bfloat16)
    ids = torch.randint(0, 50, (2, 9))
    prompts = [ids[0].tolist(), ids[1, :5].tolist()]
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    out, logits, steps = {}, {}, {}
    for fast in (False, True):
        model.use_fast_decoding(fast)
        with torch.no_grad():
            logits[fast] = model(ids)
            cache = model.new_cache(2, 12)
            model(ids[:, :8], cache=cache)
            steps[fast] = torch.cat([model(ids[:, i : i + 1], cache=cache) for i in (8, 3, 5)], 1)
        out[fast] = generate_ids(model, prompts, params)
    assert torch.equal(logits[True], logits[False])
    assert torch.equal(steps[True], steps[False])
    assert out[True] == out[False]
    assert bool(model.blocks[0].attn._fused) == (bits == 4)  # the fused path did run


def test_the_plain_path_undoes_fused_4bit_projections():
    """use_fast_decoding(False) after the fused path ran: the 4-bit projections that shared
    one packed copy compute alone again (each its own copy), with the same logits."""
    from lmlab.quant import quantize_model

    spec = tiny_spec(d_model=64, d_ff=128, n_layers=2, max_seq_len=48, **LLAMA)
    model = quantize_model(build_model(spec).eval(), "int4", dtype=torch.bfloat16)
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    with torch.no_grad():
        fused = model(ids)
        assert attn.q_proj._kernel is attn.v_proj._kernel is not None
        assert mlp.gate_proj._kernel is mlp.up_proj._kernel is not None
        model.use_fast_decoding(False)
        plain = model(ids)
    for layer in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
        assert layer._kernel.layers == [layer]
    assert torch.equal(plain, fused)


# ----------------------------------------------------------------------------- positions,
# residual connections and norms taken out (issue 23)

POS_KINDS = ["learned", "rope", "sinusoidal", "none"]


def test_sinusoidal_table_matches_the_formula_by_hand():
    from lmlab.models.transformer import sinusoidal_table

    pe = sinusoidal_table(torch.tensor([[0, 3, 7]]), 8)[0]  # (3 positions, D = 8)
    # PE[pos, 2i] = sin(pos / 10000^(2i/8)), PE[pos, 2i+1] = cos(same), i = 0..3;
    # e.g. PE[3, 2] = sin(3 / 10000^(1/4)) = sin(0.3) = 0.2955202, PE[3, 3] = cos(0.3)
    assert pe[1, 2].item() == pytest.approx(0.2955202, abs=1e-6)
    assert pe[1, 3].item() == pytest.approx(0.9553365, abs=1e-6)
    for row, pos in enumerate((0, 3, 7)):
        for i in range(4):
            angle = pos / 10000 ** (2 * i / 8)
            assert pe[row, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert pe[row, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_sinusoidal_positions_are_added_and_not_trained():
    from lmlab.models.transformer import sinusoidal_table

    model = build_model(tiny_spec(pos="sinusoidal")).eval()
    none = build_model(tiny_spec(pos="none"))
    assert set(model.state_dict()) == set(none.state_dict())  # no position parameters
    seen = {}
    model.blocks[0].hook_resid_pre.register_forward_hook(lambda m, i, o: seen.update(x=o))
    ids = torch.randint(0, 50, (2, 9))
    model(ids)
    # the stream entering block 0: tokens scaled by sqrt(D) (Vaswani et al. 3.4) + the table
    expected = model.tok_emb(ids) * math.sqrt(32) + sinusoidal_table(torch.arange(9)[None], 32)
    torch.testing.assert_close(seen["x"], expected)


@pytest.mark.parametrize("pos", POS_KINDS)
def test_every_position_kind_decodes_pads_and_packs_right(pos):
    torch.manual_seed(1)
    model = build_model(tiny_spec(pos=pos)).eval()
    # 1. cached decoding equals recomputing the whole prefix
    ids = torch.randint(0, 50, (2, 20))
    cache = model.new_cache(2, 32)
    steps = [model(ids[:, :7], cache=cache)] + [
        model(ids[:, t : t + 1], cache=cache) for t in range(7, 20)
    ]
    torch.testing.assert_close(torch.cat(steps, 1), model(ids), atol=1e-5, rtol=1e-5)
    # 2. a left-padded row, then a cached step, equals the row alone
    a, b = torch.randint(0, 50, (1, 9)), torch.randint(0, 50, (1, 5))
    padded = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :4] = False
    cache = model.new_cache(2, 16)
    first = model(padded, cache=cache, mask=mask)
    nxt = torch.randint(0, 50, (2, 1))
    second = model(nxt, cache=cache)
    torch.testing.assert_close(first[1, 4:], model(b)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        second[1, 0], model(torch.cat([b, nxt[1:]], 1))[0, -1], atol=1e-5, rtol=1e-5
    )
    # 3. a packed row computes what its examples would alone (positions restart)
    packed = torch.cat([a[:, :5], b[:, :3]], dim=1)
    out = model(packed, segments=torch.tensor([[1] * 5 + [2] * 3]))
    torch.testing.assert_close(out[:, 5:], model(b[:, :3]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pos", POS_KINDS)
def test_only_pos_none_is_blind_to_the_order_of_the_prefix(pos):
    # In one block the last token attends over the earlier ones as a set (their keys and
    # values depend on each token alone): with no positions, shuffling them (the last token
    # kept in place) cannot change its logits; with any scheme it does. (With more blocks
    # the causal mask itself leaks order: token i has seen only i tokens.)
    torch.manual_seed(2)
    model = build_model(tiny_spec(pos=pos, n_layers=1)).eval()
    ids = torch.randint(0, 50, (1, 12))
    shuffled = torch.cat([ids[:, :-1][:, torch.randperm(11)], ids[:, -1:]], dim=1)
    assert not torch.equal(shuffled, ids)
    same = torch.allclose(model(shuffled)[0, -1], model(ids)[0, -1], atol=1e-5)
    assert same == (pos == "none")


@pytest.mark.parametrize("residual", [True, False])
def test_residual_switch_adds_or_drops_the_blocks_input(residual):
    torch.manual_seed(3)
    model = build_model(tiny_spec(residual=residual)).eval()
    block = model.blocks[0]
    x = torch.randn(2, 6, 32)
    with torch.no_grad():  # sublayers that output exactly 0 (zero output projections)
        for linear in (block.attn.o_proj, block.mlp.down_proj):
            linear.weight.zero_()
            linear.bias.zero_()
    out = block(x, None, None, None)
    # with the residual the block passes its input on; without, only its sublayers' 0
    torch.testing.assert_close(out, x if residual else torch.zeros_like(x))


def test_norm_none_has_no_norm_and_the_old_configs_still_load(tmp_path):
    import json

    from lmlab.checkpoint.io import save_checkpoint
    from lmlab.lm import load

    with_norm, without = build_model(tiny_spec()), build_model(tiny_spec(norm="none"))
    assert not any("norm" in name for name, _ in without.named_parameters())
    # LayerNorm with bias: weight and bias of D each, two per block and one final
    count = sum(p.numel() for p in with_norm.parameters()) - sum(
        p.numel() for p in without.parameters()
    )
    assert count == 2 * 32 * (2 * 2 + 1)
    # a checkpoint written before residual/norm="none"/the new pos kinds existed
    model = build_model(tiny_spec()).eval()
    path = save_checkpoint(tmp_path / "ckpt", model)
    config = json.loads((path / "config.json").read_text())
    config["model"].pop("residual")
    (path / "config.json").write_text(json.dumps(config))
    ids = torch.randint(0, 50, (1, 8))
    loaded = load(path).model
    assert loaded.config.residual
    torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)
    with pytest.raises(ConfigError, match="pos='nope'.*sinusoidal, none"):
        build_model(tiny_spec(pos="nope"))
    with pytest.raises(ConfigError, match="d_model=33.*even"):
        build_model(tiny_spec(pos="sinusoidal", d_model=33, n_heads=3, d_head=11))


@pytest.mark.parametrize("change", [{"pos": "sinusoidal"}, {"norm": "none"}, {"residual": False}])
def test_lesson_only_variants_are_refused_by_the_hf_export(change):
    from lmlab.errors import CheckpointError

    with pytest.raises(CheckpointError, match="no Hugging Face layout"):
        to_hf(build_model(tiny_spec(**change)))


def test_decoding_reads_ropes_rows_from_a_table_with_rope_tables_numbers(monkeypatch):
    """A decoding step of unpadded rows reads its positions' cos and sin from a table that
    ``prepare_decoding`` makes once per model (a compiled step asks for it: no float64 cos
    and sin in every layer's kernel): the same bits as ``rope_tables``, and the same logits
    as computing them, unpadded and padded (where positions differ per row and the table is
    not used)."""
    from lmlab.models.transformer import rope_tables

    model = build_model(tiny_spec(pos="rope", rope_theta=100000.0)).eval()
    assert getattr(model, "_rope_table", None) is None
    model.new_cache(2, 30)
    assert getattr(model, "_rope_table", None) is None  # eager decoding makes none
    model.prepare_decoding("cpu")
    cos, sin = model._rope_table.cos, model._rope_table.sin
    positions = torch.arange(model.config.max_seq_len)[None]
    want = rope_tables(positions, model.config.head_size, model.config.rope_theta)
    assert torch.equal(cos, want[0][0, 0]) and torch.equal(sin, want[1][0, 0])
    long = build_model(tiny_spec(pos="rope", max_seq_len=2500))  # made 1,024 rows at a time
    long.prepare_decoding("cpu")
    want = rope_tables(torch.arange(2500)[None], long.config.head_size, long.config.rope_theta)
    assert torch.equal(long._rope_table.cos, want[0][0, 0])
    assert torch.equal(long._rope_table.sin, want[1][0, 0])
    ids = torch.randint(0, 50, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :3] = False  # a left-padded row: the masked path, positions from the rows
    import lmlab.models.transformer as transformer

    evaluated = []

    def counted(*args):
        evaluated.append(1)
        return rope_tables(*args)

    monkeypatch.setattr(transformer, "rope_tables", counted)
    for m in (None, mask):
        cache = model.new_cache(2, 30)
        evaluated.clear()
        steps = [model(ids[:, :8], cache=cache, mask=None if m is None else m[:, :8])]
        steps += [model(ids[:, t : t + 1], cache=cache) for t in range(8, 12)]
        assert len(evaluated) == (0 if m is None else 5)  # the padded path evaluates them
        table = model.__dict__.pop("_rope_table")  # the same steps, cos and sin evaluated
        again = model.new_cache(2, 30)
        ref = [model(ids[:, :8], cache=again, mask=None if m is None else m[:, :8])]
        ref += [model(ids[:, t : t + 1], cache=again) for t in range(8, 12)]
        assert all(torch.equal(a, b) for a, b in zip(steps, ref))
        model.__dict__["_rope_table"] = table
