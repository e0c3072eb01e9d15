"""The GPU's fused pool kernel (gpugroup/backends/fused_pool.py), checked without a GPU.

The kernel source runs as host C++ (tests/hostcuda.py: every thread in turn, no FMA), so
its logic is held to a brute-force oracle here: every row it settles must be the exact
``(d2, p)`` ranking over all points, on scans made to break it (tie shells, duplicates,
one-ulp neighbours, far outliers, mixed densities). Groups through ``sample_groups`` are
compared with the CPU backend's over the whole parity matrix in test_engines.py
("grid-fused"). Where ``nvcc`` is installed, the source also compiles for the GPU (sm_90)
with no FMA in its PTX and no register spills.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from conftest import host_fused_pool, jittered_scan, square_grid
from parity_cases import duplicated, far_clusters, mixed_density, outlier, sparse_halo
from gpugroup import sample_groups
from gpugroup.backends import Backend, engines, fused_pool
from gpugroup.backends.engines import GridIndex
from gpugroup.grouping import neighbour_pool


def brute_force_others(x, y, rows, W):
    """The W nearest others of each row by exact (d2, p), d2 as DESIGN.md 3.2 computes it."""
    out = np.empty((len(rows), W), dtype=np.int64)
    p = np.arange(len(x))
    for i, r in enumerate(rows):
        dx = x - x[r]
        dy = y - y[r]
        d2 = dx * dx
        d2 += dy * dy
        d2[r] = np.inf
        out[i] = np.lexsort((p, d2))[:W]
    return out


def one_ulp_cluster():
    """Points one ulp apart around 1.0, beside a coarse grid: d2 ties and near-ties."""
    x0 = 1.0 + np.arange(-40, 40) * np.spacing(1.0)
    gx, gy = square_grid(20, spacing=1e-12)
    return np.concatenate([x0, gx + 1.0]), np.concatenate([np.full(80, 2.0), gy + 2.0])


LAYOUTS = {
    "jitter": lambda: jittered_scan(3000, seed=1),
    "raster": lambda: square_grid(50),
    "raster-offset": lambda: square_grid(40, spacing=0.1, offset=(1e5, -1e5)),
    "dup3": lambda: duplicated(3),
    "stacks-200": lambda: (np.repeat(np.arange(10.0), 200), np.repeat(np.arange(10.0) % 3, 200)),
    "one-ulp": one_ulp_cluster,
    "line": lambda: (np.arange(500.0) * 0.5, np.zeros(500)),
    "far-clusters": far_clusters,
    "outlier": outlier,
    "mixed-density": mixed_density,
    "sparse-halo": sparse_halo,
}
#: Layouts where the kernel must settle nearly every row (otherwise a test of it that
#: passes could be a test of the generic path).
MOSTLY_SETTLED = {"jitter": 0.97, "raster": 0.97, "raster-offset": 0.97, "dup3": 0.9,
                  "far-clusters": 0.6}


@pytest.mark.parametrize("K", [2, 5, 9, 16, 33])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_settled_rows_are_the_exact_ranking(layout, K):
    x, y = LAYOUTS[layout]()
    n = len(x)
    W = min(K, n) - 1
    index = GridIndex(x, y, xp=np, pool_kernel=host_fused_pool(np))
    rows = np.random.default_rng(K).choice(n, size=min(n, 300), replace=False)
    ranked, done = index.nearest_others(rows, W + 1)
    assert ranked.shape == (len(rows), W) and done.dtype == bool
    want = brute_force_others(x, y, rows, W)
    assert np.array_equal(ranked[done], want[done])
    if layout in MOSTLY_SETTLED:
        assert done.mean() >= MOSTLY_SETTLED[layout]
    # the pools in full (kernel rows and generic rows together) are the exact ones
    pool = neighbour_pool(np, x, y, rows, K, index)
    assert np.array_equal(pool[:, 0], rows)
    assert np.array_equal(pool[:, 1:], want)


def test_random_scans_against_brute_force():
    """Many small random scans (uniform, integer lattice with ties, duplicates, tiny and
    huge scales) through the kernel, every settled row checked."""
    rng = np.random.default_rng(2026)
    kernel = host_fused_pool(np)
    settled = 0
    for trial in range(60):
        n = int(rng.integers(2, 400))
        kind = trial % 4
        if kind == 0:
            x, y = rng.uniform(0, 10, n), rng.uniform(0, 10, n)
        elif kind == 1:
            x, y = (rng.integers(0, 8, n).astype(float) for _ in range(2))
        elif kind == 2:
            base = rng.uniform(0, 3, (max(1, n // 5), 2))[rng.integers(0, max(1, n // 5), n)]
            x, y = base[:, 0].copy(), base[:, 1].copy()
        else:
            x, y = rng.normal(0, 1, n), rng.normal(0, 1, n) ** 3
        scale, offset = 10.0 ** rng.integers(-8, 8), rng.choice([0.0, 1e5, -3.7e3])
        x, y = x * scale + offset, y * scale - offset
        K = int(rng.integers(2, 34))
        W = min(K, n) - 1
        if W < 1:
            continue
        rows = rng.choice(n, size=min(n, 40), replace=False)
        ranked, done = GridIndex(x, y, xp=np, pool_kernel=kernel).nearest_others(rows, W + 1)
        want = brute_force_others(x, y, rows, W)
        assert np.array_equal(ranked[done], want[done]), (trial, n, K)
        settled += int(done.sum())
    assert settled > 600  # the kernel did the work (of 60 x 40 rows)


def test_groups_do_not_depend_on_row_order_chunks_or_block_bound(monkeypatch):
    """Whatever the kernel settles and leaves (block bound), in whatever row order and
    blocks, the groups are the CPU backend's."""
    from gpugroup import grouping

    x, y = jittered_scan(4000, seed=8)
    want = sample_groups(x, y, 1500, 12, 4, seed=3, backend="cpu")
    for max_points, rows_per_call in [(4096, 1 << 20), (20, 7), (40, 300)]:
        monkeypatch.setattr(grouping, "_FUSED_ROWS", rows_per_call)
        kernel = host_fused_pool(np, max_points=max_points)
        be = Backend(name="fused-host", xp=np, asnumpy=np.asarray,
                     build_index=lambda x, y, k=kernel: GridIndex(x, y, xp=np, pool_kernel=k))
        assert np.array_equal(sample_groups(x, y, 1500, 12, 4, seed=3, backend=be), want)


