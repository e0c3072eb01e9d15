"""Scan and grouped-data files: NPZ (memory-mapped members), ``.npy`` directories, HDF5
(``.h5``/``.hdf5``/``.cxi``) and Zarr (``.zarr``), read lazily and written in slabs.

``read_scan`` returns a scan's arrays by key (frame stacks left on disk with
``mmap_mode="r"``); ``write_scan`` writes one atomically; ``gpugroup.io.grouped``
holds the grouped-output layout. h5py and zarr are imported only when such a file is used.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import tempfile

import numpy as np
from numpy.lib import format as npy_format

from gpugroup._xp import to_host
from gpugroup.io import hdf5, npz, zarr_io
from gpugroup.io.frames import (path_present, open_regular, raw_view, remember_opened,
                                stat_identity, stat_input)
from gpugroup.schema import REQUIRED_FIELDS, SCAN_FIELDS, STACK_KEYS, ScanFileError

logger = logging.getLogger(__name__)

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".cxi", ".nxs")
FORMATS = ("npz", "hdf5", "zarr", "npy-dir")
#: Default bytes per slab when copying stacks (memory bound of ``write_scan``/``convert``).
DEFAULT_SLAB_BYTES = 64 << 20

def format_of(path) -> str:
    """``"npz"``, ``"hdf5"``, ``"zarr"``, ``"npy-dir"`` or ``"npy"`` from the name (and, for
    an existing file with another suffix, its magic bytes)."""
    path = os.fspath(path)
    stripped = path.rstrip("/\\")
    lower = stripped.lower()
    if lower.endswith(".zarr"):
        return "zarr"
    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(path, m)) for m in ("zarr.json", ".zgroup")):
            return "zarr"
        return "npy-dir"
    if lower.endswith(".npz"):
        return "npz"
    if lower.endswith(".npy"):
        return "npy"
    if lower.endswith(HDF5_SUFFIXES):
        return "hdf5"
    if os.path.isfile(path):
        with open_regular(path) as fh:
            magic = fh.read(8)
        if magic == b"\x89HDF\r\n\x1a\n":
            return "hdf5"
        if magic[:6] == b"\x93NUMPY":
            return "npy"
    return "npz"  # the historical default: the NPZ reader explains what is wrong


# ----------------------------------------------------------------------------- reading
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
    """
    path = os.fspath(path)
    keys = check_keys(keys)
    if path_present(path):  # (a missing file: the reader of its format says what is missing)
        stat_input(path)
    if mmap_mode not in (None, "r"):  # "r+" would map the user's scan writable
        raise ValueError(f"mmap_mode must be None (read into memory) or 'r' (frames left on "
                         f"disk, read-only), got mmap_mode={mmap_mode!r}")
    fmt = format_of(path)
    if fmt == "npy":
        raise ScanFileError(
            f"{path!r} is a single .npy array: it has no coordinates or probe. A scan needs "
            f"xcoords, ycoords, diff3d and probeGuess: pass a directory of KEY.npy files "
            f"(diff3d.npy is memory-mapped), an .npz, .h5 or .zarr file"
        )
    if fmt == "npz":
        renamed = tuple(m[:-4] if m.endswith(".npy") else m
                        for f, m in keys.items() if f in STACK_KEYS)
        return _opened(_npz_fields(path, npz.read_npz(path, mmap_mode, STACK_KEYS + renamed),
                                   keys))
    if fmt == "npy-dir":
        data = _read_npy_dir(path, mmap_mode, keys)
    elif fmt == "hdf5":
        data = hdf5.read(path, keys, SCAN_FIELDS, mmap_mode,
                         cxi=path.lower().endswith(".cxi"))
    else:
        data = zarr_io.read(path, keys, SCAN_FIELDS, mmap_mode)
    found = data.pop("_datasets", None)
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
    example = ", ".join(f"{k!r}: '/path/to/{k}'" for k in missing)
    where = f"; keys names {named}, which it does not have" if named else ""
    return ValueError(
        f"{path!r} lacks required field(s) {missing} (found: {found}{where}); name where "
        f"they are with keys={{{example}}} (RawData.from_file(..., keys=...); on the "
        f"command line --key FIELD=PATH)")


def check_keys(keys) -> dict:
    """``keys`` (field -> where it is stored) as a dict, its fields checked."""
    keys = dict(keys or {})
    unknown = sorted(set(keys) - set(SCAN_FIELDS) - {"diffraction"})
    if unknown:
        raise ValueError(f"keys names unknown field(s) {unknown}; fields are "
                         f"{', '.join(SCAN_FIELDS)}")
    return keys


