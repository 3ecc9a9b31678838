"""Same-subject image sets for JeDi: readers, mixing, bucketing, sharding, and a CLI to inspect data.

JeDi trains on *sets* of images that share a subject (paper section 4: synthetic same-subject sets,
video frames, multi-view renders, and single images as sets of size 1, mixed with equal probability).

Contract with train.py (kept stable)
------------------------------------
    loader = build_loader(spec, resolution=32, images_per_batch=12, rank=0, world_size=1,
                          seed=0, start_step=0, num_workers=2, state=None)
    batch = next(loader)
        batch['pixels']    FloatTensor (B, N, 3, H, W) in [-1, 1], H = W = resolution
        batch['captions']  B lists of N str
        batch['set_size']  N (one N per batch: bucketed), B = max(1, images_per_batch // N)
        batch['step']      the loader step (micro-batch on this rank) this batch belongs to
        batch['sources']   B source names;  batch['keys'] B set ids (for debugging)
        batch['attrs']     B entries: a list of N ground-truth dicts (procedural sets) or None
        batch['original_size']  LongTensor (B, N, 2): each image's (height, width) in its file, upright, before
                           the resize and crop (SDXL's micro-conditioning; procedural images: the resolution)
        batch['crop_top_left']  LongTensor (B, N, 2): (top, left) of the crop in the resized image, measured in the
                           image as the batch holds it (a mirrored image's left is counted from its new left edge)
    loader.state()         small dict to save in a checkpoint; build_loader(..., state=it) resumes
    loader.bad_samples     {'missing': 3, 'corrupt': 1, ...} skipped bad samples so far (log it);
    loader.num_bad         their total; loader.counts() adds 'skipped_too_small' (normal, see below)
Full reference with formats, guarantees and measured throughput: docs/data.md.

The data of step s on rank r is a function of (seed, s, r, world_size) only, so a run restarted with
start_step=s sees exactly the batches it would have seen (WebDataset sources: also pass `state`, and
keep world_size and num_workers; see "Determinism"). With gradient accumulation K, optimizer step s
starts at loader step s*K.

Specs
-----
`spec` is 'procedural', a list of source dicts, or a string 'type:path@weight,type:path@weight'.
    dict(type='sets',      path='s3/manifest.jsonl' | 's3/{000000..000159}.tar', weight=1.0)
    dict(type='video',     path='webvid/' | 'clips.jsonl')      frame folders or video files (PyAV)
    dict(type='multiview', path='objaverse/' | 'assets.jsonl')  one folder of views per asset
    dict(type='images',    path='laion/{00000..00999}.tar' | 'pairs.jsonl' | 'folder/')  set size 1
    dict(type='procedural', split='train')                      the embedded generator
        (+ video=share of video-like sets, same_pose=share of fixed-pose sets, closeup=chance that an image is a
        close-up; string: 'procedural?video=0.5&closeup=0.25')
Optional keys: weight (default 1), name, set_sizes (default build_loader's (2, 3, 4); (1,) for images).
A path with '.tar' in it is read as WebDataset shards, streaming (brace patterns and 'pipe:' URLs work).

Manifest format (JSONL, one set per line, paths relative to the manifest's folder)
--------------------------------------------------------------------------------
    {"images": ["a/0.jpg", "a/1.jpg", "a/2.jpg"], "caption": "a plush dog on a beach"}
    {"images": ["b/0.jpg", "b/1.jpg"], "captions": ["one caption", "per image"]}
    {"frames": "clips/0001", "caption": "..."}   # a folder of video frames, in name order
    {"video": "clips/0002.mp4", "caption": "..."} # a video file, decoded with PyAV
    {"views": "assets/0003", "caption": "..."}    # a folder of renders of one asset
    {"image": "x.jpg", "caption": "..."}          # a single image-caption pair
Folders: video/ holds frame folders (caption in caption.txt) and video files (caption in a .txt beside
them); multiview/ (and a sets/ folder) holds one folder per asset or set (images + caption.txt);
images/ holds x.jpg + x.txt pairs.
WebDataset: single images are samples {jpg|png|webp, txt}; a set is one sample with images
KEY.0.jpg, KEY.1.jpg, ... and either KEY.txt (one caption) or KEY.0.txt, KEY.1.txt, ... (img2dataset's
layout for singles; `python data.py shard` writes sets from a manifest).

Set size and bucketing
----------------------
Each batch has one set size N, so `pixels` needs no padding. The per-set target distribution is: source
k with probability weight_k / sum(weights), then N uniform over that source's set sizes. A batch first
draws N with probability proportional to (target share of N) / B_N, then draws each of its B_N sets'
sources, which reproduces the per-set targets exactly in expectation while every batch holds about
images_per_batch images (12 -> 6x2, 4x3, 3x4, 12x1). A set with more than N images contributes a
random N of them (video: N frames spread over the clip); a set with fewer is not eligible for N.

Determinism, sharding, workers
------------------------------
Indexable sources (manifests, folders, procedural) fix a permutation of their items from the seed;
rank r owns items perm[r::world_size] (disjoint, covering) and walks its share in a fresh order each
epoch. Batch plans (N and the source of every set) come from rng(seed, rank, step); the position in each
source's stream is the number of earlier draws, recomputed at start-up (microseconds per step), and all
other randomness (crops, flips, frames, procedural poses) comes from rng(seed, rank, step, slot).
Worker w of W builds the steps s with s % W == (w + start_step) % W; torch's DataLoader returns them in
step order. WebDataset shards are split over (rank, step lane), shard order reshuffled per epoch, and
read in order (write shards pre-shuffled, as img2dataset does); resuming them exactly needs the same
world_size and num_workers plus `state`, which counts the samples each lane skipped.

Transforms: resize the shorter side to `resolution` (bicubic; JPEGs decode at a reduced scale first),
crop to a square (center by default, crop='random' optional), flip, map to [-1, 1]. flip='set' (default)
mirrors all images of a set together, keeping the subject consistent within the set (a per-image flip
would teach that a subject equals its mirror image, wrong for text and logos); 'image' flips each
independently; 'none'. Procedural sets are never flipped: their captions say left or right.
Images with alpha (renders) are composited on white. Each image's original size and crop are reported with it
(batch['original_size'], batch['crop_top_left']; fit(geometry=True)): SDXL conditions on them (train.py); they
take no random draw, so every stream is what it was without them.

Bad samples (missing, zero-size, corrupt, truncated files; unreadable tar members) are skipped and
replaced by another sample of the same source, counted in loader.bad_samples; a source that yields 20
bad samples in a row stops the run with an error (a wrong path, not bad luck). Sets too small for the
batch's N are passed over and counted apart (loader.counts()['skipped_too_small']), as they are normal.
"""
import argparse
import io
import json
import os
import re
import sys
import time
import zlib
from collections import Counter, defaultdict

