"""Layer-by-layer early exit against the whole-depth rules on an independent forward."""

import pytest
import torch
import torch.nn.functional as F

from comparative_recipe.early_exit.heads import HaltingHeadSettings, HaltingHeads
from comparative_recipe.early_exit.inference import ExitRule, early_exit_forward, sample_uniforms
from comparative_recipe.early_exit.ponder import (
    exit_distribution,
    patience_exit_layers,
    q_exit_layers,
    sample_exit_layers,
)
from comparative_recipe.early_exit.readout import TaskReadout
from comparative_recipe.models.tiny import tiny_llama
from comparative_recipe.tasks import IGNORE_INDEX, shift_labels

L, D, V = 5, 32, 64
LABEL_IDS = [7, 11, 13]


def _model():
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=V, num_layers=L, num_heads=4, num_kv_heads=2, embed_dim=D,
                       intermediate_dim=64, max_seq_len=64)
    return model.eval()


def _heads(seed=1):
    heads = HaltingHeads(L, D, HaltingHeadSettings(depth=2, hidden_dim=16), seed=seed,
                         initial_lambda=0.3)
    with torch.no_grad():  # spread the lambdas so that rows exit at different layers
        heads.weights[-1].mul_(40.0)
    return heads


def _batch(classification, batch_size=12, seed=0):
    """Right-padded rows of different lengths; answers of 1 (classification) or 1-3 tokens."""
    g = torch.Generator().manual_seed(seed)
    S = 20
    tokens = torch.zeros(batch_size, S, dtype=torch.long)
    labels = torch.full((batch_size, S), IGNORE_INDEX)
    for b in range(batch_size):
        n = int(torch.randint(8, S + 1, (1,), generator=g))
        tokens[b, :n] = torch.randint(1, V, (n,), generator=g)
        answer = 1 if classification else int(torch.randint(1, 4, (1,), generator=g))
        if classification:
            tokens[b, n - 1] = LABEL_IDS[int(torch.randint(0, 3, (1,), generator=g))]
        labels[b, n - answer:n] = tokens[b, n - answer:n]
    return {"tokens": tokens, "labels": labels, "sample_ids": torch.arange(100, 100 + batch_size)}


def _whole_depth(model, readout, heads, batch):
    """Every layer's output by a plain forward, read out by hand: per layer [B] losses, [B]
    all-right flags, [N] position argmaxes; the lambdas of the batched heads."""
    targets = shift_labels(batch["labels"])
    scored = readout.positions(targets)
    h = model.tok_embeddings(batch["tokens"])
    losses, correct, argmaxes, answer_states = [], [], [], []
    B = targets.shape[0]
    for layer in model.layers:
        h = layer(h)
        logits = model.output(model.norm(h[scored.rows, scored.positions])).float()
        if readout.is_classification:
            logits = logits[:, LABEL_IDS]
        ce = F.cross_entropy(logits, scored.targets, reduction="none")
        am = logits.argmax(-1)
        losses.append(torch.stack([ce[scored.rows == b].mean() for b in range(B)]))
        correct.append(torch.stack([(am[scored.rows == b] == scored.targets[scored.rows == b]).all()
                                    for b in range(B)]))
        argmaxes.append(am)
        answer_states.append(h[torch.arange(B), scored.answer_positions])
    lambdas = heads(torch.stack(answer_states[:-1]))
    return scored, torch.stack(losses, 1), torch.stack(correct, 1), argmaxes, lambdas


def _expected_exits(rule, scored, argmaxes, lambdas, batch):
    if rule.name == "q_exit":
        return q_exit_layers(exit_distribution(lambdas), rule.q)
    if rule.name == "sample":
        u = torch.stack([sample_uniforms(rule.seed, batch["sample_ids"], n) for n in range(1, L)], 1)
        return sample_exit_layers(lambdas, u)
    if rule.name == "patience":
        B = scored.batch_size
        unchanged = torch.stack([
            torch.stack([(argmaxes[n][scored.rows == b] == argmaxes[n - 1][scored.rows == b]).all()
                         for b in range(B)])
            for n in range(1, L)], 1)
        return patience_exit_layers(unchanged, rule.resolved(L).patience)
    return torch.full((scored.batch_size,), rule.layers)


RULES = [ExitRule("q_exit", q=0.5), ExitRule("q_exit", q=0.8), ExitRule("sample", seed=3),
         ExitRule("patience", patience=1), ExitRule("patience"), ExitRule("fixed", layers=2),
         ExitRule("fixed", layers=L)]


