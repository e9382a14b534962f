"""Comparative-loss fine-tuning on one device (torchtune recipe).

For every sample the recipe runs the full model and c progressively ablated sub-models (hidden
units masked, input chunks cropped) and trains with a ranking loss that asks the full model to have
the lowest task loss (Zhu et al., "Cross-Model Comparative Loss", TOIS 2024). With c = 0 it is
plain fine-tuning.

    tune-cmp run comparative_finetune_single_device --config demo/tiny_needle_qa

The comparative step itself (views, passes, loss, backward) lives in
``comparative_recipe.passes``; this file is setup -> train loop -> checkpoint.
"""

import sys
import time
from typing import Any, Dict

import torch
from omegaconf import DictConfig
from torchtune import config, modules, training, utils
from torchtune.recipe_interfaces import FTRecipeInterface
from torchtune.training.lr_schedulers import get_lr
from tqdm import tqdm

from comparative_recipe.ablation.hidden import install_hidden_ablation, set_activation_checkpointing
from comparative_recipe.data.collate import collate_padding_idx
from comparative_recipe.data.datasets import validate_vocab
from comparative_recipe.passes import comparative_step, merge_results
from comparative_recipe.training.checkpointing import CheckpointManager
from comparative_recipe.training.costs import peak_memory, reset_peak_memory
from comparative_recipe.training.evaluate import evaluate
from comparative_recipe.training.recipe_utils import (
    TrainingProgress,
    instantiate_checkpointer,
    optimizer_step,
    resume_checkpointer,
    setup_data,
    step_metrics,
    steps_per_epoch,
    summarise_validation,
)
from comparative_recipe.training.settings import ComparativeSettings

log = utils.get_logger("INFO")


