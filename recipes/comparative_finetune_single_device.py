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

import sys

from omegaconf import DictConfig
from torchtune import config, utils

from comparative_recipe.analysis.report import report_at_end, write_run_report
from comparative_recipe.methods import build_method
from comparative_recipe.training.distributed import World, check_single_process
from comparative_recipe.training.trainer import Trainer


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="comparative_finetune_single_device", cfg=cfg)
    check_single_process(cfg, "comparative_finetune_single_device", "comparative_finetune_distributed")
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
