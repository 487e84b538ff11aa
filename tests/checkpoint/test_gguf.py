"""GGUF loading: tiny random Llamas written with gguf.GGUFWriter, the real SmolLM2 file,
and one test per kind of corrupt file (RELIABILITY item 16)."""

import struct
import tracemalloc

import gguf
import numpy as np
import pytest
import torch
import transformers
from torch import nn
from transformers.initialization import no_init_weights

from builders import load_peak_in_subprocess
from hf_models import tiny_llama as shared_tiny_llama
from lmlab.checkpoint.gguf import (
    DEQUANTIZABLE,
    gguf_to_hf,
    gguf_tokenizer,
    load_gguf,
    read_gguf,
    unpermute_rotary,
)
from lmlab.checkpoint.hf import spec_from_hf_config
from lmlab.checkpoint.pretrained import pretrained_path
from lmlab.errors import CheckpointError, DataNotFoundError
from lmlab.generate import generate
from lmlab.generate.params import SamplingParams
from lmlab.generate.search import generate_text
from lmlab.quant.q8 import native_q8_0_mm

Q = gguf.GGMLQuantizationType
HAS_Q8_0 = native_q8_0_mm() is not None  # lmlab's Q8_0 kernel runs: 4-bit loads keep the head

# float32 on CPU: the same maths in a different order (sdpa kernels, fused vs split
# projections) differs by a few ulps per layer; 1e-5 on logits of size ~1 leaves room for
# that and still catches a wrong layout or permutation (errors of order 1).
ATOL, RTOL = 1e-5, 1e-5

# ----------------------------------------------------------------------------- tiny files

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_alphabet():
    """GPT-2's byte -> character table, written out here independently of lmlab."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


ALPHABET = _byte_alphabet()
MERGES = ["Ġ t", "h e", "Ġt he", "1 2"]
TOKENS = SPECIALS + [ALPHABET[b] for b in range(256)] + ["Ġt", "he", "Ġthe", "12"]
TOKEN_TYPES = [3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS))
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"


def tiny_llama(tie=False):
    return shared_tiny_llama(vocab_size=len(TOKENS), rms_norm_eps=1e-5, tie_word_embeddings=tie)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: each head's two halves -> interleaved."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name):
    if hf_name in GGUF_NAMES:
        return GGUF_NAMES[hf_name]
    _, _, i, rest = hf_name.split(".", 3)  # model.layers.{i}.rest
    return f"blk.{i}.{GGUF_NAMES[rest]}"


def add_tokenizer(w, pre="gpt-2"):
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(TOKENS)
    w.add_token_types(TOKEN_TYPES)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)


def write_llama_gguf(path, hf, qtype=Q.F32, pre="gpt-2", override=None, drop=(), tokenizer=True):
    """hf's weights in a GGUF as llama.cpp's converter writes them: q/k permuted, 1-D
    tensors (norms) in F32, matrices in ``qtype``; ``override`` maps names to raw tensors;
    ``tokenizer=False`` leaves the tokenizer out (a model saved alone)."""
    cfg = hf.config
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_name("tiny llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta if hasattr(cfg, "rope_theta") else 500.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    if tokenizer:
        add_tokenizer(w, pre)
    override = override or {}
    for hf_name, t in hf.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name, a = gguf_name(hf_name), t.numpy()
        if name in drop:
            continue
        if "q_proj" in hf_name:
            a = llama_cpp_permute(a, cfg.num_attention_heads)
        elif "k_proj" in hf_name:
            a = llama_cpp_permute(a, cfg.num_key_value_heads)
        if name in override:
            raw, raw_type = override[name]
            w.add_tensor(name, raw, raw_dtype=raw_type)
        elif a.ndim == 1 or qtype == Q.F32:
            w.add_tensor(name, a.astype(np.float32))
        elif qtype == Q.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_with_state(cfg, state):
    """transformers' LlamaForCausalLM holding ``state`` (HF names), tied head included."""
    with no_init_weights():  # every weight is overwritten: skip seconds of random init
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if missing:
        assert cfg["tie_word_embeddings"]
        hf.tie_weights()
    assert torch.equal(
        hf.lm_head.weight, state.get("lm_head.weight", state["model.embed_tokens.weight"])
    )
    return hf


