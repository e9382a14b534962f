"""Ablation curves of one or more checkpoints (torchtune recipe): the task loss and metric of
the full model and of sub-models with hidden units masked (per site and all together, rates
0 ... 0.5) or input chunks cropped (0 ... 0.75), over several mask seeds; where the utility sits
per layer; the attribution of every FFN unit and head. On one device or on torchrun's ranks.

    tune-cmp analyze --config demo/tiny_needle_qa output_dir=/tmp/demo_cmp \\
        'analyze.checkpoints=[/tmp/demo_plain/best,/tmp/demo_cmp/best]' \\
        'analyze.labels=[plain,comparative]'

(``tune-cmp analyze ...`` is ``tune-cmp run [TORCHRUN-OPTIONS] comparative_analyze --config
...``.) The config is the one the models were trained with; its ``analyze`` section is
described in ``comparative_recipe.analysis.ablation``. Writes ``<output_dir>/analysis/
ablation.json`` (never replaced unless ``analyze.overwrite=true``) and its PNG plots, and
prints the area under every curve.
"""

import sys

from omegaconf import DictConfig
from torch.distributed.elastic.multiprocessing.errors import record
from torchtune import config
from tqdm import tqdm

from comparative_recipe.analysis.ablation import (
    AblationProbe,
    analysis_config,
    analysis_report,
    checkpoint_analysis,
    checkpoint_load,
)
from comparative_recipe.analysis.ablation_plots import ablation_figures, auc_rows, format_auc_table
from comparative_recipe.analysis.plotting import require_matplotlib
from comparative_recipe.evaluation import write_report
from comparative_recipe.methods import build_method
from comparative_recipe.metrics.generation import GenerationSettings
from comparative_recipe.training.distributed import DISTRIBUTED_KEYS, World
from comparative_recipe.training.trainer import Trainer


@record
@config.parse
def recipe_main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="comparative_analyze", cfg=cfg)
    analysis_cfg, settings = analysis_config(cfg)  # config errors before anything is loaded
    if settings.plots:
        try:
            require_matplotlib()
        except ImportError as e:
            raise ImportError(f"{e}; or set analyze.plots=false to write the JSON alone") from None
    probe = AblationProbe(
        settings, build_method(analysis_cfg), task=analysis_cfg.get("task", "sft"),
        generation=GenerationSettings.from_config(analysis_cfg.validation.get("generate", None)),
    )
    world = World.from_config(cfg)  # torchrun's ranks when launched by torchrun
    entries, samples = [], 0
    for checkpoint, label in zip(settings.checkpoints, settings.labels):
        overrides, adapter = checkpoint_load(analysis_cfg, checkpoint)
        trainer = Trainer(analysis_cfg, probe, world,
                          world_keys=(*DISTRIBUTED_KEYS, "eval", "report"))
        trainer.setup_evaluation(overrides, adapter_dir=adapter)
        with tqdm(total=len(trainer.data.val_dataloader), disable=not world.is_rank_zero,
                  desc=f"{label}: full model + {len(probe.points)} sub-models, batches") as bar:
            probe.on_batch = bar.update
            sums = trainer.validation_sums()
        metrics = {f"val_{k}": v for k, v in probe.validation_metrics(sums).items()}
        samples = int(metrics["val_samples"])
        attribution = probe.attribution_scores(sums) if settings.attribution else None
        entries.append(checkpoint_analysis(
            metrics, probe.points, settings, label=label, checkpoint=checkpoint, adapter=adapter,
            attribution=attribution, num_layers=probe.num_layers,
        ))
        del trainer
    if world.is_rank_zero:
        report = analysis_report(analysis_cfg, settings, entries, samples)
        path = write_report(settings.output_path, report, overwrite=settings.overwrite)
        print(format_auc_table(auc_rows(report)), flush=True)
        print(f"Analysis written to {path}", flush=True)
        if settings.plots:
            for name, png in ablation_figures(report, settings.output_dir, settings.stem).items():
                print(f"  {name}: {png}", flush=True)
    world.barrier()
    world.close()


if __name__ == "__main__":
    sys.exit(recipe_main())
