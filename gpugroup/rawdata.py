"""RawData: a validated ptychography scan and its grouped training arrays.

A drop-in for PtychoPINN's ``ptycho.raw_data.RawData``: the same fields, the same NPZ
layout (DESIGN.md section 1), ``generate_grouped_data`` returning the dict of section 2,
built on :func:`gpugroup.sample_groups` (sample-then-group, no cache files).
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from gpugroup import assembly, io, streamed
from gpugroup import dask as gdask
from gpugroup.backends import BACKEND_NAMES, get_backend
from gpugroup.grouping import _check_coordinates, sample_groups
from gpugroup.dataset import GroupedDataset
from gpugroup.io.grouped import check_lazy_output, check_row_order
from gpugroup.keys import resolve_seed

logger = logging.getLogger(__name__)

REQUIRED_KEYS = ("xcoords", "ycoords", "probeGuess")
OPTIONAL_KEYS = ("xcoords_start", "ycoords_start", "scan_index", "objectGuess", "Y", "norm_Y_I")


def _frames_shape(name, a, n=None):
    shape = tuple(getattr(a, "shape", ()))
    if len(shape) != 3:
        raise ValueError(
            f"{name} must be 3-D (n_frames, N, N), got shape {shape}; stack the frames along "
            f"axis 0"
        )
    if shape[1] != shape[2]:
        raise ValueError(f"{name} frames must be square N x N, got shape {shape}")
    if n is not None and shape[0] != n:
        raise ValueError(
            f"xcoords has {n} entries but {name} has {shape[0]} frames; pass one frame per "
            f"scan position"
        )
    return shape


def _as_frame_store(name, a):
    """Keep memmaps, HDF5/Zarr datasets and device arrays as they are; make the rest NumPy."""
    if a is None:
        raise ValueError(f"{name} is required (an (n, N, N) diffraction amplitude stack)")
    if not (hasattr(a, "shape") and hasattr(a, "dtype")):
        a = np.asarray(a)
    dtype = np.dtype(a.dtype)
    if not (np.issubdtype(dtype, np.number)) or (name == "diff3d" and np.iscomplexobj(np.empty(0, dtype))):
        raise ValueError(f"{name} must hold real numbers (float32 amplitudes), got dtype {dtype}")
    return a


class RawData:
    """One ptychography scan (DESIGN.md section 1).

    Parameters
    ----------
    xcoords, ycoords : (n,) float
        Scan positions in object pixels.
    xcoords_start, ycoords_start : (n,) float or None
        Nominal positions; None copies ``xcoords``/``ycoords``.
    diff3d : (n, N, N) array
        Diffraction amplitudes (float32; uint16 accepted). NumPy arrays, memmaps, h5py or
        zarr datasets and CuPy arrays are kept as given (not copied).
    probeGuess : (N, N) complex
    scan_index : (n,) int or None
        Scan number of each position; None means all zeros.
    objectGuess : (H, W) complex, optional
    Y : (n, N, N) complex, optional ground-truth patches.
    norm_Y_I, metadata : optional, carried along unchanged.
    backend : {"auto", "cpu", "gpu"}
        Default backend for grouping (overridable per call).

    Raises
    ------
    ValueError
        Naming the field, its bad value or shape, and the fix.

    Examples
    --------
    >>> import numpy as np
    >>> from gpugroup import RawData
    >>> yy, xx = np.divmod(np.arange(100.0), 10)
    >>> raw = RawData.from_coords_without_pc(xx * 4, yy * 4, np.ones((100, 8, 8), np.float32),
    ...                                      np.ones((8, 8), np.complex64), None, backend="cpu")
    >>> d = raw.generate_grouped_data(8, K=7, nsamples=10, seed=1, gridsize=2)
    >>> d["X_full"].shape, d["nn_indices"].dtype
    ((10, 8, 8, 4), dtype('int32'))
    """

    def __init__(self, xcoords, ycoords, xcoords_start, ycoords_start, diff3d, probeGuess,
                 scan_index, objectGuess=None, Y=None, norm_Y_I=None, metadata=None, *,
                 backend="auto"):
        self.xcoords, self.ycoords = _check_coordinates(xcoords, ycoords)
        n = self.xcoords.shape[0]
        if (xcoords_start is None) != (ycoords_start is None):
            raise ValueError(
                "xcoords_start and ycoords_start must be given together (or both None to "
                "copy xcoords/ycoords)"
            )
        if xcoords_start is None:
            self.xcoords_start, self.ycoords_start = self.xcoords, self.ycoords
        else:
            xs, ys = _check_coordinates(xcoords_start, ycoords_start,
                                        ("xcoords_start", "ycoords_start"))
            if xs.shape[0] != n:
                raise ValueError(
                    f"xcoords has {n} entries but xcoords_start has {xs.shape[0]}; pass one "
                    f"start position per scan position (or None)"
                )
            self.xcoords_start, self.ycoords_start = xs, ys
        self.diff3d = _as_frame_store("diff3d", diff3d)
        shape = _frames_shape("diff3d", self.diff3d, n)
        if probeGuess is None:
            raise ValueError(f"probeGuess is required: a complex ({shape[1]}, {shape[2]}) probe")
        self.probeGuess = np.asarray(probeGuess)
        if self.probeGuess.shape != shape[1:]:
            raise ValueError(
                f"probeGuess has shape {self.probeGuess.shape} but the diffraction frames are "
                f"{shape[1:]}; the probe must match the frame size"
            )
        if scan_index is None:
            scan_index = np.zeros(n, dtype=np.int64)
        self.scan_index = np.asarray(scan_index)
        if self.scan_index.shape != (n,) or not np.issubdtype(self.scan_index.dtype, np.integer):
            raise ValueError(
                f"scan_index must be ({n},) integers like xcoords, got shape "
                f"{self.scan_index.shape} dtype {self.scan_index.dtype}; pass None for one scan"
            )
        self.objectGuess = None if objectGuess is None else np.asarray(objectGuess)
        if self.objectGuess is not None and self.objectGuess.ndim != 2:
            raise ValueError(f"objectGuess must be 2-D (H, W), got shape {self.objectGuess.shape}")
        self.Y = None if Y is None else _as_frame_store("Y", Y)
        if self.Y is not None:
            y_shape = tuple(self.Y.shape)
            if y_shape != shape:
                raise ValueError(
                    f"Y has shape {y_shape} but diff3d has shape {shape}; Y holds one "
                    f"(N, N) ground-truth patch per frame"
                )
        self.norm_Y_I = norm_Y_I
        self.metadata = dict(metadata) if metadata else {}
        if backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {BACKEND_NAMES}, got backend={backend!r}")
        self.backend = backend
        self._index_cache: dict = {}
        self._source = None  # the file from_file read (out= must not replace it)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_coords_without_pc(cls, xcoords, ycoords, diff3d, probeGuess, scan_index,
                               objectGuess=None, metadata=None, *, backend="auto"):
        """A scan whose start coordinates equal its coordinates (no position correction)."""
        return cls(xcoords, ycoords, None, None, diff3d, probeGuess, scan_index,
                   objectGuess=objectGuess, metadata=metadata, backend=backend)

    @classmethod
    def from_file(cls, path, *, mmap_mode=None, keys=None, backend="auto"):
        """Load a scan: NPZ (PtychoPINN layout; ``diffraction`` is accepted for ``diff3d``),
        a directory of ``KEY.npy`` files, HDF5 (``.h5``/``.hdf5``/``.cxi``) or Zarr (``.zarr``).

        Parameters
        ----------
        path : str or path-like
            The format follows the suffix (``.npz``, ``.h5``/``.hdf5``/``.cxi``, ``.zarr``, a
            directory of ``.npy`` files). HDF5 and Zarr files hold the NPZ keys as datasets;
            CXI files keep the frames at ``/entry_1/data_1/data`` (taken as stored: make sure
            they are amplitudes) and, without ``xcoords``, the positions in
            ``/entry_1/sample_1/geometry_1/translation``.
        mmap_mode : {None, "r"}
            None reads everything into memory. ``"r"`` leaves the frame stacks on disk
            (``diff3d``, ``Y``): ``np.memmap`` over uncompressed NPZ members or ``.npy``
            files, ``h5py.Dataset``, ``zarr.Array``. Grouping then reads only the frames the
            groups use, in bounded memory.
        keys : dict, optional
            Field -> dataset path (HDF5/Zarr) or member name (NPZ), e.g.
            ``{"diff3d": "/entry/data/frames"}``.
        backend : {"auto", "cpu", "gpu"}

        Raises
        ------
        FileNotFoundError, OSError
            The file is missing, unreadable, truncated or of no supported format.
        ValueError
            A required key is missing, a field is malformed, or ``mmap_mode`` was asked of
            a compressed NPZ (the message says how to convert it: ``gpugroup convert``).
        ImportError
            h5py or zarr is needed and missing (``pip install "gpugroup[hdf5]"``/``[zarr]``).
        """
        path = os.fspath(path)
        data = io.read_scan(path, mmap_mode=mmap_mode, keys=keys)
        return cls._from_mapping(data, path, backend)

    @classmethod
    def _from_mapping(cls, data, source, backend):
        if "diff3d" not in data and "diffraction" in data:
            data["diff3d"] = data.pop("diffraction")
        elif "diffraction" in data:
            logger.warning("%r holds both diff3d and diffraction: using diff3d, ignoring "
                           "diffraction", source)
        missing = [k for k in REQUIRED_KEYS + ("diff3d",) if k not in data]
        if missing:
            raise io.missing_fields_error(source, missing, sorted(data))
        metadata = data.get("_metadata")
        if metadata is not None:
            metadata = json.loads(str(metadata))
        get = data.get
        raw = cls(get("xcoords"), get("ycoords"), get("xcoords_start"), get("ycoords_start"),
                  get("diff3d"), get("probeGuess"), get("scan_index"),
                  objectGuess=get("objectGuess"), Y=get("Y"), norm_Y_I=get("norm_Y_I"),
                  metadata=metadata, backend=backend)
        raw._source = source
        return raw

    @classmethod
    def from_files(cls, train_data_file_path, test_data_file_path, *, backend="auto"):
        """``(train, test)`` scans from two NPZ files."""
        return (cls.from_file(train_data_file_path, backend=backend),
                cls.from_file(test_data_file_path, backend=backend))

    def to_dict(self) -> dict:
        """The scan's arrays under their NPZ keys (None fields left out)."""
        out = {
            "xcoords": self.xcoords, "ycoords": self.ycoords,
            "xcoords_start": self.xcoords_start, "ycoords_start": self.ycoords_start,
            "diff3d": self.diff3d, "probeGuess": self.probeGuess, "scan_index": self.scan_index,
            "objectGuess": self.objectGuess, "Y": self.Y, "norm_Y_I": self.norm_Y_I,
        }
        if self.metadata:
            out["_metadata"] = np.array(json.dumps(self.metadata))
        return {k: v for k, v in out.items() if v is not None}

    def to_file(self, path, *, overwrite=True, check_space=True) -> None:
        """Write the scan atomically (under a temporary name, renamed when complete) as an
        uncompressed, memory-mappable ``.npz``, an ``.h5``/``.hdf5`` file or a ``.zarr``
        store, by the suffix. Frame stacks are copied in slabs, so they need not fit in
        memory; any other name gets an NPZ, as ``numpy.savez`` to an open file would.
        ``overwrite=False`` refuses to replace an existing ``path``; ``check_space=False``
        skips the free-space check."""
        io.check_output(path, overwrite=overwrite, source=self._source, option="path")
        try:
            fmt = io.output_format(path)
        except ValueError:
            fmt = "npz"
        io.write_scan(path, self.to_dict(), overwrite=overwrite, fmt=fmt,
                      check_space=check_space)

    # ------------------------------------------------------------------ description
    def __len__(self) -> int:
        return int(self.xcoords.shape[0])

    def __str__(self) -> str:
        n = len(self)
        shape = tuple(self.diff3d.shape)
        lines = [
            f"RawData: {n} positions, frames {shape[1]}x{shape[2]} {np.dtype(self.diff3d.dtype)}"
            f" ({type(self.diff3d).__module__.split('.')[0]} store), backend={self.backend!r}",
            f"  x in [{self.xcoords.min():.6g}, {self.xcoords.max():.6g}], "
            f"y in [{self.ycoords.min():.6g}, {self.ycoords.max():.6g}]",
            f"  scans: {len(np.unique(self.scan_index))}, probe {self.probeGuess.shape} "
            f"{self.probeGuess.dtype}",
            f"  objectGuess: {None if self.objectGuess is None else self.objectGuess.shape}, "
            f"Y: {None if self.Y is None else tuple(self.Y.shape)}",
        ]
        return "\n".join(lines)

    __repr__ = __str__

    # ------------------------------------------------------------------ grouping
    def _generate_groups_efficiently(self, nsamples: int, K: int, C: int, seed=None, **kwargs):
        """(B, C) int32 groups by sample-then-group (the name PtychoPINN training code calls)."""
        kwargs.setdefault("backend", self.backend)
        return sample_groups(self.xcoords, self.ycoords, nsamples, K, C, seed=seed,
                             index_cache=self._index_cache, **kwargs)

    def generate_grouped_data(self, N, K=4, nsamples=1, dataset_path=None, seed=None,
                              sequential_sampling=False, gridsize=None,
                              enable_oversampling=False, neighbor_pool_size=None, *,
                              rng=None, group_by_scan=False, backend=None,
                              keep_diffraction=True, output="numpy", chunk_bytes=None,
                              progress=None, out=None, lazy=False, overwrite=True,
                              row_order="canonical", check_space=True):
        """Sample groups and assemble the training dict of DESIGN.md section 2.

        The positional order is PtychoPINN's (``N, K, nsamples, dataset_path, seed,
        sequential_sampling, gridsize, enable_oversampling, neighbor_pool_size``); the
        rest is keyword-only.

        Parameters
        ----------
        N : int
            Frame size; must equal the diffraction frames' size.
        K : int
            Pool size (seed + K - 1 nearest), >= gridsize**2.
        nsamples : int
            Number of groups (more than n needs ``enable_oversampling``).
        dataset_path : ignored
            Accepted for PtychoPINN compatibility (it named the old group cache).
        seed : int or None
            None draws and logs a fresh seed (from ``rng`` when given); the value used is
            in ``result["seed"]``.
        rng : numpy.random.Generator or None
            Accepted for PtychoPINN compatibility: with ``seed=None`` the seed is drawn
            from it, so a seeded Generator gives repeatable groups. Ignored when ``seed``
            is given.
        gridsize : int or None
            C = gridsize**2 positions per group; None means 1.
        sequential_sampling, enable_oversampling, group_by_scan : bool
            See :func:`gpugroup.sample_groups` (``group_by_scan`` passes ``scan_index``).
        neighbor_pool_size : int or None
            Pool size overriding K (PtychoPINN's oversampling knob).
        backend : {"auto", "cpu", "gpu"} or None
            None uses the RawData's backend.
        keep_diffraction : bool
            False skips the ``diffraction`` copy (``X_full`` only; less memory).
        output : {"numpy", "device"}
            NumPy arrays (default), or the backend's own arrays (CuPy on the GPU); with
            ``out`` or ``lazy`` only "numpy".
        chunk_bytes : int or None
            Gathered bytes per assembly chunk (memory bound; no effect on results). None:
            4 MiB in memory on the CPU, 256 MiB on a GPU; with ``out`` the transient memory
            budget of the whole write (default 256 MiB); with ``lazy`` the bytes of one
            Dask block (default 64 MiB).
        progress : callable or None
            Called with the number of groups finished after each chunk.
        out : str or path-like or None
            Stream the result into ``*.h5``, ``*.zarr`` or ``*.npz`` (written under a
            temporary name, renamed when complete; nothing is left under ``out`` on an
            error or Ctrl-C). See :func:`gpugroup.streamed.write_grouped`.
        lazy : bool
            Return Dask arrays for ``diffraction``, ``X_full`` and ``Y`` (and a 0-d Dask
            array ``norm_scale``), see :func:`gpugroup.dask.grouped_arrays`. With ``out`` (a
            ``.zarr``) the Dask tasks write the store in parallel.
        overwrite : bool
            With ``out``: replace an existing file (once the new one is complete).
        check_space : bool
            With ``out``: refuse up front an output larger than the free space there
            (the message gives both); False skips the check.
        row_order : {"canonical", "locality"}
            With ``out`` or ``lazy``: ``"locality"`` stores the rows sorted by their smallest
            frame index (the input is then read nearly sequentially: several times faster
            from disk) and adds ``order`` (row j is canonical group ``order[j]``).

        Returns
        -------
        dict
            Keys of DESIGN.md section 2 plus ``seed`` and ``norm_scale``. With ``out``, the
            large entries are on-disk arrays (``np.memmap``, ``zarr.Array`` or
            ``h5py.Dataset`` of a read-only file the caller closes with
            ``d["X_full"].file.close()``), the rest NumPy, plus ``path``.
        """
        if isinstance(dataset_path, (int, np.integer)) and not isinstance(dataset_path, bool):
            raise TypeError(
                f"the 4th positional argument is dataset_path (PtychoPINN's order), got "
                f"{dataset_path!r}: pass the seed by keyword, seed={dataset_path!r}")
        if dataset_path is not None:
            logger.debug("dataset_path=%r ignored: gpugroup keeps no group cache", dataset_path)
        N = assembly.frame_size(N, self.diff3d)
        if output not in ("numpy", "device") or (output == "device" and (lazy or out)):
            raise ValueError(f"output={output!r}: use 'numpy' or 'device' (the backend's "
                             f"arrays, in memory only: not with out= or lazy=True)")
        if chunk_bytes is not None and (isinstance(chunk_bytes, bool) or not isinstance(
                chunk_bytes, (int, np.integer)) or chunk_bytes < 1):
            raise ValueError(f"chunk_bytes must be a positive int (bytes) or None for the "
                             f"default, got chunk_bytes={chunk_bytes!r}")
        check_row_order(row_order)  # the output's options, before any work
        if out is not None:
            io.check_output(out, overwrite=overwrite, source=self._source, option="out")
            if lazy:
                check_lazy_output(out)
            else:
                io.output_format(out)  # an unknown suffix fails here
        elif row_order != "canonical" and not lazy:
            raise ValueError(f"row_order={row_order!r} needs out=... or lazy=True; in memory "
                             f"the rows are in canonical order")
        for position, name, flag in ((6, "sequential_sampling", sequential_sampling),
                                     (8, "enable_oversampling", enable_oversampling)):
            if not isinstance(flag, (bool, np.bool_)):
                raise TypeError(
                    f"{name} must be True or False, got {flag!r}: it is positional argument "
                    f"{position} (PtychoPINN's order: N, K, nsamples, dataset_path, seed, "
                    f"sequential_sampling, gridsize, ...); pass gridsize= by keyword")
        if seed is None and rng is not None:
            if not hasattr(rng, "integers"):
                raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}"
                                f": pass rng=np.random.default_rng(...) (or seed=...)")
            seed = int(rng.integers(0, 2**63))
        nn, seed, be = self.sample_for_grouping(
            K, nsamples, seed, gridsize, sequential_sampling=sequential_sampling,
            enable_oversampling=enable_oversampling, neighbor_pool_size=neighbor_pool_size,
            group_by_scan=group_by_scan, backend=backend, output="device")
        if lazy or out is not None:
            return self._grouped_out_of_core(
                be, nn, N, seed, out=out, lazy=lazy, keep_diffraction=keep_diffraction,
                chunk_bytes=chunk_bytes, progress=progress, overwrite=overwrite,
                row_order=row_order, check_space=check_space)
        if chunk_bytes is None:
            chunk_bytes = assembly.default_chunk_bytes(be.xp)
        grouped = assembly.assemble_groups(
            be.xp, self, nn, N, keep_diffraction=keep_diffraction, chunk_bytes=chunk_bytes,
            progress=progress, kernels=be.kernels)
        if output == "numpy":
            grouped = {k: be.asnumpy(v) if _is_array(v) else v for k, v in grouped.items()}
        grouped["seed"] = seed
        return grouped

    def sample_for_grouping(self, K=4, nsamples=1, seed=None, gridsize=None, *,
                            sequential_sampling=False, enable_oversampling=False,
                            neighbor_pool_size=None, group_by_scan=False, backend=None,
                            output="numpy"):
        """``(nn_indices, seed, backend)``: the groups ``generate_grouped_data`` uses for
        these arguments (``seed`` resolved, so a ``None`` draw can be repeated)."""
        gridsize = 1 if gridsize is None else gridsize
        if isinstance(gridsize, bool) or not isinstance(gridsize, (int, np.integer)) or gridsize < 1:
            raise ValueError(f"gridsize must be a positive int, got gridsize={gridsize!r}")
        C = int(gridsize) ** 2
        if neighbor_pool_size is not None and (
                isinstance(neighbor_pool_size, bool)
                or not isinstance(neighbor_pool_size, (int, np.integer))
                or neighbor_pool_size < C):
            raise ValueError(f"neighbor_pool_size must be an int >= gridsize**2 = {C} (it "
                             f"replaces K), got neighbor_pool_size={neighbor_pool_size!r}")
        be = get_backend(self.backend if backend is None else backend)
        seed = resolve_seed(seed)
        nn = sample_groups(
            self.xcoords, self.ycoords, nsamples,
            K if neighbor_pool_size is None else neighbor_pool_size, C,
            seed=seed, backend=be, sequential=sequential_sampling,
            enable_oversampling=enable_oversampling,
            scan_index=self.scan_index if group_by_scan else None, output=output,
            index_cache=self._index_cache,
        )
        return nn, seed, be

    def grouped_dataset(self, N, K=4, nsamples=1, seed=None, gridsize=None, **kwargs):
        """An index-only grouped dataset: the rows of ``generate_grouped_data`` with the
        same arguments, gathered batch by batch (see :class:`gpugroup.dataset.GroupedDataset`;
        ``kwargs``: the sampling options and ``backend``, ``output``, ``keep_diffraction``)."""
        return GroupedDataset.from_raw(self, N, K, nsamples, seed, gridsize, **kwargs)

    def _grouped_out_of_core(self, be, nn, N, seed, *, out, lazy, keep_diffraction,
                             chunk_bytes, progress, overwrite, row_order, check_space=True):
        """``generate_grouped_data`` with ``out`` (streamed file) or ``lazy`` (Dask)."""
        if lazy:
            grouped = gdask.grouped_arrays(self, nn_indices=be.asnumpy(nn), N=N,
                                           keep_diffraction=keep_diffraction,
                                           block_bytes=chunk_bytes, seed=seed,
                                           row_order=row_order)
            if out is not None:
                return gdask.to_zarr(grouped, out, overwrite=overwrite,
                                     check_space=check_space)
            return grouped
        return streamed.write_grouped(
            out, be.xp, self, nn, N, keep_diffraction=keep_diffraction,
            chunk_bytes=streamed.DEFAULT_OUT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes,
            progress=progress, seed=seed, overwrite=overwrite, row_order=row_order,
            check_space=check_space)


