"""Training curves of one or more runs from their metric logs (``logs.read_run``), a summary
of each run's final values, and the ``tune-cmp plot`` command that writes both.

Figures (one PNG each, only those with data), keyed by:

- ``losses``: the optimised objective ``loss``; the task loss of every pass ``loss_0`` (full
  model) .. ``loss_c`` (ablations) with the pass as line style; with ablated passes, the gap
  ``loss_k - loss_0`` of each ablation to the full model.
- ``violation_rate``: the fraction of ablated passes whose loss is not above the full model's
  (training, and validation points), for runs with ablated passes.
- ``validation``: ``val_loss_k`` per pass over steps, and one panel per task metric logged
  (accuracy, macro-F1, exact match, token F1).
- ``throughput``: scored tokens per second, and tokens processed by all passes per second.

Training curves are smoothed like TensorBoard (``plotting.smooth``): the smoothed curve is drawn
solid and the raw values faint behind it. Validation points are drawn as logged.
"""

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from comparative_recipe.analysis.logs import RunLog, finite, json_safe, read_run
from comparative_recipe.analysis.plotting import COLORS, panel_grid, save_figure, smooth
from comparative_recipe.outputs import write_file

SUMMARY_FILE = "training_summary.json"
FIGURE_FILES = {
    "losses": "training_losses.png",
    "violation_rate": "training_violation_rate.png",
    "validation": "training_validation.png",
    "throughput": "training_throughput.png",
}
X_LABEL = "training step"
TASK_LOSS_UNITS = "nats per token, sample mean"
# Validation task metrics: name in the logs (val_<name>_k), panel title, y label.
VAL_TASK_METRICS = (
    ("accuracy", "validation accuracy", "accuracy (fraction of samples correct)"),
    ("macro_f1", "validation macro-F1", "macro-F1 (0 to 1)"),
    ("exact_match", "validation exact match", "exact match (fraction of samples)"),
    ("f1", "validation token F1", "token F1 (0 to 1, sample mean)"),
)
# Line style of pass k: the full model solid, ablations dashed / dotted / ...
PASS_STYLES = ("-", "--", ":", "-.", (0, (6, 2, 1, 2, 1, 2)), (0, (1, 1)), (0, (8, 3)))
PASS_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
RAW_ALPHA = 0.25

_PASS_LOSS = re.compile(r"^loss_(\d+)$")


def pass_label(k: int) -> str:
    return "full model" if k == 0 else f"ablation {k}"


def _passes(run: RunLog, prefix: str) -> List[int]:
    """The pass indices k with a series ``<prefix>k`` (e.g. ``loss_``), sorted."""
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)$")
    return sorted(int(m.group(1)) for m in map(pattern.match, run.series) if m)


def has_ablations(run: RunLog) -> bool:
    """Whether the run has an ablated pass (a ``loss_k`` or ``val_loss_k`` with k >= 1): a plain
    run (c = 0) logs ``violation_rate`` as 0, which means nothing."""
    return any(k >= 1 for k in _passes(run, "loss_") + _passes(run, "val_loss_"))


def _color(i: int) -> str:
    return COLORS[i % len(COLORS)]


