"""Comparative-loss fine-tuning on several devices and nodes: FSDP2 (torchtune recipe).

The same method as ``comparative_finetune_single_device`` (the comparative step is the library's
``comparative_recipe.passes.comparative_step``), data-parallel with FSDP2 through torchtune's
training utilities, launched by torchrun:

    tune-cmp run --nproc_per_node 8 comparative_finetune_distributed --config ...
    tune-cmp run --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d \\
        --rdzv_endpoint $HEAD:29500 comparative_finetune_distributed --config ...

NCCL on GPUs, gloo on CPU. The loss is normalised globally: per-sample comparative losses summed
over ranks and micro-batches, divided by the global sample count (or scored tokens with
``loss_reduction: token``), so 1 rank x batch 8 and 2 ranks x batch 4 train alike; masks and
crops are keyed by the sample, never by its row or rank.

Extra config keys beyond the single-device recipe: ``fsdp_cpu_offload`` (GPU only),
``fsdp_reshard_after_forward``, ``distributed_timeout_minutes``, ``count_collectives``
(log the collectives and bytes of every optimizer step; a dispatch mode, a little slower).
"""

import contextlib
import sys
import time
from typing import Any, Dict

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch.distributed.elastic.multiprocessing.errors import record
from torchtune import config, modules, training, utils
from torchtune.recipe_interfaces import FTRecipeInterface
from torchtune.training.lr_schedulers import get_lr
from tqdm import tqdm

from comparative_recipe.ablation.hidden import install_hidden_ablation, set_activation_checkpointing
from comparative_recipe.data.collate import collate_padding_idx
from comparative_recipe.data.datasets import validate_vocab
from comparative_recipe.passes import comparative_step, merge_results
from comparative_recipe.training.checkpointing import CheckpointManager
from comparative_recipe.training.costs import CollectiveCounter, peak_memory, reset_peak_memory
from comparative_recipe.training.distributed import (
    all_reduce_sum,
    check_cpu_offload,
    init_process_group,
    set_threads_per_rank,
    shard_model,
)
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


