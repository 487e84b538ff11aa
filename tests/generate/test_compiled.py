"""The compiled one-token step (``SamplingParams(compile=True)``): the same tokens as the
eager path, one graph for a whole run, saved for later processes, dynamo's step where a
model does not trace as one graph, a clear error without a C++ compiler."""

import dataclasses
import sys

import pytest
import torch
from torch._dynamo.utils import counters

import lmlab.generate.compiled as compiled_module
from lmlab.errors import DecodingError
from lmlab.generate import SamplingParams, generate, generate_ids, stream_ids
from lmlab.models import build_model, get_preset
from lmlab.models.layers import RMSNorm
from lmlab.models.transformer import Transformer, rope_tables
from lmlab.quant import Q8_0Embedding, Q8_0Linear, int4, quantize_model
from lmlab.quant.int4 import Int4Linear

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15], [1, 2, 3, 4, 5]]


def tiny(dtype=torch.float32, seed=0, **overrides):
    """A random 2-layer Llama-style model (RoPE, RMSNorm, SwiGLU, grouped-query attention)
    with weights large enough that its argmax has clear winners."""
    torch.manual_seed(seed)
    spec = {**get_preset("gpt-char-tiny"), "vocab_size": 50, "d_model": 32, "n_layers": 2}
    spec |= dict(n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=128, pos="rope")
    spec |= dict(norm="rmsnorm", mlp="swiglu", bias=False) | overrides
    model = build_model(spec).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model.to(dtype)


def graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    return counters["stats"]["unique_graphs"]


def steps_compiled() -> int:
    """Whole-graph steps compiled (not loaded) in this process so far."""
    return compiled_module.compiled_steps()[0]


def new_process():
    """What a later process starts with: no step in memory (the saved ones stay)."""
    compiled_module.reset()


@pytest.fixture(autouse=True)
def _fresh_dynamo(tmp_path, monkeypatch):
    monkeypatch.setenv("LMLAB_COMPILE_CACHE", str(tmp_path / "steps"))
    new_process()  # each test starts with no compiled graph (and no recompile limit)
    yield
    new_process()


def greedy(max_new_tokens, compile=False):
    return SamplingParams(temperature=0, max_new_tokens=max_new_tokens, compile=compile)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
def test_compiled_greedy_equals_eager_with_a_bounded_number_of_graphs(dtype):
    model = tiny(dtype)
    eager = generate(model, PROMPTS[:1], greedy(64))
    before = steps_compiled()
    first = generate(model, PROMPTS[:1], greedy(64, compile=True))
    assert first.ids == eager.ids
    # one graph for 64 steps of a growing cache: no recompilation per token
    assert steps_compiled() - before == 1
    assert first.compile_seconds > 0 and eager.compile_seconds == 0
    # a padded batch takes the masked path (and dynamo treats batch 1 apart): one more graph
    padded = generate(model, PROMPTS, greedy(40, compile=True))
    assert padded.ids == generate_ids(model, PROMPTS, greedy(40))
    assert steps_compiled() - before == 2 and padded.compile_seconds > 0
    # another batch size, prompt lengths and cache size: the same graphs, nothing compiled
    again = generate(model, PROMPTS[1:], greedy(30, compile=True))
    assert again.ids == generate_ids(model, PROMPTS[1:], greedy(30))
    assert steps_compiled() - before == 2 and again.compile_seconds == 0
    stream = stream_ids(model, PROMPTS[0], greedy(64, compile=True))
    assert list(stream) == eager.ids[0] and steps_compiled() - before == 2
    # a later process loads both from disk: nothing compiled, the same tokens
    new_process()
    loaded = compiled_module.compiled_steps()[1]
    assert generate(model, PROMPTS[:1], greedy(64, compile=True)).ids == eager.ids
    assert generate(model, PROMPTS, greedy(40, compile=True)).ids == padded.ids
    assert steps_compiled() - before == 2 and compiled_module.compiled_steps()[1] - loaded == 2


