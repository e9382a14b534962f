"""Generative QA validation: greedy answers of every pass, scored by exact match and token F1.

A QA sample's answer is its labelled tokens; the prompt is the tokens before them (their labels
ignored). For each pass of a validation batch (the full model, and with ``passes: all`` every
ablation: its cropped view and its hidden masks), the model generates the answer greedily from
the pass's prompt, up to ``max_new_tokens`` tokens, stopping at a stop token (the tokenizer's
EOS / ``stop_tokens``, plus any configured). The completion and the reference (decoded from the
labels) are compared with ``metrics.qa.exact_match`` and ``token_f1``.

Hidden masks are keyed per sample (``MaskKeys``), so the same sub-network generates every token;
with ``granularity: element`` each generated token gets the token key of its position in the
original sample (the first answer token's original position, then one more per token), as the
labelled answer's tokens have in the loss passes. Crops never remove the answer, so a cropped
view's prompt is the cropped context followed by the question, as in its loss pass.

Generation runs without a KV cache: one forward of the whole (right-padded) batch per new token.
Rows that stopped wait for the others; under several ranks the ranks agree, through one small
all-reduce per token, on when every row has stopped, so that all of them run the same number of
forwards (FSDP's collectives need it).

The sums (``generation_sums``) are plain sums over samples, added over batches and ranks like
every other validation sum: ``gen_samples`` (samples with a reference), and per pass
``exact_match`` and ``token_f1``.
"""

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from comparative_recipe import checks
from comparative_recipe.ablation.hidden import MaskKeys, hidden_ablation_keys
from comparative_recipe.data.tokenizer_utils import special_token_ids
from comparative_recipe.metrics.qa import exact_match, token_f1

GENERATE_KEYS = frozenset({"max_new_tokens", "stop_tokens"})


@dataclass(frozen=True)
class GenerationSettings:
    """The ``validation.generate`` section.

    max_new_tokens: the most tokens generated per answer (default 32).
    stop_tokens: token ids that end an answer, besides the tokenizer's EOS and ``stop_tokens``.
    """

    max_new_tokens: int = 32
    stop_tokens: Tuple[int, ...] = ()

    @classmethod
    def from_config(cls, section: Any) -> Optional["GenerationSettings"]:
        """None for a missing (or null) section; ``{}`` means every default."""
        if section is None:
            return None
        if not hasattr(section, "keys"):
            raise ValueError(
                "validation.generate must be a section such as {max_new_tokens: 32}, got "
                f"{section!r}"
            )
        checks.known_keys(section, GENERATE_KEYS, "validation.generate")
        max_new = checks.positive_int(
            section.get("max_new_tokens", cls.max_new_tokens), "validation.generate.max_new_tokens"
        )
        stop = section.get("stop_tokens", None) or ()
        if isinstance(stop, int):
            stop = (stop,)
        stop = tuple(checks.non_negative_int(t, "validation.generate.stop_tokens") for t in stop)
        return cls(max_new, stop)


def stop_token_ids(tokenizer: Any, extra: Sequence[int] = ()) -> List[int]:
    """The ids that end a generated answer: the tokenizer's ``stop_tokens`` (torchtune's chat
    tokenizers have them) or its EOS, plus ``extra``."""
    ids = set(int(t) for t in extra)
    stop = getattr(tokenizer, "stop_tokens", None)
    if stop:
        ids.update(int(t) for t in stop)
    eos = getattr(tokenizer, "eos_id", None)
    if isinstance(eos, int) and eos >= 0:
        ids.add(eos)
    return sorted(ids)


