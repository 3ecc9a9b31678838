"""Fused flash-attention in Triton: non-causal forward and backward (dQ, dK, dV) on the (B, L, H, D) layout.

Public entry point: ``flash_attention(q, k, v, scale=None, warp_specialize=False)``; ``kernels.attention``
dispatches here. docs/kernel.md has the research log (what was measured, what worked, what did not).

Design (FlashAttention-2, as in the Triton tutorial, without its causal-only backward):
- Works on the UNet's (B, L, H, D) tensors through their strides: no transposes, no copies.
- Forward: one program per (BLOCK_M query rows, batch*head); online softmax over BLOCK_N key blocks in the
  exp2 domain, the softmax scale folded into one fused multiply-subtract per score; saves the row logsumexp
  (log2 units of the scaled scores, fp32, (B, H, Lq)) for the backward.
- Backward: a preprocess kernel computes delta = rowsum(dO * O); then two kernels with no atomics:
  dK/dV (one program per key block, sweeps the queries) and dQ (one program per query block, sweeps all keys).
  This recomputes P twice but needs no atomics, and every output element is written by exactly one program.
  atomic_dq=True instead adds dQ from the dK/dV kernel with fp32 atomics (FlashAttention-2's design): 5 dots
  and one exp per score instead of 7 and two, at the cost of atomic traffic and run-to-run rounding noise.
  With few key blocks (cross-attention to 77 text tokens) the dK/dV query sweep is split over Q_SPLITS
  programs that write fp32 partial sums, added on the host: more programs for the SMs, still deterministic.
- Any Lq, Lk (ragged tails are masked; Lq != Lk), any head dim 1..256, padded to one power-of-two tile
  (40 -> 64, 80 -> 128, 160 -> 256) whose extra columns are masked loads (no memory traffic) and zero MMA work.
  SDXL's head dim 64 fills its tile exactly: the D 40 tile and configs, with no column masks.
- Alignment: when every stride but the last is a multiple of 8 elements and the pointers are 16-byte aligned
  (always so for the UNet's tensors), the constexpr ALIGNED tells the compiler the head and row offsets are
  multiples of 8. Without it a head stride of 40 (not a multiple of 16, so the JIT gives it no divisibility
  hint) compiled every Q/K/V load to scalar 2-byte loads and lost the cp.async pipelining (docs/kernel.md).
- Dtypes: fp16 / bf16 tiles go straight into tl.dot (tensor cores) with fp32 accumulation; P and dS are
  cast to the input dtype for their dots, as in FlashAttention. fp32 inputs use IEEE fp32 dots unless
  torch.backends.cuda.matmul.allow_tf32 is set. Under TRITON_INTERPRET=1 bf16 arithmetic is silently
  wrong (numpy has no bf16), so the constexpr UPCAST -- true only when interpreting bf16 -- upcasts each
  loaded tile to fp32; compiled GPU code never takes that branch.
- tma=True loads the forward's K and V tiles through TMA descriptors (tl.make_tensor_descriptor over one
  head's (L, D) slab): the copy engine zero-fills the padded columns and the key tail, no address math or
  masks in the loop. Hopper and later, fp16 / bf16, aligned strides; anything else takes the pointer loads.
- warp_specialize=True runs the forward's key loop as tl.range(..., warp_specialize=True) (Triton >= 3.4 has
  a Hopper pass for it); on a Triton without it the flag is ignored, and where the pass fails to compile
  (Triton 3.8, sm_90, D 40) the forward warns once and runs without it.
- Autotuning (GPU): at most three configs per kernel and head-dim tile, pruned by sequence length, keyed on
  (head dim, Lq bucket, Lk bucket) and the dtypes, picks cached on disk. Under the interpreter one fixed
  small config (autotuning there would take minutes).
"""
import inspect
import math
import os
import warnings

import torch
import triton
import triton.language as tl

# Triton picks the interpreter or the compiler when each @triton.jit function is defined: its own (tl.zeros,
# ...) when `triton` is first imported, ours when this module is. Both must have seen TRITON_INTERPRET=1.
INTERPRET = type(tl.zeros).__name__ == "InterpretedFunction"
_INTERPRET_ENV = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
# tl.range(warp_specialize=...) exists from Triton 3.4 (the GPU machine has 3.6); older ones never get the flag.
HAS_WARP_SPECIALIZE = "warp_specialize" in inspect.signature(tl.range.__init__).parameters
HAS_TMA = hasattr(tl, "make_tensor_descriptor")  # Triton >= 3.4

