"""The comparison report of several models (`lowbit compare`): a plain-text table for the terminal, and
compare.json, compare.png and compare.html written side by side.

Each model is one row dict (name, model, runtime, scheme, size_bytes, parameters, bits_per_weight, perplexity,
dataset, tasks, prefill_tokens_per_s, decode_tokens_per_s, peak_rss_bytes, layer_errors, answers: greedy answers
to --prompts, shown side by side). Any value may be None
or missing: the report shows "-" for it and plots only what was measured. The first row is the reference that
the changes (perplexity in %, task metrics in points) are taken against.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import LowbitError
from ..results import to_json

MISSING = "-"
CHANGES_NOTE = ("changes (in brackets) are against the first row: perplexity in %, task metrics in points; "
                "- = not measured")
MIB = 1024 * 1024
REPORT_FILES = {"json": "compare.json", "png": "compare.png", "html": "compare.html"}
FIGURE_INCHES = (12.0, 7.0)  # at FIGURE_DPI: 1200 x 700 px
FIGURE_DPI = 100


# -- reading values out of a row ---------------------------------------------------------------------------

def _number(value) -> float | None:
    """A measured number as a float, None when missing or NaN; a speed spread dict gives its median."""
    if isinstance(value, dict):
        value = value.get("median")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _finite(value) -> float | None:
    """_number, and None for infinities too: what a plot can place."""
    value = _number(value)
    return value if value is not None and math.isfinite(value) else None


def _size_mib(row: dict) -> float | None:
    """Bytes on disk in MiB."""
    size = _number(row.get("size_bytes"))
    return None if size is None else size / MIB


def _tasks(row: dict) -> dict:
    """The row's {task: {"metric", "value", "stderr"}}, {} when missing or malformed."""
    tasks = row.get("tasks")
    return {str(k): v for k, v in tasks.items() if isinstance(v, dict)} if isinstance(tasks, dict) else {}


def _layer_errors(row: dict) -> dict[str, float]:
    """The row's {layer name: relative error} with the unmeasured (None, NaN) entries left out."""
    errors = row.get("layer_errors")
    if not isinstance(errors, dict):
        return {}
    return {str(k): v for k, v in ((k, _finite(v)) for k, v in errors.items()) if v is not None}


def _label(row: dict, index: int) -> str:
    """The row's short name, or "model N" when it has none."""
    name = row.get("name")
    return str(name) if name not in (None, "") else f"model {index + 1}"


def task_columns(rows: list[dict]) -> list[tuple[str, str]]:
    """(task, metric) of every task any row measured, in order of first appearance."""
    seen: dict[str, str] = {}
    for row in rows:
        for task, result in _tasks(row).items():
            seen.setdefault(task, str(result.get("metric") or "value"))
    return list(seen.items())


def _task_value(row: dict, task: str) -> float | None:
    """The row's value of a task's metric, None when not measured."""
    return _number(_tasks(row).get(task, {}).get("value"))


def _is_fraction(rows: list[dict], task: str) -> bool:
    """Whether every value of a task lies in [0, 1] (an accuracy): then it is shown in % and changes in points."""
    values = [v for v in (_task_value(r, task) for r in rows) if v is not None]
    return bool(values) and all(0.0 <= v <= 1.0 for v in values)


# -- the table (shared by the terminal and the HTML) -------------------------------------------------------

@dataclass
class Column:
    header: str
    cells: list[str]
    numeric: bool = True  # right-aligned


def _fmt(value: float | None, digits: int) -> str:
    """A number with `digits` decimals, "-" when missing, "inf" for an infinite one."""
    if value is None:
        return MISSING
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:,.{digits}f}"


def _speed(value: float | None) -> str:
    """Tokens per second: whole numbers from 100 on, one decimal below."""
    return _fmt(value, 0 if value is not None and abs(value) >= 100 else 1)


def _with_change(text: str, value: float | None, reference: float | None, percent: bool) -> str:
    """A cell's text plus its change against the reference row: "(+3.1%)" or "(-1.2)" in points."""
    if value is None or reference is None or not math.isfinite(value) or not math.isfinite(reference):
        return text
    if percent:
        if reference == 0:
            return text
        return f"{text} ({(value - reference) / abs(reference) * 100:+.1f}%)"
    return f"{text} ({value - reference:+.1f})"


