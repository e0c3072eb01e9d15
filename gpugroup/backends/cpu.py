"""CPU backend: NumPy arrays and SciPy ``cKDTree`` candidates, queried with all cores."""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from gpugroup.backends.base import Backend

# cKDTree returns sqrt(sum of squares) in float64: a few ulp from the exact distance.
# Lowering the squared distance by 2**-40 (relative) covers that rounding with room.
_REL_SLACK = 1.0 - 2.0**-40
#: Candidates (rows x kq) from which a query is worth spreading over all cores.
_PARALLEL_MIN = 1 << 15


class KDTreeIndex:
    """Candidate index over one point set (a ``cKDTree``, built once and reused)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, workers: int = -1):
        self.n = int(x.shape[0])
        self.workers = workers
        self._points = np.column_stack([x, y]).astype(np.float64, copy=False)
        self._tree = cKDTree(self._points, balanced_tree=False, compact_nodes=False)

    def query(self, rows: np.ndarray, kq: int):
        # Starting threads costs more than a small query: one worker below ~32k candidates.
        workers = self.workers if len(rows) * kq >= _PARALLEL_MIN else 1
        dist, cand = self._tree.query(self._points[rows], k=kq, workers=workers)
        dist = dist.reshape(len(rows), kq)
        cand = cand.reshape(len(rows), kq).astype(np.int64, copy=False)
        last = dist[:, -1]
        return cand, last * last * _REL_SLACK


BACKEND = Backend(
    name="cpu",
    xp=np,
    build_index=KDTreeIndex,
    asnumpy=np.asarray,
    description="NumPy + SciPy cKDTree",
)
