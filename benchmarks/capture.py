"""Capture benchmark: ``build_store`` against a plain forward pass, side by side in one run.

Both run the same model over the same rows with the same batch size and data pipeline; the
plain pass only calls ``model(x)`` under ``torch.inference_mode``. The ratio build / plain is
what capturing, reducing, compressing, checksumming and writing every probe site costs on top
of the forward pass the user would run anyway.

    python -m benchmarks.capture            # full size, CPU cases
    python -m benchmarks.capture --quick    # a few seconds a case
    python -m benchmarks.capture --device cuda --quick   # adds ResNet-50 bf16 channels-last
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch.utils.data import Dataset

import engine
from engine._data import resolve_splits
from engine.datasets import ArrayDataset, Batch


@dataclass
class Case:
    name: str
    model: torch.nn.Module
    data: dict
    build: dict
    batch_size: int
    target: float
    device: str = "cpu"
    result: dict = field(default_factory=dict)


class DeviceImages(Dataset):
    """Random class-structured images resident on a device, batches gathered there: the
    forward pass, not the data pipeline, sets the pace."""

    def __init__(self, n: int, size: int, classes: int, device: str, seed: int = 0):
        g = torch.Generator(device=device).manual_seed(seed)
        labels = torch.randint(0, classes, (n,), generator=g, device=device)
        base = torch.randn(classes, 3, size, size, generator=g, device=device)
        self.images = torch.randn(n, 3, size, size, generator=g, device=device)
        self.images += base[labels]
        self.labels = labels.cpu()
        self.classes = [str(c) for c in range(classes)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])

    def __getitems__(self, indices: list[int]) -> Batch:
        idx = torch.as_tensor(indices)
        return Batch(self.images[idx.to(self.images.device)], self.labels[idx])


def plain_forward(model, data, *, batch_size: int, device: str, autocast=None,
                  channels_last=False, valid_size="auto", seed=0) -> float:
    """Seconds for one forward pass over every row build_store would capture."""
    splits = resolve_splits(data, valid_size=valid_size, seed=seed)
    dev = torch.device(device)
    model.to(dev).eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    amp = (torch.autocast(dev.type, dtype=getattr(torch, autocast)) if autocast
           else nullcontext())
    t0 = time.perf_counter()
    with torch.inference_mode(), amp:
        for split in splits:
            for x, _ in split.batches(0, batch_size, pin_memory=dev.type == "cuda"):
                x = x.to(dev, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                model(x)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    return seconds


def run_case(case: Case, workdir: Path, repeats: int = 2) -> dict:
    path = workdir / f"{case.name}.zarr"
    kw = dict(batch_size=case.batch_size, device=case.device,
              autocast=case.build.get("autocast"), channels_last=case.build.get("channels_last",
                                                                               False))
    plain_forward(case.model, case.data, **kw)  # warm-up: caches, allocator, kernels
    plain, build = [], []
    for _ in range(repeats):  # interleaved, so drift hits both sides alike
        plain.append(plain_forward(case.model, case.data, **kw))
        if path.exists():
            shutil.rmtree(path)
        t0 = time.perf_counter()
        store = engine.build_store(case.model, case.data, path, progress=False,
                                   batch_size=case.batch_size, device=case.device, **case.build)
        build.append(time.perf_counter() - t0)
    rows = sum(store.rows(s) for s in store.splits)
    raw = stored = 0
    layers = {}
    for layer in store.layers:
        lr = ls = 0
        for split in store.splits:
            arr = store.features(split, layer)
            lr += arr.nbytes
            ls += sum(f.stat().st_size for f in (path / arr.path).rglob("*") if f.is_file())
        layers[layer] = {"dim": store.layer_info(layer)["dim"],
                         "reduction": store.layer_info(layer)["reduction"],
                         "compression": round(lr / ls, 3)}
        raw, stored = raw + lr, stored + ls
    assert store.verify().ok
    b, p = statistics.median(build), statistics.median(plain)
    case.result = {
        "case": case.name, "rows": rows, "sites": len(store.layers), "device": case.device,
        "batch_size": case.batch_size, "plain_s": round(p, 3), "build_s": round(b, 3),
        "ratio": round(b / p, 3), "target": case.target,
        "build_rows_per_s": round(rows / b, 1), "plain_rows_per_s": round(rows / p, 1),
        "written_MB_per_s": round(raw / b / 1e6, 1), "raw_MB": round(raw / 1e6, 1),
        "stored_MB": round(stored / 1e6, 1), "compression": round(raw / stored, 3),
        "plain_runs_s": [round(x, 3) for x in plain], "build_runs_s": [round(x, 3) for x in build],
        "layers": layers,
    }
    shutil.rmtree(path)
    return case.result


def cases(quick: bool, device: str) -> list[Case]:
    out = []
    if device == "cpu":
        train, test = (engine.datasets.fashion_mnist("train"),
                       engine.datasets.fashion_mnist("test"))
        if quick:
            train, test = train.subset(0, 8192), test.subset(0, 2048)
        torch.manual_seed(0)
        out.append(Case("mnist_convnet/10 sites/auto", engine.models.mnist_convnet(),
                        {"train": train, "test": test}, {"reduce": "auto"}, 256, 1.3))
        n = 96 if quick else 768
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (n, 3, 224, 224), dtype=np.uint8)
        folder = ArrayDataset(images, rng.integers(0, 10, n), [str(i) for i in range(10)],
                              mean=engine.datasets.IMAGENET_MEAN, std=engine.datasets.IMAGENET_STD)
        torch.manual_seed(0)
        resnet18 = torchvision.models.resnet18(weights=None).eval()
        out.append(Case("resnet18/9 pooled blocks", resnet18, {"train": folder},
                        {"layers": ["maxpool", "layer?.?"], "reduce": "pool",
                         "valid_size": 0}, 32, 1.3))
    else:
        n = 8192 if quick else 32768
        data = DeviceImages(n, 224, 1000, device)
        torch.manual_seed(0)
        resnet50 = torchvision.models.resnet50(weights=None).eval()
        out.append(Case("resnet50/17 pooled sites/bf16/channels_last", resnet50,
                        {"train": data},
                        {"layers": ["maxpool", "layer?.?"], "reduce": "pool", "valid_size": 0,
                         "dtype": "bfloat16", "autocast": "bfloat16", "channels_last": True},
                        256, 1.1, device=device))
    return out


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="probe-engine-bench-") as tmp:
        for case in cases(args.quick, args.device):
            results.append(run_case(case, Path(tmp), args.repeats))
            r = results[-1]
            print(f"{r['case']:<45} rows {r['rows']:>6}  plain {r['plain_s']:7.2f} s  "
                  f"build {r['build_s']:7.2f} s  ratio {r['ratio']:.2f} (target <= "
                  f"{r['target']})  {r['build_rows_per_s']:.0f} rows/s  "
                  f"{r['written_MB_per_s']:.0f} MB/s  compression {r['compression']:.2f}x",
                  flush=True)
    report = {"machine": machine(), "date": time.strftime("%Y-%m-%d"),
              "torch": torch.__version__, "quick": args.quick, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return results


if __name__ == "__main__":
    main()
