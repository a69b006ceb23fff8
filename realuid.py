"""RealUID: Universal Inverse Distillation for matching models with real-data supervision.

Reference implementation of "Universal Inverse Distillation for Matching Models with Real-Data
Supervision (No GANs)", Kornilov et al., ICLR 2026. A slow multi-step matching-model teacher u* (flow matching,
VP/VE diffusion, stochastic interpolants, bridge matching) is distilled into a one-step generator G_theta;
real data enters the distillation through two coefficients alpha, beta (eq. 16) instead of a GAN discriminator.

    python realuid.py                                   # embedded 2D default, CPU, minutes
    python realuid.py --dataset cifar10 --alpha 0.92 --beta 0.94 --teacher cfm.pt
    python realuid.py --model bridge --dataset pairs    # data-to-data: bridge matching (IBMD + real pairs)
    torchrun --nproc_per_node=N realuid.py ...          # many GPUs; measured results: README.md and docs/

Time convention (torchcfm's, the REVERSE of the paper's main text):
t = 0 is noise, t = 1 is data, x_t = (1 - t) x0 + t x1, target x1 - x0.

Symbols and code:
    x0            noise ~ N(0, I) (or source)  x1      data (real or generated)
    t             time ~ U[0, 1]               x_t     <matching model>.path(x0, x1, t)
    u_t(x_t|x1)   <matching model>.target      u*      the frozen teacher field
    u_psi         the fake field ("fake")      G_theta OneStepGenerator (the teacher's denoiser)
    alpha, beta   RealUM coefficients (eq. 16) K       fake updates per generator update

Sections, in the paper's reading order: config | networks | matching models (Def. 1) | losses | the one-step
generator and Algorithm 1 | sampling | the teacher interface | main. From the networks to the loop it depends on
torch alone: one block to copy. What keeps a long run alive (checkpoints, signals, torchrun, the non-finite
guard, data, logs) is runtime.py, which reaches the method through two hooks of RealUID.
"""

import copy
import math
import os
import sys
import time
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime import (DATA_FLAGS, SELECTION_FLAGS, TEACHER_FLAGS, DistillFlags, Diverged, Guard, ModelSelection, Ranks,
                     UsageError, batches, checkpoints_in, closing_report, config_dict, count_parameters,
                     default_field_spec, distill_config, distill_matching_spec, distill_parts, failed, finish,
                     grid_writer, load_state, matching_spec, open_run, parser_from_dataclass, place, prepare_teacher,
                     read_field_checkpoint, refusing, restore, rewind_metrics, save_json, stale_temporaries,
                     stopped_by, supervise, supervise_teacher, teacher_grid, use_bf16)

# =============================================================================
# The method, from here to distill(): torch and Python's standard library alone, one block to copy (README)
# Method: the hyperparameters RealUID reads; defaults are the paper's CIFAR-10 recipe (Appendix D)
# =============================================================================

def opt(default, help, **kw):  # a field with its --help text
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class Method:
    """What Algorithm 1 reads: the RealUM coefficients, the loss variant (App. A), the optimiser and the EMAs.
    realuid.py's Config adds the teacher, the data and the run."""
    alpha: float = opt(0.92, "RealUM weight of generated data, in (0, 1] (eq. 16)")
    beta: float = opt(0.94, "RealUM weight of the generated target, in (0, 1] (eq. 16)")
    gamma: float = opt(None, "General RealUID (Def. 3): the quadratic term's weight; default plain RealUID", type=float)
    parameterization: str = opt("standard", "General RealUID: delta = f* - f (standard) or beta (f* - f)",
                                choices=("standard", "beta"))
    alpha_sid: float = opt(None, "RealSiD (eq. 34): the generator loss's quadratic coefficient, 0.5 to 1.2", type=float)
    normalized: bool = opt(False, "Normalized RealUID (Def. 4): minimise the non-squared l2 distance")
    dmd: bool = opt(False, "DMD with real data (Lemma 5): needs alpha = beta")
    dmd_t_max: float = opt(0.98, "DMD: times drawn from [0, t_max], where the score weight t/(1-t) stays finite")
    gan: bool = opt(False, "UID + GAN baseline (eq. 8): a discriminator head on the fake model's features")
    lambda_gen: float = opt(0.3, "GAN weight in the generator loss (paper: 0.3 training, 25 fine-tuning)")
    lambda_disc: float = opt(1.0, "GAN weight in the fake-model loss (paper: 1 training, 75 fine-tuning)")
    gan_t_range: tuple = opt((0.8, 1.0), "time range of the GAN's x_t (t = 1 is data)")
    K: int = opt(5, "fake-model updates per generator update")
    lr: float = opt(3e-5, "Adam learning rate of the generator (and of the fake model, times --fake-lr-mult)")
    fake_lr_mult: float = opt(1.0, "the fake model's lr over the generator's: > 1 lets it keep up (two time scales)")
    steps: int = opt(500_000, "gradient updates in all, fake and generator (K:1)")
    warmup: int = opt(500, "linear learning-rate warm-up, in each network's own updates (as the official code)")
    lr_decay: str = opt("none", "after the warm-up: none (a constant lr, the paper's) or cosine (down to 0 at "
                                "--steps, in each network's own updates)", choices=("none", "cosine"))
    ema: tuple = opt((0.999, 0.9996, 0.9999), "EMA decays of the generator")
    ema_rampup: float = opt(0.0, "EDM's EMA ramp-up: every EMA's half-life at most this times the generator's "
                                 "updates so far (0: the fixed decays, the paper's)")
    grad_clip: float = opt(1.0, "gradient-norm clipping of both networks")


def variant(cfg):
    """The variant a config runs, as every table, plot, results.json key and progress bar names it."""
    real = "UID" if cfg.alpha == cfg.beta == 1 else "RealUID"  # without real data, or with it
    if cfg.dmd:
        name = "DMD" if real == "UID" else "DMD with real data"
    elif cfg.alpha_sid is not None:
        name = real.replace("UID", "SiD")
    elif cfg.normalized:
        name = f"Normalized {real}"
    else:
        name = "General RealUID" if cfg.gamma is not None else real
    # fine-tuning (App. D.2): a run of the command line started from a distilled generator (Config.init_generator)
    return name + (" + GAN" if cfg.gan else "") + (" fine-tuned" if getattr(cfg, "init_generator", "") else "")


# =============================================================================
# Networks: the torchcfm UNet (state-dict compatible) and an MLP for 2D/ND data, both forward(t, x, y=None)
# =============================================================================

