"""Write lmlab decoders as GGUF files that llama.cpp runs and ``lmlab.load`` reads back.

The file is what llama.cpp's own converter (``convert_hf_to_gguf.py``) writes for a Llama
model, through the ``gguf`` package's ``GGUFWriter`` (layout: ``checkpoint/gguf.py``):

    metadata   general.architecture "llama", llama.block_count, llama.embedding_length,
               llama.feed_forward_length, llama.attention.head_count(_kv), llama.rope.*,
               llama.attention.layer_norm_rms_epsilon, general.file_type
    tokenizer  tokenizer.ggml.model "gpt2" (byte-level BPE), .pre (the pre-tokenizer's
               name in llama.cpp), .tokens, .token_type, .merges, .bos/.eos/.eot_token_id,
               .add_bos_token false (lmlab adds no BOS), tokenizer.chat_template
    tensors    token_embd, output_norm, output (absent when tied), and per block
               attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate,
               ffn_up, ffn_down

GPT-2 (architecture "gpt2", as the converter writes it) has gpt2.* metadata with
``attention.layer_norm_epsilon``, ``position_embd`` (kept F32, as the converter keeps it),
biases, and per block attn_norm, attn_qkv (q, k, v fused), attn_output, ffn_norm, ffn_up,
ffn_down; HF's Conv1D weights ([in, out]) are transposed to [out, in]. llama.cpp's GPT-2
computes GELU with the tanh approximation, so only models with ``mlp="gelu_tanh"`` go.

Two things differ from the Hugging Face Llama layout (``checkpoint/hf.py``, which this
starts from): each head's q and k rows are reordered for llama.cpp's rotary embedding, which
rotates adjacent pairs where HF rotates the two halves (``permute_rotary``, the inverse of
the reader's ``unpermute_rotary``); and matrices may be stored in blocks (``GGUF_TYPES``).
Norm weights (1-D) stay float32, as llama.cpp's converter keeps them; a matrix whose rows
do not fill whole blocks of 32 falls back to F16.

Quantization is the ``gguf`` package's (``gguf.quants.quantize``, the Python twin of
ggml's reference code): Q8_0 stores 32 weights as int8 with one fp16 scale
(``d = max|w| / 127``); Q4_0 as 4-bit codes with one fp16 scale (``w = d (q - 8)``).

Tests (tests/checkpoint/test_gguf_export.py) read every file back with the gguf package's
``GGUFReader`` (names, shapes, types, metadata) and with ``lmlab.load``, whose logits equal
the source model's (tolerances there), and run it in llama.cpp when llama-cpp-python is
installed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import tokenizers
import torch
from torch import nn

from lmlab.checkpoint.gguf import (
    _BLOCK_NAMES,
    _GPT2_BLOCK_NAMES,
    _GPT2_TOP_NAMES,
    _TOP_NAMES,
    _pre_tokenizer,
)
from lmlab.checkpoint.hf import end_of_turn_id, generation_config, to_hf
from lmlab.errors import CheckpointError, ConfigError, closest
from lmlab.fileio import atomic_write_with
from lmlab.models import base_model, build_model, model_spec

Q = gguf.GGMLQuantizationType
GGUF_TYPES: dict[str, gguf.GGMLQuantizationType] = {
    "f32": Q.F32,
    "f16": Q.F16,
    "q8_0": Q.Q8_0,
    "q4_0": Q.Q4_0,
}
"""The tensor types ``save_gguf`` writes, by the names llama.cpp's tools use."""
_FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
}
# llama.cpp's names for the byte-level pre-tokenizers the reader rebuilds, in the order
# they are tried when naming a tokenizer's own pre-tokenizer.
_PRE_NAMES = ("gpt-2", "smollm", "llama-bpe")


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF q/k rows (each head's halves) -> llama.cpp's (interleaved pairs).

    For one head of size 4 the HF rows ``[x0, x1, y0, y1]`` become ``[x0, y0, x1, y1]``;
    ``unpermute_rotary`` undoes it. w: [n_heads * d_head, D] -> same shape.
    """
    out, d_in = w.shape
    half = out // n_heads // 2
    return w.reshape(n_heads, 2, half, d_in).transpose(1, 2).reshape(out, d_in)


def save_gguf(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer: Any | None = None,
    chat_template: Any | None = None,
    gguf_type: str = "f16",
    name: str = "lmlab model",
) -> tuple[Path, list[str]]:
    """Write an lmlab transformer in the Llama or GPT-2 layout as one GGUF file -> (path,
    notes).

    ``gguf_type``: ``"f32"``, ``"f16"``, ``"q8_0"`` or ``"q4_0"`` for the matrices.
    A byte-level BPE tokenizer (trained by lmlab, or loaded from a GGUF or HF folder) is
    written as llama.cpp's ``gpt2`` tokenizer, with the chat template; a char, byte or
    SentencePiece tokenizer is left out, which the notes say. The file is
    written atomically.
    """
    if gguf_type not in GGUF_TYPES:
        raise ConfigError(
            f"unknown GGUF type {gguf_type!r}{closest(str(gguf_type), GGUF_TYPES)}; "
            f"valid: {', '.join(GGUF_TYPES)}"
        )
    arch, cfg, state = _layout(model_spec(base_model(model)), model)
    notes: list[str] = []

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), arch=arch)
        w.add_name(name)
        if arch == "llama":
            _add_llama_metadata(w, cfg)
            tensors = _llama_tensors(cfg, state)
        else:
            _add_gpt2_metadata(w, cfg)
            tensors = _gpt2_tensors(state)
        w.add_vocab_size(cfg["vocab_size"])
        w.add_file_type(_FILE_TYPES[gguf_type])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab_note = _add_tokenizer(w, tokenizer, chat_template, cfg["vocab_size"])
        if vocab_note:
            notes.append(vocab_note)
        fallback = []
        for gguf_name, tensor in tensors:
            # llama.cpp's converter keeps position embeddings in F32 too
            wanted = Q.F32 if gguf_name == "position_embd.weight" else GGUF_TYPES[gguf_type]
            data, qtype = _stored(tensor, wanted)
            if qtype != wanted and tensor.ndim == 2:
                fallback.append(gguf_name)
            w.add_tensor(gguf_name, data, raw_dtype=qtype)
        if fallback:
            notes.append(
                f"{len(fallback)} matri(ces) with rows not a multiple of 32 kept in F16: "
                f"{', '.join(fallback[:4])}{', ...' if len(fallback) > 4 else ''}"
            )
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    path = Path(path)
    atomic_write_with(path, write)
    return path, notes


# The two layouts llama.cpp has an architecture for, as lmlab's config fields say them.
_LAYOUTS = {
    "llama": dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, residual=True),
    # llama.cpp's GPT-2 computes GELU with the tanh approximation, not the exact one
    "gpt2": dict(norm="layernorm", mlp="gelu_tanh", pos="learned", bias=True, residual=True),
}


def _layout(spec: dict[str, Any], model: nn.Module) -> tuple[str, dict, dict]:
    """(architecture, HF config, float32 HF state dict without a tied output matrix), or a
    CheckpointError saying why llama.cpp has no architecture for the model."""
    arch = next(
        (a for a, want in _LAYOUTS.items() if all(spec.get(k) == v for k, v in want.items())),
        None,
    )
    if spec.get("family") != "transformer" or arch is None:
        got = ", ".join(f"{k}={spec.get(k)!r}" for k in ("family", *_LAYOUTS["llama"]))
        valid = "; ".join(
            f"{a}: " + ", ".join(f"{k}={v!r}" for k, v in want.items())
            for a, want in _LAYOUTS.items()
        )
        raise CheckpointError(
            f"GGUF export writes a transformer in the Llama layout or GPT-2's ({valid}); this "
            f"model has {got}. Export it as a Hugging Face folder (lmlab export --format hf)"
        )
    if spec.get("qkv_bias"):
        raise CheckpointError(
            "GGUF export of q/k/v biases (the Qwen2 layout) is not supported; export it as a "
            "Hugging Face folder (lmlab export --format hf)"
        )
    with torch.device("meta"):  # the bare transformer's tensor names, with no memory
        bare = set(build_model(spec).state_dict())
    extra = sorted(set(model.state_dict()) - bare)
    if extra or base_model(model) is not model:
        raise CheckpointError(
            "the model carries trained parts a GGUF file has no place for (a LoRA, adapters, "
            f"a soft prompt or prefix: {', '.join(extra[:3]) or type(model).__name__}); merge "
            "a LoRA into the weights first, or keep the lmlab checkpoint"
        )
    cfg, state = to_hf(model)
    if cfg["tie_word_embeddings"]:  # llama.cpp uses token_embd when output is absent
        state.pop("lm_head.weight", None)
    return arch, cfg, {k: v.float() for k, v in state.items()}


def _add_gpt2_metadata(w: gguf.GGUFWriter, cfg: dict[str, Any]) -> None:
    w.add_context_length(cfg["n_positions"])
    w.add_embedding_length(cfg["n_embd"])
    w.add_block_count(cfg["n_layer"])
    w.add_feed_forward_length(cfg["n_inner"])
    w.add_head_count(cfg["n_head"])
    w.add_layer_norm_eps(cfg["layer_norm_epsilon"])


def _gpt2_tensors(state: dict[str, torch.Tensor]):
    """(GGUF name, tensor) for every HF GPT-2 tensor; Conv1D weights ([in, out]) transposed
    to the [out, in] of every other GGUF matrix."""
    top = {hf: ours for ours, hf in _GPT2_TOP_NAMES.items()}
    block = {hf: (ours, t) for ours, (hf, t) in _GPT2_BLOCK_NAMES.items()}
    for hf_name, tensor in state.items():
        if hf_name in top:
            yield top[hf_name], tensor
            continue
        _, _, i, rest = hf_name.split(".", 3)  # transformer.h.{i}.{rest}
        ours, transpose = block[rest]
        yield f"blk.{i}.{ours}", tensor.t().contiguous() if transpose else tensor


def _add_llama_metadata(w: gguf.GGUFWriter, cfg: dict[str, Any]) -> None:
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(D)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(H)
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_dimension_count(cfg["head_dim"])
    if cfg["head_dim"] != D // H:  # llama.cpp assumes D / H otherwise
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])


def _llama_tensors(cfg: dict[str, Any], state: dict[str, torch.Tensor]):
    """(GGUF name, tensor) for every HF tensor, q and k permuted for llama.cpp's RoPE."""
    top = {hf: ours for ours, hf in _TOP_NAMES.items()}
    block = {hf: ours for ours, hf in _BLOCK_NAMES.items()}
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
    for hf_name, tensor in state.items():
        if hf_name in top:
            yield top[hf_name], tensor
            continue
        _, _, i, rest = hf_name.split(".", 3)  # model.layers.{i}.{rest}
        proj = rest.split(".")[-2]
        if proj in heads:
            tensor = permute_rotary(tensor, heads[proj])
        yield f"blk.{i}.{block[rest]}", tensor


def _stored(tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType):
    """(array for GGUFWriter.add_tensor, its type): 1-D in F32, matrices in ``qtype`` when
    their rows fill whole blocks, else F16. A quantized array holds the raw block bytes."""
    values = tensor.detach().cpu().float().contiguous().numpy()
    if values.ndim == 1 or qtype == Q.F32:
        return values, Q.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if qtype == Q.F16 or values.shape[-1] % block:
        return values.astype(np.float16), Q.F16
    return gguf.quants.quantize(values, qtype), qtype


# ----------------------------------------------------------------------------- tokenizer


def _add_tokenizer(w, tokenizer, chat_template, vocab_size: int) -> str | None:
    """Write the tokenizer as llama.cpp's byte-level BPE; a note when it cannot be."""
    if tokenizer is None:
        return "the model has no tokenizer, so the file holds none (llama.cpp needs one)"
    kind = getattr(tokenizer, "kind", None)
    if kind != "bpe":
        # A byte tokenizer is a BPE without merges, but GGUF cannot store an empty merge
        # list, and llama.cpp refuses a BPE vocabulary without one.
        return (
            f"the {kind} tokenizer has no llama.cpp form and was not written; the file holds "
            "the model alone (encode text with lmlab for it)"
        )
    library, pre = tokenizer.tokenizer, _pre_name(tokenizer.tokenizer)
    data = json.loads(library.to_str())
    by_id = {i: token for token, i in library.get_vocab(with_added_tokens=True).items()}
    if max(by_id) >= vocab_size:
        raise CheckpointError(
            f"the tokenizer has ids up to {max(by_id)}, beyond the model's {vocab_size} rows"
        )
    added = {t.content: t.special for t in library.get_added_tokens_decoder().values()}
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(vocab_size):  # ids the tokenizer lacks are padding, as llama.cpp pads
        token = by_id.get(i, f"[PAD{i}]")
        tokens.append(token)
        if i not in by_id:
            types.append(T.UNUSED)
        elif token in added:
            types.append(T.CONTROL if added[token] else T.USER_DEFINED)
        else:
            types.append(T.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    if any(m.count(" ") != 1 for m in merges):
        raise CheckpointError("a BPE merge joins tokens that contain a space; GGUF cannot hold it")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    ids = generation_config(tokenizer, chat_template)
    if "bos_token_id" in ids:
        w.add_bos_token_id(ids["bos_token_id"])
    eos = ids.get("eos_token_id")
    if eos is not None:
        w.add_eos_token_id(eos[0] if isinstance(eos, list) else eos)
    if ids.get("pad_token_id") is not None:
        w.add_pad_token_id(ids["pad_token_id"])
    if chat_template is not None:
        end = end_of_turn_id(tokenizer, chat_template)
        if end is not None:
            w.add_eot_token_id(end)  # llama.cpp ends generation on eos and eot alike
        w.add_chat_template(chat_template.source)
    w.add_add_bos_token(False)  # lmlab encodes text as it is, with no BOS in front
    w.add_add_eos_token(False)
    return None


def _pre_name(library) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (the GPT-2 regex, SmolLM2's
    digits-then-GPT-2, Llama 3's), found by comparing with what the reader builds."""
    ours = json.loads(library.to_str()).get("pre_tokenizer")
    for pre in _PRE_NAMES:
        probe = tokenizers.Tokenizer(tokenizers.models.BPE())  # serialises a pre-tokenizer
        probe.pre_tokenizer = _pre_tokenizer(pre)[0]
        if json.loads(probe.to_str()).get("pre_tokenizer") == ours:
            return pre
    raise CheckpointError(
        "the BPE tokenizer's pre-tokenizer is none llama.cpp knows (valid: GPT-2's byte-level "
        f"regex, {', '.join(_PRE_NAMES)}): the GGUF file could not encode text as lmlab does"
    )
