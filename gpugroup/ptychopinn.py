"""PtychoPINN on gpugroup with no code change (DESIGN.md section 6).

:func:`patch` points an installed PtychoPINN's ``ptycho.raw_data.RawData`` (and every
module's imported ``RawData`` name) at :class:`gpugroup.RawData`; :func:`unpatch` undoes
it; ``python -m gpugroup.ptychopinn SCRIPT [ARGS]`` runs a script patched. The
module-level names PtychoPINN code imports from ``ptycho.raw_data`` are here too, in
NumPy only (no TensorFlow), with PtychoPINN's values.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import logging
import os
import runpy
import sys

import numpy as np
from scipy.spatial import cKDTree

from gpugroup import assembly
from gpugroup.rawdata import RawData, resolve_gridsize

logger = logging.getLogger(__name__)

__all__ = [
    "get_image_patches",
    "get_neighbor_indices",
    "get_relative_coords",
    "is_patched",
    "key_coords_offsets",
    "key_coords_relative",
    "local_offset_sign",
    "main",
    "normalize_data",
    "patch",
    "unpatch",
]

#: PtychoPINN's constants in ``ptycho.raw_data``: the sign of ``coords_relative`` and the
#: grouped-dict keys its loader reads the coordinates from.
local_offset_sign = -1
key_coords_offsets = "coords_start_offsets"
key_coords_relative = "coords_start_relative"

#: The module PtychoPINN defines its RawData in.
TARGET = "ptycho.raw_data"
#: PtychoPINN's top-level packages (unpatch() restores their RawData names).
PTYCHOPINN_PACKAGES = ("ptycho", "ptycho_torch", "scripts")

# (module name, attribute) -> the object patch() replaced there
_replaced: dict = {}
_finder = None


# ----------------------------------------------------------------------------- helpers
def get_relative_coords(coords_nn):
    """``(coords_offsets, coords_relative)`` of grouped coordinates (M, 1, 2, C).

    ``coords_offsets`` is the mean over the C members (M, 1, 2, 1) and
    ``coords_relative = local_offset_sign * (coords_nn - coords_offsets)``.

    Raises
    ------
    ValueError
        ``coords_nn`` is not 4-D.

    Examples
    --------
    >>> import numpy as np
    >>> from gpugroup.ptychopinn import get_relative_coords
    >>> off, rel = get_relative_coords(np.array([[[[0.0, 2.0], [1.0, 3.0]]]]))
    >>> off.ravel().tolist(), rel.ravel().tolist()
    ([1.0, 2.0], [1.0, -1.0, 1.0, -1.0])
    """
    coords_nn = np.asarray(coords_nn)
    if coords_nn.ndim != 4:
        raise ValueError(f"coords_nn must be 4-D (M, 1, 2, C), got shape {coords_nn.shape}")
    offsets = np.mean(coords_nn, axis=3)[..., None]
    return offsets, local_offset_sign * (coords_nn - offsets)


def get_neighbor_indices(xcoords, ycoords, K=3):
    """(n, K + 1) indices of each position's K + 1 nearest positions (itself included,
    usually first), by ``scipy.spatial.cKDTree``.

    Examples
    --------
    >>> import numpy as np
    >>> from gpugroup.ptychopinn import get_neighbor_indices
    >>> get_neighbor_indices(np.array([0.0, 1.0, 5.0]), np.zeros(3), K=1).tolist()
    [[0, 1], [1, 0], [2, 1]]
    """
    points = np.column_stack((np.asarray(xcoords), np.asarray(ycoords)))
    return cKDTree(points).query(points, k=K + 1)[1]


def normalize_data(dset: dict, N: int) -> np.ndarray:
    """``dset['diffraction']`` scaled by s = sqrt((N/2)**2 / mean over groups and
    channels of the summed squares), s computed in float64 and rounded to float32, the
    product float32 (PtychoPINN's ``normalize_data``; uint16 input does not overflow).

    Examples
    --------
    >>> import numpy as np
    >>> from gpugroup.ptychopinn import normalize_data
    >>> x = normalize_data({"diffraction": np.ones((2, 4, 4, 1), np.float32)}, 4)
    >>> x.dtype, float(x[0, 0, 0, 0])
    (dtype('float32'), 0.5)
    """
    X = np.asarray(dset["diffraction"])
    energies = np.sum(np.square(X.astype(np.float64)), axis=(1, 2))
    scale = np.float32(np.sqrt(((N / 2) ** 2) / np.mean(energies)))
    return scale * X.astype(np.float32, copy=False)


def get_image_patches(gt_image, global_offsets, local_offsets, N=None, gridsize=None):
    """(B, N, N, C) complex64 patches of ``gt_image``, channel c of group b centred at
    ``global_offsets[b] + local_offsets[b, ..., c]`` (x the column, y the row, in pixels).

    PtychoPINN's ``get_image_patches`` in NumPy: the offsets are rounded to float32 as
    there, and each patch is interpolated bilinearly, zero outside the image. ``N`` and
    ``gridsize`` default to PtychoPINN's ``ptycho.params`` when it is imported (``gridsize``
    else 1).

    Raises
    ------
    ValueError
        ``N`` is None and PtychoPINN's params are not imported.

    Examples
    --------
    >>> import numpy as np
    >>> from gpugroup.ptychopinn import get_image_patches
    >>> img = np.arange(64.0).reshape(8, 8).astype(np.complex64)
    >>> p = get_image_patches(img, np.array([[[[3.0], [2.0]]]]), np.zeros((1, 1, 2, 1)),
    ...                       N=4, gridsize=1)
    >>> p.shape, complex(p[0, 2, 2, 0])   # the centre pixel is img[y=2, x=3]
    ((1, 4, 4, 1), (19+0j))
    """
    if N is None:
        params = sys.modules.get("ptycho.params")
        if params is None:
            raise ValueError("N is None and PtychoPINN's ptycho.params is not imported: "
                             "pass N=... (the patch size)")
        N = params.get("N")
    gridsize = resolve_gridsize(gridsize)
    C = gridsize ** 2
    offsets = (np.asarray(global_offsets) + np.asarray(local_offsets)).astype(np.float32)
    B = int(offsets.shape[0])
    if offsets.shape[1:] != (1, 2, C):
        raise ValueError(f"offsets must be (B, 1, 2, gridsize**2={C}), got global_offsets "
                         f"{np.shape(global_offsets)} + local_offsets {np.shape(local_offsets)}")
    x = offsets[:, 0, 0, :].reshape(-1).astype(np.float64)
    y = offsets[:, 0, 1, :].reshape(-1).astype(np.float64)
    patches = assembly.extract_patches(np, np.asarray(gt_image), x, y, int(N))
    return np.ascontiguousarray(np.moveaxis(patches.reshape(B, C, int(N), int(N)), 1, -1))


# ----------------------------------------------------------------------------- patching
class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches ``ptycho.raw_data`` as soon as PtychoPINN imports it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        run = loader.exec_module

        def exec_module(module):
            run(module)
            _replace_everywhere(module)

        spec.loader = _WrappedLoader(loader, exec_module)
        return spec


class _WrappedLoader(importlib.abc.Loader):
    def __init__(self, loader, exec_module):
        self._loader = loader
        self.exec_module = exec_module

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def __getattr__(self, name):
        return getattr(self._loader, name)


def _replace_everywhere(target_module) -> int:
    """Point ``target_module.RawData`` and every loaded module's name bound to the same
    original class at :class:`gpugroup.RawData`. Returns how many names changed."""
    original = getattr(target_module, "RawData", None)
    if original is None or original is RawData:
        return 0
    count = 0
    for name, module in list(sys.modules.items()):
        if module is None or name == __name__:
            continue
        try:
            if module.__dict__.get("RawData") is original:
                _replaced[(name, "RawData")] = original
                module.RawData = RawData
                count += 1
        except AttributeError:  # odd module objects without __dict__
            continue
    logger.info("gpugroup.ptychopinn.patch(): RawData replaced in %d module(s)", count)
    return count


def patch() -> None:
    """Make PtychoPINN use :class:`gpugroup.RawData`, with no change to its code.

    ``ptycho.raw_data.RawData`` and the ``RawData`` name of every already-imported module
    that holds PtychoPINN's class then point at gpugroup's class (so PtychoPINN's
    ``isinstance`` checks pass); when ``ptycho.raw_data`` is not imported yet, it is
    patched as it is imported. PtychoPINN is never imported here. Calling it twice is
    harmless; :func:`unpatch` undoes it.

    Examples
    --------
    >>> import gpugroup.ptychopinn as gp
    >>> gp.patch(); gp.is_patched()
    True
    >>> gp.unpatch(); gp.is_patched()
    False
    """
    global _finder
    module = sys.modules.get(TARGET)
    if module is not None:
        _replace_everywhere(module)
    if _finder is None:
        _finder = _PatchOnImport()
        sys.meta_path.insert(0, _finder)


def unpatch() -> None:
    """Undo :func:`patch`: every replaced name, and the ``RawData`` name PtychoPINN's
    modules (``ptycho``, ``ptycho_torch``, ``scripts``) imported while patched, get
    PtychoPINN's class back. Code that imported ``gpugroup.RawData`` itself keeps it."""
    global _finder
    if _finder is not None:
        try:
            sys.meta_path.remove(_finder)
        except ValueError:
            pass
        _finder = None
    for (name, attr), original in list(_replaced.items()):
        module = sys.modules.get(name)
        if module is not None and module.__dict__.get(attr) is RawData:
            setattr(module, attr, original)
    _replaced.clear()
    # PtychoPINN modules imported after patch() copied gpugroup's class from
    # ptycho.raw_data; other modules (code importing gpugroup.RawData) keep theirs
    target = sys.modules.get(TARGET)
    original = None if target is None else target.__dict__.get("RawData")
    if original is not None and original is not RawData:
        for name, module in list(sys.modules.items()):
            d = getattr(module, "__dict__", None)
            if (name.split(".")[0] in PTYCHOPINN_PACKAGES and isinstance(d, dict)
                    and d.get("RawData") is RawData):
                module.RawData = original


