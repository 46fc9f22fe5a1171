"""The paper's other experiments, run small."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd

import engine

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
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


def test_resnet50_on_synthetic_images_probes_its_17_sites(tmp_path):
    mod = _example("resnet50")
    assert len(mod.SITES) == 17
    page = mod.main(["--synthetic", "60", "--image-size", "64", "--out", str(tmp_path),
                     "--device", "cpu", "--quiet"])
    table = pd.read_csv(page.parent / "results.csv")
    assert list(table.layer.drop_duplicates()) == mod.SITES
    assert set(table.split) == {"train", "valid"}
    dims = table.drop_duplicates("layer").dim.tolist()
    assert dims == [64] + [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3  # pooled channels
