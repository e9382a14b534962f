"""What `pip install .` (not editable) ships: every library package, recipe and config."""

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_library_package_is_listed_in_pyproject():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "comparative_recipe").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages"
    assert setuptools["package-dir"]["comparative_recipe.recipes"] == "recipes"
    assert setuptools["package-dir"]["comparative_recipe.configs"] == "configs"
