"""Hugging Face model folders in and out: parity with transformers, shards, export round
trip, and the loading-safety items 14 and 15 of shared/RELIABILITY.md."""

import json
import os
import pickle
import stat
import struct

import pytest
import torch
import transformers
from safetensors.torch import save_file

import lmlab
import lmlab.checkpoint.hf
from hf_models import built_on_meta_only, tiny_llama
from lmlab.api import export_hf
from lmlab.checkpoint.hf import (
    end_of_turn_id,
    generation_config,
    is_hf_directory,
    load_hf,
    save_hf,
)
from lmlab.data.chat import ChatTemplate
from lmlab.data.tokenizers import BPETokenizer, train_tokenizer
from lmlab.errors import CheckpointError
from lmlab.generate.params import SamplingParams
from lmlab.generate.search import generate_ids
from lmlab.models import build_model, get_preset

# float32 on CPU, the same maths in a different order: a few ulps per layer. 1e-5 on
# logits of size ~1 still catches any wrong layout (errors of order 1).
ATOL, RTOL = 1e-5, 1e-5


def tiny(kind: str):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=97, n_embd=48, n_layer=2, n_head=4, n_positions=64)
        return transformers.GPT2LMHeadModel(cfg).eval()
    extra = {"mistral": {"sliding_window": 32}, "qwen2": {"tie_word_embeddings": True}}
    return tiny_llama(kind, **extra.get(kind, {}))


def logits_agree(hf, ours, length=30):
    ids = torch.randint(0, 97, (2, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "mistral", "qwen2"])
def test_hf_folder_logits_match_transformers(kind, tmp_path):
    hf = tiny(kind)
    hf.save_pretrained(tmp_path)
    assert is_hf_directory(tmp_path)
    model, tokenizer, info = load_hf(tmp_path)
    assert tokenizer is None and info["hf_config"]["model_type"] == kind
    logits_agree(hf, model)


def test_mistral_context_is_kept_within_its_sliding_window(tmp_path):
    tiny("mistral").save_pretrained(tmp_path)
    model, _, _ = load_hf(tmp_path)
    assert model.config.max_seq_len == 32  # inside the window, full attention is the same


def test_sharded_safetensors_load(tmp_path):
    hf = tiny("llama")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    model, _, _ = load_hf(tmp_path)
    logits_agree(hf, model)


def test_pickled_weights_load_through_weights_only(tmp_path):
    hf = tiny("gpt2")
    hf.config.save_pretrained(tmp_path)  # what older transformers wrote: torch.save
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    model, _, _ = load_hf(tmp_path)
    logits_agree(hf, model)


@pytest.mark.parametrize("preset", ["gpt-char-tiny", "llama-small"])
def test_export_round_trip_through_transformers(preset, tmp_path):
    """save_hf -> transformers' from_pretrained gives the same logits; the tokenizer too."""
    torch.manual_seed(0)
    ours = build_model({**get_preset(preset), "vocab_size": 300, "n_layers": 2}).eval()
    tok = BPETokenizer.train("to be or not to be, that is the question " * 20, 300)
    save_hf(ours, tmp_path, tok)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 300, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=ATOL, rtol=RTOL)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "to be, or not to be"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    back, tok_back, _ = load_hf(tmp_path)
    assert tok_back.encode(text) == tok.encode(text)
    for (name, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name


def test_qwen2_layout_exports_with_its_biases(tmp_path):
    hf = tiny("qwen2")
    hf.save_pretrained(tmp_path / "in")
    model, _, _ = load_hf(tmp_path / "in")
    save_hf(model, tmp_path / "out")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(again).__name__ == "Qwen2ForCausalLM"
    logits_agree(again, model)


# ChatML as SmolLM2 writes it, without the default system prompt.
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chat_bpe():
    text = "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\nhi, how are you?\n"
    return BPETokenizer.train(text * 20, 300, special_tokens=["<|im_start|>", "<|im_end|>"])


def test_export_writes_generation_config_and_chat_template_that_transformers_reads(tmp_path):
    """eos is <|endoftext|>, but a chat reply ends with <|im_end|>: both end generation."""
    tok = chat_bpe()
    template = ChatTemplate(CHATML, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    model = build_model({**get_preset("llama-small"), "vocab_size": 300, "n_layers": 1}).eval()
    save_hf(model, tmp_path, tok, template)
    eos, im_end = tok.eos_id, tok.tokenizer.token_to_id("<|im_end|>")
    assert eos != im_end
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation == {"eos_token_id": [eos, im_end], "pad_token_id": eos}
    assert transformers.GenerationConfig.from_pretrained(tmp_path).eos_token_id == [eos, im_end]
    assert (tmp_path / "chat_template.jinja").read_text() == CHATML
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "hello there"}]
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert list(ids) == tok.encode(template.render(messages))
    assert ChatTemplate.from_tokenizer_config(tmp_path).source == CHATML  # lmlab reads it back


