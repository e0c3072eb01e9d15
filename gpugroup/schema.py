"""The scan fields of DESIGN.md section 1, the error for files that hold no scan, and the
checks of what is stored and of position numbers (groups, seeds, their dtype): what every
reader, writer and driver agrees on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: Keys whose arrays are frame stacks: left on disk (memory-mapped / datasets) when lazy.
STACK_KEYS = ("diff3d", "diffraction", "Y", "X_full")
#: The scan fields of DESIGN.md section 1 (``_metadata`` is a JSON string).
SCAN_FIELDS = ("xcoords", "ycoords", "xcoords_start", "ycoords_start", "diff3d", "probeGuess",
               "scan_index", "objectGuess", "Y", "norm_Y_I")
REQUIRED_FIELDS = ("xcoords", "ycoords", "diff3d", "probeGuess")
#: What every grouped output holds, and no scan does: how the two are told apart.
GROUPED_MARKS = ("nn_indices", "X_full")


class ScanFileError(OSError, ValueError):
    """A scan file that cannot be read as any supported format."""


def check_storable(key, array) -> None:
    """Raise ValueError naming ``key`` and its value unless ``array`` (a NumPy array) is
    numbers, which every output format stores alike; text is stored (as an attribute in
    HDF5 and Zarr) only under names that are no scan field, such as ``_metadata``."""
    kind = array.dtype.kind
    if kind in "biufc" or (kind == "U" and key not in SCAN_FIELDS):
        return
    value = repr(array.item()) if array.ndim == 0 else f"an array of shape {array.shape}"
    if len(value) > 80:
        value = value[:77] + "..."
    raise ValueError(f"cannot store {key!r}: its value {value} (dtype {array.dtype}) is not "
                     f"numbers; set {key} to a number or a numeric array (or None to leave it "
                     f"out)")


@dataclass(frozen=True)
class ScanArrays:
    """A scan's arrays by their DESIGN.md section 1 names, for code that assembles groups
    from plain arrays. :class:`gpugroup.RawData` has the same attributes (and checks them);
    this record checks nothing. The start positions default to the positions."""

    xcoords: Any
    ycoords: Any
    diff3d: Any
    xcoords_start: Any = None
    ycoords_start: Any = None
    Y: Any = None
    objectGuess: Any = None

    def __post_init__(self):
        for name, default in (("xcoords_start", self.xcoords), ("ycoords_start", self.ycoords)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)


def index_dtype(n: int):
    """int32 for group indices, int64 when n >= 2**31 (DESIGN.md section 2)."""
    return np.int32 if n < 2**31 else np.int64


def check_position_numbers(name: str, a, n: int, ndim: int = 2):
    """``a`` (host array-like) as position numbers of a scan of ``n``: ``ndim``-D integers in
    [0, n) (``ndim`` 2: groups (B, C), one row a group; 1: seed positions). Returns them as
    a NumPy array of :func:`index_dtype`; a ValueError names ``name``, what is wrong and the
    fix."""
    a = np.asarray(a)
    want = "(B, C) groups" if ndim == 2 else "a 1-D array"
    if a.ndim != ndim or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be {want} of integer position numbers in [0, {n}), got "
                         f"shape {a.shape} dtype {a.dtype}; pass integers (e.g. "
                         f"{name}.astype(int) of whole numbers)")
    if a.size and (int(a.min()) < 0 or int(a.max()) >= n):
        bad = int(np.flatnonzero(((a < 0) | (a >= n)).ravel())[0])
        raise ValueError(f"{name} must hold position numbers in [0, {n}) (the scan has {n} "
                         f"positions), got {name}.flat[{bad}]={int(a.flat[bad])}; group "
                         f"positions of this scan only")
    return a.astype(index_dtype(n), copy=False)
