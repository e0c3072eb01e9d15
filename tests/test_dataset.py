"""The index-only grouped dataset: rows equal the eager result, the map-style Dataset
protocol (a plain loop and a DataLoader-like batch sampler), pickling and forked workers."""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import pickle

import numpy as np
import pytest

from gpugroup import RawData
from gpugroup.dataset import GroupedDataset

from conftest import assert_same_grouped

ROW_KEYS = ("nn_indices", "diffraction", "X_full", "coords_nn", "coords_offsets",
            "coords_relative", "coords_start_nn", "coords_start_offsets",
            "coords_start_relative", "Y")


def make_raw(n=400, N=8, y="object", seed=0):
    rng = np.random.default_rng(seed)
    row, col = np.divmod(np.arange(n), 20)
    x = col + rng.uniform(-0.3, 0.3, n)
    yc = row + rng.uniform(-0.3, 0.3, n)
    kw = {}
    if y == "object":
        kw["objectGuess"] = (rng.random((30, 30)) + 1j * rng.random((30, 30))).astype(
            np.complex64)
    elif y == "stack":
        kw["Y"] = (rng.random((n, N, N)) + 1j).astype(np.complex64)
    return RawData(x, yc, x + 0.2, yc - 0.1, rng.random((n, N, N), dtype=np.float32),
                   np.ones((N, N), np.complex64), None, backend="cpu", **kw)


@pytest.fixture(scope="module")
def case():
    raw = make_raw()
    eager = raw.generate_grouped_data(8, K=7, nsamples=200, seed=21, gridsize=2)
    ds = GroupedDataset.from_raw(raw, 8, K=7, nsamples=200, seed=21, gridsize=2)
    return raw, eager, ds


def assert_rows(batch, eager, rows):
    assert set(batch) == {k for k in ROW_KEYS if eager.get(k) is not None}
    assert_same_grouped(batch, {k: eager[k] for k in batch}, rows=rows, exact=True)
    for key, value in batch.items():
        assert value.dtype == eager[key].dtype, key


def test_getitem_equals_eager_rows(case):
    raw, eager, ds = case
    assert len(ds) == 200 and ds.norm_scale == eager["norm_scale"] and ds.seed == 21
    np.testing.assert_array_equal(ds.nn_indices, eager["nn_indices"])
    for key in (slice(None), slice(5, 60, 7), slice(-10, None), np.array([199, 0, 3, 3]),
                [7, 1], np.arange(200) % 3 == 0, np.array([], dtype=np.int64), -1):
        rows = np.arange(200)[key]
        batch = ds[key]
        if isinstance(key, int):
            assert batch["X_full"].shape == (8, 8, 4) and batch["coords_nn"].shape == (1, 2, 4)
            batch = {k: v[None] for k, v in batch.items()}
            rows = np.array([rows])
        assert_rows(batch, eager, rows)


def test_sources_and_options(tmp_path):
    pytest.importorskip("h5py")
    raw = make_raw(y="stack")
    eager = raw.generate_grouped_data(8, K=5, nsamples=90, seed=3, gridsize=2,
                                      keep_diffraction=False)
    raw.to_file(tmp_path / "scan.h5")
    lazy = RawData.from_file(tmp_path / "scan.h5", mmap_mode="r", backend="cpu")
    for source in (raw, lazy):
        ds = source.grouped_dataset(8, K=5, nsamples=90, seed=3, gridsize=2,
                                    keep_diffraction=False)
        batch = ds[10:30]
        assert "diffraction" not in batch
        assert_rows(batch, eager, np.arange(10, 30))
    nothing = make_raw(y=None)
    ds = GroupedDataset.from_raw(nothing, 8, K=4, nsamples=10, seed=1)
    assert "Y" not in ds[0] and ds[0]["X_full"].shape == (8, 8, 1)
    # given groups and a given scale are used as they are
    ds2 = GroupedDataset(raw, eager["nn_indices"], norm_scale=2.0)
    np.testing.assert_array_equal(ds2[0]["X_full"],
                                  np.moveaxis(raw.diff3d[eager["nn_indices"][0]], 0, -1) * 2)


