"""The canonical sample-then-group algorithm of DESIGN.md section 3, written once against ``xp``.

``sample_seeds`` (3.1) -> ``neighbour_pool`` (3.2) -> ``select_members`` (3.3, 3.4), tied
together by :func:`sample_groups`. Every step is a pure function of (coordinates, nsamples,
K, C, seed, options): no library RNG, exact float64 re-ranking with stable sorts, and
per-row work only, so batch sizes, kNN engines and tree layouts cannot change a group.
"""

from __future__ import annotations

import hashlib
import logging
import math
import numbers
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from gpugroup import keys
from gpugroup._xp import is_device_array, to_host
from gpugroup.backends import get_backend
from gpugroup.backends.base import position_runs
from gpugroup.schema import index_dtype

logger = logging.getLogger(__name__)

#: Rows handled per batch (bounds the (rows, kq) candidate arrays; no effect on results).
DEFAULT_BATCH_ROWS = 1 << 16
#: Largest (rows x kq) candidate block while widening kq for incomplete rows.
_MAX_BLOCK = 1 << 23
#: Pool entries per member-selection block (its transients take ~40 bytes per entry).
_SELECT_BLOCK = 1 << 20
#: Rows per call of an engine's fused pool path (its output: 8 (K - 1) bytes a row).
_FUSED_ROWS = 1 << 20
#: Coordinate dtypes a device namespace holds (bool, integers, float16/32/64); others
#: (long double, timedelta) are cast to float64 on the host first.
_DEVICE_DTYPES = "?bhilqBHILQefd"
#: Positions per block of seed keys when several threads compute them.
_KEY_BLOCK = 1 << 20
#: Largest coordinate span: squared differences must stay finite in float64.
_MAX_SPAN = 1e150
#: Coordinates spanning less than this are scaled up by a power of two before grouping:
#: their squared differences would underflow (to subnormals, then to 0, so that far
#: positions tie with near ones). See :func:`exact_rescale`.
_MIN_SPAN = 2.0**-256
#: Most groups one call may ask for (oversampling; beyond any memory).
_MAX_GROUPS = 1 << 40
#: Oversampled repeats of one seed walk at most this many distinct combinations.
_COMB_CAP = (1 << 31) - 1
#: Most positions on a device: CuPy's scatter kernels take 32-bit axis sizes.
_DEVICE_MAX_N = 1 << 31


