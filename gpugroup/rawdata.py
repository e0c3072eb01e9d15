"""RawData: a validated ptychography scan and its grouped training arrays.

A drop-in for PtychoPINN's ``ptycho.raw_data.RawData``: the same fields, the same NPZ
layout (DESIGN.md section 1), ``generate_grouped_data`` returning the dict of section 2,
built on :func:`gpugroup.sample_groups` (sample-then-group, no cache files).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import sys
from collections.abc import Mapping

import numpy as np

from gpugroup import assembly, io, streamed
from gpugroup import dask as gdask
from gpugroup.backends import BACKEND_NAMES, get_backend
from gpugroup.dataset import GroupedDataset
from gpugroup.grouping import (SamplingOptions, _check_coordinates, check_bytes, check_count,
                               exact_rescale, neighbour_pool, sample_groups,
                               sample_with, select_members)
from gpugroup.io.formats import HDF5_SUFFIXES, warn_two_frame_stacks
from gpugroup.io.frames import StackRef, open_stack, stack_ref
from gpugroup.io.grouped import check_lazy_output, check_row_order
from gpugroup.keys import resolve_seed
from gpugroup.schema import SCAN_FIELDS, check_position_numbers, index_dtype

logger = logging.getLogger(__name__)

REQUIRED_KEYS = ("xcoords", "ycoords", "probeGuess")
#: Fields that may be frame stacks left on disk (pickled as references).
_STACK_FIELDS = ("diff3d", "_Y")  # Y is a property over _Y
OPTIONAL_KEYS = ("xcoords_start", "ycoords_start", "scan_index", "objectGuess", "Y", "norm_Y_I")


def _frames_shape(name, a, n=None):
    shape = tuple(getattr(a, "shape", ()))
    if len(shape) != 3:
        raise ValueError(
            f"{name} must be 3-D (n_frames, N, N), got shape {shape}; stack the frames along "
            f"axis 0"
        )
    if 0 in shape[1:]:
        raise ValueError(f"{name} frames are empty, shape {shape}; pass the detector frames "
                         f"(n_frames, N, N) with N > 0")
    if shape[1] != shape[2]:
        hint = ""
        if shape[0] == shape[1] or (n is not None and shape[2] == n):
            hint = (f"; frames stored last, (N, N, n), as in PtychoPINN's older files? "
                    f"pass np.moveaxis({name}, -1, 0)")
        raise ValueError(f"{name} frames must be square N x N, got shape {shape}{hint}")
    if n is not None and shape[0] != n:
        raise ValueError(
            f"xcoords has {n} entries but {name} has {shape[0]} frames; pass one frame per "
            f"scan position"
        )
    return shape


def _check_scan_index_field(scan_index, n):
    """(n,) scan numbers: None gives zeros; integer-valued floats (PtychoPINN writes them)
    become int64."""
    if scan_index is None:
        return np.zeros(n, dtype=np.int64)
    s = np.asarray(scan_index)
    if s.shape != (n,) or not (np.issubdtype(s.dtype, np.integer)
                               or np.issubdtype(s.dtype, np.floating)):
        raise ValueError(
            f"scan_index must be ({n},) numbers like xcoords, got shape {s.shape} dtype "
            f"{s.dtype}; pass None for one scan")
    if np.issubdtype(s.dtype, np.floating):
        whole = np.isfinite(s) & (s == np.round(s))
        if not whole.all():
            i = int(np.argmin(whole))
            raise ValueError(f"scan_index holds non-integer values, first scan_index[{i}]="
                             f"{s[i]}; pass whole scan numbers")
        s = s.astype(np.int64)
    return s


def _check_patches(Y, n):
    """Ground-truth patches (n, N, N); PtychoPINN's (n, N, N, 1) is taken as (n, N, N)."""
    shape = tuple(Y.shape)
    if len(shape) == 4 and shape[3] == 1:
        Y = Y[..., 0] if isinstance(Y, np.ndarray) or assembly.is_device_array(Y) \
            else np.asarray(Y)[..., 0]
        shape = shape[:3]
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(f"Y must be (n, N, N) ground-truth patches (or (n, N, N, 1)), got "
                         f"shape {shape}")
    if shape[0] != n:
        raise ValueError(f"xcoords has {n} entries but Y has {shape[0]} patches; pass one "
                         f"patch per scan position")
    return Y


#: What each array field holds, and its usual dtype, for the errors that name it.
_HOLDS = {"diff3d": ("real numbers (float32 amplitudes)", "float32"),
          "Y": ("numbers (complex64 object patches)", "complex64"),
          "probeGuess": ("numbers (a complex64 (N, N) probe)", "complex64"),
          "objectGuess": ("numbers (a complex64 (H, W) object)", "complex64")}


def _check_numbers(name, a):
    """``a`` (anything with a dtype) holds numbers: real ones for ``diff3d``."""
    dtype = np.dtype(a.dtype)
    if name == "diff3d" and dtype.kind == "c":
        raise ValueError(f"diff3d must hold real amplitudes (float32), got dtype {dtype}; "
                         f"measured frames are real: for complex exit waves pass their "
                         f"amplitudes, np.abs(diff3d).astype(np.float32)")
    if not np.issubdtype(dtype, np.number):
        what, usual = _HOLDS[name]
        raise ValueError(f"{name} must hold {what}, got dtype {dtype}; pass a numeric array "
                         f"(e.g. np.asarray({name}, dtype=np.{usual}) of numbers stored as "
                         f"text)")
    return a


