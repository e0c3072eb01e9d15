"""Packaging and deployment checks that need no GPU and no Docker.

``import gpugroup`` stays light (no GPU or optional modules); ``pyproject.toml``,
``docker/Dockerfile``, ``environment.yml``, ``.ci/run`` and the README agree with each other
(DESIGN.md section 4, issues 2 and 3). Docker cannot build here, so the Dockerfile is
linted for structure instead.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
ENVIRONMENT = ROOT / "environment.yml"
README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"

#: Modules that ``import gpugroup`` must not pull in (GPU stacks and optional extras).
HEAVY_MODULES = (
    "cupy", "cupyx", "cuml", "dask", "distributed", "h5py", "zarr", "matplotlib",
    "tqdm", "sklearn", "torch",
)

QUICK_START = (
    'pip install ".[plot]" && gpugroup demo',
    'pip install ".[test]" && pytest -m "not gpu"',
)


def _load_toml(path: Path) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        tomllib = pytest.importorskip("tomli", reason="reading TOML on Python 3.10 needs tomli")
    with path.open("rb") as fh:
        return tomllib.load(fh)


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return _load_toml(PYPROJECT)


@pytest.fixture(scope="module")
def requires_python(pyproject) -> SpecifierSet:
    return SpecifierSet(pyproject["project"]["requires-python"])


def _core_dependency_names(pyproject) -> set[str]:
    return {Requirement(r).name.lower() for r in pyproject["project"]["dependencies"]}


def _extra_names(pyproject, extra: str) -> set[str]:
    reqs = pyproject["project"]["optional-dependencies"][extra]
    return {Requirement(r).name.lower() for r in reqs}


# ----------------------------------------------------------------- (a) import stays light
def test_import_gpugroup_does_not_import_heavy_modules():
    code = (
        "import json, sys\n"
        "import gpugroup\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    # A fresh interpreter from the repository root: nothing else in this test process
    # (pytest plugins, other tests) can have imported these modules for it.
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"import gpugroup failed:\n{proc.stderr}"
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    offenders = sorted(
        m for m in loaded
        if any(m == h or m.startswith(h + ".") for h in HEAVY_MODULES)
    )
    assert not offenders, f"import gpugroup imported optional/GPU modules: {offenders}"


# ----------------------------------------------------------------------- (b) Dockerfile
def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuations joined."""
    text = DOCKERFILE.read_text()
    logical, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            logical.append(buf.strip())
        buf = ""
    if buf.strip():
        logical.append(buf.strip())
    out = []
    for item in logical:
        word, _, rest = item.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


FROM_RE = re.compile(
    r"^(?:--platform=\S+\s+)?rapidsai/base:(?P<rapids>\d{2}\.\d{2})-cuda12-py3\.(?P<minor>\d+)"
    r"(?:\s+AS\s+\S+)?$",
    re.IGNORECASE,
)


def test_dockerfile_from_is_a_pinned_rapids_base_tag(requires_python):
    froms = [args for word, args in _dockerfile_instructions() if word == "FROM"]
    assert froms, "docker/Dockerfile has no FROM line"
    final = froms[-1]
    assert "latest" not in final.lower(), f"FROM must pin a tag, not 'latest': {final}"
    m = FROM_RE.match(final)
    assert m, (
        f"FROM must be rapidsai/base:<YY.MM>-cuda12-py3.<minor> (a pinned RAPIDS tag), "
        f"got {final!r}"
    )
    python = Version(f"3.{m['minor']}")
    assert python in requires_python, (
        f"the image's Python {python} is outside pyproject requires-python "
        f"{requires_python}"
    )


def test_dockerfile_installs_the_package_and_keeps_entrypoint_and_user():
    instr = _dockerfile_instructions()
    words = [w for w, _ in instr]
    assert "ENTRYPOINT" not in words, "keep the RAPIDS image's entrypoint (no ENTRYPOINT)"

    copies = [a for w, a in instr if w in ("COPY", "ADD")]
    assert any("gpugroup" in a or a.split()[0] == "." for a in copies), (
        f"the Dockerfile must copy the package source into the image, COPY lines: {copies}"
    )
    installs = [a for w, a in instr if w == "RUN" and re.search(r"\bpip\b.*\binstall\b", a)]
    assert any(re.search(r"\binstall\b[^&;|]*\s\.(\s|$|\[)", a) for a in installs), (
        f"the Dockerfile must `pip install .` the repository, RUN lines: {installs}"
    )

    users = [a for w, a in instr if w == "USER"]
    if users:  # switching to root for a step is fine, but switch back
        assert users[-1].split(":")[0] not in ("root", "0"), (
            f"the image must end as the base image's user, not {users[-1]!r}"
        )

    cmds = [a for w, a in instr if w == "CMD"]
    assert cmds, "the Dockerfile needs a default CMD"
    cmd = cmds[-1]
    if cmd.startswith("["):
        argv = json.loads(cmd)
    else:
        argv = cmd.split()
    assert argv and argv[0] == "gpugroup", f"the default command must run gpugroup, got {cmd}"


