"""RawData: validation, NPZ round trip, and the grouped dict of DESIGN.md section 2."""

import logging
import os
import re
import types

import numpy as np
import pytest

from gpugroup import RawData, sample_groups
from gpugroup.assembly import extract_patches

from conftest import needs


def make_raw(n=120, N=8, seed=0, with_object=False, with_Y=False, dtype=np.float32, **kw):
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n)))
    yy, xx = np.divmod(np.arange(n), side)
    x = xx * 3.0 + rng.uniform(-0.4, 0.4, n) + 20
    y = yy * 3.0 + rng.uniform(-0.4, 0.4, n) + 20
    diff = (rng.random((n, N, N)) * 100).astype(dtype)
    probe = (rng.random((N, N)) + 1j * rng.random((N, N))).astype(np.complex64)
    obj = None
    if with_object:
        obj = (rng.random((side * 3 + 40, side * 3 + 40))
               + 1j * rng.random((side * 3 + 40, side * 3 + 40))).astype(np.complex64)
    Y = None
    if with_Y:
        Y = (rng.random((n, N, N)) + 1j * rng.random((n, N, N))).astype(np.complex64)
    return RawData(x, y, x + 0.25, y - 0.5, diff, probe, None, objectGuess=obj, Y=Y,
                   backend="cpu", **kw)


def direct_grouped(raw, nn, N):
    """The section 2 dict computed the obvious way, in float64, for comparison."""
    diff = np.asarray(raw.diff3d)[nn]                      # (B, C, N, N)
    diffraction = np.transpose(diff, (0, 2, 3, 1))
    E = (diff.astype(np.float64) ** 2).sum(axis=(2, 3))    # (B, C)
    s = np.sqrt((N / 2) ** 2 / E.mean())
    out = {"diffraction": diffraction, "X_full": diffraction.astype(np.float64) * s}
    for prefix, x, y in (("coords", raw.xcoords, raw.ycoords),
                         ("coords_start", raw.xcoords_start, raw.ycoords_start)):
        nn_xy = np.stack([x[nn], y[nn]], axis=1)[:, None]   # (B, 1, 2, C)
        off = nn_xy.mean(axis=3, keepdims=True)
        out[prefix + "_nn"] = nn_xy
        out[prefix + "_offsets"] = off
        out[prefix + "_relative"] = -(nn_xy - off)
    return out, s


@pytest.mark.parametrize("gridsize,K", [(1, 4), (2, 7), (3, 12)])
@pytest.mark.parametrize("dtype", [np.float32, np.uint16])
def test_grouped_dict_matches_direct_computation(gridsize, K, dtype):
    N = 8
    raw = make_raw(N=N, dtype=dtype)
    d = raw.generate_grouped_data(N, K=K, nsamples=50, seed=3, gridsize=gridsize)
    C = gridsize**2
    nn = d["nn_indices"]
    assert nn.shape == (50, C) and nn.dtype == np.int32
    np.testing.assert_array_equal(
        nn, sample_groups(raw.xcoords, raw.ycoords, 50, K, C, seed=3, backend="cpu"))
    ref, s = direct_grouped(raw, nn, N)
    assert d["diffraction"].dtype == dtype and d["diffraction"].shape == (50, N, N, C)
    np.testing.assert_array_equal(d["diffraction"], ref["diffraction"])
    assert d["X_full"].dtype == np.float32 and d["X_full"].shape == (50, N, N, C)
    np.testing.assert_allclose(d["X_full"], ref["X_full"], rtol=1e-6)
    assert d["norm_scale"] == pytest.approx(s, rel=1e-12)
    for key in ("coords_nn", "coords_offsets", "coords_relative", "coords_start_nn",
                "coords_start_offsets", "coords_start_relative"):
        assert d[key].dtype == np.float64
        np.testing.assert_allclose(d[key], ref[key], rtol=1e-12, atol=1e-12)
    assert d["coords_nn"].shape == (50, 1, 2, C)
    assert d["coords_offsets"].shape == (50, 1, 2, 1)
    assert d["Y"] is None and d["objectGuess"] is None
    assert d["seed"] == 3


def test_normalization_makes_mean_energy_N_squared_over_4():
    N = 8
    raw = make_raw(N=N)
    d = raw.generate_grouped_data(N, K=7, nsamples=40, seed=1, gridsize=2)
    energy = (d["X_full"].astype(np.float64) ** 2).sum(axis=(1, 2))
    assert energy.mean() == pytest.approx((N / 2) ** 2, rel=1e-5)


def test_keep_diffraction_false_gives_same_X_full():
    raw = make_raw()
    a = raw.generate_grouped_data(8, K=7, nsamples=30, seed=5, gridsize=2)
    b = raw.generate_grouped_data(8, K=7, nsamples=30, seed=5, gridsize=2, keep_diffraction=False)
    assert b["diffraction"] is None
    np.testing.assert_array_equal(a["X_full"], b["X_full"])


