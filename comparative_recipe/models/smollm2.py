"""SmolLM2 decoders built from torchtune's public modules.

SmolLM2 is a Llama-architecture decoder with grouped-query attention, tied input/output
embeddings and *plain* rotary embeddings (base 100000, no Llama-3 frequency scaling). torchtune's
`llama3_2` component builder always applies `Llama3ScaledRoPE`, so the decoder is assembled here
from `MultiHeadAttention`, `RotaryPositionalEmbeddings`, `FeedForward`, `RMSNorm` and `TiedLinear`.

A config uses it as

    model:
      _component_: comparative_recipe.models.smollm2.smollm2_135m

and loads an HF-format checkpoint (e.g. one written by `comparative_recipe.models.gguf`) through
`torchtune.training.FullModelHFCheckpointer` with `model_type: LLAMA3_2`. Its tokenizer is
`smollm2_tokenizer` (the checkpoint's `tokenizer.json`, ChatML messages).
"""

from functools import partial
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from tokenizers import Tokenizer
from torch import nn
from torchtune.data import Message, PromptTemplate, PromptTemplateInterface, truncate
from torchtune.modules.low_precision import FrozenNF4Linear
from torchtune.modules.common_utils import reparametrize_as_dtype_state_dict_post_hook
from torchtune.modules.peft import LoRALinear
from torchtune.modules.transforms.tokenizers import BaseTokenizer, ModelTokenizer

from comparative_recipe._torchtune_compat import component
from torchtune.modules import (
    FeedForward,
    MultiHeadAttention,
    RMSNorm,
    RotaryPositionalEmbeddings,
    TiedLinear,
    TransformerDecoder,
    TransformerSelfAttentionLayer,
)

__all__ = ["SmolLM2Tokenizer", "lora_smollm2", "lora_smollm2_135m", "smollm2", "smollm2_135m",
           "smollm2_tokenizer"]


def smollm2(
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int = 8192,
    head_dim: Optional[int] = None,
    rope_base: float = 100_000.0,
    norm_eps: float = 1e-5,
    attn_dropout: float = 0.0,
    tie_word_embeddings: bool = True,
    linear: Optional[Callable[[str, int, int], nn.Module]] = None,
) -> TransformerDecoder:
    """A Llama-architecture decoder with unscaled RoPE (the SmolLM2 family's layout).

    Args:
        vocab_size: number of tokens.
        num_layers: number of transformer layers.
        num_heads: number of query heads.
        num_kv_heads: number of key/value heads (must divide `num_heads`).
        embed_dim: model width.
        intermediate_dim: MLP hidden width (SwiGLU: gate and up projections of this width).
        max_seq_len: longest sequence (sizes the RoPE cache).
        head_dim: per-head width; `embed_dim // num_heads` when None.
        rope_base: RoPE base (theta).
        norm_eps: RMSNorm epsilon.
        attn_dropout: attention dropout.
        tie_word_embeddings: share the output projection with the token embedding.
        linear: builds each attention and MLP linear from its torchtune name (``q_proj``, ...,
            ``w1``, ``w2``, ``w3``) and (in, out) features; plain ``nn.Linear`` when None
            (``lora_smollm2`` gives LoRA linears).
    """
    if linear is None:
        def linear(name: str, in_dim: int, out_dim: int) -> nn.Module:
            return nn.Linear(in_dim, out_dim, bias=False)

    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    head_dim = head_dim if head_dim is not None else embed_dim // num_heads
    rope = RotaryPositionalEmbeddings(dim=head_dim, max_seq_len=max_seq_len, base=rope_base)

    layers = nn.ModuleList()
    for _ in range(num_layers):
        attn = MultiHeadAttention(
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            q_proj=linear("q_proj", embed_dim, num_heads * head_dim),
            k_proj=linear("k_proj", embed_dim, num_kv_heads * head_dim),
            v_proj=linear("v_proj", embed_dim, num_kv_heads * head_dim),
            output_proj=linear("output_proj", num_heads * head_dim, embed_dim),
            pos_embeddings=rope,
            max_seq_len=max_seq_len,
            attn_dropout=attn_dropout,
        )
        layers.append(
            TransformerSelfAttentionLayer(
                attn=attn,
                mlp=FeedForward(
                    gate_proj=linear("w1", embed_dim, intermediate_dim),
                    down_proj=linear("w2", intermediate_dim, embed_dim),
                    up_proj=linear("w3", embed_dim, intermediate_dim),
                ),
                sa_norm=RMSNorm(dim=embed_dim, eps=norm_eps),
                mlp_norm=RMSNorm(dim=embed_dim, eps=norm_eps),
            )
        )

    tok_embeddings = nn.Embedding(vocab_size, embed_dim)
    if tie_word_embeddings:
        output = TiedLinear(tok_embeddings)
    else:
        output = nn.Linear(embed_dim, vocab_size, bias=False)
    return TransformerDecoder(
        tok_embeddings=tok_embeddings,
        layers=layers,
        max_seq_len=max_seq_len,
        num_heads=num_heads,
        head_dim=head_dim,
        norm=RMSNorm(embed_dim, eps=norm_eps),
        output=output,
    )


