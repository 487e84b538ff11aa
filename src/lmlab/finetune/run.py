"""``lmlab finetune`` and ``lmlab.finetune.finetune``: adapt a model to instruction data.

    finetune("smollm2", "tasks.jsonl", method="lora", config=TrainConfig(max_steps=200))

One function for every method: it loads the model (float32), reads and encodes the JSONL
examples through the model's chat template (loss on the responses only), applies the
method, trains with the foundation trainer (``supervised=``), and writes to ``out_dir``:

- ``checkpoints/``: the trainer's checkpoints (for an exact resume);
- ``adapter/`` for LoRA and QLoRA: only A and B and their config (``load_adapter``);
- ``model/``: the fine-tuned model as an lmlab checkpoint with its tokenizer and chat
  template (``lmlab.load(out_dir + "/model")``, ``lmlab chat``).

Every method but full and kl trains a small part of the model: its checkpoints (the
trainer's and ``model/``) store only the tensors that train plus a reference to the base
(``lmlab.checkpoint.base``: the name or path given as ``model`` and the sha256 of its weight
files), and ``lmlab.load`` rebuilds base plus tuned tensors (QLoRA: the base quantized to
NF4 as here; LoRA merged in, as the run's own ``result.lm``).

Methods: ``full`` (every weight), ``kl`` (full, plus beta KL(policy || the frozen
original) per response token), ``lora``, ``qlora`` (LoRA over an NF4-quantized frozen base),
``adapter`` (Houlsby bottlenecks), ``bitfit`` (biases only).
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from lmlab.checkpoint.base import attach_base, base_entry
from lmlab.checkpoint.hf import save_chat_template
from lmlab.checkpoint.io import save_checkpoint
from lmlab.data.instructions import (
    EncodedExample,
    encode_dataset,
    example_from_row,
    load_examples,
    split_examples,
    template_for,
)
from lmlab.data.instructions import pack as pack_examples
from lmlab.data.tasks import accuracy
from lmlab.errors import ConfigError, closest
from lmlab.finetune import (
    LoRAConfig,
    PrefixTuning,
    PromptTuning,
    apply_adapters,
    apply_bitfit,
    apply_lora,
    apply_selective,
    save_adapter,
    trainable_parameters,
    unload_lora,
)
from lmlab.finetune.sft import kl_sft_loss, sft_loss, supervised_data
from lmlab.lm import LM, load
from lmlab.models.contract import require_gradients
from lmlab.models.transformer import Transformer
from lmlab.quant.quantize import quantize_model
from lmlab.seeds import seeded
from lmlab.train import TrainConfig, TrainResult, distributed, train

METHODS = ("full", "kl", "lora", "qlora", "adapter", "prompt", "prefix", "bitfit", "selective")
_WHOLE = ("full", "kl")  # methods that train every weight: their checkpoints hold them all
_WRAPPING = ("prompt", "prefix")  # methods that wrap the model (no packed rows)


@dataclass
class FinetuneResult:
    train: TrainResult
    method: str
    trainable: int
    total: int
    examples: dict[str, int]
    """How many train / val examples were used, and how many were skipped (item 12)."""
    out_dir: Path
    val_loss_before: float | None = None
    """Validation loss (nats per response token) of the model before fine-tuning."""
    model_dir: Path | None = None
    adapter_dir: Path | None = None
    notes: list[str] = field(default_factory=list)
    lm: LM | None = None
    """The fine-tuned model with its tokenizer and chat template (an ``lmlab.LM``; for
    LoRA, merged), ready to generate."""


def check_method(method: str, methods: tuple[str, ...] = METHODS) -> None:
    """Raise ConfigError naming the valid ``methods`` (and the closest) unless ``method``
    is one of them."""
    if method not in methods:
        raise ConfigError(
            f"method={method!r} is not one of {', '.join(methods)}{closest(str(method), methods)}"
        )


def prepare_method(
    model: nn.Module,
    method: str,
    lora: LoRAConfig = LoRAConfig(),
    bottleneck: int = 64,
    n_virtual: int = 20,
    prompt_init: list[int] | None = None,
    select: tuple[str, ...] = ("*norm*",),
) -> nn.Module:
    """Apply ``method`` to ``model`` (freezing what does not train) -> the model to train:
    ``model`` itself changed in place, or a soft-prompt wrapper around it (prompt, prefix).
    """
    require_gradients(model, f"fine-tuning ({method})")
    check_method(method)
    if method in ("full", "kl"):
        return model.requires_grad_(True)
    if method == "bitfit":
        return apply_bitfit(model)
    if method == "selective":
        return apply_selective(model, select)
    if method == "prompt":
        n = None if prompt_init else n_virtual
        return PromptTuning(model, n_tokens=n, init_ids=prompt_init)
    if method == "prefix":
        return PrefixTuning(model, n_tokens=n_virtual)
    if method == "adapter":
        return apply_adapters(model, bottleneck=bottleneck)
    if method == "qlora":
        model = quantize_model(model, "nf4")
    return apply_lora(model, lora)


def finetune(
    model: str = "smollm2",
    data: str = "train.jsonl",
    method: Literal[
        "full", "kl", "lora", "qlora", "adapter", "prompt", "prefix", "bitfit", "selective"
    ] = "lora",
    val_data: str | None = None,
    val_fraction: float = 0.1,
    max_len: int = 256,
    pack: bool = False,
    beta: float = 0.1,
    lora: LoRAConfig = LoRAConfig(),
    bottleneck: int = 64,
    n_virtual: int = 20,
    prompt_init: str | None = None,
    select: tuple[str, ...] = ("*norm*",),
    config: TrainConfig | None = None,
) -> FinetuneResult:
    """Fine-tune a model on instruction data (Alpaca or chat JSONL).

    Args:
        model: anything ``lmlab.load`` takes (a checkpoint, an HF folder, "smollm2").
        data: a JSONL file (or a folder of them): Alpaca rows or chat ``messages``.
        method: full, kl (KL-regularised), lora, qlora, adapter (Houlsby), prompt (soft
            prompt), prefix (per-layer key/value prefix), bitfit (biases) or selective
            (the parameters matching ``select``).
        val_data: held-out JSONL; without it, ``val_fraction`` of ``data`` is held out.
        max_len: examples are cut to this many tokens (an example left with no response
            token is skipped with a warning).
        pack: pack short training examples into rows of up to ``max_len`` tokens (fewer
            padding tokens, so faster epochs); each example still attends only to itself
            and positions restart at each (transformers only).
        beta: the KL weight of method "kl".
        lora: LoRA's rank, scale, dropout and target layers (methods lora and qlora).
        bottleneck: the adapters' hidden width.
        n_virtual: number of soft-prompt tokens (prompt) or prefix slots (prefix).
        prompt_init: text whose token embeddings start the soft prompt (prompt; its
            length then sets the number of virtual tokens); None: random vocabulary rows.
        select: glob patterns of the parameters that train (selective), e.g. "*norm*".
        config: the trainer's settings (out_dir, max_steps, lr, batch_size, ...).
    """
    config = config or TrainConfig(out_dir="runs/finetune", max_steps=200, lr=1e-4)
    check_method(method)
    ranks = distributed.command_ranks(config, "finetune")  # under torchrun: DDP, rank 0 writes
    lm = load(model, dtype="float32", keep_quantized=False, device=config.device)
    if pack:
        _check_packable(method, lm.model)
    train_enc, val_enc, skipped = load_encoded(lm, data, val_data, val_fraction, max_len, config)
    if pack:
        train_enc = pack_examples(train_enc, max_len)
    pad_id = lm.tokenizer.eos_id if lm.tokenizer.eos_id is not None else 0

    net = lm.model.train()
    reference = copy.deepcopy(net).eval() if method == "kl" else None
    init_ids = lm.tokenizer.encode(prompt_init) if prompt_init else None
    with seeded(config.seed):  # LoRA, adapter, soft-prompt weights: the run's seed fixes them
        net = prepare_method(net, method, lora, bottleneck, n_virtual, init_ids, select)
    keep_base_reference(net, lm, method)
    trainable, total, _ = trainable_parameters(net)
    loss = kl_sft_loss(reference, beta) if method == "kl" else sft_loss
    supervised = supervised_data(train_enc, val_enc, loss, config, pad_id)
    before = _mean_loss(net, loss, supervised.val) if supervised.val else None
    result = train(net, None, None, config, tokenizer=lm.tokenizer, supervised=supervised)

    out = Path(config.out_dir)
    counts = {"train": len(train_enc), "val": len(val_enc), "skipped": skipped}
    counts["val_scored"] = min(len(val_enc), config.eval_batches * config.batch_size)
    done = FinetuneResult(result, method, trainable, total, counts, out, before, lm=lm)
    if ranks.main:
        done.adapter_dir, done.model_dir = write_tuned_model(net, lm, out, method)
    ranks.barrier()  # the model is written before any rank goes on
    if method == "qlora":
        done.notes.append(
            "QLoRA's base is NF4: lmlab.load(model/) quantizes the base as here; the adapter "
            "(adapter/) applies to the float model too, and `lmlab export --merge` merges it "
            "into the dequantized base"
        )
    return done


def keep_base_reference(net: nn.Module, lm: LM, method: str) -> None:
    """Record on ``net`` the source ``lm`` was loaded from (``checkpoint.base``) unless
    ``method`` trains every weight, so that its checkpoints hold only what trains."""
    source = lm.config.get("loaded_from")
    attach_base(net, base_entry(source) if source and method not in _WHOLE else None)


def _check_packable(method: str, model: nn.Module) -> None:
    """Packed rows need a transformer (to mask attention between examples) and no soft
    prompt (it would precede only a row's first example)."""
    if method in _WRAPPING:
        raise ConfigError(
            f"pack=True does not combine with method={method!r} (the soft prompt would "
            "precede only the first packed example); use pack=False"
        )
    if not isinstance(model, Transformer):
        raise ConfigError(
            f"pack=True needs a transformer (it masks attention between packed examples); "
            f"{type(model).__name__} cannot: use pack=False"
        )


def load_encoded(
    lm: LM,
    data: str,
    val_data: str | None,
    val_fraction: float,
    max_len: int,
    config: TrainConfig,
) -> tuple[list[EncodedExample], list[EncodedExample], int]:
    """Training and validation examples encoded through ``lm``'s chat template, and how
    many of both were skipped. Without ``val_data``, ``val_fraction`` of ``data`` is held
    out (a split seeded by ``config.seed``)."""
    template = template_for(lm.tokenizer, lm.chat_template)
    examples = load_examples(data)
    if val_data is not None:
        train_examples, val_examples = examples, load_examples(val_data)
    else:
        train_examples, val_examples, _ = split_examples(examples, val_fraction, 0.0, config.seed)
    train_enc, skipped = encode_dataset(train_examples, lm.tokenizer, template, max_len)
    val_enc, val_skipped = encode_dataset(val_examples, lm.tokenizer, template, max_len)
    return train_enc, val_enc, skipped + val_skipped


def write_tuned_model(
    net: nn.Module, lm: LM, out_dir: Path, method: str
) -> tuple[Path | None, Path | None]:
    """Write a tuned ``net`` under ``out_dir``, hand it to ``lm`` -> (adapter_dir, model_dir).

    LoRA and QLoRA write ``adapter/`` (A and B only, ``load_adapter``). Every method writes
    ``model/``: an lmlab checkpoint with the tokenizer and chat template (``lmlab.load``,
    ``lmlab chat``), holding only the trained tensors when ``net`` records its base. LoRA
    is then merged into the model handed to ``lm`` (which forgets its base: every weight
    of it is now tuned).
    """
    adapter_dir = None
    if method in ("lora", "qlora"):
        adapter_dir = save_adapter(net, out_dir / "adapter")
    model_dir = out_dir / "model"
    save_checkpoint(model_dir, net, tokenizer=lm.tokenizer)
    if lm.chat_template is not None:
        save_chat_template(lm.chat_template, model_dir)
    if method == "lora":
        net = attach_base(unload_lora(net, merge=True), None)
    lm.model = net.eval()
    return adapter_dir, model_dir


def task_accuracy(
    lm, rows, max_new_tokens: int = 16, batch_size: int = 1
) -> tuple[float, list[str]]:
    """Greedy answers of ``lm`` to task rows (``lmlab.data.tasks``), graded exactly ->
    (accuracy, answers). Each row is asked as one user turn of the model's chat template
    (or the plain template); ``batch_size`` rows are decoded together (left-padded, so
    the answers are those of one row at a time up to rounding, in a fraction of the time).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} is invalid: must be an integer >= 1")
    prompts = task_prompts(lm, rows)
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        answers += lm.generate(batch, max_new_tokens=max_new_tokens, temperature=0)
    return accuracy(rows, answers), answers


def task_prompts(lm, rows) -> list[str]:
    """Task rows (Alpaca ``instruction``/``input``) rendered as one user turn of ``lm``'s chat
    template (or the plain template), ready for the reply: the layout ``finetune`` trains."""
    template = template_for(lm.tokenizer, lm.chat_template)
    return [
        template.render(list(example_from_row(row).messages[:-1]), add_generation_prompt=True)
        for row in rows
    ]


@torch.no_grad()
def _mean_loss(model: nn.Module, loss, batches) -> float:
    """Mean loss per labelled token over ``batches`` (the trainer's validation measure)."""
    device = next(model.parameters()).device
    was_training, total, count = model.training, 0.0, 0
    model.eval()
    for batch in batches:
        loss_sum, n = loss(model, {k: v.to(device) for k, v in batch.items()}, nullcontext)
        total, count = total + loss_sum.item(), count + int(n)
    model.train(was_training)
    return total / count
