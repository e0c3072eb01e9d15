#!/usr/bin/env python3
"""CPU grouping before and after issue 16 (cores used), side by side in one run.

For each n (default 1e6 and 1e7; Fermat spiral, nsamples = n/10, K = 16, C = 4, the issue's
configuration) it times, in one process and interleaved round by round (so both see the same
machine load):

  before  the CPU backend of ``--baseline-rev`` (one cKDTree built by one thread, rows in
          seed order), loaded from git, run by this tree's grouping code
  after   this tree's CPU backend (a forest of slab trees built in threads, rows in leaf
          order, blocks on all cores)

and reports best-of-rounds seconds per step (index build, pools, members) and end to end
(``sample_groups``), the after/before ratios, and whether the groups are identical.
Writes ``results/cpu-cores-<machine>-<date>.json`` and ``.md``::

    python benchmarks/benchmark_cpu_cores.py --machine 2c-intel-xeon
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import gpugroup  # noqa: E402
from gpugroup import grouping, sample_groups  # noqa: E402
from gpugroup.backends import Backend, cpu  # noqa: E402
from gpugroup.simulate import fermat_spiral  # noqa: E402


def baseline_backend(rev: str) -> Backend:
    """The CPU backend as it was at ``rev`` (its cpu.py, imported beside this tree's code)."""
    src = subprocess.run(["git", "show", f"{rev}:gpugroup/backends/cpu.py"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    mod = types.ModuleType(f"cpu_{rev}")
    exec(compile(src, f"{rev}:gpugroup/backends/cpu.py", "exec"), mod.__dict__)
    return mod.BACKEND


def steps(be: Backend, x, y, m: int, K: int, C: int, seed: int) -> dict:
    """Seconds of each step of one grouping, and the whole call."""
    t = {}
    t0 = time.perf_counter()
    seeds = grouping.sample_seeds(np, len(x), m, seed, threads=getattr(be, "threads", 1))
    t["seeds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = be.build_index(x, y)
    t["build_index"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pool = grouping.neighbour_pool(np, x, y, seeds, K, index,
                                   threads=getattr(be, "threads", 1))
    t["neighbour_pool"] = time.perf_counter() - t0
    del index, pool
    t0 = time.perf_counter()
    groups = sample_groups(x, y, m, K, C, seed=seed, backend=be)
    t["sample_groups"] = time.perf_counter() - t0
    return t, groups


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--sizes", default="1e6,1e7")
    p.add_argument("--K", type=int, default=16)
    p.add_argument("--C", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (best reported)")
    p.add_argument("--baseline-rev", default="42415ff",
                   help="git revision whose CPU backend is 'before' (default %(default)s)")
    p.add_argument("--machine", default=platform.node() or "unknown")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)
    sizes = [int(float(s)) for s in args.sizes.split(",") if s.strip()]
    variants = {"before": baseline_backend(args.baseline_rev), "after": cpu.BACKEND}
    date = _dt.date.today().isoformat()
    data = {"schema": "gpugroup-cpu-cores/1", "machine": args.machine, "date": date,
            "cpu_count": cpu.cpu_count(), "platform": platform.platform(),
            "python": sys.version.split()[0], "numpy": np.__version__,
            "gpugroup": gpugroup.__version__, "baseline_rev": args.baseline_rev,
            "K": args.K, "C": args.C, "rounds": args.rounds, "rows": []}
    try:
        import scipy

        data["scipy"] = scipy.__version__
    except ImportError:
        pass
    for n in sizes:
        x, y = fermat_spiral(n, spacing=1.0, jitter=0.1, rng=np.random.default_rng(n))
        m = max(1, n // 10)
        best: dict = {v: {} for v in variants}
        groups = {}
        for r in range(args.rounds):
            for v, be in (variants.items() if r % 2 == 0 else reversed(variants.items())):
                t, groups[v] = steps(be, x, y, m, args.K, args.C, seed=7)
                for k, s in t.items():
                    best[v][k] = min(s, best[v].get(k, np.inf))
                print(f"[cpu-cores] n={n:.0e} round {r} {v}: "
                      + ", ".join(f"{k} {s:.3f}" for k, s in t.items()), flush=True)
        row = {"n": n, "nsamples": m, "best_s": best,
               "ratio_after_over_before": {k: best["after"][k] / best["before"][k]
                                           for k in best["after"]},
               "identical_groups": bool(np.array_equal(groups["before"], groups["after"]))}
        data["rows"].append(row)
        del x, y, groups
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"cpu-cores-{args.machine}-{date}"
    stem.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    lines = [f"# CPU grouping, before ({args.baseline_rev}) and after, on {args.machine}",
             "",
             f"{data['cpu_count']} cores, Python {data['python']}, NumPy {data['numpy']}, "
             f"SciPy {data.get('scipy')}; Fermat spiral, nsamples = n/10, K = {args.K}, "
             f"C = {args.C}; best of {args.rounds} interleaved rounds, seconds.",
             "",
             "| n | step | before | after | after/before |",
             "|---|---|---|---|---|"]
    for row in data["rows"]:
        for k, ratio in row["ratio_after_over_before"].items():
            lines.append(f"| {row['n']:.0e} | {k} | {row['best_s']['before'][k]:.3f} | "
                         f"{row['best_s']['after'][k]:.3f} | {ratio:.2f} |")
        lines.append(f"| {row['n']:.0e} | groups identical | | | {row['identical_groups']} |")
    text = "\n".join(lines) + "\n"
    stem.with_suffix(".md").write_text(text)
    print(text)
    return 0 if all(r["identical_groups"] for r in data["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
