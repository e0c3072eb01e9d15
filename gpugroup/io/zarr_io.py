"""Zarr scans and outputs (a ``.zarr`` directory: a group holding the NPZ keys as arrays).

Frame stacks are written unsharded and uncompressed with 1-16 frames (or groups) per
chunk: scattered reads stay cheap, and such chunk files are raw bytes that
:mod:`gpugroup.io.frames` reads directly. Every chunk is written, all-zero ones included,
so that a chunk missing from a store is an error (:func:`check_chunks`), never fill values.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import threading
import warnings

import numpy as np

from gpugroup._optional import require
from gpugroup._xp import to_host
from gpugroup.io.frames import (
    check_unchanged,
    chunk_grid,
    missing_chunk_message,
    read_error,
    read_stack,
    remember_opened,
    selected_rows,
    stat_input,
    system_error,
    zarr_name,
)
from gpugroup.schema import REQUIRED_FIELDS, STACK_KEYS, ScanFileError, check_storable

logger = logging.getLogger(__name__)

def _open_group(path, mode, what="scan file"):
    zarr = require("zarr", "zarr")
    if mode == "r":
        stat_input(path, what)  # a missing store said as for every format
    try:
        return zarr.open_group(path, mode=mode)
    except FileNotFoundError as exc:  # zarr's GroupNotFoundError
        if mode != "r" or not os.path.isdir(path) or has_metadata(path):
            raise  # (gone meanwhile: a store being replaced)
        raise ScanFileError(
            f"{what} {path!r} is not a Zarr store: it has no zarr.json (Zarr 3) or .zgroup "
            f"(Zarr 2) at its top. A damaged or partly copied store? Copy it again from its "
            f"source, or write it again (convert the scan again, or group again for an "
            f"output)") from exc
    except Exception as exc:  # zarr raises several types for a non-store directory
        if system_error(exc):
            raise
        raise OSError(f"cannot open {path!r} as a Zarr group: {type(exc).__name__}: {exc}. "
                      f"Is it a .zarr directory (written by zarr or gpugroup)? If so, its "
                      f"metadata is damaged: copy it again from its source, or write it "
                      f"again") from exc


def has_metadata(path, array: bool = False) -> bool:
    """Whether the directory ``path`` holds a Zarr group's metadata, or with ``array``
    an array's (Zarr 3 or 2)."""
    return any(os.path.exists(os.path.join(path, m))
               for m in ("zarr.json", ".zarray" if array else ".zgroup"))


def _open_member(g, name, path):
    """``g[name]`` of the group ``g`` at ``path``, or None when there is none; metadata
    zarr cannot read (a damaged document, a codec it lacks) is a ScanFileError naming the
    store and the array."""
    try:
        with warnings.catch_warnings():  # (zarr warns of a directory it does not know)
            warnings.simplefilter("ignore", UserWarning)
            return g[name]
    except KeyError:
        folder = os.path.join(os.fspath(path), name)
        if os.path.isdir(folder) and not has_metadata(folder, array=True) and os.listdir(
                folder):
            raise ScanFileError(
                f"{zarr_name(name, path)} has data but no metadata (zarr.json, or .zarray "
                f"in Zarr 2): a damaged or partly copied store? Copy it again from its "
                f"source, or write it again") from None
        return None
    except Exception as exc:  # zarr raises many types for bad metadata
        if system_error(exc):
            raise
        raise _metadata_error(path, name, exc) from exc


def _array_keys(g, path) -> list:
    """The names of the arrays of the group ``g`` at ``path``, sorted; one whose metadata
    zarr cannot read is named in the error (each is then opened alone to find it)."""
    try:
        return sorted(g.array_keys())
    except Exception as exc:  # zarr raises many types for bad metadata
        if system_error(exc):
            raise
        if os.path.isdir(path):
            for name in sorted(os.listdir(path)):
                if os.path.isdir(os.path.join(path, name)):
                    _open_member(g, name, path)
        raise _metadata_error(path, None, exc) from exc


