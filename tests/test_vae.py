"""VAE: parity with diffusers at the full SD-1.4 size, config inference, strict loading."""
import pytest
import torch

from model.vae import AutoencoderKL, VAEConfig, vae_config_from_state_dict, vae_from_state_dict

# Measured against diffusers (SD-1.4 size, fp32 CPU, 1 and 2 threads): encoder 2.0e-7 to 2.6e-7, decoder 1.8e-6
# (its attention's softmax in another order). GroupNorm eps 1e-5 instead of 1e-6 gives 3.5e-5 / 7.4e-5.
ENCODE_TOL, DECODE_TOL = 1e-6, 4e-6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Every tensor gets its own random values, norms included (default init leaves all GroupNorms
    identical, so swapping two of them, or confusing weight and bias, would otherwise go unnoticed)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:  # conv weights: keep the default fan-in scale, perturb the values
                p.add_(0.2 * p.std() * noise)


@pytest.fixture(scope="module")
def sd14_pair():
    """Our SD-1.4 VAE with random weights, and diffusers' AutoencoderKL loaded from its original-layout
    state dict through diffusers' own LDM converter."""
    import diffusers  # the parity oracle: requirements-test.txt, never skipped
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    torch.manual_seed(0)
    ours = AutoencoderKL(VAEConfig()).eval()
    randomize_(ours)
    ckpt = {"first_stage_model." + k: v for k, v in ours.state_dict().items()}
    assert len(ckpt) == 248  # the original sd-v1-4.ckpt has 248 first_stage_model tensors

    theirs = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32, sample_size=64, scaling_factor=0.18215,
    ).eval()
    converted = convert_ldm_vae_checkpoint(ckpt, dict(theirs.config))
    theirs.load_state_dict(converted, strict=True)  # every diffusers tensor must come from one of ours
    return ours, theirs


@torch.no_grad()
def test_parity_with_diffusers_sd14(sd14_pair):
    ours, theirs = sd14_pair
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1

    post, ref = ours.encode(x), theirs.encode(x).latent_dist
    assert post.mean.shape == (1, 4, 8, 8)
    e_mean, e_std = rel_err(post.mean, ref.mean), rel_err(post.std, ref.std)
    # Scaled latents, and a seeded draw from the posterior: same noise as diffusers for the same seed.
    e_lat = rel_err(ours.encode_latents(x), ref.mode() * theirs.config.scaling_factor)
    e_smp = rel_err(ours.encode_latents(x, sample=True, generator=torch.Generator().manual_seed(7)),
                    ref.sample(generator=torch.Generator().manual_seed(7)) * theirs.config.scaling_factor)

    z = torch.randn(1, 4, 8, 8, generator=g)
    img = ours.decode(z)
    assert img.shape == (1, 3, 64, 64)
    e_dec = rel_err(img, theirs.decode(z).sample)
    e_dec_lat = rel_err(ours.decode_latents(z * 0.18215), theirs.decode(z).sample)

    errs = dict(mean=e_mean, std=e_std, latents=e_lat, sampled=e_smp, decode=e_dec, decode_latents=e_dec_lat)
    print("VAE parity rel. errors:", {k: f"{v:.2e}" for k, v in errs.items()})
    assert max(e_mean, e_std, e_lat, e_smp) <= ENCODE_TOL and max(e_dec, e_dec_lat) <= DECODE_TOL, errs


@torch.no_grad()
def test_parity_detects_layer_mixups(sd14_pair):
    """The parity check must be able to fail: swapping two same-shaped tensors (q/k of the encoder's
    mid attention, the two GroupNorms of a ResnetBlock) breaks agreement by orders of magnitude."""
    ours, theirs = sd14_pair
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    ref_enc, ref_dec = theirs.encode(x).latent_dist.mean, theirs.decode(z).sample

    def errors():  # each relative to its tolerance
        return rel_err(ours.encode(x).mean, ref_enc) / ENCODE_TOL, rel_err(ours.decode(z), ref_dec) / DECODE_TOL

    assert max(errors()) <= 1
    pairs = [("encoder.mid.attn_1.q.weight", "encoder.mid.attn_1.k.weight"),
             ("encoder.down.3.block.1.norm1.bias", "encoder.down.3.block.1.norm2.bias"),
             ("decoder.mid.attn_1.q.weight", "decoder.mid.attn_1.k.weight"),
             ("decoder.up.2.block.1.norm1.weight", "decoder.up.2.block.1.norm2.weight")]
    sd = ours.state_dict()  # shares storage with the parameters
    for a, b in pairs:
        ta, tb = sd[a].clone(), sd[b].clone()
        sd[a].copy_(tb), sd[b].copy_(ta)
        err = max(errors())
        sd[a].copy_(ta), sd[b].copy_(tb)
        print(f"swap {a} <-> {b}: {err:.2e} x the tolerance")
        assert err > 1e3, (a, b, err)
    assert max(errors()) <= 1  # restored