def _as_frame_store(name, a):
    """Keep memmaps, HDF5/Zarr datasets and device arrays as they are; make the rest NumPy."""
    if a is None:
        raise ValueError(f"{name} is required (an (n, N, N) diffraction amplitude stack)")
    if not (hasattr(a, "shape") and hasattr(a, "dtype")):
        a = np.asarray(a)
    return _check_numbers(name, a)


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
        # PtychoPINN accepts a scan without frames or probe (e.g. positions only); grouping
        # then says what is missing.
        self.diff3d = None if diff3d is None else _as_frame_store("diff3d", diff3d)
        shape = None if self.diff3d is None else _frames_shape("diff3d", self.diff3d, n)
        self.probeGuess = None if probeGuess is None else _check_numbers(
            "probeGuess", np.asarray(probeGuess))
        if self.probeGuess is not None:
            if self.probeGuess.ndim != 2:
                raise ValueError(f"probeGuess must be 2-D (N, N), got shape "
                                 f"{self.probeGuess.shape}")
            if shape is not None and self.probeGuess.shape != shape[1:]:
                logger.warning("probeGuess has shape %s but the diffraction frames are %s; "
                               "PtychoPINN's model expects them equal", self.probeGuess.shape,
                               shape[1:])
        self.scan_index = _check_scan_index_field(scan_index, n)
        self.objectGuess = None if objectGuess is None else _check_numbers(
            "objectGuess", np.asarray(objectGuess))
        if self.objectGuess is not None and self.objectGuess.ndim != 2:
            raise ValueError(f"objectGuess must be 2-D (H, W), got shape {self.objectGuess.shape}")
        self.Y = Y
        if self.Y is not None and shape is not None and tuple(self.Y.shape[1:3]) != shape[1:]:
            logger.warning("Y holds %s patches but the diffraction frames are %s; "
                           "PtychoPINN's model expects them equal", tuple(self.Y.shape[1:3]),
                           shape[1:])
        self.norm_Y_I = norm_Y_I
        if isinstance(metadata, (list, tuple, str)) and not len(metadata):
            metadata = None  # holds nothing, as {} (PtychoPINN's default is None)
        if metadata is not None and not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a dict (stored as JSON, e.g. "
                            f"{{'physics_parameters': {{'N': 64}}}}) or None, got "
                            f"{type(metadata).__name__} {metadata!r:.80}")
        # the caller's mapping itself, as PtychoPINN keeps it (its torch bridge checks
        # ``raw.metadata is metadata``); None becomes {}
        self.metadata = {} if metadata is None else metadata
        if backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {BACKEND_NAMES}, got backend={backend!r}")
        self.backend = backend
        # PtychoPINN's load_data records its subsample here; grouped dicts carry it along
        self.sample_indices = None
        self.subsample_seed = None
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
    def from_file(cls, path, validate_config=False, current_config=None, *, mmap_mode=None,
                  keys=None, backend="auto"):
        """Load a scan: NPZ (PtychoPINN layout; ``diffraction`` is accepted for ``diff3d``),
        a directory of ``KEY.npy`` files, HDF5 (``.h5``/``.hdf5``/``.cxi``) or Zarr (``.zarr``).

        An NPZ ``_metadata`` member (PtychoPINN's JSON string, also as a 0-d object array)
        becomes ``raw.metadata``; nothing else is unpickled. A member stored as None
        (PtychoPINN's ``to_file`` with ``objectGuess=None``) counts as absent.

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
        validate_config : bool
            With ``current_config`` and metadata in the file: log a warning for each of
            ``nphotons``, ``N``, ``gridsize`` that differs between the file's
            ``physics_parameters`` and the config (as PtychoPINN's ``from_file``).
        current_config : object, optional
            A PtychoPINN ``TrainingConfig`` (or anything with ``nphotons`` and ``model.N``,
            ``model.gridsize`` attributes), or a dict with those entries.
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
        TypeError
            ``keys`` is not a mapping of field names to strings.
        """
        path = os.fspath(path)
        data = io.read_scan(path, mmap_mode=mmap_mode, keys=keys)
        raw = cls._from_mapping(data, path, backend)
        if validate_config and raw.metadata and current_config is not None:
            for warning in _config_mismatches(raw.metadata, current_config):
                logger.warning("Parameter mismatch: %s", warning)
        return raw

    @classmethod
    def _from_mapping(cls, data, source, backend):
        found = sorted(data)
        if "diff3d" not in data and "diffraction" in data:
            data["diff3d"] = data.pop("diffraction")
        elif "diffraction" in data:
            warn_two_frame_stacks(source)
        missing = [k for k in REQUIRED_KEYS + ("diff3d",) if k not in data]
        if missing:
            raise io.missing_fields_error(source, missing, found)
        metadata = data.get("_metadata")
        if metadata is not None:
            try:
                metadata = json.loads(str(np.asarray(metadata).item()))
            except ValueError as exc:
                logger.warning("%r: _metadata is not JSON (%s); ignoring it", source, exc)
                metadata = None
            if metadata is not None and not isinstance(metadata, dict):
                logger.warning("%r: _metadata is JSON %s, not an object of named values; "
                               "ignoring it", source, type(metadata).__name__)
                metadata = None
        get = data.get
        Y, n = get("Y"), np.shape(data["xcoords"])
        if Y is not None and len(n) == 1 and np.ndim(Y) and Y.shape[0] != n[0]:
            # e.g. the single patch PtychoPINN's generate_patches_tool writes by default
            logger.warning("%r: Y holds %d patches for %d positions; ignoring it, as "
                           "PtychoPINN's load_data does (Y is then cut from objectGuess)",
                           source, Y.shape[0], n[0])
            Y = None
        raw = cls(get("xcoords"), get("ycoords"), get("xcoords_start"), get("ycoords_start"),
                  get("diff3d"), get("probeGuess"), get("scan_index"),
                  objectGuess=get("objectGuess"), Y=Y, norm_Y_I=get("norm_Y_I"),
                  metadata=metadata, backend=backend)
        raw._source = source
        return raw

    @classmethod
    def from_simulation(cls, xcoords, ycoords, probeGuess, objectGuess, scan_index=None, *,
                        nphotons=None, seed=None, backend="auto"):
        """A scan simulated from ``objectGuess`` and ``probeGuess`` at the given positions,
        with PtychoPINN's physics (its ``RawData.from_simulation`` at gridsize 1, which its
        ``nongrid_simulation`` and dose studies call).

        ``Y`` holds the (N, N) object patches at the positions. The illuminated patches
        ``Y * probe`` are scaled by ``s = sqrt(nphotons / mean photons per frame)``; each
        frame's photon counts are Poisson draws around ``|fftshift(fft2(s Y probe))|**2 /
        N**2``, and ``diff3d`` = sqrt(counts) / s (float32): the amplitudes keep the
        photon noise of ``nphotons`` per frame. ``norm_Y_I`` = sqrt(nphotons / mean of
        sum(diff3d**2) per frame) (float32), as PtychoPINN's ``scale_nphotons``.

        Parameters
        ----------
        nphotons : float or None
            Expected photons per frame; None: PtychoPINN's ``params.get('nphotons')`` when
            ``ptycho.params`` is imported, else its default 1e9.
        seed : int or None
            Seed of the photon noise (the same seed, the same counts). None behaves as
            PtychoPINN's TensorFlow draws: every call in a process draws new noise, and a
            process seeded the same way (``np.random.seed``,
            ``tf.keras.utils.set_random_seed``) repeats (see :func:`_noise_seed`). The
            counts differ from PtychoPINN's, not their distribution.

        Raises
        ------
        NotImplementedError
            When PtychoPINN's ``ptycho.params`` holds gridsize > 1 (as PtychoPINN).
        ValueError
            NaN or inf under the probe, or an ``nphotons`` whose scale or counts float32 and
            int64 cannot hold.
        """
        if resolve_gridsize(None) != 1:
            raise NotImplementedError(
                "from_simulation supports gridsize=1 only (ptycho.params holds gridsize > "
                "1); simulate at gridsize 1 and group with generate_grouped_data(gridsize=...)")
        x, y = _check_coordinates(xcoords, ycoords)
        probe = np.asarray(probeGuess)
        if probe.ndim != 2 or probe.shape[0] != probe.shape[1]:
            raise ValueError(f"probeGuess must be a square (N, N) array, got shape "
                             f"{probe.shape}")
        if objectGuess is None or np.ndim(objectGuess) != 2:
            raise ValueError("objectGuess must be a 2-D (H, W) object to simulate from, got "
                             f"{None if objectGuess is None else np.shape(objectGuess)}")
        nphotons = resolve_nphotons(nphotons)
        rng = np.random.default_rng(_noise_seed(seed))
        obj = np.asarray(objectGuess)
        N = int(probe.shape[0])
        Y = assembly.extract_patches(np, obj, x, y, N)
        assembly.warn_patches_off_object(np, x, y, obj.shape, N)
        lit = probe.astype(np.complex64)  # Y * lit: the illuminated patches
        # frames a few MiB at a time (the counts are int64): the same draws for any chunking
        chunks = assembly.chunk_groups(len(Y), N * N * 8)
        photons = np.mean(np.concatenate([np.sum(np.abs(Y[c] * lit) ** 2, axis=(1, 2))
                                          for c in chunks]), dtype=np.float32)
        if not np.isfinite(photons):
            field = "probeGuess" if not np.isfinite(probe).all() else "objectGuess"
            raise ValueError(f"{field} holds NaN or inf where the probe lights the object, so "
                             f"no frame can be simulated; replace them (e.g. np.nan_to_num)")
        if not photons > 0:  # PtychoPINN returns such a scan too: say so now, not at grouping
            logger.warning(
                "every simulated frame is zero: the probe sees no object at any of the %d "
                "positions (x in [%.6g, %.6g], y in [%.6g, %.6g]; objectGuess is %dx%d), or the "
                "object or probe is zero; pass positions in object pixels, x the column and y "
                "the row", len(x), x.min(), x.max(), y.min(), y.max(), *obj.shape)
            diff3d, norm_Y_I = np.zeros(Y.shape, np.float32), None
        else:
            s = np.float32(np.sqrt(np.float32(nphotons) / photons))
            if not 0 < s < np.inf:
                raise ValueError(
                    f"the illuminated patches hold {photons:.3g} photons per frame on average, "
                    f"so the scale to nphotons={nphotons:g} is {s}, beyond float32; pass an "
                    f"nphotons nearer that, or rescale objectGuess or probeGuess")
            diff3d = np.empty(Y.shape, np.float32)
            for c in chunks:
                far = np.fft.fftshift(np.fft.fft2(Y[c] * lit * s), axes=(-2, -1))
                mean = np.abs(far) ** 2 / (N * N)
                if mean.max() > _POISSON_LAM_MAX:
                    raise ValueError(
                        f"nphotons={nphotons:g} puts {mean.max():.3g} expected photons in one "
                        f"pixel, more than NumPy's Poisson draws hold (int64); pass a smaller "
                        f"nphotons")
                diff3d[c] = np.sqrt(rng.poisson(mean)) / s
            energy = np.mean(np.sum(diff3d ** 2, axis=(1, 2)), dtype=np.float32)
            norm_Y_I = np.sqrt(np.float32(nphotons) / energy) if energy > 0 else None
            if norm_Y_I is None:
                logger.warning("no photon was drawn at nphotons=%g: every simulated frame is "
                               "zero; pass a larger nphotons", nphotons)
        return cls(x, y, x, y, diff3d, probe, scan_index, objectGuess=obj, Y=Y,
                   norm_Y_I=norm_Y_I, backend=backend)

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
            out["_metadata"] = np.array(json.dumps(_plain_json(self.metadata, "metadata")))
        return {k: v for k, v in out.items() if v is not None}

    def to_file(self, path, *, overwrite=True, check_space=True) -> None:
        """Write the scan atomically (under a temporary name, renamed when complete) as an
        uncompressed, memory-mappable ``.npz``, an ``.h5``/``.hdf5`` file or a ``.zarr``
        store, by the suffix. Frame stacks are copied in slabs, so they need not fit in
        memory; any other name gets ``.npz`` appended, as ``numpy.savez`` (PtychoPINN's
        ``to_file``) appends it. ``overwrite=False`` refuses to replace an existing file;
        ``check_space=False`` skips the free-space check."""
        if self.diff3d is None:
            raise ValueError("diff3d is None: a scan file holds the (n, N, N) diffraction "
                             "amplitudes (from_file requires them); set raw.diff3d before "
                             "to_file")
        if not os.fspath(path).rstrip("/\\").lower().endswith(io.OUTPUT_SUFFIXES
                                                               + HDF5_SUFFIXES):
            path = os.fspath(path) + ".npz"  # as numpy.savez (PtychoPINN's to_file) names it
        fmt = io.output_format(path)  # (refuses .cxi and other layouts it only reads)
        io.check_output(path, overwrite=overwrite, source=self._source, option="path")
        io.write_scan(path, self.to_dict(), overwrite=overwrite, fmt=fmt,
                      check_space=check_space)

    @property
    def Y(self):
        """Ground-truth patches (n, N, N), or None; set to PtychoPINN's (n, N, N, 1) too."""
        return self._Y

    @Y.setter
    def Y(self, value):
        self._Y = None if value is None else _check_patches(_as_frame_store("Y", value),
                                                            len(self))

    # ------------------------------------------------------------------ pickling
    def __getstate__(self):
        # For worker processes (multiprocessing, joblib): on-disk frame stacks travel as
        # references each process reopens, as GroupedDataset's do; the kNN indexes (with
        # their locks) are rebuilt there when needed.
        state = self.__dict__.copy()
        state["_index_cache"] = {}
        for key in _STACK_FIELDS:
            if state[key] is not None:
                state[key] = stack_ref(state[key]) or state[key]
        return state

    def __setstate__(self, state):
        if "backend" not in state:  # PtychoPINN's RawData, pickled before patch(): rebuilt
            self.__init__(**{k: state.get(k) for k in SCAN_FIELDS + ("metadata",)})
            self.sample_indices = state.get("sample_indices")
            self.subsample_seed = state.get("subsample_seed")
            return
        if "_Y" not in state:  # pickled before Y became a property
            state["_Y"] = state.pop("Y", None)
        for key in _STACK_FIELDS:
            if isinstance(state[key], StackRef):
                state[key] = open_stack(state[key])
        self.__dict__.update(state)

    # ------------------------------------------------------------------ description
    def __len__(self) -> int:
        return int(self.xcoords.shape[0])

    def __str__(self) -> str:
        n = len(self)
        if self.diff3d is None:
            frames = "no frames"
        else:
            shape = tuple(self.diff3d.shape)
            frames = (f"frames {shape[1]}x{shape[2]} {np.dtype(self.diff3d.dtype)} "
                      f"({type(self.diff3d).__module__.split('.')[0]} store)")
        probe = (None if self.probeGuess is None
                 else f"{self.probeGuess.shape} {self.probeGuess.dtype}")
        lines = [
            f"RawData: {n} positions, {frames}, backend={self.backend!r}",
            f"  x in [{self.xcoords.min():.6g}, {self.xcoords.max():.6g}], "
            f"y in [{self.ycoords.min():.6g}, {self.ycoords.max():.6g}]",
            f"  scans: {len(np.unique(self.scan_index))}, probe {probe}",
            f"  objectGuess: {None if self.objectGuess is None else self.objectGuess.shape}, "
            f"Y: {None if self.Y is None else tuple(self.Y.shape)}",
        ]
        return "\n".join(lines)

    __repr__ = __str__

    # ------------------------------------------------------------------ grouping
    def _generate_groups_efficiently(self, nsamples: int, K: int, C: int, seed=None,
                                     seed_indices=None, **kwargs):
        """(B, C) int32 groups by sample-then-group (PtychoPINN's private method).

        ``seed_indices`` (PtychoPINN's sequential path) gives the seeds, each once, and
        members drawn with seed 0; otherwise ``seed`` as in :meth:`generate_grouped_data`
        (None: from NumPy's legacy global RNG). ``kwargs`` go to :func:`sample_groups`.
        """
        C = int(C)
        _check_pool(K, C)
        n = len(self)
        if n < C:
            raise ValueError(f"Dataset has only {n} points but {C} coordinates per group "
                             f"requested (C = gridsize**2); use a smaller gridsize")
        backend = kwargs.pop("backend", self.backend)
        if seed_indices is not None:
            nn = self._groups_for_seeds(np.asarray(seed_indices)[:n], K, C, backend)
        else:
            nn = sample_groups(self.xcoords, self.ycoords, nsamples, K, C,
                               seed=_draw_seed(seed), backend=backend,
                               index_cache=self._index_cache, **kwargs)
        _seed_numpy_as_ptychopinn(seed, seed_indices is not None)
        return nn

    def _generate_groups_with_oversampling(self, nsamples, K, C, seed=None,
                                           seed_indices=None):
        """(nsamples, C) groups with oversampling (DESIGN.md 3.4): row g takes seed
        number g mod n, repeats of a seed get distinct member sets while comb(K, C)
        allows. ``seed_indices`` (sequential seeds 0..m-1) fixes the members' seed at 0."""
        C = int(C)
        if K < C:
            raise ValueError(
                f"K choose C oversampling requires neighbor_pool_size >= C (gridsize**2): "
                f"got neighbor_pool_size={K}, C={C} (OVERSAMPLING-001); pass "
                f"neighbor_pool_size >= {C}")
        n = len(self)
        if n < C:
            raise ValueError(f"Dataset has only {n} points but {C} coordinates per group "
                             f"requested (C = gridsize**2); use a smaller gridsize")
        sequential = seed_indices is not None
        nn = sample_groups(self.xcoords, self.ycoords, nsamples, K, C,
                           seed=0 if sequential else _draw_seed(seed),
                           backend=self.backend, sequential=sequential,
                           enable_oversampling=True, index_cache=self._index_cache)
        _seed_numpy_as_ptychopinn(seed, False)  # PtychoPINN seeds here even when sequential
        return nn

    def _groups_for_seeds(self, seeds, K, C, backend=None):
        """Groups of DESIGN.md 3.2-3.3 for given seed positions, row g seeded by
        ``seeds[g]`` and members drawn with seed 0 (``seeds = 0..m-1`` is
        ``sequential_sampling=True``)."""
        seeds = check_position_numbers("seed_indices", seeds, len(self), ndim=1)
        n = len(self)
        be = get_backend(self.backend if backend is None else backend)
        xp = be.xp
        rows = seeds.astype(np.int64)
        if C == 1:
            return rows[:, None].astype(index_dtype(n))
        x, y = (xp.asarray(a) for a in exact_rescale(self.xcoords, self.ycoords))
        pool = neighbour_pool(xp, x, y, xp.asarray(rows), K, be.build_index(x, y),
                              threads=be.threads)
        pool_len = xp.full(int(pool.shape[0]), int(pool.shape[1]), dtype=xp.int64)
        nn = select_members(xp, pool, pool_len, xp.arange(len(rows), dtype=xp.int64), C, 0)
        return be.asnumpy(nn).astype(index_dtype(n))

    def generate_grouped_data(self, N, K=4, nsamples=1, dataset_path=None, seed=None,
                              sequential_sampling=False, gridsize=None,
                              enable_oversampling=False, neighbor_pool_size=None, *,
                              rng=None, group_by_scan=False, backend=None,
                              keep_diffraction=True, output="numpy", chunk_bytes=None,
                              progress=None, out=None, lazy=False, overwrite=True,
                              row_order="canonical", check_space=True,
                              y_positions="ptychopinn"):
        """Sample groups and assemble the training dict of DESIGN.md section 2.

        The positional order is PtychoPINN's (``N, K, nsamples, dataset_path, seed,
        sequential_sampling, gridsize, enable_oversampling, neighbor_pool_size``); the
        rest is keyword-only. The semantics follow PtychoPINN's (DESIGN.md section 6).

        Parameters
        ----------
        N : int
            Patch size: the normalization uses (N/2)**2 and ``Y`` patches are N x N. It
            should equal the diffraction frames' size; a different N is accepted in memory
            (with a warning; ``diffraction`` and ``X_full`` keep the frames' size, as in
            PtychoPINN) and refused with ``out`` or ``lazy``.
        K : int
            Pool size (seed + K - 1 nearest), >= gridsize**2.
        nsamples : int
            Number of groups. More than n positions at gridsize > 1 needs
            ``enable_oversampling=True`` (else ``ValueError``, PtychoPINN's
            OVERSAMPLING-001); at gridsize 1 it gives n groups and a warning.
        dataset_path : ignored
            Accepted for PtychoPINN compatibility (it named the old group cache).
        seed : int or None
            None draws the seed from NumPy's legacy global RNG (so ``np.random.seed(s)``
            before the call repeats the groups) and logs it; the value used is in
            ``result["seed"]``. Ignored with ``sequential_sampling``.
        sequential_sampling : bool
            Seeds are positions 0..m-1 and the members are drawn with seed 0, whatever
            ``seed`` is (as PtychoPINN), so sequential runs always give the same groups.
        gridsize : int or None
            C = gridsize**2 positions per group. None: PtychoPINN's
            ``params.get('gridsize', 1)`` when ``ptycho.params`` is imported, else 1.
        enable_oversampling : bool
            Allow nsamples > n at gridsize > 1 (DESIGN.md 3.4).
        neighbor_pool_size : int or None
            The pool size when oversampling (None: K); must be >= gridsize**2. No effect
            without oversampling.
        rng : numpy.random.Generator or None
            With ``seed=None``, draw the seed from this Generator instead.
        group_by_scan : bool
            Pools only hold positions of the seed's own scan (``scan_index``).
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
            Called after each chunk with the number of groups it finished (an
            increment, as ``tqdm``'s ``update`` takes).
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
        y_positions : {"ptychopinn", "members"}
            Where ``Y`` is cut from ``objectGuess`` (when the scan has no ``Y``):
            ``"ptychopinn"`` at PtychoPINN's points ``coords_offsets + coords_relative``
            (each member reflected through the group centre, from ``xcoords``; at
            gridsize 1 the position itself), ``"members"`` at each member's own start
            position (``xcoords_start``).

        Returns
        -------
        dict
            Keys of DESIGN.md section 2 plus ``seed`` and ``norm_scale`` (and
            ``sample_indices`` when set, as PtychoPINN). With ``out``, the large entries
            are on-disk arrays (``np.memmap``, ``zarr.Array`` or ``h5py.Dataset`` of a
            read-only file the caller closes with ``d["X_full"].file.close()``), the rest
            NumPy, plus ``path``.

        Raises
        ------
        ValueError
            K < C ("K=3 must be >= C=4"), OVERSAMPLING-001, bad options, no frames.
        """
        if isinstance(dataset_path, (int, np.integer)) and not isinstance(dataset_path, bool):
            raise TypeError(
                f"the 4th positional argument is dataset_path (PtychoPINN's order), got "
                f"{dataset_path!r}: pass the seed by keyword, seed={dataset_path!r}")
        if dataset_path is not None:
            logger.debug("dataset_path=%r ignored: gpugroup keeps no group cache", dataset_path)
        self._require_frames()
        assembly.check_y_positions(y_positions)
        N = self._patch_size(N, strict=bool(lazy or out is not None))
        if output not in ("numpy", "device") or (output == "device" and (lazy or out)):
            raise ValueError(f"output={output!r}: use 'numpy' or 'device' (the backend's "
                             f"arrays, in memory only: not with out= or lazy=True)")
        chunk_bytes = check_bytes("chunk_bytes", chunk_bytes)
        assembly.check_progress(progress)
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
        flags = []
        for position, name, flag in ((6, "sequential_sampling", sequential_sampling),
                                     (8, "enable_oversampling", enable_oversampling)):
            # PtychoPINN tests their truth: None, 0 and 1 (from a config) are taken too
            if flag is not None and not isinstance(flag, (bool, np.bool_)) and not (
                    isinstance(flag, (int, np.integer)) and flag in (0, 1)):
                raise TypeError(
                    f"{name} must be True or False, got {flag!r}: it is positional argument "
                    f"{position} (PtychoPINN's order: N, K, nsamples, dataset_path, seed, "
                    f"sequential_sampling, gridsize, ...); pass gridsize= by keyword")
            flags.append(bool(flag))
        sequential_sampling, enable_oversampling = flags
        given_seed = seed
        if seed is None and rng is not None and not sequential_sampling:
            if not hasattr(rng, "integers"):
                raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}"
                                f": pass rng=np.random.default_rng(...) (or seed=...)")
            seed = int(rng.integers(0, 2**63))
        nn, seed, be = self.sample_for_grouping(
            K, nsamples, seed, gridsize, sequential_sampling=sequential_sampling,
            enable_oversampling=enable_oversampling, neighbor_pool_size=neighbor_pool_size,
            group_by_scan=group_by_scan, backend=backend, output="device")
        oversampled = int(nn.shape[0]) > len(self)  # then PtychoPINN seeds seed, not 0
        _seed_numpy_as_ptychopinn(given_seed, sequential_sampling and not oversampled)
        if lazy or out is not None:
            return self._grouped_out_of_core(
                be, nn, N, seed, out=out, lazy=lazy, keep_diffraction=keep_diffraction,
                chunk_bytes=chunk_bytes, progress=progress, overwrite=overwrite,
                row_order=row_order, check_space=check_space,
                y_positions=y_positions)
        return self._assemble(be, nn, N, seed, keep_diffraction=keep_diffraction,
                              output=output, chunk_bytes=chunk_bytes, progress=progress,
                              y_positions=y_positions)

    def _generate_dataset_from_groups(self, selected_groups, N, K=None, gridsize=None, *,
                                      y_positions="ptychopinn"):
        """The dict of :meth:`generate_grouped_data` for given groups (B, C) (PtychoPINN's
        private method; ``K`` and ``gridsize`` are accepted and unused: C is the groups'
        width)."""
        self._require_frames()
        nn = check_position_numbers("selected_groups", selected_groups, len(self))
        be = get_backend(self.backend)
        return self._assemble(be, nn, self._patch_size(N, strict=False), None,
                              y_positions=y_positions)

    def _assemble(self, be, nn, N, seed, *, keep_diffraction=True, output="numpy",
                  chunk_bytes=None, progress=None, y_positions="ptychopinn"):
        if chunk_bytes is None:
            chunk_bytes = assembly.default_chunk_bytes(be.xp)
        grouped = assembly.assemble_groups(
            be.xp, self, nn, N, keep_diffraction=keep_diffraction, chunk_bytes=chunk_bytes,
            progress=progress, kernels=be.kernels, y_positions=y_positions)
        if output == "numpy":
            grouped = {k: be.asnumpy(v) if _is_array(v) else v for k, v in grouped.items()}
        grouped["seed"] = seed
        if getattr(self, "sample_indices", None) is not None:
            grouped["sample_indices"] = np.array(self.sample_indices, copy=True)
        return grouped

    def _require_frames(self):
        if self.diff3d is None:
            raise ValueError("diff3d is None: grouping needs the (n, N, N) diffraction "
                             "amplitudes; build the RawData with diff3d=...")

    def _patch_size(self, N, strict):
        """``N`` checked against the frames: equal, or (not ``strict``) different with a
        warning, as PtychoPINN allows."""
        frame = int(self.diff3d.shape[1])
        if strict or N is None:
            return assembly.frame_size(N, self.diff3d)
        if isinstance(N, bool) or not isinstance(N, (int, np.integer)) or N < 1:
            raise TypeError(f"N must be an int (the patch size), got N={N!r}; pass "
                            f"N={frame}")
        if int(N) != frame:
            logger.warning(
                "N=%d differs from the diffraction frames (%dx%d): X_full is normalized "
                "with (N/2)**2 and keeps the frames' size, Y patches are %dx%d (as PtychoPINN "
                "does); pass N=%d to match them", N, frame, frame, N, N, frame)
        return int(N)

    def sample_for_grouping(self, K=4, nsamples=1, seed=None, gridsize=None, *,
                            sequential_sampling=False, enable_oversampling=False,
                            neighbor_pool_size=None, group_by_scan=False, backend=None,
                            output="numpy"):
        """``(nn_indices, seed, backend)``: the groups ``generate_grouped_data`` uses for
        these arguments (``seed`` resolved, so a ``None`` draw can be repeated).

        Applies the rules of DESIGN.md section 6: ``gridsize`` from PtychoPINN's params,
        OVERSAMPLING-001, ``neighbor_pool_size`` only when oversampling, ``seed=None`` from
        NumPy's global RNG, sequential sampling with seed 0.
        """
        gridsize = resolve_gridsize(gridsize)
        C = gridsize ** 2
        n = len(self)
        nsamples = check_count("nsamples", nsamples, 1)
        K = check_count("K", K, 1)
        oversampling = nsamples > n and C > 1
        if not (oversampling and enable_oversampling):
            _check_pool(K, C)  # K is the pool: K < C is the first thing to say
        if oversampling:
            if not enable_oversampling:
                raise ValueError(
                    f"Requesting {nsamples} groups but only {n} points available (gridsize="
                    f"{gridsize}, C={C}): K choose C oversampling is required but not "
                    f"enabled (OVERSAMPLING-001). Pass enable_oversampling=True with "
                    f"neighbor_pool_size >= {C}, or nsamples <= {n} (on the command line "
                    f"--oversample, --neighbor-pool-size, --nsamples)")
            pool = K if neighbor_pool_size is None else neighbor_pool_size
            if isinstance(pool, bool) or not isinstance(pool, (int, np.integer)) or pool < C:
                raise ValueError(
                    f"K choose C oversampling requires neighbor_pool_size >= C (gridsize**2)"
                    f": got neighbor_pool_size={pool!r} (K when None), C={C} "
                    f"(OVERSAMPLING-001); pass neighbor_pool_size >= {C} "
                    f"(--neighbor-pool-size on the command line)")
        else:
            if neighbor_pool_size is not None:
                # PtychoPINN passes its config's value (None unless set); one that differs
                # from K was asked for and is not used: say so
                log = logger.info if neighbor_pool_size == K else logger.warning
                log("neighbor_pool_size=%r has no effect without oversampling (nsamples=%d "
                    "<= n=%d or gridsize 1): pools hold K=%d; pass K=... for another pool",
                    neighbor_pool_size, nsamples, n, K)
            pool = K
            _check_pool(K, C)
        be = get_backend(self.backend if backend is None else backend)
        if sequential_sampling:
            if seed is not None:  # (PtychoPINN's torch workflow passes its subsample seed)
                logger.info("sequential_sampling=True: members are drawn with seed 0 "
                            "(seed=%r ignored, as PtychoPINN)", seed)
            seed = 0
        else:
            seed = _draw_seed(seed)
        opts = SamplingOptions(nsamples, int(pool), C, seed, bool(sequential_sampling),
                               bool(enable_oversampling))
        nn = sample_with(opts, self.xcoords, self.ycoords, backend=be,
                         scan_index=self.scan_index if group_by_scan else None,
                         output=output, index_cache=self._index_cache)
        return nn, seed, be

    def grouped_dataset(self, N, K=4, nsamples=1, seed=None, gridsize=None, **kwargs):
        """An index-only grouped dataset: the rows of ``generate_grouped_data`` with the
        same arguments, gathered batch by batch (see :class:`gpugroup.dataset.GroupedDataset`;
        ``kwargs``: the sampling options and ``backend``, ``output``, ``keep_diffraction``)."""
        return GroupedDataset.from_raw(self, N, K, nsamples, seed, gridsize, **kwargs)

    def _grouped_out_of_core(self, be, nn, N, seed, *, out, lazy, keep_diffraction,
                             chunk_bytes, progress, overwrite, row_order, check_space=True,
                             y_positions="ptychopinn"):
        """``generate_grouped_data`` with ``out`` (streamed file) or ``lazy`` (Dask)."""
        if lazy:
            if progress is not None:
                logger.warning("progress is not called with lazy=True (Dask computes the "
                               "arrays later); wrap the compute in "
                               "dask.diagnostics.ProgressBar() to see progress")
            grouped = gdask.grouped_arrays(self, nn_indices=be.asnumpy(nn), N=N,
                                           keep_diffraction=keep_diffraction,
                                           block_bytes=chunk_bytes, seed=seed,
                                           row_order=row_order, y_positions=y_positions)
            if out is not None:
                return gdask.to_zarr(grouped, out, overwrite=overwrite,
                                     check_space=check_space)
            return grouped
        return streamed.write_grouped(
            out, be.xp, self, nn, N, keep_diffraction=keep_diffraction,
            chunk_bytes=streamed.DEFAULT_OUT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes,
            progress=progress, seed=seed, overwrite=overwrite, row_order=row_order,
            check_space=check_space, y_positions=y_positions)


