"""Devices and dtypes: the one place that turns ``device="auto"`` into a torch device.

Every command and API function that runs a model takes ``device`` (``auto``, ``cpu``,
``cuda``, ``cuda:N``, ``mps``) and resolves it here; ``auto`` picks CUDA, then Apple's
MPS, then the CPU. A device that is not there is an error naming what is:

    >>> resolve_device("auto")          # on a laptop without a GPU
    device(type='cpu')
    >>> resolve_device("cuda:3")        # on a machine with one GPU
    ConfigError: device='cuda:3' is not available: this machine has cuda:0; valid: auto, cpu, ...

``bf16_supported`` says whether bf16 runs natively (the dtype ``"auto"`` picks),
``parse_dtype`` reads the dtype names the command line takes, and ``cpu_plan`` holds every
speed decision made from what the CPU offers (flags), in one place.
``return_free_memory`` hands the C heap's free pages back to the system after a load, and
``use_huge_pages`` moves weights that decoding streams into memory backed by 2 MiB pages.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import math
import platform
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from lmlab.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[str]:
    """The devices this machine has, e.g. ``["cpu", "cuda:0"]``."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        found.append("mps")
    return found


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None) -> CUDA if present, else MPS, else CPU; a named device is checked
    against what the machine has (one ConfigError line naming what is available)."""
    if isinstance(device, torch.device):
        device = str(device)
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps" if _mps_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device={device!r} is invalid; valid: {', '.join(DEVICES)}")
    ok = {
        "cpu": True,
        "cuda": torch.cuda.is_available()
        and (parsed.index is None or parsed.index < torch.cuda.device_count()),
        "mps": _mps_available(),
    }[parsed.type]
    if not ok:
        raise ConfigError(
            f"device={device!r} is not available: this machine has "
            f"{', '.join(available_devices())}; valid: {', '.join(DEVICES)}"
        )
    if parsed.type == "cuda" and parsed.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return parsed


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device | str = "cpu"):
    """A dtype name (float32/fp32, bfloat16/bf16, auto) -> torch dtype; None stays None
    (the caller's default). ``auto`` is bf16 where ``device`` computes it natively."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if bf16_supported(device) else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is invalid; valid: float32, bfloat16, auto")
    return DTYPES[dtype]


def bf16_supported(device: torch.device | str) -> bool:
    """Whether bf16 runs natively on ``device``.

    CUDA: the GPU reports it (Ampere and newer). CPU: the instruction set has bf16
    arithmetic (x86 AVX512-BF16 or AMX, ARM BF16), read from /proc/cpuinfo on Linux and
    asked of oneDNN elsewhere. Other devices: no.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    flags = cpu_flags()
    if flags is not None:
        return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True)
class CpuPlan:
    """The speed decisions lmlab makes for this CPU, all here, from what the CPU offers.

    Chosen from /proc/cpuinfo flags (no timing at import: a measurement would cost every
    process a second and vary with load). ``flags`` lists the ones that decided, so a
    bench can print why.
    """

    model: str
    """The CPU's model name."""
    flags: tuple[str, ...]
    """The flags that decided: avx512_bf16, amx_bf16, amx_tile where present."""
    bf16: bool
    """bf16 is native (``dtype="auto"`` picks it)."""
    onednn_matvec: bool
    """One-token decoding steps (matrix-vector products) go through oneDNN. Off where bf16
    is native without AMX: there torch's own bf16 matrix-vector kernel reads the weights
    about twice as fast as oneDNN's (measured on AMD EPYC, bench/decode.py). On when the
    CPU has AMX tiles: oneDNN's bf16 kernels run on them and torch's own do not (chosen by
    flags, not measured: an Intel AMX machine ran lmlab's one-token path without oneDNN
    at 0.93x transformers' float32, issue 21)."""

    def describe(self) -> str:
        """``"AMD EPYC (avx512_bf16; no amx): bf16, one-token steps without oneDNN"``."""
        flags = " ".join(self.flags) or "no bf16 flags"
        amx = "" if any(f.startswith("amx") for f in self.flags) else "; no amx"
        route = "through oneDNN" if self.onednn_matvec else "without oneDNN"
        dtype = "bf16" if self.bf16 else "float32"
        return f"{self.model} ({flags}{amx}): {dtype}, one-token steps {route}"


@functools.cache
def cpu_plan() -> CpuPlan:
    """This machine's ``CpuPlan`` (read once per process)."""
    flags = cpu_flags() or set()
    deciding = tuple(f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags)
    bf16 = bf16_supported("cpu")
    amx = {"amx_bf16", "amx_tile"} <= flags
    return CpuPlan(_cpu_model(), deciding, bf16, onednn_matvec=amx or not bf16)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (x86 ``flags``, Arm ``Features``), None
    where it cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return flags


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's parameters (or, for count-based models, buffers) are on."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library, another system)."""
    try:
        return ctypes.CDLL(None).malloc_trim  # the symbols the process has loaded
    except (OSError, AttributeError, TypeError):
        return None


def return_free_memory() -> None:
    """Hand the free pages inside the C heap back to the system (glibc's ``malloc_trim``;
    nothing where it is missing).

    A load that makes many medium-sized temporaries (a few MB each) between the tensors it
    keeps leaves holes glibc does not return: after its first large free it serves such
    sizes from the heap, not from their own mappings. Packing SmolLM2's 4-bit weights that
    way held up to 150 MB of free heap; trimming after each block keeps the peak at the
    weights.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


HUGE_PAGE = 2 << 20  # x86-64's transparent huge page
_MADV_DONTNEED, _MADV_HUGEPAGE = 4, 14  # <sys/mman.h> on Linux
_BLOCKS: dict[int, int] = {}  # the blocks use_huge_pages made and still alive: start -> end


def huge_pages_available() -> bool:
    """Whether Linux backs memory with transparent huge pages when asked (``madvise``, or
    ``always``; not ``never``, and nowhere else)."""
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[never]" not in mode and _madvise() is not None


@functools.cache
def _madvise():
    """libc's ``madvise``, or None."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _huge_block(nbytes: int) -> torch.Tensor | None:
    """An uninitialised uint8 tensor of ``nbytes`` starting on a 2 MiB boundary, advised
    ``MADV_HUGEPAGE`` and tracked in ``_BLOCKS`` while it lives; None where huge pages are
    not available, the advice is refused, or ``nbytes`` is below one huge page."""
    madvise = _madvise()
    if nbytes < HUGE_PAGE or not huge_pages_available() or madvise is None:
        return None
    base = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)  # not touched yet: no pages
    start = -base.data_ptr() % HUGE_PAGE
    length = (base.numel() - start) // 4096 * 4096  # within the allocation
    if madvise(base.data_ptr() + start, length, _MADV_HUGEPAGE):
        return None  # refused (an old kernel)
    block = base[start : start + nbytes]
    # every tensor made from the block is a view of base's storage, alive while any is
    _BLOCKS[block.data_ptr()] = block.data_ptr() + nbytes
    weakref.finalize(base.untyped_storage(), _BLOCKS.pop, block.data_ptr(), None)
    return block


