"""The Python API in a few functions: load a model, train one, generate, score.

    >>> import lmlab
    >>> lm = lmlab.load("runs/demo")            # a run or checkpoint directory
    >>> lm.generate("ROMEO:", top_p=0.9, temperature=0.8, seed=0)
    >>> for piece in lm.stream("JULIET:", max_new_tokens=50): print(piece, end="")
    >>> lm.perplexity("To be, or not to be")

Every CLI command is one of these functions; ``lmlab.cli`` only parses and prints.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from tqdm.auto import tqdm

# Importing finetune registers the PEFT structures with checkpoint/ (so a LoRA, adapter or
# soft-prompt checkpoint loads); the facade is the layer above both.
import lmlab.finetune  # noqa: F401
from lmlab.checkpoint.arpa import write_arpa
from lmlab.checkpoint.gguf_export import save_gguf
from lmlab.checkpoint.hf import HF_TOKENIZER_KINDS, save_chat_template, save_hf
from lmlab.checkpoint.io import checkpoint_dir, latest_checkpoint, save_checkpoint
from lmlab.checkpoint.quantized import save_quantized
from lmlab.checkpoint.seq2seq import save_hf_seq2seq
from lmlab.data import (
    encode_to_file,
    load_corpus,
    load_tokenizer,
    read_tokens,
    split_text,
    train_tokenizer,
)
from lmlab.errors import ConfigError
from lmlab.fileio import atomic_write_json
from lmlab.finetune import LoRALinear
from lmlab.finetune.peft import merged_model
from lmlab.generate.likelihood import token_nll
from lmlab.lm import LM, default_dtype, load
from lmlab.models import abilities, build_model, get_preset, require_causal_lm
from lmlab.quant.quantize import QUANTIZED_LAYERS, model_size_bytes, quantize_model
from lmlab.seeds import seeded
from lmlab.train import TrainConfig, TrainResult, distributed
from lmlab.train import train as _train_loop
from lmlab.train.recipes import with_recipe
from lmlab.train.run import RunLock, StopSignals, ensure_run_dir

__all__ = [
    "LM",
    "default_dtype",
    "export_gguf",
    "export_hf",
    "load",
    "model_spec_from",
    "prepare_data",
    "quantize",
    "train",
]


def export_hf(
    model: str | os.PathLike, out_dir: str | os.PathLike, merge: bool = False
) -> tuple[Path, list[str]]:
    """Write a decoder that ``load`` takes as a Hugging Face folder -> (folder, notes).

    transformers loads the result with ``AutoModelForCausalLM.from_pretrained(out_dir)``
    and computes the same logits (tests/checkpoint/test_hf.py); its tokenizer (char, byte,
    BPE or SentencePiece) loads with ``AutoTokenizer`` and encodes as lmlab does; the chat
    template travels with it, and ``generation_config.json`` makes ``generate`` stop where
    lmlab stops (a chat model's end-of-turn token among the eos ids).

    ``merge``: a model with quantized layers (QLoRA's NF4 base, a quantized checkpoint)
    is written dequantized to float32, with its LoRA merged in (``merged_model``); without
    it such a model is refused. LoRA over a float base is merged when loaded anyway.

    An encoder-decoder is written for ``AutoModelForSeq2SeqLM`` as the Hugging Face class
    whose settings it has (``lmlab.checkpoint.seq2seq``): the defaults as Marian
    (post-norm) or Pegasus (pre-norm), T5's or BART's settings as T5 or BART; others are
    refused naming what exports.
    """
    notes = []
    # Two stages, each seconds for a real model: a bar, shown on a terminal.
    with tqdm(total=2, desc="export", unit="stage", disable=None, leave=False) as bar:
        bar.set_postfix_str("loading")
        lm = load(model)
        if _has_quantized_or_lora(lm.model):
            if not merge:
                raise ConfigError(
                    f"{str(model)!r} has quantized or LoRA layers, which a Hugging Face folder "
                    "cannot hold; pass merge=True (--merge) to write them dequantized and merged"
                )
            lm.model = merged_model(lm.model)
            notes.append(
                "quantized layers were dequantized to float32 and LoRA merged into them: the "
                "folder computes what the quantized model does, up to float rounding"
            )
        bar.update()
        bar.set_postfix_str(f"writing {out_dir}")
        if abilities(lm.model).kind == "seq2seq":
            out = save_hf_seq2seq(lm.model, out_dir, lm.tokenizer)
            notes.append(
                "an encoder-decoder: load it with transformers.AutoModelForSeq2SeqLM.from_pretrained"
            )
        else:
            out = save_hf(lm.model, out_dir, lm.tokenizer, lm.chat_template)
        bar.update()
    if lm.tokenizer is None:
        notes.append("the model has no tokenizer, so none was written")
    elif getattr(lm.tokenizer, "kind", None) not in HF_TOKENIZER_KINDS:
        notes.append(
            f"the {lm.tokenizer.kind} tokenizer has no Hugging Face form here and was not "
            "written; encode text with lmlab (lmlab.data.load_tokenizer) for this model"
        )
    return out, notes


def export_gguf(
    model: str | os.PathLike,
    out_file: str | os.PathLike,
    gguf_type: Literal["f32", "f16", "q8_0", "q4_0"] = "f16",
) -> tuple[Path, list[str]]:
    """Write a Llama-layout decoder that ``load`` takes as one GGUF file -> (file, notes).

    llama.cpp (and Ollama, LM Studio) run the file; ``load`` reads it back. ``gguf_type``
    stores the matrices as float32, float16, or in llama.cpp's Q8_0 / Q4_0 blocks. A
    byte-level BPE tokenizer and the chat template travel with it
    (``lmlab.checkpoint.gguf_export``); the notes say what could not.
    """
    lm = load(model, device="cpu")
    return save_gguf(lm.model, out_file, lm.tokenizer, lm.chat_template, gguf_type)


def export_arpa(model: str | os.PathLike, out_file: str | os.PathLike) -> tuple[Path, list[str]]:
    """Write an n-gram model that ``load`` takes as an ARPA file -> (file, notes).

    KenLM (``kenlm.Model``), SRILM and ``load`` read the file and score as lmlab does
    (``lmlab.checkpoint.arpa``; parity test with the ``kenlm`` module). A word tokenizer
    names the words; without one, id i is written as the word ``"i"``.
    """
    lm = load(model, device="cpu")
    if getattr(lm.model.config, "smoothing", None) is None or not hasattr(lm.model, "keys_1"):
        raise ConfigError(
            f"{str(model)!r} is not an n-gram model: ARPA files hold n-gram tables only"
        )
    notes = []
    words = getattr(lm.tokenizer, "words", None)
    if words is None:
        notes.append("the model has no word tokenizer: id i is written as the word 'i'")
    return write_arpa(lm.model, out_file, words), notes


def _has_quantized_or_lora(model) -> bool:
    return any(isinstance(m, (*QUANTIZED_LAYERS, LoRALinear)) for m in model.modules())


def quantize(
    model: str | os.PathLike,
    format: Literal["int8", "int4", "nf4"],
    out: str | os.PathLike,
) -> tuple[Path, dict[str, int]]:
    """Quantize a model's linear layers and save it as a checkpoint -> (folder, sizes).

    ``model`` is anything ``load`` takes (an lmlab checkpoint, an HF folder, a GGUF file,
    a pretrained name), loaded in float32; ``format`` is int8, int4 or nf4
    (``lmlab.quant.quantize_model``: every linear layer but the output head). ``load``
    and every command read the folder back (``lmlab.checkpoint.quantized``), with the
    logits of the quantized model. ``sizes``: bytes of the weights before and after
    (``model_size_bytes``).
    """
    lm = load(model, dtype="float32", keep_quantized=False, device="cpu")
    before = model_size_bytes(lm.model)
    quantize_model(lm.model, format, progress=True)
    path = save_quantized(lm.model, out, lm.tokenizer)
    if lm.chat_template is not None:
        save_chat_template(lm.chat_template, path)
    return path, {"before": before, "after": model_size_bytes(lm.model)}


# ----------------------------------------------------------------------------- training


def model_spec_from(model: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A model spec from a preset name, a JSON/YAML file holding a spec, or a run's
    config.json (the model that run trained), plus overrides."""
    path = Path(model)
    if path.suffix in (".json", ".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"model spec file {model!r} does not exist")
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
    tokenizer: Literal["char", "byte", "bpe", "word"] = "char",
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
    tokenizer: Literal["char", "byte", "bpe", "word"] = "char",
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
        tokenizer: char, byte, BPE trained with the ``tokenizers`` library, or word (for
            n-grams: one sentence per line, ``lmlab.data.tokenizers.WordTokenizer``).
        vocab_size: BPE vocabulary size, or the most ids a word tokenizer keeps (rarer
            words become ``<unk>``); char and byte tokenizers fix their own.
        val_fraction: the last this fraction of the text is the validation split.
        model_overrides: config fields replacing the preset's, e.g. ``{"n_layers": 6}``.
        config: the trainer's settings (out_dir, steps, batch size, lr, resume, ...);
            None: the preset's tuned recipe (``lmlab.train.recipes``) over the defaults.
    """
    config = config or with_recipe(TrainConfig(), model, {})
    spec = model_spec_from(model, model_overrides)  # a bad preset fails before any work
    ranks = distributed.setup(config.device)  # under torchrun: rank 0 prepares and writes
    # One writer per run folder, from the data preparation on (the trainer takes it again);
    # SIGTERM while preparing stops cleanly too (the lock goes with the process).
    lock = RunLock(ensure_run_dir(config.out_dir)) if ranks.main else contextlib.nullcontext()
    with lock, StopSignals():
        prepare = lambda: prepare_data(data, config.out_dir, tokenizer, vocab_size, val_fraction)
        ranks.from_main(lambda: prepare() and None)  # the other ranks then read its files
        tok, train_ids, val_ids = prepare()
        # The run's seed fixes the initial weights too (reliability item 31), without
        # touching the caller's global RNG.
        spec = {**spec, "vocab_size": tok.vocab_size}
        if spec.get("family") == "ngram" and tok.kind == "word":
            # sentences as KenLM counts them: no n-gram spans a line's </s>
            spec.setdefault("sentence_end_id", tok.eos_id)
        with seeded(config.seed):
            net = build_model(spec)
        require_causal_lm(net, "lmlab train (next-token prediction)")
        if hasattr(net, "fit") and not any(p.requires_grad for p in net.parameters()):
            if ranks.enabled:
                raise ConfigError(
                    f"a {spec['family']} model is counted, not trained: run it in one process "
                    "(without torchrun)"
                )
            return _fit_count_model(net, train_ids, val_ids, config, tok)
        return _train_loop(net, train_ids, val_ids, config, tokenizer=tok)


def _fit_count_model(net, train_ids, val_ids, config: TrainConfig, tok) -> TrainResult:
    """Count-based models (n-grams) have nothing to train: count once, score, save."""
    run_dir = Path(config.out_dir)
    if latest_checkpoint(run_dir) is not None and config.resume == "never":
        raise ConfigError(f"{str(run_dir)!r} already holds a fitted model: use another out_dir")
    start = time.perf_counter()
    net.fit(train_ids)
    wall = time.perf_counter() - start
    val_losses = []
    if getattr(net.config, "smoothing", None) != "stupid_backoff":  # scores: no loss to give
        val = token_nll(net, val_ids, stride=config.seq_len, context=config.seq_len)
        val_losses.append((0, val.mean().item()))
    ckpt = save_checkpoint(checkpoint_dir(run_dir, 0), net, tokenizer=tok)
    return TrainResult(
        step=0,
        val_losses=val_losses,
        checkpoint=ckpt,
        wall_time_s=wall,
        tokens_per_s=len(train_ids) / max(wall, 1e-9),
        stop_reason="fitted",  # counted, not trained
    )
