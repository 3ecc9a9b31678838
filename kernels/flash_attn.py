"""Fused flash-attention in Triton: non-causal forward and backward (dQ, dK, dV) on the (B, L, H, D) layout.

Public entry point: ``flash_attention(q, k, v, scale=None, split_d=None)``; ``kernels.attention`` dispatches here.

Design (FlashAttention-2, as in the Triton tutorial, without its causal-only backward):
- Works on the UNet's (B, L, H, D) tensors through their strides: no transposes, no copies.
- Forward: one program per (BLOCK_M query rows, batch*head); online softmax over BLOCK_N key blocks in the
  exp2 domain; saves the row logsumexp (log2 units of the scaled scores, fp32, (B, H, Lq)) for the backward.
- Backward: a preprocess kernel computes delta = rowsum(dO * O); then two kernels with no atomics:
  dK/dV (one program per key block, loops over all query blocks) and dQ (one program per query block, loops
  over all key blocks). This recomputes P twice but needs no fp32 scratch or atomics, and every output
  element is written exactly once by exactly one program.
- Any Lq, Lk (ragged tails are masked; Lq != Lk, e.g. cross-attention to 77 text tokens), any head dim
  1..256. Head dims are handled in one of two ways (``split_d`` / env ``JEDI_ATTN_SPLIT_D=1``):
    pad   (default): one tile of BD0 = next_pow2(D) columns, masked (40->64, 80->128, 160->256);
    split (option) : two power-of-two tiles BD0 + BD1 (80 = 64+16, 160 = 128+32, 40 = 32+16), each dot
                     done per piece and summed: less wasted tensor-core work, more instructions.
  Neither has been measured on a GPU yet; bench/bench_attention.py has a column for each.
- Dtypes: fp16 / bf16 tiles go straight into tl.dot (tensor cores) with fp32 accumulation; P and dS are
  cast to the input dtype for their dots, as in FlashAttention. fp32 inputs use IEEE fp32 dots unless
  torch.backends.cuda.matmul.allow_tf32 is set. Under TRITON_INTERPRET=1 bf16 arithmetic is silently
  wrong (numpy has no bf16), so the constexpr UPCAST -- true only when interpreting bf16 -- upcasts each
  loaded tile to fp32; compiled GPU code never takes that branch.
- Autotuning (GPU): three Hopper configs per kernel and (head-dim tier, pad/split), pruned by sequence
  length, keyed on (head dim pieces, Lq bucket, Lk bucket) and the dtypes, picks cached on disk. Under the
  interpreter one fixed small config (autotuning there would take minutes).
"""
import math
import os

import torch
import triton
import triton.language as tl

