"""The pools of DESIGN.md 3.2 in one kernel per cell grid: the grid engine's fused path.

:class:`GridIndex` (``pool_kernel=``) hands each row to ``nearest_others<W>``, one thread
per row, which does in registers what the generic path does in a dozen array passes
(block runs, float32 sort keys, the exact re-rank): it walks the square block of
``(2R + 1)^2`` cells around the row's cell, computes every member's float64 d2 with
separately rounded operations (compiled with ``--fmad=false``, as DESIGN.md section 4
asks of any custom kernel), keeps the ``W`` smallest ``(d2, p)`` other than the row itself
by insertion, and calls the row done when the ``W``-th is strictly below the block's
edge floor (the same bound as ``_Level._edge_floor``: every point outside the block has
d2 at least that). Otherwise R grows (``2R + 1``) up to the level's cap, as the generic
query's does; rows still not done (sparse regions, far outliers, stacks of duplicates, a
block of more than ``max_points`` points) are left to the generic path, which gives the
same pools for every row it serves. So the kernel changes speed, never results: a pool it
returns is the exact ``(d2, p)`` ranking over the block, and nothing outside the block
can enter it.

The source is plain C++ with a few CUDA words (``__global__``, ``blockIdx``); the tests
compile it as host C++ too (``tests/hostcuda.py``), run every thread in a loop and
compare the pools with the CPU backend's, so that the logic is checked in CI, where no
GPU is. Nothing here imports CuPy: :mod:`gpugroup.backends.gpu` hands :class:`FusedPool`
a compiler (NVRTC through ``cupy.RawModule``).
"""

from __future__ import annotations

import numpy as np

#: Longest pool (K - 1 others) the kernel keeps in registers; wider pools take the generic
#: path. Compiled per W and cell table (one NVRTC compile each, cached).
MAX_OTHERS = 32
#: Threads per block of the launch.
THREADS = 128
#: Options for NVRTC (and for ``nvcc`` in the tests): no FMA contraction.
NVRTC_OPTIONS = ("--std=c++17", "--fmad=false")

SOURCE = r"""
// Pools of gpugroup's DESIGN.md 3.2, one thread per row; see gpugroup/backends/fused_pool.py.
#ifndef GG_HOST
#define GG_INF __longlong_as_double(0x7ff0000000000000LL)
#endif
typedef long long gg_i64;

// (d, p) before (e, q) in the pool's order: by d2, ties by point number.
__device__ __forceinline__ bool gg_before(double d, gg_i64 p, double e, gg_i64 q) {
    return d < e || (d == e && p < q);
}

// Squared distance from (ux, uy) to the nearest edge of the block that has cells beyond
// it, in coordinates, lowered by the slack of _Level._edge_floor (same operations).
__device__ __forceinline__ double gg_edge_floor(double ux, double uy, gg_i64 cx, gg_i64 cy,
                                                gg_i64 R, gg_i64 gx, gg_i64 gy, double inv_h) {
    double g = GG_INF;
    if (cx - R > 0) g = fmin(g, ux - (double)(cx - R));
    if (cx + R < gx - 1) g = fmin(g, (double)(cx + R + 1) - ux);
    if (cy - R > 0) g = fmin(g, uy - (double)(cy - R));
    if (cy + R < gy - 1) g = fmin(g, (double)(cy + R + 1) - uy);
    if (g == GG_INF) return GG_INF;  // the block covers the grid
    const gg_i64 gmax = gx > gy ? gx : gy;
    const double reach = fmax(fabs(ux), fabs(uy)) + (double)(gmax + R + 2);
    g = fmax(g - 1.4210854715202004e-14 * reach, 0.0);  // 2**-46
    const double gap = g / inv_h;
    return gap * gap * 0.9999999999990905;  // 1 - 2**-40
}

// First sorted point of the cells >= c: table[c] (DENSE: the cell starts, gx * gy + 1 of
// them) or the first of the n sorted cell ids that is >= c (a binary search).
template <bool DENSE>
__device__ __forceinline__ gg_i64 gg_first(const gg_i64* table, gg_i64 n, gg_i64 c) {
    if (DENSE) return table[c];
    gg_i64 lo = 0, hi = n;
    while (lo < hi) {
        const gg_i64 mid = lo + (hi - lo) / 2;
        if (table[mid] < c) lo = mid + 1; else hi = mid;
    }
    return lo;
}

// Thread t: out[r] = the W nearest others of point rows[t] at (qx[t], qy[t]), ranked by
// (d2, p), and ok[r] = 1, r = dest[t]; or ok[r] = 0 (out[r] as it was) when no block of
// radius <= cap proves them.
// The grid: n points sorted by cell (xs, ys, perm), cell c = cy * gx + cx; cells of side
// 1 / inv_h from (x0, y0); table as gg_first reads it.
template <int W, bool DENSE>
__global__ void nearest_others(const double* __restrict__ xs, const double* __restrict__ ys,
                               const gg_i64* __restrict__ perm,
                               const gg_i64* __restrict__ table, gg_i64 n,
                               const double* __restrict__ qxs, const double* __restrict__ qys,
                               const gg_i64* __restrict__ rows,
                               const gg_i64* __restrict__ dest, gg_i64 m, double x0, double y0,
                               double inv_h, gg_i64 gx, gg_i64 gy, gg_i64 R0, gg_i64 cap,
                               gg_i64 max_points, gg_i64* __restrict__ out,
                               bool* __restrict__ ok) {
    const gg_i64 t = (gg_i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= m) return;
    const double qx = qxs[t], qy = qys[t];
    const gg_i64 self = rows[t], r = dest[t];
    // The cell as _Level.locate finds it (u cut to +-2**62, then clipped into the grid).
    const double u_max = 4611686018427387904.0;  // 2**62
    const double ux = fmin(fmax((qx - x0) * inv_h, -u_max), u_max);
    const double uy = fmin(fmax((qy - y0) * inv_h, -u_max), u_max);
    const gg_i64 cx = (gg_i64)floor(fmin(fmax(ux, 0.0), (double)(gx - 1)));
    const gg_i64 cy = (gg_i64)floor(fmin(fmax(uy, 0.0), (double)(gy - 1)));
    for (gg_i64 R = R0; R <= cap; R = 2 * R + 1) {
        const gg_i64 i0 = cx - R > 0 ? cx - R : 0;
        const gg_i64 i1 = cx + R < gx - 1 ? cx + R : gx - 1;
        const gg_i64 j0 = cy - R > 0 ? cy - R : 0;
        const gg_i64 j1 = cy + R < gy - 1 ? cy + R : gy - 1;
        gg_i64 total = 0;
        for (gg_i64 j = j0; j <= j1; ++j)
            total += gg_first<DENSE>(table, n, j * gx + i1 + 1)
                     - gg_first<DENSE>(table, n, j * gx + i0);
        if (total > max_points) break;
        if (total <= W) continue;  // the row itself and fewer than W others
        double d[W];
        gg_i64 p[W];
#pragma unroll
        for (int i = 0; i < W; ++i) {
            d[i] = GG_INF;
            p[i] = 0x7fffffffffffffffLL;
        }
        for (gg_i64 j = j0; j <= j1; ++j) {
            const gg_i64 end = gg_first<DENSE>(table, n, j * gx + i1 + 1);
            for (gg_i64 k = gg_first<DENSE>(table, n, j * gx + i0); k < end; ++k) {
                const gg_i64 q = perm[k];
                if (q == self) continue;
                const double dx = xs[k] - qx;
                const double dy = ys[k] - qy;
                double d2 = dx * dx;
                d2 = d2 + dy * dy;  // two rounded products, one rounded sum (no FMA)
                if (!gg_before(d2, q, d[W - 1], p[W - 1])) continue;
                d[W - 1] = d2;
                p[W - 1] = q;
#pragma unroll
                for (int i = W - 1; i > 0; --i) {  // insertion: static indices, registers
                    if (gg_before(d[i], p[i], d[i - 1], p[i - 1])) {
                        const double td = d[i]; d[i] = d[i - 1]; d[i - 1] = td;
                        const gg_i64 tp = p[i]; p[i] = p[i - 1]; p[i - 1] = tp;
                    }
                }
            }
        }
        if (d[W - 1] < gg_edge_floor(ux, uy, cx, cy, R, gx, gy, inv_h)) {
#pragma unroll
            for (int i = 0; i < W; ++i) out[r * W + i] = p[i];
            ok[r] = true;
            return;
        }
    }
    ok[r] = false;
}
"""


