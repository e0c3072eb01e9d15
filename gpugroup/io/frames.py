"""Reading frames from on-disk stacks at scattered indices, and picklable stack references.

:func:`gather_frames` is what :func:`gpugroup.assembly.take_frames` calls for stores that
are not in-memory arrays (HDF5, Zarr, :class:`RawFileStack`). Each distinct frame is read
once, in file order: raw bytes in a file (an uncompressed ``.npz`` member or ``.npy``, a
contiguous HDF5 dataset) with one ``preadv`` per run of consecutive frames, scattered
straight into the result rows; chunked HDF5 one hyperslab per run; uncompressed Zarr
chunk file by chunk file. ``pread`` keeps the file out of this process's resident memory,
which is why the out-of-core writers read memory-mapped stacks through
:func:`raw_view` (in memory, ``np.take`` on the mapping is faster while it fits).

:class:`StackRef` names a stack on disk (file, dataset path, byte offset) so that worker
processes (Dask, PyTorch) can open it themselves; :func:`open_stack` opens one, cached
per process.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import mmap
import os
import stat
import sys
import weakref

import numpy as np

from gpugroup._optional import require
from gpugroup.schema import ScanFileError

logger = logging.getLogger(__name__)

#: HDF5/Zarr: when the range spanned by the wanted frames is at most this many times their
#: number, read the whole range in one call and pick from it.
_SLAB_FILL = 2.0
#: At most this many buffers per ``preadv`` call (POSIX IOV_MAX is at least 1024).
_IOV_MAX = 1024


def _runs(uniq):
    """Runs of consecutive values in sorted unique ``uniq``: (first position, end
    position, first value) of each run."""
    if uniq.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64)
    breaks = np.flatnonzero(np.diff(uniq) != 1) + 1
    first = np.concatenate(([0], breaks))
    last = np.concatenate((breaks, [uniq.size]))
    return first, last, uniq[first]


def _is_h5py(stack) -> bool:
    h5py = sys.modules.get("h5py")
    return h5py is not None and isinstance(stack, h5py.Dataset)


def _is_zarr(stack) -> bool:
    zarr = sys.modules.get("zarr")
    return zarr is not None and isinstance(stack, zarr.Array)


def file_backed(stack) -> bool:
    """True for an ``np.memmap`` that maps a file directly (not a view of one)."""
    return (isinstance(stack, np.memmap) and isinstance(getattr(stack, "base", None), mmap.mmap)
            and stack.flags.c_contiguous and getattr(stack, "filename", None) is not None)


def raw_view(stack):
    """A :class:`RawFileStack` over the same bytes, when ``stack`` is raw bytes in a file
    (a file-backed memmap, a contiguous unfiltered HDF5 dataset) and that file is still the
    one ``stack`` was opened from; else None (read ``stack`` itself)."""
    if isinstance(stack, RawFileStack):
        return stack
    if file_backed(stack):
        filename, offset = stack.filename, stack.offset
    elif _is_h5py(stack):
        filename, offset = stack.file.filename, _h5py_contiguous_offset(stack)
        if offset is None:
            return None
    else:
        return None
    identity = check_unchanged(stack, replaced_ok=True)
    if identity == "replaced":
        return None  # only the open mapping/handle still has its data: read that
    return RawFileStack(filename, offset, stack.shape, stack.dtype, identity)


def gather_frames(stack, idx):
    """``stack[idx]`` as a NumPy array for any int indices (any order, repeats allowed),
    each distinct frame read once (raw files: scattered ``preadv``; HDF5/Zarr: sorted
    unique reads re-expanded)."""
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    raw = raw_view(stack)
    if raw is not None:
        return _take_raw(stack, raw, idx)
    uniq, inverse = np.unique(idx, return_inverse=True)
    return read_frames(stack, uniq)[inverse.reshape(-1)]


def _take_raw(stack, raw, idx):
    """``raw.take(idx)``; when the file at ``stack``'s path was replaced between the check
    of :func:`raw_view` and the read (``raw`` then refuses the new file), the frames come
    from ``stack`` itself, whose open map or handle still holds the file it was opened
    from."""
    try:
        return raw.take(idx)
    except Exception as exc:
        if (raw is stack or not isinstance(exc, ScanFileError)
                or check_unchanged(stack, replaced_ok=True) != "replaced"):
            raise
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    uniq, inverse = np.unique(idx, return_inverse=True)
    return np.asarray(stack[uniq])[inverse.reshape(-1)]


def read_frames(stack, uniq):
    """``stack[uniq]`` as a NumPy array for strictly increasing int indices ``uniq``.

    Works for h5py datasets, zarr arrays, file-backed memmaps, :class:`RawFileStack` and
    anything indexable by an index array.
    """
    uniq = np.asarray(uniq, dtype=np.int64)
    frame_shape = tuple(stack.shape[1:])
    if uniq.size == 0:
        return np.empty((0,) + frame_shape, dtype=stack.dtype)
    raw = raw_view(stack)
    try:
        if raw is not None:
            return _take_raw(stack, raw, uniq)
        if _is_h5py(stack):
            check_unchanged(stack, replaced_ok=True)  # the open file, unless rewritten
            return _read_h5py(stack, uniq)
        if _is_zarr(stack):
            check_unchanged(stack)  # its chunks are read by name: the same store after too
            frames = _read_zarr(stack, uniq)
            check_unchanged(stack)
            return frames
        return np.asarray(stack[uniq])
    except (MemoryError, ScanFileError):
        raise
    except Exception as exc:  # a damaged store: say which store and which frames
        raise read_error(stack, exc, f"frames {int(uniq[0])}..{int(uniq[-1])} of ") from exc


def read_stack(stack, key=()):
    """``stack[key]`` (all of it by default) of an HDF5 dataset or Zarr array; a read that
    fails (a damaged file, a missing compression filter) raises :func:`read_error`."""
    try:
        return stack[key]
    except (MemoryError, ScanFileError):
        raise
    except Exception as exc:
        raise read_error(stack, exc, selected_rows(stack, key)) from exc


def selected_rows(stack, selection) -> str:
    """``"frames a..b of "`` for a read of ``selection`` of ``stack`` whose first axis is a
    slice or int indices, else ``""``: what :func:`read_error` says was being read."""
    first = selection[0] if isinstance(selection, tuple) and selection else selection
    if not stack.shape or first is Ellipsis:
        return ""
    if isinstance(first, slice):
        a, b, _ = first.indices(stack.shape[0])
        return f"frames {a}..{b - 1} of "
    idx = np.asarray(first)
    if idx.dtype.kind in "iu" and idx.size:
        return f"frames {int(idx.min())}..{int(idx.max())} of "
    return ""


def system_error(exc) -> bool:
    """Whether ``exc`` is an error of the system (no permission, an I/O error: an OSError
    with an errno other than EINVAL, which a seek to a damaged offset gives), to pass on as
    it is rather than call the file damaged."""
    return isinstance(exc, OSError) and exc.errno not in (None, errno.EINVAL)


def read_error(stack, exc, rows="") -> ScanFileError:
    """The error for ``exc`` raised reading ``rows`` (e.g. ``"frames 0..9 of "``; all of
    it by default) of ``stack``: which file and array, what failed, and what to do.

    A failed Zarr read leaves the rest of its chunk tasks running on zarr's event loop;
    they are let finish first (cut off at exit, asyncio would log each one as destroyed
    while pending)."""
    if _is_zarr(stack):
        _settle_zarr_tasks()
    hint = "is the file truncated or damaged?"
    if _is_zarr(stack):
        hint = ("is a chunk file truncated or damaged? Restore the store from its source, "
                "or write it again: convert the scan again, or group again for an output")
    if _is_h5py(stack):
        hint += (" Or compressed with a filter this h5py lacks (Eiger/bitshuffle/LZ4): "
                 "pip install hdf5plugin, then import hdf5plugin before reading")
    return ScanFileError(f"cannot read {rows}{_describe(stack)}: {type(exc).__name__}: {exc} "
                         f"({hint})")


def _settle_zarr_tasks(timeout: float = 30.0) -> None:
    """Wait (at most ``timeout`` seconds) until the tasks on zarr's event loop are done:
    after one chunk of a read fails, ``asyncio.gather`` returns while the read's other
    chunk tasks are still pending."""
    import asyncio

    async def settle():
        others = asyncio.all_tasks() - {asyncio.current_task()}
        if others:
            await asyncio.wait(others, timeout=timeout)

    try:  # zarr's own runner (zarr 3); any failure here must not hide the read's error
        from zarr.core.sync import sync

        sync(settle())
    except Exception as exc:  # noqa: BLE001 - already reporting a failed read
        logger.debug("waiting for zarr's pending reads: %s", exc)


def _describe(stack) -> str:
    """Where a frame stack lives, for error messages."""
    if _is_h5py(stack):
        return f"HDF5 dataset {stack.name!r} in {stack.file.filename!r}"
    if _is_zarr(stack):
        return f"Zarr array {str(getattr(stack, 'store_path', getattr(stack, 'path', '')))!r}"
    path = getattr(stack, "filename", None) or getattr(stack, "path", None)
    return f"{type(stack).__name__} {path!r}" if path else f"a {type(stack).__name__} stack"


def _h5py_contiguous_offset(ds):
    """Byte offset of a contiguous, unfiltered, allocated HDF5 dataset, else None."""
    if ds.chunks is not None or ds.external or ds.dtype.kind not in "biufc":
        return None
    try:
        return ds.id.get_offset()
    except Exception:  # noqa: BLE001 - any h5py failure means: use the library path
        return None


def _read_h5py(ds, uniq):
    # (Contiguous datasets never get here: raw_view reads their bytes directly, much
    # faster than HDF5 selections and free of h5py's global lock.)
    span = int(uniq[-1] - uniq[0] + 1)
    if span <= _SLAB_FILL * uniq.size:
        # Dense enough: one hyperslab read of the bounding range, then pick.
        slab = np.empty((span,) + tuple(ds.shape[1:]), dtype=ds.dtype)
        ds.read_direct(slab, np.s_[int(uniq[0]):int(uniq[-1]) + 1])
        return slab[uniq - uniq[0]]
    out = np.empty((uniq.size,) + tuple(ds.shape[1:]), dtype=ds.dtype)
    first, last, start = _runs(uniq)
    for a, b, s in zip(first.tolist(), last.tolist(), start.tolist()):
        ds.read_direct(out, np.s_[s:s + b - a], np.s_[a:b])
    return out


def _zarr_direct_layout(arr):
    """(directory, frames per chunk, stored dtype, fill) when ``arr`` is an unsharded,
    uncompressed, unfiltered Zarr v3 array in a local directory whose chunks hold whole
    frames: its chunk files are then raw bytes. None otherwise."""
    try:
        from zarr.codecs import BytesCodec

        meta = arr.metadata
        root = getattr(arr.store_path.store, "root", None)
        if (meta.zarr_format != 3 or root is None or arr.shards is not None
                or tuple(arr.compressors) or tuple(arr.filters)
                or not isinstance(arr.serializer, BytesCodec)
                or tuple(arr.chunks[1:]) != tuple(arr.shape[1:])
                or np.dtype(arr.dtype).kind not in "biufc"):
            return None
        endian = getattr(arr.serializer.endian, "value", None)
        stored = np.dtype(arr.dtype).newbyteorder("<" if endian == "little" else ">")
        if endian is None:
            stored = np.dtype(arr.dtype)
        directory = os.path.join(os.fspath(root), arr.path) if arr.path else os.fspath(root)
        return directory, int(arr.chunks[0]), stored, meta.fill_value
    except Exception:  # noqa: BLE001 - an unexpected layout: use zarr itself
        return None


def _read_zarr_direct(arr, uniq, layout):
    directory, k, stored, _fill = layout
    frame = tuple(arr.shape[1:])
    out = np.empty((uniq.size,) + frame, dtype=arr.dtype)
    chunk_of = uniq // k
    bounds = np.flatnonzero(np.diff(chunk_of)) + 1
    starts = np.concatenate(([0], bounds)).tolist()
    stops = np.concatenate((bounds, [uniq.size])).tolist()
    for a, b in zip(starts, stops):
        cid = int(chunk_of[a])
        key = arr.metadata.encode_chunk_key((cid,) + (0,) * len(frame))
        try:
            chunk = np.fromfile(os.path.join(directory, *key.split("/")), dtype=stored)
        except FileNotFoundError:  # fill values are not data: a lost chunk is an error
            check_unchanged(arr)  # (or the store was replaced: say that instead)
            raise _scan_file_error(missing_chunk_message(arr, [key], store=directory)) from None
        chunk = chunk.reshape((k,) + frame)
        out[a:b] = chunk[uniq[a:b] - cid * k]
    return out


def chunk_grid(arr):
    """Chunks (shards, when sharded) per axis: what the store holds one file each of."""
    inner = getattr(arr, "shards", None) or arr.chunks
    return tuple(-(-int(n) // max(1, int(c))) for n, c in zip(arr.shape, inner))


def zarr_name(key, store=None) -> str:
    """``Zarr array '/key' of 'store'``, for error messages (``store``: its path, or None)."""
    where = f" of {os.fspath(store)!r}" if store is not None else ""
    return f"Zarr array {'/' + str(key).strip('/')!r}{where}"


def missing_chunk_message(arr, keys, count=None, store=None, shard=None) -> str:
    """The error for chunk files ``keys`` of Zarr array ``arr`` that are missing (``count``
    of them in all, when known; ``store`` names the store). With ``shard`` (the key of a
    shard file), ``keys`` are positions in the array's chunk grid of inner chunks that
    shard indexes lack, the first one in that shard."""
    if shard is None:
        what, grid = "chunk", chunk_grid(arr)
        first = repr(keys[0])
    else:
        what = "inner chunk"
        grid = tuple(-(-int(n) // max(1, int(c))) for n, c in zip(arr.shape, arr.chunks))
        first = f"{keys[0]!r} (in shard {shard!r})"
    total = int(np.prod(grid, dtype=np.int64))
    many = f" ({count} of {total} {what}s)" if count else ""
    also = f" (also {', '.join(repr(k) for k in keys[1:])})" if len(keys) > 1 else ""
    return (f"{zarr_name(arr.path, store)} is missing {what} {first}{many}{also}: zarr "
            f"would read it as fill values, which are not data. Restore the store from its "
            f"source (or convert the original scan again); a store written by a program "
            f"that skips all-fill chunks must be written with "
            f"config={{'write_empty_chunks': True}}")


def _read_zarr(arr, uniq):
    layout = _zarr_direct_layout(arr)
    if layout is not None:
        return _read_zarr_direct(arr, uniq, layout)
    span = int(uniq[-1] - uniq[0] + 1)
    if span <= _SLAB_FILL * uniq.size:
        return np.asarray(arr[int(uniq[0]):int(uniq[-1]) + 1])[uniq - uniq[0]]
    return np.asarray(arr.oindex[uniq])


class RawFileStack:
    """A C-ordered stack stored raw in a file at ``offset`` (an ``.npy`` file or an
    uncompressed ``.npz`` member), read with ``os.pread`` (no memory map).

    Supports ``shape``, ``dtype``, ``len`` and indexing by an int, a slice or an int array
    (any order, repeats allowed: :meth:`take`); pickles as its description, so worker
    processes reopen the file.
    """

    def __init__(self, filename, offset, shape, dtype, identity=None):
        self.filename = os.fspath(filename)
        self.offset = int(offset)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)
        self.identity = None if identity is None else tuple(identity)  # see file_identity
        self._frame_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def __reduce__(self):
        return (RawFileStack, (self.filename, self.offset, self.shape, self.dtype,
                               self.identity))

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            n = self.shape[0]
            if not -n <= key < n:
                raise IndexError(f"frame {key} out of range for {n} frames")
            return self.take([key % n])[0]
        if isinstance(key, slice):
            a, b, step = key.indices(self.shape[0])
            if step != 1:
                return self[np.arange(a, b, step)]
            key = np.arange(a, b, dtype=np.int64)
        return self.take(key)

    def take(self, idx):
        """Frames ``idx`` (any order, repeats allowed) as a new array, each distinct frame
        read once: runs of consecutive frames are one ``preadv`` scattering straight into
        their rows of the result (no intermediate copy)."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        out = np.empty((idx.size,) + self.shape[1:], dtype=self.dtype)
        if idx.size == 0:
            return out
        order = np.argsort(idx, kind="stable")
        sidx = idx[order]
        if sidx[0] < 0 or sidx[-1] >= self.shape[0]:
            raise IndexError(f"frame index out of range [0, {self.shape[0]}) for "
                             f"{self.filename!r}: got {int(sidx[0])}..{int(sidx[-1])}")
        first_of = np.ones(idx.size, dtype=bool)
        first_of[1:] = sidx[1:] != sidx[:-1]
        dest = order[first_of]  # result row of each distinct frame, frames ascending
        uniq = sidx[first_of]
        fb = self._frame_bytes
        flat = memoryview(out.reshape(-1).view(np.uint8))
        first, last, start = _runs(uniq)
        dest_list = dest.tolist()
        fd = os.open(self.filename, os.O_RDONLY)  # per call: microseconds, nothing to leak
        try:
            if self.identity is not None and _stat_identity(os.fstat(fd)) != self.identity:
                raise changed_error(self.filename)
            for a, b, s in zip(first.tolist(), last.tolist(), start.tolist()):
                for c in range(a, b, _IOV_MAX):
                    d = min(b, c + _IOV_MAX)
                    self._preadv(fd, [flat[r * fb:(r + 1) * fb] for r in dest_list[c:d]],
                                 self.offset + (s + c - a) * fb)
        finally:
            os.close(fd)
        if not first_of.all():
            # Repeated frames: copy from the row that holds the frame's first read.
            group = np.cumsum(first_of) - 1
            out[order[~first_of]] = out[dest[group[~first_of]]]
        return out

    def _preadv(self, fd, views, pos):
        if os.preadv(fd, views, pos) == sum(len(v) for v in views):
            return
        for v in views:  # a short read (rare): redo buffer by buffer, report truncation
            k = 0
            while k < len(v):
                n = os.preadv(fd, [v[k:]], pos + k)
                if n <= 0:
                    raise OSError(f"{self.filename!r} is truncated: frame "
                                  f"{(pos - self.offset) // self._frame_bytes} of "
                                  f"{self.shape[0]} is missing")
                k += n
            pos += len(v)


