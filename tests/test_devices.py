"""lmlab.devices: device and dtype names, and models loaded onto a chosen device.

The CPU tests run everywhere; the ``gpu`` tests run the same paths on CUDA and skip
without one (tests/conftest.py). Which device ``auto`` picks is tested by pretending
CUDA or MPS is there.
"""

import ast
import ctypes
import os
import sys
from pathlib import Path

import pytest
import torch

import lmlab
from lmlab import devices
from lmlab.checkpoint.io import save_checkpoint
from lmlab.data.tokenizers import CharTokenizer
from lmlab.errors import ConfigError
from lmlab.models import build_model, get_preset


def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)
    assert devices.resolve_device("auto") == torch.device("cpu")
    assert devices.resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(devices, "_mps_available", lambda: True)
    assert devices.resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert devices.resolve_device("auto") == torch.device("cuda", 0)


def test_a_device_that_is_missing_or_misspelt_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)
    with pytest.raises(
        ConfigError, match=r"device='cuda:1' is not available: this machine has cpu;"
    ):
        devices.resolve_device("cuda:1")
    with pytest.raises(ConfigError, match=r"device='mps' is not available"):
        devices.resolve_device("mps")
    for bad in ("tpu", "gpu", "cuda:x", ""):
        with pytest.raises(ConfigError, match="is invalid; valid: auto, cpu, cuda, cuda:N, mps"):
            devices.resolve_device(bad)
    assert devices.resolve_device("cpu") == torch.device("cpu")
    assert devices.resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_dtype_names(monkeypatch):
    assert devices.parse_dtype("fp32") is torch.float32
    assert devices.parse_dtype("bfloat16") is torch.bfloat16
    assert devices.parse_dtype(None) is None
    monkeypatch.setattr(devices, "bf16_supported", lambda device: True)
    assert devices.parse_dtype("auto") is torch.bfloat16
    monkeypatch.setattr(devices, "bf16_supported", lambda device: False)
    assert devices.parse_dtype("auto") is torch.float32
    with pytest.raises(ConfigError, match="dtype='half' is invalid"):
        devices.parse_dtype("half")
    assert devices.bf16_supported("meta") is False


def tiny_checkpoint(tmp_path):
    tok = CharTokenizer.train("abcdefgh ")
    spec = {**get_preset("gpt-char-tiny"), "vocab_size": tok.vocab_size, "n_layers": 1}
    return save_checkpoint(tmp_path / "ckpt", build_model(spec), tokenizer=tok)


def test_load_puts_the_model_on_the_device_asked_for(tmp_path, monkeypatch):
    path = tiny_checkpoint(tmp_path)
    lm = lmlab.load(path, device="cpu")
    assert devices.model_device(lm.model) == torch.device("cpu")
    with pytest.raises(ConfigError, match="device='cuda:7' is not available"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        lmlab.load(path, device="cuda:7")


@pytest.mark.gpu
def test_load_generate_and_score_on_cuda(tmp_path):
    path = tiny_checkpoint(tmp_path)
    cpu = lmlab.load(path, device="cpu")
    gpu = lmlab.load(path, device="cuda")
    assert devices.model_device(gpu.model).type == "cuda"
    # same greedy text; perplexities agree to float32 rounding across devices
    assert gpu.generate("abc", max_new_tokens=8) == cpu.generate("abc", max_new_tokens=8)
    assert gpu.perplexity("abcdefgh abc") == pytest.approx(cpu.perplexity("abcdefgh abc"), rel=1e-4)


def train_config(tmp_path, **kw):
    from lmlab.train import TrainConfig

    base = dict(
        out_dir=str(tmp_path / "run"),
        max_steps=4,
        batch_size=2,
        seq_len=16,
        progress=False,
        eval_interval=2,
        ckpt_interval=2,
        precision="fp32",
    )
    return TrainConfig(**{**base, **kw})


def test_training_on_a_missing_device_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device='cuda' is not available"):
        lmlab.train(
            data=str(tiny_corpus(tmp_path)),
            config=train_config(tmp_path, device="cuda"),
            model_overrides={"n_layers": 1},
        )
    result = lmlab.train(
        data=str(tiny_corpus(tmp_path)),
        config=train_config(tmp_path, device="cpu"),
        model_overrides={"n_layers": 1},
    )
    assert result.step == 4


@pytest.mark.gpu
def test_train_on_cuda_and_resume_on_cpu(tmp_path):
    """A run trained on the GPU resumes on the CPU (checkpoints load onto any device) and
    ends where an uninterrupted CPU continuation of the same checkpoint ends."""
    corpus = str(tiny_corpus(tmp_path))
    result = lmlab.train(
        data=corpus, config=train_config(tmp_path, device="cuda"), model_overrides={"n_layers": 1}
    )
    assert result.step == 4
    resumed = lmlab.train(
        data=corpus,
        model_overrides={"n_layers": 1},
        config=train_config(tmp_path, device="cpu", max_steps=6, resume="auto"),
    )
    assert resumed.step == 6
    lm = lmlab.load(tmp_path / "run", device="cpu")
    assert devices.model_device(lm.model).type == "cpu"


@pytest.mark.gpu
def test_bf16_autocast_trains_on_cuda(tmp_path):
    result = lmlab.train(
        data=str(tiny_corpus(tmp_path)),
        model_overrides={"n_layers": 1},
        config=train_config(tmp_path, device="cuda", precision="bf16"),
    )
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result.val_losses)