def _shade(color: str, k: int) -> str:
    """The run's colour for pass ``k``: the full model as is, each ablation a little lighter."""
    t = min(0.18 * k, 0.54)
    rgb = [int(color[i:i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(c + (255 - c) * t):02x}" for c in rgb)


def _style(k: int):
    return PASS_STYLES[k % len(PASS_STYLES)]


def _marker(k: int) -> str:
    return PASS_MARKERS[k % len(PASS_MARKERS)]


# ------------------------------------------------------------------------------------ drawing


def _curve(ax, steps, values, smoothing: float, color: str, label: str, linestyle="-") -> None:
    """The smoothed curve, solid (or ``linestyle``), over the raw values drawn faint."""
    if not steps:
        return
    if smoothing > 0:
        ax.plot(steps, values, color=color, alpha=RAW_ALPHA, linewidth=0.9, linestyle="-")
        values = smooth(values, smoothing)
    ax.plot(steps, values, color=color, linewidth=1.7, linestyle=linestyle, label=label)
    if len(steps) == 1:
        ax.plot(steps, values, color=color, marker="o", linestyle="none")


def _points(ax, steps, values, color: str, label: str, k: int = 0) -> None:
    """Validation points (not smoothed): markers joined by a thin line."""
    if steps:
        ax.plot(steps, values, color=color, marker=_marker(k), markersize=5, linewidth=1.2,
                linestyle=_style(k), label=label)


def _finish_axes(ax, title: str, ylabel: str, legend: bool = True) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title)
    ax.set_xlabel(X_LABEL)
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", framealpha=0.85)


def _suptitle(what: str, runs: Sequence[RunLog], smoothing: float, smoothed: bool = True) -> str:
    names = ", ".join(r.label for r in runs)
    if len(names) > 70:
        names = f"{len(runs)} runs"
    note = (f" (EMA smoothing {smoothing:g}, raw values faint)" if smoothed and smoothing > 0
            else "")
    return f"{what}: {names}{note}"


def _gap(run: RunLog, k: int) -> Tuple[List[int], List[float]]:
    full = dict(run.series.get("loss_0", []))
    steps, gaps = [], []
    for step, value in run.series.get(f"loss_{k}", []):
        if step in full:
            steps.append(step)
            gaps.append(value - full[step])
    return steps, gaps


def losses_figure(runs: Sequence[RunLog], smoothing: float = 0.6):
    """The objective, the task loss per pass and (with ablations) the ablation gap; None if no
    run logged ``loss`` or ``loss_k``."""
    with_objective = [r for r in runs if r.series.get("loss")]
    with_passes = [r for r in runs if _passes(r, "loss_")]
    with_gaps = [r for r in runs if "loss_0" in r.series and any(k >= 1 for k in _passes(r, "loss_"))]
    panels: List[Tuple[str, Callable]] = []

    def objective(ax):
        for i, run in enumerate(runs):
            _curve(ax, run.steps("loss"), run.values("loss"), smoothing, _color(i), run.label)
        _finish_axes(ax, "training objective (loss as optimised)",
                     "objective (the method's loss)")

    def task_losses(ax):
        for i, run in enumerate(runs):
            for k in _passes(run, "loss_"):
                name = f"loss_{k}"
                _curve(ax, run.steps(name), run.values(name), smoothing, _shade(_color(i), k),
                       f"{run.label} — {pass_label(k)}", _style(k))
        _finish_axes(ax, "task loss per pass", f"task loss ({TASK_LOSS_UNITS})")

    def gaps(ax):
        for i, run in enumerate(runs):
            for k in _passes(run, "loss_"):
                if k >= 1:
                    steps, values = _gap(run, k)
                    _curve(ax, steps, values, smoothing, _shade(_color(i), k),
                           f"{run.label} — {pass_label(k)}", _style(k))
        ax.axhline(0.0, color="0.4", linewidth=0.8)
        _finish_axes(ax, "ablated pass minus full model (loss_k − loss_0)",
                     "task-loss gap (nats per token)")

    if with_objective:
        panels.append(("objective", objective))
    if with_passes:
        panels.append(("task", task_losses))
    if with_gaps:
        panels.append(("gap", gaps))
    if not panels:
        return None
    fig, axes = panel_grid(len(panels), max_cols=2, title=_suptitle("training losses", runs, smoothing))
    for ax, (_, draw) in zip(axes, panels):
        draw(ax)
    return fig


def violation_figure(runs: Sequence[RunLog], smoothing: float = 0.6):
    """Training ``violation_rate`` (and ``val_violation_rate`` points) of the runs with ablated
    passes; None if there is none."""
    shown = [(i, r) for i, r in enumerate(runs) if has_ablations(r)
             and (r.series.get("violation_rate") or r.series.get("val_violation_rate"))]
    if not shown:
        return None
    fig, (ax,) = panel_grid(1, title=_suptitle("violation rate", [r for _, r in shown], smoothing))
    fig.set_size_inches(10.4, 4.2)
    for i, run in shown:
        _curve(ax, run.steps("violation_rate"), run.values("violation_rate"), smoothing,
               _color(i), f"{run.label} — training")
        if run.series.get("val_violation_rate"):
            ax.plot(run.steps("val_violation_rate"), run.values("val_violation_rate"),
                    color=_color(i), marker="D", markersize=6, linestyle="none",
                    markeredgecolor="black", markeredgewidth=0.6,
                    label=f"{run.label} — validation")
    ax.set_ylim(-0.03, 1.03)
    _finish_axes(ax, "ablated passes whose task loss is not above the full model's",
                 "fraction of ablated passes")
    return fig


def validation_figure(runs: Sequence[RunLog]):
    """``val_loss_k`` per pass and a panel per validation task metric; None without any."""
    panels: List[Tuple[str, str, str]] = []
    if any(_passes(r, "val_loss_") for r in runs):
        panels.append(("loss", "validation task loss per pass", f"task loss ({TASK_LOSS_UNITS})"))
    for name, title, ylabel in VAL_TASK_METRICS:
        if any(_passes(r, f"val_{name}_") for r in runs):
            panels.append((name, title, ylabel))
    if not panels:
        return None
    fig, axes = panel_grid(len(panels), max_cols=2,
                           title=_suptitle("validation", runs, 0.0, smoothed=False))
    for ax, (name, title, ylabel) in zip(axes, panels):
        for i, run in enumerate(runs):
            for k in _passes(run, f"val_{name}_"):
                series = f"val_{name}_{k}"
                _points(ax, run.steps(series), run.values(series), _shade(_color(i), k),
                        f"{run.label} — {pass_label(k)}", k)
        if name != "loss":
            ax.set_ylim(-0.03, 1.03)
        _finish_axes(ax, title, ylabel)
    return fig


def throughput_figure(runs: Sequence[RunLog], smoothing: float = 0.6):
    """Scored tokens per second, and tokens processed by all passes per second."""
    panels = []
    if any(r.series.get("tokens_per_second") for r in runs):
        panels.append(("tokens_per_second", "training throughput (scored tokens)",
                       "scored tokens / s"))
    if any(r.series.get("pass_tokens_per_second") for r in runs):
        panels.append(("pass_tokens_per_second", "tokens processed by all passes",
                       "tokens / s (all passes)"))
    if not panels:
        return None
    fig, axes = panel_grid(len(panels), max_cols=2,
                           title=_suptitle("throughput", runs, smoothing))
    for ax, (name, title, ylabel) in zip(axes, panels):
        for i, run in enumerate(runs):
            _curve(ax, run.steps(name), run.values(name), smoothing, _color(i), run.label)
        ax.set_ylim(bottom=0)
        _finish_axes(ax, title, ylabel)
    return fig


def build_training_figures(runs: Sequence[RunLog], smoothing: float = 0.6) -> Dict[str, Any]:
    """The figures (matplotlib ``Figure`` objects, not saved) that have data, by key."""
    _check_smoothing(smoothing)
    if not runs:
        raise ValueError("no runs to plot")
    figures = {
        "losses": losses_figure(runs, smoothing),
        "violation_rate": violation_figure(runs, smoothing),
        "validation": validation_figure(runs),
        "throughput": throughput_figure(runs, smoothing),
    }
    return {key: fig for key, fig in figures.items() if fig is not None}


def training_figures(runs: Sequence[RunLog], out_dir, smoothing: float = 0.6) -> Dict[str, Path]:
    """Writes the training figures that have data as PNGs into ``out_dir``.

    Returns:
        key (``losses``, ``violation_rate``, ``validation``, ``throughput``) -> PNG path.

    Raises:
        ImportError: matplotlib is missing (the message says how to install it).
    """
    out_dir = Path(out_dir)
    figures = build_training_figures(runs, smoothing)
    return {key: save_figure(fig, out_dir / FIGURE_FILES[key]) for key, fig in figures.items()}


# ------------------------------------------------------------------------------------ summary


def _check_smoothing(smoothing: float) -> None:
    if not (isinstance(smoothing, (int, float)) and 0.0 <= smoothing < 1.0):
        raise ValueError(
            f"smoothing must be in [0, 1) (0: none, 0.6: the default, 0.9: heavy), got {smoothing!r}"
        )


def _val_goal(name: str) -> Optional[str]:
    """``min`` or ``max``: which validation value is best; None for counts (val_samples)."""
    if re.match(r"^val_(loss_\d+|cmp_loss|violation_rate)$", name):
        return "min"
    if re.match(r"^val_(accuracy|macro_f1|exact_match|f1)_\d+$", name):
        return "max"
    return None


def _mean(values: Sequence[float]) -> Optional[float]:
    values = finite(values)
    return sum(values) / len(values) if values else None


def _final_names(run: RunLog) -> List[str]:
    names = [n for n in ("loss",) if n in run.series]
    names += [f"loss_{k}" for k in _passes(run, "loss_")]
    if has_ablations(run) and "violation_rate" in run.series:
        names.append("violation_rate")
    return names


def _val_sort_key(name: str):
    m = re.match(r"^(?:val_)?(.*?)(?:_(\d+))?$", name)
    base, k = m.group(1), m.group(2)
    order = ["loss", "accuracy", "macro_f1", "exact_match", "f1", "cmp_loss", "violation_rate"]
    return (order.index(base) if base in order else len(order), int(k) if k else -1, name)


def training_summary(runs: Sequence[RunLog], smoothing: float = 0.6) -> List[Dict[str, Any]]:
    """One row per run: its final training values and its validation results.

    Each row: ``label``, ``run_dir``, ``sources`` (files read), ``last_step`` (the last step
    any metric was logged at), ``logged_steps`` (steps with ``loss``); ``final``:
    {name: {step, last, smoothed}} for ``loss``, ``loss_k`` and (with ablated passes)
    ``violation_rate`` (``smoothed``: the last value of the EMA-smoothed curve);
    ``validation``: {name: {last, last_step, best, best_step, best_is}} for ``val_loss_k``,
    the task metrics, ``val_cmp_loss`` and ``val_violation_rate`` (best: min for losses and
    the violation rate, max for accuracy / F1 / exact match; the earliest step on a tie; NaN
    values are skipped); ``tokens_per_second_mean`` and ``pass_tokens_per_second_mean`` (means
    of the logged values, None if absent).
    """
    _check_smoothing(smoothing)
    rows = []
    for run in runs:
        final = {}
        for name in _final_names(run):
            steps, values = run.steps(name), run.values(name)
            final[name] = {"step": steps[-1], "last": values[-1],
                           "smoothed": smooth(values, smoothing)[-1]}
        validation = {}
        for name in sorted(run.series, key=_val_sort_key):
            goal = _val_goal(name)
            if goal is None or not run.series[name]:
                continue
            points = run.series[name]
            valid = [(s, v) for s, v in points if not math.isnan(v)]
            if valid:
                pick = min if goal == "min" else max
                best_value = pick(v for _, v in valid)
                best_step = next(s for s, v in valid if v == best_value)
            else:
                best_value, best_step = None, None
            validation[name] = {"last": points[-1][1], "last_step": points[-1][0],
                                "best": best_value, "best_step": best_step, "best_is": goal}
        all_steps = [s for points in run.series.values() for s, _ in points]
        rows.append({
            "label": run.label,
            "run_dir": str(run.run_dir),
            "sources": [str(p) for p in run.sources],
            "last_step": max(all_steps) if all_steps else None,
            "logged_steps": len(run.series.get("loss", [])),
            "final": final,
            "validation": validation,
            "tokens_per_second_mean": _mean(run.values("tokens_per_second")),
            "pass_tokens_per_second_mean": _mean(run.values("pass_tokens_per_second")),
        })
    return rows


def format_number(value: Optional[float]) -> str:
    """A metric value for a table: 4 decimals below 100, 1 below 1000, thousands separators
    above; "—" for None."""
    if value is None:
        return "—"
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.4f}"


