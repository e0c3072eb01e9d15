"""Candidate-kNN engines written once against an array namespace ``xp`` (NumPy or CuPy).

:class:`GridIndex` is the CuPy-native exact engine (a uniform cell grid); :class:`NeighborsIndex`
adapts any ``NearestNeighbors`` class with scikit-learn's API (cuML on the GPU) and turns its
float32 distances into a rigorous ``floor``. Both satisfy the contract of
:mod:`gpugroup.backends`; neither imports CuPy or cuML (the caller passes ``xp`` and the class).
"""

from __future__ import annotations

import logging
import math

import numpy as np

from gpugroup.backends.base import position_runs

logger = logging.getLogger(__name__)

#: Unit roundoff of IEEE float32 (round to nearest).
U32 = 2.0**-24
#: Relative slack taken off every floor: covers the rounding of the float64 d2 that
#: ``grouping`` computes (<= 5 * 2**-53) and of the floor arithmetic itself, with room.
_FLOOR_SLACK = 1.0 - 2.0**-40
_F32_MAX = float(np.finfo(np.float32).max)
_F32_TINY = float(np.finfo(np.float32).tiny)
_NO_KEY = 0xFFFFFFFF


# ============================================================================= grid engine
def _query_args(xp, rows, kq, n):
    """(rows as int64, len(rows), kq) after checking 1 <= kq <= n."""
    rows = xp.asarray(rows, dtype=xp.int64)
    kq = int(kq)
    if not 1 <= kq <= n:
        raise ValueError(f"kq must be in [1, n={n}], got kq={kq}")
    return rows, int(rows.shape[0]), kq


#: Each finer level of the grid has cells this many times smaller per side.
_LEVEL_STEP = 4
#: At most this many levels built up front (finer than the first) and in all (a density
#: range of 4**22 per unit area).
_MAX_FINER = 8
_MAX_LEVELS = 12
#: A level keeps a row only while its block radius stays below this many cells (or twice
#: the level's density estimate for kq, when larger); rows that need more go up a level.
_LEVEL_RADIUS = 4
#: Rows that no level serves within that radius build a coarser level only when there are
#: more of them than this (and their whole-grid blocks would pass ``max_slots``).
_FEW_ROWS = 64
#: A position holding this many points makes the index ``stacked`` (see GridIndex).
_STACKED = 32


#: The grid's box leaves out up to n/1024 (at least one) extreme values on a side when
#: they stretch that axis more than this many times: far outliers or sentinel values would
#: otherwise squeeze the whole scan into a few cells (cells are at least span/2**30).
_OUTLIER_STRETCH = 2.0**16
#: Largest |cell coordinate| kept (beyond it, u is cut: see _Level.locate).
_U_MAX = 2.0**62


def _box_side(xp, a):
    """``(lo, hi)`` of the grid box along one axis: the range of ``a`` without far outliers.

    Values outside it are kept, in the border cells; only speed depends on the box.
    """
    n = int(a.shape[0])
    lo, hi = float(a.min()), float(a.max())
    t = max(1, n >> 10)
    if n <= 2 * t + 1:
        return lo, hi
    inner_lo = float(xp.partition(a, t)[t])
    inner_hi = float(xp.partition(a, n - 1 - t)[n - 1 - t])
    inner = inner_hi - inner_lo
    if lo < inner_lo and inner_lo - lo > _OUTLIER_STRETCH * inner:
        lo = inner_lo
    if inner_hi < hi and hi - inner_hi > _OUTLIER_STRETCH * inner:
        hi = inner_hi
    return lo, hi


