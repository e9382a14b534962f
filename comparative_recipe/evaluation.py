"""`tune-cmp eval`: a trained checkpoint's task metrics for the full model and every ablation.

The evaluation is the training loop's validation (``Trainer.evaluate``: the method's
``validation_step`` over every sample once, sums reduced over ranks) run on a checkpoint, with
``validation.passes: all`` by default, so it reports the neuron-utility view: the task loss of
the full model and of each ablated sub-model (``loss_k``), with ``accuracy_k``/``macro_f1_k``
for classification and, with ``generate``, ``exact_match_k``/``f1_k`` for generative QA.

The config is the training config (plus ``checkpointer.checkpoint_dir=...``): keys the
evaluation does not read (optimizer, schedule, ...) are accepted, a key no recipe reads is an
error, and so is any unknown key of the ``eval`` section::

    eval:
      dataset: {...}          # default: validation.dataset
      batch_size: 64          # default: validation.batch_size, else batch_size
      passes: all             # all | full (the full model alone); methods with a passes key
      generate: {max_new_tokens: 32}   # default: validation.generate (none: no generation)
      output_path: ...        # default: <output_dir>/eval/<checkpoint dir name>.json
      overwrite: false        # an existing output file is an error unless true
      adapter: ...            # LoRA configs: a checkpoint directory of the run (adapter_model.pt);
                              # checkpointer.checkpoint_dir stays the base model. Unset: the base
                              # model (or merged weights) alone
      exit_rules: {...}       # method: early_exit: the exit rules to run and time (default:
                              # validation.exit_rules, else the method's: q_exit q=0.5, sample,
                              # patience; patience for objective: pabee)

This module turns such a config into the validation config the method and trainer read
(``evaluation_config``), finds the checkpoint's weight files, builds the JSON report and the
terminal table, and writes the report without ever replacing a file unless ``overwrite``.
"""

import datetime
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from comparative_recipe import checks
from comparative_recipe.outputs import write_file
from comparative_recipe.training.adapters import ADAPTER_WEIGHTS_FILE, adapter_files_in
from comparative_recipe.training.checkpointing import MERGED_DIR, weight_files
from comparative_recipe.training.trainer import check_config_keys

EVAL_KEYS = frozenset({"dataset", "batch_size", "passes", "generate", "output_path", "overwrite",
                       "adapter", "exit_rules"})

# Per-pass metrics of a report, in table order (each present when the method computed it).
PASS_METRICS = ("loss", "accuracy", "macro_f1", "exact_match", "f1")
SUMMARY_METRICS = ("cmp_loss", "violation_rate")
REPORT_VERSION = 1


@dataclass
class EvalSettings:
    """What the ``eval`` section decides besides the validation config.

    output_path: the JSON report; overwrite: whether an existing one may be replaced;
    checkpoint_overrides: checkpointer keys replaced to load the checkpoint (its weight files);
    adapter_dir: a LoRA run's checkpoint directory whose adapter goes on the loaded weights.
    """

    output_path: Path
    overwrite: bool = False
    checkpoint_overrides: Dict[str, Any] = field(default_factory=dict)
    adapter_dir: Optional[Path] = None


