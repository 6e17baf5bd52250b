"""docs/guarantees.md names the tests that hold each guarantee: each of them exists."""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_test_the_guarantees_name_exists():
    page = (ROOT / "docs" / "guarantees.md").read_text()
    named = set(re.findall(r"`(test_\w+\.py)::(test_\w+)`", page))
    assert len(named) >= 30  # the page names its tests
    defined = {
        (path.name, node.name)
        for path in (ROOT / "tests").glob("test_*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    }
    assert sorted(named - defined) == []
