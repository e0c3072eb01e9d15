"""Shared machinery of the gpugroup benchmarks: machine info, synthetic scans, memory
warm-up, peak-memory measurement and the one-subprocess-per-method protocol.

Each measured method runs in a fresh Python process (``python -m benchmarks.<script>
--worker SPEC``) so that its peak RSS is its own. Inside the worker:

1. the inputs are built (not measured), and the method runs once on a tiny input so
   that lazy imports and one-time initialisation happen outside the measurement.
2. memory is warmed: a few GiB are allocated, every page touched, and freed. On the
   virtual machines we use, the first touch of guest memory the host has not backed
   (never used, or handed back after being freed for a few seconds) is ~10x slower
   than reusing it; without this step a benchmark measures the hypervisor.
3. right after, one call measured for peak memory: the RSS high-water mark minus the
   RSS before the call (``VmHWM`` reset through ``/proc/self/clear_refs``; a 1 ms
   sampling thread where that is not possible). Its time is reported as the first call
   on fresh pages (page faults and the VM's first-touch cost included).
4. glibc malloc is then told to keep freed memory (:func:`retain_heap`), memory is
   warmed once more, and the timed calls reuse already-touched pages: the best of them
   is the reported time (compute and memory bandwidth, no page faults);
5. one call under ``tracemalloc`` (Python allocations, NumPy buffers included; memory a
   C/C++ extension allocates itself, e.g. the cKDTree nodes, is not seen by it).
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np

from gpugroup.simulate import jittered_scan  # noqa: F401  (shared scan helper)

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
MiB = 1 << 20
GiB = 1 << 30
RESULT_PREFIX = "BENCHMARK-RESULT "


# ----------------------------------------------------------------------------- machine
def _meminfo() -> dict:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return {}
    return {m.group(1): int(m.group(2)) * 1024
            for m in re.finditer(r"^(\w+):\s+(\d+) kB", text, re.M)}


def available_memory() -> int:
    info = _meminfo()
    if "MemAvailable" in info:
        return info["MemAvailable"]
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return 8 * GiB


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def gpu_status() -> str:
    """``available_backends()["gpu"]`` (a line starting with "available" or "unavailable")."""
    try:
        from gpugroup.backends import available_backends

        return available_backends()["gpu"]
    except Exception as exc:  # a broken CUDA stack must not stop a CPU benchmark
        return f"unavailable: {type(exc).__name__}: {exc}"


def gpu_available() -> bool:
    return gpu_status().startswith("available")


def machine_info() -> dict:
    import scipy

    import gpugroup

    mem = _meminfo()
    info = {
        "cpu_model": cpu_model(),
        "cores_usable": usable_cores(),
        "cpu_count": os.cpu_count(),
        "ram_bytes": mem.get("MemTotal"),
        "ram_gib": round(mem.get("MemTotal", 0) / GiB, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "gpugroup": getattr(gpugroup, "__version__", "?"),
        "gpu": gpu_status(),
        "hostname": platform.node(),
        "date": _dt.date.today().isoformat(),
    }
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
            timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "gpugroup"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        info["gpugroup_tree_dirty"] = bool(dirty)
    except Exception:
        info["git_commit"] = None
    return info


def machine_tag(info: dict) -> str:
    """A short file-name tag: ``<cores>c-<cpu model slug>`` (+ the GPU when present)."""
    slug = re.sub(r"\(r\)|\(tm\)|cpu|processor|@.*$", "", info["cpu_model"].lower())
    slug = re.sub(r"[^a-z0-9]+", "-", slug).strip("-")[:24] or "cpu"
    tag = f"{info['cores_usable']}c-{slug}"
    if info["gpu"].startswith("available"):
        gpu = re.sub(r"[^a-z0-9]+", "-", info["gpu"].split(":", 1)[1].lower()).strip("-")
        tag += f"-{gpu[:24]}"
    return tag


def result_paths(kind: str, info: dict, out_dir=None, machine=None):
    out = Path(out_dir) if out_dir else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{kind}-{machine or machine_tag(info)}-{info['date']}"
    return out / f"{stem}.md", out / f"{stem}.json", out / f"{stem}.png"


def machine_line(info: dict) -> str:
    return (f"{info['cpu_model']}, {info['cores_usable']} cores, {info['ram_gib']} GiB RAM; "
            f"Python {info['python']}, NumPy {info['numpy']}, SciPy {info['scipy']}, "
            f"gpugroup {info['gpugroup']} (commit {info.get('git_commit')}"
            f"{', gpugroup/ modified' if info.get('gpugroup_tree_dirty') else ''}); "
            f"GPU: {info['gpu']}")


# ----------------------------------------------------------------------------- inputs


def diffraction_stack(n: int, N: int, seed: int = 0) -> np.ndarray:
    """(n, N, N) float32 non-negative amplitudes (random; the content does not matter)."""
    return np.random.default_rng(seed).random((n, N, N), dtype=np.float32)


def probe(N: int) -> np.ndarray:
    return np.ones((N, N), dtype=np.complex64)


# ----------------------------------------------------------------------------- memory
def warm_memory(gib: float) -> float:
    """Allocate ``gib`` GiB, touch every page, free it; returns the seconds it took."""
    if gib <= 0:
        return 0.0
    t = time.perf_counter()
    a = np.empty(int(gib * GiB), dtype=np.uint8)
    a[::4096] = 1
    del a
    gc.collect()
    return time.perf_counter() - t


def _status_kib(field: str):
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def current_rss() -> int | None:
    rss = _status_kib("VmRSS")
    if rss is None:
        try:
            import psutil

            rss = int(psutil.Process().memory_info().rss)
        except ImportError:
            pass
    return rss


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


class PeakRSS:
    """RSS high-water mark of a block, minus the RSS before it (bytes)."""

    def __enter__(self):
        gc.collect()
        self.exact = _reset_hwm()
        self.before = current_rss()
        self.peak = self.before
        if not self.exact:  # sample instead (misses spikes shorter than ~1 ms)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            rss = current_rss()
            if rss is not None and rss > self.peak:
                self.peak = rss
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.exact:
            self.peak = _status_kib("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
            rss = current_rss()
            if rss is not None and self.peak is not None:
                self.peak = max(self.peak, rss)
        self.extra = None if self.before is None or self.peak is None else self.peak - self.before
        self.method = "VmHWM (clear_refs)" if self.exact else "RSS sampled every 1 ms"
        return False


def retain_heap() -> bool:
    """Make glibc malloc keep freed memory in the process (True if it could).

    ``mallopt(M_MMAP_MAX, 0)`` sends every allocation, large arrays included, to the
    heap instead of fresh ``mmap`` pages, ``M_TRIM_THRESHOLD`` = huge keeps freed heap
    memory mapped, and ``M_ARENA_MAX`` = 1 lets threads share that heap. After one warm-up
    allocation the process then reuses pages it has already touched: no page faults and
    none of this VM's slow, erratic first-touch cost. Peak RSS cannot be measured in this
    mode (it stays at the retained size), so measure it before calling this.
    """
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1
        ok = libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok
        libc.mallopt(M_ARENA_MAX, 1)
        return bool(ok)
    except (OSError, AttributeError):  # not glibc
        return False


def measure(fn, *, repeats: int = 3, budget_s: float = 60.0, use_tracemalloc: bool = True,
            warmup=None, min_total_s: float = 1.0, max_fast: int = 30,
            warm_gib: float = 0.0, heap: str = "retained") -> dict:
    """Time ``fn()`` and measure its peak memory, in this order:

    1. ``warmup()`` if given (e.g. the same method on a tiny input: imports, lazy setup);
    2. warm ``warm_gib`` GiB of memory, then one call measured for peak RSS (high-water
       mark minus RSS before). Its time is ``first_call_s``: fresh pages from the kernel,
       page faults and this VM's first-touch cost included.
    3. with ``heap="retained"``: :func:`retain_heap`, warm ``warm_gib`` again (now kept in
       the process); timed calls: at least one, up to ``repeats`` within ``budget_s``, and
       fast methods (under ``min_total_s`` in all) up to ``max_fast``. ``best_s`` is the
       fastest. With ``heap="fresh"`` the calls of step 3 run on fresh pages too.
    4. one call under tracemalloc (peak of Python/NumPy allocations during the call).
    """
    if warmup is not None:
        warmup()
    # Warm right before measuring: this VM hands freed guest pages back to the host within
    # seconds (free page reporting), so a warm-up done earlier goes cold again.
    warm_s = warm_memory(warm_gib)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    with PeakRSS() as peak:
        t = time.perf_counter()
        out = fn()
        first = time.perf_counter() - t
    del out
    mode = "fresh pages"
    if heap == "retained" and retain_heap():
        mode = "retained heap"
        warm_memory(max(warm_gib, 0.25))
    times = []
    while not times or (len(times) < repeats and first + sum(times) + min(times) <= budget_s) or (
            first + sum(times) < min_total_s and len(times) < max_fast):
        gc.collect()
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
        del out
    tm_peak = None
    if use_tracemalloc:
        gc.collect()
        tracemalloc.start()
        try:
            out = fn()
            tm_peak = tracemalloc.get_traced_memory()[1]
            del out
        finally:
            tracemalloc.stop()
    return {
        "best_s": min(times),
        "times_s": times,
        "timing_heap": mode,
        "first_call_s": first,
        "rss_before_bytes": peak.before,
        "rss_peak_extra_bytes": peak.extra,
        "rss_method": peak.method,
        "tracemalloc_peak_bytes": tm_peak,
        "warm_gib": warm_gib,
        "warm_s": warm_s,
        "loadavg_1min_before": None if load is None else load[0],
    }


# ----------------------------------------------------------------------------- subprocesses
def worker_result(payload: dict) -> None:
    """Print the worker's result line (the parent parses it)."""
    print(RESULT_PREFIX + json.dumps(payload, default=_json_default), flush=True)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def run_worker(module: str, spec: dict, timeout_s: float) -> dict:
    """Run ``python -m <module> --worker <spec>`` in a fresh process; its result dict."""
    env = dict(os.environ)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + old if old else "")
    t = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", module, "--worker", json.dumps(spec)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": "error", "error": f"timed out after {timeout_s:.0f} s"}
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith(RESULT_PREFIX):
            res = json.loads(line[len(RESULT_PREFIX):])
            res.setdefault("status", "ok")
            res["process_s"] = time.perf_counter() - t
            return res
    tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
    return {"status": "error", "error": f"worker exit {proc.returncode}: " + " | ".join(tail)}


def worker_main(argv, run_spec) -> bool:
    """If ``argv`` is ``--worker SPEC``, run ``run_spec(spec)`` and print its result."""
    if len(argv) >= 2 and argv[0] == "--worker":
        spec = json.loads(argv[1])
        try:
            res = run_spec(spec)
        except Exception as exc:
            import traceback

            traceback.print_exc()
            res = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
        worker_result(res)
        return True
    return False


def fmt_s(v) -> str:
    if v is None:
        return "—"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def fmt_mib(v) -> str:
    if v is None:
        return "—"
    m = v / MiB
    return f"{m:.3g}" if abs(m) < 1000 else f"{m:.0f}"


def fmt_ratio(v) -> str:
    if v is None:
        return "—"
    return f"{v:.2f}" if v < 10 else f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def ratio(a, b):
    if a is None or b is None or b <= 0:
        return None
    return a / b


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def progress_bar(total: int, desc: str):
    """A tqdm bar on stderr (a no-op stand-in when tqdm is missing)."""
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)
    except ImportError:
        class _Bar:
            def update(self, k=1):
                pass

            def set_postfix_str(self, s):
                print(f"{desc}: {s}", file=sys.stderr)

            def close(self):
                pass

        return _Bar()
