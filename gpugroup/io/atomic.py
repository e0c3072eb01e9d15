"""Outputs that appear whole or not at all: checks before any work (the input scan, an
existing name, free space), a temporary name renamed when complete (never over a name that
appeared meanwhile without ``overwrite``), clean-up on any failure, signals held while the
names change, and write errors that name the output."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time

import numpy as np

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locks, so leftovers are never swept
    fcntl = None

from gpugroup.io.formats import format_of, looks_like_zarr

logger = logging.getLogger(__name__)


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
        if is_dir and os.path.isdir(path) and not looks_like_zarr(path):
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


def array_bytes(values) -> int:
    """Bytes of the arrays among ``values`` (anything with a shape and a dtype, on disk or
    lazy included), as an uncompressed output stores them: the size to check free space
    for."""
    return sum(int(np.prod(v.shape, dtype=np.int64)) * np.dtype(v.dtype).itemsize
               for v in values if hasattr(v, "shape") and hasattr(v, "dtype"))


def check_free_space(path, nbytes, *,
                     skip: str = "check_space=False (--no-space-check on the command "
                     "line)") -> None:
    """Refuse, before writing, an output of about ``nbytes`` bytes that does not fit in the
    free space at ``path``'s directory (``shutil.disk_usage``); the message gives both
    numbers and the path. ``skip`` says how to skip the check (for filesystems that
    report no or wrong free space). What killed runs writing ``path`` left is removed
    first (:func:`sweep_leftovers`): it may be what filled the disk."""
    directory, base = os.path.split(os.path.abspath(os.fspath(path)))
    sweep_leftovers(directory, base)
    try:
        free = shutil.disk_usage(directory).free
    except OSError as exc:
        logger.info("free space at %s unknown (%s): not checked", directory, exc)
        return
    need = int(int(nbytes) * _SPACE_MARGIN) + _SPACE_SLACK
    if need > free:
        raise _with_errno(OSError(
            f"not enough free space for {os.fspath(path)!r}: the output needs about "
            f"{need:,} bytes ({need / 1e9:.2f} GB, with 2% and 1 MiB of headroom) but "
            f"{directory!r} has {free:,} bytes "
            f"({free / 1e9:.2f} GB) free; free space, write elsewhere or make a smaller "
            f"output (fewer groups, no diffraction copy); skip this check with {skip} if "
            f"the filesystem reports free space wrongly"), errno.ENOSPC)
    logger.debug("output %s: about %d bytes, %d free", path, need, free)


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
    path = os.path.abspath(os.fspath(path))
    directory, base = os.path.split(path)
    if nbytes is not None and check_space:
        check_free_space(path, nbytes)  # (which sweeps leftovers first)
    else:
        sweep_leftovers(directory, base)
    is_dir = format_of(path) == "zarr"
    umask = _umask()
    with _named(path):  # (a full disk may refuse the lock file already)
        lock_fd, lock = _claim(directory, base)
    tmp = lock[:-len(_LOCK)] + _PART
    with _interrupts_noted(), _named(path):  # (a Ctrl-C dropped in a finalizer stops it)
        try:
            if is_dir:
                os.mkdir(tmp, 0o777 & ~umask)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~umask))
            yield tmp
            if not is_dir:  # data on disk before the name points at it (crash safety)
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            check_interrupted()  # a Ctrl-C whose KeyboardInterrupt Python dropped
            with signals_deferred():  # a Ctrl-C must not stop the renames half-way
                if overwrite:
                    _replace(tmp, path, is_dir)
                else:
                    _publish_new(tmp, path, is_dir)
        except BaseException:
            with signals_deferred():  # nor a second Ctrl-C the clean-up
                if is_dir:  # its writers (zarr's I/O thread, Dask tasks) may still be writing
                    settle_removed(tmp)
                else:
                    _remove(tmp)
            raise
        finally:
            _release(lock_fd, lock)


@contextlib.contextmanager
def _named(path):
    """Raise a write error that does not name ``path`` as :func:`write_error` names it."""
    try:
        yield
    except BaseException as exc:
        named = write_error(exc, path)
        if named is not exc:
            raise named from exc
        raise


_interrupted: list = []  # SIGINTs received while an output was written (main thread)


@contextlib.contextmanager
def _interrupts_noted():
    """While an output is written in the main thread, note each SIGINT whose handler
    raises KeyboardInterrupt. Python drops an exception raised in a finalizer (h5py closes
    objects in weakref callbacks: "Exception ignored in ..."), so that KeyboardInterrupt
    may not stop the write; :func:`check_interrupted` raises it again."""
    before = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(before):
        yield  # (another thread cannot set handlers; an ignored SIGINT raises nothing)
        return
    mark = len(_interrupted)

    def noted(signum, frame):
        try:
            before(signum, frame)
        except KeyboardInterrupt:  # (a handler of the program's that does not raise is
            _interrupted.append(signum)  # left to do what it does)
            raise

    signal.signal(signal.SIGINT, noted)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
        del _interrupted[mark:]


def check_interrupted() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed while an output was being written
    (called between the chunks of a write, and before an output is published)."""
    if _interrupted:
        raise KeyboardInterrupt


