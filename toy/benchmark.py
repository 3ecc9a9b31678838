"""Toy benchmark: does a JeDi checkpoint copy a never-seen subject into the context its prompt asks for?

    python toy/benchmark.py                                   # the shipped toy model, all 34 held-out subjects
    python toy/benchmark.py --ckpt runs/toy/jedi.safetensors --subjects 8 --out /tmp/toy.md

Held-out procedural subjects only (data_procedural.subjects('heldout'): attribute combinations no training set
contained). For each subject, three references are rendered in three contexts with distinct backgrounds (as
close-ups by default, like the subject-centric photos users give; --ref_framing context frames them like the
targets), and --targets prompts are captioned (data_procedural.caption) for contexts whose backgrounds none of
the references show, so copying a reference's background never counts as following the prompt. Four conditions
(paper Table 4 and the text-only baseline), all from the same noise seed per subject (paired comparisons):

    JeDi, 1 reference            image guidance λ (eq. 3; the checkpoint's default or --guidance)
    JeDi, 3 references           the same λ
    JeDi, 1 reference, λ = 1     no image guidance
    text only                    no references (the same λ acts as classifier-free text guidance)

An attribute classifier trained on generator ground truth (toy/classifier.py) reads every image:
    subject fidelity  = mean over shape, color, pattern, pattern_color of [predicted == the reference subject's]
                        (also: all four right at once)
    text alignment    = mean of [predicted background == prompted] and [predicted position == prompted]
    set consistency   = how often images generated in one set agree on a subject attribute, right or wrong
                        (JeDi's claim that a joint sample shares one subject, even from text alone)
Each is averaged per subject, then mean ± standard error over subjects. Two calibration rows score the
generator's own renders in the target contexts: of the reference subject (the upper bound, ~1.0) and of random
other held-out subjects, a different one per image (fidelity and set consistency at chance, text alignment still
~1.0). Same command, same numbers.
"""
import argparse
import datetime
import hashlib
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data_procedural as dp  # noqa: E402
from model.diffusion import DEFAULT_GUIDANCE, personalize  # noqa: E402
from toy import classifier as tc  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "toy_benchmark.md"
MAX_REFS = 3
REF_FRAMINGS = ("close", "context")
SUBJECT_ORDER_SEED = 7  # fixed order of held-out subjects, so --subjects 8 is the same 8 for every --seed
METRICS = ("fidelity", "exact", "consistency", "text", "background", "position", *tc.SUBJECT_HEADS)


def conditions(guidance: float):
    """(key, label, number of references, λ) of the four generated conditions."""
    return [("jedi_1ref", "JeDi, 1 reference", 1, guidance),
            ("jedi_3ref", "JeDi, 3 references", 3, guidance),
            ("jedi_1ref_noig", "JeDi, 1 reference, no image guidance", 1, 1.0),
            ("text_only", "text only (no references)", 0, guidance)]


CALIBRATION = [("render_same", "generator render of the reference subject (upper bound)"),
               ("render_other", "generator renders of random other held-out subjects, one per image (chance)")]


# ----------------------------------------------------------------------------- protocol

def heldout_order() -> list:
    held = dp.subjects("heldout")
    return [held[i] for i in np.random.default_rng(SUBJECT_ORDER_SEED).permutation(len(held))]


