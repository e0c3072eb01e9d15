"""Shared helpers for the gpugroup test suite: scan factories, the KAT file, test engines."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from gpugroup.simulate import jittered_scan  # noqa: F401  (shared scan helper)

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

# ``reference.py`` sits beside the tests; make it importable under any pytest import mode.
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))


# ----------------------------------------------------------------------------- optional packages
def needs(*modules: str):
    """A skip mark for a test that needs optional packages, naming the missing ones (the
    core install - numpy, scipy, pytest, hypothesis - runs the rest of the suite)."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} "
                              "(pip install \".[test]\")")


#: The optional package each file suffix needs to be read or written.
SUFFIX_NEEDS = {".h5": "h5py", ".hdf5": "h5py", ".cxi": "h5py", ".zarr": "zarr"}


def suffix_param(suffix: str):
    """``suffix`` as a parameter that skips when its format's package is missing."""
    module = SUFFIX_NEEDS.get(suffix)
    return pytest.param(suffix, marks=needs(module) if module else ())


# ----------------------------------------------------------------------------- parity
#: DESIGN.md section 3: float outputs of two paths agree to this relative tolerance.
FLOAT_RTOL = 1e-6
#: Entries compared exactly whatever the path: the groups and what names them.
EXACT_KEYS = ("nn_indices", "order", "seed")


def _host(a):
    a = a.get() if hasattr(a, "get") and not isinstance(a, dict) else a
    return np.asarray(a[...] if hasattr(a, "shape") and not isinstance(a, np.ndarray) else a)


def assert_same_grouped(got, want, *, rows=slice(None), order=None, exact=False):
    """The comparison rule of DESIGN.md section 3, stated once for every pair of paths
    (CPU/GPU, eager/streamed/Dask/dataset): ``nn_indices``, ``order`` and ``seed``
    exactly; float entries to rtol 1e-6 (and an absolute 1e-12 of the entry's largest
    magnitude, for values that cancel to near zero, such as relative coordinates), or bit
    for bit with ``exact`` (same arithmetic); an entry None in ``want`` is None in ``got``.

    ``got`` may hold device arrays or on-disk stores; ``rows`` selects the rows of
    ``want`` that ``got`` holds; ``order`` is the locality permutation of ``got``'s rows
    (row j is group ``order[j]``). Entries of ``want`` missing from ``got`` fail.
    """
    back = slice(None) if order is None else np.argsort(order)
    for key, value in want.items():
        assert key in got, f"{key} missing"
        g = got[key]
        if value is None or g is None:
            assert g is None and value is None, f"{key}: {type(g).__name__} vs {value!r}"
        elif key in ("seed", "norm_scale") or np.ndim(value) == 0:
            if exact or key == "seed":
                assert g == value, key
            else:
                assert float(g) == pytest.approx(float(value), rel=FLOAT_RTOL), key
        elif key == "objectGuess":
            np.testing.assert_array_equal(_host(g), value)
        else:
            g = _host(g)[back]
            w = np.asarray(value)[rows]
            if exact or key in EXACT_KEYS or not np.issubdtype(w.dtype, np.inexact):
                np.testing.assert_array_equal(g, w, err_msg=key)
            else:
                atol = 1e-12 * float(np.abs(w).max()) if w.size else 0.0
                np.testing.assert_allclose(g, w, rtol=FLOAT_RTOL, atol=atol, err_msg=key)


# ----------------------------------------------------------------------------- scans
def square_grid(nx: int, ny: int | None = None, spacing: float = 1.0, offset=(0.0, 0.0)):
    """A grid with position i = nx * row + col at x = col, y = row (the KAT layout)."""
    ny = nx if ny is None else ny
    row, col = np.divmod(np.arange(nx * ny), nx)
    x = col.astype(np.float64) * spacing + offset[0]
    y = row.astype(np.float64) * spacing + offset[1]
    return x, y


# ----------------------------------------------------------------------------- host kernels
_HOST_KERNEL_DIR: list[str] = []


def host_module(source: str):
    """``source`` as a :class:`hostcuda.HostModule` (its kernels run as host C++), compiled
    into one directory per session; skips without a host compiler."""
    from hostcuda import HostModule, host_compiler

    if host_compiler() is None:
        pytest.skip("no host C++ compiler (g++ or clang++) to run the CUDA kernel on the host")
    if not _HOST_KERNEL_DIR:
        _HOST_KERNEL_DIR.append(tempfile.mkdtemp(prefix="gpugroup-hostcuda-"))
        atexit.register(shutil.rmtree, _HOST_KERNEL_DIR[0], True)
    return HostModule(source, _HOST_KERNEL_DIR[0])


def host_fused_pool(xp, **kw):
    """A :class:`~gpugroup.backends.fused_pool.FusedPool` on ``xp`` whose kernel runs as host
    C++ (tests/hostcuda.py)."""
    from gpugroup.backends.fused_pool import SOURCE, FusedPool

    return FusedPool(xp, host_module(SOURCE).get_function, **kw)


