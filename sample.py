"""Personalized text-to-image generation with JeDi: new images of the subject in your reference images.

    python sample.py --refs dog1.jpg dog2.jpg --prompt "a dog on the beach" "a dog in the snow"
    python sample.py --prompt "a toy on the beach" "a toy in a forest"       # no refs: a same-subject set from text

Personalization is inpainting (paper §3.3): each set is [references..., one new image per prompt]; at every step
the references' x_t are replaced by freshly noised references, and image guidance (eq. 3) mixes the conditional
prediction with ε⁰ (text "" and references zeroed, mask kept), both in one batched UNet call.
Without --ckpt the small model shipped in assets/ is used (see config/toy.py).
"""
import argparse
import os
import sys
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

import data
from model.diffusion import SAMPLERS, personalize
from model.loading import CheckpointError, JeDi, load_jedi, load_sd

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CKPT = os.path.join(HERE, "assets", "jedi_toy.safetensors")


class UserError(Exception):
    """Bad input: reported as one line and a non-zero exit."""


# ----------------------------------------------------------------------------- model

def load_model(ckpt: str | None = None, device="cpu", num_heads: int = 8) -> JeDi:
    """A JeDi checkpoint (train.py's export) or, for experiments, an original SD-1.x checkpoint (its reference
    channels start at zero, so it ignores references until trained). None: the shipped toy model."""
    path = ckpt or DEFAULT_CKPT
    if not os.path.exists(path):
        hint = "" if ckpt else " (the default toy checkpoint is missing from assets/; pass --ckpt)"
        raise UserError(f"checkpoint not found: {path}{hint}")
    try:
        if os.path.isdir(path) or not path.endswith(".safetensors") or not _has_jedi_meta(path):
            warnings.warn("an original SD checkpoint is not JeDi-trained: its reference and mask input channels are zero")
            model = load_sd(path, num_heads=num_heads, device=device)
        else:
            model = load_jedi(path, device=device)
    except CheckpointError as e:
        raise UserError(str(e).replace("\n", " ")) from None
    c = model.unet.config
    if c.in_channels != 2 * c.out_channels + 1:
        raise UserError(f"the checkpoint's UNet takes {c.in_channels} input channels, not JeDi's "
                        f"[x_t, reference, mask] = {2 * c.out_channels + 1}: not a JeDi model")
    if torch.device(device).type == "cuda":
        # NHWC weights: cuDNN runs the convolutions without NCHW<->NHWC transposes around each one
        # (H200, 512 px set of 4, eager: 58.7 -> 52.1 ms per UNet call; bench/results/2026-11-27-h200-run1).
        model.unet.to(memory_format=torch.channels_last)
    return model


def _has_jedi_meta(path: str) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return "jedi" in (f.metadata() or {})
    except Exception:
        raise UserError(f"{path}: not a readable safetensors file") from None


# ----------------------------------------------------------------------------- images

def load_image(path: str, resolution: int) -> torch.Tensor:
    """Any size or mode (RGBA, grayscale, 16-bit, palette, EXIF-rotated) -> (3, R, R) RGB in [-1, 1],
    center-cropped to a square and resized."""
    return image_to_tensor(open_image(path), resolution)


