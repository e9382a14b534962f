"""The analysis's pure parts: areas, spreads, attribution summaries, the probe points and the
``analyze`` section's checks (the recipe end to end is in tests/recipes/test_comparative_analyze.py)."""

import math

import pytest
from omegaconf import OmegaConf

from comparative_recipe.analysis.ablation import (
    CURVES,
    HIST_EDGES,
    ProbePoint,
    analysis_config,
    attribution_summary,
    checkpoint_analysis,
    checkpoint_label,
    checkpoint_load,
    probe_points,
    spread,
    trapezoid,
)


def test_trapezoid_and_spread_by_hand():
    assert trapezoid([0.0, 0.1, 0.3], [1.0, 2.0, 4.0]) == pytest.approx(0.1 * 1.5 + 0.2 * 3.0)
    assert trapezoid([0.0], [5.0]) == 0.0
    s = spread([[1.0, 2.0], [3.0, 6.0]])
    assert s["mean"] == [2.0, 4.0] and s["min"] == [1.0, 2.0] and s["max"] == [3.0, 6.0]
    assert s["std"] == pytest.approx([1.0, 2.0])
    assert s["per_seed"] == [[1.0, 2.0], [3.0, 6.0]]


def test_attribution_summary_by_hand():
    # 20 units over 2 layers; mean score 1.0 (total 20)
    layer0 = [10.0, 5.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.0]
    layer1 = [0.0] * 10
    out = attribution_summary([layer0, layer1])
    assert out["units_per_layer"] == [10, 10] and out["layer_total"] == [20.0, 0.0]
    assert out["top10_share"] == pytest.approx(15.0 / 20.0)  # top 2 of 20 units
    assert out["near_zero_fraction"] == pytest.approx(11 / 20)  # the zeros (< 0.01 x mean)
    edges, counts = out["relative_log10_hist"]["edges"], out["relative_log10_hist"]["counts"]
    assert edges == list(HIST_EDGES) and [sum(c) for c in counts] == [10, 10]
    bin_of = lambda x: max(i for i, e in enumerate(edges[:-1]) if x >= e)  # noqa: E731
    assert counts[0][bin_of(math.log10(10.0))] == 1  # log10(10) = 1
    assert counts[0][bin_of(0.0)] == 3  # the three 1.0s
    assert counts[0][bin_of(math.log10(0.5))] == 4
    assert counts[0][0] == 1 and counts[1][0] == 10  # zeros clip into the lowest bin


def _settings(tmp_path, **analyze):
    ckpt = tmp_path / "run" / "best"
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "model.safetensors").write_bytes(b"")
    cfg = OmegaConf.create({
        "output_dir": str(tmp_path / "run"),
        "checkpointer": {"_component_": "x", "checkpoint_dir": str(ckpt),
                         "checkpoint_files": ["model.safetensors"]},
        "validation": {"dataset": {"_component_": "d"}, "batch_size": 8},
        "ablation": {"n_hidden": 1, "hidden": {"rate": 0.1, "granularity": "element", "scale": False}},
        "analyze": analyze,
    })
    return cfg, ckpt


def test_defaults_follow_the_run_and_its_ablation(tmp_path):
    cfg, ckpt = _settings(tmp_path)
    out, s = analysis_config(cfg)
    assert s.checkpoints == [ckpt] and s.labels == ["run/best"]
    assert s.curves == CURVES and s.rates == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
    assert s.crop_rates == (0.0, 0.25, 0.5, 0.75) and s.seeds == (0, 1, 2)
    assert (s.granularity, s.scale) == ("element", False)  # the training's masks
    assert s.output_path == tmp_path / "run" / "analysis" / "ablation.json"
    assert out.validation.batch_size == 8 and out.validation.dataset._component_ == "d"
    # 5 hidden curves x 5 rates + crops x 3 rates, and 2 sites x 3 layers, each x 3 seeds
    points = probe_points(s, num_layers=3)
    assert len(points) == (5 * 5 + 3 + 2 * 3) * 3
    assert ProbePoint("all", 0.3, 2, ("ffn_hidden", "attn_heads", "attn_out", "ffn_out")) in points
    assert ProbePoint("layer", 0.5, 1, ("attn_heads",), 2) in points
    assert not any(p.rate == 0 for p in points)
    assert checkpoint_label(ckpt) == "run/best"


def test_rate_lists_get_the_full_model_anchor(tmp_path):
    cfg, _ = _settings(tmp_path, rates=[0.2, 0.4], crop_rates=[0.5], seeds=4, curves=["all", "crop"],
                       layer_rate=None, attribution=None)
    _, s = analysis_config(cfg)
    assert s.rates == (0.0, 0.2, 0.4) and s.crop_rates == (0.0, 0.5) and s.seeds == (4,)
    assert [(p.curve, p.rate) for p in probe_points(s, 2)] == [("all", 0.2), ("all", 0.4), ("crop", 0.5)]


