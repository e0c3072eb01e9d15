"""Scan files (DESIGN.md section 5): NPZ member memory-mapping, HDF5/CXI/Zarr/.npy readers,
the streaming NPZ writer, conversion, and frame reads at sorted unique indices."""

from __future__ import annotations

import errno
import importlib
import io as stdio
import os
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from gpugroup import RawData, io
from gpugroup.rawdata import convert
from gpugroup.io import frames, npz

h5py = pytest.importorskip("h5py")
zarr = pytest.importorskip("zarr")


def make_raw(n=120, N=8, with_y=False, seed=0):
    rng = np.random.default_rng(seed)
    row, col = np.divmod(np.arange(n), 12)
    x = col + rng.uniform(-0.3, 0.3, n)
    y = row + rng.uniform(-0.3, 0.3, n)
    diff = rng.random((n, N, N), dtype=np.float32)
    probe = (rng.random((N, N)) + 1j).astype(np.complex64)
    Y = (rng.random((n, N, N)) + 1j * rng.random((n, N, N))).astype(np.complex64) \
        if with_y else None
    return RawData(x, y, x + 0.01, y - 0.01, diff, probe, np.zeros(n, np.int64), Y=Y,
                   metadata={"energy_keV": 8.0}, backend="cpu")


def assert_same_scan(a, b):
    for k, v in a.to_dict().items():
        w = b.to_dict()[k]
        if k == "_metadata":
            assert str(w) == str(v)
        else:
            np.testing.assert_array_equal(np.asarray(w[...]), np.asarray(v), err_msg=k)


# ----------------------------------------------------------------------------- NPZ
def test_npz_members_are_memory_mapped(tmp_path):
    raw = make_raw(with_y=True)
    path = tmp_path / "scan.npz"
    raw.to_file(path)
    back = RawData.from_file(path, mmap_mode="r", backend="cpu")
    assert isinstance(back.diff3d, np.memmap) and isinstance(back.Y, np.memmap)
    assert not isinstance(back.xcoords, np.memmap)
    assert back.diff3d.filename == str(path.resolve())
    assert_same_scan(raw, back)
    # np.savez output (written by NumPy itself) maps too, fortran-ordered members included
    p2 = tmp_path / "np.npz"
    np.savez(p2, **{**raw.to_dict(), "diff3d": np.asfortranarray(raw.diff3d)})
    back2 = RawData.from_file(p2, mmap_mode="r", backend="cpu")
    assert isinstance(back2.diff3d, np.memmap)
    np.testing.assert_array_equal(back2.diff3d, raw.diff3d)
    # grouping from the mapped scan equals grouping in memory
    a = raw.generate_grouped_data(8, K=7, nsamples=40, seed=5, gridsize=2)
    b = back.generate_grouped_data(8, K=7, nsamples=40, seed=5, gridsize=2)
    for k in ("nn_indices", "X_full", "diffraction", "Y", "coords_relative"):
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_npz_keys_mapping(tmp_path):
    raw = make_raw()
    path = tmp_path / "renamed.npz"
    np.savez(path, frames=raw.diff3d, px=raw.xcoords, py=raw.ycoords, probe=raw.probeGuess)
    keys = {"diff3d": "frames", "xcoords": "px", "ycoords": "py", "probeGuess": "probe"}
    back = RawData.from_file(path, mmap_mode="r", keys=keys, backend="cpu")
    assert isinstance(back.diff3d, np.memmap)
    np.testing.assert_array_equal(back.diff3d, raw.diff3d)
    np.testing.assert_array_equal(back.ycoords, raw.ycoords)
    with pytest.raises(ValueError, match=r"renamed\.npz.*no member 'nope'.*'diff3d': 'nope'"
                                         r".*members are \['frames', "):
        RawData.from_file(path, keys={**keys, "diff3d": "nope"})
    np.savez(path, diff3d=raw.diff3d, **{k: v for k, v in raw.to_dict().items()
                                          if k in ("xcoords", "ycoords", "probeGuess")})
    with pytest.raises(ValueError, match="no member 'nope'"):  # even where diff3d exists
        RawData.from_file(path, keys={"diff3d": "nope"})


def test_compressed_npz_refuses_mmap_and_converts(tmp_path):
    raw = make_raw()
    src = tmp_path / "packed.npz"
    np.savez_compressed(src, **{k: np.asarray(v) for k, v in raw.to_dict().items()})
    with pytest.raises(ValueError, match=r"packed\.npz.*'diff3d'.*compressed.*gpugroup convert"
                       ) as refused:
        RawData.from_file(src, mmap_mode="r")
    # the Python the message suggests is a function that exists
    module, name = re.search(r"in Python (gpugroup\.[\w.]+)\.(\w+)\(", str(refused.value)).groups()
    assert getattr(importlib.import_module(module), name) is convert
    assert_same_scan(raw, RawData.from_file(src, backend="cpu"))  # in memory still works
    for name in ("plain.npz", "scan.h5", "scan.zarr"):
        out = convert(src, tmp_path / name, slab_bytes=1000)
        back = RawData.from_file(out, mmap_mode="r", backend="cpu")
        assert not isinstance(back.diff3d, np.ndarray) or isinstance(back.diff3d, np.memmap)
        assert_same_scan(raw, back)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed.npz", "plain.npz",
                                                          "scan.h5", "scan.zarr"]


def test_convert_streams_compressed_members(tmp_path, monkeypatch):
    raw = make_raw(n=200)
    src = tmp_path / "packed.npz"
    np.savez_compressed(src, **{k: np.asarray(v) for k, v in raw.to_dict().items()})
    data = npz.read_npz_streaming(src)
    stack = data["diff3d"]
    assert isinstance(stack, npz.ZipMemberStack)
    np.testing.assert_array_equal(stack[0:7], raw.diff3d[0:7])
    np.testing.assert_array_equal(stack[50:60], raw.diff3d[50:60])
    np.testing.assert_array_equal(stack[3:5], raw.diff3d[3:5])  # going back reopens
    seen = []
    convert(src, tmp_path / "out.h5", slab_bytes=8 * 8 * 4 * 16,
               progress=seen.append)
    assert sum(seen) == 200 and max(seen) == 16


def test_truncated_or_foreign_files(tmp_path):
    raw = make_raw()
    good = tmp_path / "good.npz"
    raw.to_file(good)
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[:-2000])
    with pytest.raises(OSError, match="cut.npz"):
        RawData.from_file(cut, mmap_mode="r")
    fake = tmp_path / "fake.h5"
    fake.write_bytes(b"not hdf5 at all")
    with pytest.raises(OSError, match="fake.h5"):
        RawData.from_file(fake)
    with pytest.raises(FileNotFoundError):
        RawData.from_file(tmp_path / "absent.h5")
    with pytest.raises(FileNotFoundError):
        RawData.from_file(tmp_path / "absent.zarr")
    bare = tmp_path / "frames.npy"
    np.save(bare, raw.diff3d)
    with pytest.raises(ValueError, match=r"frames\.npy.*no coordinates.*directory"):
        RawData.from_file(bare)


def test_npz_writer_any_order_and_zip64(tmp_path):
    path = tmp_path / "w.npz"
    rng = np.random.default_rng(1)
    a = rng.random((37, 5, 3)).astype(np.float32)
    c = (rng.random((4, 2)) + 1j).astype(np.complex64)
    with npz.NpzWriter(path) as w:
        sa = w.create("a", a.shape, a.dtype)
        sc = w.create("c", c.shape, c.dtype)
        for start in (30, 0, 10, 20):  # out of order: CRC computed at close
            sa[start:start + 10] = a[start:start + 10]
        sc[0:4] = c
        w.put("s", np.array(2.5))
        w.put("meta", np.array('{"k": 1}'))
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
    with np.load(path) as z:
        np.testing.assert_array_equal(z["a"], a)
        np.testing.assert_array_equal(z["c"], c)
        assert float(z["s"]) == 2.5 and str(z["meta"]) == '{"k": 1}'
    m = npz.read_npz(path, "r", stack_keys=("a",))
    assert isinstance(m["a"], np.memmap)
    np.testing.assert_array_equal(m["a"], a)


