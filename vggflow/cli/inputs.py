"""`vggflow validate` and `vggflow config`: check what a training would use, before training."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_validate(args: argparse.Namespace) -> int:
    from vggflow.config import load_config
    from vggflow.validation import format_summary, validate_dataset, write_validation_outputs

    cfg = load_config(args.config, args.overrides)
    result = validate_dataset(Path(args.data_dir), cfg.data, cfg.validation)
    out_dir = Path(args.report).parent if args.report else cfg.work_dir / "validation" / "latest"
    files = write_validation_outputs(result, out_dir)
    if args.report and files["report"] != Path(args.report):
        files["report"].replace(args.report)
        files["report"] = Path(args.report)
    print(format_summary(result))
    print(f"report: {files['report']}  manifest: {files['manifest']}  html: {files['html']}")
    return 0 if result.ok else 2


def cmd_config(args: argparse.Namespace) -> int:
    from vggflow.config import load_config

    print(load_config(args.config, args.overrides).as_yaml(), end="")
    return 0
