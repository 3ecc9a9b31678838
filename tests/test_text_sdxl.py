"""SDXL's text side against its oracles, at a tiny SDXL shape (CLIP-L 64 wide, bigG 128 wide: head dim 64 as in
the real ones, so heads come from width // 64), fp32 on CPU:
- tokenizer 2 against open_clip.tokenize (what sgm's FrozenOpenCLIPEmbedder2 calls);
- encoder 1 against transformers' CLIPTextModel hidden_states[-2];
- encoder 2, converted from open_clip's layout, against open_clip's own CLIP model (penultimate states, pooled);
- the whole conditioner against diffusers' StableDiffusionXLPipeline.encode_prompt;
- the SD-1.x flavour against today's text.encode, bit for bit.
"""
import json

import open_clip
import pytest
import torch
from open_clip.model import CLIP
from test_text import LONG, PROMPTS, SD_ERA_ONLY, clip_tokenizer
from test_unet import randomize
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from model import text
from model.conditioner import (EncoderSpec, TextConditioner, TextConditionerConfig,
                               load_text_conditioner, sd1_text_config, sdxl_text_config)
from model.conditioning import micro_conditioning
from model.layout_original import TEXT_PREFIXES
from model.loading import CheckpointError, strip_prefix
from model.text import (BOS_ID, EOS_ID, Tokenizer, bigg_text_config, build_text_encoder,
                        convert_original_text_state_dict, encode, load_text_encoder, sd14_text_config,
                        text_config_from_state_dict)

TINY_L = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, intermediate_size=128)
TINY_G = dict(width=128, heads=2, layers=3)  # open_clip text_cfg; mlp_ratio 4 -> 512
TINY_P = 96  # bigG's pooled projection width (1280 in the real one)
PREFIX_L, PREFIX_G = TEXT_PREFIXES["sdxl"]["0"], TEXT_PREFIXES["sdxl"]["1"]
EXTRA = ["fish &amp;amp; chips", "<b> fish &amp; chips", "x<|endoftext|>y", "a <end_of_text> b", "<START_OF_TEXT>hi",
         "tab\tand\u3000space"]


@pytest.fixture(scope="module")
def tok2():
    return Tokenizer(style="open_clip")


@pytest.fixture(scope="module")
def tok1():
    return Tokenizer()


@pytest.fixture(scope="module")
def bigg_oc():
    """open_clip's own CLIP at a tiny bigG shape (exact GELU, as ViT-bigG-14), random in every parameter."""
    torch.manual_seed(0)
    vision = dict(image_size=16, patch_size=8, width=64, layers=1, head_width=64)  # unused (sgm deletes it)
    text_cfg = dict(context_length=77, vocab_size=49408, **TINY_G)
    return randomize(CLIP(embed_dim=TINY_P, vision_cfg=vision, text_cfg=text_cfg)).eval()


@pytest.fixture(scope="module")
def clip_l():
    torch.manual_seed(1)
    return randomize(build_text_encoder(sd14_text_config(**TINY_L))).eval()


def open_clip_layout(model):
    """What sgm's FrozenOpenCLIPEmbedder2 stores as `model.*`: the CLIP model without `visual` (logit_scale kept)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("visual.")}


def sgm_layout(clip_l):
    """conditioner.embedders.0.transformer.* as transformers 4 named it (text_model. level, position_ids)."""
    sd = {"text_model." + text._bare_key(k): v for k, v in clip_l.state_dict().items()}
    sd["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    return sd


@pytest.fixture(scope="module")
def sdxl_file(bigg_oc, clip_l):
    """The text part of an original SDXL file."""
    sd = {PREFIX_L + k: v for k, v in sgm_layout(clip_l).items()}
    sd.update({PREFIX_G + k: v for k, v in open_clip_layout(bigg_oc).items()})
    return sd


def original_parts(sd):
    return [strip_prefix(sd, p) for p in (PREFIX_L, PREFIX_G)]


def open_clip_text(model, ids):
    """open_clip's own forward: (penultimate states, pooled = ln_final(last)[ids.argmax] @ text_projection)."""
    n = len(model.transformer.resblocks)
    out = model.forward_intermediates(text=ids, text_indices=[n - 2], normalize=False)
    return out["text_intermediates"][0], out["text_features"]


# ----------------------------------------------------------------------------- tokenizers

