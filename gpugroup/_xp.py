"""Array-namespace helpers that never import a GPU library: device arrays are recognised
by looking in ``sys.modules`` (as array-api-compat's ``is_cupy_array`` does)."""

from __future__ import annotations

import sys

import numpy as np


def is_device_array(a) -> bool:
    """True for a CuPy array, checked without importing CuPy."""
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(a, cupy.ndarray)


def to_host(a) -> np.ndarray:
    """``a`` as a NumPy array (a CuPy array copied to the host)."""
    return a.get() if is_device_array(a) else np.asarray(a)
