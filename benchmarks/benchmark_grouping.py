"""Grouping benchmark (seed-plan phase 3, issue 4): old paths vs gpugroup, side by side.

For each scan size n (default 1K, 10K, 100K, 1M positions; 10M too when a GPU is
available) with nsamples = n/10, K = 7, C = 4, it measures in one run:

  legacy     old group-then-sample, first run (cache file deleted before every call)
  loop       per-row sample-then-group Python loop (above --loop-max: a subset of rows is
             timed and the full time extrapolated, flagged in the output)
  floor      bare cKDTree build + K-query for gpugroup's seeds (the kNN floor)
  cpu        gpugroup.sample_groups(backend="cpu")
  gpu        gpugroup.sample_groups(backend="gpu") when the GPU backend is available
  e2e_legacy legacy group-then-sample + legacy assembly, N=64, gridsize 2
  e2e_cpu    RawData.generate_grouped_data(N=64, gridsize=2, backend="cpu")
  e2e_gpu    the same on the GPU (when available)

Every method runs in its own fresh process after warming memory (see common.py), and
reports best-of-repeats wall time, peak RSS over the RSS before the call, and the
tracemalloc peak. Writes a markdown table (stdout and results/grouping-<machine>-<date>.md),
a JSON file and a PNG plot beside it.

Usage::

    python -m benchmarks.benchmark_grouping                     # 1K..1M (+10M on a GPU)
    python -m benchmarks.benchmark_grouping --sizes 1K,10K --repeats 5
    python -m benchmarks.benchmark_grouping --profile 1M        # cProfile sample_groups
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks import common, legacy

MODULE = "benchmarks.benchmark_grouping"

METHODS = {
    "legacy": "legacy group-then-sample (first run, no cache)",
    "loop": "per-row sample-then-group loop",
    "floor": "kNN floor (cKDTree build with SciPy defaults + K-query)",
    "floor_fast": "kNN floor, tree built like gpugroup's "
                  "(balanced_tree=False, compact_nodes=False)",
    "cpu": "gpugroup sample_groups, CPU",
    "gpu": "gpugroup sample_groups, GPU",
    "e2e_legacy": "end-to-end legacy (group-then-sample + legacy assembly)",
    "e2e_cpu": "end-to-end gpugroup generate_grouped_data, CPU",
    "e2e_gpu": "end-to-end gpugroup generate_grouped_data, GPU",
}
SHORT = {
    "legacy": "legacy", "loop": "loop", "floor": "kNN floor",
    "floor_fast": "kNN floor (fast build)", "cpu": "gpugroup CPU",
    "gpu": "gpugroup GPU", "e2e_legacy": "e2e legacy", "e2e_cpu": "e2e gpugroup CPU",
    "e2e_gpu": "e2e gpugroup GPU",
}
GOALS = {"floor": 1.5, "loop": 2.0, "legacy": 20.0}


def parse_size(s: str) -> int:
    s = s.strip().upper().replace("_", "")
    mult = {"K": 10**3, "M": 10**6, "G": 10**9}.get(s[-1:], 1)
    return int(float(s[:-1] if mult > 1 else s) * mult)


def nsamples_for(n: int, frac: float, cap) -> int:
    m = max(1, int(round(n * frac)))
    return m if cap is None else min(m, cap)


# ============================================================================ worker side
def _run_spec(spec: dict) -> dict:
    method, n, m = spec["method"], spec["n"], spec["nsamples"]
    K, C, seed, N = spec["K"], spec["C"], spec["seed"], spec["N"]
    x, y = common.jittered_scan(n, seed=seed)
    tx, ty = common.jittered_scan(256, seed=seed + 1)
    if method == "paired":
        return _paired(spec, x, y)
    tm = spec.get("tracemalloc", True)
    kw = dict(repeats=spec["repeats"], budget_s=spec["budget_s"], use_tracemalloc=tm,
              warm_gib=spec["warm_gib"], min_total_s=spec.get("min_total_s", 1.0),
              heap=spec.get("heap", "retained"))
    extra = {}
    tmp = tempfile.mkdtemp(prefix="gpugroup-bench-")
    try:
        if method in ("legacy", "e2e_legacy"):
            cache_src = os.path.join(tmp, "scan.npz")
            cache = legacy.cache_path_for(cache_src, K, C)

            def groups(xx, yy, mm):
                if os.path.exists(cache):
                    os.remove(cache)  # every timed call is a first run
                return legacy.group_then_sample(xx, yy, mm, K, C, seed=seed, dataset_path=cache_src)

        if method == "legacy":
            res = common.measure(lambda: groups(x, y, m), warmup=lambda: groups(tx, ty, 16), **kw)
            groups(x, y, m)  # leave a cache file, then time the cached (second-run) path
            extra["cache_file_bytes"] = os.path.getsize(cache)
            t = []
            for _ in range(3):
                t0 = time.perf_counter()
                legacy.group_then_sample(x, y, m, K, C, seed=seed, dataset_path=cache_src)
                t.append(time.perf_counter() - t0)
            extra["cached_run_s"] = min(t)
        elif method == "loop":
            limit = spec.get("loop_rows")
            res = common.measure(
                lambda: legacy.per_row_loop(x, y, m, K, C, seed=seed, limit_rows=limit),
                warmup=lambda: legacy.per_row_loop(tx, ty, 16, K, C, seed=seed), **kw)
            if limit is not None and limit < m:
                t = []
                for _ in range(3):  # tree build + seed draw, no rows
                    t0 = time.perf_counter()
                    legacy.per_row_loop(x, y, m, K, C, seed=seed, limit_rows=0)
                    t.append(time.perf_counter() - t0)
                setup = min(t)
                extra.update(measured_rows=limit, measured_best_s=res["best_s"], setup_s=setup,
                             extrapolated=True)
                res["best_s"] = setup + (res["best_s"] - setup) * m / limit
        elif method in ("floor", "floor_fast"):
            from gpugroup.grouping import sample_seeds

            seeds = np.asarray(sample_seeds(np, n, m, seed))  # gpugroup's seeds, not timed
            fast = method == "floor_fast"
            res = common.measure(lambda: legacy.knn_floor(x, y, seeds, K, fast_build=fast),
                                 warmup=lambda: legacy.knn_floor(tx, ty, np.arange(16), K,
                                                                 fast_build=fast), **kw)
        elif method in ("cpu", "gpu"):
            from gpugroup import sample_groups

            res = common.measure(
                lambda: sample_groups(x, y, m, K, C, seed=seed, backend=method),
                warmup=lambda: sample_groups(tx, ty, 16, K, C, seed=seed, backend=method), **kw)
        elif method in ("e2e_cpu", "e2e_gpu", "e2e_legacy"):
            gridsize = math.isqrt(C)
            diff = common.diffraction_stack(n, N, seed=seed)
            tdiff = common.diffraction_stack(256, N, seed=seed + 1)
            if method == "e2e_legacy":
                def call(xx, yy, dd, mm):
                    return legacy.assemble_legacy(dd, groups(xx, yy, mm), N, xx, yy)
            else:
                from gpugroup import RawData

                be = method.split("_")[1]

                def call(xx, yy, dd, mm):
                    raw = RawData.from_coords_without_pc(xx, yy, dd, common.probe(N), None,
                                                         backend=be)
                    return raw.generate_grouped_data(N, K=K, nsamples=mm, seed=seed,
                                                     gridsize=gridsize)
            res = common.measure(lambda: call(x, y, diff, m),
                                 warmup=lambda: call(tx, ty, tdiff, 16), **kw)
            extra["X_full_bytes"] = m * C * N * N * 4
            extra["diff3d_bytes"] = int(diff.nbytes)
        else:
            raise ValueError(f"unknown method {method!r}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res.update(extra)
    return res


def _paired(spec, x, y) -> dict:
    """Time the fast methods round-robin in one process (timing only, no memory).

    On a shared machine the load drifts between the separate per-method processes; here
    every round calls each method once, back to back (the order rotates each round), so a
    per-round ratio compares calls made under the same load. Reports every time, the
    median of the per-round ratios and the ratio of the best times.
    """
    from gpugroup import sample_groups
    from gpugroup.grouping import sample_seeds

    n, m, K, C, seed = spec["n"], spec["nsamples"], spec["K"], spec["C"], spec["seed"]
    seeds = np.asarray(sample_seeds(np, n, m, seed))
    fns = {
        "cpu": lambda: sample_groups(x, y, m, K, C, seed=seed, backend="cpu"),
        "floor": lambda: legacy.knn_floor(x, y, seeds, K),
        "floor_fast": lambda: legacy.knn_floor(x, y, seeds, K, fast_build=True),
    }
    if spec.get("paired_loop", True):
        fns["loop"] = lambda: legacy.per_row_loop(x, y, m, K, C, seed=seed)
    if spec.get("paired_gpu"):
        fns["gpu"] = lambda: sample_groups(x, y, m, K, C, seed=seed, backend="gpu")
    for f in fns.values():  # warm-up calls (imports, caches, CUDA context)
        f()
    heap = "fresh pages"
    if spec.get("heap", "retained") == "retained" and common.retain_heap():
        heap = "retained heap"
    common.warm_memory(spec["warm_gib"])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    names = list(fns)
    times = {k: [] for k in names}
    t_start = time.perf_counter()
    rounds = 0
    while rounds < spec["rounds_min"] or (
            rounds < spec["rounds_max"] and time.perf_counter() - t_start < spec["paired_s"]):
        for k in names[rounds % len(names):] + names[: rounds % len(names)]:
            t0 = time.perf_counter()
            out = fns[k]()
            times[k].append(time.perf_counter() - t0)
            del out
        rounds += 1
    pairs = {"cpu/floor": ("cpu", "floor"), "cpu/floor_fast": ("cpu", "floor_fast"),
             "loop/cpu": ("loop", "cpu"), "gpu/floor": ("gpu", "floor"), "cpu/gpu": ("cpu", "gpu")}
    median, best = {}, {}
    for name, (a, b) in pairs.items():
        if a in times and b in times:
            median[name] = float(np.median(np.array(times[a]) / np.array(times[b])))
            best[name] = min(times[a]) / min(times[b])
    return {"times_s": times, "rounds": rounds, "median_ratio": median, "best_ratio": best,
            "best_s": {k: min(v) for k, v in times.items()}, "timing_heap": heap,
            "loadavg_1min_before": load}


# ============================================================================ parent side
def plan_runs(args, sizes):
    gpu = common.gpu_available()
    gpu_reason = common.gpu_status()
    avail = common.available_memory()
    runs = []
    for n in sizes:
        m = nsamples_for(n, args.nsamples_frac, args.nsamples_cap)
        for method in args.methods:
            spec = dict(method=method, n=n, nsamples=m, K=args.K, C=args.C, seed=args.seed,
                        N=args.N, repeats=args.repeats, budget_s=args.budget_s,
                        warm_gib=args.warm_gib, tracemalloc=not args.no_tracemalloc,
                        min_total_s=args.min_total_s, heap=args.heap)
            skip = None
            if method.endswith("gpu") and not gpu:
                skip = f"GPU backend {gpu_reason}"
            elif method == "legacy" and n > args.legacy_max:
                skip = (f"n > --legacy-max={args.legacy_max} (one Python iteration per position: "
                        f"~{n * 25e-6:.0f} s)")
            elif method == "loop" and n > args.loop_max:
                spec["loop_rows"] = min(m, args.loop_subset)
            elif method.startswith("e2e"):
                if math.isqrt(args.C) ** 2 != args.C:
                    skip = f"C={args.C} is not a square (gridsize**2)"
                else:
                    diff_b = n * args.N * args.N * 4
                    x_b = m * args.C * args.N * args.N * 4
                    need = diff_b + (6 if method == "e2e_legacy" else 3) * x_b
                    spec["warm_gib"] = max(args.warm_gib, min(need / common.GiB * 1.2,
                                                              0.6 * avail / common.GiB))
                    if n > args.e2e_max or need > 0.7 * avail:
                        skip = (f"memory: diff3d {diff_b / common.GiB:.1f} GiB + outputs "
                                f"~{(need - diff_b) / common.GiB:.1f} GiB vs "
                                f"{avail / common.GiB:.1f} GiB available"
                                if need > 0.7 * avail else f"n > --e2e-max={args.e2e_max}")
            runs.append((spec, skip))
        if args.paired and any(mm in args.methods for mm in ("cpu", "floor", "floor_fast", "loop")):
            spec = dict(method="paired", n=n, nsamples=m, K=args.K, C=args.C, seed=args.seed,
                        N=args.N, warm_gib=args.warm_gib, heap=args.heap,
                        rounds_min=args.paired_rounds, rounds_max=200, paired_s=args.paired_s,
                        paired_loop=n <= args.loop_max, paired_gpu=gpu and "gpu" in args.methods)
            runs.append((spec, None))
    return runs


def _ok(r):
    return r is not None and r.get("status") == "ok"


def summarize(results, sizes):
    """Per-n ratios and goal checks."""
    by = {(r["n"], r["method"]): r for r in results}
    rows = []
    for n in sizes:
        g = lambda meth, key="best_s": by[(n, meth)].get(key) if _ok(by.get((n, meth))) else None
        new, leg, loop, floor, gpu = g("cpu"), g("legacy"), g("loop"), g("floor"), g("gpu")
        row = {
            "n": n,
            "legacy_over_new_time": common.ratio(leg, new),
            "legacy_over_new_rss": common.ratio(g("legacy", "rss_peak_extra_bytes"),
                                                g("cpu", "rss_peak_extra_bytes")),
            "legacy_over_new_tracemalloc": common.ratio(g("legacy", "tracemalloc_peak_bytes"),
                                                        g("cpu", "tracemalloc_peak_bytes")),
            "loop_over_new_time": common.ratio(loop, new),
            "loop_extrapolated": bool(_ok(by.get((n, "loop")))
                                      and by[(n, "loop")].get("extrapolated")),
            "new_over_floor_time": common.ratio(new, floor),
            "new_over_floor_fast_time": common.ratio(new, g("floor_fast")),
            "gpu_over_floor_time": common.ratio(gpu, floor),
            "cpu_over_gpu_time": common.ratio(new, gpu),
            "e2e_legacy_over_new_time": common.ratio(g("e2e_legacy"), g("e2e_cpu")),
            "e2e_legacy_over_new_rss": common.ratio(g("e2e_legacy", "rss_peak_extra_bytes"),
                                                    g("e2e_cpu", "rss_peak_extra_bytes")),
            "e2e_legacy_over_new_tracemalloc": common.ratio(
                g("e2e_legacy", "tracemalloc_peak_bytes"), g("e2e_cpu", "tracemalloc_peak_bytes")),
        }
        pr = by.get((n, "paired"))
        pm = pr.get("median_ratio", {}) if _ok(pr) else {}
        row["paired_rounds"] = pr.get("rounds") if _ok(pr) else None
        row["paired_median_cpu_over_floor"] = pm.get("cpu/floor")
        row["paired_median_cpu_over_floor_fast"] = pm.get("cpu/floor_fast")
        row["paired_median_loop_over_cpu"] = pm.get("loop/cpu")
        row["paired_median_gpu_over_floor"] = pm.get("gpu/floor")
        ge = lambda v, goal: None if v is None else v >= goal
        le = lambda v, goal: None if v is None else v <= goal
        row["goal_floor"] = le(row["new_over_floor_time"], GOALS["floor"])
        row["goal_loop"] = ge(row["loop_over_new_time"], GOALS["loop"])
        row["goal_legacy"] = ge(row["legacy_over_new_time"], GOALS["legacy"])
        row["goal_floor_paired"] = le(row["paired_median_cpu_over_floor"], GOALS["floor"])
        row["goal_loop_paired"] = ge(row["paired_median_loop_over_cpu"], GOALS["loop"])
        rows.append(row)
    return rows


def _method_table(sizes, methods, by, cell, missing=lambda r: "—", nsamples=None):
    """Markdown rows of a table with one row per n and one column per method: ``cell(r)``
    for a method's result that ran, ``missing(r)`` (r may be None) for one that did not."""
    lead = ["n"] + (["nsamples"] if nsamples else [])
    L = ["| " + " | ".join(lead + [SHORT[m] for m in methods]) + " |",
         "|" + "---:|" * (len(lead) + len(methods))]
    for n in sizes:
        cells = [f"{n:,}"] + ([f"{nsamples(n):,}"] if nsamples else [])
        cells += [cell(r) if _ok(r) else missing(r) for r in (by.get((n, m)) for m in methods)]
        L.append("| " + " | ".join(cells) + " |")
    return L


