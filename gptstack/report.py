"""report.json (the stable figures) and report.md (the same, for people, with plots): a loop over the stages,
each of which renders its own section (stages/*.py) from report.json."""
from __future__ import annotations

import json
from pathlib import Path

from .io import atomic_write_json, atomic_write_text
from .stages import STAGES
from .stages.base import collect, finished


def write_report(run: Path) -> dict:
    run = Path(run)
    report = collect(run)
    atomic_write_json(run / "report.json", report)
    lines = [f"# gptstack run `{run.name}`", ""]
    for stage in STAGES:
        if stage.report is not None and finished(run, stage.name):
            lines += stage.report(run, report)
    lines += ["## report.json", "", "```json", json.dumps(report, indent=1)[:4000], "```", ""]
    atomic_write_text(run / "report.md", "\n".join(lines))
    return report
