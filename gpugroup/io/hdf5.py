"""HDF5 scans and outputs through h5py (``.h5``, ``.hdf5``, ``.cxi``).

A scan file holds the NPZ keys as datasets (paths configurable); CXI files keep their
frames at ``/entry_1/data_1/data``. Frame stacks are left on disk as ``h5py.Dataset``
objects when asked (``mmap_mode="r"``); the small fields are read.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import math
import os
import threading

import numpy as np

from gpugroup._optional import require
from gpugroup._xp import to_host
from gpugroup.io.frames import read_stack, stat_input, system_error
from gpugroup.schema import STACK_KEYS, ScanFileError, check_storable

logger = logging.getLogger(__name__)

#: Where CXI files keep things (the CXI 1.6 layout); overridable with ``keys``.
CXI_DEFAULTS = {
    "diff3d": ("entry_1/data_1/data", "entry_1/instrument_1/detector_1/data"),
    "probeGuess": ("entry_1/instrument_1/source_1/probe", "entry_1/image_1/probe"),
}
CXI_TRANSLATION = "entry_1/sample_1/geometry_1/translation"


def _open(path, mode="r", what="scan file"):
    h5py = require("h5py", "hdf5")
    if mode == "r":
        stat_input(path, what)  # a missing file said as for every format
    try:
        return h5py.File(path, mode)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if mode == "r":
            if not os.path.exists(path):
                raise FileNotFoundError(f"no such scan file: {path!r}") from exc
        if "unable to lock file" in str(exc) or getattr(exc, "errno", None) in (
                errno.EAGAIN, errno.EWOULDBLOCK):
            raise OSError(
                f"cannot open {path!r}: another process has it open for writing (HDF5 file "
                f"locking: {exc}). Wait until that writer closes it; if the writer is gone "
                f"and the lock is stale, or the file is only being read, set the environment "
                f"variable HDF5_USE_FILE_LOCKING=FALSE") from exc
        raise OSError(f"cannot open {path!r} as HDF5: {exc}. Is it an HDF5/CXI file "
                      f"(truncated, or another format)?") from exc


def read(path, keys: dict, wanted, mmap_mode=None, cxi=False) -> dict:
    """The fields ``wanted`` of HDF5 scan ``path`` by key (absent ones left out).

    ``keys`` maps a field to its dataset path (default: the field name at the root; CXI:
    :data:`CXI_DEFAULTS`). With ``mmap_mode`` the frame stacks stay ``h5py.Dataset``
    objects (the file stays open while they are referenced).
    """
    h5py = require("h5py", "hdf5")
    f = _open(path)
    out = {}
    try:
        with _metadata_errors(path):  # (damaged metadata: h5py raises many kinds)
            for field in wanted:
                candidates = _candidates(field, keys, cxi)
                for name in candidates:
                    obj = f.get(name)
                    if obj is None:
                        _check_link(path, name, f)
                        continue
                    if not isinstance(obj, h5py.Dataset):
                        raise ValueError(f"{path!r}: {name!r} (for {field!r}) is a group, "
                                         f"not a dataset; pass keys={{{field!r}: "
                                         f"'/path/to/dataset'}}")
                    check_written(path, name, obj)
                    if mmap_mode is not None and field in STACK_KEYS:
                        out[field] = obj
                    else:
                        out[field] = read_stack(obj)
                    break
            if cxi and ("xcoords" not in out or "ycoords" not in out) and CXI_TRANSLATION in f:
                t = np.asarray(read_stack(f[CXI_TRANSLATION]), dtype=np.float64)
                logger.info("%s: positions from %s (columns x, y, units as stored)", path,
                            CXI_TRANSLATION)
                out.setdefault("xcoords", t[:, 0])
                out.setdefault("ycoords", t[:, 1])
            if "_metadata" in f.attrs:
                out["_metadata"] = np.array(str(f.attrs["_metadata"]))
            out["_datasets"] = _dataset_names(f)
    finally:
        if not any(isinstance(v, h5py.Dataset) for v in out.values()):
            f.close()
    return out


@contextlib.contextmanager
def _metadata_errors(path):
    """What h5py raises for damaged metadata of ``path`` (KeyError, RuntimeError,
    TypeError, an OSError that is not the system's) as a ScanFileError naming the file."""
    try:
        yield
    except (ScanFileError, MemoryError):
        raise
    except (KeyError, RuntimeError, TypeError, OSError) as exc:
        if system_error(exc):
            raise
        raise ScanFileError(f"cannot read {path!r}: {type(exc).__name__}: {exc} (its HDF5 "
                            f"metadata is damaged?); copy the file again from its source, "
                            f"or write it again") from exc


def _check_link(path, name, f) -> None:
    """Refuse ``name`` where it is a link that leads nowhere (its target missing), rather
    than report the field as absent."""
    h5py = require("h5py", "hdf5")
    try:
        link = f.get(name, getlink=True)
    except (KeyError, OSError):  # (a missing group on the way)
        return
    if isinstance(link, h5py.ExternalLink):
        raise ScanFileError(f"{path!r}: {name!r} is an external link to {link.path!r} in "
                            f"{link.filename!r}, which cannot be opened (a missing or "
                            f"moved file?); put that file where the link points")
    if isinstance(link, h5py.SoftLink):
        raise ScanFileError(f"{path!r}: {name!r} is a link to {link.path!r}, which is not "
                            f"in the file; name the dataset with keys=")


def check_written(path, name, ds) -> None:
    """Refuse dataset ``name`` of ``path`` where part of it was never written, which HDF5
    reads as its fill value (zeros that would pass for frames or positions): chunks or
    contiguous storage never allocated, or a virtual dataset's source file or dataset
    missing. (Storage allocated and filled with the fill value cannot be told apart.)"""
    if not ds.size:  # (0, or None for a null dataspace: the reader says what it is)
        return
    if ds.is_virtual:
        _check_sources(path, name, ds)
        return
    if ds.chunks is None:
        if ds.id.get_storage_size() == 0:
            raise _unwritten(path, name, "none of it was ever written")
        return
    count = getattr(ds.id, "get_num_chunks", None)  # (h5py >= 3.0 with HDF5 >= 1.10.5)
    grid = [range(0, s, c) for s, c in zip(ds.shape, ds.chunks)]
    expected = math.prod(len(g) for g in grid)
    if count is None or count() >= expected:
        return
    stored = set()
    if hasattr(ds.id, "chunk_iter"):  # one pass over the chunk index (HDF5 >= 1.14)
        ds.id.chunk_iter(lambda info: stored.add(info.chunk_offset))
    else:
        stored.update(ds.id.get_chunk_info(i).chunk_offset for i in range(count()))
    first = next(c for c in itertools.product(*grid) if c not in stored)
    rows = f"{first[0]}..{min(first[0] + ds.chunks[0], ds.shape[0]) - 1}"
    raise _unwritten(path, name, f"{expected - count()} of its {expected} chunks were "
                     f"never written (the first holds rows {rows})")


def _check_sources(path, name, ds) -> None:
    """The source files and datasets of virtual dataset ``name`` (an Eiger/NeXus layout)
    exist, looked for as HDF5 looks: beside ``path`` or from the working directory."""
    h5py = require("h5py", "hdf5")
    if os.environ.get("HDF5_VDS_PREFIX"):
        return  # (HDF5 looks there first: leave it to HDF5)
    seen = set()
    for source in ds.virtual_sources():
        file_name, dset = source.file_name, source.dset_name
        if file_name == "." or "%" in file_name or (file_name, dset) in seen:
            continue  # (this file, or a printf-style pattern of many files)
        seen.add((file_name, dset))
        found = [f for f in (os.path.join(os.path.dirname(os.path.abspath(path)), file_name),
                             file_name) if os.path.isfile(f)]
        if not found:
            raise _unwritten(path, name, f"its source file {file_name!r} is missing",
                             "put the source files back beside it")
        with h5py.File(found[0], "r") as f:
            if dset not in f:
                raise _unwritten(path, name, f"its source file {found[0]!r} has no "
                                 f"dataset {dset!r}", "put the source files back beside it")


def _unwritten(path, name, what, fix="write it again in full") -> ScanFileError:
    return ScanFileError(f"{path!r}: dataset {name!r} is incomplete: {what}; HDF5 reads "
                         f"what was never written as its fill value (zeros that would pass "
                         f"for data), so it is refused; {fix}")


def _candidates(field, keys, cxi):
    if field in keys:
        return (keys[field],)
    names = [field]
    if field == "diff3d":
        names.append("diffraction")
    if cxi and field in CXI_DEFAULTS:
        names = list(CXI_DEFAULTS[field]) + names
    return tuple(names)


def _dataset_names(f, limit=40):
    h5py = require("h5py", "hdf5")
    names = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):  # (a name that is not UTF-8 comes as bytes)
            names.append("/" + (name.decode("utf-8", "backslashreplace")
                                if isinstance(name, bytes) else name))
        return None if len(names) < limit else True

    f.visititems(visit)
    return names


