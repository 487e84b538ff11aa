"""Convert between Hugging Face T5 / BART folders and lmlab's encoder-decoder (``Seq2Seq``).

T5 (``T5ForConditionalGeneration``, and mT5, whose layout is the same) and BART
(``BartForConditionalGeneration``, or a bare ``BartModel``) are one lmlab model with
different settings (``lmlab.models.seq2seq``):

    setting            T5                               BART
    positions          relative (buckets, 1st layer)    learned, offset 2, one per stack
    norm / norm_kind   pre / rmsnorm (no bias)          post / layernorm, + embed_norm
    activation, gated  relu (v1.0), gelu_tanh gated     gelu (activation_function)
    bias               none                             everywhere, + final_logits_bias
    scale_embeddings   no                               scale_embedding
    scale_attention    no (folded into the init)        1/sqrt(d_head)
    tied output        d_model**-0.5 on the last state  tie_word_embeddings
    bos_id             decoder_start_token_id (pad, 0)  decoder_start_token_id (eos, 2)

Every tensor of the source is consumed (aliases of the shared embedding must equal it)
and every lmlab tensor filled, or the conversion fails naming the key; the config is
checked against the safetensors headers before any tensor is read; weights are read with
safetensors (or ``torch.load(weights_only=True)``), never unpickled; remote-code keys in
config.json are dropped (``read_hf_config``). An option lmlab does not implement (mBART's
pre-norm, T5 feed-forward kinds it lacks, different encoder and decoder widths) is a
``CheckpointError`` naming the option and what is supported.

Export goes the other way: an lmlab ``Seq2Seq`` whose settings are T5's or BART's writes a
folder that ``AutoModelForSeq2SeqLM.from_pretrained`` loads; any other settings (the
default Vaswani layout among them: sinusoidal positions, post-norm, no embedding norm,
which no Hugging Face class computes exactly) are refused in one line naming what is
exportable. Parity: tests/checkpoint/test_seq2seq.py.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

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
from lmlab.data.tokenizers import SentencePieceTokenizer, find_tokenizer
from lmlab.errors import CheckpointError, ConfigError
from lmlab.fileio import atomic_write_json, atomic_write_with
from lmlab.models import build_model, model_spec
from lmlab.models.seq2seq import Seq2Seq

T5_TYPES = ("t5", "mt5")
BART_TYPES = ("bart",)
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
    """An lmlab ``seq2seq`` spec from an HF T5 or BART ``config.json`` dict.

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
        output_scale=d_model**-0.5 if scale else 1.0,
        output_bias=False,
    )


