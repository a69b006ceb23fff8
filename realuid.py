"""RealUID: Universal Inverse Distillation for matching models with real-data supervision.

Reference implementation of "Universal Inverse Distillation for Matching Models
with Real-Data Supervision (No GANs)", Kornilov et al., ICLR 2026. A slow
multi-step matching-model teacher u* (flow matching, VP/VE diffusion, stochastic
interpolants, bridge matching) is distilled into a one-step generator G_theta;
real data enters the distillation through two coefficients alpha, beta (eq. 16)
instead of a GAN discriminator.

    python realuid.py                                   # embedded 2D default, CPU, minutes
    python realuid.py --dataset cifar10 --alpha 0.92 --beta 0.94 --teacher cfm.pt
    python realuid.py --model bridge --dataset pairs    # data-to-data: bridge matching (IBMD + real pairs)

Time convention (torchcfm's, the REVERSE of the paper's main text):
t = 0 is noise, t = 1 is data, x_t = (1 - t) x0 + t x1, target x1 - x0.

Symbols and code:
    x0            noise ~ N(0, I) (or source)  x1      data (real or generated)
    t             time ~ U[0, 1]               x_t     <matching model>.path(x0, x1, t)
    u_t(x_t|x1)   <matching model>.target      u*      the frozen teacher field
    u_psi         the fake field ("fake")      G_theta OneStepGenerator (FM: z + g(0, z))
    alpha, beta   RealUM coefficients (eq. 16) K       fake updates per generator update

Measured on a 2-core CPU, no GPU (README has the details): the default run takes
about 1 min 50 s; W2 to held-out data of the teacher at 1 step 3.79 (no sample on
a mode), at 100 steps 0.52, of the one-step generator 0.53 to 0.59 (0.41 at its
best), all 8 modes. Multi-GPU: torchrun --nproc_per_node=N realuid.py ...
Digits 16x16: teacher 9 min, distillation 9.5 min, clean one-step digits.

Sections: config | networks | matching models | losses | generator and loop |
sampling | data | checkpoints | main.
"""

import argparse
import copy
import dataclasses
import functools
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


# =============================================================================
# Config: defaults are the paper's CIFAR-10 recipe (Appendix D)
# =============================================================================

PRECISIONS = ("auto", "fp32", "bf16")


def opt(default, help, **kw):
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class Config:
    dataset: str = opt("8gaussians", "8gaussians (built-in 2D), digits, cifar10, an image folder, or PATH.npy "
                                     "(N x D floats or N x H x W x C uint8 images)")
    cond: bool = opt(False, "class-conditional generator, teacher and fake model")
    model: str = opt("", "matching model: fm, vp, ve (diffusion), si, bridge (data-to-data, e.g. --dataset pairs); "
                         "default: the teacher file's, fm for a teacher trained on the spot")
    sigma_init: float = opt(2.5, "diffusion: the noise level s/a at which the one-step generator denoises")
    alpha: float = opt(0.92, "RealUM weight of generated data, in (0, 1] (eq. 16)")
    beta: float = opt(0.94, "RealUM weight of the generated target, in (0, 1] (eq. 16)")
    gamma: float = opt(None, "General RealUID (Def. 3): weight of the quadratic term; default: plain RealUID",
                       type=float)
    parameterization: str = opt("standard", "General RealUID: delta = f* - f (standard) or beta (f* - f)",
                                choices=("standard", "beta"))
    alpha_sid: float = opt(None, "RealSiD (eq. 34): the generator loss's quadratic coefficient, 0.5 to 1.2",
                           type=float)
    normalized: bool = opt(False, "Normalized RealUID (Def. 4): minimise the non-squared l2 distance")
    dmd: bool = opt(False, "DMD with real data (Lemma 5): needs alpha = beta")
    dmd_t_max: float = opt(0.98, "DMD: times drawn from [0, t_max], where the score weight t/(1-t) stays finite")
    gan: bool = opt(False, "UID + GAN baseline (eq. 8): a discriminator head on the fake model's features")
    lambda_gen: float = opt(0.3, "GAN weight in the generator loss (paper: 0.3 training, 25 fine-tuning)")
    lambda_disc: float = opt(1.0, "GAN weight in the fake-model loss (paper: 1 training, 75 fine-tuning)")
    gan_t_range: tuple = opt((0.8, 1.0), "time range of the GAN's x_t (t = 1 is data)")
    K: int = opt(5, "fake-model updates per generator update")
    lr: float = opt(3e-5, "Adam learning rate of both networks")
    batch_size: int = opt(256, "batch size (generated and real halves each)")
    steps: int = opt(500_000, "gradient updates in all, fake and generator (K:1)")
    warmup: int = opt(500, "linear learning-rate warm-up, in each network's own updates (as the official code)")
    ema: tuple = opt((0.999, 0.9996, 0.9999), "EMA decays of the generator")
    grad_clip: float = opt(1.0, "gradient-norm clipping of both networks")
    teacher: str = opt("", "teacher checkpoint: teacher.py's, torchcfm's or the official RealUID's "
                           "(low-dim data: trained on the spot if empty)")
    teacher_ema: float = opt(None, "EMA decay to take from a teacher file holding several", type=float)
    num_heads: int = opt(4, "attention heads, for teacher files that do not record them")
    num_head_channels: int = opt(64, "channels per head (overrides --num-heads; -1: off), likewise")
    fake_init: str = opt("random", "initialise the fake model randomly or from the teacher",
                         choices=("random", "teacher"))
    init_generator: str = opt("", "fine-tune: start G from this distilled checkpoint's EMA, the fake from u*")
    init_ema: float = opt(None, "EMA decay to take from --init-generator (default: its raw generator)", type=float)
    resume: str = opt("", "continue a run exactly: a checkpoint file or an output folder")
    out: str = opt("", "output folder (default runs/<dataset>)")
    data_root: str = opt("data", "where cifar10 is found or downloaded")
    resolution: int = opt(0, "image side: image folders (default 64) and digits (16 or 32, default 16)")
    device: str = opt("auto", "cpu, cuda, cuda:N or auto (under torchrun: each rank's own card)")
    precision: str = opt("auto", "network arithmetic: fp32, or bf16 autocast with the loss algebra in fp32; auto: "
                                 "bf16 for UNets on CUDA cards and AMX CPUs, else fp32", choices=PRECISIONS)
    channels_last: bool = opt(False, "NHWC layout for the UNets (for tensor cores; slower on a CPU without AMX)")
    compile: bool = opt(False, "torch.compile the networks (minutes of compilation before the first update)")
    seed: int = opt(0, "seed of everything random")
    workers: int = opt(2, "data-loader processes for image folders")
    log_every: int = opt(100, "updates between progress-bar and metrics-log lines")
    save_every: int = opt(5000, "updates between checkpoints")
    keep: int = opt(3, "checkpoints kept (the newest)")
    sample_every: int = opt(5000, "updates between sample grids of the generator and every EMA (images)")
    tensorboard: bool = opt(False, "also log to TensorBoard (needs the tensorboard package)")
    hidden: int = opt(256, "MLP width (low-dimensional data)")
    teacher_steps: int = opt(5000, "updates of the on-the-spot teacher (low-dim data, no --teacher)")
    eval_samples: int = opt(2000, "held-out points for the final metrics (low-dim data)")
    fid_every: int = opt(0, "updates between FID scores of the generator and every EMA, keeping best-<net>.pt "
                            "for each (low-dim data: W2 to the held-out points); 0: off")
    fid_samples: int = opt(50_000, "generated images per FID score (the paper: 50000)")
    fid_ref: str = opt("", "FID reference: cifar10 (clean-fid's train statistics), a .npz of mu and sigma, "
                           "or images as --dataset takes them (default: cifar10's statistics for cifar10, "
                           "else the training data)")
    skip_nonfinite: int = opt(0, "skip up to N updates whose loss or gradient is NaN or infinite; past N (and by "
                                 "default at the first) the run stops, keeping the last good checkpoint")
    deterministic: bool = opt(False, "CUDA: deterministic algorithms only (slower; CPU runs are deterministic anyway)")
    fid_features: str = opt("inception", "FID features: clean-fid's Inception, or an offline network file "
                                         "(a teacher.pt; not comparable to published FIDs)")


