"""Every registered model: shapes, gradients, capture hooks, parameter counts, layouts."""

from __future__ import annotations

import logging
import re

import pytest
import torch
import torchvision
from torch import nn

from transfusion.models import count_parameters, create_model, list_models
from transfusion.models.inception import InceptionV3
from transfusion.models.resnet import slim_resnet50
from transfusion.probes import as_channel_map

# Paper Table 1 (features + 1-logit head); the CBRs and ResNet-50 must be within 1 %.
TABLE1_PARAMS = {
    "cbr-large-tall": 8.53e6,
    "cbr-large-wide": 8.43e6,
    "cbr-small": 2.11e6,
    "cbr-tiny": 1.08e6,
    "resnet50": 23.57e6,
}
# Exact counts at num_classes=1, in_channels=3, pinned so a change is deliberate.
# Inception-v3 includes its aux head (2.56 M); without it 21.79 M, Table 1 says 22.88 M.
PINNED_PARAMS = {
    "cbr-large-tall": 8_537_121,
    "cbr-large-wide": 8_441_409,
    "cbr-small": 2_113_313,
    "cbr-tiny": 1_078_817,
    "inception-v3": 24_346_082,
    "resnet50": 23_510_081,
    "slim-resnet50": 7_136_321,
    # timm's architectures, 1-logit head (tests/test_sources.py checks the 1 000-way counts against timm).
    "convnext-tiny": 27_820_897,
    "efficientnet-b0": 4_008_829,
    "vit-small-patch16-224": 21_666_049,
}
BATCH = 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these tensors are tiny, and on a shared 2-core box OpenMP
    threads waiting on each other made the suite 6x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_every_model_has_a_pinned_count() -> None:
    assert sorted(PINNED_PARAMS) == list_models()


@pytest.mark.parametrize("name", list_models())
def test_parameter_count(name: str) -> None:
    count = count_parameters(create_model(name, num_classes=1))
    assert count == PINNED_PARAMS[name]
    if name in TABLE1_PARAMS:
        assert abs(count / TABLE1_PARAMS[name] - 1) < 0.01


# One combination per channel count, together covering num_classes 1 and 5.
@pytest.mark.parametrize(("in_channels", "num_classes"), [(1, 5), (3, 1)])
@pytest.mark.parametrize("name", list_models())
def test_forward_backward_at_smallest_input(name: str, in_channels: int, num_classes: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes, in_channels=in_channels).train()
    size = model.min_input_size
    out = model(torch.randn(BATCH, in_channels, size, size))
    assert out.shape == (BATCH, num_classes)
    out.square().mean().backward()
    # The aux head is not used below 299 px, so it gets no gradient.
    no_grad = [n for n, p in model.named_parameters() if p.grad is None and not n.startswith("AuxLogits.")]
    assert no_grad == []


@pytest.mark.parametrize("name", list_models())
def test_capture_modules_and_stage_prefixes(name: str) -> None:
    model = create_model(name, num_classes=3).eval()
    captures = model.capture_modules()
    names = list(captures)
    stages = names[1:-2]
    assert names[0] == "conv1" and names[-2:] == ["pool", "logits"]
    assert stages == [f"stage{i}" for i in range(1, len(stages) + 1)] and stages

    outputs: dict[str, torch.Tensor] = {}
    for key, module in captures.items():
        module.register_forward_hook(lambda _m, _i, out, key=key: outputs.__setitem__(key, out.detach().clone()))
    size = model.min_input_size
    x = torch.randn(BATCH, 3, size, size)
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
    assert list(outputs) == names
    assert all(outputs[key].shape[0] == BATCH for key in names)
    # Conv maps, or a transformer's tokens (which the probes read as a map, one token per position).
    assert all(as_channel_map(outputs[key]).ndim == 4 for key in ["conv1", *stages])
    assert outputs["stage" + str(len(stages))].shape == features.shape
    assert outputs["pool"].shape == (BATCH, model.get_classifier().in_features)
    assert torch.equal(outputs["logits"], logits)

    prefixes = model.stage_prefixes()
    assert [stage for stage, _ in prefixes] == ["conv1", *stages]
    keys = list(model.state_dict())
    flat = [p for _, group in prefixes for p in group]
    assert len(flat) == len(set(flat))
    for prefix in flat:
        assert any(k.startswith(prefix) for k in keys), prefix
    assert any(k.startswith(model.classifier_prefixes()) for k in keys)


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet51'.*resnet50"):
        create_model("resnet51", num_classes=1)


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_resnet50_matches_torchvision() -> None:
    ours = create_model("resnet50", num_classes=1000)
    theirs = torchvision.models.resnet50()
    assert _shapes(ours) == _shapes(theirs)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(BATCH, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x), theirs.eval()(x), atol=1e-5)


