"""Sampling and metrics for realuid checkpoints.

    python eval.py sample runs/8gaussians --n 5000 --out samples.npy [--ema 0.99]
    python eval.py sample runs/digits --n 100 --out digits.npz        # + digits.png, a grid
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

from realuid import (UsageError, fail, latest_checkpoint, load_field, resolve_device, sample_field,
                     save_grid)


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
    kw = {}
    if args.resolution:
        kw = dict(image_size=args.resolution)
    net, ckpt = load_field(latest_checkpoint(args.checkpoint), "checkpoint", args.ema, **kw)
    info = ckpt.get("data") or {}
    steps = None if ckpt.get("kind") == "generator" else (args.steps or 100)
    device = resolve_device(args.device)
    x = sample_field(net, args.n, tuple(info["shape"]), device, steps, info.get("num_classes"), args.seed)
    what = "one-step generator" if steps is None else f"teacher, {steps} Euler steps"
    out = args.out
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    if info.get("kind") == "image":
        save_grid(x[:min(len(x), args.grid)], os.path.splitext(out)[0] + ".png")
        images = np.round((x.clamp(-1, 1).numpy() + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)
        if out.endswith(".npz"):
            labels = np.arange(args.n) % info["num_classes"] if info.get("num_classes") else None
            np.savez(out, images=images, **({} if labels is None else dict(labels=labels)))
        elif out.endswith(".npy"):
            np.save(out, images)
        else:  # a folder of PNGs, as clean-fid reads them
            from PIL import Image
            os.makedirs(out, exist_ok=True)
            for i, im in enumerate(images):
                Image.fromarray(im.squeeze(-1) if im.shape[-1] == 1 else im).save(os.path.join(out, f"{i:06d}.png"))
        print(f"wrote {args.n} images ({what}) to {out} and a grid to {os.path.splitext(out)[0]}.png")
    else:
        np.save(out, to_data_units(x, info))
        print(f"wrote {args.n} samples ({what}) of shape {tuple(x.shape[1:])} to {out}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Sampling and metrics for realuid checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="write samples of a checkpoint to a .npy file")
    s.add_argument("checkpoint", help="a realuid.py checkpoint or output folder, or a teacher file")
    s.add_argument("--n", type=int, default=10_000, help="number of samples")
    s.add_argument("--out", default="samples.npy",
                   help="a .npy file; for images also .npz (images, labels) or a folder of PNGs, plus a PNG grid")
    s.add_argument("--grid", type=int, default=100, help="images in the PNG grid")
    s.add_argument("--resolution", type=int, default=0, help="image side, for torchcfm / official teacher files")
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
