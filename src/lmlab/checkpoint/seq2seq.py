"""Convert between Hugging Face encoder-decoder folders and lmlab's ``Seq2Seq``.

T5 (``T5ForConditionalGeneration``; mT5's layout is the same), BART
(``BartForConditionalGeneration``, or a bare ``BartModel``), Marian (``MarianMTModel``)
and Pegasus (``PegasusForConditionalGeneration``) are one lmlab model with different
settings (``lmlab.models.seq2seq``):

    setting           T5                       BART               Marian     Pegasus
    positions         relative (1st layer)     learned, offset 2  sinusoidal sinusoidal
    norm, norm_kind   pre, rmsnorm (no bias)   post, layernorm    post       pre
    embed_norm        no                       yes                no         no
    activation        relu / gated gelu_tanh   activation_function (gelu, relu, swish)
    bias              none                     everywhere, plus final_logits_bias
    scale_embeddings  no                       scale_embedding    (same)     (same)
    scale_attention   no (folded into init)    1/sqrt(d_head)     (same)     (same)
    tied output       x d_model**-0.5          tie_word_embeddings
    bos_id            decoder_start_token_id (T5: pad 0; BART: eos 2; Marian: pad)

Marian is the paper's layout and Pegasus its pre-norm variant, so every lmlab default
(``norm="post"`` or ``"pre"``) exports; their sinusoidal tables hold the sines first and
the cosines after, where lmlab interleaves them as the paper does, so the conversion
reorders the units of the model width (``sinusoid_order``), which changes no output.

Every tensor of the source is consumed (copies of the shared embedding must equal it)
and every lmlab tensor filled, or the conversion fails naming the key; the config is
checked against the safetensors headers before any tensor is read; weights are read with
safetensors (or ``torch.load(weights_only=True)``), never unpickled; remote-code keys in
config.json are dropped (``read_hf_config``). An option lmlab does not implement (mBART's
layout, a T5 feed-forward kind it lacks, different encoder and decoder widths) is a
``CheckpointError`` naming the option and what is supported.

Export goes the other way: an lmlab ``Seq2Seq`` with the settings of one of these classes
writes a folder that ``AutoModelForSeq2SeqLM.from_pretrained`` loads; other settings are
refused in one line naming what is exportable. Parity: tests/checkpoint/test_seq2seq.py.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from lmlab.checkpoint.hf import (
    HF_CONFIG,
    HF_GENERATION_CONFIG,
    HF_TOKENIZER_KINDS,
    HF_WEIGHTS,
    check_config_against_weights,
    load_converted,
    read_hf_config,
    read_hf_weights,
    state_shapes,
    stored_shapes,
)
from lmlab.checkpoint.io import check_tokenizer_fits
from lmlab.data.tokenizers import TOKENIZER_FILE, SentencePieceTokenizer, find_tokenizer
from lmlab.errors import CheckpointError, ConfigError
from lmlab.fileio import atomic_write_json, atomic_write_with
from lmlab.models import build_model, model_spec
from lmlab.models.seq2seq import Seq2Seq, Seq2SeqConfig, sinusoids

T5_TYPES = ("t5", "mt5")
BART_TYPES = ("bart", "marian", "pegasus")
"""The fairseq-style encoder-decoders, which name their tensors alike: BART (learned
positions, post-norm, embedding norm), Marian (sinusoidal, post-norm) and Pegasus
(sinusoidal, pre-norm with a final norm per stack)."""
SEQ2SEQ_TYPES = T5_TYPES + BART_TYPES
T5_SENTENCEPIECE_FILE = "spiece.model"

# Hugging Face activation names (ACT2FN) -> Seq2SeqConfig.activation
_ACTIVATIONS = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "silu": "silu",
    "swish": "silu",
}
# (activation, gated) -> T5's feed_forward_proj; "gated-gelu" is T5 v1.1's (tanh GELU)
_T5_FEED_FORWARD = {
    ("relu", False): "relu",
    ("gelu", False): "gelu",
    ("gelu_tanh", False): "gelu_new",
    ("silu", False): "silu",
    ("relu", True): "gated-relu",
    ("gelu_tanh", True): "gated-gelu",
    ("silu", True): "gated-silu",
}
_BART_ACTIVATION = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu"}
BART_POSITION_OFFSET = 2
"""BART's learned position tables keep two rows before position 0 (fairseq's legacy)."""
BART_NORM_EPS = 1e-5  # BART's nn.LayerNorm default


def is_seq2seq_directory(path: str | os.PathLike) -> bool:
    """A Hugging Face folder of an encoder-decoder: T5, BART, or one lmlab does not
    support (``is_encoder_decoder`` in its config.json), which ``load_hf_seq2seq`` refuses
    naming the supported types."""
    file = Path(path) / HF_CONFIG
    if not file.is_file():
        return False
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(cfg, dict):
        return False
    return cfg.get("model_type") in SEQ2SEQ_TYPES or cfg.get("is_encoder_decoder") is True


# ----------------------------------------------------------------------------- configs


def spec_from_seq2seq_config(cfg: dict[str, Any], tie_output: bool = True) -> dict[str, Any]:
    """An lmlab ``seq2seq`` spec from an HF T5, mT5, BART, Marian or Pegasus config dict.

    ``tie_output``: whether the output projection is the embedding matrix, which the
    weights decide (an ``lm_head.weight`` that differs from the embeddings is untied, as
    transformers decides). Dropout is 0: the imported model is for inference.
    """
    kind = cfg.get("model_type")
    if kind in T5_TYPES:
        return _t5_spec(cfg, tie_output)
    if kind in BART_TYPES:
        return _bart_spec(cfg, tie_output)
    raise CheckpointError(
        f"encoder-decoder model_type {kind!r} is not supported; valid: {', '.join(SEQ2SEQ_TYPES)}"
    )


def _t5_spec(cfg: dict[str, Any], tie_output: bool) -> dict[str, Any]:
    proj = cfg.get("feed_forward_proj", "relu")
    gated, _, act = str(proj).rpartition("-")
    act = "gelu_new" if proj == "gated-gelu" else act  # transformers' own special case
    if gated not in ("", "gated") or act not in _ACTIVATIONS:
        valid = sorted(set(_T5_FEED_FORWARD.values()))
        raise CheckpointError(
            f"T5 feed_forward_proj {proj!r} is not supported; valid: {', '.join(valid)}"
        )
    d_model, n_heads = cfg.get("d_model", 512), cfg.get("num_heads", 8)
    # transformers >= 5 stores scale_decoder_outputs; older configs mean it by tying. mT5
    # (always v1.1-style) never scales.
    scale = cfg.get("scale_decoder_outputs")
    if not isinstance(scale, bool):
        scale = cfg.get("tie_word_embeddings", True) is not False and cfg["model_type"] == "t5"
    pad = cfg.get("pad_token_id", 0)
    return dict(
        family="seq2seq",
        vocab_size=cfg.get("vocab_size", 32128),
        d_model=d_model,
        n_heads=n_heads,
        d_head=cfg.get("d_kv", 64),
        n_encoder_layers=cfg.get("num_layers", 6),
        n_decoder_layers=cfg.get("num_decoder_layers") or cfg.get("num_layers", 6),
        d_ff=cfg.get("d_ff", 2048),
        # T5 has no position limit; lmlab's caches need one (old configs say 512)
        max_seq_len=cfg.get("n_positions") or 512,
        dropout=0.0,
        norm="pre",
        pad_id=pad,
        bos_id=_decoder_start(cfg, pad),
        eos_id=_single_id(cfg.get("eos_token_id", 1)),
        positions="relative",
        relative_buckets=cfg.get("relative_attention_num_buckets", 32),
        relative_max_distance=cfg.get("relative_attention_max_distance", 128),
        norm_kind="rmsnorm",
        norm_eps=cfg.get("layer_norm_epsilon", 1e-6),
        activation=_ACTIVATIONS[act],
        gated=gated == "gated",
        bias=False,
        scale_embeddings=False,
        embed_norm=False,
        scale_attention=False,
        tie_output=tie_output,
        output_scale=d_model**-0.5 if scale and _positive_int(d_model) else 1.0,
        output_bias=False,
    )


# model_type -> (positions, norm, embedding norm, pad id by default, decoder start by default)
_BART_LAYOUTS = {
    "bart": ("learned", "post", True, 1, 2),
    "marian": ("sinusoidal", "post", False, 0, 0),
    "pegasus": ("sinusoidal", "pre", False, 0, 0),
}


def _bart_spec(cfg: dict[str, Any], tie_output: bool) -> dict[str, Any]:
    kind = cfg["model_type"]
    name = {"bart": "BART", "marian": "Marian", "pegasus": "Pegasus"}[kind]
    positions, norm, embed_norm, pad_default, start_default = _BART_LAYOUTS[kind]
    # Options of older configs (and of mBART's) that change the computation.
    for key, supported in (
        ("normalize_before", norm == "pre"),
        ("add_final_layer_norm", norm == "pre"),
        ("normalize_embedding", embed_norm),
        ("static_position_embeddings", positions == "sinusoidal"),
        ("add_bias_logits", False),
        ("share_encoder_decoder_embeddings", True),
    ):
        if cfg.get(key) not in (None, supported):
            raise CheckpointError(
                f"{name} {key}={cfg[key]!r} is not supported (that is mBART's or another "
                f"layout); lmlab loads {name} with {key}={supported}"
            )
    if cfg.get("decoder_vocab_size") not in (None, cfg.get("vocab_size")):
        raise CheckpointError(
            f"{name} decoder_vocab_size={cfg['decoder_vocab_size']} differs from vocab_size="
            f"{cfg.get('vocab_size')}; lmlab's encoder-decoder has one vocabulary"
        )
    act = cfg.get("activation_function", "gelu")
    if act not in _ACTIVATIONS:
        raise CheckpointError(
            f"{name} activation_function {act!r} is not supported; valid: {', '.join(_ACTIVATIONS)}"
        )
    sizes = {}
    for ours, enc, dec, default in (
        ("n_heads", "encoder_attention_heads", "decoder_attention_heads", 16),
        ("d_ff", "encoder_ffn_dim", "decoder_ffn_dim", 4096),
    ):
        sizes[ours] = cfg.get(enc, default)
        if cfg.get(dec, default) != sizes[ours]:
            raise CheckpointError(
                f"{name} {enc}={sizes[ours]} differs from {dec}={cfg.get(dec, default)}; lmlab's "
                "encoder-decoder has one value for both stacks"
            )
    pad = cfg.get("pad_token_id", pad_default)
    return dict(
        family="seq2seq",
        vocab_size=cfg.get("vocab_size", 50265),
        d_model=cfg.get("d_model", 1024),
        n_heads=sizes["n_heads"],
        n_encoder_layers=cfg.get("encoder_layers", 12),
        n_decoder_layers=cfg.get("decoder_layers", 12),
        d_ff=sizes["d_ff"],
        max_seq_len=cfg.get("max_position_embeddings", 1024),
        dropout=0.0,
        norm=norm,
        pad_id=pad,
        bos_id=_decoder_start(cfg, start_default),
        eos_id=_single_id(cfg.get("eos_token_id", 2)),
        positions=positions,
        position_offset=BART_POSITION_OFFSET if positions == "learned" else 0,
        norm_kind="layernorm",
        norm_eps=BART_NORM_EPS,
        activation=_ACTIVATIONS[act],
        gated=False,
        bias=True,
        scale_embeddings=bool(cfg.get("scale_embedding", False)),
        embed_norm=embed_norm,
        scale_attention=True,
        tie_output=tie_output,
        output_scale=1.0,
        output_bias=True,
    )


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _decoder_start(cfg: dict[str, Any], default: int) -> int:
    start = cfg.get("decoder_start_token_id")
    return start if isinstance(start, int) and not isinstance(start, bool) else default


def _single_id(value: Any) -> int | None:
    """One eos id from a config value (an int, a list of them, or None)."""
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# ----------------------------------------------------------------------------- tensors


def _key_map(spec: dict[str, Any]) -> dict[str, str]:
    """lmlab name -> Hugging Face name of every tensor the spec's model holds (the output
    bias and an untied lm_head included). Both sides use nn.Linear's [out, in] layout."""
    m = {
        "embed.weight": "shared.weight"
        if spec["positions"] == "relative"
        else "model.shared.weight"
    }
    if not spec["tie_output"]:
        m["lm_head.weight"] = "lm_head.weight"
    return {**m, **(_t5_keys(spec) if spec["positions"] == "relative" else _bart_keys(spec))}


