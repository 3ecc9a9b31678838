"""SDXL's UNet against diffusers (the oracle): the published sizes, micro-conditioning, tiny parity (label_emb
included), the diffusers name map, and one forward of the full-size 2.57B UNet (slow)."""
import gc
import zlib

import pytest
import torch

from model.conditioning import Cond, micro_conditioning
from model.flavours import FLAVOURS
from model.unet import UNet, UNetConfig
from tests.test_unet import randomize, rel_err

POOLED = 16  # tiny pooled-text width (SDXL: 1280)
TINY_XL = dict(in_channels=4, model_channels=32, channel_mult=(1, 2, 4), attention_resolutions=(2, 4), num_res_blocks=2,
               num_head_channels=8, transformer_depth=(0, 2, 3), context_dim=24, use_linear_proj=True,
               adm_in_channels=POOLED + 6 * 256)


def diffusers_kwargs(cfg: UNetConfig, sample_size: int = 16) -> dict:
    from model.layout_diffusers import diffusers_unet_kwargs

    return diffusers_unet_kwargs(cfg, sample_size)


def xl_inputs(cfg, B=2, hw=8, L=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, hw, hw, generator=g)
    t = torch.tensor([3, 871][:B])
    ctx = torch.randn(B, L, cfg.context_dim, generator=g)
    pooled = torch.randn(B, cfg.adm_in_channels - 6 * 256, generator=g)
    time_ids = torch.tensor([[1024., 768., 0., 64., 1024., 1024.], [512., 512., 32., 0., 768., 640.]][:B])
    return x, t, ctx, pooled, time_ids


def ours_y(pooled, time_ids):
    """SDXL's y: pooled text, then the six size numbers' features (sgm's embedder order)."""
    return torch.cat([pooled, micro_conditioning(time_ids[:, 0:2], time_ids[:, 2:4], time_ids[:, 4:6])], dim=1)


# ----------------------------------------------------------------------------- the published sizes

def test_sdxl_flavour_is_the_published_unet():
    """Issue 27's SDXL facts, on a meta-device build (no memory): three levels 320/640/1280, attention only at
    factors 2 and 4 with depths 2 and 10 and a middle of 10, heads 10 and 20 of dim 64, linear proj, context 2048,
    label_emb 2816 -> 1280 (1280 pooled + 6·256), 2,567,463,684 parameters as diffusers' SDXL UNet."""
    fl = FLAVOURS["sdxl"]
    assert (fl.vae_scale, fl.context_dim, fl.resolution) == (0.13025, 2048, 1024)
    with torch.device("meta"):
        net = UNet(fl.unet)
    assert [b[0].out_layers[3].out_channels for b in net.input_blocks[1:] if hasattr(b[0], "out_layers")] == \
        [320, 320, 640, 640, 1280, 1280]
    st = {name: m for name, m in net.named_modules() if type(m).__name__ == "SpatialTransformer"}
    assert sorted(st) == sorted(["input_blocks.4.1", "input_blocks.5.1", "input_blocks.7.1", "input_blocks.8.1",
                                 "middle_block.1"] + [f"output_blocks.{i}.1" for i in range(6)])
    depth = {n: len(m.transformer_blocks) for n, m in st.items()}
    assert depth["input_blocks.4.1"] == depth["output_blocks.5.1"] == 2
    assert depth["input_blocks.7.1"] == depth["output_blocks.0.1"] == depth["middle_block.1"] == 10
    a = st["input_blocks.4.1"].transformer_blocks[0].attn1
    b = st["middle_block.1"].transformer_blocks[0].attn2
    assert (a.heads, a.dim_head, b.heads, b.dim_head) == (10, 64, 20, 64)
    assert b.to_k.in_features == 2048 and isinstance(st["middle_block.1"].proj_in, torch.nn.Linear)
    assert [tuple(p.shape) for p in net.label_emb.parameters()] == [(1280, 2816), (1280,), (1280, 1280), (1280,)]
    assert 2816 == 1280 + micro_conditioning((1024, 1024), (0, 0), (1024, 1024)).shape[1]
    assert sum(p.numel() for p in net.parameters()) == 2_567_463_684