def test_open_clip_tokenizer_matches_open_clip(tok2):
    texts = PROMPTS + SD_ERA_ONLY + EXTRA
    ours, truncated = tok2(texts, return_truncated=True)
    ref = open_clip.tokenize(texts)  # sgm: tokens = open_clip.tokenize(text)
    bad = [p for p, a, b in zip(texts, ours, ref) if not torch.equal(a, b)]
    assert not bad, f"ids differ from open_clip.tokenize for {bad}"
    assert truncated.tolist() == [tok2.count_tokens(p) > 77 for p in texts] and truncated.sum() >= 3
    # known ids, padded with 0 (not EOS); EOT is the largest id, so argmax finds it (sgm's pooling rule)
    assert ours[texts.index("")].tolist() == [BOS_ID, EOS_ID] + [0] * 75
    cat = tok2("a photo of a cat")[0]
    assert cat.tolist() == [BOS_ID, 320, 1125, 539, 320, 2368, EOS_ID] + [0] * 70
    eot = (ours == EOS_ID).int().argmax(-1)  # first EOS
    assert torch.equal(ours.argmax(-1), eot) and (ours[torch.arange(len(texts)), eot] == EOS_ID).all()


def test_tokenizer_styles(tok1, tok2):
    """Where SDXL's two tokenizers differ, beyond the padding (encoder 1: SD's CLIPTokenizer, encoder 2:
    open_clip.tokenize): html entities, and which spelling of the special tokens is special."""
    plain = [p for p in PROMPTS if "<|" not in p]
    for p, a, b in zip(plain, tok1(plain), tok2(plain)):  # the same BPE ids up to EOS, then EOS vs 0 padding
        n = int((b == EOS_ID).int().argmax()) + 1
        assert torch.equal(a[:n], b[:n]) and (a[n:] == EOS_ID).all() and (b[n:] == 0).all(), p
    # ftfy unescapes html entities unless the text looks like html; open_clip then unescapes (twice) regardless
    assert torch.equal(tok1("fish &amp; chips"), tok1("fish & chips"))
    assert torch.equal(tok2("<b> fish &amp; chips"), tok2("<b> fish & chips"))
    assert not torch.equal(tok1("<b> fish &amp; chips"), tok1("<b> fish & chips"))
    assert tok1("x<|endoftext|>y")[0, :5].tolist() == [BOS_ID, 343, EOS_ID, 344, EOS_ID]  # special in SD's
    assert EOS_ID not in tok2("x<|endoftext|>y")[0, :9].tolist()  # characters in open_clip's ...
    assert tok2("a <end_of_text> b")[0, :6].tolist() == [BOS_ID, 320, EOS_ID, 321, EOS_ID, 0]  # ... its own spelling
    with pytest.raises(ValueError, match="tokenizer style 'hf' is not one of"):
        Tokenizer(style="hf")


# ----------------------------------------------------------------------------- encoders

def test_open_clip_conversion_and_sizes(bigg_oc):
    sd = open_clip_layout(bigg_oc)
    assert "logit_scale" in sd and "text_projection" in sd  # as in the SDXL file
    cfg = text_config_from_state_dict(sd)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size,
            cfg.max_position_embeddings, cfg.projection_dim, cfg.hidden_act) == (49408, 128, 3, 2, 512, 77, 96, "gelu")
    conv = convert_original_text_state_dict(sd, projection=True)
    model = build_text_encoder(cfg, projection=True)
    assert set(conv) == set(model.state_dict())
    w = sd["transformer.resblocks.1.attn.in_proj_weight"]  # (3W, W) rows [q; k; v]
    assert torch.equal(conv["text_model.encoder.layers.1.self_attn.k_proj.weight"], w[128:256])
    assert torch.equal(conv["text_model.encoder.layers.1.self_attn.v_proj.bias"],
                       sd["transformer.resblocks.1.attn.in_proj_bias"][256:])
    assert torch.equal(conv["text_projection.weight"], sd["text_projection"].T)  # x @ P == Linear with P.T