class _Hdf5Sink:
    """Thread-safe slice assignment into a dataset (h5py serializes calls anyway)."""

    def __init__(self, ds, lock):
        self._ds = ds
        self._lock = lock
        self.shape = ds.shape
        self.dtype = ds.dtype

    def __setitem__(self, key, value):

        value = to_host(value)
        with self._lock:
            self._ds[key] = value


class Hdf5Target:
    """Write datasets into a new HDF5 file (frame stacks chunked along axis 0 when
    ``chunk_rows`` is given, else contiguous, which readers can read fastest)."""

    def __init__(self, path):
        self.path = path
        self._f = _open(path, "w")
        self._lock = threading.Lock()
        self._held = []  # every dataset, open until the file closes: h5py closing one that
        # goes out of scope flushes it, and a failed write there is an exception Python drops

    def create(self, key, shape, dtype, chunk_rows=None):
        chunks = None
        if chunk_rows is not None and int(shape[0]) > 0:
            chunks = (max(1, min(int(chunk_rows), int(shape[0]))),) + tuple(shape[1:])
        ds = self._f.create_dataset(key, shape=tuple(shape), dtype=dtype, chunks=chunks)
        self._held.append(ds)
        return _Hdf5Sink(ds, self._lock)

    def put(self, key, array):

        array = to_host(array)
        check_storable(key, array)
        if array.dtype.kind == "U":
            self._f.attrs[key] = str(array)
        else:
            self._held.append(self._f.create_dataset(key, data=array))

    def close(self):
        try:  # everything written while the file is still open: a failure is reported
            self._f.flush()  # here, and the file can still be abandoned cleanly
        except BaseException:
            self.discard()
            raise
        self._f.close()

    def discard(self):
        """Close the file without writing anything more to it (it is removed next); a
        second call does nothing.

        After a failed write (a full disk, ``ulimit -f``) libhdf5 keeps the file open with
        unwritable dirty metadata: closing fails, and closing again or the library's own
        clean-up at exit then crashes the process (SIGSEGV; a bare h5py script does the
        same). So the file's descriptor is first pointed at ``/dev/null``; a flush there
        clears what a failed flush left half-done (it may itself report that), and the
        file then closes for good."""
        if self._f is None:
            return
        f, self._f = self._f, None
        try:
            fd = f.id.get_vfd_handle() if f.id.valid else None
        except Exception:  # noqa: BLE001 - closed already, or a driver without a descriptor
            fd = None
        if isinstance(fd, int) and fd >= 0:
            null = os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(null, fd)
            finally:
                os.close(null)
        for step in (f.flush, f.close):
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - already failing; the file goes next
                logger.debug("%s of the discarded HDF5 file %s: %s", step.__name__,
                             self.path, exc)


def read_grouped(path, stack_keys) -> dict:
    """A written grouped output: stacks as ``h5py.Dataset`` (of one read-only file),
    the rest as arrays."""
    h5py = require("h5py", "hdf5")
    f = _open(path, what="grouped output")
    out = {}
    for key, obj in f.items():
        if not isinstance(obj, h5py.Dataset):
            continue
        out[key] = obj if key in stack_keys else read_stack(obj)
    for key, value in f.attrs.items():
        out[key] = value
    if not any(isinstance(v, h5py.Dataset) for v in out.values()):
        f.close()
    return out