@pytest.mark.parametrize("classification", [False, True])
@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.name}-{r.describe()}")
def test_layer_by_layer_exit_equals_the_whole_depth_rule(classification, rule):
    model, heads = _model(), _heads()
    readout = TaskReadout(model, LABEL_IDS if classification else None)
    batch = _batch(classification)
    with torch.no_grad():
        scored, losses, correct, argmaxes, lambdas = _whole_depth(model, readout, heads, batch)
        out = early_exit_forward(model, heads, readout, batch["tokens"], scored, rule,
                                 batch["sample_ids"])
    expected = _expected_exits(rule, scored, argmaxes, lambdas, batch)
    assert torch.equal(out.exit_layer, expected)
    at = (expected - 1)[:, None]
    torch.testing.assert_close(out.loss, losses.gather(1, at).squeeze(1), rtol=1e-5, atol=1e-5)
    assert torch.equal(out.correct, correct.gather(1, at).squeeze(1))
    # no layer computes a row that has left: layer n ran the rows exiting at n or later
    ran = torch.tensor([(expected >= n).sum() for n in range(1, L + 1)])
    assert torch.equal(out.layer_rows, ran)
    if classification:
        assert ((out.predicted >= 0) & (out.predicted < 3)).all()


def test_rules_exit_at_several_layers_in_this_setup():
    """The setup above is not trivial: q_exit and sample spread rows over several layers."""
    model, heads = _model(), _heads()
    readout = TaskReadout(model, None)
    batch = _batch(False, batch_size=24)
    with torch.no_grad():
        scored = readout.positions(shift_labels(batch["labels"]))
        for rule in (ExitRule("q_exit"), ExitRule("sample")):
            out = early_exit_forward(model, heads, readout, batch["tokens"], scored, rule,
                                     batch["sample_ids"])
            assert len(out.exit_layer.unique()) >= 3, rule


@pytest.mark.parametrize("rule", [ExitRule("q_exit"), ExitRule("sample"), ExitRule("patience", patience=1)],
                         ids=lambda r: r.name)
def test_a_row_gets_the_same_answer_alone_as_in_a_batch(rule):
    """The rows that stay are unchanged by their neighbours' exits."""
    model, heads = _model(), _heads()
    readout = TaskReadout(model, None)
    batch = _batch(False)
    with torch.no_grad():
        scored = readout.positions(shift_labels(batch["labels"]))
        together = early_exit_forward(model, heads, readout, batch["tokens"], scored, rule,
                                      batch["sample_ids"])
        for b in range(batch["tokens"].shape[0]):
            one = {k: v[b:b + 1] for k, v in batch.items()}
            s1 = readout.positions(shift_labels(one["labels"]))
            alone = early_exit_forward(model, heads, readout, one["tokens"], s1, rule,
                                       one["sample_ids"])
            assert alone.exit_layer.item() == together.exit_layer[b].item()
            torch.testing.assert_close(alone.loss[0], together.loss[b], rtol=1e-5, atol=1e-5)


def test_rows_without_target_and_bad_rules():
    model, heads = _model(), _heads()
    readout = TaskReadout(model, None)
    batch = _batch(False, batch_size=3)
    batch["labels"][1] = IGNORE_INDEX
    with torch.no_grad():
        scored = readout.positions(shift_labels(batch["labels"]))
        out = early_exit_forward(model, heads, readout, batch["tokens"], scored,
                                 ExitRule("q_exit"), batch["sample_ids"])
    assert out.loss[1] == 0 and not out.correct[1]
    with pytest.raises(ValueError, match="needs the halting heads"):
        early_exit_forward(model, None, readout, batch["tokens"], scored, ExitRule("q_exit"))
    with pytest.raises(ValueError, match="sample_ids"):
        early_exit_forward(model, heads, readout, batch["tokens"], scored, ExitRule("sample"))
    with pytest.raises(ValueError, match="has 5 layers"):
        early_exit_forward(model, heads, readout, batch["tokens"], scored, ExitRule("fixed", layers=6))
    for kwargs, match in [({"q": 1.0}, r"q_exit.q must be a number in \(0, 1\)"),
                          ({"q": 0}, r"\(0, 1\)"), ({"patience": 0}, "patience"),
                          ({"name": "fixed"}, "fixed.layers")]:
        with pytest.raises(ValueError, match=match):
            ExitRule(**{"name": "q_exit", **kwargs})
    assert ExitRule("patience").resolved(4).patience == 1
    assert ExitRule("patience").resolved(12).patience == 4
    assert ExitRule("patience").resolved(30).patience == 6
