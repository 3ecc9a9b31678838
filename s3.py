r"""The Synthetic Same-Subject (S³) data engine of paper §3.1: object names -> same-subject image sets for train.py.

    python s3.py all config/s3_sd15.py                                  # the whole chain, one process
    python s3.py all config/s3_sdxl.py                                  # collages from SDXL, as the paper
    python s3.py collages --manifest out/s3 config/s3_sd15.py --batch_size=16   # one stage
    torchrun --standalone --nproc_per_node=8 s3.py all config/s3_sd15.py  # 8 GPUs (any nodes: as train.py)

Stages, each a resumable step over the working folder `manifest` (M):
  prompts      object names (a text file, or the built-in list) -> descriptive prompts         M/prompts/<obj>.json
  collages     prompt + ", photos of the same" -> a photo collage (local SDXL as the paper, or
               SD-1.x; CFG), or a folder of collages made elsewhere (collages_from)           M/collages/<id>.png
  instances    Grounding-DINO (object name) + SAM -> one cut-out + mask per instance, or
               user masks (masks_from); tiny, too large, border-cut and overlapping ones dropped M/instances/<id>/
  filter       2-4 instances whose pairwise CLIP image similarity is >= min_similarity
               (and <= max_similarity, off by default)                                         M/filter/<id>.json
  backgrounds  each instance pasted at a random place and scale on a blank canvas, the background inpainted
               (SD-1.x or SDXL inpainting) from a new prompt; the subject's pixels kept exactly M/backgrounds/<id>/
  stylize      with p = stylize_p, one random instruction for the whole set (InstructPix2Pix) M/stylize/<id>/
  write        M/sets.jsonl (what data.py reads: one set per line, per-image captions), M/stats.json
               (kept / dropped per stage with reasons), one contact sheet per output shard    M/sets/shard-*.png

Every work item's output is written under a temporary name and renamed; its JSON record is written last and
marks it done, so a rerun (or a run killed with SIGKILL and rerun) skips what exists and ends with exactly the
manifest of an uninterrupted run. Items are cut into fixed batches of `batch_size` over the sorted item list and
batch i belongs to rank i % world_size: under torchrun every rank takes a disjoint share and the batches (so the
numbers) do not depend on the world size. All randomness is seeded per item from (seed, stage, item id).
Weights are only read from local paths (docs/s3.md lists which); every missing path is reported at once, before
any work. Config: the typed globals below, then config/s3_*.py files, then --key=value (or --key value).
"""
import glob
import json
import math
import os
import re
import sys
import time
import zlib
from collections import Counter
from itertools import combinations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import configurator
from data import IMAGE_EXTS, BadSample, load_image
from model.files import atomic_path
from sample import to_pil
from vision import MissingWeights, VisionError, _require_file, _require_hf_folder, _save_atomic, read_mask, write_mask

# ----------------------------------------------------------------------------- config
manifest: str = 'out-s3'  # the working folder: every stage reads and writes under it
seed: int = 0  # base of every random draw: each item is seeded from (seed, stage, item id)
device: str = 'auto'  # 'auto' (cuda:LOCAL_RANK if available) | 'cpu' | 'cuda'
dtype: str = 'auto'  # 'auto' | 'bfloat16': bf16 autocast on CUDA (CPU always runs float32) | 'float32'
batch_size: int = 8  # work items per batch (prompts, collages or sets); one batched UNet call per step
num_heads: int = 0  # UNet heads of SD-1.x checkpoints (shapes cannot tell); 0: 8. SDXL's: always head dim 64
sampler: str = 'ddim'  # 'ddim' | 'dpmpp_2m'
# prompts
objects: str = ''  # a text file of object names, one per line ('' = the built-in OBJECTS)
num_objects: int = 0  # use only the first N objects (0 = all)
prompts_per_object: int = 8  # descriptive prompts written per object name
llm: str = ''  # a local transformers causal-LM folder; '' = the built-in template expander
llm_max_new_tokens: int = 48  # tokens the local LLM may write per prompt
# collages
sd: str = ''  # SDXL or SD-1.x text-to-image checkpoint: .ckpt / .safetensors / diffusers folder (flavour from keys)
collages_from: str = ''  # instead: a folder of collages made elsewhere, x.png + x.json {"prompt", "object"}
collage_suffix: str = 'photos of the same'  # the paper's suffix, appended as "<prompt>, <suffix>"
collage_resolution: int = 512  # pixels per side of each generated collage (SDXL: also its size conditioning)
collage_steps: int = 30  # sampling steps per collage
collage_guidance: float = 7.5  # classifier-free text guidance scale of the collages
# instances
grounding_dino: str = ''  # transformers Grounding-DINO folder
sam: str = ''  # transformers SAM folder
masks_from: str = ''  # instead: user masks, <masks_from>/<collage id>.<k>.mask.png (white = the instance)
box_threshold: float = 0.3  # Grounding-DINO box confidence a detection needs
text_threshold: float = 0.25  # Grounding-DINO text-match confidence a detection needs
min_area: float = 0.01  # an instance covers at least this share of the collage ...
max_area: float = 0.5  # ... and at most this (a box around the whole collage is not an instance)
border: int = 2  # pixels: a mask this close to the collage's edge is cut by it (-1 = keep those)
max_instances: int = 8  # the most confident detections (or user masks) per collage, at most MAX_INSTANCES
max_overlap: float = 0.2  # a mask sharing more than this share of the smaller one with a better one is dropped
# filter
clip_model: str = 'ViT-B-32-quickgelu'  # open_clip architecture name or .json
clip_weights: str = ''  # local CLIP weights file
min_similarity: float = 0.95  # the paper's threshold on pairwise CLIP image similarity
max_similarity: float = 1.0  # drop near-duplicates above this (1.0 = off; SynCD uses 0.98 with DINOv2)
min_set_size: int = 2  # fewest instances a kept set has; a collage with fewer is dropped
max_set_size: int = 4  # most instances a set keeps (the largest, then most similar, subset)
# backgrounds
inpaint: str = ''  # SD-1.x or SDXL inpainting checkpoint (9 input channels)
canvas: int = 512  # pixels, square
scale_min: float = 0.4  # the pasted instance's longer side, as a share of the canvas
scale_max: float = 0.75  # ... and at most this share
inpaint_steps: int = 30  # sampling steps of the background inpainting
inpaint_guidance: float = 7.5  # text guidance scale of the background inpainting
# stylize
ip2p: str = ''  # InstructPix2Pix checkpoint (SD-1.x, 8 input channels)
stylize_p: float = 0.5  # probability that a set is stylized (one random instruction for the whole set)
ip2p_steps: int = 20  # InstructPix2Pix sampling steps
ip2p_text_guidance: float = 7.5  # InstructPix2Pix guidance scale of the instruction
ip2p_image_guidance: float = 1.5  # InstructPix2Pix guidance scale of the source image
# write
shard_size: int = 1000  # sets per output shard (one JSONL and one contact sheet each)
contact_sets: int = 24  # sets drawn on each contact sheet
contact_thumb: int = 96  # pixels per side of each thumbnail on a contact sheet
config_keys = configurator.config_keys(globals())

