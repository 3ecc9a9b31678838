"""Load base models into our modules: Stable Diffusion 1.x and SDXL, original single files (`.ckpt` /
`.safetensors`) or diffusers folders; and JeDi's own one-file checkpoints.

Our modules carry the original CompVis/Stability names, so an original checkpoint is a prefix strip plus a strict
load. Each layout has its reader (model/layout_original.py, model/layout_diffusers.py) giving the same `Parts`;
sizes are inferred from tensor shapes, and the few facts shapes cannot tell (head layout, VAE scale, resolution)
come from the model flavour (model/flavours.py), told from the keys present. Safe reading and strict loading are
model/checkpoint.py's.

    sd = load_sd("sd-v1-4.ckpt")                   # -> JeDi(unet, vae, text, meta); text: TextConditioner
    sd.unet(x, t, context, set_size=4)             # JeDi UNet, 9 input channels inflated from SD's 4
    parts = read_parts("sd_xl_base_1.0.safetensors")   # Parts(flavour, unet, vae, text, text_layout)
"""
import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from .checkpoint import (CheckpointError, _first_line, _meta_build, build_checked, check_state_dict,  # noqa: F401
                         strict_load, strip_prefix)  # strict_load: also imported from here by train.py and tests
from .conditioning import Cond
from .diffusion import Diffusion
from .files import atomic_path
from .flavours import Flavour
from .layout_diffusers import convert_diffusers_unet, read_diffusers  # noqa: F401  (tests import it from here)
from .layout_original import Parts, inflate_input_channels, read_original, unet_config_from_state_dict
from .unet import JEDI_IN_CHANNELS, UNet, UNetConfig


# ----------------------------------------------------------------------------- everything at once

@dataclass(eq=False)
class JeDi:
    """A loaded model, the one bundle every entry point uses (sample.py, eval.py, train.py, the benchmarks):
    UNet, VAE (None: the model works in pixel space), the text conditioner (model.conditioner.TextConditioner:
    tokenizers and text encoders, prompts -> Cond), and the checkpoint's `meta` (resolution, space, diffusion
    settings, sampling defaults, configs)."""

    unet: nn.Module
    vae: nn.Module | None
    text: nn.Module  # TextConditioner
    meta: dict

    def __post_init__(self):
        self.diffusion = Diffusion(**self.meta.get("diffusion", {}))
        self.unet_fn = self.unet  # what sampling calls: the UNet, or its compiled form (sample.prepare_model)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the UNet and text encoders compute in (the VAE may keep fp32 parts: AutoencoderKL.cast)."""
        return next(self.unet.parameters()).dtype

    def to(self, device=None, dtype: torch.dtype | None = None) -> "JeDi":
        """Cast (before moving: the device never holds both copies) and move every module, in place."""
        if dtype is not None:
            self.unet.to(dtype)
            self.text.to(dtype)
            if self.vae is not None:
                self.vae.cast(dtype)  # fp16 keeps the VAE's overflow-prone parts (SDXL: all of it) in fp32
        for m in (self.unet, self.text, self.vae):
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
    def encode(self, prompts: list[str], **sizes) -> Cond:
        """(P,) prompts -> Cond (P rows); warns when a prompt is cut at 77 tokens. sizes: SDXL's micro-conditioning
        (original_size, crop_top_left, target_size; TextConditioner.forward)."""
        return self.text.encode(prompts, **sizes)

    @torch.no_grad()
    def null(self, **sizes) -> Cond:
        """The unconditional text as a one-row Cond: the encoded "" (SD-1.x), zeros (SDXL)."""
        return self.text.null(**sizes)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """(P,) prompts -> (P, 77, D) text states, the bare context of a model without vector conditioning (SD-1.x);
        a model with y (SDXL) needs encode()."""
        if self.text.y_dim is not None:
            raise ValueError("this model's text conditioning has a vector part (SDXL's pooled text and sizes): "
                             "use JeDi.encode(), which returns a Cond")
        return self.encode(prompts).context

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


