"""The HTML report of a run: a run directory written by torchtune's DiskLogger, an evaluation
report and an analysis JSON; its sections, its embedded images (decoded here and rendered in
headless Chromium) and its errors."""

import argparse
import base64
import io
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from comparative_recipe.analysis.ablation_plots import auc_rows
from comparative_recipe.analysis.plotting import PLOTS_INSTALL_HINT, REPORT_IMAGE_WIDTH
from comparative_recipe.analysis.report import (
    add_report_arguments,
    report_command,
    write_run_report,
)
from comparative_recipe.evaluation import EvalSettings, evaluation_report
from tests.analysis.test_ablation_plots import make_analysis

pytest.importorskip("matplotlib")

STEPS = 12
# training figures (losses, violation_rate, validation, throughput) + analysis figures
# (curves, curves_exact_match, layers, attribution)
EXPECTED_IMAGES = 4 + 4

CONFIG = """\
# the run's config, as torchtune's save_config writes it; <b>not bold</b> & "quoted"
output_dir: {out}
model:
  _component_: comparative_recipe.models.tiny.tiny_llama
  num_layers: 2
dataset:
  _component_: comparative_recipe.data.needle_qa_dataset
  n_samples: 64
method: comparative
task: sft
ablation:
  n_hidden: 1
  n_input: 1
  hidden:
    rate: 0.1
metric_logger:
  _component_: torchtune.training.metric_logging.DiskLogger
  log_dir: ${{output_dir}}/logs
validation:
  dataset:
    _component_: comparative_recipe.data.needle_qa_dataset
    split: validation
  every_n_steps: 4
"""


def _write_logs(log_dir: Path) -> None:
    from torchtune.training.metric_logging import DiskLogger

    logger = DiskLogger(log_dir=str(log_dir))
    for step in range(1, STEPS + 1):
        loss_0 = 3.0 * math.exp(-step / 5) + 0.5
        logger.log_dict({
            "loss": 0.5 * loss_0 + 0.1 * math.sin(step), "loss_0": loss_0,
            "loss_1": loss_0 + 0.2 + 0.05 * math.cos(step),
            "violation_rate": 0.5 * math.exp(-step / 6) + 0.05 * (step % 3),
            "tokens_per_second": 200.0 + 10 * (step % 4),
        }, step=step)
        if step % 4 == 0:
            logger.log_dict({"val_loss_0": loss_0 + 0.05, "val_loss_1": loss_0 + 0.3}, step=step)
    logger.close()


def _eval_report(run_dir: Path) -> dict:
    cfg = OmegaConf.create({
        "checkpointer": {"_component_": "comparative_recipe.models.tiny.checkpointer",
                         "checkpoint_dir": str(run_dir / "best")},
        "validation": {"dataset": {"_component_": "comparative_recipe.data.needle_qa_dataset"},
                       "passes": "all"},
    })
    metrics = {"val_loss_0": 0.6123, "val_loss_1": 0.8456, "val_loss_2": 0.9012,
               "val_cmp_loss": 0.2345, "val_violation_rate": 0.125, "val_samples": 64.0}
    return evaluation_report(
        metrics, cfg=cfg, settings=EvalSettings(output_path=run_dir / "eval" / "best.json"),
        pass_labels=["full model", "hidden <10%>", "crop 50%"])


@pytest.fixture
def run_dir(tmp_path):
    out = tmp_path / "run"
    (out / "eval").mkdir(parents=True)
    (out / "analysis").mkdir()
    (out / "torchtune_config.yaml").write_text(CONFIG.format(out=out))
    _write_logs(out / "logs")
    (out / "eval" / "best.json").write_text(json.dumps(_eval_report(out), indent=2))
    (out / "analysis" / "ablation.json").write_text(json.dumps(make_analysis(), indent=2))
    return out


def _images(text):
    return re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="([^"]+)"', text)


def _decode(encoded):
    import matplotlib.image as mpimg
    import numpy as np

    pixels = mpimg.imread(io.BytesIO(base64.b64decode(encoded)), format="png")
    flat = pixels.reshape(-1, pixels.shape[2])
    return pixels.shape, len(np.unique(flat, axis=0))


