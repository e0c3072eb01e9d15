"""NPZ archives: memory-mapped members on read, a streaming uncompressed writer.

``np.load`` reads an ``.npz`` member whole even with ``mmap_mode``. An uncompressed
(``np.savez``) member is a plain ``.npy`` file inside the zip, so it can be mapped in place:
its data start at the member's local header offset + that header's length + the ``.npy``
header. :class:`NpzWriter` writes such archives member by member and slab by slab.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import io
import logging
import math
import os
import pickle
import re
import struct
import threading
import time
import weakref
import zipfile
import zlib

import numpy as np
from numpy.lib import format as npy_format

from gpugroup._xp import to_host
from gpugroup.io.frames import (
    open_regular,
    remember_opened,
    stat_identity,
    system_error,
)
from gpugroup.schema import STACK_KEYS, ScanFileError, check_storable

logger = logging.getLogger(__name__)

_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # the zip local file header, 30 bytes
_LOCAL_MAGIC = b"PK\x03\x04"

CONVERT_HINT = ("convert it once to an uncompressed file: `gpugroup convert {path} OUT.npz` "
                "(or OUT.h5 / OUT.zarr), or in Python "
                "gpugroup.rawdata.convert({path!r}, 'OUT.npz')")


def member_data_offset(fh, info: zipfile.ZipInfo) -> int:
    """File offset of the first byte of member ``info``'s (stored) data."""
    fh.seek(info.header_offset)
    raw = fh.read(_LOCAL_HEADER.size)
    if len(raw) != _LOCAL_HEADER.size or raw[:4] != _LOCAL_MAGIC:
        raise zipfile.BadZipFile(f"bad local header for member {info.filename!r}")
    fields = _LOCAL_HEADER.unpack(raw)
    name_len, extra_len = fields[-2], fields[-1]
    return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len


#: The ``.npy`` format versions (numpy.lib.format): the header-length field and the
#: header's encoding. 3.0 is 2.0 with a UTF-8 header.
_NPY_VERSIONS = {(1, 0): ("<H", "latin1"), (2, 0): ("<I", "latin1"), (3, 0): ("<I", "utf8")}
_NPY_MAGIC = b"\x93NUMPY"
#: Longest header text read (NumPy's own limit for headers it parses safely).
_MAX_HEADER = 10000
#: Bytes per read of an array's data.
_PIECE = 16 << 20
#: What zipfile raises for a damaged archive or member (a bad CRC-32, a damaged stream,
#: a central directory that points anywhere: wrong versions, seeks before the start, sizes
#: too large for an offset, unknown methods).
_DAMAGED = (zipfile.BadZipFile, EOFError, zlib.error, RuntimeError, ValueError,
            OverflowError, OSError)


def _damaged(where, problem) -> ScanFileError:
    return ScanFileError(f"cannot read {where}: {problem}. The file is damaged: write it "
                         f"again from its source")


def _where(path, key, what="scan file") -> str:
    return f"{what} {path!r} (member {key!r})"


@contextlib.contextmanager
def _reading(where):
    """Errors of a damaged archive or member raised inside, as one naming ``where``. An
    error of the system (:func:`~gpugroup.io.frames.system_error`) passes as it is, and a
    compression method zipfile
    lacks (or a damaged directory's version field) is said so."""
    try:
        yield
    except (ScanFileError, CompressedMemberError):
        raise
    except OSError as exc:
        if system_error(exc):
            raise
        raise _damaged(where, f"{type(exc).__name__}: {exc}") from exc
    except NotImplementedError as exc:
        raise ScanFileError(f"cannot read {where}: {exc}: a zip version or compression "
                            f"method Python's zipfile does not read (or a damaged "
                            f"directory); write it again with numpy.savez") from exc
    except _DAMAGED as exc:
        raise _damaged(where, f"{type(exc).__name__}: {exc}") from exc


