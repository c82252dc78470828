"""The docs name the tests that prove their promises: every named test exists."""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `tests/a/b.py::test_x` names a file and a test; a following `::test_y` names another test of that file.
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)?::(test_\w+)`|`(tests/[\w/]+\.py)`")


def named_tests(document):
    with open(os.path.join(ROOT, document)) as file:
        text = file.read()
    current, found = None, []
    for match in REFERENCE.finditer(text):
        path, test, bare_path = match.groups()
        current = path or bare_path or current
        if test:
            found.append((current, test))
    return found


def functions_in(path):
    with open(os.path.join(ROOT, path)) as file:
        tree = ast.parse(file.read())
    return {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


@pytest.mark.parametrize("document", ["docs/reliability.md"])
def test_every_test_a_document_names_exists(document):
    named = named_tests(document)
    assert len(named) > 20
    missing = [f"{path}::{test}" for path, test in named if path is None or test not in functions_in(path)]
    assert not missing, f"{document} names tests that do not exist: {missing}"