def open_image(path: str) -> Image.Image:
    """Read an image file with the project's one reader (data.load_image: upright, alpha onto white, 16-bit and
    CMYK handled) as RGB; a missing or unreadable file is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"reference image not found: {path}")
    try:
        return data.load_image(path)
    except (UnidentifiedImageError, OSError, data.BadSample) as e:
        raise UserError(f"cannot read {path} as an image ({e.__class__.__name__})") from None


def image_to_tensor(img: Image.Image, resolution: int) -> torch.Tensor:
    """PIL -> center square crop -> (3, R, R) in [-1, 1]."""
    img = img.convert("RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    img = img.resize((resolution, resolution), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    return x / 127.5 - 1


def to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> PIL RGB."""
    a = ((x.float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(a)


def make_grid(rows: list[list[Image.Image]], pad: int = 2) -> Image.Image:
    w, h = rows[0][0].size
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (cols * (w + pad) + pad, len(rows) * (h + pad) + pad), (255, 255, 255))
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            grid.paste(im, (pad + j * (w + pad), pad + i * (h + pad)))
    return grid


# ----------------------------------------------------------------------------- generation

def generate(model: JeDi, ref_images: list, prompts: list[str], *, ref_prompt: str | list[str] | None = None,
             num_sets: int = 1, steps: int = 50, guidance: float = 5.0, text_guidance: float | None = None,
             sampler: str = "ddim", eta: float = 0.0, seed: int = 0, max_set_size: int = 8,
             progress: bool = False) -> list[list[Image.Image]]:
    """New images of the references' subject, one per prompt, for `num_sets` independent sets.

    ref_images: paths, PIL images or (3, R, R) tensors in [-1, 1]; may be empty (text-only joint generation).
    ref_prompt: caption of the references, one for all or a list with one per reference (default: the first prompt).
    Sets larger than max_set_size are split into chunks of prompts, each with all references.
    Returns num_sets lists of len(prompts) PIL images. Same seed, same images.
    """
    if not prompts:
        raise UserError("give at least one --prompt")
    refs = [_as_tensor(r, model.resolution) for r in ref_images]
    n = len(refs)
    room = max_set_size - n
    if room < 1:
        raise UserError(f"{n} references leave no room in a set of at most {max_set_size} images "
                        f"(raise --max_set_size if memory allows; JeDi was trained on sets of 2-4)")
    if not n and len(prompts) > max_set_size:
        raise UserError(f"without references all {len(prompts)} prompts must share one set, but the set size is "
                        f"capped at {max_set_size} (raise --max_set_size or give fewer prompts)")
    ref_prompts = [prompts[0] if ref_prompt is None else ref_prompt] * n if not isinstance(ref_prompt, list) else ref_prompt
    if len(ref_prompts) != n:
        raise UserError(f"{len(ref_prompts)} reference prompts for {n} references")
    ref_latents = model.to_latents(torch.stack(refs)) if n else None
    r = model.resolution // model.down
    latent_shape = (model.channels, r, r)
    null = model.encode_text([""])
    gen = torch.Generator(device=model.device).manual_seed(seed)
    out = [[] for _ in range(num_sets)]
    for start in range(0, len(prompts), room):
        chunk = prompts[start : start + room]
        context = model.encode_text(ref_prompts + chunk)  # (n + K, 77, D)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = lambda ts: tqdm(ts, desc=f"sampling {num_sets}x[{n} refs + {len(chunk)}]", leave=False)  # noqa: E731
        with torch.no_grad():
            z = personalize(model.unet, model.diffusion, refs=ref_latents, context=context, null_context=null,
                            num_new=len(chunk), num_sets=num_sets, steps=steps, guidance=guidance,
                            text_guidance=text_guidance, sampler=sampler, eta=eta, generator=gen, progress=bar,
                            latent_shape=latent_shape)
            N = n + len(chunk)
            new = z.reshape(num_sets, N, *latent_shape)[:, n:]  # (S·N, ...) -> (S, N, ...), drop the references
            R = model.resolution
            pixels = model.to_pixels(new.reshape(-1, *latent_shape)).reshape(num_sets, len(chunk), 3, R, R)
        for s in range(num_sets):
            out[s].extend(to_pil(p) for p in pixels[s])
    return out


def _as_tensor(r, resolution):
    if isinstance(r, torch.Tensor):
        return r
    return image_to_tensor(r if isinstance(r, Image.Image) else open_image(str(r)), resolution)


# ----------------------------------------------------------------------------- CLI

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--refs", nargs="*", default=[], help="reference images of the subject (zero or more; any size "
                   "or mode, center-cropped and resized to the model's resolution)")
    p.add_argument("--prompt", nargs="+", required=True, help="one or more prompts; each set gets one new image per "
                   "prompt, generated jointly (so without --refs they share one subject)")
    p.add_argument("--ref_prompt", nargs="+", default=None, help="caption of the reference images: one for all, or one "
                   "per reference (default: the first --prompt)")
    p.add_argument("--num", type=int, default=1, help="independent sets to draw (each: one image per prompt)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the checkpoint's, else 50)")
    p.add_argument("--guidance", type=float, default=None, help="image guidance λ of eq. 3 (text and references "
                   "together; 1 = no guidance; default: the checkpoint's, else 5)")
    p.add_argument("--text_guidance", type=float, default=None, help="optional separate text scale: 3 passes, "
                   "ε⁰ + λ(ε(refs, \"\") − ε⁰) + s(ε(refs, text) − ε(refs, \"\")); needs a model trained with "
                   "p_drop_text > 0")
    p.add_argument("--sampler", default=None, choices=SAMPLERS, help="DDIM or DPM-Solver++ 2M (same "
                   "quality in ~20 steps); default: the checkpoint's, else ddim")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM η (0 deterministic, 1 ancestral)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same images")
    p.add_argument("--ckpt", default=None, help="JeDi checkpoint (.safetensors from train.py); default: the toy "
                   "model in assets/. An original SD-1.x .ckpt/.safetensors/diffusers folder also loads (text only)")
    p.add_argument("--out", default="samples", help="output folder: one PNG per image and grid.png")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu (default: "
                   "cuda when available)")
    p.add_argument("--max_set_size", type=int, default=8, help="images per set at most (refs + new); more prompts "
                   "are split into chunks that each contain all references")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.num < 1:
            raise UserError("--num must be at least 1")
        model = load_model(args.ckpt, args.device)
        refs = [load_image(p, model.resolution) for p in args.refs]  # all inputs checked before any work
        steps = args.steps or int(model.meta.get("steps", 50))
        guidance = args.guidance if args.guidance is not None else float(model.meta.get("guidance", 5.0))
        ref_prompt = args.ref_prompt[0] if args.ref_prompt and len(args.ref_prompt) == 1 else args.ref_prompt
        sets = generate(model, refs, args.prompt, ref_prompt=ref_prompt, num_sets=args.num, steps=steps,
                        guidance=guidance, text_guidance=args.text_guidance,
                        sampler=args.sampler or model.meta.get("sampler", "ddim"), eta=args.eta,
                        seed=args.seed, max_set_size=args.max_set_size, progress=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Everything succeeded: only now touch the output folder, so a failure leaves no partial files.
    os.makedirs(args.out, exist_ok=True)
    ref_pils = [to_pil(r) for r in refs]
    paths = []
    for s, images in enumerate(sets):
        for j, im in enumerate(images):
            path = os.path.join(args.out, f"set{s}_prompt{j}.png")
            im.save(path)
            paths.append(path)
    grid = os.path.join(args.out, "grid.png")
    make_grid([ref_pils + images for images in sets]).save(grid)  # each row: references | generated
    for p in paths + [grid]:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
