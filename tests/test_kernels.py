"""Triton flash-attention vs an fp64 reference, and the attention() dispatch.

Without CUDA the kernels run under TRITON_INTERPRET=1 on CPU tensors (slow: shapes are kept small).
Inputs are fresh random tensors each run; the seed is in every failure message.
"""
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # tests/conftest.py sets this before anything imports triton; this line covers runs without the conftest.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernels  # noqa: E402
from kernels import flash_attn  # noqa: E402
from kernels.reference import attention_reference  # noqa: E402

if not torch.cuda.is_available() and not flash_attn.INTERPRET:
    raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run on CPU; "
                       "set it in the environment or import nothing that imports triton before tests/conftest.py")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parents[1]
SEED = torch.seed()  # fresh inputs each run, reproducible from the message: torch.manual_seed(SEED)
# Slack added to 2 x (SDPA's error) in each dtype: about one unit in the last place of O(1) values.
EPS = {torch.float32: 1e-6, torch.float16: 5e-4, torch.bfloat16: 4e-3}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    # Every buffer the kernels allocate (O, lse, delta, dQ, dK, dV) starts as NaN: unwritten elements fail.
    monkeypatch.setattr(flash_attn, "_DEBUG_FILL", float("nan"))


def _inputs(B, Lq, Lk, H, D, dtype, packed=False):
    if packed:  # q, k, v as strided views of one fused projection (B, L, 3, H, D), as a UNet may produce
        assert Lq == Lk
        qkv = torch.randn(B, Lq, 3, H, D, device=DEVICE, dtype=dtype)
        q, k, v = (t.requires_grad_() for t in qkv.unbind(2))  # each (B, L, H, D), non-contiguous
        return q, k, v
    q = torch.randn(B, Lq, H, D, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Lk, H, D, device=DEVICE, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Lk, H, D, device=DEVICE, dtype=dtype, requires_grad=True)
    return q, k, v


def _run(fn, q, k, v, do):
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), do)
    return (out, *grads)


def _leaf(x, dtype):
    return x.detach().to(dtype).requires_grad_()


CASES = [
    # B, Lq,  Lk,  H, D,   dtype,         variant, packed
    (2, 77, 77, 2, 40, torch.float32, None, True),  # SD d40, odd length, strided views
    (1, 100, 77, 2, 80, torch.float16, None, False),  # cross-attention length, Lq != Lk
    (1, 257, 100, 1, 160, torch.float16, None, False),  # d160, one past a block multiple
    (1, 64, 128, 3, 64, torch.float32, None, False),  # power of two, no ragged tails at all
    (1, 1, 1, 1, 8, torch.float32, None, False),  # degenerate: one query, one key, tiny head
    (1, 64, 77, 2, 80, torch.bfloat16, None, False),  # bf16: tiles upcast under the interpreter
    (1, 100, 77, 2, 40, torch.bfloat16, "qsplit3", False),  # dK/dV query sweep in 3 shares (cross-attention)
    (1, 70, 77, 1, 160, torch.float16, "qsplit5", False),  # 5 shares of 3 query blocks: two sweep nothing
    (1, 50, 40, 2, 40, torch.float16, "noalign", False),  # the A/B switch: no alignment hints
    (1, 50, 77, 2, 40, torch.float16, "tma", False),  # TMA descriptors: zero-filled key tail and columns
    (1, 45, 45, 1, 80, torch.bfloat16, "tma", True),  # ... on strided views, bf16
    (1, 33, 100, 1, 160, torch.float16, "ws", False),  # TMA + warp_specialize (the interpreter ignores the pass)
    (2, 77, 77, 2, 40, torch.float32, "atomic", True),  # one backward kernel, dQ by atomics: strided, odd
    (1, 100, 77, 1, 80, torch.bfloat16, "atomic", False),  # ... bf16, cross-attention length
    (1, 70, 50, 1, 160, torch.float16, "atomic", False),
    # SDXL's head dim 64: the tile is exactly D (no column masks), so only the row tails are masked. Coupled sets
    # (B, N·L, H, D) of images whose latents are not powers of two: N·L = 3·25 or 2·25 (5x5), 3·36 (6x6).
    (2, 75, 75, 1, 64, torch.float32, None, True),  # 2 sets of 3 images, strided views of one projection
    (2, 108, 108, 1, 64, torch.float16, None, False),  # 2 sets of 3 images, fp16
    (1, 100, 77, 1, 64, torch.float16, "qsplit3", False),  # cross-attention to 77 tokens, dK/dV in 3 shares
    (1, 50, 40, 1, 64, torch.float16, "noalign", False),
    (1, 50, 50, 2, 64, torch.float16, "tma", True),  # a set of 2, TMA on strided views: the key tail zero-filled
    (1, 33, 100, 1, 64, torch.float16, "ws", False),
    (2, 50, 50, 1, 64, torch.float32, "atomic", True),  # 2 sets of 2, one backward kernel
    (1, 100, 77, 1, 64, torch.float16, "atomic", False),
]


@pytest.mark.parametrize("B,Lq,Lk,H,D,dtype,variant,packed", CASES,
                         ids=[f"d{c[4]}-{c[1]}x{c[2]}-{str(c[5])[6:]}{'-' + c[6] if c[6] else ''}" for c in CASES])
