"""``lmlab reward``: a reward model trained on preference pairs (Bradley-Terry).

A reward model reads a prompt and a reply and returns one number, higher for replies
people (or a checker) prefer. As in InstructGPT (Ouyang et al. 2022, section 3.5) it is
the language model itself with its ``lm_head`` ([D] -> [V]) replaced by a scalar head
``nn.Linear(D, 1)``, read at the last real token of prompt + reply::

    ids     <user> What is 2 + 2 ? <assistant> 4 <end>  pad pad
    values    .     .    .  . . .     .        .   r
                                                   ^ the reward: the last non-padding token

It is trained on pairs with the Bradley-Terry loss -log sigmoid(r(chosen) - r(rejected))
(``lmlab.align.losses.bradley_terry_loss``) through the lmlab trainer, chosen and rejected
replies in one batch, so checkpoints and an exact resume come with it. The scalar head
starts at zero: every reward is 0 and the first loss is log 2.

The network stays a registered lmlab model (only its head module changes), so the
trainer's checkpoints work; the finished model is saved as an lmlab checkpoint directory
(safetensors + config.json with a ``reward_head`` entry + tokenizer and chat template),
and ``load_reward_model`` rebuilds it from the config without running any code.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.align.dpo import collate_pairs, load_pairs, prompt_messages
from lmlab.align.heads import hidden_size
from lmlab.align.losses import PairStats
from lmlab.checkpoint.base import BASE_KEY, attach_base
from lmlab.checkpoint.hf import save_chat_template
from lmlab.checkpoint.io import (
    finish_structures,
    load_weights,
    read_config,
    rebuild_structures,
    resolve_checkpoint,
    save_checkpoint,
)
from lmlab.data.instructions import EncodedExample, Example, collate, encode_example, template_for
from lmlab.data.preferences import PreferencePair, Prompt, load_preferences
from lmlab.data.tokenizers import load_tokenizer
from lmlab.errors import CheckpointError, DataError
from lmlab.finetune import LoRAConfig, unload_lora
from lmlab.finetune.run import check_method, keep_base_reference, prepare_method
from lmlab.finetune.sft import supervised_data
from lmlab.lm import LM, load, load_base, template_beside
from lmlab.models import build_model
from lmlab.seeds import seeded
from lmlab.train import TrainConfig, TrainResult, distributed, train

log = logging.getLogger(__name__)

METHODS = ("full", "lora")
HEAD_KEY = "reward_head"


def add_scalar_head(model: nn.Module) -> nn.Module:
    """Replace ``model.lm_head`` by a zero-initialised ``nn.Linear(D, 1)``, in place.

    The model then maps ids [B, T] to values [B, T, 1]. A tied lm_head is untied (the
    embedding keeps its weights).
    """
    head = nn.Linear(hidden_size(model), 1, bias=True)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    ref = next(model.parameters())
    model.lm_head = head.to(device=ref.device, dtype=ref.dtype)
    return model


def last_token_values(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """values [B, T] and mask [B, T] (True on real tokens, right padding) -> [B]: each row's
    value at its last real token. ``[[1, 2, 3], [4, 5, 0]]``, lengths 3, 2 -> ``[3, 5]``."""
    last = mask.long().sum(-1).clamp(min=1) - 1  # (B,)
    return values.gather(-1, last.unsqueeze(-1)).squeeze(-1)


def sequence_rewards(
    model: nn.Module, batch: dict[str, torch.Tensor], autocast=nullcontext
) -> torch.Tensor:
    """Rewards [N] float32 of a right-padded batch (``ids`` and ``mask`` [N, T])."""
    with autocast():
        values = model(batch["ids"])  # (N, T, 1)
    return last_token_values(values.squeeze(-1).float(), batch["mask"])


class RewardLoss:
    """The trainer's loss: summed Bradley-Terry loss over the pairs of a batch (chosen rows
    first, then rejected), and the number of pairs; ``metrics`` gives the mean rewards and
    the pairwise accuracy since the last call (training and evaluation kept apart)."""

    def __init__(self):
        self.stats = PairStats("accuracy")

    def __call__(self, model, batch, autocast=nullcontext, keep: float = 1.0):
        rewards = sequence_rewards(model, batch, autocast)  # (2B,)
        B = rewards.shape[0] // 2
        chosen, rejected = rewards[:B], rewards[B:]
        losses = -F.logsigmoid(chosen - rejected)  # (B,) Bradley-Terry
        self.stats.add(model.training, chosen, rejected)
        return losses.sum(), rewards.new_tensor(B, dtype=torch.int64)

    def metrics(self, training: bool) -> dict[str, float]:
        return self.stats.means(training)


# ----------------------------------------------------------------------------- the model


@dataclass
class RewardModel:
    """A scalar-headed network with its tokenizer and chat template."""

    model: nn.Module
    tokenizer: Any
    chat_template: Any | None = None
    max_len: int | None = None
    """Texts are cut to their first ``max_len`` tokens (None: the model's context)."""

    def encode(self, item: str | tuple[Prompt, str]) -> list[int]:
        """Token ids of a full text, or of (prompt, reply) rendered as SFT renders it."""
        max_len = self.max_len or getattr(self.model.config, "max_seq_len", None)
        if isinstance(item, str):
            ids = list(self.tokenizer.encode(item))
            return ids[:max_len] if max_len else ids
        prompt, reply = item
        messages = prompt_messages(prompt) + [{"role": "assistant", "content": reply}]
        template = template_for(self.tokenizer, self.chat_template)
        return list(encode_example(Example(tuple(messages)), self.tokenizer, template, max_len).ids)

    @torch.no_grad()
    def score(
        self, items: Sequence[str | tuple[Prompt, str]], batch_size: int = 16
    ) -> torch.Tensor:
        """Rewards [N] float32 (on CPU) of texts or (prompt, reply) pairs (PPO's reward)."""
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        out = []
        for start in range(0, len(items), batch_size):
            encoded = [self.encode(item) for item in items[start : start + batch_size]]
            if any(not ids for ids in encoded):
                raise DataError("cannot score an empty text")
            batch = collate([EncodedExample(ids, ids) for ids in encoded], self._pad_id())
            batch = {k: batch[k].to(device) for k in ("ids", "mask")}
            out.append(sequence_rewards(self.model, batch).cpu())
        self.model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)

    def _pad_id(self) -> int:
        eos = getattr(self.tokenizer, "eos_id", None)
        return eos if eos is not None else 0


