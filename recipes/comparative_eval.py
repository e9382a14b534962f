"""Evaluate a checkpoint: the task metrics of the full model and of every ablated sub-model
(torchtune recipe), on one device or on torchrun's ranks (each scores a shard of the data; the
sums are reduced over ranks).

    tune-cmp eval --config demo/tiny_needle_qa checkpointer.checkpoint_dir=/tmp/demo/best
    tune-cmp eval --nproc_per_node 2 --config demo/tiny_needle_qa \\
        checkpointer.checkpoint_dir=/tmp/demo/checkpoints/step_000300 eval.generate.max_new_tokens=8

(``tune-cmp eval ...`` is ``tune-cmp run [TORCHRUN-OPTIONS] comparative_eval --config ...``.)
The config is the one the model was trained with: the evaluation reads the model, tokenizer,
checkpointer, ``validation`` (or ``eval.dataset``) and the method's keys, ignores the training
keys (optimizer, schedule, ...), and rejects unknown keys. It runs the training loop's own
validation (``Trainer.evaluate``) with ``passes: all`` by default, prints a table (loss, and
accuracy / macro-F1 or exact match / token F1 per pass) and writes a JSON report to
``eval.output_path`` (default ``<output_dir>/eval/<checkpoint dir name>.json``; an existing
file is an error unless ``eval.overwrite=true``). See ``comparative_recipe.evaluation``.
A ``method: early_exit`` checkpoint is evaluated per exit rule instead (``eval.exit_rules``):
task metric, mean exit layer, samples leaving at each layer and the measured wall-time speed-up
against running all layers.
"""

import sys

from omegaconf import DictConfig
from torch.distributed.elastic.multiprocessing.errors import record
from torchtune import config

from comparative_recipe.evaluation import evaluation_config, evaluation_report, format_table, write_report
from comparative_recipe.methods import build_method
from comparative_recipe.training.distributed import DISTRIBUTED_KEYS, World
from comparative_recipe.training.trainer import Trainer


@record
@config.parse
def recipe_main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="comparative_eval", cfg=cfg)
    eval_cfg, settings = evaluation_config(cfg)  # config errors before anything is loaded
    method = build_method(eval_cfg)  # the config's method: (default) comparative
    world = World.from_config(cfg)  # torchrun's ranks when launched by torchrun
    trainer = Trainer(eval_cfg, method, world, world_keys=(*DISTRIBUTED_KEYS, "eval", "report"))
    trainer.setup_evaluation(settings.checkpoint_overrides, adapter_dir=settings.adapter_dir)
    metrics = trainer.evaluate()
    labels = getattr(method, "pass_labels", lambda: None)
    exit_rules = getattr(method, "exit_rule_rows", lambda _: None)
    if world.is_rank_zero:
        report = evaluation_report(metrics, cfg=eval_cfg, settings=settings,
                                   pass_labels=labels(), world_size=world.world_size,
                                   exit_rules=exit_rules(metrics))
        path = write_report(settings.output_path, report, overwrite=settings.overwrite)  # first
        print(format_table(report), flush=True)
        print(f"Evaluation report written to {path}", flush=True)
    world.barrier()
    trainer.close()


if __name__ == "__main__":
    sys.exit(recipe_main())