import numpy as np
import torch
from PIL import Image, ImageOps

import data_procedural

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")  # the one list: data, sample, eval
VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".avi", ".mov")
PROCEDURAL_OPTIONS = ("same_pose", "video", "closeup")  # ProceduralSource's keyword options, also in spec strings
MANY = 1 << 30  # size of a set whose image count is only known when it is read (frames, views, video)
MAX_TRIES = 20


class BadSample(Exception):
    def __init__(self, reason, msg=""):
        super().__init__(f"{reason}: {msg}")
        self.reason = reason


def _reason(e):
    if isinstance(e, BadSample):
        return e.reason
    if isinstance(e, FileNotFoundError):
        return "missing"
    return "corrupt"  # PIL's OSError/SyntaxError/ValueError on truncated or garbage files, bad JSON, ...


# ----------------------------------------------------------------------------- images

def load_image(src, size=None):
    """A path or bytes -> upright RGB PIL image: the one image reader (training sets, sample.py, eval.py).

    EXIF orientation is applied; transparency is composited onto white (how a viewer shows it); 16-bit grayscale
    is scaled by its bit depth (/257), not clipped at 255, and float images by their range; CMYK, palette, LAB
    etc. are converted to RGB. `size` lets JPEGs decode at a reduced scale (>= size per side).
    The file's own upright (height, width) is kept in `img.info["original_size"]` (fit reports it).
    Raises FileNotFoundError, BadSample("empty") or PIL's errors (OSError, ...) for unreadable files."""
    if isinstance(src, (bytes, bytearray)):
        if len(src) == 0:
            raise BadSample("empty", "zero-byte image")
        f = io.BytesIO(src)
    else:
        if os.path.getsize(src) == 0:  # raises FileNotFoundError for missing files
            raise BadSample("empty", src)
        f = src
    with Image.open(f) as img:
        w, h = img.size  # the file's size, before a reduced-scale decode
        if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientations that turn the image by 90 degrees
            w, h = h, w
        if size and img.format == "JPEG":
            img.draft("RGB", (size, size))  # DCT scaling: a 512px JPEG decodes 4-8x faster at 64px
        img.load()  # decode now, inside the caller's try: truncated files raise here
        if img.width == 0 or img.height == 0:
            raise BadSample("empty", "zero-size image")
        img = ImageOps.exif_transpose(img)  # a copy, upright (a phone photo's pixels are stored sideways)
    img = _to_rgb(img)
    img.info["original_size"] = (h, w)  # what fit() reports: the draft decode above may have shrunk the pixels
    return img


def _to_rgb(img):
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit PNG/TIFF grayscale opens as I;16 or I
        a = np.asarray(img, dtype=np.float64)
        if img.mode == "F":  # float: no fixed range, use the image's own
            a = (a - a.min()) / max(a.max() - a.min(), 1e-12) * 255
        else:
            a = a.clip(0, 65535) / 257
        img = Image.fromarray(a.round().astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")  # CMYK (Adobe's inverted JPEGs included: PIL undoes it), P, L, YCbCr, LAB, 1


def fit(img, resolution, rng=None, crop="center", geometry=False):
    """Resize the shorter side to `resolution`, crop a square -> uint8 (resolution, resolution, 3): the one
    preprocessing of an image, for training sets and sample.py's references alike. rng: for crop='random' only.
    geometry=True: -> (pixels, Geometry), where the pixels came from (SDXL's size and crop conditioning)."""
    w, h = img.size
    original = img.info.get("original_size", (h, w))  # load_image's: the file's size, before a reduced decode
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
    if crop == "random":
        x, y = int(rng.integers(nw - resolution + 1)), int(rng.integers(nh - resolution + 1))
    else:
        x, y = (nw - resolution) // 2, (nh - resolution) // 2
    out = np.asarray(img.crop((x, y, x + resolution, y + resolution)), dtype=np.uint8)
    if not geometry:
        return out
    return out, Geometry(*original, y, x, nw - resolution - x)


class Geometry(tuple):
    """Where a training image came from, as SDXL conditions on it (sgm's original_size_as_tuple, crop_coords_top_left):
    (original height, original width, crop top, crop left, crop left once mirrored), in pixels; crop coordinates
    in the resized image (shorter side = resolution), as sgm's and diffusers' SDXL loaders report them."""
    __slots__ = ()

    def __new__(cls, h, w, top, left, left_mirrored):
        return super().__new__(cls, (int(h), int(w), int(top), int(left), int(left_mirrored)))

    @classmethod
    def whole(cls, resolution):
        """An image made at the resolution (procedural sets): nothing resized, nothing cropped."""
        return cls(resolution, resolution, 0, 0, 0)

    def sizes(self, mirrored=False):
        """-> ((h, w), (top, left)) of the image as the batch holds it."""
        return self[:2], (self[2], self[4] if mirrored else self[3])


def _fitted(pairs):
    """[(pixels, Geometry), ...] of fit(geometry=True) -> ([pixels, ...], [Geometry, ...])."""
    return [p for p, _ in pairs], [g for _, g in pairs]


def _spread(total, n, rng):
    """n sorted distinct indices in range(total), one random index in each of n equal segments."""
    edges = np.linspace(0, total, n + 1).astype(int)
    return [int(rng.integers(a, max(a + 1, b))) for a, b in zip(edges[:-1], edges[1:])]


def _import_av():
    try:
        import av
    except ImportError:
        raise RuntimeError("reading video files needs PyAV (pip install av); frame folders work without it") from None
    return av


def _video_frames(path, n, rng):
    """n frames spread over a video file, as PIL images. Decodes up to the last chosen frame."""
    av = _import_av()
    with av.open(path) as container:
        stream = container.streams.video[0]
        total = stream.frames
        if not total and stream.duration and stream.average_rate:  # estimate from the header
            total = int(stream.duration * stream.time_base * stream.average_rate)
        if not total:  # no header count: decode once to count
            total = sum(1 for _ in container.decode(stream))
            container.seek(0)
        if total < n:
            raise BadSample("too_small", f"{path}: {total} frames < {n}")
        want, out = _spread(total, n, rng), []
        for i, frame in enumerate(container.decode(stream)):
            if i in want:
                out.append(frame.to_image())
            if len(out) == n:
                return out
    raise BadSample("too_small", f"{path}: fewer frames than its header says")


def _list_images(folder):
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS))
    return [os.path.join(folder, f) for f in names]


