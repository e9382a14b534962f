"""Everything that touches torchtune's private internals, in one place (torchtune 0.6.1).

torchtune has no plugin mechanism for third-party recipes, so ``tune-cmp`` re-points the recipe
registry that torchtune's CLI subcommands look up, and renames the program in its argparse
parser. ``check_compatible()`` verifies every internal this module relies on; the tests call it,
so an installed torchtune that changed under us fails loudly instead of misbehaving.
"""

import argparse
import importlib
from typing import Callable, List

import torchtune
from torchtune._recipe_registry import Config, Recipe, get_all_recipes
from torchtune.config._utils import _get_component_from_path

__all__ = ["Config", "Recipe", "add_subcommand", "builtin_recipes", "check_compatible",
           "component", "tune_cli_parser", "use_recipes_in_cli"]

SUPPORTED_TORCHTUNE = "0.6.1"
# The torchtune CLI modules that look recipes up through their module-global `get_all_recipes`.
CLI_MODULES_USING_REGISTRY = ("cat", "cp", "ls", "run")


def component(dotted_path: str) -> Callable:
    """The object a config's ``_component_`` path names, resolved as torchtune resolves it."""
    return _get_component_from_path(dotted_path)


def builtin_recipes() -> List[Recipe]:
    """torchtune's own recipes and configs."""
    return list(get_all_recipes())


def use_recipes_in_cli(recipes: List[Recipe]) -> None:
    """Makes torchtune's CLI subcommands see ``recipes`` instead of torchtune's own list.

    Each ``torchtune._cli.<sub>`` module did ``from torchtune._recipe_registry import
    get_all_recipes``, so its global name ``get_all_recipes`` is what its subcommand calls; it is
    rebound in each module.
    """
    for sub in CLI_MODULES_USING_REGISTRY:
        module = importlib.import_module(f"torchtune._cli.{sub}")
        module.get_all_recipes = lambda: recipes


def tune_cli_parser(prog: str) -> "torchtune._cli.tune.TuneCLIParser":
    """torchtune's CLI parser, with ``tune`` renamed to ``prog`` in its messages."""
    from torchtune._cli.tune import TuneCLIParser

    cli = TuneCLIParser()
    parser = cli._parser
    parser.prog = prog
    parser.description = "torchtune's CLI with the comparative_recipe recipes and configs registered."
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                if subparser.prog.startswith("tune "):
                    subparser.prog = prog + subparser.prog[len("tune"):]
                if subparser.usage and subparser.usage.startswith("tune "):
                    subparser.usage = prog + subparser.usage[len("tune"):]
    return cli


def _subcommands(cli: "torchtune._cli.tune.TuneCLIParser") -> argparse._SubParsersAction:
    for action in cli._parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise RuntimeError("torchtune's CLI parser has no subcommands")


def add_subcommand(cli: "torchtune._cli.tune.TuneCLIParser", name: str, **kwargs) -> argparse.ArgumentParser:
    """A new subcommand ``name`` of torchtune's CLI parser (listed in its help), named after
    the parser's program; ``kwargs`` go to ``add_parser``."""
    kwargs.setdefault("prog", f"{cli._parser.prog} {name}")
    kwargs.setdefault("formatter_class", argparse.RawTextHelpFormatter)
    return _subcommands(cli).add_parser(name, **kwargs)


def check_compatible() -> None:
    """Raises RuntimeError naming the first internal of torchtune this module relies on that the
    installed torchtune lacks (or a version other than the one it was written for)."""
    problems = []
    if torchtune.__version__.split("+")[0] != SUPPORTED_TORCHTUNE:
        problems.append(f"torchtune {torchtune.__version__} is installed, "
                        f"this module was written for {SUPPORTED_TORCHTUNE}")
    for sub in CLI_MODULES_USING_REGISTRY:
        module = importlib.import_module(f"torchtune._cli.{sub}")
        if not isinstance(getattr(module, "get_all_recipes", None), Callable):
            problems.append(f"torchtune._cli.{sub} has no module-global get_all_recipes")
    from torchtune._cli.tune import TuneCLIParser

    cli = TuneCLIParser()
    if not isinstance(getattr(cli, "_parser", None), argparse.ArgumentParser):
        problems.append("TuneCLIParser has no _parser")
    elif not any(isinstance(a, argparse._SubParsersAction) for a in cli._parser._actions):
        problems.append("TuneCLIParser._parser has no subcommands")
    for field in ("name", "file_path", "configs", "supports_distributed"):
        if field not in Recipe.__dataclass_fields__:
            problems.append(f"torchtune._recipe_registry.Recipe has no field {field!r}")
    if problems:
        raise RuntimeError("comparative_recipe's torchtune compatibility layer is out of date: "
                           + "; ".join(problems))
