"""Tiny random-weight models written to disk the way the real ones are distributed, for the S³ engine's tests and
`bench/bench_s3.py --tiny`: SD-1.x checkpoints in the original layout (4, 9 or 8 UNet input channels), an SDXL
single file in Stability's layout, a transformers Grounding-DINO and SAM folder, and an open_clip architecture
.json + state dict."""
import json
import os

import torch
from safetensors.torch import save_file

from model.text import build_text_encoder, sd14_text_config
from model.unet import UNet, UNetConfig
from model.vae import AutoencoderKL, VAEConfig

TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
# load_sd infers sizes from shapes but not the GroupNorm count (32, as SD): widths stay multiples of 32
UNET = dict(model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,), num_res_blocks=1, num_heads=2,
            context_dim=32)
VAE = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1)  # downsampling factor 2
CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def sd_checkpoint(path, in_channels=4, seed=0):
    """An SD-1.x-topology checkpoint (.safetensors, original key prefixes) with random weights."""
    torch.manual_seed(seed)
    unet = UNet(UNetConfig(in_channels=in_channels, **UNET))
    with torch.no_grad():  # zero-initialised output layers would make every prediction 0: randomise them
        for p in unet.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    vae, text = AutoencoderKL(VAEConfig(**VAE)), build_text_encoder(sd14_text_config(**TEXT))
    sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    sd.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
    sd.update({"cond_stage_model.transformer.text_model." + k: v for k, v in text.state_dict().items()})
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


# SDXL's topology at a tiny size: three levels, attention at factors 2 and 4 with per-level depth, linear proj, head
# dim 64 (the flavour's, so load_sd needs no head count: 1 and 2 heads), label_emb on pooled text + 6·256 size
# features; CLIP-L 8 wide + bigG 16 wide = context 24, bigG's pooled projection 16.
SDXL_POOLED = 16
SDXL_UNET = dict(model_channels=32, channel_mult=(1, 2, 4), attention_resolutions=(2, 4), num_res_blocks=1,
                 num_head_channels=64, transformer_depth=(0, 1, 2), context_dim=24, use_linear_proj=True,
                 adm_in_channels=SDXL_POOLED + 6 * 256)
SDXL_CLIP_L = dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=1, intermediate_size=16)
SDXL_BIGG = dict(context_length=77, vocab_size=49408, width=16, heads=1, layers=2)


def _randomize(module, generator, std=0.05):
    """Every parameter random (zero-initialised output layers and norms too), so a mix-up cannot hide."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if name.endswith("weight") and p.ndim == 1 else 0.0  # norm scales around 1
            p.copy_(base + std * torch.randn(p.shape, generator=generator))
    return module


def sdxl_checkpoint(path, seed=0, in_channels=4):
    """A tiny SDXL single file (.safetensors) as Stability ships sd_xl_base_1.0: `model.diffusion_model.*`,
    `first_stage_model.*` (VAE, downsampling 2), `conditioner.embedders.0.transformer.text_model.*` (CLIP ViT-L/14's
    shape, transformers 4 names with position_ids), `conditioner.embedders.1.model.*` (OpenCLIP bigG's text tower
    in open_clip names: fused in_proj, text_projection, logit_scale; no visual.*). Random weights."""
    from open_clip.model import CLIP

    g = torch.Generator().manual_seed(seed)
    unet = _randomize(UNet(UNetConfig(in_channels=in_channels, **SDXL_UNET)), g)
    vae = _randomize(AutoencoderKL(VAEConfig(**VAE)), g)
    clip_l = _randomize(build_text_encoder(sd14_text_config(**SDXL_CLIP_L)), g)
    bigg = _randomize(CLIP(embed_dim=SDXL_POOLED, vision_cfg=dict(image_size=16, patch_size=8, width=64, layers=1,
                                                                  head_width=64), text_cfg=SDXL_BIGG), g)
    sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    sd.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
    sd.update({"conditioner.embedders.0.transformer.text_model." + k: v for k, v in clip_l.state_dict().items()})
    sd["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd.update({"conditioner.embedders.1.model." + k: v for k, v in bigg.state_dict().items()
               if not k.startswith("visual.")})
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


def grounded_sam(folder, size=64):
    """Tiny Grounding-DINO and SAM folders (save_pretrained, as on the hub). -> (grounding_dino, sam) paths."""
    from transformers import (BertConfig, BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SamConfig, SamImageProcessor,
                              SamMaskDecoderConfig, SamModel, SamProcessor, SamPromptEncoderConfig, SamVisionConfig,
                              SwinConfig)

    torch.manual_seed(0)
    gd, sam = os.path.join(folder, "grounding-dino"), os.path.join(folder, "sam")
    os.makedirs(gd, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "toy", "mug", "."]
    with open(os.path.join(gd, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(size={"shortest_edge": size,
                                                                             "longest_edge": size}),
                           tokenizer=BertTokenizer(os.path.join(gd, "vocab.txt"))).save_pretrained(gd)
    GroundingDinoForObjectDetection(GroundingDinoConfig(
        backbone_config=SwinConfig(image_size=size, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 1],
                                   window_size=4, out_features=["stage1", "stage2"]),
        text_config=BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=10, num_feature_levels=2, max_text_len=32,
        encoder_n_points=1, decoder_n_points=1)).save_pretrained(gd)
    SamModel(SamConfig(
        vision_config=SamVisionConfig(image_size=size, patch_size=16, hidden_size=16, output_channels=16,
                                      num_hidden_layers=1, num_attention_heads=2, mlp_dim=32, global_attn_indexes=[0],
                                      window_size=2, num_pos_feats=8),
        prompt_encoder_config=SamPromptEncoderConfig(image_size=size, patch_size=16, hidden_size=16,
                                                     mask_input_channels=4),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                 mlp_dim=32, iou_head_hidden_dim=16))).save_pretrained(sam)
    SamProcessor(image_processor=SamImageProcessor(size={"longest_edge": size},
                                                   pad_size={"height": size, "width": size})).save_pretrained(sam)
    return gd, sam


def clip(folder, name="tiny-clip-s3"):
    """An open_clip architecture .json and a random state dict. -> (architecture json, weights file)."""
    import open_clip

    cfg = os.path.join(folder, name + ".json")
    with open(cfg, "w") as f:
        json.dump(CLIP, f)
    open_clip.add_model_config(cfg)
    torch.manual_seed(0)
    weights = os.path.join(folder, "open_clip_pytorch_model.bin")
    torch.save(open_clip.create_model(name, pretrained=None).state_dict(), weights)
    return cfg, weights


def all_weights(folder) -> dict:
    """Every model the engine reads, tiny and random, as s3.py config keys."""
    os.makedirs(folder, exist_ok=True)
    gd, sam = grounded_sam(folder)
    clip_cfg, clip_w = clip(folder)
    return {"sd": sd_checkpoint(os.path.join(folder, "sd.safetensors"), 4, seed=1),
            "inpaint": sd_checkpoint(os.path.join(folder, "inpaint.safetensors"), 9, seed=2),
            "ip2p": sd_checkpoint(os.path.join(folder, "ip2p.safetensors"), 8, seed=3),
            "grounding_dino": gd, "sam": sam, "clip_model": clip_cfg, "clip_weights": clip_w}


def causal_lm(folder):
    """A tiny random GPT-2 with a byte-level BPE tokenizer trained on one sentence (transformers folder)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(["Write a short description of a photo of a mug. Description: a red mug on a table"],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(fast), n_positions=128, n_embd=32, n_layer=1, n_head=2,
                               bos_token_id=1, eos_token_id=1)).save_pretrained(folder)
    return str(folder)
