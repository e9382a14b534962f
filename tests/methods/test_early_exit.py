"""The early-exit method: its step's loss and gradients against a PonderNet loss written here,
and every config error before anything runs."""

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from comparative_recipe.methods import EarlyExitMethod, build_method
from comparative_recipe.models.tiny import tiny_llama
from comparative_recipe.tasks import shift_labels
from comparative_recipe.training.dataloader import RecipeData
from tests.early_exit.test_inference import LABEL_IDS, _batch

L, D, V = 4, 32, 64


class _LabelledDataset(list):
    label_token_ids = LABEL_IDS


def _method(task="sft", **early_exit):
    cfg = OmegaConf.create({"method": "early_exit", "task": task, "seed": 0,
                            "early_exit": {"halting": {"depth": 2, "hidden_dim": 8}, **early_exit}})
    method = build_method(cfg)
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=V, num_layers=L, num_heads=4, num_kv_heads=2, embed_dim=D,
                       intermediate_dim=64, max_seq_len=64)
    method.prepare(model, RecipeData(_LabelledDataset(), None, None, 0))
    return method, model


def _reference_loss(model, heads, batch, classification, beta, lambda_p, eps, kl):
    """Sum over samples of sum_n p_n CE_n + beta KL, every piece by hand."""
    targets = shift_labels(batch["labels"])
    B = targets.shape[0]
    h = model.tok_embeddings(batch["tokens"])
    states, ce = [], []
    for layer in model.layers:
        h = layer(h)
        row_ce, row_state = [], []
        for b in range(B):
            pos = (targets[b] != -100).nonzero().squeeze(1)
            if classification:
                pos = pos[:1]
            logits = model.output(model.norm(h[b, pos])).float()
            tgt = targets[b, pos]
            if classification:
                logits = logits[:, LABEL_IDS]
                tgt = torch.tensor([LABEL_IDS.index(int(t)) for t in tgt])
            row_ce.append(F.cross_entropy(logits, tgt))
            row_state.append(h[b, pos[0]])
        ce.append(torch.stack(row_ce))
        states.append(torch.stack(row_state))
    total = 0.0
    prior = [lambda_p * (1 - lambda_p) ** k for k in range(L - 1)] + [(1 - lambda_p) ** (L - 1)]
    for b in range(B):
        lams = [heads.layer_lambda(n, states[n - 1][b:b + 1], None if n == 1 else states[n - 2][b:b + 1])[0]
                for n in range(1, L)]
        p, survive = [], 1.0
        for lam in lams:
            p.append(survive * lam)
            survive = survive * (1 - lam)
        p.append(survive)
        mass = 0.0
        for n in range(L):
            if mass >= 1 - eps:
                p[n] = torch.tensor(eps / L)
            mass = mass + float(p[n].detach()) if mass < 1 - eps else mass
        task = sum(p[n] * ce[n][b] for n in range(L))
        if kl == "prior_to_exit":
            div = sum(prior[n] * (math.log(prior[n]) - torch.log(p[n])) for n in range(L))
        else:
            div = sum(p[n] * (torch.log(p[n]) - math.log(prior[n])) for n in range(L))
        total = total + task + beta * div
    return total


@pytest.mark.parametrize("task,kl,eps,lambda_p", [
    ("sft", "prior_to_exit", 0.05, 0.2), ("classification", "exit_to_prior", 0.05, 0.2),
    ("sft", "exit_to_prior", 0.0, 0.2),
    # heads start at lambda = 0.7: the mass before layer 4 is 0.973, so the floor acts there
    ("sft", "prior_to_exit", 0.05, 0.7), ("classification", "exit_to_prior", 0.05, 0.7),
])
def test_step_loss_and_gradients_equal_a_hand_written_pondernet_loss(task, kl, eps, lambda_p):
    classification = task == "classification"
    settings = dict(beta=0.3, lambda_p=lambda_p, eps=eps, kl=kl)
    method, model = _method(task, **settings)
    batch = _batch(classification, batch_size=5, seed=4)
    sums = method.train_step(model, batch, step=0)
    grads = {k: p.grad.clone() for k, p in [*model.named_parameters(),
                                             *(("heads." + k, p) for k, p in method.heads.named_parameters())]}
    model.zero_grad()
    method.heads.zero_grad()
    model.output_hidden_states = []
    ref = _reference_loss(model, method.heads, batch, classification, **settings)
    ref.backward()
    torch.testing.assert_close(sums["loss"], ref.detach(), rtol=1e-5, atol=1e-5)
    assert sums["samples"] == 5
    for k, p in [*model.named_parameters(), *(("heads." + k, p) for k, p in method.heads.named_parameters())]:
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-4, atol=1e-6, msg=k)


def test_validation_reports_every_layer_and_the_whole_depth_q_exit():
    method, model = _method()
    batch = _batch(False, batch_size=6)
    with torch.no_grad():
        sums = method.validation_step(model.eval(), batch).to_host()
    metrics = method.validation_metrics(sums)
    assert set(metrics) <= method.validation_metric_names()
    assert {f"loss_layer_{n}" for n in range(1, L + 1)} <= set(metrics)
    assert metrics["loss_layer_4"] == pytest.approx(metrics["last_loss"])
    assert 1 <= metrics["q_exit_layers"] <= L
    assert metrics["samples"] == 6


