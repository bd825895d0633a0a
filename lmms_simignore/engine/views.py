"""What a stage sees at its place: one view per place, built by the engine, with the model's quantities a method may
need computed on demand from the model's own parts (independent of the attention backend). Methods read these; they
never touch the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lmms_simignore.engine.attention import (attention_received, last_token_attention, layer_key_norms, vision_layer_attention,
                                             vision_layer_attention_received, vision_layer_single_head_cls_attention)


@dataclass(frozen=True)
class TiledImage:
    """Where one image's views stand in a `TowerView`'s batch of views: `views` (a slice) the base view, then
    crop_rows x crop_cols crops, row-major (LLaVA-NeXT's anyres); token_views: (N,) where each of the image's N tokens
    comes from, an index into its views' patches (V x P, flattened), as the model packs them (the crops' stitched grid
    unpadded), or None where the model packs them otherwise (a grid shrunk by interpolation)."""

    views: slice
    crop_rows: int
    crop_cols: int
    token_views: torch.Tensor | None = None


@dataclass
class TowerView:
    """The vision tower's states of a batch's images, for a stage in the tower.

    states: the tower's hidden states (embeddings, then each layer's output), each (I, T, D); feature_index: which of
    them the model projects; layers: the tower's encoder layers; tiling: one `TiledImage` per image where the tower saw
    each image as several views (then I counts views), else None; cls_token: whether the tower's first token is a CLS
    token (CLIP; SigLIP has none); first_image_token: the first of the T tokens the model projects as image tokens (1
    where its feature strategy drops the first token, "default"; 0 under "full").
    """

    states: tuple[torch.Tensor, ...]
    feature_index: int
    layers: object
    tiling: tuple[TiledImage, ...] | None = None
    cls_token: bool = True
    first_image_token: int = 1

    @classmethod
    def of(cls, config, states: tuple[torch.Tensor, ...], layers, tiling: tuple[TiledImage, ...] | None = None) -> TowerView:
        """The view of a llava-style model's tower states, as its `config` reads them."""
        return cls(states, config.vision_feature_layer % len(states), layers, tiling,
                   cls_token=config.vision_config.model_type == "clip_vision_model",
                   first_image_token=int(config.vision_feature_select_strategy == "default"))

    @property
    def feature_states(self) -> torch.Tensor:
        """(I, T, D) the feature layer's output (CLS first on CLIP towers)."""
        return self.states[self.feature_index]

    @property
    def image_token_states(self) -> torch.Tensor:
        """(I, N, D) the feature layer's output at the tokens the model projects as image tokens."""
        return self.feature_states[:, self.first_image_token:]

    def feature_attention(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(I, H, T) float32 the CLS row of the feature layer's attention, and (I, H, T, d) its keys."""
        return vision_layer_attention(self.layers[self.feature_index - 1], self.states[self.feature_index - 1])

    def last_layer_attention_received(self) -> torch.Tensor:
        """(I, H, T) float32 the attention each token receives in the tower's last layer, averaged over the queries."""
        return vision_layer_attention_received(self.layers[len(self.layers) - 1], self.states[len(self.layers) - 1])

    def last_layer_single_head_cls_attention(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(I, T) float32 the CLS row of the tower's last layer's attention taken as one head over the full width, and
        (I, T, D) that layer's keys."""
        return vision_layer_single_head_cls_attention(self.layers[len(self.layers) - 1], self.states[len(self.layers) - 1])


@dataclass
class ImageTokensView:
    """A batch's projected image tokens, for a stage before the LLM.

    image_features: (I, N, D) each image's tokens in the LLM input space; image_rows: (I,) their batch row;
    image_seeds: one seed per image (random choices); grid: (rows, cols) of each image's tokens, where they form one;
    text_embeddings(with_bos) -> (I, T, D), (I, T) bool: the LLM input embeddings of each image's row's comparison text.
    """

    image_features: torch.Tensor
    image_rows: torch.Tensor
    image_seeds: list[int]
    grid: tuple[int, int] | None
    embed_text: Callable

    def text_embeddings(self, with_bos: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed_text(with_bos)


@dataclass
class LayerView:
    """The prompt pass at an in-LLM stage's boundary: the last layer before the stage has run.

    layer: that layer; next_layer: the stage's first layer; layer_input / layer_output: (B, S, D) its input and output;
    position_embeddings: (cos, sin) of the sequence; visible: (B, S) bool, the columns the prompt may attend to;
    is_image: (B, S) bool, the image columns (visible or not); image_rows: (I,); image_columns: (I, M) where each
    image's tokens still present sit; image_visible: (I, M) which of them are visible (the candidates); keep: image
    tokens per image the stage keeps; final_norm: the language model's norm after its last layer; count_flops(n): told
    the FLOPs of what the view computes (the projections and attention scores a stage asks for), so that a stage's own
    work is counted with the layers'; first_layer(): what the first decoder layer got of each image and of the text
    after it (`first_layer_inputs`).
    """

    layer: object
    next_layer: object
    layer_input: torch.Tensor
    layer_output: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    visible: torch.Tensor
    is_image: torch.Tensor
    image_rows: torch.Tensor
    image_columns: torch.Tensor
    image_visible: torch.Tensor
    keep: int
    final_norm: object
    count_flops: Callable = lambda flops: None
    first_layer: Callable | None = None

    def _projection_flops(self, layer, rows: int, queries: int, keys: int) -> int:
        """2 x multiply-adds of `queries` query and `keys` key projections in `layer`, per row, over `rows` rows."""
        attention, width = layer.self_attn, self.layer_input.shape[-1]
        return 2 * rows * width * (queries * attention.q_proj.out_features + keys * attention.k_proj.out_features)

    def last_token_attention(self) -> torch.Tensor:
        """(B, H, S) float32: each row's last position's softmax attention in `layer`."""
        rows, length, _ = self.layer_input.shape
        query_width = self.layer.self_attn.q_proj.out_features
        self.count_flops(self._projection_flops(self.layer, rows, 1, length) + 2 * rows * length * query_width)
        return last_token_attention(self.layer, self.layer_input, self.position_embeddings, self.visible)

    def key_norms(self) -> torch.Tensor:
        """(B, S) float32: the L1 norm of each position's key in `layer` (after the rotary embedding, all key heads)."""
        rows, length, _ = self.layer_input.shape
        self.count_flops(self._projection_flops(self.layer, rows, 0, length))
        return layer_key_norms(self.layer, self.layer_input, self.position_embeddings)

    def normed_output(self) -> torch.Tensor:
        """(B, S, D): `layer`'s output through the final norm."""
        return self.final_norm(self.layer_output)

    def first_layer_inputs(self) -> tuple[torch.Tensor, ...]:
        """What the first decoder layer got: (I, N, D) each image's visible tokens and (I, N) which are real; (I, T, D)
        the text after it in its row (its row's tokens after the image's last, other images' tokens left out) and (I, T)
        which are real; (I, T) where those text tokens sit in this sequence."""
        return self.first_layer()

    def layer_attention_from(self, query_columns: torch.Tensor, query_weights: torch.Tensor) -> torch.Tensor:
        """(I, S) float32 the attention each column of an image's row receives in `layer` (on its input; causal, softmax
        over the visible columns), mean over heads, summed over the queries at `query_columns` (I, Q) with
        `query_weights` (I, Q)."""
        images, queries = query_columns.shape
        received, _, score_flops = attention_received(self.layer, self.layer_input, self.position_embeddings,
                                                      self.image_rows, query_columns, query_weights, self.visible)
        self.count_flops(self._projection_flops(self.layer, images, queries, self.layer_input.shape[1]) + score_flops)
        return received

    def next_layer_attention_from_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(I, S) float32 the attention each column of an image's row receives in `next_layer` (causal, on the current
        states) from the image's visible candidate tokens, mean over heads, summed over those queries; and (I, Hkv, S, d)
        that row's keys after the rotary embedding."""
        images, queries = self.image_columns.shape
        received, keys, score_flops = attention_received(self.next_layer, self.layer_output, self.position_embeddings,
                                                         self.image_rows, self.image_columns,
                                                         self.image_visible.float(), self.visible)
        self.count_flops(self._projection_flops(self.next_layer, images, queries, self.layer_output.shape[1]) + score_flops)
        return received, keys
