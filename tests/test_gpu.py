"""GPU backend: CPU == GPU groups over the DESIGN section 3 matrix, device output, DLPack.

Every device test runs twice through the ``cp`` fixture (conftest.py): on CuPy with a CUDA
device (marked ``gpu``; skips with the reason otherwise) and on ``devicelike``, the strict
NumPy stand-in that enforces CuPy's host/device rules in public CI. Both GPU engines run:
cuML where it imports on a GPU, scikit-learn in its place on the stand-in. The dispatch
tests at the end check errors and engine choice. This file imports nothing beyond NumPy
and pytest at module level (the GPU machine has no scikit-learn or hypothesis).
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from conftest import (
    CumlLikeNeighbors,
    Expanded32Neighbors,
    RepeatingNeighbors,
    assert_same_grouped,
    host_fused_pool,
    jittered_scan,
    square_grid,
)
from parity_cases import CASES as PARITY_CASES
from parity_cases import case
from gpugroup import sample_groups
from gpugroup.backends import get_backend, gpu


FUSED = "CuPy + CuPy-native grid kNN, fused pool kernel"


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(params=["cupy", "cuml", "fused"])
def engine(request, cp, monkeypatch):
    """A GPU engine name. 'cuml' is real cuML on a GPU (skips where it does not import) and
    scikit-learn in cuML's place on the devicelike stand-in; 'fused' compiles its kernel
    with NVRTC on a GPU and runs it as host C++ on the stand-in."""
    if request.param == "cuml":
        if cp.__name__ == "devicelike":
            _fake_cuml(monkeypatch)
        else:
            pytest.importorskip("cuml", reason="cuML is not installed")
    if request.param == "fused" and cp.__name__ == "devicelike":
        monkeypatch.setattr(gpu, "_fused_pool", host_fused_pool)
    return request.param


@pytest.fixture
def gpu_backend(engine):
    return gpu.make_backend(engine=engine)


# ----------------------------------------------------------------------------- the matrix
def _spiral(n, seed=0):
    from gpugroup.simulate import fermat_spiral

    return fermat_spiral(n, spacing=4.0, jitter=0.1, rng=np.random.default_rng(seed))


CASES = PARITY_CASES + [
    case("spiral-50k-K7", lambda: _spiral(50_000), 5_000, 7, 4),
    case("spiral-50k-K16", lambda: _spiral(50_000, seed=1), 5_000, 16, 4),
]


@pytest.mark.parametrize("xy, nsamples, K, C, seed, kw", CASES)
def test_gpu_groups_equal_cpu(gpu_backend, xy, nsamples, K, C, seed, kw):
    x, y = xy()
    want = sample_groups(x, y, nsamples, K, C, seed=seed, backend="cpu", **kw)
    got = sample_groups(x, y, nsamples, K, C, seed=seed, backend=gpu_backend, **kw)
    assert isinstance(got, np.ndarray) and got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("oversample", [False, True])
def test_gpu_groups_equal_cpu_with_scan_index(gpu_backend, oversample):
    parts = [jittered_scan(300, seed=s) for s in range(3)]
    x = np.concatenate([p[0] + 40.0 * i for i, p in enumerate(parts)])
    y = np.concatenate([p[1] for p in parts])
    scans = np.repeat(np.arange(3), 300)
    kw = dict(scan_index=scans, enable_oversampling=oversample)
    nsamples = 1500 if oversample else 600
    want = sample_groups(x, y, nsamples, 8, 4, seed=5, backend="cpu", **kw)
    got = sample_groups(x, y, nsamples, 8, 4, seed=5, backend=gpu_backend, **kw)
    np.testing.assert_array_equal(got, want)


def test_gpu_small_batches_equal_default(gpu_backend):
    x, y = jittered_scan(2000, seed=21)
    a = sample_groups(x, y, 800, 9, 4, seed=2, backend=gpu_backend)
    b = sample_groups(x, y, 800, 9, 4, seed=2, backend=gpu_backend, batch_rows=5)
    np.testing.assert_array_equal(a, b)


def test_device_coordinates_are_taken_by_every_backend(cp, gpu_backend):
    """CuPy coordinates (positions already on the GPU) give the groups of the host ones,
    on the GPU backend without a trip to the host, and on the CPU backend."""
    x, y = jittered_scan(800, seed=4)
    want = sample_groups(x, y, 200, 7, 4, seed=3, backend="cpu")
    for backend in (gpu_backend, "cpu"):
        got = sample_groups(cp.asarray(x), cp.asarray(y), 200, 7, 4, seed=3, backend=backend)
        np.testing.assert_array_equal(got, want)


def test_gpu_device_output_is_cupy_and_equal(cp, gpu_backend):
    x, y = jittered_scan(1000, seed=3)
    host = sample_groups(x, y, 300, 7, 4, seed=8, backend="cpu")
    dev = sample_groups(x, y, 300, 7, 4, seed=8, backend=gpu_backend, output="device")
    assert isinstance(dev, cp.ndarray)
    assert dev.dtype == np.int32 and dev.shape == host.shape
    np.testing.assert_array_equal(cp.asnumpy(dev), host)


def test_gpu_dlpack_hands_off_to_torch_without_copy(cp, gpu_backend):
    if cp.__name__ == "devicelike":
        pytest.skip("the DLPack hand-off needs a real device")
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("this PyTorch build has no CUDA")
    x, y = jittered_scan(500, seed=4)
    dev = sample_groups(x, y, 200, 7, 4, seed=1, backend=gpu_backend, output="device")
    t = torch.from_dlpack(dev)
    assert t.is_cuda and t.dtype == torch.int32 and tuple(t.shape) == dev.shape
    assert t.data_ptr() == dev.data.ptr  # same memory: zero copy
    np.testing.assert_array_equal(t.cpu().numpy(), cp.asnumpy(dev))


def _adapter_backend(cp, library):
    """The cuML adapter on the device, with a CuPy float32 brute force in cuML's place
    (cuML is not on every GPU machine; the adapter's own device code still runs)."""
    import functools

    from gpugroup.backends import Backend
    from gpugroup.backends.engines import NeighborsIndex

    on_device = type(f"Cupy{library.__name__}", (library,), {"xp": cp})
    return Backend(name="gpu-adapter", xp=cp, asnumpy=cp.asnumpy,
                   build_index=functools.partial(NeighborsIndex, xp=cp, nn_class=on_device,
                                                 algorithm="brute", batch_rows=512),
                   description=f"CuPy + NeighborsIndex({library.__name__} on CuPy)")


@pytest.mark.parametrize("xy, nsamples, K, C, seed, kw", PARITY_CASES)
def test_gpu_neighbors_adapter_equals_cpu(cp, xy, nsamples, K, C, seed, kw):
    x, y = xy()
    want = sample_groups(x, y, nsamples, K, C, seed=seed, backend="cpu", **kw)
    got = sample_groups(x, y, nsamples, K, C, seed=seed,
                        backend=_adapter_backend(cp, Expanded32Neighbors), **kw)
    np.testing.assert_array_equal(got, want)


def test_gpu_neighbors_adapter_repairs_invalid_rows(cp, caplog):
    import logging

    x, y = jittered_scan(3000, seed=11)
    want = sample_groups(x, y, 1000, 9, 4, seed=4, backend="cpu")
    with caplog.at_level(logging.WARNING, logger="gpugroup.backends.engines"):
        got = sample_groups(x, y, 1000, 9, 4, seed=4,
                            backend=_adapter_backend(cp, RepeatingNeighbors))
    assert "repeated indices" in caplog.text
    np.testing.assert_array_equal(got, want)


def test_gpu_keys_match_numpy(cp):
    from gpugroup import keys

    c = np.arange(0, 2**40, 2**40 // 4099, dtype=np.uint64)
    k = keys.stream(123, 1)
    np.testing.assert_array_equal(cp.asnumpy(keys.key(cp, k, cp.asarray(c))), keys.key(np, k, c))


def _d2(x, y, rows, cand):
    dx = x[cand] - x[rows][:, None]
    dy = y[cand] - y[rows][:, None]
    return dx * dx + dy * dy


def test_gpu_grid_engine_matches_its_numpy_run_and_contract(cp):
    """The grid engine is written once against xp: CuPy and NumPy give the same answers,
    and the floor is a true bound on the device."""
    from gpugroup.backends.engines import GridIndex

    x, y = jittered_scan(20_000, seed=5)
    x = np.concatenate([x, x[:500]])  # duplicates too
    y = np.concatenate([y, y[:500]])
    rows = np.arange(0, len(x), 37)
    for kq in (8, 24, 100):
        c_np, f_np = GridIndex(x, y, xp=np).query(rows, kq)
        c_cp, f_cp = GridIndex(cp.asarray(x), cp.asarray(y), xp=cp).query(cp.asarray(rows), kq)
        c_cp, f_cp = cp.asnumpy(c_cp), cp.asnumpy(f_cp)
        # The same kq nearest, up to which of equally distant points fill the last places
        # (rows ranked whole take them from argpartition, whose ties differ on CuPy).
        np.testing.assert_array_equal(np.sort(_d2(x, y, rows, c_cp), axis=1),
                                      np.sort(_d2(x, y, rows, c_np), axis=1))
        np.testing.assert_array_equal(f_cp, f_np)
        for r in range(0, len(rows), 25):
            dx = x - x[rows[r]]
            dy = y - y[rows[r]]
            d2 = dx * dx + dy * dy
            others = np.ones(len(x), dtype=bool)
            others[c_cp[r]] = False
            assert d2[others].min() >= f_cp[r]


def test_gpu_patches_of_a_large_object_equal_cpu(cp):
    """Y patches from an object whose window view spans over 2**31 elements (CuPy once
    indexed such views with 32-bit offsets, cupy#8130) are the CPU's, bit for bit."""
    from gpugroup.assembly import extract_patches

    rng = np.random.default_rng(7)
    shape = (2048, 2048)
    obj = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    assert (shape[0] + 2 * 65) * (shape[1] + 2 * 65) * 65**2 > 2**31  # the view, N = 64
    xc = np.concatenate([rng.uniform(-40.0, 2090.0, 300), [0.0, 2047.5, 2047.0, 1023.25]])
    yc = np.concatenate([rng.uniform(-40.0, 2090.0, 300), [2047.9, 0.0, 2047.0, 1500.75]])
    want = extract_patches(np, obj, xc, yc, 64)
    got = extract_patches(cp, cp.asarray(obj), cp.asarray(xc), cp.asarray(yc), 64)
    assert isinstance(got, cp.ndarray)
    np.testing.assert_array_equal(cp.asnumpy(got), want)


def test_gpu_refuses_more_positions_than_its_kernels_index(cp, monkeypatch):
    from gpugroup import grouping

    monkeypatch.setattr(grouping, "_DEVICE_MAX_N", 100)  # 2**31 positions would not fit here
    x, y = jittered_scan(100, seed=1)
    with pytest.raises(ValueError, match=r"n=100 positions is too many for backend='gpu'.*"
                                         r"n < 2\*\*31; pass backend='cpu'"):
        sample_groups(x, y, 10, 7, 4, seed=1, backend="gpu")
    np.testing.assert_array_equal(sample_groups(x[:99], y[:99], 10, 7, 4, seed=1, backend="gpu"),
                                  sample_groups(x[:99], y[:99], 10, 7, 4, seed=1, backend="cpu"))


def test_gpu_checks_coordinates_on_the_device_with_the_cpus_messages(cp):
    """The GPU path checks and scales the coordinates on the device (one min and one max
    per axis): the same errors as the CPU's, and tiny scans scaled to the same groups."""
    x, y = jittered_scan(300, seed=2)
    bad = [(np.r_[x[:-3], np.nan, np.inf, 1.0], y, r"xcoords has 2 non-finite value\(s\), "
            r"first xcoords\[297\]=nan"),
           (x, np.r_[y[:-1], -np.inf], r"ycoords has 1 non-finite value\(s\), first "
            r"ycoords\[299\]=-inf"),
           (np.r_[x[:-1], 1e200], y, r"xcoords spans 1e\+200, beyond 1e\+150")]
    for bx, by, message in bad:
        for backend in ("cpu", "gpu"):
            with pytest.raises(ValueError, match=message):
                sample_groups(bx, by, 10, 7, 4, seed=1, backend=backend)
    want = sample_groups(x, y, 100, 9, 4, seed=3, backend="cpu")
    # dtypes a device cannot hold are cast on the host first; the others on the device
    for dtype in (np.longdouble, "m8[ns]", np.float16, np.int16):
        cx, cy = (np.round(a * 50).astype(dtype) for a in (x, y))
        np.testing.assert_array_equal(
            sample_groups(cx, cy, 100, 9, 4, seed=3, backend="gpu"),
            sample_groups(cx, cy, 100, 9, 4, seed=3, backend="cpu"))
    for scale in (1e-200, 2.0**-600):  # scaled back by a power of two on either side
        sx, sy = x * scale, y * scale
        got = sample_groups(sx, sy, 100, 9, 4, seed=3, backend="gpu")
        np.testing.assert_array_equal(got, sample_groups(sx, sy, 100, 9, 4, seed=3,
                                                         backend="cpu"))
    np.testing.assert_array_equal(got, want)  # 2**-600: exactly the unscaled geometry


@pytest.mark.parametrize("device_frames", [False, True])
def test_gpu_rawdata_grouped_data_matches_cpu(cp, engine, monkeypatch, device_frames):
    from gpugroup.simulate import simulate_rawdata

    monkeypatch.setenv(gpu.ENGINE_ENV, engine)
    raw = simulate_rawdata(n=400, N=16, seed=2, backend="cpu")
    want = raw.generate_grouped_data(16, K=7, nsamples=150, seed=3, gridsize=2, backend="cpu")
    if device_frames:
        raw.diff3d = cp.asarray(raw.diff3d)
    got = raw.generate_grouped_data(16, K=7, nsamples=150, seed=3, gridsize=2, backend="gpu")
    assert_same_grouped(got, want)
    for key, value in want.items():
        if isinstance(value, np.ndarray):
            assert isinstance(got[key], np.ndarray), key
            assert got[key].shape == value.shape and got[key].dtype == value.dtype, key
    dev = raw.generate_grouped_data(16, K=7, nsamples=150, seed=3, gridsize=2, backend="gpu",
                                    output="device")
    assert isinstance(dev["X_full"], cp.ndarray)
    np.testing.assert_array_equal(cp.asnumpy(dev["nn_indices"]), want["nn_indices"])


# ----------------------------------------------------------------------------- fused kernels
def _frames(cp, dtype, n=50, N=12, seed=0):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        host = (rng.standard_normal((n, N, N)) * 1e3).astype(dtype)
    else:
        info = np.iinfo(dtype)
        host = rng.integers(max(info.min, -2**40), min(info.max, 2**40), (n, N, N),
                            dtype=dtype, endpoint=True)
    return host, cp.asarray(host)


def _gathered(xp, stack, nn, scale, kernels, keep_diffraction=True, chunk_bytes=1 << 12):
    from gpugroup import assembly

    B, C, N = int(nn.shape[0]), int(nn.shape[1]), int(stack.shape[1])
    out = assembly.empty_outputs(xp, B, N, C, stack.dtype, keep_diffraction, False)
    assembly.gather_channel_last(xp, stack, nn, scale=scale, out_diffraction=out["diffraction"],
                                 out_X=out["X_full"], chunk_bytes=chunk_bytes, kernels=kernels)
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64", "uint16", "int32", "int64", "uint8",
                                   "float16"])