def test_big_endian_frames_come_out_in_native_byte_order(tmp_path):
    """A scan whose frames are stored big-endian (an HDF5 file written so: '>f4'): every
    path gives `diffraction` in native order, which PyTorch's collate and CuPy need."""
    raw = make_raw(y=None)
    big = RawData(raw.xcoords, raw.ycoords, raw.xcoords_start, raw.ycoords_start,
                  raw.diff3d.astype(">f4"), raw.probeGuess, None, backend="cpu")
    want = raw.generate_grouped_data(8, K=5, nsamples=60, seed=3, gridsize=2)
    got = {
        "eager": big.generate_grouped_data(8, K=5, nsamples=60, seed=3, gridsize=2),
        "dataset": big.grouped_dataset(8, K=5, nsamples=60, seed=3, gridsize=2)[0:60],
        "npz": big.generate_grouped_data(8, K=5, nsamples=60, seed=3, gridsize=2,
                                         out=tmp_path / "g.npz"),
    }
    if importlib.util.find_spec("dask") is not None:
        from gpugroup import dask as gdask

        lazy = gdask.grouped_arrays(big, 8, K=5, nsamples=60, seed=3, gridsize=2)
        assert lazy["diffraction"].dtype == np.float32
        got["dask"] = gdask.compute(lazy)
    for name, d in got.items():
        assert d["diffraction"].dtype == np.dtype("=f4"), name
        assert d["diffraction"].dtype.isnative, name
        np.testing.assert_array_equal(d["diffraction"], want["diffraction"], err_msg=name)
        np.testing.assert_array_equal(d["X_full"], want["X_full"], err_msg=name)


def test_errors(case):
    raw, _, ds = case
    for bad in (200, -201, np.array([0, 200]), [0.5]):
        with pytest.raises(IndexError):
            ds[bad]
    with pytest.raises(IndexError, match="boolean"):
        ds[np.ones(3, bool)]
    with pytest.raises(IndexError, match=r"1-D array of group numbers.*shape \(2, 2\)"):
        ds[[[0, 1], [2, 3]]]
    class Tensor:  # what PyTorch's 0-d and 1-d tensors give NumPy
        def __init__(self, value):
            self.value = value

        def __array__(self, dtype=None, copy=None):
            return np.asarray(self.value, dtype=dtype)

    for zero_d in (np.array(3), np.int32(3), Tensor(3)):  # one group, as ds[3]
        one = ds[zero_d]
        assert all(np.array_equal(one[k], v) for k, v in ds[3].items())
    many = ds[Tensor([3, 5])]
    assert all(np.array_equal(many[k], v) for k, v in ds[[3, 5]].items())
    with pytest.raises(ValueError, match=r"\[0, 400\)"):
        GroupedDataset(raw, np.array([[0, 400]]))
    with pytest.raises(ValueError, match="N=9"):
        GroupedDataset(raw, np.array([[0, 1]]), N=9)
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        GroupedDataset(raw, np.arange(3))
    with pytest.raises(ValueError, match=r"nn_indices must be \(B, C\) groups of integer.*"
                                         r"float64"):
        GroupedDataset(raw, np.array([[0.0, 1.0]]))
    for bad in (0, -1, 2.5, "2", True):
        with pytest.raises(ValueError, match=r"batch_size must be .*got batch_size="):
            ds.batches(bad)  # at the call, not at the first batch
    for bad in (np.nan, -1.0, 0, np.inf, "2", True, np.True_, 1e-50, 1e39):
        with pytest.raises(ValueError, match=r"norm_scale must be a number in \[1.18e-38, "
                                             r"3.4e\+38\] .*float32"):
            GroupedDataset(raw, np.array([[0, 1]]), norm_scale=bad)
    assert GroupedDataset(raw, np.array([[0, 1]]), norm_scale=np.array(2.0)).norm_scale == 2.0
    for bad in (0, -5, 1.5):
        with pytest.raises(ValueError, match=rf"chunk_bytes must be a positive int.*"
                                             rf"chunk_bytes={bad}"):
            GroupedDataset(raw, np.array([[0, 1]]), chunk_bytes=bad)


