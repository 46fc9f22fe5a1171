"""The ``probe-engine`` command line: build, solve, info, verify, report, export, demo."""

from __future__ import annotations

import argparse
import contextlib
import pickle
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

from . import datasets, models
from .build import build_store
from .errors import InvalidArgumentError, ProbeEngineError
from .options import CaptureOptions, SolveOptions, add_arguments, cli_positive, from_args
from .solve import solve
from .store import load_results, open_store

__all__ = ["main", "parser", "load_data", "API_FLAGS"]

#: How the command line gives each argument of ``build_store`` and ``solve`` that is not one
#: of their option objects' fields (those get a flag each, from engine.options); ``None``:
#: Python only, with the reason.
API_FLAGS = {
    "build": {"model": "--model", "data": "--data", "path": "PATH", "layers": "--layers",
              "resume": "--no-resume", "overwrite": "--overwrite", "repair": "--repair",
              "progress": "--quiet", "client": "--workers / --scheduler",
              "labels": None},  # callables or arrays: Store.add_labels, in Python
    "solve": {"source": "PATH", "layers": "--layers", "progress": "--quiet",
              "client": "--workers / --scheduler",
              "labels": None},  # labels of in-memory arrays; a store has its own
}


def load_data(spec: str, *, limit: int | None = None, size: int = 224) -> dict:
    """``fashion-mnist[:ROOT]`` or ``imagefolder:ROOT`` -> {split: dataset}.

    An image folder's ``train`` / ``val`` (or ``valid``) / ``test`` subfolders become the
    ``train`` / ``valid`` / ``test`` splits; a folder of class folders is one dataset.
    ``limit`` keeps the first rows of each split (for quick runs).
    """
    kind, _, root = _data_spec(spec).partition(":")
    if kind == "fashion-mnist":
        root = root or None
        data = {"train": datasets.fashion_mnist("train", root),
                "test": datasets.fashion_mnist("test", root)}
    elif kind == "imagefolder" and root:
        names = {"train": "train", "val": "valid", "valid": "valid", "test": "test"}
        found = {names[d.name]: d.name for d in sorted(Path(root).iterdir())
                 if d.is_dir() and d.name in names} if Path(root).is_dir() else {}
        if found and all(n in names for n in found.values()):
            data = {s: datasets.image_folder(root, d, size=size) for s, d in found.items()}
        else:
            data = {"train": datasets.image_folder(root, size=size)}
    if limit:
        data = {k: Subset(v, range(min(limit, len(v)))) for k, v in data.items()}
        for v in data.values():  # Subset hides the class names that give num_classes
            v.classes = getattr(v.dataset, "classes", None)
    return data


def _data_spec(spec: str) -> str:
    """An argparse type: ``fashion-mnist``, ``fashion-mnist:ROOT`` or ``imagefolder:ROOT``."""
    kind, _, root = spec.partition(":")
    if kind == "fashion-mnist" or (kind == "imagefolder" and root):
        return spec
    raise argparse.ArgumentTypeError(f"{spec!r}: use 'fashion-mnist', 'fashion-mnist:ROOT' "
                                     f"or 'imagefolder:ROOT'")


@contextlib.contextmanager
def _client(args):
    """The Dask client asked for by --workers N / --scheduler ADDRESS, or None (the parser
    lets only one of them through)."""
    if args.scheduler:
        from distributed import Client

        with Client(args.scheduler) as client:
            yield client
    elif args.workers is not None:
        from .schedule import cluster

        with cluster(args.workers) as client:
            yield client
    else:
        yield None


