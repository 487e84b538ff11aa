"""On-policy DPO on a verifiable task: does preference tuning raise held-out accuracy?

Starting from an SFT'd model (default ``runs/align/sft/model``, SmolLM2-135M tuned on
arithmetic):

1. held-out accuracy before (``runs/align/test.jsonl``, greedy, ``task_accuracy``);
2. on-policy pairs: ``k`` replies sampled at temperature ~1 for each of ``--pairs`` prompts
   of ``runs/align/prompts.jsonl``, graded exactly; a prompt with a right and a wrong
   reply gives one pair (``lmlab.align.pairs.sampled_pairs``);
3. DPO with LoRA (the reference is the same model with LoRA switched off), reference
   log-probabilities precomputed once; every ``--eval_every`` steps it logs the implicit
   rewards and the per-token KL to the reference on ``--val`` held-out reference pairs
   (fresh prompts from the generator, right answer vs a near miss);
4. held-out accuracy after, and the mean per-token KL(policy || reference) over the
   policy's greedy replies to the test prompts (how far DPO moved the model);
5. wall time; the reward / margin / accuracy plot is ``<out>/dpo.png``.

Prints a Markdown table row. A quick check that it runs end to end:

    python bench/dpo.py --pairs 16 --steps 3 --test 5

The full run (the lead's, on a quiet machine): python bench/dpo.py
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import lmlab
from lmlab.align.dpo import dpo, reply_kl
from lmlab.align.pairs import reference_pairs, sampled_pairs, sampled_reward
from lmlab.data.instructions import (
    Example,
    collate,
    encode_example,
    example_from_row,
    read_jsonl,
    template_for,
)
from lmlab.data.preferences import load_preferences, write_preferences
from lmlab.data.tasks import generate_tasks, write_jsonl
from lmlab.finetune import LoRAConfig
from lmlab.finetune.run import finetune, task_accuracy
from lmlab.train import TrainConfig
from machine import describe_machine  # bench/machine.py (the script's own folder)


@torch.no_grad()
def mean_token_kl(policy, reference, tokenizer, template, rows, replies) -> float:
    """Mean over reply tokens of KL(policy || reference) of the next-token distributions
    (``lmlab.align.dpo.reply_kl``), each row's reply rendered after its prompt."""
    examples = [
        encode_example(
            Example(
                (*example_from_row(row).messages[:-1], {"role": "assistant", "content": reply})
            ),
            tokenizer,
            template,
        )
        for row, reply in zip(rows, replies)
    ]
    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    total, count = 0.0, 0
    for start in range(0, len(examples), 16):
        batch = collate(examples[start : start + 16], pad_id)
        kl, n = reply_kl(policy, batch, reference=reference)
        total, count = total + kl.item(), count + int(n)
    return total / max(count, 1)


