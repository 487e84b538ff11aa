"""Serving throughput: 8 concurrent streams against the same 8 requests one at a time.

Starts ``lmlab serve`` (127.0.0.1, a free port) on a model, then sends ``--streams``
greedy streaming completions of ``--max-tokens`` tokens each (different prompts;
``ignore_eos`` so that every request generates all its tokens, as vLLM's benchmark does):

- one at a time: each request waits for the previous one to finish;
- concurrent: all at once, so the engine decodes them as one batch (continuous batching).

Prints the machine, generated tokens/s for each, the ratio, and how many texts are the same
both ways: all of them in float32; in bfloat16 (and 4-bit) the matrix products of a batch
of 1 and of 8 round differently, so a near tie between two tokens can flip.

Usage: python bench/serve.py [--model smollm2] [--streams 8] [--max-tokens 64] [--threads N]

On a machine shared with other work, torch's 2 threads wait for each other in every
matrix product; --threads 1 measures the batching rather than that contention.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time

import httpx

from machine import describe_machine

PROMPTS = [
    "The history of the printing press",
    "Write a short poem about the sea.",
    "Explain photosynthesis to a child:",
    "Three tips for learning a new language:",
    "Once upon a time, in a small village,",
    "The main causes of the French Revolution were",
    "A recipe for pancakes:",
    "Why is the sky blue?",
]


def start(model: str, dtype: str, threads: int | None) -> tuple[subprocess.Popen, str]:
    threading = ["--threads", str(threads)] if threads else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmlab", "serve", "--model", model, "--port", "0"]
        + ["--dtype", dtype, "--name", "bench", *threading],
        stderr=subprocess.PIPE,
        text=True,
    )
    match = re.search(r"at (http://[^ ]+)/v1", proc.stderr.readline())
    if not match:
        proc.kill()
        sys.exit(f"lmlab serve did not start: {proc.communicate()}")
    url = match.group(1)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    sys.exit("lmlab serve did not answer within 300 s")


async def stream(http: httpx.AsyncClient, url: str, body: dict) -> tuple[str, int]:
    """(text, generated tokens) of one streamed completion."""
    text, tokens = "", 0
    async with http.stream("POST", f"{url}/v1/completions", json=body) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                if event["choices"]:
                    text += event["choices"][0]["text"]
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    return text, tokens


async def run(url: str, bodies: list[dict], concurrent: bool):
    """-> (seconds, texts, generated tokens in all)."""
    async with httpx.AsyncClient(timeout=1800) as http:
        start = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(stream(http, url, b) for b in bodies))
        else:
            results = [await stream(http, url, b) for b in bodies]
        seconds = time.perf_counter() - start
    return seconds, [text for text, _ in results], sum(n for _, n in results)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2", help="anything lmlab serve --model takes")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="the server's CPU threads")
    args = ap.parse_args()
    print(describe_machine())
    print(f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())} (before)")
    proc, url = start(args.model, args.dtype, args.threads)
    try:
        bodies = [
            {
                "prompt": PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)),
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
                "ignore_eos": True,
            }
            for i in range(args.streams)
        ]
        asyncio.run(run(url, bodies[:1], concurrent=False))  # warm-up
        alone_s, alone, tokens = asyncio.run(run(url, bodies, concurrent=False))
        together_s, together, _ = asyncio.run(run(url, bodies, concurrent=True))
    finally:
        proc.terminate()
        proc.wait(60)
    print(
        f"model {args.model} (dtype {args.dtype}, server threads {args.threads or 'default'}), "
        f"{args.streams} greedy streams of {args.max_tokens} new tokens ({tokens} in all)"
    )
    print(f"one at a time: {tokens / alone_s:8.1f} tok/s ({alone_s:.1f} s)")
    print(f"concurrent:    {tokens / together_s:8.1f} tok/s ({together_s:.1f} s)")
    print(f"ratio concurrent / one at a time: {alone_s / together_s:.2f}x")
    same = sum(a == b for a, b in zip(alone, together))
    print(f"same texts both ways: {same}/{len(alone)}")
    print(f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())} (after)")


if __name__ == "__main__":
    main()
