"""Synthetic but physical ptychography scans, so gpugroup runs with no data of its own.

:func:`simulate_scan` lays out Fermat-spiral scan positions over a complex test object,
cuts the illuminated patches with the package's own bilinear convention
(:func:`gpugroup.assembly.extract_patches`) and records far-field diffraction amplitudes
``|fftshift(fft2(probe * patch))|`` in the NPZ layout of DESIGN.md section 1. Used by the
demo, the tests and the benchmarks.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from gpugroup.assembly import extract_patches
from gpugroup.grouping import check_count
from gpugroup.rawdata import RawData

logger = logging.getLogger(__name__)

#: The golden angle pi * (3 - sqrt(5)) in radians: successive spiral points turn by it.
GOLDEN_ANGLE = math.pi * (3.0 - math.sqrt(5.0))

#: Complex patch bytes per diffraction chunk (bounds the FFT's working memory).
_CHUNK_BYTES = 32 << 20

#: Free pixels between the outermost patch and the object's edge (default object size).
_MARGIN = 2


def fermat_spiral(n: int, spacing: float, jitter: float = 0.0, rng=None):
    """Scan positions on a Fermat spiral, centred on the origin.

    Point ``i`` sits at radius ``c * sqrt(i)`` and angle ``i * GOLDEN_ANGLE``, which
    covers a disk with one point per area ``pi * c**2``; ``c = spacing / sqrt(pi)`` gives
    one point per ``spacing**2`` of area (nearest neighbours about ``0.85 * spacing``
    apart).

    Parameters
    ----------
    n : int
        Number of positions.
    spacing : float
        Square root of the area per point, in pixels.
    jitter : float
        Standard deviation of Gaussian position noise, as a fraction of ``spacing``.
    rng : numpy.random.Generator, optional
        Source of the jitter (required when ``jitter > 0``).

    Returns
    -------
    x, y : (n,) float64 arrays

    Examples
    --------
    >>> x, y = fermat_spiral(3, spacing=1.0)
    >>> x.round(3).tolist(), y.round(3).tolist()
    ([0.0, -0.416, 0.07], [0.0, 0.381, -0.795])
    """
    i = np.arange(n, dtype=np.float64)
    r = spacing / math.sqrt(math.pi) * np.sqrt(i)
    theta = i * GOLDEN_ANGLE
    x = r * np.cos(theta)
    y = r * np.sin(theta)
    if jitter > 0:
        x += rng.normal(0.0, jitter * spacing, n)
        y += rng.normal(0.0, jitter * spacing, n)
    return x, y


def jittered_scan(n: int, seed: int = 0, spacing: float = 1.0, jitter: float = 0.3):
    """A jittered raster scan: ``n`` positions row by row on a square-ish grid of pitch
    ``spacing``, each moved by up to ``jitter * spacing`` (reproducible from ``seed``).
    Returns float64 ``(x, y)``; used by the tests and benchmarks."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n)))
    row, col = np.divmod(np.arange(n), side)
    x = (col + rng.uniform(-jitter, jitter, n)) * spacing
    y = (row + rng.uniform(-jitter, jitter, n)) * spacing
    return x, y


def nested_scan(n: int, seed: int = 0, fine_fraction: float = 0.5, ratio: float = 100.0):
    """A coarse overview scan (pitch 1) with a fine scan (pitch ``1 / ratio``) of a small
    region inside it: ``round(fine_fraction * n)`` of the ``n`` positions are fine, so the
    density varies by ``ratio**2``. Both parts are :func:`jittered_scan` rasters; returns
    float64 ``(x, y)``, coarse positions first. Used by the tests and benchmarks."""
    n_fine = int(round(fine_fraction * n))
    x, y = jittered_scan(n - n_fine, seed=seed)
    fx, fy = jittered_scan(n_fine, seed=seed + 1, spacing=1.0 / ratio)
    side = math.ceil(math.sqrt(max(n - n_fine, 1)))
    return np.concatenate([x, fx + 0.43 * side]), np.concatenate([y, fy + 0.27 * side])


def make_probe(N: int) -> np.ndarray:
    """A soft-edged disk with a quadratic (defocus) phase, normalized to unit energy.

    The disk has radius ``N / 4`` and a ``tanh`` edge about ``N / 32`` wide; the phase
    grows as ``pi * (r / radius)**2``. ``sum(|probe|**2) == 1``.

    Examples
    --------
    >>> p = make_probe(16)
    >>> p.shape, p.dtype, round(float(np.sum(np.abs(p) ** 2)), 6)
    ((16, 16), dtype('complex64'), 1.0)
    """
    c = np.arange(N, dtype=np.float64) - N // 2
    r = np.hypot(c[None, :], c[:, None])
    radius = N / 4.0
    edge = max(N / 32.0, 0.5)
    amplitude = 0.5 * (1.0 - np.tanh((r - radius) / edge))
    probe = amplitude * np.exp(1j * np.pi * (r / radius) ** 2)
    probe /= np.sqrt(np.sum(np.abs(probe) ** 2))
    return probe.astype(np.complex64)


