"""gpugroup.simulate: layout, determinism and physics of the synthetic scans."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import map_coordinates
from scipy.spatial import cKDTree

from gpugroup import RawData
from gpugroup.assembly import extract_patches
from gpugroup.simulate import make_probe, nested_scan, simulate_rawdata, simulate_scan

N = 16
n = 300


@pytest.fixture(scope="module")
def scan():
    return simulate_scan(n=n, N=N, seed=3)


def _bilinear_patch(obj, xc, yc, N):
    """The patch at (xc, yc) by scipy's order-1 interpolation (independent of gpugroup)."""
    i, j = np.mgrid[0:N, 0:N].astype(np.float64)
    rows = yc - N // 2 + i
    cols = xc - N // 2 + j
    re = map_coordinates(obj.real.astype(np.float64), [rows, cols], order=1, mode="constant")
    im = map_coordinates(obj.imag.astype(np.float64), [rows, cols], order=1, mode="constant")
    return re + 1j * im


def test_layout_shapes_and_dtypes(scan):
    expected = {
        "xcoords": ((n,), np.float64), "ycoords": ((n,), np.float64),
        "xcoords_start": ((n,), np.float64), "ycoords_start": ((n,), np.float64),
        "diff3d": ((n, N, N), np.float32), "probeGuess": ((N, N), np.complex64),
        "scan_index": ((n,), np.int64),
    }
    assert set(scan) == set(expected) | {"objectGuess"}
    for key, (shape, dtype) in expected.items():
        assert scan[key].shape == shape, key
        assert scan[key].dtype == dtype, key
    assert scan["objectGuess"].ndim == 2 and scan["objectGuess"].dtype == np.complex64
    assert not scan["scan_index"].any()
    np.testing.assert_array_equal(scan["xcoords_start"], scan["xcoords"])
    np.testing.assert_array_equal(scan["ycoords_start"], scan["ycoords"])
    assert np.isfinite(scan["diff3d"]).all() and (scan["diff3d"] >= 0).all()


def test_same_seed_same_scan_other_seed_differs(scan):
    again = simulate_scan(n=n, N=N, seed=3)
    for key in scan:
        np.testing.assert_array_equal(again[key], scan[key], err_msg=key)
    other = simulate_scan(n=n, N=N, seed=4)
    assert not np.array_equal(other["xcoords"], scan["xcoords"])
    assert not np.array_equal(other["objectGuess"], scan["objectGuess"])


@pytest.mark.parametrize("i", [0, 1, 57, n - 1])
def test_diffraction_is_far_field_of_probe_times_patch(scan, i):
    obj, probe = scan["objectGuess"], scan["probeGuess"]
    x, y = scan["xcoords"][i], scan["ycoords"][i]
    patch = _bilinear_patch(obj, x, y, N)
    # gpugroup's patch convention agrees with scipy's bilinear interpolation ...
    np.testing.assert_allclose(extract_patches(np, obj, [x], [y], N)[0], patch,
                               rtol=0, atol=1e-5)
    # ... and the frame is |fftshift(fft2(probe * patch))|.
    direct = np.abs(np.fft.fftshift(np.fft.fft2(probe.astype(np.complex128) * patch)))
    np.testing.assert_allclose(scan["diff3d"][i], direct, rtol=0,
                               atol=1e-5 * direct.max())


def test_parseval_energy(scan):
    patches = extract_patches(np, scan["objectGuess"], scan["xcoords"], scan["ycoords"], N)
    exit_energy = np.sum(np.abs(scan["probeGuess"][None].astype(np.complex128) * patches) ** 2,
                         axis=(1, 2))
    frame_energy = np.sum(scan["diff3d"].astype(np.float64) ** 2, axis=(1, 2))
    np.testing.assert_allclose(frame_energy, N * N * exit_energy, rtol=1e-4)
    # Unit-energy probe, object amplitude in [0.5, 1]: frames carry N^2 * [0.25, 1].
    assert np.all(frame_energy <= N * N * (1 + 1e-4))
    assert np.all(frame_energy >= N * N * 0.25 * (1 - 1e-4))


def test_probe_and_object_ranges(scan):
    assert np.sum(np.abs(make_probe(N)) ** 2) == pytest.approx(1.0, rel=1e-5)
    amplitude = np.abs(scan["objectGuess"])
    assert amplitude.min() >= 0.5 - 1e-6 and amplitude.max() <= 1 + 1e-6
    assert np.ptp(np.angle(scan["objectGuess"])) > 0.5  # real phase features


