"""Dataset-time chunking: the config, protection, and the window / separator / span / text
chunkers of one sample."""

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from comparative_recipe.data.chunking import (
    ChunkingConfig,
    chunking_config,
    PAD_CHUNK,
    PROTECTED_CHUNK,
    protected_mask,
    reject_crop_argument,
    sample_chunk_ids,
    span_chunk_ids,
    split_text,
    text_chunk_ids,
    window_chunk_ids,
)

X = -100  # label of a context token


def long(values):
    return torch.tensor(values, dtype=torch.long)


def test_sentinels():
    assert (PAD_CHUNK, PROTECTED_CHUNK) == (-2, -1)


# ----------------------------------------------------------------------------------------------
# chunkers


def test_protected_mask_by_hand():
    #            0  1  2  3  4  5  6  7  8  9 10 11 12 13
    tokens = long([1, 2, 3, 4, 5, 6, 7, 8, 9, 3, 5, 6, 7, 8])
    labels = long([X, X, X, X, X, X, X, 8, 9, X, X, X, X, 8])
    mask = protected_mask(tokens, labels, protect_leading=2, protect_trailing=2, special_ids={3})
    # leading 0,1; special (id 3) at 2 and 9; trailing before each answer: 5,6 and 11,12; labels
    expected = [1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 0, 1, 1, 1]
    assert mask.tolist() == [bool(v) for v in expected]


def test_protected_mask_defaults_protect_labels_and_the_token_before_each():
    tokens = long([4, 5, 6, 7])
    labels = long([X, X, 6, X])
    assert protected_mask(tokens, labels).tolist() == [False, True, True, False]
    # two turns; a label at position 0 has no token before it
    tokens = long([4, 5, 6, 7, 8, 9, 10])
    labels = long([4, X, X, X, 8, 9, X])
    assert protected_mask(tokens, labels).tolist() == [True, False, False, True, True, True, False]


def test_protected_mask_without_labels_protects_the_end():
    tokens = long([4, 5, 6, 7, 8])
    labels = long([X] * 5)
    mask = protected_mask(tokens, labels, protect_trailing=2)
    assert mask.tolist() == [False, False, False, True, True]


def test_protected_mask_rejects_bad_arguments():
    with pytest.raises(ValueError, match="protect_leading"):
        protected_mask(long([1, 2]), long([X, 2]), protect_leading=-1)
    with pytest.raises(ValueError, match="one length"):
        protected_mask(long([1, 2]), long([X, 2, 3]))


def test_window_chunks_by_hand():
    labels = long([X, X, X, X, X, X, X, 8, 9])
    protected = torch.zeros(9, dtype=torch.bool)
    protected[2] = True
    # runs 0-1 and 3-6; windows of 3 restart at each run
    assert window_chunk_ids(labels, protected, 3).tolist() == [0, 0, -1, 1, 1, 1, 2, -1, -1]
    assert window_chunk_ids(labels, protected, 1).tolist() == [0, 1, -1, 2, 3, 4, 5, -1, -1]
    assert window_chunk_ids(labels, protected, 100).tolist() == [0, 0, -1, 1, 1, 1, 1, -1, -1]


def test_window_chunks_of_nothing():
    assert window_chunk_ids(long([5, 6]), torch.zeros(2, dtype=torch.bool), 2).tolist() == [-1, -1]
    assert window_chunk_ids(long([]), torch.zeros(0, dtype=torch.bool), 2).tolist() == []


@pytest.mark.parametrize("window", [0, -3, 2.5])
def test_window_must_be_positive_int(window):
    with pytest.raises(ValueError, match="window"):
        window_chunk_ids(long([X, X]), torch.zeros(2, dtype=torch.bool), window)


def test_span_chunks_by_hand():
    protected = torch.zeros(12, dtype=torch.bool)
    protected[2] = True
    spans = [(6, 9), (1, 4), (9, 11)]
    ids = span_chunk_ids(12, spans, [False, False, True], protected)
    assert ids.tolist() == [-1, 0, -1, 0, -1, -1, 1, 1, 1, -1, -1, -1]
    # no required list: every span is droppable; a fully protected span is no chunk
    protected[6:9] = True
    assert span_chunk_ids(12, spans, None, protected).tolist() == [
        -1, 0, -1, 0, -1, -1, -1, -1, -1, 1, 1, -1
    ]


@pytest.mark.parametrize(
    "spans, required, message",
    [
        ([(0, 5), (4, 8)], None, "overlap"),
        ([(3, 13)], None, "out of bounds"),
        ([(-1, 2)], None, "out of bounds"),
        ([(4, 4)], None, "empty"),
        ([(0, 2)], [True, False], "required"),
    ],
)
def test_span_chunks_reject_bad_spans(spans, required, message):
    with pytest.raises(ValueError, match=message):
        span_chunk_ids(12, spans, required, torch.zeros(12, dtype=torch.bool))