def _ptychopinn_params_get():
    """PtychoPINN's ``ptycho.params.get`` when that module is imported (looked up in
    ``sys.modules``; PtychoPINN is never imported), else None."""
    getter = getattr(sys.modules.get("ptycho.params"), "get", None)
    return getter if callable(getter) else None


def resolve_gridsize(gridsize) -> int:
    """``gridsize``, or for None PtychoPINN's ``params.get('gridsize', 1)`` when
    ``ptycho.params`` is imported, else 1. The choice is logged."""
    if gridsize is None:
        getter = _ptychopinn_params_get()
        if getter is not None:
            gridsize = getter("gridsize", 1)
            gridsize = 1 if gridsize is None else gridsize
            logger.info("gridsize=None: gridsize=%r from PtychoPINN's ptycho.params", gridsize)
        else:
            gridsize = 1
            logger.info("gridsize=None: gridsize=1 (ptycho.params is not imported)")
    if isinstance(gridsize, bool) or not isinstance(gridsize, (int, np.integer)) or gridsize < 1:
        raise ValueError(f"gridsize must be a positive int, got gridsize={gridsize!r}")
    return int(gridsize)


#: PtychoPINN's default expected photons per frame (its ``params.cfg['nphotons']``).
DEFAULT_NPHOTONS = 1e9
#: The largest mean NumPy's Poisson sampler draws from (its counts are int64).
_POISSON_LAM_MAX = float(np.iinfo(np.int64).max) - 10 * np.sqrt(np.iinfo(np.int64).max)