def _read_text(path):
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


# ----------------------------------------------------------------------------- indexable sources

class JsonlRecords:
    """A JSONL manifest read lazily: byte offsets in memory, one line parsed per access (1.6M sets ~ 13 MB)."""

    def __init__(self, path):
        self.path, self.offsets, self.sizes, self.has_video, self.bad_lines = path, [], [], False, []
        with open(path, "rb") as f:
            pos = 0
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rec = json.loads(line)
                        self.sizes.append(_record_size(rec))
                        self.offsets.append(pos)
                        self.has_video |= "video" in rec
                    except (ValueError, TypeError, KeyError) as e:
                        self.bad_lines.append((lineno, f"unparseable: {e}"))
                pos += len(line)
        self.offsets, self.sizes = np.array(self.offsets, np.int64), np.array(self.sizes, np.int64)
        self._f, self._pid = None, None

    def __len__(self):
        return len(self.offsets)

    def __del__(self):
        if getattr(self, "_f", None) is not None:
            self._f.close()

    def __getstate__(self):  # DataLoader workers under 'spawn' pickle the dataset: not the file handle
        return {**self.__dict__, "_f": None, "_pid": None}

    def __getitem__(self, i):
        if self._pid != os.getpid():  # one handle per (worker) process
            self._f, self._pid = open(self.path, "rb"), os.getpid()
        self._f.seek(self.offsets[i])
        return json.loads(self._f.readline())


def _record_size(rec):
    if "images" in rec:
        if not isinstance(rec["images"], list):
            raise TypeError("'images' must be a list")
        return len(rec["images"])
    if "image" in rec:
        return 1
    if any(k in rec for k in ("frames", "views", "video")):
        return MANY
    raise KeyError("a record needs one of images, image, frames, views, video")


class SetSource:
    """Sets described by records (a JSONL manifest or a scanned folder); see the module docstring."""
    streaming, allow_flip = False, True

    def __init__(self, name, records, root, set_sizes, weight=1.0, sizes=None, has_video=False):
        self.name, self.records, self.root, self.weight = name, records, root, float(weight)
        self.set_sizes = tuple(set_sizes)
        self.sizes = np.asarray(sizes if sizes is not None else [_record_size(r) for r in records], np.int64)
        if len(self.sizes) == 0:
            raise ValueError(f"source {name!r} has no sets ({root})")
        if has_video or (not isinstance(records, JsonlRecords) and any("video" in r for r in records)):
            try:
                _import_av()
            except RuntimeError as e:
                raise RuntimeError(f"source {name!r} ({root}) contains video files: {e}") from None

    def __len__(self):
        return len(self.sizes)

    def _path(self, p):
        return p if os.path.isabs(p) else os.path.join(self.root, p)

    def load(self, index, n, rng, resolution, crop):
        rec, caps = self.records[index], None
        if "images" in rec or "image" in rec:
            paths = rec["images"] if "images" in rec else [rec["image"]]
            pick = sorted(rng.choice(len(paths), n, replace=False)) if len(paths) > n else range(len(paths))
            if len(pick) < n:
                raise BadSample("too_small", f"{len(paths)} images < {n}")
            imgs = [load_image(self._path(paths[i]), resolution) for i in pick]
            if rec.get("captions"):
                caps = [rec["captions"][i] for i in pick]
        elif "video" in rec:
            imgs = _video_frames(self._path(rec["video"]), n, rng)
        else:  # frames in time order -> spread over the clip; views -> any n distinct
            files = _list_images(self._path(rec.get("frames") or rec["views"]))
            if len(files) < n:
                raise BadSample("too_small", f"{len(files)} images < {n}")
            pick = _spread(len(files), n, rng) if "frames" in rec else sorted(rng.choice(len(files), n, replace=False))
            imgs = [load_image(files[i], resolution) for i in pick]
        if caps is None:
            cap = rec["caption"] if "caption" in rec else _read_text(self._path(rec["caption_file"]))
            caps = [cap] * n
        return (*_fitted([fit(im, resolution, rng, crop, geometry=True) for im in imgs]), caps, None,
                f"{self.name}:{index}")


