"""Plots and the area-under-curve table of an ablation analysis (the version-1 JSON that
``tune-cmp analyze`` writes to ``<run_dir>/analysis/<name>.json``).

- ``curves_figure``: one panel per curve (a site's hidden units masked, every site together,
  input chunks cropped), the task loss (or a task metric) against the ablation rate, one line
  per checkpoint (mean over seeds) with its min-max band over seeds; one y range for every
  panel so that the curves compare.
- ``layers_figure``: a heatmap of the loss increase when only one layer's units of one site are
  ablated: rows checkpoint x site, columns the layer index.
- ``attribution_figure``: per site, the distribution of unit attribution scores relative to
  the site's mean score (log10), summed over layers, one line per checkpoint.
- ``ablation_figures`` draws whichever of them have data and saves them as PNGs;
  ``auc_rows`` / ``format_auc_table`` give the table ``tune-cmp analyze`` prints.

matplotlib is imported only when a figure is drawn (``plotting.require_matplotlib``).
"""

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from comparative_recipe.analysis.plotting import (
    COLORS,
    FONT_SIZE,
    PANEL_SIZE,
    panel_grid,
    require_matplotlib,
    save_figure,
)

# Curves in panel order, and what each one ablates.
CURVE_TITLES = {
    "ffn_hidden": "FFN hidden units",
    "attn_heads": "attention heads",
    "attn_out": "attention output (residual branch)",
    "ffn_out": "FFN output (residual branch)",
    "all": "all sites together",
    "crop": "input chunks cropped",
}
SITE_TITLES = {k: v for k, v in CURVE_TITLES.items() if k not in ("all", "crop")}
METRIC_LABELS = {
    "loss": "task loss (nats per token)",
    "exact_match": "exact match (fraction)",
    "f1": "token F1 (fraction)",
    "accuracy": "accuracy (fraction)",
    "macro_f1": "macro F1 (fraction)",
}
# The task metric that gets its own curves figure: the first of these the analysis has.
TASK_METRICS = ("exact_match", "accuracy")
METRIC_ORDER = ("loss", "accuracy", "macro_f1", "exact_match", "f1")


def curve_title(name: str) -> str:
    return CURVE_TITLES.get(name, name.replace("_", " "))


def site_title(name: str) -> str:
    return SITE_TITLES.get(name, name.replace("_", " "))


def metric_label(name: str) -> str:
    return METRIC_LABELS.get(name, name.replace("_", " "))


def _checkpoints(analysis: dict) -> List[dict]:
    return list(analysis.get("checkpoints") or [])


def _label(checkpoint: dict, index: int) -> str:
    return str(checkpoint.get("label") or checkpoint.get("checkpoint_dir") or f"checkpoint {index}")


def curve_names(analysis: dict) -> List[str]:
    """Every curve name of any checkpoint: the known ones in ``CURVE_TITLES`` order, then any
    other in the order first seen."""
    seen: List[str] = []
    for ckpt in _checkpoints(analysis):
        for curve in ckpt.get("curves") or []:
            if curve.get("name") not in seen:
                seen.append(curve.get("name"))
    known = [n for n in CURVE_TITLES if n in seen]
    return known + [n for n in seen if n not in CURVE_TITLES]


def _curve(checkpoint: dict, name: str) -> Optional[dict]:
    for curve in checkpoint.get("curves") or []:
        if curve.get("name") == name:
            return curve
    return None


def _has_metric(analysis: dict, metric: str) -> bool:
    return any(
        metric in (curve.get("metrics") or {})
        for ckpt in _checkpoints(analysis) for curve in ckpt.get("curves") or []
    )


def task_metric(analysis: dict) -> Optional[str]:
    """The task metric with its own curves figure (exact_match, else accuracy), or None."""
    for metric in TASK_METRICS:
        if _has_metric(analysis, metric):
            return metric
    return None


