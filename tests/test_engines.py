"""The GPU candidate engines run with ``xp = numpy``: contract, guard, and CPU parity.

``GridIndex`` is the CuPy-native engine; ``NeighborsIndex`` is the cuML adapter, driven here
by scikit-learn's ``NearestNeighbors`` on float32 input (a real kNN library in cuML's
place). Plugged into ``sample_groups`` through a custom ``Backend`` they must give exactly
the CPU backend's groups.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import pytest

pytest.importorskip("hypothesis", reason="Hypothesis is not installed (pip install '.[test]')")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import (CountingIndex, Expanded32Neighbors, RepeatingNeighbors, host_fused_pool,
                      jittered_scan, square_grid)
from parity_cases import (CASES, duplicated, far_clusters, mixed_density, outlier, scans3,
                          sparse_halo)
from gpugroup import sample_groups
from gpugroup.backends import Backend
from gpugroup.backends.cpu import KDTreeIndex
from gpugroup.backends.engines import (
    EXPANDED_ERROR,
    GridIndex,
    NeighborsIndex,
    cuml_algorithm,
)

try:
    from sklearn.neighbors import NearestNeighbors
except ImportError:  # the grid engine tests still run
    NearestNeighbors = None

needs_sklearn = pytest.mark.skipif(NearestNeighbors is None, reason="scikit-learn not installed")


def _sklearn_algorithm(kq, n):
    """cuML's rbc/brute switch, mapped onto scikit-learn's algorithms."""
    return "kd_tree" if cuml_algorithm(kq, n) == "rbc" else "brute"


def _adapter(nn_class=None, **kw):
    def build(x, y):
        cls = nn_class or NearestNeighbors
        if cls is None:
            pytest.skip("scikit-learn not installed")
        return NeighborsIndex(x, y, xp=np, nn_class=cls, **kw)
    return build


#: name -> build_index(x, y)
ENGINES = {
    "grid": functools.partial(GridIndex, xp=np),
    "grid-chunked": functools.partial(GridIndex, xp=np, points_per_cell=0.7, max_slots=64),
    "grid-coarse": functools.partial(GridIndex, xp=np, points_per_cell=9.0),
    # the GPU's fused pool kernel, run as host C++ (tests/hostcuda.py); "tight" leaves
    # most rows to the generic path (blocks of at most 12 points, small cells)
    "grid-fused": lambda x, y: GridIndex(x, y, xp=np, pool_kernel=host_fused_pool(np)),
    "grid-fused-tight": lambda x, y: GridIndex(
        x, y, xp=np, points_per_cell=0.7, pool_kernel=host_fused_pool(np, max_points=12)),
    "sklearn-brute": _adapter(algorithm="brute"),
    "sklearn-switch": _adapter(algorithm=_sklearn_algorithm, batch_rows=64),
    "sklearn-sqeuclidean": _adapter(algorithm="brute", metric="sqeuclidean"),
    "expanded-float32": _adapter(Expanded32Neighbors, algorithm="brute"),
    "expanded-float32-sq": _adapter(Expanded32Neighbors, algorithm="brute", metric="sqeuclidean"),
    # the CPU backend's forest of slab trees (slab count forced: only speed depends on it)
    "kdtree-forest-3": functools.partial(KDTreeIndex, slabs=3),
    "kdtree-forest-7-serial": functools.partial(KDTreeIndex, slabs=7, workers=1),
}
GRID_ENGINES = ["grid", "grid-chunked", "grid-coarse"]
FOREST_ENGINES = ["kdtree-forest-3", "kdtree-forest-7-serial"]
ADAPTER_ENGINES = ["sklearn-brute", "sklearn-switch", "sklearn-sqeuclidean"]
EMULATED_ENGINES = ["expanded-float32", "expanded-float32-sq"]


def engine_backend(name: str, wrap=None) -> Backend:
    build = ENGINES[name]
    if wrap is not None:
        inner = build
        build = lambda x, y: wrap(inner(x, y))  # noqa: E731
    return Backend(name=f"test-{name}", xp=np, build_index=build, asnumpy=np.asarray,
                   description=f"test engine {name}")


# ----------------------------------------------------------------------------- scans


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("xy, nsamples, K, C, seed, kw", CASES)
def test_engine_groups_equal_cpu(engine, xy, nsamples, K, C, seed, kw):
    x, y = xy()
    want = sample_groups(x, y, nsamples, K, C, seed=seed, backend="cpu", **kw)
    got = sample_groups(x, y, nsamples, K, C, seed=seed, backend=engine_backend(engine), **kw)
    assert got.dtype == want.dtype
    assert np.array_equal(got, want)


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("oversample", [False, True])
def test_engine_groups_equal_cpu_with_scan_index(engine, oversample):
    x, y, scans = scans3()
    kw = dict(scan_index=scans, enable_oversampling=oversample)
    nsamples = 400 if oversample else 200
    want = sample_groups(x, y, nsamples, 8, 4, seed=5, backend="cpu", **kw)
    got = sample_groups(x, y, nsamples, 8, 4, seed=5, backend=engine_backend(engine), **kw)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("engine", list(ENGINES))
def test_engine_small_batches_equal_default(engine):
    x, y = jittered_scan(400, seed=21)
    be = engine_backend(engine)
    a = sample_groups(x, y, 300, 9, 4, seed=2, backend=be)
    b = sample_groups(x, y, 300, 9, 4, seed=2, backend=be, batch_rows=3)
    assert np.array_equal(a, b)


# ----------------------------------------------------------------------------- contract
def assert_contract(index, x, y, rows, kq):
    """cand (m, kq) int64 distinct in [0, n); every other point has exact d2 >= floor."""
    cand, floor = index.query(np.asarray(rows, dtype=np.int64), kq)
    n = len(x)
    assert cand.shape == (len(rows), kq) and cand.dtype == np.int64
    assert floor.shape == (len(rows),) and floor.dtype == np.float64
    assert ((cand >= 0) & (cand < n)).all()
    srt = np.sort(cand, axis=1)
    assert (srt[:, 1:] != srt[:, :-1]).all(), "repeated candidate"
    for r, row in enumerate(np.asarray(rows)):
        dx = x - x[row]
        dy = y - y[row]
        d2 = dx * dx
        d2 = d2 + dy * dy
        others = np.ones(n, dtype=bool)
        others[cand[r]] = False
        if others.any():
            worst = d2[others].min()
            assert worst >= floor[r], (int(row), kq, float(worst), float(floor[r]))
    return cand, floor


CONTRACT_SCANS = {
    "grid": lambda: square_grid(12),
    "jitter": lambda: jittered_scan(300, seed=1),
    "dup12": lambda: duplicated(12),
    "identical": lambda: (np.full(20, 7.0), np.full(20, 7.0)),
    "line-y": lambda: (np.zeros(80), np.arange(80.0) * 0.5),
    "meter-offset": lambda: tuple(a * 1e-6 + 1e-3 for a in jittered_scan(200, seed=2)),
    "offset-1e5": lambda: tuple(a + 1e5 for a in jittered_scan(200, seed=3)),
    "far-clusters": lambda: far_clusters(n=100),
    "outlier": outlier,
    "mixed-density": mixed_density,
    "sparse-halo": sparse_halo,
    "subnormal-d2": lambda: subnormal_scan(),
}


def subnormal_scan():
    """16 points ~2**-536 apart (found by fuzzing): their d2 are subnormal, rounded by
    absolute steps, where a relatively slackened floor could exceed a rounded d2."""
    x = [float.fromhex(h) for h in [
        '0x1.181c7c528d986p-539', '0x1.38a3031cf2f7ep-537', '0x1.27d425e23f7f2p-539',
        '0x1.05cec772ce6dbp-537', '0x1.f643693bf6cfap-536', '0x1.553a1ac8ac306p-541',
        '0x1.61b7372f6ba41p-545', '0x1.21de1eeb8ad16p-536', '0x1.763e5a9df456ep-537',
        '0x1.d04497a7f6e7dp-536', '0x1.6c76fdbe0f172p-537', '0x1.574d50906d7cdp-538',
        '0x1.923eec0c280d2p-536', '0x1.024c8dd24a90ap-536', '0x1.cc13fc2f9e4c1p-536',
        '0x1.0f3fdd34bd2c6p-537']]
    y = [float.fromhex(h) for h in [
        '0x1.0b192d1114401p-536', '0x1.7117a81ae802cp-536', '0x1.8e9fb08a95507p-536',
        '0x1.cbd6a3062eb53p-536', '0x1.c1b33961d6db2p-537', '0x1.cb7fbd0945b4fp-536',
        '0x1.9abcc3c8bd7f8p-536', '0x1.60b99fc6484f6p-536', '0x1.a0bca5ed89574p-536',
        '0x1.d1c8156dafccdp-536', '0x1.601db22308966p-538', '0x1.9a8692a3b4901p-536',
        '0x1.e81d219d4b73fp-536', '0x1.ce19b9ef9748cp-537', '0x1.3e98589dfb79bp-536',
        '0x1.141e47954480dp-536']]
    return np.array(x), np.array(y)


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("scan", list(CONTRACT_SCANS))
def test_floor_contract_brute_force(engine, scan):
    x, y = CONTRACT_SCANS[scan]()
    n = len(x)
    index = ENGINES[engine](x, y)
    assert index.n == n
    rows = np.random.default_rng(0).choice(n, size=min(n, 30), replace=False)
    for kq in sorted(k for k in {1, 2, 5, 9, 24, 50, n - 1, n} if 1 <= k <= n):
        assert_contract(index, x, y, rows, kq)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    n=st.integers(1, 40),
    scale=st.sampled_from([1e-6, 1e-3, 1.0, 37.0, 1e4]),
    offset=st.sampled_from([0.0, -5e-3, 123.456, 1e5, -3e6]),
    layout=st.sampled_from(["uniform", "integer", "dups", "line"]),
)
def test_floor_contract_property(data, n, scale, offset, layout):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    if layout == "uniform":
        x, y = rng.uniform(0, 10, n), rng.uniform(0, 10, n)
    elif layout == "integer":
        x, y = rng.integers(0, 5, n).astype(float), rng.integers(0, 5, n).astype(float)
    elif layout == "dups":
        base = rng.uniform(0, 3, (max(1, n // 4), 2))
        pick = base[rng.integers(0, len(base), n)]
        x, y = pick[:, 0].copy(), pick[:, 1].copy()
    else:
        x, y = rng.uniform(0, 10, n), np.zeros(n)
    x = x * scale + offset
    y = y * scale - offset
    kq = data.draw(st.integers(1, n))
    rows = rng.integers(0, n, size=min(n, 8))
    engines = (GRID_ENGINES + EMULATED_ENGINES + FOREST_ENGINES
               + (ADAPTER_ENGINES if NearestNeighbors else []))
    for name in engines:
        assert_contract(ENGINES[name](x, y), x, y, rows, kq)


# ----------------------------------------------------------------------------- grid engine
def test_grid_chunking_does_not_change_answers():
    x, y = jittered_scan(500, seed=4)
    rows = np.arange(0, 500, 3)
    a = GridIndex(x, y, xp=np).query(rows, 20)
    b = GridIndex(x, y, xp=np, max_slots=50).query(rows, 20)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_grid_floor_is_informative_on_a_jittered_scan():
    """Not required by the contract, but what makes the engine fast: the first query
    already proves most rows complete."""
    x, y = jittered_scan(2000, seed=5)
    index = GridIndex(x, y, xp=np)
    rows = np.arange(2000)
    cand, floor = index.query(rows, 24)
    dx = x[cand] - x[rows][:, None]
    dy = y[cand] - y[rows][:, None]
    d2 = np.sort(dx * dx + dy * dy, axis=1)
    assert (d2[:, 16] < floor).mean() > 0.95


def test_grid_first_query_completes_nearly_all_rows():
    x, y = jittered_scan(5000, seed=6)
    built = []
    be = engine_backend("grid", wrap=lambda ix: built.append(CountingIndex(ix)) or built[-1])
    sample_groups(x, y, 2000, 16, 4, seed=1, backend=be)
    calls = built[0].calls
    first_kq = max(calls, key=lambda c: c[0])[1]
    widened = sum(r for r, kq in calls if kq > first_kq)
    assert widened <= 0.02 * 2000, calls


def test_grid_clustered_scan_shrinks_cells():
    x, y = far_clusters(n=400)
    index = GridIndex(x, y, xp=np)
    assert index.per_cell <= 4.0  # not a whole cluster in one cell
    x, y = np.append(np.arange(300.0), 1e9), np.zeros(301)  # a line and a far outlier
    index = GridIndex(x, y, xp=np)
    assert index.per_cell <= 4.0
    assert_contract(index, x, y, np.array([0, 150, 299, 300]), 12)


def test_grid_mixed_density_gets_finer_levels():
    """A fine scan inside a coarse one: cells of the coarse scan's size would put the whole
    fine scan in a few cells (every query of it a block of hundreds); finer levels split
    it, and each row is served where its block is small."""
    x, y = mixed_density()
    index = GridIndex(x, y, xp=np)
    assert len(index.levels) >= 3
    assert index.levels[0].crowding() <= 8.0 < index.levels[-1].crowding()
    assert [lv.h for lv in index.levels] == sorted(lv.h for lv in index.levels)
    served = []
    for lv in index.levels:
        lv.select = _spy(lv.select, lambda *a, lv=lv: served.append((lv.h, len(a[0]), a[-2])))
    rows = np.arange(len(x))
    assert_contract(index, x, y, rows, 9)
    assert sum(m for _, m, _ in served) == len(x)  # every row served once
    fine = [m for h, m, _ in served if h == index.levels[0].h]
    assert sum(fine) >= 500 - 50  # the fine scan's rows stay at the finest level
    assert max(int(R.max()) for _, _, R in served) <= 9  # no row needs a wide block


def _spy(fn, record):
    def wrapped(*a, **kw):
        record(*a)
        return fn(*a, **kw)
    return wrapped


def test_grid_builds_coarser_levels_for_many_sparse_rows():
    x, y = sparse_halo()
    roomy = GridIndex(x, y, xp=np)
    tight = GridIndex(x, y, xp=np, max_slots=64)  # sparse rows x n over the budget
    assert len(roomy.levels) == len(tight.levels)
    rows = np.arange(len(x))
    assert_contract(roomy, x, y, rows, 7)
    b = assert_contract(tight, x, y, rows, 7)
    assert len(tight.levels) > len(roomy.levels)  # built lazily, coarser than the base
    assert tight.levels[-1].h > roomy.levels[-1].h
    again = tight.query(rows, 7)  # the lazily built levels are reused
    assert np.array_equal(again[0], b[0]) and np.array_equal(again[1], b[1])


def test_grid_chunks_bound_padding_and_slots():
    index = GridIndex(*jittered_scan(50, seed=1), xp=np, max_slots=400)
    cost = np.random.default_rng(3).integers(1, 200, size=300)
    parts = list(index._chunks(cost))
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(300))
    for part in parts:
        c = cost[part]
        assert c.max() <= 4 * c.min()
        assert len(part) == 1 or len(part) * c.max() <= 400
    even = np.full(100, 3)  # similar costs within the budget: one chunk
    assert [len(p) for p in index._chunks(even)] == [100]


@pytest.mark.parametrize("layout", ["identical", "half-stacked"])
def test_grid_settles_stacked_rows_without_querying_them(layout):
    """A cell holding a stack of S duplicates makes every query of it S wide: rows on such
    stacks take their pool from the stack before any query, with the same groups."""
    if layout == "identical":
        x, y = np.zeros(4000), np.zeros(4000)
    else:
        jx, jy = jittered_scan(2000, seed=8)
        x, y = np.concatenate([jx, np.full(2000, jx[5])]), np.concatenate([jy, np.full(2000, jy[5])])
    built = []
    be = engine_backend("grid", wrap=lambda ix: built.append(CountingIndex(ix)) or built[-1])
    got = sample_groups(x, y, 1000, 9, 4, seed=3, backend=be)
    assert built[0].stacked
    queried = sum(r for r, _ in built[0].calls)
    if layout == "identical":
        assert queried == 0
    else:  # rows of the jittered half only (the probe counts them once more)
        assert 0 < queried < 2 * 1000 * 2000 / 4000 + 1024
    assert np.array_equal(got, sample_groups(x, y, 1000, 9, 4, seed=3, backend="cpu"))


@pytest.mark.parametrize("far", [1e13, -1e30, 1e140])
def test_grid_box_leaves_far_outliers_to_its_border_cells(far, caplog):
    """A sentinel-like position far away must not stretch the cells over the whole scan:
    the box leaves it out (it sits in a border cell), and its own row is still exact."""
    x, y = jittered_scan(3000, seed=9)
    x, y = np.append(x, far), np.append(y, 17.5)
    with caplog.at_level(logging.WARNING, logger="gpugroup.backends.engines"):
        index = GridIndex(x, y, xp=np)
    assert caplog.text == ""
    assert len(index.levels) == 1 and index.per_cell < 4
    assert index.extent[0] < 100  # the scan's, not the outlier's
    assert_contract(index, x, y, np.array([0, 1500, 2999, 3000]), 9)
    be = engine_backend("grid")
    want = sample_groups(x, y, 3001, 9, 4, seed=2, backend="cpu")
    assert np.array_equal(sample_groups(x, y, 3001, 9, 4, seed=2, backend=be), want)


def test_grid_far_outlier_of_a_tiny_scan_gets_a_finite_floor():
    """u = (x - x0) / h of the outlier overflows float64 here (span 1e150, pitch 1e-160):
    it is cut at 2**62, so its floor stays a (small) number, never NaN."""
    rng = np.random.default_rng(0)
    x = np.append(rng.random(2000) * 1e-160, 1e150)
    for y in (np.append(rng.random(2000) * 1e-160, 1e150), np.zeros(2001)):
        index = GridIndex(x, y, xp=np)
        cand, floor = assert_contract(index, x, y, np.array([2000, 0, 1999]), 5)
        assert np.isfinite(floor).all()


def test_grid_rows_beside_the_box_take_the_whole_grid_at_once():
    """An outlier far out on x only (y inside the scan): its block's y edges bound nothing,
    so it is served by one whole-grid block instead of doubling up to it."""
    x, y = jittered_scan(3000, seed=10)
    x, y = np.append(x, [4e12, 5e12]), np.append(y, [20.0, 30.0])
    built = []
    be = engine_backend("grid", wrap=lambda ix: built.append(CountingIndex(ix)) or built[-1])
    got = sample_groups(x, y, 3002, 9, 4, seed=7, backend=be)
    assert np.array_equal(got, sample_groups(x, y, 3002, 9, 4, seed=7, backend="cpu"))
    index = built[0].inner
    assert index.box[1] < 100  # the two outliers are outside the box
    assert_contract(index, x, y, np.array([3000, 3001, 5]), 9)
    assert max(kq for _, kq in built[0].calls) < 64  # no row widened towards n


def test_grid_warns_when_outliers_crowd_its_finest_cells(caplog):
    """Too many distinct far positions for the box to leave out: cells cannot be fine
    enough for the scan, and the engine says so."""
    x, y = jittered_scan(2000, seed=9)
    far = np.random.default_rng(1).uniform(1e13, 2e13, 60)
    x, y = np.append(x, far), np.append(y, far)
    with caplog.at_level(logging.WARNING, logger="gpugroup.backends.engines"):
        index = GridIndex(x, y, xp=np)
    assert "far outliers or sentinel values" in caplog.text
    assert_contract(index, x, y, np.array([0, 1000, 1999, 2000, 2059]), 9)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gpugroup.backends.engines"):
        GridIndex(*mixed_density(), xp=np)
        GridIndex(*far_clusters(), xp=np)
        GridIndex(*outlier(), xp=np)
    assert caplog.text == ""


def test_grid_rejects_bad_kq_and_handles_no_rows():
    x, y = square_grid(4)
    index = GridIndex(x, y, xp=np)
    with pytest.raises(ValueError, match="kq"):
        index.query(np.array([0]), 17)
    cand, floor = index.query(np.array([], dtype=np.int64), 3)
    assert cand.shape == (0, 3) and floor.shape == (0,)


# ----------------------------------------------------------------------------- adapter
class SpyNeighbors:
    """Records what the adapter hands a sklearn-API class (wraps scikit-learn)."""

    log: list = []

    def __init__(self, *, algorithm, metric):
        self.inner = NearestNeighbors(algorithm=algorithm, metric=metric)
        SpyNeighbors.log.append(("init", algorithm, metric))

    def fit(self, X):
        SpyNeighbors.log.append(("fit", X.dtype, X.shape, float(np.abs(X).max())))
        self.inner.fit(X)
        return self

    def kneighbors(self, Q, n_neighbors, return_distance=True):
        SpyNeighbors.log.append(("kneighbors", Q.dtype, Q.shape, n_neighbors))
        return self.inner.kneighbors(Q, n_neighbors=n_neighbors, return_distance=return_distance)


@needs_sklearn
def test_adapter_centres_casts_float32_batches_and_switches_algorithm():
    SpyNeighbors.log = []
    x, y = square_grid(20, offset=(1e5, 2e5))  # n = 400: rbc while kq <= 20
    index = NeighborsIndex(x, y, xp=np, nn_class=SpyNeighbors, batch_rows=64,
                           algorithm=_sklearn_algorithm)
    index.query(np.arange(150), 20)
    index.query(np.arange(10), 21)
    fits = [e for e in SpyNeighbors.log if e[0] == "fit"]
    assert fits[0][1] == np.float32 and fits[0][2] == (400, 2)
    assert fits[0][3] <= 10.0  # centred on the midrange: the 1e5 offset is gone
    inits = [e[1] for e in SpyNeighbors.log if e[0] == "init"]
    assert inits == ["kd_tree", "brute"]  # one model per algorithm, fitted once
    calls = [e for e in SpyNeighbors.log if e[0] == "kneighbors"]
    assert [c[2][0] for c in calls[:3]] == [64, 64, 22]
    assert all(c[1] == np.float32 for c in calls)


class IndicesOnlyNeighbors(Expanded32Neighbors):
    """A library whose distances must not be read: asked for them, it fails (a stand-in
    for a release that returns squared distances for metric="euclidean")."""

    def kneighbors(self, Q, n_neighbors, return_distance=True):
        assert not return_distance, "the adapter asked for distances"
        return super().kneighbors(Q, n_neighbors, return_distance=False)


@pytest.mark.parametrize("scan", ["grid", "jitter", "offset-1e5", "outlier", "subnormal-d2"])
def test_adapter_needs_only_the_returned_indices(scan):
    x, y = CONTRACT_SCANS[scan]()
    index = NeighborsIndex(x, y, xp=np, nn_class=IndicesOnlyNeighbors)
    rows = np.arange(len(x))
    for kq in (1, 5, min(12, len(x))):
        assert_contract(index, x, y, rows, kq)
    be = Backend(name="indices-only", xp=np, asnumpy=np.asarray, description="test",
                 build_index=lambda a, b: NeighborsIndex(a, b, xp=np,
                                                         nn_class=IndicesOnlyNeighbors))
    for K, C in ((7, 4), (16, 9)):
        np.testing.assert_array_equal(
            sample_groups(x, y, len(x), K, C, seed=1, backend=be),
            sample_groups(x, y, len(x), K, C, seed=1, backend="cpu"))


def test_cuml_algorithm_switch():
    assert cuml_algorithm(10, 100) == "rbc"
    assert cuml_algorithm(11, 100) == "brute"
    assert cuml_algorithm(1, 1) == "rbc"
    # cuVS's rbc selects nothing past k = 1024, however large n is
    assert cuml_algorithm(1024, 1024**2) == "rbc"
    assert cuml_algorithm(1025, 10**7) == "brute"
    assert cuml_algorithm(2048, 10**9) == "brute"


def test_adapter_refuses_sqeuclidean_where_rbc_can_be_chosen():
    x, y = square_grid(4)
    for algorithm in ("rbc", cuml_algorithm, _sklearn_algorithm):
        with pytest.raises(ValueError, match=r"sqeuclidean.*rbc.*metric='euclidean'"):
            NeighborsIndex(x, y, xp=np, nn_class=object, algorithm=algorithm,
                           metric="sqeuclidean")
    NeighborsIndex(x, y, xp=np, nn_class=object, algorithm="brute", metric="sqeuclidean")


@needs_sklearn
def test_cuml_stand_in_int64_max_rows_are_rescued_and_avoided(monkeypatch, caplog):
    """The cuML stand-in (conftest.CumlLikeNeighbors) answers rbc queries past its k limit
    with INT64_MAX rows, as cuVS does past 1024. An adapter forced onto rbc gets them, logs
    it and re-serves those rows exactly; with cuml_algorithm (limit lowered to match) rbc is
    never asked past the limit and nothing needs rescuing. Groups equal the CPU's in both."""
    from conftest import CumlLikeNeighbors

    from gpugroup.backends import engines

    monkeypatch.setattr(CumlLikeNeighbors, "rbc_max_k", 8)
    x, y = square_grid(30, offset=(3e4, -7e3))
    want = sample_groups(x, y, 400, 16, 4, seed=2, backend="cpu")
    for algorithm, rescued in (("rbc", True), (cuml_algorithm, False)):
        monkeypatch.setattr(engines, "RBC_MAX_K", 8)
        CumlLikeNeighbors.log = []
        be = Backend(name="cuml-like", xp=np, asnumpy=np.asarray, description="test",
                     build_index=functools.partial(NeighborsIndex, xp=np,
                                                   nn_class=CumlLikeNeighbors,
                                                   algorithm=algorithm))
        caplog.clear()
        with caplog.at_level("WARNING", logger="gpugroup.backends.engines"):
            got = sample_groups(x, y, 400, 16, 4, seed=2, backend=be)
        np.testing.assert_array_equal(got, want)
        assert ("out-of-range" in caplog.text) is rescued, caplog.text
        asked = [k for alg, k in CumlLikeNeighbors.log if alg == "rbc"]
        assert any(k > 8 for k in asked) is rescued
        assert rescued or any(alg == "brute" for alg, _ in CumlLikeNeighbors.log)


