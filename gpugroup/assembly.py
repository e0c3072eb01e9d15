"""Grouped training arrays of DESIGN.md section 2, assembled in bounded chunks against ``xp``.

The heavy part is the gather ``diff3d[nn_indices]``. It runs once per chunk of groups,
fused with the channel-last transpose, the normalization and the ``Y`` patches: per-frame
energies come first (only the frames the groups use, in float64), then each chunk is
gathered once and written to ``diffraction``, ``X_full`` and ``Y``. Memory beyond the
outputs is one chunk.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from gpugroup._xp import is_device_array, to_host
from gpugroup.io.frames import check_unchanged, file_backed, gather_frames, raw_view

logger = logging.getLogger(__name__)

#: Bytes of gathered frames per chunk (about a CPU's L2/L3 share; results do not depend on it).
DEFAULT_CHUNK_BYTES = 4 << 20
#: On a device, fewer and larger chunks: each one is a handful of kernel launches.
DEFAULT_DEVICE_CHUNK_BYTES = 256 << 20


def default_chunk_bytes(xp) -> int:
    """The in-memory assembly chunk for namespace ``xp`` (NumPy or a device one)."""
    return DEFAULT_CHUNK_BYTES if xp is np else DEFAULT_DEVICE_CHUNK_BYTES


def frame_size(N, stack) -> int:
    """``N`` checked against the frames of ``stack`` (None: their size)."""
    frame = tuple(stack.shape[1:])
    if N is None:
        N = frame[0]
    if isinstance(N, bool) or not isinstance(N, (int, np.integer)):
        raise TypeError(f"N must be an int (the frame size), got N={N!r}; pass N={frame[0]}")
    if (N, N) != frame:
        raise ValueError(f"N={N} does not match the diffraction frames {frame}; pass "
                         f"N={frame[0]}")
    return int(N)


def locality_order(nn_indices) -> np.ndarray:
    """Group rows sorted (stably) by their smallest frame index: reading the groups in
    this order reads the frame stack nearly sequentially."""
    return np.argsort(to_host(nn_indices).min(axis=1), kind="stable")


def take_frames(xp, stack, idx):
    """``stack[idx]`` as an ``xp`` array, for any frame store.

    NumPy arrays and memmaps are gathered directly; device arrays on the device; other
    stores (h5py, zarr, :class:`gpugroup.io.frames.RawFileStack`) through
    :func:`gpugroup.io.frames.gather_frames`: each distinct frame read once, in file order
    (raw bytes with ``pread``, HDF5 runs as hyperslabs, Zarr chunk by chunk), re-expanded.
    """
    if is_device_array(stack):
        return stack[xp.asarray(idx)]
    idx = to_host(idx)
    if isinstance(stack, np.ndarray):
        if file_backed(stack):  # a map of a file rewritten in place shows the new bytes
            check_unchanged(stack, replaced_ok=True)
        return xp.asarray(np.take(stack, idx, axis=0))

    return xp.asarray(gather_frames(stack, idx))


def chunk_groups(B: int, bytes_per_group: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
    """Slices covering ``range(B)`` with about ``chunk_bytes`` of data each."""
    step = max(1, chunk_bytes // max(1, bytes_per_group))
    return [slice(a, min(B, a + step)) for a in range(0, B, step)]


def _run_chunks(xp, fn, slices, workers):
    """Call ``fn(slice)`` for every slice: a small thread pool on the CPU (NumPy releases
    the GIL in copies), in order on a device."""
    if xp is np and workers > 1 and len(slices) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(fn, s) for s in slices]
            try:
                for f in futures:
                    f.result()
            except BaseException:  # an error or Ctrl-C: drop the chunks not yet started
                for f in futures:
                    f.cancel()
                raise
    else:
        for s in slices:
            fn(s)


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def frame_energies(xp, stack, idx, chunk_bytes: int = DEFAULT_CHUNK_BYTES, kernels=None,
                   check: bool = True):
    """float64 ``sum_hw stack[i]**2`` for each ``i`` in ``idx`` (an ``xp`` array).

    ``kernels`` (a backend's fused kernels, or None) sums a device stack in one pass.
    ``idx`` may repeat frames. With ``check``, :func:`check_energies` (one device sync);
    without it, non-finite energies are the caller's to find (a non-finite mean shows
    them: :func:`normalization_scale`)."""
    idx = np.asarray(idx) if not is_device_array(idx) else idx
    n_frames = int(idx.shape[0])
    out = None
    if kernels is not None and is_device_array(stack):
        out = kernels.frame_energies(stack, xp.asarray(idx))
    if out is None:
        out = xp.empty(n_frames, dtype=xp.float64)
        frame_bytes = int(np.prod(stack.shape[1:])) * 8
        for s in chunk_groups(n_frames, frame_bytes, chunk_bytes):
            f = take_frames(xp, stack, idx[s]).astype(xp.float64)
            f = f.reshape(f.shape[0], -1)
            with np.errstate(over="ignore", invalid="ignore"):
                out[s] = xp.einsum("ij,ij->i", f, f)
    if check:
        check_energies(xp, idx, out)
    return out


def check_energies(xp, frames, energies) -> None:
    """Raises ValueError naming the lowest-numbered frame whose energy is not finite (NaN
    or inf values, or values so large that their squares overflow); ``frames`` are the
    frame numbers of ``energies`` (same shape; repeats allowed)."""
    bad = xp.nonzero(~xp.isfinite(energies.reshape(-1)))[0]
    if int(bad.shape[0]):
        frames = to_host(frames).reshape(-1)
        bad = to_host(bad)
        numbers, energy = frames[bad], to_host(energies).reshape(-1)[bad]
        j = int(np.argmin(numbers))
        raise ValueError(
            f"diff3d[{int(numbers[j])}] holds NaN or inf values (or values whose squares "
            f"overflow float64): its energy is {float(energy[j])}, and "
            f"{len(np.unique(numbers))} of the {len(np.unique(frames))} frames used are "
            f"like it; such frames cannot be normalized: fix or drop them "
            f"(np.isfinite(diff3d).all(axis=(1, 2)) finds them)")


#: X_full = diffraction * float32(s) (as PtychoPINN): s must be a normal float32.
_F32_TINY, _F32_MAX = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)


def normalization_scale(xp, energies, N: int, frames=None) -> float:
    """s = sqrt((N/2)**2 / mean(E)) in float64 (DESIGN.md section 2).

    ``frames``: the frame number of each energy; when the mean is not finite, the frames
    to blame are then named (:func:`check_energies`), so that energies computed without
    ``check`` cost one device sync here and none more."""
    mean = float(xp.mean(energies))
    if not np.isfinite(mean) and frames is not None:
        check_energies(xp, frames, energies)
    if not (mean > 0 and np.isfinite(mean)):
        raise ValueError(
            f"the grouped diffraction frames have mean energy {mean}: all-zero (or NaN) frames "
            f"cannot be normalized; check diff3d"
        )
    s = float(np.sqrt((N / 2.0) ** 2 / mean))
    if not _F32_TINY <= s <= _F32_MAX:  # float32(s) would be 0, subnormal or inf
        raise ValueError(
            f"the grouped diffraction frames have mean energy {mean:.3g}, so the scale s = "
            f"{s:.3g} is beyond float32's normal numbers and X_full = diffraction * "
            f"float32(s) would be 0, inexact or inf; rescale diff3d to amplitudes of an "
            f"ordinary size (e.g. square roots of photon counts)")
    return s


def group_energies(xp, stack, nn_indices, chunk_bytes: int = DEFAULT_CHUNK_BYTES, kernels=None,
                   check: bool = True):
    """Energies E[nn_indices] of the frames groups use, each frame read once (with
    ``kernels`` and a device stack: each group member's frame, in one kernel and no sort;
    the same values). ``check``: see :func:`frame_energies`."""
    nn = nn_indices if is_device_array(nn_indices) else np.asarray(nn_indices)
    if kernels is not None and is_device_array(stack):
        members = xp.ascontiguousarray(xp.asarray(nn)).reshape(-1)
        return frame_energies(xp, stack, members, chunk_bytes, kernels,
                              check).reshape(nn.shape)
    uniq, inverse = (xp if is_device_array(nn) else np).unique(nn, return_inverse=True)
    energies = frame_energies(xp, stack, uniq, chunk_bytes, kernels, check)
    return energies[xp.asarray(inverse).reshape(nn.shape)]


#: Where ``Y`` patches of ``objectGuess`` are cut (DESIGN.md sections 2 and 6).
Y_POSITIONS = ("ptychopinn", "members")


def check_y_positions(y_positions) -> str:
    """``y_positions`` checked: ``"ptychopinn"`` or ``"members"``."""
    if y_positions not in Y_POSITIONS:
        raise ValueError(
            f"y_positions must be one of {Y_POSITIONS}, got y_positions={y_positions!r}: "
            f"'ptychopinn' cuts channel c at 2*coords_offsets - pos_c (PtychoPINN's "
            f"get_image_patches), 'members' at each member's own start position")
    return y_positions


def check_progress(progress):
    """``progress`` checked: None or a callable taking the count of work done."""
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be a callable (called with the count finished in "
                        f"each chunk, as tqdm's update takes) or None, got "
                        f"progress={progress!r}")
    return progress


def check_norm_scale(norm_scale):
    """``norm_scale`` checked: None (computed from the frames) or a number > 0 that float32
    holds as a normal number (a 0-d array too), returned as a float."""
    if norm_scale is None:
        return None
    try:
        s = None if isinstance(norm_scale, (bool, np.bool_, str)) else float(norm_scale)
    except (TypeError, ValueError):
        s = None
    if s is None or not _F32_TINY <= s <= _F32_MAX:
        raise ValueError(f"norm_scale must be a number in [{_F32_TINY:.3g}, {_F32_MAX:.3g}] "
                         f"(the s of X_full = diffraction * float32(s)) or None to compute "
                         f"it, got norm_scale={norm_scale!r}")
    return s


def patch_positions(y_positions, xcoords, ycoords, xcoords_start, ycoords_start):
    """The per-position coordinates ``Y`` is cut from: ``xcoords``/``ycoords`` for
    ``"ptychopinn"`` (reflected through each group's centre by :class:`PatchSource`), the
    start positions for ``"members"``."""
    if check_y_positions(y_positions) == "ptychopinn":
        return xcoords, ycoords
    return xcoords_start, ycoords_start


class PatchSource:
    """Where ``Y`` comes from: ground-truth patches ``Y`` (n, N, N), else ``objectGuess``
    cut by :func:`extract_patches` around positions (``xs``, ``ys``).

    ``y_positions="ptychopinn"`` (default) cuts channel c of a group at PtychoPINN's point
    ``coords_offsets + coords_relative`` = 2 * mean(pos) - pos_c (the member reflected
    through the group centre; at gridsize 1 the position itself), rounded to float32, as
    PtychoPINN's ``get_image_patches`` does; ``"members"`` cuts each channel at its own position. The
    object is padded once here, so chunks and batches only copy their windows.
    """

    def __init__(self, xp, N: int, *, Y=None, objectGuess=None, xs=None, ys=None, warn=True,
                 y_positions="ptychopinn"):
        self.N = int(N)
        self.stack = Y
        self.reflect = check_y_positions(y_positions) == "ptychopinn"
        if Y is None:
            self.padded = _pad_object(xp, objectGuess, self.N)
            self.xs = xp.asarray(xs, dtype=xp.float64)
            self.ys = xp.asarray(ys, dtype=xp.float64)
            if warn:
                warn_patches_off_object(xp, self.xs, self.ys, objectGuess.shape, self.N)

    @classmethod
    def optional(cls, xp, N, Y=None, objectGuess=None, xs=None, ys=None, warn=True,
                 y_positions="ptychopinn"):
        """A source, or None when the scan has neither ``Y`` nor ``objectGuess``."""
        if Y is None and objectGuess is None:
            return None
        return cls(xp, N, Y=Y, objectGuess=objectGuess, xs=xs, ys=ys, warn=warn,
                   y_positions=y_positions)

    @property
    def size(self) -> int:
        """The patches' side: the ground-truth frames' size, else N."""
        return self.N if self.stack is None else int(self.stack.shape[1])

    def take(self, xp, idx):
        """complex64 (len(idx), N, N) patches at positions ``idx`` (each its own point)."""
        if self.stack is not None:
            return take_frames(xp, self.stack, idx).astype(xp.complex64, copy=False)
        idx = xp.asarray(idx)
        return _patches(xp, self.padded, self.xs[idx], self.ys[idx], self.N)

    def take_groups(self, xp, nn):
        """complex64 (b, C, N, N) patches of the groups ``nn`` (b, C)."""
        b, C = int(nn.shape[0]), int(nn.shape[1])
        if self.stack is not None or not self.reflect:
            p = self.take(xp, nn.reshape(-1))
            return p.reshape((b, C) + tuple(p.shape[1:]))
        nn = xp.asarray(nn)
        points = []
        for pos in (self.xs, self.ys):
            members = pos[nn]
            offset = xp.mean(members, axis=1, keepdims=True)  # coords_offsets
            point = offset + (-(members - offset))  # + coords_relative, in float64
            # PtychoPINN casts the sum to float32 before cutting: the same centres, bit
            # for bit (at 4000 px a float32 step is 2.4e-4 px)
            points.append(point.astype(xp.float32).astype(xp.float64).reshape(-1))
        return _patches(xp, self.padded, points[0], points[1], self.N).reshape(
            b, C, self.N, self.N)


def gather_channel_last(xp, stack, nn_indices, *, scale=None, out_diffraction=None,
                        out_X=None, out_Y=None, patches=None,
                        chunk_bytes=DEFAULT_CHUNK_BYTES, workers=None, progress=None,
                        kernels=None):
    """One fused pass over chunks of groups: gather, write channel-last, scale.

    Writes ``out_diffraction[g] = stack[nn[g]]`` moved to (N, N, C),
    ``out_X[g] = that * float32(scale)`` and ``out_Y[g]`` = the members' patches from
    ``patches`` (a :class:`PatchSource`), each moved to (N, N, C); any output may be
    None. Outputs are preallocated (B, N, N, C) arrays (NumPy, CuPy, or any store taking
    slice assignment, e.g. an HDF5 dataset). ``progress(k)`` is called with the number of
    groups done after each chunk. ``kernels`` (a backend's fused kernels, or None) does
    the gather, transpose and scale of a device stack into device outputs in one pass.
    """
    B, C = int(nn_indices.shape[0]), int(nn_indices.shape[1])
    frame = tuple(stack.shape[1:])
    group_bytes = C * int(np.prod(frame)) * (np.dtype(stack.dtype).itemsize
                                             + (16 if out_Y is not None else 0))
    s32 = None if scale is None else np.float32(scale)
    m = np.result_type(stack.dtype, np.float32)  # X_full's product type, as NumPy's
    workers = default_workers() if workers is None else workers
    fused = (kernels is not None and is_device_array(stack)
             and all(o is None or is_device_array(o) for o in (out_diffraction, out_X)))

    def one(sl):
        b = sl.stop - sl.start
        flat = nn_indices[sl].reshape(-1)
        done = fused and kernels.gather_channel_last(
            stack, xp.asarray(nn_indices[sl]), s32,
            None if out_diffraction is None else out_diffraction[sl],
            None if out_X is None else out_X[sl])
        if not done and (out_diffraction is not None or out_X is not None):
            moved = xp.moveaxis(take_frames(xp, stack, flat).reshape((b, C) + frame), 1, -1)
            if out_diffraction is not None:
                out_diffraction[sl] = moved
            if out_X is not None:
                if isinstance(out_X, np.ndarray) or is_device_array(out_X):
                    xp.multiply(moved, s32, out=out_X[sl], casting="unsafe", dtype=m)
                else:
                    out_X[sl] = xp.multiply(moved, s32, dtype=m).astype(np.float32)
        if out_Y is not None:
            out_Y[sl] = xp.moveaxis(patches.take_groups(xp, nn_indices[sl]), 1, -1)
        if progress is not None:
            progress(b)

    _run_chunks(xp, one, chunk_groups(B, group_bytes, chunk_bytes), workers)


def coordinates_on(xp, arrays):
    """The coordinate arrays ``arrays`` on ``xp``: host arrays of one dtype go to a device in
    one copy, each distinct array once (each copy from host memory waits for the device)."""
    if (xp is not np and all(isinstance(a, np.ndarray) for a in arrays)
            and len({a.dtype for a in arrays}) == 1):
        distinct = list({id(a): a for a in arrays}.values())
        on_device = dict(zip([id(a) for a in distinct], xp.asarray(np.stack(distinct))))
        return tuple(on_device[id(a)] for a in arrays)
    return tuple(xp.asarray(a) for a in arrays)


def group_coordinates(xp, nn_indices, xcoords, ycoords, xcoords_start, ycoords_start,
                      kernels=None):
    """``{prefix}_nn`` (B,1,2,C), ``{prefix}_offsets`` (B,1,2,1) and ``{prefix}_relative``
    (B,1,2,C), float64, for prefix ``coords`` (the positions) and ``coords_start``.

    ``kernels`` (a backend's fused kernels) computes all six in one kernel when the groups
    and coordinates are on the device (the offsets, means of C values, may then differ
    from NumPy's in the last bit: its sums run in another order)."""
    nn = xp.asarray(nn_indices)
    arrays = coordinates_on(xp, (xcoords, ycoords, xcoords_start, ycoords_start))
    if kernels is not None and is_device_array(nn):
        out = kernels.group_coordinates(nn, arrays)
        if out is not None:
            return out
    out = {}
    for prefix, x, y in (("coords", *arrays[:2]), ("coords_start", *arrays[2:])):
        nn_xy = xp.stack([x[nn], y[nn]], axis=1)[:, None, :, :]
        offsets = xp.mean(nn_xy, axis=3, keepdims=True)
        out.update({f"{prefix}_nn": nn_xy, f"{prefix}_offsets": offsets,
                    f"{prefix}_relative": -(nn_xy - offsets)})
    return out


def empty_outputs(xp, B: int, N: int, C: int, dtype, keep_diffraction: bool, with_y: bool,
                  frame: int | None = None, patch: int | None = None):
    """Uninitialized (B, F, F, C) ``diffraction`` (``dtype`` in native byte order, as
    PyTorch and CuPy take it; None unless ``keep_diffraction``), float32 ``X_full`` and
    (B, P, P, C) complex64 ``Y`` (None unless ``with_y``); F, the frame size, and P, the
    patches' side, are N unless given."""
    F = N if frame is None else int(frame)
    P = N if patch is None else int(patch)
    shape = (B, F, F, C)
    dtype = np.dtype(dtype).newbyteorder("=")  # (a big-endian HDF5 scan's frames: '>f4')
    return {"diffraction": xp.empty(shape, dtype=dtype) if keep_diffraction else None,
            "X_full": xp.empty(shape, dtype=xp.float32),
            "Y": xp.empty((B, P, P, C), dtype=xp.complex64) if with_y else None}


def extract_patches(xp, obj, xc, yc, N: int):
    """N x N patches of ``obj`` centred on each (xc, yc), bilinear, zero outside.

    Convention: x is the column and y the row coordinate in object pixels, pixel (r, c)
    of ``obj`` sits at (x=c, y=r), and ``patch[k, i, j] = obj(y=yc[k] - N//2 + i,
    x=xc[k] - N//2 + j)``, so the patch centre pixel (N//2, N//2) lies exactly on the
    scan position. Returns complex64 (len(xc), N, N).
    """
    return _patches(xp, _pad_object(xp, obj, N), xc, yc, N)


def warn_patches_off_object(xp, xs, ys, shape, N: int) -> None:
    """Log positions whose whole N x N patch lies outside the object (their Y is zero):
    usually a coordinate-convention mistake (x = column, y = row, in object pixels)."""
    H, W = int(shape[0]), int(shape[1])
    top, left = ys - N // 2, xs - N // 2
    off = (top + N <= 0) | (top >= H) | (left + N <= 0) | (left >= W)  # bilinear: +1 pixel
    k = int(off.sum())
    if k:
        i = int(xp.argmax(off))
        logger.warning(
            "%d of %d scan positions have their whole %dx%d patch outside objectGuess "
            "(%dx%d), so their Y is zero, e.g. position %d at (x=%g, y=%g); the patches take "
            "x as the column and y as the row, in object pixels (xcoords_start, ycoords_start)",
            k, int(xs.shape[0]), N, N, H, W, i, float(xs[i]), float(ys[i]))


def _pad_object(xp, obj, N: int):
    """complex64 object with N + 1 zero pixels on every side (so any window fits)."""
    obj = xp.asarray(obj)
    P = N + 1
    padded = xp.zeros((obj.shape[0] + 2 * P, obj.shape[1] + 2 * P), dtype=xp.complex64)
    padded[P:-P, P:-P] = obj
    return padded


def _patches(xp, padded, xc, yc, N: int):
    P = N + 1
    H, W = padded.shape[0] - 2 * P, padded.shape[1] - 2 * P
    top = xp.asarray(yc, dtype=xp.float64) - N // 2
    left = xp.asarray(xc, dtype=xp.float64) - N // 2
    r0 = xp.floor(top)
    c0 = xp.floor(left)
    # The fractional shift is the same for every pixel of a patch: copy one (N+1) x (N+1)
    # window per patch, then blend neighbouring rows and columns with real weights.
    # A window clipped to the padding's edge lies wholly in zeros, as it should.
    r = xp.clip(r0 + P, 0, H + P).astype(xp.int64)
    c = xp.clip(c0 + P, 0, W + P).astype(xp.int64)
    win = xp.lib.stride_tricks.sliding_window_view(padded, (P, P))[r, c]
    fr = (top - r0).astype(xp.float32)[:, None, None]
    fc = (left - c0).astype(xp.float32)[:, None, None, None]
    re_im = win.view(xp.float32)  # (k, N+1, 2N+2): interleaved real, imaginary
    rows = re_im[:, :-1] * (1 - fr)
    rows += re_im[:, 1:] * fr
    rows = rows.reshape(rows.shape[0], N, P, 2)
    out = rows[:, :, :-1] * (1 - fc)
    out += rows[:, :, 1:] * fc
    return out.reshape(out.shape[0], N, 2 * N).view(xp.complex64)


class AssemblyPlan:
    """What the groups of one scan need before any frame is gathered, computed once: the
    normalization factor s, where ``Y`` comes from, the coordinates on ``xp``.

    One plan fills any sink, for any rows of the groups: in-memory arrays
    (:func:`assemble_groups`), a streamed file (:mod:`gpugroup.streamed`), a Dask block
    (:mod:`gpugroup.dask`) or a training batch (:class:`gpugroup.dataset.GroupedDataset`).

    Parameters
    ----------
    xp : module
        The array namespace the outputs live in.
    scan : RawData or :class:`gpugroup.schema.ScanArrays`
        Anything with the scan fields of DESIGN.md section 1 (``diff3d``, the four
        coordinate arrays, ``Y``, ``objectGuess``).
    nn_indices : (B, C) array of int
        The groups; only used for s (``norm_scale`` None).
    N : int
        Frame size.
    norm_scale : float or None
        s; None computes it from the energies of the frames the groups use (each read
        once).
    keep_diffraction : bool
        Whether ``diffraction`` is an output (``X_full`` always is).
    chunk_bytes : int
        Bytes per chunk of the energies pass.
    kernels : object or None
        The backend's fused kernels (``Backend.kernels``), used where they apply.
    warn : bool
        Log positions whose patch lies wholly outside ``objectGuess`` (once per scan).
    out_of_core : bool
        Read file-backed stacks with ``pread`` (:func:`gpugroup.io.frames.raw_view`), so
        that the passes over them leave nothing resident in this process; in memory, a
        memory map is faster while the file fits.
    y_positions : {"ptychopinn", "members"}
        Where ``Y`` is cut from ``objectGuess`` (see :class:`PatchSource`).

    ``N`` sets the normalization and the size of ``Y`` cut from the object;
    ``diffraction`` and ``X_full`` keep the frames' own size (PtychoPINN's behaviour when
    the two differ).
    """

    def __init__(self, xp, scan, nn_indices, N: int, *, norm_scale=None,
                 keep_diffraction: bool = True, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 kernels=None, warn: bool = True, out_of_core: bool = False,
                 y_positions: str = "ptychopinn"):
        self.xp, self.N, self.kernels = xp, int(N), kernels
        self.keep_diffraction = bool(keep_diffraction)
        y_stack = scan.Y
        self.stack = scan.diff3d
        if out_of_core:
            self.stack = raw_view(self.stack) or self.stack
            y_stack = None if y_stack is None else (raw_view(y_stack) or y_stack)
        if norm_scale is None:
            nn = nn_indices if is_device_array(nn_indices) else np.asarray(nn_indices)
            energies = group_energies(xp, self.stack, nn, chunk_bytes, kernels, check=False)
            norm_scale = normalization_scale(xp, energies, self.N, frames=nn)
        self.scale = float(norm_scale)
        xs, ys = patch_positions(y_positions, scan.xcoords, scan.ycoords, scan.xcoords_start,
                                 scan.ycoords_start)
        self.patches = PatchSource.optional(xp, self.N, y_stack, scan.objectGuess, xs, ys,
                                            warn, y_positions=y_positions)
        # On the device once, beside the frames (batches and chunks reuse them).
        self.coords = coordinates_on(xp, (scan.xcoords, scan.ycoords, scan.xcoords_start,
                                          scan.ycoords_start))

    @property
    def with_y(self) -> bool:
        return self.patches is not None

    def outputs(self, B: int, C: int) -> dict:
        """Uninitialized ``xp`` arrays for ``B`` groups of ``C`` (see :func:`empty_outputs`)."""
        return empty_outputs(self.xp, B, self.N, C, self.stack.dtype, self.keep_diffraction,
                             self.with_y, frame=int(self.stack.shape[1]),
                             patch=None if self.patches is None else self.patches.size)

    def fill(self, nn_indices, sinks: dict, *, chunk_bytes=DEFAULT_CHUNK_BYTES,
             workers=None, progress=None) -> None:
        """Write the groups ``nn_indices`` into ``sinks["diffraction"]``, ``["X_full"]``
        and ``["Y"]`` (any may be None or absent): arrays or stores taking slice
        assignment, (len(nn_indices), N, N, C)."""
        gather_channel_last(self.xp, self.stack, nn_indices,
                            scale=self.scale, out_diffraction=sinks.get("diffraction"),
                            out_X=sinks.get("X_full"), out_Y=sinks.get("Y"),
                            patches=self.patches, chunk_bytes=chunk_bytes, workers=workers,
                            progress=progress, kernels=self.kernels)

    def coordinates(self, nn_indices) -> dict:
        """The coordinate entries of DESIGN.md section 2 for groups ``nn_indices``."""
        return group_coordinates(self.xp, nn_indices, *self.coords, kernels=self.kernels)

    def assemble(self, nn_indices, *, chunk_bytes=DEFAULT_CHUNK_BYTES, workers=None,
                 progress=None) -> dict:
        """The grouped dict of DESIGN.md section 2, in memory (``xp`` arrays)."""
        nn = self.xp.asarray(nn_indices)
        grouped = {"nn_indices": nn, **self.outputs(int(nn.shape[0]), int(nn.shape[1])),
                   "norm_scale": self.scale}
        self.fill(nn, grouped, chunk_bytes=chunk_bytes, workers=workers, progress=progress)
        grouped.update(self.coordinates(nn))
        return grouped


def assemble_groups(xp, scan, nn_indices, N: int, *, keep_diffraction: bool = True,
                    chunk_bytes: int = DEFAULT_CHUNK_BYTES, workers=None, progress=None,
                    kernels=None, y_positions: str = "ptychopinn"):
    """The grouped dict of DESIGN.md section 2 for groups ``nn_indices`` (B, C) of ``scan``.

    ``scan.diff3d`` may be a NumPy array, a memmap, an h5py/zarr array or (with xp = cupy)
    a device array; outputs are ``xp`` arrays. With ``keep_diffraction=False`` the
    ``diffraction`` entry is None and only ``X_full`` is materialized. ``kernels``: the
    backend's fused kernels (``Backend.kernels``), used where they apply. ``y_positions``:
    where ``Y`` is cut from ``objectGuess`` (see :class:`PatchSource`).

    Examples
    --------
    >>> import numpy as np
    >>> from gpugroup.schema import ScanArrays
    >>> x = np.arange(6.0)
    >>> scan = ScanArrays(x, np.zeros(6), np.ones((6, 4, 4), np.float32))
    >>> out = assemble_groups(np, scan, np.array([[0, 1], [2, 3]]), 4)
    >>> out["X_full"].shape, out["norm_scale"]
    ((2, 4, 4, 2), 0.5)
    """
    plan = AssemblyPlan(xp, scan, nn_indices, N, keep_diffraction=keep_diffraction,
                        chunk_bytes=chunk_bytes, kernels=kernels, y_positions=y_positions)
    grouped = plan.assemble(nn_indices, chunk_bytes=chunk_bytes, workers=workers,
                            progress=progress)
    grouped["objectGuess"] = scan.objectGuess
    return grouped
