"""Step-time input crops: nested drop counts, drop orders, crop views."""

import pytest
import torch

from comparative_recipe.ablation.crops import (
    chunk_counts,
    chunk_drop_ranks,
    crop_views,
    nested_drop_counts,
)
from comparative_recipe.data.chunking import protected_mask, window_chunk_ids

X = -100  # label of a context token
PAD = 0
SPECIAL = 1


def long(values):
    return torch.tensor(values, dtype=torch.long)


# ----------------------------------------------------------------------------------------------
# random batches built with the real chunkers


def random_sample(gen, length):
    """tokens, labels, chunk_ids of one sample: context, an answer, sometimes a second turn."""
    tokens = torch.randint(2, 50, (length,), generator=gen)
    tokens[0] = SPECIAL  # BOS-like special token
    labels = torch.full((length,), X)
    answer = int(torch.randint(1, 4, (1,), generator=gen))
    labels[-answer:] = tokens[-answer:]
    if length > 20 and torch.rand(1, generator=gen) < 0.5:  # an earlier turn's answer
        labels[10:13] = tokens[10:13]
    protected = protected_mask(
        tokens,
        labels,
        protect_leading=int(torch.randint(0, 3, (1,), generator=gen)),
        protect_trailing=int(torch.randint(0, 3, (1,), generator=gen)),
        special_ids={SPECIAL},
    )
    window = int(torch.randint(1, 5, (1,), generator=gen))
    return tokens, labels, window_chunk_ids(labels, protected, window)


def random_batch(seed, batch_size=6, max_length=40):
    """Right-padded batch; the last row has nothing droppable."""
    gen = torch.Generator().manual_seed(seed)
    samples = [
        random_sample(gen, int(torch.randint(6, max_length, (1,), generator=gen)))
        for _ in range(batch_size - 1)
    ]
    short = long([SPECIAL, 7, 8, 9])
    samples.append((short, long([X, 8, 9, X]), long([-1, -1, -1, -1])))  # labelled/special only
    width = max(t.numel() for t, _, _ in samples)
    tokens = torch.full((batch_size, width), PAD)
    labels = torch.full((batch_size, width), X)
    chunk_ids = torch.full((batch_size, width), -2)
    for row, (t, l, c) in enumerate(samples):
        tokens[row, : t.numel()], labels[row, : t.numel()], chunk_ids[row, : t.numel()] = t, l, c
    sample_ids = torch.randperm(1000, generator=gen)[:batch_size]
    return tokens, labels, chunk_ids, sample_ids


def views_of(batch, levels=(0, 1, 2, 3, 4), rate=0.3, seed=11, step=5):
    tokens, labels, chunk_ids, sample_ids = batch
    return crop_views(
        tokens, labels, chunk_ids, sample_ids, list(levels), rate=rate, seed=seed, step=step,
        pad_id=PAD,
    )


def kept_positions(view, row):
    return set(view.token_keys[row, : view.lengths[row]].tolist())


# ----------------------------------------------------------------------------------------------
# nested_drop_counts


def test_drop_counts_by_hand():
    assert nested_drop_counts(long([5]), 6, 0.1).tolist() == [[0, 1, 2, 3, 4, 5, 5]]
    assert nested_drop_counts(long([10]), 5, 0.5).tolist() == [[0, 5, 7, 8, 9, 10]]
    assert nested_drop_counts(long([0, 3]), 2, 0.5).tolist() == [[0, 0, 0], [0, 1, 2]]
    assert nested_drop_counts(long([4]), 3, 0.0).tolist() == [[0, 1, 2, 3]]
    assert nested_drop_counts(long([7]), 0, 0.5).tolist() == [[0]]


def test_drop_counts_use_exact_arithmetic():
    # q_2 = 1 - 0.8**2 = 0.36 and 0.36 * 25 = 9; double arithmetic gives 8.999... -> 8
    assert nested_drop_counts(long([25]), 2, 0.2).tolist() == [[0, 5, 9]]