class GridIndex:
    """Exact candidates from a pyramid of uniform cell grids over float64 coordinates.

    Build: the first level has square cells of side ``h`` over the box of the positions
    (far outliers left out: see :func:`_box_side`; they sit in the border cells), ``h``
    chosen for about ``points_per_cell`` points per occupied cell (refined from the
    measured occupancy of distinct positions, so far-apart scans get cells of their own
    density and duplicates do not drive the cells to zero size). While the cell of a
    typical point (mean over points) still holds more than ``4 * points_per_cell``
    distinct positions, a finer level with cells ``1/4`` the side is added, up to 8:
    scans whose density varies (a fine scan inside a coarse overview) get small cells
    where they are dense and large ones where they are sparse. Uniform scans have one
    level. Where many rows find too few points within a few cells of every level, a
    coarser level (cells 4x the side) is built at query time and kept; a few such rows
    (at most 64: outliers) are served by the coarsest level instead. Each level sorts the
    points by cell id (one ``argsort``); runs of cells are found in a dense table of cell
    starts when the level has at most ``2 n + 16`` cells, else by ``searchsorted`` in the
    sorted ids, so memory is at most ``48 n`` bytes per level whatever the bounding box.

    Query: a row starts at the finest level and takes the square block of
    ``(2R + 1)^2`` cells around its own cell, R the smallest radius (doubling from a
    density estimate) whose block holds ``kq + 1`` points; a row whose R would pass
    ``max(4, 2 R0 + 1)`` (R0 the level's estimate) goes up a level, and the coarsest level
    takes every row left. A block is ``2R + 1`` runs of consecutive cells, each a contiguous
    range of the sorted points; members get d2 from separate float64 operations and the
    ``kq`` smallest per row are picked by one flat sort on
    ``(row << 32) | float32-rounded-down d2``. ``floor`` is the smaller of

    * the squared distance from the point to its block's nearest edge that has cells
      beyond it, lowered by a slack covering the rounding of the cell arithmetic, and
    * the float32-rounded-down d2 of the best block member not returned.

    Both hold at whichever level serves the row, so the level changes speed, never results.

    Memory per query: rows run in chunks of at most ``max_slots`` (row, block member)
    slots and ``max_slots`` (row, run) pairs, about 100 bytes per slot at peak, so
    ``100 * max_slots`` bytes (default 2**22 slots: ~420 MB) beyond the index, or one
    row's block when a single block is larger. No per-row Python loops: loops run over
    levels, radius doublings and chunks.

    Parameters
    ----------
    x, y : (n,) xp float64 arrays
    xp : module
        ``numpy`` or ``cupy``.
    points_per_cell : float
        Target occupancy of a cell.
    max_slots : int
        Bound on (rows x block size) per chunk.
    pool_kernel : :class:`gpugroup.backends.fused_pool.FusedPool` or None
        A compiled fused pool (the GPU's ``fused`` engine): :meth:`nearest_others` then
        serves what rows it can in one kernel per level.

    Examples
    --------
    >>> import numpy as np
    >>> from gpugroup.backends.engines import GridIndex
    >>> yy, xx = np.divmod(np.arange(100.0), 10)
    >>> cand, floor = GridIndex(xx, yy, xp=np).query(np.array([55]), 5)
    >>> sorted(cand[0].tolist()), float(floor[0]) >= 1.0
    ([45, 54, 55, 56, 65], True)
    """

    def __init__(self, x, y, *, xp, points_per_cell: float = 2.0, max_slots: int = 1 << 22,
                 pool_kernel=None):
        self.xp = xp
        self.pool_kernel = pool_kernel
        self.x = xp.asarray(x, dtype=xp.float64)
        self.y = xp.asarray(y, dtype=xp.float64)
        self.n = n = int(self.x.shape[0])
        if n < 1 or self.y.shape != self.x.shape:
            raise ValueError(f"GridIndex needs two equal-length non-empty 1-D arrays, got "
                             f"shapes {self.x.shape} and {self.y.shape}")
        self.max_slots = int(max_slots)
        (x0, xmax), (y0, ymax) = _box_side(xp, self.x), _box_side(xp, self.y)
        self.box = (x0, xmax, y0, ymax)
        self.origin = (x0, y0)
        self.extent = wx, wy = (xmax - x0, ymax - y0)
        # Cells per axis stay below 2**30, so cell ids (cy * gx + cx) fit in int64.
        h_min = max(wx, wy) * 2.0**-30
        if wx > 0 and wy > 0:
            h = math.sqrt(wx * wy * points_per_cell / n)
        else:
            h = max(wx, wy) * points_per_cell / n
        h = max(h, h_min)
        if not h > 0 or not math.isfinite(1.0 / h):
            h = 1.0  # every point at one position: one cell
        first = None  # one point of each distinct position, found when first needed
        #: Some position holds >= 32 points (seen only where cells crowd): neighbour_pool
        #: then settles rows on such stacks without querying them.
        self.stacked = False

        def distinct():
            nonlocal first
            if first is None:
                order, start, count = position_runs(xp, self.x, self.y)
                first = xp.zeros(n, dtype=bool)
                first[order[start]] = True
                self.stacked = int(count.max()) >= _STACKED
            return first

        previous = None
        for _ in range(16):  # uniform scans stop after the first pass
            level = _Level(self, h)
            if level.per_cell > 2 * points_per_cell and h > h_min:
                # Crowded cells: far-apart scans (cells too coarse) or duplicates (which
                # no cell size splits): refine on distinct positions per cell.
                crowd = int(distinct().sum()) / level.occupied
                if crowd > 2 * points_per_cell:
                    stuck = previous is not None and crowd > 0.9 * previous
                    shrink = points_per_cell / crowd
                    h = max(h * (shrink if stuck else math.sqrt(shrink)), h_min)
                    previous = crowd
                    continue
            elif level.per_cell < points_per_cell / 4 and (level.gx > 1 or level.gy > 1):
                h = h * math.sqrt(points_per_cell / level.per_cell)  # thin strip: coarser
                previous = None
                continue
            break
        levels = [level]
        # Finer levels while the cell of a typical point holds many distinct positions
        # (duplicates, which no cell size splits, do not count).
        if level.crowding() > 4 * points_per_cell:
            while len(levels) < _MAX_FINER and level.crowding(distinct()) > 4 * points_per_cell:
                if level.h <= h_min:
                    logger.warning(
                        "GridIndex: the positions span %g but crowd %.0f distinct positions "
                        "into a cell of side %g, the finest a grid over that span can have: "
                        "far outliers or sentinel values among the positions? Grouping with "
                        "the grid engine will be slow; drop those positions or use "
                        "backend='cpu'", max(wx, wy), level.crowding(first), level.h)
                    break
                level = _Level(self, max(level.h / _LEVEL_STEP, h_min))
                levels.append(level)
        self.levels = levels[::-1]  # finest first; query() may append coarser ones
        self.per_cell = levels[0].per_cell
        logger.debug("GridIndex: n=%d, levels (cells, side, points per occupied cell): %s", n,
                     ", ".join(f"{lv.gx}x{lv.gy} {lv.h:g} {lv.per_cell:.2f}"
                               for lv in self.levels))

    # ------------------------------------------------------------------ query
    def query(self, rows, kq: int):
        """``(cand, floor)`` for local point numbers ``rows`` (see the module contract)."""
        xp = self.xp
        rows, m, kq = _query_args(xp, rows, kq, self.n)
        cand = xp.empty((m, kq), dtype=xp.int64)
        floor = xp.empty(m, dtype=xp.float64)
        need = min(kq + 1, self.n)
        qx, qy = self.x[rows], self.y[rows]
        beside = self._beside(qx, qy)
        todo = xp.nonzero(~beside)[0]
        if int(todo.shape[0]) < m:
            # Outside the box on one axis only: block edges along the other axis bound
            # nothing (other outliers may lie beyond them), so such rows take the whole
            # grid at once rather than after every radius and kq doubling.
            b = xp.nonzero(beside)[0]
            top = self.levels[-1]
            full = xp.full(int(b.shape[0]), top.gmax, dtype=xp.int64)
            self._serve(top, b, rows, full, xp.full_like(full, self.n), kq, cand, floor)
        i = 0
        while int(todo.shape[0]):
            if i == len(self.levels):  # rows too sparse for every level so far
                self.levels.append(_Level(self, self.levels[-1].h * _LEVEL_STEP))
                logger.debug("GridIndex: coarser level %d x %d for %d rows",
                             self.levels[-1].gx, self.levels[-1].gy, int(todo.shape[0]))
            level = self.levels[i]
            _, _, cx, cy = level.locate(self.x[rows[todo]], self.y[rows[todo]])
            R, cnt = level.radius(cx, cy, need, kq, capped=True)
            up = xp.nonzero(R < 0)[0]
            e = int(up.shape[0])
            last = i + 1 == len(self.levels)
            if e and last and (e <= _FEW_ROWS or e * self.n <= self.max_slots
                               or len(self.levels) >= _MAX_LEVELS):
                # A few outliers: served here (at worst the whole grid each) rather than by
                # another level of n points, which would not shrink a far outlier's block.
                R[up], cnt[up] = level.radius(cx[up], cy[up], need, kq, capped=False)
                up = up[:0]
            here = xp.nonzero(R >= 0)[0]
            self._serve(level, todo[here], rows, R[here], cnt[here], kq, cand, floor)
            todo = todo[up]
            i += 1
        return cand, floor

    def nearest_others(self, rows, width: int):
        """``(ranked, done)`` from the fused pool kernel, or None without one (or for a
        pool wider than it keeps): ranked (m, width - 1) int64, the exact ``(d2, p)``
        ranking of the ``width - 1`` nearest other points where ``done``, undefined
        elsewhere (those rows take :meth:`query` and the exact re-rank).

        Each level serves the rows the finer ones left, rows sorted by cell so that
        neighbouring threads read neighbouring cells; rows outside the box on one axis only
        are left to :meth:`query` (their blocks would grow to the grid).
        """
        kernel, W = self.pool_kernel, width - 1
        if kernel is None or not 1 <= W <= kernel.max_others:
            return None
        xp = self.xp
        rows = xp.asarray(rows, dtype=xp.int64)
        m = int(rows.shape[0])
        ranked = xp.empty((m, W), dtype=xp.int64)
        done = xp.zeros(m, dtype=bool)
        qx, qy = self.x[rows], self.y[rows]
        todo = xp.nonzero(~self._beside(qx, qy))[0]
        for level in self.levels:
            if not int(todo.shape[0]):
                break
            _, _, cx, cy = level.locate(qx[todo], qy[todo])
            todo = todo[xp.argsort(cy * level.gx + cx, kind="stable")]
            R0 = min(level._initial_radius(W), level.gmax)
            kernel(level, qx[todo], qy[todo], rows[todo], todo, ranked, done, R0,
                   max(_LEVEL_RADIUS, 2 * R0 + 1))
            todo = todo[~done[todo]]
        return ranked, done

    def _beside(self, qx, qy):
        """Points outside the grid's box on one axis only."""
        x0, x1, y0, y1 = self.box
        return ((qx < x0) | (qx > x1)) != ((qy < y0) | (qy > y1))

    def _serve(self, level, idx, rows, R, cnt, kq: int, cand, floor):
        """Candidates and floors of ``rows[idx]`` from ``level``, blocks of radius R holding
        cnt points, in chunks; written into ``cand`` and ``floor`` at ``idx``."""
        xp = self.xp
        qx, qy = self.x[rows[idx]], self.y[rows[idx]]
        ux, uy, cx, cy = level.locate(qx, qy)
        cost = xp.maximum(cnt, xp.where(R >= level.gmax, 1, xp.minimum(2 * R + 1, level.gy)))
        for p in self._chunks(cost):
            c, f = level.select(qx[p], qy[p], ux[p], uy[p], cx[p], cy[p], R[p], kq)
            cand[idx[p]] = c
            floor[idx[p]] = f

    def _chunks(self, cost):
        """Row subsets, by increasing cost, each with (rows x largest cost) <= max_slots and
        its largest cost at most 4x its smallest (bounded padding) unless all fit at once."""
        xp = self.xp
        m = int(cost.shape[0])
        if not m:
            return
        top = int(cost.max())
        if m * top <= self.max_slots and m * top <= 4 * int(cost.sum()):
            yield xp.arange(m, dtype=xp.int64)
            return
        order = xp.argsort(cost, kind="stable")
        c = getattr(xp, "asnumpy", np.asarray)(cost[order]).astype(np.int64)  # to the host
        i = 0
        while i < m:
            f = (np.arange(i + 1, m + 1) - i) * c[i:]  # rows x largest cost, non-decreasing
            j = min(i + max(1, int(np.searchsorted(f, self.max_slots, side="right"))),
                    i + int(np.searchsorted(c[i:], 4 * c[i], side="right")))
            yield order[i:j]
            i = j


