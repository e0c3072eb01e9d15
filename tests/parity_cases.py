"""The CPU/engine parity matrix of DESIGN.md section 3, shared by test_engines (NumPy
engines in CI) and test_gpu (the GPU backend): one list, so both are held to the same cases."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import jittered_scan, square_grid
from gpugroup.simulate import nested_scan


def duplicated(copies):
    x, y = square_grid(6)
    return np.repeat(x, copies), np.repeat(y, copies)


def scans3():
    parts = [jittered_scan(90, seed=s) for s in range(3)]
    x = np.concatenate([p[0] + 40.0 * i for i, p in enumerate(parts)])
    y = np.concatenate([p[1] for p in parts])
    return x, y, np.repeat(np.arange(3), 90)


def far_clusters(spacing=1.0, separation=1e6, n=150, seed=4):
    x, y = jittered_scan(n, seed=seed, spacing=spacing)
    return np.concatenate([x, x + separation]), np.concatenate([y, y])


def outlier():
    x, y = jittered_scan(200, seed=5, spacing=0.3)
    return np.append(x, 3e6), np.append(y, 3e6)


def mixed_density(seed=14):
    """A fine scan (pitch 0.01) inside a coarse overview (pitch 1): the grid engine needs
    cells of both sizes."""
    return nested_scan(800, seed=seed, fine_fraction=0.625, ratio=100.0)


def sparse_halo(seed=15):
    """A dense cluster with sparse points around it, far beyond the cluster's cell size."""
    fx, fy = jittered_scan(500, seed=seed, spacing=0.01)
    x, y = jittered_scan(100, seed=seed + 1, spacing=10.0)
    return np.concatenate([fx + 45.0, x]), np.concatenate([fy + 45.0, y])


def case(name, xy, nsamples, K, C, seed=11, **kw):
    return pytest.param(xy, nsamples, K, C, seed, kw, id=name)


CASES = [
    # square grids with the pool boundary inside a tie shell
    case("grid10-K5", lambda: square_grid(10), 100, 5, 4),
    case("grid10-K6", lambda: square_grid(10), 100, 6, 4),
    case("grid10-K8", lambda: square_grid(10), 100, 8, 4),
    case("grid10-K9", lambda: square_grid(10), 100, 9, 4),
    case("grid10-K9-C9", lambda: square_grid(10), 60, 9, 9),
    case("grid13x7-K8-C2", lambda: square_grid(13, 7), 91, 8, 2),
    case("grid-spacing0.1", lambda: square_grid(9, spacing=0.1), 81, 9, 4),
    # duplicated positions
    case("dup2", lambda: duplicated(2), 72, 7, 4),
    case("dup12", lambda: duplicated(12), 150, 8, 4),
    case("all-identical", lambda: (np.full(30, 2.5), np.full(30, -1.0)), 30, 6, 4),
    # jitter
    case("jitter-K7", lambda: jittered_scan(600, seed=1), 300, 7, 4),
    case("jitter-K16", lambda: jittered_scan(600, seed=2), 300, 16, 4),
    case("jitter-K12-C9", lambda: jittered_scan(400, seed=3), 200, 12, 9),
    # offsets and scales
    case("grid-offset-1e5", lambda: square_grid(10, offset=(1e5, -1e5)), 100, 9, 4),
    case("jitter-offset-1e5", lambda: tuple(a + 1e5 for a in jittered_scan(500, seed=6)),
          250, 7, 4),
    case("meter-scale", lambda: tuple(a * 1e-6 for a in jittered_scan(500, seed=7)), 250, 7, 4),
    case("meter-scale-offset", lambda: tuple(a * 1e-6 + 3e-3 for a in jittered_scan(400, seed=8)),
          200, 9, 4),
    case("grid-meter-scale", lambda: square_grid(10, spacing=1e-6), 100, 9, 4),
    # small scans: n < K, n == C
    case("n3-K7", lambda: (np.array([0.0, 1.0, 5.0]), np.array([0.0, 0.0, 1.0])), 3, 7, 2),
    case("n5-K8", lambda: jittered_scan(5, seed=9), 5, 8, 4),
    case("n4-C4", lambda: square_grid(2), 4, 4, 4),
    # degenerate geometry
    case("line", lambda: (np.arange(200.0), np.zeros(200)), 100, 7, 4),
    case("far-clusters", far_clusters, 200, 7, 4),
    case("outlier", outlier, 150, 9, 4),
    case("mixed-density", mixed_density, 400, 9, 4),
    case("sparse-halo", sparse_halo, 300, 7, 4),
    # options
    case("sequential", lambda: jittered_scan(300, seed=10), 120, 7, 4, sequential=True),
    case("oversampling", lambda: square_grid(6), 120, 7, 4, enable_oversampling=True),
    case("oversampling-n<K", lambda: square_grid(2), 20, 9, 2, enable_oversampling=True),
    case("batch-rows-7", lambda: jittered_scan(300, seed=12), 200, 9, 4, batch_rows=7),
    case("C1", lambda: jittered_scan(100, seed=13), 50, 5, 1),
]
