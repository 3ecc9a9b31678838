"""Vision models from local transformers / open_clip weights, shared by eval.py and s3.py: Grounding-DINO + SAM
(text-prompted instance boxes and masks), CLIP and DINO image embeddings, foreground masks and their files.

Nothing is downloaded: every model loads from a local folder or file the user supplies, and a missing path is a
`MissingWeights` error naming the file that was expected there.
"""
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from model.files import atomic_path

MASK_SUFFIX = ".mask.png"  # x.jpg -> x.mask.png: white (>= 128) is foreground
DEFAULT_BACKGROUND = (255, 255, 255)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class VisionError(Exception):
    """Bad input or setup: reported as `error: ...` (no traceback) and a non-zero exit (eval.py's EvalError)."""


class MissingWeights(VisionError, FileNotFoundError):
    """A weight file or folder the user must supply is not where we were told to look."""


# ----------------------------------------------------------------------------- masks

def mask_file_for(image_path) -> str:
    return os.path.splitext(str(image_path))[0] + MASK_SUFFIX


def read_mask(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L")) >= 128


def write_mask(path, mask: np.ndarray):
    _save_atomic(Image.fromarray(mask.astype(np.uint8) * 255), path)


def apply_mask(img: Image.Image, mask: np.ndarray, background=DEFAULT_BACKGROUND) -> Image.Image:
    """Foreground kept, everything else one constant colour, so only the subject can differ between images."""
    if mask.shape != (img.height, img.width):  # a mask file saved at another size: follow the image
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(img.size, Image.NEAREST)) >= 128
    out = np.empty((img.height, img.width, 3), np.uint8)
    out[:] = background
    out[mask] = np.asarray(img)[mask]
    return Image.fromarray(out)


def _save_atomic(img: Image.Image, path):
    """A PNG written atomically (model.files.atomic_path): an interrupted run never leaves a truncated image that a
    resumed run would take as done."""
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


class GroundedSAM:
    """Text-prompted foreground masks with the tools the paper cites for its masked metrics (Grounding DINO [18],
    SAM [13]): Grounding-DINO finds the best box for "<class>.", SAM segments inside it. Both load from local
    transformers folders.

    Any object with `name` and `__call__(image: PIL.Image, class_name: str) -> bool array (H, W)` can stand in
    for this class (see `Masks`); an all-False mask means "nothing found". `instances` gives every detection with
    its own box and mask instead (s3.py's instance stage)."""

    name = "grounded-sam"

    def __init__(self, grounding_dino: str, sam: str, device="cpu", box_threshold: float = 0.35,
                 text_threshold: float = 0.25):
        try:
            from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor, SamModel, SamProcessor
        except ImportError:
            import transformers

            raise VisionError(f"the installed transformers {transformers.__version__} has no Grounding-DINO/SAM: "
                              f"upgrade it, or put mask files ({MASK_SUFFIX}) next to the images") from None
        self.device, self.box_threshold, self.text_threshold = device, box_threshold, text_threshold
        self.det_processor = _load_hf(GroundingDinoProcessor, grounding_dino, "Grounding-DINO", processor=True)
        self.detector = _load_hf(GroundingDinoForObjectDetection, grounding_dino, "Grounding-DINO").to(device)
        self.sam_processor = _load_hf(SamProcessor, sam, "SAM", processor=True)
        self.sam = _load_hf(SamModel, sam, "SAM").to(device)
        self.description = f"{self.name} (Grounding-DINO {grounding_dino}, SAM {sam})"

    @torch.no_grad()
    def __call__(self, image: Image.Image, class_name: str) -> np.ndarray:
        """The mask of the one most confident detection (eval's subject mask); all False when nothing is found."""
        boxes, scores = self.detect(image, class_name)
        if not len(scores):
            return np.zeros((image.height, image.width), bool)
        return self.segment(image, boxes[int(np.argmax(scores))][None])[0]

    @torch.no_grad()
    def detect(self, image: Image.Image, class_name: str) -> tuple[np.ndarray, np.ndarray]:
        """Every detection of `class_name` above the thresholds: boxes (n, 4) as x0, y0, x1, y1 in pixels, and
        their scores (n,), in Grounding-DINO's order."""
        w, h = image.size
        # Grounding-DINO's text format: lower case, each phrase ends with a period.
        inputs = self.det_processor(images=image, text=f"{class_name.lower()}.", return_tensors="pt").to(self.device)
        det = self.det_processor.post_process_grounded_object_detection(
            self.detector(**inputs), inputs["input_ids"], threshold=self.box_threshold,
            text_threshold=self.text_threshold, target_sizes=[(h, w)])[0]
        return det["boxes"].float().cpu().numpy().reshape(-1, 4), det["scores"].float().cpu().numpy()

    @torch.no_grad()
    def segment(self, image: Image.Image, boxes: np.ndarray) -> np.ndarray:
        """SAM masks inside boxes (n, 4) -> bool (n, H, W), one prompt per box in one call."""
        s_in = self.sam_processor(images=image, input_boxes=[[list(map(float, b)) for b in boxes]],
                                  return_tensors="pt").to(self.device)
        s_out = self.sam(pixel_values=s_in["pixel_values"], input_boxes=s_in["input_boxes"], multimask_output=False)
        masks = self.sam_processor.post_process_masks(s_out.pred_masks.cpu(), s_in["original_sizes"].cpu(),
                                                      s_in["reshaped_input_sizes"].cpu())
        return masks[0][:, 0].numpy().astype(bool)  # (n, 1, H, W) -> (n, H, W)

    def instances(self, image: Image.Image, class_name: str, limit: int | None = None) -> list[dict]:
        """The instances of `class_name` (the `limit` most confident):
        [{"box": [x0, y0, x1, y1], "score": float, "mask": bool (H, W)}, ...], most confident first."""
        boxes, scores = self.detect(image, class_name)
        if not len(scores):
            return []
        order = np.argsort(-scores, kind="stable")[:limit]
        boxes, scores = boxes[order], scores[order]
        masks = self.segment(image, boxes)
        return [{"box": [float(v) for v in b], "score": float(s), "mask": m} for b, s, m in zip(boxes, scores, masks)]