@pytest.mark.parametrize("C", [1, 4, 9])
@pytest.mark.parametrize("keep_diffraction", [True, False])
def test_fused_gather_equals_numpy(cuda, dtype, C, keep_diffraction):
    """The fused gather writes what NumPy's gather, transpose and multiply write, bit for
    bit (X_full multiplied in NumPy's result type), for every frame dtype it takes; a dtype
    it does not take (float16) goes through the plain operations, with the same values."""
    kernels = gpu.make_backend("cupy").kernels
    host, dev = _frames(cuda, dtype)
    rng = np.random.default_rng(C)
    nn_host = rng.integers(0, host.shape[0], (37, C)).astype(np.int32 if C != 4 else np.int64)
    nn = cuda.asarray(nn_host)
    scale = 0.3712345678901
    want = _gathered(np, host, nn_host, scale, None, keep_diffraction)
    got = _gathered(cuda, dev, nn, scale, kernels, keep_diffraction)
    for key in ("diffraction", "X_full"):
        if want[key] is None:
            assert got[key] is None
            continue
        assert got[key].dtype == want[key].dtype
        np.testing.assert_array_equal(cuda.asnumpy(got[key]), want[key], err_msg=key)
    out = cuda.empty((37, 12, 12, C), cuda.float32)
    took = kernels.gather_channel_last(dev, nn, np.float32(scale), None, out)
    assert took == (dtype != "float16")


