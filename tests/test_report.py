"""engine.report: the monotonicity summary, and the report's files (valid PNGs, a
self-contained page, CSV and JSON that hold every number)."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import engine
from engine import cli
from engine.report import monotonicity, report


def test_monotonicity_counts_the_rises_along_the_depth():
    errs = pd.Series([0.9, 0.5, 0.6, 0.3, 0.3], index=["in", "a", "b", "c", "d"])
    m = monotonicity(errs)
    assert m["steps"] == 4 and m["increases"] == 1 and not m["monotone"]
    assert m["bumps"] == [{"site": "b", "rise": pytest.approx(0.1)}]
    assert -1 < m["spearman"] < -0.5
    falling = monotonicity(pd.Series([0.8, 0.4, 0.2], index=["x", "y", "z"]))
    assert falling["monotone"] and falling["spearman"] == pytest.approx(-1.0)
    assert monotonicity(pd.Series([0.5], index=["only"]))["steps"] == 0


def _results(seed: int, layers=("input", "mid", "top")) -> engine.ProbeResults:
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(300) % 3)
    feats = {layer: (rng.normal(size=(3, 6))[y] * (k + 1) + rng.normal(size=(300, 6)))
             .astype(np.float32) for k, layer in enumerate(layers)}
    split = {"train": slice(0, 200), "valid": slice(200, 250), "test": slice(250, 300)}
    return engine.solve({s: {k: v[i] for k, v in feats.items()} for s, i in split.items()},
                        labels={s: y[i] for s, i in split.items()}, l2=1e-3, progress=False,
                        device="cpu")


def _png_size(path):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.format, im.size


def test_two_states_make_the_figure_tables_and_a_self_contained_page(tmp_path):
    states = {"init": _results(0), "trained": _results(1)}
    page = report(states, tmp_path / "rep", title="t", notes=["a note"])
    assert page == tmp_path / "rep" / "index.html"
    fmt, (w, h) = _png_size(tmp_path / "rep" / "errors.png")
    assert fmt == "PNG" and 600 <= w <= 2000 and 500 <= h <= 2000  # two panels, stacked
    assert not (tmp_path / "rep" / "heatmap.png").exists()  # only for sweeps
    text = page.read_text()
    assert text.count("data:image/png;base64,") == 1 and "a note" in text
    assert "src='http" not in text and "href=" not in text  # opens offline
    table = pd.read_csv(tmp_path / "rep" / "results.csv")
    assert len(table) == 2 * 3 * 3 and list(table.state.unique()) == ["init", "trained"]
    np.testing.assert_allclose(
        table[(table.state == "trained") & (table.split == "test")].top1_error,
        states["trained"].error("test").to_numpy())
    data = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert set(data["monotonicity"]) == {"init", "trained"}
    assert data["monotonicity"]["init"]["split"] == "test"
    assert data["states"]["trained"]["backends"]["top"]["kernel"] == "torch"


def test_a_sweep_adds_the_heatmap(tmp_path):
    steps = {f"step {k}": _results(k) for k in range(4)}
    report(steps, tmp_path)
    fmt, (w, h) = _png_size(tmp_path / "heatmap.png")
    assert fmt == "PNG" and w >= 400 and h >= 250
    assert "heatmap" in (tmp_path / "index.html").read_text()


def test_a_deep_sweep_keeps_its_figures_readable(tmp_path):
    """129 sites (the pathological model): figures keep a sane size, every k-th site named."""
    layers = [f"layers.{k}" for k in range(128)] + ["logits"]
    report({f"epoch {k}": _results(k, layers) for k in range(3)}, tmp_path)
    for name in ("errors.png", "heatmap.png"):
        fmt, (w, h) = _png_size(tmp_path / name)
        assert fmt == "PNG" and w <= 2500 and h <= 5000, (name, w, h)
    idx, labels = importlib.import_module("engine.report").site_ticks(layers)
    assert len(labels) <= 40 and labels[0] == "layers.0" and idx == sorted(idx)


def test_one_result_and_bad_input(tmp_path):
    page = report(_results(2), tmp_path / "one")
    assert "probes" in pd.read_csv(tmp_path / "one" / "results.csv").state.unique()
    assert page.exists()
    with pytest.raises(engine.InvalidArgumentError, match="ProbeResults"):
        report({}, tmp_path / "none")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(engine.ReportError, match=f"cannot write the report into {blocker}"):
        report(_results(2), blocker)


def test_the_report_command_reads_solved_stores(tmp_path, capsys):
    for name in ("a", "b"):
        assert cli.main(["build", str(tmp_path / f"{name}.zarr"), "--limit", "300",
                         "--layers", "fc1_postact", "logits", "--quiet", "--seed",
                         str(ord(name))]) == 0
        assert cli.main(["solve", str(tmp_path / f"{name}.zarr"), "--l2", "1e-3",
                         "--quiet"]) == 0
    capsys.readouterr()
    out = tmp_path / "rep"
    assert cli.main(["report", str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr"), "--out",
                     str(out)]) == 0
    assert f"report: {out / 'index.html'}" in capsys.readouterr().out
    assert list(pd.read_csv(out / "results.csv").state.unique()) == ["a", "b"]
    assert cli.main(["report", str(tmp_path / "a.zarr"), "--run", "nope", "--out",
                     str(out)]) == 1
    assert "no run 'nope'" in capsys.readouterr().err
