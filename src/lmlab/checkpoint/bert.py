"""Import Hugging Face BERT checkpoints into lmlab's encoder, and embed sentences with them.

Covers ``BertModel`` and ``BertForMaskedLM`` (``model_type`` ``"bert"``, absolute
positions), including sentence-transformers folders such as all-MiniLM-L6-v2: their
``1_Pooling/config.json`` says how token states become one sentence vector, a
``Normalize`` module in ``modules.json`` says it is scaled to unit length, and
``sentence_bert_config.json`` gives the longest input used.

Every tensor of the source is consumed or named as dropped (``DROPPED``: BERT's pooler,
which lmlab replaces by ``pool``, the next-sentence head and the ``position_ids``
buffer), and every lmlab tensor is filled with one of the right shape; otherwise the
conversion fails naming the key. Weights are read with safetensors, never unpickled.

Parity: tests/checkpoint/test_bert.py (tiny random BertModel and BertForMaskedLM, and the
real all-MiniLM-L6-v2 against transformers with the same pooling).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lmlab.checkpoint.hf import (
    check_config_against_weights,
    load_converted,
    read_hf_config,
    read_hf_weights,
    state_shapes,
    stored_shapes,
)
from lmlab.checkpoint.io import check_tokenizer_fits
from lmlab.data.tokenizers import HFTokenizer
from lmlab.errors import CheckpointError
from lmlab.models import build_model
from lmlab.models.encoder import Encoder, pool

BERT_TYPES = ("bert",)
# Hugging Face hidden_act -> EncoderConfig.activation
_BERT_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
# Source tensors with no lmlab counterpart, dropped on purpose (matched by prefix).
DROPPED = ("pooler.", "cls.seq_relationship.", "embeddings.position_ids")


def spec_from_bert_config(
    hf_config: dict[str, Any],
    mlm_head: bool = False,
    pooler: bool = False,
    nsp_head: bool = False,
    head: str = "none",
) -> dict[str, Any]:
    """An lmlab ``encoder`` spec from a Hugging Face BERT ``config.json`` dict.

    ``mlm_head`` adds the masked-LM head (for ``BertForMaskedLM`` weights); ``pooler``,
    ``nsp_head`` and ``head`` ("sequence", "token", "span") the pooler and heads of
    ``BertForPreTraining``, ``BertForSequenceClassification``,
    ``BertForTokenClassification`` and ``BertForQuestionAnswering`` (``n_labels`` from the
    config's ``id2label``/``num_labels``). Dropout is 0: the imported model is for inference
    (the config's dropout rates are training settings).
    """
    cfg = hf_config
    kind = cfg.get("model_type")
    if kind not in BERT_TYPES:
        raise CheckpointError(
            f"model_type {kind!r} is not supported by the BERT importer; valid: {', '.join(BERT_TYPES)}"
        )
    pos = cfg.get("position_embedding_type", "absolute")
    if pos != "absolute":
        raise CheckpointError(
            f"BERT position_embedding_type {pos!r} is not supported; valid: absolute"
        )
    act = cfg.get("hidden_act", "gelu")
    if act not in _BERT_ACTIVATIONS:
        raise CheckpointError(
            f"BERT hidden_act {act!r} is not supported; valid: {', '.join(_BERT_ACTIVATIONS)}"
        )
    if cfg.get("is_decoder") or cfg.get("add_cross_attention"):
        raise CheckpointError(
            "BERT configs with is_decoder or add_cross_attention are not supported: "
            "lmlab's encoder is bidirectional with no cross-attention"
        )
    if cfg.get("tie_word_embeddings", True) is False and mlm_head:
        raise CheckpointError(
            "a BERT masked-LM head with untied word embeddings (tie_word_embeddings=false) is "
            "not supported: lmlab's head projects with the token embedding matrix"
        )
    required = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
    )
    absent = [key for key in required if key not in cfg]
    if absent:
        raise CheckpointError(f"the BERT config lacks {', '.join(absent)}")
    vocab = cfg["vocab_size"]
    pad = cfg.get("pad_token_id")
    return dict(
        family="encoder",
        vocab_size=vocab,
        d_model=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=cfg["num_attention_heads"],
        d_ff=cfg["intermediate_size"],
        max_seq_len=cfg["max_position_embeddings"],
        dropout=0.0,
        type_vocab_size=cfg.get("type_vocab_size", 2),
        norm_eps=cfg.get("layer_norm_eps", 1e-12),
        activation=_BERT_ACTIVATIONS[act],
        pad_id=pad if isinstance(pad, int) and 0 <= pad < vocab else None,
        pooling="mean",
        mlm_head=mlm_head,
        init_std=cfg.get("initializer_range", 0.02),
        pooler=pooler,
        nsp_head=nsp_head,
        head=head,
        n_labels=len(cfg["id2label"]) if "id2label" in cfg else cfg.get("num_labels", 2),
    )


def _head_keys(spec: dict[str, Any]) -> dict[str, str]:
    """lmlab name -> Hugging Face name of the pooler and the NSP and fine-tuning heads."""
    m = {}
    for flag, ours, theirs in (
        (spec.get("pooler", False), "pooler", "pooler.dense"),
        (spec.get("nsp_head", False), "nsp", "cls.seq_relationship"),
        (spec.get("head", "none") in ("sequence", "token"), "head", "classifier"),
        (spec.get("head", "none") == "span", "head", "qa_outputs"),
    ):
        if flag:
            m[f"{ours}.weight"], m[f"{ours}.bias"] = f"{theirs}.weight", f"{theirs}.bias"
    return m


def _key_map(n_layers: int, mlm_head: bool) -> dict[str, str]:
    """lmlab name -> Hugging Face name (without the ``bert.`` prefix). Both sides use the
    nn.Linear layout [out, in], so nothing is transposed."""
    m = {
        "tok_emb.weight": "embeddings.word_embeddings.weight",
        "pos_emb.weight": "embeddings.position_embeddings.weight",
        "type_emb.weight": "embeddings.token_type_embeddings.weight",
        "emb_norm.weight": "embeddings.LayerNorm.weight",
        "emb_norm.bias": "embeddings.LayerNorm.bias",
    }
    for i in range(n_layers):
        a, h = f"blocks.{i}.", f"encoder.layer.{i}."
        for ours, theirs in (
            ("attn.q_proj", "attention.self.query"),
            ("attn.k_proj", "attention.self.key"),
            ("attn.v_proj", "attention.self.value"),
            ("attn.o_proj", "attention.output.dense"),
            ("attn_norm", "attention.output.LayerNorm"),
            ("mlp.up_proj", "intermediate.dense"),
            ("mlp.down_proj", "output.dense"),
            ("mlp_norm", "output.LayerNorm"),
        ):
            m[a + ours + ".weight"] = h + theirs + ".weight"
            m[a + ours + ".bias"] = h + theirs + ".bias"
    if mlm_head:
        for ours, theirs in (("mlm.dense", "transform.dense"), ("mlm.norm", "transform.LayerNorm")):
            m[ours + ".weight"] = f"cls.predictions.{theirs}.weight"
            m[ours + ".bias"] = f"cls.predictions.{theirs}.bias"
    return m


def _normalise_name(key: str) -> str:
    """Strip BertForMaskedLM's ``bert.`` prefix; old TensorFlow-era files name LayerNorm
    parameters ``gamma`` and ``beta``."""
    key = key.removeprefix("bert.")
    if key.endswith("LayerNorm.gamma"):
        key = key[: -len("gamma")] + "weight"
    elif key.endswith("LayerNorm.beta"):
        key = key[: -len("beta")] + "bias"
    return key


def convert_bert_state_dict(
    spec: dict[str, Any], hf_state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face BERT state dict into lmlab ``Encoder`` names for ``spec``.

    Accepts keys with or without the ``bert.`` prefix. The masked-LM head
    (``cls.predictions.*``) is converted when ``spec["mlm_head"]``; its decoder weight, when
    stored, must equal the word embeddings (tied). Raises ``CheckpointError`` for a missing,
    unexpected or wrongly shaped tensor.
    """
    state: dict[str, torch.Tensor] = {}
    for key, tensor in hf_state.items():
        name = _normalise_name(key)
        if name in state:
            raise CheckpointError(f"tensor {name!r} appears twice in the checkpoint ({key!r})")
        state[name] = tensor
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        shapes = {k: tuple(v.shape) for k, v in build_model(spec).state_dict().items()}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint")
        used.add(name)
        return state[name]

    ours: dict[str, torch.Tensor] = {}
    key_map = {**_key_map(spec["n_layers"], spec.get("mlm_head", False)), **_head_keys(spec)}
    for name, hf_name in key_map.items():
        ours[name] = take(hf_name)
    if spec.get("mlm_head", False):
        # BertLMPredictionHead's decoder.bias and bias are one Parameter under two names;
        # a file may hold either or both.
        biases = [
            take(k) for k in ("cls.predictions.bias", "cls.predictions.decoder.bias") if k in state
        ]
        if not biases:
            take("cls.predictions.bias")  # raises, naming the tensor
        if len(biases) == 2 and not torch.equal(biases[0], biases[1]):
            raise CheckpointError(
                "cls.predictions.bias and cls.predictions.decoder.bias differ; lmlab's masked-LM "
                "head has one output bias"
            )
        ours["mlm.bias"] = biases[0]
        if "cls.predictions.decoder.weight" in state:
            decoder = take("cls.predictions.decoder.weight")
            if decoder.shape != ours["tok_emb.weight"].shape or not torch.equal(
                decoder, ours["tok_emb.weight"]
            ):
                raise CheckpointError(
                    "cls.predictions.decoder.weight differs from the word embeddings; lmlab's "
                    "masked-LM head ties them, so untied decoders are not supported"
                )
    leftover = sorted(
        k for k in set(state) - used if not k.startswith(DROPPED) or k in key_map.values()
    )
    if leftover:
        raise CheckpointError(
            f"unexpected tensors in the checkpoint: {', '.join(leftover[:8])}"
            + (f" and {len(leftover) - 8} more" if len(leftover) > 8 else "")
            + (
                " (a masked-LM head: convert with mlm_head=True)"
                if any(k.startswith("cls.predictions.") for k in leftover)
                else ""
            )
        )
    for name, tensor in ours.items():
        if tuple(tensor.shape) != shapes[name]:
            raise CheckpointError(
                f"tensor {_hf_name(spec, name)!r} has shape {tuple(tensor.shape)}, the encoder "
                f"built from the config expects {shapes[name]}"
            )
    return {k: v.contiguous() for k, v in ours.items()}


def _bert_hf_shapes(spec: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Hugging Face names (``bert.`` prefix removed) -> shapes that ``spec`` implies."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        shapes = {k: tuple(v.shape) for k, v in build_model(spec).state_dict().items()}
    key_map = {**_key_map(spec["n_layers"], spec.get("mlm_head", False)), **_head_keys(spec)}
    return {hf: shapes[ours] for ours, hf in key_map.items()}


def _hf_name(spec: dict[str, Any], name: str) -> str:
    """The Hugging Face name of lmlab tensor ``name`` (for error messages)."""
    if name == "mlm.bias":
        return "cls.predictions.bias"
    key_map = {**_key_map(spec["n_layers"], spec.get("mlm_head", False)), **_head_keys(spec)}
    return key_map.get(name, name)


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {str(file)!r}: {e}") from e


def _sentence_settings(directory: Path) -> dict[str, Any]:
    """Pooling, normalisation and maximum length of a sentence-transformers folder (mean,
    no normalisation and no limit when the files are absent, i.e. a plain BERT folder)."""
    pooling, normalize, max_length = "mean", False, None
    pooling_file = directory / "1_Pooling" / "config.json"
    if pooling_file.is_file():
        modes = {
            k for k, v in _read_json(pooling_file).items() if k.startswith("pooling_mode") and v
        }
        known = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
        if len(modes) != 1 or not modes <= set(known):
            raise CheckpointError(
                f"{str(pooling_file)!r} asks for pooling {sorted(modes)}; lmlab supports exactly "
                f"one of {', '.join(known)}"
            )
        pooling = known[modes.pop()]
    modules_file = directory / "modules.json"
    if modules_file.is_file():
        modules = _read_json(modules_file)
        normalize = any(str(m.get("type", "")).endswith(".Normalize") for m in modules)
    st_file = directory / "sentence_bert_config.json"
    if st_file.is_file():
        max_length = _read_json(st_file).get("max_seq_length")
    return {"pooling": pooling, "normalize": normalize, "max_length": max_length}


def load_hf_encoder(
    directory: str | os.PathLike, dtype: torch.dtype | None = None, pooler: bool = False
) -> tuple[Encoder, HFTokenizer | None, dict[str, Any]]:
    """Load a Hugging Face BERT folder -> ``(encoder, tokenizer or None, info)``.

    Reads ``config.json``, ``model.safetensors`` (a masked-LM head is kept when present)
    and ``tokenizer.json``. ``dtype`` casts the model; by default it keeps the stored
    floating dtype. ``info`` holds ``spec``, ``pooling`` (``"mean"``/``"cls"``, also set as
    the model's ``config.pooling``), ``normalize`` and ``max_length`` (from a
    sentence-transformers folder), and ``dropped`` (source tensors with no counterpart).
    ``pooler`` keeps BERT's pooler when the file has one (the input of a sequence head).
    """
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{str(directory)!r} has no config.json; it is not a BERT folder")
    # The same checks as every HF folder: remote code ignored, headers validated, shards,
    # pickled weights only through weights_only, and the config checked against the
    # headers before any tensor is read or the model built.
    hf_config = read_hf_config(directory)
    stored, hf_state = stored_shapes(directory), None
    if not stored:  # pytorch_model.bin has no header: read it (weights_only) to see shapes
        hf_state, sources = read_hf_weights(directory)
        stored = state_shapes(hf_state, sources)
    stored = {_normalise_name(k): v for k, v in stored.items()}
    settings = _sentence_settings(directory)
    mlm_head = any(k.startswith("cls.predictions.") for k in stored)
    pooler = pooler and "pooler.dense.weight" in stored
    spec = spec_from_bert_config(hf_config, mlm_head=mlm_head, pooler=pooler)
    spec["pooling"] = settings["pooling"]
    check_config_against_weights(spec, stored, repr(str(directory)), _bert_hf_shapes)
    if hf_state is None:
        hf_state, _ = read_hf_weights(directory)
    state = convert_bert_state_dict(spec, hf_state)
    model = build_model(spec)
    if dtype is None:
        floats = {t.dtype for t in state.values() if t.dtype.is_floating_point}
        dtype = floats.pop() if len(floats) == 1 else None
    if dtype is not None:
        model.to(dtype)
    load_converted(model, state)
    tokenizer = None
    if (directory / "tokenizer.json").is_file():
        tokenizer = HFTokenizer.from_file(directory / "tokenizer.json")
    check_tokenizer_fits(tokenizer, model, str(directory))
    dropped = sorted(
        k
        for k in hf_state
        if _normalise_name(k).startswith(DROPPED)
        and _normalise_name(k) not in _head_keys(spec).values()
    )
    info = {"spec": spec, **settings, "dropped": dropped, "source": str(directory)}
    return model.eval(), tokenizer, info


@torch.no_grad()
def sentence_embeddings(
    model: Encoder,
    tokenizer: HFTokenizer,
    texts: Sequence[str],
    pooling: str | None = None,
    normalize: bool = True,
    batch_size: int = 32,
    max_length: int | None = None,
) -> torch.Tensor:
    """One vector per text -> [N, D] in the model's dtype, on its device.

    Each text is encoded with the template (``[CLS] ... [SEP]``), truncated to
    ``max_length`` tokens (default the model's ``max_seq_len``), run through the encoder in
    padded batches of ``batch_size`` and pooled with ``pool``: ``pooling`` defaults to the
    model's ``config.pooling`` (what ``load_hf_encoder`` read from ``1_Pooling``).
    """
    texts = list(texts)
    pooling = pooling or model.config.pooling
    max_length = max_length or model.config.max_seq_len
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer.encode_batch(texts[start : start + batch_size], max_length=max_length)
        ids, mask, types = (
            torch.from_numpy(batch[k]).to(device)
            for k in ("ids", "attention_mask", "token_type_ids")
        )
        hidden = model(ids, attention_mask=mask, token_type_ids=types)  # (B, T, D)
        out.append(pool(hidden, mask, kind=pooling, normalize=normalize))  # (B, D)
    if not out:
        return torch.zeros(0, model.config.d_model, device=device)
    return torch.cat(out)
