"""The table of file formats: one :class:`Format` record per file type (its names and
magic bytes, how a scan is read from it, how a new file is written, how a grouped output
is read back), in the spirit of xarray's backend entrypoints. :func:`format_of` and
:func:`output_format` choose a record from a path; nothing else branches on suffixes.

The format modules (:mod:`~gpugroup.io.npz`, :mod:`~gpugroup.io.hdf5`,
:mod:`~gpugroup.io.zarr_io`) import h5py and zarr only when such a file is used; a
directory of ``KEY.npy`` files is read here.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from gpugroup.io import hdf5, npz, zarr_io
from gpugroup.io.frames import open_regular, remember_opened, stat_identity
from gpugroup.schema import GROUPED_MARKS, SCAN_FIELDS, STACK_KEYS, ScanFileError

logger = logging.getLogger(__name__)

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".cxi", ".nxs")


@dataclass(frozen=True)
class Format:
    """One file type.

    ``read_scan(path, keys, mmap_mode)`` returns the scan's fields by name (``keys``: field
    -> where it is stored); a reader that can list what the file holds adds it as
    ``"_datasets"``, and the required fields are then checked against it.
    ``target(path)`` opens a new file for writing (``create``/``put``/``close``/
    ``discard``), named with one of the suffixes ``written``; ``read_grouped(path,
    stack_keys)`` opens a grouped output (large entries lazily). Formats that cannot be
    written have neither.
    """

    name: str
    suffixes: tuple
    read_scan: Callable
    target: Callable | None = None
    read_grouped: Callable | None = None
    magic: bytes = b""
    directory: bool = False
    written: tuple = ()


def npz_fields(path, data, keys):
    """NPZ members ``data`` by field: members named in ``keys`` renamed; members that are
    no scan field logged (see :func:`warn_ignored`)."""
    for field, member in keys.items():
        member = member[:-4] if member.endswith(".npy") else member
        if member not in data:
            raise ValueError(f"{path!r} has no member {member!r} (keys={{{field!r}: "
                             f"{member!r}}}); its members are {sorted(data)}")
        data[field] = data.pop(member)
    warn_ignored(path, [k for k in data if k not in SCAN_FIELDS + ("diffraction", "_metadata")])
    return data


def warn_ignored(path, names) -> None:
    """Log the members of a scan archive (or arrays of a Zarr store) that are no scan field
    (a typo, or data that a conversion would drop); not those of a grouped output, which
    is no scan (reading it as one says so)."""
    if names and not set(GROUPED_MARKS) <= set(names):
        logger.warning("%r: ignoring %s %s: not scan fields (%s); name them with keys=... if "
                       "they are", path, "member" if len(names) == 1 else "members",
                       sorted(names), ", ".join(SCAN_FIELDS))


def warn_two_frame_stacks(path) -> None:
    """Log that scan ``path`` holds diff3d and its alias diffraction, and that diff3d is
    the one used (whatever the format)."""
    logger.warning("%r holds both diff3d and diffraction: using diff3d, ignoring "
                   "diffraction (two frame stacks, under the field's name and its alias)",
                   path)


def _read_npy(f, field, mmap_mode):
    """One ``.npy`` file of a scan directory, from one open file: read whole, or (with
    ``mmap_mode``) memory-mapped from that file's descriptor, its identity noted."""
    with open_regular(f, f"{field} file") as fh:
        if fh.read(6) != b"\x93NUMPY":
            raise ScanFileError(
                f"cannot read {f!r} ({field}): it is not a .npy file (no NumPy header: "
                f"truncated, or another format); write it with numpy.save")
        fh.seek(0)
        where = f"{f!r} ({field})"
        shape, fortran, dtype = npz.read_npy_header(fh, where, os.fstat(fh.fileno()).st_size)
        if dtype.hasobject:
            raise ScanFileError(
                f"cannot read {f!r} ({field}): it holds Python objects (a pickled object "
                f"array), which gpugroup never unpickles; save {field} as a numeric array")
        if mmap_mode is None or math.prod(shape) == 0:
            return npz.read_npy_data(fh, shape, fortran, dtype, where)
        stack = np.memmap(fh, dtype=dtype, mode=mmap_mode, offset=fh.tell(), shape=shape,
                          order="F" if fortran else "C")  # from the open file, not by name
        remember_opened(stack, stat_identity(os.fstat(fh.fileno())))
        return stack


