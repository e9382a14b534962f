"""A training run's metric logs read back as series: metric name -> [(step, value)].

A run directory is a training run's ``output_dir``: ``torchtune_config.yaml`` (torchtune's
``save_config``) and the metric logger's files, found from the config's
``metric_logger.log_dir`` (or, without a config, by a search under the run directory):

- ``DiskLogger``: ``log_<unixtime>.txt`` text files, one line per ``log_dict`` / ``log`` call:
  ``Step 12 | loss:0.52 cmp_loss:0.52 ...`` (space-separated ``name:value`` pairs).
- ``TensorBoardLogger``: ``events.out.tfevents.*`` files (by default in a ``run_<rank>_<time>``
  subfolder per run), read with tensorboard's ``EventAccumulator`` (imported only then).

A resumed run starts a new file in the same folder and logs again the steps after its
checkpoint: all files are merged in the order they were started (the time in their names) and a
later value of a metric at the same step replaces an earlier one, so each series has one value
per step, sorted by step.
"""

import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

CONFIG_FILE = "torchtune_config.yaml"
DISK_LOG_GLOB = "log_*.txt"
EVENTS_GLOB = "events.out.tfevents.*"
TENSORBOARD_INSTALL_HINT = (
    "reading TensorBoard event files needs tensorboard: pip install tensorboard"
)
_LOGGER_HINT = (
    "The run needs a metric_logger that writes files: "
    "metric_logger._component_=torchtune.training.metric_logging.DiskLogger "
    "(or TensorBoardLogger) with metric_logger.log_dir=<output_dir>/logs"
)
_LINE = re.compile(r"^Step (-?\d+) \|(.*)$")
_DISK_NAME_TIME = re.compile(r"^log_(\d+)\.txt$")
_EVENTS_NAME_TIME = re.compile(r"^events\.out\.tfevents\.(\d+)")
_TB_RUN_FOLDER = re.compile(r"^run_\d+_(\d+(?:\.\d+)?)$")  # TensorBoardLogger(organize_logs=True)

Series = Dict[str, List[Tuple[int, float]]]


@dataclass
class RunLog:
    """The metrics one training run logged.

    run_dir: the run's directory; label: its name on plots (default: the directory's name);
    series: metric -> [(step, value)], sorted by step, one value per step; sources: the files
    read, in merge order; config: ``torchtune_config.yaml`` as plain data (None if absent).
    """

    run_dir: Path
    label: str
    series: Series = field(default_factory=dict)
    sources: List[Path] = field(default_factory=list)
    config: Optional[dict] = None

    def steps(self, name: str) -> List[int]:
        """The steps at which ``name`` was logged ([] if never)."""
        return [s for s, _ in self.series.get(name, [])]

    def values(self, name: str) -> List[float]:
        """The values of ``name``, in step order ([] if never logged)."""
        return [v for _, v in self.series.get(name, [])]

    def final(self) -> Dict[str, float]:
        """Each metric's value at the last step it was logged."""
        return {name: points[-1][1] for name, points in self.series.items() if points}


# ------------------------------------------------------------------------------------ config