# Tests set this to float("nan") so that any output element a kernel fails to write shows up.
_DEBUG_FILL = None


def _empty(shape, device, dtype):
    t = torch.empty(shape, device=device, dtype=dtype)
    if _DEBUG_FILL is not None:
        t.fill_(_DEBUG_FILL)
    return t


# ----------------------------------------------------------------------------------------------------------
# Tile helpers
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _head(b, h, s_b, s_h, ALIGNED: tl.constexpr):
    # Element offset of one (batch, head). The hint must sit on a computed value: Triton ignores
    # tl.multiple_of on a kernel argument.
    off = b * s_b + h * s_h
    if ALIGNED:
        off = tl.multiple_of(off, 8)
    return off


@triton.jit
def _tile(base, rows, s_row, cols, s_col, ALIGNED: tl.constexpr):
    # (len(rows), len(cols)) pointers; with ALIGNED each row starts at a multiple of 8 elements (16 bytes).
    r = rows[:, None] * s_row
    if ALIGNED:
        r = tl.multiple_of(r, [8, 1])
    return base + r + cols[None, :] * s_col


@triton.jit
def _load(ptrs, rows, n_rows, cols, n_cols,
          CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr, UPCAST: tl.constexpr):
    # Masks only where a tail can exist, so full tiles compile to unmasked (vectorised) loads.
    if CHECK_ROWS and CHECK_COLS:
        x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    elif CHECK_ROWS:
        x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    elif CHECK_COLS:
        x = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    else:
        x = tl.load(ptrs)
    if UPCAST:  # interpreter + bf16 only (see module docstring)
        x = x.to(tl.float32)
    return x


@triton.jit
def _store(ptrs, x, rows, n_rows, cols, n_cols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    x = x.to(ptrs.dtype.element_ty)
    if CHECK_ROWS and CHECK_COLS:
        tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))
    elif CHECK_ROWS:
        tl.store(ptrs, x, mask=rows[:, None] < n_rows)
    elif CHECK_COLS:
        tl.store(ptrs, x, mask=cols[None, :] < n_cols)
    else:
        tl.store(ptrs, x)


