"""GPU backend: CuPy arrays with cuML (or CuPy-native) kNN candidates.

Nothing here imports CuPy or cuML at module import; they load when a GPU backend is asked
for. The grouping itself (keys, seeds, the exact float64 re-rank, members) is the generic
code of :mod:`gpugroup.grouping` run with ``xp = cupy``; this module only picks the
candidate engine (:mod:`gpugroup.backends.engines`):

* ``"cuml"``: ``cuml.neighbors.NearestNeighbors`` (``rbc`` while kq <= 1024 and
  kq <= sqrt(n), else ``brute``; ``output_type="cupy"``) on float32 coordinates centred in
  float64, with a rigorous error bound on its float32 distances
  (:class:`~gpugroup.backends.engines.NeighborsIndex`).
* ``"cupy"``: the CuPy-native exact uniform-grid engine
  (:class:`~gpugroup.backends.engines.GridIndex`).
* ``"fused"``: the same grid, whose pools (K <= 33) come from one CUDA kernel per grid
  level (:mod:`gpugroup.backends.fused_pool`); rows it cannot settle take the ``cupy``
  path. Same groups; checked in CI by running the kernel as host C++.
* ``"auto"`` (default): the CuPy-native grid engine, the one verified on a device (an
  H200: groups identical to the CPU's up to n = 1e7). cuML, or the fused pool, becomes
  ``auto``'s choice only once a run on a device records it identical and faster
  (:data:`CUML_VERIFIED`, :data:`FUSED_VERIFIED`); until then ask for it by name. The
  choice is logged.

Pick one with ``make_backend(engine=...)`` or the environment variable
``GPUGROUP_GPU_ENGINE`` (read by ``backend="gpu"`` / ``"auto"``).

Memory per batch: ``grouping`` queries at most ``batch_rows`` seeds at a time (default
2**16) and bounds its (rows x kq) blocks at 2**23 entries. The grid engine's index takes
32-48 bytes per position and grid level (one level for a uniform scan, a few where the
density varies, at most 12); each query chunk needs about 100 bytes per (row, block
member) slot, at most 2**22 slots (~420 MB). The fused pool takes 2**20 seeds per call,
about 16 K + 60 bytes each (its pools, their copy into the result, the rows' cell order). The cuML adapter
keeps a float32 copy of the positions (8 bytes each) beside cuML's index and holds
``batch_rows * kq * 12`` bytes of cuML output per call plus cuML's own tiled workspace.

Device output and PyTorch: ``sample_groups(..., backend="gpu", output="device")`` returns
a ``cupy.ndarray`` that stays on the GPU; hand it to PyTorch without a copy through DLPack:
``torch.from_dlpack(cupy_array)`` (same memory; ``cupy.from_dlpack(tensor)`` goes back).

Assembly: :class:`AssemblyKernels` (``Backend.kernels``) fuses the bandwidth-bound steps
of :mod:`gpugroup.assembly` for device frames; where a kernel does not apply, the plain
CuPy operations run, with the same values.

Status: ``pytest -m gpu`` and ``benchmarks/gpu_check.sh`` ran on an NVIDIA H200 (CuPy
14.2, CUDA 13; CuPy-native engine, since cuML was not installed there): all GPU tests
passed, groups identical to the CPU's at n up to 1e7 (README, Performance). cuML itself
has not run on a device, nor have the fused pool and coordinates kernels (their logic runs
in CI as host C++, ``tests/hostcuda.py``). In CI the engines run with ``xp = numpy`` (the cuML adapter with
scikit-learn's ``NearestNeighbors`` in cuML's place), and the GPU path on
``tests/devicelike.py``, a NumPy stand-in for CuPy that enforces CuPy's host/device rules
(the compiled kernels need a real device).
"""

from __future__ import annotations

import functools
import logging
import os

import numpy as np

