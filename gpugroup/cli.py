"""The ``gpugroup`` command line: simulate, group, convert, demo, show, info, cleanup-cache.

One function per subcommand (``cmd_<name>``), registered in :func:`build_parser`. This is
the only module that prints, configures logging (``-v``/``-vv``) or shows progress bars
(tqdm, when installed). Bad input ends with one line ``gpugroup: error: ...`` on stderr and
exit status 2 (a traceback only with ``-vv``).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
import signal
import sys
import time

import gpugroup
from gpugroup import io
from gpugroup._optional import require
from gpugroup.assembly import frame_size, group_coordinates
from gpugroup.backends import available_backends, get_backend
from gpugroup.dataset import GroupedDataset
from gpugroup.grouping import neighbour_pool, sample_seeds
from gpugroup.io import (check_free_space, check_output, format_of, output_format,
                         stat_input)
from gpugroup.io.grouped import open_grouped
from gpugroup.io.npz import CompressedMemberError
from gpugroup.rawdata import RawData, convert
from gpugroup.simulate import simulate_rawdata

logger = logging.getLogger(__name__)

PROG = "gpugroup"
EXIT_OK = 0
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports `gpugroup info | head -1`
EXIT_TERMINATED = 143  # 128 + SIGTERM (kill, timeout, SLURM, docker stop)
CACHE_SUFFIX = ".groups_cache.npz"
DEMO_PNG = "gpugroup-demo.png"
OPTIONAL_PACKAGES = ("cupy", "cuml", "dask", "distributed", "h5py", "zarr", "sklearn",
                     "matplotlib", "tqdm", "psutil")

EPILOG = """\
examples:
  gpugroup simulate scan.npz --n 20000 --N 64 --seed 0
  gpugroup group scan.npz -o grouped.npz --gridsize 2 --K 7 --nsamples 10000 --seed 42
  gpugroup group scan.npz -o grouped.npz --backend gpu --oversample --nsamples 50000
  gpugroup group big.h5 -o grouped.h5 --chunk-mib 512 --row-order locality
  gpugroup group big.zarr -o grouped.zarr --lazy              (Dask tasks write the store)
  gpugroup convert compressed.npz scan.npz                    (memory-mappable from now on)
  gpugroup group scan.npz -o grouped.h5 --dry-run              (the plan and its size)
  gpugroup demo --outdir .
  gpugroup show scan.npz -o scan.png                          (your scan, as the demo draws it)
  gpugroup info
  gpugroup cleanup-cache ~/data --dry-run
  gpugroup -v group scan.npz -o grouped.npz      (INFO logs; -vv for DEBUG and tracebacks)
"""


class CLIError(ValueError):
    """Bad command-line input detected by the CLI itself (reported like library errors)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that partial outputs are removed as on Ctrl-C."""


#: Errors reported as one line with exit status 2; anything else is a bug and shows a
#: traceback. ImportError: an optional package (h5py, zarr, dask) is missing; its message
#: gives the pip line.
USER_ERRORS = (ValueError, OSError, RuntimeError, ImportError)

#: Output suffixes of ``simulate``, ``group -o`` and ``convert`` (see ``io.output_format``).
OUTPUT_SUFFIXES = (".npz", ".h5", ".hdf5", ".zarr")


# --------------------------------------------------------------------------- helpers
def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n} B"  # pragma: no cover


def _path_bytes(path: str) -> int:
    """Size of a file, or of every file under a directory (a ``.zarr`` store)."""
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f))
               for d, _, files in os.walk(path) for f in files)


def _check_output_path(path: str, flag: str, *, overwrite: bool = True,
                       source: str | None = None) -> str:
    """The output format (``"npz"``, ``"hdf5"``, ``"zarr"``) of ``path``, checked before
    any work: a known suffix, an existing directory to write in, not the input scan
    ``source`` (links resolved), and an existing ``path`` only with ``overwrite`` and
    only of a kind the output replaces."""
    ext = os.path.splitext(path.rstrip("/\\"))[1].lower()
    try:
        if ext not in OUTPUT_SUFFIXES:
            raise ValueError
        fmt = output_format(path)
    except ValueError:
        raise CLIError(
            f"{flag} {path!r}: unsupported output format {ext or '(no extension)'!r}; "
            f"use one of {', '.join(OUTPUT_SUFFIXES)}"
        ) from None
    check_output(path, overwrite=overwrite, source=source, option=flag)
    return fmt


def _check_input_file(path: str) -> str:
    """An existing scan: a regular file, or a directory (``.zarr`` store, directory of
    ``.npy``); a device, FIFO or socket is refused before anything reads it, and a path
    that cannot be reached says why (a symbolic link loop, a directory not searchable)."""
    stat_input(path, "input file")
    return path


def _close_output(grouped: dict, fmt: str) -> None:
    """Close the read-only HDF5 file the on-disk entries of a ``.h5`` result keep open."""
    if fmt == "hdf5" and grouped.get("X_full") is not None:
        grouped["X_full"].file.close()


def _progress_bar(total, desc: str, unit: str = "group"):
    """``(callback, close)`` for a tqdm bar (no bar when tqdm is missing or not a TTY;
    ``total`` None: a counter without a total)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        logger.debug("tqdm not installed: no progress bar")
        return None, lambda: None
    bar = tqdm(total=total, desc=desc, unit=unit, disable=None, leave=False,
               file=sys.stderr)
    return bar.update, bar.close


def _progress(total, desc: str, unit: str = "group"):
    """``(callback, close)``: a progress bar whose callback also raises a signal's
    exception that Python dropped (:func:`check_signals`), at every step."""
    update, close = _progress_bar(total, desc, unit)

    def step(k):
        check_signals()
        if update is not None:
            update(k)

    return step, close


def _expected_groups(n: int, nsamples: int, oversample: bool, C: int) -> int:
    return nsamples if (oversample and C > 1) else min(nsamples, n)


