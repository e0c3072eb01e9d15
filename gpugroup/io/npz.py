"""NPZ archives: memory-mapped members on read, a streaming uncompressed writer.

``np.load`` reads an ``.npz`` member whole even with ``mmap_mode``. An uncompressed
(``np.savez``) member is a plain ``.npy`` file inside the zip, so it can be mapped in place:
its data start at the member's local header offset + that header's length + the ``.npy``
header. :class:`NpzWriter` writes such archives member by member and slab by slab.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import pickle
import struct
import threading
import time
import weakref
import zipfile
import zlib

import numpy as np
from numpy.lib import format as npy_format

from gpugroup._xp import to_host
from gpugroup.io.frames import open_regular, remember_opened, stat_identity
from gpugroup.schema import STACK_KEYS, ScanFileError, check_storable

logger = logging.getLogger(__name__)

_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # the zip local file header, 30 bytes
_LOCAL_MAGIC = b"PK\x03\x04"

CONVERT_HINT = ("convert it once to an uncompressed file: `gpugroup convert {path} OUT.npz` "
                "(or OUT.h5 / OUT.zarr), or in Python "
                "gpugroup.rawdata.convert({path!r}, 'OUT.npz')")


def _open_error(path, exc, member=None, what="scan file"):
    where = f" (member {member!r})" if member else ""
    return OSError(
        f"cannot read {what} {path!r}{where}: {type(exc).__name__}: {exc}. It must be an "
        f"NPZ archive written by numpy.savez (is it truncated or another format?)"
    )


def member_data_offset(fh, info: zipfile.ZipInfo) -> int:
    """File offset of the first byte of member ``info``'s (stored) data."""
    fh.seek(info.header_offset)
    raw = fh.read(_LOCAL_HEADER.size)
    if len(raw) != _LOCAL_HEADER.size or raw[:4] != _LOCAL_MAGIC:
        raise zipfile.BadZipFile(f"bad local header for member {info.filename!r}")
    fields = _LOCAL_HEADER.unpack(raw)
    name_len, extra_len = fields[-2], fields[-1]
    return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len


def read_npy_header(fh):
    """(shape, fortran order, dtype) from the ``.npy`` header at ``fh``'s position."""
    return _read_npy_header(fh)


def _read_npy_header(fh):
    version = npy_format.read_magic(fh)
    if version == (1, 0):
        return npy_format.read_array_header_1_0(fh)
    if version == (2, 0):
        return npy_format.read_array_header_2_0(fh)
    return npy_format._read_array_header(fh, version)  # (3, 0): utf-8 header, same layout


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


def object_member_value(fileobj, path, key):
    """The value of a 0-d object ``.npy`` member (``fileobj`` at its start): a 0-d str
    array for a string (PtychoPINN's ``_metadata`` JSON), None for a stored None (an
    optional field PtychoPINN's ``to_file`` wrote as None: treat it as absent).

    Raises
    ------
    ScanFileError
        The member holds anything else (nothing is unpickled beyond NumPy's own array).
    """
    shape, _, dtype = _read_npy_header(fileobj)
    if dtype.hasobject and shape == ():
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


def memmap_member(path, fh, info: zipfile.ZipInfo, mmap_mode: str = "r"):
    """An ``np.memmap`` over the uncompressed ``.npy`` member ``info`` of zip ``path``.

    Raises
    ------
    ValueError
        The member is compressed or encrypted, or holds Python objects.
    OSError
        The member is truncated.
    """
    key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
    if info.flag_bits & 0x1:
        raise ValueError(f"{path!r}: member {key!r} is encrypted; it cannot be memory-mapped")
    if info.compress_type != zipfile.ZIP_STORED:
        method = {zipfile.ZIP_DEFLATED: "deflate (np.savez_compressed)", zipfile.ZIP_BZIP2:
                  "bzip2", zipfile.ZIP_LZMA: "lzma"}.get(info.compress_type,
                                                       str(info.compress_type))
        raise CompressedMemberError(
            f"{path!r}: member {key!r} is compressed ({method}) and cannot be memory-mapped; "
            + CONVERT_HINT.format(path=path) + ", or pass mmap_mode=None to load it into memory"
        )
    start = member_data_offset(fh, info)
    fh.seek(start)
    shape, fortran, dtype = _read_npy_header(fh)
    if dtype.hasobject:
        raise _object_member_error(path, key)
    offset = fh.tell()
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if offset + nbytes > start + info.file_size:
        raise OSError(f"{path!r}: member {key!r} is truncated ({info.file_size} bytes stored, "
                      f"{offset - start + nbytes} needed)")
    if nbytes == 0:
        return np.zeros(shape, dtype=dtype, order="F" if fortran else "C")
    # From the open file object (its descriptor), never by name again: the file at
    # ``path`` may have been replaced since it was opened.
    return np.memmap(fh, dtype=dtype, mode=mmap_mode, offset=offset, shape=shape,
                     order="F" if fortran else "C")


