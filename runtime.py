"""What keeps a days-long run alive but is not the method: realuid.py, teacher.py and eval.py use it.

Errors, flags and their validation (the recipes of realuid.py and teacher.py too, and the network a kind of data
gets), devices and precision, torchrun ranks, the non-finite guard, checkpoints (atomic saves, weights-only reads,
safetensors), the supervisor of a training loop (progress bar, metrics log, saves,
signals), data loading, sample grids, and the scores that model selection needs during a run (W2, the Frechet
distance, feature networks, the closing table). It imports nothing of this project: the method lives in
realuid.py, and reaches this module only through the hooks realuid.py declares.
"""

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import pickle
import re
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

VERSION = 1


class UsageError(Exception):
    """Bad input from the user: printed as one line, never as a traceback."""


class Stopped(Exception):
    """SIGINT or SIGTERM stopped training at an update boundary, after a save: args (signal, update)."""


class Diverged(Exception):
    """A loss or gradient went non-finite more often than --skip-nonfinite allows."""


# =============================================================================
# Flags: generated from a dataclass, checked once, one line on bad input
# =============================================================================

PRECISIONS = ("auto", "fp32", "bf16")


def opt(default, help, **kw):
    return field(default=default, metadata=dict(help=help, **kw))


class Parser(argparse.ArgumentParser):
    """argparse, with a mistyped flag answered in one line rather than the whole usage text."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def parser_from_dataclass(cls, description, prog, groups=()):
    """argparse from a config dataclass, its flags under headings: groups is ((title, field names), ...), and the
    fields no group names come last, under "the run"."""
    p = Parser(prog=prog, description=description, argument_default=argparse.SUPPRESS,
               usage=f"python {prog} [--flag VALUE ...]")
    place = {name: (i, j) for i, (_, names) in enumerate(groups) for j, name in enumerate(names)}
    sections = [p.add_argument_group(title) for title in [t for t, _ in groups] + ["the run"]]
    for f in sorted(dataclasses.fields(cls), key=lambda f: place.get(f.name, (len(groups), 0))):
        flag, meta = "--" + f.name.replace("_", "-"), dict(f.metadata)
        helptext, section = f"{meta.pop('help', '')} (default: {f.default})", sections[place.get(f.name, (-1,))[0]]
        if isinstance(f.default, bool):
            section.add_argument(flag, action="store_true", help=helptext)
        elif isinstance(f.default, tuple):
            section.add_argument(flag, help=helptext, nargs=meta.pop("nargs", "+"), type=meta.pop("type", float),
                                 **meta)
        else:
            section.add_argument(flag, type=meta.pop("type", type(f.default)), help=helptext, **meta)
    return p


# The headings of the flags that RunFlags, DistillFlags and TeacherConfig hold (parser_from_dataclass's groups)
DATA_FLAGS = ("dataset", "cond", "resolution", "data_root", "target_dir")
SELECTION_FLAGS = ("fid_every", "fid_samples", "fid_ref", "fid_features", "eval_samples")
TEACHER_FLAGS = ("model", "teacher", "teacher_ema", "teacher_steps", "hidden", "num_heads", "num_head_channels")


@dataclass
class RunFlags:
    """The flags of a training run that are not the method's: the data's place, the output, the device, the seed,
    logging, saving and resuming. realuid.Config (through DistillFlags) and TeacherConfig extend it."""
    resolution: int = opt(0, "image side: image folders (default: their images' own size) and digits (16 or 32, default 16)")
    data_root: str = opt("data", "where cifar10 is found or downloaded")
    target_dir: str = opt("", "paired image folders: the targets' folder, --dataset the sources' (paired by file name)")
    eval_samples: int = opt(2000, "held-out points, never trained on, for the final metrics (low-dim data; paired "
                                  "images: how many held-out pairs the closing table restores)")
    out: str = opt("", "output folder (default runs/<dataset>)")
    resume: str = opt("", "continue a run exactly: its output folder or checkpoint (teacher.py: teacher-state.pt, "
                          "which --steps may also train longer)")
    device: str = opt("auto", "cpu, cuda, cuda:N or auto (under torchrun: each rank's own card)")
    precision: str = opt("auto", "network arithmetic: fp32, or bf16 autocast with the loss algebra in fp32; auto: "
                                 "bf16 for UNets on CUDA cards and AMX CPUs, else fp32", choices=PRECISIONS)
    seed: int = opt(0, "seed of everything random")
    workers: int = opt(2, "data-loader processes for image folders")
    log_every: int = opt(100, "updates between progress-bar and metrics-log lines (and non-finite checks)")
    save_every: int = opt(5000, "updates between checkpoints (teacher.py: of its whole training state)")
    skip_nonfinite: int = opt(0, "skip up to N updates whose loss or gradient is NaN or infinite; past N (and by "
                                 "default at the first) the run stops, keeping the last good checkpoint")


@dataclass
class DistillFlags(RunFlags):
    """realuid.py's flags that are not the method's: the teacher's, the data's, and the run's besides RunFlags
    (checkpoints kept, sample grids, loggers, speed, model selection)."""
    dataset: str = opt("8gaussians", "8gaussians, modes-arc, checkerboard (2D), digits, cifar10, an image folder, "
                                     "PATH.npy (N x D floats, N x H x W x C uint8); paired (si, bridge): pairs (2D), "
                                     "digits-sr, digits-inpaint, digits-sr8, digits-inpaint-top, PATH.npz (uint8 "
                                     "source, target), DIR --target-dir")
    cond: bool = opt(False, "class-conditional generator, teacher and fake model")
    model: str = opt("", "matching model: fm, vp, ve (diffusion), si, bridge (data-to-data, e.g. --dataset pairs); "
                         "default: the teacher file's, fm for a teacher trained on the spot")
    teacher: str = opt("", "teacher file: teacher.py's, torchcfm's, the official code's (2D: trained on the spot)")
    teacher_ema: float = opt(None, "EMA decay to take from a teacher file holding several", type=float)
    num_heads: int = opt(4, "attention heads, for teacher files that do not record them")
    num_head_channels: int = opt(64, "channels per head (overrides --num-heads; -1: off), likewise")
    hidden: int = opt(256, "MLP width (low-dimensional data)")
    teacher_steps: int = opt(None, "updates of the on-the-spot teacher (low-dim data, no --teacher); default: its "
                                   "family's recipe, 10000 (VP with eps or score: 15000)", type=int)
    keep: int = opt(3, "checkpoints kept (the newest)")
    sample_every: int = opt(5000, "updates between sample grids of the generator and every EMA (images)")
    tensorboard: bool = opt(False, "also log to TensorBoard (needs the tensorboard package)")
    channels_last: bool = opt(False, "NHWC layout for the UNets (for tensor cores; slower on a CPU without AMX)")
    compile: bool = opt(False, "torch.compile the networks (minutes of compilation before the first update)")
    deterministic: bool = opt(False, "CUDA: deterministic algorithms only (slower; CPU runs are deterministic anyway)")
    fid_every: int = opt(0, "updates between FID scores of the generator and every EMA, keeping best-<net>.pt "
                            "for each (low-dim data: W2 to the held-out points); 0: off")
    fid_samples: int = opt(50_000, "generated images per FID score (the paper: 50000)")
    fid_ref: str = opt("", "FID reference: cifar10 (clean-fid's train statistics), a .npz of mu and sigma, "
                           "or images as --dataset takes them (default: cifar10's statistics for cifar10, "
                           "else the training data)")
    fid_features: str = opt("inception", "FID features: clean-fid's Inception; classifier: digits' independent "
                                         "digit classifier (eval.py classifier builds it); or an offline network "
                                         "file (a teacher.pt; not comparable to published FIDs)")


# realuid.py's flags that mean something only beside another, and those a --resume may change
DISTILL_DEPENDENT = dict(parameterization="gamma", lambda_gen="gan", lambda_disc="gan", gan_t_range="gan",
                         dmd_t_max="dmd", init_ema="init_generator")
DISTILL_RESUMABLE = ("steps", "out", "device", "precision", "channels_last", "compile", "workers", "log_every",
                     "save_every", "keep", "sample_every", "tensorboard", "fid_every", "fid_samples", "skip_nonfinite",
                     "deterministic", "resume")


@dataclass
class TeacherConfig(RunFlags):
    """teacher.py's flags (and those of a teacher trained on the spot). Defaults: torchcfm's CIFAR-10 recipe."""
    dataset: str = opt("8gaussians", "8gaussians, modes-arc or checkerboard (built-in 2D), digits, cifar10, an "
                                     "image folder, or PATH.npy; paired (si, bridge): pairs, digits-sr, "
                                     "digits-inpaint, digits-sr8, digits-inpaint-top, PATH.npz, or a folder with "
                                     "--target-dir")
    cond: bool = opt(False, "class-conditional teacher")
    model: str = opt("fm", "matching model: fm (flow matching), vp or ve (diffusion), si or bridge (data-to-data "
                           "pairs, e.g. --dataset pairs)", choices=("fm", "vp", "ve", "si", "bridge"))
    param: str = opt("", "diffusion: the network predicts the noise (eps), the score, EDM's preconditioned "
                         "denoiser (edm), or flow matching's velocity on its clock (v); default: eps for vp, edm "
                         "for ve on 2D data, v on images. bridge: the drift, or the drift times sqrt(1 - t) "
                         "(scaled); default: drift on 2D data, scaled on images",
                         choices=("", "eps", "score", "edm", "v", "drift", "scaled"))
    sigma: float = opt(0.5, "si, bridge: the scale of the path's noise gamma_t")
    source_noise: float = opt(0.1, "si, bridge: the noise added to the source x_T at t = 0 (the generator's z)")
    lr: float = opt(2e-4, "Adam learning rate")
    batch_size: int = opt(128, "batch size")
    steps: int = opt(400_000, "updates")
    warmup: int = opt(5000, "linear learning-rate warm-up, in updates")
    lr_decay: str = opt("none", "after the warm-up: none (a constant lr, torchcfm's) or cosine (down to 0 at "
                                "--steps)", choices=("none", "cosine"))
    decay_steps: int = opt(0, "with --lr-decay cosine: the cosine over only the last this many updates, the lr "
                              "constant before (warm-up-stable-decay); 0: over all of them")
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
    fourier: int = opt(0, "Fourier features of x in the MLP (low-dimensional data; 0: none)")
    sample_steps: int = opt(100, "sampler steps of the closing sample grid (images; 0: no grid)")


TEACHER_RECIPES = dict(
    # a cosine to 0 over 10000 updates and 64 Fourier features: the teacher's precision on the checkerboard 0.874
    # (constant lr, 5000 updates, plain MLP) -> 0.921 -> 0.981, and one step keeps the modes' shape (fine-detail.md)
    lowdim=dict(lr=1e-3, batch_size=512, steps=10000, warmup=100, lr_decay="cosine", ema=(0.999,), fourier=64),
    # a small UNet that learns recognisable digits in minutes on two CPU cores
    digits=dict(lr=1e-3, batch_size=64, steps=2500, warmup=200, ema=(0.995,), channels=32, channel_mult=(1, 2),
                num_res_blocks=1, attention_resolutions=(8,), num_head_channels=32, dropout=0.0),
    image={})

# What a family's teacher needs on top of its kind of data's recipe. VP's eps and score networks learn the high
# noise levels slowly (their denoiser divides by a_t): on modes-arc (W2 floor 0.57) 5000 updates leave them at
# 0.90 and 0.78 at 100 DDIM steps, 15000 at 0.60 and 0.67, where flow matching and VE (edm) reach 0.58 and 0.57
# in 5000 (docs/matching-models.md)
# Paired 2D data keep the plain MLP: with 64 Fourier features a 1500-update bridge distillation on `pairs` ended
# further from the data than the teacher's single step (W2 2.71 against 2.34); they are measured on unpaired data
FAMILY_TEACHER_RECIPES = {("lowdim", "vp", "eps"): dict(steps=15000), ("lowdim", "vp", "score"): dict(steps=15000),
                          ("lowdim", "si", ""): dict(fourier=0), ("lowdim", "bridge", ""): dict(fourier=0),
                          # FID 87 at 2500 updates, 37 at 7500, 23 at 15000; 19000 with the last 4000 on a cosine
                          # to 0 (warm-up-stable-decay) 10.9 by the reverse SDE, 13.8 at a constant lr
                          ("digits", "vp", "eps"): dict(steps=19000, lr_decay="cosine", decay_steps=4000)}
# A diffusion's parameterisation when --param is not given, per kind of data. On digits VP (eps) and VE (edm) score
# about 2.8x flow matching's FID after distillation (measured before eps's sampler clamp and loss weight, #39),
# where v comes within 5 to 35 % of it (docs/matching-models.md); on 2D eps and edm reach their teachers
# A bridge's drift grows like 1 / sqrt(1 - t) near the data: on images its error there left grain in the 100-step
# samples, which the drift scaled by sqrt(1 - t) removes (docs/image-to-image.md); 2D bridges were measured unscaled
DEFAULT_PARAM = dict(lowdim=dict(vp="eps", ve="edm", bridge="drift"), digits=dict(vp="v", ve="v", bridge="scaled"),
                     image=dict(vp="v", ve="v", bridge="scaled"))
DIFFUSION_PARAMS = ("eps", "score", "edm", "v")
PARAMS = dict(fm=(), si=(), vp=DIFFUSION_PARAMS, ve=DIFFUSION_PARAMS, bridge=("drift", "scaled"))


def teacher_recipes(model, param=""):
    """TEACHER_RECIPES, per kind of data, with what the family (model, param) needs on top."""
    family = {kind: (model or "fm", param or DEFAULT_PARAM[kind].get(model, "")) for kind in TEACHER_RECIPES}
    return {kind: recipe | FAMILY_TEACHER_RECIPES.get((kind, family[kind][0], ""), {})  # "": every param's
            | FAMILY_TEACHER_RECIPES.get((kind, *family[kind]), {}) for kind, recipe in TEACHER_RECIPES.items()}


def matching_spec(cfg, kind):
    """The matching model's spec that a teacher's flags ask for (realuid.matching_model builds it): a diffusion on
    images (in [-1, 1]) clamps its sampler's x1_hat to that range, and its eps loss is weighted by max(1, sigma)
    (eps's x1_hat is f's error times sigma, 148 at the noisiest level: unweighted, its DDIM samples came out
    speckled, docs/matching-models.md); on 2D data (unbounded) neither, as measured there."""
    if cfg.model in ("vp", "ve"):
        param = cfg.param or DEFAULT_PARAM[kind][cfg.model]
        return dict(type=cfg.model, param=param) | ({} if kind == "lowdim" else dict(clip=1.0)) | (
            dict(weighting="sigma") if kind != "lowdim" and param == "eps" else {})
    if cfg.model in ("si", "bridge"):
        param = cfg.param or DEFAULT_PARAM[kind].get(cfg.model, "drift")
        return dict(type=cfg.model, sigma=cfg.sigma, source_noise=cfg.source_noise) | (
            dict(param=param) if param != "drift" else {})
    return dict(type="fm")


DATA_FIELDS = ("dataset", "cond", "seed", "eval_samples", "resolution", "data_root", "target_dir")  # load_data's


def make_config(cls, user, *recipes):
    """Dataclass defaults (the paper's recipe) < the recipes, in order < the user's flags."""
    values = {}
    for recipe in recipes:
        values.update(recipe)
    values.update(user)
    for f in dataclasses.fields(cls):
        if isinstance(f.default, tuple) and f.name in values:
            values[f.name] = tuple(values[f.name])
    return cls(**{k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(cls)}})


def resolve_config(cls, user, recipes, *more):
    """(cfg, data): the data fields are checked and the data loaded first, since the data pick the recipe; then
    cfg = the defaults < recipes[the data's kind] < recipes[<kind>_pairs] (paired data) < more < the user's flags,
    its ranges checked."""
    cfg = make_config(cls, {k: v for k, v in user.items() if k in DATA_FIELDS})
    check_finite(cfg)  # the data fields, before they size anything
    data = load_data(cfg)
    paired = recipes.get(f"{data.recipe}_pairs", {}) if data.coupled else {}
    cfg = make_config(cls, user, recipes[data.recipe], paired, *more)
    check_finite(cfg)
    return cfg, data


def config_dict(cfg):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def check_finite(cfg):
    """Every number finite (nan and inf pass every range test written as a comparison), in its range, and no
    size so large that a typo allocates the machine away; checked for whichever of these flags cfg has."""
    names = {f.name for f in dataclasses.fields(cfg)}
    for name in names:
        values = getattr(cfg, name)
        for v in values if isinstance(values, tuple) else (values,):
            if isinstance(v, float) and not math.isfinite(v):
                raise UsageError(f"--{name.replace('_', '-')} must be a finite number (got {v})")
    if not 0 <= cfg.seed < 2 ** 31:
        raise UsageError(f"--seed must lie in [0, 2^31) (got {cfg.seed})")
    for name, (lo, hi) in SIZE_LIMITS.items():
        if name in names and getattr(cfg, name) is not None and not lo <= getattr(cfg, name) <= hi:
            raise UsageError(f"--{name.replace('_', '-')} must lie in [{lo}, {hi}] (got {getattr(cfg, name)})")
    if getattr(cfg, "channels", 32) % 32:
        raise UsageError(f"--channels must be a multiple of 32, the UNet's GroupNorm groups (got {cfg.channels})")
    for name in POSITIVE:
        if name in names and not getattr(cfg, name) > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive number (got {getattr(cfg, name)})")
    for name in NON_NEGATIVE:
        if name in names and not getattr(cfg, name) >= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(cfg, name)})")
    if "param" in names and cfg.param and cfg.param not in PARAMS.get(cfg.model, ()):
        raise UsageError(f"--param {cfg.param} is not one of --model {cfg.model}'s: "
                         f"{', '.join(PARAMS.get(cfg.model, ())) or 'it takes none'}")
    if "ema" in names and (not cfg.ema or not all(0 < d < 1 for d in cfg.ema)):
        raise UsageError(f"every --ema decay must lie in (0, 1) (got {list(cfg.ema)})")


POSITIVE = ("K", "batch_size", "steps", "log_every", "save_every", "sample_every", "keep", "hidden", "fid_samples",
            "lr", "grad_clip", "fake_lr_mult", "regress_lr")
NON_NEGATIVE = ("warmup", "fid_every", "skip_nonfinite", "ema_rampup", "regress_weight", "regress_pairs")
SIZE_LIMITS = dict(hidden=(1, 65536), channels=(32, 4096), num_res_blocks=(1, 32), workers=(0, 256),
                   resolution=(0, 4096), eval_samples=(1, 10 ** 7), fid_samples=(1, 10 ** 7),
                   teacher_steps=(1, 10 ** 9), fourier=(0, 4096), regress=(0, 100), decay_steps=(0, 10 ** 9))


@contextlib.contextmanager
def refusing():
    """The method's own checks in realuid.py raise ValueError (a coefficient out of range, an unknown matching
    model, a network too small for the GAN head): on the command line they are refusals like any other."""
    try:
        yield
    except ValueError as e:
        raise UsageError(str(e)) from None


def fail(prog, e, code=2):
    """One line on stderr; exit code 2 for bad input, 1 for a run that failed."""
    print(f"{prog}: error: {e}", file=sys.stderr)
    return code


def failed(prog, e, undo=None, saved=None):
    """The exit code of a run that raised, after taking away the folders in `undo` that hold no work: 2 for bad
    input (UsageError), 1 for a run that failed (divergence, a disk that stays full), naming the last good save."""
    undo_folder(undo)
    if isinstance(e, UsageError):
        return fail(prog, e)
    if isinstance(e, Diverged):
        e = f"{e}; " + (f"the last good checkpoint is {saved}" if saved else "no checkpoint was saved before")
    elif e.strerror:  # an OSError of the system's, not the Supervisor's own account
        e = f"could not write {e.filename or 'a file'} ({e.strerror}); the last good checkpoint is {saved or 'none'}"
    return fail(prog, e, code=1)


def new_folder(path):
    """makedirs; returns the topmost folder it created (None if path existed), which a refused run takes away."""
    top, parent = None, os.path.abspath(path)
    while not os.path.exists(parent):
        top, parent = parent, os.path.dirname(parent)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the output folder {path} ({e.strerror or e})") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"the output folder {path} is not writable")
    return top


def undo_folder(top):
    """A run refused before it saved anything takes away the folders it created (logs, an empty samples/, an
    empty runs/), and keeps any folder with work in it (checkpoints, a teacher trained on the spot)."""
    if top and os.path.isdir(top) and not any(f.endswith((".pt", ".safetensors")) for _, _, fs in os.walk(top)
                                              for f in fs):
        import shutil
        shutil.rmtree(top, ignore_errors=True)


def check_loss_flags(cfg):
    """realuid.py's loss flags beyond alpha, beta and gamma (realuid.check_coefficients): one loss, in range."""
    if sum((cfg.gamma is not None, cfg.alpha_sid is not None, cfg.normalized, cfg.dmd)) > 1:
        raise UsageError("--gamma (General RealUID), --alpha-sid (RealSiD), --normalized and --dmd are different "
                         "losses; give one")
    if cfg.dmd and (cfg.alpha != cfg.beta or not 0 < cfg.dmd_t_max < 1):
        raise UsageError(f"--dmd needs alpha = beta (A.5: with alpha != beta the fake model is no mixture score and "
                         f"the generator collapses) and 0 < --dmd-t-max < 1 (got alpha={cfg.alpha}, beta={cfg.beta})")
    lo, hi = (tuple(cfg.gan_t_range) + (None, None))[:2]
    if len(cfg.gan_t_range) != 2 or not 0 <= lo < hi <= 1 or cfg.lambda_gen < 0 or cfg.lambda_disc < 0:
        raise UsageError("--gan-t-range takes two times 0 <= lo < hi <= 1, and the GAN weights must be >= 0")
    if cfg.alpha_sid is not None and not 0 < cfg.alpha_sid <= 2:
        raise UsageError(f"--alpha-sid must lie in (0, 2]; the paper uses 0.5 to 1.2 (got {cfg.alpha_sid})")


def check_dependent(user, dependent):
    """Refuse a flag given without the flag it belongs to ({flag: parent})."""
    for flag, parent in dependent.items():
        if flag in user and not user.get(parent):
            raise UsageError(f"--{flag.replace('_', '-')} applies only with --{parent.replace('_', '-')}")


# realuid.py's recipes, per kind of data. The CIFAR recipe would take days to move a 2D point cloud; these finish in
# minutes on a laptop CPU. A user's flag wins over any recipe. Digits ramp their EMAs up: after 200 generator updates
# a fixed 0.995 keeps 37 % of the teacher's one step; paired digits keep it, near the data there. Digits regress G
# onto 6400 teacher samples, then distil at the fine-tuning lr: at 3e-4 distillation undid a start that good
# (matching-models.md).
DISTILL_RECIPES = dict(
    lowdim=dict(lr=1e-3, batch_size=512, steps=12000, warmup=100, lr_decay="cosine", ema=(0.95, 0.99, 0.995),
                log_every=50, save_every=2000, fid_every=2000, regress=1 / 3),
    lowdim_pairs=dict(regress=0),  # on top of lowdim, for si and bridge: their noise is the source's
    digits=dict(lr=1e-5, batch_size=64, steps=1200, warmup=0, ema=(0.95, 0.99, 0.995), ema_rampup=0.05,
                log_every=50, save_every=600, sample_every=300, fid_samples=2000, regress=8 / 3, regress_pairs=6400),
    digits_pairs=dict(ema_rampup=0.0, lr=3e-4, warmup=100, regress=0),  # the paired digits (DEGRADATIONS)
    image={})

FINETUNE_RECIPE = dict(lr=1e-5, warmup=0, regress=0)  # App. D.2


def distill_config(cls, user, check_coefficients):
    """realuid.py's flags resolved and checked: a resumed run's saved ones (with the flags that may change), the
    data's recipe (fine-tuning's on top), every number in range, the method's own checks (check_coefficients:
    realuid's), one loss; the regression start only from noise. Returns (resume's checkpoint or None, cfg, data)."""
    check_dependent(user, DISTILL_DEPENDENT)
    resume = None
    if user.get("resume"):
        resume, user = resumed_run(user, DISTILL_RESUMABLE, "generator", "realuid.py", init_generator="")
    cfg, data = resolve_config(cls, user, DISTILL_RECIPES, FINETUNE_RECIPE if user.get("init_generator") else {})
    check_finite(cfg)
    with refusing():
        check_coefficients(cfg.alpha, cfg.beta, cfg.gamma)
    check_loss_flags(cfg)
    if cfg.regress and data.coupled:
        raise UsageError("--regress needs noise-to-data (fm, vp, ve); paired data start from their sources")
    if cfg.regress_weight and not cfg.regress:
        raise UsageError("--regress-weight keeps the regression start's pairs: it needs --regress")
    if cfg.t_init is not None and not (data.coupled and 0 <= cfg.t_init < 1):
        raise UsageError(f"--t-init must lie in [0, 1) (got {cfg.t_init})" if data.coupled else
                         "--t-init is the time of si's and bridge's generator, on paired data; use --sigma-init")
    return resume, cfg, data


def count_parameters(net):
    return sum(p.numel() for p in net.parameters())


def resumed_flags(user, saved, path, resumable, **fixed):
    """The saved configuration, with the `resumable` flags the user gave (others are refused), `fixed` values,
    and the output folder of the file at path."""
    other = sorted(k for k in user if k not in resumable)
    if other:
        raise UsageError(f"--resume continues the saved configuration; only "
                         f"{', '.join('--' + k.replace('_', '-') for k in resumable[:-1])} may change "
                         f"(got --{other[0].replace('_', '-')})")
    return {**{k: v for k, v in saved.items() if k != "resume"}, **fixed,
            "out": os.path.dirname(os.path.abspath(path)), **{k: v for k, v in user.items() if k in resumable}}


def resumed_run(user, resumable, kind, prog, name=None, **fixed):
    """(the checkpoint, the flags) of --resume: a file of this kind, or an output folder's file `name` (default:
    its newest checkpoint-*.pt); the saved configuration with only the resumable flags the user gave changed."""
    path = user["resume"]
    path = (os.path.join(path, name) if name else latest_checkpoint(path)) if os.path.isdir(path) else path
    ckpt = load_checkpoint(path, "checkpoint to resume")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        raise UsageError(f"{path} is not a {prog} training checkpoint and cannot be resumed")
    return ckpt, resumed_flags(user, ckpt["config"], path, resumable, **fixed)


# =============================================================================
# Devices and precision
# =============================================================================

def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} asked for, but this PyTorch sees no CUDA device")
    return device


