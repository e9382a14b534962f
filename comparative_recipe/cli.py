"""The `tune-cmp` command: torchtune's CLI with this package's recipes and configs registered.

`tune-cmp` accepts exactly what `tune` accepts (`ls`, `cp`, `run`, `validate`, `cat`,
`download`); the differences are that `ls`, `cp`, `run` and `cat` also know the recipes and
configs installed with `comparative_recipe`, so that

    tune-cmp run comparative_finetune_single_device --config demo/tiny_needle_qa key=value
    tune-cmp run --nproc_per_node 2 comparative_finetune_distributed --config ...
    tune-cmp cp comparative_finetune_single_device ./my_recipe.py
    tune-cmp cp demo/tiny_needle_qa ./my_config.yaml

work from any directory, exactly like torchtune's built-in recipes, and one more subcommand:

    tune-cmp eval [TORCHRUN-OPTIONS] --config <config> [RECIPE-OPTIONS]

which is `tune-cmp run [TORCHRUN-OPTIONS] comparative_eval --config <config> [RECIPE-OPTIONS]`
(the evaluation recipe; with torchrun options it runs on torchrun's ranks), its sibling

    tune-cmp analyze [TORCHRUN-OPTIONS] --config <config> [RECIPE-OPTIONS]

(the `comparative_analyze` recipe: ablation curves, per-layer utility and attribution of
checkpoints), `tune-cmp prune [TORCHRUN-OPTIONS] --config ...` (the `comparative_prune` recipe:
training-free pruning by attribution, with its baselines), and two commands on a run's output directory, which need no config:

    tune-cmp plot RUN_DIR [RUN_DIR ...]    # training curves from the metric logs (PNG + JSON)
    tune-cmp report RUN_DIR                # one self-contained HTML report of the run

How it works. torchtune has no plugin mechanism: each `torchtune._cli.<sub>` module calls its
imported `get_all_recipes()` and joins `ROOT / "recipes" / recipe.file_path` (or
`ROOT / "recipes" / "configs" / config.file_path`). Joining a pathlib path with an absolute
path gives the absolute path, so a `torchtune._recipe_registry.Recipe` whose file paths are
absolute is handled by the unchanged subcommands; built-in recipes are launched by file path,
with torchrun when torchrun flags are given. `main()` points `get_all_recipes` in those
modules at torchtune's recipes followed by ours; everything that touches torchtune's internals
is in `comparative_recipe._torchtune_compat`.

What is registered.
- Recipes: every `*.py` file directly in the installed package `comparative_recipe.recipes`
  (the repository's top-level `recipes/`) whose name does not start with `_`. The recipe's name
  is the file stem. A recipe supports distributed runs (torchrun flags) if its name ends in
  `_distributed`, `_eval`, `_analyze` or `_prune` (an evaluation recipe runs on one device, or on
  torchrun's ranks when launched with torchrun flags).
- Configs: every `*.yaml` file under the installed package `comparative_recipe.configs` (the
  repository's top-level `configs/`). The config's name is its path relative to that folder,
  without `.yaml`, with `/` separators: `configs/demo/tiny_needle_qa.yaml` is
  `demo/tiny_needle_qa`.
- Which recipe a config belongs to, from the config's file name:
    * a name ending in `_single_device` belongs to every recipe whose name ends in
      `_single_device`;
    * a name ending in `_distributed` belongs to every recipe whose name ends in
      `_distributed`;
    * any other config (for example `demo/tiny_needle_qa`) belongs to every recipe;
    * every config belongs to a recipe whose name ends in `_eval`, `_analyze` or `_prune`: a
      model is evaluated (or pruned) with the config it was trained with.
  A `_single_device` or `_distributed` config with no matching recipe is not registered.

Names must not repeat torchtune's own recipe or config names; `all_recipes` raises if they do.
"""

