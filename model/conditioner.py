"""The text conditioner: prompts -> the UNet's conditioning value (`Cond`), one object for every base model.

    tc = TextConditioner(sdxl_text_config())            # or sd1_text_config(); random weights
    tc = load_text_conditioner(sdxl_text_config(), [clip_l_sd, bigg_sd])   # sized from the weights, strict load
    ids = tc.tokenize(["a photo of a dog", ""])         # (B, E, 77): a row of ids per prompt and encoder
    cond = tc(ids)                                      # Cond(context (B, 77, ΣD), y (B, pooled + 6·256) or None)
    cond = tc.encode(prompts)                           # tokenize + forward, warning about truncated prompts
    null = tc.null()                                    # the unconditional value (text dropout, guidance)

Two flavours (every fact below as Stability's sgm/modules/encoders/modules.py and configs/inference/*.yaml have it):

SD-1.x (CompVis FrozenCLIPEmbedder): CLIP ViT-L/14's last hidden states after the final layer norm, ids padded
  with EOS (49407). No vector y. The unconditional text is the encoded empty prompt.

SDXL (sgm GeneralConditioner of sd_xl_base.yaml):
  encoder 1, CLIP ViT-L/14 (FrozenCLIPEmbedder, layer="hidden", layer_idx=11): hidden_states[11] of 13, i.e. the
    penultimate layer's output, no final norm; ids from SD's CLIPTokenizer, padded with EOS.
  encoder 2, OpenCLIP ViT-bigG/14 (FrozenOpenCLIPEmbedder2, layer="penultimate", always_return_pooled,
    legacy=False): the input of the last resblock, no ln_final; ids from open_clip.tokenize, padded with 0 (the
    padding is attended, so it changes the states). Pooled = ln_final(last states) at the EOT position, times
    text_projection; EOT = ids.argmax(-1) (49407 is the largest id, so it is found with either padding).
  context = cat([states 1, states 2], -1): 768 + 1280 = 2048. y = cat([pooled (1280), micro_conditioning(
    original size, crop top-left, target size) (6·256)]) = 2816, the order of sgm's embedders.
  The unconditional text is zeros for both texts and the pooled vector, with the size features kept (sgm's
  sampling `force_uc_zero_embeddings=["txt"]`, diffusers' `force_zeros_for_empty_prompt`), not the encoded "".
  diffusers' StableDiffusionXLPipeline.encode_prompt computes the same (hidden_states[-2] of both encoders, the
  pooled `text_embeds` of encoder 2), with transformers 5's ftfy-less tokenizers.

Why encoder 2 is transformers' CLIPTextModelWithProjection and not open_clip's own module:
- one implementation for both encoders: the same class family, the same `hidden_states[-2]`, the same attention
  (SDPA), the same gradient checkpointing and FSDP wrapping (CLIPEncoderLayer) when the text is trained;
- diffusers folders (`text_encoder_2/`) load with no conversion, and diffusers' SDXL pipeline, our oracle, runs
  this very class;
- open_clip's class API moves between releases (TextTransformer gained pool/proj/mask options in 3.x), while the
  original file's key names, all we depend on, have not; open_clip also takes seconds to import.
The cost is a small, tested converter for the original file's open_clip layout
(text.convert_open_clip_text_state_dict: fused in_proj -> q/k/v, text_projection transposed), so the original file
does not load by a bare prefix strip. Parity against open_clip's own model (tests/test_text_sdxl.py, fp32 CPU):
penultimate states bit-identical, pooled within 5e-7 (tiny) / 1.7e-6 of 4.6 (full bigG), because open_clip
computes `x @ P` and nn.Linear `x @ P.T.T`, which round differently.

Where a JeDi checkpoint or loader meets it: `JeDi.text` is a TextConditioner, `save_jedi` stores its config and
`text.encoders.N.*` tensors (format 2; format 1 files are the SD-1.x conditioner, TextConditionerConfig.from_dict).
model.loading reads a base model's encoders (model/layout_original.py's TEXT_PREFIXES, layout_diffusers.py's
text_encoder/ and text_encoder_2/) and builds the flavour's conditioner with text_conditioner_weights.

The pooled vector comes from transformers' own `text_embeds`, i.e. inside the encoder's forward (an FSDP-sharded
encoder must not have its projection called from outside). Its config therefore has eos_token_id=2: transformers'
pooling rule for that value is `ids.argmax(-1)`, sgm's rule; diffusers' SDXL config has the same.
"""
import functools
import json
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from transformers import CLIPTextConfig

