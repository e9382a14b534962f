"""`tune-cmp report`: one self-contained HTML page about a training run.

The page (``<run_dir>/report.html`` by default) holds, in order: the run (model, method, number
of ablated passes c, dataset, steps logged), the final training and validation values
(``training_plots.training_summary``), the training plots, every evaluation report
``<run_dir>/eval/*.json`` (``tune-cmp eval``) as a table, every ablation analysis
``<run_dir>/analysis/*.json`` (``tune-cmp analyze``) with its AUC table and figures, and the
run's ``torchtune_config.yaml``. Images are embedded as ``data:`` PNGs, the style is inline:
the file can be mailed, archived or opened offline, and needs no script to display.

A run directory is a training run's ``output_dir`` with the metric logger's files (DiskLogger
``log_*.txt`` or TensorBoard events, see ``logs.py``). The plots need matplotlib (the
``plots`` extra), imported only when the page is written.
"""

import argparse
import base64
import datetime
import html
import json
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from comparative_recipe.analysis.ablation_plots import ablation_figures, auc_rows, auc_table_cells
from comparative_recipe.analysis.logs import CONFIG_FILE, RunLog, read_run
from comparative_recipe.analysis.plotting import REPORT_IMAGE_WIDTH, require_matplotlib
from comparative_recipe.analysis.training_plots import (
    format_number,
    training_figures,
    training_summary,
)
from comparative_recipe.evaluation import PASS_METRICS, SUMMARY_METRICS
from comparative_recipe.outputs import write_file

REPORT_FILE = "report.html"
EVAL_DIR = "eval"
ANALYSIS_DIR = "analysis"
TRAINING_FIGURES = (
    ("losses", "Losses: the objective, the task loss of every pass, the ablation gap"),
    ("violation_rate", "Violation rate: ablated passes whose loss is not above the full model's"),
    ("validation", "Validation: task loss per pass and task metrics"),
    ("throughput", "Throughput"),
)
ANALYSIS_FIGURES = (
    ("curves", "Ablation curves: task loss"),
    ("layers", "Loss increase per layer"),
    ("attribution", "Unit attribution"),
)

