"""AutoencoderKL: Stable Diffusion's first stage, written with the original CompVis module names.

An original checkpoint's ``first_stage_model.*`` tensors load into ``AutoencoderKL`` with a prefix
strip and a strict load (``vae_from_state_dict`` does both). Layout as in
``ldm/modules/diffusionmodules/model.py``: ``encoder.down.{level}.block.{i}``,
``encoder.down.{level}.downsample.conv``, ``encoder.mid.{block_1,attn_1,block_2}``, ``encoder.norm_out``,
``encoder.conv_out``, ``quant_conv``, ``post_quant_conv``, ``decoder.mid.*``, ``decoder.up.{level}.block.{i}``,
``decoder.up.{level}.upsample.conv``, ``decoder.norm_out``, ``decoder.conv_out``; ResnetBlocks hold
``norm1, conv1, norm2, conv2`` and ``nin_shortcut`` when the width changes.

``VAEConfig`` fields (all sizes, nothing tied to an image resolution): ``ch, ch_mult, num_res_blocks,
z_channels, embed_dim, in_channels, out_ch, double_z, dropout``; ``scale_factor`` (0.18215 for
SD-1.x, 0.13025 for SDXL), the factor between VAE latents and the latents the UNet is trained on; and
``force_upcast`` (SDXL), which keeps the whole VAE in fp32 when the model is cast to fp16. CompVis keeps
``attn_resolutions`` too; SD's VAE has attention only in the mid blocks, so this one does as well.
"""
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import attention

SD_SCALE_FACTOR = 0.18215


@dataclass
class VAEConfig:
    """Defaults are the SD-1.x VAE (``first_stage_config.params.ddconfig`` of v1-inference.yaml)."""

    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    in_channels: int = 3
    out_ch: int = 3
    double_z: bool = True  # the encoder emits mean and logvar
    dropout: float = 0.0
    scale_factor: float = SD_SCALE_FACTOR  # VAE latents * scale_factor = the latents the UNet is trained on
    # True: cast(fp16) keeps every weight fp32 (SDXL's VAE overflows fp16 in its mid block too; diffusers' name).
    # A fine-tune made for fp16 (e.g. sdxl-vae-fp16-fix) can set it False.
    force_upcast: bool = False

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)
        if not self.double_z:
            raise ValueError("AutoencoderKL needs double_z=True: its posterior is a Gaussian with mean and logvar")
        if not isinstance(self.force_upcast, bool):
            raise ValueError(f"force_upcast must be true or false, got {self.force_upcast!r}")

    def to_dict(self):
        return asdict(self)


def Normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    # CompVis' ResnetBlock with temb_channels=0 (the VAE has no timestep) and conv_shortcut=False.
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions; q, k, v, proj_out are 1x1 convs as in CompVis."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        # (B, C, H, W) -> (B, HW, 1, C): one head whose dim is the channel count; scale c**-0.5 is the default.
        q, k, v = (t.flatten(2).transpose(1, 2).unsqueeze(2) for t in (self.q(hn), self.k(hn), self.v(hn)))
        out = attention(q, k, v)  # (B, HW, 1, C)
        out = out.squeeze(2).transpose(1, 2).reshape(b, c, h, w)  # (B, HW, 1, C) -> (B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # CompVis pads right/bottom only, then a stride-2 conv without padding: H -> H/2 for even H.
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid_block(channels: int, dropout: float) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels, dropout)
    return mid


