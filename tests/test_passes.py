"""The comparative step: strategies agree, samples are keyed by id, edge cases are counted."""


import pytest
import torch
from torchtune import modules

from comparative_recipe.ablation.hidden import (
    HiddenAblationConfig,
    install_hidden_ablation,
    set_activation_checkpointing,
)
from comparative_recipe.ablation.plan import ablation_plan
from comparative_recipe.loss import ComparativeLoss
from comparative_recipe.models.tiny import tiny_llama
from comparative_recipe.passes import (
    ComparativeStepSpec,
    StepResult,
    comparative_metrics,
    comparative_step,
)
from comparative_recipe.tasks import SFTTask, per_sample_cross_entropy, shift_labels

VOCAB, PAD = 64, 0


def make_batch(batch_size=4, seq=30, seed=0):
    """Random samples: a context of three 5-token chunks, a 3-token question, a 4-token answer."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (batch_size, seq), generator=g)
    labels = torch.full_like(tokens, -100)
    chunk_ids = torch.full_like(tokens, -1)
    for b in range(batch_size):
        length = seq - 2 * b  # ragged rows, right-padded
        tokens[b, length:] = PAD
        chunk_ids[b, length:] = -2
        for k in range(3):
            chunk_ids[b, 1 + 5 * k : 6 + 5 * k] = k
        labels[b, length - 4 : length] = tokens[b, length - 4 : length]
    return {
        "tokens": tokens,
        "labels": labels,
        "chunk_ids": chunk_ids,
        "sample_ids": torch.arange(10, 10 + batch_size),
    }


def make_model(ac=False, hidden=None, seed=0):
    torch.manual_seed(seed)
    model = tiny_llama(vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=2,
                       embed_dim=32, intermediate_dim=64, max_seq_len=64)
    if ac:
        set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
    if hidden is not None:
        install_hidden_ablation(model, hidden)
    return model


def spec(**kw):
    """The step spec of these tests: SFT, seed 3, padding ``PAD`` unless given."""
    return ComparativeStepSpec(**{"task": SFTTask(), "pad_id": PAD, "seed": 3, **kw})


def grads_of(model, batch, step=5, **kw):
    model.zero_grad(set_to_none=True)
    res = comparative_step(model, batch, spec(**kw), step=step)
    return res, {n: p.grad.clone() for n, p in model.named_parameters()}


def metrics_of(res):
    return comparative_metrics(res.sums().to_host())


HIDDEN = HiddenAblationConfig(rate=0.3, sites=("ffn_hidden", "attn_heads", "attn_out"), seed=3)


@pytest.mark.parametrize("granularity", ["unit", "element"])
@pytest.mark.parametrize("loss_fn", [ComparativeLoss(), ComparativeLoss(mode="listmle", baseline="first")])
def test_strategies_and_activation_checkpointing_give_the_same_gradient(granularity, loss_fn):
    hidden = HiddenAblationConfig(rate=0.3, sites=HIDDEN.sites, granularity=granularity, seed=3)
    plan = ablation_plan(n_hidden=2, n_input=1)
    batch = make_batch()
    ref_res, ref = grads_of(make_model(hidden=hidden), batch, plan=plan, loss_fn=loss_fn,
                            strategy="sequential", crop_rate=0.4)
    assert ref_res.losses.shape == (4, 4)
    # the ablations really differ from the full model
    assert not torch.allclose(ref_res.losses[:, 0], ref_res.losses[:, 3])
    for strategy in ["sequential", "stacked", "recompute"]:
        for ac in [False, True]:
            res, g = grads_of(make_model(ac=ac, hidden=hidden), batch, plan=plan, loss_fn=loss_fn,
                              strategy=strategy, crop_rate=0.4)
            torch.testing.assert_close(res.losses, ref_res.losses, rtol=1e-5, atol=1e-6)
            for name in ref:
                key = name.replace("._checkpoint_wrapped_module", "")
                gk = {n.replace("._checkpoint_wrapped_module", ""): v for n, v in g.items()}[key]
                rel = (gk - ref[name]).norm() / ref[name].norm().clamp(min=1e-12)
                assert rel < 1e-5, (strategy, ac, name, float(rel))


def test_c0_is_plain_finetuning():
    """With c = 0 and ultra, the step's loss is the per-sample mean CE and its gradient."""
    batch = make_batch()
    model = make_model()
    res, g = grads_of(model, batch, plan=[], loss_fn=ComparativeLoss())
    logits = model(batch["tokens"])
    ce = per_sample_cross_entropy(logits, shift_labels(batch["labels"]))
    torch.testing.assert_close(res.losses[:, 0], ce.loss.detach())
    model.zero_grad()
    ce.loss.sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(g[n], p.grad)


