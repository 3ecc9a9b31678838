"""The procedural same-subject generator: JeDi's training data without a download.

A *subject* is a combination of attributes -- shape, body colour, surface pattern, pattern colour --
and a *context* is a background plus a position in the frame. An image shows one subject in one
context with a random pose (rotation, scale, jitter). A training set is one subject rendered in N
independently drawn contexts, so the only thing the images of a set share is the subject.

The caption names the context and the generic class word "toy", never an attribute: a model trained
on these sets can only get the subject from the reference images, exactly the JeDi setting.

Designed to be learnable by a tiny pixel-space model at 32x32 (bold shapes filling ~1/3 of the frame
with a dark outline, six saturated colours, three coarse patterns, backgrounds in muted tones that
no subject colour uses) and to render at any resolution (4x supersampled below 128 px, so edges are
anti-aliased). Pure numpy; deterministic given a seed or a numpy Generator.

    subjects('train') / subjects('heldout')   fixed split (independent of any training seed)
    CONTEXTS                                   all (background, position) pairs
    render(subject, context, resolution=32, rng=0) -> (uint8 (H, W, 3), attrs dict)
    caption(context, rng)                      the caption text of a context
"""
import itertools
import math

import numpy as np

CLASS_WORD = "toy"
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
COLORS = {  # saturated, and none of them close to a background tone
    "red": (220, 30, 35), "orange": (255, 135, 0), "yellow": (255, 225, 0),
    "green": (0, 185, 60), "blue": (25, 70, 235), "purple": (160, 40, 210),
}
PATTERNS = ("solid", "stripes", "dots", "half")
PATTERN_COLORS = {"white": (255, 255, 255), "black": (15, 15, 15), "yellow": (255, 225, 0)}
OUTLINE = (25, 25, 25)

# Background -> the words the caption uses for it. Phrases never name a colour, shape or pattern.
BACKGROUNDS = {
    "beach": "on the beach", "grass": "on the grass", "snow": "in the snow", "night": "at night",
    "desert": "in the desert", "underwater": "under water", "forest": "in the forest", "table": "on a table",
}
POSITIONS = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
POSITION_X = {"left": 0.29, "middle": 0.5, "right": 0.71}
CONTEXTS = tuple(itertools.product(BACKGROUNDS, POSITIONS))  # 24 (background, position) pairs
# A close-up: the subject large and centred, like the subject-centric photos people give as references. Not in
# CONTEXTS (drawn only when render_set(closeup=...) asks for it), so default streams and the classifier's three
# positions are unchanged; its context is (background, CLOSE_UP).
CLOSE_UP = "close"
PHRASES = {**POSITIONS, CLOSE_UP: "close up"}
TEMPLATES = ("a photo of a {cls} {bg}, {pos}", "a {cls} {bg}, {pos}", "a {cls} {pos}, {bg}")
ATTRIBUTES = {"shape": SHAPES, "color": tuple(COLORS), "pattern": PATTERNS,
              "pattern_color": ("none",) + tuple(PATTERN_COLORS)}
# Every word a caption must never contain (test_data checks this on generated captions).
ATTRIBUTE_WORDS = set(SHAPES) | set(COLORS) | set(PATTERN_COLORS) | {"solid", "stripes", "striped", "dots", "dotted", "half", "stars"}
HOLDOUT_FRACTION = 0.1
SPLIT_SEED = 20240617  # fixed: the held-out subjects are the same for every training seed


class Subject(tuple):
    """(shape, color, pattern, pattern_color); a solid subject has pattern_color 'none'."""
    __slots__ = ()

    def __new__(cls, shape, color, pattern, pattern_color="none"):
        return super().__new__(cls, (shape, color, pattern, "none" if pattern == "solid" else pattern_color))

    def __getnewargs__(self):  # pickle (DataLoader workers under 'spawn') rebuilds from the four fields
        return tuple(self)

    shape = property(lambda s: s[0])
    color = property(lambda s: s[1])
    pattern = property(lambda s: s[2])
    pattern_color = property(lambda s: s[3])

    @property
    def id(self):
        return "-".join(self)

    @classmethod
    def from_id(cls, sid):
        return cls(*sid.split("-"))

    def attrs(self):
        return dict(zip(ATTRIBUTES, self))


def all_subjects():
    out = []
    for shape, color, pattern in itertools.product(SHAPES, COLORS, PATTERNS):
        if pattern == "solid":
            out.append(Subject(shape, color, pattern))
        else:  # a pattern in the body's own colour would be invisible
            out += [Subject(shape, color, pattern, pc) for pc in PATTERN_COLORS if pc != color]
    return out  # 6 shapes x (6 solid + 17 colour pairs x 3 patterns) = 342


def subjects(split="train"):
    """'train', 'heldout' or 'all'. Held-out subjects are new combinations of attribute values that all
    occur in training (compositional generalisation), so a model can represent them."""
    every = all_subjects()
    if split == "all":
        return every
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(every))
    n_hold = round(HOLDOUT_FRACTION * len(every))
    held = set(perm[:n_hold].tolist())
    pick = [i for i in range(len(every)) if (i in held) == (split == "heldout")]
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', not {split!r}")
    return [every[i] for i in pick]


