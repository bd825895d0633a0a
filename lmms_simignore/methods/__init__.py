"""Token-selection algorithms: small pure functions over batched tensors, one module per method."""

from lmms_simignore.methods.dart import dart_choice
from lmms_simignore.methods.fastv import fastv_scores
from lmms_simignore.methods.random_tokens import random_scores, sample_seed
from lmms_simignore.methods.selection import ORDERS, select_by_order, select_top_k
from lmms_simignore.methods.simignore import SIMILARITIES, pairwise_similarity, similarity_scores, walk_scores
from lmms_simignore.methods.visionzip import merge_contextual, visionzip_tokens

__all__ = [
    "ORDERS",
    "SIMILARITIES",
    "dart_choice",
    "fastv_scores",
    "merge_contextual",
    "pairwise_similarity",
    "random_scores",
    "sample_seed",
    "select_by_order",
    "select_top_k",
    "similarity_scores",
    "visionzip_tokens",
    "walk_scores",
]
