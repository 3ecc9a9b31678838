"""Text side: our tokenizer against transformers' CLIPTokenizer, the text encoder against transformers' own model."""
import gzip

import ftfy
import pytest
import regex as re
import torch
from transformers import CLIPTokenizer

from model import text
from model.loading import CheckpointError
from model.text import (BOS_ID, EOS_ID, Tokenizer, build_text_encoder, convert_original_text_state_dict, encode,
                        load_text_encoder, load_text_state_dict, sd14_text_config, text_config_from_state_dict)

LIVE_TEMPLATES = [  # DreamBooth benchmark prompts (live subjects, then the object-only ones)
    "a {0} {1} in the jungle", "a {0} {1} in the snow", "a {0} {1} on the beach", "a {0} {1} on a cobblestone street",
    "a {0} {1} on top of pink fabric", "a {0} {1} on top of a wooden floor", "a {0} {1} with a city in the background",
    "a {0} {1} with a mountain in the background", "a {0} {1} with a blue house in the background",
    "a {0} {1} on top of a purple rug in a forest", "a {0} {1} wearing a red hat", "a {0} {1} wearing a santa hat",
    "a {0} {1} wearing a rainbow scarf", "a {0} {1} wearing a black top hat and a monocle",
    "a {0} {1} in a chef outfit", "a {0} {1} in a firefighter outfit", "a {0} {1} in a police outfit",
    "a {0} {1} wearing pink glasses", "a {0} {1} wearing a yellow shirt", "a {0} {1} in a purple wizard outfit",
    "a red {0} {1}", "a purple {0} {1}", "a shiny {0} {1}", "a wet {0} {1}", "a cube shaped {0} {1}",
]
OBJECT_ONLY_TEMPLATES = [
    "a {0} {1} with a wheat field in the background", "a {0} {1} with a tree and autumn leaves in the background",
    "a {0} {1} with the Eiffel Tower in the background", "a {0} {1} floating on top of water",
    "a {0} {1} floating in an ocean of milk", "a {0} {1} on top of green grass with sunflowers around it",
    "a {0} {1} on top of a mirror", "a {0} {1} on top of the sidewalk in a crowded street",
    "a {0} {1} on top of a dirt road", "a {0} {1} on top of a white rug",
]
LONG = ("a highly detailed oil painting of a small brown dog with floppy ears sitting on a red velvet cushion in a "
        "sunlit Victorian drawing room, surrounded by antique furniture, potted ferns, gilded picture frames, a "
        "crackling fireplace, soft volumetric light streaming through lace curtains, dust motes in the air, rich "
        "warm colours, intricate brushwork, by a nineteenth century master, museum quality, trending on artstation")
PROMPTS = (
    [t.format("sks", "dog") for t in LIVE_TEMPLATES]
    + [t.format("sks", "backpack") for t in OBJECT_ONLY_TEMPLATES]
    + [
        "a photo of a cat", "A Photo Of A CAT", "", "   ", "a cat\tand\na dog", "  leading and trailing spaces  ",
        "3.14159 is pi; 1,000,000 dollars!!!", "the year 2024 — 42% off", "1234567890" * 3,
        "what's up? I'm here, you're there, we've been, it'll be, he'd go, it's",
        "hello-world_foo.bar/baz@qux#1 ~`^", "(masterpiece:1.2), [[best quality]], {ultra detailed}",
        "'single' \"double\" C++ & C# <tags>", "emoji 🐶🐱🎉 party", "café naïve résumé", "cafe\u0301 decomposed",
        "ein Hund im Schnee an der Straße", "東京の夜景", "一只可爱的猫", "собака на пляже", "ελληνικό κείμενο",
        "مرحبا بالعالم", "a\u00a0cat, non-breaking space", "İstanbul ½ ²",
        "x<|endoftext|>y", "!<|endoftext|>", "<|startoftext|>hi",  # literal special tokens
        LONG, "a " * 100, "dog " * 75, "dog " * 76,  # truncated, and at the 75-token boundary
    ]
)
# Where SD's tokenizer (transformers 4 + ftfy) and transformers 5's differ: ftfy fixes the text (curly quotes,
# HTML entities, full-width letters, ligatures, mojibake), Python lowercases a final sigma as "ς", and the special
# tokens are also recognised after lowercasing.
SD_ERA_ONLY = ["don’t stop", "“quoted”", "fish &amp; chips", "ＦＵＬＬ ｗｉｄｔｈ", "ﬁsh and ﬂowers", "ΟΔΟΣ",
               "cafÃ© mojibake", "HELLO <|ENDOFTEXT|>"]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def oracle():
    return clip_tokenizer()


