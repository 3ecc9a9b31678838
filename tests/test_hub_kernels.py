"""The project beside the Hugging Face hub's `kernels` distribution (issue 26).

transformers imports the hub's `kernels` when a version in its supported range is installed (>= 5.25 requires
it). With the repository root on sys.path, `import kernels` finds our kernels/ package, which serves the hub's
names and submodules too (kernels/__init__.py). A stand-in distribution that importlib.metadata sees, at a
version in the range the installed transformers accepts, plays the hub package here.
"""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What transformers' integrations/hub_kernels.py imports from `kernels` (5.24 and 5.25 alike).
HUB_NAMES = ["CUDAProperties", "Device", "KernelizeFallback", "LayerRepository", "LocalLayerRepository", "Mode",
             "ROCMProperties", "register_kernel_mapping", "replace_kernel_forward_from_hub", "use_kernel_mapping",
             "get_kernel", "kernelize", "use_kernel_forward_from_hub", "use_kernelized_func"]


def _accepted_version() -> str:
    """A version of `kernels` the installed transformers imports (inside its [min, max) range)."""
    from transformers.utils import import_utils

    lo = getattr(import_utils, "KERNELS_MIN_VERSION", None)
    if lo is None:
        pytest.skip("this transformers has no hub-kernels integration")
    major, minor, patch = (int(x) for x in lo.split(".")[:3])
    return f"{major}.{minor}.{patch + 1}"


def _standin(tmp_path, version: str, extra_module: str | None = None) -> str:
    """A site folder with a `kernels` distribution: dist-info metadata plus a package whose __init__ imports its
    names from a private submodule with an absolute import, as the hub's does (`from kernels._internals ...`)."""
    site = tmp_path / "site"
    pkg = site / "kernels"
    pkg.mkdir(parents=True)
    info = site / f"kernels-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kernels\nVersion: {version}\n")
    (info / "RECORD").write_text("")
    body = ["CALLS = []"]
    for name in HUB_NAMES:
        if name[0].isupper():
            body.append(f"class {name}:\n    pass")
        else:
            body.append(f"def {name}(*args, **kwargs):\n    CALLS.append({name!r})\n    return lambda obj: obj")
    (pkg / "_standin_internals.py").write_text("\n\n".join(body) + "\n")
    (pkg / "__init__.py").write_text(
        "import importlib.metadata\n__version__ = importlib.metadata.version('kernels')\n"
        f"from kernels._standin_internals import CALLS, {', '.join(HUB_NAMES)}\n")
    if extra_module:
        (pkg / f"{extra_module}.py").write_text("")
    return str(site)


def _run(site: str, code: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": site, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args] if args else [sys.executable, "-c", textwrap.dedent(code)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_transformers_and_our_attention_share_the_name(tmp_path):
    version = _accepted_version()
    site = _standin(tmp_path, version)
    r = _run(site, """
        import torch
        from transformers.utils import is_kernels_available
        assert is_kernels_available(), "the stand-in is not in the range transformers imports"
        import transformers.integrations.hub_kernels as hk   # runs `from kernels import CUDAProperties, ...`
        import kernels
        assert hk.CUDAProperties is kernels.CUDAProperties
        assert kernels.CUDAProperties.__module__ == "kernels._standin_internals"   # the hub's file, not ours
        import importlib.metadata
        assert kernels.__version__ == importlib.metadata.version("kernels") == STANDIN_VERSION  # via ours
        from transformers.models.llama import modeling_llama  # decorated with use_kernel_forward_from_hub(...)
        assert "use_kernel_forward_from_hub" in kernels.CALLS, kernels.CALLS  # the hub's decorator was called
        from kernels import attention, reference            # ours, unchanged
        q, k, v = (torch.randn(1, 16, 2, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
        torch.testing.assert_close(attention(q, k, v), reference.attention_reference(q, k, v), rtol=1e-5, atol=1e-5)
        print("ok")
    """.replace("STANDIN_VERSION", repr(version)))
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_sample_entry_point_runs_beside_it(tmp_path):
    """The README's toy command (fewer steps) with the hub package installed beside the project."""
    site = _standin(tmp_path, _accepted_version())
    out = tmp_path / "samples"
    r = _run(site, None, "sample.py", "--prompt", "a toy on the beach", "a toy in the snow", "--steps", "4",
             "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "grid.png").is_file()


def test_a_hub_submodule_we_also_have_is_refused_in_one_line(tmp_path):
    site = _standin(tmp_path, _accepted_version(), extra_module="dispatch")
    r = _run(site, "import kernels")
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "HubKernelsClash" in last and "dispatch" in last and "pip uninstall kernels" in last, last


def test_this_environment_either_way():
    """Without the hub package (a venv from the ranges, transformers < 5.25) our module is just ours; with it (the
    lock: transformers 5.25 requires it) the hub's names come from its own files and ours stay ours."""
    import kernels

    if kernels._HUB is None:
        with pytest.raises(AttributeError, match="CUDAProperties"):
            kernels.CUDAProperties
        return
    import transformers.integrations.hub_kernels as hk

    assert kernels.CUDAProperties is hk.CUDAProperties
    assert kernels.CUDAProperties.__module__.startswith("kernels._internals")  # the hub's file
    assert kernels.attention.__module__ == "kernels" and kernels.dispatch.__file__.startswith(str(kernels._OURS))
    assert kernels.__version__ == __import__("importlib.metadata").metadata.version("kernels")
