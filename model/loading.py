"""Load Stable Diffusion 1.x weights into our modules: original `.ckpt` / `.safetensors`, or a diffusers folder.

Our modules carry the original CompVis names, so an original checkpoint is a prefix strip plus a strict
load. Architecture sizes are inferred from tensor shapes (only the head count cannot be); a diffusers
folder is mapped into our names by walking the same block layout the UNet constructor walks.

    sd = load_sd("sd-v1-4.ckpt")                   # -> JeDi(unet, vae, text, meta); text: TextConditioner
    sd.unet(x, t, context, set_size=4)             # JeDi UNet, 9 input channels inflated from SD's 4
"""
import json
import os
import pickle
import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from .conditioning import Cond
from .diffusion import Diffusion
from .files import atomic_path
from .unet import JEDI_IN_CHANNELS, UNet, UNetConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."


class CheckpointError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- reading files

def _safetensors(path: str, shapes_only: bool = False) -> dict:
    """All tensors of a .safetensors file, or (shapes_only) meta-device tensors of their shapes: the header alone."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        if not shapes_only:
            return load_file(path)
        with safe_open(path, framework="pt") as f:
            return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    except Exception as e:  # safetensors' own error types: truncated file, bad header, not safetensors
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None


def read_state_dict(path: str, shapes_only: bool = False) -> dict:
    """Tensors of an original `.ckpt` (Lightning dict) or `.safetensors`. Never unpickles code.
    shapes_only: read no tensor data (safetensors: meta tensors from the header; .ckpt: memory-mapped)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        return _safetensors(path, shapes_only)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=shapes_only)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain tensor checkpoint (it would need to run pickled code). "
            f"Convert it to .safetensors in a trusted environment. ({_first_line(e)})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # truncated zip, not a torch file at all
        raise CheckpointError(f"{path}: not a readable checkpoint ({_first_line(e)})") from None
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors (optionally under 'state_dict')")
    return obj


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [e.__class__.__name__])[0]