# ----------------------------------------------------------------------------- HDF5, Zarr
@pytest.mark.parametrize("name", ["scan.h5", "scan.hdf5", "scan.zarr"])
def test_hdf5_zarr_round_trip(tmp_path, name):
    raw = make_raw(with_y=True)
    path = tmp_path / name
    raw.to_file(path)
    lazy = RawData.from_file(path, mmap_mode="r", backend="cpu")
    kind = zarr.Array if name.endswith(".zarr") else h5py.Dataset
    assert isinstance(lazy.diff3d, kind) and isinstance(lazy.Y, kind)
    assert lazy.metadata == {"energy_keV": 8.0}
    assert_same_scan(raw, lazy)
    eager = RawData.from_file(path, backend="cpu")
    assert isinstance(eager.diff3d, np.ndarray)
    assert_same_scan(raw, eager)
    a = raw.generate_grouped_data(8, K=7, nsamples=30, seed=2, gridsize=2)
    b = lazy.generate_grouped_data(8, K=7, nsamples=30, seed=2, gridsize=2)
    for k in ("nn_indices", "X_full", "Y"):
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_cxi_layout_and_keys_mapping(tmp_path):
    raw = make_raw()
    path = tmp_path / "scan.cxi"
    with h5py.File(path, "w") as f:
        f["entry_1/data_1/data"] = raw.diff3d
        f["entry_1/instrument_1/source_1/probe"] = raw.probeGuess
        t = np.stack([raw.xcoords, raw.ycoords, np.zeros(len(raw))], axis=1)
        f["entry_1/sample_1/geometry_1/translation"] = t
    back = RawData.from_file(path, mmap_mode="r", backend="cpu")
    assert isinstance(back.diff3d, h5py.Dataset) and back.diff3d.name == "/entry_1/data_1/data"
    np.testing.assert_array_equal(back.xcoords, raw.xcoords)
    np.testing.assert_array_equal(back.probeGuess, raw.probeGuess)
    # any layout, by keys
    other = tmp_path / "custom.h5"
    with h5py.File(other, "w") as f:
        f["exp/frames"] = raw.diff3d
        f["exp/pos/x"] = raw.xcoords
        f["exp/pos/y"] = raw.ycoords
        f["exp/probe"] = raw.probeGuess
    keys = {"diff3d": "/exp/frames", "xcoords": "exp/pos/x", "ycoords": "exp/pos/y",
            "probeGuess": "exp/probe"}
    back = RawData.from_file(other, mmap_mode="r", keys=keys, backend="cpu")
    np.testing.assert_array_equal(back.diff3d[...], raw.diff3d)
    with pytest.raises(ValueError, match=r"custom\.h5.*lacks.*'diff3d'.*found.*/exp/frames.*keys="):
        RawData.from_file(other)
    with pytest.raises(ValueError, match=r"lacks.*'diff3d'.*keys names \{'diff3d': '/nope'\}"):
        RawData.from_file(other, keys={**keys, "diff3d": "/nope"})
    with pytest.raises(ValueError, match="group, not a dataset"):
        RawData.from_file(other, keys={**keys, "diff3d": "exp/pos"})
    with pytest.raises(ValueError, match="unknown field"):
        RawData.from_file(other, keys={"frames": "exp/frames"})


@pytest.mark.parametrize("fmt", ["npz", "npy", "h5", "zarr"])
def test_keys_may_name_the_frames_diffraction_in_every_format(tmp_path, fmt):
    # PtychoPINN's other name for diff3d: accepted by keys for every format, not NPZ alone
    raw = make_raw()
    fields = {"frames": raw.diff3d, "xcoords": raw.xcoords, "ycoords": raw.ycoords,
              "probeGuess": raw.probeGuess}
    path = tmp_path / f"scan.{fmt}"
    if fmt == "npz":
        np.savez(path, **fields)
    elif fmt == "npy":
        path.mkdir()
        for k, v in fields.items():
            np.save(path / f"{k}.npy", v)
    elif fmt == "h5":
        with h5py.File(path, "w") as f:
            for k, v in fields.items():
                f[k] = v
    else:
        g = zarr.open_group(path, mode="w")
        for k, v in fields.items():
            g.create_array(k, data=v)
    for mmap_mode in (None, "r"):
        back = RawData.from_file(path, mmap_mode=mmap_mode, keys={"diffraction": "frames"},
                                 backend="cpu")
        np.testing.assert_array_equal(np.asarray(back.diff3d[...]), raw.diff3d)
    with pytest.raises(ValueError, match=r"frames twice, diff3d='a' and diffraction='frames'"):
        RawData.from_file(path, keys={"diff3d": "a", "diffraction": "frames"})
    back = RawData.from_file(path, keys={"diff3d": "frames", "diffraction": "frames"},
                             backend="cpu")
    np.testing.assert_array_equal(back.diff3d, raw.diff3d)


def test_npy_directory(tmp_path):
    raw = make_raw()
    d = tmp_path / "scan_dir"
    d.mkdir()
    for k, v in raw.to_dict().items():
        np.save(d / f"{k}.npy", np.asarray(v))
    back = RawData.from_file(d, mmap_mode="r", backend="cpu")
    assert isinstance(back.diff3d, np.memmap)
    assert_same_scan(raw, back)
    (d / "diff3d.npy").unlink()
    with pytest.raises(ValueError, match="lacks required.*diff3d"):
        RawData.from_file(d)


def _h5_scan(path, raw, diff3d):
    """An HDF5 scan of ``raw``'s fields, its frames written by ``diff3d(file)``."""
    with h5py.File(path, "w") as f:
        for key in ("xcoords", "ycoords", "probeGuess"):
            f[key] = getattr(raw, key)
        diff3d(f)


@pytest.mark.parametrize("mmap_mode", [None, "r"])
def test_an_hdf5_dataset_never_fully_written_is_refused(tmp_path, mmap_mode):
    """HDF5 reads unwritten chunks (or unwritten contiguous storage) as the fill value:
    frames of zeros that were grouped as data."""
    raw = make_raw()

    def half(f):
        d = f.create_dataset("diff3d", shape=raw.diff3d.shape, dtype="f4", chunks=(16, 8, 8))
        d[:50] = raw.diff3d[:50]

    _h5_scan(tmp_path / "half.h5", raw, half)
    with pytest.raises(io.ScanFileError, match=r"'diff3d' is incomplete: 4 of its 8 chunks "
                       r"were never written \(the first holds rows 64\.\.79\)"):
        RawData.from_file(tmp_path / "half.h5", mmap_mode=mmap_mode, backend="cpu")
    def half_frames(f):  # chunks that split each frame: the first half of each written
        d = f.create_dataset("diff3d", shape=raw.diff3d.shape, dtype="f4", chunks=(1, 4, 8))
        d[:, :4] = raw.diff3d[:, :4]

    _h5_scan(tmp_path / "split.h5", raw, half_frames)
    with pytest.raises(io.ScanFileError, match=r"120 of its 240 chunks were never written "
                       r"\(the first holds rows 0\.\.0\)"):
        RawData.from_file(tmp_path / "split.h5", mmap_mode=mmap_mode, backend="cpu")
    _h5_scan(tmp_path / "none.h5", raw,
             lambda f: f.create_dataset("diff3d", shape=raw.diff3d.shape, dtype="f4"))
    with pytest.raises(io.ScanFileError, match="none of it was ever written"):
        RawData.from_file(tmp_path / "none.h5", mmap_mode=mmap_mode, backend="cpu")

    def whole(f):
        d = f.create_dataset("diff3d", shape=raw.diff3d.shape, dtype="f4", chunks=(16, 8, 8))
        d[:] = raw.diff3d

    _h5_scan(tmp_path / "whole.h5", raw, whole)
    back = RawData.from_file(tmp_path / "whole.h5", mmap_mode=mmap_mode, backend="cpu")
    np.testing.assert_array_equal(back.diff3d[...], raw.diff3d)


def test_a_virtual_hdf5_dataset_with_a_missing_source_is_refused(tmp_path):
    """An Eiger/NeXus layout: frames in source files that a virtual dataset maps; HDF5
    reads a missing source as the fill value."""
    raw = make_raw()
    layout = h5py.VirtualLayout(shape=raw.diff3d.shape, dtype="f4")
    for i in range(2):
        with h5py.File(tmp_path / f"data_{i}.h5", "w") as f:
            f["data"] = raw.diff3d[60 * i:60 * (i + 1)]
        layout[60 * i:60 * (i + 1)] = h5py.VirtualSource(f"data_{i}.h5", "data",
                                                           shape=(60, 8, 8))
    _h5_scan(tmp_path / "master.h5", raw,
             lambda f: f.create_virtual_dataset("diff3d", layout, fillvalue=0))
    back = RawData.from_file(tmp_path / "master.h5", backend="cpu")
    np.testing.assert_array_equal(back.diff3d, raw.diff3d)
    (tmp_path / "data_1.h5").rename(tmp_path / "elsewhere.h5")
    with pytest.raises(io.ScanFileError, match="source file 'data_1.h5' is missing"):
        RawData.from_file(tmp_path / "master.h5", backend="cpu")
    with h5py.File(tmp_path / "data_1.h5", "w") as f:
        f["other"] = raw.diff3d[60:]
    with pytest.raises(io.ScanFileError, match="has no dataset 'data'"):
        RawData.from_file(tmp_path / "master.h5", backend="cpu")