def format_training_summary(rows: Sequence[Dict[str, Any]]) -> str:
    """The summary as a text table: one column per run, one line per value."""
    if not rows:
        return "(no runs)"
    lines: List[Tuple[str, List[str]]] = [
        ("steps (last logged)", [str(r["last_step"]) if r["last_step"] is not None else "—"
                                 for r in rows]),
    ]
    final_names: List[str] = []
    for r in rows:
        final_names += [n for n in r["final"] if n not in final_names]
    final_names.sort(key=lambda n: (n != "loss", n == "violation_rate", n))
    for name in final_names:
        cells = []
        for r in rows:
            f = r["final"].get(name)
            cells.append("—" if f is None else f"{format_number(f['last'])} (smoothed {format_number(f['smoothed'])})")
        lines.append((f"{name} final", cells))
    val_names: List[str] = []
    for r in rows:
        val_names += [n for n in r["validation"] if n not in val_names]
    val_names.sort(key=_val_sort_key)
    for name in val_names:
        last, best = [], []
        for r in rows:
            v = r["validation"].get(name)
            if v is None:
                last.append("—")
                best.append("—")
                continue
            last.append(f"{format_number(v['last'])} @ {v['last_step']}")
            best.append("—" if v["best"] is None else f"{format_number(v['best'])} @ {v['best_step']}")
        goal = next(r["validation"][name]["best_is"] for r in rows if name in r["validation"])
        lines.append((f"{name} last", last))
        lines.append((f"{name} best ({goal})", best))
    lines.append(("tokens/s (mean)", [format_number(r["tokens_per_second_mean"]) for r in rows]))
    if any(r["pass_tokens_per_second_mean"] is not None for r in rows):
        lines.append(("all-pass tokens/s (mean)",
                      [format_number(r["pass_tokens_per_second_mean"]) for r in rows]))
    header = ("", [r["label"] for r in rows])
    table = [header] + lines
    name_width = max(len(name) for name, _ in table)
    widths = [max(len(cells[j]) for _, cells in table) for j in range(len(rows))]
    out = []
    for n, (name, cells) in enumerate(table):
        out.append("  ".join([name.ljust(name_width)] + [c.ljust(w) for c, w in zip(cells, widths)]).rstrip())
        if n == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out)


