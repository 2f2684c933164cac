"""Every benchmark and load-test script imports: they run as `python -m ...` by hand, not in the
suite, so a helper moved between modules would otherwise break one unnoticed."""

import importlib
import pkgutil

import pytest

import benchmarks
import loadtests

MODULES = sorted(f"{package.__name__}.{info.name}" for package in (benchmarks, loadtests)
                 for info in pkgutil.iter_modules(package.__path__))


@pytest.mark.parametrize("module", MODULES)
def test_script_imports(module: str) -> None:
    assert importlib.import_module(module).__name__ == module