def test_an_hdf5_link_that_leads_nowhere_is_said_so(tmp_path):
    raw = make_raw()
    with h5py.File(tmp_path / "frames.h5", "w") as f:
        f["data"] = raw.diff3d
    _h5_scan(tmp_path / "linked.h5", raw,
             lambda f: f.__setitem__("diff3d", h5py.ExternalLink("frames.h5", "/data")))
    back = RawData.from_file(tmp_path / "linked.h5", backend="cpu")
    np.testing.assert_array_equal(back.diff3d, raw.diff3d)
    (tmp_path / "frames.h5").unlink()
    with pytest.raises(io.ScanFileError, match=r"'diff3d' is an external link to '/data' "
                       r"in 'frames.h5', which cannot be opened"):
        RawData.from_file(tmp_path / "linked.h5", backend="cpu")
    _h5_scan(tmp_path / "soft.h5", raw,
             lambda f: f.__setitem__("diff3d", h5py.SoftLink("/entry/data")))
    with pytest.raises(io.ScanFileError, match=r"'diff3d' is a link to '/entry/data'"):
        RawData.from_file(tmp_path / "soft.h5", backend="cpu")


def test_missing_optional_packages_say_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ImportError, match=r'pip install "gpugroup\[hdf5\]"'):
        RawData.from_file(tmp_path / "x.h5")
    monkeypatch.setitem(sys.modules, "zarr", None)
    with pytest.raises(ImportError, match=r'pip install "gpugroup\[zarr\]"'):
        io.read_scan(tmp_path / "x.zarr")


def test_import_gpugroup_does_not_import_optional_packages():
    code = ("import sys, gpugroup, gpugroup.io, gpugroup.dataset, gpugroup.rawdata; "
            "bad = [m for m in ('h5py', 'zarr', 'dask', 'distributed', 'cupy') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# ----------------------------------------------------------------------------- frame reads
@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("stores")
    rng = np.random.default_rng(3)
    stack = rng.random((300, 6, 6), dtype=np.float32)
    np.savez(d / "s.npz", diff3d=stack)
    with h5py.File(d / "s.h5", "w") as f:
        f["contig"] = stack
        f.create_dataset("chunked", data=stack, chunks=(4, 6, 6))
        f.create_dataset("gzip", data=stack, chunks=(1, 6, 6), compression="gzip")
        f.create_dataset("big_endian", data=stack.astype(">f4"))
    g = zarr.open_group(d / "s.zarr", mode="w")
    for name, kw in {"raw1": dict(chunks=(1, 6, 6), compressors=None),
                     "raw7": dict(chunks=(7, 6, 6), compressors=None),
                     "zstd": dict(chunks=(5, 6, 6)),
                     "sharded": dict(chunks=(2, 6, 6), shards=(10, 6, 6))}.items():
        g.create_array(name, data=stack, **kw)
    sparse = g.create_array("sparse", shape=stack.shape, dtype="f4", chunks=(3, 6, 6),
                            compressors=None, fill_value=0)
    sparse[30:60] = stack[30:60]
    f = h5py.File(d / "s.h5", "r")
    z = zarr.open_group(d / "s.zarr", mode="r")
    out = {"memmap": npz.read_npz(d / "s.npz", "r")["diff3d"],
           "raw": frames.RawFileStack(d / "s.npz", npz.read_npz(d / "s.npz", "r")["diff3d"].offset,
                                      stack.shape, stack.dtype)}
    out.update({f"h5-{k}": f[k] for k in f})
    out.update({f"zarr-{k}": z[k] for k in z.array_keys()})
    expect = {k: stack for k in out}
    sparse_expect = np.zeros_like(stack)
    sparse_expect[30:60] = stack[30:60]
    expect["zarr-sparse"] = sparse_expect
    yield out, expect
    f.close()


@pytest.mark.parametrize("name", ["memmap", "raw", "h5-contig", "h5-chunked", "h5-gzip",
                                  "h5-big_endian", "zarr-raw1", "zarr-raw7", "zarr-zstd",
                                  "zarr-sharded"])
def test_gather_frames_equals_take(stores, name):
    stack_by_name, expect_by_name = stores
    stack, expect = stack_by_name[name], expect_by_name[name]
    rng = np.random.default_rng(7)
    cases = [rng.integers(0, 300, 50), np.arange(40, 80), np.array([299, 0, 0, 5, 299]),
             np.concatenate([np.arange(10, 20), rng.integers(0, 300, 30)]),
             np.array([], dtype=np.int64), rng.integers(0, 300, (6, 4))]
    for idx in cases:
        got = frames.gather_frames(stack, idx)
        np.testing.assert_array_equal(got, expect[np.asarray(idx).reshape(-1)])
        u = np.unique(idx)
        np.testing.assert_array_equal(frames.read_frames(stack, u), expect[u])


def test_unwritten_zarr_chunks_are_an_error_not_fill_values(stores):
    """Chunks zarr never wrote (or that were lost) read as fill values: not data. Reads of
    frames in them raise, naming the array and the chunk; written ones still read."""
    stack_by_name, expect_by_name = stores
    sparse = stack_by_name["zarr-sparse"]
    np.testing.assert_array_equal(frames.gather_frames(sparse, [30, 45, 59]),
                                  expect_by_name["zarr-sparse"][[30, 45, 59]])
    with pytest.raises(io.ScanFileError, match=r"'/sparse'.*missing chunk 'c/0/0/0'"):
        frames.gather_frames(sparse, [0, 31])


def test_fast_paths_are_taken(stores):
    stack_by_name, _ = stores
    assert frames.raw_view(stack_by_name["memmap"]) is not None
    assert frames.raw_view(stack_by_name["h5-contig"]) is not None
    assert frames.raw_view(stack_by_name["h5-big_endian"]) is not None
    assert frames.raw_view(stack_by_name["h5-chunked"]) is None
    assert frames.raw_view(stack_by_name["memmap"][1:]) is None  # a view: not the mapping
    assert frames._zarr_direct_layout(stack_by_name["zarr-raw7"])[1] == 7
    assert frames._zarr_direct_layout(stack_by_name["zarr-zstd"]) is None
    assert frames._zarr_direct_layout(stack_by_name["zarr-sharded"]) is None


def test_raw_file_stack_errors_and_pickling(tmp_path):
    import pickle

    stack = np.arange(5 * 4, dtype=np.float32).reshape(5, 2, 2)
    p = tmp_path / "a.npy"
    np.save(p, stack)
    m = np.load(p, mmap_mode="r")
    r = frames.raw_view(m)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(r))[[4, 1]], stack[[4, 1]])
    with pytest.raises(IndexError, match="out of range"):
        r.take([5])
    ref = frames.stack_ref(m)
    assert ref.kind == "raw" and frames.open_stack(ref).shape == (5, 2, 2)
    with open(p, "r+b") as fh:
        fh.truncate(os.path.getsize(p) - 8)
    with pytest.raises(OSError, match="changed on disk after the scan was opened"):
        r.take([4])  # r knows the file it was made from
    with pytest.raises(OSError, match="truncated"):
        frames.RawFileStack(p, r.offset, r.shape, r.dtype).take([4])


def test_members_that_are_no_scan_field_are_logged(tmp_path, caplog):
    raw = make_raw()
    fields = {k: np.asarray(v) for k, v in raw.to_dict().items()}
    npz_path = tmp_path / "extra.npz"
    np.savez(npz_path, **fields, foo=np.arange(3), diffraction=fields["diff3d"])
    npy_dir = tmp_path / "scan_dir"
    npy_dir.mkdir()
    for k, v in fields.items():
        np.save(npy_dir / f"{k}.npy", v)
    np.save(npy_dir / "xcoord.npy", fields["xcoords"])  # a typo'd extra file
    with caplog.at_level("WARNING", logger="gpugroup"):
        io.read_scan(npz_path)
        assert "['foo']" in caplog.text
        RawData.from_file(npz_path, backend="cpu")
        assert "both diff3d and diffraction: using diff3d" in caplog.text
        caplog.clear()
        io.read_scan(npy_dir)
        assert "['xcoord']" in caplog.text
        caplog.clear()
        convert(npz_path, tmp_path / "c.npz")  # conversion would drop it: say so
        assert "['foo']" in caplog.text
        caplog.clear()
        io.read_scan(tmp_path / "c.npz")  # a clean scan: nothing to say
        assert caplog.text == ""


