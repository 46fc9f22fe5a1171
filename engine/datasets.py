"""Datasets: in-memory image arrays (Fashion-MNIST) and ImageNet-style image folders.

Fashion-MNIST is read from its IDX files, looked for in order in: ``root=`` (only there, when
given), ``$PROBE_ENGINE_DATA``, Debian's ``/usr/share/datasets/fashion-mnist`` (package
``dataset-fashion-mnist``), a per-user cache folder, and last a torchvision download into that
cache (which usually fails: the network is normally closed).
"""

from __future__ import annotations

import functools
import gzip
import numbers
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.utils.data

from engine.errors import DataError, DatasetNotFoundError

if TYPE_CHECKING:
    import torchvision.datasets

__all__ = [
    "collate",
    "synthetic_image_folder",
    "FASHION_COARSE",
    "FASHION_COARSE_NAMES",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ArrayDataset",
    "Batch",
    "fashion_mnist",
    "image_folder",
    "read_idx",
]

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Statistics of the 60,000 training images, pixel values scaled to [0, 1].
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DATA_ENV = "PROBE_ENGINE_DATA"
CACHE_ENV = "PROBE_ENGINE_CACHE"

_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions


class Batch(NamedTuple):
    """An already-collated batch: ``inputs`` float32 (B, C, H, W) (or a dict of (B, ...)
    tensors, the model's keyword arguments: :class:`engine.text.TextDataset`), ``labels``
    int64 (B,).

    A dataset may return one from ``__getitems__(indices)`` so that the DataLoader skips
    per-item work; the collate function must then pass it through unchanged.
    """

    inputs: torch.Tensor | dict[str, torch.Tensor]
    labels: torch.Tensor


