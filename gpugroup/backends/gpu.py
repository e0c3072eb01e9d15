"""GPU backend: CuPy arrays with cuML (or CuPy-native) candidates.

Nothing here imports CuPy or cuML at module import; they load when a GPU backend is asked
for.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "pip install 'gpugroup[cu12]' (CUDA 12) or 'gpugroup[cu13]' (CUDA 13), "
    "or create the conda environment from environment.yml"
)


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


def make_backend():
    """The GPU :class:`~gpugroup.backends.Backend`; raises with an install hint if missing."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"backend='gpu' is not available: {reason}. Install: {INSTALL_HINT}")
    raise NotImplementedError("the GPU engine lands with issue 3")