def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal features of t as in torchcfm / guided-diffusion (t fed unscaled)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def zero_init(module):  # residual branches start as the identity, as in torchcfm
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
    num_head_channels > 0 overrides num_heads, as in torchcfm. cond_channels > 0: image-to-image, y is the source
    image x_T, concatenated to the input's channels as image bridges do (torchcfm has no such input)."""

    def __init__(self, in_channels=3, image_size=32, channels=128, channel_mult=(1, 2, 2, 2),
                 num_res_blocks=2, attention_resolutions=(16,), num_heads=4, num_head_channels=64,
                 dropout=0.0, num_classes=None, cond_channels=0):
        super().__init__()
        if num_classes is not None and cond_channels:
            raise ValueError("a UNet is conditioned on class labels or on a source image, not both")
        self.channels, self.num_classes, self.cond_channels = channels, num_classes, cond_channels
        emb = 4 * channels
        attention_ds = {image_size // r for r in attention_resolutions}

        def attention(ch):
            return AttentionBlock(ch, ch // num_head_channels if num_head_channels > 0 else num_heads)

        self.time_embed = nn.Sequential(nn.Linear(channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb)
        ch = input_ch = int(channel_mult[0] * channels)
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(in_channels + cond_channels, ch, 3, padding=1))])
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
        if (y is None) != (self.num_classes is None and not self.cond_channels):
            raise ValueError("pass y (labels or the source image) if and only if the network is conditional")
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        emb = self.time_embed(timestep_embedding(t, self.channels))
        if self.cond_channels:
            x = torch.cat([x, y], 1)
        elif y is not None:
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
    """A time-conditioned MLP field for low-dim data; y is a class label (num_classes) or, for coupled models, the
    source x_T (cond_dim). Fourier features sin, cos (2 pi x B), B ~ N(0, I) (Tancik et al., 2020) let the one-step
    generator, a copy of this net, fold a Gaussian onto thin curves without filaments (docs/fine-detail.md)."""

    def __init__(self, dim=2, hidden=256, depth=4, num_classes=None, time_features=16, cond_dim=None, fourier=0):
        super().__init__()
        self.num_classes, self.time_features, self.cond_dim = num_classes, time_features, cond_dim
        if fourier:  # drawn from its own generator: fixed by the spec, and the global RNG stays untouched
            B = torch.randn(dim, fourier, generator=torch.Generator().manual_seed(0))
            self.register_buffer("B", 2 * math.pi * B)
        self.inp = nn.Linear(dim + 2 * fourier + time_features, hidden)
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
        xb = [(xB := x @ self.B).sin(), xB.cos()] if hasattr(self, "B") else []
        h = self.inp(torch.cat([x, *xb, timestep_embedding(t * 1000, self.time_features).to(x.dtype)], 1))
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
        raise ValueError(f"the GAN head needs middle-block features of at least 4x4 (these are {side}x{side})")
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
    raise ValueError(f"unknown network type {kind!r} in checkpoint")


# =============================================================================
# Matching models (Def. 1): a conditional path and target, a time law, a weight, a sampler.
# All share torchcfm's time convention: t = 0 noise (or source), t = 1 data.
# =============================================================================

def pad_like(t, x):
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def gaussian_like(x, gen=None):  # torch.randn_like, from a seeded generator when given one
    return torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)


def time_grid(i, steps, x):
    return torch.full((x.shape[0],), i / steps, device=x.device, dtype=x.dtype)


def top_band(m, high, band=5):
    """m.high, the draws' share in the top band [sigma_init / band, sigma_init]; t_band, its lowest level's time."""
    if not 0 <= high <= 1:
        raise ValueError(f"--high-noise is a share of the draws, in [0, 1] (got {high})")
    m.high, m.t_band = high, min(1.0, m.t_of_sigma(m.sigma_init / band)) if high else None


def below_sigma_init(m, n, device):
    """SiD's law for distillation, t ~ U[t_g, 1] on the family's clock (the noise levels below the generator's own),
    with a share m.high of the draws from the top band [t_g, t_band]: the modes' masses are settled at these levels,
    and SiD's law alone gives them too few draws to hold a light mode (docs/matching-models.md)."""
    t = m.t_g + (1 - m.t_g) * torch.rand(n, device=device)
    if not m.high:
        return t
    top = m.t_g + (m.t_band - m.t_g) * torch.rand(n, device=device)
    return torch.where(torch.rand(n, device=device) < m.high, top, t)


class MatchingModel:
    """What a family provides (Def. 1); a new family is one subclass, and every loss and the loop take it as is.
    `noise` is everything random that the path needs besides x1 (and x_T, passed as y, for coupled models)."""
    coupled = False  # data-to-data: the fields are conditioned on the source x_T, passed as y
    score = None  # (f, x_t, t) -> the score of x_t read off a field f: defined where DMD applies

    def spec(self):  # a plain dict, stored in every checkpoint; matching_model(spec) rebuilds the model
        raise NotImplementedError

    def noise(self, x1, y=None):
        return torch.randn_like(x1)

    def sample_t(self, n, device):  # the time law of the teacher's training
        return torch.rand(n, device=device)

    def distill_t(self, n, device):  # the time law of the fake model and the generator loss
        return self.sample_t(n, device)

    def weight(self, t):  # the per-sample weight of the UM loss; None: 1
        return None

    def generator_weight(self, t, x_t, x_gen, f_star):  # the per-sample weight of the generator loss
        return self.weight(t)

    def path(self, noise, x1, t):  # x_t
        raise NotImplementedError

    def target(self, noise, x1, t):  # the conditional target u_t(x_t | x1, noise) that the UM loss regresses on
        raise NotImplementedError

    def one_step(self, g, z, y=None):  # G_theta(z[, y]) from a field g with the teacher's architecture
        raise NotImplementedError

    def sample(self, field, z, steps, y=None, gen=None):  # the teacher's many-step sampler; gen: its noise's seed
        raise NotImplementedError


class FlowMatching(MatchingModel):
    """x_t = (1 - t) x0 + t x1 with x0 ~ N(0, I); conditional target u_t(x_t | x1, x0) = x1 - x0 (eq. 2).
    The one-step generator is the teacher's denoiser x1_hat = x + (1 - t) f at the noise level sigma = (1 - t) / t =
    sigma_init, G(z) = x1_hat((1 - t_g) z) at t_g = 1 / (1 + sigma_init), and distillation sees only t >= t_g: SiD's
    choices (see Diffusion), carried over. Without sigma_init t_g = 0: the paper's G(z) = z + g(0, z), t ~ U[0, 1]."""

    def __init__(self, sigma_init=None, high=0.0):
        if sigma_init is not None and not 0 < sigma_init < math.inf:
            raise ValueError(f"--sigma-init must be a positive noise level (got {sigma_init})")
        if high and sigma_init is None:
            raise ValueError("--high-noise needs the generator at a noise level (--sigma-init)")
        self.sigma_init, self.t_g = sigma_init, 0.0 if sigma_init is None else self.t_of_sigma(sigma_init)
        top_band(self, high)

    def spec(self):
        return dict(type="fm") | ({} if self.sigma_init is None else dict(sigma_init=self.sigma_init)) | (
            dict(high=self.high) if self.high else {})

    def t_of_sigma(self, sigma):  # sigma = s / a = (1 - t) / t
        return 1 / (1 + sigma)

    def distill_t(self, n, device):
        return below_sigma_init(self, n, device)

    def path(self, x0, x1, t):
        t = pad_like(t, x1)
        return (1 - t) * x0 + t * x1

    def target(self, x0, x1, t):
        return x1 - x0

    def denoise(self, f, x, t):  # E[x1 | x_t] = x + (1 - t) f on this path
        return x + pad_like(1 - t, x) * f

    def score(self, f, x, t):
        t = pad_like(t, x)  # s = -E[x0 | x_t] / (1 - t) and E[x0 | x_t] = x - t f on this path
        return (t * f - x) / (1 - t)

    def one_step(self, g, z, y=None):
        t = torch.full((z.shape[0],), self.t_g, device=z.device, dtype=z.dtype)
        x = (1 - self.t_g) * z
        return self.denoise(g(t, x, y), x, t)

    @torch.no_grad()
    def sample(self, field, z, steps, y=None, sde=False, gen=None):
        """Euler integration of dx/dt = field(t, x) from t = 0 (noise) to t = 1 (data)."""
        x = z
        for i in range(steps):
            x = x + field(time_grid(i, steps, x), x, y) / steps
        return x