@triton.jit
def _load_row(ptrs, rows, n_rows, CHECK_ROWS: tl.constexpr):
    if CHECK_ROWS:
        x = tl.load(ptrs, mask=rows < n_rows, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


# ----------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, sm_scale,
                s_qb, s_qm, s_qh, s_qd, s_kb, s_kn, s_kh, s_kd,
                s_vb, s_vn, s_vh, s_vd, s_ob, s_om, s_oh, s_od,
                H, LQ, LK, LQ_KEY, LK_KEY,
                HEAD_DIM: tl.constexpr, BD: tl.constexpr, CHECK_D: tl.constexpr, ALIGNED: tl.constexpr,
                UPCAST: tl.constexpr, PREC: tl.constexpr, WS: tl.constexpr, TMA: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHECK_M: tl.constexpr, CHECK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64: batch offsets of big tensors can pass 2**31 elements
    h = pid_bh % H
    Q += _head(b, h, s_qb, s_qh, ALIGNED)
    K += _head(b, h, s_kb, s_kh, ALIGNED)
    V += _head(b, h, s_vb, s_vh, ALIGNED)
    O += _head(b, h, s_ob, s_oh, ALIGNED)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BD)
    if TMA:  # one head's (L, HEAD_DIM) slab: TMA zero-fills the padded columns and the key tail, no masks
        k_desc = tl.make_tensor_descriptor(K, shape=[LK, HEAD_DIM], strides=[s_kn, 1], block_shape=[BLOCK_N, BD])
        v_desc = tl.make_tensor_descriptor(V, shape=[LK, HEAD_DIM], strides=[s_vn, 1], block_shape=[BLOCK_N, BD])
    q = _load(_tile(Q, offs_m, s_qm, d, s_qd, ALIGNED), offs_m, LQ, d, HEAD_DIM, CHECK_M, CHECK_D, UPCAST)
    acc = tl.zeros([BLOCK_M, BD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of scaled scores (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(score - m_i)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e) folded in: exp2 is the fast path (MUFU.EX2)

    for start_n in tl.range(0, LK, BLOCK_N, warp_specialize=WS):
        cur_n = start_n + offs_n
        if TMA:
            k = k_desc.load([start_n, 0])
            if UPCAST:
                k = k.to(tl.float32)
        else:
            k = _load(_tile(K, cur_n, s_kn, d, s_kd, ALIGNED), cur_n, LK, d, HEAD_DIM, CHECK_N, CHECK_D, UPCAST)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)  # (BLOCK_M, BLOCK_N) fp32 raw scores
        if CHECK_N:  # keys past LK get zero weight
            qk = tl.where(cur_n[None, :] < LK, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # finite: every key block holds a valid key
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])  # one FMA per score (sm_scale > 0: max commutes)
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was accumulated under the old max (0 at first)
        l_i = l_i * alpha + tl.sum(p, 1)
        if TMA:
            v = v_desc.load([start_n, 0])
            if UPCAST:
                v = v.to(tl.float32)
        else:
            v = _load(_tile(V, cur_n, s_vn, d, s_vd, ALIGNED), cur_n, LK, d, HEAD_DIM, CHECK_N, CHECK_D, UPCAST)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new

    inv_l = 1.0 / l_i
    _store(_tile(O, offs_m, s_om, d, s_od, ALIGNED), acc * inv_l[:, None], offs_m, LQ, d, HEAD_DIM,
           CHECK_M, CHECK_D)
    lse_ptrs = LSE + pid_bh.to(tl.int64) * LQ + offs_m  # LSE is (B, H, Lq) contiguous
    if CHECK_M:
        tl.store(lse_ptrs, m_i + tl.math.log2(l_i), mask=offs_m < LQ)
    else:
        tl.store(lse_ptrs, m_i + tl.math.log2(l_i))


