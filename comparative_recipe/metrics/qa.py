"""Exact match and token F1 of a predicted answer against a reference, SQuAD-style.

Both texts are normalised the way the SQuAD evaluation script does: lower case, punctuation
removed, the articles "a", "an", "the" removed, whitespace collapsed. Pure functions of two
strings; the generative validation (``metrics.generation``) sums them over samples.
"""

import re
import string
from collections import Counter
from typing import List

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's ``normalize_answer``)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_tokens(text: str) -> List[str]:
    """The normalised answer split at whitespace: the units token F1 counts."""
    return normalize_answer(text).split()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the normalised texts are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of the precision and recall of the normalised tokens (a multiset overlap).

    When either side normalises to no token, the score is 1.0 if both do and 0.0 otherwise
    (SQuAD v2's rule for empty answers).
    """
    pred, ref = answer_tokens(prediction), answer_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)
