"""The lines the training commands print when a run ends (``lmlab finetune``, ``dpo``,
``reward``, ``ppo``): what trained, for how long, what it reached and where it was written.

The algorithm modules return result objects and print nothing; this module turns those
results into text.
"""

from __future__ import annotations

from pathlib import Path

from lmlab.align.dpo import METRICS, DPOResult
from lmlab.align.ppo import PPOResult
from lmlab.align.reward import RewardResult
from lmlab.eval.heads import METRICS as HEAD_METRICS
from lmlab.eval.heads import HeadResult
from lmlab.finetune.run import FinetuneResult


def share(trainable: int, total: int) -> str:
    """``share(24576, 1841472)`` -> ``'24,576 of 1,841,472 parameters (1.33%)'``."""
    return f"{trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"


def written_lines(
    adapter_dir: Path | None = None, model_dir: Path | None = None, plot: Path | None = None
) -> list[str]:
    """The lines saying where a run's adapter, model and plot were written."""
    lines = [f"adapter: {adapter_dir}"] if adapter_dir else []
    if model_dir:
        lines.append(f"model: {model_dir} (lmlab chat --model {model_dir})")
    return lines + ([f"plot: {plot}"] if plot else [])


def trained_lines(
    label: str, result: FinetuneResult | DPOResult, kind: str, counts: dict[str, int]
) -> list[str]:
    """What trained for how long, and how many ``kind`` (examples, pairs) it used."""
    r = result.train
    return [
        f"{label}: trained {share(result.trainable, result.total)} for {r.step} steps "
        f"in {r.wall_time_s:.0f} s",
        f"{kind}: {counts['train']} train, {counts['val']} validation"
        + (
            f" (the first {counts['val_scored']} scored: --train.eval_batches)"
            if counts.get("val_scored", counts["val"]) < counts["val"]
            else ""
        )
        + f", {counts['skipped']} skipped",
    ]


def finetune_summary(result: FinetuneResult) -> list[str]:
    """``lmlab finetune``: what trained, the examples, the validation loss before and after."""
    r = result.train
    lines = trained_lines(result.method, result, "examples", result.examples)
    lines[-1] += " (no response token left after max_len)"
    if r.val_losses and result.val_loss_before is not None:
        step, last = r.val_losses[-1]
        lines.append(
            f"validation loss per response token {result.val_loss_before:.4f} before -> "
            f"{last:.4f} at step {step}"
        )
    lines += written_lines(result.adapter_dir, result.model_dir)
    return lines + [f"note: {n}" for n in result.notes]


def head_summary_lines(result: HeadResult) -> list[str]:
    """``lmlab finetune --task``: what trained, and the test scores before and after."""
    r = result.train
    lines = [
        f"{result.method} fine-tuning of {result.model} with a {result.task} head: {r.step} "
        f"steps in {r.wall_time_s:.0f} s, {share(result.trainable, result.total)} trained",
        f"examples: {result.counts.get('train', 0)} train, {result.counts.get('validation', 0)} "
        f"validation, {result.counts.get('test', 0)} test",
    ]
    for name in HEAD_METRICS[result.task]:
        scale = 1.0 if result.task == "span" else 100.0
        lines.append(
            f"test {name.replace('_', ' ')}: {result.before[name] * scale:.1f} before -> "
            f"{result.after[name] * scale:.1f} after (%)"
        )
    lines.append(f"wrote {result.out_dir}/heads.json, heads.png and {result.model_dir}")
    return lines


def dpo_summary(result: DPOResult) -> list[str]:
    """``lmlab dpo``: what trained, the pairs, the last step's and validation's metrics."""
    lines = trained_lines(f"dpo ({result.method})", result, "pairs", result.pairs)
    if result.last:
        lines.append(
            "last step: loss {loss:.4f}, margin {margin:.4f}, reward accuracy "
            "{reward_accuracy:.2f}".format(**{k: float("nan") for k in METRICS} | result.last)
        )
    if result.val:
        v = result.val
        lines.append(
            f"validation: loss {v.get('val_loss', float('nan')):.4f}, reward accuracy "
            f"{v.get('val_reward_accuracy', float('nan')):.2f} (held-out pairs)"
            + (f", KL to the reference {v['val_kl']:.4f} nats/token" if "val_kl" in v else "")
        )
    return lines + written_lines(result.adapter_dir, result.model_dir, result.plot)


def reward_summary(result: RewardResult) -> list[str]:
    """``lmlab reward``: the steps, the pairs, the final loss and the held-out accuracy."""
    r = result.train
    lines = [
        f"reward model ({result.method}): {r.step} steps in {r.wall_time_s:.0f} s",
        f"pairs: {result.pairs['train']} train, {result.pairs['val']} held out, "
        f"{result.pairs['skipped']} skipped",
    ]
    if result.last:
        lines.append(f"final training loss {result.last['loss']:.4f} (log 2 = 0.6931 at the start)")
    if result.accuracy_after is not None:
        lines.append(
            f"held-out pairwise accuracy {result.accuracy_before:.3f} before -> "
            f"{result.accuracy_after:.3f} after"
        )
    if result.model_dir:
        lines.append(f"model: {result.model_dir} (lmlab.align.reward.load_reward_model)")
    return lines


def ppo_summary(result: PPOResult) -> list[str]:
    """``lmlab ppo``: the iterations, the mean score first and last, the KL reached."""
    lines = [f"PPO: {result.iterations} iterations in {result.wall_time_s:.0f} s"]
    if result.metrics:
        last = result.metrics[-1]
        first = result.metrics[0]
        lines.append(
            f"mean score {first['score']:.3f} (first iteration) -> {last['score']:.3f} (last); "
            f"KL to the reference {last['kl']:.4f} nats per sequence"
        )
    return lines + written_lines(result.adapter_dir, result.model_dir, result.plot)