STYLE = f"""
body {{ font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; font-size: 15px;
       line-height: 1.45; color: #1b1b1b; background: #fff; margin: 0; }}
main {{ max-width: {REPORT_IMAGE_WIDTH + 40}px; margin: 0 auto; padding: 16px 20px 48px; }}
h1 {{ font-size: 24px; margin: 12px 0 4px; word-break: break-all; }}
h2 {{ font-size: 20px; margin: 32px 0 8px; padding-bottom: 4px; border-bottom: 1px solid #ddd; }}
h3 {{ font-size: 16px; margin: 20px 0 6px; }}
p.meta, p.note {{ color: #555; margin: 4px 0 10px; }}
nav {{ margin: 8px 0 0; color: #555; }}
nav a {{ margin-right: 14px; color: #0a58a5; text-decoration: none; }}
code {{ font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; }}
table {{ border-collapse: collapse; margin: 6px 0 14px; font-size: 14px; }}
th, td {{ border: 1px solid #d8d8d8; padding: 4px 10px; text-align: left; vertical-align: top; }}
th {{ background: #f2f4f7; font-weight: 600; }}
tr:nth-child(even) td {{ background: #fafafa; }}
td.num, th.num {{ text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }}
tr.gap td {{ border-top: 2px solid #bbb; }}
figure {{ margin: 10px 0 22px; }}
figure img {{ display: block; max-width: 100%; height: auto; border: 1px solid #eee; }}
figcaption {{ color: #444; font-size: 14px; margin: 0 0 4px; }}
pre {{ background: #f6f8fa; border: 1px solid #e1e4e8; padding: 10px 12px; overflow-x: auto;
       font-size: 13px; line-height: 1.35; }}
.error {{ color: #a40000; }}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10000 else str(value)
    return format_number(value)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[bool] = (),
           gaps: Sequence[bool] = ()) -> str:
    """An HTML table; cells escaped; ``numeric[i]``: column i right-aligned; ``gaps[r]``: a
    thicker line above row r (a new group)."""
    num = list(numeric) + [False] * (len(header) - len(numeric))
    out = ["<table>", "<tr>" + "".join(
        f'<th class="num">{_e(h)}</th>' if num[i] else f"<th>{_e(h)}</th>"
        for i, h in enumerate(header)) + "</tr>"]
    for r, row in enumerate(rows):
        cls = ' class="gap"' if r < len(gaps) and gaps[r] else ""
        out.append(f"<tr{cls}>" + "".join(
            f'<td class="num">{_e(c)}</td>' if i < len(num) and num[i] else f"<td>{_e(c)}</td>"
            for i, c in enumerate(row)) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _png_width(data: bytes) -> Optional[int]:
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return struct.unpack(">I", data[16:20])[0]
    return None


def _image(path: Path, alt: str, caption: str = "") -> str:
    """A PNG as an embedded ``<img>`` (a data URL), shown at its own width up to
    ``REPORT_IMAGE_WIDTH`` CSS pixels and never wider than the page."""
    data = Path(path).read_bytes()
    width = _png_width(data)
    size = f' width="{min(width, REPORT_IMAGE_WIDTH)}"' if width else ""
    encoded = base64.b64encode(data).decode("ascii")
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return (f'<figure>{cap}<img src="data:image/png;base64,{encoded}" alt="{_e(alt)}"{size} '
            f'style="max-width:100%;height:auto"></figure>')


def _get(data: Any, *keys: str, default: Any = None) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return default
        data = data[key]
    return data


# ------------------------------------------------------------------------------------ sections


def _run_section(run: RunLog, summary: Dict[str, Any]) -> str:
    config = run.config or {}
    ablation = config.get("ablation") if isinstance(config.get("ablation"), dict) else {}
    n_hidden = int(ablation.get("n_hidden", 0) or 0)
    n_input = int(ablation.get("n_input", 0) or 0)
    rows: List[Tuple[str, str]] = [
        ("run directory", str(run.run_dir)),
        ("model", str(_get(config, "model", "_component_", default="—"))),
        ("method", str(config.get("method", "comparative"))),
        ("ablated passes c", f"{n_hidden + n_input} (ablation.n_hidden {n_hidden} + "
                             f"ablation.n_input {n_input})"),
        ("dataset", str(_get(config, "dataset", "_component_", default="—"))),
    ]
    val_dataset = _get(config, "validation", "dataset", "_component_")
    if val_dataset:
        rows.append(("validation dataset", str(val_dataset)))
    if config.get("task"):
        rows.append(("task", str(config["task"])))
    last = summary.get("last_step")
    rows.append(("steps logged", f"{summary.get('logged_steps', 0)} (last step "
                                 f"{'—' if last is None else last})"))
    rows.append(("metric logs", ", ".join(str(p) for p in run.sources)))
    if run.config is None:
        rows.append(("config", f"no {CONFIG_FILE} in the run directory"))
    return "<h2 id=\"run\">Run</h2>\n" + _table(["", "value"], rows)


def _final_section(summary: Dict[str, Any], smoothing: float) -> str:
    parts = ['<h2 id="final">Final metrics</h2>']
    final = summary.get("final") or {}
    if final:
        parts.append(f'<p class="meta">Training values at the last logged step; smoothed: '
                     f'exponential moving average, weight {_e(smoothing)}.</p>')
        parts.append(_table(
            ["metric", "step", "last", "smoothed"],
            [(name, v.get("step"), _num(v.get("last")), _num(v.get("smoothed")))
             for name, v in final.items()],
            numeric=[False, True, True, True]))
    validation = summary.get("validation") or {}
    if validation:
        parts.append("<h3>Validation</h3>")
        parts.append(_table(
            ["metric", "last", "at step", "best", "at step", "best is"],
            [(name, _num(v.get("last")), v.get("last_step"), _num(v.get("best")),
              "—" if v.get("best_step") is None else v.get("best_step"), v.get("best_is"))
             for name, v in validation.items()],
            numeric=[False, True, True, True, True, False]))
    rates = [("tokens per second (mean)", summary.get("tokens_per_second_mean")),
             ("tokens of all passes per second (mean)", summary.get("pass_tokens_per_second_mean"))]
    rates = [(k, _num(v)) for k, v in rates if v is not None]
    if rates:
        parts.append(_table(["throughput", "value"], rates, numeric=[False, True]))
    if not final and not validation:
        parts.append('<p class="note">No loss or validation values in the logs.</p>')
    return "\n".join(parts)


def _training_section(run: RunLog, smoothing: float, tmp: Path) -> str:
    parts = ['<h2 id="training">Training plots</h2>']
    paths = training_figures([run], tmp / "training", smoothing)
    if not paths:
        parts.append('<p class="note">No metric in the logs to plot.</p>')
    titles = dict(TRAINING_FIGURES)
    for key in [k for k, _ in TRAINING_FIGURES if k in paths] + [
            k for k in paths if k not in titles]:
        title = titles.get(key, key.replace("_", " "))
        parts.append(_image(paths[key], alt=f"training plot: {title}", caption=title))
    return "\n".join(parts)


def _json_files(folder: Path) -> List[Path]:
    return sorted(p for p in folder.glob("*.json") if p.is_file()) if folder.is_dir() else []


def _read_json(path: Path) -> Tuple[Optional[dict], Optional[str]]:
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        return None, f"{path}: not readable JSON ({e})"
    if not isinstance(data, dict):
        return None, f"{path}: not a JSON object"
    return data, None


def _eval_table(report: Dict[str, Any]) -> str:
    passes = [p for p in report.get("passes") or [] if isinstance(p, dict)]
    columns = [c for c in PASS_METRICS if any(c in p for p in passes)]
    rows = [[p.get("pass", ""), p.get("ablation", ""), *(_num(p.get(c)) for c in columns)]
            for p in passes]
    return _table(["pass", "ablation", *columns], rows,
                  numeric=[True, False, *([True] * len(columns))])


def _eval_section(run_dir: Path) -> str:
    folder = run_dir / EVAL_DIR
    parts = ['<h2 id="eval">Evaluations</h2>']
    files = _json_files(folder)
    if not files:
        parts.append(f'<p class="note">No evaluation reports in <code>{_e(folder)}</code> '
                     "(<code>tune-cmp eval</code> writes them there).</p>")
    for path in files:
        parts.append(f"<h3>{_e(path.name)}</h3>")
        report, error = _read_json(path)
        if error:
            parts.append(f'<p class="error">{_e(error)}</p>')
            continue
        checkpoint = _get(report, "checkpoint", "checkpoint_dir", default="?")
        meta = [f"checkpoint <code>{_e(checkpoint)}</code>"]
        adapter = _get(report, "checkpoint", "adapter")
        if adapter:
            meta.append(f"adapter <code>{_e(adapter)}</code>")
        meta.append(f"{_e(report.get('samples', '?'))} samples")
        if report.get("passes_evaluated"):
            meta.append(f"passes: {_e(report['passes_evaluated'])}")
        if report.get("created"):
            meta.append(f"created {_e(report['created'])}")
        parts.append(f'<p class="meta">{"; ".join(meta)}</p>')
        parts.append(_eval_table(report))
        summary = report.get("summary") or {}
        extra = [f"{k} = {_num(summary[k])}" for k in SUMMARY_METRICS if k in summary]
        passes = [p for p in report.get("passes") or [] if isinstance(p, dict)]
        losses = [p.get("loss") for p in passes]
        if len(losses) > 1 and all(isinstance(v, (int, float)) for v in losses):
            ahead = all(losses[0] < other for other in losses[1:])
            extra.append("the full model is ahead of every ablation" if ahead
                         else "the full model is NOT ahead of every ablation")
        if extra:
            parts.append(f'<p class="meta">{_e("; ".join(extra))}</p>')
    return "\n".join(parts)


def _settings_text(analysis: Dict[str, Any]) -> str:
    s = analysis.get("settings") or {}
    bits = []
    if s.get("rates") is not None:
        bits.append("rates " + ", ".join(f"{float(r):g}" for r in s["rates"]))
    if s.get("crop_rates") is not None:
        bits.append("crop rates " + ", ".join(f"{float(r):g}" for r in s["crop_rates"]))
    if s.get("seeds") is not None:
        bits.append(f"seeds {', '.join(str(x) for x in s['seeds'])}")
    if s.get("granularity"):
        bits.append(f"granularity {s['granularity']}")
    if s.get("scale") is not None:
        bits.append(f"scale {str(s['scale']).lower()}")
    if s.get("layer_rate") is not None:
        bits.append(f"per-layer rate {float(s['layer_rate']):g}")
    if isinstance(s.get("attribution"), dict) and s["attribution"].get("reduce"):
        bits.append(f"attribution reduce {s['attribution']['reduce']}")
    return "; ".join(bits)


def _crop_exhausted(checkpoints: Sequence[dict]) -> List[str]:
    """'label: rate r: f, ...' for each checkpoint whose crop curve ran out of chunks to drop
    for some samples (none when no crop was exhausted)."""
    out = []
    for ckpt in checkpoints:
        for curve in ckpt.get("curves") or []:
            if not isinstance(curve, dict) or curve.get("name") != "crop":
                continue
            fractions = curve.get("crop_exhausted") or []
            if any(isinstance(f, (int, float)) and f > 0 for f in fractions):
                pairs = ", ".join(f"{float(r):g}: {_num(f)}" for r, f in
                                  zip(curve.get("rates") or [], fractions))
                out.append(f"{ckpt.get('label', '?')} ({pairs})")
    return out


def _analysis_section(run_dir: Path, tmp: Path) -> str:
    folder = run_dir / ANALYSIS_DIR
    parts = ['<h2 id="analysis">Ablation analyses</h2>']
    files = _json_files(folder)
    if not files:
        parts.append(f'<p class="note">No analyses in <code>{_e(folder)}</code> '
                     "(<code>tune-cmp analyze</code> writes them there).</p>")
    for n, path in enumerate(files):
        parts.append(f"<h3>{_e(path.stem)}</h3>")
        analysis, error = _read_json(path)
        if error:
            parts.append(f'<p class="error">{_e(error)}</p>')
            continue
        dataset = _get(analysis, "dataset", "_component_", default=None)
        meta = [f"{_e(analysis.get('samples', '?'))} samples"]
        if dataset:
            meta.append(f"dataset <code>{_e(dataset)}</code>")
        if analysis.get("task"):
            meta.append(f"task {_e(analysis['task'])}")
        if analysis.get("created"):
            meta.append(f"created {_e(analysis['created'])}")
        parts.append(f'<p class="meta">{"; ".join(meta)}</p>')
        settings = _settings_text(analysis)
        if settings:
            parts.append(f'<p class="meta">{_e(settings)}</p>')
        checkpoints = [c for c in analysis.get("checkpoints") or [] if isinstance(c, dict)]
        if checkpoints:
            parts.append(_table(
                ["checkpoint", "directory", "adapter", *(f"full {m}" for m in
                                                         analysis.get("metrics") or [])],
                [(c.get("label", ""), c.get("checkpoint_dir", ""), c.get("adapter") or "—",
                  *(_num(_get(c, "full_model", m)) for m in analysis.get("metrics") or []))
                 for c in checkpoints],
                numeric=[False, False, False, *([True] * len(analysis.get("metrics") or []))]))
        rows = auc_rows(analysis)
        if rows:
            parts.append("<p class=\"meta\">Area under each curve (trapezoid of the mean over "
                         "seeds, metric x rate) and above the full model's value (the "
                         "degradation; negative for metrics where higher is better).</p>")
            cells = auc_table_cells(rows)
            gaps = [i > 0 and (rows[i]["metric"], rows[i]["curve"]) !=
                    (rows[i - 1]["metric"], rows[i - 1]["curve"]) for i in range(len(rows))]
            parts.append(_table(cells[0], cells[1:], numeric=[False] * 3 + [True] * 5,
                                gaps=gaps))
        exhausted = _crop_exhausted(checkpoints)
        if exhausted:
            parts.append('<p class="meta">Samples whose crop had nothing left to drop (fraction, '
                         f"per crop rate): {_e('; '.join(exhausted))}.</p>")
        paths = ablation_figures(analysis, tmp / f"analysis_{n}", stem=path.stem)
        titles = dict(ANALYSIS_FIGURES)
        ordered = ["curves"] + [k for k in paths if k.startswith("curves_")] + ["layers",
                                                                                 "attribution"]
        for key in [k for k in ordered if k in paths]:
            if key.startswith("curves_"):
                title = f"Ablation curves: {key[len('curves_'):].replace('_', ' ')}"
            else:
                title = titles[key]
            parts.append(_image(paths[key], alt=f"{path.stem}: {title}", caption=title))
        if not rows and not paths:
            parts.append('<p class="note">The analysis has no curves, layers or attribution.</p>')
    return "\n".join(parts)


def _config_section(run_dir: Path) -> str:
    path = run_dir / CONFIG_FILE
    parts = ['<h2 id="config">Config</h2>']
    if path.is_file():
        parts.append(f'<p class="meta"><code>{_e(path)}</code></p>')
        parts.append(f"<pre>{_e(path.read_text(encoding='utf-8', errors='replace'))}</pre>")
    else:
        parts.append(f'<p class="note">No <code>{_e(CONFIG_FILE)}</code> in the run '
                     "directory.</p>")
    return "\n".join(parts)


def render_run_report(run_dir, *, smoothing: float = 0.6) -> str:
    """The report page of the run in ``run_dir`` as HTML text (see ``write_run_report``)."""
    run_dir = Path(run_dir).expanduser()
    run = read_run(run_dir)
    require_matplotlib()
    summary = training_summary([run], smoothing)[0]
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with tempfile.TemporaryDirectory(prefix="tune_cmp_report_") as tmp:
        tmp = Path(tmp)
        body = [
            _run_section(run, summary),
            _final_section(summary, smoothing),
            _training_section(run, smoothing, tmp),
            _eval_section(run_dir),
            _analysis_section(run_dir, tmp),
            _config_section(run_dir),
        ]
    nav = " ".join(f'<a href="#{a}">{t}</a>' for a, t in (
        ("run", "run"), ("final", "final metrics"), ("training", "training plots"),
        ("eval", "evaluations"), ("analysis", "analyses"), ("config", "config")))
    title = f"Run report: {run_dir}"
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f"<style>{STYLE}</style>",
        "</head>",
        "<body><main>",
        f"<h1>Run report: <code>{_e(run_dir)}</code></h1>",
        f'<p class="meta">Written {_e(created)} by <code>tune-cmp report</code>.</p>',
        f"<nav>{nav}</nav>",
        *body,
        "</main></body>",
        "</html>",
        "",
    ])


def write_run_report(run_dir, output_path=None, *, smoothing: float = 0.6,
                     overwrite: bool = True) -> Path:
    """Writes the run's HTML report and returns its path (default ``<run_dir>/report.html``).

    The file appears in one step (a temporary file, then renamed), complete or not at all.

    Raises:
        FileNotFoundError: no run directory, or no metric logs in it (the message says what the
            run needs); FileExistsError: the output exists and ``overwrite`` is False;
        ValueError: a bad ``smoothing`` or a malformed log line; ImportError: no matplotlib
            (the message says how to install it).
    """
    run_dir = Path(run_dir).expanduser()
    path = Path(output_path).expanduser() if output_path is not None else run_dir / REPORT_FILE
    if path.is_dir():
        raise IsADirectoryError(f"report output {path} is a directory; name an .html file")
    if not overwrite and path.exists():
        raise FileExistsError(_exists_message(path))
    text = render_run_report(run_dir, smoothing=smoothing)
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"),
                      overwrite=overwrite, exists_message=_exists_message(path))


def _exists_message(path: Path) -> str:
    return (f"report {path} already exists; pass overwrite=True (tune-cmp report without "
            "--no-overwrite) to replace it, or choose another output path")


# ------------------------------------------------------------------------------------ command


# Metric loggers whose files `logs.read_run` reads.
READABLE_LOGGERS = ("DiskLogger", "TensorBoardLogger")


def report_at_end(cfg: Any) -> bool:
    """The training config's ``report`` key (default false), checked before training starts:
    true needs matplotlib and a metric logger whose files the report reads (torchtune's
    DiskLogger or TensorBoardLogger). The recipe then writes ``<output_dir>/report.html`` when
    the run ends."""
    report = cfg.get("report", False)
    if not isinstance(report, bool):
        raise ValueError(f"report must be true or false, got {report!r}")
    if not report:
        return False
    try:
        require_matplotlib()
    except ImportError as e:
        raise ImportError(f"report: true needs the plots: {e}; or set report: false") from None
    logger = str((cfg.get("metric_logger", None) or {}).get("_component_", ""))
    if not logger.endswith(READABLE_LOGGERS):
        raise ValueError(
            f"report: true reads the run's metric logs, but metric_logger is {logger or 'unset'}: "
            "use torchtune.training.metric_logging.DiskLogger (or TensorBoardLogger) with a "
            "log_dir, or set report: false"
        )
    return True


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``tune-cmp report``."""
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="a training run's output_dir (with torchtune_config.yaml and the "
                             "metric logs); its eval/*.json and analysis/*.json are included")
    parser.add_argument("--output", default=None, metavar="FILE",
                        help=f"the HTML file to write (default: RUN_DIR/{REPORT_FILE})")
    parser.add_argument("--smoothing", type=float, default=0.6, metavar="W",
                        help="EMA smoothing weight of the training curves, in [0, 1) "
                             "(default: 0.6)")
    parser.add_argument("--no-overwrite", dest="overwrite", action="store_false", default=True,
                        help="fail if the output file exists (default: replace it)")


def report_command(args: argparse.Namespace) -> int:
    """``tune-cmp report``: writes the page and prints its path. Returns the exit code: 0
    written, 1 the run could not be read / the output exists / matplotlib is missing, 2 a bad
    argument."""
    smoothing = getattr(args, "smoothing", 0.6)
    if not (isinstance(smoothing, (int, float)) and 0.0 <= smoothing < 1.0):
        print(f"tune-cmp report: error: --smoothing must be in [0, 1), got {smoothing!r}",
              file=sys.stderr)
        return 2
    try:
        path = write_run_report(args.run_dir, getattr(args, "output", None), smoothing=smoothing,
                                overwrite=getattr(args, "overwrite", True))
    except (FileNotFoundError, FileExistsError, IsADirectoryError, ValueError,
            ImportError) as e:
        print(f"tune-cmp report: error: {e}", file=sys.stderr)
        return 1
    print(f"report: {path}")
    return 0
