"""The paper's pathological model (section 5.1): 128 fully connected layers of 128 units
with a skip connection from layer 0 to layer 64, trained on Fashion-MNIST with SGD. Probes
on every layer, at initialisation and after each epoch, show the skipped half staying
useless while the second half learns.

    python examples/pathological.py                 # about 10 minutes on 2 CPU cores
    python examples/pathological.py --epochs 2 --lr 0.02 --every 64 --probe-rows 2000 \
        --test-rows 1000 --l2 1e-3                  # the test's run: about 20 seconds

At initialisation the chain forgets its input: a weight gain of 1.3 (below He's sqrt(2)) and
PyTorch's default biases turn a long stack of leaky ReLUs into a near-constant signal (the
paper's "garbage forwardprop"). The skip hands the input to layer 64, so the second half can
learn; the gradient that would reach the first half must cross both halves.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import engine
from engine.models import SkipMLP


def bands(depth: int, skip: tuple[int, int]) -> dict[str, list[str]]:
    """The two groups of sites compared: the last ``depth // 16`` layers before the skip's
    end, and the last ``depth // 16`` of the network (layers 56-63 and 120-127 of 128)."""
    k = max(1, depth // 16)
    return {"skipped half, end": [f"layers.{i}" for i in range(skip[1] - k, skip[1])],
            "second half, end": [f"layers.{i}" for i in range(depth - k, depth)]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=128)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--skip", type=int, nargs=2, default=(0, 64), metavar=("FROM", "TO"))
    ap.add_argument("--gain", type=float, default=1.3, help="weight init gain")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.01,
                    help="SGD, momentum 0.9, gradient norm clipped to 1")
    ap.add_argument("--train-rows", type=int, default=10_000, help="to train the model")
    ap.add_argument("--probe-rows", type=int, default=5_000,
                    help="training rows the probes see (a tenth of them for validation)")
    ap.add_argument("--test-rows", type=int, default=5_000)
    ap.add_argument("--every", type=int, default=1, help="probe every k-th layer")
    ap.add_argument("--l2", default="auto", help="'auto' (chosen on valid) or a lambda")
    ap.add_argument("--out", default="pathological-probes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    out, skip, progress = Path(args.out), tuple(args.skip), not args.quiet

    def model_fn() -> SkipMLP:
        torch.manual_seed(args.seed)
        return SkipMLP(args.depth, args.width, skip, gain=args.gain)

    train = engine.datasets.fashion_mnist("train")
    test = engine.datasets.fashion_mnist("test").subset(0, args.test_rows)
    model = model_fn()
    checkpoints = {"init": _copy(model)}

    def keep(epoch: int, m: torch.nn.Module) -> None:
        checkpoints[f"epoch-{epoch}"] = _copy(m)

    losses = engine.models.train(
        model, train.subset(0, args.train_rows), epochs=args.epochs, lr=args.lr,
        optimizer="sgd", momentum=0.9, clip_grad_norm=1.0, seed=args.seed, progress=progress,
        on_epoch=keep)

    probed = bands(args.depth, skip)
    sites = sorted({*range(0, args.depth, args.every), *(int(name.split(".")[1]) for names
                    in probed.values() for name in names)})
    sites = [f"layers.{i}" for i in sites] + ["logits"]
    l2 = args.l2 if args.l2 == "auto" else float(args.l2)
    results = engine.sweep(
        model_fn, checkpoints,
        {"train": train.subset(0, args.probe_rows), "test": test}, out / "stores",
        layers=sites, reduce="none", valid_size=max(2, args.probe_rows // 10),
        seed=args.seed, overwrite=True, progress=progress,
        solve_kwargs={"l2": l2})

    chance = 1 - 1 / 10
    summary = {state: {band: float(res.error("test")[names].mean())
                       for band, names in probed.items()}
               for state, res in results.items()}
    lines = [f"{state:>8}: " + ", ".join(f"{band} {err:.3f}" for band, err in errs.items())
             for state, errs in summary.items()]
    page = engine.report(results, out / "report", title=(
        f"Pathological model: {args.depth} layers of {args.width} units, skip "
        f"{skip[0]} -> {skip[1]}"), notes=[
        f"Mean test error of the probes (chance {chance:.2f}): " + "; ".join(lines) + ".",
        "The paper (section 5.1) finds that the model ignores the layers the skip "
        "connection bypasses: their probes stay near chance while those after the skip "
        "improve with training."])
    print("\n".join(lines))
    print(f"report: {page}")
    return {"results": results, "summary": summary, "chance": chance, "page": page,
            "losses": losses}


def _copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


if __name__ == "__main__":
    main()