import argparse
import importlib.resources
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from comparative_recipe._torchtune_compat import (
    Config,
    Recipe,
    add_subcommand,
    builtin_recipes,
    tune_cli_parser,
    use_recipes_in_cli,
)

RECIPES_PACKAGE = "comparative_recipe.recipes"
CONFIGS_PACKAGE = "comparative_recipe.configs"

# Config and recipe name endings that tie a config to a kind of recipe.
_KIND_SUFFIXES = ("_single_device", "_distributed")
# Recipe name endings of evaluation recipes: every config, with or without torchrun.
_EVAL_SUFFIXES = ("_eval", "_analyze", "_prune")
# The recipes `tune-cmp eval` and `tune-cmp analyze` run.
EVAL_RECIPE = "comparative_eval"
ANALYZE_RECIPE = "comparative_analyze"
PRUNE_RECIPE = "comparative_prune"
RECIPE_ALIASES = {"eval": EVAL_RECIPE, "analyze": ANALYZE_RECIPE, "prune": PRUNE_RECIPE}


def _package_dir(package: str) -> Optional[Path]:
    """The folder of an installed package, or None if it is missing or not a plain folder."""
    try:
        path = Path(str(importlib.resources.files(package)))
    except ModuleNotFoundError:
        return None
    return path if path.is_dir() else None


def _kind(name: str) -> Optional[str]:
    """The kind suffix (`_single_device`, `_distributed`) a name ends with, or None."""
    for suffix in _KIND_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def plugin_recipes(
    recipes_dir: Optional[Path] = None, configs_dir: Optional[Path] = None
) -> List[Recipe]:
    """The recipes of this package as torchtune registry entries with absolute file paths.

    Args:
        recipes_dir: folder of recipe files; default: the installed `comparative_recipe.recipes`.
        configs_dir: folder of config files; default: the installed `comparative_recipe.configs`.

    Returns:
        One `Recipe` per recipe file, sorted by name, each with the configs that belong to it
        (rule in the module docstring), sorted by name.
    """
    recipes_dir = _package_dir(RECIPES_PACKAGE) if recipes_dir is None else Path(recipes_dir)
    configs_dir = _package_dir(CONFIGS_PACKAGE) if configs_dir is None else Path(configs_dir)
    if recipes_dir is None or not recipes_dir.is_dir():
        return []

    recipe_files = sorted(
        p for p in recipes_dir.glob("*.py") if p.is_file() and not p.name.startswith("_")
    )
    config_files = []
    if configs_dir is not None and configs_dir.is_dir():
        config_files = sorted(p for p in configs_dir.rglob("*.yaml") if p.is_file())

    recipes = []
    for recipe_file in recipe_files:
        recipe_name = recipe_file.stem
        recipe_kind = _kind(recipe_name)
        is_eval = recipe_name.endswith(_EVAL_SUFFIXES)
        configs = []
        for config_file in config_files:
            config_name = config_file.relative_to(configs_dir).with_suffix("").as_posix()
            config_kind = _kind(config_file.stem)
            if is_eval or config_kind is None or config_kind == recipe_kind:
                configs.append(Config(name=config_name, file_path=str(config_file.resolve())))
        recipes.append(
            Recipe(
                name=recipe_name,
                file_path=str(recipe_file.resolve()),
                configs=sorted(configs, key=lambda c: c.name),
                supports_distributed=recipe_kind == "_distributed" or is_eval,
            )
        )
    return recipes


def all_recipes(plugin: Optional[List[Recipe]] = None) -> List[Recipe]:
    """torchtune's built-in recipes followed by this package's.

    Args:
        plugin: this package's recipes; default: `plugin_recipes()`.

    Raises:
        ValueError: if one of ours has the name of a torchtune recipe or config.
    """
    builtin = builtin_recipes()
    plugin = plugin_recipes() if plugin is None else plugin
    builtin_recipe_names = {r.name for r in builtin}
    builtin_config_names = {c.name for r in builtin for c in r.configs}
    for recipe in plugin:
        if recipe.name in builtin_recipe_names:
            raise ValueError(f"Recipe name {recipe.name!r} is already a torchtune recipe")
        for config in recipe.configs:
            if config.name in builtin_config_names:
                raise ValueError(f"Config name {config.name!r} is already a torchtune config")
    return builtin + plugin