def test_wide_pools_and_indexes_without_a_kernel_take_the_generic_path():
    x, y = jittered_scan(500, seed=9)
    with_kernel = GridIndex(x, y, xp=np, pool_kernel=host_fused_pool(np))
    assert with_kernel.nearest_others(np.arange(10), fused_pool.MAX_OTHERS + 2) is None
    assert with_kernel.nearest_others(np.arange(10), 1) is None
    assert GridIndex(x, y, xp=np).nearest_others(np.arange(10), 9) is None
    rows = np.arange(0, 500, 7)
    K = fused_pool.MAX_OTHERS + 5
    assert np.array_equal(neighbour_pool(np, x, y, rows, K, with_kernel)[:, 1:],
                          brute_force_others(x, y, rows, K - 1))


def test_kernel_rejects_a_width_it_was_not_built_for():
    x, y = jittered_scan(100, seed=1)
    index = GridIndex(x, y, xp=np)
    kernel = host_fused_pool(np)
    with pytest.raises(ValueError, match="W must be in"):
        kernel(index.levels[0], x[:3], y[:3], np.arange(3), np.arange(3),
               np.empty((3, fused_pool.MAX_OTHERS + 1), np.int64), np.zeros(3, bool), 1, 4)


def test_host_harness_refuses_arguments_the_gpu_would_misread():
    """An int32 where the kernel takes long long (or an int32 array for a long long*)
    reads garbage on a GPU; the host harness refuses it, so the tests catch it."""
    x, y = jittered_scan(100, seed=1)
    index = GridIndex(x, y, xp=np)
    kernel = host_fused_pool(np)
    level = index.levels[0]
    args = dict(qx=x[:3], qy=y[:3], rows=np.arange(3), dest=np.arange(3),
                ranked=np.empty((3, 4), np.int64), ok=np.zeros(3, bool), R0=1, cap=4)
    kernel(level, **args)
    assert args["ok"].all()
    fn = kernel._function(4, True)
    good = [level.xs, level.ys, level.perm, level.cell_start, np.int64(level.n), x[:3], y[:3],
            np.arange(3), np.arange(3), np.int64(3), np.float64(level.x0),
            np.float64(level.y0), np.float64(level.inv_h), np.int64(level.gx),
            np.int64(level.gy), np.int64(1), np.int64(4), np.int64(99), args["ranked"],
            args["ok"]]
    fn((1,), (4,), good)
    for i, bad in [(9, np.int32(3)), (7, np.arange(3, dtype=np.int32)), (10, np.float32(0))]:
        with pytest.raises(TypeError, match=f"argument {i} is"):
            fn((1,), (4,), good[:i] + [bad] + good[i + 1:])


