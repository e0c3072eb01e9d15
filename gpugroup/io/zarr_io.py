"""Zarr scans and outputs (a ``.zarr`` directory: a group holding the NPZ keys as arrays).

Frame stacks are written unsharded and uncompressed with 1-16 frames (or groups) per
chunk: scattered reads stay cheap, and such chunk files are raw bytes that
:mod:`gpugroup.io.frames` reads directly.
"""

from __future__ import annotations

import functools
import itertools
import os
import threading

import numpy as np

from gpugroup._optional import require
from gpugroup._xp import to_host
from gpugroup.io.frames import (
    check_unchanged,
    chunk_grid,
    missing_chunk_message,
    read_stack,
    remember_opened,
    stat_input,
)
from gpugroup.schema import STACK_KEYS, ScanFileError, check_storable


def _open_group(path, mode, what="scan file"):
    zarr = require("zarr", "zarr")
    if mode == "r":
        stat_input(path, what)  # a missing store said as for every format
    try:
        return zarr.open_group(path, mode=mode)
    except FileNotFoundError:
        raise
    except Exception as exc:  # zarr raises several types for a non-store directory
        raise OSError(f"cannot open {path!r} as a Zarr group: {type(exc).__name__}: {exc}. "
                      f"Is it a .zarr directory (written by zarr or gpugroup)?") from exc


#: Attempts at opening a store consistently while another process replaces it.
_OPEN_ATTEMPTS = 5


