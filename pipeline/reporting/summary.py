"""The one-page summary of a run, as report.md (plots linked) and report.html (plots embedded, so the
page travels as one file). Both render the same list of blocks, so they never disagree."""
from __future__ import annotations

import base64
import html
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.reporting.plots import Plot, is_count
from pipeline.reporting.run_record import RunRecord, config_highlights, is_number, record_warnings, skipped_totals

# Final-metrics rows shown first, in this order; every other key follows in file order.
FINAL_KEYS_FIRST = ("step", "epoch", "train/loss", "train/lr", "train/samples_per_second",
                    "train/data_wait_fraction", "train/data_wait_seconds")
EVAL_META_COLUMNS = ("dataset", "model", "checkpoint_step")


@dataclass(frozen=True)
class Heading:
    text: str


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: list[tuple[str, ...]]


@dataclass(frozen=True)
class Plots:
    plots: list[Plot]


Block = Heading | Paragraph | Table | Plots


def format_value(value) -> str:
    """Numbers at 4 significant digits (small ones such as a final lr in scientific notation)."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.3g}"
        return f"{value:.4g}" if abs(value) < 1e6 else f"{value:.4e}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) or "-"
    return str(value)


def _final_table(final: dict) -> Table:
    keys = [k for k in FINAL_KEYS_FIRST if k in final] + [k for k in final if k not in FINAL_KEYS_FIRST]
    return Table(("metric", "value"), [(key, format_value(final[key])) for key in keys])


def _counts_table(rows: list[dict]) -> Table | None:
    """The counts metrics.jsonl logs beside its metrics (samples scored and expected, classes ...), by step;
    consecutive evaluations with the same counts share one row, so a change (a shortfall) stands out."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k, v in row.items() if is_count(k) and is_number(v) and k not in keys]
    spans: list[list] = []  # [first step, last step, counts]
    for row in rows:
        counts = tuple(row[k] if is_number(row.get(k)) else None for k in keys)
        if all(c is None for c in counts):
            continue
        if spans and spans[-1][2] == counts:
            spans[-1][1] = row["step"]
        else:
            spans.append([row["step"], row["step"], counts])
    if not spans:
        return None
    return Table(("steps", *keys), [(str(first) if first == last else f"{first}-{last}",
                                     *("-" if c is None else format_value(c) for c in counts))
                                    for first, last, counts in spans])


def _eval_tables(results: list[dict]) -> list[Block]:
    blocks: list[Block] = []
    for task in sorted({str(r["task"]) for r in results}):
        of_task = [r for r in results if str(r["task"]) == task]
        metric_names: list[str] = []
        for result in of_task:
            metric_names += [m for m in result["metrics"] if m not in metric_names]
        rows = [tuple(format_value(r.get(c)) if r.get(c) is not None else "-" for c in EVAL_META_COLUMNS)
                + tuple(format_value(r["metrics"].get(m)) if m in r["metrics"] else "-" for m in metric_names)
                + (r["_file"],)
                for r in sorted(of_task, key=lambda r: (str(r["dataset"]), r.get("checkpoint_step") or -1))]
        blocks += [Heading(f"Eval: {task}"), Table((*EVAL_META_COLUMNS, *metric_names, "file"), rows)]
    return blocks


def _header_text(record: RunRecord) -> str:
    first, last = record.rows[0], record.rows[-1]
    parts = [f"Run dir `{record.run_dir}`", f"steps {first['step']}-{last['step']} ({len(record.rows)} log rows)"]
    if first.get("time_utc") and last.get("time_utc"):
        parts.append(f"logged {first['time_utc']} to {last['time_utc']}")
    if record.num_resumes:
        parts.append(f"resumed {record.num_resumes} time(s) (re-logged steps keep their latest row)")
    if record.earlier_configs:
        parts.append(f"settings changed on resume (earlier configs: {', '.join(record.earlier_configs)})")
    return "; ".join(parts) + "."


def _versions_table(versions: dict) -> Table:
    rows = [(name, format_value(value)) for name, value in versions.items() if name != "git"]
    git = versions.get("git")
    if isinstance(git, dict):
        revision = str(git.get("revision") or "unknown")
        rows.insert(0, ("git revision", revision + (" (uncommitted changes)" if git.get("dirty") else "")))
    return Table(("package", "version"), rows)


