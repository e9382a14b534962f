"""Atomic, step-numbered checkpoints in HF format plus the recipe state to resume from.

Layout under ``output_dir``::

    checkpoints/step_000120/   HF weights (torchtune's checkpointer writes them), config.json and
                               the other files of the input checkpoint, recipe_state.pt
    best/                      the weights with the best validation metric so far

A method with modules of its own (``trained_modules``, e.g. early exit's halting heads) adds
``<name>.pt`` to each: the module's full state dict (torchtune keys, CPU tensors).

A LoRA run's checkpoint holds the adapter instead (``adapter_model.pt``, torchtune's keys;
``adapter_model.safetensors`` + ``adapter_config.json``, PEFT's) with ``base_model.json``, and,
unless it saves adapter weights only, the merged weights as a complete HF folder in ``merged/``.

A checkpoint directory is written under a temporary name and renamed into place when complete,
so a run killed at any point leaves either the previous checkpoint or the new one, never half of
one. ``latest()`` only considers directories that hold ``recipe_state.pt``.

The weights are written by the torchtune checkpointer that loaded the model (it knows the model
type and the HF weight map); the trainer builds it with ``output_dir=<output_dir>/.staging``, so
every save lands in a staging directory first and is then moved into place.
"""

import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torchtune import training, utils

RECIPE_STATE_FILE = "recipe_state.pt"
STAGING_DIR = ".staging"
MERGED_DIR = "merged"
_STEP_DIR = re.compile(r"^step_(\d+)$")


@contextlib.contextmanager
def _quiet_torchtune_logs():
    """torchtune's checkpointer logs "Saving final epoch checkpoint" on every save; the manager
    logs what it really saved instead."""
    logger = utils.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _file_mode_from_umask() -> int:
    """The mode ``open()`` gives a new file in this process (``0o666`` less the umask)."""
    try:  # Linux: read the umask without changing it (os.umask is process-wide)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o077)
    os.umask(umask)
    return 0o666 & ~umask


def _fix_weight_permissions(directory: Path) -> None:
    """safetensors 0.8 writes through a temporary file created with mode 0600, whatever the
    umask (safetensors/safetensors#782), so the weights, unlike config.json beside them, could
    be read by their owner only (another user's vLLM or transformers, a container's non-root
    user). Give them the mode any other file written here gets."""
    mode = _file_mode_from_umask()
    for path in directory.glob("*.safetensors"):
        os.chmod(path, mode)


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


def _move_merged_weights(directory: Path) -> None:
    """A LoRA save with merged weights: those go to ``merged/``, a complete HF model folder
    (weights, index, config.json and the input checkpoint's other files); the adapter stays at
    the top. transformers' ``from_pretrained`` applies any adapter_config.json it finds beside
    the weights, so merged weights next to the adapter would get the adapter twice."""
    merged = directory / MERGED_DIR
    merged.mkdir()
    for path in sorted(directory.iterdir()):
        if path == merged or path.name.startswith("adapter_"):
            continue
        if path.name.startswith("model") and path.suffix in (".safetensors", ".bin", ".json"):
            os.replace(path, merged / path.name)  # the weights and their index
        elif path.is_dir():
            shutil.copytree(path, merged / path.name)
        else:
            shutil.copy2(path, merged / path.name)