def test_sample_chunk_ids_dispatches_on_config():
    tokens = long([1, 5, 9, 6, 9, 7, 8])
    labels = long([X, X, X, X, X, 7, 8])
    specials = {1}
    # protected: 0 (special), 4 (predicts the first label), 5 and 6 (labelled)
    window = sample_chunk_ids(tokens, labels, ChunkingConfig(window=2), special_ids=specials)
    assert window.tolist() == [-1, 0, 0, 1, -1, -1, -1]
    guarded = sample_chunk_ids(tokens, labels, ChunkingConfig(window=2), special_ids=specials,
                               protected_spans=[(1, 2)])
    assert guarded.tolist() == [-1, -1, 0, 0, -1, -1, -1]
    texts = ["", "One", ".", " Two", " more", "x", "y"]
    sentence = sample_chunk_ids(tokens, labels, ChunkingConfig(mode="sentence"),
                                special_ids=specials, token_texts=texts)
    assert sentence.tolist() == [-1, 0, 0, 1, -1, -1, -1]
    given = sample_chunk_ids(tokens, labels, ChunkingConfig(mode="sentence"),
                             text_spans=[(1, 2), (2, 5)])
    assert given.tolist() == [-1, 0, 1, 1, -1, -1, -1]  # outside every text span: protected
    spans = sample_chunk_ids(tokens, labels, ChunkingConfig(mode="spans"), spans=[(2, 4)])
    assert spans.tolist() == [-1, -1, 0, 0, -1, -1, -1]
    with pytest.raises(ValueError, match="token_texts"):
        sample_chunk_ids(tokens, labels, ChunkingConfig(mode="paragraph"))
    with pytest.raises(ValueError, match="spans"):
        sample_chunk_ids(tokens, labels, ChunkingConfig(mode="spans"))


def test_tokens_after_the_last_label_are_protected():
    tokens = long([4, 5, 6, 7, 8, 9, 10])
    labels = long([X, X, X, 7, X, X, X])
    ids = sample_chunk_ids(tokens, labels, ChunkingConfig(window=1))
    assert ids.tolist() == [0, 1, -1, -1, -1, -1, -1]


# ----------------------------------------------------------------------------------------------
# config


def test_chunking_config_validates():
    assert ChunkingConfig().mode == "window" and ChunkingConfig().window_size == 64
    assert ChunkingConfig(window=8).window_size == 8
    for bad, message in [
        (dict(mode="sentences"), "mode"),
        (dict(window=0), "window"),
        (dict(mode="sentence", window=8), "only read by mode 'window'"),
        (dict(mode="pattern"), "pattern"),
        (dict(mode="pattern", pattern="("), "not a valid regex"),
        (dict(mode="window", pattern=r"\n"), "only read by mode 'pattern'"),
        (dict(protect_trailing=-1), "protect_trailing"),
        (dict(mode="separator"), "found in the text"),
    ]:
        with pytest.raises(ValueError, match=message):
            ChunkingConfig(**bad)


def test_text_rules_name_the_boundaries():
    assert ChunkingConfig().text_rule is None and ChunkingConfig(mode="spans").boundary is None
    assert ChunkingConfig(mode="sentence").text_rule == "sentence"
    assert ChunkingConfig(mode="pattern", pattern=";").text_rule == "pattern:;"
    assert ChunkingConfig(mode="pattern", pattern="a|b").boundary.pattern == "a|b"


def test_chunking_config_from_a_mapping():
    default = ChunkingConfig(mode="spans")
    assert chunking_config(None, default) is default
    assert chunking_config({"mode": "sentence"}, default) == ChunkingConfig(mode="sentence")
    with pytest.raises(ValueError, match="unknown keys in dataset.chunking.*window_size"):
        chunking_config({"window_size": 3}, default)
    with pytest.raises(ValueError, match="`mode`"):
        chunking_config({"chunking": "window"}, default)
    with pytest.raises(TypeError, match="dataset.chunking"):
        chunking_config("window", default)


def test_a_crop_rate_in_the_dataset_is_an_error_that_says_where_it_goes():
    """Regression: dataset.crop.rate was accepted and silently ignored."""
    for call in (lambda: chunking_config({"mode": "window", "rate": 0.3}, ChunkingConfig()),
                 lambda: reject_crop_argument({"crop": {"rate": 0.3}, "packed": False})):
        with pytest.raises(ValueError) as err:
            call()
        assert "ablation.crop.rate" in str(err.value) and "dataset.chunking" in str(err.value)
    reject_crop_argument({"packed": False})