# --------------------------------------------------------------------- (c) environment.yml
def parse_environment_yml(text: str) -> dict:
    """A tiny parser for the subset of YAML that conda environment files use.

    Top-level ``key: value`` and ``key:`` followed by a ``- item`` list; inside
    ``dependencies`` one nested ``- pip:`` list. Returns ``{"name": str, "channels": [...],
    "dependencies": [...], "pip": [...]}``.
    """
    out: dict = {"channels": [], "dependencies": [], "pip": []}
    section = None
    pip_indent = None
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        body = line.strip()
        if indent == 0:
            key, _, value = body.partition(":")
            section, pip_indent = key.strip(), None
            if value.strip():
                out[section] = value.strip().strip("'\"")
            continue
        if not body.startswith("- "):
            raise ValueError(f"unexpected line in environment.yml: {raw!r}")
        item = body[2:].strip().strip("'\"")
        if pip_indent is not None and indent > pip_indent:
            out["pip"].append(item)
            continue
        pip_indent = None
        if section == "dependencies" and item.rstrip() == "pip:":
            pip_indent = indent
            continue
        out.setdefault(section, []).append(item)
    return out


def _conda_name(spec: str) -> str:
    return re.split(r"[=<>!~\s]", spec, maxsplit=1)[0].strip().lower()


@pytest.fixture(scope="module")
def environment() -> dict:
    return parse_environment_yml(ENVIRONMENT.read_text())


def test_environment_parser_agrees_with_pyyaml(environment):
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load(ENVIRONMENT.read_text())
    plain = [d for d in doc["dependencies"] if isinstance(d, str)]
    pip = [d["pip"] for d in doc["dependencies"] if isinstance(d, dict)]
    assert doc["channels"] == environment["channels"]
    assert plain == environment["dependencies"]
    assert (pip[0] if pip else []) == environment["pip"]


def test_environment_yml_channels_and_gpu_stack(environment):
    channels = environment["channels"]
    assert "rapidsai" in channels and "conda-forge" in channels, channels
    assert channels.index("rapidsai") < channels.index("conda-forge"), (
        "rapidsai must come before conda-forge so cuML resolves from the RAPIDS channel"
    )
    deps = environment["dependencies"]
    names = {_conda_name(d) for d in deps}
    for needed in ("cuml", "cupy", "numpy", "scipy", "pytest", "pip"):
        assert needed in names, f"environment.yml lacks {needed}: {deps}"
    cuda = [d for d in deps if _conda_name(d) == "cuda-version"]
    assert cuda, "environment.yml must pin cuda-version"
    assert re.fullmatch(r"cuda-version\s*==?\s*1[2-9](\.\d+)+", cuda[0].replace(" ", "")), (
        f"cuda-version must be an explicit pin such as cuda-version=12.8, got {cuda[0]!r}"
    )
    assert any(re.fullmatch(r"-e\s+\.(\[[\w,-]+\])?", p) for p in environment["pip"]), (
        f"environment.yml must install gpugroup with `pip: [-e .]`, pip list: "
        f"{environment['pip']}"
    )


def test_environment_yml_covers_pyproject(environment, pyproject, requires_python):
    names = {_conda_name(d) for d in environment["dependencies"]}
    missing = _core_dependency_names(pyproject) - names
    assert not missing, f"core dependencies missing from environment.yml: {sorted(missing)}"
    python = [d for d in environment["dependencies"] if _conda_name(d) == "python"]
    assert python, "environment.yml must pin python"
    m = re.search(r"(\d+\.\d+)", python[0])
    assert m and Version(m[1]) in requires_python, (
        f"environment.yml {python[0]!r} is outside requires-python {requires_python}"
    )