def place(nets, device, channels_last=False, compile=False):
    """Each net onto the device, in place: in the NHWC layout and compiled when asked (state-dict keys stay)."""
    for net in nets:
        net.to(device)
        if channels_last:
            net.to(memory_format=torch.channels_last)
        if compile:
            net.compile()


def use_bf16(precision, device, spec=None):
    """Whether the networks run in bf16 autocast. auto: UNets on hardware with fast bf16 matrix units (CUDA
    cards with bf16, CPUs with AMX); a CPU with AVX512-BF16 alone ran bf16 at half its fp32 speed (docs/speed.md)."""
    if precision != "auto":
        return precision == "bf16"
    if (spec or {}).get("type", "unet") != "unet":
        return False  # a small MLP gains nothing and loses the fine differences f* - f the generator follows
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def set_precision(precision, device, deterministic=False):
    """TF32 matrix products on CUDA unless fp32 is asked for exactly; deterministic kernels where asked."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision != "fp32"
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's own condition for it
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True)


# =============================================================================
# torchrun ranks and the non-finite guard: the two hooks of the method's update
# =============================================================================

@dataclass
class Ranks:
    """This process's place under torchrun. Every rank draws the random numbers of the whole global batch
    from the same seed and keeps its own rows, and gradients are averaged over ranks: N ranks compute what
    one process with the global batch computes, up to the order of float sums, and batch k = f(seed, k)
    holds for any number of ranks."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # where collectives run (NCCL: this rank's card)
    flat: dict = field(default_factory=dict, repr=False)  # one all-reduce buffer per gradient size, kept

    @property
    def main(self):
        return self.rank == 0

    def shard(self, x):
        n = x.shape[0] // self.world
        return x if self.world == 1 else x[self.rank * n:(self.rank + 1) * n]

    def draw(self, fn, *xs):
        """fn(*xs) for this rank's rows, where fn draws per-sample random numbers from its inputs' shapes."""
        if self.world == 1:
            return fn(*xs)
        return self.shard(fn(*(None if x is None else x.repeat(self.world, *[1] * (x.dim() - 1)) for x in xs)))

    def average(self, params):
        """Replace every gradient by its mean over ranks (one all-reduce of all of them, flattened)."""
        grads = [p.grad for p in params if p.grad is not None]
        if self.world == 1 or not grads:
            return
        import torch.distributed as dist
        n = sum(g.numel() for g in grads)
        if n not in self.flat:  # allocated once: the fake model's and the generator's sizes
            self.flat[n] = grads[0].new_empty(n)
        flat = torch.cat([g.reshape(-1) for g in grads], out=self.flat[n])
        dist.all_reduce(flat)
        torch._foreach_copy_(grads, [v.view_as(g) for v, g in zip(flat.div_(self.world).split(
            [g.numel() for g in grads]), grads)])

    def check_replicas(self, nets):
        """Raise if the ranks' copies of these networks differ at all (same draws and averaged gradients keep
        them bitwise equal; a nondeterministic kernel or a lost update would not)."""
        if self.world == 1 or not nets:
            return
        import torch.distributed as dist
        sums = torch.stack([p.detach().double().sum() for net in nets for p in net.parameters()]).to(self.device)
        low, high = sums.clone(), sums.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        if not torch.equal(low, high):
            raise UsageError(f"the {self.world} ranks' weights have drifted apart (largest difference of a "
                             f"parameter sum {float((high - low).max()):.3g}); the checkpoint is rank 0's")

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()

    def any(self, flag):
        """Whether any rank has the flag set (a stop request that must end every rank at the same update)."""
        if self.world == 1:
            return bool(flag)
        import torch.distributed as dist
        v = torch.tensor([float(bool(flag))], device=self.device)
        dist.all_reduce(v, op=dist.ReduceOp.MAX)
        return bool(v.item())


