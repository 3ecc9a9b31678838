r"""JeDi on the DreamBooth benchmark: CLIP-T, CLIP-I, MCLIP-I, DINO and MDINO (paper §4, Table 2).

    python eval.py --dataset dreambooth/dataset --ckpt jedi.safetensors --num_refs 1 --out eval/jedi_1ref \
        --clip_model ViT-B-32-quickgelu --clip_weights weights/ViT-B-32.pt --dino weights/dino-vits16 \
        --grounding_dino weights/grounding-dino-tiny --sam weights/sam-vit-base

For each of the 30 subjects and each of its 25 prompts, 4 images are generated from the subject's first 1 (or 3)
images with sample.py's `generate`, saved under --out/images (a rerun only generates what is missing), then scored:
  CLIP-T   cosine(CLIP image, CLIP text of the prompt)
  CLIP-I   cosine(CLIP image, CLIP image of each of the subject's real images), averaged over them
  DINO     the same with the DINO-v1 ViT-S/16 CLS embedding
  MCLIP-I, MDINO   CLIP-I and DINO on foreground-only images (background painted a constant colour)
Tables per subject and overall (mean ± std) go to --out/results.md and --out/results.json, with two rows scored from
the real images alone: "reference copy" (the references themselves as the generations: what a copying model gets)
and "real images" (each real image against the subject's others: the upper bound). Weights are only read
from local paths; nothing is downloaded. docs/eval.md has the protocol details and where to get the weights.
"""
import argparse
import json
import os
import re
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data import IMAGE_EXTS, load_image
from model.diffusion import DEFAULT_GUIDANCE
from vision import (  # noqa: F401  (moved to vision.py, shared with s3.py; still reachable as eval.X)
    VisionError as EvalError, MissingWeights, MASK_SUFFIX, DEFAULT_BACKGROUND, IMAGENET_MEAN, IMAGENET_STD,
    mask_file_for, read_mask, write_mask, apply_mask, _save_atomic, GroundedSAM,
    Masks, _require_file, _require_hf_folder, _load_hf, ClipEmbedder, DinoEmbedder)

METRICS = ("CLIP-T", "CLIP-I", "MCLIP-I", "DINO", "MDINO")  # Table 2's column order
LIVE_CLASSES = {"cat", "dog"}  # prompts_and_classes.txt doesn't mark live subjects; these 9 are the cats and dogs


# ----------------------------------------------------------------------------- metrics

