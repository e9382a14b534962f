"""The training loop, written once for every method, any number of ranks (one included), CPU
and CUDA.

    trainer = Trainer(cfg, method, world)      # checks every config key first
    trainer.setup()                            # data, model (+ FSDP2, AC), optimizer, resume
    trainer.train()                            # the loop
    trainer.close()

The loop owns what every method shares: data loading, gradient accumulation, global
normalisation, clipping, the optimizer and LR schedule, step metrics and the progress bar,
periodic validation with best-checkpoint selection, step checkpoints, exact resume and kill-safe
saves. A method plugs in what is its own (``TrainingMethod``): how the model is prepared, its
step (a batch -> named sums, backward inside) and its metrics. ``World`` hides how many ranks
there are. A LoRA / QLoRA model builder makes it adapter fine-tuning for any method
(``adapters.LoRAAdapters``: frozen base, adapter checkpoints in torchtune's and PEFT's format).

Global normalisation: each micro-batch back-propagates an unnormalised sum; one all-reduce per
optimizer step carries every named sum, and gradients are scaled by
``world_size / sums[method.normaliser]`` (FSDP averages gradients over ranks), so 1 rank x 8,
2 ranks x 4 and 2 ranks x 2 x 2 accumulation steps train alike.
"""

import contextlib
import difflib
import functools
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Protocol

import torch
from omegaconf import DictConfig
from torch import nn
from torch.distributed.tensor import DTensor
from torchtune import config, modules, training, utils
from torchtune.training.lr_schedulers import get_lr
from tqdm import tqdm

from comparative_recipe.ablation.hidden import set_activation_checkpointing
from comparative_recipe.data.collate import collate_padding_idx
from comparative_recipe.data.subset import ExampleSubset
from comparative_recipe.data.tokenizer_utils import validate_vocab
from comparative_recipe.training.adapters import LoRAAdapters
from comparative_recipe.training.checkpointing import (
    CheckpointManager,
    instantiate_checkpointer,
    load_method_state,
    load_recipe_state,
    method_state_file,
    save_method_state,
    weight_files,
)
from comparative_recipe.training.costs import CollectiveCounter, peak_memory, reset_peak_memory
from comparative_recipe.training.dataloader import RecipeData, build_eval_dataloader, setup_data
from comparative_recipe.training.distributed import World
from comparative_recipe.training.progress import TrainingProgress
from comparative_recipe.training.sums import HostValue, Sums

log = utils.get_logger("INFO")

# Top-level config keys the loop reads. Anything else must be read by the method or the world,
# or it is an error (a key that would be ignored).
TRAINER_KEYS = frozenset({
    "output_dir", "tokenizer", "model", "checkpointer", "resume_from_checkpoint", "dataset",
    "seed", "shuffle", "batch_size", "validation", "optimizer", "lr_scheduler", "epochs",
    "max_steps_per_epoch", "gradient_accumulation_steps", "clip_grad_norm", "save_every_n_steps",
    "keep_last_checkpoints", "device", "dtype", "enable_activation_checkpointing", "compile",
    "metric_logger", "log_every_n_steps", "num_output_chunks", "save_adapter_weights_only",
})
VALIDATION_KEYS = frozenset({"dataset", "batch_size", "every_n_steps", "metric"})