def run_grouping(raw, *, N, gridsize, K, nsamples, seed, backend, sequential=False,
                 oversample=False, neighbor_pool_size=None, group_by_scan=False,
                 keep_diffraction=True, **out_options):
    """Group ``raw`` with a progress bar; returns ``(grouped, backend, seconds)``.

    ``out_options`` (``out``, ``lazy``, ``chunk_bytes``, ``overwrite``, ``row_order``) go
    to ``generate_grouped_data`` unchanged. Dask (``lazy``) reports no progress: no bar.
    """
    be = get_backend(backend)
    if out_options.get("lazy"):
        update, close = None, lambda: None
    else:
        update, close = _progress(
            _expected_groups(len(raw), nsamples, oversample, gridsize * gridsize),
            "assembling")
    t0 = time.perf_counter()
    try:
        grouped = raw.generate_grouped_data(
            N, K=K, nsamples=nsamples, seed=seed, gridsize=gridsize,
            sequential_sampling=sequential, enable_oversampling=oversample,
            neighbor_pool_size=neighbor_pool_size, group_by_scan=group_by_scan,
            backend=be, keep_diffraction=keep_diffraction, progress=update, **out_options,
        )
    finally:
        close()
    return grouped, be, time.perf_counter() - t0


def _summary(raw, grouped, be, seconds, *, gridsize, K, out=None) -> str:
    B, C = grouped["nn_indices"].shape
    N = grouped["X_full"].shape[1]
    lines = [
        f"{B} groups of C={C} (gridsize {gridsize}, K={K}) from {len(raw)} positions, "
        f"frames {N}x{N}",
        f"  seed {grouped['seed']}  backend {be.name} ({be.description})  "
        f"time {seconds:.2f} s",
    ]
    if grouped.get("order") is not None:
        lines.append("  rows in locality order: row j is canonical group order[j]")
    if out is not None:
        lines.append(f"  wrote {out} ({_human_bytes(_path_bytes(out))})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- simulate
def cmd_simulate(args) -> int:
    """Write a synthetic scan (Fermat spiral, test object, probe, diffraction amplitudes)."""
    out = args.out
    _check_output_path(out, "OUT", overwrite=args.overwrite)
    t0 = time.perf_counter()
    raw = simulate_rawdata(args.n, args.N, args.seed, backend="cpu")
    raw.to_file(out, overwrite=args.overwrite, check_space=args.space_check)
    print(f"simulated {len(raw)} positions, frames {args.N}x{args.N}, object "
          f"{raw.objectGuess.shape[0]}x{raw.objectGuess.shape[1]}, seed {args.seed} in "
          f"{time.perf_counter() - t0:.2f} s")
    print(f"  wrote {out} ({_human_bytes(_path_bytes(out))})")
    return EXIT_OK


# --------------------------------------------------------------------------- group
def cmd_group(args) -> int:
    """Sample groups from a scan and stream the grouped training arrays into OUT (.npz,
    .h5/.hdf5 or .zarr) in bounded memory. The scan's frames stay on disk (memory-mapped
    NPZ/.npy, HDF5 or Zarr datasets); OUT is written under a temporary name and renamed
    when complete."""
    source = _check_input_file(args.input)
    out = args.output
    fmt = _check_output_path(out, "-o", overwrite=args.overwrite, source=source)
    if args.lazy and fmt != "zarr":
        raise CLIError(f"--lazy writes a .zarr store (each Dask task writes its own chunks), "
                       f"got -o {out!r}; drop --lazy for .npz/.h5 (streamed) output")
    raw = _open_scan(source, args.key)
    N = frame_size(args.N, raw.diff3d)  # before the plan: a wrong --N fails first
    if _print_plan(raw, args, N=N, fmt=fmt):
        return EXIT_OK  # --dry-run
    grouped, be, seconds = run_grouping(
        raw, N=N, gridsize=args.gridsize, K=args.K, nsamples=args.nsamples, seed=args.seed,
        backend=args.backend, sequential=args.sequential, oversample=args.oversample,
        neighbor_pool_size=args.neighbor_pool_size, group_by_scan=args.group_by_scan,
        keep_diffraction=not args.no_diffraction, out=out, lazy=args.lazy,
        chunk_bytes=args.chunk_mib << 20, overwrite=args.overwrite, row_order=args.row_order,
        check_space=args.space_check,
    )
    try:
        print(_summary(raw, grouped, be, seconds, gridsize=args.gridsize, K=args.K, out=out))
    finally:
        _close_output(grouped, fmt)
    return EXIT_OK


def output_bytes(raw, *, B: int, C: int, N: int, keep_diffraction: bool = True,
                 locality: bool = False) -> int:
    """Bytes of the grouped arrays of B groups of C frames (N x N), as written
    uncompressed: ``diffraction`` (the scan's dtype), ``X_full`` (float32), ``Y``
    (complex64, when the scan has ``Y`` or ``objectGuess``), indices, coordinates and
    ``objectGuess``. File formats add little (headers, chunk indices)."""
    import numpy as np

    frame = N * N * C
    per_group = frame * 4 + 4 * C + 64 * C + 32  # X_full, nn_indices, 4+2 coordinate arrays
    if keep_diffraction:
        per_group += frame * np.dtype(raw.diff3d.dtype).itemsize
    if raw.Y is not None or raw.objectGuess is not None:
        per_group += frame * 8
    if locality:
        per_group += 8  # order
    extra = 0 if raw.objectGuess is None else raw.objectGuess.nbytes
    return B * per_group + extra


def _print_plan(raw, args, *, N: int, fmt: str) -> bool:
    """Print the estimated size of ``gpugroup group``'s output (and with ``--dry-run`` the
    whole plan); returns whether this is a dry run (then nothing is written)."""
    import shutil

    C = args.gridsize ** 2
    B = _expected_groups(len(raw), args.nsamples, args.oversample, C)
    size = output_bytes(raw, B=B, C=C, N=N, keep_diffraction=not args.no_diffraction,
                        locality=args.row_order == "locality")
    where = os.path.dirname(os.path.abspath(args.output))
    free = shutil.disk_usage(where).free
    arrays = (["diffraction"] * (not args.no_diffraction) + ["X_full"]
              + ["Y"] * (raw.Y is not None or raw.objectGuess is not None))
    print(f"estimated output: {_human_bytes(size)} ({B} groups of C={C} {N}x{N} frames: "
          f"{' + '.join(arrays)}); {_human_bytes(free)} free in {where}", flush=True)
    if not args.dry_run:
        if args.space_check:  # the output's size is known now: refuse before grouping
            check_free_space(args.output, size, skip="--no-space-check")
        elif size > free:
            logger.warning("the output (about %s) may not fit in %s (%s free)",
                           _human_bytes(size), where, _human_bytes(free))
        return False
    if size > free:
        logger.warning("the output (about %s) may not fit in %s (%s free)",
                       _human_bytes(size), where, _human_bytes(free))
    # The groups themselves (coordinates only, no frames read): every check of the real
    # run, and the exact count.
    nn, seed, be = raw.sample_for_grouping(
        args.K, args.nsamples, args.seed, args.gridsize, sequential_sampling=args.sequential,
        enable_oversampling=args.oversample, neighbor_pool_size=args.neighbor_pool_size,
        group_by_scan=args.group_by_scan, backend=args.backend)
    B = len(nn)
    size = output_bytes(raw, B=B, C=C, N=N, keep_diffraction=not args.no_diffraction,
                        locality=args.row_order == "locality")
    pool = args.K if args.neighbor_pool_size is None else args.neighbor_pool_size
    shape = tuple(raw.diff3d.shape)
    print(f"dry run: nothing written\n"
          f"  input    {args.input}: {len(raw)} positions, frames {shape[1]}x{shape[2]} "
          f"{raw.diff3d.dtype}\n"
          f"  groups   {B} of C={C} (gridsize {args.gridsize}, pool {pool}), seed "
          f"{seed}{' (drawn: pass --seed to repeat it)' if args.seed is None else ''}"
          f"{', sequential' if args.sequential else ''}"
          f"{', oversampled' if args.oversample else ''}"
          f"{', by scan' if args.group_by_scan else ''}\n"
          f"  backend  {be.name} ({be.description})\n"
          f"  output   {args.output} ({fmt}{', Dask' if args.lazy else ''}, rows "
          f"{args.row_order}), {size} bytes, memory budget {args.chunk_mib} MiB")
    return True


# --------------------------------------------------------------------------- convert
def cmd_convert(args) -> int:
    """Rewrite a scan (NPZ, compressed NPZ included; a directory of .npy files; HDF5; Zarr)
    as an uncompressed, memory-mappable .npz, an .h5/.hdf5 file or a .zarr store. Frame
    stacks are copied slab by slab (bounded memory); OUT is written under a temporary name
    and renamed when complete."""
    source = _check_input_file(args.input)
    fmt = _check_output_path(args.output, "OUT", overwrite=args.overwrite, source=source)
    update, close = _progress(None, "converting", unit="frame")
    t0 = time.perf_counter()
    try:
        written = convert(source, args.output, keys=args.key, slab_bytes=args.slab_mib << 20,
                          overwrite=args.overwrite, progress=update,
                          check_space=args.space_check)
    finally:
        close()
    seconds = time.perf_counter() - t0
    scan = io.read_scan(written, mmap_mode="r")
    frames = scan["diff3d"]
    try:
        n, h, w = frames.shape
        dtype = frames.dtype
    finally:
        if fmt == "hdf5":
            frames.file.close()
    print(f"converted {n} frames ({h}x{w} {dtype}) in {seconds:.2f} s: wrote {args.output} "
          f"({_human_bytes(_path_bytes(written))})")
    return EXIT_OK


# --------------------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    """Simulate, group and (with matplotlib) draw a few groups to gpugroup-demo.png."""
    import tempfile

    if not os.path.isdir(args.outdir):
        raise CLIError(f"--outdir {args.outdir!r} is not an existing directory")
    with tempfile.TemporaryDirectory(prefix="gpugroup-demo-") as tmp:
        scan_path = os.path.join(tmp, "scan.npz")
        simulate_rawdata(args.n, args.N, 0, backend="cpu").to_file(scan_path)
        raw = RawData.from_file(scan_path)
        grouped, be, seconds = run_grouping(
            raw, N=args.N, gridsize=args.gridsize, K=args.K, nsamples=args.nsamples,
            seed=args.seed, backend=args.backend)
        print(f"demo: simulated {len(raw)} positions (Fermat spiral, {args.N}x{args.N} "
              f"frames) and grouped them")
        print(_summary(raw, grouped, be, seconds, gridsize=args.gridsize, K=args.K))
    if args.no_plot:
        return EXIT_OK
    from importlib.util import find_spec

    if find_spec("matplotlib") is None:
        print("matplotlib is not installed: no plot (pip install 'gpugroup[plot]')")
        return EXIT_OK
    png = os.path.join(args.outdir, DEMO_PNG)
    plot_demo(raw, grouped, png, seed=grouped["seed"], K=args.K)
    print(f"  wrote {png}")
    return EXIT_OK


def _spread_rows(centres, count: int):
    """``count`` group rows spread over the scan's interior (greedy farthest-point).

    Starts at the group nearest the scan's centre and only picks groups within 80 % of
    the scan's radius, so the drawn groups are typical ones, not edge cases.
    """
    import numpy as np

    middle = (centres.min(axis=0) + centres.max(axis=0)) / 2
    r = np.hypot(*(centres - middle).T)
    inner = np.flatnonzero(r <= 0.8 * r.max())
    pts = centres[inner]
    chosen = [int(np.argmin(r[inner]))]
    d = np.hypot(*(pts - pts[chosen[0]]).T)
    while len(chosen) < min(count, len(inner)):
        nxt = int(np.argmax(d))
        chosen.append(nxt)
        d = np.minimum(d, np.hypot(*(pts - pts[nxt]).T))
    return [int(inner[i]) for i in chosen]


def plot_demo(raw, grouped, path, *, seed=None, K=None, n_groups=8, title=None):
    """Draw the scan with ``n_groups`` groups, one group up close, and its diffraction.

    Left: every scan position over the object's phase, with ``n_groups`` groups (members
    coloured, lines from the group centre, the group's seed starred). Middle: group 1 with
    its pool and probe footprints. Right: group 1's C diffraction frames (``X_full``, log
    scale). Written with matplotlib's Agg backend (the only place the CLI imports it).

    ``raw`` needs ``xcoords``, ``ycoords`` (NaN: a position not drawn) and ``objectGuess``
    (None: no object behind the positions); ``grouped`` needs ``nn_indices``,
    ``coords_offsets`` and ``X_full`` (only its shape and one row are read). ``seed`` and
    ``K`` None (groups read from a file, which does not store how they were sampled): no
    seed stars and no pool.
    """
    quiet = max(logging.INFO, logging.getLogger().getEffectiveLevel())
    for name in ("matplotlib", "PIL"):  # their DEBUG chatter drowns ours under -vv
        logging.getLogger(name).setLevel(quiet)
    try:
        import matplotlib
    except ImportError:
        raise ImportError("drawing needs matplotlib: pip install 'gpugroup[plot]' "
                          "(or pip install matplotlib)") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Circle

    x, y = np.asarray(raw.xcoords), np.asarray(raw.ycoords)
    n = int(np.count_nonzero(np.isfinite(x)))
    nn = np.asarray(grouped["nn_indices"])
    B, C = nn.shape
    N = grouped["X_full"].shape[1]
    seeds = None if seed is None else sample_seeds(np, len(x), min(B, len(x)), int(seed))
    centres = np.asarray(grouped["coords_offsets"])[:, 0, :, 0]
    rows = _spread_rows(centres, n_groups)
    colours = plt.get_cmap("tab10").colors
    obj = getattr(raw, "objectGuess", None)
    phase = None if obj is None else np.angle(np.asarray(obj))

    fig = plt.figure(figsize=(17, 6.4), layout="constrained")
    fig.suptitle(title or f"gpugroup demo: sample-then-group of {n} positions into {B} "
                 f"groups of C={C} (K={K}, seed {seed})", fontsize=13)
    left, middle, right = fig.subfigures(1, 3, width_ratios=[1.15, 1.0, 0.95], wspace=0.02)
    ax = left.subplots()
    zoom = middle.subplots()
    for a, dot in ((ax, 3), (zoom, 16)):
        if phase is not None:
            H, W = phase.shape
            a.imshow(phase, cmap="Greys", extent=(-0.5, W - 0.5, H - 0.5, -0.5), alpha=0.3,
                     interpolation="bilinear")
        a.scatter(x, y, s=dot, color="0.35", lw=0, zorder=2)
        a.set_aspect("equal")
        a.set_xlabel("x (object pixels)")
        a.set_ylabel("y (object pixels)")

    def draw_group(a, g, colour, size, label=None):
        mem = nn[g]
        cx, cy = centres[g]
        for m in mem:
            a.plot([cx, x[m]], [cy, y[m]], color=colour, lw=1.3, zorder=3)
        a.scatter(x[mem], y[mem], s=size, color=colour, edgecolor="k", lw=0.6, zorder=4,
                  label=label)
        a.scatter([cx], [cy], s=size, marker="+", color=colour, lw=1.5, zorder=4)
        if seeds is not None:
            s_ = seeds[g % len(seeds)]
            a.scatter([x[s_]], [y[s_]], s=size * 4, marker="*", facecolor="none",
                      edgecolor="k", lw=1.0, zorder=5)

    for j, g in enumerate(rows):
        colour = colours[j % len(colours)]
        draw_group(ax, g, colour, 30)
        ax.annotate(f"{j + 1}", centres[g], xytext=(7, 5), textcoords="offset points",
                    fontsize=10, weight="bold", color=colour, zorder=6,
                    bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.7))
    ax.set_xlim(np.nanmin(x) - N / 2, np.nanmax(x) + N / 2)
    ax.set_ylim(np.nanmax(y) + N / 2, np.nanmin(y) - N / 2)
    over = " over the object phase" if phase is not None else ""
    star = "\u2605 seed, " if seeds is not None else ""
    left.suptitle(f"all positions{over}; {len(rows)} groups drawn\n"
                  f"({star}+ group centre, lines to the C members)", fontsize=11)

    # Group 1 up close: its seed's pool (seed + K-1 nearest), members and probe footprints.
    g = rows[0]
    colour = colours[0]
    if seeds is not None and K is not None:
        s_ = seeds[g % len(seeds)]
        cx, cy = x[s_], y[s_]
        pool = neighbour_pool(np, x, y, np.array([s_]), K,
                              get_backend("cpu").build_index(x, y))[0]
        zoom.scatter(x[pool], y[pool], s=110, facecolor="none", edgecolor="tab:orange",
                     lw=1.5, zorder=3, label=f"pool: seed + {K - 1} nearest")
    else:
        (cx, cy), pool = centres[g], nn[g]
    half = float(np.hypot(x[pool] - cx, y[pool] - cy).max()) + N / 2
    for m in nn[g]:
        zoom.add_patch(Circle((x[m], y[m]), N / 4, fill=False, ls="--", lw=0.9,
                              color=colour, zorder=3))
    draw_group(zoom, g, colour, 60,
               label=f"members: C={C}{' of the pool' if seeds is not None else ''}")
    for m in nn[g]:
        zoom.annotate(str(m), (x[m], y[m]), xytext=(6, -12), textcoords="offset points",
                      fontsize=8, color=colour, weight="bold", zorder=6)
    if seeds is not None:
        zoom.scatter([], [], s=150, marker="*", facecolor="none", edgecolor="k",
                     label="seed position")
    zoom.scatter([], [], s=60, marker="+", color=colour, label="group centre (offset)")
    zoom.plot([], [], ls="--", lw=0.9, color=colour, label=f"probe footprint (r = {N // 4} px)")
    zoom.set_xlim(cx - half, cx + half)
    zoom.set_ylim(cy + half, cy - half)
    zoom.legend(loc="lower left", fontsize=8, framealpha=0.9)
    middle.suptitle("group 1 up close", fontsize=11)

    # Group 1's diffraction frames, in nn_indices order, on one log colour scale.
    side = int(np.ceil(np.sqrt(C)))
    frames = np.asarray(grouped["X_full"][g], dtype=np.float64)
    vmax = float(frames.max())
    vmin = vmax * 1e-4 if vmax > 0 else 1e-6
    norm = LogNorm(vmin=vmin, vmax=max(vmax, vmin * 10))
    axes = np.atleast_2d(right.subplots(side, side))
    for c, fa in enumerate(axes.flat):
        fa.set_xticks([])
        fa.set_yticks([])
        if c >= C:
            fa.set_axis_off()
            continue
        im = fa.imshow(np.maximum(frames[..., c], vmin), cmap="magma", norm=norm)
        fa.set_title(f"position {nn[g, c]}", fontsize=9, color=colour, weight="bold")
    right.colorbar(im, ax=axes, shrink=0.85, location="bottom",
                   label="X_full amplitude (log scale)")
    right.suptitle(f"group 1: its {C} diffraction frames", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    logger.info("wrote %s", path)


# --------------------------------------------------------------------------- show
def _is_grouped_output(path: str) -> bool:
    """Whether ``path`` is a grouped output (it holds ``nn_indices``) rather than a scan."""
    fmt = format_of(path)
    if fmt == "zarr":
        return os.path.isdir(os.path.join(path, "nn_indices"))
    if not os.path.isfile(path) or fmt not in ("npz", "hdf5"):
        return False
    if fmt == "hdf5":
        with require("h5py").File(path, "r") as f:
            return "nn_indices" in f
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            return "nn_indices.npy" in zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False  # the scan reader says what is wrong with it


class _RowsOnDemand:
    """``X_full`` of a :class:`~gpugroup.dataset.GroupedDataset`, one row assembled when
    indexed: all that :func:`plot_demo` reads of it."""

    def __init__(self, ds):
        self.ds = ds
        self.shape = (len(ds), ds.N, ds.N, ds.nn_indices.shape[1])

    def __getitem__(self, g):
        return self.ds[int(g)]["X_full"]


def cmd_show(args) -> int:
    """Draw the demo's picture for a scan or a grouped output: positions over the object
    (when there is one), a few groups, one group up close with its diffraction frames.
    A scan alone is grouped on the fly (in memory, only the drawn group's frames are
    assembled); --groups OUT draws the groups of a grouped output of that scan."""
    import types
    from importlib.util import find_spec

    import numpy as np


    if find_spec("matplotlib") is None:
        raise CLIError("gpugroup show draws with matplotlib, which is not installed: "
                       "pip install 'gpugroup[plot]'")
    source = _check_input_file(args.input)
    png = args.output or os.path.splitext(os.path.basename(source.rstrip("/\\")))[0] + ".png"
    groups_path = None if args.groups is None else _check_input_file(args.groups)
    if _is_grouped_output(source):
        if groups_path is not None:
            raise CLIError(f"IN {source!r} is already a grouped output; --groups takes the "
                           f"grouped output of a scan IN")
        groups_path, raw = source, None
    else:
        raw = _open_scan(source, args.key)
    if groups_path is not None and not _is_grouped_output(groups_path):
        raise CLIError(f"--groups {groups_path!r} holds no nn_indices: not a grouped output "
                       f"of gpugroup group")
    name = os.path.basename(source.rstrip("/\\"))
    if groups_path is None:  # group the scan here, as gpugroup group would
        nsamples = min(args.nsamples, len(raw))
        nn, seed, be = raw.sample_for_grouping(args.K, nsamples, args.seed, args.gridsize,
                                               backend=args.backend)
        ds = GroupedDataset(raw, nn, backend="cpu", keep_diffraction=False)
        grouped = group_coordinates(np, nn, raw.xcoords, raw.ycoords, raw.xcoords_start,
                                    raw.ycoords_start)
        grouped.update(nn_indices=nn, X_full=_RowsOnDemand(ds))
        title = (f"{name}: {len(raw)} positions, {len(nn)} groups of C={nn.shape[1]} "
                 f"(K={args.K}, seed {seed}, backend {be.name})")
        plot_demo(raw, grouped, png, seed=seed, K=args.K, title=title)
    else:
        grouped = open_grouped(groups_path)
        try:
            nn = np.asarray(grouped["nn_indices"])
            if raw is None:  # positions of the frames the groups use, from coords_nn
                xy = np.asarray(grouped["coords_nn"])[:, 0]
                x = np.full(int(nn.max()) + 1, np.nan)
                y = x.copy()
                x[nn], y[nn] = xy[:, 0], xy[:, 1]
                raw = types.SimpleNamespace(xcoords=x, ycoords=y,
                                            objectGuess=grouped.get("objectGuess"))
            elif nn.max() >= len(raw):
                raise CLIError(f"--groups {groups_path!r} uses position {int(nn.max())} but "
                               f"IN has {len(raw)} positions: not a grouped output of IN")
            title = (f"{os.path.basename(groups_path.rstrip('/'))}: {len(nn)} groups of "
                     f"C={nn.shape[1]} (seed {grouped.get('seed')}) over "
                     f"{int(np.count_nonzero(np.isfinite(raw.xcoords)))} positions"
                     f"{' (those the groups use)' if groups_path == source else ''}")
            plot_demo(raw, grouped, png, title=title)
        finally:
            _close_output(grouped, format_of(groups_path))
    print(f"wrote {png}")
    return EXIT_OK


def _open_scan(source, keys):
    """A scan with its frames left on disk where the format allows (a compressed NPZ is
    read into memory, with a warning)."""
    try:
        return RawData.from_file(source, mmap_mode="r", keys=keys)
    except CompressedMemberError as exc:
        logger.warning("%s; loading it into memory instead", exc)
        return RawData.from_file(source, keys=keys)


# --------------------------------------------------------------------------- info
def _package_versions(names):
    """``{module: "version" | "not installed" | "broken: <error>"}``.

    Each installed package is imported, so an install that resolved but cannot import
    (a mismatched dask/distributed pair, a CuPy without its CUDA libraries) says why.
    """
    from importlib import metadata
    from importlib.util import find_spec

    try:
        dists = metadata.packages_distributions()
    except Exception:  # pragma: no cover - unusual metadata layouts
        dists = {}
    out = {}
    for name in names:
        try:
            present = find_spec(name) is not None
        except (ImportError, ValueError):
            present = False
        if not present:
            out[name] = "not installed"
            continue
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any failure to import is the report
            out[name] = f"broken: {type(exc).__name__}: {exc}".splitlines()[0]
            continue
        version = getattr(module, "__version__", None)
        for dist in () if version else dists.get(name, ()):
            try:
                version = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:  # pragma: no cover
                continue
        out[name] = str(version or "installed (no version)")
    return out


def cmd_info(args) -> int:
    """Print versions, available backends, GPUs seen and optional packages."""
    import platform

    import numpy
    import scipy

    print(f"gpugroup {gpugroup.__version__}")
    print(f"python   {platform.python_version()} ({sys.executable})")
    print(f"numpy    {numpy.__version__}")
    print(f"scipy    {scipy.__version__}")
    print("backends:")
    backends = available_backends()
    for name, status in backends.items():
        print(f"  {name:<4} {status}")
    gpu = backends.get("gpu", "")
    print(f"GPUs seen: {gpu.split(': ', 1)[1] if gpu.startswith('available') else 'none'}")
    print("optional packages:")
    for name, version in _package_versions(OPTIONAL_PACKAGES).items():
        print(f"  {name:<11} {version}")
    return EXIT_OK


# --------------------------------------------------------------------------- cleanup-cache
def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def find_cache_files(directory: str):
    """``(deletable, skipped)`` lists of ``(path, bytes)`` / ``(path, reason)`` under ``directory``.

    Walks without following directory symlinks. A symlinked cache file is deletable (the
    link only, never its target) when it points inside ``directory``; one pointing outside
    is skipped.
    """
    root = os.path.realpath(directory)
    deletable, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            if not name.endswith(CACHE_SUFFIX):
                continue
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                target = os.path.realpath(path)
                if not _inside(target, root):
                    skipped.append((path, f"symlink to {target}, outside {directory}"))
                    continue
                deletable.append((path, 0))  # removing a link frees no data
            elif os.path.isfile(path):
                deletable.append((path, os.lstat(path).st_size))
    return deletable, skipped


def cmd_cleanup_cache(args) -> int:
    """List (``--dry-run``) or delete ``*.groups_cache.npz`` files under DIR."""
    directory = args.dir
    if not os.path.isdir(directory):
        raise CLIError(f"DIR {directory!r} is not an existing directory")
    deletable, skipped = find_cache_files(directory)
    for path, reason in skipped:
        print(f"skip  {path} ({reason})")
    total = sum(size for _, size in deletable)
    if not deletable:
        print(f"no *{CACHE_SUFFIX} files under {directory}")
        return EXIT_OK
    verb = "would remove" if args.dry_run else "found"
    print(f"{verb} {len(deletable)} cache file(s), {_human_bytes(total)}:")
    for path, size in deletable:
        print(f"  {_human_bytes(size):>9}  {path}{'  (symlink)' if os.path.islink(path) else ''}")
    if args.dry_run:
        print("dry run: nothing deleted")
        return EXIT_OK
    if not args.yes and not (sys.stdin is not None and sys.stdin.isatty()):
        raise CLIError(
            f"refusing to delete {len(deletable)} file(s) without confirmation: stdin is not "
            f"a terminal, so nobody can answer; pass --yes to delete them (or --dry-run to "
            f"list them only)")
    if not args.yes:
        answer = input(f"delete these {len(deletable)} file(s)? [y/N] ").strip().lower()
        if answer not in ("y", "yes"):
            print("nothing deleted")
            return EXIT_OK
    freed = removed = 0
    for path, size in deletable:
        try:
            os.unlink(path)  # unlink never follows a symlink
        except FileNotFoundError:
            logger.warning("%s vanished before deletion", path)
            continue
        removed += 1
        freed += size
        print(f"removed {path}")
    print(f"removed {removed} file(s), freed {_human_bytes(freed)}")
    return EXIT_OK


# --------------------------------------------------------------------------- parser
def _add_overwrite(p):
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=True,
                   help="replace an existing OUT once the new one is complete; with "
                        "--no-overwrite an OUT that appears meanwhile is kept and the new "
                        "one discarded (default: --overwrite)")
    p.add_argument("--space-check", action=argparse.BooleanOptionalAction, default=True,
                   help="refuse up front an OUT larger than the free space where it goes; "
                        "--no-space-check skips that for filesystems that report free space "
                        "wrongly (default: --space-check)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text, 10) if text.strip().isdigit() else int(text, 0)  # 007, 0x2a
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64), got {value}")
    return value


