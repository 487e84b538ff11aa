"""Convert between Hugging Face transformers checkpoints and lmlab's transformer.

Covers the GPT-2 family (``GPT2LMHeadModel``: fused ``c_attn`` in Conv1D layout, i.e.
weights stored [in, out]) and the Llama family (``LlamaForCausalLM`` and configs that share
its layout). Every key of the source is consumed and every lmlab parameter is filled with a
tensor of the right shape, or the conversion fails naming the key: no silent partial load.

The conversion works on plain dicts (an HF ``config.json`` and a state dict), so the same
code serves a live transformers model (``from_transformers``, used by the parity tests) and
files on disk. Parity: tests/models/test_transformer.py.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from lmlab.checkpoint.io import (
    check_finite,
    check_tokenizer_fits,
    is_finite,
    read_safetensors_header,
)
from lmlab.data.chat import CHAT_TEMPLATE_FILE
from lmlab.data.tokenizers import TOKENIZER_CONFIG_FILE, find_tokenizer
from lmlab.errors import CheckpointError, DataError
from lmlab.fileio import atomic_write_json, atomic_write_text, atomic_write_with
from lmlab.models import build_model, model_spec

log = logging.getLogger(__name__)

GPT2_TYPES = ("gpt2",)
LLAMA_TYPES = ("llama", "mistral", "qwen2")
"""Llama-layout decoders: Mistral is Llama with a sliding window (lmlab keeps the context
within it, where full attention is the same), Qwen2 adds biases to q, k and v."""

_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def spec_from_hf_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """An lmlab model spec from a Hugging Face config dict (``config.json``)."""
    kind = cfg.get("model_type")
    if kind in GPT2_TYPES:
        act = cfg.get("activation_function", "gelu_new")
        if act not in _GPT2_ACTIVATIONS:
            raise CheckpointError(
                f"GPT-2 activation {act!r} is not supported; valid: {list(_GPT2_ACTIVATIONS)}"
            )
        d = cfg["n_embd"]
        return dict(
            family="transformer",
            vocab_size=cfg["vocab_size"],
            d_model=d,
            n_layers=cfg["n_layer"],
            n_heads=cfg["n_head"],
            d_ff=cfg.get("n_inner") or 4 * d,
            max_seq_len=cfg["n_positions"],
            norm="layernorm",
            norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
            mlp=_GPT2_ACTIVATIONS[act],
            pos="learned",
            bias=True,
            tie_embeddings=cfg.get("tie_word_embeddings", True),
        )
    if kind in LLAMA_TYPES:
        if cfg.get("hidden_act", "silu") != "silu":
            raise CheckpointError(
                f"Llama hidden_act {cfg['hidden_act']!r} is not supported; valid: silu"
            )
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type", "default") != "default":
            raise CheckpointError(
                f"RoPE scaling {rope.get('rope_type')!r} is not supported; valid: default"
            )
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise CheckpointError("Llama configs with attention_bias or mlp_bias are not supported")
        n_heads = cfg["num_attention_heads"]
        context = cfg["max_position_embeddings"]
        window = cfg.get("sliding_window")
        if kind == "qwen2" and not cfg.get("use_sliding_window", False):
            window = None
        if window:  # attention over the last `window` tokens: the same as full attention
            context = min(context, int(window))  # as long as the context fits in it
        return dict(
            family="transformer",
            vocab_size=cfg["vocab_size"],
            d_model=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            d_head=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            d_ff=cfg["intermediate_size"],
            max_seq_len=context,
            norm="rmsnorm",
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            mlp="swiglu",
            pos="rope",
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            bias=False,
            qkv_bias=True if kind == "qwen2" else None,
            tie_embeddings=cfg.get("tie_word_embeddings", False),
        )
    raise CheckpointError(
        f"model_type {kind!r} is not supported; valid: {', '.join(GPT2_TYPES + LLAMA_TYPES)}"
    )


def _gpt2_key_map(n_layers: int) -> dict[str, tuple[str, bool]]:
    """lmlab name -> (HF name, transpose). Conv1D stores [in, out]; nn.Linear [out, in]."""
    m = {
        "tok_emb.weight": ("transformer.wte.weight", False),
        "pos_emb.weight": ("transformer.wpe.weight", False),
        "norm.weight": ("transformer.ln_f.weight", False),
        "norm.bias": ("transformer.ln_f.bias", False),
        "lm_head.weight": ("lm_head.weight", False),
    }
    for i in range(n_layers):
        a, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            m[a + ours + ".weight"] = (h + theirs + ".weight", False)
            m[a + ours + ".bias"] = (h + theirs + ".bias", False)
        for ours, theirs in (
            ("attn.o_proj", "attn.c_proj"),
            ("mlp.up_proj", "mlp.c_fc"),
            ("mlp.down_proj", "mlp.c_proj"),
        ):
            m[a + ours + ".weight"] = (h + theirs + ".weight", True)
            m[a + ours + ".bias"] = (h + theirs + ".bias", False)
    return m


def _llama_key_map(n_layers: int, qkv_bias: bool = False) -> dict[str, tuple[str, bool]]:
    m = {
        "tok_emb.weight": ("model.embed_tokens.weight", False),
        "norm.weight": ("model.norm.weight", False),
        "lm_head.weight": ("lm_head.weight", False),
    }
    for i in range(n_layers):
        a, h = f"blocks.{i}.", f"model.layers.{i}."
        m[a + "attn_norm.weight"] = (h + "input_layernorm.weight", False)
        m[a + "mlp_norm.weight"] = (h + "post_attention_layernorm.weight", False)
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            m[a + f"attn.{p}.weight"] = (h + f"self_attn.{p}.weight", False)
            if qkv_bias and p != "o_proj":
                m[a + f"attn.{p}.bias"] = (h + f"self_attn.{p}.bias", False)
        for p in ("gate_proj", "up_proj", "down_proj"):
            m[a + f"mlp.{p}.weight"] = (h + f"mlp.{p}.weight", False)
    return m


def _key_map(spec: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    if spec["pos"] == "learned":
        return _gpt2_key_map(spec["n_layers"])
    return _llama_key_map(spec["n_layers"], bool(spec.get("qkv_bias")))


def convert_hf_state_dict(
    hf_state: dict[str, torch.Tensor], spec: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Rename (and re-lay-out) an HF state dict into lmlab names for the model ``spec``."""
    hf_state = {
        k: v for k, v in hf_state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))
    }
    ours: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    key_map = _key_map(spec)
    if spec["pos"] == "learned":  # GPT-2's fused c_attn [D, 3D] splits into q, k, v
        d = spec["d_model"]
        for i in range(spec["n_layers"]):
            h = f"transformer.h.{i}.attn.c_attn."
            w, b = _take(hf_state, h + "weight", used), _take(hf_state, h + "bias", used)
            for j, p in enumerate(("q_proj", "k_proj", "v_proj")):
                ours[f"blocks.{i}.attn.{p}.weight"] = w[:, j * d : (j + 1) * d].t()
                ours[f"blocks.{i}.attn.{p}.bias"] = b[j * d : (j + 1) * d]
    for name, (hf_name, transpose) in key_map.items():
        if name == "lm_head.weight" and spec["tie_embeddings"]:
            used.add(hf_name)  # tied: HF may or may not store it; ours comes from tok_emb
            continue
        t = _take(hf_state, hf_name, used)
        ours[name] = t.t() if transpose else t
    leftover = sorted(set(hf_state) - used)
    if leftover:
        raise CheckpointError(f"unexpected tensors in the checkpoint: {', '.join(leftover[:8])}")
    return {k: v.contiguous() for k, v in ours.items()}


