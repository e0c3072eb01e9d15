"""What every backend is: an array namespace ``xp`` and a builder of candidate-kNN indexes.

The candidate-index contract (shared by every engine)::

    index = backend.build_index(x, y)     # x, y: xp float64 arrays of one point set
    index.n                               # number of points
    cand, floor = index.query(rows, kq)   # rows: xp int64 local point numbers, kq <= n
    # cand:  (len(rows), kq) xp int64, distinct point numbers (the engine's kq nearest)
    # floor: (len(rows),)    xp float64, every point NOT in cand[r] has exact
    #        float64 squared distance >= floor[r] to point rows[r]

    index.stacked                         # optional hint: True when some position holds
                                          # many points (queries of it would be as wide)
    index.locality_order(rows)            # optional hint: a permutation of rows that visits
                                          # them in a cache-friendly order (speed only)
    index.nearest_others(rows, width)     # optional fused path: None, or (ranked, done) with
                                          # ranked[done] the exact (d2, p) ranking of each
                                          # row's width - 1 nearest others (other rows query)

Engines only propose candidates; ``grouping.neighbour_pool`` re-ranks them exactly (and
takes rows on stacks of duplicates from the stack, with the same result, when ``stacked``
or its own probe says so). :func:`position_runs` is shared by the engines and the re-rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np


@dataclass(frozen=True)
class Backend:
    """An array namespace and a candidate-kNN index builder."""

    name: str
    xp: Any
    build_index: Callable[[Any, Any], Any]
    asnumpy: Callable[[Any], np.ndarray]
    description: str = ""
    #: Optional fused kernels for assembly (see ``gpu.AssemblyKernels``); None: plain xp.
    kernels: Any = None
    #: Host threads that may run independent blocks of rows at once (NumPy releases the GIL
    #: in its sorts and element-wise loops); 1 for device backends, whose work is queued.
    threads: int = 1


def position_runs(xp, x, y):
    """Points grouped by identical position: ``(order, start, count)``.

    ``order`` sorts the points by x, then y, then point number; the points at the j-th
    distinct position are ``order[start[j] : start[j] + count[j]]``, ascending.
    (-0.0 and 0.0 are one position, as their d2 is 0.)
    """
    n = int(x.shape[0])
    # The point number as the last key makes the order explicit, stable sort or not.
    order = xp.lexsort(xp.stack([xp.arange(n, dtype=xp.float64), y, x]))
    xs, ys = x[order], y[order]
    new = xp.ones(n, dtype=bool)
    new[1:] = (xs[1:] != xs[:-1]) | (ys[1:] != ys[:-1])
    start = xp.nonzero(new)[0]
    return order, start, xp.diff(xp.concatenate([start, xp.full(1, n, dtype=xp.int64)]))
