"""GPU backend: CuPy arrays with cuML (or CuPy-native) kNN candidates.

Nothing here imports CuPy or cuML at module import; they load when a GPU backend is asked
for. The grouping itself (keys, seeds, the exact float64 re-rank, members) is the generic
code of :mod:`gpugroup.grouping` run with ``xp = cupy``; this module only picks the
candidate engine (:mod:`gpugroup.backends.engines`):

* ``"cuml"``: ``cuml.neighbors.NearestNeighbors`` (``rbc`` while kq <= sqrt(n), else
  ``brute``) on float32 coordinates centred in float64, with a rigorous error bound on its
  float32 distances (:class:`~gpugroup.backends.engines.NeighborsIndex`).
* ``"cupy"``: the CuPy-native exact uniform-grid engine
  (:class:`~gpugroup.backends.engines.GridIndex`).
* ``"auto"`` (default): cuML when it imports, else CuPy-native; the choice is logged.

Pick one with ``make_backend(engine=...)`` or the environment variable
``GPUGROUP_GPU_ENGINE`` (read by ``backend="gpu"`` / ``"auto"``).

Memory per batch: ``grouping`` queries at most ``batch_rows`` seeds at a time (default
2**16) and bounds its (rows x kq) blocks at 2**23 entries. The grid engine's index takes
32-48 bytes per position and grid level (one level for a uniform scan, a few where the
density varies, at most 12); each query chunk needs about 100 bytes per (row, block
member) slot, at most 2**22 slots (~420 MB). The cuML adapter keeps a float32 copy of the
positions (8 bytes each) beside cuML's index and holds ``batch_rows * kq * 12`` bytes of
cuML output per call plus cuML's own tiled workspace.

Device output and PyTorch: ``sample_groups(..., backend="gpu", output="device")`` returns
a ``cupy.ndarray`` that stays on the GPU; hand it to PyTorch without a copy through DLPack:
``torch.from_dlpack(cupy_array)`` (same memory; ``cupy.from_dlpack(tensor)`` goes back).

Status: written and tested without a GPU. The engines run in CI with ``xp = numpy`` (the
cuML adapter with scikit-learn's ``NearestNeighbors`` in cuML's place), and the whole GPU
path runs on ``tests/devicelike.py``, a NumPy stand-in for CuPy that enforces CuPy's
host/device rules; nothing here has yet run on a real GPU. ``tests/test_gpu.py``
(``pytest -m gpu``) and ``benchmarks/gpu_check.sh`` are the checks to run on one.
"""

from __future__ import annotations

import functools
import logging
import os

from gpugroup.backends import Backend

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "pip install 'gpugroup[cu12]' (CUDA 12) or 'gpugroup[cu13]' (CUDA 13), "
    "or create the conda environment from environment.yml"
)
#: Environment variable that picks the GPU candidate engine: auto | cuml | cupy.
ENGINE_ENV = "GPUGROUP_GPU_ENGINE"
ENGINES = ("auto", "cuml", "cupy")


def unavailable_reason() -> str | None:
    """None when CuPy imports and sees a CUDA device, else why not (one line)."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install raising on import
        return f"CuPy is not importable ({type(exc).__name__}: {exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"CuPy sees no CUDA device ({type(exc).__name__}: {exc})"
    if count < 1:
        return "CuPy sees no CUDA device"
    return None


def device_name() -> str:
    """Name of the current CUDA device (call only when available)."""
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def _cuml_neighbors():
    """``cuml.neighbors.NearestNeighbors``, or None with the reason it did not import."""
    try:
        from cuml.neighbors import NearestNeighbors
    except Exception as exc:  # not installed, or a cuML/CUDA mismatch raising on import
        return None, f"{type(exc).__name__}: {exc}"
    return NearestNeighbors, None


def make_backend(engine: str | None = None) -> Backend:
    """The GPU :class:`~gpugroup.backends.Backend`.

    Parameters
    ----------
    engine : {"auto", "cuml", "cupy"} or None
        Candidate engine. None reads ``$GPUGROUP_GPU_ENGINE`` (default ``"auto"``: cuML
        when importable, else the CuPy-native grid engine).

    Raises
    ------
    RuntimeError
        CuPy or a CUDA device is missing, or ``engine="cuml"`` without cuML; the message
        says what to install.
    ValueError
        An unknown engine name.

    Examples
    --------
    >>> from gpugroup.backends import gpu
    >>> be = gpu.make_backend("cupy")  # doctest: +SKIP
    >>> be.description  # doctest: +SKIP
    'CuPy + CuPy-native grid kNN'
    """
    if engine is None:
        engine = os.environ.get(ENGINE_ENV, "auto").strip().lower() or "auto"
    if engine not in ENGINES:
        raise ValueError(f"GPU engine must be one of {ENGINES}, got engine={engine!r} "
                         f"(from the argument or ${ENGINE_ENV})")
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"backend='gpu' is not available: {reason}. Install: {INSTALL_HINT}")
    import cupy

    from gpugroup.backends.engines import GridIndex, NeighborsIndex, cuml_algorithm

    nn_class = None
    if engine in ("auto", "cuml"):
        nn_class, why = _cuml_neighbors()
        if nn_class is None and engine == "cuml":
            raise RuntimeError(f"GPU engine 'cuml' needs cuML, which did not import ({why}). "
                               f"Install: {INSTALL_HINT}; or use engine='cupy'")
        if nn_class is None:
            logger.info("GPU engine: cuML not importable (%s); using the CuPy-native grid engine",
                        why)
    if nn_class is not None:
        build = functools.partial(NeighborsIndex, xp=cupy, nn_class=nn_class,
                                  algorithm=cuml_algorithm)
        description = "CuPy + cuML NearestNeighbors"
    else:
        build = functools.partial(GridIndex, xp=cupy)
        description = "CuPy + CuPy-native grid kNN"
    logger.info("GPU backend on %s: %s", device_name(), description)
    return Backend(name="gpu", xp=cupy, build_index=build, asnumpy=cupy.asnumpy,
                   description=description)
