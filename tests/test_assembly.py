"""The assembly recipe of DESIGN.md section 2 (``gpugroup.assembly``): one plan computed
once (s, where ``Y`` comes from, the coordinates) that fills any sink for any rows, and the
shared comparison rule the parity tests use."""

from __future__ import annotations

import numpy as np
import pytest

from gpugroup import assembly, sample_groups
from gpugroup.schema import ScanArrays

from conftest import assert_same_grouped, host_module, jittered_scan

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


@pytest.mark.parametrize("C", [1, 4, 9])
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_fused_coordinates_kernel_equals_the_xp_path(monkeypatch, C, index_dtype):
    """The GPU's one-launch coordinates (gpu.COORDINATES_SOURCE, run here as host C++ on
    the devicelike stand-in): positions exact, offsets and relative coordinates within the
    last bits of NumPy's (whose means sum in another order); where it does not apply (not
    float64, not contiguous) the plain path serves."""
    import devicelike

    from gpugroup.backends import gpu

    devicelike.install(monkeypatch)
    kernels = gpu.AssemblyKernels(devicelike)
    monkeypatch.setattr(kernels, "_function", host_module(gpu.COORDINATES_SOURCE).get_function)
    x, y = jittered_scan(300, seed=5)
    x, y, xs, ys = 1e4 + 37 * x, -5e3 + 37 * y, 37 * x + 0.25, 37 * y - 0.75
    nn = np.random.default_rng(C).integers(0, 300, (50, C)).astype(index_dtype)
    want = assembly.group_coordinates(np, nn, x, y, xs, ys)
    got = assembly.group_coordinates(devicelike, devicelike.asarray(nn), x, y, xs, ys,
                                     kernels=kernels)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        g = devicelike.asnumpy(got[key])
        assert g.shape == value.shape and g.dtype == np.float64, key
        if key.endswith("_nn"):
            np.testing.assert_array_equal(g, value)
        else:
            np.testing.assert_allclose(g, value, rtol=0, atol=4 * np.spacing(2e4), err_msg=key)
    assert kernels.group_coordinates(devicelike.asarray(nn),
                                     [devicelike.asarray(a, dtype=np.float32)
                                      for a in (x, y, xs, ys)]) is None
    assert kernels.group_coordinates(devicelike.asarray(nn)[::2],
                                     [devicelike.asarray(a) for a in (x, y, xs, ys)]) is None
    plain = assembly.group_coordinates(devicelike, devicelike.asarray(nn)[::2], x, y, xs,
                                       ys, kernels=kernels)
    np.testing.assert_array_equal(devicelike.asnumpy(plain["coords_nn"]),
                                  want["coords_nn"][::2])


@pytest.mark.skipif(__import__("shutil").which("nvcc") is None,
                    reason="nvcc (the CUDA toolkit) is not installed")
def test_assembly_kernels_compile_for_the_gpu(tmp_path):
    """The source NVRTC gets for the assembly kernels (gather, energies, coordinates) is
    valid CUDA for sm_90 with the options it gets."""
    import subprocess

    from gpugroup.backends import fused_pool, gpu

    src = tmp_path / "assembly.cu"
    src.write_text(gpu._KERNELS + gpu.COORDINATES_SOURCE + "".join(
        f"template __global__ void group_coordinates<{t}>(const {t}*, const double*, "
        "const double*, const double*, const double*, long long, int, double*, double*, "
        "double*, double*, double*, double*);\n" for t in ("int", "long long"))
        + "template __global__ void gather_channel_last<float, long long, float, 4, 4, true, "
          "true, true>(const float*, const long long*, float*, float*, float, unsigned int, "
          "unsigned int, unsigned int);\n"
        + "template __global__ void frame_energies<float, long long, 4>(const float*, "
          "const long long*, double*, unsigned int);\n")
    done = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", *fused_pool.NVRTC_OPTIONS,
                           str(src), "-o", str(tmp_path / "a.cubin")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