def test_drop_counts_are_monotone_capped_and_strict_while_chunks_remain():
    n = torch.arange(0, 40)
    for rate in (0.0, 0.05, 0.3, 0.5, 0.9, 0.99):
        counts = nested_drop_counts(n, 8, rate)
        assert counts.shape == (40, 9)
        assert (counts[:, 0] == 0).all()
        assert (counts <= n[:, None]).all()
        steps = counts[:, 1:] - counts[:, :-1]
        assert ((steps >= 1) | (counts[:, :-1] == n[:, None])).all()


@pytest.mark.parametrize("rate", [1.0, -0.1, float("nan"), 2])
def test_drop_counts_reject_bad_rate(rate):
    with pytest.raises(ValueError, match="rate"):
        nested_drop_counts(long([3]), 2, rate)


def test_drop_counts_reject_bad_arguments():
    with pytest.raises(ValueError, match="max_level"):
        nested_drop_counts(long([3]), -1, 0.5)
    with pytest.raises(ValueError, match="n_chunks"):
        nested_drop_counts(long([[3]]), 1, 0.5)
    with pytest.raises(ValueError, match="n_chunks"):
        nested_drop_counts(long([-1]), 1, 0.5)


# ----------------------------------------------------------------------------------------------
# drop order


def test_ranks_are_a_permutation_per_sample_shared_by_a_chunk_tokens():
    tokens, labels, chunk_ids, sample_ids = random_batch(0)
    ranks = chunk_drop_ranks(chunk_ids, sample_ids, seed=3, step=1)
    assert ((ranks == -1) == (chunk_ids < 0)).all()
    for row in range(chunk_ids.shape[0]):
        n = int(chunk_ids[row].max()) + 1
        per_chunk = {}
        for c, r in zip(chunk_ids[row].tolist(), ranks[row].tolist()):
            if c >= 0:
                assert per_chunk.setdefault(c, r) == r
        assert sorted(per_chunk.values()) == list(range(max(n, 0)))


def test_ranks_depend_on_sample_id_not_row():
    chunk_ids = long([[0, 0, 1, 2, 3, 4, 5, 6, 7, -1], [0, 1, 2, 3, 4, 5, 6, 7, -2, -2]])
    ranks = chunk_drop_ranks(chunk_ids, long([42, 7]), seed=1, step=9)
    alone = chunk_drop_ranks(chunk_ids[1:], long([7]), seed=1, step=9)
    swapped = chunk_drop_ranks(chunk_ids.flip(0), long([7, 42]), seed=1, step=9)
    assert torch.equal(ranks[1:], alone)
    assert torch.equal(ranks, swapped.flip(0))


def test_ranks_change_with_step_seed_and_sample():
    chunk_ids = torch.arange(20)[None, :]
    base = chunk_drop_ranks(chunk_ids, long([3]), seed=1, step=1)
    assert torch.equal(base, chunk_drop_ranks(chunk_ids, long([3]), seed=1, step=1))
    assert not torch.equal(base, chunk_drop_ranks(chunk_ids, long([3]), seed=1, step=2))
    assert not torch.equal(base, chunk_drop_ranks(chunk_ids, long([3]), seed=2, step=1))
    assert not torch.equal(base, chunk_drop_ranks(chunk_ids, long([4]), seed=1, step=1))


def test_chunk_numbering_must_have_no_gaps():
    assert chunk_counts(long([[0, 1, -1, -2], [-1, -1, -2, -2]])).tolist() == [2, 0]
    with pytest.raises(ValueError, match="gaps"):
        chunk_counts(long([[0, 2, -1]]))


# ----------------------------------------------------------------------------------------------
# crop views


@pytest.mark.parametrize("seed", range(4))
def test_views_are_nested_and_never_lose_protected_or_labelled_tokens(seed):
    batch = random_batch(seed)
    tokens, labels, chunk_ids, _ = batch
    views = views_of(batch)
    for row in range(tokens.shape[0]):
        protected = set((chunk_ids[row] == -1).nonzero().flatten().tolist())
        labelled = set((labels[row] != X).nonzero().flatten().tolist())
        previous = set((chunk_ids[row] != -2).nonzero().flatten().tolist())
        for view in views:
            kept = kept_positions(view, row)
            assert protected <= kept and labelled <= kept
            assert kept <= previous  # each level drops a superset of the previous level's chunks
            previous = kept


