"""Runs of the trainer on several CPU processes (gloo over 127.0.0.1), for
tests/train/test_distributed.py: ``spawn(fn, world, *args)`` calls ``fn(rank, *args)`` in
``world`` fresh processes that form one process group the way torchrun's do (the
trainer joins it from the environment). Functions sent to the processes live here, in an
importable module, since spawned processes import them by name."""

import json
import os
import socket
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lmlab.finetune  # noqa: F401  (registers LoRA with checkpoint/)
from lmlab.finetune import LoRAConfig, apply_lora
from lmlab.models import build_model, get_preset
from lmlab.train import TrainConfig, train
from lmlab.train.distributed import local_part

VOCAB = 16
SHORT = 20  # steps of the LoRA and bf16 runs


def tiny_spec() -> dict:
    """A 2-block GPT of about 5,000 parameters over 16 tokens."""
    return {
        **get_preset("gpt-char-tiny"),
        "vocab_size": VOCAB,
        "d_model": 16,
        "n_layers": 2,
        "n_heads": 2,
        "d_ff": 32,
        "max_seq_len": 16,
    }


def tiny_model(lora: bool = False, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(tiny_spec())
    if lora:
        apply_lora(model, LoRAConfig(r=2, alpha=4.0, targets=("q_proj", "v_proj", "up_proj")))
    return model


def walk_tokens(n: int = 4000, seed: int = 0) -> np.ndarray:
    """A learnable stream: each token is the previous one plus 1 or 2 (mod 16)."""
    steps = np.random.default_rng(seed).integers(1, 3, size=n)
    return (np.cumsum(steps) % VOCAB).astype(np.uint16)


def run_config(out_dir, **changes) -> TrainConfig:
    """50 float32 steps of 2 x 4 windows of 8 tokens (2 micro-batches), checkpoints every 25."""
    settings = dict(
        out_dir=str(out_dir),
        max_steps=50,
        batch_size=4,
        seq_len=8,
        grad_accum=2,
        lr=1e-2,
        min_lr=1e-3,
        warmup_steps=5,
        ckpt_interval=25,
        keep_last=None,
        log_interval=10,
        spike_factor=None,
        precision="fp32",
        device="cpu",
        progress=False,
        seed=3,
    )
    return TrainConfig(**{**settings, **changes})


def lr_for(lora: bool) -> float:
    """LoRA's few parameters (B starts at zero) learn at a higher rate."""
    return 5e-2 if lora else 1e-2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world: int, *args) -> None:
    """``fn(rank, *args)`` on ``world`` processes joined as one gloo group on 127.0.0.1."""
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        GLOO_SOCKET_IFNAME="lo",  # loopback only
    )
    torch.set_num_threads(1)
    try:
        fn(rank, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def param_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters this process holds (its shards under FSDP)."""
    return sum(local_part(p).numel() * p.element_size() for p in model.parameters())


def train_scenarios(rank: int, root: str) -> None:
    """DDP and FSDP2 runs of ``run_config`` (50 steps), LoRA under both and FSDP2 in bf16
    (``SHORT`` steps); each rank writes what it saw to ``root/<name>-rank<r>.json``."""
    tokens = walk_tokens()
    scenarios = {
        "ddp": dict(parallel="ddp"),
        "fsdp": dict(parallel="fsdp"),
        "lora-ddp": dict(parallel="ddp", lora=True, max_steps=SHORT),
        "lora-fsdp": dict(parallel="fsdp", lora=True, max_steps=SHORT),
        "fsdp-bf16": dict(parallel="fsdp", precision="bf16", max_steps=SHORT),
    }
    for name, how in scenarios.items():
        model = tiny_model(lora=how.get("lora", False))
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        full = param_bytes(model)
        config = run_config(
            Path(root) / name,
            parallel=how["parallel"],
            lr=lr_for(how.get("lora")),
            precision=how.get("precision", "fp32"),
            max_steps=how.get("max_steps", 50),
        )
        result = train(model, tokens, None, config)
        record = {
            "losses": result.train_losses,
            "param_bytes": param_bytes(model),
            "full_param_bytes": full,
            "tokens_per_s": result.tokens_per_s,
            "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        }
        if how["parallel"] == "ddp":  # the replicated weights: which ones changed
            after = model.state_dict()
            record["changed"] = sorted(k for k in before if not torch.equal(before[k], after[k]))
        Path(root, f"{name}-rank{rank}.json").write_text(json.dumps(record))


def write_finetune_base(root: Path) -> None:
    """A tiny GPT checkpoint with a BPE tokenizer (``root/base``) and 60 instruction rows
    of the bundled "reverse" task (``root/tasks.jsonl``), as tests/finetune builds them."""
    from lmlab.checkpoint.io import save_checkpoint
    from lmlab.data import BPETokenizer
    from lmlab.data.tasks import generate_tasks, write_jsonl

    rows = generate_tasks(["reverse"], 60, seed=0)
    write_jsonl(rows, root / "tasks.jsonl")
    text = "\n".join(f"{r['instruction']} {r['input']} {r['output']}" for r in rows)
    tok = BPETokenizer.train(text + " ### Instruction: Response:", 400)
    torch.manual_seed(0)
    spec = {**tiny_spec(), "vocab_size": tok.vocab_size, "max_seq_len": 64}
    save_checkpoint(root / "base", build_model(spec).eval(), tokenizer=tok)


def finetune_config(out_dir, **changes) -> TrainConfig:
    """10 LoRA steps of 2 x 4 examples; validation at the end."""
    settings = dict(
        out_dir=str(out_dir),
        max_steps=10,
        batch_size=4,
        grad_accum=2,
        lr=1e-2,
        warmup_steps=2,
        eval_interval=10,
        ckpt_interval=10,
        precision="fp32",
        device="cpu",
        progress=False,
        seed=0,
    )
    return TrainConfig(**{**settings, **changes})


def run_finetune(root: Path, name: str, **changes):
    from lmlab.finetune.run import finetune

    return finetune(
        str(root / "base"),
        str(root / "tasks.jsonl"),
        method="lora",
        max_len=64,
        config=finetune_config(root / name, **changes),
    )


def finetune_ranks(rank: int, root: str) -> None:
    """``finetune`` (LoRA) on every rank: refused under FSDP, trained under DDP."""
    from lmlab.errors import ConfigError

    root = Path(root)
    record = {}
    try:
        run_finetune(root, "refused", parallel="fsdp")
    except ConfigError as e:
        record["fsdp_error"] = str(e)
    result = run_finetune(root, "ddp", parallel="ddp")
    record["losses"] = result.train.train_losses
    record["val_losses"] = result.train.val_losses
    record["model_dir"] = None if result.model_dir is None else str(result.model_dir)
    Path(root, f"finetune-rank{rank}.json").write_text(json.dumps(record))