def _bart_spec(cfg: dict[str, Any], tie_output: bool) -> dict[str, Any]:
    # Options of older BART configs (and mBART's) that change the computation.
    for key, supported in (
        ("normalize_before", False),
        ("add_final_layer_norm", False),
        ("normalize_embedding", True),
        ("static_position_embeddings", False),
        ("add_bias_logits", False),
    ):
        if key in cfg and cfg[key] != supported:
            raise CheckpointError(
                f"BART {key}={cfg[key]!r} is not supported (that is mBART's or an older "
                f"layout); lmlab loads BART with {key}={supported}"
            )
    act = cfg.get("activation_function", "gelu")
    if act not in _ACTIVATIONS:
        raise CheckpointError(
            f"BART activation_function {act!r} is not supported; valid: {', '.join(_ACTIVATIONS)}"
        )
    sizes = {}
    for ours, enc, dec, default in (
        ("n_heads", "encoder_attention_heads", "decoder_attention_heads", 16),
        ("d_ff", "encoder_ffn_dim", "decoder_ffn_dim", 4096),
    ):
        sizes[ours] = cfg.get(enc, default)
        if cfg.get(dec, default) != sizes[ours]:
            raise CheckpointError(
                f"BART {enc}={sizes[ours]} differs from {dec}={cfg.get(dec, default)}; lmlab's "
                "encoder-decoder has one value for both stacks"
            )
    pad = cfg.get("pad_token_id", 1)
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
        norm="post",
        pad_id=pad,
        bos_id=_decoder_start(cfg, 2),
        eos_id=_single_id(cfg.get("eos_token_id", 2)),
        positions="learned",
        position_offset=BART_POSITION_OFFSET,
        norm_kind="layernorm",
        norm_eps=BART_NORM_EPS,
        activation=_ACTIVATIONS[act],
        gated=False,
        bias=True,
        scale_embeddings=bool(cfg.get("scale_embedding", False)),
        embed_norm=True,
        scale_attention=True,
        tie_output=tie_output,
        output_scale=1.0,
        output_bias=True,
    )


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
    ff = ("up", "wi_1") if spec["gated"] else ("up", "wi")
    ff_parts = [ff, ("down", "wo")] + ([("gate", "wi_0")] if spec["gated"] else [])
    m = {}
    for stack, ours_stack, n, blocks in (
        ("encoder", "encoder", spec["n_encoder_layers"], (("attn", "SelfAttention", "sub_attn"),)),
        (
            "decoder",
            "decoder",
            spec["n_decoder_layers"],
            (
                ("self_attn", "SelfAttention", "sub_self"),
                ("cross_attn", "EncDecAttention", "sub_cross"),
            ),
        ),
    ):
        m[f"{ours_stack}_relative.embed.weight"] = (
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        )
        m[f"{ours_stack}_norm.weight"] = f"{stack}.final_layer_norm.weight"
        for i in range(n):
            a, h = f"{ours_stack}.{i}.", f"{stack}.block.{i}.layer."
            for j, (attn, theirs, sub) in enumerate(blocks):
                for p in "qkvo":
                    m[f"{a}{attn}.{p}_proj.weight"] = f"{h}{j}.{theirs}.{p}.weight"
                m[f"{a}{sub}.norm.weight"] = f"{h}{j}.layer_norm.weight"
            j = len(blocks)  # the feed-forward sublayer comes last
            for ours, theirs in ff_parts:
                m[f"{a}ff.{ours}.weight"] = f"{h}{j}.DenseReluDense.{theirs}.weight"
            m[f"{a}sub_ff.norm.weight"] = f"{h}{j}.layer_norm.weight"
    return m


def _bart_keys(spec: dict[str, Any]) -> dict[str, str]:
    m = {"final_logits_bias": "final_logits_bias"}
    for stack, n in (("encoder", spec["n_encoder_layers"]), ("decoder", spec["n_decoder_layers"])):
        h = f"model.{stack}."
        m[f"{stack}_positions.weight"] = h + "embed_positions.weight"
        pairs = [(f"{stack}_embed_norm", "layernorm_embedding")]
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


