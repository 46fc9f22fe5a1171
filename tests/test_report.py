"""engine.report: the monotonicity summary, and the report's files (valid PNGs, a
self-contained page, CSV and JSON that hold every number)."""

from __future__ import annotations

import importlib
import json
from html.parser import HTMLParser

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


def _results(seed: int, layers=("input", "mid", "top"), **solve) -> engine.ProbeResults:
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(300) % 3)
    feats = {layer: (rng.normal(size=(3, 6))[y] * (k + 1) + rng.normal(size=(300, 6)))
             .astype(np.float32) for k, layer in enumerate(layers)}
    split = {"train": slice(0, 200), "valid": slice(200, 250), "test": slice(250, 300)}
    return engine.solve({s: {k: v[i] for k, v in feats.items()} for s, i in split.items()},
                        labels={s: y[i] for s, i in split.items()}, l2=1e-3, progress=False,
                        device="cpu", **solve)


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


# -- the baselines (controls, MDL, intervals, baseline=) -----------------------------------

class _Tables(HTMLParser):
    """The page's tables as lists of rows of cell texts, the header row first."""

    def __init__(self, page: str):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _html_tables(page) -> list[pd.DataFrame]:
    """One frame per state's table, in page order, cells as strings, indexed by layer."""
    return [pd.DataFrame(rows[1:], columns=rows[0]).set_index("layer")
            for rows in _Tables(page.read_text()).tables]


def test_controls_mdl_and_intervals_go_into_every_file(tmp_path):
    plain, full = _results(3), _results(3, controls=["control"], mdl=True)
    report({"plain": plain, "baselines": full}, tmp_path)
    table = pd.read_csv(tmp_path / "results.csv")
    mine = table[table.state == "baselines"].reset_index(drop=True)
    for col in ("control_top1_error", "selectivity", "codelength", "uniform_codelength",
                "compression", "top1_error_low", "top1_error_high", "balanced_accuracy"):
        np.testing.assert_allclose(mine[col], full.table[col], rtol=1e-12, err_msg=col)
    assert table[table.state == "plain"].selectivity.isna().all()  # the other state's: none
    data = json.loads((tmp_path / "results.json").read_text())
    rows = data["states"]["baselines"]["table"]
    assert rows[-1]["layer"] == "top" and rows[-1]["split"] == "test"
    assert rows[-1]["codelength"] == pytest.approx(full.table.codelength.iloc[-1])
    assert "selectivity" not in data["states"]["plain"]["table"][0]
    plain_t, full_t = _html_tables(tmp_path / "index.html")
    for col in ("test low", "test high", "test balanced acc."):
        assert col in plain_t and col in full_t  # every solve has intervals
    for col in ("test selectivity", "test control error", "codelength (bits)",
                "compression"):
        assert col in full_t and col not in plain_t
    test = full.table[full.table.split == "test"].set_index("layer")
    assert full_t.loc["top", "test selectivity"] == f"{test.selectivity['top']:.4f}"
    assert full_t.loc["mid", "compression"] == f"{test.compression['mid']:.4f}"
    assert full_t.loc["input", "test high"] == f"{test.top1_error_high['input']:.4f}"
    assert "gain" not in full_t and "gain" not in table


def test_a_state_as_the_baseline_adds_its_error_and_the_gain(tmp_path):
    states = {"init": _results(4), "trained": _results(5)}
    report(states, tmp_path, baseline="init")
    table = pd.read_csv(tmp_path / "results.csv")
    init, trained = (table[table.state == s].reset_index(drop=True) for s in states)
    np.testing.assert_allclose(trained.baseline_top1_error, init.top1_error)
    np.testing.assert_allclose(trained.gain, init.top1_error - trained.top1_error)
    assert init.gain.isna().all() and init.baseline_top1_error.isna().all()
    assert trained.gain.abs().max() > 0  # not trivially zero
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["baseline"] == "init"
    assert data["states"]["trained"]["table"][0]["gain"] == pytest.approx(trained.gain[0])
    init_t, trained_t = _html_tables(tmp_path / "index.html")
    assert "gain" not in init_t and "test baseline error" not in init_t
    err = {s: r.error("test") for s, r in states.items()}
    for layer in ("input", "mid", "top"):
        assert trained_t.loc[layer, "test baseline error"] == f"{err['init'][layer]:.4f}"
        assert trained_t.loc[layer, "gain"] == (
            f"{err['init'][layer] - err['trained'][layer]:.4f}")

    # a ProbeResults of its own: every state is compared with it
    report(states, tmp_path / "other", baseline=_results(6))
    table = pd.read_csv(tmp_path / "other" / "results.csv")
    reference = _results(6).table.top1_error.to_numpy()
    for state in states:
        mine = table[table.state == state].reset_index(drop=True)
        np.testing.assert_allclose(mine.baseline_top1_error, reference)
        np.testing.assert_allclose(mine.gain, reference - mine.top1_error)
    assert all("gain" in t for t in _html_tables(tmp_path / "other" / "index.html"))

    with pytest.raises(engine.InvalidArgumentError, match=r"'random' is not one of the "
                       r"states \['init', 'trained'\]"):
        report(states, tmp_path / "bad", baseline="random")
    with pytest.raises(engine.InvalidArgumentError, match="not dict"):
        report(states, tmp_path / "bad", baseline={"init": states["init"]})


