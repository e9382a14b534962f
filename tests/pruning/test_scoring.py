"""The scorer's sums: Wanda's score from activation norms gathered by a hook written here; the
unsupervised setting never reads the gold answers (changing them changes nothing, while the
supervised scores move); attribution probed one layer per pass equals all layers at once."""

import pytest
import torch

from comparative_recipe.data.collate import comparative_collate
from comparative_recipe.models.tiny import init_tiny_llama
from comparative_recipe.pruning.scores import magnitude_scores, wanda_scores
from comparative_recipe.pruning.scoring import PruneScorer
from comparative_recipe.pruning.settings import PruneSettings
from comparative_recipe.metrics.generation import GenerationSettings
from comparative_recipe.neurons import site_layouts
from comparative_recipe.tasks import SFTTask
from comparative_recipe.training.dataloader import RecipeData

IGNORE = -100


def settings(**kw):
    base = dict(method="attribution", data="supervised", num_examples=None, reduce="sum",
                positions="all", sites=("ffn_hidden", "attn_heads"),
                sparsity={"ffn_hidden": 0.25, "attn_heads": 0.5}, ranking="uniform",
                generation=GenerationSettings(max_new_tokens=3), layers_per_pass=None, seed=0,
                output_dir=None, overwrite=False, checkpoint_overrides={})
    base.update(kw)
    return PruneSettings(**base)


class _Method:
    config_keys, validation_keys = frozenset(), frozenset()


def batch(answers):
    """Three samples: a prompt of 6-8 tokens then an answer (labelled)."""
    g = torch.Generator().manual_seed(0)
    items = []
    for i, (n, ans) in enumerate(zip((6, 7, 8), answers)):
        prompt = torch.randint(3, 500, (n,), generator=g).tolist()
        items.append({"tokens": prompt + ans, "labels": [IGNORE] * n + ans, "sample_id": i,
                      "chunk_ids": [0] * (n + len(ans))})
    return comparative_collate(items, padding_idx=0)


def scorer_for(model, **kw):
    s = PruneScorer(settings(**kw), _Method(), task="sft")
    s.prepare(model, RecipeData(None, None, None, 0))
    return s


def scores(model, b, **kw):
    model.eval()
    with torch.no_grad():
        return scorer_for(model, **kw).validation_step(model, b)


def model():
    return init_tiny_llama(seed=1, num_layers=3, num_heads=4, num_kv_heads=2, embed_dim=32,
                           intermediate_dim=24)


def test_wanda_is_the_outgoing_weight_times_the_activation_norm():
    m = model().eval()
    b = batch([[7, 8], [9], [10, 11, 12]])
    sums = scores(m, b, method="wanda")
    sq = []  # squares of w2's input over real tokens, by a hook written here
    real = b["chunk_ids"] >= 0
    hooks = [layer.mlp.w2.register_forward_pre_hook(
        lambda mod, args: sq.append((args[0] ** 2 * real[..., None]).sum((0, 1))))
        for layer in m.layers]
    with torch.no_grad():
        m(b["tokens"])
    for h in hooks:
        h.remove()
    layouts = site_layouts(m, "ffn_hidden")
    flat = sums["score_ffn_hidden"]
    for i, lay in enumerate(layouts):
        mine = flat[i * 24:(i + 1) * 24]
        w2 = m.layers[i].mlp.w2.weight.detach()
        expected = torch.tensor([
            sum(abs(float(w2[r, c])) for r in range(32)) * float(sq[i][c]) ** 0.5
            for c in range(24)])
        torch.testing.assert_close(mine.float(), sq[i].float(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(wanda_scores(lay, mine), expected, rtol=1e-4, atol=1e-6)
    heads = site_layouts(m, "attn_heads")[0]
    w_q, w_o = m.layers[0].attn.q_proj.weight, m.layers[0].attn.output_proj.weight
    expected = torch.stack([w_q[h * 8:(h + 1) * 8].abs().sum()
                            + w_o[:, h * 8:(h + 1) * 8].abs().sum() for h in range(4)])
    torch.testing.assert_close(magnitude_scores(heads), expected.detach())


def test_unsupervised_scores_never_read_the_gold_answers():
    m = model()
    gold, other = [[7, 8], [9], [10, 11, 12]], [[400, 401], [402], [403, 404, 405]]
    un_gold = scores(m, batch(gold), data="unsupervised")
    un_other = scores(m, batch(other), data="unsupervised")
    sup_gold, sup_other = scores(m, batch(gold)), scores(m, batch(other))
    for site in ("ffn_hidden", "attn_heads"):
        key = f"score_{site}"
        torch.testing.assert_close(un_gold[key], un_other[key])
        assert not torch.allclose(sup_gold[key], sup_other[key])
    assert float(un_gold["samples"]) == 3


@pytest.mark.parametrize("reduce", ["sum", "max"])
def test_one_layer_per_pass_equals_every_layer_at_once(reduce):
    m = model()
    b = batch([[7, 8], [9], [10, 11, 12]])
    once = scores(m, b, reduce=reduce)
    split = scores(m, b, reduce=reduce, layers_per_pass=1)
    for key in ("score_ffn_hidden", "score_attn_heads"):
        torch.testing.assert_close(split[key], once[key], rtol=1e-6, atol=1e-9)
        assert float(once[key].abs().sum()) > 0


def test_answer_positions_score_fewer_tokens_than_all():
    m = model()
    b = batch([[7, 8], [9], [10, 11, 12]])
    assert float(scores(m, b, positions="answer")["positions"]) == 6  # the answer tokens
    assert float(scores(m, b)["positions"]) == 27  # every real token
    assert SFTTask  # the task the scorer builds for "sft"
