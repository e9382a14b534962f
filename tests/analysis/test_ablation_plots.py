"""The ablation analysis' AUC table and figures, from an analysis JSON built here."""

import copy
import json
import math

import pytest

from comparative_recipe.analysis import ablation_plots
from comparative_recipe.analysis.plotting import REPORT_IMAGE_WIDTH
from comparative_recipe.analysis.ablation_plots import (
    CURVE_TITLES,
    ablation_figures,
    attribution_figure,
    auc_rows,
    curves_figure,
    format_auc_table,
    layers_figure,
)

pytest.importorskip("matplotlib")

RATES = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
CROP_RATES = [0.0, 0.25, 0.5, 0.75]
SEEDS = [0, 1, 2]
HIDDEN_CURVES = ("ffn_hidden", "attn_heads", "attn_out", "ffn_out", "all")
# How steeply each curve's loss rises with the rate (the comparative checkpoint: half as much).
SLOPES = {"ffn_hidden": 1.0, "attn_heads": 1.6, "attn_out": 2.2, "ffn_out": 2.8, "all": 4.0,
          "crop": 1.2}
CHECKPOINTS = (("comparative", 0.41, 0.80, 0.5), ("plain", 0.38, 0.84, 1.0))


def _loss(full, slope, name, rate, seed):
    """ffn_hidden: linear in the rate (the trapezoid is exact); others curve upwards. Seeds
    spread around the mean by -1, 0, +1 (rate 0: the full model, the same for every seed)."""
    base = full + slope * rate if name == "ffn_hidden" else full + slope * (rate + 2 * rate ** 2)
    return base + 0.15 * (seed - 1) * rate


def _stats(per_seed):
    columns = list(zip(*per_seed))
    mean = [sum(c) / len(c) for c in columns]
    std = [math.sqrt(sum((v - m) ** 2 for v in c) / len(c)) for c, m in zip(columns, mean)]
    return {"mean": mean, "std": std, "min": [min(c) for c in columns],
            "max": [max(c) for c in columns], "per_seed": [list(s) for s in per_seed]}


def hand_trapezoid(xs, ys):
    area = 0.0
    for i in range(1, len(xs)):
        area += (xs[i] - xs[i - 1]) * (ys[i] + ys[i - 1]) / 2
    return area


def make_analysis(stored_auc_for=("comparative",), num_layers=2):
    """A version-1 analysis of two checkpoints with all six curves, layers and attribution;
    the checkpoints in ``stored_auc_for`` carry the areas (as the engine writes them), the
    others leave them to ``auc_rows``."""
    checkpoints = []
    for label, full_loss, full_em, steep in CHECKPOINTS:
        curves = []
        for name in (*HIDDEN_CURVES, "crop"):
            rates = CROP_RATES if name == "crop" else RATES
            slope = SLOPES[name] * steep
            loss = _stats([[_loss(full_loss, slope, name, r, s) for r in rates] for s in SEEDS])
            em = _stats([[max(0.0, full_em - 0.8 * slope * r + 0.01 * (s - 1) * r)
                          for r in rates] for s in SEEDS])
            f1 = _stats([[max(0.0, full_em + 0.05 - 0.7 * slope * r) for r in rates]
                         for s in SEEDS])
            curve = {"name": name, "kind": "crop" if name == "crop" else "hidden",
                     "sites": [] if name == "crop" else
                     (["ffn_hidden", "attn_heads", "attn_out", "ffn_out"] if name == "all"
                      else [name]),
                     "rates": list(rates),
                     "metrics": {"loss": loss, "exact_match": em, "f1": f1}}
            if name == "crop":
                curve["crop_exhausted"] = [0.0, 0.0, 0.1, 0.3]
            if label in stored_auc_for:
                full = {"loss": full_loss, "exact_match": full_em, "f1": full_em + 0.05}
                curve["auc"] = {
                    m: {"area": hand_trapezoid(rates, curve["metrics"][m]["mean"]),
                        "above_full": hand_trapezoid(
                            rates, [v - full[m] for v in curve["metrics"][m]["mean"]])}
                    for m in ("loss", "exact_match", "f1")}
            curves.append(curve)
        layers = {"rate": 0.5, "num_layers": num_layers, "sites": {}}
        for j, site in enumerate(("ffn_hidden", "attn_heads")):
            increase = [steep * (0.1 + 0.15 * layer + 0.05 * j) for layer in range(num_layers)]
            layers["sites"][site] = {
                "loss": {"mean": [full_loss + v for v in increase], "std": [0.01] * num_layers},
                "loss_increase": {"mean": increase, "std": [0.01] * num_layers}}
        edges = [-3.0 + 0.5 * k for k in range(11)]  # -3 .. 2: 10 bins
        attribution = {"reduce": "sum", "samples": 256, "sites": {}}
        for j, (site, units) in enumerate((("ffn_hidden", 256), ("attn_heads", 4))):
            centre = 6 if steep < 1 else 5
            counts = []
            for layer in range(num_layers):
                weights = [math.exp(-((b - centre) ** 2) / (2.0 + layer + steep))
                           for b in range(10)]
                raw = [int(units * w / sum(weights)) for w in weights]
                raw[centre] += units - sum(raw)
                counts.append(raw)
            attribution["sites"][site] = {
                "units_per_layer": [units] * num_layers,
                "layer_total": [10.0 + layer for layer in range(num_layers)],
                "relative_log10_hist": {"edges": edges, "counts": counts},
                "top10_share": 0.25 + 0.1 * steep + 0.05 * j,
                "near_zero_fraction": 0.02 * steep}
        checkpoints.append({
            "label": label, "checkpoint_dir": f"/tmp/demo_{label[:5]}/best", "adapter": None,
            "full_model": {"loss": full_loss, "exact_match": full_em, "f1": full_em + 0.05},
            "curves": curves, "layers": layers, "attribution": attribution})
    return {
        "version": 1, "created": "2026-12-02T08:30:00+00:00",
        "dataset": {"_component_": "comparative_recipe.data.needle_qa_dataset",
                    "split": "validation"},
        "samples": 256, "task": "sft",
        "settings": {"rates": RATES, "crop_rates": CROP_RATES, "seeds": SEEDS,
                     "granularity": "unit", "scale": True, "layer_rate": 0.5,
                     "layer_sites": ["ffn_hidden", "attn_heads"],
                     "attribution": {"reduce": "sum"}},
        "metrics": ["loss", "exact_match", "f1"],
        "checkpoints": checkpoints,
    }


