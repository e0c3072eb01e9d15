"""Zarr scans and outputs (a ``.zarr`` directory: a group holding the NPZ keys as arrays).

Frame stacks are written unsharded and uncompressed with 1-16 frames (or groups) per
chunk: scattered reads stay cheap, and such chunk files are raw bytes that
:mod:`gpugroup.io.frames` reads directly.
"""

from __future__ import annotations

import threading

import numpy as np

from gpugroup._optional import require
from gpugroup._xp import to_host
from gpugroup.schema import STACK_KEYS


def _open_group(path, mode):
    zarr = require("zarr", "zarr")
    import os

    if mode == "r" and not os.path.exists(path):
        raise FileNotFoundError(f"no such scan store: {path!r}")
    try:
        return zarr.open_group(path, mode=mode)
    except FileNotFoundError:
        raise
    except Exception as exc:  # zarr raises several types for a non-store directory
        raise OSError(f"cannot open {path!r} as a Zarr group: {type(exc).__name__}: {exc}. "
                      f"Is it a .zarr directory (written by zarr or gpugroup)?") from exc


def read(path, keys: dict, wanted, mmap_mode=None) -> dict:
    """The fields ``wanted`` of Zarr scan ``path`` (absent ones left out); with
    ``mmap_mode`` the frame stacks stay ``zarr.Array`` objects."""
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
            out[field] = obj if (mmap_mode is not None and field in STACK_KEYS) else obj[()]
            break
    if "_metadata" in g.attrs:
        out["_metadata"] = np.array(str(g.attrs["_metadata"]))
    out["_datasets"] = sorted(g.array_keys())
    return out


class _Sink:
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


class Target:
    """Write arrays into a new Zarr group (uncompressed, unsharded)."""

    def __init__(self, path):
        self.path = path
        self._g = _open_group(path, "w")
        self._lock = threading.Lock()

    def create(self, key, shape, dtype, chunk_rows=None):
        rows = int(chunk_rows) if chunk_rows else default_chunk_rows(shape, dtype)
        arr = self._g.create_array(key, shape=tuple(shape), dtype=dtype,
                                   chunks=(rows,) + tuple(shape[1:]), compressors=None,
                                   fill_value=0)
        return _Sink(arr, self._lock)

    def put(self, key, array):

        array = to_host(array)
        if array.dtype.kind == "U":
            self._g.attrs[key] = str(array)
        else:
            self._g.create_array(key, data=array, compressors=None)

    def close(self):
        pass  # every write is already on disk

    def discard(self):
        pass


def default_chunk_rows(shape, dtype, target_bytes=1 << 20):
    """1..16 rows per chunk, about ``target_bytes`` each."""
    row = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
    return int(max(1, min(16, target_bytes // max(1, row))))


def open_output(path, stack_keys) -> dict:
    """A written grouped output: stacks as read-only ``zarr.Array``, the rest as arrays."""
    zarr = require("zarr", "zarr")
    g = zarr.open_group(path, mode="r")
    out = {}
    for key in g.array_keys():
        arr = g[key]
        out[key] = arr if key in stack_keys else arr[()]
    out.update(dict(g.attrs))
    return out
