"""The README and the guide in docs/ stay true: every ```python block runs as written, top
to bottom per page, in an empty directory; every ``gpugroup ...`` line of a ```bash block
parses; every relative link (and #anchor) resolves.

A block that cannot run on a CPU-only machine with the test extras starts with the marker
line ``# docs-test: skip (reason)``; it is reported as skipped with that reason.
"""

from __future__ import annotations

import logging
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)")
SKIP_MARKER = re.compile(r"^#\s*docs-test:\s*skip\s*\((?P<reason>.+)\)\s*$")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?(?P<target>[^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def code_blocks(path: Path):
    """``(language, first line number of the code, source)`` of each fenced block."""
    blocks, fence, lang, start, body = [], None, "", 0, []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = FENCE.match(line.strip())
        if fence is None:
            if m:
                fence, lang, start, body = m.group(1), m.group(2).lower(), number + 1, []
        elif m and line.strip().startswith(fence) and not m.group(2):
            blocks.append((lang, start, "\n".join(body)))
            fence = None
        else:
            body.append(line)
    assert fence is None, f"{_rel(path)}: a code fence opened at line {start - 1} never closes"
    return blocks


def _skip_reason(source: str):
    first = source.lstrip("\n").splitlines()[0] if source.strip() else ""
    m = SKIP_MARKER.match(first.strip())
    return m.group("reason") if m else None


def _python_blocks(path):
    return [(line, src) for lang, line, src in code_blocks(path) if lang in ("python", "py")]


RUNNABLE = [p for p in PAGES if any(_skip_reason(s) is None for _, s in _python_blocks(p))]

#: Optional packages (of the test extra) an example needs, recognised in its code: a page
#: whose examples need a missing one skips naming it (the core-only CI job).
OPTIONAL = {"h5py": r"\bh5py\b|\.(h5|hdf5|cxi)\b", "zarr": r"\bzarr\b|\.zarr\b",
            "dask": r"\bdask\b|lazy=True", "matplotlib": r"\bmatplotlib\b"}


def missing_packages(page):
    import importlib.util

    code = "\n".join(src for _, src in _python_blocks(page) if _skip_reason(src) is None)
    return [m for m, pattern in OPTIONAL.items()
            if re.search(pattern, code) and importlib.util.find_spec(m) is None]
MARKED = [(p, line, _skip_reason(s)) for p in PAGES for line, s in _python_blocks(p)
          if _skip_reason(s) is not None]


def test_the_pages_exist():
    names = {_rel(p) for p in PAGES}
    for page in ("README.md", "docs/index.md", "docs/getting-started.md",
                 "docs/python-api.md", "docs/cli.md", "docs/formats-and-out-of-core.md",
                 "docs/gpu-and-deployment.md", "docs/determinism.md", "docs/performance.md",
                 "docs/troubleshooting.md", "docs/DESIGN.md"):
        assert page in names, f"{page} is missing"
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 150


# --------------------------------------------------------------------------- examples
@pytest.fixture
def _isolated(tmp_path, monkeypatch):
    """An empty working directory, and the logging configuration put back afterwards
    (examples may call logging.basicConfig)."""
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), logging.getLogger("gpugroup").level)
    yield tmp_path
    for handler in root.handlers[:]:
        if handler not in saved[1]:
            root.removeHandler(handler)
    root.setLevel(saved[0])
    logging.getLogger("gpugroup").setLevel(saved[2])


@pytest.mark.parametrize("page", RUNNABLE, ids=_rel)
def test_python_examples_run(page, _isolated):
    missing = missing_packages(page)
    if missing:
        pytest.skip(f"{_rel(page)}: needs {', '.join(missing)} (pip install \".[test]\")")
    namespace = {"__name__": "__docs__"}
    for line, source in _python_blocks(page):
        if _skip_reason(source) is not None:
            continue  # reported by test_marked_examples_are_skipped
        # Pad so that tracebacks give the line number in the Markdown file.
        code = compile("\n" * (line - 1) + source, str(page), "exec")
        try:
            exec(code, namespace)
        except Exception as exc:
            pytest.fail(f"{_rel(page)}: the example at line {line} fails: "
                        f"{type(exc).__name__}: {exc}")


@pytest.mark.parametrize("page, line, reason", MARKED,
                         ids=[f"{_rel(p)}:{line}" for p, line, _ in MARKED])
def test_marked_examples_are_skipped(page, line, reason):
    pytest.skip(f"{_rel(page)}:{line}: {reason}")