STAGES = ('prompts', 'collages', 'instances', 'filter', 'backgrounds', 'stylize', 'write')
MAX_INSTANCES = 8  # the filter tries every subset of up to max_set_size instances: C(8, 4) = 70, C(16, 4) = 1820


class S3Error(Exception):
    """Bad input or setup, or a stage with nothing to pass on: one line on stderr, exit status 2."""


def configure(argv):
    """Config files, then --key=value flags, into this module's globals (configurator.py)."""
    configurator.configure(argv, globals(), config_keys, S3Error)


def cfg() -> dict:
    return {k: globals()[k] for k in config_keys}


# ----------------------------------------------------------------------------- built-in vocabularies

BUILTIN_OBJECTS = (
    "backpack", "handbag", "suitcase", "umbrella", "tie", "sun hat", "baseball cap", "beanie", "scarf", "glove",
    "sneaker", "boot", "sandal", "high heel shoe", "sunglasses", "wristwatch", "necklace", "bracelet", "ring",
    "wallet", "belt", "jacket", "hoodie", "sweater", "t-shirt", "dress", "raincoat", "teddy bear", "plush dog",
    "plush cat", "plush bunny", "plush elephant", "plush penguin", "rubber duck", "toy car", "toy train",
    "toy robot", "toy dinosaur", "action figure", "doll", "wooden horse", "spinning top", "yo-yo", "kite",
    "rubik's cube", "building blocks", "marionette", "mug", "teacup", "teapot", "coffee pot", "kettle",
    "water bottle", "wine glass", "vase", "bowl", "plate", "jar", "pitcher", "thermos", "lunch box", "cookie jar",
    "salt shaker", "pepper grinder", "cutting board", "frying pan", "saucepan", "wooden spoon", "whisk", "ladle",
    "rolling pin", "toaster", "blender", "coffee grinder", "espresso machine", "rice cooker", "apple", "banana",
    "orange", "lemon", "pear", "peach", "strawberry", "pineapple", "watermelon", "avocado", "tomato", "pumpkin",
    "mushroom", "cupcake", "donut", "croissant", "bagel", "pretzel", "slice of cake", "macaron", "slice of pizza",
    "burger", "sandwich", "taco", "sushi roll", "ice cream cone", "chair", "armchair", "stool", "bench", "sofa",
    "ottoman", "rocking chair", "desk lamp", "floor lamp", "lantern", "candle", "alarm clock", "wall clock",
    "mirror", "picture frame", "cushion", "basket", "birdhouse", "flower pot", "potted plant", "cactus",
    "succulent", "bonsai tree", "guitar", "ukulele", "violin", "trumpet", "saxophone", "drum", "tambourine",
    "harmonica", "accordion", "flute", "laptop", "tablet", "smartphone", "camera", "film camera", "headphones",
    "earbuds", "speaker", "radio", "television", "game controller", "keyboard", "computer mouse", "typewriter",
    "microphone", "record player", "cassette tape", "calculator", "book", "notebook", "pencil", "fountain pen",
    "crayon", "paintbrush", "eraser", "stapler", "scissors", "globe", "hourglass", "compass",
    "magnifying glass", "telescope", "binoculars", "microscope", "bicycle", "scooter", "skateboard",
    "roller skate", "motorcycle", "car", "vintage car", "pickup truck", "bus", "tram", "tractor", "sailboat",
    "canoe", "airplane", "helicopter", "hot air balloon", "rocket", "soccer ball", "basketball", "football",
    "baseball", "tennis racket", "tennis ball", "baseball bat", "golf ball", "bowling ball", "volleyball",
    "frisbee", "dumbbell", "kettlebell", "boxing glove", "hockey stick", "surfboard", "snowboard", "helmet",
    "hammer", "wrench", "screwdriver", "pliers", "saw", "drill", "tape measure", "flashlight", "toolbox",
    "padlock", "key", "watering can", "shovel", "rake", "wheelbarrow", "garden gnome", "bird feeder",
    "perfume bottle", "lipstick", "hairbrush", "comb", "hair dryer", "toothbrush", "soap dispenser",
    "candle holder", "jewelry box", "music box", "snow globe", "figurine", "porcelain cat", "ceramic owl",
    "ceramic frog", "wooden bird", "clay pot", "sculpture", "bust", "chess piece", "dice", "piggy bank",
    "trophy", "medal", "dog", "puppy", "cat", "kitten", "rabbit", "hamster", "guinea pig", "parrot", "owl",
    "duck", "chicken", "horse", "pony", "cow", "sheep", "goat", "pig", "fox", "raccoon", "squirrel", "hedgehog",
    "turtle", "tortoise", "frog", "lizard", "snake", "goldfish", "penguin", "panda", "koala", "lion", "tiger",
    "elephant", "giraffe", "zebra", "monkey", "bear", "deer", "gift box", "treasure chest", "wooden crate",
    "paper bag", "tote bag", "cardboard box", "sneaker box", "fire hydrant", "traffic cone", "mailbox",
    "street lamp", "park bench", "wine bottle", "beer mug", "cocktail glass", "champagne bottle", "soda can",
    "milk carton", "cereal box", "honey jar", "jam jar", "pot of soup", "loaf of bread", "cheese wheel",
)
COLOURS = ("red", "blue", "green", "yellow", "orange", "purple", "pink", "white", "black", "grey", "brown", "teal",
           "turquoise", "golden", "silver", "navy blue", "mint green", "pastel pink", "cream", "burgundy")
MATERIALS = ("wooden", "ceramic", "metal", "plastic", "glass", "leather", "knitted", "felt", "porcelain",
             "stone", "brass", "bamboo", "velvet", "rubber", "paper", "woven", "chrome", "marble", "clay", "denim")
ATTRIBUTES = ("vintage", "cute", "modern", "handmade", "shiny", "matte", "striped", "polka-dot", "tiny",
              "oversized", "minimalist", "ornate", "retro", "rustic", "colorful", "elegant", "worn", "glossy",
              "patterned", "futuristic")
SETTINGS = ("on a wooden table", "on a beach", "in a forest", "on a city street", "in a living room",
            "on a kitchen counter", "in the snow", "on green grass", "on a marble floor", "in a desert",
            "next to a window", "on a bookshelf", "in a garden", "on a mountain top", "by a lake", "on a rooftop",
            "in a cafe", "under cherry blossoms", "on a picnic blanket", "in a studio with soft light",
            "on a rock by the sea", "in a field of flowers", "on a park bench", "at night under neon lights")
PROMPT_TEMPLATES = ("a photo of a {attribute} {colour} {material} {object}",
                    "a {colour} {material} {object}, {attribute} style",
                    "a {attribute} {object} made of {colour} {material_noun}",
                    "a close-up photo of a {colour} {object} with a {attribute} {material} finish")
STYLES = (  # (InstructPix2Pix instruction, what the caption gains)
    ("make it a watercolor painting", "as a watercolor painting"),
    ("turn it into an oil painting", "as an oil painting"),
    ("make it a pencil sketch", "as a pencil sketch"),
    ("make it look like a cartoon", "in cartoon style"),
    ("turn it into an anime illustration", "as an anime illustration"),
    ("make it a charcoal drawing", "as a charcoal drawing"),
    ("make it look like a vintage photograph", "as a vintage photograph"),
    ("turn it into pixel art", "as pixel art"),
    ("make it a pop art poster", "in pop art style"),
    ("make it look like a clay model", "as a claymation figure"),
    ("make it a stained glass window", "as stained glass"),
    ("make it look like a 3d render", "as a 3d render"),
    ("make it snowy", "in a snowstorm"),
    ("make it sunset", "at sunset"),
    ("make it night time", "at night"),
    ("make it look like a Van Gogh painting", "in the style of Van Gogh"),
)


