"""DESIGN.md section 3 on the CPU: KATs, the reference, independence, validation."""

from __future__ import annotations

import itertools
import logging
import math
import re

import numpy as np
import pytest
from scipy import stats
from scipy.spatial import cKDTree

import reference as ref
from conftest import (
    BruteForceIndex,
    CountingIndex,
    StingyIndex,
    jittered_scan,
    make_backend,
    square_grid,
)
from gpugroup import sample_groups
from gpugroup.backends import get_backend
from gpugroup.backends.cpu import KDTreeIndex


def groups_cpu(x, y, nsamples, K, C, seed, **kw):
    kw.setdefault("backend", "cpu")
    return sample_groups(x, y, nsamples=nsamples, K=K, C=C, seed=seed, **kw)


def assert_matches_reference(x, y, nsamples, K, C, seed, **kw):
    """Package == reference; returns the package groups."""
    opts = {k: kw[k] for k in ("sequential", "enable_oversampling", "scan_index") if k in kw}
    got = groups_cpu(x, y, nsamples, K, C, seed, **kw)
    want = ref.sample_groups(x, y, nsamples, K, C, seed, **opts)
    assert got.dtype == np.int32
    assert got.shape == (len(want), C)
    assert got.tolist() == want
    return got


# ============================================================================= KAT
def _kat_grid(case):
    assert case["scan"] == "10x10 unit grid"
    return square_grid(10)


def test_kat_groups_package(kat):
    assert len(kat["groups"]) >= 4
    for case in kat["groups"]:
        x, y = _kat_grid(case)
        got = groups_cpu(x, y, case["nsamples"], case["K"], case["C"], case["seed"],
                         sequential=case.get("sequential", False))
        assert got.dtype == np.int32
        assert got.tolist() == case["nn_indices"], case


def test_kat_groups_reference(kat):
    """The reference reproduces the KAT groups (so it is a trustworthy oracle)."""
    for case in kat["groups"]:
        x, y = _kat_grid(case)
        want = ref.sample_groups(x, y, case["nsamples"], case["K"], case["C"], case["seed"],
                                 sequential=case.get("sequential", False))
        assert want == case["nn_indices"], case


def test_kat_groups_with_custom_engine(kat):
    """The KAT groups come out of an adversarial engine too."""
    backend, _ = make_backend(lambda x, y: BruteForceIndex(x, y, tie="high"), "brute-high")
    for case in kat["groups"]:
        x, y = _kat_grid(case)
        got = groups_cpu(x, y, case["nsamples"], case["K"], case["C"], case["seed"],
                         sequential=case.get("sequential", False), backend=backend)
        assert got.tolist() == case["nn_indices"], case


# ============================================================================= reference
def test_reference_colex_enumerates_all_combinations_in_colex_order():
    for P in range(1, 9):
        for C in range(1, P + 1):
            colex = sorted(itertools.combinations(range(P), C), key=lambda t: t[::-1])
            got = [tuple(ref.colex_combination(N, P, C)) for N in range(math.comb(P, C))]
            assert got == colex, (P, C)


def test_reference_coprime_step():
    for M in range(2, 400):
        a = ref.coprime_step(M)
        assert math.gcd(a, M) == 1
        assert a >= round(M * 0.6180339887498949)
        assert sorted((r * a) % M for r in range(M)) == list(range(M))


GRID_CASES = [
    # (K, C) inside and across tie shells of a square grid (shell sizes 1, 4, 4, 4, 8, ...)
    (5, 4), (6, 4), (8, 4), (9, 4), (13, 4), (9, 9), (13, 9), (5, 1), (6, 2), (8, 3), (13, 13),
]


@pytest.mark.parametrize("K,C", GRID_CASES)
@pytest.mark.parametrize("seed", [0, 1, 987654321, 2**64 - 1])
def test_grid_matches_reference(K, C, seed):
    x, y = square_grid(10)
    assert_matches_reference(x, y, 40, K, C, seed)


@pytest.mark.parametrize("K,C", [(5, 4), (9, 4), (13, 9)])
def test_rectangular_grid_all_seeds(K, C):
    x, y = square_grid(11, 7)
    assert_matches_reference(x, y, 77, K, C, 5)


@pytest.mark.parametrize(
    "spacing,offset",
    [
        (1.0, (1e5, 1e5)),          # 1e5 px offset
        (1.0, (-1e5, 3e5)),
        (1e-6, (0.0, 0.0)),         # meter-scale coordinates
        (1e-6, (1e-3, -2e-3)),
        (0.1, (0.0, 0.0)),          # inexact spacing: shells are not exact ties
        (37.5, (12.25, -7.0)),
    ],
)
@pytest.mark.parametrize("K,C", [(5, 4), (9, 4), (8, 4), (13, 9)])
def test_scaled_and_offset_grids_match_reference(spacing, offset, K, C):
    x, y = square_grid(9, spacing=spacing, offset=offset)
    assert_matches_reference(x, y, 50, K, C, 11)


@pytest.mark.parametrize("K,C", [(5, 4), (9, 4)])
def test_exact_scalings_give_the_same_groups(K, C):
    """Power-of-two scales and exact offsets keep every d2 tie: same integer groups."""
    x, y = square_grid(10)
    base = groups_cpu(x, y, 60, K, C, 3)
    for spacing, offset in [(2.0**-20, (0.0, 0.0)), (4.0, (1e5, 1e5)), (0.5, (-3e4, 128.0))]:
        xs, ys = square_grid(10, spacing=spacing, offset=offset)
        np.testing.assert_array_equal(groups_cpu(xs, ys, 60, K, C, 3), base)


@pytest.mark.parametrize("n,seed", [(150, 0), (400, 1), (400, 2)])
@pytest.mark.parametrize("K,C", [(4, 4), (7, 4), (9, 9), (16, 4)])
def test_jittered_scan_matches_reference(n, seed, K, C):
    x, y = jittered_scan(n, seed=seed)
    assert_matches_reference(x, y, 120, K, C, seed + 100)


def test_jittered_scan_large_offset_and_meter_scale():
    x, y = jittered_scan(300, seed=9)
    assert_matches_reference(x + 1e5, y - 1e5, 100, 9, 4, 1)
    assert_matches_reference(x * 1e-6 + 1e-3, y * 1e-6, 100, 9, 4, 1)


