"""`vggflow ui`: the MLflow UI over the project's tracking store, until Ctrl-C (see vggflow/dashboard.py)."""

from __future__ import annotations

import argparse


def cmd_ui(args: argparse.Namespace) -> int:
    from vggflow.config import load_config
    from vggflow.dashboard import serve, spec_from_config
    from vggflow.processes import free_port

    cfg = load_config(args.config, args.overrides)
    port = args.port or free_port(args.host)
    spec = spec_from_config(cfg, host=args.host, port=port)
    return serve(spec, cfg.work_dir / "mlflow-server.log", cfg.tracking.experiment)
