"""eval.py: metric properties with random-weight tiny CLIP/DINO loaded through the user's weight-path code, the
DreamBooth prompt file, masks, and the resumable protocol runner on a miniature dataset."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval as jeval

TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                             "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Tiny random backbones written to disk the way real ones are distributed: an open_clip architecture .json
    + state-dict file, and a transformers ViT folder (save_pretrained, as facebook/dino-vits16 on the hub)."""
    import open_clip
    from transformers import ViTConfig, ViTModel

    d = tmp_path_factory.mktemp("weights")
    cfg = d / "tiny-clip-eval.json"
    cfg.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(str(cfg))
    torch.manual_seed(0)
    clip = open_clip.create_model("tiny-clip-eval", pretrained=None)
    torch.save(clip.state_dict(), d / "open_clip_pytorch_model.bin")
    vit = ViTModel(ViTConfig(image_size=224, patch_size=32, hidden_size=32, num_hidden_layers=1,
                             num_attention_heads=2, intermediate_size=64), add_pooling_layer=False)
    vit.save_pretrained(d / "dino-vits16")
    return {"clip_cfg": str(cfg), "clip_bin": str(d / "open_clip_pytorch_model.bin"), "dino": str(d / "dino-vits16"),
            "clip_model": clip, "dir": d}


@pytest.fixture(scope="module")
def embedders(weights):
    return jeval.ClipEmbedder(weights["clip_cfg"], weights["clip_bin"]), jeval.DinoEmbedder(weights["dino"])


def picture(fg, bg, size=(48, 40), box=(12, 10, 36, 30)):
    """A flat 'subject' rectangle on a flat background; mask = the rectangle."""
    w, h = size
    a = np.empty((h, w, 3), np.uint8)
    a[:] = bg
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1] = fg
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return Image.fromarray(a), m


# ----------------------------------------------------------------------------- metric properties

def center_square(img, short, crop):
    """The published protocol's geometry, by hand: bicubic resize of the shorter side to `short` (torchvision's
    size rule: the longer side truncated), then the central crop x crop."""
    w, h = img.size
    size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    img = img.resize(size, Image.BICUBIC)
    left, top = int(round((size[0] - crop) / 2)), int(round((size[1] - crop) / 2))
    return img.crop((left, top, left + crop, top + crop))


def normalized(img, mean, std):
    """-> (1, 3, H, W) float32: x / 255, minus mean, over std, per channel."""
    a = (np.asarray(img, np.float32) / 255 - np.float32(mean)) / np.float32(std)
    return torch.from_numpy(a).permute(2, 0, 1)[None]