@pytest.mark.slow
def test_compiled_padded_batches_beams_and_sampling_equal_eager():
    model = tiny(n_kv_heads=4, pos="learned", norm="layernorm", mlp="gelu", bias=True)
    for params in [
        SamplingParams(temperature=0, max_new_tokens=24, eos_id=3),
        SamplingParams(max_new_tokens=24, seed=0, top_p=0.9),
        SamplingParams(max_new_tokens=12, num_beams=3),
    ]:
        compiled = dataclasses.replace(params, compile=True)
        assert generate_ids(model, PROMPTS, compiled) == generate_ids(model, PROMPTS, params)

    # dynamo ignores hooks added after compiling: a model with hooks decodes eagerly
    before = generate_ids(model, PROMPTS, greedy(8, compile=True))
    handle = model.lm_head.register_forward_hook(lambda module, args, out: out.flip(-1))
    hooked = generate(model, PROMPTS, greedy(8, compile=True))
    assert hooked.ids == generate_ids(model, PROMPTS, greedy(8)) and hooked.ids != before
    handle.remove()
    # a run checks every guard at its first step: a setting changed since the last run counts
    model.use_explicit_attention(True)
    compiled_before = steps_compiled()
    assert generate_ids(model, PROMPTS, greedy(8, compile=True)) == before
    assert steps_compiled() > compiled_before


@pytest.mark.slow
def test_a_damaged_saved_step_is_compiled_afresh(tmp_path):
    model = tiny()
    eager = generate_ids(model, PROMPTS[:1], greedy(16))
    assert generate_ids(model, PROMPTS[:1], greedy(16, compile=True)) == eager
    (saved,) = (tmp_path / "steps").iterdir()
    saved.write_bytes(saved.read_bytes()[:1000])  # cut short, as by a full disk
    new_process()
    before = steps_compiled()
    assert generate_ids(model, PROMPTS[:1], greedy(16, compile=True)) == eager
    assert steps_compiled() - before == 1 and saved.stat().st_size > 1000  # rewritten whole
    # another model of the same shape is another key: its own step, its own tokens
    other = tiny(seed=1)
    other.blocks[0].attn.explicit = True
    assert generate_ids(other, PROMPTS[:1], greedy(16, compile=True)) == generate_ids(
        other, PROMPTS[:1], greedy(16)
    )
    assert steps_compiled() - before == 2


@pytest.mark.slow
def test_models_of_one_layout_share_a_step_and_keep_their_own_weights():
    """Two 4-bit models with one layout have one key: the step reads each one's weights,
    packed int4 kernels included (held by a module that no model registers), in this
    process and after loading the saved step."""

    def int4_model(seed):
        model = tiny(torch.bfloat16, seed=seed, d_model=64, d_ff=128, vocab_size=64)
        return quantize_model(model, "int4")

    a, b = int4_model(0), int4_model(1)
    eager = [generate_ids(m, PROMPTS[:1], greedy(24)) for m in (a, b)]
    assert eager[0] != eager[1]
    before = steps_compiled()
    for _ in ("compiled here", "loaded from disk"):
        for m, ids in zip((b, a), eager[::-1]):
            assert generate_ids(m, PROMPTS[:1], greedy(24, compile=True)) == ids
        assert steps_compiled() - before == 1
        new_process()


@pytest.mark.slow
def test_a_compiled_step_takes_the_kernels_weights_as_fixed_in_shape_and_place(caplog):
    """The int4 and Q8_0 kernels' weights (fused or one layer's, views of a larger block)
    enter a compiled step as parameters do: no size or storage offset of theirs becomes a
    symbol of the graph, each of which the step would read and wrap at every call (130
    for SmolLM2 in 4 bits, 120 in 8: about 0.4 ms a token). The symbols left are the
    cache's and the token buffer's."""
    import logging

    models = {"int4": quantize_model(tiny(torch.bfloat16, d_model=64, d_ff=128), "int4")}
    models["q8_0"] = in_q8_0_blocks(d_model=128, d_ff=256)
    torch._logging.set_logs(dynamic=logging.INFO)
    try:
        for name, model in models.items():
            caplog.clear()
            with caplog.at_level(logging.INFO):
                generate(model, PROMPTS[:1], greedy(4, compile=True))
            created = [r.getMessage() for r in caplog.records if "create_symbol" in r.getMessage()]
            assert created, "no symbol logged: the check would see nothing"
            weights = [m for m in created if "_kernel" in m or "_fused" in m]
            assert not weights, f"{name}: {weights[:3]}"
            assert all("L['cache']" in m or "L['ids']" in m for m in created), created
    finally:
        torch._logging.set_logs()