def resolve_nphotons(nphotons) -> float:
    """``nphotons`` checked, or for None PtychoPINN's ``params.get('nphotons')`` when
    ``ptycho.params`` is imported, else its default 1e9. The choice is logged."""
    if nphotons is None:
        getter = _ptychopinn_params_get()
        nphotons = None if getter is None else getter("nphotons", None)
        where = "PtychoPINN's ptycho.params"
        if nphotons is None:
            nphotons, where = DEFAULT_NPHOTONS, "PtychoPINN's default"
        logger.info("nphotons=None: nphotons=%r from %s", nphotons, where)
    value = float(nphotons) if isinstance(nphotons, (int, float, np.integer, np.floating)) \
        and not isinstance(nphotons, bool) else None
    if value is None or not 0 < value < np.inf:
        raise ValueError(f"nphotons must be a positive number of expected photons per "
                         f"frame, got nphotons={nphotons!r}; pass e.g. nphotons=1e9")
    return value


def _check_pool(K, C):
    """K >= C, in PtychoPINN's words."""
    if K < C:
        raise ValueError(f"K={K} must be >= C={C} (need at least C neighbors to form a "
                         f"group; C = gridsize**2): pass K >= {C}")


def _seed_numpy_as_ptychopinn(seed, sequential) -> None:
    """Seed NumPy's global RNG as PtychoPINN's grouping seeds it, so that code after the
    call draws the same numbers every run: ``np.random.seed(0)`` after sequential
    sampling, ``np.random.seed(seed)`` after a given seed (a seed of 2**32 or more as its
    two 32-bit words); untouched for ``seed=None``. (PtychoPINN then draws from it, so
    the numbers that follow are not the ones its run gives.)"""
    if sequential:
        np.random.seed(0)
    elif seed is not None:
        seed = resolve_seed(seed)
        np.random.seed(seed if seed < 2**32 else [seed & 0xFFFFFFFF, seed >> 32])