# ----------------------------------------------------------------------------- duplicates
def test_duplicated_grid_positions_match_reference():
    x, y = square_grid(6)
    x3, y3 = np.repeat(x, 3), np.repeat(y, 3)  # every position three times
    for K, C in [(3, 2), (4, 4), (5, 4), (9, 4), (13, 9)]:
        assert_matches_reference(x3, y3, 108, K, C, 4)


def test_more_duplicates_than_K_match_reference():
    x, y = square_grid(5)
    # 12 points stacked on (2, 2) and 8 on (0, 4): more duplicates than K
    x = np.concatenate([x, np.full(12, 2.0), np.full(8, 0.0)])
    y = np.concatenate([y, np.full(12, 2.0), np.full(8, 4.0)])
    for K, C in [(5, 4), (9, 4), (9, 9)]:
        assert_matches_reference(x, y, len(x), K, C, 21)


def test_all_positions_identical():
    x = np.full(30, 1e5)
    y = np.full(30, -1e5)
    got = assert_matches_reference(x, y, 30, 8, 4, 2)
    # pools are [s] + the 7 lowest other indices, so every member is the seed or < 8
    seeds = groups_cpu(x, y, 30, 1, 1, 2)[:, 0].tolist()
    for s, row in zip(seeds, got.tolist()):
        assert set(row) <= set(range(8)) | {s}, (s, row)


def test_duplicate_pool_is_lowest_indices():
    """Among exact ties (d2 = 0) the pool takes the lowest position numbers."""
    x = np.zeros(20)
    y = np.zeros(20)
    pool = ref.reference_pool(x, y, 15, 5)
    assert pool == [15, 0, 1, 2, 3]
    seeds = groups_cpu(x, y, 20, 1, 1, 0)[:, 0].tolist()
    got = groups_cpu(x, y, 20, 5, 5, 0)
    for s, row in zip(seeds, got.tolist()):
        assert set(row) == {s} | set([p for p in range(6) if p != s][:4]), (s, row)


def _stack_spy(monkeypatch):
    """Record how many rows each ``_Stacks.pools`` call settled."""
    from gpugroup import grouping

    settled = []
    real = grouping._Stacks.pools

    def pools(self, rows, width):
        done, p = real(self, rows, width)
        settled.append(int(done.sum()))
        return done, p

    monkeypatch.setattr(grouping._Stacks, "pools", pools)
    return settled


def _counting_backend(name):
    wrapped = []

    def factory(a, b):
        wrapped.append(CountingIndex(KDTreeIndex(a, b)))
        return wrapped[-1]

    return make_backend(factory, name)[0], wrapped


def test_large_duplicate_stacks_match_reference(monkeypatch):
    """Stacks far larger than the widening threshold: rows on them take the stack's lowest
    numbers without querying kq up to the stack size; the rest widen as usual."""
    settled = _stack_spy(monkeypatch)
    x, y = jittered_scan(200, seed=7)
    x = np.concatenate([x, np.full(600, x[17]), np.full(400, 3.0), np.full(5, 6.5), x[:3]])
    y = np.concatenate([y, np.full(600, y[17]), np.full(400, 3.5), np.full(5, 2.0), y[:3]])
    backend, wrapped = _counting_backend("cpu-count-stacks")
    n = len(x)
    for K, C in [(9, 4), (16, 9)]:
        assert_matches_reference(x, y, 300, K, C, 3, backend=backend)
    assert sum(settled) > 0
    # past kq = 256 only rows next to a stack (not on one) still widen: a handful
    assert 0 < sum(r for r, kq in wrapped[0].calls if kq > 256) < 30, wrapped[0].calls
    got = groups_cpu(x, y, n, 7, 4, 3, backend=backend, batch_rows=97)
    assert got.tolist() == ref.sample_groups(x, y, n, 7, 4, 3)


def test_all_identical_large_scan_does_not_widen_to_n(monkeypatch):
    settled = _stack_spy(monkeypatch)
    n = 5000
    x, y = np.full(n, -2.5), np.full(n, 1e3)
    backend, wrapped = _counting_backend("cpu-count-identical")
    got = groups_cpu(x, y, 400, 8, 4, 5, backend=backend)
    assert sum(settled) == 400
    assert max(kq for _, kq in wrapped[0].calls) <= 2 * 256
    seeds = groups_cpu(x, y, 400, 1, 1, 5)[:, 0].tolist()
    for s, row in zip(seeds, got.tolist()):  # the seed and the 7 lowest other numbers
        assert set(row) <= {s} | set([p for p in range(9) if p != s][:7]), (s, row)
    assert got.tolist() == ref.sample_groups(x, y, 400, 8, 4, 5)


def test_probe_spots_stacks_and_settles_them_before_querying(monkeypatch):
    """With more rows than the probe, a probe that finds rows on stacks settles every
    stacked row at once: the only queries are the probe's and the other rows'."""
    settled = _stack_spy(monkeypatch)
    jx, jy = jittered_scan(1500, seed=4)
    x = np.concatenate([np.full(1500, 2.5), jx])
    y = np.concatenate([np.full(1500, 7.5), jy])
    backend, wrapped = _counting_backend("cpu-count-probe")
    got = groups_cpu(x, y, 2000, 9, 4, 12, backend=backend)
    calls = wrapped[0].calls
    assert calls[0] == (1024, 10)  # the probe, at kq = K + 1
    assert settled and settled[0] > 500  # ~half of 2000 seeds are on the stack
    assert sum(r for r, _ in calls[1:]) < 2 * (2000 - settled[0])
    assert got.tolist() == ref.sample_groups(x, y, 2000, 9, 4, 12)


def test_stack_shortcut_steps_aside_when_d2_underflows(monkeypatch):
    """Two stacks 1e-170 apart have d2 = 0 between them in float64: "same d2" is no longer
    "same position", so the shortcut must not apply and the guard decides alone."""
    settled = _stack_spy(monkeypatch)
    x = np.concatenate([np.zeros(300), np.full(300, 1e-170), np.arange(1.0, 11.0)])
    y = np.zeros(610)
    got = assert_matches_reference(x, y, 200, 9, 4, 8)
    assert settled and sum(settled) == 0
    assert got.shape == (200, 4)


