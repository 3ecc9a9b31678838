"""Reader of the original single-file layout (CompVis SD-1.x `.ckpt`/`.safetensors`, Stability's SDXL file).

Our modules carry the original names, so reading is a prefix strip per part; the UNet's sizes are inferred from
tensor shapes (only the head layout cannot be: it comes from the model flavour). Which flavour a file is, is told
from the keys present:

    SD-1.x: model.diffusion_model.*  first_stage_model.*  cond_stage_model.transformer.*
    SDXL:   model.diffusion_model.*  first_stage_model.*  conditioner.embedders.0.transformer.* (CLIP ViT-L, in
            transformers' layout)  conditioner.embedders.1.model.* (OpenCLIP ViT-bigG, in open_clip's layout)
"""
import re
from dataclasses import dataclass

from .checkpoint import CheckpointError, read_state_dict, strip_prefix
from .flavours import FLAVOURS, Flavour, flavour_of_unet
from .unet import JEDI_IN_CHANNELS, UNetConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES = {  # text encoder index -> prefix in the original file, per flavour
    "sd1": {"0": "cond_stage_model.transformer."},
    "sdxl": {"0": "conditioner.embedders.0.transformer.", "1": "conditioner.embedders.1.model."},
}


@dataclass(eq=False)
class Parts:
    """A base model's tensors, unprefixed, as read from a file or folder (nothing built yet)."""
    flavour: Flavour
    unet: dict  # our (original) UNet names
    vae: dict  # our (original CompVis) VAE names
    text: dict  # text encoder index ("0"; SDXL also "1") -> its state dict, in `text_layout`
    text_layout: str  # "original": encoder 0 in transformers' CLIP names, SDXL's encoder 1 in open_clip's;
    #                   "diffusers": both in transformers' names (CLIPTextModel, CLIPTextModelWithProjection)


def flavour_of_original(sd: dict) -> Flavour:
    """SDXL files hold their text encoders under conditioner.embedders.*, SD-1.x under cond_stage_model.*; a file
    with neither (a UNet alone) is told by its UNet (SDXL has label_emb)."""
    if any(k.startswith("conditioner.embedders.") for k in sd):
        return FLAVOURS["sdxl"]
    if any(k.startswith("cond_stage_model.") for k in sd):
        return FLAVOURS["sd1"]
    return flavour_of_unet(strip_prefix(sd, UNET_PREFIX))


def read_original(path: str, ema: bool = True, shapes_only: bool = False) -> Parts:
    """The parts of an original single-file checkpoint. ema: take the `model_ema.*` copy of the UNet when there is
    one; shapes_only: read no tensor data (see read_state_dict)."""
    sd = read_state_dict(path, shapes_only)
    flavour = flavour_of_original(sd)
    unet = strip_prefix(sd, UNET_PREFIX)
    if ema and any(k.startswith("model_ema.") for k in sd):
        # "full" checkpoints keep the EMA copy as model_ema.<name without dots>; sd-v1-4.ckpt is EMA-only already
        missing = [k for k in unet if "model_ema." + ("diffusion_model." + k).replace(".", "") not in sd]
        if missing:
            raise CheckpointError(f"EMA weights incomplete, e.g. no EMA copy of {missing[:3]} (pass ema=False)")
        unet = {k: sd["model_ema." + ("diffusion_model." + k).replace(".", "")] for k in unet}
    vae = strip_prefix(sd, VAE_PREFIX)
    text = {i: {k: v for k, v in strip_prefix(sd, p).items() if not k.endswith("position_ids")}
            for i, p in TEXT_PREFIXES[flavour.name].items()}
    parts = [("UNet", unet, UNET_PREFIX), ("VAE", vae, VAE_PREFIX)]
    parts += [(f"text encoder {i}" if len(text) > 1 else "text encoder", text[i], TEXT_PREFIXES[flavour.name][i])
              for i in text]
    for name, part, prefix in parts:
        if not part:
            raise CheckpointError(f"{path}: no {name} weights found (expected keys under {prefix}, "
                                  f"the original {flavour.name} layout)")
    if flavour_of_unet(unet) is not flavour:
        raise CheckpointError(f"{path}: an {flavour.name} file whose UNet is not {flavour.name}'s "
                              f"({'no' if flavour.name == 'sdxl' else 'a'} label_emb)")
    return Parts(flavour, unet, vae, text, "original")


def _heads(sd: dict, num_heads: int | None, num_head_channels: int | None) -> dict:
    """The head layout: the one given, else the flavour's (SD-1.x 8 heads, SDXL head dim 64)."""
    if num_head_channels:
        return dict(num_head_channels=num_head_channels)
    if num_heads:
        return dict(num_heads=num_heads)
    return flavour_of_unet(sd).heads


def unet_config_from_state_dict(sd: dict, num_heads: int | None = None,
                                num_head_channels: int | None = None) -> UNetConfig:
    """Infer every UNet size from tensor shapes of an (unprefixed) original-layout state dict: levels, widths,
    transformer blocks counted per level and in the middle, context width, proj kind, label_emb's width.
    Heads (shapes cannot tell): num_heads or num_head_channels when given (> 0), else the flavour's."""
    def depth(prefix):  # transformer blocks of the SpatialTransformer at `prefix`, 0 if there is none
        blocks = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
        return 1 + max(blocks) if blocks else 0

    try:
        conv_in = sd["input_blocks.0.0.weight"]
        mc, in_ch = conv_in.shape[0], conv_in.shape[1]
        out_ch = sd["out.2.weight"].shape[0]
        n_in = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("input_blocks."))
        downs = sorted({int(k.split(".")[1]) for k in sd if re.match(r"input_blocks\.\d+\.0\.op\.weight", k)})
        nrb = downs[0] - 1 if downs else n_in - 1
        levels = len(downs) + 1
        mult, attn, depths = [], [], []
        for level in range(levels):
            first = 1 + level * (nrb + 1)  # first res block of this level
            mult.append(sd[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0] // mc)
            depths.append(depth(f"input_blocks.{first}.1.transformer_blocks."))
            if depths[-1]:
                attn.append(2 ** level)
        mid = "middle_block.1."
        context_dim = sd[mid + "transformer_blocks.0.attn2.to_k.weight"].shape[1]
        linear = sd[mid + "proj_in.weight"].ndim == 2
        adm = sd["label_emb.0.0.weight"].shape[1] if "label_emb.0.0.weight" in sd else None
    except (KeyError, IndexError, ValueError) as e:
        raise CheckpointError(f"UNet weights do not have the SD layout (could not infer sizes: {e!r})") from None
    return UNetConfig(in_channels=in_ch, out_channels=out_ch, model_channels=mc, channel_mult=tuple(mult),
                      attention_resolutions=tuple(attn), num_res_blocks=nrb, transformer_depth=tuple(depths),
                      transformer_depth_middle=depth(mid + "transformer_blocks."), context_dim=context_dim,
                      use_linear_proj=linear, adm_in_channels=adm, **_heads(sd, num_heads, num_head_channels))


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