class FakeLoader:
    """What torch.utils.data.DataLoader does with batch_size=None and a batch sampler:
    each element of the sampler (a list of indices) is handed to dataset[...]."""

    def __init__(self, dataset, sampler):
        self.dataset, self.sampler = dataset, sampler

    def __iter__(self):
        for indices in self.sampler:
            yield self.dataset[indices]


def batch_sampler(n, batch_size, seed):
    order = np.random.default_rng(seed).permutation(n)
    for a in range(0, n, batch_size):
        yield order[a:a + batch_size].tolist()


def test_training_loop_protocols(case):
    _, eager, ds = case
    # map-style: len + int indexing, samples stacked by a collate function
    seen = np.zeros(len(ds), dtype=int)
    for i in range(len(ds)):
        sample = ds[i]
        seen[i] += 1
        np.testing.assert_array_equal(sample["X_full"], eager["X_full"][i])
    assert seen.min() == 1
    # batched: a batch sampler's index lists
    total = 0
    for batch, idx in zip(FakeLoader(ds, batch_sampler(len(ds), 32, 0)),
                          batch_sampler(len(ds), 32, 0)):
        assert_rows(batch, eager, np.array(idx))
        total += len(idx)
    assert total == len(ds)
    sizes = [len(b["X_full"]) for b in ds.batches(64, shuffle=True, seed=1, drop_last=True)]
    assert sizes == [64, 64, 64]


def test_torch_dataloader_if_installed(case):
    torch = pytest.importorskip("torch")
    _, eager, ds = case
    sampler = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(ds), 50, False)
    loader = torch.utils.data.DataLoader(ds, sampler=sampler, batch_size=None)
    batch = next(iter(loader))
    np.testing.assert_array_equal(batch["X_full"].numpy(), eager["X_full"][:50])
    loader = torch.utils.data.DataLoader(ds, batch_size=16)
    np.testing.assert_array_equal(next(iter(loader))["X_full"].numpy(), eager["X_full"][:16])


def _worker_batch(ds, rows, queue):
    queue.put(ds[rows]["X_full"])


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_worker_processes_reopen_files(tmp_path, start):
    h5py = pytest.importorskip("h5py")
    if start not in mp.get_all_start_methods():
        pytest.skip(f"no {start} start method here")
    raw = make_raw(y=None)
    raw.to_file(tmp_path / "scan.h5")
    lazy = RawData.from_file(tmp_path / "scan.h5", mmap_mode="r", backend="cpu")
    ds = lazy.grouped_dataset(8, K=7, nsamples=50, seed=2, gridsize=2)
    assert isinstance(ds._stacks["diff3d"], h5py.Dataset)
    back = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(back[3:9]["X_full"], ds[3:9]["X_full"])
    ctx = mp.get_context(start)
    queue = ctx.Queue()
    p = ctx.Process(target=_worker_batch, args=(ds, np.arange(5, 25), queue))
    p.start()
    got = queue.get(timeout=60)
    p.join(timeout=60)
    assert p.exitcode == 0
    np.testing.assert_array_equal(got, ds[5:25]["X_full"])


def test_device_batches_equal_host_batches(case, cp):
    raw, eager, _ = case
    ds = GroupedDataset.from_raw(raw, 8, K=7, nsamples=200, seed=21, gridsize=2,
                                 backend="gpu", output="device")
    batch = ds[np.arange(0, 200, 3)]
    assert isinstance(batch["X_full"], cp.ndarray)
    np.testing.assert_array_equal(batch["nn_indices"].get(), eager["nn_indices"][::3])
    np.testing.assert_allclose(batch["X_full"].get(), eager["X_full"][::3], rtol=1e-6)
    np.testing.assert_allclose(batch["Y"].get(), eager["Y"][::3], rtol=1e-5, atol=1e-6)
