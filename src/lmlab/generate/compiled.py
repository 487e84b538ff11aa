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
- On a CPU the step is compiled whole (``aot_compile``, ``fullgraph=True``): a function
  that runs without dynamo's per-call frame hook and guard checks, whose guards are
  checked once at a run's first step. SmolLM2 4-bit, 2 threads: 11.0 ms of CPU per token
  against 12.0 with dynamo's step and its guards skipped after the first (1.18x; eager:
  18.8; ``bench/smollm2_compile.py``). A model that breaks the graph, and other devices,
  get dynamo's compiled step instead.
- Compiling costs seconds (about 50 s of wall time for SmolLM2, once per model and
  setting): ``compile_seconds`` in the result says how long. The whole-graph step is then
  saved (``step_cache_dir``: ``$LMLAB_COMPILE_CACHE``, else ``lmlab-steps`` under
  inductor's cache directory ``cache_dir()``), keyed by everything its guards may not
  cover (``step_key``: torch's and lmlab's versions, the CPU's flags, lmlab's source and
  that of the model's other classes, the model's layout and settings), and a later
  process loads it in a few seconds instead of tracing again (SmolLM2: 3.0 s; dynamo's
  step is traced again in every process, about 20 s with inductor's caches warm). The
  saved files are lmlab's own cache, trusted as inductor's on-disk caches are (they hold
  compiled code and pickled state, written with the user's permissions): never point
  ``$LMLAB_COMPILE_CACHE`` at files from elsewhere.
- inductor builds its CPU kernels with a C++ compiler (``g++``, or ``$CXX``):
  ``require_compiler`` says so in one line when there is none, before any tracing.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import marshal
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from lmlab.devices import cpu_flags
from lmlab.errors import DecodingError
from lmlab.quant.int4 import Int4Linear
from lmlab.version import __version__

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


_OPTIONS = {"emulate_precision_casts": True}
# the graph's driver code in C++ rather than Python: the ~150 kernel calls of a SmolLM2
# step cost less to launch (1.1-1.2x per token, same ids; bench/smollm2_compile.py). Built
# apart from the kernels: one C++ file of both took g++ 50 of SmolLM2's 78 s of cold
# compile, two take 24 (cold compile 85 -> 39-50 s), at the same speed per token
_CPU_OPTIONS = {**_OPTIONS, "cpp_wrapper": True, "cpp_wrapper_build_separate": True}


@functools.cache
def _compiled(cpu: bool = True) -> Callable:
    # One compiled function for every model: dynamo keeps a graph per model it meets (it
    # guards on the module), all under one cache entry list.
    return torch.compile(_step, dynamic=True, options=_CPU_OPTIONS if cpu else _OPTIONS)


def step_cache_dir() -> Path:
    """Where compiled CPU steps are saved between processes: ``$LMLAB_COMPILE_CACHE``, else
    ``lmlab-steps`` in inductor's cache directory (``cache_dir``)."""
    return Path(os.environ.get("LMLAB_COMPILE_CACHE") or Path(cache_dir()) / "lmlab-steps")


def _digest(files) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(str(name).encode())
        digest.update(Path(name).read_bytes())
    return digest.hexdigest()


@functools.cache
def _package_hash() -> str:
    """A digest of lmlab's own source (read once per process: a few ms)."""
    return _digest(Path(__file__).parents[1].rglob("*.py"))


def _source_hash(model: nn.Module) -> str:
    """A digest of lmlab's source and of the code of the model's other module classes (a
    user's own, torch's): a saved step traced from other code is never loaded."""
    package = Path(__file__).parents[1]
    files, unfiled = set(), []
    for cls in {type(m) for m in model.modules()}:
        try:
            file = inspect.getsourcefile(cls)
        except TypeError:  # its module has no file (exec'd code, an interactive session)
            file = None
        if file is not None and os.path.isfile(file):
            files.add(file)
        else:  # a notebook cell's class, one read from stdin, or one made by exec
            unfiled.append(_class_code(cls))
    outside = [f for f in files if package not in Path(f).parents]
    unfiled_digest = hashlib.sha256(b"".join(sorted(unfiled))).hexdigest()
    return _digest(outside) + unfiled_digest + _package_hash()


def _class_code(cls: type) -> bytes:
    """A class's source text where one is known (``linecache``: a notebook's cells), else
    its methods' bytecode (``marshal``), which changes with what they do."""
    try:
        return inspect.getsource(cls).encode()
    except (OSError, TypeError):
        code = [f.__code__ for f in vars(cls).values() if hasattr(f, "__code__")]
        return cls.__qualname__.encode() + marshal.dumps(tuple(code))


def step_key(model: nn.Module, ids: torch.Tensor, cache) -> str:
    """What a saved step must match besides its guards: torch's and lmlab's versions, the
    CPU's flags (the kernels are built for them), the code, and the model's layout: every
    module's class and plain settings, every tensor's name, shape, dtype and device; then
    the run's batch of one or more (dynamo treats batch 1 apart) and its padding."""
    parts = [torch.__version__, __version__, " ".join(sorted(cpu_flags() or ()))]
    parts.append(_source_hash(model))
    for name, m in model.named_modules():
        plain = {
            k: v
            for k, v in vars(m).items()
            if not k.startswith("_") and isinstance(v, bool | int | float | str | type(None))
        }
        parts.append(f"{name}:{type(m).__qualname__}:{sorted(plain.items())}")
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        parts.append(f"{name}:{tuple(t.shape)}:{t.dtype}:{t.device}:{t.requires_grad}")
    # which int4 kernel (lmlab's or torch's: ``LMLAB_INT4_KERNEL``) holds each 4-bit layer's
    # weights: not a module, so not among the tensors above
    for name, m in model.named_modules():
        if isinstance(m, Int4Linear) and m._kernel is not None:
            parts.append(f"{name}:int4 native={m._kernel.native}")
    parts.append(f"batch1={ids.shape[0] == 1}:padded={getattr(cache, 'padded', None)}")
    parts.append(f"grad={torch.is_grad_enabled()}:inference={torch.is_inference_mode_enabled()}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


class _Steps:
    """Compiled CPU steps, in this process and on disk (``step_cache_dir``).

    Each is ``torch.compile(...).aot_compile``'d: a whole-graph function that runs without
    dynamo's frame hooks and guard checks, and that can be saved. A later process loads it
    in a few seconds instead of tracing again. Its guards are checked once, at a run's
    first step."""

    def __init__(self):
        self.entries: list[tuple[str, Callable]] = []
        # Keys of models whose step breaks the graph: dynamo compiles them in pieces, and a
        # piece may recompile at any step (an int it specialised on changes), which skipped
        # guards would turn into an error, so their runs check every guard at every step.
        self.breaking: set[str] = set()
        self.compiled = 0  # steps compiled (not loaded) in this process
        self.loaded = 0

    def find(self, key: str, model: nn.Module, ids: torch.Tensor, cache):
        """``(step, how)``: a step for ``key`` (``step_key``) whose guards pass for these
        arguments, found in "memory", loaded from "disk", or "compiled" now (and saved);
        ``(None, "breaks")`` when the model cannot be traced as one graph (tried once per
        key and process)."""
        if key in self.breaking:
            return None, "breaks"
        for k, fn in self.entries:
            if k == key and fn.guard_check(model, ids, cache):
                return fn, "memory"
        path = step_cache_dir() / f"{key}.bin"
        fn, how = self._load(path, model, ids, cache), "disk"
        if fn is None:
            fn, how = self._compile(model, ids, cache), "compiled"
            if fn is None:
                self.breaking.add(key)
                return None, "breaks"
            self._save(fn, path)
        fn.disable_guard_check()  # checked above, once per run
        self.entries.append((key, fn))
        return fn, how

    def _load(self, path: Path, model, ids, cache) -> Callable | None:
        from torch._dynamo.aot_compile import AOTCompiledFunction  # deferred: see cache_dir

        try:
            data = path.read_bytes()
        except OSError:
            return None
        try:
            fn = AOTCompiledFunction.deserialize(data, f_globals=_step.__globals__)
            if not fn.guard_check(model, ids, cache):
                log.info("the compiled step saved in %s does not fit this run", path)
                return None
        except Exception as e:  # a damaged or foreign file: compile afresh, overwrite it
            log.warning("cannot load the compiled step %s (%s): compiling afresh", path, e)
            return None
        self.loaded += 1
        return fn

    def _compile(self, model, ids, cache) -> Callable | None:
        import torch._dynamo.config as dynamo_config  # deferred: see cache_dir

        step = torch.compile(_step, dynamic=True, fullgraph=True, options=_CPU_OPTIONS)
        try:
            # float settings (RoPE's theta, norms' eps) stay constants: aot_compile cannot
            # restart a trace to turn them into graph inputs
            with dynamo_config.patch(specialize_float=True):
                fn = step.aot_compile(((model, ids, cache), {}))
        except Exception as e:  # a graph break (or a trace aot_compile cannot take)
            log.info("the step cannot be compiled as one graph (%s): dynamo's step instead", e)
            return None
        self.compiled += 1
        return fn

    @staticmethod
    def _save(fn, path: Path) -> None:
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fn.save_compiled_function(str(path))  # written to a temporary file, renamed
        except Exception as e:  # a read-only or full disk: the next process compiles again
            log.warning("cannot save the compiled step to %s: %s", path, e)


_STEPS = _Steps()


def reset() -> None:
    """Forget every compiled step this process holds, lmlab's and dynamo's, as a new
    process starts (the saved ones stay on disk)."""
    import torch._dynamo  # deferred: see cache_dir

    _STEPS.entries.clear()
    _STEPS.breaking.clear()
    torch._dynamo.reset()


def compiled_steps() -> tuple[int, int]:
    """(compiled, loaded from disk): the whole-graph CPU steps this process has made."""
    return _STEPS.compiled, _STEPS.loaded


class CompiledStep:
    """``step(model, ids [B, 1], cache) -> logits [B, 1, V]`` through ``torch.compile``.

    One instance serves one decoding run (``applies`` says whether it may: not for a
    model with hooks). On a CPU its first call finds a whole-graph step whose guards pass
    (``_Steps``: made earlier in the process, saved on disk by an earlier one, or
    compiled now) and the run's other calls go straight to it: within a run only the
    cache length and the token change, and the length is a symbol of the graph. A model
    that does not trace as one graph, and other devices, use dynamo's compiled step
    instead, whose first call checks all of dynamo's guards (the model's dtype, mode,
    shapes, settings such as ``use_fast_decoding``: anything changed since the last run
    recompiles) and whose later calls skip the guards that cannot tell its graphs apart
    (``skip_guard_eval_unsafe``), unless the model breaks the graph (``_Steps.breaking``).

    ``seconds`` adds up the calls that compiled or loaded a step: wall seconds, tracing
    (a failed whole-graph trace included) and C++ builds.
    """

    def __init__(self, device: torch.device):
        require_compiler(device)
        from torch._dynamo.utils import counters  # deferred: see cache_dir

        self._counters = counters
        self._cpu = device.type == "cpu"
        self._step = _compiled(self._cpu)
        self._whole: Callable | None = None
        self._guarded = False  # dynamo's step with every guard checked (a graph break)
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
        # A fresh [B, 1] tensor, not the caller's view of its token buffer: that view's
        # storage offset grows by one each step, and dynamo would make it a symbol of the
        # graph, which shares one with any size of the same value at the first step (a
        # Q8_0 layer's 16 rows per tile at a 16-token prompt). Within a run the guards are
        # not checked again, and that size then changed with the offset (a shape error).
        ids = ids.clone(memory_format=torch.contiguous_format)
        if self._whole is not None:
            return self._whole(model, ids, cache)
        if self.calls == 1:
            return self._first(model, ids, cache)
        if self._guarded:
            return self._step(model, ids, cache)
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            return self._step(model, ids, cache)

    def _first(self, model: nn.Module, ids: torch.Tensor, cache) -> torch.Tensor:
        """A run's first step: find (or make) the step the run will use, and count the
        seconds spent compiling or loading it."""
        start = time.perf_counter()
        prepare = getattr(model, "prepare_decoding", None)  # tables the step reads
        if prepare is not None:
            prepare(ids.device)
        key = step_key(model, ids, cache)
        if self._cpu:
            self._whole, how = _STEPS.find(key, model, ids, cache)
            if how in ("disk", "compiled"):
                self.seconds += time.perf_counter() - start
                log.info(
                    "%s the one-token decoding step in %.1f s (saved in %s)",
                    "loaded" if how == "disk" else "compiled",
                    time.perf_counter() - start,
                    os.fspath(step_cache_dir()),
                )
            if self._whole is not None:
                return self._whole(model, ids, cache)
        stats, broken = self._counters["stats"], self._counters["graph_break"]
        graphs, breaks = stats["unique_graphs"], sum(broken.values())
        logits = self._step(model, ids, cache)
        if sum(broken.values()) != breaks:
            _STEPS.breaking.add(key)
        self._guarded = key in _STEPS.breaking
        if stats["unique_graphs"] != graphs:
            self.seconds += time.perf_counter() - start
            log.info(
                "compiled the one-token decoding step in %.1f s (kernels cached in %s)",
                time.perf_counter() - start,
                os.fspath(cache_dir()),
            )
        return logits
