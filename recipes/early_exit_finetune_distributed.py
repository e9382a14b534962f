"""Early-exit fine-tuning on several GPUs and nodes, data-parallel with FSDP2 (torchtune
recipe), launched by torchrun:

    tune-cmp run --nproc_per_node 8 early_exit_finetune_distributed --config ...

``early_exit_finetune_single_device`` on torchrun's ranks: the model is sharded with FSDP2 (one
unit per decoder layer, activation checkpointing as configured) and the halting heads are one
FSDP2 unit of their own; the PonderNet loss is summed over ranks and divided by the global
sample count. Keys of the distributed recipes only: ``fsdp_cpu_offload``,
``fsdp_reshard_after_forward``, ``distributed_timeout_minutes``, ``count_collectives`` (see
``comparative_finetune_distributed``).
"""

import sys

from omegaconf import DictConfig
from torch.distributed.elastic.multiprocessing.errors import record
from torchtune import config

from comparative_recipe.analysis.report import report_at_end, write_run_report
from comparative_recipe.methods.early_exit import EarlyExitMethod
from comparative_recipe.training.costs import CollectiveCounter
from comparative_recipe.training.distributed import DISTRIBUTED_KEYS, World
from comparative_recipe.training.trainer import Trainer


@record
@config.parse
def recipe_main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="early_exit_finetune_distributed", cfg=cfg)
    method = EarlyExitMethod.for_recipe(cfg, "early_exit_finetune_distributed")
    report = report_at_end(cfg)
    world = World.from_config(cfg, torchrun=True)
    trainer = Trainer(cfg, method, world, world_keys=(*DISTRIBUTED_KEYS, "report"))
    if cfg.get("count_collectives", False):
        trainer.collectives = CollectiveCounter()
    trainer.setup()
    trainer.train()
    trainer.close()
    if report and world.is_rank_zero:
        print(f"Report written to {write_run_report(cfg.output_dir)}", flush=True)


if __name__ == "__main__":
    sys.exit(recipe_main())