class Diffusion(MatchingModel):
    """Denoising score matching (eq. 1) on x_t = a_t x1 + s_t x0, x0 ~ N(0, I), as a UM instance.
    vp: a_t^2 = sigmoid(lam_t), s_t^2 = sigmoid(-lam_t), the log-SNR lam_t linear from -10 (t = 0) to 10.
    ve: a_t = 1, s_t = s_max^(1 - t) s_min^t.  Times are uniform, so the log-SNR is too; sigma = s / a.
    Three parameterisations of the network f, each read as a denoiser x1_hat = denoise(f, x, t):
    eps: f predicts x0 (target x0, weight 1). score: f predicts -x0 / s_t, the conditional score (weight s_t^2:
    the same loss in the network's units). edm (EDM's preconditioning, sigma_data = 1 for standardised data):
    the network sees c_in x = (x1 + sigma x0) / sqrt(sigma^2 + 1), which is this path rescaled (a_s returns the
    rescaled a, s), and predicts F with x1_hat = c_skip x / c_in + c_out F (target (sigma x1 - x0) c_in,
    weight 1); its training law draws log sigma ~ N(-0.5, 1.2^2) (EDM's, shifted for sigma_data = 1).
    v: flow matching itself in the diffusion's noise levels: the time t is flow matching's clock,
    sigma = (1 - t) / t clamped to the diffusion's range, the network sees the path rescaled to
    (x1 + sigma x0) / (1 + sigma) (flow matching's x_t) and predicts its velocity x1 - x0 (x1_hat = x + s f);
    its laws are uniform in t, and its generator loss is flow matching's, unnormalised.

    Distillation (SiD's choices): the one-step generator is the teacher's denoiser at the noise level
    sigma_init, G(z) = x1_hat(s z) at t_g; the fake model and the generator loss see only the lower noise levels
    (t >= t_g); the generator loss (but v's) is read in the denoiser's units and divided per sample by the
    teacher's mean absolute denoising error of that sample (SiD's normalisation). clip (images: 1, their range):
    the sampler clamps x1_hat to [-clip, clip], DDPM's clip_sample (eps's x1_hat multiplies f's error by s / a).
    weighting "sigma" (images' eps): the eps loss times max(1, s / a), x1_hat's error over sigma below SNR 1."""
    P_MEAN, P_STD = -0.5, 1.2

    def __init__(self, type="vp", param="eps", sigma_init=2.5, lam=(-10.0, 10.0), sigma=(80.0, 0.002), high=0.0,
                 clip=None, weighting=None):
        if type not in ("vp", "ve") or param not in ("eps", "score", "edm", "v") or (clip or 0) < 0 or (
                weighting not in (None, "sigma") or weighting and param != "eps"):
            raise ValueError(f"unknown diffusion {type!r} / parameterisation {param!r} / clip {clip!r} / {weighting!r}")
        self.type, self.param, self.sigma_init, self.lam, self.sigma = type, param, sigma_init, lam, sigma
        self.clip, self.weighting = clip, weighting
        self.t_g = self.t_of_sigma(sigma_init)
        if not 0 <= self.t_g < 1 or not self.sigma_range()[0] < sigma_init <= self.sigma_range()[1]:
            raise ValueError(f"--sigma-init {sigma_init} lies outside this diffusion's noise levels")
        top_band(self, high)

    def spec(self):
        return dict(type=self.type, param=self.param, sigma_init=self.sigma_init, lam=list(self.lam),
                    sigma=list(self.sigma)) | {k: v for k, v in dict(high=self.high, clip=self.clip,
                                                                     weighting=self.weighting).items() if v}

    def sigma_range(self):
        return (math.exp(-self.lam[1] / 2), math.exp(-self.lam[0] / 2)) if self.type == "vp" else self.sigma[::-1]

    def t_of_sigma(self, sigma):
        """The time at which s / a = sigma (a float or a tensor)."""
        if self.param == "v":
            return 1 / (1 + sigma)
        log = torch.log if torch.is_tensor(sigma) else math.log
        if self.type == "vp":  # lam = -2 log sigma
            return (-2 * log(sigma) - self.lam[0]) / (self.lam[1] - self.lam[0])
        return log(self.sigma[0] / sigma) / math.log(self.sigma[0] / self.sigma[1])

    def base(self, t):
        """(a_t, s_t, k_t) of the path itself, with k_t = s (a' s / a - s'), the reverse SDE's g^2 / 2."""
        if self.param == "v":  # flow matching's clock: sigma = (1 - t) / t, so -d log sigma / dt = 1 / (t (1 - t))
            lo, hi = self.sigma_range()
            sigma = ((1 - t) / t).clamp(lo, hi)
            a = torch.ones_like(t) if self.type == "ve" else (sigma ** 2 + 1).rsqrt()
            inside = (sigma > lo) & (sigma < hi)
            return a, sigma * a, torch.where(inside, (sigma * a) ** 2 / (t * (1 - t)).clamp_min(1e-12), 0)
        if self.type == "vp":
            rate = self.lam[1] - self.lam[0]
            lam = self.lam[0] + rate * t
            return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt(), torch.sigmoid(-lam) * rate / 2
        s = self.sigma[0] ** (1 - t) * self.sigma[1] ** t
        return torch.ones_like(t), s, s ** 2 * math.log(self.sigma[0] / self.sigma[1])

    def a_s(self, t):
        """(a_t, s_t, k_t) in the network's coordinates: the path's, or the path rescaled by r, under edm to
        c_in (x1 + sigma x0), under v to a + s = 1 (a rescaling r multiplies k by r^2)."""
        a, s, k = self.base(t)
        if self.param not in ("edm", "v"):
            return a, s, k
        r = 1 / (a + s) if self.param == "v" else 1 / (a * ((s / a) ** 2 + 1).sqrt())
        return a * r, s * r, k * r ** 2

    def sample_t(self, n, device):
        if self.param != "edm":
            return torch.rand(n, device=device)
        sigma = (self.P_MEAN + self.P_STD * torch.randn(n, device=device)).exp()
        return self.t_of_sigma(sigma).clamp(0, 1)

    def distill_t(self, n, device):  # SiD: noise levels below the generator's own, s / a <= sigma_init
        return below_sigma_init(self, n, device)

    def weight(self, t):  # None (1) unless weighted: computed on every fake-model update
        if self.weighting or self.param == "score":
            a, s, _ = self.a_s(t)
            return (s / a).clamp_min(1) if self.weighting else s ** 2

    def path(self, x0, x1, t):
        a, s, _ = (pad_like(v, x1) for v in self.a_s(t))
        return a * x1 + s * x0

    def target(self, x0, x1, t):
        if self.param == "eps":
            return x0
        if self.param == "v":
            return x1 - x0
        a, s, _ = (pad_like(v, x0) for v in self.a_s(t))
        return -x0 / s if self.param == "score" else s * x1 - a * x0  # edm: (sigma x1 - x0) c_in

    def denoise(self, f, x, t):
        """x1_hat = E[x1 | x_t = x] read off the field f."""
        a, s, _ = (pad_like(v, x) for v in self.a_s(t))
        if self.param == "eps":
            return (x - s * f) / a
        if self.param == "score":
            return (x + s ** 2 * f) / a
        if self.param == "v":  # a + s = 1 here
            return x + s * f
        # edm: here a = c_in and s = sigma c_in, so c_skip = a^2 and c_out = s
        return a * x + s * f

    def units(self, t):
        """|d x1_hat|^2 / |d f|^2: the squared change of the denoiser per unit change of the field."""
        a, s, _ = self.a_s(t)
        return {"eps": (s / a) ** 2, "score": (s ** 2 / a) ** 2, "edm": s ** 2, "v": s ** 2}[self.param]

    def generator_weight(self, t, x_t, x_gen, f_star):
        if self.param == "v":  # flow matching's loss: SiD's normalisation costs it W2 (docs/matching-models.md)
            return None
        # SiD's normalisation: the loss in the denoiser's units, over the teacher's mean absolute error, detached
        error = (x_gen - self.denoise(f_star, x_t, t)).abs().flatten(1).mean(1).detach()
        return self.units(t) / (error + 1e-8)

    def score(self, f, x, t):
        a, s, _ = (pad_like(v, x) for v in self.a_s(t))
        return (a * self.denoise(f, x, t) - x) / s ** 2

    def one_step(self, g, z, y=None):
        t = torch.full((z.shape[0],), self.t_g, device=z.device, dtype=z.dtype)
        x = pad_like(self.a_s(t)[1], z) * z
        return self.denoise(g(t, x, y), x, t)

    @torch.no_grad()
    def sample(self, field, z, steps, y=None, sde=False, gen=None):
        """From x = s_0 z at t = 0: DDIM (the probability-flow ODE, exact in the data prediction) or, with sde,
        Euler-Maruyama of dx = (a'/a x + 2 k score) dt + sqrt(2 k) dW, whose marginals are the path's."""
        x = self.a_s(torch.zeros(1, device=z.device))[1] * z
        for i in range(steps):
            t, t_next = time_grid(i, steps, x), time_grid(i + 1, steps, x)
            (a, s, k), (a_next, s_next, _) = ([pad_like(v, x) for v in self.a_s(u)] for u in (t, t_next))
            x1 = self.denoise(field(t, x, y), x, t)
            x1 = x1.clamp(-self.clip, self.clip) if self.clip else x1
            eps = (x - a * x1) / s  # from the clamped x1_hat: DDIM stays consistent
            if not sde or i == steps - 1:
                x = a_next * x1 + s_next * eps
            else:  # the linear drift a'/a x integrated exactly, the score term by Euler
                dt = 1.0 / steps
                x = a_next / a * x - 2 * k * eps / s * dt + (2 * k * dt).sqrt() * gaussian_like(x, gen)
        if self.param in ("edm", "v"):  # back from the network's coordinates, a rescaling of the path's
            x = x / self.a_s(torch.ones(1, device=z.device))[0]
        return x