def reward_model_from(lm: LM) -> RewardModel:
    """A reward model from any ``lmlab.load``-ed decoder (``LM``): its lm_head replaced."""
    return RewardModel(add_scalar_head(lm.model), lm.tokenizer, lm.chat_template)


def reward_accuracy(
    rm: RewardModel, pairs: Sequence[PreferencePair], batch_size: int = 16
) -> float:
    """Fraction of pairs whose chosen reply gets the strictly higher reward."""
    if not pairs:
        raise DataError("reward_accuracy needs at least one pair")
    chosen = rm.score([(p.prompt, p.chosen) for p in pairs], batch_size)
    rejected = rm.score([(p.prompt, p.rejected) for p in pairs], batch_size)
    return (chosen > rejected).float().mean().item()


def save_reward_model(rm: RewardModel, directory: str | Path) -> Path:
    """Write ``rm`` as a checkpoint directory (atomic): weights, config, tokenizer, template."""
    path = save_checkpoint(
        directory,
        rm.model,
        tokenizer=rm.tokenizer,
        extra_config={HEAD_KEY: {"out_features": 1, "read_at": "last_token"}},
    )
    if rm.chat_template is not None:
        save_chat_template(rm.chat_template, path)
    return path


def load_reward_model(directory: str | Path) -> RewardModel:
    """Rebuild a reward model saved by ``save_reward_model`` (config + safetensors only)."""

    ckpt = resolve_checkpoint(directory)
    config = read_config(ckpt)
    if HEAD_KEY not in config:
        raise CheckpointError(
            f"{str(ckpt)!r} is not a reward model (its config.json has no {HEAD_KEY!r}); "
            "a language model loads with lmlab.load"
        )
    where = str(ckpt / "config.json")
    if config.get(BASE_KEY):  # LoRA: the trained tensors (LoRA, head) over a base model
        plain = load_base(config, ckpt).model
    else:
        plain = build_model(config["model"])
    model = rebuild_structures(add_scalar_head(plain), config, where)
    load_weights(model, ckpt)
    model = finish_structures(model, config)
    return RewardModel(model.eval(), load_tokenizer(ckpt), template_beside(ckpt))


