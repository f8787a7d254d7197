"""The [models] contract over an adversarial zoo: every model is either tiled exactly or
refused before any compute (see tests/zoo.py for the families and why each is local or not).

Failure messages start with a category so a run summarises itself (``-rf``):
REFUSED-LOCAL, WRONG-VALUES, WRONG-SHAPE, CRASH-PREDICT, CRASH-COMPUTE, ACCEPTED-NONLOCAL,
REFUSED-VAGUE (refused, but the message names neither op nor layer, or is not one line),
REFUSED-WRONG-TYPE (not a ValueError), MUTATED (predict changed the user's module).
"""

from __future__ import annotations

import copy

import dask
import numpy as np
import pytest
import torch
from models_zoo import whole_image_output
from torch import nn
from zoo import ZOO, Entry, changes, random_image, snapshot

import tilefcn

torch.set_num_threads(1)

ATOL = 1e-5
# the zoo's conv_same_even_kernel entry is built on purpose; torch notes it pads a copy
pytestmark = pytest.mark.filterwarnings(
    "ignore:Using padding='same' with even kernel lengths:UserWarning")
SIZES = [((67, 93), "uint8"), ((128, 128), "float32"), ((150, 201), "uint16")]
TILINGS = [(64, 32), (96, None)]
REFUSE_CASES = [((67, 93), "uint8", 64, 32), ((150, 201), "float32", 96, None)]


def _line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:400] if text else ''}"


def _predict(image, model, tile, sub_tile):
    return tilefcn.predict(image, model, tile=tile, sub_tile=sub_tile, device="cpu")


def _compare(heatmap, expected) -> float:
    result = heatmap.compute(scheduler="threads")
    if result.shape != expected.shape:
        return float("inf")
    return float(np.nan_to_num(np.abs(result.astype(np.float64) - expected), nan=np.inf).max())


def _check_exact(entry: Entry, allow_refusal: bool) -> None:
    model = entry.make()
    before = snapshot(model)
    reference = copy.deepcopy(model)
    rng = np.random.default_rng(len(entry.id))
    wrong = []
    runs = 0
    sizes = SIZES if entry.sizes is None else list(zip(entry.sizes, [d for _, d in SIZES],
                                                       strict=True))
    for shape, dtype in sizes:
        image = random_image(rng, shape, entry.in_channels, dtype)
        expected = whole_image_output(reference, image)
        for tile, sub_tile in TILINGS:
            case = f"{shape[0]}x{shape[1]} {dtype} tile={tile} sub_tile={sub_tile}"
            try:
                heatmap = _predict(image, model, tile, sub_tile)
            except ValueError as e:
                if allow_refusal:
                    assert "\n" not in str(e).strip(), f"REFUSED-VAGUE: multi-line {_line(e)}"
                    mutated = changes(model, before)
                    assert not mutated, f"MUTATED: {mutated}"
                    return
                pytest.fail(f"REFUSED-LOCAL: {_line(e)} [{case}]")
            except Exception as e:  # noqa: BLE001
                pytest.fail(f"CRASH-PREDICT: {_line(e)} [{case}]")
            if heatmap.shape != expected.shape:
                pytest.fail(f"WRONG-SHAPE: {heatmap.shape} != whole-image {expected.shape} "
                            f"[{case}]")
            assert heatmap.dtype == np.float32, f"WRONG-DTYPE: {heatmap.dtype} [{case}]"
            try:
                err = _compare(heatmap, expected)
            except Exception as e:  # noqa: BLE001
                pytest.fail(f"CRASH-COMPUTE: {_line(e)} [{case}]")
            runs += 1
            if not err <= ATOL:
                wrong.append((err, case))
    if wrong:
        err, case = max(wrong)
        pytest.fail(f"WRONG-VALUES: max_err={err:.3g} in {len(wrong)}/{runs} cases "
                    f"(worst {case})")
    mutated = changes(model, before)
    assert not mutated, f"MUTATED: {mutated}"