def _bumpy() -> engine.ProbeResults:
    """Four sites whose test errors are set by construction: each site's features are the
    one-hot code of a class, the true one on every train and valid row and on the test rows
    but a chosen few, so that its probe predicts that class. ``copy`` misses one test row
    more than ``input`` (a rise of 1/150: noise), ``noise`` 60 in all (a real bump)."""
    rng = np.random.default_rng(0)
    n_train, n_valid, n_test = 150, 60, 150
    y = rng.permutation(np.arange(n_train + n_valid + n_test) % 3)
    test = np.arange(n_train + n_valid, len(y))
    wrong = {"input": test[:10], "copy": test[10:21], "noise": test[:60], "top": test[:0]}
    feats = {}
    for layer, rows in wrong.items():
        shown = y.copy()
        shown[rows] = (y[rows] + 1) % 3
        feats[layer] = (4 * np.eye(3)[shown] + 0.05 * rng.normal(size=(len(y), 3))).astype(
            np.float32)
    split = {"train": slice(0, n_train), "valid": slice(n_train, n_train + n_valid),
             "test": slice(n_train + n_valid, None)}
    return engine.solve({s: {k: v[i] for k, v in feats.items()} for s, i in split.items()},
                        labels={s: y[i] for s, i in split.items()}, l2=1e-3, progress=False,
                        device="cpu")


def test_a_bump_within_the_noise_is_marked_not_significant(tmp_path):
    res = _bumpy()
    np.testing.assert_allclose(res.error("test"), [10 / 150, 11 / 150, 60 / 150, 0])
    report(res, tmp_path)
    mono = json.loads((tmp_path / "results.json").read_text())["monotonicity"]["probes"]
    assert mono["split"] == "test" and mono["increases"] == 2
    small, big = mono["bumps"]
    assert small["site"] == "copy" and small["rise"] == pytest.approx(1 / 150)
    assert small["low"] < 0 < small["high"] and not small["significant"]
    assert small["p"] > 0.2
    assert big["site"] == "noise" and big["rise"] == pytest.approx(49 / 150)
    assert 0 < big["low"] < big["rise"] < big["high"] and big["significant"]
    assert big["p"] < 0.01
    sig = res.significance("test").set_index("next")
    assert (small["low"], small["high"]) == (sig.low["copy"], sig.high["copy"])
    text = (tmp_path / "index.html").read_text()
    assert ", not significant)" in text
    assert text.count("not significant") == 1  # the big bump is not marked
    assert f"noise (+0.327, 95% interval {big['low']:+.3f} to {big['high']:+.3f})" in text


def test_the_figure_draws_the_bands_and_the_control_task(tmp_path):
    res = _results(7, controls=["control"], mdl=True)
    report({"init": _results(8), "trained": res}, tmp_path)
    path = tmp_path / "errors.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fmt, (w, h) = _png_size(path)
    assert fmt == "PNG" and w >= 600 and h >= 500
    # the y-axis reaches the control task's error (chance, above the probes'), so the
    # control's line is on the figure: the same axis as the bands' highest end
    from engine.report import highest_error

    t = res.table
    assert highest_error(t) == pytest.approx(max(t.control_top1_error[t.split == "test"].max(),
                                            t.top1_error_high.max(), t.top1_error.max()))
    assert highest_error(t) > t.top1_error.max() + 0.2