def build_blocks(record: RunRecord, plots: list[Plot]) -> list[Block]:
    name = (record.config.get("run") or {}).get("name") if isinstance(record.config.get("run"), dict) else None
    blocks: list[Block] = [Heading(f"Run report: {name or record.run_dir.name}"), Paragraph(_header_text(record))]
    highlights = config_highlights(record.config)
    blocks += [Heading("Configuration"),
               Table(("setting", "value"), highlights) if highlights else Paragraph("No config.yaml in the run dir.")]
    source = "final_metrics.json" if (record.run_dir / "final_metrics.json").is_file() else "last metrics row"
    blocks += [Heading(f"Final metrics ({source})"), _final_table(record.final)]
    warnings = record_warnings(record)
    if warnings:
        blocks += [Heading("Warnings"), Table(("where", "warning"), warnings)]
    counts = _counts_table(record.rows)
    if counts:  # counts are never plotted (pipeline.reporting.plots.is_count): here they are
        blocks += [Heading("Sample and class counts (metrics.jsonl)"), counts]
    blocks += _eval_tables(record.eval_results)
    skipped = skipped_totals(record.rows)
    blocks += [Heading("Skipped training samples"),
               Table(("reason", "samples"), [(r, str(n)) for r, n in skipped.items()]) if skipped
               else Paragraph("None: every sample read was used.")]
    blocks += [Heading("Plots"), Plots(plots)]
    blocks += [Heading("Versions"),
               _versions_table(record.versions) if record.versions else Paragraph("No versions.json in the run dir.")]
    if record.unreadable:
        blocks += [Heading("Not used"),
                   Table(("what", "count"), [(what, str(n)) for what, n in sorted(record.unreadable.items())])]
    blocks.append(Paragraph(f"Generated {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} by `launch report`."))
    return blocks



def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    for i, block in enumerate(blocks):
        if isinstance(block, Heading):
            lines += [("# " if i == 0 else "## ") + block.text, ""]
        elif isinstance(block, Paragraph):
            lines += [block.text, ""]
        elif isinstance(block, Table):
            lines.append("| " + " | ".join(_md_cell(h) for h in block.headers) + " |")
            lines.append("|" + "---|" * len(block.headers))
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            lines.append("")
        elif isinstance(block, Plots):
            for plot in block.plots:
                lines += [f"![{plot.title}]({plot.filename})", ""]
    return "\n".join(lines)


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0 1.2em}td,th{border:1px solid #ccc;padding:2px 8px;"
        "text-align:left;font-size:14px}th{background:#f3f3f3}.plots{display:flex;flex-wrap:wrap;gap:8px}"
        ".plots figure{margin:0}.plots img{width:520px}figcaption{font-size:12px;color:#555}code{font-size:13px}")


def _html_inline(text: str) -> str:
    # The only markup paragraphs use is `code`.
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def render_html(blocks: list[Block], plot_dir: Path) -> str:
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(blocks[0].text)}</title>"
           f"<style>{_CSS}</style></head><body>"]
    for i, block in enumerate(blocks):
        if isinstance(block, Heading):
            tag = "h1" if i == 0 else "h2"
            out.append(f"<{tag}>{html.escape(block.text)}</{tag}>")
        elif isinstance(block, Paragraph):
            out.append(f"<p>{_html_inline(block.text)}</p>")
        elif isinstance(block, Table):
            out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in block.headers) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in block.rows]
            out.append("</table>")
        elif isinstance(block, Plots):
            out.append("<div class='plots'>")
            for plot in block.plots:
                data = base64.b64encode((plot_dir / plot.filename).read_bytes()).decode("ascii")
                out.append(f"<figure><img alt='{html.escape(plot.title)}' src='data:image/png;base64,{data}'>"
                           f"<figcaption>{html.escape(plot.filename)}: {html.escape(', '.join(plot.keys))}"
                           "</figcaption></figure>")
            out.append("</div>")
    out.append("</body></html>")
    return "\n".join(out)


def write_summary(record: RunRecord, plots: list[Plot], output_dir: Path) -> tuple[Path, Path]:
    blocks = build_blocks(record, plots)
    markdown, page = output_dir / "report.md", output_dir / "report.html"
    markdown.write_text(render_markdown(blocks), encoding="utf-8")
    page.write_text(render_html(blocks, output_dir), encoding="utf-8")
    return markdown, page