def _check_refused(entry: Entry) -> None:
    model = entry.make()
    before = snapshot(model)
    reference = copy.deepcopy(model)
    rng = np.random.default_rng(len(entry.id))
    accepted = []
    for shape, dtype, tile, sub_tile in REFUSE_CASES:
        case = f"{shape[0]}x{shape[1]} {dtype} tile={tile} sub_tile={sub_tile}"
        image = random_image(rng, shape, entry.in_channels, dtype)
        try:
            heatmap = _predict(image, model, tile, sub_tile)
        except ValueError as e:
            message = str(e).strip()
            mutated = changes(model, before)
            assert not mutated, f"MUTATED (refused): {mutated}"
            assert "\n" not in message, f"REFUSED-VAGUE: multi-line message {_line(e)}"
            assert any(m.lower() in message.lower() for m in entry.match), (
                f"REFUSED-VAGUE: message names none of {entry.match}: {_line(e)}")
            continue
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"REFUSED-WRONG-TYPE: {_line(e)} [{case}]")
        # accepted: how bad is it?
        try:
            expected = whole_image_output(reference, image)
            if heatmap.shape != expected.shape:
                accepted.append((np.inf, f"heatmap shape {heatmap.shape} != whole-image "
                                         f"{expected.shape} [{case}]"))
            else:
                err = _compare(heatmap, expected)
                accepted.append((err, f"max_err={err:.3g} [{case}]" if err > ATOL else
                                 f"values happen to match [{case}]"))
        except Exception as e:  # noqa: BLE001
            accepted.append((np.inf, f"compute raised {_line(e)} [{case}]"))
    if accepted:
        mutated = changes(model, before)
        worst = max(accepted, key=lambda a: a[0])[1]
        pytest.fail(f"ACCEPTED-NONLOCAL: predict() returned in {len(accepted)}/"
                    f"{len(REFUSE_CASES)} cases; worst: {worst}"
                    + (f"; also MUTATED {mutated}" if mutated else ""))


@pytest.mark.parametrize("entry", ZOO, ids=[e.id for e in ZOO])
def test_zoo_entry(entry: Entry) -> None:
    if entry.expected == "refuse":
        _check_refused(entry)
    else:
        _check_exact(entry, allow_refusal=entry.expected == "either")


def test_zoo_is_well_formed() -> None:
    """The zoo itself (no tilefcn): 80+ entries, every channel count, models run on the
    whole image at every size, and the local ones are deterministic."""
    ids = [e.id for e in ZOO]
    assert len(ids) == len(set(ids)) and len(ids) >= 80
    assert {1, 2, 3, 4, 8, 13} <= {e.in_channels for e in ZOO}
    rng = np.random.default_rng(0)
    for entry in ZOO:
        model = entry.make()
        shape = (67, 93) if entry.sizes is None else entry.sizes[0]
        image = random_image(rng, shape, entry.in_channels, "uint8")
        out = whole_image_output(model, image)
        assert out.ndim == 3 and np.isfinite(out).all(), entry.id
        if entry.expected != "refuse":
            np.testing.assert_array_equal(out, whole_image_output(model, image), entry.id)
            _assert_translation_equivariant(entry, model)


def _assert_translation_equivariant(entry: Entry, model: nn.Module, shift: int = 48) -> None:
    """Independent of tilefcn: dropping ``shift`` rows and columns off the top-left of the
    input (a multiple of every stride and alignment in the zoo) shifts the output, and the
    interior (a quarter of the output away from every border) is unchanged."""
    torch.manual_seed(0)
    x = torch.rand(1, entry.in_channels, 256, 272)
    with torch.inference_mode():
        full, crop = model(x), model(x[:, :, shift:, shift:])
    sy, sx = full.shape[2] - crop.shape[2], full.shape[3] - crop.shape[3]
    h, w = crop.shape[2:]
    my, mx = h // 4, w // 4
    a = full[:, :, sy + my: sy + h - my, sx + mx: sx + w - mx]
    b = crop[:, :, my: h - my, mx: w - mx]
    assert a.shape == b.shape and a.numel() > 0, entry.id
    assert (a - b).abs().max().item() < 1e-5, f"{entry.id} is not translation-equivariant"


# --------------------------------------------------------------------- cache hazards