class CheckpointManager:
    """Saves and finds checkpoints written through a torchtune checkpointer.

    Args:
        output_dir: the run's output directory.
        keep_last: how many step checkpoints to keep (older ones are deleted after a save).

    Attributes:
        checkpointer: the torchtune checkpointer that loaded the model, built with
            ``output_dir=staging_dir``; set it before saving.
        in_use: a checkpoint directory the checkpointer reads from (a resumed one); never pruned.
    """

    def __init__(self, output_dir: str, keep_last: int = 2):
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last_checkpoints must be an integer >= 1, got {keep_last!r}")
        self.output_dir = Path(output_dir)
        self.root = self.output_dir / "checkpoints"
        self.staging_dir = self.output_dir / STAGING_DIR
        self.keep_last = keep_last
        self.checkpointer: Any = None
        self.in_use: Optional[Path] = None

    def _write(self, dst: Path, checkpoint: Dict[str, Any], recipe_state: Optional[Dict],
               files: Optional[Dict[str, Dict]] = None) -> Path:
        if self.checkpointer is None:
            raise RuntimeError("CheckpointManager.checkpointer is not set")
        # torchtune's HF checkpointer converts the weights (and a LoRA run's adapter) and writes
        # them, with config.json and the other files of its input checkpoint, to
        # <its output dir>/epoch_<n>/.
        written = self.staging_dir / "epoch_0"
        shutil.rmtree(written, ignore_errors=True)
        with _quiet_torchtune_logs():
            self.checkpointer.save_checkpoint(
                dict(checkpoint), epoch=0, intermediate_checkpoint=False,
                adapter_only=training.MODEL_KEY not in checkpoint,
            )
        _fix_weight_permissions(written)
        if training.ADAPTER_KEY in checkpoint and training.MODEL_KEY in checkpoint:
            _move_merged_weights(written)
        for name, content in (files or {}).items():
            if callable(content):  # writes the file itself
                content(written / name)
                continue
            text = content if isinstance(content, str) else json.dumps(content, indent=2) + "\n"
            (written / name).write_text(text)
        if recipe_state is not None:
            torch.save(recipe_state, written / RECIPE_STATE_FILE)
        dst.parent.mkdir(parents=True, exist_ok=True)
        _replace_dir(written, dst)
        return dst

    def save_model(self, dst: Path, checkpoint: Dict[str, Any],
                   files: Optional[Dict[str, Any]] = None) -> Path:
        """Writes the weights (and ``files``: ``{name: JSON content, text, or a callable that
        writes the file at the path it is given}``) as a complete
        folder at ``dst``, atomically, replacing one that is there."""
        return self._write(Path(dst), checkpoint, None, files)

    def save(self, step: int, checkpoint: Dict[str, Any], recipe_state: Dict,
             files: Optional[Dict[str, Dict]] = None) -> Path:
        """Writes ``checkpoints/step_<step>`` atomically and prunes old step checkpoints.

        ``checkpoint``: torchtune's checkpoint dict (``{"model": state_dict}``; a LoRA run's
        adds ``"adapter"`` and ``"adapter_config"``, and has no ``"model"`` when it saves the
        adapter alone). ``files``: JSON files to write beside it, ``{name: content}``.
        """
        path = self._write(self.root / f"step_{step:06d}", checkpoint, recipe_state, files)
        for old in self.step_dirs()[: -self.keep_last]:
            if old != self.in_use:
                shutil.rmtree(old, ignore_errors=True)
        return path

    def save_best(self, checkpoint: Dict[str, Any], info: Dict,
                  files: Optional[Dict[str, Dict]] = None) -> Path:
        """Writes ``best/`` (as ``save`` does, plus ``info``: step and validation metric)
        atomically."""
        return self._write(self.output_dir / "best", checkpoint, info, files)

    def remove_incomplete(self) -> None:
        """Cleans up after a run killed while saving: empties the staging directory and restores
        a checkpoint that was swapped out (``.<name>.old``) but not yet replaced."""
        if self.staging_dir.is_dir():
            for p in self.staging_dir.iterdir():
                shutil.rmtree(p) if p.is_dir() else p.unlink()
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
                    else:
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
    """The model weight files of an HF-format checkpoint directory, sorted (a LoRA
    checkpoint's ``adapter_model.*`` files are not model weights)."""
    def found(pattern: str) -> List[str]:
        return sorted(p.name for p in Path(checkpoint_dir).glob(pattern)
                      if not p.name.startswith("adapter_model."))

    files = found("*.safetensors") or found("*.bin")
    if not files:
        raise FileNotFoundError(f"no *.safetensors or *.bin weight files in {checkpoint_dir}")
    return files


def method_state_file(name: str) -> str:
    """The file of a method's module ``name`` in a checkpoint directory."""
    return f"{name}.pt"


def save_method_state(state: Dict[str, torch.Tensor], path: Path) -> None:
    torch.save(dict(state), path)


def load_method_state(module: torch.nn.Module, path: Path) -> None:
    """Loads ``path`` (``save_method_state``'s file) into ``module``; a file written for another
    configuration is an error naming both."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    own = module.state_dict()
    problems = sorted(set(own) ^ set(state))
    problems += [f"{k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} configured"
                 for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if problems:
        raise ValueError(
            f"{path} does not fit the configured {type(module).__name__} "
            f"({'; '.join(str(p) for p in problems[:4])}): use the config the checkpoint was "
            "trained with (its model and method sections), or start without this file"
        )
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def load_recipe_state(checkpoint_dir: Path) -> Dict[str, Any]:
    return torch.load(Path(checkpoint_dir) / RECIPE_STATE_FILE, map_location="cpu", weights_only=False)


def instantiate_checkpointer(cfg_checkpointer: Any, **overrides: Any) -> Any:
    """The configured checkpointer (``overrides`` replace config keys), with a clear message when
    its files are missing."""
    from torchtune import config

    try:
        return config.instantiate(cfg_checkpointer, **overrides)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"checkpoint files not found ({e}). Check checkpointer.checkpoint_dir "
            f"({overrides.get('checkpoint_dir', cfg_checkpointer.get('checkpoint_dir'))}) and "
            f"checkpointer.checkpoint_files "
            f"({list(overrides.get('checkpoint_files', cfg_checkpointer.get('checkpoint_files', [])))}): "
            "the directory must hold the weights and config.json of an HF-format model"
        ) from e