def test_sd1_flavour_is_the_default_config():
    fl = FLAVOURS["sd1"]
    assert fl.unet == UNetConfig(in_channels=4) and fl.heads == dict(num_heads=8)
    assert (fl.vae_scale, fl.context_dim, fl.resolution) == (0.18215, 768, 512)


def test_config_depth_int_means_every_level_and_old_metadata_loads():
    old = dict(UNetConfig(in_channels=4).to_dict(), transformer_depth=1)  # metadata written before per-level depth
    old.pop("transformer_depth_middle"), old.pop("adm_in_channels")
    cfg = UNetConfig(**old)
    assert cfg.transformer_depth == (1, 1, 1, 0) and cfg.transformer_depth_middle == 1  # level 3 has no attention
    assert UNetConfig(**{**cfg.to_dict(), "channel_mult": [1, 2, 4, 4]}) == cfg  # JSON round trip (lists)
    with pytest.raises(ValueError, match="transformer_depth"):
        UNetConfig(transformer_depth=(1, 1))
    with pytest.raises(ValueError, match="0 at a level with attention"):
        UNetConfig(transformer_depth=(0, 1, 1, 1))


# ----------------------------------------------------------------------------- micro-conditioning

def test_micro_conditioning_matches_diffusers_add_time_ids():
    """Our six Fourier features against the path diffusers' SDXL UNet takes: time_ids (B, 6) -> add_time_proj
    (Timesteps(256, flip_sin_to_cos=True, shift 0)) -> (B, 6·256)."""
    import diffusers

    net = diffusers.UNet2DConditionModel(**diffusers_kwargs(UNetConfig(**TINY_XL)))
    time_ids = xl_inputs(UNetConfig(**TINY_XL))[-1]
    ref = net.add_time_proj(time_ids.flatten()).reshape(len(time_ids), -1)
    ours = micro_conditioning(time_ids[:, 0:2], time_ids[:, 2:4], time_ids[:, 4:6])
    assert ours.shape == (2, 1536)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    one = micro_conditioning((1024, 768), (0, 64), (1024, 1024))  # pairs: one image, broadcast to a batch
    torch.testing.assert_close(one, ours[:1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="micro_conditioning"):
        micro_conditioning((1, 2, 3), (0, 0), (1, 1))


# ----------------------------------------------------------------------------- tiny parity

@torch.no_grad()
def test_parity_tiny_sdxl_with_diffusers():
    """A tiny SDXL-shaped UNet (three levels, per-level depth 0/2/3, head dim 8, linear proj, label_emb) against
    diffusers' UNet2DConditionModel with text_time added embedding, the same weights through diffusers' converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    import diffusers

    cfg = UNetConfig(**TINY_XL)
    ours = randomize(UNet(cfg)).eval()
    ref = diffusers.UNet2DConditionModel(**diffusers_kwargs(cfg)).eval()
    ldm = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    ref.load_state_dict(convert_ldm_unet_checkpoint(ldm, dict(ref.config)), strict=True)
    x, t, ctx, pooled, time_ids = xl_inputs(cfg)
    want = ref(x, t, ctx, added_cond_kwargs=dict(text_embeds=pooled, time_ids=time_ids)).sample
    got = ours(x, t, Cond(ctx, ours_y(pooled, time_ids)))
    err = rel_err(got, want)
    print(f"tiny SDXL UNet parity vs diffusers: rel err {err:.2e}")
    assert err <= 1e-6
    torch.testing.assert_close(ours(x, t, ctx, y=ours_y(pooled, time_ids)), got, rtol=0, atol=0)  # y as an argument
    # label_emb is really used: other sizes give another output
    other = time_ids.clone()
    other[:, 0] = 256
    assert rel_err(ours(x, t, Cond(ctx, ours_y(pooled, other))), got) > 1e-3


def test_y_is_required_exactly_when_the_unet_has_label_emb():
    xl, sd = UNet(UNetConfig(**TINY_XL)), UNet(UNetConfig(**{**TINY_XL, "adm_in_channels": None}))
    x, t, ctx, pooled, time_ids = xl_inputs(xl.config)
    y = ours_y(pooled, time_ids)
    with pytest.raises(ValueError, match="y is missing"):
        xl(x, t, ctx)
    with pytest.raises(ValueError, match="y is given"):
        sd(x, t, Cond(ctx, y))
    with pytest.raises(ValueError, match="y given twice"):
        xl(x, t, Cond(ctx, y), y=y)
    assert not hasattr(sd, "label_emb")


# ----------------------------------------------------------------------------- the conditioning value threaded through

class CondSpy(torch.nn.Module):
    """Stands in for an SDXL UNet: records the Cond of every call, predicts a fixed function of x and of y."""

    def __init__(self):
        super().__init__()
        self.conds = []

    def forward(self, x, t, cond, set_size=1):
        assert isinstance(cond, Cond) and cond.y is not None
        self.conds.append(cond)
        return 0.1 * x[:, :4] + cond.y.mean(1).reshape(-1, 1, 1, 1)  # (B·N,) -> (B·N, 1, 1, 1)


def xl_cond(rows, L=5, D=6, Y=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Cond(torch.randn(rows, L, D, generator=g), torch.randn(rows, Y, generator=g))


def test_jedi_loss_drops_context_and_y_together():
    from model.diffusion import Diffusion, jedi_loss

    B, N = 6, 2
    cond, null = xl_cond(B * N), xl_cond(1, seed=1)
    x0 = torch.randn(B * N, 4, 8, 8)
    for p_drop, p_drop_text in ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (0.5, 0.0)):
        spy = CondSpy()
        jedi_loss(spy, Diffusion(), x0, cond, null, N, p_drop=p_drop, p_drop_text=p_drop_text,
                  generator=torch.Generator().manual_seed(3))
        got = spy.conds[0]
        ctx_null = (got.context == null.context).flatten(1).all(1)  # (B·N,): this row's context is the null's
        y_null = (got.y == null.y).all(1)
        assert torch.equal(ctx_null, y_null)  # never one without the other
        assert torch.equal(got.context[~ctx_null], cond.context[~ctx_null])
        assert torch.equal(got.y[~y_null], cond.y[~y_null])
        assert ctx_null.reshape(B, N).all(1).equal(ctx_null.reshape(B, N).any(1))  # whole sets
        expect = {0.0: 0, 1.0: B * N}.get(p_drop + p_drop_text)
        if expect is not None:
            assert int(ctx_null.sum()) == expect
        else:
            assert 0 < int(ctx_null.sum()) < B * N  # 0.5: some sets dropped, some not (seeded)


def test_text_guidance_passes_carry_y():
    from model.diffusion import Diffusion, text_guided

    B = 3
    cond, null = xl_cond(B), xl_cond(1, seed=1)
    spy = CondSpy()
    eps, x0 = text_guided(spy, Diffusion(), cond, null, 5.0)(torch.randn(B, 4, 8, 8), 500)
    got = spy.conds[0]
    assert torch.equal(got.y, torch.cat([cond.y, null.y.expand(B, -1)]))  # conditional rows, then the null's
    assert torch.equal(got.context, torch.cat([cond.context, null.context.expand(B, -1, -1)]))
    per_row_null = xl_cond(B, seed=2)  # an SDXL null may keep each image's size features: B rows
    spy = CondSpy()
    text_guided(spy, Diffusion(), cond, per_row_null, 5.0)(torch.randn(B, 4, 8, 8), 500)
    assert torch.equal(spy.conds[0].y[B:], per_row_null.y)


def test_reference_gain_sums_with_a_real_tiny_sdxl_unet():
    from model.diffusion import Diffusion, reference_gain_sums

    cfg = UNetConfig(**{**TINY_XL, "in_channels": 9})
    unet = randomize(UNet(cfg)).eval()
    x, t, ctx, pooled, time_ids = xl_inputs(cfg, B=2)
    cond = Cond(ctx, ours_y(pooled, time_ids))  # two rows: one set of 2
    sums = reference_gain_sums(unet, Diffusion(), torch.randn(2, 4, 8, 8), cond, torch.Generator().manual_seed(0),
                               timesteps=(500,))
    assert sums.shape == (2,) and bool(torch.isfinite(sums).all()) and bool((sums > 0).all())


def test_cond_is_a_pytree_node():
    """FSDP2 casts forward inputs with a pytree map: a registered Cond has its tensors cast, None kept."""
    import torch.utils._pytree as pytree

    c = xl_cond(2)
    half = pytree.tree_map(lambda v: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) else v, c)
    assert isinstance(half, Cond) and half.context.dtype == half.y.dtype == torch.bfloat16
    plain = pytree.tree_map(lambda v: v * 2 if isinstance(v, torch.Tensor) else v, Cond(c.context))
    assert plain.y is None and torch.equal(plain.context, 2 * c.context)


# ----------------------------------------------------------------------------- FLOPs

def test_flops_count_sdxl_label_emb_and_depth():
    from flops import counted_sdpa_flops, parameter_count, unet_flops

    xl = UNetConfig(**TINY_XL)
    f = unet_flops(xl, 8, set_size=2, num_sets=2)
    assert f.forward == counted_sdpa_flops(xl, 8, set_size=2, num_sets=2)  # analytic attention = the counter's
    no_y = unet_flops(UNetConfig(**{**TINY_XL, "adm_in_channels": None}), 8, set_size=2, num_sets=2)
    emb = 4 * xl.model_channels
    assert f.other - no_y.other == 2 * 4 * (xl.adm_in_channels * emb + emb * emb)  # label_emb's two Linears, 4 rows
    deeper = unet_flops(UNetConfig(**{**TINY_XL, "transformer_depth": (0, 2, 4)}), 8, set_size=2, num_sets=2)
    assert deeper.attention > f.attention  # per-level depth is counted (level 2 and, via its default, the middle)
    assert parameter_count(FLAVOURS["sdxl"].unet) == 2_567_463_684


# ----------------------------------------------------------------------------- full size (slow)

def keyed_value(name: str, shape) -> torch.Tensor:
    """The value of parameter `name` (diffusers' name), the same in whichever model it is built: a generator seeded
    by the name. Norm scales around 1, biases small, weights ~ 1/sqrt(fan-in) so 70 blocks stay finite."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    v = torch.randn(shape, generator=g)
    if len(shape) >= 2:
        return v / (torch.tensor(shape[1:]).prod().float().sqrt())
    return 1.0 + 0.1 * v if name.endswith("weight") else 0.02 * v


def fill(module, name_of=lambda n: n):
    with torch.no_grad():
        for n, p in module.named_parameters():
            p.copy_(keyed_value(name_of(n), tuple(p.shape)))


@pytest.mark.slow
@torch.no_grad()
def test_parity_sdxl_full_size_with_diffusers():
    """The full 2.57B SDXL UNet against diffusers' at 32x32 latents, one model in memory at a time (~10 GB each in
    fp32): every parameter gets a value keyed by its diffusers name; diffusers' model is built, filled, run and
    freed; then ours is built and filled through our diffusers name map, and run."""
    import diffusers

    from model.layout_diffusers import diffusers_unet_names

    cfg = FLAVOURS["sdxl"].unet
    x, t, ctx, _, time_ids = xl_inputs(cfg, B=2, hw=32, L=77)
    pooled = torch.randn(2, 1280, generator=torch.Generator().manual_seed(1))
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**diffusers_kwargs(cfg, sample_size=128))
    names = diffusers_unet_names(list(ref.state_dict()))  # diffusers name -> ours
    ref = ref.to_empty(device="cpu").eval()
    fill(ref)
    want = ref(x, t, ctx, added_cond_kwargs=dict(text_embeds=pooled, time_ids=time_ids)).sample
    del ref
    gc.collect()
    with torch.device("meta"):
        ours = UNet(cfg)
    ours = ours.to_empty(device="cpu").eval()
    assert set(names.values()) == set(ours.state_dict())
    diffusers_name = {v: k for k, v in names.items()}
    fill(ours, lambda n: diffusers_name[n])
    got = ours(x, t, Cond(ctx, ours_y(pooled, time_ids)))
    err = rel_err(got, want)
    print(f"full-size SDXL UNet parity vs diffusers: rel err {err:.2e}, output std {want.std():.3f}")
    assert bool(torch.isfinite(want).all()) and want.std() > 1e-2
    assert err <= 1e-5


# ----------------------------------------------------------------------------- loading: names, files, folders

LOAD_XL = {**TINY_XL, "num_head_channels": 64}  # SDXL's own head dim (channels 64 and 128: 1 and 2 heads), so the
#                                                 flavour's default head layout is the right one


def test_diffusers_names_and_config_inference_round_trip():
    """diffusers' converter (ours -> diffusers) and ours (diffusers -> ours) are inverse, label_emb included, and
    the config inferred from the tensors is the config built: per-level depth, middle depth, adm width, head dim."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    import diffusers

    from model.loading import convert_diffusers_unet, unet_config_from_state_dict

    for cfg in (UNetConfig(**TINY_XL), UNetConfig(**{**TINY_XL, "transformer_depth": (0, 1, 3), "num_res_blocks": 1})):
        ours = randomize(UNet(cfg)).state_dict()
        d = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in ours.items()},
                                        dict(diffusers.UNet2DConditionModel(**diffusers_kwargs(cfg)).config))
        assert {"add_embedding.linear_1.weight", "add_embedding.linear_2.bias"} <= set(d)
        back, inferred = convert_diffusers_unet(d, num_head_channels=cfg.num_head_channels)
        assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)
        assert inferred == cfg
        assert unet_config_from_state_dict(ours, num_head_channels=cfg.num_head_channels) == cfg
    # no head layout given: the flavour's (SDXL: head dim 64, from label_emb's presence)
    xl = UNet(UNetConfig(**LOAD_XL)).state_dict()
    assert unet_config_from_state_dict(xl) == UNetConfig(**LOAD_XL)


@pytest.fixture(scope="module")
def tiny_sdxl_file(tmp_path_factory):
    """A tiny SDXL single file in Stability's layout: UNet, VAE and (stand-in) tensors under both text prefixes."""
    from safetensors.torch import save_file

    from model.vae import AutoencoderKL, VAEConfig

    torch.manual_seed(0)
    unet = randomize(UNet(UNetConfig(**LOAD_XL)))
    vae = randomize(AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)))
    sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    sd.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
    sd.update(tiny_sdxl_text())  # CLIP-L 8 wide + bigG 16 wide = the UNet's context 24; bigG's pooled 16 = POOLED
    path = tmp_path_factory.mktemp("xl") / "sd_xl_tiny.safetensors"
    save_file(sd, str(path))
    return unet, vae, sd, str(path)


