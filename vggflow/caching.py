"""Cache keys for Prefect task caching.

A cached task's outputs live at a path derived from its key, so the key function can check
them before Prefect returns a cached result: when an output is missing or fails its checksum
the task runs again and rebuilds it (the key is kept only when no result is recorded under it
yet, so a first run is recorded and the next one is a cache hit). Keys are namespaced per task
because Prefect's result store is shared by all tasks.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vggflow.hashing import stable_hash


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

    The result is persisted as JSON (a reference: paths, ids, metrics) under ``<name>-<key>``.

    Args:
        name: the task's name, also the namespace of its keys.
        key: given the task's parameters, the key of what it produces; the task derives its
            output paths from the same function, so the key and the outputs cannot drift apart.
        outputs_valid: given the task's parameters, True when its on-disk outputs are intact.
        options: any other ``prefect.task`` option (``task_run_name``, …).
    """
    from prefect import task

    return task(
        name=name,
        cache_key_fn=key_when_valid(name, key, outputs_valid),
        persist_result=True,
        result_serializer="json",
        **options,
    )