def _material_noun(m):
    return {"wooden": "wood", "knitted": "yarn", "woven": "wicker", "golden": "gold"}.get(m, m)


# ----------------------------------------------------------------------------- small helpers

def _seed(*parts) -> int:
    """A seed per (seed, stage, item, ...): the same item gets the same numbers in any run, order or world size."""
    return zlib.crc32("/".join(map(str, (seed, *parts))).encode()) % 2**31


def _rng(*parts) -> np.random.Generator:
    return np.random.default_rng(_seed(*parts))


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "x"


def _write_json(path, obj):
    """Atomic (model.files.atomic_path): a killed run never leaves a half-written record that a rerun takes as done."""
    _write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def undecodable(e: BaseException) -> bool:
    """An input that is not a readable image (garbage, truncated, empty; PIL's and data.load_image's errors): the
    one reason an item is recorded as a `corrupt` drop, which reruns skip. Anything else (out of memory, a missing
    file, a disk error with its errno, an API change) is not the input's fault: it stops the stage, and the item,
    with no record written, is redone by the rerun."""
    from PIL import UnidentifiedImageError

    if isinstance(e, (BadSample, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError, EOFError)):
        return True
    return type(e) is OSError and e.errno is None  # "image file is truncated", "broken data stream ..."


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _records(stage: str) -> dict:
    """{item id: record} of a stage's finished items (its JSON records; temporary and hidden files are not)."""
    return {os.path.basename(p)[:-5]: _read_json(p) for p in sorted(glob.glob(os.path.join(manifest, stage, "*.json")))}


PASSES_ON = {"collages": lambda r: "dropped" not in r, "filter": lambda r: bool(r["kept"])}  # others: every item


def live(stage: str) -> dict:
    """The records of a stage whose item the previous stage still passes on: after an earlier stage is redone
    (its folder deleted, new settings), later stages' records of items it no longer passes on are ignored."""
    recs = _records(stage)
    if stage == "prompts":
        return recs
    if stage == "collages":
        ids = {i["id"] for i in (imported_collages() if collages_from else prompt_items())}
    else:
        prev = STAGES[STAGES.index(stage) - 1]
        ok = PASSES_ON.get(prev, lambda r: True)
        ids = {k for k, r in live(prev).items() if ok(r)}
    return {k: v for k, v in recs.items() if k in ids}


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) in [-1, 1], at its own size (sample.image_to_tensor also crops and resizes)."""
    a = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # (H, W, 3)
    return a.permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W)


# ----------------------------------------------------------------------------- runtime: ranks, device, models

class Runtime:
    """Rank, world size and device; torch.distributed (gloo on CPU, nccl on GPU) only under torchrun."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if device == "cuda" and not torch.cuda.is_available():
            raise S3Error("device='cuda' but no CUDA device is available")
        self.device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        if dtype not in ("auto", "float32", "bfloat16"):
            raise S3Error(f"dtype must be auto, float32 or bfloat16, not {dtype!r}")
        self.autocast = use_cuda and dtype != "float32"
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
        self.models = {}

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def amp(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast)

    def mine(self, items: list) -> list:
        """This rank's batches: fixed chunks of `batch_size` of the sorted item list, chunk i to rank i % world."""
        chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
        return chunks[self.rank::self.world]


# The base models each stage can run: the collages and backgrounds take SD-1.x or SDXL (told from the checkpoint's
# keys by model.loading), InstructPix2Pix is SD-1.x only (no SDXL InstructPix2Pix is tested against its pipeline here).
STAGE_FLAVOURS = {"sd": ("sd1", "sdxl"), "inpaint": ("sd1", "sdxl"), "ip2p": ("sd1",)}


def _flavour_of(config) -> str:
    """A base UNet's flavour from its config: SDXL has the vector input (label_emb), the loader's rule."""
    return "sdxl" if config.adm_in_channels is not None else "sd1"


def _model_flavour(path) -> str:
    """The flavour of a base checkpoint (file or diffusers folder) from its keys, reading no tensor data."""
    from model.loading import read_parts

    return read_parts(path, shapes_only=True).flavour.name


def _check_model(key, path, what, config, channels):
    """The one-line refusal of a checkpoint with the wrong input channels or flavour for its stage, or None."""
    if config.in_channels != channels:
        return f"{what} {path}: its UNet takes {config.in_channels} input channels, expected {channels}"
    if _flavour_of(config) not in STAGE_FLAVOURS[key]:
        return f"{what} {path}: an {_flavour_of(config)} model; this stage takes {' or '.join(STAGE_FLAVOURS[key])}"
    return None


def _load_sd(rt, key, path, channels, what):
    """An SD-1.x or SDXL checkpoint with its own input channels (4, 9 for inpainting, 8 for InstructPix2Pix), loaded
    once per process: the project's model bundle (model.loading.JeDi: encode, null, to_latents, to_pixels), whose
    text conditioner is the flavour's (SDXL: two encoders, pooled text and size features)."""
    from model.loading import CheckpointError, load_sd

    if key not in rt.models:
        try:
            m = load_sd(path, num_heads=_num_heads(path), in_channels=None, device=rt.device)
        except (CheckpointError, FileNotFoundError) as e:
            raise S3Error(f"{what} {path}: {e}") from None
        bad = _check_model(key, path, what, m.unet.config, channels)
        if bad:
            raise S3Error(bad)
        rt.models[key] = m
    return rt.models[key]


def _num_heads(path) -> int | None:
    """The `num_heads` setting for an SD-1.x checkpoint; None for SDXL, whose head dim 64 the flavour fixes (a head
    count meant for the SD-1.x inpainting model of the same run must not reshape an SDXL base's attention)."""
    from model.loading import CheckpointError

    try:
        sdxl = _model_flavour(path) == "sdxl"
    except (CheckpointError, OSError, KeyError, ValueError):  # unreadable: the loader says why, in one line
        sdxl = False
    return None if sdxl else (num_heads or None)


def sizes(pixels: int) -> dict:
    """SDXL's micro-conditioning of an image made whole at `pixels`²: original = target = that size, crop (0, 0)
    (what sgm's and diffusers' SDXL samplers pass by default). A SD-1.x conditioner ignores it."""
    return dict(original_size=(pixels, pixels), crop_top_left=(0, 0), target_size=(pixels, pixels))


