"""Smoke tests of benchmarks/: the entry points run at tiny sizes, and the legacy baselines
in benchmarks/legacy.py produce valid groups and the same assembly as gpugroup.

No timing is asserted here; the benchmarks themselves report timings.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import cKDTree

REPO_ROOT = Path(__file__).resolve().parent.parent
if not (REPO_ROOT / "benchmarks" / "legacy.py").is_file():  # e.g. an installed-package test run
    pytest.skip("benchmarks/ is not beside the tests", allow_module_level=True)
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import common, legacy  # noqa: E402


def _scan(n=400, seed=3):
    return common.jittered_scan(n, seed=seed)


def _knn_sets(x, y, K):
    pts = np.column_stack([x, y])
    _, nn = cKDTree(pts).query(pts, k=K)
    return [set(r.tolist()) for r in nn], nn


def _assert_distinct_rows(g, n, C):
    assert g.ndim == 2 and g.shape[1] == C
    assert g.min() >= 0 and g.max() < n
    assert all(len(set(r.tolist())) == C for r in g)


def test_group_then_sample_valid_and_cached(tmp_path):
    x, y = _scan()
    K, C, m = 7, 4, 60
    dataset = tmp_path / "scan.npz"
    cache = Path(legacy.cache_path_for(dataset, K, C))
    assert cache.name.endswith(".groups_cache.npz")
    g = legacy.group_then_sample(x, y, m, K, C, seed=1, dataset_path=dataset)
    assert cache.is_file()  # the first run wrote the cache
    assert g.shape == (m, C)
    _assert_distinct_rows(g, len(x), C)
    assert len({tuple(sorted(r)) for r in g.tolist()}) == m  # sampled without repeats
    sets, _ = _knn_sets(x, y, K)
    for r in g.tolist():  # every group is C of some position's K nearest
        assert any(set(r) <= s for s in sets), r
    again = legacy.group_then_sample(x, y, m, K, C, seed=1, dataset_path=dataset)
    np.testing.assert_array_equal(g, again)  # the cached run gives the same groups


def test_find_all_valid_groups_deduplicates():
    x, y = _scan(100)
    groups = legacy.find_all_valid_groups(x, y, 5, 4, np.random.default_rng(0),
                                          groups_per_position=20)
    assert np.all(np.diff(groups, axis=1) > 0)  # sorted rows, distinct members
    assert len({tuple(r) for r in groups.tolist()}) == len(groups)


def test_per_row_loop_valid():
    x, y = _scan()
    K, C = 7, 4
    g, seeds = legacy.per_row_loop(x, y, 50, K, C, seed=2, return_seeds=True)
    assert g.shape == (50, C) and len(set(seeds.tolist())) == 50
    _assert_distinct_rows(g, len(x), C)
    sets, _ = _knn_sets(x, y, K)
    for row, s in zip(g.tolist(), seeds.tolist()):
        assert set(row) <= sets[s]
    sub = legacy.per_row_loop(x, y, 50, K, C, seed=2, limit_rows=10)
    np.testing.assert_array_equal(sub, g[:10])


def test_knn_floor_matches_tree():
    x, y = _scan()
    seeds = np.arange(0, 400, 7)
    nn = legacy.knn_floor(x, y, seeds, 7)
    _, ref = _knn_sets(x, y, 7)
    assert nn.shape == (len(seeds), 7)
    for row, s in zip(nn, seeds):
        assert set(row.tolist()) == set(ref[s].tolist())


def test_assemble_legacy_matches_gpugroup():
    from gpugroup import assembly, sample_groups
    from gpugroup.schema import ScanArrays

    x, y = _scan(300)
    N = 16
    diff = common.diffraction_stack(300, N, seed=1)
    nn = sample_groups(x, y, 50, 7, 4, seed=5, backend="cpu")
    old = legacy.assemble_legacy(diff, nn, N, x, y)
    assert old["diffraction"].shape == (50, N, N, 4) and old["X_full"].dtype == np.float32
    assert old["diffraction"].flags.c_contiguous
    new = assembly.assemble_groups(np, ScanArrays(x, y, diff), nn, N)
    np.testing.assert_array_equal(old["diffraction"], new["diffraction"])
    np.testing.assert_allclose(old["X_full"], new["X_full"], rtol=1e-6)
    for k in ("coords_nn", "coords_offsets", "coords_relative"):
        np.testing.assert_allclose(old[k], new[k], rtol=1e-12, atol=1e-12)
    # DESIGN.md section 2: mean over (B, C) of the per-frame energy of X_full is (N/2)**2.
    e = (old["X_full"].astype(np.float64) ** 2).sum(axis=(1, 2)).mean()
    assert e == pytest.approx((N / 2) ** 2, rel=1e-5)


def test_measure_reports_peaks():
    res = common.measure(lambda: np.ones(4 << 20), repeats=2, budget_s=5)
    assert res["best_s"] > 0 and len(res["times_s"]) >= 2
    assert res["tracemalloc_peak_bytes"] >= 32 << 20
    if res["rss_peak_extra_bytes"] is not None:
        assert res["rss_peak_extra_bytes"] >= 16 << 20


def test_benchmark_grouping_entry_point(tmp_path):
    from benchmarks import benchmark_grouping

    rc = benchmark_grouping.main([
        "--sizes", "600", "--methods", "legacy,loop,floor,floor_fast,cpu,gpu,e2e_legacy,e2e_cpu",
        "--N", "8", "--repeats", "1", "--budget-s", "5", "--warm-gib", "0", "--min-total-s", "0",
        "--paired-rounds", "2", "--paired-s", "0",
        "--out", str(tmp_path), "--machine", "smoke", "--no-plot"])
    assert rc == 0
    (js,) = tmp_path.glob("grouping-smoke-*.json")
    data = json.loads(js.read_text())
    assert data["machine"]["numpy"] == np.__version__
    by = {r["method"]: r for r in data["results"]}
    for m in ("legacy", "loop", "floor", "floor_fast", "cpu", "e2e_legacy", "e2e_cpu"):
        assert by[m]["status"] == "ok", by[m]
        assert by[m]["best_s"] > 0 and by[m]["tracemalloc_peak_bytes"] > 0
    assert by["gpu"]["status"] in ("ok", "skipped")
    paired = by["paired"]
    assert paired["status"] == "ok" and paired["rounds"] == 2
    assert set(paired["times_s"]) >= {"cpu", "floor", "floor_fast", "loop"}
    assert data["summary"][0]["paired_median_cpu_over_floor"] > 0
    md = (tmp_path / js.name.replace(".json", ".md")).read_text()
    assert md.startswith("# gpugroup grouping")


def test_benchmark_grouping_extrapolated_loop_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks import benchmark_grouping

    rc = benchmark_grouping.main([
        "--sizes", "300,2000", "--methods", "loop,cpu", "--loop-max", "1000",
        "--loop-subset", "50", "--repeats", "1", "--warm-gib", "0", "--min-total-s", "0",
        "--no-tracemalloc", "--no-paired",
        "--out", str(tmp_path), "--machine", "smoke"])
    assert rc == 0
    data = json.loads(next(tmp_path.glob("grouping-smoke-*.json")).read_text())
    loop = [r for r in data["results"] if r["method"] == "loop" and r["n"] == 2000][0]
    assert loop["status"] == "ok" and loop["extrapolated"] and loop["measured_rows"] == 50
    assert next(tmp_path.glob("grouping-smoke-*.png")).stat().st_size > 0


def test_benchmark_assembly_entry_point(tmp_path):
    from benchmarks import benchmark_assembly

    rc = benchmark_assembly.main([
        "--n", "200", "--groups", "100", "--N", "16", "--repeats", "1", "--warm-gib", "0",
        "--min-total-s", "0",
        "--methods", "legacy,assemble,assemble_nodiff,generate", "--paired-rounds", "2",
        "--paired-s", "0",
        "--out", str(tmp_path), "--machine", "smoke"])
    assert rc == 0
    data = json.loads(next(tmp_path.glob("assembly-smoke-*.json")).read_text())
    assert data["check"]["status"] == "ok" and data["check"]["all_close"]
    by = {r["method"]: r for r in data["results"]}
    for m in ("legacy", "assemble", "assemble_nodiff", "generate"):
        assert by[m]["status"] == "ok", by[m]
    assert data["summary"]["assemble"]["speedup_vs_legacy"] > 0
    assert data["paired"]["status"] == "ok" and data["paired"]["rounds"] == 2
    assert data["summary"]["assemble"]["paired_median_speedup_vs_legacy"] > 0


def test_benchmark_cpu_cores_entry_point(tmp_path):
    """Before (the CPU backend of a git revision) and after, side by side: runs, writes its
    JSON and table, and finds the groups identical."""
    import subprocess

    from benchmarks import benchmark_cpu_cores

    rev = "HEAD"  # this tree's own backend stands in for the baseline in a smoke test
    probe = subprocess.run(["git", "show", f"{rev}:gpugroup/backends/cpu.py"],
                           cwd=Path(benchmark_cpu_cores.__file__).parents[1],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip("not a git checkout")
    rc = benchmark_cpu_cores.main(["--sizes", "3e3", "--rounds", "2", "--baseline-rev", rev,
                                   "--machine", "smoke", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads(next(tmp_path.glob("cpu-cores-smoke-*.json")).read_text())
    (row,) = data["rows"]
    assert row["identical_groups"] and set(row["best_s"]) == {"before", "after"}
    assert set(row["ratio_after_over_before"]) == {"seeds", "build_index", "neighbour_pool",
                                                   "sample_groups"}
    assert "| 3e+03 | sample_groups |" in next(tmp_path.glob("cpu-cores-smoke-*.md")).read_text()