# ----------------------------------------------------------------------------- training


@dataclass
class RewardResult:
    train: TrainResult
    method: str
    pairs: dict[str, int]
    out_dir: Path
    accuracy_before: float | None = None
    """Held-out pairwise accuracy before training (the zero head: ties, so 0)."""
    accuracy_after: float | None = None
    """Held-out pairwise accuracy after training (``val_data``)."""
    last: dict[str, float] = field(default_factory=dict)
    model_dir: Path | None = None
    reward_model: RewardModel | None = None


def train_reward_model(
    model: str = "smollm2",
    data: str = "prefs.jsonl",
    val_data: str | None = None,
    method: Literal["full", "lora"] = "full",
    max_len: int = 256,
    lora: LoRAConfig = LoRAConfig(),
    config: TrainConfig | None = None,
) -> RewardResult:
    """Train a reward model on preference pairs (Bradley-Terry) and save it.

    Args:
        model: the decoder to start from (anything ``lmlab.load`` takes).
        data: preference JSONL (``prompt``, ``chosen``, ``rejected``).
        val_data: held-out pairs: validation loss during training, accuracy at the end.
        method: "full" (every weight) or "lora" (LoRA on the trunk; the head trains fully).
        max_len: conversations are cut to this many tokens.
        lora: LoRA's rank, scale, dropout and target layers (method "lora").
        config: the trainer's settings (out_dir, max_steps, lr, batch_size = pairs per step).

    Writes ``out_dir/checkpoints`` (resumable) and ``out_dir/model`` (``load_reward_model``).
    """
    check_method(method, METHODS)
    config = config or TrainConfig(out_dir="runs/reward", max_steps=200, lr=1e-5, min_lr=1e-6)
    ranks = distributed.command_ranks(config, "reward")  # under torchrun: DDP, rank 0 writes
    lm = load(model, dtype="float32", keep_quantized=False, device=config.device)
    with seeded(config.seed):  # the new head (and LoRA weights): the run's seed fixes them
        rm = reward_model_from(lm)
        net = prepare_method(rm.model.train(), method, lora)
    keep_base_reference(net, lm, method)  # LoRA checkpoints: LoRA, head and a base reference
    pad_id = rm._pad_id()
    train_pairs, val_pairs, skipped = load_pairs(lm, data, val_data, max_len)
    held_out = load_preferences(val_data) if val_data is not None else []
    rm.max_len = max_len

    net.lm_head.requires_grad_(True)  # the new head always trains
    before = reward_accuracy(rm, held_out) if held_out else None
    supervised = supervised_data(
        train_pairs, val_pairs, RewardLoss(), config, pad_id, collate_pairs
    )
    result = train(net, None, None, config, tokenizer=lm.tokenizer, supervised=supervised)
    out = Path(config.out_dir)
    # LoRA: small, over its base; rank 0 alone writes under torchrun
    model_dir = save_reward_model(rm, out / "model") if ranks.main else None
    ranks.barrier()
    if method == "lora":
        net = attach_base(unload_lora(net, merge=True), None)
    rm.model = net.eval()
    done = RewardResult(
        result,
        method,
        {"train": len(train_pairs), "val": len(val_pairs), "skipped": skipped},
        out,
        accuracy_before=before,
        reward_model=rm,
    )
    if held_out:
        done.accuracy_after = reward_accuracy(rm, held_out)
    if result.train_losses:
        done.last = {"step": result.train_losses[-1][0], "loss": result.train_losses[-1][1]}
    done.model_dir = model_dir
    return done