def needed_weights(stages) -> list:
    """A check (raising MissingWeights) for every local weight path and input folder the stages will read."""
    def path(key, what, channels):  # an SD-1.x or SDXL checkpoint: a file or a diffusers folder
        from model.loading import CheckpointError, check_sd

        p = globals()[key]
        if not p or not os.path.exists(p):
            raise MissingWeights(f"{what} not found: expected {p!r} (a .ckpt / .safetensors file or a diffusers "
                                 f"folder)" if p else f"{what}: no path given")
        try:  # names and shapes only: a wrong or damaged checkpoint is refused before any work
            config = check_sd(p, num_heads=_num_heads(p), in_channels=None)
        except CheckpointError as e:
            raise MissingWeights(f"{what}: {str(e).replace(chr(10), ' ')}") from None
        bad = _check_model(key, p, what, config, channels)
        if bad:
            raise MissingWeights(bad)

    def folder(p, what):
        if not os.path.isdir(p):
            raise MissingWeights(f"{what}: no folder {p!r}")

    checks = []
    for s in stages:
        if s == "prompts" and llm:
            checks.append(lambda: _require_hf_folder(llm, "prompt LLM (--llm)"))
        if s == "collages":
            checks.append(lambda: folder(collages_from, "collages_from") if collages_from
                          else path("sd", "text-to-image checkpoint (--sd)", 4))
        if s == "instances":
            if masks_from:
                checks.append(lambda: folder(masks_from, "masks_from"))
            else:
                checks.append(lambda: _require_hf_folder(grounding_dino, "Grounding-DINO (--grounding_dino)"))
                checks.append(lambda: _require_hf_folder(sam, "SAM (--sam)"))
        if s == "filter":
            if clip_model.endswith(".json"):
                checks.append(lambda: _require_file(clip_model, "CLIP architecture config (--clip_model)"))
            checks.append(lambda: _require_file(clip_weights, f"CLIP weights for {clip_model} (--clip_weights)"))
        if s == "backgrounds":
            checks.append(lambda: path("inpaint", "inpainting checkpoint (--inpaint)", 9))
        if s == "stylize" and stylize_p > 0:
            checks.append(lambda: path("ip2p", "InstructPix2Pix checkpoint (--ip2p)", 8))
    return checks


def check_weights(stages):
    """Every missing weight path at once, before any work."""
    missing = []
    for check in needed_weights(stages):
        try:
            check()
        except MissingWeights as e:
            missing.append(str(e))
    if missing:
        raise MissingWeights(f"{len(missing)} missing or unusable: " + "\n       ".join(missing))


# ----------------------------------------------------------------------------- the stage loop

def run_items(rt: Runtime, stage: str, items: list, done, process, unit="item"):
    """Run `process(batch)` over this rank's batches that are not done; a batch with any item missing is
    recomputed whole (the same batch gives the same numbers) and only its missing items are written."""
    from tqdm import tqdm

    mine = rt.mine(items)
    todo = [b for b in mine if not all(done(i) for i in b)]
    n_mine, n_todo = sum(map(len, mine)), sum(len(b) for b in todo)
    bar = tqdm(total=n_mine, initial=n_mine - n_todo, desc=f"{stage} [rank {rt.rank}]", unit=unit,
               dynamic_ncols=True, disable=None)
    t0 = time.perf_counter()
    for b in todo:
        process(b)
        bar.update(len(b))
    bar.close()
    dt = time.perf_counter() - t0
    if n_todo:
        print(f"{stage}: rank {rt.rank} made {n_todo} {unit}s in {dt:.1f} s ({n_todo / max(dt, 1e-9):.2f} {unit}s/s), "
              f"{n_mine - n_todo} already done", file=sys.stderr)
    return n_todo, dt


def _nothing(stage, msg):
    raise S3Error(f"{stage}: nothing to pass on: {msg}")


# ----------------------------------------------------------------------------- 1. prompts

def object_names() -> list[str]:
    if objects:
        if not os.path.isfile(objects):
            raise S3Error(f"objects: no file {objects!r} (one object name per line)")
        with open(objects, encoding="utf-8") as f:
            names = [" ".join(line.split()) for line in f if line.strip() and not line.startswith("#")]
    else:
        names = list(BUILTIN_OBJECTS)
    names = list(dict.fromkeys(names))  # first occurrence wins
    if num_objects:
        names = names[:num_objects]
    by_slug = {}
    for n in names:
        if slug(n) in by_slug:
            raise S3Error(f"objects {by_slug[slug(n)]!r} and {n!r} have the same file name {slug(n)!r}: rename one")
        by_slug[slug(n)] = n
    if not names:
        raise S3Error(f"prompts: no object names in {objects or 'the built-in list'}")
    return names


def template_prompts(name: str, n: int) -> list[str]:
    """n descriptive prompts for one object, from attributes x materials x colours: same seed, same prompts."""
    rng, out = _rng("prompts", name), []
    for _ in range(n * 20):
        t = PROMPT_TEMPLATES[rng.integers(len(PROMPT_TEMPLATES))]
        m = MATERIALS[rng.integers(len(MATERIALS))]
        p = t.format(attribute=ATTRIBUTES[rng.integers(len(ATTRIBUTES))], colour=COLOURS[rng.integers(len(COLOURS))],
                     material=m, material_noun=_material_noun(m), object=name)
        if p not in out:
            out.append(p)
        if len(out) == n:
            break
    return out


class LLMPrompts:
    """A local causal LM (transformers folder) writing one descriptive sentence per prompt, seeded per prompt."""

    def __init__(self, folder, rt):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).to(rt.device).eval()
        self.device = rt.device

    @torch.no_grad()
    def __call__(self, name: str, n: int) -> list[str]:
        out = []
        for j in range(n):
            ask = f"Write a short description of a photo of a {name}.\nDescription: a photo of a {name}"
            ids = self.tok(ask, return_tensors="pt").to(self.device)
            torch.manual_seed(_seed("llm", name, j))
            gen = self.model.generate(**ids, do_sample=True, top_p=0.9, max_new_tokens=llm_max_new_tokens,
                                      pad_token_id=self.tok.pad_token_id or self.tok.eos_token_id)
            text = self.tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
            text = " ".join("".join(c for c in text.split("\n")[0] if c.isprintable()).split())  # one clean line
            sep = " " if text[:1].isalnum() else ""  # the model continues "... a photo of a mug"
            out.append(f"a photo of a {name}{sep}{text}".rstrip(" .")[:300])
        return out


def stage_prompts(rt):
    names = object_names()
    expand = template_prompts
    if llm:
        if "llm" not in rt.models:
            rt.models["llm"] = LLMPrompts(llm, rt)
        expand = rt.models["llm"]
    out = lambda name: os.path.join(manifest, "prompts", slug(name) + ".json")  # noqa: E731

    def process(batch):
        for name in batch:
            if not os.path.isfile(out(name)):
                _write_json(out(name), {"object": name, "prompts": expand(name, prompts_per_object)})
    return run_items(rt, "prompts", names, lambda n: os.path.isfile(out(n)), process, unit="object")


def prompt_items() -> list[dict]:
    """Every prompt of the prompts stage as a collage item {"id", "object", "prompt"}, sorted by id."""
    items = []
    for key, rec in live("prompts").items():
        items += [{"id": f"{key}-{j:03d}", "object": rec["object"], "prompt": p} for j, p in enumerate(rec["prompts"])]
    return sorted(items, key=lambda r: r["id"])


# ----------------------------------------------------------------------------- 2. collages

