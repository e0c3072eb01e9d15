"""The gpugroup command line end to end: simulate -> group (.npz/.h5/.zarr, --lazy), convert,
demo, info, cleanup-cache, errors."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpugroup import RawData, sample_groups
from gpugroup.cli import main

from conftest import needs, suffix_param

ROOT = Path(__file__).resolve().parent.parent
N = 16
n = 300


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """main() sets the root logger's level (-v); put it back after each test."""
    root = logging.getLogger()
    level = root.level
    yield
    root.setLevel(level)


@pytest.fixture(scope="module")
def scan_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("scan") / "scan.npz"
    assert main(["simulate", str(path), "--n", str(n), "--N", str(N), "--seed", "1"]) == 0
    return path


def _error_line(capsys, rc):
    """Assert exit status 2 and one 'gpugroup: error:' line without traceback; return it."""
    captured = capsys.readouterr()
    assert rc == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("gpugroup: error: ")
    assert "Traceback" not in captured.err
    return lines[0]


# --------------------------------------------------------------------------- simulate/group
def test_simulate_writes_a_scan(scan_file):
    raw = RawData.from_file(scan_file)
    assert len(raw) == n and raw.diff3d.shape == (n, N, N) and raw.objectGuess is not None
    assert raw.diff3d.dtype == np.float32


def test_group_end_to_end(scan_file, tmp_path, capsys):
    out = tmp_path / "grouped.npz"
    rc = main(["group", str(scan_file), "-o", str(out), "--gridsize", "2", "--K", "7",
               "--nsamples", "200", "--seed", "42", "--backend", "cpu"])  # --N omitted
    assert rc == 0
    summary = capsys.readouterr().out
    assert "seed 42" in summary and "200 groups" in summary and "C=4" in summary
    assert "backend cpu" in summary and str(out) in summary
    with np.load(out) as z:
        d = {k: z[k] for k in z.files}
    B, C = 200, 4
    assert d["nn_indices"].shape == (B, C) and d["nn_indices"].dtype == np.int32
    assert d["diffraction"].shape == (B, N, N, C) and d["diffraction"].dtype == np.float32
    assert d["X_full"].shape == (B, N, N, C) and d["X_full"].dtype == np.float32
    assert d["Y"].shape == (B, N, N, C) and d["Y"].dtype == np.complex64
    for key in ("coords_nn", "coords_start_nn", "coords_relative", "coords_start_relative"):
        assert d[key].shape == (B, 1, 2, C), key
    for key in ("coords_offsets", "coords_start_offsets"):
        assert d[key].shape == (B, 1, 2, 1), key
    assert "objectGuess" in d and int(d["seed"]) == 42
    raw = RawData.from_file(scan_file)
    expected = sample_groups(raw.xcoords, raw.ycoords, 200, 7, 4, seed=42, backend="cpu")
    np.testing.assert_array_equal(d["nn_indices"], expected)
    np.testing.assert_array_equal(d["diffraction"],
                                  np.moveaxis(raw.diff3d[expected], 1, -1))


def test_group_without_seed_reports_the_seed_it_used(scan_file, tmp_path, capsys):
    out = tmp_path / "g.npz"
    assert main(["group", str(scan_file), "-o", str(out), "--nsamples", "50",
                 "--backend", "cpu", "--no-diffraction"]) == 0
    summary = capsys.readouterr().out
    with np.load(out) as z:
        seed = int(z["seed"])
        nn = z["nn_indices"]
        assert "diffraction" not in z.files and "X_full" in z.files
    assert f"seed {seed}" in summary
    raw = RawData.from_file(scan_file)
    np.testing.assert_array_equal(
        nn, sample_groups(raw.xcoords, raw.ycoords, 50, 7, 4, seed=seed, backend="cpu"))


def test_sequential_says_that_a_seed_has_no_effect(scan_file, tmp_path, caplog, capsys):
    # PtychoPINN draws sequential members with seed 0: another --seed gives the same groups,
    # and the run says so at the default log level (not only under -v)
    got = []
    for seed in ("1", "2"):
        out = tmp_path / f"s{seed}.npz"
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert main(["group", str(scan_file), "-o", str(out), "--sequential", "--seed",
                         seed, "--nsamples", "50", "--backend", "cpu"]) == 0
        assert [r.getMessage() for r in caplog.records
                if f"--seed {seed} has no effect with --sequential" in r.getMessage()]
        with np.load(out) as z:
            got.append(z["nn_indices"])
            assert int(z["seed"]) == 0
    np.testing.assert_array_equal(got[0], got[1])
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # seed 0 (or none) is what it uses: nothing said
        assert main(["group", str(scan_file), "-o", str(tmp_path / "s0.npz"), "--sequential",
                     "--seed", "0", "--nsamples", "50", "--backend", "cpu"]) == 0
    assert not [r for r in caplog.records if "no effect" in r.getMessage()]


def test_group_options_oversample_and_pool(scan_file, tmp_path, capsys):
    out = tmp_path / "over.npz"
    assert main(["group", str(scan_file), "-o", str(out), "--N", str(N), "--nsamples",
                 str(2 * n), "--seed", "3", "--oversample", "--neighbor-pool-size", "9",
                 "--backend", "cpu"]) == 0
    raw = RawData.from_file(scan_file)
    expected = sample_groups(raw.xcoords, raw.ycoords, 2 * n, 9, 4, seed=3, backend="cpu",
                             enable_oversampling=True)
    with np.load(out) as z:
        np.testing.assert_array_equal(z["nn_indices"], expected)
    assert f"{2 * n} groups" in capsys.readouterr().out


