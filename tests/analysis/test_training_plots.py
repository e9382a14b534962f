"""Training curves and the summary of runs logged by torchtune's DiskLogger; `tune-cmp plot`."""

import argparse
import json
import math
import random
import subprocess
import sys

import pytest
from omegaconf import OmegaConf
from torchtune.training.metric_logging import DiskLogger, save_config

from comparative_recipe.analysis.logs import read_run
from comparative_recipe.analysis.training_plots import (
    FIGURE_FILES,
    SUMMARY_FILE,
    X_LABEL,
    add_plot_arguments,
    build_training_figures,
    format_training_summary,
    plot_command,
    training_figures,
    training_summary,
)

STEPS = 40
VAL_EVERY = 10


def _config(run_dir):
    save_config(OmegaConf.create({
        "output_dir": str(run_dir),
        "metric_logger": {"_component_": "torchtune.training.metric_logging.DiskLogger",
                          "log_dir": "${output_dir}/logs"},
    }))


def make_cmp_run(root, name="cmp", c=2, seed=0):
    """A comparative run with c ablated passes, logged as the training loop logs it."""
    rng = random.Random(seed)
    run = root / name
    _config(run)
    logger = DiskLogger(log_dir=str(run / "logs"), filename="log_100.txt")
    for step in range(1, STEPS + 1):
        base = 6.0 * math.exp(-step / 10) + 0.5 + 0.2 * rng.random()
        m = {"loss": base / 2, "cmp_loss": base / 2, "violation_rate": rng.random(),
             "samples": 16.0, "excluded_samples": 0.0, "tokens": 32.0}
        for k in range(c + 1):
            m[f"loss_{k}"] = base + 0.05 * k + 0.02 * rng.random()
            m[f"pass_tokens_{k}"] = 1500.0 - 500 * k
        m["tokens_per_second"] = 200.0 + 50 * rng.random()
        m["pass_tokens_per_second"] = 20000.0 + 5000 * rng.random()
        m["lr"], m["grad_norm"], m["peak_memory_cpu"] = 1e-3, 1.0 + rng.random(), 7e8
        logger.log_dict(m, step=step)
        if step % VAL_EVERY == 0:
            v = {"val_cmp_loss": rng.random(), "val_violation_rate": rng.random(),
                 "val_samples": 256.0}
            for k in range(c + 1):
                v[f"val_loss_{k}"] = 2.0 - step / 40 + 0.1 * k + 0.3 * rng.random()
                v[f"val_accuracy_{k}"] = 0.2 + step / 80 - 0.05 * k + 0.2 * rng.random()
            logger.log_dict(v, step=step)
    logger.close()
    return run


def make_plain_run(root, name="plain", seed=1):
    """A plain run (c = 0): loss_0 and a meaningless violation_rate of 0, no ablations."""
    rng = random.Random(seed)
    run = root / name
    _config(run)
    logger = DiskLogger(log_dir=str(run / "logs"), filename="log_200.txt")
    for step in range(1, STEPS + 1):
        loss = 6.0 * math.exp(-step / 8) + 0.3 + 0.2 * rng.random()
        logger.log_dict({"loss": loss, "cmp_loss": loss, "violation_rate": 0.0, "loss_0": loss,
                         "pass_tokens_0": 1500.0, "tokens_per_second": 400 + 60 * rng.random(),
                         "pass_tokens_per_second": 20000.0 + 3000 * rng.random()}, step=step)
        if step % VAL_EVERY == 0:
            logger.log_dict({"val_samples": 256.0,
                             "val_loss_0": 1.0 - step / 80 + 0.2 * rng.random()}, step=step)
    logger.close()
    return run


@pytest.fixture
def runs(tmp_path):
    return [read_run(make_cmp_run(tmp_path)), read_run(make_plain_run(tmp_path))]