def read_config(run_dir) -> Optional[dict]:
    """``<run_dir>/torchtune_config.yaml`` as plain data, interpolations (``${output_dir}``)
    resolved where they can be; None if the file is absent."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # a YAML error
        raise ValueError(f"{path}: not a readable config ({e}); fix or remove the file") from e
    try:
        data = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation that cannot be resolved here (e.g. an env variable)
        data = OmegaConf.to_container(cfg, resolve=False)
    return data if isinstance(data, dict) else None


def _configured_log_dirs(run_dir: Path, config: dict) -> Tuple[List[Path], Optional[str]]:
    """The folders the config's metric logger wrote to, most likely first, and its file name
    (DiskLogger's ``filename``) if set. A run directory that was moved or copied still has the
    old ``output_dir`` in its config: the same place under ``run_dir`` comes next."""
    logger = config.get("metric_logger") or {}
    if not isinstance(logger, dict):
        return [], None
    log_dir = logger.get("log_dir", logger.get("dir"))
    filename = logger.get("filename")
    if not log_dir or not isinstance(log_dir, str) or "${" in log_dir:
        # unresolved: try the common `${output_dir}/...` form against the run directory
        if isinstance(log_dir, str) and log_dir.startswith("${output_dir}"):
            return [run_dir / log_dir[len("${output_dir}"):].lstrip("/")], filename
        return [], filename
    path = Path(log_dir).expanduser()
    if not path.is_absolute():  # relative to where the run was started: unknown; try both
        return [run_dir / path, Path.cwd() / path], filename
    out = [path]
    output_dir = config.get("output_dir")
    if isinstance(output_dir, str) and "${" not in output_dir:
        try:
            out.append(run_dir / path.relative_to(Path(output_dir).expanduser()))
        except ValueError:
            pass
    return out, filename


def _files_in(folder: Path, filename: Optional[str] = None) -> List[Path]:
    if not folder.is_dir():
        return []
    files = set(folder.glob(DISK_LOG_GLOB)) | set(folder.rglob(EVENTS_GLOB))
    if filename:
        files |= {p for p in [folder / filename] if p.is_file()}
    return [p for p in files if p.is_file()]


def _start_time(path: Path) -> float:
    """When a log file was started: the unix time in its name (for TensorBoard, the finer one
    of its ``run_<rank>_<time>`` folder if it has one), else its modification time."""
    m = _DISK_NAME_TIME.match(path.name)
    if m:
        return float(m.group(1))
    m = _EVENTS_NAME_TIME.match(path.name)
    if m:
        folder = _TB_RUN_FOLDER.match(path.parent.name)
        return float(folder.group(1)) if folder else float(m.group(1))
    return path.stat().st_mtime


def _ordered(files: Iterable[Path]) -> List[Path]:
    return sorted(set(files), key=lambda p: (_start_time(p), str(p)))


def find_log_files(run_dir) -> List[Path]:
    """The metric log files of a run, in the order they were started (merge order).

    With ``torchtune_config.yaml``: the files in the config's ``metric_logger.log_dir``
    (DiskLogger ``log_*.txt`` and TensorBoard ``events.out.tfevents.*``, also in its
    ``run_*`` subfolders); if there are none there (or no config), every such file under
    ``run_dir``.

    Raises:
        FileNotFoundError: ``run_dir`` is missing, or no log file was found (the message says
            where it looked and what the run needs).
    """
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise FileNotFoundError(
            f"run directory {run_dir} does not exist: pass a training run's output_dir "
            f"(the folder with {CONFIG_FILE})"
        )
    looked: List[str] = []
    config = read_config(run_dir)
    if config is not None:
        dirs, filename = _configured_log_dirs(run_dir, config)
        for folder in dirs:
            looked.append(str(folder))
            files = _files_in(folder, filename)
            if files:
                return _ordered(files)
    looked.append(f"{run_dir} (searched recursively)")
    files = [p for p in run_dir.rglob(DISK_LOG_GLOB) if p.is_file()]
    files += [p for p in run_dir.rglob(EVENTS_GLOB) if p.is_file()]
    if files:
        return _ordered(files)
    where = "; ".join(looked)
    logger = (config or {}).get("metric_logger") if config else None
    component = logger.get("_component_") if isinstance(logger, dict) else None
    configured = f" (its config's metric_logger is {component})" if component else (
        " (its config has no metric_logger)" if config is not None else
        f" (and it has no {CONFIG_FILE})"
    )
    raise FileNotFoundError(
        f"no metric log files ({DISK_LOG_GLOB} or {EVENTS_GLOB}) for run {run_dir}{configured}; "
        f"looked in: {where}. {_LOGGER_HINT}"
    )


# ------------------------------------------------------------------------------------ readers


def _number(text: str) -> Optional[float]:
    try:
        return float(text)  # also nan, inf, -inf, 1e-05
    except ValueError:
        return None


def read_disk_log(path) -> List[Tuple[str, int, float]]:
    """(metric, step, value) records of one DiskLogger file, in file order.

    Raises:
        ValueError: a line that is not ``Step N | name:value ...``, or a value that is not a
            number; the message gives ``file:line`` and the line's text.
    """
    path = Path(path)
    records: List[Tuple[str, int, float]] = []
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    # The text after the last newline is a line being written (or cut by a crash): a complete
    # one is read; an incomplete one is skipped with a warning rather than blocking the plots.
    last = len(lines) - 1
    for number, raw in enumerate(lines, start=1):
        text = raw.rstrip("\r")
        if not text.strip():
            continue
        try:
            records.extend(_parse_line(text, path, number))
        except ValueError:
            if number - 1 == last:
                warnings.warn(f"{path}:{number}: skipping an incomplete last line: {text!r}")
                continue
            raise
    return records


def _parse_line(text: str, path: Path, number: int) -> List[Tuple[str, int, float]]:
    where = f"{path}:{number}"
    m = _LINE.match(text)
    if m is None:
        raise ValueError(
            f"{where}: not a DiskLogger line ('Step <n> | name:value ...'): {text!r}; "
            "fix or delete the line (or the file, if it is not a metric log)"
        )
    step = int(m.group(1))
    out = []
    for token in m.group(2).split():
        name, sep, value_text = token.rpartition(":")
        if not sep or not name:
            raise ValueError(
                f"{where}: {token!r} is not name:value in {text!r}; fix or delete the line"
            )
        value = _number(value_text)
        if value is None:
            raise ValueError(
                f"{where}: metric {name!r} has the non-numeric value {value_text!r} in "
                f"{text!r}; log numbers only (e.g. float(x), tensor.item()) or delete the line"
            )
        out.append((name, step, value))
    return out


def read_event_file(path) -> List[Tuple[str, int, float]]:
    """(metric, step, value) records of one TensorBoard event file (scalars, old style and
    ``new_style`` tensors), in the order they were written.

    Raises:
        ImportError: tensorboard is not installed (the message says ``pip install tensorboard``).
    """
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        from tensorboard.util import tensor_util
    except ImportError as e:
        raise ImportError(f"{path}: {TENSORBOARD_INSTALL_HINT}") from e
    acc = EventAccumulator(
        str(path), size_guidance={"scalars": 0, "tensors": 0}, purge_orphaned_data=False
    )
    acc.Reload()
    tags = acc.Tags()
    timed: List[Tuple[float, int, str, int, float]] = []
    order = 0
    for tag in tags.get("scalars", []):
        for e in acc.Scalars(tag):
            timed.append((e.wall_time, order, tag, int(e.step), float(e.value)))
            order += 1
    for tag in tags.get("tensors", []):
        if acc.SummaryMetadata(tag).plugin_data.plugin_name != "scalars":
            continue
        for e in acc.Tensors(tag):
            array = tensor_util.make_ndarray(e.tensor_proto)
            if array.size != 1:
                continue
            timed.append((e.wall_time, order, tag, int(e.step), float(array.reshape(-1)[0])))
            order += 1
    timed.sort(key=lambda r: (r[0], r[1]))
    return [(name, step, value) for _, _, name, step, value in timed]


def read_log_file(path) -> List[Tuple[str, int, float]]:
    """(metric, step, value) records of a DiskLogger text file or a TensorBoard event file."""
    path = Path(path)
    if path.name.startswith("events.out.tfevents."):
        return read_event_file(path)
    return read_disk_log(path)


def merge_records(record_lists: Iterable[Iterable[Tuple[str, int, float]]]) -> Series:
    """One series per metric, sorted by step; a later record at the same step wins."""
    latest: Dict[str, Dict[int, float]] = {}
    for records in record_lists:
        for name, step, value in records:
            latest.setdefault(name, {})[step] = value
    return {name: sorted(points.items()) for name, points in sorted(latest.items())}


def read_run(run_dir, label: Optional[str] = None) -> RunLog:
    """The metrics of the run in ``run_dir`` (its files found by ``find_log_files``), merged.

    Raises:
        FileNotFoundError: no run directory or no log files; ValueError: a malformed log line;
        ImportError: only TensorBoard files and no tensorboard.
    """
    run_dir = Path(run_dir).expanduser()
    files = find_log_files(run_dir)
    series = merge_records(read_log_file(p) for p in files)
    return RunLog(
        run_dir=run_dir,
        label=label if label is not None else (run_dir.resolve().name or str(run_dir)),
        series=series,
        sources=files,
        config=read_config(run_dir),
    )


def finite(values: Iterable[float]) -> List[float]:
    """The finite values (no NaN or inf)."""
    return [v for v in values if math.isfinite(v)]


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None (strict JSON has no NaN / inf)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
