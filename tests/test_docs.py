"""The docs name the tests that prove their promises: every named test and test file exists."""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `tests/a/b.py::test_x` names a file and a test; a following `::test_y` names another test of that file.
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)?::(test_\w+)`|`((?:tests|benchmarks)/[\w/]+\.py)`")
# The pages that cite tests as their evidence; each must name at least one.
DOCUMENTS = ["docs/architecture.md", "docs/caching.md", "docs/data.md", "docs/diffusers.md", "docs/parallel.md",
             "docs/reliability.md", "docs/scale.md"]


def named_in(text):
    """The ``(path, test)`` pairs ``text`` names (``path`` None where no file came before the test) and the
    test files it names alone."""
    current, tests, files = None, [], []
    for match in REFERENCE.finditer(text):
        path, test, bare_path = match.groups()
        current = path or bare_path or current
        if test:
            tests.append((current, test))
        else:
            files.append(bare_path)
    return tests, files


def functions_in(path):
    with open(path) as file:
        tree = ast.parse(file.read())
    return {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def missing_in(text, root):
    """What ``text`` names that ``root`` lacks: test files, then tests (``None::test_x`` for a test named
    before any file)."""
    tests, files = named_in(text)
    missing = [path for path in files if not os.path.isfile(os.path.join(root, path))]
    missing += [f"{path}::{test}" for path, test in tests if path is None
                or not os.path.isfile(os.path.join(root, path)) or test not in functions_in(os.path.join(root, path))]
    return missing


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_test_a_document_names_exists(document):
    with open(os.path.join(ROOT, document)) as file:
        text = file.read()
    assert any(named_in(text)), f"{document} names no test: its claims should point to the tests that check them"
    missing = missing_in(text, ROOT)
    assert not missing, f"{document} names tests or test files that do not exist: {missing}"


def test_the_check_finds_each_kind_of_missing_name(tmp_path):
    os.makedirs(tmp_path / "tests" / "a")
    (tmp_path / "tests" / "a" / "test_b.py").write_text("def test_here():\n    pass\n")
    page = ("`::test_orphan` comes first; `tests/a/test_b.py::test_here` and `::test_gone`; "
            "`tests/a/test_none.py::test_x`; `tests/a/test_b.py` is fine, `tests/a/test_c.py` and "
            "`benchmarks/a/test_d.py` are not.")
    assert sorted(missing_in(page, tmp_path)) == sorted([
        "None::test_orphan", "tests/a/test_b.py::test_gone", "tests/a/test_none.py::test_x", "tests/a/test_c.py",
        "benchmarks/a/test_d.py"])
    assert named_in("no tests here, only `fastdit/io.py`") == ([], [])
