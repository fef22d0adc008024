"""`launch report RUN_DIR`: a run dir read back (run_record), drawn (plots) and summarised (summary)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.reporting.plots import Plot, write_plots
from pipeline.reporting.run_record import RunRecord, load_run
from pipeline.reporting.summary import write_summary

REPORT_DIR = "report"


@dataclass(frozen=True)
class Report:
    output_dir: Path
    markdown: Path
    html: Path
    plots: list[Plot]
    record: RunRecord


def write_report(run_dir: Path, output_dir: Path | None = None) -> Report:
    """Plots + report.md + report.html for one run dir (default output: RUN_DIR/report/)."""
    record = load_run(Path(run_dir))
    output_dir = Path(output_dir) if output_dir else record.run_dir / REPORT_DIR
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"report: cannot create {output_dir} ({err.strerror})") from None
    plots = write_plots(record, output_dir)
    markdown, page = write_summary(record, plots, output_dir)
    return Report(output_dir, markdown, page, plots, record)
