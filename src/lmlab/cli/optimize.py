"""``lmlab optimize``: the figures of optimization from the ground up
(``lmlab.train.landscapes``): step sizes and local minima, optimizer paths on a valley and
on Rosenbrock's banana, MSE against cross-entropy, and mini-batch noise.

lmlab optimize --out runs/optimize
"""

from __future__ import annotations

from pathlib import Path

import torch
from jsonargparse import ArgumentParser

from lmlab.fileio import atomic_write_json
from lmlab.train import landscapes as L


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_argument("--out", type=str, default="runs/optimize", help="folder for the figures")
    parser.add_argument("--steps", type=int, default=60, help="steps of the optimizer paths")
    parser.add_argument("--seed", type=int, default=0, help="data of the classifier and batches")


def run(args) -> None:
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {}

    # 1. Step sizes on x^2 / 2, and the two valleys of a double well.
    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    summary["step_sizes"] = {}
    for name, lr in L.STEP_SIZES.items():
        path = L.descend(L.quadratic(), 3.0, lr, 12)[:, 0]
        summary["step_sizes"][name] = {"lr": lr, "x_after_12": path[-1].item()}
        ax1.plot(path.numpy(), marker="o", ms=3, label=f"{name} (lr {lr})")
    ax1.set(title="gradient descent on x²/2 from x = 3", xlabel="step", ylabel="x", ylim=(-8, 8))
    ax1.axhline(0, color="grey", lw=0.5)
    ax1.legend(fontsize=8)
    xs = torch.linspace(-2.1, 2.0, 200, dtype=torch.float64)
    ax2.plot(xs, [L.double_well(x[None]).item() for x in xs], color="grey")
    summary["double_well"] = {}
    for start in (-0.2, 0.5, 1.9):
        path = L.descend(L.double_well, start, 0.02, 200)[:, 0]
        summary["double_well"][str(start)] = path[-1].item()
        ax2.plot(
            path,
            [L.double_well(x[None]).item() for x in path],
            marker=".",
            ms=3,
            label=f"start {start} -> {path[-1].item():.2f}",
        )
    ax2.set(title="x⁴ - 3x² + x: the start picks the minimum", xlabel="x", ylabel="f(x)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "step_sizes.png", dpi=120)

    # 2. SGD, momentum and Adam on a valley and on Rosenbrock's banana.
    fig = Figure(figsize=(11, 4.5))
    axes = fig.subplots(1, 2)
    settings = {
        "valley": ((-8.0, 1.5), None, args.steps, (-9, 2), (-2, 2)),
        "rosenbrock": (
            (-1.5, 2.0),
            {
                "SGD": L.OptimizerSpec("sgd", 1e-3),
                "SGD + momentum 0.9": L.OptimizerSpec("sgd", 2e-4, 0.9),
                "Adam": L.OptimizerSpec("adam", 0.05),
            },
            10 * args.steps,
            (-2, 2),
            (-1, 3),
        ),
    }
    summary["paths"] = {}
    for ax, (name, (start, optimizers, steps, xlim, ylim)) in zip(axes, settings.items()):
        fn = L.FUNCTIONS[name]
        gx, gy = torch.meshgrid(
            torch.linspace(*xlim, 200, dtype=torch.float64),
            torch.linspace(*ylim, 200, dtype=torch.float64),
            indexing="xy",
        )
        z = fn(torch.stack([gx, gy]))  # the 2-D functions work on a whole grid at once
        ax.contour(gx, gy, z.log1p(), levels=25, cmap="Greys", linewidths=0.5)
        paths = L.optimizer_paths(fn, start, optimizers, steps)
        summary["paths"][name] = {}
        for label, path in paths.items():
            reached = L.steps_to_reach(path, fn, 1e-2)
            summary["paths"][name][label] = {
                "final_loss": fn(path[-1]).item(),
                "steps_to_0.01": reached,
            }
            ax.plot(
                path[:, 0],
                path[:, 1],
                marker=".",
                ms=2,
                lw=1,
                label=f"{label} (loss {fn(path[-1]).item():.3g})",
            )
        ax.set(title=f"{name}, {steps} steps", xlim=xlim, ylim=ylim)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "optimizer_paths.png", dpi=120)

    # 3. Cross-entropy against squared error for a classifier.
    curves = L.mse_vs_ce(seed=args.seed)
    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    for kind, label in (("ce", "cross-entropy"), ("mse", "squared error")):
        ax1.plot(curves[kind]["accuracy"], label=f"trained with {label}")
        ax2.plot(curves[kind]["cross_entropy"], label=f"trained with {label}")
    ax1.set(title="accuracy (3 classes, same bad start)", xlabel="step", ylabel="accuracy")
    ax2.set(title="cross-entropy of the same models", xlabel="step", yscale="log")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "mse_vs_ce.png", dpi=120)
    summary["mse_vs_ce"] = {
        kind: {"accuracy_at_20": c["accuracy"][20], "final_accuracy": c["accuracy"][-1]}
        for kind, c in curves.items()
    }
    summary["logit_gradient_when_wrong"] = L.logit_gradients(0.01)

    # 4. Mini-batch noise.
    variance = L.gradient_variance([1, 4, 16, 64, 256])
    noise = L.batch_noise(seed=args.seed)
    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.loglog(list(variance), list(variance.values()), marker="o", label="measured")
    ax1.loglog(
        list(variance), [variance[1] / b for b in variance], ls="--", label="variance(1) / B"
    )
    ax1.set(title="mini-batch gradient noise", xlabel="batch size B", ylabel="E|g_B - g|²")
    ax1.legend(fontsize=8)
    for b, losses in noise.items():
        ax2.plot(losses, label=f"batch {b}" + (" (full)" if b == max(noise) else ""))
    ax2.set(title="SGD on logistic regression", xlabel="step", ylabel="full-data loss")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "batch_noise.png", dpi=120)
    summary["gradient_variance"] = variance

    atomic_write_json(out / "optimize.json", summary)
    for name in ("step_sizes", "optimizer_paths", "mse_vs_ce", "batch_noise"):
        print(f"wrote {out / name}.png")
    valley = summary["paths"]["valley"]
    print(
        "valley, steps to a loss of 0.01: "
        + ", ".join(f"{k} {v['steps_to_0.01']}" for k, v in valley.items())
    )
    mc = summary["mse_vs_ce"]
    print(
        f"accuracy after 20 steps: cross-entropy {mc['ce']['accuracy_at_20']:.2f}, "
        f"squared error {mc['mse']['accuracy_at_20']:.2f}"
    )
