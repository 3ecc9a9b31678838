"""Attention kernel sweep: every variant x JeDi's shapes, correctness first, then TFLOP/s and the dispatch table.

    bash bench/gpu_kernel_sweep.sh OUTDIR                  # the entry point on a GPU (exit 2 without CUDA)
    python bench/kernel_sweep.py --out OUTDIR [--models sd1,sdxl@512] [--dtypes fp16,bf16] [--set-sizes 1,2,3,4]
                                 [--variants ...] [--max-seconds 270] [--workers 6]
    python bench/kernel_sweep.py --cpu-smoke --out OUTDIR  # no GPU: tiny shapes under TRITON_INTERPRET=1

Shapes, per model of --models (model.flavours' names at their own resolution or @PX; default sd1, i.e. sd1@512),
recorded from one meta-device forward of its full-size UNet (attention_levels), with the model's own heads: its
coupled self-attention over N = 1..4 images, L = N*HW, batch 2 sets (one set with classifier-free guidance), and its
cross-attention, Lq = HW, Lk = 77, batch 8 images (2 x 4). SD-1.x at 512 px: HW 4096 / 1024 / 256 / 64 with head
dims 40 / 80 / 160 / 160, 8 heads. SDXL (head dim 64): at 1024 px HW 4096 with 10 heads and 1024 with 20; at 512 px
(sdxl@512) HW 1024 with 10 heads and 256 with 20. Forward and backward, fp16 and bf16.
Variants: ours -- triton (autotuned, pointer loads), triton-tma (forward K/V through TMA descriptors),
triton-ws (TMA + warp-specialized forward loop), triton-atomic (one backward kernel, atomic fp32 dQ),
triton-noalign (the pre-fix scalar loads; D 40 self-attention only: at D 80 / 160 it compiles to the same
code) -- and PyTorch's SDPA: its default choice (what the "sdpa" backend runs) and each of cudnn / flash /
efficient forced. bench/gpu_lease.sh runs the cut that decides the dispatch table of JeDi and JeDi-XL: models sd1
and sdxl@512 (config/jedi_sdxl.py's resolution), bf16 (what sample.py and train.py run on CUDA), N = 2 and 4 (their
length buckets cover N = 3 too), the variants the table chooses from plus cuDNN (the issue's yardstick).

Order of work:
1. warm-up (GPU): `--workers` processes compile every Triton kernel the sweep will run, in parallel, into
   Triton's on-disk cache (autotune picks are not saved there, so concurrent GPU use does not bias them);
2. per (shape, dtype), every variant is checked against SDPA on fp32 copies -- out, dq, dk, dv within
   2 x (default SDPA's own error in that dtype) + eps, every kernel buffer pre-filled with NaN -- and only the
   variants that pass are timed: a CUDA graph of many calls (launch overhead removed: it would dominate the
   ~20 us of D 160 at L 512), median of 5 replays; backward = (forward + backward) - forward;
3. writes OUTDIR/kernel_sweep.md (TFLOP/s; FLOPs 4*B*H*Lq*Lk*D forward at the model's H, backward
   flops.ATTENTION_BACKWARD_FACTOR (2.5) x that, true D),
   OUTDIR/dispatch/<card>.json (the format kernels/dispatch reads; copy it to kernels/dispatch/ to commit it)
   and OUTDIR/SUMMARY.md (card, date, command, versions, git commit, seconds per phase, anything skipped).
The dispatch table picks, per (dtype, head dim, Lq bucket, Lk bucket) (not per head count), the backend with the
least summed time over the bucket's shapes among our variants (not triton-noalign) and default sdpa: "fwd" by
forward time, "train" by forward + backward; ours must beat sdpa by 2 % (timing noise does not flip a choice). A
shape is started only if the --max-seconds budget should still cover it.
--cpu-smoke also makes every warp-specialized launch fail as a compile failure would on a GPU, so the fallback
(flash_attn._WS_FAILED) and its report run in CI; and it exits 1 if any variant fails the check or cannot run.
"""
import argparse
import datetime
import functools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]  # flops.py lives in bench/ or at the root, depending on the tree

