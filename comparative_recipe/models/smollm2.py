"""SmolLM2 decoders built from torchtune's public modules.

SmolLM2 is a Llama-architecture decoder with grouped-query attention, tied input/output
embeddings and *plain* rotary embeddings (base 100000, no Llama-3 frequency scaling). torchtune's
`llama3_2` component builder always applies `Llama3ScaledRoPE`, so the decoder is assembled here
from `MultiHeadAttention`, `RotaryPositionalEmbeddings`, `FeedForward`, `RMSNorm` and `TiedLinear`.

A config uses it as

    model:
      _component_: comparative_recipe.models.smollm2.smollm2_135m

and loads an HF-format checkpoint (e.g. one written by `comparative_recipe.models.gguf`) through
`torchtune.training.FullModelHFCheckpointer` with `model_type: LLAMA3_2`.
"""

from typing import Optional

from torch import nn
from torchtune.modules import (
    FeedForward,
    MultiHeadAttention,
    RMSNorm,
    RotaryPositionalEmbeddings,
    TiedLinear,
    TransformerDecoder,
    TransformerSelfAttentionLayer,
)

__all__ = ["smollm2", "smollm2_135m"]


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
    """
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
            q_proj=nn.Linear(embed_dim, num_heads * head_dim, bias=False),
            k_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=False),
            v_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=False),
            output_proj=nn.Linear(num_heads * head_dim, embed_dim, bias=False),
            pos_embeddings=rope,
            max_seq_len=max_seq_len,
            attn_dropout=attn_dropout,
        )
        layers.append(
            TransformerSelfAttentionLayer(
                attn=attn,
                mlp=FeedForward(
                    gate_proj=nn.Linear(embed_dim, intermediate_dim, bias=False),
                    down_proj=nn.Linear(intermediate_dim, embed_dim, bias=False),
                    up_proj=nn.Linear(embed_dim, intermediate_dim, bias=False),
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


def smollm2_135m(max_seq_len: int = 8192, attn_dropout: float = 0.0) -> TransformerDecoder:
    """SmolLM2-135M (base or Instruct): 30 layers, width 576, 9 query / 3 kv heads of 64,
    MLP 1536, vocabulary 49152, tied embeddings, RoPE base 100000, RMSNorm eps 1e-5."""
    return smollm2(
        vocab_size=49152,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        embed_dim=576,
        intermediate_dim=1536,
        max_seq_len=max_seq_len,
        head_dim=64,
        rope_base=100_000.0,
        norm_eps=1e-5,
        attn_dropout=attn_dropout,
        tie_word_embeddings=True,
    )
