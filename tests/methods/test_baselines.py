"""Dropout and R-Drop baselines: objectives and gradients against a hand-written reference."""

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from comparative_recipe.ablation.hidden import MaskKeys, hidden_ablation_keys
from comparative_recipe.methods import DropoutMethod, RDropMethod, build_method
from comparative_recipe.methods.baselines import symmetric_kl
from comparative_recipe.tasks import per_sample_mean
from comparative_recipe.methods.comparative import ComparativeMethod
from comparative_recipe.tasks import shift_labels
from comparative_recipe.training.dataloader import RecipeData
from tests.test_passes import PAD, make_batch, make_model

HIDDEN = {"rate": 0.3, "sites": ["ffn_hidden", "attn_heads"]}


def config(**kw):
    return OmegaConf.create({"task": "sft", "seed": 3, "ablation": {"hidden": HIDDEN}, **kw})


def prepared(method, model):
    method.prepare(model, RecipeData(dataset=None, dataloader=None, val_dataloader=None, pad_id=PAD))
    return method


def reference_forward(model, batch, mask_step):
    """Logits of the batch with the first level's masks keyed by ``mask_step``, by hand."""
    pad = batch["chunk_ids"] == -2
    positions = torch.arange(batch["tokens"].shape[1]).expand_as(pad)
    keys = MaskKeys(sample_ids=batch["sample_ids"], powers=torch.ones_like(batch["sample_ids"]),
                    step=mask_step, token_keys=torch.where(pad, -1, positions))
    with hidden_ablation_keys(keys):
        return model(batch["tokens"])


def reference_ce(logits, targets):
    """[B] mean token cross-entropy per sample."""
    ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none", ignore_index=-100)
    scored = (targets != -100).float()
    return (ce * scored).sum(1) / scored.sum(1)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_symmetric_kl_by_hand():
    a = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    b = torch.tensor([[0.0, 0.0], [2.0, 1.0]])
    # row 1: p = (s, 1-s) and q = (1-s, s) with s = sigmoid(-1): 2 * (1-2s) * log((1-s)/s)
    s = torch.sigmoid(torch.tensor(-1.0))
    expected = torch.stack([torch.tensor(0.0), 2 * (1 - 2 * s) * torch.log((1 - s) / s)])
    torch.testing.assert_close(symmetric_kl(a, b), expected)
    la, lb = F.log_softmax(a, -1), F.log_softmax(b, -1)
    both = F.kl_div(lb, la, log_target=True, reduction="none").sum(-1) + F.kl_div(
        la, lb, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(symmetric_kl(a, b), both)


def test_per_sample_mean():
    values = torch.tensor([1.0, 3.0, 5.0])
    torch.testing.assert_close(per_sample_mean(values, torch.tensor([0, 0, 2]), 3),
                               torch.tensor([2.0, 0.0, 5.0]))


@pytest.mark.parametrize("granularity", ["unit", "element"])
def test_dropout_step_is_the_task_loss_of_one_masked_pass(granularity):
    cfg = config(method="dropout", ablation={"hidden": {**HIDDEN, "granularity": granularity}})
    batch, step = make_batch(), 7
    method = prepared(build_method(cfg), model := make_model())
    assert isinstance(method, DropoutMethod)
    model.zero_grad()
    sums = method.train_step(model, batch, step).to_host()
    got = grads(model)

    model.zero_grad()
    ce = reference_ce(reference_forward(model, batch, step), shift_labels(batch["labels"]))
    ce.sum().backward()
    for name, g in grads(model).items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6, msg=name)
    assert sums["weight"] == 4 and sums["weighted_loss"] == pytest.approx(ce.sum().item(), rel=1e-5)
    # the masks are real: the unmasked model has another loss
    with torch.no_grad():
        plain = reference_ce(model(batch["tokens"]), shift_labels(batch["labels"]))
    assert not torch.allclose(plain, ce)


