"""Pieces both comparative recipes share: checkpointer, resume, progress, data setup and checks,
the optimizer step and the logged metrics."""

from dataclasses import asdict, dataclass
from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch
from omegaconf import DictConfig
from torch import nn
from torch.distributed.tensor import DTensor
from torchdata.stateful_dataloader import StatefulDataLoader
from torchtune import config, training
from torchtune.training import FullModelHFCheckpointer

from comparative_recipe.passes import metrics_from_sums
from comparative_recipe.tasks import build_task
from comparative_recipe.training.checkpointing import (
    CheckpointManager,
    load_recipe_state,
    weight_files,
)
from comparative_recipe.training.dataloader import build_dataloader, build_eval_dataloader
from comparative_recipe.training.settings import ComparativeSettings

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


class RecipeData(NamedTuple):
    """What a recipe trains and validates on: the task, this rank's training batches and its
    share of the validation set (None without ``validation``)."""

    task: Any
    dataloader: StatefulDataLoader
    val_dataloader: Optional[StatefulDataLoader]


def setup_data(
    cfg: DictConfig,
    tokenizer: Any,
    *,
    settings: ComparativeSettings,
    pad_id: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> RecipeData:
    """The configured datasets, checked, with their task and dataloaders.

    ``seed`` (the run's) shuffles the training order, so a run on one device and one on N ranks
    see the same samples in each global batch.
    """
    dataset = config.instantiate(cfg.dataset, tokenizer)
    if settings.uses_crops:
        check_dataset_supports_crops(dataset)
    task = build_task(cfg.get("task", "sft"), dataset)
    dataloader = build_dataloader(
        dataset, batch_size=cfg.batch_size, shuffle=cfg.shuffle, pad_id=pad_id,
        seed=seed, rank=rank, world_size=world_size,
    )
    val_dataloader = None
    val_cfg = cfg.get("validation", None)
    if val_cfg is not None:
        val_dataloader = build_eval_dataloader(
            config.instantiate(val_cfg.dataset, tokenizer),
            batch_size=val_cfg.get("batch_size", cfg.batch_size),
            pad_id=pad_id, rank=rank, world_size=world_size,
        )
    return RecipeData(task, dataloader, val_dataloader)


def summarise_validation(metrics: Dict[str, float], step: int) -> str:
    """One log line: the full model's validation loss against each ablation's."""
    n_passes = sum(k.startswith("val_loss_") for k in metrics)
    losses = [metrics[f"val_loss_{k}"] for k in range(n_passes)]
    ahead = all(losses[0] < other for other in losses[1:])
    parts = " ".join(f"loss_{k}={v:.4f}" for k, v in enumerate(losses))
    verdict = "full model ahead of every ablation" if ahead else "full model NOT ahead of every ablation"
    return f"validation at step {step}: {parts} ({verdict})"


@dataclass
class TrainingProgress:
    """Where a run is: saved in every checkpoint's recipe state, restored on resume.

    best: the best validation result so far ({"metric", "value", "step"}), or None.
    """

    seed: int
    epochs_run: int = 0
    global_step: int = 0
    steps_into_epoch: int = 0
    best: Optional[Dict[str, Any]] = None

    def state_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(
                f"seed {self.seed} differs from the checkpoint's {state['seed']}: resume with "
                f"seed={state['seed']} (masks and crops are keyed by it)"
            )
        self.epochs_run = state["epochs_run"]
        self.global_step = state["global_step"]
        self.steps_into_epoch = state["steps_into_epoch"]
        self.best = state.get("best")

    def finish_step(self) -> None:
        """An optimizer step is done."""
        self.global_step += 1
        self.steps_into_epoch += 1

    def finish_epoch(self) -> None:
        self.epochs_run += 1
        self.steps_into_epoch = 0

    def due(self, every_n_steps: Optional[int]) -> bool:
        """Whether something done every ``every_n_steps`` optimizer steps (None or 0: never) is
        due after the current step."""
        return bool(every_n_steps) and self.global_step % every_n_steps == 0

    def improves(self, metrics: Dict[str, float], name: str) -> bool:
        """Records ``metrics[name]`` as the best if it is (accuracies higher, losses lower)."""
        if name not in metrics:
            raise ValueError(
                f"validation.metric {name!r} is not computed; choose one of {sorted(metrics)}"
            )
        value, higher_is_better = metrics[name], name.startswith("val_accuracy")
        if self.best is not None and (value > self.best["value"]) != higher_is_better:
            return False
        self.best = {"metric": name, "value": value, "step": self.global_step}
        return True


def steps_per_epoch(n_batches: int, gradient_accumulation_steps: int, max_steps: Optional[int]) -> int:
    """Optimizer steps in an epoch of ``n_batches`` micro-batches (per rank)."""
    if gradient_accumulation_steps < 1:
        raise ValueError(
            f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}"
        )
    steps = n_batches // gradient_accumulation_steps
    if max_steps is not None:
        steps = min(steps, max_steps)
    if steps < 1:
        raise ValueError(
            f"an epoch has no optimizer step: {n_batches} batches per rank with "
            f"gradient_accumulation_steps={gradient_accumulation_steps}"
        )
    return steps


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Optional[Any],
    grad_scale: torch.Tensor,
    clip_grad_norm: Optional[float],
) -> Optional[torch.Tensor]:
    """Scales the accumulated gradients by ``grad_scale``, clips, steps and zeroes.

    Returns the gradient norm before clipping (None without clipping).
    """
    training.scale_grads(model, grad_scale.float())
    grad_norm = None
    if clip_grad_norm is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=float(clip_grad_norm))
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if lr_scheduler is not None:
        lr_scheduler.step()
    return grad_norm


def step_metrics(
    sums: torch.Tensor,
    *,
    with_accuracy: bool,
    seconds: float,
    lr: float,
    grad_norm: Optional[torch.Tensor],
) -> Dict[str, float]:
    """The logged metrics of an optimizer step from its (rank-summed) ``StepResult.sums()``."""
    metrics = metrics_from_sums(sums, with_accuracy=with_accuracy)
    metrics["lr"] = lr
    metrics["tokens_per_second"] = metrics["tokens"] / seconds
    metrics["pass_tokens_per_second"] = (
        sum(v for k, v in metrics.items() if k.startswith("pass_tokens_")) / seconds
    )
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    return metrics
