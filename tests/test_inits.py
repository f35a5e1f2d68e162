"""Every init on every model it applies to, weight surgery checks, and weight loading."""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from pathlib import Path

import pytest
import torch
import torchvision

from transfusion import pretrained
from transfusion.inits import (
    gabor_bank,
    initialize,
    initialize_with_report,
    list_inits,
    stem_conv_key,
    transfer_prefix,
)
from transfusion.models import create_model, list_models
from transfusion.models.base import CaptureModel
from transfusion.pretrained import (
    SCHEME_LOADERS,
    LoadedWeights,
    get_pretrained_source,
    list_pretrained_sources,
    load_state_dict_from_uri,
)

NEEDS_SOURCE = ("imagenet", "mean-var", "transfusion")
TIMM = {"convnext-tiny", "vit-small-patch16-224", "efficientnet-b0"}  # also in tests/test_sources.py
BIG = {"inception-v3", "resnet50", "slim-resnet50", *TIMM}
CBRS = [name for name in list_models() if name not in BIG]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these tensors are tiny, and on a shared 2-core box OpenMP
    threads waiting on each other made the suite 6x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@functools.cache
def _source_state(name: str, in_channels: int = 3) -> dict[str, torch.Tensor]:
    """A freshly built same-architecture model with distinct per-tensor statistics."""
    torch.manual_seed(1234)
    state = create_model(name, num_classes=5, in_channels=in_channels).state_dict()
    generator = torch.Generator().manual_seed(0)
    for i, tensor in enumerate(state.values()):
        if tensor.is_floating_point():
            # Shift and scale every tensor differently so copies and statistics are traceable.
            scale = 0.5 + torch.rand((), generator=generator).item()
            tensor.mul_(scale).add_(0.01 * (i % 7) - 0.03)
        else:
            tensor.fill_(11)  # num_batches_tracked
    return state


def _source(name: str, in_channels: int = 3) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in _source_state(name, in_channels).items()}


def _model(name: str, *, num_classes: int = 1, in_channels: int = 3) -> CaptureModel:
    return create_model(name, num_classes=num_classes, in_channels=in_channels)


def _counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def test_registry_lists_the_papers_inits() -> None:
    assert list_inits() == ["gabor", "imagenet", "mean-var", "random", "transfusion"]


def test_unknown_init_and_options() -> None:
    model = _model("cbr-tiny")
    with pytest.raises(ValueError, match="unknown init 'xavier'.*mean-var.*transfusion"):
        initialize(model, "xavier")
    with pytest.raises(ValueError, match="missing options \\['k'\\]"):
        initialize(model, "transfusion", source=_source("cbr-tiny"))
    with pytest.raises(ValueError, match="unknown options \\['depth'\\]"):
        initialize(model, "imagenet", source=_source("cbr-tiny"), depth=2)
    with pytest.raises(ValueError, match="k must be an int in 0..3"):
        initialize(model, "transfusion", source=_source("cbr-tiny"), k=4)


@pytest.mark.parametrize("init", NEEDS_SOURCE)
def test_inits_needing_a_source_name_themselves(init: str) -> None:
    options = {"k": 0} if init == "transfusion" else {}
    with pytest.raises(ValueError, match=f"init '{init}' needs a source"):
        initialize(_model("cbr-tiny"), init, **options)


@pytest.mark.parametrize("name", CBRS + ["inception-v3"])
def test_random_seed_redraws_reproducibly(name: str) -> None:
    torch.manual_seed(0)
    a = _model(name)
    torch.manual_seed(1)
    b = _model(name)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    initialize(a, "random")
    assert all(torch.equal(v, before[k]) for k, v in a.state_dict().items())
    rng_state = torch.random.get_rng_state()
    initialize(a, "random", seed=3)
    initialize(b, "random", seed=3)
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # global RNG untouched
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not torch.equal(a.state_dict()[stem_conv_key(a)], before[stem_conv_key(a)])


@pytest.mark.parametrize("name", list_models())
def test_imagenet_copies_all_but_a_mismatched_classifier(name: str, caplog: pytest.LogCaptureFixture) -> None:
    source = _source(name)
    model = _model(name, num_classes=1)
    classifier = model.classifier_prefixes()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="transfusion.inits"):
        _, report = initialize_with_report(model, "imagenet", source=source)
    state = model.state_dict()
    for key, value in state.items():
        if key.startswith(classifier) or _counter(key):
            assert torch.equal(value, before[key]), key
        else:
            assert torch.equal(value, source[key]), key
    assert set(report.skipped) == {k for k in state if k.startswith(classifier)}
    assert f"{classifier[0]}weight left random" in caplog.text


