"""What the text side hands the UNet: one conditioning value, the same type for every base model.

    cond = Cond(context)                 # SD-1.x: (B, 77, 768) text states, no vector input
    cond = Cond(context, y)              # SDXL: (B, 77, 2048) states + (B, 2816) pooled text and size features

The loss, the samplers, guidance and the FLOP counter pass it through, drop it, repeat it and concatenate it
without knowing what is inside; only `UNet.forward` opens it (context to every attn2, y to `label_emb`, as
openaimodel's `forward(x, timesteps, context, y)`). Rows are images, flat over sets `(B·N, ...)` like every tensor.
Cond is a registered pytree node (children context, y), so tree-walking machinery sees the tensors inside:
FSDP2's input casting (MixedPrecisionPolicy), torch.compile's guards, activation checkpointing.

SDXL's y is `cat([pooled text (1280), micro_conditioning(...) (1536)])`, sgm's order of the vector embedders.
"""
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree


@dataclass(frozen=True)
class Cond:
    context: torch.Tensor  # (B, L, D) cross-attention states
    y: torch.Tensor | None = None  # (B, adm_in_channels) vector conditioning, or None for SD-1.x

    def __post_init__(self):
        # pytree machinery may rebuild a Cond from placeholder leaves: only tensors are checked
        if isinstance(self.y, torch.Tensor) and isinstance(self.context, torch.Tensor) \
                and self.y.shape[0] != self.context.shape[0]:
            raise ValueError(f"Cond: context has {self.context.shape[0]} rows but y has {self.y.shape[0]}")

    def __len__(self) -> int:
        return self.context.shape[0]

    @property
    def device(self) -> torch.device:
        return self.context.device

    @property
    def dtype(self) -> torch.dtype:
        return self.context.dtype

    def _map(self, fn) -> "Cond":
        return Cond(fn(self.context), None if self.y is None else fn(self.y))

    def to(self, *args, **kwargs) -> "Cond":
        return self._map(lambda v: v.to(*args, **kwargs))

    def __getitem__(self, rows) -> "Cond":
        """Rows (images) by index, slice or boolean mask."""
        return self._map(lambda v: v[rows])

    def repeat(self, n: int) -> "Cond":
        """The whole batch n times: (B, ...) -> (n·B, ...), as `Tensor.repeat(n, 1, ...)` (one copy per set)."""
        return self._map(lambda v: v.repeat(n, *([1] * (v.ndim - 1))))

    def repeat_interleave(self, n: int) -> "Cond":
        """Each row n times in a row: (B, ...) -> (B·n, ...) (one per image of a set)."""
        return self._map(lambda v: v.repeat_interleave(n, dim=0))

    def expand(self, n: int) -> "Cond":
        """A one-row value (e.g. the null text) as n rows without copying: (1, ...) -> (n, ...); n rows as they are
        (an SDXL null keeps each image's size features in y)."""
        if len(self) == n:
            return self
        if len(self) != 1:
            raise ValueError(f"Cond.expand: expected one row or {n}, got {len(self)}")
        return self._map(lambda v: v.expand(n, *v.shape[1:]))

    def unet_arg(self):
        """What a UNet call gets: the bare context tensor when there is no y (SD-1.x: the call form every UNet-like
        callable takes, test spies and the diffusers baseline wrapper included), else the Cond itself."""
        return self.context if self.y is None else self

    def where(self, drop: torch.Tensor, null: "Cond") -> "Cond":
        """Per row: `null` where drop (B,) is True, else self (text dropout, guidance's unconditional rows).
        null has one row or B rows; context and y are dropped together."""
        if (self.y is None) != (null.y is None):
            raise ValueError("Cond.where: self and null must both have y or both not")

        def pick(mine, other):
            d = drop.to(mine.device).reshape(-1, *([1] * (mine.ndim - 1)))  # (B,) -> (B, 1, ...)
            return torch.where(d, other.to(mine.dtype), mine)
        return Cond(pick(self.context, null.context), None if self.y is None else pick(self.y, null.y))

    @staticmethod
    def cat(conds: list["Cond"]) -> "Cond":
        """Concatenate rows: guidance passes batched into one UNet call."""
        ys = [c.y for c in conds]
        if any(y is None for y in ys) and not all(y is None for y in ys):
            raise ValueError("Cond.cat: either every value has y or none has")
        return Cond(torch.cat([c.context for c in conds]), None if ys[0] is None else torch.cat(ys))


pytree.register_pytree_node(
    Cond, lambda c: ([c.context, c.y], None), lambda children, _: Cond(*children),
    serialized_type_name="model.conditioning.Cond")


def as_cond(c) -> Cond:
    """A bare (B, L, D) context tensor (the SD-1.x call form every caller used so far) or a Cond -> Cond."""
    return c if isinstance(c, Cond) else Cond(c)


MICRO_FEATURES = 256  # features per number: sgm's ConcatTimestepEmbedderND outdim, diffusers' addition_time_embed_dim


def micro_conditioning(original_size, crop_top_left, target_size) -> torch.Tensor:
    """SDXL's size and crop conditioning: six numbers per image -> (B, 6·256) Fourier features.

    original_size (h, w), crop_top_left (top, left), target_size (h, w), in pixels: each a pair (one image) or a
    (B, 2) tensor. As sgm's ConcatTimestepEmbedderND (and diffusers' add_time_ids): the sinusoidal timestep
    embedding of each number, [cos, sin] order, concatenated in the order h, w, top, left, h, w."""
    from .unet import timestep_embedding  # here, not at the top: unet.py imports Cond from this module

    parts = [torch.as_tensor(v, dtype=torch.float32) for v in (original_size, crop_top_left, target_size)]
    parts = [p[None] if p.ndim == 1 else p for p in parts]  # a pair -> (1, 2)
    if any(p.ndim != 2 or p.shape[1] != 2 for p in parts):
        shapes = [tuple(p.shape) for p in parts]
        raise ValueError(f"micro_conditioning: expected pairs or (B, 2) tensors, got shapes {shapes}")
    nums = torch.cat(torch.broadcast_tensors(*parts), dim=1)  # (B, 6)
    B = nums.shape[0]
    feats = timestep_embedding(nums.reshape(-1), MICRO_FEATURES)  # (B·6, 256)
    return feats.reshape(B, 6 * MICRO_FEATURES)  # (B·6, 256) -> (B, 1536), each image's six in a row