# ----------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("tie", [False, True])
def test_f32_gguf_logits_match_transformers(tmp_path, tie):
    hf = tiny_llama(tie)
    model, _, info = load_gguf(write_llama_gguf(tmp_path / "tiny.gguf", hf))
    assert info["model"]["tie_embeddings"] is tie
    ids = torch.randint(0, len(TOKENS), (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=ATOL, rtol=RTOL)


def test_f32_gguf_to_hf_is_exact(tmp_path):
    """F32 survives the trip bit for bit, q/k un-permuted; the config round-trips."""
    hf = tiny_llama()
    cfg, state = gguf_to_hf(write_llama_gguf(tmp_path / "tiny.gguf", hf))
    expected = hf.state_dict()
    assert set(state) == set(expected)
    for name, t in state.items():
        assert t.dtype == torch.float32
        torch.testing.assert_close(t, expected[name], atol=0, rtol=0, msg=name)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        assert cfg[key] == getattr(hf.config, key)
    assert cfg["num_key_value_heads"] == 2 and cfg["intermediate_size"] == 96
    assert cfg["rope_theta"] == 500.0 and cfg["rms_norm_eps"] == 1e-5
    assert cfg["tie_word_embeddings"] is False


# Largest error of a dequantized weight, as a fraction of the tensor's max |w| (bounds,
# with a little room for the fp16 block scale's own rounding). F16 keeps 11 significant
# bits, BF16 8: 2**-11 and 2**-8 relative. Q8_0: half a step of amax/127. Q4_1, Q5_1:
# half a step of (max - min)/15 or /31 <= 2 amax/15, 2 amax/31. Q4_0, Q5_0 use levels
# -8..7 (-16..15) scaled by the signed extreme, so the opposite extreme is clipped by up to
# one whole step: amax/8 (amax/16).
QUANT_TOLERANCE = {
    Q.F16: 5e-4,
    Q.BF16: 4e-3,
    Q.Q8_0: 4.5e-3,
    Q.Q5_0: 0.065,
    Q.Q5_1: 0.035,
    Q.Q4_0: 0.13,
    Q.Q4_1: 0.07,
}


@pytest.mark.parametrize("qtype", list(QUANT_TOLERANCE), ids=lambda q: q.name)
def test_quantized_gguf_matches_transformers_with_same_weights(tmp_path, qtype):
    hf = tiny_llama()
    path = write_llama_gguf(tmp_path / "tiny.gguf", hf, qtype)
    cfg, state = gguf_to_hf(path)
    original = hf.state_dict()
    for name, t in state.items():
        amax = original[name].abs().max().item()
        tol = QUANT_TOLERANCE[qtype] * amax if original[name].ndim == 2 else 0.0
        torch.testing.assert_close(t, original[name], atol=tol, rtol=0, msg=name)
    reference = hf_with_state(cfg, state)
    model, _, _ = load_gguf(path)
    ids = torch.randint(0, len(TOKENS), (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_k_quant_tensors_dequantize_in_place(tmp_path, qtype):
    """gguf cannot quantize K-quants, so write random blocks and check the reader finds the
    right bytes, with the right shape, between two other tensors."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.randint(0, 256, (3, 2 * size), dtype=np.uint8)  # 3 rows of 2 blocks
    raw.view(np.uint8)[:, :] &= 0x3B  # keep fp16 scales finite: clear their top exponent bits
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), arch="llama")
    w.add_tensor("before", np.arange(5, dtype=np.float32))
    w.add_tensor("k", raw, raw_dtype=qtype)
    w.add_tensor("after", np.arange(7, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    g = read_gguf(tmp_path / "k.gguf")
    assert g.tensors["k"].shape == (3, 2 * block) and g.tensors["k"].type == qtype
    got = g.dequantize("k")
    expected = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    torch.testing.assert_close(g.dequantize("after"), torch.arange(7.0))


def test_unpermute_rotary_inverts_llama_cpp_permutation():
    w = torch.randn(3 * 8, 5)
    permuted = torch.from_numpy(llama_cpp_permute(w.numpy(), 3))
    assert not torch.equal(permuted, w)
    torch.testing.assert_close(unpermute_rotary(permuted, 3), w, atol=0, rtol=0)
    # one head of size 4: GGUF rows [x0, y0, x1, y1] -> HF rows [x0, x1, y0, y1]
    rows = torch.tensor([[0.0], [2.0], [1.0], [3.0]])
    assert unpermute_rotary(rows, 1).flatten().tolist() == [0.0, 1.0, 2.0, 3.0]


def test_load_gguf_info_and_dtype(tmp_path):
    path = write_llama_gguf(tmp_path / "tiny.gguf", tiny_llama())
    model, tok, info = load_gguf(path, dtype=torch.bfloat16)
    assert not model.training
    assert next(model.parameters()).dtype == torch.bfloat16
    assert info["format"] == "gguf" and info["path"] == str(path)
    assert info["architecture"] == "llama" and info["name"] == "tiny llama"
    assert info["chat_template"] == CHAT_TEMPLATE
    assert (info["bos_token"], info["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert info["add_bos_token"] is False
    assert info["model"]["n_kv_heads"] == 2 and info["model"]["vocab_size"] == len(TOKENS)
    assert tok.eos_id == 2 and tok.vocab_size == len(TOKENS)


# ----------------------------------------------------------------------------- tokenizer


def tokenizer_file(tmp_path, pre):
    w = gguf.GGUFWriter(str(tmp_path / f"tok-{pre}.gguf"), arch="llama")
    add_tokenizer(w, pre)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tmp_path / f"tok-{pre}.gguf"


def ids_of(*pieces):
    return [TOKENS.index(p) for p in pieces]


@pytest.mark.parametrize(
    "pre, digits",
    [
        ("gpt-2", ["Ġ", "12"]),
        ("default", ["Ġ", "12"]),
        ("smollm", ["Ġ", "1", "2"]),
        ("llama-bpe", ["Ġ", "12"]),
    ],
)
def test_tokenizer_pre_tokenizers(tmp_path, pre, digits):
    """smollm splits every digit off first (llama.cpp's "\\p{N}" split), so "12" never
    merges; control tokens written in the text are one id each."""
    tok = gguf_tokenizer(tokenizer_file(tmp_path, pre))
    text = "the<|im_end|> the 12"
    assert tok.encode(text) == ids_of("t", "he", "<|im_end|>", "Ġthe", *digits)
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_id == 2


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe"])
def test_tokenizer_matches_transformers_gguf_loader(tmp_path, pre):
    path = tokenizer_file(tmp_path, pre)
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    ours = gguf_tokenizer(path)
    for text in ["the the 12 345", "he\n\n  th<|endoftext|>x", "über 🙂 中文", "\t 1 22 333"]:
        assert ours.encode(text) == reference.encode(text, add_special_tokens=False), text


def test_tokenizer_rejects_unknown_pre_tokenizer_and_model(tmp_path):
    with pytest.raises(CheckpointError, match=r"'qwen2' is not supported; valid: .*smollm"):
        gguf_tokenizer(tokenizer_file(tmp_path, "qwen2"))
    w = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), arch="llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "a"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"'llama' tokenizer; valid: gpt2"):
        gguf_tokenizer(tmp_path / "spm.gguf")


# ----------------------------------------------------------------------------- unsupported


def test_unknown_architecture_is_rejected(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "falcon.gguf"), arch="falcon")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"'falcon' model; valid architectures: llama, gpt2"):
        gguf_to_hf(tmp_path / "falcon.gguf")


def test_gpt2_metadata_that_lies_about_the_tensors_is_refused(tmp_path):
    """RELIABILITY item 30 for the gpt2 architecture: a 1-block file claiming a width of
    2**20 fails on the first shape, before anything is built or dequantized."""
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), arch="gpt2")
    w.add_block_count(1)
    w.add_context_length(4)
    w.add_embedding_length(2**20)
    w.add_head_count(1)
    D, F = 8, 32  # what the tensors hold
    shapes = {"token_embd.weight": (4, D), "position_embd.weight": (4, D)}
    shapes |= {f"output_norm.{p}": (D,) for p in ("weight", "bias")}
    for leaf, w_shape, b_shape in [
        ("attn_norm", (D,), (D,)),
        ("attn_qkv", (3 * D, D), (3 * D,)),
        ("attn_output", (D, D), (D,)),
        ("ffn_norm", (D,), (D,)),
        ("ffn_up", (F, D), (F,)),
        ("ffn_down", (D, F), (D,)),
    ]:
        shapes[f"blk.0.{leaf}.weight"], shapes[f"blk.0.{leaf}.bias"] = w_shape, b_shape
    for name, shape in shapes.items():
        w.add_tensor(name, np.zeros(shape, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"has shape \(4, 8\), the metadata implies"):
        gguf_to_hf(tmp_path / "gpt2.gguf")


def test_tensor_type_gguf_cannot_dequantize_is_named(tmp_path):
    hf = tiny_llama()
    _, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    raw = np.zeros((len(TOKENS), 64 // 32 * size), dtype=np.uint8)
    path = write_llama_gguf(
        tmp_path / "q81.gguf", hf, override={"token_embd.weight": (raw, Q.Q8_1)}
    )
    assert Q.Q8_1 not in DEQUANTIZABLE
    with pytest.raises(CheckpointError, match=r"token_embd\.weight \(Q8_1\); valid types: .*Q4_K"):
        gguf_to_hf(path)


def test_missing_tensor_is_named(tmp_path):
    path = write_llama_gguf(tmp_path / "short.gguf", tiny_llama(), drop={"blk.1.ffn_up.weight"})
    with pytest.raises(CheckpointError, match=r"lacks tensors .*model\.layers\.1\.mlp\.up_proj"):
        gguf_to_hf(path)


def test_metadata_that_contradicts_shapes_is_named(tmp_path):
    hf = tiny_llama()
    hf.config.num_key_value_heads = 4  # written as llama.attention.head_count_kv = 4
    path = write_llama_gguf(tmp_path / "bad-heads.gguf", hf)
    with pytest.raises(CheckpointError, match=r"attn_k\.weight' has shape \(16, 64\).*\(32, 64\)"):
        gguf_to_hf(path)


def test_unknown_tensor_is_named(tmp_path):
    hf = tiny_llama()
    path = tmp_path / "extra.gguf"
    write_llama_gguf(path, hf)
    data = bytearray(path.read_bytes())
    at = data.index(b"output_norm.weight")
    data[at : at + 18] = b"output_xxxx.weight"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"does not use: output_xxxx\.weight"):
        gguf_to_hf(path)


# ----------------------------------------------------------------------------- corrupt files


@pytest.fixture
def small_gguf(tmp_path):
    """A valid file: three keys (one an array) and two F32 tensors, a.weight then b.weight."""
    path = tmp_path / "small.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_name("tiny")
    w.add_array("test.numbers", [1, 2, 3])
    w.add_tensor("a.weight", np.ones((2, 32), dtype=np.float32))
    w.add_tensor("b.weight", np.full(32, 2.0, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_small_file_reads(small_gguf):
    g = read_gguf(small_gguf)
    assert g.version == 3
    assert g.metadata["general.name"] == "tiny" and g.metadata["test.numbers"].tolist() == [1, 2, 3]
    assert g.tensors["a.weight"].shape == (2, 32)
    torch.testing.assert_close(g.dequantize("b.weight"), torch.full((32,), 2.0))


def _tensor_info(data, name):
    """Byte offset of the type and offset fields of tensor ``name`` (n_dims follows name)."""
    at = data.index(name) + len(name)
    (n_dims,) = struct.unpack_from("<I", data, at)
    type_at = at + 4 + 8 * n_dims
    return type_at, type_at + 4


def _set_header(offset, fmt, value):
    def edit(data):
        struct.pack_into(fmt, data, offset, value)

    return edit


def _set_key(key, delta, fmt, value):
    def edit(data):
        struct.pack_into(fmt, data, data.index(key) + len(key) + delta, value)

    return edit


def _set_tensor(name, field, value):
    def edit(data):
        type_at, offset_at = _tensor_info(data, name)
        struct.pack_into(
            "<I" if field == "type" else "<Q",
            data,
            type_at if field == "type" else offset_at,
            value,
        )

    return edit


def _rename_b_to_a(data):
    at = data.index(b"b.weight")
    data[at : at + 8] = b"a.weight"


def _truncate(data):
    del data[-40:]


CORRUPTIONS = {
    "bad magic": (_set_header(0, "<4s", b"GGUG"), "not the GGUF magic"),
    "version 99": (_set_header(4, "<I", 99), "version 99 is not supported; valid: 2, 3"),
    "big-endian": (_set_header(4, ">I", 3), "big-endian GGUF; only little-endian"),
    "tensor_count 2**60": (_set_header(8, "<Q", 2**60), "tensor_count 1152921504606846976"),
    "kv_count 2**60": (_set_header(16, "<Q", 2**60), "kv_count 1152921504606846976"),
    "string length past EOF": (
        _set_key(b"general.name", 4, "<Q", 2**40),
        "value of 'general.name' .*a string of 1099511627776 bytes",
    ),
    "array length past EOF": (
        _set_key(b"test.numbers", 8, "<Q", 2**60),
        "array 'test.numbers' of 1152921504606846976",
    ),
    "bad value type": (_set_key(b"general.name", 0, "<I", 99), "'general.name' has value type 99"),
    "nested array": (_set_key(b"test.numbers", 4, "<I", 9), "'test.numbers' has item type 9"),
    "bad UTF-8": (_set_key(b"general.name", 12, "<B", 0xFF), "'general.name' is not valid UTF-8"),
    "bad tensor type": (_set_tensor(b"b.weight", "type", 250), "'b.weight' has type 250"),
    "offset past data end": (_set_tensor(b"b.weight", "offset", 2**20), "'b.weight'.*truncated"),
    "misaligned offset": (_set_tensor(b"b.weight", "offset", 260), "not a multiple of 32"),
    "overlapping tensors": (_set_tensor(b"b.weight", "offset", 0), "overlap"),
    "duplicate tensor names": (_rename_b_to_a, "tensor name 'a.weight' appears twice"),
    "truncated data": (_truncate, "'b.weight'.*truncated"),
}


def raised_with_peak(call, message):
    """Run ``call``, which must raise a CheckpointError matching ``message``
    -> (the error, the peak bytes Python allocated meanwhile)."""
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=message) as caught:
            call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return caught.value, peak


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_gguf_is_rejected_cleanly(small_gguf, corruption):
    edit, message = CORRUPTIONS[corruption]
    data = bytearray(small_gguf.read_bytes())
    edit(data)
    small_gguf.write_bytes(bytes(data))
    error, peak = raised_with_peak(lambda: read_gguf(small_gguf), message)
    assert str(small_gguf) in str(error)
    assert peak < 1 << 20  # nothing sized by the corrupt count was allocated


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(CheckpointError, match="only 0 bytes"):
        read_gguf(tmp_path / "empty.gguf")
    with pytest.raises(DataNotFoundError, match="does not exist"):
        read_gguf(tmp_path / "missing.gguf")


# ----------------------------------------------------------------------------- SmolLM2

SMOLLM_TEXTS = [
    "Hello, world!",
    "naïve café résumé Ångström",
    "emoji 🙂🚀 and a family 👩‍👩‍👧",
    "中文字符测试 日本語のテキスト 한국어",
    "  two spaces   three\t\ttabs\n\nnewlines \n ",
    "1234567 and 3.14159, 2024-11-22",
    "def f(x):\n    return x**2",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<file_sep>more",
    "Привет, Ωμέγα! ¿Qué tal?",
    "",
]


@pytest.fixture(scope="module")
def smollm():
    return load_gguf(pretrained_path("smollm2"))


@pytest.fixture(scope="module")
def smollm_hf():
    return gguf_to_hf(pretrained_path("smollm2"))


def test_smollm2_tokenizer_matches_transformers_gguf_loader(smollm):
    path = pretrained_path("smollm2")
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    _, tok, _ = smollm
    for text in SMOLLM_TEXTS:
        ids = tok.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == text
    assert tok.encode("<|im_start|>user") == [1, 4093]


def test_smollm2_logits_match_transformers_with_same_weights(smollm, smollm_hf):
    model, tok, info = smollm
    cfg, state = smollm_hf
    assert spec_from_hf_config(cfg) == info["model"]
    reference = hf_with_state(cfg, state)
    ids = torch.tensor([tok.encode("<|im_start|>user\nName three colours.<|im_end|>\n")])
    with torch.no_grad():
        expected = reference(ids).logits
        got = model(ids)
    # 30 layers of float32 with logits of size ~20: a few ulps per layer add up to ~1e-5
    # relative; a wrong permutation or dequantization gives errors of order 1.
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_smollm2_answers_a_chatml_question(smollm):
    model, tok, info = smollm
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    params = SamplingParams(temperature=0, max_new_tokens=12, eos_id=tok.eos_id)
    answer = generate_text(model, tok, prompt, params)
    assert "Paris" in answer
    assert info["eos_token"] == "<|im_end|>" and info["add_bos_token"] is False
    assert "<|im_start|>" in info["chat_template"]


@pytest.mark.slow
def test_smollm2_weights_match_transformers_gguf_loader(smollm_hf):
    """Every dequantized, un-permuted tensor equals transformers' own GGUF loader's."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = str(pretrained_path("smollm2"))
    cfg, state = smollm_hf
    with torch.device("meta"):
        shell = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    theirs = load_gguf_checkpoint(path, return_tensors=True, model_to_load=shell)["tensors"]
    assert set(theirs) == set(state)
    for name, t in state.items():
        torch.testing.assert_close(t, torch.as_tensor(theirs[name]).float(), atol=0, rtol=0)


@pytest.mark.parametrize("chunk", [1 << 12, 5])
@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_fast_block_dequantization_is_bit_identical_to_gguf(kind, chunk, monkeypatch):
    """The torch fast path for the common block types equals the gguf package exactly,
    also when its 48 blocks are done a few at a time (5: the last chunk is short)."""
    from lmlab.checkpoint import gguf as lmlab_gguf
    from lmlab.checkpoint.gguf import _dequantize_blocks

    monkeypatch.setattr(lmlab_gguf, "_CHUNK_BLOCKS", chunk)

    qtype = gguf.GGMLQuantizationType[kind]
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((24, 64)) * rng.uniform(0.01, 3, (24, 1))).astype(np.float32)
    packed = gguf.quants.quantize(weights, qtype)  # (24, bytes per row)
    expected = gguf.quants.dequantize(packed, qtype).astype(np.float32)
    got = _dequantize_blocks(packed.tobytes(), qtype).view(24, 64)
    assert torch.equal(got, torch.from_numpy(expected))


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_q4_blocks_reproduce_gguf_dequantization(qtype):
    """(q - 8) * scale + zero from the raw blocks equals gguf's own dequantization."""
    from lmlab.checkpoint.gguf import q4_blocks

    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((16, 64)) * rng.uniform(0.01, 3, (16, 1))).astype(np.float32)
    packed = gguf.quants.quantize(weights, qtype)
    expected = torch.from_numpy(gguf.quants.dequantize(packed, qtype).astype(np.float32))
    q, scale, zero = q4_blocks(packed.tobytes(), qtype, rows=16)
    got = (q.float() - 8) * scale.repeat_interleave(32, 1) + zero.repeat_interleave(32, 1)
    # Q4_1's zero m + 8d is one float32 addition away from gguf's d q + m: 1 ulp or so.
    torch.testing.assert_close(got, expected, atol=1e-6 * weights.max(), rtol=1e-6)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_4bit_layers_keep_the_file_weights(tmp_path, qtype):
    """keep_quantized: Int4Linear layers whose weights equal the dense model's up to the
    bf16 rounding of scale and zero; the logits agree to bf16 precision."""
    from lmlab.quant import Int4Linear

    path = write_llama_gguf(tmp_path / "tiny.gguf", tiny_llama(), qtype)
    dense, _, _ = load_gguf(path)  # float32, dequantized
    kept, _, info = load_gguf(path, dtype=torch.bfloat16, keep_quantized=True)
    assert len(info["quantized"]) == 7 * dense.config.n_layers
    for name in info["quantized"]:
        layer, reference = kept.get_submodule(name), dense.get_submodule(name).weight
        assert isinstance(layer, Int4Linear)
        # each weight is (q - 8) s + z with s and z rounded to bf16: error <= 2^-8 (8 s + |z|)
        bound = 2**-8 * (8 * layer.scale.float().abs() + layer.zero.float().abs()).max()
        torch.testing.assert_close(layer.dequantize(), reference, atol=bound.item(), rtol=0)
    ids = torch.randint(0, len(TOKENS), (2, 20))
    with torch.no_grad():
        expected, got = dense(ids), kept(ids).float()
    # bf16 activations over 2 layers: a few percent of the logits' scale
    torch.testing.assert_close(got, expected, atol=0.05 * expected.abs().max().item(), rtol=0)
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


def test_a_4bit_load_holds_packed_weights_and_saves_them_exactly(tmp_path):
    """The 4-bit layers come back packed in the kernel's layout (their saved form dropped);
    save_quantized reads that form back, and the reloaded model gives the same logits."""
    from lmlab.checkpoint.quantized import load_quantized, save_quantized

    path = write_llama_gguf(tmp_path / "tiny.gguf", tiny_llama(), Q.Q4_1)
    model, _, info = load_gguf(path, dtype=torch.bfloat16, keep_quantized=True)
    assert all(model.get_submodule(n).qweight is None for n in info["quantized"])
    ids = torch.randint(0, len(TOKENS), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids)
        save_quantized(model, tmp_path / "saved")
        again, _, _ = load_quantized(tmp_path / "saved")
        assert torch.equal(again(ids), expected)
        assert torch.equal(model(ids), expected)


def q8_0_output_file(path, tie):
    """A tiny 4-bit Llama (Q4_1 layers) whose output matrix, 272 x 64, is Q8_0: the token
    embedding when ``tie`` (as SmolLM2's file), else ``output.weight``."""
    hf = shared_tiny_llama(vocab_size=272, tie_word_embeddings=tie)
    name = "token_embd.weight" if tie else "output.weight"
    state = hf.state_dict()
    matrix = (state["model.embed_tokens.weight"] if tie else state["lm_head.weight"]).numpy()
    override = {name: (gguf.quants.quantize(matrix, Q.Q8_0), Q.Q8_0)}
    return write_llama_gguf(path, hf, Q.Q4_1, override=override, tokenizer=False)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_a_4bit_load_keeps_a_q8_0_output_matrix_in_the_files_blocks(tmp_path, tie):
    """keep_quantized: the Q8_0 output matrix becomes a Q8_0Linear whose weights are the
    file's exactly (the float32 load's); tied, the embedding reads its rows from the same
    blocks, equal to the dense bf16 load's embedding, and the model holds the matrix once;
    the logits (float32) agree with the dense bf16 model's to bf16 precision; save then
    load gives the same logits."""
    from lmlab.checkpoint.quantized import load_quantized, save_quantized
    from lmlab.quant import Q8_0Embedding, Q8_0Linear, model_size_bytes

    if not HAS_Q8_0:
        pytest.skip("lmlab's Q8_0 kernel does not run here (no AVX-512 BF16, or no C++ compiler)")
    path = q8_0_output_file(tmp_path / "tiny.gguf", tie)
    exact, _, _ = load_gguf(path)  # float32, dequantized: the file's weights exactly
    dense, _, _ = load_gguf(path, dtype=torch.bfloat16, keep_quantized=False)
    model, _, info = load_gguf(path, dtype=torch.bfloat16, keep_quantized=True)
    assert isinstance(model.lm_head, Q8_0Linear) and "lm_head" in info["quantized"]
    assert torch.equal(model.lm_head.dequantize(), exact.lm_head.weight)
    if tie:
        assert isinstance(model.tok_emb, Q8_0Embedding) and "tok_emb" in info["quantized"]
        assert torch.equal(model.tok_emb.weight, dense.tok_emb.weight)
        # held once, as int8 weights and fp16 scales: the embedding stores nothing
        assert not [k for k in model.state_dict() if k.startswith("tok_emb.")]
        assert model_size_bytes(model.lm_head) == 272 * 64 + 272 * 2 * 2
    else:
        assert type(model.tok_emb) is torch.nn.Embedding
    ids = torch.randint(0, 272, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, expected = model(ids), dense(ids).float()
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=0.05 * expected.abs().max().item(), rtol=0)
        save_quantized(model, tmp_path / "saved")
        again, _, config = load_quantized(tmp_path / "saved")
        assert config["quantization"]["q8_0"]["layers"] == ["lm_head"]
        assert type(again.tok_emb) is type(model.tok_emb)
        assert torch.equal(again(ids), got)


def test_a_q8_0_output_that_does_not_fit_the_kernel_stays_dense(tmp_path):
    """263 outputs (not a multiple of 16): the bf16 head and embedding, tied, as before."""
    hf = tiny_llama(tie=True)
    matrix = hf.state_dict()["model.embed_tokens.weight"].numpy()
    override = {"token_embd.weight": (gguf.quants.quantize(matrix, Q.Q8_0), Q.Q8_0)}
    path = write_llama_gguf(tmp_path / "tiny.gguf", hf, Q.Q4_1, override=override)
    model, _, info = load_gguf(path, dtype=torch.bfloat16, keep_quantized=True)
    assert "lm_head" not in info["quantized"] and type(model.lm_head) is torch.nn.Linear
    assert model.lm_head.weight is model.tok_emb.weight


def test_float32_keeps_dense_weights(tmp_path):
    path = write_llama_gguf(tmp_path / "tiny.gguf", tiny_llama(), Q.Q4_1)
    _, _, info = load_gguf(path)
    assert info["quantized"] == []


def test_smollm2_4bit_is_as_faithful_as_bf16_weights(smollm):
    """On a teacher-forced chat, the 4-bit model (bf16 compute) picks the float32 model's
    top token about as often as the dense bf16 model does. Both stay below 100%: bf16 flips
    near-ties (e.g. "The" 25.33 vs "L" 25.24 answering "What is the capital of France?"),
    which is why the exact-answer tests run in float32."""
    model, tok, _ = smollm
    text = (
        "<|im_start|>user\nWhy do leaves change colour in autumn?<|im_end|>\n<|im_start|>"
        "assistant\nIn autumn the days get shorter and cooler, so trees stop making "
        "chlorophyll, the green pigment. As it breaks down, yellow and orange pigments that "
        "were there all along show through, and some trees make red ones too.<|im_end|>\n"
    )
    ids = torch.tensor([tok.encode(text)])
    path = pretrained_path("smollm2")
    agree = {}
    with torch.no_grad():
        reference = model(ids)[0].argmax(-1)
        for kept in (False, True):
            m, _, info = load_gguf(path, dtype=torch.bfloat16, keep_quantized=kept)
            # 30 blocks x 7 layers in 4 bits; the Q8_0 head and the embedding reading it
            assert len(info["quantized"]) == (210 + 2 * HAS_Q8_0 if kept else 0)
            agree[kept] = (m(ids)[0].argmax(-1) == reference).float().mean().item()
    assert agree[True] >= 0.9 and agree[True] >= agree[False] - 0.05, agree


@pytest.mark.slow
def test_smollm2_4bit_decodes_the_plain_paths_tokens():
    """The default 4-bit SmolLM2 with its decoding shortcuts (fused q/k/v and gate/up) gives
    the greedy tokens of the same model with them off,
    on a chat prompt, 64 new tokens."""
    model, tok, info = load_gguf(pretrained_path("smollm2"), dtype=torch.bfloat16)
    assert len(info["quantized"]) == 210 + 2 * HAS_Q8_0
    prompt = (
        "<|im_start|>user\nWrite a short story about a robot.<|im_end|>\n<|im_start|>assistant\n"
    )
    params = SamplingParams(max_new_tokens=64, temperature=0.0)
    out = {}
    for fast in (False, True):
        model.use_fast_decoding(fast)
        out[fast] = generate_text(model, tok, prompt, params)
    assert model.blocks[0].attn._fused
    assert out[True] == out[False] and len(out[True]) > 100


# ----------------------------------------------------------------------------- item 29


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_a_q8_0_file_keeps_its_layers_in_8_bits(tmp_path, tie):
    """keep_quantized on a Q8_0 file: every block's linear layer is a Q8_0Linear holding
    the file's weights exactly (the float32 load's, q and k unpermuted alike), computing
    in the activations' dtype; the output matrix is one too (float32 logits), tied to the
    embedding when the file ties them. The logits agree with the exact float32 model to
    bf16 precision; save then load gives the same logits and the same layers, and
    dequantize_model gives the dense model back."""
    from lmlab.checkpoint.quantized import load_quantized, save_quantized
    from lmlab.quant import Q8_0Embedding, Q8_0Linear, dequantize_model, model_size_bytes

    if not HAS_Q8_0:
        pytest.skip("lmlab's Q8_0 kernel does not run here (no AVX-512 BF16, or no C++ compiler)")
    hf = shared_tiny_llama(vocab_size=272, tie_word_embeddings=tie)
    path = write_llama_gguf(tmp_path / "tiny.gguf", hf, Q.Q8_0, tokenizer=False)
    exact, _, _ = load_gguf(path)  # float32: the file's weights exactly
    model, _, info = load_gguf(path, dtype=torch.bfloat16, keep_quantized=True)
    layers = [
        n for n, m in exact.named_modules() if n.startswith("blocks.") and type(m) is nn.Linear
    ]
    assert len(layers) == 7 * exact.config.n_layers
    assert set(info["quantized"]) == {*layers, "lm_head", *(["tok_emb"] if tie else [])}
    for name in [*layers, "lm_head"]:
        layer = model.get_submodule(name)
        assert type(layer) is Q8_0Linear and layer.float_output == (name == "lm_head")
        assert torch.equal(layer.dequantize(), exact.get_submodule(name).weight), name
    assert type(model.tok_emb) is (Q8_0Embedding if tie else nn.Embedding)
    size = sum(model_size_bytes(model.get_submodule(n)) for n in [*layers, "lm_head"])
    dense_size = sum(exact.get_submodule(n).weight.numel() * 2 for n in [*layers, "lm_head"])
    assert size == dense_size // 2 * 34 // 32  # 34 bytes per 32 weights, bf16's 64
    ids = torch.randint(0, 272, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, expected = model(ids), exact(ids)
        assert got.dtype == torch.float32
        assert model.blocks[0].attn.q_proj(torch.ones(1, 64, dtype=torch.bfloat16)).dtype == (
            torch.bfloat16
        )
        torch.testing.assert_close(got, expected, atol=0.05 * expected.abs().max().item(), rtol=0)
        assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9
        # each block's q, k, v and gate, up lie side by side: one call each, same numbers
        fused = model.blocks[1].attn._fused[("q_proj", "k_proj", "v_proj")][1]
        assert type(fused).__name__ == "Q8_0Fused"
        assert fused.qweight.data_ptr() == model.blocks[1].attn.q_proj.qweight.data_ptr()
        assert type(model.blocks[1].mlp._fused[("gate_proj", "up_proj")][1]) is type(fused)
        params = SamplingParams(max_new_tokens=8, temperature=0.0)
        fast = generate(model, ids.tolist(), params).ids
        model.use_fast_decoding(False)
        assert torch.equal(model(ids), got)
        assert generate(model, ids.tolist(), params).ids == fast
        model.use_fast_decoding(True)
        save_quantized(model, tmp_path / "saved")
        again, _, config = load_quantized(tmp_path / "saved")
        assert config["quantization"]["method"] == "q8_0"
        assert config["quantization"]["q8_0"]["float_outputs"] == ["lm_head"]
        assert [type(m) for m in again.modules()] == [type(m) for m in model.modules()]
        assert all(
            a.float_output == b.float_output
            for a, b in zip(again.modules(), model.modules())
            if type(a) is Q8_0Linear
        )
        assert torch.equal(again(ids), got)
        attn = again.blocks[0].attn
        assert Q8_0Linear.fuse([attn.q_proj, attn.k_proj, attn.v_proj]) is not None
        dense = dequantize_model(again)
        assert not [m for m in dense.modules() if type(m) is Q8_0Linear]
        for name in layers:
            assert torch.equal(dense.get_submodule(name).weight, exact.get_submodule(name).weight)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda q: q.pop("q8_0"), "no valid 'quantization' entry"),
        (lambda q: q["q8_0"].update(float_outputs=["blocks.9.mlp.up_proj"]), "float_outputs"),
        (lambda q: q["q8_0"].update(layers="lm_head"), "'q8_0' entry must be"),
        (
            lambda q: q["q8_0"]["embeddings"].update(tok_emb={"head": "nope", "dtype": "bf16"}),
            "must read one of the Q8_0 layers",
        ),
    ],
    ids=["no-entry", "unknown-float-output", "layers-not-a-list", "bad-embedding"],
)
def test_a_saved_q8_0_model_with_a_bad_entry_is_refused_in_one_line(tmp_path, edit, message):
    """A checkpoint of a Q8_0 file's model whose config.json 'quantization' entry was
    edited: one CheckpointError naming config.json and what is wrong."""
    import json

    from lmlab.checkpoint.quantized import load_quantized, save_quantized

    if not HAS_Q8_0:
        pytest.skip("lmlab's Q8_0 kernel does not run here (no AVX-512 BF16, or no C++ compiler)")
    hf = shared_tiny_llama(vocab_size=272, tie_word_embeddings=True)
    path = write_llama_gguf(tmp_path / "tiny.gguf", hf, Q.Q8_0, tokenizer=False)
    model, _, _ = load_gguf(path, dtype=torch.bfloat16, keep_quantized=True)
    saved = save_quantized(model, tmp_path / "saved")
    config_file = saved / "config.json"
    config = json.loads(config_file.read_text())
    edit(config["quantization"])
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message) as caught:
        load_quantized(saved)
    assert "config.json" in str(caught.value) and "\n" not in str(caught.value)