def test_imagenet_copies_a_classifier_of_the_same_shape() -> None:
    model = _model("cbr-tiny", num_classes=5)
    _, report = initialize_with_report(model, "imagenet", source=_source("cbr-tiny"))
    assert report.skipped == () and torch.equal(model.fc.weight, _source("cbr-tiny")["fc.weight"])


@pytest.mark.parametrize("name", CBRS + ["inception-v3", "resnet50"])
def test_one_channel_model_sums_rgb_stem_filters(name: str) -> None:
    source = _source(name)
    model = initialize(_model(name, in_channels=1), "transfusion", source=source, k=0)
    key = stem_conv_key(model)
    assert torch.allclose(model.state_dict()[key], source[key].sum(dim=1, keepdim=True))


def _check_mean_var(model: CaptureModel, source: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> None:
    # Batch norm, and the layer/group norms of ConvNeXt and ViT, start at identity.
    norms = (torch.nn.BatchNorm2d, torch.nn.LayerNorm, torch.nn.GroupNorm)
    bn_modules = {n for n, m in model.named_modules() if isinstance(m, norms)}
    classifier = model.classifier_prefixes()
    for key, value in model.state_dict().items():
        module, _, tensor = key.rpartition(".")
        if key.startswith(classifier) or _counter(key):
            assert torch.equal(value, before[key]), key  # classifier random, counters untouched
        elif module in bn_modules:
            expected = 1.0 if tensor in ("weight", "running_var") else 0.0
            assert torch.all(value == expected), key
        elif source[key].double().std(correction=0) == 0:  # a constant (ConvNeXt's layer scale): drawn as is
            assert torch.all(value == source[key].flatten()[0]), key
        else:
            ref = source[key].double()
            drawn = value.double()
            n = value.numel()
            # Sampling tolerance: 6 standard errors of the mean and of the std.
            assert abs(drawn.mean() - ref.mean()) <= 6 * ref.std() / math.sqrt(n) + 1e-7, key
            assert abs(drawn.std() / ref.std() - 1) <= 6 / math.sqrt(2 * n) + 1e-3, key
            assert not torch.equal(value, source[key]), key


@pytest.mark.parametrize("name", CBRS + ["resnet50", "convnext-tiny"])
def test_mean_var_statistics_and_batch_norm_identity(name: str) -> None:
    source = _source(name)
    model = _model(name)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.num_batches_tracked.fill_(3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, report = initialize_with_report(model, "mean-var", source=source)
    _check_mean_var(model, source, before)
    assert report.sampled and report.fixed
    assert set(report.skipped) == {k for k in model.state_dict() if k.startswith(model.classifier_prefixes())}


def test_mean_var_is_seeded() -> None:
    source = _source("cbr-small")
    a = initialize(_model("cbr-small"), "mean-var", source=source, seed=5)
    b = initialize(_model("cbr-small"), "mean-var", source=source, seed=5)
    c = initialize(_model("cbr-small"), "mean-var", source=source, seed=6)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not torch.equal(a.stage1[0].weight, c.stage1[0].weight)


def _check_transfusion(model: CaptureModel, source: dict[str, torch.Tensor], k: int) -> None:
    prefixes = transfer_prefix(model, k)
    convs = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)}
    for key, value in model.state_dict().items():
        if _counter(key):
            continue
        if key.startswith(prefixes):
            assert torch.equal(value, source[key]), key
        elif key in convs:
            assert not torch.equal(value, source[key]), key


@pytest.mark.parametrize("name", list_models())
def test_transfusion_copies_exactly_the_prefix(name: str) -> None:
    source = _source(name)
    model = _model(name, num_classes=5)
    num_stages = len(model.stage_prefixes())
    # Every k on the CBRs; the first and last on the large models, for speed.
    ks = range(num_stages) if name in CBRS else (0, num_stages - 1)
    for k in ks:
        _, report = initialize_with_report(model, "transfusion", source=source, k=k, seed=k)
        _check_transfusion(model, source, k)
        assert report.copied and all(key.startswith(transfer_prefix(model, k)) for key in report.copied)


