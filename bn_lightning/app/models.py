"""Small networks for the bundled datamodules, with a switchable BatchNorm implementation.

Provides :class:`MLP`, :class:`SmallCNN`, :class:`ResNet20` (and :func:`resnet20`), :class:`BasicBlock` and
:func:`build_model` (name -> model, for configs). Every BN layer comes from
:func:`~bn_lightning.layers.factory.get_batchnorm_class`, so ``norm="torch"`` and ``norm="scratch"`` build the same
architecture with the same ``state_dict`` keys; only the BN ``forward`` differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from bn_lightning.layers.factory import get_batchnorm_class, normalize_name
from bn_lightning.validation import check_int

__all__ = ["MLP", "MODELS", "BasicBlock", "ResNet20", "SmallCNN", "build_model", "resnet20"]


def _check_positive_seq(owner: str, name: str, values: Sequence[int], allow_empty: bool = True) -> tuple[int, ...]:
    values = tuple(values)
    if not allow_empty and not values:
        raise ValueError(f"{owner}: {name} must be a non-empty sequence of positive ints, got {values!r}")
    for v in values:
        check_int(owner, f"every entry of {name}", v)
    return values


def _init_weights(module: nn.Module) -> None:
    """He (kaiming) init for convs, BN weight 1 / bias 0; linears keep torch's default init."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MLP(nn.Module):
    """``Linear -> BatchNorm1d -> ReLU [-> Dropout]`` per hidden layer, then a final ``Linear``.

    Inputs of more than two dimensions (e.g. images ``(N, C, H, W)``) are flattened to ``(N, C*H*W)`` first.

    Args:
        in_features: number of input features (``C*H*W`` for images).
        hidden: width of each hidden layer; empty for a plain linear classifier.
        num_classes: number of output logits.
        norm: BN implementation, ``"torch"`` or ``"scratch"`` (see :func:`~bn_lightning.get_batchnorm_class`).
        dropout: dropout probability after each ReLU, in ``[0, 1)``; 0 adds no dropout layer.

    Raises:
        ValueError: a non-positive size, a ``dropout`` outside ``[0, 1)`` or an unknown ``norm``.

    Shape:
        - Input: ``(N, in_features)`` or ``(N, *)`` with ``in_features`` elements per sample
        - Output: ``(N, num_classes)``

    Example::

        >>> import torch
        >>> from bn_lightning.app.models import MLP
        >>> model = MLP(in_features=64, hidden=(32,), num_classes=10, norm="scratch")
        >>> model(torch.randn(4, 1, 8, 8)).shape
        torch.Size([4, 10])
        >>> type(model.net[1]).__module__
        'bn_lightning.layers.batchnorm'
    """

    def __init__(
        self,
        in_features: int = 64,
        hidden: Sequence[int] = (128, 64),
        num_classes: int = 10,
        norm: str = "torch",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_int(type(self).__name__, "in_features", in_features)
        hidden = _check_positive_seq(type(self).__name__, "hidden", hidden)
        check_int(type(self).__name__, "num_classes", num_classes)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}")
        bn_cls = get_batchnorm_class(norm, 1)
        self.norm = norm
        self.in_features = in_features
        self.num_classes = num_classes
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            # no bias: the BN shift (beta) that follows makes it redundant
            layers += [nn.Linear(width, h, bias=False), bn_cls(h), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Logits for ``x``, flattened to ``(N, -1)`` if it has more than two dimensions."""
        if x.dim() > 2:
            x = x.flatten(1)
        return self.net(x)


class SmallCNN(nn.Module):
    """``Conv3x3 -> BatchNorm2d -> ReLU -> MaxPool2d(2)`` per entry of ``channels``, global average pool, ``Linear``.

    Pooling uses ``ceil_mode=True``, so a 1x1 (or odd-sized) feature map is kept rather than rejected: the default two
    blocks take 8x8 digits to 2x2 and 32x32 images to 8x8, and deeper stacks still run on 8x8 inputs.

    Args:
        in_channels: input channels (1 for digits, 3 for RGB).
        num_classes: number of output logits.
        channels: output channels of each conv block (at least one).
        norm: BN implementation, ``"torch"`` or ``"scratch"``.

    Raises:
        ValueError: a non-positive size, an empty ``channels`` or an unknown ``norm``.

    Shape:
        - Input: ``(N, in_channels, H, W)``
        - Output: ``(N, num_classes)``

    Example::

        >>> import torch
        >>> from bn_lightning.app.models import SmallCNN
        >>> model = SmallCNN(in_channels=1, channels=(8, 16), norm="scratch")
        >>> model(torch.randn(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: Sequence[int] = (32, 64),
        norm: str = "torch",
    ) -> None:
        super().__init__()
        check_int(type(self).__name__, "in_channels", in_channels)
        check_int(type(self).__name__, "num_classes", num_classes)
        channels = _check_positive_seq(type(self).__name__, "channels", channels, allow_empty=False)
        bn_cls = get_batchnorm_class(norm, 2)
        self.norm = norm
        self.num_classes = num_classes
        layers: list[nn.Module] = []
        width = in_channels
        for c in channels:
            layers += [
                nn.Conv2d(width, c, kernel_size=3, padding=1, bias=False),
                bn_cls(c),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            width = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Logits for a batch of images ``x``."""
        return self.fc(self.pool(self.features(x)).flatten(1))


class BasicBlock(nn.Module):
    """The two-conv residual block of ResNet-18/34 and the CIFAR ResNets.

    ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; the shortcut is the identity, or a strided 1x1 conv + BN
    projection when the stride or the channel count changes.

    Args:
        in_planes: input channels.
        planes: output channels.
        stride: stride of the first conv (and of the projection).
        norm: BN implementation, ``"torch"`` or ``"scratch"``.

    Example::

        >>> import torch
        >>> from bn_lightning.app.models import BasicBlock
        >>> BasicBlock(16, 32, stride=2)(torch.randn(2, 16, 8, 8)).shape
        torch.Size([2, 32, 4, 4])
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, norm: str = "torch") -> None:
        super().__init__()
        bn_cls = get_batchnorm_class(norm, 2)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = bn_cls(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = bn_cls(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                bn_cls(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        """Residual output of the block."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet-20 for CIFAR-sized inputs (He et al., 2016, section 4.2), with a switchable BN implementation.

    A 3x3 stem conv, then three stages of three :class:`BasicBlock` at widths ``width``, ``2*width``, ``4*width``
    (strides 1, 2, 2), global average pooling and a ``Linear``: 19 convs plus the classifier, each conv followed by
    BN. Where a stage changes shape the shortcut is a 1x1 conv + BN projection (option B) rather than the paper's
    zero-padding (option A), which adds two small convs and two BNs: about 0.27M parameters at ``width=16``.

    Args:
        num_classes: number of output logits.
        in_channels: input channels (3 for RGB, 1 for digits).
        norm: BN implementation, ``"torch"`` or ``"scratch"``.
        width: channels of the first stage (16 in the paper).

    Raises:
        ValueError: a non-positive size or an unknown ``norm``.

    Shape:
        - Input: ``(N, in_channels, H, W)``; 32x32 as in the paper, 8x8 digits work too (4x smaller maps)
        - Output: ``(N, num_classes)``

    Example::

        >>> import torch
        >>> from bn_lightning.app.models import ResNet20
        >>> model = ResNet20(num_classes=10, in_channels=1, norm="scratch", width=4)
        >>> model(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, norm: str = "torch", width: int = 16) -> None:
        super().__init__()
        check_int(type(self).__name__, "num_classes", num_classes)
        check_int(type(self).__name__, "in_channels", in_channels)
        check_int(type(self).__name__, "width", width)
        bn_cls = get_batchnorm_class(norm, 2)
        self.norm = norm
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = bn_cls(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_stage(width, width, stride=1, norm=norm)
        self.layer2 = self._make_stage(width, 2 * width, stride=2, norm=norm)
        self.layer3 = self._make_stage(2 * width, 4 * width, stride=2, norm=norm)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)
        _init_weights(self)

    @staticmethod
    def _make_stage(in_planes: int, planes: int, stride: int, norm: str, blocks: int = 3) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride=stride, norm=norm)]
        layers += [BasicBlock(planes, planes, stride=1, norm=norm) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Logits for a batch of images ``x``."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


def resnet20(**kwargs: Any) -> ResNet20:
    """Build a :class:`ResNet20`; ``kwargs`` are passed to its constructor.

    Example::

        >>> from bn_lightning.app.models import resnet20
        >>> resnet20(num_classes=100).fc.out_features
        100
    """
    return ResNet20(**kwargs)


MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn": SmallCNN, "smallcnn": SmallCNN, "resnet20": ResNet20}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a model by name: ``"mlp"``, ``"cnn"`` (alias ``"small_cnn"``) or ``"resnet20"``.

    Names are normalised (case, ``-``/``_`` ignored), so ``"ResNet-20"`` and ``"resnet_20"`` work too.

    Args:
        name: model name.
        **kwargs: passed to the model's constructor (e.g. ``norm="scratch"``, ``num_classes=10``).

    Returns:
        The model.

    Raises:
        ValueError: unknown ``name``, listing the allowed names.

    Example::

        >>> from bn_lightning.app.models import build_model
        >>> model = build_model("ResNet-20", in_channels=1, norm="scratch", width=4)
        >>> type(model).__name__, model.norm
        ('ResNet20', 'scratch')
    """
    key = normalize_name(name)
    if key not in MODELS:
        raise ValueError(f"Unknown model name {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[key](**kwargs)