# Triton picks the interpreter or the compiler when each @triton.jit function is defined: its own (tl.zeros,
# ...) when `triton` is first imported, ours when this module is. Both must have seen TRITON_INTERPRET=1.
INTERPRET = type(tl.zeros).__name__ == "InterpretedFunction"
_INTERPRET_ENV = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

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
                HEAD_DIM: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr,
                CHECK_D0: tl.constexpr, CHECK_D1: tl.constexpr,
                UPCAST: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHECK_M: tl.constexpr, CHECK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64: batch offsets of big tensors can pass 2**31 elements
    h = pid_bh % H
    Q += b * s_qb + h * s_qh
    K += b * s_kb + h * s_kh
    V += b * s_vb + h * s_vh
    O += b * s_ob + h * s_oh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    d0 = tl.arange(0, BD0)
    q0 = _load(Q + offs_m[:, None] * s_qm + d0[None, :] * s_qd, offs_m, LQ, d0, HEAD_DIM, CHECK_M, CHECK_D0, UPCAST)
    acc0 = tl.zeros([BLOCK_M, BD0], dtype=tl.float32)
    if BD1 > 0:  # second head-dim piece (split mode)
        d1 = BD0 + tl.arange(0, BD1)
        q1 = _load(Q + offs_m[:, None] * s_qm + d1[None, :] * s_qd, offs_m, LQ, d1, HEAD_DIM, CHECK_M, CHECK_D1,
                   UPCAST)
        acc1 = tl.zeros([BLOCK_M, BD1], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of scaled scores (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(score - m_i)
    qk_scale = sm_scale * 1.4426950408889634  # fold log2(e) in once: exp2 is the fast path

    for start_n in range(0, LK, BLOCK_N):
        cur_n = start_n + offs_n
        k0 = _load(K + cur_n[:, None] * s_kn + d0[None, :] * s_kd, cur_n, LK, d0, HEAD_DIM, CHECK_N, CHECK_D0, UPCAST)
        qk = tl.dot(q0, tl.trans(k0), input_precision=PREC)  # (BLOCK_M, BLOCK_N) fp32
        if BD1 > 0:
            k1 = _load(K + cur_n[:, None] * s_kn + d1[None, :] * s_kd, cur_n, LK, d1, HEAD_DIM, CHECK_N, CHECK_D1,
                       UPCAST)
            qk += tl.dot(q1, tl.trans(k1), input_precision=PREC)
        qk = qk * qk_scale
        if CHECK_N:  # keys past LK get zero weight
            qk = tl.where(cur_n[None, :] < LK, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))  # finite: every key block holds at least one valid key
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was accumulated under the old max (0 at first)
        l_i = l_i * alpha + tl.sum(p, 1)
        v0 = _load(V + cur_n[:, None] * s_vn + d0[None, :] * s_vd, cur_n, LK, d0, HEAD_DIM, CHECK_N, CHECK_D0, UPCAST)
        acc0 = acc0 * alpha[:, None] + tl.dot(p.to(v0.dtype), v0, input_precision=PREC)
        if BD1 > 0:
            v1 = _load(V + cur_n[:, None] * s_vn + d1[None, :] * s_vd, cur_n, LK, d1, HEAD_DIM, CHECK_N, CHECK_D1,
                       UPCAST)
            acc1 = acc1 * alpha[:, None] + tl.dot(p.to(v1.dtype), v1, input_precision=PREC)
        m_i = m_new

    inv_l = 1.0 / l_i
    _store(O + offs_m[:, None] * s_om + d0[None, :] * s_od, acc0 * inv_l[:, None], offs_m, LQ, d0, HEAD_DIM,
           CHECK_M, CHECK_D0)
    if BD1 > 0:
        _store(O + offs_m[:, None] * s_om + d1[None, :] * s_od, acc1 * inv_l[:, None], offs_m, LQ, d1, HEAD_DIM,
               CHECK_M, CHECK_D1)
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
                    HEAD_DIM: tl.constexpr, BD: tl.constexpr, BLOCK_M: tl.constexpr):
    # delta_i = sum_d dO_id * O_id (fp32); memory-bound, so plain padding and fixed blocks are fine.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BD)
    mask = (offs_m[:, None] < LQ) & (d[None, :] < HEAD_DIM)
    o = tl.load(O + b * s_ob + h * s_oh + offs_m[:, None] * s_om + d[None, :] * s_od, mask=mask, other=0.0)
    do = tl.load(DO + b * s_dob + h * s_doh + offs_m[:, None] * s_dom + d[None, :] * s_dod, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * LQ + offs_m, delta, mask=offs_m < LQ)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, sm_scale,
                     s_qb, s_qm, s_qh, s_qd, s_kb, s_kn, s_kh, s_kd, s_vb, s_vn, s_vh, s_vd,
                     s_dob, s_dom, s_doh, s_dod, s_dkb, s_dkn, s_dkh, s_dkd, s_dvb, s_dvn, s_dvh, s_dvd,
                     H, LQ, LK, LQ_KEY, LK_KEY,
                     HEAD_DIM: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr,
                     CHECK_D0: tl.constexpr, CHECK_D1: tl.constexpr,
                     UPCAST: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHECK_M: tl.constexpr, CHECK_N: tl.constexpr):
    # One program owns BLOCK_N keys and sweeps all queries (non-causal: from 0 to LQ, no diagonal block).
    # Works on transposed tiles (keys x queries) so dK and dV come out as plain dots.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    Q += b * s_qb + h * s_qh
    K += b * s_kb + h * s_kh
    V += b * s_vb + h * s_vh
    DO += b * s_dob + h * s_doh
    DK += b * s_dkb + h * s_dkh
    DV += b * s_dvb + h * s_dvh
    LSE += pid_bh.to(tl.int64) * LQ
    DELTA += pid_bh.to(tl.int64) * LQ

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    d0 = tl.arange(0, BD0)
    k0 = _load(K + offs_n[:, None] * s_kn + d0[None, :] * s_kd, offs_n, LK, d0, HEAD_DIM, CHECK_N, CHECK_D0, UPCAST)
    v0 = _load(V + offs_n[:, None] * s_vn + d0[None, :] * s_vd, offs_n, LK, d0, HEAD_DIM, CHECK_N, CHECK_D0, UPCAST)
    dk0 = tl.zeros([BLOCK_N, BD0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, BD0], dtype=tl.float32)
    if BD1 > 0:
        d1 = BD0 + tl.arange(0, BD1)
        k1 = _load(K + offs_n[:, None] * s_kn + d1[None, :] * s_kd, offs_n, LK, d1, HEAD_DIM, CHECK_N, CHECK_D1,
                   UPCAST)
        v1 = _load(V + offs_n[:, None] * s_vn + d1[None, :] * s_vd, offs_n, LK, d1, HEAD_DIM, CHECK_N, CHECK_D1,
                   UPCAST)
        dk1 = tl.zeros([BLOCK_N, BD1], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_N, BD1], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634

    for start_m in range(0, LQ, BLOCK_M):
        cur_m = start_m + offs_m
        q0 = _load(Q + cur_m[:, None] * s_qm + d0[None, :] * s_qd, cur_m, LQ, d0, HEAD_DIM, CHECK_M, CHECK_D0, UPCAST)
        do0 = _load(DO + cur_m[:, None] * s_dom + d0[None, :] * s_dod, cur_m, LQ, d0, HEAD_DIM, CHECK_M, CHECK_D0,
                    UPCAST)
        lse = _load_row(LSE + cur_m, cur_m, LQ, CHECK_M)
        delta = _load_row(DELTA + cur_m, cur_m, LQ, CHECK_M)
        sT = tl.dot(k0, tl.trans(q0), input_precision=PREC)  # (BLOCK_N, BLOCK_M) raw scores, transposed
        dpT = tl.dot(v0, tl.trans(do0), input_precision=PREC)  # (BLOCK_N, BLOCK_M) = (dO V^T)^T
        if BD1 > 0:
            q1 = _load(Q + cur_m[:, None] * s_qm + d1[None, :] * s_qd, cur_m, LQ, d1, HEAD_DIM, CHECK_M, CHECK_D1,
                       UPCAST)
            do1 = _load(DO + cur_m[:, None] * s_dom + d1[None, :] * s_dod, cur_m, LQ, d1, HEAD_DIM, CHECK_M,
                        CHECK_D1, UPCAST)
            sT += tl.dot(k1, tl.trans(q1), input_precision=PREC)
            dpT += tl.dot(v1, tl.trans(do1), input_precision=PREC)
        pT = tl.math.exp2(sT * qk_scale - lse[None, :])  # softmax probabilities, recomputed from the saved lse
        if CHECK_M:  # queries past LQ: q = dO = lse = delta = 0 already gives 0 contributions; be explicit
            pT = tl.where(cur_m[None, :] < LQ, pT, 0.0)
        dv0 += tl.dot(pT.to(do0.dtype), do0, input_precision=PREC)
        dsT = pT * (dpT - delta[None, :])  # dS = P * (dP - delta), the softmax backward
        dk0 += tl.dot(dsT.to(q0.dtype), q0, input_precision=PREC)
        if BD1 > 0:
            dv1 += tl.dot(pT.to(do1.dtype), do1, input_precision=PREC)
            dk1 += tl.dot(dsT.to(q1.dtype), q1, input_precision=PREC)

    # Rows past LK hold garbage (they saw zero keys) but are masked out of the store.
    _store(DK + offs_n[:, None] * s_dkn + d0[None, :] * s_dkd, dk0 * sm_scale, offs_n, LK, d0, HEAD_DIM, CHECK_N,
           CHECK_D0)
    _store(DV + offs_n[:, None] * s_dvn + d0[None, :] * s_dvd, dv0, offs_n, LK, d0, HEAD_DIM, CHECK_N, CHECK_D0)
    if BD1 > 0:
        _store(DK + offs_n[:, None] * s_dkn + d1[None, :] * s_dkd, dk1 * sm_scale, offs_n, LK, d1, HEAD_DIM,
               CHECK_N, CHECK_D1)
        _store(DV + offs_n[:, None] * s_dvn + d1[None, :] * s_dvd, dv1, offs_n, LK, d1, HEAD_DIM, CHECK_N, CHECK_D1)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, sm_scale,
                   s_qb, s_qm, s_qh, s_qd, s_kb, s_kn, s_kh, s_kd, s_vb, s_vn, s_vh, s_vd,
                   s_dob, s_dom, s_doh, s_dod, s_dqb, s_dqm, s_dqh, s_dqd,
                   H, LQ, LK, LQ_KEY, LK_KEY,
                   HEAD_DIM: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr,
                   CHECK_D0: tl.constexpr, CHECK_D1: tl.constexpr,
                   UPCAST: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHECK_M: tl.constexpr, CHECK_N: tl.constexpr):
    # One program owns BLOCK_M queries and sweeps all keys (0..LK).
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    Q += b * s_qb + h * s_qh
    K += b * s_kb + h * s_kh
    V += b * s_vb + h * s_vh
    DO += b * s_dob + h * s_doh
    DQ += b * s_dqb + h * s_dqh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    d0 = tl.arange(0, BD0)
    q0 = _load(Q + offs_m[:, None] * s_qm + d0[None, :] * s_qd, offs_m, LQ, d0, HEAD_DIM, CHECK_M, CHECK_D0, UPCAST)
    do0 = _load(DO + offs_m[:, None] * s_dom + d0[None, :] * s_dod, offs_m, LQ, d0, HEAD_DIM, CHECK_M, CHECK_D0,
                UPCAST)
    dq0 = tl.zeros([BLOCK_M, BD0], dtype=tl.float32)
    if BD1 > 0:
        d1 = BD0 + tl.arange(0, BD1)
        q1 = _load(Q + offs_m[:, None] * s_qm + d1[None, :] * s_qd, offs_m, LQ, d1, HEAD_DIM, CHECK_M, CHECK_D1,
                   UPCAST)
        do1 = _load(DO + offs_m[:, None] * s_dom + d1[None, :] * s_dod, offs_m, LQ, d1, HEAD_DIM, CHECK_M, CHECK_D1,
                    UPCAST)
        dq1 = tl.zeros([BLOCK_M, BD1], dtype=tl.float32)
    lse = _load_row(LSE + pid_bh.to(tl.int64) * LQ + offs_m, offs_m, LQ, CHECK_M)
    delta = _load_row(DELTA + pid_bh.to(tl.int64) * LQ + offs_m, offs_m, LQ, CHECK_M)
    qk_scale = sm_scale * 1.4426950408889634

    for start_n in range(0, LK, BLOCK_N):
        cur_n = start_n + offs_n
        k0 = _load(K + cur_n[:, None] * s_kn + d0[None, :] * s_kd, cur_n, LK, d0, HEAD_DIM, CHECK_N, CHECK_D0, UPCAST)
        v0 = _load(V + cur_n[:, None] * s_vn + d0[None, :] * s_vd, cur_n, LK, d0, HEAD_DIM, CHECK_N, CHECK_D0, UPCAST)
        s = tl.dot(q0, tl.trans(k0), input_precision=PREC)  # (BLOCK_M, BLOCK_N)
        dp = tl.dot(do0, tl.trans(v0), input_precision=PREC)  # (BLOCK_M, BLOCK_N)
        if BD1 > 0:
            k1 = _load(K + cur_n[:, None] * s_kn + d1[None, :] * s_kd, cur_n, LK, d1, HEAD_DIM, CHECK_N, CHECK_D1,
                       UPCAST)
            v1 = _load(V + cur_n[:, None] * s_vn + d1[None, :] * s_vd, cur_n, LK, d1, HEAD_DIM, CHECK_N, CHECK_D1,
                       UPCAST)
            s += tl.dot(q1, tl.trans(k1), input_precision=PREC)
            dp += tl.dot(do1, tl.trans(v1), input_precision=PREC)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if CHECK_N:  # needed: for padded keys p = exp2(-lse), which overflows when all scores are very negative
            p = tl.where(cur_n[None, :] < LK, p, 0.0)
        ds = p * (dp - delta[:, None])
        dq0 += tl.dot(ds.to(k0.dtype), k0, input_precision=PREC)
        if BD1 > 0:
            dq1 += tl.dot(ds.to(k1.dtype), k1, input_precision=PREC)

    _store(DQ + offs_m[:, None] * s_dqm + d0[None, :] * s_dqd, dq0 * sm_scale, offs_m, LQ, d0, HEAD_DIM, CHECK_M,
           CHECK_D0)
    if BD1 > 0:
        _store(DQ + offs_m[:, None] * s_dqm + d1[None, :] * s_dqd, dq1 * sm_scale, offs_m, LQ, d1, HEAD_DIM, CHECK_M,
               CHECK_D1)


