"""One function per subcommand (``cmd_<name>``) and what they share: output checks,
grouping with a progress bar, summaries and size estimates."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import types
import zipfile
from importlib import metadata

import numpy as np
import scipy

import gpugroup
from gpugroup import io
from gpugroup._optional import require
from gpugroup.assembly import frame_size, group_coordinates
from gpugroup.backends import available_backends, get_backend
from gpugroup.cli.plot import check_picture_path, plot_demo
from gpugroup.cli.process import EXIT_OK, CLIError, progress
from gpugroup.dataset import GroupedDataset
from gpugroup.io import (
    OUTPUT_SUFFIXES,
    check_free_space,
    check_output,
    format_of,
    output_format,
    stat_input,
)
from gpugroup.io.grouped import open_grouped
from gpugroup.io.npz import CompressedMemberError
from gpugroup.rawdata import RawData, convert
from gpugroup.simulate import simulate_rawdata
from gpugroup.streamed import estimate_grouped_bytes

logger = logging.getLogger(__name__)

CACHE_SUFFIX = ".groups_cache.npz"
DEMO_PNG = "gpugroup-demo.png"
OPTIONAL_PACKAGES = ("cupy", "cuml", "dask", "distributed", "h5py", "zarr", "sklearn",
                     "matplotlib", "tqdm", "psutil")


# --------------------------------------------------------------------------- helpers
def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n} B"  # pragma: no cover


def _path_bytes(path: str) -> int:
    """Size of a file, or of every file under a directory (a ``.zarr`` store)."""
    path = path.rstrip("/\\") or path  # ("g.npz/" was written as g.npz)
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
        fmt = output_format(path)
    except ValueError:
        if os.path.isdir(path):
            raise CLIError(f"{flag} {path!r} is a directory; name the output file in it, "
                           f"e.g. {os.path.join(path, 'NAME.npz')!r}") from None
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


def _expected_groups(n: int, nsamples: int, oversample: bool, C: int) -> int:
    return nsamples if (oversample and C > 1) else min(nsamples, n)


def _capped_nsamples(raw, nsamples: int, oversample: bool) -> int:
    """``nsamples``, at most n without ``--oversample`` (with a warning). RawData refuses
    more at gridsize > 1 (PtychoPINN's OVERSAMPLING-001); the commands keep their default
    --nsamples usable on small scans."""
    if nsamples > len(raw) and not oversample:
        logger.warning(
            "--nsamples %d > %d positions: making %d groups (pass --oversample for more)",
            nsamples, len(raw), len(raw))
        return len(raw)
    return nsamples


def run_grouping(raw, *, N, gridsize, K, nsamples, seed, backend, sequential=False,
                 oversample=False, neighbor_pool_size=None, group_by_scan=False,
                 keep_diffraction=True, **out_options):
    """Group ``raw`` with a progress bar; returns ``(grouped, backend, seconds)``.

    ``out_options`` (``out``, ``lazy``, ``chunk_bytes``, ``overwrite``, ``row_order``) go
    to ``generate_grouped_data`` unchanged. Dask (``lazy``) reports no progress: no bar.
    """
    be = get_backend(backend)
    nsamples = _capped_nsamples(raw, nsamples, oversample)
    if out_options.get("lazy"):
        update, close = None, lambda: None
    else:
        update, close = progress(
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
    if args.sequential and args.seed not in (None, 0):
        logger.warning("--seed %d has no effect with --sequential: the members are drawn "
                       "with seed 0, as PtychoPINN draws them; drop --seed, or drop "
                       "--sequential to vary the groups", args.seed)
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


def _print_plan(raw, args, *, N: int, fmt: str) -> bool:
    """Print the estimated size of ``gpugroup group``'s output (and with ``--dry-run`` the
    whole plan); returns whether this is a dry run (then nothing is written)."""
    C = args.gridsize ** 2
    B = _expected_groups(len(raw), args.nsamples, args.oversample, C)
    size = estimate_grouped_bytes(raw, B=B, C=C, N=N, keep_diffraction=not args.no_diffraction,
                        locality=args.row_order == "locality")
    where = os.path.dirname(os.path.abspath(args.output))
    free = shutil.disk_usage(where).free
    arrays = (["diffraction"] * (not args.no_diffraction) + ["X_full"]
              + ["Y"] * (raw.Y is not None or raw.objectGuess is not None)
              + ["objectGuess"] * (raw.objectGuess is not None))
    print(f"estimated output: {_human_bytes(size)} ({B} groups of C={C} {N}x{N} frames: "
          f"{' + '.join(arrays)}); {_human_bytes(free)} free in {where}", flush=True)
    if args.space_check:  # the output's size is known now: refuse before grouping
        check_free_space(args.output, size, skip="--no-space-check")
    elif size > free:
        logger.warning("the output (about %s) may not fit in %s (%s free)",
                       _human_bytes(size), where, _human_bytes(free))
    if not args.dry_run:
        return False
    # The groups themselves (coordinates only, no frames read): every check of the real
    # run, and the exact count.
    nn, seed, be = raw.sample_for_grouping(
        args.K, _capped_nsamples(raw, args.nsamples, args.oversample), args.seed,
        args.gridsize, sequential_sampling=args.sequential,
        enable_oversampling=args.oversample, neighbor_pool_size=args.neighbor_pool_size,
        group_by_scan=args.group_by_scan, backend=args.backend)
    B = len(nn)
    size = estimate_grouped_bytes(raw, B=B, C=C, N=N, keep_diffraction=not args.no_diffraction,
                        locality=args.row_order == "locality")
    pool = args.K if args.neighbor_pool_size is None else args.neighbor_pool_size
    if pool > len(raw):
        pool = f"{len(raw)}: the whole scan, {pool} asked"
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
    update, close = progress(None, "converting", unit="frame")
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
    if not os.path.isdir(args.outdir):
        raise CLIError(f"--outdir {args.outdir!r} is not an existing directory; create it "
                       f"first (or leave --outdir out: the current directory)")
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

    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed: no plot (pip install 'gpugroup[plot]')")
        return EXIT_OK
    png = os.path.join(args.outdir, DEMO_PNG)
    plot_demo(raw, grouped, png, seed=grouped["seed"], K=args.K)
    print(f"  wrote {png}")
    return EXIT_OK


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
    if importlib.util.find_spec("matplotlib") is None:
        raise CLIError("gpugroup show draws with matplotlib, which is not installed: "
                       "pip install 'gpugroup[plot]'")
    source = _check_input_file(args.input)
    png = args.output or os.path.splitext(os.path.basename(source.rstrip("/\\")))[0] + ".png"
    png = check_picture_path(png, "-o")
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
    try:
        dists = metadata.packages_distributions()
    except Exception:  # pragma: no cover - unusual metadata layouts
        dists = {}
    out = {}
    for name in names:
        try:
            present = importlib.util.find_spec(name) is not None
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
    print(f"gpugroup {gpugroup.__version__}")
    print(f"python   {platform.python_version()} ({sys.executable})")
    print(f"numpy    {np.__version__}")
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
