"""The paper's ImageNet experiments: linear probes along ResNet-50 (section 4, Fig. 8) or
Inception v3 (appendix C), on an ImageNet folder or a synthetic stand-in.

    python examples/imagenet.py --model resnet50 --imagenet /data/imagenet [--weights r50.pth]
    python examples/imagenet.py --model inception_v3 --synthetic 2000   # runs anywhere

ResNet-50: the stem (after the first max-pool) and each of the 16 bottleneck outputs, every
site per-channel average-pooled. Inception v3: its 17 sites (the five stem convolutions, the
eleven Mixed blocks and the final pooling), each reduced to a fixed seeded random subset of
1,000 features, as in the paper.

No weights are downloaded: without ``--weights`` (a torchvision state_dict, read with
``torch.load(weights_only=True)``) the network is randomly initialised, which shows the
"random features" baseline, not the trained curves of the paper (docs/reproducing.md).
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

import engine
from engine.cli import load_data


@dataclass(frozen=True)
class Experiment:
    sites: list[str]
    reduce: str
    title: str
    min_size: int  # smallest input side the network accepts
    dtype: str = "float16"  # storage
    notes: list[str] = field(default_factory=list)


EXPERIMENTS = {
    "resnet50": Experiment(
        # the stem and each bottleneck's output: 1 + 3 + 4 + 6 + 3
        sites=["maxpool", *[f"layer{i}.{j}" for i, n in ((1, 3), (2, 4), (3, 6), (4, 3))
                            for j in range(n)]],
        reduce="pool",
        title="ResNet-50: linear probes on the stem and the 16 bottleneck outputs",
        min_size=32,
        notes=["The paper's validation errors with trained ImageNet weights: 0.99 at the "
               "input, 0.94 after the first block, down to 0.31 after the last "
               "(docs/reproducing.md)."]),
    "inception_v3": Experiment(
        sites=["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1",
               "Conv2d_4a_3x3", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
               "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c",
               "avgpool"],
        reduce="subsample:1000",
        title="Inception v3: linear probes on 1,000 fixed random features per site",
        min_size=75,
        # randomly initialised, its eval-mode activations outgrow float16 (65,504) by Mixed_6d
        dtype="bfloat16",
        notes=["Every probe sees 1,000 features drawn once at random (seeded, stored in the "
               "store's reductions/), whatever the site's width. As the paper's appendix C "
               "warns, this is not fair between sites: a wide early site keeps a smaller "
               "share of its features than a narrow late one, so compare the curve's shape, "
               "not the errors, with the ResNet-50 figure."]),
}


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(EXPERIMENTS), default="resnet50")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--imagenet", help="folder with train/ and val/ class folders")
    src.add_argument("--synthetic", type=int, metavar="N", help="make N synthetic images")
    ap.add_argument("--weights")
    ap.add_argument("--limit", type=int, help="first N images of each split")
    ap.add_argument("--image-size", type=int, help="input side (default: 224 for "
                    "ResNet-50, 299 for Inception v3)")
    ap.add_argument("--out", help="output folder (default: MODEL-probes)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    exp = EXPERIMENTS[args.model]
    size = args.image_size or (299 if args.model == "inception_v3" else 224)
    if size < exp.min_size:
        ap.error(f"--image-size {size} is too small for {args.model}; it needs at least "
                 f"{exp.min_size}")
    out = Path(args.out or f"{args.model}-probes")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="synthetic-imagenet-") as tmp:
        root = args.imagenet or engine.datasets.synthetic_image_folder(
            tmp, args.synthetic, classes=10, size=size)
        data = load_data(f"imagefolder:{root}", limit=args.limit, size=size)
        classes = len(data["train"].classes)
        model = engine.models.load_model(args.model, weights=args.weights,
                                         num_classes=1000 if args.weights else classes)
        store = engine.build_store(model, data, out / "store.zarr", layers=exp.sites,
                                   reduce=exp.reduce, dtype=exp.dtype, device=args.device,
                                   overwrite=True, progress=not args.quiet)
    results = engine.solve(store, progress=not args.quiet, device=args.device)
    page = engine.report({args.model: results}, out / "report", title=exp.title,
                         notes=exp.notes)
    print(results)
    print(f"report: {page}")
    return page


if __name__ == "__main__":
    main()