def _any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any rank (the flag itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return bool(t.item() > 0)


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    tokens: torch.Tensor,
    prompt_lengths: torch.Tensor,
    *,
    max_new_tokens: int,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    active: Optional[torch.Tensor] = None,
    keys: Optional[MaskKeys] = None,
    next_token_keys: Optional[torch.Tensor] = None,
    all_ranks: Callable[[bool, torch.device], bool] = _any_rank,
) -> List[List[int]]:
    """Greedy (argmax) continuations of a right-padded batch of prompts, without a KV cache.

    Args:
        model: a torchtune decoder (``model(tokens) -> [B, S, V]`` logits or a list of chunks).
        tokens: [B, S] prompts, right-padded (anything after a row's prompt is ignored).
        prompt_lengths: [B] tokens of each prompt (>= 1 for active rows).
        max_new_tokens: the most tokens generated per row.
        stop_tokens: ids that end a row; the stop token is not part of the returned completion.
        pad_id: the id written after a row's end (never seen by its own predictions: attention
            is causal and the prompt is right-padded).
        active: [B] bool, rows to generate for (default all); the others return ``[]``.
        keys: the hidden-mask keys of the rows (``sample_ids``, ``powers``, ``step``; its
            ``token_keys`` [B, S] are the prompt tokens' keys, default their positions), made
            current around every forward; None: no hidden ablation.
        next_token_keys: [B] the token key of each row's first generated token (default its
            prompt length); token j of the completion gets ``next_token_keys + j``.
        all_ranks: ``(flag, device) -> bool`` whether a row is still running on any rank: every
            rank keeps running forwards until all rows of all ranks stopped.

    Returns:
        One list of generated ids per row, without the stop token. A row also stops when it
        reaches the model's ``max_seq_len``.
    """
    batch, device = tokens.shape[0], tokens.device
    lengths = prompt_lengths.to(device=device, dtype=torch.long).clone()
    running = torch.ones(batch, dtype=torch.bool, device=device) if active is None else (
        active.to(device=device, dtype=torch.bool).clone())
    width = int(lengths.max()) + max_new_tokens if batch else 0
    buf = tokens.new_full((batch, width), pad_id)
    prompt_width = min(tokens.shape[1], width)
    positions = torch.arange(width, device=device)
    in_prompt = positions[None, :] < lengths[:, None]
    buf[:, :prompt_width] = torch.where(
        in_prompt[:, :prompt_width], tokens[:, :prompt_width], pad_id
    )
    key_buf = None
    if keys is not None:
        first = lengths if next_token_keys is None else next_token_keys.to(device, torch.long)
        generated_keys = first[:, None] + (positions[None, :] - lengths[:, None])
        key_buf = torch.where(in_prompt, positions[None, :], generated_keys)
        if keys.token_keys is not None:
            prompt_keys = keys.token_keys.to(device)[:, :prompt_width]
            key_buf[:, :prompt_width] = torch.where(
                in_prompt[:, :prompt_width], prompt_keys, key_buf[:, :prompt_width]
            )
    limit = getattr(model, "max_seq_len", None)
    if isinstance(limit, int):
        running &= lengths < limit
    stop = torch.tensor(sorted(set(int(t) for t in stop_tokens)), dtype=torch.long, device=device)
    out = tokens.new_full((batch, max_new_tokens), pad_id)
    n_out = torch.zeros(batch, dtype=torch.long, device=device)
    rows = torch.arange(batch, device=device)
    for _ in range(max_new_tokens):
        if not all_ranks(bool(running.any()), device):
            break
        cur = max(int(lengths.max()), 1)
        step_keys = None
        if keys is not None:
            token_keys = torch.where(
                positions[None, :cur] < lengths[:, None], key_buf[:, :cur], -1
            )
            step_keys = MaskKeys(keys.sample_ids, keys.powers, keys.step, token_keys=token_keys)
        with hidden_ablation_keys(step_keys):
            logits = model(buf[:, :cur])
        if isinstance(logits, (list, tuple)):
            logits = torch.cat(list(logits), dim=1)
        nxt = logits[rows, (lengths - 1).clamp(min=0)].argmax(dim=-1)
        is_stop = torch.isin(nxt, stop) if stop.numel() else torch.zeros_like(running)
        emit = running & ~is_stop
        out[rows, n_out.clamp(max=max_new_tokens - 1)] = torch.where(
            emit, nxt, out[rows, n_out.clamp(max=max_new_tokens - 1)]
        )
        n_out += emit
        write_at = lengths.clamp(max=width - 1)
        buf[rows, write_at] = torch.where(emit, nxt, buf[rows, write_at])
        lengths += emit
        running = emit
        if isinstance(limit, int):
            running &= lengths < limit
    n_out = n_out.tolist()
    return [out[b, : n_out[b]].tolist() for b in range(batch)]


