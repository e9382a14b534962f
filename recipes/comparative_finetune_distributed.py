"""Comparative-loss fine-tuning on several GPUs and nodes, data-parallel with FSDP2 (torchtune
recipe), launched by torchrun:

    tune-cmp run --nproc_per_node 8 comparative_finetune_distributed --config ...
    tune-cmp run --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d \\
        --rdzv_endpoint $HEAD:29500 comparative_finetune_distributed --config ...

The one training loop (``comparative_recipe.training.trainer``) on a world of torchrun's ranks:
the model is built on the meta device, sharded with FSDP2 (one unit per decoder layer) and each
rank loads its shard. NCCL on GPUs, gloo on CPU. The loss is normalised globally (per-sample
losses summed over ranks and micro-batches, divided by the global sample or token count), so
1 rank x batch 8 and 2 ranks x batch 4 train alike; masks and crops are keyed by the sample,
never by its row or rank. Rank 0 writes the checkpoints; a failing rank fails the job with its
traceback (``record`` hands it to torchrun's error summary).

Keys of this recipe only, beside the single-device recipe's: ``fsdp_cpu_offload`` (CUDA only:
parameters, gradients and optimizer state in CPU memory), ``fsdp_reshard_after_forward``
(default true; false keeps the gathered parameters until the backward: fewer all-gathers, more
memory), ``distributed_timeout_minutes`` (how long a collective waits for a dead rank; torch's
default when unset), ``count_collectives`` (log the collectives and bytes of every optimizer
step; a dispatch mode, a little slower).

With ``report: true`` the run ends by writing ``<output_dir>/report.html`` (``tune-cmp report``:
training plots, final metrics, evaluations and analyses, the config); it needs matplotlib and a
DiskLogger or TensorBoardLogger, checked before training starts.
"""

import sys

from omegaconf import DictConfig
from torch.distributed.elastic.multiprocessing.errors import record
from torchtune import config

from comparative_recipe.analysis.report import report_at_end, write_run_report
from comparative_recipe.methods import build_method
from comparative_recipe.training.costs import CollectiveCounter
from comparative_recipe.training.distributed import DISTRIBUTED_KEYS, World
from comparative_recipe.training.trainer import Trainer


@record
@config.parse
def recipe_main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="comparative_finetune_distributed", cfg=cfg)
    method = build_method(cfg)  # config errors before the process group starts
    report = report_at_end(cfg)
    world = World.from_config(cfg, torchrun=True)
    trainer = Trainer(cfg, method, world, world_keys=(*DISTRIBUTED_KEYS, "report"))
    if cfg.get("count_collectives", False):
        trainer.collectives = CollectiveCounter()
    trainer.setup()
    trainer.train()
    trainer.close()  # flushes the metric logs the report reads
    if report and world.is_rank_zero:
        print(f"Report written to {write_run_report(cfg.output_dir)}", flush=True)


if __name__ == "__main__":
    sys.exit(recipe_main())
