"""Training on several processes with torch's own engine: torchrun, DDP, FSDP2, DCP.

    torchrun --nproc_per_node 2 -m lmlab train --train.parallel fsdp ...

Every process ("rank") runs the same trainer on its own share of the data; what differs
from a single process, step by step::

    ranks = setup(device)                    # torchrun's env -> init_process_group
                                             #   (gloo on a CPU, nccl on CUDA: the device decides)
    model = parallelize(model, ...)          # DDP, or FSDP2: fully_shard each block, then the root
    batches = RankBatches(batches, ranks)    # rank r takes micro-batches r, r+W, r+2W, ...
    for each of grad_accum / W micro-batches: backward  (gradients synchronised on the last)
    loss, tokens = reduce_step(...)          # every rank logs and guards the same numbers
    save_checkpoint(...)                     # dcp.save by every rank + rank 0's usual files

``grad_accum`` counts the micro-batches of one step over all ranks, so a step is the same
global batch (``batch_size * grad_accum`` windows, in the same order) on 1, 2 or 8
processes: 2 ranks with ``grad_accum=2`` compute what one process with ``grad_accum=2``
does, and a run saved on N ranks resumes on M. Only rank 0 takes the run folder's lock,
writes config.json, metrics.jsonl, plots and shows a progress bar (``FollowerRun`` is
the other ranks' silent view of the folder).

A checkpoint of a distributed run is an ordinary lmlab checkpoint (config.json, the full
weights in model.safetensors, the tokenizer, the training state: ``lmlab.load`` reads it)
plus ``dcp/``: model and optimizer state written by ``torch.distributed.checkpoint``, each
rank its own shard. DCP reshards on load, so a resume on any number of ranks, one
included (no process group), reads it.

Tests: tests/train/test_distributed.py (two CPU processes, gloo on 127.0.0.1).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmlab.checkpoint.io import attached_base
from lmlab.devices import resolve_device
from lmlab.errors import CheckpointError, ConfigError
from lmlab.train.run import RunDir, ensure_run_dir

DCP_DIR = "dcp"
"""The folder of a checkpoint that holds the DCP shards of model and optimizer."""


@dataclass(frozen=True)
class Ranks:
    """Where this process stands among the processes of one run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """Several processes train together (torch.distributed is initialised)."""
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes run files and logs."""
        return self.rank == 0

    def from_main(self, compute: Callable[[], Any]) -> Any:
        """``compute()`` on rank 0, its result (or its exception) handed to every rank.

        Keeps the ranks in step when rank 0 alone decides (which checkpoint to resume) or
        fails (a bad path): the others raise the same error instead of waiting forever.
        """
        if not self.enabled:
            return compute()
        box: list[Any] = [None]
        if self.main:
            try:
                box[0] = ("ok", compute())
            except Exception as e:
                box[0] = ("error", e)
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise value
        return value

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (one all-reduce)."""
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)], device=_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def _comm_device() -> torch.device:
    """Where collective tensors live: the current GPU under nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def setup(device: str = "auto") -> Ranks:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``), or a single process when there is none.

    The backend follows the device: nccl when the run trains on CUDA, gloo otherwise
    (nanoGPT hard-codes nccl and CUDA, so its DDP fails on CPUs: its #293, #317). On
    CUDA each rank takes GPU ``LOCAL_RANK`` (``device="auto"`` or ``"cuda"``).
    A group that exists already (a test, a caller) is used as it is.
    """
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return Ranks(dist.get_rank(), dist.get_world_size(), local)
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return Ranks()
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if device in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(local % torch.cuda.device_count())
    kind = resolve_device(device).type
    dist.init_process_group(backend="nccl" if kind == "cuda" else "gloo")
    atexit.register(_leave)
    return Ranks(rank, world, local)


