#!/usr/bin/env python3
"""Benchmark gpugroup on a GPU: grouping CPU vs GPU (with parity) and assembly bandwidth.

Grouping: Fermat-spiral scans of n positions (default 1e5, 1e6, 1e7), nsamples = n/10,
K = 7 and 16, C = 4, then a nested scan (half the positions a fine raster, 1/100 the pitch,
inside a coarse one; default n = 1e6, K = 7); CPU (SciPy cKDTree) and GPU timed in the same
run, and the integer groups compared. The CPU run is skipped when its estimate (from the previous size) exceeds
``--cpu-limit`` seconds; parity is then checked on a prefix of the groups (the first m
groups do not depend on nsamples >= m).

Assembly: the assembly step ``assembly.assemble_groups`` (N=64, gridsize=2, 25 000 and
100 000 groups by default) on groups and frames already on the device, with the backend's
fused kernels and with plain xp operations, as effective GB/s = (gathered frame bytes read
+ output bytes written) / time, next to the card's theoretical bandwidth and a bare device
copy of the frames; ``*_with_energies`` also counts the frames the normalization reads
first (s must be known before ``X_full`` is written: with the fused kernels every member's
frame is read twice, for its energy and for the gather, and written twice, ``diffraction``
and ``X_full``, of which the first measure counts three: it cannot pass 3/4 = 75% of peak
whatever the kernels); then (first group count only) ``generate_grouped_data`` end to end
(grouping included) on the GPU and on the CPU.

Parity matrix: every case of ``tests/parity_cases.py`` (and a scan_index case), CPU against
each GPU engine that loads. Engines: the largest grouping (n, K) timed with each GPU engine
that loads (grid, fused pool kernel, cuML), with parity: the record that lets ``auto`` move
to cuML or the fused pool (``gpu.CUML_VERIFIED``, ``gpu.FUSED_VERIFIED``). The profile
times each step of one grouping at the largest n, with the default engine and with the
fused pool. The CPU runs use all host cores (``cpu_threads`` in the JSON).

The ``targets`` block holds issue 16's goals and whether this run met them: grouping n = 1e7,
nsamples = 1e6, K = 16, C = 4 end to end <= 60 ms (the default engine, and the fastest
engine whose groups were identical, named); assembly >= 75% of peak at 25 000 groups and
>= 80% at 100 000; CPU grouping of the same scan <= 1.5 s; every parity check identical.

Results go to ``$OUT/gpu-<card>-<date>.json`` (``--out`` overrides ``$OUT``), rewritten after
every step, so a run cut short still leaves what it measured. ``--cpu-only`` runs the same
code on a machine without a GPU, with the grid engine on NumPy standing in for the GPU (a
smoke test of this script, not a measurement of anything GPU)::

    python benchmarks/gpu_benchmark.py --cpu-only --sizes 1e4,1e5 --out /tmp/bench
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import gpugroup  # noqa: E402
from gpugroup import sample_groups  # noqa: E402
from gpugroup.backends import Backend, cpu  # noqa: E402
from gpugroup.simulate import fermat_spiral, nested_scan  # noqa: E402

#: Peak DRAM bandwidth (GB/s) by card, for when the driver does not report clock and bus.
KNOWN_BANDWIDTH_GBS = {
    "h200": 4800.0, "h100 nvl": 3900.0, "h100 pcie": 2000.0, "h100": 3350.0,
    "a100-sxm4-80gb": 2039.0, "a100 80gb pcie": 1935.0, "a100": 1555.0, "l40s": 864.0,
    "l4": 300.0, "a10": 600.0, "v100": 900.0, "t4": 320.0, "b200": 8000.0,
}


def parse_sizes(text: str) -> list[int]:
    return [int(float(s)) for s in text.split(",") if s.strip()]


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Report:
    """The JSON result, rewritten atomically after every step."""

    def __init__(self, path: Path, data: dict):
        self.path = path
        self.data = data
        self.save()

    def save(self):
        self.data["targets"] = targets(self.data)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=_jsonable) + "\n")
        os.replace(tmp, self.path)

    def error(self, step: str, exc: BaseException):
        self.data["errors"].append({"step": step, "error": f"{type(exc).__name__}: {exc}",
                                    "traceback": traceback.format_exc(limit=8)})
        print(f"[bench] ERROR in {step}: {type(exc).__name__}: {exc}", flush=True)
        self.save()


#: Issue 16's goals (measured on an H100 or H200): grouping n = 1e7, nsamples = 1e6,
#: K = 16, C = 4 end to end; assembly as a fraction of the card's peak bandwidth at 25 000
#: and 100 000 groups; CPU grouping of the same scan on all host cores; parity 100%.
TARGET_N, TARGET_K = 10**7, 16
GOALS = {"grouping_n1e7_K16_s": 0.060, "assembly_25000_fraction_of_peak": 0.75,
         "assembly_100000_fraction_of_peak": 0.80, "cpu_grouping_n1e7_K16_s": 1.5}


def targets(data: dict) -> dict:
    """Each goal's measured value and whether it is met (None: not measured this run)."""
    spiral = [r for r in data["grouping"]
              if r.get("n") == TARGET_N and r.get("K") == TARGET_K
              and r.get("layout") == "fermat spiral"]
    gpu_s = [r["gpu_best_s"] for r in spiral if "gpu_best_s" in r]
    cpu_s = [r["cpu_s"] for r in spiral if r.get("cpu_s") is not None]

    def peak(B):
        v = [r["fraction_of_peak"] for r in data["assembly"]
             if r.get("step") == "assemble_groups" and r.get("nsamples") == B
             and "fraction_of_peak" in r]
        return max(v) if v else None

    checks = [data.get("parity_summary", {}).get("all_identical"),
              data.get("parity_matrix_summary", {}).get("all_identical")]
    checks = [c for c in checks if c is not None]
    values = {"grouping_n1e7_K16_s": min(gpu_s) if gpu_s else None,
              "assembly_25000_fraction_of_peak": peak(25_000),
              "assembly_100000_fraction_of_peak": peak(100_000),
              "cpu_grouping_n1e7_K16_s": min(cpu_s) if cpu_s else None}
    out = {"parity_all_identical": all(checks) if checks else None}
    for name, value in values.items():
        goal = GOALS[name]
        out[name] = value
        met = None if value is None else (value >= goal if "fraction" in name else value <= goal)
        out[f"{name}_goal"] = goal
        out[f"{name}_met"] = met
    out["cpu_threads"] = data.get("cpu_threads")
    engines = {r["engine"]: r for r in data.get("engine_comparison") or []
               if "gpu_best_s" in r}
    grid = engines.get("cupy")
    for name in ("cuml", "fused"):  # what lets `auto` move to them (gpu.*_VERIFIED)
        r = engines.get(name)
        out[f"{name}_identical_and_faster"] = (
            None if r is None or grid is None
            else bool(r["parity"] and r["gpu_best_s"] < grid["gpu_best_s"]))
    same = [r for r in engines.values() if r["parity"] and r["n"] == TARGET_N
            and r["K"] == TARGET_K]
    best = min(same, key=lambda r: r["gpu_best_s"], default=None)
    goal = GOALS["grouping_n1e7_K16_s"]
    out["grouping_n1e7_K16_best_engine"] = None if best is None else best["engine"]
    out["grouping_n1e7_K16_best_engine_s"] = None if best is None else best["gpu_best_s"]
    out["grouping_n1e7_K16_best_engine_met"] = (None if best is None
                                                else best["gpu_best_s"] <= goal)
    return out


