"""SparseVLM (Zhang et al., ICML 2025), v1.5: prune the image tokens inside the LLM by the attention of the text tokens
that rate them, and recycle the best of what it prunes into merged tokens.

As its authors' code does it (Gumpest/SparseVLMs, branch v1.5, commit 734d900: `llava/model/language_model/
modelling_sparse_llama.py`, `score.py`, `utils.py`):
- *Raters*, chosen once on the layer-0 input embeddings: the text tokens after the image, those whose share of the
  image's attention (softmax over the text of each image token's raw dot products with them, averaged over the image
  tokens) is above the mean share (1 / their number).
- At each pruning layer l (its code: 2, 6 and 15 of 32), layer l's attention on its input (its norm, projections and
  rotary embedding; causal, softmax over the whole sequence), averaged over heads, from the raters to the image tokens
  present, averaged over the raters, scores them; the top min(k, present - 1) stay for the layers after l (k by its
  schedule: 300/200/110 for 192 tokens, 303/110/36 for 128, 66/30/17 for 64).
- *Recycling*: of the n pruned tokens, the int(0.3 n) + 1 with the highest scores are clustered by DPC-kNN on layer l's
  output (c = int(m / 10) + 1 clusters and neighbours; distance L2 / sqrt(width); density exp(-mean squared distance to
  the c nearest, itself included); the c tokens with the highest density x distance-to-the-nearest-denser are centres;
  each token joins its nearest centre); each cluster becomes one token, the sum of its members / (count + 1e-6). The
  merged tokens follow the kept ones (in the centres' order), and the positions are counted anew (its code truncates
  `position_ids`: stage_positions=repacked). With stage_positions=original, the kept tokens keep their positions and
  each merged token takes its centre's place and position (LightCompress keeps the centre's position but places the
  merged tokens after the kept ones: not built).

Ties go to the lower index (its code breaks density ties with 1e-6 random noise). Its code runs one image per batch;
here each image is rated by the text after it in its own row (other images' tokens are not text). Its code covers
LLaVA-1.5; on the other families the same rule takes each image's tokens as one set (all its tiles; never a newline).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch

from lmms_simignore.methods.arguments import argument, check_choice, parse_layers, round_half_up
from lmms_simignore.methods.base import IN_LLM, Budget, LayerChoice, LayerStage, Method, PipelineContext, StageRequest
from lmms_simignore.methods.selection import descending_order, select_top_k

# its code's `sparse_token_dict`: image tokens kept (before recycling) at each of its three pruning layers
SCHEDULES = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}
PRUNING_DEPTHS = (2 / 32, 6 / 32, 15 / 32)  # its code's layers 2, 6, 15 of LLaVA-1.5's 32, as fractions of the depth
RECYCLED_SHARE = 0.3  # the share of the pruned tokens recycled (plus one)
POSITION_RULES = ("repacked", "original")


def raters(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(N, D) image and (T, D) text embeddings (layer-0 inputs) -> (T,) bool: the text tokens rating the image, those
    whose mean (over the image tokens) softmax-over-the-text share of the raw dot products is above the mean share."""
    share = (image.float() @ text.float().T).softmax(dim=1).mean(dim=0)  # (T,)
    return share > share.mean()


def recycled_count(pruned: int) -> int:
    """How many of `pruned` tokens its code recycles: int(0.3 n) + 1."""
    return int(pruned * RECYCLED_SHARE) + 1


def cluster_count(recycled: int) -> int:
    """How many merged tokens (and kNN neighbours) its code makes of `recycled` tokens: int(m / 10) + 1."""
    return int(recycled / 10) + 1


def stage_counts(present: int, kept: int) -> tuple[int, int]:
    """(kept, merged) image tokens after a stage that keeps `kept` of `present`: its code keeps min(k, present - 1) and
    recycles the rest into `cluster_count(recycled_count(pruned))` tokens."""
    stay = min(kept, present - 1)
    return stay, cluster_count(recycled_count(present - stay))