def test_non_finite_weights_are_refused_naming_the_tensors(tmp_path):
    hf = tiny_llama()
    with torch.no_grad():
        hf.model.layers[0].mlp.down_proj.weight[1, 1] = float("nan")
    path = write_llama_gguf(tmp_path / "nan.gguf", hf)
    with pytest.raises(CheckpointError, match="non-finite weights") as caught:
        load_gguf(path)
    assert str(path) in str(caught.value) and "blk.0.ffn_down.weight" in str(caught.value)


@pytest.mark.parametrize("keep", [False, True], ids=["dense", "kept-in-8-bits"])
def test_non_finite_quantized_scale_is_refused(tmp_path, keep):
    """An inf scale in a Q8_0 block is refused naming the tensor, by the dense load and
    by keep_quantized, which reads the blocks themselves (keep_8bit)."""
    hf = tiny_llama()
    raw = gguf.quants.quantize(hf.model.layers[1].mlp.up_proj.weight.detach().numpy(), Q.Q8_0)
    raw[0, :2] = np.frombuffer(np.float16(np.inf).tobytes(), dtype=np.uint8)  # a block's scale
    path = write_llama_gguf(
        tmp_path / "inf-scale.gguf", hf, override={"blk.1.ffn_up.weight": (raw, Q.Q8_0)}
    )
    with pytest.raises(CheckpointError, match=r"non-finite weights .*blk\.1\.ffn_up\.weight"):
        load_gguf(path, dtype=torch.bfloat16 if keep else None, keep_quantized=keep)


