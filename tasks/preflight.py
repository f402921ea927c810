"""Step 0, preflight: everything a run needs is checked before any expensive work.

A misconfigured run must not fail after an hour: the data folder exists, the tracking store is
reachable and writable, the shared promotion lock's database (``registry.lock_url``) answers,
the Dask scheduler and the shard store answer (``features.executor: dask``), and the backbone
weights are obtainable. Disk space is checked by each
step that writes large files, once it knows how much it needs (``tasks/features.py``).
"""

from __future__ import annotations

from prefect import task

from vggflow.checks import Preflight, check_data_dir
from vggflow.config import Config
from vggflow.executors import check_executor


@task(name="preflight")
def preflight_task(cfg: Config) -> Preflight:
    """Check the data folder, the tracking store and the backbone weights; resolve the latter two."""
    from vggflow.model import resolve_weights
    from vggflow.tracking import connect

    check_data_dir(cfg.data.dir)
    _, experiment_id = connect(cfg.tracking)
    if cfg.registry.lock_url and cfg.registry.promote:
        from vggflow.locks import AdvisoryLock

        AdvisoryLock(cfg.registry.lock_url, "").check()
    check_executor(cfg.features)
    weights = resolve_weights(cfg.backbone, cfg.features.cache_dir, cfg.seed)
    return Preflight(weights=weights, experiment_id=experiment_id, tracking_uri=cfg.tracking.effective_uri)
