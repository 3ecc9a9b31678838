"""sample.py: image loading, the CLI end to end on tiny random checkpoints, determinism, clear errors."""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import data
import sample
from model.conditioning import as_cond
from model.loading import save_jedi
from model.text import Tokenizer, build_text_encoder, sd14_text_config
from model.unet import UNet, UNetConfig
from model.vae import AutoencoderKL, VAEConfig

TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=1, intermediate_size=64)


def tiny_ckpt(path, latent: bool):
    torch.manual_seed(0)
    c = 4 if latent else 3
    unet = UNet(UNetConfig(in_channels=2 * c + 1, out_channels=c, model_channels=32, channel_mult=(1, 2),
                           attention_resolutions=(1, 2), num_res_blocks=1, num_heads=2, context_dim=32))
    for p in unet.parameters():
        torch.nn.init.normal_(p, 0, 0.05)
    vae = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)) if latent else None
    save_jedi(str(path), unet, build_text_encoder(sd14_text_config(**TEXT)), vae, resolution=16,
              diffusion={"prediction": "eps"}, steps=3, guidance=2.0)
    return str(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    return {"latent": tiny_ckpt(d / "latent.safetensors", True), "pixel": tiny_ckpt(d / "pixel.safetensors", False)}


@pytest.fixture
def refs(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    rgba = rng.integers(0, 255, (30, 50, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")  # non-square, alpha
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8), "L").save(tmp_path / "gray.jpg")
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(tmp_path / "deep.png")  # 16-bit
    paths += [tmp_path / "rgba.png", tmp_path / "gray.jpg", tmp_path / "deep.png"]
    return [str(p) for p in paths]


def test_one_image_reader_handles_exif_alpha_depth_and_cmyk(tmp_path):
    """data.load_image is the project's one reader: sample.py and eval.py read through it."""
    import eval as jeval

    assert sample.data.load_image is data.load_image and jeval.load_image is data.load_image
    assert sample.data.IMAGE_EXTS is jeval.IMAGE_EXTS is data.IMAGE_EXTS
    img = np.zeros((40, 40, 3), np.uint8)
    img[:20] = (255, 0, 0)  # top red
    img[20:] = (0, 0, 255)  # bottom blue
    exif = Image.Exif()
    exif[0x0112] = 3  # orientation: rotated 180°
    Image.fromarray(img).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    up = np.asarray(data.load_image(str(tmp_path / "rot.jpg")), np.int16)
    assert up[5, 20, 2] > 200 and up[5, 20, 0] < 50  # upright: blue on top
    assert np.array_equal(np.asarray(data.load_image((tmp_path / "rot.jpg").read_bytes())), up)  # bytes too
    x = sample.load_image(str(tmp_path / "rot.jpg"), 16)
    assert x.shape == (3, 16, 16) and x[2, 2, 8] > 0.5 and x[0, 2, 8] < -0.5
    Image.fromarray(np.full((10, 10, 4), 0, np.uint8), "RGBA").save(tmp_path / "clear.png")
    assert sample.load_image(str(tmp_path / "clear.png"), 8).min() > 0.99  # transparent -> white
    half = np.zeros((10, 10, 2), np.uint8)
    half[..., 1] = 128  # gray+alpha, black at half opacity -> mid gray on white
    Image.fromarray(half, "LA").save(tmp_path / "la.png")
    assert np.abs(np.asarray(data.load_image(str(tmp_path / "la.png")), int) - 127).max() <= 1
    ramp = (np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    y = sample.load_image(str(tmp_path / "deep.png"), 32)
    assert y.min() < -0.95 and y.max() > 0.95 and len(torch.unique(y)) > 100  # rescaled, not clipped to white
    dark = np.full((8, 8), 257 * 40, np.uint16)  # a dark 16-bit image stays dark: scaled by bit depth, not range
    Image.fromarray(dark).save(tmp_path / "dark.png")
    assert np.array_equal(np.asarray(data.load_image(str(tmp_path / "dark.png"))), np.full((8, 8, 3), 40, np.uint8))
    cmyk = np.zeros((16, 16, 4), np.uint8)
    cmyk[..., 1:3] = 255  # C=0 M=Y=255 K=0: red
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    rgb = np.asarray(data.load_image(str(tmp_path / "cmyk.jpg")), int)  # Adobe-inverted CMYK JPEG
    assert rgb.shape == (16, 16, 3) and (rgb[..., 0] > 230).all() and (rgb[..., 1:] < 25).all()
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.tif")
    assert ".tif" in data.IMAGE_EXTS and np.array_equal(np.asarray(data.load_image(str(tmp_path / "cmyk.tif"))),
                                                        np.broadcast_to(np.uint8([255, 0, 0]), (16, 16, 3)))
    Image.fromarray(np.zeros((30, 90, 3), np.uint8)).save(tmp_path / "wide.png")
    assert sample.load_image(str(tmp_path / "wide.png"), 12).shape == (3, 12, 12)


def test_references_get_the_pixels_training_reads_from_the_same_file(tmp_path):
    """One preprocessing (data.fit after data.load_image): a reference through sample.py is the tensor the training
    loader makes of the same file, bit for bit (a wide JPEG decoded at reduced scale, a tall RGBA PNG)."""
    rng = np.random.default_rng(1)
    smooth = lambda h, w: np.stack([*np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h)),  # noqa: E731
                                    rng.integers(0, 255, (h, w))], -1).astype(np.uint8)  # ramps + noise
    Image.fromarray(smooth(120, 200)).save(tmp_path / "wide.jpg", quality=90)
    Image.fromarray(np.concatenate([smooth(90, 50), rng.integers(0, 255, (90, 50, 1), np.uint8)], -1),
                    "RGBA").save(tmp_path / "tall.png")
    (tmp_path / "sets.jsonl").write_text('{"images": ["wide.jpg", "tall.png"], "caption": "x"}\n')
    loader = data.build_loader([dict(type="sets", path=str(tmp_path / "sets.jsonl"))], resolution=16,
                               images_per_batch=2, set_sizes=(2,), flip="none")
    trained = next(loader)["pixels"][0]  # (2, 3, 16, 16): the set, in manifest order
    for name, x in zip(("wide.jpg", "tall.png"), trained):
        assert torch.equal(sample.load_image(str(tmp_path / name), 16), x), name
    assert not torch.equal(trained[0], trained[0].flip(-1))  # not trivially symmetric: the crop and flip matter


@pytest.mark.parametrize("space", ["latent", "pixel"])
def test_cli_end_to_end_and_determinism(ckpts, refs, tmp_path, capsys, space):
    args = ["--ckpt", ckpts[space], "--refs", *refs, "--prompt", "a toy on the beach", "a toy in the snow",
            "--num", "2", "--steps", "2"]
    assert sample.main(args + ["--out", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "a" / f) for f in ("set0_prompt0.png", "set0_prompt1.png", "set1_prompt0.png",
                                                         "set1_prompt1.png", "grid.png")]
    # set 0 of --num 2 is what --num 1 draws (each set its own noise); set 1 is another sample
    assert sample.main([*args[:-4], "--num", "1", *args[-2:], "--out", str(tmp_path / "one")]) == 0
    one, s0, s1 = (np.asarray(Image.open(tmp_path / d / f), float) for d, f in (
        ("one", "set0_prompt0.png"), ("a", "set0_prompt0.png"), ("a", "set1_prompt0.png")))
    assert np.array_equal(one, s0) and np.abs(s0 - s1).mean() > 1, np.abs(s0 - s1).mean()
    grid = Image.open(tmp_path / "a" / "grid.png")
    assert grid.size == (5 * 18 + 2, 2 * 18 + 2)  # rows: sets; columns: 3 refs | 2 generated
    assert sample.main(args + ["--out", str(tmp_path / "b")]) == 0
    assert sample.main(args + ["--out", str(tmp_path / "c"), "--seed", "1", "--sampler", "dpmpp_2m"]) == 0
    a, b, c = (np.asarray(Image.open(tmp_path / d / "set0_prompt1.png")) for d in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    g = np.asarray(grid)
    cell = lambda i, j: g[2 + 18 * i : 18 + 18 * i, 2 + 18 * j : 18 + 18 * j]  # noqa: E731  16x16 cells, pad 2
    for i in range(2):  # each row: the references exactly as read, then that set's images as saved
        for j, ref in enumerate(refs):
            assert np.array_equal(cell(i, j), np.asarray(sample.to_pil(sample.load_image(ref, 16))))
        for j in range(2):
            assert np.array_equal(cell(i, 3 + j), np.asarray(Image.open(tmp_path / "a" / f"set{i}_prompt{j}.png")))


def test_cli_text_guidance_reaches_the_sampler(ckpts, tmp_path, monkeypatch):
    """--text_guidance and --guidance arrive at personalize as given (the three-pass arithmetic itself is checked
    against separately run passes in tests/test_diffusion.py), and the CLI's images are generate()'s."""
    seen, real = [], sample.personalize
    monkeypatch.setattr(sample, "personalize", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    assert sample.main(["--ckpt", ckpts["latent"], "--prompt", "a", "b", "c", "--steps", "2", "--text_guidance", "3",
                        "--guidance", "7", "--out", str(tmp_path / "o")]) == 0
    assert [(kw["text_guidance"], kw["guidance"], kw["refs"], kw["num_new"]) for kw in seen] == [(3.0, 7.0, None, 3)]
    cli = np.stack([np.asarray(Image.open(tmp_path / "o" / f"set0_prompt{j}.png")) for j in range(3)])
    direct = sample.generate(sample.load_model(ckpts["latent"]), [], ["a", "b", "c"], steps=2, text_guidance=3.0,
                             guidance=7.0, sampler="ddim")
    assert np.array_equal(cli, np.stack([np.asarray(im) for im in direct[0]]))


def test_replacement_returns_the_references_exactly(ckpts, refs):
    m = sample.load_model(ckpts["pixel"])
    x = torch.stack([sample.load_image(p, 16) for p in refs[:2]])
    from model.diffusion import personalize

    z = personalize(m.unet, m.diffusion, refs=m.to_latents(x), context=m.encode_text(["a"] * 3),
                    null_context=m.encode_text([""]), num_new=1, steps=2, latent_shape=(3, 16, 16))
    torch.testing.assert_close(m.to_pixels(z[:2]), x.clamp(-1, 1), rtol=0, atol=0)


def test_chunking_and_set_size_cap(ckpts, refs, monkeypatch):
    m = sample.load_model(ckpts["latent"])
    seen, real = [], sample.personalize
    monkeypatch.setattr(sample, "personalize", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    sets = sample.generate(m, refs[:2], ["p1", "p2", "p3"], ref_prompt="r", steps=1, max_set_size=4)
    assert len(sets[0]) == 3 and [kw["num_new"] for kw in seen] == [2, 1]  # chunks [2 refs + 2], [2 refs + 1]
    want = m.to_latents(torch.stack([sample.load_image(p, 16) for p in refs[:2]]))
    for kw, chunk in zip(seen, (["p1", "p2"], ["p3"])):  # every chunk: all references, their caption first
        assert torch.equal(kw["refs"], want)
        ctx = as_cond(kw["context"])  # generate passes the conditioner's Cond (SD-1.x: context only)
        assert ctx.y is None
        torch.testing.assert_close(ctx.context, m.encode_text(["r", "r", *chunk]), rtol=0, atol=0)
    assert len(sample.generate(m, refs[:2], ["p"], ref_prompt=["r1", "r2"], steps=1)[0]) == 1
    with pytest.raises(sample.UserError, match="2 reference prompts for 1"):
        sample.generate(m, refs[:1], ["p"], ref_prompt=["r1", "r2"], steps=1)
    with pytest.raises(sample.UserError, match="no room"):
        sample.generate(m, refs, ["p"], steps=1, max_set_size=3)
    with pytest.raises(sample.UserError, match="capped"):
        sample.generate(m, [], ["p"] * 5, steps=1, max_set_size=4)


def bad(args, capsys, tmp_path, match):
    out = tmp_path / "never"
    assert sample.main(args + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and match in err and len(err.splitlines()) == 1, err
    assert not out.exists()  # nothing half-written


def test_bad_inputs_give_one_line_errors_and_no_files(ckpts, refs, tmp_path, capsys):
    ck = ["--ckpt", ckpts["latent"], "--steps", "1", "--prompt", "x"]
    bad(ck + ["--refs", str(tmp_path / "missing.jpg")], capsys, tmp_path, "not found")
    (tmp_path / "notes.txt").write_text("hello")
    bad(ck + ["--refs", str(tmp_path / "notes.txt")], capsys, tmp_path, "cannot read")
    bad(["--ckpt", str(tmp_path / "none.safetensors"), "--prompt", "x"], capsys, tmp_path, "checkpoint not found")
    save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    bad(["--ckpt", str(tmp_path / "other.safetensors"), "--prompt", "x"], capsys, tmp_path, "UNet")
    (tmp_path / "trunc.safetensors").write_bytes(open(ckpts["latent"], "rb").read()[:5000])
    bad(["--ckpt", str(tmp_path / "trunc.safetensors"), "--prompt", "x"], capsys, tmp_path, "trunc.safetensors")


def test_long_prompt_warns_and_truncates(ckpts, tmp_path, monkeypatch):
    """A 120-token prompt is cut to its first 75 tokens, as SD's CLIPTokenizer(truncation=True) cuts it: through the
    CLI, the sampler gets the text states of the prompt written out to exactly those 75 tokens (and so its images),
    not those of its end or of a shorter start."""
    seen, real = [], sample.personalize
    monkeypatch.setattr(sample, "personalize", lambda *a, **kw: seen.append(kw["context"].context) or real(*a, **kw))

    def run(prompt, name):
        assert sample.main(["--ckpt", ckpts["pixel"], "--prompt", prompt, "--steps", "1",
                            "--out", str(tmp_path / name)]) == 0
        return seen[-1], np.asarray(Image.open(tmp_path / name / "set0_prompt0.png"))

    with pytest.warns(UserWarning, match="truncated"):
        long, long_image = run("a dog " * 30 + "a cat " * 30, "long")  # 60 + 60 tokens
    first_75 = "a dog " * 30 + "a cat " * 7 + "a"  # 60 + 14 + 1 tokens: fits, no warning
    assert Tokenizer().count_tokens(first_75) == 77
    want, want_image = run(first_75, "first_75")
    assert torch.equal(long, want) and np.array_equal(long_image, want_image)
    assert (long - run("a dog " * 30, "first_60")[0]).abs().max() > 0.1  # where the cut falls shows


def _arrays(sets):
    return np.stack([np.asarray(im, np.float64) for images in sets for im in images]) / 255


@pytest.mark.parametrize("space", ["latent", "pixel"])
def test_bf16_generate_on_cpu_stays_close_to_fp32(ckpts, space):
    """bf16 keeps 8 mantissa bits (rounding 2^-9 ~ 0.2% per op) in the UNet, text encoder and VAE; the sampler state
    stays fp32. Over a few steps the images move by a fraction of one 8-bit level on average (measured: pixel space
    0.01-0.03 levels, at most 1; latent 0.25-0.31, at most 2, the bf16 VAE's share). The bound, 0.5 levels mean
    and 4 at most, is ~100x below a real difference: two independent sets differ by 40-125 levels. The shipped
    toy's bound (tests/test_toy_model.py) is the one calibrated on a trained model."""
    ref = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    args = dict(num_sets=2, steps=3, guidance=2.0, seed=1)
    fp32 = _arrays(sample.generate(sample.load_model(ckpts[space], dtype="fp32"), [ref], ["a dog", "a cat"], **args))
    bf16_model = sample.load_model(ckpts[space], dtype="bf16")
    assert bf16_model.dtype == torch.bfloat16
    bf16 = _arrays(sample.generate(bf16_model, [ref], ["a dog", "a cat"], **args))
    diff = np.abs(bf16 - fp32)
    assert 0 < diff.mean() < 0.5 / 255 and diff.max() <= 4 / 255
    assert np.abs(fp32[:2] - fp32[2:]).mean() > 20 * diff.mean()  # the scale of a real difference


def test_dtype_flag_reaches_every_module(ckpts, refs, tmp_path, monkeypatch):
    seen = {}

    def record(name):
        return lambda module, args, kwargs: seen.setdefault(name, set()).update(
            a.dtype for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor) and a.is_floating_point())

    real_generate = sample.generate

    def spy(model, *a, **kw):
        seen["kwargs"] = kw
        for name, m in (("unet", model.unet), ("text", model.text.encoders[0].encoder),
                        ("vae.decoder.mid", model.vae.decoder.mid.block_1), ("vae.decoder.up", model.vae.decoder.up[0].block[0]),
                        ("vae.encoder", model.vae.encoder)):
            m.register_forward_pre_hook(record(name), with_kwargs=True)
        seen["params"] = {n: {p.dtype for p in m.parameters()} for n, m in (
            ("unet", model.unet), ("text", model.text), ("vae.mid", model.vae.decoder.mid),
            ("vae.post_quant_conv", model.vae.post_quant_conv), ("vae.up", model.vae.decoder.up),
            ("vae.encoder", model.vae.encoder))}
        return real_generate(model, *a, **kw)

    monkeypatch.setattr(sample, "generate", spy)
    base = ["--ckpt", ckpts["latent"], "--refs", refs[0], "--prompt", "x", "--steps", "1"]
    assert sample.main(base + ["--dtype", "bf16", "--out", str(tmp_path / "b")]) == 0
    assert seen["kwargs"]["dtype"] == "bf16"
    assert all(d == {torch.bfloat16} for d in seen["params"].values()), seen["params"]
    assert all(seen[k] == {torch.bfloat16} for k in ("unet", "text", "vae.decoder.mid", "vae.decoder.up",
                                                     "vae.encoder")), seen
    seen.clear()
    assert sample.main(base + ["--dtype", "fp16", "--out", str(tmp_path / "h")]) == 0
    p = seen["params"]
    assert p["unet"] == p["text"] == p["vae.mid"] == p["vae.post_quant_conv"] == {torch.float16}
    assert p["vae.up"] == p["vae.encoder"] == {torch.float32}  # AutoencoderKL.cast: fp16 would overflow there
    assert seen["unet"] == seen["vae.decoder.mid"] == {torch.float16} and seen["vae.decoder.up"] == {torch.float32}
    seen.clear()
    assert sample.main(base + ["--out", str(tmp_path / "a")]) == 0  # auto on CPU: fp32
    assert seen["kwargs"]["dtype"] == "fp32" and all(d == {torch.float32} for d in seen["params"].values())
    m = sample.load_model(ckpts["pixel"])  # generate(dtype=...) casts a loaded model once
    real_generate(m, [], ["x"], steps=1, dtype="bf16")
    assert m.dtype == torch.bfloat16 and {p.dtype for p in m.text.parameters()} == {torch.bfloat16}
    with pytest.raises(sample.UserError, match="--dtype 'fp8'"):
        sample.resolve_dtype("fp8", "cpu")


def test_batched_sets_equal_one_by_one(ckpts):
    """--num K sets in one UNet call give the images of K calls of one set: each set has its own noise stream."""
    m = sample.load_model(ckpts["latent"])
    ref = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    args = dict(steps=3, guidance=2.0, seed=5, sampler="ddim", eta=1.0)  # η = 1: fresh noise at every step too
    batched = _arrays(sample.generate(m, [ref], ["a", "b"], num_sets=3, **args))
    one_by_one = _arrays(sample.generate(m, [ref], ["a", "b"], num_sets=3, max_batch_sets=1, **args))
    pairs = _arrays(sample.generate(m, [ref], ["a", "b"], num_sets=3, max_batch_sets=2, **args))
    assert np.array_equal(batched, one_by_one) and np.array_equal(batched, pairs)
    assert np.array_equal(batched[:2], _arrays(sample.generate(m, [ref], ["a", "b"], num_sets=1, **args)))
    # any set alone (eval.py remakes a lost image k as set k): set 2 of 3, made by itself
    assert np.array_equal(batched[4:], _arrays(sample.generate(m, [ref], ["a", "b"], num_sets=1, first_set=2, **args)))
    assert np.abs(batched[:2] - batched[2:4]).mean() > 0.05  # and the sets do differ
    calls = []
    real = m.unet_fn
    m.unet_fn = lambda x, *a, **kw: calls.append(x.shape[0]) or real(x, *a, **kw)
    sample.generate(m, [ref], ["a", "b"], num_sets=3, steps=2)
    assert calls == [2 * 3 * 3] * 2  # cond + null pass of 3 sets of 3 images: one UNet call per step


def test_compiled_unet_has_no_graph_breaks(ckpts):
    """--compile uses fullgraph=True; dynamo's explain shows the UNet call of a sampling step is one graph."""
    m = sample.load_model(ckpts["latent"])
    x, t, ctx = torch.randn(4, 9, 8, 8), torch.full((4,), 981), torch.randn(4, 77, 32)
    explained = torch._dynamo.explain(m.unet)(x, t, ctx, set_size=2)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    with pytest.raises(sample.UserError, match="--compile 'fast'"):
        sample.compile_unet(m.unet, "fast")


def test_out_of_memory_halves_the_sets_per_call_and_keeps_the_images(ckpts, monkeypatch):
    m = sample.load_model(ckpts["pixel"])
    args = dict(num_sets=4, steps=2, guidance=2.0, seed=3)
    want = _arrays(sample.generate(m, [], ["a", "b"], **args))
    real, sizes = sample._sample_sets, []

    def small_gpu(model, ref_latents, context, null, num_new, gens, **kw):
        sizes.append(len(gens))
        if len(gens) > 1:  # pretend only one set fits
            real(model, ref_latents, context, null, num_new, gens, **kw)  # draws noise first, as a real OOM would
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(model, ref_latents, context, null, num_new, gens, **kw)

    monkeypatch.setattr(sample, "_sample_sets", small_gpu)
    with pytest.warns(UserWarning, match="out of GPU memory"):
        got = _arrays(sample.generate(m, [], ["a", "b"], **args))
    assert sizes == [4, 2, 1, 1, 1, 1] and np.array_equal(got, want)  # the generators were rewound
    with pytest.raises(torch.cuda.OutOfMemoryError):  # an explicit --max_batch_sets is not second-guessed
        sample.generate(m, [], ["a", "b"], max_batch_sets=2, **args)