def store_identity(path) -> tuple:
    """(inode, mtime, ctime) of the store directory ``path`` and of its root metadata
    document: another store renamed onto ``path``, or the store rewritten, changes it."""
    out = []
    for p in (path, os.path.join(path, "zarr.json"), os.path.join(path, ".zgroup")):
        try:
            st = os.stat(p)
        except OSError:
            out.append(None)
            continue
        out.append((st.st_ino, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(out)


def _consistently(path, read_once):
    """``read_once()`` of the store at ``path``, repeated until the store did not change
    while it ran (another process renaming a new store onto ``path``): a store is never
    returned as a mix of two. Raises ScanFileError if it keeps changing."""
    for _ in range(_OPEN_ATTEMPTS):
        before = store_identity(path)
        try:
            out = read_once()
        except Exception:  # noqa: BLE001 - a store replaced mid-read fails in many ways
            if store_identity(path) != before:
                continue
            raise
        if store_identity(path) == before:
            return out
    raise ScanFileError(f"{path!r} kept changing while it was opened (another process "
                        f"rewriting or replacing it?); open it again once it is complete")


def read(path, keys: dict, wanted, mmap_mode=None) -> dict:
    """The fields ``wanted`` of Zarr scan ``path`` (absent ones left out); with
    ``mmap_mode`` the frame stacks stay (checked) ``zarr.Array`` objects.

    Every array is checked for missing chunk files (read as fill values by zarr, so a
    lost chunk would be zeros), and the store is read as one: replaced meanwhile, it is
    read again (see :func:`_consistently`); the stacks refuse reads once it changes."""
    return _consistently(os.fspath(path),
                         lambda: _read_once(os.fspath(path), keys, wanted, mmap_mode))


def _read_once(path, keys, wanted, mmap_mode):
    zarr = require("zarr", "zarr")
    g = _open_group(path, "r")
    out = {}
    for field in wanted:
        names = (keys[field],) if field in keys else (
            (field, "diffraction") if field == "diff3d" else (field,))
        for name in names:
            try:
                obj = g[name.strip("/")]
            except KeyError:
                continue
            if not isinstance(obj, zarr.Array):
                raise ValueError(f"{path!r}: {name!r} (for {field!r}) is a group, not an "
                                 f"array; pass keys={{{field!r}: 'path/to/array'}}")
            check_chunks(obj, path)
            if mmap_mode is not None and field in STACK_KEYS:
                out[field] = checked(obj)
            else:
                out[field] = read_stack(obj)
            break
    if "_metadata" in g.attrs:
        out["_metadata"] = np.array(str(g.attrs["_metadata"]))
    out["_datasets"] = sorted(g.array_keys())
    return out


def _array_directory(arr):
    """The local directory of ``arr``'s files, or None (not a local store)."""
    root = getattr(getattr(arr, "store_path", None), "store", None)
    root = getattr(root, "root", None)
    if root is None:
        return None
    return os.path.join(os.fspath(root), arr.path) if arr.path else os.fspath(root)


def check_chunks(arr, store=None, limit: int = 3) -> None:
    """Raise ScanFileError naming the array and chunk when a chunk file of ``arr`` (in a
    local store) is missing: zarr would read it as fill values, which are not data.
    (gpugroup writes every chunk, empty ones included.)"""
    directory = _array_directory(arr)
    if directory is None or not arr.shape or 0 in arr.shape:
        return
    grid = chunk_grid(arr)
    expected = int(np.prod(grid, dtype=np.int64))
    found = sum(len([f for f in files if f not in ("zarr.json", ".zarray", ".zattrs")])
                for _, _, files in os.walk(directory))
    if found >= expected:
        return
    missing = []
    for coords in itertools.product(*(range(n) for n in grid)):
        key = arr.metadata.encode_chunk_key(coords)
        if not os.path.exists(os.path.join(directory, *key.split("/"))):
            missing.append(key)
            if len(missing) >= limit:
                break
    if missing:
        raise ScanFileError(missing_chunk_message(arr, missing, expected - found, store))


def checked(arr):
    """``arr`` as a :class:`CheckedArray` (reads refused once its store changes), its
    identity noted now."""
    out = _checked_class()(arr._async_array)
    remember_opened(out)
    return out


@functools.lru_cache(maxsize=1)
def _checked_class():
    zarr = require("zarr", "zarr")

    class CheckedArray(zarr.Array):
        """A ``zarr.Array`` whose reads check, before and after, that its store is still
        the one it was opened from (another run replacing a ``.zarr`` removes the old one;
        zarr would then read the new store's chunks by name, or fill values)."""

        def _checked(self, read, *args, **kwargs):
            check_unchanged(self)
            out = read(*args, **kwargs)
            check_unchanged(self)
            return out

        def get_basic_selection(self, *a, **k):
            return self._checked(super().get_basic_selection, *a, **k)

        def get_orthogonal_selection(self, *a, **k):
            return self._checked(super().get_orthogonal_selection, *a, **k)

        def get_mask_selection(self, *a, **k):
            return self._checked(super().get_mask_selection, *a, **k)

        def get_coordinate_selection(self, *a, **k):
            return self._checked(super().get_coordinate_selection, *a, **k)

        def get_block_selection(self, *a, **k):
            return self._checked(super().get_block_selection, *a, **k)

    CheckedArray.__module__ = __name__
    CheckedArray.__qualname__ = "CheckedArray"
    return CheckedArray


class _ZarrSink:
    """Slice assignment into a Zarr array; a lock serializes writes so two chunks of
    groups that share a Zarr chunk never race (its read-modify-write)."""

    def __init__(self, arr, lock):
        self._arr = arr
        self._lock = lock
        self.shape = arr.shape
        self.dtype = arr.dtype

    def __setitem__(self, key, value):

        value = to_host(value)
        with self._lock:
            self._arr[key] = value


class ZarrTarget:
    """Write arrays into a new Zarr group (uncompressed, unsharded)."""

    def __init__(self, path):
        self.path = path
        self._g = _open_group(path, "w")
        self._lock = threading.Lock()

    def create(self, key, shape, dtype, chunk_rows=None):
        rows = int(chunk_rows) if chunk_rows else default_chunk_rows(shape, dtype)
        arr = self._g.create_array(key, shape=tuple(shape), dtype=dtype,
                                   chunks=(rows,) + tuple(shape[1:]), compressors=None,
                                   fill_value=0, config=WRITE_ALL_CHUNKS)
        return _ZarrSink(arr, self._lock)

    def put(self, key, array):

        array = to_host(array)
        check_storable(key, array)
        if array.dtype.kind == "U":
            self._g.attrs[key] = str(array)
        else:
            self._g.create_array(key, data=array, compressors=None, config=WRITE_ALL_CHUNKS)

    def close(self):
        pass  # every write is already on disk

    def discard(self):
        pass


#: zarr skips chunks that hold only the fill value unless told otherwise; gpugroup writes
#: every chunk, so that a missing chunk file is always an error (see :func:`check_chunks`).
WRITE_ALL_CHUNKS = {"write_empty_chunks": True}


def default_chunk_rows(shape, dtype, target_bytes=1 << 20):
    """1..16 rows per chunk, about ``target_bytes`` each."""
    row = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
    return int(max(1, min(16, target_bytes // max(1, row))))


def read_grouped(path, stack_keys) -> dict:
    """A written grouped output: stacks as read-only (checked) ``zarr.Array``, the rest as
    arrays, all of one store: one replaced meanwhile is read again, and the stacks refuse
    reads once it changes (:class:`CheckedArray`), so rows never come from another run."""
    path = os.fspath(path)

    def read_once():
        g = _open_group(path, "r", "grouped output")
        out = {}
        for key in g.array_keys():
            arr = g[key]
            check_chunks(arr, path)
            out[key] = checked(arr) if key in stack_keys else read_stack(arr)
        out.update(dict(g.attrs))
        return out

    return _consistently(path, read_once)


def __getattr__(name):
    # ``CheckedArray`` is built on first use (zarr is optional); by name for pickle.
    if name == "CheckedArray":
        return _checked_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
