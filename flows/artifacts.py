"""What a run shows in the Prefect UI: its stages, its metrics and its diff, as artifacts.

The diff stays readable in a 1,600-pixel window: long text values (the gate's reason) are
left out of its table and the gate's verdict is one line above it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows import dvc_adapter as dvc
from flows.dvc_adapter import DiffRow

#: Longest text value shown in a diff cell; longer ones are left out of the table.
MAX_CELL = 40


def _short(row: DiffRow) -> bool:
    return all(not isinstance(row.get(col), str) or len(row[col]) <= MAX_CELL  # type: ignore
               for col in ("old", "new"))


def gate_line(found: dict[str, Any] | None) -> str:
    """The gate's verdict as one markdown line (empty without a gate)."""
    if not found:
        return ""
    if found.get("passed"):
        return f"**Gate: passed** ({found.get('metric')} {_cell(found.get('value'))})"
    return f"**Gate: failed**: {found.get('reason')}"


def diff_markdown(metrics: list[DiffRow], params: list[DiffRow], rev: str = "HEAD",
                  gate: dict[str, Any] | None = None) -> str:
    """Markdown of the metrics and params that differ between ``rev`` and the workspace."""
    parts = [f"## Changes against `{rev}`", "", gate_line(gate), ""]
    metrics = [row for row in metrics if _short(row)]
    for title, rows, cols in (("Metrics", metrics, ("old", "new", "diff")),
                              ("Params", params, ("old", "new"))):
        parts.append(f"### {title}")
        if not rows:
            parts += ["", "No changes.", ""]
            continue
        parts += ["", "| file | key | " + " | ".join(cols) + " |",
                  "|---|---|" + "---|" * len(cols)]
        for row in rows:
            cells = " | ".join(_cell(row[col]) for col in cols)  # type: ignore[literal-required]
            parts.append(f"| {row['file']} | {row['key']} | {cells} |")
        parts.append("")
    return "\n".join(parts)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "—" if value is None else str(value).replace("|", "\\|")


def record_run(root: Path, summary: list[dict[str, Any]], rev: str = "HEAD",
               gate: dict[str, Any] | None = None) -> None:
    """Stage summary, metrics table and diff vs the last commit, as Prefect artifacts (the
    summary only when no stage ran)."""
    create_table_artifact(table=summary, key="convflow-stages",
                          description="Stages of this run: ran / up to date / failed, seconds")
    if all(row.get("status") == "up to date" for row in summary):
        # nothing ran: the metrics and their diff are those the last run that ran a stage
        # recorded (the latest version of each key); diffing again costs ~1 s of a no-op run
        return
    rows = dvc.metrics_rows(root)
    if rows:
        create_table_artifact(table=list(rows), key="convflow-metrics",
                              description="Current metrics (dvc metrics show)")
    try:
        markdown = diff_markdown(dvc.metrics_diff(root, rev), dvc.params_diff(root, rev), rev,
                                 gate)
    except dvc.DvcError as exc:  # e.g. a repository without commits yet
        markdown = f"No diff against `{rev}`: {exc}"
    create_markdown_artifact(markdown=markdown, key="convflow-diff",
                             description="Metrics and params against the last commit")
