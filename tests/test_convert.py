"""Tests for tilefcn.convert: convolutionalize, bilinear upsampling head, crop arithmetic."""

from __future__ import annotations

import functools
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tilefcn.convert import (
    Crop2d,
    bilinear_upsample,
    convolutionalize,
    crop_to_input,
    with_bilinear_head,
)
from tilefcn.geometry import Geometry

TOL = 1e-5


# -- helpers -------------------------------------------------------------------------------
def random_trunk(seed: int):
    """Unpadded random trunk + its tight patch size (every patch row used), stride, output."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    c = in_ch = rng.choice([1, 3])
    layers, specs = [], []
    for _ in range(rng.randint(2, 4)):
        if rng.random() < 0.6:
            k, s = (rng.choice([1, 2, 3]), rng.choice([1, 3])), rng.choice([1, 1, 2])
            out = rng.randint(2, 6)
            layers += [nn.Conv2d(c, out, k, stride=s), nn.ReLU()]
            c = out
            specs.append((*k, s))
        else:
            k, s = rng.choice([(2, 2), (3, 2), (2, 1), (3, 3)])
            layers.append(nn.MaxPool2d(k, s))
            specs.append((k, k, s))
    hw = (rng.randint(1, 3), rng.randint(1, 3))
    patch, stride = list(hw), 1
    for ky, kx, s in reversed(specs):  # walk back: input = (output - 1) * stride + kernel
        patch = [(patch[0] - 1) * s + ky, (patch[1] - 1) * s + kx]
        stride *= s
    return nn.Sequential(*layers), in_ch, c, tuple(patch), stride, hw


def make_head(kind: str, c: int, hw: tuple[int, int]) -> nn.Sequential:
    n = c * hw[0] * hw[1]
    return nn.Sequential(*{
        "linear": [nn.Flatten(), nn.Dropout(), nn.Linear(n, 7), nn.ReLU(), nn.Dropout(),
                   nn.Linear(7, 5)],
        "gap": [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(), nn.Linear(c, 5)],
        "gmp": [nn.AdaptiveMaxPool2d((1, 1)), nn.Flatten(), nn.Linear(c, 4), nn.Softmax(dim=1)],
        "identity_pool": [nn.AdaptiveAvgPool2d(hw), nn.Flatten(), nn.Linear(n, 6),
                          nn.LogSoftmax(-1)],
        "gap_only": [nn.AdaptiveAvgPool2d(1)],
    }[kind])


def sliding(classifier: nn.Module, image: torch.Tensor, patch, stride: int) -> torch.Tensor:
    """Independent reference: the classifier on every window, batched with Tensor.unfold."""
    win = image.unfold(2, patch[0], stride).unfold(3, patch[1], stride)  # 1, C, nh, nw, ph, pw
    nh, nw = win.shape[2:4]
    batch = win[0].permute(1, 2, 0, 3, 4).reshape(nh * nw, image.shape[1], *patch)
    return classifier(batch).reshape(nh, nw, -1).permute(2, 0, 1)


# -- convolutionalize: exactness -------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "gap", "gmp", "identity_pool", "gap_only"])
@pytest.mark.parametrize("seed", range(6))
def test_dense_equals_sliding_window(kind, seed):
    trunk, in_ch, c, patch, stride, hw = random_trunk(seed)
    classifier = nn.Sequential(trunk, make_head(kind, c, hw)).eval()  # nested Sequentials
    net = convolutionalize(classifier, patch)
    rng = random.Random(100 + seed)
    with torch.no_grad():
        x = torch.randn(3, in_ch, *patch)
        assert net(x).shape[2:] == (1, 1)
        assert (net(x).flatten(1) - classifier(x).flatten(1)).abs().max() <= TOL
        size = [2 * p + stride * rng.randint(0, 3) + rng.randint(1, stride + 2) for p in patch]
        image = torch.randn(1, in_ch, *size)
        dense, ref = net(image)[0], sliding(classifier, image, patch, stride)
    windows = [(n - p) // stride + 1 for n, p in zip(size, patch, strict=True)]
    assert tuple(dense.shape[1:]) == tuple(ref.shape[1:]) == tuple(windows)
    assert (dense - ref).abs().max() <= TOL


def test_patch_with_unused_rows_gives_extra_exact_outputs():
    torch.manual_seed(0)
    classifier = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3),
                               nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 3)).eval()
    patch = 21  # 21 -> 19 -> 9 -> 7 -> 3: the 21st row is dropped by the first pool
    net = convolutionalize(classifier, patch)
    image = torch.randn(1, 2, 45, 45)
    with torch.no_grad():
        dense, ref = net(image)[0], sliding(classifier, image, (patch, patch), 4)
    assert ref.shape[1:] == (7, 7) and dense.shape[1:] == (7, 7)
    image = torch.randn(1, 2, 44, 44)  # window 6 would need row 44, which the classifier drops
    with torch.no_grad():
        dense, ref = net(image)[0], sliding(classifier, image, (patch, patch), 4)
    assert ref.shape[1:] == (6, 6) and dense.shape[1:] == (7, 7)
    assert (dense[:, :6, :6] - ref).abs().max() <= TOL


class VGGLike(nn.Module):
    """torchvision layout: features / avgpool / classifier, flatten in forward()."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        layers, c = [], 3
        for block, convs in enumerate([1, 1, 2, 2, 2]):
            out = width * min(2 ** block, 2)
            for _ in range(convs):
                layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(inplace=True)]
                c = out
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(nn.Linear(c * 49, 32), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(32, 32), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(32, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def test_vgg_classifier_at_224_gives_6x6_grid_on_384():
    torch.manual_seed(0)
    vgg = VGGLike().eval()
    net = convolutionalize(vgg, 224)
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in net.modules())  # identity: gone
    fc6 = next(m for m in net if isinstance(m, nn.Conv2d) and m.kernel_size == (7, 7))
    assert fc6.weight.shape == (32, 16, 7, 7)
    assert torch.equal(fc6.weight.flatten(1), vgg.classifier[0].weight)  # C-major flatten
    with torch.no_grad():
        x = torch.randn(2, 3, 224, 224)
        assert (net(x).flatten(1) - vgg(x)).abs().max() <= TOL
        assert net(torch.randn(1, 3, 384, 384)).shape == (1, 10, 6, 6)  # (384-224)/32 + 1


class TrunkHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.Conv2d(4, 5, 3))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(5, 3, 1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def test_trunk_head_layout_and_1x1_conv_after_gap():
    torch.manual_seed(1)
    model = TrunkHead().eval()
    net = convolutionalize(model, 16)
    image = torch.randn(1, 3, 37, 30)
    with torch.no_grad():
        dense, ref = net(image)[0], sliding(model, image, (16, 16), 2)
    assert dense.shape == ref.shape == (3, 11, 8)
    assert (dense - ref).abs().max() <= TOL


def test_input_model_untouched_modes_and_dtype_kept():
    torch.manual_seed(2)
    classifier = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                               nn.Linear(4 * 6 * 6, 2)).double()
    before = {k: v.clone() for k, v in classifier.state_dict().items()}
    net = convolutionalize(classifier, (8, 8))
    assert net.training and all(m.training for m in net.modules())
    assert all(p.dtype == torch.float64 for p in net.parameters())
    with torch.no_grad():
        net[-1].weight.zero_()
    assert isinstance(classifier[-1], nn.Linear)
    assert all(torch.equal(v, classifier.state_dict()[k]) for k, v in before.items())
    classifier.eval()
    net = convolutionalize(classifier, 8)
    assert not net.training and not any(m.training for m in net.modules())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert net(x).dtype == torch.float64
    assert torch.allclose(net(x).flatten(1), classifier(x), atol=1e-12)