def _finite(values) -> List[float]:
    out = []
    for v in values or []:
        if v is None:
            continue
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(v):
            out.append(v)
    return out


def _float(value) -> float:
    return float("nan") if value is None else float(value)


def trapezoid(xs: Sequence[float], ys: Sequence[float]) -> float:
    """The trapezoid-rule area under ``ys`` over ``xs`` (nan if any value is missing)."""
    if len(xs) != len(ys):
        raise ValueError(f"{len(xs)} rates but {len(ys)} values")
    total = 0.0
    for i in range(1, len(xs)):
        total += (float(xs[i]) - float(xs[i - 1])) * (_float(ys[i]) + _float(ys[i - 1])) / 2.0
    return total


# ------------------------------------------------------------------------------------ AUC table


def auc_rows(analysis: dict) -> List[Dict[str, Any]]:
    """One row per (checkpoint, curve, metric), ordered by metric, curve, then checkpoint (so
    that the checkpoints of a curve sit next to each other).

    Keys: label, curve, kind, metric, full (the full model's value: ``full_model``, else the
    curve at rate 0), max_rate, at_max_rate (the mean at the largest rate), area (trapezoid of
    the mean over the rates), above_full (trapezoid of mean - full: the degradation). Areas
    are the analysis' own (``auc``) where it has them, else computed from the mean curve.
    """
    rows: List[Dict[str, Any]] = []
    metrics = [m for m in METRIC_ORDER if _has_metric(analysis, m)]
    metrics += sorted({
        m for ckpt in _checkpoints(analysis) for c in ckpt.get("curves") or []
        for m in (c.get("metrics") or {}) if m not in metrics
    })
    for metric in metrics:
        for name in curve_names(analysis):
            for i, ckpt in enumerate(_checkpoints(analysis)):
                curve = _curve(ckpt, name)
                if curve is None or metric not in (curve.get("metrics") or {}):
                    continue
                rates = [float(r) for r in curve.get("rates") or []]
                mean = [_float(v) for v in curve["metrics"][metric].get("mean") or []]
                if not rates or len(mean) != len(rates):
                    continue
                full = (ckpt.get("full_model") or {}).get(metric)
                full = mean[0] if full is None else float(full)
                stored = (curve.get("auc") or {}).get(metric) or {}
                area = stored.get("area")
                above = stored.get("above_full")
                rows.append({
                    "label": _label(ckpt, i),
                    "curve": name,
                    "kind": curve.get("kind", "crop" if name == "crop" else "hidden"),
                    "metric": metric,
                    "full": full,
                    "max_rate": rates[-1],
                    "at_max_rate": mean[-1],
                    "area": trapezoid(rates, mean) if area is None else float(area),
                    "above_full": (trapezoid(rates, [m - full for m in mean])
                                   if above is None else float(above)),
                })
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


AUC_COLUMNS = (
    ("label", "checkpoint"), ("curve", "curve"), ("metric", "metric"), ("full", "full"),
    ("max_rate", "max rate"), ("at_max_rate", "at max rate"), ("area", "AUC"),
    ("above_full", "AUC above full"),
)


def auc_table_cells(rows: Sequence[Dict[str, Any]]) -> List[List[str]]:
    """The header and the rows of the AUC table as text cells (the terminal and HTML tables)."""
    cells = [[title for _, title in AUC_COLUMNS]]
    for row in rows:
        out = []
        for key, _ in AUC_COLUMNS:
            value = row.get(key, "")
            out.append(f"{value:g}" if key == "max_rate" and isinstance(value, float)
                       else _cell(value))
        cells.append(out)
    return cells


