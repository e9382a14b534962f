"""`tune-cmp analyze` end to end on a few steps of the demo: its points equal `tune-cmp eval` of
the same sub-models configured as the comparative loss's ablations, 2 ranks give the numbers of
one, the plots are written, and bad input fails before anything is."""

import json
import sys

import pytest

from tests.recipes.recipe_helpers import read_metrics, run

pytestmark = pytest.mark.slow

DEMO = ["--config", "demo/tiny_needle_qa", "validation.dataset.n_samples=25"]
FAST = ["analyze.seeds=[0,1]", "analyze.generate.max_new_tokens=4"]


def tune_cmp(*args, cwd, check=True, **env):
    return run([sys.executable, "-m", "comparative_recipe.cli", *map(str, args)], cwd=cwd,
               check=check, **env)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """4 demo steps, validated (every pass) at step 4 into best/."""
    tmp = tmp_path_factory.mktemp("analyze")
    out = tmp / "out"
    tune_cmp("run", "comparative_finetune_single_device", *DEMO, f"output_dir={out}",
             "max_steps_per_epoch=4", "validation.every_n_steps=4", "dataset.n_samples=64", cwd=tmp)
    return tmp, out


@pytest.fixture(scope="module")
def analysis(trained):
    tmp, out = trained
    proc = tune_cmp("analyze", *DEMO, f"output_dir={out}", *FAST,
                    f"analyze.checkpoints=[{out / 'base_model'},{out / 'best'}]",
                    "analyze.labels=[pretrained,trained]", cwd=tmp)
    return proc, json.loads((out / "analysis" / "ablation.json").read_text())


def _curve(entry, name):
    return next(c for c in entry["curves"] if c["name"] == name)


def test_the_report_has_every_curve_layer_and_attribution(trained, analysis):
    tmp, out = trained
    proc, report = analysis
    assert report["samples"] == 25 and report["metrics"] == ["loss", "exact_match", "f1"]
    assert [c["label"] for c in report["checkpoints"]] == ["pretrained", "trained"]
    for entry in report["checkpoints"]:
        names = [c["name"] for c in entry["curves"]]
        assert names == ["ffn_hidden", "attn_heads", "attn_out", "ffn_out", "all", "crop"]
        for curve in entry["curves"]:
            loss = curve["metrics"]["loss"]
            assert len(loss["per_seed"]) == 2 and len(loss["mean"]) == len(curve["rates"])
            # rate 0 is the full model for every seed
            assert all(row[0] == entry["full_model"]["loss"] for row in loss["per_seed"])
            assert all(lo <= m <= hi for lo, m, hi in zip(loss["min"], loss["mean"], loss["max"]))
        assert _curve(entry, "crop")["rates"] == [0.0, 0.25, 0.5, 0.75]
        assert entry["layers"]["num_layers"] == 2
        assert set(entry["layers"]["sites"]) == {"ffn_hidden", "attn_heads"}
        attr = entry["attribution"]["sites"]
        assert attr["ffn_hidden"]["units_per_layer"] == [256, 256]
        assert attr["attn_heads"]["units_per_layer"] == [4, 4]
        assert all(t > 0 for s in attr.values() for t in s["layer_total"])
    # the trained model: masking every site at half the units hurts more than a tenth of them
    trained_entry = report["checkpoints"][1]
    all_sites = _curve(trained_entry, "all")["metrics"]["loss"]["mean"]
    assert all_sites[-1] > all_sites[1] > trained_entry["full_model"]["loss"]
    # and each layer site has its own numbers
    per_layer = trained_entry["layers"]["sites"]
    assert per_layer["ffn_hidden"]["loss"]["mean"] != per_layer["attn_heads"]["loss"]["mean"]
    # the trained model's full-model loss is the training run's own validation of best/
    logged = read_metrics(out / "logs")[4]
    assert report["checkpoints"][1]["full_model"]["loss"] == pytest.approx(logged["val_loss_0"], rel=1e-5)
    # the summary: the area under every curve of both checkpoints
    assert "AUC above full" in proc.stdout
    assert proc.stdout.count("pretrained") >= 6 and proc.stdout.count("trained") >= 12
    for name in ("ablation_curves.png", "ablation_layers.png", "ablation_attribution.png"):
        assert (out / "analysis" / name).stat().st_size > 10_000, name


