"""The probe-engine command line, run in-process through engine.cli.main."""

from __future__ import annotations

import html
import shlex

import numpy as np
import pytest
import torch

import engine
from engine import cli


def test_build_info_verify(tmp_path, capsys):
    path = tmp_path / "s.zarr"
    rc = cli.main(["build", str(path), "--model", "mnist_convnet", "--data", "fashion-mnist",
                   "--limit", "300", "--layers", "conv2_postpool", "logits", "--quiet",
                   "--reduce", "conv2_postpool=pool", "--dtype", "float32"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "conv2_postpool" in out and "complete" in out
    store = engine.open_store(path)
    assert store.layer_info("conv2_postpool")["reduction"] == "pool"
    assert store.rows("train") + store.rows("valid") == 300 and store.rows("test") == 300
    assert store.num_classes() == 10

    assert cli.main(["info", str(path)]) == 0
    assert "logits" in capsys.readouterr().out
    assert cli.main(["verify", str(path)]) == 0
    assert "0 problem(s)" in capsys.readouterr().out

    chunk = path / "test" / "features" / "logits" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-7])  # truncated
    assert cli.main(["verify", str(path)]) == 1
    assert "test/features/logits/c/0/0: chunk is corrupted" in capsys.readouterr().out

    before = store.read("train", "logits")
    assert cli.main(["build", str(path), "--model", "mnist_convnet", "--data", "fashion-mnist",
                     "--limit", "300", "--layers", "conv2_postpool", "logits", "--quiet",
                     "--reduce", "conv2_postpool=pool", "--dtype", "float32", "--repair"]) == 0
    assert cli.main(["verify", str(path)]) == 0
    np.testing.assert_array_equal(engine.open_store(path).read("train", "logits"), before)


def test_weights_are_loaded_safely(tmp_path, capsys):
    torch.manual_seed(5)
    model = engine.models.mnist_convnet()
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    path = tmp_path / "s.zarr"
    assert cli.main(["build", str(path), "--weights", str(weights), "--limit", "64",
                     "--layers", "logits", "--quiet"]) == 0
    fingerprint = engine._fingerprint.model_fingerprint(model)
    assert engine.open_store(path).meta.model.digest == fingerprint["digest"]

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    capsys.readouterr()
    rc = cli.main(["build", str(tmp_path / "e.zarr"), "--weights", str(tmp_path / "evil.pt"),
                   "--limit", "64", "--quiet"])
    out = capsys.readouterr()
    assert rc == 1 and "weights_only=True" in out.err and "refused" in out.err
    assert "pwned" not in out.out
    assert not (tmp_path / "e.zarr").exists()


def test_errors_are_one_line_and_exit_1_usage_errors_2(tmp_path, capsys):
    rc = cli.main(["build", str(tmp_path / "s.zarr"), "--limit", "64", "--layers", "conv9",
                   "--quiet"])
    assert rc == 1
    err = capsys.readouterr().err
    assert err.startswith("probe-engine: error: no module named 'conv9'")
    assert len(err.strip().splitlines()) == 1
    assert cli.main(["info", str(tmp_path / "nothing.zarr")]) == 1
    assert "not a probe-engine store" in capsys.readouterr().err
    with pytest.raises(engine.ProbeEngineError, match="not a probe-engine store"):
        cli.main(["--debug", "info", str(tmp_path / "nothing.zarr")])  # the traceback
    with pytest.raises(SystemExit) as usage:
        cli.main(["solve"])  # no PATH
    assert usage.value.code == 2