class ArrayDataset(torch.utils.data.Dataset):
    """Images held in memory, normalised on access.

    Args:
        images: uint8 (N, H, W) or (N, C, H, W), numpy or torch; pixel 255 maps to 1.0.
            Floating-point images are taken as already scaled to [0, 1].
        labels: integer class indices, shape (N,), each in ``[0, len(classes))``.
        classes: class names, index ``k`` naming label ``k``.
        mean, std: per-channel normalisation (a number or one value per channel) applied
            after scaling to [0, 1]; ``None`` for no normalisation.
        source: short provenance string (e.g. ``"fashion-mnist/train"``) for fingerprints.

    Items are ``(float32 tensor (C, H, W), int label)``; ``__getitems__`` returns a
    :class:`Batch` gathered in one vectorised step. The arrays are shared, not copied, when
    possible: do not modify them afterwards.
    """

    files: tuple[Path, ...] = ()  # the files read, when loaded from disk

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor | Sequence[int],
        classes: Sequence[str],
        *,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        source: str = "array",
    ) -> None:
        imgs = _as_tensor(images)
        if imgs.ndim == 3:
            imgs = imgs.unsqueeze(1)
        if imgs.ndim != 4:
            raise DataError(
                f"images must have shape (N, H, W) or (N, C, H, W), got {tuple(imgs.shape)}"
            )
        if imgs.dtype != torch.uint8 and not imgs.is_floating_point():
            raise DataError(f"images must be uint8 or floating point, got {imgs.dtype}")
        labs = _as_tensor(labels)
        if labs.ndim != 1 or labs.shape[0] != imgs.shape[0]:
            raise DataError(
                f"labels must have shape ({imgs.shape[0]},) to match the images, "
                f"got {tuple(labs.shape)}"
            )
        if imgs.shape[0] == 0:
            raise DataError(f"empty dataset ({source})")
        if labs.is_floating_point() or labs.is_complex() or labs.dtype == torch.bool:
            raise DataError(f"labels must be integers, got {labs.dtype}")
        labs = labs.to(torch.int64)
        classes = [str(c) for c in classes]
        if not classes:
            raise DataError("classes must name at least one class")
        lo, hi = int(labs.min()), int(labs.max())
        if lo < 0 or hi >= len(classes):
            raise DataError(
                f"labels must lie in [0, {len(classes)}) for {len(classes)} classes, "
                f"got values in [{lo}, {hi}]"
            )
        if (mean is None) != (std is None):
            raise DataError("give both mean and std, or neither")

        channels = imgs.shape[1]
        self._images = imgs
        self._labels = labs
        self._scale = 1.0 / 255.0 if imgs.dtype == torch.uint8 else 1.0
        self.mean: tuple[float, ...] | None = None
        self.std: tuple[float, ...] | None = None
        self._shift: torch.Tensor | None = None
        self._inv_std: torch.Tensor | None = None
        if mean is not None and std is not None:
            self.mean = _per_channel(mean, channels, "mean")
            self.std = _per_channel(std, channels, "std")
            if min(self.std) <= 0:
                raise DataError(f"std must be positive, got {self.std}")
            self._shift = torch.tensor(self.mean, dtype=torch.float32).view(channels, 1, 1)
            self._inv_std = 1.0 / torch.tensor(self.std, dtype=torch.float32).view(channels, 1, 1)
        self.classes: list[str] = classes
        self.class_to_idx: dict[str, int] = {c: k for k, c in enumerate(classes)}
        # A private copy, so that callers may modify it (or torch.from_numpy it) freely.
        self.targets: np.ndarray = labs.numpy().copy()
        self.source = source

    @property
    def images(self) -> torch.Tensor:
        """The stored images, (N, C, H, W), uint8 or float, before normalisation."""
        return self._images

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape (C, H, W) of one item's input."""
        c, h, w = self._images.shape[1:]
        return (int(c), int(h), int(w))

    def __len__(self) -> int:
        return int(self._images.shape[0])

    def subset(self, start: int, stop: int | None = None) -> ArrayDataset:
        """Rows [start, stop) as a dataset of their own, with the same classes and
        normalisation; its ``source`` says where they came from."""
        rows = slice(start, stop)
        return ArrayDataset(self._images[rows], self.targets[rows], self.classes,
                            mean=self.mean, std=self.std,
                            source=f"{self.source}[{start}:{'' if stop is None else stop}]")

    def _transform(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32) * self._scale
        if self._shift is not None:
            x = (x - self._shift) * self._inv_std
        return x.contiguous()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        i = int(index)
        return self._transform(self._images[i]), int(self._labels[i])

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return Batch(self._transform(self._images[idx]), self._labels[idx])

    def __repr__(self) -> str:
        norm = f", mean={self.mean}, std={self.std}" if self.mean is not None else ""
        return (
            f"{type(self).__name__}({self.source!r}, n={len(self)}, "
            f"shape={self.image_shape}, classes={len(self.classes)}{norm})"
        )


def collate(batch):
    """A DataLoader ``collate_fn`` for any dataset: a :class:`Batch` (from ``__getitems__``)
    passes through, a list of items is stacked by torch's default collate."""
    return batch if isinstance(batch, Batch) else torch.utils.data.default_collate(batch)


def _as_tensor(x: np.ndarray | torch.Tensor | Sequence[int]) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    arr = np.asarray(x)
    # torch.from_numpy warns on read-only arrays (e.g. np.frombuffer on bytes).
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.array(arr, copy=True, order="C")
    return torch.from_numpy(arr)


def _per_channel(v: float | Sequence[float], channels: int, what: str) -> tuple[float, ...]:
    vals = (float(v),) if isinstance(v, numbers.Real) else tuple(float(x) for x in v)
    if len(vals) == 1:
        vals = vals * channels
    if len(vals) != channels:
        raise DataError(f"{what} needs 1 or {channels} values, got {len(vals)}")
    return vals


# --------------------------------------------------------------------------- Fashion-MNIST


def read_idx(path: str | os.PathLike[str], magic: int | None = None) -> np.ndarray:
    """Parse one IDX file (plain or ``.gz``) of unsigned bytes into a uint8 array.

    ``magic`` (2049 for labels, 2051 for images) is checked when given. The array is cached
    per path (and size / modification time) and shared: do not modify it.
    Raises :class:`DataError` naming the path when the file is malformed or truncated.
    """
    p = Path(path).resolve()
    st = p.stat()
    arr = _read_idx_cached(str(p), st.st_mtime_ns, st.st_size)
    if magic is not None:
        expected_ndim = magic & 0xFF
        if arr.ndim != expected_ndim:
            raise DataError(
                f"{p}: IDX magic number 0x{0x0800 | arr.ndim:08x} ({arr.ndim}-dimensional), "
                f"expected 0x{magic:08x} ({magic})"
            )
    return arr