def by_hand_ema(values, w):
    """TensorBoard's debiased EMA, written out: s_t = w s_{t-1} + (1 - w) x_t, / (1 - w^t)."""
    s, out = 0.0, []
    for t, x in enumerate(values, start=1):
        s = w * s + (1 - w) * x
        out.append(s / (1 - w ** t))
    return out


def _legend_texts(ax):
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


def _axes_by_title(fig):
    return {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}


def test_training_figures_writes_readable_pngs(runs, tmp_path):
    mpimg = pytest.importorskip("matplotlib.image")
    import numpy as np

    paths = training_figures(runs, tmp_path / "plots", smoothing=0.6)
    assert set(paths) == {"losses", "violation_rate", "validation", "throughput"}
    for key, path in paths.items():
        assert path == tmp_path / "plots" / FIGURE_FILES[key] and path.stat().st_size > 0
        image = mpimg.imread(path)
        height, width = image.shape[:2]
        assert 500 <= width <= 1300 and height >= 300, (key, image.shape)
        pixels = image.reshape(-1, image.shape[-1])
        assert len(np.unique(pixels, axis=0)) > 20, key  # not a blank, single-colour image
    assert not list((tmp_path / "plots").glob(".*"))  # no temporary files left


def test_every_axes_has_title_step_axis_and_units(runs):
    pytest.importorskip("matplotlib")
    figures = build_training_figures(runs, smoothing=0.6)
    try:
        for key, fig in figures.items():
            visible = [ax for ax in fig.axes if ax.get_visible()]
            assert visible, key
            for ax in visible:
                assert ax.get_title(), key
                assert ax.get_xlabel() == X_LABEL, key
                assert ax.get_ylabel(), key
        losses = _axes_by_title(figures["losses"])
        task = losses["task loss per pass"]
        assert task.get_ylabel() == "task loss (nats per token, sample mean)"
        assert _legend_texts(task) == ["cmp — full model", "cmp — ablation 1", "cmp — ablation 2",
                                       "plain — full model"]
        gap = next(ax for title, ax in losses.items() if title.startswith("ablated pass minus"))
        assert _legend_texts(gap) == ["cmp — ablation 1", "cmp — ablation 2"]
        (violation,) = _axes_by_title(figures["violation_rate"]).values()
        assert violation.get_ylabel() == "fraction of ablated passes"
        assert violation.get_ylim() == pytest.approx((-0.03, 1.03))
        # the plain run has no ablated pass: its logged violation_rate of 0 is not drawn
        assert _legend_texts(violation) == ["cmp — training", "cmp — validation"]
        validation = _axes_by_title(figures["validation"])
        assert set(validation) == {"validation task loss per pass", "validation accuracy"}
        assert "plain — full model" in _legend_texts(validation["validation task loss per pass"])
        assert "plain — full model" not in _legend_texts(validation["validation accuracy"])
        throughput = _axes_by_title(figures["throughput"])
        assert [ax.get_ylabel() for ax in throughput.values()] == [
            "scored tokens / s", "tokens / s (all passes)"]
        assert "tokens processed by all passes" in throughput
    finally:
        import matplotlib.pyplot as plt

        for fig in figures.values():
            plt.close(fig)