def _perplexity_column(rows: list[dict]) -> Column:
    """Perplexity, with its change in % against the first row."""
    reference = _number(rows[0].get("perplexity")) if rows else None
    cells = []
    for i, row in enumerate(rows):
        value = _number(row.get("perplexity"))
        text = _fmt(value, 2)
        cells.append(text if i == 0 else _with_change(text, value, reference, percent=True))
    return Column("perplexity", cells)


def _task_column(rows: list[dict], task: str, metric: str) -> Column:
    """One task's metric (in % for accuracies), with its change in points against the first row."""
    scale = 100.0 if _is_fraction(rows, task) else 1.0
    values = [None if (v := _task_value(r, task)) is None else v * scale for r in rows]
    cells = [_fmt(values[0], 1) if values else MISSING]
    cells += [_with_change(_fmt(v, 1), v, values[0], percent=False) for v in values[1:]]
    return Column(f"{task} {metric}{'%' if scale == 100.0 else ''}", cells)


def table_columns(rows: list[dict]) -> list[Column]:
    """The report's columns: name, size, bits/weight, perplexity, every task, prefill and decode speed."""
    sizes = [_size_mib(r) for r in rows]
    columns = [
        Column("name", [_label(r, i) for i, r in enumerate(rows)], numeric=False),
        Column("size MiB", [_fmt(s, 1) for s in sizes]),
        Column("bits/weight", [_fmt(_number(r.get("bits_per_weight")), 2) for r in rows]),
        _perplexity_column(rows),
    ]
    columns += [_task_column(rows, task, metric) for task, metric in task_columns(rows)]
    columns += [
        Column("prefill tok/s", [_speed(_number(r.get("prefill_tokens_per_s"))) for r in rows]),
        Column("decode tok/s", [_speed(_number(r.get("decode_tokens_per_s"))) for r in rows]),
    ]
    return columns


def format_table(rows: list[dict]) -> str:
    """The comparison as an aligned plain-text table for the terminal; the first row is the reference."""
    columns = table_columns(rows)
    widths = [max([len(c.header)] + [len(cell) for cell in c.cells]) for c in columns]

    def line(cells: list[str]) -> str:
        parts = [cell.rjust(w) if c.numeric else cell.ljust(w) for c, cell, w in zip(columns, cells, widths)]
        return "  ".join(parts).rstrip()

    lines = [line([c.header for c in columns]), "  ".join("-" * w for w in widths)]
    lines += [line([c.cells[i] for c in columns]) for i in range(len(rows))]
    return "\n".join(lines + [CHANGES_NOTE] + _answer_lines(rows))


def answer_prompts(rows: list[dict]) -> list[str]:
    """The prompts the rows' greedy answers ("answers": [{"prompt", "output", ...}]) reply to, [] without any."""
    return next(([a["prompt"] for a in r["answers"]] for r in rows if r.get("answers")), [])


def _answer(row: dict, index: int) -> str:
    answers = row.get("answers") or []
    return answers[index]["output"] if index < len(answers) else MISSING


def _answer_lines(rows: list[dict], width: int = 72) -> list[str]:
    """The first prompt's answers, one line per model, cut to `width` characters."""
    prompts = answer_prompts(rows)
    if not prompts:
        return []

    def cut(text: str) -> str:
        text = " ".join(text.split())
        return text if len(text) <= width else text[: width - 3] + "..."
    names = [_label(r, i) for i, r in enumerate(rows)]
    more = f" (all {len(prompts)} prompts in the report)" if len(prompts) > 1 else ""
    return [f"answers to {cut(repr(prompts[0]))}{more}:"] + [
        f"  {n:<{max(map(len, names))}}  {cut(_answer(r, 0))}" for n, r in zip(names, rows)]


# -- the figure ----------------------------------------------------------------------------------------------

def layer_sort_key(name: str) -> tuple:
    """Order of a layer name: by its first number (the block index), then naturally by name (experts.2 <
    experts.10); names without a number (lm_head) come last."""
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    natural = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name) if p)
    return (0, int(match.group(1)), natural) if match else (1, 0, natural)


def layer_order(rows: list[dict]) -> list[str]:
    """Every layer name any row recorded an error for, in layer order: the x axis of the error panel."""
    names = {name for row in rows for name in _layer_errors(row)}
    return sorted(names, key=layer_sort_key)


def _colours(count: int) -> list:
    """One distinct colour per model, the same in every panel."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(count)]


def _annotate(ax, x: float, y: float, text: str, colour) -> None:
    """A model's name next to its point."""
    ax.annotate(text, (x, y), xytext=(6, 5), textcoords="offset points", fontsize=9, color=colour,
                fontweight="bold")


