"""Reading a run's metric logs back: torchtune's own DiskLogger and TensorBoardLogger files."""

import math
import sys
import time

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torchtune.training.metric_logging import DiskLogger, TensorBoardLogger, save_config

from comparative_recipe.analysis.logs import find_log_files, merge_records, read_run

DISK = "torchtune.training.metric_logging.DiskLogger"
TENSORBOARD = "torchtune.training.metric_logging.TensorBoardLogger"


def write_config(run_dir, log_dir="${output_dir}/logs", component=DISK, output_dir=None):
    """The config a run saves (torchtune's save_config), interpolation unresolved as it is."""
    cfg = OmegaConf.create({
        "output_dir": str(output_dir if output_dir is not None else run_dir),
        "metric_logger": {"_component_": component, "log_dir": log_dir},
        "seed": 0,
    })
    if output_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "torchtune_config.yaml")
    else:
        save_config(cfg)
    return cfg


def disk_log(log_dir, stamp, steps):
    """Writes {step: payload} with torchtune's DiskLogger into log_<stamp>.txt."""
    logger = DiskLogger(log_dir=str(log_dir), filename=f"log_{stamp}.txt")
    for step, payload in steps.items():
        logger.log_dict(payload, step=step)
    logger.close()
    return logger.path_to_log_file()


def test_disk_logger_values_read_back_exactly(tmp_path):
    run = tmp_path / "run"
    write_config(run)
    logged = {
        1: {"loss": 3.1521620750427246, "loss_0": 6.261913299560547, "samples": 16.0,
            "peak_memory_cpu": 714338304, "lr": 1.5e-05, "violation_rate": 1 / 3},
        2: {"loss": float("nan"), "loss_0": float("inf"), "samples": 16.0,
            "peak_memory_cpu": 724803584, "lr": 3e-05, "violation_rate": 0.0,
            "tensor_metric": torch.tensor(0.25), "numpy_metric": np.float64(0.1)},
    }
    disk_log(run / "logs", 100, logged)
    logger = DiskLogger(log_dir=str(run / "logs"), filename="log_100.txt")  # appends
    logger.log("grad_norm", 4.97042989730835, step=2)
    logger.log("grad_norm", -1e-300, step=3)
    logger.close()

    log = read_run(run)
    assert log.label == "run"
    assert log.sources == [run / "logs" / "log_100.txt"]
    assert log.config["metric_logger"]["log_dir"] == str(run / "logs")  # resolved
    for step, payload in logged.items():
        for name, value in payload.items():
            got = dict(log.series[name])[step]
            expected = float(value)
            assert (math.isnan(got) and math.isnan(expected)) or got == expected, name
    assert log.series["grad_norm"] == [(2, 4.97042989730835), (3, -1e-300)]
    assert log.steps("loss") == [1, 2] and log.steps("missing") == []
    assert log.values("lr") == [1.5e-05, 3e-05]
    assert log.final()["peak_memory_cpu"] == 724803584.0
    assert log.final()["grad_norm"] == -1e-300
    assert read_run(run, label="other").label == "other"


def test_resumed_run_merges_files_in_time_order_later_wins(tmp_path):
    run = tmp_path / "run"
    write_config(run)
    # log_999 is earlier than log_1000 although it sorts after it as text
    disk_log(run / "logs", 999, {s: {"loss": float(s), "lr": 0.1} for s in range(1, 6)})
    disk_log(run / "logs", 1000, {s: {"loss": 100.0 + s} for s in range(4, 8)})
    log = read_run(run)
    assert log.sources == [run / "logs" / "log_999.txt", run / "logs" / "log_1000.txt"]
    assert log.series["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 104.0), (5, 105.0),
                                  (6, 106.0), (7, 107.0)]
    assert log.series["lr"] == [(s, 0.1) for s in range(1, 6)]  # only the first file has it
    assert log.final() == {"loss": 107.0, "lr": 0.1}


def test_same_step_twice_in_one_file_keeps_the_later_and_metrics_of_a_step_join(tmp_path):
    run = tmp_path / "run"
    write_config(run)
    path = disk_log(run / "logs", 5, {3: {"loss": 1.0}})
    logger = DiskLogger(log_dir=str(run / "logs"), filename=path.name)
    logger.log_dict({"loss": 2.0}, step=3)
    logger.log_dict({"val_loss_0": 0.5}, step=3)  # validation logs at the training step
    logger.close()
    log = read_run(run)
    assert log.series == {"loss": [(3, 2.0)], "val_loss_0": [(3, 0.5)]}
    assert merge_records([[("a", 2, 1.0), ("a", 1, 5.0)], [("a", 2, 3.0)]]) == {
        "a": [(1, 5.0), (2, 3.0)]
    }


def test_malformed_line_names_file_line_and_text(tmp_path):
    run = tmp_path / "run"
    write_config(run)
    path = run / "logs" / "log_1.txt"
    path.parent.mkdir(parents=True)
    path.write_text("Step 1 | loss:1.0 \nStep two | loss:0.5 \nStep 3 | loss:0.25 \n")
    with pytest.raises(ValueError) as err:
        read_run(run)
    message = str(err.value)
    assert f"{path}:2" in message and "Step two | loss:0.5" in message
    assert "fix or delete" in message


