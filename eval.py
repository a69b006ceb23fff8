"""Sampling, FID, toy-data metrics and efficiency figures for realuid checkpoints.

    python eval.py sample runs/8gaussians --n 5000 --out samples.npy [--ema 0.99]
    python eval.py sample runs/digits --n 100 --out digits.npz        # + digits.png, a grid
    python eval.py sample runs/8gaussians/teacher.pt --n 5000 --out teacher.npy --steps 100
    python eval.py fid runs/c10 --ema 0.9999          # the paper's protocol: 50k samples, clean-fid
                                                      # legacy_tensorflow, CIFAR-10 train statistics, 3 runs
    python eval.py fid runs/digits --features runs/digits/teacher.pt   # offline, not comparable to papers
    python eval.py classifier                         # digits' own yardstick, in seconds: then --features classifier
    python eval.py efficiency runs/c10                # the paper's Table 5: parameters, ms/image, memory
    python eval.py export runs/c10 --ema 0.9999 --out generator.safetensors   # weights to share, no pickle

    python eval.py bench --ladder                     # ms per update: the straightforward loop against ours
    python eval.py reproduce --quick                  # the paper's claims at laptop scale, in minutes
    python eval.py families --uid --seeds 3           # every matching model on 2D: teacher against one step
    python eval.py kernel runs/families/modes-arc/*/teacher.pt   # how each one-step generator couples the modes

The commands live here; the scores they share with a training run's model selection (exact W2, the energy
distance, mode coverage, FID's features and Frechet distance, the closing table) live in runtime.py.
"""

import copy
import functools
import gc
import json
import math
import os
import shlex
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from realuid import (Config, Diffusion, RealUID, UNet, build_field, generate, load_field, main as realuid_main,
                     matching_model, read_field_checkpoint, realuid_generator_loss, realum_loss, sample_field,
                     teacher_step, train_teacher, variant, weighted_mean)
from runtime import (CLASSIFIER_KIND, DATA_FIELDS, DEGRADATIONS, FID, MIXTURES, PRECISIONS, TEACHER_RECIPES, VERSION,
                     Data, DigitClassifier, HeldOut, Parser, TeacherConfig, UsageError, classifier_path, config_dict,
                     count_parameters, cycled, fail, latest_checkpoint, load_checkpoint, load_data, load_digits,
                     load_reference_data, make_config, pair_grid, paired_scores, pyplot, refusing, resolve_device,
                     save_checkpoint, save_grid, save_json, selection_wins, set_precision, stored_matching,
                     teacher_recipes, to_data_units, to_uint8, use_bf16)


# =============================================================================
# Efficiency (the paper's Table 5): parameters, time per image, peak memory
# =============================================================================

def rss_bytes(field="VmRSS"):
    """This process's resident (VmRSS) or peak resident (VmHWM) memory on Linux; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # "5" resets the peak resident size VmHWM to the current one (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory(device, base):
    """(peak allocated, peak reserved) on CUDA; (peak resident above the process before the network, None)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    peak = rss_bytes("VmHWM")
    return (None if peak is None or base is None else peak - base), None


def time_sampling(net, shape, device, batch, steps, num_classes, repeats, budget, matching=None):
    """Median seconds of one batch (steps None: one-step generator), after two one-step warm-up calls."""
    sources = torch.zeros(batch, *shape) if matching is not None and matching.coupled else None

    def run(s):
        next(generate(net, batch, shape, device, s, num_classes, batch_size=batch, matching=matching,
                      sources=sources))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    for _ in range(2):
        run(None)
    times, start = [], time.perf_counter()
    while len(times) < repeats and (not times or time.perf_counter() - start < budget):
        t0 = time.perf_counter()
        run(steps)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), len(times)


def efficiency(net, shape, device, num_classes, batches, teacher_steps, repeats=10, budget=20.0, base=None,
               matching=None):
    rows = []
    for what, steps in [("one-step generator", None)] + [(f"teacher, {n} steps", n) for n in teacher_steps]:
        for batch in batches:
            reset_peak_memory(device)
            seconds, runs = time_sampling(net, shape, device, batch, steps, num_classes, repeats, budget, matching)
            allocated, reserved = peak_memory(device, base)
            rows.append(dict(model=what, batch=batch, ms_per_image=1000 * seconds / batch, runs=runs,
                             peak_bytes=allocated, reserved_bytes=reserved))
    return rows


# =============================================================================
# Benchmark: the optimised loop against the straightforward Algorithm 1
# =============================================================================

HABITS = ("a garbage collection every update", "EMA by a state_dict copy loop",
          "separate real and generated forwards", "gradients of the frozen networks", "PyTorch's default Adam")


class StraightforwardRealUID(RealUID):
    """Algorithm 1 as the public reference code runs it, with its habits (HABITS): a garbage collection every
    update, the EMA through a state_dict copy loop, separate forward passes over generated and real x_t,
    parameter gradients for the frozen teacher and fake model, and Adam's per-tensor loop. Plain RealUID
    (eqs. 16-17), fp32: the baseline of `eval.py bench` (which drops the habits one at a time) and of the test
    that the optimised path computes the same losses and updates."""

    def __init__(self, *args, habits=HABITS, **kw):
        super().__init__(*args, **kw)
        self.habits, self.bf16 = set(habits), False
        if HABITS[3] in self.habits:
            self.teacher.requires_grad_(True)
        for group in self.opt_fake.param_groups + self.opt_gen.param_groups if HABITS[4] in self.habits else ():
            group["fused"] = None  # a loop over tensors on a CPU, foreach on CUDA

    def fake_step(self, x_real, y=None):
        if HABITS[2] not in self.habits:
            return self._collect(super().fake_step(x_real, y))
        cfg, m = self.cfg, self.matching
        with torch.no_grad():
            x_gen = self.generator(torch.randn_like(x_real), y)
        x0, t = m.noise(x_real, y), m.distill_t(x_real.shape[0], x_real.device)
        f_gen = self.fake(t, m.path(x0, x_gen, t), y)
        f_real = self.fake(t, m.path(x0, x_real, t), y)
        # eq. 16
        loss = weighted_mean(realum_loss(f_gen, m.target(x0, x_gen, t), f_real, m.target(x0, x_real, t),
                                         cfg.alpha, cfg.beta), m.weight(t))
        return self._update(loss, self.opt_fake, self.sched_fake, self.fake)

    def generator_step(self, y=None, shape=None, device=None):
        if HABITS[3] not in self.habits:
            return self._collect(super().generator_step(y, shape, device))
        cfg, m = self.cfg, self.matching
        x_gen = self.generator(torch.randn(shape, device=device), y)
        x0, t = m.noise(x_gen, y), m.distill_t(shape[0], device)
        x_t = m.path(x0, x_gen, t)
        # eq. 17; the backward pass also fills the teacher's and the fake model's unused .grad
        f_star = self.teacher(t, x_t, y)
        loss = weighted_mean(realuid_generator_loss(f_star, self.fake(t, x_t, y), m.target(x0, x_gen, t),
                                                    cfg.alpha, cfg.beta), m.generator_weight(t, x_t, x_gen, f_star))
        return self._update(loss, self.opt_gen, self.sched_gen, self.generator, emas=True)

    def update_emas(self):
        if HABITS[1] not in self.habits:
            return super().update_emas()
        for decay, ema_net in self.ema_decays():
            straightforward_ema(ema_net, self.generator.g, decay)

    def _update(self, loss, optimiser, sched, net, emas=False):
        optimiser.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), self.cfg.grad_clip)
        optimiser.step()
        sched.step()
        if emas:
            self.update_emas()
        self.step += 1
        return self._collect((loss.detach(), grad_norm))

    def _collect(self, result):
        if HABITS[0] in self.habits:
            gc.collect()
        return result


@torch.no_grad()
def straightforward_ema(ema_net, net, decay):
    source = net.state_dict()
    for name, value in ema_net.state_dict().items():
        value.copy_(decay * value + (1 - decay) * source[name])


BENCH_UNETS = dict(  # cifar10: the paper's network; small: a reduced one that runs in a minute on a laptop CPU
    cifar10=dict(type="unet", in_channels=3, image_size=32, channels=128, channel_mult=[1, 2, 2, 2],
                 num_res_blocks=2, attention_resolutions=[16], num_heads=4, num_head_channels=64, dropout=0.0),
    small=dict(type="unet", in_channels=3, image_size=16, channels=32, channel_mult=[1, 2], num_res_blocks=1,
               attention_resolutions=[8], num_heads=4, num_head_channels=32, dropout=0.0))


def bench_state(spec, device, precision="fp32", habits=None, channels_last=False, compile=False, seed=0, **cfg):
    """A RealUID state on random networks (time and memory do not depend on the weights); with habits, the
    straightforward loop that has them."""
    torch.manual_seed(seed)
    teacher = build_field(spec).to(device)
    fake, g = copy.deepcopy(teacher), copy.deepcopy(teacher)
    for net in (teacher, fake, g):
        net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        if compile:
            net.compile()
    config = Config(precision=precision, **cfg)
    if not habits:
        return RealUID(config, teacher, fake, g, fake_spec=spec, bf16=use_bf16(precision, device, spec))
    return StraightforwardRealUID(config, teacher, fake, g, fake_spec=spec, habits=habits)


