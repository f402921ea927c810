"""`vggflow ui`: the MLflow UI over the project's tracking store, until Ctrl-C (see vggflow/dashboard.py)."""

from __future__ import annotations

import argparse


def cmd_ui(args: argparse.Namespace) -> int:
    from urllib.parse import urlparse

    from vggflow.config import load_config
    from vggflow.dashboard import serve, show_server, spec_from_config
    from vggflow.ports import free_port
    from vggflow.tracking import check_store

    cfg = load_config(args.config, args.overrides)
    if urlparse(cfg.tracking.effective_uri).scheme in ("http", "https"):
        return show_server(check_store(cfg.tracking), cfg.tracking.experiment)  # a shared server: exit 3 if down
    port = args.port or free_port(args.host)
    spec = spec_from_config(cfg, host=args.host, port=port)
    return serve(spec, cfg.work_dir / "mlflow-server.log", cfg.tracking.experiment)
