"""Greedy generation (batched, right-padded, with hidden masks) against per-row argmax loops and
torchtune's generate; generative QA validation of the comparative method on the tiny model."""

import pytest
import torch
from torchtune.generation import generate as torchtune_generate

from comparative_recipe.ablation.hidden import (
    HiddenAblationConfig,
    MaskKeys,
    hidden_ablation_keys,
    install_hidden_ablation,
)
from comparative_recipe.data import demo_tokenizer
from comparative_recipe.data.collate import collate_padding_idx, comparative_collate
from comparative_recipe.data.demo import needle_qa_dataset
from comparative_recipe.loss import ComparativeLoss
from comparative_recipe.methods.comparative import ComparativeMethod, ComparativeSettings
from comparative_recipe.metrics.generation import (
    AnswerDecoder,
    GenerationSettings,
    greedy_generate,
    qa_prompts,
    stop_token_ids,
)
from comparative_recipe.models.tiny import init_tiny_llama
from comparative_recipe.tasks import shift_labels
from comparative_recipe.training.dataloader import RecipeData

VOCAB, PAD = 64, 0
LENGTHS = [5, 9, 7]


def tiny(seed=0, vocab=VOCAB):
    model = init_tiny_llama(seed=seed, vocab_size=vocab, num_layers=2, num_heads=4,
                            num_kv_heads=2, embed_dim=32, intermediate_dim=64, max_seq_len=128)
    return model.eval()


def prompts():
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(1, VOCAB, (n,), generator=g) for n in LENGTHS]
    batch = torch.full((len(rows), max(LENGTHS)), PAD)
    for b, r in enumerate(rows):
        batch[b, : len(r)] = r
    return rows, batch


@torch.no_grad()
def argmax_loop(model, prompt, n, keys=None, stop=()):
    """The reference: one row, its whole sequence forwarded for every new token."""
    seq, out = prompt.tolist(), []
    for j in range(n):
        step_keys = None if keys is None else keys(len(seq))
        with hidden_ablation_keys(step_keys):
            logits = model(torch.tensor([seq]))
        nxt = int(logits[0, -1].argmax())
        if nxt in stop:
            break
        out.append(nxt)
        seq.append(nxt)
    return out


def test_batched_greedy_generate_equals_argmax_loops_and_torchtune_generate():
    model = tiny()
    rows, batch = prompts()
    got = greedy_generate(model, batch, torch.tensor(LENGTHS), max_new_tokens=6, pad_id=PAD)
    for b, row in enumerate(rows):
        expected = argmax_loop(model, row, 6)
        assert got[b] == expected, b
        # torchtune's generate with top_k=1 is greedy
        tokens, _ = torchtune_generate(model, row, max_generated_tokens=6, pad_id=PAD, top_k=1)
        assert tokens[0, len(row):].tolist() == expected


def test_generation_stops_at_a_stop_token_per_row_and_skips_inactive_rows():
    model = tiny()
    rows, batch = prompts()
    free = [argmax_loop(model, r, 6) for r in rows]
    stop = free[0][2]
    got = greedy_generate(model, batch, torch.tensor(LENGTHS), max_new_tokens=6, pad_id=PAD,
                          stop_tokens=[stop], active=torch.tensor([True, False, True]))
    assert got[0] == free[0][: free[0].index(stop)]
    assert got[1] == []
    assert got[2] == argmax_loop(model, rows[2], 6, stop=(stop,))


@pytest.mark.parametrize("granularity", ["unit", "element"])
def test_ablated_generation_applies_each_rows_masks_to_the_generated_tokens(granularity):
    """Hidden masks keyed by (sample, power) and, per element, by each token's original
    position: a cropped prompt's kept positions, then the answer's positions onwards."""
    model = tiny()
    install_hidden_ablation(model, HiddenAblationConfig(rate=0.3, granularity=granularity))
    rows, batch = prompts()
    sample_ids, powers = torch.tensor([10, 11, 12]), torch.tensor([1, 2, 0])
    # row 1 is a "cropped" view: its prompt tokens sit at original positions 0, 1, 4, 5, ...
    prompt_keys = [list(range(5)), [0, 1] + list(range(4, 11)), list(range(7))]
    next_keys = torch.tensor([5, 11, 7])
    token_keys = torch.full(batch.shape, -1)
    for b, k in enumerate(prompt_keys):
        token_keys[b, : len(k)] = torch.tensor(k)
    keys = MaskKeys(sample_ids, powers, step=-1, token_keys=token_keys)
    got = greedy_generate(model, batch, torch.tensor(LENGTHS), max_new_tokens=5, pad_id=PAD,
                          keys=keys, next_token_keys=next_keys)
    plain = greedy_generate(model, batch, torch.tensor(LENGTHS), max_new_tokens=5, pad_id=PAD)
    for b, row in enumerate(rows):
        row_keys = lambda n, b=b: MaskKeys(  # noqa: E731
            sample_ids[b : b + 1], powers[b : b + 1], step=-1,
            token_keys=torch.tensor([(prompt_keys[b] + list(range(int(next_keys[b]), 200)))[:n]]),
        ) if powers[b] > 0 else None
        assert got[b] == argmax_loop(model, row, 5, keys=row_keys), b
    assert got[2] == plain[2]  # drop power 0: the full model