@pytest.mark.slow
def test_compiled_norms_and_rotary_tables_give_eagers_bits():
    """The pieces of a Llama step that inductor generates code for, rather than calling
    the eager kernel, where float32 would round differently: RMSNorm's sum of squares
    (inputs with outlier channels, as trained models have) and RoPE's cos and sin over
    8,192 positions. Both compute in float64 first (``RMSNorm``, ``rope_tables``); in
    float32 this test found 9 of 576,000 norm outputs and about 5% of the table entries
    different, which parted SmolLM2's compiled greedy ids from eager ones."""
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(576).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(576, generator=g))
    compiled = torch.compile(norm, dynamic=True, options=compiled_module._CPU_OPTIONS)
    scale = torch.ones(576)
    scale[torch.randperm(576, generator=g)[:6]] = 100.0  # a few large channels
    with torch.inference_mode():
        for _ in range(1000):
            size = float(torch.rand((), generator=g)) * 10
            x = (torch.randn(1, 1, 576, generator=g) * scale * size).to(torch.bfloat16)
            assert torch.equal(compiled(x), norm(x))
    tables = torch.compile(rope_tables, dynamic=True, options=compiled_module._CPU_OPTIONS)
    positions = torch.arange(8192)[None]
    for head_size, theta in [(64, 100000.0), (128, 500000.0)]:
        for got, expected in zip(
            tables(positions, head_size, theta), rope_tables(positions, head_size, theta)
        ):
            assert torch.equal(got, expected)


@pytest.mark.slow
def test_compiled_step_gives_eagers_logits_for_a_long_run_of_a_wider_model():
    """128 steps of a 4-layer bf16 model with SmolLM2's widths (576, 9 and 3 heads, 1536)
    and outlier channels in its embedding, weights in 4 bits (lmlab's int4 kernel where
    the CPU runs it) and the tied embedding and head in Q8_0 blocks (as a 4-bit GGUF load
    keeps SmolLM2's): at every step the compiled step's logits equal the eager ones bit
    for bit, the cache growing to 160 positions."""
    model = tiny(
        torch.bfloat16,
        d_model=576,
        n_heads=9,
        n_kv_heads=3,
        d_ff=1536,
        n_layers=4,
        vocab_size=512,
        max_seq_len=256,
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        model.tok_emb.weight[:, :4] *= 200  # a few large channels, as trained models have
    model = quantize_model(model, "int4")
    model.lm_head = Q8_0Linear.from_float(model.tok_emb.weight)
    model.tok_emb = Q8_0Embedding(model.lm_head, torch.bfloat16)
    step = compiled_module.CompiledStep(torch.device("cpu"))
    with torch.inference_mode():
        caches = [model.new_cache(1, 256) for _ in range(2)]
        prompt = torch.arange(3, 35)[None]
        token = model(prompt, cache=caches[0])[:, -1:].argmax(-1)
        model(prompt, cache=caches[1])
        for _ in range(128):
            eager = model(token, cache=caches[0])
            assert torch.equal(step(model, token, caches[1]), eager)
            token = eager[:, -1:].argmax(-1)


def in_q8_0_blocks(**widths):
    """``tiny`` in bf16 as lmlab keeps a Q8_0 GGUF file's model: every block's linear layer
    a Q8_0Linear (outputs in bf16), laid side by side (``place_side_by_side``), and a Q8_0
    head; skips where lmlab's Q8_0 kernel does not run."""
    from lmlab.checkpoint.gguf import place_side_by_side
    from lmlab.quant.q8 import native_q8_0_mm

    if native_q8_0_mm() is None:
        pytest.skip("lmlab's Q8_0 kernel does not run here (no AVX-512 BF16, or no C++ compiler)")
    model = tiny(torch.bfloat16, vocab_size=64, **widths)
    for name, m in list(model.named_modules()):
        if name.startswith("blocks.") and type(m) is torch.nn.Linear:
            layer = Q8_0Linear.from_float(m.weight)
            layer.float_output = False
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, layer)
    model.lm_head = Q8_0Linear.from_float(model.lm_head.weight)
    place_side_by_side(model)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("length", [16, 18, 23])