# A run that is killed (SIGKILL, the out-of-memory killer) cannot remove its temporary
# output. Each temporary output ``.NAME.XXXXXXXX.gpugroup-part`` therefore has a lock file
# ``.NAME.XXXXXXXX.gpugroup-lock`` beside it, created first, holding the writer's host name
# and locked (``flock``) until the temporary output is renamed or removed; the lock dies
# with its process. A later run writing NAME on the same host removes the temporary
# outputs whose lock nobody holds (on another host a lock may not show: NFS mounted with
# local locks), and puts back a store a killed run had moved aside (``.gpugroup-old``).
_PART = ".gpugroup-part"
_LOCK = ".gpugroup-lock"
_OLD = ".gpugroup-old"
_KEPT = ".gpugroup-kept"
_HOST = socket.gethostname().encode()
_held = set()  # this process's lock files: where locks belong to the process (NFS), its
_held_guard = threading.Lock()  # own do not stop it, so it must know them


def _try_lock(fd, wait: bool = False) -> bool:
    """Whether an exclusive ``flock`` on ``fd`` was taken (False: another holds it, or the
    filesystem has no locks); ``wait`` waits for another holder to let go."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        return False
    return True


def _names_open_file(path, fd) -> bool:
    """Whether ``path`` is still the file open as ``fd`` (not removed or replaced)."""
    try:
        return os.path.samestat(os.stat(path), os.fstat(fd))
    except OSError:
        return False


def _claim(directory, base):
    """``(fd, path)`` of a new lock file ``.BASE.XXXXXXXX.gpugroup-lock`` in ``directory``,
    held where the filesystem has locks. A sweep of another run may have opened it first:
    its lock is then waited out, and as that sweep removes the file, another is made."""
    while True:
        with _held_guard:  # known as this process's before any sweep here can open it
            fd, lock = tempfile.mkstemp(prefix=f".{base}.", suffix=_LOCK, dir=directory)
            _held.add(lock)
        try:
            if not _try_lock(fd, wait=True) or _names_open_file(lock, fd):
                os.write(fd, _HOST)
                return fd, lock
        except BaseException:
            _release(fd, lock)
            raise
        _release(fd, lock)


def _release(fd, lock) -> None:
    with _held_guard:
        _held.discard(lock)
    os.close(fd)  # (before the unlink, which Windows refuses for an open file)
    with contextlib.suppress(OSError):
        os.unlink(lock)


def sweep_leftovers(directory, base) -> None:
    """Clear what runs writing ``base`` in ``directory`` and killed on this host left
    behind: those whose lock no running process holds. Their temporary outputs are
    removed; a store moved aside to be replaced goes back to ``base`` if nothing took its
    place (once no run writing ``base`` is running: one may be between its renames), else
    it is removed (or, not a store, kept aside). A lock file without a host name (its run
    was killed before writing one) is removed alone. Where the filesystem has no locks
    nothing is removed."""
    own = re.compile(re.escape(f".{base}.") + r"[a-z0-9_]{8}" + re.escape(_LOCK))
    try:
        names = os.listdir(directory)
    except OSError:
        return
    dead, live = [], False  # (fd, lock) of killed runs; whether a run is writing base
    try:
        for name in names:
            if not own.fullmatch(name):
                continue
            lock = os.path.join(directory, name)
            with _held_guard:
                if lock in _held:
                    live = True
                    continue
                try:  # for writing: NFS locks only a file open for writing
                    fd = os.open(lock, os.O_RDWR)
                except OSError:
                    continue
            if _try_lock(fd) and _names_open_file(lock, fd):
                dead.append((fd, lock))
                continue
            live = live or _names_open_file(lock, fd)  # (not: removed meanwhile)
            os.close(fd)
        for fd, lock in dead:
            host = os.pread(fd, len(_HOST) + 1, 0)
            if host and (host != _HOST or not _recover(lock[:-len(_LOCK)],
                                                       os.path.join(directory, base), live)):
                continue  # another host's, or left for a later sweep
            with contextlib.suppress(OSError):  # (while locked: a writer that waited for
                os.unlink(lock)  # this lock finds it gone and makes another)
    finally:
        for fd, _ in dead:
            os.close(fd)


def _recover(stem, path, live) -> bool:
    """Clear the leftovers ``stem + _PART`` and ``stem + _OLD`` of a killed run writing
    ``path``; False when the moved-aside store is left for a later sweep (``live``: a run
    writing ``path`` is running, and ``path`` is missing)."""
    part = stem + _PART
    if os.path.lexists(part):
        logger.warning("removing %s, the temporary output of an earlier run writing %r "
                       "that was killed before it could clean up", part,
                       os.path.basename(path))
        _remove(part)
    old = stem + _OLD
    if not os.path.lexists(old):
        return True
    if not os.path.lexists(path):
        if live:
            return False
        logger.warning("putting back %r, moved aside as %s by a run killed while replacing "
                       "it", path, old)
        _put_back(old, path)
    elif _replaceable(old):
        logger.warning("removing %s, the earlier %r that a run killed while replacing it "
                       "had moved aside", old, path)
        _remove(old)
    else:
        _keep(old, path)
    return True


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT and SIGTERM until the block ends, then deliver them (to the handlers in
    place before). Only in the main thread, where Python runs signal handlers."""
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