# ----------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_preprocess(O, DO, DELTA, s_ob, s_om, s_oh, s_od, s_dob, s_dom, s_doh, s_dod, H, LQ,
                    HEAD_DIM: tl.constexpr, BD: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr):
    # delta_i = sum_d dO_id * O_id (fp32); memory-bound, so plain padding and fixed blocks are fine.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BD)
    mask = (offs_m[:, None] < LQ) & (d[None, :] < HEAD_DIM)
    o = tl.load(_tile(O + _head(b, h, s_ob, s_oh, ALIGNED), offs_m, s_om, d, s_od, ALIGNED), mask=mask, other=0.0)
    do = tl.load(_tile(DO + _head(b, h, s_dob, s_doh, ALIGNED), offs_m, s_dom, d, s_dod, ALIGNED), mask=mask,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * LQ + offs_m, delta, mask=offs_m < LQ)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, DQ, LSE, DELTA, sm_scale,
                     s_qb, s_qm, s_qh, s_qd, s_kb, s_kn, s_kh, s_kd, s_vb, s_vn, s_vh, s_vd,
                     s_dob, s_dom, s_doh, s_dod, s_dkb, s_dkn, s_dkh, s_dkd, s_dvb, s_dvn, s_dvh, s_dvd,
                     s_dqb, s_dqm, s_dqh, s_dqd, s_split, H, LQ, LK, LQ_KEY, LK_KEY, Q_SPLITS,
                     HEAD_DIM: tl.constexpr, BD: tl.constexpr, CHECK_D: tl.constexpr, ALIGNED: tl.constexpr,
                     UPCAST: tl.constexpr, PREC: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHECK_M: tl.constexpr, CHECK_N: tl.constexpr):
    # One program owns BLOCK_N keys and sweeps its share of the queries (program_id(2) of Q_SPLITS shares;
    # non-causal: no diagonal block). With Q_SPLITS > 1, DK/DV are fp32 partial sums, s_split apart.
    # Works on transposed tiles (keys x queries) so dK and dV come out as plain dots.
    # ATOMIC_DQ (FlashAttention-2 style): also adds this key block's share of dQ into the fp32 DQ with atomics,
    # so P and dS are computed once (no dQ kernel); the summation order, and so the last bits, vary by run.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    Q += _head(b, h, s_qb, s_qh, ALIGNED)
    K += _head(b, h, s_kb, s_kh, ALIGNED)
    V += _head(b, h, s_vb, s_vh, ALIGNED)
    DO += _head(b, h, s_dob, s_doh, ALIGNED)
    DK += _head(b, h, s_dkb, s_dkh, ALIGNED) + pid_s.to(tl.int64) * s_split
    DV += _head(b, h, s_dvb, s_dvh, ALIGNED) + pid_s.to(tl.int64) * s_split
    if ATOMIC_DQ:
        DQ += _head(b, h, s_dqb, s_dqh, ALIGNED)
    LSE += pid_bh.to(tl.int64) * LQ
    DELTA += pid_bh.to(tl.int64) * LQ

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BD)
    k = _load(_tile(K, offs_n, s_kn, d, s_kd, ALIGNED), offs_n, LK, d, HEAD_DIM, CHECK_N, CHECK_D, UPCAST)
    v = _load(_tile(V, offs_n, s_vn, d, s_vd, ALIGNED), offs_n, LK, d, HEAD_DIM, CHECK_N, CHECK_D, UPCAST)
    dk = tl.zeros([BLOCK_N, BD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BD], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    per_split = tl.cdiv(tl.cdiv(LQ, BLOCK_M), Q_SPLITS) * BLOCK_M  # query rows of one share, whole blocks
    lo = pid_s * per_split
    hi = tl.minimum(lo + per_split, LQ)  # a share past LQ sweeps nothing and writes zeros

    for start_m in range(lo, hi, BLOCK_M):
        cur_m = start_m + offs_m
        q = _load(_tile(Q, cur_m, s_qm, d, s_qd, ALIGNED), cur_m, LQ, d, HEAD_DIM, CHECK_M, CHECK_D, UPCAST)
        do = _load(_tile(DO, cur_m, s_dom, d, s_dod, ALIGNED), cur_m, LQ, d, HEAD_DIM, CHECK_M, CHECK_D, UPCAST)
        lse = _load_row(LSE + cur_m, cur_m, LQ, CHECK_M)
        delta = _load_row(DELTA + cur_m, cur_m, LQ, CHECK_M)
        qkT = tl.dot(k, tl.trans(q), input_precision=PREC)  # (BLOCK_N, BLOCK_M) raw scores
        pT = tl.math.exp2(qkT * qk_scale - lse[None, :])  # one FMA per score
        if CHECK_M:  # queries past LQ: q = dO = lse = delta = 0 already gives 0 contributions; be explicit
            pT = tl.where(cur_m[None, :] < LQ, pT, 0.0)
        if ATOMIC_DQ and CHECK_N:  # padded keys: pT = exp2(-lse) can be inf, and inf * (k = 0) is NaN in dQ
            pT = tl.where(offs_n[:, None] < LK, pT, 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)  # (BLOCK_N, BLOCK_M)
        dsT = (pT * (dpT - delta[None, :])).to(q.dtype)
        dk += tl.dot(dsT, q, input_precision=PREC)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(dsT), k, input_precision=PREC) * sm_scale  # (BLOCK_M, BD) fp32
            tl.atomic_add(_tile(DQ, cur_m, s_dqm, d, s_dqd, ALIGNED), dq,
                          mask=(cur_m[:, None] < LQ) & (d[None, :] < HEAD_DIM))

    # Rows past LK hold garbage (they saw zero keys) but are masked out of the store.
    _store(_tile(DK, offs_n, s_dkn, d, s_dkd, ALIGNED), dk * sm_scale, offs_n, LK, d, HEAD_DIM, CHECK_N, CHECK_D)
    _store(_tile(DV, offs_n, s_dvn, d, s_dvd, ALIGNED), dv, offs_n, LK, d, HEAD_DIM, CHECK_N, CHECK_D)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, sm_scale,
                   s_qb, s_qm, s_qh, s_qd, s_kb, s_kn, s_kh, s_kd, s_vb, s_vn, s_vh, s_vd,
                   s_dob, s_dom, s_doh, s_dod, s_dqb, s_dqm, s_dqh, s_dqd,
                   H, LQ, LK, LQ_KEY, LK_KEY,
                   HEAD_DIM: tl.constexpr, BD: tl.constexpr, CHECK_D: tl.constexpr, ALIGNED: tl.constexpr,
                   UPCAST: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHECK_M: tl.constexpr, CHECK_N: tl.constexpr):
    # One program owns BLOCK_M queries and sweeps all keys (0..LK).
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    Q += _head(b, h, s_qb, s_qh, ALIGNED)
    K += _head(b, h, s_kb, s_kh, ALIGNED)
    V += _head(b, h, s_vb, s_vh, ALIGNED)
    DO += _head(b, h, s_dob, s_doh, ALIGNED)
    DQ += _head(b, h, s_dqb, s_dqh, ALIGNED)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BD)
    q = _load(_tile(Q, offs_m, s_qm, d, s_qd, ALIGNED), offs_m, LQ, d, HEAD_DIM, CHECK_M, CHECK_D, UPCAST)
    do = _load(_tile(DO, offs_m, s_dom, d, s_dod, ALIGNED), offs_m, LQ, d, HEAD_DIM, CHECK_M, CHECK_D, UPCAST)
    dq = tl.zeros([BLOCK_M, BD], dtype=tl.float32)
    lse = _load_row(LSE + pid_bh.to(tl.int64) * LQ + offs_m, offs_m, LQ, CHECK_M)
    delta = _load_row(DELTA + pid_bh.to(tl.int64) * LQ + offs_m, offs_m, LQ, CHECK_M)
    qk_scale = sm_scale * 1.4426950408889634

    for start_n in range(0, LK, BLOCK_N):
        cur_n = start_n + offs_n
        k = _load(_tile(K, cur_n, s_kn, d, s_kd, ALIGNED), cur_n, LK, d, HEAD_DIM, CHECK_N, CHECK_D, UPCAST)
        v = _load(_tile(V, cur_n, s_vn, d, s_vd, ALIGNED), cur_n, LK, d, HEAD_DIM, CHECK_N, CHECK_D, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)  # (BLOCK_M, BLOCK_N) raw scores
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if CHECK_N:  # needed: for padded keys p = exp2(-lse), which overflows when all scores are very negative
            p = tl.where(cur_n[None, :] < LK, p, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)

    _store(_tile(DQ, offs_m, s_dqm, d, s_dqd, ALIGNED), dq * sm_scale, offs_m, LQ, d, HEAD_DIM, CHECK_M, CHECK_D)