# ----------------------------------------------------------------------------- inputs
_KINDS = ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
          (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket"))


def _kind(mode) -> str:
    return next((name for test, name in _KINDS if test(mode)), "special file")


def _not_regular(path, mode, what):
    return _scan_file_error(
        f"{what} {os.fspath(path)!r} is a {_kind(mode)}, not a regular file or directory: "
        f"gpugroup reads scans from files (.npz, .h5, a .zarr or .npy directory); copy the "
        f"data into one first")


def stat_input(path, what: str = "scan") -> os.stat_result:
    """``os.stat`` of an input ``path``, refused unless it is a regular file or a
    directory (``/dev/zero`` would be read without end, a FIFO would block forever).

    Raises
    ------
    FileNotFoundError
        Nothing at ``path`` (a dangling symbolic link included).
    PermissionError
        A directory on the way is not searchable.
    ScanFileError
        A symbolic link loop, or a device, FIFO or socket.
    """
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        dangling = os.path.islink(path)
        raise FileNotFoundError(
            f"{what} {path!r} does not exist"
            + (f" (a symbolic link to the missing {os.readlink(path)!r})" if dangling else "")
            + "; check the path") from None
    except PermissionError:
        raise PermissionError(
            f"{what} {path!r} cannot be reached: permission denied (a directory "
            f"on the way is not searchable, or the file is not readable); fix the permissions "
            f"(chmod) or copy the scan elsewhere") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _scan_file_error(
                f"{what} {path!r} cannot be reached: a symbolic link loop (too "
                f"many levels of symbolic links); point the link at the scan itself") from None
        if exc.errno == errno.ENOTDIR:
            raise FileNotFoundError(
                f"{what} {path!r} does not exist: a part of the path is a file, "
                f"not a directory") from None
        raise OSError(f"cannot stat {what} {path!r}: {exc.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise _not_regular(path, st.st_mode, what)
    return st


def path_present(path) -> bool:
    """Whether something (or something unreachable) is at ``path``: not a plain miss."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return True


def _nonblocking(path, flags):
    return os.open(path, flags | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))


def _directory_error(path, what):
    return IsADirectoryError(f"{what} {path!r} is a directory, not a file: put the file "
                             f"itself there (or give its own path)")


def open_regular(path, what: str = "scan file"):
    """``path`` opened for binary reading, after checking (on the open descriptor) that
    it is a regular file: opened without blocking, so a FIFO is refused, not waited on.
    Read everything of one scan through this one file object (memory maps included), so
    that a file replaced meanwhile is never mixed in."""
    path = os.fspath(path)
    if stat.S_ISDIR(stat_input(path, what).st_mode):
        raise _directory_error(path, what)
    fh = open(path, "rb", opener=_nonblocking)  # noqa: SIM115 - returned to the caller
    try:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise (_directory_error(path, what)
                   if stat.S_ISDIR(st.st_mode) else _not_regular(path, st.st_mode, what))
        try:
            os.set_blocking(fh.fileno(), True)
        except OSError:  # pragma: no cover - regular files do not block anyway
            pass
    except BaseException:
        fh.close()
        raise
    return fh



# ----------------------------------------------------------------------------- identity
#: The identity of the file each on-disk stack was opened from, by ``id`` of the stack
#: (dropped with the stack): a file rewritten or replaced later is then noticed, not read.
_OPENED: dict = {}


def stat_identity(st) -> tuple:
    """The identity (inode, size, mtime, ctime) of a file from its ``os.stat`` result."""
    return _stat_identity(st)


def _stat_identity(st) -> tuple:
    # No st_dev: one NFS file has different device numbers on different hosts (Dask).
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_identity(path):
    """(inode, size, mtime, ctime) of ``path``, or None when it cannot be read."""
    try:
        return _stat_identity(os.stat(path))
    except OSError:
        return None


def _identity_file(stack):
    """The file that stands for ``stack``'s bytes: the mapped file, the HDF5 file, the
    Zarr array's metadata document (rewritten with the array)."""
    if file_backed(stack) or isinstance(stack, RawFileStack):
        return stack.filename
    if _is_h5py(stack):
        return stack.file.filename
    if _is_zarr(stack):
        root = getattr(stack.store_path.store, "root", None)
        if root is not None:
            base = os.path.join(os.fspath(root), stack.path) if stack.path else os.fspath(root)
            # The document there now (Zarr 3, or 2), or Zarr 3's name for one that is gone
            # (the store replaced under it: its identity is then None, a change).
            docs = [os.path.join(base, name) for name in ("zarr.json", ".zarray")]
            return next((doc for doc in docs if os.path.isfile(doc)), docs[0])
    return None


def remember_opened(stack, identity=None) -> None:
    """Record the identity of the file ``stack`` reads from; call it when ``stack`` is
    opened (the readers of :mod:`gpugroup.io` do, with the ``identity`` of the file they
    opened, taken from its descriptor; otherwise it is taken by name on first use)."""
    if id(stack) in _OPENED:
        return
    if identity is None and _is_h5py(stack):
        try:  # the open file's own, whatever is at its path now
            identity = _stat_identity(os.fstat(stack.file.id.get_vfd_handle()))
        except Exception:  # noqa: BLE001 - a driver without a file descriptor
            pass
    path = _identity_file(stack)
    if path is None:  # not a stack read by name later (e.g. a Fortran-ordered map)
        return
    if identity is None:
        identity = file_identity(path)
    if identity is None:
        return
    real = os.path.realpath(path)
    if _is_h5py(stack) and _open_elsewhere(real, identity):
        raise _scan_file_error(
            f"{path!r} was rewritten in place while an earlier scan still has it open in "
            f"this process, and HDF5 shares open files: it would serve the earlier contents. "
            f"Close the earlier scan (del it, or close its HDF5 file) and open this one again")
    _OPENED[id(stack)] = (identity, real)
    weakref.finalize(stack, _OPENED.pop, id(stack), None)


def _open_elsewhere(real, identity) -> bool:
    """Whether a live stack holds ``real`` open as an earlier version of the same file (same
    inode, another size or time); the per-process cache of opened stacks is dropped first
    (its entries may be the ones)."""
    def stale():
        return any(p == real and ident[0] == identity[0] and ident != identity
                   for ident, p in list(_OPENED.values()))

    if stale():
        _open_stack.cache_clear()
    return stale()


def _scan_file_error(message):

    return ScanFileError(message)


def opened_identity(stack):
    """The identity of the file ``stack`` was opened from (an open HDF5 file's own), or
    None for stacks not in a file."""
    if isinstance(stack, RawFileStack):
        return stack.identity
    remember_opened(stack)
    return _OPENED.get(id(stack), (None,))[0]


def check_unchanged(stack, replaced_ok: bool = False):
    """The identity of the file ``stack`` was opened from (None: not in a file), checked
    against the file at its path now. Raises ScanFileError when they differ, except, with
    ``replaced_ok``, when the path now names another file (or none): a memory map or an
    open HDF5 file still reads the old one (then returns "replaced"). A file rewritten in
    place always raises: its open map or handle would show the new bytes."""
    identity = opened_identity(stack)
    if identity is None:
        return None
    now = file_identity(_identity_file(stack))
    if now == identity:
        return identity
    if replaced_ok and (now is None or now[0] != identity[0]):
        return "replaced"
    raise changed_error(_identity_file(stack))


def changed_error(path):
    return _scan_file_error(f"{path!r} changed on disk after the scan was opened (rewritten "
                            f"or replaced): open it again to use the new file "
                            f"(RawData.from_file for a scan, open_grouped for a grouped output)")


# ----------------------------------------------------------------------------- references
@dataclasses.dataclass(frozen=True)
class StackRef:
    """Where a frame stack lives on disk, so another process can open it.

    ``kind`` is ``"raw"`` (bytes at ``offset`` in ``path``: ``.npy`` or an uncompressed
    ``.npz`` member), ``"hdf5"`` (dataset ``key`` of ``path``) or ``"zarr"`` (array
    ``key`` of the store at ``path``).
    """

    kind: str
    path: str
    key: str = ""
    offset: int = 0
    shape: tuple = ()
    dtype: str = ""
    identity: tuple = ()  # of the file the stack was opened from: see file_identity


def stack_ref(stack):
    """A :class:`StackRef` for an on-disk stack, or None for an in-memory one.

    Raises ScanFileError when the file was rewritten or replaced since ``stack`` was
    opened (another process would read the new file, not ``stack``'s data)."""
    if isinstance(stack, RawFileStack):
        ref = StackRef("raw", os.path.abspath(stack.filename), "", stack.offset, stack.shape,
                       stack.dtype.str)
    elif file_backed(stack):
        ref = StackRef("raw", os.path.abspath(stack.filename), "", int(stack.offset),
                       tuple(stack.shape), np.dtype(stack.dtype).str)
    elif _is_h5py(stack):
        ref = StackRef("hdf5", os.path.abspath(stack.file.filename), stack.name)
    elif _is_zarr(stack) and getattr(stack.store_path.store, "root", None) is not None:
        ref = StackRef("zarr", os.path.abspath(os.fspath(stack.store_path.store.root)),
                       stack.path)
    else:
        return None
    identity = check_unchanged(stack)
    return ref if identity is None else dataclasses.replace(ref, identity=identity)


def open_stack(ref: StackRef):
    """Open the stack ``ref`` names (read-only; cached, so each process opens it once).

    Raises ScanFileError when the file changed since ``ref`` was made."""
    return _open_stack(ref, os.getpid())  # keyed by pid: a forked child opens its own


@functools.lru_cache(maxsize=32)
def _open_stack(ref: StackRef, pid: int):
    if ref.kind == "raw":
        return RawFileStack(ref.path, ref.offset, ref.shape, np.dtype(ref.dtype),
                            ref.identity or None)  # checked at every read

    if ref.kind == "hdf5":
        h5py = require("h5py", "hdf5")
        stack = h5py.File(ref.path, "r")[ref.key]
    elif ref.kind == "zarr":
        zarr = require("zarr", "zarr")
        stack = zarr.open_array(ref.path, path=ref.key, mode="r")
    else:
        raise ValueError(f"unknown stack kind {ref.kind!r}")
    if ref.identity and opened_identity(stack) != ref.identity:
        raise changed_error(ref.path)
    return stack