def read_npz(path, mmap_mode=None, stack_keys=STACK_KEYS, what="scan file") -> dict:
    """All members of an NPZ archive by key; with ``mmap_mode`` the frame stacks
    (``stack_keys``) are memory-mapped and the small members are read.

    Everything comes from one open file (the maps too, from its descriptor), so a file
    replaced at ``path`` meanwhile is never mixed in.

    Raises
    ------
    FileNotFoundError, OSError
        Missing, truncated or non-zip file; a device, FIFO or socket.
    ValueError
        ``mmap_mode`` given and a stack member is compressed (the message says how to
        convert the file); a member holding Python objects (never unpickled).
    """
    path = os.fspath(path)
    if mmap_mode not in (None, "r", "r+", "c"):
        raise ValueError(f"mmap_mode must be None, 'r', 'r+' or 'c', got {mmap_mode!r}")
    with open_regular(path, what) as fh:
        if not zipfile.is_zipfile(fh):
            # np.load would guess "pickled data" for any bytes that are not npy/npz
            raise OSError(f"cannot read {what} {path!r}: it is not a zip archive. It must "
                          f"be an NPZ archive written by numpy.savez (is it truncated or "
                          f"another format?)")
        fh.seek(0)
        if mmap_mode is None:
            return _read_members(path, fh, (), None, what)
        return _remembered(fh, _read_members(
            path, fh, stack_keys, lambda info: memmap_member(path, fh, info, mmap_mode), what))


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
            return _read_npy_header(member)[2].hasobject
    except (ValueError, RuntimeError, NotImplementedError):
        return False  # no .npy header or no readable member: the stack's opener says why


def _read_members(path, fh, stack_keys, open_stack, what="scan file") -> dict:
    """``.npy`` members of zip ``path`` (open as ``fh``; a ``what``, for errors) by key:
    ``open_stack(info)`` for the frame stacks in ``stack_keys``, small members read whole."""
    out = {}
    try:
        with zipfile.ZipFile(fh) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                key = info.filename[:-4]
                if key in stack_keys and not _holds_objects(zf, info):
                    out[key] = open_stack(info)
                    continue
                with zf.open(info) as member:
                    try:
                        out[key] = npy_format.read_array(member, allow_pickle=False)
                    except ValueError as exc:
                        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
                            # PtychoPINN's _metadata JSON string or a stored None only
                            with zf.open(info) as again:
                                value = object_member_value(again, path, key)
                            if value is not None:
                                out[key] = value
                            continue
                        raise _open_error(path, exc, key, what) from exc
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise _open_error(path, exc, what=what) from exc
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


class ZipMemberStack:
    """A (compressed) ``.npy`` member read sequentially in row slabs: ``m[a:b]``.

    For streaming conversion of ``np.savez_compressed`` archives in bounded memory;
    slabs are cheapest in increasing order (going back reopens the member). ``file``, when
    given, is the archive already open (the stack keeps a duplicate of its descriptor, so
    it reads the file its scan was opened from, whatever is at ``path`` later).
    """

    def __init__(self, path, name, file=None):
        self.path = path
        self.name = name
        self._file = (open(path, "rb") if file is None  # noqa: SIM115 - kept open
                      else os.fdopen(os.dup(file.fileno()), "rb"))
        self._finalizer = weakref.finalize(self, self._file.close)
        with zipfile.ZipFile(self._file) as zf, zf.open(name) as fh:
            self.shape, self.fortran, self.dtype = _read_npy_header(fh)
        self.ndim = len(self.shape)
        self._row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._zf = self._fh = None
        self._pos = 0

    def _reopen(self):
        self.close()
        self._zf = zipfile.ZipFile(self._file)
        self._fh = self._zf.open(self.name)
        _read_npy_header(self._fh)
        self._pos = 0

    def __getitem__(self, key):
        if self.fortran:
            with zipfile.ZipFile(self._file) as zf, zf.open(self.name) as fh:
                return npy_format.read_array(fh, allow_pickle=False)[key]
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("ZipMemberStack reads row slabs: m[a:b]")
        a, b, _ = key.indices(int(self.shape[0]))
        if self._fh is None or a < self._pos:
            self._reopen()
        skip = (a - self._pos) * self._row
        while skip:
            skip -= len(self._fh.read(min(skip, 16 << 20)))
        want = (b - a) * self._row
        data = self._fh.read(want)
        if len(data) != want:
            raise OSError(f"{self.path!r}: member {self.name!r} is truncated")
        self._pos = b
        return np.frombuffer(data, dtype=self.dtype).reshape((b - a,) + tuple(self.shape[1:]))

    def close(self):
        if self._fh is not None:
            self._fh.close()
            self._zf.close()
        self._fh = self._zf = None


def read_npz_streaming(path) -> dict:
    """Members of ``path`` by key for copying: stored stacks memory-mapped, compressed
    stacks as :class:`ZipMemberStack`, small members read."""
    path = os.fspath(path)
    with open_regular(path) as fh:
        def open_stack(info):
            if info.compress_type == zipfile.ZIP_STORED:
                return memmap_member(path, fh, info, "r")
            return ZipMemberStack(path, info.filename, fh)

        return _remembered(fh, _read_members(path, fh, STACK_KEYS, open_stack))


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
