"""engine.sweep: one store and one solve per checkpoint, same split and reductions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import engine


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))


def test_checkpoints_give_one_result_each_with_the_same_rows(tmp_path, fashion):
    torch.manual_seed(0)
    model = mlp()
    checkpoints = {"step 0": {k: v.clone() for k, v in model.state_dict().items()}}
    engine.models.train(model, fashion["train"], epochs=1, progress=False)
    torch.save(model.state_dict(), tmp_path / "step1.pt")
    checkpoints["step 1"] = tmp_path / "step1.pt"  # a file, read with weights_only=True
    checkpoints["final"] = model
    res = engine.sweep(mlp, checkpoints, fashion, tmp_path / "sw", layers=["2"],
                       solve_kwargs=dict(l2=1e-3, device="cpu"), progress=False)
    assert list(res) == ["step 0", "step 1", "final"]
    stores = [engine.open_store(tmp_path / "sw" / f"{n}.zarr") for n in res]
    for s in stores[1:]:
        np.testing.assert_array_equal(s.index("valid"), stores[0].index("valid"))
    # trained weights are the same model: the same probe; the untrained one differs
    assert res["step 1"].error("test")["2"] == res["final"].error("test")["2"]
    assert res["step 1"].error("train")["2"] != res["step 0"].error("train")["2"]
    page = engine.report(res, tmp_path / "rep")
    assert (tmp_path / "rep" / "heatmap.png").exists() and page.exists()


def test_a_sweep_needs_one_architecture(tmp_path, fashion):
    torch.manual_seed(0)
    other = nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.ReLU(), nn.Linear(8, 10))
    with pytest.raises(engine.StoreMismatchError, match="one architecture"):
        engine.sweep(mlp, {"a": mlp(), "b": other}, fashion, tmp_path, layers=["2"],
                     solve_kwargs=dict(l2=1e-3, device="cpu"), progress=False)
    with pytest.raises(engine.InvalidArgumentError, match="state_dict"):
        engine.sweep(mlp, {"c": 3}, fashion, tmp_path, layers=["2"], progress=False)
