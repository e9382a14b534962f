"""The embedded demo: a needle-in-paragraphs QA task and a tokenizer for it, no download needed.

Each sample is a few short paragraphs, each stating one fact about one person's object ("The lamp
of Mira is green. Mira keeps it in the attic."), and a question about one of them ("What is the
color of Mira's lamp?"). The answer is drawn uniformly from several values, so it cannot be
guessed from the question; the distractor paragraphs talk about the same person's other objects
and other people's same object, and state the other kind of attribute (a material when the
question asks for a color), so the answer is the one value of the asked kind in the context.
"""

import os
import random
import shutil
import tempfile
from typing import Any, Dict, List, Optional

from datasets import Dataset as HFDataset

from torchtune.models.llama2 import llama2_tokenizer
from torchtune.models.llama2 import Llama2Tokenizer

from comparative_recipe.data.chunking import ChunkingLike, reject_crop_argument
from comparative_recipe.data.comparative import ComparativeDataset
from comparative_recipe.data.context_qa import context_qa_from_data, DEFAULT_QA_INSTRUCTION

NAMES = ["Mira", "Tom", "Ana", "Leo", "Sara", "Ivan", "Nora", "Omar", "Lina", "Paul", "Rosa", "Ken"]
OBJECTS = ["lamp", "boat", "house", "hat", "door", "cup", "kite", "bike", "coat", "box"]
ATTRIBUTES = {
    "color": ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"],
    "material": ["wood", "glass", "stone", "paper", "metal", "wool", "clay", "silk"],
}
PLACES = ["garden", "kitchen", "attic", "shed", "hall", "cellar", "office", "car"]

#: what ``comparative_collate`` should pad demo tokens with: ``llama2_tokenizer`` sets
#: ``pad_id = 0`` (the ``<unk>`` piece; SentencePiece's own pad id is -1, i.e. none).
DEMO_PAD_ID = 0


def _fact(name: str, obj: str, kind: str, value: str) -> str:
    if kind == "color":
        return f"The {obj} of {name} is {value}."
    return f"The {obj} of {name} is made of {value}."


def _question(name: str, obj: str, kind: str) -> str:
    if kind == "color":
        return f"What is the color of {name}'s {obj}?"
    return f"What is {name}'s {obj} made of?"


def _filler(rng: random.Random, name: str) -> str:
    if rng.random() < 0.5:
        return f"{name} keeps it in the {rng.choice(PLACES)}."
    return f"It was a gift from {rng.choice([n for n in NAMES if n != name])}."


def needle_qa_records(
    n_samples: int, *, seed: int = 0, n_paragraphs: int = 4, split: str = "train"
) -> List[Dict[str, Any]]:
    """Deterministic needle-QA records, generated in code.

    Each record: ``context`` (List[str], ``n_paragraphs`` paragraphs), ``question`` (str),
    ``answer`` (str, a color or a material), ``gold`` (int, index of the paragraph that states
    the answer). Every paragraph is about a different (person, object) pair; with 3 or more
    paragraphs, one distractor is the asked person's other object and one is another person's
    same object. The same arguments always give the same records; ``split`` selects an
    independent stream ("train", "validation", ...), so a validation set does not repeat the
    training stream.
    """
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")
    if not 1 <= n_paragraphs <= len(NAMES):
        raise ValueError(f"n_paragraphs must be in [1, {len(NAMES)}], got {n_paragraphs}")
    rng = random.Random(f"needle_qa/{split}/{seed}")
    kinds = sorted(ATTRIBUTES)
    records = []
    for _ in range(n_samples):
        name, obj, kind = rng.choice(NAMES), rng.choice(OBJECTS), rng.choice(kinds)
        answer = rng.choice(ATTRIBUTES[kind])
        pairs = [(name, obj)]
        if n_paragraphs >= 2:
            pairs.append((name, rng.choice([o for o in OBJECTS if o != obj])))
        if n_paragraphs >= 3:
            pairs.append((rng.choice([n for n in NAMES if n != name]), obj))
        while len(pairs) < n_paragraphs:
            pair = (rng.choice(NAMES), rng.choice(OBJECTS))
            if pair not in pairs:
                pairs.append(pair)
        paragraphs = []
        for i, (p_name, p_obj) in enumerate(pairs):
            # distractors state the other kind of fact, so the gold paragraph is the only one
            # with a value of the asked kind: a tiny model learns to use the context within a
            # demo's few hundred steps, and a crop that removes the gold paragraph hurts.
            p_kind = kind if i == 0 else next(k for k in kinds if k != kind)
            value = answer if i == 0 else rng.choice(ATTRIBUTES[p_kind])
            paragraphs.append(f"{_fact(p_name, p_obj, p_kind, value)} {_filler(rng, p_name)}")
        order = list(range(n_paragraphs))
        rng.shuffle(order)
        records.append(
            {
                "context": [paragraphs[i] for i in order],
                "question": _question(name, obj, kind),
                "answer": answer,
                "gold": order.index(0),
            }
        )
    return records