def test_embeddings_follow_the_published_protocols(weights, embedders):
    """DINO and CLIP embeddings of a fixed image (and CLIP-T's text) through the fixed tiny models, against each
    protocol computed here from its definition. DINO (Caron et al.'s evaluation, DreamBench's DINO): Resize(256,
    bicubic), CenterCrop(224), ImageNet mean/std, the CLS token after the final LayerNorm. CLIP: OpenAI's
    preprocessing (bicubic resize of the shorter side to the input size, center crop, OpenAI's mean/std), the
    class token after ln_post times the visual projection; text: ln_final at the end-of-text token times the text
    projection. A mean-pooled DINO, another resize or normalisation, or a missing projection fails."""
    clip, dino = embedders
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, 300)[None, :, None] + np.linspace(0, 50, 260)[:, None, None]  # (260, 300, 1)
    img = Image.fromarray((ramp + rng.integers(0, 56, (260, 300, 3))).astype(np.uint8))  # landscape: crop matters
    with torch.no_grad():
        # DINO: the ViT's last block output, its final LayerNorm, the CLS token
        vit = dino.model
        x = normalized(center_square(img, 256, 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        states = vit(pixel_values=x, output_hidden_states=True).hidden_states[-1]  # (1, 1 + patches, D)
        want_dino = F.normalize(vit.layernorm(states)[:, 0], dim=-1)
        mean_pooled = F.normalize(vit.layernorm(states).mean(1), dim=-1)
        # CLIP image: the transformer's tokens, ln_post, the class token, the projection
        model = weights["clip_model"].eval()
        x = normalized(center_square(img, 32, 32), (0.48145466, 0.4578275, 0.40821073),
                       (0.26862954, 0.26130258, 0.27577711))
        seen = []
        hook = model.visual.transformer.register_forward_hook(lambda m, i, o: seen.append(o))
        model.encode_image(x)
        hook.remove()
        want_clip = F.normalize(model.visual.ln_post(seen[0])[:, 0] @ model.visual.proj, dim=-1)
        # CLIP text: ln_final at the end-of-text token (the highest id), the projection
        import open_clip

        ids = open_clip.tokenize(["a red toy in the jungle"])  # OpenAI's BPE, 77 tokens, <start> ... <end> 0 ...
        seen = []
        hook = model.transformer.register_forward_hook(lambda m, i, o: seen.append(o))
        model.encode_text(ids)
        hook.remove()
        eot = model.ln_final(seen[0])[0, int(ids[0].argmax())]
        want_text = F.normalize((eot @ model.text_projection)[None], dim=-1)
    torch.testing.assert_close(dino.images([img]), want_dino, rtol=0, atol=1e-5)
    assert (mean_pooled - want_dino).abs().max() > 1e-2  # the check tells CLS from mean pooling
    torch.testing.assert_close(clip.images([img]), want_clip, rtol=0, atol=1e-5)
    torch.testing.assert_close(clip.texts(["a red toy in the jungle"]), want_text, rtol=0, atol=1e-5)


def test_identical_images_score_one_and_scores_symmetric_bounded(embedders):
    clip, dino = embedders
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8)) for i in range(4)]
    for emb in (clip, dino):
        f = emb.images(imgs)
        g = emb.images(list(reversed(imgs)))
        assert torch.allclose(jeval.image_scores(f[:1], f[:1]), torch.ones(1), atol=1e-5)  # identical -> 1
        # 3 copies of the same image as references: still 1 (averaging over references)
        assert torch.allclose(jeval.image_scores(f[:1], f[[0, 0, 0]]), torch.ones(1), atol=1e-5)
        s = jeval.similarity(f, g.flip(0))
        assert torch.allclose(s, s.T, atol=1e-6)  # symmetric
        assert torch.allclose(torch.diagonal(s), torch.ones(4), atol=1e-5)
        assert s.min() >= -1 and s.max() <= 1
        assert (s - torch.eye(4)).abs().max() > 1e-4  # different images are told apart
        # exact bounds also on adversarial inputs: anti-parallel and rounding above 1
        v = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
        assert jeval.similarity(v, -v).min() >= -1 and jeval.similarity(v * (1 + 1e-6), v).max() <= 1


def test_masking_changes_score_only_through_background(embedders):
    clip, dino = embedders
    a, mask = picture((200, 30, 30), (20, 120, 20))
    b, _ = picture((200, 30, 30), (30, 30, 180))  # same subject, other background
    c, _ = picture((30, 200, 200), (20, 120, 20))  # other subject, same background
    for emb in (clip, dino):
        plain = jeval.image_scores(emb.images([a]), emb.images([b]))
        masked = jeval.image_scores(emb.images([jeval.apply_mask(a, mask)]), emb.images([jeval.apply_mask(b, mask)]))
        assert plain.item() < 1 - 1e-4
        assert masked.item() == pytest.approx(1, abs=1e-5)
        other = jeval.image_scores(emb.images([jeval.apply_mask(a, mask)]), emb.images([jeval.apply_mask(c, mask)]))
        assert other.item() < 1 - 1e-4  # the foreground still counts
    # the background is one constant colour, the foreground untouched; a mask at another size is rescaled
    out = np.asarray(jeval.apply_mask(a, mask, (7, 8, 9)))
    assert (out[~mask] == (7, 8, 9)).all() and (out[mask] == np.asarray(a)[mask]).all()
    small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((24, 20), Image.NEAREST)) > 0
    assert (np.asarray(jeval.apply_mask(a, small)) == np.asarray(jeval.apply_mask(a, mask))).all()