_SMOLLM2_135M = dict(vocab_size=49152, num_layers=30, num_heads=9, num_kv_heads=3,
                     embed_dim=576, intermediate_dim=1536, head_dim=64, rope_base=100_000.0,
                     norm_eps=1e-5, tie_word_embeddings=True)


def smollm2_135m(max_seq_len: int = 8192, attn_dropout: float = 0.0) -> TransformerDecoder:
    """SmolLM2-135M (base or Instruct): 30 layers, width 576, 9 query / 3 kv heads of 64,
    MLP 1536, vocabulary 49152, tied embeddings, RoPE base 100000, RMSNorm eps 1e-5."""
    return smollm2(**_SMOLLM2_135M, max_seq_len=max_seq_len, attn_dropout=attn_dropout)


def lora_smollm2(
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    quantize_base: bool = False,
    **smollm2_kwargs: Any,
) -> TransformerDecoder:
    """``smollm2`` with torchtune LoRA linears (the arguments of torchtune's ``lora_*``
    builders; no ``apply_lora_to_output``: the output projection is the tied embedding).
    ``quantize_base``: the attention and MLP base weights in NF4 (QLoRA), which needs each
    weight's element count to be a multiple of 16384 (torchao's blocks)."""
    adapted = set(lora_attn_modules) | ({"w1", "w2", "w3"} if apply_lora_to_mlp else set())

    def linear(name: str, in_dim: int, out_dim: int) -> nn.Module:
        if name in adapted:
            return LoRALinear(in_dim, out_dim, rank=lora_rank, alpha=lora_alpha,
                              dropout=lora_dropout, quantize_base=quantize_base)
        if quantize_base:
            return FrozenNF4Linear(in_dim, out_dim, bias=False)
        return nn.Linear(in_dim, out_dim, bias=False)

    model = smollm2(**smollm2_kwargs, linear=linear)
    if quantize_base:  # state dicts hold bf16 weights, as torchtune's QLoRA builders give them
        model._register_state_dict_hook(
            partial(reparametrize_as_dtype_state_dict_post_hook, offload_to_cpu=True)
        )
    return model


def lora_smollm2_135m(
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    max_seq_len: int = 8192,
    attn_dropout: float = 0.0,
) -> TransformerDecoder:
    """SmolLM2-135M (``smollm2_135m``) with LoRA adapters. There is no QLoRA variant: its
    576-wide projections (331,776 weights) are not a multiple of NF4's 16384-weight blocks."""
    return lora_smollm2(
        lora_attn_modules, apply_lora_to_mlp=apply_lora_to_mlp, lora_rank=lora_rank,
        lora_alpha=lora_alpha, lora_dropout=lora_dropout, **_SMOLLM2_135M,
        max_seq_len=max_seq_len, attn_dropout=attn_dropout,
    )


IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
# What SmolLM2-Instruct's chat template inserts when a conversation has no system message.
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