from gpugroup.backends.base import Backend
from gpugroup.backends import fused_pool
from gpugroup.backends.engines import GridIndex, NeighborsIndex, cuml_algorithm

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "pip install 'gpugroup[cu12]' (CUDA 12) or 'gpugroup[cu13]' (CUDA 13), "
    "or create the conda environment from environment.yml"
)
#: Environment variable that picks the GPU candidate engine: auto | cuml | cupy | fused.
ENGINE_ENV = "GPUGROUP_GPU_ENGINE"
ENGINES = ("auto", "cuml", "cupy", "fused")
#: Whether a run on a device has recorded the cuML engine as giving groups identical to the
#: CPU's and grouping faster than the grid engine (``benchmarks/gpu_check.sh``, results in
#: ``benchmarks/results``). While False, ``engine="auto"`` takes the grid engine.
CUML_VERIFIED = False
#: The same for the fused pool kernel against the plain grid engine. While False,
#: ``engine="auto"`` leaves it out.
FUSED_VERIFIED = False
NVRTC_HINT = (
    "install NVRTC, the CUDA runtime compiler CuPy builds its kernels with: "
    "pip install 'cupy-cuda12x[ctk]' (or 'gpugroup[cu12]'; [cu13] for CUDA 13), "
    "or conda install cuda-nvrtc"
)


def unavailable_reason() -> str | None:
    """None when CuPy imports, sees a CUDA device and loads NVRTC, else why not (one line).

    NVRTC is probed because CuPy 14 loads it only at the first kernel compile: without the
    probe, ``backend="auto"`` would pick the GPU on a machine without NVRTC and then fail.
    """
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
    try:
        cupy.cuda.nvrtc.getVersion()  # loads the library (CuPy 14 defers that)
    except Exception as exc:
        return f"CuPy cannot load NVRTC ({type(exc).__name__}: {exc}); {NVRTC_HINT}"
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
    engine : {"auto", "cuml", "cupy", "fused"} or None
        Candidate engine. None reads ``$GPUGROUP_GPU_ENGINE`` (default ``"auto"``: the
        CuPy-native grid engine, until cuML or the fused pool is recorded identical and
        faster on a device; see :data:`CUML_VERIFIED`, :data:`FUSED_VERIFIED`).

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

    nn_class, fused = None, engine == "fused"
    if engine == "cuml" or (engine == "auto" and CUML_VERIFIED):
        nn_class, why = _cuml_neighbors()
        if nn_class is None and engine == "cuml":
            raise RuntimeError(f"GPU engine 'cuml' needs cuML, which did not import ({why}). "
                               f"Install: {INSTALL_HINT}; or use engine='cupy'")
        if nn_class is None:
            logger.info("GPU engine: cuML not importable (%s); using the CuPy-native grid engine",
                        why)
    if engine == "auto":
        fused = nn_class is None and FUSED_VERIFIED
        if not (CUML_VERIFIED and FUSED_VERIFIED):
            logger.info("GPU engine 'auto': the engine verified on a device (engines not yet "
                        "recorded identical and faster there: engine='cuml' or 'fused', or "
                        "$%s, asks for them)", ENGINE_ENV)
    if nn_class is not None:
        build = functools.partial(NeighborsIndex, xp=cupy, nn_class=nn_class,
                                  algorithm=cuml_algorithm,
                                  model_kwargs={"output_type": "cupy"})
        description = "CuPy + cuML NearestNeighbors"
    elif fused:
        build = functools.partial(GridIndex, xp=cupy, pool_kernel=_fused_pool(cupy))
        description = "CuPy + CuPy-native grid kNN, fused pool kernel"
    else:
        build = functools.partial(GridIndex, xp=cupy)
        description = "CuPy + CuPy-native grid kNN"
    logger.info("GPU backend on %s: %s", device_name(), description)
    return Backend(name="gpu", xp=cupy, build_index=build, asnumpy=cupy.asnumpy,
                   description=description,
                   kernels=_assembly_kernels(cupy))


@functools.lru_cache(maxsize=None)
def _fused_pool(cupy):
    """One :class:`~gpugroup.backends.fused_pool.FusedPool` per CuPy module, compiled by
    NVRTC on first use per pool width (so compiled kernels outlive each backend)."""
    def compile(name):
        return cupy.RawModule(code=fused_pool.SOURCE, options=fused_pool.NVRTC_OPTIONS,
                              name_expressions=[name]).get_function(name)

    return fused_pool.FusedPool(cupy, compile)