def convert_seq2seq_state_dict(
    hf_state: dict[str, torch.Tensor], spec: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Rename an HF T5/BART state dict into lmlab ``Seq2Seq`` names for ``spec``.

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
    """An HF T5 / mT5 / BART folder -> (lmlab ``Seq2Seq`` in eval mode, tokenizer, info).

    The model is in ``dtype`` (default float32). The tokenizer is ``tokenizer.json``, BART's
    ``vocab.json`` + ``merges.txt`` or T5's SentencePiece ``spiece.model`` (None when the
    folder has none) and must fit the vocabulary. ``info``: the spec (``"model"``) and the
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
    layers = {**spec, "n_layers": spec["n_encoder_layers"] + spec["n_decoder_layers"]}
    check_config_against_weights(layers, stored, where, _hf_shapes)
    if state is None:
        state, _ = read_hf_weights(directory)
    state = _normalise(cfg["model_type"], state)
    if not spec["tie_output"] and _same(state.get("lm_head.weight"), _embedding(state, spec)):
        spec["tie_output"] = True  # a stored copy of the embeddings: tied after all
    model = build_model(spec, empty=True)  # load_converted fills every tensor (or fails)
    try:
        load_converted(model, convert_seq2seq_state_dict(state, spec))
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from e
    model.to(dtype or torch.float32).eval()
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
_BART_LAYOUT = dict(
    positions="learned",
    position_offset=BART_POSITION_OFFSET,
    norm="post",
    norm_kind="layernorm",
    norm_eps=BART_NORM_EPS,
    bias=True,
    embed_norm=True,
    scale_attention=True,
    gated=False,
    output_scale=1.0,
)


def _differences(spec: dict[str, Any], layout: dict[str, Any]) -> list[str]:
    return [f"{k}={spec[k]!r} (needs {v!r})" for k, v in layout.items() if spec[k] != v]


def to_hf_seq2seq(model: Seq2Seq) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The HF config dict and state dict of an lmlab ``Seq2Seq`` with T5's or BART's
    settings; any other settings are a ``ConfigError`` naming what differs."""
    spec = model_spec(model)
    t5, bart = _differences(spec, _T5_LAYOUT), _differences(spec, _BART_LAYOUT)
    d = spec["d_model"]
    if not t5:
        if (spec["activation"], spec["gated"]) not in _T5_FEED_FORWARD:
            t5.append(f"activation={spec['activation']!r} gated (T5 has no such feed_forward_proj)")
        # transformers' T5 scales the last state by d_model**-0.5 exactly when tied
        if not math.isclose(spec["output_scale"], d**-0.5 if spec["tie_output"] else 1.0):
            t5.append(
                f"output_scale={spec['output_scale']} with tie_output={spec['tie_output']} "
                f"(needs {d**-0.5:.6g} when tied, 1.0 when not)"
            )
    if not bart and spec["d_head"] not in (None, d // spec["n_heads"]):
        bart.append(f"d_head={spec['d_head']} (needs d_model / n_heads)")
    if t5 and bart:
        raise ConfigError(
            "this encoder-decoder has no Hugging Face class: exportable are T5's settings "
            f"({', '.join(f'{k}={v}' for k, v in _T5_LAYOUT.items())}) and BART's "
            f"({', '.join(f'{k}={v}' for k, v in _BART_LAYOUT.items())}); it differs from "
            f"T5 in {'; '.join(t5)}"
        )
    names = _key_map(spec)
    state = {names[k]: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if not spec["tie_output"]:
        # transformers >= 5 reads tie_word_embeddings=false as "untie every copy of the
        # embeddings" in BART: store the stacks' copies too (older versions ignore them)
        for alias in _aliases(spec):
            state[alias] = state[names["embed.weight"]].clone()
    common = dict(
        vocab_size=spec["vocab_size"],
        d_model=d,
        pad_token_id=spec["pad_id"],
        eos_token_id=spec["eos_id"],
        decoder_start_token_id=spec["bos_id"],
        is_encoder_decoder=True,
        tie_word_embeddings=spec["tie_output"],
    )
    if not t5:
        cfg = dict(
            model_type="t5",
            architectures=["T5ForConditionalGeneration"],
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
            **common,
        )
        return cfg, state
    state["final_logits_bias"] = (
        state["final_logits_bias"][None]
        if "final_logits_bias" in state
        else torch.zeros(1, spec["vocab_size"])
    )
    cfg = dict(
        model_type="bart",
        architectures=["BartForConditionalGeneration"],
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
        **common,
    )
    return cfg, state


def save_hf_seq2seq(
    model: Seq2Seq, directory: str | os.PathLike, tokenizer: Any | None = None
) -> Path:
    """Write an lmlab ``Seq2Seq`` with T5's or BART's settings as an HF folder that
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


def from_transformers_seq2seq(hf_model: nn.Module) -> Seq2Seq:
    """An lmlab ``Seq2Seq`` with the weights of a live transformers T5/BART model."""
    cfg = hf_model.config.to_dict()
    state = _normalise(cfg["model_type"], dict(hf_model.state_dict()))
    spec = spec_from_seq2seq_config(cfg)
    lm_head = state.get("lm_head.weight")
    spec["tie_output"] = lm_head is None or _same(lm_head, _embedding(state, spec))
    model = build_model(spec)
    load_converted(model, convert_seq2seq_state_dict(state, spec))
    return model.eval()
