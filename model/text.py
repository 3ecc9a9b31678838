"""The text side of SD: CLIP BPE tokenizers (77 ids) and CLIP text transformers (transformers' classes).

    tok = Tokenizer()                                           # SD's: pads with EOS
    ids = tok(["a photo of a sks dog", ""])                     # LongTensor (2, 77)
    text_encoder = load_text_encoder(original_text_state_dict)  # transformers CLIPTextModel, strict load
    context = encode(text_encoder, ids)                          # (2, 77, 768): SD-1's cross-attention context

How the encoders are combined into the UNet's conditioning (SD-1.x: one, SDXL: two) is `model.conditioner`'s job;
this module holds the parts: the two tokenizer styles, the encoder configs, building, and every weight layout.

Tokenizers. `Tokenizer()` reproduces the ids SD-1.4 (and SDXL's first encoder) was trained and sampled with:
transformers 4's (slow) `CLIPTokenizer` with ftfy installed, called with `padding="max_length", max_length=77,
truncation=True`. transformers 5's `CLIPTokenizer` is the Rust one and skips ftfy; it gives the same ids unless ftfy
or Python's lowercasing changes the text (curly quotes, HTML entities, full-width letters, ligatures, mojibake, a
word-final capital sigma). `Tokenizer(style="open_clip")` is `open_clip.tokenize`, what SDXL's second encoder
(sgm's FrozenOpenCLIPEmbedder2) was fed: same BPE, but it also html-unescapes, knows `<start_of_text>`/`<end_of_text>`
instead of `<|startoftext|>`/`<|endoftext|>` as special text, and pads with 0.

Encoders are transformers' `CLIPTextModel` (SD-1.x, SDXL's CLIP ViT-L/14) and `CLIPTextModelWithProjection` (SDXL's
OpenCLIP ViT-bigG/14: the pooled output needs the projection). Their key layout depends on the transformers
version: 4.x nests CLIPTextModel under `text_model.` (and some 4.x releases persist `embeddings.position_ids`), 5.x
has no `text_model.` level in CLIPTextModel and no persistent `position_ids`; `_installed_layout` asks the installed
class. SDXL's original file stores bigG in open_clip's layout (`transformer.resblocks.N.attn.in_proj_weight`, ...):
`convert_open_clip_text_state_dict` maps it (see `model/conditioner.py` for why we convert instead of running
open_clip's own module).
"""
import functools

import ftfy
import regex as re  # stdlib re lacks \p{L}; CLIP's tokenizers all use `regex`
import torch
import torch.nn as nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

CONTEXT_LENGTH = 77
BOS_ID = 49406  # <|startoftext|>
EOS_ID = 49407  # <|endoftext|>, also SD's padding id: SD uses all 77 hidden states, so the pad id matters
OPEN_CLIP_PAD_ID = 0  # open_clip.tokenize pads with 0 ("!"); diffusers' SDXL tokenizer_2 has pad_token "!" too
SPECIAL_TOKENS = {"<|startoftext|>": BOS_ID, "<|endoftext|>": EOS_ID}

# CLIP's pre-tokenizer pattern (OpenAI CLIP, transformers). Special tokens are matched twice, as transformers 4 did:
# case-sensitively in the raw text (_SPECIAL), then in the cleaned, lowercased text (first alternatives of _PIECES).
_SPECIAL = re.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")
_PIECES = re.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                     re.IGNORECASE)


def _clean(text: str) -> str:
    """transformers 4 `CLIPTokenizer._tokenize` with ftfy: fix_text, collapse whitespace, lowercase.
    (open_clip additionally html-unescapes twice; SD's tokenizer did not, so neither do we.)"""
    return re.sub(r"\s+", " ", ftfy.fix_text(text)).strip().lower()