def format_auc_table(rows: Sequence[Dict[str, Any]]) -> str:
    """``auc_rows`` as the aligned text table ``tune-cmp analyze`` prints (text columns left,
    numbers right); a line saying so when there are no rows."""
    if not rows:
        return "no ablation curves in the analysis"
    cells = auc_table_cells(rows)
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]

    def fmt(r):
        return "  ".join(
            c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
        ).rstrip()

    lines = [fmt(cells[0]), fmt(["-" * w for w in widths])]
    previous = None
    for row, r in zip(rows, cells[1:]):
        key = (row["metric"], row["curve"])
        if previous is not None and key != previous and len(_checkpoint_labels(rows)) > 1:
            lines.append("")  # a blank line between curves when several checkpoints compare
        previous = key
        lines.append(fmt(r))
    return "\n".join(lines)


def _checkpoint_labels(rows) -> List[str]:
    out: List[str] = []
    for row in rows:
        if row["label"] not in out:
            out.append(row["label"])
    return out


# ------------------------------------------------------------------------------------ figures


def curves_figure(analysis: dict, metric: str = "loss"):
    """The ablation curves of ``metric``: one panel per curve, one line per checkpoint (mean
    over seeds, with markers) over a shaded min-max band over seeds; a shared y range. None
    when no curve has ``metric``."""
    names = [n for n in curve_names(analysis)
             if any(metric in ((_curve(c, n) or {}).get("metrics") or {})
                    for c in _checkpoints(analysis))]
    if not names:
        return None
    above = {(r["label"], r["curve"]): r["above_full"]
             for r in auc_rows(analysis) if r["metric"] == metric}
    title = f"{metric_label(metric).split(' (')[0]} under ablation"
    samples = analysis.get("samples")
    seeds = (analysis.get("settings") or {}).get("seeds")
    details = []
    if samples:
        details.append(f"{samples} samples")
    if seeds:
        details.append(f"mean over {len(seeds)} seed{'s' if len(seeds) != 1 else ''}, "
                       "band = min-max")
    if details:
        title += " (" + ", ".join(details) + ")"
    fig, axes = panel_grid(len(names), max_cols=2, title=title)
    low, high = math.inf, -math.inf
    for ax, name in zip(axes, names):
        for i, ckpt in enumerate(_checkpoints(analysis)):
            curve = _curve(ckpt, name)
            if curve is None or metric not in (curve.get("metrics") or {}):
                continue
            stats = curve["metrics"][metric]
            rates = [float(r) for r in curve.get("rates") or []]
            mean = [_float(v) for v in stats.get("mean") or []]
            if len(mean) != len(rates) or not rates:
                continue
            color = COLORS[i % len(COLORS)]
            label = _label(ckpt, i)
            auc = above.get((label, name))
            legend = label if auc is None else f"{label} (AUC above full = {auc:.3f})"
            lo = [_float(v) for v in stats.get("min") or []]
            hi = [_float(v) for v in stats.get("max") or []]
            if len(lo) == len(rates) and len(hi) == len(rates):
                ax.fill_between(rates, lo, hi, color=color, alpha=0.18, linewidth=0)
                low, high = min(low, *_finite(lo) or [low]), max(high, *_finite(hi) or [high])
            ax.plot(rates, mean, marker="o", markersize=4, linewidth=1.8, color=color,
                    label=legend)
            low, high = min(low, *_finite(mean) or [low]), max(high, *_finite(mean) or [high])
        ax.set_title(curve_title(name))
        ax.set_xlabel("fraction of input chunks cropped" if name == "crop"
                      else "fraction of units ablated")
        ax.set_ylabel(metric_label(metric))
        ax.legend(loc="best", frameon=False)
    if math.isfinite(low) and math.isfinite(high):
        pad = (high - low) * 0.06 or max(abs(high) * 0.05, 0.05)
        for ax in axes:
            ax.set_ylim(low - pad, high + pad)
    return fig


def _layer_rows(analysis: dict, value_key: str = "loss_increase"):
    """[(checkpoint label, site, [mean per layer], [std per layer])] of every checkpoint with a
    layers section, and the layers' ablation rate."""
    rows, rate = [], None
    for i, ckpt in enumerate(_checkpoints(analysis)):
        layers = ckpt.get("layers")
        if not layers:
            continue
        rate = layers.get("rate", rate)
        for site, data in (layers.get("sites") or {}).items():
            stats = (data or {}).get(value_key) or {}
            mean = [_float(v) for v in stats.get("mean") or []]
            if mean:
                std = [_float(v) for v in stats.get("std") or []]
                rows.append((_label(ckpt, i), site, mean, std))
    return rows, rate