class FusedPool:
    """Launcher of ``nearest_others<W>`` on one level of a :class:`GridIndex`.

    Parameters
    ----------
    xp : module
        The array namespace of the index (CuPy; NumPy or the devicelike stand-in in tests).
    compile : callable
        ``compile(name)`` -> a function called as ``f((blocks,), (threads,), args)`` with
        the kernel's arguments in order (a ``cupy.RawKernel``); called once per W.
    max_points : int
        Most points a row's block may hold (beyond it the row takes the generic path):
        bounds each thread's work where duplicates stack up.
    """

    max_others = MAX_OTHERS

    def __init__(self, xp, compile, max_points: int = 4096):
        self.xp = xp
        self._compile = compile
        self.max_points = int(max_points)
        self._functions = {}

    def _function(self, W: int, dense: bool):
        name = f"nearest_others<{W}, {str(dense).lower()}>"
        if name not in self._functions:
            self._functions[name] = self._compile(name)
        return self._functions[name]

    def __call__(self, level, qx, qy, rows, dest, ranked, ok, R0: int, cap: int):
        """Pools of the points ``rows`` at ``(qx, qy)`` on ``level`` (a ``_Level``), row t
        written to ``ranked[dest[t]]`` (an (M, W) int64 array) with ``ok[dest[t]] = True``
        where proven; rows not proven leave ``ranked`` and set ``ok`` False there."""
        xp = self.xp
        W = int(ranked.shape[1])
        if not 1 <= W <= MAX_OTHERS:
            raise ValueError(f"W must be in [1, {MAX_OTHERS}], got W={W}")
        m = int(rows.shape[0])
        if m:
            dense = level.cell_start is not None
            args = (level.xs, level.ys, level.perm,
                    level.cell_start if dense else level.cells, np.int64(level.n),
                    *(xp.ascontiguousarray(a, dtype=t) for a, t in
                      ((qx, xp.float64), (qy, xp.float64), (rows, xp.int64), (dest, xp.int64))),
                    np.int64(m), np.float64(level.x0), np.float64(level.y0),
                    np.float64(level.inv_h), np.int64(level.gx), np.int64(level.gy),
                    np.int64(R0), np.int64(cap), np.int64(self.max_points), ranked, ok)
            self._function(W, dense)(((m + THREADS - 1) // THREADS,), (THREADS,), args)