# -- convolutionalize: errors ----------------------------------------------------------------
def conv_trunk() -> list[nn.Module]:
    return [nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2)]


@pytest.mark.parametrize(("layers", "patch", "match"), [
    ([*conv_trunk(), nn.AdaptiveAvgPool2d(1), nn.Linear(4, 2)], 16,
     r"'4' \(Linear\) is not preceded by a Flatten"),
    ([*conv_trunk(), nn.Linear(7, 2)], 16, r"'3' \(Linear\) is not preceded by a Flatten"),
    ([*conv_trunk(), nn.Flatten(), nn.Linear(4 * 7 * 7, 3), nn.BatchNorm1d(3)], 16,
     r"'5' \(BatchNorm1d\) is not supported"),
    ([*conv_trunk(), nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 2, 3)], 16,
     r"'4' \(Conv2d\) is not supported"),
    ([*conv_trunk(), nn.Flatten(), nn.Linear(4 * 7 * 7, 3), nn.Softmax(dim=0)], 16,
     r"'5' \(Softmax\) is not supported"),
    ([*conv_trunk(), nn.Flatten(), nn.Linear(4 * 7 * 7, 3), nn.Flatten()], 16,
     r"'5' \(Flatten\) is not supported"),
    ([*conv_trunk(), nn.Flatten(), nn.Linear(99, 2)], 16, r"'4' \(Linear\) expects 99 inputs"),
    ([*conv_trunk(), nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten(), nn.Linear(16, 2)], 16,
     r"'3' \(AdaptiveAvgPool2d\).*neither global"),
    ([*conv_trunk(), nn.Flatten()], 16, r"Flatten .* not followed by a Linear"),
    ([*conv_trunk(), nn.Conv2d(4, 4, 3)], 16, r"no Flatten, Linear or adaptive pooling head"),
    ([*conv_trunk(), nn.Flatten(), nn.Linear(4, 2)], 3, r"'2' \(MaxPool2d\).*patch too small"),
    ([*conv_trunk(), nn.Flatten(), nn.Linear(4, 2)], 2, r"'0' \(Conv2d\).*patch too small"),
])
def test_unsupported_layouts_raise_naming_the_layer(layers, patch, match):
    with pytest.raises(ValueError, match=match):
        convolutionalize(nn.Sequential(*layers), patch)