def convert(src, dst, *, keys=None, slab_bytes=io.DEFAULT_SLAB_BYTES, overwrite=True,
            progress=None, check_space=True) -> str:
    """Rewrite scan ``src`` (any readable format, compressed NPZ included) as ``dst``
    (``.npz`` uncompressed and memory-mappable, ``.h5`` or ``.zarr``), in bounded memory.

    The scan is validated (as :class:`gpugroup.RawData`) and written with its defaults
    filled in (``xcoords_start``, ``scan_index``). This is ``gpugroup convert SRC DST``.

    Examples
    --------
    >>> import numpy as np, os, tempfile
    >>> from gpugroup.rawdata import RawData, convert
    >>> d = tempfile.mkdtemp()
    >>> np.savez_compressed(os.path.join(d, "s.npz"), xcoords=np.arange(4.0),
    ...     ycoords=np.zeros(4), diff3d=np.ones((4, 8, 8), np.float32),
    ...     probeGuess=np.ones((8, 8), np.complex64))
    >>> out = convert(os.path.join(d, "s.npz"), os.path.join(d, "s2.npz"))
    >>> type(RawData.from_file(out, mmap_mode="r", backend="cpu").diff3d).__name__
    'memmap'
    """
    src = os.fspath(src)
    io.check_keys(keys)
    io.check_output(dst, overwrite=overwrite, source=src, option="dst")
    raw = RawData._from_mapping(io.read_scan_slabs(src, keys), src, "cpu")
    return io.write_scan(dst, raw.to_dict(), slab_bytes=slab_bytes, overwrite=overwrite,
                         progress=progress, check_space=check_space)


def _is_array(v) -> bool:
    return isinstance(v, np.ndarray) or assembly.is_device_array(v)