def check_state_dict(own: dict, sd: dict, what: str) -> None:
    """Compare a module's state dict (real or on the meta device) with checkpoint tensors (or their shapes), key by
    key and shape by shape; one CheckpointError lists every missing, unexpected and wrongly shaped key."""
    shape = lambda v: tuple(getattr(v, "shape", v))  # noqa: E731  (a tensor, or just its shape)
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: checkpoint {shape(sd[k])} vs model {shape(own[k])}"
              for k in own if k in sd and shape(sd[k]) != shape(own[k])]
    if missing or unexpected or shapes:
        lines = [f"{what}: checkpoint does not match the model"]
        for name, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if items:
                lines.append(f"  {name} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise CheckpointError("\n".join(lines))


def strict_load(module: nn.Module, sd: dict, what: str) -> None:
    """load_state_dict(strict=True), but listing every missing, unexpected and wrongly shaped key at once."""
    check_state_dict(module.state_dict(), sd, what)
    module.load_state_dict(sd, strict=True)


def _meta_build(factory, what: str) -> nn.Module:
    try:
        with torch.device("meta"):
            return factory()
    except (TypeError, ValueError, ZeroDivisionError, RuntimeError, AssertionError) as e:
        raise CheckpointError(f"{what}: its config cannot be built ({_first_line(e)})") from None


def build_checked(factory, sd: dict, what: str) -> nn.Module:
    """factory() loaded strictly with `sd`, where the config behind factory may come from a file that lies: the
    module is first built on the meta device (no memory) and every key and shape compared with the tensors, so a
    config wider than its weights is an error before anything is allocated. Then it is materialised: `to_empty`
    when every buffer is in the state dict, else (non-persistent buffers such as CLIP's position_ids need their
    constructor's values) a real build, now known to be the tensors' size."""
    module = _meta_build(factory, what)
    own = module.state_dict()
    check_state_dict(own, sd, what)
    if {n for n, _ in module.named_buffers()} - set(own):
        module = factory()
    else:
        module = module.to_empty(device="cpu")
    module.load_state_dict(sd, strict=True)
    return module


def strip_prefix(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------- UNet

def unet_config_from_state_dict(sd: dict, num_heads: int = 8, num_head_channels: int = -1) -> UNetConfig:
    """Infer every UNet size from tensor shapes of an (unprefixed) original-layout state dict."""
    try:
        conv_in = sd["input_blocks.0.0.weight"]
        mc, in_ch = conv_in.shape[0], conv_in.shape[1]
        out_ch = sd["out.2.weight"].shape[0]
        n_in = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("input_blocks."))
        downs = sorted({int(k.split(".")[1]) for k in sd if re.match(r"input_blocks\.\d+\.0\.op\.weight", k)})
        nrb = downs[0] - 1 if downs else n_in - 1
        levels = len(downs) + 1
        mult, attn = [], []
        for level in range(levels):
            first = 1 + level * (nrb + 1)  # first res block of this level
            mult.append(sd[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0] // mc)
            if f"input_blocks.{first}.1.norm.weight" in sd:
                attn.append(2 ** level)
        mid = "middle_block.1."
        depth = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith(mid + "transformer_blocks."))
        context_dim = sd[mid + "transformer_blocks.0.attn2.to_k.weight"].shape[1]
        linear = sd[mid + "proj_in.weight"].ndim == 2
    except (KeyError, IndexError, ValueError) as e:
        raise CheckpointError(f"UNet weights do not have the SD-1.x layout (could not infer sizes: {e!r})") from None
    return UNetConfig(in_channels=in_ch, out_channels=out_ch, model_channels=mc, channel_mult=tuple(mult),
                      attention_resolutions=tuple(attn), num_res_blocks=nrb, num_heads=num_heads,
                      num_head_channels=num_head_channels, transformer_depth=depth, context_dim=context_dim,
                      use_linear_proj=linear)


def inflate_input_channels(sd: dict, in_channels: int = JEDI_IN_CHANNELS) -> dict:
    """Widen `input_blocks.0.0.weight` from SD's 4 input channels to JeDi's 9: the trained channels are copied,
    the reference and mask channels are zero, so the new model on [x, 0, 0] equals the old one on x."""
    w = sd["input_blocks.0.0.weight"]  # (C, 4, 3, 3)
    if w.shape[1] == in_channels:
        return sd
    if w.shape[1] > in_channels:
        raise CheckpointError(f"cannot narrow the UNet input from {w.shape[1]} to {in_channels} channels")
    wide = w.new_zeros(w.shape[0], in_channels, *w.shape[2:])  # (C, 9, 3, 3)
    wide[:, : w.shape[1]] = w
    return {**sd, "input_blocks.0.0.weight": wide}


def _unet_diffusers_prefixes(c: UNetConfig) -> dict:
    """diffusers module prefix -> our prefix, walking the block layout exactly as UNet.__init__ does."""
    m = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
         "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
         "mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
         "mid_block.resnets.1.": "middle_block.2."}
    L, nrb = len(c.channel_mult), c.num_res_blocks
    for i in range(L):
        for j in range(nrb):
            m[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{1 + i * (nrb + 1) + j}.0."
            m[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{1 + i * (nrb + 1) + j}.1."
        if i < L - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * (nrb + 1)}.0.op."
    for i in range(L):  # up block i is level L-1-i
        has_attn = 2 ** (L - 1 - i) in c.attention_resolutions
        for j in range(nrb + 1):
            m[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{i * (nrb + 1) + j}.0."
            m[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{i * (nrb + 1) + j}.1."
        if i < L - 1:
            m[f"up_blocks.{i}.upsamplers.0.conv."] = f"output_blocks.{i * (nrb + 1) + nrb}.{2 if has_attn else 1}.conv."
    return m


_RESNET_RENAMES = {"norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "time_emb_proj.": "emb_layers.1.",
                   "norm2.": "out_layers.0.", "conv2.": "out_layers.3.", "conv_shortcut.": "skip_connection."}


def _rename_by_prefix(sd: dict, prefixes: dict, what: str) -> dict:
    """Rename every key by its longest matching prefix; a key no prefix matches is an error."""
    out, order = {}, sorted(prefixes, key=len, reverse=True)
    for k, v in sd.items():
        src = next((p for p in order if k.startswith(p)), None)
        if src is None:
            raise CheckpointError(f"{what}: unexpected diffusers key {k}")
        out[prefixes[src] + k[len(src):]] = v
    return out


def convert_diffusers_unet(sd: dict, num_heads: int = 8) -> tuple[dict, UNetConfig]:
    """diffusers `UNet2DConditionModel` state dict -> (our state dict, inferred config)."""
    L = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("down_blocks."))
    nrb = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("down_blocks.0.resnets."))
    attn = tuple(2 ** i for i in range(L) if f"down_blocks.{i}.attentions.0.norm.weight" in sd)
    skeleton = UNetConfig(channel_mult=(1,) * L, num_res_blocks=nrb, attention_resolutions=attn)
    prefixes = _unet_diffusers_prefixes(skeleton)
    for src, dst in list(prefixes.items()):  # resnet internals are named differently too
        if "resnets." in src:
            prefixes.update({src + a: dst + b for a, b in _RESNET_RENAMES.items()})
    ours = _rename_by_prefix(sd, prefixes, "UNet")
    return ours, unet_config_from_state_dict(ours, num_heads=num_heads)


# ----------------------------------------------------------------------------- VAE (diffusers -> original)

_VAE_ATTN_RENAMES = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out.",
                     "query.": "q.", "key.": "k.", "value.": "v.", "proj_attn.": "proj_out."}  # new and old diffusers


