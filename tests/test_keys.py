"""SplitMix64 counter-based keys (DESIGN.md section 3, "Keys, not library RNGs")."""

from __future__ import annotations

import logging
import re
import warnings

import numpy as np
import pytest

import reference as ref
from gpugroup import keys

U64 = np.uint64


# ----------------------------------------------------------------------------- constants
def test_constants_match_design():
    assert keys.GOLDEN == 0x9E3779B97F4A7C15
    assert keys.M1 == 0xBF58476D1CE4E5B9
    assert keys.M2 == 0x94D049BB133111EB
    assert keys.STREAM_MULT == 0xD1B54A32D192ED03
    assert keys.MASK64 == 2**64 - 1
    assert (keys.SEED_STREAM, keys.MEMBER_STREAM) == (1, 2)


# ----------------------------------------------------------------------------- KAT vectors
@pytest.mark.parametrize("copy, original", [
    ("tests/data/design3.json", "kat/design3.json"), ("docs/DESIGN.md", "DESIGN.md")])
def test_copies_match_the_shared_contract(copy, original):
    """The KAT vectors and DESIGN.md ship in the repository as copies of the developers'
    shared contract folder (../shared beside a development checkout): keep them equal."""
    from conftest import REPO_ROOT

    shared = REPO_ROOT.parent / "shared" / original
    if not shared.is_file():
        pytest.skip(f"developers' check: no shared contract folder at {shared.parent} "
                    f"(only in the development workspace)")
    assert (REPO_ROOT / copy).read_bytes() == shared.read_bytes(), (
        f"{copy} differs from {shared}: copy the contract's file over")


def test_kat_mix_int(kat):
    for case in kat["mix"]:
        assert keys.mix_int(int(case["z"])) == int(case["mix"]), case


def test_kat_mix_array(kat):
    z = np.array([int(c["z"]) for c in kat["mix"]], dtype=U64)
    out = keys.mix(np, z)
    assert out.dtype == U64
    assert [int(v) for v in out] == [int(c["mix"]) for c in kat["mix"]]


def test_kat_stream(kat):
    for case in kat["stream"]:
        assert keys.stream(int(case["seed"]), case["s"]) == int(case["stream"]), case


def test_kat_key_array(kat):
    for case in kat["key"]:
        out = keys.key(np, int(case["k"]), np.array([case["c"]], dtype=np.int64))
        assert out.dtype == U64
        assert int(out[0]) == int(case["key"]), case


def test_kat_key_vector_of_counters(kat):
    ks = {c["k"] for c in kat["key"]}
    assert len(ks) == 1
    k = int(ks.pop())
    c = np.array([case["c"] for case in kat["key"]], dtype=np.int64)
    expect = [int(case["key"]) for case in kat["key"]]
    assert [int(v) for v in keys.key(np, k, c)] == expect
    # k as a uint64 array broadcast against a column of counters (how select_members calls it)
    out = keys.key(np, np.array([k, k], dtype=U64)[:, None], c[None, :])
    assert out.shape == (2, c.size) and out.dtype == U64
    assert [int(v) for v in out[1]] == expect


def test_kat_reference_agrees(kat):
    """The independent test reference reproduces the same KAT vectors."""
    for case in kat["mix"]:
        assert ref.mix(int(case["z"])) == int(case["mix"])
    for case in kat["stream"]:
        assert ref.stream(int(case["seed"]), case["s"]) == int(case["stream"])
    for case in kat["key"]:
        assert ref.key(int(case["k"]), case["c"]) == int(case["key"])


def test_key_scalar_counter_is_silent():
    """key()/mix() on a scalar (0-d) counter must wrap silently like the array path.

    NumPy scalar arithmetic warns "overflow encountered in scalar multiply" where array
    arithmetic wraps silently; under ``-W error`` (or filterwarnings=error) the KAT call
    key(k, 99) then raises instead of returning the right key.
    """
    k = ref.stream(42, 1)  # the KAT's k = 14603504125377337603
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = keys.key(np, k, 99)
        mixed = keys.mix(np, U64(1))
    assert int(got) == ref.key(k, 99) == 6209003254479603989
    assert int(mixed) == ref.mix(1) == 6238072747940578789