from .conditioning import MICRO_FEATURES, Cond
from .text import (CONTEXT_LENGTH, Tokenizer, bigg_text_config, build_text_encoder,
                   convert_original_text_state_dict, empty_text_encoder, sd14_text_config,
                   text_config_from_state_dict)

LAYERS = ("last", "penultimate")
NULLS = ("empty", "zeros")
MICRO_WIDTH = 6 * MICRO_FEATURES  # micro_conditioning's width: six numbers, 256 Fourier features each


@dataclass
class EncoderSpec:
    """One text encoder of a conditioner: its transformers config and how its output is used."""

    config: dict  # CLIPTextConfig fields (sizes, activation), as CLIPTextConfig.to_dict() writes them
    tokenizer: str = "clip"  # Tokenizer style: "clip" pads with EOS 49407, "open_clip" pads with 0
    layer: str = "last"  # "last": states after the final norm; "penultimate": input of the last layer, no norm
    pooled: bool = False  # also the pooled vector (EOT state after the final norm @ text_projection)

    def __post_init__(self):
        if self.layer not in LAYERS:
            raise ValueError(f"text encoder layer {self.layer!r} is not one of {LAYERS}")
        if self.tokenizer not in Tokenizer.STYLES:
            raise ValueError(f"text tokenizer {self.tokenizer!r} is not one of {Tokenizer.STYLES}")
        cfg = self.config if isinstance(self.config, CLIPTextConfig) else CLIPTextConfig(**self.config)
        if self.pooled:  # transformers pools at ids.argmax(-1) for eos_token_id 2 (see the module docstring)
            cfg.eos_token_id = 2
        # every field, in its JSON form (id2label's int keys become strings): to_dict() == from_dict's input
        self.config = json.loads(cfg.to_json_string(use_diff=False))

    @functools.cached_property
    def clip_config(self) -> CLIPTextConfig:
        return CLIPTextConfig(**self.config)