def _npz_fields(path, data, keys):
    """NPZ members ``data`` by field: members named in ``keys`` renamed; members that are
    no scan field logged (see :func:`_warn_ignored`)."""
    for field, member in keys.items():
        member = member[:-4] if member.endswith(".npy") else member
        if member not in data:
            raise ValueError(f"{path!r} has no member {member!r} (keys={{{field!r}: "
                             f"{member!r}}}); its members are {sorted(data)}")
        data[field] = data.pop(member)
    _warn_ignored(path, [k for k in data if k not in SCAN_FIELDS + ("diffraction", "_metadata")])
    return data


def _warn_ignored(path, names) -> None:
    """Log the members of a scan archive that are no scan field (a typo, or data that a
    conversion would drop)."""
    if names:
        logger.warning("%r: ignoring %s %s: not scan fields (%s); name them with keys=... if "
                       "they are", path, "member" if len(names) == 1 else "members",
                       sorted(names), ", ".join(SCAN_FIELDS))


def _read_npy(f, field, mmap_mode):
    """One ``.npy`` file of a scan directory, from one open file: read whole, or (with
    ``mmap_mode``) memory-mapped from that file's descriptor, its identity noted."""
    with open_regular(f, f"{field} file") as fh:
        if fh.read(6) != b"\x93NUMPY":
            raise ScanFileError(
                f"cannot read {f!r} ({field}): it is not a .npy file (no NumPy header: "
                f"truncated, or another format); write it with numpy.save")
        fh.seek(0)
        try:
            shape, fortran, dtype = npz.read_npy_header(fh)
        except (ValueError, EOFError, OSError) as exc:
            raise ScanFileError(f"cannot read {f!r} ({field}): a damaged .npy header "
                                f"({exc}); write it again with numpy.save") from exc
        if dtype.hasobject:
            raise ScanFileError(
                f"cannot read {f!r} ({field}): it holds Python objects (a pickled object "
                f"array), which gpugroup never unpickles; save {field} as a numeric array")
        offset = fh.tell()
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        size = os.fstat(fh.fileno()).st_size
        if offset + nbytes > size:
            raise ScanFileError(f"cannot read {f!r} ({field}): truncated ({size} bytes, "
                                f"{offset + nbytes} needed for shape {shape} {dtype})")
        if mmap_mode is None or nbytes == 0:
            fh.seek(0)
            return npy_format.read_array(fh, allow_pickle=False)
        stack = np.memmap(fh, dtype=dtype, mode=mmap_mode, offset=offset, shape=shape,
                          order="F" if fortran else "C")  # from the open file, not by name
        remember_opened(stack, stat_identity(os.fstat(fh.fileno())))
        return stack


def _read_npy_dir(path, mmap_mode, keys):
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
    _warn_ignored(path, [p[:-4] for p in data["_datasets"] if p not in used])
    return data


# ----------------------------------------------------------------------------- writing
def same_path(a, b) -> bool:
    """Whether ``a`` and ``b`` name the same file or directory (symbolic and hard links
    resolved), so that writing ``b`` would replace ``a``."""
    a, b = (os.fspath(p).rstrip("/\\") or os.sep for p in (a, b))
    try:
        if os.path.samefile(a, b):
            return True
    except OSError:  # one of them does not exist (yet)
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def check_output(path, *, overwrite: bool = True, source=None, option: str = "out") -> None:
    """Refuse, before any work, an output ``path`` that would replace the scan ``source``
    (links resolved), an existing ``path`` without ``overwrite``, a directory where a file
    goes, or a directory that is not a Zarr store where a ``.zarr`` store goes; and a
    missing or unwritable parent directory. ``option`` names the argument in messages."""
    label = f"{option} {os.fspath(path)!r}"
    if source is not None and same_path(source, path):
        raise ValueError(f"{label} is the input scan {os.fspath(source)!r} (links resolved); "
                         f"write to another name")
    is_dir = format_of(path) == "zarr"
    if os.path.lexists(path):
        if not overwrite:
            raise FileExistsError(f"{label} exists; pass overwrite=True (--overwrite on the "
                                  f"command line) to replace it, or choose another name")
        if os.path.isdir(path) and not is_dir:
            raise FileExistsError(f"{label} is an existing directory, where the output is a "
                                  f"file: choose another name")
        if is_dir and os.path.isdir(path) and not _looks_like_zarr(path):
            raise FileExistsError(f"{label} exists and is not a Zarr store; refusing to replace "
                                  f"it (remove it or choose another name)")
    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{label}: the directory {directory!r} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(f"{label}: cannot write in the directory {directory!r}; "
                              f"choose a writable one")


