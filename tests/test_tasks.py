"""Per-sample cross-entropy: equal to the plain computation, chunked in memory."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from comparative_recipe.tasks import per_sample_cross_entropy

B, S, V, N_CHUNKS = 3, 37, 50, 8  # S not divisible by the chunk count
CHUNK_ELEMS = math.ceil(S / N_CHUNKS) * B * V


def make_inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, S, V, generator=g).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (B, S), generator=g)
    targets[torch.rand(B, S, generator=g) < 0.3] = -100  # ignored positions
    targets[1] = -100  # a row with nothing scored
    weights = torch.randn(B, generator=g)
    return logits, targets, weights


def plain(logits, targets):
    """The reference: one fp32 cross-entropy over the whole batch, then per-row means."""
    tok = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none",
                          ignore_index=-100).view(targets.shape)
    n = (targets != -100).sum(dim=1)
    return tok.sum(dim=1) / n.clamp(min=1), n


def loss_and_grad(fn, logits, weights):
    logits.grad = None
    loss = fn(logits)
    (loss * weights).sum().backward()
    return loss.detach(), logits.grad.clone()


@pytest.mark.parametrize("as_list", [False, True])
def test_equals_plain_cross_entropy_fp32(as_list):
    logits, targets, w = make_inputs()

    def chunked(x):
        arg = list(x.split([10, 1, 20, 6], dim=1)) if as_list else x
        out = per_sample_cross_entropy(arg, targets, num_chunks=N_CHUNKS)
        assert out.n_tokens.tolist() == (targets != -100).sum(dim=1).tolist()
        return out.loss

    loss, grad = loss_and_grad(chunked, logits, w)
    ref_loss, ref_grad = loss_and_grad(lambda x: plain(x, targets)[0], logits, w)
    assert loss[1] == 0 and ref_loss[0] > 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-7)
    assert torch.all(grad[1] == 0)


def test_equals_plain_cross_entropy_bf16():
    logits, targets, w = make_inputs(torch.bfloat16)
    loss, grad = loss_and_grad(
        lambda x: per_sample_cross_entropy(x, targets, num_chunks=N_CHUNKS).loss, logits, w)
    ref_loss, ref_grad = loss_and_grad(lambda x: plain(x, targets)[0], logits, w)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=1e-2, atol=1e-3)


def test_no_grad_gives_the_same_values():
    for dtype in [torch.float32, torch.bfloat16]:
        logits, targets, _ = make_inputs(dtype)
        with_grad = per_sample_cross_entropy(logits, targets, num_chunks=N_CHUNKS)
        with torch.no_grad():
            no_grad = per_sample_cross_entropy(logits, targets, num_chunks=N_CHUNKS)
        frozen = per_sample_cross_entropy(logits.detach(), targets, num_chunks=N_CHUNKS)
        for out in [no_grad, frozen]:
            assert not out.loss.requires_grad
            torch.testing.assert_close(out.loss, with_grad.loss.detach(), rtol=0, atol=0)
            torch.testing.assert_close(out.n_tokens, with_grad.n_tokens)


class FullSizeTensors(TorchDispatchMode):
    """The storages of op outputs with as many elements as the whole [B, S, V] batch."""

    def __init__(self):
        super().__init__()
        self.storages = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() == B * S * V:
                self.storages.add(t.untyped_storage().data_ptr())
        return out


def test_backward_writes_one_gradient_buffer():
    """No full-size zero tensor per chunk (what slicing the logits, then backward, costs)."""
    logits, targets, w = make_inputs(torch.bfloat16)
    loss = per_sample_cross_entropy(logits, targets, num_chunks=N_CHUNKS).loss
    with FullSizeTensors() as mode:
        (loss * w).sum().backward()
    assert len(mode.storages) == 1


class LargestFloat32(TorchDispatchMode):
    """Records the element count of the largest fp32 tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


def largest_fp32_in_forward_backward(fn):
    logits, targets, w = make_inputs(torch.bfloat16)
    with LargestFloat32() as mode:
        (fn(logits, targets) * w).sum().backward()
    assert logits.grad is not None
    return mode.largest


def test_largest_fp32_tensor_is_one_chunk():
    chunked = largest_fp32_in_forward_backward(
        lambda x, t: per_sample_cross_entropy(x, t, num_chunks=N_CHUNKS).loss)
    old = largest_fp32_in_forward_backward(lambda x, t: plain(x, t)[0])
    assert 0 < chunked <= CHUNK_ELEMS
    assert old >= B * S * V > CHUNK_ELEMS


def saved_bytes(fn):
    logits, targets, w = make_inputs(torch.bfloat16)
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel() * t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(logits, targets)
    (loss * w).sum().backward()  # the saved graph is complete and usable
    return saved


def test_saves_only_the_low_precision_chunks_for_backward():
    chunked = saved_bytes(lambda x, t: per_sample_cross_entropy(x, t, num_chunks=N_CHUNKS).loss)
    chunk_bytes_fp32 = CHUNK_ELEMS * 4
    assert all(not (dt == torch.float32 and n >= chunk_bytes_fp32) for dt, n in chunked)
    small = 64 * 1024  # targets, counts
    assert sum(n for _, n in chunked) <= B * S * V * 2 + small
    assert sum(n for dt, n in chunked if dt == torch.bfloat16) == B * S * V * 2  # the chunks

    old = saved_bytes(lambda x, t: plain(x, t)[0])
    assert sum(n for dt, n in old if dt == torch.float32) >= B * S * V * 4


def test_classification_task_scores_label_words_at_the_first_target():
    """Cross-entropy over the label words' logits at the first scored position, by hand."""
    from comparative_recipe.tasks import ClassificationTask

    task = ClassificationTask([5, 7])
    logits = torch.zeros(3, 4, 10)
    logits[0, 2, 5], logits[0, 2, 7] = 2.0, 0.0   # predicts class 0, target class 0
    logits[1, 1, 5], logits[1, 1, 7] = 1.0, 0.0   # predicts class 0, target class 1
    targets = torch.full((3, 4), -100)
    targets[0, 2], targets[1, 1] = 5, 7           # row 2 has no target
    out = task(logits, targets)
    lse0 = torch.logsumexp(torch.tensor([2.0, 0.0]), 0)
    lse1 = torch.logsumexp(torch.tensor([1.0, 0.0]), 0)
    torch.testing.assert_close(out.loss, torch.stack([lse0 - 2.0, lse1 - 0.0, torch.tensor(0.0)]))
    assert out.n_tokens.tolist() == [1, 1, 0]
    assert out.correct.tolist() == [True, False, False]
    assert out.predicted.tolist() == [0, 0, -1] and out.target.tolist() == [0, 1, -1]
    assert out.num_classes == 2