#: ``renameat2`` flags (Linux >= 3.15): fail with EEXIST when the target exists; swap the
#: two names.
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2(src, dst, flags: int) -> bool:
    """``renameat2(src, dst, flags)`` through ctypes. Returns False where that is not
    available (not Linux, an old kernel or C library, a filesystem without the flag);
    raises FileExistsError when ``dst`` exists (``RENAME_NOREPLACE``), FileNotFoundError
    when a name is missing, OSError otherwise."""
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
    if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EEXIST, errno.ENOTEMPTY):
        raise FileExistsError(err, os.strerror(err), os.fspath(dst))
    if err == errno.ENOENT:
        raise FileNotFoundError(err, os.strerror(err), os.fspath(dst))
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(dst))


def _rename_noreplace(src, dst) -> bool:
    """Rename ``src`` to ``dst`` unless ``dst`` exists, atomically; False where that is not
    available, FileExistsError when ``dst`` exists."""
    return _renameat2(src, dst, _RENAME_NOREPLACE)


def _exchange(a, b) -> bool:
    """Swap the names ``a`` and ``b`` atomically; False where that is not available,
    FileNotFoundError when one is missing."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


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
    """Rename ``tmp`` to ``path``. An existing store at ``path`` is swapped with the new one
    in one step (``renameat2(RENAME_EXCHANGE)``: readers never find the name missing) and
    removed after, if it is a Zarr store (anything else is swapped back and refused:
    gpugroup removes nothing it did not create). Where swapping is not available it is
    moved aside first. Interrupted anywhere, one complete store stays under ``path`` (the
    new one once it got there, else the old one, put back) and no moved-aside copy is
    left; killed, the next run writing ``path`` finishes that (:func:`sweep_leftovers`)."""
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
        try:
            swapped = _exchange(tmp, path)
        except FileNotFoundError:
            continue  # gone meanwhile
        if swapped:  # the new store is at path, the old contents at tmp
            if _replaceable(tmp):
                _remove(tmp)
                return
            try:
                _exchange(tmp, path)  # theirs back; atomic_path then removes ours
            except FileNotFoundError:
                _put_back(tmp, path)
            raise _not_a_store_error(path)
        old = tmp[:-len(_PART)] + _OLD  # (a name only this run uses, swept if it is killed)
        try:
            try:
                os.rename(path, old)  # now under a name only this run uses
            except FileNotFoundError:
                continue  # gone meanwhile
            if not _replaceable(old):
                raise _not_a_store_error(path)
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


def _not_a_store_error(path) -> FileExistsError:
    return FileExistsError(
        f"{path!r} was replaced by something that is not a Zarr store while the output was "
        f"written; refusing to remove it (it was left as it is and the new output "
        f"discarded): remove it or choose another name")


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
    return not os.path.isdir(old) or os.path.islink(old) or looks_like_zarr(old)


def _put_back(old, path) -> None:
    """Rename the moved-aside ``old`` back to ``path``, unless a new ``path`` appeared
    meanwhile: then, rather than replacing someone's, ``old`` is kept (logged) under a
    name that no sweep removes, ``.NAME.XXXXXXXX.gpugroup-kept``."""
    try:
        if not _rename_noreplace(old, path):
            if os.path.lexists(path):
                raise FileExistsError(path)
            os.rename(old, path)
    except FileExistsError:
        _keep(old, path)


def _keep(old, path) -> None:
    """Rename the moved-aside ``old`` to a name no sweep removes (``path`` was taken
    meanwhile, and it is not gpugroup's to remove)."""
    kept = os.path.splitext(old)[0] + _KEPT
    os.rename(old, kept)
    logger.warning("%r appeared meanwhile; the earlier contents of that name are kept as %r",
                   path, kept)


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
    deadline = time.monotonic() + seconds
    quiet = 0
    while time.monotonic() < deadline and quiet < 5:
        if os.path.lexists(tmp):
            _remove(tmp)
            quiet = 0
        else:
            quiet += 1
        time.sleep(0.05)
