"""Word-sense examples from WordNet glosses (LMGC, Wahle et al., arXiv 2106.07967).

WordNet 3.0's ``data.<pos>`` files (Debian ``wordnet-base``: ``/usr/share/wordnet``; without
installing: ``apt-get download wordnet-base && dpkg -x wordnet-base_*.deb root``) hold one synset
per line: its lemmas and a gloss, ``definition; "usage example"; ...``. Each usage example is a
context in which one of the synset's lemmas is used in that sense. An instance is such a context
with the word marked in double quotes; its candidates are every synset (same part of speech) that
holds the lemma, each as ``"lemma : definition"``; the pair is labelled yes for the synset the
example came from and no for the others. Word-sense disambiguation picks, per instance, the
candidate with the highest probability of "yes" (``sense_accuracy``).

.. code-block:: yaml

    dataset:
      _component_: comparative_recipe.data.wordnet_sense_dataset
      path: /usr/share/wordnet
      split: train            # or validation (a held-out fraction of the instances)
"""

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

POS_FILES = {"noun": "noun", "verb": "verb", "adj": "adj", "adv": "adv"}
DEFAULT_TEMPLATE = "Context: {text}\nSense: {text_pair}\nDoes the sense fit the quoted word?"
SPLITS = ("train", "validation")
_QUOTED = re.compile(r'"([^"]+)"')


@dataclass(frozen=True)
class Synset:
    """One WordNet synset: its byte offset in ``data.<pos>``, part of speech, lemmas (spaces
    for underscores, WordNet's adjective markers like ``(a)`` removed), definition and usage
    examples (the gloss's quoted parts)."""

    offset: int
    pos: str
    lemmas: Tuple[str, ...]
    definition: str
    examples: Tuple[str, ...]


def _missing(path: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} not found in {path}: point `path` at WordNet 3.0's database directory (Debian "
        "wordnet-base installs it as /usr/share/wordnet; without installing, `apt-get download "
        "wordnet-base && dpkg -x wordnet-base_*.deb <dir>` gives <dir>/usr/share/wordnet)"
    )


def parse_data_line(line: str, pos: str) -> Optional[Synset]:
    """A ``data.<pos>`` line -> ``Synset`` (None for the licence header's lines)."""
    if not line or line.startswith(" "):
        return None
    head, sep, gloss = line.partition(" | ")
    fields = head.split()
    if not sep or len(fields) < 4:
        raise ValueError(f"not a WordNet data line: {line[:80]!r}")
    n_words = int(fields[3], 16)
    words = fields[4:4 + 2 * n_words:2]
    lemmas = tuple(re.sub(r"\([a-z]+\)$", "", w).replace("_", " ") for w in words)
    gloss = gloss.strip()
    examples = tuple(e.strip() for e in _QUOTED.findall(gloss) if e.strip())
    definition = gloss.split('"', 1)[0].strip().rstrip(";").strip()
    return Synset(int(fields[0]), pos, lemmas, definition, examples)


def read_synsets(path: Any, pos: Sequence[str] = tuple(POS_FILES)) -> List[Synset]:
    """Every synset of the ``data.<pos>`` files under ``path``, in file order."""
    root = Path(str(path))
    synsets = []
    for p in pos:
        if p not in POS_FILES:
            raise ValueError(f"part of speech {p!r} is not one of {list(POS_FILES)}")
        file = root / f"data.{POS_FILES[p]}"
        if not file.is_file():
            raise _missing(root, file.name)
        with open(file, encoding="utf-8", errors="replace") as f:
            synsets += [s for s in (parse_data_line(ln.rstrip("\n"), p) for ln in f) if s is not None]
    return synsets


def read_exceptions(path: Any, pos: str) -> Dict[str, List[str]]:
    """``<pos>.exc``: base form -> its irregular inflections (``{"go": ["went", "gone"]}``);
    empty when the file is absent."""
    file = Path(str(path)) / f"{POS_FILES[pos]}.exc"
    forms: Dict[str, List[str]] = {}
    if file.is_file():
        for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
            parts = line.split()
            for base in parts[1:]:
                forms.setdefault(base.replace("_", " "), []).append(parts[0].replace("_", " "))
    return forms


def word_forms(lemma: str, irregular: Sequence[str] = ()) -> List[str]:
    """The lemma and its regular inflections (-s, -es, -ed, -d, -ing, e dropped before -ing /
    -ed, a final y to -ies / -ied), plus ``irregular`` ones; longest first."""
    forms = {lemma, lemma + "s", lemma + "es", lemma + "ed", lemma + "d", lemma + "ing", *irregular}
    if lemma.endswith("e"):
        forms |= {lemma[:-1] + "ing"}
    if lemma.endswith("y"):
        forms |= {lemma[:-1] + "ies", lemma[:-1] + "ied"}
    return sorted(forms, key=len, reverse=True)


def find_word(context: str, forms: Sequence[str]) -> Optional[Tuple[int, int]]:
    """The character span of the first whole-word occurrence of any of ``forms`` in
    ``context`` (case-insensitive), or None."""
    best = None
    for form in forms:
        m = re.search(rf"(?<!\w){re.escape(form)}(?!\w)", context, flags=re.IGNORECASE)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), m.end())
    return best


def mark_word(context: str, span: Tuple[int, int]) -> str:
    """``context`` with the span in double quotes: ``I can "breathe" better``."""
    a, b = span
    return f'{context[:a]}"{context[a:b]}"{context[b:]}'