def caption(context, rng=0, template=None):
    """Caption of an image of a subject in `context`; a random template unless `template` is an index."""
    bg, pos = context
    if template is None:
        template = np.random.default_rng(rng).integers(len(TEMPLATES))
    return TEMPLATES[template].format(cls=CLASS_WORD, bg=BACKGROUNDS[bg], pos=PHRASES[pos])


# ----------------------------------------------------------------------------- rendering

_GRIDS = {}


def _grid(size):
    # pixel centres in [0, 1]; y grows downwards as in the image
    if size not in _GRIDS:
        c = (np.arange(size, dtype=np.float32) + 0.5) / size
        _GRIDS[size] = (c[:, None], c[None, :])  # (S, 1), (1, S): broadcast instead of materialising
    return _GRIDS[size]


def _fill(img, mask, rgb):
    img[mask] = np.asarray(rgb, np.float32)


def _background(name, img, y, x, rng):
    S = img.shape[0]
    full = np.ones((S, S), bool)
    horizon = 0.5 + rng.uniform(-0.05, 0.05)
    below = (y > horizon) & full
    if name == "beach":
        _fill(img, full, (140, 200, 235)); _fill(img, below, (230, 205, 150))
        _fill(img, (y > horizon) & (y < horizon + 0.07) & full, (40, 110, 170))  # the sea
    elif name == "grass":
        _fill(img, full, (175, 215, 240)); _fill(img, below, (95, 140, 70))
    elif name == "snow":
        _fill(img, full, (185, 195, 210)); _fill(img, below, (245, 247, 250))
    elif name == "night":
        _fill(img, full, (15, 20, 45)); _fill(img, below, (40, 40, 60))
        mx = rng.choice([0.12, 0.88])
        _fill(img, ((x - mx) ** 2 + (y - 0.13) ** 2 < 0.07 ** 2), (240, 240, 205))  # moon
        for sx, sy in rng.uniform([0.05, 0.03], [0.95, horizon - 0.1], size=(5, 2)):
            _fill(img, (np.abs(x - sx) < 0.015) & (np.abs(y - sy) < 0.015), (250, 250, 250))
    elif name == "desert":
        dunes = horizon + 0.04 * np.sin(x * rng.uniform(6, 11) + rng.uniform(0, 6.3))
        _fill(img, full, (250, 220, 160)); _fill(img, (y > dunes), (225, 170, 95))
    elif name == "underwater":
        img[:] = (np.array([35, 125, 195], np.float32) * (1 - 0.6 * y)[..., None]) * full[..., None]
        for bx, by, br in rng.uniform([0.05, 0.05, 0.02], [0.95, 0.95, 0.045], size=(4, 3)):
            d = np.sqrt((x - bx) ** 2 + (y - by) ** 2)
            _fill(img, np.abs(d - br) < 0.012, (190, 230, 250))  # bubbles
    elif name == "forest":
        _fill(img, full, (30, 75, 40))
        for tx in rng.uniform(0, 1, size=4):
            _fill(img, (np.abs(x - tx) < 0.04) & (y < horizon + 0.15), (85, 60, 35))  # trunks
        _fill(img, (y > horizon + 0.15) & full, (55, 45, 30))
    elif name == "table":
        _fill(img, full, (210, 205, 200)); _fill(img, below, (115, 70, 35))
        _fill(img, below & (y < horizon + 0.05), (75, 45, 20))  # the table's front edge
    else:
        raise ValueError(f"unknown background {name!r}")
    return horizon


def _shape_distance(shape, u, v):
    """Approximate signed distance (in units of the subject radius) to the shape's edge; < 0 inside.
    u points right, v points up, both in the subject's rotated frame."""
    if shape == "circle":
        return np.sqrt(u * u + v * v) - 0.95
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.8
    if shape == "triangle":  # pointing up; inradius 0.55, centred on its centroid
        n = [(0.0, -1.0), (math.cos(math.pi / 6), 0.5), (-math.cos(math.pi / 6), 0.5)]
        return np.maximum.reduce([a * u + b * (v + 0.1) for a, b in n]) - 0.55
    if shape == "diamond":  # tall, so it never looks like a rotated square
        return (np.abs(u) / 0.8 + np.abs(v) / 1.15 - 1) * 0.65
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return np.minimum(np.maximum(au - 0.34, av - 0.95), np.maximum(av - 0.34, au - 0.95))
    if shape == "star":  # five points, one up
        rho, theta = np.sqrt(u * u + v * v), np.arctan2(u, v)
        tri = np.abs((theta * 5 / (2 * math.pi)) % 1.0 - 0.5) * 2  # 1 at the points, 0 between
        return (rho - (0.48 + 0.62 * tri)) * 0.8
    raise ValueError(f"unknown shape {shape!r}")


def _pattern_mask(pattern, u, v):
    if pattern == "stripes":
        return ((v + 5.0) / 0.62) % 1.0 < 0.5  # three bands across the body
    if pattern == "dots":
        du, dv = (u / 0.75 + 0.5) % 1.0 - 0.5, (v / 0.75 + 0.5) % 1.0 - 0.5
        return du * du + dv * dv < 0.3 ** 2
    if pattern == "half":
        return v > 0  # the upper half
    return np.zeros(np.broadcast(u, v).shape, bool)