class Tokenizer:
    """CLIP's BPE tokenizer on open_clip's shipped vocabulary (49408 ids; no download), in one of two styles.

    style="clip" (default): SD's, transformers 4 CLIPTokenizer + ftfy; pads with EOS (49407). SD-1.x and SDXL's
    encoder 1. style="open_clip": `open_clip.tokenize`; pads with 0. SDXL's encoder 2 (sgm FrozenOpenCLIPEmbedder2).

    `tok(texts)` -> LongTensor (B, 77): [BOS, tokens..., EOS, pad, ...]. A prompt longer than 75 tokens is cut to
    its first 75 and still ends with EOS, as CLIPTokenizer(truncation=True) and open_clip.tokenize do;
    `count_tokens` and `tok(texts, return_truncated=True)` let callers warn about it.
    """

    STYLES = ("clip", "open_clip")

    def __init__(self, context_length: int = CONTEXT_LENGTH, style: str = "clip"):
        # open_clip's SimpleTokenizer is OpenAI's BPE implementation; we reuse its vocabulary and merge loop. For
        # style "clip" we do the text cleaning and special-token handling ourselves to match SD's tokenizer (see
        # _clean); style "open_clip" is SimpleTokenizer's own encode, which is what open_clip.tokenize runs.
        # It is imported here, not at module level, because importing open_clip takes seconds.
        from open_clip.tokenizer import SimpleTokenizer, default_bpe

        if style not in self.STYLES:
            raise ValueError(f"tokenizer style {style!r} is not one of {self.STYLES}")
        self._bpe = SimpleTokenizer(default_bpe(), context_length=context_length)
        assert (self._bpe.sot_token_id, self._bpe.eot_token_id) == (BOS_ID, EOS_ID), "unexpected BPE vocabulary"
        self.style = style
        self.pad_id = EOS_ID if style == "clip" else OPEN_CLIP_PAD_ID
        self.context_length = context_length
        self.vocab_size = len(self._bpe.encoder)

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without BOS/EOS and without truncation."""
        if self.style == "open_clip":
            return self._bpe.encode(text)
        ids = []
        # Like CLIPTokenizer, a literal "<|endoftext|>" in the text is the special token, not its characters.
        # Splitting the raw text first keeps "!<|endoftext|>" from being read as punctuation "!<|" + letters.
        for part in _SPECIAL.split(text):
            for piece in _PIECES.findall(_clean(part)):
                if piece in SPECIAL_TOKENS:
                    ids.append(SPECIAL_TOKENS[piece])
                    continue
                piece = "".join(self._bpe.byte_encoder[b] for b in piece.encode("utf-8"))
                ids.extend(self._bpe.encoder[t] for t in self._bpe.bpe(piece).split(" "))
        return ids

    def count_tokens(self, text: str) -> int:
        """Length of the untruncated sequence including BOS and EOS; > context_length means truncated."""
        return len(self.encode(text)) + 2

    def __call__(self, texts: str | list[str], return_truncated: bool = False):
        if isinstance(texts, str):
            texts = [texts]
        n = self.context_length
        out = torch.full((len(texts), n), self.pad_id, dtype=torch.long)
        truncated = torch.zeros(len(texts), dtype=torch.bool)
        for i, text in enumerate(texts):
            ids = self.encode(text)
            truncated[i] = len(ids) > n - 2
            ids = [BOS_ID] + ids[: n - 2] + [EOS_ID]  # EOS stays last after truncation
            out[i, : len(ids)] = torch.tensor(ids)
        return (out, truncated) if return_truncated else out


# ----------------------------------------------------------------------------- text encoder

def sd14_text_config(**overrides) -> CLIPTextConfig:
    """CLIP ViT-L/14's text transformer as SD-1.4 uses it; keyword overrides build smaller ones for tests/toys."""
    c = dict(vocab_size=49408, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
             intermediate_size=3072, max_position_embeddings=CONTEXT_LENGTH, hidden_act="quick_gelu",
             layer_norm_eps=1e-5, attention_dropout=0.0)
    c.update(overrides)
    # BOS/EOS sit at the end of CLIP's vocabulary; keep them inside a shrunken one (transformers warns otherwise).
    # They only affect the pooled output, which SD does not use.
    c.setdefault("bos_token_id", c["vocab_size"] - 2)
    c.setdefault("eos_token_id", c["vocab_size"] - 1)
    c.setdefault("pad_token_id", c["eos_token_id"])
    return CLIPTextConfig(**c)


def bigg_text_config(**overrides) -> CLIPTextConfig:
    """OpenCLIP ViT-bigG/14's text transformer (laion2b_s39b_b160k), SDXL's encoder 2: exact GELU (not CLIP-L's
    quick GELU), 1280 wide, 32 layers, 20 heads, a 1280-wide pooled projection. Overrides build tiny ones."""
    return sd14_text_config(**{**dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20,
                                      intermediate_size=5120, hidden_act="gelu", projection_dim=1280), **overrides})