EVAL_USAGE = "tune-cmp eval [TORCHRUN-OPTIONS] --config <config> [RECIPE-OPTIONS]"
EVAL_EPILOG = """\
examples:

    # evaluate the demo's best checkpoint with the config it was trained with
    $ tune-cmp eval --config demo/tiny_needle_qa \\
        checkpointer.checkpoint_dir=/tmp/comparative_recipe/demo_tiny_needle_qa/best

    # on 2 processes (torchrun), with generated answers scored by exact match and token F1
    $ tune-cmp eval --nproc_per_node 2 --config demo/tiny_needle_qa \\
        checkpointer.checkpoint_dir=/tmp/comparative_recipe/demo_tiny_needle_qa/best \\
        eval.generate.max_new_tokens=8 eval.output_path=/tmp/eval.json

It runs `tune-cmp run [TORCHRUN-OPTIONS] comparative_eval --config ...`: the metrics of the full
model and of every ablation, printed as a table and written as JSON to eval.output_path
(default <output_dir>/eval/<checkpoint dir name>.json; never replaced unless eval.overwrite=true).
"""


ANALYZE_USAGE = "tune-cmp analyze [TORCHRUN-OPTIONS] --config <config> [RECIPE-OPTIONS]"
ANALYZE_EPILOG = """\
examples:

    # plain vs comparative on the demo task: ablation curves, per-layer heatmap, attribution
    $ tune-cmp analyze --config demo/tiny_needle_qa output_dir=/tmp/demo_cmp \\
        'analyze.checkpoints=[/tmp/demo_plain/best,/tmp/demo_cmp/best]' \\
        'analyze.labels=[plain,comparative]'

    # fewer points: two seeds, the FFN and all-sites curves, no per-layer view
    $ tune-cmp analyze --config demo/tiny_needle_qa output_dir=/tmp/demo_cmp \\
        'analyze.seeds=[0,1]' 'analyze.curves=[ffn_hidden,all,crop]' analyze.layer_rate=null

It runs `tune-cmp run [TORCHRUN-OPTIONS] comparative_analyze --config ...` and writes
<output_dir>/analysis/ablation.json (never replaced unless analyze.overwrite=true) and its PNG
plots (matplotlib: pip install 'comparative_recipe[plots]'; analyze.plots=false writes the JSON
alone). Every analyze.* key is described in comparative_recipe.analysis.ablation.
"""


PRUNE_USAGE = "tune-cmp prune [TORCHRUN-OPTIONS] --config <config> [RECIPE-OPTIONS]"
PRUNE_EPILOG = """\
examples:

    # remove a quarter of the FFN units of the demo's best checkpoint by attribution
    $ tune-cmp prune --config demo/tiny_needle_qa \\
        checkpointer.checkpoint_dir=/tmp/comparative_recipe/demo_tiny_needle_qa/best \\
        prune.sparsity=0.25 'prune.sites=[ffn_hidden]'

    # unsupervised (the model's own greedy answers), 16 examples, FFN units and heads
    $ tune-cmp prune --config demo/tiny_needle_qa \\
        checkpointer.checkpoint_dir=/tmp/comparative_recipe/demo_tiny_needle_qa/best \\
        prune.data=unsupervised prune.num_examples=16 \\
        'prune.sparsity={ffn_hidden: 0.3, attn_heads: 0.5}' prune.output_dir=/tmp/pruned

    # evaluate the pruned model
    $ tune-cmp eval --config /tmp/pruned/torchtune_config.yaml

It runs `tune-cmp run [TORCHRUN-OPTIONS] comparative_prune --config ...` and writes
prune.output_dir (default <output_dir>/pruned; never replaced unless prune.overwrite=true): the
smaller model (HF format for prune.ranking=uniform), torchtune_config.yaml and pruning.json.
prune.method: attribution | wanda | magnitude | random; every prune.* key is described in
comparative_recipe.pruning.settings.
"""


