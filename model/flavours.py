"""The base models we load, and the few facts about each that tensor shapes cannot tell.

Everything else (widths, depths, levels, channels) is inferred from a checkpoint's shapes; what is here is what a
loader must be told: the UNet's head layout (SD-1.x fixes the head count, SDXL the head dim), the VAE's latent
scale and whether it must stay fp32 under fp16, the text conditioner's kind, and the resolution the model was trained
at. `unet` is the full-size UNet config (JeDi's 9 input channels come from inflation, so in_channels is the base
model's 4): flops.py and the configs use it, and tests check it against the published sizes.

    flavour = FLAVOURS["sdxl"]                        # or flavour_of_unet(unet_state_dict)
    unet_config_from_state_dict(sd, **flavour.heads)  # the sizes from shapes, the heads from here
"""
from dataclasses import dataclass, field

from .unet import UNetConfig


@dataclass(frozen=True)
class Flavour:
    name: str
    heads: dict  # UNetConfig's head layout: num_heads (fixed count) or num_head_channels (fixed dim)
    vae_scale: float  # VAE latents · vae_scale = the latents the UNet is trained on
    context_dim: int  # width of the text states the UNet attends to
    text: str  # which text conditioner: "sd1" (CLIP ViT-L/14, last layer), "sdxl" (ViT-L + bigG, penultimate, pooled)
    resolution: int  # pixels per side it was trained at (the sampling default)
    unet: UNetConfig = field(compare=False)  # the full-size UNet (base in_channels, 4)
    # VAEConfig.force_upcast: the whole VAE stays fp32 when the model is cast to fp16 (SDXL's overflows fp16; SD-1.x
    # keeps only its encoder and up path fp32: AutoencoderKL.cast)
    vae_force_upcast: bool = False


FLAVOURS = {
    # CompVis v1-inference.yaml: num_heads 8 (head dims 40/80/160), depth 1, context 768, conv proj_in/proj_out
    "sd1": Flavour("sd1", dict(num_heads=8), 0.18215, 768, "sd1", 512, UNetConfig(in_channels=4)),
    # Stability sd_xl_base.yaml: three levels, attention at factors 2 and 4 with depths 2 and 10 (middle 10), head
    # dim 64 (10 and 20 heads), linear proj, context 2048 (768 + 1280), adm_in_channels 2816 (1280 pooled + 6·256)
    "sdxl": Flavour("sdxl", dict(num_head_channels=64), 0.13025, 2048, "sdxl", 1024, UNetConfig(
        in_channels=4, model_channels=320, channel_mult=(1, 2, 4), attention_resolutions=(2, 4), num_res_blocks=2,
        num_head_channels=64, transformer_depth=(0, 2, 10), transformer_depth_middle=10, context_dim=2048,
        use_linear_proj=True, adm_in_channels=2816), vae_force_upcast=True),
}


def flavour_of_unet(sd: dict) -> Flavour:
    """The flavour of an (unprefixed, original-layout) UNet state dict: SDXL has the vector input `label_emb`."""
    return FLAVOURS["sdxl" if "label_emb.0.0.weight" in sd else "sd1"]
