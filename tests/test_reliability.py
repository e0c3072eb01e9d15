"""Reliability under attack (issue 14): scans replaced while opened, outputs racing for a
name, special files as input, full disks and file-size limits, lost Zarr chunks, tiny
coordinates, error messages, and cleanup-cache without a terminal."""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from gpugroup import RawData, io, sample_groups
from gpugroup.cli import main
from gpugroup.io import frames
from gpugroup.io.grouped import open_grouped
from gpugroup.rawdata import convert
from gpugroup.simulate import simulate_rawdata

from conftest import suffix_param

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
GROUP_ARGS = ["--gridsize", "2", "--K", "7", "--nsamples", "200", "--seed", "42",
              "--backend", "cpu"]


def _cli(*args, timeout=120, **kwargs):
    """``python -m gpugroup ARGS`` in a fresh process: (returncode, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "gpugroup", *map(str, args)],
                          capture_output=True, text=True, env=ENV, timeout=timeout,
                          stdin=subprocess.DEVNULL, **kwargs)
    return proc.returncode, proc.stdout, proc.stderr


def _one_error(capsys, rc) -> str:
    captured = capsys.readouterr()
    assert rc == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpugroup: error: "), captured.err
    return lines[0]


@pytest.fixture(scope="module")
def scan_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("scan") / "s.npz"
    simulate_rawdata(300, 16, 1, backend="cpu").to_file(path)
    return path


def _marked_scan(tag: float, n: int = 64, N: int = 8) -> dict:
    """A scan whose every field tells which one it is: coordinates start at ``tag``,
    every frame is filled with ``tag``."""
    rng = np.random.default_rng(int(tag))
    return {"xcoords": tag + rng.random(n) * 10, "ycoords": rng.random(n) * 10,
            "diff3d": np.full((n, N, N), tag, np.float32),
            "probeGuess": np.ones((N, N), np.complex64)}


def _replace_loop(sources, target, stop):
    """Rename copies of ``sources`` onto ``target`` in turn until ``stop`` is set (what an
    acquisition program republishing a scan does)."""
    k = 0
    while not stop.is_set():
        src = sources[k % len(sources)]
        tmp = f"{target}.tmp"
        shutil.copyfile(src, tmp)  # a new file (inode) each time, as a writer makes
        os.replace(tmp, target)
        k += 1


# -------------------- 1: replaced while opened
@pytest.mark.slow
def test_a_scan_replaced_while_it_is_opened_is_never_mixed(tmp_path):
    """Hammer: scans renamed onto the path in a loop while it is opened (memory-mapped) and
    read. Every open gives one scan (coordinates, frames and frame reads by pread agree),
    or an error saying it changed; never a mix."""
    sources = []
    for tag in (1.0, 2.0):
        p = tmp_path / f"src{int(tag)}.npz"
        io.write_scan(p, _marked_scan(tag))
        sources.append(str(p))
    target = tmp_path / "scan.npz"
    os.link(sources[0], target)
    stop = threading.Event()
    writer = threading.Thread(target=_replace_loop, args=(sources, str(target), stop))
    writer.start()
    opens = changed = 0
    try:
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            try:
                data = io.read_scan(target, mmap_mode="r")
                tag = float(np.floor(data["xcoords"].min()))
                assert np.all(np.asarray(data["diff3d"][:2]) == tag)  # the map
                assert np.all(frames.gather_frames(data["diff3d"], [3, 60]) == tag)  # pread
                opens += 1
            except io.ScanFileError as exc:
                assert "changed on disk" in str(exc)
                changed += 1
            except FileNotFoundError:
                pass
    finally:
        stop.set()
        writer.join()
    assert opens > 20, (opens, changed)


@pytest.mark.slow
def test_a_grouped_npz_replaced_while_it_is_opened_is_never_mixed(tmp_path):
    """open_grouped of an .npz output renamed over in a loop: seed, indices and rows of
    one run."""
    raw = simulate_rawdata(200, 8, 3, backend="cpu")
    runs = {}
    for seed in (11, 12):
        path = tmp_path / f"g{seed}.npz"
        g = raw.generate_grouped_data(8, K=7, nsamples=50, seed=seed, gridsize=2, out=path)
        runs[seed] = np.asarray(g["X_full"]).copy()
    target = tmp_path / "g.npz"
    os.link(tmp_path / "g11.npz", target)
    stop = threading.Event()
    writer = threading.Thread(target=_replace_loop, args=(
        [str(tmp_path / "g11.npz"), str(tmp_path / "g12.npz")], str(target), stop))
    writer.start()
    opens = 0
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                g = open_grouped(target)
            except FileNotFoundError:
                continue
            np.testing.assert_array_equal(np.asarray(g["X_full"]), runs[g["seed"]])
            opens += 1
    finally:
        stop.set()
        writer.join()
    assert opens > 10


_ZARR_WRITER = """
import sys, time
from gpugroup.simulate import simulate_rawdata
raw = simulate_rawdata(200, 8, 3, backend="cpu")
end = time.monotonic() + float(sys.argv[2])
k = 0
while time.monotonic() < end:
    raw.generate_grouped_data(8, K=7, nsamples=50, seed=11 + k % 2, gridsize=2,
                              out=sys.argv[1])
    k += 1