def test_bad_arguments():
    model = nn.Sequential(*conv_trunk(), nn.AdaptiveAvgPool2d(1))
    for patch in (0, (16,), (16, -1), True, 2.5):
        with pytest.raises(ValueError, match="patch_size"):
            convolutionalize(model, patch)
    with pytest.raises(TypeError, match="nn.Module"):
        convolutionalize(lambda x: x, 16)
    with pytest.raises(TypeError, match="cannot read the layers"):
        convolutionalize(nn.Linear(3, 3), 16)
    with pytest.raises(ValueError, match="in_channels"):
        convolutionalize(nn.Sequential(nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1)), 16)
    net = convolutionalize(nn.Sequential(nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1)), 16,
                           in_channels=2)
    assert net(torch.randn(1, 2, 20, 16)).shape == (1, 2, 3, 1)


class MobileNetLike(nn.Module):  # features/classifier, but forward() pools globally
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        self.classifier = nn.Sequential(nn.Linear(4, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


class FirstClassOnly(TrunkHead):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[:, :1]


def test_container_whose_forward_is_not_the_layer_sequence_is_refused():
    with pytest.raises(ValueError, match=r"'classifier.0' \(Linear\) expects 4 inputs"):
        convolutionalize(MobileNetLike(), 16)
    with pytest.raises(ValueError, match=r"forward\(\) is not the assumed sequence"):
        convolutionalize(FirstClassOnly(), 16)


# -- bilinear upsampling -----------------------------------------------------------------------
def upsample_filt(size: int) -> torch.Tensor:
    """The FCN reference implementation (surgery.py), transcribed."""
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    og = torch.arange(size, dtype=torch.float64)
    f = 1 - (og - center).abs() / factor
    return f[:, None] * f[None, :]


@pytest.mark.parametrize("factor", [1, 2, 3, 4, 8])
def test_bilinear_kernel_structure(factor):
    up = bilinear_upsample(3, factor)
    k = 2 * factor - factor % 2
    assert isinstance(up, nn.ConvTranspose2d) and up.bias is None
    assert up.weight.shape == (3, 1, k, k) and up.groups == 3
    assert up.stride == (factor, factor) and up.padding == (0, 0)
    for c in range(3):
        assert torch.allclose(up.weight[c, 0].double(), upsample_filt(k), atol=1e-7)
    x = torch.zeros(1, 3, 5, 5)
    x[0, 1] = torch.randn(5, 5)
    with torch.no_grad():
        y = up(x)
    assert y.shape == (1, 3, 6 * factor - factor % 2, 6 * factor - factor % 2)
    assert y[0, 0].abs().max() == 0 and y[0, 2].abs().max() == 0 and y[0, 1].abs().max() > 0


def test_bilinear_kernel_known_values():
    f2, f3 = torch.tensor([0.25, 0.75, 0.75, 0.25]), torch.tensor([1, 2, 3, 2, 1]) / 3
    assert torch.allclose(bilinear_upsample(1, 2).weight[0, 0], torch.outer(f2, f2))
    assert torch.allclose(bilinear_upsample(1, 3).weight[0, 0], torch.outer(f3, f3))


@pytest.mark.parametrize("factor", [2, 3, 4, 8])
def test_bilinear_matches_interpolate_up_to_documented_shift(factor):
    torch.manual_seed(factor)
    n = 16
    x = torch.randn(1, 4, n, n)
    with torch.no_grad():
        y = bilinear_upsample(4, factor)(x)
    ref = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    # interior: the source coordinate (j + 1/2)/factor - 1/2 lies in [0, n - 1]
    lo = math.ceil((factor - 1) / 2)
    hi = math.floor(factor * (n - 1) + (factor - 1) / 2) + 1
    shift = factor // 2
    got = y[:, :, lo + shift:hi + shift, lo + shift:hi + shift]
    assert (got - ref[:, :, lo:hi, lo:hi]).abs().max() <= TOL
    assert hi - lo == factor * (n - 1) + factor % 2  # the whole interior
    off = y[:, :, lo + shift + 1:hi + shift + 1, lo + shift:hi + shift]
    assert (off - ref[:, :, lo:hi, lo:hi]).abs().max() > 0.01  # the shift matters
    with pytest.raises(ValueError, match="factor"):
        bilinear_upsample(4, 0)


def test_crop2d_is_fx_traceable():
    crop = Crop2d(2, 3)
    x = torch.randn(1, 2, 9, 10)
    traced = torch.fx.symbolic_trace(crop)
    assert torch.equal(traced(x), x[:, :, 2:, 3:]) and crop(x).shape == (1, 2, 7, 7)
    with pytest.raises(ValueError, match="left"):
        Crop2d(0, -1)


# -- alignment of an upsampled heatmap with the input (needs measure_geometry) -----------------
def mean_conv(c: int, k: int) -> nn.Conv2d:
    conv = nn.Conv2d(c, c, k, groups=c, bias=False)
    nn.init.constant_(conv.weight, 1 / k**2)
    return conv


# (trunk, stride, twice the centre shift of output j after the crop: 0 or -1 (j - 1/2))
ALIGN_CASES = {
    "avg8": (lambda: nn.Sequential(nn.AvgPool2d(2), nn.AvgPool2d(2), nn.AvgPool2d(2)), 8, 0),
    "avg3": (lambda: nn.Sequential(nn.AvgPool2d(3)), 3, 0),
    "half_pixel": (lambda: nn.Sequential(nn.AvgPool2d(3, stride=2)), 2, -1),
    "needs_pad": (lambda: nn.Sequential(mean_conv(2, 3), mean_conv(2, 3), nn.AvgPool2d(2)), 2, 0),
}


@pytest.mark.parametrize("case", sorted(ALIGN_CASES))
def test_bilinear_head_lines_heatmap_up_with_input(case):
    measure = pytest.importorskip("tilefcn.measure")
    make, stride, twice_shift = ALIGN_CASES[case]
    trunk = make()
    raw = measure.measure_geometry(nn.Sequential(trunk, bilinear_upsample(2, stride)), 2)
    assert raw.stride == (1, 1) and raw.alignment == (stride, stride)
    g_trunk = measure.measure_geometry(trunk, 2)
    k = 2 * stride - stride % 2  # cover of all phases: [o - k + 1, o + r + s - 1 + ...)
    assert raw.offset[0] == g_trunk.offset[0] - k + 1
    assert raw.receptive_field[0] == g_trunk.receptive_field[0] + k - 1
    net = with_bilinear_head(trunk, in_channels=2)
    assert isinstance(net[0], nn.ZeroPad2d) == (case == "needs_pad")
    g = measure.measure_geometry(net, 2)
    assert g.stride == (1, 1)
    assert g.centre2 == (twice_shift, twice_shift)  # the crop shifts it; the cover is wider
    # A ramp a*y + b*x + c survives average pooling (value at the window centre) and bilinear
    # interpolation (exact for affine functions): wherever output j uses only real pixels it
    # equals the ramp at its centre, j + shift, up to float32 rounding (values < 200).
    h, w = 61, 70
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32),
                            torch.arange(w, dtype=torch.float32), indexing="ij")
    image = torch.stack([1.5 * yy + 0.5 * xx + 1, -yy + 2 * xx])[None]
    with torch.no_grad():
        out = net(image)[0]
    (y0, y1), (x0, x1) = g.outputs_within(0, h, 0), g.outputs_within(0, w, 1)
    assert y1 - y0 > h // 2 and x1 - x0 > w // 2
    cy = torch.arange(y0, y1, dtype=torch.float32)[:, None] + twice_shift / 2
    cx = torch.arange(x0, x1, dtype=torch.float32)[None, :] + twice_shift / 2
    expect = torch.stack([1.5 * cy + 0.5 * cx + 1, -cy + 2 * cx])
    assert (out[:, y0:y1, x0:x1] - expect).abs().max() <= 1e-4