class ComparativeFinetuneRecipeDistributed(FTRecipeInterface):
    """Full fine-tuning with the cross-model comparative loss, data-parallel with FSDP2.

    Every rank runs ``comparative_step`` on its micro-batches; FSDP reduce-scatters the
    gradients (averaging over ranks), and the recipe rescales them by
    ``world_size / global weight`` so the update is that of the global per-sample mean.
    """

    def __init__(self, cfg: DictConfig) -> None:
        self._device = utils.get_device(device=cfg.device)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)
        if self._dtype == torch.float16:
            raise ValueError("fp16 training is not supported; use bf16 or fp32")
        self._fsdp_cpu_offload = cfg.get("fsdp_cpu_offload", False)
        check_cpu_offload(self._fsdp_cpu_offload, self._device)
        self.settings = ComparativeSettings.from_config(cfg)

        self.world_size, self.rank = init_process_group(
            self._device, cfg.get("distributed_timeout_minutes", None)
        )
        self._is_rank_zero = self.rank == 0
        if self._device.type == "cpu":
            set_threads_per_rank()

        self._output_dir = cfg.output_dir
        self._log_every_n_steps = cfg.get("log_every_n_steps", 1)
        self._resume_from_checkpoint = cfg.get("resume_from_checkpoint", False)
        self._gradient_accumulation_steps = cfg.get("gradient_accumulation_steps", 1)
        self._clip_grad_norm = cfg.get("clip_grad_norm", None)
        self._save_every_n_steps = cfg.get("save_every_n_steps", None)
        self.progress = TrainingProgress(seed=training.set_seed(seed=cfg.seed))
        self.total_epochs = cfg.epochs
        self.max_steps_per_epoch = cfg.get("max_steps_per_epoch", None)
        self._collectives = CollectiveCounter() if cfg.get("count_collectives", False) else None

    def setup(self, cfg: DictConfig) -> None:
        if self._is_rank_zero:
            self._metric_logger = config.instantiate(cfg.metric_logger)
            self._metric_logger.log_config(cfg)

        checkpointer = instantiate_checkpointer(cfg.checkpointer)
        self._ckpt = CheckpointManager(
            checkpointer, self._output_dir, keep_last=cfg.get("keep_last_checkpoints", 2)
        )
        if self._is_rank_zero:
            self._ckpt.remove_incomplete()  # left by a run killed while saving
        dist.barrier()
        recipe_state = None
        if self._resume_from_checkpoint:
            checkpointer, recipe_state = resume_checkpointer(self._ckpt, checkpointer)
            self._ckpt.checkpointer = checkpointer
        ckpt_dict = checkpointer.load_checkpoint()

        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._pad_id = collate_padding_idx(self._tokenizer)
        self._model = self._setup_model(cfg, ckpt_dict[training.MODEL_KEY])
        del ckpt_dict

        self._optimizer = config.instantiate(cfg.optimizer, self._model.parameters())
        self._loss_fn = config.instantiate(cfg.loss)
        self._loss_fn.check_num_ablations(self.settings.num_ablations)

        self._task, self._dataloader, self._val_dataloader = setup_data(
            cfg, self._tokenizer, settings=self.settings, pad_id=self._pad_id,
            seed=self.progress.seed, rank=self.rank, world_size=self.world_size,
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
        dist.barrier()

    def _setup_model(self, cfg: DictConfig, state_dict: Dict[str, Any]) -> torch.nn.Module:
        # Built on the meta device, sharded, then each rank loads only its shard of the weights.
        with training.set_default_dtype(self._dtype), torch.device("meta"):
            model = config.instantiate(cfg.model)
        validate_vocab(self._tokenizer, model.tok_embeddings.num_embeddings)
        if cfg.get("compile", False):
            training.compile_model(model, verbose=self._is_rank_zero)
        if cfg.get("enable_activation_checkpointing", False):
            set_activation_checkpointing(
                model, auto_wrap_policy={modules.TransformerSelfAttentionLayer}
            )
        shard_model(
            model,
            cpu_offload=self._fsdp_cpu_offload,
            reshard_after_forward=cfg.get("fsdp_reshard_after_forward", True),
        )
        with training.set_default_dtype(self._dtype), self._device:
            for m in model.modules():
                if hasattr(m, "rope_init"):  # RoPE caches are not in the state dict
                    m.rope_init()
        training.load_from_full_model_state_dict(
            model, state_dict, self._device, strict=True, cpu_offload=self._fsdp_cpu_offload
        )
        training.validate_no_params_on_meta_device(model)
        if self.settings.hidden is not None:
            install_hidden_ablation(model, self.settings.hidden)
        if cfg.get("num_output_chunks", 0):
            model.set_num_output_chunks(cfg.num_output_chunks)
        utils.log_rank_zero(
            log, f"Model sharded over {self.world_size} ranks with precision {self._dtype}."
        )
        return model

    def _load_recipe_state(self, state: Dict[str, Any]) -> None:
        self.progress.load_state_dict(state)
        if self.progress.steps_into_epoch > 0 and state["world_size"] != self.world_size:
            raise ValueError(
                f"the checkpoint was written mid-epoch by {state['world_size']} ranks; resume "
                f"it with {state['world_size']} ranks (this run has {self.world_size}), or from "
                "a checkpoint at an epoch boundary: the data order is split by rank"
            )
        training.load_from_full_optimizer_state_dict(
            self._model, self._optimizer, state["optimizer"], self._device
        )
        if self.progress.steps_into_epoch > 0:
            self._dataloader.load_state_dict(state["dataloader"])

    def save_checkpoint(self) -> None:
        # Gathering is collective; only rank 0 holds the full states and writes them.
        model_state = training.gather_cpu_state_dict(
            self._model, self._is_rank_zero, device=self._device
        )
        optimizer_state = training.get_full_optimizer_state_dict(
            self._model, self._optimizer, self._is_rank_zero, device=self._device
        )
        if self._is_rank_zero:
            state = {
                **self.progress.state_dict(),
                "world_size": self.world_size,
                "optimizer": optimizer_state,
                "dataloader": self._dataloader.state_dict(),  # equal on every rank
            }
            path = self._ckpt.save(self.progress.global_step, model_state, state)
            log.info(f"Checkpoint saved to {path}")
        dist.barrier()

    def validate(self) -> Dict[str, float]:
        s = self.settings
        metrics = evaluate(
            self._model, self._val_dataloader, plan=s.plan, task=self._task,
            loss_fn=self._loss_fn, crop_rate=s.crop_rate, seed=s.seed, pad_id=self._pad_id,
            device=self._device, reduce_sums=all_reduce_sum,
        )
        # metrics are all-reduced: every rank takes the same decision.
        if self.progress.improves(metrics, self._val.get("metric", "val_loss_0")):
            model_state = training.gather_cpu_state_dict(
                self._model, self._is_rank_zero, device=self._device
            )
            if self._is_rank_zero:
                self._ckpt.save_best(model_state, dict(self.progress.best))
            dist.barrier()
        if self._is_rank_zero:
            self._metric_logger.log_dict(metrics, step=self.progress.global_step)
            log.info(summarise_validation(metrics, self.progress.global_step))
        return metrics

    def train(self) -> None:
        s, progress = self.settings, self.progress
        val_every = self._val.get("every_n_steps", None) if self._val is not None else None
        # recompute syncs gradients on the last pass's backward only
        grad_sync = self._model.set_requires_gradient_sync
        self._optimizer.zero_grad()
        for curr_epoch in range(progress.epochs_run, self.total_epochs):
            self._dataloader.sampler.set_epoch(curr_epoch)
            pbar = tqdm(
                total=self._steps_per_epoch, initial=progress.steps_into_epoch,
                disable=not self._is_rank_zero,
            )
            results, t0 = [], time.perf_counter()
            reset_peak_memory(self._device)
            for batch in self._dataloader:
                utils.batch_to_device(batch, self._device)
                with self._counting_collectives():
                    results.append(comparative_step(
                        self._model, batch, plan=s.plan, task=self._task, loss_fn=self._loss_fn,
                        strategy=s.strategy, reduction=s.reduction, crop_rate=s.crop_rate,
                        seed=s.seed, step=progress.global_step, pad_id=self._pad_id,
                        set_grad_sync=grad_sync,
                    ))
                if len(results) < self._gradient_accumulation_steps:
                    continue

                with self._counting_collectives():
                    # One all-reduce carries the global weight and every metric.
                    sums = all_reduce_sum(merge_results(results).sums())
                    # FSDP averaged the gradients over ranks: undo that, divide by the weight.
                    grad_norm = optimizer_step(
                        self._model, self._optimizer, self._lr_scheduler,
                        grad_scale=self.world_size / sums[0].clamp(min=1.0),
                        clip_grad_norm=self._clip_grad_norm,
                    )
                progress.finish_step()

                metrics = step_metrics(
                    sums, with_accuracy=self._task.has_accuracy,
                    seconds=time.perf_counter() - t0, lr=get_lr(self._optimizer),
                    grad_norm=grad_norm,
                )
                metrics[f"peak_memory_{self._device.type}"] = peak_memory(self._device)
                if self._collectives is not None:
                    metrics["collectives"] = self._collectives.count
                    metrics["collective_bytes"] = self._collectives.bytes
                    self._collectives.reset()
                pbar.update(1)
                pbar.set_description(
                    f"{curr_epoch + 1}|{progress.global_step}|cmp_loss: {metrics['cmp_loss']:.4f}"
                    f" loss_0: {metrics['loss_0']:.4f}"
                )
                if self._is_rank_zero and progress.due(self._log_every_n_steps):
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

    def _counting_collectives(self):
        return self._collectives if self._collectives is not None else contextlib.nullcontext()

    def cleanup(self) -> None:
        if self._is_rank_zero:
            self._metric_logger.close()
        dist.destroy_process_group()


@record
@config.parse
def recipe_main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="ComparativeFinetuneRecipeDistributed", cfg=cfg)
    recipe = ComparativeFinetuneRecipeDistributed(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