@dataclass
class TextConditionerConfig:
    encoders: list[EncoderSpec] = field(default_factory=list)
    null: str = "empty"  # unconditional text: "empty" = the encoded "" (SD-1.x); "zeros" (SDXL)
    micro_conditioning: bool = False  # append SDXL's size and crop features to y
    resolution: int | None = None  # default original and target size (pixels) of the micro-conditioning

    def __post_init__(self):
        self.encoders = [e if isinstance(e, EncoderSpec) else EncoderSpec(**e) for e in self.encoders]
        if not self.encoders:
            raise ValueError("a text conditioner needs at least one encoder")
        if self.null not in NULLS:
            raise ValueError(f"null text {self.null!r} is not one of {NULLS}")
        if self.micro_conditioning and not self.resolution:
            raise ValueError("micro_conditioning needs a resolution (the default original and target size)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TextConditionerConfig":
        """Also reads what JeDi checkpoints before the conditioner stored: one CLIPTextConfig dict (SD-1.x)."""
        if "encoders" not in d:
            return sd1_text_config(**d)
        return cls(**d)

    @property
    def context_dim(self) -> int:
        """Width of the cross-attention context: the encoders' widths concatenated (768; SDXL 2048)."""
        return sum(e.clip_config.hidden_size for e in self.encoders)

    @property
    def y_dim(self) -> int | None:
        """Width of the vector conditioning y, the UNet's adm_in_channels (SDXL 2816), or None (no y)."""
        n = sum(e.clip_config.projection_dim for e in self.encoders if e.pooled)
        n += MICRO_WIDTH if self.micro_conditioning else 0
        return n or None


def sd1_text_config(**overrides) -> TextConditionerConfig:
    """SD-1.x: CLIP ViT-L/14, last layer after the final norm. Overrides resize the encoder (tests, toys)."""
    return TextConditionerConfig([EncoderSpec(sd14_text_config(**overrides))])


def sdxl_text_config(clip_l: dict | None = None, bigg: dict | None = None, resolution: int = 1024
                     ) -> TextConditionerConfig:
    """SDXL: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 penultimate states, bigG's pooled vector, size features.
    clip_l / bigg: overrides of each encoder's config (tests build tiny ones)."""
    return TextConditionerConfig(
        [EncoderSpec(sd14_text_config(**(clip_l or {})), "clip", "penultimate"),
         EncoderSpec(bigg_text_config(**(bigg or {})), "open_clip", "penultimate", pooled=True)],
        null="zeros", micro_conditioning=True, resolution=resolution)


TEXT_FLAVOURS = {"sd1": sd1_text_config, "sdxl": sdxl_text_config}


@functools.lru_cache(maxsize=None)
def _tokenizer(style: str) -> Tokenizer:
    """One tokenizer per style for the process: stateless apart from its BPE cache, and slow to build."""
    return Tokenizer(CONTEXT_LENGTH, style)


class TextConditioner(nn.Module):
    """Prompts -> Cond. Holds the text encoders (`encoders.0`, `encoders.1`, ...; transformers modules) and knows
    their tokenizers; `config` (TextConditionerConfig) rebuilds it. encoders: existing modules to hold instead of
    new random ones (one per config encoder)."""

    def __init__(self, config: TextConditionerConfig, encoders: list[nn.Module] | None = None, init: bool = True):
        super().__init__()
        self.config = config
        if encoders is None:  # init=False: uninitialised weights, for a state dict loaded next (empty_text_encoder)
            build = build_text_encoder if init else empty_text_encoder
            encoders = [build(e.clip_config, e.pooled) for e in config.encoders]
        if len(encoders) != len(config.encoders):
            raise ValueError(f"text conditioner: {len(config.encoders)} encoders in the config, {len(encoders)} given")
        self.encoders = nn.ModuleList(encoders)
        self.tokenizers = [_tokenizer(e.tokenizer) for e in config.encoders]

    @property
    def context_dim(self) -> int:
        return self.config.context_dim

    @property
    def y_dim(self) -> int | None:
        return self.config.y_dim

    def tokenize(self, prompts: str | list[str], return_truncated: bool = False):
        """(B,) prompts -> LongTensor (B, E, 77), each encoder's ids; with return_truncated also (B,) bool: the
        prompt was cut at 77 tokens by some encoder's tokenizer."""
        outs = [tok(prompts, return_truncated=True) for tok in self.tokenizers]
        ids = torch.stack([o[0] for o in outs], dim=1)  # E x (B, 77) -> (B, E, 77)
        truncated = torch.stack([o[1] for o in outs]).any(0)  # (E, B) -> (B,)
        return (ids, truncated) if return_truncated else ids

    def forward(self, ids: torch.Tensor, original_size=None, crop_top_left=(0, 0), target_size=None) -> Cond:
        """ids (B, E, 77) (or (B, 77) for a one-encoder conditioner) -> Cond on the encoders' device.

        The size arguments feed SDXL's micro-conditioning, as (h, w) / (top, left) pairs or (B, 2) tensors in
        pixels; original and target size default to the config's resolution (sgm's and diffusers' defaults at
        that size), the crop to (0, 0). Ignored by a conditioner without micro-conditioning."""
        E = len(self.encoders)
        if ids.ndim == 2 and E == 1:
            ids = ids[:, None]  # (B, 77) -> (B, 1, 77)
        if ids.ndim != 3 or ids.shape[1] != E:
            raise ValueError(f"text conditioner: expected ids of shape (B, {E}, 77), got {tuple(ids.shape)}")
        device = next(self.parameters()).device
        states, pooled = [], []
        for e, (spec, model) in enumerate(zip(self.config.encoders, self.encoders)):
            x = ids[:, e].to(device)  # (B, 77)
            if spec.layer == "last" and not spec.pooled:
                states.append(model(input_ids=x).last_hidden_state)  # SD-1.x: text.encode's very call
                continue
            out = model(input_ids=x, output_hidden_states=spec.layer == "penultimate")
            # hidden_states: the embeddings, then each layer's output; [-2] is the last layer's input
            states.append(out.last_hidden_state if spec.layer == "last" else out.hidden_states[-2])
            if spec.pooled:
                pooled.append(out.text_embeds)  # (B, P): final-norm state at ids.argmax(-1) @ text_projection
        context = states[0] if E == 1 else torch.cat(states, dim=-1)  # (B, 77, ΣD)
        return Cond(context, self._y(pooled, len(ids), context, original_size, crop_top_left, target_size))

    def _y(self, pooled, B, like, original_size=None, crop_top_left=(0, 0), target_size=None):
        """cat([pooled (B or 1 rows)..., size features (1 or n rows)]) -> (rows, y_dim), or None without y."""
        if self.config.micro_conditioning:
            from .conditioning import micro_conditioning

            res = (self.config.resolution, self.config.resolution)
            feats = micro_conditioning(res if original_size is None else original_size, crop_top_left,
                                       res if target_size is None else target_size)  # (1 or n, 1536)
            if len(feats) not in (1, B) and B != 1:
                raise ValueError(f"text conditioner: {B} prompts but sizes for {len(feats)} images")
            rows = max(B, len(feats))
            pooled = [v.expand(rows, -1) for v in pooled] + [feats.to(like.device, like.dtype).expand(rows, -1)]
        return torch.cat(pooled, dim=-1) if pooled else None

    def encode(self, prompts: list[str], **sizes) -> Cond:
        """Prompts -> Cond on the encoders' device; warns when a prompt is cut at 77 tokens."""
        ids, cut = self.tokenize(prompts, return_truncated=True)
        for p, c in zip(prompts, cut.tolist()):
            if c:
                warnings.warn(f"prompt longer than 77 tokens, truncated: {p[:60]!r}...", stacklevel=2)
        return self(ids, **sizes)

    def null(self, **sizes) -> Cond:
        """The unconditional text as one row (or one per row of the size tensors): the encoded "" (SD-1.x), or
        zero text and pooled vector with the size features (SDXL)."""
        if self.config.null == "empty":
            return self(self.tokenize([""]), **sizes)
        p = next(self.parameters())
        context = p.new_zeros(1, CONTEXT_LENGTH, self.context_dim)  # (1, 77, ΣD)
        pooled = [p.new_zeros(1, e.clip_config.projection_dim) for e in self.config.encoders if e.pooled]
        y = self._y(pooled, 1, context, **sizes)
        if y is not None and len(y) > 1:  # per-image sizes: as many rows
            context = context.expand(len(y), -1, -1)  # (1, 77, D) -> (n, 77, D), no copy
        return Cond(context, y)


def text_conditioner_weights(config: TextConditionerConfig, parts: list[dict], num_heads: int | None = None
                             ) -> tuple[TextConditionerConfig, dict]:
    """(config sized from the weights, the conditioner's state dict) of a flavour's per-encoder weights.

    parts: one state dict per encoder, in any layout text.convert_original_text_state_dict accepts (original
    CompVis/sgm, diffusers, open_clip), its file prefix stripped (layout_original.TEXT_PREFIXES); tensors or meta
    tensors (shapes only). The shapes give the sizes; `config`, the flavour, gives what they cannot (layer, tokenizer,
    pooling, activation, norm eps); heads default to width // 64. Nothing is built or checked here: the state
    dict goes to a strict load (load_text_conditioner, model.checkpoint.build_checked)."""
    from .checkpoint import CheckpointError

    if len(parts) != len(config.encoders):
        raise ValueError(f"text conditioner: {len(config.encoders)} encoders but {len(parts)} weight sets")
    what = lambda i: f"text encoder {i + 1}" if len(parts) > 1 else "text encoder"  # noqa: E731
    specs, out = [], {}
    for i, (spec, sd) in enumerate(zip(config.encoders, parts)):
        if not sd:
            raise CheckpointError(f"{what(i)}: no weights")
        has_projection = any(k.rsplit(".", 1)[-1] == "text_projection" or k.endswith("text_projection.weight")
                             for k in sd)
        if spec.pooled != has_projection:
            need = "is needed (for the pooled vector)" if spec.pooled else "is not expected"
            raise CheckpointError(f"{what(i)}: a text_projection {need}, and the weights "
                                  f"{'have none' if spec.pooled else 'have one'}")
        keep = {k: spec.config[k] for k in ("hidden_act", "layer_norm_eps", "bos_token_id", "eos_token_id",
                                             "pad_token_id")}
        try:
            cfg = text_config_from_state_dict(sd, num_heads, **keep)
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{what(i)}: {str(e).strip(chr(34))}") from None
        specs.append(EncoderSpec(cfg, spec.tokenizer, spec.layer, spec.pooled))
        out.update({f"encoders.{i}.{k}": v for k, v in convert_original_text_state_dict(sd, spec.pooled).items()})
    return TextConditionerConfig(specs, config.null, config.micro_conditioning, config.resolution), out


def load_text_conditioner(config: TextConditionerConfig, parts: list[dict], num_heads: int | None = None
                          ) -> TextConditioner:
    """A conditioner of `config`'s flavour sized from the weights (text_conditioner_weights), loaded strictly: keys
    and shapes compared on the meta device first (a stray `layers.99999` must be an error, not an allocation),
    then the encoders given uninitialised memory and loaded (no random init)."""
    from .checkpoint import build_checked

    config, sd = text_conditioner_weights(config, parts, num_heads)
    return build_checked(lambda: TextConditioner(config, init=False), sd, "text conditioner").eval()


def as_text_conditioner(text: nn.Module) -> TextConditioner:
    """A TextConditioner, or a bare transformers CLIPTextModel, which is the SD-1.x conditioner's one encoder."""
    if isinstance(text, TextConditioner):
        return text
    return TextConditioner(TextConditionerConfig([EncoderSpec(text.config)]), [text])