def test_kernel_constants_are_the_grid_engines():
    """The edge floor's slack and the cut of u are written in the CUDA source as numbers:
    they must be the grid engine's (engines._FLOOR_SLACK, 2**-46, engines._U_MAX)."""
    numbers = {float(v) for v in re.findall(r"(?<![\w.])(\d+\.\d+(?:e-?\d+)?)", fused_pool.SOURCE)}
    assert {engines._FLOOR_SLACK, 2.0**-46, engines._U_MAX} <= numbers


# ----------------------------------------------------------------------------- nvcc
NVCC = shutil.which("nvcc")


def _instantiations(widths):
    sig = ("const double*, const double*, const long long*, const long long*, long long, "
           "const double*, const double*, const long long*, const long long*, long long, "
           "double, double, double, long long, long long, long long, long long, long long, "
           "long long*, bool*")
    return "".join(f"template __global__ void nearest_others<{w}, {d}>({sig});\n"
                   for w in widths for d in ("true", "false"))


@pytest.mark.skipif(NVCC is None, reason="nvcc (the CUDA toolkit) is not installed")
def test_kernel_compiles_for_the_gpu_without_fma_or_spills(tmp_path):
    """The source is valid CUDA for sm_90 with the options NVRTC gets; with them the PTX
    holds no fused multiply-add (without --fmad=false it does: the check can fail), and
    every width up to MAX_OTHERS keeps its pool in registers."""
    src = tmp_path / "pool.cu"
    src.write_text(fused_pool.SOURCE + _instantiations([1, 6, 15, fused_pool.MAX_OTHERS]))
    ptx = tmp_path / "pool.ptx"

    def nvcc(*args):
        return subprocess.run([NVCC, "-arch=sm_90", *args, str(src)], capture_output=True,
                              text=True, timeout=300)

    done = nvcc("-ptx", *fused_pool.NVRTC_OPTIONS, "-o", str(ptx))
    assert done.returncode == 0, done.stderr
    text = ptx.read_text()
    assert "mul.rn.f64" in text and "fma" not in text
    contracted = nvcc("-ptx", "--std=c++17", "-o", str(tmp_path / "fma.ptx"))
    assert contracted.returncode == 0 and "fma.rn.f64" in (tmp_path / "fma.ptx").read_text()
    cubin = nvcc("-cubin", *fused_pool.NVRTC_OPTIONS, "-Xptxas", "-v",
                 "-o", str(tmp_path / "pool.cubin"))
    assert cubin.returncode == 0, cubin.stderr
    spills = re.findall(r"(\d+) bytes spill stores", cubin.stderr)
    assert len(spills) == 8 and set(spills) == {"0"}, cubin.stderr
