"""Weight quantization on SmolLM2-135M: size, memory, perplexity and decoding speed.

Rows: fp32 (``lmlab.load("smollm2", dtype="float32", keep_quantized=False)``: the GGUF
file's Q8_0/Q4_1 weights dequantized to float32, the reference here), bf16 (``.to(bf16)``)
and int8 / int4 / NF4 (``lmlab.quant.quantize_model`` on the float32 model, the rest of the
model cast to bf16, the dtype the int8 and int4 kernels compute in). The output head is
the token embedding (tied) and stays dense in every row.

Columns:
- weights MB: ``model_size_bytes`` (parameters and buffers, tied ones once);
- file MB: model.safetensors as written by ``save_checkpoint`` / ``save_quantized``;
- RSS MB: the process's resident memory once the row's model is built, the float32 model
  it came from freed, and after a warm-up decode (torch and the tokenizer included: a
  baseline of a few hundred MB);
- perplexity: ``lmlab.eval.perplexity`` on the first ``--tokens`` tokens of the last 10% of
  Tiny Shakespeare (one window);
- decode tok/s: batch 1, greedy, ``--new-tokens`` new tokens after a 16-token prompt
  (prefill included), one timed run after a 4-token warm-up.

Each row runs in a fresh process, one after another, so that its memory is its own.
Timings on a shared CPU are noisy: compare rows of one run only. On a CPU shared with
other jobs, ``--threads 1`` gives steadier numbers: a 2-thread elementwise op waits for
its slower thread, which another process may hold for a whole scheduler tick.

Result (2-core shared CPU with avx512_bf16, torch 2.13, ``--threads 1``; 1m33s):

| weights | weights MB | file MB | RSS MB | perplexity | vs fp32 | decode tok/s |
|---|---:|---:|---:|---:|---:|---:|
| fp32 | 538.1 | 538.1 | 882 | 25.294 | +0.00% | 11.7 |
| bf16 | 269.0 | 269.1 | 635 | 25.218 | -0.30% | 13.9 |
| int8 | 163.5 | 163.5 | 520 | 25.454 | +0.63% | 21.0 |
| int4 | 123.0 | 123.1 | 571 | 25.306 | +0.05% | 31.9 |
| nf4 | 111.5 | 111.5 | 501 | 31.633 | +25.06% | 5.6 |

Reading it:
- the float32 reference is itself the GGUF file's weights dequantized, and every linear
  layer of that file is Q4_1: groups of 32 on a 16-level min/max grid, which int4 with
  groups of 32 represents again almost exactly (0.4% relative weight error on the layers
  checked, bf16 scale and zero; NF4 gives 9-10% on the same matrices). So int4's +0.05%
  flatters it, and NF4's +25% is measured against a grid it does not share. On weights
  that were never quantized the two formats come close (below);
- int4's RSS exceeds int8's: ``Int4Linear`` keeps the kernel's repacked copy of its
  weight beside the saved one;
- NF4 has no fused CPU kernel: each forward dequantizes the whole weight, hence its slow
  decoding. It is meant as QLoRA's frozen base, where training steps dominate.

On weights that were never quantized: the character-level GPT (1.8M parameters) that
``lmlab compare --budget 3m`` trained in float32 (``--model runs/compare-3m/gpt --threads 1
--tokens 4096``; 20 s on a busy machine, so the tok/s column is only indicative):

| weights | weights MB | perplexity | vs fp32 | decode tok/s |
|---|---:|---:|---:|---:|
| fp32 | 7.3 | 5.814 | +0.00% | 302.9 |
| bf16 | 3.6 | 5.814 | +0.00% | 301.6 |
| int8 | 1.9 | 5.816 | +0.03% | 361.8 |
| int4 | 1.2 | 5.843 | +0.50% | 563.4 |
| nf4 | 1.0 | 5.855 | +0.70% | 114.2 |

Usage: python bench/quant.py [--model smollm2|CHECKPOINT] [--tokens 1024] [--new-tokens 64] [--rows fp32,bf16,...]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import describe_machine  # bench/machine.py (the script's own folder)

ROWS = ["fp32", "bf16", "int8", "int4", "nf4"]


def rss_mb() -> float:
    """Current resident memory of this process (not the peak), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def row(name: str, tokens: int, new_tokens: int, threads: int, source: str = "smollm2") -> dict:
    """Build one row's model, then measure it; runs in its own process."""
    import torch

    if threads:
        torch.set_num_threads(threads)

    import lmlab
    from lmlab.checkpoint.io import WEIGHTS_FILE, save_checkpoint
    from lmlab.checkpoint.quantized import save_quantized
    from lmlab.data import load_corpus
    from lmlab.eval.perplexity import perplexity
    from lmlab.generate import SamplingParams, generate_ids
    from lmlab.quant import model_size_bytes, quantize_model

    lm = lmlab.load(source, dtype="float32", keep_quantized=False)
    model = lm.model
    t0 = time.perf_counter()
    if name == "bf16":
        model.to(torch.bfloat16)
    elif name != "fp32":
        quantize_model(model, name, dtype=torch.bfloat16)
    quantize_s = time.perf_counter() - t0
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the freed float32 weights back to the OS

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt"
        if name in ("fp32", "bf16"):
            save_checkpoint(path, model)
        else:
            save_quantized(model, path)
        file_mb = (path / WEIGHTS_FILE).stat().st_size / 1e6

    text = load_corpus("tinyshakespeare")
    ids = lm.tokenizer.encode(text[int(0.9 * len(text)) :])[:tokens]
    prompt = [ids[:16]]
    generate_ids(model, prompt, SamplingParams(max_new_tokens=4, temperature=0.0))  # warm-up
    rss = rss_mb()
    t0 = time.perf_counter()
    out = generate_ids(model, prompt, SamplingParams(max_new_tokens=new_tokens, temperature=0.0))
    decode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ppl = perplexity(model, ids)
    ppl_s = time.perf_counter() - t0
    return {
        "row": name,
        "weights_mb": model_size_bytes(model) / 1e6,
        "file_mb": file_mb,
        "rss_mb": rss,
        "perplexity": ppl,
        "tok_s": len(out[0]) / decode_s,
        "quantize_s": quantize_s,
        "ppl_s": ppl_s,
        "tokens": len(ids),
    }


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def table(results: list[dict]) -> str:
    base = results[0]["perplexity"] if results and results[0]["row"] == "fp32" else None
    lines = [
        "| weights | weights MB | file MB | RSS MB | perplexity | vs fp32 | decode tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        delta = f"{r['perplexity'] / base - 1:+.2%}" if base else "-"
        lines.append(
            f"| {r['row']} | {r['weights_mb']:.1f} | {r['file_mb']:.1f} | {r['rss_mb']:.0f} | "
            f"{r['perplexity']:.3f} | {delta} | {r['tok_s']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1024, help="perplexity tokens")
    parser.add_argument("--new-tokens", type=int, default=64, help="decoded tokens")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--model",
        default="smollm2",
        help="what lmlab.load takes: smollm2, or a checkpoint trained in float32 (weights that "
        "were never quantized, for a fair comparison of the formats)",
    )
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row, print JSON
    args = parser.parse_args()
    print(describe_machine())
    if args.row:
        print(json.dumps(row(args.row, args.tokens, args.new_tokens, args.threads, args.model)))
        return
    results = []
    for name in args.rows.split(","):
        cmd = [sys.executable, __file__, "--row", name, "--tokens", str(args.tokens)]
        cmd += ["--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
        cmd += ["--model", args.model]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"row {name} failed:\n{done.stderr}")
        out = done.stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        r = results[-1]
        print(
            f"{name}: {time.perf_counter() - t0:.0f} s (quantize {r['quantize_s']:.1f} s, "
            f"perplexity {r['ppl_s']:.1f} s)",
            file=sys.stderr,
        )
    print(
        f"{args.model}, Tiny Shakespeare held-out ({results[0]['tokens']} tokens), "
        f"{args.new_tokens} new tokens, batch 1 greedy, torch threads: "
        f"{args.threads or torch_threads()}\n"
    )
    print(table(results))


if __name__ == "__main__":
    main()