def test_non_numeric_value_is_an_error_naming_the_metric(tmp_path):
    run = tmp_path / "run"
    write_config(run)
    # torchtune writes f"{data}": a 0-d tensor prints as a number, a 1-element one does not
    disk_log(run / "logs", 1, {1: {"loss": 0.5, "acc": torch.tensor([0.5])}})
    with pytest.raises(ValueError) as err:
        read_run(run)
    message = str(err.value)
    assert "log_1.txt:1" in message and "'acc'" in message and "tensor([0.5000])" in message


def test_an_incomplete_last_line_is_skipped_with_a_warning(tmp_path):
    run = tmp_path / "run"
    write_config(run)
    path = run / "logs" / "log_1.txt"
    path.parent.mkdir(parents=True)
    path.write_text("Step 1 | loss:1.0 \nStep 2 | loss:0.5 \nStep 3 | los")  # cut by a crash
    with pytest.warns(UserWarning, match="incomplete last line"):
        log = read_run(run)
    assert log.series == {"loss": [(1, 1.0), (2, 0.5)]}


def test_missing_run_dir_error_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        read_run(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value) and "output_dir" in str(err.value)


def test_run_without_logs_error_says_where_it_looked_and_the_fix(tmp_path):
    run = tmp_path / "run"
    write_config(run)
    with pytest.raises(FileNotFoundError) as err:
        find_log_files(run)
    message = str(err.value)
    assert str(run / "logs") in message
    assert "DiskLogger" in message and "TensorBoardLogger" in message
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no torchtune_config.yaml"):
        read_run(empty)
    # a logger that writes no files (stdout) is named
    stdout = tmp_path / "stdout"
    write_config(stdout, component="torchtune.training.metric_logging.StdoutLogger")
    with pytest.raises(FileNotFoundError, match="StdoutLogger"):
        read_run(stdout)


def test_config_log_dir_elsewhere_is_followed(tmp_path):
    run = tmp_path / "run"
    elsewhere = tmp_path / "shared" / "metrics"
    write_config(run, log_dir=str(elsewhere))
    disk_log(elsewhere, 7, {1: {"loss": 2.0}, 2: {"loss": 1.0}})
    disk_log(run / "logs", 8, {1: {"loss": 99.0}})  # not the configured folder: not read
    log = read_run(run)
    assert log.sources == [elsewhere / "log_7.txt"]
    assert log.series["loss"] == [(1, 2.0), (2, 1.0)]


def test_moved_run_dir_finds_its_logs_under_itself(tmp_path):
    # the config still names the output_dir the run was trained in
    run = tmp_path / "copied_run"
    write_config(run, log_dir=str(tmp_path / "gone" / "logs"), output_dir=tmp_path / "gone")
    disk_log(run / "logs", 1, {1: {"loss": 0.5}})
    assert read_run(run).series == {"loss": [(1, 0.5)]}


def test_without_config_logs_are_searched_under_the_run_dir(tmp_path):
    run = tmp_path / "run"
    disk_log(run / "somewhere" / "deep", 3, {4: {"loss": 0.75}})
    log = read_run(run)
    assert log.config is None
    assert log.sources == [run / "somewhere" / "deep" / "log_3.txt"]
    assert log.series == {"loss": [(4, 0.75)]}


def _f32(x: float) -> float:
    return float(np.float32(x))


def test_tensorboard_logger_values_read_back(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed")
    run = tmp_path / "run"
    write_config(run, component=TENSORBOARD)
    first = TensorBoardLogger(log_dir=str(run / "logs"))  # a run_<rank>_<time> subfolder
    first.log_dict({"loss": 3.25, "loss_0": 6.5, "violation_rate": 1 / 3}, step=1)
    first.log_dict({"loss": 2.5, "loss_0": 5.0, "violation_rate": 0.5}, step=2)
    first.log("val_loss_0", 1.4280415773391724, step=2)
    first.log_dict({"loss": 2.0}, step=3)
    first.close()
    time.sleep(0.01)
    resumed = TensorBoardLogger(log_dir=str(run / "logs"))  # a resume: a new subfolder
    resumed.log_dict({"loss": 1.75, "tokens_per_second": 178.22495706686564}, step=3)
    resumed.close()

    log = read_run(run)
    assert len(log.sources) == 2
    assert all(p.name.startswith("events.out.tfevents.") for p in log.sources)
    assert log.sources[0].parent.name.startswith("run_0_")
    assert log.series["loss"] == [(1, 3.25), (2, 2.5), (3, 1.75)]  # the resumed value wins
    assert log.series["loss_0"] == [(1, 6.5), (2, 5.0)]
    assert log.series["violation_rate"] == [(1, _f32(1 / 3)), (2, 0.5)]  # stored as float32
    assert log.series["val_loss_0"] == [(2, _f32(1.4280415773391724))]
    assert log.series["tokens_per_second"] == [(3, _f32(178.22495706686564))]


def test_event_files_without_tensorboard_say_pip_install(tmp_path, monkeypatch):
    run = tmp_path / "run"
    write_config(run, component=TENSORBOARD)
    folder = run / "logs" / "run_0_1.5"
    folder.mkdir(parents=True)
    (folder / "events.out.tfevents.1.host.1.0").write_bytes(b"")
    for name in [m for m in sys.modules if m == "tensorboard" or m.startswith("tensorboard.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard fails
    with pytest.raises(ImportError, match="pip install tensorboard"):
        read_run(run)
