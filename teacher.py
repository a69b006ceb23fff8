"""Train the teacher u* that realuid.py distills: flow matching, diffusion, or a data-to-data interpolant.

    python teacher.py                        # the built-in 2D data, a minute on a CPU
    python teacher.py --dataset data.npy --steps 20000 --out runs/mine
    python teacher.py --model vp --dataset digits          # diffusion (denoising score matching)
    python teacher.py --model bridge --dataset pairs       # augmented bridge matching on 2D pairs

The loss is the matching model's UM loss (Def. 1, eq. 3): || u(t, x_t[, x_T]) - f_t(x_t | ...) ||^2, for
flow matching (CFM, eq. 2) || u(t, x_t) - (x1 - x0) ||^2 with x_t = (1 - t) x0 + t x1, t = 0 noise, t = 1
data (torchcfm convention). Adam, linear warm-up, gradient clipping and an EMA of the weights, as in
NOTES.md section 6. The checkpoint (format in README) loads into realuid.py with --teacher.
"""

import copy
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch

from realuid import (DATA_FIELDS, Diverged, NonFinite, PRECISIONS, Ranks, UsageError, VERSION, batches, build_field,
                     catch_signals, check_batch_size, check_finite, check_world, config_dict, count_parameters,
                     default_field_spec, ema_update, fail, finish, fused_adam, init_ranks, load_checkpoint, load_data,
                     make_config, matching_model, new_folder, noise_and_time, opt, parser_from_dataclass, resumed_flags,
                     rng_state, sample_field, save_checkpoint, save_grid, set_precision, set_rng_state, um_loss,
                     undo_folder, use_bf16, warmup_schedule)


@dataclass
class TeacherConfig:
    """Defaults: torchcfm's CIFAR-10 teacher recipe (NOTES.md section 6)."""
    dataset: str = opt("8gaussians", "8gaussians (built-in 2D), digits, cifar10, an image folder, or PATH.npy")
    cond: bool = opt(False, "class-conditional teacher")
    model: str = opt("fm", "matching model: fm (flow matching), vp or ve (diffusion), si or bridge (data-to-data "
                           "pairs, e.g. --dataset pairs)", choices=("fm", "vp", "ve", "si", "bridge"))
    param: str = opt("eps", "diffusion: the network predicts the noise (eps) or the score", choices=("eps", "score"))
    sigma: float = opt(0.5, "si, bridge: the scale of the path's noise gamma_t")
    source_noise: float = opt(0.1, "si, bridge: the noise added to the source x_T at t = 0 (the generator's z)")
    lr: float = opt(2e-4, "Adam learning rate")
    batch_size: int = opt(128, "batch size")
    steps: int = opt(400_000, "updates")
    warmup: int = opt(5000, "linear learning-rate warm-up, in updates")
    ema: tuple = opt((0.9999,), "EMA decays of the weights")
    grad_clip: float = opt(1.0, "gradient-norm clipping")
    channels: int = opt(128, "UNet base channels (images)")
    channel_mult: tuple = opt((), "UNet channel multipliers per level (default by resolution: 32 px and up "
                                  "1 2 2 2, 16 px 1 2 2, 8 px 1 2)", type=int)
    num_res_blocks: int = opt(2, "UNet residual blocks per level")
    attention_resolutions: tuple = opt((16,), "feature-map sizes with self-attention", type=int)
    num_heads: int = opt(4, "attention heads")
    num_head_channels: int = opt(64, "channels per attention head (overrides --num-heads; -1: off)")
    dropout: float = opt(0.1, "dropout of the UNet (images)")
    hidden: int = opt(256, "MLP width (low-dimensional data)")
    out: str = opt("", "output folder (default runs/<dataset>); writes teacher.pt there")
    data_root: str = opt("data", "where cifar10 is found or downloaded")
    resolution: int = opt(0, "image side: image folders (default 64) and digits (16 or 32, default 16)")
    device: str = opt("auto", "cpu, cuda, cuda:N or auto (under torchrun: each rank's own card)")
    precision: str = opt("auto", "fp32, or bf16 autocast; auto: bf16 for UNets on CUDA cards and AMX CPUs",
                         choices=PRECISIONS)
    seed: int = opt(0, "seed")
    workers: int = opt(2, "data-loader processes for image folders")
    log_every: int = opt(100, "updates between progress-bar updates (and checks for non-finite updates)")
    save_every: int = opt(5000, "updates between saves of the whole training state (teacher-state.pt, for --resume)")
    resume: str = opt("", "continue a teacher run exactly (or train it longer with --steps): its output folder or "
                          "teacher-state.pt")
    skip_nonfinite: int = opt(0, "skip up to N updates whose loss or gradient is NaN or infinite (else stop)")
    sample_steps: int = opt(100, "sampler steps of the closing sample grid (images; 0: no grid)")
    eval_samples: int = opt(2000, "held-out points kept aside (low-dim .npy data)")