@pytest.mark.parametrize("alpha", [0.0, 1.5])
def test_rdrop_objective_and_gradient_by_hand(alpha):
    cfg = config(method="rdrop", rdrop={"alpha": alpha})
    batch, step = make_batch(), 4
    method = prepared(build_method(cfg), model := make_model())
    assert isinstance(method, RDropMethod) and method.alpha == alpha
    model.zero_grad()
    metrics = method.step_metrics(method.train_step(model, batch, step).to_host(), 1.0)
    got = grads(model)

    model.zero_grad()
    targets = shift_labels(batch["labels"])
    la, lb = (reference_forward(model, batch, 2 * step + j) for j in range(2))
    scored = (targets != -100).float()
    logp_a, logp_b = F.log_softmax(la, -1), F.log_softmax(lb, -1)
    kl_ab = F.kl_div(logp_b, logp_a, log_target=True, reduction="none").sum(-1)
    kl_ba = F.kl_div(logp_a, logp_b, log_target=True, reduction="none").sum(-1)
    kl = ((kl_ab + kl_ba) * scored).sum(1) / scored.sum(1)
    ce_a, ce_b = reference_ce(la, targets), reference_ce(lb, targets)
    objective = (ce_a + ce_b) / 2 + alpha * kl / 4
    objective.sum().backward()
    for name, g in grads(model).items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)
    assert metrics["loss"] == pytest.approx(objective.mean().item(), rel=1e-5)
    assert metrics["kl"] == pytest.approx(kl.mean().item(), rel=1e-4)
    assert metrics["kl"] > 0  # the two passes have independent masks


def test_rdrop_on_classification_uses_the_label_word_distribution():
    from comparative_recipe.tasks import ClassificationTask

    logits = torch.randn(3, 5, 10)
    targets = torch.full((3, 5), -100)
    targets[0, 2], targets[2, 4] = 7, 3
    z, rows = ClassificationTask([3, 7]).scored_logits(list(logits.split([2, 3], dim=1)), targets)
    assert rows.tolist() == [0, 2]
    torch.testing.assert_close(z, torch.stack([logits[0, 2, [3, 7]], logits[2, 4, [3, 7]]]))


def test_validation_is_the_full_model():
    batch = make_batch()
    method = prepared(build_method(config(method="rdrop")), model := make_model())
    model.eval()
    val = method.validation_metrics(method.validation_step(model, batch).to_host())
    with torch.no_grad():
        ce = reference_ce(model(batch["tokens"]), shift_labels(batch["labels"]))
    assert val["loss_0"] == pytest.approx(ce.mean().item(), rel=1e-5)
    assert not any(k.startswith("loss_1") for k in val)


@pytest.mark.parametrize("override, needle", [
    ({"method": "mixout"}, "method must be one of"),
    ({"method": "dropout", "ablation": {"n_hidden": 2, "hidden": HIDDEN}}, "ablation.n_hidden belongs"),
    ({"method": "dropout", "ablation": {}}, "masks hidden units as configured in ablation.hidden"),
    ({"method": "rdrop", "loss": {"_component_": "comparative_recipe.loss.ComparativeLoss"}},
     "`loss` sets the comparative loss"),
    ({"method": "rdrop", "strategy": "stacked"}, "`strategy` sets"),
    ({"method": "rdrop", "rdrop": {"alpha": -1}}, "rdrop.alpha must be a number >= 0"),
    ({"method": "rdrop", "rdrop": {"beta": 1}}, "unknown keys in rdrop"),
    ({"method": "dropout", "ablation": {"hidden": {**HIDDEN, "rate": 2}}}, "ablation.hidden.rate"),
])
def test_config_errors_name_the_fix(override, needle):
    with pytest.raises(ValueError, match=needle):
        build_method(config(**override))


def test_every_method_declares_its_keys():
    """A key only one method reads is an error for the others (the trainer's key check)."""
    assert "rdrop" in RDropMethod.config_keys and "rdrop" not in DropoutMethod.config_keys
    assert "passes" not in DropoutMethod.validation_keys
    assert "method" in ComparativeMethod.config_keys
    assert isinstance(build_method(OmegaConf.create({"task": "sft"})), ComparativeMethod)


@pytest.mark.parametrize("method_cfg", [
    {"ablation": {"n_hidden": 2, "hidden": HIDDEN}, "validation": {"passes": "all"}},
    {"ablation": {"n_hidden": 2, "hidden": HIDDEN}, "validation": {"passes": "full"}},
    {"method": "rdrop"},
])
@pytest.mark.parametrize("task", ["sft", "classification"])
def test_validation_metric_names_are_what_validation_reports(method_cfg, task):
    """The trainer checks validation.metric against these names before training."""
    cfg = config(**method_cfg, task=task)
    batch = make_batch()
    if task == "classification":  # one scored token per row: a label word (ids 3, 7)
        labels = torch.full_like(batch["labels"], -100)
        labels[:, 6] = torch.tensor([3, 7, 7, 3])
        batch["labels"] = labels
    data = RecipeData(dataset=type("D", (), {"label_token_ids": [3, 7]})(), dataloader=None,
                      val_dataloader=None, pad_id=PAD)
    method = build_method(cfg)
    method.prepare(model := make_model(), data)
    model.eval()
    metrics = method.validation_metrics(method.validation_step(model, batch).to_host())
    assert set(metrics) == method.validation_metric_names()