def timed(fn, device, warmup, repeats, budget):
    """(median seconds, runs) of fn after warm-up calls; no new run starts after budget seconds."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for _ in range(warmup):
        fn()
    sync()
    times, start = [], time.perf_counter()
    while len(times) < repeats and (not times or time.perf_counter() - start < budget):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), len(times)


def peak_matmul(device, dtype, n=None, repeats=10):
    """The machine's matrix throughput in FLOP/s, measured on a large square product in dtype."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    seconds, _ = timed(lambda: a @ b, device, 2, repeats, 30.0)
    return 2 * n ** 3 / seconds


def iteration_flops(state, x):
    """Matrix FLOPs (forward and backward) of one iteration: K fake updates and one generator update."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        run_iteration(state, x)
    return counter.get_total_flops()


def run_iteration(state, x):
    for _ in range(state.cfg.K):
        state.fake_step(x)
    state.generator_step(None, x.shape, x.device)


def straightforward_teacher_step(net, optimiser, ema, m, x1, grad_clip):
    x0, t = m.noise(x1), m.sample_t(x1.shape[0], x1.device)
    loss = ((net(t, m.path(x0, x1, t)) - m.target(x0, x1, t)) ** 2).flatten(1).sum(1).mean()
    optimiser.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    optimiser.step()
    for decay, ema_net in ema.items():
        straightforward_ema(ema_net, net, decay)
    gc.collect()


def bench_input(spec, batch, device):
    return torch.randn(batch, spec["in_channels"], spec["image_size"], spec["image_size"], device=device)


def bench(spec, device, batch, precision="auto", K=5, warmup=2, repeats=10, budget=30.0, base=None, log=print):
    """Rows of (what, implementation, median ms, images/s, peak memory) for the straightforward loop, the
    optimised one in fp32 and, where --precision makes it bf16, the optimised one in bf16."""
    x = bench_input(spec, batch, device)
    impls = [("straightforward", HABITS, "fp32"), ("optimised fp32", None, "fp32")]
    if use_bf16(precision, device, spec):
        impls.append(("optimised bf16", None, "bf16"))
    rows = []
    for impl, habits, prec in impls:
        state = bench_state(spec, device, prec, habits, K=K, batch_size=batch)
        net, m = state.fake, state.matching
        ema = {0.9999: copy.deepcopy(net).requires_grad_(False)}
        if habits:
            teacher = lambda: straightforward_teacher_step(net, state.opt_fake, ema, m, x, 1.0)
        else:
            teacher = lambda: teacher_step(net, state.opt_fake, state.sched_fake, ema, m, x, None, 1.0, state.bf16)
        one_step = lambda: next(generate(state.generator.g, batch, tuple(x.shape[1:]), device, batch_size=batch,
                                         bf16=state.bf16))
        for what, fn, images in [("teacher step", teacher, batch), ("fake step", lambda: state.fake_step(x), batch),
                                 ("generator step", lambda: state.generator_step(None, x.shape, device), batch),
                                 (f"iteration (K={K} + 1)", lambda: run_iteration(state, x), (K + 1) * batch),
                                 ("one-step inference", one_step, batch)]:
            reset_peak_memory(device)
            seconds, runs = timed(fn, device, warmup, repeats, budget)
            rows.append(dict(what=what, impl=impl, ms=1000 * seconds, images_per_s=images / seconds, runs=runs,
                             peak_bytes=peak_memory(device, base)[0]))
            log(f"  {impl:<17} {what:<22} {1000 * seconds:9.1f} ms  ({runs} runs)")
        del state
        gc.collect()
    return rows


def ladder(spec, device, batch, K=5, warmup=2, repeats=10, budget=30.0, compile=False, log=print):
    """Iteration times as the straightforward loop drops its habits one at a time (each rung keeps the drops
    above it; the last is the optimised fp32 loop), then each optional speed-up on the optimised loop alone:
    [(change, ms)]."""
    x = bench_input(spec, batch, device)
    rungs = [("straightforward", dict(habits=HABITS))]
    rungs += [(f"- {h}", dict(habits=HABITS[i + 1:])) for i, h in enumerate(HABITS)]
    rungs += [("+ bf16 autocast", dict(precision="bf16")), ("+ channels_last", dict(channels_last=True)),
              ("+ bf16 autocast and channels_last", dict(precision="bf16", channels_last=True))]
    rungs += [("+ torch.compile", dict(compile=True))] if compile else []
    rows = []
    for change, options in rungs:
        state = bench_state(spec, device, K=K, batch_size=batch, **options)
        seconds, _ = timed(lambda: run_iteration(state, x), device, warmup, repeats, budget)
        rows.append((change, 1000 * seconds))
        log(f"  {change:<40} {1000 * seconds:9.1f} ms")
        del state
        gc.collect()
    return rows


# =============================================================================
# The paper's claims at laptop scale (eval.py reproduce): 1D Gaussians in closed form,
# then trained runs on the 2D data and on digits
# =============================================================================

def fm_field_1d(t, x, mu, s=1.0):
    """The marginal field of flow matching from N(0, 1) noise at t = 0 to N(mu, s^2) data at t = 1."""
    var = (1 - t) ** 2 + t ** 2 * s ** 2
    return mu + (t * s ** 2 - (1 - t)) / var * (x - t * mu)


def fm_density_1d(t, x, mu, s=1.0):
    var = (1 - t) ** 2 + t ** 2 * s ** 2
    return torch.exp(-(x - t * mu) ** 2 / (2 * var)) / (2 * math.pi * var) ** 0.5


def distance_density_1d(t, x, mu_star, mu_th, alpha, beta, mu_teacher=None, s_star=1.0, s_th=1.0):
    """l_t(x, b, a) of eq. 18 for data N(mu_star, s_star^2) and generator N(mu_th, s_th^2); with mu_teacher, the
    field of a corrupted teacher N(mu_teacher, s_star^2) stands for f* where the teacher enters (A.1.4, eq. 25)."""
    p_star, p_th = fm_density_1d(t, x, mu_star, s_star), fm_density_1d(t, x, mu_th, s_th)
    f_star, f_th = fm_field_1d(t, x, mu_star, s_star), fm_field_1d(t, x, mu_th, s_th)
    f_hat = f_star if mu_teacher is None else fm_field_1d(t, x, mu_teacher, s_star)
    mix = (1 - alpha) * p_star + alpha * p_th
    return (f_hat * mix - (1 - beta) * p_star * f_star - beta * p_th * f_th) ** 2 / mix


FIG3 = dict(t=2 / 3, mu_star=2.0, mu_th=-2.0)  # the paper's t = 1/3 in its reversed time (A.1.3)
PAIRS_1D = [(1.0, 1.0), (0.9, 0.9), (0.9, 0.85), (0.9, 0.95)]
CORRECTION_PAIRS = PAIRS_1D + [(0.5, 0.9)]  # far from the paper's range, where the closed form corrects


def loss_surface(path):
    """Figure 3: l_t(x) across x for several (alpha, beta), on a log scale; and how strongly each detects the
    real data where the generator puts no mass: l_t at the real mean over l_t at the generated mean."""
    t, mu_star, mu_th = FIG3["t"], FIG3["mu_star"], FIG3["mu_th"]
    x = torch.linspace(-8, 8, 3201, dtype=torch.float64)
    plt, rows = pyplot(), []
    fig, ax = plt.subplots(figsize=(7, 4))
    for alpha, beta in PAIRS_1D:
        l = distance_density_1d(t, x, mu_star, mu_th, alpha, beta)
        at = lambda m: distance_density_1d(t, torch.tensor(t * m, dtype=torch.float64), mu_star, mu_th, alpha,  # noqa
                                           beta).item()
        rows.append(dict(alpha=alpha, beta=beta, distance=torch.trapezoid(l, x).item(),
                         real_over_generated=at(mu_star) / at(mu_th)))
        ax.semilogy(x, l, label=f"alpha={alpha}, beta={beta} (beta/alpha={beta / alpha:.3f})")
    for m, name in ((mu_star, "real"), (mu_th, "generated")):
        ax.axvline(t * m, color="grey", lw=0.8, ls="--")
        ax.annotate(f"{name} mean", (t * m, 1e-5), fontsize=8, rotation=90, ha="right")
    ax.set_ylim(1e-6, 10)
    ax.set(xlabel="x_t", ylabel="l_t(x)", title=f"RealUID distance density, t = {t:.3g} (the paper's 1/3), "
                                                  f"real N({mu_star:g}, 1), generated N({mu_th:g}, 1)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return rows


def optimal_mean_1d(mu_star, mu_teacher, alpha, beta):
    """The generator mean N(mu, 1) minimising the corrupted-teacher distance integrated over t and x (eq. 25)."""
    from scipy.optimize import minimize_scalar
    t = torch.linspace(0.02, 0.98, 25, dtype=torch.float64)[:, None]
    x = torch.linspace(-14, 14, 1401, dtype=torch.float64)[None]

    def distance(mu):
        return torch.trapezoid(distance_density_1d(t, x, mu_star, mu, alpha, beta, mu_teacher), x).mean().item()
    return minimize_scalar(distance, bounds=(mu_star - 5, mu_star + 5), method="bounded",
                           options=dict(xatol=1e-6)).x


def teacher_correction_1d(path, deviations):
    """Figure 4 in closed form: the best generator mean under a teacher whose data mean is off by d."""
    mu_star, plt = -2.0, pyplot()
    rows = [dict(alpha=a, beta=b, deviation=float(d), mu=optimal_mean_1d(mu_star, mu_star + d, a, b))
            for a, b in CORRECTION_PAIRS for d in deviations]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(deviations, mu_star + np.asarray(deviations), color="grey", ls="--", label="the teacher's mean")
    for a, b in CORRECTION_PAIRS:
        ax.plot(deviations, [r["mu"] for r in rows if (r["alpha"], r["beta"]) == (a, b)], marker="o", ms=3,
                label=f"alpha={a}, beta={b}")
    ax.axhline(mu_star, color="k", lw=0.8, label="the real mean")
    ax.set(xlabel="teacher error (its data mean minus the real one)", ylabel="optimal generator mean",
           title="Teacher correction, 1D Gaussians, closed form")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return rows


REPRO_EMA = 0.95  # short runs: the EMA 0.99 would still mostly remember the generator's start (the teacher)
REPRODUCE = dict(  # minutes on 2 CPU cores: the default about 25, --quick about 2
    default=dict(seeds=3, teacher_steps=5000, steps=1800, batch=256, every=450, eval_samples=1000,
                 alphas=(0.90, 0.94, 0.98), ratios=(0.96, 1.0, 1.04), digits_seeds=2, digits_teacher_steps=1500,
                 digits_steps=400, digits_batch=32, digits_every=100, digits_fid_samples=1000, digits_alphas=(0.94,),
                 shift=0.5, deviations=np.linspace(-1.5, 1.5, 13)),
    quick=dict(seeds=1, teacher_steps=500, steps=240, batch=256, every=80, eval_samples=300, alphas=(0.94,),
               ratios=(0.96, 1.0, 1.04), digits_seeds=1, digits_teacher_steps=60, digits_steps=24, digits_batch=16,
               digits_every=12, digits_fid_samples=200, digits_alphas=(0.94,), shift=0.5,
               deviations=np.linspace(-1.5, 1.5, 5)))


def grid_configs(alphas, ratios):
    """Table 1's grid: UID, then alpha x beta/alpha where beta <= 1 (alpha = beta < 1 is ratio 1)."""
    configs = [("UID", 1.0, 1.0)]
    for alpha in alphas:
        configs += [(f"{alpha:.2f}, {r:.2f}", alpha, round(alpha * r, 6)) for r in ratios if alpha * r <= 1]
    return configs


