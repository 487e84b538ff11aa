"""Model families and named presets, in one registry.

A *spec* is a plain JSON dict: ``{"family": "transformer", **config_fields}``. It is what
``config.json`` stores under ``"model"``, what presets are, and what ``build_model`` takes,
so a checkpoint, a preset and a YAML file all describe a model the same way.

    >>> spec = get_preset("gpt-char-tiny")
    >>> model = build_model({**spec, "vocab_size": 65})
    >>> model_spec(model)["family"]
    'transformer'
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from lmlab.errors import ConfigError, closest

# family name -> (config dataclass, model class); filled by register_family when each family
# module is imported (lmlab.models' __init__ imports them all), never mutated afterwards.
_FAMILIES: dict[str, tuple[type, type[nn.Module]]] = {}


def register_family(name: str, config_cls: type, model_cls: type[nn.Module]) -> None:
    """Make ``name`` buildable from a spec; the class learns its family name (for errors)."""
    _FAMILIES[name] = (config_cls, model_cls)
    model_cls.family = name


def families() -> list[str]:
    return sorted(_FAMILIES)


def build_model(spec: dict[str, Any], empty: bool = False) -> nn.Module:
    """Build a freshly initialised model from a spec dict (``family`` + config fields).

    ``empty=True`` skips the random initialisation (built on the meta device, then given
    uninitialised CPU memory): for loaders that overwrite every tensor, where drawing 135M
    random numbers first would cost seconds.
    """
    if empty:
        with torch.device("meta"):
            model = build_model(spec)
        shared: dict[int, list[str]] = {}  # to_empty unties tied weights: re-tie them
        for name, p in model.named_parameters(remove_duplicate=False):
            shared.setdefault(id(p), []).append(name)
        model = model.to_empty(device="cpu")
        for first, *others in shared.values():
            for name in others:
                owner, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(owner), leaf, model.get_parameter(first))
        return model
    spec = dict(spec)
    family = spec.pop("family", None)
    if family not in _FAMILIES:
        raise ConfigError(
            f"unknown model family {family!r}{closest(str(family), list(_FAMILIES))}; "
            f"valid: {', '.join(sorted(_FAMILIES))}"
        )
    config_cls, model_cls = _FAMILIES[family]
    return model_cls(make_config(config_cls, spec, where=f"model family {family!r}"))


def make_config(config_cls: type, fields: dict[str, Any], where: str = "config"):
    """Instantiate a config dataclass, failing on unknown keys with the closest valid name."""
    valid = [f.name for f in dataclasses.fields(config_cls)]
    for key in fields:
        if key not in valid:
            raise ConfigError(
                f"unknown field {key!r} for {where}{closest(key, valid)}; valid: {', '.join(valid)}"
            )
    return config_cls(**fields)


def model_spec(model: nn.Module) -> dict[str, Any]:
    """The spec that rebuilds ``model`` (its family name and config fields)."""
    cls = type(model)
    if getattr(cls, "__name__", "").startswith("FSDP") and len(cls.__bases__) == 2:
        cls = cls.__bases__[
            1
        ]  # FSDP2's fully_shard swaps in the class FSDP<Family>(FSDPModule, Family)
    for name, (_, model_cls) in _FAMILIES.items():
        if cls is model_cls:
            return {"family": name, **dataclasses.asdict(model.config)}
    raise ConfigError(f"{type(model).__name__} is not a registered lmlab model family")


# Named presets. vocab_size is filled from the tokenizer when a run starts (None here).
PRESETS: dict[str, dict[str, Any]] = {
    # The demo's model: a small character-level GPT trained in minutes on 2 CPU cores.
    "gpt-char-tiny": dict(
        family="transformer",
        vocab_size=None,
        d_model=192,
        n_layers=4,
        n_heads=6,
        d_ff=768,
        max_seq_len=128,
        dropout=0.0,
        norm="layernorm",
        mlp="gelu_tanh",
        pos="learned",
        bias=True,
        tie_embeddings=True,
    ),
    # nanoGPT's CPU shape (its README's "I only have a MacBook" run: 4 x 128, block 64, no
    # biases, exact GELU), with the training recipe that reaches that run's validation loss
    # fastest (lmlab.train.recipes, bench/train_to_loss.py).
    "gpt-char-fast": dict(
        family="transformer",
        vocab_size=None,
        d_model=128,
        n_layers=4,
        n_heads=4,
        d_ff=512,
        max_seq_len=64,
        dropout=0.0,
        norm="layernorm",
        mlp="gelu",
        pos="learned",
        bias=False,
        tie_embeddings=True,
    ),
    # The same size (4 x 128, block 64, about 0.8 M parameters) in Llama's parts: rotary
    # positions, RMSNorm and a SwiGLU MLP (d_ff 344: the parameters of GELU's 512). It needs
    # fewer steps to nanoGPT's loss than gpt-char-fast (bench/train_to_loss.py).
    "llama-char-fast": dict(
        family="transformer",
        vocab_size=None,
        d_model=128,
        n_layers=4,
        n_heads=4,
        d_ff=344,
        max_seq_len=64,
        dropout=0.0,
        norm="rmsnorm",
        mlp="swiglu",
        pos="rope",
        bias=False,
        tie_embeddings=True,
    ),
    # The benchmark's larger shape (nanoGPT's shakespeare-char model).
    "gpt-char-small": dict(
        family="transformer",
        vocab_size=None,
        d_model=384,
        n_layers=6,
        n_heads=6,
        d_ff=1536,
        max_seq_len=256,
        dropout=0.2,
        norm="layernorm",
        mlp="gelu_tanh",
        pos="learned",
        bias=True,
        tie_embeddings=True,
    ),
    # GPT-2 small (124M parameters with its 50257-token vocabulary).
    "gpt2-124m": dict(
        family="transformer",
        vocab_size=50257,
        d_model=768,
        n_layers=12,
        n_heads=12,
        d_ff=3072,
        max_seq_len=1024,
        dropout=0.0,
        norm="layernorm",
        norm_eps=1e-5,
        mlp="gelu_tanh",
        pos="learned",
        bias=True,
        tie_embeddings=True,
    ),
    # A small Llama: RoPE, RMSNorm, SwiGLU, grouped-query attention (2 kv heads), no biases.
    "llama-small": dict(
        family="transformer",
        vocab_size=None,
        d_model=256,
        n_layers=6,
        n_heads=8,
        n_kv_heads=2,
        d_ff=704,
        max_seq_len=256,
        dropout=0.0,
        norm="rmsnorm",
        mlp="swiglu",
        pos="rope",
        bias=False,
        tie_embeddings=False,
    ),
    # The ladder of models below the transformer, sized for characters (issue 3's rungs).
    "ngram-char": dict(family="ngram", vocab_size=None, order=5, smoothing="kneser_ney"),
    # Words (lmlab train --tokenizer word): sentences end at </s>, as KenLM counts them.
    "ngram-word": dict(family="ngram", vocab_size=None, order=3, smoothing="modified_kneser_ney"),
    "bigram-char": dict(family="bigram", vocab_size=None),
    "mlp-char": dict(family="mlp", vocab_size=None, d_model=64, context=8, d_ff=512),
    "bag-char": dict(family="bag", vocab_size=None, d_model=64, d_ff=512, reduce="mean"),
    "bag-sum-char": dict(family="bag", vocab_size=None, d_model=64, d_ff=512, reduce="sum"),
    "rnn-char": dict(family="recurrent", vocab_size=None, cell="rnn", d_model=256, n_layers=2),
    "gru-char": dict(family="recurrent", vocab_size=None, cell="gru", d_model=256, n_layers=2),
    "lstm-char": dict(family="recurrent", vocab_size=None, cell="lstm", d_model=256, n_layers=2),
    # Tiny BERT encoders to pretrain from scratch with MLM and NSP (lmlab.train.bert).
    "bert-tiny": dict(
        family="encoder",
        vocab_size=None,
        d_model=128,
        n_layers=2,
        n_heads=2,
        d_ff=512,
        max_seq_len=128,
        dropout=0.0,
        pooling="cls",
    ),
    "bert-mini": dict(
        family="encoder",
        vocab_size=None,
        d_model=256,
        n_layers=4,
        n_heads=4,
        d_ff=1024,
        max_seq_len=128,
        dropout=0.1,
        pooling="cls",
    ),
    # A small encoder-decoder (Vaswani et al.'s layout) for the generated seq2seq tasks.
    "seq2seq-tiny": dict(
        family="seq2seq",
        vocab_size=None,
        d_model=128,
        n_heads=4,
        n_encoder_layers=2,
        n_decoder_layers=2,
        d_ff=512,
        max_seq_len=64,
        dropout=0.0,
        norm="pre",
    ),
    # The same size with T5 v1.1's settings and with BART's: `lmlab export` writes them as
    # T5ForConditionalGeneration / BartForConditionalGeneration (seq2seq-tiny: Pegasus).
    "t5-tiny": dict(
        family="seq2seq",
        vocab_size=None,
        d_model=128,
        n_heads=4,
        n_encoder_layers=2,
        n_decoder_layers=2,
        d_ff=512,
        max_seq_len=64,
        dropout=0.0,
        norm="pre",
        positions="relative",
        norm_kind="rmsnorm",
        norm_eps=1e-6,
        activation="gelu_tanh",
        gated=True,
        bias=False,
        scale_embeddings=False,
        scale_attention=False,
        tie_output=False,
    ),
    "bart-tiny": dict(
        family="seq2seq",
        vocab_size=None,
        d_model=128,
        n_heads=4,
        n_encoder_layers=2,
        n_decoder_layers=2,
        d_ff=512,
        max_seq_len=64,
        dropout=0.0,
        norm="post",
        positions="learned",
        position_offset=2,
        activation="gelu",
        embed_norm=True,
        scale_embeddings=False,
        output_bias=True,
    ),
    # Half as wide: with lmlab seq2seq's defaults it learns reversal to 100% held-out exact
    # match in 600 steps (lesson 20).
    "seq2seq-mini": dict(
        family="seq2seq",
        vocab_size=None,
        d_model=64,
        n_heads=4,
        n_encoder_layers=2,
        n_decoder_layers=2,
        d_ff=256,
        max_seq_len=64,
        dropout=0.0,
        norm="pre",
    ),
    # SmolLM2-135M's shape (Llama architecture), for imported weights.
    "smollm2-135m": dict(
        family="transformer",
        vocab_size=49152,
        d_model=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        d_ff=1536,
        max_seq_len=8192,
        dropout=0.0,
        norm="rmsnorm",
        mlp="swiglu",
        pos="rope",
        rope_theta=100000.0,
        bias=False,
        tie_embeddings=True,
    ),
}


def get_preset(name: str) -> dict[str, Any]:
    """A copy of the preset spec called ``name``; an unknown name lists the valid ones."""
    if name not in PRESETS:
        raise ConfigError(
            f"unknown model preset {name!r}{closest(name, list(PRESETS))}; "
            f"valid: {', '.join(PRESETS)}"
        )
    return dict(PRESETS[name])