def make_case(index: int, subject, targets: int, num_sets: int, resolution: int, seed: int,
              ref_framing: str = "close") -> dict:
    """Everything about one subject that does not involve the model: references with their captions, target
    contexts and prompts, and the calibration renders (images at the model's resolution).
    ref_framing: 'close' renders the references as close-ups (subject large and centred, as in the subject-centric
    photos a user gives), 'context' at a framed position like the targets. Same backgrounds and poses' stream."""
    if ref_framing not in REF_FRAMINGS:
        raise ValueError(f"ref_framing must be one of {REF_FRAMINGS}, not {ref_framing!r}")
    if not 1 <= targets <= len(dp.BACKGROUNDS) - MAX_REFS:
        raise ValueError(f"1 to {len(dp.BACKGROUNDS) - MAX_REFS} targets: their backgrounds must differ from the "
                         f"{MAX_REFS} references'")
    # separate streams, so that e.g. --targets or --num_sets never changes the references
    r_ref, r_tgt, r_cal = (np.random.default_rng([seed, index, k]) for k in range(3))
    bgs = [list(dp.BACKGROUNDS)[i] for i in r_ref.permutation(len(dp.BACKGROUNDS))]
    positions = list(dp.POSITIONS)
    ref_ctx = [(bg, positions[r_ref.integers(3)]) for bg in bgs[:MAX_REFS]]
    if ref_framing == "close":  # after the same draws: the rest of every stream is unchanged
        ref_ctx = [(bg, dp.CLOSE_UP) for bg, _ in ref_ctx]
    refs = [dp.render(subject, c, resolution=resolution, rng=r_ref)[0] for c in ref_ctx]
    ref_captions = [dp.caption(c, r_ref) for c in ref_ctx]
    tgt_ctx = [(bg, positions[r_tgt.integers(3)]) for bg in bgs[MAX_REFS : MAX_REFS + targets]]
    prompts = [dp.caption(c, r_tgt) for c in tgt_ctx]
    others = [s for s in dp.subjects("heldout") if s != subject]
    other = [others[j] for j in r_cal.integers(len(others), size=targets)]  # one per target: consistency at chance
    # calibration renders laid out like the generations: (num_sets, targets), model resolution, a fresh pose each
    same = [[dp.render(subject, c, resolution=resolution, rng=r_cal)[0] for c in tgt_ctx] for _ in range(num_sets)]
    diff = [[dp.render(o, c, resolution=resolution, rng=r_cal)[0] for o, c in zip(other, tgt_ctx)]
            for _ in range(num_sets)]
    shape = (3, resolution, resolution)
    return dict(subject=subject, other=other, refs=tc.to_tensor(refs), ref_contexts=ref_ctx, ref_captions=ref_captions,
                contexts=tgt_ctx, prompts=prompts,
                render_same=tc.to_tensor([im for row in same for im in row]).reshape(num_sets, targets, *shape),
                render_other=tc.to_tensor([im for row in diff for im in row]).reshape(num_sets, targets, *shape))


