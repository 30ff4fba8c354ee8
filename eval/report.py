"""The reproduction report: one row per paper row (suite) or per task metric, as markdown and a PNG bar chart.

Ours is printed on the paper's scale (percent for accuracy-like metrics, raw for perplexities and bits per
byte), next to the lm-eval task, metric and shots it comes from and every known difference; rows that did not
run say why. lm-eval's own results files stay the source of truth; this only reads them.
"""

from dataclasses import dataclass
from pathlib import Path

from .suites import SuiteRow, paper_row

PERCENT_METRICS = {"acc", "acc_norm", "exact_match", "em", "f1", "pass_at_k", "pass_at_1", "pass@1", "mcc"}


@dataclass
class ReportRow:
    benchmark: str
    task: str | None
    metric: str | None = None  # lm-eval's results key, e.g. "acc,none" or "exact_match,strict-match"
    shots: int | None = None
    value: float | None = None  # as lm-eval reports it (a fraction for accuracies)
    stderr: float | None = None
    samples: int | None = None
    paper: float | None = None  # the paper's number, on its own scale
    paper_metric: str = ""
    paper_shots: int | None = None
    scoring: str = ""  # "paper / lm-eval" scoring modes when they are known
    status: str = ""  # empty when it ran; otherwise why not
    notes: str = ""

    @property
    def scale(self) -> float:
        return 100.0 if self.metric and self.metric.split(",")[0] in PERCENT_METRICS else 1.0

    @property
    def ours(self) -> float | None:
        return None if self.value is None else self.value * self.scale


def _number(value) -> float | None:
    return float(value) if isinstance(value, int | float) and value == value else None


def _metric_value(
    result: dict, name: str, keys: tuple[str, ...]
) -> tuple[str | None, float | None, float | None]:
    metrics = result["results"].get(name, {})
    key = next((k for k in keys if k in metrics), None)
    if key is None:
        return None, None, None
    metric, filt = key.split(",", 1)
    return key, _number(metrics[key]), _number(metrics.get(f"{metric}_stderr,{filt}"))


def _samples(result: dict, names: list[str]) -> int | None:
    counts = [result["n-samples"][n]["effective"] for n in names if n in result.get("n-samples", {})]
    return sum(counts) if counts else None


def leaf_names(result: dict, name: str) -> list[str]:
    """The tasks under a group in lm-eval's results (groups nest: mmlu -> mmlu_stem -> mmlu_anatomy)."""
    children = result.get("group_subtasks", {}).get(name)
    return [leaf for child in children for leaf in leaf_names(result, child)] if children else [name]


def _paper_fields(row: SuiteRow) -> dict:
    return dict(paper=row.paper, paper_metric=row.paper_metric, paper_shots=row.shots)


def suite_rows(planned: list, results: list[dict]) -> list[ReportRow]:
    """Rows for a suite run: `planned` in suite order (each with .row, .objs, .task, .why), `results` one per
    planned entry that ran, in the same order."""
    rows = []
    ran = iter(results)
    for p in planned:
        row: SuiteRow = p.row
        out = ReportRow(row.benchmark, p.task or row.task, **_paper_fields(row))
        out.scoring = f"{row.paper_scoring} / {row.scoring}" if row.scoring else row.paper_scoring
        local = p.task is not None and p.task == row.local_task
        out.notes = "; ".join(n for n in (row.local_notes if local else "", row.notes) if n)
        if p.objs is None:
            out.status = p.why
            rows.append(out)
            continue
        result = next(ran)
        out.shots = row.shots
        if p.task in result["results"]:
            out.metric, out.value, out.stderr = _metric_value(result, p.task, row.metrics)
            out.samples = _samples(result, leaf_names(result, p.task))
        else:  # a tag (e.g. mgsm_direct): lm-eval reports its tasks only; ours is their plain mean
            names = [t.task_name for t in p.objs]
            values = [
                v for _, v, _ in (_metric_value(result, n, row.metrics) for n in names) if v is not None
            ]
            out.metric = row.metrics[0]
            out.value = sum(values) / len(values) if values else None
            out.samples = _samples(result, names)
            out.notes = "; ".join(n for n in (out.notes, f"mean over {len(values)} tasks") if n)
        if out.metric is None:
            out.status = f"lm-eval reported none of {', '.join(row.metrics)}"
        rows.append(out)
    return rows


