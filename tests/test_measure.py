"""Tests for tilefcn.measure: analytic geometry, the gradient probe, and what the numbers mean."""

from __future__ import annotations

import copy
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from tilefcn.geometry import Geometry
from tilefcn.measure import measure, measure_geometry, probe_geometry

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The probes run many tiny tensors, where thread hand-offs cost more than they save (10x on
    a busy 2-core runner)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _init(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded weights and BatchNorm statistics, eval mode."""
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def trunk8(c: int = 8) -> nn.Sequential:
    """Three k4/s2/p1 convs: stride 8, offset -(1 + 2 + 4) = -7, rf 1 + 3*(1 + 2 + 4) = 22."""
    layers = []
    for i in range(3):
        layers += [nn.Conv2d(3 if i == 0 else c, c, 4, 2, 1), nn.ReLU()]
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.a = nn.Conv2d(c, c, 3, padding=2, dilation=2)
        self.bn = nn.BatchNorm2d(c)
        self.b = nn.Conv2d(c, c, 5, stride=2, padding=2)
        self.skip = nn.Conv2d(c, c, 1, stride=2)

    def forward(self, x):
        x = F.relu(self.stem(x))
        return self.b(F.relu(self.bn(self.a(x)))) + self.skip(x)


class UNet(nn.Module):
    """Depth-``depth`` U-Net: max-pool down, ConvTranspose2d / nearest / bilinear up, cat skips."""

    def __init__(self, depth: int = 2, up: str = "tconv", c: int = 6) -> None:
        super().__init__()
        self.up_mode = up
        self.inc = nn.Conv2d(3, c, 3, padding=1)
        self.down = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(depth))
        self.ups = nn.ModuleList(nn.ConvTranspose2d(c, c, 2, 2) for _ in range(depth))
        self.fuse = nn.ModuleList(nn.Conv2d(2 * c, c, 3, padding=1) for _ in range(depth))
        self.out = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        skips, x = [], F.relu(self.inc(x))
        for conv in self.down:
            skips.append(x)
            x = F.relu(conv(F.max_pool2d(x, 2)))
        for up, fuse in zip(self.ups, self.fuse, strict=True):
            if self.up_mode == "tconv":
                x = up(x)
            else:
                x = F.interpolate(x, scale_factor=2, mode=self.up_mode)
            x = F.relu(fuse(torch.cat([x, skips.pop()], 1)))
        return self.out(x)


class Cropper(nn.Module):
    """'valid' U-Net level: bilinear upsampling, constant crops of both branches, no padding
    after the crops."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)
        self.b = nn.Conv2d(4, 4, 3)
        self.c = nn.Conv2d(8, 2, 3)

    def forward(self, x):
        y = self.a(x)
        z = F.interpolate(self.b(F.avg_pool2d(y, 2)), scale_factor=2, mode="bilinear")
        return self.c(torch.cat([z[:, :, 2:-2, 2:-2], y[:, :, 2:-6, 2:-6]], 1))


class Misc(nn.Module):
    """Functional ops: reflect pad, gating, crops, average pooling, channel softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, stride=2)
        self.b = nn.Conv2d(4, 4, (1, 3), dilation=(1, 2))

    def forward(self, x):
        x = F.pad(self.a(x), (1, 2, 0, 1), mode="reflect")
        x = torch.sigmoid(x[..., 1:, 2:-2]) * F.leaky_relu(self.b(x[:, :, 1:]), 0.1)
        return F.avg_pool2d(x, 3, 2).softmax(1) + 1.0


# -- independent references -----------------------------------------------------------------
def positive_supports(model: nn.Module, size: int, outputs: list[int]) -> list[tuple[int, int]]:
    """Rows ``[a, b)`` each output row depends on, from autograd on a copy with positive weights,
    no bias, average instead of max pooling and a positive input (nothing is cut or cancels)."""
    m = copy.deepcopy(model).double()
    for name, mod in list(m.named_modules()):
        if isinstance(mod, nn.MaxPool2d):
            m.set_submodule(name, nn.AvgPool2d(mod.kernel_size, mod.stride, mod.padding))
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(p.abs() + 0.1 if name.endswith("weight") else torch.zeros_like(p))
    x = torch.ones(1, 3, size, size, dtype=torch.float64, requires_grad=True)
    y = m(x)
    spans = []
    for i in outputs:
        (g,) = torch.autograd.grad(y[0, :, i, i].sum(), x, retain_graph=True)
        rows = torch.nonzero(g[0].abs().sum((0, 2))).flatten()
        spans.append((int(rows[0]), int(rows[-1]) + 1))
    return spans


def check_crops(model: nn.Module, geo: Geometry, seed: int, n_crops: int = 4) -> int:
    """Run ``model`` on a whole random image and on crops starting on the alignment grid; every
    output whose span lies inside the crop (or reaches the true image border) must be equal."""
    rng = np.random.default_rng(seed)
    m = copy.deepcopy(model).double()
    (sy, sx), (oy, ox), (ry, rx) = geo.stride, geo.offset, geo.receptive_field
    (ay, ax) = geo.alignment
    size = [a * (-(-(2 * r + 2 * abs(o) + 4 * a + 8) // a)) + int(rng.integers(0, a))
            for a, r, o in ((ay, ry, oy), (ax, rx, ox))]
    try:  # sizes off the alignment grid, where the network allows them
        x = torch.from_numpy(rng.standard_normal((1, 3, *size)))
        with torch.no_grad():
            whole = m(x)
    except RuntimeError:
        size = [n - n % a for n, a in zip(size, (ay, ax), strict=True)]
        x = x[:, :, :size[0], :size[1]]
        with torch.no_grad():
            whole = m(x)
    compared = 0
    for _ in range(n_crops):
        lo, hi, valid = [], [], []
        for n, a in zip(size, (ay, ax), strict=True):
            start = a * int(rng.integers(0, max(1, (n - 2 * a) // a)))
            stop = int(rng.choice([n, start + a * int(rng.integers(2, max(3, (n - start) // a))),
                                   int(rng.integers(start + 1, n + 1))]))
            lo.append(start)
            hi.append(min(stop, n))
        try:
            with torch.no_grad():
                part = m(x[:, :, lo[0]:hi[0], lo[1]:hi[1]])
        except RuntimeError:  # crop too small for the network, or a U-Net's odd size
            continue
        for axis, (s, o, r) in enumerate(((sy, oy, ry), (sx, ox, rx))):
            k = np.arange(part.shape[2 + axis])
            i = lo[axis] // s + k
            span0, span1 = o + s * i, o + s * i + r
            ok = ((span0 >= lo[axis]) | (lo[axis] == 0)) & ((span1 <= hi[axis]) |
                                                              (hi[axis] == size[axis]))
            valid.append(k[ok & (i < whole.shape[2 + axis])])
        if valid[0].size and valid[1].size:
            got = part[0][:, valid[0]][:, :, valid[1]]
            want = whole[0][:, lo[0] // sy + valid[0]][:, :, lo[1] // sx + valid[1]]
            assert torch.allclose(got, want, atol=1e-5, rtol=0), (lo, hi, geo)
            compared += 1
    return compared


def _contains(outer: Geometry, inner: Geometry) -> bool:
    """Same stride, and every output's span under ``inner`` lies inside its span under
    ``outer``."""
    return outer.stride == inner.stride and all(
        o <= i and o + r >= i + q for o, r, i, q in zip(
            outer.offset, outer.receptive_field, inner.offset, inner.receptive_field,
            strict=True))


# -- hand-computed geometries ---------------------------------------------------------------
def test_single_conv():
    result = measure(nn.Conv2d(3, 4, 3, padding=1))
    assert result.method == "analytic" and result.verified
    geo = measure_geometry(nn.Conv2d(3, 4, 3, padding=1))
    assert geo == Geometry((3, 3), (1, 1), (-1, -1), (1, 1))


def test_classifier_trunk_is_tight():
    # 64 -> conv5 60 -> pool 30 -> conv5 26 -> pool 13 -> conv5 9 -> pool 4 (row 8 floored
    # away) -> conv4 1: one output from rf 1 + 4 + 1*1 + 4*2 + 1*2 + 4*4 + 1*4 + 3*8 = 60 rows.
    model = nn.Sequential(nn.Conv2d(3, 4, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 5),
                          nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 5), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Conv2d(4, 2, 4)).eval()
    assert model(torch.zeros(1, 3, 64, 64)).shape[-2:] == (1, 1)
    geo = measure_geometry(model)
    assert geo == Geometry((60, 60), (8, 8), (0, 0), (8, 8))
    assert probe_geometry(model) == geo
    assert positive_supports(model, 64, [0]) == [(0, 60)]


def test_bilinear_head_tight_cover():
    # trunk8: feature f reads rows [8f - 7, 8f + 15). x8 bilinear (align_corners=False): output
    # j reads features floor/ceil((j + .5)/8 - .5): 88-91 -> {10, 11} -> rows [73, 103);
    # 92-99 -> {11, 12} -> [81, 111). Cover over the 8 phases: offset min(73 - 91) = -18,
    # end max(111 - 92) = 19, so rf = 19 + 18 = 37; both ends are touched (phases 3 and 4).
    model = nn.Sequential(trunk8(), nn.Upsample(scale_factor=8, mode="bilinear")).eval()
    spans = positive_supports(model, 192, list(range(88, 100)))
    assert spans == [(73, 103)] * 4 + [(81, 111)] * 8
    geo = measure_geometry(model)
    assert geo == Geometry((37, 37), (1, 1), (-18, -18), (8, 8))
    assert probe_geometry(model) == geo
    assert check_crops(model, geo, seed=1) > 0


def test_padding_after_a_crop_is_exact():
    # A tile's copy of the crop pads where the whole image still has data, unless the window
    # holds the rows the crop cuts: the crop [2:-2] reads like a valid 5-row window.
    class Crop(nn.Module):
        def forward(self, x):
            return x[:, :, 2:-2, 2:-2]

    model = _init(nn.Sequential(OrderedDict(a=nn.Conv2d(3, 4, 3), crop=Crop(),
                                            b=nn.Conv2d(4, 4, 3, padding=1))))
    result = measure(model)
    assert result.method == "analytic"
    # a: [i, i+2]; crop: [k, k+4] of a; b: [j-1, j+1] of the crop -> rows [j-1, j+7)
    assert result.geometry == Geometry((9, 9), (1, 1), (-1, -1), (1, 1))
    image = np.random.default_rng(0).random((70, 83, 3), dtype=np.float32)
    with torch.inference_mode():
        whole = model(torch.from_numpy(image).permute(2, 0, 1)[None])[0].numpy()
    import tilefcn

    tiled = tilefcn.predict(image, model, tile=16, sub_tile=8, device="cpu").compute()
    assert tiled.shape == whole.shape and np.abs(tiled - whole).max() <= 1e-5


def test_upsampling_beyond_the_input_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Upsample(scale_factor=2))
    with pytest.raises(ValueError, match="stride is 1/2"):
        measure_geometry(model)


# -- analytic == probe, and the crops agree -------------------------------------------------
@st.composite
def stacks(draw) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = 3
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["conv", "conv", "max", "avg"]))
        k = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
        s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        p = (draw(st.integers(0, k[0] // 2)), draw(st.integers(0, k[1] // 2)))
        d = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        if kind == "conv":
            layers.append(nn.Conv2d(c, 4, k, s, p, d))
            c = 4
        elif kind == "max":
            layers.append(nn.MaxPool2d(k, s, p, d, ceil_mode=draw(st.booleans())))
        else:
            layers.append(nn.AvgPool2d(k, s, p, ceil_mode=draw(st.booleans())))
        after = draw(st.sampled_from(["relu", "bn", "none"]))
        if after == "relu":
            layers.append(nn.ReLU())
        elif after == "bn":
            layers.append(nn.BatchNorm2d(c))
    return _init(nn.Sequential(*layers), draw(st.integers(0, 100)))


@SETTINGS
@given(stacks(), st.integers(0, 1000))
def test_stacks_analytic_agrees_with_crops(model, seed):
    geo = measure_geometry(model, verify=False)
    if max(geo.receptive_field) > 160 or max(geo.stride) > 27:  # keep the probe images small
        return
    check_crops(model, geo, seed)  # independent of tilefcn: crops agree where spans say


GRAPHS = {
    "residual": lambda: Residual(),
    "unet-tconv": lambda: UNet(2, "tconv"),
    "unet-nearest": lambda: UNet(3, "nearest"),
    "unet-bilinear": lambda: UNet(2, "bilinear"),
    "crop-skip": lambda: Cropper(),
    "functional": lambda: Misc(),
}


@pytest.mark.parametrize("name", GRAPHS)
def test_graphs_analytic_equals_probe_and_crops(name):
    model = _init(GRAPHS[name]())
    result = measure(model)  # verify=True: analytic is also cross-checked by tiling
    assert result.method == "analytic", result.note
    geo = result.geometry
    probed = probe_geometry(model)
    if name in ("crop-skip", "functional"):  # crops read like valid windows: a wider cover
        assert _contains(geo, probed) and geo != probed
    else:
        assert probed == geo
    assert check_crops(model, geo, seed=2, n_crops=24) > 0
    if name.startswith("unet"):
        assert geo.alignment[0] == 2 ** len(model.down) and geo.stride == (1, 1)


def test_unet_alignment_is_needed():
    # Crops off the alignment grid are wrong even where the span lies inside the crop.
    model = _init(UNet(2, "tconv")).double()
    geo = measure_geometry(model)
    x = torch.randn(1, 3, 96, 96, dtype=torch.float64)
    with torch.no_grad():
        whole, part = model(x), model(x[:, :, 2:94, 2:94])
    inner = slice(-geo.offset[0] + 2, 40)
    assert not torch.allclose(part[..., inner, inner], whole[..., 2:, 2:][..., inner, inner])


def test_verify_catches_analysis_bugs(monkeypatch):
    import tilefcn.measure.spatial_ops as ops  # where convolutions' back-maps are built

    window = ops.window
    monkeypatch.setattr(ops, "window", lambda k, s, p, d: window(max(1, k - 1), s, p, d))
    model = nn.Conv2d(3, 4, 3, padding=1)
    assert measure_geometry(model, verify=False).receptive_field == (2, 2)  # the planted bug
    with pytest.raises(ValueError, match="bug in tilefcn"):
        measure_geometry(model)


def test_model_is_not_mutated():
    model = _init(Residual()).train()
    model.bn.eval()
    state = copy.deepcopy(model.state_dict())
    measure_geometry(model)
    assert model.training and not model.bn.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


# -- non-local models -----------------------------------------------------------------------
class Gap(nn.Module):
    def forward(self, x):
        return x.mean((2, 3), keepdim=True)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(4, 1, batch_first=True)

    def forward(self, x):
        n, c, h, w = x.shape
        seq = x.flatten(2).transpose(1, 2)
        return self.mha(seq, seq, seq)[0].transpose(1, 2).reshape(n, c, h, w)


NONLOCAL = {
    "head": nn.AdaptiveAvgPool2d(1),
    "gap": Gap(),
    "gnorm": nn.GroupNorm(2, 4),
    "inorm": nn.InstanceNorm2d(4),
    "lnorm": nn.LayerNorm(16),
    "attn": Attention(),
    "bnorm": nn.BatchNorm2d(4).train(),
}


@pytest.mark.parametrize("name", NONLOCAL)
def test_nonlocal_layers_are_named(name):
    body = nn.Conv2d(3, 4, 3, padding=1)
    model = nn.Sequential(OrderedDict(body=body, **{name: NONLOCAL[name]}))
    if name != "bnorm":
        model.eval()
    with pytest.raises(ValueError, match=f"'{name}'"):
        measure_geometry(model)


@pytest.mark.parametrize("kwargs", [{"size": (32, 32)}, {"size": "plus one"},
                                    {"scale_factor": 2, "align_corners": True}])
def test_interpolate_not_translation_invariant(kwargs):
    class Head(nn.Module):
        def forward(self, x):
            size = {"size": (x.shape[2] + 1, x.shape[3] + 1)} if kwargs.get("size") == \
                "plus one" else kwargs
            return F.interpolate(x, mode="bilinear", **size)

    model = nn.Sequential(OrderedDict(body=nn.Conv2d(3, 4, 3, 2), up=Head()))
    with pytest.raises(ValueError, match="'up'"):
        measure_geometry(model)


# -- .pt2 programs and the probe ------------------------------------------------------------
def _exported(model: nn.Module) -> torch.export.ExportedProgram:
    dims = {2: torch.export.Dim("h", min=16, max=4096), 3: torch.export.Dim("w", min=16, max=4096)}
    return torch.export.export(model, (torch.randn(1, 3, 64, 64),), dynamic_shapes={"input": dims})


def test_exported_program_measures_like_the_module():
    model = _init(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                nn.Upsample(scale_factor=2, mode="bilinear")))
    program = _exported(model)
    # conv3/p1, pool2, conv3/p1: feature f reads rows [2f - 3, 2f + 5). x2 bilinear: output 2m
    # reads features {m-1, m} -> [2m - 5, 2m + 5); 2m+1 reads {m, m+1} -> [2m - 3, 2m + 7).
    # Cover: offset min(-5, -4) = -5, end max(5, 6) = 6, rf 11; alignment 2.
    geo = measure_geometry(model)
    assert geo == Geometry((11, 11), (1, 1), (-5, -5), (2, 2))
    result = measure(program, 3)
    assert result.method == "analytic" and result.geometry == geo
    assert result.geometry.min_input == (16, 16)  # the program's own Dim(min=16)
    assert measure_geometry(program.module()) == geo


class Im2col(nn.Module):
    """A 3x3 conv written as unfold + 1x1 conv: an op the analysis does not model, so the probe
    measures it and the tiling check proves the result."""

    def __init__(self, tail: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 5, stride=2, padding=2)
        self.mix = nn.Conv2d(8 * 9, 2, 1)
        self.tail = tail or nn.Identity()

    def forward(self, x):
        y = torch.relu(self.conv(x))
        n, c, h, w = y.shape
        return self.tail(self.mix(F.unfold(y, 3, padding=1).view(n, c * 9, h, w)))


def test_unmodelled_op_is_probed_and_verified():
    model = _init(Im2col())
    result = measure(model)
    assert result.method == "probe" and result.verified and "im2col" in result.note
    # conv5/s2/p2: [2i - 2, 2i + 3); 3x3 at stride 2: rf 5 + 2*2 = 9, offset -2 - 2 = -4.
    assert result.geometry == Geometry((9, 9), (2, 2), (-4, -4), (2, 2))


def test_probed_global_pool_is_refused():
    with pytest.raises(ValueError, match="not local.*im2col"):
        measure_geometry(Im2col(nn.AdaptiveAvgPool2d(1)).eval())


def test_data_dependent_branch_is_refused():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return y if bool(y.mean() > 0) else -y

    with pytest.raises(ValueError, match="control flow depends on the image's values.*Branchy"
                       "|control flow depends on the image's values.*forward"):
        measure_geometry(Branchy().eval())