class ComparativeFinetuneRecipeSingleDevice(FTRecipeInterface):
    """Full fine-tuning with the cross-model comparative loss on a single device (CPU or GPU).

    Config keys beyond torchtune's ``full_finetune_single_device``: ``ablation`` (n_hidden,
    n_input, order, hidden, crop), ``loss`` (``comparative_recipe.loss.ComparativeLoss``),
    ``task`` (sft | classification), ``strategy`` (sequential | stacked | recompute),
    ``loss_reduction`` (sample | token), ``validation`` (dataset, batch_size, every_n_steps,
    metric), ``save_every_n_steps``, ``keep_last_checkpoints``, ``num_output_chunks``.
    """

    def __init__(self, cfg: DictConfig) -> None:
        self._device = utils.get_device(device=cfg.device)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)
        if self._dtype == torch.float16:
            raise ValueError("fp16 training is not supported; use bf16 or fp32")
        self.settings = ComparativeSettings.from_config(cfg)
        self._output_dir = cfg.output_dir
        self._log_every_n_steps = cfg.get("log_every_n_steps", 1)
        self._resume_from_checkpoint = cfg.get("resume_from_checkpoint", False)
        self._gradient_accumulation_steps = cfg.get("gradient_accumulation_steps", 1)
        self._clip_grad_norm = cfg.get("clip_grad_norm", None)
        self._save_every_n_steps = cfg.get("save_every_n_steps", None)
        self.progress = TrainingProgress(seed=training.set_seed(seed=cfg.seed))
        self.total_epochs = cfg.epochs
        self.max_steps_per_epoch = cfg.get("max_steps_per_epoch", None)

    def setup(self, cfg: DictConfig) -> None:
        self._metric_logger = config.instantiate(cfg.metric_logger)
        self._metric_logger.log_config(cfg)

        checkpointer = instantiate_checkpointer(cfg.checkpointer)
        self._ckpt = CheckpointManager(
            checkpointer, self._output_dir, keep_last=cfg.get("keep_last_checkpoints", 2)
        )
        self._ckpt.remove_incomplete()  # left by a run killed while saving
        recipe_state = None
        if self._resume_from_checkpoint:
            checkpointer, recipe_state = resume_checkpointer(self._ckpt, checkpointer)
            self._ckpt.checkpointer = checkpointer
        ckpt_dict = checkpointer.load_checkpoint()

        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._pad_id = collate_padding_idx(self._tokenizer)
        self._model = self._setup_model(cfg, ckpt_dict[training.MODEL_KEY])

        self._optimizer = config.instantiate(cfg.optimizer, self._model.parameters())
        self._loss_fn = config.instantiate(cfg.loss)
        self._loss_fn.check_num_ablations(self.settings.num_ablations)

        self._task, self._dataloader, self._val_dataloader = setup_data(
            cfg, self._tokenizer, settings=self.settings, pad_id=self._pad_id,
            seed=self.progress.seed,
        )
        self._val = cfg.get("validation", None)

        self._steps_per_epoch = steps_per_epoch(
            len(self._dataloader), self._gradient_accumulation_steps, self.max_steps_per_epoch
        )
        if recipe_state is not None:
            self._load_recipe_state(recipe_state)

        self._lr_scheduler = None
        if cfg.get("lr_scheduler", None) is not None:
            self._lr_scheduler = config.instantiate(
                cfg.lr_scheduler,
                self._optimizer,
                num_training_steps=self.total_epochs * self._steps_per_epoch,
                last_epoch=self.progress.global_step - 1,
            )

    def _setup_model(self, cfg: DictConfig, state_dict: Dict[str, Any]) -> torch.nn.Module:
        with training.set_default_dtype(self._dtype), self._device:
            model = config.instantiate(cfg.model)
        validate_vocab(self._tokenizer, model.tok_embeddings.num_embeddings)
        if cfg.get("compile", False):
            training.compile_model(model)
        if cfg.get("enable_activation_checkpointing", False):
            set_activation_checkpointing(
                model, auto_wrap_policy={modules.TransformerSelfAttentionLayer}
            )
        model.load_state_dict(state_dict)
        training.validate_expected_param_dtype(model.named_parameters(), dtype=self._dtype)
        if self.settings.hidden is not None:
            install_hidden_ablation(model, self.settings.hidden)
        if cfg.get("num_output_chunks", 0):
            model.set_num_output_chunks(cfg.num_output_chunks)
        log.info(f"Model is initialized with precision {self._dtype}.")
        return model

    def _load_recipe_state(self, state: Dict[str, Any]) -> None:
        self.progress.load_state_dict(state)
        self._optimizer.load_state_dict(state["optimizer"])
        if self.progress.steps_into_epoch > 0:
            self._dataloader.load_state_dict(state["dataloader"])

    def save_checkpoint(self) -> None:
        state = {
            **self.progress.state_dict(),
            "optimizer": self._optimizer.state_dict(),
            "dataloader": self._dataloader.state_dict(),
        }
        path = self._ckpt.save(self.progress.global_step, self._model.state_dict(), state)
        log.info(f"Checkpoint saved to {path}")

    def validate(self) -> Dict[str, float]:
        s = self.settings
        metrics = evaluate(
            self._model, self._val_dataloader, plan=s.plan, task=self._task,
            loss_fn=self._loss_fn, crop_rate=s.crop_rate, seed=s.seed, pad_id=self._pad_id,
            device=self._device,
        )
        self._metric_logger.log_dict(metrics, step=self.progress.global_step)
        if self.progress.improves(metrics, self._val.get("metric", "val_loss_0")):
            self._ckpt.save_best(self._model.state_dict(), dict(self.progress.best))
        log.info(summarise_validation(metrics, self.progress.global_step))
        return metrics

    def train(self) -> None:
        s, progress = self.settings, self.progress
        val_every = self._val.get("every_n_steps", None) if self._val is not None else None
        self._optimizer.zero_grad()
        for curr_epoch in range(progress.epochs_run, self.total_epochs):
            self._dataloader.sampler.set_epoch(curr_epoch)
            pbar = tqdm(total=self._steps_per_epoch, initial=progress.steps_into_epoch)
            results, t0 = [], time.perf_counter()
            reset_peak_memory(self._device)
            for batch in self._dataloader:
                utils.batch_to_device(batch, self._device)
                results.append(comparative_step(
                    self._model, batch, plan=s.plan, task=self._task, loss_fn=self._loss_fn,
                    strategy=s.strategy, reduction=s.reduction, crop_rate=s.crop_rate,
                    seed=s.seed, step=progress.global_step, pad_id=self._pad_id,
                ))
                if len(results) < self._gradient_accumulation_steps:
                    continue

                # Gradients hold sum_b weight_b * dL_b: normalise by the step's total weight.
                sums = merge_results(results).sums()
                grad_norm = optimizer_step(
                    self._model, self._optimizer, self._lr_scheduler,
                    grad_scale=1 / sums[0].clamp(min=1.0), clip_grad_norm=self._clip_grad_norm,
                )
                progress.finish_step()

                metrics = step_metrics(
                    sums, with_accuracy=self._task.has_accuracy,
                    seconds=time.perf_counter() - t0, lr=get_lr(self._optimizer),
                    grad_norm=grad_norm,
                )
                metrics[f"peak_memory_{self._device.type}"] = peak_memory(self._device)
                pbar.update(1)
                pbar.set_description(
                    f"{curr_epoch + 1}|{progress.global_step}|cmp_loss: {metrics['cmp_loss']:.4f}"
                    f" loss_0: {metrics['loss_0']:.4f}"
                )
                if progress.due(self._log_every_n_steps):
                    self._metric_logger.log_dict(metrics, step=progress.global_step)

                if progress.due(val_every):
                    self.validate()
                if progress.steps_into_epoch >= self._steps_per_epoch:
                    break  # the epoch's end validates (unless just done) and saves
                if progress.due(self._save_every_n_steps):
                    self.save_checkpoint()
                results, t0 = [], time.perf_counter()
                reset_peak_memory(self._device)
            pbar.close()
            progress.finish_epoch()
            if self._val_dataloader is not None and not progress.due(val_every):
                self.validate()
            self.save_checkpoint()

    def cleanup(self) -> None:
        self._metric_logger.close()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="ComparativeFinetuneRecipeSingleDevice", cfg=cfg)
    recipe = ComparativeFinetuneRecipeSingleDevice(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