def init_ranks(device_name):
    """(Ranks, device): torchrun's environment starts a process group (NCCL on CUDA, gloo on CPUs) and gives
    each rank its own card; without it, one process."""
    device = resolve_device(device_name)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Ranks(), device
    import torch.distributed as dist
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), device), device


def check_world(batch_size, ranks):
    if batch_size % ranks.world:
        raise UsageError(f"--batch-size {batch_size} is the global batch and must split evenly over the "
                         f"{ranks.world} ranks")


def open_run(cfg, data):
    """What a training script does before its first update, past the flags: the batch size checked against the
    data and the ranks, the device and its precision, the output folder (default runs/<dataset>) made.
    Returns (ranks, device, out, created): created is the topmost folder made, which a refused run takes away."""
    check_batch_size(cfg.batch_size, data)
    ranks, device = init_ranks(cfg.device)
    check_world(cfg.batch_size, ranks)
    set_precision(cfg.precision, device, getattr(cfg, "deterministic", False))
    out = cfg.out or os.path.join("runs", os.path.splitext(os.path.basename(cfg.dataset.rstrip("/")))[0])
    return ranks, device, out, new_folder(out)


class NonFinite:
    """Updates whose loss or gradient is not finite are skipped and counted on the device, with no host sync:
    the fused Adam kernel leaves the weights, moments and step count alone where found_inf is set (as under
    GradScaler). The counts are read where the loop syncs anyway (log lines, checkpoints)."""

    def __init__(self, names, device):
        self.names = names
        self.count = torch.zeros(len(names), device=device)
        self.first = torch.full((len(names), 3), math.nan, device=device)  # update, loss, gradient norm
        self.seen = 0

    def step(self, i, optimiser, params, loss, grad_clip, update):
        """Clip and step network i's optimiser unless loss or gradient is non-finite; returns the gradient norm."""
        grad_norm = nn.utils.clip_grad_norm_(params, grad_clip)
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        if optimiser.param_groups[0].get("fused"):
            optimiser.found_inf = bad.float()
            optimiser.step()
        elif not bad:  # other devices' Adam has no found_inf: this one syncs
            optimiser.step()
        self.count[i] += bad
        new = bad & self.first[i, 0].isnan()
        found = torch.stack([loss.new_full((), update, dtype=torch.float32), loss.detach().float(), grad_norm.float()])
        self.first[i] = torch.where(new, found, self.first[i])
        return grad_norm

    def check(self, allowed, update):
        """Raise Diverged past `allowed` skipped updates; returns a warning line when the count grew, else None."""
        counts = [int(c) for c in self.count.tolist()]
        if sum(counts) <= self.seen:
            return None
        self.seen = sum(counts)
        first, name = min((row, name) for row, name, c in zip(self.first.tolist(), self.names, counts) if c)
        what = f"update {int(first[0])}: the {name}'s loss is {first[1]:.4g} and its gradient norm {first[2]:.4g}"
        if self.seen > allowed:
            tally = ", ".join(f"{c} non-finite update(s) of the {n}" for n, c in zip(self.names, counts) if c)
            raise Diverged(f"{what}; stopped at update {update} ({tally}). Try a lower --lr, beta/alpha closer to "
                           f"1, a larger --K, or --skip-nonfinite N to skip up to N such updates")
        return f"skipped {self.seen} non-finite update(s) of --skip-nonfinite {allowed} (the first: {what})"


class Guard:
    """The update hook (`apply`) that realuid.py's steps call: the gradients averaged over torchrun's ranks,
    then the clipped Adam step under the non-finite guard."""

    def __init__(self, ranks, names, device):
        self.ranks, self.nonfinite = ranks, NonFinite(names, device)

    def __call__(self, i, optimiser, params, loss, grad_clip, update):
        self.ranks.average(params)
        return self.nonfinite.step(i, optimiser, params, loss, grad_clip, update)


def finish(code):
    """The exit code, after leaving torchrun's process group (if any) cleanly: ranks that all finished (or all
    stopped at a signal) first wait for each other, so that none tears its connections down while rank 0 still
    writes the closing table (a rank once aborted in its exit, in the test of SIGTERM under torchrun)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if code == 0 or code > 128:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        # A rank's C++ teardown at interpreter exit sometimes aborts (SIGABRT, "terminate called without an active
        # exception") on a loaded machine, after all its work is saved: run Python's exit handlers, then leave.
        import atexit
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


# =============================================================================
# Checkpoints: atomic saves, weights-only reads, safetensors
# =============================================================================

def save_checkpoint(obj, path, write=None):
    """Atomic and durable: written beside, flushed to the disk, then renamed over the target, so a crash, a kill
    or a full disk at any moment leaves the previous file whole (and no partial file behind, except after a
    SIGKILL: stale_temporaries clears those)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            (write or torch.save)(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # the rename itself reaches the disk too (POSIX)
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def stale_temporaries(folder):
    """Remove the partial files of saves that a SIGKILL or a power cut interrupted."""
    for name in os.listdir(folder):
        if ".pt.tmp-" in name:
            os.remove(os.path.join(folder, name))


def checkpoints_in(folder):
    names = [f for f in os.listdir(folder) if f.startswith("checkpoint-") and f.endswith(".pt")]
    return [os.path.join(folder, f) for f in sorted(names)]


def save_rotating(obj, out, step, keep):
    """checkpoint-<step>.pt, keeping the newest `keep`."""
    save_checkpoint(obj, os.path.join(out, f"checkpoint-{step:08d}.pt"))
    for old in checkpoints_in(out)[:-keep]:
        os.remove(old)


def latest_checkpoint(path):
    """A checkpoint file as given, or the newest checkpoint-*.pt of an output folder."""
    if os.path.isdir(path):
        found = checkpoints_in(path)
        if not found:
            raise UsageError(f"the folder {path} holds no checkpoint-*.pt to resume from")
        return found[-1]
    return path


def load_checkpoint(path, what="checkpoint"):
    """Checkpoints are plain containers of tensors: loaded with weights_only=True, never unpickled."""
    if not os.path.isfile(path):
        raise UsageError(f"{what} {path} does not exist")
    if is_safetensors(path):
        raise UsageError(f"{what} {path} is a safetensors file of one network's weights, not a training checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"[Uu]nsupported (?:GLOBAL|global):? *(?:GLOBAL )?([\w.]+)", str(e))
        if found:  # a class or function to call: what a malicious file needs
            raise UsageError(f"{what} {path} holds pickled Python objects that could run code ({found.group(1)}); "
                             f"refused: checkpoints are read as tensors, numbers and strings only "
                             f"(weights_only=True)") from None
        raise UsageError(f"{what} {path} could not be read as a weights-only PyTorch file (not a checkpoint, or "
                         f"cut short)") from None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{what} {path} could not be read as a weights-only PyTorch file ({first})") from None


def is_safetensors(path):
    """A safetensors file opens with its header's length (8 bytes, little-endian), then the header's '{'."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        head = f.read(9)
    return head[8:] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path)


SAFETENSORS_METADATA = ("version", "kind", "weights", "field", "data", "matching", "config")  # JSON strings


def read_safetensors(path, what="teacher", ema=None):
    """The checkpoint dict of an `eval.py export` file: its one network's weights under "net" (a teacher) or
    "generator", the rest from its metadata. No pickle. `ema` must name the exported EMA: there is no other."""
    from safetensors import safe_open
    try:
        with safe_open(path, "pt") as f:
            meta, sd = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        ckpt = {k: json.loads(meta[k]) for k in SAFETENSORS_METADATA if k in meta}
    except Exception as e:
        raise UsageError(f"{what} {path} could not be read as a safetensors file of realuid's ({e})") from None
    missing = [k for k in SAFETENSORS_METADATA if k not in ckpt]
    if missing:
        raise UsageError(f"{what} {path} is a safetensors file without realuid's metadata (no "
                         f"{', '.join(missing)}): write it with eval.py export")
    name = ckpt["weights"]  # "generator", "net" or "ema <decay>"
    if ema is not None and not (name.startswith("ema ") and float(name[4:]) == float(ema)):
        raise UsageError(f"{what} {path} holds only the {name} weights, not EMA {ema}")
    return {**ckpt, ("generator" if ckpt["kind"] == "generator" else "net"): sd}


def strip_prefixes(sd):
    """DataParallel's "module." and torch.compile's "_orig_mod." wrappers, if every key has one."""
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_state(net, state_dict, what):
    """Strict load with a one-line account of missing / unexpected / mis-shaped keys."""
    state_dict, own = strip_prefixes(state_dict), net.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        def few(keys):
            return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
        parts = [f"missing {few(missing)}" if missing else "",
                 f"unexpected {few(unexpected)}" if unexpected else "",
                 f"shape mismatch {few(shapes)}" if shapes else ""]
        raise UsageError(f"{what} does not match the network: " + "; ".join(p for p in parts if p))
    net.load_state_dict(state_dict, strict=True)
    return net


def pick_ema(emas, ema, what):
    """The weights of EMA decay `ema` (keys are decays as strings); None picks the smallest decay."""
    if ema is None:
        return emas[min(emas, key=float)]
    key = next((k for k in emas if float(k) == float(ema)), None)
    if key is None:
        raise UsageError(f"{what} holds no EMA {ema}; it has {', '.join(sorted(emas, key=float)) or 'none'}")
    return emas[key]


def rng_state(device):
    """The random state a resume needs, as tensors: the CPU's and this rank's card's (the others belong to
    other ranks under torchrun)."""
    rng = dict(cpu=torch.get_rng_state())
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def set_rng_state(rng, device):
    torch.set_rng_state(rng["cpu"])
    cuda = rng.get("cuda")
    if cuda is not None and device.type == "cuda":
        if isinstance(cuda, (list, tuple)):  # files before torchrun held every card's state
            cuda = cuda[device.index or 0]
        torch.cuda.set_rng_state(cuda, device)


def default_channel_mult(resolution):
    return {8: (1, 2), 16: (1, 2, 2)}.get(resolution, (1, 2, 2, 2))


def default_field_spec(data, cfg):
    """The network a teacher of this data gets: the MLP for low-dim data, the UNet for images."""
    if data.kind == "lowdim":
        return dict(type="mlp", dim=data.shape()[0], hidden=cfg.hidden, num_classes=data.num_classes,
                    cond_dim=data.shape()[0] if data.coupled else None) | (
            dict(fourier=cfg.fourier) if cfg.fourier else {})
    c, res = data.shape()[0], data.shape()[1]
    return dict(type="unet", in_channels=c, image_size=res, channels=cfg.channels,
                channel_mult=list(cfg.channel_mult or default_channel_mult(res)),
                num_res_blocks=cfg.num_res_blocks, attention_resolutions=list(cfg.attention_resolutions),
                num_heads=cfg.num_heads, num_head_channels=cfg.num_head_channels, dropout=cfg.dropout,
                num_classes=data.num_classes) | (dict(cond_channels=c) if data.coupled else {})


def infer_unet_spec(sd, image_size, num_heads=4, num_head_channels=64):
    """The UNet configuration of a torchcfm-style state dict (heads cannot be read off the weights)."""
    channels = sd["time_embed.0.weight"].shape[1]
    mult, blocks_per_level, attention_ds, ds, i = [], [0], set(), 1, 1
    while f"input_blocks.{i}.0.op.weight" in sd or f"input_blocks.{i}.0.in_layers.2.weight" in sd:
        if f"input_blocks.{i}.0.op.weight" in sd:
            ds, blocks_per_level = ds * 2, blocks_per_level + [0]
        else:
            out = sd[f"input_blocks.{i}.0.in_layers.2.weight"].shape[0]
            if blocks_per_level[-1] == 0:
                mult.append(out // channels)
            blocks_per_level[-1] += 1
            if f"input_blocks.{i}.1.qkv.weight" in sd:
                attention_ds.add(ds)
        i += 1
    return dict(type="unet", in_channels=sd["input_blocks.0.0.weight"].shape[1], image_size=image_size,
                channels=channels, channel_mult=mult, num_res_blocks=blocks_per_level[0],
                attention_resolutions=sorted(image_size // d for d in attention_ds), num_heads=num_heads,
                num_head_channels=num_head_channels, dropout=0.0,
                num_classes=sd["label_emb.weight"].shape[0] if "label_emb.weight" in sd else None)


def read_field_checkpoint(path, what="teacher", ema=None, image_size=None, num_heads=4, num_head_channels=64):
    """(network spec, weights, checkpoint) from this project's files, torchcfm's or the official RealUID's.

    Ours: 'field' (spec) with 'net' / 'generator' and 'ema'. torchcfm: 'net_model' and 'ema_model'.
    Official RealUID: 'net_model' and 'ema_models' keyed by the decay as a string. eval.py export's
    .safetensors: one network, read as ours.
    """
    ckpt = read_safetensors(path, what, ema) if is_safetensors(path) else load_checkpoint(path, what)
    if not isinstance(ckpt, dict):
        raise UsageError(f"{what} {path} is not a checkpoint dictionary")
    if "field" in ckpt:
        if ckpt.get("ema") and (ema is not None or "net" in ckpt):
            return ckpt["field"], pick_ema(ckpt["ema"], ema, f"{what} {path}"), ckpt
        return ckpt["field"], ckpt["net"] if "net" in ckpt else ckpt["generator"], ckpt
    if "net_model" in ckpt:
        if "ema_models" in ckpt:
            sd = pick_ema(ckpt["ema_models"], ema, f"{what} {path}")
        elif ema is not None:
            raise UsageError(f"{what} {path} is a torchcfm checkpoint with one EMA; drop --teacher-ema")
        else:
            sd = ckpt.get("ema_model", ckpt["net_model"])
        sd = strip_prefixes(sd)
        if image_size is None:
            raise UsageError(f"{what} {path} does not record its image size (eval.py: pass --resolution)")
        spec = infer_unet_spec(sd, image_size, num_heads, num_head_channels)
        return spec, sd, dict(field=spec, data=dict(kind="image", num_classes=spec["num_classes"],
                                                     shape=[spec["in_channels"], image_size, image_size]))
    raise UsageError(f"{what} {path} is neither a realuid, a torchcfm nor an official RealUID checkpoint")


def check_teacher_data(path, ckpt, data):
    """A teacher file's data against this run's: the same shape, and conditional exactly when the data are."""
    have = ckpt.get("data") or {}
    if have.get("shape") != data.shape():
        raise UsageError(f"teacher {path} was trained on data of shape {have.get('shape')}, "
                         f"but this data has shape {data.shape()}")
    if (have.get("num_classes") is None) != (data.num_classes is None):
        raise UsageError(f"teacher {path} is {'un' if have.get('num_classes') is None else ''}conditional; "
                         f"{'drop' if data.num_classes is None else 'add'} --cond or use another teacher")


def stored_matching(ckpt):
    """A checkpoint's matching-model spec (none, as in torchcfm's and the official files: flow matching); a diffusion
    on images saved before its sampler clamped x1_hat (matching_spec) gets the images' range."""
    spec = dict(ckpt.get("matching") or dict(type="fm"))
    if spec["type"] in ("vp", "ve") and (ckpt.get("data") or {}).get("kind") == "image":
        spec.setdefault("clip", 1.0)
    return spec


