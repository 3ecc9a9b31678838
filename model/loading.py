"""Load base models into our modules: Stable Diffusion 1.x and SDXL, original single files (`.ckpt` /
`.safetensors`) or diffusers folders; and JeDi's own one-file checkpoints.

Our modules carry the original CompVis/Stability names, so an original checkpoint is a prefix strip plus a strict
load. Each layout has its reader (model/layout_original.py, model/layout_diffusers.py) giving the same `Parts`;
sizes are inferred from tensor shapes, and the few facts shapes cannot tell (head layout, VAE scale, resolution)
come from the model flavour (model/flavours.py), told from the keys present. Safe reading and strict loading are
model/checkpoint.py's.

    sd = load_sd("sd-v1-4.ckpt")                   # -> JeDi(unet, vae, text_encoder, tokenizer, meta)
    sd.unet(x, t, context, set_size=4)             # JeDi UNet, 9 input channels inflated from SD's 4
    parts = read_parts("sd_xl_base_1.0.safetensors")   # Parts(flavour, unet, vae, text, text_layout)
"""
import json
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from .checkpoint import (CheckpointError, _first_line, _meta_build, build_checked, check_state_dict,  # noqa: F401
                         read_state_dict, strict_load, strip_prefix)
from .diffusion import Diffusion
from .files import atomic_path
from .flavours import FLAVOURS, Flavour  # noqa: F401
from .layout_diffusers import (convert_diffusers_unet, convert_diffusers_vae, diffusers_unet_names,  # noqa: F401
                               read_diffusers)
from .layout_original import (TEXT_PREFIXES, UNET_PREFIX, VAE_PREFIX, Parts, inflate_input_channels,  # noqa: F401
                              read_original, unet_config_from_state_dict)
from .unet import JEDI_IN_CHANNELS, UNet, UNetConfig


# ----------------------------------------------------------------------------- everything at once

