"""CPU backend: NumPy arrays and SciPy ``cKDTree`` candidates, built and queried on all cores.

A cKDTree is built by one thread. From 2**20 positions on a machine with several cores the
index is a forest instead: the positions are cut into slabs of about equal count along x,
each slab is found, copied and built into a tree in a thread of its own (SciPy releases the
GIL while building; nothing of O(n) runs serially), and a query
of a row asks the trees of the neighbouring slabs too whenever they could hold a point nearer
than its kq-th candidate. Rows are queried in the trees' leaf order (``locality_order``,
also used by ``grouping`` to order its batches): at n = 1e7 that alone makes the queries
about 4x faster than in seed order, which is random in space. ``BACKEND.threads`` (the
cores) lets ``grouping`` run its blocks of rows in threads; concurrent queries share the
cores. Candidates and floors obey the same contract either way, and the exact re-rank in
``grouping`` decides the groups, so they do not depend on the number of slabs or threads.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy.spatial import cKDTree

from gpugroup.backends.base import Backend

# cKDTree returns sqrt(sum of squares) in float64: a few ulp from the exact distance.
# Lowering the squared distance by 2**-40 (relative) covers that rounding with room.
_REL_SLACK = 1.0 - 2.0**-40
#: Candidates (rows x kq) from which a query is worth spreading over all cores.
_PARALLEL_MIN = 1 << 15
#: Positions from which the index is a forest of slab trees (with more than one core), and
#: the fewest positions per slab.
_FOREST_MIN = 1 << 20
_SLAB_MIN = 1 << 17
#: Sampled x values the slab cuts are quantiles of (only speed depends on them).
_CUT_SAMPLE = 1 << 16


def cpu_count() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


class KDTreeIndex:
    """Candidate index over one point set: a ``cKDTree``, or a forest of slab trees built in
    parallel (see the module docstring); built once and reused.

    Parameters
    ----------
    x, y : (n,) float64 arrays
    workers : int
        Threads for queries (-1: all cores) and for building the slab trees.
    slabs : int or None
        Number of slab trees; None picks one per core from 2**20 positions on (at least
        2**17 positions per slab), else 1. Only speed depends on it.

    Examples
    --------
    >>> import numpy as np
    >>> from gpugroup.backends.cpu import KDTreeIndex
    >>> yy, xx = np.divmod(np.arange(100.0), 10)
    >>> cand, floor = KDTreeIndex(xx, yy, slabs=3).query(np.array([55]), 5)
    >>> sorted(cand[0].tolist()), float(floor[0]) >= 0.99
    ([45, 54, 55, 56, 65], True)
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, workers: int = -1, slabs: int | None = None):
        self.n = n = int(x.shape[0])
        self.workers = workers
        self._x = np.asarray(x, dtype=np.float64)
        self._y = np.asarray(y, dtype=np.float64)
        self._threads = threads = cpu_count() if workers == -1 else max(1, int(workers))
        # Queries running at once (grouping may query from several threads): they share
        # the cores rather than each starting one worker per core.
        self._lock = threading.Lock()
        self._busy = 0
        if slabs is None:
            slabs = min(threads, n // _SLAB_MIN) if n >= _FOREST_MIN else 1
        slabs = max(1, min(int(slabs), n))
        pool = ThreadPoolExecutor(min(threads, slabs)) if slabs > 1 else None
        try:
            run = map if pool is None else pool.map
            members = _slab_members(self._x, slabs, run)
            # Slab s holds ranks bounds[s] .. bounds[s+1] - 1 of the forest's leaf order:
            # rows taken in this order query and re-rank memory that neighbouring rows have
            # just touched.
            self._bounds = bounds = np.concatenate([[0], np.cumsum([len(m) for m in members])])
            self._rank = np.empty(n, dtype=np.int64)

            def build(s):
                mem = members[s]
                xs = self._x[mem]
                tree = self._new_tree(np.column_stack([xs, self._y[mem]]))
                self._rank[mem[tree.indices]] = np.arange(bounds[s], bounds[s + 1])
                return tree, xs.min(), xs.max()

            built = list(run(build, range(len(members))))
        finally:
            if pool is not None:
                pool.shutdown()
        self._trees = [b[0] for b in built]
        self._members = members
        self._xmin = np.array([b[1] for b in built])
        self._xmax = np.array([b[2] for b in built])

    @staticmethod
    def _new_tree(points):
        """One slab's tree (its layout changes speed only: the tests vary it)."""
        return cKDTree(points, balanced_tree=False, compact_nodes=False)

    @property
    def slabs(self) -> int:
        return len(self._trees)

    def locality_order(self, rows: np.ndarray) -> np.ndarray:
        """A permutation of ``rows`` that visits them in the index's leaf order (an optional
        hint of the candidate-index contract: only speed depends on the order of rows, so the
        sort need not be stable, and NumPy's unstable one is about 3x faster)."""
        return np.argsort(self._rank[rows])

    def _query_slab(self, s: int, rows: np.ndarray, kq: int, workers: int):
        """(cand, dist) of ``rows`` in slab ``s`` as global point numbers, padded with -1 and
        inf past the slab's size."""
        members, tree = self._members[s], self._trees[s]
        k = min(kq, len(members))
        workers = workers if len(rows) * k >= _PARALLEL_MIN else 1
        points = np.column_stack([self._x[rows], self._y[rows]])
        dist, idx = tree.query(points, k=k, workers=workers)
        dist = dist.reshape(len(rows), k)
        cand = members[idx.reshape(len(rows), k)]
        if k < kq:
            cand = np.pad(cand, ((0, 0), (0, kq - k)), constant_values=-1)
            dist = np.pad(dist, ((0, 0), (0, kq - k)), constant_values=np.inf)
        return cand, dist

    def query(self, rows: np.ndarray, kq: int):
        """``(cand, floor)`` for local point numbers ``rows`` (see the module contract of
        :mod:`gpugroup.backends`)."""
        with self._lock:
            self._busy += 1
            workers = max(1, self._threads // self._busy)
        try:
            return self._query(np.asarray(rows, dtype=np.int64), int(kq), workers)
        finally:
            with self._lock:
                self._busy -= 1

    def _query(self, rows: np.ndarray, kq: int, workers: int):
        m = len(rows)
        cand = np.empty((m, kq), dtype=np.int64)
        dist = np.empty((m, kq), dtype=np.float64)
        # Slab by slab, in leaf order within each (cache-friendly: see locality_order).
        rank = self._rank[rows]
        # (only speed depends on this order; rows mostly arrive in leaf order already,
        # which the stable sort takes in one pass)
        order = np.argsort(rank, kind="stable")
        # ranks are slab-major: slab s holds ranks bounds[s] .. bounds[s+1] - 1
        bounds = np.searchsorted(rank[order], self._bounds)
        for s in range(self.slabs):
            sub = order[bounds[s] : bounds[s + 1]]
            if len(sub):
                cand[sub], dist[sub] = self._with_neighbour_slabs(s, rows[sub], kq, workers)
        last = dist[:, -1]
        return cand, last * last * _REL_SLACK

    def _with_neighbour_slabs(self, s: int, rows: np.ndarray, kq: int, workers: int):
        """The kq nearest of ``rows`` (all in slab ``s``) over the whole forest.

        The other slabs are visited outwards on each side while the gap in x to the next
        one is below the row's current kq-th distance: slabs are ordered by x, so every
        point of an unvisited slab is at least that gap away, no nearer than the kq-th; a
        visited slab's points left out are no nearer than its own kq-th, nor than the
        merged kq-th. So the merged kq-th distance bounds every point not returned.
        """
        cand, dist = self._query_slab(s, rows, kq, workers)
        qx = self._x[rows]
        for side in (-1, 1):
            active = np.arange(len(rows))
            t = s + side
            while len(active) and 0 <= t < self.slabs:
                q = qx[active]
                gap = q - self._xmax[t] if side < 0 else self._xmin[t] - q
                active = active[gap < dist[active, -1]]
                if not len(active):
                    break
                c2, d2 = self._query_slab(t, rows[active], kq, workers)
                both_d = np.concatenate([dist[active], d2], axis=1)
                both_c = np.concatenate([cand[active], c2], axis=1)
                best = np.argsort(both_d, axis=1, kind="stable")[:, :kq]
                dist[active] = np.take_along_axis(both_d, best, axis=1)
                cand[active] = np.take_along_axis(both_c, best, axis=1)
                t += side
        return cand, dist


def _slab_members(x, slabs: int, run=map) -> list:
    """The point numbers of each slab: ``slabs`` sets of about equal count, ordered along x
    (no x of a slab exceeds any x of the next), each found by ``run`` (a thread pool's
    ``map``) in one pass of its own over x, so that nothing of O(n) runs serially.

    The cuts are x quantiles of a sample; where equal x values crowd a cut (a slab over
    twice its share: scans along a line of constant x), the slabs are cut by count instead
    (an ``argpartition`` of x, serial).
    """
    n = int(x.shape[0])
    if slabs == 1:
        return [np.arange(n)]
    sample = x[np.random.default_rng(0).integers(0, n, size=min(n, _CUT_SAMPLE))]
    cuts = np.unique(np.quantile(sample, np.arange(1, slabs) / slabs))
    edges = [-np.inf, *cuts.tolist(), np.inf]

    def between(s):
        return np.flatnonzero((x >= edges[s]) & (x < edges[s + 1]))

    members = [m for m in run(between, range(len(edges) - 1)) if len(m)]
    if max(len(m) for m in members) <= 2 * n // slabs:
        return members
    bounds = [n * j // slabs for j in range(slabs + 1)]
    order = np.argpartition(x, bounds[1:-1])
    return [order[bounds[s] : bounds[s + 1]] for s in range(slabs)]


BACKEND = Backend(
    name="cpu",
    xp=np,
    build_index=KDTreeIndex,
    asnumpy=np.asarray,
    description="NumPy + SciPy cKDTree",
    threads=cpu_count(),
)