def _key(text: str) -> tuple[str, str]:
    field, sep, where = text.partition("=")
    if not sep or not field or not where:
        raise argparse.ArgumentTypeError(f"expected FIELD=PATH (e.g. diff3d=/entry/data/data), "
                                         f"got {text!r}")
    return field, where


def _add_key_option(p):
    p.add_argument("--key", type=_key, action="append", default=None, metavar="FIELD=PATH",
                   help="where a scan field is in IN when not under its own name, e.g. "
                        "--key diff3d=/entry_1/data_1/data (repeatable)")


def _add_grouping_options(p, *, nsamples: int, seed):
    p.add_argument("--gridsize", type=_positive_int, default=2,
                   help="C = gridsize**2 positions per group (default %(default)s)")
    p.add_argument("--K", type=_positive_int, default=7,
                   help="pool size: seed + K-1 nearest positions, K >= C (default %(default)s)")
    p.add_argument("--nsamples", type=_positive_int, default=nsamples,
                   help="number of groups (default %(default)s)")
    p.add_argument("--seed", type=_seed, default=seed,
                   help="grouping seed; omitted: a fresh one, printed so the run can be "
                        "repeated" if seed is None else "grouping seed (default %(default)s)")
    p.add_argument("--backend", choices=("auto", "cpu", "gpu"), default="auto",
                   help="where to group (default %(default)s: the GPU when CuPy sees one)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one subparser per ``cmd_*`` function."""
    verbosity = argparse.ArgumentParser(add_help=False)
    verbosity.add_argument("-v", "--verbose", action="count", default=0, dest="sub_verbose",
                           help="more log output on stderr (-v INFO, -vv DEBUG and tracebacks)")

    parser = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Exact, backend-independent sample-then-group for ptychography scans.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output on stderr (-v INFO, -vv DEBUG and tracebacks)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name, func, help_, epilog):
        p = sub.add_parser(name, help=help_,
                           description=inspect.cleandoc(func.__doc__).replace("``", ""),
                           parents=[verbosity],
                           allow_abbrev=False, epilog="example:\n  " + epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        return p

    p = add("simulate", cmd_simulate, "write a synthetic scan (.npz, .h5 or .zarr)",
            "gpugroup simulate scan.npz --n 2000 --N 64 --seed 0")
    p.add_argument("out", metavar="OUT", help="output scan file: .npz, .h5/.hdf5 or .zarr")
    p.add_argument("--n", type=_positive_int, default=2000,
                   help="scan positions (default %(default)s)")
    p.add_argument("--N", type=_positive_int, default=64,
                   help="frame size in pixels (default %(default)s)")
    p.add_argument("--seed", type=_seed, default=0,
                   help="simulation seed (default %(default)s)")
    _add_overwrite(p)

    p = add("group", cmd_group, "group a scan and write the grouped training arrays",
            "gpugroup group scan.npz -o grouped.npz --gridsize 2 --K 7 --nsamples 10000 "
            "--seed 42")
    p.add_argument("input", metavar="IN",
                   help="scan: .npz (PtychoPINN layout, uncompressed: memory-mapped), "
                        ".h5/.hdf5/.cxi, .zarr or a directory of KEY.npy files")
    p.add_argument("-o", "--output", metavar="OUT", required=True,
                   help="grouped output: .npz, .h5/.hdf5 or .zarr (streamed, atomic)")
    _add_key_option(p)
    p.add_argument("--N", type=_positive_int, default=None,
                   help="frame size (default: the scan's frame size)")
    _add_grouping_options(p, nsamples=10000, seed=None)
    p.add_argument("--sequential", action="store_true",
                   help="seeds are positions 0..nsamples-1 instead of a random sample")
    p.add_argument("--oversample", action="store_true",
                   help="allow nsamples > n (distinct member sets per repeated seed)")
    p.add_argument("--neighbor-pool-size", type=_positive_int, default=None, metavar="P",
                   help="pool size overriding K")
    p.add_argument("--group-by-scan", action="store_true",
                   help="pools only hold positions of the seed's own scan (scan_index)")
    p.add_argument("--no-diffraction", action="store_true",
                   help="skip the 'diffraction' copy (write X_full only)")
    p.add_argument("--chunk-mib", type=_positive_int, default=256, metavar="MIB",
                   help="memory budget of the streamed write in MiB; with --lazy the size "
                        "of one Dask block (default %(default)s)")
    _add_overwrite(p)
    p.add_argument("--row-order", choices=("canonical", "locality"), default="canonical",
                   help="'locality' stores groups sorted by their smallest frame index (reads "
                        "the scan nearly sequentially) and adds 'order' (default %(default)s)")
    p.add_argument("--lazy", action="store_true",
                   help="compute with Dask, tasks writing the .zarr store in parallel "
                        "(.zarr output only; needs gpugroup[dask])")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (groups, bytes, format, backend) and write nothing")

    p = add("convert", cmd_convert,
            "rewrite a scan as uncompressed .npz, .h5 or .zarr (memory-mappable)",
            "gpugroup convert scan_compressed.npz scan.h5")
    p.add_argument("input", metavar="IN",
                   help="scan: .npz (compressed or not), .h5/.hdf5/.cxi, .zarr or a "
                        "directory of KEY.npy files")
    p.add_argument("output", metavar="OUT", help="new scan file: .npz, .h5/.hdf5 or .zarr")
    _add_key_option(p)
    p.add_argument("--slab-mib", type=_positive_int, default=64, metavar="MIB",
                   help="MiB of frames copied at a time: the memory bound "
                        "(default %(default)s)")
    _add_overwrite(p)

    p = add("demo", cmd_demo, "simulate, group and plot a demo scan (gpugroup-demo.png)",
            "gpugroup demo --outdir /tmp")
    p.add_argument("--n", type=_positive_int, default=2000,
                   help="scan positions (default %(default)s)")
    p.add_argument("--N", type=_positive_int, default=64,
                   help="frame size in pixels (default %(default)s)")
    _add_grouping_options(p, nsamples=1000, seed=0)
    p.add_argument("--outdir", default=".",
                   help=f"where to write {DEMO_PNG} (default: the current directory)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")

    p = add("show", cmd_show, "draw a scan or a grouped output as the demo does (needs [plot])",
            "gpugroup show scan.npz -o scan.png --groups grouped.npz")
    p.add_argument("input", metavar="IN",
                   help="a scan (any input format) or a grouped output of gpugroup group")
    p.add_argument("-o", "--output", metavar="PNG", default=None,
                   help="picture to write (default: IN's name with .png, in the current "
                        "directory)")
    p.add_argument("--groups", metavar="OUT", default=None,
                   help="draw the groups of this grouped output of IN instead of grouping "
                        "IN here")
    _add_key_option(p)
    _add_grouping_options(p, nsamples=1000, seed=0)

    add("info", cmd_info, "versions, backends, GPUs and optional packages", "gpugroup info")

    p = add("cleanup-cache", cmd_cleanup_cache,
            f"list or delete old *{CACHE_SUFFIX} group caches under DIR",
            "gpugroup cleanup-cache ~/data --dry-run")
    p.add_argument("dir", metavar="DIR", help="directory to search recursively")
    p.add_argument("--dry-run", action="store_true", help="list the files; delete nothing")
    p.add_argument("--yes", action="store_true",
                   help="delete without asking; without it, cleanup-cache asks on a "
                        "terminal and refuses when stdin is not one (a script, a pipe)")
    return parser


def _version() -> str:
    return gpugroup.__version__


def _configure_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)  # also when a host (e.g. pytest) set handlers first