# ----------------------------------------------------------------------------- item 30


def _lying_metadata(tmp_path, **config):
    """A tiny 2-layer Llama's tensors under metadata (block_count, feed_forward_length,
    head counts, ...) that ``config`` overrides: a small file describing another model."""
    hf = tiny_llama()
    for key, value in config.items():
        setattr(hf.config, key, value)
    return write_llama_gguf(tmp_path / "lying.gguf", hf)


def _fail_if_called(*args, **kwargs):
    raise AssertionError("the model was built or a tensor dequantized before the check")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"num_hidden_layers": 50_000_000}, r"block_count is 50000000, but .* 2 block\(s\)"),
        (
            {"intermediate_size": 2**30},
            r"'blk\.0\.ffn_gate\.weight' has shape \(96, 64\), the metadata implies "
            r"\(1073741824, 64\) \(llama\.feed_forward_length 1073741824",
        ),
        ({"hidden_size": 196_608}, "token_embd.weight has width 64, but embedding_length"),
        (
            {"num_attention_heads": 4},  # head size 16, not 8: k and v should be (32, 64)
            r"'blk\.0\.attn_k\.weight' has shape \(16, 64\), .*head_count_kv 2, head size 16",
        ),
    ],
    ids=["block_count", "feed_forward_length", "embedding_length", "head_count"],
)
def test_metadata_describing_another_model_is_refused_before_allocating(
    tmp_path, monkeypatch, config, message
):
    path = _lying_metadata(tmp_path, **config)
    assert path.stat().st_size < 1 << 20
    monkeypatch.setattr("lmlab.checkpoint.gguf.build_model", _fail_if_called)
    monkeypatch.setattr("lmlab.checkpoint.gguf.GGUFFile.dequantize", _fail_if_called)
    error, peak = raised_with_peak(lambda: load_gguf(path), message)
    assert str(path) in str(error) and "\n" not in str(error)
    assert peak < 4 << 20  # nothing sized by the lying metadata was allocated


