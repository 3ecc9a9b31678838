"""TFLOP/s of JeDi's coupled self-attention: the Triton kernel next to every PyTorch SDPA backend.

    python bench/bench_attention.py --out bench/results/<date>-<card>/bench_attention_fp16.md [--dtype bf16]
    python bench/bench_attention.py --cpu-smoke --out /tmp/smoke.md     # no GPU: one tiny shape, interpreter

Shapes: SD-1.4's self-attention layers, coupled over a set of N images: L = N*HW tokens, 8 heads, head dim
tied to the resolution as SD ties them (HW 4096 -> D 40, 1024 -> 80, 256 -> 160, 64 -> 160); batch 2 sets
and 4 (classifier-free guidance doubles it). FLOPs (flops.py): forward 4*B*H*L*L*D, backward
flops.ATTENTION_BACKWARD_FACTOR (2.5) x that, true D (the padded columns Triton computes do not count).
Times are triton.testing.do_bench medians (ms), each backend measured in the same process; backward =
torch.autograd.grad of a retained graph (no .grad accumulation).
"""
import argparse
import datetime
import os
import platform
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HEADS = 8
HW_TO_D = {4096: 40, 1024: 80, 256: 160, 64: 160}  # SD-1.4: 320/640/1280/1280 channels over 8 heads
SHAPES = [(b, n, hw, HW_TO_D[hw]) for b in (2, 4) for hw in (4096, 1024, 256, 64) for n in (2, 3, 4)]
# (batch of sets, images per set N, tokens per image HW, head dim D); L = N * HW


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="markdown output file (also printed)")
    p.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="no GPU: run one tiny shape under TRITON_INTERPRET=1 with wall-clock timing (CI rot check)")
    p.add_argument("--max-seconds", type=float, default=float("inf"),
                   help="stop starting new shapes after this long; the table says it was cut short")
    return p.parse_args()


def flops(b, l_q, l_k, d, bwd):
    from flops import ATTENTION_BACKWARD_FACTOR, attention_flops
    return attention_flops(b, l_q, l_k, HEADS, d) * (ATTENTION_BACKWARD_FACTOR if bwd else 1.0)


def backends(torch, on_cuda):
    """name -> attention(q, k, v) on (B, L, H, D) tensors."""
    from kernels import flash_attn, sdpa_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def with_backend(be):
        def fn(q, k, v):
            with sdpa_kernel([be]):
                return sdpa_attention(q, k, v)
        return fn

    out = {"triton": flash_attn.flash_attention}  # every variant, CUDA-graph timed: bench/kernel_sweep.py
    if on_cuda:
        out.update({"sdpa-flash": with_backend(SDPBackend.FLASH_ATTENTION),
                    "sdpa-cudnn": with_backend(SDPBackend.CUDNN_ATTENTION),
                    "sdpa-efficient": with_backend(SDPBackend.EFFICIENT_ATTENTION)})
    else:
        out["sdpa"] = sdpa_attention
    return out


def measure(torch, fn, q, k, v, do, timer):
    """(forward ms, backward ms); None where the backend cannot run this shape."""
    try:
        fwd = timer(lambda: fn(q, k, v))
    except RuntimeError as e:  # e.g. "No available kernel" when a forced SDPA backend rejects the shape
        return None, None, str(e).splitlines()[0][:80]
    out = fn(q, k, v)
    try:
        bwd = timer(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True))
    except RuntimeError as e:
        return fwd, None, str(e).splitlines()[0][:80]
    return fwd, bwd, None