def fresh_rows(rows, n: int, exclude: list[str]) -> list[dict]:
    """``n`` new rows of the prompt rows' task, none asked in ``rows`` or the ``exclude``
    files, from the task generator with a seed the lesson's splits do not use."""
    seen = {(r["instruction"], r.get("input", "")) for r in rows}
    for path in exclude:
        seen |= {(r["instruction"], r.get("input", "")) for r in read_jsonl(path)}
    tasks = sorted({r["task"] for r in rows})
    fresh = [
        r
        for r in generate_tasks(tasks, n + len(seen), seed=1000)
        if (r["instruction"], r.get("input", "")) not in seen
    ]
    if len(fresh) < n:
        raise SystemExit(f"only {len(fresh)} fresh prompts could be drawn; asked for {n}")
    return fresh[:n]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="runs/align/sft/model")
    ap.add_argument("--prompts", default="runs/align/prompts.jsonl")
    ap.add_argument("--test_data", default="runs/align/test.jsonl")
    ap.add_argument("--out", default="runs/align/dpo")
    ap.add_argument("--pairs", type=int, default=300, help="prompts to sample pairs from")
    ap.add_argument(
        "--fresh",
        type=int,
        default=0,
        help="this many more prompts from the task generator (seed 1000), none of which is "
        "in --exclude",
    )
    ap.add_argument(
        "--exclude",
        default="runs/align/sft_train.jsonl,runs/align/prompts.jsonl,runs/align/test.jsonl",
        help="files whose prompts --fresh must not repeat (SFT data, prompts, test)",
    )
    ap.add_argument(
        "--pairs_file",
        default=None,
        help="train on this preference JSONL (an earlier run's pairs.jsonl) instead of sampling",
    )
    ap.add_argument(
        "--lora.targets",
        dest="lora_targets",
        default="q_proj,k_proj,v_proj,o_proj",
        help="linear layers LoRA adapts, comma-separated (or '[q_proj,v_proj]' as lmlab takes)",
    )
    ap.add_argument(
        "--reference_if_all_wrong",
        action="store_true",
        help="a prompt whose k replies are all wrong pairs the reference answer with one",
    )
    ap.add_argument(
        "--val",
        type=int,
        default=50,
        help="held-out reference pairs (fresh prompts, right vs near miss) on which DPO logs "
        "validation rewards and KL to the reference every --eval_every steps; 0: none",
    )
    ap.add_argument("--eval_every", type=int, default=10)
    ap.add_argument("--k", type=int, default=4, help="samples per prompt")
    ap.add_argument(
        "--source",
        default="sampled",
        choices=["sampled", "reference"],
        help="on-policy sampled pairs, or off-policy reference pairs (right vs near miss)",
    )
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--test", type=int, default=100, help="held-out rows to grade")
    ap.add_argument("--reward_k", type=int, default=4, help="sampled replies per held-out prompt")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--loss_type", default="sigmoid", choices=["sigmoid", "ipo"])
    ap.add_argument(
        "--chosen_sft",
        action="store_true",
        help="instead of DPO, supervised tuning on the chosen replies (RPO's control)",
    )
    ap.add_argument(
        "--rpo_alpha", type=float, default=None, help="add the chosen replies' NLL (RPO)"
    )
    ap.add_argument("--lora.r", dest="lora_r", type=int, default=16, help="LoRA's rank")
    ap.add_argument("--max_new_tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(describe_machine())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    lm = lmlab.load(args.model, dtype="float32", keep_quantized=False)
    test_rows = read_jsonl(args.test_data)[: args.test]
    prompt_rows = read_jsonl(args.prompts)[: args.pairs]
    exclude = [*args.exclude.split(","), args.test_data]
    if args.fresh:
        prompt_rows += fresh_rows(prompt_rows, args.fresh, exclude)
    val_data = None
    if args.val:  # prompts in no other set, for watching the drift during training only
        val_data = str(out / "val_pairs.jsonl")
        write_preferences(
            reference_pairs(fresh_rows(prompt_rows, args.val, exclude), seed=args.seed), val_data
        )
    before, _ = task_accuracy(lm, test_rows, args.max_new_tokens)
    reward_before = sampled_reward(lm, test_rows, args.reward_k, max_new_tokens=args.max_new_tokens)
    t_sample = time.perf_counter()
    if args.pairs_file:
        pairs = load_preferences(args.pairs_file)
        print(f"{len(pairs)} pairs from {args.pairs_file}")
    elif args.source == "reference":
        pairs = reference_pairs(prompt_rows, seed=args.seed)
        print(f"{len(pairs)} reference pairs (right answer vs a near miss)")
    else:
        sampled = sampled_pairs(
            lm,
            prompt_rows,
            k=args.k,
            seed=args.seed,
            temperature=args.temperature,
            max_new_tokens=args.max_new_tokens,
            progress=True,
            reference_if_all_wrong=args.reference_if_all_wrong,
        )
        print(
            f"sampled {args.k} replies for {sampled.prompts} prompts in "
            f"{time.perf_counter() - t_sample:.0f} s: {sampled.accuracy:.1%} right; "
            f"{sampled.with_pair} prompts gave a pair, {sampled.all_right} all right, "
            f"{sampled.all_wrong} all wrong"
            + (" (paired with the reference)" if args.reference_if_all_wrong else "")
        )
        pairs = sampled.pairs
    if not pairs:
        raise SystemExit("no prompt gave a right and a wrong reply: nothing to train on")
    write_preferences(pairs, out / "pairs.jsonl")

    config = TrainConfig(
        out_dir=str(out / "run"),
        max_steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        min_lr=args.lr / 10,
        warmup_steps=min(10, args.steps // 10),
        eval_interval=max(min(args.eval_every, args.steps), 1),
        ckpt_interval=max(args.steps, 1),
        log_interval=1,
        precision="fp32",
        seed=args.seed,
        resume="auto",
    )
    targets = tuple(args.lora_targets.strip("[]").split(","))
    lora = dict(
        method="lora",
        lora=LoRAConfig(r=args.lora_r, alpha=2.0 * args.lora_r, targets=targets),
        max_len=128,
        config=config,
    )
    if args.chosen_sft:
        # The control for RPO's NLL term: supervised tuning on the chosen replies alone,
        # with the same LoRA, steps and learning rate, and no rejected replies.
        rows = [{"instruction": p.prompt, "input": "", "output": p.chosen} for p in pairs]
        write_jsonl(rows, out / "chosen.jsonl")
        result = finetune(args.model, str(out / "chosen.jsonl"), val_fraction=0.0, **lora)
    else:
        result = dpo(
            args.model,
            str(out / "pairs.jsonl"),
            val_data=val_data,
            beta=args.beta,
            loss_type=args.loss_type,
            rpo_alpha=args.rpo_alpha,
            **lora,
        )
    after, answers = task_accuracy(result.lm, test_rows, args.max_new_tokens)
    reward_after = sampled_reward(
        result.lm, test_rows, args.reward_k, max_new_tokens=args.max_new_tokens
    )
    reference = lmlab.load(args.model, dtype="float32", keep_quantized=False)
    template = template_for(reference.tokenizer, reference.chat_template)
    kl = mean_token_kl(
        result.lm.model.eval(),
        reference.model.eval(),
        reference.tokenizer,
        template,
        test_rows,
        answers,
    )
    wall = time.perf_counter() - t0
    if not args.chosen_sft:
        last = result.last
        print(
            f"DPO: {result.train.step} steps, final loss {last.get('loss', float('nan')):.4f}, "
            f"margin {last.get('margin', float('nan')):.3f}, reward accuracy "
            f"{last.get('reward_accuracy', float('nan')):.2f}; plot {result.plot}"
        )
    print()
    data = (
        f"from {args.pairs_file}"
        if args.pairs_file
        else f"{len(prompt_rows)} prompts ({args.source}"
    )
    if not args.pairs_file:
        data += ", reference if all wrong)" if args.reference_if_all_wrong else ")"
    if args.rpo_alpha:
        data += f", rpo_alpha {args.rpo_alpha}"
    if args.chosen_sft:
        data += ", SFT on the chosen replies only"
    print(
        "| model | data | pairs | steps | lr | beta | test rows | accuracy before | "
        "accuracy after | sampled reward before | after | KL/token to ref | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.model} | {data} | {len(pairs)} | {result.train.step} | {args.lr} | "
        f"{args.beta} | {len(test_rows)} | {before:.3f} | {after:.3f} | {reward_before:.3f} | "
        f"{reward_after:.3f} | {kl:.4f} | {wall:.0f} |"
    )


if __name__ == "__main__":
    main()