def _draw_seed(seed) -> int:
    """``seed`` checked, or for None a seed drawn from NumPy's legacy global RNG (so
    ``np.random.seed(s)`` before the call repeats it), logged."""
    if seed is None:
        seed = int(np.random.randint(0, 2**63 - 1, dtype=np.int64))
        logger.info("seed=None: drew seed=%d from NumPy's global RNG (np.random.seed "
                    "repeats it; pass seed=%d to repeat this run)", seed, seed)
    return resolve_seed(seed)


_simulations = itertools.count()  # from_simulation calls so far in this process


def _noise_seed(seed) -> int:
    """The photon-noise seed of ``from_simulation``: ``seed`` checked, or for None one made
    from the state of NumPy's global RNG, which it reads without advancing, and the number
    of such draws so far in this process, logged.

    PtychoPINN draws the noise from TensorFlow: new noise at each call, repeated by a run
    seeded the same way. Its ``nongrid_simulation`` calls ``np.random.seed(42)`` before
    each simulation, so a seed drawn from NumPy alone would give every call the same
    noise; and drawing would move NumPy's state, which PtychoPINN's simulation leaves as
    it is."""
    if seed is not None:
        return resolve_seed(seed)
    state = np.random.get_state(legacy=False)  # {"bit_generator", "state": {...}, ...}
    inner = {k: v.astype(v.dtype.newbyteorder("<")).tobytes()  # whole, not summarized,
             if isinstance(v, np.ndarray) else v  # and the same on any machine
             for k, v in state["state"].items()}
    text = repr((sorted({**state, "state": inner}.items()), next(_simulations))).encode()
    seed = int.from_bytes(hashlib.sha256(text).digest()[:8], "little")
    logger.info("seed=None: photon-noise seed=%d (from NumPy's global RNG state and this "
                "run's simulation count; pass seed=%d to repeat this simulation)", seed, seed)
    return seed


