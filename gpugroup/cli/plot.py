"""The demo's picture, drawn for ``gpugroup demo`` and ``gpugroup show``: matplotlib is
imported here only, when a picture is asked for."""

from __future__ import annotations

import logging
import os

import numpy as np

from gpugroup.backends import get_backend
from gpugroup.grouping import exact_rescale, neighbour_pool, sample_seeds

logger = logging.getLogger(__name__)


def check_picture_path(path, flag: str = "-o") -> str:
    """The picture ``path`` (given as ``flag``) matplotlib will write: ``.png`` added to a
    name without a suffix (as matplotlib does); refused, before any work, when it has a
    suffix matplotlib has no format for, or its directory is missing or not writable."""
    from matplotlib.backend_bases import FigureCanvasBase

    kinds = FigureCanvasBase.get_supported_filetypes()
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        raise IsADirectoryError(f"{flag} {path!r}: a directory; give a file name, e.g. "
                                f"{os.path.join(path, 'picture.png')!r}")
    path = path.rstrip(".")
    if not os.path.splitext(path)[1]:
        path += ".png"
    suffix = os.path.splitext(path)[1].lower().lstrip(".")
    if suffix not in kinds:
        raise ValueError(f"{flag} {path!r}: matplotlib cannot write .{suffix}; end the "
                         f"name with one of {', '.join('.' + k for k in sorted(kinds))} "
                         f"(e.g. .png)")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{flag} {path!r}: the directory {directory!r} does not "
                                f"exist; create it first or choose another path")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path!r}: cannot write in the directory "
                              f"{directory!r}; choose a writable one")
    return path


def spread_rows(centres, count: int):
    """``count`` group rows spread over the scan's interior (greedy farthest-point).

    Starts at the group nearest the scan's centre and only picks groups within 80 % of
    the scan's radius, so the drawn groups are typical ones, not edge cases.
    """
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
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Circle

    x, y = np.asarray(raw.xcoords), np.asarray(raw.ycoords)
    n = int(np.count_nonzero(np.isfinite(x)))
    nn = np.asarray(grouped["nn_indices"])
    B, C = nn.shape
    N = grouped["X_full"].shape[1]
    seeds = None if seed is None else sample_seeds(np, len(x), min(B, len(x)), int(seed))
    centres = np.asarray(grouped["coords_offsets"])[:, 0, :, 0]
    rows = spread_rows(centres, n_groups)
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
        xr, yr = exact_rescale(x, y)  # the pool as grouping ranks it (tiny coordinates)
        pool = neighbour_pool(np, xr, yr, np.array([s_]), K,
                              get_backend("cpu").build_index(xr, yr))[0]
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