def _metadata_error(path, name, exc) -> ScanFileError:
    what = zarr_name(name, path) if name is not None else f"Zarr store {path!r}"
    return ScanFileError(
        f"cannot open {what}: {type(exc).__name__}: {exc}. Its metadata (zarr.json, or "
        f".zarray in Zarr 2) is damaged, or names a codec this zarr lacks (install the "
        f"package that provides it); restore the store from its source, or write it again "
        f"(convert the scan again, or group again for an output)")


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
            obj = _open_member(g, name.strip("/"), path)
            if obj is None:
                continue
            if not isinstance(obj, zarr.Array):
                raise ValueError(f"{path!r}: {name!r} (for {field!r}) is a group, not an "
                                 f"array; pass keys={{{field!r}: 'path/to/array'}}")
            check_chunks(obj, path, strict=field in STACK_KEYS + REQUIRED_FIELDS)
            if mmap_mode is not None and field in STACK_KEYS:
                out[field] = checked(obj)
            else:
                out[field] = read_stack(obj)
            break
    if "_metadata" in g.attrs:
        out["_metadata"] = np.array(str(g.attrs["_metadata"]))
    out["_datasets"] = _array_keys(g, path)
    return out


def _array_directory(arr):
    """The local directory of ``arr``'s files, or None (not a local store)."""
    root = getattr(getattr(arr, "store_path", None), "store", None)
    root = getattr(root, "root", None)
    if root is None:
        return None
    return os.path.join(os.fspath(root), arr.path) if arr.path else os.fspath(root)


def check_chunks(arr, store=None, limit: int = 3, strict: bool = True) -> None:
    """Raise ScanFileError naming the array and chunk when a chunk of ``arr`` (in a local
    store) is missing: zarr would read it as fill values, which are not data. (gpugroup
    writes every chunk, empty ones included.) The files there are matched against the
    array's chunk keys (so a stray ``.DS_Store`` stands for none); a sharded array's shard
    indexes are read as well (:func:`_check_shards`).

    Not ``strict`` (a scan's optional fields and a grouped output's small arrays, where
    zarr's own writers leave out chunks equal to the fill value: a scan_index of zeros, a
    seed of 0), a missing chunk is logged and read as zarr reads it, as the fill value."""
    directory = _array_directory(arr)
    if directory is None or 0 in arr.shape:
        return
    grid = chunk_grid(arr)  # () for a 0-d array: one chunk
    found = _files_under(directory)
    missing, count = [], 0
    for coords in itertools.product(*(range(n) for n in grid)):
        key = arr.metadata.encode_chunk_key(coords)
        if key not in found:
            count += 1
            if len(missing) < limit:
                missing.append(key)
    if count:
        message = missing_chunk_message(arr, missing, count, store)
    elif arr.shards is not None:
        message = _check_shards(arr, directory, grid, store, limit)
    else:
        return
    if message is not None and strict:
        raise ScanFileError(message)
    if message is not None:
        logger.warning("%s has chunks that were never written: read as its fill value %r, "
                       "as zarr reads them (its writer left out chunks equal to it; if the "
                       "store was copied in part, copy it again)", zarr_name(arr.path, store),
                       np.asarray(arr.fill_value).tolist())


def _files_under(directory) -> set:
    """The paths of the files under ``directory``, relative to it, ``/``-separated (as
    zarr's chunk keys); links followed, as zarr follows them (a link to nothing is no
    file)."""
    out, seen, todo = set(), set(), [("", directory)]
    while todo:
        prefix, folder = todo.pop()
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:  # a link back up: a loop
            continue
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(folder) as entries:
            for entry in entries:
                key = f"{prefix}/{entry.name}" if prefix else entry.name
                if entry.is_dir():
                    todo.append((key, entry.path))
                elif entry.is_file():
                    out.add(key)
    return out