#: Margin over an output's estimated bytes (headers, metadata, chunk indexes).
_SPACE_MARGIN = 1.02
_SPACE_SLACK = 1 << 20


def check_free_space(path, nbytes, *,
                     skip: str = "check_space=False (--no-space-check on the command "
                     "line)") -> None:
    """Refuse, before writing, an output of about ``nbytes`` bytes that does not fit in the
    free space at ``path``'s directory (``shutil.disk_usage``); the message gives both
    numbers and the path. ``skip`` says how to skip the check (for filesystems that
    report no or wrong free space)."""
    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    try:
        free = shutil.disk_usage(directory).free
    except OSError as exc:
        logger.info("free space at %s unknown (%s): not checked", directory, exc)
        return
    need = int(int(nbytes) * _SPACE_MARGIN) + _SPACE_SLACK
    if need > free:
        raise _with_errno(OSError(
            f"not enough free space for {os.fspath(path)!r}: the output needs about "
            f"{need:,} bytes ({need / 1e9:.2f} GB) but {directory!r} has {free:,} bytes "
            f"({free / 1e9:.2f} GB) free; free space, write elsewhere or make a smaller "
            f"output (fewer groups, no diffraction copy); skip this check with {skip} if "
            f"the filesystem reports free space wrongly"), errno.ENOSPC)
    logger.debug("output %s: about %d bytes, %d free", path, need, free)


def _looks_like_zarr(path) -> bool:
    return any(os.path.exists(os.path.join(path, m)) for m in ("zarr.json", ".zgroup"))


@contextlib.contextmanager
def atomic_path(path, overwrite: bool = True, *, nbytes=None, check_space: bool = True):
    """Yield a temporary path beside ``path``; rename it to ``path`` on success.

    On any exception (KeyboardInterrupt included) the temporary file or directory is
    removed and nothing appears under ``path`` (an existing ``path`` is left as it was).
    Zarr outputs are directories: an existing store is replaced only if it is a Zarr store
    at the moment of the rename. Without ``overwrite`` the rename itself refuses an
    existing ``path`` (``renameat2(RENAME_NOREPLACE)``, else ``link`` + ``unlink`` or an
    exclusive ``mkdir``), so two runs started together cannot both publish.

    ``nbytes``, when given, is the output's estimated size: with ``check_space``, too
    little free space at ``path`` is refused before anything is written
    (:func:`check_free_space`). A write error (full disk, file-size limit) names ``path``.
    """
    check_output(path, overwrite=overwrite)
    if nbytes is not None and check_space:
        check_free_space(path, nbytes)
    path = os.path.abspath(os.fspath(path))
    directory, base = os.path.split(path)
    is_dir = format_of(path) == "zarr"
    prefix = f".{base}."
    umask = _umask()
    if is_dir:
        tmp = tempfile.mkdtemp(prefix=prefix, suffix=".gpugroup-part", dir=directory)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the usual permissions
    else:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".gpugroup-part", dir=directory)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        if not is_dir:  # data on disk before the name points at it (crash safety)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        with signals_deferred():  # a Ctrl-C must not stop the renames half-way
            if overwrite:
                _replace(tmp, path, is_dir)
            else:
                _publish_new(tmp, path, is_dir)
    except BaseException as exc:
        with signals_deferred():  # nor a second Ctrl-C the clean-up
            if is_dir:  # its writers (zarr's I/O thread, Dask tasks) may still be writing
                settle_removed(tmp)
            else:
                _remove(tmp)
        named = write_error(exc, path)
        if named is not exc:
            raise named from exc
        raise


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT and SIGTERM until the block ends, then deliver them (to the handlers in
    place before). Only in the main thread, where Python runs signal handlers."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    held = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if callable(handler):  # a Python handler (SIG_DFL/SIG_IGN stay as they are)
            held[signum] = handler
            signal.signal(signum, lambda s, frame: caught.append(s))
    try:
        yield
    finally:
        for signum, handler in held.items():
            signal.signal(signum, handler)
        for signum in caught:
            signal.raise_signal(signum)