def distill_run(argv, out):
    """realuid.py with these flags into a fresh folder out, its output into out/log.txt; returns the
    metrics.jsonl rows and the closing results (low-dim data)."""
    import contextlib
    import shutil
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    with open(os.path.join(out, "log.txt"), "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        code = realuid_main([*argv, "--out", out])
    if code != 0:
        raise UsageError(f"the run in {out} failed (exit code {code}); its output is in {out}/log.txt")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    results = os.path.join(out, "results.json")
    return rows, (json.load(open(results)) if os.path.isfile(results) else None)


def mean_spread(values):
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def curve(rows, key):
    return [(r["step"], r[key]) for r in rows if key in r]


def plot_convergence(curves, metric, path, title, levels=None, log=False):
    """Figure 2: the metric against updates, mean over seeds, for each named list of per-seed curves (cut to the
    shortest); levels: named horizontal lines (the teacher, the floor)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, per_seed in curves.items():
        n = min(map(len, per_seed))
        steps = [s for s, _ in per_seed[0][:n]]
        values = np.array([[v for _, v in c[:n]] for c in per_seed])
        ax.plot(steps, values.mean(0), marker="o", ms=3, label=name + (f" ({len(per_seed)} seeds)" if len(
            per_seed) > 1 else ""))
        if len(per_seed) > 1:
            ax.fill_between(steps, values.min(0), values.max(0), alpha=0.15)
    for i, (name, value) in enumerate((levels or {}).items()):
        ax.axhline(value, color="k", ls=("--", ":", "-.")[i % 3], lw=1, label=f"{name}: {value:g}")
    if log:
        ax.set_yscale("log")
    ax.set(xlabel="updates (fake and generator)", ylabel=metric, title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cmd_convergence(args):
    """Figure 2 of finished runs: a score against updates, one curve per variant (UID, RealUID (alpha, beta)), the
    mean over its runs (seeds) with their min-max band, and levels such as the teacher's FID and the floor."""
    import types
    curves, nets = {}, set()
    for run in args.runs:
        try:
            with open(os.path.join(run, "arguments.json")) as f:
                cfg = json.load(f)
            with open(os.path.join(run, "metrics.jsonl")) as f:
                rows = [json.loads(line) for line in f]
        except (OSError, ValueError) as e:
            raise UsageError(f"{run} is not a realuid.py output folder ({getattr(e, 'strerror', None) or e})") from None
        net = args.net or str(cfg["ema"][0])
        key = f"{args.metric}/{net}"
        points, nets = curve(rows, key), nets | {net}
        if not points:
            raise UsageError(f"{run} logged no {key}: its run needs --fid-every (and for classes the digit "
                             f"classifier's features)")
        name = variant(types.SimpleNamespace(**cfg))
        name += f" ({cfg['alpha']}, {cfg['beta']})" if name.startswith("RealUID") else ""
        curves.setdefault(name, []).append(points)
    levels = {}
    for level in args.level:
        name, _, value = level.rpartition("=")
        try:
            levels[name] = float(value)
        except ValueError:
            raise UsageError(f"--level takes NAME=VALUE, e.g. 'teacher, 100 steps=8.15' (got {level!r})") from None
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    what = {"fid": "FID", "classes": "class gap", "w2": "W2"}.get(args.metric, args.metric)
    label = "raw generator" if nets == {"generator"} else f"EMA {nets.pop()}" if len(nets) == 1 else "first EMA"
    plot_convergence(curves, f"{what} ({label})", args.out,
                     args.title or f"{what} against updates", levels, log=args.metric == "fid")
    for name, per_seed in curves.items():
        print(f"{name}: " + "; ".join(" ".join(f"{s}:{v:.4g}" for s, v in c) for c in per_seed))
    print(f"wrote {args.out}")


def run_grid(out, configs, seeds, common, key, log):
    """Distil every config with every seed; (final metric per config and seed, metric curves)."""
    table, curves = {}, {}
    for name, alpha, beta in configs:
        for seed in seeds:
            folder = os.path.join(out, name.replace(", ", "-").replace(" + ", "-"), f"seed{seed}")
            rows, _ = distill_run([*common, "--alpha", str(alpha), "--beta", str(beta), "--seed", str(seed),
                                   *(["--gan"] if "GAN" in name else [])], folder)
            curves.setdefault(name, []).append(curve(rows, key))
            table.setdefault(name, []).append(curves[name][-1][-1][1])
            log(f"  {name:<12} seed {seed}: {key} {table[name][-1]:.4f}")
    return table, curves


def generated_mean(folder, data, n=2000, ema=REPRO_EMA):
    """The mean of n one-step samples of a run's EMA, in data units."""
    net, ckpt = load_field(latest_checkpoint(folder), "checkpoint", ema)
    return to_data_units(sample_field(net, n, tuple(data.shape()), torch.device("cpu"), seed=1), ckpt["data"]).mean(0)


def train_teacher_once(cfg, data, path):
    """The teacher file at path, trained unless one with this very configuration is there (--quick and the
    default share the output folder but not their teachers)."""
    if not os.path.isfile(path) or load_checkpoint(path).get("config") != config_dict(cfg):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        train_teacher(cfg, data, torch.device("cpu"), path)
    return path


def distill_once(argv, out):
    """distill_run, unless out holds a finished run (results.json) of these very arguments: a table re-scored
    with other draws, or a seed added, does not train the runs it has again."""
    stamp = os.path.join(out, "argv.json")
    argv = [str(a) for a in argv]
    if os.path.isfile(os.path.join(out, "results.json")) and os.path.isfile(stamp) and json.load(open(stamp)) == argv:
        return
    distill_run(argv, out)
    save_json(argv, stamp)


def best_realuid(table):
    """The grid's RealUID config with the lowest mean, among beta/alpha != 1."""
    return min((n for n in table if "," in n and not n.endswith("1.00")), key=lambda n: np.mean(table[n]))


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def cmd_reproduce(args):
    import dataclasses
    plan = REPRODUCE["quick" if args.quick else "default"]
    seeds = list(range(args.seeds or plan["seeds"]))
    if min(seeds, default=-1) < 0:
        raise UsageError("--seeds must be positive")
    out, start, md = args.out, time.time(), []
    os.makedirs(out, exist_ok=True)
    tick = lambda what: print(f"{what}: {time.time() - start:.0f} s so far", flush=True)  # noqa: E731
    report = dict(mode="quick" if args.quick else "default", seeds=seeds)

    # 1D Gaussians, exact: the loss surface (Fig. 3) and teacher correction (Fig. 4)
    report["loss_surface"] = surface = loss_surface(os.path.join(out, "fig3-loss-surface.png"))
    md.append("Figure 3 (closed form): l_t at the real mean over l_t at the generated mean\n\n" + markdown_table(
        ["alpha", "beta", "beta/alpha", "distance", "l_t(real mean) / l_t(generated mean)"],
        [(r["alpha"], r["beta"], f"{r['beta'] / r['alpha']:.3f}", f"{r['distance']:.4f}",
          f"{r['real_over_generated']:.2e}") for r in surface]))
    deviations = [float(d) for d in plan["deviations"]]
    report["correction_1d"] = rows = teacher_correction_1d(os.path.join(out, "fig4-teacher-correction-1d.png"),
                                                           deviations)
    md.append("Teacher correction, 1D closed form: the optimal generator mean's error |mu - mu*| (real mean -2)\n\n"
              + markdown_table(["alpha, beta"] + [f"teacher off by {d:+.2f}" for d in deviations],
                               [(f"{a}, {b}", *(f"{abs(r['mu'] + 2):.3f}" for r in rows
                                                if (r["alpha"], r["beta"]) == (a, b))) for a, b in CORRECTION_PAIRS]))
    tick("1D closed forms")

    # 2D: Table 1's grid and Figure 2's convergence, W2 of an EMA to held-out points
    data = load_data(make_config(Config, dict(dataset="8gaussians")))
    lowdim = dict(TEACHER_RECIPES["lowdim"], steps=plan["teacher_steps"])
    teacher = train_teacher_once(make_config(TeacherConfig, dict(dataset="8gaussians"), lowdim), data,
                                 os.path.join(out, "2d", "teacher.pt"))
    lowdim_flags = ["--steps", str(plan["steps"]), "--batch-size", str(plan["batch"]), "--eval-samples",
                    str(plan["eval_samples"]), "--ema", "0.95", "0.99"]
    common = ["--teacher", teacher, "--fid-every", str(plan["every"]), *lowdim_flags]
    configs = grid_configs(plan["alphas"], plan["ratios"])
    print(f"2D data, W2 of the EMA {REPRO_EMA} to {plan['eval_samples']} held-out points:")
    table, curves = run_grid(os.path.join(out, "2d"), configs + [("UID + GAN", 1.0, 1.0)], seeds, common,
                             f"w2/{REPRO_EMA}", print)
    report["grid_2d"] = table
    tick("2D grid")
    best = best_realuid(table)
    plot_convergence({n: curves[n] for n in ("UID", best, "UID + GAN")}, f"W2 (EMA {REPRO_EMA})",
                     os.path.join(out, "fig2-convergence-2d.png"), "2D data: W2 against updates")

    # digits 8x8: a small teacher, the alpha = 0.94 row, UID + GAN; FID on the teacher's own features
    digits = load_data(make_config(Config, dict(dataset="digits", resolution=8)))
    dteacher = train_teacher_once(make_config(
        TeacherConfig, dict(dataset="digits", resolution=8, steps=plan["digits_teacher_steps"],
                                       sample_steps=0), TEACHER_RECIPES["digits"]),
        digits, os.path.join(out, "digits", "teacher.pt"))
    common = ["--dataset", "digits", "--resolution", "8", "--teacher", dteacher, "--fid-features", dteacher,
              "--steps", str(plan["digits_steps"]), "--batch-size", str(plan["digits_batch"]),
              "--fid-every", str(plan["digits_every"]), "--fid-samples",
              str(plan["digits_fid_samples"]), "--ema", "0.95", "0.99", "--sample-every", "1000000",
              "--ema-rampup", "0", "--regress", "0", "--lr", "3e-4", "--warmup", "100"]  # the settings its measured
    # table was scored with: fixed EMAs, G from u*'s one-step form as in the paper
    dseeds = seeds[:plan["digits_seeds"]] if not args.seeds else seeds
    print(f"digits 8x8, offline FID of the EMA {REPRO_EMA} (the teacher's features):")
    dtable, dcurves = run_grid(os.path.join(out, "digits"), grid_configs(plan["digits_alphas"], plan["ratios"])
                               + [("UID + GAN", 1.0, 1.0)], dseeds, common, f"fid/{REPRO_EMA}", print)
    report["grid_digits"] = dtable
    tick("digits grid")
    dbest = best_realuid(dtable)
    plot_convergence({n: dcurves[n] for n in ("UID", dbest, "UID + GAN")},
                     f"FID (teacher features, EMA {REPRO_EMA})", os.path.join(out, "fig2-convergence-digits.png"),
                     "digits 8x8: FID against updates")
    names = list(dict.fromkeys([*table, *dtable]))
    md.append(f"Table 1 at laptop scale, mean +- std over seeds {seeds} on 2D and {dseeds} on digits. 2D: W2 "
              f"of the EMA {REPRO_EMA} to {plan['eval_samples']} held-out points after {plan['steps']} updates; "
              f"digits 8x8: FID of the EMA {REPRO_EMA} ({plan['digits_fid_samples']} samples, the teacher's features) "
              f"after "
              f"{plan['digits_steps']} updates\n\n"
              + markdown_table(["config (alpha, beta/alpha)", "2D: W2", "digits: FID"], [
                  (n, *("-" if n not in t else "{:.4f} +- {:.4f}".format(*mean_spread(t[n]))
                        for t in (table, dtable))) for n in names]))

    # teacher correction, trained: a 2D teacher fitted to data shifted along x
    shift = torch.zeros(data.x.shape[1])
    shift[0] = plan["shift"]
    wrong = train_teacher_once(make_config(TeacherConfig, dict(dataset="8gaussians"), lowdim),
                               dataclasses.replace(data, x=data.x + shift), os.path.join(out, "shifted", "teacher.pt"))
    wrong_net, _ = load_field(wrong, "teacher")
    teacher_mean = to_data_units(sample_field(wrong_net, 2000, tuple(data.shape()), torch.device("cpu"), steps=100,
                                              seed=1), data.info("8gaussians")).mean(0)[0]
    common = ["--teacher", wrong, "--fid-every", "0", *lowdim_flags]
    corr = {}
    print(f"shifted teacher (its samples' mean x {teacher_mean:.3f}; the real data's 0):")
    for alpha, beta in PAIRS_1D:
        for seed in seeds:
            folder = os.path.join(out, "shifted", f"{alpha}-{beta}", f"seed{seed}")
            _, results = distill_run([*common, "--alpha", str(alpha), "--beta", str(beta), "--seed", str(seed)],
                                     folder)
            mean_x = float(generated_mean(folder, data)[0])
            w2 = next(r for k, r in results.items() if k.endswith(f"EMA {REPRO_EMA}, 1 step"))["w2"]
            corr.setdefault(f"{alpha}, {beta}", []).append((mean_x, w2))
            print(f"  alpha {alpha}, beta {beta}, seed {seed}: mean x {mean_x:.3f}")
    report["correction_2d"] = dict(teacher_mean_x=float(teacher_mean), runs=corr)
    md.append(f"Teacher correction, trained on 2D: a teacher fitted to data shifted by {plan['shift']} standard "
              f"deviations along x (its 100-step samples' mean x {teacher_mean:.3f}, the real data's 0)\n\n"
              + markdown_table(["alpha, beta", f"generator mean x (EMA {REPRO_EMA})", "W2 to the real data"], [
                  (k, "{:.3f} +- {:.3f}".format(*mean_spread([m for m, _ in v])),
                   "{:.4f} +- {:.4f}".format(*mean_spread([w for _, w in v]))) for k, v in corr.items()]))
    tick("teacher correction")
    write_report(out, report, md, "plots, tables and every run", start)
    return report


def write_report(out, report, md, what, start):
    """report.json and summary.md (the markdown tables md) into out; the tables printed."""
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n\n".join(md) + "\n")
    print("\n" + "\n\n".join(md))
    print(f"\n{what} in {out} (summary.md, report.json); {time.time() - start:.0f} s in all")


# The families of matching models on 2D data: (model, diffusion parameterisation)
FAMILIES = {"fm": ("fm", ""), "vp": ("vp", "eps"), "vp-score": ("vp", "score"), "ve": ("ve", "edm"),
            "ve-v": ("ve", "v"), "vp-v": ("vp", "v")}


def best_one_step(folder):
    """The run's best one-step net by model selection, (name, step, network, its matching model: the teacher's
    family with the generator's noise level sigma_init): of its best-<net>.pt files, taken in the order of their
    updates, the one ModelSelection's rule keeps (selection_wins: W2 beyond its standard error, detail within it)."""
    best = None
    for c in sorted((load_checkpoint(os.path.join(folder, f)) | dict(name=f[5:-3]) for f in os.listdir(folder)
                     if f.startswith("best-") and f.endswith(".pt")), key=lambda c: (c["step"], c["name"])):
        c.setdefault("draws", [c["score"]])  # files of runs before the draws were kept
        best = c if selection_wins(c, best) else best
    net = build_field(best["field"])
    net.load_state_dict(best["generator"])
    return best["name"], best["step"], net, matching_model(best["matching"])


def cmd_families(args):
    """For each family, 2D set and seed: a teacher trained with its family's recipe and that seed, the default
    distillation, then the floor (training points), the teacher at 100 steps of its own sampler and the best
    one-step net, scored on the same held-out points over the same --draws draws; UID (alpha = beta = 1) beside
    RealUID with --uid. Tables in summary.md, pictures families-<data>.png."""
    for name in args.families:
        if name not in FAMILIES:
            raise UsageError(f"unknown family {name!r}: use {', '.join(FAMILIES)}")
    methods = {"RealUID": []} | ({"UID": ["--alpha", "1", "--beta", "1"]} if args.uid else {})
    out, start, rows, md = args.out, time.time(), [], []
    os.makedirs(out, exist_ok=True)
    for dataset in args.datasets:
        data = load_data(make_config(Config, dict(dataset=dataset, eval_samples=args.eval_samples)))
        pictures = {}
        for family in args.families:
            model, param = FAMILIES[family]
            recipe = teacher_recipes(model, param)["lowdim"]
            for seed in range(args.seeds):
                tcfg = make_config(TeacherConfig, dict(dataset=dataset, model=model, param=param, seed=seed,
                                                       steps=args.teacher_steps or recipe["steps"]), recipe)
                teacher = train_teacher_once(tcfg, data, os.path.join(out, dataset, family, f"teacher{seed}.pt"))
                teacher_net, tckpt = load_field(teacher, "teacher")
                held = HeldOut(data, generate, matching_model(tckpt["matching"]), torch.device("cpu"), seed,
                               args.draws)
                floor, ref_sets = held.floor(), held.sample(teacher_net, 100)
                floor_row, ref = held.metrics(floor), held.metrics(ref_sets)
                for method, flags in methods.items():
                    folder = os.path.join(out, dataset, family, method, f"seed{seed}")
                    distill_once(["--dataset", dataset, "--teacher", teacher, "--seed", str(seed), "--eval-samples",
                                  str(args.eval_samples), *flags, *shlex.split(args.flags)], folder)
                    name, step, net, matching = best_one_step(folder)
                    sets = held.sample(net, matching=matching)  # the same held-out points and draws
                    best = held.metrics(sets)
                    rows.append(dict(data=dataset, family=family, method=method, seed=seed, floor=floor_row,
                                     teacher=ref, best=best, net=name, step=step))
                    print(f"{dataset} {family} {method} seed {seed} ({held.draws} draws): floor W2 "
                          f"{floor_row['w2']:.3f}; teacher (100 steps) W2 {ref['w2']:.3f} precision "
                          f"{ref['precision']:.3f} recall {ref['recall']:.3f}; one step {best['w2']:.3f} "
                          f"{best['precision']:.3f} {best['recall']:.3f} ({name} at {step}), {best['modes']}/"
                          f"{len(data.modes.centres)} modes held; {time.time() - start:.0f} s so far", flush=True)
                    if seed == 0 and method == "RealUID":
                        pictures[family] = ref_sets[0], sets[0], held.real
        plot_families(pictures, os.path.join(out, f"families-{dataset}.png"), dataset)
    md.append(markdown_table(
        ["data", "family", "method", "seeds", "floor: W2", "teacher, 100 steps: W2", "teacher / floor",
         "one step (best): W2", "one step / teacher", "floor: precision", "teacher: precision",
         "one step: precision", "floor: recall", "teacher: recall", "one step: recall", "modes held",
         "smallest mode share", "arc share", "in parts"],
        [(d, f, m, len(sel), *("{:.3f} +- {:.3f}".format(*mean_spread(v)) for v in (
            [r["floor"]["w2"] for r in sel], [r["teacher"]["w2"] for r in sel],
            [r["teacher"]["w2"] / r["floor"]["w2"] for r in sel], [r["best"]["w2"] for r in sel],
            [r["best"]["w2"] / r["teacher"]["w2"] for r in sel],
            *([r[who][k] for r in sel] for k in ("precision", "recall") for who in ("floor", "teacher", "best")))),
          "/".join(str(r["best"]["modes"]) for r in sel), "{:.2f}".format(min(r["best"]["min_share"] for r in sel)),
          "{:.2f}".format(np.mean([r["best"]["arc_share"] for r in sel])) if "arc_share" in sel[0]["best"] else "-",
          "{:.3f}".format(np.mean([r["best"]["in_mode"] for r in sel])))
         for d, f, m in dict.fromkeys((r["data"], r["family"], r["method"]) for r in rows)
         for sel in [[r for r in rows if (r["data"], r["family"], r["method"]) == (d, f, m)]]]))
    write_report(out, rows, md, "every run, the pictures and the tables", start)
    return rows


def tangent_kernel(net, matching, z):
    """The one-step generator's tangent kernel at the points z, as cosines (n x n): K_ij = <dG(z_i)/dtheta,
    D dG(z_j)/dtheta>, plain (D = 1) and under Adam's per-parameter scaling (D = 1 / the RMS over z of each
    parameter's Jacobian: Adam's step with beta1 = 0 for gradients in random directions). A cosine near 1
    between z's that land in different modes means that a step for one mode moves the other alike."""
    from torch.func import functional_call, jacrev, vmap
    params = {k: v.detach() for k, v in net.named_parameters()}

    def G(p, zi):
        return matching.one_step(lambda t, x, y=None: functional_call(net, p, (t, x)), zi[None])[0]
    J = torch.cat([j.flatten(2) for j in vmap(jacrev(G), in_dims=(None, 0))(params, z).values()], 2)
    cosines = []
    for D in (torch.ones(J.shape[2]), J.pow(2).sum(1).mean(0).sqrt().clamp_min(1e-12).reciprocal()):
        K = torch.einsum("iap,jap->ij", J, J * D)
        cosines.append(K / torch.outer(K.diag(), K.diag()).sqrt())
    return cosines


def cmd_kernel(args):
    """For 2D teachers of a built-in mixture: the mean tangent-kernel cosine of their one-step generator (at
    --sigma-init) between z's landing in the same mode, in different modes, and in the lightest two against
    the rest."""
    z = torch.randn(args.n, 2, generator=torch.Generator().manual_seed(args.seed))
    print(f"{'teacher':<48} {'kernel':>6} {'same mode':>10} {'other modes':>12} {'light vs rest':>14}")
    for path in args.teachers:
        net, ckpt = load_field(path, "teacher")
        name = (ckpt.get("data") or {}).get("name")
        if name not in MIXTURES or len(ckpt["data"]["shape"]) != 1:
            raise UsageError(f"{path} is not a teacher of a built-in 2D mixture ({', '.join(MIXTURES)})")
        with refusing():
            matching = matching_model(dict(ckpt.get("matching") or dict(type="fm"), sigma_init=args.sigma_init))
        law = MIXTURES[name]
        with torch.no_grad():
            x = torch.as_tensor(to_data_units(matching.one_step(net, z), ckpt["data"]), dtype=torch.float32)
        mode = torch.cdist(x, torch.as_tensor(law.centres, dtype=torch.float32)).argmin(1)
        light = torch.as_tensor(np.argsort(law.weights[:len(law.centres)])[:2])
        same, other = mode[:, None] == mode[None, :], torch.eye(len(z), dtype=torch.bool).logical_not()
        apart = torch.isin(mode, light)[:, None] & ~torch.isin(mode, light)[None, :]
        for kind, c in zip(("plain", "adam"), tangent_kernel(net, matching, z)):
            print(f"{path[-48:]:<48} {kind:>6} {c[same & other].mean():10.3f} {c[~same].mean():12.3f} "
                  f"{c[apart].mean():14.3f}")


def plot_families(pictures, path, dataset):
    """A row per family: its teacher at 100 steps beside its best one-step net, with the real points."""
    plt = pyplot()
    fig, axes = plt.subplots(len(pictures), 2, figsize=(7, 3.5 * len(pictures)), sharex=True, sharey=True,
                             squeeze=False)
    for row, (family, (teacher, one_step, real)) in zip(axes, pictures.items()):
        for ax, x, what in zip(row, (teacher, one_step), ("teacher, 100 steps", "one-step generator (best)")):
            ax.scatter(real[:, 0], real[:, 1], s=1, color="0.8")
            ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.5, color="C0")
            ax.set_title(f"{family}: {what}", fontsize=10)
            ax.set_aspect("equal")
    fig.suptitle(f"{dataset}: real points in grey", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# =============================================================================
# The digit classifier: FID features for digits that are none of the compared networks' (eval.py classifier)
# =============================================================================

def train_classifier(resolution, epochs=30, batch_size=64, lr=2e-3, seed=0, widths=(16, 32), features=128):
    """(DigitClassifier, spec): trained with Adam (lr to 0 on a cosine) and cross-entropy on a fixed 80 % of
    scikit-learn's digits at `resolution` (a permutation seeded 0, whatever `seed`), each batch shifted by up to a
    pixel each way; its accuracy measured on the other 20 %. `seed` draws the weights, batches and shifts; on the
    CPU the result is the same bit for bit at the same thread count."""
    x, y = load_digits(resolution)
    x = x.float() / 127.5 - 1  # DigitClassifier's units, as ClassifierFeatures feeds it
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    test, train = perm[:len(x) // 5], perm[len(x) // 5:]
    torch.manual_seed(seed)
    net, g = DigitClassifier(widths, features), torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(net.parameters(), lr)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, epochs)
    for _ in range(epochs):
        for rows in train[torch.randperm(len(train), generator=g)].split(batch_size):
            dy, dx = torch.randint(3, (2,), generator=g).tolist()  # the batch shifted by up to a pixel each way
            shifted = F.pad(x[rows], (1, 1, 1, 1), value=-1)[..., dy:dy + resolution, dx:dx + resolution]
            loss = F.cross_entropy(net(shifted), y[rows])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        decay.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(x[test]).argmax(1) == y[test]).float().mean().item()
    return net, dict(resolution=resolution, widths=list(widths), features=features, accuracy=accuracy,
                     held_out=len(test), train=len(train), epochs=epochs, seed=seed)