def test_token_reduction_equals_global_token_mean():
    batch = make_batch()
    model = make_model()
    res, g = grads_of(model, batch, plan=[], loss_fn=ComparativeLoss(), reduction="token")
    targets = shift_labels(batch["labels"])
    assert float(res.sample_weight.sum()) == float((targets != -100).sum())
    model.zero_grad()
    logits = model(batch["tokens"])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(g[n], p.grad, rtol=1e-4, atol=1e-6)


def test_a_sample_gets_the_same_losses_in_any_row():
    """Masks and crops are keyed by sample id, not by row: permuting the batch permutes results."""
    plan = ablation_plan(n_hidden=1, n_input=2)
    batch = make_batch()
    model = make_model(hidden=HIDDEN)
    kw = dict(spec=spec(plan=plan, loss_fn=ComparativeLoss(), crop_rate=0.3), step=7,
              backward=False)
    res = comparative_step(model, batch, **kw)
    perm = torch.tensor([2, 0, 3, 1])
    res_p = comparative_step(model, {k: v[perm] for k, v in batch.items()}, **kw)
    torch.testing.assert_close(res_p.losses, res.losses[perm], rtol=1e-5, atol=1e-6)
    # a batch of one sample gives the same numbers too
    res_1 = comparative_step(model, {k: v[1:2] for k, v in batch.items()}, **kw)
    torch.testing.assert_close(res_1.losses, res.losses[1:2], rtol=1e-5, atol=1e-6)


def test_samples_without_labels_are_excluded_not_nan():
    batch = make_batch()
    batch["labels"][1] = -100
    model = make_model(hidden=HIDDEN)
    for strategy in ["sequential", "stacked", "recompute"]:
        res, g = grads_of(model, batch, plan=ablation_plan(1, 1), loss_fn=ComparativeLoss(),
                          strategy=strategy, crop_rate=0.5)
        assert res.valid.tolist() == [True, False, True, True]
        assert float(res.sample_weight.sum()) == 3
        assert res.sample_loss[1] == 0
        assert all(torch.isfinite(v).all() for v in g.values())
        assert metrics_of(res)["excluded_samples"] == 1


def test_exhausted_crops_are_counted():
    """A sample with one droppable chunk has nothing left at crop level 2: repeated, counted."""
    batch = make_batch()
    batch["chunk_ids"][0] = torch.where(batch["chunk_ids"][0] > 0, -1, batch["chunk_ids"][0])
    res = comparative_step(make_model(), batch,
                           spec(plan=ablation_plan(0, 2), loss_fn=ComparativeLoss(), crop_rate=0.1),
                           step=0, backward=False)
    assert res.exhausted[:, 2].tolist() == [True, False, False, False]
    torch.testing.assert_close(res.losses[0, 2], res.losses[0, 1])
    assert metrics_of(res)["crop_exhausted_2"] == 1
    # cropped passes really process fewer tokens
    assert res.pass_tokens[0] > res.pass_tokens[1] > res.pass_tokens[2]


def test_hidden_steps_do_not_count_crops_as_exhausted_again():
    """Regression: a hidden-unit pass copied the exhausted flag of its crop level, so with
    (crop, hidden) passes a sample whose crop ran out was counted twice."""
    batch = make_batch()
    batch["chunk_ids"][0] = torch.where(batch["chunk_ids"][0] > 0, -1, batch["chunk_ids"][0])
    plan = ablation_plan(n_hidden=2, n_input=2)  # (1,0) (1,1) (2,1) (2,2)
    res = comparative_step(make_model(hidden=HIDDEN), batch,
                           spec(plan=plan, loss_fn=ComparativeLoss(), crop_rate=0.1),
                           step=0, backward=False)
    # only pass 3, the second crop, finds sample 0's single chunk already gone
    assert res.exhausted[0].tolist() == [False, False, False, True, False]
    metrics = metrics_of(res)
    assert [metrics[f"crop_exhausted_{k}"] for k in range(1, 5)] == [0, 0, 1, 0]


def test_hidden_steps_on_a_model_without_ablation_fail():
    """Regression: without install_hidden_ablation every pass silently returned the full
    model's loss."""
    with pytest.raises(ValueError, match="install_hidden_ablation"):
        grads_of(make_model(), make_batch(), plan=ablation_plan(n_hidden=1, n_input=0),
                 loss_fn=ComparativeLoss())