def needle_qa_dataset(
    tokenizer: Any,
    *,
    n_samples: int = 2000,
    seed: int = 0,
    n_paragraphs: int = 4,
    gold_required: bool = False,
    split: str = "train",
    max_seq_len: Optional[int] = None,
    instruction: Optional[str] = DEFAULT_QA_INSTRUCTION,
    chunking: ChunkingLike = None,
    **unexpected: Any,
) -> ComparativeDataset:
    """The demo dataset: ``needle_qa_records`` through the ``context_qa_dataset`` path.

    One chunk per paragraph (mode "spans" unless ``chunking`` says otherwise). Items as in
    ``context_qa_dataset``: ``tokens``, ``labels``, ``chunk_spans``, ``chunk_required``,
    ``protected_spans``, ``sample_id``, ``chunk_ids``.

    ``gold_required=False`` (default) lets input crops remove the gold paragraph too: a cropped
    view then often cannot know the answer, its loss is high, and the comparative loss asks the
    full model to beat its cropped views, i.e. to use the evidence it has. With
    ``gold_required=True`` the gold paragraph is never dropped (the reference's setting for
    multi-paragraph QA, where crops remove distractors only).

    Args:
        tokenizer (Any): e.g. ``demo_tokenizer(path)``.
        n_samples (int): number of samples. Default 2000.
        seed (int): record seed. Default 0.
        n_paragraphs (int): paragraphs per sample. Default 4.
        gold_required (bool): mark the gold paragraph required. Default False.
        split (str): "train" or "validation"; they use disjoint random streams.
        max_seq_len, instruction, chunking: as in ``context_qa_dataset``.
    """
    reject_crop_argument(unexpected)
    if unexpected:
        raise TypeError(f"needle_qa_dataset got unexpected arguments {sorted(unexpected)}")
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    records = needle_qa_records(n_samples, seed=seed, n_paragraphs=n_paragraphs, split=split)
    if not records:
        raise ValueError("n_samples must be >= 1")
    return context_qa_from_data(
        tokenizer,
        HFDataset.from_list(records),
        required_column="gold" if gold_required else None,
        max_seq_len=max_seq_len,
        instruction=instruction,
        chunking=chunking,
        source="needle_qa_dataset",
    )


def _tokenizer_corpus() -> List[str]:
    """Training text for the demo tokenizer, in a fixed order, independent of any user seed."""
    lines = [DEFAULT_QA_INSTRUCTION, "Question:", "Answer:"]
    lines += NAMES + OBJECTS + PLACES + [v for kind in sorted(ATTRIBUTES) for v in ATTRIBUTES[kind]]
    for record in needle_qa_records(2000, seed=0, split="tokenizer"):
        # pieces as the dataset encodes them: each on its own, the separator too (joining
        # paragraphs with it would teach BPE merges like ".\n\n" that hide the separator)
        lines += record["context"]
        lines.append("\n\n")
        lines.append(f"Question: {record['question']}\nAnswer:")
        lines.append(record["answer"])
    return lines


def demo_tokenizer(path: str, vocab_size: int = 512, max_seq_len: Optional[int] = None) -> Llama2Tokenizer:
    """A SentencePiece BPE tokenizer for the demo, trained on first use and cached at ``path``.

    If ``path`` does not exist, trains a BPE model (byte fallback, so any text encodes; identity
    normalisation, so newlines survive; one thread and a fixed corpus, so every training gives
    the same model) and moves it to ``path`` atomically (concurrent callers, e.g. ranks, just
    overwrite each other with identical files). Takes well under a second.

    Returns ``llama2_tokenizer(path, max_seq_len=max_seq_len, prompt_template=None)``: bos 1,
    eos 2, ids < ``vocab_size``. Its ``pad_id`` is 0 (set by torchtune's Llama2Tokenizer;
    SentencePiece's own is -1), which is what ``comparative_collate`` should pad with
    (``DEMO_PAD_ID``, or ``collate_padding_idx(tokenizer)``).

    Raises:
        ValueError: ``vocab_size`` too small for byte fallback (about 330 is the minimum), or
            an existing model at ``path`` has more than ``vocab_size`` pieces.
    """
    if not os.path.exists(path):
        import sentencepiece as spm

        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".demo_tokenizer_", dir=directory)
        try:
            prefix = os.path.join(tmp, "spm")
            try:
                spm.SentencePieceTrainer.train(
                    sentence_iterator=iter(_tokenizer_corpus()),
                    model_prefix=prefix,
                    model_type="bpe",
                    vocab_size=vocab_size,
                    hard_vocab_limit=False,
                    byte_fallback=True,
                    character_coverage=1.0,
                    normalization_rule_name="identity",
                    remove_extra_whitespaces=False,
                    shuffle_input_sentence=False,
                    num_threads=1,
                    unk_id=0,
                    bos_id=1,
                    eos_id=2,
                    pad_id=-1,
                    minloglevel=2,
                )
            except RuntimeError as e:
                raise ValueError(f"could not train the demo tokenizer with vocab_size={vocab_size}: {e}") from e
            os.replace(prefix + ".model", path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = llama2_tokenizer(path, max_seq_len=max_seq_len, prompt_template=None)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"the tokenizer at {path} has {tokenizer.vocab_size} pieces, more than "
            f"vocab_size={vocab_size}; delete it to retrain, or raise vocab_size"
        )
    return tokenizer