def write_classifier(net, spec, path):
    """Weights and spec as .safetensors (runtime.read_classifier reads it), saved atomically."""
    from safetensors.torch import save
    meta = dict(version=str(VERSION), kind=CLASSIFIER_KIND, spec=json.dumps(spec))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_checkpoint({k: v.contiguous() for k, v in net.state_dict().items()}, path,
                    write=lambda tensors, f: f.write(save(tensors, meta)))


def cmd_classifier(args):
    if args.resolution < 8 or args.epochs < 1:
        raise UsageError("--resolution must be at least 8 and --epochs positive")
    path = args.out or classifier_path(args.resolution)
    start = time.perf_counter()
    net, spec = train_classifier(args.resolution, args.epochs, seed=args.seed)
    seconds, threads = time.perf_counter() - start, torch.get_num_threads()
    write_classifier(net, spec, path)
    print(f"digit classifier, {args.resolution}x{args.resolution}: {spec['train']} training digits, "
          f"{args.epochs} epochs in {seconds:.1f} s on {threads} CPU thread{'s' if threads > 1 else ''}; "
          f"held-out accuracy {100 * spec['accuracy']:.1f} % of {spec['held_out']}; wrote {path} "
          f"({spec['features']} features: --features classifier)")
    return spec


def load_net(args):
    """(path, network, checkpoint, steps, matching model): a generator takes one step (steps None), a teacher
    --steps of its sampler, default 100 (a diffusion teacher's reverse SDE with --sde)."""
    path = latest_checkpoint(args.checkpoint)
    net, ckpt = load_field(path, "checkpoint", args.ema,
                           **(dict(image_size=args.resolution) if args.resolution else {}))
    steps = None if ckpt.get("kind") == "generator" else (getattr(args, "steps", None) or 100)
    with refusing():
        matching = matching_model(stored_matching(ckpt))
    if getattr(args, "sde", False):
        if steps is None or not isinstance(matching, Diffusion):
            raise UsageError(f"--sde samples a diffusion teacher (vp, ve) by its reverse SDE; {path} is not one")
        matching.sample = functools.partial(matching.sample, sde=True)
    return path, net, ckpt, steps, matching