def test_left_padded_rows_give_the_losses_of_right_padded_ones():
    """A custom collate may pad on the left (chunk id -2 marks padding): the rows are compacted,
    so positions and losses equal those of the right-padded batch."""
    batch = make_batch()
    left = {k: v.clone() for k, v in batch.items()}
    for b in range(4):
        n = int((batch["chunk_ids"][b] == -2).sum())
        for key in ("tokens", "labels", "chunk_ids"):
            left[key][b] = torch.roll(batch[key][b], n)
    model = make_model(hidden=HIDDEN)
    for plan in ([], ablation_plan(n_hidden=1, n_input=0)):
        kw = dict(spec=spec(plan=plan, loss_fn=ComparativeLoss()), step=2, backward=False)
        right_res = comparative_step(model, batch, **kw)
        left_res = comparative_step(model, left, **kw)
        torch.testing.assert_close(left_res.losses, right_res.losses)


def test_builder_dropout_is_off_and_every_strategy_gives_the_same_gradient():
    """Regression: attn_dropout > 0 stayed on in the full model's pass and drew differently in
    recompute's gradient-free forward (about 30% relative gradient difference). The comparative
    method turns the builder's dropout off; the passes then agree exactly."""
    from comparative_recipe.methods.comparative import disable_model_dropout

    def dropout_model():
        torch.manual_seed(0)
        model = tiny_llama(vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=2,
                           embed_dim=32, intermediate_dim=64, max_seq_len=64, attn_dropout=0.3)
        assert disable_model_dropout(model) == ["layers.0.attn.attn_dropout",
                                                "layers.1.attn.attn_dropout"]
        install_hidden_ablation(model, HIDDEN)
        return model.train()

    batch, plan = make_batch(), ablation_plan(n_hidden=1, n_input=1)
    _, ref = grads_of(dropout_model(), batch, plan=plan, loss_fn=ComparativeLoss(),
                      strategy="sequential", crop_rate=0.4)
    for strategy in ("stacked", "recompute"):
        _, g = grads_of(dropout_model(), batch, plan=plan, loss_fn=ComparativeLoss(),
                        strategy=strategy, crop_rate=0.4)
        for name in ref:
            rel = (g[name] - ref[name]).norm() / ref[name].norm().clamp(min=1e-12)
            assert rel < 1e-5, (strategy, name, float(rel))


def _classification_result(predicted, target):
    """A StepResult with the given predictions [B, 1+c] and targets [B] (-1: no target)."""
    predicted, target = torch.tensor(predicted), torch.tensor(target)
    b, passes = predicted.shape
    valid = target >= 0
    return StepResult(
        losses=torch.ones(b, passes), n_tokens=valid.long()[:, None].expand(b, passes),
        valid=valid, sample_loss=torch.ones(b), sample_weight=valid.float(),
        exhausted=torch.zeros(b, passes, dtype=torch.bool), pass_tokens=torch.ones(passes),
        correct=(predicted == target[:, None]) & valid[:, None], predicted=predicted,
        target=target, num_classes=3,
    )


def reference_macro_f1(pred, true, classes=3):
    """Per-class F1 by counting, averaged over classes that occur (independent of the sums)."""
    scores = []
    for c in range(classes):
        tp = sum(p == c and t == c for p, t in zip(pred, true))
        fp = sum(p == c and t != c for p, t in zip(pred, true))
        fn = sum(p != c and t == c for p, t in zip(pred, true))
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def test_macro_f1_per_pass_by_hand_and_summed_over_micro_batches():
    # pass 0: [0, 1, 2, 2, 1] vs targets [0, 1, 2, 1, 1]; pass 1 predicts class 0 everywhere
    first = _classification_result([[0, 0], [1, 0], [2, 0]], [0, 1, 2])
    second = _classification_result([[2, 0], [1, 0], [1, 1]], [1, 1, -1])  # last: no target
    metrics = comparative_metrics((first.sums() + second.sums()).to_host())
    # class 0: F1 1; class 1: tp 2, fn 1 -> 0.8; class 2: tp 1, fp 1 -> 2/3
    assert metrics["macro_f1_0"] == pytest.approx((1 + 0.8 + 2 / 3) / 3)
    assert metrics["macro_f1_0"] == pytest.approx(reference_macro_f1([0, 1, 2, 2, 1], [0, 1, 2, 1, 1]))
    assert metrics["macro_f1_1"] == pytest.approx(reference_macro_f1([0] * 5, [0, 1, 2, 1, 1]))
    assert metrics["accuracy_0"] == pytest.approx(4 / 5)