def _scan_folder(kind, root):
    """Records for the folder layouts in the module docstring."""
    recs = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        stem, ext = os.path.splitext(entry.name)
        if kind == "images" and entry.is_file() and ext.lower() in IMAGE_EXTS:
            recs.append({"image": entry.name, "caption_file": stem + ".txt"})
        elif kind == "video" and entry.is_file() and ext.lower() in VIDEO_EXTS:
            recs.append({"video": entry.name, "caption_file": stem + ".txt"})
        elif kind in ("video", "multiview") and entry.is_dir():
            key = "frames" if kind == "video" else "views"
            recs.append({key: entry.name, "caption_file": os.path.join(entry.name, "caption.txt")})
    return recs


class ProceduralSource:
    """The embedded generator (data_procedural): item i = training subject i, rendered in n random contexts."""
    streaming, allow_flip = False, False  # captions name left/right: a flip would contradict them

    def __init__(self, name, split="train", set_sizes=(2, 3, 4), weight=1.0, same_pose=0.0, video=0.0, closeup=0.0):
        self.name, self.weight, self.set_sizes = name, float(weight), tuple(set_sizes)
        self.same_pose = float(same_pose)  # share of sets that keep one position and pose (render_set)
        self.video = float(video)  # share of sets that keep one scene while the subject moves (render_set)
        if min(self.same_pose, self.video) < 0 or self.same_pose + self.video > 1:
            raise ValueError(f"source {name!r}: same_pose and video are shares of the sets: each >= 0, sum <= 1")
        self.closeup = float(closeup)  # per image of the other sets: the chance of a close-up (render_set)
        if not 0 <= self.closeup <= 1:
            raise ValueError(f"source {name!r}: closeup is a probability per image, in [0, 1]")
        self.subjects = data_procedural.subjects(split)
        self.sizes = np.full(len(self.subjects), MANY, np.int64)

    def __len__(self):
        return len(self.subjects)

    def load(self, index, n, rng, resolution, crop):
        kind = rng.random() if self.same_pose + self.video > 0 else 1.0  # no extra draw at 0: old streams unchanged
        images, captions, attrs = data_procedural.render_set(
            self.subjects[index], n, resolution=resolution, rng=rng,
            same_pose=kind < self.same_pose, video=self.same_pose <= kind < self.same_pose + self.video,
            closeup=self.closeup if kind >= self.same_pose else 0.0)
        return images, [Geometry.whole(resolution)] * n, captions, attrs, self.subjects[index].id


# ----------------------------------------------------------------------------- WebDataset (streaming)

def _import_wds():
    try:
        import webdataset
    except ImportError:
        raise RuntimeError("reading .tar shards needs the webdataset package (pip install webdataset)") from None
    return webdataset


WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # image members the WebDataset readers decode
_SET_MEMBER = re.compile(rf"^(\d+)\.({'|'.join(WDS_IMAGE_EXTS)})$")


class WebDatasetSource:
    """Tar shards read sequentially through webdataset; one sample = one image (sets=False) or one set."""
    streaming, allow_flip = True, True

    def __init__(self, name, urls, sets, set_sizes, weight=1.0):
        wds = _import_wds()
        self.urls = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else list(urls)
        self.name, self.sets, self.set_sizes, self.weight = name, sets, tuple(set_sizes), float(weight)

    def raw_samples(self, urls, on_error):
        from webdataset.tariterators import tarfile_samples
        return tarfile_samples([{"url": u} for u in urls], handler=on_error)

    def stream(self, lane, n_lanes, seed, on_error):
        """Endless raw samples for one (rank, lane) of n_lanes; disjoint across lanes, covering together."""
        for epoch in range(1 << 62):
            order = np.random.default_rng([seed, _stable_hash(self.name), epoch]).permutation(len(self.urls))
            split_samples = len(self.urls) < n_lanes  # too few shards: every lane reads all, keeps every n-th
            mine = order if split_samples else order[lane::n_lanes]
            got = 0
            for i, sample in enumerate(self.raw_samples([self.urls[j] for j in mine], on_error)):
                if not split_samples or i % n_lanes == lane:
                    got += 1
                    yield sample
            if got == 0:
                raise RuntimeError(f"source {self.name!r}: no readable samples in {len(mine)} shards ({self.urls[:2]}...)")

    def count(self, sample):
        return sum(1 for k in sample if _SET_MEMBER.match(k)) if self.sets else 1

    def decode(self, sample, n, rng, resolution, crop):
        key = f"{self.name}:{os.path.basename(sample.get('__url__', ''))}/{sample['__key__']}"
        meta = json.loads(sample["json"]) if "json" in sample else {}
        if not self.sets:
            ext = next((e for e in WDS_IMAGE_EXTS if e in sample), None)
            if ext is None:
                raise BadSample("missing", f"{key}: no image")
            if "txt" not in sample and "caption" not in meta:  # e.g. the last sample of a truncated shard
                raise BadSample("missing", f"{key}: no caption")
            cap = sample["txt"].decode() if "txt" in sample else meta["caption"]
            return (*_fitted([fit(load_image(sample[ext], resolution), resolution, rng, crop, geometry=True)]), [cap],
                    None, key)
        members = sorted((int(_SET_MEMBER.match(k).group(1)), k) for k in sample if _SET_MEMBER.match(k))
        if len(members) < n:
            raise BadSample("too_small", f"{key}: {len(members)} images < {n}")
        pick = sorted(rng.choice(len(members), n, replace=False))
        caps = []
        for i in pick:
            idx = members[i][0]
            if f"{idx}.txt" in sample:
                caps.append(sample[f"{idx}.txt"].decode())
            elif "captions" in meta:
                caps.append(meta["captions"][idx])
            elif "txt" in sample or "caption" in meta:
                caps.append(sample["txt"].decode() if "txt" in sample else meta["caption"])
            else:
                raise BadSample("missing", f"{key}: no caption for image {idx}")
        imgs = [fit(load_image(sample[members[i][1]], resolution), resolution, rng, crop, geometry=True) for i in pick]
        return (*_fitted(imgs), caps, None, key)


