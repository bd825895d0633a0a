"""FLOP estimate of a prompt's pass through the decoder layers (prefill), for "how much compute did a reduction save".

Counted per decoder layer over the n tokens that layer computes on (2 FLOPs per multiply-add):
query and output projections 2·n·d·(h·e) each, key and value projections 2·n·d·(g·e) each
(d hidden size, h heads, g key/value heads, e head size), the gated MLP 3·2·n·d·f (f intermediate
size), and attention 2·2·n²·h·e (scores and weighted sum over the full n x n square, as dense kernels
compute it). Norms, rotary embeddings, softmax, the vision tower and the LM head are left out: they
do not change with the number of image tokens the layers see (the tower), or are small.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderShape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_text_config(cls, config) -> "DecoderShape":
        """From a Llama-style text config (e.g. `LlavaConfig.text_config`)."""
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.hidden_size, config.intermediate_size, heads, getattr(config, "num_key_value_heads", None) or heads, head_dim)


def layer_flops(shape: DecoderShape, tokens: int) -> float:
    """FLOPs of one decoder layer over `tokens` tokens (see the module docstring)."""
    n, d = tokens, shape.hidden
    projections = 2 * n * d * (2 * shape.heads * shape.head_dim + 2 * shape.kv_heads * shape.head_dim)
    mlp = 3 * 2 * n * d * shape.intermediate
    attention = 2 * 2 * n * n * shape.heads * shape.head_dim
    return float(projections + mlp + attention)


def prefill_flops(shape: DecoderShape, tokens_per_layer: list[int]) -> float:
    """FLOPs of the decoder layers when layer l computes on tokens_per_layer[l] tokens."""
    return sum(layer_flops(shape, tokens) for tokens in tokens_per_layer)


def sample_prefill_flops(shape: DecoderShape, record: dict) -> float:
    """A token-accounting record (prompt_tokens, image_tokens, computed_per_layer) -> its prefill FLOPs."""
    text_tokens = record["prompt_tokens"] - record["image_tokens"]
    computed = record["computed_per_layer"] if "computed_per_layer" in record else record["visible_per_layer"]
    return prefill_flops(shape, [text_tokens + image_tokens for image_tokens in computed])
