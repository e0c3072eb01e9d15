"""Lazy / distributed assembly (gpugroup.dask): computed results equal the eager ones for
several chunkings and sources, the graph is one task per block (no scattered-index
take), Zarr region writes, and a multi-process LocalCluster."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from gpugroup import RawData

from conftest import SUFFIX_NEEDS, assert_same_grouped, needs

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
gdask = pytest.importorskip("gpugroup.dask")


def make_raw(n=500, N=8, y="object", seed=0):
    rng = np.random.default_rng(seed)
    row, col = np.divmod(np.arange(n), 25)
    x = col + rng.uniform(-0.3, 0.3, n)
    yc = row + rng.uniform(-0.3, 0.3, n)
    kw = {}
    if y == "object":
        kw["objectGuess"] = (rng.random((40, 40)) + 1j * rng.random((40, 40))).astype(
            np.complex64)
    elif y == "stack":
        kw["Y"] = (rng.random((n, N, N)) + 1j).astype(np.complex64)
    return RawData(x, yc, x, yc, (rng.random((n, N, N)) * 50).astype(np.float32),
                   np.ones((N, N), np.complex64), None, backend="cpu", **kw)


SOURCES = ("scan.npz", "scan.h5", "scan.zarr")


def source_param(name: str):
    module = SUFFIX_NEEDS.get(os.path.splitext(name)[1])
    return pytest.param(name, marks=needs(module) if module else ())


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    d = tmp_path_factory.mktemp("dask_scans")
    raw = make_raw()
    out = {"memory": raw}
    for name in SOURCES:
        if importlib.util.find_spec(SUFFIX_NEEDS.get(os.path.splitext(name)[1], "numpy")) \
                is None:
            continue  # the tests that read it skip (needs)
        raw.to_file(d / name)
        out[name] = RawData.from_file(d / name, mmap_mode="r", backend="cpu")
    eager = raw.generate_grouped_data(8, K=7, nsamples=300, seed=8, gridsize=2)
    return out, eager


@pytest.mark.parametrize("source", ["memory", *(source_param(s) for s in SOURCES)])
@pytest.mark.parametrize("block_bytes,read_bytes", [(3000, 1000), (40_000, 5000),
                                                    (1 << 30, 1 << 20)])
def test_lazy_equals_eager(scans, source, block_bytes, read_bytes):
    raws, eager = scans
    lazy = gdask.grouped_arrays(raws[source], 8, K=7, nsamples=300, seed=8, gridsize=2,
                                block_bytes=block_bytes, read_bytes=read_bytes)
    assert isinstance(lazy["X_full"], da.Array) and isinstance(lazy["Y"], da.Array)
    assert lazy["X_full"].chunks[1:] == ((8,), (8,), (4,))
    got = gdask.compute(lazy)
    assert_same_grouped(got, eager, exact=True)
    assert got["norm_scale"] == eager["norm_scale"]  # same energies, same order: exact
    np.testing.assert_array_equal(got["X_full"], eager["X_full"])


@needs("h5py")
def test_locality_order_keeps_the_permutation(scans):
    raws, eager = scans
    lazy = gdask.grouped_arrays(raws["scan.h5"], 8, K=7, nsamples=300, seed=8, gridsize=2,
                                block_bytes=20_000, row_order="locality")
    order = lazy["order"]
    firsts = lazy["nn_indices"].min(axis=1)
    assert np.all(np.diff(firsts) >= 0)  # blocks read nearby frames
    assert_same_grouped(gdask.compute(lazy), eager, order=order, exact=True)


def test_options_and_generate_grouped_data_lazy():
    raw = make_raw(y="stack", n=200)
    eager = raw.generate_grouped_data(8, K=4, nsamples=120, seed=2, gridsize=2,
                                      keep_diffraction=False)
    lazy = raw.generate_grouped_data(8, K=4, nsamples=120, seed=2, gridsize=2,
                                     keep_diffraction=False, lazy=True, chunk_bytes=10_000)
    assert lazy["diffraction"] is None and isinstance(lazy["norm_scale"], da.Array)
    assert float(lazy["norm_scale"]) == eager["norm_scale"]
    assert_same_grouped(gdask.compute(lazy), eager, exact=True)
    given = gdask.grouped_arrays(raw, nn_indices=eager["nn_indices"], norm_scale=1.5)
    np.testing.assert_allclose(given["X_full"][:3].compute(),
                               np.moveaxis(raw.diff3d[eager["nn_indices"][:3]], 1, -1) * 1.5)
    with pytest.raises(ValueError, match="row_order"):
        gdask.grouped_arrays(raw, nn_indices=eager["nn_indices"], row_order="random")
    with pytest.raises(ValueError, match="N=9"):
        gdask.grouped_arrays(raw, 9, nn_indices=eager["nn_indices"])
    # given groups and sizes are checked as GroupedDataset checks them, naming the option
    for nn, match in ((eager["nn_indices"] * 1.0, r"nn_indices must be \(B, C\) groups"),
                      (eager["nn_indices"] + 200, (r"nn_indices must hold position numbers "
                                                   r"in \[0, 200\)"))):
        with pytest.raises(ValueError, match=match):
            gdask.grouped_arrays(raw, nn_indices=nn)
    for name in ("block_bytes", "read_bytes"):
        for bad in (0, -1, 2.5):
            with pytest.raises(ValueError, match=rf"{name} must be a positive int.*"
                                                 rf"{name}={bad}"):
                gdask.grouped_arrays(raw, nn_indices=eager["nn_indices"], **{name: bad})
        # a whole number written as a float (64e6) is a budget, as before
        assert gdask.grouped_arrays(raw, nn_indices=eager["nn_indices"], **{name: 1e4})
    with pytest.raises(ValueError, match=r"norm_scale must be a number in .*norm_scale=nan"):
        gdask.grouped_arrays(raw, nn_indices=eager["nn_indices"], norm_scale=np.nan)


@needs("zarr")
def test_graph_is_one_task_per_block_without_scattered_takes(scans, monkeypatch):
    raws, eager = scans
    real = gdask._assemble_block
    calls = []

    def counting(*args, **kwargs):
        calls.append(len(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(gdask, "_assemble_block", counting)
    lazy = gdask.grouped_arrays(raws["scan.zarr"], 8, K=7, nsamples=300, seed=8, gridsize=2,
                                block_bytes=4096)  # 4 groups per block -> 75 blocks
    X, D = lazy["X_full"], lazy["diffraction"]
    nblocks = len(X.chunks[0])
    assert nblocks == 75
    graph = dict(X.__dask_graph__())
    graph.update(D.__dask_graph__())
    names = {(k[0] if isinstance(k, tuple) else str(k)) for k in graph}
    assert not any(w in n for n in names for w in ("take", "vindex", "shuffle")), names
    assert len(graph) <= 8 * nblocks + 80  # a few aliases per block + the energy tasks
    x, d = dask.compute(X, D, scheduler="sync")
    assert len(calls) == nblocks and sum(calls) == 300  # each block gathered once
    np.testing.assert_array_equal(x, eager["X_full"])
    np.testing.assert_array_equal(d, eager["diffraction"])


@needs("zarr")
def test_to_zarr_region_writes(tmp_path, scans):
    zarr = pytest.importorskip("zarr")
    raws, eager = scans
    lazy = gdask.grouped_arrays(raws["scan.npz"], 8, K=7, nsamples=300, seed=8, gridsize=2,
                                block_bytes=8 * 8 * 4 * 4 * 24)  # 24 groups per block
    out = gdask.to_zarr(lazy, tmp_path / "g.zarr")
    assert isinstance(out["X_full"], zarr.Array)
    assert 24 % out["X_full"].chunks[0] == 0 and out["X_full"].shards is None
    assert_same_grouped(out, eager, exact=True)
    assert sorted(os.listdir(tmp_path)) == ["g.zarr"]
    with pytest.raises(ValueError, match=r"\.zarr"):
        gdask.to_zarr(lazy, tmp_path / "g.h5")


@needs("zarr")
def test_to_zarr_stores_a_seed_above_2_63(tmp_path, scans):
    raws, _ = scans
    seed = 2**64 - 1
    lazy = gdask.grouped_arrays(raws["scan.npz"], 8, K=7, nsamples=30, seed=seed, gridsize=2)
    out = gdask.to_zarr(lazy, tmp_path / "g.zarr")
    assert out["seed"] == seed
    np.testing.assert_array_equal(
        out["nn_indices"][:], raws["scan.npz"].generate_grouped_data(
            8, K=7, nsamples=30, seed=seed, gridsize=2)["nn_indices"])


@needs("zarr")
@pytest.mark.parametrize("norm_scale", [None, 1.5])
def test_to_zarr_writes_chunks_that_hold_only_zeros(tmp_path, norm_scale):
    """zarr leaves out chunks equal to the fill value unless told otherwise; every array
    to_zarr writes (nn_indices [[0]] and seed 0 here) has all its chunks, so the run that
    wrote the store reads it back, and every array checks."""
    raw = make_raw(n=100)
    lazy = gdask.grouped_arrays(raw, 8, K=4, nsamples=1, seed=0, gridsize=1,
                                sequential_sampling=True, norm_scale=norm_scale)
    out = gdask.to_zarr(lazy, tmp_path / "g.zarr")
    assert out["seed"] == 0 and out["nn_indices"].tolist() == [[0]]
    assert out["coords_offsets"].shape == (1, 1, 2, 1)
    assert os.path.isfile(tmp_path / "g.zarr" / "seed" / "c")


@needs("zarr")
def test_to_zarr_is_atomic(tmp_path, monkeypatch):
    raw = make_raw(n=100)
    real = gdask._assemble_block
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("worker lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(gdask, "_assemble_block", failing)
    lazy = gdask.grouped_arrays(raw, 8, K=4, nsamples=60, seed=1, gridsize=2,
                                block_bytes=2000)
    with pytest.raises(RuntimeError, match="worker lost"):
        gdask.to_zarr(lazy, tmp_path / "g.zarr")
    assert os.listdir(tmp_path) == []


@needs("distributed", "h5py", "zarr")
def test_local_cluster_processes(tmp_path, scans):
    distributed = pytest.importorskip("distributed")
    raws, eager = scans
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                  dashboard_address=None, silence_logs=40) as cluster, \
            distributed.Client(cluster, timeout="60s") as client:
        for source in ("scan.h5", "scan.zarr"):
            lazy = gdask.grouped_arrays(raws[source], 8, K=7, nsamples=300, seed=8,
                                        gridsize=2, block_bytes=20_000)
            futures = client.compute([lazy["X_full"], lazy["norm_scale"], lazy["Y"]])
            X, s, Y = [f.result(timeout=120) for f in futures]
            np.testing.assert_array_equal(X, eager["X_full"])
            np.testing.assert_array_equal(Y, eager["Y"])
            assert float(s) == eager["norm_scale"]
        out = gdask.to_zarr(gdask.grouped_arrays(raws["scan.npz"], 8, K=7, nsamples=300,
                                                 seed=8, gridsize=2, block_bytes=20_000),
                            tmp_path / "g.zarr")
        assert_same_grouped(out, eager, exact=True)
        workers = client.run(os.getpid)
        assert len(set(workers.values())) == 2 and os.getpid() not in workers.values()


@needs("h5py")
def test_cupy_chunks(scans, cp):
    raws, eager = scans
    lazy = gdask.grouped_arrays(raws["scan.h5"], 8, K=7, nsamples=300, seed=8, gridsize=2,
                                block_bytes=20_000, chunk_type="cupy")
    assert isinstance(lazy["X_full"]._meta, cp.ndarray)
    X = lazy["X_full"].compute()
    assert isinstance(X, cp.ndarray)
    np.testing.assert_array_equal(X.get(), eager["X_full"])