def _stable_hash(s):
    return zlib.crc32(s.encode())  # hash() of a str changes per process


# ----------------------------------------------------------------------------- specs

def parse_spec(spec):
    """'procedural' | 'type:path@weight,...' | a dict | a list of dicts -> list of source dicts."""
    if isinstance(spec, dict):
        return [dict(spec)]
    if isinstance(spec, str):
        out = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            m = re.fullmatch(r"(?:(\w+):)?(.*?)(?:@([\d.]+))?", part)
            typ, path, w = m.group(1), m.group(2), m.group(3)
            proc = re.fullmatch(r"procedural(-heldout)?(?:\?(.*))?", path) if typ is None else None
            if proc:  # 'procedural', 'procedural-heldout', optionally '?video=0.5&same_pose=0.1&closeup=0.25'
                d = dict(type="procedural", split="heldout" if proc.group(1) else "train")
                for opt in filter(None, (proc.group(2) or "").split("&")):
                    key, _, value = opt.partition("=")
                    if key not in PROCEDURAL_OPTIONS:
                        raise ValueError(f"unknown procedural option {key!r} in {part!r} "
                                         f"({', '.join(PROCEDURAL_OPTIONS)})")
                    d[key] = float(value)
            else:
                d = dict(type=typ or "sets", path=path)
            if w:
                d["weight"] = float(w)
            out.append(d)
        return out
    return [dict(s) if isinstance(s, dict) else parse_spec(s)[0] for s in spec]


def make_source(d, index=0, set_sizes=(2, 3, 4)):
    d = dict(d)
    typ, weight = d.pop("type"), d.pop("weight", 1.0)
    sizes = tuple(d.pop("set_sizes", (1,) if typ == "images" else set_sizes))
    path = d.pop("path", None) or d.pop("urls", None)
    name = d.pop("name", None) or (typ if typ == "procedural" else f"{typ}{index}")
    split = d.pop("split", "train")
    options = {k: d.pop(k) for k in PROCEDURAL_OPTIONS if k in d} if typ == "procedural" else {}
    if d:
        raise ValueError(f"source {name!r}: unknown keys {sorted(d)}")
    if typ == "procedural":
        return ProceduralSource(name, split=split, set_sizes=sizes, weight=weight, **options)
    if typ not in ("sets", "video", "multiview", "images"):
        raise ValueError(f"unknown source type {typ!r} (sets, video, multiview, images, procedural)")
    if path is None:
        raise ValueError(f"source {name!r} needs a path")
    if not isinstance(path, str) or ".tar" in path:
        return WebDatasetSource(name, path, sets=typ != "images", set_sizes=sizes, weight=weight)
    if path.endswith(".jsonl"):
        recs = JsonlRecords(path)
        if recs.bad_lines:
            print(f"data: {name}: {len(recs.bad_lines)} unparseable manifest lines skipped (python data.py validate {path})",
                  file=sys.stderr)
        return SetSource(name, recs, os.path.dirname(os.path.abspath(path)), sizes, weight, recs.sizes, recs.has_video)
    if os.path.isdir(path):
        return SetSource(name, _scan_folder(typ if typ != "sets" else "multiview", path), path, sizes, weight)
    raise FileNotFoundError(f"source {name!r}: {path} is neither a .jsonl manifest, a folder nor .tar shards")


# ----------------------------------------------------------------------------- planning