# ----------------------------------------------------------------------------- assembly
#: C types of the frame dtypes the fused kernels take (others use plain CuPy operations).
_C_TYPES = {"float32": "float", "float64": "double", "uint8": "unsigned char",
            "int8": "signed char", "uint16": "unsigned short", "int16": "short",
            "uint32": "unsigned int", "int32": "int", "uint64": "unsigned long long",
            "int64": "long long"}
#: Most pixels (output rows) gathered per launch, so 32-bit tile numbers suffice inside.
_GATHER_LAUNCH = 1 << 30

_KERNELS = r"""
typedef unsigned long long u64;
template <typename T, int C> struct Row { T v[C]; };
template <typename T, int C> struct alignas(sizeof(Row<T, C>)) Vec { T v[C]; };

// out[g, p, c] = stack[nn[g, c], p] and, for X, its float32 product with `scale` computed
// in M as NumPy's multiply does. Blocks of 256 threads; a block takes one tile of P * 256
// pixels of one group, a thread P pixels 256 apart: every load (256 consecutive pixels of a
// frame) and every store (256 consecutive C-wide output rows, vector stores when VEC) is
// contiguous across the block, and each thread keeps P * C loads in flight.
template <typename T, typename I, typename M, int C, int P, bool D, bool X, bool VEC>
__global__ void gather_channel_last(const T* __restrict__ stack, const I* __restrict__ nn,
                                    T* __restrict__ out_d, float* __restrict__ out_x,
                                    M scale, unsigned int npix, unsigned int tiles,
                                    unsigned int units) {
    for (unsigned int u = blockIdx.x; u < units; u += gridDim.x) {
        unsigned int g = u / tiles;
        u64 p0 = (u64)(u - g * tiles) * (P * 256) + threadIdx.x;
        Row<T, C> v[P];
#pragma unroll
        for (int c = 0; c < C; ++c) {
            const T* frame = stack + (u64)nn[(u64)g * C + c] * npix;
#pragma unroll
            for (int k = 0; k < P; ++k)
                if (p0 + k * 256 < npix) v[k].v[c] = frame[p0 + k * 256];
        }
#pragma unroll
        for (int k = 0; k < P; ++k) {
            u64 p = p0 + k * 256;
            if (p >= npix) break;
            Row<float, C> x;
#pragma unroll
            for (int c = 0; c < C; ++c) x.v[c] = (float)((M)v[k].v[c] * scale);
            u64 o = ((u64)g * npix + p) * C;
            if constexpr (VEC) {  // C * sizeof a power of 2, outputs aligned to it
                if constexpr (D) *reinterpret_cast<Vec<T, C>*>(out_d + o) = *reinterpret_cast<Vec<T, C>*>(&v[k]);
                if constexpr (X) *reinterpret_cast<Vec<float, C>*>(out_x + o) = *reinterpret_cast<Vec<float, C>*>(&x);
            } else {
#pragma unroll
                for (int c = 0; c < C; ++c) {
                    if constexpr (D) out_d[o + c] = v[k].v[c];
                    if constexpr (X) out_x[o + c] = x.v[c];
                }
            }
        }
    }
}

// out[f] = sum_p double(stack[idx[f], p])**2; one block of 256 threads per frame, P-pixel
// aligned loads.
template <typename T, typename I, int P>
__global__ void frame_energies(const T* __restrict__ stack, const I* __restrict__ idx,
                               double* __restrict__ out, unsigned int npix) {
    const Vec<T, P>* frame = reinterpret_cast<const Vec<T, P>*>(stack + (u64)idx[blockIdx.x] * npix);
    double acc = 0.0;
    for (unsigned int q = threadIdx.x; q < npix / P; q += blockDim.x) {
        Vec<T, P> v = frame[q];
#pragma unroll
        for (int k = 0; k < P; ++k) {
            double d = (double)v.v[k];
            acc += d * d;
        }
    }
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
    __shared__ double warp_sums[8];
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        double total = 0.0;
        for (int w = 0; w < 8; ++w) total += warp_sums[w];
        out[blockIdx.x] = total;
    }
}
"""