def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarities of L2-normalised embeddings: (n, d), (m, d) -> (n, m), clamped against rounding."""
    return (a @ b.T).clamp(-1, 1)


def image_scores(gen: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """CLIP-I / DINO per generated image: its similarity to each reference, averaged over the references."""
    return similarity(gen, refs).mean(dim=1)


def text_scores(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """CLIP-T per image: similarity to its own prompt (row i with row i)."""
    return (images * texts).sum(-1).clamp(-1, 1)


# ----------------------------------------------------------------------------- the DreamBooth dataset

@dataclass
class Subject:
    name: str
    class_name: str
    images: list  # sorted paths of the subject's real images
    live: bool
    prompts: list  # filled prompts, e.g. "a dog in the jungle"


def read_prompts_and_classes(path) -> tuple[dict, list, list]:
    """DreamBooth's prompts_and_classes.txt -> ({subject: class}, object templates, live-subject templates).

    The file is a note, not a data format: a "subject_name,class" table, then two Python-looking lists of lines
    'a {0} {1} in the jungle'.format(unique_token, class_token), under "Object Prompts" and "Live Subject Prompts".
    """
    classes, lists, current = {}, {"object": [], "live": []}, None
    template = re.compile(r"""^\s*(['"])(.*)\1\s*\.format\(""")
    for line in Path(path).read_text().splitlines():
        s = line.strip()
        if s.lower().startswith("object prompts"):
            current = "object"
        elif s.lower().startswith("live subject prompts"):
            current = "live"
        elif (m := template.match(s)) and current:
            lists[current].append(m.group(2))
        elif current is None and s.count(",") == 1 and s != "subject_name,class":
            name, cls = (x.strip() for x in s.split(","))
            classes[name] = cls
    if not classes or not lists["object"] or not lists["live"]:
        raise EvalError(f"{path}: expected a subject_name,class table and the 'Object Prompts' and 'Live Subject "
                        f"Prompts' lists (found {len(classes)} subjects, {len(lists['object'])} object and "
                        f"{len(lists['live'])} live prompts)")
    return classes, lists["object"], lists["live"]


def fill_prompt(template: str, class_name: str) -> str:
    """JeDi has no unique token: '{0}' becomes empty, so 'a {0} {1} in the snow' -> 'a dog in the snow'."""
    return " ".join(template.format("", class_name).split())


def load_benchmark(root, subjects: list[str] | None = None, num_prompts: int | None = None) -> list[Subject]:
    root = Path(root)
    prompts_file = root / "prompts_and_classes.txt"
    if not prompts_file.is_file():
        raise EvalError(f"{prompts_file} not found: --dataset is the DreamBooth 'dataset' folder (30 subject "
                        f"folders and prompts_and_classes.txt)")
    classes, object_prompts, live_prompts = read_prompts_and_classes(prompts_file)
    unknown = sorted(set(subjects or []) - set(classes))
    if unknown:
        raise EvalError(f"--subjects {', '.join(unknown)} not in {prompts_file}")
    out = []
    for name, cls in classes.items():
        if subjects and name not in subjects:
            continue
        images = sorted(str(p) for p in (root / name).glob("*")
                        if p.suffix.lower() in IMAGE_EXTS and not p.name.endswith(MASK_SUFFIX))
        if not images:
            raise EvalError(f"no images for subject {name!r}: expected {root / name}/*.jpg")
        live = cls in LIVE_CLASSES
        templates = (live_prompts if live else object_prompts)[:num_prompts]
        out.append(Subject(name, cls, images, live, [fill_prompt(t, cls) for t in templates]))
    return out


# ----------------------------------------------------------------------------- generation (resumable)

def image_path(out_dir, subject: str, prompt_index: int, k: int) -> str:
    return os.path.join(out_dir, "images", subject, f"{prompt_index:02d}_{k}.png")


def _seed(seed: int, *parts) -> int:
    """A seed per (subject, prompt, ...): the same images whatever subset or order is run."""
    return zlib.crc32("/".join(map(str, (seed, *parts))).encode()) % 2**31


def generate_missing(subjects: list[Subject], out_dir, *, num_refs: int, images_per_prompt: int, seed: int,
                     generate_fn, load_model_fn, gen_kwargs: dict) -> tuple[int, dict | None]:
    """Generate every image not yet on disk. Returns how many were generated and the steps/guidance used (None
    when nothing was missing: the model is only loaded then, so rescoring a finished run needs no checkpoint)."""
    from tqdm import tqdm

    todo = []  # (subject, prompt index, prompt, missing k's)
    for s in subjects:
        if len(s.images) < num_refs:
            raise EvalError(f"subject {s.name} has {len(s.images)} images, fewer than --num_refs {num_refs}")
        for p, prompt in enumerate(s.prompts):
            missing = [k for k in range(images_per_prompt) if not os.path.isfile(image_path(out_dir, s.name, p, k))]
            if missing:
                todo.append((s, p, prompt, missing))
    total = sum(len(s.prompts) for s in subjects) * images_per_prompt
    remaining = sum(len(m) for *_, m in todo)
    if not remaining:
        return 0, None
    import sample

    model = load_model_fn()
    # The checkpoint's own sampling defaults, by sample.py's resolver: the same settings as its CLI.
    settings = sample.sampling_settings(getattr(model, "meta", {}) or {}, gen_kwargs["device"],
                                        steps=gen_kwargs["steps"], guidance=gen_kwargs["guidance"],
                                        sampler=gen_kwargs["sampler"], dtype=gen_kwargs["dtype"])
    bar = tqdm(total=total, initial=total - remaining, unit="img", desc="generate", dynamic_ncols=True)
    done = 0
    runs = []  # (subject, prompt index, prompt, consecutive missing k's): one generate call each
    for s, p, prompt, missing in todo:
        for k in missing:
            if runs and runs[-1][:2] == (s, p) and runs[-1][3][-1] == k - 1:
                runs[-1][3].append(k)
            else:
                runs.append((s, p, prompt, [k]))
    for s, p, prompt, missing in runs:
        # Each image is one set [references..., new image]: image k is set k of the prompt's seed (the seed the
        # prompt's image 0 always had), so a rerun remakes a lost image exactly, whichever others are missing.
        sets = generate_fn(model, s.images[:num_refs], [prompt], ref_prompt=f"a photo of a {s.class_name}",
                           num_sets=len(missing), seed=_seed(seed, s.name, p, 0), first_set=missing[0], **settings)
        if len(sets) != len(missing):
            raise EvalError(f"generate returned {len(sets)} sets for num_sets={len(missing)}")
        for k, images in zip(missing, sets):
            path = image_path(out_dir, s.name, p, k)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            for stale in Path(out_dir, "masks").glob(f"*/images/{s.name}/{Path(path).stem}{MASK_SUFFIX}"):
                stale.unlink()  # a segmenter mask cached for an image that is being replaced
            _save_atomic(images[0], path)
        done += len(missing)
        bar.update(len(missing))
    bar.close()
    return done, {f"{k}_used": v for k, v in settings.items()}


# ----------------------------------------------------------------------------- scoring and tables

def score(subjects: list[Subject], out_dir, *, images_per_prompt: int, clip: ClipEmbedder, dino: DinoEmbedder,
          masks: Masks | None, background=DEFAULT_BACKGROUND, num_refs: int = 1,
          baselines: dict | None = None) -> list[dict]:
    """One record per generated image with its five scores (masked ones None when masks is None). If `baselines`
    is a dict, the two baseline rows' records are added to it under BASELINES' names (see baseline_records)."""
    from tqdm import tqdm

    records = []
    bar = tqdm(total=sum(len(s.prompts) for s in subjects) * images_per_prompt, unit="img", desc="score",
               dynamic_ncols=True)
    for s in subjects:
        jobs = [(p, k, image_path(out_dir, s.name, p, k)) for p in range(len(s.prompts))
                for k in range(images_per_prompt)]
        absent = [path for *_, path in jobs if not os.path.isfile(path)]
        if absent:
            raise EvalError(f"{len(absent)} generated images missing, e.g. {absent[0]} (run without --score_only)")
        refs = [load_image(p) for p in s.images]
        gens = [load_image(path) for *_, path in jobs]
        ref_clip, ref_dino = clip.images(refs), dino.images(refs)
        gen_clip, gen_dino = clip.images(gens), dino.images(gens)
        scores = {
            "CLIP-T": text_scores(gen_clip, clip.texts([s.prompts[p] for p, _, _ in jobs])),
            "CLIP-I": image_scores(gen_clip, ref_clip),
            "DINO": image_scores(gen_dino, ref_dino),
        }
        if masks is not None:
            def cut(paths, images, kind):
                return [apply_mask(im, masks.get(path, im, s.class_name, f"{kind}/{s.name}/{Path(path).stem}"),
                                   background) for path, im in zip(paths, images)]

            m_refs, m_gens = cut(s.images, refs, "refs"), cut([path for *_, path in jobs], gens, "images")
            m_ref_clip, m_ref_dino = clip.images(m_refs), dino.images(m_refs)
            scores["MCLIP-I"] = image_scores(clip.images(m_gens), m_ref_clip)
            scores["MDINO"] = image_scores(dino.images(m_gens), m_ref_dino)
        if baselines is not None:
            ref_emb = {"CLIP-I": ref_clip, "DINO": ref_dino}
            if masks is not None:
                ref_emb.update({"MCLIP-I": m_ref_clip, "MDINO": m_ref_dino})
            for row, recs in baseline_records(s, ref_emb, clip.texts(s.prompts), num_refs).items():
                baselines.setdefault(row, []).extend(recs)
        for i, (p, k, path) in enumerate(jobs):
            rec = {"subject": s.name, "class": s.class_name, "live": s.live, "prompt_index": p,
                   "prompt": s.prompts[p], "k": k, "path": os.path.relpath(path, out_dir)}
            rec.update({m: (round(float(scores[m][i]), 6) if m in scores else None) for m in METRICS})
            records.append(rec)
        bar.update(len(jobs))
    bar.close()
    return records


BASELINES = ("reference copy", "real images")


def baseline_records(s: Subject, ref_emb: dict, prompt_emb: torch.Tensor, num_refs: int) -> dict[str, list[dict]]:
    """The two rows that keep the table honest, from the subject's real images alone (no generation).

    reference copy: each input reference, returned unchanged for every prompt and scored like a generation
        (against all of the subject's real images, itself included, and against the prompt). A model that copies
        its input scores this; its image scores are inflated by the copy matching itself.
    real images: each real image against the subject's *other* real images (itself excluded), the upper bound
        a generation of the same subject can reach (DreamBench DINO 0.774 in the literature). No CLIP-T: there is
        no prompt.
    ref_emb: {metric: (n_images, d) embeddings of s.images} for CLIP-I/DINO (and MCLIP-I/MDINO when masked);
    prompt_emb: (n_prompts, d) CLIP text embeddings of s.prompts."""
    n, k = len(s.images), min(num_refs, len(s.images))
    base = {"subject": s.name, "class": s.class_name, "live": s.live}
    copy = []
    for p, prompt in enumerate(s.prompts):
        clip_t = text_scores(ref_emb["CLIP-I"][:k], prompt_emb[p:p + 1].expand(k, -1))  # (k,)
        for r in range(k):
            rec = {**base, "prompt_index": p, "prompt": prompt, "path": s.images[r], "CLIP-T": float(clip_t[r])}
            rec.update({m: float(image_scores(e[r:r + 1], e)[0]) if m in ref_emb else None
                        for m, e in ((m, ref_emb.get(m)) for m in METRICS if m != "CLIP-T")})
            copy.append({m: round(v, 6) if isinstance(v, float) else v for m, v in rec.items()})
    real = []
    if n > 1:  # pairs of different images only
        others = ~torch.eye(n, dtype=torch.bool)  # (n, n): j != i
        pair = {m: (similarity(e, e) * others).sum(1) / (n - 1) for m, e in ref_emb.items()}  # (n,) per metric
        for i in range(n):
            rec = {**base, "path": s.images[i], "CLIP-T": None}
            rec.update({m: round(float(pair[m][i]), 6) if m in pair else None for m in METRICS if m != "CLIP-T"})
            real.append(rec)
    return {"reference copy": copy, "real images": real}


def _stats(values: list) -> dict | None:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if not len(v):
        return None
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}


def summarize(records: list[dict]) -> dict:
    """mean ± std over images, per subject, per kind (objects / live) and overall; overall also gives the std of
    the per-subject means (how much the score depends on the subject)."""
    def group(recs):
        return {m: _stats([r[m] for r in recs]) for m in METRICS}

    subjects = {}
    for r in records:
        subjects.setdefault(r["subject"], []).append(r)
    out = {"subjects": {name: {"class": recs[0]["class"], "live": recs[0]["live"], "n": len(recs), **group(recs)}
                        for name, recs in subjects.items()}}
    out["objects"] = group([r for r in records if not r["live"]])
    out["live"] = group([r for r in records if r["live"]])
    out["overall"] = group(records)
    for m in METRICS:
        means = [v[m]["mean"] for v in out["subjects"].values() if v[m] is not None]
        if out["overall"][m] is not None and len(means) > 1:
            out["overall"][m]["std_over_subjects"] = float(np.std(means, ddof=1))
    return out


def summarize_baselines(baselines: dict) -> dict:
    """{row: {metric: stats}} over all subjects' records of each baseline row."""
    return {row: {m: _stats([r[m] for r in baselines.get(row, [])]) for m in METRICS} for row in BASELINES}


def markdown(summary: dict, settings: dict) -> str:
    def cell(st):
        return "n/a" if st is None else f"{st['mean']:.4f} ± {st['std']:.4f}"

    lines = ["# DreamBooth benchmark", ""]
    lines += [f"- {k}: {v}" for k, v in settings.items()]
    lines += ["", "mean ± std over generated images.", "",
              "| subject | class | images | " + " | ".join(METRICS) + " |",
              "|---|---|---|" + "---|" * len(METRICS)]
    for name, row in summary["subjects"].items():
        lines.append(f"| {name} | {row['class']} | {row['n']} | " + " | ".join(cell(row[m]) for m in METRICS) + " |")
    for label, key in (("**objects**", "objects"), ("**live**", "live"), ("**overall**", "overall")):
        row = summary[key]
        n = max((row[m]["n"] for m in METRICS if row[m]), default=0)
        if n:
            lines.append(f"| {label} | | {n} | " + " | ".join(cell(row[m]) for m in METRICS) + " |")
    if summary.get("baselines"):
        for name, row in summary["baselines"].items():
            n = max((row[m]["n"] for m in METRICS if row[m]), default=0)
            if n:
                lines.append(f"| *{name}* | | {n} | " + " | ".join(cell(row[m]) for m in METRICS) + " |")
        lines += ["", "*reference copy*: the input references themselves scored as if they were the generations (a "
                  "model that copies its input scores this). *real images*: each real image against the subject's "
                  "other real images, the upper bound (DreamBench DINO 0.774 in the literature). A generation row "
                  "near *reference copy* with a low CLIP-T copies; scores above *real images* are not fidelity."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- CLI

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="DreamBooth 'dataset' folder: <subject>/*.jpg and "
                   "prompts_and_classes.txt (github.com/google/dreambooth)")
    p.add_argument("--out", required=True, help="output folder: images/, masks/, results.md, results.json; "
                   "rerunning with the same folder resumes")
    p.add_argument("--ckpt", default=None, help="JeDi checkpoint, as for sample.py (default: sample.py's default)")
    p.add_argument("--num_refs", type=int, default=1, help="reference images per subject (its first N, sorted by "
                   "name); the paper reports 1 and 3")
    p.add_argument("--images_per_prompt", type=int, default=4, help="images generated and scored per prompt, each "
                   "its own set [references..., new image] (the protocol's 4)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the checkpoint's, else 50)")
    p.add_argument("--guidance", type=float, default=None, help="image guidance λ (default: the checkpoint's, else "
                   f"{DEFAULT_GUIDANCE:g})")
    p.add_argument("--sampler", default=None, choices=["ddim", "dpmpp_2m"], help="default: the checkpoint's, else ddim "
                   "(sample.py's defaults, resolved by its sampling_settings)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="as sample.py's: auto = "
                   "bf16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", nargs="?", const="default", default=None,
                   choices=["default", "reduce-overhead", "max-autotune"], help="as sample.py's --compile")
    p.add_argument("--seed", type=int, default=0, help="base seed; each (subject, prompt) gets its own seed from it, "
                   "so a subset run gives the same images as the full run")
    p.add_argument("--clip_model", default="ViT-B-32-quickgelu", help="open_clip architecture name or .json "
                   "(ViT-B-32-quickgelu for OpenAI's ViT-B/32; ViT-L-14-quickgelu for OpenAI's ViT-L/14)")
    p.add_argument("--clip_weights", required=True, help="local CLIP weights file: OpenAI's ViT-B-32.pt or an "
                   "open_clip_pytorch_model.bin / .safetensors")
    p.add_argument("--dino", required=True, help="local folder of facebook/dino-vits16 (config.json + weights)")
    p.add_argument("--grounding_dino", default=None, help="local folder of a transformers Grounding-DINO (e.g. "
                   "IDEA-Research/grounding-dino-tiny), for masks where no mask file exists")
    p.add_argument("--sam", default=None, help="local folder of a transformers SAM (e.g. facebook/sam-vit-base)")
    p.add_argument("--no_masked", action="store_true", help="skip MCLIP-I and MDINO (no masks needed)")
    p.add_argument("--background", default="255,255,255", help="R,G,B painted outside the mask (default white)")
    p.add_argument("--subjects", default=None, help="comma-separated subset of subjects (default: all)")
    p.add_argument("--num_prompts", type=int, default=None, help="only the first N prompts per subject (smoke runs)")
    p.add_argument("--score_only", action="store_true", help="never generate; fail if images are missing")
    p.add_argument("--batch_size", type=int, default=32, help="images per CLIP/DINO forward pass")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where generation and "
                   "scoring run (default: cuda if available, else cpu)")
    return p.parse_args(argv)