@pytest.mark.parametrize("curve, rate, seed, ablation", [
    ("ffn_hidden", 0.3, 1, ["ablation.n_hidden=1", "ablation.n_input=0", "ablation.hidden.rate=0.3",
                            "ablation.hidden.sites=[ffn_hidden]", "ablation.seed=1", "~ablation.crop"]),
    ("all", 0.5, 0, ["ablation.n_hidden=1", "ablation.n_input=0", "ablation.hidden.rate=0.5",
                     "ablation.hidden.sites=[ffn_hidden,attn_heads,attn_out,ffn_out]",
                     "ablation.seed=0", "~ablation.crop"]),
    ("crop", 0.5, 1, ["ablation.n_hidden=0", "ablation.n_input=1", "ablation.crop.rate=0.5",
                      "~ablation.hidden", "ablation.seed=1"]),
])
def test_a_curve_point_is_the_comparative_ablation_of_that_rate_and_seed(
    trained, analysis, curve, rate, seed, ablation
):
    """Independent path: `tune-cmp eval` with the config's own ablation section set to one
    pass of that rate and seed scores the same sub-model as the analysis point."""
    tmp, out = trained
    report = analysis[1]
    path = tmp / f"eval_{curve}.json"
    tune_cmp("eval", *DEMO, f"output_dir={out}", f"checkpointer.checkpoint_dir={out / 'best'}",
             *ablation, "eval.generate.max_new_tokens=4", f"eval.output_path={path}", cwd=tmp)
    passes = json.loads(path.read_text())["passes"]
    entry = _curve(report["checkpoints"][1], curve)
    at = entry["rates"].index(rate)
    for name in ("loss", "exact_match", "f1"):
        assert entry["metrics"][name]["per_seed"][seed][at] == pytest.approx(
            passes[1][name], rel=1e-5, abs=1e-6), name
        assert report["checkpoints"][1]["full_model"][name] == pytest.approx(passes[0][name], rel=1e-5)


def test_two_ranks_give_the_numbers_of_one(trained, analysis):
    tmp, out = trained
    tune_cmp("analyze", "--nproc_per_node", "2", *DEMO, f"output_dir={out}", *FAST,
             f"analyze.checkpoints=[{out / 'base_model'},{out / 'best'}]",
             "analyze.labels=[pretrained,trained]", f"analyze.output_dir={tmp / 'two'}",
             "analyze.plots=false", cwd=tmp)
    two = json.loads((tmp / "two" / "ablation.json").read_text())
    one = analysis[1]
    assert two["samples"] == one["samples"] == 25

    def numbers(x, path=""):
        if isinstance(x, dict):
            for k, v in x.items():
                if k not in ("created", "checkpoint_dir"):
                    yield from numbers(v, f"{path}.{k}")
        elif isinstance(x, list):
            for i, v in enumerate(x):
                yield from numbers(v, f"{path}[{i}]")
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            yield path, x

    a, b = dict(numbers(one)), dict(numbers(two))
    assert a.keys() == b.keys() and len(a) > 500
    for key, value in a.items():
        if ".relative_log10_hist." in key:
            continue  # bin counts may move by one unit at a bin edge
        assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_bad_input_fails_before_anything_is_written(trained, analysis, tmp_path):
    tmp, out = trained
    proc = tune_cmp("analyze", *DEMO, f"output_dir={out}", cwd=tmp, check=False)
    assert proc.returncode != 0 and "analyze.overwrite=true" in proc.stderr.strip().splitlines()[-1]
    proc = tune_cmp("analyze", *DEMO, f"output_dir={out}", "analyze.rate=[0.1]",
                    f"analyze.output_dir={tmp_path}", cwd=tmp, check=False)
    assert proc.returncode != 0 and "did you mean 'rates'" in proc.stderr.strip().splitlines()[-1]
    # without matplotlib: the install hint, nothing written; plots=false writes the JSON alone
    fake = tmp_path / "no_matplotlib" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    env = {"PYTHONPATH": str(fake.parent)}
    proc = tune_cmp("analyze", *DEMO, f"output_dir={out}", "analyze.seeds=[0]",
                    f"analyze.output_dir={tmp_path / 'a'}", cwd=tmp, check=False, **env)
    assert proc.returncode != 0 and "comparative_recipe[plots]" in proc.stderr
    assert "analyze.plots=false" in proc.stderr and not (tmp_path / "a").exists()
    tune_cmp("analyze", *DEMO, f"output_dir={out}", "analyze.seeds=[0]", "analyze.plots=false",
             "analyze.layer_rate=null", "analyze.curves=[all]", f"analyze.output_dir={tmp_path / 'b'}",
             cwd=tmp, **env)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["ablation.json"]