def distill_matching_spec(cfg, ckpt, data, path, sigma_init, high_noise, t_init):
    """realuid.py's matching-model spec: the teacher file's (none, as in torchcfm's and the official files: flow
    matching), with the generator's noise level (--sigma-init, default sigma_init) and the share of the top band
    (--high-noise, default high_noise on low-dim data, 0 on images) for diffusion, and for flow matching on low-dim
    data or given --sigma-init; for si and bridge the generator's time (--t-init, default t_init on low-dim data,
    0 on images)."""
    spec = stored_matching(ckpt)
    kind, coupled = spec["type"], spec["type"] in ("si", "bridge")
    if cfg.model and cfg.model != kind:
        raise UsageError(f"teacher {path} is a {kind} model, not --model {cfg.model}")
    if coupled != data.coupled:
        raise UsageError(f"{kind} {'needs' if coupled else 'cannot use'} data-to-data pairs (--dataset pairs), and "
                         f"{cfg.dataset} {'is' if data.coupled else 'is not'} paired")
    if cfg.dmd and coupled:
        raise UsageError(f"--dmd needs a score, which {kind} does not define; use fm, vp or ve")
    if coupled:
        spec["t_g"] = cfg.t_init if cfg.t_init is not None else t_init if data.kind == "lowdim" else 0.0
    given = cfg.sigma_init is not None
    if spec["type"] in ("vp", "ve") or (spec["type"] == "fm" and (given or data.kind == "lowdim")):
        spec["sigma_init"] = cfg.sigma_init if given else sigma_init
        spec["high"] = cfg.high_noise if cfg.high_noise is not None else high_noise if data.kind == "lowdim" else 0.0
    elif cfg.high_noise:  # no noise level to draw below: si, bridge, and the paper's z + g(0, z) of fm on images
        raise UsageError("--high-noise needs --sigma-init on images" if spec["type"] == "fm" else
                         f"--high-noise applies to fm, vp and ve (a generator at a noise level), not {spec['type']}")
    return spec


# Where a CIFAR-10 teacher comes from: torchcfm publishes its unconditional ones (release 1.0.4 of
# atong01/conditional-flow-matching, 400k updates; the paper distils the otcfm one), read as they are
TEACHER_NEEDED = {
    ("cifar10", False): "cifar10 needs --teacher PATH: torchcfm's published CIFAR-10 teacher "
                        "otcfm_cifar10_weights_step_400000.pt (release 1.0.4 of atong01/conditional-flow-matching) "
                        "loads as it is: --teacher otcfm_cifar10_weights_step_400000.pt; or train one with: "
                        "python teacher.py --dataset cifar10",
    ("cifar10", True): "cifar10 --cond needs --teacher PATH: torchcfm publishes no class-conditional CIFAR-10 "
                       "teacher (the paper's was trained by its authors); train one with: python teacher.py "
                       "--dataset cifar10 --cond, or pass a torchcfm UNet file with a label embedding "
                       "(num_classes=10)"}


def spot_teacher(cfg, data, out, device, ranks, train):
    """realuid.py without --teacher (low-dim data): the output folder's teacher.pt, trained there on the spot with
    the family's recipe by train (realuid.train_teacher) unless it holds one of this data and family; its path."""
    if data.kind != "lowdim":
        raise UsageError(TEACHER_NEEDED.get((cfg.dataset, cfg.cond), f"{cfg.dataset} needs --teacher PATH (train one "
                                            f"with: python teacher.py --dataset {cfg.dataset}{' --cond' * cfg.cond})"))
    path, model = os.path.join(out, "teacher.pt"), cfg.model or "fm"
    have = load_checkpoint(path) if os.path.isfile(path) else {}
    cached = have.get("data") == data.info(cfg.dataset) and (have.get("matching") or {}).get("type", "fm") == model
    if not cached and ranks.main:  # the other ranks wait for rank 0's file
        recipe = teacher_recipes(model)[data.recipe]  # batch capped at the data's size: small .npy files train
        tcfg = make_config(TeacherConfig, dict(recipe, dataset=cfg.dataset, cond=cfg.cond,
                                               steps=cfg.teacher_steps or recipe["steps"], hidden=cfg.hidden,
                                               seed=cfg.seed, eval_samples=cfg.eval_samples, model=model,
                                               batch_size=min(recipe["batch_size"], len(data))))
        print(f"no --teacher: training one on the spot ({tcfg.steps} updates), cached as {path}")
        t0 = time.time()
        train(tcfg, data, device, path, prog="realuid.py")
        print(f"teacher training took {time.time() - t0:.0f} s")
    ranks.barrier()
    return path


def prepare_teacher(cfg, data, out, device, ranks, train, load_field):
    """realuid.py's teacher field and its file: from --teacher, or the output folder's, trained on the spot."""
    path = cfg.teacher or spot_teacher(cfg, data, out, device, ranks, train)
    res = data.shape()[-1] if data.kind == "image" else None
    net, ckpt = load_field(path, "teacher", cfg.teacher_ema, image_size=res, num_heads=cfg.num_heads,
                           num_head_channels=cfg.num_head_channels)
    check_teacher_data(path, ckpt, data)
    return net.to(device), ckpt


def state_of(device, step, **parts):
    """A training state as plain tensors and numbers (loads with weights_only=True): every part's state_dict (a
    dict of networks keyed by EMA decay: each one's), the update count and the random state."""
    def sd(part):
        return {str(k): v.state_dict() for k, v in part.items()} if isinstance(part, dict) else part.state_dict()
    return dict({k: sd(part) for k, part in parts.items() if part is not None}, step=step, rng=rng_state(device))


def restore(ckpt, device, **parts):
    """state_of's parts loaded back, optimisers keeping this machine's fused-kernel choice; returns the step."""
    for k, part in parts.items():
        for p, saved in ((part[d], ckpt[k][str(d)]) for d in part) if isinstance(part, dict) else \
                ((part, ckpt[k]),) if part is not None else ():
            load_keeping_fused(p, saved)
    set_rng_state(ckpt["rng"], device)
    return ckpt["step"]


def distill_parts(state):
    """What realuid.py's RealUID state saves and restores, by checkpoint key."""
    return dict(generator=state.generator.g, fake=state.fake, ema=state.ema, opt_gen=state.opt_gen,
                opt_fake=state.opt_fake, sched_gen=state.sched_gen, sched_fake=state.sched_fake, disc=state.disc)


def load_keeping_fused(optimiser, saved):
    """An optimiser's (or scheduler's) saved state, keeping this machine's choice of the fused Adam kernel."""
    fused = [g.get("fused") for g in getattr(optimiser, "param_groups", [])]
    optimiser.load_state_dict(saved)
    for group, f in zip(getattr(optimiser, "param_groups", []), fused):
        group["fused"] = f


def save_json(obj, path):
    save_checkpoint(obj, path, write=lambda o, f: f.write(json.dumps(o, indent=2).encode()))