def _skipped_note(ax, labels: list[str], what: str) -> None:
    """A grey note in the panel's corner naming the models that could not be placed in it."""
    if labels:
        ax.text(0.99, 0.01, f"not plotted ({what}): " + ", ".join(labels), transform=ax.transAxes, ha="right",
                va="bottom", fontsize=8, color="0.4", wrap=True)


def _perplexity_panel(ax, rows: list[dict], colours: list) -> None:
    """Perplexity against size on disk, one labelled point per model."""
    skipped = []
    for i, row in enumerate(rows):
        size, ppl = _finite(_size_mib(row)), _finite(row.get("perplexity"))
        if size is None or ppl is None:
            skipped.append(_label(row, i))
            continue
        ax.scatter([size], [ppl], s=60, color=colours[i], edgecolor="black", linewidth=0.6, zorder=3)
        _annotate(ax, size, ppl, _label(row, i), colours[i])
    reference = _finite(rows[0].get("perplexity")) if rows else None
    if reference is not None:
        ax.axhline(reference, color=colours[0], linestyle="--", linewidth=0.8, alpha=0.6, zorder=1)
    dataset = next((r.get("dataset") for r in rows if r.get("dataset")), None)
    ax.set_title("perplexity vs size" + (f" ({dataset})" if dataset else ""), fontsize=11)
    ax.set_xlabel("size on disk (MiB)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.2, y=0.2)
    _skipped_note(ax, skipped, "no size or perplexity")


_TASK_MARKERS = "osD^vP*Xhp<>"


def _task_panel(ax, rows: list[dict], colours: list) -> None:
    """Each task's metric against size on disk: one marker shape per task, the model's colour."""
    from matplotlib.lines import Line2D

    handles, skipped = [], []
    for t, (task, metric) in enumerate(task_columns(rows)):
        scale = 100.0 if _is_fraction(rows, task) else 1.0
        marker = _TASK_MARKERS[t % len(_TASK_MARKERS)]
        for i, row in enumerate(rows):
            size, value = _finite(_size_mib(row)), _finite(_task_value(row, task))
            if size is not None and value is not None:
                ax.scatter([size], [value * scale], s=50, marker=marker, color=colours[i], edgecolor="black",
                           linewidth=0.6, zorder=3)
        handles.append(Line2D([], [], marker=marker, linestyle="", color="0.5", markeredgecolor="black",
                              label=f"{task} ({metric})"))
    for i, row in enumerate(rows):  # each model's name once, by its best task score
        size = _finite(_size_mib(row))
        scores = [v * (100.0 if _is_fraction(rows, t) else 1.0) for t, _ in task_columns(rows)
                  if (v := _finite(_task_value(row, t))) is not None]
        if size is not None and scores:
            _annotate(ax, size, max(scores), _label(row, i), colours[i])
        elif scores:
            skipped.append(_label(row, i))
    ax.set_title("task metrics vs size", fontsize=11)
    ax.set_xlabel("size on disk (MiB)")
    ax.set_ylabel("score (accuracies in %; higher is better)")
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.2, y=0.2)
    ax.legend(handles=handles, fontsize=8, loc="best", framealpha=0.8)
    _skipped_note(ax, skipped, "no size")


def _layer_ticks(ax, order: list[str]) -> None:
    """x ticks at the first linear of each block, labelled with the block index, thinned to about 16."""
    starts: list[tuple[int, str]] = []
    for x, name in enumerate(order):
        key = layer_sort_key(name)
        label = str(key[1]) if key[0] == 0 else name.rsplit(".", 1)[-1]
        if not starts or starts[-1][1] != label:
            starts.append((x, label))
    step = max(1, math.ceil(len(starts) / 16))
    shown = starts[::step]
    ax.set_xticks([x for x, _ in shown], [label for _, label in shown], fontsize=8)
    for x, _ in starts[1:]:
        ax.axvline(x - 0.5, color="0.85", linewidth=0.5, zorder=0)