def tiny_sdxl_text() -> dict:
    """SDXL's two text encoders, tiny, as the original file stores them: CLIP ViT-L/14's shape in transformers 4
    names (conditioner.embedders.0.transformer.text_model.*), bigG's in open_clip's (conditioner.embedders.1.model.*,
    fused in_proj, text_projection, logit_scale)."""
    from open_clip.model import CLIP

    from model.text import build_text_encoder, sd14_text_config

    clip_l = randomize(build_text_encoder(sd14_text_config(hidden_size=8, num_hidden_layers=2, num_attention_heads=1,
                                                           intermediate_size=16)))
    bigg = randomize(CLIP(embed_dim=POOLED, vision_cfg=dict(image_size=16, patch_size=8, width=64, layers=1,
                                                            head_width=64),
                          text_cfg=dict(context_length=77, vocab_size=49408, width=16, heads=1, layers=2)))
    out = {"conditioner.embedders.0.transformer.text_model." + k: v for k, v in clip_l.state_dict().items()}
    out.update({"conditioner.embedders.1.model." + k: v for k, v in bigg.state_dict().items()
                if not k.startswith("visual.")})
    return out


def test_sdxl_single_file_reads_by_prefix_strip(tiny_sdxl_file):
    from model.loading import check_sd, load_unet_vae, read_parts

    unet, vae, sd, path = tiny_sdxl_file
    parts = read_parts(path)
    assert parts.flavour.name == "sdxl" and parts.text_layout == "original"
    assert set(parts.text) == {"0", "1"} and "text_projection" in parts.text["1"]
    loaded, v, flavour = load_unet_vae(path, in_channels=None)  # head dim 64 from the flavour
    assert flavour.name == "sdxl" and loaded.config == unet.config
    assert all(torch.equal(t, loaded.state_dict()[k]) for k, t in unet.state_dict().items())
    assert v.scale_factor == 0.13025 and all(torch.equal(t, v.state_dict()[k]) for k, t in vae.state_dict().items())
    jedi = load_unet_vae(path)[0]  # JeDi-XL: 9 input channels, inflated
    assert jedi.config.in_channels == 9 and jedi.config.adm_in_channels == unet.config.adm_in_channels
    assert check_sd(path) == jedi.config  # the names-and-shapes check, text encoders included


