"""Imports go one way: command line (vggflow/cli/) → flows → tasks → core (the rest of vggflow/).

Every module's imports are read with ``ast``, including imports inside functions and under
``TYPE_CHECKING`` (a lazy import is still a dependency), and ``importlib.import_module("…")``
calls with a literal name.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT
from vggflow.caching import imported_names

#: Source folder → installed package (setuptools' package-dir mapping in pyproject.toml).
PACKAGES = {"vggflow": "vggflow", "flows": "vggflow.flows", "tasks": "vggflow.tasks"}
CLI, FLOWS, TASKS = "vggflow.cli", "vggflow.flows", "vggflow.tasks"


def module_files() -> dict[str, Path]:
    """Every module of the three packages by its installed name (``vggflow.tasks.promote``)."""
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted((PROJECT_ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(PROJECT_ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


MODULES = module_files()


def imported_modules(name: str, path: Path) -> set[str]:
    """The modules ``name`` imports, ``TYPE_CHECKING`` ones included (the reader cache keys use)."""
    return imported_names(name, path, type_checking=True)


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def task_module(module: str) -> str | None:
    """The task module ``module`` is or lies in (``vggflow.tasks.x.y`` → ``vggflow.tasks.x``), else None."""
    parts = module.split(".")
    return ".".join(parts[:3]) if within(module, TASKS) and len(parts) >= 3 else None


def violations(name: str, imports: set[str]) -> list[str]:
    """The imports of module ``name`` that go against the direction of the layers."""
    if within(name, CLI):
        return []
    if within(name, FLOWS):
        return sorted(m for m in imports if within(m, CLI))
    if within(name, TASKS):
        own = task_module(name)
        return sorted(
            m
            for m in imports
            if within(m, CLI) or within(m, FLOWS) or (task_module(m) not in (None, own) and m in MODULES)
        )
    return sorted(m for m in imports if within(m, CLI) or within(m, FLOWS) or within(m, TASKS))


def test_every_package_is_found():
    assert {CLI, f"{CLI}.schedule", "vggflow.processes", "vggflow.registry"} <= set(MODULES)
    assert any(within(m, FLOWS) and m != FLOWS for m in MODULES) and any(task_module(m) for m in MODULES)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_go_one_way(name: str):
    """Core imports no task, flow or CLI; a task no other task, flow or CLI; a flow not the CLI."""
    assert violations(name, imported_modules(name, MODULES[name])) == []


def test_the_checker_sees_lazy_relative_and_dynamic_imports(tmp_path: Path):
    source = tmp_path / "mod.py"
    source.write_text(
        "import importlib\n"
        "def f():\n"
        "    from vggflow.tasks import promote\n"
        "    from . import cli\n"
        "    importlib.import_module('vggflow.flows.train')\n"
    )
    imports = imported_modules("vggflow.mod", source)
    assert {"vggflow.tasks.promote", "vggflow.cli", "vggflow.flows.train"} <= imports
    assert violations("vggflow.mod", imports) == [
        "vggflow.cli",
        "vggflow.flows.train",
        "vggflow.tasks",
        "vggflow.tasks.promote",
    ]
    assert violations("vggflow.tasks.evaluate", {"vggflow.tasks.promote", "vggflow.config"}) == [
        "vggflow.tasks.promote"
    ]
    assert violations("vggflow.tasks.evaluate", {"vggflow.tasks.evaluate", "vggflow.tasks"}) == []
    assert violations("vggflow.flows.train", {"vggflow.tasks.evaluate", "vggflow.cli.summary"}) == [
        "vggflow.cli.summary"
    ]