def check_count(name: str, value, minimum: int) -> int:
    """``value`` as an int >= ``minimum``, else a ValueError naming ``name`` and the value."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {name}={value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {name}={value}")
    return int(value)


def check_bytes(name: str, value):
    """A memory budget: None (the default) or a whole number >= 1 of bytes (``64e6`` too),
    as an int, else a ValueError naming ``name`` and the value."""
    whole = isinstance(value, numbers.Integral) or (isinstance(value, numbers.Real)
                                                    and float(value).is_integer())
    if value is not None and (isinstance(value, (bool, np.bool_)) or not whole or value < 1):
        raise ValueError(f"{name} must be a positive int (bytes) or None for the default, "
                         f"got {name}={value!r}")
    return None if value is None else int(value)


# --------------------------------------------------------------------------- 3.1 seeds
def sample_seeds(xp, n: int, m: int, seed: int, sequential: bool = False, threads: int = 1):
    """The first ``m`` positions in seed order (DESIGN.md 3.1).

    Positions are ordered by ``(key(stream(seed, 1), i), i)``; ``sequential`` gives
    ``0..m-1``. Returns an int64 array of length ``m``. The keys are computed in blocks on
    up to ``threads`` host threads (NumPy only; the same keys).
    """
    if sequential:
        return xp.arange(m, dtype=xp.int64)
    s = keys.stream(seed, keys.SEED_STREAM)
    if threads > 1 and n > _KEY_BLOCK:
        k = xp.empty(n, dtype=xp.uint64)

        def block(a):
            k[a : a + _KEY_BLOCK] = keys.key(xp, s, xp.arange(a, min(n, a + _KEY_BLOCK),
                                                              dtype=xp.int64))

        run_blocks(block, range(0, n, _KEY_BLOCK), threads)
    else:
        k = keys.key(xp, s, xp.arange(n, dtype=xp.int64))
    if m < n:
        # Keep only keys <= the m-th smallest, then order those.
        kth = xp.partition(k, m - 1)[m - 1]
        small = xp.nonzero(k <= kth)[0]
        k = k[small]
    else:
        small = None
    # The keys are distinct (key(s, .) is injective: i -> s + (i+1)*G is, G odd, and mix is
    # a bijection), so every sort orders them alike and NumPy may take its faster unstable
    # one (kind=None; CuPy's is stable): at n = 1e7 a third of the serial time.
    order = xp.argsort(k)
    return (order if small is None else small[order[:m]]).astype(xp.int64)


# --------------------------------------------------------------------------- 3.2 pools
#: Rows used to pick the first kq (only speed depends on it, never the result).
_PROBE_ROWS = 1024


def _starting_kq(xp, x, y, rows, width: int, index):
    """``(kq, stacked)``: the smallest kq (width + 1, doubling) that completes 90% of a probe
    of rows, and whether 1% of the probe or more sit on stacks of duplicates (their
    ``width - 1`` nearest others all at their own position). No probe for a few rows.

    Jittered scans complete at width + 1; raster grids need their tie shell. Probing once
    saves querying every row twice. Only speed depends on the answer, never the groups.
    """
    kq = min(index.n, width + 1)
    if int(rows.shape[0]) <= _PROBE_ROWS:  # a probe would be the whole query again
        return kq, False
    probe = rows[:_PROBE_ROWS]
    ranked, complete = _rerank(xp, x, y, probe, width, kq, index)
    if float(_on_own_position(xp, x, y, probe, ranked).mean()) >= 0.01:
        return kq, True
    # Past 64 width, per-row widening is cheaper than probing on.
    while float(complete.mean()) < 0.9 and kq < min(index.n, 64 * width):
        kq = min(index.n, 2 * kq)
        probe = rows[: max(1, min(_PROBE_ROWS, _MAX_BLOCK // kq))]
        _, complete = _rerank(xp, x, y, probe, width, kq, index)
    return kq, False


def run_blocks(fn, starts, threads: int = 1):
    """``fn(start)`` for every start, in up to ``threads`` host threads (in order on one).

    Callers hand it blocks of independent rows that write disjoint outputs, so neither the
    thread count nor the order in which blocks finish can change a result.
    """
    starts = list(starts)
    if threads <= 1 or len(starts) <= 1:
        for start in starts:
            fn(start)
        return
    with ThreadPoolExecutor(min(threads, len(starts))) as pool:
        for _ in pool.map(fn, starts):  # re-raises the first error
            pass


def neighbour_pool(xp, x, y, seeds, K: int, index, batch_rows: int = DEFAULT_BATCH_ROWS,
                   threads: int = 1):
    """Pools of DESIGN.md 3.2 for local seed positions ``seeds`` of one point set.

    Returns an int64 array (len(seeds), min(K, n)): column 0 is the seed, then its
    ``min(K, n) - 1`` nearest other positions ranked by exact float64 ``(d2, p)`` with
    ``d2 = dx*dx + dy*dy`` (separately rounded element-wise operations). Batches of
    ``batch_rows`` seeds run in up to ``threads`` host threads (NumPy only).
    """
    n = int(x.shape[0])
    width = min(K, n)
    out = xp.empty((int(seeds.shape[0]), width), dtype=xp.int64)
    out[:, 0] = seeds
    if width == 1:
        return out
    stacks = _Stacks(xp, x, y)
    rest = xp.arange(int(seeds.shape[0]), dtype=xp.int64)

    def settle_stacked_rows(rest):
        done, pools = stacks.pools(seeds[rest], width)
        out[rest[done], 1:] = pools
        return rest[~done]

    # Positions repeated so often that every query of them would be as wide as the repeat
    # (the engine says so, or the probe finds them): their rows settle before querying.
    if getattr(index, "stacked", False):
        rest = settle_stacked_rows(rest)
    rest = _fused_rows(xp, index, seeds, rest, width, out)
    kq, stacked = _starting_kq(xp, x, y, seeds[rest], width, index)
    if stacked:
        rest = settle_stacked_rows(rest)
    # Rows in the engine's locality order, when it has one (after the probe, which wants
    # rows from all over the scan): every row's pool is its own, so only speed changes.
    locality = getattr(index, "locality_order", None)
    if locality is not None and int(rest.shape[0]) > 1:
        rest = rest[locality(seeds[rest])]

    def batch(start):
        part = rest[start : start + batch_rows]
        out[part, 1:] = _nearest_others(xp, x, y, seeds[part], width, index, kq, stacks)

    run_blocks(batch, range(0, int(rest.shape[0]), batch_rows), threads)
    return out


def _fused_rows(xp, index, seeds, rest, width: int, out):
    """Pools of the rows ``rest`` that the engine's fused path serves, written into
    ``out``, in blocks of ``_FUSED_ROWS``; returns the rows left (all of them when the
    engine has no fused path, or none for this width)."""
    fused = getattr(index, "nearest_others", None)
    left = []
    for start in range(0, int(rest.shape[0]) if fused is not None else 0, _FUSED_ROWS):
        part = rest[start : start + _FUSED_ROWS]
        got = fused(seeds[part], width)
        if got is None:  # decided by width alone: the first block
            return rest
        ranked, done = got
        out[part[done], 1:] = ranked[done]
        left.append(part[~done])
    return xp.concatenate(left) if left else rest


def _nearest_others(xp, x, y, rows, width: int, index, kq: int, stacks=None):
    """The ``width - 1`` nearest other positions of each row, exactly ranked."""
    n = index.n
    result = xp.empty((int(rows.shape[0]), width - 1), dtype=xp.int64)
    todo = xp.arange(int(rows.shape[0]), dtype=xp.int64)
    stacked = False  # an incomplete row was seen sitting on a stack
    while int(todo.shape[0]):
        if stacks is not None and (stacked or kq > max(_STACK_KQ, 4 * width)):
            # Rows on a stack of >= width duplicates (whose d2 = 0 ties no kq short of the
            # stack's size settles) take it directly; once.
            done, pools = stacks.pools(rows[todo], width)
            result[todo[done]] = pools
            todo, stacks = todo[~done], None
            if not int(todo.shape[0]):
                break
        block = max(1, _MAX_BLOCK // kq)
        still = []
        for b in range(0, int(todo.shape[0]), block):
            sub = todo[b : b + block]
            ranked, complete = _rerank(xp, x, y, rows[sub], width, kq, index)
            if kq >= n:
                complete[:] = True
            result[sub[complete]] = ranked[complete]
            if stacks is not None and not stacked:
                on_stack = _on_own_position(xp, x, y, rows[sub], ranked) & ~complete
                stacked = bool(on_stack.any())
            still.append(sub[~complete])
        todo = xp.concatenate(still)
        if int(todo.shape[0]):
            logger.debug("completeness guard: widening kq %d -> %d for %d rows",
                         kq, min(n, 2 * kq), int(todo.shape[0]))
        kq = min(n, 2 * kq)
    return result


#: Rows still incomplete that sit on a stack of duplicates take their pool from it (see
#: _Stacks) as soon as one is seen there, or at the latest past this kq (and 4 width).
_STACK_KQ = 256
#: Distinct coordinate values at least this far apart have d2 > 0 in float64 (2**-1000 is
#: a normal number), so "d2 == 0" means "same position".
_NO_UNDERFLOW = 2.0**-500


class _Stacks:
    """Points grouped by identical position, built on first use (duplicate-heavy scans only).

    A row whose position holds at least ``width`` points has a pool of exact d2 = 0 ties:
    the ``width - 1`` lowest-numbered other points there, since nothing is nearer and
    (d2, p) breaks the ties by p. That holds when no two distinct positions have a d2 that
    underflows to 0, which the first :meth:`pools` checks (distinct x values, and y values,
    at least 2**-500 apart); otherwise it leaves every row to the completeness guard.
    """

    def __init__(self, xp, x, y):
        self.xp, self.x, self.y = xp, x, y
        self._built = None

    def _build(self):
        xp, x, y = self.xp, self.x, self.y
        gaps = xp.concatenate([xp.diff(xp.sort(x)), xp.diff(xp.sort(y))])
        if float(xp.where(gaps > 0, gaps, xp.inf).min()) < _NO_UNDERFLOW:  # n >= 2
            return None
        order, start, count = position_runs(xp, x, y)
        n = int(x.shape[0])
        step = xp.zeros(n, dtype=xp.int64)
        step[start[1:]] = 1
        stack_of = xp.empty(n, dtype=xp.int64)
        stack_of[order] = xp.cumsum(step)  # stack number of each point
        return order, start, count, stack_of

    def pools(self, rows, width: int):
        """(done, pools): rows on a stack of >= width points, and their width - 1 others."""
        xp = self.xp
        if self._built is None:
            self._built = self._build() or ()
        if not self._built:
            return xp.zeros(int(rows.shape[0]), dtype=bool), xp.empty((0, width - 1), xp.int64)
        order, start, count, stack_of = self._built
        g = stack_of[rows]
        done = count[g] >= width
        r, g = rows[done], g[done]
        first = order[start[g][:, None] + xp.arange(width, dtype=xp.int64)[None, :]]
        # The row is among its stack's first `width` or not; either way drop it, keep order.
        is_row = (first == r[:, None]).astype(xp.int32)
        drop = xp.argsort(is_row, axis=1, kind="stable")[:, : width - 1]
        return done, xp.take_along_axis(first, drop, axis=1)


def _on_own_position(xp, x, y, rows, ranked):
    """Rows whose ranked others (nearest first) all sit at the row's own position."""
    far = ranked[:, -1]
    return (x[far] == x[rows]) & (y[far] == y[rows])