def test_encoder2_vs_open_clip(bigg_oc, tok2):
    """Penultimate states and pooled vector of the converted bigG against open_clip's own model."""
    model = load_text_encoder(open_clip_layout(bigg_oc)).eval()
    assert isinstance(model, CLIPTextModelWithProjection) and model.config.hidden_act == "gelu"
    tc = TextConditioner(TextConditionerConfig([EncoderSpec(model.config, "open_clip", "penultimate", pooled=True)]))
    tc.encoders[0].load_state_dict(model.state_dict())
    ids = tok2(["a photo of a sks dog", "", LONG, "x<|endoftext|>y"])  # LONG: truncated, EOT at 76
    with torch.no_grad():
        cond = tc(ids[:, None])
        pen, pooled = open_clip_text(bigg_oc, ids)
    assert cond.context.shape == (4, 77, 128) and cond.y.shape == (4, TINY_P)
    torch.testing.assert_close(cond.context, pen, rtol=0, atol=2e-6)
    torch.testing.assert_close(cond.y, pooled, rtol=0, atol=2e-6)
    # not the last layer, and the padding matters (SD's EOS padding gives other states for encoder 2)
    with torch.no_grad():
        assert not torch.allclose(tc.encoders[0](input_ids=ids).last_hidden_state, pen, atol=1e-3)
        eos_padded = torch.where(ids == 0, EOS_ID, ids)
        assert not torch.allclose(tc(eos_padded[:, None]).context[0, 8:], cond.context[0, 8:], atol=1e-3)


def test_encoder1_penultimate(clip_l, tok1):
    """SDXL's CLIP-L: hidden_states[-2] (sgm: layer="hidden", layer_idx=11 of 12 layers), no final norm."""
    tc = load_text_conditioner(TextConditionerConfig([EncoderSpec(sd14_text_config(), "clip", "penultimate")]),
                               [sgm_layout(clip_l)])
    ids = tok1(["a photo of a sks dog", "", LONG])
    with torch.no_grad():
        ref = clip_l(input_ids=ids, output_hidden_states=True).hidden_states
        ours = tc(ids).context
    assert len(ref) == TINY_L["num_hidden_layers"] + 1  # the embeddings, then one per layer
    torch.testing.assert_close(ours, ref[-2], rtol=0, atol=0)
    assert not torch.allclose(ours, clip_l(input_ids=ids).last_hidden_state, atol=1e-3)


# ----------------------------------------------------------------------------- the conditioner

@pytest.fixture(scope="module")
def sdxl_tc(sdxl_file):
    return load_text_conditioner(sdxl_text_config(resolution=64), original_parts(sdxl_file))


def test_sdxl_conditioner_from_original_file(sdxl_tc, bigg_oc, clip_l, tok1, tok2):
    c = sdxl_tc.config
    assert (c.context_dim, c.y_dim) == (64 + 128, TINY_P + 6 * 256)
    assert [e.config["num_attention_heads"] for e in c.encoders] == [1, 2]  # width // 64
    assert [e.config["hidden_act"] for e in c.encoders] == ["quick_gelu", "gelu"]  # from the flavour
    prompts = ["a photo of a sks dog", "", LONG, "fish &amp; chips"]
    ids = sdxl_tc.tokenize(prompts)
    assert ids.shape == (4, 2, 77)
    assert torch.equal(ids[:, 0], tok1(prompts)) and torch.equal(ids[:, 1], tok2(prompts))
    sizes = dict(original_size=torch.tensor([[48, 64], [64, 64], [32, 32], [80, 40]]), crop_top_left=(8, 0))
    with torch.no_grad():
        cond = sdxl_tc(ids, **sizes)
        pen, pooled = open_clip_text(bigg_oc, ids[:, 1])
        states_l = clip_l(input_ids=ids[:, 0], output_hidden_states=True).hidden_states[-2]
    assert cond.context.shape == (4, 77, 192) and cond.y.shape == (4, TINY_P + 1536)
    torch.testing.assert_close(cond.context[..., :64], states_l, rtol=0, atol=0)  # encoder 1 first, as sgm
    torch.testing.assert_close(cond.context[..., 64:], pen, rtol=0, atol=2e-6)
    torch.testing.assert_close(cond.y[:, :TINY_P], pooled, rtol=0, atol=2e-6)  # pooled first, then the sizes
    feats = micro_conditioning(sizes["original_size"], (8, 0), (64, 64))  # target defaults to the resolution
    torch.testing.assert_close(cond.y[:, TINY_P:], feats, rtol=0, atol=0)
    with torch.no_grad():  # sizes default to (resolution, resolution) and crop (0, 0)
        default = sdxl_tc(ids[:1]).y[:, TINY_P:]
    torch.testing.assert_close(default, micro_conditioning((64, 64), (0, 0), (64, 64)), rtol=0, atol=0)