# ----------------------------------------------------------------------------- devices
@pytest.fixture(params=[pytest.param("cupy", marks=pytest.mark.gpu), "devicelike"])
def cp(request, monkeypatch):
    """The device namespace, twice: real CuPy on a CUDA device (marked ``gpu``; skips
    saying what is missing), and ``devicelike``, the strict NumPy stand-in that enforces
    CuPy's host/device rules on any machine (installed as ``cupy``, without cuML)."""
    if request.param == "devicelike":
        import devicelike

        devicelike.install(monkeypatch)
        return devicelike
    return real_cupy()


@pytest.fixture
def cuda():
    """Real CuPy on a CUDA device, for tests of what the stand-in cannot run (compiled
    kernels); mark such tests ``gpu``. Skips saying what is missing."""
    return real_cupy()


def real_cupy():
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    from gpugroup.backends import gpu

    reason = gpu.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    return cupy


# ----------------------------------------------------------------------------- KAT file
#: The known-answer vectors of DESIGN.md section 3, copied from the shared contract
#: (../shared/kat/design3.json) so that every clone and CI run checks them.
KAT_FILE = REPO_ROOT / "tests" / "data" / "design3.json"


@pytest.fixture(scope="session")
def kat():
    """The known-answer vectors ($GPUGROUP_KAT overrides the copy in tests/data)."""
    path = Path(os.environ.get("GPUGROUP_KAT") or KAT_FILE)
    with path.open() as fh:
        return json.load(fh)


@pytest.fixture
def grid10():
    """The 10x10 unit grid of the KAT vectors."""
    return square_grid(10)


# ----------------------------------------------------------------------------- engines
class CountingIndex:
    """Wraps a candidate index and records every (rows, kq) query."""

    def __init__(self, inner):
        self.inner = inner
        self.n = inner.n
        self.calls: list[tuple[int, int]] = []

    def query(self, rows, kq):
        self.calls.append((int(len(rows)), int(kq)))
        return self.inner.query(rows, kq)

    def __getattr__(self, name):  # the engine's optional hints (e.g. ``stacked``)
        return getattr(self.inner, name)


class BruteForceIndex:
    """An exact brute-force engine that is adversarial about everything it may choose.

    It returns a correct candidate set (kq points with the smallest exact float64 d2)
    and a correct ``floor`` (the kq-th smallest d2), but breaks ties at the boundary
    ``tie`` = "random" (random choice), "high" (largest point numbers first) or "low",
    and shuffles the column order of every row.
    """

    def __init__(self, x, y, rng_seed: int = 0, tie: str = "random", floor_shrink: float = 0.0):
        self.x = np.asarray(x, dtype=np.float64)
        self.y = np.asarray(y, dtype=np.float64)
        self.n = int(self.x.shape[0])
        self.rng = np.random.default_rng(rng_seed)
        self.tie = tie
        self.floor_shrink = floor_shrink
        self.calls: list[tuple[int, int]] = []

    def query(self, rows, kq):
        rows = np.asarray(rows, dtype=np.int64)
        self.calls.append((int(rows.shape[0]), int(kq)))
        dx = self.x[None, :] - self.x[rows][:, None]
        dy = self.y[None, :] - self.y[rows][:, None]
        d2 = dx * dx
        d2 = d2 + dy * dy
        idx = np.broadcast_to(np.arange(self.n), d2.shape)
        if self.tie == "random":
            tiebreak = self.rng.random(d2.shape)
        elif self.tie == "high":
            tiebreak = -idx
        else:
            tiebreak = idx
        order = np.lexsort((tiebreak, d2), axis=-1)
        cand = order[:, :kq]
        floor = np.take_along_axis(d2, cand[:, -1:], axis=1)[:, 0] * (1.0 - self.floor_shrink)
        cand = self.rng.permuted(cand, axis=1)
        return cand.astype(np.int64), floor


class StingyIndex(BruteForceIndex):
    """Correct candidates, but a useless floor (-inf) until kq reaches ``min_kq``.

    A lower floor is still a true bound, so the contract holds; the completeness guard
    must keep widening kq until the floor becomes informative.
    """

    def __init__(self, x, y, min_kq: int, **kw):
        super().__init__(x, y, **kw)
        self.min_kq = min_kq

    def query(self, rows, kq):
        cand, floor = super().query(rows, kq)
        if kq < min(self.min_kq, self.n):
            floor = np.full_like(floor, -np.inf)
        return cand, floor


