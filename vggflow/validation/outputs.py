"""What validation writes and prints: ``report.json``, ``manifest.csv``, ``report.html`` and the summary."""

from __future__ import annotations

import html
import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vggflow.errors import VggflowError
from vggflow.files import atomic_path, atomic_write_bytes
from vggflow.validation.manifest import ISSUE_KINDS, SPLITS, ValidationResult


def report_json(report: dict[str, Any]) -> str:
    """The report as JSON text (UTF-8; odd bytes in file names survive as ``\\udcXX`` escapes)."""
    return json.dumps(report, indent=2, ensure_ascii=False) + "\n"


def write_validation_outputs(result: ValidationResult, out_dir: Path) -> dict[str, Path]:
    """Write ``report.json``, ``manifest.csv`` and ``report.html`` to ``out_dir``, each atomically.

    Returns:
        ``{"report": ..., "manifest": ..., "html": ...}`` paths.

    Raises:
        VggflowError: ``out_dir`` cannot be created or written.
    """
    out_dir = Path(out_dir)
    # backslashreplace turns an undecodable file-name byte into a valid JSON \udcXX escape.
    report_bytes = report_json(result.report).encode("utf-8", errors="backslashreplace")
    html_bytes = render_html(result).encode("utf-8", errors="backslashreplace")
    try:
        atomic_write_bytes(out_dir / "report.json", report_bytes)
        with atomic_path(out_dir / "manifest.csv") as tmp:
            # surrogateescape writes undecodable file-name bytes back as they are on disk.
            result.manifest.to_csv(tmp, index=False, encoding="utf-8", errors="surrogateescape")
        atomic_write_bytes(out_dir / "report.html", html_bytes)
    except OSError as err:
        raise VggflowError(f"cannot write the validation report to {out_dir}: {err.strerror or err}") from None
    return {"report": out_dir / "report.json", "manifest": out_dir / "manifest.csv", "html": out_dir / "report.html"}


_STATUS_RANK = {"excluded": 0, "duplicate": 1, "-": 2, "ok": 3, "ignored": 4}


def _top_kinds(report: dict[str, Any]) -> list[tuple[str, int, str]]:
    """(kind, count, first path) for each issue kind: what costs images first, then by count."""
    first: dict[str, str] = {}
    for issue in report["issues"]:
        first.setdefault(issue["kind"], issue["path"])
    counts = Counter(i["kind"] for i in report["issues"])

    def rank(kind: str) -> int:
        return _STATUS_RANK.get(ISSUE_KINDS.get(kind, ("-", ""))[0], 2)

    return [(kind, n, first[kind]) for kind, n in sorted(counts.items(), key=lambda kv: (rank(kv[0]), -kv[1], kv[0]))]


def _wrap(items: Sequence[str], width: int = 92, indent: str = "    ") -> list[str]:
    lines, line = [], indent
    for item in items:
        if len(line) + len(item) + 2 > width and line.strip():
            lines.append(line.rstrip().rstrip(","))
            line = indent
        line += item + ", "
    if line.strip():
        lines.append(line.rstrip().rstrip(","))
    return lines


def format_summary(result: ValidationResult, report_path: Path | str | None = None) -> str:
    """The one-screen human summary: verdict, counts, classes, top issue kinds, errors, warnings."""
    report, summary = result.report, result.report["summary"]
    verdict = "usable" if result.ok else "NOT USABLE"
    lines = [f"Data validation of {report.get('data_dir', 'the data folder')}: {verdict}"]
    lines.append(
        f"  {summary['n_files']:,} files: {summary['n_valid']:,} valid, {summary['n_excluded']:,} excluded "
        f"({summary.get('n_duplicate', 0):,} duplicates), {summary.get('n_ignored', 0):,} ignored"
    )
    classes = summary["classes"]
    ratio = summary.get("imbalance_ratio")
    lines.append(f"  {len(classes)} classes" + (f", imbalance ratio {ratio:g}:" if ratio else ":"))
    items = [f"{label} {n:,}" for label, n in classes.items()]
    if len(items) > 10:  # keep it to one screen: the smallest and largest classes matter most
        ordered = sorted(classes.items(), key=lambda kv: (kv[1], kv[0]))
        items = (
            [f"{k} {v:,}" for k, v in ordered[:4]]
            + [f"... {len(items) - 8} more ..."]
            + [f"{k} {v:,}" for k, v in ordered[-4:]]
        )
    lines.extend(_wrap(items)[:2])
    splits = summary.get("splits", {})
    if splits:
        lines.append("  splits: " + ", ".join(f"{name} {n:,}" for name, n in splits.items()))
    kinds = _top_kinds(report)
    if kinds:
        lines.append("  issues (kind: count, e.g. first path):")
        for kind, n, path in kinds[:7]:
            lines.append(f"    {kind:<20} {n:>6,}  e.g. {path}")
        rest = _wrap([f"{kind} {n:,}" for kind, n, _ in kinds[7:]], indent="    also: ") if kinds[7:] else []
        lines.extend(rest[:1] + [line.replace("    also: ", "          ", 1) for line in rest[1:2]])
        if len(rest) > 2:
            lines[-1] += ", ..."
    for label, messages in (("ERROR", result.errors), ("warning", report.get("warnings", []))):
        for message in messages[:3]:
            lines.append(f"  {label}: {message}")
        if len(messages) > 3:
            lines.append(f"  ... {len(messages) - 3} more {label.lower()}s in the report")
    if report_path is not None:
        lines.append(f"  full report: {report_path}")
    return "\n".join(lines)


