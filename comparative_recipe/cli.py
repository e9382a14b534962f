"""The `tune-cmp` command: torchtune's CLI with this package's recipes and configs registered.

`tune-cmp` accepts exactly what `tune` accepts (`ls`, `cp`, `run`, `validate`, `cat`,
`download`); the only difference is that `ls`, `cp`, `run` and `cat` also know the recipes and
configs installed with `comparative_recipe`, so that

    tune-cmp run comparative_finetune_single_device --config demo/tiny_needle_qa key=value
    tune-cmp run --nproc_per_node 2 comparative_finetune_distributed --config ...
    tune-cmp cp comparative_finetune_single_device ./my_recipe.py
    tune-cmp cp demo/tiny_needle_qa ./my_config.yaml

work from any directory, exactly like torchtune's built-in recipes.

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
  `_distributed`.
- Configs: every `*.yaml` file under the installed package `comparative_recipe.configs` (the
  repository's top-level `configs/`). The config's name is its path relative to that folder,
  without `.yaml`, with `/` separators: `configs/demo/tiny_needle_qa.yaml` is
  `demo/tiny_needle_qa`.
- Which recipe a config belongs to, from the config's file name:
    * a name ending in `_single_device` belongs to every recipe whose name ends in
      `_single_device`;
    * a name ending in `_distributed` belongs to every recipe whose name ends in
      `_distributed`;
    * any other config (for example `demo/tiny_needle_qa`) belongs to every recipe.
  A `_single_device` or `_distributed` config with no matching recipe is not registered.

Names must not repeat torchtune's own recipe or config names; `all_recipes` raises if they do.
"""

import importlib.resources
from pathlib import Path
from typing import List, Optional

from comparative_recipe._torchtune_compat import (
    Config,
    Recipe,
    builtin_recipes,
    tune_cli_parser,
    use_recipes_in_cli,
)

RECIPES_PACKAGE = "comparative_recipe.recipes"
CONFIGS_PACKAGE = "comparative_recipe.configs"

# Config and recipe name endings that tie a config to a kind of recipe.
_KIND_SUFFIXES = ("_single_device", "_distributed")


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
        configs = []
        for config_file in config_files:
            config_name = config_file.relative_to(configs_dir).with_suffix("").as_posix()
            config_kind = _kind(config_file.stem)
            if config_kind is None or config_kind == recipe_kind:
                configs.append(Config(name=config_name, file_path=str(config_file.resolve())))
        recipes.append(
            Recipe(
                name=recipe_name,
                file_path=str(recipe_file.resolve()),
                configs=sorted(configs, key=lambda c: c.name),
                supports_distributed=recipe_kind == "_distributed",
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


def main() -> None:
    """Entry point of the `tune-cmp` console script; reads its arguments from sys.argv."""
    use_recipes_in_cli(all_recipes())
    cli = tune_cli_parser("tune-cmp")
    args = cli.parse_args()
    cli.run(args)


if __name__ == "__main__":
    main()