def test_curves_are_smoothed_over_faint_raw_values_and_validation_is_not(runs):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    cmp_run = runs[0]
    figures = build_training_figures(runs, smoothing=0.6)
    try:
        task = _axes_by_title(figures["losses"])["task loss per pass"]
        lines = task.get_lines()
        raw = [ln for ln in lines if ln.get_alpha() == pytest.approx(0.25)]
        smoothed = [ln for ln in lines if ln.get_label() == "cmp — ablation 2"]
        assert len(raw) == 4  # one faint raw curve per (run, pass)
        assert list(raw[2].get_ydata()) == cmp_run.values("loss_2")
        assert list(smoothed[0].get_ydata()) == pytest.approx(
            by_hand_ema(cmp_run.values("loss_2"), 0.6))
        assert smoothed[0].get_linestyle() != lines[1].get_linestyle()  # pass by line style
        val = _axes_by_title(figures["validation"])["validation task loss per pass"]
        points = next(ln for ln in val.get_lines() if ln.get_label() == "cmp — ablation 1")
        assert list(points.get_xdata()) == [10, 20, 30, 40]
        assert list(points.get_ydata()) == cmp_run.values("val_loss_1")  # as logged
    finally:
        for fig in figures.values():
            plt.close(fig)
    unsmoothed = build_training_figures(runs, smoothing=0.0)
    try:
        task = _axes_by_title(unsmoothed["losses"])["task loss per pass"]
        assert not [ln for ln in task.get_lines() if ln.get_alpha() == pytest.approx(0.25)]
    finally:
        for fig in unsmoothed.values():
            plt.close(fig)


def test_a_plain_run_alone_has_no_violation_or_gap_plot(runs, tmp_path):
    pytest.importorskip("matplotlib")
    paths = training_figures(runs[1:], tmp_path / "plain_plots")
    assert set(paths) == {"losses", "validation", "throughput"}
    figures = build_training_figures(runs[1:])
    try:
        titles = list(_axes_by_title(figures["losses"]))
        assert titles == ["training objective (loss as optimised)", "task loss per pass"]
    finally:
        import matplotlib.pyplot as plt

        for fig in figures.values():
            plt.close(fig)


def test_training_summary_matches_values_computed_by_hand(runs):
    cmp_run, plain_run = runs
    rows = training_summary(runs, smoothing=0.6)
    assert [r["label"] for r in rows] == ["cmp", "plain"]
    cmp_row, plain_row = rows
    assert cmp_row["last_step"] == STEPS and cmp_row["logged_steps"] == STEPS
    assert set(cmp_row["final"]) == {"loss", "loss_0", "loss_1", "loss_2", "violation_rate"}
    for name in cmp_row["final"]:
        values = cmp_run.values(name)
        assert cmp_row["final"][name]["last"] == values[-1]
        assert cmp_row["final"][name]["step"] == STEPS
        assert cmp_row["final"][name]["smoothed"] == pytest.approx(by_hand_ema(values, 0.6)[-1])
    val = cmp_run.series["val_loss_1"]
    best_step, best = min(val, key=lambda p: p[1])
    assert cmp_row["validation"]["val_loss_1"] == {
        "last": val[-1][1], "last_step": 40, "best": best, "best_step": best_step, "best_is": "min"}
    acc = cmp_run.series["val_accuracy_0"]
    best_step, best = max(acc, key=lambda p: p[1])
    assert cmp_row["validation"]["val_accuracy_0"]["best"] == best
    assert cmp_row["validation"]["val_accuracy_0"]["best_step"] == best_step
    assert cmp_row["validation"]["val_accuracy_0"]["best_is"] == "max"
    assert "val_samples" not in cmp_row["validation"]
    tps = cmp_run.values("tokens_per_second")
    assert cmp_row["tokens_per_second_mean"] == pytest.approx(sum(tps) / len(tps))
    # the plain run: no ablated pass, so no loss_1 and no violation rate
    assert set(plain_row["final"]) == {"loss", "loss_0"}
    assert set(plain_row["validation"]) == {"val_loss_0"}
    assert training_summary(runs, smoothing=0.0)[1]["final"]["loss"]["smoothed"] == \
        plain_run.values("loss")[-1]


