"""``lmlab finetune``: adapt a model to instruction data (``lmlab.finetune.finetune``), or,
with ``--task sequence|token|span``, fine-tune an encoder's head on its bundled task and
score it before and after (``lmlab.eval.heads.finetune_head``), or, with ``--compare
full,lora,...``, run several methods on the same data and budget and grade each on
``--test_data`` (``lmlab.eval.peft``): a table and a figure of trainable parameters
against accuracy."""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentParser

from lmlab.cli.args import add_log_arguments, log_config, options
from lmlab.cli.summaries import finetune_summary, head_summary_lines
from lmlab.errors import ConfigError
from lmlab.eval.heads import HEADS, STRATEGIES, finetune_head
from lmlab.eval.peft import compare_methods
from lmlab.fileio import atomic_write_json, atomic_write_with
from lmlab.finetune import LoRAConfig
from lmlab.finetune.run import finetune
from lmlab.train import TrainConfig, distributed

HEAD_FLAGS = ("task", "strategy", "doc_stride")
COMPARE_FLAGS = ("compare", "test_data")


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_function_arguments(finetune, skip={"config"}, as_group=False)
    parser.add_argument(
        "--task",
        type=str | None,
        default=None,
        help=f"fine-tune an encoder head on its bundled task instead of instruction data: "
        f"{', '.join(HEADS)} (sentiment accuracy, NER entity F1, extractive-QA EM/F1); "
        "--method full or lora, --data is not read",
    )
    parser.add_argument(
        "--strategy",
        type=str,
        default="first",
        help=f"token head: word labels from subword scores by {', '.join(STRATEGIES)}",
    )
    parser.add_argument(
        "--doc_stride",
        type=int,
        default=32,
        help="span head: tokens shared by consecutive windows of a long context (with --max_len)",
    )
    parser.add_argument(
        "--compare",
        type=str | None,
        default=None,
        help="instead of one method, run each of these (comma-separated, e.g. "
        "full,lora,adapter,prompt,prefix,bitfit) with the same data and budget, each in "
        "train.out_dir/<method>, and grade each on --test_data: peft.json and peft.png",
    )
    parser.add_argument(
        "--test_data",
        type=str | None,
        default=None,
        help="with --compare: task rows (lmlab.data.tasks) to grade the tuned models on",
    )
    parser.add_class_arguments(TrainConfig, "train", skip={"log"}, help="the trainer's settings")
    add_log_arguments(parser)
    parser.set_defaults(
        {"train.out_dir": "runs/finetune", "train.lr": 1e-4, "train.max_steps": 200}
    )


def run(args) -> None:
    lora = LoRAConfig(**options(args.lora))
    train = TrainConfig(**options(args.train), log=log_config(args))
    if args.compare is not None:
        return run_compare(args, lora, train)
    if args.task is not None:
        if args.data != "train.jsonl" or args.val_data is not None:
            raise ConfigError(
                "--task fine-tunes a head on its bundled task and reads no --data or "
                "--val_data; drop them, or drop --task to fine-tune on instruction data"
            )
        result = finetune_head(
            args.model,
            args.task,
            args.method,
            args.strategy,
            args.max_len,
            args.doc_stride,
            lora=lora,
            config=train,
        )
        for line in head_summary_lines(result):
            print(line)
        return
    if args.test_data is not None:
        raise ConfigError("--test_data is read with --compare only; add --compare or drop it")
    result = finetune(
        **options(args, skip=("train", "lora", "log", *HEAD_FLAGS, *COMPARE_FLAGS)),
        lora=lora,
        config=train,
    )
    if distributed.setup(train.device).main:  # under torchrun, rank 0 reports
        for line in finetune_summary(result):
            print(line)


# ----------------------------------------------------------------------------- --compare


def run_compare(args, lora: LoRAConfig, train: TrainConfig) -> None:
    if args.test_data is None:
        raise ConfigError("--compare grades every method on --test_data (task rows): give it")
    if args.method != "lora" or args.task is not None:
        raise ConfigError("--compare names the methods itself: drop --method and --task")
    kept = ("max_len", "pack", "beta", "bottleneck", "n_virtual", "prompt_init", "select")
    extra = {k: getattr(args, k) for k in kept}
    result = compare_methods(
        args.model, args.data, args.test_data, args.compare, train, lora=lora,
        val_data=args.val_data, val_fraction=args.val_fraction, **extra,
    )  # fmt: skip
    out = Path(train.out_dir)
    atomic_write_json(out / "peft.json", {"model": args.model, "data": args.data, **result})
    plot_methods(result, out / "peft.png", f"{args.model}, {train.max_steps} steps each")
    before = result["before"]
    print(f"before fine-tuning: accuracy {before['accuracy']:.3f}, chrF {before['chrf']:.1f} "
          f"on {result['test_rows']} test rows")  # fmt: skip
    print(f"{'method':<9} {'lr':>7} {'trainable':>10} {'share':>8} {'val loss':>9} "
          f"{'accuracy':>9} {'chrF':>6}")  # fmt: skip
    for row in result["rows"]:
        share = row["trainable"] / row["total"]
        loss = f"{row['val_loss']:.3f}" if row["val_loss"] is not None else "-"
        print(f"{row['method']:<9} {row['lr']:7.0e} {row['trainable']:>10,} {share:8.2%} "
              f"{loss:>9} {row['accuracy']:9.3f} {row['chrf']:6.1f}")  # fmt: skip
    for name in ("peft.json", "peft.png"):
        print(f"wrote {out / name}")


def plot_methods(result: dict, png: Path, title: str) -> None:
    """Trainable parameters (log scale) against the chrF of the held-out answers (exact
    accuracy in the labels), one point per method, beside each method's validation loss."""
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    fig = Figure(figsize=(12, 4.4), layout="constrained")
    left, right = fig.subplots(1, 2)
    rows = result["rows"]
    for k, row in enumerate(rows):
        left.scatter(row["trainable"], row["chrf"], s=50, color=f"C{k}")
        left.annotate(f"{row['method']} ({row['accuracy']:.0%} exact)",
                      (row["trainable"], row["chrf"]), xytext=(5, 5),
                      textcoords="offset points", fontsize=8)  # fmt: skip
    left.axhline(result["before"]["chrf"], color="0.5", ls="--", label="before fine-tuning")
    left.set_xscale("log")
    counts = [row["trainable"] for row in rows]
    left.set_xlim(min(counts) / 2, max(counts) * 8)  # room for the labels
    left.set(xlabel="trainable parameters", ylabel="chrF of the answers (0..100)",
             title="held-out answers against trainable parameters")  # fmt: skip
    left.legend(fontsize=8)
    names = [row["method"] for row in rows]
    after = [row["val_loss"] if row["val_loss"] is not None else float("nan") for row in rows]
    right.bar(names, after, color=[f"C{k}" for k in range(len(rows))])
    start = rows[0]["val_loss_before"] if rows and rows[0]["val_loss_before"] else None
    if start is not None:
        right.axhline(start, color="0.5", ls="--", label="before fine-tuning")
        right.legend(fontsize=8)
    right.set(ylabel="validation loss (nats per response token)", title="validation loss after")
    fig.suptitle(title)
    atomic_write_with(png, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
