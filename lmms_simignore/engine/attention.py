"""Attention quantities recomputed from a layer's own parts (norm, projections, rotary embedding), so that they do not
depend on the attention backend the model runs with."""

from __future__ import annotations

import importlib

import torch


def rotate(tensor: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention) -> torch.Tensor:
    """`tensor` (B, H, L, d) queries or keys with the rotary embedding applied by `attention`'s own module function, on
    the first cos.shape[-1] dims of each head (all of them, or a partial share as Phi's) and the rest passed through."""
    apply_rotary = importlib.import_module(type(attention).__module__).apply_rotary_pos_emb
    rotary = cos.shape[-1]
    if rotary == tensor.shape[-1]:
        return apply_rotary(tensor, tensor, cos, sin)[0]
    rotated = apply_rotary(tensor[..., :rotary], tensor[..., :rotary], cos, sin)[0]
    return torch.cat([rotated, tensor[..., rotary:]], dim=-1)


def heads(attention, normed: torch.Tensor, role: str) -> torch.Tensor:
    """(B, L, D) normed layer input -> (B, H, L, d) queries (`role` "q") or keys ("k") of `attention`, through its
    per-head norm where it has one (Qwen3's `q_norm` / `k_norm`, on each head before the rotary embedding)."""
    batch, length, _ = normed.shape
    states = getattr(attention, f"{role}_proj")(normed).view(batch, length, -1, attention.head_dim)
    norm = getattr(attention, f"{role}_norm", None)
    return (states if norm is None else norm(states)).transpose(1, 2)


def last_token_attention(layer, hidden_states: torch.Tensor, position_embeddings, key_visible: torch.Tensor) -> torch.Tensor:
    """Softmax attention of each row's last position over all columns, per head, in `layer`'s self-attention.

    Recomputed from the layer's own norm, query/key projections and rotary embedding, so the result does
    not depend on the attention backend (eager, sdpa, flash) the model runs with.
    hidden_states: (B, L, D) the layer's input; position_embeddings: (cos, sin), each (B, L, d);
    key_visible: (B, L) bool, the columns the last position may attend to.
    Returns: (B, H, L) float32.
    """
    attention = layer.self_attn
    normed = layer.input_layernorm(hidden_states)  # (B, L, D)
    query = heads(attention, normed[:, -1:], "q")  # (B, H, 1, d)
    key = heads(attention, normed, "k")  # (B, Hkv, L, d)
    cos, sin = position_embeddings
    query = rotate(query, cos[:, -1:], sin[:, -1:], attention)
    key = rotate(key, cos, sin, attention)
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # (B, H, L, d), grouped-query heads
    scores = (query @ key.transpose(-1, -2)).squeeze(2).float() * attention.scaling  # (B, H, L)
    scores = scores.masked_fill(~key_visible[:, None, :], float("-inf"))
    return scores.softmax(dim=-1)


CHUNK_ELEMENTS = 2**20  # attention weights held at once by `attention_received` (a buffer reused chunk by chunk)