# ----------------------------------------------------------------------------------------------------------
# Launch configuration: Hopper autotune tables (GPU) or one fixed config (interpreter)
# ----------------------------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head-dim tile BD (64 for D 40 and SDXL's 64, 128 for D 80, 256 for
# D 160). D 64 compiles to the D 40 code's registers, vector loads, cp.async and wgmma, unpadded (docs/kernel.md).
# For dK/dV, BLOCK_N is the key block a program owns and BLOCK_M the query step; for dQ, BLOCK_M is owned and
# BLOCK_N the step. Starting points from the Triton tutorial, the 2026-11-27 H200 autotune picks
# (bench/results/2026-11-27-h200-run2) and ptxas (sm_90): wgmma needs 64 rows per warp group, so the
# 32-row tiles at BD 256 run on mma.sync; they are there for the short D 160 sequences (L 128-1024), where
# 64-row tiles leave most of the 132 SMs idle. `python bench/check_attention_cuda.py --compile-only all`
# prints registers, spills, shared memory and the load / wgmma counts of every config (no GPU needed).
# Three configs per kernel and tile: bench/gpu_kernel_sweep.sh must compile all of them inside its budget.
_TABLES = {
    "fwd": {64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
            128: [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
            256: [(64, 64, 8, 2), (64, 32, 4, 2), (32, 64, 4, 2)]},
    "dkdv": {64: [(64, 128, 8, 3), (32, 128, 8, 3), (64, 64, 4, 3)],  # also the ATOMIC_DQ backward
             128: [(32, 64, 4, 2), (64, 64, 8, 2), (32, 128, 8, 2)],
             256: [(32, 32, 4, 2), (32, 64, 8, 2), (16, 32, 4, 2)]},
    "dq": {64: [(128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3)],
           128: [(128, 32, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2)],
           256: [(32, 64, 8, 2), (64, 32, 8, 2), (32, 32, 4, 2)]},
}
# Interpreter: numpy runs each program serially; unequal M/N blocks catch index mix-ups in the tests.
INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)