def test_null(sdxl_tc):
    """SDXL's unconditional text is zeros (context and pooled), its size features kept; SD-1.x's is the
    encoded empty prompt."""
    null = sdxl_tc.null()
    assert null.context.shape == (1, 77, 192) and not null.context.any() and not null.y[:, :TINY_P].any()
    torch.testing.assert_close(null.y[:, TINY_P:], micro_conditioning((64, 64), (0, 0), (64, 64)), rtol=0, atol=0)
    per_image = sdxl_tc.null(original_size=torch.tensor([[32, 32], [64, 48]]))
    assert len(per_image) == 2 and not torch.equal(per_image.y[0], per_image.y[1])
    with torch.no_grad():
        assert sdxl_tc.encode([""]).context.abs().sum() > 0  # the encoded "" is not the null
    sd1 = TextConditioner(sd1_text_config(**TINY_L)).eval()
    with torch.no_grad():
        torch.testing.assert_close(sd1.null().context, sd1.encode([""]).context, rtol=0, atol=0)
    assert sd1.null().y is None


def test_sdxl_conditioner_vs_diffusers(sdxl_tc):
    """diffusers' StableDiffusionXLPipeline.encode_prompt with the same two encoders and its tokenizers."""
    from diffusers import StableDiffusionXLPipeline

    enc1 = build_text_encoder(sdxl_tc.config.encoders[0].clip_config)
    enc2 = CLIPTextModelWithProjection(sdxl_tc.config.encoders[1].clip_config)  # eos_token_id 2, as SDXL's
    enc1.load_state_dict(sdxl_tc.encoders[0].state_dict())
    enc2.load_state_dict(sdxl_tc.encoders[1].state_dict())
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=enc1.eval(), text_encoder_2=enc2.eval(),
                                     tokenizer=clip_tokenizer(model_max_length=77),
                                     tokenizer_2=clip_tokenizer(model_max_length=77, pad_token="!"),
                                     unet=None, scheduler=None)
    # diffusers' folder layout loads into the conditioner as it is
    tc = load_text_conditioner(sdxl_text_config(resolution=64), [enc1.state_dict(), enc2.state_dict()])
    prompts = ["a photo of a sks dog", "", "A Photo Of A CAT", LONG]  # ftfy-neutral: transformers 5 skips ftfy
    assert torch.equal(pipe.tokenizer_2(prompts, padding="max_length", max_length=77, truncation=True,
                                        return_tensors="pt").input_ids, tc.tokenize(prompts)[:, 1])
    with torch.no_grad():
        ctx, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                                          do_classifier_free_guidance=True)
        with pytest.warns(UserWarning, match="prompt longer than 77 tokens, truncated: 'a highly detailed"):
            cond = tc.encode(prompts)
        null = tc.null()
    torch.testing.assert_close(cond.context, ctx, rtol=0, atol=0)
    torch.testing.assert_close(cond.y[:, :TINY_P], pooled, rtol=0, atol=0)
    torch.testing.assert_close(null.context.expand_as(neg), neg, rtol=0, atol=0)  # force_zeros_for_empty_prompt
    torch.testing.assert_close(null.y[:, :TINY_P].expand_as(neg_pooled), neg_pooled, rtol=0, atol=0)


def test_sd1_conditioner_is_todays_path(tok1):
    """The SD-1.x flavour gives exactly what text.encode gave (same ids, same states, no y)."""
    torch.manual_seed(2)
    encoder = randomize(build_text_encoder(sd14_text_config(**TINY_L))).eval()
    sd = {"cond_stage_model.transformer.text_model." + text._bare_key(k): v for k, v in encoder.state_dict().items()}
    tc = load_text_conditioner(sd1_text_config(), [strip_prefix(sd, TEXT_PREFIXES["sd1"]["0"])])
    ids = tc.tokenize(PROMPTS[:20])
    assert ids.shape == (20, 1, 77) and torch.equal(ids[:, 0], tok1(PROMPTS[:20]))
    with torch.no_grad():
        cond = tc(ids)
        assert torch.equal(cond.context, encode(encoder, ids[:, 0])) and cond.y is None
        assert torch.equal(tc(ids[:, 0]).context, cond.context)  # (B, 77) accepted with one encoder
    assert (tc.context_dim, tc.y_dim) == (64, None)


