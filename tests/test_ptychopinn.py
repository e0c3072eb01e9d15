"""DESIGN.md section 6: RawData behaves as PtychoPINN's, and gpugroup.ptychopinn.

The known answers in tests/data/ptychopinn_kat.* were computed by PtychoPINN itself
(upstream commit in ptychopinn_kat.json; tests/data/make_ptychopinn_fixtures.py made
them). Neither TensorFlow nor PtychoPINN is needed here: patch() is tested on a fake
``ptycho`` package made in the test.
"""

import json
import logging
import pickle
import re
import subprocess
import sys
import types

import numpy as np
import pytest
from conftest import REPO_ROOT

import gpugroup
from gpugroup import RawData
from gpugroup import ptychopinn as gp
from gpugroup.assembly import extract_patches

DATA = REPO_ROOT / "tests" / "data"
KAT = np.load(DATA / "ptychopinn_kat.npz")
FACTS = json.loads((DATA / "ptychopinn_kat.json").read_text())


def grid_raw(n_side=10, N=8, with_object=False, **kw):
    yy, xx = np.divmod(np.arange(n_side * n_side), n_side)
    rng = np.random.default_rng(0)
    obj = None
    if with_object:
        obj = (rng.random((64, 64)) + 1j * rng.random((64, 64))).astype(np.complex64)
    return RawData(12.0 + 3.0 * xx, 12.0 + 3.0 * yy, None, None,
                   rng.random((n_side * n_side, N, N)).astype(np.float32),
                   np.ones((N, N), np.complex64), None, objectGuess=obj, backend="cpu", **kw)


@pytest.fixture
def fake_params(monkeypatch):
    """A stand-in for PtychoPINN's ``ptycho.params`` (a ``cfg`` dict and ``get``)."""
    params = types.ModuleType("ptycho.params")
    params.cfg = {"gridsize": 2, "N": 8}
    params.get = lambda key, default=None: params.cfg.get(key, default)
    monkeypatch.setitem(sys.modules, "ptycho.params", params)
    return params


def test_fixtures_name_their_upstream_commit():
    # regenerated at 99efda1 (July 2026), 8 commits after 712c23f, which DESIGN.md names:
    # every fact recorded at 712c23f came out the same there (ptycho/raw_data.py is
    # unchanged between them); the from_simulation facts were added at 99efda1
    assert FACTS["commit"].startswith("99efda1")


# ----------------------------------------------------------------------------- helpers
def test_constants_are_ptychopinns():
    assert gp.local_offset_sign == FACTS["local_offset_sign"] == -1
    assert gp.key_coords_offsets == FACTS["key_coords_offsets"]
    assert gp.key_coords_relative == FACTS["key_coords_relative"]


@pytest.mark.parametrize("gridsize", [1, 2])
def test_get_image_patches_matches_ptychopinn(gridsize):
    got = gp.get_image_patches(KAT["gip_object"], KAT[f"gip{gridsize}_global"],
                               KAT[f"gip{gridsize}_local"], N=8, gridsize=gridsize)
    want = KAT[f"gip{gridsize}_out"]
    assert got.shape == want.shape and got.dtype == np.complex64
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_get_image_patches_reads_n_and_gridsize_from_ptychopinn_params(fake_params):
    got = gp.get_image_patches(KAT["gip_object"], KAT["gip2_global"], KAT["gip2_local"])
    np.testing.assert_allclose(got, KAT["gip2_out"], rtol=0, atol=1e-5)


def test_get_image_patches_without_n_says_what_to_pass(monkeypatch):
    monkeypatch.delitem(sys.modules, "ptycho.params", raising=False)
    with pytest.raises(ValueError, match=r"N is None.*pass N="):
        gp.get_image_patches(KAT["gip_object"], KAT["gip1_global"], KAT["gip1_local"])


def test_get_relative_coords_matches_ptychopinn():
    offsets, relative = gp.get_relative_coords(KAT["grc_in"])
    np.testing.assert_array_equal(offsets, KAT["grc_offsets"])
    np.testing.assert_array_equal(relative, KAT["grc_relative"])
    with pytest.raises(ValueError, match=r"coords_nn must be 4-D.*\(2, 2\)"):
        gp.get_relative_coords(np.zeros((2, 2)))


@pytest.mark.parametrize("kind", ["f32", "u16"])
def test_normalize_data_matches_ptychopinn(kind):
    got = gp.normalize_data({"diffraction": KAT[f"norm_{kind}_in"]}, 8)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, KAT[f"norm_{kind}_out"])


def test_get_neighbor_indices_matches_ptychopinn():
    np.testing.assert_array_equal(gp.get_neighbor_indices(KAT["gni_x"], KAT["gni_y"], K=3),
                                  KAT["gni_out"])


