"""The training progress the loop keeps: step and epoch bookkeeping, schedules, best metric."""

import math

import pytest

from comparative_recipe.training.progress import TrainingProgress
from comparative_recipe.training.trainer import steps_per_epoch


def run_epoch(progress, steps, every):
    """The recipes' loop over one epoch: the steps at which ``every`` is due."""
    due = []
    for _ in range(steps):
        progress.finish_step()
        if progress.due(every):
            due.append(progress.global_step)
    progress.finish_epoch()
    return due


def test_schedules_count_global_steps_across_epochs():
    progress = TrainingProgress(seed=0)
    assert run_epoch(progress, 5, every=3) == [3]
    assert (progress.epochs_run, progress.global_step, progress.steps_into_epoch) == (1, 5, 0)
    assert run_epoch(progress, 5, every=3) == [6, 9]
    assert run_epoch(TrainingProgress(seed=0), 5, every=None) == []
    assert run_epoch(TrainingProgress(seed=0), 5, every=0) == []


def test_state_round_trip_and_seed_check():
    progress = TrainingProgress(seed=3)
    run_epoch(progress, 4, every=None)
    progress.finish_step()
    assert progress.record_best({"val_loss_0": 2.0}, "val_loss_0")
    restored = TrainingProgress(seed=3)
    restored.load_state_dict(progress.state_dict())
    assert restored == progress
    with pytest.raises(ValueError, match="resume with seed=3"):
        TrainingProgress(seed=4).load_state_dict(progress.state_dict())


def test_record_best_keeps_the_best_lower_loss_or_higher_accuracy():
    progress = TrainingProgress(seed=0)
    assert progress.record_best({"val_loss_0": 2.0}, "val_loss_0")
    assert not progress.record_best({"val_loss_0": 2.5}, "val_loss_0")
    progress.global_step = 7
    assert progress.record_best({"val_loss_0": 1.5}, "val_loss_0")
    assert progress.best == {"metric": "val_loss_0", "value": 1.5, "step": 7}

    progress = TrainingProgress(seed=0)
    assert progress.record_best({"val_accuracy_0": 0.5}, "val_accuracy_0")
    assert not progress.record_best({"val_accuracy_0": 0.4}, "val_accuracy_0")
    assert progress.record_best({"val_accuracy_0": 0.6}, "val_accuracy_0")
    with pytest.raises(ValueError, match="val_loss_1"):
        progress.record_best({"val_loss_1": 1.0}, "val_loss_1 ")


def test_steps_per_epoch():
    assert steps_per_epoch(10, 3, None) == 3
    assert steps_per_epoch(10, 1, 4) == 4
    with pytest.raises(ValueError, match="no optimizer step"):
        steps_per_epoch(2, 3, None)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        steps_per_epoch(10, 0, None)


def test_a_nan_metric_never_becomes_the_best():
    """Regression: a NaN validation metric counted as an improvement and overwrote best/."""
    progress = TrainingProgress(seed=0)
    assert not progress.record_best({"val_loss_0": math.nan}, "val_loss_0")
    assert progress.best is None
    assert progress.record_best({"val_loss_0": 2.0}, "val_loss_0")
    assert not progress.record_best({"val_loss_0": math.nan}, "val_loss_0")
    assert progress.best["value"] == 2.0


@pytest.mark.parametrize("name,value", [("val_loss_0", 2.0), ("val_accuracy_0", 0.5),
                                        ("val_macro_f1_0", 0.5)])
def test_ties_keep_the_earlier_best_for_losses_and_accuracies_alike(name, value):
    """Regression: on a tie, a loss replaced the best and an accuracy kept it."""
    progress = TrainingProgress(seed=0)
    progress.global_step = 3
    assert progress.record_best({name: value}, name)
    progress.global_step = 6
    assert not progress.record_best({name: value}, name)
    assert progress.best == {"metric": name, "value": value, "step": 3}


def test_macro_f1_is_higher_is_better():
    progress = TrainingProgress(seed=0)
    assert progress.record_best({"val_macro_f1_0": 0.4}, "val_macro_f1_0")
    assert not progress.record_best({"val_macro_f1_0": 0.3}, "val_macro_f1_0")
    assert progress.record_best({"val_macro_f1_0": 0.6}, "val_macro_f1_0")
