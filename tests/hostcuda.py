"""Run a one-thread-per-item CUDA kernel on the host: the logic of a GPU kernel in CI.

The kernel source is compiled as C++17 by the host compiler (``g++``, ``-ffp-contract=off``
like ``nvcc --fmad=false``; x86-64 doubles are IEEE) behind a prelude that defines the
few CUDA words such a kernel uses (``__global__``, ``__device__``, ``blockIdx``...), and
one ``extern "C"`` launcher per instantiation runs every (block, thread) in turn, taking
the arguments the way ``cuLaunchKernel`` does (an array of pointers to them). Kernels
that use shared memory, warp intrinsics or barriers cannot run here.

:func:`host_compiler` is None where no compiler is found (tests skip with that reason).
:class:`HostModule` gives what ``cupy.RawModule(...).get_function(name)`` gives: a
function called as ``f((blocks,), (threads,), args)`` with NumPy arrays (or devicelike
arrays, unwrapped) and NumPy scalars.
"""

from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np

PRELUDE = r"""
#define GG_HOST 1
#include <cmath>
#include <cstddef>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#define GG_INF (std::numeric_limits<double>::infinity())
#define __global__
#define __device__
#define __forceinline__ inline
struct gg_dim3 { unsigned int x; };
static gg_dim3 threadIdx, blockIdx, blockDim, gridDim;
using std::fabs; using std::floor; using std::fmax; using std::fmin;
"""

LAUNCHER = r"""
template <typename... A, std::size_t... I>
static void gg_call(void (*k)(A...), void** argv, std::index_sequence<I...>) {
    k(*static_cast<std::remove_cv_t<A>*>(argv[I])...);
}
template <typename... A>
static void gg_launch(void (*k)(A...), unsigned int grid, unsigned int block, void** argv) {
    gridDim.x = grid; blockDim.x = block;
    for (unsigned int b = 0; b < grid; ++b) {
        blockIdx.x = b;
        for (unsigned int t = 0; t < block; ++t) {
            threadIdx.x = t;
            gg_call(k, argv, std::index_sequence_for<A...>{});
        }
    }
}
template <typename... A>
static constexpr int gg_count(void (*)(A...)) { return sizeof...(A); }
extern "C" int gg_arity() { return gg_count(&KERNEL); }
// Each parameter's type as a number: 10 * size + kind (1 integer, 2 floating, 3 bool),
// plus 1000 for a pointer to such a type, so that the caller can check its arguments.
template <typename T>
static constexpr int gg_kind() {
    return std::is_same<T, bool>::value ? 3 : std::is_floating_point<T>::value ? 2 : 1;
}
template <typename T>
static constexpr int gg_code() {
    using P = std::remove_cv_t<std::remove_pointer_t<T>>;
    return (std::is_pointer<T>::value ? 1000 : 0) + 10 * (int)sizeof(P) + gg_kind<P>();
}
template <typename... A>
static void gg_fill(void (*)(A...), int* out) {
    int i = 0;
    ((out[i++] = gg_code<std::remove_cv_t<A>>()), ...);
}
extern "C" void gg_codes(int* out) { gg_fill(&KERNEL, out); }
extern "C" void gg_run(unsigned int grid, unsigned int block, void** argv) {
    gg_launch(&KERNEL, grid, block, argv);
}
"""

_SCALARS = {np.dtype(np.float64): ctypes.c_double, np.dtype(np.float32): ctypes.c_float,
            np.dtype(np.int64): ctypes.c_longlong, np.dtype(np.int32): ctypes.c_int,
            np.dtype(np.uint32): ctypes.c_uint, np.dtype(np.uint64): ctypes.c_ulonglong}


def host_compiler() -> str | None:
    return shutil.which("g++") or shutil.which("clang++")


class HostModule:
    """``source`` compiled on the host, one shared library per kernel instantiation,
    cached in ``workdir`` by the hash of what it compiles."""

    def __init__(self, source: str, workdir: Path):
        self.source, self.workdir = source, Path(workdir)
        self.compiler = host_compiler()
        if self.compiler is None:
            raise RuntimeError("no host C++ compiler (g++ or clang++) found")

    def get_function(self, name: str):
        text = PRELUDE + self.source + LAUNCHER.replace("KERNEL", name)
        tag = hashlib.sha256(text.encode()).hexdigest()[:16]
        lib = self.workdir / f"kernel-{tag}.so"
        if not lib.exists():
            src = self.workdir / f"kernel-{tag}.cpp"
            src.write_text(text)
            subprocess.run([self.compiler, "-std=c++17", "-O2", "-ffp-contract=off",
                            "-fno-fast-math", "-fPIC", "-shared", "-Wno-unknown-pragmas",
                            str(src), "-o", str(lib)], check=True, capture_output=True,
                           text=True)
        so = ctypes.CDLL(str(lib))
        arity = so.gg_arity()
        codes = (ctypes.c_int * arity)()
        so.gg_codes(codes)
        run = so.gg_run
        run.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p)]
        run.restype = None

        def launch(grid, block, args):
            if len(args) != arity:
                raise TypeError(f"{name} takes {arity} arguments, got {len(args)}")
            keep = []
            for i, a in enumerate(args):
                a = getattr(a, "_a", a)  # a devicelike array: its NumPy data
                array = isinstance(a, np.ndarray)
                dtype = a.dtype if array else np.asarray(a).dtype
                code = 1000 * array + 10 * dtype.itemsize + {"b": 3, "f": 2}.get(dtype.kind, 1)
                if code != codes[i]:  # what would read garbage on a GPU
                    raise TypeError(f"{name}: argument {i} is {'an array of ' * array}{dtype}, "
                                    f"which does not match the kernel's parameter (code "
                                    f"{codes[i]}, got {code})")
                if array:
                    if not a.flags.c_contiguous:
                        raise ValueError(f"{name}: arguments must be C-contiguous")
                    keep.append(ctypes.c_void_p(a.ctypes.data))
                else:
                    keep.append(_SCALARS[dtype](a))
            argv = (ctypes.c_void_p * len(keep))(*[ctypes.addressof(k) for k in keep])
            run(int(grid[0]), int(block[0]), argv)

        return launch