def test_ptychopinn_module_needs_no_tensorflow():
    code = ("import sys, gpugroup.ptychopinn; "
            "assert not {'tensorflow', 'ptycho', 'torch'} & set(sys.modules), sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


# ----------------------------------------------------------------------------- the dict
def test_grouped_dict_for_fixed_groups_matches_ptychopinn():
    raw = RawData(KAT["grp_x"], KAT["grp_y"], KAT["grp_xs"], KAT["grp_ys"], KAT["grp_diff"],
                  np.ones((8, 8), np.complex64), None, objectGuess=KAT["gip_object"],
                  backend="cpu")
    d = raw._generate_dataset_from_groups(KAT["grp_groups"], 8, 4, 2)
    assert set(FACTS["grouped_keys"]) <= set(d)
    for key, dtype in FACTS["grouped_dtypes"].items():
        assert str(np.asarray(d[key]).dtype) == dtype, key
    for name in KAT.files:
        if not name.startswith("grp_out_"):
            continue
        key = name[len("grp_out_"):]
        if key == "Y":  # bilinear patches in float32: the same to rounding
            np.testing.assert_allclose(d[key], KAT[name], rtol=0, atol=1e-5)
        else:
            np.testing.assert_array_equal(d[key], KAT[name], err_msg=key)


def test_default_y_is_cut_at_ptychopinns_points_and_members_option():
    raw = grid_raw(with_object=True)
    d = raw.generate_grouped_data(8, K=6, nsamples=12, seed=3, gridsize=2)
    nn = d["nn_indices"]
    # PtychoPINN's point: coords_offsets + coords_relative = 2 * centre - pos_c
    points = d["coords_offsets"] + d["coords_relative"]
    want = extract_patches(np, raw.objectGuess, points[:, 0, 0, :].ravel(),
                           points[:, 0, 1, :].ravel(), 8).reshape(12, 4, 8, 8)
    np.testing.assert_allclose(d["Y"], np.moveaxis(want, 1, -1), rtol=0, atol=1e-6)
    members = raw.generate_grouped_data(8, K=6, nsamples=12, seed=3, gridsize=2,
                                        y_positions="members")
    own = extract_patches(np, raw.objectGuess, raw.xcoords_start[nn.ravel()],
                          raw.ycoords_start[nn.ravel()], 8).reshape(12, 4, 8, 8)
    np.testing.assert_array_equal(members["Y"], np.moveaxis(own, 1, -1))
    assert not np.allclose(members["Y"], d["Y"])
    with pytest.raises(ValueError, match=r"y_positions must be one of.*'corners'"):
        raw.generate_grouped_data(8, K=6, nsamples=2, seed=3, gridsize=2,
                                  y_positions="corners")


@pytest.mark.parametrize("how", ["lazy", "out", "dataset"])
def test_y_points_are_the_same_out_of_core(tmp_path, how):
    raw = grid_raw(with_object=True)
    eager = raw.generate_grouped_data(8, K=6, nsamples=12, seed=3, gridsize=2)
    if how == "lazy":
        pytest.importorskip("dask")
        Y = raw.generate_grouped_data(8, K=6, nsamples=12, seed=3, gridsize=2,
                                      lazy=True)["Y"].compute()
    elif how == "out":
        d = raw.generate_grouped_data(8, K=6, nsamples=12, seed=3, gridsize=2,
                                      out=tmp_path / "g.npz")
        Y = np.array(d["Y"])
    else:
        Y = raw.grouped_dataset(8, K=6, nsamples=12, seed=3, gridsize=2)[0:12]["Y"]
    np.testing.assert_array_equal(Y, eager["Y"])


# ----------------------------------------------------------------------------- gridsize
def test_gridsize_none_reads_ptychopinn_params(fake_params, caplog):
    raw = grid_raw()
    with caplog.at_level(logging.INFO, logger="gpugroup"):
        d = raw.generate_grouped_data(8, K=7, nsamples=5, seed=1)
    assert d["X_full"].shape == (5, 8, 8, 4)
    assert any("ptycho.params" in r.getMessage() for r in caplog.records)
    fake_params.cfg["gridsize"] = 3
    assert raw.generate_grouped_data(8, K=9, nsamples=5, seed=1)["nn_indices"].shape == (5, 9)
    assert raw.generate_grouped_data(8, K=9, nsamples=5, seed=1, gridsize=1)[
        "nn_indices"].shape == (5, 1)  # an explicit gridsize wins


def test_gridsize_none_without_ptychopinn_is_1(monkeypatch, caplog):
    monkeypatch.delitem(sys.modules, "ptycho.params", raising=False)
    with caplog.at_level(logging.INFO, logger="gpugroup"):
        d = grid_raw().generate_grouped_data(8, K=7, nsamples=5, seed=1)
    assert d["nn_indices"].shape == (5, 1)
    assert any("gridsize=1" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- oversampling
def test_oversampling_001_needs_the_opt_in():
    raw = grid_raw(n_side=5)  # 25 positions
    with pytest.raises(ValueError, match=r"OVERSAMPLING-001.*enable_oversampling=True") as e:
        raw.generate_grouped_data(8, K=7, nsamples=40, seed=1, gridsize=2)
    assert "K choose C oversampling" in str(e.value) and "40" in str(e.value)
    with pytest.raises(ValueError, match=r"neighbor_pool_size >= C.*OVERSAMPLING-001"):
        raw.generate_grouped_data(8, K=7, nsamples=40, seed=1, gridsize=2,
                                  enable_oversampling=True, neighbor_pool_size=3)
    with pytest.raises(ValueError, match=r"neighbor_pool_size >= C"):  # K when None
        raw.generate_grouped_data(8, K=3, nsamples=40, seed=1, gridsize=2,
                                  enable_oversampling=True)
    d = raw.generate_grouped_data(8, K=4, nsamples=40, seed=1, gridsize=2,
                                  enable_oversampling=True, neighbor_pool_size=8)
    assert d["nn_indices"].shape == (40, 4)


def test_gridsize_1_more_groups_than_positions_warns(caplog):
    raw = grid_raw(n_side=5)
    with caplog.at_level(logging.WARNING):
        d = raw.generate_grouped_data(8, K=4, nsamples=40, seed=1, gridsize=1)
    assert d["nn_indices"].shape == (25, 1)
    assert any("nsamples=40" in r.getMessage() for r in caplog.records)


def test_neighbor_pool_size_has_no_effect_without_oversampling():
    raw = grid_raw()
    plain = raw.generate_grouped_data(8, K=5, nsamples=30, seed=2, gridsize=2)
    wide = raw.generate_grouped_data(8, K=5, nsamples=30, seed=2, gridsize=2,
                                     neighbor_pool_size=40)
    np.testing.assert_array_equal(plain["nn_indices"], wide["nn_indices"])
    # ... and a pool size below C is not an error then (PtychoPINN ignores it too)
    raw.generate_grouped_data(8, K=5, nsamples=30, seed=2, gridsize=2, neighbor_pool_size=1)


def test_k_less_than_c_in_ptychopinns_words():
    raw = grid_raw()
    with pytest.raises(ValueError, match="K=3 must be >= C=5"):
        raw._generate_groups_efficiently(nsamples=10, K=3, C=5)
    with pytest.raises(ValueError, match="K=3 must be >= C=4"):
        raw.generate_grouped_data(8, K=3, nsamples=10, seed=0, gridsize=2)
    with pytest.raises(ValueError, match="K=3 must be >= C=5"):
        gpugroup.sample_groups(raw.xcoords, raw.ycoords, 10, 3, 5, seed=0, backend="cpu")


# ----------------------------------------------------------------------------- randomness
def test_seed_none_comes_from_numpys_global_rng():
    raw = grid_raw()
    np.random.seed(123)
    a = raw.generate_grouped_data(8, K=7, nsamples=20, gridsize=2)
    np.random.seed(123)
    b = raw.generate_grouped_data(8, K=7, nsamples=20, gridsize=2)
    assert a["seed"] == b["seed"]
    np.testing.assert_array_equal(a["nn_indices"], b["nn_indices"])
    c = raw.generate_grouped_data(8, K=7, nsamples=20, gridsize=2)  # the RNG moved on
    assert c["seed"] != a["seed"]
    again = raw.generate_grouped_data(8, K=7, nsamples=20, gridsize=2, seed=a["seed"])
    np.testing.assert_array_equal(again["nn_indices"], a["nn_indices"])  # seed is returned


def test_private_grouping_seed_none_also_uses_the_global_rng():
    raw = grid_raw()
    np.random.seed(7)
    a = raw._generate_groups_efficiently(nsamples=20, K=7, C=4)
    np.random.seed(7)
    np.testing.assert_array_equal(raw._generate_groups_efficiently(nsamples=20, K=7, C=4), a)


def test_sequential_sampling_ignores_seed():
    raw = grid_raw()
    runs = [raw.generate_grouped_data(8, K=7, nsamples=15, gridsize=2, seed=s,
                                      sequential_sampling=True) for s in (None, 1, 99)]
    for r in runs[1:]:
        np.testing.assert_array_equal(r["nn_indices"], runs[0]["nn_indices"])
    assert runs[0]["seed"] == 0
    nn = runs[0]["nn_indices"]
    # the same groups as sample_groups' sequential mode with seed 0 and as seed_indices
    ref = gpugroup.sample_groups(raw.xcoords, raw.ycoords, 15, 7, 4, seed=0, backend="cpu",
                                 sequential=True)
    np.testing.assert_array_equal(nn, ref)
    np.testing.assert_array_equal(
        raw._generate_groups_efficiently(15, 7, 4, seed=5, seed_indices=np.arange(15)), ref)


def test_seed_indices_choose_the_seeds():
    raw = grid_raw()
    seeds = np.array([50, 3, 77])
    g = raw._generate_groups_efficiently(3, 7, 4, seed_indices=seeds)
    assert g.shape == (3, 4) and g.dtype == np.int32
    for s, row in zip(seeds, g):  # each group lies in its seed's pool of 7
        d2 = (raw.xcoords - raw.xcoords[s]) ** 2 + (raw.ycoords - raw.ycoords[s]) ** 2
        assert np.all(d2[row] <= np.sort(d2)[6])
    np.testing.assert_array_equal(raw._generate_groups_efficiently(1, 7, 1, seed_indices=[9]),
                                  [[9]])
    with pytest.raises(ValueError, match=r"seed_indices must hold position numbers in "
                       r"\[0, 100\).*seed_indices.flat\[0\]=100"):
        raw._generate_groups_efficiently(1, 7, 4, seed_indices=[100])


def test_generate_groups_with_oversampling():
    raw = grid_raw(n_side=4)
    g = raw._generate_groups_with_oversampling(50, 7, 4, seed=3)
    assert g.shape == (50, 4)
    np.testing.assert_array_equal(g, raw._generate_groups_with_oversampling(50, 7, 4, seed=3))
    with pytest.raises(ValueError, match="OVERSAMPLING-001"):
        raw._generate_groups_with_oversampling(50, 3, 4, seed=3)


def test_grouping_leaves_numpys_global_rng_seeded_as_ptychopinn():
    """PtychoPINN's grouping calls np.random.seed(seed) for a given seed and
    np.random.seed(0) on its sequential path (ptycho/raw_data.py:632-633, 654 and 749 at
    99efda1), so what code draws from np.random after the call is the same every run."""
    raw = grid_raw()

    def next_draw(prior, call):
        np.random.seed(prior)
        call()
        return np.random.random()

    def seeded(seed):
        np.random.seed(seed)
        return np.random.random()

    calls = [  # (the seed NumPy is left with, the call)
        (42, lambda: raw.generate_grouped_data(8, K=7, nsamples=5, gridsize=2, seed=42)),
        (0, lambda: raw.generate_grouped_data(8, K=7, nsamples=5, gridsize=2, seed=42,
                                              sequential_sampling=True)),
        (7, lambda: raw._generate_groups_efficiently(5, 7, 4, seed=7)),
        (3, lambda: raw._generate_groups_with_oversampling(500, 7, 4, seed=3)),
        (0, lambda: raw._generate_groups_efficiently(3, 7, 4, seed=7, seed_indices=[1, 2])),
        (9, lambda: raw.generate_grouped_data(8, K=7, nsamples=500, gridsize=2, seed=9,
                                              sequential_sampling=True,
                                              enable_oversampling=True)),  # seed, not 0
        (9, lambda: raw._generate_groups_with_oversampling(500, 7, 4, seed=9,
                                                           seed_indices=np.arange(500))),
        ([5, 256], lambda: raw.generate_grouped_data(8, K=7, nsamples=5, gridsize=2,
                                                     seed=2**40 + 5)),  # as 32-bit words
    ]
    for want, call in calls:
        assert next_draw(1, call) == next_draw(2, call) == seeded(want)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\), got seed=-1"):
        raw.generate_grouped_data(8, K=7, nsamples=500, gridsize=2, seed=-1,
                                  sequential_sampling=True, enable_oversampling=True)
    # seed=None: untouched, apart from the one draw the seed came from
    np.random.seed(5)
    np.random.randint(0, 2**63 - 1, dtype=np.int64)
    want = np.random.random()
    assert next_draw(5, lambda: raw.generate_grouped_data(8, K=7, nsamples=5,
                                                          gridsize=2)) == want


def test_flags_are_taken_by_truth_as_ptychopinn_tests_them():
    raw = grid_raw()
    plain = raw.generate_grouped_data(8, K=7, nsamples=5, gridsize=2, seed=1)
    for flags in ({"sequential_sampling": None, "enable_oversampling": None},
                  {"sequential_sampling": 0, "enable_oversampling": np.int64(0)}):
        np.testing.assert_array_equal(raw.generate_grouped_data(
            8, K=7, nsamples=5, gridsize=2, seed=1, **flags)["nn_indices"], plain["nn_indices"])
    np.testing.assert_array_equal(
        raw.generate_grouped_data(8, K=7, nsamples=5, gridsize=2, sequential_sampling=1)[
            "nn_indices"],
        raw.generate_grouped_data(8, K=7, nsamples=5, gridsize=2, sequential_sampling=True)[
            "nn_indices"])
    with pytest.raises(TypeError, match=r"enable_oversampling must be True or False, got 2"):
        raw.generate_grouped_data(8, K=7, nsamples=5, gridsize=2, enable_oversampling=2)


# ----------------------------------------------------------------------------- inputs
def test_ptychopinns_inputs_are_accepted(caplog):
    n, N = 30, 8
    rng = np.random.default_rng(1)
    x, y = rng.uniform(10, 40, n), rng.uniform(10, 40, n)
    frames = rng.random((n, N, N))  # float64, as PtychoPINN's tests pass
    # diff3d / probeGuess None, float scan_index, Y (n, N, N, 1), complex128 probe
    bare = RawData(x, y, x, y, None, None, None)
    assert bare.diff3d is None and bare.probeGuess is None
    with pytest.raises(ValueError, match="diff3d is None"):
        bare.generate_grouped_data(N, K=4, nsamples=3, seed=0, gridsize=1)
    Y4 = (rng.random((n, N, N, 1)) + 0j).astype(np.complex64)
    raw = RawData(x, y, x, y, frames, np.ones((N, N), complex), np.arange(n, dtype=float),
                  Y=Y4)
    assert raw.scan_index.dtype == np.int64 and raw.Y.shape == (n, N, N)
    d = raw.generate_grouped_data(N, K=4, nsamples=5, seed=0, gridsize=1)
    np.testing.assert_array_equal(d["Y"][..., 0], Y4[d["nn_indices"][:, 0], ..., 0])
    # Y set afterwards, in PtychoPINN's layout too, is taken as at construction
    raw.Y = None
    assert raw.generate_grouped_data(N, K=4, nsamples=5, seed=0, gridsize=1)["Y"] is None
    raw.Y = Y4
    assert raw.Y.shape == (n, N, N)
    np.testing.assert_array_equal(
        raw.generate_grouped_data(N, K=4, nsamples=5, seed=0, gridsize=1)["Y"], d["Y"])
    with pytest.raises(ValueError, match=r"xcoords has 30 entries but Y has 2 patches"):
        raw.Y = Y4[:2]
    # N different from the frames: a warning, X_full keeps the frames, Y is N x N
    with caplog.at_level(logging.WARNING):
        d = raw.generate_grouped_data(4, K=4, nsamples=5, seed=0, gridsize=1)
    assert any("N=4 differs" in r.getMessage() for r in caplog.records)
    assert d["X_full"].shape == (5, N, N, 1)
    E = np.sum(np.asarray(d["diffraction"], np.float64) ** 2, axis=(1, 2)).mean()
    np.testing.assert_allclose(d["X_full"], d["diffraction"] * np.sqrt(4.0 / E), rtol=1e-6)


def test_sample_indices_travel_into_the_grouped_dict():
    raw = grid_raw()
    d = raw.generate_grouped_data(8, K=7, nsamples=4, seed=0, gridsize=2)
    assert "sample_indices" not in d and raw.sample_indices is None
    raw.sample_indices = np.arange(100)[::-1]
    d = raw.generate_grouped_data(8, K=7, nsamples=4, seed=0, gridsize=2)
    np.testing.assert_array_equal(d["sample_indices"], raw.sample_indices)


# ----------------------------------------------------------------------------- files
def test_reads_ptychopinns_metadata_npz(caplog):
    raw = RawData.from_file(DATA / "ptychopinn_metadata.npz")
    assert raw.metadata == FACTS["metadata"]
    config = types.SimpleNamespace(nphotons=1e6, model=types.SimpleNamespace(N=4, gridsize=1))
    with caplog.at_level(logging.WARNING):
        RawData.from_file(DATA / "ptychopinn_metadata.npz", validate_config=True,
                          current_config=config)
    messages = [r.getMessage() for r in caplog.records]
    assert any("nphotons mismatch" in m for m in messages)
    assert any("gridsize mismatch" in m for m in messages)
    assert not any("N mismatch" in m for m in messages)
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # validate_config=False: no check
        RawData.from_file(DATA / "ptychopinn_metadata.npz", False, config)
    assert not caplog.records


def test_reads_ptychopinns_to_file_npz_with_none_members():
    assert "objectGuess" in FACTS["to_file_members"]  # stored as None by PtychoPINN
    raw = RawData.from_file(DATA / "ptychopinn_to_file.npz")
    assert raw.objectGuess is None and len(raw) == 6 and raw.diff3d.shape == (6, 4, 4)


def test_a_y_member_for_other_positions_is_ignored_as_ptychopinns_load_data(tmp_path,
                                                                           caplog):
    """PtychoPINN's generate_patches_tool writes a single patch as Y by default; its
    load_data ignores a Y whose first axis is not n (ptycho/workflows/components.py:411
    at 99efda1), and its from_file reads no Y at all."""
    raw = grid_raw(with_object=True)
    fields = raw.to_dict()
    fields["Y"] = np.ones((1, 8, 8, 1), np.complex64)
    np.savez(tmp_path / "patches.npz", **fields)
    with caplog.at_level(logging.WARNING, logger="gpugroup"):
        back = RawData.from_file(tmp_path / "patches.npz", backend="cpu")
    assert "Y holds 1 patches for 100 positions; ignoring it" in caplog.text
    assert back.Y is None
    np.testing.assert_array_equal(
        back.generate_grouped_data(8, K=7, nsamples=4, seed=0, gridsize=2)["Y"],
        raw.generate_grouped_data(8, K=7, nsamples=4, seed=0, gridsize=2)["Y"])


def test_a_ptychopinn_rawdata_pickled_before_patch_loads_as_ours(monkeypatch):
    """A pickle of PtychoPINN's RawData names ptycho.raw_data.RawData, which patch() makes
    gpugroup's class: it is rebuilt from the pickled fields (PtychoPINN's __dict__)."""
    module = types.ModuleType("ptycho_pickled_raw_data")

    class Upstream:  # PtychoPINN's RawData.__init__ stores its arguments as they are
        def __init__(self, *fields, **optional):
            names = ("xcoords", "ycoords", "xcoords_start", "ycoords_start", "diff3d",
                     "probeGuess", "scan_index")
            self.__dict__.update(zip(names, fields), **optional)
            self.sample_indices, self.subsample_seed = np.arange(3), 17

    Upstream.__module__, Upstream.__qualname__ = module.__name__, "RawData"
    module.RawData = Upstream
    monkeypatch.setitem(sys.modules, module.__name__, module)
    ours = grid_raw(with_object=True)
    blob = pickle.dumps(Upstream(ours.xcoords, ours.ycoords, ours.xcoords, ours.ycoords,
                                 ours.diff3d, ours.probeGuess, None,
                                 objectGuess=ours.objectGuess, Y=None, norm_Y_I=None,
                                 metadata=None))
    module.RawData = RawData  # what patch() does to ptycho.raw_data
    back = pickle.loads(blob)
    assert type(back) is RawData and back.subsample_seed == 17 and back.backend == "auto"
    np.testing.assert_array_equal(back.sample_indices, np.arange(3))
    want = ours.generate_grouped_data(8, K=7, nsamples=4, seed=0, gridsize=2)
    got = back.generate_grouped_data(8, K=7, nsamples=4, seed=0, gridsize=2, backend="cpu")
    for key in ("nn_indices", "X_full", "Y"):
        np.testing.assert_array_equal(got[key], want[key])


def test_object_members_are_not_unpickled(tmp_path):
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    path = tmp_path / "evil.npz"
    np.savez(path, xcoords=np.zeros(2), ycoords=np.zeros(2), diff3d=np.ones((2, 4, 4)),
             probeGuess=np.ones((4, 4), complex), _metadata=np.array(Evil(), dtype=object))
    with pytest.raises((ValueError, OSError), match=r"'_metadata' holds Python objects"):
        RawData.from_file(path)
    assert not (tmp_path / "ran").exists()


def test_to_file_writes_what_ptychopinn_reads(tmp_path):
    raw = RawData.from_file(DATA / "ptychopinn_metadata.npz")
    raw.to_file(tmp_path / "copy.npz")
    # PtychoPINN's from_file: np.load(allow_pickle=True), these members, _metadata JSON
    with np.load(tmp_path / "copy.npz", allow_pickle=True) as f:
        members = set(f.files)
        assert {"xcoords", "ycoords", "diff3d", "probeGuess"} <= members
        assert json.loads(str(f["_metadata"].item())) == FACTS["metadata"]
        assert not any(f[k].dtype.hasobject for k in members)
    assert RawData.from_file(tmp_path / "copy.npz").metadata == FACTS["metadata"]


def test_loader_shapes_from_our_dict():
    """PtychoPINN's loader.load reads X_full, Y, coords_* and nn_indices: the shapes and
    dtypes it produced from PtychoPINN's own dict (fixture) follow from ours too."""
    raw = RawData(KAT["grp_x"], KAT["grp_y"], KAT["grp_xs"], KAT["grp_ys"], KAT["grp_diff"],
                  np.ones((8, 8), np.complex64), None, objectGuess=KAT["gip_object"],
                  backend="cpu")
    d = raw._generate_dataset_from_groups(KAT["grp_groups"], 8, 4, 2)
    shapes = {"X": d["X_full"].shape, "Y_I": d["Y"].shape, "Y_phi": d["Y"].shape,
              "coords_nominal": d[gp.key_coords_relative].shape,
              "coords_true": d[gp.key_coords_relative].shape,
              "nn_indices": d["nn_indices"].shape, "global_offsets": d["coords_offsets"].shape,
              "local_offsets": d["coords_relative"].shape}
    for name, shape in shapes.items():
        assert list(shape) == FACTS["loader"][name][0], name
    assert FACTS["loader_X_equals_X_full"] and d["X_full"].dtype == np.float32


SIM = FACTS["from_simulation"]


def simulate_fixture_scan(**kw):
    return RawData.from_simulation(KAT["sim_x"], KAT["sim_y"], KAT["sim_probe"],
                                   KAT["sim_object"], backend="cpu", **kw)


def test_from_simulation_is_ptychopinns_physics(fake_params):
    """PtychoPINN's from_simulation (fixture): X = sqrt(Poisson counts) / s, the counts
    drawn around |F(s Y probe)|^2 / N^2 with s scaling the illuminated patches to nphotons
    per frame; norm_Y_I = sqrt(nphotons / mean sum X^2)."""
    fake_params.cfg.update(gridsize=1, nphotons=SIM["nphotons"])
    s = KAT["sim_scale"]  # PtychoPINN's intensity scale for these patches
    upstream = (KAT["sim_diff3d"].astype(np.float64) * s) ** 2
    np.testing.assert_allclose(upstream, np.round(upstream), rtol=1e-5, atol=1e-3)  # counts
    raw = simulate_fixture_scan(seed=3)
    assert raw.diff3d.dtype == np.dtype(SIM["dtypes"]["diff3d"]) == np.float32
    assert raw.diff3d.shape == tuple(SIM["shapes"]["diff3d"])
    assert raw.Y.dtype == np.complex64 and raw.Y.shape == tuple(SIM["shapes"]["Y"][:3])
    np.testing.assert_allclose(raw.Y, KAT["sim_Y"][..., 0], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(raw.xcoords_start, raw.xcoords)
    counts = (raw.diff3d.astype(np.float64) * s) ** 2  # whole photon counts, at its scale
    np.testing.assert_allclose(counts, np.round(counts), rtol=1e-5, atol=1e-3)
    # the counts' means are its noise-free intensities: totals within 5 sigma of Poisson
    expected = ((KAT["sim_amplitude"][..., 0].astype(np.float64) * s) ** 2).sum(axis=(1, 2))
    assert np.all(np.abs(counts.sum(axis=(1, 2)) - expected) < 5 * np.sqrt(expected))
    assert np.abs(np.round(upstream).sum(axis=(1, 2)) - expected).max() < 5 * np.sqrt(
        expected.max())  # the same holds for PtychoPINN's own draw
    assert raw.norm_Y_I.dtype == np.float32
    np.testing.assert_allclose(raw.norm_Y_I, np.sqrt(SIM["nphotons"] / np.mean(
        np.sum(raw.diff3d.astype(np.float64) ** 2, axis=(1, 2)))), rtol=1e-6)
    assert abs(raw.norm_Y_I / SIM["norm_Y_I"] - 1) < 0.05  # 6 frames of 1e4 photons
    # with photons enough, the amplitudes are PtychoPINN's noise-free ones
    bright = simulate_fixture_scan(nphotons=1e16, seed=3)
    np.testing.assert_allclose(bright.diff3d, KAT["sim_amplitude"][..., 0], rtol=0,
                               atol=1e-5 * KAT["sim_amplitude"].max())


def test_from_simulation_nphotons_and_seed(fake_params, monkeypatch, caplog):
    fake_params.cfg["gridsize"] = 1
    fake_params.cfg["nphotons"] = 100.0  # ptycho.params' value when it is imported
    low = simulate_fixture_scan(seed=5)
    np.testing.assert_array_equal(low.diff3d, simulate_fixture_scan(nphotons=100, seed=5).diff3d)
    assert not np.array_equal(low.diff3d, simulate_fixture_scan(seed=6).diff3d)
    from gpugroup import assembly
    chunk_groups = assembly.chunk_groups  # frames two at a time: the same draws
    monkeypatch.setattr(assembly, "chunk_groups",
                        lambda B, b: chunk_groups(B, b, chunk_bytes=2 * b))
    np.testing.assert_array_equal(low.diff3d, simulate_fixture_scan(seed=5).diff3d)
    monkeypatch.setattr(assembly, "chunk_groups", chunk_groups)
    # seed=None, as PtychoPINN's TensorFlow draws: new noise at each call of a run, even
    # after the same np.random.seed (its nongrid_simulation seeds 42 before each), and the
    # same noise in a run seeded the same way; NumPy's global state is read, not moved
    import itertools

    from gpugroup import rawdata

    runs = []
    for _ in range(2):
        monkeypatch.setattr(rawdata, "_simulations", itertools.count())  # a new run
        calls = []
        for _ in range(2):
            np.random.seed(11)
            calls.append(simulate_fixture_scan().diff3d)
            assert np.random.rand() == np.random.RandomState(11).rand()
        runs.append(calls)
    assert not np.array_equal(runs[0][0], runs[0][1])
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    with caplog.at_level(logging.INFO, logger="gpugroup.rawdata"):
        drawn = simulate_fixture_scan()
    logged = int(re.search(r"photon-noise seed=(\d+)", caplog.text).group(1))
    np.testing.assert_array_equal(drawn.diff3d, simulate_fixture_scan(seed=logged).diff3d)
    monkeypatch.delitem(sys.modules, "ptycho.params")  # PtychoPINN's default, 1e9
    np.testing.assert_array_equal(simulate_fixture_scan(seed=5).diff3d,
                                  simulate_fixture_scan(nphotons=1e9, seed=5).diff3d)
    for bad in (0, -1.0, float("nan"), float("inf"), "1e9", True):
        with pytest.raises(ValueError, match=r"nphotons must be .*got nphotons=.*pass e\.g\."):
            simulate_fixture_scan(nphotons=bad)
    with pytest.raises(ValueError, match=r"scale to nphotons=1e-50 is 0\.0.*pass an nphotons"):
        simulate_fixture_scan(nphotons=1e-50)
    with pytest.raises(ValueError, match=r"nphotons=1e\+20 puts .* expected photons in one "
                                         r"pixel.*pass a smaller nphotons"):
        simulate_fixture_scan(nphotons=1e20)
    with pytest.raises(ValueError, match=r"seed must be"):
        simulate_fixture_scan(seed=-1)


def test_from_simulation_says_what_spoils_it(fake_params, caplog):
    fake_params.cfg["gridsize"] = 1
    obj, probe = KAT["sim_object"].copy(), KAT["sim_probe"].copy()
    x, y = KAT["sim_x"], KAT["sim_y"]
    obj[round(y[0]), round(x[0])] = np.nan  # under the first position
    with pytest.raises(ValueError, match=r"objectGuess holds NaN or inf where the probe "
                                         r"lights the object.*np\.nan_to_num"):
        RawData.from_simulation(x, y, probe, obj, seed=1)
    probe[0, 0] = np.inf
    with pytest.raises(ValueError, match=r"probeGuess holds NaN or inf"):
        RawData.from_simulation(x, y, probe, KAT["sim_object"], seed=1)
    with caplog.at_level(logging.WARNING, logger="gpugroup"):
        dark = simulate_fixture_scan(nphotons=1e-6, seed=1)
    assert "no photon was drawn at nphotons=1e-06: every simulated frame is zero" in caplog.text
    assert not dark.diff3d.any() and dark.norm_Y_I is None


def test_from_simulation_is_gridsize_1_only(fake_params):
    fake_params.cfg["gridsize"] = 2
    with pytest.raises(NotImplementedError, match="gridsize=1"):
        simulate_fixture_scan()


# ----------------------------------------------------------------------------- patch()
@pytest.fixture
def fake_ptycho(monkeypatch):
    """A fake PtychoPINN: ``ptycho.raw_data`` with its own RawData, a loader that imported
    the name and checks isinstance."""
    pkg = types.ModuleType("ptycho")
    pkg.__path__ = []
    raw_data = types.ModuleType("ptycho.raw_data")

    class PtychoRawData:
        pass

    raw_data.RawData = PtychoRawData
    loader = types.ModuleType("ptycho.loader")
    loader.RawData = PtychoRawData
    def accepts(x):  # PtychoPINN's check reads the module's RawData name when called
        return isinstance(x, loader.RawData)

    loader.accepts = accepts
    for name, mod in (("ptycho", pkg), ("ptycho.raw_data", raw_data),
                      ("ptycho.loader", loader)):
        monkeypatch.setitem(sys.modules, name, mod)
    yield types.SimpleNamespace(raw_data=raw_data, loader=loader, original=PtychoRawData)
    gp.unpatch()


def test_patch_and_unpatch_swap_the_class(fake_ptycho):
    gp.patch()
    assert gp.is_patched()
    assert fake_ptycho.raw_data.RawData is RawData
    assert fake_ptycho.loader.RawData is RawData
    assert fake_ptycho.loader.accepts(grid_raw())  # PtychoPINN's isinstance checks pass
    gp.patch()  # twice is harmless
    late = types.ModuleType("ptycho.late")  # a PtychoPINN module imported while patched
    late.RawData = fake_ptycho.raw_data.RawData
    sys.modules["ptycho.late"] = late
    mine = types.ModuleType("my_training")  # user code importing gpugroup's class
    mine.RawData = RawData
    sys.modules["my_training"] = mine
    try:
        gp.unpatch()
        assert not gp.is_patched()
        assert fake_ptycho.raw_data.RawData is fake_ptycho.original
        assert fake_ptycho.loader.RawData is fake_ptycho.original
        assert late.RawData is fake_ptycho.original
        assert mine.RawData is RawData and gpugroup.RawData is RawData
    finally:
        del sys.modules["ptycho.late"], sys.modules["my_training"]


def test_patch_before_ptychopinn_is_imported(tmp_path, monkeypatch):
    pkg = tmp_path / "ptycho"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "raw_data.py").write_text("class RawData:\n    pass\n")
    (pkg / "loader.py").write_text("from ptycho.raw_data import RawData\n")
    script = tmp_path / "run.py"
    script.write_text(
        "import sys\nfrom ptycho import loader\nimport gpugroup\n"
        "assert loader.RawData is gpugroup.RawData, loader.RawData\n"
        "print('patched', sys.argv[1:])\n")
    env = {"PYTHONPATH": f"{tmp_path}{':' + str(REPO_ROOT)}", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "gpugroup.ptychopinn", str(script), "--x", "1"],
                         capture_output=True, text=True, env=env, cwd=tmp_path,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert "patched ['--x', '1']" in out.stdout
    # unpatched, the script's assertion fails
    plain = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                           env=env, cwd=tmp_path, check=False)
    assert plain.returncode != 0