class Encoder(nn.Module):
    def __init__(self, *, ch, ch_mult, num_res_blocks, z_channels, in_channels, double_z=True, dropout=0.0):
        super().__init__()
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_ch_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            block_in, block_out = ch * in_ch_mult[level], ch * mult
            down = nn.Module()
            down.block = nn.ModuleList()
            for _ in range(num_res_blocks):
                down.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
            if level != len(ch_mult) - 1:  # no downsampling after the last level: total factor 2**(levels-1)
                down.downsample = Downsample(block_in)
            self.down.append(down)
        self.mid = _mid_block(block_in, dropout)
        self.norm_out = Normalize(block_in)
        # double_z: the encoder emits mean and logvar, stacked on channels.
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for down in self.down:
            for block in down.block:
                h = block(h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, *, ch, ch_mult, num_res_blocks, z_channels, out_ch, dropout=0.0):
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _mid_block(block_in, dropout)
        # Built from the deepest level up, but indexed like the encoder (up.0 is full resolution),
        # which is how the original checkpoint names it.
        up_levels = []
        for level in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[level]
            up = nn.Module()
            up.block = nn.ModuleList()
            for _ in range(num_res_blocks + 1):  # one more block than the encoder, as in CompVis
                up.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
            if level != 0:
                up.upsample = Upsample(block_in)
            up_levels.insert(0, up)
        self.up = nn.ModuleList(up_levels)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        h = h.to(self.conv_out.weight.dtype)  # the up path may be kept in fp32 (AutoencoderKL.cast)
        for up in reversed(self.up):
            for block in up.block:
                h = block(h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """The posterior q(z|x): mean and log-variance stacked on channels, as CompVis' DiagonalGaussianDistribution."""

    def __init__(self, parameters: torch.Tensor):
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # same clamp as CompVis and diffusers
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # Draws noise exactly as diffusers does (torch.randn with the generator), so seeds match.
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = c = config
        self.scale_factor = c.scale_factor  # a plain attribute: it is not in the checkpoint's VAE tensors
        self.encoder = Encoder(ch=c.ch, ch_mult=c.ch_mult, num_res_blocks=c.num_res_blocks, z_channels=c.z_channels,
                               in_channels=c.in_channels, double_z=c.double_z, dropout=c.dropout)
        self.decoder = Decoder(ch=c.ch, ch_mult=c.ch_mult, num_res_blocks=c.num_res_blocks, z_channels=c.z_channels,
                               out_ch=c.out_ch, dropout=c.dropout)
        self.quant_conv = nn.Conv2d(2 * c.z_channels, 2 * c.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.z_channels, 1)

    def cast(self, dtype: torch.dtype) -> "AutoencoderKL":
        """Cast the weights for inference in `dtype`. In fp16 the encoder and the decoder's up path (up blocks,
        norm_out, conv_out) stay fp32: SD's VAE activations there pass fp16's 65504 and the decode turns to inf/NaN
        (diffusers' upcast_vae keeps the same split). post_quant_conv, decoder.conv_in and decoder.mid run in fp16
        (the mid attention goes through SDPA, which does not overflow). With config.force_upcast (SDXL) all of it
        stays fp32, as diffusers' force_upcast does: SDXL's activations overflow before the up path too. Either way
        encode and decode take fp16 inputs and return fp32. bf16 has fp32's range: all of it is cast."""
        if dtype == torch.float16 and self.config.force_upcast:
            return self.float()
        self.to(dtype)
        if dtype == torch.float16:
            for m in (self.encoder, self.quant_conv, self.decoder.up, self.decoder.norm_out, self.decoder.conv_out):
                m.float()
        return self

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x: (B, in_channels, H, W) in [-1, 1] -> posterior over unscaled latents (B, embed_dim, H/f, W/f)."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x.to(self.quant_conv.weight.dtype))))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, embed_dim, h, w) -> image (B, out_ch, h*f, w*f)."""
        return self.decoder(self.post_quant_conv(z.to(self.post_quant_conv.weight.dtype)))

    def forward(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None):
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior

    def encode_latents(self, x: torch.Tensor, sample: bool = False,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Image -> the latents the UNet sees (multiplied by scale_factor). Mode by default, a draw if sample."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return z * self.scale_factor

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """UNet-space latents -> image: undo scale_factor, then decode. The division is in the wider of the latents'
        and the weights' dtypes: fp16 latents into a VAE kept fp32 (force_upcast) are upcast first, as diffusers
        does; every other pairing divides as before."""
        return self.decode(z.to(torch.promote_types(z.dtype, self.post_quant_conv.weight.dtype)) / self.scale_factor)


def _find_prefix(sd: dict, anchor: str = "encoder.conv_in.weight") -> str:
    # Accepts bare VAE keys or any prefix ("first_stage_model.", "vae.") in front of them.
    hits = [k[: -len(anchor)] for k in sd if k.endswith(anchor)]
    if len(hits) != 1:
        raise KeyError(f"expected exactly one key ending in {anchor!r}, found {len(hits)}")
    return hits[0]


def vae_config_from_state_dict(sd: dict, **overrides) -> VAEConfig:
    """Infer the VAE config from tensor shapes (keys bare or prefixed). scale_factor and force_upcast cannot be
    inferred: they default to SD-1.x's (0.18215, False) unless overridden (the flavour's); so does dropout."""
    p = _find_prefix(sd)

    def shape(key: str) -> tuple:
        if p + key not in sd:
            raise KeyError(f"cannot infer the VAE config: missing {p + key!r}")
        return tuple(sd[p + key].shape)

    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = 0
    while p + f"encoder.down.{levels}.block.0.conv1.weight" in sd:
        levels += 1
    if levels == 0:
        raise KeyError(f"cannot infer the VAE config: no {p}encoder.down.0.block.0.* tensors")
    ch_mult = []
    for level in range(levels):
        width = shape(f"encoder.down.{level}.block.0.conv1.weight")[0]  # conv1 out = the level's width
        if width % ch:
            raise ValueError(f"encoder.down.{level} width {width} is not a multiple of ch={ch}")
        ch_mult.append(width // ch)
    num_res_blocks = 0
    while p + f"encoder.down.0.block.{num_res_blocks}.conv1.weight" in sd:
        num_res_blocks += 1
    z_channels = shape("decoder.conv_in.weight")[1]
    enc_out = shape("encoder.conv_out.weight")[0]
    if enc_out != 2 * z_channels:
        raise ValueError(f"encoder.conv_out emits {enc_out} channels, expected 2*z_channels={2 * z_channels} "
                         "(mean and logvar, double_z=True)")
    embed_dim = shape("post_quant_conv.weight")[1]  # Conv2d(embed_dim, z_channels, 1)
    out_ch = shape("decoder.conv_out.weight")[0]
    return VAEConfig(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, z_channels=z_channels,
                           embed_dim=embed_dim, in_channels=in_channels, out_ch=out_ch, **overrides)


def vae_from_state_dict(sd: dict, **overrides) -> AutoencoderKL:
    """Build a VAE sized from the tensors and load them strictly (bare or prefixed keys; other prefixes ignored)."""
    from .loading import strict_load

    p = _find_prefix(sd)
    vae_sd = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
    vae = AutoencoderKL(vae_config_from_state_dict(vae_sd, **overrides))
    strict_load(vae, vae_sd, "VAE")
    return vae