def test_signed_zero_stacks_are_one_position(monkeypatch):
    """-0.0 and 0.0 are one position (d2 = 0): a stack mixing them is ranked by number."""
    settled = _stack_spy(monkeypatch)
    rng = np.random.default_rng(2)
    x = np.where(rng.random(700) < 0.5, -0.0, 0.0)
    y = np.where(rng.random(700) < 0.5, 0.0, -0.0)
    x = np.concatenate([x, np.arange(1.0, 31.0)])
    y = np.concatenate([y, np.ones(30)])
    assert_matches_reference(x, y, 300, 9, 4, 6)
    assert sum(settled) > 0


# ----------------------------------------------------------------------------- small n
@pytest.mark.parametrize("n,K,C", [(6, 9, 4), (4, 9, 4), (4, 4, 4), (2, 5, 2), (1, 3, 1), (9, 50, 9)])
def test_small_scans_pool_is_everything(n, K, C):
    x, y = jittered_scan(n, seed=n)
    got = assert_matches_reference(x, y, n, K, C, 8)
    assert got.shape == (n, C)
    if n == C:
        # every group is all positions
        assert all(sorted(row) == list(range(n)) for row in got.tolist())


def test_n_equals_C_grid():
    x, y = square_grid(3)
    got = assert_matches_reference(x, y, 9, 9, 9, 1)
    assert all(sorted(r) == list(range(9)) for r in got.tolist())


# ----------------------------------------------------------------------------- sequential
@pytest.mark.parametrize("K,C", [(5, 4), (9, 4), (7, 1)])
def test_sequential_matches_reference(K, C):
    x, y = square_grid(8)
    got = assert_matches_reference(x, y, 20, K, C, 6, sequential=True)
    if C == 1:
        assert got[:, 0].tolist() == list(range(20))


def test_sequential_seeds_are_first_positions():
    x, y = square_grid(8)
    got = groups_cpu(x, y, 64, 1, 1, 123, sequential=True)
    assert got[:, 0].tolist() == list(range(64))
    # the seed does not change sequential seeds, but it does change members
    a = groups_cpu(x, y, 30, 9, 4, 1, sequential=True)
    b = groups_cpu(x, y, 30, 9, 4, 2, sequential=True)
    assert not np.array_equal(a, b)


# ----------------------------------------------------------------------------- scan_index
def _three_scans():
    x1, y1 = square_grid(6)                          # scan 7: 36 positions
    x2, y2 = square_grid(5, offset=(2.5, 2.5))       # scan -2: 25 positions overlapping scan 7
    x3, y3 = np.array([0.0, 1, 0, 1, 0.5]), np.array([0.0, 0, 1, 1, 0.5])  # scan 100: 5 < K
    x = np.concatenate([x1, x2, x3])
    y = np.concatenate([y1, y2, y3])
    sid = np.concatenate([np.full(36, 7), np.full(25, -2), np.full(5, 100)])
    # interleave the scans so the scan members are not contiguous
    perm = np.random.default_rng(0).permutation(x.size)
    return x[perm], y[perm], sid[perm]


@pytest.mark.parametrize("K,C", [(9, 4), (5, 4), (13, 4), (5, 5)])
def test_scan_index_matches_reference(K, C):
    x, y, sid = _three_scans()
    got = assert_matches_reference(x, y, x.size, K, C, 17, scan_index=sid)
    for row in got:
        assert len({int(sid[p]) for p in row}) == 1  # a group never crosses scans


def test_scan_index_changes_pools():
    """Overlapping scans: grouping by scan differs from grouping the union."""
    x, y, sid = _three_scans()
    a = groups_cpu(x, y, 66, 9, 4, 17, scan_index=sid)
    b = groups_cpu(x, y, 66, 9, 4, 17)
    assert not np.array_equal(a, b)
    assert any(len({int(sid[p]) for p in row}) > 1 for row in b)


def test_scan_index_all_zero_equals_no_scan_index():
    x, y = jittered_scan(100, seed=4)
    a = groups_cpu(x, y, 60, 9, 4, 3, scan_index=np.zeros(100, dtype=np.int64))
    b = groups_cpu(x, y, 60, 9, 4, 3)
    np.testing.assert_array_equal(a, b)


def test_scan_index_builds_one_index_per_scan_and_reuses_cache():
    x, y, sid = _three_scans()
    backend, built = make_backend(lambda a, b: KDTreeIndex(a, b), "cpu-counting")
    cache = {}
    first = groups_cpu(x, y, x.size, 9, 4, 17, scan_index=sid, backend=backend, index_cache=cache)
    assert len(built) == 3
    assert sorted(i.n for i in built) == [5, 25, 36]
    again = groups_cpu(x, y, x.size, 9, 4, 17, scan_index=sid, backend=backend, index_cache=cache)
    assert len(built) == 3  # reused
    np.testing.assert_array_equal(first, again)


# ============================================================================= oversampling
def _oversampled(x, y, nsamples, K, C, seed, **kw):
    return assert_matches_reference(x, y, nsamples, K, C, seed, enable_oversampling=True, **kw)


@pytest.mark.parametrize("nsamples", [26, 50, 100, 113])
@pytest.mark.parametrize("K,C", [(9, 4), (5, 4), (13, 9), (6, 2)])
def test_oversampling_matches_reference(nsamples, K, C):
    x, y = square_grid(5)
    n = x.size
    got = _oversampled(x, y, nsamples, K, C, 31)
    assert got.shape == (nsamples, C)
    order = groups_cpu(x, y, n, 1, 1, 31)[:, 0].tolist()  # the seed order
    plain = groups_cpu(x, y, n, K, C, 31)
    np.testing.assert_array_equal(got[:n], plain)  # rows g < n equal the plain result
    for g, row in enumerate(got.tolist()):
        s = order[g % n]
        assert set(row) <= set(ref.reference_pool(x, y, s, K)), (g, s)
        assert len(set(row)) == C


@pytest.mark.parametrize("K,C", [(9, 4), (5, 4), (6, 2), (4, 2), (13, 9)])
def test_oversampling_repeats_are_distinct_sets(K, C):
    x, y = square_grid(6)
    n = x.size
    repeats = min(math.comb(K, C), 12)
    got = _oversampled(x, y, n * repeats, K, C, 8)
    for s in range(n):
        sets = {frozenset(got[g].tolist()) for g in range(s, n * repeats, n)}
        assert len(sets) == repeats, (s, repeats)


def test_oversampling_exhausts_every_combination():
    """comb(K, C) == repeats: the repeats of one seed are all C-subsets of its pool."""
    x, y = square_grid(5)
    n = x.size
    K, C = 6, 4
    M = math.comb(K, C)
    got = _oversampled(x, y, n * M, K, C, 99)
    order = groups_cpu(x, y, n, 1, 1, 99)[:, 0].tolist()
    for j in range(n):
        pool = ref.reference_pool(x, y, order[j], K)
        sets = {frozenset(got[g].tolist()) for g in range(j, n * M, n)}
        assert sets == {frozenset(c) for c in itertools.combinations(pool, C)}


def test_oversampling_small_n_pool_is_everything():
    x, y = jittered_scan(6, seed=3)
    M = math.comb(6, 4)
    got = _oversampled(x, y, 6 * M, 9, 4, 2)
    for s in range(6):
        assert len({frozenset(got[g].tolist()) for g in range(s, 6 * M, 6)}) == M


def test_oversampling_with_scans():
    x, y, sid = _three_scans()
    n = x.size
    got = _oversampled(x, y, 5 * n + 3, 9, 4, 12, scan_index=sid)
    for row in got:
        assert len({int(sid[p]) for p in row}) == 1
    # the 5-position scan allows comb(5, 4) = 5 distinct sets: its first 5 repeats differ
    order = groups_cpu(x, y, n, 1, 1, 12)[:, 0]
    small = [j for j in range(n) if sid[order[j]] == 100]
    assert len(small) == 5
    for j in small:
        sets = [frozenset(got[g].tolist()) for g in range(j, 5 * n, n)]
        assert len(set(sets)) == 5


def test_oversampling_sequential():
    x, y = square_grid(5)
    got = _oversampled(x, y, 75, 9, 4, 4, sequential=True)
    plain = groups_cpu(x, y, 25, 9, 4, 4, sequential=True)
    np.testing.assert_array_equal(got[:25], plain)


def test_oversampling_warns_when_combinations_run_out(caplog):
    x, y = square_grid(5)
    with caplog.at_level(logging.WARNING, logger="gpugroup"):
        got = _oversampled(x, y, 75, 5, 4, 1)  # comb(5, 4) = 5 >= 3 repeats: no warning
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gpugroup"):
        got = _oversampled(x, y, 75, 4, 4, 1)  # comb(4, 4) = 1 < 3 repeats
    warnings_ = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings_, "expected a WARNING when comb(K, C) < repeats"
    assert "comb" in warnings_[0].getMessage()
    # with one combination the repeats are the plain group again
    np.testing.assert_array_equal(got[25:50], got[:25])


def test_oversampling_off_gives_n_groups_and_warns(caplog):
    x, y = square_grid(5)
    with caplog.at_level(logging.WARNING, logger="gpugroup"):
        got = groups_cpu(x, y, 80, 9, 4, 3)
    assert got.shape == (25, 4)
    np.testing.assert_array_equal(got, groups_cpu(x, y, 25, 9, 4, 3))
    recs = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert recs and "nsamples=80" in recs[0].getMessage()


def test_oversampling_with_C1_gives_n_groups_and_warns(caplog):
    x, y = square_grid(5)
    with caplog.at_level(logging.WARNING, logger="gpugroup"):
        got = groups_cpu(x, y, 80, 9, 1, 3, enable_oversampling=True)
    assert got.shape == (25, 1)
    assert sorted(got[:, 0].tolist()) == list(range(25))
    assert [r for r in caplog.records if r.levelno == logging.WARNING]


# ============================================================================= output contract
@pytest.mark.parametrize("K,C", [(9, 4), (9, 9), (4, 1)])
def test_output_dtype_shape_distinct(K, C):
    x, y = jittered_scan(200, seed=1)
    for nsamples in (1, 7, 200):
        got = groups_cpu(x, y, nsamples, K, C, 0)
        assert isinstance(got, np.ndarray)
        assert got.dtype == np.int32 and got.shape == (nsamples, C)
        assert got.min() >= 0 and got.max() < 200
        assert all(len(set(r)) == C for r in got.tolist())


def test_seeds_are_distinct_without_oversampling():
    x, y = jittered_scan(200, seed=1)
    seeds = groups_cpu(x, y, 150, 9, 1, 5)[:, 0]
    assert np.unique(seeds).size == 150


def test_output_device_on_cpu_is_numpy():
    x, y = square_grid(6)
    got = groups_cpu(x, y, 10, 5, 4, 1, output="device")
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, groups_cpu(x, y, 10, 5, 4, 1))


def test_prefix_property_of_seeds():
    """Fewer samples give a prefix of the rows of more samples (seeds: first m in order)."""
    x, y = jittered_scan(120, seed=2)
    full = groups_cpu(x, y, 120, 9, 4, 44)
    for m in (1, 5, 37, 119):
        np.testing.assert_array_equal(groups_cpu(x, y, m, 9, 4, 44), full[:m])


# ============================================================================= independence
@pytest.mark.parametrize("batch_rows", [1, 3, 7])
def test_batch_rows_do_not_change_groups(batch_rows):
    x, y = square_grid(9)
    x = np.concatenate([x, np.full(6, 4.0)])  # some duplicates too
    y = np.concatenate([y, np.full(6, 4.0)])
    for K, C, kw in [(5, 4, {}), (13, 9, {}), (9, 4, {"enable_oversampling": True})]:
        nsamples = 200 if kw else 60
        base = groups_cpu(x, y, nsamples, K, C, 2, **kw)
        got = groups_cpu(x, y, nsamples, K, C, 2, batch_rows=batch_rows, **kw)
        np.testing.assert_array_equal(got, base)


@pytest.mark.parametrize("block", [1, 9, 50])
def test_member_selection_blocks_do_not_change_groups(monkeypatch, block):
    import gpugroup.grouping as grouping

    x, y = jittered_scan(150, seed=4)
    cases = [(7, 4, 150, {}), (13, 9, 100, {}), (9, 4, 700, {"enable_oversampling": True})]
    base = [groups_cpu(x, y, m, K, C, 3, **kw) for K, C, m, kw in cases]
    monkeypatch.setattr(grouping, "_SELECT_BLOCK", block)  # pool entries per block
    for (K, C, m, kw), want in zip(cases, base):
        np.testing.assert_array_equal(groups_cpu(x, y, m, K, C, 3, **kw), want)


def test_batch_rows_with_scans():
    x, y, sid = _three_scans()
    base = groups_cpu(x, y, 50, 9, 4, 5, scan_index=sid)
    for b in (1, 2, 7):
        np.testing.assert_array_equal(groups_cpu(x, y, 50, 9, 4, 5, scan_index=sid, batch_rows=b), base)


def test_memory_layout_and_dtype_do_not_change_groups():
    x, y = square_grid(10, spacing=0.5, offset=(3.0, -2.0))  # exact in float32 too
    base = groups_cpu(x, y, 50, 9, 4, 10)
    c_pts = np.column_stack([x, y])              # C order: columns are strided views
    f_pts = np.asfortranarray(c_pts)             # F order: columns are contiguous
    big = np.zeros(3 * x.size)
    big[::3] = x
    variants = [
        (c_pts[:, 0], c_pts[:, 1]),
        (f_pts[:, 0], f_pts[:, 1]),
        (big[::3], y[::-1][::-1]),
        (x.astype(np.float32), y.astype(np.float32)),
        (x.tolist(), y.tolist()),
        (np.ascontiguousarray(x[::-1])[::-1], np.ascontiguousarray(y[::-1])[::-1]),
    ]
    assert not variants[0][0].flags.c_contiguous
    for xs, ys in variants:
        np.testing.assert_array_equal(groups_cpu(xs, ys, 50, 9, 4, 10), base)
    xi, yi = square_grid(10)
    np.testing.assert_array_equal(
        groups_cpu(xi.astype(np.int64), yi.astype(np.int32), 50, 9, 4, 10),
        groups_cpu(xi, yi, 50, 9, 4, 10),
    )


class LeafIndex(KDTreeIndex):
    """The CPU engine with another cKDTree layout (leaf size, balanced tree)."""

    def __init__(self, x, y, leafsize):
        self.leafsize = leafsize
        super().__init__(x, y, workers=1)

    def _new_tree(self, points):
        return cKDTree(points, leafsize=self.leafsize, balanced_tree=True, compact_nodes=True)


@pytest.mark.parametrize("leafsize", [1, 2, 64])
def test_tree_leafsize_does_not_change_groups(leafsize):
    backend, built = make_backend(lambda x, y: LeafIndex(x, y, leafsize), f"leaf{leafsize}")
    for x, y in [square_grid(10), jittered_scan(200, seed=6)]:
        x = np.concatenate([x, np.repeat(x[:5], 4)])
        y = np.concatenate([y, np.repeat(y[:5], 4)])
        for K, C in [(5, 4), (9, 4), (13, 9)]:
            base = groups_cpu(x, y, 80, K, C, 1)
            np.testing.assert_array_equal(groups_cpu(x, y, 80, K, C, 1, backend=backend), base)
    assert built, "the custom engine was not used"
    assert all(t.leafsize == leafsize for index in built for t in index._trees)


@pytest.mark.parametrize("tie", ["random", "high", "low"])
@pytest.mark.parametrize("engine_seed", [0, 1])
def test_adversarial_engine_gives_the_same_groups(tie, engine_seed):
    backend, built = make_backend(
        lambda x, y: BruteForceIndex(x, y, rng_seed=engine_seed, tie=tie), f"brute-{tie}"
    )
    x, y = square_grid(9)
    x = np.concatenate([x, np.full(10, 4.0), np.full(3, 0.0)])
    y = np.concatenate([y, np.full(10, 4.0), np.full(3, 8.0)])
    for K, C, kw in [(5, 4, {}), (6, 4, {}), (8, 4, {}), (9, 4, {}), (13, 9, {}),
                     (9, 4, {"enable_oversampling": True, "batch_rows": 5})]:
        nsamples = 3 * x.size if kw else x.size
        got = groups_cpu(x, y, nsamples, K, C, 77, backend=backend, **kw)
        np.testing.assert_array_equal(got, groups_cpu(x, y, nsamples, K, C, 77, **kw))
        if not kw:
            assert got.tolist() == ref.sample_groups(x, y, nsamples, K, C, 77)
    assert built and all(i.calls for i in built)


def test_adversarial_engine_with_scans():
    backend, built = make_backend(lambda x, y: BruteForceIndex(x, y, tie="high"), "brute-scan")
    x, y, sid = _three_scans()
    got = groups_cpu(x, y, x.size, 9, 4, 3, backend=backend, scan_index=sid)
    assert got.tolist() == ref.sample_groups(x, y, x.size, 9, 4, 3, scan_index=sid)
    assert len(built) == 3


def test_adversarial_engine_with_slack_in_floor():
    """A floor that is lower than needed (still a true bound) only costs work."""
    backend, _ = make_backend(lambda x, y: BruteForceIndex(x, y, tie="high", floor_shrink=0.5),
                              "brute-slack")
    x, y = jittered_scan(150, seed=12)
    got = groups_cpu(x, y, 150, 9, 4, 5, backend=backend)
    assert got.tolist() == ref.sample_groups(x, y, 150, 9, 4, 5)


def test_completeness_guard_widens_kq_for_stingy_engine():
    x, y = square_grid(12)
    n = x.size
    engines = []

    def factory(a, b):
        engines.append(StingyIndex(a, b, min_kq=60, tie="high"))
        return engines[-1]

    backend, _ = make_backend(factory, "stingy")
    got = groups_cpu(x, y, 50, 5, 4, 9, backend=backend)
    assert got.tolist() == ref.sample_groups(x, y, 50, 5, 4, 9)
    kqs = [kq for _, kq in engines[0].calls]
    assert kqs[0] < 60 <= max(kqs), kqs          # it had to widen past the stingy range
    assert max(kqs) < n, kqs                     # and stopped once the floor was informative


def test_completeness_guard_widens_on_stacked_duplicates():
    """30 points stacked on one spot of a jittered scan: their rows need kq > 30.

    Most rows complete with a few candidates; the stacked seeds cannot complete before kq
    exceeds the 30 tied points (their K-th d2 is 0 and so is the candidates' floor), so
    the guard must widen kq for those rows only.
    """
    x, y = jittered_scan(600, seed=5)
    x = np.concatenate([x, np.full(30, 7.25)])
    y = np.concatenate([y, np.full(30, 3.5)])
    n = x.size
    wrapped = []

    def factory(a, b):
        wrapped.append(CountingIndex(KDTreeIndex(a, b)))
        return wrapped[-1]

    backend, _ = make_backend(factory, "cpu-count")
    got = groups_cpu(x, y, n, 9, 4, 6, backend=backend)
    assert got.tolist() == ref.sample_groups(x, y, n, 9, 4, 6)
    calls = wrapped[0].calls
    assert max(kq for _, kq in calls) > 30, calls
    # rows were widened individually: the wide queries cover far fewer rows than the scan
    assert sum(r for r, kq in calls if kq > 30) < n // 2, calls
    # adversarial tie choice on the same data
    backend2, _ = make_backend(lambda a, b: BruteForceIndex(a, b, tie="high"), "brute-dup")
    np.testing.assert_array_equal(groups_cpu(x, y, n, 9, 4, 6, backend=backend2), got)


def test_completeness_guard_on_a_stack_larger_than_the_scan_rest():
    """Most positions identical: widening must run all the way to kq = n if needed."""
    x = np.concatenate([np.zeros(50), np.arange(1.0, 6.0)])
    y = np.zeros(55)
    for K, C in [(5, 4), (9, 9), (51, 4)]:
        assert_matches_reference(x, y, 55, K, C, 3)
        backend, _ = make_backend(lambda a, b: BruteForceIndex(a, b, tie="high"), "brute-stack")
        assert groups_cpu(x, y, 55, K, C, 3, backend=backend).tolist() == \
            ref.sample_groups(x, y, 55, K, C, 3)


def test_pool_boundary_on_and_off_tie_shells():
    """K at and inside the shells of a grid (1, 4, 4, 4, 8, 4, 4, 8, ...), adversarial ties."""
    x, y = square_grid(15)
    n = x.size
    backend, built = make_backend(lambda a, b: BruteForceIndex(a, b, tie="high"), "brute-shell")
    for K in (5, 6, 8, 9, 13, 21, 25, 26):
        got = groups_cpu(x, y, n, K, 4, 2, backend=backend)
        assert got.tolist() == ref.sample_groups(x, y, n, K, 4, 2), K


# ============================================================================= reproducibility
def test_same_seed_same_groups():
    x, y = jittered_scan(300, seed=8)
    a = groups_cpu(x, y, 100, 9, 4, 2024)
    b = groups_cpu(x.copy(), y.copy(), 100, 9, 4, 2024)
    np.testing.assert_array_equal(a, b)


def test_different_seed_different_groups():
    x, y = jittered_scan(300, seed=8)
    a = groups_cpu(x, y, 100, 9, 4, 2024)
    for other in (2025, 0, 2**63 + 2024):
        assert not np.array_equal(a, groups_cpu(x, y, 100, 9, 4, other))
    # also the members alone change with the seed (sequential seeds, same pools)
    a = groups_cpu(x, y, 100, 9, 4, 1, sequential=True)
    b = groups_cpu(x, y, 100, 9, 4, 2, sequential=True)
    assert (a != b).any(axis=1).sum() > 50


def test_seed_none_logs_seed_and_rerun_reproduces(caplog):
    x, y = jittered_scan(150, seed=3)
    with caplog.at_level(logging.INFO, logger="gpugroup"):
        first = groups_cpu(x, y, 60, 9, 4, None)
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    drawn = [int(m.group(1)) for msg in infos for m in [re.search(r"drew seed=(\d+)", msg)] if m]
    assert len(drawn) == 1, infos
    seed = drawn[0]
    assert 0 <= seed < 2**63
    np.testing.assert_array_equal(groups_cpu(x, y, 60, 9, 4, seed), first)
    assert first.tolist() == ref.sample_groups(x, y, 60, 9, 4, seed)


def test_seed_none_draws_fresh_seeds(caplog):
    x, y = jittered_scan(150, seed=3)
    with caplog.at_level(logging.INFO, logger="gpugroup"):
        a = groups_cpu(x, y, 60, 9, 4, None)
        b = groups_cpu(x, y, 60, 9, 4, None)
    assert not np.array_equal(a, b)


def test_numpy_integer_seeds():
    x, y = square_grid(8)
    base = groups_cpu(x, y, 20, 9, 4, 77)
    np.testing.assert_array_equal(groups_cpu(x, y, 20, 9, 4, np.int64(77)), base)
    np.testing.assert_array_equal(groups_cpu(x, y, 20, 9, 4, np.uint64(77)), base)


# ============================================================================= uniformity
def test_seed_sampling_is_uniform():
    """First seed and seed-set membership are uniform over positions (chi-square)."""
    n, m, trials = 16, 4, 2400
    x, y = square_grid(4)
    first = np.zeros(n)
    member = np.zeros(n)
    slot = np.zeros((m, n))
    for s in range(trials):
        seeds = groups_cpu(x, y, m, 1, 1, s)[:, 0]
        first[seeds[0]] += 1
        member[seeds] += 1
        slot[np.arange(m), seeds] += 1
    assert stats.chisquare(first).pvalue > 1e-4
    assert stats.chisquare(member).pvalue > 1e-4
    for j in range(m):
        assert stats.chisquare(slot[j]).pvalue > 1e-4
    # within one draw the seeds are not sorted (random order, not a sorted subset)
    assert sum(bool(np.all(np.diff(groups_cpu(x, y, m, 1, 1, s)[:, 0]) > 0))
               for s in range(200)) < 30


def test_seed_order_is_a_permutation_and_not_sorted():
    x, y = square_grid(10)
    for s in range(10):
        order = groups_cpu(x, y, 100, 1, 1, s)[:, 0]
        assert sorted(order.tolist()) == list(range(100))
        assert not np.all(np.diff(order) > 0)
        assert order.tolist() == ref.seed_order(100, s)


def test_member_choice_is_uniform_within_the_pool():
    """With the pool = all 9 positions, each is a member with probability C / K."""
    x, y = square_grid(3)
    counts = np.zeros(9)
    for s in range(1500):
        row = groups_cpu(x, y, 1, 9, 4, s)[0]
        counts[row] += 1
    assert stats.chisquare(counts).pvalue > 1e-4


# ============================================================================= validation
@pytest.fixture
def xy():
    return square_grid(5)


def test_K_less_than_C(xy):
    x, y = xy
    with pytest.raises(ValueError, match="must be >="):
        groups_cpu(x, y, 5, 3, 4, 0)
    with pytest.raises(ValueError, match="must be >="):
        groups_cpu(x, y, 5, 8, 9, 0)


def test_n_less_than_C():
    x, y = square_grid(3)
    with pytest.raises(ValueError, match="must be >="):
        groups_cpu(x[:3], y[:3], 3, 9, 4, 0)
    with pytest.raises(ValueError, match="must be >="):
        groups_cpu(x, y, 3, 16, 16, 0)


@pytest.mark.parametrize("nsamples", [0, -1, -100])
def test_nsamples_not_positive(xy, nsamples):
    x, y = xy
    with pytest.raises(ValueError, match="nsamples"):
        groups_cpu(x, y, nsamples, 9, 4, 0)


def test_uint64_scan_ids_beyond_int64_with_the_index_cache():
    from gpugroup import RawData

    x, y = jittered_scan(100, seed=2)
    sid = np.zeros(100, np.uint64)
    sid[50:] = 2**63 + 5
    raw = RawData(x, y, None, None, np.ones((100, 4, 4), np.float32),
                  np.ones((4, 4), np.complex64), sid, backend="cpu")
    got = raw.generate_grouped_data(4, K=7, nsamples=30, seed=1, gridsize=2,
                                    group_by_scan=True)["nn_indices"]
    np.testing.assert_array_equal(
        got, groups_cpu(x, y, 30, 7, 4, 1, scan_index=(sid != 0).astype(np.int64)))


def test_nsamples_beyond_any_memory(xy):
    x, y = xy
    with pytest.raises(ValueError, match=r"nsamples=10{30} oversampled groups .* at most 2\*\*40"):
        sample_groups(x, y, 10**30, 9, 4, seed=0, enable_oversampling=True, backend="cpu")


@pytest.mark.parametrize("field,value", [
    ("K", 4.0), ("K", "9"), ("K", None), ("K", True),
    ("C", 4.0), ("nsamples", 2.5), ("nsamples", "10"), ("batch_rows", 1.5),
])
def test_non_int_counts(xy, field, value):
    x, y = xy
    kw = {"nsamples": 5, "K": 9, "C": 4, "seed": 0, "backend": "cpu"}
    kw[field] = value
    with pytest.raises((TypeError, ValueError), match=field):
        sample_groups(x, y, **kw)


def test_numpy_integer_counts_accepted(xy):
    x, y = xy
    got = sample_groups(x, y, nsamples=np.int64(5), K=np.int32(9), C=np.int64(4), seed=0,
                        backend="cpu")
    np.testing.assert_array_equal(got, groups_cpu(x, y, 5, 9, 4, 0))


@pytest.mark.parametrize("K,C", [(0, 1), (4, 0), (-1, -1)])
def test_counts_below_one(xy, K, C):
    x, y = xy
    with pytest.raises(ValueError, match="must be >="):
        groups_cpu(x, y, 5, K, C, 0)


def test_batch_rows_below_one(xy):
    x, y = xy
    with pytest.raises(ValueError, match="batch_rows"):
        groups_cpu(x, y, 5, 9, 4, 0, batch_rows=0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("field", ["xcoords", "ycoords"])
def test_non_finite_coordinates(xy, bad, field):
    x, y = (a.copy() for a in xy)
    (x if field == "xcoords" else y)[7] = bad
    with pytest.raises(ValueError) as info:
        groups_cpu(x, y, 5, 9, 4, 0)
    msg = str(info.value)
    assert field in msg and "7" in msg, msg
    assert f"{field}[7]" in msg, msg


def test_mismatched_lengths(xy):
    x, y = xy
    with pytest.raises(ValueError) as info:
        groups_cpu(x, y[:-1], 5, 9, 4, 0)
    msg = str(info.value)
    assert "25" in msg and "24" in msg and "xcoords" in msg and "ycoords" in msg, msg


@pytest.mark.parametrize("field", ["xcoords", "ycoords"])
def test_wrong_ndim(xy, field):
    x, y = xy
    bad = x.reshape(5, 5)
    args = (bad, y) if field == "xcoords" else (x, y.reshape(5, 5))
    with pytest.raises(ValueError) as info:
        groups_cpu(*args, 5, 9, 4, 0)
    assert field in str(info.value) and "(5, 5)" in str(info.value)
    with pytest.raises(ValueError, match="xcoords"):
        groups_cpu(np.float64(1.0), np.float64(2.0), 1, 1, 1, 0)


def test_empty_scan():
    with pytest.raises(ValueError, match="empty"):
        groups_cpu(np.zeros(0), np.zeros(0), 1, 1, 1, 0)


def test_non_numeric_coordinates(xy):
    x, y = xy
    with pytest.raises(ValueError, match="xcoords"):
        groups_cpu(x.astype(str), y, 5, 9, 4, 0)
    with pytest.raises(ValueError, match="ycoords"):
        groups_cpu(x, y + 1j, 5, 9, 4, 0)


@pytest.mark.parametrize("seed", [-1, 2**64, np.int64(-5)])
def test_bad_seed_value(xy, seed):
    x, y = xy
    with pytest.raises(ValueError, match="seed"):
        groups_cpu(x, y, 5, 9, 4, seed)


@pytest.mark.parametrize("seed", [1.0, 0.5, "42", True])
def test_bad_seed_type(xy, seed):
    x, y = xy
    with pytest.raises((TypeError, ValueError), match="seed"):
        groups_cpu(x, y, 5, 9, 4, seed)


def test_largest_seed_works(xy):
    x, y = xy
    assert_matches_reference(x, y, 10, 9, 4, 2**64 - 1)


@pytest.mark.parametrize("name", ["bogus", "CPU", "", "cuda"])
def test_bad_backend_name(xy, name):
    x, y = xy
    with pytest.raises(ValueError, match="backend"):
        groups_cpu(x, y, 5, 9, 4, 0, backend=name)
    with pytest.raises(ValueError, match="backend"):
        get_backend(name)


def test_bad_output(xy):
    x, y = xy
    with pytest.raises(ValueError, match="output"):
        groups_cpu(x, y, 5, 9, 4, 0, output="torch")


def test_scan_with_fewer_than_C_positions(xy):
    x, y = xy
    sid = np.zeros(25, dtype=np.int64)
    sid[[3, 11, 20]] = 42  # scan 42 has 3 positions < C = 4
    with pytest.raises(ValueError) as info:
        groups_cpu(x, y, 5, 9, 4, 0, scan_index=sid)
    msg = str(info.value)
    assert "scan 42" in msg and "3" in msg, msg
    # the same scan is fine with C <= 3 and then only groups within itself
    got = groups_cpu(x, y, 25, 9, 3, 0, scan_index=sid)
    assert got.tolist() == ref.sample_groups(x, y, 25, 9, 3, 0, scan_index=sid)


def test_scan_with_fewer_than_K_but_at_least_C_positions(xy):
    x, y = xy
    sid = np.zeros(25, dtype=np.int64)
    sid[[0, 6, 12, 18, 24]] = 1  # 5 positions along the diagonal: pool is the whole scan
    got = assert_matches_reference(x, y, 25, 9, 4, 5, scan_index=sid)
    for row in got.tolist():
        if sid[row[0]] == 1:
            assert set(row) <= {0, 6, 12, 18, 24}


def test_bad_scan_index(xy):
    x, y = xy
    with pytest.raises(ValueError, match="scan_index"):
        groups_cpu(x, y, 5, 9, 4, 0, scan_index=np.zeros(24, dtype=int))
    with pytest.raises(ValueError, match="scan_index"):
        groups_cpu(x, y, 5, 9, 4, 0, scan_index=np.zeros((25, 1), dtype=int))
    with pytest.raises(ValueError, match="scan_index"):
        groups_cpu(x, y, 5, 9, 4, 0, scan_index=np.zeros(25) + 0.5)


def test_nsamples_above_n_without_oversampling(caplog):
    x, y = square_grid(4)
    with caplog.at_level(logging.WARNING, logger="gpugroup"):
        got = groups_cpu(x, y, 100, 5, 4, 1)
    assert got.shape == (16, 4)
    recs = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(recs) == 1, [r.getMessage() for r in caplog.records]
    assert recs[0].name.startswith("gpugroup")
    assert "100" in recs[0].getMessage() and "16" in recs[0].getMessage()
    assert got.tolist() == ref.sample_groups(x, y, 100, 5, 4, 1)


def test_library_prints_nothing(capsys, xy):
    x, y = xy
    groups_cpu(x, y, 100, 9, 4, None)
    groups_cpu(x, y, 100, 9, 4, 1, enable_oversampling=True)
    out, err = capsys.readouterr()
    assert out == "" and err == ""


def test_auto_backend_without_gpu_matches_cpu(xy, caplog):
    from gpugroup.backends import gpu

    if gpu.unavailable_reason() is None:
        pytest.skip("a GPU is present; 'auto' would not pick the CPU")
    x, y = xy
    with caplog.at_level(logging.INFO, logger="gpugroup"):
        got = sample_groups(x, y, nsamples=10, K=9, C=4, seed=3, backend="auto")
    np.testing.assert_array_equal(got, groups_cpu(x, y, 10, 9, 4, 3))
    assert "CPU" in caplog.text


def test_index_dtype_switches_at_2_to_the_31():
    from gpugroup.schema import index_dtype

    assert index_dtype(1) == np.int32
    assert index_dtype(2**31 - 1) == np.int32
    assert index_dtype(2**31) == np.int64


def test_inputs_are_not_modified():
    x, y = jittered_scan(100, seed=2)
    sid = np.arange(100) % 2
    x0, y0, s0 = x.copy(), y.copy(), sid.copy()
    groups_cpu(x, y, 150, 9, 4, 1, scan_index=sid, enable_oversampling=True)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(sid, s0)


@pytest.mark.parametrize("scale", [1e-160, 1e-162, 1e-300, 1e150, 1e155])
def test_extreme_finite_coordinates_give_reference_or_clear_error(scale):
    """Finite coordinates whose squared differences overflow (or underflow) float64.

    DESIGN 3.2 defines d2 in float64 for any finite input, so the groups are defined (the
    reference computes them: overflowing d2 are +inf ties broken by p). The package must
    return them or raise a clear ValueError - never an IndexError from the kNN engine.
    One documented addition (docs/determinism.md): a scan spanning less than 2**-256 is
    first scaled by a power of two (exact), so its groups are the reference's of the
    scaled positions - which differ from the unscaled reference's where d2 underflows.
    """
    from gpugroup.grouping import exact_rescale

    x, y = jittered_scan(200, seed=1)
    x, y = x * scale, y * scale
    try:
        got = groups_cpu(x, y, 200, 9, 4, 1)
    except ValueError as exc:
        assert "coord" in str(exc), exc
        return
    sx, sy = exact_rescale(x, y)
    assert (sx is x) == (scale > 1)  # (scaled: every tiny case here spans < 2**-256)
    assert got.tolist() == ref.sample_groups(sx, sy, 200, 9, 4, 1)


def test_seed_keys_in_threads_equal_one_thread():
    """Blocks of seed keys computed on several threads give the same seeds (3.1)."""
    from gpugroup.grouping import _KEY_BLOCK, sample_seeds

    n = 2 * _KEY_BLOCK + 12345
    for m in (1000, n):
        np.testing.assert_array_equal(sample_seeds(np, n, m, 42, threads=3),
                                      sample_seeds(np, n, m, 42, threads=1))


@pytest.mark.parametrize("seed", [0, 7, 2**64 - 1])
def test_seeds_are_the_reference_seed_order(seed, monkeypatch):
    """sample_seeds (unstable NumPy sort: the keys are distinct) gives the first m of the
    pure-Python (key, i) order, for m < n and m = n, on one thread and on three (3.1)."""
    from gpugroup import grouping
    from gpugroup.grouping import sample_seeds

    monkeypatch.setattr(grouping, "_KEY_BLOCK", 1024)  # several key blocks on 3 threads
    n = 5000
    order = ref.seed_order(n, seed)
    for m in (1, 977, n - 1, n):
        for threads in (1, 3):
            got = sample_seeds(np, n, m, seed, threads=threads)
            assert got.dtype == np.int64
            assert got.tolist() == order[:m], (m, threads)