def density_peak_clusters(tokens: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN as its code clusters: (m, D) tokens -> (c,) centres (indices, by descending score) and (m,) each token's
    cluster (an index into the centres).

    distance: L2 / sqrt(D); density: exp(-mean of the squared distances to the c nearest, itself included); delta: the
    distance to the nearest denser token (the largest distance of all where none is denser); score: delta x density;
    the c highest scores are the centres (ties: the lower index); each token joins its nearest centre, a centre its own.
    """
    count, width = tokens.shape
    distance = torch.cdist(tokens.float()[None], tokens.float()[None])[0] / math.sqrt(width)  # (m, m)
    nearest = torch.sort(distance, dim=1, stable=True).values[:, :clusters]  # (m, c) itself (0) first
    density = (-(nearest ** 2).mean(dim=1)).exp()  # (m,)
    denser = density[None, :] > density[:, None]  # (m, m): j denser than i
    delta = torch.where(denser, distance, distance.max()).amin(dim=1)  # (m,)
    centres = descending_order(delta * density)[:clusters]  # (c,)
    assignment = torch.sort(distance[centres], dim=0, stable=True).indices[0]  # (m,) the nearest centre of each token
    assignment[centres] = torch.arange(clusters, device=tokens.device)
    return centres, assignment


def merged_tokens(tokens: torch.Tensor, assignment: torch.Tensor, clusters: int) -> torch.Tensor:
    """(m, D) tokens, (m,) cluster of each -> (c, D): each cluster's sum / (its count + 1e-6), as its code merges."""
    sums = tokens.new_zeros(clusters, tokens.shape[1]).index_add_(0, assignment, tokens)
    counts = torch.bincount(assignment, minlength=clusters).to(tokens.dtype)
    return sums / (counts[:, None] + 1e-6)


# -- the stage ---------------------------------------------------------------------------------------------------------
def rater_queries(view) -> tuple[torch.Tensor, torch.Tensor]:
    """(I, T) the columns of the text after each image in this sequence, (I, T) each one's weight as a query: 1 / R on
    the image's R raters (chosen on the first layer's inputs), 0 on the others. view: `engine.views.LayerView`."""
    image, image_real, text, text_real, text_columns = view.first_layer_inputs()
    weights = torch.zeros(text_columns.shape, dtype=torch.float32, device=text_columns.device)
    for index in range(image.shape[0]):
        if not text_real[index].any():
            raise ValueError("sparsevlm rates each image by the text after it; this prompt has none after an image (its "
                             "code's scores are NaN there)")
        rating = torch.zeros_like(text_real[index])
        rating[text_real[index]] = raters(image[index][image_real[index]], text[index][text_real[index]])
        if not rating.any():  # every share equal: none above the mean
            raise ValueError("sparsevlm: no text token after an image shares more of it than the mean, so none rates it "
                             "(its code's scores are NaN there)")
        weights[index] = rating.float() / rating.sum()
    return text_columns, weights


def choose_and_recycle(kept: int, positions: str, view) -> LayerChoice:
    """One SparseVLM stage at the boundary after `view.layer`: keep the top `kept` image tokens by the raters' attention
    in that layer, recycle the best 30% (+1) of the rest into merged tokens. view: `engine.views.LayerView`."""
    columns, visible = view.image_columns, view.image_visible  # (I, M)
    images = columns.shape[0]
    if not columns.numel():
        return LayerChoice(columns[:, : view.keep])
    text_columns, rater_weights = rater_queries(view)  # (I, T), (I, T) 1/R on the raters, 0 elsewhere
    received = view.layer_attention_from(text_columns, rater_weights)  # (I, S) mean over heads and raters
    scores = received.gather(1, columns).masked_fill(~visible, float("-inf"))  # (I, M)
    present = int(visible.sum(dim=1).min())
    stay, merged_count = stage_counts(present, kept)
    top = select_top_k(scores, stay)  # (I, stay) ascending
    pruned_flags = visible.clone()
    pruned_flags.scatter_(1, top, False)
    pruned = pruned_flags.nonzero()[:, 1].reshape(images, -1)  # (I, n) ascending
    recycled = recycled_count(pruned.shape[1])
    best = descending_order(scores.gather(1, pruned))[:, :recycled]  # (I, m) by descending score
    recycled_index = pruned.gather(1, best)  # (I, m) indices into the M candidates
    states = view.layer_output[view.image_rows[:, None], columns.gather(1, recycled_index)]  # (I, m, D)
    plans = [density_peak_clusters(image_states, merged_count) for image_states in states]
    centres = torch.stack([recycled_index[i, centre] for i, (centre, _) in enumerate(plans)])  # (I, c) into M
    assignments = torch.stack([assignment for _, assignment in plans])  # (I, m)
    slots = torch.sort(torch.cat([top, centres], dim=1), dim=1).values  # (I, stay + c)
    return LayerChoice(slots, partial(recycled_content, top, recycled_index, assignments, centres, slots, positions))


def recycled_content(top: torch.Tensor, recycled: torch.Tensor, assignments: torch.Tensor, centres: torch.Tensor,
                     slots: torch.Tensor, positions: str, hidden: torch.Tensor) -> torch.Tensor:
    """The kept slots' content (I, K, D) from the candidates' hidden states `hidden` (I, M, D): repacked, the kept tokens
    in their order then the merged ones (its code); original, each merged token in its centre's slot."""
    width = hidden.shape[-1]
    gathered = hidden.gather(1, recycled[..., None].expand(-1, -1, width))  # (I, m, D)
    merged = torch.stack([merged_tokens(states, assignment, centres.shape[1])
                          for states, assignment in zip(gathered, assignments)]).to(hidden.dtype)  # (I, c, D)
    if positions == "repacked":
        return torch.cat([hidden.gather(1, top[..., None].expand(-1, -1, width)), merged], dim=1)
    content = hidden.gather(1, slots[..., None].expand(-1, -1, width)).clone()
    places = torch.searchsorted(slots, centres)  # (I, c) where each centre sits among the slots
    return content.scatter(1, places[..., None].expand(-1, -1, width), merged)


# -- declaration -----------------------------------------------------------------------------------------------------
def parse_counts(given) -> tuple[int, ...]:
    """'300/200/110' -> (300, 200, 110): image tokens kept (before recycling) at each pruning layer, non-increasing."""
    try:
        counts = tuple(int(part) for part in given.split("/")) if isinstance(given, str) else tuple(int(x) for x in given)
    except (ValueError, TypeError):
        counts = ()
    if not counts or any(count < 1 for count in counts) or list(counts) != sorted(counts, reverse=True):
        raise ValueError(f"sparsevlm_schedule must be the image tokens kept at each pruning layer, >= 1 and non-increasing, "
                         f"separated by '/', e.g. 300/200/110; got {given!r}")
    return counts


def scaled_schedule(average: int) -> tuple[int, ...]:
    """Its schedule for `average` tokens: its own for 192, 128 and 64; otherwise the one of the nearest of those scaled
    by average / that budget (rounded half up, at least 1)."""
    if average in SCHEDULES:
        return SCHEDULES[average]
    budget = min(SCHEDULES, key=lambda known: (abs(known - average), known))
    return tuple(max(1, round_half_up(count * average / budget)) for count in SCHEDULES[budget])


@dataclass(frozen=True)
class SparseVLMArguments:
    sparsevlm_layers: str | tuple | None = argument(
        None, "the layers whose attention prunes, `/`-separated (the pruned set applies from the next layer): decoder "
              "layers (its code's `2/6/15` of 32) or fractions of the depth (rounded half up)",
        "`0.0625/0.1875/0.46875`")
    sparsevlm_schedule: str | tuple | None = argument(
        None, "image tokens kept at each pruning layer before recycling (its code's 300/200/110 for 192 tokens, 303/110/36 "
              "for 128, 66/30/17 for 64); `keep=N` instead takes its schedule for N", "`300/200/110`")

    def __post_init__(self) -> None:
        if self.sparsevlm_layers is not None:
            object.__setattr__(self, "sparsevlm_layers", parse_layers("sparsevlm_layers", self.sparsevlm_layers, lowest=0,
                                                                       examples=("2/6/15", "0.0625/0.1875/0.46875")))
        if self.sparsevlm_schedule is not None:
            object.__setattr__(self, "sparsevlm_schedule", parse_counts(self.sparsevlm_schedule))


def _check(args: SparseVLMArguments, context: PipelineContext) -> None:
    budget = context.budget or Budget()
    if budget.ignore is not None or budget.adaptive:
        raise ValueError(f"sparsevlm is budgeted by keep=N (its schedule for an average of N image tokens: 192, 128 or 64 "
                         f"as its code, others scaled; a fraction: of each image's tokens) or sparsevlm_schedule=, not "
                         f"{budget.describe()}")
    if (budget.keep is None) == (args.sparsevlm_schedule is None):
        raise ValueError(f"sparsevlm needs one of keep=N and sparsevlm_schedule=; got keep={budget.keep}, "
                         f"sparsevlm_schedule={args.sparsevlm_schedule}")
    if context.positions is not None:
        check_choice("stage_positions", context.positions, POSITION_RULES)


def pruning_layers(args: SparseVLMArguments, num_layers: int) -> tuple[int, ...]:
    """The layers whose attention prunes, on a model of `num_layers` decoder layers."""
    given = PRUNING_DEPTHS if args.sparsevlm_layers is None else args.sparsevlm_layers
    layers = tuple(round_half_up(x * num_layers) if isinstance(x, float) else x for x in given)
    if list(layers) != sorted(set(layers)) or layers[-1] > num_layers - 2:
        raise ValueError(f"sparsevlm prunes after layers {'/'.join(map(str, layers))} of this {num_layers}-layer language "
                         f"model (from sparsevlm_layers={'/'.join(map(str, given))}); each needs its own layer and a layer "
                         f"after it")
    return layers


def _plan(args: SparseVLMArguments, request: StageRequest) -> tuple[LayerStage, ...]:
    schedule = args.sparsevlm_schedule or scaled_schedule(request.budget.count(request.image_tokens))
    layers = pruning_layers(args, request.num_layers)
    if len(layers) != len(schedule):
        raise ValueError(f"sparsevlm has {len(schedule)} stages in its schedule ({'/'.join(map(str, schedule))}) but "
                         f"{len(layers)} pruning layers ({'/'.join(map(str, layers))}); give as many of each")
    if layers[0] + 1 <= request.after_layer:
        raise ValueError(f"sparsevlm prunes after layer {layers[0]}, not after layer {request.after_layer}, where the stage "
                         f"before it acts")
    positions = request.positions or "repacked"
    stages, present = [], request.available
    for layer, kept in zip(layers, schedule):
        stay, merged = stage_counts(present, kept)
        present = stay + merged
        stages.append(LayerStage("sparsevlm", layer + 1, present, partial(choose_and_recycle, kept, positions),
                                 positions=positions, merges=True))
    return tuple(stages)


METHOD = Method(
    name="sparsevlm",
    title="SparseVLM (Zhang et al., ICML 2025)",
    summary="inside the LLM: text *raters* (the text after the image whose share of the image's layer-0 dot-product "
            "softmax is above the mean) score the image tokens by their attention at pruning layers (its code's 2/6/15 "
            "of 32; mean over heads and raters); the top k stay for the layers after, the best 30% (+1) of the rest are "
            "clustered by DPC-kNN into merged tokens placed after the kept ones; positions counted anew, as its v1.5 code",
    places=(IN_LLM,),
    arguments=SparseVLMArguments,
    budget="`keep=N`: its schedule for N (192 / 128 / 64 as its code names them; others the nearest of those scaled by "
           "N / it; a fraction: N of each image's own tokens, as on Qwen-VL), or `sparsevlm_schedule`; each stage keeps "
           "its count + the merged tokens (on LLaVA-1.5 the layers "
           "compute on 206.5 / 145.4 / 82.3 image tokens on average for 192 / 128 / 64)",
    positions="repacked",
    needs=("the layer-0 input embeddings of the text after the image", "each pruning layer's attention from the raters"),
    refuses="re-packed positions on multimodal rotary ones (Qwen-VL: pass stage_positions=original, each merged token "
            "at its centre's); a stage before Qwen3-VL's last DeepStack layer (a merged token has no row of its "
            "additions)",
    check=_check,
    plan=_plan,
    own_budget=("sparsevlm_schedule",),
)
