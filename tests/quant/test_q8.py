"""GGUF's Q8_0 blocks kept as they are (``lmlab.quant.q8``): the layout, lmlab's kernel
(``q8_cpu.cpp``, ``torch.ops.lmlab.q8_0_mm``) against float64 on random sizes, rows and
threads, the fallback without it, the raw-block reader against the gguf package, and the
embedding that reads the same blocks. Loading, saving and compiling a model that holds
them: tests/checkpoint/test_gguf.py and tests/generate/test_compiled.py."""

import gguf
import numpy as np
import pytest
import torch

from builders import assert_rows_and_threads_agree
from lmlab.errors import ConfigError
from lmlab.quant import dequantize_model
from lmlab.quant.q8 import (
    Q8_0Embedding,
    Q8_0Linear,
    native_q8_0_mm,
    pack_q8_0,
    unpack_q8_0,
)

HAS_NATIVE = native_q8_0_mm() is not None
needs_native = pytest.mark.skipif(
    not HAS_NATIVE,
    reason="lmlab's Q8_0 kernel does not run here (no AVX-512 BF16, or no C++ compiler)",
)


def random_blocks(n, k, g):
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    d = (torch.rand(n, k // 32, generator=g) * 0.02 + 1e-4).to(torch.float16)
    return q, d


def exact_weight(q, d):
    return q.double() * d.double().repeat_interleave(32, 1)


def within_float32_sums(y, x, w):
    """|y - x W^T| <= 2^-16 sum |x| |W|: float32 sums of exact products (a few dozen
    roundings of 2^-24 each, far below this bound; a wrong weight or scale is far above)."""
    exact = x.double() @ w.t()
    bound = (x.double().abs() @ w.abs().t()) * 2**-16
    return bool(((y.double() - exact).abs() <= bound).all())


def test_pack_q8_0_round_trips_and_places_each_weight_where_documented():
    g = torch.Generator().manual_seed(0)
    q, d = random_blocks(48, 96, g)
    qweight, scale = pack_q8_0(q, d)
    assert qweight.shape == (3, 48, 32) and scale.shape == (3, 3, 16)
    q2, d2 = unpack_q8_0(qweight, scale)
    assert torch.equal(q2, q) and torch.equal(d2, d)
    # output n = 16 nb + r, input k = 2 p + e: pair p, byte 2 r + e
    for n, k in [(0, 0), (17, 33), (47, 95), (5, 70)]:
        assert qweight[n // 16, k // 2, 2 * (n % 16) + k % 2] == q[n, k]
        assert scale[n // 16, k // 32, n % 16] == d[n, k // 32]


@needs_native
@pytest.mark.parametrize("seed", range(6))
def test_kernel_matches_float64_on_random_inputs(seed):
    """Random sizes (rows of x 1-11: every 4-row tile and remainder; N in 16s, K in 32s):
    float32 logits within float32 summation error of the float64 product."""
    g = torch.Generator().manual_seed(seed)
    n = 16 * int(torch.randint(1, 12, (), generator=g))
    k = 32 * int(torch.randint(1, 20, (), generator=g))
    m = int(torch.randint(1, 12, (), generator=g))
    q, d = random_blocks(n, k, g)
    x = (torch.randn(m, k, generator=g) * 3).to(torch.bfloat16)
    layer = Q8_0Linear(q, d)
    y = layer(x)
    assert layer.native and y.dtype == torch.float32 and y.shape == (m, n)
    assert within_float32_sums(y, x, exact_weight(q, d))


@needs_native
def test_kernel_rows_are_independent_and_threads_do_not_change_numbers():
    g = torch.Generator().manual_seed(1)
    layer = Q8_0Linear(*random_blocks(96, 128, g))
    assert_rows_and_threads_agree(layer, torch.randn(7, 128, generator=g).to(torch.bfloat16))


@needs_native
def test_kernel_names_a_wrong_argument():
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    qweight = torch.zeros(2, 32, 32, dtype=torch.int8)
    scale = torch.zeros(2, 2, 16, dtype=torch.float16)
    torch.ops.lmlab.q8_0_mm(x, qweight, scale)  # right: no error
    with pytest.raises(RuntimeError, match="contiguous bf16"):
        torch.ops.lmlab.q8_0_mm(x.float(), qweight, scale)
    with pytest.raises(RuntimeError, match="int8"):
        torch.ops.lmlab.q8_0_mm(x, qweight.to(torch.uint8), scale)
    with pytest.raises(RuntimeError, match="must be K / 2"):
        torch.ops.lmlab.q8_0_mm(x[:, :32].contiguous(), qweight, scale)
    with pytest.raises(RuntimeError, match="fp16"):
        torch.ops.lmlab.q8_0_mm(x, qweight, scale.float())


def test_without_the_kernel_the_dequantized_weight_gives_the_same_numbers():
    """A gradient, a float32 input or no kernel: the float32 product with the exact
    weight, within the same float32 bound as the kernel."""
    g = torch.Generator().manual_seed(2)
    q, d = random_blocks(64, 96, g)
    layer = Q8_0Linear(q, d)
    assert torch.equal(layer.dequantize(torch.float64), exact_weight(q, d))
    x = torch.randn(3, 96, generator=g).to(torch.bfloat16)
    kernel = layer(x)
    layer.native = False
    plain = layer(x)
    assert plain.dtype == torch.float32
    assert within_float32_sums(plain, x, exact_weight(q, d))
    assert within_float32_sums(kernel, x, exact_weight(q, d))
    with_grad = layer(x.float().requires_grad_())
    assert with_grad.requires_grad and within_float32_sums(with_grad, x, exact_weight(q, d))


def test_bad_shapes_are_one_line_errors():
    g = torch.Generator().manual_seed(0)
    q, d = random_blocks(32, 64, g)
    with pytest.raises(ConfigError, match="multiple of 16"):
        Q8_0Linear(q[:20], d[:20])
    with pytest.raises(ConfigError, match=r"d of shape \(N, K / 32\)"):
        Q8_0Linear(q, d[:, :1])
    with pytest.raises(ConfigError, match="int8"):
        Q8_0Linear(q.float(), d)
    qweight, scale = pack_q8_0(q, d)
    assert torch.equal(
        Q8_0Linear.packed(qweight, scale).dequantize(), Q8_0Linear(q, d).dequantize()
    )
    with pytest.raises(ConfigError, match="scale fp16"):
        Q8_0Linear.packed(qweight, scale.float())


@pytest.mark.parametrize("rows", [16, 32, 2048])
def test_from_blocks_reads_gguf_q8_0_as_the_gguf_package_does(rows):
    """Raw Q8_0 blocks, read 16 or 32 rows at a time or all at once: the layer's weight
    equals gguf.quants.dequantize's, bit for bit (both are q * d in float32, exact), and
    its layout is pack_q8_0's (from_blocks writes it through strided views); ``empty``
    makes the two tensors it fills."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((48, 96)) * rng.uniform(0.01, 3, (48, 1))).astype(np.float32)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)  # (48, 3 * 34) uint8
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0).astype(np.float32)
    reads = []

    def read(start, stop):
        reads.append((start, stop))
        return raw[start:stop].tobytes()

    made = []

    def empty(*specs):
        made.append(specs)
        return [torch.full(shape, 99, dtype=dtype) for shape, dtype in specs]

    layer = Q8_0Linear.from_blocks(read, 48, 96, rows=rows, empty=empty)
    assert torch.equal(layer.dequantize(), torch.from_numpy(expected))
    assert reads == [(s, min(48, s + rows)) for s in range(0, 48, rows)]
    assert made == [(((3, 48, 32), torch.int8), ((3, 3, 16), torch.float16))]
    blocks = raw.reshape(48, 3, 34)
    q = torch.from_numpy(blocks[..., 2:].copy().view(np.int8).reshape(48, 96))
    d = torch.from_numpy(blocks[..., :2].copy().view(np.float16).reshape(48, 3))
    qweight, scale = pack_q8_0(q, d)
    assert torch.equal(layer.qweight, qweight) and torch.equal(layer.scale, scale)
    with pytest.raises(ConfigError, match="read gave"):
        Q8_0Linear.from_blocks(lambda a, b: raw[a : b - 1].tobytes(), 48, 96)


@pytest.mark.parametrize("seed", range(3))
def test_from_float_quantizes_as_the_gguf_package_does(seed):
    """The same int8 weights and fp16 scales as gguf.quants.quantize (ggml's reference
    Q8_0), byte for byte, on random rows of mixed scales, an all-zero block and exact
    halves (which round away from zero)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((32, 128)) * rng.uniform(1e-3, 10, (32, 1))).astype(np.float32)
    w[3, 32:64] = 0
    w[5, :32] = np.arange(-16, 16) / 31 * 127 / 2  # d = 4.1, q = w / d halves
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0).reshape(32, 4, 34)
    q, d = Q8_0Linear.from_float(torch.from_numpy(w)).unpacked()
    expected_d = torch.from_numpy(raw[..., :2].copy().view(np.float16).reshape(32, 4))
    expected_q = torch.from_numpy(raw[..., 2:].copy().view(np.int8).reshape(32, 128))
    assert torch.equal(d, expected_d) and torch.equal(q, expected_q)


def test_embedding_reads_the_layers_rows_and_follows_to():
    """Rows are q * d rounded once to the table's dtype (what a dense load gives); the
    weight is the whole table; ``.to(dtype)`` changes the rows' dtype and leaves the fp16
    scales alone (rounding them to bf16 would change the weights)."""
    g = torch.Generator().manual_seed(4)
    q, d = random_blocks(64, 96, g)
    head = Q8_0Linear(q, d)
    table = Q8_0Embedding(head, torch.bfloat16)
    assert isinstance(table, torch.nn.Embedding)
    assert (table.num_embeddings, table.embedding_dim) == (64, 96)
    dense = exact_weight(q, d).float().to(torch.bfloat16)
    ids = torch.tensor([[0, 63, 17], [5, 5, 40]])
    assert torch.equal(table(ids), dense[ids])
    assert torch.equal(table.weight, dense)
    model = torch.nn.ModuleDict({"tok_emb": table, "lm_head": head})
    model.to(torch.float32)
    assert head.scale.dtype == torch.float16
    assert torch.equal(head.dequantize(), exact_weight(q, d).float())
    assert torch.equal(table(ids), exact_weight(q, d).float()[ids])
    model.to(torch.bfloat16)
    assert head.scale.dtype == torch.float16 and table(ids).dtype == torch.bfloat16
    assert list(table.state_dict()) == []  # the blocks belong to the layer


def test_dequantize_model_ties_the_dense_head_and_embedding_again():
    g = torch.Generator().manual_seed(5)
    q, d = random_blocks(32, 64, g)
    head = Q8_0Linear(q, d)
    model = torch.nn.Module()
    model.tok_emb, model.lm_head = Q8_0Embedding(head, torch.bfloat16), head
    dequantize_model(model, torch.float32)
    assert type(model.lm_head) is torch.nn.Linear and type(model.tok_emb) is torch.nn.Embedding
    assert model.tok_emb.weight is model.lm_head.weight
    assert torch.equal(model.lm_head.weight, exact_weight(q, d).float())


def side_by_side(layers):
    """Lay ``layers``' blocks side by side in one qweight and one scale tensor (as a GGUF
    load's place_side_by_side does), each layer's buffers becoming views of them."""
    qweight = torch.cat([m.qweight for m in layers])
    scale = torch.cat([m.scale for m in layers])
    start = 0
    for m in layers:
        rows = slice(start, start + m.out_features // 16)
        m.qweight, m.scale = qweight[rows], scale[rows]
        start = rows.stop
    return qweight, scale


@needs_native
@pytest.mark.parametrize("rows", [1, 5])
def test_fuse_computes_side_by_side_layers_in_one_call_with_the_same_numbers(rows):
    """Three inner layers (outputs in the input's dtype) whose blocks lie side by side:
    fuse reads them in place (no copy) and gives each layer's outputs bit for bit, side by
    side. Layers laid out otherwise, in another order, or output layers (float32) are not
    fused; a layer whose blocks move (``_apply``) makes the fused call stale."""
    g = torch.Generator().manual_seed(5)
    layers = [Q8_0Linear(*random_blocks(n, 96, g)) for n in (64, 16, 32)]
    for m in layers:
        m.float_output = False
    assert Q8_0Linear.fuse(layers) is None  # each in its own tensor
    qweight, _ = side_by_side(layers)
    assert Q8_0Linear.fuse(layers[::-1]) is None  # not in this order
    fused = Q8_0Linear.fuse(layers)
    assert fused is not None and fused.qweight.data_ptr() == qweight.data_ptr()
    assert fused.out_features == 112 and fused.qweight.shape == (7, 48, 32)
    x = torch.randn(rows, 96, generator=g).to(torch.bfloat16)
    expected = torch.cat([m(x) for m in layers], dim=-1)
    assert expected.dtype == torch.bfloat16 and fused.applies(x)
    assert torch.equal(fused(x), expected)
    assert torch.equal(fused(x[None]), expected[None])  # (B, T, K) inputs keep their shape
    assert not fused.applies(x.float())
    layers[0].float_output = True
    assert Q8_0Linear.fuse(layers) is None
    layers[0].float_output = False
    layers[1]._apply(lambda t: t)  # nothing moved (a .to() to where it is)
    assert fused.packed is not None
    layers[1]._apply(lambda t: t.clone())  # moved: its blocks are no longer the fused ones
    assert fused.packed is None and Q8_0Linear.fuse(layers) is None
