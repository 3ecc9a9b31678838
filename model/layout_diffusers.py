"""Reader of the diffusers folder layout (`unet/`, `vae/`, `text_encoder/`, SDXL also `text_encoder_2/`).

The UNet and VAE tensors are renamed into the original names our modules carry, by walking the same block layout
the constructors walk; the text encoders stay in transformers' names (they are transformers' CLIP classes).
SDXL is told from `text_encoder_2/`, and must agree with its UNet (diffusers' `add_embedding`, our `label_emb`).
"""
import os

from .checkpoint import CheckpointError, read_state_dict
from .flavours import FLAVOURS, flavour_of_unet
from .layout_original import Parts, unet_config_from_state_dict
from .unet import UNetConfig

# ----------------------------------------------------------------------------- UNet


def _unet_diffusers_prefixes(c: UNetConfig) -> dict:
    """diffusers module prefix -> our prefix, walking the block layout exactly as UNet.__init__ does."""
    m = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
         "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",  # SDXL's text_time
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


def _rename_by_prefix(keys, prefixes: dict, what: str) -> dict:
    """old key -> new key by its longest matching prefix; a key no prefix matches is an error."""
    out, order = {}, sorted(prefixes, key=len, reverse=True)
    for k in keys:
        src = next((p for p in order if k.startswith(p)), None)
        if src is None:
            raise CheckpointError(f"{what}: unexpected diffusers key {k}")
        out[k] = prefixes[src] + k[len(src):]
    return out


def diffusers_unet_names(keys) -> dict:
    """diffusers `UNet2DConditionModel` key -> our key, for every key (transformer blocks keep their inner names,
    so per-level depth needs nothing more than the block walk)."""
    keys = list(keys)
    try:
        L = 1 + max(int(k.split(".")[1]) for k in keys if k.startswith("down_blocks."))
        nrb = 1 + max(int(k.split(".")[3]) for k in keys if k.startswith("down_blocks.0.resnets."))
    except ValueError:
        raise CheckpointError("UNet: not a diffusers UNet2DConditionModel (no down_blocks)") from None
    attn = tuple(2 ** i for i in range(L) if f"down_blocks.{i}.attentions.0.norm.weight" in keys)
    skeleton = UNetConfig(channel_mult=(1,) * L, num_res_blocks=nrb, attention_resolutions=attn)
    prefixes = _unet_diffusers_prefixes(skeleton)
    for src, dst in list(prefixes.items()):  # resnet internals are named differently too
        if "resnets." in src:
            prefixes.update({src + a: dst + b for a, b in _RESNET_RENAMES.items()})
    return _rename_by_prefix(keys, prefixes, "UNet")


def convert_diffusers_unet(sd: dict, num_heads: int | None = None,
                           num_head_channels: int | None = None) -> tuple[dict, UNetConfig]:
    """diffusers `UNet2DConditionModel` state dict -> (our state dict, inferred config). Heads: as given, else
    the flavour's (see unet_config_from_state_dict)."""
    ours = {new: sd[old] for old, new in diffusers_unet_names(sd).items()}
    return ours, unet_config_from_state_dict(ours, num_heads=num_heads, num_head_channels=num_head_channels)


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
    for old, k in _rename_by_prefix(sd, m, "VAE").items():
        v = sd[old]
        k = k.replace(".conv_shortcut.", ".nin_shortcut.")
        if ".mid.attn_1." in k and v.ndim == 2:  # diffusers stores the 1x1 convs as Linear: (C, C) -> (C, C, 1, 1)
            v = v[:, :, None, None]
        out[k] = v
    return out


# ----------------------------------------------------------------------------- the folder

def read_diffusers(path: str, shapes_only: bool = False) -> Parts:
    """The parts of a diffusers pipeline folder (SD-1.x or SDXL), UNet and VAE in our names. shapes_only: read no
    tensor data (safetensors headers)."""
    def one(sub, name):
        f = os.path.join(path, sub, name)
        if not os.path.isfile(f):
            raise CheckpointError(f"{path}: diffusers folder without {sub}/{name}")
        return read_state_dict(f, shapes_only)

    flavour = FLAVOURS["sdxl" if os.path.isdir(os.path.join(path, "text_encoder_2")) else "sd1"]
    unet, _ = convert_diffusers_unet(one("unet", "diffusion_pytorch_model.safetensors"))
    if flavour_of_unet(unet) is not flavour:
        raise CheckpointError(f"{path}: a diffusers {flavour.name} folder whose UNet is not {flavour.name}'s "
                              f"({'no' if flavour.name == 'sdxl' else 'an'} add_embedding)")
    vae = convert_diffusers_vae(one("vae", "diffusion_pytorch_model.safetensors"))
    subs = {"0": "text_encoder", "1": "text_encoder_2"} if flavour.name == "sdxl" else {"0": "text_encoder"}
    text = {i: {k: v for k, v in one(sub, "model.safetensors").items() if not k.endswith("position_ids")}
            for i, sub in subs.items()}
    return Parts(flavour, unet, vae, text, "diffusers")


def diffusers_unet_kwargs(cfg, sample_size: int) -> dict:
    """`UNet2DConditionModel(**kwargs)` arguments for the same architecture as our UNetConfig (SD-1.x's or SDXL's):
    per-level depth (1 where a level has no attention), heads per level (diffusers calls the head count
    `attention_head_dim`), and SDXL's text_time vector input (pooled text + six size numbers through its own
    256-wide sinusoids) when adm_in_channels is set. For the parity tests and the benchmarks' diffusers baseline."""
    from .conditioning import MICRO_FEATURES

    L = len(cfg.channel_mult)
    attn = [2 ** i in cfg.attention_resolutions for i in range(L)]
    chans = tuple(cfg.model_channels * m for m in cfg.channel_mult)
    kw = dict(sample_size=sample_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
              down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
              up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
              block_out_channels=chans, layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.context_dim,
              transformer_layers_per_block=tuple(max(d, 1) for d in cfg.transformer_depth),  # 1 where no attention
              attention_head_dim=tuple(cfg.heads(c)[0] for c in chans), use_linear_projection=cfg.use_linear_proj,
              norm_num_groups=cfg.norm_groups)
    if cfg.transformer_depth_middle != max(cfg.transformer_depth[-1], 1):
        raise ValueError("diffusers' middle block takes the last level's depth")
    if cfg.adm_in_channels is not None:
        kw.update(addition_embed_type="text_time", addition_time_embed_dim=MICRO_FEATURES,
                  projection_class_embeddings_input_dim=cfg.adm_in_channels)
    return kw