def cmd_efficiency(args):
    device = resolve_device(args.device)
    base = rss_bytes() if device.type == "cpu" else None
    matching = None
    if args.checkpoint == "cifar10":  # the paper's network; time and memory do not depend on the weights
        net, shape, num_classes = UNet(), (3, 32, 32), None
    else:
        _, net, ckpt, _, matching = load_net(args)
        shape, num_classes = tuple((ckpt.get("data") or {})["shape"]), (ckpt.get("data") or {}).get("num_classes")
    batches = sorted({1, args.batch or (256 if device.type == "cuda" else 16)})
    if min(args.teacher_steps, default=1) < 1 or args.repeats < 1:
        raise UsageError("--teacher-steps and --repeats must be positive")
    rows = efficiency(net, shape, device, num_classes, batches, args.teacher_steps, args.repeats, args.budget, base,
                      matching)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    mem = "peak allocated / reserved MB" if device.type == "cuda" else "peak RSS above idle, MB"
    print(f"{count_parameters(net) / 1e6:.2f} M parameters, {'x'.join(map(str, shape))}, fp32, on {name}")
    print(f"{'model':<28} {'batch':>6} {'ms/image':>10} {'runs':>5}   {mem}")
    for r in rows:
        peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}"
        if r["reserved_bytes"] is not None:
            peak += f" / {r['reserved_bytes'] / 2**20:.0f}"
        print(f"{r['model']:<28} {r['batch']:>6} {r['ms_per_image']:>10.2f} {r['runs']:>5}   {peak}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(parameters=count_parameters(net), device=name, rows=rows), f, indent=2)
    return rows


def cmd_bench(args):
    device = resolve_device(args.device)
    set_precision(args.precision, device)
    size = args.size or ("cifar10" if device.type == "cuda" else "small")
    spec = BENCH_UNETS[size]
    batch = args.batch or (256 if device.type == "cuda" else 16)
    if batch < 1 or args.repeats < 1 or args.K < 1:
        raise UsageError("--batch, --repeats and --K must be positive")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"bench: {size} UNet ({count_parameters(build_field(spec)) / 1e6:.2f} M parameters, "
          f"{spec['image_size']}x{spec['image_size']}), batch {batch}, K = {args.K}, on {name}")
    base = rss_bytes() if device.type == "cpu" else None
    rows = bench(spec, device, batch, args.precision, args.K, args.warmup, args.repeats, args.budget, base)
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    table = {(r["what"], r["impl"]): r for r in rows}
    mem = "peak MB" if device.type == "cuda" else "peak RSS MB"
    print(f"\n{'':<22}" + "".join(f"{i:>26}" for i in impls) + "".join(f"{'x ' + i[10:]:>10}" for i in impls[1:])
          + f"   {mem}")
    for what in dict.fromkeys(r["what"] for r in rows):
        cells = [table[what, i] for i in impls]
        line = f"{what:<22}" + "".join(f"{c['ms']:>10.1f} ms {c['images_per_s']:>7.0f} im/s" for c in cells)
        line += "".join(f"{cells[0]['ms'] / c['ms']:>9.2f}x" for c in cells[1:])
        line += "   " + " / ".join("n/a" if c["peak_bytes"] is None else f"{c['peak_bytes'] / 2**20:.0f}"
                                   for c in cells)
        print(line)
    steps = []
    if args.ladder:
        print("\nthe iteration, one change at a time:")
        steps = ladder(spec, device, batch, args.K, args.warmup, args.repeats, args.budget, args.compile,
                       log=lambda *a: None)
        first, optimised = steps[0][1], steps[len(HABITS)][1]
        for i, (change, ms) in enumerate(steps):
            before = steps[max(i - 1, 0)][1] if i <= len(HABITS) else optimised
            print(f"  {change:<40} {ms:9.1f} ms  {before / ms:5.2f}x this change  {first / ms:5.2f}x in all")
    flops = iteration_flops(bench_state(spec, device, K=args.K, batch_size=batch), bench_input(spec, batch, device))
    peaks = {"fp32": peak_matmul(device, torch.float32)}
    if any(i.endswith("bf16") for i in impls):
        peaks["bf16"] = peak_matmul(device, torch.bfloat16)
    print(f"\none iteration: {flops / 1e9:.1f} GFLOP of matrix products; the machine's measured peak "
          + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in peaks.items()))
    for impl in impls:
        ms = table[f"iteration (K={args.K} + 1)", impl]["ms"]
        peak = peaks["bf16" if impl.endswith("bf16") else "fp32"]
        print(f"  {impl:<17} {flops / ms / 1e9:8.2f} TFLOP/s = {100 * flops / (ms / 1e3) / peak:5.1f}% of the "
              f"{'bf16' if impl.endswith('bf16') else 'fp32'} peak")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=name, size=size, spec=spec, batch=batch, K=args.K, rows=rows, ladder=steps,
                           iteration_flops=flops, peak_flops=peaks), f, indent=2)
    return rows