def eval_as_run(argv: Sequence[str]) -> Optional[List[str]]:
    """`eval ARGS` / `analyze ARGS` / `prune ARGS` as the `run` arguments they stand for: the recipe inserted
    before `--config` (torchrun options stay in front of it). None when `argv` is not one of
    them with a `--config`: the subcommand's parser then prints its help or its error."""
    if not argv or argv[0] not in RECIPE_ALIASES or "--config" not in argv:
        return None
    rest = list(argv[1:])
    at = rest.index("--config")
    if any(a in ("-h", "--help") for a in rest[:at]):
        return None
    return ["run", *rest[:at], RECIPE_ALIASES[argv[0]], *rest[at:]]


def _add_recipe_alias(cli, name: str, **kwargs) -> None:
    parser = add_subcommand(cli, name, **kwargs)
    parser.add_argument("recipe_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.set_defaults(func=lambda args: parser.error("the '--config' argument is required."))


def _add_run_dir_command(cli, name: str, add_arguments, command, **kwargs) -> None:
    parser = add_subcommand(cli, name, **kwargs)
    add_arguments(parser)
    parser.set_defaults(func=lambda args: sys.exit(command(args)))


def _add_subcommands(cli) -> None:
    from comparative_recipe.analysis import report, training_plots

    _add_recipe_alias(
        cli, "eval", help="Evaluate a checkpoint: the full model and every ablation.",
        usage=EVAL_USAGE, epilog=EVAL_EPILOG,
        description="Evaluate a checkpoint with the config it was trained with "
        "(the comparative_eval recipe; torchrun options run it on several processes).",
    )
    _add_recipe_alias(
        cli, "analyze", help="Ablation curves, per-layer utility and attribution of checkpoints.",
        usage=ANALYZE_USAGE, epilog=ANALYZE_EPILOG,
        description="Score checkpoints with hidden units masked and input chunks cropped at "
        "growing rates, several seeds (the comparative_analyze recipe; torchrun options run "
        "it on several processes).",
    )
    _add_recipe_alias(
        cli, "prune", help="Training-free pruning of a checkpoint by neuron attribution.",
        usage=PRUNE_USAGE, epilog=PRUNE_EPILOG,
        description="Score every FFN unit and attention head on the task's data, remove the "
        "lowest-scoring ones and write the smaller model (the comparative_prune recipe; "
        "torchrun options run it on several processes).",
    )
    _add_run_dir_command(
        cli, "plot", training_plots.add_plot_arguments, training_plots.plot_command,
        help="Training curves of one or more runs from their metric logs.",
        description="Plot the comparative loss, the per-pass losses, the violation rate, "
        "validation metrics and throughput of training runs (their output_dir), smoothed.",
    )
    _add_run_dir_command(
        cli, "report", report.add_report_arguments, report.report_command,
        help="One self-contained HTML report of a run.",
        description="Write <RUN_DIR>/report.html: the training plots, final metrics, evaluation "
        "reports, ablation analyses and the run's config, in one file for a browser.",
    )


def main() -> None:
    """Entry point of the `tune-cmp` console script; reads its arguments from sys.argv."""
    use_recipes_in_cli(all_recipes())
    run_args = eval_as_run(sys.argv[1:])
    if run_args is not None:
        sys.argv = [sys.argv[0], *run_args]
    cli = tune_cli_parser("tune-cmp")
    _add_subcommands(cli)
    args = cli.parse_args()
    cli.run(args)


if __name__ == "__main__":
    main()
