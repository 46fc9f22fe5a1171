"""Token rows (``build_store(..., rows="tokens")``): a store whose rows are the labelled
tokens of sequences.

An item is a sequence: ``(inputs, labels)`` with ``inputs["attention_mask"]`` (T,) and
``labels`` (T,), one label per token. Its *stored* tokens are those of the mask whose label
is not -1, in position order. A split of items becomes a flat run of token rows: item ``i``
holds rows ``[offsets[i], offsets[i + 1])``, so a sequence is never cut between splits (the
splits are made of items) and its rows are contiguous. Blocks of rows are cut from this run
whatever the item boundaries; see :func:`engine._writer.write_rows`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from ._data import SplitSource
from .errors import DataError

__all__ = ["keep_mask", "token_offsets", "PLAN_BATCH"]

#: items per fetch while counting the tokens of a split
PLAN_BATCH = 256


def keep_mask(inputs, labels: torch.Tensor, split: str, item: int) -> torch.Tensor:
    """(B, T) bool: the tokens of a batch to store (mask on, label >= 0). ``item`` is the
    batch's first row (an item) in ``split``, for errors."""
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if mask is None:
        raise DataError(f"split {split!r}, items {item}..: rows='tokens' needs dict inputs "
                        f"with an attention_mask (engine.TextDataset gives them)")
    if tuple(labels.shape) != tuple(mask.shape):
        raise DataError(
            f"split {split!r}, items {item}..{item + len(mask) - 1}: labels of shape "
            f"{tuple(labels.shape)} do not line up with the tokens' attention mask "
            f"{tuple(mask.shape)}; rows='tokens' needs one label per token (-1: not stored), "
            f"e.g. engine.TextDataset(..., token_labels=...)")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise DataError(f"split {split!r}, items {item}..: token labels are {labels.dtype}, "
                        f"not integer class indices")
    bad = (labels < -1).nonzero()
    if len(bad):
        b, t = (int(v) for v in bad[0])
        raise DataError(f"split {split!r}, item {item + b}, token {t}: label "
                        f"{int(labels[b, t])} is negative; labels are class indices, -1 "
                        f"for a token not to store")
    return (mask.to(labels.device) != 0) & (labels >= 0)


def token_offsets(split: SplitSource) -> np.ndarray:
    """(items + 1,) int64: the first token row of each item of ``split`` and, last, its
    number of token rows. Reads every item once (tokenising it; the model does not run)."""
    counts = np.zeros(split.rows, dtype=np.int64)
    for a in range(0, split.rows, PLAN_BATCH):
        rows = list(range(a, min(a + PLAN_BATCH, split.rows)))
        batch = split.fetch(rows)
        counts[a : a + len(rows)] = keep_mask(batch.inputs, batch.labels, split.name,
                                              a).sum(dim=1).numpy()
    out = np.zeros(split.rows + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    if out[-1] == 0:
        raise DataError(f"split {split.name!r} has no labelled token to store (every label is "
                        f"-1 or padding); label some tokens or leave the split out")
    return out
