"""Training throughput: lmlab's trainer vs a plain float32 PyTorch loop (what a nanoGPT
user gets on a CPU), same architecture, same batch, same starting weights, same data.

Two shapes: the demo's ``gpt-char-tiny`` (4 layers, 192 wide, 128 context, batch 32) and a
6-layer, 384-wide, 256-context model at batch 16 (nanoGPT's shakespeare-char shape).
For each it prints tokens/s of both and their ratio, the validation loss of both after the
same number of steps from the same initial weights (lmlab must be no worse), and the model
FLOP/s of lmlab's run as a share of the bf16 matmul ceiling measured in this run.

Model FLOPs per token (Kaplan et al. 2020, PaLM appendix B): 6 N for the weights (forward
+ backward) plus 12 L T D for attention scores and their weighted sums.

Usage: python bench/train_throughput.py [--shape tiny|small|both] [--loss-steps 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmlab.checkpoint.hf import to_hf
from lmlab.data import CharTokenizer, load_corpus, split_text
from lmlab.models import build_model, get_preset
from lmlab.train import TrainConfig, train
from lmlab.train.batches import TrainBatches, fixed_batches
from lmlab.train.optim import lr_at
from machine import describe_machine  # bench/machine.py (the script's own folder)

# ----------------------------------------------------------------------------- reference


class PlainBlock(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(D, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class PlainGPT(nn.Module):
    """nanoGPT's model, condensed: the reference a CPU user would otherwise train."""

    def __init__(self, vocab: int, d: int, n_layers: int, n_heads: int, ctx: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.h = nn.ModuleList(PlainBlock(d, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def plain_from_lmlab(model) -> PlainGPT:
    """The reference with exactly the lmlab model's weights (through lmlab's HF export)."""
    c = model.config
    plain = PlainGPT(c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.max_seq_len)
    _, hf = to_hf(model)
    rename = {
        "transformer.": "",
        "attn.c_attn": "c_attn",
        "attn.c_proj": "c_proj",
        "mlp.c_fc": "c_fc",
        "mlp.c_proj": "mlp_proj",
    }
    state = {}
    for k, v in hf.items():
        for a, b in rename.items():
            k = k.replace(a, b)
        conv1d = v.dim() == 2 and any(s in k for s in ("c_attn", "c_proj", "c_fc", "mlp_proj"))
        state[k] = v.t() if conv1d else v  # HF Conv1D stores [in, out]
    plain.load_state_dict(state)
    return plain


def plain_loop(model, batches: TrainBatches, config: TrainConfig, steps: int, on_step=None):
    """The textbook loop: fp32, AdamW, clipping, the same lr schedule as lmlab."""
    decay = [
        p for n, p in model.named_parameters() if p.dim() >= 2 and "wte" not in n and "wpe" not in n
    ]
    other = [
        p
        for n, p in model.named_parameters()
        if not (p.dim() >= 2 and "wte" not in n and "wpe" not in n)
    ]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": other, "weight_decay": 0.0},
        ],
        lr=config.lr,
        betas=config.betas,
    )
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, config)
        w = batches.next_batch()
        loss = F.cross_entropy(model(w[:, :-1]).flatten(0, 1), w[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if on_step:
            on_step(step)


@torch.no_grad()
def val_loss(model, val) -> float:
    model.eval()
    losses = [
        F.cross_entropy(model(w[:, :-1]).float().flatten(0, 1), w[:, 1:].flatten()) for w in val
    ]
    model.train()
    return torch.stack(losses).mean().item()


# ----------------------------------------------------------------------------- measurements


def bf16_ceiling() -> float:
    """Best FLOP/s of a large bf16 matmul on this machine, now."""
    a = torch.randn(2048, 2048, dtype=torch.bfloat16)
    b = torch.randn(2048, 2048, dtype=torch.bfloat16)
    a @ b
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 2048**3 / best


def flops_per_token(model) -> float:
    c = model.config
    n = sum(p.numel() for p in model.parameters()) - (
        model.pos_emb.weight.numel() if model.pos_emb is not None else 0
    )
    return 6 * n + 12 * c.n_layers * c.max_seq_len * c.d_model


def lmlab_rate(model, tokens, config: TrainConfig, warmup: int) -> float:
    """tokens/s of lmlab's trainer between the end of step `warmup` and the last step."""
    marks = {}

    def on_event(e):
        if e["event"] == "train":
            marks[e["step"]] = e["elapsed_s"]

    with tempfile.TemporaryDirectory() as d:
        cfg = TrainConfig(**{**config.__dict__, "out_dir": d, "log_interval": 1})
        train(model, tokens, None, cfg, callbacks=[on_event])
    steps = cfg.max_steps - warmup
    return steps * cfg.batch_size * cfg.seq_len / (marks[cfg.max_steps] - marks[warmup])


def plain_rate(model, tokens, config: TrainConfig, warmup: int) -> float:
    marks = {}
    batches = TrainBatches(tokens, config.batch_size, config.seq_len, config.seed)
    plain_loop(
        model,
        batches,
        config,
        config.max_steps,
        on_step=lambda s: marks.__setitem__(s + 1, time.perf_counter()),
    )
    steps = config.max_steps - warmup
    return steps * config.batch_size * config.seq_len / (marks[config.max_steps] - marks[warmup])


SHAPES = {
    "tiny": dict(preset="gpt-char-tiny", overrides={}, batch_size=32, timed_steps=30),
    "small": dict(
        preset="gpt-char-small", overrides={"dropout": 0.0}, batch_size=16, timed_steps=8
    ),
}


def run_shape(
    name: str, train_ids, val_ids, vocab: int, loss_steps: int, ceiling: float, rounds: int
) -> None:
    shape = SHAPES[name]
    spec = {**get_preset(shape["preset"]), **shape["overrides"], "vocab_size": vocab}
    torch.manual_seed(0)
    init = build_model(spec)
    ctx = init.config.max_seq_len
    warmup = 3
    config = TrainConfig(
        out_dir="unused",
        max_steps=warmup + shape["timed_steps"],
        batch_size=shape["batch_size"],
        seq_len=ctx,
        lr=1e-3,
        min_lr=1e-4,
        warmup_steps=10,
        eval_interval=10**6,
        ckpt_interval=10**6,
        progress=False,
        spike_factor=None,
    )

    def fresh():
        model = build_model(spec)
        model.load_state_dict(init.state_dict())
        return model

    # Alternate the two (A B A B ...) and take medians, so that a slow spell of the
    # machine does not land on one side only.
    ours_runs, ref_runs = [], []
    for _ in range(rounds):
        ours_runs.append(lmlab_rate(fresh(), train_ids, config, warmup))
        ref_runs.append(plain_rate(plain_from_lmlab(fresh()), train_ids, config, warmup))
    ours, ref = statistics.median(ours_runs), statistics.median(ref_runs)
    spread = [o / r for o, r in zip(ours_runs, ref_runs)]
    # One extra round with TrainConfig.compile; timing starts after step 3, so the
    # compilation itself (20-40 s here) is not counted.
    compiled = lmlab_rate(fresh(), train_ids, dataclasses.replace(config, compile=True), warmup)
    mfu = ours * flops_per_token(init) / ceiling
    print(
        f"[{name}] {shape['preset']}: {sum(p.numel() for p in init.parameters()):,} parameters, "
        f"batch {shape['batch_size']} x {ctx} tokens"
    )
    print(f"  plain fp32 loop  {ref:9,.0f} tokens/s")
    print(
        f"  lmlab trainer    {ours:9,.0f} tokens/s   ratio {ours / ref:.2f}x "
        f"(median of {rounds} alternating rounds; per-round ratios {min(spread):.2f}-{max(spread):.2f})"
    )
    print(
        f"  lmlab + compile  {compiled:9,.0f} tokens/s   ratio {compiled / ref:.2f}x "
        "(one round, compilation not counted)"
    )
    print(
        f"  lmlab model FLOP/s {ours * flops_per_token(init) / 1e9:.1f} G = {mfu:.2f} of the bf16 matmul ceiling"
    )
    if loss_steps:
        val = fixed_batches(val_ids, shape["batch_size"], ctx, 10)
        cfg = TrainConfig(
            **{**config.__dict__, "max_steps": loss_steps, "warmup_steps": loss_steps // 10}
        )
        with tempfile.TemporaryDirectory() as d:
            model = fresh()
            train(model, train_ids, None, TrainConfig(**{**cfg.__dict__, "out_dir": d}))
            ours_loss = val_loss(model.float(), val)
        plain = plain_from_lmlab(fresh())
        torch.manual_seed(cfg.seed)
        plain_loop(
            plain, TrainBatches(train_ids, cfg.batch_size, cfg.seq_len, cfg.seed), cfg, loss_steps
        )
        ref_loss = val_loss(plain, val)
        print(
            f"  validation loss after {loss_steps} steps: lmlab {ours_loss:.4f}, plain fp32 {ref_loss:.4f} "
            f"(difference {ours_loss - ref_loss:+.4f})"
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shape", choices=["tiny", "small", "both"], default="both")
    ap.add_argument("--loss-steps", type=int, default=200, help="0 skips the loss comparison")
    ap.add_argument("--rounds", type=int, default=3, help="alternating timing rounds per side")
    args = ap.parse_args()
    print(describe_machine())
    text = load_corpus("tinyshakespeare")
    tok = CharTokenizer.train(text)
    train_text, val_text = split_text(text)
    train_ids = np.asarray(tok.encode(train_text), dtype=np.uint16)
    val_ids = np.asarray(tok.encode(val_text), dtype=np.uint16)
    ceiling = bf16_ceiling()
    print(
        f"bf16 matmul ceiling (2048^3): {ceiling / 1e9:.0f} GFLOP/s on {torch.get_num_threads()} threads"
    )
    for name in ["tiny", "small"] if args.shape == "both" else [args.shape]:
        run_shape(
            name,
            train_ids,
            val_ids,
            tok.vocab_size,
            args.loss_steps if name == "tiny" else 0,
            ceiling,
            args.rounds,
        )


if __name__ == "__main__":
    main()
