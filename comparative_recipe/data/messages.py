"""Chat and instruction data in torchtune's message format, chunked for input crops.

torchtune's message builders (``chat_dataset`` with ``conversation_style`` openai / sharegpt,
``instruct_dataset``, ``alpaca_dataset``, ... all ``SFTDataset``) give tokens and labels only:
nothing tells a chunker where a message's content ends and the chat format's role header
("<|im_start|>user\\n", "[INST]", ...) begins, and a header written as plain text would be
droppable. ``MessageSpansTokenizer`` is the model transform that tells it: the builder gets it as
its tokenizer, tokenizes exactly as the tokenizer does, and adds ``protected_spans`` that cover
every token except the content of the chunked roles' messages (system and user by default).
``comparative_dataset`` hands it to any builder:

.. code-block:: yaml

    dataset:
      _component_: comparative_recipe.data.comparative_dataset
      builder: torchtune.datasets.chat_dataset
      source: json
      data_files: data/chats.jsonl
      conversation_column: messages
      conversation_style: openai        # or sharegpt ({from, value}, column conversations)
      split: train
      chunking: {mode: paragraph}       # one chunk per line / paragraph of each user turn

How a message's content is found, for any tokenizer that implements ``tokenize_messages``: the
conversation is tokenized (without ``max_seq_len``), then again with that message's text
removed; the tokens before the first difference (common prefix) and after the last (common
suffix) are the header, the footer and the other messages, the rest is the content. Prompt
templates and special tokens therefore stay outside the content. This costs one extra
tokenization of the conversation per chunked message, in the data loader.
"""

import copy
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from torchtune.data import Message
from torchtune.utils import get_logger

log = get_logger("INFO")

#: roles whose content is droppable by default
CHUNK_ROLES = ("system", "user")
#: torchtune's message roles (``torchtune.data.Role``)
ROLES = ("system", "user", "assistant", "ipython", "tool")


def check_roles(roles: Any, name: str = "chunk_roles") -> Tuple[str, ...]:
    """``roles`` as a tuple of torchtune role names; ValueError naming the valid ones."""
    if isinstance(roles, str) or not isinstance(roles, Sequence):
        raise ValueError(f"{name} must be a list of roles out of {list(ROLES)}, got {roles!r}")
    roles = tuple(roles)
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise ValueError(f"{name} has unknown roles {unknown}; torchtune's roles are {list(ROLES)}")
    return roles


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _common_suffix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = 0
    while n < limit and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return n


def _without_text(message: Message) -> Message:
    """The message with each text item reduced to its trailing spaces (kept: a tokenizer may
    read the next message differently after a space)."""
    content = [
        dict(item, content=item["content"][len(item["content"].rstrip(" ")) :])
        if item.get("type") == "text"
        else item
        for item in message.content
    ]
    return Message(
        role=message.role,
        content=content,
        masked=message.masked,
        ipython=message.ipython,
        eot=message.eot,
    )


def _has_text(message: Message) -> bool:
    return any(item.get("type") == "text" and item["content"] for item in message.content)


def message_content_spans(
    tokenizer: Any,
    messages: Sequence[Message],
    tokens: Sequence[int],
    roles: Sequence[str] = CHUNK_ROLES,
) -> Optional[List[Tuple[int, int]]]:
    """Token spans (start, end exclusive) of the content of each message whose role is in
    ``roles``, within ``tokens`` (what ``tokenizer.tokenize_messages(messages)`` gave, possibly
    truncated at ``max_seq_len``). See the module docstring for how they are found.

    ``tokenizer`` should not truncate (``max_seq_len`` None). Returns None when the tokenizer
    has no ``tokenize_messages`` or its output is not ``tokens`` (the dataset's model transform
    is not this tokenizer).
    """
    if not hasattr(tokenizer, "tokenize_messages"):
        return None
    full = [int(t) for t in tokenizer.tokenize_messages(list(messages))[0]]
    tokens = [int(t) for t in tokens]
    n = len(tokens)
    # truncation keeps the first n tokens, the last one possibly replaced by eos
    if not (full == tokens or (0 < n < len(full) and full[: n - 1] == tokens[: n - 1])):
        return None
    spans = []
    for j, message in enumerate(messages):
        if message.role not in roles or not _has_text(message):
            continue
        emptied = [*messages[:j], _without_text(message), *messages[j + 1 :]]
        other = [int(t) for t in tokenizer.tokenize_messages(emptied)[0]]
        start = _common_prefix(full, other)
        end = len(full) - _common_suffix(full, other, len(other) - start)
        end = min(end, n)
        if start < end:
            spans.append((start, end))
    return spans


def _complement(spans: Sequence[Tuple[int, int]], length: int) -> List[Tuple[int, int]]:
    out, previous = [], 0
    for start, end in [*sorted(spans), (length, length)]:
        if start > previous:
            out.append((previous, start))
        previous = max(previous, end)
    return out


class MessageSpansTokenizer:
    """A torchtune model tokenizer, as the model transform of a message dataset, that marks
    which tokens input crops may drop.

    ``MessageSpansTokenizer(tokenizer)(sample)`` returns ``tokenizer(sample)`` (the same
    ``tokens`` and ``mask``) plus ``protected_spans``: every token outside the content of the
    messages whose role is in ``roles``, i.e. role headers, prompt templates, special tokens,
    and the other roles' messages (the assistant's answers are labelled, hence protected
    anyway). ``ComparativeDataset`` honours ``protected_spans`` in every chunking mode, and a
    chunk never spans two messages. Every other attribute (``encode``, ``decode``,
    ``max_seq_len``, ``bos_id``, ...) is the tokenizer's, so the builder uses it as it would the
    tokenizer.

    A sample whose tokens ``tokenize_messages`` does not reproduce (a model transform that is
    not a plain tokenizer) gets no ``protected_spans`` (a warning is logged once): only the
    usual protections (labels, special tokens) apply to it.

    Args:
        tokenizer (Any): the model tokenizer (``tokenize_messages``, ``__call__``).
        roles (Sequence[str]): roles whose content is droppable. Default system and user.
    """

    def __init__(self, tokenizer: Any, roles: Sequence[str] = CHUNK_ROLES) -> None:
        if isinstance(tokenizer, MessageSpansTokenizer):
            tokenizer = tokenizer.tokenizer
        self.tokenizer = tokenizer
        self.roles = check_roles(roles)
        self._warned = False
        # the same tokenizer without truncation: content spans past max_seq_len are found too
        self._untruncated = tokenizer
        if getattr(tokenizer, "max_seq_len", None) is not None:
            try:
                self._untruncated = copy.copy(tokenizer)
                self._untruncated.max_seq_len = None
            except Exception:  # a tokenizer that cannot be copied: truncated spans are clipped
                self._untruncated = tokenizer

    def __getattr__(self, name: str) -> Any:
        # only called for attributes not found normally; guard against recursion while unpickling
        if name == "tokenizer" or "tokenizer" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["tokenizer"], name)

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> Dict[str, Any]:
        messages = list(sample.get("messages") or [])  # the tokenizer pops them
        out = self.tokenizer(sample, inference=True) if inference else self.tokenizer(sample)
        if not messages or "tokens" not in out:
            return out
        spans = message_content_spans(self._untruncated, messages, out["tokens"], self.roles)
        if spans is None:
            if not self._warned:
                log.warning(
                    f"{type(self.tokenizer).__name__}.tokenize_messages does not reproduce the "
                    "dataset's tokens: role headers are not protected from input crops"
                )
                self._warned = True
            return out
        out["protected_spans"] = _complement(spans, len(out["tokens"]))
        return out