def command_ranks(config, command: str) -> Ranks:
    """``setup`` for a command that writes a model after training (finetune, dpo,
    reward): rank 0 writes it, so the model must be whole there, which FSDP's is not."""
    ranks = setup(config.device)
    if ranks.enabled and config.parallel == "fsdp":
        raise ConfigError(
            f"lmlab {command} on several processes trains with parallel='ddp' (its model is "
            "written whole after training; FSDP leaves it sharded): drop --train.parallel fsdp"
        )
    return ranks


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} must be an integer") from None


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def check_grad_accum(grad_accum: int, ranks: Ranks) -> int:
    """The micro-batches each rank runs per step: ``grad_accum`` counts them over all ranks."""
    if grad_accum % ranks.world_size:
        raise ConfigError(
            f"TrainConfig.grad_accum={grad_accum} is invalid on {ranks.world_size} processes: "
            f"it counts the micro-batches of one step over all of them, so it must be a "
            f"multiple of {ranks.world_size} (e.g. {ranks.world_size * max(1, grad_accum // ranks.world_size)})"
        )
    return grad_accum // ranks.world_size


# ----------------------------------------------------------------------------- the model


def block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The ``blocks`` ModuleLists of ``model`` (a transformer's layers; an
    encoder-decoder has two): the units of gradient checkpointing and of FSDP sharding."""
    return [
        m.blocks
        for m in model.modules()
        if isinstance(getattr(m, "blocks", None), nn.ModuleList) and len(m.blocks)
    ]


def checkpoint_blocks(model: nn.Module) -> int:
    """Gradient checkpointing: each block keeps only its input in the forward pass and
    recomputes its activations in the backward pass (``torch.utils.checkpoint``,
    non-reentrant). Memory for activations falls from one set per block to one block's,
    for about one extra forward of compute. Returns the number of blocks wrapped.

    The model's code and state-dict names stay as they are: each block's ``forward`` is
    replaced on the instance by a checkpointed call of the original.
    """
    blocks = [block for blocks in block_lists(model) for block in blocks]
    if not blocks:
        raise ConfigError(
            f"grad_checkpoint=True needs a model made of transformer blocks (a 'blocks' "
            f"list); {type(model).__name__} has none: use grad_checkpoint=False"
        )
    for block in blocks:
        if "forward" not in vars(block):  # not wrapped already (a second train() call)
            block.forward = functools.partial(_checkpointed, block.forward)
    return len(blocks)


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():  # evaluation: nothing to save memory on
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def parallelize(model: nn.Module, parallel: str, ranks: Ranks, bf16: bool) -> nn.Module:
    """The module the training step calls: ``model`` itself in one process, DDP around it,
    or ``model`` sharded in place by FSDP2.

    FSDP2 (``fully_shard``) shards every block, then the root (embeddings, final norm,
    output layer, tied weights together): each rank keeps 1/W of every parameter,
    gradient and optimizer state, and gathers a block's weights only while it runs.
    With ``bf16`` it computes in bf16 and reduces gradients in float32
    (``MixedPrecisionPolicy``); the stored parameters stay float32. Frozen parameters
    (LoRA's base weights) are sharded too and get no gradient (litgpt's LoRA failed
    under DDP: its #834; here both work).
    """
    if not ranks.enabled:
        return model
    if parallel == "ddp":
        device = next(model.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # deferred: 1.6 s

    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    for blocks in block_lists(model):
        for block in blocks:
            fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are DTensor shards (FSDP2)."""
    from torch.distributed.tensor import DTensor  # deferred: loaded with FSDP

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (FSDP2's gradient norm) or the tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor, or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


@contextlib.contextmanager
def gradient_sync(module: nn.Module, sync: bool) -> Iterator[None]:
    """Let the next backward synchronise gradients across ranks only if ``sync`` (the last
    micro-batch of a step): earlier ones just accumulate locally, saving communication."""
    if sync:
        yield
    elif isinstance(module, nn.parallel.DistributedDataParallel):
        with module.no_sync():
            yield
    elif hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def reduce_step(loss: torch.Tensor, counted, processed: int, ranks: Ranks):
    """Every rank's (mean loss, tokens the loss is on, tokens processed) -> the global
    ones: the mean of the ranks' mean losses (equal micro-batches, so the mean over the
    global batch) and the sums of the token counts. One all-reduce."""
    numbers = torch.stack(
        [
            loss.detach().double(),
            torch.as_tensor(counted, dtype=torch.float64, device=loss.device),
            torch.tensor(float(processed), dtype=torch.float64, device=loss.device),
        ]
    )
    dist.all_reduce(numbers)
    mean = (numbers[0] / ranks.world_size).to(loss.dtype)
    counted = numbers[1] if isinstance(counted, torch.Tensor) else int(numbers[1].item())
    return mean, counted, int(numbers[2].item())


# ----------------------------------------------------------------------------- data


class RankBatches:
    """Rank ``r``'s share of a stream of micro-batches: those numbered r, r + W, r + 2W, ...

    Every rank walks the same global stream (same seed, same position), so the position
    (``state_dict``) is the same on all of them after each step and a checkpoint written
    on W ranks resumes on any number. Batches of other ranks are skipped with the
    stream's ``skip()`` when it has one (nothing read), else drawn and dropped.
    """

    def __init__(self, batches, ranks: Ranks):
        self.batches = batches
        self.ranks = ranks

    def next_batch(self):
        mine = None
        for r in range(self.ranks.world_size):
            if r == self.ranks.rank:
                mine = self.batches.next_batch()
            elif hasattr(self.batches, "skip"):
                self.batches.skip()
            else:
                self.batches.next_batch()
        return mine

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)

    def __getattr__(self, name: str):  # a supervised stream's extra methods (metrics, ...)
        if name == "batches":
            raise AttributeError(name)
        return getattr(self.batches, name)


# ----------------------------------------------------------------------------- run files


class FollowerRun(RunDir):
    """The run folder as ranks other than 0 see it: they read it, but never lock it, log
    into it or write its files (checkpoints: their DCP shards only, in
    ``save_checkpoint``)."""

    @contextlib.contextmanager
    def owned(self):
        ensure_run_dir(self.path)
        yield self

    def clean(self) -> None:
        pass

    def record(self, config: dict[str, Any]) -> None:
        pass

    def open_metrics(self, log=None, start_step=None) -> None:
        pass

    def emit(self, record: dict[str, Any]) -> None:
        pass


def save_checkpoint(
    run: RunDir,
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    ranks: Ranks,
    **files: Any,
) -> Path:
    """Write checkpoint ``path`` of a distributed run; every rank calls it.

    All ranks write their shards of model and optimizer state with ``dcp.save`` into a
    hidden staging folder; rank 0 then writes the ordinary checkpoint (``RunDir.save``:
    config, full weights gathered from the shards, tokenizer, ``files["train_state"]``)
    with the staging folder moved inside it as ``dcp/`` before the completion marker,
    so a crash at any point leaves no complete-looking checkpoint that lacks a part.
    ``files``: ``RunDir.save``'s keyword arguments.
    """
    # deferred: DCP loads FSDP's modules
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict  # deferred, as above

    staging = path.parent / ranks.from_main(
        lambda: f".{path.name}.dcp-{uuid.uuid4().hex[:8]}"
    )  # ".step-N..." : a crash leaves what RunDir.clean removes
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=staging)
    weights = full_weights(model) if is_sharded(model) else None  # a collective
    saved = path
    if ranks.main:
        saved = run.save(path, model, step, weights=weights, extra_dirs={DCP_DIR: staging}, **files)
    run.last_saved = step
    ranks.barrier()  # nobody reads the checkpoint before it is complete
    return saved