class Expanded32Neighbors:
    """A ``NearestNeighbors`` stand-in ranked by cuML's float32 expanded distance
    ``|q|^2 + |p|^2 - 2 q.p`` (brute force, float32 arithmetic).

    It makes the rounding errors cuML's brute force makes (and misranks neighbours whenever
    float32 cannot resolve them), to exercise the adapter's error bound with a library
    that is really inexact. Written against ``xp`` (NumPy; ``test_gpu`` subclasses it
    with CuPy to run the adapter on the device, where cuML is missing).
    """

    xp = np

    def __init__(self, *, algorithm, metric):
        self.metric = metric

    def fit(self, X):
        xp = self.xp
        self.X = xp.asarray(X, dtype=xp.float32)
        self.norms = (self.X * self.X).sum(axis=1, dtype=xp.float32)
        return self

    def kneighbors(self, Q, n_neighbors, return_distance=True):
        xp = self.xp
        Q = xp.asarray(Q, dtype=xp.float32)
        q2 = (Q * Q).sum(axis=1, dtype=xp.float32)
        s = (q2[:, None] + self.norms[None, :]) - xp.float32(2) * (Q @ self.X.T)
        s = xp.maximum(s, xp.float32(0))
        ind = xp.argsort(s, axis=1)[:, :n_neighbors]
        if not return_distance:
            return ind
        d = xp.take_along_axis(s, ind, axis=1)
        return (xp.sqrt(d) if self.metric == "euclidean" else d), ind


class RepeatingNeighbors(Expanded32Neighbors):
    """A faulty library: repeats an index in every third row, -1 in every fifth."""

    def kneighbors(self, Q, n_neighbors, return_distance=True):
        ind = super().kneighbors(Q, n_neighbors, return_distance=False).copy()
        if n_neighbors > 1:
            ind[::3, -1] = ind[::3, 0]
            ind[::5, 0] = -1
        return ind if not return_distance else (None, ind)


#: What cuVS's random ball cover leaves in every index slot when it selects nothing.
INT64_MAX = np.iinfo(np.int64).max


class CumlLikeNeighbors:
    """A stand-in for ``cuml.neighbors.NearestNeighbors`` (scikit-learn underneath: rbc ->
    kd_tree) that enforces the limits of cuML 25.10 / cuVS the scikit-learn class lacks:

    * ``fit`` with ``algorithm="rbc"`` and a metric other than euclidean or haversine
      raises ``ValueError``, as cuML's does;
    * ``kneighbors`` with ``rbc`` and ``n_neighbors > rbc_max_k`` (1024) returns rows of
      INT64_MAX, as cuVS's random ball cover does (its query passes stop at k = 1024);
    * ``rbc`` with ``n_neighbors**2 > n`` runs brute force instead, as cuML does.

    ``xp`` is the array namespace it takes and returns; ``required_output_type``, when set,
    must be the ``output_type`` the caller passes. ``log`` records (algorithm, k) per call.
    """

    xp = np
    rbc_max_k = 1024
    required_output_type = None
    log: list = []

    def __init__(self, *, algorithm="auto", metric="euclidean", output_type=None):
        from sklearn.neighbors import NearestNeighbors

        if self.required_output_type is not None:
            assert output_type == self.required_output_type, (
                f"output_type={output_type!r}, want {self.required_output_type!r}")
        self.algorithm, self.metric = algorithm, metric
        self.inner = NearestNeighbors(algorithm="kd_tree" if algorithm == "rbc" else algorithm,
                                      metric=metric)

    def _host(self, a):
        return getattr(self.xp, "asnumpy", np.asarray)(a)

    def fit(self, X):
        if self.algorithm == "rbc" and self.metric not in ("euclidean", "haversine"):
            raise ValueError(f"Metric {self.metric} is not supported by rbc")
        assert X.dtype == np.float32
        self.n = int(X.shape[0])
        self._X = self._host(X)
        self.inner.fit(self._X)
        return self

    def kneighbors(self, X, n_neighbors, return_distance=True):
        k = int(n_neighbors)
        CumlLikeNeighbors.log.append((self.algorithm, k))
        Q = self._host(X)
        if self.algorithm == "rbc" and k > self.rbc_max_k:
            ind = np.full((Q.shape[0], k), INT64_MAX, dtype=np.int64)
            dist = np.full((Q.shape[0], k), np.finfo(np.float32).max, dtype=np.float32)
        else:
            model = self.inner
            if self.algorithm == "rbc" and k * k > self.n:  # cuML: brute, with a warning
                from sklearn.neighbors import NearestNeighbors

                model = NearestNeighbors(algorithm="brute", metric=self.metric)
                model.fit(self._X)
            dist, ind = model.kneighbors(Q, n_neighbors=k, return_distance=True)
        ind = self.xp.asarray(ind.astype(np.int64))
        return (self.xp.asarray(dist.astype(np.float32)), ind) if return_distance else ind


def make_backend(factory, name: str):
    """A custom NumPy ``Backend`` whose ``build_index`` is ``factory(x, y)``; records indexes."""
    from gpugroup.backends import Backend

    built = []

    def build_index(x, y):
        index = factory(x, y)
        built.append(index)
        return index

    backend = Backend(name=name, xp=np, build_index=build_index, asnumpy=np.asarray,
                      description=f"test engine {name}")
    return backend, built