def _text_parts(path: str, parts: Parts, unet_config: UNetConfig) -> dict:
    """The flavour's text conditioner: name -> (module factory, its state dict), sized from the weights
    (model.conditioner.text_conditioner_weights). SD-1.x: CLIP ViT-L/14's last layer; SDXL: CLIP ViT-L/14 and
    OpenCLIP ViT-bigG/14 penultimate layers, bigG's pooled projection, the size features at the flavour's
    resolution. The encoders are built without random init (the weights are loaded next)."""
    from .conditioner import TEXT_FLAVOURS, TextConditioner, text_conditioner_weights

    flavour = TEXT_FLAVOURS[parts.flavour.text]
    config = flavour(resolution=parts.flavour.resolution) if parts.flavour.text == "sdxl" else flavour()
    config, sd = text_conditioner_weights(config, [parts.text[i] for i in sorted(parts.text)])
    if (config.context_dim, config.y_dim) != (unet_config.context_dim, unet_config.adm_in_channels):
        raise CheckpointError(f"the text encoders give context {config.context_dim} and vector {config.y_dim}, the "
                              f"UNet takes {unet_config.context_dim} and {unet_config.adm_in_channels}")
    return {"text encoder": (lambda: TextConditioner(config, init=False), sd)}


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
            out.update(_text_parts(path, parts, unet_config))
    except (CheckpointError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: {_first_line(e)}") from None
    return parts.flavour, out


def load_sd(path: str, num_heads: int | None = None, ema: bool = True, in_channels: int | None = JEDI_IN_CHANNELS,
            device="cpu", dtype=torch.float32) -> JeDi:
    """UNet, VAE and text conditioner of a base model: an original `.ckpt`/`.safetensors` or a diffusers folder,
    its flavour (SD-1.x, SDXL) told from the keys present.

    num_heads: attention heads of the UNet where given (> 0); by default the flavour's (8 for SD-1.x, head dim 64
    for SDXL): the one size shapes cannot tell.
    ema: take the `model_ema.*` copy when the checkpoint has one (sd-v1-4.ckpt holds only EMA weights).
    in_channels: JeDi's 9 (inflated, zero-initialised extra channels); None keeps the checkpoint's.
    Every error is a CheckpointError whose message starts with the path.
    """
    flavour, factories = _sd_parts(path, num_heads, ema, in_channels, shapes_only=False)
    parts = {name: build_checked(factory, sd, f"{path}: {name}").eval() for name, (factory, sd) in factories.items()}
    # the flavour's resolution; SD's schedule and eps-prediction (Diffusion()'s defaults, SD-1.x and SDXL alike)
    meta = dict(resolution=flavour.resolution, diffusion={}, space="latent")
    return JeDi(parts["UNet"], parts["VAE"], parts["text encoder"], meta).to(device, dtype)


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

# 2: `text` is a TextConditionerConfig and the tensors `text.encoders.N.*`. 1 (still read): `text` was one
# CLIPTextConfig and the tensors `text.*` that encoder's, i.e. the SD-1.x conditioner (assets/jedi_toy.safetensors).
JEDI_FORMAT = 2
JEDI_FORMATS_READ = (1, 2)


def save_jedi(path: str, unet: nn.Module, text: nn.Module, vae: nn.Module | None = None, *,
              resolution: int, diffusion: dict, dtype: torch.dtype | None = None, **extra) -> None:
    """One safetensors file with everything sample.py needs: `unet.*`, `text.*`, `vae.*` tensors and the
    configs as JSON metadata, so `--ckpt` is all a user passes. Written to a temp name and renamed (atomic).
    text: the TextConditioner (a bare CLIPTextModel is taken as the SD-1.x conditioner's encoder).
    dtype: store floating tensors in it (e.g. torch.float16 to halve a shipped file); load_jedi casts back."""
    from safetensors.torch import save_file

    from .conditioner import as_text_conditioner

    text = as_text_conditioner(text)
    tensors = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    tensors.update({f"text.{k}": v for k, v in text.state_dict().items()})
    if vae is not None:
        tensors.update({f"vae.{k}": v for k, v in vae.state_dict().items()})
    meta = dict(format=JEDI_FORMAT, unet=unet.config.to_dict(), text=text.config.to_dict(),
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
    except (TypeError, ValueError, ZeroDivisionError) as e:  # TypeError: an unknown or missing keyword
        raise _bad(path, f"metadata {what} config: {_first_line(e)}") from None


def check_jedi_meta(path: str, meta) -> dict:
    """The JSON metadata of a JeDi checkpoint, every value a tensor cannot contradict checked against a sane range
    (resolution, sampling defaults, set sizes, the schedule, the UNet's structure). Returns it; raises a one-line
    CheckpointError naming the file and the field otherwise. Shapes are checked later, against the tensors."""
    from .diffusion import SAMPLERS

    if not isinstance(meta, dict):
        raise _bad(path, f"metadata is a JSON {type(meta).__name__}, not an object")
    if meta.get("format") not in JEDI_FORMATS_READ:
        raise _bad(path, f"JeDi checkpoint format {meta.get('format')!r} is not supported "
                         f"({', '.join(map(str, JEDI_FORMATS_READ))})")
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
    if "set_sizes" in meta:
        if not isinstance(meta["set_sizes"], list) or not meta["set_sizes"]:
            raise _bad(path, f"metadata set_sizes = {meta['set_sizes']!r} is not a non-empty list")
        for v in meta["set_sizes"]:
            _int_in(path, "set_sizes", v, *SET_SIZE_RANGE)
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
    encoders = text.get("encoders", []) if meta["format"] >= 2 else [dict(config=text)]
    if not isinstance(encoders, list) or not 1 <= len(encoders) <= 4:
        raise _bad(path, "metadata text.encoders is not a list of 1 to 4 encoders")
    for i, e in enumerate(encoders):
        clip = e.get("config") if isinstance(e, dict) else None
        if not isinstance(clip, dict):
            raise _bad(path, f"metadata text encoder {i + 1} has no config object")
        for name, hi in (("num_hidden_layers", 256), ("hidden_size", 16384), ("intermediate_size", 65536),
                         ("num_attention_heads", 256), ("vocab_size", 1_000_000), ("max_position_embeddings", 4096),
                         ("projection_dim", 16384)):
            if name in clip:
                _int_in(path, f"text.{name}", clip[name], 1, hi)
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
    """name -> (module factory, its tensors from the file's: a function of {name: tensor or shape}) of a JeDi
    checkpoint, from its checked metadata."""
    from .conditioner import TextConditioner, TextConditionerConfig
    from .vae import AutoencoderKL, VAEConfig

    ucfg = UNetConfig(**meta["unet"])
    tcfg = _config(path, lambda **d: TextConditionerConfig.from_dict(d), meta["text"], "text")
    if meta["format"] == 1:  # the one SD-1.x encoder's tensors were `text.*`; the conditioner's `encoders.0.*`
        text = lambda d: {"encoders.0." + k: v for k, v in strip_prefix(d, "text.").items()}  # noqa: E731
    else:
        text = lambda d: strip_prefix(d, "text.")  # noqa: E731
    parts = {"UNet": (lambda: UNet(ucfg), lambda d: strip_prefix(d, "unet.")),
             "text encoder": (lambda: TextConditioner(tcfg, init=False), text)}  # weights loaded next
    if meta["vae"] is not None:
        vcfg = _config(path, VAEConfig, meta["vae"], "VAE")
        parts["VAE"] = (lambda: AutoencoderKL(vcfg), lambda d: strip_prefix(d, "vae."))
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
    for name, (factory, select) in _jedi_parts(path, meta).items():
        check_state_dict(_meta_build(factory, f"{path}: {name}").state_dict(), select(shapes), f"{path}: {name}")
    return meta


def load_jedi(path: str, device="cpu", dtype=torch.float32) -> JeDi:
    """Load a checkpoint written by `save_jedi` (train.py's export). A file whose metadata is malformed, out of
    range or contradicted by its tensors is a one-line CheckpointError naming it, raised before the modules are
    allocated (they are built on the meta device and compared first: build_checked)."""
    from safetensors import safe_open

    meta = _read_jedi_meta(path)
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{path}: tensors cannot be read ({_first_line(e)})") from None
    parts = {name: build_checked(factory, select(tensors), f"{path}: {name}").eval()
             for name, (factory, select) in _jedi_parts(path, meta).items()}
    return JeDi(parts["UNet"], parts.get("VAE"), parts["text encoder"], meta).to(device, dtype)