#: The coordinate entries of DESIGN.md section 2 in one kernel. Plain C++ with CUDA words
#: only (one thread per item, no shared memory), so that the tests can run it as host C++.
COORDINATES_SOURCE = r"""
// For group g and role r (0: x, 1: y, 2: x start, 3: y start) of B groups of C members:
// nn_out[p][g, 0, a, c] = coord_r[nn[g, c]], off_out[p][g, 0, a, 0] = their mean (a sum in
// member order, then / C) and rel_out[p][g, 0, a, c] = -(nn_out - off_out), with prefix
// p = r / 2 (coords, coords_start) and axis a = r % 2. One thread per (g, r).
template <typename I>
__global__ void group_coordinates(const I* __restrict__ nn, const double* __restrict__ x,
                                  const double* __restrict__ y, const double* __restrict__ xs,
                                  const double* __restrict__ ys, long long B, int C,
                                  double* __restrict__ nn0, double* __restrict__ off0,
                                  double* __restrict__ rel0, double* __restrict__ nn1,
                                  double* __restrict__ off1, double* __restrict__ rel1) {
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= 4 * B) return;
    const long long g = t >> 2;
    const int r = (int)(t & 3), a = r & 1;
    const double* src = r == 0 ? x : r == 1 ? y : r == 2 ? xs : ys;
    double* nn_out = r < 2 ? nn0 : nn1;
    double* off_out = r < 2 ? off0 : off1;
    double* rel_out = r < 2 ? rel0 : rel1;
    const I* members = nn + g * C;
    double sum = 0.0;
    for (int c = 0; c < C; ++c) sum = sum + src[members[c]];
    const double off = sum / (double)C;
    off_out[2 * g + a] = off;
    const long long o = (2 * g + a) * C;
    for (int c = 0; c < C; ++c) {
        const double v = src[members[c]];
        nn_out[o + c] = v;
        rel_out[o + c] = -(v - off);
    }
}
"""


@functools.lru_cache(maxsize=None)
def _assembly_kernels(cupy):
    """One :class:`AssemblyKernels` per CuPy module (None for a stand-in without
    ``RawModule``), so compiled kernels outlive each backend object."""
    return AssemblyKernels(cupy) if hasattr(cupy, "RawModule") else None


