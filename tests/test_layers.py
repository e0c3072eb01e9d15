"""The floors of DESIGN.md section 7: every module imports only modules below it.

Each module of the package has a floor in ``FLOORS``. An import of a gpugroup module, at
the top of a file or inside a function alike, must go to a strictly lower floor (a
package's ``__init__`` is the face of its parts, so it sits above them). A module missing
from the table fails the test, so a new module must be placed. With every edge pointing
down, no import circle can exist.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gpugroup"

#: module -> floor. L0 leaves, L1 backends/ and io/, L2 the algorithm, L3 drivers, L4 CLI;
#: the fractions order the modules inside a floor.
FLOORS = {
    # L0: leaves, importing nothing of gpugroup
    "gpugroup.keys": 0, "gpugroup.schema": 0, "gpugroup._xp": 0, "gpugroup._optional": 0,
    # L1: backends (base < engines < cpu, gpu < the dispatch table)
    "gpugroup.backends.base": 1.0, "gpugroup.backends.fused_pool": 1.0,
    "gpugroup.backends.engines": 1.1,
    "gpugroup.backends.cpu": 1.2, "gpugroup.backends.gpu": 1.2, "gpugroup.backends": 1.3,
    # L1: io (frame stores < each format < the table of formats < atomic outputs, the
    # grouped-output layout < whole scans < the face)
    "gpugroup.io.frames": 1.0, "gpugroup.io.npz": 1.1, "gpugroup.io.hdf5": 1.1,
    "gpugroup.io.zarr_io": 1.1, "gpugroup.io.formats": 1.2, "gpugroup.io.atomic": 1.3,
    "gpugroup.io.grouped": 1.3, "gpugroup.io.scan": 1.4, "gpugroup.io": 1.5,
    # L2: the algorithm, written against xp
    "gpugroup.grouping": 2, "gpugroup.assembly": 2,
    # L3: drivers (sinks < the RawData facade < what builds on it)
    "gpugroup.streamed": 3.0, "gpugroup.dask": 3.0, "gpugroup.dataset": 3.0,
    "gpugroup.rawdata": 3.1, "gpugroup.simulate": 3.2, "gpugroup.ptychopinn": 3.3,
    "gpugroup": 3.9,
    # L4: the command line (process handling and the picture < the commands < the parser)
    "gpugroup.cli.process": 4.0, "gpugroup.cli.plot": 4.0, "gpugroup.cli.commands": 4.1,
    "gpugroup.cli": 4.2, "gpugroup.__main__": 4.3,
}
#: Sides of L1 that never import each other (nor anything above them).
SIBLINGS = ("gpugroup.backends", "gpugroup.io")
#: The only modules that import a GPU library (lazily, inside functions). gpugroup.dask
#: hands CuPy blocks to Dask when asked for chunk_type="cupy".
GPU_LIBRARIES = ("cupy", "cupyx", "cuml")
GPU_MODULES = {"gpugroup.backends.gpu", "gpugroup.backends.engines", "gpugroup.dask"}


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = ("gpugroup",) + path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path = PACKAGE):
    """``(line, imported module)`` for every import in the file, relative ones resolved.
    ``from pkg import name`` yields ``pkg.name`` when that is a module of the package."""
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield node.lineno, sub if sub in FLOORS else base


def gpugroup_target(name: str) -> str | None:
    """The module of the table that ``name`` lives in (``gpugroup.io.frames.X`` ->
    ``gpugroup.io.frames``), or None outside gpugroup."""
    while name and name not in FLOORS:
        if not name.startswith("gpugroup"):
            return None
        name = name.rpartition(".")[0]
    return name or None


def violations(root: Path = PACKAGE) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        me = module_name(path, root)
        if me not in FLOORS:
            found.append(f"{me}: not in the floor table of tests/test_layers.py; place it")
            continue
        for line, name in imports_of(path, root):
            top = name.split(".")[0]
            if top in GPU_LIBRARIES and me not in GPU_MODULES:
                found.append(f"{me}:{line} imports {name}; only {sorted(GPU_MODULES)} may")
            target = gpugroup_target(name)
            if target is None or target == me:
                continue
            if FLOORS[target] >= FLOORS[me]:
                found.append(f"{me} (floor {FLOORS[me]}):{line} imports {target} "
                             f"(floor {FLOORS[target]}): an import must go down")
            for side in SIBLINGS:
                other = next(s for s in SIBLINGS if s != side)
                if (me == side or me.startswith(side + ".")) and (
                        target == other or target.startswith(other + ".")):
                    found.append(f"{me}:{line} imports {target}: {side} and {other} never "
                                 f"import each other")
    return found


def test_every_import_goes_down_a_floor():
    assert violations() == []


def test_the_table_names_only_modules_that_exist():
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    assert set(FLOORS) - {"gpugroup.ptychopinn"} <= modules, sorted(set(FLOORS) - modules)


@pytest.mark.parametrize("planted,expected", [
    ("from gpugroup.rawdata import RawData\n", "imports gpugroup.rawdata"),
    ("def f():\n    from gpugroup import assembly\n", "imports gpugroup.assembly"),
    ("from .. import grouping\n", "imports gpugroup.grouping"),
    ("def f():\n    import cupy\n", "imports cupy"),
])
def test_a_planted_upward_import_is_caught(tmp_path, planted, expected):
    """Copy the package, plant an upward import into a low module, and see it reported."""
    import shutil

    copy = tmp_path / "gpugroup"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with (copy / "io" / "frames.py").open("a") as fh:
        fh.write("\n" + planted)
    found = violations(copy)
    assert any(expected in v and v.startswith("gpugroup.io.frames") for v in found), found