def convert_diffusers_vae(sd: dict) -> dict:
    """diffusers `AutoencoderKL` state dict -> original CompVis names (`encoder.down.0.block.0.norm1`, ...)."""
    L = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down_blocks."))
    nrb = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down_blocks.0.resnets."))
    m = {"quant_conv.": "quant_conv.", "post_quant_conv.": "post_quant_conv."}
    for side in ("encoder", "decoder"):
        m.update({f"{side}.conv_in.": f"{side}.conv_in.", f"{side}.conv_out.": f"{side}.conv_out.",
                  f"{side}.conv_norm_out.": f"{side}.norm_out.", f"{side}.mid_block.resnets.0.": f"{side}.mid.block_1.",
                  f"{side}.mid_block.resnets.1.": f"{side}.mid.block_2."})
        m.update({f"{side}.mid_block.attentions.0.{a}": f"{side}.mid.attn_1.{b}" for a, b in _VAE_ATTN_RENAMES.items()})
    for i in range(L):  # decoder up_blocks run from the lowest resolution: up_blocks.i is level L-1-i
        m.update({f"encoder.down_blocks.{i}.resnets.{j}.": f"encoder.down.{i}.block.{j}." for j in range(nrb)})
        m.update({f"decoder.up_blocks.{i}.resnets.{j}.": f"decoder.up.{L - 1 - i}.block.{j}." for j in range(nrb + 1)})
        if i < L - 1:
            m[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = f"encoder.down.{i}.downsample.conv."
            m[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = f"decoder.up.{L - 1 - i}.upsample.conv."
    out = {}
    for k, v in _rename_by_prefix(sd, m, "VAE").items():
        k = k.replace(".conv_shortcut.", ".nin_shortcut.")
        if ".mid.attn_1." in k and v.ndim == 2:  # diffusers stores the 1x1 convs as Linear: (C, C) -> (C, C, 1, 1)
            v = v[:, :, None, None]
        out[k] = v
    return out


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
                self.vae.cast(dtype)  # fp16 keeps the VAE's overflow-prone parts in fp32
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


def read_original_parts(path: str, ema: bool = True, shapes_only: bool = False) -> tuple[dict, dict, dict]:
    """(unet, vae, text) unprefixed state dicts from an original checkpoint or a diffusers folder."""
    if os.path.isdir(path):
        return _read_diffusers_folder(path, shapes_only)
    sd = read_state_dict(path, shapes_only)
    unet = strip_prefix(sd, UNET_PREFIX)
    if ema and any(k.startswith("model_ema.") for k in sd):
        # "full" checkpoints keep the EMA copy as model_ema.<name without dots>; sd-v1-4.ckpt is EMA-only already
        missing = [k for k in unet if "model_ema." + ("diffusion_model." + k).replace(".", "") not in sd]
        if missing:
            raise CheckpointError(f"EMA weights incomplete, e.g. no EMA copy of {missing[:3]} (pass ema=False)")
        unet = {k: sd["model_ema." + ("diffusion_model." + k).replace(".", "")] for k in unet}
    vae = strip_prefix(sd, VAE_PREFIX)
    text = {k: v for k, v in strip_prefix(sd, TEXT_PREFIX).items() if not k.endswith("position_ids")}
    for name, part in (("UNet", unet), ("VAE", vae), ("text encoder", text)):
        if not part:
            raise CheckpointError(f"{path}: no {name} weights found (expected keys under the original SD prefixes)")
    return unet, vae, text


def _read_diffusers_folder(path: str, shapes_only: bool = False) -> tuple[dict, dict, dict]:
    def one(sub, names):
        for n in names:
            f = os.path.join(path, sub, n)
            if os.path.isfile(f):
                return _safetensors(f, shapes_only)
        raise FileNotFoundError(f"diffusers folder {path}: expected {sub}/{names[0]}")

    unet = one("unet", ["diffusion_pytorch_model.safetensors"])
    vae = one("vae", ["diffusion_pytorch_model.safetensors"])
    text = one("text_encoder", ["model.safetensors"])
    unet_ours, _ = convert_diffusers_unet(unet)
    return unet_ours, convert_diffusers_vae(vae), {k: v for k, v in text.items() if not k.endswith("position_ids")}


def _sd_parts(path: str, num_heads: int, ema: bool, in_channels: int | None, shapes_only: bool) -> dict:
    """name -> (module factory, its state dict) of an original SD-1.x checkpoint or diffusers folder, every size
    inferred from the tensors; every error a CheckpointError whose message starts with the path."""
    from .conditioner import EncoderSpec, TextConditioner, TextConditionerConfig
    from .text import convert_original_text_state_dict, text_config_from_state_dict
    from .vae import AutoencoderKL, vae_config_from_state_dict

    try:
        unet_sd, vae_sd, text_sd = read_original_parts(path, ema=ema, shapes_only=shapes_only)
    except CheckpointError as e:
        raise CheckpointError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None
    except (KeyError, ValueError) as e:  # a diffusers folder whose tensors are not SD's
        raise CheckpointError(f"{path}: not an SD-1.x layout ({_first_line(e)})") from None
    try:
        if in_channels is not None:
            unet_sd = inflate_input_channels(unet_sd, in_channels)
        unet_config = unet_config_from_state_dict(unet_sd, num_heads=num_heads)
        vae_config = vae_config_from_state_dict(vae_sd)
        text_sd = convert_original_text_state_dict(text_sd)
        text_config = TextConditionerConfig([EncoderSpec(text_config_from_state_dict(text_sd))])  # SD-1.x's
    except (CheckpointError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: {_first_line(e)}") from None
    return {"UNet": (lambda: UNet(unet_config), unet_sd), "VAE": (lambda: AutoencoderKL(vae_config), vae_sd),
            "text encoder": (lambda: TextConditioner(text_config), {f"encoders.0.{k}": v for k, v in text_sd.items()})}


def load_sd(path: str, num_heads: int = 8, ema: bool = True, in_channels: int | None = JEDI_IN_CHANNELS,
            device="cpu", dtype=torch.float32) -> JeDi:
    """UNet, VAE and text conditioner from an original SD-1.x `.ckpt`/`.safetensors` or a diffusers folder.

    num_heads: attention heads of the UNet (the one size shapes cannot tell; 8 for SD-1.x).
    ema: take the `model_ema.*` copy when the checkpoint has one (sd-v1-4.ckpt holds only EMA weights).
    in_channels: JeDi's 9 (inflated, zero-initialised extra channels); None keeps the checkpoint's.
    Every error is a CheckpointError whose message starts with the path.
    """
    parts = {name: build_checked(factory, sd, f"{path}: {name}").eval()
             for name, (factory, sd) in _sd_parts(path, num_heads, ema, in_channels, shapes_only=False).items()}
    # SD-1.x: 512 px, SD's schedule and eps-prediction (Diffusion()'s defaults), no sampling defaults of its own
    meta = dict(resolution=512, diffusion={}, space="latent")
    return JeDi(parts["UNet"], parts["VAE"], parts["text encoder"], meta).to(device, dtype)


def check_sd(path: str, num_heads: int = 8, ema: bool = True, in_channels: int | None = JEDI_IN_CHANNELS) -> dict:
    """Everything load_sd checks, reading no tensor data (safetensors headers; a .ckpt memory-mapped): for entry
    points that must refuse a bad checkpoint before they write anything (s3.py). Returns the UNet config."""
    parts = _sd_parts(path, num_heads, ema, in_channels, shapes_only=True)
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
                        ("transformer_depth", c.transformer_depth, MAX_DEPTH), ("context_dim", c.context_dim, 16384),
                        ("norm_groups", c.norm_groups, 1024)):
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            _int_in(path, f"unet.{name}", x, 1, hi)
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
             "text encoder": (lambda: TextConditioner(tcfg), text)}
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