def test_flash_attention_matches_fp64(B, Lq, Lk, H, D, dtype, variant, packed, monkeypatch):
    q, k, v = _inputs(B, Lq, Lk, H, D, dtype, packed)
    do = torch.randn(B, Lq, H, D, device=DEVICE, dtype=dtype).transpose(1, 2).contiguous().transpose(1, 2)
    # ^ upstream gradient in (B, H, L, D) memory order: the backward must honour its strides too.
    scale = 0.7 / math.sqrt(D)  # not the default, so a dropped scale shows
    if variant and variant.startswith("qsplit"):
        monkeypatch.setattr(flash_attn, "dkdv_q_splits", lambda *a: int(variant[6:]))
    opts = dict(warp_specialize=variant == "ws", tma=variant in ("tma", "ws"), atomic_dq=variant == "atomic",
                align_hint=variant != "noalign")

    got = _run(lambda q, k, v: flash_attn.flash_attention(q, k, v, scale, **opts), q, k, v, do)
    f64 = [_leaf(x, torch.float64) for x in (q, k, v)]
    ref = _run(lambda q, k, v: attention_reference(q, k, v, scale), *f64, do.double())
    # What torch's own SDPA gets wrong in the same dtype sets the bar.
    sd = _run(lambda q, k, v: kernels.sdpa_attention(q, k, v, scale), *[_leaf(x, dtype) for x in (q, k, v)], do)

    for name, g, r, s in zip(("out", "dq", "dk", "dv"), got, ref, sd):
        assert g.shape == r.shape and g.dtype == dtype, name
        assert not g.isnan().any(), f"{name}: NaN (unwritten or bad) elements, seed {SEED}"
        err = (g.double() - r).abs().max().item()
        err_sdpa = (s.double() - r).abs().max().item()
        tol = 2 * err_sdpa + EPS[dtype] * max(1.0, r.abs().max().item())
        assert err <= tol, f"{name}: max err {err:.3g} > {tol:.3g} (sdpa {err_sdpa:.3g}), seed {SEED}"


def test_dkdv_q_splits_heuristic():
    cpu = torch.device("cpu")  # one "SM": the heuristic's arithmetic without a GPU
    assert flash_attn.dkdv_q_splits(4096, 4096, 16, cpu) == 1  # self-attention: key blocks fill the SMs
    assert flash_attn.dkdv_q_splits(100, 77, 1, cpu) == 1  # short query sweep: nothing to split
    if DEVICE == "cuda":
        assert flash_attn.dkdv_q_splits(4096, 77, 64, torch.device("cuda")) > 1  # cross-attention, 8 images


def test_alignment_hint_conditions():
    x = torch.randn(2, 16, 3, 8, 40, device=DEVICE)  # packed (B, L, 3, H, D)
    assert flash_attn._aligned(*x.unbind(2))  # strides 960 / 320 / 40, offsets of 320 floats
    assert not flash_attn._aligned(torch.randn(2, 16, 8, 36, device=DEVICE))  # head stride 36
    assert not flash_attn._aligned(x[..., 1:33])  # pointer 4 bytes past a 16-byte boundary
    assert not flash_attn._aligned(x.transpose(-1, -2))  # last stride not 1


def test_only_requested_grads():
    # k without grad: the backward op computes dQ, dK, dV (one launch each); autograd drops dK.
    q, k, v = _inputs(1, 40, 24, 1, 40, torch.float32)
    k = k.detach()
    dq, dv = torch.autograd.grad(flash_attn.flash_attention(q, k, v).sum(), (q, v))
    qd, kd, vd = [x.detach().double().requires_grad_() for x in (q, k, v)]
    rq, rv = torch.autograd.grad(attention_reference(qd, kd, vd).sum(), (qd, vd))
    assert (dq.double() - rq).abs().max() < 1e-5 and (dv.double() - rv).abs().max() < 1e-5, f"seed {SEED}"


# numpy warns about the inf/NaN that padded key rows of the dK/dV kernel hold; those rows are never stored.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("atomic_dq", [False, True], ids=["two-kernel", "atomic-dq"])
def test_very_negative_scores(atomic_dq):
    # Every score around -600: lse (log2 units) < -128, so exp2(-lse) on a padded key would overflow to inf
    # and turn dQ into NaN unless padded keys are masked. Lk = 77 leaves a ragged key tail.
    q = (8 + 0.1 * torch.randn(1, 50, 2, 40, device=DEVICE)).requires_grad_()
    k = (-8 + 0.1 * torch.randn(1, 77, 2, 40, device=DEVICE)).requires_grad_()
    v = torch.randn(1, 77, 2, 40, device=DEVICE, requires_grad=True)
    do = torch.randn(1, 50, 2, 40, device=DEVICE)
    got = _run(lambda q, k, v: flash_attn.flash_attention(q, k, v, atomic_dq=atomic_dq), q, k, v, do)
    ref = _run(attention_reference, *[_leaf(x, torch.float64) for x in (q, k, v)], do.double())
    # Raw scores near -2600 carry fp32 rounding of ~2e-4 that exp2 turns into relative error in P; the
    # atomic kernel recomputes them as K Q^T (the forward's lse came from Q K^T), so its bar is looser.
    tol = 3e-4 if atomic_dq else 1e-4
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        err = (g.double() - r).abs().max().item()
        assert err <= tol * max(1.0, r.abs().max().item()), f"{name}: max err {err:.3g}, seed {SEED}"


