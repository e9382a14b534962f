"""Atomic, step-numbered checkpoints in HF format plus the recipe state to resume from.

Layout under ``output_dir``::

    checkpoints/step_000120/   HF weights (torchtune's checkpointer writes them), config.json and
                               the other files of the input checkpoint, recipe_state.pt
    best/                      the weights with the best validation metric so far

A checkpoint directory is written under a temporary name and renamed into place when complete,
so a run killed at any point leaves either the previous checkpoint or the new one, never half of
one. ``latest()`` only considers directories that hold ``recipe_state.pt``.
"""

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torchtune import training

RECIPE_STATE_FILE = "recipe_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _replace_dir(src: Path, dst: Path) -> None:
    """Moves directory ``src`` to ``dst``; an existing ``dst`` is swapped out, then deleted."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old)


class CheckpointManager:
    """Saves and finds checkpoints written through a torchtune checkpointer.

    Args:
        checkpointer: the torchtune checkpointer that loaded the model (it knows the model type
            and the weight map needed to write HF-format files).
        output_dir: the run's output directory.
        keep_last: how many step checkpoints to keep (older ones are deleted after a save).
    """

    def __init__(self, checkpointer: Any, output_dir: str, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"keep_last_checkpoints must be >= 1, got {keep_last}")
        self.checkpointer = checkpointer
        self.output_dir = Path(output_dir)
        self.root = self.output_dir / "checkpoints"
        self.keep_last = keep_last

    def _write(self, dst: Path, model_state: Dict[str, torch.Tensor], recipe_state: Optional[Dict]) -> Path:
        dst.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
        try:
            # torchtune's HF checkpointer converts the weights and writes them (with config.json
            # and the other input files) to <its output dir>/epoch_<n>/; point it at staging.
            saved_dir = self.checkpointer._output_dir
            self.checkpointer._output_dir = staging
            try:
                self.checkpointer.save_checkpoint(
                    {training.MODEL_KEY: dict(model_state)}, epoch=0, intermediate_checkpoint=False
                )
            finally:
                self.checkpointer._output_dir = saved_dir
            written = staging / "epoch_0"
            if recipe_state is not None:
                torch.save(recipe_state, written / RECIPE_STATE_FILE)
            _replace_dir(written, dst)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return dst

    def save(self, step: int, model_state: Dict[str, torch.Tensor], recipe_state: Dict) -> Path:
        """Writes ``checkpoints/step_<step>`` atomically and prunes old step checkpoints."""
        path = self._write(self.root / f"step_{step:06d}", model_state, recipe_state)
        for old in self.step_dirs()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def save_best(self, model_state: Dict[str, torch.Tensor], info: Dict) -> Path:
        """Writes ``best/`` (weights plus ``info``: step and validation metric) atomically."""
        return self._write(self.output_dir / "best", model_state, info)

    def remove_incomplete(self) -> None:
        """Cleans up after a run killed while saving: deletes staging directories and restores
        a checkpoint that was swapped out (``.<name>.old``) but not yet replaced."""
        for parent in (self.root, self.output_dir):
            if not parent.is_dir():
                continue
            for p in parent.iterdir():
                if not (p.is_dir() and p.name.startswith(".")):
                    continue
                if p.name.endswith(".old"):
                    target = p.with_name(p.name[1 : -len(".old")])
                    if not target.exists():
                        os.replace(p, target)
                        continue
                if p.name.startswith((".step_", ".best.")):
                    shutil.rmtree(p)

    def step_dirs(self) -> List[Path]:
        """Complete step checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [
            (int(m.group(1)), p)
            for p in self.root.iterdir()
            if (m := _STEP_DIR.match(p.name)) and (p / RECIPE_STATE_FILE).is_file()
        ]
        return [p for _, p in sorted(found)]

    def latest(self) -> Optional[Path]:
        dirs = self.step_dirs()
        return dirs[-1] if dirs else None


def weight_files(checkpoint_dir: Path) -> List[str]:
    """The model weight files of an HF-format checkpoint directory, sorted."""
    files = sorted(p.name for p in Path(checkpoint_dir).glob("*.safetensors"))
    if not files:
        files = sorted(p.name for p in Path(checkpoint_dir).glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors or *.bin weight files in {checkpoint_dir}")
    return files


def load_recipe_state(checkpoint_dir: Path) -> Dict[str, Any]:
    return torch.load(Path(checkpoint_dir) / RECIPE_STATE_FILE, map_location="cpu", weights_only=False)