def full_weights(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The full state dict of a sharded model on rank 0's CPU (None on the others), as
    ``save_checkpoint`` stores it: each tied tensor under its first name only and, when
    the model records a base (PEFT), only the tensors that train."""
    # deferred: DCP loads FSDP's modules
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(model, options=options)
    if not full:
        return None
    first: dict[int, str] = {}
    keep = []
    trains_only = attached_base(model) is not None
    for name, tensor in model.state_dict(keep_vars=True).items():
        if first.setdefault(id(tensor), name) != name:
            continue  # a tied alias
        if trains_only and not tensor.requires_grad:
            continue
        keep.append(name)
    return {name: full[name] for name in keep}


def has_sharded_state(ckpt: Path) -> bool:
    return (Path(ckpt) / DCP_DIR).is_dir()


def load_checkpoint(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Model and optimizer state from a checkpoint's ``dcp/``, resharded for this run:
    any number of ranks, or one process without a process group."""
    # deferred: DCP loads FSDP's modules
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict  # deferred

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    try:
        with warnings.catch_warnings():  # "... assuming ... a single process": it is meant
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=Path(ckpt) / DCP_DIR)
    except Exception as e:
        raise CheckpointError(
            f"cannot load the distributed state in {str(Path(ckpt) / DCP_DIR)!r}: {e}"
        ) from e
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )
