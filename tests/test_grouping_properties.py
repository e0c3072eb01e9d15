"""Property tests (Hypothesis): the package equals the reference on random small scans.

Coordinates come from a small integer lattice so that d2 ties and duplicated positions are
common, sometimes scaled and offset (1e-6 m, 1e5 px). Every drawn configuration is either
valid, and then the package must return exactly the reference's groups, or invalid, and
then it must raise the documented ``ValueError``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("hypothesis", reason="Hypothesis is not installed (pip install '.[test]')")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import reference as ref
from conftest import BruteForceIndex, make_backend
from gpugroup import sample_groups

SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SCALES = [1.0, 0.5, 3.0, 1e-6, 0.1]
OFFSETS = [0.0, 1e5, -2.5e3, 1e-3]


@st.composite
def scans(draw, max_n=60):
    n = draw(st.integers(1, max_n))
    side = draw(st.integers(1, 8))
    lattice = st.lists(st.integers(0, side), min_size=n, max_size=n)
    ix = np.array(draw(lattice), dtype=np.float64)
    iy = np.array(draw(lattice), dtype=np.float64)
    scale = draw(st.sampled_from(SCALES))
    ox = draw(st.sampled_from(OFFSETS))
    oy = draw(st.sampled_from(OFFSETS))
    return ix * scale + ox, iy * scale + oy


@st.composite
def configs(draw):
    x, y = draw(scans())
    n = x.size
    C = draw(st.sampled_from([1, 2, 3, 4, 4, 4, 9]))
    K = C + draw(st.integers(0, 14))
    nsamples = draw(st.integers(1, 3 * n + 5))
    seed = draw(st.one_of(st.integers(0, 1000), st.integers(0, 2**64 - 1)))
    opts = {
        "sequential": draw(st.booleans()),
        "enable_oversampling": draw(st.booleans()),
    }
    if draw(st.booleans()):
        nscans = draw(st.integers(1, 3))
        opts["scan_index"] = np.array(
            draw(st.lists(st.integers(0, nscans - 1), min_size=n, max_size=n)), dtype=np.int64
        ) * 5 - 3  # arbitrary scan ids
    return x, y, nsamples, K, C, seed, opts


def _valid(x, K, C, opts):
    if x.size < C or K < C:
        return False
    sid = opts.get("scan_index")
    if sid is not None:
        _, counts = np.unique(sid, return_counts=True)
        return bool(counts.min() >= C)
    return True


@SETTINGS
@given(configs(), st.sampled_from([1, 2, 5, 1 << 17]))
def test_package_equals_reference(cfg, batch_rows):
    x, y, nsamples, K, C, seed, opts = cfg
    if not _valid(x, K, C, opts):
        with pytest.raises(ValueError) as info:
            sample_groups(x, y, nsamples=nsamples, K=K, C=C, seed=seed, backend="cpu",
                          batch_rows=batch_rows, **opts)
        assert "must be >=" in str(info.value) or "scan" in str(info.value)
        return
    got = sample_groups(x, y, nsamples=nsamples, K=K, C=C, seed=seed, backend="cpu",
                        batch_rows=batch_rows, **opts)
    want = ref.sample_groups(x, y, nsamples, K, C, seed, **opts)
    assert got.dtype == np.int32
    assert got.shape == (len(want), C)
    assert got.tolist() == want
    # structure: C distinct positions per row, within the seed's scan
    assert all(len(set(row)) == C for row in want)
    sid = opts.get("scan_index")
    if sid is not None:
        assert all(len({int(sid[p]) for p in row}) == 1 for row in want)


@SETTINGS
@given(configs(), st.integers(0, 2**32 - 1), st.sampled_from(["random", "high", "low"]))
def test_adversarial_engine_equals_cpu_engine(cfg, engine_seed, tie):
    x, y, nsamples, K, C, seed, opts = cfg
    assume(_valid(x, K, C, opts))
    backend, _ = make_backend(
        lambda a, b: BruteForceIndex(a, b, rng_seed=engine_seed, tie=tie), f"brute-{tie}"
    )
    got = sample_groups(x, y, nsamples=nsamples, K=K, C=C, seed=seed, backend=backend, **opts)
    base = sample_groups(x, y, nsamples=nsamples, K=K, C=C, seed=seed, backend="cpu", **opts)
    np.testing.assert_array_equal(got, base)


@SETTINGS
@given(scans(max_n=40), st.sampled_from([2, 3, 4, 9]), st.integers(0, 8),
       st.integers(2, 6), st.integers(0, 2**63))
def test_oversampling_properties(xy, C, extra, repeats, seed):
    x, y = xy
    n = x.size
    K = C + extra
    assume(n >= C)
    nsamples = n * repeats
    got = sample_groups(x, y, nsamples=nsamples, K=K, C=C, seed=seed, backend="cpu",
                        enable_oversampling=True)
    assert got.shape == (nsamples, C)
    plain = sample_groups(x, y, nsamples=n, K=K, C=C, seed=seed, backend="cpu")
    np.testing.assert_array_equal(got[:n], plain)
    M = math.comb(min(K, n), C)
    for j in range(n):
        sets = {frozenset(got[g].tolist()) for g in range(j, nsamples, n)}
        assert len(sets) == min(repeats, M)
    assert got.tolist() == ref.sample_groups(x, y, nsamples, K, C, seed,
                                             enable_oversampling=True)


@SETTINGS
@given(st.integers(1, 200), st.integers(1, 250), st.integers(0, 2**64 - 1))
def test_seed_order_properties(n, nsamples, seed):
    x = np.zeros(n)
    y = np.zeros(n)
    got = sample_groups(x, y, nsamples=nsamples, K=1, C=1, seed=seed, backend="cpu")[:, 0]
    m = min(n, nsamples)
    assert got.shape == (m,)
    assert np.unique(got).size == m
    assert got.tolist() == ref.seed_order(n, seed)[:m]