def test_config_round_trip_and_legacy(sdxl_tc):
    d = json.loads(json.dumps(sdxl_tc.config.to_dict()))  # what a checkpoint's JSON metadata holds
    again = TextConditioner(TextConditionerConfig.from_dict(d))
    again.load_state_dict(sdxl_tc.state_dict(), strict=True)
    assert again.config.to_dict() == sdxl_tc.config.to_dict()
    ids = sdxl_tc.tokenize(["a dog"])
    with torch.no_grad():
        a, b = again(ids), sdxl_tc(ids)
    assert torch.equal(a.context, b.context) and torch.equal(a.y, b.y)
    # a JeDi checkpoint from before the conditioner stored one CLIPTextConfig dict: it is the SD-1.x flavour
    legacy = TextConditionerConfig.from_dict(sd14_text_config(**TINY_L).to_dict())
    assert legacy.to_dict() == sd1_text_config(**TINY_L).to_dict()
    with pytest.raises(ValueError, match="layer 'first' is not one of"):
        EncoderSpec(sd14_text_config(), layer="first")
    with pytest.raises(ValueError, match="needs a resolution"):
        TextConditionerConfig([EncoderSpec(sd14_text_config())], micro_conditioning=True)


def test_loading_errors(sdxl_file, clip_l, sdxl_tc):
    cfg = sdxl_text_config()
    sd = dict(sdxl_file)
    del sd[PREFIX_G + "transformer.resblocks.2.attn.in_proj_bias"]
    with pytest.raises(CheckpointError, match=r"text conditioner: .*\n  missing \(3\): encoders.1.text_model.encoder."
                                              r"layers.2.self_attn.k_proj.bias, .*q_proj.bias, .*v_proj.bias$"):
        load_text_conditioner(cfg, original_parts(sd))
    sd = dict(sdxl_file)
    sd[PREFIX_G + "transformer.resblocks.0.attn.q_norm.weight"] = torch.zeros(128)  # not SDXL's bigG
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): encoders.1.text_model.encoder.layers.0.attn.q_norm"):
        load_text_conditioner(cfg, original_parts(sd))
    sd = dict(sdxl_file)
    sd[PREFIX_G + "transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(128, 128)
    with pytest.raises(CheckpointError, match=r"in_proj_weight has 128 rows, not 3 x width"):
        load_text_conditioner(cfg, original_parts(sd))
    sd = dict(sdxl_file)
    sd[PREFIX_L + "text_model.final_layer_norm.weight"] = torch.zeros(32)
    with pytest.raises(CheckpointError, match=r"text conditioner: .*\n  wrong shape \(1\): encoders.0.final_layer_n"):
        load_text_conditioner(cfg, original_parts(sd))
    with pytest.raises(CheckpointError, match=r"text encoder 2: a text_projection is needed \(for the pooled "
                                              r"vector\), and the weights have none"):
        load_text_conditioner(cfg, [sgm_layout(clip_l), sgm_layout(clip_l)])
    sd = dict(sdxl_file)  # a stray layer index would size a huge model: refused on the meta device, no allocation
    sd[PREFIX_L + "text_model.encoder.layers.99999.mlp.fc1.weight"] = torch.zeros(128, 64)
    with pytest.raises(CheckpointError, match="text encoder 1: text encoder layers are not numbered 0 to 99999: "
                                              "layer 2 is missing"):
        load_text_conditioner(cfg, original_parts(sd))
    with pytest.raises(ValueError, match="2 encoders but 1 weight sets"):
        load_text_conditioner(cfg, original_parts(sdxl_file)[:1])
    with pytest.raises(CheckpointError, match="text encoder 2: no weights"):
        load_text_conditioner(cfg, [original_parts(sdxl_file)[0], {}])
    with pytest.raises(ValueError, match=r"expected ids of shape \(B, 2, 77\), got \(3, 77\)"):
        sdxl_tc(torch.zeros(3, 77, dtype=torch.long))


def test_full_size_shapes():
    """SDXL's two encoders at full size on the meta device: open_clip's ViT-bigG-14 text tower converts key for
    key and shape for shape into bigg_text_config, whose sizes are inferred back from the shapes."""
    oc_cfg = open_clip.get_model_config("ViT-bigG-14")
    with torch.device("meta"):
        oc = CLIP(embed_dim=oc_cfg["embed_dim"], vision_cfg=dict(image_size=14, patch_size=14, width=64, layers=1,
                                                                   head_width=64), text_cfg=oc_cfg["text_cfg"])
        tc = TextConditioner(sdxl_text_config())
    sd = open_clip_layout(oc)
    assert text_config_from_state_dict(sd).to_diff_dict() == bigg_text_config().to_diff_dict()
    ours = tc.encoders[1].state_dict()
    conv = convert_original_text_state_dict(sd, projection=True)
    assert set(conv) == set(ours) and all(conv[k].shape == ours[k].shape for k in ours)
    n_oc = sum(v.numel() for k, v in sd.items() if k != "logit_scale")
    assert sum(p.numel() for p in tc.encoders[1].parameters()) == n_oc == 694_659_840  # bigG text + projection
    assert sum(p.numel() for p in tc.encoders[0].parameters()) == 123_060_480  # CLIP ViT-L/14 text
    assert (tc.context_dim, tc.y_dim) == (2048, 2816)  # sd_xl_base.yaml: context_dim, adm_in_channels


@pytest.mark.slow
def test_full_size_bigg_vs_open_clip(tok2):
    """Full-size ViT-bigG-14 text tower (random weights, ~2.8 GB fp32 each copy) against open_clip's forward."""
    oc_cfg = open_clip.get_model_config("ViT-bigG-14")
    torch.manual_seed(0)
    oc = CLIP(embed_dim=oc_cfg["embed_dim"], vision_cfg=dict(image_size=14, patch_size=14, width=64, layers=1,
                                                             head_width=64), text_cfg=oc_cfg["text_cfg"]).eval()
    ids = tok2(["a photo of a sks dog", "", LONG])
    with torch.no_grad():
        pen, pooled = open_clip_text(oc, ids)
    model = load_text_encoder(open_clip_layout(oc)).eval()
    del oc
    tc = TextConditioner(TextConditionerConfig([EncoderSpec(model.config, "open_clip", "penultimate", True)]))
    tc.encoders[0] = model
    with torch.no_grad():
        cond = tc(ids[:, None])
    err = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
    assert err(cond.context, pen) < 1e-5 and err(cond.y, pooled) < 1e-5, (err(cond.context, pen), err(cond.y, pooled))


def test_jedi_checkpoints(sdxl_tc, tmp_path):
    """save_jedi/load_jedi carry the conditioner: an SDXL one round-trips (config and weights), and the shipped
    toy checkpoint (format 1: one CLIPTextConfig, tensors `text.*`) loads as the SD-1.x conditioner and re-saves
    (format 2) to the same text conditioning."""
    import os

    from model.loading import JEDI_FORMAT, load_jedi, save_jedi
    from model.unet import UNet, UNetConfig
    from test_unet import TINY

    unet = UNet(UNetConfig(**{**TINY, "context_dim": sdxl_tc.context_dim}))
    path = str(tmp_path / "xl.safetensors")
    save_jedi(path, unet, sdxl_tc, None, resolution=64, diffusion={})
    m = load_jedi(path)
    assert m.meta["format"] == JEDI_FORMAT == 2 and m.text.config.to_dict() == sdxl_tc.config.to_dict()
    loaded, saved = m.text.state_dict(), sdxl_tc.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    with torch.no_grad():
        a, b = m.encode(["a dog"]), sdxl_tc.encode(["a dog"])
    assert torch.equal(a.context, b.context) and torch.equal(a.y, b.y)
    with pytest.raises(ValueError, match="use JeDi.encode"):
        m.encode_text(["a dog"])

    toy = load_jedi(os.path.join(os.path.dirname(__file__), "..", "assets", "jedi_toy.safetensors"))
    assert toy.meta["format"] == 1 and toy.text.y_dim is None and len(toy.text.encoders) == 1
    save_jedi(str(tmp_path / "toy2.safetensors"), toy.unet, toy.text, toy.vae, resolution=toy.resolution,
              diffusion=toy.meta["diffusion"])
    again = load_jedi(str(tmp_path / "toy2.safetensors"))
    with torch.no_grad():
        assert torch.equal(again.encode_text(["a red cube", ""]), toy.encode_text(["a red cube", ""]))
        assert torch.equal(toy.null().context, toy.encode_text([""]))
