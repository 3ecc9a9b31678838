"""JeDi's diffusion core: schedule, forward noising, the training loss (eq. 2), samplers, and
personalization as inpainting (replacement trick + image guidance, eq. 3). Not inside the UNet.

Conventions (one for the whole project):
- integer timesteps t in [0, T-1], T = 1000; `alphas_cumprod[t]` is ᾱ_t of the noised x_t.
- images are flat over sets, `(B·N, C, h, w)`, the N images of a set consecutive; the UNet gets `set_size=N`.
- the UNet input is `[x_t, reference, mask]` (model/unet.py): mask = 1 where the image's clean latent is given.
- a model predicts `eps` (SD-1.4, the paper) or `v` (v = √ᾱ·ε − √(1−ᾱ)·x0, used by the toy config).
- text conditioning is a `model.conditioning.Cond` (context, optional SDXL vector y), or a bare (B, L, D) context
  tensor for SD-1.x; dropped, repeated and concatenated whole, so y follows the context everywhere.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .conditioning import Cond, as_cond


def make_alphas_cumprod(kind: str = "scaled_linear", T: int = 1000, beta_start: float = 0.00085,
                        beta_end: float = 0.012) -> torch.Tensor:
    """ᾱ_t, float64, shape (T,). 'scaled_linear' is SD's schedule (CompVis calls it 'linear')."""
    if kind == "scaled_linear":
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
    elif kind == "linear":  # DDPM's
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    elif kind == "cosine":  # Nichol & Dhariwal; betas clipped at 0.999 so ᾱ_{T-1} stays > 0
        s, steps = 0.008, torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    else:
        raise ValueError(f"unknown schedule {kind!r} (scaled_linear, linear, cosine)")
    return torch.cumprod(1 - betas, dim=0)