class Interpolant(MatchingModel):
    """Data-to-data matching with a coupling (x_T, x1) (App. C): the path starts at x0 = x_T + source_noise z
    and the fields are conditioned on x_T, passed as y (augmented bridge matching, C.1).

    si (stochastic interpolant, eq. 40): x_t = (1 - t) x0 + t x1 + gamma_t eps, gamma_t = sigma t (1 - t);
        target dx_t/dt = x1 - x0 + gamma'_t eps; the ODE dx = b dt carries p_0(.|x_T) to p_1(.|x_T).
    bridge (Brownian bridge matching, eq. 39): gamma_t = sigma sqrt(t (1 - t)); target the bridge's drift
        (x1 - x_t) / (1 - t) weighted by 1 - t, or (param "scaled") times sqrt(1 - t), unweighted: the same loss,
        the output at unit scale near t = 1; sampled by Euler-Maruyama of dx = v dt + sigma dW.
    G(z, x_T) = x + (1 - t_g) g(t_g, x, x_T), x = x_T + (source_noise + gamma_t_g) z: the teacher's Euler step
    from t_g (t_g = 0: its first step, IBMD's form, hardly moved by z). noise holds (x0, eps) stacked on dim 1."""
    coupled = True

    def __init__(self, type="si", sigma=0.5, source_noise=0.1, t_max=0.99, param="drift", t_g=0.0):
        if type not in ("si", "bridge") or param not in ("drift", "scaled") or (type, param) == ("si", "scaled"):
            raise ValueError(f"unknown interpolant {type!r} with param {param!r}")
        if not 0 <= t_g < t_max:
            raise ValueError(f"--t-init must lie in [0, {t_max}) (got {t_g})")
        self.type, self.sigma, self.source_noise, self.t_max, self.param = type, sigma, source_noise, t_max, param
        self.t_g, self.z_scale = t_g, source_noise + float(self.gamma(torch.tensor(t_g)))  # G's input noise

    def spec(self):  # a spec without param or t_g, as the files saved before them, is the drift's at t_g = 0
        return dict(type=self.type, sigma=self.sigma, source_noise=self.source_noise, t_max=self.t_max) | (
            dict(param=self.param) if self.param != "drift" else {}) | (dict(t_g=self.t_g) if self.t_g else {})

    def noise(self, x1, y):
        return torch.stack([y + self.source_noise * torch.randn_like(x1), torch.randn_like(x1)], 1)

    def sample_t(self, n, device):  # the bridge's drift target grows like sqrt(t / (1 - t)) near t = 1
        return torch.rand(n, device=device) * (self.t_max if self.type == "bridge" else 1.0)

    def weight(self, t):
        # the drift has variance sigma^2 t / (1 - t): weighting by 1 - t (or scaling by its root) keeps every
        # time's share of the loss bounded and leaves the minimiser, a conditional mean at each t, unchanged
        return 1 - t if self.type == "bridge" and self.param == "drift" else None

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
        drift = x1 - x0 - self.sigma * (t / (1 - t)).sqrt() * eps  # (x1 - x_t) / (1 - t)
        return drift * (1 - t).sqrt() if self.param == "scaled" else drift

    def one_step(self, g, z, y):  # the path's noise at t_g makes the teacher's step choose by z from the start
        x, t = y + self.z_scale * z, self.t_g
        drift = g(torch.full((z.shape[0],), t, device=z.device, dtype=z.dtype), x, y)
        return x + (1 - t) * (drift / math.sqrt(1 - t) if self.param == "scaled" else drift)

    @torch.no_grad()
    def sample(self, field, z, steps, y, sde=True, gen=None):
        x = y + self.source_noise * z
        for i in range(steps):
            t = time_grid(i, steps, x)
            x = x + field(t, x, y) / (pad_like((1 - t).sqrt(), x) * steps if self.param == "scaled" else steps)
            if self.type == "bridge" and i < steps - 1:
                x = x + self.sigma * math.sqrt(1 / steps) * gaussian_like(x, gen)
        return x