def test_read_scan_maps_read_only(tmp_path):
    path = tmp_path / "s.npz"
    make_raw().to_file(path)
    for mode in ("r+", "c", "w"):
        with pytest.raises(ValueError, match=re.escape(f"mmap_mode={mode!r}")):
            io.read_scan(path, mmap_mode=mode)


def test_convert_refuses_a_link_to_its_source(tmp_path):
    path = tmp_path / "s.h5"
    make_raw().to_file(path)
    link = tmp_path / "link.h5"
    link.symlink_to(path)
    before = path.read_bytes()
    for src, dst in ((link, path), (path, link)):
        with pytest.raises(ValueError, match="is the input scan"):
            convert(src, dst)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['difff3d'\]"):
        convert(path, tmp_path / "k.h5", keys={"difff3d": "frames"})
    assert path.read_bytes() == before
    assert io.same_path(link, path) and not io.same_path(path, tmp_path / "other.h5")


def test_zarr_output_replacing_a_plain_file_leaves_nothing_behind(tmp_path):
    target = tmp_path / "f.zarr"
    target.write_text("an old file with a .zarr name")
    make_raw().to_file(target)
    assert target.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.zarr"]


def test_zarr_older_than_3_says_what_to_install(monkeypatch, tmp_path):
    import types

    monkeypatch.setitem(sys.modules, "zarr", types.SimpleNamespace(__version__="2.18.3"))
    with pytest.raises(ImportError, match=r"zarr >= 3 \(found 2\.18\.3\).*zarr>=3"):
        io.read_scan(tmp_path / "x.zarr")


def test_a_damaged_store_is_named_in_the_error(tmp_path):
    path = tmp_path / "bad.zarr"
    make_raw().to_file(path)
    chunks = sorted(p for p in (path / "diff3d").rglob("*")
                    if p.is_file() and p.name != "zarr.json")
    assert chunks
    with open(chunks[0], "r+b") as fh:
        fh.truncate(10)
    raw = RawData.from_file(path, mmap_mode="r", backend="cpu")
    with pytest.raises(OSError, match=r"cannot read frames .* of Zarr array .*bad\.zarr/diff3d"):
        raw.generate_grouped_data(8, K=7, nsamples=20, seed=1, gridsize=2)


def _write_h5_without_its_filter(path, raw):
    """``raw`` as HDF5 with diff3d's chunks declared bitshuffle/LZ4-compressed (filter
    32008), a filter h5py cannot load without hdf5plugin: reads fail as for Eiger files."""
    with h5py.File(path, "w") as f:
        for key, value in raw.to_dict().items():
            if key != "diff3d" and key != "_metadata":
                f[key] = value
        ds = f.create_dataset("diff3d", shape=raw.diff3d.shape, dtype=raw.diff3d.dtype,
                              chunks=(1,) + raw.diff3d.shape[1:], compression=32008,
                              allow_unknown_filter=True)
        for i, frame in enumerate(raw.diff3d):
            ds.id.write_direct_chunk((i, 0, 0), frame.tobytes())


def test_whole_reads_of_unreadable_frames_name_the_store(tmp_path):
    """Read into memory (mmap_mode=None) or copied (convert), frames that cannot be
    decoded give the same message as scattered reads: the file, the array, the fix."""
    raw = make_raw()
    h5 = tmp_path / "bs.h5"
    _write_h5_without_its_filter(h5, raw)
    hint = r"cannot read {}HDF5 dataset '/diff3d' in '.*bs\.h5'.*pip install hdf5plugin"
    with pytest.raises(io.ScanFileError, match=hint.format("")):
        RawData.from_file(h5, backend="cpu")
    with pytest.raises(io.ScanFileError, match=hint.format(r"frames 0\.\.119 of ")):
        convert(h5, tmp_path / "out.npz")
    store = tmp_path / "bad.zarr"
    raw.to_file(store)
    chunk = min(p for p in (store / "diff3d").rglob("*")
                if p.is_file() and p.name != "zarr.json")
    with open(chunk, "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(io.ScanFileError, match=r"cannot read Zarr array .*bad\.zarr/diff3d"
                                               r".*truncated or damaged"):
        RawData.from_file(store, backend="cpu")
    assert sorted(os.listdir(tmp_path)) == ["bad.zarr", "bs.h5"]


@pytest.mark.parametrize("value", [{"a": 1}, "abc"])
@pytest.mark.parametrize("suffix", [".npz", ".h5", ".zarr"])
def test_scalar_fields_that_are_not_numbers_are_named(tmp_path, suffix, value):
    base = make_raw()
    raw = RawData(base.xcoords, base.ycoords, None, None, base.diff3d, base.probeGuess, None,
                  norm_Y_I=value, backend="cpu")
    with pytest.raises(ValueError, match=r"cannot store 'norm_Y_I': its value "
                                         + re.escape(repr(value))
                                         + r" .*set norm_Y_I to a number"):
        raw.to_file(tmp_path / ("out" + suffix))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["nope.npz", "nope.h5", "nope.cxi", "nope.zarr", "nope"])
def test_a_missing_scan_is_said_alike_for_every_format(tmp_path, name):
    missing = re.escape(repr(str(tmp_path / name)))
    for mmap_mode in (None, "r"):
        with pytest.raises(FileNotFoundError,
                           match=f"^scan file {missing} does not exist; check the path$"):
            RawData.from_file(tmp_path / name, mmap_mode=mmap_mode)


def test_keys_that_are_not_a_mapping_are_named(tmp_path):
    path = tmp_path / "scan.h5"
    make_raw().to_file(path)
    with pytest.raises(TypeError, match=r"got keys='diff3d=/x'; pass e\.g\. "
                                        r"keys=\{'diff3d': '/x'\}"):
        RawData.from_file(path, keys="diff3d=/x")
    with pytest.raises(TypeError, match=r"got keys=\['diff3d'\]; pass e\.g\. keys=\{"):
        convert(path, tmp_path / "out.npz", keys=["diff3d"])
    with pytest.raises(TypeError, match=r"got keys=\{'diff3d': 3\}"):
        RawData.from_file(path, keys={"diff3d": 3})
    assert os.listdir(tmp_path) == ["scan.h5"]
    # what dict() takes, and HDF5 names as bytes, still name where a field is
    for keys in ([("diff3d", "diff3d")], {"diff3d": b"diff3d"}):
        assert_same_scan(make_raw(), RawData.from_file(path, keys=keys, backend="cpu"))


def _constant_scan(value, dtype=np.float32):
    base = make_raw()
    return RawData(base.xcoords, base.ycoords, base.xcoords_start, base.ycoords_start,
                   np.full(base.diff3d.shape, value, dtype), base.probeGuess, None,
                   backend="cpu")


def _write_h5_chunked(path, raw):
    h5py = pytest.importorskip("h5py")
    tmp = str(path) + ".new"
    with h5py.File(tmp, "w") as f:
        for key, value in raw.to_dict().items():
            if key == "diff3d":
                f.create_dataset(key, data=value, chunks=(1,) + value.shape[1:],
                                 compression="gzip")
            elif value is not None and key != "_metadata":
                f[key] = value
    os.replace(tmp, path)


@pytest.mark.parametrize("name, how", [
    ("scan.npz", "replaced"), ("scan.h5", "replaced"), ("chunked.h5", "replaced"),
    ("scan.zarr", "replaced"), ("scan.npz", "in place"), ("chunked.h5", "in place")])
