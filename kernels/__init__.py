"""The one attention entry point used by every attention layer of the model.

``attention(q, k, v, scale=None, backend=None)``
    q: (B, Lq, H, D), k and v: (B, Lk, H, D)  ->  (B, Lq, H, D), non-causal softmax attention, differentiable.

Backends:
    "triton":    the fused flash-attention kernel in ``kernels/flash_attn.py`` (fp16/bf16/fp32, D <= 256).
    "triton-tma": the same with the forward's K/V tiles loaded through TMA descriptors (Hopper and later).
    "triton-ws": TMA plus the forward's key loop warp-specialized (Triton's Hopper pass; falls back without).
    "triton-atomic": the backward as one kernel adding dQ with fp32 atomics (FlashAttention-2 style).
    "sdpa":      PyTorch's ``scaled_dot_product_attention`` (never materialises Lq x Lk on its fused paths).
    "auto" (default): per call, the backend measured fastest on this card for (dtype, head dim, Lq bucket,
        Lk bucket, direction) in ``kernels/dispatch/<card>.json`` (written by bench/gpu_kernel_sweep.sh).
        Direction "train" (some input requires grad) compares forward + backward, and the op runs both on
        that backend; "fwd" compares the forward. A card without a table, an unmeasured shape, fp32 and every
        CPU tensor get "sdpa".
The ``backend`` argument wins over the environment variable ``JEDI_ATTN`` (any of BACKENDS).
Forcing "triton" on CPU tensors needs ``TRITON_INTERPRET=1`` (that is how the tests run it).

``record_backends()``: a context manager yielding a Counter of ``BackendUse(backend, head_dim, lq, lk,
direction)`` (lq, lk: power-of-two buckets) over the eager calls made inside it, for benchmarks to report
which backend ran. Calls traced by torch.compile are not counted (the choice is made once at trace time, from
the same table: record an eager warm-up call to see what a compiled graph runs). ``backend_summary(counts)``
formats it for a table cell.
"""
import collections
import contextlib
import os

import torch
import torch.nn.functional as F

from . import dispatch

BACKENDS = ("auto", "triton", "triton-tma", "triton-ws", "triton-atomic", "sdpa")
TRITON_OPTIONS = {"triton": {}, "triton-tma": dict(tma=True), "triton-ws": dict(tma=True, warp_specialize=True),
                  "triton-atomic": dict(atomic_dq=True)}
BackendUse = collections.namedtuple("BackendUse", "backend head_dim lq lk direction")
_RECORDERS = []  # Counters of the active record_backends() contexts


def sdpa_attention(q, k, v, scale=None):
    # SDPA wants (B, H, L, D); transposes are views, SDPA handles the strides.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)  # (B, Lq, H, D)


@torch.compiler.assume_constant_result  # Dynamo runs it once at trace time and bakes the string in
def _auto(device_type: str, device_index: int, dtype: str, head_dim: int, lq: int, lk: int, direction: str) -> str:
    if device_type != "cuda" or dtype not in dispatch.DTYPES.values():
        return "sdpa"
    card = torch.cuda.get_device_name(device_index)
    return dispatch.lookup(card, {v: k for k, v in dispatch.DTYPES.items()}[dtype], head_dim, lq, lk, direction)


def _direction(q, k, v):
    return "train" if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad) else "fwd"


def resolve_backend(q, k, v, backend=None) -> str:
    """The backend ``attention`` would use for these tensors: "sdpa" or one of the "triton" variants."""
    backend = (backend or os.environ.get("JEDI_ATTN") or "auto").lower()
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS} (JEDI_ATTN / backend=)")
    if backend != "auto":
        return backend
    return _auto(q.device.type, q.device.index or 0, str(q.dtype), q.shape[-1], q.shape[1], k.shape[1],
                 _direction(q, k, v))


@contextlib.contextmanager
def record_backends():
    counts = collections.Counter()
    _RECORDERS.append(counts)
    try:
        yield counts
    finally:
        _RECORDERS.remove(counts)


def backend_summary(counts) -> str:
    """record_backends()' Counter as one table cell: 'sdpa fwd D40×4 D80×4 D160×6' per backend and direction;
    '' when nothing was recorded (every call compiled)."""
    groups = collections.defaultdict(collections.Counter)  # (backend, direction) -> {head dim: calls}
    for use, n in counts.items():
        groups[(use.backend, use.direction)][use.head_dim] += n
    return "; ".join(f"{b} {d} " + " ".join(f"D{h}×{n}" for h, n in sorted(dims.items()))
                     for (b, d), dims in sorted(groups.items()))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
              backend: str | None = None) -> torch.Tensor:
    chosen = resolve_backend(q, k, v, backend)
    if _RECORDERS and not torch.compiler.is_compiling():
        use = BackendUse(chosen, q.shape[-1], dispatch.bucket(q.shape[1]), dispatch.bucket(k.shape[1]),
                         _direction(q, k, v))
        for counts in _RECORDERS:
            counts[use] += 1
    if chosen in TRITON_OPTIONS:
        from . import flash_attn  # imported lazily: triton.jit fixes interpreter vs compiler at import time
        return flash_attn.flash_attention(q, k, v, scale, **TRITON_OPTIONS[chosen])
    return sdpa_attention(q, k, v, scale)