# The CIFAR recipe would take days to move a 2D point cloud; these finish in minutes on a
# laptop CPU. A flag the user gives wins over any recipe.
RECIPES = dict(
    lowdim=dict(lr=3e-4, batch_size=512, steps=6000, warmup=100, ema=(0.95, 0.99, 0.995),
                log_every=50, save_every=2000, fid_every=3000),
    digits=dict(lr=3e-4, batch_size=64, steps=1200, warmup=100, ema=(0.95, 0.99, 0.995),
                log_every=50, save_every=600, sample_every=300, fid_samples=2000),
    image={})
FINETUNE_RECIPE = dict(lr=1e-5, warmup=0)  # App. D.2
DATA_FIELDS = ("dataset", "cond", "seed", "eval_samples", "resolution", "data_root")
RESUMABLE = ("steps", "out", "device", "precision", "channels_last", "compile", "workers", "log_every", "save_every",
             "keep", "sample_every", "tensorboard", "fid_every", "fid_samples", "skip_nonfinite", "deterministic",
             "resume")


def check_coefficients(alpha, beta, gamma=None):
    """RealUM needs alpha, beta in (0, 1]; at alpha = 1 the real term vanishes, so beta = 1.

    General RealUID (A.2) maximises, at each x, -(gamma p_theta + (1 - gamma) p*) |d|^2 + linear(d): bounded
    only if both quadratic weights are positive, gamma in (0, 1); gamma = 1 leaves no quadratic term on
    real data, which is safe only when its linear term vanishes too (alpha = beta = 1).
    """
    if gamma is not None:
        if not (0 < alpha <= 1 and 0 < beta <= 1 and (0 < gamma < 1 or gamma == alpha == beta == 1)):
            raise UsageError(f"General RealUID needs alpha, beta in (0, 1] and gamma in (0, 1) (gamma = 1 only "
                             f"with alpha = beta = 1): otherwise the fake model's objective is unbounded "
                             f"(got alpha={alpha}, beta={beta}, gamma={gamma})")
        return
    ok = 0 < alpha <= 1 and 0 < beta <= 1 and (alpha < 1 or beta == 1)
    if not ok:
        raise UsageError(f"alpha and beta must lie in (0, 1], and alpha = 1 is allowed only with "
                         f"beta = 1 (got alpha={alpha}, beta={beta})")


def check_config(cfg):
    check_coefficients(cfg.alpha, cfg.beta, cfg.gamma)
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
    for name in ("K", "batch_size", "steps", "log_every", "save_every", "sample_every", "keep", "hidden",
                 "fid_samples"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer "
                             f"(got {getattr(cfg, name)})")
    if cfg.lr <= 0 or cfg.warmup < 0 or cfg.grad_clip <= 0 or cfg.fid_every < 0:
        raise UsageError("--lr and --grad-clip must be positive, --warmup and --fid-every non-negative")
    if not cfg.ema or not all(0 < d < 1 for d in cfg.ema):
        raise UsageError(f"every --ema decay must lie in (0, 1) (got {list(cfg.ema)})")
    if cfg.skip_nonfinite < 0:
        raise UsageError(f"--skip-nonfinite must be >= 0 (got {cfg.skip_nonfinite})")
    check_finite(cfg)


def check_finite(cfg):
    """nan and inf pass every range test written as a comparison; refuse them once, for every number."""
    for f in dataclasses.fields(cfg):
        values = getattr(cfg, f.name)
        for v in values if isinstance(values, tuple) else (values,):
            if isinstance(v, float) and not math.isfinite(v):
                raise UsageError(f"--{f.name.replace('_', '-')} must be a finite number (got {v})")
    if not 0 <= cfg.seed < 2 ** 31:
        raise UsageError(f"--seed must lie in [0, 2^31) (got {cfg.seed})")
    for name, (lo, hi) in SIZE_LIMITS.items():  # beyond these a typo allocates the machine away
        if name in {f.name for f in dataclasses.fields(cfg)} and not lo <= getattr(cfg, name) <= hi:
            raise UsageError(f"--{name.replace('_', '-')} must lie in [{lo}, {hi}] (got {getattr(cfg, name)})")
    if getattr(cfg, "channels", 32) % 32:
        raise UsageError(f"--channels must be a multiple of 32, the UNet's GroupNorm groups (got {cfg.channels})")


SIZE_LIMITS = dict(hidden=(1, 65536), channels=(32, 4096), num_res_blocks=(1, 32), workers=(0, 256),
                   resolution=(0, 4096), eval_samples=(1, 10 ** 7), fid_samples=(1, 10 ** 7),
                   teacher_steps=(1, 10 ** 9))


def use_bf16(precision, device, spec=None):
    """Whether the networks run in bf16 autocast. auto: UNets on hardware with fast bf16 matrix units (CUDA
    cards with bf16, CPUs with AMX); a CPU with AVX512-BF16 alone ran bf16 at half its fp32 speed (README)."""
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


# =============================================================================
# Networks: the torchcfm UNet (state-dict compatible) and an MLP for 2D/ND data
# Both follow torchcfm's contract  forward(t, x, y=None) -> field, shaped like x.
# =============================================================================

def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal features of t as in torchcfm / guided-diffusion (t fed unscaled)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def zero_init(module):
    # Residual branches start as the identity, as in torchcfm.
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, channels, emb_channels, out_channels, dropout):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(32, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(32, out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None].to(x.dtype)
        return self.skip_connection(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    def __init__(self, channels, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(32, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_init(nn.Conv1d(channels, channels, 1))

    def forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        # torchcfm's "legacy" order: split heads first, then q, k, v inside each head.
        q, k, v = qkv.reshape(b, self.num_heads, 3 * c // self.num_heads, -1).transpose(-1, -2).chunk(3, -1)
        h = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, -1)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class EmbedSequential(nn.Sequential):
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNet(nn.Module):
    """torchcfm's UNetModelWrapper, same parameter names and shapes (tested against it).

    attention_resolutions are feature-map sizes (torchcfm's "16"); a head width
    num_head_channels > 0 overrides num_heads, as in torchcfm.
    """

    def __init__(self, in_channels=3, image_size=32, channels=128, channel_mult=(1, 2, 2, 2),
                 num_res_blocks=2, attention_resolutions=(16,), num_heads=4, num_head_channels=64,
                 dropout=0.0, num_classes=None):
        super().__init__()
        self.channels, self.num_classes = channels, num_classes
        emb = 4 * channels
        attention_ds = {image_size // r for r in attention_resolutions}

        def attention(ch):
            heads = ch // num_head_channels if num_head_channels > 0 else num_heads
            return AttentionBlock(ch, heads)

        self.time_embed = nn.Sequential(nn.Linear(channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb)
        ch = input_ch = int(channel_mult[0] * channels)
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_chans, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, emb, int(mult * channels), dropout)]
                ch = int(mult * channels)
                if ds in attention_ds:
                    layers.append(attention(ch))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(EmbedSequential(Downsample(ch)))
                skip_chans.append(ch)
                ds *= 2
        self.middle_block = EmbedSequential(ResBlock(ch, emb, ch, dropout), attention(ch),
                                            ResBlock(ch, emb, ch, dropout))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chans.pop(), emb, int(mult * channels), dropout)]
                ch = int(mult * channels)
                if ds in attention_ds:
                    layers.append(attention(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))
        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(),
                                 zero_init(nn.Conv2d(input_ch, in_channels, 3, padding=1)))

    def _encode(self, t, x, y):
        if (y is None) != (self.num_classes is None):
            raise ValueError("pass labels y if and only if the network is class-conditional")
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        emb = self.time_embed(timestep_embedding(t, self.channels))
        if y is not None:
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        return self.middle_block(h, emb), hs, emb

    def encode(self, t, x, y=None):
        """The middle-block features (the UID + GAN discriminator reads them, D.1)."""
        return self._encode(t, x, y)[0]

    def forward(self, t, x, y=None):
        h, hs, emb = self._encode(t, x, y)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


class MLPField(nn.Module):
    """A time-conditioned MLP field for low-dimensional data; y is a class label (num_classes) or, for coupled
    matching models, the source point x_T (cond_dim)."""

    def __init__(self, dim=2, hidden=256, depth=4, num_classes=None, time_features=16, cond_dim=None):
        super().__init__()
        self.num_classes, self.time_features, self.cond_dim = num_classes, time_features, cond_dim
        self.inp = nn.Linear(dim + time_features, hidden)
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, hidden)
        if cond_dim is not None:
            self.cond_emb = nn.Linear(cond_dim, hidden)
        self.hidden = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.out = nn.Linear(hidden, dim)

    def encode(self, t, x, y=None):
        """The last hidden features."""
        if (y is None) != (self.num_classes is None and self.cond_dim is None):
            raise ValueError("pass y if and only if the network is conditional")
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        h = self.inp(torch.cat([x, timestep_embedding(t * 1000, self.time_features).to(x.dtype)], 1))
        if y is not None:
            h = h + (self.cond_emb(y) if self.cond_dim is not None else self.label_emb(y))
        for layer in self.hidden:
            h = layer(F.silu(h))
        return F.silu(h)

    def forward(self, t, x, y=None):
        return self.out(self.encode(t, x, y))