def rewind_metrics(out, step):
    """A resumed run's log goes on from its checkpoint: drop the lines a killed run wrote after it."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    keep = []
    for line in open(path):
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # the half line of a write cut short
    save_checkpoint(keep, path, write=lambda lines, f: f.write("".join(lines).encode()))


# =============================================================================
# The supervisor of a training loop: progress, metrics log, saves, signals
# =============================================================================

SAVE_RETRIES, SAVE_WAIT = 10, 30  # the closing checkpoint waits this long for disk space before giving up


class Supervisor:
    """Everything around a training loop that is not the method. The loop reads its batches through
    `watch(batches)` and calls `after(step, losses)` after every update; `after` returns True to stop.

    Every `log_every` updates: one host sync, a progress-bar line and a metrics.jsonl row (with `log`), and the
    non-finite count (raises Diverged past `allowed` skipped updates, before anything is saved). Every
    `save_every` updates and at the end: `write()` saves the checkpoint; a failure (a full disk) warns and
    training goes on, and the closing save retries for SAVE_RETRIES x SAVE_WAIT seconds. `sample(step)` and
    `score(step) -> {name: value}` run every `sample_every` and `score_every` updates. SIGINT or SIGTERM stops
    at the next update boundary (under torchrun: the next log line, where the ranks agree) with a checkpoint;
    `stopped` holds the signal then. An unreadable batch keeps the updates made so far. Rank 0 alone logs,
    samples and saves; after each save the ranks compare the weights of `replicas()`.
    """

    def __init__(self, prog, total, start=0, out=None, write=None, ranks=None, nonfinite=None, allowed=0,
                 log_every=100, save_every=5000, log=True, tensorboard=False, sample=None, sample_every=0,
                 score=None, score_every=0, replicas=lambda: [], lr=None, saved=lambda: None, desc=None):
        from tqdm import tqdm
        self.prog, self.total, self.step, self.out, self.write = prog, total, start, out, write
        self.ranks, self.nonfinite, self.allowed = ranks or Ranks(), nonfinite, allowed
        self.log_every, self.save_every = log_every, save_every
        self.sample, self.sample_every, self.score, self.score_every = sample, sample_every, score, score_every
        self.replicas, self.lr, self.saved, self.stop, self.stopped, self.last = replicas, lr, saved, [], None, {}
        self.begin = time.time()
        main = self.ranks.main
        self.log = open(os.path.join(out, "metrics.jsonl"), "a") if out and log and main else None
        self.writer = tensorboard_writer(out) if out and main and tensorboard else None
        self.bar = tqdm(total=total, initial=start, desc=desc or prog.split(".")[0], dynamic_ncols=True,
                        disable=None if main else True, mininterval=1.0)
        self.handlers = catch_signals(lambda signum, _: self.stop.append(signum)) if write else {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()
        for sig, handler in self.handlers.items():
            signal.signal(sig, handler)
        for f in (self.log, self.writer):
            if f:
                f.close()

    def warn(self, message):
        self.bar.write(f"{self.prog}: warning: {message}", file=sys.stderr)

    def watch(self, batches):
        """The batches; an unreadable file, hours in, first saves the updates made so far."""
        while True:
            try:
                batch = next(batches)
            except UsageError:
                if self.write and self.step:
                    self.save(final=True)
                raise
            yield batch

    def save(self, final):
        """Rank 0 writes the checkpoint; the ranks then compare weights. A full disk never costs the run."""
        if self.ranks.main:
            for attempt in range(SAVE_RETRIES + 1 if final else 1):
                try:
                    self.write()
                    break
                except OSError as e:
                    why = (f"could not write the checkpoint of update {self.step} to {self.out} "
                           f"({e.strerror or e}); the last complete one is {self.saved() or 'none'}")
                    if not final:
                        self.warn(f"{why}; training goes on and the next save tries again")
                    elif attempt < SAVE_RETRIES:
                        self.warn(f"{why}; free some space: retrying in {SAVE_WAIT} s ({attempt + 1}/{SAVE_RETRIES})")
                        time.sleep(SAVE_WAIT)
                    else:
                        raise OSError(f"{why}; the updates after it are lost") from None
        self.ranks.check_replicas(self.replicas())

    def record(self, row):
        try:
            if self.log:
                self.log.write(json.dumps(row) + "\n")
                self.log.flush()
            if self.writer:
                for k, v in row.items():
                    self.writer.add_scalar(k, v, row["step"])
        except OSError as e:
            self.warn(f"could not write the metrics log ({e.strerror or e}); training goes on")

    def scored(self, step):
        """score(step), logged; a fresh run's supervise scores its start, update 0, this way too."""
        if self.score:
            scores = self.score(step)  # every rank: FID generation is split across them
            if self.ranks.main:
                self.bar.write(f"update {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
                self.record(dict(step=step, **scores))

    def after(self, step, losses):
        """After update `step` (losses: tensors, read only at log lines); True: stop now."""
        self.step = step
        self.last.update(losses)
        self.bar.update(1)
        ranks = self.ranks
        boundary = step % self.log_every == 0 or step == self.total
        halt = ranks.any(self.stop) if boundary or ranks.world == 1 else False
        saving = self.write and (step % self.save_every == 0 or step == self.total or halt)
        if (boundary or saving) and self.nonfinite is not None:
            skipped = self.nonfinite.check(self.allowed, step)  # raises past the allowance
            if skipped and ranks.main:
                self.warn(skipped)
        if boundary:
            row = {k: round(float(v), 6) for k, v in self.last.items()}  # the only host sync
            self.bar.set_postfix({k.replace("_loss", ""): v for k, v in row.items() if k.endswith("loss")},
                                 refresh=False)
            seen = self.nonfinite.seen if self.nonfinite is not None else 0
            self.record(dict(row, step=step, **({} if self.lr is None else dict(lr=self.lr())),
                             time=round(time.time() - self.begin, 2), **({"skipped_nonfinite": seen} if seen else {})))
        if self.sample and ranks.main and (step % self.sample_every == 0 or step == self.total):
            try:
                self.sample(step)
            except OSError as e:
                self.warn(f"could not write the sample grids ({e.strerror or e}); training goes on")
        if self.score_every and (step % self.score_every == 0 or step == self.total):
            self.scored(step)
        if saving:
            self.save(final=halt or step == self.total)
        if halt:
            self.stopped = self.stop[0] if self.stop else signal.SIGTERM  # a rank told by another
        return halt


def supervise(loop, state, batches, out=None, meta=None, sample_fn=None, score_fn=None):
    """realuid.py's distill(state, batches, after) under a Supervisor: progress, metrics.jsonl, checkpoints
    (rank 0), sample grids, scores at update 0 and every cfg.fid_every updates, the non-finite guard's checks
    (state.apply, a Guard), SIGINT and SIGTERM. Returns None when done, or the signal that stopped it (after a
    checkpoint)."""
    cfg, ranks = state.cfg, getattr(state.apply, "ranks", Ranks())

    def write():
        save_rotating(dict(version=VERSION, kind="generator", config=config_dict(cfg), **(meta or {}),
                           **state_of(state.device, state.step, **distill_parts(state))), out, state.step, cfg.keep)
    with Supervisor("realuid.py", cfg.steps, state.step, out, write=write if out else None, ranks=ranks,
                    saved=lambda: (checkpoints_in(out) or [None])[-1],
                    nonfinite=getattr(state.apply, "nonfinite", None), allowed=cfg.skip_nonfinite,
                    log_every=cfg.log_every, save_every=cfg.save_every, tensorboard=cfg.tensorboard,
                    sample=sample_fn and (lambda step: sample_fn(state, step)), sample_every=cfg.sample_every,
                    score=score_fn and (lambda step: score_fn(state, step)), score_every=cfg.fid_every,
                    replicas=lambda: [state.generator, state.fake, *state.ema.values()],
                    lr=lambda: state.sched_gen.get_last_lr()[0], desc=state.name) as sup:
        if cfg.fid_every and state.step == 0:  # the start competes too: selection keeps it where distillation is worse
            sup.scored(0)
        loop(state, sup.watch(batches), sup.after)
    return sup.stopped


def supervise_teacher(step, cfg, data, device, path, ranks, guard, parts, start, meta, state_path=None, grid=None,
                      prog="teacher.py"):
    """realuid.train_teacher's loop under a Supervisor: step(x1, y, update) -> loss, for the updates after start up to
    cfg.steps. With state_path the whole training state (parts) is saved there every cfg.save_every updates and when
    SIGINT or SIGTERM arrives, which then raises Stopped. At the end rank 0 writes the teacher file at path (meta:
    its matching model's and network's specs) and, for images, grid() its sample grid."""
    def write():
        save_checkpoint(dict(version=VERSION, kind="teacher-state", config=config_dict(cfg),
                             **state_of(device, sup.step, **parts)), state_path)
    with Supervisor(prog, cfg.steps, start, os.path.dirname(os.path.abspath(path)), write if state_path else None,
                    ranks, guard.nonfinite, cfg.skip_nonfinite, cfg.log_every, cfg.save_every, log=False, desc="teacher",
                    saved=lambda: state_path if os.path.isfile(state_path) else None,
                    replicas=lambda: [parts["net"], *parts["ema"].values()]) as sup:
        source = sup.watch(batches(data, cfg.batch_size, device, cfg.seed, start, workers=cfg.workers, ranks=ranks))
        for update in range(start + 1, cfg.steps + 1):
            loss = step(*next(source), update)
            if sup.after(update, dict(loss=loss)):
                raise Stopped(sup.stopped, update)
    if ranks.main:
        save_checkpoint(dict(version=VERSION, kind="teacher", config=config_dict(cfg), matching=meta["matching"],
                             data=data.info(cfg.dataset), field=meta["field"], net=parts["net"].state_dict(),
                             ema={str(d): e.state_dict() for d, e in parts["ema"].items()}), path)
        if data.kind == "image" and cfg.sample_steps > 0 and grid:  # what the teacher has learnt
            grid()


def stopped_by(signum, step, saved, out, say=print):
    """The closing line of a run a signal stopped (after its save), and its exit code: 128 + the signal, the
    shell's convention."""
    say(f"stopped by signal {signal.Signals(signum).name} at update {step}: {saved}; continue with --resume {out}")
    return 128 + signum


def catch_signals(handler):
    """Route SIGINT and SIGTERM to handler; returns the previous handlers (main thread only)."""
    import threading
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def tensorboard_writer(out):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(os.path.join(out, "tensorboard"))


# =============================================================================
# Data
# =============================================================================

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class Data:
    """Training data. Low-dim: float tensors, standardised. Images: uint8 NCHW in memory, or files."""
    x: torch.Tensor = None
    y: torch.Tensor = None
    num_classes: int = None
    kind: str = "lowdim"  # lowdim | image
    recipe: str = "lowdim"  # which defaults apply: lowdim | digits | image
    mean: torch.Tensor = None  # low-dim data: x_net = (x - mean) / std
    std: torch.Tensor = None
    x_test: torch.Tensor = None  # held-out real points, in the original coordinates
    flip: bool = False  # random horizontal flips (images)
    files: list = None  # an image folder, read by a DataLoader
    resolution: int = None
    modes: "Mixture" = None  # the built-in sets' known law, in data units (mode coverage)
    coupled: bool = False  # data-to-data: y holds each point's source x_T, in network coordinates
    src_test: torch.Tensor = None  # the held-out points' sources (coupled data), in network coordinates

    def __len__(self):
        return len(self.files) if self.files is not None else len(self.x)

    def shape(self):
        if self.files is not None:
            return [3, self.resolution, self.resolution]
        return list(self.x.shape[1:])

    def info(self, name):
        return dict(name=name, kind=self.kind, shape=self.shape(), num_classes=self.num_classes, coupled=self.coupled,
                    mean=None if self.mean is None else self.mean.tolist(),
                    std=None if self.std is None else self.std.tolist())


class Mixture:
    """A built-in 2D law whose parts are known: Gaussian modes (centres, one std, weights) and optionally a thin
    arc (radius, angles from-to in radians, width, weight). Mode coverage is scored against the parts."""

    def __init__(self, centres, std, weights, arc=None):
        self.centres, self.std, self.arc = np.asarray(centres, dtype=np.float64), float(std), arc
        self.weights = np.asarray(list(weights) + ([arc[-1]] if arc else []), dtype=np.float64)
        if abs(self.weights.sum() - 1) > 1e-9:
            raise ValueError(f"the parts' weights sum to {self.weights.sum()}, not 1")

    def __len__(self):
        return len(self.weights)

    def sample(self, n, seed):
        """n points and the index of the part each came from."""
        g = torch.Generator().manual_seed(seed)
        y = torch.multinomial(torch.tensor(self.weights), n, replacement=True, generator=g)
        x = torch.tensor(self.centres[np.minimum(y.numpy(), len(self.centres) - 1)], dtype=torch.float32)
        x = x + self.std * torch.randn(n, 2, generator=g)
        if self.arc:
            radius, lo, hi, width, _ = self.arc
            on_arc = y == len(self.centres)
            angle = lo + (hi - lo) * torch.rand(n, generator=g)
            arc = radius * torch.stack([angle.cos(), angle.sin()], 1) + width * torch.randn(n, 2, generator=g)
            x = torch.where(on_arc[:, None], arc, x)
        return x, y

    def distances(self, x):
        """(n, parts) distances of the points x to each part, in units of that part's std (or width)."""
        from scipy.spatial.distance import cdist
        x = np.asarray(x, dtype=np.float64)
        d = cdist(x, self.centres) / self.std
        if self.arc:
            radius, lo, hi, width, _ = self.arc
            angle = np.arctan2(x[:, 1], x[:, 0])
            angle = lo + np.mod(angle - lo, 2 * np.pi)  # in [lo, lo + 2 pi)
            ends = radius * np.array([[np.cos(lo), np.sin(lo)], [np.cos(hi), np.sin(hi)]])
            to_arc = np.where(angle <= hi, np.abs(np.linalg.norm(x, axis=1) - radius), cdist(x, ends).min(1))
            d = np.concatenate([d, to_arc[:, None] / width], 1)
        return d

    def coverage(self, x, radius=3.0):
        """(modes held, in-part fraction, smallest mode share, the arc's share or None). A point is in a part
        within radius std of it (an exact sample of a 2D Gaussian is, with probability 1 - exp(-radius^2 / 2) =
        0.989 at radius 3); a part's share is its in-part points over weight * n, and a mode is held when its
        share is at least one half. The arc is a thin structure, not a mode: its share is reported apart."""
        d = self.distances(x)
        inside = d.min(1) < radius
        share = np.bincount(d.argmin(1)[inside], minlength=len(self)) / (self.weights * len(d))
        modes = share[:len(self.centres)]
        return (int((modes >= 0.5).sum()), float(inside.mean()), float(modes.min()),
                float(share[-1]) if self.arc else None)


class Checkerboard:
    """A built-in 2D law of sharp edges: uniform on the filled squares of a board (side squares of size side /
    squares, the corner square filled). Its parts are the squares; a point is in a part inside the square."""
    arc = None

    def __init__(self, squares=4, side=8.0):
        self.size = side / squares
        ij = [(i, j) for i in range(squares) for j in range(squares) if (i + j) % 2 == 0]
        self.centres = (np.array(ij, dtype=np.float64) + 0.5) * self.size - side / 2
        self.weights = np.full(len(ij), 1 / len(ij))

    def __len__(self):
        return len(self.weights)

    def sample(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(len(self), (n,), generator=g)
        u = torch.rand(n, 2, generator=g) - 0.5
        return torch.tensor(self.centres, dtype=torch.float32)[y] + self.size * u, y

    def coverage(self, x):
        """As Mixture.coverage, the parts being the squares (exact samples: every point in one)."""
        d = np.abs(np.asarray(x, dtype=np.float64)[:, None, :] - self.centres[None]).max(2)  # L-inf to each centre
        inside = d.min(1) <= self.size / 2
        share = np.bincount(d.argmin(1)[inside], minlength=len(self)) / (self.weights * len(d))
        return int((share >= 0.5).sum()), float(inside.mean()), float(share.min()), None


def ring(k, radius):
    angle = torch.arange(k) * (2 * math.pi / k)
    return radius * torch.stack([torch.cos(angle), torch.sin(angle)], 1)


# The default: 8 equal modes on a circle. modes-arc: 6 tight modes of weights 30% down to 5% and a thin arc
# (13%) inside them; checkerboard: sharp edges and a uniform density, so that nothing is tuned to one picture.
EIGHT_GAUSSIANS = Mixture(ring(8, 4.0), 0.4, [1 / 8] * 8)
MODES_ARC = Mixture(ring(6, 4.0), 0.15, [0.30, 0.20, 0.15, 0.10, 0.07, 0.05],
                    arc=(2.0, 1.1 * math.pi, 1.9 * math.pi, 0.05, 0.13))
MIXTURES = {"8gaussians": EIGHT_GAUSSIANS, "modes-arc": MODES_ARC, "checkerboard": Checkerboard()}


def gaussian_pairs(n, seed):
    """The built-in data-to-data task: (x_T, x1) with x_T from mode k of the 8 Gaussians and x1 from mode
    k - 1 or k + 1, each with probability 1/2: a coupling whose conditional law is bimodal."""
    x_src, k = EIGHT_GAUSSIANS.sample(n, seed)
    g = torch.Generator().manual_seed(seed + 1)
    k1 = (k + 2 * torch.randint(2, (n,), generator=g) - 1) % 8
    centres = torch.tensor(EIGHT_GAUSSIANS.centres, dtype=torch.float32)
    return x_src, centres[k1] + EIGHT_GAUSSIANS.std * torch.randn(n, 2, generator=g)


def load_npy(path):
    """N x D floats (low-dim data) or N x H x W x C uint8 images (C = 1 or 3)."""
    try:
        x = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UsageError(f"data file {path} does not exist") from None
    except (ValueError, OSError) as e:
        raise UsageError(f"{path} is not a readable .npy array ({e})") from None
    if x.ndim == 4 and x.dtype == np.uint8 and x.shape[3] in (1, 3) and len(x) >= 2:
        return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1 or not np.issubdtype(x.dtype, np.number):
        raise UsageError(f"{path} must hold an N x D array of numbers with N >= 2, or N x H x W x C uint8 "
                         f"images (got shape {x.shape}, dtype {x.dtype})")
    x = torch.from_numpy(x.astype(np.float32))
    if not torch.isfinite(x).all():
        raise UsageError(f"{path} contains NaN or infinite values")
    return x


def standardise(x, y, num_classes, x_test):
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    return Data(x=(x - mean) / std, y=y, num_classes=num_classes, mean=mean, std=std, x_test=x_test)


def load_cifar10(root):
    """CIFAR-10 train split through torchvision: 50000 x 3 x 32 x 32 uint8 and 10 labels."""
    from torchvision import datasets

    class CIFAR10(datasets.CIFAR10):
        # An extracted folder is taken as it is (small stand-ins too): no checksums, no class names.
        def _check_integrity(self):
            return os.path.isdir(os.path.join(self.root, self.base_folder))

        def _load_meta(self):
            self.classes = [str(i) for i in range(10)]
    folder, created = os.path.join(root, "cifar-10-batches-py"), new_folder(root)
    try:
        ds = CIFAR10(root, train=True, download=not os.path.isdir(folder))
    except Exception:
        undo_folder(created)
        raise UsageError(f"CIFAR-10 could not be downloaded: put the extracted cifar-10-batches-py "
                         f"folder into {os.path.abspath(root)} (or pass --data-root)") from None
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)


def load_digits(resolution):
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes), upsampled: no download needed."""
    from sklearn.datasets import load_digits as sk_digits
    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), torch.tensor(d.target)


class ImageFiles(torch.utils.data.Dataset):
    """A folder of images (CelebA and the like): RGB, resized and centre-cropped, uint8 CHW."""

    def __init__(self, files, resolution):
        from torchvision import transforms
        self.files = files
        self.transform = transforms.Compose([transforms.Resize(resolution), transforms.CenterCrop(resolution),
                                             transforms.PILToTensor()])

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image
        try:
            with Image.open(self.files[i]) as im:
                return self.transform(im.convert("RGB")), 0
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for truncated and foreign files
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"the image {self.files[i]} cannot be read ({why}); replace or remove it") from None


def quiet_worker(release, _):
    """Data-loader processes leave SIGINT and SIGTERM to the main process, which stops at an update boundary
    (a terminal's Ctrl-C and a scheduler's SIGTERM reach every process of the job). Once the main process
    exits (release is set), SIGTERM ends them again: that is how multiprocessing stops them then."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0) if release.is_set() else None)


def worker_release():
    """The per-process event that quiet_worker waits for: set at exit."""
    if not hasattr(worker_release, "event"):
        import atexit
        import multiprocessing
        worker_release.event = multiprocessing.Event()
        atexit.register(worker_release.event.set)  # runs before multiprocessing's own exit hook (LIFO)
    return worker_release.event


def list_images(folder):
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs
                   if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise UsageError(f"the folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def own_size(files, folder):
    """An image folder's side when its images are square and share one size (header reads, no decoding)."""
    from PIL import Image
    from tqdm import tqdm
    sizes = {}
    for f in tqdm(files, desc=f"image sizes in {folder}", disable=len(files) < 5000, leave=False):
        try:
            with Image.open(f) as im:
                sizes.setdefault(im.size, f)
        except (OSError, ValueError, SyntaxError) as e:
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"the image {f} cannot be read ({why}); replace or remove it") from None
        if len(sizes) > 1 or next(iter(sizes))[0] != next(iter(sizes))[1]:
            found = ", ".join(f"{w}x{h} ({os.path.basename(g)})" for (w, h), g in sizes.items())
            raise UsageError(f"the images in {folder} are not all one square size (found {found}); "
                             f"pass --resolution N to resize and centre-crop them to N x N")
    return next(iter(sizes))[0]


# The built-in image-to-image tasks on the digits, as (how, factor): 4x super-resolution and the upper half leave
# little unknown, 8x (2 x 2 blocks at 16 x 16) and the upper quarter leave the answer uncertain
DEGRADATIONS = {"digits-sr": ("blocks", 4), "digits-inpaint": ("rows", 2), "digits-sr8": ("blocks", 8),
                "digits-inpaint-top": ("rows", 4)}


