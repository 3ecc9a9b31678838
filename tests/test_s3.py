"""s3.py, the S³ data engine, on CPU with tiny random models (tests/tiny_weights.py): every stage end to end, the
manifest train.py reads, SIGKILL + rerun, two ranks under torchrun, the filter on controlled inputs, bad input."""
import hashlib
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data
import data_procedural as dp
import s3
import tiny_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
# Tiny sizes; thresholds wide open, since random Grounding-DINO / SAM / CLIP find and score noise.
TINY = dict(num_objects=4, prompts_per_object=2, collage_resolution=32, collage_steps=2, canvas=32, inpaint_steps=2,
            ip2p_steps=2, box_threshold=0.0, text_threshold=0.0, min_area=0.0, max_area=1.0, border=-1,
            max_overlap=1.0, min_similarity=-1.0, batch_size=2, num_heads=2, shard_size=5)


def main(argv):
    importlib.reload(s3)  # the config lives in module globals: start from the defaults
    return s3.main(argv)


def tree(root) -> dict:
    """{relative path: sha256} of every file under root."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process runs use the subprocesses' one thread (ENV): float sums over another thread count differ in the
    last bits, which a random detector near its threshold turns into other boxes, and the trees would differ."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    d = tmp_path_factory.mktemp("s3")
    w = tiny_weights.all_weights(str(d / "weights"))
    cfg = d / "s3_tiny.py"
    cfg.write_text("".join(f"{k} = {v!r}\n" for k, v in {**w, **TINY}.items()))
    ref = str(d / "ref")
    t = time.perf_counter()
    assert main(["all", str(cfg), "--manifest", ref]) == 0
    print(f"tiny end-to-end run: {time.perf_counter() - t:.1f} s")
    return {"dir": d, "cfg": str(cfg), "ref": ref}


# ----------------------------------------------------------------------------- end to end

def test_every_stage_end_to_end(tiny):
    ref = tiny["ref"]
    sets = [json.loads(line) for line in open(os.path.join(ref, "sets.jsonl"))]
    stats = json.load(open(os.path.join(ref, "stats.json")))
    assert len(sets) == stats["write"]["sets"] == stats["filter"]["sets_kept"] == 8  # 4 objects x 2 prompts
    assert stats["prompts"] == {"objects": 4, "prompts": 8}
    assert stats["stylize"]["styled"] + stats["stylize"]["unstyled"] == 8
    assert 0 < stats["stylize"]["styled"] < 8  # p = 0.5 over 8 sets (seeded: fixed for this seed)
    for s in sets:
        assert 2 <= len(s["images"]) <= 4 and len(s["captions"]) == len(s["images"])
        assert s["object"] in s["captions"][0]
        for p in s["images"]:
            assert Image.open(os.path.join(ref, p)).size == (32, 32)
        rec = json.load(open(os.path.join(ref, "stylize", s["id"] + ".json")))
        if rec["instruction"]:  # one instruction for the whole set, and the captions say so
            assert all(p.startswith("stylize/") for p in s["images"])
            suffix = dict(s3.STYLES)[rec["instruction"]]
            assert all(c.endswith(suffix) for c in s["captions"])
        else:
            assert all(p.startswith("backgrounds/") for p in s["images"])
    # one contact sheet and one data.py-readable JSONL per output shard (5 sets each)
    assert sorted(os.listdir(os.path.join(ref, "sets"))) == [".settings.json"] + [
        f"shard-0000{i}.{e}" for i in (0, 1) for e in ("jsonl", "png")]
    for f in ("sets.jsonl", "sets/shard-00000.jsonl", "sets/shard-00001.jsonl"):
        assert data.validate_manifest(os.path.join(ref, f)) == []
    # the shards are sets.jsonl cut in order into 5 + 3, each set once (their paths relative to sets/)
    shard_sets = [json.loads(line) for f in ("shard-00000.jsonl", "shard-00001.jsonl")
                  for line in open(os.path.join(ref, "sets", f))]
    assert [{**s, "images": [p[3:] for p in s["images"]]} for s in shard_sets] == sets
    assert all(p.startswith("../") for s in shard_sets for p in s["images"])
    assert stats["write"] == {"sets": 8, "images": sum(len(s["images"]) for s in sets), "shards": 2}
    assert all(s["caption"] == s["captions"][0] for s in sets) and len({s["id"] for s in sets}) == 8
    assert not [p for p in tree(ref) if p.endswith(".tmp")]
    check_subject_kept(ref)  # random SAM masks: few pixels are fully opaque, the real check is below


def check_subject_kept(root) -> int:
    """Every pasted instance's fully opaque pixels are exactly the instance's (resized) pixels, and the background
    around them was painted. -> number of images checked."""
    checked = 0
    for f in sorted(os.listdir(os.path.join(root, "backgrounds"))):
        if not f.endswith(".json") or f.startswith("."):  # .settings.json is not a set
            continue
        rec = json.load(open(os.path.join(root, "backgrounds", f)))
        for j, (k, box) in enumerate(zip(rec["instances"], rec["paste_boxes"])):
            rgb, alpha = s3.resized(*_cutout(root, rec["id"], k), box[2] - box[0], box[3] - box[1])
            whole = np.asarray(Image.open(os.path.join(root, rec["images"][j])))
            full = alpha == 255
            assert (whole[box[1]:box[3], box[0]:box[2]][full] == rgb[full]).all()
            outside = np.ones(whole.shape[:2], bool)
            outside[box[1]:box[3], box[0]:box[2]] = False
            assert (whole[outside] != 127).any()  # not the blank canvas any more
            checked += int(full.sum() > 0)
    return checked


def test_subject_pixels_kept_exactly_unit():
    importlib.reload(s3)
    img, m = render_pair(dp.Subject("circle", "red", "solid"), 0, None)
    canvas, alpha, box = s3.paste(Image.fromarray(img), m, np.random.default_rng(0), 64)
    generated = np.random.default_rng(1).integers(0, 256, canvas.shape, dtype=np.uint8)
    out = s3.composite(canvas, alpha, generated)
    rgb, a = s3.resized(Image.fromarray(img), m, box[2] - box[0], box[3] - box[1])
    assert (a == 255).sum() > 50 and (out[box[1]:box[3], box[0]:box[2]][a == 255] == rgb[a == 255]).all()
    assert (out[alpha == 0] == generated[alpha == 0]).all()


def _cutout(root, cid, k):
    base = os.path.join(root, "instances", cid, str(k))
    return data.load_image(base + ".png"), s3.read_mask(base + ".mask.png")


def test_manifest_trains(tiny, tmp_path):
    """data.py loads the final manifest and train.py runs a few steps on it."""
    manifest = os.path.join(tiny["ref"], "sets.jsonl")
    sets = [json.loads(line) for line in open(manifest)]
    loader = data.build_loader("sets:" + manifest, resolution=16, images_per_batch=4, set_sizes=(2,))
    for batch in (next(loader), next(loader)):
        assert batch["pixels"].shape == (2, 2, 3, 16, 16)
        for key, px, caps in zip(batch["keys"], batch["pixels"], batch["captions"]):
            rec = sets[int(key.split(":")[1])]  # "sets0:<line>"
            files = {i: data.fit(data.load_image(os.path.join(tiny["ref"], p)), 16, None)
                     for i, p in enumerate(rec["images"])}
            for im, cap in zip(px, caps):  # each image is one of the set's, fitted (mirrored with its set or not)
                got = ((im.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
                match = [i for i, f in files.items() if (got == f).all() or (got == f[:, ::-1]).all()]
                assert match and cap == rec["captions"][match[0]]
    p = subprocess.run([sys.executable, "train.py", "config/tiny.py", f"--data_spec=sets:{manifest}",
                        "--max_iters=2", f"--out_dir={tmp_path / 'run'}", "--ckpt_interval=0", "--log_interval=1"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    loss = [float(x) for x in re.findall(r"^step [12] \| loss ([\d.]+)", p.stdout, re.M)]
    assert len(loss) == 2 and all(0 < x < 10 for x in loss) and "bad samples" not in p.stdout, p.stdout


# ----------------------------------------------------------------------------- resume and ranks

def test_sigkill_mid_stage_then_rerun_gives_the_same_manifest(tiny, tmp_path):
    out = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "s3.py", "all", tiny["cfg"], "--manifest", out], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stage_dir = os.path.join(out, "backgrounds")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(stage_dir) and any(f.endswith(".json") and f[0] != "." for f in os.listdir(stage_dir)):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done = [f for f in os.listdir(stage_dir) if f.endswith(".json") and not f.startswith(".")]
    assert 0 < len(done) < 8, f"killed with {len(done)} of 8 background sets done: not mid-stage"
    assert not os.path.exists(os.path.join(out, "sets.jsonl"))
    assert main(["all", tiny["cfg"], "--manifest", out]) == 0
    assert tree(out) == tree(tiny["ref"])  # manifest, stats, every image: byte for byte
    # and a third run does nothing and changes nothing
    assert main(["all", tiny["cfg"], "--manifest", out]) == 0
    assert tree(out) == tree(tiny["ref"])


def test_two_ranks_under_torchrun_share_the_work(tiny, tmp_path):
    out = str(tmp_path / "ranks")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "s3.py", "all", tiny["cfg"], "--manifest", out], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    for stage in ("collages", "instances", "backgrounds"):  # both ranks worked: 4 batches of 2, 2 each
        assert f"{stage}: rank 0 made 4" in p.stderr and f"{stage}: rank 1 made 4" in p.stderr
    assert tree(out) == tree(tiny["ref"])  # the union is the one-process output, byte for byte


def test_rank_shares_are_disjoint_fixed_batches_and_cover():
    importlib.reload(s3)
    s3.batch_size = 3
    items = list(range(20))
    shares = []
    for world in (1, 2, 3):
        rts = []
        for rank in range(world):
            rt = s3.Runtime.__new__(s3.Runtime)
            rt.rank, rt.world = rank, world
            rts.append([tuple(b) for b in rt.mine(items)])
        flat = [i for r in rts for b in r for i in b]
        assert sorted(flat) == items  # disjoint and covering
        shares.append(sorted(b for r in rts for b in r))
    assert shares[0] == shares[1] == shares[2]  # the same batches at any world size


# ----------------------------------------------------------------------------- the filter on controlled inputs

def render_pair(subject, rng, pose):
    """A procedural render and its exact subject mask: pixels equal on two different backgrounds."""
    a, _ = dp.render(subject, ("snow", "middle"), resolution=32, rng=rng, pose=pose, background_seed=1)
    b, _ = dp.render(subject, ("night", "middle"), resolution=32, rng=rng, pose=pose, background_seed=1)
    return a, (a == b).all(-1)


class ColourHistogram:
    """A fixed embedding: the normalised 4x4x4 colour histogram of the non-background (not white) pixels."""

    def images(self, images):
        out = []
        for im in images:
            a = np.asarray(im).reshape(-1, 3)
            a = a[(a != 255).any(-1)] // 64
            h = np.bincount(a[:, 0] * 16 + a[:, 1] * 4 + a[:, 2], minlength=64).astype(np.float32)
            out.append(h / np.linalg.norm(h))
        return torch.from_numpy(np.stack(out))


def make_collages(folder, masks, layouts):
    """Collages made elsewhere: 2x2 tiles of procedural renders (64 x 64), a prompt file, one mask per tile."""
    os.makedirs(folder), os.makedirs(masks)
    for name, tiles in layouts.items():
        canvas = np.zeros((64, 64, 3), np.uint8)
        for k, (subject, pose_seed) in enumerate(tiles):
            pose = dp.sample_pose("middle", np.random.default_rng(pose_seed))
            img, m = render_pair(subject, 0, pose)
            y, x = 32 * (k // 2), 32 * (k % 2)
            canvas[y:y + 32, x:x + 32] = img
            full = np.zeros((64, 64), bool)
            full[y:y + 32, x:x + 32] = m
            s3.write_mask(os.path.join(masks, f"{name}.{k}.mask.png"), full)
        Image.fromarray(canvas).save(os.path.join(folder, name + ".png"))
        json.dump({"prompt": f"photos of the same toy ({name})", "object": "toy"},
                  open(os.path.join(folder, name + ".json"), "w"))


def test_filter_keeps_and_drops_by_threshold(tiny, tmp_path):
    A, B, C, D = (dp.Subject("circle", "red", "solid"), dp.Subject("square", "blue", "solid"),
                  dp.Subject("star", "green", "dots", "black"), dp.Subject("cross", "purple", "half", "yellow"))
    layouts = {"same": [(A, 1), (A, 2), (A, 3), (A, 4)],  # one subject in four poses: a set of 4
               "mixed": [(A, 1), (B, 2), (C, 3), (D, 4)],  # four subjects: nothing kept
               "pair": [(B, 1), (C, 2), (B, 3), (D, 4)],  # the two B's only
               "copies": [(C, 5), (C, 5), (C, 5), (C, 5)]}  # one render four times: near-duplicates
    make_collages(str(tmp_path / "imp"), str(tmp_path / "masks"), layouts)
    with open(tmp_path / "imp" / "broken.png", "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really")  # a corrupt input: skipped and counted
    (tmp_path / "imp" / "broken.txt").write_text("a toy")
    emb = ColourHistogram()
    importlib.reload(s3)
    s3.configure(["--manifest", str(tmp_path / "m"), f"--collages_from={tmp_path / 'imp'}",
                  f"--masks_from={tmp_path / 'masks'}", "--max_similarity=0.9999", "--batch_size=2"])
    s3.run(["collages", "instances", "filter"], embedder=emb)
    rec = {k: json.load(open(tmp_path / "m" / "filter" / f"{k}.json")) for k in layouts}
    sim = np.array(rec["same"]["similarity"])
    assert sim.min() >= 0.95 > np.array(rec["mixed"]["similarity"])[~np.eye(4, dtype=bool)].max()
    assert rec["same"]["kept"] == [0, 1, 2, 3] and rec["same"]["dropped"] is None
    assert rec["mixed"] == {**rec["mixed"], "kept": [], "dropped": "below_similarity"}
    pair = [i["image"] for i in json.load(open(tmp_path / "m" / "instances" / "pair.json"))["instances"]]
    assert sorted(pair[k] for k in rec["pair"]["kept"]) == ["pair/0.png", "pair/2.png"]  # the two B tiles
    assert rec["copies"]["kept"] == [] and rec["copies"]["dropped"] == "near_duplicate"
    stats = s3.stats()
    assert stats["collages"] == {"kept": 4, "dropped": {"corrupt": 1}}
    assert stats["filter"]["collages_dropped"] == {"below_similarity": 1, "near_duplicate": 1}
    # the same inputs at the paper's setting without the upper bound: the copies pass
    shutil.rmtree(tmp_path / "m" / "filter")
    s3.max_similarity = 1.0
    s3.run(["filter"], embedder=emb)
    assert json.load(open(tmp_path / "m" / "filter" / "copies.json"))["kept"] == [0, 1, 2, 3]
    # real subject masks through the backgrounds stage: the subject's pixels come out exactly
    s3.configure([tiny["cfg"], f"--manifest={tmp_path / 'm'}"])
    s3.run(["backgrounds"])
    assert check_subject_kept(str(tmp_path / "m")) == 4 + 2 + 4  # same, pair, copies
    # the filter redone with the upper bound (its folder deleted): the later stages follow, no stale sets remain
    shutil.rmtree(tmp_path / "m" / "filter")
    s3.min_similarity, s3.max_similarity = 0.95, 0.9999
    s3.run(["filter", "backgrounds", "stylize", "write"], embedder=emb)
    assert [json.loads(line)["id"] for line in open(tmp_path / "m" / "sets.jsonl")] == ["pair", "same"]
    assert s3.stats()["backgrounds"]["sets"] == 2
    # a rerun with another threshold over the same folder would mix two datasets: refused, naming the setting
    s3.min_similarity = 1.01
    with pytest.raises(s3.S3Error, match=r"filter: .* was made with .*min_similarity=0.95 \(now 1.01\)"):
        s3.run(["filter"], embedder=emb)
    # and at a threshold no pair reaches: a clear stop naming the stage and the counts
    shutil.rmtree(tmp_path / "m" / "filter")
    with pytest.raises(s3.S3Error, match=r"filter: nothing to pass on: 4 collages in, 0 sets kept .*4 below_sim"):
        s3.run(["filter"], embedder=emb)


# ----------------------------------------------------------------------------- bad input, prompts

def test_only_an_undecodable_input_is_a_corrupt_drop(tmp_path, monkeypatch):
    """A garbage or truncated collage or user mask is recorded as a `corrupt` drop (reruns skip it). Any other error
    while reading an item (a CUDA out-of-memory, an API change, the segmenter failing) stops the stage with that
    error and writes no record, so the rerun redoes the item."""
    A, B = dp.Subject("circle", "red", "solid"), dp.Subject("square", "blue", "solid")
    make_collages(str(tmp_path / "imp"), str(tmp_path / "masks"), {"good": [(A, 1), (A, 2), (A, 3), (A, 4)],
                                                                   "spoilt": [(B, 1), (B, 2), (B, 3), (B, 4)]})
    png = (tmp_path / "imp" / "good.png").read_bytes()
    for name, blob in (("garbage", b"\x89PNG\r\n\x1a\n not really"), ("truncated", png[:len(png) // 2])):
        (tmp_path / "imp" / f"{name}.png").write_bytes(blob)
        (tmp_path / "imp" / f"{name}.txt").write_text("a toy")
    (tmp_path / "masks" / "spoilt.2.mask.png").write_bytes(b"not a png")  # one unreadable user mask
    importlib.reload(s3)
    m = tmp_path / "m"
    s3.configure(["--manifest", str(m), f"--collages_from={tmp_path / 'imp'}", f"--masks_from={tmp_path / 'masks'}",
                  "--batch_size=1"])
    real_load, real_mask = s3.load_image, s3.read_mask

    def out_of_memory(path, *a, **kw):
        if os.path.basename(str(path)) == "good.png":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_load(path, *a, **kw)
    monkeypatch.setattr(s3, "load_image", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        s3.run(["collages"])
    assert not (m / "collages" / "good.json").exists()  # not recorded: the rerun redoes it
    monkeypatch.setattr(s3, "load_image", real_load)
    s3.run(["collages"])
    dropped = {k: r.get("dropped") for k, r in s3.live("collages").items()}
    assert dropped == {"garbage": "corrupt: UnidentifiedImageError", "good": None, "spoilt": None,
                       "truncated": "corrupt: OSError"}

    def api_change(path):
        raise TypeError("read_mask() got an unexpected keyword argument 'mode'")
    monkeypatch.setattr(s3, "read_mask", api_change)
    with pytest.raises(TypeError, match="unexpected keyword"):
        s3.run(["instances"])
    assert s3._records("instances") == {}
    monkeypatch.setattr(s3, "read_mask", real_mask)
    s3.run(["instances"])
    inst = s3.live("instances")
    assert len(inst["good"]["instances"]) == 4 and "corrupt" not in inst["good"]["dropped"]
    assert inst["spoilt"]["dropped"] == {"corrupt": 1} and "UnidentifiedImageError" in inst["spoilt"]["error"]

    class FailingSegmenter:  # the segmenter path: its errors are never the input's
        def instances(self, image, name, limit):
            raise torch.OutOfMemoryError("CUDA out of memory")
    shutil.rmtree(m / "instances")
    s3.masks_from = ""
    rt = s3.Runtime()
    rt.models["gsam"] = FailingSegmenter()
    with pytest.raises(torch.OutOfMemoryError):
        s3.stage_instances(rt)
    assert s3._records("instances") == {}


def test_max_instances_is_refused_above_what_the_filter_searches(tmp_path, capsys):
    """max_instances > 8 was silently cut at 8 by the filter: now a one-line error before any work. User masks
    beyond max_instances are dropped and counted, as the segmenter's extra detections are never made."""
    assert main(["instances", "--manifest", str(tmp_path / "m"), "--max_instances=12"]) == 2
    err = capsys.readouterr().err
    assert err == "error: max_instances must be 1..8 (the filter tries every subset of the instances), not 12\n"
    assert not (tmp_path / "m").exists()
    A = dp.Subject("circle", "red", "solid")
    make_collages(str(tmp_path / "imp"), str(tmp_path / "masks"), {"c": [(A, 1), (A, 2), (A, 3), (A, 4)]})
    importlib.reload(s3)
    s3.configure(["--manifest", str(tmp_path / "m"), f"--collages_from={tmp_path / 'imp'}",
                  f"--masks_from={tmp_path / 'masks'}", "--max_instances=3"])
    s3.run(["collages", "instances"])
    rec = s3.live("instances")["c"]
    assert len(rec["instances"]) == 3 and rec["dropped"] == {"over_max_instances": 1}
    assert rec["instances"][-1]["image"] == "c/2.png"  # the first three masks by file name