def _add_dask(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Dask (docs/scaling.md)").add_mutually_exclusive_group()
    g.add_argument("--workers", type=cli_positive, help="run on a local Dask cluster of N "
                   "workers (one per GPU with dask-cuda)")
    g.add_argument("--scheduler", help="run on the Dask cluster at ADDRESS (tcp://host:8786); "
                   "not with --workers")


def _build(args) -> int:
    options = from_args(CaptureOptions, args, args.parser)
    torch.manual_seed(options.get("seed", 0))  # an untrained model: the same on every run
    model = _load_model(args)
    data = load_data(args.data, limit=args.limit, size=args.image_size)
    t0 = time.perf_counter()
    with _client(args) as client:
        store = build_store(model, data, args.path, layers=args.layers or "auto",
                            resume=not args.no_resume, overwrite=args.overwrite,
                            repair=args.repair, progress=not args.quiet, client=client,
                            **options)
    print(store.summary())
    print(f"built in {time.perf_counter() - t0:.1f} s")
    return 0


def _load_model(args):
    """``--model`` with ``--weights``: a checkpoint that holds more than tensors, or that
    belongs to another model, is refused with a message naming the file."""
    try:
        return models.load_model(args.model, weights=args.weights,
                                 num_classes=args.num_classes)
    except pickle.UnpicklingError as exc:
        raise InvalidArgumentError(
            f"--weights {args.weights}: refused: the file holds Python objects other than "
            f"tensors, and probe-engine loads checkpoints only with "
            f"torch.load(weights_only=True), which runs no code from the file; save a plain "
            f"state_dict (torch.save(model.state_dict(), PATH))") from exc
    except RuntimeError as exc:  # load_state_dict: missing / unexpected keys, other shapes
        detail = " ".join(str(exc).split())
        raise InvalidArgumentError(
            f"--weights {args.weights} does not fit --model {args.model}"
            f"{f' --num-classes {args.num_classes}' if args.num_classes else ''}: "
            f"{detail[:300]}{'...' if len(detail) > 300 else ''}; pass the --model (and "
            f"--num-classes) the state_dict was saved from") from exc


def _solve(args) -> int:
    options = from_args(SolveOptions, args, args.parser)
    t0 = time.perf_counter()
    with _client(args) as client:
        results = solve(args.path, layers=args.layers, progress=not args.quiet, client=client,
                        **options)
    print(results)
    ran = sorted({(b["device"], b["kernel"], b["matmul"])
                  for b in results.backends.values() if b}, key=str)
    how = "; ".join(f"{d}, {'fused CUDA' if k == 'cuda' else 'torch'} loss kernel, {m} GEMMs"
                    for d, k, m in ran)
    run = options.get("run", SolveOptions.defaults()["run"])
    print(f"solved {results.table.layer.nunique()} layers in {time.perf_counter() - t0:.1f} s"
          f"{f' ({how})' if how else ''}; probes saved in {args.path} under probes/{run}")
    return 0


def _info(args) -> int:
    print(open_store(args.path).summary())
    return 0


def _verify(args) -> int:
    report = open_store(args.path).verify()
    print(report)
    return 0 if report.ok else 1


def _demo(args) -> int:
    """The main job on the embedded default data: the paper's MNIST convnet on Fashion-MNIST,
    probed at initialisation and after training, with its report."""
    from .demo import run, run_vit

    t0 = time.perf_counter()
    what = ("small_vit on Fashion-MNIST, each block by its class token and by the mean of its "
            "tokens" if args.vit else "mnist_convnet on Fashion-MNIST, at initialisation and "
            "after training")
    print(f"probe-engine demo{' (quick)' if args.quick else ''}: {what} -> {args.out}/",
          flush=True)
    results, page = (run_vit if args.vit else run)(
        args.out, quick=args.quick, seed=args.seed, progress=not args.quiet,
        log=lambda m: print(m, flush=True))
    for state, res in results.items():
        print(f"\n{state}:\n{res}")
    print(f"\nreport: {page}\ndone in {time.perf_counter() - t0:.0f} s")
    return 0


def _report(args) -> int:
    from .report import report

    results = {}
    for path in args.paths:
        name = Path(path.rstrip("/")).name.removesuffix(".zarr")
        results[name] = open_store(path).results(args.run)
    page = report(results, args.out, title=args.title)
    print(f"report: {page}")
    return 0


def _export(args) -> int:
    """A solved run's probe weights and tables to files other tools read
    (engine/_export.py)."""
    from ._export import weights_format

    if not (args.weights or args.table or args.grid):
        args.parser.error("give --weights, --table or --grid (or several)")
    if args.weights:
        weights_format(args.weights)  # a bad suffix fails before the store is read
    results = load_results(args.path, args.run)
    if args.weights:
        results.save_weights(args.weights)
        print(f"weights: {args.weights} ({len(results.weights)} layers, W and b float32)")
    if args.table:
        results.to_parquet(args.table)
        print(f"table: {args.table} ({len(results.table)} rows, one per layer and split)")
    if args.grid:
        results.to_parquet(args.grid, grid=True)
        print(f"grid: {args.grid} ({len(results.grid)} rows, one per layer and l2)")
    return 0


EXAMPLES = {
    "build": [
        "probe-engine build fmnist.zarr                      # the MNIST convnet on Fashion-MNIST",
        "probe-engine build r50.zarr --model resnet50 --weights r50.pt \\",
        "    --data imagefolder:/data/imagenet --layers 'layer*' --reduce pool",
        "probe-engine build big.zarr --workers 4             # one process per local GPU/core",
        "probe-engine build fmnist.zarr --repair             # after 'verify' found damage",
    ],
    "solve": [
        "probe-engine solve fmnist.zarr                      # L-BFGS, lambda by validation",
        "probe-engine solve fmnist.zarr --solver sgd --epochs 20 --run sgd",
        "probe-engine solve r50.zarr --device cuda --dtype tf32",
        "probe-engine solve r50.zarr --solver sgd --dtype bfloat16 --run sgd-bf16",
        "probe-engine solve fmnist.zarr --layers conv1_postact fc1_preact --l2 1e-4 1e-3",
        "probe-engine solve fmnist.zarr --label coarse       # a second label set, no recapture",
    ],
    "info": ["probe-engine info fmnist.zarr                       # layers, splits, rows, runs"],
    "verify": [
        "probe-engine verify fmnist.zarr && echo intact",
        "probe-engine verify s3://bucket/run1.zarr           # any fsspec URL",
    ],
    "report": [
        "probe-engine report init.zarr trained.zarr --out report/   # one panel per store",
        "probe-engine report fmnist.zarr --run sgd --title 'SGD probes'",
    ],
    "export": [
        "probe-engine export fmnist.zarr --weights probes.safetensors --table errors.parquet",
        "probe-engine export fmnist.zarr --run sgd --weights sgd.npz   # numpy only",
        "probe-engine export fmnist.zarr --grid grid.parquet         # every l2 tried",
    ],
    "demo": [
        "probe-engine demo                                    # about 10 minutes on 2 cores",
        "probe-engine demo --quick --out /tmp/demo            # about a minute",
        "probe-engine demo --vit --quick --out /tmp/vit       # a small ViT, CLS vs mean",
    ],
}


def _command(sub, name: str, help: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` ends with its examples, kept as written."""
    epilog = "examples:\n" + "\n".join("  " + line for line in EXAMPLES[name])
    return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                          epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter,
                          **kwargs)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="probe-engine", description=__doc__,
                                epilog="run 'probe-engine COMMAND --help' for its options and "
                                "examples")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)

    b = _command(sub, "build", "capture a model's activations into a feature store")
    b.add_argument("path", help="store path (a folder, or an fsspec URL)")
    b.add_argument("--model", default="mnist_convnet",
                   help="mnist_convnet or a torchvision model name (resnet50, inception_v3)")
    b.add_argument("--weights", help="state_dict file (loaded with weights_only=True)")
    b.add_argument("--num-classes", type=cli_positive, help="classes of the model's head (for "
                   "--weights of a model trained on other classes)")
    b.add_argument("--data", default="fashion-mnist", type=_data_spec,
                   help="fashion-mnist, fashion-mnist:ROOT or imagefolder:ROOT")
    b.add_argument("--image-size", type=cli_positive, default=224)
    b.add_argument("--limit", type=cli_positive, help="keep the first N rows of each split")
    b.add_argument("--layers", nargs="+", help="names or globs (default: auto)")
    add_arguments(b, CaptureOptions, title="capture (engine.options.CaptureOptions)")
    existing = b.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace an existing store")
    existing.add_argument("--no-resume", action="store_true", help="refuse an existing store "
                          "(default: resume it)")
    existing.add_argument("--repair", action="store_true", help="resume, first rewriting the "
                          "chunks 'verify' finds missing or corrupted (docs/reliability.md)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_dask(b)
    b.set_defaults(func=_build, parser=b)

    s = _command(sub, "solve", "fit a softmax probe on every layer of a store")
    s.add_argument("path")
    s.add_argument("--layers", nargs="+", help="layer keys (default: all)")
    add_arguments(s, SolveOptions, title="solver (engine.options.SolveOptions)")
    s.add_argument("--quiet", action="store_true")
    _add_dask(s)
    s.set_defaults(func=_solve, parser=s)

    i = _command(sub, "info", "summarise a store")
    i.add_argument("path")
    i.set_defaults(func=_info)

    v = _command(sub, "verify", "check every chunk's checksum; exit 1 on a problem")
    v.add_argument("path")
    v.set_defaults(func=_verify)

    r = _command(sub, "report", "write the HTML / CSV / JSON / PNG report of solved stores")
    r.add_argument("paths", nargs="+", metavar="PATH", help="solved stores (model states)")
    r.add_argument("--run", default="default", help="the solve run to report")
    r.add_argument("--out", default="report", help="folder for index.html and the rest")
    r.add_argument("--title")
    r.set_defaults(func=_report)

    e = _command(sub, "export", "write a solved run's probe weights (safetensors or .npz) and "
                 "its results table (Parquet)")
    e.add_argument("path", help="a solved store")
    e.add_argument("--run", default="default", help="the solve run to export")
    e.add_argument("--weights", metavar="OUT", help="OUT.safetensors or OUT.npz: every "
                   "layer's W (D, C) and b (C,) as <layer>/W and <layer>/b")
    e.add_argument("--table", metavar="OUT", help="OUT.parquet: one row per (layer, split)")
    e.add_argument("--grid", metavar="OUT", help="OUT.parquet: one row per (layer, l2), "
                   "every lambda tried")
    e.set_defaults(func=_export, parser=e)

    d = _command(sub, "demo", "the paper's MNIST convnet on Fashion-MNIST, at "
                 "initialisation and after training, with its report")
    d.add_argument("--out", default="demo", help="folder for the two stores and report/")
    d.add_argument("--quick", action="store_true",
                   help="3,000 train and 1,000 test rows, one training epoch (about a minute)")
    d.add_argument("--vit", action="store_true",
                   help="a small ViT instead, each block probed by its class token and by "
                        "the mean of its tokens (quick: 2,000 train and 500 test rows)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 1 an error (one line on stderr; ``--debug`` for the traceback),
    2 a usage error (from argparse)."""
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (ProbeEngineError, OSError, ValueError) as exc:
        if args.debug:
            raise
        print(f"probe-engine: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
