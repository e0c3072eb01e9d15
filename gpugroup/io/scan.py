"""Reading and writing whole scans, whatever their format: :func:`read_scan` (frame stacks
left on disk with ``mmap_mode="r"``), :func:`read_scan_slabs` (for copying any layout in
bounded memory) and :func:`write_scan` (atomically, stacks copied slab by slab)."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from gpugroup._xp import to_host
from gpugroup.io import npz
from gpugroup.io.atomic import array_bytes, atomic_path, check_interrupted
from gpugroup.io.formats import (
    FORMATS,
    format_of,
    npz_fields,
    open_target,
    output_format,
)
from gpugroup.io.frames import (
    path_present,
    raw_view,
    read_stack,
    remember_opened,
    stat_input,
)
from gpugroup.schema import GROUPED_MARKS, REQUIRED_FIELDS, SCAN_FIELDS, STACK_KEYS

#: Default bytes per slab when copying stacks (memory bound of ``write_scan``/``convert``).
DEFAULT_SLAB_BYTES = 64 << 20


def read_scan(path, *, mmap_mode=None, keys=None) -> dict:
    """A scan's arrays by field name, from any supported file.

    Parameters
    ----------
    path : str or path-like
        ``.npz``; a directory of ``KEY.npy`` files; ``.h5``/``.hdf5``/``.cxi``; ``.zarr``.
    mmap_mode : {None, "r"}
        None reads everything into memory. ``"r"`` leaves the frame stacks (``diff3d``,
        ``Y``) on disk: ``np.memmap`` for uncompressed NPZ members and ``.npy`` files,
        ``h5py.Dataset`` and ``zarr.Array`` otherwise.
    keys : dict, optional
        Field -> member/dataset path, e.g. ``{"diff3d": "/entry_1/data_1/data"}``.

    Raises
    ------
    FileNotFoundError
        No such file.
    OSError
        Unreadable, truncated or unknown file (``ScanFileError`` is also a ValueError).
    ValueError
        A compressed NPZ member with ``mmap_mode`` (the message says how to convert), a
        bare ``.npy`` file, or (HDF5/Zarr) required fields not found (the message lists
        the datasets there and the ``keys`` to pass).
    ImportError
        h5py or zarr missing (the message gives the pip line).
    TypeError
        ``keys`` is not a mapping of field names to strings.
    """
    path = os.fspath(path)
    keys = check_keys(keys)
    if path_present(path):  # (a missing file: the reader of its format says what is missing)
        stat_input(path)
    if mmap_mode not in (None, "r"):  # "r+" would map the user's scan writable
        raise ValueError(f"mmap_mode must be None (read into memory) or 'r' (frames left on "
                         f"disk, read-only), got mmap_mode={mmap_mode!r}")
    data = FORMATS[format_of(path)].read_scan(path, keys, mmap_mode)
    found = data.pop("_datasets", None)
    if found is not None:  # the reader listed what the file holds: say what is missing
        missing = [k for k in REQUIRED_FIELDS if k not in data]
        if missing:
            raise missing_fields_error(path, missing, found, keys)
    return _opened(data)


def _opened(data: dict) -> dict:
    """``data``, with the identity of the files its on-disk stacks were opened from noted
    (so that a file rewritten later is refused, not mixed in: see io.frames)."""
    for key in STACK_KEYS:
        if data.get(key) is not None:
            remember_opened(data[key])
    return data


def missing_fields_error(path, missing, found, keys=None) -> ValueError:
    """The error for a scan without required fields ``missing``: what was ``found`` and
    how to name where the fields are (saying so when ``keys`` named a place that is not
    there)."""
    named = {k: keys[k] for k in missing if keys and k in keys}
    if not named and set(GROUPED_MARKS) <= {str(f).strip("/") for f in found}:
        return ValueError(
            f"{path!r} is a grouped output (it holds {' and '.join(GROUPED_MARKS)}), not a "
            f"scan; "
            f"give the scan it was grouped from, or read it with "
            f"gpugroup.io.grouped.open_grouped({path!r})")
    example = ", ".join(f"{k!r}: '/path/to/{k}'" for k in missing)
    where = f"; keys names {named}, which it does not have" if named else ""
    return ValueError(
        f"{path!r} lacks required field(s) {missing} (found: {found}{where}); name where "
        f"they are with keys={{{example}}} (RawData.from_file(..., keys=...); on the "
        f"command line --key FIELD=PATH)")


def check_keys(keys) -> dict:
    """``keys`` (field -> where it is stored: a dict, or pairs) as a dict of str, its fields
    checked."""
    if keys is None:
        return {}
    given = keys
    try:
        pairs = keys if isinstance(keys, Mapping) else list(keys)
        if isinstance(keys, (str, bytes)) or (pairs is not keys and any(
                isinstance(p, (str, bytes)) for p in pairs)):
            pairs = None  # (dict() would take the string "xy" as the pair ("x", "y"))
        keys = None if pairs is None else dict(pairs)
    except (TypeError, ValueError):
        keys = None
    if keys is not None:  # HDF5 names may come as bytes
        try:
            keys = {k: v.decode() if isinstance(v, bytes) else v for k, v in keys.items()}
        except UnicodeDecodeError:
            keys = None
    if keys is None or not all(isinstance(v, str) for v in keys.values()):
        example = "{'diff3d': '/entry_1/data_1/data'}"
        if isinstance(given, str) and "=" in given:
            field, _, where = given.partition("=")
            example = repr({field.strip(): where.strip()})
        raise TypeError(f"keys must map a field to where it is stored (a dict of str), got "
                        f"keys={given!r}; pass e.g. keys={example} (on the command line "
                        f"--key FIELD=PATH)")
    unknown = sorted(set(keys) - set(SCAN_FIELDS) - {"diffraction"})
    if unknown:
        raise ValueError(f"keys names unknown field(s) {unknown}; fields are "
                         f"{', '.join(SCAN_FIELDS)}")
    if "diffraction" in keys:  # PtychoPINN's other name for diff3d, for every format
        where = keys.pop("diffraction")
        if keys.setdefault("diff3d", where) != where:
            raise ValueError(f"keys names the frames twice, diff3d={keys['diff3d']!r} and "
                             f"diffraction={where!r} (the same field); keep one")
    return keys


def copy_stack(sink, stack, slab_bytes=DEFAULT_SLAB_BYTES, progress=None):
    """Copy ``stack`` into ``sink`` in slabs of about ``slab_bytes`` (bounded memory).

    File-backed stacks are read with ``pread`` (:mod:`gpugroup.io.frames`), so a
    memory-mapped source does not stay resident."""
    src = raw_view(stack) or stack
    n = int(stack.shape[0])
    row = int(np.prod(stack.shape[1:], dtype=np.int64)) * np.dtype(stack.dtype).itemsize
    step = max(1, int(slab_bytes) // max(1, row))
    for a in range(0, n, step):
        check_interrupted()  # (a Ctrl-C that a finalizer dropped stops the copy)
        b = min(n, a + step)
        sink[a:b] = to_host(read_stack(src, slice(a, b)))
        if progress is not None:
            progress(b - a)


def write_scan(path, arrays: dict, *, slab_bytes=DEFAULT_SLAB_BYTES, overwrite=True,
               progress=None, fmt=None, check_space=True) -> str:
    """Write scan ``arrays`` (field -> array, frame stacks may be on disk) to ``path``
    (``.npz``, ``.h5`` or ``.zarr``; ``fmt`` overrides the suffix) atomically, stacks
    copied slab by slab.

    HDF5 stacks are contiguous and Zarr stacks unsharded, uncompressed, 1-16 frames per
    chunk: the layouts gpugroup reads fastest. Returns the absolute path. With
    ``check_space``, an output larger than the free space at ``path`` is refused up front.
    """
    fmt = fmt or output_format(path)
    with atomic_path(path, overwrite, nbytes=array_bytes(arrays.values()),
                     check_space=check_space) as tmp:
        target = open_target(tmp, fmt)
        try:
            for key, value in arrays.items():
                if value is None:
                    continue
                if key in STACK_KEYS and getattr(value, "ndim", 0) >= 1:
                    sink = target.create(key, value.shape, np.dtype(value.dtype))
                    copy_stack(sink, value, slab_bytes, progress)
                else:
                    target.put(key, np.asarray(value))
            target.close()
        except BaseException:
            target.discard()
            raise
    return os.path.abspath(os.fspath(path))


def read_scan_slabs(path, keys=None) -> dict:
    """A scan's arrays by field, its frame stacks readable slab by slab in bounded memory:
    compressed NPZ members streamed (:func:`gpugroup.io.npz.read_npz_streaming`), every
    other stack left on disk as with ``read_scan(path, mmap_mode="r")``. For copying a scan
    whatever its layout (``gpugroup convert``)."""
    path = os.fspath(path)
    if path_present(path):  # a device or FIFO is refused before anything reads it
        stat_input(path)
    if format_of(path) == "npz":
        return npz_fields(path, npz.read_npz_streaming(path), check_keys(keys))
    return read_scan(path, mmap_mode="r", keys=keys)