def test_clip_t_shape_range_and_prompt(embedders):
    clip, _ = embedders
    imgs = [picture((200, 30, 30), (20, 120, 20))[0], picture((30, 30, 200), (250, 250, 250))[0]]
    f = clip.images(imgs)
    t1 = clip.texts(["a dog in the jungle", "a red toy"])
    t2 = clip.texts(["a purple cube shaped teapot", "a cat wearing a santa hat"])
    s1, s2 = jeval.text_scores(f, t1), jeval.text_scores(f, t2)
    assert s1.shape == (2,) and s1.abs().max() <= 1
    assert torch.allclose(s1, torch.diagonal(jeval.similarity(f, t1)), atol=1e-6)  # row i scored with prompt i
    assert (s1 - s2).abs().min() > 1e-4  # other prompts, other scores


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_openai_torchscript_weights_load_like_the_state_dict(weights, embedders, tmp_path):
    """OpenAI's ViT-*.pt are TorchScript archives; they must give the same embeddings as the state dict
    (apart from QuickGELU, which is forced for them: compare with a QuickGELU model)."""
    import open_clip

    cfg = dict(TINY_CLIP, quick_gelu=True)
    (tmp_path / "tiny-clip-eval-qg.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(tmp_path / "tiny-clip-eval-qg.json"))
    ref = open_clip.create_model("tiny-clip-eval-qg", pretrained=None)
    ref.load_state_dict(weights["clip_model"].state_dict())
    torch.save(ref.state_dict(), tmp_path / "qg.bin")
    traced = torch.jit.trace(ref.eval(), (torch.randn(1, 3, 32, 32), torch.zeros(1, 77, dtype=torch.long)),
                             check_trace=False)
    traced.save(str(tmp_path / "ViT-tiny.pt"))
    a = jeval.ClipEmbedder(weights["clip_cfg"], str(tmp_path / "ViT-tiny.pt"))
    b = jeval.ClipEmbedder(str(tmp_path / "tiny-clip-eval-qg.json"), str(tmp_path / "qg.bin"))
    img = [picture((200, 30, 30), (20, 120, 20))[0]]
    assert torch.allclose(a.images(img), b.images(img), atol=1e-5)
    assert torch.allclose(a.texts(["a dog"]), b.texts(["a dog"]), atol=1e-5)


def test_missing_weights_errors_name_the_file(weights, tmp_path):
    with pytest.raises(jeval.MissingWeights, match="nowhere/open_clip_pytorch_model.bin"):
        jeval.ClipEmbedder("ViT-B-32", str(tmp_path / "nowhere/open_clip_pytorch_model.bin"))
    with pytest.raises(jeval.MissingWeights, match="dino-vits16/config.json"):
        jeval.DinoEmbedder(str(tmp_path / "dino-vits16"))
    (tmp_path / "dino-empty").mkdir()
    (tmp_path / "dino-empty/config.json").write_text(open(os.path.join(weights["dino"], "config.json")).read())
    with pytest.raises(jeval.MissingWeights, match="dino-empty/model.safetensors"):
        jeval.DinoEmbedder(str(tmp_path / "dino-empty"))
    with pytest.raises(jeval.MissingWeights, match="gdino"):
        jeval.GroundedSAM(str(tmp_path / "gdino"), str(tmp_path / "sam"))
    with pytest.raises(jeval.EvalError, match="unknown --clip_model"):
        jeval.ClipEmbedder("no-such-arch", weights["clip_bin"])
    # A folder whose weights are for another architecture must not load as randomly initialised DINO.
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)) \
        .save_pretrained(tmp_path / "bert")
    with pytest.raises(jeval.EvalError):
        jeval.DinoEmbedder(str(tmp_path / "bert"))


# ----------------------------------------------------------------------------- segmenter

def test_grounded_sam_tiny_random_weights(tmp_path):
    """The Grounding-DINO + SAM segmenter runs end to end from local folders (random tiny weights: the mask is
    meaningless, its shape and type are not)."""
    import tiny_weights  # the tiny folders s3's tests load too

    gd, sam = tiny_weights.grounded_sam(str(tmp_path), size=64)
    seg = jeval.GroundedSAM(str(gd), str(sam), box_threshold=0.0, text_threshold=0.0)  # random scores: keep all
    img, _ = picture((200, 30, 30), (20, 120, 20), size=(80, 48), box=(20, 10, 60, 40))
    mask = seg(img, "Dog")
    assert mask.shape == (48, 80) and mask.dtype == bool
    # the subject mask is SAM's mask of the single most confident box for "<class>." (lower case)
    boxes, scores = seg.detect(img, "dog")
    assert len(scores) > 2 and boxes.shape == (len(scores), 4)
    best = boxes[[int(np.argmax(scores))]]
    assert (mask == seg.segment(img, best)[0]).all()
    assert not all((seg.segment(img, boxes[[i]])[0] == mask).all() for i in range(len(scores)))  # boxes differ
    # instances: the `limit` most confident, best first, each with its own box's mask
    inst = seg.instances(img, "dog", limit=2)
    assert [i["score"] for i in inst] == pytest.approx(sorted(scores.tolist(), reverse=True)[:2])
    assert (inst[0]["mask"] == mask).all() and inst[0]["box"] == pytest.approx(best[0].tolist())
    seg.box_threshold = 1.01  # nothing passes: "nothing found" is an all-False mask
    assert not seg(img, "dog").any()


