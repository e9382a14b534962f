"""Tests of the `tune-cmp` CLI: the plugin registry, the real command, and the packaged files."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from comparative_recipe import cli
from comparative_recipe._torchtune_compat import (
    CLI_MODULES_USING_REGISTRY,
    check_compatible,
    use_recipes_in_cli,
)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RECIPE = "comparative_finetune_single_device"
RECIPE_FILE = REPO / "recipes" / f"{RECIPE}.py"
DEMO_CONFIG = "demo/tiny_needle_qa"
DEMO_CONFIG_FILE = REPO / "configs" / "demo" / "tiny_needle_qa.yaml"
TORCHTUNE_CLI_MODULES = [f"torchtune._cli.{sub}" for sub in CLI_MODULES_USING_REGISTRY]

needs_recipe = pytest.mark.skipif(
    not RECIPE_FILE.is_file(),
    reason=f"comparative_recipe/recipes/{RECIPE}.py (repo recipes/{RECIPE}.py) is not written yet",
)
needs_demo_config = pytest.mark.skipif(
    not DEMO_CONFIG_FILE.is_file(),
    reason="comparative_recipe/configs/demo/tiny_needle_qa.yaml (repo configs/demo/) "
    "is not written yet",
)


def cli_env(**extra):
    """The environment for CLI subprocesses: offline Hugging Face, no inherited PYTHONPATH."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


