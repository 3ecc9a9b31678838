"""The GPU image's package set, simulated on CPU: what `--cpu-smoke` runs of the GPU scripts import through.

bench/gpu_env.sh puts this folder first on PYTHONPATH and sets JEDI_GPU_IMAGE to bench/gpu_image_packages.txt when a
script runs with --cpu-smoke; Python imports `sitecustomize` at start-up, in every interpreter the script starts
(train.py, its loader workers, the sweep's compile workers). From then on a top-level module that would come from
this interpreter's site-packages imports only if its distribution is on the image's list, or is required by one
that is (as installed here: their versions differ from the image's, and so can their requirements): the rest are
not found (ModuleNotFoundError; importlib.util.find_spec gives None, as packages probing for optional ones expect),
as on the GPU machine. Modules found elsewhere on sys.path (the repository, the carried wheels
that gpu_env.sh unpacked) and the standard library import as usual. Only presence is simulated, not the versions.
"""
import importlib.machinery
import os
import re
import site
import sys


class GPUImageFinder:
    """Stands in for importlib's PathFinder on sys.meta_path: finds what PathFinder finds, less the top-level modules
    the image lacks."""

    def __init__(self, listing):
        with open(listing) as f:
            self.image = {_norm(line.split()[0]) for line in f if line.strip() and not line.startswith("#")}
        self.site_dirs = tuple(os.path.realpath(p) + os.sep for p in
                               site.getsitepackages() + [site.getusersitepackages()])
        # a module's owner: the top-level entry of site-packages it lives in (setuptools/_vendor/jaraco is setuptools')
        self.dists = None  # top-level module -> distributions, read on first need (it scans every installed one)
        self.busy = False  # reading the metadata imports packages too: they pass

    def invalidate_caches(self):
        importlib.machinery.PathFinder.invalidate_caches()

    def _owner(self, where):
        """The top-level name under site-packages that `where` belongs to, or None outside site-packages."""
        where = os.path.realpath(str(where)) if where is not None else ""
        for d in self.site_dirs:
            if where.startswith(d):
                return where[len(d):].split(os.sep)[0].split(".")[0]
        return None

    def _read_metadata(self):
        if self.dists is None:
            self.busy = True  # reading it imports packages and lists distributions: those calls see everything
            try:
                from importlib.metadata import packages_distributions
                self.dists, self.allowed = packages_distributions(), _with_requirements(self.image)
            finally:
                self.busy = False

    def find_spec(self, name, path=None, target=None):
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or path is not None or name in sys.stdlib_module_names or self.busy:
            return spec  # submodules follow their package; the standard library is everywhere
        where = spec.origin if spec.has_location else (list(spec.submodule_search_locations or []) or [None])[0]
        owner = self._owner(where)
        if owner is None:
            return spec  # not installed here: the repository, a carried wheel
        self._read_metadata()
        dists = self.dists.get(owner)
        if not dists or any(_norm(d) in self.allowed for d in dists):
            return spec  # on the image, or files no distribution claims by that name
        return None  # not on the image

    def find_distributions(self, *args, **kwargs):
        """importlib.metadata's view (version probes): the distributions installed here that the image lacks are
        left out too."""
        dists = importlib.machinery.PathFinder.find_distributions(*args, **kwargs)
        if self.busy:
            return dists
        self._read_metadata()
        return (d for d in dists if self._owner(getattr(d, "_path", None)) is None
                or _norm(d.metadata["Name"] or "") in self.allowed)


def _norm(dist):
    return re.sub(r"[-_.]+", "-", dist).lower()


def _with_requirements(dists):
    """dists and everything they require, transitively, as installed here (extras left out)."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import InvalidRequirement, Requirement
    todo, seen = list(dists), set()
    while todo:
        d = todo.pop()
        if d in seen:
            continue
        seen.add(d)
        try:
            requires = distribution(d).requires or []
        except PackageNotFoundError:
            continue
        for r in requires:
            try:
                req = Requirement(r)
            except InvalidRequirement:
                continue
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(_norm(req.name))
    return seen


if os.environ.get("JEDI_GPU_IMAGE"):
    sys.meta_path[:] = [GPUImageFinder(os.environ["JEDI_GPU_IMAGE"]) if f is importlib.machinery.PathFinder else f
                        for f in sys.meta_path]