def _slot(shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes a tensor takes in a block: its size rounded up to 64 (cache-line aligned)."""
    return -(-math.prod(shape) * dtype.itemsize // 64) * 64


def _in_block(t: torch.Tensor) -> bool:
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    return any(a <= start and end <= b for a, b in _BLOCKS.items())


def empty_on_huge_pages(*specs: tuple[tuple[int, ...], torch.dtype]) -> list[torch.Tensor]:
    """Uninitialised CPU tensors of these ``(shape, dtype)`` side by side in one block on
    2 MiB pages where Linux offers them (``torch.empty`` each elsewhere, or below one huge
    page in all). A loader that builds a large weight into them skips the copy
    ``use_huge_pages`` would make, and the peak memory that copy costs."""
    block = _huge_block(sum(_slot(shape, dtype) for shape, dtype in specs))
    if block is None:
        return [torch.empty(shape, dtype=dtype) for shape, dtype in specs]
    out, at = [], 0
    for shape, dtype in specs:
        nbytes = math.prod(shape) * dtype.itemsize
        out.append(block[at : at + nbytes].view(dtype).view(shape))
        at += _slot(shape, dtype)
    return out


def use_huge_pages(holders: list[tuple[object, str]]) -> int:
    """Move the CPU tensors ``getattr(obj, name)`` of ``holders`` into one block of memory
    that Linux backs with 2 MiB pages, each pointed at its copy (``setattr``; a module's
    buffer stays a buffer); returns the bytes moved, 0 where huge pages are not
    available (the tensors stay where they are).

    A decoding step streams every weight from memory once. On 4 KiB pages the CPU's
    prefetchers stop at each page boundary and the TLB misses every few rows; on 2 MiB
    pages SmolLM2's Q8_0 output layer takes 12-15% less time on 2 threads and 24-29% on
    one (``bench/q8_head.py``, AMD EPYC), a compiled decoding step about 8-10%. A 4-bit
    GGUF load moves its int4 weights so. The copies are made one at a time, each
    original freed and the heap trimmed as they go, so the peak grows by the largest
    tensor moved, not by all of them (a loader avoids even that for a large one by
    building it in place: ``empty_on_huge_pages``). Tensors on other devices,
    non-contiguous ones and those already on such a block are left alone.
    """
    moving = [
        (obj, name)
        for obj, name in holders
        if isinstance(t := getattr(obj, name), torch.Tensor)
        and t.device.type == "cpu"
        and t.is_contiguous()
        and not _in_block(t)
    ]
    block = _huge_block(sum(_slot(getattr(o, n).shape, getattr(o, n).dtype) for o, n in moving))
    if block is None:
        return 0
    moved, since_trim = 0, 0
    for obj, name in moving:
        t = getattr(obj, name)
        nbytes = t.numel() * t.element_size()
        copy = block[moved : moved + nbytes].view(t.dtype).view(t.shape)
        copy.copy_(t)
        setattr(obj, name, copy)
        del t  # the original's last reference: freed here
        moved += _slot(copy.shape, copy.dtype)
        since_trim += nbytes
        if since_trim >= HUGE_PAGE:
            return_free_memory()
            since_trim = 0
    return_free_memory()
    return moved


def give_back_pages(t: torch.Tensor) -> int:
    """Hand the memory pages that only ``t`` occupies back to the system, where ``t`` is
    one of ``use_huge_pages``' copies that its holder is about to drop: the block stays
    alive for the others, and without this the dropped copy's pages would stay resident
    with it. Returns the bytes given back (0 for any other tensor). ``t``'s values are
    gone afterwards (its pages read as zeros)."""
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    madvise = _madvise()
    if madvise is None or not _in_block(t):
        return 0
    low, high = -(-start // 4096) * 4096, end // 4096 * 4096  # its own whole pages
    if high <= low or madvise(low, high - low, _MADV_DONTNEED):
        return 0
    return high - low