def degrade(task, x):
    """A built-in task's source from its target, images in [-1, 1]; exactly this, so that a restoration's
    consistency with its source is checked by degrading it again."""
    how, f = DEGRADATIONS.get(task, (None, 0))
    if how == "blocks":  # the means of f x f blocks, upsampled back by nearest neighbour
        return F.interpolate(F.avg_pool2d(x, f), scale_factor=f, mode="nearest")
    if how == "rows":  # the upper 1/f of the rows kept, the rest black
        kept = x.shape[-2] // f
        return torch.cat([x[..., :kept, :], torch.full_like(x[..., kept:, :], -1.0)], -2)
    raise ValueError(f"unknown degradation {task!r}")


def load_npz_pairs(path):
    """uint8 arrays `source` and `target`, N x H x W x C of one shape, as NCHW."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if not {"source", "target"} <= set(f.files):
                raise UsageError(f"{path} must hold the arrays source and target (it holds {', '.join(f.files)})")
            src, tgt = f["source"], f["target"]
    except FileNotFoundError:
        raise UsageError(f"data file {path} does not exist") from None
    except (ValueError, OSError, EOFError) as e:
        raise UsageError(f"{path} is not a readable .npz file ({str(e).strip().splitlines()[0]})") from None
    for name, a in (("source", src), ("target", tgt)):
        if a.ndim != 4 or a.dtype != np.uint8 or a.shape[3] not in (1, 3) or len(a) < 2:
            raise UsageError(f"{path}: {name} must be N x H x W x C uint8 images with C = 1 or 3 and N >= 2 "
                             f"(got shape {a.shape}, dtype {a.dtype})")
    if src.shape != tgt.shape:
        raise UsageError(f"{path}: source and target differ in shape ({src.shape} and {tgt.shape})")
    return (torch.from_numpy(a).permute(0, 3, 1, 2).contiguous() for a in (src, tgt))


def load_folder_pairs(src_dir, tgt_dir, resolution):
    """Two image folders whose files pair by their path inside each folder, read whole into memory (uint8)."""
    sources, targets = list_images(src_dir), list_images(tgt_dir)
    names = {os.path.relpath(f, src_dir): f for f in sources}
    partners = {os.path.relpath(f, tgt_dir): f for f in targets}
    for mine, theirs, where in ((names, partners, tgt_dir), (partners, names, src_dir)):
        lone = sorted(set(mine) - set(theirs))
        if lone:
            raise UsageError(f"{mine[lone[0]]} has no partner {os.path.join(where, lone[0])}"
                             + (f" (and {len(lone) - 1} more)" if len(lone) > 1 else "") + "; pairs match by file name")
    order = sorted(names)
    res = resolution or own_size([names[k] for k in order] + [partners[k] for k in order], f"{src_dir} and {tgt_dir}")
    files = ImageFiles([names[k] for k in order], res), ImageFiles([partners[k] for k in order], res)
    return (torch.stack([f[i][0] for i in range(len(order))]) for f in files)


def paired_images(src, tgt, recipe):
    """Paired images: the targets uint8, the sources in network coordinates; a fixed held-out split (the same for
    the teacher and every distillation, whatever their flags), never trained on: a fifth, at most 2000."""
    perm = torch.randperm(len(tgt), generator=torch.Generator().manual_seed(4321))
    n_test = max(1, min(2000, len(tgt) // 5))
    test, train = perm[:n_test], perm[n_test:]
    src = src.float() / 127.5 - 1 if src.dtype == torch.uint8 else src
    return Data(x=tgt[train], y=src[train], x_test=tgt[test], src_test=src[test], kind="image", recipe=recipe,
                coupled=True)


def load_data(cfg):
    """The data set named by cfg.dataset, with cfg.cond deciding whether labels are kept."""
    name, res = cfg.dataset, cfg.resolution
    if name in MIXTURES:
        law = MIXTURES[name]
        x, y = law.sample(20_000, seed=1234)
        data = standardise(x, y, len(law), law.sample(cfg.eval_samples, seed=4321)[0])
        data.modes = law
    elif name == "pairs":
        x_src, x = gaussian_pairs(20_000, seed=1234)
        src_test, data_test = gaussian_pairs(cfg.eval_samples, seed=4321)
        data = standardise(x, None, None, data_test)  # sources and data share one coordinate system
        data.y, data.src_test, data.coupled = (x_src - data.mean) / data.std, (src_test - data.mean) / data.std, True
        data.modes = EIGHT_GAUSSIANS
    elif name in DEGRADATIONS:
        x, _ = load_digits(res or 16)
        data = paired_images(degrade(name, x.float() / 127.5 - 1), x, "digits")
    elif name.endswith(".npz"):
        data = paired_images(*load_npz_pairs(name), "image")
    elif cfg.target_dir:
        if not os.path.isdir(name) or not os.path.isdir(cfg.target_dir):
            lone = name if not os.path.isdir(name) else cfg.target_dir
            raise UsageError(f"--target-dir pairs two image folders: {lone} is not a folder")
        data = paired_images(*load_folder_pairs(name, cfg.target_dir, res), "image")
    elif name == "cifar10":
        x, y = load_cifar10(cfg.data_root)
        data = Data(x=x, y=y, num_classes=10, kind="image", recipe="image", flip=True)
    elif name == "digits":
        x, y = load_digits(res or 16)
        data = Data(x=x, y=y, num_classes=10, kind="image", recipe="digits")
    elif name.endswith(".npy"):
        x = load_npy(name)
        if x.dtype == torch.uint8:
            data = Data(x=x, kind="image", recipe="image")
        else:
            perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))
            n_test = min(cfg.eval_samples, len(x) // 5) if len(x) >= 10 else 0
            data = standardise(x[perm[n_test:]], None, None, x[perm[:n_test]] if n_test else x)
    elif os.path.isdir(name):
        files = list_images(name)
        data = Data(files=files, resolution=res or own_size(files, name), kind="image", recipe="image", flip=True)
    else:
        raise UsageError(f"unknown dataset {name!r}: use 8gaussians, modes-arc, checkerboard, pairs, digits, "
                         f"{', '.join(DEGRADATIONS)}, cifar10, a folder of images (with --target-dir: paired), a .npy "
                         f"file (N x D floats or N x H x W x C uint8) or a .npz of uint8 source and target images")
    if data.kind == "image" and min(data.shape()[1:]) % 8:
        raise UsageError(f"{name} holds images of side {data.shape()[1:]}; the UNet needs a multiple of 8"
                         + (" (--resolution sets it)" if data.files is not None or name == "digits" else ""))
    if cfg.cond and data.num_classes is None:
        raise UsageError(f"--cond needs class labels, and {name} has none")
    if cfg.target_dir and not data.coupled:
        raise UsageError(f"--target-dir pairs two image folders; {name} is not a folder of images")
    if not cfg.cond and not data.coupled:
        data.y, data.num_classes = None, None
    return data


def check_batch_size(batch_size, data):
    if batch_size > len(data):
        raise UsageError(f"--batch-size {batch_size} is larger than the data set ({len(data)} points)")


class BatchIndices(torch.utils.data.Sampler):
    """Batch k is a fixed function of (seed, k): a run resumed at update k sees the same data. Under torchrun
    (ranks) a distributed sampler: each rank gets its rows of the global batch k."""

    def __init__(self, n, batch_size, seed, start=0, ranks=None):
        self.n, self.batch_size, self.seed, self.start, self.ranks = n, batch_size, seed, start, ranks or Ranks()

    def __iter__(self):
        per_epoch, k, epoch, perm = self.n // self.batch_size, self.start, None, None
        while True:
            e, i = divmod(k, per_epoch)
            if e != epoch:
                g = torch.Generator().manual_seed(self.seed * 100_003 + e)
                epoch, perm = e, torch.randperm(self.n, generator=g)
            yield self.ranks.shard(perm[i * self.batch_size:(i + 1) * self.batch_size])
            k += 1


def worker_errors(loader):
    """A data-loader process's UsageError comes back wrapped in its traceback's text; keep its one line."""
    it = iter(loader)
    try:
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except UsageError as e:
                message = str(e).strip().splitlines()[-1].split("UsageError: ", 1)[-1]
                break
            yield batch
    finally:
        del it  # the loader processes stop now, not when a traceback that holds this frame is let go
    # raised outside the except clause: a chained exception's traceback would hold the loader's iterator, whose
    # processes would then be stopped by a garbage collection, each after a 5 s wait
    raise UsageError(message) from None


def batches(data, batch_size, device, seed=0, start=0, workers=2, ranks=None):
    """Endless batches in network coordinates (images in [-1, 1], randomly flipped where asked); under
    torchrun this rank's share of each global batch of batch_size."""
    ranks = ranks or Ranks()
    indices = BatchIndices(len(data), batch_size, seed, start, ranks)
    if data.files is not None:
        loader = torch.utils.data.DataLoader(ImageFiles(data.files, data.resolution), batch_sampler=indices,
                                             num_workers=workers, pin_memory=device.type == "cuda",
                                             persistent_workers=workers > 0,
                                             worker_init_fn=functools.partial(quiet_worker, worker_release()),
                                             generator=torch.Generator().manual_seed(seed))  # not the global RNG:
        # the loader draws its workers' seed when it starts, which a resumed run does at another update
        source = ((x.to(device, non_blocking=True), None) for x, _ in worker_errors(loader))
    else:
        x = data.x.to(device)
        y = None if data.y is None else data.y.to(device)
        source = ((x[i], None if y is None else y[i]) for i in (idx.to(device) for idx in indices))
    for xb, yb in source:
        if xb.dtype == torch.uint8:
            xb = xb.float() / 127.5 - 1
        if data.flip:
            flip = ranks.draw(lambda x: torch.rand(len(x), 1, 1, 1, device=device), xb)
            xb = torch.where(flip < 0.5, xb.flip(-1), xb)
        yield xb, yb


# =============================================================================
# Images: uint8 and grids
# =============================================================================

def to_uint8(x):
    """Images in [-1, 1] to 0..255 as torchcfm's FID script does: (x * 127.5 + 128) clipped, truncated."""
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def cycled(x, n, first=0):
    """n rows of x from row `first` on, going round: held-out sources for n samples."""
    return x[(first + torch.arange(n)) % len(x)]


