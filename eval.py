"""Sampling and metrics for realuid checkpoints.

    python eval.py sample runs/8gaussians/checkpoint.pt --n 5000 --out samples.npy [--ema 0.999]
    python eval.py sample runs/8gaussians/teacher.pt --n 5000 --out teacher.npy --steps 100

Toy-data metrics: exact W2 between equal-size point clouds (an optimal
assignment, scipy's linear_sum_assignment) and the energy distance.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch

from realuid import FlowMatching, OneStepGenerator, UsageError, fail, load_field


# =============================================================================
# Toy-data metrics
# =============================================================================

def w2_distance(x, y):
    """Exact 2-Wasserstein distance between two empirical measures of n points each."""
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) != len(y):
        raise ValueError(f"W2 by assignment needs equal sizes (got {len(x)} and {len(y)})")
    cost = cdist(x, y, "sqeuclidean")
    rows, cols = linear_sum_assignment(cost)
    return float(np.sqrt(cost[rows, cols].mean()))


def energy_distance(x, y):
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (V-statistic; zero iff the laws agree)."""
    from scipy.spatial.distance import cdist
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return float(2 * cdist(x, y).mean() - cdist(x, x).mean() - cdist(y, y).mean())


# =============================================================================
# Sampling
# =============================================================================

def class_labels(n, num_classes, device):
    return None if num_classes is None else torch.arange(n, device=device) % num_classes


@torch.no_grad()
def sample_field(net, n, shape, device, steps=None, num_classes=None, seed=0, batch_size=4096):
    """n samples: the one-step generator G(z) = z + g(0, z) when steps is None, else Euler with steps."""
    gen = torch.Generator(device=device).manual_seed(seed)
    net = net.to(device).eval()
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        z = torch.randn(b, *shape, generator=gen, device=device)
        y = class_labels(n, num_classes, device)[start:start + b] if num_classes else None
        x = OneStepGenerator(net)(z, y) if steps is None else FlowMatching().sample(net, z, steps, y)
        out.append(x.float().cpu())
    return torch.cat(out)


def to_data_units(x, data_info):
    """Undo the standardisation of low-dimensional data."""
    if data_info.get("mean") is not None:
        x = x * torch.tensor(data_info["std"]) + torch.tensor(data_info["mean"])
    return x.numpy()


def report_lowdim(state, data, out, device, seed=0):
    """The default run's closing table: W2 and energy distance to held-out real data, and a scatter plot."""
    n, info = len(data.x_test), data.info("")
    real = data.x_test.numpy()
    shape, k = tuple(data.x.shape[1:]), data.num_classes
    floor = data.x[torch.randperm(len(data.x), generator=torch.Generator().manual_seed(seed))[:n]]
    rows = {"real training points": floor,  # the metric's finite-sample floor
            "teacher, 1 step": sample_field(state.teacher, n, shape, device, 1, k, seed),
            "teacher, 100 steps": sample_field(state.teacher, n, shape, device, 100, k, seed),
            "RealUID generator, 1 step": sample_field(state.generator.g, n, shape, device, None, k, seed)}
    for decay, net in state.ema.items():
        rows[f"RealUID EMA {decay}, 1 step"] = sample_field(net, n, shape, device, None, k, seed)
    results = {}
    print(f"\n{'model':<30} {'W2':>8} {'energy':>8}   (to {n} held-out real points)")
    for name, x in rows.items():
        x = to_data_units(x, info)
        results[name] = dict(w2=w2_distance(x, real), energy=energy_distance(x, real))
        print(f"{name:<30} {results[name]['w2']:8.4f} {results[name]['energy']:8.4f}")
        rows[name] = x
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    if real.shape[1] >= 2:
        plot_points(real, rows, results, os.path.join(out, "samples.png"))
        print(f"\nscatter plot of real and generated points: {os.path.join(out, 'samples.png')}")
    return results


def plot_points(real, rows, results, path):
    """Real points beside the teacher at 1 and 100 steps and the best one-step generator."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    best = min((name for name in rows if name.startswith("RealUID")), key=lambda name: results[name]["w2"])
    names = ["real (held out)", "teacher, 1 step", "teacher, 100 steps", best]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 4), sharex=True, sharey=True)
    for ax, name in zip(axes, names):
        x = real if name.startswith("real") else rows[name]
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5, color="k" if name.startswith("real") else "C0")
        ax.set_title(name, fontsize=10)
        ax.set_aspect("equal")
    lim = 1.2 * np.abs(real[:, :2]).max()
    axes[0].set_xlim(-lim, lim)
    axes[0].set_ylim(-lim, lim)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cmd_sample(args):
    if args.n < 1:
        raise UsageError("--n must be positive")
    net, ckpt = load_field(args.checkpoint, "checkpoint", args.ema)
    info = ckpt.get("data") or {}
    steps = None if ckpt.get("kind") == "generator" else (args.steps or 100)
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    x = sample_field(net, args.n, tuple(info["shape"]), device, steps, info.get("num_classes"), args.seed)
    x = to_data_units(x, info)
    if info.get("kind") == "image":
        x = np.round((np.clip(x, -1, 1) + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.save(args.out, x)
    what = "one-step generator" if steps is None else f"teacher, {steps} Euler steps"
    print(f"wrote {args.n} samples ({what}) of shape {x.shape[1:]} to {args.out}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Sampling and metrics for realuid checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="write samples of a checkpoint to a .npy file")
    s.add_argument("checkpoint", help="checkpoint.pt of realuid.py or teacher.pt of teacher.py")
    s.add_argument("--n", type=int, default=10_000, help="number of samples")
    s.add_argument("--out", default="samples.npy", help="output .npy file")
    s.add_argument("--ema", type=float, default=None, help="EMA decay to sample (default: the smallest)")
    s.add_argument("--steps", type=int, default=None,
                   help="Euler steps of a teacher (default 100); a generator always takes one")
    s.add_argument("--device", default="auto")
    s.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        {"sample": cmd_sample}[args.command](args)
    except UsageError as e:
        return fail("eval.py", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