def _jsonable(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


# ----------------------------------------------------------------------------- device
class Device:
    """CuPy and the card, or a NumPy stand-in for --cpu-only."""

    def __init__(self, cpu_only: bool, engine: str | None):
        self.cpu_only = cpu_only
        if cpu_only:
            from gpugroup.backends.engines import GridIndex

            self.xp = np
            self.backend = Backend(name="grid-numpy", xp=np, asnumpy=np.asarray,
                                   build_index=functools.partial(GridIndex, xp=np),
                                   description="grid engine on NumPy (CPU smoke test)")
            self.info = {"name": "cpu-only smoke test (no GPU)", "slug": "cpu-smoke"}
            return
        import cupy

        from gpugroup.backends import gpu

        self.xp = cupy
        self.backend = gpu.make_backend(engine)
        dev = cupy.cuda.Device()
        props = cupy.cuda.runtime.getDeviceProperties(dev.id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        bw, source = _bandwidth(cupy, dev.id, props, name)
        self.info = {
            "name": name, "slug": _slug(name), "total_mem_gib": props.get("totalGlobalMem", 0) / 2**30,
            "compute_capability": f"{props.get('major', '?')}.{props.get('minor', '?')}",
            "peak_bandwidth_gbs": bw, "peak_bandwidth_source": source,
            "cupy": cupy.__version__, "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
            "driver": cupy.cuda.runtime.driverGetVersion(),
        }

    def sync(self):
        if not self.cpu_only:
            self.xp.cuda.Device().synchronize()

    def free_bytes(self) -> int:
        """Memory free for arrays: the card's, or the host's for the NumPy stand-in."""
        if self.cpu_only:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        self.xp.get_default_memory_pool().free_all_blocks()
        return int(self.xp.cuda.runtime.memGetInfo()[0])


def _slug(name: str) -> str:
    low = name.lower()
    m = re.search(r"\b(gh200|h200|h100|h20|b200|a100|a10g?|a30|a40|l40s|l40|l4|v100|t4)\b", low)
    if m:
        return m.group(1)
    return re.sub(r"[^a-z0-9]+", "-", low).strip("-")[:32] or "gpu"


def _bandwidth(cupy, dev_id, props, name):
    clock = props.get("memoryClockRate") or 0  # kHz
    bus = props.get("memoryBusWidth") or 0      # bits
    source = "cudaDeviceProp"
    if not (clock and bus):
        try:
            clock = cupy.cuda.runtime.deviceGetAttribute(36, dev_id)  # cudaDevAttrMemoryClockRate
            bus = cupy.cuda.runtime.deviceGetAttribute(37, dev_id)    # GlobalMemoryBusWidth
            source = "cudaDeviceGetAttribute"
        except Exception:
            clock = bus = 0
    if clock and bus:
        return 2.0 * clock * 1e3 * bus / 8 / 1e9, source  # double data rate
    low = name.lower()
    for key, gbs in KNOWN_BANDWIDTH_GBS.items():
        if key in low:
            return gbs, "table of published peaks"
    return None, "unknown"


# ----------------------------------------------------------------------------- grouping
def time_call(dev: Device, fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        dev.sync()
        t0 = time.perf_counter()
        out = fn()
        dev.sync()
        times.append(time.perf_counter() - t0)
    return times, out


def bench_grouping(dev: Device, report: Report, args):
    rows = report.data["grouping"]
    # Warm up: compile the device kernels once (CuPy caches them on disk too), and load
    # the CPU path's modules, so that neither first timed run pays for it.
    x, y = fermat_spiral(20_000, spacing=1.0, jitter=0.1, rng=np.random.default_rng(0))
    t0 = time.perf_counter()
    for K in args.K:
        sample_groups(x, y, 2_000, K, args.C, seed=1, backend=dev.backend)
    report.data["warmup_s"] = time.perf_counter() - t0
    sample_groups(x, y, 2_000, args.K[0], args.C, seed=1, backend="cpu")
    report.save()
    cpu_rate = None  # seconds per (n + nsamples * K) from the last CPU run
    scans = [("fermat spiral", n, K) for n in args.sizes for K in args.K]
    scans += [("nested scan (fine ROI in a coarse overview)", n, args.K[0]) for n in args.nested]
    for layout, n, K in scans:
        if time.perf_counter() > args.deadline:
            report.data["notes"].append(f"grouping {layout} n={n} K={K} skipped: deadline")
            continue
        if layout == "fermat spiral":
            x, y = fermat_spiral(n, spacing=1.0, jitter=0.1, rng=np.random.default_rng(n))
        else:
            x, y = nested_scan(n, seed=n % 1000)
        row = {"n": n, "nsamples": max(1, n // 10), "K": K, "C": args.C, "layout": layout,
               "seed": 7}
        rows.append(row)
        try:
            cpu_rate = _grouping_row(dev, report, args, row, x, y, cpu_rate)
        except Exception as exc:  # keep going: later sizes may still work
            row["error"] = f"{type(exc).__name__}: {exc}"
            report.error(f"grouping {layout} n={n} K={K}", exc)
        checked = [r for r in rows if "parity" in r]  # kept current: a run may be cut short
        report.data["parity_summary"] = {
            "checked": len(checked), "identical": sum(r["parity"] for r in checked),
            "all_identical": bool(checked) and all(r["parity"] for r in checked),
        }
        report.save()
        del x, y


def _grouping_row(dev, report, args, row, x, y, cpu_rate):
    """Time one grouping on the GPU and the CPU (or a prefix), check parity; returns the
    CPU rate (seconds per n + nsamples * K) for estimating the next CPU run."""
    n, nsamples, K = row["n"], row["nsamples"], row["K"]
    tag = f"n={n:.0e} K={K} {row['layout'].split(' (')[0]}"
    call = functools.partial(sample_groups, x, y, nsamples, K, args.C, seed=7,
                             backend=dev.backend)
    times, got = time_call(dev, call, args.repeats)
    row["gpu_s"] = times
    row["gpu_best_s"] = min(times)
    dtimes, _ = time_call(dev, functools.partial(call, output="device"), 1)
    row["gpu_device_output_s"] = dtimes[0]
    print(f"[bench] {tag}: GPU {min(times):.3f} s "
          f"(runs {', '.join(f'{t:.3f}' for t in times)})", flush=True)
    report.save()
    work = n + nsamples * K
    estimate = None if cpu_rate is None else cpu_rate * work
    row["cpu_estimate_s"] = estimate
    if estimate is not None and estimate > args.cpu_limit:
        row["cpu_s"] = None
        row["cpu_skipped"] = f"estimated {estimate:.0f} s > --cpu-limit {args.cpu_limit:.0f} s"
        m = min(nsamples, args.prefix_rows)
        want = sample_groups(x, y, m, K, args.C, seed=7, backend="cpu")
        row["parity"] = bool(np.array_equal(got[:m], want))
        row["parity_rows"] = m
    else:
        t0 = time.perf_counter()
        want = sample_groups(x, y, nsamples, K, args.C, seed=7, backend="cpu")
        row["cpu_s"] = time.perf_counter() - t0
        cpu_rate = row["cpu_s"] / work
        row["speedup"] = row["cpu_s"] / row["gpu_best_s"]
        row["parity"] = bool(np.array_equal(got, want))
        row["parity_rows"] = nsamples
        print(f"[bench] {tag}: CPU {row['cpu_s']:.3f} s, speedup {row['speedup']:.1f}x",
              flush=True)
    if not row["parity"]:
        row["parity_mismatched_rows"] = int((got[: row["parity_rows"]] != want).any(axis=1).sum())
    print(f"[bench] {tag}: parity {row['parity']} over {row['parity_rows']} groups", flush=True)
    return cpu_rate


# ----------------------------------------------------------------------------- parity
def gpu_engines(dev: Device, report: Report) -> dict:
    """Engine name -> backend, for every GPU engine that loads (the stand-in backend alone
    with --cpu-only); the reason for each one that does not goes in the notes."""
    if dev.cpu_only:
        return {dev.backend.name: dev.backend}
    from gpugroup.backends import gpu

    out = {}
    for name in ("cupy", "fused", "cuml"):
        try:
            out[name] = gpu.make_backend(name)
        except RuntimeError as exc:
            report.data["notes"].append(f"engine {name} not measured: {exc}")
    return out


def _parity_cases():
    """(id, xy, nsamples, K, C, seed, kw) of tests/parity_cases.py plus a scan_index case."""
    tests = REPO / "tests"
    if str(tests) not in sys.path:
        sys.path.insert(0, str(tests))
    import parity_cases

    cases = [(p.id, *p.values) for p in parity_cases.CASES]
    x, y, scans = parity_cases.scans3()
    cases.append(("scan-index-3", lambda: (x, y), 200, 8, 4, 5, {"scan_index": scans}))
    return cases


def bench_parity_matrix(dev: Device, report: Report, args):
    """DESIGN.md 3's parity matrix: each case's groups on the CPU and on each GPU engine."""
    rows = report.data["parity_matrix"]
    engines = gpu_engines(dev, report)
    for case_id, xy, nsamples, K, C, seed, kw in _parity_cases():
        coords = xy()
        want = sample_groups(*coords[:2], nsamples, K, C, seed=seed, backend="cpu", **kw)
        for name, be in engines.items():
            row = {"case": case_id, "engine": name}
            try:
                got = sample_groups(*coords[:2], nsamples, K, C, seed=seed, backend=be, **kw)
                row["identical"] = bool(np.array_equal(got, want))
            except Exception as exc:
                row["identical"] = False
                row["error"] = f"{type(exc).__name__}: {exc}"
            rows.append(row)
    bad = [f"{r['case']}/{r['engine']}" for r in rows if not r["identical"]]
    report.data["parity_matrix_summary"] = {
        "checked": len(rows), "identical": len(rows) - len(bad), "all_identical": not bad,
        "engines": list(engines), "mismatched": bad}
    print(f"[bench] parity matrix: {len(rows) - len(bad)}/{len(rows)} identical"
          + (f" (mismatched: {', '.join(bad)})" if bad else ""), flush=True)
    report.save()


def bench_engines(dev: Device, report: Report, args):
    """The largest grouping of the run (n, K) with each GPU engine that loads, end to end,
    with parity against the CPU: whether cuML is identical and faster than the grid engine
    (the condition for ``auto`` to choose it)."""
    if not args.sizes or time.perf_counter() > args.deadline:
        return
    n, K = max(args.sizes), max(args.K)
    m = max(1, n // 10)
    x, y = fermat_spiral(n, spacing=1.0, jitter=0.1, rng=np.random.default_rng(n))
    want = sample_groups(x, y, m, K, args.C, seed=7, backend="cpu")
    for name, be in gpu_engines(dev, report).items():
        row = {"engine": name, "description": be.description, "n": n, "nsamples": m, "K": K,
               "C": args.C}
        report.data["engine_comparison"].append(row)
        try:
            call = functools.partial(sample_groups, x, y, m, K, args.C, seed=7, backend=be)
            call()  # warm: kernels compiled, libraries loaded
            times, got = time_call(dev, call, args.repeats)
            row.update({"gpu_s": times, "gpu_best_s": min(times),
                        "parity": bool(np.array_equal(got, want))})
            print(f"[bench] engine {name}: n={n:.0e} K={K} {min(times):.3f} s, "
                  f"parity {row['parity']}", flush=True)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
            report.error(f"engine {name}", exc)
        report.save()


# ----------------------------------------------------------------------------- profile
def bench_profile(dev: Device, report: Report, args):
    """Where one GPU grouping at the largest n spends its time: each step of DESIGN.md 3
    timed with the device synchronized around it, with the default engine and with the
    fused pool kernel (when it is not the default and loads), then a cProfile of one whole
    call with the default engine (``$OUT/profile.txt``; CuPy launches are asynchronous, so
    host-side cProfile charges device time to the calls that wait for it: ``int()``,
    ``float()``, copies)."""
    if dev.cpu_only or not args.sizes or time.perf_counter() > args.deadline:
        return
    import cProfile
    import io
    import pstats

    from gpugroup import grouping
    from gpugroup.backends import gpu

    xp, n, K, C = dev.xp, max(args.sizes), max(args.K), args.C
    m = max(1, n // 10)
    x_np, y_np = fermat_spiral(n, spacing=1.0, jitter=0.1, rng=np.random.default_rng(n))

    def steps_of(backend):
        steps = {}

        def step(name, fn):
            dev.sync()
            t0 = time.perf_counter()
            out = fn()
            dev.sync()
            steps[name] = time.perf_counter() - t0
            return out

        x, y = step("coordinates to device, checked",
                    lambda: grouping._check_coordinates(x_np, y_np, xp=xp, rescale=True))
        seeds = step("3.1 sample_seeds", lambda: grouping.sample_seeds(xp, n, m, 7))
        index = step("build_index", lambda: backend.build_index(x, y))
        pool = step("3.2 neighbour_pool",
                    lambda: grouping.neighbour_pool(xp, x, y, seeds, K, index))
        rows = xp.arange(m, dtype=xp.int64)
        width = xp.full(m, pool.shape[1], dtype=xp.int64)
        groups = step("3.3 select_members",
                      lambda: grouping.select_members(xp, pool, width, rows, C, 7))
        step("groups to host", lambda: backend.asnumpy(groups.astype(xp.int32)))
        return steps

    backends = {dev.backend.description: dev.backend}
    try:
        fused = gpu.make_backend("fused")
        backends.setdefault(fused.description, fused)
    except Exception as exc:  # noted; the default engine's profile stands
        report.data["notes"].append(f"fused pool not profiled: {type(exc).__name__}: {exc}")
    by_engine = {}
    for description, backend in backends.items():
        try:
            steps_of(backend)  # warm: kernels compiled
            by_engine[description] = steps_of(backend)
        except Exception as exc:
            report.error(f"profile {description}", exc)
    steps = by_engine.get(dev.backend.description, {})
    prof = cProfile.Profile()
    dev.sync()
    prof.enable()
    sample_groups(x_np, y_np, m, K, C, seed=7, backend=dev.backend)
    dev.sync()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
    (Path(args.out) / "profile.txt").write_text(
        f"n={n} nsamples={m} K={K} C={C}\nsteps (s) by engine: {json.dumps(by_engine, indent=1)}"
        f"\n\n{dev.backend.description}, one whole call:\n" + text.getvalue())
    report.data["profile"] = {"n": n, "nsamples": m, "K": K, "C": C, "steps_s": steps,
                              "steps_s_by_engine": by_engine}
    for description, st in by_engine.items():
        print(f"[bench] profile n={n:.0e} K={K} {description}: "
              + ", ".join(f"{k} {v:.4f}" for k, v in st.items()), flush=True)
    report.save()


# ----------------------------------------------------------------------------- assembly
def bench_assembly(dev: Device, report: Report, args):
    """:func:`assembly_for` each group count of ``--assembly-nsamples``, in full for the
    first (steps, end to end, references, CPU), the assembly step alone for the others."""
    for i, B in enumerate(args.assembly_nsamples):
        if i and time.perf_counter() > args.deadline:
            report.data["notes"].append(f"assembly nsamples={B} skipped: deadline")
            continue
        # diffraction and X_full of B groups of 4 64x64 float32 frames, two calls' worth
        # alive at once, and the frames: more than is free would end in the OOM killer
        need, free = 4 * B * 4 * 64 * 64 * 4 + args.assembly_n * 64 * 64 * 4, dev.free_bytes()
        if need > free:
            note = (f"assembly nsamples={B} skipped: needs about {need / 2**30:.1f} GiB, "
                    f"{free / 2**30:.1f} GiB free")
            report.data["notes"].append(note)
            print(f"[bench] {note}", flush=True)
            continue
        assembly_for(dev, report, args, B, full=i == 0)


def assembly_for(dev: Device, report: Report, args, B: int, full: bool):
    """The assembly step (``assembly.assemble_groups``: energies, scale, the fused gather
    into channel-last ``diffraction`` and ``X_full``, coordinates) on groups already on the
    device, with the backend's fused kernels and with plain xp operations; then
    ``generate_grouped_data`` end to end (grouping included), a bare device copy of the
    frames (the card's practical ceiling here) and the CPU."""
    from gpugroup import RawData, assembly
    from gpugroup.schema import ScanArrays

    xp = dev.xp
    n, N, C = args.assembly_n, 64, 4
    x, y = fermat_spiral(n, spacing=16.0, jitter=0.1, rng=np.random.default_rng(1))
    frames = xp.random.default_rng(0).random((n, N, N), dtype=xp.float32)
    probe = np.ones((N, N), np.complex64)
    raw = RawData(x, y, None, None, frames, probe, None, backend="cpu")
    nn = sample_groups(x, y, B, 7, C, seed=3, backend=dev.backend, output="device")
    frame_bytes = N * N * 4
    results = report.data["assembly"]
    peak = dev.info.get("peak_bandwidth_gbs")
    base = {"n_frames": n, "N": N, "nsamples": B, "gridsize": 2,
            "frames_on": "host (NumPy)" if dev.cpu_only else "device (CuPy)"}
    reference = None
    variants = [("fused kernels", dev.backend.kernels)] if dev.backend.kernels else []
    variants.append(("plain xp operations", None))
    for chunk in args.chunk_bytes:
        for label, kernels in variants:
            if time.perf_counter() > args.deadline:
                report.data["notes"].append(f"assembly {label} chunk={chunk} skipped: deadline")
                continue
            row = dict(base, step="assemble_groups", path=label, chunk_bytes=chunk,
                       backend=dev.backend.name)
            results.append(row)
            try:
                call = functools.partial(
                    assembly.assemble_groups, xp, ScanArrays(x, y, frames), nn, N,
                    chunk_bytes=chunk, kernels=kernels)
                call()  # warm: kernels loaded, the memory pool holds the outputs
                times, out = time_call(dev, call, max(args.repeats, 5))
                gathered = int(nn.size) * frame_bytes
                written = sum(int(v.nbytes) for k, v in out.items()
                              if hasattr(v, "nbytes") and k != "nn_indices")
                # The normalization reads frames too, before X_full can be written: each
                # member's frame (fused kernel) or each distinct frame once (plain path).
                energy_read = frame_bytes * (int(nn.size) if kernels is not None
                                             else int(xp.unique(nn).size))
                best = min(times)
                row.update({"time_s": times, "best_s": best, "bytes_read": gathered,
                            "bytes_written": written, "energy_bytes_read": energy_read,
                            "effective_gbs": (gathered + written) / best / 1e9,
                            "effective_gbs_with_energies":
                                (gathered + written + energy_read) / best / 1e9})
                if peak:
                    row["fraction_of_peak"] = row["effective_gbs"] / peak
                    row["fraction_of_peak_with_energies"] = (
                        row["effective_gbs_with_energies"] / peak)
                if reference is None:
                    reference = out
                else:
                    # gathered values exactly; coords_relative within the last bits of the
                    # group means (the fused kernel and CuPy's mean sum in other orders)
                    row["outputs_equal_first_variant"] = all(
                        bool(xp.array_equal(out[k], reference[k]))
                        for k in ("diffraction", "X_full", "coords_nn")) and bool(xp.allclose(
                            out["coords_relative"], reference["coords_relative"], rtol=0,
                            atol=1e-12 * float(xp.abs(reference["coords_nn"]).max())))
                print(f"[bench] assembly ({label}, chunk={chunk >> 20} MiB): {best * 1e3:.2f} ms,"
                      f" {row['effective_gbs']:.1f} GB/s", flush=True)
                del out
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"
                report.error(f"assembly {label} chunk={chunk}", exc)
            report.save()
    if not full:
        return
    # Where the fused assembly step spends its time (each part synchronized, best of 5).
    if dev.backend.kernels is not None and time.perf_counter() < args.deadline:
        kern, chunk = dev.backend.kernels, max(args.chunk_bytes)
        outs = assembly.empty_outputs(xp, B, N, C, frames.dtype, True, False)
        on_device = assembly.coordinates_on(xp, (x, y, x, y))
        parts = {
            "energies and scale": lambda: assembly.normalization_scale(
                xp, assembly.group_energies(xp, frames, nn, chunk, kern), N),
            "gather (diffraction, X_full)": lambda: assembly.gather_channel_last(
                xp, frames, nn, scale=0.5, out_diffraction=outs["diffraction"],
                out_X=outs["X_full"], chunk_bytes=chunk, kernels=kern),
            "coordinates (host positions)": lambda: assembly.group_coordinates(
                xp, nn, x, y, x, y, kernels=kern),
            "coordinates (positions on the device)": lambda: assembly.group_coordinates(
                xp, nn, *on_device, kernels=kern),
        }
        steps = report.data["assembly_steps_s"] = {}
        for label, fn in parts.items():
            steps[label] = min(time_call(dev, fn, 5)[0])
        print("[bench] assembly steps: " + ", ".join(f"{k} {v * 1e3:.2f} ms"
                                                      for k, v in steps.items()), flush=True)
        outs = None
        report.save()
    # End to end: generate_grouped_data (grouping + assembly), default chunking.
    row = dict(base, step="generate_grouped_data (grouping included)", backend=dev.backend.name)
    results.append(row)
    try:
        call = functools.partial(raw.generate_grouped_data, N, K=7, nsamples=B, seed=3,
                                 gridsize=2, backend=dev.backend, output="device")
        times, gpu_out = time_call(dev, call, args.repeats)
        row.update({"time_s": times, "best_s": min(times),
                    "nn_indices_equal_assembly_input": bool(xp.array_equal(gpu_out["nn_indices"], nn))})
        print(f"[bench] generate_grouped_data end to end: {min(times) * 1e3:.2f} ms", flush=True)
    except Exception as exc:
        gpu_out = None
        row["error"] = f"{type(exc).__name__}: {exc}"
        report.error("assembly end to end", exc)
    report.save()
    # References, each the mean of 10 back-to-back runs between two synchronizations: a
    # device copy of the frames (read + write bytes; what the card does here), and the
    # fused kernels alone (no host work between launches).
    refs = [("bare copy of the frames (reference)", 2 * int(frames.nbytes),
             functools.partial(xp.copyto, xp.empty_like(frames), frames), None)]
    if dev.backend.kernels is not None:
        kern = dev.backend.kernels
        outs = assembly.empty_outputs(xp, B, N, C, frames.dtype, True, False)
        uniq = xp.unique(nn)
        gather = functools.partial(kern.gather_channel_last, frames, nn, np.float32(0.5),
                                   outs["diffraction"], outs["X_full"])
        refs += [(f"fused gather kernel alone, {P} pixels per thread (reference)",
                  int(nn.size) * frame_bytes * 3, gather, P) for P in (1, 2, 4, 8)]
        refs.append(("fused energies kernel alone (reference)", int(uniq.size) * frame_bytes,
                     functools.partial(kern.frame_energies, frames, uniq), None))
    default_pixels = getattr(dev.backend.kernels, "pixels_per_thread", None)
    for label, moved, fn, *pixels in refs:
        try:
            if pixels and pixels[0]:
                dev.backend.kernels.pixels_per_thread = pixels[0]
            fn()
            dev.sync()
            t0 = time.perf_counter()
            for _ in range(10):
                fn()
            dev.sync()
            best = (time.perf_counter() - t0) / 10
            row = dict(base, step=label, best_s=best, bytes_moved=moved,
                       effective_gbs=moved / best / 1e9)
            if peak:
                row["fraction_of_peak_raw"] = row["effective_gbs"] / peak
            results.append(row)
            print(f"[bench] {label}: {best * 1e3:.3f} ms, {row['effective_gbs']:.1f} GB/s",
                  flush=True)
        except Exception as exc:
            report.error(f"assembly {label}", exc)
        finally:
            if default_pixels is not None:
                dev.backend.kernels.pixels_per_thread = default_pixels
    refs = outs = None
    report.save()
    if (not dev.cpu_only and not args.skip_cpu_assembly and gpu_out is not None
            and time.perf_counter() < args.deadline):
        row = dict(base, step="generate_grouped_data (grouping included)",
                   frames_on="host (NumPy)", backend="cpu")
        results.append(row)
        try:
            host = RawData(x, y, None, None, xp.asnumpy(frames), probe, None, backend="cpu")
            t0 = time.perf_counter()
            out = host.generate_grouped_data(N, K=7, nsamples=B, seed=3, gridsize=2,
                                             backend="cpu")
            row["best_s"] = time.perf_counter() - t0
            row["nn_indices_equal_gpu"] = bool(np.array_equal(out["nn_indices"],
                                                              xp.asnumpy(gpu_out["nn_indices"])))
            g = xp.asnumpy(gpu_out["X_full"])
            row["X_full_max_rel_diff_vs_gpu"] = float(
                np.max(np.abs(out["X_full"] - g)) / max(float(np.abs(out["X_full"]).max()), 1e-30))
            row["norm_scale_gpu_minus_cpu"] = float(gpu_out["norm_scale"]) - float(out["norm_scale"])
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
            report.error("assembly cpu", exc)
        report.save()


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "benchmarks" / "results"),
                   help="folder for the JSON (default $OUT, else benchmarks/results)")
    p.add_argument("--sizes", default="1e5,1e6,1e7", help="comma-separated n (default %(default)s)")
    p.add_argument("--K", default="7,16", help="pool sizes (default %(default)s)")
    p.add_argument("--nested", default="1e6",
                   help="n of nested scans (a fine ROI in a coarse overview), first K only; "
                        "'' for none (default %(default)s)")
    p.add_argument("--C", type=int, default=4, help="group size (default %(default)s)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per GPU measurement")
    p.add_argument("--cpu-limit", type=float, default=60.0,
                   help="skip a CPU grouping run estimated to take longer (s)")
    p.add_argument("--prefix-rows", type=int, default=20_000,
                   help="groups compared when the CPU run is skipped")
    p.add_argument("--assembly-n", type=float, default=1e5, help="frames for assembly")
    p.add_argument("--assembly-nsamples", default="25000,100000",
                   help="group counts for assembly, comma-separated (default %(default)s)")
    p.add_argument("--chunk-bytes", default="4Mi,256Mi",
                   help="assembly chunk sizes to time (default %(default)s)")
    p.add_argument("--skip-cpu-assembly", action="store_true")
    p.add_argument("--engine", choices=["auto", "cuml", "cupy", "fused"], default=None,
                   help="GPU engine (default: $GPUGROUP_GPU_ENGINE or auto)")
    p.add_argument("--cpu-only", action="store_true",
                   help="no GPU: the grid engine on NumPy stands in (smoke test of this script)")
    p.add_argument("--time-budget", type=float, default=170.0,
                   help="seconds after which remaining steps are skipped")
    args = p.parse_args(argv)
    args.sizes = parse_sizes(args.sizes)
    args.nested = parse_sizes(args.nested)
    args.K = [int(k) for k in args.K.split(",")]
    args.assembly_n = int(args.assembly_n)
    args.assembly_nsamples = parse_sizes(args.assembly_nsamples)
    args.chunk_bytes = [int(float(c[:-2]) * 2**20) if c.endswith("Mi") else int(float(c))
                        for c in args.chunk_bytes.split(",")]
    args.deadline = time.perf_counter() + args.time_budget

    date = _dt.date.today().isoformat()
    data = {
        "schema": "gpugroup-gpu-benchmark/1", "started": now(), "finished": None,
        "argv": sys.argv[1:], "cpu_only": args.cpu_only, "gpugroup": gpugroup.__version__,
        "git_commit": _git_commit(), "python": sys.version.split()[0],
        "numpy": np.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "device": None, "engine": None, "cpu_threads": cpu.BACKEND.threads,
        "grouping": [], "parity_matrix": [], "engine_comparison": [], "assembly": [],
        "errors": [],
        "notes": ["times in seconds, wall clock, device synchronized; GPU grouping times are "
                  "end to end (host coordinates in, NumPy groups out, index built each call); "
                  "CPU grouping on all host cores (cpu_threads)"],
    }
    out_dir = Path(args.out)
    try:
        import scipy

        data["scipy"] = scipy.__version__
        dev = Device(args.cpu_only, args.engine)
    except Exception as exc:
        report = Report(out_dir / f"gpu-unknown-{date}.json", data)
        report.error("device setup", exc)
        return 1
    data["device"] = dev.info
    data["engine"] = dev.backend.description
    prefix = "cpu-smoke" if args.cpu_only else f"gpu-{dev.info['slug']}"
    report = Report(out_dir / f"{prefix}-{date}.json", data)
    print(f"[bench] {dev.info['name']}: {dev.backend.description}; writing {report.path}",
          flush=True)
    for step in (bench_grouping, bench_parity_matrix, bench_engines, bench_assembly,
                 bench_profile):
        try:
            step(dev, report, args)
        except Exception as exc:
            report.error(step.__name__, exc)
    data["finished"] = now()
    report.save()
    print(f"[bench] targets: {json.dumps(data['targets'])}", flush=True)
    print(f"[bench] done: {report.path}", flush=True)
    return 0 if not data["errors"] else 1


def _git_commit():
    if os.environ.get("GPU_CHECK_COMMIT"):  # the device machine gets a copy without .git
        return os.environ["GPU_CHECK_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
