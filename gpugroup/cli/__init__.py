"""The ``gpugroup`` command line: simulate, group, convert, demo, show, info, cleanup-cache.

One function per subcommand (``cmd_<name>`` in :mod:`gpugroup.cli.commands`), registered
in :func:`build_parser`; :mod:`gpugroup.cli.process` holds exit codes, signals and progress
bars, :mod:`gpugroup.cli.plot` the picture. The CLI is the only part of gpugroup that
prints, configures logging (``-v``/``-vv``) or shows progress bars (tqdm, when installed).
Bad input ends with one line ``gpugroup: error: ...`` on stderr and exit status 2 (a
traceback only with ``-vv``).
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import sys

import gpugroup
from gpugroup.cli import commands
from gpugroup.cli.process import (
    EXIT_BROKEN_PIPE,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    PROG,
    USER_ERRORS,
    Terminated,
    configure_logging,
    raise_on_signals,
    report,
    stdout_closed,
)

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
        p.set_defaults(func=func, parser=p)
        return p

    p = add("simulate", commands.cmd_simulate, "write a synthetic scan (.npz, .h5 or .zarr)",
            "gpugroup simulate scan.npz --n 2000 --N 64 --seed 0")
    p.add_argument("out", metavar="OUT", help="output scan file: .npz, .h5/.hdf5 or .zarr")
    p.add_argument("--n", type=_positive_int, default=2000,
                   help="scan positions (default %(default)s)")
    p.add_argument("--N", type=_positive_int, default=64,
                   help="frame size in pixels (default %(default)s)")
    p.add_argument("--seed", type=_seed, default=0,
                   help="simulation seed (default %(default)s)")
    _add_overwrite(p)

    p = add("group", commands.cmd_group, "group a scan and write the grouped training arrays",
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
                   help="seeds are positions 0..nsamples-1 instead of a random sample; the "
                        "members are drawn with seed 0 (--seed has no effect, as in "
                        "PtychoPINN)")
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

    p = add("convert", commands.cmd_convert,
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

    p = add("demo", commands.cmd_demo, "simulate, group and plot a demo scan (gpugroup-demo.png)",
            "gpugroup demo --outdir /tmp")
    p.add_argument("--n", type=_positive_int, default=2000,
                   help="scan positions (default %(default)s)")
    p.add_argument("--N", type=_positive_int, default=64,
                   help="frame size in pixels (default %(default)s)")
    _add_grouping_options(p, nsamples=1000, seed=0)
    p.add_argument("--outdir", default=".",
                   help=f"where to write {commands.DEMO_PNG} (default: the current directory)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")

    p = add("show", commands.cmd_show,
            "draw a scan or a grouped output as the demo does (needs [plot])",
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

    add("info", commands.cmd_info, "versions, backends, GPUs and optional packages",
        "gpugroup info")

    p = add("cleanup-cache", commands.cmd_cleanup_cache,
            f"list or delete old *{commands.CACHE_SUFFIX} group caches under DIR",
            "gpugroup cleanup-cache ~/data --dry-run")
    p.add_argument("dir", metavar="DIR", help="directory to search recursively")
    p.add_argument("--dry-run", action="store_true", help="list the files; delete nothing")
    p.add_argument("--yes", action="store_true",
                   help="delete without asking; without it, cleanup-cache asks on a "
                        "terminal and refuses when stdin is not one (a script, a pipe)")
    return parser


def _unrecognized(parser, extra) -> None:
    """Exit through ``parser.error`` naming the arguments it does not take, and the option
    that was likely meant (``--nsample``: ``--nsamples``)."""
    options = [o for action in parser._actions for o in action.option_strings]
    meant = [close[0] for a in extra if a.startswith("-")
             for close in [difflib.get_close_matches(a.split("=")[0], options, n=1)] if close]
    hint = f" (did you mean {', '.join(meant)}?)" if meant else ""
    parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")


def _version() -> str:
    return gpugroup.__version__


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
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # said by the parser of where it stands (its usage), with the option meant
            before = extra[0] in argv[:argv.index(args.command)]
            _unrecognized(parser if before else args.parser, extra)
    except SystemExit as exc:  # --help, --version, or an argparse error (status 2)
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    args.verbose += getattr(args, "sub_verbose", 0)  # -v before and after the command add up
    if getattr(args, "key", None) is not None:  # --key FIELD=PATH pairs, repeatable
        args.key = dict(args.key)
    configure_logging(args.verbose)
    restore = raise_on_signals()
    try:
        status = args.func(args)
        if sys.stdout is not None:  # None: started with stdout closed
            sys.stdout.flush()  # a reader that left shows here, not in Python's final flush
        return status
    except BrokenPipeError as exc:
        if not stdout_closed():
            return report(exc, args)
        return EXIT_BROKEN_PIPE  # e.g. `gpugroup info | head -1`: the reader left
    except USER_ERRORS + (MemoryError,) as exc:
        return report(exc, args)
    except Terminated:
        print(f"{PROG}: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        restore()
