"""The package's layers as its imports make them (docs/architecture.md): every import of every module, those inside
functions included, read from the source; no module reaches itself through them; kernels/ imports nothing else of
fastdit; each import points to the same floor or one below; and `fastdit sample`, run in a fresh process, loads
nothing of fastdit.train.

An import of ``fastdit.a.b`` also runs the packages above it (``fastdit/__init__.py``); those implicit edges are
left out, as every layering of a Python package leaves them out: a package's ``__init__`` re-exports, it is not a
floor of its own (``fastdit/__init__.py`` is the top floor: the public names)."""
import ast
import json
import pathlib
import subprocess
import sys

import pytest
from processes import torch_path_environment

import fastdit
import fastdit.kernels

# The floors, lowest first: a module may import its own floor and those below. A module's floor is that of its
# longest listed prefix.
FLOORS = [
    # 0: no fastdit imports but their own package
    ("fastdit.kernels", "fastdit.reference", "fastdit.io", "fastdit._version", "fastdit.models.validation",
     "fastdit.distributed", "fastdit.images", "fastdit.digits", "fastdit.diffusion.gaussian",
     "fastdit.diffusion.reference", "fastdit.parallel.mesh", "fastdit.models.parity", "fastdit.bench.timing", "fastdit.stopping"),
    # 1: what describes a model, and the formats other libraries write, on it
    ("fastdit.models.config", "fastdit.models.flops", "fastdit.integrations.diffusers_convert",
     "fastdit.integrations.hub", "fastdit.integrations.diffusers_folders", "fastdit.models", "fastdit.bench.roofline"),
    # 2: the fast model and its files (fastdit.load's dispatch stands above the format readers)
    ("fastdit.models.checkpoint", "fastdit.models.attention", "fastdit.models.dit", "fastdit.models.vae",
     "fastdit.integrations.diffusers"),
    # 3: sampling, training and evaluation, side by side, each on the model and the shared floor 0
    ("fastdit.diffusion", "fastdit.train", "fastdit.parallel", "fastdit.evaluation"),
    # 4: what drives the library: the public names, benchmarks, tools, the command line
    ("fastdit", "fastdit.bench", "fastdit.tools", "fastdit.cli", "fastdit.ablation", "fastdit.roofline",
     "fastdit.__main__"),
]


def module_files() -> dict[str, pathlib.Path]:
    """Every module of the package by name (kernels/ is installed and linked as fastdit.kernels)."""
    roots = {"fastdit": pathlib.Path(fastdit.__file__).parent,
             "fastdit.kernels": pathlib.Path(fastdit.kernels.__file__).parent}
    modules = {}
    for package, root in roots.items():
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if package == "fastdit" and parts[0] == "kernels":
                continue
            name = ".".join((package, *parts))
            modules[name.removesuffix(".__init__")] = path
    return modules


def imported(name: str, path: pathlib.Path, modules) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its source (`from fastdit import reference` is the
    submodule; `from fastdit import sample`, a name, is the package's __init__)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:
                    found.add(f"{source}.{alias.name}")
                elif source in modules:
                    found.add(source)
    found.discard(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported(name, path, modules) for name, path in modules.items()}


def find_cycle(graph) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def floor(name: str) -> int:
    matches = [(len(prefix), level) for level, prefixes in enumerate(FLOORS) for prefix in prefixes
               if name == prefix or name.startswith(prefix + ".")]
    assert matches, f"{name} is on no floor of FLOORS: place it"
    return max(matches)[1]


def test_the_walk_sees_imports_inside_functions(graph):
    assert "fastdit.models.vae" in graph["fastdit.cli.sample"]  # imported in prepare(): the VAE is optional
    assert "fastdit.kernels.runtime" in graph["fastdit.tools.aot"]


def test_no_import_cycle(graph):
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_kernels_import_nothing_of_fastdit_but_kernels(graph):
    outside = {(name, target) for name, targets in graph.items() if name.startswith("fastdit.kernels")
               for target in targets if not target.startswith("fastdit.kernels")}
    assert not outside


def test_every_import_points_to_its_floor_or_below(graph):
    upward = sorted(f"{name} (floor {floor(name)}) imports {target} (floor {floor(target)})"
                    for name, targets in graph.items() for target in targets if floor(target) > floor(name))
    assert not upward, "\n".join(upward)


def test_sampling_and_training_stand_apart(graph):
    """diffusion/ and train/ share the floors below them, not each other (the trainer uses the diffusion's losses,
    gaussian.py, which is floor 0)."""
    crossing = sorted(f"{name} imports {target}" for name, targets in graph.items() for target in targets
                      if (name.startswith("fastdit.diffusion") and target.startswith("fastdit.train"))
                      or (name.startswith("fastdit.train") and target.startswith("fastdit.diffusion")
                          and target != "fastdit.diffusion.gaussian"))
    assert not crossing


def test_fastdit_sample_loads_nothing_of_train(tmp_path):
    """A whole `fastdit sample` (the bundled model, one image, one step) in a fresh process: the modules it loaded."""
    argv = ["sample", "--num-samples", "1", "--steps", "1", "--no-progress", "--out", str(tmp_path / "out")]
    script = (f"import json, sys\nfrom fastdit.cli import main\ncode = main({argv!r})\n"
              "print(json.dumps([code, sorted(sys.modules)]))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env=torch_path_environment())
    assert result.returncode == 0, result.stderr
    code, loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert code == 0 and (tmp_path / "out" / "samples.npz").is_file()
    assert "fastdit.cli.sample" in loaded and "fastdit.diffusion.sampling" in loaded  # it ran the sampler
    assert [name for name in loaded if name == "fastdit.train" or name.startswith("fastdit.train.")] == []