def test_traceable_by_torch_compile():
    # A custom op (fake shapes + autograd rule): Dynamo traces a whole graph through it (fullgraph: no break),
    # forward and backward, and the compiled function computes what the eager one does.
    q, k, v = _inputs(1, 40, 24, 2, 40, torch.float32)
    do = torch.randn(1, 40, 2, 40, device=DEVICE)
    f = lambda q, k, v: flash_attn.flash_attention(q, k, v) * 2  # noqa: E731
    torch._dynamo.reset()
    got = _run(torch.compile(f, backend="aot_eager", fullgraph=True), q, k, v, do)
    ref = _run(f, *[_leaf(x, torch.float32) for x in (q, k, v)], do)
    for g, r in zip(got, ref):
        assert torch.equal(g, r), f"seed {SEED}"


def test_head_dim_tile():
    assert [flash_attn.head_dim_tile(d) for d in (8, 40, 64, 80, 160, 256)] == [16, 64, 64, 128, 256, 256]


def test_rejects_bad_inputs():
    q = torch.randn(1, 8, 1, 16, device=DEVICE)
    with pytest.raises(ValueError):
        flash_attn.flash_attention(q, q[:, :, :, :8], q)
    with pytest.raises(ValueError):
        flash_attn.flash_attention(q.double(), q.double(), q.double())
    with pytest.raises(ValueError):
        flash_attn.flash_attention(*[torch.randn(1, 4, 1, 320, device=DEVICE)] * 3)
    with pytest.raises(ValueError, match="positive"):
        flash_attn.flash_attention(q, q, q, scale=-1.0)


# ---------------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = flash_attn.flash_attention

    def wrapped(*a, **kw):
        calls.append("triton")
        return real(*a, **kw)
    monkeypatch.setattr(flash_attn, "flash_attention", wrapped)
    monkeypatch.delenv("JEDI_ATTN", raising=False)
    return calls


def test_dispatch_env_and_backend_argument(spy, monkeypatch):
    q, k, v = (torch.randn(2, 20, 2, 40, device=DEVICE) for _ in range(3))
    want = attention_reference(q, k, v)

    monkeypatch.setenv("JEDI_ATTN", "triton")
    out = kernels.attention(q, k, v)
    assert spy == ["triton"] and (out - want).abs().max() < 1e-5
    assert kernels.attention(q, k, v, backend="sdpa").allclose(kernels.sdpa_attention(q, k, v))
    assert spy == ["triton"]  # the argument beat the environment

    monkeypatch.setenv("JEDI_ATTN", "sdpa")
    assert kernels.attention(q, k, v).allclose(kernels.sdpa_attention(q, k, v))
    kernels.attention(q, k, v, backend="triton")
    assert spy == ["triton", "triton"]

    monkeypatch.setenv("JEDI_ATTN", "bogus")
    with pytest.raises(ValueError):
        kernels.attention(q, k, v)


def test_dispatch_auto(spy):
    # auto on CPU = SDPA; on a card, whatever its committed table says (an unmeasured card: SDPA).
    q = torch.randn(1, 8, 1, 16, device="cpu")
    assert kernels.resolve_backend(q, q, q, "auto") == "sdpa"
    assert kernels.resolve_backend(q, q, q, "triton") == "triton"
    kernels.attention(q, q, q)
    assert spy == []


def _table(entries, card="Test Card 9000"):
    return {"schema": 1, "card": card, "measured": {"date": "test"}, "entries": entries}


def _entry(**kw):
    e = dict(dtype="bf16", head_dim=40, lq=8192, lk=8192, direction="fwd", backend="triton",
             ms={"triton": 1.0, "sdpa": 1.5})
    e.update(kw)
    return e


@pytest.fixture
def table_dir(tmp_path, monkeypatch):
    from kernels import dispatch
    monkeypatch.setattr(dispatch, "TABLE_DIR", tmp_path)
    dispatch.table_for.cache_clear()
    yield tmp_path
    dispatch.table_for.cache_clear()


def test_dispatch_table_lookup(table_dir, monkeypatch):
    from kernels import dispatch
    (table_dir / "test-card-9000.json").write_text(json.dumps(_table(
        [_entry(), _entry(direction="train", backend="sdpa"), _entry(lq=4096, lk=128, backend="triton-ws")])))
    assert dispatch.card_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert dispatch.lookup("Test Card 9000", "bf16", 40, 8192, 8192, "fwd") == "triton"
    assert dispatch.lookup("Test Card 9000", "bf16", 40, 5000, 7000, "fwd") == "triton"  # same buckets
    assert dispatch.lookup("Test Card 9000", "bf16", 40, 8192, 8192, "train") == "sdpa"
    assert dispatch.lookup("Test Card 9000", "bf16", 40, 4096, 77, "fwd") == "triton-ws"  # cross-attention
    assert dispatch.lookup("Test Card 9000", "fp16", 40, 8192, 8192, "fwd") == "sdpa"  # not measured
    assert dispatch.lookup("Test Card 9000", "bf16", 40, 16384, 16384, "fwd") == "sdpa"
    assert dispatch.lookup("Some Other Card", "bf16", 40, 8192, 8192, "fwd") == "sdpa"  # no table
    # attention()'s "auto" on a CUDA tensor of that card (the card's name is all it asks the driver for)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Test Card 9000")
    assert kernels._auto("cuda", 0, str(torch.bfloat16), 40, 8192, 8192, "fwd") == "triton"
    assert kernels._auto("cuda", 0, str(torch.bfloat16), 40, 8192, 8192, "train") == "sdpa"
    assert kernels._auto("cuda", 0, str(torch.float32), 40, 8192, 8192, "fwd") == "sdpa"  # fp32: never measured
    assert kernels._auto("cpu", 0, str(torch.bfloat16), 40, 8192, 8192, "fwd") == "sdpa"