def discriminator_head(spec):
    """The UID + GAN baseline's head on the fake model's features (D.1, as the official code)."""
    if spec["type"] == "mlp":
        return nn.Sequential(nn.Linear(spec["hidden"], spec["hidden"]), nn.SiLU(), nn.Linear(spec["hidden"], 1))
    ch = int(spec["channels"] * spec["channel_mult"][-1])
    side = spec["image_size"] // 2 ** (len(spec["channel_mult"]) - 1)
    if side < 4:
        raise UsageError(f"the GAN head needs middle-block features of at least 4x4 (these are {side}x{side})")
    return nn.Sequential(nn.Conv2d(ch, ch, 2, stride=2), nn.GroupNorm(32, ch), nn.SiLU(),
                         nn.Conv2d(ch, ch, 2, stride=2), nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(ch, 1, 1))


def discriminate(head, features):
    return head(features).flatten(1).mean(1)  # one logit per sample


def build_field(spec):
    """A network from its plain-dict spec, as stored in every checkpoint."""
    spec = dict(spec)
    kind = spec.pop("type")
    if kind == "unet":
        return UNet(**spec)
    if kind == "mlp":
        return MLPField(**spec)
    raise UsageError(f"unknown network type {kind!r} in checkpoint")


def count_parameters(net):
    return sum(p.numel() for p in net.parameters())


# =============================================================================
# Matching models (Def. 1): a conditional path and target, a time law, a weight, a sampler.
# All share torchcfm's time convention: t = 0 noise (or source), t = 1 data. `noise` is
# everything random that the path needs besides x1; `one_step` is the one-step generator's
# form, which the generator takes from the teacher's weights.
# =============================================================================

def pad_like(t, x):
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def time_grid(i, steps, x):
    return torch.full((x.shape[0],), i / steps, device=x.device, dtype=x.dtype)


class FlowMatching:
    """x_t = (1 - t) x0 + t x1 with x0 ~ N(0, I); conditional target u_t(x_t | x1, x0) = x1 - x0 (eq. 2)."""
    coupled = False

    def spec(self):
        return dict(type="fm")

    def noise(self, x1, y=None):
        return torch.randn_like(x1)

    def sample_t(self, n, device):
        return torch.rand(n, device=device)

    def weight(self, t):
        return None

    def path(self, x0, x1, t):
        t = pad_like(t, x1)
        return (1 - t) * x0 + t * x1

    def target(self, x0, x1, t):
        return x1 - x0

    def score(self, f, x, t):
        t = pad_like(t, x)  # s = -E[x0 | x_t] / (1 - t) and E[x0 | x_t] = x - t f on this path
        return (t * f - x) / (1 - t)

    def one_step(self, g, z, y=None):
        return z + g(torch.zeros(z.shape[0], device=z.device, dtype=z.dtype), z, y)

    @torch.no_grad()
    def sample(self, field, z, steps, y=None, sde=False):
        """Euler integration of dx/dt = field(t, x) from t = 0 (noise) to t = 1 (data)."""
        x = z
        for i in range(steps):
            x = x + field(time_grid(i, steps, x), x, y) / steps
        return x


class Diffusion:
    """Denoising score matching (eq. 1) on x_t = a_t x1 + s_t x0, x0 ~ N(0, I), as a UM instance.

    vp: a_t^2 = sigmoid(lam_t), s_t^2 = sigmoid(-lam_t), the log-SNR lam_t linear from -10 (t = 0) to 10.
    ve: a_t = 1, s_t = s_max^(1 - t) s_min^t.  Times are uniform, so the log-SNR is too.
    eps parameterisation: target x0, weight 1. score: target -x0 / s_t (the conditional score), weight s_t^2
    (the same loss in the network's units). The one-step generator is the teacher's denoiser at noise level
    s/a = sigma_init (SiD's choice): G(z) = (s z - s eps(t_g, s z)) / a.
    """
    coupled = False

    def __init__(self, type="vp", param="eps", sigma_init=2.5, lam=(-10.0, 10.0), sigma=(80.0, 0.002)):
        if type not in ("vp", "ve") or param not in ("eps", "score"):
            raise UsageError(f"unknown diffusion {type!r} / parameterisation {param!r}")
        self.type, self.param, self.sigma_init, self.lam, self.sigma = type, param, sigma_init, lam, sigma
        if type == "vp":  # the time where s/a = sigma_init, i.e. lam = -2 log sigma_init
            self.t_g = (-2 * math.log(sigma_init) - lam[0]) / (lam[1] - lam[0])
        else:
            self.t_g = math.log(sigma[0] / sigma_init) / math.log(sigma[0] / sigma[1])
        if not 0 <= self.t_g < 1:
            raise UsageError(f"--sigma-init {sigma_init} lies outside this diffusion's noise levels")

    def spec(self):
        return dict(type=self.type, param=self.param, sigma_init=self.sigma_init, lam=list(self.lam),
                    sigma=list(self.sigma))

    def a_s(self, t):
        """(a_t, s_t, k_t) with k_t = s (a' s / a - s'), the reverse SDE's g^2 / 2 (see sample)."""
        if self.type == "vp":
            rate = self.lam[1] - self.lam[0]
            lam = self.lam[0] + rate * t
            return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt(), torch.sigmoid(-lam) * rate / 2
        s = self.sigma[0] ** (1 - t) * self.sigma[1] ** t
        return torch.ones_like(t), s, s ** 2 * math.log(self.sigma[0] / self.sigma[1])

    def noise(self, x1, y=None):
        return torch.randn_like(x1)

    def sample_t(self, n, device):
        return torch.rand(n, device=device)

    def weight(self, t):
        return self.a_s(t)[1] ** 2 if self.param == "score" else None

    def path(self, x0, x1, t):
        a, s, _ = (pad_like(v, x1) for v in self.a_s(t))
        return a * x1 + s * x0

    def target(self, x0, x1, t):
        return x0 if self.param == "eps" else -x0 / pad_like(self.a_s(t)[1], x0)

    def eps(self, f, t):
        return f if self.param == "eps" else -pad_like(self.a_s(t)[1], f) * f

    def score(self, f, x, t):
        return -self.eps(f, t) / pad_like(self.a_s(t)[1], x)

    def one_step(self, g, z, y=None):
        t = torch.full((z.shape[0],), self.t_g, device=z.device, dtype=z.dtype)
        a, s, _ = (pad_like(v, z) for v in self.a_s(t))
        return (s * z - s * self.eps(g(t, s * z, y), t)) / a

    @torch.no_grad()
    def sample(self, field, z, steps, y=None, sde=False):
        """From x = s_0 z at t = 0: DDIM (the probability-flow ODE, exact in the data prediction) or, with sde,
        Euler-Maruyama of dx = (a'/a x + 2 k score) dt + sqrt(2 k) dW, whose marginals are the path's."""
        x = self.a_s(torch.zeros(1, device=z.device))[1] * z
        for i in range(steps):
            t, t_next = time_grid(i, steps, x), time_grid(i + 1, steps, x)
            (a, s, k), (a_next, s_next, _) = ([pad_like(v, x) for v in self.a_s(u)] for u in (t, t_next))
            eps = self.eps(field(t, x, y), t)
            x1 = (x - s * eps) / a
            if not sde or i == steps - 1:
                x = a_next * x1 + s_next * eps
            else:  # the linear drift a'/a x integrated exactly, the score term by Euler
                dt = 1.0 / steps
                x = a_next / a * x - 2 * k * eps / s * dt + (2 * k * dt).sqrt() * torch.randn_like(x)
        return x


