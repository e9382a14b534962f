"""Comparative-loss fine-tuning on one device, CPU or one GPU (torchtune recipe).

For every sample the recipe runs the full model and c progressively ablated sub-models (hidden
units masked, input chunks cropped) and trains with a ranking loss that asks the full model to
have the lowest task loss (Zhu et al., "Cross-Model Comparative Loss", TOIS 2024). With c = 0 it
is plain fine-tuning, step for step torchtune's ``full_finetune_single_device``.

    tune-cmp run comparative_finetune_single_device --config demo/tiny_needle_qa

On CPU, prefix the command with
``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296``: a comparative
step holds 1+c passes of activations, which glibc's defaults page-fault in again on every step.

A single device is the smallest setup of the one training loop
(``comparative_recipe.training.trainer``): the same loop as ``comparative_finetune_distributed``,
on a world of one process, with the model built and loaded in place (no FSDP). The method's
config keys (``ablation``, ``loss``, ``task``, ``strategy``, ``loss_reduction``,
``validation.passes``) are read by ``comparative_recipe.methods.ComparativeMethod``; a key that
nothing reads is an error, before anything is written. ``method: dropout`` or ``rdrop`` trains
the baselines of ``comparative_recipe.methods.baselines`` in the same loop instead.

With ``report: true`` the run ends by writing ``<output_dir>/report.html`` (``tune-cmp report``:
training plots, final metrics, evaluations and analyses, the config); it needs matplotlib and a
DiskLogger or TensorBoardLogger, checked before training starts.
"""

import os
import sys

from omegaconf import DictConfig
from torchtune import config, utils

from comparative_recipe.analysis.report import report_at_end, write_run_report
from comparative_recipe.methods import build_method
from comparative_recipe.training.distributed import DISTRIBUTED_KEYS, World
from comparative_recipe.training.trainer import Trainer


def check_single_process(cfg: DictConfig) -> None:
    """One process, and no key that only the distributed recipe reads (it would be ignored)."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1:
        raise RuntimeError(
            f"comparative_finetune_single_device was launched as {processes} processes, which "
            "would each train the whole model on the same data: use "
            "comparative_finetune_distributed with torchrun, or launch one process"
        )
    distributed_only = [key for key in DISTRIBUTED_KEYS if key in cfg]
    if distributed_only:
        raise ValueError(
            f"{distributed_only} are keys of comparative_finetune_distributed (FSDP2 over "
            "several processes); this recipe trains on one device and would ignore them: "
            "remove them, or run the distributed recipe"
        )


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="comparative_finetune_single_device", cfg=cfg)
    check_single_process(cfg)
    report = report_at_end(cfg)
    world = World.single_device(utils.get_device(device=cfg.device))
    trainer = Trainer(cfg, build_method(cfg), world, world_keys=("report",))
    trainer.setup()
    trainer.train()
    trainer.close()
    if report:
        print(f"Report written to {write_run_report(cfg.output_dir)}", flush=True)


if __name__ == "__main__":
    sys.exit(recipe_main())