class Plan:
    """Which set size and which sources each step uses: a pure function of (seed, rank, step)."""

    def __init__(self, sources, images_per_batch, seed, rank):
        self.seed, self.rank = seed, rank
        q = defaultdict(float)  # (source k, N) -> target share of sets
        total = sum(s.weight for s in sources)
        if total <= 0:
            raise ValueError("source weights must sum to more than 0")
        for k, s in enumerate(sources):
            if s.weight <= 0:
                continue
            biggest = int(s.sizes.max()) if hasattr(s, "sizes") else MANY
            ok = [n for n in s.set_sizes if n <= biggest]
            if not ok:
                raise ValueError(f"source {s.name!r}: no set has {min(s.set_sizes)} or more images")
            for n in ok:
                q[k, n] += s.weight / total / len(ok)
        self.Ns = sorted({n for _, n in q})
        self.B = {n: max(1, images_per_batch // n) for n in self.Ns}
        qN = np.array([sum(v for (k, n), v in q.items() if n == N) for N in self.Ns])
        pN = qN / np.array([self.B[n] for n in self.Ns])  # fewer sets per batch -> draw that N more often
        self.cum_N = np.cumsum(pN / pN.sum())
        self.cum_k = {N: np.cumsum([q[k, N] for k in range(len(sources))]) / qN[i] for i, N in enumerate(self.Ns)}
        self.set_share = dict(q)  # for tests and the CLI

    def __call__(self, step):
        rng = np.random.default_rng([self.seed, self.rank, step])
        u = rng.random(1 + max(self.B.values()))
        N = self.Ns[min(int(np.searchsorted(self.cum_N, u[0], side="right")), len(self.Ns) - 1)]
        ks = np.searchsorted(self.cum_k[N], u[1:1 + self.B[N]], side="right")
        return N, np.minimum(ks, len(self.cum_k[N]) - 1)


class _Share:
    """Rank r's items of an indexable source, walked in a fresh order per epoch, one stream per set size."""

    def __init__(self, source, k, seed, rank, world_size):
        perm = np.random.default_rng([seed, k, 1]).permutation(len(source))
        self.items = perm[rank::world_size] if len(perm) >= world_size else perm[rank % len(perm):][:1]
        self.source, self.key, self._eligible, self._epoch = source, (seed, k, rank), {}, {}

    def eligible(self, n):
        if n not in self._eligible:
            e = self.items[self.source.sizes[self.items] >= n]
            if len(e) == 0:  # rank owns no big-enough set: borrow from the whole source
                e = np.flatnonzero(self.source.sizes >= n)
            self._eligible[n] = e
        return self._eligible[n]

    def item(self, n, cursor):
        e = self.eligible(n)
        epoch, j = divmod(cursor, len(e))
        if self._epoch.get(n, (None,))[0] != epoch:
            self._epoch[n] = (epoch, np.random.default_rng([*self.key, n, epoch]).permutation(len(e)))
        return int(e[self._epoch[n][1][j]])


# ----------------------------------------------------------------------------- batches

class SetBatches(torch.utils.data.IterableDataset):
    """Endless batches for one rank; each DataLoader worker builds every W-th step."""

    def __init__(self, sources, resolution, images_per_batch, rank, world_size, seed, start_step,
                 crop="center", flip="set", lane_skips=None, num_lanes=1):
        super().__init__()
        assert flip in ("set", "image", "none") and crop in ("center", "random")
        self.sources, self.resolution, self.rank, self.world_size = sources, resolution, rank, world_size
        self.seed, self.start_step, self.crop, self.flip = seed, start_step, crop, flip
        self.plan = Plan(sources, images_per_batch, seed, rank)
        self.lane_skips, self.num_lanes = lane_skips or {}, num_lanes

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, W = (info.id, info.num_workers) if info else (0, 1)
        assert W == self.num_lanes, "num_lanes must equal the DataLoader's num_workers"
        lane = (w + self.start_step) % W  # this worker builds steps s with s % W == lane
        stats = Counter()
        shares = {k: _Share(s, k, self.seed, self.rank, self.world_size)
                  for k, s in enumerate(self.sources) if not s.streaming}
        cursor = Counter()  # (k, N) -> draws so far from this rank's share (indexable)
        consumed = Counter()  # k -> raw samples this lane has taken from stream k (streaming)
        skips = Counter(self.lane_skips.get(lane, {}))  # k name -> extra raw samples skipped (bad/too small)
        streams, fast_forward = {}, [False]

        def on_error(exn):  # tar-level errors inside webdataset: count (once, not again on resume) and go on
            if not fast_forward[0]:
                stats["corrupt"] += 1
                _warn(stats, f"unreadable shard member: {exn}")
            return True

        def fetch(k, N, rng, step):
            """One set of N images from source k; bad samples are replaced and counted."""
            src, bad, small = self.sources[k], 0, 0
            while True:
                try:
                    if src.streaming:
                        raw = next(streams[k])
                        consumed[k] += 1
                        if src.count(raw) < N:  # not eligible for this N: passed over, not decoded
                            raise BadSample("too_small", f"{raw['__key__']}")
                        return src.decode(raw, N, rng, self.resolution, self.crop)
                    if bad + small == 0:  # the planned item
                        idx = shares[k].item(N, cursor[k, N])
                        cursor[k, N] += 1
                    else:  # a replacement: a random eligible item of this rank's share
                        e = shares[k].eligible(N)
                        idx = int(e[rng.integers(len(e))])
                    return src.load(idx, N, rng, self.resolution, self.crop)
                except RuntimeError:  # ours: a source with nothing readable, PyAV missing
                    raise
                except Exception as e:
                    if src.streaming:  # keep the count of raw samples read exact, for resume
                        consumed[k] -= 1
                        skips[src.name] += 1
                    r = _reason(e)
                    if r == "too_small":  # a short set (WebDataset sets, short clips): normal, but not forever
                        stats["skipped_too_small"] += 1
                        small += 1
                    else:
                        stats[r] += 1
                        bad += 1
                        _warn(stats, f"skipped bad sample of {src.name}: {e!r}")
                    if bad >= MAX_TRIES or small >= 100 * MAX_TRIES:
                        raise RuntimeError(f"source {src.name!r}: {bad} bad and {small} too-small samples in a row "
                                           f"at step {step} (N={N}); counts so far {dict(stats)}") from e

        step = 0
        while True:
            N, ks = self.plan(step)
            mine = step >= self.start_step and step % W == lane
            if not mine:
                for k in ks:
                    if not self.sources[k].streaming:
                        cursor[k, N] += 1
                    elif step % W == lane:
                        consumed[k] += 1
                step += 1
                continue
            B = len(ks)
            pixels = np.empty((B, N, self.resolution, self.resolution, 3), np.uint8)  # (B, N, H, W, C)
            captions, attrs, keys, names = [], [], [], []
            sizes = np.empty((B, N, 4), np.int64)  # (B, N, [h, w, top, left]): each image's SDXL size conditioning
            for j, k in enumerate(ks):
                src, rng = self.sources[k], np.random.default_rng([self.seed, self.rank, step, j, 7])
                if src.streaming and k not in streams:
                    streams[k] = src.stream(self.rank * W + lane, self.world_size * W, self.seed, on_error)
                    fast_forward[0] = True
                    for _ in range(consumed[k] + skips[src.name]):  # resume: skip what this lane already read
                        next(streams[k])
                    fast_forward[0] = False
                imgs, geoms, caps, att, key = fetch(k, N, rng, step)
                imgs, mirrored = np.stack(imgs), np.zeros(N, bool)  # (N, H, W, 3)
                if src.allow_flip and self.flip == "set" and rng.random() < 0.5:
                    imgs, mirrored[:] = imgs[:, :, ::-1], True
                elif src.allow_flip and self.flip == "image":
                    mirrored = rng.random(N) < 0.5
                    imgs[mirrored] = imgs[mirrored][:, :, ::-1]
                pixels[j] = imgs
                for i, (g, m) in enumerate(zip(geoms, mirrored)):
                    sizes[j, i] = [c for pair in g.sizes(m) for c in pair]
                captions.append(list(caps))
                attrs.append(att)
                keys.append(key)
                names.append(src.name)
            x = torch.from_numpy(pixels).permute(0, 1, 4, 2, 3)  # (B, N, 3, H, W)
            sizes = torch.from_numpy(sizes)
            yield {"pixels": x.float().div_(127.5).sub_(1.0), "captions": captions, "set_size": N, "step": step,
                   "sources": names, "keys": keys, "attrs": attrs,
                   "original_size": sizes[..., :2], "crop_top_left": sizes[..., 2:],
                   "_lane": lane, "_skips": dict(skips), "_stats": dict(stats)}
            step += 1


def _warn(stats, msg):
    if sum(stats.values()) <= 5:  # the first few, then only the counts (in loader.bad_samples)
        print(f"data: {msg}", file=sys.stderr)


class Loader:
    """Iterator over batches (see the module docstring), plus state() and bad-sample counts."""

    def __init__(self, dataset, num_workers, state=None, pin_memory=False):
        self.dataset, self.step = dataset, dataset.start_step
        self._stats = {}  # lane -> cumulative counts of that lane's worker
        self._skips = {int(k): v for k, v in (state or {}).get("lanes", {}).items()}
        self._base = Counter((state or {}).get("counts", {}))  # counts from before a resume
        dl = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                         pin_memory=pin_memory, prefetch_factor=4 if num_workers else None)
        self._it = iter(dl)

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._it)
        assert batch["step"] == self.step, (batch["step"], self.step)
        lane = batch.pop("_lane")
        self._stats[lane] = batch.pop("_stats")
        self._skips[lane] = batch.pop("_skips")
        self.step += 1
        return batch

    def counts(self):
        total = Counter(self._base)
        for c in self._stats.values():
            total.update(c)
        return dict(total)

    @property
    def bad_samples(self):
        return {k: v for k, v in self.counts().items() if not k.startswith("skipped_")}

    @property
    def num_bad(self):
        return sum(self.bad_samples.values())

    def state(self):
        """Save this with the checkpoint; build_loader(..., state=it) continues at the next step."""
        d = self.dataset
        return {"step": self.step, "seed": d.seed, "world_size": d.world_size, "num_lanes": d.num_lanes,
                "lanes": {str(k): v for k, v in self._skips.items()}, "counts": self.counts()}