@pytest.mark.gpu
@pytest.mark.parametrize("pixels", [1, 3, 4, 8])
def test_fused_gather_falls_back_or_splits_where_it_must(cuda, monkeypatch, pixels):
    """Non-contiguous frames fall back to plain operations; misaligned outputs take the
    element-wise stores; many launches (a small launch size) and any pixels per thread
    (tiles that overrun a frame included) give the same arrays."""
    kernels = gpu.make_backend("cupy").kernels
    monkeypatch.setattr(kernels, "pixels_per_thread", pixels)
    host, dev = _frames(cuda, "float32", n=40, N=16)
    nn_host = np.random.default_rng(1).integers(0, 40, (25, 4))
    nn = cuda.asarray(nn_host)
    want = _gathered(np, host, nn_host, 2.5, None)
    wide = cuda.zeros((40, 16, 32), cuda.float32)
    wide[:, :, :16] = dev
    strided = wide[:, :, :16]  # the same values, not contiguous
    assert kernels.gather_channel_last(strided, nn, np.float32(1), None,
                                       cuda.empty((25, 16, 16, 4), cuda.float32)) is False
    np.testing.assert_array_equal(cuda.asnumpy(_gathered(cuda, strided, nn, 2.5, kernels)["X_full"]),
                                  want["X_full"])
    flat = cuda.empty(25 * 16 * 16 * 4 + 1, cuda.float32)[1:].reshape(25, 16, 16, 4)
    assert flat.data.ptr % 16 != 0
    assert kernels.gather_channel_last(dev, nn, np.float32(2.5), None, flat) is True
    np.testing.assert_array_equal(cuda.asnumpy(flat), want["X_full"])
    monkeypatch.setattr(gpu, "_GATHER_LAUNCH", 3 * pixels * 256)  # 3 groups per launch
    got = _gathered(cuda, dev, nn, 2.5, kernels, chunk_bytes=1 << 30)
    for key in ("diffraction", "X_full"):
        np.testing.assert_array_equal(cuda.asnumpy(got[key]), want[key], err_msg=key)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64", "uint16", "int32"])
