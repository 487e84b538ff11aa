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
from lmlab.data.tasks import TASKS
from lmlab.errors import ConfigError
from lmlab.eval.heads import HEADS, STRATEGIES, finetune_head
from lmlab.eval.peft import LR_FACTOR, compare_methods, generated_data
from lmlab.fileio import atomic_write_json, atomic_write_with
from lmlab.finetune import LoRAConfig
from lmlab.finetune.run import finetune
from lmlab.train import TrainConfig, distributed

HEAD_FLAGS = ("task", "strategy", "doc_stride")
COMPARE_FLAGS = ("compare", "test_data", "generate", "n_train", "n_test", "general_chars",
                 "max_new_tokens", "lr_factor")  # fmt: skip


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
    parser.add_argument(
        "--generate",
        type=str | None,
        default=None,
        help=f"with --compare: generate the training and test rows of these bundled tasks "
        f"({', '.join(TASKS)}; comma-separated) into train.out_dir/data instead of reading "
        "--data and --test_data",
    )
    parser.add_argument("--n_train", type=int, default=400, help="with --generate: training rows")
    parser.add_argument("--n_test", type=int, default=50, help="with --generate: test rows")
    parser.add_argument(
        "--general_chars",
        type=int,
        default=0,
        help="with --compare: measure forgetting as the perplexity of this many characters of "
        "general text (Tiny Shakespeare's validation split) before and after each method; 0: not",
    )
    parser.add_argument(
        "--max_new_tokens", type=int, default=16, help="with --compare: tokens per test answer"
    )
    parser.add_argument(
        "--lr_factor",
        type=dict[str, float] | None,
        default=None,
        help="with --compare: learning rate of a method as a multiple of --train.lr, e.g. "
        f"'{{lora: 20}}' (defaults: {LR_FACTOR}; full and kl x1)",
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
    for flag in ("test_data", "generate", "lr_factor"):
        if getattr(args, flag) is not None:
            raise ConfigError(f"--{flag} is read with --compare only; add --compare or drop it")
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
    if args.method != "lora" or args.task is not None:
        raise ConfigError("--compare names the methods itself: drop --method and --task")
    data, test_data = args.data, args.test_data
    if args.generate is not None:
        if data != "train.jsonl" or test_data is not None:
            raise ConfigError(
                "--generate makes the training and test rows itself: drop --data and "
                "--test_data, or drop --generate to read them"
            )
        data, test_data = generated_data(
            args.generate, args.n_train, args.n_test, train.seed, Path(train.out_dir) / "data"
        )
    elif test_data is None:
        raise ConfigError(
            "--compare grades every method on --test_data (task rows): give it, or "
            f"--generate TASK to make both ({', '.join(TASKS)})"
        )
    kept = ("max_len", "pack", "beta", "bottleneck", "n_virtual", "prompt_init", "select")
    extra = {k: getattr(args, k) for k in kept}
    result = compare_methods(
        args.model, data, test_data, args.compare, train, lora=lora,
        val_data=args.val_data, val_fraction=args.val_fraction,
        max_new_tokens=args.max_new_tokens, general_chars=args.general_chars,
        lr_factor=args.lr_factor, **extra,
    )  # fmt: skip
    out = Path(train.out_dir)
    atomic_write_json(out / "peft.json", {"model": args.model, "data": data, **result})
    plot_methods(result, out / "peft.png", f"{args.model}, {train.max_steps} steps each")
    for line in compare_lines(result):
        print(line)
    for name in ("peft.json", "peft.png"):
        print(f"wrote {out / name}")


def compare_lines(result: dict) -> list[str]:
    """The comparison as a Markdown table: a row before fine-tuning, then one per method."""
    ppl = result["before"].get("perplexity") is not None
    head = ["method", "lr", "trainable", "share", "val loss", "accuracy", "chrF"]
    head += ["perplexity"] * ppl + ["train s", "CPU s"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " --: |" * (len(head) - 1)]
    before = result["before"]
    cells = ["before", "", "", "", "", f"{before['accuracy']:.3f}", f"{before['chrf']:.1f}"]
    cells += ([f"{before['perplexity']:.2f}"] if ppl else []) + ["", ""]
    lines.append("| " + " | ".join(cells) + " |")
    for row in result["rows"]:
        loss = f"{row['val_loss']:.3f}" if row["val_loss"] is not None else "-"
        cells = [row["method"], f"{row['lr']:.0e}", f"{row['trainable']:,}",
                 f"{row['trainable'] / row['total']:.2%}", loss, f"{row['accuracy']:.3f}",
                 f"{row['chrf']:.1f}"]  # fmt: skip
        cells += [f"{row['perplexity']:.2f}"] if ppl else []
        cells += [f"{row['wall_time_s']:.0f}", f"{row['cpu_time_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"(accuracy: exact answers to {result['test_rows']} test rows; perplexity: of "
                 "general text, a rise is forgetting; CPU s: all threads, grading included)")  # fmt: skip
    return lines


def plot_methods(result: dict, png: Path, title: str) -> None:
    """Held-out exact accuracy against trainable parameters (log scale), one point per
    method, beside each method's validation loss and, when measured, the perplexity of
    general text (forgetting); dashed lines: the model before fine-tuning."""
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    rows, before = result["rows"], result["before"]
    with_ppl = before.get("perplexity") is not None
    fig = Figure(figsize=(15 if with_ppl else 12, 4.4), layout="constrained")
    left, *bars = fig.subplots(1, 3 if with_ppl else 2, width_ratios=[1.6, 1, 1][: 2 + with_ppl])
    colors = [f"C{k}" for k in range(len(rows))]
    for k, (row, color) in enumerate(zip(rows, colors)):
        left.scatter(row["trainable"], row["accuracy"], s=50, color=color)
        left.annotate(f"{row['method']} (chrF {row['chrf']:.0f})",  # below, above: apart
                      (row["trainable"], row["accuracy"]), xytext=(5, 5 if k % 2 else -12),
                      textcoords="offset points", fontsize=8)  # fmt: skip
    left.axhline(before["accuracy"], color="0.5", ls="--", label="before fine-tuning")
    left.set_xscale("log")
    counts = [row["trainable"] for row in rows]
    left.set_xlim(min(counts) / 2, max(counts) * 8)  # room for the labels
    left.set_ylim(-0.03, max(1.0, *[row["accuracy"] for row in rows]) + 0.05)
    left.set(xlabel="trainable parameters", ylabel="exact accuracy on held-out rows",
             title=f"held-out answers ({result['test_rows']} rows) against trainable parameters")  # fmt: skip
    left.legend(fontsize=8, loc="upper left")
    names = [row["method"] for row in rows]
    start = rows[0]["val_loss_before"] if rows and rows[0]["val_loss_before"] else None
    panels = [("val_loss", start, "validation loss (nats per response token)",
               "validation loss after")]  # fmt: skip
    if with_ppl:
        panels.append(("perplexity", before["perplexity"], "perplexity of general text",
                       "forgetting: perplexity of general text after"))  # fmt: skip
    for ax, (key, baseline, ylabel, heading) in zip(bars, panels):
        values = [row[key] if row[key] is not None else float("nan") for row in rows]
        ax.bar(names, values, color=colors)
        if baseline is not None:
            ax.axhline(baseline, color="0.5", ls="--", label="before fine-tuning")
            ax.legend(fontsize=8)
        finite = [v for v in [*values, baseline] if v is not None and v == v]
        if key == "perplexity" and finite:  # the differences, not the distance from 0
            ax.set_ylim(0.9 * min(finite), 1.04 * max(finite))
        ax.tick_params(axis="x", labelsize=8)
        ax.set(ylabel=ylabel, title=heading)
    fig.suptitle(title)
    atomic_write_with(png, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