def _layer_panel(ax, rows: list[dict], colours: list) -> None:
    """Relative quantization error of every linear layer, in layer order, one line per model that recorded it."""
    order = layer_order(rows)
    position = {name: x for x, name in enumerate(order)}
    unrecorded, values = [], []
    for i, row in enumerate(rows):
        errors = _layer_errors(row)
        if not errors:
            unrecorded.append(_label(row, i))
            continue
        names = sorted(errors, key=position.__getitem__)
        xs, ys = [position[n] for n in names], [errors[n] for n in names]
        values += ys
        ax.plot(xs, ys, color=colours[i], linewidth=1.0, marker="o", markersize=2.5, alpha=0.85,
                label=_label(row, i))
    ax.set_title("per-layer quantization error", fontsize=11)
    ax.set_xlabel("layer (block index; the linears of a block in name order)")
    ax.set_ylabel("relative error ||W - Q(W)|| / ||W||")
    ax.grid(True, axis="y", alpha=0.3)
    if order:
        _layer_ticks(ax, order)
        positive = [v for v in values if v > 0]
        if positive and len(positive) == len(values) and max(positive) / min(positive) > 20:
            ax.set_yscale("log")
        ax.margins(x=0.01, y=0.12)  # headroom for the legend above the lines
        ax.legend(fontsize=9, loc="upper left", ncols=min(4, len(rows) - len(unrecorded)), framealpha=0.9)
    else:
        ax.set_xticks([])
        ax.text(0.5, 0.5, "no model recorded per-layer errors", transform=ax.transAxes, ha="center",
                va="center", fontsize=11, color="0.4")
    if unrecorded:
        ax.text(0.99, 0.99, "float / not recorded: " + ", ".join(unrecorded), transform=ax.transAxes, ha="right",
                va="top", fontsize=9, color="0.3", bbox=dict(facecolor="white", edgecolor="0.8", alpha=0.9))


def render_png(rows: list[dict], title: str = "lowbit compare") -> bytes:
    """The report's figure as PNG bytes (1200 x 700 px): quality vs size on the left (perplexity, and task
    metrics below it when any were measured), per-layer error on the right. Agg backend: no display needed."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:  # leave a caller's pyplot (and its open figures) alone
        matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGURE_INCHES, dpi=FIGURE_DPI, layout="constrained")
    FigureCanvasAgg(fig)  # draw with Agg whatever the default backend: no display, no window
    has_tasks = any(_finite(_task_value(r, t)) is not None for r in rows for t, _ in task_columns(rows))
    grid = fig.add_gridspec(2 if has_tasks else 1, 2, width_ratios=[1.0, 1.75])
    colours = _colours(len(rows))
    _perplexity_panel(fig.add_subplot(grid[0, 0]), rows, colours)
    if has_tasks:
        _task_panel(fig.add_subplot(grid[1, 0]), rows, colours)
    _layer_panel(fig.add_subplot(grid[:, 1]), rows, colours)
    fig.suptitle(title, fontsize=13, fontweight="bold")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=FIGURE_DPI)
    return buffer.getvalue()


# -- the HTML page -------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.15em; margin-top: 1.6em; }
dl.meta { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; font-size: 0.9em; }
dl.meta dt { font-weight: 600; color: #555; }
dl.meta dd { margin: 0; font-family: ui-monospace, monospace; word-break: break-all; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; }
th { background: #f0f0f0; text-align: center; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr:first-child td { background: #fafafa; }
img { max-width: 100%; height: auto; border: 1px solid #ddd; margin-top: 0.5em; }
table.answers td { white-space: pre-wrap; vertical-align: top; max-width: 30em; }
p.note { font-size: 0.85em; color: #666; }
""".strip()


def _html_table(headers: list[str], rows: list[list[str]], numeric: list[bool]) -> str:
    """An HTML <table>, every header and cell escaped."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td class="{"num" if n else "text"}">{html.escape(cell)}</td>'
                         for cell, n in zip(cells, numeric)) + "</tr>"
        for cells in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>{body}</tbody>\n</table>"


def _details_table(rows: list[dict]) -> str:
    """Where each model came from and how it ran: path, runtime, scheme, parameters, dataset, peak memory."""
    headers = ["name", "model", "runtime", "scheme", "parameters", "dataset", "peak RSS MiB"]
    cells = []
    for i, row in enumerate(rows):
        params, rss = _number(row.get("parameters")), _number(row.get("peak_rss_bytes"))
        cells.append([_label(row, i)] + [str(row.get(k)) if row.get(k) not in (None, "") else MISSING
                                         for k in ("model", "runtime", "scheme")]
                     + [_fmt(params, 0), str(row.get("dataset") or MISSING),
                        _fmt(None if rss is None else rss / MIB, 1)])
    return _html_table(headers, cells, [False, False, False, False, True, False, True])


def _answers_section(rows: list[dict]) -> str:
    """Each prompt with every model's greedy answer beside it (escaped), or nothing when none was asked for."""
    prompts = answer_prompts(rows)
    if not prompts:
        return ""
    cells = [[p] + [_answer(r, i) for r in rows] for i, p in enumerate(prompts)]
    table = _html_table(["prompt"] + [_label(r, i) for i, r in enumerate(rows)], cells, [False] * (len(rows) + 1))
    return "<h2>Answers (greedy)</h2>\n" + table.replace("<table>", '<table class="answers">', 1)