def tiny_corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("to be or not to be, that is the question. " * 40)
    return path


@pytest.mark.parametrize(
    "flags, bf16, onednn_matvec",
    [
        ({"avx2", "avx512f", "avx512_bf16"}, True, False),  # AMD EPYC (Zen 4/5)
        ({"avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"}, True, True),  # Xeon with AMX
        ({"avx2", "fma"}, False, True),  # no native bf16: float32, oneDNN as torch has it
    ],
    ids=["avx512_bf16", "amx", "no-bf16"],
)
def test_cpu_plan_follows_the_flags(monkeypatch, flags, bf16, onednn_matvec):
    monkeypatch.setattr(devices, "cpu_flags", lambda: flags)
    devices.cpu_plan.cache_clear()
    try:
        plan = devices.cpu_plan()
        assert (plan.bf16, plan.onednn_matvec) == (bf16, onednn_matvec)
        assert set(plan.flags) == flags & {"avx512_bf16", "amx_bf16", "amx_tile"}
        assert ("oneDNN" in plan.describe()) and (
            ("no amx" in plan.describe()) != ("amx_tile" in flags)
        )
    finally:
        devices.cpu_plan.cache_clear()


def test_return_free_memory_hands_free_heap_pages_back():
    """Medium blocks freed between blocks still held stay in the C heap (glibc serves such
    sizes from it once its mmap threshold has grown); return_free_memory gives their pages
    back. Linux with glibc only: elsewhere it is a no-op, which is checked too."""
    if devices._malloc_trim() is None or not Path("/proc/self/statm").exists():
        devices.return_free_memory()  # nothing to trim with: returns quietly
        return
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.free(libc.malloc(16 << 20))  # a 16 MB free raises the mmap threshold above 4 MB
    blocks = [libc.malloc(4 << 20) for _ in range(16)]  # now from the heap
    for b in blocks:
        ctypes.memset(b, 1, 4 << 20)
    for b in blocks[:-1]:  # the last one keeps the heap's top: glibc alone returns nothing
        libc.free(b)
    before = _resident_bytes()
    devices.return_free_memory()
    assert before - _resident_bytes() > 30 << 20  # most of the 60 MB freed
    libc.free(blocks[-1])


