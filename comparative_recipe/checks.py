"""The argument and config-value validators every module uses: one message format, one place.

Each check returns the value (converted where that is safe) or raises ``ValueError`` naming the
key, the bad value and what is expected, so config errors read the same wherever they arise.
"""

import math
from typing import Any, Collection


def non_negative_int(value: Any, key: str) -> int:
    """``value`` if it is an int >= 0 (bools are rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} must be a non-negative integer, got {value!r}")
    return value


def positive_int(value: Any, key: str) -> int:
    """``value`` if it is an int >= 1 (bools are rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    return value


def rate(value: Any, key: str) -> float:
    """``value`` as a float if it is a number in [0, 1): a drop or crop rate."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{key} must be a number in [0, 1), got {value!r}")
    return float(value)


def open_unit(value: Any, key: str) -> float:
    """``value`` as a float if it is a number strictly between 0 and 1: a probability."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{key} must be a number in (0, 1), got {value!r}")
    return float(value)


def finite_number(value: Any, key: str, *, allow_zero: bool = False) -> float:
    """``value`` as a float if it is finite and > 0 (>= 0 with ``allow_zero``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and (value >= 0 if allow_zero else value > 0)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{key} must be a finite number {bound}, got {value!r}")
    return float(value)


def flag(value: Any, key: str) -> bool:
    """``value`` if it is a bool (a YAML true / false)."""
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def choice(value: Any, valid: Collection[Any], key: str) -> Any:
    """``value`` if it is one of ``valid``."""
    if value not in valid:
        raise ValueError(f"{key} must be one of {list(valid)}, got {value!r}")
    return value


def known_keys(section: Any, valid: Collection[str], key: str, hint: str = "") -> None:
    """Raises when a config mapping ``section`` has keys outside ``valid``: a key that would be
    ignored is an error. ``hint`` is appended to the message (where the key belongs instead)."""
    unknown = sorted(set(section) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown keys in {key}: {unknown}; valid keys are {sorted(valid)}"
            + (f". {hint}" if hint else "")
        )