def _ckpt_file(ckpt) -> str:
    """--ckpt as the file it names (no --ckpt: sample.py's default checkpoint), for comparing two runs."""
    import sample

    return os.path.realpath(ckpt or sample.DEFAULT_CKPT)


def _check_checkpoint(ckpt):
    """A --ckpt that sample.load_model would refuse is reported with the missing weights, before anything is
    written (sample.check_checkpoint reads no tensor data)."""
    import sample

    try:
        sample.check_checkpoint(ckpt)
    except sample.UserError as e:
        raise MissingWeights(str(e)) from None


def _check_run_settings(out_dir, settings: dict):
    """Images made with other settings must not be mixed into this folder's table. The checkpoint is compared as
    the file it resolves to: `--ckpt assets/jedi_toy.safetensors` and no --ckpt (that same default) are one."""
    path = os.path.join(out_dir, "run.json")
    if os.path.isfile(path):
        before = json.loads(Path(path).read_text())
        same = {"ckpt": lambda a, b: _ckpt_file(a) == _ckpt_file(b)}
        diff = {k: (before.get(k), v) for k, v in settings.items()
                if not same.get(k, lambda a, b: a == b)(before.get(k), v)}

        def shown(k, v):
            if k == "ckpt" and v is None:
                import sample

                return f"the default {os.path.relpath(sample.DEFAULT_CKPT)}"
            return repr(v)
        if diff:
            raise EvalError(f"{path}: the images here were generated with other settings "
                            + ", ".join(f"{k}={shown(k, a)} (now {shown(k, b)})" for k, (a, b) in diff.items())
                            + "; use another --out or the same settings")
    else:
        os.makedirs(out_dir, exist_ok=True)
        Path(path).write_text(json.dumps(settings, indent=1) + "\n")


