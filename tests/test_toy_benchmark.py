"""toy/benchmark.py and its attribute classifier: the shipped weights, metric separation, end to end."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data_procedural as dp
from toy import benchmark as tb
from toy import classifier as tc


@pytest.fixture(scope="module")
def classifier():
    # Checked before loading: a missing file would otherwise be retrained (minutes) instead of failing.
    assert tc.WEIGHTS.is_file(), f"{tc.WEIGHTS} is not shipped; run python toy/classifier.py"
    return tc.load(tc.WEIGHTS)


def test_shipped_classifier_loads_small_and_accurate(classifier):
    model, meta = classifier
    assert os.path.getsize(tc.WEIGHTS) < 1_000_000
    assert set(meta["heldout_accuracy"]) == set(tc.HEADS)
    assert all(acc >= 0.95 for acc in meta["heldout_accuracy"].values()), meta["heldout_accuracy"]
    # measured here, not read from the file: 300 fresh renders of held-out subjects in random contexts and poses,
    # through the benchmark's own input path (to_tensor, predict), against the attributes each render was made with
    rng, held, images, truth = np.random.default_rng(7), dp.subjects("heldout"), [], []
    for _ in range(300):
        im, info = dp.render(held[rng.integers(len(held))], dp.CONTEXTS[rng.integers(len(dp.CONTEXTS))],
                             resolution=32, rng=rng)
        images.append(im)
        truth.append(info)
    pred = tc.predict(model, tc.to_tensor(images))
    for head, names in tc.HEADS.items():
        acc = np.mean([names[int(p)] == info[head] for p, info in zip(pred[head], truth)])
        assert acc >= 0.95 and acc >= meta["heldout_accuracy"][head] - 0.03, (head, acc)  # measured 0.987-1.0


def test_metric_separates_the_real_subject_from_a_random_one(classifier):
    model, _ = classifier
    same, other, text_ok, text_wrong, consistent, mixed = [], [], [], [], [], []
    for i, subject in enumerate(tb.heldout_order()[:8]):
        case = tb.make_case(i, subject, targets=3, num_sets=2, resolution=32, seed=0)
        assert not {c[0] for c in case["contexts"]} & {c[0] for c in case["ref_contexts"]}  # new backgrounds
        same.append(tb.score(model, case["render_same"], subject, case["contexts"])["fidelity"].mean())
        other.append(tb.score(model, case["render_other"], subject, case["contexts"])["fidelity"].mean())
        text_ok.append(tb.score(model, case["render_same"], subject, case["contexts"])["text"].mean())
        shifted = case["contexts"][1:] + case["contexts"][:1]  # every image scored against another target's context
        text_wrong.append(tb.score(model, case["render_same"], subject, shifted)["background"].mean())
        consistent.append(tb.score(model, case["render_same"], subject, case["contexts"])["consistency"].mean())
        mixed.append(tb.score(model, case["render_other"], subject, case["contexts"])["consistency"].mean())
    assert np.mean(consistent) >= 0.9 and np.mean(mixed) <= np.mean(consistent) - 0.4, (consistent, mixed)
    assert np.mean(same) >= 0.9 and min(same) >= 0.75, same
    assert np.mean(other) <= np.mean(same) - 0.4, (same, other)
    assert np.mean(text_ok) >= 0.9 and np.mean(text_wrong) <= 0.1, (text_ok, text_wrong)


def test_confusion_counts_every_image_and_its_trace_is_the_fidelity(classifier):
    model, _ = classifier
    subjects = tb.heldout_order()[:6]
    cases = [tb.make_case(i, s, targets=3, num_sets=1, resolution=32, seed=0) for i, s in enumerate(subjects)]
    for key, diagonal in (("render_same", 0.9), ("render_other", 0.6)):
        per = [tb.score(model, c[key], s, c["contexts"]) for c, s in zip(cases, subjects)]
        m = tb.confusion(per, "shape")
        assert m.shape == (len(tc.HEADS["shape"]),) * 2 and m.sum() == 18
        assert m.sum(1).tolist() == [3 * [s.attrs()["shape"] for s in subjects].count(c) for c in tc.HEADS["shape"]]
        assert np.trace(m) / m.sum() == pytest.approx(np.mean([d["shape"].mean() for d in per]))
        assert (np.trace(m) / m.sum() >= diagonal) == (key == "render_same"), m  # other subjects: off the diagonal


def test_reference_framing_changes_only_the_references():
    subject = tb.heldout_order()[0]
    close = tb.make_case(0, subject, targets=3, num_sets=1, resolution=32, seed=0)
    framed = tb.make_case(0, subject, targets=3, num_sets=1, resolution=32, seed=0, ref_framing="context")
    assert all(c[1] == dp.CLOSE_UP for c in close["ref_contexts"])
    assert all("close up" in c for c in close["ref_captions"])
    assert all(c[1] in dp.POSITIONS for c in framed["ref_contexts"])
    assert [c[0] for c in close["ref_contexts"]] == [c[0] for c in framed["ref_contexts"]]
    assert close["prompts"] == framed["prompts"] and torch.equal(close["render_same"], framed["render_same"])
    assert not torch.equal(close["refs"], framed["refs"])
    with pytest.raises(ValueError, match="ref_framing"):
        tb.make_case(0, subject, targets=3, num_sets=1, resolution=32, seed=0, ref_framing="zoom")


def tiny_pixel_ckpt(path):
    """A random 32x32 pixel-space JeDi checkpoint (attention only at 16x16 so that it samples in milliseconds)."""
    from model.loading import save_jedi
    from model.text import build_text_encoder, sd14_text_config
    from model.unet import UNet, UNetConfig

    torch.manual_seed(0)
    unet = UNet(UNetConfig(in_channels=7, out_channels=3, model_channels=32, channel_mult=(1, 2),
                           attention_resolutions=(2,), num_res_blocks=1, num_heads=2, context_dim=32))
    for p in unet.parameters():
        torch.nn.init.normal_(p, 0, 0.05)
    text = build_text_encoder(sd14_text_config(hidden_size=32, num_hidden_layers=1, num_attention_heads=1,
                                               intermediate_size=64))
    save_jedi(str(path), unet, text, None, resolution=32, diffusion={"prediction": "eps"}, steps=3, guidance=2.0)
    return str(path)


def test_benchmark_end_to_end_is_deterministic(tmp_path, capsys):
    ckpt = tiny_pixel_ckpt(tmp_path / "tiny.safetensors")
    args = ["--ckpt", ckpt, "--subjects", "2", "--targets", "2", "--steps", "2", "--threads", "1"]
    assert tb.main(args + ["--out", str(tmp_path / "a.md")]) == 0
    assert tb.main(args + ["--out", str(tmp_path / "b.md")]) == 0
    a, b = ((tmp_path / f"{n}.md").read_text() for n in "ab")
    first_cells = [line.split("|")[1].strip(" *") for line in a.splitlines() if line.startswith("| ")]
    labels = [label for _, label, *_ in tb.conditions(2.0) + tb.CALIBRATION]
    assert len(labels) == 6 and all(first_cells.count(label) == 2 for label in labels), first_cells  # both tables
    assert "--subjects 2" in a and "2 held-out subjects x 2 target contexts" in a and "λ = 2" in a  # ckpt default
    assert "Issue 7 targets" in a and capsys.readouterr().out.count("# Toy benchmark") == 2
    counts = [line for line in a.splitlines() if line.startswith(tuple(f"| {c} |" for c in tc.HEADS["shape"]))]
    assert len(counts) == 6 and sum(int(v) for line in counts for v in line.strip("| ").split(" | ")[1:]) == 4

    def numbers(text):  # everything but the date/runtime line and the output name
        return [line for line in text.splitlines() if not line.startswith(("- date", "Command", "- examples"))]

    assert numbers(a) == numbers(b)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()  # the very same images
    upper = next(line for line in a.splitlines() if tb.CALIBRATION[0][1] in line)
    assert upper.split("|")[4].strip().startswith(("1.000", "0.9"))  # the generator's own renders read correctly
    # each generated condition's subject fidelity and text alignment, by hand from the images in the example grid
    # (rows: subjects; groups: 3 references, then 1 ref, 3 refs, no image guidance, text only; 1 px border, 4 px
    # between groups, drawn 2x): the classifier's reading against the subject's attributes and the targets' contexts
    classifier, _ = tc.load(tc.WEIGHTS)
    grid = np.asarray(Image.open(tmp_path / "a.png"))[::2, ::2]  # undo the 2x nearest zoom
    table = {cells[0].strip(" *"): cells for cells in ([c.strip() for c in line.strip("|").split("|")]
                                                        for line in a.split("Subject fidelity")[0].splitlines()
                                                        if line.startswith("| "))}
    for g, (key, label, _, _) in enumerate(tb.conditions(2.0)):
        fidelity, text = [], []
        for i, subject in enumerate(tb.heldout_order()[:2]):
            contexts = tb.make_case(i, subject, targets=2, num_sets=1, resolution=32, seed=0)["contexts"]
            left = 3 * 34 + 4 + g * (2 * 34 + 4)
            tiles = [grid[34 * i + 1:34 * i + 33, left + 34 * j + 1:left + 34 * j + 33] for j in range(2)]
            read = tc.predict(classifier, torch.tensor(np.stack(tiles)).permute(0, 3, 1, 2).float() / 127.5 - 1)
            fidelity.append(np.mean([[tc.HEADS[h][int(read[h][j])] == subject.attrs()[h] for h in tc.SUBJECT_HEADS]
                                     for j in range(2)]))
            text.append(np.mean([[tc.HEADS["background"][int(read["background"][j])] == contexts[j][0],
                                  tc.HEADS["position"][int(read["position"][j])] == contexts[j][1]] for j in range(2)]))
        cells = table[label]
        assert float(cells[3].split(" ± ")[0]) == pytest.approx(np.mean(fidelity), abs=6e-4), (label, fidelity)
        assert float(cells[6].split(" ± ")[0]) == pytest.approx(np.mean(text), abs=6e-4), (label, text)


def test_refgain_subject_masks_and_table():
    """toy/refgain.py: the subject mask is the subject (not the scene), and on the shipped model the table
    is finite with the subject's pixels carrying far more than their share of the loss."""
    from toy import refgain as rg
    from model.loading import load_jedi

    subject = dp.Subject("square", "blue", "stripes", "white")
    pose = dict(angle=0.0, radius=0.2, x=0.5, y=0.55)
    _, info = dp.render(subject, ("grass", "middle"), resolution=32, rng=0, pose=pose)
    m = rg.subject_mask(subject, info, 32)
    ys, xs = np.nonzero(m)
    assert 0.06 < m.mean() < 0.2 and abs(xs.mean() / 32 - 0.5) < 0.05 and abs(ys.mean() / 32 - 0.55) < 0.05
    model = load_jedi(rg.DEFAULT_CKPT)
    rows = rg.refgain_table(model, num_sets=4, timesteps=(500, 900))
    assert [r["t"] for r in rows] == [500, 900]
    # the whole-image gain at each t is train.py's (model.diffusion.reference_gain_sums) on the same sets, captions
    # and noise draws: the subject/scene split only divides it
    from model.diffusion import Diffusion, reference_gain_sums

    x0, captions, _ = rg.held_out_pairs(4, 32, seed=5)
    with torch.no_grad():
        context = model.encode_text(captions)
    g = torch.Generator().manual_seed(5)
    for r in rows:
        own, other = reference_gain_sums(model.unet, Diffusion(**model.meta["diffusion"]), x0, context, g,
                                         timesteps=(r["t"],)).tolist()
        assert r["gain"] == pytest.approx(1 - own / other, abs=1e-5), r
    for r in rows:
        assert all(np.isfinite(v) for v in r.values())
        assert r["subject_loss_share"] > 2 * r["subject_pixels"]
        # a reference tells the subject, not the new image's scene: the scene's loss barely moves (measured 0.4% at
        # t = 500, 3.5% at 900; another image's subject mask puts the subject in the "scene": 8% and 39%)
        assert abs(1 - r["scene_own"] / r["scene_other"]) < 0.1 and r["subject_gain"] > 0.15, r


