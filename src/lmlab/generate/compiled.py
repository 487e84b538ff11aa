"""A compiled one-token decoding step (``SamplingParams(compile=True)``, ``--compile``).

Decoding a small model on a CPU is bound by per-token overhead, not by arithmetic: every
step launches a few hundred small kernels from Python (SmolLM2-135M: 30 blocks of norms,
projections, RoPE, attention and SwiGLU). ``torch.compile`` (TorchDynamo + inductor)
traces the model's forward for one new token with a KV cache into one graph and fuses the
elementwise work between the matrix products into generated C++ loops, so a step makes
far fewer calls. The prompt's pass and every step without a cache stay eager: only the
step that repeats is worth compiling.

Choices, each one measured or tested:

- ``dynamic=True``: the cache length is a symbol of the graph, so one compile serves every
  step and every later prompt, batch size and cache size; without it inductor specialises
  on the length and recompiles after a step or two (``tests/generate/test_compiled.py``
  counts the graphs over 64 tokens).
- inductor's ``emulate_precision_casts``: a fused bf16 kernel would keep its intermediates
  in float32, where eager PyTorch rounds each one to bf16; the greedy ids then drift from
  the eager ones after a few tokens. With it on, the compiled step rounds where eager does
  and gives the same ids.
- Compiling costs seconds (tens for SmolLM2, once per process and model): ``compile_seconds``
  in the result says how long, and inductor's on-disk caches (the FX graph and AOTAutograd
  caches, on by default, under ``cache_dir()``: ``$TORCHINDUCTOR_CACHE_DIR`` or
  ``/tmp/torchinductor_<user>``) make a later process skip the C++ builds; the tracing
  itself is redone each process.
- inductor builds its CPU kernels with a C++ compiler (``g++``, or ``$CXX``):
  ``require_compiler`` says so in one line when there is none, before any tracing.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from lmlab.errors import DecodingError

log = logging.getLogger(__name__)


def cache_dir() -> str:
    """Where inductor keeps compiled kernels between processes."""
    # torch._inductor and torch._dynamo are imported only when compile=True asks for them
    from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir

    return inductor_cache_dir()


def require_compiler(device: torch.device) -> None:
    """Raise DecodingError unless inductor can build kernels for ``device``: on a CPU, a
    C++ compiler it looks for (``$CXX`` or ``g++``) must be on the PATH."""
    if device.type != "cpu":
        return
    import torch._inductor.config as inductor  # deferred: see cache_dir

    names = inductor.cpp.cxx if isinstance(inductor.cpp.cxx, list | tuple) else (inductor.cpp.cxx,)
    names = [n for n in names if n]
    if not any(shutil.which(n) for n in names):
        raise DecodingError(
            f"compile=True needs a C++ compiler to build torch.compile's CPU kernels, and "
            f"none of {', '.join(names) or 'g++'} is on the PATH; install one (e.g. apt "
            "install g++, or set CXX) or decode without compile"
        )


def has_hooks(model: nn.Module) -> bool:
    """Whether a forward hook is registered on ``model`` or any of its modules (or on
    every module). Dynamo does not guard on hooks (``skip_nnmodule_hook_guards``): a graph
    compiled without them would silently ignore one added later, so a model with hooks
    decodes eagerly, and the graph is only ever traced from a model without any."""
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _step(model: nn.Module, ids: torch.Tensor, cache) -> torch.Tensor:
    return model(ids, cache=cache)


@functools.cache
def _compiled(cpu: bool = True) -> Callable:
    # One compiled function for every model: dynamo keeps a graph per model it meets (it
    # guards on the module), all under one cache entry list.
    options = {"emulate_precision_casts": True}
    if cpu:
        # the graph's driver code in C++ rather than Python: the ~150 kernel calls of a
        # SmolLM2 step cost less to launch (1.1-1.2x per token, same ids; bench/smollm2_compile.py)
        options["cpp_wrapper"] = True
    return torch.compile(_step, dynamic=True, options=options)


class CompiledStep:
    """``step(model, ids [B, 1], cache) -> logits [B, 1, V]`` through ``torch.compile``.

    One instance serves one decoding run (``applies`` says whether it may: not for a
    model with hooks). Its first call checks all of dynamo's guards (the model's dtype,
    mode, shapes, settings such as ``use_fast_decoding``: anything changed since the last
    run recompiles); later calls of the run skip the guards that cannot tell the compiled
    graphs apart (``skip_guard_eval_unsafe``), since within a run only the cache length
    and the token change, and the length is a symbol of the graph. That saves checking a
    few thousand guards per token (SmolLM2: about 1 ms).

    ``seconds`` adds up the calls that compiled (the first for a model, and any
    recompilation): wall seconds, tracing and C++ builds included.
    """

    def __init__(self, device: torch.device):
        require_compiler(device)
        from torch._dynamo.utils import counters  # deferred: see cache_dir

        self._graphs = counters["stats"]
        self._step = _compiled(device.type == "cpu")
        self.calls = 0
        self.seconds = 0.0

    @staticmethod
    def applies(model: nn.Module) -> bool:
        """Whether a run of ``model`` may use the compiled step (see ``has_hooks``)."""
        if has_hooks(model):
            log.info("the model has forward hooks: decoding eagerly despite compile=True")
            return False
        return True

    def __call__(self, model: nn.Module, ids: torch.Tensor, cache) -> torch.Tensor:
        self.calls += 1
        if self.calls > 1:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return self._step(model, ids, cache)
        before = self._graphs["unique_graphs"]
        start = time.perf_counter()
        logits = self._step(model, ids, cache)
        if self._graphs["unique_graphs"] != before:
            seconds = time.perf_counter() - start
            self.seconds += seconds
            log.info(
                "compiled the one-token decoding step in %.1f s (kernels cached in %s)",
                seconds,
                os.fspath(cache_dir()),
            )
        return logits