class AssemblyKernels:
    """Fused CUDA kernels for the bandwidth-bound steps of assembly, compiled on first use
    (with ``--fmad=false``, like any custom kernel here) per dtype combination.

    ``gather_channel_last`` reads each gathered frame once and writes ``diffraction``
    and ``X_full`` channel-last in the same pass (the plain CuPy path takes three: gather,
    transpose, scale); ``frame_energies`` sums squares in float64 straight from the
    stack; ``group_coordinates`` writes the six coordinate entries in one launch (the
    plain path takes about twenty small ones). Each returns False (None), touching
    nothing, when it does not apply (a frame dtype without a C type, non-contiguous
    arrays); the caller then runs the plain ``xp`` operations, which give the same values
    (the coordinate offsets within the last bits: their means sum in another order).
    Outputs not aligned for vector stores take element-wise stores.
    """

    #: Pixels each thread of the gather moves (256 apart); only speed depends on it.
    pixels_per_thread = 4

    def __init__(self, cupy):
        self.cupy = cupy
        self._functions = {}

    def _function(self, name):
        if name not in self._functions:
            module = self.cupy.RawModule(code=_KERNELS + COORDINATES_SOURCE,
                                         options=fused_pool.NVRTC_OPTIONS,
                                         name_expressions=[name])
            self._functions[name] = module.get_function(name)
        return self._functions[name]

    def _usable(self, *arrays):
        return all(isinstance(a, self.cupy.ndarray) and a.flags.c_contiguous for a in arrays)

    def gather_channel_last(self, stack, nn, scale, out_d=None, out_x=None) -> bool:
        """``out_d[g] = stack[nn[g]]`` moved to (N, N, C) and ``out_x[g]`` = that times
        ``scale`` as float32, like :func:`gpugroup.assembly.gather_channel_last`."""
        cp = self.cupy
        T, I = _C_TYPES.get(stack.dtype.name), _C_TYPES.get(nn.dtype.name)
        outs = [a for a in (out_d, out_x) if a is not None]
        if (T is None or nn.dtype.kind != "i" or I is None or not outs
                or not self._usable(stack, nn, *outs) or (out_x is not None) != (scale is not None)
                or (out_d is not None and out_d.dtype != stack.dtype)
                or (out_x is not None and out_x.dtype != np.float32)):
            return False
        B, C = int(nn.shape[0]), int(nn.shape[1])
        npix = int(np.prod(stack.shape[1:]))
        if B == 0:
            return True
        m = np.result_type(stack.dtype, np.float32)  # the type NumPy multiplies in
        row = C * stack.dtype.itemsize
        vec = (row & (row - 1) == 0 and row <= 16 and C * 4 <= 16
               and all(a.data.ptr % (C * a.dtype.itemsize) == 0 for a in outs))
        P = self.pixels_per_thread
        name = (f"gather_channel_last<{T}, {I}, {_C_TYPES[m.name]}, {C}, {P}, "
                f"{str(out_d is not None).lower()}, {str(out_x is not None).lower()}, "
                f"{str(vec).lower()}>")
        fn = self._function(name)
        d = out_d if out_d is not None else outs[0]
        x = out_x if out_x is not None else cp.empty(0, cp.float32)
        s = m.type(0 if scale is None else scale)
        tiles = -(-npix // (P * 256))
        step = max(1, _GATHER_LAUNCH // (tiles * P * 256))  # groups per launch
        for a in range(0, B, step):
            units = (min(B, a + step) - a) * tiles
            fn((min(units, 1 << 20),), (256,),
               (stack, nn[a:], d[a:], x[a:] if out_x is not None else x, s, np.uint32(npix),
                np.uint32(tiles), np.uint32(units)))
        return True

    def group_coordinates(self, nn, arrays):
        """The six coordinate entries of :func:`gpugroup.assembly.group_coordinates` for
        groups ``nn`` (B, C) from the four device coordinate arrays ``arrays`` (x, y,
        x start, y start; float64), or None when the kernel does not apply."""
        cp = self.cupy
        I = _C_TYPES.get(nn.dtype.name)
        if (nn.dtype.kind != "i" or I is None or nn.ndim != 2 or not self._usable(nn, *arrays)
                or any(a.dtype != cp.float64 or a.ndim != 1 for a in arrays)):
            return None
        B, C = int(nn.shape[0]), int(nn.shape[1])
        out = {}
        for prefix in ("coords", "coords_start"):
            out[f"{prefix}_nn"] = cp.empty((B, 1, 2, C), dtype=cp.float64)
            out[f"{prefix}_offsets"] = cp.empty((B, 1, 2, 1), dtype=cp.float64)
            out[f"{prefix}_relative"] = cp.empty((B, 1, 2, C), dtype=cp.float64)
        if B and C:
            fn = self._function(f"group_coordinates<{I}>")
            fn(((4 * B + 255) // 256,), (256,), (nn, *arrays, np.int64(B), np.int32(C),
                                                 *out.values()))
        return out

    def frame_energies(self, stack, idx):
        """float64 ``sum(stack[i]**2)`` for each ``i`` in ``idx``, or None when the kernel
        does not apply."""
        cp = self.cupy
        T, I = _C_TYPES.get(stack.dtype.name), _C_TYPES.get(idx.dtype.name)
        if T is None or I is None or idx.dtype.kind != "i" or not self._usable(stack, idx):
            return None
        out = cp.empty(int(idx.shape[0]), dtype=cp.float64)
        if out.size:
            npix = int(np.prod(stack.shape[1:]))
            # aligned 4-pixel loads when every frame starts on a 4-pixel boundary
            P = 4 if npix % 4 == 0 and stack.data.ptr % (4 * stack.dtype.itemsize) == 0 else 1
            fn = self._function(f"frame_energies<{T}, {I}, {P}>")
            fn((int(idx.shape[0]),), (256,), (stack, idx, out, np.uint32(npix)))
        return out