_HTML_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;vertical-align:top}
td.n{text-align:right}.bad{color:#b00020;font-weight:bold}.ok{color:#1b5e20;font-weight:bold}
code{font-size:12px}
"""


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="n">{value:,}</td>' if isinstance(value, int) else f"<td>{html.escape(str(value))}</td>"
            for value in row
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def render_html(result: ValidationResult, max_issues: int = 2000) -> str:
    """A one-page HTML report: summary, class counts, errors/warnings, drift, issues."""
    report, summary = result.report, result.report["summary"]
    verdict = '<span class="ok">usable</span>' if result.ok else '<span class="bad">NOT USABLE</span>'
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>vggflow data validation</title>",
        f"<style>{_HTML_STYLE}</style></head><body>",
        f"<h1>Data validation of <code>{html.escape(str(report.get('data_dir', '')))}</code>: {verdict}</h1>",
        _table(
            ("files", "valid", "excluded", "duplicates", "ignored", "imbalance ratio"),
            [
                (
                    summary["n_files"],
                    summary["n_valid"],
                    summary["n_excluded"],
                    summary.get("n_duplicate", 0),
                    summary.get("n_ignored", 0),
                    summary.get("imbalance_ratio") or "-",
                )
            ],
        ),
    ]
    if result.errors:
        parts.append(
            "<h2>Errors</h2><ul>" + "".join(f"<li class='bad'>{html.escape(e)}</li>" for e in result.errors) + "</ul>"
        )
    if report.get("warnings"):
        parts.append(
            "<h2>Warnings</h2><ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in report["warnings"]) + "</ul>"
        )
    splits_by_class: dict[str, Counter[str]] = defaultdict(Counter)
    usable = result.usable
    for label, split in zip(usable["label"], usable["split"]):
        splits_by_class[label][split] += 1
    parts.append("<h2>Classes</h2>")
    parts.append(
        _table(
            ("class", "valid", *SPLITS),
            [(label, n, *(splits_by_class[label][s] for s in SPLITS)) for label, n in summary["classes"].items()],
        )
    )
    drift = report.get("drift")
    if drift and drift.get("compared"):
        parts.append("<h2>Drift against the previous data version</h2>")
        parts.append(
            _table(
                ("class", "previous share", "current share", "change"),
                [
                    (label, f"{v['previous']:.1%}", f"{v['current']:.1%}", f"{v['change']:+.1%}")
                    for label, v in drift["class_shares"].items()
                ],
            )
        )
        stats = [(name, json.dumps(value, ensure_ascii=False)) for name, value in drift.get("stats", {}).items()]
        if stats:
            parts.append("<p></p>" + _table(("statistic", "previous → current"), stats))
    issues = report["issues"]
    parts.append(f"<h2>Issues ({len(issues):,})</h2>")
    kinds = _top_kinds(report)
    if kinds:
        parts.append(
            _table(
                ("kind", "count", "status", "meaning"),
                [(k, n, ISSUE_KINDS.get(k, ("?", ""))[0], ISSUE_KINDS.get(k, ("", ""))[1]) for k, n, _ in kinds],
            )
        )
    parts.append(
        "<p></p>"
        + _table(("path", "kind", "message"), [(i["path"], i["kind"], i["message"]) for i in issues[:max_issues]])
    )
    if len(issues) > max_issues:
        parts.append(f"<p>... {len(issues) - max_issues:,} more issues in report.json</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
