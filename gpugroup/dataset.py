"""An index-only grouped dataset: keep ``nn_indices`` and the scan, gather batches on demand.

Materializing grouped data costs C = gridsize² times the frame stack. A
:class:`GroupedDataset` stores only the groups (B x C integers), the scan's coordinates and
the normalization factor (computed once), and assembles any batch of rows on request,
equal to the same rows of ``RawData.generate_grouped_data``. It is a PyTorch map-style
dataset without depending on PyTorch.
"""

from __future__ import annotations

import logging
import numbers
import os
import sys

import numpy as np

from gpugroup import assembly
from gpugroup.backends import get_backend
from gpugroup.grouping import check_bytes, check_count
from gpugroup.io.frames import StackRef, open_stack, stack_ref
from gpugroup.schema import ScanArrays, check_position_numbers

logger = logging.getLogger(__name__)


class GroupedDataset:
    """Grouped training rows (DESIGN.md section 2) gathered batch by batch.

    Parameters
    ----------
    raw : RawData
        The scan; its frames may be in memory, memory-mapped, in HDF5/Zarr, or on the GPU.
    nn_indices : (B, C) array of int
        The groups (e.g. from :func:`gpugroup.sample_groups`); see :meth:`from_raw`.
    N : int or None
        Frame size (checked against the scan); None takes it from the scan.
    backend : {"auto", "cpu", "gpu"} or None
        Where batches are assembled (None: the scan's backend).
    output : {"numpy", "device"}
        NumPy arrays, or the backend's arrays (CuPy on the GPU; zero-copy to PyTorch
        with ``torch.from_dlpack``).
    keep_diffraction : bool
        Also return the raw ``diffraction`` (otherwise only ``X_full``).
    norm_scale : float or None
        The normalization factor s; None computes it once from the energies of the frames
        the groups use (one pass over them), exactly as the eager result does.
    y_positions : {"ptychopinn", "members"}
        Where ``Y`` is cut from ``objectGuess`` (as ``RawData.generate_grouped_data``).

    Notes
    -----
    ``ds[i]`` (an int) is one row: ``X_full`` (N, N, C), ``coords_nn`` (1, 2, C), ... .
    ``ds[batch]`` (a slice or an index array) is a batch: ``X_full`` (b, N, N, C), ...,
    gathered in one read of the batch's distinct frames (sorted, so HDF5/Zarr/file reads
    stay sequential). Entries without data (``Y`` for a scan without ``Y`` or
    ``objectGuess``; ``diffraction`` with ``keep_diffraction=False``) are left out, so
    PyTorch's default collation works.

    With PyTorch, let the dataset gather whole batches::

        sampler = torch.utils.data.BatchSampler(
            torch.utils.data.RandomSampler(ds), batch_size=64, drop_last=False)
        loader = torch.utils.data.DataLoader(ds, sampler=sampler, batch_size=None,
                                             num_workers=4)

    (``batch_size=None`` hands each list of indices to ``ds[...]``). Worker processes
    reopen HDF5 files themselves.

    Examples
    --------
    >>> import numpy as np
    >>> from gpugroup import RawData
    >>> from gpugroup.dataset import GroupedDataset
    >>> yy, xx = np.divmod(np.arange(100.0), 10)
    >>> raw = RawData.from_coords_without_pc(xx, yy, np.ones((100, 8, 8), np.float32),
    ...                                      np.ones((8, 8), np.complex64), None, backend="cpu")
    >>> ds = GroupedDataset.from_raw(raw, 8, K=7, nsamples=10, seed=1, gridsize=2)
    >>> len(ds), ds[0]["X_full"].shape, ds[2:5]["X_full"].shape
    (10, (8, 8, 4), (3, 8, 8, 4))
    """

    def __init__(self, raw, nn_indices, *, N=None, backend=None, output="numpy",
                 keep_diffraction=True, norm_scale=None, seed=None,
                 chunk_bytes=assembly.DEFAULT_CHUNK_BYTES, y_positions="ptychopinn"):
        self._be = get_backend(raw.backend if backend is None else backend)
        if output not in ("numpy", "device"):
            raise ValueError(f"output must be 'numpy' or 'device', got output={output!r}")
        nn = check_position_numbers("nn_indices", assembly.to_host(nn_indices), len(raw))
        N = assembly.frame_size(N, raw.diff3d)
        self.raw = raw
        self.N = int(N)
        self.nn_indices = nn
        self.output = output
        self.keep_diffraction = bool(keep_diffraction)
        self.seed = seed
        self.y_positions = assembly.check_y_positions(y_positions)
        xp = self._be.xp
        self._coords = tuple(xp.asarray(a) for a in (raw.xcoords, raw.ycoords,
                                                        raw.xcoords_start, raw.ycoords_start))
        chunk_bytes = check_bytes("chunk_bytes", chunk_bytes) or assembly.DEFAULT_CHUNK_BYTES
        norm_scale = assembly.check_norm_scale(norm_scale)
        if norm_scale is None:
            # one pass over the frames used; a memory-mapped file is read with pread so
            # that this pass does not leave the whole file resident
            norm_scale = assembly.AssemblyPlan(
                xp, raw, xp.asarray(nn), self.N, chunk_bytes=chunk_bytes,
                kernels=self._be.kernels, warn=False, out_of_core=True).scale
        self.norm_scale = float(norm_scale)
        self._plan = None
        self._pid = os.getpid()
        self._stacks = {"diff3d": raw.diff3d, "Y": raw.Y}
        self._object = raw.objectGuess

    @classmethod
    def from_raw(cls, raw, N, K=4, nsamples=1, seed=None, gridsize=None,
                 sequential_sampling=False, enable_oversampling=False,
                 neighbor_pool_size=None, group_by_scan=False, backend=None, **kwargs):
        """Sample groups exactly as ``raw.generate_grouped_data(N, K, nsamples, ...)``
        does and wrap them (same rows, same order). ``kwargs`` go to the constructor."""
        nn, seed, be = raw.sample_for_grouping(
            K, nsamples, seed, gridsize, sequential_sampling=sequential_sampling,
            enable_oversampling=enable_oversampling, neighbor_pool_size=neighbor_pool_size,
            group_by_scan=group_by_scan, backend=backend)
        return cls(raw, nn, N=N, backend=be, seed=seed, **kwargs)

    # ------------------------------------------------------------------ protocol
    def __len__(self) -> int:
        return int(self.nn_indices.shape[0])

    def __repr__(self) -> str:
        B, C = self.nn_indices.shape
        return (f"GroupedDataset({B} groups x {C}, N={self.N}, backend={self._be.name!r}, "
                f"output={self.output!r}, norm_scale={self.norm_scale:.6g})")

    def __getitem__(self, key):
        if assembly.is_device_array(key):
            key = key.get()
        if not isinstance(key, (slice, numbers.Integral)):
            key = np.asarray(key)  # (lists, PyTorch tensors)
        if isinstance(key, np.ndarray) and key.ndim == 0 and key.dtype.kind in "iu":
            key = int(key)  # a 0-d index is one group, as in NumPy
        if isinstance(key, numbers.Integral) and not isinstance(key, bool):
            i = int(key)
            B = len(self)
            if not -B <= i < B:
                raise IndexError(f"group {i} out of range for {B} groups")
            batch = self._batch(np.array([i % B]))
            return {k: v[0] for k, v in batch.items()}
        return self._batch(self._rows(key))

    def _rows(self, key):
        B = len(self)
        if isinstance(key, slice):
            return np.arange(B)[key]
        idx = np.asarray(key)
        if idx.dtype == bool:
            if idx.shape != (B,):
                raise IndexError(f"boolean index must have shape ({B},), got {idx.shape}")
            return np.flatnonzero(idx)
        if idx.size == 0:
            return np.zeros(0, dtype=np.int64)
        if not np.issubdtype(idx.dtype, np.integer):
            raise IndexError(f"index a GroupedDataset with an int, a slice or integer arrays, "
                             f"got dtype {idx.dtype}")
        if idx.ndim != 1:
            raise IndexError(f"index a GroupedDataset with an int, a slice or a 1-D array of "
                             f"group numbers, got an array of shape {idx.shape}")
        idx = idx.astype(np.int64)
        if idx.min() < -B or idx.max() >= B:
            raise IndexError(f"group index out of range for {B} groups: "
                             f"{idx.min()}..{idx.max()}")
        return idx % B

    def batches(self, batch_size, *, shuffle=False, seed=None, drop_last=False):
        """Iterate over batches of ``batch_size`` rows (shuffled with a NumPy generator
        seeded by ``seed`` when ``shuffle``); ``batch_size`` is checked at this call."""
        batch_size = check_count("batch_size", batch_size, 1)
        order = np.arange(len(self))
        if shuffle:
            order = np.random.default_rng(seed).permutation(order)
        stop = len(order) - (len(order) % batch_size if drop_last else 0)
        return (self[order[a:a + batch_size]] for a in range(0, stop, batch_size))

    def __getstate__(self):
        # Pickled for worker processes (spawn): on-disk stacks travel as references that
        # each process reopens; in-memory ones travel as they are.
        state = self.__dict__.copy()
        state["_be"] = self._be.name
        state["raw"] = None
        state["_plan"] = None
        state["_stacks"] = {k: (stack_ref(v) or v) if v is not None else None
                            for k, v in self._stacks.items()}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._be = get_backend(state["_be"])

    # ------------------------------------------------------------------ gathering
    def plan(self) -> assembly.AssemblyPlan:
        """The assembly plan of this process's stacks (reopened in worker processes; an
        object's padding made once per process)."""
        if self._plan is None or self._plan_pid != os.getpid():
            x, y, xs, ys = self._coords
            scan = ScanArrays(x, y, self._stack("diff3d"), xs, ys, Y=self._stack("Y"),
                              objectGuess=self._object)
            self._plan = assembly.AssemblyPlan(
                self._be.xp, scan, None, self.N, norm_scale=self.norm_scale,
                keep_diffraction=self.keep_diffraction, kernels=self._be.kernels,
                warn=False, y_positions=self.y_positions)
            self._plan_pid = os.getpid()
        return self._plan

    def _stack(self, name):
        stack = self._stacks[name]
        if isinstance(stack, StackRef):
            stack = self._stacks[name] = open_stack(stack)
            self._pid = os.getpid()
        h5py = sys.modules.get("h5py")
        if stack is not None and h5py is not None and isinstance(stack, h5py.Dataset) \
                and os.getpid() != self._pid:
            # A forked worker (PyTorch DataLoader): reopen the file in this process.
            stack = open_stack(stack_ref(stack))
        return stack

    def _batch(self, rows):
        plan = self.plan()
        nn = self.nn_indices[rows]
        out = {"nn_indices": self._be.xp.asarray(nn),
               **plan.outputs(int(nn.shape[0]), int(nn.shape[1]))}
        plan.fill(nn, out, chunk_bytes=1 << 62, workers=1)
        out = {k: v for k, v in out.items() if v is not None}
        out.update(plan.coordinates(out["nn_indices"]))
        if self.output == "numpy":
            out = {k: self._be.asnumpy(v) for k, v in out.items()}
        return out