def rows_for_results(result: dict, objs: list) -> list[ReportRow]:
    """Rows for a --tasks run: every metric of every top-level task or group, with the paper's number when the
    task stands for one of the paper's rows (and the metric is the one that row reports)."""
    rows = []
    for obj in objs:
        name = getattr(obj, "name", None) if hasattr(obj, "get_all_tasks") else obj.task_name
        metrics = result["results"].get(name, {})
        shots = result.get("n-shot", {}).get(name)
        if shots is None:
            leaves = leaf_names(result, name)
            shots = result.get("n-shot", {}).get(leaves[0]) if leaves else None
        match = paper_row(name)
        for key in metrics:
            if "," not in key or "_stderr," in key:
                continue
            metric, value, stderr = _metric_value(result, name, (key,))
            out = ReportRow(match.benchmark if match else name, name, metric, shots, value, stderr)
            out.samples = _samples(result, leaf_names(result, name))
            if match and key in match.metrics:
                out.paper, out.paper_metric, out.paper_shots = match.paper, match.paper_metric, match.shots
                out.scoring = f"{match.paper_scoring} / {match.scoring}"
                notes = [match.local_notes if name == match.local_task else "", match.notes]
                if shots is not None and shots != match.shots:
                    notes.insert(0, f"{shots} shots here, {match.shots} in the paper")
                out.notes = "; ".join(n for n in notes if n)
            rows.append(out)
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _fmt(value: float, scale: float) -> str:
    return f"{value:.1f}" if scale == 100.0 else f"{value:.4g}"


HEADER = (
    "Benchmark",
    "Paper (V3-Base)",
    "Ours",
    "lm-eval task (metric, shots)",
    "n",
    "Scoring (paper / lm-eval)",
    "Differences and notes",
)


def _paper_cell(r: ReportRow) -> str:
    return "—" if r.paper is None else f"{r.paper:g} ({r.paper_metric}, {r.paper_shots}-shot)"


def _ours_cell(r: ReportRow) -> str:
    if r.ours is None:
        return "—"
    return _fmt(r.ours, r.scale) + ("" if r.stderr is None else f" ± {_fmt(r.stderr * r.scale, r.scale)}")


def _task_cell(r: ReportRow) -> str:
    if r.task is None:
        return "none"
    detail = [r.metric.replace(",none", "").replace(",", " ")] if r.metric else []
    detail += [] if r.shots is None else [f"{r.shots}-shot"]
    return f"`{r.task}`" + (f" ({', '.join(detail)})" if detail else "")


def render_markdown(rows: list[ReportRow], title: str = "", chart: str | None = None) -> str:
    lines = [title, ""] if title else []
    lines += ["| " + " | ".join(HEADER) + " |", "|---|---:|---:|---|---:|---|---|"]
    for r in rows:
        notes = "; ".join(n for n in (r.status, r.notes) if n)
        n = "" if r.samples is None else str(r.samples)
        cells = (r.benchmark, _paper_cell(r), _ours_cell(r), _task_cell(r), n, r.scoring, notes)
        lines.append("| " + " | ".join(map(_cell, cells)) + " |")
    if chart:
        lines += ["", f"![ours vs the paper]({chart})"]
    elif rows and not any(r.paper is not None and r.ours is not None for r in rows):
        lines += ["", "No row has both a paper number and ours, so there is no chart."]
    return "\n".join(lines) + "\n"


def write_chart(rows: list[ReportRow], path: Path, title: str = "") -> Path | None:
    """A grouped bar chart of ours vs the paper for the rows with both on a percent scale; None if none."""
    pairs = [r for r in rows if r.paper is not None and r.ours is not None and r.scale == 100.0]
    if not pairs:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.9 * len(pairs) + 2), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = range(len(pairs))
    ax.bar([i - 0.2 for i in x], [r.ours for r in pairs], width=0.4, label="ours (lm-eval)")
    ax.bar([i + 0.2 for i in x], [r.paper for r in pairs], width=0.4, label="DeepSeek-V3-Base (paper)")
    ax.set_xticks(list(x), [r.benchmark for r in pairs], rotation=30, ha="right")
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
