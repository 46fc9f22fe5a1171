"""Shared fixtures: small real data and models, built fresh per test where they are mutated."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import engine
from engine.datasets import ArrayDataset

#: per-row output shape of each site of engine.models.mnist_convnet() on 28x28 inputs
MNIST_SHAPES = {
    "input": (1, 28, 28),
    "conv1_preact": (32, 28, 28),
    "conv1_postact": (32, 28, 28),
    "conv1_postpool": (32, 14, 14),
    "conv2_preact": (64, 14, 14),
    "conv2_postact": (64, 14, 14),
    "conv2_postpool": (64, 7, 7),
    "flatten": (3136,),
    "fc1_preact": (512,),
    "fc1_postact": (512,),
    "logits": (10,),
}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fashion():
    """The first rows of real Fashion-MNIST: {"train": 600 rows, "test": 200 rows}."""
    train, test = engine.datasets.fashion_mnist("train"), engine.datasets.fashion_mnist("test")
    return {
        "train": train.subset(0, 600),
        "test": test.subset(0, 200),
    }


def random_images(n: int, shape=(3, 32, 32), classes: int = 4, seed: int = 0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    labels = rng.integers(0, classes, size=n)
    return ArrayDataset(images, labels, [f"c{i}" for i in range(classes)])


@pytest.fixture
def convnet():
    torch.manual_seed(0)
    return engine.models.mnist_convnet()


@pytest.fixture
def refits(monkeypatch) -> list[list[str]]:
    """The layers of every solver batch (``engine._fit.fit_layers``) from now on, one list per
    batch: what a resumed solve fits again."""
    from engine import _fit

    real_fit, calls = _fit.fit_layers, []

    def counting(data, layers, *args, **kwargs):
        calls.append(list(layers))
        return real_fit(data, layers, *args, **kwargs)

    monkeypatch.setattr(_fit, "fit_layers", counting)
    return calls