def test_fused_frame_energies_equal_numpy(cuda, dtype):
    """Energies summed by the kernel equal NumPy's float64 sums (to summation order), and
    a frame with NaN is named in the error as on the plain path."""
    from gpugroup import assembly

    kernels = gpu.make_backend("cupy").kernels
    host, dev = _frames(cuda, dtype, n=30, N=40)
    idx_host = np.array([3, 0, 29, 3, 17])
    want = assembly.frame_energies(np, host, idx_host)
    got = assembly.frame_energies(cuda, dev, cuda.asarray(idx_host), kernels=kernels)
    assert kernels.frame_energies(dev, cuda.asarray(idx_host)) is not None
    np.testing.assert_allclose(cuda.asnumpy(got), want, rtol=1e-13)
    if np.dtype(dtype).kind == "f":
        dev[17, 5, 7] = np.nan
        with pytest.raises(ValueError, match=r"diff3d\[17\] holds NaN or inf"):
            assembly.frame_energies(cuda, dev, cuda.asarray(idx_host), kernels=kernels)


# ----------------------------------------------------------------------------- dispatch (any machine)
def test_devicelike_enforces_cupy_rules():
    """The stand-in refuses what CuPy refuses, so the devicelike runs above can fail."""
    import devicelike as dl

    a = dl.asarray([3.0, 1.0, 2.0])
    host = np.ones(3)
    refused = {
        "implicit conversion": lambda: np.asarray(a),
        "host operand": lambda: a + host,
        "host operand, left": lambda: host * a,
        "host array in a function": lambda: dl.concatenate([a, host]),
        "host arrays only": lambda: dl.maximum(host, host),
        "device size": lambda: dl.zeros(a.size * a[0]),
        "no __index__": lambda: range(a.argmax()),
        "sort kind": lambda: dl.argsort(a, kind="quicksort"),
        "host value": lambda: a.__setitem__(slice(None), host),
        "in-place sort of a view": lambda: dl.zeros((3, 4))[:, :2].sort(),
        "string array": lambda: dl.asarray(["a", "b"]),
        "NumPy kth": lambda: dl.partition(a, np.int64(1)),
        "partition kind": lambda: dl.argpartition(a, 1, kind="introselect"),
        "searchsorted across dtypes": lambda: dl.searchsorted(a, dl.asarray([1], np.int64)),
        "searchsorted of a NumPy scalar": lambda: dl.searchsorted(a, np.int64(1)),
        "lexsort of a list": lambda: dl.lexsort([a, a]),
        "view of a strided array": lambda: dl.zeros((3, 4))[:, ::2].view(np.float32),
        "conflicting scatter": lambda: a.__setitem__(dl.asarray([0, 0]), dl.asarray([1.0, 2.0])),
    }
    for what, call in refused.items():
        with pytest.raises((TypeError, ValueError, NotImplementedError)):
            call()
            pytest.fail(f"devicelike allowed {what}")
    a[dl.asarray([1, 1])] = 5.0  # repeated indices writing one value are fine
    np.testing.assert_array_equal(dl.argpartition(dl.asarray([2, 1, 1, 0]), 1).get(),
                                  [3, 1, 2, 0])  # a stable argsort, as CuPy's
    assert isinstance(a.max(), dl.ndarray) and a.max().shape == ()  # 0-d, as in CuPy
    assert isinstance(np.sort(a), dl.ndarray)  # NumPy functions dispatch to the namespace
    np.testing.assert_array_equal(a[np.array([1, 2])].get(), [5.0, 2.0])  # host indices ok
    np.testing.assert_array_equal(dl.asnumpy(dl.sort(a, kind="stable")), [2.0, 3.0, 5.0])