print(k)
"""


@pytest.mark.slow
def test_a_grouped_zarr_replaced_while_it_is_opened_is_never_mixed(tmp_path):
    """Another process republishing a .zarr output (old store removed each time) while it
    is opened and read: rows of the run whose seed was read, or an error; never rows of
    the new run under the old seed."""
    pytest.importorskip("zarr")
    raw = simulate_rawdata(200, 8, 3, backend="cpu")
    runs = {seed: raw.generate_grouped_data(8, K=7, nsamples=50, seed=seed, gridsize=2)
            ["X_full"] for seed in (11, 12)}
    target = tmp_path / "g.zarr"
    raw.generate_grouped_data(8, K=7, nsamples=50, seed=11, gridsize=2, out=target)
    writer = subprocess.Popen([sys.executable, "-c", _ZARR_WRITER, str(target), "3"],
                              env=ENV, stdout=subprocess.PIPE, text=True)
    good = refused = 0
    try:
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            try:
                g = open_grouped(target)
                rows = np.asarray(g["X_full"][:])
            except (io.ScanFileError, OSError) as exc:  # changed, or gone for a moment
                refused += 1
                assert isinstance(exc, (io.ScanFileError, FileNotFoundError)) or (
                    "changed" in str(exc) or "Zarr" in str(exc)), exc
                continue
            np.testing.assert_array_equal(rows, runs[g["seed"]])
            good += 1
    finally:
        out, _ = writer.communicate(timeout=120)
    assert writer.returncode == 0 and int(out) > 1
    assert good > 0, refused


# -------------------- 2: --no-overwrite races
def test_no_overwrite_is_checked_at_the_rename(tmp_path):
    """A name that appears while an output is written (another run) is kept; the new
    output is discarded with an error that says so. Files and .zarr stores; with and
    without renameat2."""
    for suffix in (".npz", ".zarr") if _has("zarr") else (".npz",):
        target = tmp_path / f"o{suffix}"
        with pytest.raises(FileExistsError, match="appeared while the output was written"):
            with io.atomic_path(target, overwrite=False) as tmp:
                Path(tmp, "x").write_text("new") if suffix == ".zarr" else \
                    Path(tmp).write_text("new")
                if suffix == ".zarr":
                    target.mkdir()
                    (target / "theirs").write_text("theirs")
                else:
                    target.write_text("theirs")
        kept = target / "theirs" if suffix == ".zarr" else target
        assert kept.read_text() == "theirs"
        assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]
        _remove(target)


def test_no_overwrite_without_renameat2(tmp_path, monkeypatch):
    monkeypatch.setattr(io.atomic, "_rename_noreplace", lambda src, dst: False)
    target = tmp_path / "o.npz"
    with pytest.raises(FileExistsError):
        with io.atomic_path(target, overwrite=False) as tmp:
            Path(tmp).write_text("new")
            target.write_text("theirs")
    assert target.read_text() == "theirs" and len(list(tmp_path.iterdir())) == 1
    with io.atomic_path(tmp_path / "p.npz", overwrite=False) as tmp:
        Path(tmp).write_text("new")
    assert (tmp_path / "p.npz").read_text() == "new" and len(list(tmp_path.iterdir())) == 2
    if _has("zarr"):
        empty = tmp_path / "e.zarr"
        with pytest.raises(FileExistsError):
            with io.atomic_path(empty, overwrite=False) as tmp:
                Path(tmp, "x").write_text("new")
                empty.mkdir()
                (empty / "theirs").write_text("theirs")
        assert (empty / "theirs").exists()
        with io.atomic_path(tmp_path / "n.zarr", overwrite=False) as tmp:
            Path(tmp, "x").write_text("new")
        assert (tmp_path / "n.zarr" / "x").read_text() == "new"


def test_a_plain_directory_created_at_a_zarr_output_is_not_deleted(tmp_path):
    """overwrite=True replaces a Zarr store, never a directory someone created there
    meanwhile (re-checked at the rename)."""
    target = tmp_path / "g.zarr"
    with pytest.raises(FileExistsError, match="not a Zarr store"):
        with io.atomic_path(target) as tmp:
            Path(tmp, "zarr.json").write_text("{}")
            target.mkdir()
            (target / "precious.txt").write_text("mine")
    assert (target / "precious.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.zarr"]
    _remove(target)
    target.mkdir()  # an empty directory too: kept, not replaced
    with pytest.raises(FileExistsError):
        with io.atomic_path(target) as tmp:
            Path(tmp, "zarr.json").write_text("{}")
    assert target.is_dir() and not any(target.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".npz", ".zarr"])
def test_two_no_overwrite_runs_started_together_publish_once(scan_file, tmp_path, suffix):
    """Two `gpugroup group ... --no-overwrite` runs at once: exactly one succeeds, the
    other exits 2 and the winner's output is intact."""
    if suffix == ".zarr":
        pytest.importorskip("zarr")
    out = tmp_path / f"n{suffix}"
    # ~30 MB each, so that the two runs overlap: both pass the check at the start
    procs = [subprocess.Popen([sys.executable, "-m", "gpugroup", "group", str(scan_file), "-o",
                               str(out), "--no-overwrite", "--gridsize", "2", "--K", "7",
                               "--oversample", "--nsamples", "2000", "--seed", str(s),
                               "--backend", "cpu"],
                              env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for s in (1, 2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert "exists" in loser or "appeared" in loser
    winner_seed = 1 if results[0][0] == 0 else 2
    assert open_grouped(out)["seed"] == winner_seed
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


# -------------------- 3: special files
def test_special_files_are_refused_before_reading(tmp_path, capsys):
    line = _one_error(capsys, main(["group", "/dev/zero", "-o", str(tmp_path / "z.npz")]))
    assert "/dev/zero" in line and "character device" in line
    fifo = tmp_path / "f.npz"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    line = _one_error(capsys, main(["group", str(fifo), "-o", str(tmp_path / "o.npz")]))
    assert "FIFO" in line and str(fifo) in line
    for call in (lambda: io.read_scan(fifo, mmap_mode="r"), lambda: RawData.from_file(fifo),
                 lambda: convert(fifo, tmp_path / "c.npz"),
                 lambda: io.read_scan("/dev/zero")):
        with pytest.raises(io.ScanFileError, match="not a regular file"):
            call()
    d = tmp_path / "d"
    d.mkdir()
    os.mkfifo(d / "diff3d.npy")  # a FIFO inside a .npy directory: refused, not waited on
    with pytest.raises(io.ScanFileError, match="FIFO"):
        io.read_scan(d, mmap_mode="r")
    assert time.monotonic() - t0 < 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f.npz"]


# -------------------- 4: HDF5 at a file-size limit
def _file_size_limit(nbytes):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return limit


_H5_API = """
import sys
from gpugroup import RawData
raw = RawData.from_file(sys.argv[1], mmap_mode="r", backend="cpu")
try:
    raw.generate_grouped_data(16, K=7, nsamples=300, seed=1, gridsize=2, out=sys.argv[2])
except OSError as exc:
    print("error:", exc)
try:
    raw.to_file(sys.argv[3])
except OSError as exc:
    print("error:", exc)
"""


@pytest.mark.slow
def test_hdf5_output_at_a_file_size_limit_is_a_clean_error(scan_file, tmp_path):
    """ulimit -f makes libhdf5's writes fail (as a full disk does); h5py then crashed the
    process at exit (SIGSEGV). Now: one error line naming the output, exit 2, nothing left
    behind; from Python an OSError and a normal exit."""
    pytest.importorskip("h5py")
    out = tmp_path / "g.h5"
    rc, _, err = _cli("group", scan_file, "-o", out, *GROUP_ARGS,
                      preexec_fn=_file_size_limit(256 << 10))
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(out) in lines[0] and "File too large" in lines[0], err
    assert list(tmp_path.iterdir()) == []
    proc = subprocess.run([sys.executable, "-c", _H5_API, str(scan_file), str(out),
                           str(tmp_path / "s.h5")], capture_output=True, text=True, env=ENV,
                          timeout=120, preexec_fn=_file_size_limit(256 << 10))
    assert proc.returncode == 0, proc.stderr
    errors = proc.stdout.strip().splitlines()
    assert len(errors) == 2 and all("File too large while writing" in e for e in errors)
    assert str(out) in errors[0] and "s.h5" in errors[1]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("kib", [8, 32, 96])
def test_hdf5_output_failing_at_any_point_is_a_clean_error(scan_file, tmp_path, kib):
    """Below about 128 KiB the write fails inside h5py's clean-up of a dataset (an
    exception Python drops), before the final flush: the process then crashed (SIGSEGV)
    while closing the abandoned file, leaving its temporary output behind."""
    pytest.importorskip("h5py")
    out = tmp_path / "g.h5"
    rc, _, err = _cli("group", scan_file, "-o", out, *GROUP_ARGS,
                      preexec_fn=_file_size_limit(kib << 10))
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(out) in lines[0] and "File too large" in lines[0], err
    assert list(tmp_path.iterdir()) == []


def test_a_disk_too_full_for_the_lock_file_names_the_output(tmp_path, monkeypatch):
    from gpugroup.io import atomic

    real_write = os.write

    def write(fd, data):
        if data == atomic._HOST:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(OSError, match="No space left on device while writing") as info, \
            atomic.atomic_path(tmp_path / "g.npz"):
        pass
    assert info.value.errno == errno.ENOSPC and str(tmp_path / "g.npz") in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_an_output_named_with_a_trailing_slash_is_written_and_reported(scan_file, tmp_path):
    """``-o g.npz/`` (as shell completion may leave it) writes g.npz; the run read its
    output back at "g.npz/" and called it lost to another run."""
    rc, out, err = _cli("group", scan_file, "-o", f"{tmp_path / 'g.npz'}/", *GROUP_ARGS)
    assert rc == 0 and "wrote" in out, err
    raw = RawData.from_file(scan_file, mmap_mode="r", backend="cpu")
    for name in ["a.npz/"] + (["b.h5/"] if _has("h5py") else []):
        d = raw.generate_grouped_data(16, K=7, nsamples=20, seed=1, gridsize=2,
                                      out=f"{tmp_path / name}")
        assert d["path"] == str(tmp_path / name.rstrip("/"))
        getattr(getattr(d["X_full"], "file", None), "close", lambda: None)()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["g.npz", "a.npz"] + (["b.h5"] if _has("h5py") else []))


# -------------------- 5: free space
def test_too_little_free_space_is_refused_up_front(scan_file, tmp_path, monkeypatch, capsys):
    import shutil

    real = shutil.disk_usage

    def tiny(path):
        return real(path)._replace(free=100_000)

    monkeypatch.setattr(shutil, "disk_usage", tiny)
    raw = RawData.from_file(scan_file, mmap_mode="r", backend="cpu")
    out = tmp_path / "g.npz"
    with pytest.raises(OSError, match=r"needs about [\d,]+ bytes .* has 100,000 bytes") as info:
        raw.generate_grouped_data(16, K=7, nsamples=200, seed=1, gridsize=2, out=out)
    assert info.value.errno == errno.ENOSPC and str(tmp_path) in str(info.value)
    assert list(tmp_path.iterdir()) == []
    line = _one_error(capsys, main(["group", str(scan_file), "-o", str(out), *GROUP_ARGS]))
    assert "free" in line and "--no-space-check" in line and str(out) in line
    # a dry run makes the same check (it says what the real run would do)
    line = _one_error(capsys, main(["group", str(scan_file), "-o", str(out), "--dry-run",
                                    *GROUP_ARGS]))
    assert "free" in line and "--no-space-check" in line and str(out) in line
    assert main(["group", str(scan_file), "-o", str(out), "--dry-run", "--no-space-check",
                 *GROUP_ARGS]) == 0
    line = _one_error(capsys, main(["convert", str(scan_file), str(tmp_path / "c.npz")]))
    assert "free" in line
    # the check can be skipped (filesystems that report free space wrongly)
    g = raw.generate_grouped_data(16, K=7, nsamples=200, seed=1, gridsize=2, out=out,
                                  check_space=False)
    assert g["X_full"].shape[0] == 200
    assert main(["group", str(scan_file), "-o", str(tmp_path / "h.npz"), "--no-space-check",
                 *GROUP_ARGS]) == 0


def test_a_write_error_names_the_output(scan_file, tmp_path, monkeypatch, capsys):
    from gpugroup.io import npz

    def full(fd, data, pos):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(npz.os, "pwrite", full)
    out = tmp_path / "g.npz"
    line = _one_error(capsys, main(["group", str(scan_file), "-o", str(out), *GROUP_ARGS]))
    assert "No space left on device while writing" in line and str(out) in line
    assert "[Errno" not in line
    assert list(tmp_path.iterdir()) == []


def test_libhdf5_write_errors_are_named_too():
    """h5py raises a failed flush as RuntimeError naming only the temporary file, with the
    errno in its text: it becomes an OSError naming the output."""
    raw = RuntimeError("Unable to synchronously flush file (file write failed: filename = "
                       "'/d/.g.h5.x.gpugroup-part', errno = 27, error message = 'File too "
                       "large')")
    named = io.write_error(raw, "/d/g.h5")
    assert isinstance(named, OSError) and named.errno == errno.EFBIG
    assert "'/d/g.h5'" in str(named) and "ulimit -f" in str(named)
    other = RuntimeError("something else")
    assert io.write_error(other, "/d/g.h5") is other


# -------------------- 6: lost Zarr chunks
def test_a_zarr_scan_with_a_missing_chunk_is_an_error(scan_file, tmp_path, capsys):
    pytest.importorskip("zarr")
    store = tmp_path / "m.zarr"
    assert main(["convert", str(scan_file), str(store)]) == 0
    capsys.readouterr()
    chunk = sorted(p for p in (store / "diff3d").rglob("*") if p.is_file()
                   and p.name != "zarr.json")[3]
    chunk.unlink()
    key = chunk.relative_to(store / "diff3d").as_posix()
    line = _one_error(capsys, main(["group", str(store), "-o", str(tmp_path / "m.npz"),
                                    *GROUP_ARGS]))
    assert "'/diff3d'" in line and repr(key) in line and "missing chunk" in line
    with pytest.raises(io.ScanFileError, match="missing chunk"):
        RawData.from_file(store, mmap_mode="r")
    assert not (tmp_path / "m.npz").exists()


def test_a_damaged_zarr_scan_is_one_error_line(tmp_path):
    """A chunk zarr cannot decode fails the read while the read's other chunk tasks are
    still pending on zarr's event loop: they are let finish, so that asyncio does not log
    "Task was destroyed but it is pending!" for each at exit under the CLI's one line."""
    zarr = pytest.importorskip("zarr")
    raw = simulate_rawdata(300, 16, 1, backend="cpu")
    store = tmp_path / "corrupt.zarr"
    g = zarr.open_group(store, mode="w")
    for key, value in raw.to_dict().items():
        if key != "_metadata":  # zarr's default codecs: zstd-compressed chunks
            chunks = (1,) + value.shape[1:] if key == "diff3d" else value.shape
            g.create_array(key, shape=value.shape, dtype=value.dtype, chunks=chunks,
                           config={"write_empty_chunks": True})[...] = value
    (store / "diff3d" / "c" / "0" / "0" / "0").write_bytes(b"garbage" * 10)
    for args in (["group", store, "-o", tmp_path / "g.h5", *GROUP_ARGS],
                 ["convert", store, tmp_path / "c.h5"]):
        rc, _, err = _cli(*args)
        assert rc == 2 and err.count("\n") == 1, err
        assert err.startswith("gpugroup: error: cannot read frames ") and "corrupt.zarr" in err
    assert sorted(os.listdir(tmp_path)) == ["corrupt.zarr"]


def test_zarr_outputs_write_every_chunk(tmp_path):
    """All-zero chunks are written too, so that no chunk of gpugroup's is ever missing."""
    pytest.importorskip("zarr")
    raw = simulate_rawdata(100, 8, 1, backend="cpu")
    raw.diff3d[:40] = 0  # whole chunks of zero frames
    raw.to_file(tmp_path / "z.zarr")
    back = RawData.from_file(tmp_path / "z.zarr", mmap_mode="r", backend="cpu")
    np.testing.assert_array_equal(np.asarray(back.diff3d[:]), raw.diff3d)


# -------------------- 7: tiny coordinates
@pytest.mark.parametrize("scale", [1e-200, 1e-300, 2.0**-700, 1e-310])
def test_tiny_coordinates_give_the_groups_of_the_unscaled_ones(scale):
    rng = np.random.default_rng(0)
    x, y = rng.random(1500) * 100, rng.random(1500) * 100
    ref = sample_groups(x, y, 300, 7, 4, seed=3, backend="cpu")
    got = sample_groups(x * scale, y * scale, 300, 7, 4, seed=3, backend="cpu")
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("offset", [1e5, 1e12, 1e300])
def test_tiny_line_scans_with_a_constant_axis(offset):
    """A constant axis adds 0 to every d2: whatever its value, a line scan of tiny spacing
    gets the groups of the unscaled line (the constant axis must not overflow when the
    other is scaled up)."""
    y = np.arange(60.0) + np.random.default_rng(1).uniform(-0.3, 0.3, 60)
    ref = sample_groups(np.zeros(60), y, 20, 5, 4, seed=2, backend="cpu")
    for x_, y_ in ((np.full(60, offset), y * 1e-300), (y * 1e-300, np.full(60, -offset))):
        np.testing.assert_array_equal(
            sample_groups(x_, y_, 20, 5, 4, seed=2, backend="cpu"), ref)


def test_tiny_coordinates_seed_indices_path_equals_sequential_sampling():
    """PtychoPINN's _generate_groups_efficiently(seed_indices=0..m-1) is sequential
    sampling, at any scale."""
    from conftest import square_grid

    x, y = square_grid(10)
    for scale in (1.0, 1e-300):
        raw = RawData.from_coords_without_pc(x * scale, y * scale,
                                             np.ones((100, 4, 4), np.float32),
                                             np.ones((4, 4), np.complex64), None,
                                             backend="cpu")
        by_seeds = raw._generate_groups_efficiently(100, 9, 4, seed_indices=np.arange(100))
        sequential = raw.generate_grouped_data(4, K=9, nsamples=100, gridsize=2,
                                               sequential_sampling=True)["nn_indices"]
        np.testing.assert_array_equal(by_seeds, sequential)


@pytest.mark.parametrize("k", [-1074 + 40, -700, -300, -100, -1, 0, 1, 100, 400])
def test_power_of_two_scaling_keeps_the_canonical_groups(k):
    """Scaling both coordinates by 2**k is exact: the groups of a grid full of exact ties
    (the KAT layout) and of a jittered scan do not change, tiny scales included."""
    from conftest import jittered_scan, square_grid

    for x, y in (square_grid(20), jittered_scan(400, seed=5)[:2]):
        ref = sample_groups(x, y, 100, 9, 4, seed=7, backend="cpu")
        xs, ys = np.ldexp(x, k), np.ldexp(y, k)
        if not (np.array_equal(np.ldexp(xs, -k), x) and np.array_equal(np.ldexp(ys, -k), y)):
            continue  # subnormal: not an exact scaling
        np.testing.assert_array_equal(sample_groups(xs, ys, 100, 9, 4, seed=7,
                                                    backend="cpu"), ref)


# -------------------- 8: messages
def test_unreachable_inputs_say_why(tmp_path, capsys):
    loop = tmp_path / "loop.npz"
    loop.symlink_to(loop)
    line = _one_error(capsys, main(["group", str(loop), "-o", str(tmp_path / "o.npz")]))
    assert "symbolic link loop" in line and "does not exist" not in line
    with pytest.raises(io.ScanFileError, match="symbolic link loop"):
        RawData.from_file(loop)
    if os.geteuid() != 0:  # root searches any directory
        locked = tmp_path / "locked"
        locked.mkdir()
        (locked / "s.npz").write_bytes(b"")
        locked.chmod(0)
        try:
            line = _one_error(capsys, main(["group", str(locked / "s.npz"), "-o",
                                            str(tmp_path / "o.npz")]))
            assert "permission denied" in line and "does not exist" not in line
        finally:
            locked.chmod(0o755)


def test_an_unsearchable_directory_says_permission_denied(tmp_path, monkeypatch, capsys):
    """(As root every directory is searchable: the denial is simulated for the scan.)"""
    scan = tmp_path / "locked" / "s.npz"
    real = os.stat

    def denied(path, *args, **kwargs):
        if os.fspath(path) == str(scan):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", denied)
    monkeypatch.setattr(os, "lstat", denied)
    line = _one_error(capsys, main(["group", str(scan), "-o", str(tmp_path / "o.npz")]))
    assert "permission denied" in line and "does not exist" not in line and str(scan) in line


def test_pickled_and_garbage_members_are_named(tmp_path):
    bad = tmp_path / "p.npz"
    scan = _marked_scan(1.0)
    np.savez(bad, **scan, scan_index=np.array([object()] * 64, dtype=object))
    for mode in (None, "r"):
        with pytest.raises(ValueError, match=r"p\.npz.*member 'scan_index'.*Python objects"):
            io.read_scan(bad, mmap_mode=mode)
    d = tmp_path / "dir"
    d.mkdir()
    for key, value in scan.items():
        np.save(d / f"{key}.npy", value)
    (d / "diff3d.npy").write_bytes(b"not a numpy file at all" * 10)
    with pytest.raises(io.ScanFileError) as info:
        io.read_scan(d, mmap_mode="r")
    assert "diff3d.npy" in str(info.value) and "not a .npy file" in str(info.value)
    assert "allow_pickle" not in str(info.value) and "unsafe" not in str(info.value)
    np.save(d / "diff3d.npy", np.array([object()] * 3, dtype=object), allow_pickle=True)
    with pytest.raises(io.ScanFileError, match="never unpickles"):
        io.read_scan(d)


def test_an_hdf5_file_locked_by_a_writer_says_so(scan_file, tmp_path):
    pytest.importorskip("h5py")
    h5 = tmp_path / "s.h5"
    RawData.from_file(scan_file).to_file(h5)
    writer = subprocess.Popen([sys.executable, "-c", "import sys, h5py; f = h5py.File(sys.argv[1], "
                               "'a'); print('open', flush=True); sys.stdin.read()", str(h5)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert writer.stdout.readline().strip() == "open"
        with pytest.raises(OSError, match="another process has it open for writing") as info:
            RawData.from_file(h5, mmap_mode="r")
        assert "truncated" not in str(info.value) and "HDF5_USE_FILE_LOCKING" in str(info.value)
    finally:
        writer.communicate("", timeout=60)


@pytest.mark.slow
def test_sigterm_during_an_hdf5_write_prints_no_traceback(scan_file, tmp_path):
    pytest.importorskip("h5py")
    out = tmp_path / "g.h5"
    proc = subprocess.Popen([sys.executable, "-m", "gpugroup", "group", str(scan_file), "-o",
                             str(out), "--gridsize", "2", "--K", "7", "--oversample",
                             "--nsamples", "400000", "--seed", "1", "--backend", "cpu",
                             "--chunk-mib", "1"], env=ENV, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(p.name.endswith(".gpugroup-part")
                                                  and p.stat().st_size > 1 << 20
                                                  for p in tmp_path.iterdir()):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Exception ignored" not in err and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "gpugroup: terminated", err
    assert list(tmp_path.iterdir()) == []


# -------------------- 8b: killed runs
_WRITER = """
import os, signal, sys
from gpugroup.io.atomic import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    if sys.argv[1].endswith(".zarr"):
        open(os.path.join(tmp, "chunk"), "wb").write(bytes(4096))
    else:
        open(tmp, "wb").write(bytes(4096))
    print(tmp, flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)  # what the out-of-memory killer does
    sys.stdin.read()  # a run still writing, until stdin closes
"""


@pytest.mark.parametrize("suffix", [".npz", suffix_param(".zarr")])
def test_what_a_killed_run_left_is_removed_by_the_next_run(tmp_path, suffix, caplog):
    """A SIGKILLed run cannot clean up: its temporary output stays, hidden. The next run
    writing the same name removes it (it is no longer locked), but never the temporary
    output of a run that is still writing."""
    name = f"g{suffix}"
    out = tmp_path / name
    live = subprocess.Popen([sys.executable, "-c", _WRITER, str(out), "wait"], env=ENV,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        writing = Path(live.stdout.readline().strip())
        assert writing.exists()
        killed = subprocess.run([sys.executable, "-c", _WRITER, str(out), "kill"], env=ENV,
                                capture_output=True, text=True, timeout=60)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        left = Path(killed.stdout.strip())
        assert left.exists() and left.name.startswith(f".{name}.") and left != writing
        assert len(list(tmp_path.iterdir())) == 4  # two temporary outputs, two lock files
        with caplog.at_level("WARNING"):
            simulate_rawdata(64, 8, 1, backend="cpu").to_file(out)
        assert not left.exists()
        assert [r for r in caplog.records if "was killed before it could clean up" in
                r.getMessage() and str(left) in r.getMessage()], caplog.text
        assert writing.exists()  # the live run's is left alone
    finally:
        live.stdin.close()
        assert live.wait(timeout=60) == 0
    assert [p.name for p in tmp_path.iterdir()] == [name]


class _DropsItsInterrupt:
    """An object whose finalizer receives a Ctrl-C: Python drops the KeyboardInterrupt
    raised there ("Exception ignored in ..."), as it does in h5py's weakref callbacks."""

    received = []

    def __del__(self):
        self.received.append(True)
        signal.raise_signal(signal.SIGINT)  # its handler's KeyboardInterrupt goes nowhere


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("how", ["convert", "generate_grouped_data"])
def test_a_ctrl_c_that_python_drops_still_stops_the_write(scan_file, tmp_path, how):
    """Such a dropped Ctrl-C stops the write at the next chunk; the output is never
    published (an existing file stays as it was) and nothing is left."""
    out = tmp_path / "out.npz"
    out.write_bytes(b"the earlier output")
    _DropsItsInterrupt.received.clear()
    steps = []

    def progress(done):
        steps.append(done)
        if len(steps) == 1:
            _DropsItsInterrupt()  # made and finalized at once, in the main thread

    raw = RawData.from_file(scan_file, mmap_mode="r", backend="cpu")
    with pytest.raises(KeyboardInterrupt):
        if how == "convert":
            convert(scan_file, out, slab_bytes=16 * 16 * 4 * 30, progress=progress)
        else:
            raw.generate_grouped_data(16, K=7, nsamples=200, seed=1, gridsize=2, out=out,
                                      chunk_bytes=1 << 16, progress=progress)
    assert _DropsItsInterrupt.received and len(steps) == 1  # stopped at the next chunk
    assert out.read_bytes() == b"the earlier output"
    assert [p.name for p in tmp_path.iterdir()] == ["out.npz"]


def test_a_programs_own_sigint_handler_is_left_to_decide(scan_file, tmp_path):
    """A training script's handler that only notes Ctrl-C (to stop after this step) is
    called, and the write it did not stop goes on and is published."""
    caught = []
    before = signal.signal(signal.SIGINT, lambda s, f: caught.append(s))
    try:
        def progress(done):
            if not caught:
                signal.raise_signal(signal.SIGINT)

        out = tmp_path / "c.npz"
        convert(scan_file, out, slab_bytes=16 * 16 * 4 * 30, progress=progress)
    finally:
        signal.signal(signal.SIGINT, before)
    assert caught == [signal.SIGINT]
    assert RawData.from_file(out).diff3d.shape[0] == 300


def _dead_leftover(directory, base, tag="abcd1234", size=4096, host=None):
    """What a SIGKILLed run leaves: an unlocked lock file (naming its host) and its
    temporary output."""
    from gpugroup.io import atomic

    lock = directory / f".{base}.{tag}{atomic._LOCK}"
    part = directory / f".{base}.{tag}{atomic._PART}"
    lock.write_bytes(atomic._HOST if host is None else host)
    part.write_bytes(bytes(size))
    return lock, part


def test_a_sweep_removes_only_this_hosts_leftovers_of_this_name(tmp_path):
    """Another output's leftovers (a longer name with the same start) and another host's
    (whose lock may not show here: NFS with local locks) are left alone."""
    from gpugroup.io import atomic

    mine = _dead_leftover(tmp_path, "g.npz")
    other_name = _dead_leftover(tmp_path, "g.npz.v2.npz")
    other_host = _dead_leftover(tmp_path, "g.npz", tag="zzzz9999", host=b"elsewhere")
    with atomic.atomic_path(tmp_path / "g.npz") as tmp:
        open(tmp, "wb").close()
    assert not any(p.exists() for p in mine)
    assert all(p.exists() for p in other_name + other_host)


def test_leftovers_are_swept_before_the_free_space_check(tmp_path, monkeypatch):
    """The leftovers may be what filled the disk: they go before the check, in Python and
    on the command line (whose check comes before any work)."""
    real = shutil.disk_usage
    scan = tmp_path / "s.npz"
    simulate_rawdata(300, 16, 1, backend="cpu").to_file(scan)
    for write in (lambda out: io.write_scan(out, {"xcoords": np.zeros(3)}),
                  lambda out: main(["group", str(scan), "-o", str(out), *GROUP_ARGS]) == 0):
        _, part = _dead_leftover(tmp_path, "g.npz", size=1 << 20)
        monkeypatch.setattr(shutil, "disk_usage",
                            lambda p, part=part: real(p)._replace(
                                free=0 if part.exists() else 1 << 40))
        write(tmp_path / "g.npz")
        assert not part.exists()


def test_a_sweep_that_locks_a_new_lock_file_first_loses_no_live_output(tmp_path,
                                                                         monkeypatch):
    """Another run's sweep may lock a new lock file before its writer does: the writer
    then waits for the lock, and never writes beside a lock file that is gone."""
    from gpugroup.io import atomic

    real_try_lock = atomic._try_lock
    sweeper_locked = threading.Event()
    sweeper = threading.Thread(target=atomic.sweep_leftovers, args=(str(tmp_path), "g.npz"))
    first = [True]

    def try_lock(fd, **kw):
        if threading.current_thread() is not sweeper and first:
            first.clear()  # the writer, right after its mkstemp: a sweep locks it first
            sweeper.start()
            assert sweeper_locked.wait(5)
        got = real_try_lock(fd, **kw)
        if threading.current_thread() is sweeper:
            sweeper_locked.set()
        return got

    class OtherProcess(set):  # the sweeper stands for another process
        def __contains__(self, item):
            return threading.current_thread() is not sweeper and set.__contains__(self, item)

    monkeypatch.setattr(atomic, "_held", OtherProcess())
    monkeypatch.setattr(atomic, "_try_lock", try_lock)
    with atomic.atomic_path(tmp_path / "g.npz") as tmp:
        with open(tmp, "wb") as fh:
            fh.write(b"data")
        sweeper.join(10)
        assert os.path.exists(tmp) and os.path.exists(tmp[:-len(atomic._PART)] + atomic._LOCK)
    assert (tmp_path / "g.npz").read_bytes() == b"data"


def test_sweeps_work_where_an_exclusive_lock_needs_a_writable_file(tmp_path, monkeypatch):
    """NFS places an exclusive flock only on a file open for writing (flock(2))."""
    import fcntl

    from gpugroup.io import atomic

    class NFSLocks:
        LOCK_EX, LOCK_NB = fcntl.LOCK_EX, fcntl.LOCK_NB

        @staticmethod
        def flock(fd, op):
            if op & fcntl.LOCK_EX and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == 0:
                raise OSError(errno.EBADF, "Bad file descriptor")
            return fcntl.flock(fd, op)

    monkeypatch.setattr(atomic, "fcntl", NFSLocks)
    lock, part = _dead_leftover(tmp_path, "g.npz")
    with atomic.atomic_path(tmp_path / "g.npz") as tmp:
        open(tmp, "wb").close()
    assert not part.exists() and not lock.exists()


def test_without_locks_no_lock_file_is_left(tmp_path, monkeypatch):
    """Without fcntl (Windows), where an open file cannot be unlinked: the lock file is
    closed before it is removed, so none is left behind."""
    from gpugroup.io import atomic

    monkeypatch.setattr(atomic, "fcntl", None)
    real_unlink = os.unlink

    def unlink(p, *a, **k):  # Windows refuses to unlink a file open in this process
        target = os.path.abspath(os.fspath(p))
        if any(os.path.realpath(f"/proc/self/fd/{fd}") == target
               for fd in os.listdir("/proc/self/fd")):
            raise PermissionError(errno.EACCES, "in use by another process", p)
        return real_unlink(p, *a, **k)

    monkeypatch.setattr(os, "unlink", unlink)
    for _ in range(2):
        with atomic.atomic_path(tmp_path / "g.npz") as tmp:
            open(tmp, "wb").close()
    assert [p.name for p in tmp_path.iterdir()] == ["g.npz"]


def test_a_run_never_sweeps_its_own_temporary_output(tmp_path, monkeypatch):
    """Where flock is emulated by per-process locks (NFS), a lock this process holds does
    not stop this process: it must still not remove its own writes in progress."""
    from gpugroup.io import atomic

    class PerProcessLocks:
        LOCK_EX, LOCK_NB = 2, 4

        @staticmethod
        def flock(fd, op):  # this process always gets its own locks
            pass

    monkeypatch.setattr(atomic, "fcntl", PerProcessLocks)
    with atomic.atomic_path(tmp_path / "g.npz") as first:
        with atomic.atomic_path(tmp_path / "g.npz") as second:  # sweeps before it writes
            assert os.path.exists(first)
            atomic.sweep_leftovers(str(tmp_path), "g.npz")
            assert os.path.exists(first) and os.path.exists(second)
    assert [p.name for p in tmp_path.iterdir()] == ["g.npz"]


def test_a_lock_file_left_without_a_host_name_is_swept(tmp_path):
    """A run killed between creating its lock file and writing its host name leaves an
    empty lock file (and no temporary output yet): the next run removes it."""
    from gpugroup.io import atomic

    _, part = _dead_leftover(tmp_path, "g.npz", host=b"")
    part.unlink()
    with atomic.atomic_path(tmp_path / "g.npz") as tmp:
        open(tmp, "wb").close()
    assert [p.name for p in tmp_path.iterdir()] == ["g.npz"]


_KILLED_REPLACING = """
import os, sys
from gpugroup.io import atomic
atomic._exchange = lambda a, b: False  # no RENAME_EXCHANGE (NFS): the old store moves aside
if sys.argv[2] == "before-publish":
    atomic._rename_dir_new = lambda *a, **k: os._exit(9)
else:
    remove = atomic._remove
    atomic._remove = lambda p: os._exit(9) if p.endswith(atomic._OLD) else remove(p)
with atomic.atomic_path(sys.argv[1]) as tmp:
    with open(os.path.join(tmp, "zarr.json"), "w") as fh:
        fh.write("new")
"""


@pytest.mark.parametrize("when, expected", [("before-publish", "old"),
                                            ("removing-the-old", "new")])
def test_a_store_moved_aside_by_a_killed_run_is_put_back_or_removed(tmp_path, when,
                                                                     expected):
    """Without RENAME_EXCHANGE a ``.zarr`` output being replaced is moved aside first. A
    run killed before the new store took its name leaves no store under the name: the
    next run puts the old one back. Killed while removing the old one, the next run
    removes it. Either way the name holds one whole store and nothing else is left."""
    from gpugroup.io import atomic

    out = tmp_path / "g.zarr"
    out.mkdir()
    (out / "zarr.json").write_text("old")
    proc = subprocess.run([sys.executable, "-c", _KILLED_REPLACING, str(out), when],
                          env=ENV, capture_output=True, text=True, check=False)
    assert proc.returncode == 9, proc.stderr
    left = {p.name.rsplit(".", 1)[-1] for p in tmp_path.iterdir() if p.name != "g.zarr"}
    assert left == {"gpugroup-lock", "gpugroup-part", "gpugroup-old"} - (
        {"gpugroup-part"} if expected == "new" else set())
    atomic.sweep_leftovers(str(tmp_path), "g.zarr")
    assert [p.name for p in tmp_path.iterdir()] == ["g.zarr"]
    assert (out / "zarr.json").read_text() == expected


def _moved_aside(directory, base, store=True):
    """A killed run's leftovers while replacing ``base``: its unlocked lock file and the
    earlier ``base`` moved aside (a Zarr store, or a plain directory)."""
    from gpugroup.io import atomic

    lock, part = _dead_leftover(directory, base)
    part.unlink()
    old = directory / (lock.name[:-len(atomic._LOCK)] + atomic._OLD)
    old.mkdir()
    (old / ("zarr.json" if store else "notes.txt")).write_text("old")
    return lock, old


def test_a_sweep_leaves_a_moved_aside_store_while_a_run_writes_that_name(tmp_path):
    """Without RENAME_EXCHANGE a running writer leaves the name empty between its two
    renames: another run's sweep must not put a killed run's older store there then (the
    writer would find the name taken and lose its output); a later sweep finishes."""
    from gpugroup.io import atomic

    with atomic.atomic_path(tmp_path / "g.zarr") as tmp:
        (Path(tmp) / "zarr.json").write_text("new")
        lock, old = _moved_aside(tmp_path, "g.zarr")
        atomic.sweep_leftovers(str(tmp_path), "g.zarr")  # this run is writing g.zarr
        assert old.exists() and lock.exists() and not (tmp_path / "g.zarr").exists()
    assert (tmp_path / "g.zarr" / "zarr.json").read_text() == "new"
    atomic.sweep_leftovers(str(tmp_path), "g.zarr")
    assert [p.name for p in tmp_path.iterdir()] == ["g.zarr"]


def test_a_moved_aside_directory_that_is_no_store_is_never_removed(tmp_path):
    from gpugroup.io import atomic

    (tmp_path / "g.zarr").mkdir()
    (tmp_path / "g.zarr" / "zarr.json").write_text("current")
    lock, old = _moved_aside(tmp_path, "g.zarr", store=False)
    atomic.sweep_leftovers(str(tmp_path), "g.zarr")
    kept = old.with_name(old.name[:-len(atomic._OLD)] + atomic._KEPT)
    assert (kept / "notes.txt").read_text() == "old" and not lock.exists()
    assert (tmp_path / "g.zarr" / "zarr.json").read_text() == "current"


def test_an_old_store_that_cannot_go_back_is_kept_where_no_sweep_removes_it(tmp_path):
    """If the name was taken meanwhile, the moved-aside store is kept (and said so) under
    a name that the next run's sweep leaves alone."""
    from gpugroup.io import atomic

    stem = tmp_path / ".g.zarr.abcd1234"
    old = tmp_path / (stem.name + atomic._OLD)
    old.mkdir()
    (tmp_path / "g.zarr").mkdir()
    atomic._put_back(str(old), str(tmp_path / "g.zarr"))
    kept = tmp_path / (stem.name + atomic._KEPT)
    assert kept.is_dir() and not old.exists()
    atomic.sweep_leftovers(str(tmp_path), "g.zarr")
    assert kept.is_dir()


# -------------------- 9: cleanup-cache
def test_cleanup_cache_without_yes_off_a_terminal_refuses(tmp_path):
    cache = tmp_path / "a.groups_cache.npz"
    cache.write_bytes(b"x" * 10)
    rc, out, err = _cli("cleanup-cache", tmp_path)  # stdin: /dev/null, not a terminal
    assert rc == 2 and "refusing" in err and "--yes" in err and "not a terminal" in err, err
    assert cache.exists()
    rc, out, err = _cli("cleanup-cache", tmp_path, "--yes")
    assert rc == 0 and not cache.exists()


# ----------------------------------------------------------------------------- helpers
def _has(module) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _remove(path):
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def test_a_zarr_stack_whose_metadata_is_gone_for_a_moment_has_changed(tmp_path):
    """A reader that looks while a republished .zarr is being swapped in finds no
    metadata document: that is a change (ScanFileError naming the store), or "replaced"
    where replacing is fine; never a TypeError from os.stat(None), as it once was."""
    zarr = pytest.importorskip("zarr")
    path = tmp_path / "a.zarr"
    zarr.open_array(str(path), mode="w", shape=(4, 2, 2), dtype="f4")[:] = 1.0
    stack = zarr.open_array(str(path), mode="r")
    assert frames.check_unchanged(stack) is not None  # remembered, and the same
    (path / "zarr.json").rename(tmp_path / "elsewhere.json")
    with pytest.raises(io.ScanFileError, match=r"a\.zarr.*changed on disk"):
        frames.check_unchanged(stack)
    assert frames.check_unchanged(stack, replaced_ok=True) == "replaced"