def test_compiled_decoding_of_q8_0_blocks_takes_any_prompt_length(length):
    """generate(compile=True) on SmolLM2's attention widths in Q8_0 blocks (q, k and v: 60
    tiles of 16 rows, 18 blocks of 32 inputs) gives the eager ids for a prompt of 16 and 18
    tokens, as for 23. The step reads each token from a fresh tensor: it used to get a view
    of the token buffer, whose storage offset dynamo made a symbol of the graph, shared
    with any size of the same value at the first step. At 16 tokens that was the tiles'
    16 rows, which the graph then expected to grow by one each step: the second step
    failed ("expected size 16==17") on SmolLM2 and on this model."""
    model = in_q8_0_blocks(d_model=576, n_heads=9, n_kv_heads=3, d_ff=64, n_layers=1)
    prompt = [3 + i % 50 for i in range(length)]
    eager = generate_ids(model, [prompt], greedy(8))
    assert generate(model, [prompt], greedy(8, compile=True)).ids == eager


@pytest.mark.slow
def test_compiled_step_gives_eagers_logits_for_a_model_in_q8_0_blocks():
    """A Q8_0 GGUF file's model as lmlab keeps it: every block's linear layer a Q8_0Linear
    (outputs in bf16), laid side by side so that q, k, v and gate, up are one fused call
    each (``place_side_by_side``), and a Q8_0 head: 48 steps of the compiled step give the
    eager logits bit for bit."""
    from lmlab.quant.q8 import Q8_0Fused

    model = in_q8_0_blocks(d_model=128, d_ff=256)
    step = compiled_module.CompiledStep(torch.device("cpu"))
    with torch.inference_mode():
        caches = [model.new_cache(1, 96) for _ in range(2)]
        prompt = torch.arange(3, 35)[None]
        token = model(prompt, cache=caches[0])[:, -1:].argmax(-1)
        model(prompt, cache=caches[1])
        assert type(model.blocks[0].attn._fused[("q_proj", "k_proj", "v_proj")][1]) is Q8_0Fused
        for _ in range(48):
            eager = model(token, cache=caches[0])
            assert torch.equal(step(model, token, caches[1]), eager)
            token = eager[:, -1:].argmax(-1)


def test_the_int4_kernel_holding_the_weights_is_part_of_the_step_key(monkeypatch):
    """lmlab's and torch's int4 kernels keep the weights in other layouts, outside any
    module: a step saved for one is never looked up for the other (LMLAB_INT4_KERNEL)."""
    has_native = int4.native_int4_mm() is not None
    model = quantize_model(tiny(torch.bfloat16, d_model=64, d_ff=128, vocab_size=64), "int4")
    ids = torch.tensor([[1, 2, 3]])
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]

    def key_with(kernel: str) -> str:
        monkeypatch.setenv("LMLAB_INT4_KERNEL", kernel)
        for m in layers:
            m.canonical()  # the next call packs again, with this kernel
        with torch.inference_mode():
            model(ids)
        assert all(m._kernel.native == (kernel == "lmlab") for m in layers)
        return compiled_module.step_key(model, ids[:, :1], None)

    assert key_with("torch") == key_with("torch")
    if not has_native:
        pytest.skip("lmlab's int4 kernel does not run here: one kernel, one key")
    assert key_with("lmlab") != key_with("torch")


