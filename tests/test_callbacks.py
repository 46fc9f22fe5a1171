"""engine.callbacks.ProbeMonitor with a real lightning.Trainer on the CPU."""

from __future__ import annotations

import lightning
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

import engine
from engine.callbacks import ProbeMonitor
from engine.datasets import collate

# lightning 2.6 still calls a torch.utils._pytree API that torch 2.14 deprecates
pytestmark = pytest.mark.filterwarnings(
    r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning")


class Classifier(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
        self.seen_training = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        self.seen_training.append(self.training)
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Snapshot(lightning.Callback):
    """The gradient and training mode at epoch end; one before ProbeMonitor, one after."""

    def on_train_epoch_end(self, trainer, pl_module):
        self.mode = pl_module.training
        self.grad = pl_module.net[1].weight.grad.clone()


def test_probe_monitor_logs_one_value_per_layer_and_epoch(fashion, tmp_path):
    torch.manual_seed(0)
    model = Classifier()
    monitor = ProbeMonitor(["net.1", "net.2", "net.3"],
                           {"train": fashion["test"].subset(0, 150),
                            "valid": fashion["test"].subset(150, 200)},
                           every_n_epochs=1, solve_kwargs={"l2": [1e-3, 1e-2], "device": "cpu"})
    before, after = Snapshot(), Snapshot()
    trainer = lightning.Trainer(max_epochs=2, accelerator="cpu", logger=CSVLogger(tmp_path),
                                callbacks=[before, monitor, after], enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False,
                                log_every_n_steps=1)
    trainer.fit(model, DataLoader(fashion["train"].subset(0, 256), batch_size=64,
                                  collate_fn=collate))
    metrics = pd.read_csv(next(tmp_path.rglob("metrics.csv")))
    cols = [c for c in metrics.columns if c.startswith("probe/")]
    assert sorted(cols) == sorted(f"probe/{layer}/{split}_error" for layer in
                                  ("net.1", "net.2", "net.3") for split in ("train", "valid"))
    for col in cols:
        values = metrics[col].dropna()
        assert len(values) == 2  # one value per epoch
        assert ((0 <= values) & (values <= 1)).all()
    assert sorted(monitor.history) == [0, 1]
    # the model's training is untouched: same gradient, still in training mode
    assert torch.equal(before.grad, after.grad) and after.mode and before.mode
    assert all(model.seen_training)


def test_probe_monitor_checks_its_arguments(fashion):
    with pytest.raises(engine.InvalidArgumentError, match="'train' and a 'valid'"):
        ProbeMonitor(["net.1"], {"train": fashion["train"]})
    with pytest.raises(engine.InvalidArgumentError, match="every_n_epochs"):
        ProbeMonitor(["net.1"], {"train": fashion["train"], "valid": fashion["test"]},
                     every_n_epochs=0)


def test_the_callbacks_features_are_the_stores(fashion, tmp_path):
    """One capture loop: ProbeMonitor sees, in float32, what build_store stores for the same
    model, layers and reductions (a pooled conv map and a subsampled layer among them)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 28 * 28, 16))
    data = {"train": fashion["test"].subset(0, 60), "valid": fashion["test"].subset(60, 90)}
    layers, reduce = ["0", "1", "3"], {"0": "pool:7x7", "1": "subsample:50"}
    monitor = ProbeMonitor(layers, data, reduce=reduce, batch_size=16, seed=3)
    store = engine.build_store(model, data, tmp_path / "s.zarr", layers=layers, reduce=reduce,
                               seed=3, dtype="float32", batch_size=16, progress=False)
    assert store.layers == ["0", "1", "3"]
    assert store.layer_info("1")["reduction"] == "subsample:50"
    for split, dataset in data.items():
        features, labels = monitor.capture(model, dataset)
        assert sorted(features) == sorted(store.layers)
        np.testing.assert_array_equal(labels, store.labels(split))
        for layer in store.layers:
            np.testing.assert_array_equal(features[layer], store.read(split, layer))
