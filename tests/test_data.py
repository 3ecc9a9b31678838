"""data.py and data_procedural.py: readers on tiny files written here, mixing, bucketing, sharding,
resume, bad samples, and the procedural generator's guarantees (held-out subjects, no attribute leaks)."""
import io
import json
import os
import pickle
import re
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import data
import data_procedural as P

RES = 16


def color(i, j=0):
    """A colour that identifies image j of set i after resizing and JPEG."""
    return (20 + 12 * (i % 18), 20 + 45 * j, 200 - 60 * (i // 18))


def identify(img, n_sets, max_images=4):
    """(set, image) of a (3, H, W) tensor in [-1, 1] that was a solid colour(i, j)."""
    rgb = ((img.mean(dim=(1, 2)) + 1) * 127.5).numpy()
    table = [(i, j) for i in range(n_sets) for j in range(max_images)]
    d = [np.abs(rgb - np.array(color(i, j))).sum() for i, j in table]
    assert min(d) < 12, f"not a known colour: {rgb}"
    return table[int(np.argmin(d))]


def save(path, rgb, size=(24, 20), fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, rgb).save(path, format=fmt, quality=95)


def write_manifest(root, sizes, per_image_captions=False):
    lines = []
    for i, n in enumerate(sizes):
        paths = [f"s{i}/{j}.jpg" for j in range(n)]
        for j, p in enumerate(paths):
            save(os.path.join(root, p), color(i, j))
        rec = {"images": paths}
        if per_image_captions:
            rec["captions"] = [f"set {i} image {j}" for j in range(n)]
        else:
            rec["caption"] = f"set {i}"
        lines.append(json.dumps(rec))
    path = os.path.join(root, "sets.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def take(loader, n):
    return [next(loader) for _ in range(n)]


# ----------------------------------------------------------------------------- procedural generator

def test_procedural_split_deterministic_and_complete():
    train, held, every = P.subjects("train"), P.subjects("heldout"), P.all_subjects()
    assert len(set(every)) == len(every) and set(train) | set(held) == set(every)
    assert not set(train) & set(held) and len(held) >= 20
    for attr, values in P.ATTRIBUTES.items():  # held-out subjects are new combinations of seen values
        assert {s.attrs()[attr] for s in train} == set(values)
    s, ctx = train[5], ("beach", "left")
    a, info = P.render(s, ctx, resolution=32, rng=3)
    b, _ = P.render(s, ctx, resolution=32, rng=3)
    c, _ = P.render(s, ctx, resolution=32, rng=4)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8 and np.array_equal(a, b) and not np.array_equal(a, c)
    assert info["subject"] == s.id and info["background"] == "beach" and info["position"] == "left"
    assert {k: info[k] for k in P.ATTRIBUTES} == s.attrs() and P.Subject.from_id(s.id) == s
    assert pickle.loads(pickle.dumps(s)) == s  # DataLoader workers under 'spawn' pickle subjects
    big, _ = P.render(s, ctx, resolution=64, rng=3)
    assert big.shape == (64, 64, 3)
    # the subject changes the pixels, the same pose and context otherwise
    pose = P.sample_pose("middle", np.random.default_rng(0))
    x1, _ = P.render(P.Subject("circle", "red", "solid"), ("snow", "middle"), rng=1, pose=pose)
    x2, _ = P.render(P.Subject("circle", "blue", "solid"), ("snow", "middle"), rng=1, pose=pose)
    assert np.abs(x1.astype(int) - x2).sum() > 1000


def test_captions_never_leak_subject_attributes():
    rng = np.random.default_rng(0)
    subs = P.subjects("all")
    for i in range(300):
        _, caps, attrs = P.render_set(subs[i % len(subs)], 2, resolution=8, rng=rng)
        for cap, a in zip(caps, attrs):
            words = set(re.findall(r"[a-z]+", cap.lower()))
            assert not words & P.ATTRIBUTE_WORDS, cap
            assert P.CLASS_WORD in words and P.BACKGROUNDS[a["background"]] in cap and P.POSITIONS[a["position"]] in cap


def test_heldout_subjects_never_in_training_batches():
    held = {s.id for s in P.subjects("heldout")}
    loader = data.build_loader("procedural", resolution=8, images_per_batch=12, seed=1)
    seen = set()
    for b in take(loader, 40):
        for key, attrs in zip(b["keys"], b["attrs"]):
            assert {a["subject"] for a in attrs} == {key}  # one subject per set
            seen.add(key)
        assert b["pixels"].shape[1] == b["set_size"] and b["pixels"].shape[0] == 12 // b["set_size"]
    assert not seen & held and len(seen) > 100
    hb = next(data.build_loader("procedural-heldout", resolution=8, images_per_batch=12))
    assert set(hb["keys"]) <= held


def test_procedural_same_pose_and_video_sets():
    """same_pose keeps one position and pose per set (backgrounds vary); video keeps one scene, details included,
    while the subject moves. Their shares are source options; 0 leaves the default spec's random streams as they were."""
    subject = P.subjects("train")[3]
    _, caps, attrs = P.render_set(subject, 4, resolution=8, rng=2, same_pose=True)
    assert len({a["position"] for a in attrs}) == 1 and len({a["background"] for a in attrs}) > 1
    assert len({(a["angle"], a["radius"], a["x"], a["y"]) for a in attrs}) == 1
    with pytest.raises(ValueError, match="one position"):
        P.render_set(subject, 2, rng=0, same_pose=True, contexts=[("beach", "left"), ("snow", "right")])
    # video: the pixels far from both subjects are the same scene (night: its moon and stars are random details)
    ims, _, attrs = P.render_set(subject, 2, resolution=32, rng=0, video=True, contexts=[("night", "left")] * 2)
    assert attrs[0]["x"] != attrs[1]["x"]
    assert np.array_equal(ims[0][:4], ims[1][:4])  # the top rows: sky, moon and stars, never the subject
    other, _ = P.render(subject, ("night", "left"), resolution=32, rng=99)
    assert not np.array_equal(ims[0][:4], other[:4])  # a fresh night scene differs
    with pytest.raises(ValueError, match="one background"):
        P.render_set(subject, 2, rng=0, video=True, contexts=[("beach", "left"), ("snow", "left")])
    assert data.parse_spec("procedural?same_pose=0.25&video=0.5") == [
        {"type": "procedural", "split": "train", "same_pose": 0.25, "video": 0.5}]
    with pytest.raises(ValueError, match="unknown procedural option"):
        data.parse_spec("procedural?pose=1")
    with pytest.raises(ValueError, match="sum <= 1"):
        data.build_loader("procedural?video=0.7&same_pose=0.5", resolution=8, images_per_batch=12)
    posed = lambda b: [len({(a["x"], a["angle"]) for a in s}) == 1 for s in b["attrs"]]  # noqa: E731
    scene = lambda b: [len({a["background"] for a in s}) == 1 for s in b["attrs"]]  # noqa: E731
    assert all(posed(next(data.build_loader("procedural?same_pose=1", resolution=8, images_per_batch=12, seed=1))))
    vid = next(data.build_loader("procedural?video=1", resolution=8, images_per_batch=12, seed=1))
    assert all(scene(vid)) and not any(posed(vid))
    some = take(data.build_loader("procedural?same_pose=0.5", resolution=8, images_per_batch=12, seed=1), 6)
    assert 0.2 < np.mean([x for b in some for x in posed(b)]) < 0.8
    plain = next(data.build_loader("procedural", resolution=8, images_per_batch=12, seed=1))
    zero = next(data.build_loader("procedural?video=0", resolution=8, images_per_batch=12, seed=1))
    assert torch.equal(plain["pixels"], zero["pixels"]) and not any(posed(plain))


def test_procedural_closeups():
    """closeup: each randomly placed image is, with that probability, the subject large and centred with a
    'close up' caption; the spec option of the same name; 0 leaves the default random streams as they were."""
    subject = P.subjects("train")[5]
    ims, caps, attrs = P.render_set(subject, 6, resolution=32, rng=0, closeup=1.0)
    assert all(a["position"] == P.CLOSE_UP and a["radius"] > 0.35 for a in attrs)
    assert all("close up" in c and not set(c.replace(",", " ").split()) & P.ATTRIBUTE_WORDS for c in caps)
    framed, _ = P.render(subject, ("beach", "middle"), resolution=32, rng=0)
    subject_pixels = lambda im, bg: (np.abs(im.astype(int) - bg.astype(int)).sum(-1) > 40).mean()  # noqa: E731
    empty, _ = P.render(P.Subject("circle", "red", "solid"), ("beach", "middle"), resolution=32, rng=0,
                        pose=dict(angle=0, radius=1e-3, x=5.0, y=5.0))  # the scene alone (subject off frame)
    close, _ = P.render(subject, ("beach", P.CLOSE_UP), resolution=32, rng=0)
    assert subject_pixels(close, empty) > 2 * subject_pixels(framed, empty)
    assert P.CLOSE_UP not in P.POSITIONS and all(c[1] != P.CLOSE_UP for c in P.CONTEXTS)  # classifier's 3 positions
    with pytest.raises(ValueError, match="closeup"):
        P.render_set(subject, 2, rng=0, closeup=0.5, same_pose=True)
    with pytest.raises(ValueError, match="probability"):
        data.build_loader("procedural?closeup=1.5", resolution=8, images_per_batch=12)
    assert data.parse_spec("procedural-heldout?closeup=0.25") == [
        {"type": "procedural", "split": "heldout", "closeup": 0.25}]
    some = take(data.build_loader("procedural?closeup=0.5", resolution=8, images_per_batch=12, seed=1), 4)
    share = np.mean([a["position"] == P.CLOSE_UP for b in some for s in b["attrs"] for a in s])
    assert 0.25 < share < 0.75
    plain = next(data.build_loader("procedural", resolution=8, images_per_batch=12, seed=1))
    zero = next(data.build_loader("procedural?closeup=0", resolution=8, images_per_batch=12, seed=1))
    assert torch.equal(plain["pixels"], zero["pixels"])


# ----------------------------------------------------------------------------- readers

@pytest.mark.parametrize("per_image", [False, True])
def test_manifest_sets(tmp_path, per_image):
    path = write_manifest(str(tmp_path), [2, 3, 4, 4, 3, 2], per_image)
    loader = data.build_loader([{"type": "sets", "path": path}], resolution=RES, images_per_batch=12, seed=0)
    sizes = Counter()
    for b in take(loader, 12):
        N = b["set_size"]
        assert b["pixels"].shape == (12 // N, N, 3, RES, RES)
        assert b["pixels"].min() >= -1 and b["pixels"].max() <= 1
        for px, caps in zip(b["pixels"], b["captions"]):
            ids = [identify(im, 6) for im in px]
            assert len({i for i, _ in ids}) == 1 and len(set(ids)) == N  # N distinct images of one set
            want = [f"set {i} image {j}" if per_image else f"set {i}" for i, j in ids]
            assert caps == want
        sizes[N] += 1
    assert set(sizes) <= {2, 3, 4} and len(sizes) >= 2


def test_video_frame_folders(tmp_path):
    for c in range(3):
        for t in range(8):
            save(str(tmp_path / f"clip{c}" / f"{t:03d}.png"), color(c, 0)[:1] + (20 + 25 * t, 99))
        (tmp_path / f"clip{c}" / "caption.txt").write_text(f"clip {c}\n")
    loader = data.build_loader([{"type": "video", "path": str(tmp_path)}], resolution=RES, images_per_batch=8)
    for b in take(loader, 6):
        N = b["set_size"]
        for px, caps in zip(b["pixels"], b["captions"]):
            t = [round((((im[1].mean() + 1) * 127.5).item() - 20) / 25) for im in px]
            assert t == sorted(set(t)) and len(t) == N  # distinct frames in time order
            assert t[-1] - t[0] >= 8 // N  # spread over the clip
            assert len(set(caps)) == 1 and caps[0].startswith("clip ")


def _write_video(path, n_frames):
    av = pytest.importorskip("av")
    with av.open(path, "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for t in range(n_frames):
            arr = np.full((32, 32, 3), 20 + 18 * t, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_video_files(tmp_path):
    _write_video(str(tmp_path / "a.mp4"), 12)
    (tmp_path / "a.txt").write_text("a ball rolling")
    loader = data.build_loader([{"type": "video", "path": str(tmp_path)}], resolution=RES, images_per_batch=4)
    for b in take(loader, 3):
        for px, caps in zip(b["pixels"], b["captions"]):
            level = [((im.mean() + 1) * 127.5).item() for im in px]
            assert level == sorted(level) and len(set(np.round(level))) == len(level)
            assert caps == ["a ball rolling"] * b["set_size"]


def test_video_files_without_pyav_give_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "a.mp4").write_bytes(b"\0" * 10)
    (tmp_path / "a.txt").write_text("x")
    monkeypatch.setitem(sys.modules, "av", None)  # import av -> ImportError
    with pytest.raises(RuntimeError, match="PyAV"):
        data.build_loader([{"type": "video", "path": str(tmp_path)}], resolution=RES, images_per_batch=4)


def test_multiview_renders_with_alpha(tmp_path):
    for a in range(2):
        for v in range(5):
            img = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # transparent background
            img.paste((200, 30 + 40 * v, 30 * a, 255), (8, 8, 24, 24))
            os.makedirs(tmp_path / f"asset{a}", exist_ok=True)
            img.save(tmp_path / f"asset{a}" / f"view{v}.png")
        (tmp_path / f"asset{a}" / "caption.txt").write_text(f"asset {a}")
    loader = data.build_loader([{"type": "multiview", "path": str(tmp_path)}], resolution=RES, images_per_batch=12)
    for b in take(loader, 4):
        for px, caps in zip(b["pixels"], b["captions"]):
            assert torch.allclose(px[:, :, 0, 0], torch.ones(px.shape[0], 3))  # composited on white
            greens = {round(((im[1, 8, 8] + 1) * 127.5).item()) for im in px}
            assert len(greens) == b["set_size"]  # distinct views
            a = int(caps[0].split()[-1])
            assert all(abs(((im[2, 8, 8] + 1) * 127.5).item() - 30 * a) < 3 for im in px)


def test_single_images_folder_and_manifest(tmp_path):
    lines = []
    for i in range(5):
        save(str(tmp_path / f"im{i}.jpg"), color(i))
        (tmp_path / f"im{i}.txt").write_text(f"image {i}")
        lines.append(json.dumps({"image": f"im{i}.jpg", "caption": f"image {i}"}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines))
    for path in (str(tmp_path), str(tmp_path / "pairs.jsonl")):
        b = next(data.build_loader([{"type": "images", "path": path}], resolution=RES, images_per_batch=12))
        assert b["set_size"] == 1 and b["pixels"].shape == (12, 1, 3, RES, RES)
        for px, caps in zip(b["pixels"], b["captions"]):
            assert caps == [f"image {identify(px[0], 5)[0]}"]


def _png_bytes(rgb):
    buf = io.BytesIO()
    Image.new("RGB", (20, 24), rgb).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(root, n_shards, per_shard, sets, corrupt=()):
    wds = pytest.importorskip("webdataset")
    urls = []
    for s in range(n_shards):
        url = os.path.join(root, f"{'sets' if sets else 'img'}-{s:03d}.tar")
        with wds.TarWriter(url) as w:
            for k in range(per_shard):
                i = s * per_shard + k
                sample = {"__key__": f"{i:05d}"}
                if sets:
                    for j in range(2 + i % 3):
                        sample[f"{j}.png"] = b"garbage" if (i, j) in corrupt else _png_bytes(color(i, j))
                        if s % 2:
                            sample[f"{j}.txt"] = f"set {i} image {j}"
                    if not s % 2:
                        sample["txt"] = f"set {i}"
                else:
                    sample["png"] = b"garbage" if i in corrupt else _png_bytes(color(i))
                    sample["txt"] = f"image {i}"
                w.write(sample)
        urls.append(url)
    return os.path.join(root, f"{'sets' if sets else 'img'}-{{000..{n_shards - 1:03d}}}.tar")


def test_webdataset_single_images_and_sets(tmp_path):
    singles = write_shards(str(tmp_path), 2, 6, sets=False)
    sets = write_shards(str(tmp_path), 3, 6, sets=True)  # 18 sets of 2-4 images
    spec = [{"type": "images", "path": singles}, {"type": "sets", "path": sets}]
    loader = data.build_loader(spec, resolution=RES, images_per_batch=12, seed=2)
    kinds = Counter()
    for b in take(loader, 16):
        N = b["set_size"]
        for px, caps, src in zip(b["pixels"], b["captions"], b["sources"]):
            ids = [identify(im, 18) for im in px]
            if N == 1:
                assert src == "images0" and caps == [f"image {ids[0][0]}"]
            else:
                i = ids[0][0]
                assert src == "sets1" and {a for a, _ in ids} == {i} and len(set(ids)) == N
                assert caps == ([f"set {i} image {j}" for _, j in ids] if (i // 6) % 2 else [f"set {i}"] * N)
        kinds[N] += 1
    assert kinds[1] > 0 and sum(kinds[n] for n in (2, 3, 4)) > 0
    assert loader.counts().get("skipped_too_small", 0) > 0  # 2-image sets passed over for N = 3, 4
    assert loader.num_bad == 0


def test_shard_cli_roundtrip(tmp_path, capsys):
    """data.py shard: every set of the manifest in the shards (read here with tarfile), each image's file byte for
    byte with its caption; single images in the layout the images reader takes; the loader reads both back."""
    import tarfile

    pytest.importorskip("webdataset")
    path = write_manifest(str(tmp_path / "m"), [2, 3, 4], per_image_captions=True)
    assert data.main(["shard", path, str(tmp_path / "out" / "s-%03d.tar"), "--maxcount", "2"]) == 0
    members = {}
    for shard in ("s-000.tar", "s-001.tar"):
        with tarfile.open(tmp_path / "out" / shard) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    want = {}
    for i, line in enumerate(open(path)):
        rec = json.loads(line)
        for j, (p, cap) in enumerate(zip(rec["images"], rec["captions"])):
            want[f"{i:09d}.{j}.jpg"] = open(tmp_path / "m" / p, "rb").read()
            want[f"{i:09d}.{j}.txt"] = cap.encode()
    assert members == want
    spec = [{"type": "sets", "path": str(tmp_path / "out" / "s-{000..001}.tar"), "set_sizes": [2]}]
    b = next(data.build_loader(spec, resolution=RES, images_per_batch=6))
    for px, caps in zip(b["pixels"], b["captions"]):
        assert caps == [f"set {i} image {j}" for i, j in (identify(im, 3) for im in px)]
    # single images: {KEY.png, KEY.txt}, read back by the images reader, every one
    lines = []
    for i in range(4):
        save(str(tmp_path / "s" / f"im{i}.png"), color(i), fmt="PNG")
        lines.append(json.dumps({"image": f"im{i}.png", "caption": f"image {i}"}))
    (tmp_path / "s" / "singles.jsonl").write_text("\n".join(lines) + "\n")
    assert data.main(["shard", str(tmp_path / "s" / "singles.jsonl"), str(tmp_path / "one" / "i-%03d.tar")]) == 0
    with tarfile.open(tmp_path / "one" / "i-000.tar") as tar:
        assert tar.getnames() == [f"{i:09d}.{e}" for i in range(4) for e in ("png", "txt")]
    b = next(data.build_loader([{"type": "images", "path": str(tmp_path / "one" / "i-000.tar")}], resolution=RES,
                               images_per_batch=4))
    assert sorted((identify(px[0], 4)[0], caps[0]) for px, caps in zip(b["pixels"], b["captions"])) == \
        [(i, f"image {i}") for i in range(4)]
    # an image the shard readers would skip (they decode jpg/jpeg/png/webp) is refused before anything is written
    save(str(tmp_path / "s" / "im9.tif"), color(9), fmt="TIFF")
    (tmp_path / "s" / "tif.jsonl").write_text(json.dumps({"images": ["im0.png", "im9.tif"], "caption": "x"}) + "\n")
    capsys.readouterr()
    assert data.main(["shard", str(tmp_path / "s" / "tif.jsonl"), str(tmp_path / "never" / "t-%03d.tar")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "im9.tif" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "never").exists()
    # so are a missing image file and a record without a caption (they used to fail half-way, a tar written)
    for rec, expected in (({"images": ["im0.png", "gone.png"], "caption": "x"}, "gone.png"),
                          ({"images": ["im0.png", "im1.png"]}, "no caption")):
        (tmp_path / "s" / "bad.jsonl").write_text(json.dumps(rec) + "\n")
        assert data.main(["shard", str(tmp_path / "s" / "bad.jsonl"), str(tmp_path / "never" / "t-%03d.tar")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and expected in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "never").exists()


# ----------------------------------------------------------------------------- mixing, bucketing, sharding

class _Fake:
    streaming = False

    def __init__(self, weight, set_sizes):
        self.weight, self.set_sizes, self.sizes, self.name = weight, set_sizes, np.full(4, 9), "fake"


def test_mixture_proportions_and_set_size_distribution():
    sources = [_Fake(1.0, (2, 3, 4)), _Fake(2.0, (2, 3, 4)), _Fake(1.0, (1,))]
    plan = data.Plan(sources, images_per_batch=12, seed=0, rank=0)
    per_source, per_size, images = Counter(), Counter(), Counter()
    for step in range(4000):
        N, ks = plan(step)
        images[N * len(ks)] += 1
        for k in ks:
            per_source[k] += 1
            per_size[int(k), N] += 1
    assert set(images) == {12}  # 6x2, 4x3, 3x4, 12x1
    total = sum(per_source.values())
    for k, want in enumerate([0.25, 0.5, 0.25]):
        got = per_source[k] / total
        assert abs(got - want) < 4 * np.sqrt(want * (1 - want) / total) + 0.01, (k, got, want)
    for k in (0, 1):  # N uniform over {2, 3, 4} per set
        n_k = sum(per_size[k, n] for n in (2, 3, 4))
        for n in (2, 3, 4):
            assert abs(per_size[k, n] / n_k - 1 / 3) < 0.04, (k, n, per_size[k, n] / n_k)
    assert all(per_size[2, n] == 0 for n in (2, 3, 4)) and per_size[2, 1] > 0


def test_loader_follows_the_plan_and_mixes_sources(tmp_path):
    path = write_manifest(str(tmp_path), [2, 3, 4, 4])
    spec = [{"type": "sets", "path": path, "weight": 1}, {"type": "procedural", "weight": 3}]
    loader = data.build_loader(spec, resolution=8, images_per_batch=12, seed=5)
    pickle.loads(pickle.dumps(loader.dataset))  # spawn-started workers (macOS, Windows) get a pickled copy
    plan = loader.dataset.plan
    counts = Counter()
    for b in take(loader, 20):
        N, ks = plan(b["step"])
        assert b["set_size"] == N and b["sources"] == [["sets0", "procedural"][k] for k in ks]
        counts.update(b["sources"])
    assert counts["procedural"] > counts["sets0"] > 0


def test_rank_shares_disjoint_and_covering(tmp_path):
    path = write_manifest(str(tmp_path), [2] * 30)
    seen = []
    for rank in range(3):  # 10 sets per rank; one epoch = 5 steps of 2 sets
        loader = data.build_loader([{"type": "sets", "path": path, "set_sizes": [2]}], resolution=8,
                                   images_per_batch=4, rank=rank, world_size=3, seed=9)
        keys = [k for b in take(loader, 5) for k in b["keys"]]
        assert len(set(keys)) == 10  # no repeats inside an epoch
        seen.append(set(keys))
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert len(seen[0] | seen[1] | seen[2]) == 30


def test_webdataset_rank_shards_disjoint_and_covering(tmp_path):
    urls = write_shards(str(tmp_path), 4, 5, sets=False)
    seen = []
    for rank in range(2):
        loader = data.build_loader([{"type": "images", "path": urls}], resolution=8, images_per_batch=5,
                                   rank=rank, world_size=2, seed=0)
        keys = [k for b in take(loader, 2) for k in b["keys"]]  # 2 shards x 5 samples per rank
        assert len(set(keys)) == 10
        seen.append(set(keys))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 20


# ----------------------------------------------------------------------------- resume, bad samples

def _same(a, b):
    assert a["step"] == b["step"] and a["keys"] == b["keys"] and a["captions"] == b["captions"]
    assert torch.equal(a["pixels"], b["pixels"])


def test_resume_is_deterministic(tmp_path):
    path = write_manifest(str(tmp_path), [2, 3, 4, 4, 3])
    shards = write_shards(str(tmp_path), 2, 8, sets=True, corrupt={(3, 0), (9, 1)})  # skips must be replayed
    spec = [{"type": "sets", "path": path}, {"type": "sets", "path": shards}, {"type": "procedural"}]
    kw = dict(resolution=RES, images_per_batch=6, seed=4, num_workers=2)
    full = take(data.build_loader(spec, **kw), 10)
    first = data.build_loader(spec, **kw)
    take(first, 5)  # odd: the resumed workers build the other lanes' steps first
    state = json.loads(json.dumps(first.state()))  # what a checkpoint stores
    assert state["step"] == 5 and any(state["lanes"].values())
    resumed = data.build_loader(spec, state=state, **kw)
    for a, b in zip(full[5:], take(resumed, 5)):
        _same(a, b)
    # indexable sources resume from the step alone, with any number of workers
    spec = spec[:1] + spec[2:]
    full = take(data.build_loader(spec, **kw), 7)
    for a, b in zip(full[3:], take(data.build_loader(spec, start_step=3, **{**kw, "num_workers": 0}), 4)):
        _same(a, b)


def test_bad_files_are_skipped_and_counted(tmp_path):
    lines = []
    for i in range(6):
        save(str(tmp_path / f"ok{i}.jpg"), color(i))
        lines.append({"image": f"ok{i}.jpg", "caption": "good"})
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "garbage.jpg").write_bytes(b"this is not an image")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    for name in ("missing.jpg", "empty.jpg", "garbage.jpg", "truncated.jpg"):
        lines.append({"image": name, "caption": "bad"})
    text = "\n".join(json.dumps(x) for x in lines) + "\n{not json\n"
    (tmp_path / "m.jsonl").write_text(text)
    loader = data.build_loader([{"type": "images", "path": str(tmp_path / "m.jsonl")}], resolution=RES,
                               images_per_batch=10, seed=0, num_workers=2)
    for b in take(loader, 6):
        for px, caps in zip(b["pixels"], b["captions"]):
            assert caps == ["good"]
            identify(px[0], 6)
    bad = loader.bad_samples
    assert bad.get("missing", 0) > 0 and bad.get("empty", 0) > 0 and bad.get("corrupt", 0) > 0
    assert loader.num_bad == sum(bad.values()) and loader.state()["counts"] == loader.counts()
    # the validator names every bad line
    problems = data.validate_manifest(str(tmp_path / "m.jsonl"))
    assert sorted(n for n, _ in problems) == [7, 8, 9, 10, 11]
    assert data.main(["validate", str(tmp_path / "m.jsonl")]) == 1


def test_bad_webdataset_samples_skipped(tmp_path):
    urls = write_shards(str(tmp_path), 1, 6, sets=False, corrupt={1, 4})
    shard = str(tmp_path / "img-000.tar")
    with open(shard, "rb") as f:
        blob = f.read()
    with open(str(tmp_path / "img-001.tar"), "wb") as f:  # a truncated shard
        f.write(blob[: len(blob) // 2 + 100])
    spec = [{"type": "images", "path": urls.replace("000..000", "000..001")}]
    loader = data.build_loader(spec, resolution=RES, images_per_batch=6)
    for b in take(loader, 3):
        for px, caps in zip(b["pixels"], b["captions"]):
            i = identify(px[0], 6)[0]
            assert caps == [f"image {i}"] and i not in (1, 4)
    assert loader.bad_samples.get("corrupt", 0) >= 2


def test_a_source_of_only_bad_files_stops_with_a_clear_error(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "nope.jpg", "caption": "x"}) + "\n")
    loader = data.build_loader([{"type": "images", "path": str(tmp_path / "m.jsonl")}], resolution=8,
                               images_per_batch=2)
    with pytest.raises(RuntimeError, match="bad and 0 too-small samples in a row"):
        next(loader)


def test_cli_count_and_grid(tmp_path, capsys):
    # count: what was written, per source (a manifest, a folder of single images, WebDataset shards read through)
    path = write_manifest(str(tmp_path), [2, 3, 4, 2, 3])
    for i in range(4):
        save(str(tmp_path / "singles" / f"im{i}.jpg"), color(i))
    shards = write_shards(str(tmp_path), 3, 6, sets=True)  # 18 sets over 3 shards
    assert data.main(["count", f"sets:{path},images:{tmp_path / 'singles'},sets:{shards}"]) == 0
    assert capsys.readouterr().out.splitlines() == ["sets0: 5 sets", "images1: 4 images", "sets2: 18 sets"]
    out = str(tmp_path / "grid.png")
    assert data.main(["grid", "procedural", "--out", out, "--sets", "3", "--resolution", "16", "--seed", "2"]) == 0
    printed = capsys.readouterr().out.splitlines()
    # row i is the loader's set i (seed 2): its images left to right on grey, and its captions printed
    sets = [(px, caps) for b in take(data.build_loader("procedural", resolution=16, images_per_batch=12, seed=2), 2)
            for px, caps in zip(b["pixels"], b["captions"])][:3]
    grid = np.asarray(Image.open(out))
    assert grid.shape == (3 * 16, 16 * max(len(px) for px, _ in sets), 3)
    for i, (px, caps) in enumerate(sets):
        for j in range(grid.shape[1] // 16):
            tile = grid[16 * i:16 * (i + 1), 16 * j:16 * (j + 1)]
            want = ((px[j].permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).byte().numpy() if j < len(px) else 128
            assert (tile == want).all(), (i, j)
        assert printed[i] == f"row {i}: " + " | ".join(caps)
    assert data.parse_spec("sets:a.jsonl@2,procedural") == [
        {"type": "sets", "path": "a.jsonl", "weight": 2.0}, {"type": "procedural", "split": "train"}]


def test_flip_policies(tmp_path):
    """flip='set' (the default) mirrors each set whole, half of the sets; 'image' mirrors each image on its own coin;
    'none' never. A flip is the exact horizontal mirror of the unflipped image."""
    lines = []
    for i in range(4):  # left half dark, right half bright: a flip is visible
        paths = []
        for j in range(4):
            arr = np.zeros((16, 32, 3), np.uint8)
            arr[:, 16:] = 255
            Image.fromarray(arr).save(tmp_path / f"{i}_{j}.png")
            paths.append(f"{i}_{j}.png")
        lines.append(json.dumps({"images": paths, "caption": "x"}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines))
    spec = [{"type": "sets", "path": str(tmp_path / "m.jsonl"), "set_sizes": [4]}]
    plain = next(data.build_loader(spec, resolution=8, images_per_batch=8, flip="none"))["pixels"][0, 0]
    flipped, mixed = {}, {}
    for flip in ("none", "set", "image", None):  # None: build_loader's default
        kw = {} if flip is None else {"flip": flip}
        rows = []
        for b in take(data.build_loader(spec, resolution=8, images_per_batch=8, seed=3, **kw), 32):  # 64 sets
            for px in b["pixels"]:  # (N, 3, H, W)
                row = [bool(torch.equal(im, plain.flip(-1))) for im in px]
                assert all(r or torch.equal(im, plain) for r, im in zip(row, px))  # mirrored or untouched
                rows.append(row)
        rows = np.array(rows)  # (sets, N)
        flipped[flip], mixed[flip] = rows.mean(), np.mean([len(set(r)) > 1 for r in rows])
    assert flipped["none"] == 0
    assert 0.25 < flipped["set"] < 0.75 and mixed["set"] == 0  # half of the sets, each whole
    assert flipped[None] == flipped["set"] and mixed[None] == 0  # the default is 'set'
    assert 0.3 < flipped["image"] < 0.7 and mixed["image"] > 0.5  # 1 - 2/16 of the sets mix, in expectation