def test_masks_files_first_then_segmenter_cached(tmp_path):
    img, m = picture((200, 30, 30), (20, 120, 20))
    img.save(tmp_path / "a.jpg")
    jeval.write_mask(str(tmp_path / "a.mask.png"), m)
    calls = []

    class Seg:
        name = "box-seg"

        def __call__(self, image, class_name):
            calls.append(class_name)
            return np.zeros((image.height, image.width), bool) if class_name == "nothing" else m

    masks = jeval.Masks(Seg(), str(tmp_path / "cache"))
    assert (masks.get(tmp_path / "a.jpg", img, "toy", "refs/s/a") == m).all() and not calls  # file wins
    for _ in range(2):
        assert (masks.get(tmp_path / "b.png", img, "toy", "images/s/b") == m).all()
    assert calls == ["toy"]  # computed once, then read from the cache
    assert (tmp_path / "cache/box-seg/images/s/b.mask.png").is_file()
    assert masks.get(tmp_path / "c.png", img, "nothing", "images/s/c").all()  # nothing found: whole image
    assert masks.sources == {("refs", "mask files"): 1, ("images", "box-seg"): 3} and masks.empty == 1
    assert "images: 3 from box-seg" in masks.describe() and "no foreground found" in masks.describe()
    with pytest.raises(jeval.EvalError, match="b.mask.png"):
        jeval.Masks().get(tmp_path / "b.png", img, "toy", "x")


# ----------------------------------------------------------------------------- the protocol runner

PROMPTS_FILE = """Classes

subject_name,class
toy_a,toy
dog_b,dog

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} wearing a santa hat'.format(unique_token, class_token),
'a cube shaped {0} {1}'.format(unique_token, class_token)
]
"""


def test_prompts_and_classes_format(tmp_path):
    (tmp_path / "p.txt").write_text(PROMPTS_FILE)
    classes, obj, live = jeval.read_prompts_and_classes(tmp_path / "p.txt")
    assert classes == {"toy_a": "toy", "dog_b": "dog"}
    assert obj == ["a {0} {1} in the jungle", "a red {0} {1}"] and len(live) == 2
    assert jeval.fill_prompt(obj[1], "stuffed animal") == "a red stuffed animal"  # no unique token, no double space


@pytest.fixture
def mini_dataset(tmp_path):
    """2 subjects (an object and a live one), 3 images each with mask files, the prompts file."""
    root = tmp_path / "dataset"
    for i, (name, fg) in enumerate((("toy_a", (200, 40, 40)), ("dog_b", (90, 60, 20)))):
        (root / name).mkdir(parents=True)
        for j in range(3):
            img, m = picture(fg, (30 + 60 * j, 160, 90 + 40 * i), box=(10 + 2 * j, 8, 34 + 2 * j, 30))
            img.save(root / name / f"{j:02d}.jpg", quality=95)
            jeval.write_mask(str(root / name / f"{j:02d}.mask.png"), m)
    (root / "prompts_and_classes.txt").write_text(PROMPTS_FILE)
    return root


class FakeGenerator:
    """Deterministic stand-in for sample.generate: the subject's colour on a prompt- and seed-dependent background.
    Counts the images it makes and can fail after `fail_after` of them (an interruption)."""

    def __init__(self, fail_after=None):
        self.fail_after, self.images, self.calls = fail_after, 0, []

    def __call__(self, model, ref_images, prompts, *, ref_prompt, num_sets, steps, guidance, sampler, seed, dtype,
                 first_set=0):
        self.calls.append(dict(refs=list(ref_images), prompts=prompts, ref_prompt=ref_prompt, num_sets=num_sets,
                               steps=steps, guidance=guidance, sampler=sampler, seed=seed, dtype=dtype))
        fg = Image.open(ref_images[0]).convert("RGB").getpixel((20, 15))
        out = []
        for s in range(num_sets):
            if self.fail_after is not None and self.images >= self.fail_after:
                raise RuntimeError("interrupted")
            self.images += 1
            rng = np.random.default_rng(seed + first_set + s)  # set s's own noise, as sample.set_seed(seed, s)
            out.append([picture(fg, tuple(int(c) for c in rng.integers(0, 256, 3)), size=(40, 40),
                                box=(8, 8, 30, 30))[0] for _ in prompts])
        return out