def pair_grid(columns, path, blocks=2):
    """Paired images as one PNG: a row per pair, its columns side by side (source | outputs | target), the pairs
    in `blocks` blocks side by side; small images enlarged (nearest neighbour) to about 48 pixels."""
    from torchvision.utils import save_image
    x = torch.stack([c.float().cpu() for c in columns], 1)  # pairs, columns, C, H, W
    blocks = min(blocks, len(x))
    rows = math.ceil(len(x) / blocks)
    x = torch.cat([x, x.new_full((rows * blocks - len(x), *x.shape[1:]), -1.0)])  # black pairs fill the last block
    x = x.reshape(blocks, rows, *x.shape[1:]).transpose(0, 1).flatten(0, 2)  # row r: pair r, pair rows + r, ...
    scale = max(1, 48 // x.shape[-1])
    x = F.interpolate(x, scale_factor=scale, mode="nearest") if scale > 1 else x
    save_image((x.clamp(-1, 1) + 1) / 2, path, nrow=blocks * len(columns), padding=scale, pad_value=1)


def sample_grid(x, path, data, sources=None):
    """Samples as one PNG: a plain grid, or for paired data rows of held-out source | sample | target."""
    if sources is None:
        save_grid(x, path)
    else:
        pair_grid([sources, x, cycled(data.x_test, len(sources)).float() / 127.5 - 1], path)


def teacher_grid(net, name, data, matching, device, steps, path, sample_field):
    """A grid of an image teacher's samples beside its file at path (sample_field: the method's sampler,
    realuid.sample_field); paired data: rows of held-out source | sample | target."""
    grid = os.path.join(os.path.dirname(path), "teacher-samples.png")
    sources = cycled(data.src_test, 16) if data.coupled else None
    x = sample_field(net, 64 if sources is None else 16, data.shape(), device, steps, data.num_classes,
                     matching=matching, sources=sources)
    sample_grid(x, grid, data, sources)
    print(f"teacher samples ({steps} sampler steps, {name}): {grid}")


def save_grid(x, path):
    """Images in [-1, 1] as one PNG grid."""
    from torchvision.utils import save_image
    save_image((x.clamp(-1, 1) + 1) / 2, path, nrow=int(math.ceil(math.sqrt(len(x)))))


def grid_writer(out, data, device, generate, n=64):
    """Sample grids of the generator and every EMA, from the same fixed noise each time (generate: the
    method's sampler, realuid.generate). Paired data: rows of held-out source | output | target."""
    folder = os.path.join(out, "samples")
    os.makedirs(folder, exist_ok=True)
    sources = cycled(data.src_test, 16) if data.coupled else None
    n = n if sources is None else len(sources)

    def write(state, step):
        nets = {"generator": state.generator.g, **{f"ema{d}": net for d, net in state.ema.items()}}
        for name, net in nets.items():
            x = torch.cat(list(generate(net, n, data.shape(), device, None, data.num_classes, seed=0,
                                        matching=state.matching, sources=sources))).cpu()
            sample_grid(x, os.path.join(folder, f"{name}-{step:07d}.png"), data, sources)
    return write


# =============================================================================
# Scores for model selection and the closing table: W2, energy, modes; FID
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


def precision_recall(x, real, k=5):
    """Improved precision and recall (Kynkaanniemi et al., NeurIPS 2019): the share of the points x inside the
    k-nearest-neighbour ball of some real point (precision: x lies where the data do), and the share of the real
    points inside such a ball of some point of x (recall: the data are covered). A ball's radius is the distance
    to the k-th nearest other point of its own set."""
    from scipy.spatial import cKDTree

    def inside(points, ref):
        tree = cKDTree(ref)
        radius = tree.query(ref, k + 1)[0][:, -1]  # k + 1: a point is its own nearest neighbour
        found = cKDTree(points).query_ball_point(ref, radius)
        hit = np.zeros(len(points), bool)
        hit[np.concatenate([np.asarray(i, dtype=np.int64) for i in found])] = True
        return float(hit.mean())
    x, real = np.asarray(x, dtype=np.float64), np.asarray(real, dtype=np.float64)
    return inside(x, real), inside(real, x)


def to_data_units(x, data_info):
    """Undo the standardisation of low-dimensional data."""
    if data_info.get("mean") is not None:
        x = x * torch.tensor(data_info["std"]) + torch.tensor(data_info["mean"])
    return x.numpy()


class HeldOut:
    """Low-dim evaluation: samples in data units beside the held-out real points. Coupled data (pairs) are
    compared as joint points (x_T, x1), each net fed the held-out sources x_T. generate: realuid.generate.

    A score is taken over `draws` independent draws of n points (seeds seed, seed + 1, ...): W2 between two
    2000-point samples of the 8 Gaussians varies by about 0.08 from draw to draw, mostly with how many points
    each mode happens to get, which is as large as the differences that model selection has to see."""

    def __init__(self, data, generate, matching, device, seed=0, draws=4):
        self.data, self.generate, self.matching, self.device, self.seed = data, generate, matching, device, seed
        self.info, self.n, self.dim, self.draws = data.info(""), len(data.x_test), data.shape()[0], draws
        self.real = self.points(data.x_test, data.src_test, data_units=True)

    def points(self, x, src=None, data_units=False):
        x = x.numpy() if data_units else to_data_units(x, self.info)
        return x if src is None else np.concatenate([to_data_units(src, self.info), x], 1)

    def sample(self, net, steps=None, matching=None):
        """`draws` point sets of the net (steps: its matching model's sampler, None: one step; matching: another
        one-step form than self.matching's)."""
        d, matching = self.data, matching or self.matching
        return [self.points(torch.cat([x.cpu() for x in self.generate(
            net, self.n, (self.dim,), self.device, steps, d.num_classes, self.seed + k, matching=matching,
            sources=d.src_test)]), d.src_test) for k in range(self.draws)]

    def floor(self):
        """As many training points as held-out ones, `draws` times: the metric's finite-sample floor."""
        d, sets = self.data, []
        for k in range(self.draws):
            idx = torch.randperm(len(d.x), generator=torch.Generator().manual_seed(self.seed + k))[:self.n]
            sets.append(self.points(d.x[idx], d.y[idx] if d.coupled else None))
        return sets

    def metrics(self, sets):
        """W2, energy distance, improved precision and recall (k = 5), each the mean over the point sets with its
        spread (key_sd: the standard deviation over them; w2_draws: W2 of each set); mode coverage of their union."""
        out, per_draw = {}, list(zip(*[(w2_distance(pts, self.real), energy_distance(pts, self.real),
                                        *precision_recall(pts, self.real)) for pts in sets]))
        for key, values in zip(("w2", "energy", "precision", "recall"), per_draw):
            out[key], out[f"{key}_sd"] = float(np.mean(values)), float(np.std(values))
        out["w2_draws"] = [float(v) for v in per_draw[0]]  # model selection compares nets draw by draw
        if self.data.modes is not None:
            pts = np.concatenate(sets)
            x = pts[:, -self.dim:]
            out["modes"], out["in_mode"], out["min_share"], arc = self.data.modes.coverage(x)
            if arc is not None:
                out["arc_share"] = arc
            if self.data.coupled:
                out["paired"] = paired_fraction(pts[:, :self.dim], x, self.data.modes.centres)
        return out


def paired_fraction(src, x, centres):
    """The built-in pairs task: the fraction of x whose nearest mode neighbours the source's on the ring."""
    from scipy.spatial.distance import cdist
    k_src, k_x = cdist(src, centres).argmin(1), cdist(x, centres).argmin(1)
    return float(np.isin((k_x - k_src) % len(centres), (1, len(centres) - 1)).mean())


def report_lowdim(state, data, out, device, generate, seed=0):
    """The default run's closing table: W2, energy distance and mode coverage against held-out real data,
    and a scatter plot."""
    held = HeldOut(data, generate, state.matching, device, seed)
    start = getattr(state, "start", state.teacher)  # u*'s one-step form, or G regressed (realuid.py --regress)
    rows = {"real training points": held.floor(),
            "teacher, 1 step": held.sample(state.teacher, 1),
            "teacher, 100 steps": held.sample(state.teacher, 100),
            **({} if start is None else {"generator's start, 1 step": held.sample(start)}),
            f"{state.name} generator, 1 step": held.sample(state.generator.g)}
    for decay, net in state.ema.items():
        rows[f"{state.name} EMA {decay}, 1 step"] = held.sample(net)
    results = {name: held.metrics(sets) for name, sets in rows.items()}
    columns = [c for c in ("modes", "min_share", "arc_share", "in_mode", "paired") if c in results["teacher, 1 step"]]
    print(f"\n{'model':<30} {'W2':>13} {'energy':>8} {'precision':>13} {'recall':>13}"
          + "".join(f" {c.replace('_', '-'):>8}" for c in columns) + f"   (to {held.n} held-out real "
          f"{'pairs' if data.coupled else 'points'}; mean and spread of {held.draws} draws)")
    for name, r in results.items():
        print(f"{name:<30} {r['w2']:7.4f}±{r['w2_sd']:.3f} {r['energy']:8.4f}" + "".join(
            f" {r[k]:7.3f}±{r[k + '_sd']:.3f}" for k in ("precision", "recall")) + "".join(
            f" {r[c]:>6}/{len(data.modes.centres)}" if c == "modes" else f" {r[c]:8.3f}" for c in columns))
    save_json(results, os.path.join(out, "results.json"))
    if held.dim >= 2:
        plot_points(held.real[:, -held.dim:], {k: v[0][:, -held.dim:] for k, v in rows.items()}, results,
                    os.path.join(out, "samples.png"), list(rows)[4:])
        print(f"\nscatter plot of real and generated points: {os.path.join(out, 'samples.png')}")
    return results


def psnr(x, ref):
    """The mean over images of their PSNR in dB, images in [-1, 1] (a peak of 1 on the [0, 1] scale)."""
    mse = ((x.clamp(-1, 1) - ref) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((-10 * mse.log10()).mean())


def paired_scores(x, data, task, fid=None):
    """Restorations x of the held-out sources: PSNR to their targets, consistency with the source (PSNR after
    degrading x again; the built-in tasks only, whose degradation is known) and FID against the targets."""
    row = dict(psnr=psnr(x, data.x_test.float() / 127.5 - 1))
    if task in DEGRADATIONS:
        row["consistency"] = psnr(degrade(task, x.clamp(-1, 1)), data.src_test)
    if fid is not None:
        row["fid"] = fid.of_images(x)
    return row


def report_paired(state, data, task, out, device, generate, load_field, fid=None, seed=0, n=None, picks=False):
    """The closing table of a paired image run: the teacher at 1 and 100 steps, the generator, each EMA and, with
    picks, model selection's best-<net>.pt files restore the first n held-out sources (all by default); their
    PSNR, consistency and FID, a results.json and a grid of the first 16."""
    nets = {"teacher, 1 step": (state.teacher, 1), "teacher, 100 steps": (state.teacher, 100),
            f"{state.name} generator, 1 step": (state.generator.g, None),
            **{f"{state.name} EMA {d}, 1 step": (net, None) for d, net in state.ema.items()}}
    for name in sorted(os.listdir(out) if picks else []):
        if name.startswith("best-") and name.endswith(".pt"):
            nets[f"{name} (update {load_checkpoint(os.path.join(out, name))['step']})"] = (
                load_field(os.path.join(out, name), "generator")[0], None)
    matching, task = state.matching, task if task in DEGRADATIONS else None
    data = dataclasses.replace(data, x_test=data.x_test[:n], src_test=data.src_test[:n])
    outputs, results = {}, {}
    for name, (net, steps) in nets.items():
        outputs[name] = torch.cat([x.cpu() for x in generate(
            net, len(data.src_test), data.shape(), device, steps, None, seed, matching=matching,
            sources=data.src_test, progress=name)])
        results[name] = paired_scores(outputs[name], data, task, fid)
    columns = [c for c in ("psnr", "consistency", "fid") if c in next(iter(results.values()))]
    print(f"\n{'model':<34}" + "".join(f" {c:>11}" for c in columns)
          + f"   (on the {len(data.src_test)} held-out pairs; PSNR in dB" + (", FID offline" if fid else "") + ")")
    for name, r in results.items():
        print(f"{name:<34}" + "".join(f" {r[c]:11.3f}" for c in columns))
    save_json(results, os.path.join(out, "results.json"))
    grid = os.path.join(out, "samples.png")
    pair_grid([data.src_test[:16], *(x[:16] for x in outputs.values()), data.x_test[:16].float() / 127.5 - 1], grid)
    print(f"\nheld-out pairs, one row each: source | {' | '.join(outputs)} | target: {grid}")
    return results


def closing_report(state, data, cfg, out, device, generate, load_field, scorer=None):
    """After a distillation (rank 0): model selection's picks, then the closing table of low-dim or paired data."""
    if scorer:
        print(f"model selection: {scorer.summary()}")
    if data.kind == "lowdim":
        report_lowdim(state, data, out, device, generate, cfg.seed)
    elif data.coupled:
        report_paired(state, data, cfg.dataset, out, device, generate, load_field, scorer and scorer.fid, cfg.seed,
                      cfg.eval_samples, picks=scorer is not None)


def plot_points(real, rows, results, path, candidates):
    """Real points beside the teacher at 1 and 100 steps and the best of the candidate one-step nets."""
    plt = pyplot()
    best = min(candidates, key=lambda name: results[name]["w2"])
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


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


INCEPTION_DIR = "/tmp"  # where clean-fid looks for, and downloads, its Inception weights (not on Windows)


INCEPTION_FILE = "inception-2015-12-05.pt"


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)): the squared W2 distance of two Gaussians.

    tr (S1 S2)^(1/2) is computed as tr (S1^(1/2) S2 S1^(1/2))^(1/2), whose eigenvalues are those of S1 S2 but
    which is symmetric: two symmetric eigendecompositions give a real answer even for the near-singular
    covariances of few samples, where scipy's sqrtm(S1 S2) returns complex parts (clean-fid then raises).
    """
    from scipy import linalg
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise UsageError(f"the two feature statistics differ in dimension ({len(mu1)} and {len(mu2)})")
    w, v = linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(w.clip(min=0))) @ v.T
    m = root1 @ s2 @ root1
    tr_covmean = np.sqrt(linalg.eigvalsh((m + m.T) / 2).clip(min=0)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean, 0.0))


def moments(features):
    """(n, sum, sum of outer products) of N x D features in float64: they add up across ranks."""
    f = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    return torch.tensor(float(len(f)), dtype=torch.float64), f.sum(0), f.T @ f


def statistics(features, ranks=None):
    """Mean and unbiased covariance of N x D features in float64 (as clean-fid); under torchrun, of all ranks'
    features together."""
    n, s1, s2 = moments(features)
    if ranks is not None and ranks.world > 1:
        import torch.distributed as dist
        n, s1, s2 = (v.to(ranks.device) for v in (n, s1, s2))
        for v in (n, s1, s2):
            dist.all_reduce(v)
        n, s1, s2 = (v.cpu() for v in (n, s1, s2))
    mu = s1 / n
    return mu.numpy(), ((s2 - n * torch.outer(mu, mu)) / (n - 1)).numpy()


class InceptionFeatures:
    """clean-fid's Inception pool features (2048) of uint8 images, in its `legacy_tensorflow` or `clean` mode."""

    def __init__(self, mode, device):
        from cleanfid import downloads_helper
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer
        if mode not in ("legacy_tensorflow", "clean"):
            raise UsageError(f"unknown FID mode {mode!r}: use legacy_tensorflow (the paper's) or clean")
        try:
            downloads_helper.check_download_inception(INCEPTION_DIR)
            model = InceptionV3W(INCEPTION_DIR, download=False, resize_inside=mode == "legacy_tensorflow")
        except Exception:
            raise UsageError(f"clean-fid's Inception weights are missing and could not be downloaded: put "
                             f"{INCEPTION_FILE} ({downloads_helper.inception_url}) into {INCEPTION_DIR}") from None
        self.model, self.device, self.mode = model.to(device).eval(), device, mode
        self.resize = None if mode == "legacy_tensorflow" else build_resizer(mode)
        self.name = f"inception-{mode}"

    @torch.no_grad()
    def __call__(self, images):
        images = images.expand(-1, 3, -1, -1)  # grey images as RGB
        if self.resize is not None:  # clean-fid resizes each image on the CPU, in float (PIL bicubic)
            images = torch.stack([torch.from_numpy(self.resize(im.permute(1, 2, 0).cpu().numpy())).permute(2, 0, 1)
                                  for im in images])
        return self.model(images.to(self.device)).cpu().numpy()


class NetworkFeatures:
    """Offline features: a realuid UNet's middle block at t = 1 (the data end), averaged over space.

    For small or private data with no Inception at hand; its numbers are comparable only among themselves.
    """

    def __init__(self, path, device, image_size, load_field):
        net, ckpt = load_field(path, "feature network", image_size=image_size)
        if not hasattr(net, "input_blocks") or getattr(net, "num_classes", None) is not None or net.cond_channels:
            raise UsageError(f"--features {path} must be an unconditional image network (a UNet teacher.pt; for "
                             f"paired images, a teacher of the targets alone, e.g. teacher.py --dataset digits)")
        self.net, self.device = net.to(device).eval(), device
        self.channels = ckpt["field"]["in_channels"]
        st = os.stat(path)
        self.name = f"net-{os.path.abspath(path)}-{st.st_size}-{st.st_mtime_ns}"

    @torch.no_grad()
    def __call__(self, images):
        if images.shape[1] != self.channels:
            raise UsageError(f"the feature network takes {self.channels}-channel images, these have "
                             f"{images.shape[1]}")
        x = images.to(self.device).float() / 127.5 - 1
        return self.net.encode(torch.ones(len(x), device=self.device), x).mean((2, 3)).cpu().numpy()