def checkpoint_overrides(checkpointer: Any) -> Dict[str, Any]:
    """The checkpointer keys to replace so that it loads the weights in ``checkpoint_dir``.

    The configured ``checkpoint_files`` when every one is in the directory (a base model, or
    files named on the command line); otherwise every ``*.safetensors`` (else ``*.bin``) file in
    it, as the recipes write them (``checkpoints/step_N``, ``best``). A missing directory is an
    error: no checkpointer gets the chance to create or initialise one.
    """
    directory = checkpointer.get("checkpoint_dir", None)
    if directory is None:
        raise ValueError("checkpointer.checkpoint_dir is not set: the checkpoint to evaluate")
    directory = Path(str(directory))
    if not directory.is_dir():
        raise FileNotFoundError(
            f"checkpointer.checkpoint_dir {directory} is not a directory: give the checkpoint to "
            "evaluate, e.g. <output_dir>/best or <output_dir>/checkpoints/step_<N>"
        )
    configured = checkpointer.get("checkpoint_files", None)
    if configured is not None and not isinstance(configured, str) and hasattr(configured, "keys"):
        return {}  # torchtune's {filename_format, max_filename} form: as configured
    if configured:
        names = [configured] if isinstance(configured, str) else [str(f) for f in configured]
        if all((directory / f).is_file() for f in names):
            return {"checkpoint_files": names}
    try:
        return {"checkpoint_files": weight_files(directory)}
    except FileNotFoundError as e:
        if adapter_files_in(directory):
            merged = directory / MERGED_DIR
            raise FileNotFoundError(
                f"{directory} holds a LoRA adapter, not model weights: keep "
                "checkpointer.checkpoint_dir at the base model and pass "
                f"eval.adapter={directory}"
                + (f", or evaluate its merged weights with checkpointer.checkpoint_dir={merged}"
                   if merged.is_dir() else "")
            ) from e
        nested = sorted(
            str(p.relative_to(directory)) for p in directory.glob("*/**/*.safetensors")
        )[:4]
        hint = f"; it has weights in subfolders: {nested}" if nested else ""
        raise FileNotFoundError(f"{e}{hint}") from e


def config_section(cfg: DictConfig, name: str, keys: frozenset) -> Any:
    """The section ``name`` of ``cfg`` (an empty one when absent), its keys checked."""
    section = cfg.get(name, None)
    section = {} if section is None else section
    if not hasattr(section, "keys"):
        raise ValueError(f"{name} must be a section of keys {sorted(keys)}, got {section!r}")
    check_config_keys(section, keys, f"the {name} section")
    return section


def section_output_dir(cfg: DictConfig, section: Any, name: str, default: str) -> Path:
    """``<name>.output_dir`` of ``section``, else ``<output_dir>/<default>``."""
    out = section.get("output_dir", None)
    if out is None:
        if cfg.get("output_dir", None) is None:
            raise ValueError(f"set {name}.output_dir (or output_dir): where the {name} output goes")
        out = Path(str(cfg.output_dir)) / default
    return Path(str(out))


