"""Probes during training: a Lightning 2 callback (``lightning`` is imported only here).

``ProbeMonitor`` is the modern counterpart of lightning-bolts' ``SSLOnlineEvaluator`` (which
pins pytorch-lightning < 2.0): every ``every_n_epochs`` it captures a fixed held-out set at
the chosen layers, fits a softmax probe per layer with :func:`engine.solve` and logs each
layer's errors to the trainer's logger, without touching the model's gradients or its
training mode.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from ._outputs import selectors
from .capture import Capture, Runner, discover_sites, select_modules
from .datasets import collate
from .errors import InvalidArgumentError
from .options import CaptureOptions
from .reduce import resolve_reductions
from .solve import solve

__all__ = ["ProbeMonitor"]


class ProbeMonitor(lightning.Callback):
    """Fit and log a linear probe per layer every ``every_n_epochs`` training epochs.

    Args:
        layers: module names, globs or types, as for :func:`engine.build_store`.
        data: ``{"train": dataset, "valid": dataset}`` of ``(input, int label)`` items, held
            out from the model's training; the probes fit on ``train`` and are judged (and
            their lambda chosen) on ``valid``.
        every_n_epochs: how often.
        reduce, max_features, batch_size, seed: as for ``build_store``; the sites, their
            reductions and the capture loop are ``build_store``'s own
            (:class:`engine.capture.Capture`), so the probes see the features a store of
            the same model would hold (in float32).
        solve_kwargs: for :func:`engine.solve` (default ``l2="auto"``, the model's device).
        prefix: logged names are ``<prefix>/<layer>/<split>_error`` (top-1).

    After each probe round, ``history[epoch]`` holds the results table.
    """

    def __init__(self, layers: Any, data: Mapping[str, Any], *, every_n_epochs: int = 1,
                 reduce: str | Mapping[str, str] = "auto", max_features: int = 8192,
                 batch_size: int = 256, seed: int = 0,
                 solve_kwargs: Mapping[str, Any] | None = None, prefix: str = "probe"):
        if every_n_epochs < 1:
            raise InvalidArgumentError(f"every_n_epochs must be >= 1, not {every_n_epochs}")
        if set(data) != {"train", "valid"}:
            raise InvalidArgumentError(f"data needs exactly a 'train' and a 'valid' dataset, got "
                                       f"{sorted(data)}")
        self.options = CaptureOptions(reduce=reduce, max_features=max_features,
                                      batch_size=batch_size, seed=seed, dtype="float32")
        self.layers, self.data, self.every_n_epochs = layers, dict(data), every_n_epochs
        self.solve_kwargs = dict(solve_kwargs or {})
        self.prefix = prefix
        self.history: dict[int, pd.DataFrame] = {}

    def capture(self, model: torch.nn.Module, dataset) -> tuple[dict[str, np.ndarray],
                                                                  np.ndarray]:
        """``dataset``'s features at the monitored sites of ``model`` as it is now:
        ``({layer: (N, D) float32}, (N,) labels)``, by ``build_store``'s capture loop. The
        model stays on its device; its training flags are restored."""
        opts = self.options
        runner = Runner(model, next(model.parameters()).device)
        loader = DataLoader(dataset, batch_size=opts.batch_size, collate_fn=collate)
        first = collate([dataset[i] for i in range(min(2, len(dataset)))])[0]
        modules = select_modules(model, self.layers, first)
        chosen = selectors(opts.select or {}, modules)
        found = discover_sites(model, modules, opts.sites, lambda: runner.forward(first),
                               chosen)
        reductions = resolve_reductions(opts.reduce, found, max_features=opts.max_features,
                                        seed=opts.seed)
        capture = Capture(runner, [site for site, _ in found], reductions, sides=opts.sites,
                          dtype=torch.float32, select=chosen)
        feats: dict[str, list[torch.Tensor]] = {key: [] for key in capture.keys}
        labels = []
        with runner:
            for batch, y in capture(loader):
                for key, x in batch.items():
                    feats[key].append(x)
                labels.append(torch.as_tensor(y))
        return ({k: torch.cat(v).numpy() for k, v in feats.items()},
                torch.cat(labels).numpy())

    def on_train_epoch_end(self, trainer: lightning.Trainer,
                           pl_module: lightning.LightningModule) -> None:
        epoch = trainer.current_epoch
        if trainer.sanity_checking or (epoch + 1) % self.every_n_epochs:
            return
        features, labels = {}, {}
        for split, ds in self.data.items():
            features[split], labels[split] = self.capture(pl_module, ds)
        kwargs = {"l2": "auto", "device": str(pl_module.device), "progress": False,
                  **self.solve_kwargs}
        res = solve(features, labels=labels, **kwargs)
        self.history[epoch] = res.table
        for row in res.table.itertuples():
            pl_module.log(f"{self.prefix}/{row.layer}/{row.split}_error",
                          float(row.top1_error), on_epoch=True, on_step=False)