def sense_instances(synsets: Sequence[Synset], exceptions: Mapping[str, Mapping[str, Sequence[str]]],
                    max_senses: Optional[int] = None) -> List[Dict[str, Any]]:
    """The (context, candidate sense) rows of every usage example whose word has 2+ senses.

    Each row: ``text`` (the context, word in quotes), ``text_pair`` (``"lemma : definition"``),
    ``label`` ("yes" for the example's own synset, else "no"), ``group`` (the instance's index:
    the rows of one context and word share it) and ``lemma``. ``max_senses``: at most that many
    candidates per instance (the gold one and the first others in file order).
    """
    senses: Dict[Tuple[str, str], List[Synset]] = {}
    for s in synsets:
        for lemma in s.lemmas:
            senses.setdefault((s.pos, lemma.lower()), []).append(s)
    rows, group = [], 0
    for s in synsets:
        for example in s.examples:
            for lemma in s.lemmas:
                candidates = senses[(s.pos, lemma.lower())]
                if len(candidates) < 2:
                    continue
                span = find_word(example, word_forms(lemma, exceptions.get(s.pos, {}).get(lemma, ())))
                if span is None:
                    continue
                if max_senses is not None:
                    others = [c for c in candidates if c is not s][: max_senses - 1]
                    candidates = [c for c in candidates if c is s or c in others]
                text = mark_word(example, span)
                for c in candidates:
                    rows.append({"text": text, "text_pair": f"{lemma} : {c.definition}",
                                 "label": "yes" if c is s else "no", "group": group, "lemma": lemma})
                group += 1
                break  # one instance per example: its first lemma found
    return rows


def split_groups(n_groups: int, validation_fraction: float, seed: int) -> Tuple[set, set]:
    """(train groups, validation groups): a seeded random ``validation_fraction`` of the
    instances held out (at least one of each when there are two or more)."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    order = list(range(n_groups))
    random.Random(seed).shuffle(order)
    n_val = min(n_groups - 1, max(1, round(n_groups * validation_fraction))) if n_groups > 1 else 0
    return set(order[n_val:]), set(order[:n_val])


def sense_accuracy(yes_scores: torch.Tensor, groups: torch.Tensor, gold: torch.Tensor) -> float:
    """Word-sense accuracy: per group (instance), is the candidate with the highest "yes" score
    the gold one? yes_scores [N] (probabilities or logits), groups [N] ints, gold [N] bool.
    Ties go to the first candidate. Returns the fraction of groups picked right."""
    if yes_scores.numel() == 0:
        raise ValueError("no candidates to score")
    correct, total = 0, 0
    for g in torch.unique(groups):
        idx = (groups == g).nonzero().squeeze(1)
        pick = idx[yes_scores[idx].argmax()]
        correct += int(bool(gold[pick]))
        total += 1
    return correct / total


def wordnet_sense_dataset(
    tokenizer: Any,
    *,
    path: str,
    split: str = "train",
    pos: Sequence[str] = tuple(POS_FILES),
    validation_fraction: float = 0.1,
    max_senses: Optional[int] = None,
    max_instances: Optional[int] = None,
    seed: int = 0,
    label_words: Sequence[str] = (" no", " yes"),
    template: str = DEFAULT_TEMPLATE,
    max_seq_len: Optional[int] = None,
):
    """Yes/no word-sense pairs from WordNet as a classification dataset (see the module doc).

    Args:
        path: WordNet 3.0's database directory (``data.noun``, ...).
        split: "train" or "validation": the same seeded split of instances either way.
        pos: parts of speech to read. max_senses: candidates per instance (None: all).
        max_instances: at most that many instances of the split (the first in a seeded order).
        label_words: the "no" and "yes" words, in that order.
        template: the classification prompt, with ``{text}`` (context) and ``{text_pair}``
            (``"lemma : definition"``).

    Returns:
        ``classification_dataset``-style items (``task: classification``) with attributes
        ``sense_groups`` (LongTensor [N], the instance of each item) and ``sense_gold``
        (BoolTensor [N]) for ``sense_accuracy``.
    """
    from datasets import Dataset as HFDataset

    from comparative_recipe.data.chunking import ChunkingConfig
    from comparative_recipe.data.classification import ClassificationDataset
    from comparative_recipe.data.comparative import ComparativeDataset

    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if len(label_words) != 2:
        raise ValueError(f"label_words must be the 'no' and 'yes' words, got {list(label_words)}")
    synsets = read_synsets(path, pos)
    exceptions = {p: read_exceptions(path, p) for p in pos}
    rows = sense_instances(synsets, exceptions, max_senses)
    n_groups = rows[-1]["group"] + 1 if rows else 0
    train, val = split_groups(n_groups, validation_fraction, seed)
    keep = train if split == "train" else val
    if max_instances is not None:
        order = sorted(keep)
        random.Random(seed + 1).shuffle(order)
        keep = set(order[:max_instances])
    rows = [r for r in rows if r["group"] in keep]
    if not rows:
        raise ValueError(
            f"no word-sense instances in split {split!r} of {path} (pos {list(pos)}): the data "
            "files hold no usage example of a word with two or more senses"
        )
    data = HFDataset.from_list(rows)
    chunking = ChunkingConfig(mode="spans")
    inner = ClassificationDataset(
        tokenizer, data, label_words=list(label_words), text_column="text",
        text_pair_column="text_pair", label_map={"no": label_words[0], "yes": label_words[1]},
        template=template, max_seq_len=max_seq_len, chunking=chunking,
        source="wordnet_sense_dataset",
    )
    dataset = ComparativeDataset(inner, tokenizer, chunking)
    dataset.sense_groups = torch.tensor([r["group"] for r in rows])
    dataset.sense_gold = torch.tensor([r["label"] == "yes" for r in rows])
    return dataset
