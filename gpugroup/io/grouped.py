"""Grouped-output files (``.h5``, ``.zarr``, ``.npz``): their layout, the checks on where
they go, and :func:`open_grouped` to read one back (large entries lazily). Writing them is
:mod:`gpugroup.streamed` (in memory order) and :mod:`gpugroup.dask` (parallel blocks)."""

from __future__ import annotations

import contextlib
import os

import numpy as np

from gpugroup.io.formats import FORMATS, output_format
from gpugroup.io.frames import opened_identity
from gpugroup.schema import GROUPED_MARKS, ScanFileError

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


@contextlib.contextmanager
def pinned_output(path, tmp):
    """While the block runs, hold open the file that stands for ``X_full`` of the output
    being written at ``tmp`` (to be published as ``path``): the output file, or X_full's
    metadata document in a Zarr store. Yields its inode, which nothing else can take while
    it is held (see :func:`open_published`)."""
    doc = os.path.join(tmp, "X_full", "zarr.json") if output_format(path) == "zarr" else tmp
    fd = os.open(doc, os.O_RDONLY)
    try:
        yield os.fstat(fd).st_ino
    finally:
        os.close(fd)


def open_published(path, inode) -> dict:
    """:func:`open_grouped` of the output this run just published at ``path`` (its X_full
    file's ``inode``, from :func:`pinned_output`). Another run writing the same ``path`` at
    once may replace it between the rename and this open: its rows are never returned under
    this run's seed; that is an error instead."""
    try:
        out = open_grouped(path)
    except FileNotFoundError:
        out = None
    if out is not None and (opened_identity(out["X_full"]) or (None,))[0] == inode:
        return out
    if out is not None and hasattr(out["X_full"], "file"):  # an HDF5 file held open
        out["X_full"].file.close()
    raise ScanFileError(
        f"{os.fspath(path)!r} was replaced by another run's output as this run published its "
        f"own (two runs writing one output at once): this run's output is gone; run it "
        f"again, or give each run its own output path")


def open_grouped(path) -> dict:
    """Open a grouped output written by :func:`write_grouped` (large entries lazily)."""
    data = FORMATS[output_format(path)].read_grouped(os.fspath(path), GROUPED_STACKS)
    missing = [key for key in GROUPED_MARKS if data.get(key) is None]
    if missing:
        for value in data.values():  # an HDF5 file's datasets keep it open: close it
            getattr(getattr(value, "file", None), "close", lambda: None)()
        raise ValueError(f"{os.fspath(path)!r} is not a grouped output: it has no "
                         f"{' or '.join(missing)} (a scan? read a scan with "
                         f"RawData.from_file)")
    out = {}
    for key in _ORDER:
        value = data.pop(key, None)
        if key in ("norm_scale", "seed") and value is not None:
            value = np.asarray(value).item()
        out[key] = value
    out.update(data)
    out["path"] = os.path.abspath(os.fspath(path))
    return out