def _activation_net(activation):
    class Net(nn.Module):  # same name, same structure, same state_dict for every activation
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
            self.conv2 = nn.Conv2d(6, 2, 3, padding=1)

        def forward(self, x):
            return self.conv2(activation(self.conv1(x)))

    torch.manual_seed(11)
    return Net().eval()


class DilatedByAttribute(nn.Module):
    """Weights as bare parameters; dilation (hence the receptive field) a plain attribute."""

    def __init__(self, dilation: int):
        super().__init__()
        torch.manual_seed(12)
        self.w1 = nn.Parameter(torch.randn(6, 3, 3, 3) * 0.3)
        self.w2 = nn.Parameter(torch.randn(2, 6, 3, 3) * 0.3)
        self.dilation = dilation
        self.scale = 1.0

    def forward(self, x):
        d = self.dilation
        x = torch.relu(nn.functional.conv2d(x, self.w1, padding=d, dilation=d))
        return self.scale * nn.functional.conv2d(x, self.w2, padding=d, dilation=d)


def _image(seed: int = 3, shape=(150, 201)) -> np.ndarray:
    return random_image(np.random.default_rng(seed), shape, 3, "uint8")


def _assert_exact(heatmap, model, image, what: str) -> None:
    expected = whole_image_output(model, image)
    assert heatmap.shape == expected.shape, (
        f"WRONG-SHAPE ({what}): {heatmap.shape} != {expected.shape}")
    try:
        err = _compare(heatmap, expected)
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"CRASH-COMPUTE ({what}): {_line(e)}")
    assert err <= ATOL, f"WRONG-VALUES ({what}): max_err={err:.3g}"


def test_cache_same_weights_different_activation() -> None:
    image = _image()
    relu, tanh = _activation_net(torch.relu), _activation_net(torch.tanh)
    assert repr(relu) == repr(tanh)
    assert all(torch.equal(a, b) for a, b in zip(relu.state_dict().values(),
                                                  tanh.state_dict().values(), strict=True))
    for model, what in [(relu, "relu"), (tanh, "tanh"), (relu, "relu again")]:
        _assert_exact(_predict(image, model, 64, 32), model, image, what)
    # both in one dask graph: equal tokens would merge them into one result
    a, b = dask.compute(_predict(image, relu, 64, 32), _predict(image, tanh, 64, 32))
    err_a = np.abs(a - whole_image_output(relu, image)).max()
    err_b = np.abs(b - whole_image_output(tanh, image)).max()
    assert err_a <= ATOL and err_b <= ATOL, (
        f"WRONG-VALUES (one dask.compute): relu max_err={err_a:.3g}, tanh max_err={err_b:.3g}")


def test_cache_same_weights_different_receptive_field() -> None:
    """Same class, repr and state_dict; only a plain attribute (dilation 1 vs 4) differs."""
    image = _image()
    small, large = DilatedByAttribute(1), DilatedByAttribute(4)
    for model, what in [(small, "dilation 1"), (large, "dilation 4"), (small, "dilation 1")]:
        _assert_exact(_predict(image, model, 64, 32), model, image, what)


def test_module_edited_in_place_submodule() -> None:
    image = _image()
    torch.manual_seed(13)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(6, 2, 3, padding=1)).eval()
    _assert_exact(_predict(image, model, 64, 32), model, image, "before edit")
    model[1] = nn.Tanh()
    _assert_exact(_predict(image, model, 64, 32), model, image, "after m[1] = Tanh()")
    model[1] = nn.Sequential(nn.Conv2d(6, 6, 5, padding=2), nn.ReLU()).eval()  # larger field
    _assert_exact(_predict(image, model, 64, 32), model, image, "after m[1] = 5x5 conv")
    with torch.no_grad():
        model[0].weight.mul_(-2)
    _assert_exact(_predict(image, model, 64, 32), model, image, "after weights edited")


def test_module_edited_in_place_plain_attribute() -> None:
    image = _image()
    model = DilatedByAttribute(1)
    _assert_exact(_predict(image, model, 64, 32), model, image, "scale 1")
    model.scale = -3.0
    _assert_exact(_predict(image, model, 64, 32), model, image, "scale -3 (plain attribute)")
    model.dilation = 5
    _assert_exact(_predict(image, model, 64, 32), model, image, "dilation 5 (plain attribute)")