def _config_mismatches(metadata, config) -> list:
    """PtychoPINN's metadata checks: stored nphotons, N, gridsize vs ``config``."""
    stored = metadata.get("physics_parameters", {}) if isinstance(metadata, dict) else {}

    def field(obj, name):  # a config object's attribute, or a dict's entry
        return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)

    model = field(config, "model") or config
    current = {"nphotons": field(config, "nphotons"), "N": field(model, "N"),
               "gridsize": field(model, "gridsize")}
    out = []
    for name, value in current.items():
        if name not in stored or value is None:
            continue
        same = (abs(stored[name] - value) <= 1e-9 if name == "nphotons"
                else stored[name] == value)
        if not same:
            out.append(f"{name} mismatch: dataset={stored[name]}, config={value}")
    return out


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
    slab_bytes = check_bytes("slab_bytes", slab_bytes) or io.DEFAULT_SLAB_BYTES
    assembly.check_progress(progress)
    io.check_output(dst, overwrite=overwrite, source=src, option="dst")
    raw = RawData._from_mapping(io.read_scan_slabs(src, keys), src, "cpu")
    return io.write_scan(dst, raw.to_dict(), slab_bytes=slab_bytes, overwrite=overwrite,
                         progress=progress, check_space=check_space)


def _plain_json(value, where: str):
    """``value`` with NumPy scalars and arrays made plain Python (``.tolist()``), checked
    to be what JSON holds; a TypeError names the entry (``where``, e.g.
    ``metadata['physics_parameters']['N']``) that is not."""
    if isinstance(value, (np.generic, np.ndarray)):
        value = value.tolist()
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            key = k.item() if isinstance(k, np.generic) else k
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise TypeError(f"{where} has key {k!r} ({type(k).__name__}): metadata is "
                                f"stored as JSON, whose keys are strings or numbers")
            out[key] = _plain_json(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"{where} is a {type(value).__name__} ({value!r:.60}), which JSON cannot "
                    f"hold: metadata is stored as JSON; pass numbers, strings, lists or dicts")


def _is_array(v) -> bool:
    return isinstance(v, np.ndarray) or assembly.is_device_array(v)