class DigitClassifier(nn.Module):
    """The independent yardstick of digits FID: a small CNN trained to label the digits (eval.py classifier), none
    of the compared generative networks. Images in [-1, 1]; `body` ends in the penultimate layer, whose activations
    (after its ReLU) are the FID features; `head` maps them to the 10 classes."""

    def __init__(self, widths=(16, 32), features=128, num_classes=10):
        super().__init__()
        a, b = widths
        self.body = nn.Sequential(nn.Conv2d(1, a, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(a, b, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(b, b, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                                  nn.Linear(16 * b, features), nn.ReLU())
        self.head = nn.Linear(features, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


CLASSIFIER_KIND = "digit-classifier"  # the kind in the metadata of eval.py classifier's .safetensors files


def classifier_path(resolution):
    """Where eval.py classifier caches the classifier of digits at this resolution, and --features classifier
    reads it (relative to the working folder, as runs/<dataset> is)."""
    return os.path.join("runs", "digits", f"classifier-{resolution}.safetensors")


def is_classifier(path):
    from safetensors import safe_open
    try:
        with safe_open(path, "pt") as f:
            return (f.metadata() or {}).get("kind") == CLASSIFIER_KIND
    except Exception:
        return False


def read_classifier(path, resolution):
    """(DigitClassifier with its weights, spec) of an eval.py classifier file; the spec (resolution, widths,
    features, held-out accuracy, ...) is its JSON metadata, so nothing but the class is needed. No pickle."""
    from safetensors import safe_open
    build = f"python eval.py classifier --resolution {resolution}" + (
        "" if path == classifier_path(resolution) else f" --out {path}")
    if not os.path.isfile(path):
        raise UsageError(f"the digit classifier {path} does not exist: build it first with {build} (seconds)")
    try:
        with safe_open(path, "pt") as f:
            meta, sd = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("kind") != CLASSIFIER_KIND:
            raise ValueError(f"its metadata names no {CLASSIFIER_KIND}")
        spec = json.loads(meta["spec"])
        net = load_state(DigitClassifier(spec["widths"], spec["features"]), sd, f"the digit classifier {path}")
    except UsageError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"the digit classifier {path} could not be read ({first}): build it again with "
                         f"{build}") from None
    return net, spec


class ClassifierFeatures:
    """Independent features for digits: the penultimate layer of eval.py classifier's DigitClassifier. `path`:
    "classifier" (the cached file of the generator's resolution, classifier_path) or such a file."""

    def __init__(self, path, device, shape):
        res = shape[-1]
        path = classifier_path(res) if path == "classifier" else path
        net, spec = read_classifier(path, res)
        r = spec["resolution"]
        if tuple(shape) != (1, r, r):
            raise UsageError(f"the digit classifier {path} takes 1x{r}x{r} images, the generator makes "
                             f"{'x'.join(map(str, shape))}")
        self.net, self.device = net.to(device).eval(), device
        st = os.stat(path)
        self.name = f"classifier-{os.path.abspath(path)}-{st.st_size}-{st.st_mtime_ns}"
        self.describe = f"the digit classifier {path} (held-out accuracy {100 * spec['accuracy']:.1f} %)"

    @torch.no_grad()
    def __call__(self, images):
        return self.net.body(images.to(self.device).float() / 127.5 - 1).cpu().numpy()

    @torch.no_grad()
    def counts(self, features):
        """How many of these features' images the classifier puts in each class (float64, one per class)."""
        labels = self.net.head(torch.from_numpy(features).to(self.device)).argmax(1).cpu()
        return torch.bincount(labels, minlength=self.net.head.out_features).double()


def feature_network(features, mode, device, shape, load_field):
    """FID features: "inception" (clean-fid), "classifier" or a classifier file (digits), or a UNet file."""
    if features == "inception":
        return InceptionFeatures(mode, device)
    if features == "classifier" or is_classifier(features):
        return ClassifierFeatures(features, device, shape)
    return NetworkFeatures(features, device, shape[-1], load_field)


def real_images(data, batch_size=500):
    """uint8 N x C x H x W batches of a data set as the generator sees it (resized, cropped; no flips)."""
    if data.files is None:
        yield from data.x.split(batch_size)
        return
    loader = torch.utils.data.DataLoader(ImageFiles(data.files, data.resolution), batch_size=batch_size)
    yield from (x for x, _ in loader)


class FID:
    """The features and the reference statistics, prepared once; then FID(net, n, seed) per network.

    ref: "cifar10" with Inception features takes clean-fid's precomputed CIFAR-10 train statistics (the
    paper's protocol); a .npz holds mu and sigma; anything else names images as --dataset takes them, whose
    statistics are computed once and cached in cache_dir. features: feature_network's. floor: keep the reference
    images' features for floor() (eval.py fid; a training run's model selection has no floor to draw).
    """

    def __init__(self, ref, features, mode, shape, device, cache_dir, load=None, batch_size=500, bf16=False,
                 ranks=None, generate=None, load_field=None, floor=False):
        mode = mode if mode != "auto" else "legacy_tensorflow" if ref == "cifar10" else "clean"
        self.shape, self.device, self.batch_size, self.bf16 = tuple(shape), device, batch_size, bf16
        self.ranks, self.generate, self.sources = ranks or Ranks(), generate, None
        reference = None  # precomputed statistics are read first: a missing download fails before any work
        if ref == "cifar10" and features == "inception":
            if self.shape != (3, 32, 32):
                raise UsageError(f"clean-fid's CIFAR-10 statistics are for 3x32x32 images, the generator makes "
                                 f"{'x'.join(map(str, self.shape))}")
            reference = (*clean_fid_statistics("cifar10", 32, mode, "train"),
                         f"clean-fid {mode}, CIFAR-10 train statistics")
        elif ref.endswith(".npz"):
            reference = (*read_statistics(ref), ref)
        self.extract = feature_network(features, mode, device, self.shape, load_field)
        self.keep, self.real, self.real_features = floor, None, None  # for floor(): the reference's images, features
        self.ref_counts = None  # the reference's class counts, with the digit classifier's features
        self.mu, self.sigma, self.ref = reference or self.data_statistics(ref, load, cache_dir)
        what = f"Inception, {mode}" if features == "inception" else getattr(self.extract, "describe",
                                                                          f"features of {features}")
        self.describe = f"{what}; reference {self.ref}"

    def data_statistics(self, ref, load, cache_dir):
        data = load(ref)
        if data.coupled:  # paired images: the outputs on the held-out sources against their held-out targets
            self.sources, data = data.src_test, Data(x=data.x_test, kind="image")
        if data.kind != "image" or tuple(data.shape()) != self.shape:
            raise UsageError(f"the FID reference {ref} holds {'x'.join(map(str, data.shape()))} "
                             f"{'images' if data.kind == 'image' else 'points'}, but the generator makes "
                             f"{'x'.join(map(str, self.shape))} images")
        self.real = data
        key = hashlib.sha1(json.dumps([os.path.abspath(ref) if os.path.exists(ref) else ref, list(self.shape),
                                       len(data), self.extract.name]).encode()).hexdigest()[:12]
        path = os.path.join(cache_dir, f"fid-reference-{key}.npz")
        if os.path.isfile(path):
            mu, sigma = read_statistics(path)
        else:
            features = self.reference_features()
            mu, sigma = statistics(features)
            self.real_features = features if self.keep else None  # Inception's of CIFAR-10: 400 MB
            os.makedirs(cache_dir, exist_ok=True)
            save_checkpoint(dict(mu=mu, sigma=sigma, n=len(data), ref=ref), path,
                            write=lambda arrays, f: np.savez(f, **arrays))
        return mu, sigma, f"{ref} ({len(data)} images; statistics cached in {path})"

    def reference_features(self):
        """The reference images' features, computed once."""
        if self.real_features is not None:
            return self.real_features
        from tqdm import tqdm
        data = self.real
        batches = tqdm(real_images(data, self.batch_size), desc=f"FID reference: {len(data)} images",
                       total=math.ceil(len(data) / self.batch_size), unit="batch", disable=None, leave=False)
        self.real_features = np.concatenate([self.extract(x) for x in batches])
        return self.real_features

    def floor(self, n, seed=0):
        """The floor of an FID of n samples: FID of n real reference images drawn with replacement (seeded), in the
        same features against the same statistics: what a generator of exactly the reference's distribution (its
        images, each equally likely) scores at this n. None against precomputed statistics (no images to draw)."""
        return (self.floor_scores(n, seed) or {}).get("fid")

    def floor_scores(self, n, seed=0):  # floor()'s draw, with every score of_features gives (None: no images)
        if self.real is None:
            return None
        rows = np.random.default_rng(seed).integers(len(self.reference_features()), size=n)
        return self.of_features(self.real_features[rows])

    def features(self, net, n, seed, steps=None, num_classes=None, matching=None):
        """Features of n generated images; under torchrun this rank's share of them, from its own seed."""
        r = self.ranks
        first = r.rank * (n // r.world) + min(r.rank, n % r.world)
        n = n // r.world + (r.rank < n % r.world)
        sources = None if self.sources is None else cycled(self.sources, n, first)
        return np.concatenate([self.extract(to_uint8(x)) for x in self.generate(
            net, n, self.shape, self.device, steps, num_classes, seed * r.world + r.rank, self.batch_size, self.bf16,
            progress=f"FID: {n} samples" if r.main else None, matching=matching, sources=sources)])

    def __call__(self, net, n, seed=0, steps=None, num_classes=None, matching=None):
        return self.scores(net, n, seed, steps, num_classes, matching)["fid"]

    def scores(self, net, n, seed=0, steps=None, num_classes=None, matching=None):
        """{"fid": FID} of n generated images, and with the digit classifier's features "classes": how far their
        class shares are from the reference's (class_gap)."""
        return self.of_features(self.features(net, n, seed, steps, num_classes, matching), self.ranks)

    def of_features(self, features, ranks=None):
        out = dict(fid=frechet_distance(*statistics(features, ranks), self.mu, self.sigma))
        if hasattr(self.extract, "counts") and self.real is not None:
            out["classes"] = self.class_gap(features, ranks)
        return out

    def class_gap(self, features, ranks=None):
        """The total-variation distance between the class shares of these images and of the reference images,
        both labelled by the classifier: the mass that sits in the wrong classes. On digits it moves the FID most
        (docs/matching-models.md)."""
        if self.ref_counts is None:
            self.ref_counts = self.extract.counts(self.reference_features())
        counts = self.extract.counts(features)
        if ranks is not None and ranks.world > 1:
            import torch.distributed as dist
            counts = counts.to(ranks.device)
            dist.all_reduce(counts)
            counts = counts.cpu()
        return 0.5 * float((counts / counts.sum() - self.ref_counts / self.ref_counts.sum()).abs().sum())

    def of_images(self, x):
        """FID of given images in [-1, 1] (one process's)."""
        return self.of_features(np.concatenate([self.extract(to_uint8(b)) for b in x.split(self.batch_size)]))["fid"]


def clean_fid_statistics(name, res, mode, split):
    from cleanfid import features
    folder = os.path.join(os.path.dirname(features.__file__), "stats")
    try:
        return features.get_reference_statistics(name, res, mode=mode, split=split)
    except Exception:
        raise UsageError(f"clean-fid's reference statistics are missing and could not be downloaded: put "
                         f"{name}_{mode}_{split}_{res}.npz into {folder}") from None


def read_statistics(path):
    try:
        with np.load(path) as z:
            return z["mu"], z["sigma"]
    except (OSError, KeyError, ValueError) as e:
        raise UsageError(f"{path} is not a .npz of FID statistics with mu and sigma ({e})") from None


def load_reference_data(resolution, data_root):
    """A loader of FID reference images given as --dataset takes them, at the training run's resolution."""
    def load(ref):
        return load_data(argparse.Namespace(dataset=ref, cond=False, seed=0, eval_samples=2000,
                                            resolution=resolution, data_root=data_root, target_dir=""))
    return load


def selection_wins(new, kept=None):
    """Model selection's rule: does the net scored `new` replace the `kept` one? Each is a dict of the score's
    draws ("draws": W2 of each draw; FID: one value) and, on low-dim data, its detail ("detail": precision + recall).
    W2 decides where it can tell the nets apart: a net lower by more than the standard error of the difference wins,
    one higher by more loses. Every net is scored on the same draws (the same noise seeds and held-out points), so
    the difference is taken draw by draw, without the draws' shared luck. Within that error W2 cannot tell them apart
    and what it does not see decides: the higher precision + recall (fine-detail.md: ties broken by lateness kept
    nets 0.02 to 0.03 below their teacher's precision). Equal: the later net."""
    if kept is None:
        return True
    paired = len(new["draws"]) == len(kept["draws"]) > 1  # else other draws, or FID's one: no standard error
    diff = np.subtract(new["draws"], kept["draws"]) if paired else [np.mean(new["draws"]) - np.mean(kept["draws"])]
    gap, sem = float(np.mean(diff)), float(np.std(diff, ddof=1) / math.sqrt(len(diff))) if paired else 0.0
    if abs(gap) <= sem:
        return new.get("detail", 0.0) >= kept.get("detail", 0.0)
    return gap < 0


def lowdim_scores(metrics):
    """Model selection's low-dim row: W2 with its standard error over the draws, precision and recall."""
    sem = metrics["w2_sd"] / math.sqrt(max(len(metrics["w2_draws"]) - 1, 1))  # w2_sd: the population sd
    return {k: metrics[k] for k in ("w2", "precision", "recall", "w2_draws")} | dict(w2_sem=sem)


class ModelSelection:
    """Scores the generator and every EMA; keeps best-<net>.pt (best-generator.pt, best-0.999.pt, ...) holding
    the weights the rule keeps so far (selection_wins). Images: the lowest FID; low-dim data: W2 to the held-out
    points.

    Low-dim W2 decides beyond the standard error of two nets' difference over the draws, precision + recall within
    it: the lowest W2 kept nets lower only by the luck of 4 draws, their precision up to 0.13 below the teacher's
    (fine-detail.md)."""

    def __init__(self, cfg, data, out, device, meta, matching, generate, load_field, resumed=False, ranks=None):
        self.cfg, self.out, self.meta, self.device, self.ranks = cfg, out, meta, device, ranks or Ranks()
        self.fid = None
        self.shape, self.num_classes = tuple(data.shape()), data.num_classes
        if data.kind == "lowdim":  # selected by W2; precision and recall logged beside it
            self.metric, held = "w2", HeldOut(data, generate, matching, device, cfg.seed)
            self.scores = lambda net: lowdim_scores(held.metrics(held.sample(net)))
        else:
            self.metric = "fid"
            ref = cfg.fid_ref or ("cifar10" if cfg.dataset == "cifar10" else cfg.dataset)
            load = load_reference_data(data.shape()[-1], cfg.data_root)
            fid = FID(ref, cfg.fid_features, "auto", self.shape, device, out,
                      lambda r: data if r == cfg.dataset else load(r), ranks=self.ranks, generate=generate,
                      load_field=load_field)
            if self.ranks.main:
                print(f"FID every {cfg.fid_every} updates, {cfg.fid_samples} samples: {fid.describe}")
            self.scores = lambda net: fid.scores(net, cfg.fid_samples, cfg.seed, None, self.num_classes, matching)
            self.fid = fid
        self.best, self.kept = {}, {}  # a fresh run overwrites older best files; a resumed one keeps its scores
        for name in os.listdir(out) if resumed else []:
            if name.startswith("best-") and name.endswith(".pt"):
                ckpt = load_checkpoint(os.path.join(out, name))
                self.best[name[5:-3]] = ckpt["score"]
                self.kept[name[5:-3]] = dict(draws=ckpt.get("draws", [ckpt["score"]]), detail=ckpt.get("detail", 0.0))

    def __call__(self, state, step):
        """Scores on every rank (FID generation is split across them); rank 0 keeps the files. W2 is rank 0's."""
        if self.metric == "w2" and not self.ranks.main:
            return {}
        nets = {"generator": state.generator.g, **{str(d): net for d, net in state.ema.items()}}
        row, start = {}, self.scores(state.generator.g) if step == 0 else None  # at update 0 every EMA is G
        for name, net in nets.items():
            scores = dict(start or self.scores(net))
            value, draws = scores[self.metric], scores.pop(f"{self.metric}_draws", [scores[self.metric]])
            row |= {f"{k}/{name}": v for k, v in scores.items()}
            score = dict(draws=draws) | (dict(detail=scores["precision"] + scores["recall"]) if "recall" in scores
                                         else {})
            if selection_wins(score, self.kept.get(name)) and self.ranks.main:
                try:
                    save_checkpoint(dict(version=VERSION, kind="generator", config=config_dict(self.cfg), **self.meta,
                                         step=step, metric=self.metric, score=value, **score,
                                         generator=net.state_dict()), os.path.join(self.out, f"best-{name}.pt"))
                    self.best[name], self.kept[name] = value, score
                except OSError as e:  # a full disk: the previous best file stays; training goes on
                    print(f"realuid.py: warning: could not write best-{name}.pt ({e.strerror or e})", file=sys.stderr)
        return row

    def summary(self):
        return ", ".join(f"best-{name}.pt {self.metric} {value:.4f}" for name, value in sorted(self.best.items()))
