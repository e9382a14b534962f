"""Exact match and token F1 against hand-computed values (SQuAD normalisation)."""

import pytest

from comparative_recipe.metrics.qa import answer_tokens, exact_match, normalize_answer, token_f1


@pytest.mark.parametrize("text,expected", [
    ("The  Quick, brown fox!", "quick brown fox"),
    ("An apple a day", "apple day"),
    ("theater", "theater"),          # articles are whole words only
    ("don't", "dont"),               # punctuation removed inside words
    ("  \nGreen.\t", "green"),
    ("the", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("prediction,reference,expected", [
    ("the Cat.", "cat", 1.0),
    ("cats", "cat", 0.0),
    ("an apple", "Apple!", 1.0),
    ("", "", 1.0),
    ("green", "green lamp", 0.0),
])
def test_exact_match(prediction, reference, expected):
    assert exact_match(prediction, reference) == expected


@pytest.mark.parametrize("prediction,reference,expected", [
    # [cat, sat, on, mat] vs [cat, on, mat]: overlap 3, P = 3/4, R = 1, F1 = 6/7
    ("the cat sat on the mat", "a cat on a mat", 6 / 7),
    # multisets: [red, red, blue] vs [red, blue, blue]: overlap 1 + 1 = 2, P = R = 2/3
    ("red red blue", "red blue blue", 2 / 3),
    # [green] vs [green, lamp]: P = 1, R = 1/2, F1 = 2/3
    ("Green", "the green lamp", 2 / 3),
    ("dog", "cat", 0.0),
    ("yellow", "yellow", 1.0),
    ("", "", 1.0),        # both empty
    ("the", "", 1.0),     # normalises to empty on both sides
    ("", "cat", 0.0),
    ("cat", "a", 0.0),
])
def test_token_f1(prediction, reference, expected):
    assert token_f1(prediction, reference) == pytest.approx(expected)


def test_answer_tokens_split_the_normalised_text():
    assert answer_tokens("The red, RED boat.") == ["red", "red", "boat"]
