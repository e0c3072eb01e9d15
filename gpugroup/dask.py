"""Lazy and distributed assembly of grouped data with Dask, from gpugroup's own batch tasks.

The groups are computed once, on the client (they are small). The heavy gather runs as
one task per block of groups: the task opens the frame stack itself (from its file path
and dataset key, so workers in other processes or machines read straight from storage),
reads only the distinct frames its groups use in sorted order, re-expands them, writes
them channel-last and scales them. No ``da.take``/``x[idx]``/``vindex`` (their scattered
indices build all-to-all graphs). Results equal the in-memory run: ``nn_indices`` bit for
bit, and the same float arithmetic (the normalization factor is computed from the same
per-frame energies, in the same order).

GPUs: ``chunk_type="cupy"`` gives CuPy-backed blocks. With several GPUs, start one worker
per GPU (dask-cuda)::

    from dask_cuda import LocalCUDACluster
    from distributed import Client
    client = Client(LocalCUDACluster())            # one worker per visible GPU
    raw = RawData.from_file("scan.h5", mmap_mode="r")
    d = gpugroup.dask.grouped_arrays(raw, N=64, K=7, nsamples=10**6, gridsize=2,
                                     chunk_type="cupy")
    gpugroup.dask.to_zarr(d, "grouped.zarr")      # or d["X_full"].compute() -> CuPy

Large in-memory NumPy stacks are embedded in the graph once; with a distributed cluster
prefer on-disk stacks (``RawData.from_file(path, mmap_mode="r")``: NPZ, HDF5, Zarr).
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid

import numpy as np

from gpugroup import assembly
from gpugroup._optional import require
from gpugroup.grouping import check_bytes
from gpugroup.io import zarr_io
from gpugroup.io.atomic import array_bytes, atomic_path
from gpugroup.io.frames import StackRef, open_stack, stack_ref
from gpugroup.io.grouped import (
    GROUPED_STACKS,
    check_lazy_output,
    check_row_order,
    open_published,
    pinned_output,
    seed_array,
)
from gpugroup.schema import ScanArrays, check_position_numbers

logger = logging.getLogger(__name__)

#: Bytes of one block of ``X_full``, the unit of work. A task holds its block of
#: ``X_full``, of ``diffraction`` (same size for float32 frames) and of complex64 ``Y``
#: (twice), plus one read of ``DEFAULT_READ_BYTES``: up to about 4-5x this with ``Y``.
DEFAULT_BLOCK_BYTES = 64 << 20
#: Bytes gathered at a time inside a task (groups sorted by their first frame).
DEFAULT_READ_BYTES = 8 << 20


# ----------------------------------------------------------------------------- tasks
def _open(source):
    return open_stack(source) if isinstance(source, StackRef) else source


def _block_energies(source, uniq, read_bytes):
    """float64 energies of frames ``uniq`` (sorted) of ``source``."""
    return assembly.frame_energies(np, _open(source), uniq, read_bytes)


def _scale(parts, inverse, shape, N):
    """The normalization factor, exactly as the eager path: mean over E[nn_indices]."""
    energies = np.concatenate(parts)[inverse].reshape(shape)
    return np.array(assembly.normalization_scale(np, energies, N), dtype=np.float64)


def _assemble_block(nn, source, y_source, obj, xs, ys, scale, N, keep_diffraction,
                    chunk_type, read_bytes, y_positions="ptychopinn"):
    """(diffraction or None, X_full, Y or None) of one block of groups, canonical order.

    Groups are read in order of their smallest frame index, ``read_bytes`` at a time
    (each read: the distinct frames, sorted), and written back to their own rows.
    """
    stack = _open(source)
    scan = ScanArrays(xs, ys, stack, Y=None if y_source is None else _open(y_source),
                      objectGuess=obj)
    # xs, ys: the positions Y is cut around (assembly.patch_positions), the scan's own
    plan = assembly.AssemblyPlan(np, scan, nn, N, norm_scale=scale,
                                 keep_diffraction=keep_diffraction, warn=False,  # warned once
                                 y_positions=y_positions)
    b, C = int(nn.shape[0]), int(nn.shape[1])
    order = assembly.locality_order(nn)
    group_bytes = C * N * N * max(np.dtype(stack.dtype).itemsize, 4)
    step = max(1, int(read_bytes) // group_bytes)
    out = plan.outputs(b, C)
    for a in range(0, b, step):
        rows = order[a:a + step]
        part = plan.outputs(len(rows), C)
        plan.fill(nn[rows], part, chunk_bytes=1 << 62, workers=1)
        for key, value in part.items():
            if value is not None:
                out[key][rows] = value
    diffraction, X, Y = out["diffraction"], out["X_full"], out["Y"]
    if chunk_type == "cupy":
        import cupy

        return tuple(None if v is None else cupy.asarray(v) for v in (diffraction, X, Y))
    return diffraction, X, Y


# ----------------------------------------------------------------------------- graph
def _source(stack, dask):
    """What tasks receive for a stack: a StackRef (opened in the worker) or, for an
    in-memory array, one graph key holding it."""
    if stack is None:
        return None
    ref = stack_ref(stack)
    if ref is not None:
        return ref
    if assembly.is_device_array(stack):
        stack = stack.get()
    return dask.delayed(stack, name=f"gpugroup-frames-{uuid.uuid4().hex}", pure=True)


def block_sizes(B, group_bytes, block_bytes=DEFAULT_BLOCK_BYTES, multiple=1):
    """Groups per block: about ``block_bytes`` each, a multiple of ``multiple``."""
    per = max(1, int(block_bytes) // max(1, group_bytes))
    per = max(multiple, per // multiple * multiple)
    return [min(per, B - a) for a in range(0, B, per)] or [0]


def grouped_arrays(raw, N=None, K=4, nsamples=1, seed=None, gridsize=None, *,
                   nn_indices=None, keep_diffraction=True, block_bytes=None,
                   read_bytes=DEFAULT_READ_BYTES, norm_scale=None, row_order="canonical",
                   chunk_type="numpy", backend=None, y_positions="ptychopinn", **sampling):
    """The grouped dict of DESIGN.md section 2 with Dask arrays for the large entries.

    Parameters
    ----------
    raw : RawData
        The scan. Frame stacks on disk (``RawData.from_file(..., mmap_mode="r")``: NPZ
        members, ``.npy``, HDF5, Zarr) are opened by each task from their path; in-memory
        stacks are embedded in the graph once.
    N, K, nsamples, seed, gridsize, **sampling
        As ``raw.generate_grouped_data`` (``sequential_sampling``, ``enable_oversampling``,
        ``neighbor_pool_size``, ``group_by_scan``); the groups are computed here, once.
    nn_indices : (B, C) int array, optional
        Use these groups instead of sampling.
    keep_diffraction : bool
        Also build ``diffraction`` (computed by the same tasks as ``X_full``).
    block_bytes : int or None
        Bytes of one ``X_full`` block (default 64 MiB): the unit of work per task. A
        task's memory is up to about 4-5x this (see :data:`DEFAULT_BLOCK_BYTES`).
    read_bytes : int
        Bytes gathered at a time inside a task.
    norm_scale : float or None
        None computes it lazily from per-frame energies (tasks over the distinct frames
        used, then one small task), the same value as the eager result.
    row_order : {"canonical", "locality"}
        ``"canonical"``: rows in canonical order (each task still reads its own groups in
        order of their smallest frame). ``"locality"``: all rows sorted by their smallest
        frame index (stable), so each block reads nearby frames (much faster from a cold
        disk), and ``result["order"]`` holds the permutation: row j is canonical group
        ``order[j]``, so ``x[np.argsort(order)]`` is canonical.
    chunk_type : {"numpy", "cupy"}
        Block arrays on the host or on the GPU (CuPy; dask-cuda workers).
    backend : {"auto", "cpu", "gpu"} or None
        Where the groups are sampled.
    y_positions : {"ptychopinn", "members"}
        Where ``Y`` is cut from ``objectGuess`` (as ``RawData.generate_grouped_data``).

    Returns
    -------
    dict
        ``diffraction``, ``X_full`` (and ``Y``): ``dask.array.Array`` of shape
        (B, N, N, C), chunked along groups; ``norm_scale``: a 0-d Dask array (``float()``
        computes it; or the float given); ``nn_indices`` and the coordinates: NumPy;
        ``seed``.

    Examples
    --------
    >>> import numpy as np
    >>> from gpugroup import RawData
    >>> from gpugroup.dask import grouped_arrays
    >>> yy, xx = np.divmod(np.arange(100.0), 10)
    >>> raw = RawData.from_coords_without_pc(xx, yy, np.ones((100, 8, 8), np.float32),
    ...                                      np.ones((8, 8), np.complex64), None, backend="cpu")
    >>> d = grouped_arrays(raw, 8, K=7, nsamples=10, seed=1, gridsize=2)
    >>> d["X_full"].shape, d["X_full"].compute().dtype
    ((10, 8, 8, 4), dtype('float32'))
    """
    dask = require("dask", "dask")
    da = require("dask.array", "dask")

    check_row_order(row_order)
    assembly.check_y_positions(y_positions)
    if chunk_type not in ("numpy", "cupy"):
        raise ValueError(f"chunk_type must be 'numpy' or 'cupy', got {chunk_type!r}")
    N = assembly.frame_size(N, raw.diff3d)
    if nn_indices is None:
        nn_indices, seed, _ = raw.sample_for_grouping(K, nsamples, seed, gridsize,
                                                      backend=backend, **sampling)
    elif sampling:
        raise TypeError(f"sampling options {sorted(sampling)} need nn_indices=None")
    nn = check_position_numbers("nn_indices", assembly.to_host(nn_indices), len(raw))
    B, C = int(nn.shape[0]), int(nn.shape[1])
    block_bytes = check_bytes("block_bytes", block_bytes) or DEFAULT_BLOCK_BYTES
    read_bytes = check_bytes("read_bytes", read_bytes) or DEFAULT_READ_BYTES
    norm_scale = assembly.check_norm_scale(norm_scale)
    src = _source(raw.diff3d, dask)
    y_src = _source(raw.Y, dask)
    obj = raw.objectGuess if (raw.Y is None and raw.objectGuess is not None) else None
    obj_d = None if obj is None else dask.delayed(obj, name=f"gpugroup-object-"
                                                  f"{uuid.uuid4().hex}", pure=True)

    # Normalization: energies of the distinct frames used (blocks of sorted frames), then
    # the mean over E[nn] in canonical order, as the eager path computes it.
    if norm_scale is None:
        uniq, inverse = np.unique(nn, return_inverse=True)
        e_step = max(1, block_bytes // (N * N * 8))
        parts = [dask.delayed(_block_energies, pure=True)(src, uniq[a:a + e_step], read_bytes)
                 for a in range(0, uniq.size, e_step)]
        scale = dask.delayed(_scale, pure=True)(parts, inverse.reshape(-1), nn.shape, N)
        # A 0-d array, not a Delayed: dask.compute(array, delayed, ...) has returned mixed
        # collections out of order (dask 2026.8), so keep every lazy entry an Array.
        scale_out = da.from_delayed(scale, (), np.float64)
    else:
        scale = scale_out = float(norm_scale)

    order = None
    rows_nn = nn
    if row_order == "locality":
        order = assembly.locality_order(nn)
        rows_nn = nn[order]
    # start positions travel once, as one graph key each, when the object is cut
    xs = ys = None
    if obj is not None:
        pos = assembly.patch_positions(y_positions, raw.xcoords, raw.ycoords,
                                       raw.xcoords_start, raw.ycoords_start)
        assembly.warn_patches_off_object(np, pos[0], pos[1], obj.shape, N)
        xs, ys = (dask.delayed(np.asarray(a), name=f"gpugroup-{name}-{uuid.uuid4().hex}",
                               pure=True)
                  for name, a in zip(("xs", "ys"), pos))
    group_bytes = C * N * N * 4
    sizes = block_sizes(B, group_bytes, block_bytes)
    itemsize_dtype = np.dtype(raw.diff3d.dtype).newbyteorder("=")  # (as the blocks hold it)
    meta_lib = np
    if chunk_type == "cupy":
        meta_lib = require("cupy", "cu12")
    parts_d, parts_x, parts_y = [], [], []
    token = uuid.uuid4().hex[:12]
    start = 0
    for i, g in enumerate(sizes):
        blk = rows_nn[start:start + g]
        task = dask.delayed(_assemble_block, pure=True, nout=3)(
            blk, src, y_src, obj_d, xs, ys, scale, N, keep_diffraction, chunk_type,
            read_bytes, y_positions, dask_key_name=f"gpugroup-gather-{token}-{i}")
        shape = (g, N, N, C)
        parts_x.append(da.from_delayed(task[1], shape, np.float32,
                                       meta=meta_lib.empty((0, 0, 0, 0), np.float32)))
        if keep_diffraction:
            parts_d.append(da.from_delayed(task[0], shape, itemsize_dtype,
                                           meta=meta_lib.empty((0, 0, 0, 0), itemsize_dtype)))
        if y_src is not None or obj is not None:
            parts_y.append(da.from_delayed(task[2], shape, np.complex64,
                                           meta=meta_lib.empty((0, 0, 0, 0), np.complex64)))
        start += g
    out = {
        "nn_indices": rows_nn,
        "diffraction": da.concatenate(parts_d) if keep_diffraction else None,
        "X_full": da.concatenate(parts_x),
        "norm_scale": scale_out,
    }
    out.update(assembly.group_coordinates(np, rows_nn, raw.xcoords, raw.ycoords,
                                          raw.xcoords_start, raw.ycoords_start))
    out["Y"] = da.concatenate(parts_y) if parts_y else None
    out["objectGuess"] = raw.objectGuess
    out["seed"] = seed
    if order is not None:
        out["order"] = order
    logger.info("grouped_arrays: %d groups x %d in %d blocks (%s order, %s chunks)",
                B, C, len(sizes), row_order, chunk_type)
    return out


def compute(grouped: dict) -> dict:
    """The dict with every lazy entry computed together (each block's frames read once);
    ``norm_scale`` comes back as a float."""
    dask = require("dask", "dask")
    lazy = {k: v for k, v in grouped.items() if hasattr(v, "__dask_graph__")}
    values = dask.compute(*lazy.values())
    out = dict(grouped)
    out.update(zip(lazy, values))
    if hasattr(grouped.get("norm_scale"), "__dask_graph__"):
        out["norm_scale"] = float(out["norm_scale"])
    return out


# ----------------------------------------------------------------------------- writing
def _zarr_rows(block, group_bytes, target=1 << 20):
    """Groups per Zarr chunk: at most 16, about ``target`` bytes, dividing ``block``."""
    best = 1
    for r in range(1, 17):
        if block % r == 0 and r * group_bytes <= max(target, group_bytes):
            best = r
    return best


def to_zarr(grouped: dict, path, *, overwrite=True, check_space=True) -> dict:
    """Write a :func:`grouped_arrays` result to a Zarr store, in parallel, atomically.

    Each gather task writes its own block into its own whole Zarr chunks (chunks divide
    the blocks, so no two tasks touch one chunk); ``diffraction``, ``X_full`` and ``Y``
    of a block come from one task. The store is built under a temporary name and renamed
    when complete. Returns the store opened as :func:`gpugroup.io.grouped.open_grouped`.
    """
    da = require("dask.array", "dask")
    zarr = require("zarr", "zarr")

    check_lazy_output(path)
    stacks = {k: grouped[k] for k in GROUPED_STACKS if grouped.get(k) is not None}
    X = stacks["X_full"]
    block = int(X.chunks[0][0]) if X.chunks[0] else 1
    with contextlib.ExitStack() as held:  # the published store held until read back
        with atomic_path(path, overwrite, nbytes=array_bytes(grouped.values()),
                         check_space=check_space) as tmp:  # a failed store is removed
            g = zarr.open_group(tmp, mode="w")
            guard = os.path.join(tmp, "zarr.json")
            targets, sources = [], []
            for key, arr in stacks.items():
                arr = arr.map_blocks(assembly.to_host, dtype=arr.dtype,
                                     meta=np.empty((0,) * arr.ndim, arr.dtype))
                group_bytes = int(np.prod(arr.shape[1:])) * np.dtype(arr.dtype).itemsize
                rows = _zarr_rows(block, group_bytes)
                targets.append(_Guarded(zarr_io.create_array(
                    g, key, shape=arr.shape, dtype=arr.dtype,
                    chunks=(rows,) + tuple(arr.shape[1:])), guard))
                sources.append(arr)
            scale = grouped.get("norm_scale")
            if hasattr(scale, "__dask_graph__"):
                targets.append(_Guarded(zarr_io.create_array(g, "norm_scale", shape=(),
                                                             dtype=np.float64), guard))
                sources.append(scale)
            else:
                zarr_io.create_array(g, "norm_scale", data=np.asarray(float(scale), np.float64))
            da.store(sources, targets, lock=False, compute=True)
            for key, value in grouped.items():
                if key in GROUPED_STACKS or key == "norm_scale" or value is None:
                    continue
                data = seed_array(value) if key == "seed" else np.asarray(value)
                zarr_io.create_array(g, key, data=data)
            inode = held.enter_context(pinned_output(path, tmp))
        return open_published(path, inode)


class _Guarded:
    """A Zarr target that writes only while its temporary store exists: after a failure
    the store is removed while other tasks may still run; they must not recreate it."""

    def __init__(self, arr, guard):
        self.arr, self.guard = arr, guard
        self.shape, self.dtype, self.ndim = arr.shape, arr.dtype, arr.ndim

    def __setitem__(self, key, value):
        if not os.path.exists(self.guard):
            raise RuntimeError("the output store was abandoned (another task failed)")
        self.arr[key] = value


__all__ = ["grouped_arrays", "compute", "to_zarr", "block_sizes"]