def test_dispatch_table_head_dim_64(table_dir, monkeypatch):
    # SDXL's fixed head dim: rows measured at D 64 load and answer SDXL's attn1 lengths (N images of 64x64 or
    # 32x32 latents at 1024 px, bucketed), its cross-attention (77 tokens); an unmeasured D 64 shape, and any
    # other head dim at the same lengths, fall back to SDPA (head dims are matched exactly, never bucketed).
    import json

    from kernels import dispatch
    (table_dir / "test-card-9000.json").write_text(json.dumps(_table([
        _entry(dtype="fp16", head_dim=64, lq=4096, lk=4096, backend="triton-tma"),
        _entry(dtype="fp16", head_dim=64, lq=16384, lk=16384, backend="triton"),
        _entry(dtype="bf16", head_dim=64, lq=16384, lk=16384, direction="train", backend="triton-atomic"),
        _entry(dtype="fp16", head_dim=64, lq=4096, lk=128, backend="triton-ws"),
        _entry(dtype="fp16", head_dim=40, lq=8192, lk=8192)])))
    look = lambda *a: dispatch.lookup("Test Card 9000", *a)  # noqa: E731
    assert look("fp16", 64, 4096, 4096, "fwd") == "triton-tma"  # one 64x64 image
    assert look("fp16", 64, 3 * 1024, 3 * 1024, "fwd") == "triton-tma"  # a set of 3 at 32x32: bucket 4096
    assert [look("fp16", 64, n * 4096, n * 4096, "fwd") for n in (3, 4)] == ["triton", "triton"]  # bucket 16384
    assert look("bf16", 64, 3 * 4096, 3 * 4096, "train") == "triton-atomic"
    assert look("fp16", 64, 4096, 77, "fwd") == "triton-ws"  # cross-attention to the 77 text tokens
    assert look("fp16", 64, 2 * 4096, 2 * 4096, "fwd") == "sdpa"  # bucket 8192: not measured
    assert look("bf16", 64, 4096, 4096, "fwd") == "sdpa"  # dtype not measured
    assert look("fp16", 64, 4096, 4096, "train") == "sdpa"  # direction not measured
    assert look("fp16", 80, 4096, 4096, "fwd") == look("fp16", 40, 4096, 4096, "fwd") == "sdpa"  # other head dims
    assert look("fp16", 40, 8192, 8192, "fwd") == "triton" and look("fp16", 64, 8192, 8192, "fwd") == "sdpa"
    # attention()'s "auto" on CUDA tensors of that card (the card's name is all it asks the driver for)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Test Card 9000")
    assert kernels._auto("cuda", 0, str(torch.float16), 64, 3 * 4096, 3 * 4096, "fwd") == "triton"
    assert kernels._auto("cuda", 0, str(torch.float16), 64, 1024, 1024, "fwd") == "sdpa"


BAD_TABLES = [
    (_table([_entry(), _entry(backend="cudnn")]), r"entries\[1\].*backend must be"),
    (_table([_entry(), _entry(lq=8000)]), r"entries\[1\].*power-of-two"),
    (_table([_entry(), _entry(direction="bwd")]), r"entries\[1\].*direction"),
    (_table([_entry(), _entry()]), r"entries\[1\].*duplicate"),
    (_table([_entry(), {"dtype": "bf16"}]), r"entries\[1\].*missing"),
    (_table([_entry(ms={"triton": -1})]), r"entries\[0\].*ms must"),
    (_table([_entry(head_dim="40")]), r"entries\[0\].*head_dim"),
    ({**_table([]), "schema": 2}, r"'schema' must be 1"),
    (_table([], card="Another Card"), r"'card' is 'Another Card'"),
]


@pytest.mark.parametrize("table,message", BAD_TABLES, ids=[m.split(".*")[-1].strip("\\'") for _, m in BAD_TABLES])
def test_malformed_dispatch_table(table_dir, table, message):
    from kernels import dispatch
    path = table_dir / "test-card-9000.json"
    path.write_text(json.dumps(table))
    with pytest.raises(ValueError, match=message) as info:
        dispatch.lookup("Test Card 9000", "bf16", 40, 8192, 8192, "fwd")
    assert str(path) in str(info.value) and "\n" not in str(info.value)  # one line, naming the file


def test_unreadable_dispatch_table(table_dir):
    from kernels import dispatch
    (table_dir / "test-card-9000.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable JSON"):
        dispatch.lookup("Test Card 9000", "bf16", 40, 8192, 8192, "fwd")


def test_record_backends(spy):
    q = torch.randn(1, 20, 2, 40, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 77, 2, 40, device=DEVICE)
    with kernels.record_backends() as used:
        kernels.attention(q, k, k, backend="sdpa")
        kernels.attention(q, k, k, backend="triton")
        with torch.no_grad():
            kernels.attention(q, k, k, backend="sdpa")
            kernels.attention(q, k, k, backend="sdpa")
    kernels.attention(q, k, k, backend="sdpa")  # outside: not counted
    U = kernels.BackendUse
    assert used == {U("sdpa", 40, 32, 128, "train"): 1, U("triton", 40, 32, 128, "train"): 1,
                    U("sdpa", 40, 32, 128, "fwd"): 2}