class Interpolant:
    """Data-to-data matching with a coupling (x_T, x1) (App. C): the path starts at x0 = x_T + source_noise z
    and the fields are conditioned on x_T, passed as y (augmented bridge matching, C.1).

    si (stochastic interpolant, eq. 40): x_t = (1 - t) x0 + t x1 + gamma_t eps, gamma_t = sigma t (1 - t);
        target dx_t/dt = x1 - x0 + gamma'_t eps; the ODE dx = b dt carries p_0(.|x_T) to p_1(.|x_T).
    bridge (Brownian bridge matching, eq. 39): gamma_t = sigma sqrt(t (1 - t)); target the bridge's drift
        (x1 - x_t) / (1 - t); sampled by Euler-Maruyama of dx = v dt + sigma dW.
    The one-step generator G(z, x_T) = x0 + g(0, x0, x_T) is the teacher's first Euler step (IBMD's form).
    noise holds (x0, eps) stacked on dim 1.
    """
    coupled = True

    def __init__(self, type="si", sigma=0.5, source_noise=0.1, t_max=0.99):
        if type not in ("si", "bridge"):
            raise UsageError(f"unknown interpolant {type!r}")
        self.type, self.sigma, self.source_noise, self.t_max = type, sigma, source_noise, t_max

    def spec(self):
        return dict(type=self.type, sigma=self.sigma, source_noise=self.source_noise, t_max=self.t_max)

    def noise(self, x1, y):
        return torch.stack([y + self.source_noise * torch.randn_like(x1), torch.randn_like(x1)], 1)

    def sample_t(self, n, device):  # the bridge's drift target grows like sqrt(t / (1 - t)) near t = 1
        return torch.rand(n, device=device) * (self.t_max if self.type == "bridge" else 1.0)

    def weight(self, t):
        # the bridge's target has variance sigma^2 t / (1 - t): weighting by 1 - t keeps every time's share of
        # the loss bounded and leaves the minimiser, a conditional mean at each t, unchanged
        return 1 - t if self.type == "bridge" else None

    def gamma(self, t):
        return self.sigma * (t * (1 - t) if self.type == "si" else (t * (1 - t)).clamp_min(0).sqrt())

    def path(self, noise, x1, t):
        x0, eps = noise.unbind(1)
        t = pad_like(t, x1)
        return (1 - t) * x0 + t * x1 + self.gamma(t) * eps

    def target(self, noise, x1, t):
        x0, eps = noise.unbind(1)
        t = pad_like(t, x1)
        if self.type == "si":
            return x1 - x0 + self.sigma * (1 - 2 * t) * eps
        return x1 - x0 - self.sigma * (t / (1 - t)).sqrt() * eps  # (x1 - x_t) / (1 - t)

    def one_step(self, g, z, y):
        x0 = y + self.source_noise * z
        return x0 + g(torch.zeros(z.shape[0], device=z.device, dtype=z.dtype), x0, y)

    @torch.no_grad()
    def sample(self, field, z, steps, y, sde=True):
        x = y + self.source_noise * z
        for i in range(steps):
            x = x + field(time_grid(i, steps, x), x, y) / steps
            if self.type == "bridge" and i < steps - 1:
                x = x + self.sigma * math.sqrt(1 / steps) * torch.randn_like(x)
        return x


def matching_model(spec=None):
    """A matching model from its plain-dict spec, as stored in checkpoints (none: flow matching)."""
    spec = dict(spec or dict(type="fm"))
    kind = spec.pop("type")
    if kind == "fm":
        return FlowMatching()
    if kind in ("vp", "ve"):
        return Diffusion(kind, **spec)
    if kind in ("si", "bridge"):
        return Interpolant(kind, **spec)
    raise UsageError(f"unknown matching model {kind!r}: use fm, vp, ve, si or bridge")


# =============================================================================
# Losses: pure functions of tensors, each returns the UNREDUCED per-sample loss
# =============================================================================

def sqnorm(v):
    return v.flatten(1).square().sum(1)


def inner(a, b):
    return (a * b).flatten(1).sum(1)


def um_loss(f, u_cond):
    # eq. 3 (CFM eq. 2): || f_t(x_t) - u_t(x_t | x1) ||^2
    return sqnorm(f - u_cond)


def realum_loss(f_gen, u_gen, f_real, u_real, alpha, beta):
    # eq. 16: a ||f(x_gen) - (b/a) u(.|x_gen)||^2 + (1-a) ||f(x_real) - ((1-b)/(1-a)) u(.|x_real)||^2
    loss = alpha * sqnorm(f_gen - (beta / alpha) * u_gen)
    if alpha < 1:  # at alpha = 1 (then beta = 1) the real term has weight zero
        loss = loss + (1 - alpha) * sqnorm(f_real - ((1 - beta) / (1 - alpha)) * u_real)
    return loss


def realuid_generator_loss(f_star, f, u_gen, alpha, beta):
    # Algorithm 1 line 8: the theta-dependent part of L_RUM(u*) - L_RUM(u_psi), eq. 17
    c = beta / alpha
    return alpha * (sqnorm(f_star - c * u_gen) - sqnorm(f - c * u_gen))


def general_realuid_loss(f_star_gen, f_gen, u_gen, f_star_real, f_real, u_real, alpha, beta, gamma=None,
                         parameterization="standard"):
    # Def. 3 (A.2); with gamma = alpha and delta = f* - f this is Lemma 3's split form of L_RUID.
    # f_real None: the generated term alone (all that depends on theta).
    gamma = alpha if gamma is None else gamma
    scale = beta if parameterization == "beta" else 1.0  # delta = f* - f, or beta (f* - f)
    d_gen = scale * (f_star_gen - f_gen)
    loss = -gamma * sqnorm(d_gen) + 2 * alpha * inner(d_gen, f_star_gen) - 2 * beta * inner(d_gen, u_gen)
    if f_real is not None:
        d_real = scale * (f_star_real - f_real)
        loss = loss + (-(1 - gamma) * sqnorm(d_real) + 2 * (1 - alpha) * inner(d_real, f_star_real)
                       - 2 * (1 - beta) * inner(d_real, u_real))
    return loss


def normalized_realuid_loss(f_star_gen, f_gen, u_gen, f_star_real, f_real, u_real, alpha, beta, eps=1e-6):
    # Def. 4 (A.4): <e, a f* - b u(.|x_gen)> + <e, (1-a) f* - (1-b) u(.|x_real)>, e = (f* - f) / ||f* - f||;
    # its maximum over f is the non-squared distance E int ||(b-a) p* f* + a p^theta f* - b p^theta f^theta|| dx.
    # eps keeps e and its gradient finite where f = f*.
    def unit(d):
        return d / (sqnorm(d) + eps ** 2).sqrt().reshape(-1, *[1] * (d.dim() - 1))
    loss = inner(unit(f_star_gen - f_gen), alpha * f_star_gen - beta * u_gen)
    if f_real is not None:
        loss = loss + inner(unit(f_star_real - f_real), (1 - alpha) * f_star_real - (1 - beta) * u_real)
    return loss


def gan_generator_loss(logits_gen):
    # eq. 8, non-saturating: softplus(-D(x_t^gen))
    return F.softplus(-logits_gen)


def gan_discriminator_loss(logits_gen, logits_real):
    # eq. 8: softplus(D(x_t^gen)) + softplus(-D(x_t^real))
    return F.softplus(logits_gen) + F.softplus(-logits_real)


def dmd_generator_loss(s_star, s_fake, x_t, alpha):
    # Lemma 5 (A.5): a <sg[s_fake - s*](x_t), x_t>, whose gradient is a (s_fake - s*) dx_t/dtheta, the gradient of
    # KL(a p^theta_t + (1-a) p*_t || p*_t); the scores are read off the fields by the matching model.
    return inner((alpha * (s_fake - s_star)).detach(), x_t)


def fgm_generator_loss(f_star, f, u_gen):
    # eq. 7 (FGM): ||u* - u||^2 + 2 <u* - u, u - u_t(x_t | x_gen)>, u with frozen parameters
    d = f_star - f
    return sqnorm(d) + 2 * inner(d, f - u_gen)


def realsid_generator_loss(f_star, f, u_gen, alpha_sid=1.2, alpha=1.0, beta=1.0):
    # eq. 34 (RealSiD; SiD eq. 5/33 at alpha = beta = 1): -2 a_SiD a ||d||^2 + 2a <d, f*> - 2b <d, u_t(.|x_gen)>,
    # d = f* - f (with d = f - f* the case a_SiD = 1/2 would not be UID)
    d = f_star - f
    return -2 * alpha_sid * alpha * sqnorm(d) + 2 * alpha * inner(d, f_star) - 2 * beta * inner(d, u_gen)


# =============================================================================
# The generator, EMA and the alternating loop (Algorithm 1, Appendix B)
# =============================================================================