def main(argv=None) -> int:
    """Run the ``gpugroup`` command line; returns the exit status.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        0 on success, 2 on bad input (one ``gpugroup: error: ...`` line on stderr), bad
        arguments or too little memory, 130 on Ctrl-C, 141 when stdout's reader has gone
        (a broken pipe), 143 on SIGTERM. Ctrl-C and SIGTERM remove partial outputs.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or an argparse error (status 2)
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    args.verbose += getattr(args, "sub_verbose", 0)  # -v before and after the command add up
    if getattr(args, "key", None) is not None:  # --key FIELD=PATH pairs, repeatable
        args.key = dict(args.key)
    _configure_logging(args.verbose)
    restore = _raise_on_signals()
    try:
        status = args.func(args)
        if sys.stdout is not None:  # None: started with stdout closed
            sys.stdout.flush()  # a reader that left shows here, not in Python's final flush
        return status
    except BrokenPipeError as exc:
        if not _stdout_closed():
            return _report(exc, args)
        return EXIT_BROKEN_PIPE  # e.g. `gpugroup info | head -1`: the reader left
    except USER_ERRORS + (MemoryError,) as exc:
        return _report(exc, args)
    except Terminated:
        print(f"{PROG}: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        restore()


#: What to ask for less of when a command runs out of memory.
_MEMORY_HINTS = {
    "group": "fewer groups (--nsamples), a smaller pool (--K, --neighbor-pool-size) or a "
             "smaller --chunk-mib",
    "convert": "a smaller --slab-mib",
    "simulate": "fewer positions (--n) or smaller frames (--N)",
    "demo": "fewer positions (--n), groups (--nsamples) or smaller frames (--N)",
    "show": "fewer groups (--nsamples)",
}


def _report(exc, args) -> int:
    """One ``gpugroup: error: ...`` line (and the traceback with -vv); exit status 2."""
    if args.verbose >= 2:
        import traceback

        traceback.print_exc(file=sys.stderr)
    message = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, MemoryError):
        message = (f"out of memory ({message}): ask for "
                   f"{_MEMORY_HINTS.get(args.command, 'a smaller job')}")
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def _stdout_closed() -> bool:
    """Whether stdout's reader has gone (then stdout is pointed at /dev/null, so that
    Python's final flush does not fail a second time)."""
    try:
        sys.stdout.flush()  # buffered output fails here
        if not _pipe_reader_gone(sys.stdout.fileno()):  # unbuffered output failed earlier
            return False
    except BrokenPipeError:
        pass
    except (OSError, ValueError, AttributeError):  # stdout without a descriptor
        return False
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout without a descriptor
        pass
    return True