def matching_model(spec=None):
    """A matching model from its plain-dict spec, as stored in checkpoints (none: flow matching)."""
    spec = dict(spec or dict(type="fm"))
    kind = spec.pop("type")
    if kind not in ("fm", "vp", "ve", "si", "bridge"):
        raise ValueError(f"unknown matching model {kind!r}: use fm, vp, ve, si or bridge")
    return FlowMatching(**spec) if kind == "fm" else (Diffusion if kind in ("vp", "ve") else Interpolant)(kind, **spec)


# =============================================================================
# Losses: pure functions of tensors, each returns the UNREDUCED per-sample loss
# =============================================================================

def check_coefficients(alpha, beta, gamma=None):
    """RealUM needs alpha, beta in (0, 1]; at alpha = 1 the real term vanishes, so beta = 1.
    General RealUID (A.2) maximises, at each x, -(gamma p_theta + (1 - gamma) p*) |d|^2 + linear(d): bounded
    only if both quadratic weights are positive, gamma in (0, 1); gamma = 1 leaves no quadratic term on
    real data, which is safe only when its linear term vanishes too (alpha = beta = 1)."""
    if gamma is not None:
        if not (0 < alpha <= 1 and 0 < beta <= 1 and (0 < gamma < 1 or gamma == alpha == beta == 1)):
            raise ValueError(f"General RealUID needs alpha, beta in (0, 1] and gamma in (0, 1) (gamma = 1 only "
                             f"with alpha = beta = 1): otherwise the fake model's objective is unbounded "
                             f"(got alpha={alpha}, beta={beta}, gamma={gamma})")
        return
    if not (0 < alpha <= 1 and 0 < beta <= 1 and (alpha < 1 or beta == 1)):
        raise ValueError(f"alpha and beta must lie in (0, 1], and alpha = 1 is allowed only with "
                         f"beta = 1 (got alpha={alpha}, beta={beta})")


def sqnorm(v):
    return v.flatten(1).square().sum(1)


def inner(a, b):
    return (a * b).flatten(1).sum(1)


def weighted_mean(loss, w):  # the batch mean of per-sample losses, weighted as the matching model asks
    return (loss if w is None else w * loss).mean()


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
    # Algorithm 1 line 8: the theta-dependent part of L_RUM(u*) - L_RUM(u_psi), eq. 17. Def. 3 with gamma = alpha
    # equals it only up to rounding (Lemma 3, tested): kept as the paper writes it, and runs keep their weights
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
    # eq. 7 (FGM): ||u* - u||^2 + 2 <u* - u, u - u_t(x_t | x_gen)>, u with frozen parameters. The general form
    # with gamma = 1 equals it only up to rounding: kept as written, for the UID = FGM = SiD identity test
    d = f_star - f
    return sqnorm(d) + 2 * inner(d, f - u_gen)


def realsid_generator_loss(f_star, f, u_gen, alpha_sid=1.2, alpha=1.0, beta=1.0):
    # eq. 34 (RealSiD; SiD eq. 5/33 at alpha = beta = 1): -2 a_SiD a ||d||^2 + 2a <d, f*> - 2b <d, u_t(.|x_gen)>,
    # d = f* - f: Def. 3's generated term with gamma = 2 a_SiD a (with d = f - f*, a_SiD = 1/2 would not be UID)
    return general_realuid_loss(f_star, f, u_gen, None, None, None, alpha, beta, 2 * alpha_sid * alpha)


# =============================================================================
# The one-step generator and Algorithm 1: K fake-model updates, then one generator update (Appendix B)
# =============================================================================

class OneStepGenerator(nn.Module):
    """G_theta(z[, y]): the matching model's one-step form of a field g_theta; flow matching: z + g(0, z[, y])."""

    def __init__(self, g, matching=None):
        super().__init__()
        self.g, self.matching = g, matching or FlowMatching()

    def forward(self, z, y=None):
        return self.matching.one_step(self.g, z, y)


