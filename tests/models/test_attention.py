"""lmlab's one-token attention kernel (lmlab.models.attention, attention_cpu.cpp): within
one bf16 rounding of float64 attention on random shapes and cache views, the same bits
for a row alone or in a batch and on 1 or 2 threads, PyTorch's kernel wherever it does not
apply, and the decoding step of a bf16 model through it in the fast and the plain path
alike."""

import pytest
import torch
import torch.nn.functional as F

from lmlab.generate import SamplingParams, generate_ids
from lmlab.models import attention, build_model, get_preset

pytestmark = pytest.mark.skipif(
    not attention.load(),
    reason="lmlab's attention kernel does not run here (no AVX-512 BF16, or no C++ compiler)",
)


def reference(q, k, v):
    """softmax(q k^T / sqrt(D)) v in float64, for q [B, Hkv, G, D] and k, v [B, Hkv, S, D]."""
    scores = q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5
    return torch.softmax(scores, dim=-1) @ v.double()


def random_case(g, B, H, G, S, D, spare=0):
    """q and views of a longer cache (``spare`` slots past S), as a decoding step has."""
    q = torch.randn(B, H, G, D, generator=g).to(torch.bfloat16)
    k = (torch.randn(B, H, S + spare, D, generator=g) * 2).to(torch.bfloat16)[:, :, :S]
    v = torch.randn(B, H, S + spare, D, generator=g).to(torch.bfloat16)[:, :, :S]
    return q, k, v


def test_within_one_bf16_rounding_of_float64_attention_on_random_shapes():
    """Random batch sizes, heads, groups (1-12 queries per key head), cache lengths (1-600)
    and every head size: each output within 2^-8 of its magnitude plus 2^-12 of float64's
    (a bf16 rounding, 2^-9 relative, and float32 sums and exp to 2 ulp)."""
    g = torch.Generator().manual_seed(0)
    for case in range(40):
        B, H, G = (int(torch.randint(1, n, (), generator=g)) for n in (3, 5, 13))
        S = int(torch.randint(1, 601, (), generator=g))
        D = attention.HEAD_SIZES[case % 4]
        q, k, v = random_case(g, B, H, G, S, D, spare=case % 7)
        ref = reference(q, k, v)
        bound = ref.abs() * 2**-8 + 2**-12
        out = attention.decode_attention(q, k, v)
        assert out.dtype == torch.bfloat16 and out.shape == (B, H, G, D)
        assert ((out.double() - ref).abs() <= bound).all(), (B, H, G, S, D)
        # PyTorch's bf16 kernel rounds the weights to bf16 before multiplying the values,
        # and misses this bound: its mean error is at least this kernel's
        torch_out = F.scaled_dot_product_attention(q, k, v)
        ours, theirs = ((x.double() - ref).abs().mean() for x in (out, torch_out))
        assert ours <= theirs, (B, H, G, S, D)


@pytest.mark.parametrize("S", [37, 3000], ids=["short", "long: threads"])
def test_a_row_gets_the_same_bits_alone_in_a_batch_and_on_any_thread_count(S):
    """3000 keys x 9 queries x 64 of 3 rows are past the kernel's threading threshold."""
    q, k, v = random_case(torch.Generator().manual_seed(1), 3, 3, 3, S, 64, spare=5)
    batch = attention.decode_attention(q, k, v)
    for i in range(3):
        alone = attention.decode_attention(q[i : i + 1], k[i : i + 1], v[i : i + 1])
        assert torch.equal(alone, batch[i : i + 1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(attention.decode_attention(q, k, v), batch)
    finally:
        torch.set_num_threads(threads)


def test_where_the_kernel_does_not_apply_the_caller_gets_none():
    q, k, v = random_case(torch.Generator().manual_seed(2), 1, 2, 2, 9, 64)
    assert attention.decode_attention(q.float(), k.float(), v.float()) is None  # float32
    q48, k48, v48 = random_case(torch.Generator().manual_seed(2), 1, 2, 2, 9, 48)
    assert attention.decode_attention(q48, k48, v48) is None  # head size 48
    assert attention.decode_attention(q, k.transpose(-1, -2).contiguous().mT, v) is None
    with torch.enable_grad():
        assert attention.decode_attention(q.requires_grad_(), k, v) is None
    many = torch.randn(1, 1, 65, 64, dtype=torch.bfloat16)
    assert attention.decode_attention(many, k[:, :1], v[:, :1]) is None  # 65 queries per head


def test_the_operator_refuses_mismatched_tensors_in_one_line():
    q, k, v = random_case(torch.Generator().manual_seed(3), 1, 2, 2, 9, 64)
    with pytest.raises(RuntimeError, match="k and v must be bf16"):
        torch.ops.lmlab.decode_attention(q, k[:, :1], v, 0.125)
    with pytest.raises(RuntimeError, match="head size D must be 32, 64, 128 or 256"):
        torch.ops.lmlab.decode_attention(q[..., :48].contiguous(), k[..., :48], v[..., :48], 1.0)


def test_a_bf16_models_decoding_steps_use_it_in_the_fast_and_the_plain_path(monkeypatch):
    """A Llama-style bf16 model with 64-wide heads (4 query heads, 2 key/value heads):
    every one-token step goes through the kernel, and greedy decoding gives the same ids
    with the decoding shortcuts on and off (the plain path the bench compares against)."""
    import lmlab.models.transformer as transformer

    torch.manual_seed(0)
    spec = {**get_preset("gpt-char-tiny"), "vocab_size": 64, "d_model": 256, "n_layers": 2}
    spec |= dict(n_heads=4, n_kv_heads=2, d_ff=256, max_seq_len=128, pos="rope")
    spec |= dict(norm="rmsnorm", mlp="swiglu", bias=False)
    model = build_model(spec).eval().to(torch.bfloat16)
    calls = []

    def counted(q, k, v, scale=None):
        out = attention.decode_attention(q, k, v, scale)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(transformer, "decode_attention", counted)
    params = SamplingParams(temperature=0, max_new_tokens=24)
    fast = generate_ids(model, [[1, 2, 3, 4, 5]], params)
    steps = len(calls)
    assert steps == 2 * 23 and all(calls)  # two layers, 23 one-token steps
    model.use_fast_decoding(False)
    assert generate_ids(model, [[1, 2, 3, 4, 5]], params) == fast
    assert len(calls) == 2 * steps and all(calls)