def _rerank(xp, x, y, rows, width: int, kq: int, index):
    """Exact (d2, p) re-rank of the engine's candidates; returns (ranked, complete)."""
    cand, floor = index.query(rows, kq)
    cand = xp.sort(cand, axis=1)  # ascending p, so the stable sort below breaks ties by p
    dx = x[cand] - x[rows][:, None]
    dy = y[cand] - y[rows][:, None]
    d2 = dx * dx
    d2 += dy * dy  # two separately rounded products, then one rounded sum: no FMA
    d2[cand == rows[:, None]] = xp.inf  # the seed itself is not its own neighbour
    order = xp.argsort(d2, axis=1, kind="stable")[:, : width - 1]
    ranked = xp.take_along_axis(cand, order, axis=1)
    kth = xp.take_along_axis(d2, order[:, -1:], axis=1)[:, 0]
    return ranked, kth < floor


# --------------------------------------------------------------------------- 3.3 members
def select_members(xp, pool, pool_len, rows, C: int, seed: int, repeat=None):
    """Members of DESIGN.md 3.3: the C pool entries with the smallest ``(key(t, p), p)``.

    Parameters
    ----------
    pool : (B, P) int64, the pools, padded on the right past ``pool_len``
    pool_len : (B,) int64, the real length of each pool (>= C)
    rows : (B,) int64, the row number whose ``t = key(stream(seed, 2), row)`` ranks the pool
    repeat : (B,) int64 or None, oversampling repeat number r of the row's seed (3.4):
        repeat r takes combination number ``(r * a) mod M`` (M = comb(pool_len, C), capped,
        a coprime to M) of the key-ranked pool in colex order, so r = 0 is the plain 3.3
        choice and repeats r < M of one seed get distinct member sets.
    """
    P = int(pool.shape[1])
    t = keys.key(xp, keys.stream(seed, keys.MEMBER_STREAM), rows)
    k = keys.key(xp, t[:, None], xp.maximum(pool, 0))
    valid = xp.arange(P, dtype=xp.int64)[None, :] < pool_len[:, None]
    # Padding sits right of every real entry, so with a stable sort it stays behind even a
    # real key equal to the largest uint64.
    k = xp.where(valid, k, xp.uint64(keys.MASK64))
    ranked = xp.take_along_axis(pool, xp.argsort(k, axis=1, kind="stable"), axis=1)
    if repeat is None:
        return ranked[:, :C]
    return xp.take_along_axis(ranked, _combination_positions(xp, pool_len, repeat, C, P), axis=1)