def _check_shards(arr, directory, grid, store, limit):
    """The missing-chunk message (None: none missing) when a shard's index (read alone,
    not the data) lacks an inner chunk that holds part of the array (zarr would read fill
    values). Raise ScanFileError when an index points past the end of its file, or is not
    one read exactly here: the default layout of
    the Zarr 3 sharding spec (little-endian offset/length pairs, then an optional crc32c),
    no nested sharding, no filters before the shards."""
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

    codec = arr.metadata.codecs[0]
    index = tuple(type(c) for c in getattr(codec, "index_codecs", ()))
    if (not isinstance(codec, ShardingCodec) or index[:1] != (BytesCodec,)
            or index[1:] not in ((), (Crc32cCodec,))
            or getattr(codec.index_codecs[0].endian, "value", None) != "little"
            or any(isinstance(c, ShardingCodec) for c in codec.codecs)):
        raise ScanFileError(
            f"{zarr_name(arr.path, store)} is sharded in a layout whose shard index gpugroup "
            f"does not read (filters before the shards, nested sharding, or index codecs "
            f"other than bytes (little-endian) and crc32c), so it cannot check that every "
            f"inner chunk was written: zarr reads a missing one as fill values, which are "
            f"not data. Rewrite the array unsharded, or sharded with the default shard index")
    per_shard = tuple(int(s) // int(c) for s, c in zip(arr.shards, arr.chunks))
    chunks = tuple(-(-int(n) // int(c)) for n, c in zip(arr.shape, arr.chunks))
    entries = int(np.prod(per_shard, dtype=np.int64))
    index_bytes = 16 * entries + 4 * (len(index) - 1)
    missing, count, shard = [], 0, None
    for coords in itertools.product(*(range(n) for n in grid)):
        key = arr.metadata.encode_chunk_key(coords)
        try:
            empty = _empty_inner_chunks(os.path.join(directory, *key.split("/")), entries,
                                        index_bytes, codec.index_location.value == "start")
        except ValueError as exc:
            raise ScanFileError(f"{zarr_name(arr.path, store)}: shard {key!r} is damaged "
                                f"({exc}: truncated?); restore the store from its source, or "
                                f"write it again") from None
        first = [c * p for c, p in zip(coords, per_shard)]
        # only inner chunks that hold part of the array need be there
        empty = empty.reshape(per_shard)[tuple(slice(0, n - f) for n, f in zip(chunks, first))]
        count += int(empty.sum())
        if shard is None and empty.any():
            shard = key
        missing.extend(tuple(int(i) for i in np.add(first, pos))
                       for pos in np.argwhere(empty)[:limit - len(missing)])
    return missing_chunk_message(arr, missing, count, store, shard) if count else None


#: The index entry of an inner chunk that was never written (Zarr 3 sharding spec).
_NO_CHUNK = 2**64 - 1


def _empty_inner_chunks(path, entries, index_bytes, at_start):
    """Which of the ``entries`` inner chunks the shard file ``path`` lacks, from its index
    (``index_bytes`` long, at its start or end). Raises ValueError for an index that points
    past the end of the file."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size < index_bytes:
            raise ValueError(f"{size} bytes, shorter than its index")
        fh.seek(0 if at_start else size - index_bytes)
        table = np.frombuffer(fh.read(16 * entries), "<u8")
    offset, length = table[0::2], table[1::2]
    end = np.add(offset, length, dtype=np.float64)  # (garbage would wrap in uint64)
    if not np.all((offset == _NO_CHUNK) | (end <= (size if at_start else size - index_bytes))):
        raise ValueError(f"its index points past the end of its {size} bytes")
    return offset == _NO_CHUNK


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
        zarr would then read the new store's chunks by name, or fill values). A read that
        fails (a damaged chunk) raises :func:`~gpugroup.io.frames.read_error`."""

        def _checked(self, read, *args, **kwargs):
            check_unchanged(self)
            try:
                out = read(*args, **kwargs)
            except (MemoryError, ScanFileError, IndexError, TypeError):
                raise  # (IndexError, TypeError: a selection zarr refuses, not the store)
            except Exception as exc:
                selection = args[0] if args else kwargs.get("selection", ())
                raise read_error(self, exc, selected_rows(self, selection)) from exc
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
        arr = create_array(self._g, key, shape=tuple(shape), dtype=dtype,
                           chunks=(rows,) + tuple(shape[1:]))
        return _ZarrSink(arr, self._lock)

    def put(self, key, array):

        array = to_host(array)
        check_storable(key, array)
        if array.dtype.kind == "U":
            self._g.attrs[key] = str(array)
        else:
            create_array(self._g, key, data=array)

    def close(self):
        pass  # every write is already on disk

    def discard(self):
        pass


#: zarr skips chunks that hold only the fill value unless told otherwise; gpugroup writes
#: every chunk, so that a missing chunk file is always an error (see :func:`check_chunks`).
WRITE_ALL_CHUNKS = {"write_empty_chunks": True}


def create_array(group, key, **kwargs):
    """``group.create_array(key, **kwargs)`` as gpugroup writes every Zarr array:
    uncompressed, fill value 0, every chunk written (:data:`WRITE_ALL_CHUNKS`)."""
    if "data" not in kwargs:
        kwargs.setdefault("fill_value", 0)
    return group.create_array(key, compressors=None, config=WRITE_ALL_CHUNKS, **kwargs)


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
        for key in _array_keys(g, path):
            arr = _open_member(g, key, path)
            check_chunks(arr, path, strict=key in stack_keys)
            out[key] = checked(arr) if key in stack_keys else read_stack(arr)
        out.update(dict(g.attrs))
        return out

    return _consistently(path, read_once)


def __getattr__(name):
    # ``CheckedArray`` is built on first use (zarr is optional); by name for pickle.
    if name == "CheckedArray":
        return _checked_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