def test_the_report_has_every_section_and_embedded_images(run_dir):
    path = write_run_report(run_dir)
    assert path == run_dir / "report.html"
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    # title with the run dir; every section
    assert f"<title>Run report: {run_dir}</title>" in text
    for anchor in ("run", "final", "training", "eval", "analysis", "config"):
        assert f'<h2 id="{anchor}">' in text
    # the run table
    assert "comparative_recipe.models.tiny.tiny_llama" in text
    assert "<td>method</td><td>comparative</td>" in text
    assert "2 (ablation.n_hidden 1 + ablation.n_input 1)" in text
    assert "comparative_recipe.data.needle_qa_dataset" in text
    assert f"{STEPS} (last step {STEPS})" in text
    # final metrics (training_summary)
    assert "<td>loss_0</td>" in text and "<td>violation_rate</td>" in text
    assert "<td>val_loss_1</td>" in text
    # the evaluation table: every pass, escaped labels, the summary
    assert "<h3>best.json</h3>" in text
    assert "<td>hidden &lt;10%&gt;</td>" in text
    for value in ("0.6123", "0.8456", "0.9012"):
        assert f'<td class="num">{value}</td>' in text
    assert "violation_rate = 0.1250" in text
    assert "the full model is ahead of every ablation" in text
    assert "64 samples" in text
    # the analysis: its AUC table and figures
    assert "<h3>ablation</h3>" in text
    first = auc_rows(make_analysis())[0]
    assert f'<td class="num">{first["above_full"]:.4f}</td>' in text
    assert "Ablation curves: exact match" in text
    assert ("Samples whose crop had nothing left to drop (fraction, per crop rate): "
            "comparative (0: 0.0000, 0.25: 0.0000, 0.5: 0.1000, 0.75: 0.3000)") in text
    # the config, escaped
    assert "&lt;b&gt;not bold&lt;/b&gt; &amp; &quot;quoted&quot;" in text
    assert "<b>not bold</b>" not in text
    # self-contained: no script, no external resource
    assert "<script" not in text.lower()
    assert not re.findall(r'(?:src|href)="(?!data:image/png;base64,|#)', text)
    assert "http://" not in text and "https://" not in text
    # images: embedded PNGs that decode, not one colour, with alt text and width limits
    images = _images(text)
    assert len(images) == EXPECTED_IMAGES == text.count("<img ")
    alts = [alt for _, alt in images]
    assert len(set(alts)) == len(alts)
    assert any(alt.startswith("training plot: Losses") for alt in alts)
    assert "ablation: Unit attribution" in alts
    for encoded, _ in images:
        shape, colours = _decode(encoded)
        assert shape[0] > 100 and shape[1] > 300
        assert colours > 20
    widths = [int(w) for w in re.findall(r'<img [^>]* width="(\d+)"', text)]
    assert len(widths) == EXPECTED_IMAGES
    assert all(0 < w <= REPORT_IMAGE_WIDTH for w in widths)
    assert text.count('style="max-width:100%;height:auto"') == EXPECTED_IMAGES
    # written in one step: no temporary file left
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []


def test_a_run_without_evaluations_or_analyses_says_so(run_dir, tmp_path):
    shutil.rmtree(run_dir / "eval")
    (run_dir / "analysis" / "ablation.json").unlink()
    (run_dir / "analysis" / "broken.json").write_text("{not json")
    out = write_run_report(run_dir, tmp_path / "elsewhere" / "r.html", smoothing=0.0)
    text = out.read_text()
    assert "No evaluation reports in" in text and "tune-cmp eval" in text
    assert "broken.json: not readable JSON" in text
    assert len(_images(text)) == 4  # the training plots only


# ------------------------------------------------------------------------------------ browser


def _chromium():
    for name in ("chromium", "chromium-browser", "chromium-headless-shell", "google-chrome",
                 "headless_shell"):
        found = shutil.which(name)
        if found:
            return found
    return None


PROBE = """
<pre id="probe">pending</pre>
<script>
window.addEventListener("load", function () {
  var out = [];
  var images = document.getElementsByTagName("img");
  for (var i = 0; i < images.length; i++) {
    var img = images[i], entry = {alt: img.alt, complete: img.complete,
      naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight,
      shownWidth: img.getBoundingClientRect().width, colours: -1, error: null};
    try {
      var canvas = document.createElement("canvas");
      canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
      var ctx = canvas.getContext("2d");
      ctx.drawImage(img, 0, 0);
      var data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
      var seen = new Set();
      for (var p = 0; p < data.length; p += 4) {
        seen.add(((data[p] << 16) | (data[p + 1] << 8) | data[p + 2]) * 256 + data[p + 3]);
        if (seen.size > 1000) break;
      }
      entry.colours = seen.size;
    } catch (e) { entry.error = String(e); }
    out.push(entry);
  }
  document.getElementById("probe").textContent = JSON.stringify(out);
});
</script>
"""


