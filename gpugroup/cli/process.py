"""How the command line behaves as a process: exit codes, one-line errors, logging set-up,
progress bars, SIGINT/SIGTERM turned into exceptions (so partial outputs are removed), and
a reader that left (a broken pipe) as a quiet exit 141."""

from __future__ import annotations

import logging
import os
import select
import signal
import stat
import sys
import threading
import traceback

logger = logging.getLogger(__name__)

PROG = "gpugroup"
EXIT_OK = 0
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports `gpugroup info | head -1`
EXIT_TERMINATED = 143  # 128 + SIGTERM (kill, timeout, SLURM, docker stop)


class CLIError(ValueError):
    """Bad command-line input detected by the CLI itself (reported like library errors)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that partial outputs are removed as on Ctrl-C."""


#: Errors reported as one line with exit status 2; anything else is a bug and shows a
#: traceback. ImportError: an optional package (h5py, zarr, dask) is missing; its message
#: gives the pip line.
USER_ERRORS = (ValueError, OSError, RuntimeError, ImportError)


def configure_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)  # also when a host (e.g. pytest) set handlers first


def progress_bar(total, desc: str, unit: str = "group"):
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


def progress(total, desc: str, unit: str = "group"):
    """``(callback, close)``: a progress bar whose callback also raises a signal's
    exception that Python dropped (:func:`check_signals`), at every step."""
    update, close = progress_bar(total, desc, unit)

    def step(k):
        check_signals()
        if update is not None:
            update(k)

    return step, close


#: What to ask for less of when a command runs out of memory.
_MEMORY_HINTS = {
    "group": "fewer groups (--nsamples), a smaller pool (--K, --neighbor-pool-size) or a "
             "smaller --chunk-mib",
    "convert": "a smaller --slab-mib",
    "simulate": "fewer positions (--n) or smaller frames (--N)",
    "demo": "fewer positions (--n), groups (--nsamples) or smaller frames (--N)",
    "show": "fewer groups (--nsamples)",
}


def report(exc, args) -> int:
    """One ``gpugroup: error: ...`` line (and the traceback with -vv); exit status 2."""
    if args.verbose >= 2:
        traceback.print_exc(file=sys.stderr)
    message = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, MemoryError):
        message = (f"out of memory ({message}): ask for "
                   f"{_MEMORY_HINTS.get(args.command, 'a smaller job')}")
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def stdout_closed() -> bool:
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


def raise_on_signals():
    """In the main thread, make SIGINT raise KeyboardInterrupt and the first SIGTERM raise
    :class:`Terminated` (so partial outputs are removed, as on Ctrl-C; further SIGTERMs
    are ignored until then, so that the clean-up finishes), and record them for
    :func:`check_signals`. Returns a function that restores the previous handlers. A
    signal the parent set to be ignored stays ignored."""
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