@needs_sklearn
def test_adapter_floor_uses_the_error_bound():
    """The floor sits below the largest returned d2 by the float32 error terms."""
    x, y = jittered_scan(400, seed=8)
    index = NeighborsIndex(x, y, xp=np, nn_class=NearestNeighbors)
    rows = np.arange(0, 400, 7)
    cand, floor = index.query(rows, 12)
    dx = x[cand] - x[rows][:, None]
    dy = y[cand] - y[rows][:, None]
    dmax = (dx * dx + dy * dy).max(axis=1)
    assert (floor < dmax).all()
    reach = 2 * np.hypot(*np.stack([x - index.centre[0], y - index.centre[1]])).max()
    assert (floor > dmax - 2 * EXPANDED_ERROR * reach**2 - 1e-3).all()


@needs_sklearn
def test_guard_widens_when_float32_loses_precision(caplog):
    """Two clusters 1e7 apart with 0.01 spacing: float32 centred coordinates (ulp 0.5)
    merge each cluster into a few points, so the library ranks them arbitrarily. The
    floor must say so and the guard widen kq until the exact re-rank is safe."""
    x, y = far_clusters(spacing=0.01, separation=1e7, n=60)
    rows = np.arange(0, 120, 5)
    index = NeighborsIndex(x, y, xp=np, nn_class=NearestNeighbors)
    cand, floor = assert_contract(index, x, y, rows, 10)
    assert (floor == 0).all()
    built = []
    be = engine_backend("sklearn-brute",
                        wrap=lambda ix: built.append(CountingIndex(ix)) or built[-1])
    want = sample_groups(x, y, 120, 7, 4, seed=9, backend="cpu")
    got = sample_groups(x, y, 120, 7, 4, seed=9, backend=be)
    assert np.array_equal(got, want)
    # widened past a whole cluster (60 points): only then does a candidate 1e7 away
    # give a floor above the cluster's d2
    assert max(kq for _, kq in built[0].calls) > 60