@pytest.mark.parametrize("seed", range(4))
def test_views_keep_tokens_and_labels_aligned_in_order(seed):
    batch = random_batch(seed)
    tokens, labels, chunk_ids, _ = batch
    for view in views_of(batch):
        for row in range(tokens.shape[0]):
            length = int(view.lengths[row])
            keys = view.token_keys[row, :length]
            assert (keys[1:] > keys[:-1]).all()  # original order, positions renumbered 0..len-1
            assert torch.equal(view.tokens[row, :length], tokens[row, keys])
            assert torch.equal(view.labels[row, :length], labels[row, keys])
            assert (view.tokens[row, length:] == PAD).all()
            assert (view.labels[row, length:] == X).all()
            assert (view.token_keys[row, length:] == -1).all()
        assert view.tokens.shape[1] == int(view.lengths.max())


@pytest.mark.parametrize("seed", range(4))
def test_lengths_shrink_by_exactly_the_dropped_chunks(seed):
    batch = random_batch(seed)
    tokens, labels, chunk_ids, sample_ids = batch
    ranks = chunk_drop_ranks(chunk_ids, sample_ids, seed=11, step=5)
    counts = nested_drop_counts(chunk_counts(chunk_ids), 4, 0.3)
    full_lengths = (chunk_ids != -2).sum(1)
    for view in views_of(batch):
        assert torch.equal(view.dropped_chunks, counts[:, view.level])
        dropped = ((ranks >= 0) & (ranks < view.dropped_chunks[:, None])).sum(1)
        assert torch.equal(view.lengths, full_lengths - dropped)
        for row in range(tokens.shape[0]):
            dropped_here = (ranks[row] >= 0) & (ranks[row] < counts[row, view.level])
            assert len(set(chunk_ids[row][dropped_here].tolist())) == int(view.dropped_chunks[row])


def test_level_zero_is_the_batch_without_padding():
    batch = random_batch(1)
    tokens, labels, chunk_ids, _ = batch
    (view,) = views_of(batch, levels=[0])
    assert torch.equal(view.tokens, tokens) and torch.equal(view.labels, labels)
    assert torch.equal(view.lengths, (chunk_ids != -2).sum(1))
    assert not view.exhausted.any() and (view.dropped_chunks == 0).all()


def test_sample_without_chunks_is_exhausted_and_unchanged():
    batch = random_batch(2)
    tokens, labels, _, _ = batch
    views = views_of(batch)
    row = tokens.shape[0] - 1  # nothing droppable
    for view in views[1:]:
        assert bool(view.exhausted[row])
        length = int(view.lengths[row])
        assert torch.equal(view.tokens[row, :length], views[0].tokens[row, :length])
        assert torch.equal(view.labels[row, :length], views[0].labels[row, :length])
        assert int(view.dropped_chunks[row]) == 0


def test_exhausted_marks_levels_that_repeat_the_previous_one():
    tokens = long([[1, 2, 3, 4, 5, 6]])
    labels = long([[X, X, X, X, X, 6]])
    chunk_ids = long([[-1, 0, 0, 1, 1, -1]])
    views = crop_views(tokens, labels, chunk_ids, long([0]), [0, 1, 2, 3], rate=0.5, seed=0,
                       step=0, pad_id=PAD)
    assert [int(v.dropped_chunks[0]) for v in views] == [0, 1, 2, 2]
    assert [bool(v.exhausted[0]) for v in views] == [False, False, False, True]
    assert views[2].tokens.tolist() == [[1, 5, 6]]  # 5 predicts the label: kept, chunk or not
    assert torch.equal(views[3].tokens, views[2].tokens)


def test_views_commute_with_row_permutation():
    batch = random_batch(3)
    perm = torch.randperm(batch[0].shape[0], generator=torch.Generator().manual_seed(0))
    permuted = tuple(t[perm] for t in batch)
    for view, view_p in zip(views_of(batch), views_of(permuted)):
        width = view.tokens.shape[1]
        assert view_p.tokens.shape[1] == width
        for name in ("tokens", "labels", "token_keys", "lengths", "dropped_chunks", "exhausted"):
            assert torch.equal(getattr(view, name)[perm], getattr(view_p, name)), name