def cmd_fid(args):
    path, net, ckpt, steps, matching = load_net(args)
    info, config = ckpt.get("data") or {}, ckpt.get("config") or {}
    if info.get("kind") != "image":
        raise UsageError(f"{path} generates points, not images: FID is for images (low-dim runs print W2, "
                         f"energy distance and mode coverage)")
    if args.n < 2 or args.repeats < 1:
        raise UsageError("--n must be at least 2 and --repeats positive")
    device = resolve_device(args.device)
    ref = args.ref or ("cifar10" if config.get("dataset") == "cifar10" else config.get("dataset", ""))
    if not ref:
        raise UsageError(f"{path} does not name its data set: pass --ref")
    load = load_reference_data(info["shape"][-1], args.data_root or config.get("data_root", "data"))
    fid = FID(ref, args.features, args.mode, info["shape"], device, os.path.dirname(os.path.abspath(path)), load,
              args.batch_size, args.bf16, generate=generate, load_field=load_field, floor=True)
    what = "one-step generator" if steps is None else f"teacher, {steps} sampler steps"
    print(f"FID of {path} ({what}), {args.n} samples x {args.repeats}: {fid.describe}")
    runs = [fid.scores(net, args.n, args.seed + r, steps, info.get("num_classes"), matching)
            for r in range(args.repeats)]
    scores = [r["fid"] for r in runs]
    spread = float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0
    print(f"FID {np.mean(scores):.4f} +- {spread:.4f} (mean +- std over {len(scores)} runs: "
          f"{', '.join(f'{s:.4f}' for s in scores)})")
    floors = [fid.floor_scores(args.n, args.seed + r) for r in range(args.repeats)]
    floor = dict(floor=None, floor_mean=None, floor_std=None)
    if floors[0] is None:
        print("floor n/a: the reference is precomputed statistics, with no images to draw")
    else:
        values = [f["fid"] for f in floors]
        floor = dict(zip(("floor", "floor_mean", "floor_std"), (values, *mean_spread(values))))
        print(f"floor {floor['floor_mean']:.4f} +- {floor['floor_std']:.4f} (real reference images, {args.n} drawn "
              f"with replacement per run: {', '.join(f'{s:.4f}' for s in floor['floor'])})")
    classes = {}
    if "classes" in runs[0]:  # the digit classifier's: the share of the images in the wrong classes
        classes = dict(classes=[r["classes"] for r in runs], floor_classes=[f["classes"] for f in floors])
        print("class gap {:.4f} +- {:.4f} (the total-variation distance of the classifier's class shares from the "
              "reference's), floor {:.4f} +- {:.4f}".format(*mean_spread(classes["classes"]),
                                                           *mean_spread(classes["floor_classes"])))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(checkpoint=path, fid=scores, mean=float(np.mean(scores)), std=spread, n=args.n,
                           reference=fid.describe, **floor, **classes), f, indent=2)
    return scores