# ------------------------------------------------------------------------------------ command


PLOT_DESCRIPTION = (
    "Plot the training curves of one or more runs from their metric logs (DiskLogger "
    "log_*.txt or TensorBoard event files): losses per pass, violation rate, validation "
    "metrics and throughput, and write a summary of the final values."
)


def add_plot_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``tune-cmp plot``."""
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="a training run's output_dir (with torchtune_config.yaml and logs)")
    parser.add_argument("--labels", nargs="+", metavar="LABEL", default=None,
                        help="the runs' names on the plots, one per RUN_DIR "
                             "(default: each run directory's name)")
    parser.add_argument("--output-dir", default=None, metavar="DIR",
                        help="where the PNGs and training_summary.json go "
                             "(default: <first RUN_DIR>/plots)")
    parser.add_argument("--smoothing", type=float, default=0.6, metavar="W",
                        help="EMA smoothing weight of the training curves, in [0, 1): 0 draws "
                             "the raw values only (default: 0.6, as TensorBoard)")


def _default_labels(run_dirs: Sequence[Path]) -> List[str]:
    """Each directory's name; where two runs share a name, more of their paths."""
    resolved = [p.expanduser().resolve() for p in run_dirs]
    labels = [p.name or str(p) for p in resolved]
    depth = 1
    while len(set(labels)) < len(labels) and depth < 8:
        depth += 1
        labels = ["/".join(p.parts[-depth:]) for p in resolved]
    return labels