class OneStepGenerator(nn.Module):
    """G_theta(z[, y]): the matching model's one-step form of a field g_theta; flow matching: z + g(0, z[, y])."""

    def __init__(self, g, matching=None):
        super().__init__()
        self.g, self.matching = g, matching or FlowMatching()

    def forward(self, z, y=None):
        return self.matching.one_step(self.g, z, y)


@torch.no_grad()
def ema_update(ema_net, net, decay):
    ema_params = list(ema_net.parameters())
    torch._foreach_lerp_(ema_params, list(net.parameters()), 1 - decay)


def fused_adam(device):
    """Adam as one kernel over all parameters: 5x faster than the per-tensor loop on the CIFAR UNet (CPU)."""
    return device.type in ("cpu", "cuda")


class Diverged(Exception):
    """A loss or gradient went non-finite more often than --skip-nonfinite allows."""


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


def warmup_schedule(warmup):
    return lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


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
        if self.world == 1:
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


def noise_and_time(m, x1, y=None, ranks=None):
    """The path's noise x0 and the times t of a batch of data x1 (this rank's rows of the global batch's)."""
    ranks = ranks or Ranks()
    return ranks.draw(m.noise, x1, y), ranks.draw(lambda x: m.sample_t(x.shape[0], x.device), x1)


def check_world(batch_size, ranks):
    if batch_size % ranks.world:
        raise UsageError(f"--batch-size {batch_size} is the global batch and must split evenly over the "
                         f"{ranks.world} ranks")


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


class RealUID:
    """Teacher u*, fake field u_psi, generator G_theta, their optimisers and EMAs."""

    def __init__(self, cfg, teacher, fake, g, matching=None, fake_spec=None, ranks=None):
        check_coefficients(cfg.alpha, cfg.beta, cfg.gamma)
        self.cfg, self.matching, self.ranks = cfg, matching or FlowMatching(), ranks or Ranks()
        self.device = next(fake.parameters()).device
        self.bf16 = use_bf16(getattr(cfg, "precision", "fp32"), self.device, fake_spec)
        self.teacher = teacher.eval().requires_grad_(False)
        self.fake = fake.train()
        self.generator = OneStepGenerator(g, self.matching).train()
        self.ema = {d: copy.deepcopy(g).eval().requires_grad_(False) for d in cfg.ema}
        # beta1 = 0 is crucial for the min-max (App. D); the fused kernel is Adam's arithmetic in one pass
        adam = dict(lr=cfg.lr, betas=(0.0, 0.999), fused=fused_adam(self.device))
        self.disc = discriminator_head(fake_spec).to(self.device) if cfg.gan else None
        self.fake_params = list(self.fake.parameters()) + (list(self.disc.parameters()) if cfg.gan else [])
        self.opt_fake = torch.optim.Adam(self.fake_params, **adam)
        self.opt_gen = torch.optim.Adam(self.generator.parameters(), **adam)
        self.sched_fake = torch.optim.lr_scheduler.LambdaLR(self.opt_fake, warmup_schedule(cfg.warmup))
        self.sched_gen = torch.optim.lr_scheduler.LambdaLR(self.opt_gen, warmup_schedule(cfg.warmup))
        self.nonfinite = NonFinite(["fake model" + (" or discriminator" if cfg.gan else ""), "generator"],
                                   self.device)
        self.step = 0

    def _noise_and_time(self, x1, y):
        return noise_and_time(self.matching, x1, y, self.ranks)

    def _run(self, fn, *args):
        """A network's output, computed in bf16 autocast where asked; the loss algebra stays fp32."""
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
            return fn(*args).float()

    def _mean(self, loss, t):
        """The batch mean of per-sample losses, weighted as the matching model asks (Def. 1)."""
        w = self.matching.weight(t)
        return (loss if w is None else w * loss).mean()

    def _gan_logits(self, x0, x1, y):
        """D(x_t) with t drawn from --gan-t-range, near the data end (eq. 8, D.1)."""
        lo, hi = self.cfg.gan_t_range
        t = lo + (hi - lo) * self.ranks.draw(lambda x: torch.rand(x.shape[0], device=x.device), x1)
        return self._run(lambda t, x, y: discriminate(self.disc, self.fake.encode(t, x, y)), t,
                         self.matching.path(x0, x1, t), y)

    def fake_step(self, x_real, y=None):
        """Minimise L_RUM(u_psi, p^theta) over psi on a detached generated batch (Alg. 1 line 6)."""
        cfg, m = self.cfg, self.matching
        with torch.no_grad():
            x_gen = self._run(self.generator, self.ranks.draw(torch.randn_like, x_real), y)
        x0, t = self._noise_and_time(x_real, y)  # the same x0 and t for both halves, as the official code
        u_gen, u_real = m.target(x0, x_gen, t), m.target(x0, x_real, t)
        real = cfg.alpha < 1 or cfg.gamma is not None or cfg.normalized
        if real:  # one forward pass over generated and real x_t (GroupNorm is per sample)
            tt, xt, yy = torch.cat([t, t]), torch.cat([m.path(x0, x_gen, t), m.path(x0, x_real, t)]), \
                None if y is None else torch.cat([y, y])
        else:
            tt, xt, yy = t, m.path(x0, x_gen, t), y
        f = self._run(self.fake, tt, xt, yy)
        f_gen, f_real = f.chunk(2) if real else (f, None)
        if cfg.gamma is None and not cfg.normalized:
            loss = self._mean(realum_loss(f_gen, u_gen, f_real, u_real, cfg.alpha, cfg.beta), t)
        else:  # General and Normalized RealUID have no RealUM form: maximise them, with u* on both halves
            with torch.no_grad():
                fs_gen, fs_real = self._run(self.teacher, tt, xt, yy).chunk(2)
            if cfg.normalized:
                loss = -self._mean(normalized_realuid_loss(fs_gen, f_gen, u_gen, fs_real, f_real, u_real,
                                                           cfg.alpha, cfg.beta), t)
            else:
                loss = -self._mean(general_realuid_loss(fs_gen, f_gen, u_gen, fs_real, f_real, u_real, cfg.alpha,
                                                        cfg.beta, cfg.gamma, cfg.parameterization), t)
        if cfg.gan:  # the discriminator: generated against real x_t, in one pass
            logits_gen, logits_real = self._gan_logits(torch.cat([x0, x0]), torch.cat([x_gen, x_real]),
                                                       None if y is None else torch.cat([y, y])).chunk(2)
            loss = loss + cfg.lambda_disc * gan_discriminator_loss(logits_gen, logits_real).mean()
        self.opt_fake.zero_grad(set_to_none=True)
        loss.backward()
        self.ranks.average(self.fake_params)
        grad_norm = self.nonfinite.step(0, self.opt_fake, self.fake_params, loss, cfg.grad_clip, self.step + 1)
        self.sched_fake.step()
        self.step += 1
        return loss.detach(), grad_norm

    def generator_step(self, y=None, shape=None, device=None):
        """Minimise L_RUM(u*, p^theta) - L_RUM(u_psi, p^theta) over theta (Alg. 1 line 8)."""
        cfg, m = self.cfg, self.matching
        z = self.ranks.shard(torch.randn(shape[0] * self.ranks.world, *shape[1:], device=device))
        x_gen = self._run(self.generator, z, y)
        x0, t = self._noise_and_time(x_gen, y)
        if cfg.dmd:
            t = t * cfg.dmd_t_max
        x_t, u_gen = m.path(x0, x_gen, t), m.target(x0, x_gen, t)
        frozen = [self.fake] + ([self.disc] if cfg.gan else [])
        for net in frozen:  # gradients flow through x_t into G only
            net.requires_grad_(False)
        try:
            with torch.set_grad_enabled(not cfg.dmd):  # DMD's gradient reaches G through x_t alone
                f_star, f = self._run(self.teacher, t, x_t, y), self._run(self.fake, t, x_t, y)
            if cfg.gamma is not None:
                loss = general_realuid_loss(f_star, f, u_gen, None, None, None, cfg.alpha, cfg.beta, cfg.gamma,
                                            cfg.parameterization)
            elif cfg.normalized:
                loss = normalized_realuid_loss(f_star, f, u_gen, None, None, None, cfg.alpha, cfg.beta)
            elif cfg.dmd:
                loss = dmd_generator_loss(m.score(f_star, x_t, t), m.score(f, x_t, t), x_t, cfg.alpha)
            elif cfg.alpha_sid is not None:
                loss = realsid_generator_loss(f_star, f, u_gen, cfg.alpha_sid, cfg.alpha, cfg.beta)
            else:
                loss = realuid_generator_loss(f_star, f, u_gen, cfg.alpha, cfg.beta)
            loss = self._mean(loss, t)
            if cfg.gan:
                loss = loss + cfg.lambda_gen * gan_generator_loss(self._gan_logits(x0, x_gen, y)).mean()
            self.opt_gen.zero_grad(set_to_none=True)
            loss.backward()
        finally:
            for net in frozen:
                net.requires_grad_(True)
        self.ranks.average(self.generator.parameters())
        grad_norm = self.nonfinite.step(1, self.opt_gen, list(self.generator.parameters()), loss, cfg.grad_clip,
                                        self.step + 1)
        self.sched_gen.step()
        self.update_emas()
        self.step += 1
        return loss.detach(), grad_norm

    def update_emas(self):
        for decay, ema_net in self.ema.items():
            ema_update(ema_net, self.generator.g, decay)

    def state_dict(self):
        """Everything a resume needs, as plain tensors and numbers (loads with weights_only=True)."""
        rng = rng_state(self.device)
        return dict(generator=self.generator.g.state_dict(), fake=self.fake.state_dict(),
                    ema={str(d): net.state_dict() for d, net in self.ema.items()},
                    opt_gen=self.opt_gen.state_dict(), opt_fake=self.opt_fake.state_dict(),
                    sched_gen=self.sched_gen.state_dict(), sched_fake=self.sched_fake.state_dict(),
                    step=self.step, rng=rng, **({"disc": self.disc.state_dict()} if self.disc else {}))

    def load_state_dict(self, ckpt):
        self.generator.g.load_state_dict(ckpt["generator"])
        self.fake.load_state_dict(ckpt["fake"])
        if self.disc is not None:
            self.disc.load_state_dict(ckpt["disc"])
        for d, net in self.ema.items():
            net.load_state_dict(ckpt["ema"][str(d)])
        for name in ("opt_gen", "opt_fake", "sched_gen", "sched_fake"):
            getattr(self, name).load_state_dict(ckpt[name])
        for group in self.opt_gen.param_groups + self.opt_fake.param_groups:
            group["fused"] = fused_adam(self.device)  # this machine's choice, not the saving one's
        self.step = ckpt["step"]
        set_rng_state(ckpt["rng"], self.device)


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


