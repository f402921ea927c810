"""`vggflow lineage VERSION`: where a registered model came from and how to reproduce it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from vggflow.errors import VggflowError

if TYPE_CHECKING:
    from vggflow.lineage import Lineage


def cmd_lineage(args: argparse.Namespace) -> int:
    import yaml

    from vggflow.cli.models import registry_client
    from vggflow.files import atomic_write_text
    from vggflow.lineage import lineage

    cfg, client, _ = registry_client(args)
    found = lineage(client, cfg.registry.model_name, args.version)
    if args.save_config:
        if found.config is None:
            raise VggflowError(f"run {found.run['run_id']} has no config/effective_config.yaml artifact to save")
        atomic_write_text(Path(args.save_config), yaml.safe_dump(found.config, sort_keys=False))
        print(f"{args.save_config}: the effective config of {found.model_name} v{found.version}", flush=True)
        return 0
    print(json.dumps(found.model_dump(), indent=1) if args.json else format_lineage(found))
    return 0


def format_lineage(found: Lineage) -> str:
    """The lineage as `vggflow lineage` prints it: one fact per line, the commands, then the config."""
    code, data, run, repro = found.code, found.data, found.run, found.reproduce
    aliases = "  " + " ".join(f"@{a}" for a in found.aliases) if found.aliases else ""
    dirty = {True: "DIRTY (uncommitted changes)", False: "clean", None: "dirty: unknown"}[code["git_dirty"]]
    same_code = "the installed code" if code["code_version"] == code["installed_code_version"] else "NOT installed"
    freeze = found.freeze_configuration
    lines = [
        f"{found.model_name} v{found.version}{aliases}   {found.model_uri}   (logged model {found.logged_model_uri})",
        f"run         {run['run_id']}  {run['status']}  started {run['started']}  by {run['user']}",
        f"            source: {run['source']}   prefect flow run: {run['prefect_flow_run_id']}",
        f"code        git {code['git_commit']} ({dirty})  branch {code['git_branch']}  origin {code['git_repo_url']}",
        f"            vggflow {code['vggflow_version']}, code version {code['code_version']} ({same_code})",
        f"data        {data['version']}  from {data['dvc_file']}  DVC remote {data['dvc_remote']}"
        f"  (data folder matched it: {data['matched_dvc_file']})",
        f"backbone    {found.backbone['identity']}" + ("  (random init)" if found.backbone["random_init"] else ""),
        f"freeze      {freeze.get('stage')}: from {freeze.get('first_trainable_layer')}, "
        f"{freeze.get('trainable_layers')} trainable layers, {freeze.get('trainable_params')} params, "
        f"lr {freeze.get('learning_rate')}",
        "test        "
        + "   ".join(f"{k} {found.test_metrics[k]:.4f}" for k in ("accuracy", "macro_f1") if k in found.test_metrics),
        f"promotion   {found.promotion['status']}: {found.promotion['reason']}",
        "",
        "reproduce   # where this tracking store is reachable, save the run's effective config:",
        f"            {repro.save_config}",
        "            # then, in a clone of the project, with that file copied into it:",
    ]
    if repro.clone:
        lines.append(f"            {repro.clone}")
    lines += [f"            {step}" for step in repro.steps]
    lines += [f"note        {note}" for note in found.notes]
    if found.config is not None:
        import yaml

        lines += ["", f"config      (effective; given as {found.config_file or 'built-in defaults'})"]
        lines += [f"  {line}" for line in yaml.safe_dump(found.config, sort_keys=False).splitlines()]
    return "\n".join(lines)