def _coprime_step(M: int) -> int:
    """A step near M/phi coprime to M (so r -> r*a mod M is a bijection of 0..M-1)."""
    if M <= 1:
        return 0
    a = max(1, round(M * 0.6180339887498949))
    while math.gcd(a, M) != 1:
        a += 1
    return a


def _combination_positions(xp, pool_len, repeat, C: int, P: int):
    """Ascending positions (B, C) in the ranked pool of combination (r * a) mod M."""
    tab = np.array([[min(math.comb(c, i), _COMB_CAP) for i in range(C + 1)] for c in range(P + 1)],
                   dtype=np.int64)
    M_of_len = tab[:, C]
    step_of_len = np.array([_coprime_step(int(M)) for M in M_of_len], dtype=np.int64)
    M = xp.asarray(M_of_len)[pool_len]
    step = xp.asarray(step_of_len)[pool_len]
    rem = ((repeat % M) * step) % M
    tab_x = xp.asarray(tab[:P])
    pos = xp.empty((int(pool_len.shape[0]), C), dtype=xp.int64)
    for i in range(C, 0, -1):  # combinatorial number system, greedy from the top
        col = tab_x[:, i]
        c_i = (col[None, :] <= rem[:, None]).sum(axis=1) - 1
        pos[:, i - 1] = c_i
        rem = rem - col[c_i]
    return pos