def test_expanded_float32_library_misranks_yet_floor_holds():
    """With float32 expanded distances on a scan 1e5 wide at 0.05 spacing, the library
    returns wrong neighbour sets; the floor still bounds every point it left out."""
    x, y = far_clusters(spacing=0.05, separation=1e5, n=200, seed=3)
    index = ENGINES["expanded-float32"](x, y)
    rows = np.arange(0, 400, 7)
    cand, floor = assert_contract(index, x, y, rows, 12)
    misranked = 0
    for r, row in enumerate(rows):
        d2 = (x - x[row]) ** 2 + (y - y[row]) ** 2
        others = np.ones(len(x), dtype=bool)
        others[cand[r]] = False
        misranked += d2[others].min() < d2[cand[r]].max()
    assert misranked > 0  # the library really is inexact here
    want = sample_groups(x, y, 300, 9, 4, seed=2, backend="cpu")
    assert np.array_equal(sample_groups(x, y, 300, 9, 4, seed=2,
                                        backend=engine_backend("expanded-float32")), want)


@needs_sklearn
def test_adapter_outlier_floor_loosens_but_stays_exact():
    x, y = outlier()
    index = NeighborsIndex(x, y, xp=np, nn_class=NearestNeighbors)
    rows = np.arange(0, 200, 9)
    assert_contract(index, x, y, rows, 30)
    want = sample_groups(x, y, 150, 9, 4, seed=3, backend="cpu")
    got = sample_groups(x, y, 150, 9, 4, seed=3, backend=engine_backend("sklearn-brute"))
    assert np.array_equal(got, want)