class FakeSegmenter:
    name = "fake-seg"

    def __init__(self):
        self.calls = 0

    def __call__(self, image, class_name):
        self.calls += 1
        m = np.zeros((image.height, image.width), bool)
        m[8:30, 8:30] = True
        return m


def test_runner_writes_tables_and_resumes(mini_dataset, weights, embedders, tmp_path):
    out = tmp_path / "out"
    argv = ["--dataset", str(mini_dataset), "--out", str(out), "--num_refs", "3", "--steps", "7",
            "--clip_model", weights["clip_cfg"], "--clip_weights", weights["clip_bin"], "--dino", weights["dino"],
            "--device", "cpu"]
    loads = []

    def load_model():
        loads.append(1)
        return type("M", (), {"meta": {"guidance": 2.5}})()

    def run(gen, seg=None, extra=()):
        return jeval.main(argv + list(extra), generate_fn=gen, load_model_fn=load_model,
                          segmenter=seg or FakeSegmenter())

    # 1. interrupted after 6 images: the first prompt's 4 are on disk, the second call's images never were
    with pytest.raises(RuntimeError, match="interrupted"):
        run(FakeGenerator(fail_after=6))
    assert len(list(out.glob("images/*/*.png"))) == 4

    # 2. the rerun makes only the remaining 12 (3 calls of 4 sets), then scores everything
    gen, seg = FakeGenerator(), FakeSegmenter()
    assert run(gen, seg) == 0
    assert gen.images == 12 and [c["num_sets"] for c in gen.calls] == [4, 4, 4]
    c = gen.calls[-1]
    assert c["prompts"] == ["a cube shaped dog"]
    assert c["ref_prompt"] == "a photo of a dog" and [os.path.basename(r) for r in c["refs"]] == \
        ["00.jpg", "01.jpg", "02.jpg"]
    assert c["steps"] == 7 and c["guidance"] == 2.5  # flag wins, else the checkpoint's default
    assert seg.calls == 16  # generated images only: the references have mask files
    assert len(list(out.glob("images/*/*.png"))) == 16 and len(list(out.glob("masks/fake-seg/**/*.png"))) == 16

    res = json.loads((out / "results.json").read_text())
    assert set(res["subjects"]) == {"toy_a", "dog_b"} and len(res["images"]) == 16
    assert res["subjects"]["dog_b"]["live"] and not res["subjects"]["toy_a"]["live"]
    for m in jeval.METRICS:
        assert -1 <= res["overall"][m]["mean"] <= 1 and res["overall"][m]["n"] == 16
        vals = [r[m] for r in res["images"] if r["subject"] == "toy_a"]
        assert res["subjects"]["toy_a"][m]["mean"] == pytest.approx(np.mean(vals), abs=1e-6)
        assert res["subjects"]["toy_a"][m]["std"] == pytest.approx(np.std(vals, ddof=1), abs=1e-6)
    # same subject colour, different backgrounds: masking can only bring the images closer
    assert res["overall"]["MDINO"]["mean"] > res["overall"]["DINO"]["mean"]
    prompts = {r["prompt"] for r in res["images"]}
    assert prompts == {"a toy in the jungle", "a red toy", "a dog wearing a santa hat", "a cube shaped dog"}
    # every image's five scores by hand: its embedding against each of the subject's real images (all of them, as
    # DreamBench scores), averaged; CLIP-T against its prompt; masked: the references' mask files and the
    # segmenter's box, background filled, before embedding
    clip, dino = embedders
    box = np.zeros((40, 40), bool)
    box[8:30, 8:30] = True  # FakeSegmenter's mask
    for rec in res["images"]:
        refs = sorted((mini_dataset / rec["subject"]).glob("*.jpg"))
        ref_images = [jeval.load_image(p) for p in refs]
        ref_masked = [jeval.apply_mask(im, np.asarray(Image.open(str(p)[:-4] + ".mask.png")) >= 128)
                      for im, p in zip(ref_images, refs)]
        gen = jeval.load_image(out / rec["path"])
        want = {"CLIP-T": (clip.images([gen]) @ clip.texts([rec["prompt"]]).T).item()}
        for m, emb, ims, g in (("CLIP-I", clip, ref_images, gen), ("DINO", dino, ref_images, gen),
                               ("MCLIP-I", clip, ref_masked, jeval.apply_mask(gen, box)),
                               ("MDINO", dino, ref_masked, jeval.apply_mask(gen, box))):
            want[m] = (emb.images([g]) @ emb.images(ims).T).mean().item()
        assert {m: rec[m] for m in jeval.METRICS} == pytest.approx(want, abs=1e-5), rec["path"]
    md = (out / "results.md").read_text()
    assert "| toy_a | toy | 8 |" in md and "**overall**" in md and "tiny-clip-eval" in md
    assert "refs: 6 from mask files" in md and "images: 16 from fake-seg" in md  # the mask source, with the table
    assert res["settings"]["steps"] == 7 and res["settings"]["guidance"] == 2.5  # what was actually used
    first = (out / "images/toy_a/00_0.png").read_bytes()

    # 3. images lost: exactly those are regenerated (with fresh masks), each the very image it was (image k of a
    # prompt is set k of that prompt's seed, whichever others are missing); nothing else is touched
    lost = {k: (out / f"images/dog_b/01_{k}.png").read_bytes() for k in (1, 2)}
    for k in lost:
        (out / f"images/dog_b/01_{k}.png").unlink()
    gen, seg = FakeGenerator(), FakeSegmenter()
    assert run(gen, seg) == 0
    assert gen.images == 2 and [c["num_sets"] for c in gen.calls] == [2] and seg.calls == 2
    assert {k: (out / f"images/dog_b/01_{k}.png").read_bytes() for k in lost} == lost
    (out / "images/dog_b/01_2.png").unlink()
    (out / "images/dog_b/01_0.png").unlink()
    assert run(FakeGenerator(), FakeSegmenter()) == 0  # not contiguous: 0 and 2, one call each
    assert (out / "images/dog_b/01_2.png").read_bytes() == lost[2]
    assert (out / "images/toy_a/00_0.png").read_bytes() == first

    # 4. complete: rescoring loads no model and generates nothing
    n_loads, gen = len(loads), FakeGenerator()
    assert run(gen, extra=["--score_only"]) == 0
    assert gen.images == 0 and len(loads) == n_loads

    # 5. other generation settings into the same folder are refused, not mixed into the table
    assert run(FakeGenerator(), extra=["--num_refs", "1"]) == 2
    assert len(list(out.glob("images/*/*.png"))) == 16