# --------------------------------------------------------------------------- streamed outputs
GROUP_ARGS = ["--gridsize", "2", "--K", "7", "--nsamples", "200", "--seed", "42",
              "--backend", "cpu"]


@pytest.fixture(scope="module")
def in_memory(scan_file):
    """The library's in-memory result for GROUP_ARGS."""
    raw = RawData.from_file(scan_file)
    return raw.generate_grouped_data(N, K=7, nsamples=200, seed=42, gridsize=2,
                                     backend="cpu")


def _read_grouped(path):
    """nn_indices, X_full, diffraction, order and seed of a grouped output (any format)."""
    from gpugroup.io.grouped import open_grouped

    d = open_grouped(path)
    try:
        out = {k: d.get(k) for k in ("nn_indices", "X_full", "diffraction", "order", "seed")}
        return {k: np.asarray(v[...]) if hasattr(v, "shape") else v for k, v in out.items()}
    finally:
        if str(path).endswith(".h5"):
            d["X_full"].file.close()


@pytest.mark.parametrize("suffix", [suffix_param(s) for s in (".npz", ".h5", ".zarr")])
def test_group_streams_every_format(scan_file, in_memory, tmp_path, capsys, suffix):
    out = tmp_path / ("grouped" + suffix)
    assert main(["group", str(scan_file), "-o", str(out), "--chunk-mib", "1"]
                + GROUP_ARGS) == 0
    summary = capsys.readouterr().out
    assert "200 groups" in summary and "seed 42" in summary and str(out) in summary
    assert out.is_dir() if suffix == ".zarr" else out.is_file()
    got = _read_grouped(out)
    np.testing.assert_array_equal(got["nn_indices"], in_memory["nn_indices"])
    np.testing.assert_allclose(got["X_full"], in_memory["X_full"], rtol=1e-6)
    np.testing.assert_array_equal(got["diffraction"], in_memory["diffraction"])
    assert int(got["seed"]) == 42 and got["order"] is None
    assert not [p for p in tmp_path.iterdir() if p.name != out.name]  # no temporaries left


@needs("h5py")
def test_group_locality_order_and_no_overwrite(scan_file, in_memory, tmp_path, capsys):
    out = tmp_path / "grouped.hdf5"
    assert main(["group", str(scan_file), "-o", str(out), "--row-order", "locality"]
                + GROUP_ARGS) == 0
    assert "locality order" in capsys.readouterr().out
    got = _read_grouped(out)
    back = np.argsort(got["order"])
    np.testing.assert_array_equal(got["nn_indices"][back], in_memory["nn_indices"])
    np.testing.assert_allclose(got["X_full"][back], in_memory["X_full"], rtol=1e-6)
    before = out.read_bytes()
    line = _error_line(capsys, main(["group", str(scan_file), "-o", str(out),
                                     "--no-overwrite"] + GROUP_ARGS))
    assert "exists" in line
    assert out.read_bytes() == before


@needs("dask", "zarr")
def test_group_lazy_zarr(scan_file, in_memory, tmp_path, capsys):
    out = tmp_path / "lazy.zarr"
    assert main(["group", str(scan_file), "-o", str(out), "--lazy", "--chunk-mib", "1"]
                + GROUP_ARGS) == 0
    assert "200 groups" in capsys.readouterr().out
    got = _read_grouped(out)
    np.testing.assert_array_equal(got["nn_indices"], in_memory["nn_indices"])
    np.testing.assert_allclose(got["X_full"], in_memory["X_full"], rtol=1e-6)


def test_group_lazy_needs_zarr_output(scan_file, tmp_path, capsys):
    line = _error_line(capsys, main(["group", str(scan_file), "-o", str(tmp_path / "g.h5"),
                                     "--lazy"] + GROUP_ARGS))
    assert "--lazy" in line and ".zarr" in line
    assert not (tmp_path / "g.h5").exists()


def test_group_from_a_directory_of_npy(scan_file, in_memory, tmp_path, capsys):
    src = tmp_path / "scan_dir"
    src.mkdir()
    with np.load(scan_file) as z:
        for key in z.files:
            np.save(src / f"{key}.npy", z[key])
    out = tmp_path / "g.npz"
    assert main(["group", str(src), "-o", str(out)] + GROUP_ARGS) == 0
    got = _read_grouped(out)
    np.testing.assert_array_equal(got["nn_indices"], in_memory["nn_indices"])
    np.testing.assert_allclose(got["X_full"], in_memory["X_full"], rtol=1e-6)


# --------------------------------------------------------------------------- convert
@pytest.fixture(scope="module")
def compressed_scan(scan_file, tmp_path_factory):
    path = tmp_path_factory.mktemp("compressed") / "scan_c.npz"
    with np.load(scan_file) as z:
        np.savez_compressed(path, **{k: z[k] for k in z.files})
    return path


@pytest.mark.parametrize("suffix", [suffix_param(s) for s in (".npz", ".h5", ".zarr")])
def test_convert_compressed_npz_round_trip(compressed_scan, tmp_path, capsys, suffix):
    out = tmp_path / ("scan" + suffix)
    assert main(["convert", str(compressed_scan), str(out), "--slab-mib", "1"]) == 0
    summary = capsys.readouterr().out
    assert f"converted {n} frames ({N}x{N} float32)" in summary and str(out) in summary
    original = RawData.from_file(compressed_scan).to_dict()
    raw = RawData.from_file(out, mmap_mode="r", backend="cpu")
    try:
        assert not isinstance(raw.diff3d, np.ndarray) or isinstance(raw.diff3d, np.memmap)
        got = raw.to_dict()
        assert sorted(got) == sorted(original)
        for key, value in original.items():
            np.testing.assert_array_equal(np.asarray(got[key][...]), value, err_msg=key)
    finally:
        if suffix == ".h5":
            raw.diff3d.file.close()
    assert not [p for p in tmp_path.iterdir() if p.name != out.name]