# --------------------------------------------------------------------------- together
@dataclass(frozen=True)
class SamplingOptions:
    """The options of one sampling (DESIGN.md section 3), checked once when made: counts
    are ints >= 1, K >= C, and ``seed`` is resolved (None draws one, see
    :func:`gpugroup.keys.resolve_seed`), so the object names its groups exactly.

    Examples
    --------
    >>> SamplingOptions(nsamples=10, K=7, C=4, seed=42).seed
    42
    >>> SamplingOptions(nsamples=10, K=3, C=4, seed=0)
    Traceback (most recent call last):
    ...
    ValueError: K=3 must be >= C=4: each group takes C = gridsize**2 positions from a pool of K; pass K >= 4
    """

    nsamples: int
    K: int
    C: int
    seed: int | None = None
    sequential: bool = False
    enable_oversampling: bool = False
    batch_rows: int = DEFAULT_BATCH_ROWS

    def __post_init__(self):
        for name, minimum in (("nsamples", 1), ("K", 1), ("C", 1), ("batch_rows", 1)):
            object.__setattr__(self, name, check_count(name, getattr(self, name), minimum))
        if self.K < self.C:
            raise ValueError(
                f"K={self.K} must be >= C={self.C}: each group takes C = gridsize**2 "
                f"positions from a pool of K; pass K >= {self.C}")
        for name in ("sequential", "enable_oversampling"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name} must be True or False, got "
                                 f"{name}={getattr(self, name)!r}")
        object.__setattr__(self, "seed", keys.resolve_seed(self.seed))


def sample_groups(
    xcoords,
    ycoords,
    nsamples: int,
    K: int,
    C: int,
    *,
    seed=None,
    backend="auto",
    sequential: bool = False,
    enable_oversampling: bool = False,
    scan_index=None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    output: str = "numpy",
    index_cache: dict | None = None,
):
    """Sample ``nsamples`` groups of ``C`` scan positions (DESIGN.md section 3).

    Parameters
    ----------
    xcoords, ycoords : (n,) array_like of float
        Scan positions (any offset and scale).
    nsamples : int
        Number of groups wanted. More than n gives n groups (and a warning) unless
        ``enable_oversampling``.
    K : int
        Pool size: each seed and its K - 1 nearest other positions. Must be >= C.
    C : int
        Positions per group (``gridsize**2``). C = 1 groups are the seeds themselves.
    seed : int or None
        Seed in [0, 2**64). None draws a 63-bit seed from OS entropy and logs it (INFO);
        to keep it, draw it first: ``seed = gpugroup.keys.resolve_seed(None)``
        (``RawData.generate_grouped_data`` returns it as ``result["seed"]``).
    backend : {"auto", "cpu", "gpu"}
        Where to compute; all give the same integers.
    sequential : bool
        Seeds are positions 0..m-1 instead of a random sample.
    enable_oversampling : bool
        Allow nsamples > n when C > 1: row g takes seed number g mod n and repeats of a
        seed get distinct member sets while comb(pool size, C) allows.
    scan_index : (n,) array_like of int, optional
        When given, pools only hold positions of the seed's own scan.
    batch_rows : int
        Rows per batch (memory bound only; results do not depend on it).
    output : {"numpy", "device"}
        Return a NumPy array, or the backend's own array (CuPy on the GPU).
    index_cache : dict, optional
        Where to keep kNN indexes between calls (``RawData`` passes its own).

    Returns
    -------
    numpy.ndarray
        (B, C) int32 (int64 when n >= 2**31) global position numbers, one row a group.

    Raises
    ------
    ValueError
        Bad coordinates, counts, K < C or n < C ("must be >="), a scan with fewer than C
        positions.

    Examples
    --------
    >>> import numpy as np
    >>> from gpugroup import sample_groups
    >>> yy, xx = np.divmod(np.arange(100), 10)
    >>> g = sample_groups(xx.astype(float), yy.astype(float), nsamples=10, K=7, C=4,
    ...                   seed=42, backend="cpu")
    >>> g[0].tolist()
    [56, 66, 45, 46]
    """
    opts = SamplingOptions(nsamples, K, C, seed, sequential, enable_oversampling, batch_rows)
    return sample_with(opts, xcoords, ycoords, backend=backend, scan_index=scan_index,
                       output=output, index_cache=index_cache)


