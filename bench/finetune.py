"""Fine-tuning methods side by side on the real SmolLM2-135M-Instruct and a bundled task.

For each method: fine-tune on generated task examples (``lmlab.data.tasks``), then measure
held-out task accuracy (greedy, graded exactly) and perplexity on general text (the first
tokens of Tiny Shakespeare's validation split: how much the model forgot), before and
after, with trainable parameters, training time and peak memory. Each method runs in its
own process, so time and memory are its own. Prints a Markdown table.

Usage: python bench/finetune.py [--methods lora,full,kl] [--task arithmetic]
           [--steps 150] [--time-budget 720] [--train 400] [--test 50]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import describe_machine  # bench/machine.py (the script's own folder)


def measure(model, rows, text: str) -> tuple[float, float]:
    """(held-out accuracy, perplexity of ``text``) of a model (a name or an LM), in bf16."""
    import torch

    import lmlab
    from lmlab.finetune.run import task_accuracy

    if isinstance(model, str):
        lm = lmlab.load(model, dtype="bfloat16", keep_quantized=False)
    else:
        lm = model
        lm.model.to(torch.bfloat16)
    accuracy, _ = task_accuracy(lm, rows, max_new_tokens=8)
    return accuracy, lm.perplexity(text)


def one_method(args) -> dict:
    from lmlab.finetune.run import finetune
    from lmlab.train import TrainConfig

    work = Path(args.work)
    test = json.loads((work / "test.json").read_text())
    text = (work / "general.txt").read_text()
    # PEFT: a few weights, larger steps; soft prompts larger still (Lester et al. use 0.3)
    lr = {"full": 5e-5, "kl": 5e-5, "prompt": 1e-2, "prefix": 1e-2}.get(args.method, 1e-3)
    config = TrainConfig(
        out_dir=str(work / args.method),
        max_steps=args.steps,
        time_budget_s=args.time_budget,
        batch_size=8,
        lr=lr,
        min_lr=lr / 10,
        warmup_steps=10,
        eval_interval=50,
        ckpt_interval=10**9,
        progress=False,
        seed=0,
    )
    t = time.perf_counter()
    result = finetune("smollm2", str(work / "train.jsonl"), args.method, max_len=96, config=config)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    accuracy, ppl = measure(result.lm, test, text)
    return {
        "trainable": result.trainable,
        "total": result.total,
        "steps": result.train.step,
        "train_s": seconds,
        "peak_rss_mb": peak,
        "accuracy": accuracy,
        "ppl": ppl,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--methods", default="lora")
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--time-budget", type=float, default=720.0)
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--test", type=int, default=50)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    print(describe_machine())
    if args.method:
        print(json.dumps(one_method(args)))
        return

    from lmlab.data import load_corpus, split_text
    from lmlab.data.tasks import generate_splits, write_jsonl

    work = Path(tempfile.mkdtemp(prefix="lmlab-ft-"))
    train, _, test = generate_splits([args.task], args.train, 0, args.test, seed=0)
    write_jsonl(train, work / "train.jsonl")
    (work / "test.json").write_text(json.dumps(test))
    general = split_text(load_corpus("tinyshakespeare"), 0.1)[1][:3000]
    (work / "general.txt").write_text(general)
    accuracy, ppl = measure("smollm2", test, general)
    print(
        f"SmolLM2-135M-Instruct, task {args.task}: {args.train} training examples, "
        f"{args.test} held out; before fine-tuning: accuracy {accuracy:.2f}, "
        f"Tiny Shakespeare perplexity {ppl:.2f}"
    )
    print("| method | trainable | steps | time | peak RSS | accuracy | perplexity |")
    print("| --- | --: | --: | --: | --: | --: | --: |")
    print(f"| (before) | | | | | {accuracy:.2f} | {ppl:.2f} |")
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--method", method, "--work", str(work)]
        cmd += ["--steps", str(args.steps), "--time-budget", str(args.time_budget)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        share = 100 * r["trainable"] / r["total"]
        print(
            f"| {method} | {r['trainable']:,} ({share:.2f}%) | {r['steps']} | "
            f"{r['train_s'] / 60:.1f} min | {r['peak_rss_mb']:,.0f} MB | {r['accuracy']:.2f} | "
            f"{r['ppl']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