class SmolLM2Tokenizer(ModelTokenizer, BaseTokenizer):
    """SmolLM2's byte-level BPE (from its HF `tokenizer.json`) with ChatML messages.

    A conversation is laid out as SmolLM2-Instruct's chat template renders it: every message
    ``<|im_start|>{role}\n{content}<|im_end|>\n``, a default system message first when there is
    none, and the final assistant message ending in ``eos_id`` (``<|im_end|>``) instead. SmolLM2
    adds no BOS token: ``bos_id`` is None and ``encode(add_bos=True)`` adds nothing, as torchtune's
    Qwen2 tokenizer does; ``pad_id`` is ``<|endoftext|>``.

    Args:
        path: the model's `tokenizer.json`.
        max_seq_len: truncate ``tokenize_messages`` output to this many tokens (None: no limit).
        prompt_template: a torchtune prompt template applied to the messages first.
        system_prompt: the system message used when a conversation has none (None: no default).
    """

    def __init__(self, path: str, max_seq_len: Optional[int] = None,
                 prompt_template: Optional[PromptTemplateInterface] = None,
                 system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT) -> None:
        self.tokenizer = Tokenizer.from_file(str(path))
        ids = {name: self.tokenizer.token_to_id(name) for name in (IM_START, IM_END, ENDOFTEXT)}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise ValueError(
                f"{path} has no token(s) {missing}: it is not a SmolLM2 tokenizer.json (use the "
                "tokenizer of the model's checkpoint, e.g. the one `python -m "
                "comparative_recipe.models.gguf` writes)"
            )
        self.im_start_id, self.im_end_id = ids[IM_START], ids[IM_END]
        self.bos_id: Optional[int] = None
        self.eos_id, self.pad_id = ids[IM_END], ids[ENDOFTEXT]
        self.stop_tokens = [self.im_end_id, self.pad_id]
        self.special_tokens: Dict[str, int] = {
            t.content: i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special
        }
        self.max_seq_len = max_seq_len
        self.prompt_template = prompt_template
        self.system_prompt = system_prompt
        self._newline = self.encode("\n", add_bos=False, add_eos=False)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> List[int]:
        """Token ids of ``text`` (special-token strings in it become their ids); ``add_eos``
        appends ``<|im_end|>``, ``add_bos`` adds nothing (SmolLM2 has no BOS)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ids + [self.eos_id] if add_eos else ids

    def decode(self, token_ids: List[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def tokenize_messages(self, messages: List[Message], *, add_eos: bool = True
                          ) -> Tuple[List[int], List[bool]]:
        """ChatML ids of ``messages`` and their masks (True: not trained on, ``message.masked``).

        With ``add_eos`` the last assistant message ends with ``<|im_end|>`` (the eos), as in
        training; without, an empty last assistant message leaves ``<|im_start|>assistant\n``,
        the generation prompt.
        """
        if self.prompt_template is not None:
            messages = self.prompt_template(messages)
        if self.system_prompt is not None and (not messages or messages[0].role != "system"):
            messages = [Message(role="system", content=self.system_prompt, masked=True), *messages]
        tokens: List[int] = []
        mask: List[bool] = []
        for index, message in enumerate(messages):
            ids = [self.im_start_id, *self.encode(f"{message.role}\n", add_bos=False, add_eos=False)]
            for item in message.content:
                if item["type"] != "text":
                    raise ValueError(
                        f"SmolLM2 is a text model: message {index} has {item['type']!r} content"
                    )
                ids += self.encode(item["content"], add_bos=False, add_eos=False)
            last_assistant = message.role == "assistant" and index == len(messages) - 1
            if last_assistant:
                ids += [self.eos_id] if add_eos else []
            else:
                ids += [self.im_end_id, *self._newline]
            tokens += ids
            mask += [message.masked] * len(ids)
        if self.max_seq_len is not None and len(tokens) > self.max_seq_len:
            tokens = truncate(tokens, self.max_seq_len, self.eos_id if add_eos else None)
            mask = truncate(mask, self.max_seq_len, True if add_eos else None)
        return tokens, mask

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> Mapping[str, Any]:
        """torchtune's model transform: ``messages`` -> ``tokens`` and ``mask``."""
        sample = dict(sample)
        tokens, mask = self.tokenize_messages(sample.pop("messages"), add_eos=not inference)
        sample["tokens"], sample["mask"] = tokens, mask
        return sample


def smollm2_tokenizer(path: str, max_seq_len: Optional[int] = None,
                      prompt_template: Any = None,
                      system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT) -> SmolLM2Tokenizer:
    """The SmolLM2 tokenizer component (``tokenizer._component_`` of a config); see
    ``SmolLM2Tokenizer``. ``path`` is the checkpoint's `tokenizer.json`; ``prompt_template`` is,
    as in torchtune's builders, the dotted path of a template class or a dict from role to
    (prepend, append) tags."""
    if isinstance(prompt_template, str):
        prompt_template = component(prompt_template)()
    elif isinstance(prompt_template, Mapping):
        prompt_template = PromptTemplate({role: tuple(tags) for role, tags in prompt_template.items()})
    return SmolLM2Tokenizer(path, max_seq_len=max_seq_len, prompt_template=prompt_template,
                            system_prompt=system_prompt)