# ----------------------------------------------------------------------------------------------
# text boundaries


SENTENCE = ChunkingConfig(mode="sentence").boundary
PARAGRAPH = ChunkingConfig(mode="paragraph").boundary


@pytest.mark.parametrize("text, pieces", [
    ("One two. Three!\nFour? five\n\nSix", ["One two.", " Three!\n", "Four?", " five\n\n", "Six"]),
    ('He said "stop." Then (he left.) End', ['He said "stop."', " Then (he left.)", " End"]),
    ("3.14 and e.g. x", ["3.14 and e.g.", " x"]),
    ("\n\nA. B.  \n  C", ["\n\nA.", " B.  \n  ", "C"]),
    ("Trailing. \n", ["Trailing. \n"]),
    ("你好。再见！好", ["你好。", "再见！", "好"]),
    ("", [""]),
])
def test_sentence_pieces_by_hand(text, pieces):
    assert split_text(text, SENTENCE) == pieces


def test_paragraph_and_pattern_pieces_by_hand():
    assert split_text("a b.\nc\n\n d\n", PARAGRAPH) == ["a b.\n", "c\n\n ", "d\n"]
    semicolon = ChunkingConfig(mode="pattern", pattern=";").boundary
    assert split_text("a;b;;c;", semicolon) == ["a;", "b;", ";", "c;"]
    chapter = ChunkingConfig(mode="pattern", pattern="(?=Chapter)").boundary
    assert split_text("Intro Chapter 1 Chapter 2", chapter) == ["Intro ", "Chapter 1 ", "Chapter 2"]
    assert split_text("no boundary at all", None) == ["no boundary at all"]


def test_text_chunks_by_hand():
    # token texts as a tokenizer that glues spaces to words and merges ".\n" gives them
    texts = ["", "The", " end", ".\n", "Next", " one", ".", " Last", " bit", " ", "!", " A", "B"]
    labels = long([X] * 12 + [9])
    protected = labels != X
    protected[0] = True
    ids = text_chunk_ids(labels, protected, texts, SENTENCE)
    # pieces "The end.\n" | "Next one." | " Last bit !" | " A" ("B" is labelled)
    assert ids.tolist() == [-1, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3, -1]
    paragraph = text_chunk_ids(labels, protected, texts, PARAGRAPH)
    assert paragraph.tolist() == [-1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, -1]


def test_whitespace_only_pieces_join_a_neighbour():
    # a run that opens with a line break after a protected token, and a run of line breaks
    texts = ["Q", "\n", "\n", "a", "b", "\n", "\n", "c", "d"]
    labels = long([X] * 8 + [9])
    protected = torch.tensor([True] + [False] * 7 + [True])
    ids = text_chunk_ids(labels, protected, texts, PARAGRAPH)
    assert ids.tolist() == [-1, 0, 0, 0, 0, 0, 0, 1, -1]
    # a protected token ends a run; the next run's opening line breaks join its first piece
    protected[4] = True
    ids = text_chunk_ids(labels, protected, texts, PARAGRAPH)
    assert ids.tolist() == [-1, 0, 0, 0, -1, 1, 1, 1, -1]


def test_text_chunks_reject_mismatched_texts():
    with pytest.raises(ValueError, match="token_texts"):
        text_chunk_ids(long([X, X]), torch.zeros(2, dtype=torch.bool), ["a"], SENTENCE)


def test_text_chunks_match_an_independent_count_on_random_text():
    """Random sentences, one token per word (space glued in front) and punctuation split off or
    merged: the chunks are the sentences, counted with a plain regex."""
    gen = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "word", "gamma", "x"]
    for _ in range(30):
        texts, sentences = [], 0
        for s in range(int(torch.randint(1, 6, (1,), generator=gen))):
            for w in range(int(torch.randint(1, 4, (1,), generator=gen))):
                word = words[int(torch.randint(0, 5, (1,), generator=gen))]
                texts.append((" " if texts else "") + word)
            end = [".", "!", "?", ".\n", "\n"][int(torch.randint(0, 5, (1,), generator=gen))]
            texts.append(end)
            sentences += 1
        text = "".join(texts)
        assert len(re.findall(r"[.!?]\s|\n|[.!?]$", text)) == sentences
        labels = long([X] * len(texts))
        ids = text_chunk_ids(labels, torch.zeros(len(texts), dtype=torch.bool), texts, SENTENCE)
        assert int(ids.max()) + 1 == sentences, (texts, ids.tolist())


CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_dataset_sections_parse(path):
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    sections = [cfg["dataset"]]
    if cfg.get("validation"):
        sections.append(cfg["validation"]["dataset"])
    for section in sections:
        reject_crop_argument(section)
        chunking_config(section.get("chunking"), ChunkingConfig())