@torch.no_grad()
def test_config_inference_roundtrip_narrow():
    cfg = VAEConfig(ch=32, ch_mult=(1, 2, 3), num_res_blocks=1, z_channels=3, embed_dim=5, in_channels=4, out_ch=2)
    torch.manual_seed(0)
    src = AutoencoderKL(cfg).eval()
    randomize_(src, seed=3)
    ckpt = {"first_stage_model." + k: v for k, v in src.state_dict().items()}
    ckpt["model.diffusion_model.out.2.bias"] = torch.zeros(4)  # other submodels' keys are ignored

    assert vae_config_from_state_dict(ckpt) == cfg
    assert vae_config_from_state_dict(src.state_dict()) == cfg  # bare keys too
    dst = vae_from_state_dict(ckpt).eval()
    assert dst.config == cfg and dst.downsample_factor == 4

    x = torch.randn(2, 4, 16, 16)
    post = dst.encode(x)
    assert post.mean.shape == (2, 5, 4, 4)
    assert torch.equal(post.mean, src.encode(x).mean)
    z = torch.randn(2, 5, 4, 4)
    out = dst.decode_latents(z)
    assert out.shape == (2, 2, 16, 16)
    assert torch.equal(out, src.decode(z / cfg.scale_factor))


def test_strict_load_wrong_shape_names_key():
    cfg = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)
    sd = AutoencoderKL(cfg).state_dict()
    key = "decoder.up.1.block.0.conv1.weight"
    sd[key] = torch.zeros(sd[key].shape[0], sd[key].shape[1] + 1, 3, 3)
    with pytest.raises(RuntimeError, match=key.replace(".", r"\.")):
        AutoencoderKL(cfg).load_state_dict(sd, strict=True)
    # A missing tensor is named as well, never a silent partial load.
    sd = AutoencoderKL(cfg).state_dict()
    del sd["encoder.mid.attn_1.proj_out.bias"]
    with pytest.raises(RuntimeError, match=r"encoder\.mid\.attn_1\.proj_out\.bias"):
        AutoencoderKL(cfg).load_state_dict(sd, strict=True)


@torch.no_grad()
def test_fp16_decode_of_large_latents_stays_finite():
    """SD's VAE decoder overflows in fp16: its full-resolution activations pass fp16's 65504. Here the up path's
    residual branches are scaled up until they do (> 65504 in fp32, so a plain .half() decode is inf/NaN);
    AutoencoderKL.cast(fp16) keeps that path in fp32 and the decode of 64x64 latents (SD's 512 px) stays finite."""
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)).eval()
    for up in vae.decoder.up:
        for block in up.block:
            block.conv2.weight.mul_(3e4)
    z = torch.randn(1, 4, 64, 64)
    peak = []
    hook = vae.decoder.up[0].block[-1].register_forward_hook(lambda m, i, o: peak.append(o.abs().max().item()))
    want = vae.decode_latents(z)
    hook.remove()
    assert peak[0] > 65504 and torch.isfinite(want).all()  # fp16 activations there would be inf
    half = vae.cast(torch.float16)
    assert half.post_quant_conv.weight.dtype == half.decoder.mid.attn_1.q.weight.dtype == torch.float16
    assert half.decoder.up[0].block[0].conv1.weight.dtype == half.encoder.conv_in.weight.dtype == torch.float32
    got = half.decode_latents(z.half())
    assert got.shape == (1, 3, 128, 128) and torch.isfinite(got).all()
    assert (got.float() - want).abs().max() / want.abs().max() < 1e-2  # fp16 rounding in the low-resolution part
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.isfinite(half.encode_latents(x)).all()  # the encoder takes any input dtype


def _blow_up_mid(vae: AutoencoderKL) -> list:
    """Scale the decoder's mid-block residual branch until its activations pass fp16's 65504 (SDXL's VAE overflows
    there, before the up path SD-1.x's cast keeps in fp32). -> the list the mid block's peak |activation| goes to."""
    vae.decoder.mid.block_1.conv2.weight.mul_(1e5)
    peak = []
    vae.decoder.mid.block_2.register_forward_hook(lambda m, i, o: peak.append(o.abs().max().item()))
    return peak