def test_adapter_repairs_invalid_rows_with_the_grid_engine(caplog):
    x, y = jittered_scan(300, seed=11)
    index = NeighborsIndex(x, y, xp=np, nn_class=RepeatingNeighbors)
    with caplog.at_level(logging.WARNING, logger="gpugroup.backends.engines"):
        assert_contract(index, x, y, np.arange(0, 300, 4), 15)
    assert "repeated indices" in caplog.text
    be = Backend(name="faulty", xp=np, asnumpy=np.asarray,
                 build_index=lambda a, b: NeighborsIndex(a, b, xp=np, nn_class=RepeatingNeighbors))
    want = sample_groups(x, y, 200, 9, 4, seed=4, backend="cpu")
    assert np.array_equal(sample_groups(x, y, 200, 9, 4, seed=4, backend=be), want)


def test_adapter_rejects_unknown_metric():
    x, y = square_grid(3)
    with pytest.raises(ValueError, match="metric"):
        NeighborsIndex(x, y, xp=np, nn_class=object, metric="cosine")


@pytest.mark.parametrize("scale", [1e20, 1e100])
def test_neighbors_adapter_survives_coordinates_beyond_float32(scale):
    """Coordinates past float32's range are scaled by a power of two before the cast."""
    NearestNeighbors = pytest.importorskip("sklearn.neighbors").NearestNeighbors

    from gpugroup.backends.engines import NeighborsIndex

    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 100, 400) * scale, rng.uniform(0, 100, 400) * scale
    be = Backend(name="sk-huge", xp=np, asnumpy=np.asarray,
                 build_index=functools.partial(NeighborsIndex, xp=np,
                                               nn_class=NearestNeighbors, algorithm="brute"))
    np.testing.assert_array_equal(sample_groups(x, y, 150, 7, 4, seed=3, backend=be),
                                  sample_groups(x, y, 150, 7, 4, seed=3, backend="cpu"))


