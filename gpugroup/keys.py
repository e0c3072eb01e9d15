"""Counter-based SplitMix64 keys (DESIGN.md section 3).

Every random decision in gpugroup is a pure function of (seed, stream, counter), so NumPy
and CuPy compute the same bits. All arithmetic wraps modulo 2**64 in uint64.
"""

from __future__ import annotations

import logging
import secrets

import numpy as np

logger = logging.getLogger(__name__)

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
M1 = 0xBF58476D1CE4E5B9
M2 = 0x94D049BB133111EB
STREAM_MULT = 0xD1B54A32D192ED03

#: Stream numbers of DESIGN.md section 3.
SEED_STREAM = 1
MEMBER_STREAM = 2


def mix_int(z: int) -> int:
    """SplitMix64 finalizer on one Python int (exact, wraps mod 2**64)."""
    z &= MASK64
    z ^= z >> 30
    z = (z * M1) & MASK64
    z ^= z >> 27
    z = (z * M2) & MASK64
    return z ^ (z >> 31)


def stream(seed: int, s: int) -> int:
    """Key of stream ``s`` for ``seed``: ``mix(mix(seed) ^ (s * D))``."""
    return mix_int(mix_int(seed) ^ ((s * STREAM_MULT) & MASK64))


def mix(xp, z):
    """SplitMix64 finalizer, element-wise on a uint64 array of namespace ``xp``."""
    with np.errstate(over="ignore"):  # wrapping is the point (NumPy warns for 0-d inputs)
        z = z ^ (z >> xp.uint64(30))
        z = z * xp.uint64(M1)
        z = z ^ (z >> xp.uint64(27))
        z = z * xp.uint64(M2)
        return z ^ (z >> xp.uint64(31))


def key(xp, k, c):
    """``mix(k + (c + 1) * G)`` element-wise.

    ``k`` is a Python int or a uint64 array broadcastable against ``c``; ``c`` holds
    non-negative integer counters. For a fixed ``k`` the key is injective in ``c``
    (G is odd and mix is a bijection), so keys of distinct counters never tie.
    """
    c = xp.asarray(c).astype(xp.uint64)
    if isinstance(k, (int, np.integer)):
        k = xp.uint64(int(k) & MASK64)
    with np.errstate(over="ignore"):
        return mix(xp, k + (c + xp.uint64(1)) * xp.uint64(GOLDEN))


def resolve_seed(seed) -> int:
    """Validate ``seed`` or draw a fresh 63-bit one from OS entropy (logged at INFO)."""
    if seed is None:
        seed = secrets.randbits(63)
        logger.info("seed=None: drew seed=%d from OS entropy (pass it to repeat this run)", seed)
        return seed
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(
            f"seed must be an int in [0, 2**64) or None, got {seed!r} "
            f"({type(seed).__name__}); pass e.g. seed=42"
        )
    seed = int(seed)
    if not 0 <= seed <= MASK64:
        raise ValueError(f"seed must be in [0, 2**64), got seed={seed}; pass a non-negative int")
    return seed