def test_a_scan_file_rewritten_after_opening_is_never_mixed_in(tmp_path, name, how):
    """A scan file replaced by a new one (os.replace) or rewritten in place (np.savez or
    cp to the same name): scans opened before keep their data or say the file changed;
    scans opened after read the new file, never a cached handle or mapping of the old."""
    import gc
    import shutil

    import pickle

    gd = pytest.importorskip("gpugroup.dask")
    path = tmp_path / name
    opts = dict(K=1, nsamples=3, seed=0)
    ways = {  # max(diffraction) by each reading path
        "eager": lambda raw, tag: raw.generate_grouped_data(8, **opts)["diffraction"].max(),
        "streamed": lambda raw, tag: np.asarray(raw.generate_grouped_data(
            8, out=tmp_path / f"{tag}.npz", **opts)["diffraction"]).max(),
        "lazy": lambda raw, tag: gd.compute(raw.generate_grouped_data(
            8, lazy=True, **opts))["diffraction"].max(),
        "dataset": lambda raw, tag: pickle.loads(pickle.dumps(raw.grouped_dataset(
            8, **opts)))[0:3]["diffraction"].max(),
    }

    def write(value):
        raw = _constant_scan(value)
        target = path if how == "replaced" or not path.exists() else tmp_path / f"new-{name}"
        _write_h5_chunked(target, raw) if name == "chunked.h5" else raw.to_file(target)
        if target != path:
            shutil.copyfile(target, path)  # same inode, new bytes

    write(1.0)
    old = RawData.from_file(path, mmap_mode="r", backend="cpu")
    assert {way: f(old, way + "1") for way, f in ways.items()} == dict.fromkeys(ways, 1.0)
    write(7.0)
    for way, f in ways.items():  # the scan opened before: its own data, or an error
        try:
            assert f(old, way + "old") == 1.0, way
        except io.ScanFileError as exc:
            assert "changed on disk after the scan was opened" in str(exc), way
    if how == "in place" and name.endswith(".h5"):
        # HDF5 shares an open file: while the old scan holds it, the new one is refused
        with pytest.raises(io.ScanFileError, match="rewritten in place while an earlier"):
            RawData.from_file(path, mmap_mode="r", backend="cpu")
        del old
        gc.collect()
    new = RawData.from_file(path, mmap_mode="r", backend="cpu")
    assert {way: f(new, way + "7") for way, f in ways.items()} == dict.fromkeys(ways, 7.0)


