"""Training-free task-specific pruning (torchtune recipe): score every FFN hidden unit and
attention head on the task's data, remove the lowest-scoring ones, write the smaller model.
On one device or on torchrun's ranks (each scores a shard of the data; scores are summed over
ranks).

    tune-cmp prune --config demo/tiny_needle_qa checkpointer.checkpoint_dir=/tmp/demo/best \\
        prune.sparsity=0.25 'prune.sites=[ffn_hidden]'
    tune-cmp prune --config demo/tiny_needle_qa checkpointer.checkpoint_dir=/tmp/demo/best \\
        prune.data=unsupervised prune.num_examples=16 \\
        'prune.sparsity={ffn_hidden: 0.3, attn_heads: 0.5}'
    tune-cmp eval --config /tmp/demo/pruned/torchtune_config.yaml

(``tune-cmp prune ...`` is ``tune-cmp run [TORCHRUN-OPTIONS] comparative_prune --config ...``.)
The config is the one the model was trained with; its ``prune`` section is described in
``comparative_recipe.pruning.settings``, the folder written in ``comparative_recipe.pruning.
export``. Nothing is written before the scores are complete.
"""

import sys

import torch
from omegaconf import DictConfig
from torch.distributed.elastic.multiprocessing.errors import record
from torchtune import config, training
from tqdm import tqdm

from comparative_recipe import neurons
from comparative_recipe.methods import build_method
from comparative_recipe.pruning.export import parameter_count, pruning_report, write_pruned
from comparative_recipe.pruning.scoring import PruneScorer, unit_scores
from comparative_recipe.pruning.select import select_units
from comparative_recipe.pruning.settings import prune_config
from comparative_recipe.pruning.structure import shrink_model
from comparative_recipe.training.checkpointing import CheckpointManager, instantiate_checkpointer
from comparative_recipe.training.distributed import DISTRIBUTED_KEYS, World
from comparative_recipe.training.trainer import Trainer, mismatch_message


@record
@config.parse
def recipe_main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="comparative_prune", cfg=cfg)
    prune_cfg, settings = prune_config(cfg)  # config errors before anything is loaded
    world = World.from_config(cfg)  # torchrun's ranks when launched by torchrun
    data, samples = None, None
    if settings.reads_data:
        scorer = PruneScorer(settings, build_method(prune_cfg), task=prune_cfg.get("task", "sft"))
        trainer = Trainer(prune_cfg, scorer, world, world_keys=(*DISTRIBUTED_KEYS, "prune"))
        trainer.setup_evaluation(settings.checkpoint_overrides,
                                 num_examples=settings.num_examples, subset_seed=settings.seed)
        with tqdm(total=len(trainer.data.val_dataloader), disable=not world.is_rank_zero,
                  desc=f"{settings.method} scores ({settings.setting}), batches") as bar:
            scorer.on_batch = bar.update
            sums = trainer.validation_sums()
        data, samples = scorer.data_sums(sums), int(sums["samples"])
        if samples == 0:
            raise ValueError(
                f"no sample of the scored data has an answer ({len(trainer.data.dataset)} "
                "samples, none with a labelled token): the answers are missing or truncated "
                "away by tokenizer.max_seq_len. Give data with answers (prune.dataset), a "
                "longer tokenizer.max_seq_len, or prune.method=magnitude / random"
            )
        del trainer
    if world.is_rank_zero:
        # training-free: the weights are the checkpoint's; the pruned copy is cut on the CPU
        staging = str(CheckpointManager(str(cfg.output_dir)).staging_dir)
        checkpointer = instantiate_checkpointer(
            cfg.checkpointer, **settings.checkpoint_overrides, output_dir=staging)
        state_dict = checkpointer.load_checkpoint()[training.MODEL_KEY]
        with training.set_default_dtype(training.get_dtype(cfg.get("dtype", "fp32"))), torch.device("cpu"):
            model = config.instantiate(cfg.model)
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as e:
            raise ValueError(mismatch_message(cfg, e)) from None
        del state_dict
        units = {site: [lay.units for lay in neurons.site_layouts(model, site)]
                 for site in settings.sites}
        kv = [lay.num_kv_heads for lay in neurons.site_layouts(model, "attn_heads")]
        scores = unit_scores(model, settings, data)
        kept = {site: select_units(scores[site], settings.sparsity[site], site, settings.ranking,
                                   kv if site == "attn_heads" else None)
                for site in settings.sites}
        before = parameter_count(model)
        shrink_model(model, kept)
        after = parameter_count(model)
        report = pruning_report(
            settings, checkpoint=str(cfg.checkpointer.checkpoint_dir), units=units, kept=kept,
            scores=scores, params_before=before, params_after=after, samples=samples,
            world_size=world.world_size,
        )
        path = write_pruned(model, cfg=cfg, settings=settings, checkpointer=checkpointer,
                            report=report)
        for site, entry in report["sites"].items():
            kept, total = entry["kept"], entry["units"]
            sizes = (f"{kept[0]} of {total[0]} in every layer" if len(set(kept)) == 1
                     and len(set(total)) == 1 else f"{kept} of {total} per layer")
            print(f"{site}: kept {sizes} (sparsity {entry['achieved_sparsity']:.3f})", flush=True)
        print(f"parameters: {before:,} -> {after:,} "
              f"({100 * report['parameters']['removed_fraction']:.1f}% removed)", flush=True)
        print(f"Pruned model written to {path}; evaluate it with\n"
              f"  tune-cmp eval --config {path}/torchtune_config.yaml", flush=True)
    world.barrier()
    world.close()


if __name__ == "__main__":
    sys.exit(recipe_main())
