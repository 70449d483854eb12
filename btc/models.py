"""Networks: a compact CNN designed for MRI slices, a plain baseline CNN, and torchvision backbones on one channel.

Every model takes ``[B, 1, H, W]`` standardised slices and returns logits ``[B, 4]``
(``forward(x) == head(features(x))``). Each exposes ``features(x)`` (penultimate embedding,
used by monitoring), ``head`` (embedding -> logits) and ``cam_layers``: two convolutional
blocks at 1/4 to 1/16 of the input resolution whose class activation maps
:func:`btc.explain.gradcam` fuses. The last block's map is 4 x 4 at 128 px, too coarse to
point at a lesion of a few millimetres (see ``btc.explain``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from btc.labels import CLASSES

log = logging.getLogger(__name__)

ARCHS = ("compact_cnn", "plain_cnn", "resnet18", "resnet34", "efficientnet_b0", "mobilenet_v3_small")
OWN_ARCHS = ("compact_cnn", "plain_cnn")  # defined here; the others are torchvision's


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class StridedPointwiseConv(nn.Conv2d):
    """A 1x1 convolution with a stride, computed as subsampling then a 1x1 convolution.

    The result (and its gradients) equal ``nn.Conv2d(cin, cout, 1, stride)``'s, with the same
    parameters. It exists because torch 2.14's CPU kernel for a strided 1x1 convolution's
    weight gradient in channels_last corrupts the heap (the process aborts with "double free
    or corruption" or a segfault) when the input has 2 to 12 channels and the batch is odd,
    as in ``-s model.width=8`` with an odd last batch.
    """

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__(cin, cout, 1, 1, bias=False)
        self.step = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x[:, :, ::self.step, ::self.step])


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with a shortcut; ``stride`` 2 halves the resolution."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, stride)
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = (
            nn.Identity() if stride == 1 and cin == cout
            else nn.Sequential(StridedPointwiseConv(cin, cout, stride), nn.BatchNorm2d(cout))
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class CompactMRINet(nn.Module):
    """A small residual CNN for single-channel MRI slices, fast on a CPU.

    A strided stem brings a 128 px slice to 64 px at once (MRI slices carry little detail at
    the pixel level), then four residual stages of widths w, 2w, 4w, 8w halve the resolution
    each time, each of ``depth`` blocks; global average pooling and dropout feed the classifier.
    """

    def __init__(self, num_classes: int = len(CLASSES), width: int = 32, dropout: float = 0.2, in_channels: int = 1,
                 depth: int = 1):
        super().__init__()
        w = width
        self.stem = nn.Sequential(_conv_bn(in_channels, w // 2, 2), _conv_bn(w // 2, w))
        blocks = []
        for cin, cout in ((w, w), (w, 2 * w), (2 * w, 4 * w), (4 * w, 8 * w)):
            blocks += [ResidualBlock(cin, cout, 2)] + [ResidualBlock(cout, cout) for _ in range(depth - 1)]
        self.stages = nn.Sequential(*blocks)
        self.depth = depth
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(8 * w, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @property
    def cam_layers(self) -> tuple[nn.Module, ...]:
        return self.stages[self.depth - 1], self.stages[2 * self.depth - 1]  # ends of stages 1 and 2: 1/4 and 1/8

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.stages(self.stem(x))), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class PlainCNN(nn.Module):
    """The notebook baseline, kept to compare against: five plain convolution blocks, no shortcuts.

    Each block is a 3x3 convolution, batch norm, ReLU and 2x2 max-pooling (32, 64, 128, 256,
    256 channels, from the full input resolution); the 4x4 map is flattened into a dense layer
    of 256 units, then the classifier. 2.0 M parameters and 3.2x the multiply-adds of
    ``compact_cnn`` at 128 px.
    """

    def __init__(self, num_classes: int = len(CLASSES), dropout: float = 0.2, in_channels: int = 1):
        super().__init__()
        chans = (in_channels, 32, 64, 128, 256, 256)
        self.blocks = nn.Sequential(
            *(nn.Sequential(_conv_bn(cin, cout), nn.MaxPool2d(2)) for cin, cout in zip(chans, chans[1:])))
        self.dense = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Dropout(dropout), nn.Linear(256 * 16, 256),
                                   nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(256, num_classes))

    @property
    def cam_layers(self) -> tuple[nn.Module, ...]:
        return self.blocks[2][0], self.blocks[3][0]  # third and fourth convolutions, before pooling: 1/4 and 1/8

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(self.blocks(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TorchvisionClassifier(nn.Module):
    """A torchvision backbone whose first convolution takes one channel."""

    def __init__(self, arch: str, num_classes: int, dropout: float, pretrained: bool):
        super().__init__()
        import torchvision

        weights = "DEFAULT" if pretrained else None
        try:
            net = torchvision.models.get_model(arch, weights=weights)
        except Exception as err:  # download failures surface as URLError/RuntimeError/OSError
            raise RuntimeError(
                f"cannot load pretrained {arch} weights ({err}); without the internet use --init-weights PATH"
            ) from None
        if arch.startswith("resnet"):
            net.conv1 = _one_channel(net.conv1)
            dim = net.fc.in_features
            net.fc = nn.Identity()
            self.cams = (net.layer2, net.layer3)  # 1/8 and 1/16
        else:  # efficientnet / mobilenet: features[0][0] is the stem convolution
            net.features[0][0] = _one_channel(net.features[0][0])
            dim = next(m for m in net.classifier if isinstance(m, nn.Linear)).in_features
            net.classifier = nn.Identity()
            self.cams = _last_blocks_at_strides(net.features, (8, 16))
        self.backbone = net
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, num_classes))
        self.register_load_state_dict_pre_hook(_drop_old_cam_copy)

    @property
    def cam_layers(self) -> tuple[nn.Module, ...]:
        return self.cams

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _drop_old_cam_copy(module, state_dict, prefix, *_):
    """Files saved up to commit e6b6a26 also hold the explanation block under ``cam.``: a second
    copy of backbone weights. Dropping it lets those files load."""
    for key in [k for k in state_dict if k.startswith(f"{prefix}cam.")]:
        del state_dict[key]


def _last_blocks_at_strides(features: nn.Sequential, strides: tuple[int, ...], probe: int = 64) -> tuple[nn.Module, ...]:
    """The last block of ``features`` whose output is at each of ``strides`` (found with one probe forward)."""
    x, last, was_training = torch.zeros(1, 1, probe, probe), {}, features.training
    features.eval()  # in training mode the probe would move batch-norm statistics (pretrained ones included)
    with torch.no_grad():
        for block in features:
            x = block(x)
            last[probe // x.shape[-1]] = block
    features.train(was_training)
    return tuple(last[s] for s in strides)


def _one_channel(conv: nn.Conv2d) -> nn.Conv2d:
    """The same convolution on one input channel; RGB weights are summed so pretrained filters keep their response."""
    new = nn.Conv2d(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None)
    with torch.no_grad():
        new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def build_model(
    arch: str = "compact_cnn",
    *,
    num_classes: int = len(CLASSES),
    width: int = 32,
    depth: int = 1,
    dropout: float = 0.2,
    pretrained: bool = False,
    init_weights: Path | None = None,
) -> nn.Module:
    """Create a classifier.

    Args:
        arch: one of :data:`ARCHS`.
        num_classes: output classes.
        width: base width of ``compact_cnn``.
        depth: residual blocks per stage of ``compact_cnn``.
        dropout: dropout before the classifier.
        pretrained: torchvision ImageNet weights (needs the internet).
        init_weights: a state_dict file to start from (offline weights). 3-channel first
            convolutions are summed to one channel; a classifier of another size is skipped.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")
    if pretrained and arch in OWN_ARCHS:
        raise ValueError(f"{arch} has no pretrained weights (it trains from scratch); --pretrained needs one of "
                         f"{', '.join(a for a in ARCHS if a not in OWN_ARCHS)}, or pass --init-weights PATH")
    if arch == "compact_cnn":
        model: nn.Module = CompactMRINet(num_classes, width, dropout, depth=depth)
    elif arch == "plain_cnn":
        model = PlainCNN(num_classes, dropout)
    else:
        model = TorchvisionClassifier(arch, num_classes, dropout, pretrained)
    if init_weights is not None:
        load_init_weights(model, Path(init_weights))
    return model


# Classifier layers of a weights file: of another class count (ImageNet's 1,000), so never loaded.
CLASSIFIER_PREFIXES = ("backbone.fc.", "backbone.classifier.", "head.")


def load_init_weights(model: nn.Module, path: Path) -> list[str]:
    """Load the matching tensors of a weights file into ``model``; returns the keys skipped.

    The file may hold a plain ``state_dict``, or one under ``"model"`` (btc's ``best.pt``) or
    ``"state_dict"`` (btc's ``model.pt``). RGB first-layer filters are summed into one channel.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a weights file, fewer than half of the model's weight tensors match, or
            the file holds tensors (besides a classifier) the model has no place for (weights of
            another architecture); the message says which.
    """
    if not path.is_file():
        raise FileNotFoundError(f"--init-weights file {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, KeyError, ... for a file that is not one
        raise ValueError(f"--init-weights file {str(path)!r} is not a PyTorch weights file ({type(err).__name__}: {err})"
                         ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--init-weights file {str(path)!r} holds a {type(state).__name__}, not a state_dict of tensors")
    own = model.state_dict()
    prefixed = {k if k in own else f"backbone.{k}": v for k, v in state.items()}
    usable, skipped = {}, []
    for k, v in prefixed.items():
        if k in own and v.ndim == 4 and v.shape[1] == 3 and own[k].shape[1] == 1:
            v = v.sum(dim=1, keepdim=True)
        (usable.__setitem__(k, v) if k in own and own[k].shape == v.shape else skipped.append(k))
    weights = [k for k, _ in model.named_parameters()]
    loaded = sum(k in usable for k in weights)
    if loaded < len(weights) / 2:
        raise ValueError(f"--init-weights file {str(path)!r} matches only {loaded} of the model's {len(weights)} weight "
                         f"tensors by name and shape; is it for another architecture?")
    # Tensors the model has no place for, beyond a classifier head of another class count: the file
    # is of a larger architecture (resnet34 into resnet18 matches every resnet18 name and shape).
    unplaced = [k for k in skipped if not k.startswith(CLASSIFIER_PREFIXES)]
    if unplaced:
        raise ValueError(f"--init-weights file {str(path)!r} holds {len(unplaced)} tensors this {type(model).__name__} "
                         f"has no place for ({', '.join(unplaced[:4])}{' ...' if len(unplaced) > 4 else ''}); is it "
                         "for another, larger architecture?")
    model.load_state_dict(usable, strict=False)
    missing = [k for k in weights if k not in usable]
    if missing:
        log.warning("--init-weights %s: loaded %d of %d weight tensors; left as initialised (absent or of another "
                    "shape in the file): %s", path, loaded, len(weights),
                    ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else ""))
    return skipped