def _umask() -> int:
    try:  # read it without changing it (os.umask would race with other threads)
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: ``renameat2`` flag: fail with EEXIST when the target exists (Linux >= 3.15).
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _rename_noreplace(src, dst) -> bool:
    """Rename ``src`` to ``dst`` unless ``dst`` exists, atomically (``renameat2`` with
    ``RENAME_NOREPLACE`` through ctypes). Returns False where that is not available (not
    Linux, an old kernel or C library, a filesystem without it); raises FileExistsError
    when ``dst`` exists."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint)
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst),
                 _RENAME_NOREPLACE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EEXIST, errno.ENOTEMPTY):
        raise FileExistsError(err, os.strerror(err), os.fspath(dst))
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(dst))


def _exists_error(path) -> FileExistsError:
    return FileExistsError(
        f"{path!r} appeared while the output was written (another run writing the same "
        f"name?) and overwrite=False (--no-overwrite): it was left as it is and the new "
        f"output discarded; choose another name or pass overwrite=True")


def _publish_new(tmp, path, is_dir) -> None:
    """Rename ``tmp`` to ``path`` only if nothing is at ``path``, atomically: at most one
    of several runs publishing the same name succeeds; the others raise FileExistsError
    (and remove their own temporary output, nothing else)."""
    try:
        if _rename_noreplace(tmp, path):
            return
        if not is_dir:  # a hard link fails if the name exists; then drop the temporary name
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise
            except OSError as exc:  # no hard links here: an exclusive placeholder, replaced
                logger.debug("no hard links in %s (%s): exclusive create, then rename",
                             os.path.dirname(path), exc)
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                os.replace(tmp, path)
                return
            os.unlink(tmp)
            return
        _rename_dir_new(tmp, path)
    except FileExistsError:
        raise _exists_error(path) from None


def _replace(tmp, path, is_dir):
    """Rename ``tmp`` to ``path``. An existing store at ``path`` is moved aside first and
    removed after, if it is a Zarr store at that moment (anything else is put back and
    refused: gpugroup removes nothing it did not create); interrupted anywhere, one
    complete store stays under ``path`` (the new one once it got there, else the old one,
    put back) and no moved-aside copy is left."""
    if not is_dir:
        os.replace(tmp, path)
        return
    for _ in range(100):  # another process may keep creating and removing the name
        if not os.path.lexists(path):
            try:
                _rename_dir_new(tmp, path, noreplace=False)
            except FileExistsError:
                continue  # created meanwhile: check what it is
            return
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".gpugroup-old",
                               dir=os.path.dirname(path))
        os.rmdir(old)
        try:
            try:
                os.rename(path, old)  # now under a name only this run uses
            except FileNotFoundError:
                continue  # gone meanwhile
            if not _replaceable(old):
                raise FileExistsError(
                    f"{path!r} was replaced by something that is not a Zarr store while the "
                    f"output was written; refusing to remove it (it was left as it is and "
                    f"the new output discarded): remove it or choose another name")
            _rename_dir_new(tmp, path, noreplace=False)  # (nor a name created meanwhile)
        finally:
            if os.path.lexists(old):
                if os.path.lexists(path) and _replaceable(old) and not os.path.lexists(tmp):
                    try:
                        _remove(old)
                    except BaseException:  # interrupted while removing: finish, then go on
                        _remove(old)
                        raise
                else:
                    _put_back(old, path)
        return
    raise FileExistsError(f"{path!r} keeps changing while the output is published; "
                          f"choose another name")


def _rename_dir_new(tmp, path, noreplace: bool = True) -> None:
    """Rename the directory ``tmp`` to ``path`` only if nothing is there (FileExistsError
    otherwise): ``renameat2(RENAME_NOREPLACE)`` (with ``noreplace``, where available),
    else claim the name with an exclusive ``mkdir`` and rename onto that empty claim (a
    plain rename would replace anyone's empty directory). Interrupted, the claim is
    removed while it is still empty."""
    if noreplace and _rename_noreplace(tmp, path):
        return
    os.mkdir(path)  # EEXIST: taken
    try:
        os.rename(tmp, path)
    except BaseException as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(exc.errno, exc.strerror, path) from None  # filled: theirs
        if os.path.lexists(tmp):  # not renamed: drop the claim if it is still empty
            with contextlib.suppress(OSError):
                os.rmdir(path)
        raise


def _replaceable(old) -> bool:
    """What a ``.zarr`` output may replace (as :func:`check_output` allows): a Zarr store,
    a file or a link; never another directory."""
    return not os.path.isdir(old) or os.path.islink(old) or _looks_like_zarr(old)


def _put_back(old, path) -> None:
    """Rename the moved-aside ``old`` back to ``path``, unless a new ``path`` appeared
    meanwhile (then ``old`` stays, logged, rather than replacing someone's)."""
    try:
        if not _rename_noreplace(old, path):
            if os.path.lexists(path):
                raise FileExistsError(path)
            os.rename(old, path)
    except FileExistsError:
        logger.warning("%r appeared meanwhile; the earlier contents of that name are kept "
                       "as %r", path, old)


def write_error(exc, path):
    """``exc``, or for a write error that does not name ``path`` (a full disk, a file-size
    limit: a bare "[Errno 28]", or libhdf5's message about the temporary file, which h5py
    raises as OSError or RuntimeError with "errno = 28" in its text) an OSError of that
    errno that names ``path``, with the fix."""
    if not isinstance(exc, (OSError, RuntimeError)) or os.fspath(path) in str(exc):
        return exc
    code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    if code is None:  # libhdf5's messages carry it in the text: "errno = 28"
        found = re.search(r"errno = (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    hint = {errno.ENOSPC: "free space there or write elsewhere",
            errno.EDQUOT: "the disk quota is exhausted: free space or write elsewhere",
            errno.EFBIG: "the file is larger than the file-size limit (ulimit -f) or the "
                         "filesystem allows: raise the limit or write elsewhere"}.get(code)
    if hint is None:
        return exc
    kind = type(exc) if isinstance(exc, OSError) else OSError
    return _with_errno(kind(f"{os.strerror(code)} while writing {os.fspath(path)!r}: "
                            f"{hint} (the partial output was removed)"), code)


def _with_errno(exc, code):
    """``exc`` (one message, so no "[Errno N]" prefix) with ``errno`` set to ``code``."""
    exc.errno = code
    return exc


def _remove(tmp):
    try:
        if os.path.isdir(tmp) and not os.path.islink(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.unlink(tmp)
    except OSError:  # pragma: no cover - best effort while already failing
        logger.warning("could not remove temporary %s", tmp)


def settle_removed(tmp, seconds: float = 5.0) -> None:
    """Remove the directory ``tmp`` until it stays gone (for up to ``seconds``): writers
    still running after a failure (zarr's I/O thread, other Dask tasks) may recreate it."""
    import time

    deadline = time.monotonic() + seconds
    quiet = 0
    while time.monotonic() < deadline and quiet < 5:
        if os.path.lexists(tmp):
            _remove(tmp)
            quiet = 0
        else:
            quiet += 1
        time.sleep(0.05)


def open_target(path, fmt):
    """A writer (``create``/``put``/``close``/``discard``) for a new ``fmt`` file at
    ``path`` (a temporary path from :func:`atomic_path`)."""
    targets = {"npz": npz.Target, "hdf5": hdf5.Target, "zarr": zarr_io.Target}
    if fmt not in targets:
        raise ValueError(f"cannot write {fmt!r} files; write .npz, .h5 or .zarr")
    return targets[fmt](path)


def output_format(path) -> str:
    """The format to write ``path`` in, from its suffix (``.npz``, ``.h5``/``.hdf5``/
    ``.cxi``, ``.zarr``)."""
    p = os.fspath(path).rstrip("/\\").lower()
    if p.endswith(".npz"):
        return "npz"
    if p.endswith(HDF5_SUFFIXES):
        return "hdf5"
    if p.endswith(".zarr"):
        return "zarr"
    raise ValueError(f"cannot tell the output format of {os.fspath(path)!r}: name it "
                     f"*.npz, *.h5 (or .hdf5) or *.zarr")


def copy_stack(sink, stack, slab_bytes=DEFAULT_SLAB_BYTES, progress=None):
    """Copy ``stack`` into ``sink`` in slabs of about ``slab_bytes`` (bounded memory).

    File-backed stacks are read with ``pread`` (:mod:`gpugroup.io.frames`), so a
    memory-mapped source does not stay resident."""
    src = raw_view(stack) or stack
    n = int(stack.shape[0])
    row = int(np.prod(stack.shape[1:], dtype=np.int64)) * np.dtype(stack.dtype).itemsize
    step = max(1, int(slab_bytes) // max(1, row))
    for a in range(0, n, step):
        b = min(n, a + step)
        sink[a:b] = to_host(src[a:b])
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
    nbytes = sum(int(np.prod(getattr(v, "shape", ()), dtype=np.int64))
                 * np.dtype(getattr(v, "dtype", np.float64)).itemsize
                 for v in arrays.values() if v is not None)
    with atomic_path(path, overwrite, nbytes=nbytes, check_space=check_space) as tmp:
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
        return _npz_fields(path, npz.read_npz_streaming(path), check_keys(keys))
    return read_scan(path, mmap_mode="r", keys=keys)


__all__ = ["STACK_KEYS", "SCAN_FIELDS", "ScanFileError", "format_of", "read_scan",
           "stat_input", "open_regular", "check_free_space",
           "read_scan_slabs", "write_scan", "atomic_path", "same_path", "check_output", "check_keys",
           "open_target", "output_format", "copy_stack"]