def with_evaluated_data(cfg: DictConfig, section: Any, name: str) -> DictConfig:
    """A copy of ``cfg`` whose ``validation`` section holds the data an evaluation scores:
    ``dataset``, ``batch_size`` and ``generate`` of ``section`` (the ``eval`` or ``analyze``
    section, called ``name``) where set, else the validation's (batch size: else the run's)."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    val = out.get("validation", None)
    val = OmegaConf.create({}) if val is None else val
    dataset = section.get("dataset", None)
    if dataset is None:
        dataset = val.get("dataset", None)
    if dataset is None:
        raise ValueError(f"nothing to evaluate on: set {name}.dataset (or validation.dataset)")
    batch_size = section.get("batch_size", None)
    if batch_size is None:
        batch_size = val.get("batch_size", None)
    if batch_size is None:
        batch_size = cfg.get("batch_size", 1)
    val.dataset = dataset
    val.batch_size = checks.positive_int(batch_size, f"{name}.batch_size")
    if section.get("generate", None) is not None:
        val.generate = section.get("generate")
    out.validation = val
    return out


def evaluation_config(cfg: DictConfig) -> Tuple[DictConfig, EvalSettings]:
    """The config the method and the trainer read for an evaluation, and the eval settings.

    A copy of ``cfg`` whose ``validation`` section holds the evaluated dataset, batch size,
    passes and generation settings (the ``eval`` section's, else the validation's). Checks the
    ``eval`` section's keys and the output path (an existing file without ``overwrite`` is an
    error), before anything is loaded.
    """
    section = config_section(cfg, "eval", EVAL_KEYS)
    out = with_evaluated_data(cfg, section, "eval")
    val = out.validation
    passes = section.get("passes", None)
    if passes is None and "passes" in _method_validation_keys(cfg):
        passes = "all"  # the ablation curve, where the method has one
    if passes is not None:
        val.passes = passes
    exit_rules = section.get("exit_rules", None)
    if exit_rules is None and "exit_rules" in _method_validation_keys(cfg):
        exit_rules = val.get("exit_rules", None) or "default"  # the method's
    if exit_rules is not None:
        val.exit_rules = exit_rules

    overwrite = checks.flag(section.get("overwrite", False), "eval.overwrite")
    path = section.get("output_path", None)
    if path is None:
        if cfg.get("output_dir", None) is None:
            raise ValueError("set eval.output_path (or output_dir): where the report goes")
        name = Path(str(cfg.checkpointer.get("checkpoint_dir", "checkpoint"))).name or "checkpoint"
        path = Path(str(cfg.output_dir)) / "eval" / f"{name}.json"
    path = Path(str(path))
    check_output_path(path, overwrite)
    adapter = section.get("adapter", None)
    if adapter is not None:
        adapter = Path(str(adapter))
        if not (adapter / ADAPTER_WEIGHTS_FILE).is_file():
            raise FileNotFoundError(
                f"eval.adapter {adapter} is not a LoRA checkpoint directory (it must hold "
                f"{ADAPTER_WEIGHTS_FILE}): give <output_dir>/best or "
                "<output_dir>/checkpoints/step_<N> of a LoRA run"
            )
    return out, EvalSettings(path, overwrite, checkpoint_overrides(cfg.checkpointer), adapter)


def _method_validation_keys(cfg: DictConfig) -> frozenset:
    """The ``validation`` keys of the method the config names (``method:``, default
    comparative); an unknown name is left to ``build_method`` to report."""
    from comparative_recipe.methods import METHODS

    method = METHODS.get(cfg.get("method", "comparative"), None)
    return frozenset() if method is None else frozenset(method.validation_keys)


def check_output_path(path: Path, overwrite: bool, section: str = "eval") -> None:
    """An output file may be written: not a directory, and absent unless ``overwrite``
    (``section``: the config section whose ``output_path``/``overwrite`` keys the message names)."""
    if path.is_dir():
        raise IsADirectoryError(f"{section}.output_path {path} is a directory; name a .json file")
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} exists: it is never replaced unless {section}.overwrite=true; choose another "
            f"{section}.output_path or set {section}.overwrite=true"
        )


def n_passes(metrics: Dict[str, float]) -> int:
    return sum(1 for k in metrics if k.startswith("val_loss_") and k[9:].isdigit())


def _plain(value: Any) -> Any:
    """A config value as JSON data (interpolations resolved)."""
    if isinstance(value, DictConfig) or OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    return value


def evaluation_report(
    metrics: Dict[str, float],
    *,
    cfg: DictConfig,
    settings: EvalSettings,
    pass_labels: Optional[Sequence[str]] = None,
    world_size: int = 1,
    exit_rules: Optional[List[Dict[str, Any]]] = None,
) -> Dict[str, Any]:
    """The JSON report of an evaluation (layout in the README's `tune-cmp eval` section).

    ``metrics``: ``Trainer.evaluate()``'s (``val_`` names); ``cfg``: the evaluation config
    (``evaluation_config``); ``pass_labels``: what each pass ablates; ``exit_rules``: an
    early-exit method's rows (``EarlyExitMethod.exit_rule_rows``).
    """
    checkpointer = cfg.checkpointer
    passes: List[Dict[str, Any]] = []
    for k in range(n_passes(metrics)):
        entry: Dict[str, Any] = {"pass": k}
        entry["ablation"] = pass_labels[k] if pass_labels and k < len(pass_labels) else (
            "full model" if k == 0 else f"ablation {k}")
        for name in PASS_METRICS:
            if f"val_{name}_{k}" in metrics:
                entry[name] = metrics[f"val_{name}_{k}"]
        passes.append(entry)
    val = cfg.validation
    extra = {} if exit_rules is None else {"exit_rules": exit_rules}
    return {
        **extra,
        "version": REPORT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": {
            "checkpointer": str(checkpointer.get("_component_", "")),
            "checkpoint_dir": str(checkpointer.get("checkpoint_dir")),
            "checkpoint_files": _plain(settings.checkpoint_overrides.get(
                "checkpoint_files", checkpointer.get("checkpoint_files", None))),
            "adapter": None if settings.adapter_dir is None else str(settings.adapter_dir),
        },
        "dataset": _plain(val.dataset),
        "passes_evaluated": str(val.get("passes", "all")),
        "generate": _plain(val.get("generate", None)),
        "world_size": world_size,
        "samples": int(metrics.get("val_samples", 0)),
        "summary": {k: metrics[f"val_{k}"] for k in SUMMARY_METRICS if f"val_{k}" in metrics},
        "passes": passes,
        "metrics": dict(metrics),
    }


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def _aligned(header: List[str], rows: List[List[str]], left: int) -> List[str]:
    """Rows of cells in columns: the first ``left`` columns left-aligned, the rest right."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(  # noqa: E731
        c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
    ).rstrip()
    return [fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


EXIT_RULE_COLUMNS = ("accuracy", "exact_match", "macro_f1", "loss", "layers", "speedup")


def format_exit_rules(rows: List[Dict[str, Any]]) -> str:
    """An early-exit evaluation's table: one row per exit rule (``full``: all layers), then how
    many samples left at each layer."""
    columns = [c for c in EXIT_RULE_COLUMNS if any(c in r for r in rows)]
    header = ["rule", "setting", *columns]
    cells = [[r["rule"], r["setting"], *(_cell(r.get(c, "")) for c in columns)] for r in rows]
    lines = _aligned(header, cells, 2)
    lines.append("samples leaving at layer 1..L:")
    lines += [f"  {r['rule']}: {' '.join(str(int(c)) for c in r['exit_histogram'])}" for r in rows]
    return "\n".join(lines)


def format_table(report: Dict[str, Any]) -> str:
    """The report as the table ``tune-cmp eval`` prints: one row per pass, then the summary
    (an early-exit report: one row per exit rule)."""
    if "exit_rules" in report:
        return format_exit_rules(report["exit_rules"]) + f"\nsamples={report['samples']}"
    columns = [c for c in PASS_METRICS if any(c in p for p in report["passes"])]
    header = ["pass", "ablation", *columns]
    rows = [[str(p["pass"]), p["ablation"], *(_cell(p.get(c, "")) for c in columns)]
            for p in report["passes"]]
    lines = _aligned(header, rows, 2)
    summary = report["summary"]
    extra = [f"samples={report['samples']}"]
    extra += [f"{k}={_cell(float(summary[k]))}" for k in SUMMARY_METRICS if k in summary]
    if len(report["passes"]) > 1 and all("loss" in p for p in report["passes"]):
        losses = [p["loss"] for p in report["passes"]]
        ahead = all(losses[0] < other for other in losses[1:])
        extra.append("full model ahead of every ablation" if ahead
                     else "full model NOT ahead of every ablation")
    lines.append("  ".join(extra))
    return "\n".join(lines)


def write_report(path: Path, report: Dict[str, Any], overwrite: bool = False,
                 section: str = "eval") -> Path:
    """Writes ``report`` as JSON to ``path`` in one step: a complete file appears or nothing.

    Without ``overwrite`` an existing file is never replaced (FileExistsError naming
    ``<section>.overwrite``), even one created while the evaluation ran.
    """
    def dump(tmp: Path) -> None:
        tmp.write_text(json.dumps(report, indent=2) + "\n")

    message = None
    if not overwrite:
        try:
            check_output_path(Path(path), overwrite=False, section=section)
        except FileExistsError as e:
            raise FileExistsError(str(e)) from None
        message = (f"{path} appeared while this ran: it is never replaced unless "
                   f"{section}.overwrite=true")
    return write_file(path, dump, overwrite=overwrite, exists_message=message)