def _make_prune(kind):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        table = _TABLES[kind][args["BD"]]
        keep = [c for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in table]
        # Blocks far longer than the sequence only waste work (SD's smallest coupled length is 2*64 tokens).
        fit = [c for c in keep if c.kwargs["BLOCK_M"] <= max(16, args["LQ_KEY"])
               and c.kwargs["BLOCK_N"] <= max(16, args["LK_KEY"])]
        return fit or [min(keep, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    return prune


def _autotuned(kernel, kind):
    configs = sorted({cfg for tier in _TABLES[kind].values() for cfg in tier})
    return triton.autotune(
        configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in configs],
        key=["HEAD_DIM", "LQ_KEY", "LK_KEY", "ALIGNED"] + {"fwd": ["WS", "TMA"], "dkdv": ["ATOMIC_DQ"]}.get(kind, []),
        prune_configs_by={"early_config_prune": _make_prune(kind)},
        # Short benchmarks keep first-call tuning cheap (<= 3 configs x 3 kernels per key), and picks are cached
        # on disk (Triton's cache dir), so later processes on the machine skip the tuning.
        do_bench=lambda fn, quantiles: triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles),
        cache_results=True,
    )(kernel)


_tails = triton.heuristics({"CHECK_M": lambda a: a["LQ"] % a["BLOCK_M"] != 0,
                            "CHECK_N": lambda a: a["LK"] % a["BLOCK_N"] != 0})
_fwd = _tails(_fwd_kernel)
_dkdv = _tails(_bwd_dkdv_kernel)
_dq = _tails(_bwd_dq_kernel)
if not INTERPRET:
    _fwd, _dkdv, _dq = _autotuned(_fwd, "fwd"), _autotuned(_dkdv, "dkdv"), _autotuned(_dq, "dq")


def _launch(kernel, grid_rows, bh, *args, splits=1, **meta):
    """grid_rows: (sequence length whose blocks index program_id(0), "BLOCK_M" or "BLOCK_N")."""
    length, which = grid_rows
    if INTERPRET:
        kernel[(triton.cdiv(length, INTERPRET_CONFIG[which]), bh, splits)](*args, **meta, **INTERPRET_CONFIG)
    else:
        kernel[lambda META: (triton.cdiv(length, META[which]), bh, splits)](*args, **meta)


# ----------------------------------------------------------------------------------------------------------
# Python side
# ----------------------------------------------------------------------------------------------------------
def head_dim_tile(d):
    """Tile width for head dim d: the next power of two, at least 16 (tl.dot's minimum K): 40 -> 64, 80 -> 128."""
    return max(16, triton.next_power_of_2(d))


def _aligned(*tensors):
    # What ALIGNED promises the compiler: unit last stride, every other stride a multiple of 8 elements,
    # 16-byte aligned pointers. True for the UNet's (B, L, H, D) tensors and views of a packed qkv projection.
    return all(t.stride(-1) == 1 and all(s % 8 == 0 for s in t.stride()[:-1]) and t.data_ptr() % 16 == 0
               for t in tensors)


def _meta(q, d, *tensors, align_hint=True):
    if q.dtype == torch.float32:
        prec = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    else:
        prec = "tf32"  # ignored for fp16/bf16 dots
    bd = head_dim_tile(d)
    return dict(HEAD_DIM=d, BD=bd, CHECK_D=bd > d, ALIGNED=align_hint and _aligned(*tensors),
                UPCAST=INTERPRET and q.dtype == torch.bfloat16, PREC=prec)


def _bucket(n):
    return triton.next_power_of_2(n)  # autotune once per power-of-two length bucket, not per length