def layers_figure(analysis: dict):
    """A heatmap of the loss increase (nats) when one layer's units of one site are ablated at
    the analysis' layer rate: rows checkpoint x site, columns the layer index, every cell
    annotated. None without layer data."""
    rows, rate = _layer_rows(analysis)
    if not rows:
        return None
    plt = require_matplotlib()
    import numpy as np
    from matplotlib.colors import Normalize, TwoSlopeNorm

    n_layers = max(len(mean) for _, _, mean, _ in rows)
    data = np.full((len(rows), n_layers), np.nan)
    for r, (_, _, mean, _) in enumerate(rows):
        data[r, :len(mean)] = mean
    finite = data[np.isfinite(data)]
    vmin = float(finite.min()) if finite.size else 0.0
    vmax = float(finite.max()) if finite.size else 1.0
    if vmin < 0 < vmax:
        cmap, norm = "RdBu_r", TwoSlopeNorm(vcenter=0.0, vmin=vmin, vmax=vmax)
    else:
        cmap = "YlOrRd" if vmax > 0 else "Blues_r"
        lo, hi = (min(0.0, vmin), max(0.0, vmax))
        norm = Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1e-9)
    labels = [f"{label} · {site_title(site)}" for label, site, _, _ in rows]
    label_width = max(len(s) for s in labels) * 0.075  # inches, roughly, at the tick font
    cell_w = 0.75 if n_layers <= 12 else max(0.32, 9.0 / n_layers)
    width = min(max(label_width + n_layers * cell_w + 1.8, PANEL_SIZE[0] * 1.4), 14.0)
    height = max(2.8, 1.6 + 0.5 * len(rows))
    fig, ax = plt.subplots(figsize=(width, height))
    image = ax.imshow(data, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    ax.grid(False)
    ax.set_xticks(range(n_layers))
    step = 1 if n_layers <= 16 else max(1, n_layers // 16)
    ax.set_xticklabels([str(i) if i % step == 0 else "" for i in range(n_layers)])
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels)
    ax.set_xlabel("layer index")
    for spine in ax.spines.values():
        spine.set_visible(False)
    digits = 3 if n_layers <= 12 else 2
    chars = max(len(f"{v:.{digits}f}") for v in finite) if finite.size else 4
    # the annotation fits its cell: about 0.6 em per character, a little margin
    font = max(5.0, min(FONT_SIZE - 1.0, cell_w * 72 * 0.85 / (0.6 * chars)))
    for r in range(len(rows)):
        for c in range(n_layers):
            v = data[r, c]
            if not np.isfinite(v):
                continue
            rgba = image.cmap(image.norm(v))
            luminance = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]
            text = f"{v:.{digits}f}" if abs(v) < 10 else f"{v:.1f}"
            ax.text(c, r, text, ha="center", va="center", fontsize=font,
                    color="black" if luminance > 0.55 else "white")
    bar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    bar.set_label("loss increase (nats per token)")
    rate_text = "" if rate is None else f" (rate {float(rate):g})"
    ax.set_title(f"task loss increase when only one layer's units\nof one site are ablated"
                 f"{rate_text}")
    return fig


def _attribution_sites(analysis: dict) -> List[str]:
    seen: List[str] = []
    for ckpt in _checkpoints(analysis):
        for site in ((ckpt.get("attribution") or {}).get("sites") or {}):
            if site not in seen:
                seen.append(site)
    known = [s for s in SITE_TITLES if s in seen]
    return known + [s for s in seen if s not in SITE_TITLES]


