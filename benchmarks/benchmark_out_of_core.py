"""Out-of-core benchmark (issue 5): group a scan whose frame stack is larger than RAM into
an on-disk output, and report throughput and peak memory.

The input stack is written to disk first (NPZ, HDF5 or Zarr; ``--size-gb``, default: 1.25x
this machine's available memory when the disk can hold input and output with a safety
margin, else the largest that fits). Its pages are then dropped from the page cache
(``posix_fadvise(DONTNEED)``) so reads come from the disk. Then

  stream   RawData.from_file(IN, mmap_mode="r").generate_grouped_data(..., out=OUT):
           energies of the frames used, then one gather pass writing X_full (and
           diffraction with --keep-diffraction) chunk by chunk, atomically;
  dask     the same groups through gpugroup.dask on a LocalCluster of worker processes,
           written to a Zarr store by the workers (each block its own region).

It reports the seconds, the bytes read from the input and written to the output, GB/s
(decimal, 1e9 bytes), and the peak RSS of the grouping call above the RSS before it
(VmHWM reset through /proc/self/clear_refs; the dask engine: the client process only).
Results go to ``benchmarks/results/out_of_core-<machine>-<date>.json``.

Usage::

    python -m benchmarks.benchmark_out_of_core --size-gb 2          # a quick check
    python -m benchmarks.benchmark_out_of_core                      # larger than RAM
    python -m benchmarks.benchmark_out_of_core --size-gb 8 --format-in h5 --format-out zarr
    python -m benchmarks.benchmark_out_of_core --size-gb 8 --engine dask --format-out zarr
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402

GB = 1e9
SUFFIX = {"npz": ".npz", "h5": ".h5", "zarr": ".zarr"}


def plan_size(args, frame_bytes, out_per_in):
    """Input stack bytes: ``--size-gb`` or larger than free RAM if the disk allows."""
    scratch = Path(args.dir)
    free_disk = shutil.disk_usage(scratch).free
    margin = max(5 * common.GiB, int(0.1 * free_disk))
    fits = (free_disk - margin) / (1.0 + out_per_in)
    ram = common.available_memory()
    if args.size_gb:
        want = args.size_gb * GB
        if want > fits:
            raise SystemExit(f"--size-gb {args.size_gb} needs {want * (1 + out_per_in) / GB:.1f}"
                             f" GB of disk with the output; {scratch} has "
                             f"{free_disk / GB:.1f} GB free ({margin / GB:.1f} GB kept free)")
        reason = "--size-gb"
    elif 1.25 * ram <= fits:
        want, reason = 1.25 * ram, "1.25 x available RAM"
    else:
        want, reason = fits, (f"largest that fits on disk ({free_disk / GB:.1f} GB free, "
                              f"{margin / GB:.1f} GB margin); available RAM is {ram / GB:.1f} GB")
    n = max(64, int(want // frame_bytes))
    return n, reason, {"disk_free_bytes": free_disk, "disk_margin_bytes": margin,
                       "available_ram_bytes": ram}


def write_input(path, fmt, n, N, slab_bytes, seed):
    """A synthetic scan: jittered raster positions and random float32 frames, in slabs."""
    from gpugroup import io

    x, y = common.jittered_scan(n, seed=seed)
    target = io.open_target(str(path), {"npz": "npz", "h5": "hdf5", "zarr": "zarr"}[fmt])
    rng = np.random.default_rng(seed)
    step = max(1, slab_bytes // (N * N * 4))
    bar = common.progress_bar(n, f"writing {path.name}")
    t = time.perf_counter()
    try:
        sink = target.create("diff3d", (n, N, N), np.float32)
        for a in range(0, n, step):
            b = min(n, a + step)
            sink[a:b] = rng.random((b - a, N, N), dtype=np.float32)
            bar.update(b - a)
        for key, value in (("xcoords", x), ("ycoords", y), ("probeGuess", common.probe(N))):
            target.put(key, value)
        target.close()
    except BaseException:
        target.discard()
        raise
    finally:
        bar.close()
    return time.perf_counter() - t


def drop_page_cache(path) -> int:
    """fsync and POSIX_FADV_DONTNEED every file under ``path``; returns the files done."""
    done = 0
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                done += 1
        finally:
            os.close(fd)
    return done


def dir_size(path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_stream(raw, args, out, nsamples, bar):
    first = []

    def progress(k):
        if not first:
            first.append(time.perf_counter())
        bar.update(k)

    t = time.perf_counter()
    with common.PeakRSS() as mem:
        d = raw.generate_grouped_data(args.N, K=args.K, nsamples=nsamples, seed=args.seed,
                                      gridsize=args.gridsize, out=out,
                                      keep_diffraction=args.keep_diffraction,
                                      chunk_bytes=args.chunk_mib << 20, progress=progress,
                                      row_order=args.row_order)
    seconds = time.perf_counter() - t
    mem.until_first_chunk = first[0] - t if first else None
    if hasattr(d["X_full"], "file"):
        d["X_full"].file.close()
    return seconds, mem, d["nn_indices"]


def run_dask(raw, args, out, nsamples, bar):
    from distributed import Client, LocalCluster

    from gpugroup import dask as gdask

    workers = args.workers or common.usable_cores()
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      dashboard_address=None, silence_logs=40) as cluster, Client(cluster):
        t = time.perf_counter()
        with common.PeakRSS() as mem:
            lazy = gdask.grouped_arrays(raw, args.N, K=args.K, nsamples=nsamples,
                                        seed=args.seed, gridsize=args.gridsize,
                                        keep_diffraction=args.keep_diffraction,
                                        block_bytes=args.chunk_mib << 20,
                                        row_order=args.row_order)
            d = gdask.to_zarr(lazy, out)
        seconds = time.perf_counter() - t
    bar.update(nsamples)
    return seconds, mem, d["nn_indices"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gb", type=float, default=None,
                   help="input stack size in GB (default: larger than free RAM if disk allows)")
    p.add_argument("--N", type=int, default=64, help="frame size (default 64)")
    p.add_argument("--K", type=int, default=7)
    p.add_argument("--gridsize", type=int, default=2)
    p.add_argument("--groups-per-frame", type=float, default=None,
                   help="nsamples / n (default 1/C: the output X_full is as big as the input)")
    p.add_argument("--keep-diffraction", action="store_true",
                   help="also write the raw diffraction (doubles the output)")
    p.add_argument("--format-in", choices=sorted(SUFFIX), default="npz")
    p.add_argument("--format-out", choices=sorted(SUFFIX), default="h5")
    p.add_argument("--engine", choices=["stream", "dask"], default="stream")
    p.add_argument("--row-order", choices=["canonical", "locality"], default="canonical",
                   help="locality: rows sorted by first frame (sequential reads; adds order)")
    p.add_argument("--workers", type=int, default=None, help="dask worker processes")
    p.add_argument("--chunk-mib", type=int, default=256,
                   help="stream: memory budget (chunk_bytes); dask: bytes per block")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dir", default=tempfile.gettempdir(), help="scratch directory")
    p.add_argument("--keep", action="store_true", help="keep the scratch files")
    p.add_argument("--no-drop-cache", action="store_true",
                   help="leave the input in the page cache (warm reads)")
    p.add_argument("--out-dir", default=None, help="results directory")
    args = p.parse_args(argv)
    if args.engine == "dask" and args.format_out != "zarr":
        p.error("--engine dask writes Zarr: add --format-out zarr")

    from gpugroup import RawData

    C = args.gridsize ** 2
    frame_bytes = args.N * args.N * 4
    ratio = (1.0 / C) if args.groups_per_frame is None else args.groups_per_frame
    out_per_in = ratio * C * (2 if args.keep_diffraction else 1)
    n, reason, disk = plan_size(args, frame_bytes, out_per_in)
    nsamples = max(1, int(n * ratio))
    info = common.machine_info()
    scratch = Path(tempfile.mkdtemp(prefix="gpugroup-ooc-", dir=args.dir))
    src = scratch / f"scan{SUFFIX[args.format_in]}"
    out = scratch / f"grouped{SUFFIX[args.format_out]}"
    print(common.machine_line(info), file=sys.stderr)
    print(f"input: {n} frames of {args.N}x{args.N} float32 = {n * frame_bytes / GB:.2f} GB "
          f"({reason}); {nsamples} groups of {C} -> {out}", file=sys.stderr)
    try:
        t_write = write_input(src, args.format_in, n, args.N, 256 << 20, args.seed)
        in_bytes = dir_size(src)
        dropped = 0 if args.no_drop_cache else drop_page_cache(src)
        raw = RawData.from_file(src, mmap_mode="r", backend="cpu")
        t = time.perf_counter()
        nn = raw._generate_groups_efficiently(nsamples, args.K, C, seed=args.seed)
        t_groups = time.perf_counter() - t
        unique_frames = int(np.unique(nn).size)
        bar = common.progress_bar(nsamples, f"grouping into {out.name}")
        try:
            run = run_stream if args.engine == "stream" else run_dask
            seconds, mem, nn_out = run(raw, args, str(out), nsamples, bar)
        finally:
            bar.close()
        if args.row_order == "locality":
            nn = nn[np.argsort(nn.min(axis=1), kind="stable")]
        assert np.array_equal(np.asarray(nn_out), nn), "groups differ from sample_groups"
        out_bytes = dir_size(out)
        read_bytes = (unique_frames + nn.size) * frame_bytes  # energies + gather
        result = {
            "benchmark": "out_of_core",
            "machine": info,
            "params": {**{k: v for k, v in vars(args).items() if k != "dir"}, "n": n,
                       "nsamples": nsamples, "C": C, "size_reason": reason},
            "disk": {**disk, "scratch": str(scratch), "page_cache_dropped_files": dropped},
            "input": {"bytes": in_bytes, "stack_bytes": n * frame_bytes,
                      "larger_than_available_ram": n * frame_bytes > disk["available_ram_bytes"],
                      "write_seconds": t_write,
                      "write_gb_s": in_bytes / GB / t_write},
            "sample_groups_seconds": t_groups,
            "unique_frames_used": unique_frames,
            "grouping": {
                "engine": args.engine,
                "seconds": seconds,
                # sampling (index cached) + energies pass + the first gather chunk
                "seconds_until_first_chunk": getattr(mem, "until_first_chunk", None),
                "output_bytes": out_bytes,
                "input_bytes_read": read_bytes,
                "output_gb_s": out_bytes / GB / seconds,
                "input_read_gb_s": read_bytes / GB / seconds,
                "peak_rss_extra_bytes": mem.extra,
                "peak_rss_extra_mib": None if mem.extra is None else mem.extra / common.MiB,
                "rss_before_bytes": mem.before,
                "peak_rss_method": mem.method,
                "chunk_bytes": args.chunk_mib << 20,
            },
        }
        _, json_path, _ = common.result_paths("out_of_core", info, args.out_dir)
        common.write_json(json_path, result)
        g = result["grouping"]
        first = g["seconds_until_first_chunk"]
        if first is not None:
            print(f"energies pass + first chunk: {first:.1f} s", file=sys.stderr)
        print(f"{args.engine}: {seconds:.1f} s, wrote {out_bytes / GB:.2f} GB "
              f"({g['output_gb_s']:.2f} GB/s), read {read_bytes / GB:.2f} GB "
              f"({g['input_read_gb_s']:.2f} GB/s); peak RSS +"
              f"{common.fmt_mib(mem.extra)} over {common.fmt_mib(mem.before)} "
              f"(budget {args.chunk_mib} MiB)\n-> {json_path}")
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