def _t5_keys(spec: dict[str, Any]) -> dict[str, str]:
    # lmlab's feed-forward (up, down, gate) is T5's wi (or wi_1 when gated), wo and wi_0
    ff = [("up", "wi_1" if spec["gated"] else "wi"), ("down", "wo")]
    ff += [("gate", "wi_0")] if spec["gated"] else []
    # (lmlab attention, T5 attention, lmlab sublayer) in the order of T5's layer.N
    encoder = [("attn", "SelfAttention", "sub_attn")]
    decoder = [("self_attn", "SelfAttention", "sub_self")]
    decoder += [("cross_attn", "EncDecAttention", "sub_cross")]
    m = {}
    for stack, n, blocks in (
        ("encoder", spec["n_encoder_layers"], encoder),
        ("decoder", spec["n_decoder_layers"], decoder),
    ):
        m[f"{stack}_relative.embed.weight"] = (
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        )
        m[f"{stack}_norm.weight"] = f"{stack}.final_layer_norm.weight"
        for i in range(n):
            a, h = f"{stack}.{i}.", f"{stack}.block.{i}.layer."
            for j, (attn, theirs, sub) in enumerate(blocks):
                for p in "qkvo":
                    m[f"{a}{attn}.{p}_proj.weight"] = f"{h}{j}.{theirs}.{p}.weight"
                m[f"{a}{sub}.norm.weight"] = f"{h}{j}.layer_norm.weight"
            j = len(blocks)  # the feed-forward sublayer comes last
            for ours, theirs in ff:
                m[f"{a}ff.{ours}.weight"] = f"{h}{j}.DenseReluDense.{theirs}.weight"
            m[f"{a}sub_ff.norm.weight"] = f"{h}{j}.layer_norm.weight"
    return m