def _pipe_reader_gone(fd: int) -> bool:
    """Whether ``fd`` is a pipe that nobody reads any more (poll reports an error)."""
    import select
    import stat

    if not stat.S_ISFIFO(os.fstat(fd).st_mode) or not hasattr(select, "poll"):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


#: The exception of the last SIGINT/SIGTERM while a command runs. Python drops an
#: exception raised inside a weakref callback or ``__del__`` (h5py runs many while it
#: writes), so the progress callbacks raise it again: :func:`check_signals`.
_pending: list = []


def check_signals() -> None:
    """Raise again the exception of a signal whose first raise Python may have dropped."""
    if _pending:
        raise _pending[-1]()


def _raise_on_signals():
    """In the main thread, make SIGINT raise KeyboardInterrupt and the first SIGTERM raise
    :class:`Terminated` (so partial outputs are removed, as on Ctrl-C; further SIGTERMs
    are ignored until then, so that the clean-up finishes), and record them for
    :func:`check_signals`. Returns a function that restores the previous handlers. A
    signal the parent set to be ignored stays ignored."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_sigint(signum, frame):
        _pending.append(KeyboardInterrupt)
        raise KeyboardInterrupt

    def on_sigterm(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _pending.append(Terminated)
        raise Terminated()

    def unraisable(info, default=sys.unraisablehook):
        # A signal's exception raised inside a finalizer (h5py closes objects in weakref
        # callbacks) cannot propagate: Python would print "Exception ignored ..." and a
        # traceback. It is pending (check_signals raises it again), so stay silent.
        if (isinstance(info.exc_value, KeyboardInterrupt) and _pending
                and default is sys.__unraisablehook__):  # (a host's own hook still sees it)
            return
        default(info)

    hook_before = sys.unraisablehook
    sys.unraisablehook = unraisable
    previous = {}
    for signum, handler in ((signal.SIGINT, on_sigint), (signal.SIGTERM, on_sigterm)):
        before = signal.getsignal(signum)
        if before not in (signal.SIG_IGN, None):
            previous[signum] = before
            signal.signal(signum, handler)

    def restore():
        for signum, before in previous.items():
            signal.signal(signum, before)
        sys.unraisablehook = hook_before
        _pending.clear()

    return restore
