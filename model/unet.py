"""The Stable Diffusion UNet (1.x and XL), written from scratch with the original CompVis/Stability module names,
plus JeDi's two changes: coupled self-attention across the images of a set, and a 9-channel input.

Module names follow `openaimodel.py` (CompVis ldm, Stability sgm), so an original checkpoint loads
with a prefix strip and `load_state_dict(strict=True)`: `input_blocks.1.1.transformer_blocks.0.attn1.to_q`.
One class covers both: SDXL is the same topology with three levels, per-level transformer depth, a fixed
head dim of 64, linear projections, and `label_emb`, the ADM vector input (pooled text + size features).

Batch convention: every tensor is flat over images, `(B·N, ...)`, images of one set consecutive.
`set_size=N` is a forward argument; only `attn1` regroups its tokens `(B·N, HW, C) -> (B, N·HW, C)`, so
every image of a set attends to every location of every image of the set. `attn2` (text) and the
feed-forward stay per image. `set_size=1` is exactly Stable Diffusion.

JeDi input channels (the one place this order is written down):
    x = cat([x_t (4), reference latent (4), mask (1)], dim=1)        # (B·N, 9, h, w)
    mask = 1 for an image whose clean latent is given as reference, 0 for an image to generate;
    the reference channels are zeros where mask = 0.
(The paper's text and its eq. 2 disagree on the mask polarity; we follow eq. 2, x̂ = x ⊙ M. SD's own
inpainting checkpoints use a different order, [x_t, mask, masked latent].)
"""
import math
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import attention

from .conditioning import Cond

LATENT_CHANNELS = 4
JEDI_IN_CHANNELS = 2 * LATENT_CHANNELS + 1  # [x_t, reference, mask]


@dataclass
class UNetConfig:
    in_channels: int = JEDI_IN_CHANNELS
    out_channels: int = LATENT_CHANNELS
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)
    attention_resolutions: tuple = (1, 2, 4)  # downsampling factors with a SpatialTransformer, as in CompVis yaml
    num_res_blocks: int = 2
    num_heads: int = 8  # SD-1.x: fixed head count, so head dims are 40/80/160
    num_head_channels: int = -1  # SDXL: fixed head dim 64 instead (overrides num_heads when > 0; num_heads is then -1)
    # Transformer blocks per SpatialTransformer, per level (SDXL: (0, 2, 10)); an int means every level, as in
    # SD-1.x configs and older checkpoint metadata. Stored per level, 0 where the level has no attention.
    transformer_depth: tuple = 1
    transformer_depth_middle: int | None = None  # None: the last level's depth, as sgm (SDXL: 10)
    context_dim: int = 768
    use_linear_proj: bool = False  # SD-1.x proj_in/proj_out are 1x1 convs; SD-2 and SDXL use Linear
    norm_groups: int = 32
    adm_in_channels: int | None = None  # SDXL: 2816, the width of y (label_emb's input); None: no vector input

    def __post_init__(self):
        L = len(self.channel_mult)
        self.channel_mult = tuple(self.channel_mult)
        self.attention_resolutions = tuple(sorted(self.attention_resolutions))
        depth = self.transformer_depth
        depth = (depth,) * L if isinstance(depth, int) else tuple(depth)
        if len(depth) != L:
            raise ValueError(f"UNetConfig: transformer_depth {depth} has {len(depth)} levels, channel_mult has {L}")
        if self.transformer_depth_middle is None:
            self.transformer_depth_middle = depth[-1]
        attn = [2 ** i in self.attention_resolutions for i in range(L)]
        if any(a and d < 1 for a, d in zip(attn, depth)):
            raise ValueError(f"UNetConfig: transformer_depth {depth} is 0 at a level with attention "
                             f"(attention_resolutions {self.attention_resolutions})")
        self.transformer_depth = tuple(d if a else 0 for a, d in zip(attn, depth))  # attention_resolutions rules (sgm)
        if self.num_head_channels > 0:
            self.num_heads = -1
        elif self.num_heads < 1:
            raise ValueError("UNetConfig: set num_heads (SD-1.x) or num_head_channels (SDXL)")

    def heads(self, channels: int) -> tuple[int, int]:
        """(heads, head dim) of a SpatialTransformer on `channels` channels."""
        if self.num_head_channels > 0:
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads

    def to_dict(self):
        return asdict(self)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, ordered [cos, sin] as in CompVis. t: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def zero_module(m: nn.Module) -> nn.Module:
    """Zero-init the last layer of each residual branch (as CompVis): a fresh block starts as the identity."""
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


class GroupNorm32(nn.GroupNorm):
    """GroupNorm in the activations' dtype. CompVis upcasts x to fp32 and casts back; PyTorch's group_norm kernels
    (CUDA and CPU) already accumulate mean and variance in fp32 for fp16/bf16 inputs and round once on output, so
    the round trip only added two passes over every activation (H200, bf16, 512 px set of 4, same run: 41.2 ->
    38.9 ms per UNet call; bench/results/2026-11-27-h200-run2). The name stays: it is what CompVis calls it."""

    def forward(self, x):
        w = self.weight.to(x.dtype) if self.weight is not None else None  # no-op unless params and x differ
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.group_norm(x, self.num_groups, w, b, self.eps)