def test_summary_best_skips_nan_and_table_shows_every_run(tmp_path):
    run = tmp_path / "nanrun"
    _config(run)
    logger = DiskLogger(log_dir=str(run / "logs"), filename="log_1.txt")
    for step, value in [(10, 0.9), (20, float("nan")), (30, 0.4), (40, 0.6)]:
        logger.log_dict({"loss": 1.0, "val_loss_0": value}, step=step)
    logger.close()
    rows = training_summary([read_run(run)])
    assert rows[0]["validation"]["val_loss_0"]["best"] == 0.4
    assert rows[0]["validation"]["val_loss_0"]["best_step"] == 30
    assert rows[0]["tokens_per_second_mean"] is None
    table = format_training_summary(rows)
    lines = table.splitlines()
    assert lines[0].split() == ["nanrun"]
    assert any(ln.startswith("val_loss_0 best (min)") and "0.4000 @ 30" in ln for ln in lines)
    assert any(ln.startswith("tokens/s (mean)") and "—" in ln for ln in lines)


def _args(argv):
    parser = argparse.ArgumentParser(prog="tune-cmp plot")
    add_plot_arguments(parser)
    return parser.parse_args(argv)


def test_plot_command_end_to_end(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    cmp_dir, plain_dir = make_cmp_run(tmp_path), make_plain_run(tmp_path)
    capsys.readouterr()  # DiskLogger's "Writing logs to ..."
    assert plot_command(_args([str(cmp_dir), str(plain_dir), "--labels", "A", "B"])) == 0
    out = capsys.readouterr().out
    plots = cmp_dir / "plots"  # default: <first RUN_DIR>/plots
    for name in FIGURE_FILES.values():
        assert (plots / name).stat().st_size > 0 and str(plots / name) in out
    summary = json.loads((plots / SUMMARY_FILE).read_text())
    assert summary["smoothing"] == 0.6
    assert [r["label"] for r in summary["runs"]] == ["A", "B"]
    assert summary["runs"][0]["final"]["loss_2"]["last"] == read_run(cmp_dir).values("loss_2")[-1]
    assert out.splitlines()[0].split() == ["A", "B"]  # the table's header
    other = tmp_path / "other"
    assert plot_command(_args([str(plain_dir), "--output-dir", str(other),
                               "--smoothing", "0"])) == 0
    assert sorted(p.name for p in other.iterdir()) == sorted(
        [SUMMARY_FILE, FIGURE_FILES["losses"], FIGURE_FILES["validation"],
         FIGURE_FILES["throughput"]])


def test_plot_command_argument_errors(tmp_path, capsys):
    cmp_dir, plain_dir = make_cmp_run(tmp_path), make_plain_run(tmp_path)
    assert plot_command(_args([str(cmp_dir), str(plain_dir), "--labels", "only_one"])) == 2
    err = capsys.readouterr().err
    assert "--labels gives 1 label(s) for 2 run directories" in err
    for bad in ("1.0", "-0.1", "nan"):
        assert plot_command(_args([str(cmp_dir), "--smoothing", bad])) == 2
        err = capsys.readouterr().err
        assert "--smoothing" in err and "must be in [0, 1)" in err
    assert not (cmp_dir / "plots").exists()
    assert plot_command(_args([str(tmp_path / "missing")])) == 1
    assert "does not exist" in capsys.readouterr().err


def test_plot_command_without_matplotlib_writes_the_json_then_fails(tmp_path, capsys,
                                                                    monkeypatch):
    cmp_dir = make_cmp_run(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    assert plot_command(_args([str(cmp_dir)])) == 1
    captured = capsys.readouterr()
    assert "pip install" in captured.err and "matplotlib" in captured.err
    assert "loss_2 final" in captured.out  # the table is printed
    summary = json.loads((cmp_dir / "plots" / SUMMARY_FILE).read_text())
    assert summary["runs"][0]["label"] == "cmp"
    assert not list((cmp_dir / "plots").glob("*.png"))


def test_modules_import_and_summarise_without_matplotlib(tmp_path):
    run = make_plain_run(tmp_path)
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from comparative_recipe.analysis import logs, training_plots\n"
        f"rows = training_plots.training_summary([logs.read_run({str(run)!r})])\n"
        "assert rows[0]['final']['loss_0']['step'] == 40\n"
        "assert not any(m.startswith('matplotlib') for m in sys.modules if sys.modules[m])\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
