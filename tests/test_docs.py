"""docs/*.md and README.md stay true to the repository, cheaply.

- Each ```python block of a docs page runs, in order, in one namespace per page (as
  tests/test_readme.py does for README.md).
- A block that needs a server, a finished sweep or more than a few seconds is fenced
  ```python no-run, says why on its first line (``# no-run: ...``) and must still compile.
- Every repository path a page names (``benchmarks/X.py``, ``sweeps/Y.yaml``, ``examples/...``,
  ``platform/...``) exists, every ``omninet <subcommand>`` is a real subcommand, and every
  relative link (and its #anchor) resolves.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]

FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", flags=re.S | re.M)
PATH = re.compile(r"(?<![\w/.<>-])((?:benchmarks|sweeps|examples|platform|tests|omninet|dashboards)/[\w./=-]*\w\.(?:py|ya?ml|sh|md|json))")
# omninet where a command starts: a line's start, after a shell separator or after `--` (ray job submit -- omninet ...)
SUBCOMMAND = re.compile(r"(?:^|[;&|(]|(?<=--)[ \t])[ \t]*omninet[ \t]+([a-z][\w-]*)", flags=re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _ids(pages):
    return [p.relative_to(ROOT).as_posix() for p in pages]


def _fences(page: Path) -> list[tuple[str, str]]:
    return [(info.strip(), body) for info, body in FENCE.findall(page.read_text())]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_docs_exist_and_readme_links_each():
    assert DOCS, "docs/ should hold the long sections moved out of README.md"
    readme = (ROOT / "README.md").read_text()
    for page in DOCS:
        assert f"docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"
    assert len(readme.splitlines()) <= 220, "README.md keeps the first hour; long sections go to docs/"


def test_readme_keeps_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "```bash\nmake quickstart\n```" in readme and "```bash\nmake test\n```" in readme
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^quickstart:", makefile, re.M) and re.search(r"^test:", makefile, re.M)


RUNNABLE = [p for p in DOCS if any(info == "python" for info, _ in _fences(p))]


def test_some_docs_examples_run():
    assert RUNNABLE, "no docs page has a runnable ```python block; the check below would check nothing"


@pytest.mark.parametrize("page", RUNNABLE, ids=_ids(RUNNABLE))
def test_docs_python_examples_run(page, tmp_path, monkeypatch):
    blocks = [body for info, body in _fences(page) if info == "python"]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(page), "exec"), namespace)


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_python_blocks_are_runnable_or_say_why_not(page):
    for info, body in _fences(page):
        if not info.startswith("py"):
            continue
        assert info in ("python", "python no-run"), f"{page.name}: fence ```{info}: use ```python or ```python no-run"
        if info == "python no-run":
            first = body.lstrip().splitlines()[0]
            assert first.startswith("# no-run:"), f"{page.name}: a no-run block says why on its first line: {first!r}"
        compile(body, f"{page.name} ```{info}", "exec")


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_named_files_exist(page):
    missing = sorted({p for p in PATH.findall(page.read_text()) if not (ROOT / p).exists()})
    assert not missing, f"{page.name} names files that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_omninet_subcommands_exist(page):
    from omninet.cli import SUBCOMMANDS

    text = page.read_text()
    shell = [body for info, body in _fences(page) if info in ("bash", "sh", "shell", "console")]
    prose = FENCE.sub("", text)
    spans = [span for chunk in [prose, *shell] for span in re.findall(r"`([^`\n]+)`", chunk)]
    named = {m for chunk in shell + [s for s in spans if "import" not in s] for m in SUBCOMMAND.findall(chunk)}
    unknown = sorted(named - set(SUBCOMMANDS))
    assert not unknown, f"{page.name} names omninet subcommands that do not exist: {unknown}"


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_relative_links_resolve(page):
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link {target} points at nothing"
        if anchor and dest.suffix == ".md":
            slugs = {_slug(h) for h in re.findall(r"^#+ (.*)$", FENCE.sub("", dest.read_text()), flags=re.M)}
            assert anchor in slugs, f"{page.name}: link {target}: no heading with anchor #{anchor} in {dest.name}"


def test_the_checks_catch_what_they_check():
    assert SUBCOMMAND.findall("omninet serve R --pool cpu\nray job submit -- omninet bogus R\ncreatedb -U omninet optuna") \
        == ["serve", "bogus"]
    assert PATH.findall("run `python benchmarks/nope.py` and sweeps/x.yaml, not <results>/scores/a.py") \
        == ["benchmarks/nope.py", "sweeps/x.yaml"]
    assert _slug("Scheduler and cost model") == "scheduler-and-cost-model"
    assert _slug("Spending the budget where it pays: `scheduler` and `cost_model`") \
        == "spending-the-budget-where-it-pays-scheduler-and-cost_model"
