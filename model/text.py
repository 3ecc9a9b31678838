"""The text side of SD-1.4: CLIP BPE tokenizer (77 ids, padded with EOS) and the CLIP ViT-L/14 text transformer.

    tok = Tokenizer()
    ids = tok(["a photo of a sks dog", ""])                     # LongTensor (2, 77)
    text_encoder = load_text_encoder(original_text_state_dict)  # transformers CLIPTextModel, strict load
    context = encode(text_encoder, ids)                          # (2, 77, 768): SD's cross-attention context

The tokenizer reproduces the ids SD-1.4 was trained and sampled with: transformers 4's (slow) `CLIPTokenizer`
with ftfy installed, called with `padding="max_length", max_length=77, truncation=True`. transformers 5's
`CLIPTokenizer` is the Rust one and skips ftfy; it gives the same ids unless ftfy or Python's lowercasing changes
the text (curly quotes, HTML entities, full-width letters, ligatures, mojibake, a word-final capital sigma).

The text encoder is transformers' `CLIPTextModel`. Its key layout depends on the transformers version: 4.x nests
everything under `text_model.` (and some 4.x releases persist `embeddings.position_ids`), 5.x has no `text_model.`
level and no persistent `position_ids`. `convert_original_text_state_dict` asks the installed class which.
"""
import functools

import ftfy
import regex as re  # stdlib re lacks \p{L}; CLIP's tokenizers all use `regex`
import torch
import torch.nn as nn
from transformers import CLIPTextConfig, CLIPTextModel

CONTEXT_LENGTH = 77
BOS_ID = 49406  # <|startoftext|>
EOS_ID = 49407  # <|endoftext|>, also SD's padding id: SD uses all 77 hidden states, so the pad id matters
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
    """SD-1.4's tokenizer on open_clip's shipped BPE vocabulary (49408 ids; no download).

    `tok(texts)` -> LongTensor (B, 77): [BOS, tokens..., EOS, EOS, ...]. A prompt longer than 75 tokens is cut to
    its first 75 and still ends with EOS, as CLIPTokenizer(truncation=True) does; `count_tokens` and
    `tok(texts, return_truncated=True)` let callers warn about it.
    """

    def __init__(self, context_length: int = CONTEXT_LENGTH):
        # open_clip's SimpleTokenizer is OpenAI's BPE implementation; we reuse its vocabulary and merge loop, and
        # do the text cleaning and special-token handling ourselves to match SD's tokenizer (see _clean).
        # It is imported here, not at module level, because importing open_clip takes seconds.
        from open_clip.tokenizer import SimpleTokenizer, default_bpe

        self._bpe = SimpleTokenizer(default_bpe(), context_length=context_length)
        assert (self._bpe.sot_token_id, self._bpe.eot_token_id) == (BOS_ID, EOS_ID), "unexpected BPE vocabulary"
        self.context_length = context_length
        self.vocab_size = len(self._bpe.encoder)

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without BOS/EOS and without truncation."""
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
        out = torch.full((len(texts), n), EOS_ID, dtype=torch.long)  # pad with EOS, not 0
        truncated = torch.zeros(len(texts), dtype=torch.bool)
        for i, text in enumerate(texts):
            ids = self.encode(text)
            truncated[i] = len(ids) > n - 2
            ids = [BOS_ID] + ids[: n - 2]  # EOS stays last after truncation; it is already in `out`
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


def build_text_encoder(config: CLIPTextConfig) -> CLIPTextModel:
    """A randomly initialised transformers CLIPTextModel (local config, no hub access)."""
    return CLIPTextModel(config)


@functools.lru_cache(maxsize=None)
def _installed_layout() -> tuple[str, bool]:
    """(key prefix, whether position_ids is a persistent buffer) of the installed transformers' CLIPTextModel."""
    probe = CLIPTextModel(sd14_text_config(vocab_size=4, hidden_size=4, num_hidden_layers=1, num_attention_heads=1,
                                           intermediate_size=4, max_position_embeddings=2))
    keys = probe.state_dict().keys()
    prefix = "text_model." if "text_model.final_layer_norm.weight" in keys else ""
    return prefix, prefix + "embeddings.position_ids" in keys


def _bare_key(key: str) -> str:
    """Key without the original (`cond_stage_model.transformer.`) and transformers 4 (`text_model.`) prefixes."""
    for p in ("cond_stage_model.transformer.", "text_model."):
        if key.startswith(p):
            key = key[len(p):]
    return key


def convert_original_text_state_dict(sd: dict) -> dict:
    """Map SD's text-encoder weights to the installed CLIPTextModel's keys.

    Accepts the original layout (`cond_stage_model.transformer.text_model.*`, with or without the
    `cond_stage_model.transformer.` prefix), diffusers' `text_encoder/` (`text_model.*`) and transformers 5's
    (no prefix). The checkpoint's `position_ids` is dropped: it is a constant arange, and some merged checkpoints
    carry it as drifted floats. If the installed transformers persists it, a fresh arange is put in its place.
    Unknown keys pass through, so a strict load names them.
    """
    prefix, wants_position_ids = _installed_layout()
    out = {prefix + _bare_key(k): v for k, v in sd.items() if _bare_key(k) != "embeddings.position_ids"}
    pos = out.get(prefix + "embeddings.position_embedding.weight")
    if wants_position_ids and pos is not None:
        out[prefix + "embeddings.position_ids"] = torch.arange(pos.shape[0]).unsqueeze(0)
    return out


def text_config_from_state_dict(sd: dict, num_heads: int | None = None) -> CLIPTextConfig:
    """Infer vocab, width, depth, MLP width and positions from tensor shapes (any layout accepted above).
    The head count is not in the shapes: default hidden // 64 (12 for SD's 768-wide encoder)."""
    sd = {_bare_key(k): v for k, v in sd.items()}
    need = ["embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
            "encoder.layers.0.mlp.fc1.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise KeyError(f"text encoder weights lack {missing}: not a CLIP text model state dict")
    vocab, hidden = sd[need[0]].shape
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
    heads = num_heads or max(1, hidden // 64)
    if hidden % heads:
        raise ValueError(f"hidden size {hidden} is not divisible by num_heads={heads}")
    return sd14_text_config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=sd[need[2]].shape[0],
                            max_position_embeddings=sd[need[1]].shape[0])


def load_text_state_dict(model: CLIPTextModel, sd: dict) -> None:
    """Convert and load strictly; one error lists every missing, unexpected and wrongly shaped key."""
    from .loading import strict_load

    strict_load(model, convert_original_text_state_dict(sd), "text encoder")


def load_text_encoder(sd: dict, num_heads: int | None = None) -> CLIPTextModel:
    """Build a CLIPTextModel sized from `sd` and load it strictly."""
    model = build_text_encoder(text_config_from_state_dict(sd, num_heads))
    load_text_state_dict(model, sd)
    return model


def encode(text_model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(B, 77) ids -> (B, 77, hidden): all hidden states after the final layer norm, SD's cross-attention context.
    Causal attention and no padding mask, as in SD: the EOS padding is attended like any token."""
    device = next(text_model.parameters()).device
    return text_model(input_ids=ids.to(device)).last_hidden_state
