"""Named sums travel as one vector: packing, adding and reducing keep every name and shape."""

import pytest
import torch

from comparative_recipe.training.sums import Sums


def make(a, b):
    return Sums({"weight": torch.tensor(a), "pass_loss": torch.tensor(b)})


def test_sums_add_pack_and_unpack_by_name():
    total = Sums.total([make(2.0, [1.0, 3.0]), make(1.0, [0.5, 0.25])])
    assert total.to_host() == {"weight": 3.0, "pass_loss": [1.5, 3.25]}
    packed = total.pack()
    assert packed.dtype == torch.float64 and packed.tolist() == [3.0, 1.5, 3.25]
    assert total.unpack(packed * 2).to_host() == {"weight": 6.0, "pass_loss": [3.0, 6.5]}


def test_reduced_calls_the_all_reduce_once_on_the_packed_vector():
    calls = []

    def fake_all_reduce(t):  # two ranks holding the same sums
        calls.append(t.clone())
        return t * 2

    out = make(2.0, [1.0, 3.0]).reduced(fake_all_reduce)
    assert len(calls) == 1 and calls[0].tolist() == [2.0, 1.0, 3.0]
    assert out["weight"].item() == 4.0 and out["pass_loss"].tolist() == [2.0, 6.0]


def test_mismatched_names_and_unknown_names_are_errors():
    with pytest.raises(ValueError, match="cannot add"):
        make(1.0, [1.0]) + Sums({"weight": torch.tensor(1.0)})
    with pytest.raises(KeyError, match="no sum named 'tokens'"):
        make(1.0, [1.0])["tokens"]