def build_loader(spec, *, resolution, images_per_batch, rank=0, world_size=1, seed=0, start_step=0,
                 num_workers=0, state=None, set_sizes=(2, 3, 4), crop="center", flip="set", pin_memory=False):
    """The training iterator. See the module docstring for the batch format and the guarantees."""
    sources = [make_source(d, i, set_sizes) for i, d in enumerate(parse_spec(spec))]
    lane_skips = {}
    if state is not None:
        start_step = state["step"]
        if state.get("world_size") == world_size and state.get("num_lanes") == max(1, num_workers):
            lane_skips = {int(k): v for k, v in state.get("lanes", {}).items()}
        elif any(s.streaming for s in sources):
            print("data: world size or num_workers changed: WebDataset sources resume approximately", file=sys.stderr)
    ds = SetBatches(sources, resolution, images_per_batch, rank, world_size, seed, start_step, crop, flip,
                    lane_skips, max(1, num_workers))
    return Loader(ds, num_workers, state, pin_memory)


# ----------------------------------------------------------------------------- CLI

def validate_manifest(path, decode=True):
    """-> list of (line number, problem) for a JSONL manifest: bad JSON, missing/empty/corrupt files."""
    root, bad = os.path.dirname(os.path.abspath(path)), []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                _record_size(rec)
            except (ValueError, TypeError, KeyError) as e:
                bad.append((lineno, f"unparseable: {e}"))
                continue
            if "caption" not in rec and "captions" not in rec and "caption_file" not in rec:
                bad.append((lineno, "no caption"))
            if "captions" in rec and len(rec["captions"]) != len(rec.get("images", [])):
                bad.append((lineno, "captions and images differ in length"))
            files = rec.get("images") or [rec[k] for k in ("image", "video") if k in rec]
            for folder in (rec[k] for k in ("frames", "views") if k in rec):
                p = os.path.join(root, folder)
                files += [os.path.join(folder, f) for f in os.listdir(p)] if os.path.isdir(p) else [folder]
            for p in files:
                p = os.path.join(root, p)
                try:
                    if p.lower().endswith(VIDEO_EXTS):
                        if not os.path.exists(p):
                            raise FileNotFoundError(p)
                    elif p.lower().endswith(IMAGE_EXTS) or "images" in rec or "image" in rec:
                        load_image(p) if decode else os.stat(p)
                except Exception as e:
                    bad.append((lineno, f"{_reason(e)}: {os.path.relpath(p, root)} ({e})"))
    return bad