def _time_cell(r):
    c = common.fmt_s(r["best_s"])
    return c + (f" (extrap. from {r['measured_rows']} rows)" if r.get("extrapolated") else "")


def _memory_cell(r):
    c = (f"{common.fmt_mib(r.get('rss_peak_extra_bytes'))} / "
         f"{common.fmt_mib(r.get('tracemalloc_peak_bytes'))}")
    return c + (f" ({r['measured_rows']} rows)" if r.get("extrapolated") else "")


def markdown(info, args, results, summary, sizes, wall_s):
    by = {(r["n"], r["method"]): r for r in results}
    methods = [m for m in args.methods if any(_ok(by.get((n, m))) for n in sizes)]
    L = [f"# gpugroup grouping benchmark — {info['date']}", "",
         f"Machine: {common.machine_line(info)}.", "",
         f"Settings: K={args.K}, C={args.C}, nsamples = n × {args.nsamples_frac:g}"
         f"{'' if args.nsamples_cap is None else f' (capped at {args.nsamples_cap})'}, "
         f"seed={args.seed}; "
         f"end-to-end runs use N={args.N}, gridsize={math.isqrt(args.C)}. "
         f"Each method runs in a fresh process that builds its inputs, runs once on a 256-point "
         f"scan (imports, lazy setup), then **warms memory** (allocates and touches "
         f"≥ {args.warm_gib:g} GiB once and frees it: on this VM first-touch memory is ~10× "
         f"slower and erratic), then right after: one call measured for peak RSS (its time is "
         f"the *first call, fresh pages* table). "
         + ("Then glibc malloc is told to keep freed memory (M_MMAP_MAX=0, huge "
            "M_TRIM_THRESHOLD), memory is warmed again, and the timed calls reuse those "
            "pages (no page faults): " if args.heap == "retained" else
            "Then the timed calls (fresh pages each): ")
         + f"at least one, up to {args.repeats} within {args.budget_s:g} s (methods under "
         f"{args.min_total_s:g} s in all: up to 30 calls); time = best call. Then one call "
         f"under tracemalloc. Whole run: {wall_s / 60:.1f} min.", "",
         "Peak RSS = RSS high-water mark during the call minus RSS just before it (VmHWM reset "
         "via /proc/self/clear_refs). tracemalloc = peak Python allocations during the call "
         "(NumPy buffers included; cKDTree's own C++ nodes are not seen by it).", "",
         "## Time (s, best of warm runs)", ""]
    L += _method_table(sizes, methods, by, _time_cell,
                       lambda r: "skipped" if r is None or r.get("status") == "skipped"
                       else "error",
                       nsamples=lambda n: nsamples_for(n, args.nsamples_frac, args.nsamples_cap))
    L += ["", "## First call on fresh pages (s; the peak-RSS call: page faults and VM first-touch "
          "cost included)", ""]
    L += _method_table(sizes, methods, by, lambda r: common.fmt_s(r.get("first_call_s")))
    L += ["", "## Peak memory (MiB): RSS over baseline / tracemalloc peak", ""]
    L += _method_table(sizes, methods, by, _memory_cell)
    L += ["", "## Ratios (new = gpugroup CPU)", "",
          "| n | legacy/new time | legacy/new RSS | legacy/new tracemalloc | loop/new time | "
          "new/floor time | new/floor (fast build) time | e2e legacy/new time | "
          "e2e legacy/new RSS | e2e legacy/new tracemalloc |"
          + (" CPU/GPU time | GPU/floor time |" if "gpu" in methods else ""),
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
          + ("---:|---:|" if "gpu" in methods else "")]
    for s in summary:
        f = common.fmt_ratio
        L.append(f"| {s['n']:,} | {f(s['legacy_over_new_time'])} | {f(s['legacy_over_new_rss'])} | "
                 f"{f(s['legacy_over_new_tracemalloc'])} | {f(s['loop_over_new_time'])}"
                 f"{'*' if s['loop_extrapolated'] else ''} | {f(s['new_over_floor_time'])} | "
                 f"{f(s['new_over_floor_fast_time'])} | "
                 f"{f(s['e2e_legacy_over_new_time'])} | {f(s['e2e_legacy_over_new_rss'])} | "
                 f"{f(s['e2e_legacy_over_new_tracemalloc'])} |"
                 + (f" {f(s['cpu_over_gpu_time'])} | {f(s['gpu_over_floor_time'])} |"
                    if "gpu" in methods else ""))
    if any(s["loop_extrapolated"] for s in summary):
        L.append("")
        L.append("\\* loop time extrapolated from a timed subset of rows (see the time table).")
    mark = lambda v: "—" if v is None else ("met" if v else "**MISSED**")
    L += ["", "The goal's kNN floor is a bare `cKDTree(points)` (SciPy defaults) + one "
          "K-query with workers=-1 for gpugroup's seeds (seed sampling not timed). gpugroup's "
          "CPU backend builds its tree with balanced_tree=False, compact_nodes=False, which "
          "builds faster on scan data, so it can beat that floor; \"floor (fast build)\" "
          "uses the same tree options and shows gpugroup's own overhead over its kNN."]
    f = common.fmt_ratio
    if any(s["paired_rounds"] for s in summary):
        L += ["", "## Paired timing (same process, methods interleaved round by round)", "",
              "The separate per-method processes above run minutes apart; on a shared machine "
              "the load drifts in between. Here one process calls gpugroup CPU, both floors and "
              "the loop (n ≤ --loop-max) once per round, in rotating order, and the ratio is "
              "taken per round (median over rounds; times on the retained heap).", "",
              "| n | rounds | gpugroup CPU (best s) | CPU/floor | CPU/floor (fast build) | "
              "loop/CPU |"
              + (" GPU/floor |" if "gpu" in methods else ""),
              "|---:|---:|---:|---:|---:|---:|" + ("---:|" if "gpu" in methods else "")]
        for s in summary:
            pr = by.get((s["n"], "paired"))
            if not _ok(pr):
                continue
            L.append(f"| {s['n']:,} | {s['paired_rounds']} | "
                     f"{common.fmt_s(pr['best_s'].get('cpu'))} | "
                     f"{f(s['paired_median_cpu_over_floor'])} | "
                     f"{f(s['paired_median_cpu_over_floor_fast'])} | "
                     f"{f(s['paired_median_loop_over_cpu'])} |"
                     + (f" {f(s['paired_median_gpu_over_floor'])} |" if "gpu" in methods else ""))
    L += ["", "## Goals (issue 4, gpugroup CPU)", "",
          "Separate = best-of ratios of the separate processes (tables above); paired = median "
          "per-round ratio of the paired timing.", "",
          f"| n | ≤ {GOALS['floor']}× kNN floor (separate) | (paired) | "
          f"≥ {GOALS['loop']}× faster "
          f"than loop (separate) | (paired) | ≥ {GOALS['legacy']:g}× faster than legacy |",
          "|---:|---|---|---|---|---|"]
    for s in summary:
        L.append(f"| {s['n']:,} | {mark(s['goal_floor'])} ({f(s['new_over_floor_time'])}×) | "
                 f"{mark(s['goal_floor_paired'])} ({f(s['paired_median_cpu_over_floor'])}×) | "
                 f"{mark(s['goal_loop'])} ({f(s['loop_over_new_time'])}×"
                 f"{', extrapolated' if s['loop_extrapolated'] else ''}) | "
                 f"{mark(s['goal_loop_paired'])} ({f(s['paired_median_loop_over_cpu'])}×) | "
                 f"{mark(s['goal_legacy'])} ({f(s['legacy_over_new_time'])}×) |")
    notes = []
    loads = [r["loadavg_1min_before"] for r in results if r.get("loadavg_1min_before") is not None]
    if loads:
        notes.append(f"- 1-min load average just before the measured calls: {min(loads):.1f} to "
                     f"{max(loads):.1f} on {info['cores_usable']} cores (above ~1 means other jobs "
                     f"shared the CPU and timings are pessimistic/noisy)")
    for r in results:
        if r.get("status") != "ok":
            notes.append(f"- n={r['n']:,} {SHORT.get(r['method'], r['method'])}: "
                         f"{r.get('status')}: "
                         f"{r.get('reason') or r.get('error')}")
        elif r["method"] == "legacy" and "cached_run_s" in r:
            notes.append(f"- n={r['n']:,} legacy: second run from its cache file "
                         f"({common.fmt_mib(r['cache_file_bytes'])} MiB) takes "
                         f"{common.fmt_s(r['cached_run_s'])} s")
    if notes:
        L += ["", "## Notes", ""] + notes
    return "\n".join(L) + "\n"