def sample_with(opts: SamplingOptions, xcoords, ycoords, *, backend="auto", scan_index=None,
                output: str = "numpy", index_cache: dict | None = None):
    """:func:`sample_groups` with its options already made (``opts``)."""
    be = get_backend(backend)
    xp = be.xp
    x, y = _check_coordinates(xcoords, ycoords, xp=xp, rescale=True)
    n = int(x.shape[0])
    nsamples, K, C, seed = opts.nsamples, opts.K, opts.C, opts.seed
    sequential, batch_rows = opts.sequential, opts.batch_rows
    if n < C:
        raise ValueError(
            f"n must be >= C: the scan has n={n} positions but C={C}; use a smaller gridsize "
            f"or a larger scan"
        )
    if output not in ("numpy", "device"):
        raise ValueError(f"output must be 'numpy' or 'device', got output={output!r}")
    if xp is not np and n >= _DEVICE_MAX_N:
        raise ValueError(
            f"n={n} positions is too many for backend={be.name!r}: CuPy's indexing kernels "
            f"take 32-bit sizes, so a device handles n < 2**31; pass backend='cpu'"
        )
    scans = _check_scan_index(scan_index, n, C)
    if K > n and C > 1:
        logger.warning("K=%d is more than the scan's n=%d positions: each pool is the whole "
                       "scan (K=%d)", K, n, n)

    B, oversample = _group_count(n, nsamples, K, C, opts.enable_oversampling, scans)
    m = min(B, n)
    logger.info(
        "sample_groups: n=%d nsamples=%d -> B=%d groups, K=%d C=%d seed=%d backend=%s%s%s",
        n, nsamples, B, K, C, seed, be.name, " sequential" if sequential else "",
        " oversampling" if oversample else "",
    )
    seeds = sample_seeds(xp, n, m, seed, sequential, be.threads)
    if C == 1:
        groups = seeds[:, None]
    else:
        cache = index_cache if index_cache is not None else {}
        digest = None if index_cache is None else _coordinates_digest(xcoords, ycoords, scans)
        pool, pool_len = _pools(be, x, y, seeds, K, scans, cache, batch_rows, digest)
        groups = xp.empty((B, C), dtype=index_dtype(n))
        step = max(1, _SELECT_BLOCK // int(pool.shape[1]))  # rows are independent

        def members(a):
            rows = xp.arange(a, min(B, a + step), dtype=xp.int64)
            first = rows % m
            groups[a : a + step] = select_members(
                xp, pool[first], pool_len[first], first, C, seed,
                repeat=rows // m if oversample else None,
            )

        run_blocks(members, range(0, B, step), be.threads)
    groups = groups.astype(index_dtype(n), copy=False)
    return be.asnumpy(groups) if output == "numpy" else groups


def exact_rescale(x, y, spans=None, xp=np):
    """``x`` and ``y`` both multiplied by one power of two so that tiny coordinates (a
    span below :data:`_MIN_SPAN`, e.g. metres times 1e-200) span [0.5, 1); others as
    they are. ``spans``: the axes' (max - min), when known; ``xp``: the arrays' namespace.

    Multiplying by 2**k is exact in float64, and so then is every difference, product
    and sum of DESIGN.md section 3 (each scales by a power of two and rounds the same),
    unless it underflows. So every (d2, p) ranking that does not underflow unscaled is
    kept bit for bit, and the ones that underflowed (squared distances of tiny
    coordinates becoming subnormal or 0, everything tying) are now exact. Scaled
    coordinates span less than 1: their squares cannot overflow.
    """
    if spans is None:
        spans = tuple(float(a.max()) - float(a.min()) for a in (x, y))
    span = max(spans)
    if span == 0.0 or span >= _MIN_SPAN:
        return x, y
    k = -math.frexp(span)[1]  # span * 2**k in [0.5, 1)
    logger.info("coordinates span %.3g: scaled by 2**%d for grouping (exact; the groups "
                "are those of the unscaled positions, without underflow)", span, k)
    # A constant axis (a line scan) adds 0 to every d2 whatever its value: zeros, which
    # cannot overflow when scaled (its value may be far larger than the other's span).
    return tuple(xp.zeros_like(a) if s == 0.0 else xp.ldexp(a, k)
                 for a, s in zip((x, y), spans))


def _check_coordinates(xcoords, ycoords, names=("xcoords", "ycoords"), *, xp=np,
                       rescale: bool = False):
    """float64, C-contiguous ``xp`` copies (or views) of one coordinate pair, checked, and
    with ``rescale`` scaled by :func:`exact_rescale`; ``names`` are the fields that errors
    name.

    The values are read twice per axis, by one min and one max (on the device for a
    device ``xp``): NaN carries through both and inf shows in one, so finite extremes mean
    finite values, and they give the span. Only a failed check looks further.
    """
    for name, a in zip(names, (xcoords, ycoords)):
        if np.ma.is_masked(a):  # np.asarray would drop the mask, grouping masked positions
            raise ValueError(f"{name} is a masked array with {np.ma.count_masked(a)} masked "
                             f"value(s); drop those positions from every field (or fill them)")
    # device arrays stay on the device for a device xp, else come to the host
    x, y = (a if xp is not np and is_device_array(a) else to_host(a)
            for a in (xcoords, ycoords))
    for name, a in zip(names, (x, y)):
        if a.ndim != 1:
            hint = ""
            if a.ndim == 2 and a.shape[1] in (2, 3):
                hint = (f"; positions stored together as (n, {a.shape[1]})? pass one column "
                        f"each, e.g. xcoords=pos[:, 0], ycoords=pos[:, 1] (rewrite the file "
                        f"so, for the command line)")
            raise ValueError(f"{name} must be 1-D (one value per scan position), got shape "
                             f"{a.shape}{hint}")
        if not np.issubdtype(a.dtype, np.number) or np.dtype(a.dtype).kind == "c":
            raise ValueError(f"{name} must hold real numbers, got dtype {a.dtype}; pass "
                             f"numeric positions (numbers stored as text: "
                             f"{name}.astype(float))")
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{names[0]} has {x.shape[0]} entries but {names[1]} has {y.shape[0]}; "
            f"pass one x and one y per scan position"
        )
    if x.shape[0] == 0:
        raise ValueError(f"the scan is empty: {names[0]} has 0 entries; pass at least one "
                         f"position")
    # Cast on the device when it holds the dtype (less to copy), else on the host first.
    x, y = (xp.ascontiguousarray(xp.asarray(
        a if xp is np or a.dtype.char in _DEVICE_DTYPES else a.astype(np.float64)
    ).astype(xp.float64, copy=False)) for a in (x, y))
    spans = []
    for name, a in zip(names, (x, y)):
        lo, hi = float(a.min()), float(a.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            bad = ~xp.isfinite(a)
            i = int(xp.argmax(bad))
            raise ValueError(
                f"{name} has {int(bad.sum())} non-finite value(s), first {name}[{i}]="
                f"{float(a[i])}; drop or fix those positions"
            )
        span = hi - lo  # inf when it overflows
        if not span <= _MAX_SPAN:
            raise ValueError(
                f"{name} spans {span:.3g}, beyond {_MAX_SPAN:.0e}: squared distances would "
                f"overflow float64; rescale the coordinates (e.g. to pixels or metres)"
            )
        spans.append(span)
    return exact_rescale(x, y, spans, xp) if rescale else (x, y)


def _check_scan_index(scan_index, n: int, C: int):
    """None, or (ids, members) per scan with members ascending global numbers."""
    if scan_index is None:
        return None
    s = np.asarray(scan_index)
    if s.shape != (n,):
        raise ValueError(f"scan_index must have shape ({n},) like xcoords, got shape {s.shape}")
    if not np.issubdtype(s.dtype, np.integer):
        raise ValueError(f"scan_index must hold integers, got dtype {s.dtype}")
    ids, counts = np.unique(s, return_counts=True)
    small = counts < C
    if small.any():
        raise ValueError(
            f"scan {int(ids[small][0])} has {int(counts[small][0])} positions, fewer than C={C}: "
            f"every scan must have >= C positions when grouping by scan; drop that scan or "
            f"use a smaller gridsize"
        )
    order = np.argsort(s, kind="stable")
    return [(int(i), members) for i, members in zip(ids, np.split(order, np.cumsum(counts)[:-1]))]


def _group_count(n, nsamples, K, C, enable_oversampling, scans):
    if nsamples <= n:
        return nsamples, False
    smallest_pool = min(K, n if scans is None else min(len(mem) for _, mem in scans))
    if enable_oversampling and C > 1 and smallest_pool >= C:
        if nsamples > _MAX_GROUPS:
            raise ValueError(
                f"nsamples={nsamples} oversampled groups would take {nsamples * C * 4:.3g} "
                f"bytes of indices alone; ask for at most 2**40 (in practice what memory "
                f"holds: {C * 4} bytes per group plus the frames)")
        repeats = -(-nsamples // n)
        distinct = math.comb(smallest_pool, C)
        if distinct < repeats:
            logger.warning(
                "oversampling: nsamples=%d needs %d groups per seed but a pool of %d gives only "
                "comb(%d, %d)=%d distinct member sets; some groups repeat (raise K)",
                nsamples, repeats, smallest_pool, smallest_pool, C, distinct,
            )
        return nsamples, True
    why = "enable_oversampling=False" if not enable_oversampling else "C=1 has one group per seed"
    logger.warning(
        "nsamples=%d > n=%d positions: returning %d groups (%s); pass "
        "enable_oversampling=True with gridsize > 1 for more", nsamples, n, n, why,
    )
    return n, False


def _coordinates_digest(xcoords, ycoords, scans) -> str:
    """Fingerprint of the point sets an index cache entry was built on (the coordinates as
    given, in float64: the index is built on what grouping makes of them)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(xcoords, dtype=np.float64))
    h.update(np.ascontiguousarray(ycoords, dtype=np.float64))
    for sid, mem in scans or ():
        h.update(str(int(sid)).encode() + b";")  # any integer id, uint64 included
        h.update(np.ascontiguousarray(mem))
    return h.hexdigest()


def _cached_index(be, cache, digest, sid, x, y):
    key = (be.name, be.description, digest, sid)
    if key not in cache:
        cache[key] = be.build_index(x, y)
    return cache[key]


def _pools(be, x, y, seeds, K, scans, cache, batch_rows, digest):
    """Pools for all seeds, padded to width min(K, n); returns (pool, pool_len)."""
    xp = be.xp
    if scans is None:
        index = _cached_index(be, cache, digest, None, x, y)
        pool = neighbour_pool(xp, x, y, seeds, K, index, batch_rows, be.threads)
        return pool, xp.full(int(seeds.shape[0]), pool.shape[1], dtype=xp.int64)
    n = int(x.shape[0])
    width = min(K, max(len(mem) for _, mem in scans))
    pool = xp.full((int(seeds.shape[0]), width), -1, dtype=xp.int64)
    pool_len = xp.zeros(int(seeds.shape[0]), dtype=xp.int64)
    scan_of = np.empty(n, dtype=np.int64)
    for j, (_, mem) in enumerate(scans):
        scan_of[mem] = j
    # seed rows of each scan: one stable sort by scan number, split at the boundaries
    seed_scan = scan_of[be.asnumpy(seeds)]
    by_scan = np.argsort(seed_scan, kind="stable")
    bounds = np.searchsorted(seed_scan[by_scan], np.arange(len(scans) + 1))
    for j, (sid, mem) in enumerate(scans):
        if bounds[j] == bounds[j + 1]:
            continue
        here = xp.asarray(by_scan[bounds[j] : bounds[j + 1]])
        members = xp.asarray(mem)
        index = _cached_index(be, cache, digest, sid, x[members], y[members])
        local = xp.searchsorted(members, seeds[here])
        p = neighbour_pool(xp, x[members], y[members], local, K, index, batch_rows,
                           be.threads)
        pool[here[:, None], xp.arange(p.shape[1])[None, :]] = members[p]
        pool_len[here] = p.shape[1]
    return pool, pool_len