def test_different_step_drops_different_chunks():
    tokens = torch.arange(2, 42)[None, :]
    labels = torch.full_like(tokens, X)
    labels[0, -1] = tokens[0, -1]
    chunk_ids = torch.cat([torch.arange(38), long([-1, -1])])[None, :]
    kept = [
        crop_views(tokens, labels, chunk_ids, long([5]), [1], rate=0.5, seed=1, step=step,
                   pad_id=PAD)[0].token_keys
        for step in (1, 2)
    ]
    assert kept[0].shape == kept[1].shape and not torch.equal(kept[0], kept[1])


def test_levels_come_back_in_the_order_asked():
    batch = random_batch(0)
    views = views_of(batch, levels=[2, 0, 1])
    assert [v.level for v in views] == [2, 0, 1]
    assert torch.equal(views[0].token_keys, views_of(batch, levels=[2])[0].token_keys)
    assert views_of(batch, levels=[]) == []


def test_crop_views_reject_bad_inputs():
    tokens, labels, chunk_ids, sample_ids = random_batch(0)
    bad = chunk_ids.clone()
    labelled = (labels != X).nonzero()[0]
    bad[labelled[0], labelled[1]] = 0
    with pytest.raises(ValueError, match="labelled"):
        crop_views(tokens, labels, bad, sample_ids, [1], rate=0.5, seed=0, step=0, pad_id=PAD)
    with pytest.raises(ValueError, match="crop level"):
        crop_views(tokens, labels, chunk_ids, sample_ids, [-1], rate=0.5, seed=0, step=0,
                   pad_id=PAD)
    with pytest.raises(ValueError, match="rate"):
        crop_views(tokens, labels, chunk_ids, sample_ids, [1], rate=1.5, seed=0, step=0, pad_id=PAD)
    with pytest.raises(ValueError, match="one shape"):
        crop_views(tokens, labels[:, 1:], chunk_ids, sample_ids, [1], rate=0.5, seed=0, step=0,
                   pad_id=PAD)


def scored_targets(labels):
    """Targets a pass scores, per row: positions i whose shifted label (label i+1) is kept."""
    return (labels[:, 1:] != X).sum(1)


def test_every_view_scores_exactly_the_targets_of_the_full_view():
    """Regression: with no BOS and nothing protected before the answer, a crop that dropped all
    the context put the first answer token at position 0, where nothing predicts it. The token
    before each labelled token is kept whatever chunk_ids say (they may come from any dataset)."""
    # row 0: context in 3 chunks, then the answer; row 1: two turns, chunks right before each
    tokens = long([[11, 12, 13, 14, 15, 16, 17, 18, 0, 0],
                   [21, 22, 23, 24, 25, 26, 27, 28, 29, 30]])
    labels = long([[X, X, X, X, X, X, 17, 18, X, X],
                   [X, X, X, 24, 25, X, X, X, 29, 30]])
    chunk_ids = long([[0, 0, 1, 1, 2, 2, -1, -1, -2, -2],
                      [0, 0, 1, -1, -1, 2, 2, 3, -1, -1]])
    views = crop_views(tokens, labels, chunk_ids, long([0, 1]), [0, 1, 2, 3, 4], rate=0.5,
                       seed=0, step=0, pad_id=PAD)
    assert scored_targets(labels).tolist() == [2, 4]
    for view in views:
        assert scored_targets(view.labels).tolist() == [2, 4], view.level
    last = views[-1]
    assert last.dropped_chunks.tolist() == [3, 4]  # every chunk dropped
    assert last.tokens[0, : last.lengths[0]].tolist() == [16, 17, 18]
    assert last.tokens[1, : last.lengths[1]].tolist() == [23, 24, 25, 28, 29, 30]


@pytest.mark.parametrize("seed", range(4))
def test_random_views_score_the_targets_of_the_full_view(seed):
    batch = random_batch(seed)
    for view in views_of(batch):
        assert torch.equal(scored_targets(view.labels), scored_targets(batch[1]))