# -------------------------------------------------------------------------- (d) pyproject
def test_pyproject_metadata(pyproject):
    project = pyproject["project"]
    assert project["name"] == "gpugroup"
    assert _core_dependency_names(pyproject) == {"numpy", "scipy"}, (
        "core dependencies are numpy and scipy only; everything else is an extra"
    )
    # zarr 3 and current cuML need Python 3.11: admitting 3.10 would leave extras that
    # cannot resolve there.
    admitted = SpecifierSet(project["requires-python"])
    assert Version("3.11") in admitted and Version("3.10") not in admitted
    extras = project["optional-dependencies"]
    for extra in ("test", "plot", "cu12", "cu13", "dask", "hdf5", "zarr"):
        assert extra in extras, f"missing extra [{extra}]"
    assert {"cupy-cuda12x", "cuml-cu12"} <= _extra_names(pyproject, "cu12")
    assert {"cupy-cuda13x", "cuml-cu13"} <= _extra_names(pyproject, "cu13")
    test = _extra_names(pyproject, "test")
    assert {"pytest", "hypothesis", "scikit-learn"} <= test
    # The CPU suite covers every optional format and tool, so the test extra holds them.
    for extra in ("plot", "dask", "hdf5", "zarr"):
        assert _extra_names(pyproject, extra) <= test, f"[test] must include [{extra}]"
    assert project["scripts"]["gpugroup"] == "gpugroup.cli:main"


def _requirements(pyproject, extra: str) -> dict[str, Requirement]:
    return {Requirement(r).name.lower(): Requirement(r)
            for r in pyproject["project"]["optional-dependencies"][extra]}


@pytest.mark.parametrize("extra", ["test", "dask"])
def test_dask_and_distributed_come_from_one_release(pyproject, extra):
    """A bare "distributed" lets pip backtrack it years (distributed 2021.4.1 beside dask
    2026.11.0 cannot import); dask's own [distributed] extra pins it to dask's release."""
    reqs = _requirements(pyproject, extra)
    assert "distributed" not in reqs, f"[{extra}] names distributed unpinned: {reqs}"
    assert {"array", "distributed"} <= reqs["dask"].extras, reqs["dask"]


@pytest.mark.parametrize("extra,cupy,cuml", [("cu12", "cupy-cuda12x", "cuml-cu12"),
                                             ("cu13", "cupy-cuda13x", "cuml-cu13")])
def test_gpu_extras_follow_rapids_cupy_exclusions(pyproject, extra, cupy, cuml):
    reqs = _requirements(pyproject, extra)
    spec = reqs[cupy].specifier
    assert "ctk" in reqs[cupy].extras, f"{cupy} needs [ctk] for the CUDA libraries via pip"
    for excluded in ("13.5.0", "14.0.0", "14.0.1", "14.1.0"):
        assert not spec.contains(excluded), f"[{extra}] admits {cupy} {excluded}"
    for fine in ("13.6.0", "14.1.1", "14.2.0"):
        assert spec.contains(fine), f"[{extra}] refuses {cupy} {fine}"
    assert not reqs[cuml].specifier.contains("25.8.0") and reqs[cuml].specifier.contains(
        "25.10.0")


def test_every_requirement_has_a_floor_and_no_python_marker(pyproject):
    """Each extra resolves on every Python requires-python admits: no marker narrows one."""
    project = pyproject["project"]
    lists = [project["dependencies"], *project["optional-dependencies"].values()]
    for req in (Requirement(r) for reqs in lists for r in reqs):
        assert req.marker is None, f"{req} carries a marker; raise requires-python instead"
        assert any(s.operator in (">=", "==", "~=") for s in req.specifier), (
            f"{req} has no floor")


def test_pyproject_version_matches_package(pyproject):
    import gpugroup

    project = pyproject["project"]
    if "version" in project:
        assert project["version"] == gpugroup.__version__
    else:
        assert "version" in project.get("dynamic", [])
        attr = pyproject["tool"]["setuptools"]["dynamic"]["version"]["attr"]
        assert attr == "gpugroup.__version__"
    Version(gpugroup.__version__)  # PEP 440


def test_pytest_configuration(pyproject):
    ini = pyproject["tool"]["pytest"]["ini_options"]
    assert "--strict-markers" in ini["addopts"].split()
    assert ini.get("xfail_strict") is True
    markers = {m.split(":", 1)[0].strip() for m in ini["markers"]}
    assert {"gpu", "slow"} <= markers