def _run_chromium(chromium, tmp_path, *args):
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_the_report_renders_in_headless_chromium(run_dir, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no chromium / chromium-headless-shell on PATH: the browser check needs one "
                    "(apt-get install chromium)")
    report = write_run_report(run_dir)
    text = report.read_text(encoding="utf-8")
    probe_page = tmp_path / "probe.html"
    probe_page.write_text(text.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    result = _run_chromium(chromium, tmp_path, "--dump-dom", "--virtual-time-budget=10000",
                           probe_page.as_uri())
    assert result.returncode == 0, result.stderr[-2000:]
    match = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, re.S)
    assert match, f"no probe in the dumped DOM: {result.stdout[-1000:]}"
    assert match.group(1) != "pending", "the load handler did not run"
    import html

    probe = json.loads(html.unescape(match.group(1)))
    assert len(probe) == EXPECTED_IMAGES
    for entry in probe:
        assert entry["error"] is None, entry
        assert entry["complete"] and entry["naturalWidth"] > 0 and entry["naturalHeight"] > 0, entry
        assert entry["colours"] > 20, f"{entry['alt']} renders (nearly) blank"
        assert 0 < entry["shownWidth"] <= REPORT_IMAGE_WIDTH, entry
    # a screenshot of the page itself (no probe): it draws, and is not blank
    shot = tmp_path / "report.png"
    result = _run_chromium(chromium, tmp_path, f"--screenshot={shot}", "--window-size=1200,2400",
                           "--virtual-time-budget=10000", report.as_uri())
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    shape, colours = _decode(base64.b64encode(shot.read_bytes()))
    assert shape[:2] == (2400, 1200) and colours > 50


# ------------------------------------------------------------------------------------ errors


def test_a_missing_run_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_run_report(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()


def test_a_run_directory_without_logs(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "torchtune_config.yaml").write_text("output_dir: " + str(run) + "\n")
    with pytest.raises(FileNotFoundError) as info:
        write_run_report(run)
    message = str(info.value)
    assert "no metric log files" in message
    assert "DiskLogger" in message and "metric_logger.log_dir" in message
    assert not (run / "report.html").exists()


def test_an_existing_output_is_kept_without_overwrite(run_dir):
    target = run_dir / "report.html"
    target.write_text("keep me")
    with pytest.raises(FileExistsError) as info:
        write_run_report(run_dir, overwrite=False)
    assert str(target) in str(info.value) and "overwrite" in str(info.value)
    assert target.read_text() == "keep me"
    assert write_run_report(run_dir) == target  # overwrite=True (the default) replaces it
    assert target.read_text().startswith("<!DOCTYPE html>")


def test_missing_matplotlib_names_the_install(run_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    with pytest.raises(ImportError) as info:
        write_run_report(run_dir)
    assert str(info.value) == PLOTS_INSTALL_HINT
    assert "comparative_recipe[plots]" in str(info.value)
    assert not (run_dir / "report.html").exists()


def test_report_command(run_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="tune-cmp report")
    add_report_arguments(parser)
    out = tmp_path / "out.html"
    args = parser.parse_args([str(run_dir), "--output", str(out), "--smoothing", "0.3"])
    assert (args.output, args.smoothing, args.overwrite) == (str(out), 0.3, True)
    assert report_command(args) == 0
    assert str(out) in capsys.readouterr().out and out.is_file()
    assert report_command(parser.parse_args([str(run_dir), "--output", str(out),
                                             "--no-overwrite"])) == 1
    assert "already exists" in capsys.readouterr().err
    assert report_command(parser.parse_args([str(tmp_path / "none")])) == 1
    assert "does not exist" in capsys.readouterr().err
    assert report_command(parser.parse_args([str(run_dir), "--smoothing", "1.5"])) == 2
    assert "--smoothing" in capsys.readouterr().err
