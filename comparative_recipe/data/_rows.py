"""Reading rows of a Hugging Face dataset: column checks and text fields with clear errors."""

from typing import Any, Mapping, Optional


def check_columns(data: Any, wanted: Mapping[str, Optional[str]], source: str) -> None:
    """ValueError naming the argument to set when a column is missing.  wanted: arg -> column."""
    columns = list(data.column_names)
    for argument, column in wanted.items():
        if column is not None and column not in columns:
            raise ValueError(
                f"{source}: column {column!r} not found; the dataset has columns {columns}. "
                f"Set {argument}=<one of them>."
            )


def text_field(value: Any, what: str, index: int) -> str:
    """A row value as text (numbers are converted); ValueError naming the sample otherwise."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"sample {index}: {what} must be a string, got {type(value).__name__}: {value!r}")