def test_the_source_of_a_users_own_module_class_is_part_of_the_step_key(tmp_path, monkeypatch):
    """A step traced from a user's module class is never loaded after its file changed;
    lmlab's own classes count through the package digest, not one file each."""
    import importlib

    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "user_norm", raising=False)  # undone after the test
    source = tmp_path / "user_norm.py"
    model, ids = tiny(), torch.tensor([[1]])

    def key_with(body: str) -> str:
        source.write_text(USER_NORM + body)
        module = importlib.reload(importlib.import_module("user_norm"))
        model.norm.__class__ = module.Norm
        return compiled_module.step_key(model, ids, None)

    plain = key_with("    pass\n")
    assert key_with("    pass\n") == plain
    assert key_with("    scale = 2\n") != plain


USER_NORM = "from lmlab.models.layers import RMSNorm\n\nclass Norm(RMSNorm):\n"


@pytest.mark.parametrize("file", [None, "<stdin>"], ids=["exec", "stdin"])
def test_a_users_module_class_without_a_file_keys_by_its_code(file, monkeypatch):
    """A class made by exec (its module is nowhere) or read from stdin (its module's file
    is '<stdin>') has no file to read: the key takes its methods' code instead of failing."""
    import types

    if file is not None:
        main = types.ModuleType("user_main")
        main.__file__ = file
        monkeypatch.setitem(sys.modules, "user_main", main)
    model, ids = tiny(), torch.tensor([[1]])

    def key_with(factor: int) -> str:
        forward = f"    def forward(self, x):\n        return super().forward(x) * {factor}\n"
        scope = {"__name__": "user_main"}
        exec(compile(USER_NORM + forward, file or "<string>", "exec"), scope)
        model.norm.__class__ = scope["Norm"]
        return compiled_module.step_key(model, ids, None)

    assert key_with(2) == key_with(2)
    assert key_with(2) != key_with(3)


class GraphBreaking(Transformer):
    """A Transformer whose forward breaks dynamo's graph (as a print or .item() would)."""

    def forward(self, *args, **kwargs):
        torch._dynamo.graph_break()
        return super().forward(*args, **kwargs)


@pytest.mark.slow
def test_a_model_that_breaks_the_graph_uses_dynamos_step():
    model = tiny(torch.bfloat16)
    model.__class__ = GraphBreaking
    eager = generate(model, PROMPTS[:1], greedy(32))
    before, graphs_before = steps_compiled(), graphs()
    result = generate(model, PROMPTS[:1], greedy(32, compile=True))
    assert result.ids == eager.ids and result.compile_seconds > 0
    assert steps_compiled() == before and graphs() > graphs_before  # dynamo's graphs
    # a later run neither retraces the whole graph nor trips over a piece that recompiles
    again = generate(model, PROMPTS[:1], greedy(32, compile=True))
    assert again.ids == eager.ids and again.compile_seconds == 0


def test_compile_off_never_touches_torch_compile(monkeypatch):
    def refuse():
        raise AssertionError("torch.compile was called with compile off")

    monkeypatch.setattr(compiled_module, "_compiled", refuse)
    model = tiny()
    result = generate(model, PROMPTS, SamplingParams(temperature=0, max_new_tokens=8))
    assert result.compile_seconds == 0 and all(len(row) == 8 for row in result.ids)


def test_no_cpp_compiler_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(compiled_module.shutil, "which", lambda name: None)
    params = SamplingParams(temperature=0, max_new_tokens=4, compile=True)
    with pytest.raises(DecodingError, match="needs a C.. compiler.*g\\+\\+.*without compile"):
        generate(tiny(), PROMPTS, params)
    with pytest.raises(DecodingError, match="C.. compiler"):
        stream_ids(tiny(), PROMPTS[0], params)


def test_compile_must_be_a_bool():
    with pytest.raises(DecodingError, match="compile='yes' is invalid: must be true or false"):
        SamplingParams(compile="yes")