def _bart_keys(spec: dict[str, Any]) -> dict[str, str]:
    m = {"final_logits_bias": "final_logits_bias"} if spec["output_bias"] else {}
    for stack, n in (("encoder", spec["n_encoder_layers"]), ("decoder", spec["n_decoder_layers"])):
        h = f"model.{stack}."
        if spec["positions"] == "learned":
            m[f"{stack}_positions.weight"] = h + "embed_positions.weight"
        pairs = []
        if spec["embed_norm"]:
            pairs.append((f"{stack}_embed_norm", "layernorm_embedding"))
        if spec["norm"] == "pre":  # Pegasus's final norm of each stack
            pairs.append((f"{stack}_norm", "layer_norm"))
        attns = (
            (("attn", "self_attn", "sub_attn"),)
            if stack == "encoder"
            else (
                ("self_attn", "self_attn", "sub_self"),
                ("cross_attn", "encoder_attn", "sub_cross"),
            )
        )
        for i in range(n):
            a, b = f"{stack}.{i}.", f"layers.{i}."
            for ours, theirs, sub in attns:
                for p in ("q_proj", "k_proj", "v_proj"):
                    pairs.append((f"{a}{ours}.{p}", f"{b}{theirs}.{p}"))
                pairs.append((f"{a}{ours}.o_proj", f"{b}{theirs}.out_proj"))
                pairs.append((f"{a}{sub}.norm", f"{b}{theirs}_layer_norm"))
            pairs += [
                (f"{a}ff.up", f"{b}fc1"),
                (f"{a}ff.down", f"{b}fc2"),
                (f"{a}sub_ff.norm", f"{b}final_layer_norm"),
            ]
        for ours, theirs in pairs:
            m[f"{ours}.weight"], m[f"{ours}.bias"] = f"{h}{theirs}.weight", f"{h}{theirs}.bias"
    return m