SAVE_RETRIES, SAVE_WAIT = 10, 30  # the closing checkpoint waits this long for disk space before giving up


def distill(state, batches, out=None, meta=None, sample_fn=None, score_fn=None):
    """The loop: K fake updates, then one generator update, until cfg.steps updates in all.

    meta (data info and field spec) goes into every checkpoint; sample_fn(state, step) writes grids;
    score_fn(state, step) -> {name: score} runs every cfg.fid_every updates (model selection, eval.py).
    Returns None when done. SIGINT or SIGTERM stops at the next update boundary with a checkpoint (under torchrun:
    the next log line, where the ranks agree to stop); the signal's number is returned then. A failed save
    (a full disk) warns and training goes on; the next save tries again. Non-finite updates raise Diverged
    (past cfg.skip_nonfinite) before anything is saved. Rank 0 alone logs, samples and saves.
    """
    from tqdm import tqdm
    cfg, ranks = state.cfg, state.ranks
    log = open(os.path.join(out, "metrics.jsonl"), "a") if out and ranks.main else None
    writer = tensorboard_writer(out) if out and ranks.main and cfg.tensorboard else None
    start, last, stop, halt = time.time(), {}, [], False
    bar = tqdm(total=cfg.steps, initial=state.step, desc="RealUID", dynamic_ncols=True,
               disable=None if ranks.main else True, mininterval=1.0)

    def warn(message):
        bar.write(f"realuid.py: warning: {message}", file=sys.stderr)

    def save(final):
        """Rank 0 writes the checkpoint; the ranks then compare weights. A full disk never costs the run."""
        if ranks.main:
            obj = dict(version=VERSION, kind="generator", config=config_dict(cfg), **(meta or {}),
                       **state.state_dict())
            for attempt in range(SAVE_RETRIES + 1 if final else 1):
                try:
                    save_rotating(obj, out, state.step, cfg.keep)
                    break
                except OSError as e:
                    found = checkpoints_in(out)
                    why = (f"could not write the checkpoint of update {state.step} to {out} ({e.strerror or e}); "
                           f"the last complete one is {found[-1] if found else 'none'}")
                    if not final:
                        warn(f"{why}; training goes on and the next save tries again")
                    elif attempt < SAVE_RETRIES:
                        warn(f"{why}; free some space: retrying in {SAVE_WAIT} s ({attempt + 1}/{SAVE_RETRIES})")
                        time.sleep(SAVE_WAIT)
                    else:
                        raise OSError(f"{why}; the updates after it are lost") from None
        ranks.check_replicas([state.generator, state.fake, *state.ema.values()])

    def record(row):
        try:
            if log:
                log.write(json.dumps(row) + "\n")
                log.flush()
            if writer:
                for k, v in row.items():
                    writer.add_scalar(k, v, row["step"])
        except OSError as e:
            warn(f"could not write the metrics log ({e.strerror or e}); training goes on")
    handlers = catch_signals(lambda signum, _: stop.append(signum)) if out else {}
    try:
        while state.step < cfg.steps and not halt:
            try:
                x_real, y = next(batches)
            except UsageError:  # an unreadable file, hours in: keep the updates made so far
                if out and state.step:
                    save(final=True)
                raise
            if state.step % (cfg.K + 1) < cfg.K:
                last["fake_loss"], last["fake_grad"] = state.fake_step(x_real, y)
            else:
                last["gen_loss"], last["gen_grad"] = state.generator_step(y, x_real.shape, x_real.device)
            bar.update(1)
            step = state.step
            boundary = step % cfg.log_every == 0 or step == cfg.steps
            halt = ranks.any(stop) if boundary or ranks.world == 1 else False
            saving = out and (step % cfg.save_every == 0 or step == cfg.steps or halt)
            if boundary or saving:
                skipped = state.nonfinite.check(cfg.skip_nonfinite, step)  # raises past the allowance
                if skipped and ranks.main:
                    warn(skipped)
            if boundary:
                row = {k: round(float(v), 6) for k, v in last.items()}  # the only host sync
                bar.set_postfix(fake=row.get("fake_loss"), gen=row.get("gen_loss"), refresh=False)
                record(dict(row, step=step, lr=state.sched_gen.get_last_lr()[0], time=round(time.time() - start, 2),
                            **({"skipped_nonfinite": state.nonfinite.seen} if state.nonfinite.seen else {})))
            if sample_fn and ranks.main and (step % cfg.sample_every == 0 or step == cfg.steps):
                try:
                    sample_fn(state, step)
                except OSError as e:
                    warn(f"could not write the sample grids ({e.strerror or e}); training goes on")
            if score_fn and cfg.fid_every and (step % cfg.fid_every == 0 or step == cfg.steps):
                scores = score_fn(state, step)  # every rank: FID generation is split across them
                if ranks.main:
                    bar.write(f"update {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
                    record(dict(step=step, **scores))
            if saving:
                save(final=halt or step == cfg.steps)
    finally:
        bar.close()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if log:
            log.close()
        if writer:
            writer.close()
    return (stop[0] if stop else signal.SIGTERM) if halt else None  # a rank told by another


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
# Sampling
# =============================================================================

def class_labels(n, num_classes, device):
    """Class-conditional sampling cycles the labels 0, 1, ..., K-1, 0, ... (y = arange(n) % K)."""
    return None if num_classes is None else torch.arange(n, device=device) % num_classes


@torch.no_grad()
def generate(net, n, shape, device, steps=None, num_classes=None, seed=0, batch_size=1000, bf16=False,
             progress=None, matching=None, sources=None):
    """Batches of n samples: the one-step generator of field net when steps is None, else the matching
    model's sampler (flow matching: Euler) with that many steps.

    No gradients, eval mode, noise from a generator seeded by `seed`; bf16 autocast for the network when asked.
    progress: a tqdm description, or None for no bar. Coupled models take their sources x_T (n of them).
    """
    matching = matching or FlowMatching()
    from tqdm import tqdm
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training, net = net.training, net.to(device).eval()
    labels = class_labels(n, num_classes, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    try:
        for start in tqdm(range(0, n, batch_size), desc=progress, disable=progress is None or None,
                          unit="batch", leave=False):
            b = min(batch_size, n - start)
            z = torch.randn(b, *shape, generator=gen, device=device)
            y = None if labels is None else labels[start:start + b]
            if sources is not None:
                y = sources[start:start + b].to(device)
            with autocast:
                x = matching.one_step(net, z, y) if steps is None else matching.sample(net, z, steps, y)
            yield x.float()
    finally:
        net.train(was_training)


def sample_field(net, n, shape, device, steps=None, num_classes=None, seed=0, batch_size=1000, matching=None,
                 sources=None):
    """n samples on the CPU (see generate)."""
    return torch.cat([x.cpu() for x in generate(net, n, shape, device, steps, num_classes, seed, batch_size,
                                                matching=matching, sources=sources)])


def to_uint8(x):
    """Images in [-1, 1] to 0..255 as torchcfm's FID script does: (x * 127.5 + 128) clipped, truncated."""
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def save_grid(x, path):
    """Images in [-1, 1] as one PNG grid."""
    from torchvision.utils import save_image
    save_image((x.clamp(-1, 1) + 1) / 2, path, nrow=int(math.ceil(math.sqrt(len(x)))))


def grid_writer(out, shape, num_classes, device, n=64):
    """Sample grids of the generator and every EMA, from the same fixed noise each time."""
    folder = os.path.join(out, "samples")
    os.makedirs(folder, exist_ok=True)

    def write(state, step):
        nets = {"generator": state.generator.g, **{f"ema{d}": net for d, net in state.ema.items()}}
        for name, net in nets.items():
            save_grid(sample_field(net, n, shape, device, None, num_classes, seed=0, matching=state.matching),
                      os.path.join(folder, f"{name}-{step:07d}.png"))
    return write


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
    modes: tuple = None  # (centres, std) of a known Gaussian mixture, in data units (mode coverage)
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


EIGHT_GAUSSIANS = dict(radius=4.0, std=0.4)


def eight_gaussians_centres(radius=EIGHT_GAUSSIANS["radius"]):
    angle = torch.arange(8) * (2 * math.pi / 8)
    return radius * torch.stack([torch.cos(angle), torch.sin(angle)], 1)


def eight_gaussians(n, seed):
    """The built-in 2D data: 8 Gaussians on a circle, labels = mode index."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(8, (n,), generator=g)
    return eight_gaussians_centres()[y] + EIGHT_GAUSSIANS["std"] * torch.randn(n, 2, generator=g), y


def gaussian_pairs(n, seed):
    """The built-in data-to-data task: (x_T, x1) with x_T from mode k of the 8 Gaussians and x1 from mode
    k - 1 or k + 1, each with probability 1/2: a coupling whose conditional law is bimodal."""
    x_src, k = eight_gaussians(n, seed)
    g = torch.Generator().manual_seed(seed + 1)
    k1 = (k + 2 * torch.randint(2, (n,), generator=g) - 1) % 8
    return x_src, eight_gaussians_centres()[k1] + EIGHT_GAUSSIANS["std"] * torch.randn(n, 2, generator=g)


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
    folder = os.path.join(root, "cifar-10-batches-py")
    try:
        ds = CIFAR10(root, train=True, download=not os.path.isdir(folder))
    except Exception:
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


def load_data(cfg):
    """The data set named by cfg.dataset, with cfg.cond deciding whether labels are kept."""
    name, res = cfg.dataset, cfg.resolution
    if name == "8gaussians":
        x, y = eight_gaussians(20_000, seed=1234)
        data = standardise(x, y, 8, eight_gaussians(cfg.eval_samples, seed=4321)[0])
        data.modes = (eight_gaussians_centres().numpy(), EIGHT_GAUSSIANS["std"])
    elif name == "pairs":
        x_src, x = gaussian_pairs(20_000, seed=1234)
        src_test, data_test = gaussian_pairs(cfg.eval_samples, seed=4321)
        data = standardise(x, None, None, data_test)  # sources and data share one coordinate system
        data.y, data.src_test, data.coupled = (x_src - data.mean) / data.std, (src_test - data.mean) / data.std, True
        data.modes = (eight_gaussians_centres().numpy(), EIGHT_GAUSSIANS["std"])
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
        data = Data(files=list_images(name), resolution=res or 64, kind="image", recipe="image", flip=True)
    else:
        raise UsageError(f"unknown dataset {name!r}: use 8gaussians, pairs, digits, cifar10, a folder of images, "
                         f"or a .npy file (N x D floats or N x H x W x C uint8)")
    if data.kind == "image" and min(data.shape()[1:]) % 8:
        raise UsageError(f"{name} holds images of side {data.shape()[1:]}; the UNet needs a multiple of 8"
                         + (" (--resolution sets it)" if data.files is not None or name == "digits" else ""))
    if cfg.cond and data.num_classes is None:
        raise UsageError(f"--cond needs class labels, and {name} has none")
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
                raise UsageError(str(e).strip().splitlines()[-1].split("UsageError: ", 1)[-1]) from None
            yield batch
    finally:
        del it  # the loader processes stop now, not when a traceback that holds this frame is let go


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
# Networks for data, checkpoints
# =============================================================================

def default_channel_mult(resolution):
    return {8: (1, 2), 16: (1, 2, 2)}.get(resolution, (1, 2, 2, 2))


def default_field_spec(data, cfg):
    """The network a teacher of this data gets: the MLP for low-dim data, the UNet for images."""
    if data.kind == "lowdim":
        return dict(type="mlp", dim=data.shape()[0], hidden=cfg.hidden, num_classes=data.num_classes,
                    cond_dim=data.shape()[0] if data.coupled else None)
    c, res = data.shape()[0], data.shape()[1]
    return dict(type="unet", in_channels=c, image_size=res, channels=cfg.channels,
                channel_mult=list(cfg.channel_mult or default_channel_mult(res)),
                num_res_blocks=cfg.num_res_blocks, attention_resolutions=list(cfg.attention_resolutions),
                num_heads=cfg.num_heads, num_head_channels=cfg.num_head_channels, dropout=cfg.dropout,
                num_classes=data.num_classes)


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


def config_dict(cfg):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


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


def load_field(path, what="teacher", ema=None, **kw):
    """(network with its weights loaded strictly, checkpoint)."""
    spec, sd, ckpt = read_field_checkpoint(path, what, ema, **kw)
    return load_state(build_field(spec), sd, f"{what} {path}"), ckpt


def check_teacher_matches(ckpt, data, path):
    have = ckpt.get("data") or {}
    if have.get("shape") != data.shape():
        raise UsageError(f"teacher {path} was trained on data of shape {have.get('shape')}, "
                         f"but this data has shape {data.shape()}")
    if (have.get("num_classes") is None) != (data.num_classes is None):
        raise UsageError(f"teacher {path} is {'un' if have.get('num_classes') is None else ''}conditional; "
                         f"{'drop' if data.num_classes is None else 'add'} --cond or use another teacher")


# =============================================================================
# Main: the CLI, generated from Config; parsing happens only here
# =============================================================================

class Parser(argparse.ArgumentParser):
    """argparse, with a mistyped flag answered in one line rather than the whole usage text."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def parser_from_dataclass(cls, description, prog):
    p = Parser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(cls):
        flag, meta = "--" + f.name.replace("_", "-"), dict(f.metadata)
        helptext = f"{meta.pop('help', '')} (default: {f.default})"
        if isinstance(f.default, bool):
            p.add_argument(flag, action="store_true", help=helptext)
        elif isinstance(f.default, tuple):
            p.add_argument(flag, help=helptext, nargs=meta.pop("nargs", "+"), type=meta.pop("type", float), **meta)
        else:
            p.add_argument(flag, type=meta.pop("type", type(f.default)), help=helptext, **meta)
    return p


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


def fail(prog, e, code=2):
    """One line on stderr; exit code 2 for bad input, 1 for a run that failed."""
    print(f"{prog}: error: {e}", file=sys.stderr)
    return code


def new_folder(path):
    """makedirs; True if the folder did not exist before (so a refused run can take it away again)."""
    created = not os.path.exists(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the output folder {path} ({e.strerror or e})") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"the output folder {path} is not writable")
    return created


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


def undo_folder(out, created):
    """A run refused before it saved anything takes away the folder it created (logs, an empty samples/), and
    keeps any folder with work in it (checkpoints, a teacher trained on the spot)."""
    if created and os.path.isdir(out) and not any(f.endswith((".pt", ".safetensors")) for f in os.listdir(out)):
        import shutil
        shutil.rmtree(out, ignore_errors=True)


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


def prepare_teacher(cfg, data, out, device, ranks=None):
    """The teacher field: from --teacher, from the output folder's cache, or trained on the spot."""
    path = cfg.teacher
    if not path:
        if data.kind != "lowdim":
            raise UsageError(f"{cfg.dataset} needs --teacher PATH (train one with: python teacher.py "
                             f"--dataset {cfg.dataset})")
        path = os.path.join(out, "teacher.pt")
        model = cfg.model or "fm"
        cached = os.path.isfile(path) and load_checkpoint(path).get("data") == data.info(cfg.dataset) \
            and (load_checkpoint(path).get("matching") or {}).get("type", "fm") == model
        if not cached and (ranks or Ranks()).main:  # the other ranks wait for rank 0's file
            import teacher as teacher_py
            tcfg = make_config(teacher_py.TeacherConfig, dict(
                dataset=cfg.dataset, cond=cfg.cond, steps=cfg.teacher_steps, hidden=cfg.hidden,
                seed=cfg.seed, eval_samples=cfg.eval_samples, model=model), teacher_py.TEACHER_RECIPES[data.recipe])
            print(f"no --teacher: training one on the spot ({tcfg.steps} updates), cached as {path}")
            t0 = time.time()
            teacher_py.train_teacher(tcfg, data, device, path)
            print(f"teacher training took {time.time() - t0:.0f} s")
        (ranks or Ranks()).barrier()
    res = data.shape()[-1] if data.kind == "image" else None
    net, ckpt = load_field(path, "teacher", cfg.teacher_ema, image_size=res, num_heads=cfg.num_heads,
                           num_head_channels=cfg.num_head_channels)
    check_teacher_matches(ckpt, data, path)
    return net.to(device), ckpt


def teacher_matching(cfg, ckpt, data, path):
    """The teacher's matching model, from its file (torchcfm's and the official files: flow matching)."""
    spec = dict(ckpt.get("matching") or dict(type="fm"))
    if cfg.model and cfg.model != spec["type"]:
        raise UsageError(f"teacher {path} is a {spec['type']} model, not --model {cfg.model}")
    if spec["type"] in ("vp", "ve"):
        spec["sigma_init"] = cfg.sigma_init
    matching = matching_model(spec)
    if matching.coupled != data.coupled:
        raise UsageError(f"{spec['type']} {'needs' if matching.coupled else 'cannot use'} data-to-data pairs "
                         f"(--dataset pairs), and {cfg.dataset} {'is' if data.coupled else 'is not'} paired")
    if cfg.dmd and not hasattr(matching, "score"):
        raise UsageError(f"--dmd needs a score, which {spec['type']} does not define; use fm, vp or ve")
    return matching


def no_dropout(spec):
    # The generator and the fake model train without dropout (App. D), whatever the teacher used.
    return {**spec, "dropout": 0.0} if spec.get("type") == "unet" else dict(spec)


def main(argv=None):
    p = parser_from_dataclass(Config, "RealUID distillation of a flow-matching teacher into a one-step "
                                      "generator (Kornilov et al., ICLR 2026).", "realuid.py")
    user = vars(p.parse_args(argv))
    out, created = None, False
    try:
        for flag, parent in (("parameterization", "gamma"), ("lambda_gen", "gan"), ("lambda_disc", "gan"),
                             ("gan_t_range", "gan"), ("dmd_t_max", "dmd"), ("init_ema", "init_generator")):
            if flag in user and not user.get(parent):
                raise UsageError(f"--{flag.replace('_', '-')} applies only with --{parent.replace('_', '-')}")
        resume = None
        if user.get("resume"):
            path = latest_checkpoint(user["resume"])
            resume = load_checkpoint(path, "checkpoint to resume")
            if resume.get("kind") != "generator":
                raise UsageError(f"{path} is not a realuid.py checkpoint and cannot be resumed")
            user = resumed_flags(user, resume["config"], path, RESUMABLE, init_generator="")
        cfg = make_config(Config, {k: v for k, v in user.items() if k in DATA_FIELDS})
        check_finite(cfg)  # the data fields, before they size anything
        data = load_data(cfg)
        cfg = make_config(Config, user, RECIPES[data.recipe],
                          FINETUNE_RECIPE if user.get("init_generator") else {})
        check_config(cfg)
        check_batch_size(cfg.batch_size, data)
        ranks, device = init_ranks(cfg.device)
        check_world(cfg.batch_size, ranks)
        set_precision(cfg.precision, device, cfg.deterministic)
        out = cfg.out or os.path.join("runs", os.path.splitext(os.path.basename(cfg.dataset.rstrip("/")))[0])
        created = new_folder(out)
        torch.manual_seed(cfg.seed)
        teacher, teacher_ckpt = prepare_teacher(cfg, data, out, device, ranks)
        matching = teacher_matching(cfg, teacher_ckpt, data, cfg.teacher or os.path.join(out, "teacher.pt"))
        spec = no_dropout(teacher_ckpt["field"])
        g = load_state(build_field(spec), teacher.state_dict(), "teacher")  # G_theta starts as u*'s one Euler step
        if cfg.init_generator:  # fine-tuning (App. D.2): G from a distilled EMA, the fake model from u*
            _, sd, _ = read_field_checkpoint(cfg.init_generator, "--init-generator", cfg.init_ema)
            load_state(g, sd, f"--init-generator {cfg.init_generator}")
        torch.manual_seed(cfg.seed + 1)
        fake = build_field(spec)
        if cfg.fake_init == "teacher" or cfg.init_generator:
            fake.load_state_dict(teacher.state_dict())
        nets = [net.to(device) for net in (teacher, fake, g)]
        for net in nets if cfg.channels_last and spec["type"] == "unet" else ():
            net.to(memory_format=torch.channels_last)
        for net in nets if cfg.compile else ():
            net.compile()  # in place: state-dict keys stay as they are
        state = RealUID(cfg, teacher, fake, g, matching, fake_spec=spec, ranks=ranks)
        if resume is not None:
            state.load_state_dict(resume)
            stale_temporaries(out)
            rewind_metrics(out, state.step)
        meta = dict(data=data.info(cfg.dataset), field=spec, matching=matching.spec())
        scorer = None
        if cfg.fid_every:  # built before training, so that a missing download fails now, not after hours
            import eval as eval_py
            scorer = eval_py.ModelSelection(cfg, data, out, device, meta, matching, resumed=resume is not None,
                                            ranks=ranks)
    except (UsageError, Diverged) as e:  # Diverged: a teacher trained on the spot
        undo_folder(out, created)
        return fail("realuid.py", e, code=2 if isinstance(e, UsageError) else 1)
    say = print if ranks.main else lambda *a: None
    if ranks.main:
        with open(os.path.join(out, "arguments.json"), "w") as f:
            json.dump(config_dict(cfg), f, indent=2)
    say(f"realuid: {cfg.dataset} ({len(data)} items), alpha={cfg.alpha} beta={cfg.beta} K={cfg.K}, updates "
        f"{state.step}..{cfg.steps} on {device}{f' x {ranks.world} ranks' if ranks.world > 1 else ''}, "
        f"{'bf16' if state.bf16 else 'fp32'}, {count_parameters(g)} generator parameters -> {out}")
    t0 = time.time()
    grids = grid_writer(out, data.shape(), data.num_classes, device) if data.kind == "image" else None
    try:
        stopped = distill(state, batches(data, cfg.batch_size, device, cfg.seed, state.step, cfg.workers, ranks),
                          out, meta, grids, scorer)
    except UsageError as e:
        undo_folder(out, created)
        return fail("realuid.py", e)
    except Diverged as e:
        found = checkpoints_in(out)
        return fail("realuid.py", f"{e}; " + (f"the last good checkpoint is {found[-1]}" if found else
                                              "no checkpoint was saved before"), code=1)
    except OSError as e:  # the closing save found no space, after its retries
        return fail("realuid.py", e, code=1)
    if stopped:
        say(f"stopped by signal {signal.Signals(stopped).name} at update {state.step}: checkpoint saved; "
            f"continue with --resume {out}")
        return 128 + stopped  # the shell's convention for a run ended by a signal
    say(f"distillation took {time.time() - t0:.0f} s; checkpoints in {out}")
    if scorer and ranks.main:
        print(f"model selection: {scorer.summary()}")
    if data.kind == "lowdim" and ranks.main:
        import eval as eval_py
        eval_py.report_lowdim(state, data, out, device, cfg.seed)
    return 0


def finish(code):
    """The exit code, after leaving torchrun's process group (if any) cleanly."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(finish(main()))