def test_heatmap_is_a_snapshot_of_the_model_at_predict_time() -> None:
    """DESIGN §9 'predict works on copies': editing the module after predict() does not
    change an already returned (lazy) heatmap."""
    image = _image()
    model = DilatedByAttribute(1)
    expected = whole_image_output(model, image)
    heatmap = _predict(image, model, 64, 32)
    model.scale = 5.0
    with torch.no_grad():
        model.w1.mul_(-1)
    err = _compare(heatmap, expected)
    assert err <= ATOL, f"WRONG-VALUES: heatmap follows later edits, max_err={err:.3g}"


# ---------------------------------------------------------------------- file formats


def _padded_net(c: int) -> nn.Module:
    torch.manual_seed(21)
    return nn.Sequential(nn.Conv2d(c, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 2, 1)).eval()


def _small_rf_net(c: int) -> nn.Module:
    torch.manual_seed(22)
    return nn.Sequential(nn.Conv2d(c, 6, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(6, 2, 3, padding=1)).eval()


def _export(model: nn.Module, c: int, path, min_size: int = 8):
    h = torch.export.Dim("h", min=min_size, max=4096)
    w = torch.export.Dim("w", min=min_size, max=4096)
    program = torch.export.export(model, (torch.rand(1, c, 64, 64),),
                                  dynamic_shapes=({2: h, 3: w},))
    torch.export.save(program, str(path))
    return path


def _check_file(path, module, image, tilings, what) -> None:
    for tile, sub_tile in tilings:
        try:
            heatmap = _predict(image, str(path), tile, sub_tile)
        except ValueError as e:
            pytest.fail(f"REFUSED-LOCAL ({what}): {_line(e)}")
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"CRASH-PREDICT ({what}): {_line(e)}")
        _assert_exact(heatmap, module, image, f"{what} tile={tile} sub_tile={sub_tile}")


def test_plain_exported_program_four_bands(tmp_path) -> None:
    """A .pt2 written by torch.export.save, no tilefcn metadata: channels come from the
    program's signature (4), geometry from the graph."""
    module = _padded_net(4)
    path = _export(module, 4, tmp_path / "four_band.pt2")
    rng = np.random.default_rng(5)
    for shape in [(67, 93), (150, 201)]:
        image = random_image(rng, shape, 4, "uint16")
        _check_file(path, module, image, [(64, 32), (96, None)], f"pt2 4-band {shape}")


def test_exported_program_with_minimum_size(tmp_path) -> None:
    """Dim('h', min=16): border windows of 67 = 2x32 + 3 rows and 33 = 32 + 1 columns are
    smaller than the program accepts; the tiles must still be exact."""
    module = _small_rf_net(3)
    path = _export(module, 3, tmp_path / "min16.pt2", min_size=16)
    rng = np.random.default_rng(6)
    for shape in [(67, 93), (40, 33)]:
        image = random_image(rng, shape, 3, "uint8")
        _check_file(path, module, image, [(32, None), (32, 16)], f"pt2 min 16 {shape}")


@pytest.mark.parametrize("entry_id", ["stride8_bilinear_upsample8", "unet_d2_bilinear_same"])
def test_save_exported_roundtrip(tmp_path, entry_id) -> None:
    """tilefcn's own save_exported (with its metadata), loaded back by path."""
    from tilefcn.modelio import load_model, save_exported

    entry = ZOO[[e.id for e in ZOO].index(entry_id)]
    module = entry.make()
    try:
        path = save_exported(tmp_path / "m.pt2", load_model(copy.deepcopy(module)))
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"CRASH-SAVE (save_exported): {_line(e)}")
    image = random_image(np.random.default_rng(7), (150, 201), entry.in_channels, "uint8")
    _check_file(path, module, image, [(64, 32), (96, None)], f"save_exported {entry_id}")


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_file(tmp_path, how) -> None:
    module = _padded_net(3) if how == "trace" else \
        ZOO[[e.id for e in ZOO].index("residual_blocks")].make()
    scripted = (torch.jit.trace(module, torch.rand(1, 3, 64, 64)) if how == "trace"
                else torch.jit.script(module))
    path = tmp_path / f"{how}.pt"
    scripted.save(str(path))
    image = random_image(np.random.default_rng(8), (150, 201), 3, "uint8")
    _check_file(path, module, image, [(64, 32), (96, None)], f"TorchScript {how}")


