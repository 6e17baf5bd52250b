"""Every Python snippet of the README and of docs/ runs as shown, so that none can rot.

The ```python blocks of one file run in order in one namespace (a page's later snippets build on
its earlier ones), in a temporary working directory.  A page needing an optional package that is
absent is skipped, naming the package.
"""

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from installs import INSTALLS, not_installed

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SNIPPET = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
IMPORT = re.compile(r"^\s*(?:import|from)\s+([A-Za-z_]\w*)", re.M)
# pages that train, compile or start a process group: seconds each
SLOW = {"README.md", "integrations.md"}


def snippets(page: Path) -> list[str]:
    return SNIPPET.findall(page.read_text())


def test_every_page_has_its_snippets_found():
    """The extraction itself: a page showing Python code yields it (a fence the pattern missed would pass silently)."""
    for page in PAGES:
        shown = page.read_text().count("```python")
        assert len(snippets(page)) == shown, page.name
    assert sum(len(snippets(page)) for page in PAGES) >= 10


@pytest.mark.parametrize(
    "page",
    [pytest.param(p, id=p.name, marks=[pytest.mark.slow] if p.name in SLOW else []) for p in PAGES if snippets(p)],
)
def test_the_snippets_of_a_page_run(page, tmp_path, monkeypatch):
    code = snippets(page)
    missing = sorted({m for block in code for m in IMPORT.findall(block) if importlib.util.find_spec(m) is None})
    if missing:
        pytest.skip(f"{page.name} needs {'; '.join(map(not_installed, missing))}")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs_{page.stem}"}
    for number, block in enumerate(code, 1):
        exec(compile(block, f"{page.name}, snippet {number}", "exec"), namespace)


def _pip_installs(text: str) -> list[tuple[frozenset, frozenset]]:
    """Each ``pip install`` command in ``text`` as (its options, what it installs), quotes dropped."""
    commands = []
    for command in re.findall(r"pip install ([^&\n]*)", text.replace('"', "").replace("'", "")):
        words = command.split()
        commands.append(
            (frozenset(w for w in words if w.startswith("-") and w != "-e"), frozenset(w for w in words if not w.startswith("-")))
        )
    return commands


def test_the_install_commands_the_skips_name_are_the_ones_ci_runs():
    """A skip message names a command that really installs the package: each of its pip commands
    is one .ci/run runs (the same options, its packages among that command's)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def extra(name: str) -> set[str]:  # the distributions an extra brings, its nested extras included
        found = set()
        for requirement in extras[name]:
            nested = re.fullmatch(r"nwave-param\[(.*)\]", requirement)
            found |= set().union(*map(extra, nested[1].split(","))) if nested else {re.split(r"[<>=\[ ]", requirement)[0]}
        return found

    ci = _pip_installs((ROOT / ".ci" / "run").read_text())
    distributions = {"sklearn": "scikit-learn"}
    for package, command in INSTALLS.items():
        named = set()
        for options, packages in _pip_installs(command):
            assert any(options == o and packages <= p for o, p in ci), (package, command)
            named |= {d for p in packages for d in (extra(p[2:-1]) if p.startswith(".[") else {p})}
        assert distributions.get(package, package) in named, (package, command)  # the command installs it
    assert _pip_installs("pip install --no-deps norse nir") == [(frozenset({"--no-deps"}), frozenset({"norse", "nir"}))]


def test_what_the_documented_demo_commands_write_is_ignored_by_git():
    """``nwave-param demo --plot demo.png``, run in a checkout as the README says, leaves nothing for
    ``git status`` to show (docs/demo.png, the README's picture, stays tracked)."""
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    commands = [line for page in PAGES for line in page.read_text().splitlines() if "nwave-param demo" in line]
    written = {path for line in commands for path in re.findall(r"--(?:plot|json)[ =](?!-)(\S+)", line)}
    assert "demo.png" in written
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *written, "demo.json"], cwd=ROOT, capture_output=True, text=True)
    assert set(ignored.stdout.split()) == written | {"demo.json"}, ignored
    assert subprocess.run(["git", "check-ignore", "-q", "--no-index", "docs/demo.png"], cwd=ROOT).returncode == 1