@torch.no_grad()
def test_sdxl_vae_fp16_stays_fp32_and_decodes_as_fp32():
    """force_upcast (the SDXL flavour's): cast(fp16) keeps every weight fp32, so the decode of fp16 latents is the
    fp32 decode of the same latents, bit for bit (tolerance 0), where SD-1.x's split (mid block in fp16) gives
    inf/NaN. bf16 still casts everything (its range is fp32's)."""
    cfg = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, scale_factor=0.13025)
    torch.manual_seed(0)
    ref = AutoencoderKL(VAEConfig(**cfg, force_upcast=True)).eval()
    randomize_(ref, seed=4)
    peak = _blow_up_mid(ref)
    z = (torch.randn(2, 4, 16, 16) * 0.13025).half()  # UNet-space latents as an fp16 sampler hands them over
    want = ref.decode_latents(z.float())
    assert peak[-1] > 65504 and torch.isfinite(want).all()  # an fp16 mid block would hold inf
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    want_lat = ref.encode_latents(x)

    def copy(force_upcast):
        vae = AutoencoderKL(VAEConfig(**cfg, force_upcast=force_upcast)).eval()
        vae.load_state_dict(ref.state_dict())
        return vae

    half = copy(True).cast(torch.float16)
    assert {p.dtype for p in half.parameters()} == {torch.float32}
    got = half.decode_latents(z)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert torch.equal(half.encode_latents(x.half()), ref.encode_latents(x.half().float()))
    assert torch.equal(half.encode_latents(x), want_lat)

    sd1_split = copy(False).cast(torch.float16)  # what SD-1.x's cast would do to this VAE
    assert sd1_split.decoder.mid.block_1.conv2.weight.dtype == torch.float16
    assert not torch.isfinite(sd1_split.decode_latents(z)).all()

    assert {p.dtype for p in copy(True).cast(torch.bfloat16).parameters()} == {torch.bfloat16}
    assert {p.dtype for p in copy(True).cast(torch.float32).parameters()} == {torch.float32}


def test_force_upcast_config():
    assert VAEConfig().force_upcast is False  # SD-1.x: the split cast of test_fp16_decode_of_large_latents...
    sd1 = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)).cast(torch.float16)
    halves = {n.rsplit(".", 1)[0] for n, p in sd1.named_parameters() if p.dtype == torch.float16}
    assert halves and all(n.startswith(("post_quant_conv", "decoder.conv_in", "decoder.mid.")) for n in halves)
    with pytest.raises(ValueError, match="force_upcast must be true or false"):
        VAEConfig(force_upcast="yes")
    # inferred sizes never tell it: the caller (the flavour) does
    sd = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)).state_dict()
    assert vae_config_from_state_dict(sd).force_upcast is False
    assert vae_config_from_state_dict(sd, force_upcast=True).force_upcast is True


@torch.no_grad()
def test_flavours_and_checkpoints_carry_force_upcast(tmp_path):
    """An SDXL original file loads with force_upcast from its flavour, an SD-1.x file without; a JeDi checkpoint
    keeps it in its VAE metadata, so load_jedi(dtype=fp16) keeps that VAE in fp32 with the UNet in fp16; a bad
    value there is a one-line error naming the file."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from model.flavours import FLAVOURS
    from model.loading import CheckpointError, load_jedi, load_sd, load_unet_vae, save_jedi
    from model.unet import UNet, UNetConfig
    from tests import tiny_weights
    from tests.test_sdxl import LOAD_XL

    assert FLAVOURS["sdxl"].vae_force_upcast and not FLAVOURS["sd1"].vae_force_upcast
    torch.manual_seed(0)
    vae_sd = AutoencoderKL(VAEConfig(**tiny_weights.VAE)).state_dict()
    xl = {"model.diffusion_model." + k: v for k, v in UNet(UNetConfig(**LOAD_XL)).state_dict().items()}
    xl.update({"first_stage_model." + k: v for k, v in vae_sd.items()})
    xl["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = torch.ones(8)  # text stand-ins:
    xl["conditioner.embedders.1.model.text_projection"] = torch.randn(8, 8)  # load_unet_vae reads no text
    save_file(xl, str(tmp_path / "xl.safetensors"))
    _, xl_vae, flavour = load_unet_vae(str(tmp_path / "xl.safetensors"), in_channels=None)
    assert flavour.name == "sdxl" and xl_vae.config.force_upcast and xl_vae.scale_factor == 0.13025

    sd1 = load_sd(tiny_weights.sd_checkpoint(tmp_path / "sd1.safetensors"), dtype=torch.float16)
    assert not sd1.vae.config.force_upcast
    assert sd1.vae.decoder.mid.attn_1.q.weight.dtype == sd1.dtype == torch.float16  # the SD-1.x split, unchanged
    assert sd1.vae.decoder.up[0].block[0].conv1.weight.dtype == torch.float32

    path = str(tmp_path / "jedi.safetensors")
    save_jedi(path, sd1.unet.float(), sd1.text.float(), xl_vae, resolution=32, diffusion={})
    m = load_jedi(path, dtype=torch.float16)
    assert m.vae.config == xl_vae.config and m.dtype == torch.float16
    assert {p.dtype for p in m.vae.parameters()} == {torch.float32}

    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["jedi"])
    meta["vae"]["force_upcast"] = "yes"
    save_file(load_file(path), path, metadata={"jedi": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="force_upcast must be true or false") as e:
        load_jedi(path)
    assert str(e.value).startswith(path) and "\n" not in str(e.value)