def _write_json(path: Path, data: Any) -> Path:
    text = json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n"
    return write_file(path, lambda tmp: tmp.write_text(text))


def plot_command(args: argparse.Namespace) -> int:
    """``tune-cmp plot``: writes the training figures and ``training_summary.json`` into the
    output folder, prints the summary table and the paths. Returns the exit code: 0 done,
    1 a run could not be read or matplotlib is missing (the JSON and the table are still
    written), 2 bad arguments."""
    run_dirs = [Path(p) for p in args.run_dirs]
    smoothing = getattr(args, "smoothing", 0.6)
    try:
        _check_smoothing(smoothing)
    except ValueError as e:
        print(f"tune-cmp plot: error: --smoothing: {e}", file=sys.stderr)
        return 2
    labels = getattr(args, "labels", None)
    if labels is not None and len(labels) != len(run_dirs):
        print(f"tune-cmp plot: error: --labels gives {len(labels)} label(s) for "
              f"{len(run_dirs)} run director{'y' if len(run_dirs) == 1 else 'ies'}: "
              "give one label per RUN_DIR, in the same order (or none)", file=sys.stderr)
        return 2
    if labels is None:
        labels = _default_labels(run_dirs)
    try:
        runs = [read_run(d, label) for d, label in zip(run_dirs, labels)]
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"tune-cmp plot: error: {e}", file=sys.stderr)
        return 1
    out_dir = Path(args.output_dir) if getattr(args, "output_dir", None) else run_dirs[0] / "plots"
    rows = training_summary(runs, smoothing)
    summary_path = _write_json(out_dir / SUMMARY_FILE, {"smoothing": smoothing, "runs": rows})
    print(format_training_summary(rows))
    print(f"\nsummary: {summary_path}")
    try:
        paths = training_figures(runs, out_dir, smoothing)
    except ImportError as e:
        print(f"tune-cmp plot: error: no figures written: {e}", file=sys.stderr)
        return 1
    if not paths:
        print("no figures: the runs logged none of the plotted metrics")
    for key, path in paths.items():
        print(f"{key}: {path}")
    return 0