# ------------------------------------------------------------------------ validation


@pytest.mark.parametrize("kwargs", [{"sub_tile": 0}, {"tile": 100.5}, {"tile": 0},
                                    {"tile": -64}, {"sub_tile": -8}, {"sub_tile": 2.5}],
                         ids=["sub_tile=0", "tile=100.5", "tile=0", "tile=-64", "sub_tile=-8",
                              "sub_tile=2.5"])
def test_bad_tile_arguments_are_refused_at_predict(kwargs) -> None:
    image = _image(shape=(67, 93))
    try:
        tilefcn.predict(image, _small_rf_net(3), device="cpu", **kwargs)
    except ValueError:
        return
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"REFUSED-WRONG-TYPE: {_line(e)}")
    pytest.fail(f"ACCEPTED: predict({kwargs}) returned a heatmap")


def test_numpy_integer_tile_is_accepted() -> None:
    image = _image(shape=(67, 93))
    model = _small_rf_net(3)
    _assert_exact(tilefcn.predict(image, model, tile=np.int64(64), sub_tile=np.int32(32),
                                  device="cpu"), model, image, "numpy integer tile")


def _garbage(path, kind):
    rng = np.random.default_rng(9)
    if kind == "random":
        path.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "empty":
        path.write_bytes(b"")
    else:  # a real .pt2 cut in half
        whole = _export(_small_rf_net(3), 3, path.with_name("whole.pt2")).read_bytes()
        path.write_bytes(whole[: len(whole) // 2])


@pytest.mark.parametrize("name,kind", [("garbage_model.pt2", "random"),
                                       ("empty_model.pt2", "empty"),
                                       ("truncated_model.pt2", "truncated"),
                                       ("garbage_script.pt", "random")])
def test_corrupt_model_file_is_refused_naming_it(tmp_path, name, kind) -> None:
    path = tmp_path / name
    _garbage(path, kind)
    try:
        tilefcn.predict(_image(shape=(67, 93)), str(path), device="cpu")
    except ValueError as e:
        assert name in str(e), f"REFUSED-VAGUE: message lacks {name}: {_line(e)}"
        assert "\n" not in str(e).strip(), f"REFUSED-VAGUE: multi-line: {_line(e)}"
        return
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"REFUSED-WRONG-TYPE: {_line(e)}")
    pytest.fail("ACCEPTED: a corrupt model file gave a heatmap")


EXACT = [e for e in ZOO if e.expected == "exact"]


@pytest.mark.parametrize("backend,batch", [("torch", 4), ("onnxruntime", 1)])
@pytest.mark.parametrize("entry", EXACT, ids=[e.id for e in EXACT])
def test_zoo_entry_through_each_backend(entry: Entry, backend: str, batch: int) -> None:
    """Every exact entry stays exact with batched sub-tiles and with ONNX Runtime — or that
    backend is refused for the model in one line naming it (never a wrong heatmap)."""
    model = entry.make()
    reference = copy.deepcopy(model)
    shape = (150, 201) if entry.sizes is None else entry.sizes[-1]
    image = random_image(np.random.default_rng(7), shape, entry.in_channels, "uint16")
    expected = whole_image_output(reference, image)
    try:
        heatmap = tilefcn.predict(image, model, tile=64, sub_tile=32, device="cpu",
                                  backend=backend, batch=batch)
    except ValueError as e:
        assert backend != "torch", f"REFUSED-LOCAL: {_line(e)}"
        assert f"backend {backend!r}" in str(e) and "\n" not in str(e).strip(), _line(e)
        return
    err = _compare(heatmap, expected)
    assert err <= ATOL, f"WRONG-VALUES ({backend}, batch {batch}): max_err={err:.3g}"