@pytest.mark.parametrize("chunk_bytes", [1, 5000, 1 << 30])
def test_assembly_does_not_depend_on_chunking(chunk_bytes):
    raw = make_raw(with_object=True)
    a = raw.generate_grouped_data(8, K=7, nsamples=60, seed=2, gridsize=2)
    b = raw.generate_grouped_data(8, K=7, nsamples=60, seed=2, gridsize=2, chunk_bytes=chunk_bytes)
    for key in ("nn_indices", "diffraction", "Y", "coords_nn"):
        np.testing.assert_array_equal(a[key], b[key])
    np.testing.assert_allclose(a["X_full"], b["X_full"], rtol=1e-6)


def test_Y_gathered_from_ground_truth_patches():
    raw = make_raw(with_Y=True, with_object=True)
    d = raw.generate_grouped_data(8, K=7, nsamples=20, seed=4, gridsize=2)
    assert d["Y"].dtype == np.complex64
    np.testing.assert_array_equal(d["Y"], np.transpose(raw.Y[d["nn_indices"]], (0, 2, 3, 1)))


def test_Y_cut_from_object_at_start_positions_with_y_positions_members():
    # DESIGN.md section 6: the default cuts at PtychoPINN's points (tests/test_ptychopinn.py);
    # y_positions="members" cuts each channel at its member's own start position
    raw = make_raw(with_object=True)
    d = raw.generate_grouped_data(8, K=7, nsamples=20, seed=4, gridsize=2,
                                  y_positions="members")
    nn = d["nn_indices"]
    expect = extract_patches(np, raw.objectGuess, raw.xcoords_start[nn.ravel()],
                             raw.ycoords_start[nn.ravel()], 8).reshape(20, 4, 8, 8)
    np.testing.assert_array_equal(d["Y"], np.transpose(expect, (0, 2, 3, 1)))
    assert d["objectGuess"] is raw.objectGuess