@needs("h5py", "zarr")
def test_convert_then_group_from_zarr_directory(compressed_scan, in_memory, tmp_path, capsys):
    store = tmp_path / "scan.zarr"
    assert main(["convert", str(compressed_scan), str(store)]) == 0
    out = tmp_path / "g.h5"
    assert main(["group", str(store), "-o", str(out)] + GROUP_ARGS) == 0
    got = _read_grouped(out)
    np.testing.assert_array_equal(got["nn_indices"], in_memory["nn_indices"])
    np.testing.assert_allclose(got["X_full"], in_memory["X_full"], rtol=1e-6)


def test_group_compressed_npz_loads_in_memory_with_a_warning(compressed_scan, in_memory,
                                                             tmp_path, caplog):
    out = tmp_path / "g.npz"
    with caplog.at_level(logging.WARNING):
        assert main(["group", str(compressed_scan), "-o", str(out)] + GROUP_ARGS) == 0
    assert any("gpugroup convert" in r.getMessage() and "into memory" in r.getMessage()
               for r in caplog.records)
    with np.load(out) as got:
        np.testing.assert_array_equal(got["nn_indices"], in_memory["nn_indices"])


def test_convert_errors(compressed_scan, scan_file, tmp_path, capsys):
    line = _error_line(capsys, main(["convert", str(tmp_path / "nope.npz"),
                                     str(tmp_path / "o.npz")]))
    assert "nope.npz" in line and "does not exist" in line
    line = _error_line(capsys, main(["convert", str(compressed_scan), str(tmp_path / "o.txt")]))
    assert "OUT" in line and ".txt" in line
    line = _error_line(capsys, main(["convert", str(scan_file), str(scan_file)]))
    assert "is the input scan" in line
    out = tmp_path / "o.npz"
    out.write_bytes(b"keep me")
    line = _error_line(capsys, main(["convert", str(compressed_scan), str(out),
                                     "--no-overwrite"]))
    assert "exists" in line and out.read_bytes() == b"keep me"