def build_text_encoder(config: CLIPTextConfig, projection: bool = False) -> CLIPTextModel:
    """A randomly initialised transformers CLIPTextModel, or CLIPTextModelWithProjection (adds `text_projection`,
    `config.projection_dim` wide) when projection=True. Local config, no hub access."""
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def empty_text_encoder(config: CLIPTextConfig, projection: bool = False) -> CLIPTextModel:
    """build_text_encoder without the random initialisation (20 s for bigG on one core), for weights loaded next:
    built on the meta device, then given uninitialised memory on the default device (still meta inside
    `with torch.device("meta")`). `position_ids`, a buffer no checkpoint holds in transformers 5 (non-persistent),
    is rebuilt as the arange it is."""
    from transformers.models.clip.modeling_clip import CLIPTextEmbeddings

    device = torch.get_default_device()
    with torch.device("meta"):
        model = build_text_encoder(config, projection)
    model.to_empty(device=device)
    for m in model.modules():
        if isinstance(m, CLIPTextEmbeddings):
            m.position_ids.copy_(torch.arange(m.position_ids.shape[-1]).expand_as(m.position_ids))  # (1, 77)
    return model


@functools.lru_cache(maxsize=None)
def _installed_layout(projection: bool = False) -> tuple[str, bool]:
    """(prefix of the transformer's keys, whether position_ids is a persistent buffer) of the installed
    transformers' CLIPTextModel / CLIPTextModelWithProjection (whose `text_projection.weight` is never prefixed)."""
    probe = build_text_encoder(sd14_text_config(vocab_size=4, hidden_size=4, num_hidden_layers=1,
                                                num_attention_heads=1, intermediate_size=4,
                                                max_position_embeddings=2, projection_dim=4), projection)
    keys = probe.state_dict().keys()
    prefix = "text_model." if "text_model.final_layer_norm.weight" in keys else ""
    return prefix, prefix + "embeddings.position_ids" in keys


def _bare_key(key: str) -> str:
    """Key without the original (`cond_stage_model.transformer.`) and transformers 4 (`text_model.`) prefixes."""
    for p in ("cond_stage_model.transformer.", "text_model."):
        if key.startswith(p):
            key = key[len(p):]
    return key


def convert_original_text_state_dict(sd: dict, projection: bool = False) -> dict:
    """Map CLIP text-encoder weights to the installed CLIPTextModel's (or, projection=True,
    CLIPTextModelWithProjection's) keys.

    Accepts the original layout (`cond_stage_model.transformer.text_model.*`, with or without the
    `cond_stage_model.transformer.` prefix), diffusers' `text_encoder/` and `text_encoder_2/` (`text_model.*`, plus
    `text_projection.weight`), transformers 5's CLIPTextModel (no prefix) and open_clip's text tower (SDXL's
    `conditioner.embedders.1.model.*` with the prefix stripped; see convert_open_clip_text_state_dict).
    The checkpoint's `position_ids` is dropped: it is a constant arange, and some merged checkpoints carry it as
    drifted floats. If the installed transformers persists it, a fresh arange is put in its place.
    Unknown keys pass through, so a strict load names them.
    """
    if is_open_clip_layout(sd):
        sd = convert_open_clip_text_state_dict(sd)
    prefix, wants_position_ids = _installed_layout(projection)
    out = {}
    for k, v in sd.items():
        k = _bare_key(k)
        if k != "embeddings.position_ids":
            out[k if projection and k == "text_projection.weight" else prefix + k] = v
    pos = out.get(prefix + "embeddings.position_embedding.weight")
    if wants_position_ids and pos is not None:
        out[prefix + "embeddings.position_ids"] = torch.arange(pos.shape[0]).unsqueeze(0)
    return out


# open_clip resblock names -> transformers CLIPEncoderLayer names (the fused in_proj is split separately)
_OPEN_CLIP_RENAMES = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "mlp.c_fc.": "mlp.fc1.",
                      "mlp.c_proj.": "mlp.fc2.", "attn.out_proj.": "self_attn.out_proj."}
# In the file, unused by text conditioning: CLIP's contrastive temperature (sgm deletes only `visual`), and the
# causal mask that some open_clip versions persisted (it is rebuilt, never loaded).
_OPEN_CLIP_UNUSED = ("logit_scale", "attn_mask")


def is_open_clip_layout(sd: dict) -> bool:
    return "token_embedding.weight" in sd or "positional_embedding" in sd