def test_sdxl_load_sd_loads_the_text_conditioner(tiny_sdxl_file):
    """load_sd of an SDXL file: UNet, VAE and the SDXL text conditioner (model/conditioner.py), whose Cond the UNet
    takes (context 24 = 8 + 16, y = pooled 16 + 6·256)."""
    from model.conditioner import load_text_conditioner, sdxl_text_config
    from model.loading import CheckpointError, load_sd, strip_prefix

    unet, _, sd, path = tiny_sdxl_file
    m = load_sd(path, in_channels=None)
    assert m.resolution == 1024 and m.text.config.resolution == 1024 and len(m.text.encoders) == 2
    assert (m.text.context_dim, m.text.y_dim) == (unet.config.context_dim, unet.config.adm_in_channels)
    ref = load_text_conditioner(sdxl_text_config(), [strip_prefix(sd, "conditioner.embedders.0.transformer."),
                                                     strip_prefix(sd, "conditioner.embedders.1.model.")])
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in m.text.state_dict().items())
    with torch.no_grad():
        cond, null = m.encode(["a photo of a dog", ""]), m.null()
        assert cond.y.shape == (2, unet.config.adm_in_channels) and not null.context.any()
        out = m.unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), cond)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="use JeDi.encode"):
        m.encode_text(["a dog"])
    from safetensors.torch import save_file

    wide = randomize(UNet(UNetConfig(**{**LOAD_XL, "context_dim": 32})))  # a UNet the text side does not fit
    bad = path.replace(".safetensors", "_wide.safetensors")
    save_file({k: v for k, v in sd.items() if not k.startswith("model.diffusion_model.")}
              | {"model.diffusion_model." + k: v for k, v in wide.state_dict().items()}, bad)
    with pytest.raises(CheckpointError, match=r"text encoders give context 24 and vector 1552, the UNet takes 32 "
                                              r"and 1552") as e:
        load_sd(bad)
    assert str(e.value).startswith(bad) and "\n" not in str(e.value)


