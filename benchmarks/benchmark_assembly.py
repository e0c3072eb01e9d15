"""Assembly benchmark (issue 4): PtychoPINN-style channel-last assembly vs gpugroup.

Default case (issue 4): a scan of n = 12 000 positions with 64 x 64 float32 frames,
B = 12 000 groups of C = 4 (K = 7), so X_full is 12 000 x 64 x 64 x 4 float32 = 750 MiB.
The same ``nn_indices`` (from ``gpugroup.sample_groups``, computed before any
measurement) feed every assembly-only method:

  legacy            benchmarks.legacy.assemble_legacy: gather (B, C, N, N), transpose +
                    ascontiguousarray, normalize through a float64 copy (+ coords)
  assemble          gpugroup.assembly.assemble_groups(keep_diffraction=True), no Y/objectGuess
  assemble_nodiff   the same with keep_diffraction=False
  assemble_1worker  keep_diffraction=True, workers=1 (how much the second core adds)
  generate          RawData.generate_grouped_data(gridsize=2, keep_diffraction=True): also
                    samples the groups and computes the coordinates (end to end)
  generate_nodiff   the same with keep_diffraction=False
  generate_gpu(_nodiff)  the same on the GPU backend, when available (host RSS only)

Each method runs in a fresh process after warming memory (allocate + touch + free
``--warm-gib`` GiB; first-touch memory on these VMs is ~10x slower), with best-of-N warm
timing, peak RSS over the RSS before the call, and the tracemalloc peak, both also as a
ratio to the size of X_full. A separate ``check`` process verifies that gpugroup's
``X_full``/``diffraction``/coords equal the legacy ones (rtol 1e-6).

Usage::

    python -m benchmarks.benchmark_assembly
    python -m benchmarks.benchmark_assembly --n 2000 --groups 2000 --repeats 3
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks import common, legacy

MODULE = "benchmarks.benchmark_assembly"

METHODS = {
    "legacy": "legacy: gather + transpose + float64 normalize (PtychoPINN-style)",
    "assemble": "gpugroup assemble_groups, keep_diffraction=True",
    "assemble_nodiff": "gpugroup assemble_groups, keep_diffraction=False",
    "assemble_1worker": "gpugroup assemble_groups, keep_diffraction=True, workers=1",
    "generate": "gpugroup generate_grouped_data (grouping + assembly), keep_diffraction=True",
    "generate_nodiff": "gpugroup generate_grouped_data, keep_diffraction=False",
    "generate_gpu": "gpugroup generate_grouped_data on the GPU, keep_diffraction=True",
    "generate_gpu_nodiff": "gpugroup generate_grouped_data on the GPU, keep_diffraction=False",
}
#: (speed-up vs legacy >=, peak extra / X_full <=) per method; None = not a goal.
GOALS = {
    "assemble": (3.0, 2.25),
    "assemble_nodiff": (3.0, 1.25),
    "generate": (3.0, 2.25),
    "generate_nodiff": (3.0, 1.25),
}


def _inputs(spec):
    n, B, K, C, N, seed = (spec[k] for k in ("n", "groups", "K", "C", "N", "seed"))
    from gpugroup import sample_groups

    x, y = common.jittered_scan(n, seed=seed, spacing=N / 8)
    diff = common.diffraction_stack(n, N, seed=seed)
    nn = sample_groups(x, y, B, K, C, seed=seed, backend="cpu")
    return x, y, diff, nn


def _caller(method, spec, x, y, diff, nn):
    N, K, C, seed = spec["N"], spec["K"], spec["C"], spec["seed"]
    kw = {}
    if spec.get("chunk_bytes"):
        kw["chunk_bytes"] = spec["chunk_bytes"]
    if method == "legacy":
        return lambda: legacy.assemble_legacy(diff, nn, N, x, y)
    if method.startswith("assemble"):
        from gpugroup import assembly
        from gpugroup.schema import ScanArrays

        if method == "assemble_1worker":
            kw["workers"] = 1
        elif spec.get("workers"):
            kw["workers"] = spec["workers"]
        keep = method != "assemble_nodiff"
        return lambda: assembly.assemble_groups(np, ScanArrays(x, y, diff), nn, N,
                                                keep_diffraction=keep, **kw)
    if method.startswith("generate"):
        from gpugroup import RawData

        backend = "gpu" if "_gpu" in method else "cpu"
        keep = not method.endswith("nodiff")
        B = int(nn.shape[0])

        def call():
            raw = RawData.from_coords_without_pc(x, y, diff, common.probe(N), None,
                                                 backend=backend)
            return raw.generate_grouped_data(N, K=K, nsamples=B, seed=seed,
                                             gridsize=math.isqrt(C), keep_diffraction=keep, **kw)
        return call
    raise ValueError(f"unknown method {method!r}")


def _check(spec, x, y, diff, nn):
    """gpugroup vs legacy on the same groups: max relative differences."""
    from gpugroup import assembly
    from gpugroup.schema import ScanArrays

    old = legacy.assemble_legacy(diff, nn, spec["N"], x, y)
    new = assembly.assemble_groups(np, ScanArrays(x, y, diff), nn, spec["N"],
                                   keep_diffraction=True)
    out = {"diffraction_equal": bool(np.array_equal(old["diffraction"], new["diffraction"])),
           "norm_scale_rel_diff": abs(old["norm_scale"] - new["norm_scale"]) / old["norm_scale"]}
    for k in ("X_full", "coords_nn", "coords_offsets", "coords_relative"):
        a, b = np.asarray(old[k], np.float64), np.asarray(new[k], np.float64)
        out[f"{k}_shape_equal"] = a.shape == b.shape
        out[f"{k}_max_rel_diff"] = float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-30)))
    out["all_close"] = bool(out["diffraction_equal"] and all(
        out[f"{k}_shape_equal"] and out[f"{k}_max_rel_diff"] <= 1e-6
        for k in ("X_full", "coords_nn", "coords_offsets")))
    return out


def _paired(spec, x, y, diff, nn) -> dict:
    """Round-robin timing of the CPU methods in one process (timing only, no memory).

    Every round calls each method once, back to back, in rotating order, so per-round
    ratios compare calls made under the same machine load.
    """
    names = [m for m in spec["paired_methods"]]
    fns = {m: _caller(m, spec, x, y, diff, nn) for m in names}
    for f in fns.values():  # warm-up calls
        f()
    heap = "fresh pages"
    if spec.get("heap", "retained") == "retained" and common.retain_heap():
        heap = "retained heap"
    common.warm_memory(spec["warm_gib"])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    times = {m: [] for m in names}
    t_start = time.perf_counter()
    rounds = 0
    while rounds < spec["rounds_min"] or (
            rounds < spec["rounds_max"] and time.perf_counter() - t_start < spec["paired_s"]):
        for m in names[rounds % len(names):] + names[: rounds % len(names)]:
            t0 = time.perf_counter()
            out = fns[m]()
            times[m].append(time.perf_counter() - t0)
            del out
        rounds += 1
    median, best = {}, {}
    if "legacy" in times:
        for m in names:
            median[m] = float(np.median(np.array(times["legacy"]) / np.array(times[m])))
            best[m] = min(times["legacy"]) / min(times[m])
    return {"times_s": times, "rounds": rounds, "best_s": {m: min(v) for m, v in times.items()},
            "median_speedup_vs_legacy": median, "best_speedup_vs_legacy": best,
            "timing_heap": heap, "loadavg_1min_before": load}


def _run_spec(spec: dict) -> dict:
    x, y, diff, nn = _inputs(spec)
    if spec["method"] == "paired":
        return _paired(spec, x, y, diff, nn)
    if spec["method"] == "check":
        res = _check(spec, x, y, diff, nn)
        res["warm_s"] = None
    else:
        tiny = dict(spec, n=256, groups=64)
        tx, ty, tdiff, tnn = _inputs(tiny)
        res = common.measure(_caller(spec["method"], spec, x, y, diff, nn),
                             warmup=_caller(spec["method"], tiny, tx, ty, tdiff, tnn),
                             repeats=spec["repeats"], budget_s=spec["budget_s"],
                             use_tracemalloc=spec["tracemalloc"], warm_gib=spec["warm_gib"],
                             min_total_s=spec.get("min_total_s", 1.0),
                             heap=spec.get("heap", "retained"))
    return res


# ============================================================================ parent side
def markdown(info, args, results, check, xbytes, wall_s, paired=None):
    by = {r["method"]: r for r in results}
    ok = by.get("legacy", {}).get("status") == "ok"
    base = by["legacy"]["best_s"] if ok else None
    base1 = by["legacy"].get("first_call_s") if ok else None
    L = [f"# gpugroup assembly benchmark — {info['date']}", "",
         f"Machine: {common.machine_line(info)}.", "",
         f"Case: scan of n={args.n:,} positions, {args.groups:,} groups × C={args.C} frames of "
         f"{args.N}×{args.N} float32 (K={args.K}); X_full = {xbytes / common.MiB:.0f} MiB; no Y / "
         f"objectGuess (Y is None). All assembly-only methods use the same nn_indices. "
         f"Each method runs in a fresh process that builds its inputs, runs once on a tiny input, "
         f"then **warms memory** (allocates and touches {args.warm_gib:.1f} GiB once and frees "
         f"it: on this VM first-touch memory is ~10× slower and erratic), then right after: one "
         f"call measured for peak RSS (its time is the *first call, fresh pages* column). "
         + ("Then glibc malloc is told to keep freed memory (M_MMAP_MAX=0, huge "
            "M_TRIM_THRESHOLD), memory is warmed again and the timed calls reuse those pages "
            "(no page faults): " if args.heap == "retained" else
            "Then the timed calls (fresh pages each): ")
         + f"at least one, up to {args.repeats} within {args.budget_s:g} s; time = best call. "
         f"Then one call under tracemalloc. "
         f"Peak extra = RSS high-water mark minus RSS just before the call (outputs included). "
         f"Whole run: {wall_s / 60:.1f} min.", "",
         "| method | time (s) | speed-up vs legacy | first call, fresh pages (s) | "
         "speed-up, first calls | peak RSS extra (MiB) | RSS / X_full | "
         "tracemalloc peak (MiB) | tracemalloc / X_full | goals |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for m in args.methods:
        r = by.get(m)
        if r is None or r.get("status") != "ok":
            why = ("not run" if r is None
                   else f"{r.get('status')}: {r.get('reason') or r.get('error')}")
            L.append(f"| {m} | {why} | | | | | | | | |")
            continue
        sp = common.ratio(base, r["best_s"])
        rss, tm = r.get("rss_peak_extra_bytes"), r.get("tracemalloc_peak_bytes")
        goal = GOALS.get(m)
        g = "—"
        if goal:
            parts = []
            if sp is not None:
                parts.append(f"≥{goal[0]:g}× {'met' if sp >= goal[0] else '**MISSED**'}")
            if rss is not None:
                verdict = "met" if rss / xbytes <= goal[1] else "**MISSED**"
                parts.append(f"≤{goal[1]:g}× mem {verdict}")
            g = ", ".join(parts)
        sp1 = common.ratio(base1, r.get("first_call_s"))
        L.append(f"| {m} | {common.fmt_s(r['best_s'])} | {common.fmt_ratio(sp)} | "
                 f"{common.fmt_s(r.get('first_call_s'))} | {common.fmt_ratio(sp1)} | "
                 f"{common.fmt_mib(rss)} | {common.fmt_ratio(common.ratio(rss, xbytes))} | "
                 f"{common.fmt_mib(tm)} | {common.fmt_ratio(common.ratio(tm, xbytes))} | {g} |")
    L += ["", "Methods: " + "; ".join(f"`{m}` = {METHODS[m]}" for m in args.methods) + ".", ""]
    loads = [r["loadavg_1min_before"] for r in results if r.get("loadavg_1min_before") is not None]
    if loads:
        L += [f"1-min load average just before the measured calls: {min(loads):.1f} to "
              f"{max(loads):.1f} on {info['cores_usable']} cores (above ~1 means other jobs shared "
              f"the CPU and timings are pessimistic/noisy).", ""]
    if paired is not None:
        if paired.get("status") == "ok":
            L += ["## Paired timing (one process, methods interleaved round by round)", "",
                  "The separate processes above run a minute or more apart and the machine's "
                  "load drifts in between; here one process calls every CPU method once per "
                  f"round in rotating order ({paired['rounds']} rounds, retained heap) and the "
                  "speed-ups are the ratio of best times and the median of the per-round ratios. "
                  "The goal uses the smaller of the two: in one process the legacy path's "
                  "4.5 GiB of temporaries can outgrow the retained heap once other methods' "
                  "allocations fragment it, and then its calls pay fresh-page faults again "
                  "(its times vary), which would inflate the median.", "",
                  "| method | best (s) | median (s) | speed-up vs legacy (best/best) | "
                  "median per-round speed-up | goal |",
                  "|---|---:|---:|---:|---:|---|"]
            for m, t in paired["times_s"].items():
                sp = paired["median_speedup_vs_legacy"].get(m)
                spb = paired["best_speedup_vs_legacy"].get(m)
                goal = GOALS.get(m)
                low = min(v for v in (sp, spb) if v is not None) if (sp or spb) else None
                g = "—" if not goal or low is None else (
                    f"≥{goal[0]:g}× {'met' if low >= goal[0] else '**MISSED**'}")
                L.append(f"| {m} | {common.fmt_s(min(t))} | {common.fmt_s(float(np.median(t)))} | "
                         f"{common.fmt_ratio(spb)} | {common.fmt_ratio(sp)} | {g} |")
            L.append("")
        else:
            L += [f"Paired timing failed: {paired.get('error')}", ""]
    if check is not None:
        if check.get("status") == "ok":
            L.append(f"Correctness check (gpugroup vs legacy, same groups): all close = "
                     f"{check['all_close']}; diffraction identical = {check['diffraction_equal']}; "
                     f"X_full max rel diff = {check['X_full_max_rel_diff']:.2e}; norm scale rel "
                     f"diff = {check['norm_scale_rel_diff']:.2e}.")
        else:
            L.append(f"Correctness check failed to run: {check.get('error')}")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if common.worker_main(argv, _run_spec):
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=12_000, help="scan positions (frames)")
    p.add_argument("--groups", type=int, default=12_000, help="groups B (nsamples)")
    p.add_argument("--K", type=int, default=7)
    p.add_argument("--C", type=int, default=4)
    p.add_argument("--N", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=60.0)
    p.add_argument("--warm-gib", type=float, default=None,
                   help="memory warmed per process (default: 6 x X_full + 1 GiB, capped)")
    p.add_argument("--chunk-bytes", type=int, default=None, help="passed to gpugroup")
    p.add_argument("--workers", type=int, default=None, help="passed to assemble_groups")
    p.add_argument("--min-total-s", type=float, default=1.0,
                   help="fast methods repeat (up to 30 calls) until this much time is spent")
    p.add_argument("--heap", choices=("retained", "fresh"), default="retained",
                   help="timed calls reuse a retained, pre-touched heap (default) or get "
                        "fresh pages from the kernel like the first call")
    p.add_argument("--no-tracemalloc", action="store_true")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--no-paired", dest="paired", action="store_false",
                   help="skip the interleaved (paired) timing")
    p.add_argument("--paired-rounds", type=int, default=5, help="paired rounds, at least")
    p.add_argument("--paired-s", type=float, default=30.0,
                   help="keep adding paired rounds (up to 50) for this long")
    p.add_argument("--timeout-s", type=float, default=1800)
    p.add_argument("--out", default=None)
    p.add_argument("--machine", default=None)
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {list(METHODS)}")
    if math.isqrt(args.C) ** 2 != args.C:
        p.error(f"C={args.C} must be a square (gridsize**2)")
    xbytes = args.groups * args.C * args.N * args.N * 4
    if args.warm_gib is None:
        args.warm_gib = min((6 * xbytes + common.GiB) / common.GiB,
                            0.6 * common.available_memory() / common.GiB)
    info = common.machine_info()
    gpu = common.gpu_available()
    spec0 = dict(n=args.n, groups=args.groups, K=args.K, C=args.C, N=args.N, seed=args.seed,
                 repeats=args.repeats, budget_s=args.budget_s, warm_gib=args.warm_gib,
                 chunk_bytes=args.chunk_bytes, workers=args.workers,
                 tracemalloc=not args.no_tracemalloc, min_total_s=args.min_total_s,
                 heap=args.heap)
    paired_methods = [m for m in args.methods if "_gpu" not in m]
    do_paired = args.paired and "legacy" in paired_methods and len(paired_methods) > 1
    todo = (list(args.methods) + (["paired"] if do_paired else [])
            + ([] if args.no_check else ["check"]))
    bar = common.progress_bar(len(todo), "assembly benchmark")
    results, check, paired = [], None, None
    t0 = time.perf_counter()
    for m in todo:
        bar.set_postfix_str(m)
        if "_gpu" in m and not gpu:
            res = {"status": "skipped", "reason": f"GPU backend {common.gpu_status()}"}
        else:
            spec = dict(spec0, method=m)
            if m == "paired":  # holds every method's peak in one retained heap: warm more
                spec.update(paired_methods=paired_methods, rounds_min=args.paired_rounds,
                            rounds_max=50, paired_s=args.paired_s,
                            warm_gib=min(2 * args.warm_gib,
                                         0.6 * common.available_memory() / common.GiB))
            res = common.run_worker(MODULE, spec, args.timeout_s)
        res["method"] = m
        if m == "check":
            check = res
        elif m == "paired":
            paired = res
        else:
            results.append(res)
        bar.update(1)
    bar.close()
    wall = time.perf_counter() - t0
    by = {r["method"]: r for r in results}
    legacy_ok = by.get("legacy", {}).get("status") == "ok"
    base = by["legacy"]["best_s"] if legacy_ok else None
    summary = {}
    for r in results:
        if r.get("status") != "ok":
            continue
        s = {"speedup_vs_legacy": common.ratio(base, r["best_s"]),
             "speedup_vs_legacy_first_calls": common.ratio(
                 by["legacy"].get("first_call_s") if base else None, r.get("first_call_s")),
             "rss_over_X_full": common.ratio(r.get("rss_peak_extra_bytes"), xbytes),
             "tracemalloc_over_X_full": common.ratio(r.get("tracemalloc_peak_bytes"), xbytes)}
        if paired is not None and paired.get("status") == "ok":
            s["paired_median_speedup_vs_legacy"] = \
                paired["median_speedup_vs_legacy"].get(r["method"])
            s["paired_best_speedup_vs_legacy"] = paired["best_speedup_vs_legacy"].get(r["method"])
        if r["method"] in GOALS:
            sp_goal, mem_goal = GOALS[r["method"]]
            sp = s["speedup_vs_legacy"]
            s["goal_speedup"] = None if sp is None else sp >= sp_goal
            pm = [v for v in (s.get("paired_median_speedup_vs_legacy"),
                              s.get("paired_best_speedup_vs_legacy")) if v is not None]
            s["goal_speedup_paired"] = min(pm) >= sp_goal if pm else None
            mem = s["rss_over_X_full"]
            s["goal_memory"] = None if mem is None else mem <= mem_goal
        summary[r["method"]] = s
    md_path, json_path, _ = common.result_paths("assembly", info, args.out, args.machine)
    text = markdown(info, args, results, check, xbytes, wall, paired)
    print(text)
    md_path.write_text(text)
    common.write_json(json_path, {
        "benchmark": "assembly", "machine": info, "settings": vars(args),
        "X_full_bytes": xbytes, "methods": {m: METHODS[m] for m in args.methods},
        "goals": {m: {"speedup_ge": g[0], "peak_extra_over_X_full_le": g[1]}
                  for m, g in GOALS.items()},
        "results": results, "summary": summary, "paired": paired, "check": check,
        "wall_s": wall})
    print(f"wrote {md_path}, {json_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
