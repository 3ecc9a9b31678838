"""CUDA correctness of the Triton attention at every benchmarked shape, fp16 and bf16, forward and backward.

    python bench/check_attention_cuda.py --out OUTDIR/check_attention.md

Reference: SDPA on fp32 copies of the inputs (TF32 off), which never materialises L x L, so the 16k-token
shapes fit. Pass: for O, dQ, dK, dV,  max|triton - ref| <= 2 * max|sdpa_lowp - ref| + eps * max(1, max|ref|),
where sdpa_lowp is PyTorch's default SDPA in the same dtype as the kernel -- the same rule as
tests/test_kernels.py. Every buffer the kernel allocates starts as NaN, so unwritten elements fail.
Exits 1 if any case fails, 2 without CUDA. --cpu-smoke runs two tiny cases under TRITON_INTERPRET=1 (CI rot check).
"""
import argparse
import datetime
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

EPS = {"fp16": 5e-4, "bf16": 4e-3, "fp32": 1e-5}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--dtypes", default="fp16,bf16")
    p.add_argument("--variants", default="triton",
                   help="kernel variants to check: triton, triton-tma, triton-ws, triton-noalign (comma list)")
    p.add_argument("--cpu-smoke", action="store_true", help="no GPU: two tiny cases under the interpreter")
    p.add_argument("--compile-only", choices=["quick", "all"], default=None,
                   help="no GPU needed: compile the kernels for sm_90 with ptxas (quick: a few; all: every autotune "
                        "config at D 40/80/160 and SDXL's 64, fp16, D 40 with and without the alignment hint) and "
                        "report registers, spills, shared memory, global-load widths and wgmma counts")
    args = p.parse_args()
    if args.compile_only:
        return compile_only(args.compile_only)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before kernels.flash_attn is imported

    import torch
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("check_attention_cuda: error: no CUDA device (torch.cuda.is_available() is False).", file=sys.stderr)
        return 2
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import kernels
    from bench_attention import HEADS, SHAPES
    from kernels import flash_attn

    torch.backends.cuda.matmul.allow_tf32 = False
    flash_attn._DEBUG_FILL = float("nan")  # poison: unwritten output elements become NaN
    seed = torch.seed()
    dts = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

    # (B, Lq, Lk, H, D, dtypes, packed): the SD coupled shapes, then cross-attention, odd lengths, fp32, strides.
    cases = [(b, n * hw, n * hw, HEADS, d, args.dtypes.split(","), False) for b, n, hw, d in SHAPES]
    cases += [(2, 4096, 77, 8, 40, ["fp16"], False),  # cross-attention to the 77 text tokens
              (2, 1000, 1000, 8, 80, ["bf16"], False), (1, 333, 77, 8, 160, ["fp16"], False),
              (2, 1024, 1024, 8, 64, ["fp32"], False), (2, 777, 777, 8, 80, ["fp16"], True)]
    device = "cuda"
    if args.cpu_smoke:
        device = "cpu"
        cases = [(1, 40, 77, 2, 40, ["fp16"], False), (1, 50, 50, 1, 80, ["fp32"], True)]

    def run(fn, q, k, v, do):
        out = fn(q, k, v)
        return (out, *torch.autograd.grad(out, (q, k, v), do))

    def ref_fn(q, k, v):
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            return kernels.sdpa_attention(q, k, v)

    lines = ["# Triton attention CUDA correctness", "",
             f"- card: {torch.cuda.get_device_name() if device == 'cuda' else 'CPU, interpreter'}; torch {torch.__version__}, triton {triton.__version__}",
             f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; seed {seed}",
             "- errors: max abs vs fp32 SDPA, shown as triton / sdpa-same-dtype", "",
             "| B | Lq | Lk | D | dtype | variant | out | dq | dk | dv | ok |", "|" + "---|" * 11]
    failures, t0 = 0, time.time()
    for b, lq, lk, h, d, dtypes, packed in cases:
        for dname in dtypes:
            dtype = dts[dname]
            if packed:  # q, k, v as strided views of one (B, L, 3, H, D) projection
                qkv = torch.randn(b, lq, 3, h, d, device=device, dtype=dtype)
                q, k, v = (t.requires_grad_() for t in qkv.unbind(2))
            else:
                q = torch.randn(b, lq, h, d, device=device, dtype=dtype, requires_grad=True)
                k, v = (torch.randn(b, lk, h, d, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
            do = torch.randn(b, lq, h, d, device=device, dtype=dtype)
            leaf = lambda x, dt: x.detach().to(dt).requires_grad_()  # noqa: E731
            ref = run(ref_fn, *[leaf(x, torch.float32) for x in (q, k, v)], do.float())
            low = run(kernels.sdpa_attention, *[leaf(x, dtype) for x in (q, k, v)], do)
            for mode in args.variants.split(","):
                opts = kernels.TRITON_OPTIONS.get(mode, dict(align_hint=False))  # else triton-noalign
                got = run(lambda q, k, v: flash_attn.flash_attention(q, k, v, **opts), q, k, v, do)
                cells, ok = [], True
                for g, r, s in zip(got, ref, low):
                    err = (g.float() - r).abs().max().item()  # NaN if any element was left unwritten
                    err_s = (s.float() - r).abs().max().item()
                    tol = 2 * err_s + EPS[dname] * max(1.0, r.abs().max().item())
                    good = err <= tol and not math.isnan(err)
                    ok &= good
                    cells.append(f"{err:.2e} / {err_s:.2e}{'' if good else ' FAIL'}")
                failures += not ok
                row = f"| {b} | {lq} | {lk} | {d} | {dname} | {mode}{' strided' if packed else ''} | " \
                      + " | ".join(cells) + f" | {'ok' if ok else 'FAIL'} |"
                lines.append(row)
                print(row, flush=True)
                if args.out:  # rewritten after every row, so a timeout still leaves the rows so far
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text("\n".join(lines + ["", "(in progress)"]) + "\n")
            del q, k, v, do, ref, low
    # Dispatch: the committed table for this card (or SDPA without one) must load and validate.
    x = torch.randn(1, 64, 8, 40, device=device, dtype=torch.float16)
    lines += ["", f"- dispatch on {device} fp16 D 40 L 64: {kernels.resolve_backend(x, x, x)}",
              f"- {failures} failing rows; {time.time() - t0:.0f} s"]
    print("\n".join(lines[-2:]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    return 1 if failures else 0


def compile_only(which):
    """Compile for an H100 (sm_90) target offline: catches errors the interpreter cannot (static-if scoping, dot
    shapes, shared memory), shows register spills, and counts in the PTX / SASS how the tiles are loaded
    (scalar ld.global.b16 vs 16-byte ld.global.v4, cp.async = LDGSTS) and whether the dots are wgmma (HGMMA).
    Needs no GPU or driver, only ptxas / cuobjdump from the triton wheel."""
    os.environ.pop("TRITON_INTERPRET", None)  # must hold before triton is imported
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # a cache hit would skip ptxas and its register report
    jobs = compile_jobs(which)
    print("| kernel | dtype | D | BM | BN | warps | stages | hint | regs | spill B | smem KB | ld.b16 | ld.v4 | "
          "LDGSTS | UTMALDG | HGMMA | s |")
    print("|" + "---|" * 17)
    failures = 0
    for kind, dtype, d, cfg, check_m, check_n, aligned, *extra in jobs:
        t = time.time()
        try:
            r = compile_sm90(kind, dtype, d, cfg, check_m, check_n, aligned, tma=bool(extra) and kind == "fwd",
                             atomic=bool(extra) and kind == "dkdv", heads=COMPILE_HEADS.get(d, 8))
            res = f"{r['regs']} | {r['spill']} | {r['smem_kb']} | {r['ld_b16']} | {r['ld_v4']} | {r['ldgsts']} | " \
                  f"{r['utmaldg']} | {r['hgmma']} | {time.time() - t:.1f}"
        except Exception as e:  # noqa: BLE001 -- report every failure, then exit 1
            failures += 1
            res = f"FAIL {type(e).__name__}: {str(e)[:300]}"
        bm, bn, w, st = cfg
        hint = ("yes" if aligned else "no") + ((", TMA" if kind == "fwd" else ", atomic dQ") if extra else "")
        print(f"| {kind} | {dtype} | {d} | {bm} | {bn} | {w} | {st} | {hint} | {res} |",
              flush=True)
    print(f"{failures} compile failures of {len(jobs)}")
    return 1 if failures else 0


HEAD_DIMS = (40, 80, 160, 64)  # SD-1.x's three, SDXL's one
COMPILE_HEADS = {64: 10}  # heads of the (2, 4096, H, D) tensors compiled for: SD-1.x's 8, SDXL's 10 at D 64


def compile_jobs(which):
    """[(kind, dtype, D, (BLOCK_M, BLOCK_N, warps, stages), CHECK_M, CHECK_N, aligned[, tma / atomic dQ])] of
    --compile-only: quick, a few (masks, fp32/bf16, TMA, atomic dQ, SDXL's D 64); all, every autotune config of
    every kernel at every head dim, fp16, D 40 also without the alignment hint (the A/B)."""
    from kernels import flash_attn as fa
    if which == "quick":
        return [("fwd", "fp16", 40, (128, 64, 4, 3), True, True, True),
                ("fwd", "fp32", 64, (64, 64, 4, 3), False, False, True),
                ("dkdv", "bf16", 80, (32, 64, 4, 2), True, True, True),
                ("dq", "fp16", 160, (64, 32, 8, 2), True, False, True),
                ("dkdv", "fp16", 40, (64, 128, 8, 3), False, True, False),
                ("fwd", "bf16", 40, (128, 64, 4, 3), False, True, True, True),  # TMA descriptors
                ("dkdv", "fp16", 80, (32, 64, 4, 2), True, True, True, True),  # atomic dQ
                ("dq", "bf16", 64, (128, 32, 4, 3), True, True, True)]  # SDXL: bf16, row tails
    jobs = []
    for kind in ("fwd", "dkdv", "dq"):
        for d in HEAD_DIMS:
            for cfg in fa._TABLES[kind][fa.head_dim_tile(d)]:
                for aligned in ((False, True) if d == 40 else (True,)):  # 80/160/64: hinted by the JIT anyway
                    jobs.append((kind, "fp16", d, cfg, False, False, aligned))
                if kind != "dq":  # the TMA forward, the atomic-dQ backward
                    jobs.append((kind, "fp16", d, cfg, False, False, True, True))
    return jobs


def compile_sm90(kind, dtype, d, cfg, check_m=False, check_n=False, aligned=True, ws=False, tma=False, atomic=False,
                 seq=4096, heads=8):
    """Compile one kernel as the JIT would for contiguous (2, seq, heads, d) tensors: pointers and the integer
    arguments that are multiples of 16 get the JIT's divisibility-16 attribute, arguments equal to 1 become
    constants. -> dict of ptxas and assembly counts."""
    import contextlib
    import io
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import flash_attn as fa
    fn = {"fwd": fa._fwd_kernel, "dkdv": fa._bwd_dkdv_kernel, "dq": fa._bwd_dq_kernel}[kind]
    bm, bn, w, st = cfg
    bd = fa.head_dim_tile(d)
    cx = dict(HEAD_DIM=d, BD=bd, CHECK_D=bd > d, ALIGNED=aligned, UPCAST=False,
              PREC="ieee" if dtype == "fp32" else "tf32", BLOCK_M=bm, BLOCK_N=bn, CHECK_M=check_m, CHECK_N=check_n)
    if kind == "fwd":
        cx["WS"], cx["TMA"] = ws, tma
    if kind == "dkdv":
        cx["ATOMIC_DQ"] = atomic
    values = {"b": 2 * seq * heads * d, "m": heads * d, "n": heads * d, "h": d, "d": 1}  # strides by last letter
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in cx:
            sig[name] = "constexpr"
            continue
        if name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "LSE", "DELTA"):
            sig[name] = "*fp32" if name in ("LSE", "DELTA") else "*" + dtype
            attrs[(i,)] = [["tt.divisibility", 16]]
            continue
        if name == "sm_scale":
            sig[name] = "fp32"
            continue
        value = {"H": heads, "s_split": 0, "Q_SPLITS": 2}.get(name, values.get(name[-1], seq) if name.startswith("s_")
                                                                  else seq)
        if value == 1:
            sig[name], cx[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # triton prints the ptxas -v log
        k = triton.compile(ASTSource(fn, sig, constexprs=cx, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=w, num_stages=st))
    ptx = k.asm["ptx"]
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        sass = subprocess.run([str(bin_dir / "cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    regs = re.findall(r"Used (\d+) registers", log.getvalue())
    spill = re.findall(r"(\d+) bytes spill stores", log.getvalue())
    return dict(regs=regs[-1] if regs else "?", spill=spill[-1] if spill else "?", smem_kb=k.metadata.shared // 1024,
                ld_b16=len(re.findall(r"ld\.global(?:\.\w+)*\.b16\b", ptx)),
                ld_v4=len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.", ptx)),
                ldgsts=len(re.findall(r"\bLDGSTS\b", sass)), hgmma=len(re.findall(r"\bHGMMA\b", sass)),
                utmaldg=len(re.findall(r"\bUTMALDG\b", sass)), setmaxnreg=ptx.count("setmaxnreg"))


if __name__ == "__main__":
    sys.exit(main())
