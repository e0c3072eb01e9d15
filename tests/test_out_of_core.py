"""Streamed grouped outputs (``generate_grouped_data(..., out=...)``): equal to the eager
result, bounded peak memory (measured in a subprocess), and atomic writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gpugroup import RawData, assembly
from gpugroup.dataset import GroupedDataset
from gpugroup.io.grouped import open_grouped

from conftest import assert_same_grouped

h5py = pytest.importorskip("h5py")
zarr = pytest.importorskip("zarr")

FORMATS = ["grouped.h5", "grouped.zarr", "grouped.npz"]


def make_raw(n=300, N=8, y="object", seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    row, col = np.divmod(np.arange(n), 20)
    x = col + rng.uniform(-0.3, 0.3, n)
    yc = row + rng.uniform(-0.3, 0.3, n)
    diff = (rng.random((n, N, N)) * 100).astype(dtype)
    probe = np.ones((N, N), np.complex64)
    kw = {}
    if y == "object":
        kw["objectGuess"] = (rng.random((30, 40)) + 1j * rng.random((30, 40))).astype(
            np.complex64)
    elif y == "stack":
        kw["Y"] = (rng.random((n, N, N)) + 1j).astype(np.complex64)
    return RawData(x, yc, x, yc, diff, probe, None, backend="cpu", **kw)


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("source", ["memory", "npz", "h5", "zarr"])
def test_streamed_output_equals_eager(tmp_path, name, source):
    raw = make_raw(y="stack" if source in ("h5", "zarr") else "object",
                   dtype=np.uint16 if source == "npz" else np.float32)
    want = raw.generate_grouped_data(8, K=7, nsamples=150, seed=4, gridsize=2)
    if source != "memory":
        raw.to_file(tmp_path / f"scan.{source}")
        raw = RawData.from_file(tmp_path / f"scan.{source}", mmap_mode="r", backend="cpu")
    done = []
    got = raw.generate_grouped_data(8, K=7, nsamples=150, seed=4, gridsize=2,
                                    out=tmp_path / name, chunk_bytes=20_000,
                                    progress=done.append)
    assert sum(done) == 150 and len(done) > 3
    assert_same_grouped(got, want, exact=True)
    assert got["path"] == str(tmp_path / name)
    kind = {"h5": h5py.Dataset, "zarr": zarr.Array, "npz": np.memmap}[name.split(".")[1]]
    assert isinstance(got["X_full"], kind) and isinstance(got["coords_nn"], np.ndarray)
    assert_same_grouped(open_grouped(tmp_path / name), want, exact=True)
    if name.endswith(".h5"):
        got["X_full"].file.close()
    if name.endswith(".zarr"):
        assert 1 <= got["X_full"].chunks[0] <= 16 and got["X_full"].shards is None
    leftovers = [p for p in os.listdir(tmp_path) if "gpugroup" in p]
    assert not leftovers


def test_streamed_without_diffraction_and_without_y(tmp_path):
    raw = make_raw(y=None)
    want = raw.generate_grouped_data(8, K=4, nsamples=80, seed=9, gridsize=2,
                                     keep_diffraction=False)
    got = raw.generate_grouped_data(8, K=4, nsamples=80, seed=9, gridsize=2,
                                    keep_diffraction=False, out=tmp_path / "g.npz")
    assert got["diffraction"] is None and got["Y"] is None
    assert_same_grouped(got, want, exact=True)


@pytest.mark.parametrize("name", FORMATS)
def test_locality_row_order(tmp_path, name):
    raw = make_raw()
    want = raw.generate_grouped_data(8, K=7, nsamples=150, seed=4, gridsize=2)
    got = raw.generate_grouped_data(8, K=7, nsamples=150, seed=4, gridsize=2,
                                    out=tmp_path / name, chunk_bytes=20_000,
                                    row_order="locality")
    order = np.asarray(got["order"])
    assert np.all(np.diff(np.asarray(got["nn_indices"]).min(axis=1)) >= 0)
    back = np.argsort(order)
    for key, value in want.items():
        if isinstance(value, np.ndarray) and key != "objectGuess":
            np.testing.assert_array_equal(np.asarray(got[key][...])[back], value, err_msg=key)
    assert got["norm_scale"] == want["norm_scale"]
    if name.endswith(".h5"):
        got["X_full"].file.close()
    with pytest.raises(ValueError, match="row_order"):
        raw.generate_grouped_data(8, K=7, nsamples=10, seed=4, row_order="locality")


class Boom(Exception):
    pass


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_atomic_write_leaves_nothing(tmp_path, monkeypatch, name, error):
    raw = make_raw()
    real = assembly.take_frames
    calls = []

    def failing_take(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # energies pass, then a few chunks into the gather
            raise error("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(assembly, "take_frames", failing_take)
    out = tmp_path / name
    with pytest.raises(error):
        raw.generate_grouped_data(8, K=7, nsamples=200, seed=1, gridsize=2, out=out,
                                  chunk_bytes=10_000)
    assert len(calls) == 4
    assert os.listdir(tmp_path) == []  # no output, no temporary file or directory
    # an existing output survives a failed rewrite untouched
    monkeypatch.setattr(assembly, "take_frames", real)
    first = raw.generate_grouped_data(8, K=7, nsamples=20, seed=1, gridsize=2, out=out)
    before = np.asarray(first["X_full"][...]).copy()
    if name.endswith(".h5"):
        first["X_full"].file.close()
    calls.clear()
    monkeypatch.setattr(assembly, "take_frames", failing_take)
    with pytest.raises(error):
        raw.generate_grouped_data(8, K=7, nsamples=200, seed=2, gridsize=2, out=out,
                                  chunk_bytes=10_000)
    assert sorted(os.listdir(tmp_path)) == [name]
    np.testing.assert_array_equal(np.asarray(open_grouped(out)["X_full"][...]), before)


def _store(path, value):
    """A small Zarr-like store directory holding ``value``."""
    os.makedirs(path)
    with open(os.path.join(path, "zarr.json"), "w") as fh:
        fh.write(value)


@pytest.mark.parametrize("interrupt, kept", [
    ("moving the old store aside", "old"), ("renaming the new store in", "old"),
    ("just after renaming the new store in", "new"), ("removing the old store", "new")])
def test_replacing_a_store_interrupted_leaves_one_whole_store(tmp_path, monkeypatch,
                                                               interrupt, kept):
    """Where the names cannot be swapped in one step, replacing an existing .zarr output
    moves it aside, renames the new one in and removes the old: a Ctrl-C at any step leaves
    one whole store under the name (the old one put back, or the new one) and no hidden
    copy."""
    import gpugroup.io.atomic as gio

    monkeypatch.setattr(gio, "_exchange", lambda a, b: False)  # no renameat2 swap here

    out = str(tmp_path / "g.zarr")
    _store(out, "old")
    real_rename, real_remove, renames, removals = os.rename, gio._remove, [], []

    def rename(src, dst):
        renames.append(dst)
        step = {1: "moving the old store aside", 2: "renaming the new store in"}.get(len(renames))
        if step == interrupt:
            raise KeyboardInterrupt
        real_rename(src, dst)
        if len(renames) == 2 and interrupt == "just after renaming the new store in":
            raise KeyboardInterrupt

    def remove(p):
        removals.append(p)
        if interrupt == "removing the old store" and len(removals) == 1:
            raise KeyboardInterrupt
        real_remove(p)

    monkeypatch.setattr(gio.os, "rename", rename)
    monkeypatch.setattr(gio, "_remove", remove)
    with pytest.raises(KeyboardInterrupt):
        with gio.atomic_path(out) as tmp:
            with open(os.path.join(tmp, "zarr.json"), "w") as fh:
                fh.write("new")
    with open(os.path.join(out, "zarr.json")) as fh:
        assert fh.read() == kept
    assert os.listdir(tmp_path) == ["g.zarr"]


def test_replacing_a_store_swaps_the_names_in_one_step(tmp_path, monkeypatch):
    """With renameat2(RENAME_EXCHANGE) (Linux) the name never goes missing while a .zarr
    output is replaced: a reader sees the old store or the new one. The old one is removed
    after; a Ctrl-C while removing it leaves the new store and no copy; a directory that is
    no Zarr store, found at the name, is swapped back and refused."""
    import gpugroup.io.atomic as gio

    out = str(tmp_path / "g.zarr")
    _store(out, "old")
    probe = tmp_path / "probe"
    _store(str(probe), "x")
    if not gio._exchange(str(probe), out):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    gio._exchange(str(probe), out)  # (swapped back)
    seen = []
    real_remove = gio._remove

    def remove(p):  # the old store goes only once the new one holds the name
        with open(os.path.join(out, "zarr.json")) as fh:
            seen.append(fh.read())
        if len(seen) == 1:
            raise KeyboardInterrupt  # (the clean-up then removes it)
        real_remove(p)

    monkeypatch.setattr(gio, "_remove", remove)
    monkeypatch.setattr(gio.os, "rename", lambda *a: pytest.fail("moved aside"))
    with pytest.raises(KeyboardInterrupt), gio.atomic_path(out) as tmp:
        with open(os.path.join(tmp, "zarr.json"), "w") as fh:
            fh.write("new")
    monkeypatch.setattr(gio, "_remove", real_remove)
    assert seen[0] == "new"
    with open(os.path.join(out, "zarr.json")) as fh:
        assert fh.read() == "new"
    assert sorted(os.listdir(tmp_path)) == ["g.zarr", "probe"]
    # someone's plain directory at the name: theirs stays, ours is discarded
    import shutil

    with pytest.raises(FileExistsError, match=r"not a Zarr store.*refusing to remove it"), \
            gio.atomic_path(out) as tmp:
        with open(os.path.join(tmp, "zarr.json"), "w") as fh:
            fh.write("new")
        shutil.rmtree(out)  # made while the output was written
        os.makedirs(os.path.join(out, "notes"))
    assert os.listdir(out) == ["notes"]
    assert sorted(os.listdir(tmp_path)) == ["g.zarr", "probe"]


def test_signals_are_held_until_a_critical_step_ends():
    import signal

    import gpugroup.io.atomic as gio

    steps = []
    with pytest.raises(KeyboardInterrupt):
        with gio.signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            steps.append("after the signal")  # not interrupted
            os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C
            steps.append("done")
    assert steps == ["after the signal", "done"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_failed_store_stays_removed_while_a_late_writer_runs(tmp_path, monkeypatch):
    """After a failure, a writer still running (zarr's I/O thread) may recreate the
    temporary store right after it was removed: it is removed again."""
    import threading

    import gpugroup.io.atomic as gio

    real_remove, removed, rewritten = gio._remove, threading.Event(), threading.Event()

    def remove(p):
        real_remove(p)
        if not removed.is_set():
            removed.set()
            assert rewritten.wait(10)

    def late_writer(tmp):
        removed.wait(10)
        os.makedirs(os.path.join(tmp, "diff3d", "c"), exist_ok=True)  # a chunk write
        with open(os.path.join(tmp, "diff3d", "c", "0"), "wb") as fh:
            fh.write(b"late")
        rewritten.set()

    monkeypatch.setattr(gio, "_remove", remove)
    with pytest.raises(KeyboardInterrupt):
        with gio.atomic_path(tmp_path / "g.zarr") as tmp:
            threading.Thread(target=late_writer, args=(tmp,), daemon=True).start()
            raise KeyboardInterrupt
    assert rewritten.is_set() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("options, message", [
    (dict(out="g.txt"), r"output format of .*g\.txt"),
    (dict(out="g.h5", lazy=True), r"lazy \(Dask\) writes go to a \.zarr store"),
    (dict(out="g.npz", row_order="Locality"), r"row_order must be"),
    (dict(row_order="locality"), r"needs out=\.\.\. or lazy=True"),
])
def test_output_options_are_refused_before_any_work(tmp_path, monkeypatch, options, message):
    raw = make_raw()

    def no_work(*a, **k):
        raise AssertionError("sampled before refusing the options")

    monkeypatch.setattr(RawData, "sample_for_grouping", no_work)
    if "out" in options:
        options = dict(options, out=tmp_path / options["out"])
    with pytest.raises(ValueError, match=message):
        raw.generate_grouped_data(8, K=7, nsamples=10, seed=1, **options)
    assert os.listdir(tmp_path) == []


def test_an_unwritable_directory_is_refused_before_any_work(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access  # (root may write anywhere: stand in for a read-only directory)
    monkeypatch.setattr(os, "access", lambda p, mode: real_access(p, mode) and
                        os.fspath(p) != str(locked))
    with pytest.raises(PermissionError, match=r"out .*g\.h5.*cannot write in the directory"):
        make_raw().generate_grouped_data(8, K=7, nsamples=10, seed=1, out=locked / "g.h5")
    assert os.listdir(locked) == []


def test_overwrite_rules(tmp_path):
    raw = make_raw()
    out = tmp_path / "g.h5"
    raw.generate_grouped_data(8, K=4, nsamples=10, seed=1, out=out)["X_full"].file.close()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        raw.generate_grouped_data(8, K=4, nsamples=10, seed=1, out=out, overwrite=False)
    notzarr = tmp_path / "precious.zarr"
    notzarr.mkdir()
    (notzarr / "thesis.tex").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a Zarr store"):
        raw.generate_grouped_data(8, K=4, nsamples=10, seed=1, out=notzarr)
    assert (notzarr / "thesis.tex").read_text() == "keep me"
    z = tmp_path / "g.zarr"
    raw.generate_grouped_data(8, K=4, nsamples=10, seed=1, out=z)
    again = raw.generate_grouped_data(8, K=4, nsamples=12, seed=1, out=z)
    assert again["X_full"].shape[0] == 12
    with pytest.raises(ValueError, match=r"\*\.npz, \*\.h5.*\*\.zarr"):
        raw.generate_grouped_data(8, K=4, nsamples=10, seed=1, out=tmp_path / "g.txt")


# ----------------------------------------------------------------------------- peak memory
CHILD = textwrap.dedent("""
    import gc, json, resource, sys
    import numpy as np, h5py, zarr, psutil, scipy.spatial
    import gpugroup.backends.cpu, gpugroup.io.grouped
    from gpugroup import RawData

    def peak_rss():
        # VmHWM: this process image's peak. (ru_maxrss also counts the forked parent's
        # pages from before exec, so it reports pytest's size, not ours.)
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (
            1 if sys.platform == "darwin" else 1024)

    src, out, chunk, nsamples = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    raw = RawData.from_file(src, mmap_mode="r", backend="cpu")
    gc.collect()
    try:  # restart the peak count here (Linux); else the peak so far is the baseline
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        base = psutil.Process().memory_info().rss
    except OSError:
        base = max(psutil.Process().memory_info().rss, peak_rss())
    d = raw.generate_grouped_data(64, K=7, nsamples=nsamples, seed=11, gridsize=2, out=out,
                                  chunk_bytes=chunk)
    print(json.dumps({"base": base, "peak": peak_rss(), "norm_scale": d["norm_scale"]}))
""")


@pytest.mark.parametrize("src_name,out_name", [("scan.npz", "grouped.h5"),
                                               ("scan.h5", "grouped.zarr"),
                                               ("scan.zarr", "grouped.npz")])
def test_peak_memory_is_bounded_by_the_chunk_budget(tmp_path, src_name, out_name):
    pytest.importorskip("psutil")
    n, N, budget = 4096, 64, 8 << 20
    rng = np.random.default_rng(5)
    row, col = np.divmod(np.arange(n), 64)
    x, y = col + rng.uniform(-0.3, 0.3, n), row + rng.uniform(-0.3, 0.3, n)
    diff = rng.random((n, N, N), dtype=np.float32)  # 64 MiB: 8x the budget
    raw = RawData.from_coords_without_pc(x, y, diff, np.ones((N, N), np.complex64), None,
                                         backend="cpu")
    raw.to_file(tmp_path / src_name)
    out = tmp_path / out_name
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / src_name), str(out),
                        str(budget), str(n)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    output_bytes = 2 * n * 4 * N * N * 4  # diffraction + X_full: 512 MiB
    margin = 64 << 20  # libhdf5 free lists, thread pools, imports on first use
    assert m["peak"] <= m["base"] + budget + margin, (
        f"peak RSS grew by {(m['peak'] - m['base']) / 2**20:.0f} MiB for a "
        f"{budget / 2**20:.0f} MiB budget ({output_bytes / 2**20:.0f} MiB written)")
    # the groups and values equal the in-memory computation (sampled rows)
    ds = GroupedDataset.from_raw(raw, N, K=7, nsamples=n, seed=11, gridsize=2)
    assert m["norm_scale"] == ds.norm_scale
    got = open_grouped(out)
    np.testing.assert_array_equal(got["nn_indices"], ds.nn_indices)
    rows = np.sort(rng.choice(n, 64, replace=False))
    want = ds[rows]
    for key in ("diffraction", "X_full", "coords_relative", "coords_start_offsets"):
        part = np.stack([np.asarray(got[key][int(r)]) for r in rows])
        np.testing.assert_array_equal(part, want[key], err_msg=key)
    s32 = np.float32(ds.norm_scale)
    r0 = int(rows[0])
    np.testing.assert_array_equal(np.asarray(got["X_full"][r0]),
                                  np.moveaxis(diff[ds.nn_indices[r0]], 0, -1) * s32)
    if out_name.endswith(".h5"):
        got["X_full"].file.close()


@pytest.mark.parametrize("suffix, lazy", [(".npz", False), (".h5", False), (".zarr", False),
                                          (".zarr", True)])
def test_an_output_replaced_by_another_run_as_it_is_published_is_an_error(
        tmp_path, monkeypatch, suffix, lazy):
    """Two runs writing one out= path at once: the one whose file was replaced between its
    rename and its read-back must not return the other run's rows under its own seed."""
    import shutil

    from gpugroup.io import grouped
    from gpugroup.schema import ScanFileError

    pytest.importorskip({".npz": "numpy", ".h5": "h5py", ".zarr": "zarr"}[suffix])
    if lazy:
        pytest.importorskip("dask")
    raw = make_raw()
    kw = dict(N=8, K=7, nsamples=40, gridsize=2, lazy=lazy)
    out, other = tmp_path / f"out{suffix}", tmp_path / f"other{suffix}"
    theirs = raw.generate_grouped_data(seed=2, out=other, **kw)
    if suffix == ".h5":
        theirs["X_full"].file.close()
    real = grouped.open_grouped

    def replaced_first(path):  # the other run publishes right after this one
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(other, out)
        return real(path)

    monkeypatch.setattr(grouped, "open_grouped", replaced_first)
    with pytest.raises(ScanFileError, match=r"was replaced by another run's output as this "
                                            r"run published its own"):
        raw.generate_grouped_data(seed=1, out=out, **kw)
    monkeypatch.setattr(grouped, "open_grouped", real)
    got = open_grouped(out)  # the other run's output stays, whole
    assert got["seed"] == 2
    if suffix == ".h5":
        got["X_full"].file.close()
    # unraced, the run gets its own output back
    mine = raw.generate_grouped_data(seed=1, out=out, **kw)
    assert mine["seed"] == 1
    if suffix == ".h5":
        mine["X_full"].file.close()