def imported_collages() -> list[dict]:
    """A folder of collages made elsewhere: x.png (any IMAGE_EXTS) + x.json {"prompt", "object"}, or x.txt with
    the prompt (the object is then the prompt itself)."""
    items = []
    for f in sorted(os.listdir(collages_from)):
        stem, ext = os.path.splitext(f)
        if ext.lower() not in IMAGE_EXTS or stem.endswith(".mask"):
            continue
        meta, txt = os.path.join(collages_from, stem + ".json"), os.path.join(collages_from, stem + ".txt")
        if os.path.isfile(meta):
            m = _read_json(meta)
            prompt, obj = m["prompt"], m.get("object", m["prompt"])
        elif os.path.isfile(txt):
            with open(txt, encoding="utf-8") as fh:
                prompt = obj = fh.read().strip()
        else:
            raise S3Error(f"collages_from: {f} has no prompt: expected {stem}.json or {stem}.txt beside it")
        items.append({"id": slug(stem), "object": obj, "prompt": prompt, "file": os.path.join(collages_from, f)})
    if len({i["id"] for i in items}) != len(items):
        raise S3Error(f"collages_from: two file names in {collages_from} give the same id")
    return items


def stage_collages(rt):
    out = lambda i: os.path.join(manifest, "collages", i["id"])  # noqa: E731
    done = lambda i: os.path.isfile(out(i) + ".json")  # noqa: E731
    if collages_from:
        items = imported_collages()
        if not items:
            raise S3Error(f"collages: no images in {collages_from}")

        def process(batch):
            for it in (it for it in batch if not done(it)):
                rec = {"id": it["id"], "object": it["object"], "prompt": it["prompt"], "source": it["file"]}
                try:
                    img = load_image(it["file"])
                except Exception as e:
                    if not undecodable(e):
                        raise
                    rec["dropped"] = f"corrupt: {e.__class__.__name__}"  # skipped and counted
                else:
                    _save_atomic(img, out(it) + ".png")
                _write_json(out(it) + ".json", rec)
        return run_items(rt, "collages", items, done, process, unit="collage")
    from model.diffusion import sample, text_guided

    items = prompt_items()
    if not items:
        _nothing("collages", "the prompts stage left no prompts (run `python s3.py prompts` first)")
    m = _load_sd(rt, "sd", sd, 4, "--sd")
    size = sizes(collage_resolution)  # SDXL: each collage is a whole image at this size
    null = m.null(**size)
    r = collage_resolution // m.down
    flavour = _flavour_of(m.unet.config)

    def process(batch):
        prompts = [f"{it['prompt']}, {collage_suffix}" if collage_suffix else it["prompt"] for it in batch]
        with torch.no_grad(), rt.amp():
            cond = m.encode(prompts, **size)  # Cond: SD-1.x context; SDXL context + pooled text and sizes
            fn = text_guided(m.unet, m.diffusion, cond, null, collage_guidance)
            gen = torch.Generator(device=rt.device).manual_seed(_seed("collages", batch[0]["id"]))
            z = sample(fn, m.diffusion, (len(batch), 4, r, r), steps=collage_steps, sampler=sampler,
                       generator=gen, device=rt.device)
            px = m.to_pixels(z)
        for it, p, x in zip(batch, prompts, px):
            if not done(it):
                _save_atomic(to_pil(x), out(it) + ".png")
                _write_json(out(it) + ".json", {"id": it["id"], "object": it["object"], "prompt": it["prompt"],
                                                "collage_prompt": p, "source": "sd", "model": flavour})
    return run_items(rt, "collages", items, done, process, unit="collage")


# ----------------------------------------------------------------------------- 3. instances

def select_instances(found: list[dict], shape) -> tuple[list[dict], Counter]:
    """Drop tiny, too large, border-cut and overlapping instances (a better-scoring one wins an overlap).
    found: [{"mask": bool (H, W), "score": float, ...}] -> (kept, Counter of drop reasons)."""
    H, W = shape
    kept, dropped = [], Counter()
    for inst in sorted(found, key=lambda d: -d["score"]):
        m = inst["mask"]
        area = int(m.sum())
        if area == 0:
            dropped["empty"] += 1
            continue
        if area < min_area * H * W:
            dropped["tiny"] += 1
            continue
        if area > max_area * H * W:
            dropped["too_large"] += 1
            continue
        if border >= 0:
            ys, xs = np.nonzero(m)
            if ys.min() <= border or xs.min() <= border or ys.max() >= H - 1 - border or xs.max() >= W - 1 - border:
                dropped["border"] += 1
                continue
        if any((m & k["mask"]).sum() > max_overlap * min(area, int(k["mask"].sum())) for k in kept):
            dropped["overlap"] += 1
            continue
        kept.append(inst)
    return kept, dropped


def user_masks(cid: str) -> list[dict]:
    files = sorted(glob.glob(os.path.join(masks_from, glob.escape(cid) + ".*.mask.png")))
    return [{"mask": read_mask(f), "score": 1.0 - 1e-3 * k, "file": f} for k, f in enumerate(files)]


def stage_instances(rt):
    items = sorted((r for r in live("collages").values() if "dropped" not in r), key=lambda r: r["id"])
    if not items:
        _nothing("instances", "no collages to cut (run the collages stage first)")
    out = lambda i: os.path.join(manifest, "instances", i["id"])  # noqa: E731
    done = lambda i: os.path.isfile(out(i) + ".json")  # noqa: E731
    if not masks_from:
        from vision import GroundedSAM

        if "gsam" not in rt.models:
            rt.models["gsam"] = GroundedSAM(grounding_dino, sam, rt.device, box_threshold, text_threshold)
        seg = rt.models["gsam"]

    def process(batch):
        for it in batch:
            if done(it):
                continue
            rec = {"id": it["id"], "object": it["object"], "prompt": it["prompt"], "instances": [], "dropped": {}}
            try:  # the inputs: the collage and the user's masks; only an unreadable one is a `corrupt` drop
                img = load_image(os.path.join(manifest, "collages", it["id"] + ".png"))
                found = user_masks(it["id"]) if masks_from else None
                for f in found or []:
                    if f["mask"].shape != (img.height, img.width):
                        raise BadSample("corrupt", f"mask {f['mask'].shape} for a {img.height}x{img.width} collage")
            except Exception as e:
                if not undecodable(e):
                    raise
                rec["dropped"] = {"corrupt": 1}
                rec["error"] = f"{e.__class__.__name__}: {str(e)[:200]}"
                _write_json(out(it) + ".json", rec)
                continue
            over = 0
            if found is None:  # the segmenter's errors (out of memory, ...) stop the stage: no record is written
                found = seg.instances(img, it["object"], max_instances)
            else:  # user masks in file-name order, as many as the segmenter would give
                found, over = found[:max_instances], max(0, len(found) - max_instances)
            kept, dropped = select_instances(found, (img.height, img.width))
            if over:
                dropped["over_max_instances"] += over
            rec["dropped"] = dict(sorted(dropped.items()))
            for k, inst in enumerate(kept):
                ys, xs = np.nonzero(inst["mask"])
                box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)  # the mask's own box
                base = os.path.join(out(it), str(k))
                _save_atomic(img.crop(box), base + ".png")
                write_mask(base + ".mask.png", inst["mask"][box[1]:box[3], box[0]:box[2]])
                rec["instances"].append({"image": f"{it['id']}/{k}.png", "box": list(box),
                                         "score": round(float(inst["score"]), 4), "area": int(inst["mask"].sum())})
            _write_json(out(it) + ".json", rec)
    return run_items(rt, "instances", items, done, process, unit="collage")