@pytest.mark.parametrize("analyze, needle", [
    ({"rate": [0.1]}, "did you mean 'rates'"),
    ({"rates": [0.3, 0.1]}, "increasing"),
    ({"rates": [0.1, 1.0]}, "analyze.rates"),
    ({"curves": ["ffn"]}, "analyze.curves"),
    ({"seeds": [1, 1]}, "distinct"),
    ({"labels": ["a", "b"]}, "2 names for 1 checkpoints"),
    ({"checkpoints": ["/nonexistent/ckpt"]}, "is not a directory"),
    ({"layer_rate": 0.0}, "layer_rate 0"),
    ({"layer_rate": None, "attribution": None, "layer_sites": ["ffn_hidden"]}, "would be ignored"),
    ({"attribution": "mean"}, "analyze.attribution"),
    ({"scale": "yes"}, "true or false"),
    ({"name": "a/b"}, "plain file stem"),
    ({"curves": ["ffn_hidden"], "rates": [0.0], "layer_rate": None, "attribution": None},
     "would compute nothing"),
])
def test_bad_analyze_sections_name_the_key(tmp_path, analyze, needle):
    cfg, _ = _settings(tmp_path, **analyze)
    with pytest.raises((ValueError, FileNotFoundError), match=needle):
        analysis_config(cfg)


def test_an_existing_report_is_kept_unless_overwrite(tmp_path):
    cfg, _ = _settings(tmp_path)
    path = tmp_path / "run" / "analysis" / "ablation.json"
    path.parent.mkdir(parents=True)
    path.write_text("{}")
    with pytest.raises(FileExistsError, match="analyze.overwrite=true"):
        analysis_config(cfg)
    cfg.analyze.overwrite = True
    analysis_config(cfg)
    assert path.read_text() == "{}"


def test_checkpoint_folders_load_as_weights_or_as_an_adapter(tmp_path):
    cfg, ckpt = _settings(tmp_path)
    overrides, adapter = checkpoint_load(cfg, ckpt)
    assert adapter is None and overrides == {"checkpoint_dir": str(ckpt),
                                             "checkpoint_files": ["model.safetensors"]}
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_model.pt").write_bytes(b"")
    overrides, adapter = checkpoint_load(cfg, lora)
    assert adapter == lora and "checkpoint_dir" not in overrides  # the configured base


def test_checkpoint_analysis_assembles_curves_from_the_pass_metrics(tmp_path):
    cfg, ckpt = _settings(tmp_path, curves=["ffn_hidden", "crop"], rates=[0.0, 0.5],
                          crop_rates=[0.0, 0.5], seeds=[0, 1], layer_rate=0.5,
                          layer_sites=["ffn_hidden", "attn_heads"], attribution=None)
    _, s = analysis_config(cfg)
    points = probe_points(s, num_layers=2)
    # pass k has loss 1 + k/10 and accuracy 1 - k/10; pass 0 is the full model
    metrics = {"val_samples": 4.0, "val_loss_0": 1.0, "val_accuracy_0": 1.0}
    for k, p in enumerate(points, start=1):
        metrics[f"val_loss_{k}"], metrics[f"val_accuracy_{k}"] = 1 + k / 10, 1 - k / 10
        if p.is_crop:
            metrics[f"val_crop_exhausted_{k}"] = 1.0
    entry = checkpoint_analysis(metrics, points, s, label="x", checkpoint=ckpt, adapter=None,
                                num_layers=2)
    assert entry["full_model"] == {"loss": 1.0, "accuracy": 1.0}
    ffn, crop = entry["curves"]
    assert [p.curve for p in points] == ["ffn_hidden"] * 2 + ["crop"] * 2 + ["layer"] * 8
    assert ffn["metrics"]["loss"]["per_seed"] == [[1.0, 1.1], [1.0, 1.2]]
    assert ffn["metrics"]["loss"]["mean"] == pytest.approx([1.0, 1.15])
    assert ffn["auc"]["loss"]["area"] == pytest.approx(0.5 * (1.0 + 1.15) / 2)
    assert ffn["auc"]["loss"]["above_full"] == pytest.approx(0.5 * 0.15 / 2)
    assert ffn["auc"]["accuracy"]["above_full"] == pytest.approx(-0.5 * 0.15 / 2)
    assert crop["metrics"]["loss"]["per_seed"] == [[1.0, 1.3], [1.0, 1.4]]
    assert crop["crop_exhausted"] == [0.0, 0.25]  # 2 of 2 seeds x 4 samples: 1 each
    layers = entry["layers"]["sites"]["ffn_hidden"]  # points 5..8: (layer 0, 1) x (seed 0, 1)
    assert layers["loss"]["mean"] == pytest.approx([(1.5 + 1.6) / 2, (1.7 + 1.8) / 2])
    assert layers["loss_increase"]["mean"] == pytest.approx([0.55, 0.75])
    heads = entry["layers"]["sites"]["attn_heads"]  # points 9..12: each site has its own
    assert heads["loss"]["mean"] == pytest.approx([(1.9 + 2.0) / 2, (2.1 + 2.2) / 2])