def test_sdxl_diffusers_folder_reads_the_same(tiny_sdxl_file, tmp_path):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from safetensors.torch import save_file
    import diffusers

    from model.loading import read_parts

    unet, vae, sd, _ = tiny_sdxl_file
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        (tmp_path / sub).mkdir()
    d_unet = diffusers.UNet2DConditionModel(**diffusers_kwargs(unet.config))
    save_file(convert_ldm_unet_checkpoint(sd, dict(d_unet.config)),
              tmp_path / "unet/diffusion_pytorch_model.safetensors")
    d_vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                    up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4)
    save_file(convert_ldm_vae_checkpoint(sd, dict(d_vae.config)), tmp_path / "vae/diffusion_pytorch_model.safetensors")
    from model.loading import load_sd

    text = load_sd(tiny_sdxl_file[-1], in_channels=None).text  # diffusers stores transformers' own state dicts
    for i, sub in enumerate(("text_encoder", "text_encoder_2")):
        save_file({k: v.contiguous() for k, v in text.encoders[i].state_dict().items()},
                  tmp_path / sub / "model.safetensors")
    parts = read_parts(str(tmp_path))
    assert parts.flavour.name == "sdxl" and parts.text_layout == "diffusers" and set(parts.text) == {"0", "1"}
    assert set(parts.unet) == set(unet.state_dict())
    assert all(torch.equal(parts.unet[k], v) for k, v in unet.state_dict().items())
    assert all(torch.equal(parts.vae[k], v) for k, v in vae.state_dict().items())
    folder = load_sd(str(tmp_path), in_channels=None).text
    assert folder.config.to_dict() == text.config.to_dict()
    assert all(torch.equal(v, text.state_dict()[k]) for k, v in folder.state_dict().items())