MODELS = {
    # SD-1.x-like: fixed head count, head dims 40 and 80; sets of 2 images of 8x8 latents, 7 text tokens
    "sd1-d40-d80": (dict(model_channels=40, channel_mult=(1, 2), attention_resolutions=(1, 2), num_res_blocks=1,
                         num_heads=1, context_dim=16, norm_groups=8), 8, 2, {40, 80}),
    # SDXL-like: fixed head dim 64 (2 heads), attention only at factor 2, linear proj, vector input y; sets of 3
    # images of 6x6 latents, so attn1 sees N·L = 3·9 tokens at 3x3 (not a power of two)
    "sdxl-d64": (dict(model_channels=64, channel_mult=(1, 2), attention_resolutions=(2,), num_res_blocks=1,
                      num_head_channels=64, transformer_depth=(0, 1), context_dim=16, use_linear_proj=True,
                      adm_in_channels=12, norm_groups=8), 6, 3, {64}),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_model_same_output_either_backend(spy, monkeypatch, name):
    # A tiny coupled UNet: forward and input gradient agree between SDPA and the Triton kernel, every attention
    # layer (attn1 and attn2 of each block) runs on the kernel, at the head dims the flavour has.
    from model.conditioning import Cond
    from model.unet import CrossAttention, UNet, UNetConfig
    kw, hw, n, head_dims = MODELS[name]
    cfg = UNetConfig(**kw)
    net = UNet(cfg).to(DEVICE)
    torch.nn.init.normal_(net.out[-1].weight, std=0.02)  # zero-initialised output conv would hide differences
    x = torch.randn(2 * n, cfg.in_channels, hw, hw, device=DEVICE)  # 2 sets of n images
    t = torch.randint(0, 1000, (2,), device=DEVICE)
    y = torch.randn(2 * n, cfg.adm_in_channels, device=DEVICE) if cfg.adm_in_channels else None
    cond = Cond(torch.randn(2 * n, 7, 16, device=DEVICE), y)
    res = {}
    for backend in ("sdpa", "triton"):
        monkeypatch.setenv("JEDI_ATTN", backend)
        xi = x.clone().requires_grad_()
        with kernels.record_backends() as used:
            out = net(xi, t, cond, set_size=n)
        res[backend] = (out, torch.autograd.grad(out.square().sum(), xi)[0])
        n_attn = sum(isinstance(m, CrossAttention) for m in net.modules())  # attn1 and attn2 of each block
        assert len(spy) == (0 if backend == "sdpa" else n_attn)
        assert {u.head_dim for u in used} == head_dims and sum(used.values()) == n_attn
    for a, b in zip(res["sdpa"], res["triton"]):
        assert (a - b).abs().max() <= 1e-4 * max(1.0, a.abs().max().item()), f"seed {SEED}"


# ---------------------------------------------------------------------------------------------------------
# Benchmark and GPU suite must not rot
# ---------------------------------------------------------------------------------------------------------
def _sub_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TRITON_INTERPRET="1")
    env.pop("JEDI_ATTN", None)
    return env


def test_bench_cpu_smoke(tmp_path):
    out = tmp_path / "bench.md"
    r = subprocess.run([sys.executable, "bench/bench_attention.py", "--cpu-smoke", "--out", str(out)], cwd=ROOT,
                       env=_sub_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    text = out.read_text()
    # every table row: triton's and sdpa's TFLOP/s, and their ratio computed from them
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| 1 |")]
    assert len(rows) == 2, text  # forward and backward
    for cells in rows:
        triton, sdpa, ratio = (c.strip() for c in cells[5:8])
        assert float(triton) > 0 and float(sdpa) > 0 and ratio == f"{float(triton) / float(sdpa):.2f}x", cells


# bench/check_attention_cuda.py run with flash_attention's output 1% off (its gradients follow): the check must fail it.
OFF_BY_ONE_PERCENT = """import runpy, sys
from kernels import flash_attn
real = flash_attn.flash_attention
flash_attn.flash_attention = lambda *a, **kw: real(*a, **kw) * 1.01
sys.argv = ["check_attention_cuda.py", "--cpu-smoke", "--out", sys.argv[1]]
runpy.run_path("bench/check_attention_cuda.py", run_name="__main__")
"""


def test_cuda_check_cpu_smoke(tmp_path):
    """The GPU correctness check's whole path on CPU: every case gets a row of four errors within the rule's bar, and
    the same check fails a kernel 1% off (a check that cannot fail would pass any kernel on the GPU)."""
    def check(*cmd):
        out = tmp_path / "check.md"
        r = subprocess.run([sys.executable, *cmd, str(out)], cwd=ROOT, env=_sub_env(), capture_output=True,
                           text=True, timeout=120)
        rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.read_text().splitlines()
                if line.startswith("| 1 |")]
        return r, rows, out.read_text()

    r, rows, text = check("bench/check_attention_cuda.py", "--cpu-smoke", "--out")
    assert r.returncode == 0, r.stdout + r.stderr
    assert [row[:6] for row in rows] == [["1", "40", "77", "40", "fp16", "triton"],
                                         ["1", "50", "50", "80", "fp32", "triton strided"]], text
    for row in rows:  # triton's error / SDPA's in the same dtype, for out, dq, dk, dv
        errors = [[float(x) for x in cell.split(" / ")] for cell in row[6:10]]
        assert row[10] == "ok" and all(0 < t < 1e-2 and 0 < s < 1e-2 for t, s in errors), row
    assert "- 0 failing rows" in text
    r, rows, text = check("-c", OFF_BY_ONE_PERCENT)
    assert r.returncode == 1, r.stdout + r.stderr
    assert [row[10] for row in rows] == ["FAIL", "FAIL"]
    assert all(row[6].endswith("FAIL") for row in rows) and "- 2 failing rows" in text, text