class TrainingMethod(Protocol):
    """What a training method brings to the loop.

    config_keys / validation_keys: the top-level and ``validation`` config keys it reads.
    normaliser: the name of the sum that divides the accumulated gradients.
    default_metric: the validation metric that selects the best checkpoint by default.

    Optional: ``set_tokenizer(tokenizer)``, called with the run's tokenizer before ``prepare``
    when the method has it (e.g. to decode generated answers); ``validation_metric_names()``,
    the names ``validation_metrics`` returns, so that a ``validation.metric`` nothing computes
    is an error before training; ``trained_modules()`` (after ``prepare``), modules of the
    method's own that train with the model (e.g. halting heads): the loop optimises, shards,
    clips and saves them beside the model (``<name>.pt`` in every checkpoint) and loads them
    back on resume, on evaluation and from a starting checkpoint that has them.
    """

    config_keys: frozenset
    validation_keys: frozenset
    normaliser: str
    default_metric: str

    def prepare(self, model: nn.Module, data: RecipeData) -> None:
        """Readies the (loaded, possibly sharded) model for this method: hooks, heads, ..."""

    def train_step(self, model: nn.Module, batch: Dict[str, torch.Tensor], step: int,
                   set_grad_sync=None) -> Sums:
        """Forward and backward of one micro-batch; returns its named sums (detached)."""

    def validation_step(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> Sums:
        """Forward of one validation batch without gradients; returns its named sums."""

    def step_metrics(self, sums: Dict[str, Any], seconds: float) -> Dict[str, float]:
        """Logged metrics of an optimizer step from its summed host sums."""

    def validation_metrics(self, sums: Dict[str, Any]) -> Dict[str, float]:
        """Validation metrics (without the ``val_`` prefix) from the summed host sums."""

    def describe_validation(self, metrics: Dict[str, float]) -> str:
        """One log line about a validation's metrics (with their ``val_`` prefix)."""


def check_config_keys(cfg: Mapping, allowed: Iterable[str], where: str = "the config") -> None:
    """A key nobody reads is an error naming the closest valid key, before anything runs."""
    allowed = sorted(set(allowed))
    unknown = [k for k in cfg if k not in allowed]
    if not unknown:
        return
    hints = []
    for k in unknown:
        close = difflib.get_close_matches(k, allowed, n=1)
        hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ValueError(
        f"{where} has keys this recipe does not read: {', '.join(hints)}. Remove them or fix "
        f"their names; the keys it reads are {allowed}"
    )


def mismatch_message(cfg: DictConfig, error: Exception) -> str:
    """The error of a checkpoint whose weights do not fit the configured model."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()][1:6]
    return (
        f"the checkpoint in {cfg.checkpointer.get('checkpoint_dir')} does not match the model "
        f"config ({cfg.model.get('_component_')}): {'; '.join(lines)}. Use the config the "
        "checkpoint was written with (a pruned model: the torchtune_config.yaml beside it), or "
        "fix model.* to the checkpoint's sizes (its config.json)"
    )


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


class Trainer:
    """One training run of ``method`` on ``world`` as ``cfg`` describes (see the module doc).

    Validation (``validation`` section): ``every_n_steps`` set, it runs on that cadence only;
    unset, at the end of every epoch. ``metric`` (default ``method.default_metric``) selects the
    checkpoint written to ``output_dir/best``: strictly better values only (a tie keeps the
    earlier one, a NaN never wins).
    """

    def __init__(self, cfg: DictConfig, method: TrainingMethod, world: World,
                 world_keys: Iterable[str] = ()) -> None:
        check_config_keys(cfg, TRAINER_KEYS | method.config_keys | set(world_keys))
        val = cfg.get("validation", None)
        if val is not None:
            check_config_keys(val, VALIDATION_KEYS | method.validation_keys, "validation")
        self.cfg, self.method, self.world = cfg, method, world
        # LoRA / QLoRA when the model builder has adapters (checked here, before anything runs)
        self.adapters = LoRAAdapters.from_config(cfg)
        self.qlora = self.adapters is not None and self.adapters.settings.quantize_base
        if self.qlora and world.sharded and world.world_size == 1:
            raise ValueError(
                "QLoRA (quantize_base: True) on one FSDP2 rank fails on this stack: torch 2.13's "
                "FSDP2 skips the all-gather for a single rank, which torchao 0.13's NF4 weights "
                "need (NF4Tensor.fsdp_post_all_gather). On one device run "
                "comparative_finetune_single_device; the distributed recipe takes QLoRA on 2 or "
                "more ranks"
            )
        self.device = world.device
        self.dtype = training.get_dtype(cfg.dtype, device=self.device)
        if self.dtype == torch.float16:
            raise ValueError("fp16 training is not supported; use bf16 or fp32")
        self.grad_accum = cfg.get("gradient_accumulation_steps", 1)
        self.clip_grad_norm = cfg.get("clip_grad_norm", None)
        self.log_every = cfg.get("log_every_n_steps", 1)
        self.save_every = cfg.get("save_every_n_steps", None)
        self.val_every = val.get("every_n_steps", None) if val is not None else None
        self.val_metric = val.get("metric", method.default_metric) if val is not None else None
        self.epochs = cfg.get("epochs", None)  # read by setup(): an evaluation needs none
        self.progress = TrainingProgress(seed=training.set_seed(seed=cfg.seed))
        self.collectives: Optional[CollectiveCounter] = None
        self.metric_logger = None  # setup() makes it (rank 0); an evaluation has none
        self.method_modules: Dict[str, nn.Module] = {}

    # ------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        cfg, world = self.cfg, self.world
        if self.epochs is None:
            raise ValueError("epochs is not set: how many epochs to train (e.g. epochs: 1)")
        known = getattr(self.method, "validation_metric_names", None)
        if self.val_metric is not None and known is not None:
            names = sorted(f"val_{name}" for name in known())
            if self.val_metric not in names:
                raise ValueError(
                    f"validation.metric {self.val_metric!r} is not computed by this run's "
                    f"validation; choose one of {names}"
                )
        self._check_model_builds()
        # The data first: a bad dataset fails before anything is written under output_dir.
        tokenizer = config.instantiate(cfg.tokenizer)
        self.data = setup_data(
            cfg, tokenizer, pad_id=collate_padding_idx(tokenizer), seed=self.progress.seed,
            rank=world.rank, world_size=world.world_size,
        )

        self.ckpt = CheckpointManager(cfg.output_dir, keep_last=cfg.get("keep_last_checkpoints", 2))
        if world.is_rank_zero:
            self.ckpt.remove_incomplete()  # left by a run killed while saving
        world.barrier()
        staging = {"output_dir": str(self.ckpt.staging_dir)}
        recipe_state = None
        if cfg.get("resume_from_checkpoint", False):
            latest = self.ckpt.latest()
            if latest is None:
                raise FileNotFoundError(
                    f"resume_from_checkpoint=True but {self.ckpt.root} holds no complete "
                    "checkpoint (a step_<n> directory with recipe_state.pt); start without "
                    "resume_from_checkpoint"
                )
            if self.adapters is None:
                checkpointer = instantiate_checkpointer(
                    cfg.checkpointer, checkpoint_dir=str(latest),
                    checkpoint_files=weight_files(latest), **staging,
                )
            else:  # the base as configured; the adapters come from the checkpoint
                checkpointer = instantiate_checkpointer(cfg.checkpointer, **staging)
            recipe_state, self.ckpt.in_use = load_recipe_state(latest), latest
        else:
            checkpointer = instantiate_checkpointer(cfg.checkpointer, **staging)
        self.ckpt.checkpointer = checkpointer
        state_dict = checkpointer.load_checkpoint()[training.MODEL_KEY]
        resumed = latest if recipe_state is not None else None
        self.model = self._setup_model(
            state_dict, tokenizer, adapter_dir=resumed,
            method_state_dir=resumed or cfg.checkpointer.get("checkpoint_dir", None),
        )
        del state_dict
        # only the trainable parameters (a LoRA run's adapters, a method's modules) get
        # optimizer state
        self.optimizer = config.instantiate(
            cfg.optimizer, [p for p in self.trained.parameters() if p.requires_grad]
        )
        self.steps_per_epoch = steps_per_epoch(
            len(self.data.dataloader), self.grad_accum, cfg.get("max_steps_per_epoch", None)
        )
        if recipe_state is not None:
            self._load_recipe_state(recipe_state)
        self.lr_scheduler = None
        if cfg.get("lr_scheduler", None) is not None:
            self.lr_scheduler = config.instantiate(
                cfg.lr_scheduler, self.optimizer,
                num_training_steps=self.epochs * self.steps_per_epoch,
                last_epoch=self.progress.global_step - 1,
            )
        # last: a run that fails in setup leaves no logs behind
        self.metric_logger = config.instantiate(cfg.metric_logger) if world.is_rank_zero else None
        if self.metric_logger is not None:
            self.metric_logger.log_config(cfg)
        world.barrier()

    def setup_evaluation(self, checkpoint_overrides: Optional[Mapping[str, Any]] = None,
                         adapter_dir: Optional[str] = None, num_examples: Optional[int] = None,
                         subset_seed: int = 0) -> None:
        """Readies ``evaluate()``: the checkpointer's weights (``checkpoint_overrides`` replace
        its config keys, e.g. ``checkpoint_files``), a LoRA model's adapter from ``adapter_dir``
        (without one: the adapters' initialisation, which leaves the base model's outputs
        unchanged), the tokenizer, the ``validation`` data and the model, prepared by the
        method. No training data, optimizer, metric logger or checkpoint manager: nothing is
        written under ``output_dir``. ``num_examples``: only that many validation samples, a
        subset drawn by ``subset_seed``."""
        if adapter_dir is not None and self.adapters is None:
            raise ValueError(
                f"an adapter ({adapter_dir}) was given but {self.cfg.model._component_} is not a "
                "LoRA builder: evaluate it with the LoRA config it was trained with"
            )
        cfg, world = self.cfg, self.world
        val = cfg.get("validation", None)
        if val is None or val.get("dataset", None) is None:
            raise ValueError("an evaluation needs a dataset: set validation.dataset")
        self._check_model_builds()
        checkpointer = instantiate_checkpointer(cfg.checkpointer, **dict(checkpoint_overrides or {}))
        state_dict = checkpointer.load_checkpoint()[training.MODEL_KEY]
        tokenizer = config.instantiate(cfg.tokenizer)
        pad_id = collate_padding_idx(tokenizer)
        dataset = config.instantiate(val.dataset, tokenizer)
        if num_examples is not None:
            dataset = ExampleSubset(dataset, num_examples, subset_seed)
        loader = build_eval_dataloader(
            dataset, batch_size=val.get("batch_size", cfg.get("batch_size", 1)), pad_id=pad_id,
            rank=world.rank, world_size=world.world_size,
        )
        self.data = RecipeData(dataset, None, loader, pad_id)
        self.model = self._setup_model(
            state_dict, tokenizer, adapter_dir=adapter_dir, require_method_state=True,
            method_state_dir=adapter_dir or cfg.checkpointer.get("checkpoint_dir", None),
        )
        del state_dict
        world.barrier()

    def _check_model_builds(self) -> None:
        """Builds the model on the meta device (no memory, no weights; about 2 s for an NF4
        8B), so that a builder argument error, or QLoRA weights that NF4 cannot quantize, fails
        before anything is loaded or written."""
        try:
            with training.set_default_dtype(self.dtype), torch.device("meta"):
                config.instantiate(self.cfg.model)
        except AssertionError as e:  # torchao's NF4 checks
            if not self.qlora:
                raise
            raise ValueError(
                f"{self.cfg.model._component_} cannot quantize this model's weights to NF4 ({e}): "
                "torchao's NF4 needs each quantized weight's element count to be a multiple of "
                "16384 (blocks of 64, scalers in blocks of 256). Use LoRA (quantize_base: False, "
                "a lora_* builder) for this model"
            ) from e

    def _setup_model(self, state_dict: Dict[str, Any], tokenizer: Any,
                     adapter_dir: Optional[Any] = None, method_state_dir: Optional[Any] = None,
                     require_method_state: bool = False) -> nn.Module:
        """Builds the model, loads ``state_dict`` (a LoRA model: the base weights, with the
        adapters of ``adapter_dir`` or their initialisation) and prepares it for the method
        (its ``trained_modules`` loaded from ``method_state_dir`` where it has them; required
        when ``require_method_state``). Sets ``self.trained``: what the optimizer updates."""
        cfg, world = self.cfg, self.world
        with training.set_default_dtype(self.dtype), world.model_init_device():
            model = config.instantiate(cfg.model)
        validate_vocab(tokenizer, model.tok_embeddings.num_embeddings)
        if self.adapters is not None:
            trainable = self.adapters.freeze_base(model)  # before wrapping, as torchtune does
            self.adapters.set_base(state_dict)
            if adapter_dir is not None:
                adapter, source = self.adapters.load_adapter(adapter_dir), str(adapter_dir)
            else:
                adapter, source = self.adapters.initial_state(model, self.progress.seed), "init"
            self.adapters.check_state(model, adapter, source)
            state_dict = {**state_dict, **adapter}
            utils.log_rank_zero(
                log, f"{self.adapters.describe()}: {trainable:,} trainable parameters"
            )
        if cfg.get("compile", False):
            training.compile_model(model, verbose=world.is_rank_zero)
        if cfg.get("enable_activation_checkpointing", False):
            set_activation_checkpointing(
                model, auto_wrap_policy={modules.TransformerSelfAttentionLayer}
            )
        try:
            world.load_model(model, state_dict, self.dtype)
        except RuntimeError as e:
            if "state_dict" not in str(e) and "size mismatch" not in str(e):
                raise
            raise ValueError(mismatch_message(cfg, e)) from None
        except AssertionError as e:  # torchao's NF4 split into FSDP2 shards
            if not (self.qlora and world.sharded):
                raise
            raise ValueError(
                f"the NF4 (QLoRA) weights cannot be split into {world.world_size} FSDP2 shards "
                f"({e}): each quantized weight needs a multiple of 16384 x {world.world_size} "
                "elements (NF4 blocks of 64, scalers in blocks of 256, whole scaler blocks per "
                "rank). Use fewer ranks, LoRA (quantize_base: False), or the single-device recipe"
            ) from e
        if hasattr(self.method, "set_tokenizer"):
            self.method.set_tokenizer(tokenizer)
        self.method.prepare(model, self.data)
        self.method_modules = self._method_modules(method_state_dir, require_method_state)
        self.trained = model if not self.method_modules else nn.ModuleDict(
            {"model": model, **self.method_modules}
        )
        if cfg.get("num_output_chunks", 0):
            model.set_num_output_chunks(cfg.num_output_chunks)
        utils.log_rank_zero(
            log, f"Model ready on {world.world_size} rank(s) with precision {self.dtype}."
        )
        return model

    def _method_modules(self, directory: Optional[Any], required: bool) -> Dict[str, nn.Module]:
        """The method's ``trained_modules``, each loaded from ``directory/<name>.pt`` when that
        file is there (else as the method initialised it, or an error when ``required``) and
        laid over the world like the model."""
        modules = dict(self.method.trained_modules()) if hasattr(self.method, "trained_modules") else {}
        for name, module in modules.items():
            path = None if directory is None else Path(str(directory)) / method_state_file(name)
            if path is not None and path.is_file():
                load_method_state(module, path)
                utils.log_rank_zero(log, f"{name} loaded from {path}")
            elif required:
                raise FileNotFoundError(
                    f"{directory} holds no {method_state_file(name)} ({name} of method: "
                    f"{self.cfg.get('method', 'comparative')}): evaluate a checkpoint written by "
                    "a run of this method (<output_dir>/best or <output_dir>/checkpoints/"
                    "step_<N>), with the config it was trained with"
                )
            else:
                utils.log_rank_zero(log, f"{name} initialised ({sum(p.numel() for p in module.parameters()):,} parameters)")
            self.world.shard_module(module)
        return modules

    def _load_recipe_state(self, state: Dict[str, Any]) -> None:
        self.progress.load_state_dict(state)
        saved_world = state.get("world_size", 1)
        if self.progress.steps_into_epoch > 0 and saved_world != self.world.world_size:
            raise ValueError(
                f"the checkpoint was written mid-epoch by {saved_world} rank(s); resume it with "
                f"{saved_world} ranks (this run has {self.world.world_size}), or from a "
                "checkpoint at an epoch boundary: the data order is split by rank"
            )
        self.world.load_optimizer_state(self.trained, self.optimizer, state["optimizer"])
        if self.progress.steps_into_epoch > 0:
            self.data.dataloader.load_state_dict(state["dataloader"])

    # ---------------------------------------------------------------------------- saving

    def _checkpoint(self) -> Optional[Dict[str, Any]]:
        """torchtune's checkpoint dict of the model on rank 0 (None elsewhere; collective when
        sharded): its weights, or a LoRA run's adapter (and merged weights)."""
        only = self.adapters is not None and self.adapters.save_adapter_weights_only
        model_state = self.world.full_model_state(self.model, adapter_weights_only=only)
        if not self.world.is_rank_zero:
            return None
        if self.adapters is None:
            return {training.MODEL_KEY: model_state}
        return self.adapters.checkpoint_dict(model_state)

    def _checkpoint_files(self) -> Dict[str, Any]:
        """The files written beside the weights (rank 0; collective when sharded): a LoRA
        run's base-model record, and each of the method's modules."""
        files = dict(self.adapters.files()) if self.adapters is not None else {}
        for name, module in self.method_modules.items():
            state = self.world.full_module_state(module)
            if state is not None:
                files[method_state_file(name)] = functools.partial(save_method_state, state)
        return files

    def save_checkpoint(self) -> None:
        """``checkpoints/step_N``: weights, optimizer, dataloader position and progress."""
        checkpoint, files = self._checkpoint(), self._checkpoint_files()
        optimizer_state = self.world.full_optimizer_state(self.trained, self.optimizer)
        if self.world.is_rank_zero:
            state = {
                **self.progress.state_dict(),
                "world_size": self.world.world_size,
                "optimizer": optimizer_state,
                "dataloader": self.data.dataloader.state_dict(),  # equal on every rank
            }
            path = self.ckpt.save(self.progress.global_step, checkpoint, state, files)
            log.info(f"Checkpoint of step {self.progress.global_step} saved to {path}")
        self.world.barrier()

    # ------------------------------------------------------------------------ validation

    @torch.no_grad()
    def validation_sums(self) -> Dict[str, HostValue]:
        """The method's validation steps over this rank's share of the validation data, their
        sums added over all ranks (host values, equal on every rank)."""
        self.trained.eval()
        parts = []
        for batch in self.data.val_dataloader:
            utils.batch_to_device(batch, self.device)
            parts.append(self.method.validation_step(self.model, batch))
        self.trained.train()
        if not parts:
            raise ValueError("the validation dataset is empty: add samples or remove `validation`")
        return Sums.total(parts).reduced(self.world.all_reduce_sum).to_host()

    def evaluate(self) -> Dict[str, float]:
        """The validation metrics (``val_`` names) of the model as it is: no checkpoint
        selection, no logging (``validate`` adds those)."""
        host = self.validation_sums()
        return {f"val_{k}": v for k, v in self.method.validation_metrics(host).items()}

    def validate(self) -> Dict[str, float]:
        """Runs the method's validation over this rank's share; metrics summed over ranks."""
        metrics = self.evaluate()
        step = self.progress.global_step
        # metrics are summed over ranks: every rank takes the same decision
        if self.progress.record_best(metrics, self.val_metric):
            checkpoint, files = self._checkpoint(), self._checkpoint_files()
            if self.world.is_rank_zero:
                path = self.ckpt.save_best(checkpoint, dict(self.progress.best), files)
                log.info(
                    f"Best {self.val_metric} so far ({metrics[self.val_metric]:.4f}, step "
                    f"{step}): weights saved to {path}"
                )
            self.world.barrier()
        if self.metric_logger is not None:
            self.metric_logger.log_dict(metrics, step=step)
        utils.log_rank_zero(log, f"validation at step {step}: " + self.method.describe_validation(metrics))
        return metrics

    # ------------------------------------------------------------------------------ loop

    def _counting(self):
        return self.collectives if self.collectives is not None else contextlib.nullcontext()

    def _finish_step(self, micro_sums: List[Sums], seconds_since: float) -> Dict[str, float]:
        with self._counting():
            # One all-reduce carries the normaliser with every metric.
            sums = Sums.total(micro_sums).reduced(self.world.all_reduce_sum)
            weight = sums[self.method.normaliser].clamp(min=1.0)
            grad_norm = optimizer_step(
                self.trained, self.optimizer, self.lr_scheduler,
                grad_scale=self.world.world_size / weight, clip_grad_norm=self.clip_grad_norm,
            )
        self.progress.finish_step()
        metrics = self.method.step_metrics(sums.to_host(), time.perf_counter() - seconds_since)
        metrics["lr"] = get_lr(self.optimizer)
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        metrics[f"peak_memory_{self.device.type}"] = peak_memory(self.device)
        if self.collectives is not None:
            metrics["collectives"] = self.collectives.count
            metrics["collective_bytes"] = self.collectives.bytes
            self.collectives.reset()
        return metrics

    def train(self) -> None:
        progress, data = self.progress, self.data
        grad_sync = self.world.grad_sync_setter(self.model)
        self.optimizer.zero_grad()
        for epoch in range(progress.epochs_run, self.epochs):
            data.dataloader.sampler.set_epoch(epoch)
            pbar = tqdm(total=self.steps_per_epoch, initial=progress.steps_into_epoch,
                        disable=not self.world.is_rank_zero)
            micro, t0 = [], time.perf_counter()
            reset_peak_memory(self.device)
            for batch in data.dataloader:
                utils.batch_to_device(batch, self.device)
                with self._counting():
                    micro.append(self.method.train_step(
                        self.model, batch, progress.global_step, set_grad_sync=grad_sync
                    ))
                if len(micro) < self.grad_accum:
                    continue
                metrics = self._finish_step(micro, t0)
                pbar.update(1)
                pbar.set_description(
                    f"{epoch + 1}|{progress.global_step}|loss: {metrics['loss']:.4f}"
                )
                if self.metric_logger is not None and progress.due(self.log_every):
                    self.metric_logger.log_dict(metrics, step=progress.global_step)
                if data.val_dataloader is not None and progress.due(self.val_every):
                    self.validate()
                if progress.steps_into_epoch >= self.steps_per_epoch:
                    break  # the epoch's end saves
                if progress.due(self.save_every):
                    self.save_checkpoint()
                micro, t0 = [], time.perf_counter()
                reset_peak_memory(self.device)
            pbar.close()
            progress.finish_epoch()
            if data.val_dataloader is not None and not self.val_every:
                self.validate()
            self.save_checkpoint()

    def close(self) -> None:
        if self.metric_logger is not None:
            self.metric_logger.close()
        self.world.close()