def _resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _vm_flags(address: int) -> set[str]:
    """The VmFlags of the mapping of this process that holds ``address`` (/proc/self/smaps)."""
    inside, flags = False, set()
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split()[0]
        if "-" in first and ":" not in first:
            start, end = (int(x, 16) for x in first.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("VmFlags:"):
            flags = set(line.split()[1:])
    return flags


def test_use_huge_pages_moves_tensors_into_one_madvised_block():
    """Each tensor keeps its values, dtype and shape and becomes a view into one block
    that starts on a 2 MiB boundary and is marked for huge pages (VmFlags "hg"); a module's
    buffer stays its buffer; a non-contiguous tensor stays where it is."""
    if not devices.huge_pages_available():
        pytest.skip("no transparent huge pages here (Linux with THP 'madvise' or 'always')")
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Module()
    layer.register_buffer("q", torch.randint(-128, 128, (3 << 20,), dtype=torch.int8, generator=g))

    class Holder:
        pass

    holder = Holder()
    holder.w = torch.randn(1000, 300, generator=g).to(torch.bfloat16)
    holder.t = torch.randn(64, 32, generator=g).t()  # not contiguous: left alone
    before = (layer.q.clone(), holder.w.clone(), holder.t)
    moved = devices.use_huge_pages([(layer, "q"), (holder, "w"), (holder, "t")])
    assert moved == (3 << 20) + -(-1000 * 300 * 2 // 64) * 64
    assert torch.equal(layer.q, before[0]) and torch.equal(holder.w, before[1])
    assert holder.t is before[2] and "q" in layer._buffers
    assert layer.q.untyped_storage().data_ptr() == holder.w.untyped_storage().data_ptr()
    assert layer.q.data_ptr() % devices.HUGE_PAGE == 0
    assert "hg" in _vm_flags(layer.q.data_ptr())


def test_use_huge_pages_leaves_tensors_alone_without_them(monkeypatch):
    class Holder:
        pass

    holder = Holder()
    holder.w = torch.zeros(4 << 20, dtype=torch.uint8)
    original = holder.w
    monkeypatch.setattr(devices, "huge_pages_available", lambda: False)
    assert devices.use_huge_pages([(holder, "w")]) == 0 and holder.w is original
    monkeypatch.undo()
    holder.small = torch.zeros(1 << 20, dtype=torch.uint8)  # under one huge page: not worth it
    small = holder.small
    assert devices.use_huge_pages([(holder, "small")]) == 0 and holder.small is small


def test_empty_on_huge_pages_makes_tensors_in_one_block_that_use_huge_pages_leaves_alone(
    monkeypatch,
):
    """The tensors have the shapes and dtypes asked for, lie side by side in one block on
    a 2 MiB boundary marked for huge pages, each on a 64-byte boundary, and hold what is
    written to them; use_huge_pages moves none of them again. Without huge pages (or
    under one huge page in all) they are plain tensors."""
    if not devices.huge_pages_available():
        pytest.skip("no transparent huge pages here (Linux with THP 'madvise' or 'always')")
    a, b = devices.empty_on_huge_pages(((1000, 3, 1100), torch.int8), ((700, 5), torch.float16))
    assert (a.shape, a.dtype, b.shape, b.dtype) == (
        (1000, 3, 1100),
        torch.int8,
        (700, 5),
        torch.float16,
    )
    assert a.data_ptr() % devices.HUGE_PAGE == 0 and "hg" in _vm_flags(a.data_ptr())
    assert b.data_ptr() == a.data_ptr() + -(-3_300_000 // 64) * 64
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    a.fill_(-3)
    b.fill_(0.5)
    assert bool((a == -3).all()) and bool((b == 0.5).all())

    class Holder:
        pass

    holder = Holder()
    holder.a, holder.b = a, b
    assert devices.use_huge_pages([(holder, "a"), (holder, "b")]) == 0
    assert holder.a is a and holder.b is b
    assert devices.give_back_pages(b) > 0  # known as a block's tensor
    small = devices.empty_on_huge_pages(((1000,), torch.float32))[0]
    assert not devices.give_back_pages(small) and small.shape == (1000,)
    monkeypatch.setattr(devices, "huge_pages_available", lambda: False)
    (c,) = devices.empty_on_huge_pages(((4 << 20,), torch.uint8))
    assert c.shape == (4 << 20,) and devices.give_back_pages(c) == 0


def test_give_back_pages_frees_one_copy_of_a_block_and_keeps_the_others():
    """A copy placed by use_huge_pages that its holder drops gives its own pages back
    (resident memory falls by about its size) while its neighbour in the block keeps its
    values; a tensor from anywhere else is never touched."""
    if not devices.huge_pages_available():
        pytest.skip("no transparent huge pages here (Linux with THP 'madvise' or 'always')")

    class Holder:
        pass

    holder = Holder()
    holder.a = torch.ones(16 << 20, dtype=torch.uint8)
    holder.b = torch.full((4 << 20,), 7, dtype=torch.uint8)
    devices.use_huge_pages([(holder, "a"), (holder, "b")])
    before = _resident_bytes()
    given = devices.give_back_pages(holder.a)
    assert given >= (16 << 20) - 8192
    assert before - _resident_bytes() > 12 << 20
    assert bool((holder.b == 7).all())
    other = torch.ones(8 << 20, dtype=torch.uint8)
    assert devices.give_back_pages(other) == 0 and bool((other == 1).all())


def test_every_bench_prints_the_machine_it_ran_on():
    """Issue 21: each bench script prints the CPU's model, its speed-relevant flags and
    lmlab's choices for it (``bench/machine.py``) before its figures. A script is a bench
    when it runs as one (``__main__``); the helper modules are not. (Those that keep the
    line in the result they return print it from there.)"""
    bench = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench))
    try:
        from machine import describe_machine
    finally:
        sys.path.remove(str(bench))
    line = describe_machine()
    assert line.startswith("CPU: ") and f"threads {torch.get_num_threads()}" in line
    assert devices.cpu_plan().describe() in line
    silent = []
    for script in sorted(bench.glob("*.py")):
        tree = ast.parse(script.read_text())
        runs = any(
            isinstance(node, ast.Compare)
            and isinstance(node.left, ast.Name)
            and node.left.id == "__name__"
            for node in ast.walk(tree)
        )
        calls = any(
            isinstance(node, ast.Call) and getattr(node.func, "id", None) == "describe_machine"
            for node in ast.walk(tree)
        )
        if runs and script.name != "machine.py" and not calls:
            silent.append(script.name)
    assert not silent, f"benches that do not print describe_machine(): {silent}"
