"""What machine a benchmark ran on: every bench prints this line before its figures.

from machine import describe_machine
print(describe_machine())
# CPU: AMD EPYC 9B45 (2 cores; avx2 avx512f avx512_bf16; no amx) | torch 2.13.0 threads 2
# lmlab's choices for this CPU: AMD EPYC 9B45 (avx512_bf16; no amx): bf16, one-token steps without oneDNN
"""

from __future__ import annotations

import os
import platform

FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """The CPU's model name and which of the speed-relevant flags it has (Linux)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return model, [f for f in FLAGS if f in flags]


def describe_machine() -> str:
    model, flags = cpu_model_and_flags()
    amx = "" if any(f.startswith("amx") for f in flags) else "; no amx"
    line = f"CPU: {model} ({os.cpu_count()} cores; {' '.join(flags) or 'no avx2'}{amx})"
    try:
        import torch  # only for its version and thread count

        line += f" | torch {torch.__version__.split('+')[0]} threads {torch.get_num_threads()}"
        from lmlab.devices import cpu_plan

        line += f"\nlmlab's choices for this CPU: {cpu_plan().describe()}"
    except ImportError:
        pass
    return line


if __name__ == "__main__":
    print(describe_machine())