def test_rerun_compares_the_checkpoint_file_not_the_flag(mini_dataset, weights, tmp_path, capsys):
    """A folder made with `--ckpt assets/jedi_toy.safetensors` reruns without --ckpt (which is that same file), and
    the other way round; another checkpoint is refused, the message naming the default as such."""
    import sample

    base = ["--dataset", str(mini_dataset), "--clip_model", weights["clip_cfg"], "--clip_weights",
            weights["clip_bin"], "--dino", weights["dino"], "--no_masked", "--num_prompts", "1",
            "--images_per_prompt", "1", "--subjects", "toy_a"]
    typed = os.path.relpath(sample.DEFAULT_CKPT)  # e.g. assets/jedi_toy.safetensors from the repository root

    def run(out, *extra):
        return jeval.main(base + ["--out", str(tmp_path / out), *extra], generate_fn=FakeGenerator(),
                          load_model_fn=lambda: None)
    assert run("a", "--ckpt", typed) == 0
    assert run("a") == 0  # the default is the same file
    assert run("b") == 0
    assert run("b", "--ckpt", sample.DEFAULT_CKPT) == 0  # and back, spelt another way
    capsys.readouterr()
    other = str(tmp_path / "other.safetensors")
    assert run("b", "--ckpt", other) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"ckpt=the default {typed} (now {other!r})" in errors[0]
    assert run("a", "--ckpt", other) == 2
    assert f"ckpt={typed!r} (now {other!r})" in capsys.readouterr().err


def test_every_flag_has_help(monkeypatch):
    import argparse

    flags, real = {}, argparse.ArgumentParser.add_argument

    def spy(self, *a, **kw):
        flags[a[0]] = kw.get("help")
        return real(self, *a, **kw)
    monkeypatch.setattr(argparse.ArgumentParser, "add_argument", spy)
    jeval.parse_args(["--dataset", "d", "--out", "o", "--clip_weights", "c", "--dino", "x"])
    assert len(flags) > 20 and [f for f, text in flags.items() if f != "-h" and not text] == []