def is_patched() -> bool:
    """True between :func:`patch` and :func:`unpatch`."""
    return _finder is not None


# ----------------------------------------------------------------------------- runner
def main(argv=None) -> int:
    """``python -m gpugroup.ptychopinn [-m MODULE | SCRIPT] [ARGS]``: run PtychoPINN code
    with :func:`patch` applied, as ``python SCRIPT ARGS`` (or ``python -m MODULE ARGS``)
    would run it."""
    parser = argparse.ArgumentParser(
        prog="python -m gpugroup.ptychopinn", allow_abbrev=False,
        description="Run a PtychoPINN script with gpugroup's RawData in place of "
                    "PtychoPINN's (gpugroup.ptychopinn.patch()).",
        epilog="examples:\n  python -m gpugroup.ptychopinn scripts/training/train.py "
               "--train_data_file scan.npz --gridsize 2\n  python -m gpugroup.ptychopinn "
               "-m pytest tests/test_oversampling.py",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", dest="module", metavar="MODULE",
                        help="run a module (as python -m MODULE) instead of a script")
    parser.add_argument("target", nargs="?", metavar="SCRIPT", help="the script to run")
    parser.add_argument("args", nargs="*", metavar="ARGS",
                        help="its arguments, options included, passed on as they are")
    # As python's own command line: what follows SCRIPT or -m MODULE is the target's,
    # options included (argparse would claim a leading --option of the target's).
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        parser.print_help()
        return 0
    dashes = argv[:1] == ["--"]  # (as python -- SCRIPT: what follows is the script)
    argv = argv[dashes:]
    if not dashes and argv and argv[0].startswith("-m"):
        module = argv[0][2:] or (argv[1] if len(argv) > 1 else None)
        if module is None:
            parser.error("-m needs a MODULE to run")
        patch()
        sys.argv = [module] + argv[2 if argv[0] == "-m" else 1:]
        sys.path.insert(0, os.getcwd())
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return 0
    if not argv or (argv[0].startswith("-") and not dashes):
        parser.error("give a SCRIPT to run, or -m MODULE, before any of its arguments"
                     + (f" (got {argv[0]!r} first)" if argv else ""))
    script = argv[0]
    if not os.path.isfile(script):
        parser.error(f"no such script: {script!r}")
    patch()
    sys.argv = [script] + argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    # run the importable module's main, so that the script's "import gpugroup.ptychopinn"
    # sees the same patch state
    from gpugroup.ptychopinn import main as _main

    sys.exit(_main())