# ------------------------------------------------------------------------------------ AUC


def test_auc_rows_are_the_trapezoid_of_the_mean_curve():
    analysis = make_analysis(stored_auc_for=())  # every area computed by auc_rows
    rows = auc_rows(analysis)
    assert len(rows) == 2 * 6 * 3  # checkpoints x curves x metrics
    by_key = {(r["label"], r["curve"], r["metric"]): r for r in rows}
    for label, full_loss, full_em, steep in CHECKPOINTS:
        # the linear curve: the trapezoid is exact, loss = full + k r over [0, R]
        k, big_r = SLOPES["ffn_hidden"] * steep, RATES[-1]
        row = by_key[(label, "ffn_hidden", "loss")]
        assert row["above_full"] == pytest.approx(k * big_r ** 2 / 2)
        assert row["area"] == pytest.approx(full_loss * big_r + k * big_r ** 2 / 2)
        assert row["full"] == pytest.approx(full_loss)
        assert row["max_rate"] == big_r
        assert row["at_max_rate"] == pytest.approx(full_loss + k * big_r)
        for name in (*HIDDEN_CURVES, "crop"):
            rates = CROP_RATES if name == "crop" else RATES
            means = [_loss(full_loss, SLOPES[name] * steep, name, r, 1) for r in rates]
            area = 0.0
            for i in range(1, len(rates)):
                area += (rates[i] - rates[i - 1]) * (means[i] + means[i - 1]) / 2
            row = by_key[(label, name, "loss")]
            assert row["area"] == pytest.approx(area)
            assert row["above_full"] == pytest.approx(area - full_loss * rates[-1])
            assert row["above_full"] > 0
            assert row["kind"] == ("crop" if name == "crop" else "hidden")
        # a higher-is-better metric degrades below the full model: a negative area above it
        assert by_key[(label, "all", "exact_match")]["above_full"] < 0
    # the comparative checkpoint rises half as steeply: half the degradation
    for name in (*HIDDEN_CURVES, "crop"):
        assert by_key[("comparative", name, "loss")]["above_full"] == pytest.approx(
            0.5 * by_key[("plain", name, "loss")]["above_full"])


