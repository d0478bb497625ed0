import pytest
import torch
from torch import nn

from bn_lightning.app.models import MLP, MODELS, ResNet20, SmallCNN, build_model, resnet20
from bn_lightning.layers.batchnorm import ScratchBatchNormMixin

NORMS = ["torch", "scratch"]


def _bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _make(name: str, size: int, norm: str, in_channels: int = 3) -> nn.Module:
    # small widths keep the 32x32 runs fast; the architecture is the same
    if name == "mlp":
        return MLP(in_features=in_channels * size * size, hidden=(32, 16), num_classes=7, norm=norm)
    if name == "cnn":
        return SmallCNN(in_channels=in_channels, num_classes=7, channels=(8, 16), norm=norm)
    return ResNet20(num_classes=7, in_channels=in_channels, norm=norm, width=4)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("size", [8, 32])
@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet20"])
def test_output_shape(name, size, norm):
    torch.manual_seed(0)
    in_channels = 1 if size == 8 else 3
    model = _make(name, size, norm, in_channels)
    x = torch.randn(4, in_channels, size, size)
    assert model(x).shape == (4, 7)
    model.eval()
    assert model(x[:1]).shape == (1, 7)
    assert model.norm == norm


def test_mlp_accepts_flat_input():
    model = MLP(in_features=64, hidden=(16,), num_classes=10)
    assert model(torch.randn(5, 64)).shape == (5, 10)
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 10)


def test_mlp_dropout_and_no_hidden():
    assert any(isinstance(m, nn.Dropout) for m in MLP(dropout=0.5).modules())
    assert not any(isinstance(m, nn.Dropout) for m in MLP().modules())
    linear = MLP(in_features=8, hidden=(), num_classes=3)
    assert _bn_layers(linear) == []
    assert linear(torch.randn(2, 8)).shape == (2, 3)


def test_small_cnn_deep_stack_on_8x8():
    # ceil_mode pooling keeps a 1x1 map instead of failing, so 4 blocks still run on digits
    model = SmallCNN(in_channels=1, channels=(4, 4, 4, 4))
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet20"])
def test_bn_classes_follow_norm(name):
    scratch_bns = _bn_layers(build_model(name, norm="scratch"))
    torch_bns = _bn_layers(build_model(name, norm="torch"))
    assert scratch_bns and len(scratch_bns) == len(torch_bns)
    assert all(isinstance(m, ScratchBatchNormMixin) for m in scratch_bns)
    assert all(not isinstance(m, ScratchBatchNormMixin) for m in torch_bns)
    assert all(type(m).__module__.startswith("torch.nn") for m in torch_bns)
    assert all(m.weight.eq(1).all() and m.bias.eq(0).all() for m in scratch_bns + torch_bns)


@pytest.mark.parametrize("size", [8, 32])
@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet20"])
def test_torch_and_scratch_are_interchangeable(name, size):
    in_channels = 1 if size == 8 else 3
    torch.manual_seed(0)
    ref = _make(name, size, "torch", in_channels)
    torch.manual_seed(0)
    ours = _make(name, size, "scratch", in_channels)
    assert list(ref.state_dict()) == list(ours.state_dict())
    # BN init draws no random numbers, so the same seed gives the same weights
    for key, value in ref.state_dict().items():
        assert torch.equal(value, ours.state_dict()[key]), key

    # perturb the reference so that loading actually transfers something, including running stats
    with torch.no_grad():
        for bn in _bn_layers(ref):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    ours.load_state_dict(ref.state_dict())

    x = torch.randn(6, in_channels, size, size)
    ref.train()
    ours.train()
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    for a, b in zip(_bn_layers(ref), _bn_layers(ours), strict=True):
        torch.testing.assert_close(b.running_mean, a.running_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.running_var, a.running_var, atol=1e-5, rtol=1e-5)
    ref.eval()
    ours.eval()
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


def test_resnet20_structure():
    model = ResNet20()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    # 19 3x3 convs (1 stem + 3 stages x 3 blocks x 2) each followed by a BN, plus the 1x1 conv + BN projection
    # shortcuts where stages 2 and 3 halve the resolution and double the width: 19 + 2 = 21 of each
    assert len(convs) == 21
    assert sum(m.kernel_size == (3, 3) for m in convs) == 19
    assert len(_bn_layers(model)) == 21
    assert all(m.bias is None for m in convs)
    # 0.27M in the paper (option A shortcuts); the two projections add 2,944 parameters
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 272_474
    assert model.fc.in_features == 64


def test_resnet20_function_and_width():
    model = resnet20(num_classes=100, width=8, norm="scratch")
    assert isinstance(model, ResNet20)
    assert model.fc.in_features == 32 and model.fc.out_features == 100
    assert model.norm == "scratch"


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("mlp", MLP),
        ("MLP", MLP),
        ("cnn", SmallCNN),
        ("small_cnn", SmallCNN),
        ("resnet20", ResNet20),
        ("ResNet-20", ResNet20),
        ("resnet_20", ResNet20),
    ],
)
def test_build_model_names(name, cls):
    model = build_model(name, num_classes=3)
    assert type(model) is cls
    assert model.num_classes == 3


def test_build_model_unknown_name():
    with pytest.raises(ValueError, match="resnet50") as excinfo:
        build_model("resnet50")
    for allowed in ("mlp", "cnn", "resnet20"):
        assert allowed in str(excinfo.value)
    assert set(MODELS) >= {"mlp", "cnn", "resnet20"}


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: MLP(in_features=0), "in_features"),
        (lambda: MLP(hidden=(8, 0)), "hidden"),
        (lambda: MLP(dropout=1.0), "dropout"),
        (lambda: MLP(num_classes=0), "num_classes"),
        (lambda: MLP(norm="group"), "torch"),
        (lambda: SmallCNN(channels=()), "channels"),
        (lambda: SmallCNN(in_channels=0), "in_channels"),
        (lambda: SmallCNN(norm="bogus"), "scratch"),
        (lambda: ResNet20(width=0), "width"),
        (lambda: ResNet20(norm="bogus"), "scratch"),
    ],
)
def test_bad_arguments(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()
