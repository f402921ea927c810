"""The training flow: validate → train head → fine-tune stages → choose → evaluate → log → promote.

Wiring only: every step is a task in ``tasks/``; this module decides the order, the cache keys
(so re-runs and restarts reuse finished work) and the MLflow run that frames it all.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from pydantic import BaseModel

from vggflow.config import Config, load_config
from vggflow.hashing import stable_hash
from vggflow.tasks.evaluate import evaluate_task
from vggflow.tasks.features import compute_scoring_prefix_task, extract_features_task, feature_cache_key
from vggflow.tasks.finetune import finetune_stage_task, plan_prefix_caches
from vggflow.tasks.preflight import preflight_task
from vggflow.tasks.promote import Decision, promote_if_better_task
from vggflow.tasks.register import log_model_task, log_results_task, model_card_task, register_task
from vggflow.tasks.select import choose_freeze_configuration
from vggflow.tasks.track import close_stage_run, end_run, end_run_for, open_stage_run, start_training_run_task
from vggflow.tasks.train_head import HEAD_STAGE, train_head_task
from vggflow.tasks.validate import validate_data
from vggflow.tracking import lock_dir
from vggflow.training import is_better


class TrainingSummary(BaseModel):
    """What a training run produced (printed at the end of `vggflow train`)."""

    run_id: str
    experiment_id: str
    tracking_uri: str
    data_version: str
    data_matches_dvc: bool | None
    freeze_configuration: dict
    stages: list[dict]
    skipped_stages: list[str]
    test_metrics: dict[str, float]
    model_name: str
    model_version: str
    model_uri: str
    decision: Decision
    random_init: bool
    weights_note: str
    validation_summary: str
    report_dir: str


@flow(name="vggflow-train", log_prints=True)
def train_flow(
    config_file: str | None = None,
    overrides: list[str] | None = None,
    data_dir: str | None = None,
    promote: bool | None = None,
) -> TrainingSummary:
    """Train, evaluate, log and (maybe) promote a VGG19 classifier on a folder of images."""
    cfg: Config = load_config(config_file, overrides or [])
    if data_dir is not None:
        cfg.data.dir = Path(data_dir)
    if promote is not None:
        cfg.registry.promote = promote
    ready = preflight_task(cfg)
    weights = ready.weights

    validated = validate_data(cfg)
    data = validated.data_version
    run_id = start_training_run_task(
        cfg,
        ready.experiment_id,
        Path(config_file) if config_file else None,
        data,
        weights.identity,
        weights.random_init,
        validated.files,
    )
    stage_run = None  # the nested run being trained, closed as KILLED/FAILED if the flow stops
    try:
        size, seed = cfg.backbone.image_size, cfg.seed
        plan = plan_prefix_caches(cfg.finetune, size, validated.n_valid)
        layers = sorted({layer for layer in plan.values() if layer})
        features = extract_features_task(
            validated.rows_file,
            cfg.data.dir,
            weights,
            size,
            cfg.features.batch_size,
            cfg.features.cache_dir,
            validated.fingerprint,
            layers,
            validated.class_names,
            cache_key=feature_cache_key(validated.fingerprint, weights.identity, size, layers),
        )
        # The head reads only the pooled features: keyed without the stages' prefix layers, so
        # adding stages after iterating on the head alone reuses the head already trained.
        pooled = feature_cache_key(validated.fingerprint, weights.identity, size, ["avg_pool"])
        key = stable_hash(pooled, cfg.head, seed, validated.class_names)
        stage_run = open_stage_run(ready.experiment_id, run_id, HEAD_STAGE, None, cfg.head.learning_rate)
        head = train_head_task(
            features,
            weights,
            size,
            cfg.head,
            seed,
            cfg.work_dir / "checkpoints" / f"{key}.keras",
            cache_key=key,
            stage_run_id=stage_run,
        )
        close_stage_run(stage_run, head)
        stage_run = None
        results, best, best_key, skipped = [head], head, key, []
        metric = cfg.finetune.selection_metric
        shared = cfg.finetune.model_dump(
            exclude={"stages", "selection_metric", "min_improvement", "stop_when_no_improvement"}
        )
        for position, stage in enumerate(cfg.finetune.stages):
            # Each stage starts from the best weights so far; its key chains from that stage's key.
            key = stable_hash(best_key, stage, shared, plan[stage.label])
            stage_run = open_stage_run(
                ready.experiment_id, run_id, stage.label, stage.unfreeze_from, stage.learning_rate
            )
            result = finetune_stage_task(
                best,
                stage,
                cfg.finetune,
                features,
                plan[stage.label],
                cfg.data.dir,
                size,
                seed,
                cfg.work_dir / "checkpoints" / f"{key}.keras",
                cache_key=key,
                stage_run_id=stage_run,
            )
            close_stage_run(stage_run, result)
            stage_run = None
            results.append(result)
            improved = is_better(result.metric(metric), best.metric(metric), metric, cfg.finetune.min_improvement)
            if improved:
                best, best_key = result, key
            elif cfg.finetune.stop_when_no_improvement:
                skipped = [s.label for s in cfg.finetune.stages[position + 1 :]]
                print(
                    f"stage {stage.label} did not improve {metric} on {best.stage}: stopping (skipped: "
                    f"{', '.join(skipped) or 'none'})"
                )
                break
        chosen = choose_freeze_configuration(results, metric)
        report_dir = cfg.work_dir / "runs" / run_id
        scores_dir = cfg.work_dir / "scores" / validated.fingerprint  # test-set scores kept per data version
        # The test images' output of the chosen model's frozen part, cached once per data version.
        prefix = compute_scoring_prefix_task(
            validated.rows_file,
            cfg.data.dir,
            weights,
            size,
            cfg.features.batch_size,
            features,
            chosen.prefix_cache,
            chosen.unfreeze_from,
        )
        evaluation = evaluate_task(
            chosen.checkpoint,
            validated.rows_file,
            cfg.data.dir,
            validated.class_names,
            cfg.evaluate,
            report_dir,
            scores_dir,
            prefix,
        )
        compute = {
            "features": features.seconds,
            **{f"fit_{r.stage}": r.seconds for r in results},
            "test_prefix": prefix.seconds if prefix else 0.0,
            "evaluate": evaluation.seconds,
        }
        log_results_task(run_id, results, chosen, evaluation, metric, skipped, report_dir, compute)
        model_uri = log_model_task(run_id, chosen.checkpoint, validated.class_names, size, report_dir)
        version = register_task(model_uri, cfg.registry, run_id, chosen, evaluation)
        decision = promote_if_better_task(
            cfg.registry,
            version.version,
            evaluation.metrics,
            run_id,
            validated.rows_file,
            cfg.data.dir,
            validated.class_names,
            cfg.evaluate.batch_size,
            lock_dir(cfg.tracking, cfg.work_dir),
            scores_dir,
        )
        model_card_task(
            cfg, run_id, version, data, validated, weights, results, chosen, evaluation, decision, report_dir
        )
    except BaseException as error:
        end_run_for(stage_run, error)
        end_run_for(run_id, error)
        raise
    end_run(run_id, "FINISHED")
    return TrainingSummary(
        run_id=run_id,
        experiment_id=ready.experiment_id,
        tracking_uri=ready.tracking_uri,
        data_version=data.md5,
        data_matches_dvc=data.matches,
        freeze_configuration=chosen.freeze_configuration(),
        stages=[
            {"stage": r.stage, "val_accuracy": r.best_val_accuracy, "val_loss": r.best_val_loss, "epochs": r.epochs_run}
            for r in results
        ],
        skipped_stages=skipped,
        test_metrics={k: evaluation.metrics[k] for k in ("accuracy", "macro_f1", "weighted_f1")},
        model_name=version.name,
        model_version=version.version,
        model_uri=model_uri,
        decision=decision,
        random_init=weights.random_init,
        weights_note=weights.note,
        validation_summary=validated.summary,
        report_dir=str(report_dir),
    )
