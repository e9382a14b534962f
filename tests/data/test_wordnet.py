"""WordNet word-sense pairs from a few lines in WordNet 3.0's data-file format."""

import pytest
import torch

from comparative_recipe.data.wordnet import (
    find_word,
    mark_word,
    parse_data_line,
    read_exceptions,
    read_synsets,
    sense_accuracy,
    sense_instances,
    split_groups,
    word_forms,
    wordnet_sense_dataset,
)

LICENCE = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
VERB = (
    '00001740 29 v 04 breathe 0 take_a_breath 0 respire 0 suspire 3 001 * 00005041 v 0000 02 + 02 00 '
    '| draw air into, and expel out of, the lungs; "I can breathe better when the air is clean"; '
    '"The patient is respiring"  \n'
    '00002724 29 v 01 breathe 1 000 | be alive; "Is the patient still breathing?"  \n'
    '00003000 29 v 01 run 0 000 | move fast by using one\'s feet; "Don\'t run--you\'ll be out of breath"; '
    '"She ran to the store"  \n'
    '00003100 29 v 01 run 1 000 | be in charge of; "He runs the company"  \n'
    '00003200 29 v 01 run 2 000 | flow; "Water ran down the hill"  \n'
)
NOUN = '00004000 03 n 02 object 0 physical_object 0 000 | a tangible entity; "it was full of objects"  \n'
VERB_EXC = "ran run\n"


@pytest.fixture
def wordnet(tmp_path):
    (tmp_path / "data.verb").write_text(LICENCE + VERB)
    (tmp_path / "data.noun").write_text(LICENCE + NOUN)
    (tmp_path / "verb.exc").write_text(VERB_EXC)
    return tmp_path


def test_parse_data_line():
    s = parse_data_line(VERB.splitlines()[0], "verb")
    assert s.offset == 1740 and s.pos == "verb"
    assert s.lemmas == ("breathe", "take a breath", "respire", "suspire")
    assert s.definition == "draw air into, and expel out of, the lungs"
    assert s.examples == ("I can breathe better when the air is clean", "The patient is respiring")
    assert parse_data_line(LICENCE.rstrip("\n"), "verb") is None
    adj = parse_data_line("00005 00 s 01 big(a) 0 000 | large", "adj")
    assert adj.lemmas == ("big",) and adj.examples == ()


def test_word_forms_and_marking():
    assert find_word("Is the patient still breathing?", word_forms("breathe")) == (21, 30)
    assert find_word("She ran to the store", word_forms("run", ["ran"])) == (4, 7)
    assert find_word("rerun it", word_forms("run")) is None
    assert find_word("He runs the company", word_forms("run")) == (3, 7)
    assert mark_word("She ran to the store", (4, 7)) == 'She "ran" to the store'


def test_instances_by_hand(wordnet):
    synsets = read_synsets(wordnet, ("verb", "noun"))
    assert len(synsets) == 6
    rows = sense_instances(synsets, {"verb": read_exceptions(wordnet, "verb")})
    groups = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    # breathe: 2 senses, examples "I can breathe ..." and "Is the patient still breathing?";
    # "The patient is respiring": respire has one sense (skipped); run: 3 senses, 4 examples;
    # object: one sense (skipped)
    assert len(groups) == 2 + 4
    texts = [g[0]["text"] for g in groups.values()]
    assert texts == [
        'I can "breathe" better when the air is clean', 'Is the patient still "breathing"?',
        'Don\'t "run"--you\'ll be out of breath', 'She "ran" to the store',
        'He "runs" the company', 'Water "ran" down the hill',
    ]
    for g in groups.values():
        assert sum(r["label"] == "yes" for r in g) == 1
    assert [r["label"] for r in groups[1]] == ["no", "yes"]  # "still breathing": be alive
    assert groups[1][1]["text_pair"] == "breathe : be alive"
    assert len(groups[2]) == 3
    capped = sense_instances(synsets, {"verb": {"run": ["ran"]}}, max_senses=2)
    assert all(sum(r["group"] == g for r in capped) == 2 for g in range(2, 6))
    assert sum(r["label"] == "yes" for r in capped) == 6


def test_split_is_a_partition_and_seeded():
    train, val = split_groups(100, 0.1, seed=3)
    assert len(val) == 10 and not train & val and len(train | val) == 100
    assert split_groups(100, 0.1, seed=3) == (train, val)
    with pytest.raises(ValueError, match="validation_fraction"):
        split_groups(10, 1.0, 0)


def test_sense_accuracy_by_hand():
    scores = torch.tensor([0.9, 0.2, 0.1, 0.6, 0.3, 0.5])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    gold = torch.tensor([True, False, True, False, False, True])
    assert sense_accuracy(scores, groups, gold) == pytest.approx(2 / 3)


def test_dataset_items_and_attributes(wordnet, tmp_path):
    from comparative_recipe.data.demo import demo_tokenizer

    tok = demo_tokenizer(str(tmp_path / "tok.model"))
    train = wordnet_sense_dataset(tok, path=str(wordnet), split="train", pos=["verb", "noun"], validation_fraction=0.3,
                                  label_words=["no", "yes"])
    val = wordnet_sense_dataset(tok, path=str(wordnet), split="validation", pos=["verb", "noun"], validation_fraction=0.3,
                                  label_words=["no", "yes"])
    assert len(train) + len(val) == 2 + 2 + 3 * 4
    assert set(train.sense_groups.tolist()).isdisjoint(val.sense_groups.tolist())
    item = train[0]
    assert len(item["tokens"]) == len(item["labels"]) and item["sample_id"] == 0
    scored = [t for t in item["labels"] if t != -100]
    assert scored == [train.label_token_ids[int(train.sense_gold[0])]]


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="wordnet-base"):
        read_synsets(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="part of speech"):
        read_synsets(tmp_path, ("nouns",))