@torch.no_grad()
def generate(model, refs, ref_captions, prompts, *, num_sets, steps, guidance, sampler, seed, max_set_size,
             text_guidance=None) -> torch.Tensor:
    """sample.generate, except that each reference keeps its own caption (sample.generate gives all references one
    ref_prompt, but these references show different contexts, and training captioned every image by its own).
    Returns (num_sets, len(prompts), 3, R, R) in [-1, 1], quantised to 8 bits like a saved PNG."""
    n = len(refs)
    room = max_set_size - n
    if room < 1:
        raise ValueError(f"{n} references leave no room in a set of at most {max_set_size} images")
    shape = (model.channels, model.resolution // model.down, model.resolution // model.down)
    ref_latents = model.to_latents(refs) if n else None
    null = model.encode_text([""])
    gen = torch.Generator(device=model.device).manual_seed(seed)
    chunks = []
    for start in range(0, len(prompts), room):  # like sample.generate: each chunk is [all references, some prompts]
        chunk = prompts[start : start + room]
        context = model.encode_text(list(ref_captions[:n]) + chunk)
        z = personalize(model.unet, model.diffusion, refs=ref_latents, context=context, null_context=null,
                        num_new=len(chunk), num_sets=num_sets, steps=steps, guidance=guidance,
                        text_guidance=text_guidance, sampler=sampler, generator=gen, latent_shape=shape)
        new = z.reshape(num_sets, n + len(chunk), *shape)[:, n:]
        R = model.resolution
        chunks.append(model.to_pixels(new.reshape(-1, *shape)).reshape(num_sets, len(chunk), 3, R, R).cpu())
    x = torch.cat(chunks, 1)
    return ((x + 1) * 127.5).round() / 127.5 - 1


def score(classifier, images: torch.Tensor, subject, contexts) -> dict[str, np.ndarray]:
    """Per-image metrics of (num_sets, targets, 3, R, R) images meant to show `subject` in `contexts` (targets)."""
    x = images.reshape(-1, *images.shape[-3:]).float()
    if x.shape[-1] != tc.RESOLUTION:  # the classifier reads 32x32; a larger model's images are shrunk to it
        x = F.interpolate(x, size=tc.RESOLUTION, mode="bilinear", antialias=True, align_corners=False)
    pred = {k: v.numpy() for k, v in tc.predict(classifier, x).items()}
    num_sets = len(x) // len(contexts)
    truth = {k: tc.HEADS[k].index(v) for k, v in subject.attrs().items()}
    out = {k: pred[k] == truth[k] for k in tc.SUBJECT_HEADS}
    out["background"] = pred["background"] == np.tile([tc.HEADS["background"].index(c[0]) for c in contexts], num_sets)
    out["position"] = pred["position"] == np.tile([tc.HEADS["position"].index(c[1]) for c in contexts], num_sets)
    subj = np.stack([out[k] for k in tc.SUBJECT_HEADS])
    out["fidelity"], out["exact"] = subj.mean(0), subj.all(0)
    # set consistency: do the images generated together show one subject, whichever it is? Per image, the share of
    # (other image of its set, subject attribute) pairs on which the two predictions agree; NaN for 1 target.
    labels = np.stack([pred[k].reshape(num_sets, len(contexts)) for k in tc.SUBJECT_HEADS])  # (heads, sets, targets)
    agree = (labels[:, :, :, None] == labels[:, :, None, :]).mean(0)  # (sets, targets, targets)
    others = len(contexts) - 1
    out["consistency"] = ((agree.sum(-1) - 1) / others).reshape(-1) if others else np.full(len(x), np.nan)
    out["text"] = (out["background"].astype(float) + out["position"]) / 2
    for k in tc.SUBJECT_HEADS:  # class indices, for the confusion table: which wrong value an image shows
        out[f"true_{k}"], out[f"read_{k}"] = np.full(len(x), truth[k]), pred[k]
    return {k: v.astype(float) for k, v in out.items()}


def confusion(per_subject: list[dict], head: str) -> np.ndarray:
    """[score() per subject] -> (classes, classes) image counts, rows the subject's true value of `head`, columns
    the value the classifier reads. Its trace over its sum is the per-image mean of that attribute's fidelity."""
    m = np.zeros((len(tc.HEADS[head]),) * 2, dtype=int)
    for d in per_subject:
        np.add.at(m, (d[f"true_{head}"].astype(int), d[f"read_{head}"].astype(int)), 1)
    return m


def summarize(per_subject: list[dict]) -> dict:
    """[{metric: per-image values} per subject] -> {metric: (mean, standard error over subjects)}."""
    out = {}
    for k in METRICS:
        m = np.array([d[k].mean() for d in per_subject])
        se = m.std(ddof=1) / np.sqrt(len(m)) if len(m) > 1 else float("nan")
        out[k] = (float(m.mean()), float(se))
    return out


def evaluate(model, classifier, *, subjects: int | None = None, targets: int = 3, num_sets: int = 1, steps: int = 20,
             sampler: str = "dpmpp_2m", guidance: float = DEFAULT_GUIDANCE, text_guidance: float | None = None, seed: int = 0,
             max_set_size: int = 4, ref_framing: str = "close", log=print) -> dict:
    """Run the benchmark on a loaded model bundle (sample.load_model's; also usable mid-training, on the first
    `subjects` held-out subjects). Returns the summary rows ({condition: {metric: (mean, se)}}) with their labels, the per-image
    metrics per subject, and the first subjects' images for the example grid."""
    order = heldout_order()
    if not 1 <= (subjects or len(order)) <= len(order) or num_sets < 1:
        raise ValueError(f"subjects must be 1 to {len(order)} and num_sets at least 1")
    order = order[: subjects or len(order)]
    conds = conditions(guidance)
    per = {k: [] for k, *_ in conds + CALIBRATION}
    examples = []
    t0 = time.time()
    for i, subject in enumerate(order):
        case = make_case(i, subject, targets, num_sets, model.resolution, seed, ref_framing)
        gen_seed = seed * 1_000_003 + i  # the same noise for every condition of a subject: paired comparisons
        images = {}
        for key, _, n_refs, lam in conds:
            images[key] = generate(model, case["refs"][:n_refs], case["ref_captions"], case["prompts"],
                                   num_sets=num_sets, steps=steps, guidance=lam, text_guidance=text_guidance,
                                   sampler=sampler, seed=gen_seed, max_set_size=max_set_size)
            per[key].append(score(classifier, images[key], subject, case["contexts"]))
        per["render_same"].append(score(classifier, case["render_same"], subject, case["contexts"]))
        per["render_other"].append(score(classifier, case["render_other"], subject, case["contexts"]))
        if len(examples) < 4:
            examples.append((case, images))
        done, last = time.time() - t0, per["jedi_1ref"][-1]
        log(f"[{i + 1}/{len(order)}] {subject.id}: 1-ref fidelity {last['fidelity'].mean():.2f}, text "
            f"{last['text'].mean():.2f}  ({done:.0f}s, ~{done / (i + 1) * (len(order) - i - 1):.0f}s left)")
    labels = dict([(k, label) for k, label, *_ in conds] + CALIBRATION)
    return dict(rows={k: summarize(v) for k, v in per.items()}, labels=labels,
                lams={k: lam for k, _, _, lam in conds}, refs={k: n for k, _, n, _ in conds}, per_image=per,
                examples=examples, subjects=len(order), seconds=time.time() - t0)


# ----------------------------------------------------------------------------- report

def fmt(ms) -> str:
    m, se = ms
    if np.isnan(m):
        return "–"
    return f"{m:.3f}" + ("" if np.isnan(se) else f" ± {se:.3f}")


def targets_check(rows) -> list[str]:
    """Issue 7's targets, judged on the measured means."""
    f = {k: rows[k]["fidelity"][0] for k in rows}
    text = rows["jedi_1ref"]["text"][0]
    checks = [(f["jedi_1ref"] >= 0.8, f"1-reference fidelity ≥ 0.8 ({f['jedi_1ref']:.3f})"),
              (f["jedi_1ref"] - f["text_only"] >= 0.3, f"1-reference fidelity ≥ text-only + 0.3 "
               f"({f['jedi_1ref']:.3f} vs {f['text_only']:.3f})"),
              (text >= 0.8, f"1-reference text alignment ≥ 0.8 ({text:.3f})"),
              (f["jedi_3ref"] >= f["jedi_1ref"], f"3 references ≥ 1 reference ({f['jedi_3ref']:.3f} vs "
               f"{f['jedi_1ref']:.3f})"),
              (f["jedi_1ref_noig"] < f["jedi_1ref"], f"no image guidance < with it ({f['jedi_1ref_noig']:.3f} vs "
               f"{f['jedi_1ref']:.3f})")]
    return [f"- [{'x' if ok else ' '}] {line}" for ok, line in checks]


def file_hash(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def shown(path) -> str:
    """A path as the table shows it: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def report(res: dict, *, command: str, header: list[str]) -> str:
    rows, labels = res["rows"], res["labels"]
    lines = ["# Toy benchmark: JeDi personalization on held-out procedural subjects", "", *header, "",
             "| condition | refs | λ | subject fidelity | all 4 attributes | set consistency | text alignment | "
             "background | position |", "|---|---|---|---|---|---|---|---|---|"]
    for k, label in labels.items():
        calib = k not in res["lams"]
        r = rows[k]
        name, refs, lam = (f"*{label}*", "–", "–") if calib else (label, str(res["refs"][k]), f"{res['lams'][k]:g}")
        lines.append(f"| {name} | {refs} | {lam} | " + " | ".join(fmt(r[m]) for m in METRICS[:6]) + " |")
    lines += ["", "Subject fidelity per attribute:", "", "| condition | " + " | ".join(tc.SUBJECT_HEADS) + " |",
              "|---|" + "---|" * len(tc.SUBJECT_HEADS)]
    for k, label in labels.items():
        lines.append(f"| {label} | " + " | ".join(fmt(rows[k][m]) for m in tc.SUBJECT_HEADS) + " |")
    classes = tc.HEADS["shape"]  # the attribute that transfers least: does a wrong image show another shape or none?
    m = confusion(res["per_image"]["jedi_1ref"], "shape")
    lines += ["", f"Shape as the classifier reads it in the '{labels['jedi_1ref']}' images (rows: the subject's shape; "
              "columns: the shape read; image counts):", "", "| shape | " + " | ".join(classes) + " |",
              "|---|" + "---|" * len(classes)]
    lines += [f"| {c} | " + " | ".join(str(v) for v in row) + " |" for c, row in zip(classes, m)]
    lines += ["", "Issue 7 targets:", "", *targets_check(rows), "", f"Command: `{command}`", ""]
    return "\n".join(lines)


def save_grid(examples, path) -> None:
    """Rows: one per example subject, [3 references | 1 ref | 3 refs | λ=1 | text only], first set of each."""
    from PIL import Image

    rows = []
    for case, images in examples:
        groups = [case["refs"]] + [images[k][0] for k in ("jedi_1ref", "jedi_3ref", "jedi_1ref_noig", "text_only")]
        # 1 px white border around each image, 4 px more between groups
        row = [F.pad(torch.cat([F.pad(x, (1, 1, 1, 1), value=1.0) for x in g], dim=-1), (0, 4), value=1.0)
               for g in groups]
        rows.append(torch.cat(row, dim=-1))
    grid = torch.cat(rows, dim=-2)
    a = ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(a).resize((a.shape[1] * 2, a.shape[0] * 2), Image.NEAREST).save(path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="JeDi checkpoint (default: the shipped toy model in assets/)")
    p.add_argument("--subjects", type=int, default=None, help="number of held-out subjects (default: all 34)")
    p.add_argument("--targets", type=int, default=3, help="target contexts (prompts) per subject, at most 5")
    p.add_argument("--num_sets", type=int, default=1, help="samples per prompt (independent sets)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the checkpoint's, else 20)")
    p.add_argument("--sampler", default=None, choices=["ddim", "dpmpp_2m"], help="default: the checkpoint's, else "
                   "dpmpp_2m")
    p.add_argument("--guidance", type=float, default=None, help="image guidance λ of the guided conditions "
                   f"(default: the checkpoint's, else {DEFAULT_GUIDANCE:g})")
    p.add_argument("--text_guidance", type=float, default=None, help="optional separate text scale (sample.py's)")
    p.add_argument("--max_set_size", type=int, default=None, help="images per set (refs + new; default: the "
                   "checkpoint's largest training set size, else 4); more prompts are chunked")
    p.add_argument("--ref_framing", default="close", choices=REF_FRAMINGS, help="references as close-ups (default; "
                   "subject-centric, like the photos users give) or at framed positions like the targets")
    p.add_argument("--seed", type=int, default=0, help="contexts, poses and sampling noise; same seed, same table")
    p.add_argument("--classifier", default=str(tc.WEIGHTS), help="attribute classifier weights (trained if missing)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="markdown table (also printed)")
    p.add_argument("--grid", default=None, help="example image grid (default: --out with .png; '' for none)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; 1 is "
                   "much faster while a training run shares the CPU)")
    args = p.parse_args(argv)
    n_held, max_targets = len(dp.subjects("heldout")), len(dp.BACKGROUNDS) - MAX_REFS
    if args.subjects is not None and not 1 <= args.subjects <= n_held:
        p.error(f"--subjects must be 1 to {n_held}")
    if not 1 <= args.targets <= max_targets:
        p.error(f"--targets must be 1 to {max_targets} (target backgrounds differ from the {MAX_REFS} references')")
    if args.num_sets < 1 or (args.max_set_size is not None and args.max_set_size <= MAX_REFS):
        p.error(f"--num_sets must be at least 1 and --max_set_size more than {MAX_REFS}")
    return args


def main(argv=None) -> int:
    import sample

    args = parse_args(argv)
    command = "python toy/benchmark.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model = sample.load_model(args.ckpt, args.device)
    except sample.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ckpt = args.ckpt or sample.DEFAULT_CKPT
    meta = model.meta
    settings = sample.sampling_settings(meta, args.device, steps=args.steps, guidance=args.guidance,
                                        sampler=args.sampler)  # the one resolver: flag, checkpoint, default
    steps, sampler, guidance = settings["steps"], settings["sampler"], settings["guidance"]
    # the largest set the model was trained on: coupled attention over larger sets is out of distribution
    max_set_size = args.max_set_size or int(meta.get("max_set_size") or max(meta.get("set_sizes") or [4]))
    if max_set_size <= MAX_REFS:
        print(f"error: the checkpoint's sets hold at most {max_set_size} images, too few for {MAX_REFS} references "
              f"+ 1; pass --max_set_size", file=sys.stderr)
        return 2
    classifier, cmeta = tc.load(args.classifier)
    res = evaluate(model, classifier, subjects=args.subjects, targets=args.targets, num_sets=args.num_sets, steps=steps,
                   sampler=sampler, guidance=guidance, text_guidance=args.text_guidance, seed=args.seed,
                   max_set_size=max_set_size, ref_framing=args.ref_framing)
    n_img = res["subjects"] * args.targets * args.num_sets
    framing = "close-ups" if args.ref_framing == "close" else "at framed positions"
    header = [
        f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; machine: {platform.system()} "
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.get_num_threads()} threads, device {args.device}; "
        f"runtime {res['seconds']:.0f} s",
        f"- checkpoint: `{shown(ckpt)}` (sha256 {file_hash(ckpt)}), {model.resolution}x{model.resolution} "
        f"{meta.get('space', '')}; sampler {sampler}, {steps} steps, λ = {guidance:g}"
        + ("" if args.text_guidance is None else f", text scale {args.text_guidance:g}")
        + f", sets of at most {max_set_size}",
        f"- classifier: `{shown(args.classifier)}` (sha256 {file_hash(args.classifier)}), held-out render accuracy "
        + ", ".join(f"{k} {v:.3f}" for k, v in cmeta["heldout_accuracy"].items()),
        f"- {res['subjects']} held-out subjects x {args.targets} target contexts x {args.num_sets} set(s) = {n_img} "
        f"images per condition; seed {args.seed}; references {framing}. Mean ± standard error over subjects. "
        f"Target backgrounds differ from all reference backgrounds; *italic* rows score the generator's own renders "
        f"(calibration).",
    ]
    grid = os.path.splitext(args.out)[0] + ".png" if args.grid is None else args.grid
    if grid:
        header.append(f"- examples: `{os.path.basename(grid)}` (rows: subjects; columns: the 3 references, then "
                      f"{args.targets} images each for 1 ref, 3 refs, λ = 1, text only)")
    text = report(res, command=command, header=header)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if grid:
        save_grid(res["examples"], grid)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