# ----------------------------------------------------------------------------- 4. filter

def cutout(cid: str, k: int) -> tuple[Image.Image, np.ndarray]:
    """An instance: its RGB crop and its mask (bool, same size)."""
    base = os.path.join(manifest, "instances", cid, str(k))
    img, m = load_image(base + ".png"), read_mask(base + ".mask.png")
    return img, m


def best_set(sim: np.ndarray) -> tuple[list[int], str | None]:
    """The largest (then most similar) set of min_set_size..max_set_size instances whose pairwise similarities
    are all in [min_similarity, max_similarity]; candidates in score order (at most MAX_INSTANCES).
    -> (indices, reason)."""
    n = len(sim)
    if n < min_set_size:
        return [], f"fewer_than_{min_set_size}_instances"
    near_dup = False
    for size in range(min(max_set_size, n), min_set_size - 1, -1):
        best, best_mean = None, -2.0
        for c in combinations(range(n), size):
            pairs = [sim[a, b] for a, b in combinations(c, 2)]
            if min(pairs) < min_similarity:
                continue
            if max(pairs) > max_similarity:
                near_dup = True
                continue
            if np.mean(pairs) > best_mean + 1e-12:
                best, best_mean = list(c), float(np.mean(pairs))
        if best is not None:
            return best, None
    return [], "near_duplicate" if near_dup else "below_similarity"


def stage_filter(rt, embedder=None):
    """embedder: anything with .images(list of PIL) -> (n, d) L2-normalised (default: open_clip from local
    weights, vision.ClipEmbedder)."""
    from vision import DEFAULT_BACKGROUND, apply_mask

    items = sorted(live("instances").values(), key=lambda r: r["id"])
    if not items:
        _nothing("filter", "no instance records (run the instances stage first)")
    if embedder is None:
        from vision import ClipEmbedder

        if "clip" not in rt.models:
            rt.models["clip"] = ClipEmbedder(clip_model, clip_weights, rt.device)
        embedder = rt.models["clip"]
    out = lambda i: os.path.join(manifest, "filter", i["id"] + ".json")  # noqa: E731
    done = lambda i: os.path.isfile(out(i))  # noqa: E731

    def process(batch):
        for it in batch:
            if done(it):
                continue
            rec = {"id": it["id"], "object": it["object"], "prompt": it["prompt"], "kept": [], "dropped": None}
            n = len(it["instances"])
            if n >= min_set_size:
                # the instance alone on one constant colour: only the subject can make two instances differ
                cuts = [apply_mask(*cutout(it["id"], k), DEFAULT_BACKGROUND) for k in range(n)]
                f = embedder.images(cuts)
                sim = (f @ f.T).clamp(-1, 1).numpy()
                rec["kept"], rec["dropped"] = best_set(sim)
                rec["similarity"] = [[round(float(v), 4) for v in row] for row in sim]
            else:
                rec["dropped"] = best_set(np.zeros((n, n)))[1]
            _write_json(out(it), rec)
    return run_items(rt, "filter", items, done, process, unit="collage")


# ----------------------------------------------------------------------------- 5. backgrounds

def resized(img: Image.Image, mask: np.ndarray, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """An instance at (w, h): RGB uint8 (h, w, 3) and alpha uint8 (h, w) (soft edges from the resized mask)."""
    rgb = np.asarray(img.resize((w, h), Image.BICUBIC))
    alpha = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.BILINEAR))
    return rgb, alpha


def paste(img: Image.Image, mask: np.ndarray, rng: np.random.Generator, size: int):
    """The instance resized so its longer side is U(scale_min, scale_max)·size, at a random place on a blank
    canvas. -> (canvas RGB uint8 (size, size, 3), alpha uint8 (size, size), box [x0, y0, x1, y1])."""
    w, h = img.size
    s = rng.uniform(scale_min, scale_max) * size / max(w, h)
    nw, nh = max(1, min(size, round(w * s))), max(1, min(size, round(h * s)))
    x0, y0 = int(rng.integers(0, size - nw + 1)), int(rng.integers(0, size - nh + 1))
    rgb, alpha = resized(img, mask, nw, nh)
    canvas = np.full((size, size, 3), 127, np.uint8)  # blank: masked to 0 for the inpainting model anyway
    a = np.zeros((size, size), np.uint8)
    canvas[y0:y0 + nh, x0:x0 + nw] = rgb
    a[y0:y0 + nh, x0:x0 + nw] = alpha
    return canvas, a, [x0, y0, x0 + nw, y0 + nh]


def composite(subject: np.ndarray, alpha: np.ndarray, generated: np.ndarray) -> np.ndarray:
    """Subject over the generated image by its alpha; where alpha is 255 the subject's pixels exactly."""
    a = alpha[..., None].astype(np.float32) / 255
    out = np.round(a * subject + (1 - a) * generated).astype(np.uint8)
    full = alpha == 255
    out[full] = subject[full]  # exact, not through float rounding
    return out


def background_prompt(obj: str, rng) -> str:
    return f"a photo of a {obj} {SETTINGS[rng.integers(len(SETTINGS))]}"