TEACHER_RECIPES = dict(
    lowdim=dict(lr=1e-3, batch_size=512, steps=5000, warmup=100, ema=(0.999,)),
    # a small UNet that learns recognisable digits in minutes on two CPU cores
    digits=dict(lr=1e-3, batch_size=64, steps=2500, warmup=200, ema=(0.995,), channels=32, channel_mult=(1, 2),
                num_res_blocks=1, attention_resolutions=(8,), num_head_channels=32, dropout=0.0),
    image={})


def matching_spec(cfg):
    if cfg.model in ("vp", "ve"):
        return dict(type=cfg.model, param=cfg.param)
    if cfg.model in ("si", "bridge"):
        return dict(type=cfg.model, sigma=cfg.sigma, source_noise=cfg.source_noise)
    return dict(type="fm")


def teacher_step(net, optimiser, sched, ema, m, x1, y, grad_clip, bf16=False, ranks=None, nonfinite=None, update=0):
    """One UM update (Def. 1, eq. 3): || u(t, x_t[, y]) - f_t(x_t | x1) ||^2, weighted as m asks; returns the
    loss as a tensor (no host sync). A non-finite loss or gradient skips the update (counted in nonfinite)."""
    ranks, nonfinite = ranks or Ranks(), nonfinite or NonFinite(["teacher"], x1.device)
    x0, t = noise_and_time(m, x1, y, ranks)
    with torch.autocast(x1.device.type, torch.bfloat16, enabled=bf16):
        u = net(t, m.path(x0, x1, t), y).float()
    loss, w = um_loss(u, m.target(x0, x1, t)), m.weight(t)
    loss = (loss if w is None else w * loss).mean()
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    ranks.average(net.parameters())
    nonfinite.step(0, optimiser, list(net.parameters()), loss, grad_clip, update)
    sched.step()
    for decay, ema_net in ema.items():
        ema_update(ema_net, net, decay)
    return loss.detach()


class Stopped(Exception):
    """SIGINT or SIGTERM stopped the teacher at an update boundary, after saving teacher-state.pt."""


def train_teacher(cfg, data, device, path, ranks=None, state_path=None, resume=None):
    """Fit u(t, x_t[, y]) to the conditional target (Def. 1); write the checkpoint to path and return the net.
    Under torchrun each rank takes its share of every batch and rank 0 writes the files.

    With state_path (teacher.py), the whole training state is saved there every cfg.save_every updates and when
    SIGINT or SIGTERM arrives (which then raises Stopped); resume, such a file's contents, continues it exactly.
    """
    from tqdm import tqdm
    ranks = ranks or Ranks()
    torch.manual_seed(cfg.seed)
    spec = default_field_spec(data, cfg)
    net = build_field(spec).to(device).train()
    ema = {d: copy.deepcopy(net).eval().requires_grad_(False) for d in cfg.ema}
    optimiser = torch.optim.Adam(net.parameters(), lr=cfg.lr, fused=fused_adam(device))
    sched = torch.optim.lr_scheduler.LambdaLR(optimiser, warmup_schedule(cfg.warmup))
    m = matching_model(matching_spec(cfg))
    if m.coupled != data.coupled:
        raise UsageError(f"--model {cfg.model} {'needs' if m.coupled else 'cannot use'} data-to-data pairs "
                         f"(--dataset pairs)")
    start = 0
    if resume is not None:
        net.load_state_dict(resume["net"])
        for d, ema_net in ema.items():
            ema_net.load_state_dict(resume["ema"][str(d)])
        optimiser.load_state_dict(resume["optimiser"])
        sched.load_state_dict(resume["sched"])
        optimiser.param_groups[0]["fused"] = fused_adam(device)
        start = resume["step"]
        set_rng_state(resume["rng"], device)
    source = batches(data, cfg.batch_size, device, cfg.seed, start, workers=cfg.workers, ranks=ranks)
    bf16 = use_bf16(getattr(cfg, "precision", "fp32"), device, spec)

    def save_state(step, final):
        """A failed periodic save (a full disk) warns and training goes on; a failed closing one raises."""
        if state_path and ranks.main:
            try:
                save_checkpoint(dict(version=VERSION, kind="teacher-state", config=config_dict(cfg), step=step,
                                     net=net.state_dict(), ema={str(d): e.state_dict() for d, e in ema.items()},
                                     optimiser=optimiser.state_dict(), sched=sched.state_dict(),
                                     rng=rng_state(device)), state_path)
            except OSError as e:
                if final:
                    raise
                bar.write(f"teacher.py: warning: could not write {state_path} ({e.strerror or e}); training goes "
                          f"on", file=sys.stderr)
    stop = []
    handlers = catch_signals(lambda signum, _: stop.append(signum)) if state_path else {}
    bar = tqdm(range(start, cfg.steps), desc="teacher", dynamic_ncols=True, disable=None if ranks.main else True,
               mininterval=1.0, initial=start, total=cfg.steps)
    nonfinite = NonFinite(["teacher"], device)
    try:
        for step in bar:
            x1, y = next(source)
            loss = teacher_step(net, optimiser, sched, ema, m, x1, y, cfg.grad_clip, bf16, ranks, nonfinite,
                                step + 1)
            boundary = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps
            saving = state_path and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps)
            halt = ranks.any(stop) if boundary or ranks.world == 1 else False
            if boundary or saving or halt:
                skipped = nonfinite.check(getattr(cfg, "skip_nonfinite", 0), step + 1)  # raises past the allowance
                if skipped and ranks.main:
                    bar.write(f"teacher.py: warning: {skipped}", file=sys.stderr)
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            if saving or halt:
                save_state(step + 1, final=halt)
            if halt:
                raise Stopped((stop[0] if stop else signal.SIGTERM, step + 1))
    finally:
        bar.close()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if not ranks.main:
        return net
    save_checkpoint(dict(version=VERSION, kind="teacher", config=config_dict(cfg), matching=m.spec(),
                         data=data.info(cfg.dataset), field=spec, net=net.state_dict(),
                         ema={str(d): m.state_dict() for d, m in ema.items()}), path)
    if data.kind == "image" and cfg.sample_steps > 0:  # what the teacher has learnt
        grid = os.path.join(os.path.dirname(path), "teacher-samples.png")
        save_grid(sample_field(ema[min(ema)], 64, data.shape(), device, cfg.sample_steps, data.num_classes,
                               matching=m), grid)
        print(f"teacher samples ({cfg.sample_steps} sampler steps, EMA {min(ema)}): {grid}")
    return net


