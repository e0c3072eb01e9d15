"""Backend dispatch: turn ``"auto" | "cpu" | "gpu"`` into a :class:`Backend`.

A backend is an array namespace ``xp`` plus a way to build a candidate-kNN index over a
point set. The grouping algorithm (``gpugroup.grouping``) is written once against that
pair. Only ``backends/gpu.py`` imports CuPy or cuML, and only when it is asked for.

The candidate-index contract (shared by every engine)::

    index = backend.build_index(x, y)     # x, y: xp float64 arrays of one point set
    index.n                               # number of points
    cand, floor = index.query(rows, kq)   # rows: xp int64 local point numbers, kq <= n
    # cand:  (len(rows), kq) xp int64, distinct point numbers (the engine's kq nearest)
    # floor: (len(rows),)    xp float64, every point NOT in cand[r] has exact
    #        float64 squared distance >= floor[r] to point rows[r]

    index.stacked                         # optional hint: True when some position holds
                                          # many points (queries of it would be as wide)

Engines only propose candidates; ``grouping.neighbour_pool`` re-ranks them exactly (and
takes rows on stacks of duplicates from the stack, with the same result, when ``stacked``
or its own probe says so).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

logger = logging.getLogger(__name__)

BACKEND_NAMES = ("auto", "cpu", "gpu")


@dataclass(frozen=True)
class Backend:
    """An array namespace and a candidate-kNN index builder."""

    name: str
    xp: Any
    build_index: Callable[[Any, Any], Any]
    asnumpy: Callable[[Any], np.ndarray]
    description: str = ""
    #: Optional fused kernels for assembly (see ``gpu.AssemblyKernels``); None: plain xp.
    kernels: Any = None


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
        from gpugroup.backends import cpu

        return cpu.BACKEND
    from gpugroup.backends import gpu

    if name == "gpu":
        return gpu.make_backend()
    reason = gpu.unavailable_reason()
    if reason is None:
        logger.info("backend='auto': using the GPU (%s)", gpu.device_name())
        return gpu.make_backend()
    logger.info("backend='auto': using the CPU (%s)", reason)
    from gpugroup.backends import cpu

    return cpu.BACKEND


def available_backends() -> dict[str, str]:
    """Map each backend name to ``"available: ..."`` or the reason it is not."""
    from gpugroup.backends import cpu, gpu

    reason = gpu.unavailable_reason()
    return {
        "cpu": f"available: {cpu.BACKEND.description}",
        "gpu": f"available: {gpu.device_name()}" if reason is None else f"unavailable: {reason}",
    }