@pytest.mark.parametrize("section,match", [
    ({"lambda_p": 1.0}, r"early_exit.lambda_p must be a number in \(0, 1\)"),
    ({"lambda_p": 0}, r"lambda_p"),
    ({"beta": -0.1}, r"early_exit.beta must be a finite number >= 0"),
    ({"eps": 1.0}, r"early_exit.eps"),
    ({"kl": "forward"}, r"early_exit.kl must be one of \['prior_to_exit', 'exit_to_prior'\]"),
    ({"betta": 0.5}, r"unknown keys in early_exit: \['betta'\]"),
    ({"halting": {"kind": "linear", "depth": 2}}, "a linear head has no hidden layers"),
    ({"halting": {"kind": "rnn"}}, "early_exit.halting.kind"),
    ({"halting": {"width": 3}}, r"unknown keys in early_exit.halting"),
])
def test_bad_early_exit_settings_are_errors(section, match):
    cfg = OmegaConf.create({"method": "early_exit", "early_exit": section})
    with pytest.raises(ValueError, match=match):
        build_method(cfg)


@pytest.mark.parametrize("rules,match", [
    ({"q_exit": {"q": 1.5}}, r"q_exit.q must be a number in \(0, 1\)"),
    ({"q_exit": {"q": 0.0}}, r"q_exit.q"),
    ({"halt": None}, "validation.exit_rules key must be one of"),
    ({"fixed": None}, "fixed needs layers"),
    ({"patience": {"patience": 0}}, "patience.patience must be an integer >= 1"),
    ({"sample": {"q": 0.5}}, r"unknown keys in validation.exit_rules.sample"),
    ([], "must map rule names"),
])
def test_bad_exit_rules_are_errors(rules, match):
    cfg = OmegaConf.create({"method": "early_exit", "validation": {"exit_rules": rules}})
    with pytest.raises(ValueError, match=match):
        build_method(cfg)


def test_errors_that_need_the_model():
    cfg = OmegaConf.create({"method": "early_exit",
                            "validation": {"exit_rules": {"fixed": {"layers": L + 1}}}})
    method = build_method(cfg)
    model = tiny_llama(vocab_size=V, num_layers=L, num_heads=4, num_kv_heads=2, embed_dim=D,
                       intermediate_dim=64, max_seq_len=64)
    with pytest.raises(ValueError, match="fixed.layers=5 but the model has 4 layers"):
        method.prepare(model, RecipeData([], None, None, 0))
    one_layer = tiny_llama(vocab_size=V, num_layers=1, num_heads=4, num_kv_heads=2, embed_dim=D,
                           intermediate_dim=64, max_seq_len=64)
    with pytest.raises(ValueError, match="at least 2 layers"):
        build_method(OmegaConf.create({"method": "early_exit"})).prepare(one_layer, RecipeData([], None, None, 0))
    with pytest.raises(ValueError, match="loss_reduction is read by the comparative method"):
        build_method(OmegaConf.create({"method": "early_exit", "loss_reduction": "token"}))
    with pytest.raises(RuntimeError, match="prepare"):
        EarlyExitMethod.from_config(OmegaConf.create({})).trained_modules()
    with pytest.raises(ValueError, match="trains method: early_exit, but the config sets method: comparative"):
        EarlyExitMethod.for_recipe(OmegaConf.create({"method": "comparative"}), "early_exit_finetune_single_device")


def test_pabee_objective_weights_the_layers_by_their_index():
    """objective: pabee: sum_n n CE_n / sum_n n per sample, by hand; no halting heads."""
    cfg = OmegaConf.create({"method": "early_exit", "early_exit": {"objective": "pabee"}})
    method = build_method(cfg)
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=V, num_layers=L, num_heads=4, num_kv_heads=2, embed_dim=D,
                       intermediate_dim=64, max_seq_len=64)
    method.prepare(model, RecipeData([], None, None, 0))
    assert method.trained_modules() == {}
    batch = _batch(False, batch_size=4, seed=2)
    sums = method.train_step(model, batch, step=0)
    targets = shift_labels(batch["labels"])
    h, expected = model.tok_embeddings(batch["tokens"]), 0.0
    with torch.no_grad():
        for n, layer in enumerate(model.layers, 1):
            h = layer(h)
            for b in range(4):
                pos = (targets[b] != -100).nonzero().squeeze(1)
                ce = F.cross_entropy(model.output(model.norm(h[b, pos])).float(), targets[b, pos])
                expected += n * ce / sum(range(1, L + 1))
    torch.testing.assert_close(sums["loss"], expected, rtol=1e-5, atol=1e-5)
    assert "kl" not in sums and "expected_layers" not in sums
    assert [r.name for r in EarlyExitMethod.from_config(OmegaConf.create(
        {"early_exit": {"objective": "pabee"}, "validation": {"exit_rules": "default"}})).exit_rules] == ["patience"]
    with pytest.raises(ValueError, match=r"pabee trains no halting heads, so \['beta'\] would be ignored"):
        build_method(OmegaConf.create({"method": "early_exit",
                                       "early_exit": {"objective": "pabee", "beta": 0.1}}))
    with pytest.raises(ValueError, match="exit rule q_exit reads the halting heads"):
        build_method(OmegaConf.create({"method": "early_exit", "early_exit": {"objective": "pabee"},
                                       "validation": {"exit_rules": {"q_exit": None}}}))
