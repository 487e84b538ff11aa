"""PPO (RLHF) with LoRA on an SFT'd SmolLM2 and the bundled arithmetic task's checker.

From the SFT model (``runs/align/sft/model``), PPO with LoRA on the task prompts
(``runs/align/prompts.jsonl``) with the verifiable reward (1 when ``lmlab.data.tasks.check``
accepts the completion, else 0). Measures greedy accuracy on the held-out rows
(``runs/align/test.jsonl``, ``lmlab.finetune.run.task_accuracy``) before and after, the
mean reward of 4 replies sampled per held-out prompt (what PPO maximises), the
KL to the reference (the SFT model) on the last iterations' rollouts, and wall time; writes
the score/KL plot to ``<out>/ppo.png``. Prints a Markdown table.

Usage: python bench/ppo.py [--model runs/align/sft/model] [--max-steps 40]
           [--time-budget 1800] [--batch-size 8] [--samples 4] [--lr 1e-4] [--out DIR]
           [--advantage-estimator gae|rloo] [--max-new-tokens 8] [--device auto]

The run continues its out_dir when it holds checkpoints (``resume="auto"``).

A quick end-to-end check (a minute or two on 2 CPU cores):
    python bench/ppo.py --max-steps 2 --batch-size 2 --samples 2 --n-test 4 \\
        --ppo-epochs 1 --out /tmp/ppo-check
"""

from __future__ import annotations

import argparse
import time

from machine import describe_machine  # bench/machine.py (the script's own folder)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="runs/align/sft/model")
    ap.add_argument("--prompts", default="runs/align/prompts.jsonl")
    ap.add_argument("--test", default="runs/align/test.jsonl")
    ap.add_argument("--n-test", type=int, default=100, help="held-out rows to grade")
    ap.add_argument("--reward-k", type=int, default=4, help="sampled replies per held-out prompt")
    ap.add_argument("--max-steps", type=int, default=40, help="PPO iterations in all")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds of PPO at most")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per rollout")
    ap.add_argument("--samples", type=int, default=4, help="completions per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--ppo-epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--kl-coef", type=float, default=0.05)
    ap.add_argument(
        "--advantage-estimator",
        default="gae",
        choices=["gae", "rloo"],
        help="value head and GAE, or the leave-one-out baseline of the prompt's other samples",
    )
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--out", default="runs/align/ppo")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    args = ap.parse_args()

    import torch

    import lmlab
    from lmlab.align.pairs import sampled_reward
    from lmlab.align.ppo import PPOConfig, ppo, row_prompt, task_reward
    from lmlab.data.instructions import read_jsonl
    from lmlab.finetune import LoRAConfig
    from lmlab.finetune.run import task_accuracy

    if args.threads:
        torch.set_num_threads(args.threads)
    print(describe_machine())
    rows = read_jsonl(args.prompts)
    test = read_jsonl(args.test)[: args.n_test]
    lm = lmlab.load(args.model, dtype="float32", keep_quantized=False, device=args.device)
    t = time.perf_counter()
    before, _ = task_accuracy(lm, test, max_new_tokens=args.max_new_tokens)
    eval_s = time.perf_counter() - t

    # The mean reward of 4 replies sampled per held-out prompt, the same draws for both
    # models: what PPO maximises, on prompts it never saw.
    reward_before = sampled_reward(lm, test, args.reward_k, max_new_tokens=args.max_new_tokens)
    config = PPOConfig(
        batch_size=args.batch_size,
        samples_per_prompt=args.samples,
        max_new_tokens=args.max_new_tokens,
        ppo_epochs=args.ppo_epochs,
        minibatch_size=args.batch_size * args.samples // 2 or 1,
        lr=args.lr,
        kl_coef=args.kl_coef,
        advantage_estimator=args.advantage_estimator,
        method="lora",
        lora=LoRAConfig(
            r=args.lora_r, alpha=2.0 * args.lora_r, targets=("q_proj", "k_proj", "v_proj", "o_proj")
        ),
        max_steps=args.max_steps,
        time_budget_s=args.time_budget,
        ckpt_interval=10,
        out_dir=args.out,
        resume="auto",
        seed=0,
        device=args.device,
    )
    t = time.perf_counter()
    result = ppo(lm, [row_prompt(r) for r in rows], task_reward(rows), config)
    ppo_s = time.perf_counter() - t
    after, _ = task_accuracy(result.lm, test, max_new_tokens=args.max_new_tokens)
    reward_after = sampled_reward(
        result.lm, test, args.reward_k, max_new_tokens=args.max_new_tokens
    )
    last = result.metrics[-min(5, len(result.metrics)) :]
    kl = sum(r["kl"] for r in last) / len(last)
    first_score, last_score = result.metrics[0]["score"], result.metrics[-1]["score"]
    print(
        f"{args.model}: PPO ({args.advantage_estimator} advantages) with LoRA "
        f"(r={args.lora_r}) on {len(rows)} task prompts, "
        f"{args.batch_size} x {args.samples} completions per iteration; held-out accuracy on "
        f"{len(test)} rows (greedy, {eval_s:.0f} s per evaluation); plot: {result.plot}"
    )
    print(
        "| iterations | PPO time | rollout score (first -> last) | KL to the start (nats/seq) "
        "| accuracy before | accuracy after | sampled reward before | after |"
    )
    print("| --: | --: | --: | --: | --: | --: | --: | --: |")
    print(
        f"| {result.iterations} | {ppo_s / 60:.1f} min | {first_score:.2f} -> {last_score:.2f} | "
        f"{kl:.3f} | {before:.2f} | {after:.2f} | {reward_before:.3f} | {reward_after:.3f} |"
    )


if __name__ == "__main__":
    main()