class _Level:
    """One uniform grid of a :class:`GridIndex`: cells of side ``h``, points sorted by cell."""

    def __init__(self, index: GridIndex, h: float):
        xp = self.xp = index.xp
        self.n = n = index.n
        self.h = h
        self.inv_h = inv_h = 1.0 / h
        self.x0, self.y0 = index.origin
        wx, wy = index.extent
        self.gx = gx = int(math.floor(wx * inv_h)) + 1
        self.gy = gy = int(math.floor(wy * inv_h)) + 1
        self.gmax = max(gx, gy)
        # Points and queries get their cells from the same arithmetic (locate).
        _, _, cx, cy = self.locate(index.x, index.y)
        cells = cy * gx + cx
        del cx, cy
        self.perm = order = xp.argsort(cells, kind="stable").astype(xp.int64)
        self.cells = cells = cells[order]
        starts, counts = self._occupied_cells()
        self.occupied = int(starts.shape[0])
        #: Mean points per occupied cell.
        self.per_cell = n / self.occupied
        # Where the grid is small enough (uniform scans), a dense table of cell starts
        # replaces the binary searches: start of cell c = cell_start[c].
        self.cell_start = None
        if gx * gy <= 2 * n + 16:
            full = xp.zeros(gx * gy, dtype=xp.int64)
            full[cells[starts]] = counts
            self.cell_start = xp.concatenate(
                [xp.zeros(1, dtype=xp.int64), xp.cumsum(full, dtype=xp.int64)])
        self.xs = index.x[order]
        self.ys = index.y[order]
        #: A power of two that brings squared distances of a few cells near 1 before their
        #: float32 sort keys are taken: keys of far smaller or larger d2 (positions in
        #: units of 1e-20 or 1e21) would all round to 0 or saturate, and tie. Exact: the
        #: keys only order candidates and give floors, divided back by the same power.
        self.key_scale = 2.0 ** max(-1000, min(1000, -2 * math.frexp(h)[1]))
        self.key_cap = _F32_MAX / self.key_scale  # (d2 beyond it: the largest key, no
        # float64 overflow in the product)

    def _occupied_cells(self):
        """Start (in the sorted points) and point count of each occupied cell."""
        xp = self.xp
        starts = xp.concatenate([xp.zeros(1, dtype=xp.int64),
                                 xp.nonzero(self.cells[1:] != self.cells[:-1])[0] + 1])
        return starts, xp.diff(xp.concatenate([starts, xp.full(1, self.n, dtype=xp.int64)]))

    def crowding(self, first=None) -> float:
        """Points (or, given ``first``, distinct positions) in the cell of a typical point:
        the mean over points of their cell's count."""
        xp = self.xp
        starts, counts = self._occupied_cells()
        if first is None:
            inside = counts
        else:
            seen = xp.cumsum(first[self.perm], dtype=xp.int64)
            inside = seen[starts + counts - 1] - xp.where(starts > 0, seen[starts - 1], 0)
        return float((counts * inside).sum()) / self.n

    def locate(self, qx, qy):
        """Cell coordinates ``(ux, uy)`` and cells ``(cx, cy)`` of points: u = (x - x0) *
        inv_h, each a separately rounded operation (the floor's slack covers their error)."""
        xp = self.xp
        with np.errstate(over="ignore"):  # far outside a tiny box u may overflow (NumPy)
            ux = (qx - self.x0) * self.inv_h
            uy = (qy - self.y0) * self.inv_h
        # |u| beyond 2**62 is cut to 2**62: still past every cell, so the edge floor,
        # which only gets smaller, stays a bound (see _edge_floor).
        ux = xp.clip(ux, -_U_MAX, _U_MAX)
        uy = xp.clip(uy, -_U_MAX, _U_MAX)
        # Clip before the cast: points far outside the box must not overflow int64.
        cx = xp.floor(xp.clip(ux, 0, self.gx - 1)).astype(xp.int64)
        cy = xp.floor(xp.clip(uy, 0, self.gy - 1)).astype(xp.int64)
        return ux, uy, cx, cy

    def _initial_radius(self, kq: int) -> int:
        # A disc of radius R cells around the point holds about pi R^2 per_cell points.
        return max(1, math.ceil(math.sqrt((kq + 1) / (math.pi * self.per_cell))))

    def _runs(self, cx, cy, R):
        """Start, length (m, S) of the block's runs of cells in the sorted points.

        A row with R >= gmax covers the grid: one run, all n points.
        """
        xp = self.xp
        full = (R >= self.gmax)[:, None]
        j0 = xp.maximum(cy - R, 0)
        nseg = xp.where(full[:, 0], 1, xp.minimum(cy + R, self.gy - 1) - j0 + 1)
        S = int(nseg.max())
        s = xp.arange(S, dtype=xp.int64)[None, :]
        row_id = xp.minimum(j0[:, None] + s, self.gy - 1) * self.gx  # past nseg: masked below
        lo = row_id + xp.maximum(cx - R, 0)[:, None]
        hi = row_id + xp.minimum(cx + R, self.gx - 1)[:, None]
        if self.cell_start is not None:
            start = self.cell_start[lo]
            end = self.cell_start[hi + 1]
        else:
            start = xp.searchsorted(self.cells, lo.ravel(), side="left").reshape(lo.shape)
            end = xp.searchsorted(self.cells, hi.ravel(), side="right").reshape(hi.shape)
        start = xp.where(full, 0, start)
        end = xp.where(full, self.n, end)
        length = xp.where(s < nseg[:, None], end - start, 0)
        return start, length

    def radius(self, cx, cy, need: int, kq: int, capped: bool):
        """Per-row radius whose block holds >= need points; and the block counts.

        Radii double; past ``max(64, n / 8)`` cell rows a row takes the whole grid (one
        run of n points is cheaper than that many runs). ``capped``: a row whose radius
        would pass ``max(4, 2 R0 + 1)`` gets R = -1 (it belongs to a coarser level).
        """
        xp = self.xp
        m = int(cx.shape[0])
        R0 = min(self._initial_radius(kq), self.gmax)
        cap = max(_LEVEL_RADIUS, 2 * R0 + 1) if capped else None
        R = xp.full(m, R0, dtype=xp.int64)
        cnt = xp.zeros(m, dtype=xp.int64)
        short = xp.arange(m, dtype=xp.int64)
        too_far = max(64, self.n // 8)
        while int(short.shape[0]):  # a second pass is rare: edges, holes, outliers
            cnt[short] = self._runs(cx[short], cy[short], R[short])[1].sum(axis=1)
            short = short[cnt[short] < need]
            if not int(short.shape[0]):
                break
            grown = 2 * R[short] + 1
            if cap is not None:
                R[short] = xp.where(grown > cap, -1, grown)
                short = short[grown <= cap]
            else:
                R[short] = xp.where(2 * grown + 1 > too_far, self.gmax,
                                    xp.minimum(grown, self.gmax))
        return R, cnt

    def select(self, qx, qy, ux, uy, cx, cy, R, kq: int):
        """Candidates and floors for one chunk of rows (all arrays of length m)."""
        xp = self.xp
        m = int(qx.shape[0])
        if bool((R >= self.gmax).all()):
            return self._select_whole(qx, qy, kq)
        start, length = self._runs(cx, cy, R)
        S = int(start.shape[1])
        ends = xp.cumsum(length, axis=1)
        cnt = ends[:, -1]
        T = int(cnt.max())
        # Slot t of row r lies in the first run whose cumulative end exceeds t: one
        # searchsorted over all rows, each row offset by r * (T + 1).
        stride = T + 1
        r_off = xp.arange(m, dtype=xp.int64)[:, None]
        t = xp.arange(T, dtype=xp.int64)[None, :]
        seg = xp.searchsorted((ends + r_off * stride).ravel(), (r_off * stride + t).ravel(),
                              side="right").reshape(m, T) - r_off * S
        seg = xp.minimum(seg, S - 1)
        valid = t < cnt[:, None]
        pos = (xp.take_along_axis(start, seg, axis=1) + t
               - (xp.take_along_axis(ends, seg, axis=1) - xp.take_along_axis(length, seg, axis=1)))
        pos = xp.where(valid, pos, 0)
        del seg, start, length, ends
        dx = self.xs[pos] - qx[:, None]
        dy = self.ys[pos] - qy[:, None]
        d2 = dx * dx
        d2 += dy * dy  # separately rounded products and sum, as grouping computes d2
        del dx, dy
        low = _low_float32(xp, xp.minimum(d2, self.key_cap) * self.key_scale)
        del d2
        bits = xp.where(valid, low.view(xp.uint32).astype(xp.uint64), xp.uint64(_NO_KEY))
        key = (r_off.astype(xp.uint64) << xp.uint64(32)) | bits
        del bits, valid
        order = xp.argsort(key.ravel(), kind="stable").reshape(m, T) - r_off * T
        del key
        top = order[:, : min(kq + 1, T)]
        cand = self.perm[xp.take_along_axis(pos, top[:, :kq], axis=1)]
        if T > kq:
            nxt = xp.take_along_axis(low, top[:, kq : kq + 1], axis=1)[:, 0].astype(xp.float64)
            block_floor = xp.where(cnt > kq, nxt / self.key_scale, xp.inf)
        else:
            block_floor = xp.full(m, xp.inf)
        return cand, xp.minimum(block_floor, self._edge_floor(ux, uy, cx, cy, R))

    def _select_whole(self, qx, qy, kq: int):
        """Rows whose block is the whole grid: ranked by exact float64 d2, so the floor is
        the exact (kq+1)-th d2 (float32 keys cannot part the nearly equal distances of a
        far outlier to a whole scan)."""
        xp = self.xp
        dx = self.xs[None, :] - qx[:, None]
        dy = self.ys[None, :] - qy[:, None]
        d2 = dx * dx
        d2 += dy * dy  # separately rounded products and sum, as grouping computes d2
        del dx, dy
        m = int(qx.shape[0])
        if self.n == kq:  # every point is a candidate
            return xp.broadcast_to(self.perm, (m, kq)).copy(), xp.full(m, xp.inf)
        # The kq smallest first, the (kq+1)-th at column kq, the rest no smaller.
        order = xp.argpartition(d2, kq, axis=1)
        return (self.perm[order[:, :kq]],
                xp.take_along_axis(d2, order[:, kq : kq + 1], axis=1)[:, 0])

    def _edge_floor(self, ux, uy, cx, cy, R):
        """Lower bound on the float64 d2 from the point to any point outside its block.

        A point in a cell column <= c - 1 has computed u < c (points left of the box sit
        in column 0 with u < 0), so its exact scaled coordinate is below c + 2**-51 c (two
        roundings); the query's is above u_q - 2**-51 |u_q|; the subtraction u_q - c adds
        2**-53 (|u_q| + c). With c <= gmax the slack 2**-46 (|u_q| + gmax + R + 2) covers
        the sum sixteen times over. A query whose u was cut to +-2**62 lies farther out,
        so its gaps only shrink. Edges at the grid border have nothing beyond them: points
        outside the box sit in its border cells.
        """
        xp = self.xp
        inf = xp.inf
        left = xp.where(cx - R > 0, ux - (cx - R), inf)
        right = xp.where(cx + R < self.gx - 1, (cx + R + 1) - ux, inf)
        down = xp.where(cy - R > 0, uy - (cy - R), inf)
        up = xp.where(cy + R < self.gy - 1, (cy + R + 1) - uy, inf)
        g = xp.minimum(xp.minimum(left, right), xp.minimum(down, up))
        reach = xp.maximum(xp.abs(ux), xp.abs(uy)) + (self.gmax + R + 2)
        g = xp.maximum(g - 2.0**-46 * reach, 0.0)
        gap = g / self.inv_h
        return gap * gap * _FLOOR_SLACK


def _low_float32(xp, d2):
    """float32 values <= d2 (rounded down, nearly monotone): the sort keys of the block."""
    low = xp.minimum(d2 * (1.0 - 2.0**-23), _F32_MAX).astype(xp.float32)
    # Below float32's normal range the cast rounds by an absolute step; use 0 there.
    return xp.where(d2 < 2.0 * _F32_TINY, xp.float32(0.0), low)


# ============================================================================= adapter
#: Bound on |computed - exact| squared distance of a float32 kNN library, in units of
#: (|q| + R_max)^2: 4 u32 for the expanded formula (see NeighborsIndex), times 8.
EXPANDED_ERROR = 32 * U32
#: Floors below this are 0: float64 is subnormal below 2**-1022 and a floor there could
#: exceed a rounded d2 by an absolute step that no relative slack covers.
_SUBNORMAL_SAFE = 2.0**-1000


#: cuVS's random ball cover (cuML's ``rbc``) selects neighbours only for k <= 1024: both
#: query passes dispatch on k up to 1024 and do nothing above it, leaving every index at
#: INT64_MAX (cuML itself checks only k <= sqrt(n)).
RBC_MAX_K = 1024


def cuml_algorithm(kq: int, n: int) -> str:
    """cuML's algorithm for 2-D points: ``"rbc"`` while kq <= 1024 and kq * kq <= n, else
    ``"brute"``.

    cuML's random ball cover handles 2-D and 3-D Euclidean data. It falls back to brute
    force itself (with a warning) when ``n_neighbors > sqrt(n_samples)``, but returns no
    neighbours at all (INT64_MAX indices) for ``n_neighbors > 1024`` (:data:`RBC_MAX_K`),
    which a widened kq reaches once n >= 1024**2; both cases go to ``brute`` here.

    Examples
    --------
    >>> cuml_algorithm(16, 10**6), cuml_algorithm(2048, 10**7), cuml_algorithm(11, 100)
    ('rbc', 'brute', 'brute')
    """
    return "rbc" if kq <= RBC_MAX_K and kq * kq <= n else "brute"


class NeighborsIndex:
    """Candidates from a ``NearestNeighbors`` class with scikit-learn's API (cuML on the GPU).

    Coordinates are centred in float64 on the midrange of the bounding box, then cast to
    float32 for the library (cuML computes in float32). Queries run in batches of
    ``batch_rows`` seeds: the adapter holds ``batch_rows * kq * 12`` bytes of library
    output per batch plus its (m, kq) results; the library's own workspace is bounded by
    its tiling.

    The floor (a lower bound on the exact float64 d2 of every point not returned),
    derived for a library that ranks by float32 expanded distances
    ``|a|^2 + |b|^2 - 2 a.b`` on float32 inputs (u = 2**-24):

    1. *Expanded formula.* With exact float32 inputs a (query) and b, each of |a|^2, |b|^2,
       a.b carries error <= gamma_2 = 2u/(1-2u) times |a|^2, |b|^2, |a||b|, and the
       two additions add <= u (|a| + |b|)^2 each, so
       ``|s_hat - |a - b|^2| <= 4u (|a| + |b|)^2 (1 + O(u)) <= 4u (|q| + R_max)^2``
       with R_max the largest float32 point norm. The adapter uses
       ``E = 32 u (|q| + R_max)^2``: 8x headroom for evaluation order, FMA, and the
       float32 triangle-inequality pruning of cuML's ``rbc``.
    2. *Returned set, not returned distances.* The library returns the kq points of
       smallest s_hat (or of smallest float32 ``sqrt(s_hat)``, which may merge values
       within a factor ``1 - 4u``). Its distances are not used: their form (distance or
       squared, as cuML has returned for ``"euclidean"`` in some releases) cannot bend
       the bound. With ``c`` the returned point of largest exact float32-geometry d2
       ``s_c`` (computed in float64), every non-returned point p has
       ``s_hat(p) >= s_hat(c) (1 - 4u) >= (s_c - E_c)(1 - 4u)``, where ``E_c`` is E with
       c's own norm in place of R_max, and so ``sigma^2 >= s_c (1 - 4u) - E_c - E``.
    3. *Coordinate rounding.* Each centred coordinate moves by at most
       ``delta = (2**-24 + 2**-52) A + 2**-149`` (A the largest |centred coordinate|),
       a difference vector by at most ``2 sqrt(2) delta < 3 delta``, so the float64
       distance is ``>= sigma - 3 delta``.
    4. ``floor = max(0, sigma_lo - 3 delta)^2 (1 - 2**-40)``; the last factor covers the
       rounding of the float64 d2 that ``grouping`` compares against it. A floor below
       2**-1000 (where d2 is subnormal and rounds by absolute steps) is 0.

    The bound assumes IEEE float32 arithmetic (no TF32 tensor-core math). A scan whose
    extent is large next to its spacing gets a loose floor and the completeness guard
    widens kq; results stay exact. Rows whose returned indices are out of range or
    repeated are re-served by the exact :class:`GridIndex` (logged as a warning).

    Parameters
    ----------
    x, y : (n,) xp float64 arrays
    xp : module
        ``numpy`` or ``cupy`` (the library must accept and return this namespace's arrays,
        or arrays ``xp.asarray`` converts).
    nn_class : type
        ``cuml.neighbors.NearestNeighbors``, or ``sklearn.neighbors.NearestNeighbors``.
    algorithm : str or callable(kq, n) -> str
        Passed to the class; :func:`cuml_algorithm` for cuML.
    metric : {"euclidean", "sqeuclidean"}
        Passed to the library (both rank alike); its distances are never read.
        ``"sqeuclidean"`` only with a fixed algorithm other than ``"rbc"``: cuML's ``fit``
        rejects it for ``rbc``, and a callable ``algorithm`` may choose ``rbc``.
    batch_rows : int
        Seeds per library call.
    model_kwargs : dict, optional
        More keyword arguments for the class, e.g. ``{"output_type": "cupy"}`` for cuML
        (so results come back as CuPy arrays whatever ``cuml.global_settings`` says).

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.neighbors import NearestNeighbors
    >>> from gpugroup.backends.engines import NeighborsIndex
    >>> yy, xx = np.divmod(np.arange(100.0), 10)
    >>> index = NeighborsIndex(xx + 1e5, yy, xp=np, nn_class=NearestNeighbors)
    >>> cand, floor = index.query(np.array([55]), 5)
    >>> sorted(cand[0].tolist()), 0.99 < float(floor[0]) <= 1.0
    ([45, 54, 55, 56, 65], True)
    """

    def __init__(self, x, y, *, xp, nn_class, algorithm="brute", metric: str = "euclidean",
                 batch_rows: int = 1 << 16, model_kwargs: dict | None = None):
        if metric not in ("euclidean", "sqeuclidean"):
            raise ValueError(f"metric must be 'euclidean' or 'sqeuclidean', got {metric!r}")
        if metric == "sqeuclidean" and (callable(algorithm) or algorithm == "rbc"):
            raise ValueError(
                f"metric='sqeuclidean' cannot be used where algorithm 'rbc' can be chosen "
                f"(got algorithm={getattr(algorithm, '__name__', algorithm)!r}): cuML's rbc "
                f"accepts only 'euclidean' (and haversine). Use metric='euclidean' (it ranks "
                f"alike) or a fixed algorithm='brute'")
        self.model_kwargs = dict(model_kwargs or {})
        self.xp = xp
        self.x = xp.asarray(x, dtype=xp.float64)
        self.y = xp.asarray(y, dtype=xp.float64)
        self.n = int(self.x.shape[0])
        self.nn_class = nn_class
        self.algorithm = algorithm
        self.metric = metric
        self.batch_rows = int(batch_rows)
        xmin, xmax, ymin, ymax = xp.stack(
            [self.x.min(), self.x.max(), self.y.min(), self.y.max()]).tolist()
        self.centre = (0.5 * xmin + 0.5 * xmax, 0.5 * ymin + 0.5 * ymax)
        xc = self.x - self.centre[0]
        yc = self.y - self.centre[1]
        A = float(xp.maximum(xp.abs(xc).max(), xp.abs(yc).max()))
        # Divide by an exact power of two so |coordinate| <= 1: float32 (and its expanded
        # squared distances) cannot overflow, and the floor scales back exactly.
        self.unit = math.ldexp(1.0, math.frexp(A)[1]) if A > 0 else 1.0
        xc = xc / self.unit
        yc = yc / self.unit
        A = A / self.unit
        self.points32 = xp.ascontiguousarray(xp.stack([xc, yc], axis=1).astype(xp.float32))
        del xc, yc
        p = self.points32.astype(xp.float64)
        norms = xp.sqrt(p[:, 0] * p[:, 0] + p[:, 1] * p[:, 1])
        self.r_max = float(norms.max()) * (1.0 + 2.0**-50)
        self.coord_error = 3.0 * ((2.0**-24 + 2.0**-52) * A + 2.0**-149) * (1.0 + 2.0**-40)
        self._models: dict[str, object] = {}
        self._exact = None

    def _model(self, algorithm: str):
        if algorithm not in self._models:
            logger.debug("NeighborsIndex: fitting %s(algorithm=%r) on %d points",
                         getattr(self.nn_class, "__name__", self.nn_class), algorithm, self.n)
            model = self.nn_class(algorithm=algorithm, metric=self.metric, **self.model_kwargs)
            self._models[algorithm] = model.fit(self.points32)
        return self._models[algorithm]

    def query(self, rows, kq: int):
        """``(cand, floor)`` for local point numbers ``rows`` (see the module contract)."""
        xp = self.xp
        rows, m, kq = _query_args(xp, rows, kq, self.n)
        algorithm = self.algorithm(kq, self.n) if callable(self.algorithm) else self.algorithm
        model = self._model(algorithm)
        cand = xp.empty((m, kq), dtype=xp.int64)
        floor = xp.empty(m, dtype=xp.float64)
        for b in range(0, m, self.batch_rows):
            q = self.points32[rows[b : b + self.batch_rows]]
            ind = xp.asarray(model.kneighbors(q, n_neighbors=kq, return_distance=False))
            cand[b : b + q.shape[0]] = ind.astype(xp.int64)
            floor[b : b + q.shape[0]] = self._floor(q, cand[b : b + q.shape[0]])
        bad = _invalid_rows(xp, cand, self.n)
        if bool(bad.any()):
            idx = xp.nonzero(bad)[0]
            logger.warning("NeighborsIndex: %s returned out-of-range or repeated indices for %d "
                           "rows (kq=%d); serving them with the exact grid engine",
                           algorithm, int(idx.shape[0]), kq)
            if self._exact is None:
                self._exact = GridIndex(self.x, self.y, xp=xp)
            cand[idx], floor[idx] = self._exact.query(rows[idx], kq)
        return cand, floor

    def _floor(self, q32, cand):
        """Floors of one batch: queries ``q32`` (float32, unit-scaled), the library's
        candidates ``cand`` (valid indices; see the class docstring, steps 2-4)."""
        xp = self.xp
        q = q32.astype(xp.float64)
        c = self.points32[xp.clip(cand, 0, self.n - 1)].astype(xp.float64)
        dx = c[:, :, 0] - q[:, 0:1]
        dy = c[:, :, 1] - q[:, 1:2]
        d2 = dx * dx + dy * dy
        far = xp.argmax(d2, axis=1)[:, None]  # the farthest candidate, c
        s_c = xp.take_along_axis(d2, far, axis=1)[:, 0] * ((1.0 - 4 * U32) * (1.0 - 2.0**-50))
        c = xp.take_along_axis(c, far[:, :, None], axis=1)[:, 0]

        def norm(a):
            return xp.sqrt(a[:, 0] * a[:, 0] + a[:, 1] * a[:, 1]) * (1.0 + 2.0**-50)

        qn = norm(q)
        bound = EXPANDED_ERROR * (1.0 + 2.0**-40)
        a, b = qn + norm(c), qn + self.r_max
        err = (a * a + b * b) * bound  # E_c + E (products, not pow: the same bits on a GPU)
        sigma = xp.sqrt(xp.maximum(s_c - err, 0.0)) * (1.0 - 2.0**-50)
        d = xp.maximum(sigma - self.coord_error, 0.0)
        floor = (d * d * _FLOOR_SLACK) * (self.unit * self.unit)
        # Not finite: no bound (the guard widens kq); subnormal: rounding is absolute there.
        return xp.where(xp.isfinite(floor) & (floor >= _SUBNORMAL_SAFE), floor, 0.0)


def _invalid_rows(xp, cand, n: int):
    """Rows of ``cand`` with an index outside [0, n) or a repeated index."""
    m, k = cand.shape
    bad = ((cand < 0) | (cand >= n)).any(axis=1)
    if k > 1 and m:
        flat = (xp.arange(m, dtype=xp.int64)[:, None] * n + xp.clip(cand, 0, n - 1)).ravel()
        flat = xp.sort(flat)
        rep = flat[1:] == flat[:-1]
        bad[flat[1:][rep] // n] = True
    return bad