def test_auc_rows_use_the_stored_areas_and_agree_with_the_computed_ones():
    stored = make_analysis(stored_auc_for=("comparative", "plain"))
    computed = make_analysis(stored_auc_for=())
    for a, b in zip(auc_rows(stored), auc_rows(computed)):
        assert (a["label"], a["curve"], a["metric"]) == (b["label"], b["curve"], b["metric"])
        assert a["area"] == pytest.approx(b["area"])
        assert a["above_full"] == pytest.approx(b["above_full"])
    stored["checkpoints"][0]["curves"][0]["auc"]["loss"] = {"area": 9.0, "above_full": 7.0}
    row = next(r for r in auc_rows(stored) if r["label"] == "comparative"
               and r["curve"] == "ffn_hidden" and r["metric"] == "loss")
    assert (row["area"], row["above_full"]) == (9.0, 7.0)


def test_auc_rows_order_and_partial_curves():
    analysis = make_analysis()
    rows = auc_rows(analysis)
    # metric, then curve (panel order), then checkpoint: the checkpoints of a curve adjoin
    assert [r["metric"] for r in rows[:12]] == ["loss"] * 12
    assert [(r["curve"], r["label"]) for r in rows[:4]] == [
        ("ffn_hidden", "comparative"), ("ffn_hidden", "plain"),
        ("attn_heads", "comparative"), ("attn_heads", "plain")]
    # a checkpoint without some curves just has fewer rows
    analysis["checkpoints"][1]["curves"] = analysis["checkpoints"][1]["curves"][:1]
    rows = auc_rows(analysis)
    assert sum(r["label"] == "plain" for r in rows) == 3
    assert auc_rows({"version": 1, "checkpoints": []}) == []


def test_format_auc_table():
    rows = auc_rows(make_analysis())
    text = format_auc_table(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["checkpoint", "curve", "metric", "full", "max", "rate", "at",
                                "max", "rate", "AUC", "AUC", "above", "full"]
    assert set(lines[1]) <= {"-", " "}
    body = [line for line in lines[2:] if line]
    assert len(body) == len(rows)
    first = body[0].split()
    assert first[:3] == ["comparative", "ffn_hidden", "loss"]
    assert float(first[-1]) == pytest.approx(rows[0]["above_full"], abs=1e-4)
    assert float(first[3]) == pytest.approx(0.41)
    assert "0.5" in first  # the max rate
    assert "0.75" in next(line for line in body if " crop " in line).split()
    assert format_auc_table([]) == "no ablation curves in the analysis"


# ------------------------------------------------------------------------------------ figures


def _legend_texts(ax):
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


def test_curves_figure_panels_labels_legends_and_shared_range():
    analysis = make_analysis()
    fig = curves_figure(analysis, "loss")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == [CURVE_TITLES[n] for n in (*HIDDEN_CURVES, "crop")]
    assert [ax.get_title() for ax in axes] == [
        "FFN hidden units", "attention heads", "attention output (residual branch)",
        "FFN output (residual branch)", "all sites together", "input chunks cropped"]
    assert all(ax.get_xlabel() == "fraction of units ablated" for ax in axes[:5])
    assert axes[5].get_xlabel() == "fraction of input chunks cropped"
    assert all(ax.get_ylabel() == "task loss (nats per token)" for ax in axes)
    rows = {(r["label"], r["curve"]): r for r in auc_rows(analysis) if r["metric"] == "loss"}
    for ax, name in zip(axes, (*HIDDEN_CURVES, "crop")):
        assert _legend_texts(ax) == [
            f"comparative (AUC above full = {rows[('comparative', name)]['above_full']:.3f})",
            f"plain (AUC above full = {rows[('plain', name)]['above_full']:.3f})"]
        lines = ax.get_lines()
        assert len(lines) == 2
        xs = list(lines[0].get_xdata())
        assert xs == (CROP_RATES if name == "crop" else RATES)
        assert lines[0].get_marker() == "o"
        assert len(ax.collections) == 2  # a min-max band per checkpoint
    limits = {ax.get_ylim() for ax in axes}
    assert len(limits) == 1  # one y range for all panels
    low, high = limits.pop()
    highest = max(max(c["metrics"]["loss"]["max"]) for ck in analysis["checkpoints"]
                  for c in ck["curves"])
    assert low < 0.38 and high > highest
    assert "256 samples" in fig._suptitle.get_text()
    assert "3 seeds" in fig._suptitle.get_text()
    ablation_plots.require_matplotlib().close(fig)


def test_task_metric_curves_and_their_choice():
    analysis = make_analysis()
    assert ablation_plots.task_metric(analysis) == "exact_match"
    fig = curves_figure(analysis, "exact_match")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert all(ax.get_ylabel() == "exact match (fraction)" for ax in axes)
    assert fig._suptitle.get_text().startswith("exact match under ablation")
    ablation_plots.require_matplotlib().close(fig)
    assert curves_figure(analysis, "accuracy") is None
    for ckpt in analysis["checkpoints"]:
        for curve in ckpt["curves"]:
            curve["metrics"]["accuracy"] = curve["metrics"].pop("exact_match")
    assert ablation_plots.task_metric(analysis) == "accuracy"
    for ckpt in analysis["checkpoints"]:
        for curve in ckpt["curves"]:
            del curve["metrics"]["accuracy"]
    assert ablation_plots.task_metric(analysis) is None


def test_layers_figure_cells_annotations_and_colorbar():
    analysis = make_analysis(num_layers=4)
    fig = layers_figure(analysis)
    ax, bar = fig.axes
    assert "rate 0.5" in ax.get_title()
    assert ax.get_xlabel() == "layer index"
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "comparative · FFN hidden units", "comparative · attention heads",
        "plain · FFN hidden units", "plain · attention heads"]
    assert bar.get_ylabel() == "loss increase (nats per token)"
    image = ax.get_images()[0]
    assert image.get_array().shape == (4, 4)
    texts = [t.get_text() for t in ax.texts]
    assert len(texts) == 16
    expected = analysis["checkpoints"][1]["layers"]["sites"]["attn_heads"]["loss_increase"]
    assert texts[-4:] == [f"{v:.3f}" for v in expected["mean"]]
    ablation_plots.require_matplotlib().close(fig)
    for ckpt in analysis["checkpoints"]:
        ckpt["layers"] = None
    assert layers_figure(analysis) is None