def test_end_of_turn_is_a_special_token_never_plain_text():
    tok = chat_bpe()
    assert end_of_turn_id(tok, ChatTemplate(CHATML)) == tok.tokenizer.token_to_id("<|im_end|>")
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert end_of_turn_id(tok, ChatTemplate(plain)) is None  # a newline ends no reply
    assert generation_config(None) == {}


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_export_with_a_char_or_byte_tokenizer_loads_in_transformers(kind, tmp_path):
    """The issue's case: an exported character model whose tokenizer AutoTokenizer read as
    nothing (every text -> []). Now it encodes as lmlab does, and the logits agree."""
    text = "to be, or not to be: that is the question.\n"
    tok = train_tokenizer(kind, text)
    torch.manual_seed(0)
    spec = {**get_preset("gpt-char-tiny"), "vocab_size": tok.vocab_size, "n_layers": 1}
    ours = build_model(spec).eval()
    save_hf(ours, tmp_path, tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = hf_tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == tok.encode(text)
    assert hf_tok.decode(ids[0]) == text
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=ATOL, rtol=RTOL)
    assert json.loads((tmp_path / "generation_config.json").read_text()) == {}  # no eos


def test_exported_files_have_ordinary_permissions(tmp_path):
    """model.safetensors came out 0600 (safetensors' save_file); every file is now what
    open() makes: 0644 under umask 022."""
    old = os.umask(0o022)
    try:
        save_hf(
            build_model({**get_preset("llama-small"), "vocab_size": 300, "n_layers": 1}),
            tmp_path,
            chat_bpe(),
            ChatTemplate(CHATML),
        )
    finally:
        os.umask(old)
    modes = {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in tmp_path.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {"0o644"}, modes


@pytest.mark.slow
def test_exported_smollm2_generates_in_transformers_as_lmlab_does(tmp_path):
    """The issue's case: transformers' generate ran past <|im_end|>. Greedy decoding on a chat
    prompt now gives lmlab's tokens and stops at the same <|im_end|> (float32 both; the
    logits agree to ~1e-4, far below the gaps between greedy choices here)."""
    out, notes = export_hf("smollm2", tmp_path / "smollm2")
    assert notes == []
    lm = lmlab.load("smollm2", device="cpu")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = lm.tokenizer.encode(lm.chat_template.render(messages))
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert list(ids["input_ids"] if hasattr(ids, "keys") else ids) == prompt
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)
    theirs = theirs[0, len(prompt) :].tolist()
    params = SamplingParams(temperature=0, max_new_tokens=40, eos_id=lm.tokenizer.eos_id)
    ours = generate_ids(lm.model, [prompt], params)[0]
    im_end = lm.tokenizer.encode("<|im_end|>")[0]
    assert theirs == ours and theirs[-1] == im_end and len(theirs) < 40  # stopped, not cut
    assert "Paris" in lm.tokenizer.decode(theirs)