def convert_open_clip_text_state_dict(sd: dict) -> dict:
    """open_clip's text tower (`token_embedding`, `positional_embedding`, `transformer.resblocks.N.*`, `ln_final`,
    `text_projection`; SDXL's `conditioner.embedders.1.model.*` without the prefix) -> bare transformers names
    (`embeddings.*`, `encoder.layers.N.*`, `final_layer_norm.*`, `text_projection.weight`).

    `attn.in_proj_weight` (3W, W) holds nn.MultiheadAttention's [q; k; v] rows; they become q/k/v_proj (views, the
    strict load copies them). open_clip applies `text_projection` (W, P) as `x @ P`; nn.Linear stores (P, W).
    Unknown keys pass through, so a strict load names them.
    """
    from .loading import CheckpointError

    out = {}
    for k, v in sd.items():
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", k)
        if k in _OPEN_CLIP_UNUSED:
            continue
        elif k == "token_embedding.weight":
            out["embeddings.token_embedding.weight"] = v
        elif k == "positional_embedding":
            out["embeddings.position_embedding.weight"] = v
        elif k.startswith("ln_final."):
            out["final_layer_norm." + k[len("ln_final."):]] = v
        elif k == "text_projection":
            out["text_projection.weight"] = v.T  # (W, P) -> (P, W)
        elif m and m[2] in ("attn.in_proj_weight", "attn.in_proj_bias"):
            if v.shape[0] % 3:
                raise CheckpointError(f"text encoder: {k} has {v.shape[0]} rows, not 3 x width (fused q, k, v)")
            for name, part in zip("qkv", v.chunk(3)):  # (3W, ...) -> 3 x (W, ...)
                out[f"encoder.layers.{m[1]}.self_attn.{name}_proj.{m[2].rsplit('_', 1)[1]}"] = part
        elif m:
            src = next((p for p in _OPEN_CLIP_RENAMES if m[2].startswith(p)), None)
            rest = _OPEN_CLIP_RENAMES[src] + m[2][len(src):] if src else m[2]
            out[f"encoder.layers.{m[1]}.{rest}"] = v
        else:
            out[k] = v
    return out


def text_config_from_state_dict(sd: dict, num_heads: int | None = None, **overrides) -> CLIPTextConfig:
    """Infer vocab, width, depth, MLP width, positions and projection width from tensor shapes (any layout accepted
    by convert_original_text_state_dict). Not in the shapes: the head count (default hidden // 64: 12 for CLIP-L,
    20 for bigG) and the activation (default quick GELU, OpenAI CLIP's, for the transformers layouts; exact GELU,
    open_clip's and LAION's, for the open_clip layout); `overrides` set these and any other config field."""
    if is_open_clip_layout(sd):
        sd = convert_open_clip_text_state_dict(sd)
        overrides.setdefault("hidden_act", "gelu")
    sd = {_bare_key(k): v for k, v in sd.items()}
    need = ["embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
            "encoder.layers.0.mlp.fc1.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise KeyError(f"text encoder weights lack {missing}: not a CLIP text model state dict")
    vocab, hidden = sd[need[0]].shape
    found = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    layers = 1 + max(found)
    if len(found) != layers:  # before anything is built: a stray index must not size a huge model
        gap = min(set(range(layers)) - found)
        raise ValueError(f"text encoder layers are not numbered 0 to {layers - 1}: layer {gap} is missing")
    heads = num_heads or max(1, hidden // 64)
    if hidden % heads:
        raise ValueError(f"hidden size {hidden} is not divisible by num_heads={heads}")
    if "text_projection.weight" in sd:
        overrides.setdefault("projection_dim", sd["text_projection.weight"].shape[0])
    return sd14_text_config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=sd[need[2]].shape[0],
                            max_position_embeddings=sd[need[1]].shape[0], **overrides)


def load_text_state_dict(model: CLIPTextModel, sd: dict, what: str = "text encoder") -> None:
    """Convert and load strictly; one error lists every missing, unexpected and wrongly shaped key."""
    from .loading import strict_load

    projection = isinstance(model, CLIPTextModelWithProjection)
    strict_load(model, convert_original_text_state_dict(sd, projection), what)


def load_text_encoder(sd: dict, num_heads: int | None = None, **overrides) -> CLIPTextModel:
    """Build a CLIPTextModel sized from `sd` (CLIPTextModelWithProjection if `sd` has a text projection) and load
    it strictly. `overrides`: config fields the shapes cannot tell (hidden_act, ...)."""
    config = text_config_from_state_dict(sd, num_heads, **overrides)
    projection = any(_bare_key(k) in ("text_projection.weight", "text_projection") for k in sd)
    model = empty_text_encoder(config, projection)
    load_text_state_dict(model, sd)
    return model


def encode(text_model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(B, 77) ids -> (B, 77, hidden): all hidden states after the final layer norm, SD's cross-attention context.
    Causal attention and no padding mask, as in SD: the EOS padding is attended like any token."""
    device = next(text_model.parameters()).device
    return text_model(input_ids=ids.to(device)).last_hidden_state