# ----------------------------------------------------------------------- (e) README, CI
def test_readme_quick_start_commands():
    text = README.read_text()
    for command in QUICK_START:
        assert command in text, f"README must show the quick-start command: {command}"


def test_ci_script_runs_the_readme_test_command():
    text = CI_RUN.read_text()
    assert os.access(CI_RUN, os.X_OK), ".ci/run must be executable"
    assert text.startswith("#!"), ".ci/run needs a shebang"
    assert "set -euo pipefail" in text
    assert 'pip install ".[test]"' in text
    assert re.search(r'pytest -m "not gpu"', text)
    assert re.search(r"-eq 5", text), ".ci/run must treat pytest exit code 5 as a failure"
    proc = subprocess.run(["bash", "-n", str(CI_RUN)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------- (f) pins that move together
#: CuPy releases each RAPIDS release was built and tested against (RAPIDS' own conda
#: metadata asks cupy>=13.6.0; CuPy 14 came after RAPIDS 25.10 and was never tested with it).
RAPIDS_CUPY = {"25.10": SpecifierSet(">=13.6,<14")}
CUPY_PROBES = ("13.5.1", "13.6.0", "13.6.5", "14.0.0", "14.1.0", "14.2.0", "15.0.0")


def _rapids_release(environment) -> str:
    (cuml,) = [d for d in environment["dependencies"] if _conda_name(d) == "cuml"]
    m = re.fullmatch(r"cuml\s*==?\s*(\d{2}\.\d{2})(\.\*)?", cuml.replace(" ", ""))
    assert m, f"environment.yml must pin cuML to one RAPIDS release (cuml=YY.MM), got {cuml!r}"
    return m[1]


def test_environment_yml_cupy_pin_matches_its_rapids_release(environment):
    release = _rapids_release(environment)
    assert release in RAPIDS_CUPY, (
        f"RAPIDS {release}: add the CuPy range it was released against to RAPIDS_CUPY")
    (cupy,) = [d for d in environment["dependencies"] if _conda_name(d) == "cupy"]
    spec = cupy[len("cupy"):].replace(" ", "")
    assert spec, f"environment.yml's cupy is unpinned: RAPIDS {release} needs {RAPIDS_CUPY[release]}"
    ours = SpecifierSet(spec)
    want = RAPIDS_CUPY[release]
    for v in CUPY_PROBES:
        assert (Version(v) in ours) == (Version(v) in want), (
            f"environment.yml {cupy!r} and RAPIDS {release} ({want}) disagree about CuPy {v}")


def test_dockerfile_tag_is_the_rapids_release_of_environment_yml(environment):
    froms = [args for word, args in _dockerfile_instructions() if word == "FROM"]
    m = FROM_RE.match(froms[-1])
    assert m and m["rapids"] == _rapids_release(environment), (
        f"docker/Dockerfile {froms[-1]!r} and environment.yml's cuml={_rapids_release(environment)} "
        f"must name the same RAPIDS release")


def test_dockerfile_build_directory_belongs_to_the_build_user():
    """WORKDIR creates a missing directory as root (classic builder, kaniko); the in-tree
    build runs as `rapids` and writes there, so the directory must be created and chowned
    before it, and the install must not run as root."""
    user, workdir, made = "rapids", "/", {}
    for word, args in _dockerfile_instructions():
        if word == "USER":
            user = args.split(":")[0]
        elif word == "WORKDIR":
            workdir = args if args.startswith("/") else f"{workdir.rstrip('/')}/{args}"
        elif word == "RUN" and "chown" in args:
            for path in re.findall(r"(/[\w./-]+)", args):
                made[path.rstrip("/")] = re.search(r"chown\s+(?:-\S+\s+)?([\w-]+)", args)[1]
        elif word == "RUN" and re.search(r"\bpip\b.*\binstall\b", args):
            assert user not in ("root", "0"), "install gpugroup as `rapids`, not root"
            owner = made.get(workdir.rstrip("/"))
            assert owner == user, (
                f"the build directory {workdir} must be created and chowned to {user} in a "
                f"RUN before the install (WORKDIR alone makes it root's); chowned: {made}")
            return
    pytest.fail("docker/Dockerfile has no pip install")