@dataclass
class Diffusion:
    """Noise schedule + parameterisation. `Diffusion()` is SD-1.4: scaled-linear, 1000 steps, eps-prediction."""

    schedule: str = "scaled_linear"
    num_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction: str = "eps"

    def __post_init__(self):
        if self.prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', not {self.prediction!r}")
        self.alphas_cumprod = make_alphas_cumprod(self.schedule, self.num_timesteps, self.beta_start, self.beta_end)
        self._on_device = {}

    def _ab(self, t, x):
        """ᾱ_t as (len(t), 1, 1, 1) in x's dtype/device."""
        table = self._on_device.get(x.device)
        if table is None:  # one host-to-device copy per device, not one per call
            table = self._on_device[x.device] = self.alphas_cumprod.to(x.device)
        ab = table[t.to(x.device).long()]
        return ab.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))  # (B·N,) -> (B·N, 1, 1, 1): one ᾱ per image

    def q_sample(self, x0, t, noise):
        ab = self._ab(t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def target(self, x0, noise, t):
        if self.prediction == "eps":
            return noise
        ab = self._ab(t, x0)
        return ab.sqrt() * noise - (1 - ab).sqrt() * x0

    def to_eps_x0(self, x_t, t, out):
        """Model output -> (ε, x0)."""
        ab = self._ab(t, x_t)
        if self.prediction == "eps":
            eps = out
            x0 = (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()
        else:
            eps = ab.sqrt() * out + (1 - ab).sqrt() * x_t
            x0 = ab.sqrt() * x_t - (1 - ab).sqrt() * out
        return eps, x0


# ----------------------------------------------------------------------------- training (eq. 2)

def jedi_input(x_t, reference, mask):
    """UNet input (B·N, 2C+1, h, w) = [x_t, reference ⊙ mask, mask]; mask: (B·N,) with 1 = reference given."""
    return torch.cat([x_t, jedi_channels(reference, mask)], dim=1)


def jedi_channels(reference, mask):
    """The input channels after x_t: (B·N, C+1, h, w) = [reference ⊙ mask, mask], in the reference's dtype."""
    m = mask.to(reference.dtype).reshape(-1, 1, 1, 1)  # (B·N,) -> (B·N, 1, 1, 1)
    return torch.cat([reference * m, m.expand(-1, 1, *reference.shape[2:])], dim=1)


def jedi_loss(unet, diffusion: Diffusion, x0, context, null_context, set_size: int, p_ref: float = 0.5,
              p_drop: float = 0.1, p_drop_text: float = 0.0, ref_loss_weight: float = 1.0, generator=None):
    """The JeDi training loss (eq. 2) on a batch of sets.

    x0: (B·N, C, h, w) clean latents; context: (B·N, L, D) text states or a Cond; null_context: the same for "",
    one row or B·N rows (a dropped row takes null's context AND y).
    Per image a reference flag ~ Bernoulli(p_ref). Per set, with p_drop the text becomes "" AND every reference
    is zeroed while the mask stays (ε⁰ of eq. 3); with p_drop_text only the text is dropped (for 3-pass guidance).
    One t per set, as for one joint sample. ref_loss_weight weighs the loss on images given as reference
    (1 = the paper's plain MSE over the whole set). Returns the scalar loss.
    """
    BN, dev = x0.shape[0], x0.device
    B = BN // set_size
    rand = lambda *s: torch.rand(*s, generator=generator, device=dev)  # noqa: E731
    t = torch.randint(0, diffusion.num_timesteps, (B,), generator=generator, device=dev).repeat_interleave(set_size)
    noise = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype)
    mask = rand(BN) < p_ref  # (B·N,)
    u = rand(B).repeat_interleave(set_size)  # one draw per set: joint drop | text-only drop | keep
    drop_all, drop_text = u < p_drop, (u >= p_drop) & (u < p_drop + p_drop_text)
    cond = as_cond(context).where(drop_all | drop_text, as_cond(null_context))  # context and y dropped together
    reference = x0 * (~drop_all).to(x0.dtype).reshape(-1, 1, 1, 1)  # keep flag (B·N,) -> (B·N, 1, 1, 1)
    x_t = diffusion.q_sample(x0, t, noise)
    out = unet(jedi_input(x_t, reference, mask), t, cond.unet_arg(), set_size=set_size)
    per_image = F.mse_loss(out.float(), diffusion.target(x0, noise, t).float(), reduction="none").mean(dim=(1, 2, 3))
    w = torch.where(mask, ref_loss_weight, 1.0)
    return (per_image * w).sum() / w.sum().clamp_min(1e-8)  # a set of only references may weigh 0


@torch.no_grad()
def reference_errors(unet, diffusion: Diffusion, x0, context, t: int, noise):
    """Squared errors of image 1 of each set of 2 (x0: (B·2, C, h, w), image 0 the reference; context: (B·2, L, D)
    or a Cond)
    at timestep t with the given noise (B·2, C, h, w): with its own set's reference and with another set's (in x_t
    and in the reference channels alike). Returns (own, other), each (B, C, h, w) float32."""
    B2, dev = x0.shape[0], x0.device
    sets = x0.reshape(B2 // 2, 2, *x0.shape[1:])  # (B·2, C, h, w) -> (B, 2, C, h, w)
    swapped = torch.stack([sets[:, 0].roll(1, 0), sets[:, 1]], 1).reshape(x0.shape)  # references of other sets
    mask = torch.tensor([True, False], device=dev).repeat(B2 // 2)  # (B·2,): image 0 of each set
    tt = torch.full((B2,), t, device=dev)
    target = diffusion.target(x0, noise, tt).float()
    c = as_cond(context).unet_arg()
    out = [unet(jedi_input(diffusion.q_sample(x, tt, noise), x, mask), tt, c, set_size=2) for x in (x0, swapped)]
    return tuple((o.float() - target)[~mask].square() for o in out)


@torch.no_grad()
def reference_gain_sums(unet, diffusion: Diffusion, x0, context, generator=None, timesteps=(300, 500, 700, 900)):
    """Does the model use its references? `reference_errors` summed over images, pixels and `timesteps` (one noise
    draw each). Returns a (2,) float64 tensor [own, other]; the reference gain is 1 - own / other (0: unused)."""
    sums = torch.zeros(2, dtype=torch.float64, device=x0.device)
    for tv in timesteps:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        own, other = reference_errors(unet, diffusion, x0, context, tv, noise)
        sums += torch.stack([own.sum(), other.sum()]).double()
    return sums


# ----------------------------------------------------------------------------- sampling

def randn(shape, generator=None, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """N(0, I) noise of `shape` (S·N, ...). generator: one torch.Generator, or a list of S, one per set, each drawing
    its own set's N rows: then a set's noise is the same whichever sets are sampled beside it."""
    if not isinstance(generator, (list, tuple)):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    rows = shape[0] // len(generator)
    return torch.cat([torch.randn((rows, *shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])


def spaced_timesteps(steps: int, T: int = 1000) -> list[int]:
    """The `steps` timesteps every sampler visits, high to low, spaced as CompVis' DDIM does (uniform "leading"
    spacing + 1): range(0, T, T // steps) + 1, so 981 ... 1 for 50 steps."""
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}]")
    ts = [i * (T // steps) for i in range(steps)]  # exactly `steps` of them, even when steps does not divide T
    if steps < T:  # the +1 offset; with every step (c = 1) it would index past T-1
        ts = [t + 1 for t in ts]
    return ts[::-1]


def ddim_step(diffusion, x, t, t_prev, eps, x0, eta, generator):
    """One DDIM update x_t -> x_{t_prev} (t_prev = -1 means ᾱ = ᾱ_0 as in CompVis' last step)."""
    ab = diffusion.alphas_cumprod[t].item()
    ab_prev = diffusion.alphas_cumprod[max(t_prev, 0)].item()
    sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    x = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0)) * eps
    if sigma > 0:
        x = x + sigma * randn(x.shape, generator, x.device, x.dtype)
    return x


# Samplers, k-diffusion style: sample_<name>(model_fn, diffusion, x, timesteps, ...) runs the whole loop from the
# noise x over `timesteps` (high to low). model_fn(x_t, t: int) -> (ε, x0) for the whole batch, guidance inside;
# replace(x_t, t) -> x_t with the known images swapped for noised references (RePaint-style), or None.

def sample_ddim(model_fn, diffusion: Diffusion, x, timesteps, *, eta: float = 0.0, generator=None, replace=None,
                progress=None):
    """DDIM (Song et al.): deterministic at η = 0, ancestral at η = 1 (fresh noise from `generator` each step)."""
    for i, t in enumerate(progress(timesteps) if progress else timesteps):
        if replace is not None:
            x = replace(x, t)
        eps, x0 = model_fn(x, t)
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        x = ddim_step(diffusion, x, t, t_prev, eps, x0, eta, generator)
    return x


def sample_dpmpp_2m(model_fn, diffusion: Diffusion, x, timesteps, *, replace=None, progress=None):
    """DPM-Solver++ 2M (Lu et al. 2022), multistep on the data prediction in log-SNR λ; deterministic, good at
    10-25 steps."""
    ab = diffusion.alphas_cumprod
    prev_x0, prev_lam = None, None
    for i, t in enumerate(progress(timesteps) if progress else timesteps):
        if replace is not None:
            x = replace(x, t)
        _, x0 = model_fn(x, t)
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        a_s, s_s = math.sqrt(ab[t]), math.sqrt(1 - ab[t])
        lam_s = math.log(a_s / s_s)
        if t_prev < 0:  # final step to the clean image: σ=0, so the update is the data prediction itself
            x = x0
        else:
            a_t, s_t = math.sqrt(ab[t_prev]), math.sqrt(1 - ab[t_prev])
            h = math.log(a_t / s_t) - lam_s
            d = x0
            if prev_x0 is not None:  # second order: extrapolate the data prediction in λ
                r = (lam_s - prev_lam) / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
            x = (s_t / s_s) * x - a_t * math.expm1(-h) * d
        prev_x0, prev_lam = x0, lam_s
    return x


SAMPLERS = ("ddim", "dpmpp_2m")


def sample(model_fn, diffusion: Diffusion, shape, *, steps: int = 50, sampler: str = "ddim", eta: float = 0.0,
           generator=None, device="cpu", dtype=torch.float32, replace=None, progress=None):
    """Draw x_T ~ N(0, I) of `shape` from `generator` and run `sampler` ('ddim' with η, or 'dpmpp_2m') over
    `steps` spaced timesteps. model_fn and replace as for the sample_* functions above."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r} ({', '.join(SAMPLERS)})")
    x = randn(shape, generator, device, dtype)
    ts = spaced_timesteps(steps, diffusion.num_timesteps)
    if sampler == "ddim":
        return sample_ddim(model_fn, diffusion, x, ts, eta=eta, generator=generator, replace=replace,
                           progress=progress)
    return sample_dpmpp_2m(model_fn, diffusion, x, ts, replace=replace, progress=progress)


def batch_passes(passes):
    """Guidance passes [(extra input channels (B, c, h, w) or None, conditioning of B rows: a Cond or a (B, L, D)
    context), ...] joined once per sampling run, not once per step: (k, extra channels (k·B, c, h, w) or None,
    Cond of k·B rows). Every pass has extra channels or none has."""
    extras = [extra for extra, _ in passes]
    if any(e is None for e in extras) and not all(e is None for e in extras):
        raise ValueError("batch_passes: every guidance pass has extra input channels or none has")
    extra = None if extras[0] is None else torch.cat(extras)  # k × (B, c, h, w) -> (k·B, c, h, w)
    return len(passes), extra, Cond.cat([as_cond(c) for _, c in passes])  # context (k·B, L, D), y (k·B, adm)


def _passes(unet, x, t: int, batched, *, set_size: int = 1, dtype: torch.dtype | None = None):
    """The one batcher of guidance passes: one UNet call over `batch_passes(...)`'s k passes -> one fp32 output
    (B, C, h, w) per pass, in order; every pass sees the same x_t, with its extra channels appended. Whole sets of
    `set_size` images stay together (B is a multiple of it).
    dtype: the UNet input's (the model's; None: x's own). Only the input is cast: the caller's x_t stays as it is,
    and the outputs come back fp32 because guidance, s·(cond − uncond), magnifies bf16 error."""
    k, extra, cond = batched
    x = x if dtype is None else x.to(dtype)
    inp = x.repeat(k, 1, 1, 1)  # (B, C, h, w) -> (k·B, C, h, w), pass-major like `extra` and `cond`
    if extra is not None:
        inp = torch.cat([inp, extra.to(inp.dtype)], dim=1)  # (k·B, C + c, h, w)
    tt = torch.full((inp.shape[0],), t, device=x.device, dtype=torch.long)
    out = unet(inp, tt, cond.unet_arg(), set_size=set_size)  # (k·B, C', h, w) in -> (k·B, C, h, w)
    return out.float().chunk(k)  # k × (B, C, h, w)


# Image guidance λ (eq. 3) when neither the caller nor the checkpoint gives one (the one default: sample.py's
# resolver and the benchmarks import it). The paper gives no value; λ = 3 is what the toy ships with and was
# benchmarked at (config/toy.py, docs/toy.md), while λ = 6 over-saturated it (REFERENCE.md). train.py stores its
# own in every export.
DEFAULT_GUIDANCE = 3.0


def personalize(unet, diffusion: Diffusion, *, refs, context, null_context, num_new: int, num_sets: int = 1,
                steps: int = 50, guidance: float = DEFAULT_GUIDANCE, text_guidance: float | None = None,
                sampler: str = "ddim", eta: float = 0.0, generator=None, progress=None, latent_shape=None):
    """Generate `num_new` images per set that share the subject of `refs` (personalization as inpainting, §3.3).

    refs: (n, C, h, w) clean reference latents, n >= 0 (n = 0: a same-subject set from text alone, Fig. 2b).
    context: (n + num_new, L, D) text states or a Cond of n + num_new rows, the references' captions first;
    null_context: the same for "", one row or n + num_new (SDXL: y keeps each image's size features).
    Each set is [refs..., new...]; `num_sets` sets are drawn at once with independent noise (generator: one, or
    a list of num_sets, one per set: see randn).
    guidance λ (eq. 3): ε̃ = ε⁰ + λ(ε(x_t, x̂, M) − ε⁰), ε⁰ = ε(x_t, 0, M) with text "": two passes in one call.
    text_guidance s_T (beyond the paper, 3 passes): ε⁰ + λ(ε(x̂, "") − ε⁰) + s_T(ε(x̂, text) − ε(x̂, "")); needs a
    model trained with text-only dropout (train.py p_drop_text > 0).
    The UNet runs in the context's dtype (the model's: its text encoder made it); x_t, the references, the guidance
    combination and the sampler update stay fp32, so bf16 rounding enters once per step, not into the state.
    Returns (num_sets·N, C, h, w) fp32 latents, references in place (exactly the given latents).
    """
    n = 0 if refs is None else refs.shape[0]
    N = n + num_new
    if latent_shape is None:
        latent_shape = tuple(refs.shape[1:])
    context = as_cond(context)
    dev, unet_dtype = context.device, context.dtype
    mask = torch.zeros(N, device=dev)
    mask[:n] = 1
    mask = mask.repeat(num_sets)  # (S·N,)
    ref_full = torch.zeros(num_sets, N, *latent_shape, device=dev)  # fp32 state, like x_t
    if n:
        ref_full[:, :n] = refs.to(dev, torch.float32)
    ref_full = ref_full.reshape(num_sets * N, *latent_shape)  # (S, N, C, h, w) -> (S·N, C, h, w)
    known = mask.bool().reshape(-1, 1, 1, 1)  # (S·N,) -> (S·N, 1, 1, 1)
    ctx = context.repeat(num_sets)  # (N, L, D) -> (S·N, L, D), y likewise
    null = as_cond(null_context)  # "" for every image: one row (a view) or one per image of a set
    null = null.expand(len(ctx)) if len(null) == 1 else null.expand(N).repeat(num_sets)
    given = jedi_channels(ref_full, mask).to(unet_dtype)  # (S·N, C+1, h, w): [x̂ ⊙ M, M], the same every step
    blank = jedi_channels(torch.zeros_like(ref_full), mask).to(unet_dtype)  # [0, M]: references zeroed, mask kept

    passes = [(given, ctx), (blank, null)]  # conditional, ε⁰
    if text_guidance is not None:
        passes.append((given, null))  # ε(x̂, "")
    batched = batch_passes(passes)  # joined once: every step's UNet call reuses them

    def model_fn(x, t):
        out = _passes(unet, x, t, batched, set_size=N, dtype=unet_dtype)
        # Guidance is linear and every pass sees the same x_t, so guiding the raw output (ε or v) equals guiding ε,
        # and converting once afterwards stays stable where ᾱ_t -> 0 (v-prediction, cosine schedule).
        guided = guide(out[0], out[1], guidance, None if text_guidance is None else (out[2], text_guidance))
        tt = torch.full((x.shape[0],), t, device=dev, dtype=torch.long)
        return diffusion.to_eps_x0(x, tt, guided)

    def replace(x, t):
        if not n:
            return x
        tt = torch.full((x.shape[0],), t, device=dev, dtype=torch.long)
        noise = randn(x.shape, generator, dev, x.dtype)  # fresh noise every step
        return torch.where(known, diffusion.q_sample(ref_full, tt, noise), x)

    x = sample(model_fn, diffusion, (num_sets * N, *latent_shape), steps=steps, sampler=sampler, eta=eta,
               generator=generator, device=dev, dtype=torch.float32, replace=replace, progress=progress)
    return torch.where(known, ref_full, x)  # references exactly as given


def guide(eps_cond, eps_null, scale: float, text=None):
    """Image guidance (eq. 3); with text=(ε(x̂, ""), s_T) the three-pass variant. Works on ε or v outputs alike."""
    if text is None:
        return eps_null + scale * (eps_cond - eps_null)
    eps_ref_only, s_t = text
    return eps_null + scale * (eps_ref_only - eps_null) + s_t * (eps_cond - eps_ref_only)


# ----------------------------------------------------------------------------- plain SD-1.x checkpoints as model_fn's
# The S³ data engine (s3.py) drives three kinds of single-image SD-1.x UNets through `sample`: text-to-image, the
# inpainting checkpoints and InstructPix2Pix. Each wrapper below is a model_fn(x_t, t) -> (ε, x0) that evaluates
# all of its guidance passes in one batched UNet call (`_passes`, as personalize does; set_size=1: no coupled
# attention) and combines them with guide().

def text_guided(unet, diffusion: Diffusion, context, null_context, guidance: float):
    """Text-to-image with classifier-free guidance: ε(∅) + s·(ε(T) − ε(∅)). context (B, L, D) or a Cond; null the
    same for "", one row or B."""
    return _text_cfg(unet, diffusion, None, context, null_context, guidance)


def _text_cfg(unet, diffusion: Diffusion, extra, context, null_context, guidance: float):
    """model_fn of classifier-free text guidance (guide's two-pass form), both passes with the same extra input
    channels (None for plain text-to-image)."""
    context = as_cond(context)
    null = as_cond(null_context).expand(len(context))
    batched = batch_passes([(extra, context), (extra, null)])

    def model_fn(x, t):
        cond, uncond = _passes(unet, x, t, batched)
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        return diffusion.to_eps_x0(x, tt, guide(cond, uncond, guidance))
    return model_fn


def inpaint_guided(unet, diffusion: Diffusion, mask, masked_latent, context, null_context, guidance: float):
    """SD inpainting with classifier-free guidance on the text; both passes see the same mask and masked image.
    The UNet input is (B, 9, h, w) in the inpainting checkpoints' own order [x_t (4), mask (1), masked-image
    latent (4)], not JeDi's [x_t, reference, mask].

    mask: (B, 1, h, w) at latent size, 1 = repaint; masked_latent: (B, 4, h, w) VAE latent of the image with the
    repainted region set to 0 (the checkpoints' training convention), scaled by the VAE scale factor."""
    cond_channels = torch.cat([mask, masked_latent], dim=1)  # (B, 5, h, w), appended after x_t
    return _text_cfg(unet, diffusion, cond_channels, context, null_context, guidance)


def ip2p_guided(unet, diffusion: Diffusion, source_latent, context, null_context, text_guidance: float,
                image_guidance: float):
    """InstructPix2Pix: UNet input (B, 8, h, w) = [x_t (4), source-image latent (4)], two guidance scales:
        ε(∅,∅) + s_I·(ε(I,∅) − ε(∅,∅)) + s_T·(ε(I,T) − ε(I,∅))
    source_latent: (B, 4, h, w) the VAE posterior mode of the source image, NOT scaled by the VAE scale factor
    (how the checkpoints were trained); context: (B, L, D) the instruction's text states (or a Cond)."""
    context = as_cond(context)
    null = as_cond(null_context).expand(len(context))
    batched = batch_passes([(source_latent, context), (source_latent, null), (torch.zeros_like(source_latent), null)])

    def model_fn(x, t):
        e_it, e_i, e_0 = _passes(unet, x, t, batched)
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        # guide's three-pass form: the image plays the reference, the instruction the text
        return diffusion.to_eps_x0(x, tt, guide(e_it, e_0, image_guidance, text=(e_i, text_guidance)))
    return model_fn
