"""The model card: Markdown rendered from a Jinja2 template, shipped with the package.

The card is the run's ``model_card.md`` artifact and the registered model version's description.
:class:`ModelCardInfo` holds what it says; :func:`render_model_card` turns it into Markdown with
the template ``templates/model_card.md.j2`` beside this module.

Using your own template: copy ``vggflow/reports/templates/model_card.md.j2``, edit it and pass its
path, ``render_model_card(info, template="my_card.md.j2")``. With an editable install (``make
install``), editing the shipped file changes the card of every run. The template sees:

- ``info``: the :class:`ModelCardInfo` (``info.stages`` are the rows of the stage-comparison table:
  the freeze configuration keys plus ``best_val_accuracy``, ``best_val_loss``, ``best_epoch``,
  ``epochs_run``, ``seconds``, ``images_per_second``, ``prefix_cache``, ``chosen``);
- ``class_names``, ``n_classes``; ``train_images`` (None when the counts have no splits),
  ``total_images``, ``test_images`` (None without per-class support);
- ``counts``: ``columns``, ``rows`` (``(class, [count per column])``) and ``totals``, or None;
- ``freeze_rows``, ``promotion_rows``: ``(label, text)`` pairs; ``per_class_columns``,
  ``per_class_rows``: the per-class table as text;

and the filters ``md`` (escape text for inline Markdown, table cells included), ``fmt`` (a value
as text: ``1,234``, ``0.8333``, ``n/a``, ``yes``) and ``fence`` (a backtick fence longer than any
backtick run in the text). Undefined names are errors, so a typo fails the render instead of
leaving a gap in the card.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from vggflow.reports.evaluation_figures import PER_CLASS_COLUMNS

__all__ = ["TEMPLATE", "ModelCardInfo", "escape_markdown", "format_value", "render_model_card"]

#: The template the card is rendered from unless another one is given.
TEMPLATE = Path(__file__).resolve().parent / "templates" / "model_card.md.j2"

_SPLIT_ORDER = ("train", "val", "validation", "test")
_FREEZE_LABELS = {
    "stage": "stage",
    "first_trainable_layer": "first trainable layer",
    "trainable_layers": "trainable layers",
    "trainable_params": "trainable parameters",
    "learning_rate": "learning rate",
}
#: Promotion rows: label, then the keys that may hold its value (first present wins).
_PROMOTION_FIELDS = (
    ("decision", ("decision",)),
    ("reason", ("reason",)),
    ("metric", ("metric", "primary_metric")),
    ("candidate (this model)", ("candidate_metric", "candidate")),
    ("champion", ("champion_metric", "champion")),
    ("delta (candidate − champion)", ("delta",)),
)
# Characters that would end a table cell or start emphasis, code, links or HTML in a name. An
# underscore inside a word (block5_conv1) is literal in GitHub/CommonMark, so only the others are.
_MD_SPECIAL = re.compile(r"([\\|*`\[\]<>#])|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


class ModelCardInfo(BaseModel):
    """Everything the model card says about one trained model.

    Attributes:
        model_name: registered model name.
        version: registered version, or None when not registered.
        run_id: MLflow run id of the training run.
        created: creation time, as text.
        data_version: DVC md5 (or other id) of the training data.
        data_matches_dvc: whether the data on disk matched the DVC file; None = not checked.
        class_counts: ``{label: count}`` or, better, ``{label: {split: count}}``.
        image_size: square input side in pixels.
        backbone_weights: ``imagenet``, a weights path or ``none``.
        random_init: True when the backbone had no pretrained weights.
        freeze_configuration: the kept stage's ``StageResult.freeze_configuration()``.
        stages: one row per stage, as the stage-comparison table has them:
            ``StageResult.summary()`` plus ``chosen`` (True for the kept stage).
        test_metrics: e.g. ``{"accuracy": 0.91, "macro_f1": 0.90}``.
        per_class: rows of the per-class table (``class, precision, recall, f1, support``); a
            DataFrame is taken as its rows.
        promotion: keys ``decision, reason, metric, candidate_metric, champion_metric, delta``
            (extra keys are shown as-is), or None when no gate ran.
        config_yaml: the effective configuration.
        git_commit: commit of the code that trained the model.
        git_dirty: whether the working tree had uncommitted changes.
    """

    model_config = ConfigDict(extra="forbid")

    model_name: str
    version: str | None = None
    run_id: str
    created: str
    data_version: str
    data_matches_dvc: bool | None = None
    class_counts: dict[str, int] | dict[str, dict[str, int]] = {}
    image_size: int
    backbone_weights: str
    random_init: bool
    freeze_configuration: dict[str, Any] = {}
    stages: list[dict[str, Any]] = []
    test_metrics: dict[str, float] = {}
    per_class: list[dict[str, Any]] = []
    promotion: dict[str, Any] | None = None
    config_yaml: str = ""
    git_commit: str = "unknown"
    git_dirty: bool = False

    @field_validator("per_class", mode="before")
    @classmethod
    def _rows_of_a_table(cls, value: Any) -> Any:
        return value.to_dict("records") if hasattr(value, "to_dict") and not isinstance(value, Mapping) else value


def render_model_card(info: ModelCardInfo, template: str | Path | None = None) -> str:
    """Render the model card as Markdown (also the registered model version's description).

    Args:
        info: what to say.
        template: a Jinja2 template file to render instead of :data:`TEMPLATE` (see the module
            docstring for what it sees).

    Returns:
        Markdown; the shipped template has the sections Summary, Intended use, Limitations,
        Training data, Training procedure, Evaluation, Promotion decision and Reproduce.
    """
    import jinja2

    path = Path(template) if template is not None else TEMPLATE
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(path.parent),
        autoescape=False,  # Markdown, not HTML: text is escaped with the `md` filter where it lands
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters.update(md=escape_markdown, fmt=format_value, fence=_code_fence)
    return environment.get_template(path.name).render(_context(info))


def escape_markdown(text: Any) -> str:
    """Escape a value for inline Markdown, including inside a table cell (one line, ``|`` escaped)."""
    flat = str(text).replace("\r", " ").replace("\n", " ")
    return _MD_SPECIAL.sub(lambda m: "\\" + m.group(0), flat)


def format_value(value: Any, digits: int = 4) -> str:
    """A value as card text: ``n/a`` for None/NaN, yes/no, ``1,234``, 4 decimals, short lists."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    if isinstance(value, numbers.Real):
        value = float(value)
        if not math.isfinite(value):
            return "n/a"
        if value != 0 and (abs(value) < 10 ** -(digits - 1) or abs(value) >= 1e6):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}f}"
    if isinstance(value, (list, tuple)):
        shown = ", ".join(str(v) for v in value[:6])
        return f"{len(value)} ({shown}{', …' if len(value) > 6 else ''})"
    return str(value)