# ----------------------------------------------------------------------------- CPU forest
def _forest_backend(slabs, workers=-1):
    return Backend(name=f"forest-{slabs}", xp=np, asnumpy=np.asarray, description="test",
                   build_index=functools.partial(KDTreeIndex, slabs=slabs, workers=workers))


def _raster_with_duplicates():
    x, y = square_grid(70)
    return np.concatenate([x, x[::3]]), np.concatenate([y, y[::3]])


@pytest.mark.parametrize("layout", ["jitter", "raster", "raster-dups", "line", "column",
                                    "two-columns"])
def test_cpu_forest_groups_do_not_depend_on_slabs_or_workers(layout):
    """Slabs cut along x at sampled quantiles (whole raster columns), or by count where equal
    x values crowd a cut (a scan along x = const: the slabs straddle equal x, zero gaps),
    each row looking into neighbouring slabs: the groups equal the single tree's whatever
    the slab count."""
    if layout == "jitter":
        x, y = jittered_scan(6000, seed=3)
    elif layout == "raster":
        x, y = square_grid(80)
    elif layout == "raster-dups":
        x, y = _raster_with_duplicates()
    elif layout == "line":
        x = np.random.default_rng(1).uniform(0, 100, 3000)
        y = np.zeros_like(x)
    else:  # all x equal, or two values: the cuts by count
        y = np.random.default_rng(2).uniform(0, 100, 3000)
        x = np.full_like(y, 5.0) if layout == "column" else np.repeat([5.0, 6.0], 1500)
        assert KDTreeIndex(x, y, slabs=7).slabs == 7
    want = sample_groups(x, y, len(x), 16, 4, seed=9, backend=_forest_backend(1))
    for slabs, workers in ((2, -1), (5, 1), (16, 2), (len(x) // 40, -1)):
        got = sample_groups(x, y, len(x), 16, 4, seed=9, backend=_forest_backend(slabs, workers))
        np.testing.assert_array_equal(got, want, err_msg=f"slabs={slabs}")
    assert np.array_equal(want, sample_groups(x, y, len(x), 16, 4, seed=9, backend="cpu"))


def test_cpu_backend_builds_a_forest_on_several_cores(monkeypatch):
    from gpugroup.backends import cpu

    monkeypatch.setattr(cpu, "_FOREST_MIN", 1000)
    monkeypatch.setattr(cpu, "_SLAB_MIN", 300)
    monkeypatch.setattr(cpu, "cpu_count", lambda: 4)
    x, y = jittered_scan(2000, seed=5)
    index = cpu.BACKEND.build_index(x, y)
    assert index.slabs == 4
    assert sorted(index.locality_order(np.arange(2000))) == list(range(2000))
    # slabs of about equal count (cut at sampled x quantiles), ordered along x
    sizes = [len(m) for m in index._members]
    assert sum(sizes) == 2000 and max(sizes) <= 1.25 * 500 and min(sizes) >= 0.75 * 500
    assert all(x[a].max() < x[b].min() for a, b in zip(index._members, index._members[1:]))
    monkeypatch.setattr(cpu, "cpu_count", lambda: 1)
    assert cpu.BACKEND.build_index(x, y).slabs == 1
    monkeypatch.setattr(cpu, "cpu_count", lambda: 64)
    assert cpu.BACKEND.build_index(x, y).slabs == 2000 // 300


@pytest.mark.parametrize("scale", [1e-20, 1e-70, 1.0, 1e21, 1e60])
def test_grid_floors_prove_rows_complete_at_any_scale(scale):
    """The grid's float32 sort keys are taken of d2 times a power of two near the cells'
    scale: at positions in units of 1e-20 or 1e21 the keys of d2 itself all rounded to 0
    or saturated, so no floor proved a row complete and every row widened to the whole
    scan (correct groups, brute-force speed)."""
    from gpugroup.backends.engines import GridIndex
    from gpugroup.simulate import jittered_scan

    x, y = jittered_scan(4000, seed=2)[:2]
    x, y = x * scale, y * scale
    rows = np.arange(0, 4000, 7)
    cand, floor = GridIndex(x, y, xp=np).query(rows, 9)
    dx, dy = x[cand] - x[rows][:, None], y[cand] - y[rows][:, None]
    kth = (dx * dx + dy * dy).max(axis=1)
    assert (floor > kth).mean() > 0.9
    assert (floor <= _exact_next(x, y, rows, cand)).all()  # and floors stay lower bounds


def _exact_next(x, y, rows, cand):
    """The exact d2 from each row to its nearest point not among its candidates."""
    out = np.empty(len(rows))
    for i, (r, c) in enumerate(zip(rows, cand)):
        dx, dy = x - x[r], y - y[r]
        d2 = dx * dx + dy * dy
        d2[c] = np.inf
        out[i] = d2.min()
    return out
