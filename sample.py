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
from model.diffusion import DEFAULT_GUIDANCE, SAMPLERS, personalize
from model.loading import CheckpointError, JeDi, check_jedi, load_jedi, load_sd

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CKPT = os.path.join(HERE, "assets", "jedi_toy.safetensors")


class UserError(Exception):
    """Bad input: reported as one line and a non-zero exit."""


# ----------------------------------------------------------------------------- model

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def resolve_dtype(dtype: str | torch.dtype | None, device) -> torch.dtype:
    """--dtype: 'auto' (or None) is bf16 on CUDA (tensor cores, fp32's range) and fp32 elsewhere (CPUs without
    bf16 matmul units run it slower than fp32); else bf16, fp16 or fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def sampling_settings(meta: dict, device, *, steps: int | None = None, guidance: float | None = None,
                      sampler: str | None = None, dtype: str | torch.dtype | None = None) -> dict:
    """The one resolver of a run's sampling settings, for sample.py, eval.py and bench/bench_sampling.py: a given
    value wins, else the checkpoint's (train.py's export stores steps, guidance and sampler in its metadata), else
    50 steps, model.diffusion.DEFAULT_GUIDANCE, DDIM; dtype as resolve_dtype. Returns generate()'s keyword
    arguments."""
    return {"steps": steps or int(meta.get("steps", 50)),
            "guidance": guidance if guidance is not None else float(meta.get("guidance", DEFAULT_GUIDANCE)),
            "sampler": sampler or meta.get("sampler", "ddim"),
            "dtype": {v: k for k, v in DTYPES.items()}[resolve_dtype(dtype, device)]}


def load_model(ckpt: str | None = None, device="cpu", num_heads: int | None = None, *, dtype="auto",
               compile: str | None = None) -> JeDi:
    """A JeDi checkpoint (train.py's export; SD-1.x or SDXL base) or, for experiments, an original SD-1.x or SDXL
    checkpoint (its reference channels start at zero, so it ignores references until trained). None: the shipped
    toy model.
    dtype: the weights' dtype (cast once, here); compile: see compile_unet (None: eager)."""
    path = ckpt or DEFAULT_CKPT
    if not os.path.exists(path):
        hint = "" if ckpt else " (the default toy checkpoint is missing from assets/; pass --ckpt)"
        raise UserError(f"checkpoint not found: {path}{hint}")
    try:
        if os.path.isdir(path) or not path.endswith(".safetensors") or not _has_jedi_meta(path):
            warnings.warn("an original SD checkpoint is not JeDi-trained: its reference and mask input channels are zero")
            model = load_sd(path, num_heads=num_heads)
        else:
            model = load_jedi(path)
    except CheckpointError as e:
        raise UserError(str(e).replace("\n", " ")) from None
    return prepare_model(model, device, dtype=dtype, compile=compile)


def check_checkpoint(ckpt: str | None = None) -> None:
    """What load_model would refuse, found without loading (no tensor data is read): a missing file, or a JeDi file
    whose metadata is malformed, out of range or contradicted by its tensor shapes (model.loading.check_jedi).
    Original SD checkpoints are checked as they load. For entry points that write before they load (eval.py)."""
    path = ckpt or DEFAULT_CKPT
    if not os.path.exists(path):
        raise UserError(f"checkpoint not found: {path}" + ("" if ckpt else " (the default toy checkpoint)"))
    if os.path.isfile(path) and path.endswith(".safetensors") and _has_jedi_meta(path):
        try:
            check_jedi(path)
        except CheckpointError as e:
            raise UserError(str(e).replace("\n", " ")) from None


def prepare_model(model: JeDi, device, *, dtype="auto", compile: str | None = None) -> JeDi:
    """What load_model does to a loaded model before sampling (the benchmark calls it on random weights): check it
    is a JeDi UNet, cast the weights once, move them, NHWC on CUDA, optionally compile the UNet."""
    c = model.unet.config
    if c.in_channels != 2 * c.out_channels + 1:
        raise UserError(f"the checkpoint's UNet takes {c.in_channels} input channels, not JeDi's "
                        f"[x_t, reference, mask] = {2 * c.out_channels + 1}: not a JeDi model")
    model.to(device, resolve_dtype(dtype, device))
    if torch.device(device).type == "cuda":
        # NHWC weights: cuDNN runs the convolutions without NCHW<->NHWC transposes around each one
        # (H200, 512 px set of 4, eager: 58.7 -> 52.1 ms per UNet call; bench/results/2026-11-27-h200-run1).
        model.unet.to(memory_format=torch.channels_last)
    if compile:
        model.unet_fn = compile_unet(model.unet, compile)
    return model


def compile_unet(unet, mode: str = "default"):
    """torch.compile of the UNet for the fixed shapes of a run: fullgraph=True (a graph break is an error, not a
    silent slow path) and dynamic=False (one graph per shape: the first generate() call compiles, later calls with
    the same set size, --num and prompt count reuse it; a new shape compiles again). mode "reduce-overhead" also
    captures each step's UNet call in a CUDA graph (inductor's cudagraph trees): one replay instead of ~1,000
    kernel launches per step; "max-autotune" adds GEMM/conv autotuning (a longer warm-up)."""
    if mode not in COMPILE_MODES:
        raise UserError(f"--compile {mode!r}: expected one of {', '.join(COMPILE_MODES)}")
    fn = torch.compile(unet, fullgraph=True, dynamic=False, mode=None if mode == "default" else mode)
    if mode != "reduce-overhead":
        return fn

    def graphed(*args, **kwargs):
        # A new step: the previous replay's output buffers may be overwritten (personalize's model_fn has already
        # consumed them by the time it calls the UNet again).
        torch.compiler.cudagraph_mark_step_begin()
        return fn(*args, **kwargs)

    return graphed


def _has_jedi_meta(path: str) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return "jedi" in (f.metadata() or {})
    except Exception:
        raise UserError(f"{path}: not a readable safetensors file") from None


# ----------------------------------------------------------------------------- images

def load_image(path: str, resolution: int) -> torch.Tensor:
    """Any size or mode (RGBA, grayscale, 16-bit, palette, EXIF-rotated) -> (3, R, R) RGB in [-1, 1], the very
    pixels training reads from the same file (data.load_image, then data.fit)."""
    return image_to_tensor(open_image(path, resolution), resolution)


def open_image(path: str, size: int | None = None) -> Image.Image:
    """Read an image file with the project's one reader (data.load_image: upright, alpha onto white, 16-bit and
    CMYK handled) as RGB; size: decode JPEGs at a reduced scale (>= size per side), as training does. A missing
    or unreadable file is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"reference image not found: {path}")
    try:
        return data.load_image(path, size)
    except (UnidentifiedImageError, OSError, data.BadSample) as e:
        raise UserError(f"cannot read {path} as an image ({e.__class__.__name__})") from None


def image_to_tensor(img: Image.Image, resolution: int) -> torch.Tensor:
    """PIL -> (3, R, R) in [-1, 1] with training's preprocessing (data.fit: the shorter side resized to R, the
    center square cropped), so a reference is the image the model learnt from, pixel for pixel."""
    a = torch.tensor(data.fit(img.convert("RGB"), resolution, None))  # (R, R, 3) uint8, a writable copy
    return a.permute(2, 0, 1).float().div_(127.5).sub_(1.0)  # (R, R, 3) -> (3, R, R); data.SetBatches' scaling


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
             num_sets: int = 1, steps: int = 50, guidance: float = DEFAULT_GUIDANCE, text_guidance: float | None = None,
             sampler: str = "ddim", eta: float = 0.0, seed: int = 0, max_set_size: int = 8,
             progress: bool = False, dtype: str | torch.dtype | None = None,
             max_batch_sets: int | None = None, first_set: int = 0) -> list[list[Image.Image]]:
    """New images of the references' subject, one per prompt, for `num_sets` independent sets.

    ref_images: paths, PIL images or (3, R, R) tensors in [-1, 1]; may be empty (text-only joint generation).
    ref_prompt: caption of the references, one for all or a list with one per reference (default: the first prompt).
    Sets larger than max_set_size are split into chunks of prompts, each with all references.
    dtype: compute in it (resolve_dtype; the model is cast once if it differs); None: as the model was loaded.
    max_batch_sets: sets per UNet call; None: all of them, halved on CUDA out-of-memory. Set s draws its noise
    from its own generator (seed for set 0), so its images do not depend on num_sets or on how sets are batched.
    first_set: make sets first_set, first_set + 1, ... of `seed` (any of them alone: eval.py's resume).
    Returns num_sets lists of len(prompts) PIL images. Same seed, same images.
    """
    if not prompts:
        raise UserError("give at least one --prompt")
    if max_batch_sets is not None and max_batch_sets < 1:
        raise UserError("--max_batch_sets must be at least 1")
    if dtype is not None and resolve_dtype(dtype, model.device) != model.dtype:
        model.to(dtype=resolve_dtype(dtype, model.device))
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
    sizes = text_sizes(model)
    null = model.null(**sizes)  # one row
    gens = [torch.Generator(device=model.device).manual_seed(set_seed(seed, first_set + s))
            for s in range(num_sets)]
    out = [[] for _ in range(num_sets)]
    group = min(num_sets, max_batch_sets or num_sets)
    for start in range(0, len(prompts), room):
        chunk = prompts[start : start + room]
        context = model.encode(ref_prompts + chunk, **sizes)  # Cond: (n + K, 77, D) states [+ (n + K, adm) y]
        first = 0
        while first < num_sets:
            sets = range(first, min(first + group, num_sets))
            states = [gens[s].get_state() for s in sets]
            try:
                pixels = _sample_sets(model, ref_latents, context, null, len(chunk), [gens[s] for s in sets],
                                      steps=steps, guidance=guidance, text_guidance=text_guidance, sampler=sampler,
                                      eta=eta, progress=progress)
            except torch.cuda.OutOfMemoryError:
                if max_batch_sets is not None or group == 1:
                    raise
                for s, state in zip(sets, states):  # rewind: the retry draws the very same noise
                    gens[s].set_state(state)
                group //= 2
                torch.cuda.empty_cache()
                warnings.warn(f"out of GPU memory: {group} sets per UNet call from now on", stacklevel=2)
                continue
            for s, images in zip(sets, pixels):
                out[s].extend(to_pil(p) for p in images)
            first += len(sets)
    return out


def text_sizes(model: JeDi) -> dict:
    """SDXL's micro-conditioning for every image of a set, references and new images alike: an uncropped image at
    the model's resolution (original and target size R x R, crop top-left 0, 0), what sgm and diffusers sample
    with at their resolution. The text conditioner ignores them when it has no size features (SD-1.x)."""
    R = model.resolution
    return dict(original_size=(R, R), crop_top_left=(0, 0), target_size=(R, R))


SET_SEED_STRIDE = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: seeds of different (seed, set) pairs stay apart


def set_seed(seed: int, s: int) -> int:
    """The noise seed of set s of a generate() call: `seed` itself for set 0 (so one set is what it always was)."""
    return seed if s == 0 else (seed + s * SET_SEED_STRIDE) % 2**64


@torch.no_grad()
def _sample_sets(model: JeDi, ref_latents, context, null, num_new: int, gens: list, *, progress: bool,
                 **sampling) -> torch.Tensor:
    """len(gens) sets of [references..., num_new new images] in one UNet call per step ->
    (len(gens), num_new, 3, R, R) pixels of the new images."""
    n, S, R = 0 if ref_latents is None else len(ref_latents), len(gens), model.resolution
    r = R // model.down
    latent_shape = (model.channels, r, r)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = lambda ts: tqdm(ts, desc=f"sampling {S}x[{n} refs + {num_new}]", leave=False)  # noqa: E731
    z = personalize(model.unet_fn, model.diffusion, refs=ref_latents, context=context, null_context=null,
                    num_new=num_new, num_sets=S, generator=gens, progress=bar, latent_shape=latent_shape, **sampling)
    new = z.reshape(S, n + num_new, *latent_shape)[:, n:]  # (S·N, ...) -> (S, N, ...), drop the references
    return model.to_pixels(new.reshape(-1, *latent_shape)).reshape(S, num_new, 3, R, R)


def _as_tensor(r, resolution):
    if isinstance(r, torch.Tensor):
        return r
    return image_to_tensor(r if isinstance(r, Image.Image) else open_image(str(r), resolution), resolution)


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
                   f"together; 1 = no guidance; default: the checkpoint's, else {DEFAULT_GUIDANCE:g})")
    p.add_argument("--text_guidance", type=float, default=None, help="optional separate text scale: 3 passes, "
                   "ε⁰ + λ(ε(refs, \"\") − ε⁰) + s(ε(refs, text) − ε(refs, \"\")); needs a model trained with "
                   "p_drop_text > 0")
    p.add_argument("--sampler", default=None, choices=SAMPLERS, help="DDIM or DPM-Solver++ 2M (same "
                   "quality in ~20 steps); default: the checkpoint's, else ddim")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM η (0 deterministic, 1 ancestral)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same images")
    p.add_argument("--ckpt", default=None, help="JeDi checkpoint (.safetensors from train.py); default: the toy "
                   "model in assets/. An original SD-1.x or SDXL file or diffusers folder also loads (text only)")
    p.add_argument("--out", default="samples", help="output folder: one PNG per image and grid.png")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu (default: "
                   "cuda when available)")
    p.add_argument("--max_set_size", type=int, default=8, help="images per set at most (refs + new); more prompts "
                   "are split into chunks that each contain all references")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="weights and compute: auto = bf16 on "
                   "CUDA, fp32 on CPU (fp16 keeps the VAE's overflow-prone layers in fp32)")
    p.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
                   help="torch.compile the UNet (the first images wait for the compile, ~1 min for SD-1.x on a GPU); "
                   "'reduce-overhead' also replays each step from a CUDA graph")
    p.add_argument("--max_batch_sets", type=int, default=None, help="sets per UNet call (default: all --num sets, "
                   "halved on CUDA out-of-memory); same images either way")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.num < 1:
            raise UserError("--num must be at least 1")
        model = load_model(args.ckpt, args.device, dtype=args.dtype, compile=args.compile)
        refs = [load_image(p, model.resolution) for p in args.refs]  # all inputs checked before any work
        settings = sampling_settings(model.meta, args.device, steps=args.steps, guidance=args.guidance,
                                     sampler=args.sampler, dtype=args.dtype)
        ref_prompt = args.ref_prompt[0] if args.ref_prompt and len(args.ref_prompt) == 1 else args.ref_prompt
        sets = generate(model, refs, args.prompt, ref_prompt=ref_prompt, num_sets=args.num,
                        text_guidance=args.text_guidance, eta=args.eta, seed=args.seed,
                        max_set_size=args.max_set_size, progress=True, max_batch_sets=args.max_batch_sets,
                        **settings)
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