@functools.lru_cache(maxsize=8)
def _read_idx_cached(path: str, mtime_ns: int, size: int) -> np.ndarray:
    del mtime_ns, size  # cache-key only: a rewritten file is parsed again
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = Path(path).read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc})") from exc
    if len(raw) < 4:
        raise DataError(f"{path}: not an IDX file (only {len(raw)} bytes)")
    zero, dtype_code, ndim = int.from_bytes(raw[:2], "big"), raw[2], raw[3]
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
        magic = int.from_bytes(raw[:4], "big")
        raise DataError(
            f"{path}: bad IDX magic number 0x{magic:08x} ({magic}); expected an unsigned-byte "
            f"IDX file (2049 for labels, 2051 for images)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = tuple(int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    count = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != count:
        raise DataError(
            f"{path}: IDX dimensions {dims} need {count} data bytes, file has {len(raw) - header}"
        )
    # .copy(): an owning, writable array, so torch.from_numpy can share it without a warning.
    return np.frombuffer(raw, dtype=np.uint8, count=count, offset=header).reshape(dims).copy()


def _cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser() / "fashion-mnist"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "probe-engine" / "fashion-mnist"


def _find_split(folder: Path, split: str) -> tuple[Path, Path] | None:
    """The (images, labels) files of ``split`` in ``folder`` or its usual subfolders."""
    for d in (folder, folder / "fashion-mnist", folder / "FashionMNIST" / "raw"):
        found = []
        for stem in _FASHION_FILES[split]:
            for name in (stem, stem + ".gz"):
                if (d / name).is_file():
                    found.append(d / name)
                    break
        if len(found) == 2:
            return found[0], found[1]
    return None


def _download(cache: Path, split: str) -> tuple[Path, Path] | None:
    try:
        import torchvision.datasets

        torchvision.datasets.FashionMNIST(str(cache), train=split == "train", download=True)
    except Exception:  # any failure (usually: no network) just means "not found here"
        return None
    return _find_split(cache, split)


#: Fashion-MNIST's ten classes in four coarse groups (index = fine label): tops (T-shirt,
#: pullover, dress, coat, shirt), bottoms (trouser), footwear (sandal, sneaker, ankle boot),
#: bags (bag); e.g. ``store.add_labels("coarse", lambda y: FASHION_COARSE[y])``
FASHION_COARSE = np.array([0, 1, 0, 0, 0, 2, 0, 2, 3, 2])
FASHION_COARSE_NAMES = ("tops", "bottoms", "footwear", "bags")


def fashion_mnist(
    split: str = "train",
    root: str | os.PathLike[str] | None = None,
    *,
    normalize: bool = True,
    download: bool = True,
) -> ArrayDataset:
    """Fashion-MNIST as an :class:`ArrayDataset` of (1, 28, 28) float32 images, 10 classes.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        root: a folder holding the IDX files (``train-images-idx3-ubyte``, ... each plain or
            ``.gz``); when given, only this folder is used.
        normalize: normalise with mean 0.2860, std 0.3530; otherwise pixels are in [0, 1].
        download: as a last resort, try a torchvision download into the cache folder
            (``$PROBE_ENGINE_CACHE/fashion-mnist``, else ``~/.cache/probe-engine/fashion-mnist``).

    Raises:
        DatasetNotFoundError: the files are nowhere; the message lists the places tried.
        DataError: a file is malformed, or images and labels disagree.
    """
    if split not in _FASHION_FILES:
        raise DataError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    tried: list[str] = []
    files: tuple[Path, Path] | None = None
    if root is not None:
        folder = Path(root).expanduser()
        tried.append(f"root={str(folder)!r}")
        files = _find_split(folder, split)
    else:
        candidates: list[tuple[str, Path]] = []
        if os.environ.get(DATA_ENV):
            candidates.append((f"${DATA_ENV}", Path(os.environ[DATA_ENV]).expanduser()))
        candidates.append(("Debian package dataset-fashion-mnist", DEBIAN_FASHION_MNIST))
        cache = _cache_dir()
        candidates.append(("cache", cache))
        for what, folder in candidates:
            tried.append(f"{what} ({folder})")
            files = _find_split(folder, split)
            if files is not None:
                break
        if files is None and download:
            tried.append(f"torchvision download into {cache}")
            files = _download(cache, split)
    if files is None:
        names = " and ".join(f"{s}[.gz]" for s in _FASHION_FILES[split])
        raise DatasetNotFoundError(
            f"Fashion-MNIST {split} split not found: no {names} in "
            + "; ".join(tried)
            + ". Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), "
            "or pass root= (or set $PROBE_ENGINE_DATA to) a folder holding the four IDX files "
            "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
            "t10k-labels-idx1-ubyte (plain or .gz)."
        )
    images_path, labels_path = files
    images = read_idx(images_path, _IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, _IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has "
            f"{labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{labels_path}: label {int(labels.max())} out of range 0..9")
    ds = ArrayDataset(
        images,
        labels,
        FASHION_MNIST_CLASSES,
        mean=FASHION_MNIST_MEAN if normalize else None,
        std=FASHION_MNIST_STD if normalize else None,
        source=f"fashion-mnist/{split}",
    )
    ds.files = (images_path, labels_path)
    return ds


# --------------------------------------------------------------------------- image folders


def synthetic_image_folder(root: str | os.PathLike[str], n: int, *, classes: int = 10,
                           size: int = 64, seed: int = 0) -> Path:
    """Write ``n`` class-structured random RGB images as PNGs into ``root/<split>/<class>/``
    (80% ``train``, 20% ``val``) and return ``root``: an ImageNet-layout stand-in so that
    the ImageNet experiments run anywhere. Each class has its own mean colour and a coarse
    random texture; every image adds its own noise, so classes are learnable but not trivial.
    """
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    means = rng.uniform(40, 215, size=(classes, 3))
    textures = rng.normal(0, 30, size=(classes, 8, 8, 3))
    for i in range(n):
        c, j = i % classes, i // classes  # the j-th image of class c
        split = "val" if j % 5 == 4 else "train"
        tex = np.kron(textures[c], np.ones((size // 8 + 1, size // 8 + 1, 1)))[:size, :size]
        img = means[c] + tex + rng.normal(0, 40, size=(size, size, 3))
        d = root / split / f"class{c:03d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i:06d}.png")
    return root


def image_folder(
    root: str | os.PathLike[str],
    split: str | None = None,
    size: int = 224,
    *,
    resize: int | None = None,
) -> torchvision.datasets.ImageFolder:
    """An ImageNet-layout folder (``root/<split>/<class>/*.jpg``, or ``root/<class>/...``).

    Items are ``(float32 tensor (3, size, size), int class index)`` after the standard
    evaluation transforms: Resize(``resize`` or size*256/224), CenterCrop(size), ToTensor,
    Normalize(ImageNet mean/std). Classes are the sub-folder names, sorted.
    Raises :class:`DatasetNotFoundError` naming the path when it is missing or holds no images.
    """
    # Imported here: torchvision adds about a second to `import engine`.
    import torchvision.datasets
    from torchvision import transforms

    base = Path(root).expanduser()
    folder = base / split if split is not None else base
    layout = f"{base}/{split}/<class>/<image>" if split is not None else f"{base}/<class>/<image>"
    if not folder.is_dir():
        raise DatasetNotFoundError(
            f"image folder {folder} does not exist; expected the ImageNet layout {layout}"
        )
    tf = transforms.Compose(
        [
            transforms.Resize(resize or int(size * 256 / 224)),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    try:
        ds = torchvision.datasets.ImageFolder(str(folder), transform=tf)
    except FileNotFoundError as exc:  # no class folders, or no image files in them
        raise DatasetNotFoundError(
            f"image folder {folder} holds no images ({exc}); expected the ImageNet layout {layout}"
        ) from exc
    ds.source = f"image-folder:{folder}"  # type: ignore[attr-defined]
    return ds