class ResBlock(nn.Module):
    def __init__(self, channels, emb_channels, out_channels, groups=32):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_channels), nn.SiLU(), nn.Dropout(0.0), zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]  # (B·N, C) -> (B·N, C, 1, 1)
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class CrossAttention(nn.Module):
    """Multi-head attention; self-attention when context is None. `set_size` > 1 couples the images of a set."""

    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=40):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads, self.dim_head = heads, dim_head
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x, context=None, set_size=1):
        BN, L, _ = x.shape
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        # Coupling: (B·N, L, H·D) -> (B, N·L, H, D). Images of a set are consecutive, so this is a view.
        # With context (cross-attention) set_size must be 1: each image attends to its own prompt.
        B = BN // set_size
        q = q.reshape(B, set_size * L, self.heads, self.dim_head)  # (B·N, L, H·D) -> (B, N·L, H, D)
        k = k.reshape(B, -1, self.heads, self.dim_head)  # (B·N, Lk, H·D) -> (B, N·Lk, H, D)
        v = v.reshape(B, -1, self.heads, self.dim_head)  # same as k
        out = attention(q, k, v)  # (B, N·L, H, D)
        return self.to_out(out.reshape(BN, L, self.heads * self.dim_head))  # back to per image


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, heads, dim_head, context_dim):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)  # self-attention, coupled across the set
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)  # to the image's own text
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context, set_size=1):
        x = x + self.attn1(self.norm1(x), set_size=set_size)
        x = x + self.attn2(self.norm2(x), context=context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, channels, heads, dim_head, depth, context_dim, use_linear_proj=False, groups=32):
        super().__init__()
        inner = heads * dim_head
        self.use_linear_proj = use_linear_proj
        self.norm = GroupNorm32(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear_proj else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)]
        )
        self.proj_out = zero_module(nn.Linear(inner, channels) if use_linear_proj else nn.Conv2d(inner, channels, 1))

    def forward(self, x, context, set_size=1):
        BN, C, H, W = x.shape
        h = self.norm(x)
        if not self.use_linear_proj:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(BN, H * W, -1)  # (B·N, C, H, W) -> (B·N, HW, C)
        if self.use_linear_proj:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context, set_size)
        if self.use_linear_proj:
            h = self.proj_out(h)
        h = h.reshape(BN, H, W, -1).permute(0, 3, 1, 2)  # (B·N, HW, C) -> (B·N, C, H, W)
        if not self.use_linear_proj:
            h = self.proj_out(h)
        return x + h


class TimestepEmbedSequential(nn.Sequential):
    """Passes each layer the inputs it needs: ResBlocks the time embedding, transformers the text and set size."""

    def forward(self, x, emb, context, set_size=1):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, set_size)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        mc, g = c.model_channels, c.norm_groups
        emb_ch = 4 * mc

        def transformer(ch, depth):
            return SpatialTransformer(ch, *c.heads(ch), depth, c.context_dim, c.use_linear_proj, g)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        if c.adm_in_channels is not None:  # openaimodel's num_classes="sequential": a Sequential inside a Sequential
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(c.adm_in_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch)))
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(c.in_channels, mc, 3, padding=1))])
        skip_chans, ch, ds = [mc], mc, 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers = [ResBlock(ch, emb_ch, mult * mc, g)]
                ch = mult * mc
                if ds in c.attention_resolutions:
                    layers.append(transformer(ch, c.transformer_depth[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(c.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_ch, ch, g), transformer(ch, c.transformer_depth_middle), ResBlock(ch, emb_ch, ch, g))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chans.pop(), emb_ch, mult * mc, g)]
                ch = mult * mc
                if ds in c.attention_resolutions:
                    layers.append(transformer(ch, c.transformer_depth[level]))
                if level and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(g, ch), nn.SiLU(), zero_module(nn.Conv2d(ch, c.out_channels, 3, padding=1)))

    def forward(self, x, t, context, set_size: int = 1, y=None):
        """x: (B·N, in_channels, h, w); t: (B·N,) or (B,) per set or a scalar, integer timesteps in [0, 999];
        context: (B·N, L, context_dim) text states, or a `Cond` holding them and y; y: (B·N, adm_in_channels), the
        vector input of SDXL (pooled text + size features), None for SD-1.x; set_size: N, the images per set.
        Returns (B·N, out_channels, h, w)."""
        if isinstance(context, Cond):
            if y is not None:
                raise ValueError("UNet: y given twice (in the Cond and as an argument)")
            context, y = context.context, context.y
        BN = x.shape[0]
        if BN % set_size:
            raise ValueError(f"batch of {BN} images is not a whole number of sets of {set_size}")
        if (y is None) != (self.config.adm_in_channels is None):
            raise ValueError(f"UNet: adm_in_channels is {self.config.adm_in_channels} but y is "
                             f"{'missing' if y is None else 'given'} (SDXL needs y, SD-1.x takes none)")
        t = torch.as_tensor(t, device=x.device).reshape(-1)  # scalar or (n,) -> (n,)
        if t.numel() == 1:
            t = t.expand(BN)
        elif t.numel() == BN // set_size and set_size > 1:
            t = t.repeat_interleave(set_size)  # one timestep per set -> per image
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(x.dtype))
        if y is not None:
            emb = emb + self.label_emb(y.to(x.dtype))  # (B·N, 4·model_channels), as openaimodel
        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb, context, set_size)
            skips.append(h)
        h = self.middle_block(h, emb, context, set_size)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, set_size)
        return self.out(h)

    @property
    def blocks(self):
        """The units train.py wraps one by one (FSDP, activation checkpointing)."""
        return [*self.input_blocks, self.middle_block, *self.output_blocks]