@pytest.mark.slow
def test_demo_vit_quick(tmp_path, capsys):
    """The ViT demo: every block by its class token and by its mean, in one report."""
    out = tmp_path / "vit"
    assert cli.main(["demo", "--vit", "--quick", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert f"report: {out / 'report' / 'index.html'}" in text
    assert "CLS token:" in text and "mean of tokens:" in text
    cls = engine.load_results(out / "cls.zarr", run="demo").error("test")
    mean = engine.load_results(out / "mean.zarr", run="demo").error("test")
    blocks = [f"encoder.layers.encoder_layer_{i}" for i in range(4)]
    assert list(cls.index) == list(mean.index) == [*blocks, "encoder.ln"]
    assert [layer.reduction for layer in engine.open_store(out / "cls.zarr").meta.layers] == [
        "tokens:cls"] * 5
    # sane numbers (chance: 0.9), and the class token, trained to gather the image, says more
    # at the last block than at the first
    assert (cls < 0.35).all() and (mean < 0.35).all()
    assert cls[blocks[-1]] < cls[blocks[0]] - 0.03


def test_demo_quick(tmp_path, capsys):
    import pandas as pd

    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert f"report: {out / 'report' / 'index.html'}" in text
    assert "init:" in text and "trained:" in text and "conv2_postpool" in text
    for state in ("init", "trained"):
        assert engine.open_store(out / f"{state}.zarr").complete
    trained = engine.load_results(out / "trained.zarr", run="demo").error("test")
    init = engine.load_results(out / "init.zarr", run="demo").error("test")
    assert list(trained.index) == list(init.index) and len(trained) == 10
    # sane numbers: training made the top of the network far better than the pixels
    assert trained["logits"] < trained["input"] - 0.03
    assert trained["input"] < 0.35 and 0 < trained["logits"]
    assert init["input"] == pytest.approx(trained["input"], abs=0.03)  # same pixels
    page = html.unescape((out / "report" / "index.html").read_text())
    assert "the paper's finding" in page and "data:image/png;base64," in page
    # the baselines (docs/reproducing.md, "Reading the baselines") for both states
    tables = {state: pd.read_csv(out / "report" / "results.csv").query("state == @state")
              .query("split == 'test'").set_index("layer") for state in ("init", "trained")}
    for state, t in tables.items():
        for col in ("control_top1_error", "selectivity", "codelength", "compression",
                    "top1_error_low", "top1_error_high"):
            assert t[col].notna().all(), (state, col)
        assert (t.control_top1_error > 0.8).all()  # chance: an unseen item's random class
    for head in ("test selectivity", "codelength (bits)", "compression", "test low"):
        assert page.count(f"<th>{head}</th>") == 2, head  # in both states' tables
    assert page.count("<th>gain</th>") == 1  # the trained one, against init
    init_t, trained_t = tables["init"], tables["trained"]
    np.testing.assert_allclose(trained_t.gain, init_t.top1_error - trained_t.top1_error)
    assert trained_t.gain["logits"] > 0.1  # training made the logits readable
    # the trained logits carry the labels in fewer bits than the pixels, and far fewer than
    # the random network's logits; their accuracy is not memorisation (quick run: 4.7x
    # against 3.2x and 1.4x; selectivity 0.78 against 0.43 at init)
    assert trained_t.compression["logits"] > 1.2 * trained_t.compression["input"]
    assert trained_t.compression["logits"] > 2 * init_t.compression["logits"]
    assert trained_t.selectivity["logits"] > init_t.selectivity["logits"] + 0.2
    assert "Beyond memorisation: after training, the selectivity" in page


def test_the_full_demo_merges_its_lbfgs_baselines_into_the_sgd_probes():
    """The full demo's table: the paper's SGD probes, beside them the control error,
    selectivity and codelength of the L-BFGS "baselines" run of the same features."""
    from engine.demo import BASELINE_COLUMNS, BASELINES, PROBE, with_baselines

    rng = np.random.default_rng(0)
    y = rng.permutation(np.arange(400) % 4)
    feats = {f"l{k}": (rng.normal(size=(4, 8))[y] * k + rng.normal(size=(400, 8))).astype(
        np.float32) for k in range(3)}
    split = {"train": slice(0, 250), "valid": slice(250, 320), "test": slice(320, 400)}
    data = {s: {k: v[i] for k, v in feats.items()} for s, i in split.items()}
    labels = {s: y[i] for s, i in split.items()}
    sgd = engine.solve(data, labels=labels, progress=False, device="cpu",
                       **{**PROBE["full"], "epochs": 2})
    baselines = engine.solve(data, labels=labels, progress=False, device="cpu",
                             **PROBE["quick"], **BASELINES)
    merged = with_baselines(sgd, baselines)
    assert list(merged.table.columns) == [*sgd.table.columns, *BASELINE_COLUMNS]
    assert merged.table[sgd.table.columns].equals(sgd.table)  # the probes' own figures
    theirs = baselines.table.set_index(["layer", "split"])[BASELINE_COLUMNS]
    mine = merged.table.set_index(["layer", "split"])[BASELINE_COLUMNS]
    assert mine.equals(theirs.loc[mine.index])
    assert merged.resampled is sgd.resampled and merged.config["solver"] == "sgd"


def test_the_full_demo_fits_its_baselines_on_the_first_train_rows(tmp_path):
    from torch import nn
    from torch.utils.data import TensorDataset

    from engine.demo import baseline_source

    x = torch.arange(120 * 3, dtype=torch.float32).view(120, 3)
    y = torch.arange(120) % 3
    data = {"train": TensorDataset(x[:90], y[:90]), "test": TensorDataset(x[90:], y[90:])}
    store = engine.build_store(nn.Sequential(nn.Identity()), data, tmp_path / "s.zarr",
                               layers=["0"], reduce="none", dtype="float32", valid_size=20,
                               progress=False)
    features, labels = baseline_source(store, 25)
    assert {s: len(v) for s, v in labels.items()} == {"train": 25, "valid": 20, "test": 30}
    for split in store.splits:
        n = len(labels[split])
        np.testing.assert_array_equal(features[split]["0"], store.read(split, "0")[:n])
        np.testing.assert_array_equal(labels[split], store.labels(split)[:n])
    assert len(baseline_source(store, 10_000)[1]["train"]) == 70  # no more than train has


def test_imagefolder_data(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c in ("cat", "dog"):
            d = tmp_path / "img" / split / c
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((40, 40, 3), 40 * i, np.uint8)).save(d / f"{i}.png")
    data = cli.load_data(f"imagefolder:{tmp_path / 'img'}", size=32)
    assert set(data) == {"train", "valid"}
    x, y = data["valid"][4]
    assert x.shape == (3, 32, 32) and y == 1


def test_solve_prints_the_table_and_saves_probes(tmp_path, capsys):
    path = tmp_path / "s.zarr"
    assert cli.main(["build", str(path), "--limit", "400", "--layers", "conv2_postpool",
                     "logits", "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["solve", str(path), "--l2", "1e-3", "--quiet", "--run", "r1"]) == 0
    out = capsys.readouterr().out
    assert "top1_error" in out and "conv2_postpool" in out and "probes/r1" in out
    assert "(cpu, torch loss kernel, float32 GEMMs)" in out
    results = engine.open_store(path).results("r1")
    assert set(results.table.layer) == {"conv2_postpool", "logits"}
    assert cli.main(["solve", str(path), "--solver", "sgd", "--epochs", "2", "--quiet",
                     "--run", "r2", "--l2", "1e-3"]) == 0
    assert engine.open_store(path).results("r2").config["solver"] == "sgd"


def test_build_and_solve_on_a_local_dask_cluster(tmp_path, capsys):
    path = tmp_path / "s.zarr"
    assert cli.main(["build", str(path), "--limit", "300", "--layers", "fc1_postact", "logits",
                     "--quiet", "--workers", "2"]) == 0
    single = tmp_path / "one.zarr"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each one-thread worker: the same bits (docs/scaling.md)
    try:
        assert cli.main(["build", str(single), "--limit", "300", "--layers", "fc1_postact",
                         "logits", "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    for split in ("train", "valid", "test"):
        np.testing.assert_array_equal(engine.open_store(path).read(split, "logits"),
                                      engine.open_store(single).read(split, "logits"))
    capsys.readouterr()
    assert cli.main(["solve", str(path), "--l2", "1e-3", "--quiet", "--workers", "2"]) == 0
    assert "fc1_postact" in capsys.readouterr().out
    assert set(engine.open_store(path).results().table.layer) == {"fc1_postact", "logits"}


def test_workers_and_scheduler_exclude_each_other(tmp_path, capsys):
    with pytest.raises(SystemExit) as usage:
        cli.main(["solve", str(tmp_path / "s.zarr"), "--workers", "2", "--scheduler",
                  "tcp://127.0.0.1:8786"])
    assert usage.value.code == 2
    assert "not allowed with argument --workers" in capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(cli.EXAMPLES))
def test_help_examples_parse(command, capsys):
    """Every example in ``--help`` is a valid command line of that subcommand."""
    lines = "\n".join(cli.EXAMPLES[command]).replace("\\\n", " ").splitlines()
    for line in lines:
        argv = shlex.split(line.split("  #")[0].split(" && ")[0])
        assert argv[:2] == ["probe-engine", command], line
        args = cli.parser().parse_args(argv[1:])
        assert args.func is not None
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    assert "examples:\n  probe-engine " + command in capsys.readouterr().out


def test_export_writes_weights_and_tables(tmp_path, capsys):
    import pandas as pd
    from torch import nn
    from torch.utils.data import TensorDataset

    rng = np.random.default_rng(0)

    def split(n: int) -> TensorDataset:
        y = rng.integers(0, 3, n)
        x = (rng.normal(size=(n, 6)) + y[:, None]).astype(np.float32)
        return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))

    torch.manual_seed(0)
    path = tmp_path / "s.zarr"
    engine.build_store(nn.Sequential(nn.Linear(6, 5), nn.Tanh()),
                       {"train": split(60), "valid": split(30)}, path, layers=["0", "1"],
                       reduce="none", dtype="float32", progress=False)
    engine.solve(path, l2=[1e-3, 1e-2], run="r", progress=False, device="cpu")
    out = tmp_path / "out"
    out.mkdir()
    capsys.readouterr()
    assert cli.main(["export", str(path), "--run", "r", "--weights", str(out / "w.safetensors"),
                     "--table", str(out / "t.parquet"), "--grid", str(out / "g.parquet")]) == 0
    text = capsys.readouterr().out
    assert f"weights: {out / 'w.safetensors'} (2 layers" in text
    assert f"table: {out / 't.parquet'} (4 rows" in text and "grid: " in text
    results = engine.load_results(path, "r")
    weights = engine.ProbeResults.load_weights(out / "w.safetensors")
    assert list(weights) == ["0", "1"]
    for layer, (w, b) in results.weights.items():
        np.testing.assert_array_equal(weights[layer][0], w, strict=True)
        np.testing.assert_array_equal(weights[layer][1], b, strict=True)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "t.parquet"), results.table)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "g.parquet"), results.grid)

    assert cli.main(["export", str(path), "--run", "r", "--weights", str(out / "w.npz")]) == 0
    assert list(engine.ProbeResults.load_weights(out / "w.npz")) == ["0", "1"]

    capsys.readouterr()  # a bad suffix: one line naming the file, before the store is read
    assert cli.main(["export", str(path), "--run", "nope", "--weights", str(out / "w.pt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"probe-engine: error: {out / 'w.pt'}: cannot tell") and "*.npz" in err
    assert cli.main(["export", str(path), "--run", "nope", "--table", str(out / "x.parquet")]) == 1
    assert "no run 'nope'" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["g.parquet", "t.parquet", "w.npz",
                                                     "w.safetensors"]
    with pytest.raises(SystemExit) as usage:
        cli.main(["export", str(path)])  # nothing to write
    assert usage.value.code == 2
    assert "give --weights, --table or --grid" in capsys.readouterr().err
