"""The assembly recipe of DESIGN.md section 2 (``gpugroup.assembly``): one plan computed
once (s, where ``Y`` comes from, the coordinates) that fills any sink for any rows, and the
shared comparison rule the parity tests use."""

from __future__ import annotations

import numpy as np
import pytest

from gpugroup import assembly, sample_groups
from gpugroup.schema import ScanArrays

from conftest import assert_same_grouped, jittered_scan

N = 8


@pytest.fixture(scope="module")
def scan():
    x, y = jittered_scan(400, seed=3)
    rng = np.random.default_rng(4)
    diff = (rng.random((400, N, N)) * 30).astype(np.float32)
    obj = (rng.random((60, 60)) + 1j * rng.random((60, 60))).astype(np.complex64)
    return ScanArrays(x * 2 + 10, y * 2 + 10, diff, x * 2 + 10.25, y * 2 + 9.75,
                      objectGuess=obj)


@pytest.fixture(scope="module")
def groups(scan):
    return sample_groups(scan.xcoords, scan.ycoords, 120, 7, 4, seed=11, backend="cpu")


def test_scale_is_design_formula(scan, groups):
    """s = sqrt((N/2)^2 / mean over (B, C) of the frame energies), in float64."""
    plan = assembly.AssemblyPlan(np, scan, groups, N)
    energies = (scan.diff3d.astype(np.float64) ** 2).sum(axis=(1, 2))[groups]
    assert plan.scale == pytest.approx(np.sqrt((N / 2) ** 2 / energies.mean()), rel=1e-14)
    X = plan.assemble(groups)["X_full"]
    assert (X.astype(np.float64) ** 2).sum(axis=(1, 2)).mean() == pytest.approx(
        (N / 2) ** 2, rel=1e-5)


def test_assemble_matches_an_explicit_gather(scan, groups):
    out = assembly.assemble_groups(np, scan, groups, N)
    s = out["norm_scale"]
    frames = np.moveaxis(scan.diff3d[groups], 1, -1)  # (B, N, N, C)
    np.testing.assert_array_equal(out["diffraction"], frames)
    np.testing.assert_array_equal(out["X_full"], frames * np.float32(s))
    xy = np.stack([scan.xcoords[groups], scan.ycoords[groups]], axis=1)[:, None]
    np.testing.assert_array_equal(out["coords_nn"], xy)
    np.testing.assert_array_equal(out["coords_offsets"], xy.mean(axis=3, keepdims=True))
    np.testing.assert_array_equal(out["coords_relative"],
                                  -(xy - xy.mean(axis=3, keepdims=True)))
    start = np.stack([scan.xcoords_start[groups], scan.ycoords_start[groups]], axis=1)[:, None]
    np.testing.assert_array_equal(out["coords_start_nn"], start)
    assert out["Y"].shape == (120, N, N, 4) and out["Y"].dtype == np.complex64
    assert out["objectGuess"] is scan.objectGuess


@pytest.mark.parametrize("rows", [slice(0, 1), slice(7, 50, 3), np.array([119, 0, 5, 5])])
def test_fill_of_any_rows_equals_those_rows_of_the_whole(scan, groups, rows):
    """A sink of some rows (a batch, a Dask block, a file chunk) gets exactly those rows."""
    plan = assembly.AssemblyPlan(np, scan, groups, N)
    whole = plan.assemble(groups)
    nn = groups[rows]
    part = plan.outputs(len(nn), 4)
    plan.fill(nn, part, chunk_bytes=1 << 10, workers=2)
    part.update(nn_indices=nn, **plan.coordinates(nn))
    assert_same_grouped(part, {k: whole[k] for k in part}, rows=rows, exact=True)


def test_a_given_scale_skips_the_energies_pass(scan, groups):
    class Unreadable:
        shape, dtype, ndim = scan.diff3d.shape, scan.diff3d.dtype, 3

        def __getitem__(self, key):
            raise AssertionError("the frames were read")

    plan = assembly.AssemblyPlan(np, ScanArrays(scan.xcoords, scan.ycoords, Unreadable()),
                                 None, N, norm_scale=2.5)
    assert plan.scale == 2.5 and not plan.with_y


def test_outputs_follow_the_options(scan, groups):
    plan = assembly.AssemblyPlan(np, scan, groups, N, keep_diffraction=False)
    out = plan.outputs(3, 4)
    assert out["diffraction"] is None and out["X_full"].dtype == np.float32
    assert out["Y"].dtype == np.complex64 and out["X_full"].shape == (3, N, N, 4)
    bare = assembly.AssemblyPlan(np, ScanArrays(scan.xcoords, scan.ycoords, scan.diff3d),
                                 groups, N).outputs(3, 4)
    assert bare["Y"] is None and bare["diffraction"].dtype == np.float32


def test_y_from_a_stack_is_gathered_like_the_frames(scan, groups):
    rng = np.random.default_rng(0)
    Y = (rng.random((400, N, N)) + 1j * rng.random((400, N, N))).astype(np.complex64)
    out = assembly.assemble_groups(np, ScanArrays(scan.xcoords, scan.ycoords, scan.diff3d,
                                                  Y=Y), groups, N)
    np.testing.assert_array_equal(out["Y"], np.moveaxis(Y[groups], 1, -1))


def test_out_of_core_plan_reads_the_same_values(tmp_path, scan, groups):
    """A memory-mapped stack read with pread (out_of_core=True) gives the same bits."""
    path = tmp_path / "d.npy"
    np.save(path, scan.diff3d)
    mapped = ScanArrays(scan.xcoords, scan.ycoords, np.load(path, mmap_mode="r"),
                        scan.xcoords_start, scan.ycoords_start, objectGuess=scan.objectGuess)
    want = assembly.AssemblyPlan(np, scan, groups, N).assemble(groups)
    got = assembly.AssemblyPlan(np, mapped, groups, N, out_of_core=True).assemble(groups)
    assert_same_grouped(got, want, exact=True)


def test_scan_arrays_start_positions_default_to_positions():
    a = ScanArrays(np.arange(3.0), np.ones(3), np.zeros((3, 2, 2)))
    assert a.xcoords_start is a.xcoords and a.ycoords_start is a.ycoords


# ----------------------------------------------------------------------------- the rule
def test_the_parity_rule_fails_where_it_should(scan, groups):
    want = assembly.assemble_groups(np, scan, groups, N)
    assert_same_grouped(dict(want), want, exact=True)
    moved = dict(want, nn_indices=want["nn_indices"][::-1])
    with pytest.raises(AssertionError, match="nn_indices"):
        assert_same_grouped(moved, want)
    near = dict(want, X_full=want["X_full"] * np.float32(1 + 2**-22))  # ~2.4e-7: within rtol
    assert_same_grouped(near, want)
    with pytest.raises(AssertionError, match="X_full"):
        assert_same_grouped(near, want, exact=True)
    far = dict(want, coords_nn=want["coords_nn"] * (1 + 1e-5))
    with pytest.raises(AssertionError, match="coords_nn"):
        assert_same_grouped(far, want)
    with pytest.raises(AssertionError, match="Y"):
        assert_same_grouped(dict(want, Y=None), want)