def _context(info: ModelCardInfo) -> dict[str, Any]:
    """The template's variables: ``info`` and the numbers and tables derived from it."""
    columns = [c for c in PER_CLASS_COLUMNS if any(c in row for row in info.per_class)]
    class_names = (
        [str(row.get("class")) for row in info.per_class] if "class" in columns else [str(c) for c in info.class_counts]
    )
    counts, train_images, total_images = _counts(info.class_counts)
    supports = [row["support"] for row in info.per_class if _present(row.get("support"))]
    return {
        "info": info,
        "class_names": class_names,
        "n_classes": len(class_names),
        "counts": counts,
        "train_images": train_images,
        "total_images": total_images,
        "test_images": int(sum(supports)) if "support" in columns else None,
        "freeze_rows": _freeze_rows(info.freeze_configuration),
        "promotion_rows": _promotion_rows(info.promotion or {}),
        "per_class_columns": columns,
        "per_class_rows": [[_per_class_cell(c, row.get(c)) for c in columns] for row in info.per_class],
    }


def _counts(class_counts: Mapping[str, Any]) -> tuple[dict[str, Any] | None, int | None, int]:
    """The class-count table, the number of training images (None if unknown) and the total."""
    if not class_counts:
        return None, None, 0
    if not all(isinstance(v, Mapping) for v in class_counts.values()):
        total = sum(int(v) for v in class_counts.values())
        rows = [(label, [int(count)]) for label, count in class_counts.items()]
        return {"columns": ["images"], "rows": rows, "totals": [total]}, None, total
    seen = {split for counts in class_counts.values() for split in counts}
    splits = [s for s in _SPLIT_ORDER if s in seen] + sorted(seen.difference(_SPLIT_ORDER))
    rows = []
    for label, counts in class_counts.items():
        rows.append((label, [int(counts.get(split, 0)) for split in splits] + [sum(int(v) for v in counts.values())]))
    split_totals = [sum(int(c.get(split, 0)) for c in class_counts.values()) for split in splits]
    total = sum(split_totals)
    train = split_totals[splits.index("train")] if "train" in splits else None
    return {"columns": [*splits, "total"], "rows": rows, "totals": [*split_totals, total]}, train, total


def _freeze_rows(freeze: Mapping[str, Any]) -> list[tuple[str, str]]:
    keys = [k for k in _FREEZE_LABELS if k in freeze] + [k for k in freeze if k not in _FREEZE_LABELS]
    rows = []
    for key in keys:
        value = freeze[key]
        text = f"{value:g}" if key == "learning_rate" and isinstance(value, (int, float)) else format_value(value)
        rows.append((_FREEZE_LABELS.get(key, key), text))
    return rows


def _promotion_rows(promotion: Mapping[str, Any]) -> list[tuple[str, str]]:
    rows, used = [], set()
    for label, keys in _PROMOTION_FIELDS:
        present = [k for k in keys if k in promotion]
        used.update(present)
        if not present:
            continue
        value = promotion[present[0]]
        if label == "champion" and value is None:
            text = "none (no champion yet)"
        elif label.startswith("delta") and isinstance(value, (int, float)) and math.isfinite(value):
            text = f"{value:+.4f}"
        else:
            text = format_value(value)
        rows.append((label, text))
    return rows + [(k, format_value(v)) for k, v in promotion.items() if k not in used]


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _per_class_cell(column: str, value: Any) -> str:
    if column == "class":
        return str(value)
    if column == "support" and _present(value):
        return format_value(int(value))
    return format_value(value)


def _code_fence(text: str) -> str:
    """A backtick fence longer than any backtick run inside ``text``."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)