def test_every_missing_weight_path_is_reported_before_any_work(tmp_path, capsys):
    out = tmp_path / "nothing"
    rc = main(["all", "--manifest", str(out), "--sd=/nope/sd.ckpt", "--inpaint=/nope/inpaint.ckpt",
               "--ip2p=/nope/ip2p", "--grounding_dino=/nope/gdino", "--sam=/nope/sam",
               "--clip_weights=/nope/clip.bin"])
    err = capsys.readouterr().err
    assert rc == 2 and "6 missing" in err
    for name in ("/nope/sd.ckpt", "/nope/inpaint.ckpt", "/nope/ip2p", "/nope/gdino", "/nope/sam", "/nope/clip.bin"):
        assert name in err
    assert not out.exists()
    assert main(["filter", "--manifest", str(out), "--bogus=1"]) == 2
    assert "unknown config key 'bogus'" in capsys.readouterr().err


def test_template_prompts_deterministic_and_objects_file(tmp_path):
    importlib.reload(s3)
    assert len(s3.BUILTIN_OBJECTS) >= 300 and len(set(s3.BUILTIN_OBJECTS)) == len(s3.BUILTIN_OBJECTS)
    a = s3.template_prompts("teapot", 8)
    assert a == s3.template_prompts("teapot", 8) and len(set(a)) == 8 and all("teapot" in p for p in a)
    s3.seed = 1
    assert s3.template_prompts("teapot", 8) != a
    (tmp_path / "objects.txt").write_text("# my classes\nred kettle\n\nred  kettle\nT-Rex toy\n")
    s3.configure([f"--objects={tmp_path / 'objects.txt'}"])
    assert s3.object_names() == ["red kettle", "T-Rex toy"]
    # flags win over config files wherever they stand; --key value works as --key=value
    (tmp_path / "c.py").write_text("manifest = 'from_file'\nbatch_size = 3\n")
    s3.configure(["--manifest", "from_flag", str(tmp_path / "c.py"), "--stylize_p=0.25"])
    assert (s3.manifest, s3.batch_size, s3.stylize_p) == ("from_flag", 3, 0.25)
    with pytest.raises(s3.S3Error, match="batch_size must be int"):
        s3.configure(["--batch_size=two"])


