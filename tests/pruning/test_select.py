"""Which units go: the lowest scores, by hand; heads evenly from every kv group; the global
ranking's per-layer counts; every count that would empty a layer or break the grouping is an
error naming the sparsities that work."""

import pytest
import torch

from comparative_recipe.pruning.select import (
    achieved_sparsity,
    head_sparsities,
    keep_lowest_removed,
    removal_count,
    select_units,
)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


def test_uniform_removes_the_lowest_scores_of_every_layer():
    kept = select_units([t(3, 1, 2, 0), t(0, 5, 4, 1)], 0.5, "ffn_hidden")
    assert [k.tolist() for k in kept] == [[0, 2], [1, 2]]
    # ties: the lower index goes first
    assert keep_lowest_removed(t(1, 1, 1, 1), 2).tolist() == [2, 3]


def test_heads_go_evenly_from_every_kv_group():
    # 4 heads over 2 kv heads: group 0 = heads 0, 1; group 1 = heads 2, 3
    kept = select_units([t(0.1, 0.9, 0.8, 0.2)], 0.5, "attn_heads", num_kv_heads=[2])
    assert kept[0].tolist() == [1, 2]  # not [1, 2] by global order alone: head 3 (0.2) goes
    kept = select_units([t(0.1, 0.2, 0.8, 0.9)], 0.5, "attn_heads", num_kv_heads=[2])
    assert kept[0].tolist() == [1, 3]  # the two lowest overall (0, 1) share a group
    # multi-head attention: any count
    kept = select_units([t(0.5, 0.1, 0.3, 0.9)], 0.25, "attn_heads", num_kv_heads=[4])
    assert kept[0].tolist() == [0, 2, 3]


def test_counts_that_empty_a_layer_or_break_the_grouping_are_errors():
    assert removal_count(10, 0.25, "ffn_hidden") == 2  # round(2.5) = 2
    with pytest.raises(ValueError, match="removes all 4 attn_heads units"):
        removal_count(4, 0.9, "attn_heads", num_kv_heads=2)
    with pytest.raises(ValueError, match=r"breaks the grouped-query layout.*\[0\.3333, 0\.6667\]"):
        removal_count(9, 0.2, "attn_heads", num_kv_heads=3)
    assert head_sparsities(4, 2) == [0.5]
    assert head_sparsities(4, 4) == [0.25, 0.5, 0.75]


def test_global_ranking_counts_per_layer_and_rounds_heads_to_the_grouping():
    kept = select_units([t(0, 1, 2, 9), t(3, 10, 11, 12)], 0.5, "ffn_hidden", ranking="global")
    assert [k.tolist() for k in kept] == [[3], [1, 2, 3]]
    assert achieved_sparsity(kept, [4, 4]) == 0.5
    # 3 lowest heads: two in layer 0 (one per kv group goes), one in layer 1 (rounded to none)
    kept = select_units([t(0, 0.1, 5, 6), t(0.2, 7, 8, 9)], 0.375, "attn_heads",
                        ranking="global", num_kv_heads=[2, 2])
    assert [k.tolist() for k in kept] == [[1, 3], [0, 1, 2, 3]]
    with pytest.raises(ValueError, match="removes all 2 ffn_hidden units of layer 0"):
        select_units([t(0, 0), t(5, 6)], 0.5, "ffn_hidden", ranking="global")