def test_a_token_list_longer_than_the_embedding_is_refused(tmp_path):
    hf = shared_tiny_llama(vocab_size=len(TOKENS) - 3, rms_norm_eps=1e-5)
    path = write_llama_gguf(tmp_path / "short-embedding.gguf", hf)
    with pytest.raises(CheckpointError, match=f"has {len(TOKENS)} token ids .* {len(TOKENS) - 3}"):
        load_gguf(path)


def test_a_file_without_tokenizer_loads_for_token_ids(tmp_path):
    hf = tiny_llama()
    model, tokenizer, info = load_gguf(
        write_llama_gguf(tmp_path / "bare.gguf", hf, tokenizer=False)
    )
    assert tokenizer is None and info["eos_token"] is None
    ids = torch.randint(0, len(TOKENS), (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=ATOL, rtol=RTOL)


def test_loading_a_gguf_shows_a_bar_over_its_tensors(tmp_path, monkeypatch):
    """Dequantizing is most of a load: one bar step per tensor, named after the file
    (tqdm's disable=None: shown on a terminal only)."""
    import lmlab.checkpoint.gguf as gguf_module

    bars = []

    def recording_tqdm(iterable, **kwargs):
        bars.append((list(iterable), kwargs))
        return iter(bars[-1][0])

    monkeypatch.setattr(gguf_module, "tqdm", recording_tqdm)
    path = write_llama_gguf(tmp_path / "tiny.gguf", tiny_llama())
    load_gguf(path)
    ((steps, kwargs),) = bars
    assert len(steps) == len(gguf.GGUFReader(str(path)).tensors)
    assert kwargs["desc"] == "loading tiny.gguf" and kwargs["disable"] is None


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1, Q.F16], ids=lambda q: q.name)
def test_dequantizing_to_bf16_rounds_once_from_float32(tmp_path, qtype):
    """Read as bf16 (what a bf16 model keeps), each weight is its float32 value rounded
    once: the same bits as dequantizing to float32 and casting."""
    path = write_llama_gguf(tmp_path / "tiny.gguf", tiny_llama(), qtype)
    g = read_gguf(path)
    for name in ("token_embd.weight", "blk.0.ffn_up.weight"):
        expected = g.dequantize(name).to(torch.bfloat16)
        assert torch.equal(g.dequantize(name, torch.bfloat16), expected)