def cmd_sample(args):
    if args.n < 1 or args.draws < 1:
        raise UsageError("--n and --draws must be positive")
    path, net, ckpt, steps, matching = load_net(args)
    info = ckpt.get("data") or {}
    paired = matching.coupled and info.get("kind") == "image"
    if paired and not args.out.endswith(".npz"):
        raise UsageError(f"paired images are written as one .npz of source, images and target: pass --out FILE.npz")
    if args.draws > 1 and not (paired and steps is None):
        raise UsageError(f"--draws adds one-step columns to a generator's grid of paired images; {path} is "
                         f"{'a teacher' if steps is not None else 'not of paired images'}")
    device = resolve_device(args.device)
    sources, data = None, None
    if matching.coupled:  # the held-out sources x_T of the data set it was trained on, cycled
        data = load_data(make_config(Config, {k: v for k, v in ckpt["config"].items() if k in DATA_FIELDS}))
        sources = cycled(data.src_test, args.n)
    x = sample_field(net, args.n, tuple(info["shape"]), device, steps, info.get("num_classes"), args.seed,
                     matching=matching, sources=sources)
    what = "one-step generator" if steps is None else f"teacher, {steps} sampler steps"
    out = args.out
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    if paired:
        write_pairs(args, path, ckpt, net, steps, matching, data, x, device)
    elif info.get("kind") == "image":
        save_grid(x[:min(len(x), args.grid)], os.path.splitext(out)[0] + ".png")
        images = to_uint8(x).numpy().transpose(0, 2, 3, 1)
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
        x = to_data_units(x, info)
        if sources is not None:  # pairs stay together: each row is (x_T, x1)
            x = np.concatenate([to_data_units(sources, info), x], 1)
        np.save(out, x)
        print(f"wrote {args.n} samples ({what}) of shape {x.shape[1:]} to {out}"
              + (" as (x_T, x1) rows, x_T the held-out sources" if sources is not None else ""))


def z_spread(a, b):
    """The per-pixel standard deviation of a conditional law, from its outputs a, b for the same sources and
    two independent z: E (a - b)^2 = 2 Var."""
    return float((a.clamp(-1, 1) - b.clamp(-1, 1)).pow(2).mean().sqrt()) / math.sqrt(2)


def write_pairs(args, path, ckpt, net, steps, matching, data, x, device):
    """eval.py sample on paired images: uint8 source, images (the outputs) and target (the held-out ground truth)
    in one .npz, their scores, and a grid of source | teacher 1 step | teacher N steps | generator (--draws z
    each) | target."""
    def nhwc(v):
        return (v if v.dtype == torch.uint8 else to_uint8(v)).numpy().transpose(0, 2, 3, 1)
    sources, targets = cycled(data.src_test, args.n), cycled(data.x_test, args.n)
    np.savez(args.out, source=nhwc(sources), images=nhwc(x), target=nhwc(targets))
    task = ckpt["config"].get("dataset")
    scores = paired_scores(x, Data(x_test=targets, src_test=sources), task if task in DEGRADATIONS else None)
    print(f"wrote {args.n} outputs ({'one-step generator' if steps is None else f'teacher, {steps} sampler steps'}) "
          f"of the held-out sources with their targets to {args.out}: "
          + ", ".join(f"{k} {v:.2f} dB" for k, v in scores.items()))
    if args.draws > 1:  # how wide the generator's conditional law is: a conditional mean's spread is 0
        other = sample_field(net, args.n, tuple(x.shape[1:]), device, None, None, args.seed + 1, matching=matching,
                             sources=sources)
        print(f"spread between draws of z: {z_spread(x, other):.4f} (per-pixel RMS difference of the outputs for "
              f"two z over sqrt 2, in [-1, 1] units: the conditional law's per-pixel standard deviation)")
    rows = min(args.n, args.grid, 16)
    teacher = net if steps is not None else None
    if teacher is None:  # a generator: its run's teacher gives the grid's teacher columns
        where = ckpt["config"].get("teacher") or os.path.join(os.path.dirname(os.path.abspath(path)), "teacher.pt")
        try:
            teacher = load_field(where, "teacher")[0]
        except UsageError as e:
            print(f"(the grid leaves the teacher's columns out: {e})")
    columns = [sources[:rows]]
    if teacher is not None:
        columns += [sample_field(teacher, rows, tuple(x.shape[1:]), device, k, None, args.seed, matching=matching,
                                 sources=sources[:rows]) for k in (1, steps or 100)]
    if steps is None:  # the first draw is the .npz's; each further one takes the next seed
        columns += [x[:rows]] + [sample_field(net, rows, tuple(x.shape[1:]), device, None, None, args.seed + k,
                                              matching=matching, sources=sources[:rows]) for k in range(1, args.draws)]
    columns += [targets[:rows].float() / 127.5 - 1]
    grid = os.path.splitext(args.out)[0] + ".png"
    pair_grid(columns, grid)
    print(f"grid, a held-out pair per row: source | " + ("teacher 1 step | teacher " + f"{steps or 100} steps | "
          if teacher is not None else "") + (f"one-step generator{f' ({args.draws} z)' if args.draws > 1 else ''} | "
                                             if steps is None else "") + f"target: {grid}")


def cmd_export(args):
    """One network's weights as .safetensors (no pickle), with all it takes to use them again as JSON metadata:
    every command that takes a generator or a teacher reads the file (realuid.read_safetensors)."""
    from safetensors.torch import save
    path = latest_checkpoint(args.checkpoint)
    _, sd, ckpt = read_field_checkpoint(path, "checkpoint", args.ema,
                                        **(dict(image_size=args.resolution) if args.resolution else {}))
    kind = ckpt.get("kind", "teacher")  # torchcfm's and the official files are teachers
    decay = next((k for k, v in (ckpt.get("ema") or {}).items() if v is sd), None)  # the EMA it picked, if any
    weights = ckpt.get("weights") or (f"ema {decay}" if decay else "generator" if kind == "generator" else "net")
    meta = dict(version=VERSION, kind=kind, weights=weights,
                **{k: ckpt.get(k) for k in ("field", "data", "matching", "config")})
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_checkpoint({k: v.contiguous() for k, v in sd.items()}, args.out,  # atomic and durable, as every save
                    write=lambda tensors, f: f.write(save(tensors, {k: json.dumps(v) for k, v in meta.items()})))
    print(f"wrote the {weights} weights of {path} ({kind}, {len(sd)} tensors) to {args.out}")