def _add_feature(field, cy, cx, extent, profile):
    """``field[window] += profile(dy, dx)`` over a window of +-``extent`` pixels."""
    H, W = field.shape
    r0, r1 = max(0, int(cy - extent)), min(H, int(cy + extent) + 2)
    c0, c1 = max(0, int(cx - extent)), min(W, int(cx + extent) + 2)
    if r0 >= r1 or c0 >= c1:
        return
    dy = np.arange(r0, r1, dtype=np.float64)[:, None] - cy
    dx = np.arange(c0, c1, dtype=np.float64)[None, :] - cx
    field[r0:r1, c0:c1] += profile(dy, dx)


def smooth_noise(shape, correlation: float, rng) -> np.ndarray:
    """Gaussian random field with unit standard deviation and correlation length ``correlation`` px.

    White noise low-pass filtered in Fourier space by ``exp(-(k * correlation)**2 / 2)``.
    """
    H, W = shape
    noise = rng.standard_normal((H, W))
    ky = 2 * np.pi * np.fft.fftfreq(H)[:, None]
    kx = 2 * np.pi * np.fft.rfftfreq(W)[None, :]
    filt = np.exp(-0.5 * (kx * kx + ky * ky) * correlation**2)
    field = np.fft.irfft2(np.fft.rfft2(noise) * filt, s=(H, W))
    std = field.std()
    return field / std if std > 0 else field


def make_object(shape, N: int, rng) -> np.ndarray:
    """A complex test object: amplitude in [0.5, 1] and phase in about [-1.6, 1.6] rad.

    Absorbing Gaussian blobs and a fine random texture shape the amplitude; Gaussian
    blobs, thin rings (sizes from ``N / 16`` to ``N / 2``, about one feature per
    ``(N/2)**2`` pixels) and a second texture (correlation length ``N / 16``) shape the
    phase, so every probe position sees structure at several scales. Deterministic for
    a given ``rng`` state.

    Returns
    -------
    numpy.ndarray
        complex64 of ``shape``.
    """
    H, W = shape
    count = max(8, int(H * W / (N / 2.0) ** 2))
    absorption = np.zeros((H, W))
    phase = np.zeros((H, W))
    cy, cx = rng.uniform(0, H, count), rng.uniform(0, W, count)
    sigma = rng.uniform(N / 16.0, N / 3.0, count)
    weight = rng.uniform(0.2, 0.6, count)
    kind = rng.integers(0, 3, count)  # 0: absorbing blob, 1: phase blob, 2: phase ring
    ring_radius = rng.uniform(N / 8.0, N / 2.0, count)
    for k in range(count):
        s, w = sigma[k], weight[k]
        if kind[k] == 2:
            r_k, width = ring_radius[k], max(1.0, s / 4.0)
            _add_feature(phase, cy[k], cx[k], r_k + 4 * width,
                         lambda dy, dx: w * np.exp(-((np.hypot(dy, dx) - r_k) ** 2)
                                                   / (2 * width**2)))
        else:
            target = absorption if kind[k] == 0 else phase
            _add_feature(target, cy[k], cx[k], 4 * s,
                         lambda dy, dx: w * np.exp(-(dy * dy + dx * dx) / (2 * s * s)))
    correlation = max(1.0, N / 16.0)
    absorption += 0.3 * np.maximum(smooth_noise((H, W), correlation, rng), 0.0)
    phase += 0.25 * smooth_noise((H, W), correlation, rng)
    amplitude = 1.0 - 0.5 * np.tanh(absorption)  # absorption >= 0: amplitude in (0.5, 1]
    phase = 1.6 * np.tanh(phase)
    return (amplitude * np.exp(1j * phase)).astype(np.complex64)