def test_slim_resnet_takes_its_prefix_from_a_full_resnet50() -> None:
    source = _source("resnet50")
    slim = initialize(_model("slim-resnet50"), "transfusion", source=source, k=2)
    _check_transfusion(slim, source, 2)
    with pytest.raises(ValueError, match=r"shape mismatch \['layer3\.0\.conv1\.weight: model \(128, 512, 1, 1\)"):
        initialize(_model("slim-resnet50"), "imagenet", source=source)


@pytest.mark.parametrize("name", list_models())
def test_gabor_sets_conv1_to_the_bank(name: str) -> None:
    model = _model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, report = initialize_with_report(model, "gabor")
    key = stem_conv_key(model)
    weight = model.state_dict()[key]
    out_channels, in_channels, kh, kw = weight.shape
    assert kh == kw and torch.equal(weight, gabor_bank(out_channels, in_channels, kh, seed=0))
    assert report.fixed == (key,)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if k != key)


def test_gabor_bank_properties() -> None:
    bank = gabor_bank(64, 3, 7, seed=0)
    assert bank.shape == (64, 3, 7, 7) and bank.dtype == torch.float32
    assert torch.equal(bank, gabor_bank(64, 3, 7, seed=0))
    assert not torch.equal(bank, gabor_bank(64, 3, 7, seed=1))
    assert torch.allclose(bank.sum(dim=(1, 2, 3)), torch.zeros(64), atol=1e-5)
    assert torch.allclose(bank.flatten(1).norm(dim=1), torch.full((64,), math.sqrt(2)), atol=1e-5)
    assert torch.equal(bank[:, 0], bank[:, 2])  # luminance filters
    seeded = initialize(_model("cbr-tiny"), "gabor", seed=7)
    assert torch.equal(seeded.conv1[0].weight, gabor_bank(32, 3, 5, seed=7))


def test_source_with_missing_extra_or_misshaped_keys_is_refused() -> None:
    model = _model("cbr-tiny")
    missing = _source("cbr-tiny")
    del missing["stage2.1.running_var"]
    with pytest.raises(ValueError, match=r"missing from source \['stage2\.1\.running_var'\]"):
        initialize(model, "imagenet", source=missing)
    extra = _source("cbr-tiny") | {"stage9.0.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected in source \['stage9\.0\.weight'\]"):
        initialize(model, "mean-var", source=extra)
    misshaped = _source("cbr-tiny") | {"stage1.0.weight": torch.zeros(64, 32, 3, 3)}
    with pytest.raises(ValueError, match=r"shape mismatch \['stage1\.0\.weight: model \(64, 32, 5, 5\) vs source"):
        initialize(model, "transfusion", source=misshaped, k=1)
    # Keys outside transfusion(k)'s prefix are not its business.
    initialize(model, "transfusion", source=misshaped, k=0)
    many = {k: v for k, v in _source("cbr-tiny").items() if not k.startswith("stage")}
    with pytest.raises(ValueError, match=r"\(\+\d+ more\)"):
        initialize(model, "imagenet", source=many)


def test_pretrained_architectures_fit_their_models() -> None:
    """A torchvision state dict of each source's architecture fits the registered model."""
    import timm

    tv_models = {
        "resnet50": torchvision.models.resnet50,
        "inception-v3": torchvision.models.inception_v3,
        **{name: functools.partial(timm.create_model, name.replace("-", "_")) for name in TIMM},  # timm's own names
    }
    for name in list_pretrained_sources():
        source = get_pretrained_source(name)
        build = tv_models[source.model]
        kwargs = {"init_weights": False} if source.model == "inception-v3" else {}
        state = build(**kwargs).state_dict()
        model = _model(source.model, num_classes=1, in_channels=1)
        _, report = initialize_with_report(model, "imagenet", source=state)
        assert set(report.skipped) == {k for k in model.state_dict() if k.startswith(model.classifier_prefixes())}


def test_pretrained_sources_match_torchvision_metadata() -> None:
    resnet = get_pretrained_source("torchvision-resnet50-imagenet1k-v1")
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.transforms()
    assert resnet.preprocessing.mean == tuple(weights.mean) and resnet.preprocessing.std == tuple(weights.std)
    assert resnet.preprocessing.resolution == weights.crop_size[0]
    inception = get_pretrained_source("torchvision-inception_v3-imagenet1k-v1")
    assert (
        inception.preprocessing.resolution
        == torchvision.models.Inception_V3_Weights.IMAGENET1K_V1.transforms().crop_size[0]
    )
    # Our Inception-v3 has transform_input off, so the record holds the [-1, 1] scaling.
    assert inception.preprocessing.mean == (0.5, 0.5, 0.5)


