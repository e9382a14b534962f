import pytest

from comparative_recipe.ablation.plan import ORDERS, AblationLevel, ablation_plan


def as_pairs(plan):
    return [(level.crop_level, level.drop_power) for level in plan]


@pytest.mark.parametrize(
    "n_hidden, n_input, expected",
    [
        (2, 2, [(1, 0), (1, 1), (2, 1), (2, 2)]),
        (1, 1, [(1, 0), (1, 1)]),
        (1, 3, [(1, 0), (1, 1), (2, 1), (3, 1)]),
        (3, 1, [(1, 0), (1, 1), (1, 2), (1, 3)]),
        (2, 0, [(0, 1), (0, 2)]),
        (0, 2, [(1, 0), (2, 0)]),
        (0, 0, []),
    ],
)
def test_crop_first_is_the_reference_default(n_hidden, n_input, expected):
    assert as_pairs(ablation_plan(n_hidden, n_input)) == expected
    assert ablation_plan(n_hidden, n_input) == ablation_plan(n_hidden, n_input, "crop_first")


@pytest.mark.parametrize(
    "n_hidden, n_input, expected",
    [
        (2, 2, [(0, 1), (1, 1), (1, 2), (2, 2)]),
        (1, 1, [(0, 1), (1, 1)]),
        (1, 3, [(0, 1), (1, 1), (2, 1), (3, 1)]),
        (3, 1, [(0, 1), (1, 1), (1, 2), (1, 3)]),
    ],
)
def test_hidden_first(n_hidden, n_input, expected):
    assert as_pairs(ablation_plan(n_hidden, n_input, "hidden_first")) == expected


def test_crops_then_hidden():
    plan = ablation_plan(2, 3, "crops_then_hidden")
    assert as_pairs(plan) == [(1, 0), (2, 0), (3, 0), (3, 1), (3, 2)]


def test_hidden_then_crops():
    plan = ablation_plan(2, 3, "hidden_then_crops")
    assert as_pairs(plan) == [(0, 1), (0, 2), (1, 2), (2, 2), (3, 2)]


@pytest.mark.parametrize("order", ORDERS)
def test_every_order_is_cumulative_one_step_at_a_time(order):
    plan = ablation_plan(3, 4, order)
    assert len(plan) == 7
    previous = AblationLevel(0, 0)
    for level in plan:
        steps = (level.crop_level - previous.crop_level, level.drop_power - previous.drop_power)
        assert steps in [(1, 0), (0, 1)]
        previous = level
    assert previous == AblationLevel(crop_level=4, drop_power=3)


def test_levels_are_frozen_and_comparable():
    level = ablation_plan(1, 1)[0]
    assert level == AblationLevel(crop_level=1, drop_power=0)
    with pytest.raises(Exception):
        level.crop_level = 3


@pytest.mark.parametrize(
    "args, message",
    [
        ((-1, 1), "n_hidden"),
        ((1, -2), "n_input"),
        ((1.5, 1), "n_hidden"),
        ((1, True), "n_input"),
    ],
)
def test_bad_counts_raise(args, message):
    with pytest.raises(ValueError, match=message):
        ablation_plan(*args)


def test_unknown_order_names_the_value_and_the_choices():
    with pytest.raises(ValueError) as info:
        ablation_plan(1, 1, "drop_first")
    assert "drop_first" in str(info.value)
    for order in ORDERS:
        assert order in str(info.value)