def _aliases(spec: dict[str, Any]) -> list[str]:
    """Names under which files may store the shared embedding again (transformers ties
    them to it): the embeddings of each stack, and lm_head when the output is tied."""
    prefix = "" if spec["positions"] == "relative" else "model."
    names = [f"{prefix}encoder.embed_tokens.weight", f"{prefix}decoder.embed_tokens.weight"]
    return names + (["lm_head.weight"] if spec["tie_output"] else [])


# Stored by some T5 files, ignored by transformers: cross-attention has no position bias.
_T5_IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


def _normalise(kind: str, state: dict[str, Any]) -> dict[str, Any]:
    """A bare ``BartModel``'s names gain the ``model.`` prefix of the generation class."""
    if kind in BART_TYPES and not any(k.startswith("model.") for k in state):
        return {f"model.{k}": v for k, v in state.items()}
    return state


def sinusoid_order(d_model: int) -> torch.Tensor:
    """Where lmlab's hidden units sit in Marian's and Pegasus's order.

    Their sinusoidal table holds all the sines first, then all the cosines; lmlab's
    interleaves them as the paper does (sin, cos, sin, cos, ...). Their unit j is lmlab's
    unit ``order[j]``: d_model 6 -> [0, 2, 4, 1, 3, 5]. Reordering the d_model axis of every
    tensor that has one maps either model onto the other exactly: layer norms, residual
    sums and the tied output projection do not depend on the order of the units.
    """
    return torch.cat([torch.arange(0, d_model, 2), torch.arange(1, d_model, 2)])