def test_runner_deterministic_one_ref_and_unmasked(mini_dataset, weights, tmp_path, capsys):
    """Same seed, same images across runs and subsets; --no_masked needs no masks; num_refs 1 passes one ref."""
    base = ["--dataset", str(mini_dataset), "--clip_model", weights["clip_cfg"], "--clip_weights",
            weights["clip_bin"], "--dino", weights["dino"], "--num_refs", "1", "--no_masked", "--num_prompts", "1",
            "--images_per_prompt", "2"]
    gen = FakeGenerator()
    assert jeval.main(base + ["--out", str(tmp_path / "a")], generate_fn=gen, load_model_fn=lambda: None) == 0
    assert all(len(c["refs"]) == 1 for c in gen.calls) and gen.images == 4
    # the one reference is each subject's first image (sorted), the same whatever --num_refs: rows comparable
    assert [os.path.relpath(c["refs"][0], mini_dataset) for c in gen.calls] == ["toy_a/00.jpg", "dog_b/00.jpg"]
    assert jeval.main(base + ["--out", str(tmp_path / "b"), "--subjects", "dog_b"], generate_fn=FakeGenerator(),
                      load_model_fn=lambda: None) == 0
    assert (tmp_path / "a/images/dog_b/00_1.png").read_bytes() == (tmp_path / "b/images/dog_b/00_1.png").read_bytes()
    res = json.loads((tmp_path / "b/results.json").read_text())
    assert res["overall"]["MDINO"] is None and res["overall"]["DINO"]["n"] == 2
    assert "n/a" in (tmp_path / "b/results.md").read_text()
    # masked metrics with no mask file for the generated images and no segmenter: the error names the file
    rc = jeval.main([a for a in base if a != "--no_masked"] + ["--out", str(tmp_path / "a")],
                    generate_fn=FakeGenerator(), load_model_fn=lambda: None)
    assert rc == 2 and "00_0.mask.png" in capsys.readouterr().err


def test_runner_through_sample_py(mini_dataset, weights, tmp_path, monkeypatch):
    """No injection: images come from sample.load_model + sample.generate on a tiny pixel-space JeDi checkpoint,
    exactly the call a real evaluation makes; the checkpoint's sampling defaults are used, resolved exactly as
    sample.py's CLI resolves them (same sampler, steps, guidance and dtype in the generate() calls of both)."""
    import sample
    from model.loading import save_jedi
    from model.text import build_text_encoder, sd14_text_config
    from model.unet import UNet, UNetConfig

    torch.manual_seed(0)
    unet = UNet(UNetConfig(in_channels=7, out_channels=3, model_channels=32, channel_mult=(1, 2),
                           attention_resolutions=(2,), num_res_blocks=1, num_heads=2, context_dim=32))
    text = build_text_encoder(sd14_text_config(hidden_size=32, num_hidden_layers=1, num_attention_heads=1,
                                               intermediate_size=64))
    ckpt = str(tmp_path / "tiny_jedi.safetensors")
    save_jedi(ckpt, unet, text, None, resolution=16, diffusion={"prediction": "eps"}, steps=2, guidance=2.0,
              sampler="dpmpp_2m")
    calls, outputs, real = [], [], sample.generate
    monkeypatch.setattr(sample, "generate", lambda *a, **kw: calls.append(kw) or outputs.append(real(*a, **kw))
                        or outputs[-1])
    argv = ["--dataset", str(mini_dataset), "--out", str(tmp_path / "out"), "--ckpt", ckpt, "--num_refs", "1",
            "--num_prompts", "1", "--images_per_prompt", "2", "--clip_model", weights["clip_cfg"],
            "--clip_weights", weights["clip_bin"], "--dino", weights["dino"], "--no_masked", "--device", "cpu"]
    assert jeval.main(argv) == 0
    assert sample.main(["--ckpt", ckpt, "--prompt", "x", "--device", "cpu", "--out", str(tmp_path / "s")]) == 0
    used = [{k: kw[k] for k in ("sampler", "steps", "guidance", "dtype")} for kw in calls]
    assert len(used) == 3 and used[0] == used[1] == used[2]  # 2 subjects by eval.py, then sample.py
    assert used[0] == {"sampler": "dpmpp_2m", "steps": 2, "guidance": 2.0, "dtype": "fp32"}  # the checkpoint's
    images = sorted((tmp_path / "out/images").glob("*/*.png"))
    assert len(images) == 4 and all(Image.open(p).size == (16, 16) for p in images)
    # each saved image is generate()'s new image of its set, pixel for pixel (the reference is not what is saved)
    for subject, sets in zip(["toy_a", "dog_b"], outputs[:2]):
        for k, images_k in enumerate(sets):
            saved = np.asarray(Image.open(tmp_path / f"out/images/{subject}/00_{k}.png"))
            assert len(images_k) == 1 and (saved == np.asarray(images_k[0])).all()
    assert not (np.asarray(Image.open(tmp_path / "out/images/toy_a/00_0.png"))
                == np.asarray(Image.open(tmp_path / "out/images/toy_a/00_1.png"))).all()  # 2 sets, 2 images
    res = json.loads((tmp_path / "out/results.json").read_text())
    assert res["overall"]["CLIP-I"]["n"] == 4 and res["settings"]["checkpoint"] == ckpt
    assert res["settings"]["steps"] == 2 and res["settings"]["guidance"] == 2.0  # the checkpoint's defaults
    assert res["settings"]["sampler"] == "dpmpp_2m" and res["settings"]["dtype"] == "fp32"