def test_every_patch_lies_inside_the_object(scan):
    H, W = scan["objectGuess"].shape
    for coords, size in ((scan["xcoords"], W), (scan["ycoords"], H)):
        first = np.floor(coords - N // 2)
        assert first.min() >= 0
        assert first.max() + N <= size - 1  # the bilinear neighbour column/row too
    # No zero padding leaks in: every patch pixel has the object's amplitude (>= 0.5).
    patches = extract_patches(np, scan["objectGuess"], scan["xcoords"], scan["ycoords"], N)
    assert np.abs(patches).min() >= 0.5 - 1e-5


def test_spiral_spacing_and_overlap():
    s = simulate_scan(n=400, N=32, seed=0, jitter=0.0)
    pts = np.c_[s["xcoords"], s["ycoords"]]
    d, _ = cKDTree(pts).query(pts, 2)
    # one position per spacing**2 (= (N/4)**2) of area: neighbours ~0.85 spacing apart,
    # well inside the probe diameter N/2, so neighbouring probes overlap.
    assert 0.6 * 8 < np.median(d[:, 1]) < 1.1 * 8
    wider = simulate_scan(n=400, N=32, seed=0, jitter=0.0, spacing=16)
    assert np.median(cKDTree(np.c_[wider["xcoords"], wider["ycoords"]])
                     .query(np.c_[wider["xcoords"], wider["ycoords"]], 2)[0][:, 1]) > 10


def test_object_shape_larger_centres_and_too_small_raises(scan):
    H, W = scan["objectGuess"].shape
    big = simulate_scan(n=n, N=N, seed=3, object_shape=(H + 40, W + 20))
    assert big["objectGuess"].shape == (H + 40, W + 20)
    np.testing.assert_allclose(big["xcoords"], scan["xcoords"] + 10)
    np.testing.assert_allclose(big["ycoords"], scan["ycoords"] + 20)
    with pytest.raises(ValueError, match="object_shape"):
        simulate_scan(n=n, N=N, seed=3, object_shape=(H - 5, W))


@pytest.mark.parametrize("kwargs, field", [
    ({"n": 0}, "n"), ({"N": 2}, "N"), ({"spacing": 0.0}, "spacing"),
    ({"spacing": float("nan")}, "spacing"), ({"jitter": -0.1}, "jitter"),
])
def test_bad_parameters_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        simulate_scan(**{"n": 20, "N": 8, **kwargs})


def test_rawdata_from_simulation_groups_and_round_trips(tmp_path):
    raw = simulate_rawdata(n=120, N=N, seed=5, backend="cpu")
    assert isinstance(raw, RawData) and len(raw) == 120
    assert raw.metadata["simulation"] == {"n": 120, "N": N, "seed": 5}
    grouped = raw.generate_grouped_data(N, K=1, nsamples=10, seed=1, gridsize=1)
    # Y is cut from objectGuess at the simulation's positions, rounded to float32 as
    # PtychoPINN's get_image_patches rounds them (DESIGN.md section 2): exactly there, and
    # within float32 rounding of the simulation's own patches.
    idx = grouped["nn_indices"][:, 0]
    xs, ys = (a[idx].astype(np.float32).astype(np.float64) for a in (raw.xcoords, raw.ycoords))
    np.testing.assert_array_equal(grouped["Y"][..., 0],
                                  extract_patches(np, raw.objectGuess, xs, ys, N))
    patches = extract_patches(np, raw.objectGuess, raw.xcoords[idx], raw.ycoords[idx], N)
    np.testing.assert_allclose(grouped["Y"][..., 0], patches, rtol=1e-5, atol=1e-5)
    path = tmp_path / "sim.npz"
    raw.to_file(path)
    back = RawData.from_file(path)
    np.testing.assert_array_equal(back.diff3d, raw.diff3d)
    np.testing.assert_array_equal(back.objectGuess, raw.objectGuess)
    assert back.metadata == raw.metadata


def test_nested_scan_has_a_fine_region_inside_a_coarse_one():
    x, y = nested_scan(2000, seed=3, fine_fraction=0.25, ratio=50.0)
    assert x.shape == y.shape == (2000,) and x.dtype == np.float64
    coarse, fine = slice(0, 1500), slice(1500, None)
    d_coarse, _ = cKDTree(np.c_[x[coarse], y[coarse]]).query(np.c_[x[coarse], y[coarse]], k=2)
    d_fine, _ = cKDTree(np.c_[x[fine], y[fine]]).query(np.c_[x[fine], y[fine]], k=2)
    assert 30 < np.median(d_coarse[:, 1]) / np.median(d_fine[:, 1]) < 80  # pitch ratio ~50
    for a in (x, y):  # the fine raster lies inside the overview
        assert a[coarse].min() < a[fine].min() and a[fine].max() < a[coarse].max()
    again = nested_scan(2000, seed=3, fine_fraction=0.25, ratio=50.0)
    assert np.array_equal(again[0], x) and np.array_equal(again[1], y)