def read_npy_header(fh, where, size):
    """(shape, fortran order, dtype) of the ``.npy`` (format 1.0, 2.0 or 3.0) at ``fh``'s
    position, ``fh`` left at its first data byte.

    ``size`` is the ``.npy``'s whole size (header and data: the file's size, a zip
    member's uncompressed size); the data the header describes must fit in it (Python-
    object arrays aside; bytes after the data are left, as NumPy leaves them). ``where``
    names the file (and member) in errors.

    Raises
    ------
    ScanFileError
        The header is damaged, or describes more data than ``size`` holds.
    """
    try:
        shape, fortran, dtype, used = _parse_npy_header(fh)
    except ValueError as exc:
        raise _damaged(where, f"its .npy header is damaged ({exc})") from None
    if not dtype.hasobject:
        nbytes = math.prod(shape) * dtype.itemsize
        if used + nbytes > size:  # (bytes after the data are left, as NumPy leaves them)
            raise _damaged(where, f"its .npy header says shape {shape} {dtype} "
                                  f"({nbytes} bytes of data) but it holds {size - used}")
    return shape, fortran, dtype


def _parse_npy_header(fh):
    """(shape, fortran order, dtype, header bytes) of the ``.npy`` header at ``fh``;
    ValueError saying what is wrong with it."""
    head = fh.read(len(_NPY_MAGIC) + 2)
    if len(head) < len(_NPY_MAGIC) + 2 or not head.startswith(_NPY_MAGIC):
        raise ValueError(f"it does not start with the .npy magic bytes (got {head!r})")
    version = (head[-2], head[-1])
    if version not in _NPY_VERSIONS:
        raise ValueError(f"unknown format version {version[0]}.{version[1]} (1.0, 2.0 and "
                         f"3.0 exist)")
    length_format, encoding = _NPY_VERSIONS[version]
    field = fh.read(struct.calcsize(length_format))
    if len(field) < struct.calcsize(length_format):
        raise ValueError("it ends inside the header")
    (length,) = struct.unpack(length_format, field)
    if length > _MAX_HEADER:
        raise ValueError(f"its header-length field says {length} bytes (at most "
                         f"{_MAX_HEADER})")
    text = fh.read(length)
    if len(text) < length:
        raise ValueError(f"its header-length field says {length} bytes, {len(text)} follow")
    try:
        header = _literal(text.decode(encoding))
    except (UnicodeDecodeError, SyntaxError, ValueError, TypeError, MemoryError,
            RecursionError):
        raise ValueError(f"the header {text[:80]!r} is not the dict NumPy writes") from None
    keys = set(header) if isinstance(header, dict) else None
    if keys != {"descr", "fortran_order", "shape"}:
        raise ValueError(f"the header {header!r:.80} is not a dict of exactly descr, "
                         f"fortran_order and shape")
    shape, fortran = header["shape"], header["fortran_order"]
    if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape):
        raise ValueError(f"shape {shape!r:.80} is not a tuple of non-negative ints")
    if type(fortran) is not bool:
        raise ValueError(f"fortran_order {fortran!r:.80} is not True or False")
    try:
        dtype = npy_format.descr_to_dtype(header["descr"])
    except (TypeError, ValueError, IndexError, KeyError, RecursionError):
        raise ValueError(f"descr {header['descr']!r:.80} is no NumPy dtype") from None
    return shape, fortran, dtype, len(head) + len(field) + length


def _literal(text):
    """The Python literal ``text``; failing that, read with Python 2's long ints ("10L",
    which NumPy still reads) as ints."""
    try:
        return ast.literal_eval(text)
    except SyntaxError:
        return ast.literal_eval(re.sub(r"\b(\d+)L\b", r"\1", text))