def test_patch_centre_sits_on_scan_position_gridsize_1():
    N = 16
    H = W = 64
    obj = np.zeros((H, W), np.complex64)
    obj[30, 21] = 1 + 2j                        # a point at x=21, y=30
    x = np.array([21.0, 10.0, 50.0, 33.0])
    y = np.array([30.0, 12.0, 40.0, 8.0])
    raw = RawData(x, y, None, None, np.ones((4, N, N), np.float32), np.ones((N, N), np.complex64),
                  None, objectGuess=obj, backend="cpu")
    d = raw.generate_grouped_data(N, K=1, nsamples=4, seed=0, gridsize=1)
    row = int(np.nonzero(d["nn_indices"][:, 0] == 0)[0][0])
    patch = d["Y"][row, :, :, 0]
    assert patch[N // 2, N // 2] == 1 + 2j
    assert np.count_nonzero(patch) == 1
    # half a pixel right: the point spreads equally over two columns left of centre
    p = extract_patches(np, obj, np.array([21.5]), np.array([30.0]), N)[0]
    np.testing.assert_allclose(p[N // 2, N // 2 - 1 : N // 2 + 1], [0.5 + 1j, 0.5 + 1j], rtol=1e-6)


def test_patch_outside_object_is_zero():
    obj = np.ones((20, 20), np.complex64)
    p = extract_patches(np, obj, np.array([-100.0, 200.0, 10.0]), np.array([5.0, 5.0, -2.5]), 8)
    assert not p[0].any() and not p[1].any()
    # third patch: rows at y = -6.5 .. 0.5; y=-0.5 blends zero and row 0, y=0.5 is inside
    assert not p[2][:6].any()
    np.testing.assert_allclose(p[2][6], 0.5)
    np.testing.assert_allclose(p[2][7], 1.0)


def test_patches_wholly_off_the_object_are_logged(caplog):
    raw = make_raw(n=40, with_object=True)  # positions 20..40, object large enough
    with caplog.at_level(logging.WARNING, logger="gpugroup"):
        raw.generate_grouped_data(8, K=7, nsamples=10, seed=1, gridsize=2)
    assert "outside objectGuess" not in caplog.text
    small = RawData(raw.xcoords, raw.ycoords, raw.xcoords_start, raw.ycoords_start,
                    raw.diff3d, raw.probeGuess, None, objectGuess=raw.objectGuess[:3, :3],
                    backend="cpu")
    with caplog.at_level(logging.WARNING, logger="gpugroup"):
        d = small.generate_grouped_data(8, K=7, nsamples=10, seed=1, gridsize=2)
    assert not d["Y"].any()
    assert "40 of 40 scan positions have their whole 8x8 patch outside objectGuess (3x3)" \
        in caplog.text
    pytest.importorskip("dask")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gpugroup"):
        lazy = small.generate_grouped_data(8, K=7, nsamples=10, seed=1, gridsize=2, lazy=True,
                                           chunk_bytes=4096)  # several Dask blocks
        assert not lazy["Y"].compute().any()
    assert caplog.text.count("outside objectGuess") == 1  # once, not once per block


def test_oversampling_and_warning(caplog):
    raw = make_raw(n=30)
    # gridsize > 1: more groups than positions needs enable_oversampling (OVERSAMPLING-001)
    with pytest.raises(ValueError, match="OVERSAMPLING-001.*enable_oversampling=True"):
        raw.generate_grouped_data(8, K=7, nsamples=100, seed=1, gridsize=2)
    # gridsize 1: n groups and a warning, as PtychoPINN
    with caplog.at_level(logging.WARNING):
        d = raw.generate_grouped_data(8, K=7, nsamples=100, seed=1, gridsize=1)
    assert d["nn_indices"].shape == (30, 1)
    assert any("nsamples=100" in r.getMessage() for r in caplog.records)
    d = raw.generate_grouped_data(8, K=7, nsamples=100, seed=1, gridsize=2, enable_oversampling=True)
    assert d["nn_indices"].shape == (100, 4)
    d = raw.generate_grouped_data(8, K=4, nsamples=100, seed=1, gridsize=2,
                                  enable_oversampling=True, neighbor_pool_size=9)
    sets = {}
    for g, row in enumerate(d["nn_indices"]):
        sets.setdefault(g % 30, []).append(frozenset(row.tolist()))
    assert all(len(set(v)) == len(v) for v in sets.values())


def test_group_by_scan_keeps_groups_inside_scans():
    raw = make_raw(n=120)
    raw.scan_index = (np.arange(120) >= 60).astype(np.int64)
    d = raw.generate_grouped_data(8, K=7, nsamples=80, seed=9, gridsize=2, group_by_scan=True)
    scans = raw.scan_index[d["nn_indices"]]
    assert (scans == scans[:, :1]).all()


def test_index_cache_is_reused(monkeypatch):
    raw = make_raw()
    from gpugroup.backends import cpu

    built = []
    original = cpu.KDTreeIndex.__init__

    def counting(self, *a, **k):
        built.append(1)
        original(self, *a, **k)

    monkeypatch.setattr(cpu.KDTreeIndex, "__init__", counting)
    a = raw._generate_groups_efficiently(20, 7, 4, seed=1)
    b = raw._generate_groups_efficiently(20, 7, 4, seed=1)
    raw.generate_grouped_data(8, K=7, nsamples=20, seed=1, gridsize=2)
    assert len(built) == 1
    np.testing.assert_array_equal(a, b)
    assert a.shape == (20, 4) and a.dtype == np.int32


# ---------------------------------------------------------------- validation
def base_fields(n=10, N=4):
    return dict(xcoords=np.arange(n, dtype=float), ycoords=np.zeros(n), xcoords_start=None,
                ycoords_start=None, diff3d=np.ones((n, N, N), np.float32),
                probeGuess=np.ones((N, N), np.complex64), scan_index=None)


@pytest.mark.parametrize("change,match", [
    (dict(ycoords=np.zeros(9)), r"xcoords has 10 entries but ycoords has 9"),
    (dict(xcoords=np.r_[np.arange(9.0), np.nan]), r"xcoords.*non-finite.*xcoords\[9\]=nan"),
    (dict(ycoords=np.r_[np.inf, np.zeros(9)]), r"ycoords.*ycoords\[0\]=inf"),
    (dict(xcoords=np.zeros((10, 1))), r"xcoords must be 1-D.*\(10, 1\)$"),
    (dict(xcoords=np.zeros((10, 2))),
     r"xcoords must be 1-D.*\(10, 2\); positions stored together.*xcoords=pos\[:, 0\]"),
    (dict(diff3d=np.ones((9, 4, 4), np.float32)), r"xcoords has 10 entries but diff3d has 9 frames"),
    (dict(diff3d=np.ones((10, 16), np.float32)), r"diff3d must be 3-D.*\(10, 16\)"),
    (dict(diff3d=np.ones((10, 4, 5), np.float32)), r"diff3d frames must be square.*\(10, 4, 5\)"),
    (dict(diff3d=np.ones((10, 0, 0), np.float32)), r"diff3d frames are empty.*\(10, 0, 0\)"),
    (dict(xcoords=np.array(list("0123456789"))),
     r"xcoords must hold real numbers.*<U1; .*xcoords\.astype\(float\)"),
    (dict(diff3d=np.ones((10, 4, 4), np.complex64)),
     r"diff3d must hold real amplitudes.*complex64.*np\.abs\(diff3d\)"),
    (dict(diff3d=np.ones((4, 4, 10), np.float32)),
     r"must be square.*\(4, 4, 10\); frames stored last.*np\.moveaxis\(diff3d, -1, 0\)"),
    (dict(probeGuess=np.ones((8, 8, 2), np.complex64)), r"probeGuess must be 2-D.*\(8, 8, 2\)"),
    (dict(scan_index=np.zeros(3, int)), r"scan_index must be \(10,\) numbers"),
    (dict(scan_index=np.full(10, 0.5)), r"scan_index holds non-integer values.*0\.5"),
    (dict(xcoords_start=np.zeros(10)), r"xcoords_start and ycoords_start must be given together"),
    (dict(xcoords_start=np.zeros(9), ycoords_start=np.zeros(9)), r"xcoords_start has 9"),
    (dict(xcoords=np.zeros(0), ycoords=np.zeros(0), diff3d=np.ones((0, 4, 4), np.float32)),
     r"scan is empty"),
    (dict(probeGuess=np.ones((4, 4), object)), r"probeGuess must hold numbers.*probe.*object"),
    (dict(probeGuess=np.full((4, 4), "a")), r"probeGuess must hold numbers.*<U1"),
    (dict(objectGuess=np.full((9, 9), "1+1j")), r"objectGuess must hold numbers.*object\).*<U4"),
    (dict(Y=np.full((10, 4, 4), "a")), r"Y must hold numbers \(complex64 object patches\)"),
    (dict(xcoords=np.ma.masked_greater(np.arange(10.0), 7)),
     r"xcoords is a masked array with 2 masked value\(s\); drop those positions"),
])
def test_bad_input_names_field_value_and_fix(change, match):
    fields = base_fields()
    fields.update(change)
    with pytest.raises(ValueError, match=match):
        RawData(**fields)


def test_bad_backend_and_objects():
    with pytest.raises(ValueError, match="backend must be one of"):
        RawData(**base_fields(), backend="tpu")
    with pytest.raises(ValueError, match="objectGuess must be 2-D"):
        RawData(**base_fields(), objectGuess=np.ones(5))
    with pytest.raises(ValueError, match="xcoords has 10 entries but Y has 9 patches"):
        RawData(**base_fields(), Y=np.ones((9, 4, 4), np.complex64))
    with pytest.raises(ValueError, match=r"Y must be \(n, N, N\).*\(10, 4, 5\)"):
        RawData(**base_fields(), Y=np.ones((10, 4, 5), np.complex64))


def test_generate_grouped_data_validation():
    raw = RawData(**base_fields())
    # in memory a different N is PtychoPINN's (a warning, tests/test_ptychopinn.py); out of
    # core it is refused
    with pytest.raises(ValueError, match="N=8 does not match the diffraction frames"):
        raw.generate_grouped_data(8, K=4, nsamples=2, seed=0, lazy=True)
    with pytest.raises(ValueError, match="must be >="):
        raw.generate_grouped_data(4, K=3, nsamples=2, seed=0, gridsize=2)
    with pytest.raises(ValueError, match="gridsize must be a positive int"):
        raw.generate_grouped_data(4, K=3, nsamples=2, seed=0, gridsize=0)
    with pytest.raises(ValueError, match="all-zero"):
        RawData(**{**base_fields(), "diff3d": np.zeros((10, 4, 4), np.float32)}
                ).generate_grouped_data(4, K=4, nsamples=3, seed=0, gridsize=2)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan, 1e200])
@pytest.mark.parametrize("to_file", [False, True])
def test_non_finite_frame_is_named_not_normalized_into_garbage(tmp_path, bad, to_file):
    raw = make_raw(n=60, dtype=np.float64)
    used = raw.generate_grouped_data(8, K=7, nsamples=60, seed=1, gridsize=2,
                                     sequential_sampling=True)["nn_indices"]
    assert 17 in used  # the bad frame is among the frames the groups use
    raw.diff3d[17, 3, 4] = bad
    out = tmp_path / "g.npz" if to_file else None
    with pytest.raises(ValueError, match=r"diff3d\[17\] holds NaN or inf values"):
        raw.generate_grouped_data(8, K=7, nsamples=60, seed=1, gridsize=2,
                                  sequential_sampling=True, out=out)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_ptychopinn_positional_order_and_rng():
    raw = make_raw(n=80)
    kw = raw.generate_grouped_data(8, K=7, nsamples=20, seed=5, sequential_sampling=True,
                                   gridsize=2)
    # PtychoPINN's order: N, K, nsamples, dataset_path, seed, sequential_sampling, gridsize
    pos = raw.generate_grouped_data(8, 7, 20, None, 5, True, 2)
    np.testing.assert_array_equal(pos["nn_indices"], kw["nn_indices"])
    with pytest.raises(TypeError, match="dataset_path.*seed=5"):
        raw.generate_grouped_data(8, 7, 20, 5)  # DESIGN's (N, K, nsamples, seed) by position
    a = raw.generate_grouped_data(8, K=7, nsamples=20, gridsize=2,
                                  rng=np.random.default_rng(3))
    b = raw.generate_grouped_data(8, K=7, nsamples=20, gridsize=2,
                                  rng=np.random.default_rng(3))
    assert a["seed"] == b["seed"]
    np.testing.assert_array_equal(a["nn_indices"], b["nn_indices"])
    fixed = raw.generate_grouped_data(8, K=7, nsamples=20, gridsize=2, seed=9,
                                      rng=np.random.default_rng(3))
    assert fixed["seed"] == 9  # an explicit seed wins over rng
    with pytest.raises(TypeError, match=r"sequential_sampling must be True or False, got 2.*"
                                        r"positional argument 6.*gridsize= by keyword"):
        raw.generate_grouped_data(8, 7, 20, None, 3, 2)  # gpugroup's order before PtychoPINN's
    with pytest.raises(TypeError, match=r"rng must be a numpy.random.Generator, got RandomState"):
        raw.generate_grouped_data(8, K=7, nsamples=20, gridsize=2,
                                  rng=np.random.RandomState(0))
    with pytest.raises(TypeError, match=r"N must be an int .*got N=8\.0; pass N=8"):
        raw.generate_grouped_data(8.0, K=7, nsamples=20, seed=1, gridsize=2)


@pytest.mark.parametrize("kwargs, match", [
    ({"output": "torch"}, r"output='torch'"),
    ({"output": "device", "lazy": True}, r"output='device'"),
    ({"chunk_bytes": 0}, r"chunk_bytes must be a positive int.*chunk_bytes=0"),
    ({"chunk_bytes": -5, "lazy": True}, r"chunk_bytes=-5"),
    ({"chunk_bytes": 2.5}, r"chunk_bytes must be a positive int.*chunk_bytes=2.5"),
    ({"neighbor_pool_size": 2, "nsamples": 50, "enable_oversampling": True},
     r"neighbor_pool_size >= C.*neighbor_pool_size=2 .*C=4.*OVERSAMPLING-001"),
])
def test_generate_grouped_data_option_errors_name_the_option(kwargs, match):
    raw = make_raw(n=40)
    args = {"N": 8, "K": 7, "nsamples": 5, "seed": 1, "gridsize": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        raw.generate_grouped_data(**args)


@pytest.mark.parametrize("field, value, match", [
    ("ycoords_start", lambda y: np.r_[y[:-1], np.inf], r"ycoords_start has 1 non-finite"),
    ("ycoords_start", lambda y: y[:-1], r"xcoords_start has 40 entries but ycoords_start"),
    ("xcoords_start", lambda y: np.c_[y, y], r"xcoords_start must be 1-D"),
])
def test_start_coordinate_errors_name_their_field(field, value, match):
    raw = make_raw(n=40)
    fields = {"xcoords_start": raw.xcoords_start, "ycoords_start": raw.ycoords_start}
    fields[field] = value(raw.ycoords)
    with pytest.raises(ValueError, match=match):
        RawData(raw.xcoords, raw.ycoords, fields["xcoords_start"], fields["ycoords_start"],
                raw.diff3d, raw.probeGuess, None)


# ---------------------------------------------------------------- files
def test_npz_round_trip_and_aliases(tmp_path):
    raw = make_raw(with_object=True, metadata={"energy_keV": 8.0})
    path = tmp_path / "scan.npz"
    raw.to_file(path)
    back = RawData.from_file(path, backend="cpu")
    for k in ("xcoords", "ycoords", "xcoords_start", "ycoords_start", "probeGuess",
              "scan_index", "objectGuess"):
        np.testing.assert_array_equal(getattr(back, k), getattr(raw, k))
    np.testing.assert_array_equal(np.asarray(back.diff3d), raw.diff3d)
    assert back.metadata == {"energy_keV": 8.0}
    assert [p.name for p in tmp_path.iterdir()] == ["scan.npz"]
    # the PtychoPINN alias "diffraction" and optional keys defaulting
    p2 = tmp_path / "alias.npz"
    np.savez(p2, xcoords=raw.xcoords, ycoords=raw.ycoords, diffraction=raw.diff3d,
             probeGuess=raw.probeGuess)
    alias = RawData.from_file(p2)
    np.testing.assert_array_equal(alias.xcoords_start, raw.xcoords)
    np.testing.assert_array_equal(alias.scan_index, np.zeros(len(raw)))
    train, test = RawData.from_files(path, p2)
    assert len(train) == len(test) == len(raw)
    text = str(back)
    assert f"{len(raw)} positions" in text and "8x8" in text


def test_from_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        RawData.from_file(tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(os.urandom(200))
    with pytest.raises(OSError, match=r"junk.npz.*not a zip archive"):
        RawData.from_file(junk)
    good = tmp_path / "good.npz"
    make_raw().to_file(good)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(OSError, match="truncated.npz"):
        RawData.from_file(truncated)
    nokeys = tmp_path / "nokeys.npz"
    np.savez(nokeys, xcoords=np.zeros(3), ycoords=np.zeros(3))
    with pytest.raises(ValueError, match=r"lacks required field\(s\) \['probeGuess', 'diff3d'\]"):
        RawData.from_file(nokeys)


def test_to_file_leaves_nothing_on_failure(tmp_path, monkeypatch):
    raw = make_raw()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    import gpugroup.io.scan

    monkeypatch.setattr(gpugroup.io.scan, "copy_stack", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        raw.to_file(tmp_path / "out.npz")
    assert list(tmp_path.iterdir()) == []


def test_to_file_permissions_overwrite_and_own_source(tmp_path):
    import stat

    raw = make_raw()
    path = tmp_path / "scan.npz"
    old = os.umask(0o022)
    try:
        raw.to_file(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # the umask's, not mkstemp's 0600
    with pytest.raises(FileExistsError, match="exists"):
        raw.to_file(path, overwrite=False)
    back = RawData.from_file(path, mmap_mode="r", backend="cpu")
    link = tmp_path / "link.npz"
    link.symlink_to(path)
    for target in (path, link):
        with pytest.raises(ValueError, match="is the input scan"):
            back.to_file(target)
        with pytest.raises(ValueError, match="is the input scan"):
            back.generate_grouped_data(8, K=7, nsamples=5, seed=1, gridsize=2, out=target)
    np.testing.assert_array_equal(RawData.from_file(path, backend="cpu").diff3d, raw.diff3d)
    raw.to_file(tmp_path / "no_suffix")  # any other name: .npz appended, as numpy.savez
    assert not (tmp_path / "no_suffix").exists()  # (PtychoPINN's to_file) appends it
    np.testing.assert_array_equal(RawData.from_file(tmp_path / "no_suffix.npz").diff3d,
                                  raw.diff3d)
    raw.to_file(str(tmp_path / "scan.v2"))
    assert (tmp_path / "scan.v2.npz").is_file() and not (tmp_path / "scan.v2").exists()
    # layouts gpugroup reads but does not write: refused, not written as plain HDF5
    before = sorted(os.listdir(tmp_path))
    for name in ("scan.cxi", "scan.nxs", "scan.hdf"):
        with pytest.raises(ValueError, match=rf"cannot write '.*{name}': gpugroup reads "
                                             rf"\.{name[-3:]} files .*name the output \*\.h5"):
            raw.to_file(tmp_path / name)
        with pytest.raises(ValueError, match=r"reads .* files but writes plain HDF5"):
            raw.generate_grouped_data(8, K=7, nsamples=5, seed=1, gridsize=2,
                                      out=tmp_path / name)
    assert sorted(os.listdir(tmp_path)) == before


@needs("zarr")
def test_to_file_takes_a_zarr_store_named_with_a_trailing_slash(tmp_path):
    raw = make_raw()
    for _ in range(2):  # new, then replacing the store
        raw.to_file(str(tmp_path / "store.zarr") + "/")
        assert (tmp_path / "store.zarr" / "zarr.json").is_file()
        assert not (tmp_path / "store.zarr" / ".npz").exists()
    np.testing.assert_array_equal(RawData.from_file(tmp_path / "store.zarr").diff3d,
                                  raw.diff3d)


def test_index_cache_follows_changed_coordinates():
    raw = make_raw()
    raw._generate_groups_efficiently(20, 7, 4, seed=1)
    raw.xcoords = raw.xcoords[::-1].copy()          # a caller edits the positions in place
    got = raw._generate_groups_efficiently(20, 7, 4, seed=1)
    fresh = sample_groups(raw.xcoords, raw.ycoords, 20, 7, 4, seed=1, backend="cpu")
    np.testing.assert_array_equal(got, fresh)


# ---------------------------------------------------------------- found by the error audit
@pytest.mark.parametrize("lazy", [False, True])
def test_a_progress_that_cannot_be_called_is_refused_before_any_work(tmp_path, monkeypatch,
                                                                     lazy):
    """Checked up front (before the groups are sampled), naming progress and its value."""
    import gpugroup.rawdata as rd

    raw = make_raw(n=40)
    monkeypatch.setattr(rd, "sample_with", lambda *a, **k: pytest.fail("sampled first"))
    with pytest.raises(TypeError, match=r"progress must be a callable .*progress='abc'"):
        raw.generate_grouped_data(8, K=7, nsamples=5, seed=1, gridsize=2, progress="abc",
                                  lazy=lazy, out=tmp_path / "g.zarr" if lazy else None)
    assert list(tmp_path.iterdir()) == []


def test_progress_with_lazy_is_said_not_dropped(caplog):
    pytest.importorskip("dask")
    raw = make_raw(n=40)
    calls = []
    with caplog.at_level(logging.WARNING, logger="gpugroup"):
        raw.generate_grouped_data(8, K=7, nsamples=5, seed=1, gridsize=2, lazy=True,
                                  progress=calls.append)
    assert "progress is not called with lazy=True" in caplog.text
    assert "ProgressBar" in caplog.text


@pytest.mark.parametrize("pool, level", [(12, logging.WARNING), (7, logging.INFO)])
def test_an_unused_neighbor_pool_size_is_a_warning_when_it_differs_from_K(caplog, pool, level):
    raw = make_raw(n=40)
    with caplog.at_level(logging.INFO, logger="gpugroup"):
        raw.generate_grouped_data(8, K=7, nsamples=5, seed=1, gridsize=2,
                                  neighbor_pool_size=pool)
    [rec] = [r for r in caplog.records if "neighbor_pool_size" in r.getMessage()]
    assert rec.levelno == level
    assert f"neighbor_pool_size={pool} has no effect without oversampling" in rec.getMessage()


@pytest.mark.parametrize("metadata, match", [
    ("abc", r"metadata must be a dict .*got str 'abc'"),
    ([1, 2], r"metadata must be a dict .*got list \[1, 2\]"),
    (np.array([1, 2]), r"metadata must be a dict .*got ndarray array\(\[1, 2\]\)"),
    (np.array([]), r"metadata must be a dict .*got ndarray"),
    (0, r"metadata must be a dict .*got int 0"),
])
def test_metadata_that_is_not_a_dict_is_refused(metadata, match):
    with pytest.raises(TypeError, match=match):
        RawData(**base_fields(), metadata=metadata)
    for empty in (None, {}, []):  # nothing to keep, as before
        assert RawData(**base_fields(), metadata=empty).metadata == {}


def test_metadata_is_the_callers_mapping_as_ptychopinn_keeps_it(tmp_path):
    """PtychoPINN stores ``metadata`` as given, and its torch bridge (upstream 99efda1,
    tests/test_acquisition_record.py) checks ``raw.metadata is metadata`` after a round
    trip through a second RawData built from the first one's fields."""
    meta = {"source": "slice-4a", "physics_parameters": {"N": 8}}
    raw = RawData(**base_fields(), metadata=meta)
    assert raw.metadata is meta
    again = RawData(raw.xcoords, raw.ycoords, raw.xcoords_start, raw.ycoords_start,
                    raw.diff3d, raw.probeGuess, raw.scan_index, metadata=raw.metadata)
    assert again.metadata is meta
    empty = {}
    assert RawData(**base_fields(), metadata=empty).metadata is empty
    # a read-only mapping is kept too, and written as JSON that reads back as a dict
    frozen = types.MappingProxyType({"physics_parameters": {"N": 9}})
    raw = RawData(**base_fields(), metadata=frozen)
    assert raw.metadata is frozen
    raw.to_file(tmp_path / "frozen.npz")
    back = RawData.from_file(tmp_path / "frozen.npz", backend="cpu")
    assert back.metadata == {"physics_parameters": {"N": 9}}


def test_numpy_values_in_metadata_are_written_as_plain_json(tmp_path):
    meta = {"physics_parameters": {"N": np.int64(64), "nphotons": np.float32(1e9),
                                   "shape": np.array([2, 3])}, np.int32(7): np.bool_(True)}
    raw = RawData(**base_fields(), metadata=meta)
    raw.to_file(tmp_path / "m.npz")
    back = RawData.from_file(tmp_path / "m.npz", backend="cpu").metadata
    assert back == {"physics_parameters": {"N": 64, "nphotons": 1e9, "shape": [2, 3]},
                    "7": True}
    assert type(back["physics_parameters"]["N"]) is int


@pytest.mark.parametrize("meta, where", [
    ({"physics_parameters": {"probe": object()}},
     r"metadata\['physics_parameters'\]\['probe'\] is a object"),
    ({"runs": [1, {2}]}, r"metadata\['runs'\]\[1\] is a set"),
    ({(1, 2): "pair"}, r"metadata has key \(1, 2\) \(tuple\)"),
])
def test_metadata_json_cannot_hold_names_its_entry_and_writes_nothing(tmp_path, meta, where):
    raw = RawData(**base_fields(), metadata=meta)
    with pytest.raises(TypeError, match=where):
        raw.to_file(tmp_path / "m.npz")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("stored", ["[1, 2]", '"text"', "3"])
def test_metadata_json_that_is_not_an_object_is_ignored_with_a_warning(tmp_path, caplog,
                                                                        stored):
    f = base_fields()
    np.savez(tmp_path / "s.npz", _metadata=np.array(stored),
             **{k: v for k, v in f.items() if v is not None})
    with caplog.at_level(logging.WARNING, logger="gpugroup"):
        raw = RawData.from_file(tmp_path / "s.npz", backend="cpu")
    assert raw.metadata == {}
    assert "_metadata is JSON" in caplog.text and "ignoring it" in caplog.text


def test_a_scan_without_frames_is_refused_by_to_file_before_writing(tmp_path):
    raw = RawData(**{**base_fields(), "diff3d": None})
    with pytest.raises(ValueError, match=r"diff3d is None: a scan file holds .*set raw.diff3d"):
        raw.to_file(tmp_path / "s.npz")
    assert list(tmp_path.iterdir()) == []


def test_Y_patches_of_another_size_than_the_frames_are_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="gpugroup"):
        RawData(**base_fields(N=8), Y=np.ones((10, 4, 4), np.complex64))
    assert "Y holds (4, 4) patches but the diffraction frames are (8, 8)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gpugroup"):
        RawData(**base_fields(N=4), Y=np.ones((10, 4, 4), np.complex64))
    assert "Y holds" not in caplog.text


def test_simulating_off_the_object_warns(caplog):
    probe = np.ones((8, 8), np.complex64)
    obj = np.ones((64, 64), np.complex64)
    yy, xx = np.divmod(np.arange(100.0), 10)
    x, y = xx * 4 + 12, yy * 4 + 12
    with caplog.at_level(logging.WARNING, logger="gpugroup"):
        raw = RawData.from_simulation(np.r_[x[:-1], 1e4], y, probe, obj, backend="cpu")
    assert "1 of 100 scan positions have their whole 8x8 patch outside objectGuess" in caplog.text
    assert raw.diff3d[:-1].any(axis=(1, 2)).all() and not raw.diff3d[-1].any()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gpugroup"):
        raw = RawData.from_simulation(x + 1e4, y, probe, obj, backend="cpu")
    assert re.search(r"every simulated frame is zero.*100 positions.*x in \[10012, 10048\].*"
                     r"objectGuess is 64x64", caplog.text)
    with pytest.raises(ValueError, match=r"mean energy 0\.0"):  # grouping refuses them
        raw.generate_grouped_data(8, K=4, nsamples=5, seed=1, gridsize=1)


def test_validate_config_reads_a_dict_as_well_as_a_config_object(tmp_path, caplog):
    raw = RawData(**base_fields(), metadata={"physics_parameters": {"N": 64, "gridsize": 2,
                                                                     "nphotons": 1e9}})
    raw.to_file(tmp_path / "s.npz")

    class Model:
        N, gridsize = 32, 2

    class Config:
        model, nphotons = Model, 1e9

    for config in (Config, {"nphotons": 1e9, "model": {"N": 32, "gridsize": 2}},
                   {"nphotons": 1e9, "N": 32, "gridsize": 2}):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gpugroup"):
            RawData.from_file(tmp_path / "s.npz", validate_config=True, current_config=config,
                              backend="cpu")
        assert caplog.text.count("Parameter mismatch") == 1, config
        assert "N mismatch: dataset=64, config=32" in caplog.text


def test_convert_checks_its_options_before_reading(tmp_path):
    from gpugroup.rawdata import convert

    make_raw(n=20).to_file(tmp_path / "s.npz")
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match=rf"slab_bytes must be a positive int.*"
                                             rf"slab_bytes={bad}"):
            convert(tmp_path / "s.npz", tmp_path / "o.npz", slab_bytes=bad)
    with pytest.raises(TypeError, match=r"progress must be a callable"):
        convert(tmp_path / "s.npz", tmp_path / "o.npz", progress=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]


def test_a_scale_float32_cannot_hold_is_refused_not_turned_into_zeros():
    """X_full = diffraction * float32(s), as PtychoPINN: s outside float32's normal numbers
    would make X_full 0, inexact or inf; it is an error naming the fix. Large but ordinary
    amplitudes still normalize exactly."""
    base = make_raw(n=40, dtype=np.float64)
    args = dict(N=8, K=7, nsamples=10, seed=3, gridsize=2)
    for factor in (1e46, 1e41, 1e-42):
        raw = RawData(base.xcoords, base.ycoords, None, None, base.diff3d * factor,
                      base.probeGuess, None, backend="cpu")
        with pytest.raises(ValueError, match=r"scale s = .* beyond float32's normal numbers.*"
                                             r"rescale diff3d"):
            raw.generate_grouped_data(**args)
    raw = RawData(base.xcoords, base.ycoords, None, None, base.diff3d * 1e30,
                  base.probeGuess, None, backend="cpu")
    d = raw.generate_grouped_data(**args)
    expect = (d["diffraction"] * np.float32(d["norm_scale"])).astype(np.float32)
    np.testing.assert_array_equal(d["X_full"], expect)
    assert 0.5 < float(d["X_full"].max()) < 10


def test_a_given_norm_scale_is_read_once():
    """A lazy norm_scale (a 0-d Dask array) costs a pass over the frames each time it is
    read: the checks read it once."""
    from gpugroup.dataset import GroupedDataset

    class Counting:
        reads = 0

        def __float__(self):
            Counting.reads += 1
            return 2.0

    raw = make_raw(n=40)
    ds = GroupedDataset(raw, np.array([[0, 1], [2, 3]]), norm_scale=Counting())
    assert ds.norm_scale == 2.0 and Counting.reads == 1


@pytest.mark.parametrize("groups", [
    [[0, 1, 2, 3], [4, 5, 6, 7]],
    np.array([[0, 1, 2, 3], [4, 5, 6, 7]], np.uint64),
    np.array([[0, 1, 2, 3], [4, 5, 6, 7]], np.int16),
])
def test_given_groups_come_back_as_int32_nn_indices(groups):
    """DESIGN.md section 2: nn_indices is int32 (n < 2**31) whatever type the groups had."""
    from gpugroup.dataset import GroupedDataset

    raw = make_raw(n=40)
    d = raw._generate_dataset_from_groups(groups, 8)
    assert d["nn_indices"].dtype == np.int32
    np.testing.assert_array_equal(d["nn_indices"], np.asarray(groups, np.int64))
    ds = GroupedDataset(raw, groups)
    assert ds.nn_indices.dtype == np.int32 and ds[0:2]["nn_indices"].dtype == np.int32


@pytest.mark.parametrize("suffix", [".npz", ".h5", ".zarr"])
def test_a_scan_pickles_for_worker_processes(tmp_path, suffix):
    """A RawData (frames left on disk, and after grouping, with its kNN index cached and
    its lock) pickles: the frames travel as a reference, the index is rebuilt; the copy
    groups and assembles the same."""
    import pickle

    pytest.importorskip({".npz": "numpy", ".h5": "h5py", ".zarr": "zarr"}[suffix])
    make_raw(n=60, with_object=True).to_file(tmp_path / f"s{suffix}")
    raw = RawData.from_file(tmp_path / f"s{suffix}", mmap_mode="r", backend="cpu")
    kw = dict(N=8, K=7, nsamples=20, seed=3, gridsize=2)
    first = raw.generate_grouped_data(**kw)
    from gpugroup.io.frames import StackRef

    assert isinstance(raw.__getstate__()["diff3d"], StackRef)  # the frames stay on disk
    blob = pickle.dumps(raw)
    copy = pickle.loads(blob)
    again = copy.generate_grouped_data(**kw)
    for key in ("nn_indices", "X_full", "diffraction", "Y", "coords_relative"):
        np.testing.assert_array_equal(again[key], first[key])
    assert raw._index_cache and not pickle.loads(blob)._index_cache


def test_a_scan_pickled_before_y_was_a_property_loads():
    """gpugroup before 2026-12-07 pickled Y under "Y" (now "_Y", behind the property)."""
    import pickle

    raw = make_raw(n=30, with_Y=True)
    state = raw.__getstate__()
    state["Y"] = state.pop("_Y")  # the old layout
    old = RawData.__new__(RawData)
    old.__setstate__(state)
    np.testing.assert_array_equal(old.Y, raw.Y)
    assert pickle.loads(pickle.dumps(old)).Y.shape == raw.Y.shape
