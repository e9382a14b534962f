"""Setup pieces both comparative recipes share: checkpointer, resume, data checks, summaries."""

from typing import Any, Dict, Tuple

from omegaconf import DictConfig
from torchtune import config
from torchtune.training import FullModelHFCheckpointer

from comparative_recipe.training.checkpointing import (
    CheckpointManager,
    load_recipe_state,
    weight_files,
)

# How many samples the data checks look at before training starts.
_PROBE_SAMPLES = 64


def instantiate_checkpointer(cfg_checkpointer: DictConfig) -> Any:
    """The configured checkpointer, with a clear message when its files are missing."""
    try:
        return config.instantiate(cfg_checkpointer)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"checkpoint files not found ({e}). Check checkpointer.checkpoint_dir "
            f"({cfg_checkpointer.get('checkpoint_dir')}) and checkpointer.checkpoint_files "
            f"({list(cfg_checkpointer.get('checkpoint_files', []))}): the directory must hold "
            "the weights and config.json of an HF-format model"
        ) from e


def resume_checkpointer(manager: CheckpointManager, configured: Any) -> Tuple[Any, Dict]:
    """An HF checkpointer on the newest complete step checkpoint, and its recipe state."""
    latest = manager.latest()
    if latest is None:
        raise FileNotFoundError(
            f"resume_from_checkpoint=True but {manager.root} holds no complete checkpoint "
            "(a step_<n> directory with recipe_state.pt); start without resume_from_checkpoint"
        )
    checkpointer = FullModelHFCheckpointer(
        checkpoint_dir=str(latest),
        checkpoint_files=weight_files(latest),
        model_type=configured._model_type.name,
        output_dir=str(manager.output_dir),
    )
    return checkpointer, load_recipe_state(latest)


def check_dataset_supports_crops(dataset) -> None:
    """Input-crop steps need samples with droppable chunks: fail before training if none has."""
    n = min(len(dataset), _PROBE_SAMPLES)
    for i in range(n):
        chunk_ids = dataset[i].get("chunk_ids")
        if chunk_ids is not None and max(chunk_ids, default=-1) >= 0:
            return
    raise ValueError(
        f"ablation.n_input > 0 but none of the first {n} samples has a droppable chunk: the "
        "dataset must split its context into chunks (comparative_recipe.data.datasets: "
        "context_qa_dataset, or ComparativeDataset with chunking window/separator/spans), and "
        "the protected spans (protect_leading/protect_trailing) must leave some context; "
        "or set ablation.n_input: 0"
    )


def summarise_validation(metrics: Dict[str, float], step: int) -> str:
    """One log line: the full model's validation loss against each ablation's."""
    n_passes = sum(k.startswith("val_loss_") for k in metrics)
    losses = [metrics[f"val_loss_{k}"] for k in range(n_passes)]
    ahead = all(losses[0] < other for other in losses[1:])
    parts = " ".join(f"loss_{k}={v:.4f}" for k, v in enumerate(losses))
    verdict = "full model ahead of every ablation" if ahead else "full model NOT ahead of every ablation"
    return f"validation at step {step}: {parts} ({verdict})"
