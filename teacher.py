"""Train the teacher u* that realuid.py distills: flow matching, diffusion, or a data-to-data interpolant.

    python teacher.py                        # the built-in 2D data, a minute on a CPU
    python teacher.py --dataset data.npy --steps 20000 --out runs/mine
    python teacher.py --model vp --dataset digits          # diffusion (images: velocity targets, --param v)
    python teacher.py --model bridge --dataset pairs       # augmented bridge matching on 2D pairs

The loss is the matching model's UM loss (Def. 1, eq. 3): || u(t, x_t[, x_T]) - f_t(x_t | ...) ||^2, for
flow matching (CFM, eq. 2) || u(t, x_t) - (x1 - x0) ||^2 with x_t = (1 - t) x0 + t x1, t = 0 noise, t = 1
data (torchcfm convention). Adam, linear warm-up, gradient clipping and an EMA of the weights: torchcfm's
CIFAR-10 recipe by default (lr 2e-4, batch 128, 400k updates, warm-up 5000, EMA 0.9999, dropout 0.1). The
loop lives in realuid.py's teacher interface (train_teacher), which realuid.py also uses for a teacher trained
on the spot, the flags and recipes in runtime.py (TeacherConfig, teacher_recipes: per kind of data and family);
this file is the command line. The checkpoint (format in README) loads into realuid.py with --teacher.
"""

import os
import sys
import time

from realuid import build_field, train_teacher
from runtime import (DATA_FLAGS, Diverged, Stopped, TeacherConfig, UsageError, count_parameters, default_field_spec,
                     failed, finish, open_run, parser_from_dataclass, resolve_config, resumed_run, stopped_by,
                     teacher_recipes)


RESUMABLE = ("steps", "lr_decay", "decay_steps", "out", "device", "precision", "workers", "log_every", "save_every",
             "skip_nonfinite", "sample_steps", "resume")  # a constant-lr teacher may be annealed on resume
FLAG_GROUPS = (("the matching model", ("model", "param", "sigma", "source_noise")),
               ("training (torchcfm's CIFAR-10 recipe)", ("lr", "batch_size", "steps", "warmup", "lr_decay",
                                                          "decay_steps", "ema", "grad_clip")),
               ("the network", ("channels", "channel_mult", "num_res_blocks", "attention_resolutions", "num_heads",
                                "num_head_channels", "dropout", "hidden", "fourier")),
               ("data", DATA_FLAGS))


def main(argv=None):
    p = parser_from_dataclass(TeacherConfig, "Train a matching-model teacher (flow matching, diffusion, "
                                             "bridge matching, interpolants) for realuid.py.", "teacher.py",
                              FLAG_GROUPS)
    user = vars(p.parse_args(argv))
    given, out, created, resume = set(user), None, None, None
    try:
        if user.get("resume"):
            resume, user = resumed_run(user, RESUMABLE, "teacher-state", "teacher.py", "teacher-state.pt")
        cfg, data = resolve_config(TeacherConfig, user, teacher_recipes(user.get("model"), user.get("param")))
        if resume is not None and resume["step"] > cfg.steps:
            raise UsageError(f"the saved teacher has made {resume['step']} updates already; --steps {cfg.steps} "
                             f"would go back")
        if "decay_steps" in given and cfg.lr_decay != "cosine":  # else a constant lr that the user thinks anneals
            raise UsageError("--decay-steps applies only with --lr-decay cosine")
        ranks, device, out, created = open_run(cfg, data)
    except UsageError as e:
        return failed("teacher.py", e, created)
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
        return stopped_by(*e.args, f"state saved in {os.path.join(out, 'teacher-state.pt')}", out, say)
    except (UsageError, Diverged, OSError) as e:
        state = os.path.join(out, "teacher-state.pt")
        return failed("teacher.py", e, created, state if os.path.isfile(state) else None)
    say(f"teacher training took {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(finish(main()))