# ----------------------------------------------------------------------------- vs reference
def test_mix_matches_reference_on_random_words():
    rng = np.random.default_rng(1)
    z = rng.integers(0, 2**64, size=2000, dtype=U64, endpoint=False)
    z[:4] = [0, 1, 2**63, 2**64 - 1]
    out = keys.mix(np, z)
    assert out.dtype == U64
    assert [int(v) for v in out] == [ref.mix(int(v)) for v in z]
    assert [keys.mix_int(int(v)) for v in z[:200]] == [ref.mix(int(v)) for v in z[:200]]


def test_stream_matches_reference():
    rng = np.random.default_rng(2)
    seeds = [0, 1, 2**63, 2**64 - 1] + [int(v) for v in rng.integers(0, 2**63, 50)]
    for seed in seeds:
        for s in (0, 1, 2, 3, 2**40):
            assert keys.stream(seed, s) == ref.stream(seed, s), (seed, s)


@pytest.mark.parametrize("k", [0, 1, 42, 2**63, 2**64 - 1, ref.stream(42, 1), ref.stream(7, 2)])
def test_key_matches_reference(k):
    c = np.concatenate([np.arange(300), [2**31 - 1, 2**31, 2**40, 2**62]]).astype(np.int64)
    out = keys.key(np, k, c)
    assert out.dtype == U64
    assert [int(v) for v in out] == [ref.key(k, int(ci)) for ci in c]


def test_key_with_uint64_array_k_matches_reference():
    rng = np.random.default_rng(3)
    k = rng.integers(0, 2**64, size=64, dtype=U64)
    c = rng.integers(0, 2**40, size=64).astype(np.int64)
    out = keys.key(np, k, c)
    assert out.dtype == U64
    assert [int(v) for v in out] == [ref.key(int(a), int(b)) for a, b in zip(k, c)]
    # numpy integer scalars for k are accepted too
    assert int(keys.key(np, np.int64(5), np.array([3]))[0]) == ref.key(5, 3)
    assert int(keys.key(np, U64(2**64 - 1), np.array([3]))[0]) == ref.key(2**64 - 1, 3)


def test_key_counter_dtypes_agree():
    """int32 / int64 / uint64 counters give the same uint64 keys (no float64 detour)."""
    k = ref.stream(5, 1)
    base = keys.key(np, k, np.arange(100, dtype=np.int64))
    for dt in (np.int32, np.uint32, np.uint64):
        out = keys.key(np, k, np.arange(100, dtype=dt))
        assert out.dtype == U64
        np.testing.assert_array_equal(out, base)


def test_key_is_injective_in_counter():
    k = ref.stream(123, 1)
    out = keys.key(np, k, np.arange(200_000, dtype=np.int64))
    assert np.unique(out).size == out.size


def test_mix_is_not_identity_and_spreads_bits():
    out = keys.mix(np, np.arange(1, 4097, dtype=U64))
    # every output bit is set roughly half the time
    bits = ((out[:, None] >> np.arange(64, dtype=U64)[None, :]) & U64(1)).mean(axis=0)
    assert np.all((bits > 0.4) & (bits < 0.6))


# ----------------------------------------------------------------------------- seeds
@pytest.mark.parametrize("seed", [0, 1, 42, 2**63, 2**64 - 1, np.int64(7), np.uint64(2**64 - 1)])
def test_resolve_seed_accepts_ints(seed):
    assert keys.resolve_seed(seed) == int(seed)
    assert type(keys.resolve_seed(seed)) is int


@pytest.mark.parametrize("seed", [-1, 2**64, np.int64(-3)])
def test_resolve_seed_rejects_out_of_range(seed):
    with pytest.raises(ValueError, match="seed"):
        keys.resolve_seed(seed)


@pytest.mark.parametrize("seed", [1.0, 2.5, "3", True, [1], np.float64(4.0)])
def test_resolve_seed_rejects_non_ints(seed):
    with pytest.raises((TypeError, ValueError), match="seed"):
        keys.resolve_seed(seed)


def test_resolve_seed_none_draws_and_logs(caplog):
    drawn = []
    with caplog.at_level(logging.INFO, logger="gpugroup"):
        for _ in range(20):
            drawn.append(keys.resolve_seed(None))
    assert all(isinstance(s, int) and 0 <= s < 2**63 for s in drawn)
    assert len(set(drawn)) == len(drawn)
    logged = [int(m) for m in re.findall(r"seed=(\d+)", caplog.text)]
    for s in drawn:
        assert s in logged
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "gpugroup.keys")