# --------------------------------------------------------------------------- demo / info
@needs("matplotlib")
def test_demo_writes_png(tmp_path, capsys):
    rc = main(["demo", "--n", str(n), "--N", str(N), "--nsamples", "100",
               "--outdir", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    png = tmp_path / "gpugroup-demo.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "seed 0" in out and str(png) in out


def test_demo_no_plot_writes_nothing(tmp_path, capsys):
    assert main(["demo", "--n", "100", "--N", str(N), "--nsamples", "20", "--outdir",
                 str(tmp_path), "--no-plot"]) == 0
    assert list(tmp_path.iterdir()) == []
    assert "20 groups" in capsys.readouterr().out


def test_demo_into_a_missing_directory_says_to_create_it(tmp_path, capsys):
    rc = main(["demo", "--n", "100", "--outdir", str(tmp_path / "nope"), "--no-plot"])
    assert "is not an existing directory; create it first" in _error_line(capsys, rc)


# --------------------------------------------------------------------------- group: size, plan
def test_group_prints_the_estimated_size_first(scan_file, tmp_path, capsys):
    from gpugroup.streamed import estimate_grouped_bytes

    out = tmp_path / "g.npz"
    assert main(["group", str(scan_file), "-o", str(out)] + GROUP_ARGS) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("estimated output: ")
    assert "200 groups of C=4" in lines[0]
    # the simulated scan has an objectGuess: written too, and most of a small output
    assert "diffraction + X_full + Y + objectGuess)" in lines[0]
    estimate = estimate_grouped_bytes(RawData.from_file(scan_file), B=200, C=4, N=N)
    written = out.stat().st_size
    assert estimate <= written <= estimate * 1.05, (estimate, written)  # NPZ headers only


@pytest.mark.parametrize("suffix", [suffix_param(s) for s in (".npz", ".h5", ".zarr")])
def test_group_dry_run_prints_the_plan_and_writes_nothing(scan_file, tmp_path, capsys,
                                                          suffix):
    out = tmp_path / ("g" + suffix)
    rc = main(["group", str(scan_file), "-o", str(out), "--dry-run", "--no-diffraction",
               "--row-order", "locality"] + GROUP_ARGS)
    assert rc == 0
    text = capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
    assert "dry run: nothing written" in text and "200 of C=4" in text
    assert "seed 42" in text and "backend  cpu" in text
    assert {".npz": "(npz", ".h5": "(hdf5", ".zarr": "(zarr"}[suffix] in text
    assert "diffraction" not in text.splitlines()[0] and "rows locality" in text
    from gpugroup.streamed import estimate_grouped_bytes

    size = estimate_grouped_bytes(RawData.from_file(scan_file), B=200, C=4, N=N,
                        keep_diffraction=False, locality=True)
    assert f"{size} bytes" in text


def test_group_dry_run_checks_like_the_real_run(scan_file, tmp_path, capsys):
    line = _error_line(capsys, main(["group", str(scan_file), "-o", str(tmp_path / "g.h5"),
                                     "--dry-run", "--K", "3", "--backend", "cpu"]))
    assert "K=3" in line
    assert list(tmp_path.iterdir()) == []


def test_group_dry_run_draws_and_prints_a_seed(scan_file, tmp_path, capsys):
    assert main(["group", str(scan_file), "-o", str(tmp_path / "g.npz"), "--dry-run",
                 "--backend", "cpu", "--nsamples", "10"]) == 0
    assert "(drawn: pass --seed to repeat it)" in capsys.readouterr().out


def test_group_dry_run_caps_nsamples_like_the_real_run(scan_file, tmp_path, capsys):
    """The default --nsamples (10 000) on a scan of 300 positions: the real run makes 300
    groups with a warning (no --oversample), and so does the plan."""
    out = tmp_path / "g.npz"
    assert main(["group", str(scan_file), "-o", str(out), "--dry-run", "--seed", "1",
                 "--backend", "cpu"]) == 0
    assert f"groups   {n} of C=4" in capsys.readouterr().out
    assert main(["group", str(scan_file), "-o", str(out), "--seed", "1",
                 "--backend", "cpu"]) == 0
    assert f"{n} groups of C=4" in capsys.readouterr().out


def test_a_pool_larger_than_the_scan_is_said(scan_file, tmp_path, capsys, caplog):
    """K beyond the number of positions: every pool is the whole scan; the plan prints the
    pool used and a warning says so (the groups are those of K = n)."""
    out = tmp_path / "g.npz"
    with caplog.at_level(logging.WARNING):
        assert main(["group", str(scan_file), "-o", str(out), "--dry-run", "--seed", "1",
                     "--K", "100000", "--nsamples", "20", "--backend", "cpu"]) == 0
    assert f"pool {n}: the whole scan, 100000 asked" in capsys.readouterr().out
    assert [r for r in caplog.records
            if f"K=100000 is more than the scan's n={n} positions" in r.getMessage()]
    raw = RawData.from_file(scan_file)
    np.testing.assert_array_equal(
        sample_groups(raw.xcoords, raw.ycoords, 20, 100000, 4, seed=1, backend="cpu"),
        sample_groups(raw.xcoords, raw.ycoords, 20, n, 4, seed=1, backend="cpu"))


@pytest.mark.parametrize("suffix", [".npz", suffix_param(".h5"), suffix_param(".zarr")])
def test_a_grouped_output_given_as_the_scan_is_named(scan_file, tmp_path, capsys, suffix):
    grouped = tmp_path / f"grouped{suffix}"
    assert main(["group", str(scan_file), "-o", str(grouped), *GROUP_ARGS]) == 0
    capsys.readouterr()
    line = _error_line(capsys, main(["group", str(grouped), "-o", str(tmp_path / "again.npz"),
                                     *GROUP_ARGS]))
    assert f"{str(grouped)!r} is a grouped output (it holds nn_indices and X_full), not a " \
           f"scan; give the scan it was grouped from" in line
    with pytest.raises(ValueError, match="is a grouped output"):
        RawData.from_file(grouped)
    # and the other way round: a scan opened as a grouped output
    from gpugroup.io.grouped import open_grouped

    scan_copy = tmp_path / f"scan{suffix}"
    RawData.from_file(scan_file).to_file(scan_copy)
    with pytest.raises(ValueError, match=r"is not a grouped output: it has no nn_indices or "
                                         r"X_full \(a scan\? read a scan with RawData"):
        open_grouped(scan_copy)
    # the fields found are those the file holds ('diffraction', not the name it maps to)
    partial = tmp_path / "partial.npz"
    np.savez(partial, xcoords=np.zeros(4), ycoords=np.zeros(4),
             diffraction=np.ones((4, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"lacks required field\(s\) \['probeGuess'\] "
                                         r"\(found: \['diffraction', 'xcoords', 'ycoords'\]"):
        RawData.from_file(partial)


def test_oversampling_errors_name_the_command_line_options(scan_file, tmp_path, capsys):
    out = str(tmp_path / "g.npz")  # (without --oversample the CLI makes n groups, warning)
    line = _error_line(capsys, main(["group", str(scan_file), "-o", out, "--nsamples",
                                     str(2 * n), "--oversample", "--neighbor-pool-size", "3",
                                     "--seed", "1", "--backend", "cpu"]))
    assert "neighbor_pool_size=3" in line and "--neighbor-pool-size on the command line" in line


# --------------------------------------------------------------------------- show
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_show_a_scan(scan_file, tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    assert main(["show", str(scan_file), "--nsamples", "50", "--backend", "cpu"]) == 0
    png = tmp_path / "scan.png"  # default: IN's name with .png, in the current directory
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert "wrote scan.png" in capsys.readouterr().out
    # -o without a suffix: a PNG, as matplotlib writes one, named as written
    assert main(["show", str(scan_file), "--nsamples", "50", "--backend", "cpu",
                 "-o", "pic"]) == 0
    assert (tmp_path / "pic.png").read_bytes()[:8] == PNG_MAGIC
    assert "wrote pic.png" in capsys.readouterr().out
    assert main(["show", str(scan_file), "--nsamples", "50", "--backend", "cpu",
                 "-o", "dot."]) == 0  # as matplotlib: "dot." is written as dot.png
    assert (tmp_path / "dot.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("suffix", [suffix_param(s) for s in (".npz", ".h5", ".zarr")])
def test_show_a_grouped_output_alone_and_with_its_scan(scan_file, tmp_path, capsys, suffix):
    pytest.importorskip("matplotlib")
    grouped = tmp_path / ("g" + suffix)
    assert main(["group", str(scan_file), "-o", str(grouped)] + GROUP_ARGS) == 0
    alone, both = tmp_path / "alone.png", tmp_path / "both.png"
    assert main(["show", str(grouped), "-o", str(alone)]) == 0
    assert main(["show", str(scan_file), "--groups", str(grouped), "-o", str(both)]) == 0
    assert alone.read_bytes()[:8] == PNG_MAGIC and both.read_bytes()[:8] == PNG_MAGIC
    if suffix == ".h5":  # the grouped file was closed: it can be replaced
        assert main(["group", str(scan_file), "-o", str(grouped)] + GROUP_ARGS) == 0


def test_show_a_scan_without_object(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    yy, xx = np.divmod(np.arange(100.0), 10)
    raw = RawData.from_coords_without_pc(xx * 4, yy * 4,
                                         np.random.default_rng(0).random((100, 8, 8),
                                                                         np.float32),
                                         np.ones((8, 8), np.complex64), None)
    scan = tmp_path / "plain.npz"
    raw.to_file(scan)
    assert main(["show", str(scan), "-o", str(tmp_path / "p.png"), "--backend", "cpu",
                 "--gridsize", "1"]) == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG_MAGIC


def test_show_errors(scan_file, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    line = _error_line(capsys, main(["show", str(tmp_path / "missing.npz")]))
    assert "does not exist" in line
    line = _error_line(capsys, main(["show", str(scan_file), "--groups", str(scan_file)]))
    assert "not a grouped output" in line
    small = tmp_path / "small.npz"
    assert main(["simulate", str(small), "--n", "20", "--N", str(N)]) == 0
    grouped = tmp_path / "g.npz"
    assert main(["group", str(scan_file), "-o", str(grouped)] + GROUP_ARGS) == 0
    capsys.readouterr()
    line = _error_line(capsys, main(["show", str(small), "--groups", str(grouped)]))
    assert "not a grouped output of IN" in line
    line = _error_line(capsys, main(["show", str(grouped), "--groups", str(grouped)]))
    assert "already a grouped output" in line
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("name, fix", [
    ("nodir/x.png", r"the directory '.*nodir' does not exist; create it first"),
    ("x.txt", r"matplotlib cannot write \.txt; end the name with one of .*\.png"),
    ("sub/", r"a directory; give a file name, e.g. '.*picture\.png'")])
def test_show_names_a_bad_output(scan_file, tmp_path, capsys, name, fix):
    pytest.importorskip("matplotlib")
    out = os.path.join(str(tmp_path), name)
    line = _error_line(capsys, main(["show", str(scan_file), "-o", out, "--backend", "cpu"]))
    assert re.search(f"-o {re.escape(repr(out))}: {fix}", line), line
    assert list(tmp_path.iterdir()) == []


def test_show_without_matplotlib_says_what_to_install(scan_file, tmp_path, capsys,
                                                      monkeypatch):
    import importlib.util as util

    real = util.find_spec
    monkeypatch.setattr(util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    line = _error_line(capsys, main(["show", str(scan_file), "-o", str(tmp_path / "s.png")]))
    assert "pip install 'gpugroup[plot]'" in line
    assert list(tmp_path.iterdir()) == []


def test_info_via_python_m():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "gpugroup", "info"], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "gpugroup 0." in out and "numpy" in out and "scipy" in out
    assert "backends:" in out and "cpu  available" in out and "gpu " in out
    assert "GPUs seen:" in out
    for pkg in ("cupy", "cuml", "dask", "distributed", "h5py", "zarr", "sklearn",
                "matplotlib", "tqdm", "psutil"):
        assert pkg in out


def test_info_says_which_optional_package_is_broken(tmp_path, monkeypatch, capsys):
    """An installed package that fails to import (a mismatched dask/distributed pair) is
    'broken: <error>', not a version."""
    import gpugroup.cli

    (tmp_path / "gpugroup_broken_pkg.py").write_text(
        "raise ImportError(\"cannot import name 'collections_to_dsk' from 'dask.base'\")\n")
    (tmp_path / "gpugroup_fine_pkg.py").write_text("__version__ = '1.2.3'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(gpugroup.cli.commands, "OPTIONAL_PACKAGES",
                        ("gpugroup_broken_pkg", "gpugroup_fine_pkg", "gpugroup_absent_pkg"))
    assert main(["info"]) == 0
    lines = {line.split()[0]: line.split(None, 1)[1] for line in
             capsys.readouterr().out.split("optional packages:")[1].strip().splitlines()}
    assert lines["gpugroup_broken_pkg"] == (
        "broken: ImportError: cannot import name 'collections_to_dsk' from 'dask.base'")
    assert lines["gpugroup_fine_pkg"] == "1.2.3"
    assert lines["gpugroup_absent_pkg"] == "not installed"


def test_help_and_argparse_errors_exit_codes(capsys):
    assert main(["--help"]) == 0
    assert "examples:" in capsys.readouterr().out
    assert main([]) == 2
    assert main(["group", "x.npz"]) == 2  # -o missing
    assert main(["simulate", "x.npz", "--nn", "3"]) == 2  # no abbreviations either
    assert main(["demo", "--nsample", "3"]) == 2
    # said by the command, with the option likely meant
    err = capsys.readouterr().err
    assert "usage: gpugroup demo" in err and err.strip().splitlines()[-1] == (
        "gpugroup demo: error: unrecognized arguments: --nsample 3 (did you mean --nsamples?)")
    assert main(["group", "x.npz", "-o", "y.npz", "stray"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "gpugroup group: error: unrecognized arguments: stray")
    assert main(["--dry-run", "group", "x.npz", "-o", "y.npz"]) == 2  # before COMMAND
    err = capsys.readouterr().err
    assert err.startswith("usage: gpugroup [-h]") and err.strip().splitlines()[-1] == (
        "gpugroup: error: unrecognized arguments: --dry-run")
    assert main(["group", "x.npz", "-o", "y.npz", "--row-order", "random"]) == 2
    assert main(["group", "x.npz", "-o", "y.npz", "--chunk-mib", "0"]) == 2
    assert main(["convert", "x.npz"]) == 2  # OUT missing
    capsys.readouterr()


# --------------------------------------------------------------------------- cleanup-cache
@pytest.fixture
def cache_tree(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "a.groups_cache.npz").write_bytes(b"x" * 100)
    (root / "sub" / "b.groups_cache.npz").write_bytes(b"y" * 50)
    (root / "keep.npz").write_bytes(b"z" * 10)
    (outside / "o.groups_cache.npz").write_bytes(b"o" * 30)
    (root / "link.groups_cache.npz").symlink_to(outside / "o.groups_cache.npz")
    (root / "linkdir").symlink_to(outside, target_is_directory=True)
    return root, outside


def test_cleanup_cache_dry_run_lists_and_keeps(cache_tree, capsys):
    root, outside = cache_tree
    assert main(["cleanup-cache", str(root), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "a.groups_cache.npz" in out and "b.groups_cache.npz" in out
    assert "nothing deleted" in out
    assert "keep.npz" not in out
    assert (root / "a.groups_cache.npz").exists() and (root / "sub" / "b.groups_cache.npz").exists()


def test_cleanup_cache_deletes_but_not_through_symlinks(cache_tree, capsys):
    root, outside = cache_tree
    assert main(["cleanup-cache", str(root), "--yes"]) == 0
    out = capsys.readouterr().out
    assert not (root / "a.groups_cache.npz").exists()
    assert not (root / "sub" / "b.groups_cache.npz").exists()
    assert (root / "keep.npz").exists()
    assert (outside / "o.groups_cache.npz").exists()  # target outside DIR untouched
    assert (root / "link.groups_cache.npz").is_symlink()  # the link is skipped, not followed
    assert "removed 2 file(s)" in out and "150 B" in out
    assert "skip" in out and "outside" in out
    assert main(["cleanup-cache", str(root)]) == 0
    assert "no *.groups_cache.npz files" in capsys.readouterr().out


def test_cleanup_cache_bad_dir(tmp_path, capsys):
    line = _error_line(capsys, main(["cleanup-cache", str(tmp_path / "nope")]))
    assert "DIR" in line and "nope" in line


# --------------------------------------------------------------------------- errors
def test_error_missing_input(tmp_path, capsys):
    line = _error_line(capsys, main(["group", str(tmp_path / "missing.npz"), "-o",
                                     str(tmp_path / "o.npz")]))
    assert "missing.npz" in line and "does not exist" in line


def test_error_corrupt_npz(tmp_path, capsys):
    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    line = _error_line(capsys, main(["group", str(bad), "-o", str(tmp_path / "o.npz")]))
    assert "corrupt.npz" in line
    assert not (tmp_path / "o.npz").exists()


def test_error_k_below_c(scan_file, tmp_path, capsys):
    line = _error_line(capsys, main(["group", str(scan_file), "-o", str(tmp_path / "o.npz"),
                                     "--gridsize", "3", "--K", "4", "--backend", "cpu"]))
    assert "K" in line and "must be >=" in line
    assert not (tmp_path / "o.npz").exists()


def test_error_frame_size_and_output_format(scan_file, tmp_path, capsys):
    line = _error_line(capsys, main(["group", str(scan_file), "-o", str(tmp_path / "o.npz"),
                                     "--N", "32", "--backend", "cpu"]))
    assert "N=32" in line
    line = _error_line(capsys, main(["group", str(scan_file), "-o", str(tmp_path / "o.txt")]))
    assert ".txt" in line and "-o" in line and ".zarr" in line
    line = _error_line(capsys, main(["group", str(scan_file), "-o", str(tmp_path / "o.cxi")]))
    assert ".cxi" in line and "-o" in line
    outdir = tmp_path / "outd"
    outdir.mkdir()
    for cmd in (["group", str(scan_file), "-o"], ["simulate"], ["convert", str(scan_file)]):
        line = _error_line(capsys, main([*cmd, f"{outdir}/"]))
        assert f"is a directory; name the output file in it, e.g. '{outdir}/NAME.npz'" in line
    line = _error_line(capsys, main(["simulate", str(tmp_path / "no" / "dir" / "s.npz")]))
    assert "does not exist" in line


def test_error_traceback_only_with_vv(tmp_path, capsys):
    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(b"not a zip file at all")
    assert main(["-vv", "group", str(bad), "-o", str(tmp_path / "o.npz")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("gpugroup: error:")


# --------------------------------------------------------------------------- logging
def test_verbose_emits_info_logs(scan_file, tmp_path, caplog, capsys):
    caplog.set_level(logging.NOTSET)
    out = str(tmp_path / "g.npz")
    args = ["group", str(scan_file), "-o", out, "--nsamples", "20", "--seed", "1",
            "--backend", "cpu"]
    assert main(args) == 0
    assert not [r for r in caplog.records if r.levelno == logging.INFO]
    caplog.clear()
    assert main(["-v"] + args) == 0
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert any(r.name.startswith("gpugroup") and "sample_groups" in r.getMessage()
               for r in infos)
    assert not [r for r in caplog.records if r.levelno == logging.DEBUG]
    caplog.clear()
    assert main(args + ["-v"]) == 0  # -v after the subcommand works too
    assert [r for r in caplog.records if r.levelno == logging.INFO]
    caplog.clear()
    assert main(["-v"] + args + ["-v"]) == 0  # before and after add up: DEBUG
    assert logging.getLogger().level == logging.DEBUG


class _FakeTTY:
    """A text stream that claims to be a terminal (tqdm draws only on TTYs)."""

    def __init__(self):
        import io

        self.buffer = io.StringIO()

    def write(self, text):
        return self.buffer.write(text)

    def flush(self):
        pass

    def isatty(self):
        return True


@needs("tqdm")
def test_progress_bar_on_a_terminal(scan_file, tmp_path, monkeypatch, capsys):
    fake = _FakeTTY()
    monkeypatch.setattr(sys, "stderr", fake)
    assert main(["group", str(scan_file), "-o", str(tmp_path / "g.npz"), "--nsamples", "50",
                 "--seed", "1", "--backend", "cpu"]) == 0
    assert "assembling" in fake.buffer.getvalue() and "/50" in fake.buffer.getvalue()
    assert main(["convert", str(scan_file), str(tmp_path / "s.h5")]) == 0
    assert "converting" in fake.buffer.getvalue() and "frame" in fake.buffer.getvalue()


def test_cleanup_cache_asks_on_a_terminal(cache_tree, monkeypatch, capsys):
    root, _ = cache_tree
    monkeypatch.setattr(sys, "stdin", _FakeTTY())
    monkeypatch.setattr("builtins.input", lambda prompt="": "n")
    assert main(["cleanup-cache", str(root)]) == 0
    assert "nothing deleted" in capsys.readouterr().out
    assert (root / "a.groups_cache.npz").exists()
    monkeypatch.setattr("builtins.input", lambda prompt="": "y")
    assert main(["cleanup-cache", str(root)]) == 0
    assert not (root / "a.groups_cache.npz").exists()


# --------------------------------------------------------------------------- safety and signals
def test_group_refuses_to_write_over_its_input_through_a_link(scan_file, tmp_path, capsys):
    own = tmp_path / "s.npz"
    own.write_bytes(scan_file.read_bytes())
    link = tmp_path / "link.npz"
    link.symlink_to(own)
    before = own.read_bytes()
    for src, out in ((link, own), (own, link)):
        line = _error_line(capsys, main(["group", str(src), "-o", str(out)] + GROUP_ARGS))
        assert "is the input scan" in line
        line = _error_line(capsys, main(["convert", str(src), str(out)]))
        assert "is the input scan" in line
    assert own.read_bytes() == before


def test_output_checks_come_before_any_work(scan_file, tmp_path, capsys, monkeypatch):
    import gpugroup.cli

    def fail(*a, **k):
        raise AssertionError("grouping ran before the output was checked")

    monkeypatch.setattr(gpugroup.cli.commands, "run_grouping", fail)
    folder = tmp_path / "d.npz"
    folder.mkdir()
    line = _error_line(capsys, main(["group", str(scan_file), "-o", str(folder)] + GROUP_ARGS))
    assert "existing directory" in line and folder.is_dir()
    kept = tmp_path / "kept.h5"
    kept.write_bytes(b"keep me")
    line = _error_line(capsys, main(["group", str(scan_file), "-o", str(kept), "--no-overwrite"]
                                    + GROUP_ARGS))
    assert "--overwrite on the command line" in line
    line = _error_line(capsys, main(["simulate", str(kept), "--no-overwrite"]))
    assert "--overwrite on the command line" in line and kept.read_bytes() == b"keep me"
    plain = tmp_path / "plain.zarr"
    plain.mkdir()
    (plain / "notes.txt").write_text("not a store")
    line = _error_line(capsys, main(["group", str(scan_file), "-o", str(plain)] + GROUP_ARGS))
    assert "not a Zarr store" in line and (plain / "notes.txt").exists()


@needs("h5py")
def test_key_option_names_fields_stored_under_other_names(scan_file, in_memory, tmp_path,
                                                          capsys):
    with np.load(scan_file) as z:
        members = {("frames" if k == "diff3d" else k): z[k] for k in z.files}
    src = tmp_path / "renamed.npz"
    np.savez(src, **members)
    line = _error_line(capsys, main(["group", str(src), "-o", str(tmp_path / "g.npz")]
                                    + GROUP_ARGS))
    assert "--key FIELD=PATH" in line  # the missing-field error says how to name it
    out = tmp_path / "g.npz"
    assert main(["group", str(src), "-o", str(out), "--key", "diff3d=frames"] + GROUP_ARGS) == 0
    np.testing.assert_array_equal(_read_grouped(out)["nn_indices"], in_memory["nn_indices"])
    assert main(["convert", str(src), str(tmp_path / "c.h5"), "--key", "diff3d=frames"]) == 0
    assert RawData.from_file(tmp_path / "c.h5").diff3d.shape == (n, N, N)
    assert main(["group", str(src), "-o", str(out), "--key", "diff3d"]) == 2  # no '='
    assert "expected FIELD=PATH" in capsys.readouterr().err


def test_seed_with_leading_zeros(scan_file, tmp_path, capsys):
    assert main(["group", str(scan_file), "-o", str(tmp_path / "a.npz"), "--seed", "007",
                 "--nsamples", "10", "--backend", "cpu"]) == 0
    assert "seed 7 " in capsys.readouterr().out
    assert main(["group", str(scan_file), "-o", str(tmp_path / "b.npz"), "--seed", "0x2a",
                 "--nsamples", "10", "--backend", "cpu"]) == 0
    assert "seed 42 " in capsys.readouterr().out


def test_sigterm_mid_write_removes_the_partial_output(scan_file, tmp_path, monkeypatch,
                                                      capsys):
    import signal

    import gpugroup.cli

    def progress_bar(total, desc, unit="group"):
        return lambda k: os.kill(os.getpid(), signal.SIGTERM), lambda: None

    monkeypatch.setattr(gpugroup.cli.process, "progress_bar", progress_bar)
    before = signal.getsignal(signal.SIGTERM)
    rc = main(["group", str(scan_file), "-o", str(tmp_path / "g.npz"), "--chunk-mib", "1"]
              + GROUP_ARGS)
    assert rc == 143 and "terminated" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither OUT nor its temporary
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is restored


def test_out_of_memory_is_one_line(scan_file, tmp_path, monkeypatch, capsys):
    def too_big(*a, **k):
        raise MemoryError("Unable to allocate 7.28 TiB")

    monkeypatch.setattr(RawData, "generate_grouped_data", too_big)
    line = _error_line(capsys, main(["group", str(scan_file), "-o", str(tmp_path / "g.npz")]
                                    + GROUP_ARGS))
    assert "out of memory" in line and "7.28 TiB" in line and "--nsamples" in line


def test_a_closed_stdout_is_not_an_error(monkeypatch, capsys):
    class Gone:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Gone())
    assert main(["info"]) == 141
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("unbuffered", [False, True])
def test_a_reader_that_left_gives_141_quietly(unbuffered):
    """A real pipe whose reader has gone (as after `| head -1`), with Python's stdout
    buffered or not (PYTHONUNBUFFERED, common in containers and CI)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader leaves before gpugroup writes a line
    try:
        proc = subprocess.run([sys.executable, "-m", "gpugroup", "info"], stdout=write_end,
                              stderr=subprocess.PIPE, env=env, timeout=300)
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr.decode()) == (141, "")


def test_a_closed_stdout_descriptor_is_not_a_crash():
    """Started with stdout closed (``gpugroup info >&-``): Python has no sys.stdout."""
    proc = subprocess.run([sys.executable, "-c", "import os, sys; os.close(1); "
                           "os.execv(sys.executable, [sys.executable, '-m', 'gpugroup', 'info'])"],
                          stderr=subprocess.PIPE, text=True, timeout=300)
    assert (proc.returncode, proc.stderr) == (0, "")


def test_a_broken_pipe_elsewhere_is_reported(scan_file, tmp_path, monkeypatch, capsys):
    def pipe_gone(*a, **k):
        raise BrokenPipeError(32, "Broken pipe (a worker's socket)")

    monkeypatch.setattr(RawData, "generate_grouped_data", pipe_gone)
    line = _error_line(capsys, main(["group", str(scan_file), "-o", str(tmp_path / "g.npz")]
                                    + GROUP_ARGS))
    assert "a worker's socket" in line


def test_a_second_sigterm_does_not_interrupt_the_clean_up(scan_file, tmp_path, monkeypatch,
                                                          capsys):
    import signal

    import gpugroup.cli
    import gpugroup.io.atomic

    def progress_bar(total, desc, unit="group"):
        return lambda k: os.kill(os.getpid(), signal.SIGTERM), lambda: None

    real_remove = gpugroup.io.atomic._remove

    def remove_while_signalled(tmp):
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler repeating its signal
        real_remove(tmp)

    monkeypatch.setattr(gpugroup.cli.process, "progress_bar", progress_bar)
    monkeypatch.setattr(gpugroup.io.atomic, "_remove", remove_while_signalled)
    rc = main(["group", str(scan_file), "-o", str(tmp_path / "g.zarr"), "--chunk-mib", "1"]
              + GROUP_ARGS)
    assert rc == 143
    assert list(tmp_path.iterdir()) == []


@needs("h5py")
def test_a_ctrl_c_that_python_dropped_still_stops_the_run(scan_file, tmp_path, monkeypatch,
                                                          capsys):
    """h5py runs weakref callbacks while it writes; a KeyboardInterrupt raised inside one is
    dropped by Python ("Exception ignored in ..."). The next progress step raises it."""
    import signal

    import gpugroup.cli

    class DropsItsInterrupt:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(1000))  # the handler runs in here, where its exception is dropped

    steps = []

    def progress_bar(total, desc, unit="group"):
        def update(k):
            steps.append(k)
            if len(steps) == 1:
                DropsItsInterrupt()

        return update, lambda: None

    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: dropped.append(u.exc_type))
    monkeypatch.setattr(gpugroup.cli.process, "progress_bar", progress_bar)
    rc = main(["group", str(scan_file), "-o", str(tmp_path / "g.h5"), "--chunk-mib", "1"]
              + GROUP_ARGS)
    assert dropped == [KeyboardInterrupt]  # Python did drop it
    assert rc == 130 and len(steps) == 1 and "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_sigterm_stays_ignored():
    code = ("import os, signal, sys\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "from gpugroup.cli.process import raise_on_signals\n"
            "restore = raise_on_signals()\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "restore()\n"
            "print('survived', signal.getsignal(signal.SIGTERM) == signal.SIG_IGN)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.stdout.strip() == "survived True", done.stderr


def test_damaged_npz_scans_are_one_error_line(scan_file, tmp_path, capsys):
    """A damaged .npy header (its length field) or zip directory (a zip64 locator that
    names another disk): one line naming the file, for group and convert alike."""
    import zipfile

    from gpugroup.io import npz

    data = bytearray(scan_file.read_bytes())
    with zipfile.ZipFile(scan_file) as zf, open(scan_file, "rb") as fh:
        start = npz.member_data_offset(fh, zf.getinfo("diff3d.npy"))
    header = bytearray(data)
    header[start + 8] ^= 0xFF
    locator = bytearray(data)
    locator[locator.rfind(b"PK\x06\x07") + 16] = 0xFF
    for name, damaged, says in (("header.npz", header, "(member 'diff3d'): its .npy header"),
                                ("locator.npz", locator, "span multiple disks")):
        path = tmp_path / name
        path.write_bytes(damaged)
        for cmd in (["group", str(path), "-o", str(tmp_path / "o.npz")],
                    ["convert", str(path), str(tmp_path / "c.npz")]):
            line = _error_line(capsys, main(cmd))
            assert name in line and says in line and "write it again" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["header.npz", "locator.npz"]
