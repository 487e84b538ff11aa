"""GGUF export: files read back with the gguf package's reader (names, shapes, types,
metadata) and with lmlab's own loader (logits), and run in llama.cpp when
llama-cpp-python is installed."""

import copy
import importlib.util

import gguf
import pytest
import torch

import lmlab
from lmlab.api import quantize
from lmlab.checkpoint.gguf import unpermute_rotary
from lmlab.checkpoint.gguf_export import GGUF_TYPES, permute_rotary, save_gguf
from lmlab.cli.main import main
from lmlab.data.chat import ChatTemplate
from lmlab.data.tokenizers import BPETokenizer, ByteTokenizer, CharTokenizer
from lmlab.errors import CheckpointError, ConfigError
from lmlab.models import build_model, get_preset, model_spec
from lmlab.quant import quantize_model

Q = gguf.GGMLQuantizationType
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEXT = "<|im_start|>user\nto be or not to be?<|im_end|>\n<|im_start|>assistant\nthat is it.\n"


@pytest.fixture(scope="module")
def tokenizer():
    return BPETokenizer.train(TEXT * 20, 300, special_tokens=["<|im_start|>", "<|im_end|>"])


def tiny(vocab_size=300, seed=0, **overrides):
    """A 2-layer Llama with grouped-query attention (4 heads, 2 kv heads of size 16)."""
    torch.manual_seed(seed)
    small = dict(vocab_size=vocab_size, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128)
    spec = {**get_preset("llama-small"), **small, **overrides}
    return build_model(spec).eval()


def logits(model, vocab_size=300):
    ids = torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids)


