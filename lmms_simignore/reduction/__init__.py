"""Token-selection algorithms: small pure functions over batched tensors, one module per method."""

from lmms_simignore.reduction.selection import select_top_k
from lmms_simignore.reduction.simignore import SIMILARITIES, similarity_scores

__all__ = ["SIMILARITIES", "select_top_k", "similarity_scores"]