def fcn32s_trunk(width: int = 2) -> nn.Sequential:
    """VGG16 as in FCN-32s: conv1_1 pad 100, 3×3 pad-1 convs, 5 pools, fc6 7×7, fc7, score."""
    layers, c = [], 3
    for block, convs in enumerate([2, 2, 3, 3, 3]):
        for i in range(convs):
            layers += [nn.Conv2d(c, width, 3, padding=100 if block == i == 0 else 1), nn.ReLU()]
            c = width
        layers.append(nn.MaxPool2d(2, ceil_mode=True))
    return nn.Sequential(*layers, nn.Conv2d(c, 4, 7), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.ReLU(),
                         nn.Conv2d(4, 3, 1))


def test_fcn32s_crop_is_19(monkeypatch):
    """FCN-32s: the VGG16 trunk (pad 100) has stride 32, offset -189, field 404 (centre 12.5);
    with the 64-px ×32 bilinear kernel (centre 31.5) the crop is 31.5 - 12.5 = 19."""
    measure = pytest.importorskip("tilefcn.measure")
    k, trunk = 64, Geometry((404, 404), (32, 32), (-189, -189))
    cover = Geometry((404 + k - 1,) * 2, (1, 1), (-189 - k + 1,) * 2, (32, 32))
    net = nn.Sequential(fcn32s_trunk(), bilinear_upsample(3, 32))
    monkeypatch.setattr(measure, "measure_geometry", lambda model, in_channels=3: cover)
    assert crop_to_input(net, 3) == (19, 19)
    monkeypatch.setattr(measure, "measure_geometry", lambda model, in_channels=3: trunk)
    with pytest.raises(ValueError, match="stride-1"):
        crop_to_input(net, 3)


def test_fcn32s_crop_is_19_measured(monkeypatch):
    """The same, measured by the analytic pass (the gradient cross-check of a 404-px field
    takes ~20 s here; it is exercised on smaller nets in test_measure)."""
    measure = pytest.importorskip("tilefcn.measure")
    torch.manual_seed(0)
    trunk = fcn32s_trunk()
    analytic = functools.partial(measure.measure_geometry, verify=False)
    g = analytic(trunk, 3)
    assert (g.stride, g.offset, g.receptive_field) == ((32, 32), (-189, -189), (404, 404))
    monkeypatch.setattr(measure, "measure_geometry", analytic)
    assert crop_to_input(nn.Sequential(trunk, bilinear_upsample(3, 32)), 3) == (19, 19)