def stage_backgrounds(rt):
    from model.diffusion import inpaint_guided, sample

    items = sorted((r for r in live("filter").values() if r["kept"]), key=lambda r: r["id"])
    if not items:
        _nothing("backgrounds", "the filter kept no sets (run the filter stage first)")
    m = _load_sd(rt, "inpaint", inpaint, 9, "--inpaint")
    size = sizes(canvas)  # SDXL inpainting: the canvas is the whole image
    null = m.null(**size)
    f = m.down
    out = lambda i: os.path.join(manifest, "backgrounds", i["id"])  # noqa: E731
    done = lambda i: os.path.isfile(out(i) + ".json")  # noqa: E731

    def process(batch):
        canv, alphas, boxes, caps = [], [], [], []  # one entry per image of the batch's sets, in order
        for it in batch:
            for j, k in enumerate(it["kept"]):
                rng = _rng("backgrounds", it["id"], j)
                c, a, box = paste(*cutout(it["id"], k), rng, canvas)
                canv.append(c)
                alphas.append(a)
                boxes.append(box)
                caps.append(background_prompt(it["object"], rng))
        px = torch.stack([to_tensor(Image.fromarray(c)) for c in canv]).to(rt.device)  # (n, 3, S, S)
        repaint = torch.from_numpy(np.stack(alphas) < 255).float()[:, None].to(rt.device)  # (n, 1, S, S): 1 = paint
        with torch.no_grad(), rt.amp():
            masked = m.to_latents(px * (1 - repaint))  # the checkpoints' convention: repainted pixels set to 0
            small = F.interpolate(repaint, size=(canvas // f, canvas // f))  # nearest, as diffusers
            fn = inpaint_guided(m.unet, m.diffusion, small, masked, m.encode(caps, **size), null, inpaint_guidance)
            gen = torch.Generator(device=rt.device).manual_seed(_seed("backgrounds", batch[0]["id"]))
            z = sample(fn, m.diffusion, (len(canv), 4, canvas // f, canvas // f), steps=inpaint_steps,
                       sampler=sampler, generator=gen, device=rt.device)
            gen_px = m.to_pixels(z)
        i = 0
        for it in batch:
            n = len(it["kept"])
            if not done(it):
                rec = {"id": it["id"], "object": it["object"], "prompt": it["prompt"], "images": [], "captions": [],
                       "paste_boxes": [], "instances": it["kept"]}
                for j in range(n):
                    generated = np.asarray(to_pil(gen_px[i + j]))
                    img = composite(canv[i + j], alphas[i + j], generated)
                    base = os.path.join(out(it), str(j))
                    _save_atomic(Image.fromarray(img), base + ".png")
                    write_mask(base + ".mask.png", alphas[i + j] >= 128)
                    rec["images"].append(f"backgrounds/{it['id']}/{j}.png")
                    rec["captions"].append(caps[i + j])
                    rec["paste_boxes"].append(boxes[i + j])
                _write_json(out(it) + ".json", rec)
            i += n
    return run_items(rt, "backgrounds", items, done, process, unit="set")


# ----------------------------------------------------------------------------- 6. stylize

def style_for(set_id: str):
    """With p = stylize_p one (instruction, caption suffix) for the whole set, else None: seeded per set."""
    rng = _rng("stylize", set_id)
    if rng.random() >= stylize_p:
        return None
    return STYLES[rng.integers(len(STYLES))]


def stage_stylize(rt):
    from model.diffusion import ip2p_guided, sample

    items = sorted(live("backgrounds").values(), key=lambda r: r["id"])
    if not items:
        _nothing("stylize", "no sets with new backgrounds (run the backgrounds stage first)")
    out = lambda i: os.path.join(manifest, "stylize", i["id"])  # noqa: E731
    done = lambda i: os.path.isfile(out(i) + ".json")  # noqa: E731
    m = None
    if any(style_for(it["id"]) for it in items):
        m = _load_sd(rt, "ip2p", ip2p, 8, "--ip2p")
        null = m.encode_text([""])

    def record(it, style, images):
        caps = it["captions"] if style is None else [f"{c}, {style[1]}" for c in it["captions"]]
        return {"id": it["id"], "object": it["object"], "images": images, "captions": caps,
                "instruction": None if style is None else style[0]}

    def process(batch):
        todo = [(it, style_for(it["id"])) for it in batch]
        styled = [(it, s) for it, s in todo if s is not None]
        if styled:
            files = [os.path.join(manifest, p) for it, _ in styled for p in it["images"]]
            px = torch.stack([to_tensor(load_image(p)) for p in files]).to(rt.device)  # (n, 3, S, S)
            instr = [s[0] for it, s in styled for _ in it["images"]]
            with torch.no_grad(), rt.amp():
                source = m.vae.encode(px).mode()  # unscaled: InstructPix2Pix's training convention
                fn = ip2p_guided(m.unet, m.diffusion, source, m.encode_text(instr), null, ip2p_text_guidance,
                                 ip2p_image_guidance)
                gen = torch.Generator(device=rt.device).manual_seed(_seed("stylize", styled[0][0]["id"]))
                z = sample(fn, m.diffusion, tuple(source.shape), steps=ip2p_steps, sampler=sampler, generator=gen,
                           device=rt.device)
                new = m.to_pixels(z)
        i = 0
        for it, s in todo:
            if s is None:
                if not done(it):
                    _write_json(out(it) + ".json", record(it, None, it["images"]))
                continue
            n = len(it["images"])
            if not done(it):
                paths = []
                for j in range(n):
                    _save_atomic(to_pil(new[i + j]), os.path.join(out(it), f"{j}.png"))
                    paths.append(f"stylize/{it['id']}/{j}.png")
                _write_json(out(it) + ".json", record(it, s, paths))
            i += n
    return run_items(rt, "stylize", items, done, process, unit="set")


# ----------------------------------------------------------------------------- 7. write

def contact_sheet(sets: list[dict], path):
    """One row per set (up to 4 thumbnails), its caption under it: a quick human look at a shard."""
    t, pad = contact_thumb, 14
    rows = sets[:contact_sets]
    sheet = Image.new("RGB", (4 * t, max(1, len(rows)) * (t + pad)), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    for r, s in enumerate(rows):
        for j, p in enumerate(s["images"][:4]):
            im = load_image(os.path.join(manifest, p))
            sheet.paste(im.resize((t, t), Image.BICUBIC), (j * t, r * (t + pad)))
        draw.text((2, r * (t + pad) + t + 1), s["captions"][0][: 4 * t // 6], fill=(230, 230, 230))
    _save_atomic(sheet, path)


def stage_write(rt):
    recs = sorted(live("stylize").values(), key=lambda r: r["id"])
    if not recs:
        _nothing("write", "no finished sets (run the stylize stage first)")
    # one line per set, the same order and content whatever ran where and how often
    sets = [{"images": r["images"], "captions": r["captions"], "caption": r["captions"][0], "id": r["id"],
             "object": r["object"]} for r in recs]
    shards = [sets[i:i + shard_size] for i in range(0, len(sets), shard_size)]
    name = lambda i: os.path.join(manifest, "sets", f"shard-{i:05d}")  # noqa: E731
    done = lambda i: os.path.isfile(name(i) + ".jsonl")  # noqa: E731

    def process(batch):
        for i in batch:
            if done(i):
                continue
            contact_sheet(shards[i], name(i) + ".png")
            # shard files sit in M/sets/: their paths are relative to that folder, as data.py reads them
            lines = [json.dumps({**s, "images": ["../" + p for p in s["images"]]}) for s in shards[i]]
            _write_text(name(i) + ".jsonl", "\n".join(lines) + "\n")
    made = run_items(rt, "write", list(range(len(shards))), done, process, unit="shard")
    rt.barrier()
    if rt.rank == 0:
        _write_text(os.path.join(manifest, "sets.jsonl"), "".join(json.dumps(s) + "\n" for s in sets))
        _write_json(os.path.join(manifest, "stats.json"), stats())
    return made


def _write_text(path, text):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def stats() -> dict:
    """Kept and dropped per stage, with reasons, from the records on disk (so identical for any run history)."""
    P, C, I, Fi, B, S = (live(s) for s in STAGES[:-1])
    inst_n = Counter(len(r["instances"]) for r in I.values() if "corrupt" not in r["dropped"])
    filt_drop = Counter(r["dropped"] for r in Fi.values() if r["dropped"])
    sizes = Counter(len(r["kept"]) for r in Fi.values() if r["kept"])
    styled = Counter(r["instruction"] for r in S.values() if r["instruction"])
    out = {
        "prompts": {"objects": len(P), "prompts": sum(len(r["prompts"]) for r in P.values())},
        "collages": {"kept": sum("dropped" not in r for r in C.values()),
                     "dropped": dict(Counter(r["dropped"].split(":")[0] for r in C.values() if "dropped" in r))},
        "instances": {"collages": len(I), "instances_kept": sum(len(r["instances"]) for r in I.values()),
                      "collages_by_instances_kept": {str(k): v for k, v in sorted(inst_n.items())},
                      "instances_dropped": dict(sorted(sum((Counter(r["dropped"]) for r in I.values()),
                                                           Counter()).items()))},
        "filter": {"collages": len(Fi), "sets_kept": sum(bool(r["kept"]) for r in Fi.values()),
                   "images_kept": sum(len(r["kept"]) for r in Fi.values()),
                   "set_sizes": {str(k): v for k, v in sorted(sizes.items())},
                   "collages_dropped": dict(sorted(filt_drop.items())),
                   "min_similarity": min_similarity, "max_similarity": max_similarity},
        "backgrounds": {"sets": len(B), "images": sum(len(r["images"]) for r in B.values())},
        "stylize": {"sets": len(S), "styled": sum(styled.values()), "unstyled": len(S) - sum(styled.values()),
                    "instructions": dict(sorted(styled.items()))},
        "write": {"sets": len(S), "images": sum(len(r["images"]) for r in S.values()),
                  "shards": math.ceil(len(S) / shard_size) if S else 0},
    }
    return out


# ----------------------------------------------------------------------------- passing on

def passed_on(stage) -> tuple[int, str]:
    """(items this stage passes on, a count summary) from the records on disk, after every rank finished."""
    if stage == "prompts":
        n = len(prompt_items())
        return n, f"{n} prompts"
    if stage == "collages":
        c = live("collages")
        n = sum("dropped" not in r for r in c.values())
        return n, f"{len(c)} collages, {len(c) - n} corrupt"
    if stage == "instances":
        recs = live("instances").values()
        n = sum(len(r["instances"]) >= min_set_size for r in recs)
        drops = sum((Counter(r["dropped"]) for r in recs), Counter())
        return n, (f"{len(recs)} collages, {n} with >= {min_set_size} instances kept; instances dropped: "
                   + (", ".join(f"{v} {k}" for k, v in sorted(drops.items())) or "none"))
    if stage == "filter":
        recs = live("filter").values()
        n = sum(bool(r["kept"]) for r in recs)
        drops = Counter(r["dropped"] for r in recs if r["dropped"])
        return n, (f"{len(recs)} collages in, {n} sets kept at min_similarity {min_similarity}; dropped: "
                   + (", ".join(f"{v} {k}" for k, v in sorted(drops.items())) or "none"))
    n = len(live("stylize" if stage == "write" else stage))
    return n, f"{n} sets"


# The settings that shape each stage's outputs (weight paths aside: a moved file is the same file). A stage folder
# holds its settings.json; a rerun with other values would mix two datasets, so it is refused.
STAGE_SETTINGS = {
    "prompts": ("seed", "objects", "num_objects", "prompts_per_object", "llm_max_new_tokens"),
    "collages": ("seed", "collage_suffix", "collage_resolution", "collage_steps", "collage_guidance", "sampler"),
    "instances": ("box_threshold", "text_threshold", "min_area", "max_area", "border", "max_overlap",
                  "max_instances"),
    "filter": ("clip_model", "min_similarity", "max_similarity", "min_set_size", "max_set_size"),
    "backgrounds": ("seed", "canvas", "scale_min", "scale_max", "inpaint_steps", "inpaint_guidance", "sampler"),
    "stylize": ("seed", "stylize_p", "ip2p_steps", "ip2p_text_guidance", "ip2p_image_guidance", "sampler"),
    "write": ("shard_size", "contact_sets", "contact_thumb"),
}


# Which base model made a stage's images (its flavour, not its path): SD-1.5 and SDXL collages in one folder would
# be two datasets. A settings file written before the key existed was made with SD-1.x, the only model then.
MODEL_SETTING = {"collages": "sd", "backgrounds": "inpaint"}
LEGACY_SETTINGS = {"model": "sd1"}


def check_settings(rt, stage):
    """M/<stage folder>/.settings.json: written by the first run, compared by every rerun."""
    folder = os.path.join(manifest, "sets" if stage == "write" else stage)
    path = os.path.join(folder, ".settings.json")  # hidden: not an item record
    now = {k: globals()[k] for k in STAGE_SETTINGS[stage]}
    if stage in MODEL_SETTING and not (stage == "collages" and collages_from):
        now["model"] = _model_flavour(globals()[MODEL_SETTING[stage]])  # checked readable by check_weights
    now = json.loads(json.dumps(now))  # tuples -> lists, as read back
    if os.path.isfile(path):
        before = _read_json(path)
        was = lambda k: before.get(k, LEGACY_SETTINGS.get(k))  # noqa: E731
        diff = [f"{k}={was(k)!r} (now {v!r})" for k, v in now.items() if was(k) != v]
        if diff:
            raise S3Error(f"{stage}: {folder} was made with " + ", ".join(diff)
                          + ": use the same settings, another manifest, or delete that folder to redo the stage")
    elif rt.rank == 0:
        _write_json(path, now)
    rt.barrier()


RUN = {"prompts": stage_prompts, "collages": stage_collages, "instances": stage_instances, "filter": stage_filter,
       "backgrounds": stage_backgrounds, "stylize": stage_stylize, "write": stage_write}


def run(stages, rt=None, embedder=None):
    """Run stages in order, all ranks together; stop with a clear message when one passes nothing on.
    embedder: a stand-in for the filter's CLIP (tests, benchmarks)."""
    if not 1 <= max_instances <= MAX_INSTANCES:
        raise S3Error(f"max_instances must be 1..{MAX_INSTANCES} (the filter tries every subset of the instances), "
                      f"not {max_instances}")
    rt = rt or Runtime()
    check_weights([s for s in stages if not (s == "filter" and embedder is not None)])
    for s in stages:
        check_settings(rt, s)
        if s == "filter":
            RUN[s](rt, embedder)
        else:
            RUN[s](rt)
        rt.barrier()  # every rank's records are on disk: the counts below are the whole run's
        n, summary = passed_on(s)
        if n == 0:
            _nothing(s, summary)
        if rt.rank == 0:
            print(f"{s}: {summary}", file=sys.stderr)
    return rt


USAGE = (f"usage: python s3.py {{{'|'.join(STAGES + ('all',))}}} [config/s3_*.py ...] [--key=value ...]\n"
         f"(torchrun --nproc_per_node=N s3.py ... shares the work over N processes; --help lists every stage and key)")


def help_text() -> str:
    """--help: the usage, every stage (this module's docstring) and every config key with its default."""
    stages = __doc__[__doc__.index("Stages,"):__doc__.index("Every work item")].rstrip()
    return (f"{USAGE}\n\n{stages}\n\nconfig keys (defaults; set in config/s3_*.py files or as --key=value):\n"
            + configurator.describe(__file__, globals(), config_keys))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    if not argv or argv[0] not in STAGES + ("all",):
        print(USAGE, file=sys.stderr)
        return 2
    try:
        configure(argv[1:])
        stages = list(STAGES) if argv[0] == "all" else [argv[0]]
        if argv[0] == "all" and collages_from:  # the collages come from the folder, with their prompts
            stages.remove("prompts")
        rank = run(stages).rank
    except (S3Error, VisionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if argv[0] in ("all", "write") and rank == 0:
        print(f"wrote {os.path.join(manifest, 'sets.jsonl')} and stats.json")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything loads from local paths
    sys.exit(main())