@pytest.mark.parametrize("damage", ["truncated", "no label_emb", "no VAE"])
def test_wrong_or_truncated_sdxl_file_is_a_one_line_error(tiny_sdxl_file, tmp_path, damage):
    from safetensors.torch import save_file

    from model.loading import CheckpointError, load_sd

    _, _, sd, path = tiny_sdxl_file
    bad = str(tmp_path / "bad.safetensors")
    if damage == "truncated":
        data = open(path, "rb").read()
        open(bad, "wb").write(data[: len(data) // 2])
    else:
        drop = "model.diffusion_model.label_emb." if damage == "no label_emb" else "first_stage_model."
        save_file({k: v for k, v in sd.items() if not k.startswith(drop)}, bad)
    with pytest.raises(CheckpointError) as e:
        load_sd(bad)
    msg = str(e.value)
    assert msg.startswith(bad) and "\n" not in msg, msg
    assert {"truncated": "not a readable", "no label_emb": "label_emb", "no VAE": "no VAE weights"}[damage] in msg


def test_personalize_passes_carry_y():
    """personalize's guidance passes (conditional, ε⁰, and the 3-pass text variant) carry y with the context: the
    conditional rows are the images' own, the null rows the null's (one row, or one per image of a set)."""
    from model.diffusion import Diffusion, personalize

    n, new, S = 1, 2, 2
    N = n + new
    cond = xl_cond(N)
    for null in (xl_cond(1, seed=1), xl_cond(N, seed=1)):
        spy = CondSpy()
        out = personalize(spy, Diffusion(), refs=torch.randn(n, 4, 8, 8), context=cond, null_context=null,
                          num_new=new, num_sets=S, steps=2, text_guidance=2.0,
                          generator=torch.Generator().manual_seed(0))
        assert out.shape == (S * N, 4, 8, 8) and len(spy.conds) == 2
        got = spy.conds[0]
        null_rows = null.expand(N).repeat(S)
        assert torch.equal(got.y, torch.cat([cond.repeat(S).y, null_rows.y, null_rows.y]))
        assert torch.equal(got.context, torch.cat([cond.repeat(S).context, null_rows.context, null_rows.context]))


@torch.no_grad()
def test_sdxl_vae_parity_with_diffusers_at_its_scale(tiny_sdxl_file):
    """Issue 27's VAE parity at a tiny SDXL-shaped size: the SDXL VAE as our loader reads it from the original file
    (scale 0.13025 from the flavour) against diffusers' AutoencoderKL configured as SDXL's (scaling_factor 0.13025,
    force_upcast), loaded by diffusers' own converter: scaled latents in, scaled latents out."""
    import diffusers
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from model.loading import load_unet_vae

    _, _, sd, path = tiny_sdxl_file
    _, ours, flavour = load_unet_vae(path, in_channels=None)
    theirs = diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                     up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                                     scaling_factor=0.13025, force_upcast=True).eval()
    theirs.load_state_dict(convert_ldm_vae_checkpoint(sd, dict(theirs.config)), strict=True)
    assert ours.scale_factor == theirs.config.scaling_factor == flavour.vae_scale
    assert ours.config.force_upcast == theirs.config.force_upcast
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    z = torch.randn(2, 4, 16, 16, generator=g)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    e_enc = rel(ours.encode_latents(x), theirs.encode(x).latent_dist.mode() * 0.13025)
    e_dec = rel(ours.decode_latents(z), theirs.decode(z / 0.13025).sample)
    print(f"SDXL VAE parity rel. errors: encode {e_enc:.2e}, decode {e_dec:.2e}")
    assert e_enc <= 1e-6 and e_dec <= 4e-6, (e_enc, e_dec)