def _grid_png(batches, out, max_sets):
    rows, caps = [], []
    for b in batches:
        for px, c in zip(b["pixels"], b["captions"]):  # px (N, 3, H, W)
            rows.append(((px.permute(0, 2, 3, 1) + 1) * 127.5).clamp(0, 255).byte().numpy())
            caps.append(c)
            if len(rows) == max_sets:
                break
        if len(rows) == max_sets:
            break
    n, r = max(len(x) for x in rows), rows[0].shape[1]
    grid = np.full((len(rows) * r, n * r, 3), 128, np.uint8)
    for i, x in enumerate(rows):
        for j, im in enumerate(x):
            grid[i * r:(i + 1) * r, j * r:(j + 1) * r] = im
    Image.fromarray(grid).save(out)
    return caps


def main(argv=None):
    ap = argparse.ArgumentParser(description="Inspect JeDi training data.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("count", help="number of sets per source")
    c.add_argument("spec")
    g = sub.add_parser("grid", help="write a PNG with one set per row")
    g.add_argument("spec"); g.add_argument("--out", default="sets.png"); g.add_argument("--sets", type=int, default=8)
    g.add_argument("--resolution", type=int, default=64); g.add_argument("--seed", type=int, default=0)
    v = sub.add_parser("validate", help="list the bad entries of a JSONL manifest")
    v.add_argument("manifest"); v.add_argument("--no-decode", action="store_true")
    b = sub.add_parser("bench", help="loader throughput")
    b.add_argument("spec"); b.add_argument("--resolution", type=int, default=32)
    b.add_argument("--images-per-batch", type=int, default=12); b.add_argument("--workers", type=int, default=2)
    b.add_argument("--steps", type=int, default=100)
    s = sub.add_parser("shard", help="write a manifest's sets as WebDataset tar shards")
    s.add_argument("manifest"); s.add_argument("pattern", help="e.g. out/sets-%%06d.tar")
    s.add_argument("--maxcount", type=int, default=1000)
    a = ap.parse_args(argv)

    if a.cmd == "count":
        for i, d in enumerate(parse_spec(a.spec)):
            src = make_source(d, i)
            if src.streaming:
                n = sum(1 for _ in src.raw_samples(src.urls, lambda e: True))
            else:
                n = len(src)
            print(f"{src.name}: {n} {'images' if src.set_sizes == (1,) else 'sets'}")
    elif a.cmd == "grid":
        loader = build_loader(a.spec, resolution=a.resolution, images_per_batch=12, seed=a.seed)
        for i, caps in enumerate(_grid_png(loader, a.out, a.sets)):
            print(f"row {i}: " + " | ".join(caps))
        print(f"wrote {a.out}")
    elif a.cmd == "validate":
        bad = validate_manifest(a.manifest, decode=not a.no_decode)
        for lineno, msg in bad:
            print(f"{a.manifest}:{lineno}: {msg}")
        print(f"{len(bad)} problems")
        return 1 if bad else 0
    elif a.cmd == "bench":
        loader = build_loader(a.spec, resolution=a.resolution, images_per_batch=a.images_per_batch,
                              num_workers=a.workers)
        next(loader)  # workers started
        t, sets, imgs = time.perf_counter(), 0, 0
        for _ in range(a.steps):
            x = next(loader)["pixels"]
            sets, imgs = sets + x.shape[0], imgs + x.shape[0] * x.shape[1]
        dt = time.perf_counter() - t
        print(f"{a.spec} @ {a.resolution}px, {a.workers} workers: {sets / dt:.1f} sets/s, {imgs / dt:.1f} images/s, "
              f"bad {loader.bad_samples}")
    elif a.cmd == "shard":
        wds = _import_wds()
        recs, root = JsonlRecords(a.manifest), os.path.dirname(os.path.abspath(a.manifest))
        ext = lambda p: os.path.splitext(p)[1].lower()[1:]  # noqa: E731
        for i in range(len(recs)):  # everything checked before anything is written
            rec = recs[i]
            paths = rec.get("images") or ([rec["image"]] if "image" in rec else [])
            if not paths:
                print(f"error: {a.manifest}: record {i} has no images or image (shards hold image sets and single "
                      f"images)", file=sys.stderr)
                return 2
            bad = [p for p in paths if ext(p) not in WDS_IMAGE_EXTS]
            if bad:
                print(f"error: {a.manifest}: {bad[0]}: the WebDataset readers take {'/'.join(WDS_IMAGE_EXTS)} images "
                      f"only (convert it first)", file=sys.stderr)
                return 2
            missing = [p for p in paths if not os.path.isfile(os.path.join(root, p))]
            if missing:
                print(f"error: {a.manifest}: record {i}: image not found: {os.path.join(root, missing[0])}",
                      file=sys.stderr)
                return 2
            if not (rec.get("captions") or rec.get("caption")):
                print(f"error: {a.manifest}: record {i} has no caption or captions", file=sys.stderr)
                return 2
        os.makedirs(os.path.dirname(a.pattern) or ".", exist_ok=True)
        with wds.ShardWriter(a.pattern, maxcount=a.maxcount) as sink:
            for i in range(len(recs)):
                rec = recs[i]
                sample = {"__key__": f"{i:09d}"}
                if not rec.get("images"):  # a single image: {KEY.jpg, KEY.txt}, the layout the images reader takes
                    with open(os.path.join(root, rec["image"]), "rb") as f:
                        sample[ext(rec["image"])] = f.read()
                    sample["txt"] = rec["caption"]
                    sink.write(sample)
                    continue
                for j, p in enumerate(rec["images"]):
                    with open(os.path.join(root, p), "rb") as f:
                        sample[f"{j}.{ext(p)}"] = f.read()
                    if rec.get("captions"):
                        sample[f"{j}.txt"] = rec["captions"][j]
                if not rec.get("captions"):
                    sample["txt"] = rec["caption"]
                sink.write(sample)
    return 0


if __name__ == "__main__":
    sys.exit(main())
