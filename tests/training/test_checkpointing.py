"""Step checkpoints appear complete or not at all; leftovers of a killed save are cleaned up."""

import os

import pytest
import torch

from comparative_recipe.training.checkpointing import CheckpointManager


class FakeCheckpointer:
    """Writes like torchtune's HF checkpointer (``<output_dir>/epoch_0/``); can die midway."""

    def __init__(self, output_dir, fail=False):
        self.output_dir, self.fail = output_dir, fail

    def save_checkpoint(self, state, epoch, intermediate_checkpoint, adapter_only=False):
        out = self.output_dir / f"epoch_{epoch}"
        out.mkdir(parents=True)
        torch.save(state["model"], out / "model.pt")
        if self.fail:
            raise RuntimeError("disk full")
        (out / "config.json").write_text("{}")


def manager_at(tmp_path, **kwargs):
    manager = CheckpointManager(tmp_path, **kwargs)
    manager.checkpointer = FakeCheckpointer(manager.staging_dir)
    return manager


def test_a_save_that_dies_midway_leaves_no_step_directory(tmp_path):
    manager = manager_at(tmp_path)
    manager.save(1, {"model": {"w": torch.ones(2)}}, {"step": 1})
    manager.checkpointer.fail = True
    with pytest.raises(RuntimeError, match="disk full"):
        manager.save(2, {"model": {"w": torch.zeros(2)}}, {"step": 2})
    assert [p.name for p in manager.root.iterdir()] == ["step_000001"]
    assert manager.latest() == manager.root / "step_000001"
    assert torch.equal(torch.load(manager.latest() / "model.pt")["w"], torch.ones(2))


def test_leftovers_of_a_killed_save_are_removed_and_a_swapped_out_best_restored(tmp_path):
    manager = manager_at(tmp_path)
    manager.save(1, {"model": {"w": torch.ones(2)}}, {"step": 1})
    manager.save_best({"model": {"w": torch.ones(2)}}, {"step": 1})
    # killed while writing the next save, and between moving best/ aside and moving the new one in
    (manager.staging_dir / "epoch_0").mkdir(parents=True)
    os.replace(tmp_path / "best", tmp_path / ".best.old")
    manager.remove_incomplete()
    assert sorted(p.name for p in manager.root.iterdir()) == ["step_000001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".staging", "best", "checkpoints"]
    assert list(manager.staging_dir.iterdir()) == []
    assert (tmp_path / "best" / "model.pt").is_file()


def test_keep_last_prunes_old_steps(tmp_path):
    manager = manager_at(tmp_path, keep_last=2)
    for step in range(1, 5):
        manager.save(step, {"model": {"w": torch.full((2,), float(step))}}, {"step": step})
    assert [p.name for p in manager.step_dirs()] == ["step_000003", "step_000004"]
    # a checkpoint the checkpointer reads from (a resumed run's) is never pruned
    manager.in_use = manager.root / "step_000003"
    for step in range(5, 7):
        manager.save(step, {"model": {"w": torch.full((2,), float(step))}}, {"step": step})
    assert [p.name for p in manager.step_dirs()] == ["step_000003", "step_000005", "step_000006"]