def main(argv=None):
    p = Parser(prog="eval.py", description="Sampling, FID and efficiency figures for realuid checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)

    def checkpoint_args(s, what):
        s.add_argument("checkpoint", help=what)
        s.add_argument("--ema", type=float, default=None, help="EMA decay to use (default: a generator "
                                                              "checkpoint's raw generator, a teacher's smallest EMA)")
        s.add_argument("--resolution", type=int, default=0, help="image side, for torchcfm / official teacher files")
        s.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")

    s = sub.add_parser("sample", help="write samples of a checkpoint to a .npy file")
    checkpoint_args(s, "a realuid.py checkpoint or output folder, or a teacher file")
    s.add_argument("--n", type=int, default=10_000, help="number of samples")
    s.add_argument("--out", default="samples.npy",
                   help="a .npy file; for images also .npz (images, labels) or a folder of PNGs, plus a PNG grid")
    s.add_argument("--grid", type=int, default=100, help="images in the PNG grid")
    s.add_argument("--steps", type=int, default=None,
                   help="sampler steps of a teacher (default 100); a generator always takes one")
    s.add_argument("--sde", action="store_true", help="a diffusion teacher (vp, ve): Euler-Maruyama of the reverse "
                                                      "SDE instead of DDIM")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--draws", type=int, default=1, help="paired images, a generator: one-step columns in the grid, "
                                                        "each a z of its own (a wide conditional law shows), and the "
                                                        "spread between two draws printed")

    x = sub.add_parser("export", help="one network's weights as .safetensors, for sharing: no pickle, "
                                      "readable wherever a checkpoint is")
    x.add_argument("checkpoint", help="a realuid.py checkpoint or output folder, or a teacher file")
    x.add_argument("--out", required=True, help="the .safetensors file to write")
    x.add_argument("--ema", type=float, default=None,
                   help="export this EMA (default: as sample picks: the generator, a teacher's smallest EMA)")
    x.add_argument("--resolution", type=int, default=0, help="image side, for torchcfm / official teacher files")

    f = sub.add_parser("fid", help="FID of a generator (or a teacher): the paper's protocol by default")
    checkpoint_args(f, "a realuid.py checkpoint, output folder or best-<net>.pt, or a teacher file")
    f.add_argument("--n", type=int, default=50_000, help="generated images per run (the paper: 50000)")
    f.add_argument("--repeats", type=int, default=3, help="runs with fresh samples, averaged (the paper: 3)")
    f.add_argument("--ref", default="", help="cifar10 (clean-fid's train statistics), a .npz of mu and sigma, or "
                                             "images as realuid.py's --dataset takes them (a folder, digits, "
                                             "PATH.npy); default: the checkpoint's training data")
    f.add_argument("--mode", default="auto", choices=("auto", "legacy_tensorflow", "clean"),
                   help="clean-fid mode; auto: legacy_tensorflow against cifar10's statistics, else clean")
    f.add_argument("--features", default="inception",
                   help="inception (clean-fid); classifier: digits' independent digit classifier (eval.py classifier "
                        "builds it), or its file; or an offline UNet file (a teacher.pt): not comparable to "
                        "published FIDs")
    f.add_argument("--data-root", default="", help="where cifar10 is found (default: the training run's)")
    f.add_argument("--batch-size", type=int, default=500, help="images generated per batch")
    f.add_argument("--bf16", action="store_true", help="generate in bf16 autocast (the features stay fp32)")
    f.add_argument("--steps", type=int, default=None, help="sampler steps of a teacher (default 100)")
    f.add_argument("--sde", action="store_true", help="a diffusion teacher (vp, ve): Euler-Maruyama of the reverse "
                                                      "SDE instead of DDIM")
    f.add_argument("--seed", type=int, default=0, help="seed of the first run; run r uses seed + r")
    f.add_argument("--out", default="", help="also write the scores to this .json")

    c = sub.add_parser("classifier", help="train and cache the digit classifier whose penultimate features are "
                                          "digits' independent FID features (--features classifier; seconds)")
    c.add_argument("--resolution", type=int, default=16, help="image side of the digits (8, 16 or 32)")
    c.add_argument("--epochs", type=int, default=30, help="passes over the 1438 training digits")
    c.add_argument("--seed", type=int, default=0, help="draws the weights and batches (the held-out split is fixed)")
    c.add_argument("--out", default="", help="default runs/digits/classifier-<resolution>.safetensors, where "
                                             "--features classifier looks")

    e = sub.add_parser("efficiency", help="parameters, milliseconds per image and peak memory (Table 5)")
    checkpoint_args(e, "a realuid.py checkpoint, output folder or teacher file; or cifar10: the paper's UNet "
                       "with random weights")
    e.add_argument("--batch", type=int, default=0, help="the large batch (default 256 on CUDA, 16 on the CPU)")
    e.add_argument("--teacher-steps", type=int, nargs="*", default=[100], help="sampler steps of the teacher rows")
    e.add_argument("--repeats", type=int, default=10, help="timed runs per row (median)")
    e.add_argument("--budget", type=float, default=20.0, help="seconds per row after which no new run starts")
    e.add_argument("--out", default="", help="also write the rows to this .json")
    b = sub.add_parser("bench", help="milliseconds per update and per iteration: the straightforward loop against "
                                     "the optimised one")
    b.add_argument("--size", default="", choices=("", *BENCH_UNETS), help="the UNet (default: cifar10, the paper's, "
                                                                         "on CUDA; small on a CPU)")
    b.add_argument("--batch", type=int, default=0, help="batch size (default 256 on CUDA, 16 on a CPU)")
    b.add_argument("--K", type=int, default=5, help="fake updates per generator update")
    b.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="the optimised loop's, besides fp32 (auto: as realuid.py picks for this device)")
    b.add_argument("--ladder", action="store_true", help="also time the iteration as each habit of the "
                                                        "straightforward loop is dropped and each option added")
    b.add_argument("--compile", action="store_true", help="with --ladder: also torch.compile (minutes)")
    b.add_argument("--warmup", type=int, default=2, help="untimed calls first")
    b.add_argument("--repeats", type=int, default=10, help="timed calls per row (median)")
    b.add_argument("--budget", type=float, default=30.0, help="seconds per row after which no new call starts")
    b.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    b.add_argument("--out", default="", help="also write the rows to this .json")
    fam = sub.add_parser("families", help="each matching model on the 2D sets: the teacher at 100 steps against "
                                          "the best one-step net, UID beside RealUID (about 30 minutes a seed)")
    fam.add_argument("--datasets", nargs="+", default=["8gaussians", "modes-arc", "checkerboard"],
                     help="built-in 2D sets")
    fam.add_argument("--families", nargs="+", default=list(FAMILIES), help=f"of {', '.join(FAMILIES)}")
    fam.add_argument("--seeds", type=int, default=1, help="seeds per family and method (each its own teacher)")
    fam.add_argument("--eval-samples", type=int, default=2000, help="held-out points of every score (each run's too)")
    fam.add_argument("--draws", type=int, default=16, help="draws of held-out-sized samples per score (W2 of one "
                                                           "draw varies by about 0.08 on the 8 Gaussians)")
    fam.add_argument("--uid", action="store_true", help="also UID (alpha = beta = 1)")
    fam.add_argument("--flags", default="", help="more realuid.py flags for every distillation, e.g. "
                                                 "--flags='--steps 1500 --lr 1e-4'")
    fam.add_argument("--teacher-steps", type=int, default=None,
                     help="updates of each teacher (default: its family's recipe, 10000; VP (eps, score) 15000)")
    fam.add_argument("--out", default="runs/families", help="where every run, picture and table goes")
    k = sub.add_parser("kernel", help="2D teachers: how their one-step generator's tangent kernel couples the "
                                      "modes (why some families' generators pull modes together)")
    k.add_argument("teachers", nargs="+", help="teacher files of 8gaussians or modes-arc")
    k.add_argument("--sigma-init", type=float, default=5.0, help="the noise level the generator is read at")
    k.add_argument("--n", type=int, default=400, help="points z (the kernel is n x n)")
    k.add_argument("--seed", type=int, default=0)
    cv = sub.add_parser("convergence", help="Figure 2 of finished runs: FID (or the class gap, W2) against updates, "
                                            "UID against RealUID, the mean over seeds")
    cv.add_argument("runs", nargs="+", help="realuid.py output folders of runs with --fid-every")
    cv.add_argument("--metric", default="fid", help="fid, classes (the digit classifier's class gap) or w2")
    cv.add_argument("--net", default="", help="generator or an EMA decay (default: each run's first EMA)")
    cv.add_argument("--level", action="append", default=[], help="a horizontal line NAME=VALUE, e.g. "
                                                                   "'teacher, 100 steps=8.15' (repeatable)")
    cv.add_argument("--title", default="")
    cv.add_argument("--out", default="runs/convergence.png", help="the picture (PNG)")
    r = sub.add_parser("reproduce", help="the paper's claims at laptop scale: 1D closed forms, Table 1's grid, "
                                         "Figure 2's convergence, teacher correction (about 30 minutes; --quick)")
    r.add_argument("--quick", action="store_true", help="one seed, short runs: a few minutes")
    r.add_argument("--seeds", type=int, default=0, help="seeds per config (default 3 on 2D, 2 on digits; quick 1)")
    r.add_argument("--out", default="runs/reproduce", help="where every run, plot and table goes")
    args = p.parse_args(argv)
    try:
        {"sample": cmd_sample, "export": cmd_export, "fid": cmd_fid, "classifier": cmd_classifier,
         "efficiency": cmd_efficiency,
         "bench": cmd_bench, "reproduce": cmd_reproduce, "families": cmd_families,
         "kernel": cmd_kernel, "convergence": cmd_convergence}[args.command](args)
    except UsageError as e:
        return fail("eval.py", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
