"""Cache keys for Prefect task caching, and the code version every cache key includes.

A cached task's outputs live at a path derived from its key, so the key function can check
them before Prefect returns a cached result: when an output is missing or fails its checksum
the task runs again and rebuilds it (the key is kept only when no result is recorded under it
yet, so a first run is recorded and the next one is a cache hit). Keys are namespaced per task
because Prefect's result store is shared by all tasks.

A key also covers the code that produces the cached thing (:func:`code_version`): the module's
source and that of every module of its package it imports, directly or through others, at the
top or inside a function. Prefect's ``TASK_SOURCE`` policy hashes only the task function, so an
edit of a helper it calls would keep serving results the old helper made.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import platform
import sys
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from vggflow.hashing import stable_hash

#: Installed packages whose version is part of every code version: they compute the numbers.
NUMERIC_PACKAGES = ("tensorflow", "keras", "numpy", "pillow", "scikit-learn")


def imported_names(module: str, path: Path, type_checking: bool = False) -> set[str]:
    """The absolute names of the modules the source at ``path`` imports, wherever the import is.

    ``from a import b`` counts as ``a`` and ``a.b`` (``b`` may be a submodule); relative imports
    are resolved against ``module``'s package; ``importlib.import_module("…")`` with a literal
    name counts. Imports under ``if TYPE_CHECKING:`` count only with ``type_checking``: they
    never run.
    """
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    pending: list[ast.AST] = [ast.parse(path.read_text(encoding="utf-8"), str(path))]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and not type_checking and _is_type_checking(node.test):
            pending.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
        pending.extend(ast.iter_child_nodes(node))
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return getattr(test, "id", getattr(test, "attr", None)) == "TYPE_CHECKING"


def _module_spec(name: str):
    """The import spec of module ``name`` without importing it or its packages (None: not a module).

    ``a.b.c`` is looked up in package ``a.b``'s folders through the import system's finders (the
    editable install's too); when ``a.b`` is a plain module, ``c`` is a name in it, not a module.
    """
    module = sys.modules.get(name)
    if module is not None:
        return getattr(module, "__spec__", None)
    parent, _, _ = name.rpartition(".")
    locations = None
    if parent:
        parent_spec = _module_spec(parent)
        locations = getattr(parent_spec, "submodule_search_locations", None)
        if locations is None:
            return None
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        spec = find(name, locations) if find else None
        if spec is not None:
            return spec
    return None


def _module_file(name: str) -> Path | None:
    """The source file of module ``name``, or None when it is not a module with Python source."""
    origin = getattr(_module_spec(name), "origin", None)
    return Path(origin) if origin and origin.endswith(".py") else None


@lru_cache(maxsize=1024)
def _source_digest(path: Path, module: str, mtime_ns: int, size: int) -> tuple[str, frozenset[str]]:
    """A file's code (its syntax tree: comments, formatting and docstrings do not count) and imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            body[0] = ast.Pass()  # a docstring explains the code; editing it changes nothing computed
    return stable_hash(ast.dump(tree)), frozenset(imported_names(module, path))


def code_closure(*modules: str) -> dict[str, str]:
    """Module name → digest of its code, for ``modules`` and every module of their packages they import.

    Followed transitively, top-level and function-level imports alike; imports outside a
    module's top-level package (libraries) are not followed.
    """
    seen: dict[str, str] = {}
    pending = list(modules)
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:
            continue
        info = path.stat()
        digest, imports = _source_digest(path, name, info.st_mtime_ns, info.st_size)
        seen[name] = digest
        scope = name.split(".")[0] + "."
        pending += [m for m in imports if m.startswith(scope) and m not in seen]
    return seen


@lru_cache(maxsize=1)
def _package_versions() -> tuple[tuple[str, str], ...]:
    versions = [("python", platform.python_version())]
    for name in NUMERIC_PACKAGES:
        try:
            versions.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            pass
    return tuple(versions)


def code_version(*modules: str) -> str:
    """The version of the code that produces a cached thing: part of every cache key.

    Covers the source of ``modules`` and of every module of their package they use
    (:func:`code_closure`), and the versions of Python and the numeric libraries. Editing any of
    these modules changes it; editing a module they do not import, a comment or a docstring does
    not. Each file is re-read only when its size or modification time changes.
    """
    return stable_hash(sorted(code_closure(*modules).items()), _package_versions(), length=16)


def directory_fingerprint(root: Path) -> str:
    """A cheap fingerprint of a folder tree from names, sizes and modification times.

    Like DVC's own state database, it avoids reading file contents: a changed, added or removed
    file changes it. Symlinks are fingerprinted by their target text, not followed.
    """
    entries = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder) / name
            try:
                info = path.lstat()
            except OSError:
                continue
            target = os.readlink(path) if path.is_symlink() else ""
            entries.append((str(path.relative_to(root)), info.st_size, info.st_mtime_ns, target))
    return stable_hash(entries)


def key_when_valid(
    task_name: str, key: Callable[[dict[str, Any]], str | None], outputs_valid: Callable[[dict[str, Any]], bool]
):
    """A Prefect ``cache_key_fn``: ``<task_name>-<key(parameters)>`` when the outputs check out.

    Args:
        task_name: namespace of the key in the shared result store.
        key: given the task's parameters, the key of what it produces (None: do not cache).
        outputs_valid: given the task's parameters, True when its on-disk outputs exist and are intact.
    """

    def cache_key_fn(context, parameters: dict[str, Any]) -> str | None:
        value = key(parameters)
        if not value:
            return None
        namespaced = f"{task_name}-{value}"
        if outputs_valid(parameters):
            return namespaced
        # The task will run. Prefect records its result only under a key, so keep the key when
        # nothing is recorded under it yet (a first run): the next run is then a cache hit.
        # Withhold it when a record exists, since that record points at the missing outputs.
        store = getattr(context, "result_store", None)
        if store is not None and not store.exists(namespaced):
            return namespaced
        return None

    return cache_key_fn


def cached_task(
    name: str,
    key: Callable[[dict[str, Any]], str | None],
    outputs_valid: Callable[[dict[str, Any]], bool],
    **options,
):
    """A Prefect ``@task`` whose result is reused while its key is the same and its outputs are intact.

    The result is persisted as JSON (a reference: paths, ids, metrics) under ``<name>-<key>``,
    where the key also covers the code of the task's module (:func:`code_version`): after an
    edit of that module or of a vggflow module it uses, the task runs again.

    Args:
        name: the task's name, also the namespace of its keys.
        key: given the task's parameters, the key of what it produces; the task derives its
            output paths from the same function, so the key and the outputs cannot drift apart
            (a key that names output paths includes :func:`code_version` itself).
        outputs_valid: given the task's parameters, True when its on-disk outputs are intact.
        options: any other ``prefect.task`` option (``task_run_name``, …).
    """
    from prefect import task

    def decorate(function: Callable) -> Any:
        module = function.__module__

        def key_with_code(parameters: dict[str, Any]) -> str | None:
            value = key(parameters)
            return f"{value}-{code_version(module)}" if value else None

        return task(
            name=name,
            cache_key_fn=key_when_valid(name, key_with_code, outputs_valid),
            persist_result=True,
            result_serializer="json",
            **options,
        )(function)

    return decorate