def rounded_like_gguf(model, qtype):
    """``model`` with every matrix rounded as the file stores it, by the gguf package's
    reference code (quantize, then dequantize); vectors (norms) stay float32, and a
    matrix whose rows are not whole blocks of 32 is stored as F16."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if p.ndim != 2 or qtype == Q.F32 or name == "pos_emb.weight":  # GPT-2's: F32
                continue
            if qtype == Q.F16 or p.shape[1] % 32:
                p.copy_(p.half().float())
            else:
                blocks = gguf.quants.quantize(p.numpy(), qtype)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(blocks, qtype)))
    return rounded


def test_permute_rotary_is_the_inverse_of_the_readers_unpermute():
    w = torch.arange(24.0).view(8, 3)  # 2 heads of size 4, 3 inputs
    assert torch.equal(unpermute_rotary(permute_rotary(w, 2), 2), w)
    # one head [x0, x1, y0, y1] (HF halves) -> [x0, y0, x1, y1] (llama.cpp pairs)
    assert permute_rotary(w, 2)[:4, 0].tolist() == [0.0, 6.0, 3.0, 9.0]


@pytest.mark.parametrize("kind", list(GGUF_TYPES))
def test_file_reads_back_with_gguf_reader_and_lmlab_with_the_source_logits(
    kind, tokenizer, tmp_path
):
    model = tiny(tie_embeddings=kind == "q8_0")  # one tied case: no output.weight
    template = ChatTemplate(CHATML, eos_token="<|im_end|>")
    path, notes = save_gguf(model, tmp_path / "m.gguf", tokenizer, template, gguf_type=kind)
    assert notes == []
    qtype = GGUF_TYPES[kind]

    # 1. the gguf package's own reader: names, shapes (ne: fastest first), types, metadata
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    layer = [
        "attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
        "ffn_gate", "ffn_up", "ffn_down",
    ]  # fmt: skip
    expected = {"token_embd.weight", "output_norm.weight"}
    expected |= {f"blk.{i}.{n}.weight" for i in range(2) for n in layer}
    expected |= set() if kind == "q8_0" else {"output.weight"}
    assert set(tensors) == expected
    c = model.config
    assert list(tensors["blk.0.attn_k.weight"].shape) == [c.d_model, c.kv_heads * c.head_size]
    assert list(tensors["token_embd.weight"].shape) == [c.d_model, 300]
    for name, t in tensors.items():
        assert t.tensor_type == (Q.F32 if name.endswith("norm.weight") else qtype), name

    def meta(key):
        return reader.fields[key].contents()

    assert meta("general.architecture") == "llama"
    assert meta("llama.block_count") == 2 and meta("llama.embedding_length") == c.d_model
    assert meta("llama.attention.head_count_kv") == c.kv_heads
    assert meta("tokenizer.ggml.model") == "gpt2" and meta("tokenizer.ggml.pre") == "gpt-2"
    tokens = meta("tokenizer.ggml.tokens")
    assert len(tokens) == 300 and tokens[tokenizer.eos_id] == "<|endoftext|>"
    im_end = tokens.index("<|im_end|>")
    assert meta("tokenizer.ggml.token_type")[im_end] == gguf.TokenType.CONTROL
    assert meta("tokenizer.ggml.eos_token_id") == tokenizer.eos_id
    assert meta("tokenizer.ggml.eot_token_id") == im_end
    assert meta("tokenizer.ggml.add_bos_token") is False
    assert meta("tokenizer.chat_template") == CHATML
    n = tokenizer.vocab_size  # this small text ran out of pairs to merge before 300
    assert len(meta("tokenizer.ggml.merges")) == n - 256 - 3 and n < 300
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, 300)]  # rows the tokenizer lacks
    assert set(meta("tokenizer.ggml.token_type")[n:]) == {gguf.TokenType.UNUSED}

    # 2. lmlab's loader: exactly the source model with its matrices rounded as stored
    # (float32 maths in another order: 1e-5); and near the source itself, within what
    # the storage type loses on these random weights (relative to the logits' norm:
    # f16 ~5e-4 measured, q8_0 ~1.5e-2, q4_0 ~0.2; bounds about twice that).
    lm = lmlab.load(path, device="cpu")
    got = logits(lm.model)
    torch.testing.assert_close(got, logits(rounded_like_gguf(model, qtype)), atol=1e-5, rtol=1e-5)
    source = logits(model)
    bound = {"f32": 1e-6, "f16": 2e-3, "q8_0": 4e-2, "q4_0": 0.45}[kind]
    assert (got - source).norm() / source.norm() < bound
    for text in (TEXT, "to be, or not?", "not in training: ünïcode 🙂\n\t"):
        assert lm.tokenizer.encode(text) == tokenizer.encode(text)
    assert lm.chat_template.source == CHATML and lm.tokenizer.eos_id == tokenizer.eos_id


@pytest.mark.parametrize("tok", [CharTokenizer("ab"), ByteTokenizer()], ids=["char", "byte"])
def test_char_or_byte_tokenizer_and_rows_off_the_block_size_are_noted(tok, tmp_path):
    """llama.cpp has no character tokenizer, and its BPE needs merges (a byte vocabulary
    has none): the model goes alone and the notes say so. A matrix whose rows are not
    whole blocks of 32 (d_ff 48: ffn_down) is kept in F16."""
    model = tiny(vocab_size=256, d_ff=48)
    path, notes = save_gguf(model, tmp_path / "c.gguf", tok, gguf_type="q8_0")
    assert any(f"{tok.kind} tokenizer has no llama.cpp form" in n for n in notes)
    assert any("kept in F16" in n and "ffn_down" in n for n in notes)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.ffn_down.weight"] == Q.F16 and types["blk.0.ffn_up.weight"] == Q.Q8_0
    lm = lmlab.load(path, device="cpu")
    assert lm.tokenizer is None
    rounded = rounded_like_gguf(model, Q.Q8_0)
    torch.testing.assert_close(logits(lm.model, 256), logits(rounded, 256), atol=1e-5, rtol=1e-5)


def tiny_gpt2(vocab_size=300, **overrides):
    """A 2-layer GPT-2 (learned positions, LayerNorm, biases, tanh GELU)."""
    torch.manual_seed(0)
    small = dict(vocab_size=vocab_size, n_layers=2, d_model=64, n_heads=4, d_ff=128)
    return build_model({**get_preset("gpt-char-tiny"), **small, **overrides}).eval()


@pytest.mark.parametrize("kind", ["f32", "q8_0", "q4_0"])
def test_gpt2_file_reads_back_with_gguf_reader_and_lmlab(kind, tokenizer, tmp_path):
    model = tiny_gpt2()
    path, notes = save_gguf(model, tmp_path / "g.gguf", tokenizer, gguf_type=kind)
    assert notes == []
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    layer = ["attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down"]
    expected = {"token_embd.weight", "position_embd.weight", "output_norm.weight"}
    expected |= {"output_norm.bias"}  # tied: no output.weight
    expected |= {f"blk.{i}.{n}.{p}" for i in range(2) for n in layer for p in ("weight", "bias")}
    assert set(tensors) == expected
    assert list(tensors["blk.0.attn_qkv.weight"].shape) == [64, 3 * 64]  # ne: [in, out]
    assert list(tensors["blk.1.ffn_down.weight"].shape) == [128, 64]
    qtype = GGUF_TYPES[kind]
    for name, t in tensors.items():
        stored = Q.F32 if len(t.shape) == 1 or name == "position_embd.weight" else qtype
        assert t.tensor_type == stored, name
    assert reader.fields["general.architecture"].contents() == "gpt2"
    assert reader.fields["gpt2.feed_forward_length"].contents() == 128
    assert reader.fields["gpt2.context_length"].contents() == model.config.max_seq_len
    lm = lmlab.load(path, device="cpu")
    source_spec = model_spec(model)
    assert {k: source_spec[k] for k in lm.config["model"]} == lm.config["model"]
    torch.testing.assert_close(
        logits(lm.model), logits(rounded_like_gguf(model, qtype)), atol=1e-5, rtol=1e-5
    )
    assert lm.tokenizer.encode(TEXT) == tokenizer.encode(TEXT)


@pytest.mark.parametrize("layout", ["llama", "gpt2"])
def test_f32_file_matches_transformers_gguf_loader(layout, tokenizer, tmp_path):
    """An independent reader: transformers' own GGUF loader (its un-permutation of q and k,
    its GPT-2 mapping) builds a model with the source's logits, and its GGUF tokenizer
    encodes as lmlab. float32 both: 1e-5. (transformers' GPT-2 GGUF mapping reads neither
    feed_forward_length nor context_length: this model has its defaults, 4 D and 1024.)"""
    import transformers

    if layout == "llama":
        model = tiny()
    else:
        model = tiny_gpt2(d_ff=256, max_seq_len=1024)
    path, _ = save_gguf(model, tmp_path / "m.gguf", tokenizer, gguf_type="f32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-5, rtol=1e-5)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert hf_tok.encode(TEXT, add_special_tokens=False) == tokenizer.encode(TEXT)


def test_models_llama_cpp_has_no_architecture_for_are_refused(tmp_path):
    exact_gelu = tiny_gpt2(mlp="gelu")  # llama.cpp's GPT-2 has the tanh GELU only
    with pytest.raises(CheckpointError, match="Llama layout or GPT-2's .*--format hf"):
        save_gguf(exact_gelu, tmp_path / "g.gguf")
    from lmlab.finetune.lora import LoRAConfig, apply_lora

    with pytest.raises(CheckpointError, match="has no place for .*lora_A.*merge a LoRA"):
        save_gguf(apply_lora(tiny(), LoRAConfig()), tmp_path / "l.gguf")
    with pytest.raises(ConfigError, match="unknown GGUF type 'q4_1'.*valid: f32, f16, q8_0, q4_0"):
        save_gguf(tiny(), tmp_path / "x.gguf", gguf_type="q4_1")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_export_cli_writes_a_gguf_file(tokenizer, tmp_path, capsys):
    from lmlab.checkpoint.io import save_checkpoint

    model = tiny()
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    out = tmp_path / "m.gguf"
    argv = ["export", "--model", str(tmp_path / "ckpt"), "--out", str(out), "--format", "gguf"]
    assert main(argv + ["--gguf_type", "q8_0"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert {t.tensor_type for t in gguf.GGUFReader(str(out)).tensors} == {Q.F32, Q.Q8_0}
    assert main(argv + ["--gguf_type", "q5_k"]) == 2  # a user mistake: one line, status 2
    assert "q5_k" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_exports_to_q8_0_and_comes_back_answering(tmp_path):
    """The real model: its tokenizer (pre-tokenizer "smollm"), chat template and stop
    tokens survive, and greedy decoding of the Q8_0 file still answers."""
    source = lmlab.load("smollm2", device="cpu")
    path, notes = save_gguf(
        source.model, tmp_path / "smollm2.q8_0.gguf", source.tokenizer, source.chat_template, "q8_0"
    )
    assert notes == []
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    lm = lmlab.load(path, device="cpu")
    texts = ["Hello, world!", "1234567 and 3.14", "<|im_start|>user\nHi<|im_end|>\n", "中文 🙂"]
    for text in texts:
        assert lm.tokenizer.encode(text) == source.tokenizer.encode(text)
    assert lm.chat_template.source == source.chat_template.source
    assert lm.config["eos_token"] == "<|im_end|>" and lm.config["add_bos_token"] is False
    prompt = lm.chat_template.render(
        [{"role": "user", "content": "What is the capital of France?"}]
    )
    assert "Paris" in lm.generate(prompt, temperature=0, max_new_tokens=12)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed (pip install llama-cpp-python compiles "
    "llama.cpp from source, about 5 minutes)",
)
@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_llama_cpp_runs_the_file_with_lmlabs_greedy_tokens(kind, tokenizer, tmp_path):
    """llama.cpp's own forward pass and greedy sampler on the exported file give the tokens
    lmlab's greedy decoding gives on the same file (f32 and q8_0: near-ties are rare on a
    random model; both decode from the same stored weights)."""
    import llama_cpp

    from lmlab.generate.params import SamplingParams
    from lmlab.generate.search import generate_ids

    path, _ = save_gguf(tiny(), tmp_path / "m.gguf", tokenizer, gguf_type=kind)
    lm = lmlab.load(path, device="cpu")
    prompt = tokenizer.encode("to be or not")
    params = SamplingParams(temperature=0, max_new_tokens=12)
    ours = generate_ids(lm.model, [prompt], params)[0]
    llm = llama_cpp.Llama(str(path), n_ctx=64, verbose=False)
    assert llm.tokenize(b"to be or not", add_bos=False, special=True) == prompt
    theirs = []
    for token in llm.generate(prompt, temp=0.0, top_k=1):
        theirs.append(token)
        if len(theirs) == len(ours):
            break
    assert theirs == ours


def test_lmlab_quantize_takes_a_gguf_file(tokenizer, tmp_path):
    """A .gguf file is an input of ``lmlab quantize`` like any other: the folder it writes
    loads with the logits of the GGUF model quantized in memory, exactly."""
    file = save_gguf(tiny(), tmp_path / "tiny.gguf", tokenizer, gguf_type="f32")[0]
    path, sizes = quantize(str(file), "int8", tmp_path / "q")
    assert sizes["after"] < sizes["before"]
    want = quantize_model(lmlab.load(file, dtype="float32").model, "int8").eval()
    ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(lmlab.load(path).model(ids), want(ids), rtol=0, atol=0)