class Masks:
    """Foreground masks for MCLIP-I/MDINO. A mask file next to the image (x.jpg -> x.mask.png) wins; otherwise
    the segmenter's mask, cached under `cache_dir` so a rerun does not segment again. Counts where each came from
    (per kind: the first part of the cache key, 'refs' or 'images'), since masked scores are only comparable
    between runs with the same mask source."""

    def __init__(self, segmenter=None, cache_dir=None):
        self.segmenter, self.cache_dir = segmenter, cache_dir
        self.sources = Counter()
        self.empty = 0  # nothing found: the whole image is used (counted and reported, not hidden)

    def get(self, image_path, image: Image.Image, class_name: str, cache_key: str) -> np.ndarray:
        path = mask_file_for(image_path)
        if os.path.isfile(path):
            mask, source = read_mask(path), "mask files"
        elif self.segmenter is not None:
            cached = os.path.join(self.cache_dir, self.segmenter.name, cache_key + MASK_SUFFIX)
            if os.path.isfile(cached):
                mask = read_mask(cached)
            else:
                mask = np.asarray(self.segmenter(image, class_name), bool)
                write_mask(cached, mask)
            source = self.segmenter.name
        else:
            raise VisionError(f"no foreground mask for {image_path}: expected {path}, or pass --grounding_dino and "
                              f"--sam to segment, or --no_masked to skip MCLIP-I/MDINO")
        self.sources[cache_key.split("/")[0], source] += 1
        if not mask.any():
            self.empty += 1
            mask = np.ones_like(mask)
        return mask

    def describe(self) -> str:
        if not self.sources:
            return "none (masked metrics skipped)"
        parts = [f"{kind}: {n} from {src}" for (kind, src), n in sorted(self.sources.items(), reverse=True)]
        if self.segmenter is not None and hasattr(self.segmenter, "description"):
            parts.append(self.segmenter.description)
        if self.empty:
            parts.append(f"{self.empty} with no foreground found, scored unmasked")
        return "; ".join(parts)