def test_one_channel_stem() -> None:
    assert create_model("resnet50", num_classes=1, in_channels=1).conv1.in_channels == 1
    model = create_model("inception_v3", num_classes=1, in_channels=1)
    assert model.Conv2d_1a_3x3.conv.in_channels == 1
    assert list(model.state_dict())[0] == "Conv2d_1a_3x3.conv.weight"


def test_slim_resnet50_keeps_prefix_and_narrows_the_rest() -> None:
    full = _shapes(create_model("resnet50", num_classes=1))
    slim = _shapes(create_model("slim-resnet50", num_classes=1))
    prefix = ("conv1.", "bn1.", "layer1.", "layer2.")
    assert {k: v for k, v in slim.items() if k.startswith(prefix)} == {
        k: v for k, v in full.items() if k.startswith(prefix)
    }
    assert slim["layer3.0.conv1.weight"] == (128, 512, 1, 1)
    assert slim["layer4.2.conv3.weight"] == (1024, 256, 1, 1)
    assert slim["fc.weight"] == (1, 1024)

    narrow_all = _shapes(slim_resnet50(num_classes=1, k=0, width_factor=0.25))
    assert narrow_all["layer1.0.conv1.weight"] == (16, 64, 1, 1)
    with pytest.raises(ValueError, match="k must be an int in 0..4"):
        slim_resnet50(num_classes=1, k=5)
    with pytest.raises(ValueError, match="width_factor must be > 0"):
        slim_resnet50(num_classes=1, width_factor=0)


def test_inception_matches_torchvision_and_smallest_input() -> None:
    ours = create_model("inception_v3", num_classes=1000).eval()
    theirs = torchvision.models.inception_v3(init_weights=False).eval()
    assert _shapes(ours) == _shapes(theirs)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(BATCH, 3, ours.min_input_size, ours.min_input_size)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)
        with pytest.raises(RuntimeError):
            ours(torch.randn(BATCH, 3, ours.min_input_size - 1, ours.min_input_size - 1))


def test_inception_aux_logits(caplog: pytest.LogCaptureFixture) -> None:
    model = create_model("inception_v3", num_classes=4).train()
    assert isinstance(model, InceptionV3)
    with torch.no_grad():
        logits, aux = model.forward_with_aux(torch.randn(BATCH, 3, 299, 299))
        assert logits.shape == aux.shape == (BATCH, 4)
        with caplog.at_level(logging.WARNING):
            small_logits, small_aux = model.forward_with_aux(torch.randn(BATCH, 3, 75, 75))
        assert small_aux is None and small_logits.shape == (BATCH, 4)
        assert re.search("aux logits skipped", caplog.text)
        # Plain forward returns main logits only, in train and eval mode.
        assert model(torch.randn(BATCH, 3, 75, 75)).shape == (BATCH, 4)
        _, eval_aux = model.eval().forward_with_aux(torch.randn(BATCH, 3, 75, 75))
        assert eval_aux is None


def test_reset_classifier_resets_inception_aux_head() -> None:
    model = create_model("inception_v3", num_classes=1)
    model.reset_classifier(7)
    assert model.fc.out_features == 7 and model.AuxLogits.fc.out_features == 7
    assert model.classifier_prefixes() == ("fc.", "AuxLogits.fc.")