def test_trajectory_tool_records_every_step(tmp_path):
    import sample
    from toy import trajectory as tt

    model = sample.load_model(tiny_pixel_ckpt(tmp_path / "tiny.safetensors"))
    record = tt.trajectory(model, tt.PROMPTS[:2], steps=4, guidance=2.0, seed=3)
    assert [t for t, _ in record] == [751, 501, 251, 1] and record[0][1].shape == (2, 3, 32, 32)
    assert all(torch.isfinite(x0).all() for _, x0 in record)
    again = tt.trajectory(model, tt.PROMPTS[:2], steps=4, guidance=2.0, seed=3)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(record, again))  # seeded
    # oracle: the x0 that personalize (the sampler sample.py runs) predicts at each step of the same text-only DDIM
    # run, one prompt (a set of 1), the same seed and guidance
    from model.diffusion import personalize

    prompt, seen, real = "a toy on the beach, on the left", [], model.diffusion.to_eps_x0
    model.diffusion.to_eps_x0 = lambda x, t, out: seen.append((int(t[0]), real(x, t, out)[1])) or real(x, t, out)
    personalize(model.unet, model.diffusion, refs=None, context=model.encode_text([prompt]),
                null_context=model.encode_text([""]), num_new=1, steps=4, guidance=2.0, sampler="ddim",
                generator=torch.Generator().manual_seed(3), latent_shape=(3, 32, 32))
    del model.diffusion.to_eps_x0
    record = tt.trajectory(model, [prompt], steps=4, guidance=2.0, seed=3)
    assert [t for t, _ in record] == [t for t, _ in seen]
    for (t, x0), (_, want) in zip(record, seen):
        torch.testing.assert_close(x0, want, rtol=0, atol=1e-5, msg=f"t = {t}")
    # the CLI's grid: one row per prompt, a column per --every-th step, each the x0 there as 8-bit pixels
    out = tmp_path / "t.png"
    assert tt.main(["--ckpt", str(tmp_path / "tiny.safetensors"), "--steps", "4", "--every", "2", "--scale", "1",
                    "--guidance", "2", "--seed", "3", "--prompt", prompt, "--out", str(out)]) == 0
    grid = np.asarray(Image.open(out))
    assert grid.shape == (32, 2 * 32, 3)  # 2 of the 4 steps, one prompt
    for j, (_, x0) in enumerate(record[::2]):
        want = ((x0[0].clamp(-1, 1).permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255)
        assert np.abs(grid[:, 32 * j:32 * (j + 1)] - want).max() <= 1, j