def diffraction_amplitudes(probe, obj, xcoords, ycoords, *, chunk_bytes=_CHUNK_BYTES):
    """``|fftshift(fft2(probe * patch_i))|`` for each scan position, float32 (n, N, N).

    Patches are cut by :func:`gpugroup.assembly.extract_patches` (bilinear; the patch
    centre pixel ``(N//2, N//2)`` on the position), in chunks of about ``chunk_bytes``.
    """
    N = int(probe.shape[0])
    n = int(np.shape(xcoords)[0])
    out = np.empty((n, N, N), dtype=np.float32)
    step = max(1, chunk_bytes // (N * N * 16))
    for a in range(0, n, step):
        b = min(n, a + step)
        exit_wave = probe[None] * extract_patches(np, obj, xcoords[a:b], ycoords[a:b], N)
        far_field = np.fft.fftshift(np.fft.fft2(exit_wave), axes=(-2, -1))
        np.abs(far_field, out=out[a:b], casting="same_kind")
    return out


def simulate_scan(n: int = 2000, N: int = 64, seed: int = 0, *, spacing=None, jitter=0.1,
                  object_shape=None) -> dict:
    """Simulate a ptychography scan in the NPZ layout of DESIGN.md section 1.

    Positions follow a Fermat spiral with Gaussian jitter, offset so that every patch
    (with its bilinear neighbour row and column) lies inside the object. The far field of
    each position is ``|fftshift(fft2(probe * patch))|``, the patch cut from the object
    by :func:`gpugroup.assembly.extract_patches` at that position (so the grouped ``Y``
    patches of :meth:`gpugroup.RawData.generate_grouped_data` are exactly the simulated
    ones).

    Parameters
    ----------
    n : int
        Number of scan positions (>= 1).
    N : int
        Frame size in pixels (>= 4).
    seed : int
        Seed of the ``numpy.random.default_rng`` that draws the jitter and the object.
        Same seed, same scan.
    spacing : float, optional
        Scan step in pixels: one position per ``spacing**2`` of object area (nearest
        neighbours about ``0.85 * spacing`` apart). Default ``N / 4``, so the probe
        (diameter ``N / 2``) overlaps its neighbours by more than half.
    jitter : float
        Standard deviation of the position noise as a fraction of ``spacing`` (>= 0).
    object_shape : (int, int), optional
        Object size (H, W); default just large enough for the scan. A larger object
        centres the scan; one too small raises.

    Returns
    -------
    dict
        ``xcoords``, ``ycoords``, ``xcoords_start``, ``ycoords_start`` (n,) float64;
        ``diff3d`` (n, N, N) float32 amplitudes; ``probeGuess`` (N, N) complex64;
        ``objectGuess`` (H, W) complex64; ``scan_index`` (n,) int64 zeros.

    Raises
    ------
    ValueError
        A bad count, spacing or jitter, or an ``object_shape`` too small for the scan.

    Examples
    --------
    >>> from gpugroup.simulate import simulate_scan
    >>> scan = simulate_scan(n=50, N=16, seed=1)
    >>> scan["diff3d"].shape, scan["diff3d"].dtype, scan["objectGuess"].dtype
    ((50, 16, 16), dtype('float32'), dtype('complex64'))
    """
    n = check_count("n", n, 1)
    N = check_count("N", N, 4)
    spacing = N / 4.0 if spacing is None else float(spacing)
    if not (math.isfinite(spacing) and spacing > 0):
        raise ValueError(f"spacing must be a positive number of pixels, got spacing={spacing}")
    jitter = float(jitter)
    if not (math.isfinite(jitter) and jitter >= 0):
        raise ValueError(f"jitter must be >= 0 (a fraction of spacing), got jitter={jitter}")
    rng = np.random.default_rng(seed)
    x, y = fermat_spiral(n, spacing, jitter, rng)

    # A patch at (x, y) reads object columns floor(x - N//2) .. floor(x - N//2) + N
    # (N + 1 columns: the bilinear blend), likewise rows; keep all of them inside.
    lo = N // 2 + _MARGIN
    x -= np.floor(x.min()) - lo
    y -= np.floor(y.min()) - lo
    need = (int(np.floor(y.max())) - N // 2 + N + 1 + _MARGIN,
            int(np.floor(x.max())) - N // 2 + N + 1 + _MARGIN)
    if object_shape is None:
        H, W = need
    else:
        H, W = (int(v) for v in object_shape)
        if H < need[0] or W < need[1]:
            raise ValueError(
                f"object_shape={tuple(object_shape)} is too small for n={n} positions at "
                f"spacing={spacing:g} with N={N}: the scan needs at least {need}; pass a "
                f"larger object_shape (or None)"
            )
        x += (W - need[1]) // 2
        y += (H - need[0]) // 2

    obj = make_object((H, W), N, rng)
    probe = make_probe(N)
    diff3d = diffraction_amplitudes(probe, obj, x, y)
    logger.info("simulate_scan: n=%d N=%d seed=%s spacing=%.3g jitter=%.3g object %dx%d",
                n, N, seed, spacing, jitter, H, W)
    return {
        "xcoords": x,
        "ycoords": y,
        "xcoords_start": x.copy(),
        "ycoords_start": y.copy(),
        "diff3d": diff3d,
        "probeGuess": probe,
        "objectGuess": obj,
        "scan_index": np.zeros(n, dtype=np.int64),
    }


def simulate_rawdata(n: int = 2000, N: int = 64, seed: int = 0, *, backend="auto", **kwargs):
    """:func:`simulate_scan` wrapped in a :class:`gpugroup.RawData`.

    Keyword arguments other than ``backend`` go to :func:`simulate_scan`; the simulation
    parameters are kept in ``RawData.metadata["simulation"]``.

    Examples
    --------
    >>> from gpugroup.simulate import simulate_rawdata
    >>> raw = simulate_rawdata(n=40, N=16, seed=3, backend="cpu")
    >>> len(raw), raw.metadata["simulation"]["seed"]
    (40, 3)
    """
    scan = simulate_scan(n, N, seed, **kwargs)
    params = {"n": int(n), "N": int(N), "seed": seed}
    params.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()})
    return RawData(scan["xcoords"], scan["ycoords"], scan["xcoords_start"],
                   scan["ycoords_start"], scan["diff3d"], scan["probeGuess"],
                   scan["scan_index"], objectGuess=scan["objectGuess"],
                   metadata={"simulation": params}, backend=backend)