def dkdv_q_splits(lq, lk, bh, device):
    """Shares of the dK/dV query sweep. One share unless the key blocks alone cannot fill the SMs twice
    (cross-attention: 77 keys are 1-2 key blocks per (batch, head)); then as many shares as fill them,
    each at least 512 queries long."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    programs = triton.cdiv(lk, 64) * bh
    return max(1, min(triton.cdiv(lq, 512), triton.cdiv(2 * sms, programs)))


def _check(q, k, v, scale):
    if not (q.dim() == k.dim() == v.dim() == 4):
        raise ValueError(f"expected 4-D (B, L, H, D) tensors, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Lq, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != H or k.shape[3] != D:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"flash_attention supports fp16/bf16/fp32 (all equal), got {q.dtype}, {k.dtype}, {v.dtype}")
    if not 1 <= D <= 256:
        raise ValueError(f"head dim must be 1..256, got {D}")
    if not scale > 0:
        raise ValueError(f"softmax scale must be positive, got {scale}")  # the forward's folded max needs it
    if not q.is_cuda and not (INTERPRET and _INTERPRET_ENV):
        raise RuntimeError("Triton attention on CPU tensors needs TRITON_INTERPRET=1 set before triton is first "
                           "imported (tests/conftest.py does it); use the SDPA backend (JEDI_ATTN=sdpa) instead")
    if Lq == 0 or k.shape[1] == 0 or B * H == 0:
        raise ValueError("empty attention")


_WS_FAILED = set()  # (D, dtype, ALIGNED, TMA) for which the warp-specialized forward failed to compile


def _set_allocator():
    # Descriptors made on the device (tl.make_tensor_descriptor) live in a global-memory scratch that Triton
    # asks the program for; set once, the first time the TMA forward runs on a GPU.
    global _ALLOCATOR_SET
    if not _ALLOCATOR_SET:
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _ALLOCATOR_SET = True


_ALLOCATOR_SET = False


def _forward(q, k, v, scale, ws, tma, align_hint):
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    o = _empty((B, Lq, H, D), q.device, q.dtype)  # (B, Lq, H, D) contiguous
    lse = _empty((B, H, Lq), q.device, torch.float32)  # log2-domain logsumexp of scaled scores
    args = (q, k, v, o, lse, scale, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            H, Lq, Lk, _bucket(Lq), _bucket(Lk))
    meta = _meta(q, D, q, k, v, o, align_hint=align_hint)
    # TMA wants 16-byte aligned rows and base: what ALIGNED promises; fp32 tiles of 256 columns exceed its box.
    meta["TMA"] = tma and HAS_TMA and meta["ALIGNED"] and q.dtype != torch.float32 and (
        not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] >= 9)  # TMA: Hopper and later
    if meta["TMA"] and q.is_cuda:
        _set_allocator()
    key = (D, q.dtype, meta["ALIGNED"], meta["TMA"])
    if ws and HAS_WARP_SPECIALIZE and key not in _WS_FAILED:
        try:
            _launch(_fwd, (Lq, "BLOCK_M"), B * H, *args, **meta, WS=True)
            return o, lse
        except RuntimeError as e:  # the pass can fail to compile (Triton 3.8, sm_90, D 40): fall back, once
            _WS_FAILED.add(key)
            warnings.warn(f"flash_attention: warp_specialize=True did not compile for D={D} {q.dtype} "
                          f"({str(e).splitlines()[0][:120]}); running without it")
    _launch(_fwd, (Lq, "BLOCK_M"), B * H, *args, **meta, WS=False)
    return o, lse


def _backward(do, q, k, v, o, lse, scale, atomic_dq, align_hint):
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    delta = _empty((B, H, Lq), q.device, torch.float32)  # rowsum(dO * O)
    pre_m = 64 if D <= 128 else 32
    _bwd_preprocess[(triton.cdiv(Lq, pre_m), B * H)](
        o, do, delta, *o.stride(), *do.stride(), H, Lq, HEAD_DIM=D, BD=head_dim_tile(D),
        ALIGNED=align_hint and _aligned(o, do), BLOCK_M=pre_m)
    splits = dkdv_q_splits(Lq, Lk, B * H, q.device)
    if splits == 1:
        dk = _empty(k.shape, k.device, k.dtype)  # (B, Lk, H, D) contiguous
        dv = _empty(v.shape, v.device, v.dtype)
    else:  # fp32 partial sums, one per share of the queries
        dk = _empty((splits, *k.shape), k.device, torch.float32)  # (S, B, Lk, H, D)
        dv = _empty((splits, *v.shape), v.device, torch.float32)
    dk_, dv_ = (dk, dv) if splits == 1 else (dk[0], dv[0])  # (B, Lk, H, D) views for the strides
    if atomic_dq:  # fp32, summed into by every key block's program
        dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32)  # (B, Lq, H, D)
    else:
        dq = _empty(q.shape, q.device, q.dtype)  # (B, Lq, H, D) contiguous
    meta = _meta(q, D, q, k, v, do, dk_, dv_, dq, align_hint=align_hint)
    _launch(_dkdv, (Lk, "BLOCK_N"), B * H, q, k, v, do, dk, dv, dq, lse, delta, scale,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk_.stride(), *dv_.stride(), *dq.stride(),
            dk.stride(0) if splits > 1 else 0, H, Lq, Lk, _bucket(Lq), _bucket(Lk), splits, splits=splits,
            ATOMIC_DQ=atomic_dq, **meta)
    if splits > 1:
        dk, dv = dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype)  # (B, Lk, H, D)
    if atomic_dq:
        return dq.to(q.dtype), dk, dv
    _launch(_dq, (Lq, "BLOCK_M"), B * H, q, k, v, do, dq, lse, delta, scale,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
            H, Lq, Lk, _bucket(Lq), _bucket(Lk), **meta)
    return dq, dk, dv


# A torch.library custom op, not a bare autograd.Function: torch.compile treats it as one opaque node (Dynamo
# cannot trace into Triton's autotuner launch), and the fake implementations give compile the output shapes.
@torch.library.custom_op("jedi::flash_attn_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, ws: bool, tma: bool,
            atomic_dq: bool, align_hint: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, scale, ws, tma, align_hint)  # atomic_dq: only the backward reads it


@_fwd_op.register_fake
def _(q, k, v, scale, ws, tma, atomic_dq, align_hint):
    B, Lq, H, D = q.shape
    return q.new_empty((B, Lq, H, D)), q.new_empty((B, H, Lq), dtype=torch.float32)  # o, lse (both contiguous)


@torch.library.custom_op("jedi::flash_attn_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
            scale: float, atomic_dq: bool, align_hint: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, o, lse, scale, atomic_dq, align_hint)


@_bwd_op.register_fake
def _(do, q, k, v, o, lse, scale, atomic_dq, align_hint):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, like the kernels' outputs


def _setup_context(ctx, inputs, output):
    q, k, v, scale, ws, tma, atomic_dq, align_hint = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale, ctx.atomic_dq, ctx.align_hint = scale, atomic_dq, align_hint
    ctx.mark_non_differentiable(lse)


def _backward_rule(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _bwd_op(do, q, k, v, o, lse, ctx.scale, ctx.atomic_dq, ctx.align_hint)
    return dq, dk, dv, None, None, None, None, None


_fwd_op.register_autograd(_backward_rule, setup_context=_setup_context)


def flash_attention(q, k, v, scale=None, warp_specialize=False, tma=False, atomic_dq=False, align_hint=True):
    """Non-causal softmax attention, fused (never materialises the Lq x Lk matrix). Differentiable.

    q:      (B, Lq, H, D)  fp16 / bf16 / fp32, any strides (e.g. views of a packed qkv projection)
    k, v:   (B, Lk, H, D)  same dtype and device as q; Lk may differ from Lq
    scale:  softmax scale (> 0), default 1/sqrt(D)
    warp_specialize: the forward's key loop as tl.range(warp_specialize=True) (ignored on Triton < 3.4)
    tma: the forward loads K and V through TMA descriptors (tl.make_tensor_descriptor; fp16 / bf16 with
        16-byte aligned strides, else the pointer loads)
    atomic_dq: one backward kernel that adds dQ with fp32 atomics (P and dS computed once) instead of a
        separate dQ kernel (no atomics, bitwise deterministic)
    align_hint: False drops the 16-byte alignment hints, reproducing the pre-2026-12-01 scalar loads at D 40
        (an A/B switch for bench/gpu_kernel_sweep.sh; results are identical either way)
    returns (B, Lq, H, D) contiguous, dtype of q.  1 <= D <= 256.
    CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before this module was imported.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    _check(q, k, v, scale)
    return _fwd_op(q, k, v, float(scale), bool(warp_specialize), bool(tma), bool(atomic_dq), bool(align_hint))[0]