def qa_prompts(tokens: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, List[List[int]]]:
    """Where each row's answer starts, from a pass's tokens and shifted labels.

    The answer is the first contiguous run of labelled tokens; the prompt is every token before
    it. ``targets[b, i]`` is the label of token ``i + 1`` (``tasks.shift_labels``).

    Returns:
        (prompt_lengths [B], has_answer [B] bool, references: the answer's token ids per row,
        ``[]`` where the row has none).
    """
    scored = targets != CROSS_ENTROPY_IGNORE_IDX
    has = scored.any(dim=1)
    first = scored.int().argmax(dim=1)  # first scored target position (0 where none)
    prompt_lengths = torch.where(has, first + 1, (tokens.shape[1] * torch.ones_like(first)))
    references = []
    scored_host, first_host, has_host = scored.tolist(), first.tolist(), has.tolist()
    tokens_host = tokens.tolist()
    for b in range(tokens.shape[0]):
        if not has_host[b]:
            references.append([])
            continue
        i, run = first_host[b], []
        while i < len(scored_host[b]) and scored_host[b][i]:
            run.append(tokens_host[b][i + 1])
            i += 1
        references.append(run)
    return prompt_lengths, has, references


class AnswerDecoder:
    """Token ids -> answer text with a tokenizer: special tokens (bos, eos, pad, stop tokens,
    ``special_tokens``) are dropped before decoding."""

    def __init__(self, tokenizer: Any, stop_tokens: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.special = frozenset(special_token_ids(tokenizer)) | frozenset(stop_tokens)

    def __call__(self, ids: Sequence[int]) -> str:
        kept = [int(t) for t in ids if int(t) not in self.special]
        return self.tokenizer.decode(kept) if kept else ""


def generation_sums(
    model: nn.Module,
    passes: Sequence[Any],
    settings: GenerationSettings,
    decoder: AnswerDecoder,
    stop_tokens: Sequence[int],
    pad_id: int,
) -> Dict[str, torch.Tensor]:
    """Greedy answers of every pass scored against the references: the named sums.

    ``passes``: ``passes.PassInput`` of one batch (pass 0 the full model). Returns
    ``gen_samples`` (0-d: rows with a reference), ``exact_match`` and ``token_f1`` ([1+c] sums
    over those rows).
    """
    device = passes[0].tokens.device
    em = torch.zeros(len(passes), dtype=torch.float64, device=device)
    f1 = torch.zeros_like(em)
    n_samples = torch.zeros((), dtype=torch.float64, device=device)
    for k, p in enumerate(passes):
        lengths, has, refs = qa_prompts(p.tokens, p.targets)
        rows = torch.arange(p.tokens.shape[0], device=device)
        answer_start = lengths.clamp(max=p.tokens.shape[1] - 1)
        keys = next_keys = None
        if p.keys.active:  # an ablated pass: its rows' hidden masks on every forward
            keys = p.keys
            if p.keys.token_keys is not None:
                next_keys = p.keys.token_keys[rows, answer_start]
        completions = greedy_generate(
            model, p.tokens, lengths, max_new_tokens=settings.max_new_tokens,
            stop_tokens=stop_tokens, pad_id=pad_id, active=has, keys=keys,
            next_token_keys=next_keys,
        )
        em_k = f1_k = 0.0
        for b, ok in enumerate(has.tolist()):
            if not ok:
                continue
            prediction, reference = decoder(completions[b]), decoder(refs[b])
            em_k += exact_match(prediction, reference)
            f1_k += token_f1(prediction, reference)
        em[k], f1[k] = em_k, f1_k
        if k == 0:
            n_samples += float(has.sum())
    return {"gen_samples": n_samples, "exact_match": em, "token_f1": f1}


def generation_metrics(sums: Dict[str, Any]) -> Dict[str, float]:
    """``exact_match_k`` and ``f1_k`` (means over the samples with a reference) from the host
    sums of ``generation_sums`` (added over batches and ranks); nothing without them."""
    if "gen_samples" not in sums:
        return {}
    n = max(float(sums["gen_samples"]), 1.0)
    out = {}
    for k, (em, f1) in enumerate(zip(sums["exact_match"], sums["token_f1"])):
        out[f"exact_match_{k}"] = em / n
        out[f"f1_{k}"] = f1 / n
    return out
