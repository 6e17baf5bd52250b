"""Every Python snippet of the README and of docs/ runs as shown, so that none can rot.

The ```python blocks of one file run in order in one namespace (a page's later snippets build on
its earlier ones), in a temporary working directory.  A page needing an optional package that is
absent is skipped, naming the package.
"""

import importlib.util
import re
from pathlib import Path

import pytest

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
        pytest.skip(f"{page.name} needs {', '.join(missing)}, not installed (pip install -e '.[test]'; .ci/run installs it)")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs_{page.stem}"}
    for number, block in enumerate(code, 1):
        exec(compile(block, f"{page.name}, snippet {number}", "exec"), namespace)