def read_npy_dir(path, keys, mmap_mode):
    """The fields of a directory of ``KEY.npy`` files (``diff3d.npy`` memory-mapped with
    ``mmap_mode``)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no such scan file or directory: {path!r}")
    data, used = {}, set()
    for field in SCAN_FIELDS + ("_metadata",):
        name = keys.get(field, field)
        for candidate in ((name, "diffraction") if field == "diff3d" and field not in keys
                          else (name,)):
            f = os.path.join(path, candidate if candidate.endswith(".npy")
                             else candidate + ".npy")
            if os.path.lexists(f):
                lazy = mmap_mode if field in STACK_KEYS else None
                data[field] = _read_npy(f, field, lazy)
                used.add(os.path.basename(f))
                break
    data["_datasets"] = sorted(p for p in os.listdir(path) if p.endswith(".npy"))
    unused = [p[:-4] for p in data["_datasets"] if p not in used]
    if "diffraction" in unused and "diff3d" in data:
        unused.remove("diffraction")
        warn_two_frame_stacks(path)
    warn_ignored(path, unused)
    return data


def _read_npz(path, keys, mmap_mode):
    renamed = tuple(m[:-4] if m.endswith(".npy") else m
                    for f, m in keys.items() if f in STACK_KEYS)
    return npz_fields(path, npz.read_npz(path, mmap_mode, STACK_KEYS + renamed), keys)


def _read_hdf5(path, keys, mmap_mode):
    cxi = path.lower().endswith(".cxi")
    data = hdf5.read(path, keys, SCAN_FIELDS, mmap_mode, cxi=cxi)
    if not cxi:  # (a CXI file's top holds its own entries, cxi_version and the like)
        _warn_unknown(path, [n[1:] for n in data["_datasets"] if n.count("/") == 1], keys)
    return data


def _read_zarr(path, keys, mmap_mode):
    data = zarr_io.read(path, keys, SCAN_FIELDS, mmap_mode)
    _warn_unknown(path, data["_datasets"], keys)
    return data


def _warn_unknown(path, names, keys) -> None:
    """:func:`warn_ignored` for the top-level arrays ``names`` of an HDF5 file or Zarr store
    that are no scan field and not named in ``keys``."""
    named = {name.strip("/") for name in keys.values()}
    warn_ignored(path, [k for k in names
                        if k not in SCAN_FIELDS + ("diffraction",) and k not in named])


def _refuse_single_npy(path, keys, mmap_mode):
    raise ScanFileError(
        f"{path!r} is a single .npy array: it has no coordinates or probe. A scan needs "
        f"xcoords, ycoords, diff3d and probeGuess: pass a directory of KEY.npy files "
        f"(diff3d.npy is memory-mapped), an .npz, .h5 or .zarr file")


#: Every format gpugroup reads, by name; the ones with a ``target`` are also written.
FORMATS = {f.name: f for f in (
    Format("npz", (".npz",), _read_npz, npz.NpzTarget, npz.read_grouped,
           written=(".npz",)),
    # CXI and NeXus files (and .hdf) are read, not written: gpugroup writes plain HDF5,
    # the fields at the root, not those layouts
    Format("hdf5", HDF5_SUFFIXES, _read_hdf5, hdf5.Hdf5Target, hdf5.read_grouped,
           magic=b"\x89HDF\r\n\x1a\n", written=(".h5", ".hdf5")),
    Format("zarr", (".zarr",), _read_zarr, zarr_io.ZarrTarget, zarr_io.read_grouped,
           directory=True, written=(".zarr",)),
    Format("npy-dir", (), read_npy_dir, directory=True),
    Format("npy", (".npy",), _refuse_single_npy, magic=b"\x93NUMPY"),
)}
#: What an output may be named.
OUTPUT_SUFFIXES = tuple(s for f in FORMATS.values() for s in f.written)


def looks_like_zarr(path) -> bool:
    """Whether the directory ``path`` holds a Zarr store's metadata."""
    return zarr_io.has_metadata(path)


def format_of(path) -> str:
    """The name of the format of ``path`` (a key of :data:`FORMATS`): from its suffix; a
    directory is a Zarr store or a directory of ``.npy`` files; an existing file with
    another suffix by its magic bytes; else ``"npz"`` (whose reader says what is wrong)."""
    path = os.fspath(path)
    lower = path.rstrip("/\\").lower()
    if lower.endswith(".zarr"):
        return "zarr"
    if os.path.isdir(path):
        return "zarr" if looks_like_zarr(path) else "npy-dir"
    for fmt in FORMATS.values():
        if not fmt.directory and lower.endswith(fmt.suffixes):
            return fmt.name
    if os.path.isfile(path):
        with open_regular(path) as fh:
            head = fh.read(8)
        for fmt in FORMATS.values():
            if fmt.magic and head.startswith(fmt.magic):
                return fmt.name
    return "npz"


def output_format(path) -> str:
    """The format to write ``path`` in, from its suffix (:data:`OUTPUT_SUFFIXES`)."""
    lower = os.fspath(path).rstrip("/\\").lower()
    for fmt in FORMATS.values():
        if lower.endswith(fmt.written):
            return fmt.name
    layout = next((s for s in HDF5_SUFFIXES if lower.endswith(s)), None)
    if layout is not None:
        raise ValueError(f"cannot write {os.fspath(path)!r}: gpugroup reads {layout} files "
                         f"but writes plain HDF5 (the fields at the root), not that layout; "
                         f"name the output *.h5 (or *.npz, *.zarr)")
    raise ValueError(f"cannot tell the output format of {os.fspath(path)!r}: name it "
                     f"*.npz, *.h5 (or .hdf5) or *.zarr")


def open_target(path, fmt):
    """A writer (``create``/``put``/``close``/``discard``) for a new ``fmt`` file at
    ``path`` (a temporary path from :func:`gpugroup.io.atomic.atomic_path`)."""
    target = FORMATS[fmt].target if fmt in FORMATS else None
    if target is None:
        raise ValueError(f"cannot write {fmt!r} files; write .npz, .h5 or .zarr")
    return target(path)