@dataclass(eq=False)
class JeDi:
    """A loaded model, the one bundle every entry point uses (sample.py, eval.py, train.py, the benchmarks):
    UNet, VAE (None: the model works in pixel space), text encoder, tokenizer, and the checkpoint's `meta`
    (resolution, space, diffusion settings, sampling defaults, configs)."""

    unet: nn.Module
    vae: nn.Module | None
    text_encoder: nn.Module
    tokenizer: object
    meta: dict

    def __post_init__(self):
        self.diffusion = Diffusion(**self.meta.get("diffusion", {}))
        self.unet_fn = self.unet  # what sampling calls: the UNet, or its compiled form (sample.prepare_model)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the UNet and text encoder compute in (the VAE may keep fp32 parts: AutoencoderKL.cast)."""
        return next(self.unet.parameters()).dtype

    def to(self, device=None, dtype: torch.dtype | None = None) -> "JeDi":
        """Cast (before moving: the device never holds both copies) and move every module, in place."""
        if dtype is not None:
            self.unet.to(dtype)
            self.text_encoder.to(dtype)
            if self.vae is not None:
                self.vae.cast(dtype)  # fp16 keeps the VAE's overflow-prone parts (SDXL: all of it) in fp32
        for m in (self.unet, self.text_encoder, self.vae):
            if m is not None and device is not None:
                m.to(device)
        return self

    @property
    def resolution(self) -> int:
        return int(self.meta["resolution"])

    @property
    def channels(self) -> int:
        """Channels of the space the UNet denoises (4 VAE latent channels, or 3 for pixels)."""
        return self.unet.config.out_channels

    @property
    def down(self) -> int:
        """Pixels per latent along a side (8 for SD's VAE, 1 in pixel space)."""
        return self.vae.downsample_factor if self.vae is not None else 1

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """(P,) prompts -> (P, 77, D) text states; warns when a prompt is cut at 77 tokens."""
        from .text import encode

        ids, cut = self.tokenizer(prompts, return_truncated=True)
        for p, c in zip(prompts, cut.tolist()):
            if c:
                warnings.warn(f"prompt longer than 77 tokens, truncated: {p[:60]!r}...", stacklevel=2)
        return encode(self.text_encoder, ids.to(self.device))

    @torch.no_grad()
    def to_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) in [-1, 1] -> the space the UNet works in (VAE latents, or pixels themselves)."""
        pixels = pixels.to(self.device)
        return self.vae.encode_latents(pixels) if self.vae is not None else pixels

    @torch.no_grad()
    def to_pixels(self, z: torch.Tensor) -> torch.Tensor:
        """UNet-space (n, C, h, w) -> (n, 3, H, W) images in [-1, 1]."""
        x = self.vae.decode_latents(z) if self.vae is not None else z
        return x.clamp(-1, 1)


def read_parts(path: str, ema: bool = True, shapes_only: bool = False) -> Parts:
    """The parts of a base model: an original single file or a diffusers folder, SD-1.x or SDXL."""
    if os.path.isdir(path):
        return read_diffusers(path, shapes_only)
    return read_original(path, ema=ema, shapes_only=shapes_only)


def read_original_parts(path: str, ema: bool = True, shapes_only: bool = False) -> tuple[dict, dict, dict]:
    """(unet, vae, text) unprefixed state dicts of an SD-1.x checkpoint or folder (read_parts for any flavour)."""
    p = read_parts(path, ema=ema, shapes_only=shapes_only)
    if p.flavour.name != "sd1":
        raise CheckpointError(f"{path}: an {p.flavour.name} model has more than one text encoder: use read_parts")
    return p.unet, p.vae, p.text["0"]


def _text_parts(path: str, parts: Parts) -> dict:
    """The hook where a flavour's text side is built: name -> (module factory, its state dict). SD-1.x: CLIP
    ViT-L/14 (its last layer). SDXL's two encoders (penultimate layers, pooled projection) are issue 27's text
    conditioner, not built here yet: a clear error (its UNet and VAE load with load_unet_vae)."""
    from .text import build_text_encoder, convert_original_text_state_dict, text_config_from_state_dict

    if parts.flavour.text != "sd1":
        raise CheckpointError("SDXL text conditioner not yet available (its UNet and VAE load: "
                              "model.loading.load_unet_vae)")
    text_sd = convert_original_text_state_dict(parts.text["0"])
    text_config = text_config_from_state_dict(text_sd)
    return {"text encoder": (lambda: build_text_encoder(text_config), text_sd)}


def _sd_parts(path: str, num_heads: int | None, ema: bool, in_channels: int | None, shapes_only: bool,
              text: bool = True) -> tuple[Flavour, dict]:
    """(flavour, name -> (module factory, its state dict)) of a base model's original file or diffusers folder,
    every size inferred from the tensors, the rest from the flavour; every error a CheckpointError whose message
    starts with the path. text=False: the UNet and VAE only."""
    from .vae import AutoencoderKL, vae_config_from_state_dict

    try:
        parts = read_parts(path, ema=ema, shapes_only=shapes_only)
    except CheckpointError as e:
        raise CheckpointError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None
    except (KeyError, ValueError) as e:  # a diffusers folder whose tensors are not SD's
        raise CheckpointError(f"{path}: not an SD layout ({_first_line(e)})") from None
    try:
        unet_sd = parts.unet if in_channels is None else inflate_input_channels(parts.unet, in_channels)
        unet_config = unet_config_from_state_dict(unet_sd, num_heads=num_heads)
        vae_config = vae_config_from_state_dict(parts.vae, scale_factor=parts.flavour.vae_scale,
                                                force_upcast=parts.flavour.vae_force_upcast)
        out = {"UNet": (lambda: UNet(unet_config), unet_sd), "VAE": (lambda: AutoencoderKL(vae_config), parts.vae)}
        if text:
            out.update(_text_parts(path, parts))
    except (CheckpointError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: {_first_line(e)}") from None
    return parts.flavour, out


def load_sd(path: str, num_heads: int | None = None, ema: bool = True, in_channels: int | None = JEDI_IN_CHANNELS,
            device="cpu", dtype=torch.float32) -> JeDi:
    """UNet, VAE, text encoder and tokenizer of a base model: an original `.ckpt`/`.safetensors` or a diffusers
    folder, its flavour (SD-1.x, SDXL) told from the keys present.

    num_heads: attention heads of the UNet where given (> 0); by default the flavour's (8 for SD-1.x, head dim 64
    for SDXL): the one size shapes cannot tell.
    ema: take the `model_ema.*` copy when the checkpoint has one (sd-v1-4.ckpt holds only EMA weights).
    in_channels: JeDi's 9 (inflated, zero-initialised extra channels); None keeps the checkpoint's.
    Every error is a CheckpointError whose message starts with the path.
    """
    from .text import Tokenizer

    flavour, factories = _sd_parts(path, num_heads, ema, in_channels, shapes_only=False)
    parts = {name: build_checked(factory, sd, f"{path}: {name}").eval() for name, (factory, sd) in factories.items()}
    # the flavour's resolution; SD's schedule and eps-prediction (Diffusion()'s defaults, SD-1.x and SDXL alike)
    meta = dict(resolution=flavour.resolution, diffusion={}, space="latent")
    return JeDi(parts["UNet"], parts["VAE"], parts["text encoder"], Tokenizer(), meta).to(device, dtype)


def load_unet_vae(path: str, num_heads: int | None = None, ema: bool = True,
                  in_channels: int | None = JEDI_IN_CHANNELS) -> tuple[UNet, nn.Module, Flavour]:
    """(UNet, VAE, flavour) of a base model, the text side aside, checked as load_sd checks them."""
    flavour, factories = _sd_parts(path, num_heads, ema, in_channels, shapes_only=False, text=False)
    unet, vae = (build_checked(f, sd, f"{path}: {name}").eval() for name, (f, sd) in factories.items())
    return unet, vae, flavour


def check_sd(path: str, num_heads: int | None = None, ema: bool = True,
             in_channels: int | None = JEDI_IN_CHANNELS) -> UNetConfig:
    """Everything load_sd checks, reading no tensor data (safetensors headers; a .ckpt memory-mapped): for entry
    points that must refuse a bad checkpoint before they write anything (s3.py). Returns the UNet config."""
    _, parts = _sd_parts(path, num_heads, ema, in_channels, shapes_only=True)
    for name, (factory, sd) in parts.items():
        check_state_dict(_meta_build(factory, f"{path}: {name}").state_dict(), sd, f"{path}: {name}")
    return _meta_build(parts["UNet"][0], f"{path}: UNet").config


# ----------------------------------------------------------------------------- JeDi checkpoints (one file)

JEDI_FORMAT = 1


def save_jedi(path: str, unet: nn.Module, text_encoder: nn.Module, vae: nn.Module | None = None, *,
              resolution: int, diffusion: dict, dtype: torch.dtype | None = None, **extra) -> None:
    """One safetensors file with everything sample.py needs: `unet.*`, `text.*`, `vae.*` tensors and the
    configs as JSON metadata, so `--ckpt` is all a user passes. Written to a temp name and renamed (atomic).
    dtype: store floating tensors in it (e.g. torch.float16 to halve a shipped file); load_jedi casts back."""
    from safetensors.torch import save_file

    tensors = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    tensors.update({f"text.{k}": v for k, v in text_encoder.state_dict().items()})
    if vae is not None:
        tensors.update({f"vae.{k}": v for k, v in vae.state_dict().items()})
    meta = dict(format=JEDI_FORMAT, unet=unet.config.to_dict(), text=text_encoder.config.to_dict(),
                vae=vae.config.to_dict() if vae is not None else None, space="latent" if vae is not None else "pixel",
                resolution=resolution, diffusion=diffusion, **extra)
    cast = lambda v: v.to(dtype) if dtype is not None and v.is_floating_point() else v  # noqa: E731
    with atomic_path(path) as tmp:
        save_file({k: cast(v.detach()).contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata={"jedi": json.dumps(meta)})


# What no tensor can contradict, bounded: a file whose metadata says otherwise is refused before any work.
RESOLUTION_RANGE = (8, 8192)  # pixels per side
STEPS_RANGE = (1, 1000)
GUIDANCE_RANGE = (0.0, 100.0)
SET_SIZE_RANGE = (1, 64)
MAX_LEVELS, MAX_RES_BLOCKS, MAX_DEPTH = 8, 16, 64  # UNet structure: keeps even the meta-device build small


def _bad(path, msg) -> CheckpointError:
    return CheckpointError(f"{path}: {msg}")


def _int_in(path, name, v, lo, hi) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _bad(path, f"metadata {name} = {v!r} is not an integer in [{lo}, {hi}]")
    return v


def _config(path, cls, fields, what):
    """cls(**fields) with the file named on a wrong or unknown field."""
    if not isinstance(fields, dict):
        raise _bad(path, f"metadata {what} config is {type(fields).__name__}, not a JSON object")
    try:
        return cls(**fields)
    except TypeError as e:  # unknown or missing keyword
        raise _bad(path, f"metadata {what} config: {_first_line(e)}") from None
    except (ValueError, ZeroDivisionError) as e:
        raise _bad(path, f"metadata {what} config: {_first_line(e)}") from None


def check_jedi_meta(path: str, meta) -> dict:
    """The JSON metadata of a JeDi checkpoint, every value a tensor cannot contradict checked against a sane range
    (resolution, sampling defaults, set sizes, the schedule, the UNet's structure). Returns it; raises a one-line
    CheckpointError naming the file and the field otherwise. Shapes are checked later, against the tensors."""
    from .diffusion import SAMPLERS

    if not isinstance(meta, dict):
        raise _bad(path, f"metadata is a JSON {type(meta).__name__}, not an object")
    if meta.get("format") != JEDI_FORMAT:
        raise _bad(path, f"JeDi checkpoint format {meta.get('format')!r} is not supported ({JEDI_FORMAT})")
    for key in ("unet", "text", "vae", "resolution"):
        if key not in meta:
            raise _bad(path, f"metadata lacks {key!r}")
    _int_in(path, "resolution", meta["resolution"], *RESOLUTION_RANGE)
    if "steps" in meta:
        _int_in(path, "steps", meta["steps"], *STEPS_RANGE)
    if "guidance" in meta:
        g = meta["guidance"]
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not GUIDANCE_RANGE[0] <= g <= GUIDANCE_RANGE[1]:
            raise _bad(path, f"metadata guidance = {g!r} is not a number in {list(GUIDANCE_RANGE)}")
    if "sampler" in meta and meta["sampler"] not in SAMPLERS:
        raise _bad(path, f"metadata sampler = {meta['sampler']!r} is not one of {', '.join(SAMPLERS)}")
    for key in ("set_sizes",):
        if key in meta:
            if not isinstance(meta[key], list) or not meta[key]:
                raise _bad(path, f"metadata {key} = {meta[key]!r} is not a non-empty list")
            for v in meta[key]:
                _int_in(path, key, v, *SET_SIZE_RANGE)
    if "max_set_size" in meta and meta["max_set_size"] is not None:
        _int_in(path, "max_set_size", meta["max_set_size"], *SET_SIZE_RANGE)
    diffusion = meta.get("diffusion", {})
    if isinstance(diffusion, dict) and "num_timesteps" in diffusion:  # before Diffusion allocates its table
        _int_in(path, "diffusion.num_timesteps", diffusion["num_timesteps"], 2, 100_000)
    d = _config(path, Diffusion, diffusion, "diffusion")
    if "steps" in meta and meta["steps"] > d.num_timesteps:
        raise _bad(path, f"metadata steps = {meta['steps']} exceeds the schedule's {d.num_timesteps} timesteps")
    if not 0 < d.beta_start < d.beta_end < 1:
        raise _bad(path, f"metadata diffusion betas {d.beta_start}, {d.beta_end} are not 0 < start < end < 1")
    c = _config(path, UNetConfig, meta["unet"], "UNet")
    for name, v, hi in (("in_channels", c.in_channels, 64), ("out_channels", c.out_channels, 64),
                        ("model_channels", c.model_channels, 16384), ("num_res_blocks", c.num_res_blocks, MAX_RES_BLOCKS),
                        ("transformer_depth_middle", c.transformer_depth_middle, MAX_DEPTH),
                        ("context_dim", c.context_dim, 16384), ("norm_groups", c.norm_groups, 1024)):
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            _int_in(path, f"unet.{name}", x, 1, hi)
    for x in c.transformer_depth:  # per level; 0 where a level has no attention
        _int_in(path, "unet.transformer_depth", x, 0, MAX_DEPTH)
    if c.adm_in_channels is not None:
        _int_in(path, "unet.adm_in_channels", c.adm_in_channels, 1, 65536)
    if not 1 <= len(c.channel_mult) <= MAX_LEVELS:
        raise _bad(path, f"metadata unet.channel_mult has {len(c.channel_mult)} levels, not 1 to {MAX_LEVELS}")
    for x in c.channel_mult:
        _int_in(path, "unet.channel_mult", x, 1, 64)
    text = meta["text"]
    if not isinstance(text, dict):
        raise _bad(path, f"metadata text config is {type(text).__name__}, not a JSON object")
    for name, hi in (("num_hidden_layers", 256), ("hidden_size", 16384), ("intermediate_size", 65536),
                     ("num_attention_heads", 256), ("vocab_size", 1_000_000), ("max_position_embeddings", 4096)):
        if name in text:
            _int_in(path, f"text.{name}", text[name], 1, hi)
    vae = meta["vae"]
    if vae is not None:
        if not isinstance(vae, dict):
            raise _bad(path, f"metadata vae config is {type(vae).__name__}, not a JSON object or null")
        for name, hi in (("ch", 4096), ("num_res_blocks", MAX_RES_BLOCKS), ("z_channels", 64), ("embed_dim", 64)):
            if name in vae:
                _int_in(path, f"vae.{name}", vae[name], 1, hi)
        mult = vae.get("ch_mult", (1,))
        if not isinstance(mult, list) or not 1 <= len(mult) <= MAX_LEVELS:
            raise _bad(path, f"metadata vae.ch_mult = {mult!r} is not a list of 1 to {MAX_LEVELS} levels")
        for x in mult:
            _int_in(path, "vae.ch_mult", x, 1, 64)
    down = 2 ** (len(c.channel_mult) - 1) * (2 ** (len(vae.get("ch_mult", [1, 1, 1, 1])) - 1) if vae else 1)
    if meta["resolution"] % down:
        raise _bad(path, f"metadata resolution {meta['resolution']} is not a multiple of {down} (VAE and UNet "
                         f"downsampling)")
    return meta


def _jedi_parts(path: str, meta: dict) -> dict:
    """name -> (module factory, tensor prefix) of a JeDi checkpoint, from its checked metadata."""
    from transformers import CLIPTextConfig

    from .text import build_text_encoder
    from .vae import AutoencoderKL, VAEConfig

    ucfg = UNetConfig(**meta["unet"])
    tcfg = _config(path, CLIPTextConfig, meta["text"], "text")
    parts = {"UNet": (lambda: UNet(ucfg), "unet."), "text encoder": (lambda: build_text_encoder(tcfg), "text.")}
    if meta["vae"] is not None:
        vcfg = _config(path, VAEConfig, meta["vae"], "VAE")
        parts["VAE"] = (lambda: AutoencoderKL(vcfg), "vae.")
    return parts


def _read_jedi_meta(path: str) -> dict:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get("jedi")
    except Exception as e:  # safetensors raises its own error types for non-safetensors files
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
    if raw is None:
        raise CheckpointError(f"{path}: no JeDi metadata; an original SD checkpoint is loaded with load_sd()")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: metadata is not valid JSON ({e.msg} at character {e.pos})") from None
    return check_jedi_meta(path, meta)


def check_jedi(path: str) -> dict:
    """Everything load_jedi checks, reading no tensor data: the metadata (check_jedi_meta), then every module
    built on the meta device against the file's tensor names and shapes. Returns the metadata. For entry points
    that must refuse a bad checkpoint before they write anything (eval.py)."""
    from safetensors import safe_open

    meta = _read_jedi_meta(path)
    with safe_open(path, framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    for name, (factory, prefix) in _jedi_parts(path, meta).items():
        check_state_dict(_meta_build(factory, f"{path}: {name}").state_dict(), strip_prefix(shapes, prefix),
                         f"{path}: {name}")
    return meta


def load_jedi(path: str, device="cpu", dtype=torch.float32) -> JeDi:
    """Load a checkpoint written by `save_jedi` (train.py's export). A file whose metadata is malformed, out of
    range or contradicted by its tensors is a one-line CheckpointError naming it, raised before the modules are
    allocated (they are built on the meta device and compared first: build_checked)."""
    from safetensors import safe_open

    from .text import Tokenizer

    meta = _read_jedi_meta(path)
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{path}: tensors cannot be read ({_first_line(e)})") from None
    parts = {name: build_checked(factory, strip_prefix(tensors, prefix), f"{path}: {name}").eval()
             for name, (factory, prefix) in _jedi_parts(path, meta).items()}
    return JeDi(parts["UNet"], parts.get("VAE"), parts["text encoder"], Tokenizer(), meta).to(device, dtype)
