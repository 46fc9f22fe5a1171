"""The paper's other experiments, run small."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import engine

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_synthetic_image_folder_layout(tmp_path):
    root = engine.datasets.synthetic_image_folder(tmp_path, 25, classes=5, size=16)
    train = sorted((root / "train").rglob("*.png"))
    val = sorted((root / "val").rglob("*.png"))
    assert len(train) == 20 and len(val) == 5
    for split in ("train", "val"):  # every class in both splits
        assert sorted(p.name for p in (root / split).iterdir()) == [f"class00{c}"
                                                                    for c in range(5)]


def _imagenet(model: str, images: int, size: int, out) -> tuple[Path, pd.DataFrame]:
    """Run examples/imagenet.py on synthetic images; check it probed the 17 sites in order."""
    mod = _example("imagenet")
    sites = mod.EXPERIMENTS[model].sites
    assert len(sites) == 17
    page = mod.main(["--model", model, "--synthetic", str(images), "--image-size", str(size),
                     "--out", str(out), "--device", "cpu", "--quiet"])
    table = pd.read_csv(page.parent / "results.csv")
    assert list(table.layer.drop_duplicates()) == sites
    return page, table


def test_resnet50_on_synthetic_images_probes_its_17_sites(tmp_path):
    _, table = _imagenet("resnet50", 60, 64, tmp_path)
    assert set(table.split) == {"train", "valid"}
    dims = table.drop_duplicates("layer").dim.tolist()
    assert dims == [64] + [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3  # pooled channels


def test_inception_v3_probes_1000_fixed_random_features_at_its_17_sites(tmp_path):
    page, table = _imagenet("inception_v3", 40, 75, tmp_path)
    sites = table.layer.drop_duplicates().tolist()
    assert set(table.drop_duplicates("layer").dim) == {1000}
    store = engine.open_store(tmp_path / "store.zarr")
    for site in (sites[0], sites[-1]):  # a fixed, sorted, distinct subset of each site
        idx = store.reduction_indices(site)
        assert len(idx) == 1000 and (np.diff(idx) > 0).all()
    assert store.layer_info("avgpool")["reduction"] == "subsample:1000"
    assert store.dtype == "bfloat16"  # random-init activations outgrow float16
    assert "not fair between sites" in page.read_text()


def test_too_small_an_image_for_inception_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        _example("imagenet").main(["--model", "inception_v3", "--synthetic", "10",
                                   "--image-size", "64", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert "at least 75" in capsys.readouterr().err


def test_pathological_model_ignores_the_layers_its_skip_bypasses(tmp_path):
    """Section 5.1: after training, the probes at the end of the skipped half stay near
    chance while those at the end of the second half improve."""
    mod = _example("pathological")
    # two epochs at twice the example's learning rate: at its 0.01, how far the second half
    # gets in two epochs depends on the machine's arithmetic (0.18 to 0.25 below its initial
    # error); at 0.02 it is about 0.4 (benchmarks/RESULTS.md, "The pathological model")
    run = mod.main(["--epochs", "2", "--lr", "0.02", "--every", "64", "--probe-rows", "2000",
                    "--test-rows", "1000", "--l2", "1e-3", "--out", str(tmp_path), "--quiet"])
    s, chance = run["summary"], run["chance"]
    assert list(s) == ["init", "epoch-1", "epoch-2"]
    assert run["losses"][-1] < 2.0  # the model did learn (chance: ln 10 = 2.30)
    skipped, second = "skipped half, end", "second half, end"
    assert s["init"][skipped] > chance - 0.1 and s["init"][second] > chance - 0.1
    assert s["epoch-2"][skipped] > chance - 0.15  # stays near chance...
    assert s["epoch-2"][second] < s["init"][second] - 0.2  # ...while the second half learns
    assert s["epoch-2"][second] < s["epoch-2"][skipped] - 0.15
    table = pd.read_csv(tmp_path / "report" / "results.csv")
    assert {"layers.0", "layers.63", "layers.127", "logits"} <= set(table.layer)
    assert (tmp_path / "report" / "heatmap.png").exists()


def test_language_model_example_finds_the_open_bracket_after_training(tmp_path):
    """Per-token probes (rows="tokens") of a small GPT-2: which bracket is open is a fact
    about the prefix, not the word; the trained model's blocks hold it far better than its
    word embeddings, which cannot."""
    errors = _example("language_model").main(["--quick", "--out", str(tmp_path), "--quiet"])
    init, trained = errors["init"], errors["trained"]
    assert list(trained.index) == ["transformer.wte", *(f"transformer.h.{i}" for i in range(3))]
    # a word embedding is a function of the word alone, trained or not: the same error
    assert abs(trained["transformer.wte"] - init["transformer.wte"]) < 0.03
    assert trained["transformer.h.2"] < trained["transformer.wte"] - 0.15
    assert trained["transformer.h.2"] < init["transformer.h.2"] - 0.1
    store = engine.open_store(tmp_path / "trained.zarr")
    assert store.token_rows and store.verify().ok