# ----------------------------------------------------------------------------- item 14


class Payload:
    """Unpickling this runs ``open(marker, "w")``: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_payload_is_refused_and_never_runs(tmp_path):
    tiny("gpt2").config.save_pretrained(tmp_path)
    marker = tmp_path / "pwned"
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"transformer.wte.weight": Payload(marker)}, f, protocol=2)
    with pytest.raises(CheckpointError, match="refusing .*pytorch_model.bin.*never unpickles"):
        load_hf(tmp_path)
    assert not marker.exists()


def test_remote_code_in_config_is_ignored_and_never_imported(tmp_path, caplog):
    hf = tiny("llama")
    hf.save_pretrained(tmp_path)
    marker = tmp_path / "pwned"
    (tmp_path / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w')\n")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    cfg["trust_remote_code"] = True
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model, _, info = load_hf(tmp_path)
    assert not marker.exists()
    assert "auto_map" not in info["hf_config"] and "remote code" in caplog.text
    logits_agree(hf, model)


def test_unknown_model_type_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(CheckpointError, match="model_type 'mamba' is not supported; valid: gpt2"):
        load_hf(tmp_path)


# ----------------------------------------------------------------------------- item 15


def rewrite_header(file, edit):
    """Apply ``edit`` to the JSON header of a safetensors file, keeping its data."""
    raw = file.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def first_two(header):
    names = sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"]
    )
    return header[names[0]], header[names[1]], names


def overlap(header):
    a, b, _ = first_two(header)
    size = b["data_offsets"][1] - b["data_offsets"][0]
    b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size]


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda f: f.write_bytes(f.read_bytes()[:-100]), "truncated or corrupt"),
        (
            lambda f: f.write_bytes(struct.pack("<Q", 10**12) + f.read_bytes()[8:]),
            "header of 1000000000000 bytes in a file of",
        ),
        (lambda f: rewrite_header(f, overlap), "overlaps the tensor before it"),
        (
            lambda f: rewrite_header(f, lambda h: first_two(h)[0].update(dtype="F17")),
            "unknown dtype 'F17'",
        ),
        (
            lambda f: rewrite_header(f, lambda h: first_two(h)[0].update(shape=[1, 2, 3])),
            "needs 24 bytes",
        ),
    ],
    ids=["truncated", "huge-header", "overlap", "bad-dtype", "shape-vs-bytes"],
)
def test_corrupt_safetensors_name_the_file(tmp_path, corrupt, message):
    tiny("llama").save_pretrained(tmp_path)
    corrupt(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=message) as info:
        load_hf(tmp_path)
    assert "model.safetensors" in str(info.value)


def test_wrong_shape_or_dtype_for_the_config_names_file_and_tensor(tmp_path):
    hf = tiny("llama")
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    hf.config.save_pretrained(tmp_path)
    bad_shape = dict(state)
    bad_shape["model.layers.1.mlp.up_proj.weight"] = torch.zeros(95, 64)
    save_file(bad_shape, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.safetensors.*'model.layers.1.mlp.up_proj"):
        load_hf(tmp_path)
    bad_dtype = dict(state)
    bad_dtype["model.norm.weight"] = torch.ones(64, dtype=torch.int32)
    save_file(bad_dtype, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="'model.norm.weight' has dtype torch.int32"):
        load_hf(tmp_path)


# ----------------------------------------------------------------------------- item 29


@pytest.mark.parametrize("shards", [False, True])
def test_non_finite_weights_are_refused_naming_file_and_tensors(tmp_path, shards):
    hf = tiny("llama")
    with torch.no_grad():
        hf.model.layers[1].self_attn.v_proj.weight[0, 0] = float("nan")
        hf.lm_head.weight[2, 2] = float("-inf")
    hf.save_pretrained(tmp_path, max_shard_size="20KB" if shards else "1GB")
    with pytest.raises(CheckpointError, match="non-finite weights") as caught:
        load_hf(tmp_path)
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path) in message and ".safetensors" in message
    assert "model.layers.1.self_attn.v_proj.weight" in message or "lm_head.weight" in message
    if not shards:  # one file: both tensors named at once
        assert "model.layers.1.self_attn.v_proj.weight" in message
        assert "lm_head.weight" in message


# ----------------------------------------------------------------------------- item 30


@pytest.mark.parametrize(
    ("kind", "change", "message"),
    [
        (
            "llama",
            {"hidden_size": 196_608},
            r"'model.embed_tokens.weight' has shape \(97, 64\), but config.json implies "
            r"\(97, 196608\)",
        ),
        ("llama", {"intermediate_size": 2**30}, r"mlp.gate_proj.weight' has shape \(96, 64\)"),
        ("llama", {"num_hidden_layers": 50_000_000}, "50000000-layer model, but the weights hold"),
        ("gpt2", {"n_embd": 196_608}, r"'transformer.wte.weight' has shape \(97, 48\)"),
        ("gpt2", {"n_positions": 2**31}, r"'transformer.wpe.weight' has shape \(64, 48\)"),
    ],
    ids=["hidden_size", "intermediate_size", "num_hidden_layers", "n_embd", "n_positions"],
)
def test_config_promising_a_larger_model_is_refused_before_building(
    tmp_path, monkeypatch, kind, change, message
):
    tiny(kind).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
    built_on_meta_only(monkeypatch, lmlab.checkpoint.hf)
    with pytest.raises(CheckpointError, match=message) as caught:
        load_hf(tmp_path)
    assert str(tmp_path) in str(caught.value) and "\n" not in str(caught.value)


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path):
    text = "to be or not to be, that is the question " * 20
    tok = BPETokenizer.train(text, 300)
    model = build_model({**get_preset("llama-small"), "vocab_size": tok.vocab_size - 5})
    save_hf(model.eval(), tmp_path, tok)
    match = f"tokenizer has {tok.vocab_size} token ids but the model's vocab_size is "
    with pytest.raises(CheckpointError, match=match + f"{tok.vocab_size - 5}"):
        load_hf(tmp_path)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_assign_converted_takes_the_tensors_themselves_and_keeps_ties(dtype):
    """The loader's way to hold the weights once (issue 17: SmolLM2 at <= 1.2x its weights)."""
    from lmlab.checkpoint.hf import assign_converted, load_converted

    spec = {**get_preset("gpt-char-tiny"), "vocab_size": 20, "n_layers": 1, "d_model": 16}
    spec |= {"n_heads": 2, "d_ff": 32}
    torch.manual_seed(0)
    source = build_model(spec)
    state = {k: v.clone() for k, v in source.state_dict().items() if k != "lm_head.weight"}
    ptrs = {k: v.data_ptr() for k, v in state.items()}
    with torch.device("meta"):
        model = build_model(spec)
    assign_converted(model, dict(state), dtype)
    if dtype is None:  # no copy: the model's parameters are the given tensors
        assert all(model.state_dict()[k].data_ptr() == p for k, p in ptrs.items())
    assert model.lm_head.weight is model.tok_emb.weight  # still tied
    assert all(p.dtype == (dtype or torch.float32) for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    copied = build_model(spec, empty=True)
    load_converted(copied, state)
    ids = torch.randint(0, 20, (2, 7))
    expected = copied.to(dtype) if dtype else copied  # load, then cast: the old loader's way
    with torch.no_grad():
        assert torch.equal(model(ids), expected(ids))
    with torch.device("meta"):
        model = build_model(spec)
    del state["blocks.0.mlp.up_proj.bias"]
    with pytest.raises(CheckpointError, match="lacks tensors: blocks.0.mlp.up_proj.bias"):
        assign_converted(model, state)