_LOAD_PEAK = """
import json
import lmlab

base = reset_peak()  # tests/builders.py: library pages in, peak counter restarted
lm = lmlab.load("smollm2", dtype="bfloat16", keep_quantized=True, device="cpu")
peak = status("VmHWM") - base
lm.generate("Hello", max_new_tokens=8)  # the first steps used to pack the weights again
decode_peak = status("VmHWM") - base
packed = lm.model.blocks[0].attn.q_proj.qweight is None  # the kernel holds the weights
seen, weights = set(), 0
kernels = {id(m._kernel): m._kernel.packed for m in lm.model.modules() if hasattr(m, "_kernel")}
for t in [*lm.model.parameters(), *lm.model.buffers(), *kernels.values()]:
    if (t.data_ptr(), t.shape) not in seen:  # scale and zero: views of the kernel's copy
        seen.add((t.data_ptr(), t.shape))
        weights += t.numel() * t.element_size()
print(json.dumps({"weights": weights, "peak": peak, "decode_peak": decode_peak, "packed": packed}))
"""


@pytest.mark.slow
def test_loading_smollm2_in_4_bits_never_holds_a_dense_copy():
    """The 4-bit load reads tensor by tensor and packs the kernel's layout as it goes: what
    it adds to the process's peak memory, load and first decoding steps together, stays
    within 1.6x of the weights it keeps (a second copy would be 2x), and the weights are
    held once (the saved 4-bit form is dropped for the packed one). The process finds the
    C++ compiler, as a user's does, so lmlab's kernels run where the CPU has AVX-512 BF16:
    the weights are then 92 MiB (4-bit layers, the Q8_0 output matrix that the embedding
    reads), else 117 MiB (a bf16 embedding and head instead); the rest, about 40 MiB, is
    the tokenizer (8 MiB) and transients. A fresh process, torch's library pages mapped in
    and the peak reset after the imports (``reset_peak``, tests/builders.py), as
    tests/interp/test_load_memory.py does. Measured on the project's 2-core machine: 1.33x
    (122-123 MiB), load and decoding alike. Counted with the library pages that the load
    and decoding first touched, it was 1.46x here (134 MiB) and 1.61x on CI's machine (148
    MiB): those pages are the CPU's kernels in torch's code, not memory the load holds.
    Before: 1.70x here and 1.78x on CI (163 MiB) while the Q8_0 matrix was built first and
    then copied onto huge pages, the copy holding it twice for a moment; 1.40x (164 MiB)
    with a bf16 output matrix; 3.77x (442 MiB) once decoding had packed a second copy
    beside the first, in holes of the C heap; about 10x through the dense model."""
    result = load_peak_in_subprocess(_LOAD_PEAK, compilers=True)
    assert result["packed"]
    assert 80 * 2**20 < result["weights"] < 160 * 2**20
    for key in ("peak", "decode_peak"):
        ratio = result[key] / result["weights"]
        assert ratio <= 1.6, f"{key} {result[key] / 2**20:.0f} MiB = {ratio:.2f}x the weights"
