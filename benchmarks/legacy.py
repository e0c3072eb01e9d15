"""Reimplementations of the *old* paths, for benchmark comparison only.

Never imported by ``gpugroup``. Written from descriptions of PtychoPINN's pre-gpugroup
``ptycho/raw_data.py`` behaviour (issue 4, seed-plan.md), not copied from it:

(a) :func:`group_then_sample` -- the old group-then-sample path: for *every* scan position
    find its K nearest positions (cKDTree, one query per position, as the old per-position
    loop did), draw C of them with a NumPy RNG, deduplicate the candidate groups with
    ``np.unique`` over sorted rows, cache them to ``<dataset>.groups_cache.npz`` and only
    then sample ``nsamples`` groups. The first run has no cache file.
(b) :func:`per_row_loop` -- a naive sample-then-group: draw the seeds, then a Python loop
    over seeds that queries the tree per seed, ranks the neighbours and picks C with the
    RNG, one row at a time.
(c) :func:`knn_floor` -- a bare ``cKDTree`` build plus one K-query for the seeds: the
    least work any sample-then-group needs on the CPU (the "kNN floor").
(d) :func:`assemble_legacy` -- the PtychoPINN-style assembly: gather
    ``diff3d[nn_indices]`` to (B, C, N, N), ``np.transpose`` + ``np.ascontiguousarray``
    to (B, N, N, C), then normalize through a float64 copy of the whole stack.
"""

from __future__ import annotations

import os

import numpy as np
from scipy.spatial import cKDTree


def _points(xcoords, ycoords):
    return np.column_stack([np.asarray(xcoords, np.float64), np.asarray(ycoords, np.float64)])


# ------------------------------------------------------------------------------ (a)
def find_all_valid_groups(xcoords, ycoords, K: int, C: int, rng, groups_per_position: int = 1):
    """Candidate groups for every position: C of its K nearest, deduplicated.

    Returns an int64 array (G, C) of sorted, unique rows.
    """
    points = _points(xcoords, ycoords)
    n = points.shape[0]
    k = min(K, n)
    tree = cKDTree(points)
    groups = []
    for i in range(n):  # the old path visited every position, one query at a time
        _, nn = tree.query(points[i], k=k)
        nn = np.atleast_1d(nn)
        for _ in range(groups_per_position):
            groups.append(rng.choice(nn, size=C, replace=False))
    groups = np.sort(np.asarray(groups, dtype=np.int64), axis=1)
    return np.unique(groups, axis=0)


def cache_path_for(dataset_path, K: int, C: int) -> str:
    """``<dataset>.K<K>.C<C>.groups_cache.npz`` (the old cache-file naming, simplified)."""
    root, _ = os.path.splitext(os.fspath(dataset_path))
    return f"{root}.K{K}.C{C}.groups_cache.npz"


def group_then_sample(xcoords, ycoords, nsamples: int, K: int, C: int, *, seed=0,
                      dataset_path=None, groups_per_position: int = 1):
    """The old path: all groups (or the cached ones), then ``nsamples`` of them.

    With ``dataset_path`` the candidate groups are loaded from / saved to
    :func:`cache_path_for` (delete that file to measure a first run).
    Returns (nsamples', C) int64 with nsamples' = min(nsamples, number of groups).
    """
    cache = None if dataset_path is None else cache_path_for(dataset_path, K, C)
    if cache is not None and os.path.exists(cache):
        with np.load(cache) as z:
            groups = z["groups"]
    else:
        groups = find_all_valid_groups(xcoords, ycoords, K, C, np.random.default_rng(seed),
                                       groups_per_position)
        if cache is not None:
            np.savez(cache, groups=groups)
    m = min(nsamples, groups.shape[0])
    rng = np.random.default_rng([seed, 1])  # own stream: cached and first runs agree
    pick = rng.choice(groups.shape[0], size=m, replace=False)
    return groups[pick]


# ------------------------------------------------------------------------------ (b)
def per_row_loop(xcoords, ycoords, nsamples: int, K: int, C: int, *, seed=0, limit_rows=None,
                 return_seeds: bool = False):
    """Sample seeds, then one Python iteration per seed: query, rank, pick C.

    ``limit_rows`` stops after that many rows (to time a subset of a huge run).
    """
    rng = np.random.default_rng(seed)
    points = _points(xcoords, ycoords)
    n = points.shape[0]
    k = min(K, n)
    tree = cKDTree(points)
    seeds = rng.choice(n, size=min(nsamples, n), replace=False)
    rows = seeds if limit_rows is None else seeds[:limit_rows]
    out = np.empty((rows.shape[0], C), dtype=np.int64)
    for r, s in enumerate(rows):
        d, nn = tree.query(points[s], k=k)
        nn = np.atleast_1d(nn)[np.argsort(np.atleast_1d(d), kind="stable")]
        out[r] = rng.choice(nn, size=C, replace=False)
    return (out, rows) if return_seeds else out


# ------------------------------------------------------------------------------ (c)
def knn_floor(xcoords, ycoords, seeds, K: int, workers: int = -1, fast_build: bool = False):
    """One ``cKDTree`` build and one K-query of ``seeds`` (all cores).

    The build uses SciPy's defaults, or with ``fast_build`` the options gpugroup's CPU
    backend uses (``balanced_tree=False, compact_nodes=False``: a faster build).
    """
    points = _points(xcoords, ycoords)
    tree = (cKDTree(points, balanced_tree=False, compact_nodes=False) if fast_build
            else cKDTree(points))
    _, nn = tree.query(points[seeds], k=min(K, points.shape[0]), workers=workers)
    return nn


# ------------------------------------------------------------------------------ (d)
def assemble_legacy(diff3d, nn_indices, N: int, xcoords=None, ycoords=None):
    """PtychoPINN-style channel-last assembly through a float64 copy.

    Returns a dict with ``diffraction`` (B, N, N, C) in the input dtype, ``X_full``
    float32 = diffraction * s with s = sqrt((N/2)**2 / mean_(B,C) sum_hw diff**2)
    computed from the float64 stack, ``norm_scale`` and (when coordinates are given)
    ``coords_nn``/``coords_offsets``/``coords_relative`` like DESIGN.md section 2.
    """
    nn = np.asarray(nn_indices)
    diff = diff3d[nn]                                            # (B, C, N, N) gather
    diff = np.ascontiguousarray(np.transpose(diff, (0, 2, 3, 1)))  # (B, N, N, C) copy
    d64 = diff.astype(np.float64)                                # float64 copy of the stack
    s = np.sqrt((N / 2) ** 2 / np.mean(np.sum(d64 ** 2, axis=(1, 2))))
    X_full = (d64 * s).astype(np.float32)
    del d64
    out = {"nn_indices": nn, "diffraction": diff, "X_full": X_full, "norm_scale": float(s)}
    if xcoords is not None:
        nn_xy = np.stack([np.asarray(xcoords)[nn], np.asarray(ycoords)[nn]], axis=1)[:, None]
        offsets = np.mean(nn_xy, axis=3, keepdims=True)
        out.update(coords_nn=nn_xy, coords_offsets=offsets, coords_relative=-(nn_xy - offsets))
    return out
