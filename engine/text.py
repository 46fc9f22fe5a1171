"""Text in: texts and labels, tokenised into the keyword batches a transformer takes.

:class:`TextDataset` turns a list of strings, a Hugging Face ``datasets.Dataset`` or any
sequence or iterable of dicts into ``(inputs, label)`` rows whose batches are
``{"input_ids": (B, T) int64, "attention_mask": (B, T) int64}``, padded to the longest text
of the batch; ``build_store`` runs them as ``model(**inputs)`` and gives the mask to the
token reductions (``tokens:mean`` excludes padding). Nothing is downloaded: the tokenizer is
the caller's (built locally: a ``tokenizers.Tokenizer``, a ``transformers`` tokenizer or any
function from a string to token ids).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.utils.data

from .datasets import Batch
from .errors import DataError, InvalidArgumentError

__all__ = ["TextDataset", "as_token_ids"]


def as_token_ids(tokenizer: Any) -> Callable[[str], list[int]]:
    """A function from a string to its token ids, from ``tokenizer``: an object with
    ``encode(text).ids`` (``tokenizers.Tokenizer``), or a callable returning ids (a list,
    array or tensor) or a dict with ``input_ids`` (a ``transformers`` tokenizer)."""
    encode = getattr(tokenizer, "encode", None)
    if not callable(tokenizer) and callable(encode):  # tokenizers.Tokenizer is not callable
        return lambda text: list(encode(text).ids)
    if not callable(tokenizer):
        raise InvalidArgumentError(
            f"tokenizer must map a string to token ids (a callable, or an object with "
            f"encode(text).ids such as tokenizers.Tokenizer), not a {type(tokenizer).__name__}")

    def ids(text: str) -> list[int]:
        out = tokenizer(text)
        if isinstance(out, Mapping):
            out = out["input_ids"]
        if isinstance(out, torch.Tensor):
            out = out.reshape(-1).tolist()
        return [int(i) for i in np.asarray(out).reshape(-1)]

    return ids


class TextDataset(torch.utils.data.Dataset):
    """Texts with integer labels, tokenised on access.

    Args:
        texts: a list of strings; or a sequence (a ``datasets.Dataset``) or iterable of
            dicts, whose ``text_key`` field is the text and ``label_key`` field the label.
        labels: one int class index per text; default each dict's ``label_key``.
        tokenizer: see :func:`as_token_ids`.
        max_length: keep at most this many tokens of a text (the first ones).
        pad_id: the id padding positions get (their attention mask is 0).
        padding_side: ``"right"`` (encoders) or ``"left"`` (decoders: the last position is
            every row's last token).
        token_labels: per-token labels instead, for ``build_store(..., rows="tokens")``: one
            int sequence per text, aligned with its token ids (truncated with them), or a
            function ``(index, ids) -> labels`` of the same length; -1 marks a token not to
            store (a special token, a word's second sub-token).
        classes: class names, index k naming label k.
        source: a short provenance string for the store's fingerprint.

    Items are ``({"input_ids": (T,), "attention_mask": (T,)}, label)`` (with
    ``token_labels``: a (T,) label tensor); ``__getitems__`` gives a padded
    :class:`engine.datasets.Batch` (token labels padded with -1). A text with no tokens, or
    token labels of another length than its tokens, is an error naming its index.
    """

    def __init__(self, texts: Sequence[str] | Iterable[Mapping[str, Any]],
                 labels: Sequence[int] | np.ndarray | torch.Tensor | None = None, *,
                 tokenizer: Any, max_length: int | None = None, pad_id: int = 0,
                 padding_side: str = "right", text_key: str = "text",
                 label_key: str = "label", token_labels: Any = None,
                 classes: Sequence[str] | None = None, source: str = "text"):
        if isinstance(texts, str):
            raise InvalidArgumentError("texts is one string; pass a list of texts")
        table = hasattr(texts, "column_names")  # a datasets.Dataset: read by column
        rows = texts if table or isinstance(texts, Sequence) else list(texts)
        if token_labels is not None:
            if labels is not None:
                raise InvalidArgumentError("pass labels= (one per text) or token_labels= (one "
                                           "per token), not both")
            if not callable(token_labels) and len(token_labels) != len(rows):
                raise DataError(f"{len(rows)} texts but {len(token_labels)} token label "
                                f"sequences; give one per text")
            labels = np.zeros(len(rows), dtype=np.int64)  # unused: rows are tokens
        if labels is None:
            if len(rows) and isinstance(rows[0], str):
                raise InvalidArgumentError("texts are strings: pass their labels= too")
            labels = rows[label_key] if table else [row[label_key] for row in rows]
        self._texts = (rows[text_key] if table else
                       [row if isinstance(row, str) else row[text_key] for row in rows])
        self.token_labels = token_labels
        targets = np.asarray(torch.as_tensor(labels).cpu() if isinstance(
            labels, torch.Tensor) else labels)
        if token_labels is None:  # the label check of build_store reads `targets`
            self.targets = targets
        self._labels = targets
        if len(targets) != len(self._texts):
            raise DataError(f"{len(self._texts)} texts but {len(targets)} labels; give "
                            f"one label per text")
        if max_length is not None and (not isinstance(max_length, numbers.Integral)
                                       or max_length < 1):
            raise InvalidArgumentError(f"max_length must be a positive int, not {max_length!r}")
        if padding_side not in ("right", "left"):
            raise InvalidArgumentError(f"padding_side must be 'right' or 'left', not "
                                       f"{padding_side!r}")
        self.encode = as_token_ids(tokenizer)
        self.max_length, self.pad_id, self.padding_side = max_length, int(pad_id), padding_side
        self.classes = list(classes) if classes is not None else None
        self.source = source

    def __len__(self) -> int:
        return len(self._texts)

    def tokens(self, index: int) -> torch.Tensor:
        """(T,) int64 token ids of text ``index``, truncated to ``max_length``."""
        text = self._texts[index]
        if not isinstance(text, str):
            raise DataError(f"text {index} is a {type(text).__name__}, not a string")
        ids = self.encode(text)[: self.max_length]
        if not ids:
            raise DataError(f"text {index} ({text[:40]!r}) has no tokens; drop it or fix the "
                            f"tokenizer")
        return torch.tensor(ids, dtype=torch.int64)

    def labels_of(self, index: int, ids: torch.Tensor) -> torch.Tensor:
        """(T,) int64 token labels of text ``index`` whose token ids are ``ids``."""
        full = (self.token_labels(index, ids.tolist()) if callable(self.token_labels)
                else self.token_labels[index])
        out = torch.as_tensor(np.asarray(full, dtype=np.int64).reshape(-1))
        if callable(self.token_labels) and len(out) != len(ids):
            raise DataError(f"text {index}: token_labels gave {len(out)} labels for its "
                            f"{len(ids)} tokens; give one label per token id")
        if not callable(self.token_labels):
            n = len(self.encode(self._texts[index]))  # before truncation
            if len(out) != n:
                raise DataError(f"text {index}: {len(out)} token labels for its {n} tokens; "
                                f"give one label per token id (-1: not stored)")
        return out[: len(ids)]

    def __getitem__(self, index: int) -> tuple[dict[str, torch.Tensor], Any]:
        ids = self.tokens(index)
        label = (self.labels_of(index, ids) if self.token_labels is not None
                 else int(self._labels[index]))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, label

    def __getitems__(self, indices: list[int]) -> Batch:
        seqs = [self.tokens(i) for i in indices]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(seqs), width), dtype=torch.int64)
        tokens = self.token_labels is not None
        if tokens:
            labels = torch.full((len(seqs), width), -1, dtype=torch.int64)
        for row, (i, s) in enumerate(zip(indices, seqs, strict=True)):
            at = slice(0, len(s)) if self.padding_side == "right" else slice(width - len(s),
                                                                             width)
            ids[row, at], mask[row, at] = s, 1
            if tokens:
                labels[row, at] = self.labels_of(i, s)
        if not tokens:
            labels = torch.as_tensor(self._labels[list(indices)], dtype=torch.int64)
        return Batch({"input_ids": ids, "attention_mask": mask}, labels)