def test_a_scan_file_shrunk_in_place_is_an_error_not_a_crash(tmp_path):
    """Reading a memory map past the end of a file cut short kills the process (SIGBUS):
    the change is noticed first. Run in a child process, so a regression cannot take the
    test run down."""
    code = textwrap.dedent(f"""
        import numpy as np
        from gpugroup import RawData, io
        def scan(n):
            x = np.arange(n, dtype=float)
            return dict(xcoords=x, ycoords=x % 7, diff3d=np.ones((n, 8, 8), np.float32),
                        probeGuess=np.ones((8, 8), np.complex64))
        path = {str(tmp_path / "s.npz")!r}
        np.savez(path, **scan(400))
        raw = RawData.from_file(path, mmap_mode="r", backend="cpu")
        np.savez(path, **scan(10))
        for out in (None, {str(tmp_path / "o.npz")!r}):
            try:
                raw.generate_grouped_data(8, K=4, nsamples=200, seed=1, out=out)
            except io.ScanFileError as exc:
                print("refused:", "changed on disk" in str(exc))
        """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert (done.returncode, done.stdout) == (0, "refused: True\nrefused: True\n"), done.stderr


@pytest.mark.parametrize("mode", ["memory", "mmap", "convert"])
def test_a_stack_field_stored_as_none_counts_as_absent_on_every_path(tmp_path, mode):
    """PtychoPINN-style NPZ with Y=None and objectGuess=None (object members holding None):
    absent for from_file in memory, with mmap_mode="r" (Y is a frame stack, opened on
    disk otherwise) and for convert's streaming reader."""
    raw = make_raw()
    path = tmp_path / "pp.npz"
    np.savez(path, Y=None, objectGuess=None,
             **{k: v for k, v in raw.to_dict().items() if k not in ("Y", "objectGuess")})
    if mode == "convert":
        path = convert(path, tmp_path / "out.npz")
    back = RawData.from_file(path, mmap_mode="r" if mode == "mmap" else None, backend="cpu")
    assert back.Y is None and back.objectGuess is None
    np.testing.assert_array_equal(np.asarray(back.diff3d), raw.diff3d)


def _patched_member(src, dst, member, *, flag=None, method=None):
    """A copy of zip ``src`` whose ``member`` claims general-purpose ``flag`` bits or a
    compression ``method`` (in both its local and its central header)."""
    import struct

    data = bytearray(Path(src).read_bytes())
    with zipfile.ZipFile(src) as zf:
        local = zf.getinfo(member).header_offset
    spots = [(local + 6, local + 8)]
    i = data.find(b"PK\x01\x02")
    while i != -1:
        size = struct.unpack_from("<H", data, i + 28)[0]
        if bytes(data[i + 46:i + 46 + size]).decode() == member:
            spots.append((i + 8, i + 10))
        i = data.find(b"PK\x01\x02", i + 4)
    for flag_at, method_at in spots:
        if flag is not None:
            struct.pack_into("<H", data, flag_at, flag)
        if method is not None:
            struct.pack_into("<H", data, method_at, method)
    Path(dst).write_bytes(data)


@pytest.mark.parametrize("patch, match", [
    ({"flag": 1}, r"member 'diff3d' is encrypted; it cannot be memory-mapped"),
    ({"method": 93}, r"member 'diff3d' is compressed \(93\) .*gpugroup convert"),
])
def test_unreadable_stack_members_keep_their_own_message_with_mmap(tmp_path, patch, match):
    """The check for stored-None stacks must not open such members first (zipfile raises
    RuntimeError / NotImplementedError there, naming nothing)."""
    base = tmp_path / "base.npz"
    np.savez(base, **{k: np.asarray(v) for k, v in make_raw().to_dict().items()})
    _patched_member(base, tmp_path / "odd.npz", "diff3d.npy", **patch)
    with pytest.raises(ValueError, match=match):
        RawData.from_file(tmp_path / "odd.npz", mmap_mode="r")


@pytest.mark.parametrize("suffix", [".npz", ".h5", ".zarr"])
def test_a_missing_grouped_output_is_called_one(tmp_path, suffix):
    from gpugroup.io.grouped import open_grouped

    if suffix != ".npz":
        pytest.importorskip({".h5": "h5py", ".zarr": "zarr"}[suffix])
    with pytest.raises(FileNotFoundError, match=r"grouped output '.*nope.*' does not exist"):
        open_grouped(str(tmp_path / f"nope{suffix}"))


# ----------------------------------------------------------------------------- damaged NPZ
def _fields(n=40):
    return {k: np.asarray(v) for k, v in make_raw(n=n).to_dict().items()}


def _zip_of(path, members: dict, compression=zipfile.ZIP_STORED):
    """A zip of ``members`` (name -> bytes), written by zipfile (valid CRC-32s)."""
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _npy_bytes(array, version=None) -> bytes:
    buf = stdio.BytesIO()
    np.lib.format.write_array(buf, array, version=version)
    return buf.getvalue()


def _read_every_way(path, tmp_path):
    """Read ``path`` as ``group`` does (frames mapped), into memory, and as ``convert``
    does; the errors raised, by way (None where it was read)."""
    errors = {}
    for way in ("mmap", "memory", "convert"):
        try:
            if way == "convert":
                convert(path, tmp_path / "converted.npz", slab_bytes=1000)
            else:
                io.read_scan(path, mmap_mode="r" if way == "mmap" else None)
            errors[way] = None
        except Exception as exc:  # noqa: BLE001 - the test looks at what it was
            errors[way] = exc
    return errors


def test_npy_format_3_members_and_files_are_read(tmp_path):
    """Format 3.0 (2.0 with a UTF-8 header) reads as np.load reads it, in an NPZ (mapped,
    in memory, converted) and as the files of a .npy directory."""
    fields = _fields()
    path = _zip_of(tmp_path / "v3.npz", {f"{k}.npy": _npy_bytes(v, (3, 0))
                                         for k, v in fields.items()})
    for mode in ("r", None):
        back = RawData.from_file(path, mmap_mode=mode, backend="cpu")
        assert isinstance(back.diff3d, np.memmap) == (mode == "r")
        np.testing.assert_array_equal(back.diff3d, fields["diff3d"])
        np.testing.assert_array_equal(back.xcoords, fields["xcoords"])
    out = convert(path, tmp_path / "out.npz", slab_bytes=1000)
    np.testing.assert_array_equal(np.load(out)["diff3d"], fields["diff3d"])
    folder = tmp_path / "v3_dir"
    folder.mkdir()
    for k, v in fields.items():
        (folder / f"{k}.npy").write_bytes(_npy_bytes(v, (3, 0)))
    for mode in ("r", None):
        back = RawData.from_file(folder, mmap_mode=mode, backend="cpu")
        np.testing.assert_array_equal(back.diff3d, fields["diff3d"])


def test_npy_headers_written_by_python_2_are_read(tmp_path):
    """Python 2 wrote the shape's ints as longs, "(120L, 8L, 8L)"; NumPy still reads it."""
    fields = _fields()

    def py2(npy: bytes) -> bytes:
        n = int.from_bytes(npy[8:10], "little")
        text = re.sub(r"(\d+)(?=[,)])", r"\1L", npy[10:10 + n].decode("latin1")).rstrip()
        text += " " * (63 - (10 + len(text)) % 64) + "\n"
        return npy[:8] + len(text).to_bytes(2, "little") + text.encode("latin1") + npy[10 + n:]

    path = _zip_of(tmp_path / "py2.npz", {f"{k}.npy": py2(_npy_bytes(v, (1, 0)))
                                          for k, v in fields.items()})
    assert b"L, 8L, 8L)" in path.read_bytes()
    for mode in ("r", None):
        back = RawData.from_file(path, mmap_mode=mode, backend="cpu")
        np.testing.assert_array_equal(back.diff3d, fields["diff3d"])


def _damage_header(npy: bytes, how: str) -> bytes:
    data = bytearray(npy)
    if how == "length byte":  # the header then ends inside the data (tokenize failed)
        data[8] ^= 0xFF
    elif how == "length bytes":
        data[8] ^= 0xFF
        data[9] ^= 0xFF
    elif how == "keys":
        at = data.index(b"'descr'")
        data[at:at + 7] = b"'dexcr'"
    elif how == "version":
        data[6] = 7
    return bytes(data)


@pytest.mark.parametrize("how", ["length byte", "length bytes", "keys", "version"])
@pytest.mark.parametrize("member", ["diff3d", "xcoords"])
def test_a_damaged_npy_header_names_the_file_and_member(tmp_path, how, member):
    """(Damaged before the zip was written, so its CRC-32 agrees: the header is read.)"""
    fields = _fields()
    members = {f"{k}.npy": _npy_bytes(v) for k, v in fields.items()}
    members[f"{member}.npy"] = _damage_header(members[f"{member}.npy"], how)
    path = _zip_of(tmp_path / "bad.npz", members)
    for way, exc in _read_every_way(path, tmp_path).items():
        assert isinstance(exc, io.ScanFileError), (way, exc)
        assert re.search(rf"'.*bad\.npz' \(member '{member}'\): its \.npy header is damaged "
                         r".*The file is damaged: write it again", str(exc)), (way, exc)
    assert not (tmp_path / "converted.npz").exists()
    folder = tmp_path / "dir"
    folder.mkdir()
    for k, v in fields.items():
        np.save(folder / f"{k}.npy", v)
    damaged = folder / f"{member}.npy"
    damaged.write_bytes(_damage_header(damaged.read_bytes(), how))
    for mode in ("r", None):
        with pytest.raises(io.ScanFileError, match=rf"{member}\.npy' \({member}\): its \.npy "
                                                   r"header is damaged .*write it again"):
            io.read_scan(folder, mmap_mode=mode)


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
@pytest.mark.parametrize("member, shape", [("xcoords", (10**13,)), ("xcoords", (200,)),
                                           ("diff3d", (10**13, 8, 8)), ("diff3d", (121, 8, 8))])
def test_a_header_shape_that_disagrees_with_the_member_size_is_damage(tmp_path, compression,
                                                                     member, shape):
    """More data than the member holds: checked before anything is allocated, so not
    'out of memory'."""
    fields = _fields()
    members = {f"{k}.npy": _npy_bytes(v) for k, v in fields.items()}
    head = stdio.BytesIO()
    np.lib.format.write_array_header_1_0(head, {
        "descr": fields[member].dtype.str, "fortran_order": False, "shape": shape})
    members[f"{member}.npy"] = head.getvalue() + fields[member].tobytes()
    path = _zip_of(tmp_path / "lies.npz", members, compression)
    for way, exc in _read_every_way(path, tmp_path).items():
        if way == "mmap" and member == "diff3d" and compression == zipfile.ZIP_DEFLATED:
            assert "compressed" in str(exc)  # (never mapped: its own message)
            continue
        assert isinstance(exc, io.ScanFileError), (way, exc)
        assert re.search(rf"lies\.npz' \(member '{member}'\): its \.npy header says shape "
                         rf"{re.escape(str(shape))} .* but it holds .*damaged", str(exc)), exc


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_bytes_after_the_data_are_left_as_numpy_leaves_them(tmp_path, compression):
    """np.save into a longer existing file, or padding another tool writes: NumPy reads
    the array the header describes, and so does gpugroup."""
    fields = _fields()
    members = {f"{k}.npy": _npy_bytes(v) + bytes(64) for k, v in fields.items()}
    path = _zip_of(tmp_path / "padded.npz", members, compression)
    for mode in ("r", None) if compression == zipfile.ZIP_STORED else (None,):
        back = RawData.from_file(path, mmap_mode=mode, backend="cpu")
        np.testing.assert_array_equal(back.diff3d, np.load(path)["diff3d"])
        np.testing.assert_array_equal(back.xcoords, fields["xcoords"])


def test_an_io_error_of_the_system_is_not_called_damage(tmp_path, monkeypatch):
    """EIO (a failing disk), EACCES: the system's error with its errno, not 'the file is
    damaged: write it again'."""
    path = tmp_path / "s.npz"
    make_raw(n=40).to_file(path)

    def failing(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(npz, "read_npy_data", failing)
    with pytest.raises(OSError) as info:
        io.read_scan(path)
    assert info.value.errno == errno.EIO and not isinstance(info.value, io.ScanFileError)


def _central(data, member):
    """Offset of ``member``'s entry in the central directory of zip bytes ``data``."""
    import struct

    i = data.find(b"PK\x01\x02")
    while i != -1:
        size = struct.unpack_from("<H", data, i + 28)[0]
        if bytes(data[i + 46:i + 46 + size]).decode() == member:
            return i
        i = data.find(b"PK\x01\x02", i + 4)
    raise AssertionError(member)


def _damage_zip(src, dst, how):
    """A copy of zip ``src`` with its directory damaged ``how``."""
    import struct

    data = bytearray(Path(src).read_bytes())
    if how == "locator on another disk":  # an end-of-directory zip64 locator, disk 255
        data[data.rfind(b"PK\x06\x07") + 16] = 0xFF
    elif how == "extract version":
        struct.pack_into("<H", data, _central(data, "xcoords.npy") + 6, 210)
    elif how == "compression method":
        struct.pack_into("<H", data, _central(data, "xcoords.npy") + 10, 99)
    elif how.startswith("zip64 offset"):  # seeks past what an offset holds
        at = _central(data, "xcoords.npy")
        extra = at + 46 + struct.unpack_from("<H", data, at + 28)[0]
        struct.pack_into("<Q", data, extra + 20, 2**64 - 1 if how.endswith("huge") else 2**63)
    elif how == "directory offset":  # a directory before the file's start
        struct.pack_into("<Q", data, data.rfind(b"PK\x06\x06") + 48, 2**63 + 7)
    Path(dst).write_bytes(data)


@pytest.mark.parametrize("how", ["locator on another disk", "extract version",
                                 "compression method", "zip64 offset huge",
                                 "zip64 offset", "directory offset"])
def test_a_damaged_zip_directory_names_the_file(tmp_path, how):
    good = tmp_path / "good.npz"
    make_raw(n=40).to_file(good)  # gpugroup's writer: zip64, with a locator
    _damage_zip(good, tmp_path / "bad.npz", how)
    for way, exc in _read_every_way(tmp_path / "bad.npz", tmp_path).items():
        assert isinstance(exc, io.ScanFileError), (way, how, exc)
        assert "bad.npz" in str(exc) and "write it again" in str(exc), (way, how, exc)
    assert not (tmp_path / "converted.npz").exists()


@pytest.mark.parametrize("member", ["diff3d", "Y"])
def test_convert_checks_the_crc_of_stored_frame_stacks(tmp_path, member):
    """A mapped stack is not checked (reading it all would defeat the map); convert reads
    every byte, so it checks, refuses, and leaves nothing behind."""
    raw = make_raw(n=40, with_y=True)
    path = tmp_path / "flipped.npz"
    raw.to_file(path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf, open(path, "rb") as fh:
        start = npz.member_data_offset(fh, zf.getinfo(f"{member}.npy"))
    data[start + 128 + 100] ^= 0x01  # one bit of one frame
    path.write_bytes(data)
    io.read_scan(path, mmap_mode="r")  # (mapped: the documented trade-off)
    for slab_bytes in (1000, 1 << 20):
        with pytest.raises(io.ScanFileError, match=rf"flipped\.npz' \(member '{member}'\): "
                                                   r"BadZipFile: Bad CRC-32.*write it again"):
            convert(path, tmp_path / "out.npz", slab_bytes=slab_bytes)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["flipped.npz"]


def _npy_dir(folder, fields):
    folder.mkdir()
    for k, v in fields.items():
        np.save(folder / f"{k}.npy", v)
    return folder


def test_diff3d_and_diffraction_are_said_alike_in_a_npy_directory_and_an_npz(tmp_path,
                                                                          caplog):
    fields = _fields()
    folder = _npy_dir(tmp_path / "dir", fields)
    np.save(folder / "diffraction.npy", fields["diff3d"] + 1)
    npz_path = tmp_path / "both.npz"
    np.savez(npz_path, **fields, diffraction=fields["diff3d"] + 1)
    with caplog.at_level("WARNING", logger="gpugroup"):
        for scan in (folder, npz_path):
            caplog.clear()
            back = RawData.from_file(scan, mmap_mode="r", backend="cpu")
            np.testing.assert_array_equal(back.diff3d, fields["diff3d"])
            assert "both diff3d and diffraction: using diff3d" in caplog.text, scan
            assert "not scan fields" not in caplog.text, scan


def test_members_of_an_npz_that_are_no_npy_are_logged(tmp_path, caplog):
    members = {f"{k}.npy": _npy_bytes(v) for k, v in _fields().items()}
    path = _zip_of(tmp_path / "txt.npz", {**members, "Y.txt": b"notes", "sub/": b""})
    with caplog.at_level("WARNING", logger="gpugroup"):
        io.read_scan(path, mmap_mode="r")
    assert "ignoring member ['Y.txt']: not .npy arrays" in caplog.text


def test_a_npy_file_that_is_a_directory_is_named(tmp_path):
    folder = _npy_dir(tmp_path / "dir", _fields())
    (folder / "diff3d.npy").unlink()
    (folder / "diff3d.npy").mkdir()
    with pytest.raises(IsADirectoryError, match=r"diff3d file '.*diff3d\.npy' is a directory, "
                                                r"not a file: put the file itself there"):
        io.read_scan(folder, mmap_mode="r")


# ----------------------------------------------------------------------------- Zarr checks
def _zarr_scan(path, raw, zarr_format=3, separator="/", compressors=None):
    """``raw`` as a Zarr store written by zarr itself (every chunk written), frames 16 per
    chunk, in the given format and chunk key separator."""
    g = zarr.open_group(path, mode="w", zarr_format=zarr_format)
    encoding = {"name": "v2" if zarr_format == 2 else "default", "separator": separator}
    for key, value in raw.to_dict().items():
        if key != "_metadata":
            g.create_array(key, data=value, chunks=(16,) + value.shape[1:] if key == "diff3d"
                           else value.shape, compressors=compressors,
                           chunk_key_encoding=encoding, config={"write_empty_chunks": True})
    return path


@pytest.mark.parametrize("zarr_format, separator, compressors", [
    (3, "/", None), (3, "/", "auto"), (3, ".", None), (2, ".", "auto"), (2, "/", None)])
def test_a_stray_file_does_not_hide_a_missing_zarr_chunk(tmp_path, zarr_format, separator,
                                                         compressors):
    """Only files named as chunks count: a .DS_Store beside the chunks (one file more)
    must not make a missing chunk read as zeros."""
    store = _zarr_scan(tmp_path / "s.zarr", make_raw(), zarr_format, separator, compressors)
    key = zarr.open_array(store, path="diff3d").metadata.encode_chunk_key((3, 0, 0))
    (store / "diff3d" / key).unlink()
    (store / "diff3d" / ".DS_Store").write_bytes(b"\0" * 64)
    for mmap_mode in (None, "r"):
        with pytest.raises(io.ScanFileError, match=rf"'/diff3d' of .*s\.zarr' is missing "
                                                   rf"chunk {re.escape(repr(key))} \(1 of 8"):
            RawData.from_file(store, mmap_mode=mmap_mode, backend="cpu")


def test_missing_chunks_of_small_zarr_arrays_are_read_as_zarr_reads_them(tmp_path, caplog):
    """zarr's own writers leave out chunks equal to the fill value (a scan_index of zeros,
    the seed 0 of a grouped output written before every chunk was): the small fields are
    read as zarr reads them, the fill value, and that is logged; a missing chunk of a
    frame stack stays an error."""
    from gpugroup.io.grouped import open_grouped

    out = tmp_path / "g.zarr"
    make_raw().generate_grouped_data(8, K=7, nsamples=20, gridsize=2, seed=1, out=out)
    assert open_grouped(out)["seed"] == 1
    for key in ("seed", "norm_scale"):
        (out / key / "c").unlink()
    with caplog.at_level("WARNING", logger="gpugroup"):
        back = open_grouped(out)
    assert back["seed"] == 0 and back["norm_scale"] == 0.0
    assert "'/seed' of" in caplog.text and "read as its fill value 0" in caplog.text
    scan = tmp_path / "s.zarr"
    raw = make_raw()  # its scan_index is all zeros
    g = zarr.open_group(scan, mode="w")
    for key, value in raw.to_dict().items():
        if key != "_metadata":
            g.create_array(key, data=value)  # zarr's defaults: write_empty_chunks False
    assert not (scan / "scan_index" / "c").exists()
    caplog.clear()
    with caplog.at_level("WARNING", logger="gpugroup"):
        back = RawData.from_file(scan, backend="cpu")
    np.testing.assert_array_equal(back.scan_index, raw.scan_index)
    assert "'/scan_index' of" in caplog.text
    (scan / "diff3d" / "c" / "0" / "0" / "0").unlink()
    with pytest.raises(io.ScanFileError, match="'/diff3d' of .* is missing chunk"):
        RawData.from_file(scan, backend="cpu")


def test_a_system_error_opening_a_zarr_store_is_not_called_damage(tmp_path, monkeypatch):
    store = _zarr_scan(tmp_path / "s.zarr", make_raw())

    def failing(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(zarr, "open_group", failing)
    with pytest.raises(OSError) as info:
        io.read_scan(store)
    assert info.value.errno == errno.EIO and "damaged" not in str(info.value)


def test_zarr_gaps_that_zarr_would_fill_are_named(tmp_path):
    """A chunk replaced by a link to nothing is a missing chunk; a required field's
    missing chunk (positions all 0) is an error, not a warning; an array directory whose
    metadata is gone is said so, not reported as an absent field."""
    raw = make_raw()
    store = _zarr_scan(tmp_path / "s.zarr", raw)
    chunk = store / "diff3d" / "c" / "3" / "0" / "0"
    chunk.unlink()
    chunk.symlink_to(tmp_path / "nowhere")
    with pytest.raises(io.ScanFileError, match="'/diff3d' of .* is missing chunk 'c/3/0/0'"):
        RawData.from_file(store, backend="cpu")
    store = _zarr_scan(tmp_path / "t.zarr", raw)
    (store / "xcoords" / "c" / "0").unlink()
    with pytest.raises(io.ScanFileError, match="'/xcoords' of .* is missing chunk 'c/0'"):
        RawData.from_file(store, backend="cpu")
    store = _zarr_scan(tmp_path / "u.zarr", raw)
    (store / "diff3d" / "zarr.json").unlink()
    with pytest.raises(io.ScanFileError, match="'/diff3d' of .* has data but no metadata"):
        RawData.from_file(store, backend="cpu")


def test_hdf5_names_that_are_not_utf8_and_damaged_metadata(tmp_path, monkeypatch):
    raw = make_raw()
    path = tmp_path / "s.h5"
    raw.to_file(path)
    with h5py.File(path, "a") as f:
        f.create_dataset(b"caf\xe9", data=[1])  # valid HDF5: names are bytes
    np.testing.assert_array_equal(RawData.from_file(path, backend="cpu").diff3d, raw.diff3d)
    from gpugroup.io import hdf5

    def damaged(f, limit=40):
        raise RuntimeError("Object visitation failed (wrong B-tree signature)")

    monkeypatch.setattr(hdf5, "_dataset_names", damaged)
    with pytest.raises(io.ScanFileError, match=r"s\.h5'.*wrong B-tree signature.*metadata "
                                               r"is damaged"):
        RawData.from_file(path, backend="cpu")


def test_zarr_chunks_behind_a_linked_directory_are_found(tmp_path):
    """zarr follows a symbolic link to a chunk directory (data moved to another disk), and
    so does the missing-chunk check."""
    raw = make_raw()
    store = _zarr_scan(tmp_path / "s.zarr", raw)
    (store / "diff3d" / "c").rename(tmp_path / "elsewhere")
    (store / "diff3d" / "c").symlink_to(tmp_path / "elsewhere")
    back = RawData.from_file(store, mmap_mode="r", backend="cpu")
    np.testing.assert_array_equal(back.diff3d[...], raw.diff3d)


def _sharded_scan(path, raw, written=(slice(None),), index_location="end"):
    """``raw`` as Zarr with diff3d sharded (16 frames per inner chunk, 64 per shard), only
    the ``written`` rows of it written (zarr leaves the other inner chunks out)."""
    g = zarr.open_group(path, mode="w")
    for key, value in raw.to_dict().items():
        if key not in ("_metadata", "diff3d"):
            g.create_array(key, data=value, config={"write_empty_chunks": True})
    d = g.create_array("diff3d", shape=raw.diff3d.shape, dtype=raw.diff3d.dtype,
                       chunks=(16,) + raw.diff3d.shape[1:],
                       shards={"shape": (64,) + raw.diff3d.shape[1:],
                               "index_location": index_location})
    for rows in written:
        d[rows] = raw.diff3d[rows]
    return path


def test_a_shard_lacking_inner_chunks_is_an_error(tmp_path):
    """A shard file holds several inner chunks; one its index lacks is read as fill values
    by zarr: the shard indexes (only they) are read and a missing inner chunk refused."""
    raw = make_raw(n=128)
    store = _sharded_scan(tmp_path / "part.zarr", raw, (slice(0, 32), slice(64, None)))
    for mmap_mode in (None, "r"):
        with pytest.raises(io.ScanFileError,
                           match=r"'/diff3d' of .*part\.zarr' is missing inner chunk "
                                 r"\(2, 0, 0\) \(in shard 'c/0/0/0'\) \(2 of 8 inner chunks\) "
                                 r"\(also \(3, 0, 0\)\)"):
            RawData.from_file(store, mmap_mode=mmap_mode, backend="cpu")
    # whole shards read, the index at either end, and a last shard past the array's end
    for name, n, loc in (("full", 128, "end"), ("start", 128, "start"), ("edge", 100, "end")):
        back = RawData.from_file(_sharded_scan(tmp_path / f"{name}.zarr", make_raw(n=n),
                                               index_location=loc), backend="cpu")
        np.testing.assert_array_equal(back.diff3d, make_raw(n=n).diff3d)
    shard = tmp_path / "full.zarr" / "diff3d" / "c" / "1" / "0" / "0"
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size - 100)
    with pytest.raises(io.ScanFileError, match=r"shard 'c/1/0/0' is damaged .*write it again"):
        RawData.from_file(tmp_path / "full.zarr", backend="cpu")


def test_a_shard_index_that_cannot_be_read_exactly_is_refused(tmp_path):
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

    store = tmp_path / "big.zarr"
    _zarr_scan(store, make_raw(n=128))
    index = ShardingCodec(chunk_shape=(16, 8, 8),
                          index_codecs=[BytesCodec(endian="big"), Crc32cCodec()])
    zarr.create_array(store, name="diff3d", data=make_raw(n=128).diff3d, chunks=(64, 8, 8),
                      serializer=index, compressors=None, overwrite=True)
    with pytest.raises(io.ScanFileError, match=r"'/diff3d' of .*big\.zarr' is sharded in a "
                                               r"layout whose shard index gpugroup does not "
                                               r"read.*Rewrite the array unsharded"):
        RawData.from_file(store, backend="cpu")


@pytest.mark.parametrize("case", ["json", "json-v2", "codec", "root", "grouped-member"])
def test_damaged_zarr_metadata_names_the_store_and_the_array(tmp_path, case):
    from gpugroup.io.grouped import open_grouped

    store = tmp_path / "d.zarr"
    if case == "grouped-member":
        make_raw().generate_grouped_data(8, K=7, nsamples=20, gridsize=2, seed=1, out=store)
        (store / "coords_nn" / "zarr.json").write_text('{"shape": [20 1]}')
        with pytest.raises(io.ScanFileError, match=r"cannot open Zarr array '/coords_nn' of "
                                                   r".*d\.zarr'.*JSONDecodeError.*write it "
                                                   r"again"):
            open_grouped(store)
        return
    _zarr_scan(store, make_raw(), 2 if case == "json-v2" else 3)
    if case == "root":
        (store / "zarr.json").unlink()
        match = r"'.*d\.zarr' is not a Zarr store: it has no zarr.json .*write it again"
    else:
        doc = store / "diff3d" / (".zarray" if case == "json-v2" else "zarr.json")
        text = doc.read_text()
        doc.write_text(text.replace('"bytes"', '"nosuchcodec"') if case == "codec"
                       else text[:40])
        match = (r"cannot open Zarr array '/diff3d' of '.*d\.zarr': "
                 + ("UnknownCodecError" if case == "codec" else "JSONDecodeError")
                 + r".*install the package that provides it.*write it again")
    for mmap_mode in (None, "r"):
        with pytest.raises(io.ScanFileError, match=match):
            RawData.from_file(store, mmap_mode=mmap_mode, backend="cpu")


def test_a_damaged_chunk_of_a_grouped_output_names_the_store(tmp_path):
    """open_grouped's stacks are zarr arrays: a chunk that does not decode is an error
    naming the store, the rows and what to do, not zarr's bare message."""
    from gpugroup.io.grouped import open_grouped

    out = tmp_path / "g.zarr"
    make_raw().generate_grouped_data(8, K=7, nsamples=40, gridsize=2, seed=1, out=out)
    X = open_grouped(out)["X_full"]
    chunk = out / "X_full" / X.metadata.encode_chunk_key((0, 0, 0, 0))
    with open(chunk, "r+b") as fh:
        fh.truncate(10)
    X = open_grouped(out)["X_full"]
    for read in (lambda: X[0:4], lambda: X.oindex[[1, 2]], lambda: X[3]):
        with pytest.raises(io.ScanFileError, match=r"cannot read frames \d\.\.\d of Zarr array "
                                                   r".*g\.zarr/X_full.*truncated or damaged.*"
                                                   r"write it again"):
            read()
    assert X[-1].shape == (8, 8, 4)  # other chunks still read
    with pytest.raises(IndexError):  # a bad selection stays zarr's own error
        X[10**6]


def test_hdf5_datasets_that_are_no_scan_field_are_logged(tmp_path, caplog):
    """As NPZ members are: a top-level ``objectguess`` typo is said; a CXI file's own
    entries are not."""
    raw = make_raw()
    path = tmp_path / "s.h5"
    raw.to_file(path)
    with caplog.at_level("WARNING", logger="gpugroup"):
        io.read_scan(path)
        assert caplog.text == ""
        with h5py.File(path, "a") as f:
            f["objectguess"] = np.ones((4, 4))
            f["entry/notes"] = np.ones(3)  # deeper down: a layout's own
        io.read_scan(path)
        assert "ignoring member ['objectguess']: not scan fields" in caplog.text
        assert "notes" not in caplog.text
        caplog.clear()
        io.read_scan(path, keys={"objectGuess": "/objectguess"})  # named: used
        assert caplog.text == ""


def test_zarr_arrays_that_are_no_scan_field_are_logged(tmp_path, caplog):
    """As NPZ members are: an ``objectguess`` typo is said, not silently left out."""
    raw = make_raw()
    store = _zarr_scan(tmp_path / "s.zarr", raw)
    with caplog.at_level("WARNING", logger="gpugroup"):
        io.read_scan(store)
        assert caplog.text == ""
        zarr.open_group(store, mode="a").create_array("objectguess", data=np.ones((4, 4)))
        io.read_scan(store)
        assert "ignoring member ['objectguess']: not scan fields" in caplog.text
        caplog.clear()
        io.read_scan(store, keys={"objectGuess": "objectguess"})  # named: used
        assert caplog.text == ""