# --- loading weights -----------------------------------------------------------------


class Payload:
    """Any custom class: unpickling it would run code from this module."""

    def __init__(self) -> None:
        self.value = 1


def _save(path: Path, obj: object) -> str:
    torch.save(obj, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_load_local_path_and_file_uri(tmp_path: Path) -> None:
    state = _source("cbr-tiny")
    digest = _save(tmp_path / "w.pt", state)
    loaded = load_state_dict_from_uri(tmp_path / "w.pt")
    assert loaded.sha256 == digest and loaded.path == tmp_path / "w.pt"
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict.items())
    assert load_state_dict_from_uri((tmp_path / "w.pt").as_uri()).sha256 == digest
    # Loaded weights feed an init directly, as do local paths.
    model = initialize(_model("cbr-tiny"), "transfusion", source=loaded, k=1)
    model = initialize(model, "transfusion", source=str(tmp_path / "w.pt"), k=1)
    assert torch.equal(model.stage1[0].weight, state["stage1.0.weight"])


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_checkpoint_wrappers_and_module_prefix(tmp_path: Path, wrapper: str) -> None:
    state = {"module.a": torch.ones(2), "module.b": torch.zeros(1)}
    _save(tmp_path / "c.pt", {wrapper: state, "epoch": 3})
    assert sorted(load_state_dict_from_uri(tmp_path / "c.pt").state_dict) == ["a", "b"]


@pytest.mark.parametrize("payload", [Payload(), {"state_dict": {"a": torch.ones(1)}, "extra": Payload()}])
def test_checkpoint_with_pickled_code_is_refused(tmp_path: Path, payload: object) -> None:
    _save(tmp_path / "evil.pt", payload)
    with pytest.raises(ValueError, match="refuses to load pickled code"):
        load_state_dict_from_uri(tmp_path / "evil.pt")


def test_non_state_dict_and_missing_file(tmp_path: Path) -> None:
    _save(tmp_path / "list.pt", {"a": [1, 2]})
    with pytest.raises(ValueError, match=r"non-tensor values under keys \['a'\]"):
        load_state_dict_from_uri(tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not found"):
        load_state_dict_from_uri(tmp_path / "absent.pt")


def test_scheme_loaders_are_pluggable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # transfusion.tracking registers the MLflow loader when imported; test without it.
    monkeypatch.delitem(SCHEME_LOADERS, "models", raising=False)
    with pytest.raises(ValueError, match="no loader for URI scheme 'models'.*SCHEME_LOADERS"):
        load_state_dict_from_uri("models:/retina-resnet50/3")
    digest = _save(tmp_path / "m.pt", {"w": torch.ones(3)})
    monkeypatch.setitem(SCHEME_LOADERS, "models", lambda uri: tmp_path / "m.pt")
    loaded = load_state_dict_from_uri("models:/retina-resnet50/3")
    assert loaded == LoadedWeights(loaded.state_dict, "models:/retina-resnet50/3", digest, tmp_path / "m.pt")


def test_torchvision_source_missing_from_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("TRANSFUSION_OFFLINE", "1")
    uri = get_pretrained_source("torchvision-resnet50-imagenet1k-v1").uri
    expected = tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    assert pretrained.torchvision_cache_path(uri) == expected
    with pytest.raises(ValueError, match="not found in the torch hub cache at .*resnet50-0676ba61.pth"):
        pretrained.load_pretrained("torchvision-resnet50-imagenet1k-v1")
    expected.parent.mkdir(parents=True)
    _save(expected, torchvision.models.resnet50().state_dict())
    model = initialize(_model("resnet50"), "imagenet", source="torchvision-resnet50-imagenet1k-v1")
    assert model.layer4[2].conv3.weight.shape == (2048, 512, 1, 1)
    with pytest.raises(ValueError, match="unknown weights 'IMAGENET1K_V9'.*IMAGENET1K_V1"):
        load_state_dict_from_uri("torchvision:resnet50/IMAGENET1K_V9")


def test_unknown_pretrained_source_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown pretrained source 'x'.*torchvision-resnet50-imagenet1k-v1"):
        get_pretrained_source("x")