def test_cli_reports_every_missing_weight_path(mini_dataset, tmp_path, capsys):
    rc = jeval.main(["--dataset", str(mini_dataset), "--out", str(tmp_path / "out"),
                     "--clip_weights", str(tmp_path / "ViT-B-32.pt"), "--dino", str(tmp_path / "dino-vits16"),
                     "--grounding_dino", str(tmp_path / "grounding-dino-tiny"),
                     "--sam", str(tmp_path / "sam-vit-base")])
    err = capsys.readouterr().err
    assert rc == 2 and not (tmp_path / "out").exists()  # nothing started
    for expected in ("ViT-B-32.pt", "dino-vits16/config.json", "grounding-dino-tiny/config.json",
                     "sam-vit-base/config.json"):
        assert expected in err


def test_baseline_rows_expose_a_model_that_copies_its_reference(mini_dataset, weights, tmp_path):
    """A 'model' that returns its reference unchanged scores exactly the reference-copy row, above the real-images
    row (its copy matches itself), and that row is the mean over the other real images."""
    def copier(model, ref_images, prompts, *, num_sets, **kw):
        return [[jeval.load_image(ref_images[0]) for _ in prompts] for _ in range(num_sets)]

    out = tmp_path / "out"
    argv = ["--dataset", str(mini_dataset), "--out", str(out), "--num_refs", "1", "--no_masked",
            "--images_per_prompt", "2", "--clip_model", weights["clip_cfg"], "--clip_weights", weights["clip_bin"],
            "--dino", weights["dino"], "--device", "cpu"]
    assert jeval.main(argv, generate_fn=copier, load_model_fn=lambda: None) == 0
    res = json.loads((out / "results.json").read_text())
    copy, real = res["baselines"]["reference copy"], res["baselines"]["real images"]
    assert copy["CLIP-T"]["n"] == 2 * 2  # 2 subjects x 2 prompts x 1 reference
    assert real["DINO"]["n"] == 2 * 3 and real["CLIP-T"] is None  # every real image; no prompt
    for m in ("CLIP-T", "CLIP-I", "DINO"):
        assert res["overall"][m]["mean"] == pytest.approx(copy[m]["mean"], abs=1e-5)  # the copier is the copy row
    for m in ("CLIP-I", "DINO"):
        assert copy[m]["mean"] > real[m]["mean"]  # a copy beats the real-image ceiling: it is not fidelity
    # real images: image i against the subject's other images, by hand from the embeddings
    clip = jeval.ClipEmbedder(weights["clip_cfg"], weights["clip_bin"])
    for name in ("toy_a", "dog_b"):
        paths = sorted(str(p) for p in (mini_dataset / name).glob("*.jpg"))
        e = clip.images([jeval.load_image(p) for p in paths])
        s = jeval.similarity(e, e)
        want = [(s[i].sum() - s[i, i]).item() / 2 for i in range(3)]
        got = [r["CLIP-I"] for r in res["baseline_images"]["real images"] if r["subject"] == name]
        assert got == pytest.approx(want, abs=1e-5)
    md = (out / "results.md").read_text()
    assert "| *reference copy* | | 4 |" in md and "| *real images* | | 6 |" in md
