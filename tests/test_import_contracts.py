"""The import contracts in pyproject.toml (docs/architecture.md, "What may import what") hold for
the tree, and each one breaks when an import of the kind it forbids is added to a copy of it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("goat_runtime", "server", "tests", "benchmarks", "loadtests")
LAYERS = "Layers point down: server, applications, engine, adapters, model, ops"
LIBRARY = "The library does not import the server"
TOOLS = "Production code does not import tests, benchmarks or load tests"


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` (the command `make lint` runs) on the tree at `root`, uncached."""
    command = "from importlinter.cli import lint_imports_command; lint_imports_command()"
    return subprocess.run(
        [sys.executable, "-c", command, "--no-cache", "--no-logo"], cwd=root,
        env=os.environ | {"PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=300)


def test_the_tree_keeps_every_contract():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in (LAYERS, LIBRARY, TOOLS):
        assert f"{name} KEPT" in result.stdout, result.stdout


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory) -> Path:
    """The packages' sources and pyproject.toml, without data or build outputs."""
    root = tmp_path_factory.mktemp("tree")
    for package in PACKAGES:
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns(
            "__pycache__", "fixtures", "*.so", "*.md", "*.cpp", "*.h"))
    shutil.copy(REPO / "pyproject.toml", root)
    return root


@pytest.mark.parametrize(("module", "added", "broken", "message"), [
    ("goat_runtime/model/llama.py", "import goat_runtime.engine.engine", LAYERS,
     "goat_runtime.model is not allowed to import goat_runtime.engine"),
    ("goat_runtime/ops/reference.py", "from goat_runtime.model import layers", LAYERS,
     "goat_runtime.ops is not allowed to import goat_runtime.model"),
    ("goat_runtime/adapters/format.py", "import goat_runtime.engine.sampling", LAYERS,
     "goat_runtime.adapters is not allowed to import goat_runtime.engine"),
    ("goat_runtime/engine/config.py", "import server.errors", LAYERS,
     "goat_runtime.engine is not allowed to import server"),
    ("goat_runtime/default_model.py", "import server.cli", LIBRARY, "server.cli"),
    ("server/app.py", "import tests.devices", TOOLS, "tests.devices"),
    ("goat_runtime/engine/engine.py", "import benchmarks.floors", TOOLS, "benchmarks.floors"),
    ("server/cli.py", "from loadtests import common", TOOLS, "loadtests.common"),
])
@pytest.mark.slow
def test_an_added_import_breaks_its_contract(tree_copy, module, added, broken, message):
    path = tree_copy / module
    original = path.read_text()
    path.write_text(f"{original}\n{added}\n")
    try:
        result = lint_imports(tree_copy)
    finally:
        path.write_text(original)
    assert result.returncode != 0, result.stdout
    assert f"{broken} BROKEN" in result.stdout, result.stdout
    assert message in result.stdout, result.stdout
