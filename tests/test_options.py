"""engine.options: each option written once. The API's signatures, the stored configs and the
command line all list every option, with the same defaults; bad values fail by name."""

from __future__ import annotations

import inspect

import pytest

import engine
from engine import cli
from engine.options import CaptureOptions, SolveOptions, from_args

API = {"build": (engine.build_store, CaptureOptions), "solve": (engine.solve, SolveOptions)}


@pytest.mark.parametrize("command", sorted(API))
def test_the_api_takes_every_option_with_its_default(command):
    fn, cls = API[command]
    params = inspect.signature(fn).parameters
    defaults = cls.defaults()
    for name, default in defaults.items():
        assert name in params, f"{fn.__name__}() lacks the option {name!r}"
        assert params[name].default == default, name
    others = [p for p in params if p not in defaults]
    assert sorted(others) == sorted(cli.API_FLAGS[command]), (
        "every argument that is not an option has a flag or a reason in cli.API_FLAGS")


@pytest.mark.parametrize("command", sorted(API))
def test_the_command_line_has_a_flag_for_every_option(command):
    _, cls = API[command]
    sub = cli.parser()._subparsers._group_actions[0].choices[command]
    dests = {a.dest for a in sub._actions}
    assert {f.name for f in cls.flat_fields()} <= dests
    for flag in filter(None, cli.API_FLAGS[command].values()):
        for part in flag.split(" / "):
            if part.startswith("--"):
                assert any(part in a.option_strings for a in sub._actions), part


def test_flags_reach_the_api_as_options():
    args = cli.parser().parse_args([
        "solve", "s.zarr", "--solver", "sgd", "--batch-size", "64", "--seed", "3",
        "--no-early-stopping", "--l2", "1e-4", "1e-3", "--epochs", "4", "--run", "r"])
    kwargs = from_args(SolveOptions, args, args.parser)
    assert kwargs == {"solver": "sgd", "batch_size": 64, "seed": 3, "early_stopping": False,
                      "l2": [1e-4, 1e-3], "epochs": 4, "run": "r"}
    options = SolveOptions.from_kwargs(**kwargs)
    assert options.sgd.batch_size == 64 and options.sgd.seed == 3
    assert options.grid == (1e-4, 1e-3) and not options.sgd.early_stopping
    args = cli.parser().parse_args([
        "build", "s.zarr", "--reduce", "conv*=pool", "fc=none", "--valid-size", "0.2",
        "--block-bytes", "8M", "--nan-policy", "ignore", "--label-classes", "12"])
    kwargs = from_args(CaptureOptions, args, args.parser)
    assert kwargs == {"reduce": {"conv*": "pool", "fc": "none"}, "valid_size": 0.2,
                      "block_bytes": 8 << 20, "nan_policy": "ignore", "num_classes": 12}
    assert CaptureOptions.from_kwargs(**kwargs).block_bytes == 8 << 20
    args = cli.parser().parse_args([
        "build", "s.zarr", "--select", "encoder.layer.*=0", "pooler=pooler_output",
        "--rows", "tokens", "--reduce", "tokens:cls"])
    kwargs = from_args(CaptureOptions, args, args.parser)
    assert kwargs == {"select": {"encoder.layer.*": 0, "pooler": "pooler_output"},
                      "rows": "tokens", "reduce": "tokens:cls"}


@pytest.mark.parametrize(("argv", "words"), [
    (["solve", "s.zarr", "--l2", "auto", "1e-3"], "give 'auto' alone"),
    (["solve", "s.zarr", "--l2", "much"], "numbers such as 1e-4"),
    (["build", "s.zarr", "--reduce", "pool", "fc=none"], "LAYER=SPEC pairs only"),
    (["build", "s.zarr", "--block-bytes", "lots"], "64M"),
    (["build", "s.zarr", "--select", "blk"], "LAYER=INDEX or LAYER=KEY pairs"),
    (["build", "s.zarr", "--rows", "words"], "invalid choice: 'words'"),
    (["solve", "s.zarr", "--epochs", "0"], "at least 1"),
])
def test_malformed_flags_are_usage_errors(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert words in capsys.readouterr().err


def test_options_check_every_value_by_name():
    for cls, kwargs, words in [
        (SolveOptions, {"solver": "newton"}, "solver must be 'lbfgs', 'sgd' or 'ridge'"),
        (SolveOptions, {"max_iter": 0}, "max_iter must be an integer of at least 1"),
        (SolveOptions, {"tol": -1.0}, "tol must be a number above 0"),
        (SolveOptions, {"lr": float("nan")}, "lr must be a number above 0"),
        (SolveOptions, {"patience": 1.5}, "patience must be an integer"),
        (SolveOptions, {"dtype": "float16"}, "dtype must be one of"),
        (SolveOptions, {"l2": -1.0}, "l2 values must be finite and >= 0"),
        (SolveOptions, {"run": "../x"}, "run name"),
        (SolveOptions, {"solver": "lbfgs", "dtype": "bfloat16"}, "for solver='sgd'"),
        (SolveOptions, {"max_iters": 3}, "unknown option(s) ['max_iters']"),
        (CaptureOptions, {"sites": ("middle",)}, "sites must be some of"),
        (CaptureOptions, {"valid_size": 1.5}, "fraction in (0, 1)"),
        (CaptureOptions, {"compressor": "gzip"}, "compressor must be one of"),
        (CaptureOptions, {"autocast": "int8"}, "autocast must be None, 'bfloat16'"),
        (CaptureOptions, {"channels_last": "yes"}, "channels_last must be True or False"),
        (SolveOptions, {"allow_partial": None}, "allow_partial must be True or False"),
    ]:
        with pytest.raises(engine.InvalidArgumentError, match=words.replace("(", r"\(")
                           .replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
            cls.from_kwargs(**kwargs)
    with pytest.raises(engine.ReductionError, match="unknown reduction 'mean'"):
        CaptureOptions(reduce="mean")


def test_options_round_trip_and_record_their_config():
    options = SolveOptions.from_kwargs(solver="sgd", l2=[1e-2, 1e-4, 1e-2], epochs=3)
    assert options.grid == (1e-4, 1e-2)  # sorted, distinct
    assert SolveOptions.from_kwargs(**options.to_kwargs()) == options
    assert options.replace(run="other").run == "other"
    config = options.config(num_classes=10)
    assert config == {"solver": "sgd", "l2": [1e-4, 1e-2], "label": "y", "dtype": "float32",
                      "num_classes": 10, "allow_partial": False, "epochs": 3, "patience": 5,
                      "lr": 1e-2, "batch_size": 256, "seed": 0, "early_stopping": True}
    assert set(SolveOptions().config(3)) >= {"max_iter", "tol", "preconditioner"}
    capture = CaptureOptions(sites="input", batch_size=32)
    stored = capture.store_config(batch_size=32, block_rows=64, labels=["y", "coarse"])
    assert stored.sites == ("input",) and stored.block_rows == 64
    assert stored.labels == ("y", "coarse") and stored.to_json()["sites"] == ["input"]