def test_qa_prompts_split_prompt_and_answer():
    tokens = torch.tensor([[5, 6, 7, 8, 9, 2, 0], [5, 6, 7, 8, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7]])
    labels = torch.full_like(tokens, -100)
    labels[0, 3:6] = tokens[0, 3:6]          # answer 8 9 <eos>
    labels[2, 2] = 3                          # answer 3, then an unlabelled gap, then more
    labels[2, 5] = 6
    lengths, has, refs = qa_prompts(tokens, shift_labels(labels))
    assert lengths.tolist()[0] == 3 and lengths.tolist()[2] == 2
    assert has.tolist() == [True, False, True]
    assert refs == [[8, 9, 2], [], [3]]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return demo_tokenizer(str(tmp_path_factory.mktemp("tok") / "demo.model"), vocab_size=512)


def test_answer_decoder_drops_special_tokens(tok):
    stops = stop_token_ids(tok)
    assert tok.eos_id in stops
    ids = tok.encode("yellow", add_bos=False, add_eos=True)
    assert AnswerDecoder(tok, stops)(ids) == "yellow"
    assert AnswerDecoder(tok, stops)([tok.eos_id]) == ""


def qa_method(tok, passes="all", max_new_tokens=4):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"seed": 0, "ablation": {"n_hidden": 1, "n_input": 1,
                                                    "hidden": {"rate": 0.3}}})
    method = ComparativeMethod(ComparativeSettings.from_config(cfg), ComparativeLoss(), "sft",
                               passes, GenerationSettings(max_new_tokens))
    method.set_tokenizer(tok)
    return method


def test_generative_validation_reports_exact_match_and_f1_per_pass(tok):
    model = tiny(vocab=512)
    dataset = needle_qa_dataset(tok, n_samples=6, split="validation", n_paragraphs=3)
    pad = collate_padding_idx(tok)
    method = qa_method(tok)
    method.prepare(model, RecipeData(dataset, None, None, pad))
    items = [dataset[i] for i in range(6)]
    whole = method.validation_step(model, comparative_collate(items, padding_idx=pad))
    metrics = method.validation_metrics(whole.to_host())
    for k in range(3):
        assert 0.0 <= metrics[f"exact_match_{k}"] <= 1.0
        assert 0.0 <= metrics[f"f1_{k}"] <= 1.0
    assert metrics["samples"] == 6
    assert set(metrics) == method.validation_metric_names()
    # sums, not means: two batches add up to the whole (any batch split, any rank split)
    halves = [method.validation_step(model, comparative_collate(items[i::2], padding_idx=pad))
              for i in range(2)]
    added = (halves[0] + halves[1]).to_host()
    for name in ("gen_samples", "exact_match", "token_f1"):
        assert added[name] == pytest.approx(whole.to_host()[name]), name
    line = method.describe_validation({f"val_{k}": v for k, v in metrics.items()})
    assert "exact_match_2=" in line and "f1_0=" in line


def test_generate_is_a_checked_validation_section():
    with pytest.raises(ValueError, match="max_new_token"):
        GenerationSettings.from_config({"max_new_token": 3})
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationSettings.from_config({"max_new_tokens": 0})
    assert GenerationSettings.from_config({}) == GenerationSettings(32, ())
    assert GenerationSettings.from_config(None) is None


class PrefixOracle(torch.nn.Module):
    """Predicts the next token of whichever known sequence the row's prefix starts (token 0,
    the demo's pad / unk, for an unknown prefix): a model that answers every uncropped sample
    correctly and knows nothing else."""

    def __init__(self, sequences, vocab):
        super().__init__()
        self.vocab = vocab
        self.table = {tuple(s[: i + 1]): s[i + 1] for s in sequences for i in range(len(s) - 1)}

    def forward(self, tokens):
        logits = torch.zeros(*tokens.shape, self.vocab)
        for b, row in enumerate(tokens.tolist()):
            for i in range(len(row)):
                logits[b, i, self.table.get(tuple(row[: i + 1]), 0)] = 1.0
        return logits


def test_exact_match_is_one_for_an_oracle_and_zero_for_its_cropped_views(tok):
    from omegaconf import OmegaConf

    dataset = needle_qa_dataset(tok, n_samples=5, split="validation", n_paragraphs=3)
    items = [dataset[i] for i in range(5)]
    model = PrefixOracle([list(it["tokens"]) for it in items], vocab=512)
    cfg = OmegaConf.create({"seed": 0, "ablation": {"n_input": 1}})
    method = ComparativeMethod(ComparativeSettings.from_config(cfg), ComparativeLoss(), "sft",
                               "all", GenerationSettings(8))
    method.set_tokenizer(tok)
    pad = collate_padding_idx(tok)
    method.prepare(model, RecipeData(dataset, None, None, pad))
    sums = method.validation_step(model, comparative_collate(items, padding_idx=pad)).to_host()
    metrics = method.validation_metrics(sums)
    assert metrics["exact_match_0"] == metrics["f1_0"] == 1.0
    assert metrics["exact_match_1"] == metrics["f1_1"] == 0.0