def clip_tokenizer(**kwargs):
    """transformers' CLIPTokenizer built offline from open_clip's BPE file, parsed here independently."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    chars = list(bytes_to_unicode().values())
    words = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    # transformers 5: pass vocab= / merges= as objects (vocab_file= silently gives wrong ids).
    return CLIPTokenizer(vocab={w: i for i, w in enumerate(words)}, merges=merges, **kwargs)


def sd_ids(oracle, texts):
    """What SD's pipelines do: pad to 77 with EOS (CLIPTokenizer's pad token), truncate to 77."""
    return oracle(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def test_oracle_gives_known_ids(oracle, tok):
    cat = [BOS_ID, 320, 1125, 539, 320, 2368] + [EOS_ID] * 71  # "a photo of a cat", as SD tokenizes it
    assert sd_ids(oracle, "a photo of a cat")[0].tolist() == cat
    assert tok("a photo of a cat")[0].tolist() == cat
    assert oracle("sks dog").input_ids == tok("sks dog")[0, :4].tolist() == [BOS_ID, 48136, 1929, EOS_ID]


def test_tokenizer_matches_clip_tokenizer(tok, oracle):
    assert len(PROMPTS) >= 50
    ours, truncated = tok(PROMPTS, return_truncated=True)
    assert ours.shape == (len(PROMPTS), 77) and ours.dtype == torch.long
    ref = sd_ids(oracle, PROMPTS)
    bad = [p for p, a, b in zip(PROMPTS, ours, ref) if not torch.equal(a, b)]
    assert not bad, f"ids differ from CLIPTokenizer for {bad}"
    # The truncation flag agrees with CLIPTokenizer's untruncated length.
    full = [len(ids) for ids in oracle(PROMPTS).input_ids]
    assert truncated.tolist() == [n > 77 for n in full]
    assert [tok.count_tokens(p) for p in PROMPTS] == full
    assert truncated.sum() >= 3


def test_sd_era_cleaning(tok, oracle):
    def sd_clean(t):  # transformers 4 CLIPTokenizer._tokenize with ftfy installed (SD-1.4's environment)
        return re.sub(r"\s+", " ", ftfy.fix_text(t)).strip().lower()

    for p in SD_ERA_ONLY:
        assert torch.equal(tok(p), sd_ids(oracle, sd_clean(p))), p
        assert not torch.equal(tok(p), sd_ids(oracle, p)), f"{p!r} no longer shows the transformers 5 difference"
    assert torch.equal(tok("don’t"), tok("don't"))


def test_truncation_and_padding(tok):
    ids, trunc = tok(["dog " * 75, "dog " * 76, ""], return_truncated=True)
    assert trunc.tolist() == [False, True, False]
    for row in ids[:2]:  # both fill all 77 positions and end with EOS
        assert row[0] == BOS_ID and (row[1:76] == 1929).all() and row[76] == EOS_ID
    assert ids[2].tolist() == [BOS_ID] + [EOS_ID] * 76  # empty prompt: pad with EOS, never 0
    assert tok.count_tokens("dog " * 76) == 78
    assert torch.equal(tok(["a cat", "a dog"])[1], tok("a dog")[0])


# ----------------------------------------------------------------------------- text encoder

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)  # full 49408 vocab


def original_layout(model):
    """A state dict as `sd-v1-4.ckpt` stores the text encoder: transformers 4 names plus position_ids."""
    sd = {"cond_stage_model.transformer.text_model." + text._bare_key(k): v for k, v in model.state_dict().items()}
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    return sd


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_text_encoder(sd14_text_config(**TINY)).eval()


def test_text_encoder_from_original_layout(tiny, tok):
    sd = original_layout(tiny)
    cfg = text_config_from_state_dict(sd, num_heads=2)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size,
            cfg.max_position_embeddings) == (49408, 32, 2, 64, 77)
    model = load_text_encoder(sd, num_heads=2).eval()
    ids = tok(["a photo of a sks dog", "", LONG])
    with torch.no_grad():
        out = encode(model, ids)
        torch.testing.assert_close(out, tiny(input_ids=ids).last_hidden_state, rtol=0, atol=0)
    assert out.shape == (3, 77, 32)
    # The EOS padding is attended like any token (SD uses all 77 states): a 0-padded prompt gives other states.
    zero_pad = ids[:1].clone()
    zero_pad[0, 8:] = 0
    with torch.no_grad():
        assert not torch.allclose(encode(model, zero_pad)[0, 8:], out[0, 8:])


def test_other_key_layouts(tiny):
    target = set(tiny.state_dict())
    orig = original_layout(tiny)
    stripped = {k[len("cond_stage_model.transformer."):]: v for k, v in orig.items()}  # also diffusers' layout
    bare = {text._bare_key(k): v for k, v in orig.items()}
    for sd in (orig, stripped, bare):
        conv = convert_original_text_state_dict(sd)
        assert set(conv) == target
        load_text_state_dict(build_text_encoder(sd14_text_config(**TINY)), sd)


def test_conversion_for_transformers4_layout(tiny, monkeypatch):
    # transformers 4 nests the model under `text_model.` and some releases persist position_ids; we cannot import
    # that version here, so pretend to be it and check the keys we would produce.
    monkeypatch.setattr(text, "_installed_layout", lambda projection=False: ("text_model.", True))
    sd = original_layout(tiny)
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77.0).unsqueeze(0) - 1e-3
    conv = convert_original_text_state_dict(sd)
    assert set(conv) == {"text_model." + k for k in tiny.state_dict()} | {"text_model.embeddings.position_ids"}
    assert torch.equal(conv["text_model.embeddings.position_ids"], torch.arange(77).unsqueeze(0))  # fresh, not drifted


def test_strict_loading_names_keys(tiny):
    p = "cond_stage_model.transformer.text_model."
    model = build_text_encoder(sd14_text_config(**TINY))
    sd = original_layout(tiny)
    del sd[p + "encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(CheckpointError, match=r"missing \(1\): encoder.layers.1.mlp.fc2.bias$"):
        load_text_state_dict(model, sd)
    sd = original_layout(tiny)
    sd[p + "encoder.layers.0.self_attn.q_proj.weight"] = torch.zeros(32, 16)
    with pytest.raises(CheckpointError, match=r"wrong shape \(1\): encoder.layers.0.self_attn.q_proj.weight: "
                                              r"checkpoint \(32, 16\) vs model \(32, 32\)"):
        load_text_state_dict(model, sd)
    sd = original_layout(tiny)
    sd["cond_stage_model.model.token_embedding.weight"] = torch.zeros(1)  # SD-2 (open_clip) naming
    with pytest.raises(CheckpointError, match="unexpected .*cond_stage_model.model.token_embedding.weight"):
        load_text_state_dict(model, sd)
    with pytest.raises(KeyError, match="embeddings.token_embedding.weight"):
        text_config_from_state_dict({k: v for k, v in original_layout(tiny).items() if "token_embedding" not in k})


def test_sd14_size_and_inference():
    # Full-size on the meta device: shapes only, no memory, no init time.
    with torch.device("meta"):
        full = build_text_encoder(sd14_text_config())
    assert sum(p.numel() for p in full.parameters()) == 123_060_480  # CLIP ViT-L/14 text transformer
    sd = original_layout(full)
    assert len(sd) == 197  # as in sd-v1-4.ckpt, position_ids included
    assert text_config_from_state_dict(sd).to_diff_dict() == sd14_text_config().to_diff_dict()
    c = sd14_text_config()
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size,
            c.max_position_embeddings, c.hidden_act) == (49408, 768, 12, 12, 3072, 77, "quick_gelu")
    assert set(convert_original_text_state_dict(sd)) == set(full.state_dict())