def _meta_list(meta: dict) -> str:
    """The run's metadata (date, machine, command, versions, anything else given) as a definition list."""
    items = []
    for key, value in meta.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            value = " ".join(str(v) for v in value)
        items.append(f"<dt>{html.escape(str(key))}</dt><dd>{html.escape(str(value))}</dd>")
    return f'<dl class="meta">{"".join(items)}</dl>'


def render_html(rows: list[dict], png: bytes, title: str = "lowbit compare", meta: dict | None = None) -> str:
    """The report as one self-contained HTML page: title, metadata, the table, the figure inlined as base64."""
    columns = table_columns(rows)
    table = _html_table([c.header for c in columns], [[c.cells[i] for c in columns] for i in range(len(rows))],
                        [c.numeric for c in columns])
    image = base64.b64encode(png).decode("ascii")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>
{_CSS}
</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
{_meta_list(meta or {})}
<h2>Results</h2>
{table}
<p class="note">{html.escape(CHANGES_NOTE)}</p>
<img src="data:image/png;base64,{image}" alt="{html.escape(title)}: quality vs size and per-layer error">
{_answers_section(rows)}
<h2>Models</h2>
{_details_table(rows)}
</body>
</html>
"""


# -- writing the files ---------------------------------------------------------------------------------------

def report_paths(out_dir) -> dict[str, Path]:
    """The paths of compare.json, compare.png and compare.html in out_dir."""
    return {kind: Path(out_dir) / name for kind, name in REPORT_FILES.items()}


def _write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to a temporary file beside path, then rename it over path: never a half-written file."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def check_report_dir(out_dir, overwrite: bool = False) -> None:
    """Refuse, before any measuring, a report folder that is a file or already holds a report (unless overwrite),
    and a machine without matplotlib."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise LowbitError("the report's plot needs matplotlib: pip install matplotlib (or lowbit[eval])")
    out_dir = Path(out_dir)
    _check_dir(out_dir, report_paths(out_dir), overwrite)


def _prepare_dir(out_dir: Path, paths: dict[str, Path], overwrite: bool) -> None:
    """Create out_dir; refuse when a report file is already there and overwrite is off."""
    _check_dir(out_dir, paths, overwrite)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LowbitError(f"cannot create the report folder {out_dir}: {e.strerror or e}") from None


def _check_dir(out_dir: Path, paths: dict[str, Path], overwrite: bool) -> None:
    """Refuse a file as the folder, or existing report files without overwrite."""
    if out_dir.exists() and not out_dir.is_dir():
        raise LowbitError(f"{out_dir} is a file, not a folder; give a folder for the report")
    existing = [p.name for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise LowbitError(f"{out_dir} already holds {', '.join(existing)}; pass --overwrite to replace the report "
                          f"or choose another folder")


def write_report(rows: list[dict], out_dir, title: str = "lowbit compare", meta: dict | None = None,
                 overwrite: bool = False) -> dict[str, Path]:
    """Write compare.json (title, meta, rows), compare.png and compare.html into out_dir and return their paths.

    Everything is rendered in memory first and each file is written by temp name + rename, so a failure leaves
    no half-written file. meta (command, machine, versions, ...) comes from the caller; date is added if absent."""
    out_dir = Path(out_dir)
    paths = report_paths(out_dir)
    _prepare_dir(out_dir, paths, overwrite)
    meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), **(meta or {})}
    document = {"title": title, "meta": meta, "rows": rows}
    blobs = {"json": (to_json(document, indent=2) + "\n").encode("utf-8")}
    blobs["png"] = render_png(rows, title)
    blobs["html"] = render_html(rows, blobs["png"], title, meta).encode("utf-8")
    try:
        for kind in ("json", "png", "html"):
            _write_atomic(paths[kind], blobs[kind])
    except OSError as e:
        raise LowbitError(f"cannot write the report in {out_dir}: {e.strerror or e}") from None
    return paths