# ----------------------------------------------------------------------------- embedders

def _require_file(path, what: str):
    if not path or not os.path.isfile(path):
        raise MissingWeights(f"{what} not found: expected the file {path!r}")


def _require_hf_folder(folder, what: str):
    """A transformers model folder as save_pretrained writes it (what the Hugging Face repo holds)."""
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    if not folder or not os.path.isfile(os.path.join(folder, "config.json")):
        raise MissingWeights(f"{what} not found: expected the file {os.path.join(str(folder), 'config.json')!r} "
                             f"and {' or '.join(weights)} in that folder")
    if not any(os.path.isfile(os.path.join(folder, w)) for w in weights):
        raise MissingWeights(f"{what} weights not found: expected {os.path.join(folder, weights[0])!r} "
                             f"(or {' / '.join(weights[1:])}) next to config.json")


def _first_line(e: BaseException) -> str:
    """An exception's first line, cut to 200 characters (transformers' messages run long)."""
    return (str(e).strip().splitlines() or [""])[0][:200]


def _hf_weight_shapes(folder) -> dict:
    """name -> shape of a save_pretrained folder's weights, reading no tensor data (safetensors headers, or the
    .bin memory-mapped)."""
    import json

    from safetensors import safe_open

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        files = [os.path.join(folder, "model.safetensors")]
    elif os.path.isfile(index):  # sharded: every shard the index names
        files = [os.path.join(folder, f) for f in sorted(set(json.load(open(index))["weight_map"].values()))]
    else:  # pytorch_model.bin, read below
        files = []
    shapes = {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            shapes.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})
    if not files:
        sd = torch.load(os.path.join(folder, "pytorch_model.bin"), map_location="cpu", weights_only=True, mmap=True)
        shapes = {k: tuple(v.shape) for k, v in sd.items()}
    return shapes


def _check_hf_shapes(cls, folder, what: str, **kwargs):
    """The folder's config.json built on the meta device and compared with its weights' shapes, so a config that
    lies (wider or deeper than the weights) is one line before from_pretrained allocates what it claims."""
    try:
        config = cls.config_class.from_pretrained(folder, local_files_only=True)
        with torch.device("meta"):
            own = cls(config, **kwargs).state_dict()
        file = _hf_weight_shapes(folder)
    except Exception as e:
        raise VisionError(f"{what}: cannot read {folder} ({e.__class__.__name__}: "
                          f"{_first_line(e)})") from None
    prefix = cls.base_model_prefix + "."
    bare = lambda k: k[len(prefix):] if k.startswith(prefix) else k  # noqa: E731  (saved with or without it)
    file = {bare(k): v for k, v in file.items()}
    wrong = [f"{k}: weights {file[bare(k)]} vs config {tuple(v.shape)}" for k, v in own.items()
             if bare(k) in file and file[bare(k)] != tuple(v.shape)]
    if wrong:
        raise VisionError(f"{what}: {folder}/config.json does not match its weights ({len(wrong)} shapes differ, "
                          f"e.g. {wrong[0]})")


def _load_hf(cls, folder, what: str, processor: bool = False, **kwargs):
    """from_pretrained on a local folder only, refusing silently random-initialised weights."""
    if processor:
        if not os.path.isdir(str(folder)):
            raise MissingWeights(f"{what} not found: expected the folder {folder!r}")
        try:
            return cls.from_pretrained(folder, local_files_only=True)
        except Exception as e:  # transformers raises OSError/ValueError with long texts
            raise VisionError(f"{what}: cannot load the preprocessing files from {folder} "
                              f"({e.__class__.__name__}: {_first_line(e)})") from None
    _require_hf_folder(folder, what)
    _check_hf_shapes(cls, folder, what, **kwargs)
    try:
        model, info = cls.from_pretrained(folder, local_files_only=True, output_loading_info=True, **kwargs)
    except Exception as e:  # a damaged file or config: transformers' long texts, cut to one line
        raise VisionError(f"{what}: cannot load {folder} ({e.__class__.__name__}: "
                          f"{_first_line(e)})") from None
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise VisionError(f"{what}: {folder} does not hold {cls.__name__} weights ({len(missing)} tensors missing, "
                          f"e.g. {missing[0]})")
    return model.eval()