# ----------------------------------------------------------------------------------------------------------
# Launch configuration: Hopper autotune tables (GPU) or one fixed config (interpreter)
# ----------------------------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per (tier, split): tier = BD0 + BD1 rounded up to 64 / 128 / 256,
# split = two head-dim pieces (they use fewer registers than one padded tile of the same tier).
# For dK/dV, BLOCK_N is the key block a program owns and BLOCK_M the query step; for dQ, BLOCK_M is owned and
# BLOCK_N the step. Chosen without a GPU: starting points from the Triton tutorial and FlagAttention,
# preferring configs for which ptxas (sm_90, fp16) reports no register spills (two that spill a little are
# marked). Reproduce with `python bench/check_attention_cuda.py --compile-only all` (no GPU needed).
# Not yet timed on a GPU: retune with bench/gpu_suite.sh.
_TABLES = {
    "fwd": {(64, False): [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
            (64, True): [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
            (128, False): [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
            (128, True): [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
            (256, False): [(64, 64, 8, 2), (64, 32, 4, 2), (64, 128, 8, 2)],  # the last spills a little
            (256, True): [(128, 64, 8, 2), (64, 64, 8, 2), (64, 128, 8, 2)]},
    "dkdv": {(64, False): [(32, 128, 8, 3), (64, 128, 8, 3), (64, 64, 4, 3)],
             (64, True): [(32, 128, 8, 3), (64, 128, 8, 3), (64, 64, 4, 3)],
             (128, False): [(32, 64, 4, 2), (64, 64, 8, 2), (32, 64, 8, 2)],
             (128, True): [(32, 128, 8, 2), (64, 128, 8, 2), (64, 64, 8, 2)],
             (256, False): [(32, 32, 8, 2), (16, 32, 4, 2), (32, 32, 4, 2)],  # the last spills a little
             (256, True): [(32, 64, 8, 2), (16, 64, 8, 2), (64, 64, 8, 1)]},
    "dq": {(64, False): [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
           (64, True): [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
           (128, False): [(128, 32, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2)],
           (128, True): [(128, 32, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2)],
           (256, False): [(32, 64, 8, 2), (32, 32, 8, 2), (32, 32, 4, 2)],
           (256, True): [(64, 32, 8, 2), (64, 16, 8, 2), (32, 32, 8, 2)]},
}
# Interpreter: numpy runs each program serially; unequal M/N blocks catch index mix-ups in the tests.
INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)


def _tier(bd0, bd1):
    bd = bd0 + bd1
    return 64 if bd <= 64 else 128 if bd <= 128 else 256, bd1 > 0


def _make_prune(kind):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        table = _TABLES[kind][_tier(args["BD0"], args["BD1"])]
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
        key=["HEAD_DIM", "BD0", "BD1", "LQ_KEY", "LK_KEY"],  # tensor dtypes are added to the key by Triton
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


def _launch(kernel, grid_rows, bh, *args, **meta):
    """grid_rows: (sequence length whose blocks index program_id(0), "BLOCK_M" or "BLOCK_N")."""
    length, which = grid_rows
    if INTERPRET:
        kernel[(triton.cdiv(length, INTERPRET_CONFIG[which]), bh)](*args, **meta, **INTERPRET_CONFIG)
    else:
        kernel[lambda META: (triton.cdiv(length, META[which]), bh)](*args, **meta)


# ----------------------------------------------------------------------------------------------------------
# Python side
# ----------------------------------------------------------------------------------------------------------
def head_dim_pieces(d, split=False):
    """Tile widths (BD0, BD1) for head dim d. BD1 == 0 means one padded tile.

    pad:   (next_pow2(d), 0)                 40 -> (64, 0),  80 -> (128, 0), 160 -> (256, 0)
    split: (prev_pow2(d), next_pow2(rest))   40 -> (32, 16), 80 -> (64, 16), 160 -> (128, 32)
    Tiles are at least 16 wide (tl.dot's minimum K). Split falls back to pad when it saves nothing.
    """
    pad = max(16, triton.next_power_of_2(d))
    if not split:
        return pad, 0
    bd0 = max(16, 1 << (d.bit_length() - 1))
    if bd0 >= d:
        return pad, 0
    bd1 = max(16, triton.next_power_of_2(d - bd0))
    return (bd0, bd1) if bd0 + bd1 < pad else (pad, 0)


def _meta(q, d, split):
    bd0, bd1 = head_dim_pieces(d, split)
    if q.dtype == torch.float32:
        prec = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    else:
        prec = "tf32"  # ignored for fp16/bf16 dots
    return dict(HEAD_DIM=d, BD0=bd0, BD1=bd1, CHECK_D0=bd0 > d, CHECK_D1=bd0 + bd1 > d,
                UPCAST=INTERPRET and q.dtype == torch.bfloat16, PREC=prec)


def _bucket(n):
    return triton.next_power_of_2(n)  # autotune once per power-of-two length bucket, not per length


def _check(q, k, v):
    if not (q.dim() == k.dim() == v.dim() == 4):
        raise ValueError(f"expected 4-D (B, L, H, D) tensors, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Lq, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != H or k.shape[3] != D:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"flash_attention supports fp16/bf16/fp32 (all equal), got {q.dtype}, {k.dtype}, {v.dtype}")
    if not 1 <= D <= 256:
        raise ValueError(f"head dim must be 1..256, got {D}")
    if not q.is_cuda and not (INTERPRET and _INTERPRET_ENV):
        raise RuntimeError("Triton attention on CPU tensors needs TRITON_INTERPRET=1 set before triton is first "
                           "imported (tests/conftest.py does it); use the SDPA backend (JEDI_ATTN=sdpa) instead")
    if Lq == 0 or k.shape[1] == 0 or B * H == 0:
        raise ValueError("empty attention")


def _forward(q, k, v, scale, split):
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    o = _empty((B, Lq, H, D), q.device, q.dtype)  # (B, Lq, H, D) contiguous
    lse = _empty((B, H, Lq), q.device, torch.float32)  # log2-domain logsumexp of scaled scores
    _launch(_fwd, (Lq, "BLOCK_M"), B * H, q, k, v, o, lse, scale,
            *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            H, Lq, Lk, _bucket(Lq), _bucket(Lk), **_meta(q, D, split))
    return o, lse


def _backward(do, q, k, v, o, lse, scale, split):
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    delta = _empty((B, H, Lq), q.device, torch.float32)  # rowsum(dO * O)
    pre_m = 64 if D <= 128 else 32
    _bwd_preprocess[(triton.cdiv(Lq, pre_m), B * H)](
        o, do, delta, *o.stride(), *do.stride(), H, Lq, HEAD_DIM=D, BD=max(16, triton.next_power_of_2(D)),
        BLOCK_M=pre_m)
    meta = _meta(q, D, split)
    dk = _empty(k.shape, k.device, k.dtype)  # (B, Lk, H, D) contiguous
    dv = _empty(v.shape, v.device, v.dtype)
    _launch(_dkdv, (Lk, "BLOCK_N"), B * H, q, k, v, do, dk, dv, lse, delta, scale,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
            H, Lq, Lk, _bucket(Lq), _bucket(Lk), **meta)
    dq = _empty(q.shape, q.device, q.dtype)  # (B, Lq, H, D) contiguous
    _launch(_dq, (Lq, "BLOCK_M"), B * H, q, k, v, do, dq, lse, delta, scale,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
            H, Lq, Lk, _bucket(Lq), _bucket(Lk), **meta)
    return dq, dk, dv


# A torch.library custom op, not a bare autograd.Function: torch.compile treats it as one opaque node (Dynamo
# cannot trace into Triton's autotuner launch), and the fake implementations give compile the output shapes.
@torch.library.custom_op("jedi::flash_attn_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, split: bool
            ) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, scale, split)


@_fwd_op.register_fake
def _(q, k, v, scale, split):
    B, Lq, H, D = q.shape
    return q.new_empty((B, Lq, H, D)), q.new_empty((B, H, Lq), dtype=torch.float32)  # o, lse (both contiguous)


@torch.library.custom_op("jedi::flash_attn_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
            scale: float, split: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, o, lse, scale, split)


@_bwd_op.register_fake
def _(do, q, k, v, o, lse, scale, split):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, like the kernels' outputs


def _setup_context(ctx, inputs, output):
    q, k, v, scale, split = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale, ctx.split = scale, split
    ctx.mark_non_differentiable(lse)


def _backward_rule(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _bwd_op(do, q, k, v, o, lse, ctx.scale, ctx.split)
    return dq, dk, dv, None, None


_fwd_op.register_autograd(_backward_rule, setup_context=_setup_context)


def flash_attention(q, k, v, scale=None, split_d=None):
    """Non-causal softmax attention, fused (never materialises the Lq x Lk matrix). Differentiable.

    q:      (B, Lq, H, D)  fp16 / bf16 / fp32, any strides (e.g. views of a packed qkv projection)
    k, v:   (B, Lk, H, D)  same dtype and device as q; Lk may differ from Lq
    scale:  softmax scale, default 1/sqrt(D)
    split_d: head-dim tiling, None -> env JEDI_ATTN_SPLIT_D (default off = pad to a power of two)
    returns (B, Lq, H, D) contiguous, dtype of q.  1 <= D <= 256.
    CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before this module was imported.
    """
    _check(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if split_d is None:
        split_d = os.environ.get("JEDI_ATTN_SPLIT_D", "0") == "1"
    if split_d and q.is_cuda:
        raise NotImplementedError(
            "flash_attention(split_d=True) is disabled on CUDA: on an H200 (Triton 3.6, torch 2.11) its first "
            "launch hit an illegal memory access (bench/results/2026-11-27-h200-run1/check_attention.log), while "
            "the same kernels pass under TRITON_INTERPRET=1. Use the default padded head dim (split_d=False).")
    return _fwd_op(q, k, v, float(scale), bool(split_d))[0]
