"""Models probed in the paper (Alain & Bengio, 2016)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import InvalidArgumentError

__all__ = ["SkipMLP", "load_model", "mnist_convnet", "train"]


def mnist_convnet(num_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    """The paper's MNIST convnet (tensorflow/models ``image/mnist/convolutional.py``).

    Input (B, in_channels, 28, 28) -> logits (B, num_classes). Children, in order, with the
    output shape of each for 28x28 inputs:

    ========================  ================  =================
    name                      module            output
    ========================  ================  =================
    ``conv1_preact``          Conv2d 5x5, 32    (B, 32, 28, 28)
    ``conv1_postact``         ReLU              (B, 32, 28, 28)
    ``conv1_postpool``        MaxPool2d 2       (B, 32, 14, 14)
    ``conv2_preact``          Conv2d 5x5, 64    (B, 64, 14, 14)
    ``conv2_postact``         ReLU              (B, 64, 14, 14)
    ``conv2_postpool``        MaxPool2d 2       (B, 64, 7, 7)
    ``flatten``               Flatten           (B, 3136)
    ``fc1_preact``            Linear 3136->512  (B, 512)
    ``fc1_postact``           ReLU              (B, 512)
    ``logits``                Linear 512->C     (B, num_classes)
    ========================  ================  =================

    With the model input (site ``"input"``) these are the paper's probe sites; ``flatten``
    only reshapes ``conv2_postpool``. ReLUs are not in-place, so each site's output is its
    own tensor. Initialisation is PyTorch's default: seed with ``torch.manual_seed`` first.
    """
    return nn.Sequential(
        OrderedDict(
            [
                # padding=2 is TensorFlow's padding="SAME" for a 5x5 kernel at stride 1.
                ("conv1_preact", nn.Conv2d(in_channels, 32, kernel_size=5, padding=2)),
                ("conv1_postact", nn.ReLU()),
                ("conv1_postpool", nn.MaxPool2d(kernel_size=2, stride=2)),
                ("conv2_preact", nn.Conv2d(32, 64, kernel_size=5, padding=2)),
                ("conv2_postact", nn.ReLU()),
                ("conv2_postpool", nn.MaxPool2d(kernel_size=2, stride=2)),
                ("flatten", nn.Flatten()),
                ("fc1_preact", nn.Linear(64 * 7 * 7, 512)),
                ("fc1_postact", nn.ReLU()),
                ("logits", nn.Linear(512, num_classes)),
            ]
        )
    )


class SkipMLP(nn.Module):
    """The pathological model of the paper's section 5.1: ``depth`` fully connected layers of
    ``width`` units with leaky ReLUs, and a skip connection that adds layer ``skip[0]``'s
    output to layer ``skip[1]``'s input.

    Input (B, ...) flattened to (B, in_features) -> logits (B, num_classes). The probe sites
    are ``layers.0`` ... ``layers.{depth-1}`` (each (B, width), after the activation) and
    ``logits``. Weights are drawn N(0, gain^2 / fan_in) and biases as PyTorch's default, so a
    ``gain`` below He's sqrt(2) makes a long chain forget its input (the paper's "garbage
    forwardprop"); seed with ``torch.manual_seed`` first.
    """

    def __init__(self, depth: int = 128, width: int = 128, skip: tuple[int, int] = (0, 64),
                 in_features: int = 784, num_classes: int = 10, *,
                 negative_slope: float = 0.01, gain: float = 1.3):
        super().__init__()
        if not 0 <= skip[0] < skip[1] < depth:
            raise InvalidArgumentError(f"skip={skip} must join two layers 0 <= from < to < "
                                       f"depth={depth}")
        self.skip = skip
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(in_features if k == 0 else width, width),
                          nn.LeakyReLU(negative_slope)) for k in range(depth))
        self.logits = nn.Linear(width, num_classes)
        for layer in [*(block[0] for block in self.layers), self.logits]:
            nn.init.normal_(layer.weight, 0.0, gain / layer.in_features ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, kept = x.flatten(1), None
        for k, block in enumerate(self.layers):
            if k == self.skip[1]:
                h = h + kept
            h = block(h)
            if k == self.skip[0]:
                kept = h
        return self.logits(h)


def small_vit(num_classes: int = 10, in_channels: int = 1, image_size: int = 28,
              patch_size: int = 7, layers: int = 4, hidden: int = 64, heads: int = 4
              ) -> nn.Module:
    """A small torchvision ``VisionTransformer`` for 28x28 images (Fashion-MNIST): 16 patches
    of 7x7 plus a class token, ``layers`` blocks of width ``hidden``; its patch embedding
    takes ``in_channels``. Blocks are ``encoder.layers.encoder_layer_<i>``, each (B, 17,
    hidden) channels last."""
    from torchvision.models import VisionTransformer

    vit = VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=layers,
                            num_heads=heads, hidden_dim=hidden, mlp_dim=2 * hidden,
                            num_classes=num_classes)
    if in_channels != 3:
        vit.conv_proj = nn.Conv2d(in_channels, hidden, kernel_size=patch_size,
                                  stride=patch_size)
    return vit


def load_model(name: str, *, weights: str | None = None, num_classes: int | None = None
               ) -> nn.Module:
    """A model by name: ``"mnist_convnet"`` or any torchvision classification model
    (``"resnet50"``, ``"inception_v3"``, ...), randomly initialised, then loaded from the
    ``weights`` file (a state_dict saved with ``torch.save``; read with
    ``weights_only=True``, so a file holding code is refused). Nothing is downloaded.
    """
    import torch
    import torchvision

    if name == "mnist_convnet":
        model = mnist_convnet(num_classes or 10)
    else:
        known = torchvision.models.list_models(module=torchvision.models)
        if name not in known:
            import difflib

            near = difflib.get_close_matches(name, ["mnist_convnet", *known], n=5)
            raise InvalidArgumentError(f"unknown model {name!r}; closest: {near or known[:10]}")
        kwargs = {"num_classes": num_classes} if num_classes else {}
        if name == "inception_v3":
            kwargs.update(aux_logits=False, init_weights=True)
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        model.load_state_dict(state)
    return model.eval()


def train(model: nn.Module, dataset, *, epochs: int = 1, lr: float = 1e-3, batch_size: int = 64,
          seed: int = 0, device: str | torch.device = "cpu", optimizer: str = "adam",
          momentum: float = 0.9, clip_grad_norm: float | None = None,
          on_epoch: Callable[[int, nn.Module], None] | None = None,
          progress: bool = True) -> list[float]:
    """Train ``model`` in place on ``dataset`` (``(input, label)`` items) with cross-entropy,
    Adam or SGD (with ``momentum``), gradients clipped to ``clip_grad_norm`` (L2 over all
    parameters) if given, in a seeded shuffled order; leaves it in eval mode on its
    device. ``on_epoch(epoch, model)`` runs after each epoch (1, 2, ...), e.g. to keep a
    checkpoint.

    Returns the mean training loss of each epoch.
    """
    if optimizer not in ("adam", "sgd"):
        raise InvalidArgumentError(f"optimizer={optimizer!r}: use 'adam' or 'sgd'")
    from torch.utils.data import DataLoader

    from .datasets import collate

    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen,
                        collate_fn=collate)
    model.to(device).train()
    opt = (torch.optim.Adam(model.parameters(), lr=lr) if optimizer == "adam" else
           torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum))
    losses = []
    for epoch in range(epochs):
        total, count = 0.0, 0
        for x, y in tqdm(loader, desc=f"train epoch {epoch + 1}/{epochs}", unit="batch",
                         disable=not progress, leave=False):
            x, y = x.to(device), torch.as_tensor(y).to(device)
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            if clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
            opt.step()
            total += float(loss.detach()) * len(y)
            count += len(y)
        losses.append(total / max(count, 1))
        if on_epoch is not None:
            model.eval()
            on_epoch(epoch + 1, model)
            model.train()
    model.eval()
    return losses
