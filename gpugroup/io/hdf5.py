"""HDF5 scans and outputs through h5py (``.h5``, ``.hdf5``, ``.cxi``).

A scan file holds the NPZ keys as datasets (paths configurable); CXI files keep their
frames at ``/entry_1/data_1/data``. Frame stacks are left on disk as ``h5py.Dataset``
objects when asked (``mmap_mode="r"``); the small fields are read.
"""

from __future__ import annotations

import errno
import logging
import os
import threading

import numpy as np

from gpugroup._optional import require
from gpugroup._xp import to_host
from gpugroup.io.frames import read_stack, stat_input
from gpugroup.schema import STACK_KEYS, check_storable

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
        for field in wanted:
            candidates = _candidates(field, keys, cxi)
            for name in candidates:
                obj = f.get(name)
                if obj is None:
                    continue
                if not isinstance(obj, h5py.Dataset):
                    raise ValueError(f"{path!r}: {name!r} (for {field!r}) is a group, not a "
                                     f"dataset; pass keys={{{field!r}: '/path/to/dataset'}}")
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
        if isinstance(obj, h5py.Dataset):
            names.append("/" + name)
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