def wall_timer(fn, reps=1):
    # CPU smoke only: wall time in ms (median of reps) after one warm-up call.
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return sorted(ts)[len(ts) // 2]


def fmt(x):
    return "n/a" if x is None else f"{x:.4g}"


def table(rows, names, bwd):
    kind = "backward" if bwd else "forward"
    sdpa = [n for n in names if n.startswith("sdpa")]
    tri = [n for n in names if n.startswith("triton")]
    head = ["B", "N", "HW", "L", "D"] + names + [f"{t} / best sdpa" for t in tri]
    from flops import ATTENTION_BACKWARD_FACTOR
    lines = [f"### {kind} (TFLOP/s{f', backward = {ATTENTION_BACKWARD_FACTOR}x forward FLOPs' if bwd else ''})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        tf = {n: r["tflops"][n][1 if bwd else 0] for n in names}
        best = max([tf[n] for n in sdpa if tf[n] is not None], default=None)
        ratios = [f"{tf[t] / best:.2f}x" if best and tf[t] else "n/a" for t in tri]
        lines.append("| " + " | ".join([str(r["b"]), str(r["n"]), str(r["hw"]), str(r["l"]), str(r["d"])]
                                      + [fmt(tf[n]) for n in names] + ratios) + " |")
    return lines


def main():
    args = parse_args()
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before kernels.flash_attn is imported
    import torch
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("bench_attention: error: no CUDA device (torch.cuda.is_available() is False). This benchmark needs an "
              "NVIDIA GPU; use --cpu-smoke for the interpreter smoke run.", file=sys.stderr)
        return 2
    import triton
    import triton.testing

    from flops import ATTENTION_BACKWARD_FACTOR

    on_cuda = not args.cpu_smoke
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    if on_cuda:
        device, shapes, card = "cuda", SHAPES, torch.cuda.get_device_name()
        timer = lambda fn: triton.testing.do_bench(fn, quantiles=[0.5])  # noqa: E731  median ms
    else:
        device, shapes, card = "cpu", [(1, 2, 32, 40)], f"CPU ({platform.processor() or platform.machine()}), interpreter"
        timer = wall_timer
    names = list(backends(torch, on_cuda))
    fns = backends(torch, on_cuda)
    warnings.filterwarnings("ignore")  # SDPA warns for each backend it rejects; the table says n/a

    meta = [f"# Coupled self-attention benchmark ({args.dtype})", "",
            f"- card: {card}",
            f"- torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), "
            f"triton {triton.__version__}, python {platform.python_version()}",
            f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
            f"- command: `{' '.join([os.path.basename(sys.executable)] + sys.argv)}`",
            f"- heads {HEADS}; L = N*HW; forward FLOPs 4*B*H*L*L*D, backward {ATTENTION_BACKWARD_FACTOR}x (true D); "
            f"{'do_bench median' if on_cuda else 'one wall-clock run (smoke only, meaningless numbers)'}", ""]
    print("\n".join(meta), flush=True)

    rows, t0, cut = [], time.time(), False
    for b, n, hw, d in shapes:
        if time.time() - t0 > args.max_seconds:
            cut = True
            break
        l = n * hw
        q, k, v = (torch.randn(b, l, HEADS, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        do = torch.randn(b, l, HEADS, d, device=device, dtype=dtype)
        row = dict(b=b, n=n, hw=hw, l=l, d=d, tflops={}, notes={})
        for name, fn in fns.items():
            fwd, bwd, note = measure(torch, fn, q, k, v, do, timer)
            row["tflops"][name] = (fwd and flops(b, l, l, d, False) / fwd * 1e-9,
                                   bwd and flops(b, l, l, d, True) / bwd * 1e-9)
            if note:
                row["notes"][name] = note
        rows.append(row)
        print(f"B={b} N={n} HW={hw} L={l} D={d}: " + "  ".join(
            f"{k_}={fmt(f)}/{fmt(g)}" for k_, (f, g) in row["tflops"].items()) + "  (fwd/bwd TFLOP/s)", flush=True)
        del q, k, v, do
        if args.out:  # rewrite after every shape, so a timeout still leaves a table
            write(args.out, meta, rows, names, cut=False, partial=True)
    if args.out:
        write(args.out, meta, rows, names, cut)
    print("\n".join(table(rows, names, False) + [""] + table(rows, names, True)))
    return 0


def write(path, meta, rows, names, cut, partial=False):
    from kernels import flash_attn
    lines = list(meta)
    if partial or cut:
        lines += [f"**{'In progress' if partial else 'Cut short by --max-seconds'}: "
                  f"{len(rows)} of {len(SHAPES)} shapes.**", ""]
    lines += table(rows, names, False) + [""] + table(rows, names, True) + [""]
    notes = [f"- B={r['b']} L={r['l']} D={r['d']} {n}: {msg}" for r in rows for n, msg in r["notes"].items()]
    if notes:
        lines += ["### backends that could not run", ""] + notes + [""]
    picks = []
    for kname in ("_fwd", "_dkdv", "_dq"):
        cache = getattr(getattr(flash_attn, kname), "cache", {})  # autotuner: key -> best Config
        picks += [f"- {kname[1:]} {key}: {cfg}" for key, cfg in cache.items()]
    if picks:
        lines += ["### Triton autotune picks (key: HEAD_DIM, Lq bucket, Lk bucket, ALIGNED[, WS], dtypes)", ""] + picks
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