def _take(state: dict[str, torch.Tensor], key: str, used: set[str]) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"tensor {key!r} is missing from the checkpoint")
    used.add(key)
    return state[key]


def load_converted(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``model``, checking that every key and shape matches."""
    params = model.state_dict()
    _check_converted(model, params, state)
    with torch.no_grad():
        for name, t in state.items():
            params[name].copy_(t)


def assign_converted(
    model: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None
) -> None:
    """Make ``state``'s tensors the parameters of ``model`` (built on the meta device),
    checking keys and shapes as ``load_converted`` does, each cast to ``dtype`` (None: kept)
    and popped from ``state`` as it goes; tied parameters stay tied.

    Nothing is copied: the weights are in memory once (``load_converted`` into an empty
    model holds them twice at its peak, and a cast after it a third time in part).
    Tensors the model already holds off the meta device (a layer put in beforehand, such
    as a quantized one read straight from its file) are neither expected nor replaced.
    """
    params = {k: v for k, v in model.state_dict().items() if v.is_meta}
    _check_converted(model, params, state)
    shared: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(name)
    for name in list(state):
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        t = state.pop(name)
        t = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        if leaf in module._parameters:
            requires_grad = module._parameters[leaf].requires_grad
            module._parameters[leaf] = nn.Parameter(t, requires_grad=requires_grad)
        else:
            module._buffers[leaf] = t
    for first, *others in shared.values():
        for name in others:
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner), leaf, model.get_parameter(first))
    left = [n for n, t in model.state_dict().items() if t.is_meta]
    if left:
        raise CheckpointError(f"checkpoint lacks tensors: {', '.join(left[:8])}")


def _check_converted(
    model: nn.Module, params: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
) -> None:
    """Every tensor ``model`` needs is in ``state``, and nothing else, with its shape."""
    missing = [k for k in params if k not in state and not _is_tied_head(model, k)]
    if missing:
        raise CheckpointError(f"checkpoint lacks tensors: {', '.join(missing[:8])}")
    for name, t in state.items():
        if name not in params:
            raise CheckpointError(f"checkpoint has unexpected tensor {name!r}")
        if params[name].shape != t.shape:
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(t.shape)}, the model expects {tuple(params[name].shape)}"
            )


def _is_tied_head(model: nn.Module, key: str) -> bool:
    return key == "lm_head.weight" and getattr(model.config, "tie_embeddings", False)


def from_transformers(hf_model: nn.Module) -> nn.Module:
    """An lmlab model with the weights of a live transformers causal LM (float32 copy)."""
    spec = spec_from_hf_config(hf_model.config.to_dict())
    model = build_model(spec)
    load_converted(model, convert_hf_state_dict(dict(hf_model.state_dict()), spec))
    return model.eval()


def to_hf(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The HF config dict and state dict of an lmlab transformer (GPT-2 or Llama layout)."""
    spec = model_spec(model)
    lesson_only = {"pos": ("sinusoidal", "none"), "norm": ("none",), "residual": (False,)}
    for field, values in lesson_only.items():
        if spec.get(field) in values:
            raise CheckpointError(
                f"{field}={spec[field]!r} has no Hugging Face layout (GPT-2: learned positions, "
                "Llama: rope; both with norms and residual connections)"
            )
    state = model.state_dict()
    hf_state: dict[str, torch.Tensor] = {}
    for name, (hf_name, transpose) in _key_map(spec).items():
        if name in state:
            hf_state[hf_name] = state[name].t() if transpose else state[name]
    if spec["pos"] == "learned":
        if spec.get("n_kv_heads") not in (None, spec["n_heads"]) or spec.get("d_head") not in (
            None,
            spec["d_model"] // spec["n_heads"],
        ):
            raise CheckpointError(
                "GPT-2 layout needs n_kv_heads == n_heads and d_head == d_model / n_heads"
            )
        for i in range(spec["n_layers"]):
            a = f"blocks.{i}.attn."
            hf_state[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat(
                [state[a + p + ".weight"] for p in ("q_proj", "k_proj", "v_proj")]
            ).t()
            hf_state[f"transformer.h.{i}.attn.c_attn.bias"] = torch.cat(
                [state[a + p + ".bias"] for p in ("q_proj", "k_proj", "v_proj")]
            )
        cfg = dict(
            model_type="gpt2",
            architectures=["GPT2LMHeadModel"],
            vocab_size=spec["vocab_size"],
            n_embd=spec["d_model"],
            n_layer=spec["n_layers"],
            n_head=spec["n_heads"],
            n_inner=spec["d_ff"],
            n_positions=spec["max_seq_len"],
            layer_norm_epsilon=spec["norm_eps"],
            activation_function={"gelu_tanh": "gelu_new", "gelu": "gelu"}[spec["mlp"]],
            tie_word_embeddings=spec["tie_embeddings"],
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    else:
        qwen = bool(spec.get("qkv_bias"))  # q, k, v biases alone: the Qwen2 layout
        cfg = dict(
            model_type="qwen2" if qwen else "llama",
            architectures=["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
            vocab_size=spec["vocab_size"],
            hidden_size=spec["d_model"],
            num_hidden_layers=spec["n_layers"],
            num_attention_heads=spec["n_heads"],
            num_key_value_heads=spec.get("n_kv_heads") or spec["n_heads"],
            head_dim=model.config.head_size,
            intermediate_size=spec["d_ff"],
            max_position_embeddings=spec["max_seq_len"],
            rms_norm_eps=spec["norm_eps"],
            rope_theta=spec["rope_theta"],
            hidden_act="silu",
            tie_word_embeddings=spec["tie_embeddings"],
            attention_bias=False,
            mlp_bias=False,
        )
    return cfg, {k: v.detach().clone().contiguous() for k, v in hf_state.items()}


# ----------------------------------------------------------------------------- directories

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
HF_PICKLE = "pytorch_model.bin"
HF_GENERATION_CONFIG = "generation_config.json"
HF_TOKENIZER_KINDS = ("char", "byte", "bpe", "sentencepiece")
"""Tokenizer kinds with a Hugging Face file form (tokenizer.json, tokenizer.model)."""
# config.json keys that ask a loader to import Python code shipped with the checkpoint.
REMOTE_CODE_KEYS = ("auto_map", "trust_remote_code", "custom_pipelines")


def hf_model_type(path: str | os.PathLike) -> str | None:
    """The ``model_type`` of a Hugging Face folder's ``config.json``; None if it has none."""
    file = Path(path) / HF_CONFIG
    if not file.is_file():
        return None
    try:
        kind = json.loads(file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def is_hf_directory(path: str | os.PathLike) -> bool:
    """A folder with a Hugging Face ``config.json`` (one that names a ``model_type``)."""
    return hf_model_type(path) is not None


def read_hf_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of an HF model folder, with remote-code keys removed.

    lmlab never imports code that comes with a checkpoint: ``auto_map`` (the custom
    modelling files that transformers runs under ``trust_remote_code=True``) is dropped
    with a warning, and the architecture is chosen from ``model_type`` alone.
    """
    file = Path(directory) / HF_CONFIG
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"cannot read {str(file)!r}: {e}") from e
    except ValueError as e:
        raise CheckpointError(f"{str(file)!r} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_type"), str):
        raise CheckpointError(f"{str(file)!r} is not a Hugging Face config (no 'model_type')")
    remote = [k for k in REMOTE_CODE_KEYS if k in cfg]
    if remote:
        log.warning(
            "%s asks for remote code (%s); lmlab never runs code from a checkpoint and loads "
            "model_type %r with its own implementation",
            file,
            ", ".join(remote),
            cfg["model_type"],
        )
        cfg = {k: v for k, v in cfg.items() if k not in remote}
    return cfg


def read_hf_weights(
    directory: str | os.PathLike,
) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """Every tensor of an HF model folder -> (state dict, the file each tensor came from).

    Reads ``model.safetensors``, or the shards listed by ``model.safetensors.index.json``
    (each header checked against its file first), or, failing both, ``pytorch_model.bin``
    with ``torch.load(weights_only=True)``, which refuses any pickled object that is not a
    tensor or a plain container, so a payload in the file never runs.
    """
    directory = Path(directory)
    files = safetensors_files(directory)
    if not files:
        return _read_pickled(directory / HF_PICKLE)
    state: dict[str, torch.Tensor] = {}
    sources: dict[str, Path] = {}
    for file in files:
        header = read_safetensors_header(file)
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                # a bar for large folders, shown on a terminal (tqdm's disable=None)
                names = tqdm(
                    header, desc=f"loading {file.name}", unit="tensor", disable=None, leave=False
                )
                for name in names:
                    if name in state:
                        raise CheckpointError(
                            f"tensor {name!r} is in both {str(sources[name])!r} and {str(file)!r}"
                        )
                    state[name], sources[name] = f.get_tensor(name), file
        except CheckpointError:
            raise
        except Exception as e:  # safetensors' own errors on a corrupt file
            raise CheckpointError(f"cannot read weights from {str(file)!r}: {e}") from e
        check_finite(file, [n for n in header if not is_finite(state[n])])
    return state, sources


def safetensors_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of an HF model folder: ``model.safetensors`` or the shards
    that ``model.safetensors.index.json`` lists; an empty list when the folder has only
    ``pytorch_model.bin``. A folder with no weights at all is a ``CheckpointError``."""
    directory = Path(directory)
    if (directory / HF_INDEX).is_file():
        return _shards(directory)
    if (directory / HF_WEIGHTS).is_file():
        return [directory / HF_WEIGHTS]
    if (directory / HF_PICKLE).is_file():
        return []
    raise CheckpointError(
        f"{str(directory)!r} has no weights: looked for {HF_WEIGHTS}, {HF_INDEX} and {HF_PICKLE}"
    )


# safetensors dtype names -> how torch prints them, so that one message fits both sources.
_SAFETENSORS_DTYPES = {
    "F64": "torch.float64",
    "F32": "torch.float32",
    "F16": "torch.float16",
    "BF16": "torch.bfloat16",
    "F8_E4M3": "torch.float8_e4m3fn",
    "F8_E5M2": "torch.float8_e5m2",
    "I64": "torch.int64",
    "I32": "torch.int32",
    "I16": "torch.int16",
    "I8": "torch.int8",
    "U8": "torch.uint8",
    "BOOL": "torch.bool",
}
_FLOAT_DTYPE_NAMES = tuple(v for v in _SAFETENSORS_DTYPES.values() if "float" in v)


def stored_shapes(directory: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str, Path]]:
    """``name -> (shape, dtype as torch prints it, file)`` of every tensor in an HF
    folder's safetensors, from the headers alone (checked against the file sizes; no
    tensor is read). Empty for a folder whose weights are a ``pytorch_model.bin``, which
    has no header to read."""
    found: dict[str, tuple[tuple[int, ...], str, Path]] = {}
    for file in safetensors_files(directory):
        for name, entry in read_safetensors_header(file).items():
            dtype = _SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"])
            found.setdefault(name, (tuple(entry["shape"]), dtype, file))
    return found


def check_config_against_weights(
    spec: dict[str, Any],
    stored: dict[str, tuple[tuple[int, ...], str, Path]],
    where: str,
    hf_shapes: Callable[[dict[str, Any]], dict[str, tuple[int, ...]]],
) -> None:
    """Refuse a config.json that describes another model than the weights hold, before
    the model is built: every tensor the spec implies that the files hold must have the
    implied shape and a floating dtype. ``stored`` is ``stored_shapes`` (or the same from
    a loaded state dict); ``hf_shapes(spec)`` gives the HF names and shapes the spec
    implies. A config promising a hidden size of 196,608 over a small file thus fails in
    milliseconds instead of allocating that model. The layer count is bounded first by the
    number of stored tensors (each layer has several), so that computing the expected
    names takes time proportional to the file's header. Missing and leftover tensors are
    left to the converter, which names them.
    """
    if not 0 <= spec["n_layers"] <= len(stored):
        raise CheckpointError(
            f"{where}: config.json describes a {spec['n_layers']}-layer model, but the "
            f"weights hold only {len(stored)} tensors: the config does not describe these files"
        )
    try:
        expected = hf_shapes(spec)
    except (ValueError, TypeError) as e:  # the spec itself is invalid (a config field)
        raise CheckpointError(f"{where}: config.json describes no valid model: {e}") from e
    for name, want in expected.items():
        if name not in stored:
            continue
        shape, dtype, file = stored[name]
        if shape != tuple(want):
            raise CheckpointError(
                f"{str(file)!r}: tensor {name!r} has shape {shape}, but config.json implies "
                f"{tuple(want)}: the config does not describe these weights"
            )
        if dtype not in _FLOAT_DTYPE_NAMES:
            raise CheckpointError(
                f"{str(file)!r}: tensor {name!r} has dtype {dtype}; weights must be floating point"
            )


def _decoder_hf_shapes(spec: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF names -> shapes of the decoder ``spec`` (built on the meta device: no memory)."""
    with torch.device("meta"):
        _, expected = to_hf(build_model(spec))
    return {name: tuple(t.shape) for name, t in expected.items()}


def state_shapes(
    state: dict[str, torch.Tensor], sources: dict[str, Path]
) -> dict[str, tuple[tuple[int, ...], str, Path]]:
    """``stored_shapes`` of tensors already read (``read_hf_weights``' two results)."""
    return {n: (tuple(t.shape), str(t.dtype), sources[n]) for n, t in state.items()}


def _shards(directory: Path) -> list[Path]:
    index = directory / HF_INDEX
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{str(index)!r} is not a valid shard index: {e}") from e
    files = []
    for name in names:
        file = directory / str(name)
        # a shard name is a file in this folder: never "../elsewhere" or an absolute path
        if Path(str(name)).name != name or not file.is_file():
            raise CheckpointError(
                f"{str(index)!r} lists shard {name!r}, which is not in the folder"
            )
        files.append(file)
    return files


def _read_pickled(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for a payload; others for a corrupt file
        raise CheckpointError(
            f"refusing {str(file)!r}: it is not a plain state dict of tensors, and lmlab never "
            f"unpickles other objects (they can run code). Convert it to safetensors. ({e})"
        ) from e
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{str(file)!r} is not a state dict (names -> tensors)")
    check_finite(file, [n for n, t in state.items() if not is_finite(t)])
    return state, dict.fromkeys(state, file)


def load_hf(
    directory: str | os.PathLike, dtype: torch.dtype | None = None
) -> tuple[nn.Module, Any | None, dict[str, Any]]:
    """An HF decoder folder (GPT-2, Llama, Mistral, Qwen2) -> (model, tokenizer, info).

    The model is lmlab's transformer in eval mode, in ``dtype`` (default float32); the
    tokenizer comes from ``tokenizer.json``, GPT-2's ``vocab.json`` + ``merges.txt`` or a
    SentencePiece ``tokenizer.model`` (``find_tokenizer``; None when there is none), and
    must fit the model's vocabulary (``check_tokenizer_fits``); ``info`` holds the spec
    (``"model"``), the HF config and the folder's ``tokenizer_config.json``.
    """
    directory = Path(directory)
    cfg = read_hf_config(directory)
    spec = spec_from_hf_config(cfg)
    # The headers first, so that a config promising a far larger model than the files
    # hold fails before any tensor is read or the model is built.
    stored, state = stored_shapes(directory), None
    if not stored:  # pytorch_model.bin has no header: read it (weights_only) to see shapes
        state, sources = read_hf_weights(directory)
        stored = state_shapes(state, sources)
    check_config_against_weights(spec, stored, repr(str(directory)), _decoder_hf_shapes)
    if state is None:
        state, _ = read_hf_weights(directory)
    model = build_model(spec, empty=True)  # load_converted fills every tensor (or fails)
    try:
        load_converted(model, convert_hf_state_dict(state, spec))
    except CheckpointError as e:
        raise CheckpointError(f"{str(directory)!r}: {e}") from e
    model.to(dtype or torch.float32).eval()
    tokenizer = find_tokenizer(directory)
    check_tokenizer_fits(tokenizer, model, str(directory))
    tok_config = {}
    if (directory / "tokenizer_config.json").is_file():
        try:
            tok_config = json.loads((directory / "tokenizer_config.json").read_text("utf-8"))
        except ValueError as e:
            raise CheckpointError(f"{str(directory / 'tokenizer_config.json')!r}: {e}") from e
    info = {"format": "hf", "path": str(directory), "model": spec, "hf_config": cfg}
    return model, tokenizer, {**info, "tokenizer_config": tok_config}


def save_hf(
    model: nn.Module,
    directory: str | os.PathLike,
    tokenizer: Any | None = None,
    chat_template: Any | None = None,
) -> Path:
    """Write an lmlab decoder as an HF folder that ``transformers`` loads with
    ``AutoModelForCausalLM.from_pretrained(directory)``.

    Files: config.json; model.safetensors (float32, the tied output matrix stored once);
    generation_config.json (``generation_config``: the ids that end generation, padding);
    and with a tokenizer of a kind in ``HF_TOKENIZER_KINDS``, its tokenizer.json (a
    SentencePiece one: tokenizer.model) and tokenizer_config.json, plus the
    ``chat_template`` when given (``save_chat_template``). Each file is written atomically,
    with ordinary permissions (0644 under umask 022).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg, state = to_hf(model)
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    state = {k: v.float().contiguous() for k, v in state.items()}
    atomic_write_with(
        directory / HF_WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"})
    )
    generation = generation_config(tokenizer, chat_template)
    special = {k: v for k, v in generation.items() if k.endswith("_token_id")}
    atomic_write_json(directory / HF_CONFIG, {**cfg, **special, "torch_dtype": "float32"})
    atomic_write_json(directory / HF_GENERATION_CONFIG, generation)
    if tokenizer is not None and getattr(tokenizer, "kind", None) in HF_TOKENIZER_KINDS:
        tokenizer.save(directory)
        if chat_template is not None:
            save_chat_template(chat_template, directory)
    return directory


def generation_config(tokenizer: Any | None, chat_template: Any | None = None) -> dict[str, Any]:
    """What ``generation_config.json`` tells transformers' ``generate``: stop where lmlab
    stops, pad with a token the model knows.

    ``eos_token_id`` lists every id that ends a reply: the tokenizer's ``eos_id``, then for
    a chat model the token that closes an assistant turn (``end_of_turn_id``), which is
    what lmlab's chat stops on; one id is written as an int, several as a list. SmolLM2
    (eos ``<|im_end|>``) -> ``{"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}``.
    ``pad_token_id`` is the tokenizer's pad id, else the first eos id (transformers would
    pick that itself, with a warning). ``bos_token_id`` is the template's bos_token when it
    is one token. Without a tokenizer there is nothing to say: ``{}``.
    """
    if tokenizer is None:
        return {}
    eos = [tokenizer.eos_id] if getattr(tokenizer, "eos_id", None) is not None else []
    bos = None
    if chat_template is not None:
        bos = _single_id(tokenizer, chat_template.bos_token)
        for end in (
            _single_id(tokenizer, chat_template.eos_token),
            end_of_turn_id(tokenizer, chat_template),
        ):
            if end is not None and end not in eos:
                eos.append(end)
    config: dict[str, Any] = {}
    if bos is not None:
        config["bos_token_id"] = bos
    if eos:
        config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    pad = getattr(tokenizer, "pad_id", None)
    if pad is not None or eos:
        config["pad_token_id"] = pad if pad is not None else eos[0]
    return config


def end_of_turn_id(tokenizer: Any, chat_template: Any) -> int | None:
    """The special token a chat template puts right after an assistant's reply, or None.

    Renders a user message and a reply, and looks at the text after the reply: ChatML
    (SmolLM2, Qwen) -> ``"<|im_end|>\\n"``, whose first token is ``<|im_end|>``; Llama 3 ->
    ``<|eot_id|>``. The token must be one of the tokenizer's special added tokens, so a
    plain newline or space after the reply never becomes a stop token.
    """
    reply = "lmlab-reply-7f3a"
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": reply}]
    try:
        text = chat_template.render(messages, add_generation_prompt=False)
    except DataError:  # a template that wants a system message, tools, ...: no guess
        return None
    after = text.partition(reply)[2]
    library = getattr(tokenizer, "tokenizer", None)
    if not after or not hasattr(library, "get_added_tokens_decoder"):
        return None
    for i, token in library.get_added_tokens_decoder().items():
        if token.special and after.startswith(token.content):
            return i
    return None


def _single_id(tokenizer: Any, token: str | None) -> int | None:
    """The id of ``token`` when the tokenizer encodes it to exactly one id, else None."""
    if not token:
        return None
    try:
        ids = tokenizer.encode(token)
    except DataError:  # a char tokenizer without that character
        return None
    return ids[0] if len(ids) == 1 else None


def save_chat_template(chat_template: Any, directory: str | os.PathLike) -> None:
    """Add a ``ChatTemplate`` to an HF folder where transformers and ``lmlab.load`` look
    for it: its source in ``chat_template.jinja`` (transformers 4.43 and later read it
    first) and in ``tokenizer_config.json`` (older versions), with its special tokens."""
    directory = Path(directory)
    file = directory / TOKENIZER_CONFIG_FILE
    tok_config = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    tok_config["chat_template"] = chat_template.source
    for name, value in chat_template.special.items():
        tok_config[name] = tok_config.get(name) or value
    atomic_write_json(file, tok_config)
    atomic_write_text(directory / CHAT_TEMPLATE_FILE, chat_template.source)