def attribution_figure(analysis: dict):
    """Per site a panel: the distribution of unit attribution relative to the site's mean
    score (log10), summed over layers, as the fraction of units per bin; one line per
    checkpoint, its legend with the share of the top 10% of units. None without data."""
    sites = _attribution_sites(analysis)
    if not sites:
        return None
    reduce = None
    for ckpt in _checkpoints(analysis):
        reduce = reduce or (ckpt.get("attribution") or {}).get("reduce")
    title = "unit attribution (activation x gradient of the answer log-likelihood)"
    if reduce:
        title += f", {reduce} over tokens"
    fig, axes = panel_grid(len(sites), max_cols=2, title=title)
    for ax, site in zip(axes, sites):
        top = 0.0
        for i, ckpt in enumerate(_checkpoints(analysis)):
            data = ((ckpt.get("attribution") or {}).get("sites") or {}).get(site)
            if not data:
                continue
            hist = data.get("relative_log10_hist") or {}
            edges = [float(e) for e in hist.get("edges") or []]
            counts_per_layer = hist.get("counts") or []
            if len(edges) < 2 or not counts_per_layer:
                continue
            totals = [sum(float(layer[b]) for layer in counts_per_layer if b < len(layer))
                      for b in range(len(edges) - 1)]
            n = sum(totals)
            if n <= 0:
                continue
            fractions = [t / n for t in totals]
            centers = [(edges[b] + edges[b + 1]) / 2 for b in range(len(edges) - 1)]
            color = COLORS[i % len(COLORS)]
            parts = []
            if data.get("top10_share") is not None:
                parts.append(f"top 10% hold {100 * float(data['top10_share']):.0f}%")
            if data.get("near_zero_fraction") is not None:
                parts.append(f"{100 * float(data['near_zero_fraction']):.0f}% near zero")
            label = _label(ckpt, i) + (f" ({', '.join(parts)})" if parts else "")
            ax.plot(centers, fractions, marker="o", markersize=3, linewidth=1.8, color=color,
                    label=label)
            ax.fill_between(centers, 0, fractions, color=color, alpha=0.12, linewidth=0)
            top = max(top, max(fractions))
        ax.axvline(0.0, color="0.4", linewidth=0.8, linestyle="--")
        ax.set_title(site_title(site))
        ax.set_xlabel("unit score / mean score (log10)")
        ax.set_ylabel("fraction of units")
        ax.annotate("mean", (0.0, 0.0), xycoords=("data", "axes fraction"), xytext=(3, 3),
                    textcoords="offset points", fontsize=FONT_SIZE - 2, color="0.35")
        ax.set_ylim(0, top * 1.45 if top > 0 else 1.0)  # headroom for the legend
        ax.legend(loc="upper left", frameon=True, framealpha=0.9, edgecolor="none")
    return fig


def ablation_figures(analysis: dict, out_dir, stem: str = "ablation") -> Dict[str, Path]:
    """Draws the analysis' figures that have data and saves them in ``out_dir``:
    ``<stem>_curves.png`` ("curves"), ``<stem>_curves_<metric>.png`` ("curves_<metric>",
    the task metric: exact_match, else accuracy), ``<stem>_layers.png`` ("layers"),
    ``<stem>_attribution.png`` ("attribution").

    Raises:
        ImportError: matplotlib is missing (the message says how to install it).
    """
    require_matplotlib()
    out_dir = Path(out_dir)
    drawn = [("curves", lambda: curves_figure(analysis, "loss"))]
    metric = task_metric(analysis)
    if metric is not None:
        drawn.append((f"curves_{metric}", lambda: curves_figure(analysis, metric)))
    drawn += [("layers", lambda: layers_figure(analysis)),
              ("attribution", lambda: attribution_figure(analysis))]
    paths: Dict[str, Path] = {}
    for key, draw in drawn:
        fig = draw()
        if fig is not None:
            paths[key] = save_figure(fig, out_dir / f"{stem}_{key}.png")
    return paths