def test_few_examples_are_marked():
    total = sum(len(_python_blocks(p)) for p in PAGES)
    assert len(MARKED) <= max(3, total // 8), (
        f"{len(MARKED)} of {total} Python examples are marked to skip: keep exceptions rare")


# --------------------------------------------------------------------------- command lines
def _cli_lines(page):
    """``(line, argv)`` for each ``gpugroup ...`` command in the page's shell blocks."""
    for lang, start, source in code_blocks(page):
        if lang not in ("bash", "sh", "shell", "console"):
            continue
        for offset, text in enumerate(source.replace("\\\n", " ").splitlines()):
            text = re.sub(r"(^|\s)#.*$", "", text)  # comments
            for part in re.split(r"&&|\|\||;|\|", text):
                try:
                    words = shlex.split(part)
                except ValueError:
                    continue
                while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0]):
                    words.pop(0)  # VAR=value before the command
                if words[:3] == ["python", "-m", "gpugroup"]:
                    words = words[2:]
                if words[:1] == ["gpugroup"]:
                    yield start + offset, words[1:]


CLI_LINES = [(p, line, argv) for p in PAGES for line, argv in _cli_lines(p)]


@pytest.mark.parametrize("page, line, argv", CLI_LINES,
                         ids=[f"{_rel(p)}:{line}" for p, line, _ in CLI_LINES])
def test_command_lines_parse(page, line, argv, capsys):
    from gpugroup.cli import build_parser

    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        assert exc.code == 0, (f"{_rel(page)}:{line}: `gpugroup {' '.join(argv)}` does not "
                               f"parse: {capsys.readouterr().err.strip()}")


def test_the_readme_commands_are_there():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert 'pip install ".[plot]" && gpugroup demo' in text
    assert 'pip install ".[test]" && pytest -m "not gpu"' in text
    assert any(argv[:1] == ["show"] for p, _, argv in CLI_LINES if p.name == "README.md")


# --------------------------------------------------------------------------- links
def _prose(path: Path) -> str:
    """The page without code: fenced blocks blanked (line numbers kept), code spans removed."""
    lines = path.read_text(encoding="utf-8").splitlines()
    inside = None
    for i, line in enumerate(lines):
        m = FENCE.match(line.strip())
        if inside is None and m:
            inside, lines[i] = m.group(1), ""
        elif inside is not None:
            if m and line.strip().startswith(inside) and not m.group(2):
                inside = None
            lines[i] = ""
    return re.sub(r"`[^`\n]*`", "", "\n".join(lines))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|__", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link keeps its text
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set:
    seen, out = {}, set()
    for line in _prose(path).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            k = seen.get(base, 0)
            seen[base] = k + 1
            out.add(base if k == 0 else f"{base}-{k}")
    return out


def _links(page):
    text = _prose(page)
    for m in LINK.finditer(text):
        target = m.group("target")
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        yield text.count("\n", 0, m.start()) + 1, target


LINKS = [(p, line, target) for p in PAGES for line, target in _links(p)]


@pytest.mark.parametrize("page, line, target", LINKS,
                         ids=[f"{_rel(p)}:{line}:{t}" for p, line, t in LINKS])
def test_relative_links_resolve(page, line, target):
    path, _, anchor = target.partition("#")
    where = (page.parent / path).resolve() if path else page
    assert where.exists(), f"{_rel(page)}:{line}: link to {target!r}: {path} does not exist"
    if anchor and where.suffix == ".md":
        assert anchor in anchors(where), (
            f"{_rel(page)}:{line}: link to {target!r}: {_rel(where)} has no heading with "
            f"anchor #{anchor}")


def test_the_checkers_see_what_they_should():
    """The parsers behind the tests above, on a page made for them."""
    assert slug("3. The canonical grouping algorithm (what \"identical\" means)") == (
        "3-the-canonical-grouping-algorithm-what-identical-means")
    assert slug("`gpugroup group`: options") == "gpugroup-group-options"
    assert "4-your-own-scan" in anchors(ROOT / "docs" / "getting-started.md")
    readme_links = {t for p, _, t in LINKS if p.name == "README.md"}
    assert {"docs/images/gpugroup-demo.png", "docs/ptychopinn.md"} <= readme_links
    assert len(RUNNABLE) >= 6 and len(CLI_LINES) >= 20
    formats = ROOT / "docs" / "formats-and-out-of-core.md"
    code = "\n".join(src for _, src in _python_blocks(formats))
    assert re.search(OPTIONAL["h5py"], code) and re.search(OPTIONAL["zarr"], code)
    assert not any(re.search(p, "\n".join(src for _, src in _python_blocks(ROOT / "README.md")))
                   for p in OPTIONAL.values()), "README's example must run on the core install"
