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

from typing import Any

import torch
from torch import nn

from lmlab.errors import CheckpointError
from lmlab.models import build_model, model_spec

GPT2_TYPES = ("gpt2",)
LLAMA_TYPES = ("llama",)

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
        return dict(
            family="transformer",
            vocab_size=cfg["vocab_size"],
            d_model=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            d_head=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            d_ff=cfg["intermediate_size"],
            max_seq_len=cfg["max_position_embeddings"],
            norm="rmsnorm",
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            mlp="swiglu",
            pos="rope",
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            bias=False,
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


def _llama_key_map(n_layers: int) -> dict[str, tuple[str, bool]]:
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
        for p in ("gate_proj", "up_proj", "down_proj"):
            m[a + f"mlp.{p}.weight"] = (h + f"mlp.{p}.weight", False)
    return m


def _key_map(spec: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    return (_gpt2_key_map if spec["pos"] == "learned" else _llama_key_map)(spec["n_layers"])


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
    with torch.no_grad():
        for name, t in state.items():
            params[name].copy_(t)


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
        cfg = dict(
            model_type="llama",
            architectures=["LlamaForCausalLM"],
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
