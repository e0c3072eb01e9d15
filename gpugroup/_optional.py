"""Optional packages (h5py, zarr, dask, ...): imported where used, with the pip line to
install them when missing or too old."""

from __future__ import annotations

import importlib

_EXTRA = {"h5py": "hdf5", "zarr": "zarr", "dask": "dask", "distributed": "dask"}


#: Oldest major version of an optional package the code works with.
_MIN_MAJOR = {"zarr": 3}


def require(module: str, extra: str | None = None):
    """Import optional dependency ``module`` or raise ImportError with the install line
    (also when it is older than the code needs: zarr 3, which needs Python 3.11)."""
    extra = extra or _EXTRA.get(module, module)
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"this needs the optional package {module!r}: pip install \"gpugroup[{extra}]\" "
            f"(or pip install {module})"
        ) from exc
    major = _MIN_MAJOR.get(module)
    version = str(getattr(mod, "__version__", ""))
    found = version.split(".")[0]
    if major is not None and found.isdigit() and int(found) < major:
        raise ImportError(
            f"this needs {module} >= {major} (found {version}): pip install "
            f"\"gpugroup[{extra}]\" (or pip install \"{module}>={major}\"; zarr 3 needs "
            f"Python >= 3.11)")
    return mod