def main(argv=None, *, generate_fn=None, load_model_fn=None, segmenter=None) -> int:
    """generate_fn/load_model_fn default to sample.py's (imported only when something must be generated);
    segmenter defaults to GroundedSAM when --grounding_dino and --sam are given. Tests inject all three."""
    args = parse_args(argv)
    try:
        background = tuple(int(c) for c in args.background.split(","))
        if len(background) != 3 or not all(0 <= c <= 255 for c in background):
            raise EvalError(f"--background {args.background!r}: expected R,G,B in 0..255")
        subjects = load_benchmark(args.dataset, args.subjects.split(",") if args.subjects else None,
                                  args.num_prompts)
        # Check every weight path up front and report all that are missing at once, then load the scoring models
        # before generating: a wrong path should fail before hours of generation, not after.
        checks = [lambda: _require_file(args.clip_weights, f"CLIP weights for {args.clip_model}"),
                  lambda: _require_hf_folder(args.dino, "DINO ViT-S/16 (facebook/dino-vits16)")]
        if not args.no_masked and segmenter is None:
            checks += [lambda: args.grounding_dino and _require_hf_folder(args.grounding_dino, "Grounding-DINO"),
                       lambda: args.sam and _require_hf_folder(args.sam, "SAM")]
        if not args.score_only and load_model_fn is None:
            checks.append(lambda: _check_checkpoint(args.ckpt))
        missing = []
        for check in checks:
            try:
                check()
            except MissingWeights as e:
                missing.append(str(e))
        if missing:
            raise MissingWeights("\n       ".join(missing))
        clip = ClipEmbedder(args.clip_model, args.clip_weights, args.device, args.batch_size)
        dino = DinoEmbedder(args.dino, args.device, args.batch_size)
        if segmenter is None and (args.grounding_dino or args.sam) and not args.no_masked:
            if not (args.grounding_dino and args.sam):
                raise EvalError("masks by segmentation need both --grounding_dino and --sam")
            segmenter = GroundedSAM(args.grounding_dino, args.sam, args.device)
        masks = None if args.no_masked else Masks(segmenter, os.path.join(args.out, "masks"))

        gen_settings = {"ckpt": args.ckpt, "num_refs": args.num_refs, "images_per_prompt": args.images_per_prompt,
                        "steps": args.steps, "guidance": args.guidance, "sampler": args.sampler, "seed": args.seed,
                        "dtype": args.dtype}
        t0 = time.time()
        if not args.score_only:
            _check_run_settings(args.out, gen_settings)
            # sample.py is imported only when something is to be generated: it pulls in the whole model stack.
            if generate_fn is None:
                def generate_fn(*a, **kw):
                    import sample

                    try:
                        return sample.generate(*a, **kw)
                    except sample.UserError as e:
                        raise EvalError(str(e)) from None
            if load_model_fn is None:
                def load_model_fn():
                    import sample

                    try:
                        return sample.load_model(args.ckpt, args.device, dtype=args.dtype, compile=args.compile)
                    except sample.UserError as e:
                        raise EvalError(str(e)) from None

            n, used = generate_missing(
                subjects, args.out, num_refs=args.num_refs, images_per_prompt=args.images_per_prompt, seed=args.seed,
                generate_fn=generate_fn, load_model_fn=load_model_fn,
                gen_kwargs={"steps": args.steps, "guidance": args.guidance, "sampler": args.sampler,
                            "dtype": args.dtype, "device": args.device})
            print(f"generated {n} images in {time.time() - t0:.0f} s", file=sys.stderr)
            if used:  # the checkpoint defaults actually applied, for the report
                run_json = Path(args.out, "run.json")
                run_json.write_text(json.dumps({**json.loads(run_json.read_text()), **used}, indent=1) + "\n")
        baselines = {}
        records = score(subjects, args.out, images_per_prompt=args.images_per_prompt, clip=clip, dino=dino,
                        masks=masks, background=background, num_refs=args.num_refs, baselines=baselines)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    summary = {**summarize(records), "baselines": summarize_baselines(baselines)}
    run_json = Path(args.out, "run.json")  # how the images were made (may predate a --score_only run's flags)
    made = json.loads(run_json.read_text()) if run_json.is_file() else gen_settings
    settings = {"checkpoint": made["ckpt"] or "sample.py default", "references per subject": made["num_refs"],
                "steps": made.get("steps_used", made["steps"]), "guidance": made.get("guidance_used", made["guidance"]),
                "sampler": made.get("sampler_used", made["sampler"]), "dtype": made.get("dtype_used", made.get("dtype")),
                "seed": made["seed"],
                "reference caption": "a photo of a {class}", "images per prompt": args.images_per_prompt,
                "subjects": len(subjects), "CLIP": clip.description, "DINO": dino.description,
                "masks": masks.describe() if masks else "none (--no_masked)",
                "mask background": ",".join(map(str, background))}
    md = markdown(summary, settings)
    Path(args.out, "results.md").write_text(md)
    Path(args.out, "results.json").write_text(json.dumps({"settings": settings, **summary, "images": records,
                                                          "baseline_images": baselines},
                                                         indent=1) + "\n")
    print(md)
    print(f"wrote {os.path.join(args.out, 'results.md')} and results.json")
    return 0


if __name__ == "__main__":
    # Belt and braces: everything is loaded from local paths; set before transformers reads it at import.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
