"""Backend dispatch: turn ``"auto" | "cpu" | "gpu"`` into a :class:`Backend`.

A backend is an array namespace ``xp`` plus a way to build a candidate-kNN index over a
point set (the contract is in :mod:`gpugroup.backends.base`). The grouping algorithm
(``gpugroup.grouping``) is written once against that pair. Only ``backends/gpu.py`` and
``backends/engines.py`` touch CuPy or cuML, and only when a GPU backend is asked for.
"""

from __future__ import annotations

import logging

from gpugroup.backends import cpu, gpu
from gpugroup.backends.base import Backend

logger = logging.getLogger(__name__)

BACKEND_NAMES = ("auto", "cpu", "gpu")


def get_backend(name: str | Backend = "auto") -> Backend:
    """Resolve a backend name.

    Parameters
    ----------
    name : {"auto", "cpu", "gpu"} or Backend
        ``auto`` picks the GPU when CuPy imports and sees a device, else the CPU, and logs
        the choice.

    Raises
    ------
    ValueError
        For an unknown name.
    RuntimeError
        For ``"gpu"`` when CuPy or a CUDA device is missing (the message says what to
        install).
    """
    if isinstance(name, Backend):
        return name
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got backend={name!r}")
    if name == "cpu":
        return cpu.BACKEND
    if name == "gpu":
        return gpu.make_backend()
    reason = gpu.unavailable_reason()
    if reason is None:
        logger.info("backend='auto': using the GPU (%s)", gpu.device_name())
        return gpu.make_backend()
    logger.info("backend='auto': using the CPU (%s)", reason)
    return cpu.BACKEND


def available_backends() -> dict[str, str]:
    """Map each backend name to ``"available: ..."`` or the reason it is not."""
    reason = gpu.unavailable_reason()
    return {
        "cpu": f"available: {cpu.BACKEND.description}",
        "gpu": f"available: {gpu.device_name()}" if reason is None else f"unavailable: {reason}",
    }