def test_attribution_figure_distribution_and_legend():
    analysis = make_analysis()
    fig = attribution_figure(analysis)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["FFN hidden units", "attention heads"]
    for j, ax in enumerate(axes):
        assert ax.get_xlabel() == "unit score / mean score (log10)"
        assert ax.get_ylabel() == "fraction of units"
        texts = _legend_texts(ax)
        assert len(texts) == 2
        for text, ckpt in zip(texts, analysis["checkpoints"]):
            site = ckpt["attribution"]["sites"][["ffn_hidden", "attn_heads"][j]]
            assert text.startswith(ckpt["label"] + " (top 10% hold ")
            assert f"{100 * site['top10_share']:.0f}%" in text
        line = ax.get_lines()[0]
        assert sum(line.get_ydata()) == pytest.approx(1.0)  # fractions of all units
        assert list(line.get_xdata()) == pytest.approx([-2.75 + 0.5 * k for k in range(10)])
    ablation_plots.require_matplotlib().close(fig)
    for ckpt in analysis["checkpoints"]:
        ckpt["attribution"] = None
    assert attribution_figure(analysis) is None


def _check_png(path):
    import matplotlib.image as mpimg
    import numpy as np

    pixels = mpimg.imread(str(path))
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 400
    flat = pixels.reshape(-1, pixels.shape[2])
    assert len(np.unique(flat, axis=0)) > 20, f"{path} is (nearly) one colour"
    return pixels.shape


def test_ablation_figures_write_decodable_pngs(tmp_path):
    analysis = json.loads(json.dumps(make_analysis()))  # as read back from the JSON file
    paths = ablation_figures(analysis, tmp_path / "figs", stem="ablation")
    assert set(paths) == {"curves", "curves_exact_match", "layers", "attribution"}
    assert paths["curves"].name == "ablation_curves.png"
    assert paths["curves_exact_match"].name == "ablation_curves_exact_match.png"
    assert paths["layers"].name == "ablation_layers.png"
    assert paths["attribution"].name == "ablation_attribution.png"
    for path in paths.values():
        assert path.is_file() and path.parent == tmp_path / "figs"
        height, width, _ = _check_png(path)
        assert width <= 1.2 * REPORT_IMAGE_WIDTH  # drawn for the report, not poster size
    assert not [p for p in (tmp_path / "figs").iterdir() if p.name.startswith(".")]


def test_ablation_figures_skip_what_is_absent(tmp_path):
    analysis = make_analysis()
    for ckpt in analysis["checkpoints"]:
        ckpt["layers"] = ckpt["attribution"] = None
        ckpt["curves"] = [c for c in ckpt["curves"] if c["name"] == "crop"]
        for c in ckpt["curves"]:
            c["metrics"] = {"loss": c["metrics"]["loss"]}
    paths = ablation_figures(analysis, tmp_path, stem="crop_only")
    assert set(paths) == {"curves"}
    assert paths["curves"].name == "crop_only_curves.png"
    _check_png(paths["curves"])
    empty = copy.deepcopy(analysis)
    empty["checkpoints"] = []
    assert ablation_figures(empty, tmp_path / "none") == {}