from check_attention_cuda import EPS  # noqa: E402  the same correctness rule as the CUDA check

MODELS = "sd1"  # --models default: SD-1.x at 512 px, the sweep as it was (bench/gpu_kernel_sweep.sh's budget)
OURS = ("triton", "triton-tma", "triton-ws", "triton-atomic", "triton-noalign")
SDPAS = ("sdpa", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient")
DTYPES = ("fp16", "bf16")
MARGIN = 0.98  # a Triton variant enters the dispatch table only if it takes <= 98 % of sdpa's time
SETS, IMAGES = 2, 8  # self-attention batch: 2 sets (one set with classifier-free guidance); cross: 8 images (2 x 4)


class Shape(NamedTuple):
    kind: str  # "self" (coupled over a set) or "cross" (to the text tokens)
    b: int
    lq: int
    lk: int
    h: int  # heads: the model's own at that level (SD-1.x 8; SDXL 10 and 20), for true TFLOP/s
    d: int
    uses: tuple  # where the model runs it: "sd1@512 N=2" (self-attention, N images per set), "sdxl@512" (cross)


def parse_models(text):
    """'sd1,sdxl@512' -> [(flavour, px)]: model.flavours' names, each at its own resolution unless @PX says."""
    from model.flavours import FLAVOURS
    out = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        name, at, px = item.partition("@")
        if name not in FLAVOURS:
            raise ValueError(f"--models: unknown model {name!r} in {text!r} (known: {', '.join(FLAVOURS)})")
        if at and not (px.isdigit() and int(px) % 64 == 0 and 128 <= int(px) <= 2048):
            raise ValueError(f"--models: {item!r}: the resolution must be a multiple of 64 in 128..2048 pixels")
        out.append((name, int(px) if px else FLAVOURS[name].resolution))
    if not out:
        raise ValueError("--models: expected a comma list like sd1,sdxl@512")
    return out


@functools.lru_cache(maxsize=None)
def attention_levels(name, px):
    """The model's attention shapes per image at px x px, recorded from one forward of its full-size UNet on the
    meta device (flops.py's shape-only stub: no compute, no memory): (self [(HW, H, D)], cross [(HW, Lk, H, D)]),
    highest resolution first. SD-1.x at 512: HW 4096 / 1024 / 256 / 64 with D 40 / 80 / 160 / 160, 8 heads; SDXL at
    1024: HW 4096 with 10 heads and 1024 with 20 (the middle block's is the last level's), D 64."""
    import flops
    from model.flavours import FLAVOURS
    calls = []  # (B, Lq, Lk, H, D) per attention call of one image (set size 1)
    _, forward = flops._meta_forward(FLAVOURS[name].unet, px // 8, 1, 1, 77)
    with flops._recorded_attention(calls):
        forward()
    self_, cross = [], []
    for _, lq, lk, h, d in calls:
        level, seen = ((lq, h, d), self_) if lq == lk else ((lq, lk, h, d), cross)
        if level not in seen:
            seen.append(level)
    return tuple(self_), tuple(cross)


def shapes(models=(("sd1", 512),), set_sizes=(1, 2, 3, 4), smoke=False):
    """[Shape] of the models' self-attention, L = N*HW for N in set_sizes, B = SETS, and cross-attention Lq = HW,
    B = IMAGES; a shape two models (or two N) share is measured once. The targets first (SD-1.x: issue 28's
    yardsticks; every model: its highest-resolution level at N >= 2, where most attention FLOPs are), cross-attention
    last, so a budget cut drops the least decisive ones. smoke: tiny lengths, 2 heads, each model's first head dim."""
    found, target = {}, {}

    def add(key, use, is_target=False):
        found.setdefault(key, []).append(use)
        target[key] = target.get(key, False) or is_target
    for name, px in models:
        tag = f"{name}@{px}"
        self_, cross = attention_levels(name, px)
        if smoke:  # under the interpreter: one self- and one cross-attention shape at the model's first head dim
            add(("self", 1, 32, 32, 2, self_[0][2]), f"{tag} N=2")
            add(("cross", 1, 16, 13, 2, self_[0][2]), tag)
            continue
        for i, (hw, h, d) in enumerate(self_):
            for n in set_sizes:
                lq = n * hw  # issue 28's SD-1.x yardsticks: D 40 at L >= 8192, D 80 at L >= 2048, D 160 at L 512
                yardstick = (d == 40 and lq >= 8192) or (d == 80 and lq >= 2048) or (d == 160 and lq == 512)
                add(("self", SETS, lq, lq, h, d), f"{tag} N={n}", yardstick or (i == 0 and n >= 2))
        for hw, lk, h, d in cross:
            add(("cross", IMAGES, hw, lk, h, d), tag)
    out = [Shape(*key, tuple(uses)) for key, uses in found.items()]
    return sorted(out, key=lambda s: (not target[s[:6]], s.kind == "cross"))


def variants_for(kind, d, smoke=False, only=OURS + SDPAS):
    """The variants timed at a shape: `only` (--variants), triton-noalign at D 40 self-attention alone."""
    ours = [v for v in OURS if v in only and (v != "triton-noalign" or (kind == "self" and d == 40))]
    if smoke:  # under the interpreter TMA is the same Python as triton: save the CI seconds; triton-ws stays for
        return [v for v in ours if v != "triton-tma"] + ["sdpa"]  # its fallback (simulate_ws_failure)
    return ours + [v for v in SDPAS if v in only]


def simulate_ws_failure(flash_attn):
    """--cpu-smoke: every warp-specialized forward launch raises as Triton does when the pass fails to compile
    (documented on sm_90 at D 40), so flash_attn's fallback (_WS_FAILED, a warning, the plain loop) and this
    script's report of it run in CI exactly as on the GPU."""
    real = flash_attn._launch

    def launch(kernel, grid_rows, bh, *args, **meta):
        if meta.get("WS"):
            raise RuntimeError("PassManager::run failed (simulated by kernel_sweep --cpu-smoke)")
        return real(kernel, grid_rows, bh, *args, **meta)
    flash_attn._launch = launch


def make_fn(torch, name):
    """name -> attention(q, k, v) on (B, L, H, D) tensors."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels import flash_attn, sdpa_attention
    if name in OURS:
        from kernels import TRITON_OPTIONS
        opts = TRITON_OPTIONS.get(name, dict(align_hint=False))  # triton-noalign: the A/B switch
        return lambda q, k, v: flash_attn.flash_attention(q, k, v, **opts)
    if name == "sdpa":
        return sdpa_attention
    be = {"sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-flash": SDPBackend.FLASH_ATTENTION,
          "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}[name]

    def fn(q, k, v):
        with sdpa_kernel([be]):
            return sdpa_attention(q, k, v)
    return fn


def inputs(torch, b, lq, lk, h, d, dtype, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(b, lq, h, d, device=device, dtype=dtype, generator=g).requires_grad_()  # (B, L, H, D)
    k = torch.randn(b, lk, h, d, device=device, dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(b, lk, h, d, device=device, dtype=dtype, generator=g).requires_grad_()
    do = torch.randn(b, lq, h, d, device=device, dtype=dtype, generator=g)
    return q, k, v, do


def fwd_bwd(torch, fn, q, k, v, do):
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), do))


def check(torch, fns, q, k, v, do, dname):
    """{variant: None if correct, else why}. SDPA on fp32 copies is the reference; default SDPA in the same
    dtype sets the bar. Every buffer the Triton kernels allocate starts as NaN, so unwritten elements fail."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels import flash_attn, sdpa_attention
    leaf = lambda x, dt: x.detach().to(dt).requires_grad_()  # noqa: E731

    def ref_fn(q, k, v):
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            return sdpa_attention(q, k, v)
    ref = fwd_bwd(torch, ref_fn, *[leaf(x, torch.float32) for x in (q, k, v)], do.float())
    low = fwd_bwd(torch, sdpa_attention, *[leaf(x, q.dtype) for x in (q, k, v)], do)
    bars = [2 * (s.float() - r).abs().max().item() + EPS[dname] * max(1.0, r.abs().max().item())
            for s, r in zip(low, ref)]
    verdicts = {}
    flash_attn._DEBUG_FILL = float("nan")
    try:
        for name, fn in fns.items():
            try:
                got = fwd_bwd(torch, fn, *[leaf(x, q.dtype) for x in (q, k, v)], do)
            except Exception as e:  # noqa: BLE001 -- a variant that cannot run is reported, never timed
                verdicts[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
                continue
            errs = [(g.float() - r).abs().max().item() for g, r in zip(got, ref)]
            bad = [f"{n} err {e:.2e} > {t:.2e}" for n, e, t in zip(("out", "dq", "dk", "dv"), errs, bars)
                   if not e <= t]  # NaN fails too
            verdicts[name] = "; ".join(bad) or None
    finally:
        flash_attn._DEBUG_FILL = None
    return verdicts


def graph_ms(torch, fn, target_ms=3.0):
    """Milliseconds per call: a CUDA graph of `reps` calls (about target_ms long), median of 5 replays."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    reps = max(1, min(100, round(target_ms / max(start.elapsed_time(end), 1e-3))))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    times = []
    for _ in range(5):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    del g
    return sorted(times)[2]


def bench_ms(torch, fn, target_ms=None):
    # Fallback where a backend cannot be captured in a CUDA graph: do_bench median (includes launch overhead).
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=50, quantiles=[0.5])


def wall_ms(torch, fn, target_ms=None):
    # CPU smoke only: one wall-clock call (the numbers mean nothing).
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def time_variant(torch, fn, q, k, v, do, timer):
    """(forward ms, backward ms): backward is (forward + backward) - forward, both timed the same way."""
    fwd = timer(torch, lambda: fn(q, k, v))
    both = timer(torch, lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do))
    return fwd, max(both - fwd, 1e-6)


def warm_worker(args):
    """Warm-up worker: run forward + backward of its share of (dtype, variant, shape) once, so every Triton
    kernel is compiled into the on-disk cache. Autotune picks are not cached from here (concurrent processes
    share the GPU), the measuring process re-tunes on warm binaries."""
    import torch

    from kernels import flash_attn
    for kernel in (flash_attn._fwd, flash_attn._dkdv, flash_attn._dq):
        kernel.cache_results = False
    dts = {"fp16": torch.float16, "bf16": torch.bfloat16}
    jobs = json.loads(args.warm_jobs)
    for dname, name, (kind, b, lq, lk, h, d, _) in jobs:
        q, k, v, do = inputs(torch, b, lq, lk, h, d, dts[dname], args.warm_device, 0)
        fn = make_fn(torch, name)
        try:
            if name in ("triton-tma", "triton-ws"):  # their backward kernels are triton's, compiled by its group
                with torch.no_grad():
                    fn(q, k, v)
            else:
                fwd_bwd(torch, fn, q, k, v, do)
        except Exception as e:  # noqa: BLE001 -- the measuring process reports it
            print(f"warm-up {dname} {name} {kind} L {lq}x{lk} D {d}: {type(e).__name__}", flush=True)
    if args.warm_device == "cuda":
        torch.cuda.synchronize()
    return 0


def warm_up(args, work):
    """Compile in `--workers` parallel processes (compilation is CPU-bound and single-threaded per process)."""
    groups = {}  # jobs that share compiled binaries (dtype, variant, head dim, tail masks) go to one worker
    for dname, s in work:
        for name in variants_for(s.kind, s.d, args.cpu_smoke, args.variants):
            if name in OURS:
                groups.setdefault((dname, name, s.d, s.kind), []).append((dname, name, s))
    if args.cpu_smoke:  # one small job: the smoke checks the plumbing, not the (absent) compiler
        groups = dict(list(groups.items())[:1])
    shares = [[] for _ in range(args.workers)]
    for group in sorted(groups.values(), key=len, reverse=True):  # greedy: the biggest group to the emptiest
        min(shares, key=len).extend(group)
    device = "cpu" if args.cpu_smoke else "cuda"  # the smoke runs this path too, under the interpreter
    cmd = [sys.executable, __file__, "--warm-device", device, "--warm-jobs"]
    procs = [subprocess.Popen(cmd + [json.dumps(share)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for share in shares if share]
    stop = time.time() + max(10.0, 0.45 * (args.deadline - time.time()))  # leave most of the budget to measuring
    logs = []
    for i, p in enumerate(procs):
        try:
            out, _ = p.communicate(timeout=max(1.0, stop - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            logs.append(f"warm-up worker {i} stopped at its time limit (the measuring process compiles the rest)")
        if p.returncode not in (0, -9):
            logs.append(f"warm-up worker {i} exited {p.returncode}: {out.strip().splitlines()[-1:] or ''}")
        logs += [line for line in out.splitlines() if line.startswith("warm-up")]
    return logs


def tflops(b, lq, lk, h, d, ms, bwd):
    from flops import ATTENTION_BACKWARD_FACTOR, attention_flops
    f = attention_flops(b, lq, lk, h, d) * (ATTENTION_BACKWARD_FACTOR if bwd else 1.0)
    return f / (ms * 1e-3) / 1e12


def dispatch_entries(rows, dname):
    """Per (D, Lq bucket, Lk bucket): the least summed time over the bucket's shapes among our variants and
    default sdpa, for "fwd" and "train". A backend enters a bucket only if it passed and was timed at all of
    the bucket's shapes; ours wins only if at least MARGIN faster than sdpa."""
    from kernels.dispatch import bucket
    groups = {}
    for r in rows:
        if r["dtype"] == dname:
            groups.setdefault((r["d"], bucket(r["lq"]), bucket(r["lk"])), []).append(r)
    entries = []
    for (d, lqb, lkb), rs in sorted(groups.items()):
        for direction in ("fwd", "train"):
            total = {}
            for name in ("triton", "triton-tma", "triton-ws", "triton-atomic", "sdpa"):
                if name == "triton-atomic" and direction == "fwd":
                    continue  # its forward is triton's
                ts = [r["ms"].get(name) for r in rs]
                if all(t is not None for t in ts):
                    total[name] = sum(f + (b if direction == "train" else 0.0) for f, b in ts)
            if "sdpa" not in total:
                continue  # the fallback itself was not timed (budget): leave the bucket to the default
            best = min(total, key=total.get)
            if total[best] > MARGIN * total["sdpa"]:
                best = "sdpa"
            entries.append(dict(dtype=dname, head_dim=d, lq=lqb, lk=lkb, direction=direction, backend=best,
                                ms={k: float(f"{t:.4g}") for k, t in total.items()}))
    return entries


def fmt(x):
    return "" if x is None else f"{x:.4g}"


def tables(rows, dname, names):
    from flops import ATTENTION_BACKWARD_FACTOR
    out = []
    for bwd in (False, True):
        title = (f"backward (TFLOP/s, {ATTENTION_BACKWARD_FACTOR}x forward FLOPs; (fwd+bwd) - fwd)" if bwd else
                 "forward (TFLOP/s)")
        head = ["kind", "B", "H", "Lq", "Lk", "D", "used by (N: images per set)"] + names + ["best ours / best sdpa"]
        out += [f"### {dname} {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in (r for r in rows if r["dtype"] == dname):
            cells, best = [], {"ours": 0.0, "sdpa": 0.0}
            for name in names:
                if name not in r["verdict"]:
                    cells.append("")
                elif r["verdict"][name]:
                    cells.append("wrong" if "err" in r["verdict"][name] else "fails")
                elif name not in r["ms"]:
                    cells.append("n/a")
                else:
                    t = tflops(r["b"], r["lq"], r["lk"], r["h"], r["d"], r["ms"][name][bwd], bwd)
                    fam = "ours" if name in OURS and name != "triton-noalign" else "sdpa" if name in SDPAS else None
                    if fam:
                        best[fam] = max(best[fam], t)
                    cells.append(fmt(t))
            ratio = f"{best['ours'] / best['sdpa']:.2f}x" if best["ours"] and best["sdpa"] else "n/a"
            out.append("| " + " | ".join([r["kind"], str(r["b"]), str(r["h"]), str(r["lq"]), str(r["lk"]),
                                          str(r["d"]), ", ".join(r["uses"])] + cells + [ratio]) + " |")
        out.append("")
    return out


def write(args, meta, rows, skipped, logs, card, dts, phases, done):
    import kernels.dispatch as kd
    names = [n for n in OURS + SDPAS if any(n in r["verdict"] for r in rows)]
    lines = list(meta) + ([] if done else ["**In progress.**", ""])
    for dname in dts:
        lines += tables(rows, dname, names)
    problems = [f"- {r['dtype']} {r['kind']} L {r['lq']}x{r['lk']} D {r['d']} {n}: {why}"
                for r in rows for n, why in r["verdict"].items() if why]
    lines += ["### variants not timed (failed the correctness check or could not run)", ""] + (problems or ["- none"])
    lines += ["", "### skipped (budget)", ""] + ([f"- {s}" for s in skipped] or ["- none"]) + [""]
    no_graph = [f"- {r['dtype']} {r['kind']} L {r['lq']}x{r['lk']} D {r['d']}: {x}"
                for r in rows for x in r["no_graph"]]
    if no_graph:
        lines += ["### timed with do_bench, not a CUDA graph (capture failed; includes launch overhead)", ""]
        lines += no_graph + [""]
    if logs:
        lines += ["### warm-up messages", ""] + [f"- {m}" for m in logs] + [""]
    from kernels import flash_attn
    if flash_attn._WS_FAILED:
        lines += ["### triton-ws fell back to the plain loop (warp_specialize did not compile)", ""]
        lines += [f"- D {d} {str(dt).removeprefix('torch.')} aligned {al} TMA {tma}"  # flash_attn's key
                  for d, dt, al, tma in sorted(flash_attn._WS_FAILED, key=str)] + [""]
    picks = [f"- {kname[1:]} {key}: {cfg}" for kname in ("_fwd", "_dkdv", "_dq")
             for key, cfg in getattr(getattr(flash_attn, kname), "cache", {}).items()]
    if picks:
        lines += ["### Triton autotune picks (key: HEAD_DIM, Lq bucket, Lk bucket, ALIGNED[, WS], dtypes)", ""] + picks
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernel_sweep.md").write_text("\n".join(lines) + "\n")

    table = {"schema": kd.SCHEMA, "card": card,
             "measured": {k: str(v) for k, v in meta_dict(args, card).items()},
             "entries": [e for dname in dts for e in dispatch_entries(rows, dname)]}
    kd.validate(table, "the sweep's own dispatch table")  # never write a table kernels/ would refuse
    (args.out / "dispatch").mkdir(exist_ok=True)
    path = args.out / "dispatch" / f"{kd.card_slug(card)}.json"
    path.with_suffix(".tmp").write_text(json.dumps(table, indent=1) + "\n")
    path.with_suffix(".tmp").replace(path)  # whole or absent: a timeout mid-write leaves no half table to read

    summary = ["# Attention kernel sweep", ""] + [f"- {k}: {v}" for k, v in meta_dict(args, card).items()]
    summary += [f"- phases (s): {', '.join(f'{k} {v:.0f}' for k, v in phases.items())}",
                f"- shapes x dtypes measured: {len(rows)}; skipped: {len(skipped)}; "
                f"variants not timed: {len(problems)}{'' if done else ' (in progress)'}",
                f"- files: kernel_sweep.md, dispatch/{kd.card_slug(card)}.json "
                f"({len(table['entries'])} entries; copy to kernels/dispatch/ to commit)", ""]
    (args.out / "SUMMARY.md").write_text("\n".join(summary) + "\n")


_META = {}


def meta_dict(args, card):
    if not _META:
        import torch
        import triton
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "diff", "--quiet"], cwd=ROOT, capture_output=True).returncode
        _META.update({
            "card": card, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "git": (git.stdout.strip() or "unknown") + (" (dirty)" if dirty == 1 else ""),
            "versions": f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
                        f"cuDNN {torch.backends.cudnn.version()}), triton {triton.__version__}"})
    return _META


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="output folder")
    p.add_argument("--dtypes", default="fp16,bf16")
    p.add_argument("--models", default=MODELS, help="comma list of model.flavours names, each at its own resolution "
                   "or @PX: sd1 (512), sdxl (1024), sdxl@512; default %(default)s")
    p.add_argument("--set-sizes", default="1,2,3,4", help="images per set N of the self-attention shapes")
    p.add_argument("--variants", default=",".join(OURS + SDPAS), help="comma list of what to time (sdpa always)")
    p.add_argument("--max-seconds", type=float, default=270.0, help="wall-clock budget of this script")
    p.add_argument("--workers", type=int, default=6, help="parallel compile processes of the warm-up")
    p.add_argument("--cpu-smoke", action="store_true", help="no GPU: tiny shapes under the interpreter")
    p.add_argument("--warm-jobs", default=None, help=argparse.SUPPRESS)  # internal: one warm-up worker
    p.add_argument("--warm-device", default="cuda", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.variants = tuple(x for x in args.variants.split(",") if x) + ("sdpa",)  # sdpa: every table's fallback
    try:
        args.set_sizes = tuple(int(n) for n in args.set_sizes.split(","))
    except ValueError:
        p.error(f"--set-sizes: expected a comma list of integers, got {args.set_sizes!r}")
    if not all(1 <= n <= 8 for n in args.set_sizes):
        p.error(f"--set-sizes: each N must be 1..8, got {args.set_sizes}")
    t_start = time.time()
    args.deadline = t_start + args.max_seconds
    if args.warm_jobs is not None:
        return warm_worker(args)
    if args.out is None:
        p.error("--out is required")
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before kernels.flash_attn is imported
    import torch
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("kernel_sweep: error: no CUDA device (torch.cuda.is_available() is False); use --cpu-smoke",
              file=sys.stderr)
        return 2
    import warnings

    from flops import ATTENTION_BACKWARD_FACTOR
    warnings.filterwarnings("ignore")  # SDPA warns for each forced backend that rejects a shape: "fails" says it
    dts = [x for x in args.dtypes.split(",") if x]
    if any(x not in DTYPES for x in dts):
        p.error(f"--dtypes: expected a comma list of {DTYPES}, got {args.dtypes!r}")
    if any(x not in OURS + SDPAS for x in args.variants):
        p.error(f"--variants: expected a comma list of {OURS + SDPAS}, got {','.join(args.variants)!r}")
    device = "cpu" if args.cpu_smoke else "cuda"
    card = "CPU interpreter smoke" if args.cpu_smoke else torch.cuda.get_device_name()
    timer = wall_ms if args.cpu_smoke else graph_ms
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        models = parse_models(args.models)
    except ValueError as e:
        p.error(str(e))
    work = [(dname, s) for s in shapes(models, args.set_sizes, args.cpu_smoke) for dname in dts]
    if args.cpu_smoke:
        from kernels import flash_attn
        simulate_ws_failure(flash_attn)
    phases, logs = {}, []
    if args.workers > 0:
        if args.cpu_smoke:
            args.workers = 1
        logs = warm_up(args, work)
        phases["warm-up compile"] = time.time() - t_start
    how = "wall clock, one call (smoke: meaningless)" if args.cpu_smoke else "CUDA graph of many calls, median of 5"
    meta = ["# Attention kernel sweep", ""] + [f"- {k}: {v}" for k, v in meta_dict(args, card).items()] + [
        f"- models: {', '.join(f'{n}@{px}' for n, px in models)}; H: the model's heads at that level; "
        f"FLOPs 4*B*H*Lq*Lk*D forward, backward {ATTENTION_BACKWARD_FACTOR}x (true D); {how}",
        "- cells: TFLOP/s; wrong = failed the correctness check (never timed); fails = could not run; "
        "n/a = not timed (budget)", ""]

    rows, skipped, t_measure = [], [], time.time()
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}
    for i, (dname, (kind, b, lq, lk, h, d, uses)) in enumerate(work):
        done_s = time.time() - t_measure
        per_shape = done_s / i if i else 0.0
        if time.time() + 1.5 * per_shape > args.deadline:
            skipped.append(f"{dname} {kind} B {b} H {h} Lq {lq} Lk {lk} D {d} ({', '.join(uses)})")
            continue
        names = variants_for(kind, d, args.cpu_smoke, args.variants)
        fns = {name: make_fn(torch, name) for name in names}
        q, k, v, do = inputs(torch, b, lq, lk, h, d, dt[dname], device, seed=i)
        verdict = check(torch, fns, q, k, v, do, dname)
        row = dict(dtype=dname, kind=kind, b=b, h=h, lq=lq, lk=lk, d=d, uses=uses, verdict=verdict, ms={},
                   no_graph=[])
        for name, fn in fns.items():
            if verdict[name] is None:
                try:
                    row["ms"][name] = time_variant(torch, fn, q, k, v, do, timer)
                except Exception as e:  # noqa: BLE001 -- e.g. a backend that cannot be captured in a graph
                    if args.cpu_smoke:
                        raise
                    row["no_graph"].append(f"{name} ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
                    try:
                        row["ms"][name] = time_variant(torch, fn, q, k, v, do, bench_ms)
                    except Exception as e2:  # noqa: BLE001
                        verdict[name] = f"timing failed: {type(e2).__name__}: {str(e2).splitlines()[0][:80]}"
        rows.append(row)
        print(f"{dname} {kind} B {b} H {h} L {lq}x{lk} D {d}: " + "  ".join(
            f"{k_}={f:.3g}/{g:.3g}ms" for k_, (f, g) in row["ms"].items()), flush=True)
        del q, k, v, do
        phases["measure"] = time.time() - t_measure
        write(args, meta, rows, skipped, logs, card, dts, phases, done=False)
    phases["measure"] = time.time() - t_measure
    write(args, meta, rows, skipped, logs, card, dts, phases, done=True)
    print((args.out / "SUMMARY.md").read_text())
    bad = [f"{r['kind']} L {r['lq']}x{r['lk']} {n}" for r in rows for n, why in r["verdict"].items() if why]
    if args.cpu_smoke and bad:  # on a GPU a failing variant is a finding (reported, never timed); here, a bug
        print(f"kernel_sweep: error: --cpu-smoke: {len(bad)} variant(s) failed or could not run: {', '.join(bad)} "
              f"(kernel_sweep.md says why)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
