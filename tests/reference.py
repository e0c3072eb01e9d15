"""A deliberately simple, independent reference for DESIGN.md section 3.

Written from the DESIGN text alone (plus the oversampling rule documented on
``gpugroup.grouping.select_members``): pure Python ints for SplitMix64, one loop per row,
``sorted`` for every ranking. It is slow and obvious on purpose; the tests compare the
package against it. It must never import ``gpugroup.grouping``.
"""

from __future__ import annotations

import math

MASK64 = (1 << 64) - 1
G = 0x9E3779B97F4A7C15
M1 = 0xBF58476D1CE4E5B9
M2 = 0x94D049BB133111EB
D = 0xD1B54A32D192ED03

#: The cap on comb(P, C) documented on ``grouping.select_members`` ("capped").
COMB_CAP = (1 << 31) - 1
PHI_FRACTION = 0.6180339887498949


# ----------------------------------------------------------------------------- keys
def mix(z: int) -> int:
    """SplitMix64 finalizer on a Python int, every step reduced mod 2**64."""
    z &= MASK64
    z = z ^ (z >> 30)
    z = (z * M1) % (1 << 64)
    z = z ^ (z >> 27)
    z = (z * M2) % (1 << 64)
    return z ^ (z >> 31)


def stream(seed: int, s: int) -> int:
    """``mix(mix(seed) ^ (s * D))`` mod 2**64."""
    return mix(mix(seed) ^ ((s * D) % (1 << 64)))


def key(k: int, c: int) -> int:
    """``mix(k + (c + 1) * G)`` mod 2**64."""
    return mix((k + (c + 1) * G) % (1 << 64))


# ----------------------------------------------------------------------------- 3.1 seeds
def seed_order(n: int, seed: int) -> list[int]:
    """All positions ordered by (key(stream(seed, 1), i), i)."""
    k = stream(seed, 1)
    return sorted(range(n), key=lambda i: (key(k, i), i))


# ----------------------------------------------------------------------------- 3.2 pools
def squared_distance(xs: list[float], ys: list[float], s: int, p: int) -> float:
    """d2 = dx*dx + dy*dy, each a separately rounded IEEE float64 operation."""
    dx = xs[p] - xs[s]
    dy = ys[p] - ys[s]
    a = dx * dx
    b = dy * dy
    return a + b


def pool(xs: list[float], ys: list[float], s: int, K: int, candidates: list[int]) -> list[int]:
    """[s] followed by the K - 1 positions p != s of ``candidates`` ranked by (d2, p)."""
    others = [p for p in candidates if p != s]
    others.sort(key=lambda p: (squared_distance(xs, ys, s, p), p))
    return [s] + others[: K - 1]


# ----------------------------------------------------------------------------- 3.3/3.4 members
def coprime_step(M: int) -> int:
    """First integer a >= max(1, round(M * 0.618...)) with gcd(a, M) == 1."""
    a = max(1, round(M * PHI_FRACTION))
    while math.gcd(a, M) != 1:
        a = a + 1
    return a


def colex_combination(N: int, P: int, C: int) -> list[int]:
    """Ascending positions of combination number N (colex order) of C out of range(P)."""
    assert 0 <= N < max(1, math.comb(P, C)), (N, P, C)
    positions = []
    remaining = N
    top = P  # every chosen position is below this
    for i in range(C, 0, -1):
        c = i - 1
        while c + 1 < top and math.comb(c + 1, i) <= remaining:
            c = c + 1
        positions.append(c)
        remaining = remaining - math.comb(c, i)
        top = c
    assert remaining == 0
    return sorted(positions)


def members(pool_: list[int], row: int, C: int, seed: int, repeat: int = 0) -> list[int]:
    """C members of a pool for row number ``row``; repeat r > 0 for oversampling (3.4).

    The pool is ranked by (key(t, p), p), t = key(stream(seed, 2), row). Repeat 0 takes the
    first C; repeat r takes combination number (r * a) mod M in colex order, M =
    min(comb(len(pool), C), COMB_CAP) and a = coprime_step(M).
    """
    t = key(stream(seed, 2), row)
    ranked = sorted(pool_, key=lambda p: (key(t, p), p))
    if repeat == 0:
        return ranked[:C]
    M = min(math.comb(len(ranked), C), COMB_CAP)
    if M == 1:
        number = 0
    else:
        number = (repeat * coprime_step(M)) % M
    return [ranked[i] for i in colex_combination(number, len(ranked), C)]


# ----------------------------------------------------------------------------- together
def group_count(n: int, nsamples: int, C: int, enable_oversampling: bool) -> tuple[int, bool]:
    """(B, oversampling?) for DESIGN 3.4/3.5 (input assumed valid: every pool >= C)."""
    if nsamples <= n:
        return nsamples, False
    if enable_oversampling and C > 1:
        return nsamples, True
    return n, False


def sample_groups(
    xcoords,
    ycoords,
    nsamples: int,
    K: int,
    C: int,
    seed: int,
    *,
    sequential: bool = False,
    enable_oversampling: bool = False,
    scan_index=None,
) -> list[list[int]]:
    """The groups of DESIGN.md section 3 as a list of B lists of C ints."""
    xs = [float(v) for v in xcoords]
    ys = [float(v) for v in ycoords]
    n = len(xs)
    assert len(ys) == n and n >= C and K >= C
    scans = None
    if scan_index is not None:
        scans = {}
        for i, sid in enumerate(scan_index):
            scans.setdefault(int(sid), []).append(i)
        assert all(len(v) >= C for v in scans.values())
    B, oversample = group_count(n, nsamples, C, enable_oversampling)
    m = min(B, n)
    order = list(range(n)) if sequential else seed_order(n, seed)
    seeds = order[:m]
    groups = []
    pools = {}
    for g in range(B):
        s = seeds[g % m]
        if C == 1:
            groups.append([s])
            continue
        if s not in pools:
            candidates = list(range(n)) if scans is None else scans[int(scan_index[s])]
            pools[s] = pool(xs, ys, s, K, candidates)
        repeat = g // m if oversample else 0
        groups.append(members(pools[s], g % m, C, seed, repeat))
    return groups


def reference_pool(xcoords, ycoords, s: int, K: int, scan_index=None) -> list[int]:
    """The pool of seed ``s`` (convenience for tests)."""
    xs = [float(v) for v in xcoords]
    ys = [float(v) for v in ycoords]
    if scan_index is None:
        candidates = list(range(len(xs)))
    else:
        candidates = [i for i in range(len(xs)) if int(scan_index[i]) == int(scan_index[s])]
    return pool(xs, ys, s, K, candidates)
