"""Grouped data streamed into a file (``.h5``, ``.zarr``, ``.npz``) in bounded memory.

:func:`write_grouped` is ``RawData.generate_grouped_data(..., out=PATH)``: energies of the
frames the groups use come first (each used frame read once), then one gather pass writes
``diffraction`` and ``X_full`` (and ``Y``) chunk by chunk, so every used frame is read
twice in all, and memory stays near ``chunk_bytes`` whatever the output size. The file is
written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import contextlib
import logging
import os

import numpy as np

from gpugroup import assembly
from gpugroup.grouping import check_bytes
from gpugroup.io import (
    atomic_path,
    check_free_space,
    check_interrupted,
    open_target,
    output_format,
    zarr_io,
)
from gpugroup.io.grouped import (
    check_row_order,
    open_published,
    pinned_output,
    seed_array,
)

logger = logging.getLogger(__name__)

#: Transient memory budget of a streamed write (frames read, copies, write buffers).
DEFAULT_OUT_CHUNK_BYTES = 256 << 20
#: Largest working chunk: bigger ones gain nothing (cache-sized buffers are reused by
#: malloc; fresh large ones cost page faults, ~5x slower on our VMs).
MAX_WORK_BYTES = 8 << 20


def _chunk_rows(fmt, shape, dtype):
    if fmt == "npz":
        return None
    return max(1, min(zarr_io.default_chunk_rows(shape, dtype), int(shape[0])))


def _aligned_chunk_bytes(budget, group_bytes, rows):
    """Bytes per gather chunk within ``budget``, a whole number of ``rows``-group file
    chunks (so concurrent chunks never share a file chunk)."""
    rows = rows or 1
    groups = max(rows, (max(1, budget // max(1, group_bytes)) // rows) * rows)
    return groups * group_bytes


def estimate_grouped_bytes(scan, *, B: int, C: int, N: int, keep_diffraction: bool = True,
                           locality: bool = False) -> int:
    """Bytes of the grouped arrays of B groups of C frames (N x N) of ``scan``, as written
    uncompressed: ``diffraction`` (the scan's dtype), ``X_full`` (float32), ``Y``
    (complex64, when the scan has ``Y`` or ``objectGuess``), indices, coordinates,
    ``order`` (with ``locality``) and ``objectGuess``. File formats add little (headers,
    chunk indices). The free-space check and ``gpugroup group``'s estimate use it."""
    frame = N * N * C
    per_group = frame * 4 + 4 * C + 64 * C + 32  # X_full, nn_indices, 4+2 coordinate arrays
    if keep_diffraction:
        per_group += frame * np.dtype(scan.diff3d.dtype).itemsize
    if scan.Y is not None or scan.objectGuess is not None:
        per_group += frame * 8
    if locality:
        per_group += 8  # order
    extra = 0 if scan.objectGuess is None else scan.objectGuess.nbytes
    return B * per_group + extra


def _stopping(progress):
    """``progress``, after a check that stops the write at a Ctrl-C that Python dropped
    (:func:`gpugroup.io.atomic.check_interrupted`)."""
    def step(done):
        check_interrupted()
        if progress is not None:
            progress(done)
    return step


def write_grouped(path, xp, scan, nn_indices, N: int, *, keep_diffraction=True,
                  chunk_bytes=DEFAULT_OUT_CHUNK_BYTES, workers=None, progress=None,
                  seed=None, overwrite=True, row_order="canonical", check_space=True,
                  y_positions="ptychopinn") -> dict:
    """Assemble the grouped dict of DESIGN.md section 2 into file ``path``.

    Parameters
    ----------
    path : str or path-like
        ``*.h5`` (HDF5, datasets chunked along groups), ``*.zarr`` (unsharded,
        uncompressed, 1-16 groups per chunk) or ``*.npz`` (uncompressed, memory-mappable).
    xp, scan, nn_indices, N, keep_diffraction : as :func:`gpugroup.assembly.assemble_groups`.
    chunk_bytes : int
        Transient memory budget in bytes (an upper bound: working chunks are at most
        :data:`MAX_WORK_BYTES`). Peak memory is at most about this plus a fixed margin
        (libhdf5's free lists, thread stacks; 15-60 MiB measured) plus the index arrays
        (B x C) and coordinates, whatever the output size. Every used frame is read twice:
        once for the energies (distinct frames, sorted), once in the gather.
    workers : int or None
        Gather threads. None: 1. The file writes are serial anyway; on our 2-core VM a
        second thread only contends (1 GB into tmpfs: 2.6-3.5 s with one thread, 3.6-4.5 s
        with two).
    progress : callable or None
        Called after each chunk with the number of groups it wrote (an increment).
    seed : int or None
        Stored as ``seed``.
    overwrite : bool
        Replace an existing ``path`` (only once the new file is complete).
    row_order : {"canonical", "locality"}
        ``"locality"`` stores the groups sorted by their smallest frame index (stable), so
        the gather reads the input nearly sequentially (about 5x faster from a cold disk
        than canonical order, whose seeds are random), and adds ``order``: row j holds
        canonical group ``order[j]`` (``x[np.argsort(order)]`` is canonical). Every entry
        uses the same order; ``norm_scale`` is the canonical one.
    check_space : bool
        Refuse up front, before any frame is read, an output larger than the free space
        at ``path`` (the message gives both, and the path); False skips the check (for
        filesystems that report free space wrongly).
    y_positions : {"ptychopinn", "members"}
        Where ``Y`` is cut from ``objectGuess`` (see :class:`gpugroup.assembly.PatchSource`).

    Returns
    -------
    dict
        As the eager result, but ``diffraction``, ``X_full`` and ``Y`` are on-disk arrays:
        ``np.memmap`` (npz), ``zarr.Array`` (zarr) or ``h5py.Dataset`` (h5; they keep the
        file open read-only: close it with ``d["X_full"].file.close()`` or drop them).
        Also ``path``: the absolute path written.
    """
    path = os.path.abspath(os.fspath(path))  # ("g.npz/" too: the name it is published at)
    fmt = output_format(path)
    check_row_order(row_order)
    workers = 1 if workers is None else max(1, int(workers))
    chunk_bytes = check_bytes("chunk_bytes", chunk_bytes) or DEFAULT_OUT_CHUNK_BYTES
    assembly.check_progress(progress)
    nn = xp.asarray(nn_indices)
    B, C = int(nn.shape[0]), int(nn.shape[1])
    if check_space:  # before any reading: a 60 GB output on a 20 GB disk fails now
        check_free_space(path, estimate_grouped_bytes(
            scan, B=B, C=C, N=N, keep_diffraction=keep_diffraction,
            locality=row_order == "locality"))
    # Out of core, file-backed stacks are read with pread: a memory map would keep every
    # page touched resident in this process.
    plan = assembly.AssemblyPlan(xp, scan, nn, N, keep_diffraction=keep_diffraction,
                                 chunk_bytes=min(MAX_WORK_BYTES, max(1, chunk_bytes // 2)),
                                 out_of_core=True, y_positions=y_positions)
    logger.info("write_grouped: %d groups x %d into %s (%s, %s order), norm_scale=%.6g", B,
                C, path, fmt, row_order, plan.scale)
    small = {}
    if row_order == "locality":
        order = assembly.locality_order(nn)
        nn = nn[xp.asarray(order)]
        small["order"] = order
    small.update({"nn_indices": nn, "norm_scale": np.float64(plan.scale)})
    small.update(plan.coordinates(nn))
    if scan.objectGuess is not None:
        small["objectGuess"] = np.asarray(scan.objectGuess)
    if seed is not None:
        small["seed"] = seed_array(seed)
    per_chunk = max(1, min(MAX_WORK_BYTES, chunk_bytes // (5 * workers)))
    out_shape = (B, N, N, C)
    with contextlib.ExitStack() as held:  # the published file held until read back
        with atomic_path(path, overwrite) as tmp:
            target = open_target(tmp, fmt)
            try:
                for key, value in small.items():
                    target.put(key, value)
                rows = _chunk_rows(fmt, out_shape, np.float32)
                # the plan's outputs, made empty, name the entries and their dtypes
                sinks = {key: target.create(key, out_shape, empty.dtype, rows)
                         for key, empty in plan.outputs(0, C).items() if empty is not None}
                group_bytes = C * N * N * (np.dtype(plan.stack.dtype).itemsize
                                           + (16 if plan.with_y else 0))
                plan.fill(nn, sinks, workers=workers, progress=_stopping(progress),
                          chunk_bytes=_aligned_chunk_bytes(per_chunk, group_bytes, rows))
                target.close()
            except BaseException:
                target.discard()
                raise
            inode = held.enter_context(pinned_output(path, tmp))
        return open_published(path, inode)
