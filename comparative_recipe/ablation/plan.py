"""The ablation chain: which of the c ablated passes crop the input and which drop hidden units.

Pass 0 is the full model. Pass k (1..c) is derived from pass k-1 by one more ablation step, either
one more input crop or one more power of the hidden-unit drop rate, so the chain is nested and
cumulative: with 2 crops + 2 hidden steps, crop first, the passes are (1,0), (1,1), (2,1), (2,2)
as (crop_level, drop_power).
"""

from dataclasses import dataclass

ORDERS = ("crop_first", "hidden_first", "crops_then_hidden", "hidden_then_crops")


@dataclass(frozen=True)
class AblationLevel:
    """How ablated one pass is.

    crop_level: number of nested input crops applied (0 = full input); see
        ``ablation.crops.crop_views``.
    drop_power: i in the hidden drop threshold p_i = 1 - (1 - p)**i (0 = no hidden ablation).
    """

    crop_level: int
    drop_power: int


def _alternate(first: str, n_first: int, second: str, n_second: int) -> list[str]:
    """first, second, first, ... until one kind runs out; the rest is the other kind."""
    steps = []
    for i in range(max(n_first, n_second)):
        if i < n_first:
            steps.append(first)
        if i < n_second:
            steps.append(second)
    return steps


def _step_kinds(n_hidden: int, n_input: int, order: str) -> list[str]:
    """The kind ("crop" or "hidden") of each ablation step, in chain order."""
    if order == "crop_first":
        return _alternate("crop", n_input, "hidden", n_hidden)
    if order == "hidden_first":
        return _alternate("hidden", n_hidden, "crop", n_input)
    if order == "crops_then_hidden":
        return ["crop"] * n_input + ["hidden"] * n_hidden
    return ["hidden"] * n_hidden + ["crop"] * n_input


def ablation_plan(n_hidden: int, n_input: int, order: str = "crop_first") -> list[AblationLevel]:
    """The c = n_hidden + n_input ablated passes 1..c, each as cumulative (crop_level, drop_power).

    order: "crop_first" (the reference: alternate, starting with a crop), "hidden_first",
    "crops_then_hidden" or "hidden_then_crops". When alternating and one kind runs out, the
    remaining steps are all of the other kind: 1 hidden + 3 input, crop first ->
    (1,0), (1,1), (2,1), (3,1).
    """
    for name, value in (("n_hidden", n_hidden), ("n_input", n_input)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if order not in ORDERS:
        raise ValueError(f"unknown ablation order {order!r}; valid orders: {', '.join(ORDERS)}")

    plan = []
    crop_level, drop_power = 0, 0
    for kind in _step_kinds(n_hidden, n_input, order):
        if kind == "crop":
            crop_level += 1
        else:
            drop_power += 1
        plan.append(AblationLevel(crop_level=crop_level, drop_power=drop_power))
    return plan
