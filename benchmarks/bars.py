"""Acceptance bars judged from kernel benchmark rows: the shared part of
benchmarks.cuda_bars (issues #10, #11) and benchmarks.cpu_bars (issue #13).

A bar is a threshold on one value of each selected row (a speed-up, a
fraction of copy bandwidth); it is met when its worst row reaches the
threshold, and a bar with no rows to judge is not met."""

from __future__ import annotations


def label(row: dict) -> str:
    """A row as one line: case, shape, dtype, format, fusion (if any), phase."""
    fusion = "" if row.get("fusion", "none") == "none" else f" {row['fusion']}"
    return f"{row['case']} {'x'.join(map(str, row['shape']))} {row['dtype']} {row['format']}{fusion} {row['phase']}"


def judge(name: str, threshold: float, selected: list[dict], value) -> dict:
    """{name, threshold, worst (value), worst_row (label), met, n}; met is None
    when no row was selected."""
    if not selected:
        return {"name": name, "threshold": threshold, "worst": None, "worst_row": None, "met": None, "n": 0}
    worst = min(selected, key=value)
    return {"name": name, "threshold": threshold, "worst": value(worst), "worst_row": label(worst),
            "met": value(worst) >= threshold, "n": len(selected)}


def report(title: str, judged: list[dict], errors: list[str] = ()) -> tuple[str, bool]:
    """A short table of judged bars (one line each, with its worst row), and
    whether all are met; configurations that failed to run are missing rows,
    so any error fails the report."""
    lines = [title]
    all_met = True
    for b in judged:
        status = {True: "met", False: "NOT met", None: "NO ROWS"}[b["met"]]
        worst = "n/a" if b["worst"] is None else f"{b['worst']:.2f} ({b['worst_row']})"
        lines.append(f"  {status:8s} {b['name']}: need >= {b['threshold']:.2f}, worst {worst}, {b['n']} rows")
        all_met = all_met and b["met"] is True
    for error in errors:
        lines.append(f"  ERROR    {error}")
        all_met = False
    return "\n".join(lines), all_met