def plot(path, results, sizes, methods):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(16, 5.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, m in enumerate(methods):
        rs = [r for r in results if r["method"] == m and _ok(r)]
        if not rs:
            continue
        col = colors[i % len(colors)]
        ns = [r["n"] for r in rs]
        ax_t.plot(ns, [r["best_s"] for r in rs], "o-", color=col, label=SHORT[m])
        for r in rs:
            if r.get("extrapolated"):
                ax_t.plot([r["n"]], [r["best_s"]], "o", mfc="white", color=col)
        rss = [(r["n"], r["rss_peak_extra_bytes"] / common.MiB) for r in rs
               if (r.get("rss_peak_extra_bytes") or 0) > 0]
        tm = [(r["n"], r["tracemalloc_peak_bytes"] / common.MiB) for r in rs
              if (r.get("tracemalloc_peak_bytes") or 0) > 0]
        if rss:
            ax_m.plot(*zip(*rss), "o-", color=col, label=f"{SHORT[m]} (RSS)")
        if tm:
            ax_m.plot(*zip(*tm), "s--", color=col, alpha=0.6, label=f"{SHORT[m]} (tracemalloc)")
    ax_t.set(xscale="log", yscale="log", xlabel="scan positions n (nsamples = n/10)",
             ylabel="wall time (s, best of warm runs)", title="Time")
    ax_m.set(xscale="log", yscale="log", xlabel="scan positions n",
             ylabel="peak extra memory (MiB)",
             title="Peak memory: RSS (solid), tracemalloc (dashed)")
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    ax_m.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.suptitle("gpugroup grouping benchmark (open marker: extrapolated)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def profile(n: int, args) -> None:
    """cProfile of one warm sample_groups call at ``n`` positions (stdout)."""
    import cProfile
    import pstats

    from gpugroup import sample_groups

    common.warm_memory(args.warm_gib)
    x, y = common.jittered_scan(n, seed=args.seed)
    m = nsamples_for(n, args.nsamples_frac, args.nsamples_cap)
    sample_groups(x, y, m, args.K, args.C, seed=args.seed, backend="cpu")  # warm
    t = time.perf_counter()
    sample_groups(x, y, m, args.K, args.C, seed=args.seed, backend="cpu")
    print(f"sample_groups n={n:,} nsamples={m:,} K={args.K} C={args.C}: "
          f"{time.perf_counter() - t:.3f} s (unprofiled)")
    pr = cProfile.Profile()
    pr.enable()
    sample_groups(x, y, m, args.K, args.C, seed=args.seed, backend="cpu")
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(args.profile_top)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if common.worker_main(argv, _run_spec):
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None,
                   help="comma-separated n, e.g. 1K,10K,100K,1M (default; plus 10M on a GPU)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--K", type=int, default=7)
    p.add_argument("--C", type=int, default=4)
    p.add_argument("--N", type=int, default=64, help="frame size of the end-to-end runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nsamples-frac", type=float, default=0.1)
    p.add_argument("--nsamples-cap", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per method (best reported)")
    p.add_argument("--budget-s", type=float, default=60.0, help="stop repeating after this long")
    p.add_argument("--warm-gib", type=float, default=2.0, help="memory warmed in each process")
    p.add_argument("--legacy-max", type=parse_size, default=1_000_000)
    p.add_argument("--loop-max", type=parse_size, default=1_000_000,
                   help="above this n the loop times --loop-subset rows and extrapolates")
    p.add_argument("--loop-subset", type=int, default=100_000)
    p.add_argument("--e2e-max", type=parse_size, default=10_000_000)
    p.add_argument("--min-total-s", type=float, default=1.0,
                   help="fast methods repeat (up to 30 calls) until this much time is spent")
    p.add_argument("--heap", choices=("retained", "fresh"), default="retained",
                   help="timed calls reuse a retained, pre-touched heap (default) or get "
                        "fresh pages from the kernel like the first call")
    p.add_argument("--no-paired", dest="paired", action="store_false",
                   help="skip the interleaved (paired) timing of cpu/floor/loop per size")
    p.add_argument("--paired-rounds", type=int, default=5, help="paired rounds, at least")
    p.add_argument("--paired-s", type=float, default=20.0,
                   help="keep adding paired rounds (up to 200) for this long")
    p.add_argument("--no-tracemalloc", action="store_true")
    p.add_argument("--timeout-s", type=float, default=3600, help="per worker process")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--machine", default=None, help="machine tag in the file names")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--profile", type=parse_size, default=None, metavar="N",
                   help="only cProfile sample_groups at N positions and exit")
    p.add_argument("--profile-top", type=int, default=25)
    p.add_argument("--replot", default=None, metavar="JSON",
                   help="only redraw the PNG beside an earlier result JSON and exit")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {list(METHODS)}")
    if args.profile:
        profile(args.profile, args)
        return 0
    if args.replot:
        import json

        data = json.loads(Path(args.replot).read_text())
        png = Path(args.replot).with_suffix(".png")
        plot(png, data["results"], data["sizes"], list(data["methods"]))
        print(f"wrote {png}", file=sys.stderr)
        return 0
    if args.sizes:
        sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    else:
        sizes = [1_000, 10_000, 100_000, 1_000_000]
        if common.gpu_available():
            sizes.append(10_000_000)
    info = common.machine_info()
    runs = plan_runs(args, sizes)
    bar = common.progress_bar(len(runs), "grouping benchmark")
    results = []
    t0 = time.perf_counter()
    for spec, skip in runs:
        bar.set_postfix_str(f"n={spec['n']:,} {spec['method']}")
        if skip:
            res = {"status": "skipped", "reason": skip}
        else:
            res = common.run_worker(MODULE, spec, args.timeout_s)
        res.update(method=spec["method"], n=spec["n"], nsamples=spec["nsamples"],
                   warm_gib_requested=spec["warm_gib"])
        results.append(res)
        bar.update(1)
    bar.close()
    wall = time.perf_counter() - t0
    summary = summarize(results, sizes)
    md_path, json_path, png_path = common.result_paths("grouping", info, args.out, args.machine)
    text = markdown(info, args, results, summary, sizes, wall)
    print(text)
    md_path.write_text(text)
    common.write_json(json_path, {
        "benchmark": "grouping", "machine": info, "settings": {
            k: v for k, v in vars(args).items() if k not in ("profile", "profile_top")},
        "sizes": sizes, "methods": {m: METHODS[m] for m in args.methods},
        "goals": GOALS, "results": results, "summary": summary, "wall_s": wall})
    written = [md_path, json_path]
    if not args.no_plot and plot(png_path, results, sizes, args.methods):
        written.append(png_path)
    print("wrote " + ", ".join(str(w) for w in written), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