def test_bench_tiny_runs_and_full_size_needs_cuda(tmp_path, capsys, monkeypatch):
    """bench/bench_s3.py --tiny: a row per stage whose items are what the stage made in the manifest folder and whose
    rate is items over its batch-loop time; sets/s is the sets written over the summed batch-loop times."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import bench_s3
    import tempfile

    monkeypatch.setattr(tempfile, "mkdtemp", lambda prefix="": str(tmp_path / "work"))  # keep its manifest to read
    assert bench_s3.main(["--tiny", "--prompts=2", "--batch_size=2", "--out", str(tmp_path / "b.md")]) == 0
    table = (tmp_path / "b.md").read_text()
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")]
                                              for line in table.splitlines() if line.startswith("| "))}
    del rows["stage"]
    assert list(rows) == list(s3.STAGES)
    m = str(tmp_path / "work" / "m")
    sets = [json.loads(line) for line in open(os.path.join(m, "sets.jsonl"))]
    made = {"prompts": len(s3.prompt_items()), "collages": len(s3.live("collages")),
            "instances": len(s3.live("instances")), "filter": len(s3.live("filter")),
            "backgrounds": len(s3.live("backgrounds")), "stylize": len(s3.live("stylize")),
            "write": len([f for f in os.listdir(os.path.join(m, "sets")) if f.endswith(".jsonl")])}  # shards
    assert made["prompts"] == made["collages"] == 2 and len(sets) == 2  # thresholds open: every collage a set
    for stage, (items, secs, rate, wall) in rows.items():
        assert int(items) == made[stage], (stage, items)
        assert abs(int(items) / float(rate) - float(secs)) <= 0.0051 and float(secs) <= float(wall) + 0.01, stage
    total = sum(float(secs) for _, secs, _, _ in rows.values())
    summary = re.search(r"collages/s per process: ([\d.]+); sets/s \(all stages\): ([\d.]+) \((\d+) sets of (\d+)",
                        table)
    assert float(summary[1]) == pytest.approx(float(rows["collages"][2]), abs=0.01)
    assert int(summary[3]) == len(sets) and int(summary[4]) == s3.max_set_size == 4
    rate = float(summary[2])  # 3 decimals; each stage's time 2
    assert len(sets) / rate == pytest.approx(total, abs=0.005 * len(rows) + len(sets) * 5e-4 / rate ** 2 + 1e-3)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as e:
            bench_s3.main([])
        assert e.value.code == 2 and "needs a CUDA GPU" in capsys.readouterr().err


def test_llm_prompts_from_a_local_causal_lm(tmp_path):
    llm = tiny_weights.causal_lm(tmp_path / "lm")
    runs = []
    for name in ("a", "b"):
        importlib.reload(s3)
        s3.configure([f"--llm={llm}", "--num_objects=2", "--prompts_per_object=2", "--llm_max_new_tokens=8",
                      f"--manifest={tmp_path / name}"])
        s3.run(["prompts"])
        runs.append(s3.prompt_items())
    assert runs[0] == runs[1] and len(runs[0]) == 4  # seeded per (object, prompt): same seed, same prompts
    assert all(r["prompt"].startswith(f"a photo of a {r['object']}") and r["prompt"].isprintable() for r in runs[0])
    assert len({r["prompt"] for r in runs[0]}) == 4
    assert not {r["prompt"] for r in runs[0]} & {p for r in runs[0] for p in s3.template_prompts(r["object"], 2)}
    # an object's prompts do not depend on which objects came before it (ranks share objects in any split): the
    # second object alone gets the prompts it got second in line
    second = s3.object_names()[1]  # run b's order, as stage_prompts goes through them
    (tmp_path / "second.txt").write_text(second + "\n")
    importlib.reload(s3)
    s3.configure([f"--llm={llm}", f"--objects={tmp_path / 'second.txt'}", "--prompts_per_object=2",
                  "--llm_max_new_tokens=8", f"--manifest={tmp_path / 'alone'}"])
    s3.run(["prompts"])
    assert [r["prompt"] for r in s3.prompt_items()] == [r["prompt"] for r in runs[0] if r["object"] == second]
    importlib.reload(s3)
    s3.configure([f"--llm={tmp_path / 'nowhere'}", f"--manifest={tmp_path / 'c'}"])
    with pytest.raises(s3.MissingWeights, match="nowhere/config.json"):
        s3.run(["prompts"])