def test_gpu_backend_without_cupy_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` raises ImportError
    assert gpu.unavailable_reason().startswith("CuPy is not importable")
    with pytest.raises(RuntimeError, match=r"gpugroup\[cu12\]"):
        get_backend("gpu")
    with pytest.raises(RuntimeError, match=r"gpugroup\[cu12\]"):
        gpu.make_backend(engine="cupy")
    x, y = square_grid(5)
    with pytest.raises(RuntimeError, match=r"gpugroup\[cu12\].*gpugroup\[cu13\]"):
        sample_groups(x, y, 5, 4, 2, seed=1, backend="gpu")
    assert get_backend("auto").name == "cpu"


def _fake_cuml(monkeypatch):
    """A ``cuml`` package whose NearestNeighbors is :class:`conftest.CumlLikeNeighbors`
    (scikit-learn with cuML's rbc limits enforced); like cuML it takes and returns device
    arrays, and it requires ``output_type="cupy"``."""
    pytest.importorskip("sklearn.neighbors", reason="scikit-learn not installed")
    import cupy  # the namespace the test installed

    class NearestNeighbors(CumlLikeNeighbors):
        xp = cupy
        required_output_type = "cupy"

        def fit(self, X):
            assert isinstance(X, cupy.ndarray)
            return super().fit(X)

    cuml = types.ModuleType("cuml")
    cuml.neighbors = types.ModuleType("cuml.neighbors")
    cuml.neighbors.NearestNeighbors = NearestNeighbors
    monkeypatch.setitem(sys.modules, "cuml", cuml)
    monkeypatch.setitem(sys.modules, "cuml.neighbors", cuml.neighbors)
    return NearestNeighbors


def test_auto_engine_without_cuml_is_the_grid_engine(cp, monkeypatch, caplog):
    monkeypatch.delenv(gpu.ENGINE_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "cuml", None)  # `import cuml` raises ImportError
    monkeypatch.setitem(sys.modules, "cuml.neighbors", None)
    with caplog.at_level("INFO", logger="gpugroup.backends.gpu"):
        be = gpu.make_backend()
    assert be.name == "gpu" and be.description == "CuPy + CuPy-native grid kNN"
    assert "CuPy-native" in caplog.text
    with pytest.raises(RuntimeError, match=r"needs cuML.*gpugroup\[cu12\]"):
        gpu.make_backend(engine="cuml")
    x, y = jittered_scan(400, seed=1)
    np.testing.assert_array_equal(sample_groups(x, y, 200, 9, 4, seed=6, backend=be),
                                  sample_groups(x, y, 200, 9, 4, seed=6, backend="cpu"))


def test_auto_engine_is_the_grid_engine_until_cuml_is_verified(cp, monkeypatch, caplog):
    """cuML imports, but ``auto`` keeps the grid engine (the one verified on a device) and
    says how to ask for cuML; ``engine="cuml"`` gets it (rbc while kq <= sqrt(n))."""
    monkeypatch.delenv(gpu.ENGINE_ENV, raising=False)
    _fake_cuml(monkeypatch)
    assert gpu.CUML_VERIFIED is False
    with caplog.at_level("INFO", logger="gpugroup.backends.gpu"):
        be = gpu.make_backend()
    assert be.description == "CuPy + CuPy-native grid kNN"
    assert "engine='cuml'" in caplog.text and gpu.ENGINE_ENV in caplog.text
    assert get_backend("gpu").description == "CuPy + CuPy-native grid kNN"
    CumlLikeNeighbors.log = []
    be = gpu.make_backend(engine="cuml")
    assert be.description == "CuPy + cuML NearestNeighbors"
    x, y = square_grid(30)  # n = 900: rbc while kq <= 30, brute beyond
    np.testing.assert_array_equal(sample_groups(x, y, 300, 9, 4, seed=6, backend=be),
                                  sample_groups(x, y, 300, 9, 4, seed=6, backend="cpu"))
    assert any(alg == "rbc" for alg, _ in CumlLikeNeighbors.log)
    # once a device run records cuML identical and faster, auto takes it
    monkeypatch.setattr(gpu, "CUML_VERIFIED", True)
    assert gpu.make_backend().description == "CuPy + cuML NearestNeighbors"


def test_auto_engine_takes_the_fused_pool_once_verified(cp, monkeypatch, caplog):
    """``auto`` leaves the fused pool kernel out until a device run records it (and says
    how to ask for it); once verified it takes it, unless cuML is verified and imports."""
    monkeypatch.delenv(gpu.ENGINE_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "cuml", None)
    monkeypatch.setitem(sys.modules, "cuml.neighbors", None)
    if cp.__name__ == "devicelike":
        monkeypatch.setattr(gpu, "_fused_pool", host_fused_pool)
    assert gpu.FUSED_VERIFIED is False
    with caplog.at_level("INFO", logger="gpugroup.backends.gpu"):
        assert gpu.make_backend().description == "CuPy + CuPy-native grid kNN"
    assert "'fused'" in caplog.text
    monkeypatch.setattr(gpu, "FUSED_VERIFIED", True)
    be = gpu.make_backend()
    assert be.description == FUSED
    x, y = jittered_scan(3000, seed=4)
    np.testing.assert_array_equal(sample_groups(x, y, 1000, 16, 4, seed=6, backend=be),
                                  sample_groups(x, y, 1000, 16, 4, seed=6, backend="cpu"))
    monkeypatch.setattr(gpu, "CUML_VERIFIED", True)
    _fake_cuml(monkeypatch)
    assert gpu.make_backend().description == "CuPy + cuML NearestNeighbors"


def test_cuml_engine_keeps_rbc_within_its_limits(cp, monkeypatch, caplog):
    """The stand-in returns INT64_MAX rows for rbc past its k limit (as cuVS does past
    1024); with the limit lowered to 8 in both, every widened query goes to brute, and no
    row needs the grid engine's rescue. With the adapter's limit left above the library's,
    the rescue is what saves the groups (and it says so)."""
    from gpugroup.backends import engines

    monkeypatch.delenv(gpu.ENGINE_ENV, raising=False)
    nn_class = _fake_cuml(monkeypatch)
    monkeypatch.setattr(nn_class, "rbc_max_k", 8)
    x, y = jittered_scan(900, seed=2)  # rbc would be allowed to kq = 30 by sqrt(n)
    want = sample_groups(x, y, 300, 16, 4, seed=5, backend="cpu")
    be = gpu.make_backend(engine="cuml")
    monkeypatch.setattr(engines, "RBC_MAX_K", 8)
    CumlLikeNeighbors.log = []
    with caplog.at_level("WARNING", logger="gpugroup.backends.engines"):
        np.testing.assert_array_equal(sample_groups(x, y, 300, 16, 4, seed=5, backend=be), want)
    assert "out-of-range" not in caplog.text
    assert all(k <= 8 for alg, k in CumlLikeNeighbors.log if alg == "rbc")
    assert any(alg == "brute" for alg, k in CumlLikeNeighbors.log)
    monkeypatch.setattr(engines, "RBC_MAX_K", 1024)  # the library's limit is lower
    caplog.clear()
    with caplog.at_level("WARNING", logger="gpugroup.backends.engines"):
        np.testing.assert_array_equal(sample_groups(x, y, 300, 16, 4, seed=5, backend=be), want)
    assert "out-of-range" in caplog.text


def test_cuml_stand_in_rejects_sqeuclidean_with_rbc_and_so_does_the_adapter(cp, monkeypatch):
    from gpugroup.backends.engines import NeighborsIndex, cuml_algorithm

    nn_class = _fake_cuml(monkeypatch)
    x, y = square_grid(10)
    with pytest.raises(ValueError, match="not supported by rbc"):
        nn_class(algorithm="rbc", metric="sqeuclidean", output_type="cupy").fit(
            cp.asarray(np.stack([x, y], 1).astype(np.float32)))
    for algorithm in ("rbc", cuml_algorithm):
        with pytest.raises(ValueError, match="sqeuclidean.*rbc"):
            NeighborsIndex(cp.asarray(x), cp.asarray(y), xp=cp, nn_class=nn_class,
                           algorithm=algorithm, metric="sqeuclidean")


def test_nvrtc_missing_makes_the_gpu_unavailable(cp, monkeypatch):
    """CuPy 14 loads NVRTC only at the first compile: the probe finds it missing up front,
    so ``auto`` takes the CPU and ``gpu`` says what to install."""
    if cp.__name__ != "devicelike":
        pytest.skip("simulates a missing NVRTC on the stand-in only")

    def missing():
        raise RuntimeError("CuPy failed to load libnvrtc.so.12")

    monkeypatch.setattr(cp.cuda, "nvrtc", types.SimpleNamespace(getVersion=missing))
    reason = gpu.unavailable_reason()
    assert reason.startswith("CuPy cannot load NVRTC") and "libnvrtc" in reason
    assert "cupy-cuda12x[ctk]" in reason and "cuda-nvrtc" in reason
    assert get_backend("auto").name == "cpu"
    with pytest.raises(RuntimeError, match=r"NVRTC.*cupy-cuda12x\[ctk\]"):
        get_backend("gpu")


def test_engine_is_chosen_by_argument_or_environment(cp, monkeypatch):
    _fake_cuml(monkeypatch)
    if cp.__name__ == "devicelike":
        monkeypatch.setattr(gpu, "_fused_pool", host_fused_pool)
    assert gpu.make_backend(engine="cupy").description == "CuPy + CuPy-native grid kNN"
    monkeypatch.setenv(gpu.ENGINE_ENV, "cupy")
    assert get_backend("gpu").description == "CuPy + CuPy-native grid kNN"
    monkeypatch.setenv(gpu.ENGINE_ENV, "CUML")
    assert get_backend("gpu").description == "CuPy + cuML NearestNeighbors"
    monkeypatch.setenv(gpu.ENGINE_ENV, "fused")
    assert get_backend("gpu").description == FUSED
    monkeypatch.setenv(gpu.ENGINE_ENV, "faiss")
    with pytest.raises(ValueError, match="GPUGROUP_GPU_ENGINE"):
        get_backend("gpu")


@pytest.mark.parametrize("mode", ["cpu-only", "devicelike"])
def test_gpu_benchmark_script_smoke(tmp_path, monkeypatch, mode):
    """benchmarks/gpu_benchmark.py runs end to end and writes its JSON: with --cpu-only
    (the grid engine on NumPy), and on its GPU path with the devicelike stand-in as CuPy."""
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_benchmark.py"
    if not script.is_file():
        pytest.skip("benchmarks/ is not beside the tests")
    spec = importlib.util.spec_from_file_location("gpu_benchmark_smoke", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--sizes", "2e3", "--nested", "3e3", "--K", "7", "--repeats", "1",
            "--assembly-n", "400", "--assembly-nsamples", "100,60", "--chunk-bytes", "1Mi",
            "--out", str(tmp_path)]
    if mode == "devicelike":
        import devicelike

        devicelike.install(monkeypatch)
        monkeypatch.delenv(gpu.ENGINE_ENV, raising=False)
        monkeypatch.setattr(gpu, "_fused_pool", host_fused_pool)  # its kernel as host C++
        rc = bench.main(args)
        (result,) = tmp_path.glob("gpu-devicelike-numpy-*.json")
        steps = [("assemble_groups", "gpu")] + [  # no fused kernels on the stand-in
            ("generate_grouped_data (grouping included)", "gpu"),
            ("bare copy of the frames (reference)", None),
            ("generate_grouped_data (grouping included)", "cpu"),
            ("assemble_groups", "gpu")]  # the second group count: the step alone
        engines = ["cupy", "fused"]  # cuML does not load on the stand-in: noted
    else:
        rc = bench.main(["--cpu-only"] + args)
        (result,) = tmp_path.glob("cpu-smoke-*.json")
        steps = [("assemble_groups", "grid-numpy"),
                 ("generate_grouped_data (grouping included)", "grid-numpy"),
                 ("bare copy of the frames (reference)", None),
                 ("assemble_groups", "grid-numpy")]
        engines = ["grid-numpy"]
    data = json.loads(result.read_text())
    assert rc == 0 and data["errors"] == [] and data["finished"]
    assert data["parity_summary"] == {"checked": 2, "identical": 2, "all_identical": True}
    assert [r["layout"].split(" ")[0] for r in data["grouping"]] == ["fermat", "nested"]
    assert [(r["step"], r.get("backend")) for r in data["assembly"]] == steps
    assert [r["nsamples"] for r in data["assembly"] if r["step"] == "assemble_groups"] == [100, 60]
    for r in data["assembly"]:
        assert r.get("nn_indices_equal_gpu", True) and r.get("outputs_equal_first_variant", True)
        if r["step"] == "assemble_groups":  # the normalization's reads, counted apart
            assert 0 < r["energy_bytes_read"] <= r["bytes_read"]
            assert r["effective_gbs_with_energies"] > r["effective_gbs"]
        assert r.get("nn_indices_equal_assembly_input", True)
    # the parity matrix: every case of tests/parity_cases.py (and a scan_index case)
    matrix = data["parity_matrix_summary"]
    assert matrix["all_identical"] and matrix["engines"] == engines
    assert matrix["checked"] == len(engines) * (len(PARITY_CASES) + 1)
    assert matrix["mismatched"] == []
    assert {r["case"] for r in data["parity_matrix"]} >= {"dup12", "outlier", "scan-index-3"}
    # each GPU engine at the largest (n, K), with parity: what auto's choice rests on
    assert [(r["engine"], r["parity"], r["n"]) for r in data["engine_comparison"]] == [
        (e, True, 2000) for e in engines]
    if mode == "devicelike":
        assert any("engine cuml not measured" in note for note in data["notes"])
    assert data["targets"]["parity_all_identical"] is True
    assert data["targets"]["cuml_identical_and_faster"] is None  # cuML not measured
    assert data["cpu_threads"] >= 1 and data["targets"]["cpu_threads"] == data["cpu_threads"]
    if mode == "devicelike":  # the step breakdown and cProfile of one device grouping
        assert set(data["profile"]["steps_s"]) >= {"3.1 sample_seeds", "3.2 neighbour_pool"}
        assert list(data["profile"]["steps_s_by_engine"]) == [
            "CuPy + CuPy-native grid kNN", FUSED]
        assert "function calls" in (tmp_path / "profile.txt").read_text()
        assert isinstance(data["targets"]["fused_identical_and_faster"], bool)
    else:
        assert "profile" not in data
    assert data["targets"]["grouping_n1e7_K16_s"] is None  # not measured at these sizes
    assert data["targets"]["assembly_25000_fraction_of_peak"] is None
    made_up = {"grouping": [{"n": 10**7, "K": 16, "layout": "fermat spiral",
                             "gpu_best_s": 0.05, "cpu_s": 1.9},
                            {"n": 10**7, "K": 7, "layout": "fermat spiral",
                             "gpu_best_s": 0.5, "cpu_s": 1.0}],
               "assembly": [{"step": "assemble_groups", "nsamples": 25_000,
                             "fraction_of_peak": 0.3},
                            {"step": "assemble_groups", "nsamples": 25_000,
                             "fraction_of_peak": 0.76},
                            {"step": "assemble_groups", "nsamples": 100_000,
                             "fraction_of_peak": 0.79},
                            {"step": "bare copy of the frames (reference)",
                             "nsamples": 100_000, "fraction_of_peak": 0.9}],
               "parity_summary": {"all_identical": True},
               "parity_matrix_summary": {"all_identical": False},
               "cpu_threads": 16,
               "engine_comparison": [
                   {"engine": "cupy", "gpu_best_s": 0.07, "parity": True, "n": 10**7, "K": 16},
                   {"engine": "fused", "gpu_best_s": 0.04, "parity": True, "n": 10**7, "K": 16},
                   {"engine": "cuml", "gpu_best_s": 0.03, "parity": False, "n": 10**7,
                    "K": 16}]}
    assert bench.targets(made_up) == {
        "parity_all_identical": False,
        "grouping_n1e7_K16_s": 0.05, "grouping_n1e7_K16_s_goal": 0.06,
        "grouping_n1e7_K16_s_met": True,
        "assembly_25000_fraction_of_peak": 0.76,
        "assembly_25000_fraction_of_peak_goal": 0.75,
        "assembly_25000_fraction_of_peak_met": True,
        "assembly_100000_fraction_of_peak": 0.79,
        "assembly_100000_fraction_of_peak_goal": 0.8,
        "assembly_100000_fraction_of_peak_met": False,
        "cpu_grouping_n1e7_K16_s": 1.9, "cpu_grouping_n1e7_K16_s_goal": 1.5,
        "cpu_grouping_n1e7_K16_s_met": False,
        "cpu_threads": 16, "cuml_identical_and_faster": False,
        "fused_identical_and_faster": True, "grouping_n1e7_K16_best_engine": "fused",
        "grouping_n1e7_K16_best_engine_s": 0.04, "grouping_n1e7_K16_best_engine_met": True}