def _is_torchscript(path) -> bool:
    """OpenAI's original CLIP files (ViT-B-32.pt, ...) are TorchScript archives, not state dicts."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") for n in z.namelist())


class ClipEmbedder:
    """open_clip image and text embeddings, L2-normalised.

    model_name: an open_clip architecture (ViT-B-32, ViT-L-14, ...; use the *-quickgelu names for OpenAI and
    LAION-400M weights) or a path to an architecture .json. weights: a local checkpoint file: an open_clip state
    dict (open_clip_pytorch_model.bin, .safetensors) or OpenAI's TorchScript ViT-*.pt."""

    def __init__(self, model_name: str, weights: str, device="cpu", batch_size: int = 32):
        import open_clip

        if model_name.endswith(".json"):  # a custom architecture: open_clip registers it under the file's stem
            _require_file(model_name, "CLIP architecture config")
            open_clip.add_model_config(model_name)
            model_name = Path(model_name).stem
        if model_name not in open_clip.list_models():
            raise VisionError(f"unknown --clip_model {model_name!r} (open_clip knows e.g. ViT-B-32, "
                              f"ViT-B-32-quickgelu, ViT-L-14, ViT-L-14-quickgelu; or give an architecture .json)")
        _require_file(weights, f"CLIP weights for {model_name}")
        # An absolute path can never be mistaken for a pretrained tag (a tag would download).
        weights = os.path.abspath(weights)
        if _is_torchscript(weights):
            # OpenAI's own archives: the state dict uses open_clip's names, and all OpenAI CLIPs use QuickGELU.
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None,
                                                                         force_quick_gelu=True)
            state = torch.jit.load(weights, map_location="cpu").state_dict()
            # Drop OpenAI's bookkeeping entries and derived buffers (the causal attn_mask) the model rebuilds itself.
            derived = set(dict(model.named_buffers())) - set(model.state_dict())
            for k in ("input_resolution", "context_length", "vocab_size", *derived):
                state.pop(k, None)
            model.load_state_dict(state)
        else:
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=weights)
        self.model = model.to(device).eval()
        self.preprocess, self.tokenizer = preprocess, open_clip.get_tokenizer(model_name)
        self.device, self.batch_size = device, batch_size
        self.description = f"open_clip {model_name} ({weights})"

    @torch.no_grad()
    def images(self, images: list) -> torch.Tensor:
        feats = [self.model.encode_image(torch.stack([self.preprocess(im) for im in images[i:i + self.batch_size]])
                                         .to(self.device)) for i in range(0, len(images), self.batch_size)]
        return F.normalize(torch.cat(feats).float(), dim=-1).cpu()

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        return F.normalize(self.model.encode_text(self.tokenizer(texts).to(self.device)).float(), dim=-1).cpu()


class DinoEmbedder:
    """DINO-v1 CLS embedding (after the final LayerNorm, as DINO's own evaluation), L2-normalised, with the
    standard preprocessing: Resize(256, bicubic) -> CenterCrop(224) -> ImageNet normalisation."""

    def __init__(self, folder: str, device="cpu", batch_size: int = 32):
        from torchvision import transforms
        from transformers import ViTModel

        self.model = _load_hf(ViTModel, folder, "DINO ViT-S/16 (facebook/dino-vits16)", add_pooling_layer=False)
        self.model.to(device)
        self.preprocess = transforms.Compose([
            transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])
        self.device, self.batch_size = device, batch_size
        self.description = f"DINO ViT {folder}"

    @torch.no_grad()
    def images(self, images: list) -> torch.Tensor:
        feats = []
        for i in range(0, len(images), self.batch_size):
            x = torch.stack([self.preprocess(im) for im in images[i:i + self.batch_size]]).to(self.device)
            feats.append(self.model(pixel_values=x).last_hidden_state[:, 0])
        return F.normalize(torch.cat(feats).float(), dim=-1).cpu()