def test_runner_module_mode_and_usage(tmp_path):
    (tmp_path / "hello_mod.py").write_text(
        "import sys, gpugroup.ptychopinn as g\nassert g.is_patched()\nprint('ok', sys.argv[1:])\n")
    env = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "gpugroup.ptychopinn", "-m", "hello_mod", "a"],
                         capture_output=True, text=True, env=env, cwd=tmp_path,
                         check=False)
    assert out.returncode == 0 and "ok ['a']" in out.stdout, out.stderr
    # the target's options are its own, first argument included (as python -m passes them)
    for runner_args, want in ((["-m", "hello_mod", "--model_path", "m", "-q"],
                               "ok ['--model_path', 'm', '-q']"),
                              (["-mhello_mod", "--x"], "ok ['--x']"),
                              (["hello_mod.py", "--help"], "ok ['--help']"),
                              (["--", "hello_mod.py", "a", "-b"], "ok ['a', '-b']")):
        out = subprocess.run([sys.executable, "-m", "gpugroup.ptychopinn", *runner_args],
                             capture_output=True, text=True, env=env, cwd=tmp_path,
                             check=False)
        assert out.returncode == 0 and want in out.stdout, (runner_args, out.stderr)
    for runner_args, said in ((["missing.py"], "no such script"),
                              ([], "give a SCRIPT to run, or -m MODULE"),
                              (["--x", "hello_mod.py"], "(got '--x' first)"),
                              (["-m"], "-m needs a MODULE")):
        bad = subprocess.run([sys.executable, "-m", "gpugroup.ptychopinn", *runner_args],
                             capture_output=True, text=True, env=env, cwd=tmp_path,
                             check=False)
        assert bad.returncode == 2 and said in bad.stderr, (runner_args, bad.stderr)
    usage = subprocess.run([sys.executable, "-m", "gpugroup.ptychopinn", "--help"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
    assert usage.returncode == 0 and "-m MODULE" in usage.stdout


@pytest.mark.parametrize("gridsize", [1, 2])
def test_default_y_is_ptychopinns_cut_bit_for_bit_far_from_the_origin(gridsize):
    """RawData's default Y equals get_image_patches (PtychoPINN's float32 centres) at the
    grouped coordinates exactly, also where a float32 step is large (4000 px)."""
    rng = np.random.default_rng(5)
    n, N = 300, 8
    row, col = np.divmod(np.arange(n), 20)
    x = 4000.0 + col * 3.1 + rng.uniform(-0.7, 0.7, n)
    y = 4000.0 + row * 2.9 + rng.uniform(-0.7, 0.7, n)
    obj = (rng.random((4100, 4100)).astype(np.float32)
           * np.exp(1j * rng.random((4100, 4100)).astype(np.float32))).astype(np.complex64)
    raw = RawData.from_coords_without_pc(x, y, np.ones((n, N, N), np.float32),
                                         np.ones((N, N), np.complex64), None,
                                         objectGuess=obj, backend="cpu")
    d = raw.generate_grouped_data(N, K=7, nsamples=40, seed=3, gridsize=gridsize)
    want = gp.get_image_patches(obj, d["coords_offsets"], d["coords_relative"], N=N,
                                gridsize=gridsize)
    np.testing.assert_array_equal(d["Y"], want)