RESUMABLE = ("steps", "out", "device", "precision", "workers", "log_every", "save_every", "skip_nonfinite",
             "sample_steps", "resume")


def resumed_config(user):
    """(saved state, flags): the saved configuration, with only the RESUMABLE flags the user gave changed."""
    path = user["resume"]
    path = os.path.join(path, "teacher-state.pt") if os.path.isdir(path) else path
    state = load_checkpoint(path, "teacher state to resume")
    if not isinstance(state, dict) or state.get("kind") != "teacher-state":
        raise UsageError(f"{path} is not a teacher.py training state (teacher-state.pt)")
    return state, resumed_flags(user, state["config"], path, RESUMABLE)


def main(argv=None):
    p = parser_from_dataclass(TeacherConfig, "Train a matching-model teacher (flow matching, diffusion, "
                                             "bridge matching, interpolants) for realuid.py.", "teacher.py")
    user = vars(p.parse_args(argv))
    out, created, resume = None, False, None
    try:
        if user.get("resume"):
            resume, user = resumed_config(user)
        cfg = make_config(TeacherConfig, {k: v for k, v in user.items() if k in DATA_FIELDS})
        check_finite(cfg)  # the data fields, before they size anything
        data = load_data(cfg)
        cfg = make_config(TeacherConfig, user, TEACHER_RECIPES[data.recipe])
        check_finite(cfg)
        if cfg.steps < 1 or cfg.lr <= 0 or cfg.warmup < 0 or not all(0 < d < 1 for d in cfg.ema) \
                or cfg.batch_size < 1 or cfg.log_every < 1 or cfg.save_every < 1 or cfg.skip_nonfinite < 0 \
                or cfg.grad_clip <= 0:
            raise UsageError("--steps, --lr, --batch-size, --log-every, --save-every and --grad-clip must be positive, "
                             "--warmup and --skip-nonfinite non-negative, --ema in (0, 1)")
        if resume is not None and resume["step"] > cfg.steps:
            raise UsageError(f"the saved teacher has made {resume['step']} updates already; --steps {cfg.steps} "
                             f"would go back")
        check_batch_size(cfg.batch_size, data)
        ranks, device = init_ranks(cfg.device)
        check_world(cfg.batch_size, ranks)
        set_precision(cfg.precision, device)
        out = cfg.out or os.path.join("runs", os.path.splitext(os.path.basename(cfg.dataset.rstrip("/")))[0])
        created = new_folder(out)
    except UsageError as e:
        return fail("teacher.py", e)
    path = os.path.join(out, "teacher.pt")
    spec = default_field_spec(data, cfg)
    say = print if ranks.main else lambda *a: None
    say(f"teacher: {cfg.dataset} ({len(data)} items), updates {resume['step'] if resume else 0}..{cfg.steps} "
        f"on {device}"
        f"{f' x {ranks.world} ranks' if ranks.world > 1 else ''}, {count_parameters(build_field(spec))} "
        f"parameters -> {path}")
    t0 = time.time()
    try:
        train_teacher(cfg, data, device, path, ranks, os.path.join(out, "teacher-state.pt"), resume)
    except Stopped as e:
        signum, step = e.args[0]
        say(f"stopped by signal {signal.Signals(signum).name} at update {step}: state saved in "
            f"{os.path.join(out, 'teacher-state.pt')}; continue with --resume {out}")
        return 128 + signum
    except (UsageError, Diverged, OSError) as e:
        undo_folder(out, created)
        if isinstance(e, UsageError):
            return fail("teacher.py", e)
        state = os.path.join(out, "teacher-state.pt")
        last = f"the last good state is {state}" if os.path.isfile(state) else "nothing was saved"
        return fail("teacher.py", f"{e}; {last}" if isinstance(e, Diverged) else
                    f"could not write a file in {out} ({e.strerror or e}); {last}", code=1)
    say(f"teacher training took {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(finish(main()))