def attention_received(layer, hidden_states: torch.Tensor, position_embeddings, query_rows: torch.Tensor,
                       query_columns: torch.Tensor, query_weights: torch.Tensor,
                       key_visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The attention each position receives from chosen queries in `layer`'s self-attention: their softmax weights
    (causal: a query sees the columns up to its own; restricted to `key_visible`), averaged over heads and summed over
    the queries weighted by `query_weights`; recomputed from the layer's norm, projections and rotary embedding, a chunk
    of queries at a time (the (queries x row) weights are never all held at once).

    hidden_states: (B, L, D) the layer's input; position_embeddings: (cos, sin), each (B, L, d); query_rows: (I,) and
    query_columns: (I, M) the queries; query_weights: (I, M) each query's weight (0 leaves it out); key_visible: (B, L).
    Returns: (I, L) float32; (I, Hkv, L, d) the row's keys after the rotary embedding; the FLOPs of the scores and
    their weighted sum (each chunk of queries scores only the columns up to its last query's).
    """
    attention = layer.self_attn
    head_dim = attention.head_dim
    normed = layer.input_layernorm(hidden_states[query_rows])  # (I, L, D)
    images, length, _ = normed.shape
    cos, sin = (part[query_rows] for part in position_embeddings)  # (I, L, d) each

    def at_queries(tensor):  # (I, L, X) -> (I, M, X)
        return tensor.gather(1, query_columns[..., None].expand(-1, -1, tensor.shape[-1]))

    query = heads(attention, at_queries(normed), "q")  # (I, H, M, d)
    key = heads(attention, normed, "k")  # (I, Hkv, L, d)
    query = rotate(query, at_queries(cos), at_queries(sin), attention)
    key = rotate(key, cos, sin, attention)
    grouped = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1).transpose(-1, -2)  # (I, H, d, L)
    columns = torch.arange(length, device=query.device)
    visible = key_visible[query_rows][:, None, :]  # (I, 1, L)
    received = torch.zeros(images, length, dtype=torch.float32, device=query.device)
    head_count = query.shape[1]
    chunk = max(1, CHUNK_ELEMENTS // max(1, images * head_count * length))
    score_flops = 0
    buffer = torch.empty(images * head_count * min(chunk, query.shape[2]) * length, dtype=query.dtype, device=query.device)
    for start in range(0, query.shape[2], chunk):  # one buffer for every chunk: no fresh multi-MB tensor per chunk
        part = slice(start, start + chunk)
        queries = query[:, :, part]  # (I, H, c, d)
        seen = int(query_columns[:, part].max()) + 1  # causal: no query of the chunk sees a column after its own
        allowed = visible[..., :seen] & (columns[None, None, :seen] <= query_columns[:, part, None])  # (I, c, seen)
        bias = torch.zeros(allowed.shape, dtype=torch.float32, device=query.device).masked_fill_(~allowed, float("-inf"))
        scores = buffer[: queries[..., :1].numel() * seen].view(*queries.shape[:3], seen)
        scores = torch.matmul(queries, grouped[..., :seen], out=scores).float()  # (I, H, c, seen)
        weights = torch.softmax(scores.mul_(attention.scaling).add_(bias[:, None]), dim=-1, out=scores)  # in place
        coefficients = (query_weights[:, None, part].float() / head_count).expand(-1, head_count, -1)  # (I, H, c)
        received[:, :seen] += (coefficients.flatten(1)[:, None] @ weights.flatten(1, 2)).squeeze(1)  # mean over heads, sum over queries
        score_flops += 2 * queries[..., :1].numel() * seen * (head_dim + 1)
    return received, key, score_flops


def layer_key_norms(layer, hidden_states: torch.Tensor, position_embeddings) -> torch.Tensor:
    """L1 norm of each position's key in `layer`'s self-attention (after the rotary embedding, all key heads
    together), recomputed from the layer's norm and key projection.

    hidden_states: (B, L, D) the layer's input; position_embeddings: (cos, sin), each (B, L, d). Returns (B, L) float32.
    """
    attention = layer.self_attn
    key = heads(attention, layer.input_layernorm(hidden_states), "k")  # (B, Hkv, L, d)
    cos, sin = position_embeddings
    key = rotate(key, cos, sin, attention)  # (B, Hkv, L, d)
    return key.float().abs().sum(dim=(1, 3))


def vision_layer_attention(layer, hidden_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The CLS row of a CLIP encoder layer's self-attention and its keys, recomputed from the layer's own norm and
    projections (independent of the attention backend).

    hidden_in: (I, T, D) the layer's input, CLS first.
    Returns: (I, H, T) float32 softmax attention of the CLS query, and (I, H, T, d) keys.
    """
    attention = layer.self_attn
    images, tokens, _ = hidden_in.shape
    head_dim = attention.head_dim
    normed = layer.layer_norm1(hidden_in)  # (I, T, D)
    query = attention.q_proj(normed[:, :1]).view(images, 1, -1, head_dim).transpose(1, 2)  # (I, H, 1, d)
    keys = attention.k_proj(normed).view(images, tokens, -1, head_dim).transpose(1, 2)  # (I, H, T, d)
    scores = (query @ keys.transpose(-1, -2)).squeeze(2).float() * attention.scale  # (I, H, T)
    return scores.softmax(dim=-1), keys


def vision_layer_single_head_cls_attention(layer, hidden_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The CLS row of a CLIP encoder layer's attention computed as one head over the full width: softmax(q_CLS · kᵀ /
    √D) of the layer's own norm and query/key projections (biases included), as hooks on `q_proj`/`k_proj` would give
    them; and the keys.

    hidden_in: (I, T, D) the layer's input, CLS first. Returns: (I, T) float32 attention, (I, T, D) keys.
    """
    attention = layer.self_attn
    normed = layer.layer_norm1(hidden_in)  # (I, T, D)
    query = attention.q_proj(normed[:, :1])  # (I, 1, D)
    keys = attention.k_proj(normed)  # (I, T, D)
    scores = (query @ keys.transpose(-1, -2)).squeeze(1).float() * keys.shape[-1] ** -0.5  # (I, T)
    return scores.softmax(dim=-1), keys


def vision_layer_attention_received(layer, hidden_in: torch.Tensor) -> torch.Tensor:
    """The attention each token receives in a CLIP or SigLIP encoder layer, averaged over the queries, recomputed from
    the layer's own norm and projections (independent of the attention backend).

    hidden_in: (I, T, D) the layer's input. Returns: (I, H, T) float32: column means of each head's softmax weights.
    """
    attention = layer.self_attn
    images, tokens, _ = hidden_in.shape
    normed = layer.layer_norm1(hidden_in)  # (I, T, D)
    query = attention.q_proj(normed).view(images, tokens, -1, attention.head_dim).transpose(1, 2)  # (I, H, T, d)
    keys = attention.k_proj(normed).view(images, tokens, -1, attention.head_dim).transpose(1, 2)  # (I, H, T, d)
    weights = ((query @ keys.transpose(-1, -2)).float() * attention.scale).softmax(dim=-1)  # (I, H, T, T)
    return weights.mean(dim=-2)
