"""Grouped-output files (``.h5``, ``.zarr``, ``.npz``): their layout, the checks on where
they go, and :func:`open_grouped` to read one back (large entries lazily). Writing them is
:mod:`gpugroup.streamed` (in memory order) and :mod:`gpugroup.dask` (parallel blocks)."""

from __future__ import annotations

import os

import numpy as np

from gpugroup.io.formats import FORMATS, output_format

#: Grouped entries stored as on-disk arrays; the rest are small and read back whole.
GROUPED_STACKS = ("diffraction", "X_full", "Y")
_ORDER = ("nn_indices", "diffraction", "X_full", "norm_scale", "coords_nn", "coords_offsets",
          "coords_relative", "coords_start_nn", "coords_start_offsets",
          "coords_start_relative", "Y", "objectGuess", "seed")


def check_row_order(row_order) -> None:
    if row_order not in ("canonical", "locality"):
        raise ValueError(f"row_order must be 'canonical' or 'locality', got "
                         f"row_order={row_order!r}")


def check_lazy_output(path) -> None:
    """Dask writes its blocks in parallel into a Zarr store only."""
    if output_format(path) != "zarr":
        raise ValueError(f"lazy (Dask) writes go to a .zarr store (parallel region writes), "
                         f"got {os.fspath(path)!r}; for .h5/.npz use lazy=False (streamed)")


def seed_array(seed: int) -> np.ndarray:
    """The seed as a 0-d array every format stores: int64, or uint64 from 2**63 on."""
    return np.array(seed, dtype=np.uint64 if int(seed) >= 2**63 else np.int64)


def open_grouped(path) -> dict:
    """Open a grouped output written by :func:`write_grouped` (large entries lazily)."""
    data = FORMATS[output_format(path)].read_grouped(os.fspath(path), GROUPED_STACKS)
    out = {}
    for key in _ORDER:
        value = data.pop(key, None)
        if key in ("norm_scale", "seed") and value is not None:
            value = np.asarray(value).item()
        out[key] = value
    out.update(data)
    out["path"] = os.path.abspath(os.fspath(path))
    return out