def pegasus_sinusoids(length: int, d_model: int) -> torch.Tensor:
    """The table [length, d_model] transformers computes for Marian and Pegasus, bit for bit
    (in float64 with numpy, then cast): sines of pos / 10000^(2i/d) in the first half,
    cosines in the second. lmlab's own (``sinusoids``, float32, interleaved) equals it
    reordered up to float32 rounding."""
    j = np.arange(d_model)
    angle = np.arange(length)[:, None] / np.power(10000, 2 * (j // 2) / d_model)[None, :]
    half = (d_model + 1) // 2
    table = torch.empty(length, d_model)
    table[:, :half] = torch.from_numpy(np.sin(angle[:, 0::2])).float()
    table[:, half:] = torch.from_numpy(np.cos(angle[:, 1::2])).float()
    return table


def _model_axis(name: str) -> int | None:
    """The d_model axis of lmlab tensor ``name``, or None (per head, per feed-forward unit,
    per token of the vocabulary)."""
    if name in ("embed.weight", "lm_head.weight") or name.endswith(
        ("q_proj.weight", "k_proj.weight", "v_proj.weight", "ff.up.weight", "ff.gate.weight")
    ):
        return 1  # [out, D]
    if name.endswith(("o_proj.weight", "o_proj.bias", "ff.down.weight", "ff.down.bias")):
        return 0  # [D, in]
    return 0 if "norm" in name else None


def _reorder(state: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every tensor of an lmlab state with its d_model axis reordered by ``index``."""
    out = {}
    for name, t in state.items():
        axis = _model_axis(name)
        out[name] = t if axis is None else t.index_select(axis, index)
    return out


def _check_sinusoids(hf_state: dict[str, torch.Tensor], spec: dict[str, Any], used: set) -> None:
    """Pegasus files store their sinusoidal tables: they must be the sinusoids lmlab
    computes (up to the rounding of their float64 computation)."""
    d = spec["d_model"]
    for stack in ("encoder", "decoder"):
        name = f"model.{stack}.embed_positions.weight"
        if name not in hf_state:
            continue
        used.add(name)
        table = hf_state[name]
        expected = sinusoids(table.shape[0], d)[:, sinusoid_order(d)]
        if table.shape[0] < spec["max_seq_len"] or not torch.allclose(
            table.float(), expected, atol=1e-3
        ):
            raise CheckpointError(
                f"{name!r} is not the sinusoidal table of {spec['max_seq_len']} positions "
                "that the config implies"
            )


def convert_seq2seq_state_dict(
    hf_state: dict[str, torch.Tensor], spec: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Rename an HF T5/BART/Marian/Pegasus state dict into lmlab ``Seq2Seq`` names for
    ``spec`` (Marian's and Pegasus's units reordered: ``sinusoid_order``).

    Raises ``CheckpointError`` for a missing or unexpected tensor, or a copy of the shared
    embedding that differs from it. BART's ``final_logits_bias`` [1, V] becomes [V] (zeros
    when the file has none, as transformers does).
    """
    hf_state = dict(hf_state)
    shared = _key_map(spec)["embed.weight"]
    if shared not in hf_state:  # older files may keep only a stack's copy
        for alias in _aliases(spec)[:2]:
            if alias in hf_state:
                hf_state[shared] = hf_state[alias]
                break
    if spec["output_bias"] and "final_logits_bias" not in hf_state:
        hf_state["final_logits_bias"] = torch.zeros(1, spec["vocab_size"])
    ours, used = {}, set()
    for name, hf_name in _key_map(spec).items():
        if hf_name not in hf_state:
            raise CheckpointError(f"tensor {hf_name!r} is missing from the checkpoint")
        used.add(hf_name)
        ours[name] = hf_state[hf_name]
    if "final_logits_bias" in ours:
        ours["final_logits_bias"] = ours["final_logits_bias"].reshape(-1)
    for alias in _aliases(spec):
        if alias in hf_state:
            used.add(alias)
            if not torch.equal(hf_state[alias], ours["embed.weight"]):
                raise CheckpointError(
                    f"{alias!r} differs from {shared!r}; lmlab's encoder-decoder has one "
                    "embedding matrix for source, target (and a tied output)"
                )
    if spec["positions"] == "sinusoidal":
        _check_sinusoids(hf_state, spec, used)
        ours = _reorder(ours, torch.argsort(sinusoid_order(spec["d_model"])))
    leftover = sorted(set(hf_state) - used - set(_T5_IGNORED))
    if leftover:
        raise CheckpointError(
            f"unexpected tensors in the checkpoint: {', '.join(leftover[:8])}"
            + (f" and {len(leftover) - 8} more" if len(leftover) > 8 else "")
        )
    return {k: v.contiguous() for k, v in ours.items()}


def _hf_shapes(spec: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF names -> shapes the spec implies (built on the meta device: no memory)."""
    spec = {k: v for k, v in spec.items() if k != "n_layers"}
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in build_model(spec).state_dict().items()}
    shapes["final_logits_bias"] = (1, spec["vocab_size"])
    return {hf: shapes[ours] for ours, hf in _key_map(spec).items()}


# ----------------------------------------------------------------------------- folders


def load_hf_seq2seq(
    directory: str | os.PathLike, dtype: torch.dtype | None = None
) -> tuple[Seq2Seq, Any | None, dict[str, Any]]:
    """An HF T5, mT5, BART, Marian or Pegasus folder -> (lmlab ``Seq2Seq`` in eval mode,
    tokenizer, info).

    The model is in ``dtype`` (default float32). The tokenizer is ``tokenizer.json``, BART's
    ``vocab.json`` + ``merges.txt`` or T5's SentencePiece ``spiece.model`` (None when the
    folder has none, and for Marian's pair of SentencePiece models) and must fit the
    vocabulary. ``info``: the spec (``"model"``) and the
    HF config. ``generation_config.json``'s ``decoder_start_token_id`` wins over
    config.json's, as in transformers' ``generate``.
    """
    directory = Path(directory)
    where = repr(str(directory))
    cfg = read_hf_config(directory)
    generation = _read_generation_config(directory)
    if isinstance(generation.get("decoder_start_token_id"), int):
        cfg = {**cfg, "decoder_start_token_id": generation["decoder_start_token_id"]}
    spec_from_seq2seq_config(cfg)  # an unsupported type or option fails before any read
    stored, state = stored_shapes(directory), None
    if not stored:  # pytorch_model.bin has no header: read it (weights_only) to see shapes
        state, sources = read_hf_weights(directory)
        stored = state_shapes(state, sources)
    stored = _normalise(cfg["model_type"], stored)
    spec = spec_from_seq2seq_config(cfg, tie_output="lm_head.weight" not in stored)
    try:  # every setting checked (the config alone: no layer is built)
        Seq2SeqConfig(**{k: v for k, v in spec.items() if k != "family"})
    except ConfigError as e:
        raise CheckpointError(f"{where}: config.json describes no valid model: {e}") from e
    layers = {**spec, "n_layers": spec["n_encoder_layers"] + spec["n_decoder_layers"]}
    check_config_against_weights(layers, stored, where, _hf_shapes)
    if state is None:
        state, _ = read_hf_weights(directory)
    state = _normalise(cfg["model_type"], state)
    if not spec["tie_output"] and _same(state.get("lm_head.weight"), _embedding(state, spec)):
        spec["tie_output"] = True  # a stored copy of the embeddings: tied after all
    model = build_model(spec, empty=True)  # load_converted fills every tensor (or fails)
    if spec["positions"] == "sinusoidal":  # but not this computed one, which to_empty blanked
        model.positions.copy_(sinusoids(spec["max_seq_len"], spec["d_model"]))
    try:
        load_converted(model, convert_seq2seq_state_dict(state, spec))
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from e
    model.to(dtype or torch.float32).eval()
    if cfg["model_type"] == "marian" and not (directory / TOKENIZER_FILE).is_file():
        # Marian's vocab.json + source.spm/target.spm pair has no lmlab form: ids only
        tokenizer = None
    else:
        tokenizer = find_tokenizer(directory)
    if tokenizer is None and (directory / T5_SENTENCEPIECE_FILE).is_file():
        tokenizer = SentencePieceTokenizer.from_file(directory / T5_SENTENCEPIECE_FILE)
    check_tokenizer_fits(tokenizer, model, str(directory))
    return (
        model,
        tokenizer,
        {"format": "hf", "path": str(directory), "model": spec, "hf_config": cfg},
    )


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is not None and b is not None and a.shape == b.shape and torch.equal(a, b)


def _embedding(state: dict[str, torch.Tensor], spec: dict[str, Any]) -> torch.Tensor | None:
    for name in [_key_map(spec)["embed.weight"], *_aliases(spec)[:2]]:
        if name in state:
            return state[name]
    return None


def _read_generation_config(directory: Path) -> dict[str, Any]:
    file = directory / HF_GENERATION_CONFIG
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{str(file)!r} is not valid JSON: {e}") from e
    return data if isinstance(data, dict) else {}


# ----------------------------------------------------------------------------- export

_T5_LAYOUT = dict(
    positions="relative",
    norm="pre",
    norm_kind="rmsnorm",
    bias=False,
    scale_embeddings=False,
    embed_norm=False,
    scale_attention=False,
    output_bias=False,
)
_FAIRSEQ = dict(
    norm_kind="layernorm",
    norm_eps=BART_NORM_EPS,
    bias=True,
    scale_attention=True,
    gated=False,
    output_scale=1.0,
)
# what each Hugging Face class computes, as lmlab settings (the rest is free, or checked below)
LAYOUTS = {
    "t5": _T5_LAYOUT,
    "bart": dict(positions="learned", position_offset=BART_POSITION_OFFSET, norm="post",
                 embed_norm=True, **_FAIRSEQ),
    "marian": dict(positions="sinusoidal", norm="post", embed_norm=False, **_FAIRSEQ),
    "pegasus": dict(positions="sinusoidal", norm="pre", embed_norm=False, **_FAIRSEQ),
}  # fmt: skip
_ARCHITECTURES = {
    "t5": "T5ForConditionalGeneration",
    "bart": "BartForConditionalGeneration",
    "marian": "MarianMTModel",
    "pegasus": "PegasusForConditionalGeneration",
}


def _differences(spec: dict[str, Any], kind: str) -> list[str]:
    """What keeps ``spec`` from being exported as ``kind``: "setting=value (needs ...)"."""
    found = [f"{k}={spec[k]!r} (needs {v!r})" for k, v in LAYOUTS[kind].items() if spec[k] != v]
    d = spec["d_model"]
    if kind == "t5":
        if (spec["activation"], spec["gated"]) not in _T5_FEED_FORWARD:
            found.append(f"activation={spec['activation']!r} gated (no T5 feed_forward_proj)")
        # transformers' T5 scales the last state by d_model**-0.5 exactly when tied
        if not math.isclose(spec["output_scale"], d**-0.5 if spec["tie_output"] else 1.0):
            found.append(
                f"output_scale={spec['output_scale']} with tie_output={spec['tie_output']} "
                f"(needs {d**-0.5:.6g} when tied, 1.0 when not)"
            )
    elif spec["d_head"] not in (None, d // spec["n_heads"]):
        found.append(f"d_head={spec['d_head']} (needs d_model / n_heads)")
    return found


def to_hf_seq2seq(model: Seq2Seq) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The HF config dict and state dict of an lmlab ``Seq2Seq`` whose settings are those
    of T5, BART, Marian (the paper's post-norm layout) or Pegasus (its pre-norm variant);
    other settings are a ``ConfigError`` naming what is exportable and what differs."""
    spec = model_spec(model)
    differences = {kind: _differences(spec, kind) for kind in LAYOUTS}
    kind = next((k for k, found in differences.items() if not found), None)
    if kind is None:
        closest = min(differences, key=lambda k: len(differences[k]))
        layouts = "; ".join(
            f"{_ARCHITECTURES[k]}: {', '.join(f'{f}={v}' for f, v in layout.items())}"
            for k, layout in LAYOUTS.items()
        )
        raise ConfigError(
            f"this encoder-decoder has no Hugging Face class. Exportable settings: {layouts}. "
            f"The closest, {_ARCHITECTURES[closest]}, needs {'; '.join(differences[closest])}"
        )
    names = _key_map(spec)
    state = {names[k]: v.detach().clone() for k, v in model.state_dict().items()}
    if kind in ("marian", "pegasus"):
        order = sinusoid_order(spec["d_model"])
        state = {names[k]: v for k, v in _reorder(model.state_dict(), order).items()}
        if kind == "pegasus":  # Pegasus files hold their tables (Marian's recomputes them)
            table = pegasus_sinusoids(spec["max_seq_len"], spec["d_model"])
            for stack in ("encoder", "decoder"):
                state[f"model.{stack}.embed_positions.weight"] = table
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    if not spec["tie_output"]:
        # transformers >= 5 reads tie_word_embeddings=false as "untie every copy of the
        # embeddings" in BART: store the stacks' copies too (older versions ignore them)
        for alias in _aliases(spec):
            state[alias] = state[names["embed.weight"]].clone()
    common = dict(
        model_type=kind,
        architectures=[_ARCHITECTURES[kind]],
        vocab_size=spec["vocab_size"],
        d_model=spec["d_model"],
        pad_token_id=spec["pad_id"],
        eos_token_id=spec["eos_id"],
        decoder_start_token_id=spec["bos_id"],
        is_encoder_decoder=True,
        tie_word_embeddings=spec["tie_output"],
    )
    if kind == "t5":
        cfg = dict(
            d_kv=model.config.head_size,
            d_ff=spec["d_ff"],
            num_layers=spec["n_encoder_layers"],
            num_decoder_layers=spec["n_decoder_layers"],
            num_heads=spec["n_heads"],
            relative_attention_num_buckets=spec["relative_buckets"],
            relative_attention_max_distance=spec["relative_max_distance"],
            dropout_rate=spec["dropout"],
            layer_norm_epsilon=spec["norm_eps"],
            feed_forward_proj=_T5_FEED_FORWARD[(spec["activation"], spec["gated"])],
            scale_decoder_outputs=spec["tie_output"],
            n_positions=spec["max_seq_len"],
        )
        return {**common, **cfg}, state
    state["final_logits_bias"] = (
        state["final_logits_bias"][None]
        if "final_logits_bias" in state
        else torch.zeros(1, spec["vocab_size"])
    )
    cfg = dict(
        encoder_layers=spec["n_encoder_layers"],
        decoder_layers=spec["n_decoder_layers"],
        encoder_attention_heads=spec["n_heads"],
        decoder_attention_heads=spec["n_heads"],
        encoder_ffn_dim=spec["d_ff"],
        decoder_ffn_dim=spec["d_ff"],
        max_position_embeddings=spec["max_seq_len"],
        activation_function=_BART_ACTIVATION[spec["activation"]],
        scale_embedding=spec["scale_embeddings"],
        dropout=spec["dropout"],
        attention_dropout=0.0,
        activation_dropout=0.0,
        bos_token_id=None,
        forced_eos_token_id=None,  # lmlab forces no token at the length limit
    )
    if kind == "marian":
        cfg.update(share_encoder_decoder_embeddings=True, decoder_vocab_size=spec["vocab_size"])
    return {**common, **cfg}, state


def save_hf_seq2seq(
    model: Seq2Seq, directory: str | os.PathLike, tokenizer: Any | None = None
) -> Path:
    """Write an lmlab ``Seq2Seq`` (``to_hf_seq2seq``'s settings) as an HF folder that
    ``AutoModelForSeq2SeqLM.from_pretrained(directory)`` loads: config.json,
    model.safetensors (float32, the tied embedding stored once), generation_config.json
    (start, end and padding ids), and the tokenizer when it has a Hugging Face form.
    Each file is written atomically."""
    directory = Path(directory)
    cfg, state = to_hf_seq2seq(model)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.float().contiguous() for k, v in state.items()}
    atomic_write_with(
        directory / HF_WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"})
    )
    atomic_write_json(directory / HF_CONFIG, {**cfg, "torch_dtype": "float32"})
    generation = {k: cfg[k] for k in ("decoder_start_token_id", "eos_token_id", "pad_token_id")}
    atomic_write_json(directory / HF_GENERATION_CONFIG, {**generation, "forced_eos_token_id": None})
    if tokenizer is not None and getattr(tokenizer, "kind", None) in HF_TOKENIZER_KINDS:
        tokenizer.save(directory)
    return directory