def sample_pose(position, rng):
    """Random pose for a subject at a named position: rotation (deg), radius and centre (fractions of the side)."""
    if position == CLOSE_UP:  # ~2x the radius of a framed subject: it fills most of the frame
        return dict(angle=float(rng.uniform(-20, 20)), radius=float(rng.uniform(0.38, 0.44)),
                    x=float(0.5 + rng.uniform(-0.03, 0.03)), y=float(rng.uniform(0.47, 0.53)))
    return dict(angle=float(rng.uniform(-20, 20)), radius=float(rng.uniform(0.17, 0.24)),
                x=float(POSITION_X[position] + rng.uniform(-0.04, 0.04)), y=float(rng.uniform(0.5, 0.62)))


def render(subject, context, *, resolution=32, rng=0, pose=None, background_seed=None):
    """Draw `subject` in `context` = (background, position). Returns uint8 (H, W, 3) and the ground truth:
    the subject's attributes, the context, the pose and the caption-free ids (for evaluation).
    background_seed: draw the background's details (horizon, trees, stars, ...) from this seed instead of rng,
    so several images can share one scene."""
    subject = subject if isinstance(subject, Subject) else Subject(*subject)
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    bg, pos = context
    ss = max(1, math.ceil(128 / resolution))  # supersampling factor: anti-aliased edges at low res
    S = resolution * ss
    y, x = _grid(S)
    img = np.empty((S, S, 3), np.float32)
    _background(bg, img, y, x, rng if background_seed is None else np.random.default_rng(background_seed))
    pose = dict(pose) if pose is not None else sample_pose(pos, rng)
    a = math.radians(pose["angle"])
    dx, dy = (x - pose["x"]) / pose["radius"], (pose["y"] - y) / pose["radius"]  # dy up
    u = math.cos(a) * dx + math.sin(a) * dy  # (S, S) rotated subject frame
    v = -math.sin(a) * dx + math.cos(a) * dy
    d = _shape_distance(subject.shape, u, v)
    body = d < 0
    _fill(img, (d < 0.13) & ~body, OUTLINE)  # dark outline: shape reads against any background
    _fill(img, body, COLORS[subject.color])
    if subject.pattern != "solid":
        _fill(img, body & _pattern_mask(subject.pattern, u, v), PATTERN_COLORS[subject.pattern_color])
    img = img.reshape(resolution, ss, resolution, ss, 3).mean(axis=(1, 3))  # box-filter down to resolution
    info = dict(subject.attrs(), subject=subject.id, background=bg, position=pos, **pose)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), info


def render_set(subject, n, *, resolution=32, rng=0, contexts=None, same_pose=False, video=False, closeup=0.0):
    """One training set: `subject` in n contexts (random unless given). Returns images, captions, attrs.
    same_pose: one position and pose for the whole set (random contexts then differ only in background), as in
    a photo series of one object; the subject then sits at the same place in every image.
    video: one scene (background and its details) for the whole set while the subject moves (its own random
    position and pose per image), like the frames of a video clip.
    closeup: the probability that each randomly placed image is a close-up instead (CLOSE_UP: subject large and
    centred); not with same_pose or given contexts. At 0 nothing extra is drawn."""
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    if not 0 <= closeup <= 1:
        raise ValueError(f"closeup is a probability, not {closeup}")
    if closeup and (same_pose or contexts is not None):
        raise ValueError("closeup applies to randomly placed images: not with same_pose or given contexts")
    pose = background_seed = None
    if video:
        if same_pose:
            raise ValueError("same_pose and video exclude each other")
        bg = tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))] if contexts is None else contexts[0][0]
        if contexts is None:
            contexts = [(bg, tuple(POSITIONS)[i]) for i in rng.integers(len(POSITIONS), size=n)]
        if any(c[0] != bg for c in contexts):
            raise ValueError("video needs one background for the whole set")
        background_seed = int(rng.integers(2 ** 32))
    if same_pose:
        pos = tuple(POSITIONS)[rng.integers(len(POSITIONS))] if contexts is None else contexts[0][1]
        if contexts is None:
            contexts = [(tuple(BACKGROUNDS)[i], pos) for i in rng.integers(len(BACKGROUNDS), size=n)]
        if any(c[1] != pos for c in contexts):
            raise ValueError("same_pose needs one position for the whole set")
        pose = sample_pose(pos, rng)
    if contexts is None:
        contexts = [CONTEXTS[i] for i in rng.integers(len(CONTEXTS), size=n)]
    if closeup:
        contexts = [(bg, CLOSE_UP) if c else (bg, pos) for (bg, pos), c in zip(contexts, rng.random(n) < closeup)]
    images, captions, attrs = [], [], []
    for ctx in contexts:
        im, info = render(subject, ctx, resolution=resolution, rng=rng, pose=pose, background_seed=background_seed)
        images.append(im)
        captions.append(caption(ctx, rng))
        attrs.append(info)
    return images, captions, attrs