def regression_pairs(matching, teacher, shape, updates, batch_size, device, num_classes=None, seed=0, n=0,
                     progress=lambda steps, what: steps):
    """(z, y, x): the teacher's 100-step samples x from z (y: class labels or None), and the generator that drew z.
    One batch per 10 updates, at most n pairs (0: 50 batches): sampling one costs 100 updates' worth. progress
    wraps the loops (a bar: realuid.py's main)."""
    gen = torch.Generator().manual_seed(1_000_003 + seed)  # z no score draws (seeds 0, 1, ...): G memorises them
    z = torch.randn(min(max(1, -(-updates // 10)) * batch_size, n or 50 * batch_size), *shape, generator=gen).to(device)
    y = torch.randint(num_classes, (len(z),), generator=gen).to(device) if num_classes else None
    x = torch.cat([matching.sample(teacher, z[i:i + batch_size], 100, None if y is None else y[i:i + batch_size])
                   for i in progress(range(0, len(z), batch_size), "the teacher's samples")])
    return (z, y, x), gen


def regression_loss(generator, pairs, i):  # DMD's regression loss on the pairs i
    z, y, x = pairs
    return sqnorm(generator(z[i], None if y is None else y[i]) - x[i]).mean()


def regression_start(generator, teacher, shape, updates, batch_size, lr, device, num_classes=None, seed=0, n=0,
                     progress=lambda steps, what: steps):
    """G's start: regressed onto the teacher's 100-step samples from the same z, Adam on a cosine (Luhman & Luhman
    2021). From u*'s one-step form distillation folds G onto separate modes too slowly and leaves points strung
    between them; this gives G the teacher's fold (more pairs did not help on 2D: fine-detail.md). Returns the
    last loss and the pairs, which --regress-weight keeps as an anchor through distillation."""
    pairs, gen = regression_pairs(generator.matching, teacher, shape, updates, batch_size, device, num_classes, seed, n,
                                  progress)
    optimiser = torch.optim.Adam(generator.parameters(), lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, updates)
    for _ in progress(range(updates), "regression"):
        loss = regression_loss(generator, pairs, torch.randint(len(pairs[0]), (batch_size,), generator=gen).to(device))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        sched.step()
    return float(loss.detach()), pairs


def ema_decay(decay, n, rampup=0.0):
    """The decay of an EMA at the generator's n-th update. EDM's ramp-up (SiD's distillation keeps it, at 0.05)
    caps the half-life at rampup * n updates, so that an EMA of a short run forgets its start."""
    return min(decay, 0.5 ** (1 / (rampup * n))) if rampup else decay


@torch.no_grad()
def ema_update(ema_net, net, decay):
    torch._foreach_lerp_(list(ema_net.parameters()), list(net.parameters()), 1 - decay)


def fused_adam(device):  # Adam as one kernel over all parameters: 5x the per-tensor loop's speed (CIFAR UNet, CPU)
    return device.type in ("cpu", "cuda")


def warmup_schedule(warmup, total=0, start=0):
    """The lr factor at a network's update `step`: a linear warm-up, then constant, or with total > 0 a cosine
    from 1 at update `start` down to 0 at update `total` (the min-max then settles instead of circling; the lr
    constant before `start`: warm-up-stable-decay, the VP (eps) digits teacher's: docs/matching-models.md)."""
    def factor(step):
        ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        done = min(max(step - start, 0), total - start)  # the cosine's updates so far
        return ramp * (0.5 + 0.5 * math.cos(math.pi * done / (total - start)) if total > 0 else 1.0)
    return factor


def draw_all(fn, *xs):
    """The `draw` hook of one process: fn's per-sample random numbers for the whole batch."""
    return fn(*xs)


def clip_and_step(i, optimiser, params, loss, grad_clip, update):
    """The `apply` hook of one process: clip network i's gradient norm and step its optimiser. The CLI puts
    torchrun's gradient average and the non-finite guard here (runtime.Guard)."""
    grad_norm = nn.utils.clip_grad_norm_(params, grad_clip)
    optimiser.step()
    return grad_norm


def noise_and_time(m, x1, y=None, draw=draw_all, distill=False):
    """The path's noise and the times t of a batch of data x1, by the law of training or of distillation."""
    law = m.distill_t if distill else m.sample_t
    return draw(m.noise, x1, y), draw(lambda x: law(x.shape[0], x.device), x1)


class RealUID:
    """Teacher u*, fake field u_psi, generator G_theta, their optimisers and EMAs.
    Two hooks keep the steps Algorithm 1 and nothing else: draw(fn, *xs) draws per-sample randomness (under
    torchrun: this rank's rows of the global batch's draws, runtime.Ranks.draw) and apply(i, optimiser, params,
    loss, grad_clip, update) -> gradient norm steps network i (clip_and_step, or runtime.Guard)."""

    def __init__(self, cfg, teacher, fake, g, matching=None, fake_spec=None, bf16=False, draw=draw_all,
                 apply=clip_and_step):
        check_coefficients(cfg.alpha, cfg.beta, cfg.gamma)
        self.cfg, self.matching, self.bf16, self.draw, self.apply = cfg, matching or FlowMatching(), bf16, draw, apply
        self.name, self.device = variant(cfg), next(fake.parameters()).device
        self.teacher, self.fake = teacher.eval().requires_grad_(False), fake.train()
        self.generator = OneStepGenerator(g, self.matching).train()
        self.ema = {d: copy.deepcopy(g).eval().requires_grad_(False) for d in cfg.ema}
        # beta1 = 0 is crucial for the min-max (App. D); the fused kernel is Adam's arithmetic in one pass
        adam = dict(lr=cfg.lr, betas=(0.0, 0.999), fused=fused_adam(self.device))
        self.disc = discriminator_head(fake_spec).to(self.device) if cfg.gan else None
        self.fake_params = list(self.fake.parameters()) + (list(self.disc.parameters()) if cfg.gan else [])
        self.opt_fake = torch.optim.Adam(self.fake_params, **adam | dict(lr=cfg.lr * cfg.fake_lr_mult))
        self.opt_gen = torch.optim.Adam(self.generator.parameters(), **adam)
        gen_updates = cfg.steps // (cfg.K + 1) if cfg.lr_decay == "cosine" else 0  # each network's own updates
        self.sched_fake = torch.optim.lr_scheduler.LambdaLR(
            self.opt_fake, warmup_schedule(cfg.warmup, cfg.steps - gen_updates if gen_updates else 0))
        self.sched_gen = torch.optim.lr_scheduler.LambdaLR(self.opt_gen, warmup_schedule(cfg.warmup, gen_updates))
        self.step, self.pairs, self.regress_weight = 0, None, 0.0  # the anchor's (z, y, x) and weight, if any

    def _run(self, fn, *args):  # a network's output, in bf16 autocast where asked; the loss algebra stays fp32
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
            return fn(*args).float()

    def _gan_logits(self, x0, x1, y):
        """D(x_t) with t drawn from --gan-t-range, near the data end (eq. 8, D.1)."""
        lo, hi = self.cfg.gan_t_range
        t = lo + (hi - lo) * self.draw(lambda x: torch.rand(x.shape[0], device=x.device), x1)
        return self._run(lambda t, x, y: discriminate(self.disc, self.fake.encode(t, x, y)), t,
                         self.matching.path(x0, x1, t), y)

    def _descend(self, i, optimiser, sched, params, loss):
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = self.apply(i, optimiser, params, loss, self.cfg.grad_clip, self.step + 1)
        sched.step()
        return grad_norm

    def fake_step(self, x_real, y=None):
        """Minimise L_RUM(u_psi, p^theta) over psi on a detached generated batch (Alg. 1 line 6)."""
        cfg, m = self.cfg, self.matching
        with torch.no_grad():
            x_gen = self._run(self.generator, self.draw(torch.randn_like, x_real), y)
        x0, t = noise_and_time(m, x_real, y, self.draw, distill=True)  # the same for both halves, as the official code
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
            loss = weighted_mean(realum_loss(f_gen, u_gen, f_real, u_real, cfg.alpha, cfg.beta), m.weight(t))
        else:  # General and Normalized RealUID have no RealUM form: maximise them, with u* on both halves
            with torch.no_grad():
                fs_gen, fs_real = self._run(self.teacher, tt, xt, yy).chunk(2)
            if cfg.normalized:
                loss = -weighted_mean(normalized_realuid_loss(fs_gen, f_gen, u_gen, fs_real, f_real, u_real,
                                                              cfg.alpha, cfg.beta), m.weight(t))
            else:
                loss = -weighted_mean(general_realuid_loss(fs_gen, f_gen, u_gen, fs_real, f_real, u_real, cfg.alpha,
                                                           cfg.beta, cfg.gamma, cfg.parameterization), m.weight(t))
        if cfg.gan:  # the discriminator: generated against real x_t, in one pass
            logits_gen, logits_real = self._gan_logits(torch.cat([x0, x0]), torch.cat([x_gen, x_real]),
                                                       None if y is None else torch.cat([y, y])).chunk(2)
            loss = loss + cfg.lambda_disc * gan_discriminator_loss(logits_gen, logits_real).mean()
        grad_norm = self._descend(0, self.opt_fake, self.sched_fake, self.fake_params, loss)
        self.step += 1
        return loss.detach(), grad_norm

    def generator_step(self, y=None, shape=None, device=None):
        """Minimise L_RUM(u*, p^theta) - L_RUM(u_psi, p^theta) over theta (Alg. 1 line 8)."""
        cfg, m = self.cfg, self.matching
        like = torch.empty((), device=device).expand(shape)  # the batch's shape, without its memory
        x_gen = self._run(self.generator, self.draw(torch.randn_like, like), y)
        x0, t = noise_and_time(m, x_gen, y, self.draw, distill=True)
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
            loss = weighted_mean(loss, m.generator_weight(t, x_t, x_gen, f_star))
            if self.regress_weight:  # the start's pairs hold each z to the teacher's sample (DMD's regression loss)
                i = self.draw(lambda x: torch.randint(len(self.pairs[0]), (len(x),), device=x.device), x_gen)
                loss = loss + self.regress_weight * regression_loss(
                    lambda *zy: self._run(self.generator, *zy), self.pairs, i)  # in x_gen's arithmetic
            if cfg.gan:
                loss = loss + cfg.lambda_gen * gan_generator_loss(self._gan_logits(x0, x_gen, y)).mean()
            grad_norm = self._descend(1, self.opt_gen, self.sched_gen, list(self.generator.parameters()), loss)
        finally:
            for net in frozen:
                net.requires_grad_(True)
        self.update_emas()
        self.step += 1
        return loss.detach(), grad_norm

    def ema_decays(self):  # (decay at this generator update, EMA net); the ramp-up counts updates from 1
        n = self.step // (self.cfg.K + 1) + 1
        return [(ema_decay(d, n, self.cfg.ema_rampup), net) for d, net in self.ema.items()]

    def update_emas(self):
        for decay, ema_net in self.ema_decays():
            ema_update(ema_net, self.generator.g, decay)


def distill(state, batches, after=None):
    """Algorithm 1: K fake-model updates, then one generator update, until cfg.steps updates in all.
    after(step, losses) -> stop, if given, runs after every update (runtime.Supervisor.after)."""
    cfg = state.cfg
    while state.step < cfg.steps:
        x_real, y = next(batches)
        if state.step % (cfg.K + 1) < cfg.K:
            losses = dict(zip(("fake_loss", "fake_grad"), state.fake_step(x_real, y)))
        else:
            losses = dict(zip(("gen_loss", "gen_grad"), state.generator_step(y, x_real.shape, x_real.device)))
        if after and after(state.step, losses):
            return


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
    progress: a tqdm description, or None for no bar. Coupled models take their sources x_T (n of them)."""
    matching = matching or FlowMatching()
    from tqdm import tqdm
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training, net = net.training, net.to(device).eval()
    labels = class_labels(n, num_classes, device) if sources is None else sources  # per sample: y, or x_T
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    try:
        for start in tqdm(range(0, n, batch_size), desc=progress, disable=progress is None or None,
                          unit="batch", leave=False):
            b = min(batch_size, n - start)
            z = torch.randn(b, *shape, generator=gen, device=device)
            y = None if labels is None else labels[start:start + b].to(device)
            with autocast:
                x = matching.one_step(net, z, y) if steps is None else matching.sample(net, z, steps, y, gen=gen)
            yield x.float()
    finally:
        net.train(was_training)


def sample_field(net, n, shape, device, steps=None, num_classes=None, seed=0, batch_size=1000, matching=None,
                 sources=None):
    """n samples on the CPU (see generate)."""
    return torch.cat([x.cpu() for x in generate(net, n, shape, device, steps, num_classes, seed, batch_size,
                                                matching=matching, sources=sources)])


# =============================================================================
# The teacher interface: training u* (Def. 1, any matching model) and reading teacher files
# (ours, torchcfm's and the official RealUID code's)
# =============================================================================

def teacher_step(net, optimiser, sched, ema, m, x1, y, grad_clip, bf16=False, draw=draw_all, apply=clip_and_step,
                 update=0):
    """One UM update (Def. 1, eq. 3): || u(t, x_t[, y]) - u_t(x_t | x1) ||^2, weighted as m asks; returns the
    loss as a tensor (no host sync). The hooks are RealUID's."""
    x0, t = noise_and_time(m, x1, y, draw)
    with torch.autocast(x1.device.type, torch.bfloat16, enabled=bf16):
        u = net(t, m.path(x0, x1, t), y).float()
    loss = weighted_mean(um_loss(u, m.target(x0, x1, t)), m.weight(t))
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    apply(0, optimiser, list(net.parameters()), loss, grad_clip, update)
    sched.step()
    for decay, ema_net in ema.items():
        ema_update(ema_net, net, decay)
    return loss.detach()


def train_teacher(cfg, data, device, path, ranks=None, state_path=None, resume=None, prog="teacher.py"):
    """Fit u(t, x_t[, y]) to the conditional target (Def. 1) of cfg's matching model; write the checkpoint to
    path and return the net. Under torchrun each rank takes its share of every batch and rank 0 writes.

    With state_path (teacher.py), the whole training state is saved there every cfg.save_every updates and when
    SIGINT or SIGTERM arrives (which then raises runtime.Stopped); resume, such a file's contents, continues it."""
    ranks = ranks or Ranks()
    torch.manual_seed(cfg.seed)
    spec = default_field_spec(data, cfg)
    net = build_field(spec).to(device).train()
    ema = {d: copy.deepcopy(net).eval().requires_grad_(False) for d in cfg.ema}
    optimiser = torch.optim.Adam(net.parameters(), lr=cfg.lr, fused=fused_adam(device))
    cosine_to = cfg.steps if cfg.lr_decay == "cosine" else 0  # over the last --decay-steps updates when given
    sched = torch.optim.lr_scheduler.LambdaLR(optimiser, warmup_schedule(
        cfg.warmup, cosine_to, max(cosine_to - cfg.decay_steps, 0) if cfg.decay_steps else 0))
    m = matching_model(matching_spec(cfg, data.recipe))
    if m.coupled != data.coupled:
        raise UsageError(f"--model {cfg.model} {'needs' if m.coupled else 'cannot use'} data-to-data pairs "
                         f"(--dataset pairs)")
    parts = dict(net=net, ema=ema, optimiser=optimiser, sched=sched)
    start = 0 if resume is None else restore(resume, device, **parts)
    bf16, guard = use_bf16(cfg.precision, device, spec), Guard(ranks, ["teacher"], device)
    supervise_teacher(lambda x1, y, update: teacher_step(net, optimiser, sched, ema, m, x1, y, cfg.grad_clip, bf16,
                                                         ranks.draw, guard, update),
                      cfg, data, device, path, ranks, guard, parts, start, dict(matching=m.spec(), field=spec),
                      state_path, lambda: teacher_grid(ema[min(ema)], f"EMA {min(ema)}", data, m, device,
                                                       cfg.sample_steps, path, sample_field), prog)
    return net


def load_field(path, what="teacher", ema=None, **kw):
    """(network with its weights loaded strictly, checkpoint)."""
    spec, sd, ckpt = read_field_checkpoint(path, what, ema, **kw)
    with refusing():
        net = build_field(spec)
    return load_state(net, sd, f"{what} {path}"), ckpt


def teacher_matching(cfg, ckpt, data, path):
    """The distillation's matching model: the teacher file's family with SiD's generator noise level and the top
    band where they apply (runtime.distill_matching_spec, which refuses a family the data or the loss cannot use)."""
    with refusing():
        return matching_model(distill_matching_spec(cfg, ckpt, data, path, SIGMA_INIT, HIGH_NOISE, T_INIT))


# =============================================================================
# The command line's config: Method and G's start (the teacher's, data's and run's flags and the recipes: runtime)
# =============================================================================

@dataclass
class Config(Method, DistillFlags):
    """realuid.py's flags: the method's (Method and here); the teacher's, the data's and the run's (device, output,
    logging, checkpoints, FID) in runtime.DistillFlags."""
    batch_size: int = opt(256, "batch size (generated and real halves each)")
    sigma_init: float = opt(None, "the noise level s/a at which G denoises as the teacher (SiD); default 2.5 for "
                                  "diffusion and low-dim flow matching (images: the paper's z + g(0, z))", type=float)
    high_noise: float = opt(None, "fm, vp, ve: the share of noise levels from [sigma_init / 5, sigma_init], where the "
                                  "modes' masses settle (else SiD's law); default 0.5 on 2D, 0 on images", type=float)
    t_init: float = opt(None, "si, bridge: G's time t_g (the teacher's step from it); 2D pairs 0.2, else 0", type=float)
    fake_init: str = opt("random", "the fake model's start: random or the teacher", choices=("random", "teacher"))
    init_generator: str = opt("", "fine-tune: start G from this distilled checkpoint's EMA, the fake from u*")
    init_ema: float = opt(None, "EMA decay to take from --init-generator (default: its raw generator)", type=float)
    regress: float = opt(0.0, "G's start: regression onto the teacher's 100-step samples for this share of --steps, "
                              "then the fake model from u* (0: u*'s one-step form; 2D 1/3, digits 8/3)", type=float)
    regress_lr: float = opt(1e-3, "the regression's own lr (distillation after it takes --lr)")
    regress_weight: float = opt(0.0, "DMD's regression loss on the start's pairs, kept in G's loss at this weight")
    regress_pairs: int = opt(0, "the regression's teacher samples: a batch per 10 of its updates, at most this many "
                                "(0: 50 batches; digits 6400)")


SIGMA_INIT = 2.5  # SiD's: the generator's noise level, and the highest one distillation sees
HIGH_NOISE = 0.5  # low-dim data: the share of distillation's draws in the top band (below_sigma_init)
T_INIT = 0.2  # 2D pairs: at t_g = 0 the first updates pile every z onto one neighbour (matching-models.md)
FLAG_GROUPS = (("the method (eq. 16, Algorithm 1, App. A and D)",  # Method's and Config's own, in their order
                [f.name for f in fields(Config) if f.name not in {g.name for g in fields(DistillFlags)}]),
    ("the teacher", TEACHER_FLAGS), ("data", DATA_FLAGS), ("model selection and the closing scores", SELECTION_FLAGS))


# =============================================================================
# Main: the CLI, generated from Config; parsing happens only here
# =============================================================================

def main(argv=None):
    from tqdm import tqdm
    user = vars(parser_from_dataclass(Config, "RealUID distillation of a matching-model teacher into a one-step "
                                              "generator (Kornilov et al., ICLR 2026).", "realuid.py",
                                      FLAG_GROUPS).parse_args(argv))
    created = None
    try:
        resume, cfg, data = distill_config(Config, user, check_coefficients)
        ranks, device, out, created = open_run(cfg, data)
        say = print if ranks.main else lambda *a: None
        torch.manual_seed(cfg.seed)
        teacher, teacher_ckpt = prepare_teacher(cfg, data, out, device, ranks, train_teacher, load_field)
        matching = teacher_matching(cfg, teacher_ckpt, data, cfg.teacher or os.path.join(out, "teacher.pt"))
        spec = dict(teacher_ckpt["field"])  # the generator and the fake model train without dropout (App. D)
        spec |= dict(dropout=0.0) if spec.get("type") == "unet" else {}
        g = load_state(build_field(spec), teacher.state_dict(), "teacher")  # G_theta starts as u*'s one-step form
        if cfg.init_generator:  # fine-tuning (App. D.2): G from a distilled EMA, the fake model from u*
            _, sd, _ = read_field_checkpoint(cfg.init_generator, "--init-generator", cfg.init_ema)
            load_state(g, sd, f"--init-generator {cfg.init_generator}")
        torch.manual_seed(cfg.seed + 1)
        fake = build_field(spec)
        regress = 0 if resume is not None else round(cfg.regress * cfg.steps)  # a resumed run restores G
        if cfg.fake_init == "teacher" or cfg.init_generator or regress:  # G then samples about u*'s law
            fake.load_state_dict(teacher.state_dict())
        place([teacher, fake, g], device, cfg.channels_last and spec["type"] == "unet", cfg.compile)
        if regress:  # before RealUID copies G into its EMAs
            say(f"realuid: G's start, {regress} updates of regression onto the teacher's 100-step samples")
            loss, pairs = regression_start(OneStepGenerator(g, matching), teacher, tuple(data.shape()), regress,
                                           cfg.batch_size, cfg.regress_lr, device,
                                           data.num_classes if cfg.cond else None, cfg.seed, cfg.regress_pairs,
                                           lambda steps, what: tqdm(steps, desc=f"G's start: {what}", leave=False,
                                                                    disable=not ranks.main or None))
            say(f"realuid: G's start regressed (mean squared error {loss:.4f})")
        elif cfg.regress_weight:  # resumed: the same pairs drawn again
            pairs = regression_pairs(matching, teacher, tuple(data.shape()), round(cfg.regress * cfg.steps),
                                     cfg.batch_size, device, data.num_classes if cfg.cond else None, cfg.seed,
                                     cfg.regress_pairs)[0]
        start = copy.deepcopy(g) if regress else None if resume is not None and cfg.regress else teacher  # resumed
        guard = Guard(ranks, ["fake model" + (" or discriminator" if cfg.gan else ""), "generator"], device)
        with refusing():  # the method's own checks (the GAN head's feature size)
            state = RealUID(cfg, teacher, fake, g, matching, spec, use_bf16(cfg.precision, device, spec),
                            ranks.draw, guard)
        state.start, state.regress_weight = start, cfg.regress_weight  # the closing table's; the anchor's
        state.pairs = pairs if cfg.regress_weight else None
        meta = dict(data=data.info(cfg.dataset), field=spec, matching=matching.spec())
        scorer = None
        if cfg.fid_every:  # built before training, so that a missing download fails now, not after hours
            scorer = ModelSelection(cfg, data, out, device, meta, matching, generate, load_field,
                                    resumed=resume is not None, ranks=ranks)
        if resume is not None:  # after the scorer: building its feature network draws from the RNG restored here
            state.step = restore(resume, device, **distill_parts(state))
            stale_temporaries(out)
            rewind_metrics(out, state.step)
    except (UsageError, Diverged) as e:  # Diverged: a teacher trained on the spot
        return failed("realuid.py", e, created)
    if ranks.main:
        save_json(config_dict(cfg), os.path.join(out, "arguments.json"))
    world = f" x {ranks.world} ranks" if ranks.world > 1 else ""
    say(f"realuid: {state.name} on {cfg.dataset} ({len(data)} items), alpha={cfg.alpha} beta={cfg.beta} K={cfg.K}, "
        f"updates {state.step}..{cfg.steps} on {device}{world}, {'bf16' if state.bf16 else 'fp32'}, "
        f"{count_parameters(g)} generator parameters -> {out}")
    t0 = time.time()
    grids = grid_writer(out, data, device, generate) if data.kind == "image" else None
    try:
        stopped = supervise(distill, state, batches(data, cfg.batch_size, device, cfg.seed, state.step, cfg.workers,
                                                    ranks), out, meta, grids, scorer)
    except (UsageError, Diverged, OSError) as e:  # OSError: the closing save found no space, after its retries
        undo = created if isinstance(e, UsageError) else None  # a failed run keeps its logs
        return failed("realuid.py", e, undo, (checkpoints_in(out) or [None])[-1])
    if stopped:
        return stopped_by(stopped, state.step, "checkpoint saved", out, say)
    say(f"distillation took {time.time() - t0:.0f} s; checkpoints in {out}")
    if ranks.main:
        closing_report(state, data, cfg, out, device, generate, load_field, scorer)
    return 0


if __name__ == "__main__":
    sys.exit(finish(main()))