def test_compile_only_all_covers_every_head_dim():
    # `--compile-only all` (what docs/kernel.md's PTX tables come from) compiles every autotune config of every kernel
    # at SD-1.x's head dims and SDXL's 64 (TMA forward and atomic-dQ backward included), at the model's heads.
    sys.path.insert(0, str(ROOT / "bench"))
    import check_attention_cuda as cac
    jobs = cac.compile_jobs("all")
    for d in (40, 80, 160, 64):
        tile = flash_attn.head_dim_tile(d)
        for kind in ("fwd", "dkdv", "dq"):
            plain = {j[3] for j in jobs if j[:3] == (kind, "fp16", d) and j[6] and len(j) == 7}
            assert plain == set(flash_attn._TABLES[kind][tile]), (kind, d)
            extra = {j[3] for j in jobs if j[:3] == (kind, "fp16", d) and len(j) == 8}
            assert extra == (set() if kind == "dq" else plain), (kind, d)  # TMA forward, atomic-dQ backward
    assert {j[2] for j in jobs if not j[6]} == {40}  # the no-hint A/B at D 40 only
    assert cac.COMPILE_HEADS.get(64) == 10 and any(j[2] == 64 and j[1] == "bf16" for j in cac.compile_jobs("quick"))


def test_kernels_compile_for_sm90():
    # The interpreter runs the kernels as Python, so it cannot catch what only the compiler rejects; compile a
    # few variants (masks, split, fp32/bf16) for an H100 with the wheel's ptxas. No GPU needed.
    env = _sub_env()
    env.pop("TRITON_INTERPRET")
    r = subprocess.run([sys.executable, "bench/check_attention_cuda.py", "--compile-only", "quick"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "0 compile failures" in r.stdout, r.stdout + r.stderr


def test_kernel_sweep_cpu_smoke(tmp_path):
    # The sweep's whole Python path at a tiny size under the interpreter, SD-1.x's and SDXL's head dims (the lease's
    # models): correctness first, timing, tables, and a dispatch table that kernels/dispatch accepts.
    from kernels import dispatch
    r = subprocess.run([sys.executable, "bench/kernel_sweep.py", "--cpu-smoke", "--dtypes", "fp16", "--models",
                        "sd1,sdxl@512", "--out", str(tmp_path)], cwd=ROOT, env=_sub_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    text = (tmp_path / "kernel_sweep.md").read_text()
    assert "fp16 forward (TFLOP/s)" in text and "triton-atomic" in text and "| wrong" not in text
    assert "| self | 1 | 2 | 32 | 32 | 64 | sdxl@512 N=2 |" in text  # B, H, Lq, Lk, D, where the model runs it
    assert "| cross | 1 | 2 | 16 | 13 | 40 | sd1@512 |" in text
    card, entries = dispatch.load(tmp_path / "dispatch" / "cpu-interpreter-smoke.json")
    assert card == "CPU interpreter smoke"
    assert {k[4] for k in entries} == {"fwd", "train"} and {k[:4] for k in entries} == \
        {("fp16", d, lq, lq) for d in (40, 64) for lq in (32, 16)}  # self and cross buckets (Lk 13 -> 16) per D
    assert "git:" in (tmp_path / "SUMMARY.md").read_text()
    # every timed cell is 4*B*H*Lq*Lk*D FLOPs (backward 2.5x) over the time the dispatch table records for its
    # bucket (one shape per bucket here): forward over the forward's ms, backward over (train - forward) ms. Compared
    # as times: a backward timed at ~0 (clamped to 1e-6 ms) has an unbounded rate but a time the table resolves.
    ms = {(e["head_dim"], e["lq"], e["direction"]): e["ms"] for e in json.loads(
        (tmp_path / "dispatch" / "cpu-interpreter-smoke.json").read_text())["entries"]}
    for direction in ("forward", "backward"):
        table = text.split(f"### fp16 {direction}")[1].split("###")[0]
        head = [c.strip() for c in table.splitlines()[2].strip("|").split("|")]
        rows = [dict(zip(head, (c.strip() for c in line.strip("|").split("|"))))
                for line in table.splitlines()[4:] if line.startswith("| ")]
        assert [r["kind"] for r in rows] == ["self", "self", "cross", "cross"]
        for r in rows:
            b, h, lq, lk, d = (int(r[k]) for k in ("B", "H", "Lq", "Lk", "D"))
            flop = 4 * b * h * lq * lk * d * (2.5 if direction == "backward" else 1)
            bucket = 1 << (lq - 1).bit_length()
            for name in ("triton", "sdpa"):
                fwd, train = ms[d, bucket, "fwd"][name], ms[d, bucket, "train"][name]
                shown_ms = flop / (float(r[name]) * 1e12) * 1e3  # the time the cell's TFLOP/s stands for
                want = train - fwd if direction == "backward" else fwd  # the table's values have 4 digits
                assert shown_ms == pytest.approx(want, rel=2e-3, abs=1e-3 * train), (direction, name, r, want)
            ours = max(float(r[k]) for k in head[head.index("triton"):head.index("sdpa")]  # our variants' cells ...
                       if k != "triton-noalign" and r[k])  # ... but the A/B switch; blank: not run at this shape
            assert r["best ours / best sdpa"] == f"{ours / float(r['sdpa']):.2f}x"


def test_kernel_sweep_shapes_are_the_models_own():
    # The sweep's shapes come from each model's full-size UNet (a meta-device forward), with its heads: SD-1.x's are
    # the four levels the sweep always measured (8 heads, D 40/80/160/160), SDXL's the D 64 levels with 10 and 20
    # heads; the lease's cut (sd1,sdxl@512, N = 2 and 4) holds SDXL's shapes at 512 px, SD-1.x's yardsticks first,
    # then SDXL's top level, cross-attention last; a shape two uses share is measured once.
    sys.path.insert(0, str(ROOT / "bench"))
    import kernel_sweep as ks
    assert ks.attention_levels("sd1", 512) == (((4096, 8, 40), (1024, 8, 80), (256, 8, 160), (64, 8, 160)),
                                               ((4096, 77, 8, 40), (1024, 77, 8, 80), (256, 77, 8, 160),
                                                (64, 77, 8, 160)))
    assert ks.attention_levels("sdxl", 1024) == (((4096, 10, 64), (1024, 20, 64)), ((4096, 77, 10, 64),
                                                                                   (1024, 77, 20, 64)))
    assert ks.attention_levels("sdxl", 512) == (((1024, 10, 64), (256, 20, 64)), ((1024, 77, 10, 64),
                                                                                 (256, 77, 20, 64)))
    assert ks.parse_models("sd1, sdxl,sdxl@512") == [("sd1", 512), ("sdxl", 1024), ("sdxl", 512)]
    for bad, msg in (("sd3", "unknown model 'sd3'"), ("sdxl@500", "multiple of 64"), ("sdxl@", "multiple of 64"),
                     (",", "comma list")):
        with pytest.raises(ValueError, match=msg):
            ks.parse_models(bad)

    lease = [s[:6] for s in ks.shapes(ks.parse_models("sd1,sdxl@512"), (2, 4))]
    assert lease == [("self", 2, 8192, 8192, 8, 40), ("self", 2, 16384, 16384, 8, 40),
                     ("self", 2, 2048, 2048, 8, 80), ("self", 2, 4096, 4096, 8, 80), ("self", 2, 512, 512, 8, 160),
                     ("self", 2, 2048, 2048, 10, 64), ("self", 2, 4096, 4096, 10, 64),
                     ("self", 2, 1024, 1024, 8, 160), ("self", 2, 128, 128, 8, 160), ("self", 2, 256, 256, 8, 160),
                     ("self", 2, 512, 512, 20, 64), ("self", 2, 1024, 1024, 20, 64),
                     ("cross", 8, 4096, 77, 8, 40), ("cross", 8, 1024, 77, 8, 80), ("cross", 8, 256, 77, 8, 160),
                     ("cross", 8, 64, 77, 8, 160), ("cross", 8, 1024, 77, 10, 64), ("cross", 8, 256, 77, 20, 64)]
    both = {s[:6]: s.uses for s in ks.shapes(ks.parse_models("sdxl@512,sdxl"))}
    assert both[("self", 2, 4096, 4096, 10, 64)] == ("sdxl@512 N=4", "sdxl@1024 N=1")
    assert both[("self", 2, 1024, 1024, 20, 64)] == ("sdxl@512 N=4", "sdxl@1024 N=1")
    assert len(both) == 18  # 2 x 2 levels x 4 N, less the 2 shared, and 4 cross


def test_kernel_sweep_rejects_a_wrong_variant():
    # Correctness comes first in the sweep: a variant 1% off in its output, or one that raises, gets a verdict
    # (and so is never timed); the real kernel passes.
    sys.path.insert(0, str(ROOT / "bench"))
    import kernel_sweep
    q, k, v, do = kernel_sweep.inputs(torch, 1, 40, 24, 8, 40, torch.float16, DEVICE, seed=0)

    def broken(q, k, v):
        raise RuntimeError("no kernel")
    verdict = kernel_sweep.check(torch, {"triton": flash_attn.flash_attention,
                                         "off": lambda q, k, v: kernels.sdpa_attention(q, k, v) * 1.01,
                                         "broken": broken}, q, k, v, do, "fp16")
    assert verdict["triton"] is None, verdict
    assert "out err" in verdict["off"] and "no kernel" in verdict["broken"], verdict


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU failure path")
@pytest.mark.parametrize("script", ["gpu_suite.sh", "gpu_kernel_sweep.sh"])
def test_gpu_scripts_fail_fast_without_cuda(tmp_path, script):
    t = time.time()
    r = subprocess.run(["bash", f"bench/{script}", str(tmp_path / "out")], cwd=ROOT, env=_sub_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "CUDA" in r.stderr, r.stdout + r.stderr
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert time.time() - t < 60


def test_committed_and_sweep_written_dispatch_tables_load(tmp_path, monkeypatch):
    """Every table committed under kernels/dispatch/ loads, is filed under its card's name, and the dispatcher
    returns its choices (no table committed: every card gets SDPA). And a table written by the sweep's own writer
    (bench/kernel_sweep.write, from measured rows) loads back through kernels.dispatch to the fastest backend per
    shape bucket: the sweep cannot write a table the dispatcher refuses or reads otherwise."""
    import types

    from kernels import dispatch
    committed = sorted(dispatch.TABLE_DIR.glob("*.json"))
    dispatch.table_for.cache_clear()
    for path in committed:
        card, entries = dispatch.load(path)
        assert path.name == f"{dispatch.card_slug(card)}.json", path
        assert entries and all(dispatch.lookup(card, *key) == backend for key, backend in entries.items()), path
    if not committed:  # no measured card: auto is SDPA everywhere, and no stray file stands in for a table
        assert [p.name for p in dispatch.TABLE_DIR.iterdir() if p.suffix != ".py" and p.name != "__pycache__"] == []
        assert dispatch.table_for("NVIDIA H100 80GB HBM3") is None
        assert dispatch.lookup("NVIDIA H100 80GB HBM3", "bf16", 40, 8192, 8192, "fwd") == "sdpa"

    sys.path.insert(0, str(ROOT / "bench"))
    import kernel_sweep

    def row(kind, b, lq, lk, h, d, uses, ms):  # ms: {variant: (forward ms, backward ms)}, as the sweep measures them
        return dict(dtype="bf16", kind=kind, b=b, h=h, lq=lq, lk=lk, d=d, uses=uses, verdict={k: None for k in ms},
                    ms=ms, no_graph=[])
    rows = [row("self", 2, 8192, 8192, 8, 40, ("sd1@512 N=2",),
                {"triton": (1.0, 3.0), "triton-ws": (1.2, 3.0), "sdpa": (2.0, 1.5)}),
            row("cross", 8, 4096, 77, 8, 40, ("sd1@512",),
                {"triton": (0.5, 0.5), "triton-ws": (0.3, 0.5), "sdpa": (0.6, 0.1)}),
            row("self", 2, 512, 512, 8, 160, ("sd1@512 N=2",),
                {"triton": (0.99, 1.0), "sdpa": (1.0, 1.0)}),  # within the 2 % margin
            # SDXL: a set of 3 images of 64x64 latents at D 64, 10 heads (N·L = 12288, bucket 16384)
            row("self", 2, 3 * 4096, 3 * 4096, 10, 64, ("sdxl@1024 N=3",), {"triton": (2.0, 5.0), "sdpa": (3.0, 5.0)})]
    out = tmp_path / "sweep"
    kernel_sweep.write(types.SimpleNamespace(out=out), ["# test"], rows, [], [], "Test Card 9000", ["bf16"],
                       {"measure": 1.0}, done=True)
    written = out / "dispatch" / "test-card-9000.json"
    assert json.loads(written.read_text())["card"] == "Test Card 9000"
    # TFLOP/s at the model's heads: 4·B·H·L²·D / 2 ms forward with H = 10 (not a fixed 8), backward 2.5x / 5 ms
    lines = (out / "kernel_sweep.md").read_text().splitlines()
    sdxl = [ln.split(" | ") for ln in lines if ln.startswith("| self | 2 | 10 | 12288 | 12288 | 64 | sdxl@1024 N=3 |")]
    fwd, bwd = 4 * 2 * 10 * 12288 ** 2 * 64 / 2e-3 / 1e12, 2.5 * 4 * 2 * 10 * 12288 ** 2 * 64 / 5e-3 / 1e12
    assert [float(c[7]) for c in sdxl] == [float(f"{fwd:.4g}"), float(f"{bwd:.4g}")], sdxl
    monkeypatch.setattr(dispatch, "TABLE_DIR", written.parent)  # as if committed
    dispatch.table_for.cache_clear()
    try:
        want = {(40, 8192, 8192, "fwd"): "triton", (40, 8192, 8192, "train"): "sdpa",  # 4.0 ms vs 3.5 ms
                (40, 4096, 77, "fwd"): "triton-ws", (40, 4096, 77, "train"): "sdpa",  # 0.8 vs 0.7
                (160, 512, 512, "fwd"): "sdpa", (160, 512, 512, "train"): "sdpa",
                (64, 16384, 16384, "fwd"): "triton", (64, 12288, 12288, "train"): "triton"}  # 7 ms vs 8 ms
        got = {(d, lq, lk, direction): dispatch.lookup("Test Card 9000", "bf16", d, lq, lk, direction)
               for d, lq, lk, direction in want}
        assert got == want
        assert dispatch.lookup("Test Card 9000", "fp16", 40, 8192, 8192, "fwd") == "sdpa"  # not measured
        assert dispatch.lookup("Test Card 9000", "bf16", 40, 16384, 16384, "fwd") == "sdpa"  # only D 64 there
    finally:
        dispatch.table_for.cache_clear()


def test_backend_summary_groups_calls_by_backend_direction_and_head_dim():
    from kernels import BackendUse, backend_summary
    counts = {BackendUse("sdpa", 40, 8192, 8192, "fwd"): 2, BackendUse("sdpa", 80, 2048, 2048, "fwd"): 3,
              BackendUse("triton", 40, 8192, 8192, "fwd"): 1, BackendUse("sdpa", 40, 8192, 128, "fwd"): 1}
    assert backend_summary(counts) == "sdpa fwd D40×3 D80×3; triton fwd D40×1"
    assert backend_summary({}) == ""
    q = torch.randn(1, 16, 2, 8)
    with kernels.record_backends() as used:
        kernels.attention(q, q, q)
    assert backend_summary(used) == "sdpa fwd D8×1"  # CPU: auto is SDPA
