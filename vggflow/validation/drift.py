"""Drift: how the usable images compare with the previous data version's (the champion's manifest).

Drift only ever warns: a changed distribution is worth a look, not a reason to refuse the data.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from vggflow.validation.manifest import quote_paths


def _shares(values: pd.Series) -> dict[str, float]:
    counts = values.astype(str).value_counts()
    total = float(counts.sum())
    return {str(key): float(n) / total for key, n in counts.items()} if total else {}


def _linf(current: dict[str, float], previous: dict[str, float]) -> float:
    keys = set(current) | set(previous)
    return round(max((abs(current.get(k, 0.0) - previous.get(k, 0.0)) for k in keys), default=0.0), 4)


def compare_to_previous(
    current: pd.DataFrame, previous: pd.DataFrame, threshold: float
) -> tuple[dict[str, Any], list[str]]:
    """TFDV-style drift: class shares, image sizes, mode/format mix and brightness; warnings only.

    Categorical distributions (classes, modes, formats) use the L-infinity distance of their shares;
    median width/height use the relative change; median brightness the change as a share of 255.
    """
    if "status" in previous.columns:
        previous = previous[previous["status"].astype(str) == "ok"]
    if "label" not in previous.columns or previous.empty:
        return {"compared": False}, ["drift not computed: the previous manifest has no usable rows with labels"]
    warnings: list[str] = []
    drift: dict[str, Any] = {
        "compared": True,
        "previous_n_valid": int(len(previous)),
        "current_n_valid": int(len(current)),
    }
    now, before = _shares(current["label"]), _shares(previous["label"])
    classes = {}
    for label in sorted(set(now) | set(before)):
        change = now.get(label, 0.0) - before.get(label, 0.0)
        classes[label] = {
            "previous": round(before.get(label, 0.0), 4),
            "current": round(now.get(label, 0.0), 4),
            "change": round(change, 4),
        }
        if abs(change) > threshold:
            warnings.append(f"drift: class {label} share {before.get(label, 0.0):.1%} -> {now.get(label, 0.0):.1%}")
    drift["class_shares"] = classes
    drift["class_linf"] = _linf(now, before)
    drift["new_classes"] = sorted(set(now) - set(before))
    drift["missing_classes"] = sorted(set(before) - set(now))
    if drift["new_classes"]:
        warnings.append(f"drift: new class(es) since the previous version: {quote_paths(drift['new_classes'])}")
    if drift["missing_classes"]:
        warnings.append(f"drift: class(es) gone since the previous version: {quote_paths(drift['missing_classes'])}")
    stats: dict[str, Any] = {}
    for column in ("width", "height", "mean"):
        was, now_value = _median(previous, column), _median(current, column)
        if was is None or now_value is None:
            continue
        if column == "mean":  # brightness: the change as a share of the 0..255 range
            change = (now_value - was) / 255.0
            stats["median_brightness"] = {
                "previous": round(was, 2),
                "current": round(now_value, 2),
                "change_of_255": round(change, 4),
            }
            if abs(change) > threshold:
                warnings.append(f"drift: median brightness {was:.1f} -> {now_value:.1f} (of 255)")
            continue
        change = (now_value - was) / was if was else 0.0
        stats[f"median_{column}"] = {"previous": was, "current": now_value, "relative_change": round(change, 4)}
        if abs(change) > threshold:
            warnings.append(f"drift: median {column} {was:g} -> {now_value:g} px ({change:+.0%})")
    for column in ("mode", "format"):
        if column in previous.columns and len(current):
            now_mix, before_mix = _shares(current[column]), _shares(previous[column])
            distance = _linf(now_mix, before_mix)
            stats[f"{column}_mix"] = {
                "previous": {k: round(v, 4) for k, v in sorted(before_mix.items())},
                "current": {k: round(v, 4) for k, v in sorted(now_mix.items())},
                "linf": distance,
            }
            if distance > threshold:
                warnings.append(
                    f"drift: image {column} mix changed (L-inf {distance:.2f}): {_mix(before_mix)} -> {_mix(now_mix)}"
                )
    drift["stats"] = stats
    if "sha256" in previous.columns:
        before_hashes, now_hashes = set(previous["sha256"].astype(str)), set(current["sha256"])
        drift["n_added"] = len(now_hashes - before_hashes)
        drift["n_removed"] = len(before_hashes - now_hashes)
    return drift, warnings


def _median(frame: pd.DataFrame, column: str) -> float | None:
    """Median of a numeric column, or None when missing or unreadable (an older manifest)."""
    if column not in frame.columns or frame.empty:
        return None
    value = float(pd.to_numeric(frame[column], errors="coerce").median())
    return None if value != value else value  # NaN


def _mix(shares: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.0%}" for key, value in sorted(shares.items(), key=lambda kv: -kv[1])[:4])