def touch(path, text=""):
    """Write `text` to `path`, creating its folders; return `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def ls_table(stdout):
    """`tune ls` output as {recipe: [config, ...]}."""
    table, recipe = {}, None
    for line in stdout.splitlines()[1:]:
        if not line.strip():
            continue
        if not line.startswith(" "):
            recipe = line.split()[0]
            table[recipe] = []
        table[recipe].append(line.split()[-1])
    return table


def tune_cmp(*args, cwd, env=None, timeout=300):
    """Run `tune-cmp ARGS` (the console script if installed, else `python -m`) in `cwd`."""
    script = BIN / "tune-cmp"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "comparative_recipe.cli"]
    return subprocess.run(
        command + [str(a) for a in args],
        cwd=cwd,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---------------------------------------------------------------- registry (in process)


def test_plugin_recipes_maps_configs_by_name(tmp_path):
    recipes, configs = tmp_path / "recipes", tmp_path / "configs"
    touch(recipes / "__init__.py")
    touch(recipes / "_helpers.py")
    touch(recipes / "cmp_single_device.py")
    touch(recipes / "cmp_distributed.py")
    touch(configs / "__init__.py")
    touch(configs / "demo" / "tiny.yaml")
    touch(configs / "fam" / "1B_single_device.yaml")
    touch(configs / "fam" / "1B_distributed.yaml")
    touch(configs / "fam" / "sub" / "2B_single_device.yaml")

    found = {r.name: r for r in cli.plugin_recipes(recipes, configs)}

    assert sorted(found) == ["cmp_distributed", "cmp_single_device"]
    single, dist = found["cmp_single_device"], found["cmp_distributed"]
    assert [c.name for c in single.configs] == [
        "demo/tiny",
        "fam/1B_single_device",
        "fam/sub/2B_single_device",
    ]
    assert [c.name for c in dist.configs] == ["demo/tiny", "fam/1B_distributed"]
    assert single.supports_distributed is False and dist.supports_distributed is True
    assert single.file_path == str((recipes / "cmp_single_device.py").resolve())
    assert dist.configs[1].file_path == str((configs / "fam" / "1B_distributed.yaml").resolve())
    # torchtune joins ROOT / "recipes" / file_path: an absolute file_path wins.
    from torchtune._cli import run

    config_path = dist.configs[1].file_path
    assert run.ROOT / "recipes" / single.file_path == Path(single.file_path)
    assert run.ROOT / "recipes" / "configs" / config_path == Path(config_path)


def test_config_without_matching_recipe_is_not_registered(tmp_path):
    touch(tmp_path / "recipes" / "cmp_single_device.py")
    touch(tmp_path / "configs" / "fam" / "1B_distributed.yaml")
    (recipe,) = cli.plugin_recipes(tmp_path / "recipes", tmp_path / "configs")
    assert recipe.configs == []


def test_installed_registry_lists_the_package_files():
    recipes = cli.plugin_recipes()
    expected = sorted(p.stem for p in (REPO / "recipes").glob("*.py") if not p.name.startswith("_"))
    assert [r.name for r in recipes] == expected
    for recipe in recipes:
        assert Path(recipe.file_path).is_absolute() and Path(recipe.file_path).is_file()
        for config in recipe.configs:
            assert Path(config.file_path).is_absolute() and Path(config.file_path).is_file()
    if RECIPE_FILE.is_file() and DEMO_CONFIG_FILE.is_file():
        single = next(r for r in recipes if r.name == RECIPE)
        assert DEMO_CONFIG in [c.name for c in single.configs]


def test_all_recipes_keeps_torchtune_first_and_rejects_clashes(tmp_path):
    touch(tmp_path / "recipes" / "cmp_single_device.py")
    ours = cli.plugin_recipes(tmp_path / "recipes", tmp_path / "configs")
    merged = cli.all_recipes(ours)
    assert merged[0].name != "cmp_single_device" and merged[-1].name == "cmp_single_device"
    assert "full_finetune_single_device" in [r.name for r in merged]

    touch(tmp_path / "clash" / "full_finetune_single_device.py")
    with pytest.raises(ValueError, match="already a torchtune recipe"):
        cli.all_recipes(cli.plugin_recipes(tmp_path / "clash", tmp_path / "configs"))


def test_patch_points_each_subcommand_at_the_merged_list(monkeypatch, tmp_path):
    import importlib

    modules = [importlib.import_module(name) for name in TORCHTUNE_CLI_MODULES]
    for module in modules:  # so that monkeypatch restores torchtune's function afterwards
        monkeypatch.setattr(module, "get_all_recipes", module.get_all_recipes)
    touch(tmp_path / "recipes" / "cmp_single_device.py")
    merged = cli.all_recipes(cli.plugin_recipes(tmp_path / "recipes", tmp_path / "configs"))

    use_recipes_in_cli(merged)

    for module in modules:
        assert module.get_all_recipes() is merged


def test_the_installed_torchtune_has_every_internal_the_compat_layer_uses():
    """Fails loudly if torchtune changes under `_torchtune_compat` (the one module that touches
    torchtune's private CLI internals)."""
    check_compatible()


# ---------------------------------------------------------------- the command (subprocess)


def test_ls_lists_ours_and_torchtunes(tmp_path):
    result = tune_cmp("ls", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    table = ls_table(result.stdout)
    assert "llama3_2/1B_full_single_device" in table["full_finetune_single_device"]
    for recipe in cli.plugin_recipes():
        assert table[recipe.name] == ([c.name for c in recipe.configs] or ["<>"])
    if RECIPE_FILE.is_file() and DEMO_CONFIG_FILE.is_file():
        assert DEMO_CONFIG in table[RECIPE]


@pytest.fixture(scope="module")
def copied(tmp_path_factory):
    """A folder where `tune-cmp cp` put the recipe as x.py and the demo config as x.yaml."""
    folder = tmp_path_factory.mktemp("copied")
    for name, destination in [(RECIPE, "x.py"), (DEMO_CONFIG, "x.yaml")]:
        result = tune_cmp("cp", name, destination, cwd=folder)
        assert result.returncode == 0, result.stderr
        assert f"Copied file to {destination}" in result.stdout
    return folder


@needs_recipe
@needs_demo_config
def test_cp_copies_recipe_and_config(copied):
    assert (copied / "x.py").read_bytes() == RECIPE_FILE.read_bytes()
    assert (copied / "x.yaml").read_bytes() == DEMO_CONFIG_FILE.read_bytes()


@needs_demo_config
def test_cat_prints_the_demo_config(tmp_path):
    result = tune_cmp("cat", DEMO_CONFIG, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout) == yaml.safe_load(DEMO_CONFIG_FILE.read_text())


@needs_recipe
def test_run_with_unknown_config_fails_like_torchtune(tmp_path):
    # torchtune takes a config name it does not know for a path, and the recipe fails to open it.
    result = tune_cmp("run", RECIPE, "--config", "no_such/config", cwd=tmp_path)
    assert result.returncode != 0
    assert "FileNotFoundError" in result.stderr
    assert str(tmp_path / "no_such" / "config") in result.stderr


def run_main_in_process(argv, monkeypatch, capsys):
    """Call `cli.main()` with sys.argv = ["tune-cmp", *argv]; return (exit code, stdout, stderr).

    `capsys` may be pytest's capsys or capfd (capfd also sees the output of child processes).

    torchtune's module globals, sys.argv and sys.path are restored afterwards. Used where a
    subprocess (~6 s of imports each) would only repeat what the subprocess tests cover.
    """
    import importlib

    for name in TORCHTUNE_CLI_MODULES:
        module = importlib.import_module(name)
        monkeypatch.setattr(module, "get_all_recipes", module.get_all_recipes)
    monkeypatch.setattr(sys, "argv", ["tune-cmp", *argv])
    monkeypatch.setattr(sys, "path", list(sys.path))
    code = 0
    try:
        cli.main()
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@needs_recipe
def test_run_passes_torchrun_flags_and_rejects_them_for_single_device(monkeypatch, capsys):
    code, _, err = run_main_in_process(
        ["run", "--nproc_per_node", "2", "--nnodes", "1", RECIPE, "--config", DEMO_CONFIG],
        monkeypatch,
        capsys,
    )
    assert code == 2
    assert f"tune-cmp run: error: Recipe {RECIPE} does not support distributed training" in err


def test_run_without_config_reports_tune_cmp_usage(monkeypatch, capsys):
    code, _, err = run_main_in_process(["run", "full_finetune_single_device"], monkeypatch, capsys)
    assert code == 2
    assert "usage: tune-cmp run [TORCHRUN-OPTIONS]" in err
    assert "The '--config' argument is required." in err


def test_torchrun_flags_launch_a_distributed_plugin_recipe(tmp_path, monkeypatch, capfd):
    script = touch(
        tmp_path / "recipes" / "echo_distributed.py",
        # One file per rank: two ranks printing to one pipe interleave their characters.
        "import os, pathlib, sys\n"
        "rank = os.environ['RANK']\n"
        "line = f\"rank {rank} of {os.environ['WORLD_SIZE']} {sys.argv[1:]}\"\n"
        "pathlib.Path(f'rank{rank}.txt').write_text(line)\n",
    )
    config = touch(tmp_path / "configs" / "demo" / "echo.yaml", "a: 1\n")
    ours = cli.plugin_recipes(tmp_path / "recipes", tmp_path / "configs")
    monkeypatch.setattr(cli, "plugin_recipes", lambda: ours)
    monkeypatch.chdir(tmp_path)
    # torchrun sets OMP_NUM_THREADS in its own process if unset; keep that out of later tests.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    code, _, _ = run_main_in_process(
        ["run", "--nproc_per_node", "2", "echo_distributed", "--config", "demo/echo", "k=v"],
        monkeypatch,
        capfd,
    )

    assert code == 0
    assert ours[0].file_path == str(script.resolve())
    for rank in (0, 1):
        line = (tmp_path / f"rank{rank}.txt").read_text()
        assert line == f"rank {rank} of 2 ['--config', '{config.resolve()}', 'k=v']"


# ---------------------------------------------------------------- end to end (slow)


def demo_overrides(config_file, output_dir):
    """key=value overrides that shrink the demo config to a few seconds, for keys it has."""
    cfg = OmegaConf.load(config_file)
    wanted = {
        "epochs": 1,
        "max_steps_per_epoch": 1,
        "batch_size": 2,
        "dataset.n_samples": 32,
        "validation.dataset.n_samples": 8,
        "validation.batch_size": 8,
        "validation.every_n_steps": 1000,
        "compile": False,
    }
    present = [f"{k}={v}" for k, v in wanted.items() if OmegaConf.select(cfg, k) is not None]
    return [f"output_dir={output_dir}"] + present


@pytest.mark.slow
@needs_recipe
@needs_demo_config
def test_run_demo_by_name_from_any_directory(tmp_path):
    overrides = demo_overrides(DEMO_CONFIG_FILE, tmp_path / "out")
    result = tune_cmp("run", RECIPE, "--config", DEMO_CONFIG, *overrides, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "base_model" / "model.safetensors").is_file()


@pytest.mark.slow
@needs_recipe
@needs_demo_config
def test_copied_recipe_runs_with_plain_tune_run(copied):
    tune = BIN / "tune"
    command = [str(tune)] if tune.exists() else [sys.executable, "-m", "torchtune._cli.tune"]
    overrides = demo_overrides(copied / "x.yaml", copied / "out")
    result = subprocess.run(
        command + ["run", "x.py", "--config", "x.yaml", *map(str, overrides)],
        cwd=copied,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (copied / "out" / "base_model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_wheel_packages_recipes_and_configs(tmp_path):
    # Build from a copy of the sources (plus probe files), so the build never writes into the repo.
    src = tmp_path / "src"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", ".pytest_cache", "__pycache__", "*.egg-info",
            "build", "dist", "outputs", "tests",
        ),
    )
    touch(src / "recipes" / "probe_recipe_single_device.py", 'print("probe recipe")\n')
    touch(src / "configs" / "probe_family" / "deeper" / "probe_single_device.yaml", "probe: 1\n")
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    build = subprocess.run(
        pip_wheel + ["-w", str(tmp_path / "dist"), str(src)],
        cwd=tmp_path,
        env=cli_env(PIP_DISABLE_PIP_VERSION_CHECK="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("comparative_recipe-*.whl")

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    expected = {f"comparative_recipe/recipes/{p.name}" for p in (src / "recipes").glob("*.py")}
    expected |= {
        f"comparative_recipe/configs/{p.relative_to(src / 'configs').as_posix()}"
        for p in (src / "configs").rglob("*.yaml")
    }
    assert "comparative_recipe/recipes/probe_recipe_single_device.py" in expected
    assert "comparative_recipe/configs/probe_family/deeper/probe_single_device.yaml" in expected
    assert expected <= names, sorted(expected - names)
    assert "comparative_recipe/cli.py" in names
    (entry_points,) = (tmp_path / "site").glob("comparative_recipe-*.dist-info/entry_points.txt")
    entry_points = entry_points.read_text()
    assert "tune-cmp = comparative_recipe.cli:main" in entry_points
    assert not any(name.startswith(("recipes/", "configs/")) for name in names)

    # The unpacked wheel, first on the path, serves its own recipes and configs to the CLI.
    result = subprocess.run(
        [sys.executable, "-m", "comparative_recipe.cli", "ls"],
        cwd=tmp_path,
        env=cli_env(PYTHONPATH=str(tmp_path / "site")),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    table = ls_table(result.stdout)
    assert "probe_family/deeper/probe_single_device" in table["probe_recipe_single_device"]



# ---------------------------------------------------------------- tune-cmp eval


def test_an_eval_recipe_takes_every_config_and_torchrun(tmp_path):
    touch(tmp_path / "recipes" / "cmp_single_device.py")
    touch(tmp_path / "recipes" / "cmp_eval.py")
    touch(tmp_path / "configs" / "demo" / "tiny.yaml")
    touch(tmp_path / "configs" / "fam" / "1B_single_device.yaml")
    touch(tmp_path / "configs" / "fam" / "8B_distributed.yaml")
    found = {r.name: r for r in cli.plugin_recipes(tmp_path / "recipes", tmp_path / "configs")}
    assert [c.name for c in found["cmp_eval"].configs] == [
        "demo/tiny", "fam/1B_single_device", "fam/8B_distributed"]
    assert found["cmp_eval"].supports_distributed is True
    assert [c.name for c in found["cmp_single_device"].configs] == ["demo/tiny", "fam/1B_single_device"]


@pytest.mark.parametrize("name", [cli.EVAL_RECIPE, cli.ANALYZE_RECIPE, cli.PRUNE_RECIPE])
def test_installed_eval_recipe_is_registered(name):
    (recipe,) = [r for r in cli.plugin_recipes() if r.name == name]
    assert recipe.supports_distributed
    if DEMO_CONFIG_FILE.is_file():
        assert DEMO_CONFIG in [c.name for c in recipe.configs]


@pytest.mark.parametrize("argv,expected", [
    (["eval", "--config", "c", "k=v"], ["run", "comparative_eval", "--config", "c", "k=v"]),
    (["eval", "--nproc_per_node", "2", "--config", "c"],
     ["run", "--nproc_per_node", "2", "comparative_eval", "--config", "c"]),
    (["prune", "--nproc_per_node", "2", "--config", "c", "prune.sparsity=0.3"],
     ["run", "--nproc_per_node", "2", "comparative_prune", "--config", "c", "prune.sparsity=0.3"]),
    (["eval", "k=v"], None),                 # no --config: the eval parser reports it
    (["eval", "--help", "--config", "c"], None),
    (["run", "x", "--config", "c"], None),
])
def test_eval_is_run_of_the_eval_recipe(argv, expected):
    assert cli.eval_as_run(argv) == expected


def test_eval_without_config_reports_eval_usage(monkeypatch, capsys):
    code, _, err = run_main_in_process(["eval", "k=v"], monkeypatch, capsys)
    assert code == 2
    assert "usage: tune-cmp eval [TORCHRUN-OPTIONS] --config <config>" in err
    assert "the '--config' argument is required" in err
    code, out, _ = run_main_in_process(["--help"], monkeypatch, capsys)
    assert code == 0 and "eval" in out and "Evaluate a checkpoint" in out


def test_eval_with_torchrun_flags_launches_the_eval_recipe_on_each_rank(tmp_path, monkeypatch, capfd):
    touch(
        tmp_path / "recipes" / f"{cli.EVAL_RECIPE}.py",
        "import os, pathlib, sys\n"
        "rank = os.environ['RANK']\n"
        "pathlib.Path(f'rank{rank}.txt').write_text(f\"{os.environ['WORLD_SIZE']} {sys.argv[1:]}\")\n",
    )
    config = touch(tmp_path / "configs" / "fam" / "1B_distributed.yaml", "a: 1\n")
    ours = cli.plugin_recipes(tmp_path / "recipes", tmp_path / "configs")
    monkeypatch.setattr(cli, "plugin_recipes", lambda: ours)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    code, _, _ = run_main_in_process(
        ["eval", "--nproc_per_node", "2", "--config", "fam/1B_distributed", "k=v"], monkeypatch, capfd
    )
    assert code == 0
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == f"2 ['--config', '{config.resolve()}', 'k=v']"
