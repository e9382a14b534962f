"""Early-exit fine-tuning on one device, CPU or one GPU (torchtune recipe): a halting head per
decoder layer, trained with the PonderNet loss with the model (full or LoRA), so that at
inference each sequence can leave at the first layer whose cumulative exit probability passes q
(Q-exit; PALBERT, Balagansky & Gavrilov 2022).

    tune-cmp run early_exit_finetune_single_device --config demo/tiny_early_exit
    tune-cmp eval --config demo/tiny_early_exit checkpointer.checkpoint_dir=<output_dir>/best

The one training loop (``comparative_recipe.training.trainer``) with
``comparative_recipe.methods.early_exit.EarlyExitMethod`` (its ``early_exit`` section and the
exit rules of ``validation.exit_rules`` are documented there); the halting heads are saved as
``halting_heads.pt`` beside the weights of every checkpoint. The same as
``comparative_finetune_single_device`` with ``method: early_exit``.
"""

import sys

from omegaconf import DictConfig
from torchtune import config, utils

from comparative_recipe.analysis.report import report_at_end, write_run_report
from comparative_recipe.methods.early_exit import EarlyExitMethod
from comparative_recipe.training.distributed import World, check_single_process
from comparative_recipe.training.trainer import Trainer


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="early_exit_finetune_single_device", cfg=cfg)
    check_single_process(cfg, "early_exit_finetune_single_device", "early_exit_finetune_distributed")
    method = EarlyExitMethod.for_recipe(cfg, "early_exit_finetune_single_device")
    report = report_at_end(cfg)
    world = World.single_device(utils.get_device(device=cfg.device))
    trainer = Trainer(cfg, method, world, world_keys=("report",))
    trainer.setup()
    trainer.train()
    trainer.close()
    if report:
        print(f"Report written to {write_run_report(cfg.output_dir)}", flush=True)


if __name__ == "__main__":
    sys.exit(recipe_main())