def read_npy_data(fh, shape, fortran, dtype, where):
    """The array that follows a ``.npy`` header at ``fh``, read into memory in pieces
    (``where`` names the file, and member, in errors)."""
    out = np.empty(math.prod(shape), dtype=dtype)
    flat = out.view(np.uint8) if out.nbytes else out
    done = 0
    while done < out.nbytes:
        n = fh.readinto(flat[done:done + _PIECE])
        if not n:
            raise _damaged(where, f"its data end after {done} of {out.nbytes} bytes")
        done += n
    return out.reshape(shape, order="F" if fortran else "C")


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles a NumPy object array and nothing else: no class outside the three that
    rebuild an ndarray may be named, so no code runs."""

    _ALLOWED = frozenset({("numpy.core.multiarray", "_reconstruct"),
                          ("numpy._core.multiarray", "_reconstruct"),
                          ("numpy", "ndarray"), ("numpy", "dtype")})

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def object_member_value(fileobj, path, key, shape):
    """The value of a 0-d object ``.npy`` member (``fileobj`` after its header, which gave
    ``shape``): a 0-d str array for a string (PtychoPINN's ``_metadata`` JSON), None for a
    stored None (an optional field PtychoPINN's ``to_file`` wrote as None: treat it as
    absent).

    Raises
    ------
    ScanFileError
        The member holds anything else (nothing is unpickled beyond NumPy's own array).
    """
    if shape == ():
        try:
            value = _ArrayOnlyUnpickler(fileobj).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as exc:
            raise _object_member_error(path, key) from exc
        item = value.item() if isinstance(value, np.ndarray) and value.shape == () else value
        if item is None:
            return None
        if isinstance(item, str):
            return np.array(item)
    raise _object_member_error(path, key)


class CompressedMemberError(ValueError):
    """A compressed NPZ member was asked to be memory-mapped."""


def memmap_member(path, fh, info: zipfile.ZipInfo, mmap_mode: str = "r", what="scan file"):
    """An ``np.memmap`` over the uncompressed ``.npy`` member ``info`` of zip ``path``.

    Its CRC-32 is not checked: that would read the whole member, which mapping it avoids
    (``convert`` reads every byte and checks it).

    Raises
    ------
    ValueError
        The member is compressed or encrypted, or holds Python objects.
    ScanFileError
        The member's header is damaged or disagrees with its size.
    """
    key = info.filename.removesuffix(".npy")
    if info.flag_bits & 0x1:
        raise ScanFileError(f"{path!r}: member {key!r} is encrypted; it cannot be "
                            f"memory-mapped")
    if info.compress_type != zipfile.ZIP_STORED:
        method = {zipfile.ZIP_DEFLATED: "deflate (np.savez_compressed)", zipfile.ZIP_BZIP2:
                  "bzip2", zipfile.ZIP_LZMA: "lzma"}.get(info.compress_type,
                                                       str(info.compress_type))
        raise CompressedMemberError(
            f"{path!r}: member {key!r} is compressed ({method}) and cannot be memory-mapped; "
            + CONVERT_HINT.format(path=path) + ", or pass mmap_mode=None to load it into memory"
        )
    fh.seek(member_data_offset(fh, info))
    shape, fortran, dtype = read_npy_header(fh, _where(path, key, what), info.file_size)
    if dtype.hasobject:
        raise _object_member_error(path, key)
    if math.prod(shape) == 0:
        return np.zeros(shape, dtype=dtype, order="F" if fortran else "C")
    # From the open file object (its descriptor), never by name again: the file at
    # ``path`` may have been replaced since it was opened.
    return np.memmap(fh, dtype=dtype, mode=mmap_mode, offset=fh.tell(), shape=shape,
                     order="F" if fortran else "C")


def read_npz(path, mmap_mode=None, stack_keys=STACK_KEYS, what="scan file") -> dict:
    """All members of an NPZ archive by key; with ``mmap_mode`` the frame stacks
    (``stack_keys``) are memory-mapped and the small members are read.

    Everything comes from one open file (the maps too, from its descriptor), so a file
    replaced at ``path`` meanwhile is never mixed in. Members read are checked against
    their CRC-32; memory-mapped ones are not (see :func:`memmap_member`).

    Raises
    ------
    FileNotFoundError, OSError
        Missing, truncated or non-zip file; a device, FIFO or socket.
    ValueError
        ``mmap_mode`` given and a stack member is compressed (the message says how to
        convert the file); a member holding Python objects (never unpickled).
    ScanFileError
        A damaged archive or member (both an OSError and a ValueError).
    """
    path = os.fspath(path)
    if mmap_mode not in (None, "r", "r+", "c"):
        raise ValueError(f"mmap_mode must be None, 'r', 'r+' or 'c', got {mmap_mode!r}")
    with open_regular(path, what) as fh:
        if mmap_mode is None:
            return _read_members(path, fh, (), None, what)
        return _remembered(fh, _read_members(
            path, fh, stack_keys, lambda info: memmap_member(path, fh, info, mmap_mode, what),
            what))


def _remembered(fh, members: dict) -> dict:
    """``members``, their memory maps noted as opened from ``fh``'s file. Its identity is
    taken last: a file renamed into place can show its new name a moment before the rename
    updates its change time (seen on ext4), and the later value is the one that stays."""
    identity = stat_identity(os.fstat(fh.fileno()))
    for value in members.values():
        if isinstance(value, np.memmap):
            remember_opened(value, identity)
    return members


def _object_member_error(path, key) -> ValueError:
    return ScanFileError(
        f"{path!r}: member {key!r} holds Python objects (a pickled object array), which "
        f"gpugroup never unpickles; save {key!r} as a numeric array (metadata as a JSON "
        f"string), e.g. np.savez(..., {key}=np.asarray(value, dtype=float))")


def _holds_objects(zf, info) -> bool:
    """Whether member ``info`` is an object array (a stored None, as PtychoPINN writes an
    absent field): read as a small member then, not opened as a stack."""
    if info.flag_bits & 1:  # encrypted: opening it as a stack says so
        return False
    try:
        with zf.open(info) as member:
            return _parse_npy_header(member)[2].hasobject
    except _DAMAGED:
        return False  # no .npy header or no readable member: the stack's opener says why


def _read_member(member, path, key, size, what):
    """The value of the ``.npy`` member ``member`` (open, at its start; ``size`` bytes),
    read whole and checked against its CRC-32; None for a stored None."""
    where = _where(path, key, what)
    shape, fortran, dtype = read_npy_header(member, where, size)
    if dtype.hasobject:  # PtychoPINN's _metadata JSON string or a stored None only
        return object_member_value(member, path, key, shape)
    value = read_npy_data(member, shape, fortran, dtype, where)
    member.read(1)  # past the end, where zipfile checks the CRC-32 (a bad one raises)
    return value


def _read_members(path, fh, stack_keys, open_stack, what="scan file") -> dict:
    """``.npy`` members of zip ``path`` (open as ``fh``; a ``what``, for errors) by key:
    ``open_stack(info)`` for the frame stacks in ``stack_keys``, small members read whole.
    Other members are logged as ignored."""
    out, ignored = {}, []
    with _reading(f"{what} {path!r}"):
        if not zipfile.is_zipfile(fh):
            # np.load would guess "pickled data" for any bytes that are not npy/npz
            raise ScanFileError(f"cannot read {what} {path!r}: it is not a zip archive. It "
                                f"must be an NPZ archive written by numpy.savez (is it "
                                f"truncated or another format?)")
        fh.seek(0)
        with zipfile.ZipFile(fh) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    if not info.is_dir():
                        ignored.append(info.filename)
                    continue
                key = info.filename[:-4]
                with _reading(_where(path, key, what)):
                    if key in stack_keys and not _holds_objects(zf, info):
                        out[key] = open_stack(info)
                        continue
                    with zf.open(info) as member:
                        value = _read_member(member, path, key, info.file_size, what)
                    if value is not None:
                        out[key] = value
    if ignored:
        logger.warning("%r: ignoring %s %s: not .npy arrays (gpugroup reads the KEY.npy "
                       "members of an NPZ archive; store data in it with numpy.savez)", path,
                       "member" if len(ignored) == 1 else "members", sorted(ignored))
    return out


# ----------------------------------------------------------------------------- writing
def _gf2_times(mat, vec):
    total, i = 0, 0
    while vec:
        if vec & 1:
            total ^= mat[i]
        vec >>= 1
        i += 1
    return total


def _gf2_product(a, b):
    """The operator "apply b, then a" on 32-bit CRC states."""
    return [_gf2_times(a, b[n]) for n in range(32)]


@functools.lru_cache(maxsize=64)
def _zeros_operator(nbytes):
    """The GF(2) operator that advances a CRC-32 state over ``nbytes`` zero bytes."""
    one_bit = [0xEDB88320] + [1 << n for n in range(31)]
    op = _gf2_product(one_bit, one_bit)  # 2 bits
    op = _gf2_product(op, op)  # 4 bits
    op = _gf2_product(op, op)  # 8 bits: one zero byte
    result = None
    while nbytes:
        if nbytes & 1:
            result = op if result is None else _gf2_product(op, result)
        nbytes >>= 1
        if nbytes:
            op = _gf2_product(op, op)
    return tuple(result)


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A + B from crc32(A), crc32(B) and len(B) (zlib's crc32_combine; the
    operator for a length is cached, so equal-sized slabs combine in microseconds)."""
    if len2 <= 0:
        return crc1
    return _gf2_times(_zeros_operator(len2), crc1) ^ crc2


def _dos_time(t=None):
    tm = time.localtime(t)
    date = ((max(tm.tm_year, 1980) - 1980) << 9) | (tm.tm_mon << 5) | tm.tm_mday
    clock = (tm.tm_hour << 11) | (tm.tm_min << 5) | (tm.tm_sec // 2)
    return clock, date


def _npy_header(shape, dtype) -> bytes:
    buf = io.BytesIO()
    header = {"descr": npy_format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(int(s) for s in shape)}
    try:
        npy_format.write_array_header_1_0(buf, header)
    except ValueError:  # header longer than 64 KiB
        buf = io.BytesIO()
        npy_format.write_array_header_2_0(buf, header)
    return buf.getvalue()


class _Member:
    """One ``.npy`` member: its place in the file and a running CRC-32 of its bytes."""

    def __init__(self, name, offset, header, shape, dtype):
        self.name = name
        self.offset = offset  # of the local header
        self.header = header  # the .npy header bytes
        self.shape = shape
        self.dtype = np.dtype(dtype)
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.nbytes = int(shape[0]) * self.row_bytes if len(shape) else self.dtype.itemsize
        self.size = len(header) + self.nbytes  # the member's stored size
        self.local_len = _LOCAL_HEADER.size + len(name.encode()) + 20
        self.data_offset = offset + self.local_len + len(header)
        self.crc = zlib.crc32(header)
        self.done = 0  # rows written in order (the CRC covers them)
        self.in_order = True
        self.pending = {}  # start row -> (stop row, CRC-32 of those rows alone, nbytes)

    @property
    def end(self):
        return self.data_offset + self.nbytes


class NpySink:
    """Slice-assignable (along axis 0) view of one member: ``sink[a:b] = rows``.

    Rows go straight to the file with ``os.pwrite`` (no memory map, so nothing of the
    output stays in this process). Writes may come in any order and from several threads;
    in-order writes keep the CRC-32 up to date, otherwise it is computed at close.
    """

    def __init__(self, writer, member):
        self._writer = writer
        self._m = member
        self.shape = member.shape
        self.dtype = member.dtype
        self.ndim = len(member.shape)

    def __len__(self):
        return int(self.shape[0])

    def __setitem__(self, key, value):
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("NpySink takes contiguous slices along axis 0: sink[a:b] = rows")
        start, stop, _ = key.indices(int(self.shape[0]))
        value = to_host(value)
        rows = np.ascontiguousarray(np.broadcast_to(np.asarray(value, dtype=self.dtype),
                                                    (stop - start,) + tuple(self.shape[1:])))
        data = memoryview(rows).cast("B")
        m = self._m
        pos = m.data_offset + start * m.row_bytes
        fd = self._writer._fd
        written = 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], pos + written)
        with self._writer._lock:
            if not m.in_order:
                return
            if start == m.done:
                m.crc = zlib.crc32(data, m.crc)
                m.done = stop
                while m.done in m.pending:  # later slabs that arrived early
                    nxt, crc, nbytes = m.pending.pop(m.done)
                    m.crc = crc32_combine(m.crc, crc, nbytes)
                    m.done = nxt
            elif start > m.done and start not in m.pending and len(m.pending) < 4096:
                m.pending[start] = (stop, zlib.crc32(data), len(data))
            else:  # overlapping rewrites: checksum the member at close instead
                m.in_order = False


class NpzWriter:
    """Write an uncompressed (ZIP_STORED, zip64) NPZ member by member, slab by slab.

    Each member is placed when it is declared (its size follows from shape and dtype), so
    several members can be filled at once and in any order; :meth:`close` writes the
    local headers with their CRC-32 and the central directory. ``np.load`` and
    :func:`read_npz` (memory-mapped) read the result.

    Examples
    --------
    >>> import numpy as np, os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "a.npz")
    >>> with NpzWriter(path) as w:
    ...     sink = w.create("x", (4, 2), np.float32)
    ...     sink[0:2] = np.ones((2, 2)); sink[2:4] = np.zeros((2, 2))
    ...     w.put("n", np.arange(3))
    >>> np.load(path)["x"].sum()
    np.float32(4.0)
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self._members: list[_Member] = []
        self._end = 0
        self._lock = threading.Lock()
        self._closed = False

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.discard()

    def create(self, key: str, shape, dtype) -> NpySink:
        """Declare member ``key`` (``key.npy``) and return a sink for its rows."""
        shape = tuple(int(s) for s in shape)
        name = key + ".npy"
        member = _Member(name, self._end, _npy_header(shape, dtype), shape, dtype)
        self._members.append(member)
        self._end = member.end
        os.pwrite(self._fd, member.header, member.data_offset - len(member.header))
        if member.nbytes:
            os.ftruncate(self._fd, max(os.fstat(self._fd).st_size, self._end))
        return NpySink(self, member)

    def put(self, key: str, array) -> None:
        """Write a whole (small) array as member ``key``."""
        array = to_host(array)
        check_storable(key, array)
        if array.ndim == 0:
            member = _Member(key + ".npy", self._end, _npy_header((), array.dtype), (),
                             array.dtype)
            self._members.append(member)
            self._end = member.end
            data = np.ascontiguousarray(array).tobytes()
            os.pwrite(self._fd, member.header + data, member.data_offset - len(member.header))
            member.crc = zlib.crc32(data, member.crc)
            member.done = 1
            return
        sink = self.create(key, array.shape, array.dtype)
        sink[0:array.shape[0]] = array

    def _member_crc(self, m: _Member) -> int:
        if m.in_order and (m.done == (m.shape[0] if m.shape else 1) or m.nbytes == 0):
            return m.crc
        crc = zlib.crc32(m.header)
        pos, left = m.data_offset, m.nbytes
        while left:
            buf = os.pread(self._fd, min(left, 1 << 20), pos)
            if not buf:
                raise OSError(f"{self.path!r}: short read while checksumming {m.name!r}")
            crc = zlib.crc32(buf, crc)
            pos += len(buf)
            left -= len(buf)
        return crc

    def close(self) -> None:
        """Write headers and the central directory; the file is then a valid NPZ."""
        if self._closed:
            return
        clock, date = _dos_time()
        central = []
        for m in self._members:
            crc = self._member_crc(m) & 0xFFFFFFFF
            name = m.name.encode()
            extra = struct.pack("<HHQQ", 1, 16, m.size, m.size)
            local = _LOCAL_HEADER.pack(_LOCAL_MAGIC, 45, 0, 0, 0, clock, date, crc,
                                       0xFFFFFFFF, 0xFFFFFFFF, len(name), len(extra))
            os.pwrite(self._fd, local + name + extra, m.offset)
            cextra = struct.pack("<HHQQQ", 1, 24, m.size, m.size, m.offset)
            central.append(struct.pack(
                "<4s4B4HL2L5H2L", b"PK\x01\x02", 45, 3, 45, 0, 0, 0, clock, date, crc,
                0xFFFFFFFF, 0xFFFFFFFF, len(name), len(cextra), 0, 0, 0, 0o100644 << 16,
                0xFFFFFFFF) + name + cextra)
        cd = b"".join(central)
        cd_offset, count = self._end, len(self._members)
        eocd64 = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count,
                             len(cd), cd_offset)
        locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, cd_offset + len(cd), 1)
        eocd = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, min(count, 0xFFFF),
                           min(count, 0xFFFF), min(len(cd), 0xFFFFFFFF), 0xFFFFFFFF, 0)
        tail = cd + eocd64 + locator + eocd
        os.pwrite(self._fd, tail, cd_offset)
        os.ftruncate(self._fd, cd_offset + len(tail))
        self._closed = True  # first: a signal during close must not make discard close again
        os.close(self._fd)

    def discard(self) -> None:
        """Close without finishing (the caller removes the file)."""
        if not self._closed:
            self._closed = True
            os.close(self._fd)


class _PositionalFile(io.RawIOBase):
    """Descriptor ``fd`` read with a position of its own (``os.preadv``): it neither moves
    nor follows the offset shared with other descriptors of the same open file (a ``dup``,
    the scan's own file object)."""

    def __init__(self, fd):
        self._fd, self._pos = fd, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def readinto(self, buffer):
        n = os.preadv(self._fd, [buffer], self._pos)
        self._pos += n
        return n

    def seek(self, offset, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos,
                io.SEEK_END: os.fstat(self._fd).st_size}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self):
        return self._pos

    def close(self):
        if not self.closed:
            os.close(self._fd)
        super().close()


class ZipMemberStack:
    """A ``.npy`` member read sequentially in row slabs: ``m[a:b]``.

    For streaming conversion in bounded memory; slabs are cheapest in increasing order
    (going back reopens the member). Read to its end, the member is checked against its
    CRC-32, stored and compressed members alike. A Fortran-ordered member (rare) is read
    whole at the first slab. ``file``, when given, is the archive already open (the stack
    keeps a duplicate of its descriptor, so it reads the file its scan was opened from,
    whatever is at ``path`` later).
    """

    def __init__(self, path, name, file=None, what="scan file"):
        self.path = path
        self.name = name
        self._key, self._what = name.removesuffix(".npy"), what
        self._where = _where(path, self._key, what)
        fd = os.open(path, os.O_RDONLY) if file is None else os.dup(file.fileno())
        self._file = io.BufferedReader(_PositionalFile(fd))
        self._finalizer = weakref.finalize(self, self._file.close)
        self._zf = self._fh = self._whole = None
        self._reopen()
        self.ndim = len(self.shape)
        self._row = math.prod(self.shape[1:]) * self.dtype.itemsize

    def _reopen(self):
        self.close()
        with _reading(self._where):
            self._zf = zipfile.ZipFile(self._file)
            info = self._zf.getinfo(self.name)
            self._fh = self._zf.open(info)
            self.shape, self.fortran, self.dtype = read_npy_header(self._fh, self._where,
                                                                   info.file_size)
        self._pos = 0

    def _read(self, rows) -> bytes:
        """The next ``rows`` rows' bytes; at the member's end zipfile checks its CRC-32."""
        with _reading(self._where):
            data = self._fh.read(rows * self._row)
            self._pos += rows
            if self._pos == self.shape[0]:
                self._fh.read(1)  # past the end: a bad CRC-32 raises here
        if len(data) != rows * self._row:
            raise _damaged(self._where, f"it ends {rows * self._row - len(data)} bytes early")
        return data

    def __getitem__(self, key):
        if self.fortran:
            if self._whole is None:
                self.close()
                with _reading(self._where), zipfile.ZipFile(self._file) as zf, \
                        zf.open(self.name) as member:
                    self._whole = _read_member(member, self.path, self._key,
                                               zf.getinfo(self.name).file_size, self._what)
            return self._whole[key]
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("ZipMemberStack reads row slabs: m[a:b]")
        a, b, _ = key.indices(int(self.shape[0]))
        if self._fh is None or a < self._pos:
            self._reopen()
        while self._pos < a:  # skip to row a, at most _PIECE bytes at a time
            self._read(min(a - self._pos, max(1, _PIECE // max(1, self._row))))
        data = self._read(b - a)
        return np.frombuffer(data, dtype=self.dtype).reshape((b - a,) + tuple(self.shape[1:]))

    def close(self):
        if self._fh is not None:
            self._fh.close()
            self._zf.close()
        self._fh = self._zf = None


def read_npz_streaming(path) -> dict:
    """Members of ``path`` by key for copying: frame stacks as :class:`ZipMemberStack`
    (stored or compressed; read through, each is checked against its CRC-32), small
    members read."""
    path = os.fspath(path)
    with open_regular(path) as fh:
        return _read_members(path, fh, STACK_KEYS,
                             lambda info: ZipMemberStack(path, info.filename, fh))


class NpzTarget:
    """Write members into a new uncompressed NPZ (see :class:`NpzWriter`)."""

    def __init__(self, path):
        self.path = path
        self._w = NpzWriter(path)

    def create(self, key, shape, dtype, chunk_rows=None):
        return self._w.create(key, shape, dtype)

    def put(self, key, array):
        self._w.put(key, array)

    def close(self):
        self._w.close()

    def discard(self):
        self._w.discard()


def read_grouped(path, stack_keys) -> dict:
    """A written grouped output: stacks as ``np.memmap`` (read-only), the rest read."""
    return read_npz(path, "r", stack_keys, "grouped output")
