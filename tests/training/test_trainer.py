"""Pieces of the one training loop that need no model: config-key checks, validation lines."""

import pytest
from omegaconf import OmegaConf

from comparative_recipe.loss import ComparativeLoss
from comparative_recipe.methods.comparative import ComparativeMethod, ComparativeSettings
from comparative_recipe.training.trainer import TRAINER_KEYS, check_config_keys


def test_a_key_nobody_reads_is_an_error_naming_the_closest_key():
    cfg = OmegaConf.create({k: None for k in TRAINER_KEYS} | {"gradient_acumulation_steps": 2})
    with pytest.raises(ValueError, match="'gradient_acumulation_steps' .did you mean "
                                         "'gradient_accumulation_steps'"):
        check_config_keys(cfg, TRAINER_KEYS)
    check_config_keys(OmegaConf.create({"epochs": 1}), TRAINER_KEYS)


def method(n_hidden=0, passes="full"):
    cfg = OmegaConf.create({"seed": 0, "ablation": {"n_hidden": n_hidden}})
    return ComparativeMethod(ComparativeSettings.from_config(cfg), ComparativeLoss(),
                             validation_passes=passes)


def test_validation_line_has_no_verdict_without_ablations_and_shows_accuracy():
    """Regression: with c = 0 the line said '(full model ahead of every ablation)', and it showed
    only losses when the selection metric was accuracy."""
    line = method().describe_validation({"val_loss_0": 0.5, "val_accuracy_0": 0.75,
                                         "val_samples": 8})
    assert line == "loss_0=0.5000 accuracy_0=0.7500"
    line = method(2, "all").describe_validation(
        {"val_loss_0": 0.5, "val_loss_1": 0.7, "val_loss_2": 0.4, "val_samples": 8})
    assert line == "loss_0=0.5000 loss_1=0.7000 loss_2=0.4000 (full model NOT ahead of every ablation)"


def test_settings_that_would_be_ignored_are_errors():
    with pytest.raises(ValueError, match="ablation.n_hidden is 0"):
        ComparativeSettings.from_config(OmegaConf.create({"ablation": {"hidden": {"rate": 0.2}}}))
    with pytest.raises(ValueError, match="ablation.n_input is 0"):
        ComparativeSettings.from_config(OmegaConf.create({"ablation": {"crop": {"rate": 0.2}}}))
    with pytest.raises(ValueError, match="validation.passes"):
        method(passes="some")
