"""Pretrained sources as a grid axis: the registry, key layouts, timm models, labels and keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from transfusion.analysis.transfer_effect import EffectEstimate, TransferEffectRow, which_source_markdown
from transfusion.config import GridSpec, JobSpec, format_validation_error
from transfusion.inits import initialize, initialize_with_report
from transfusion.models import MODELS, count_parameters, create_model, model_facts
from transfusion.pretrained import (
    KEY_LAYOUTS,
    PRETRAINED,
    apply_layout,
    get_pretrained_source,
    load_pretrained,
    load_state_dict_from_uri,
)
from transfusion.probes import ROWS_SUFFIX, ProbeSampling, capture_activations

# timm's own counts with a 1 000-way head (timm.create_model(name).parameters()).
TIMM_PARAMETERS = {"convnext-tiny": 28_589_128, "vit-small-patch16-224": 22_050_664, "efficientnet-b0": 5_288_548}


def _copied_equal(model: torch.nn.Module, reference: dict[str, torch.Tensor], skip: tuple[str, ...]) -> list[str]:
    """Keys of ``model`` that differ from ``reference`` (classifier prefixes ``skip`` aside)."""
    state = model.state_dict()
    return [k for k, v in reference.items() if not k.startswith(skip) and not torch.equal(state[k], v)]


# --- the registry ------------------------------------------------------------------------


def test_registry_declares_every_kind_with_provenance_and_licence():
    kinds = {get_pretrained_source(n).kind for n in PRETRAINED.names()}
    assert {"supervised", "self-supervised", "domain"} <= kinds
    for name in PRETRAINED.names():
        source = get_pretrained_source(name)
        assert source.provenance and source.licence and source.description, name
        assert source.layout == "auto" or source.layout in KEY_LAYOUTS, name
        assert source.model in MODELS, name
    assert get_pretrained_source("dino-resnet50").fits("slim-resnet50")
    assert not get_pretrained_source("dino-resnet50").fits("cbr-tiny")
    with pytest.raises(ValueError, match="unknown pretrained source 'nope'.*dino-resnet50"):
        get_pretrained_source("nope")


def test_source_placed_in_the_cache_loads_by_name_and_a_missing_one_says_how_to_get_it(session_home):
    name = "radimagenet-resnet50"
    path = session_home / "cache" / "weights" / "radimagenet" / "RadImageNet-ResNet50_notop.pth"
    path.unlink(missing_ok=True)
    with pytest.raises(ValueError) as missing:
        load_pretrained(name)
    line = str(missing.value)
    assert "\n" not in line and str(path) in line and "radimagenet.com" in line

    # RadImageNet's PyTorch file: nn.Sequential(*list(resnet50.children())[:-1]), numbered children.
    reference = create_model("resnet50", num_classes=3).state_dict()
    numbered = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
    sequential = {
        f"{numbered[k.split('.', 1)[0]]}.{k.split('.', 1)[1]}": v
        for k, v in reference.items()
        if not k.startswith("fc.")
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sequential, path)
    try:
        model = create_model("resnet50", num_classes=2)
        _, report = initialize_with_report(model, "imagenet", source=name)
        assert _copied_equal(model, reference, ("fc.",)) == []
        assert len(report.copied) == sum(not k.startswith("fc.") and "num_batches" not in k for k in reference)
    finally:
        path.unlink()


def _moco(sd):
    """MoCo v2's checkpoint: DataParallel-wrapped query encoder (MLP head), key encoder's queue."""
    encoder = {f"module.encoder_q.{k}": v for k, v in sd.items()}
    return {
        "state_dict": encoder | {"module.encoder_q.fc.0.weight": torch.zeros(64, 64), "module.queue": torch.zeros(8)}
    }


def _byol(sd):
    """solo-learn's BYOL: the backbone without its fc, a projector beside it."""
    return {f"backbone.{k}": v for k, v in sd.items() if not k.startswith("fc.")} | {
        "projector.0.weight": torch.zeros(4)
    }


def _dino(sd):
    """A DINO training checkpoint: teacher backbone and projection head."""
    return {f"teacher.backbone.{k}": v for k, v in sd.items()} | {"teacher.head.last_layer.weight": torch.zeros(3)}


def _plain(sd):
    """DINO's released ResNet-50: torchvision names, no fc."""
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


@pytest.mark.parametrize(("layout", "wrap"), [("moco", _moco), ("byol", _byol), ("dino", _dino), ("plain", _plain)])
def test_self_supervised_checkpoints_are_read_in_their_key_layout(tmp_path, layout, wrap):
    reference = create_model("resnet50", num_classes=5).state_dict()
    path = tmp_path / f"{layout}.pth"
    torch.save(wrap(reference), path)
    loaded = load_state_dict_from_uri(path)
    model_state = create_model("resnet50", num_classes=2).state_dict()
    _, detected = apply_layout(loaded.state_dict, model_state)
    assert detected == layout
    model = initialize(create_model("resnet50", num_classes=2), "imagenet", source=str(path))
    assert _copied_equal(model, reference, ("fc.",)) == []


def test_an_unknown_layout_is_one_line_with_the_valid_ones():
    with pytest.raises(ValueError, match="unknown key layout 'swav'; valid: auto, plain, timm, moco"):
        apply_layout({}, {}, layout="swav")


# --- timm models ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TIMM_PARAMETERS))
def test_timm_models_match_timm_parameter_counts_and_name_its_feature_stages(name):
    import timm

    ours = create_model(name, num_classes=1000)
    assert (
        count_parameters(ours)
        == count_parameters(timm.create_model(name.replace("-", "_"), num_classes=1000))
        == TIMM_PARAMETERS[name]
    )
    feature_modules = [info["module"] for info in ours.net.feature_info]
    assert model_facts(name).stages == ("conv1", *[f"stage{i}" for i in range(1, len(feature_modules) + 1)])
    capture = ours.capture_modules()
    for i, module in enumerate(feature_modules[:-1], start=1):
        assert capture[f"stage{i}"] is ours.net.get_submodule(module)
    # The last stage is read where its tensors end (ViT's final norm, EfficientNet's head conv).
    last = next(n for n, m in ours.named_modules() if m is capture[f"stage{len(feature_modules)}"])
    assert any(f"{last}.".startswith(p) for p in ours.stage_prefixes()[-1][1]), last
    # Every tensor is in exactly one stage or the classifier: transfusion(k) can copy any prefix.
    prefixes = [p for _, ps in ours.stage_prefixes() for p in ps] + list(ours.classifier_prefixes())
    for key in ours.state_dict():
        assert sum(key.startswith(p) for p in prefixes) == 1, key


def _fake_hub_cache(root, repo: str, state: dict[str, torch.Tensor]) -> None:
    """The layout huggingface_hub's cache has after ``hf download <repo>``."""
    from safetensors.torch import save_file

    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, snapshot / "model.safetensors")


def test_timm_source_loads_from_the_local_hub_cache_and_says_how_to_fill_it(tmp_path, monkeypatch):
    import timm

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ValueError) as missing:
        load_pretrained("timm-efficientnet_b0-in1k")
    line = str(missing.value)
    assert "\n" not in line and "hf download timm/efficientnet_b0.ra_in1k" in line and str(tmp_path / "hub") in line

    reference = timm.create_model("efficientnet_b0", num_classes=1000).state_dict()
    _fake_hub_cache(tmp_path / "hub", "timm/efficientnet_b0.ra_in1k", reference)
    model = create_model("efficientnet_b0", num_classes=2, in_channels=1)
    _, report = initialize_with_report(model, "imagenet", source="timm-efficientnet_b0-in1k")
    ours = {f"net.{k}": v for k, v in reference.items()}
    stem = "net.conv_stem.weight"
    assert _copied_equal(model, {k: v for k, v in ours.items() if k != stem}, ("net.classifier.",)) == []
    assert torch.allclose(model.state_dict()[stem], reference["conv_stem.weight"].sum(dim=1, keepdim=True))
    assert "net.classifier.weight" in report.skipped


def test_transfusion_k_and_mean_var_work_on_a_vision_transformer():
    source = create_model("vit_small_patch16_224", num_classes=1000).state_dict()
    model = create_model("vit_small_patch16_224", num_classes=2)
    _, report = initialize_with_report(model, "transfusion", source=source, k=1, seed=0)
    copied = set(report.copied)
    assert {"net.cls_token", "net.pos_embed", "net.patch_embed.proj.weight", "net.blocks.0.attn.qkv.weight"} <= copied
    assert not any(k.startswith("net.blocks.1.") for k in copied)

    model = initialize(create_model("vit_small_patch16_224", num_classes=2), "mean-var", source=source, seed=0)
    state = model.state_dict()
    assert torch.equal(state["net.blocks.3.norm1.weight"], torch.ones(384))  # layer norm at identity
    qkv = state["net.blocks.3.attn.qkv.weight"]
    assert not torch.equal(qkv, source["net.blocks.3.attn.qkv.weight"])
    assert qkv.std().item() == pytest.approx(source["net.blocks.3.attn.qkv.weight"].std().item(), rel=0.02)


def test_vit_probes_keep_sampled_image_token_rows():
    model = create_model("vit_small_patch16_224", num_classes=2).eval()
    images = torch.randn(6, 3, 32, 32)  # 2 x 2 patches + the class token: 5 tokens per image
    probe = capture_activations(model, images, sampling=ProbeSampling(rows_per_channel=1, seed=0))
    rows = probe["stage12" + ROWS_SUFFIX]
    assert probe["stage12"].shape == (len(rows), 384) and probe["stage12"].dtype == np.float16
    # 384 rows wanted, 6 x 5 tokens exist: every (image, token) is kept, the width axis is 0.
    assert sorted(map(tuple, rows[:, :2])) == [(i, t) for i in range(6) for t in range(5)] and (rows[:, 2] == 0).all()
    with torch.no_grad():
        tokens = model.net.forward_features(images)
    assert tokens.shape == (6, 5, 384)
    kept = tokens[torch.from_numpy(rows[:, 0]).long(), torch.from_numpy(rows[:, 1]).long()]
    assert np.allclose(probe["stage12"].astype(np.float32), kept.numpy(), atol=2e-2)
    # The class token after the final norm: the head's input.
    assert np.allclose(probe["pool"].astype(np.float32), tokens[:, 0].numpy(), atol=2e-2)


# --- the grid axis -------------------------------------------------------------------------


def _grid(**overrides) -> GridSpec:
    fields = {
        "name": "sources-test",
        "dataset": "synthetic-retina",
        "models": ["resnet50"],
        "inits": ["random", "transfer", "mean-var"],
        "pretrained": ["torchvision-resnet50-imagenet1k-v1", "dino-resnet50"],
        "data_sizes": ["full", 1000],
        "seeds": 2,
    }
    return GridSpec.model_validate({**fields, **overrides})


def test_transfer_inits_expand_over_sources_with_labels_tags_and_keys_per_source():
    from transfusion.tracking import job_tags

    jobs = _grid().jobs()
    assert len(jobs) == 2 * 2 * (1 + 2 * 2)  # seeds x sizes x (random + 2 inits x 2 sources)
    assert len({j.job_key for j in jobs}) == len(jobs)
    labels = {j.init_label for j in jobs}
    assert labels == {
        "random",
        "transfer@torchvision-resnet50-imagenet1k-v1",
        "transfer@dino-resnet50",
        "mean-var@torchvision-resnet50-imagenet1k-v1",
        "mean-var@dino-resnet50",
    }
    dino = next(j for j in jobs if j.init_label == "transfer@dino-resnet50")
    assert job_tags(dino)["source"] == "dino-resnet50" and "source" not in job_tags(jobs[0])
    assert dino.run_name == "resnet50-transfer@dino-resnet50-full-s0"


def test_transfer_is_an_alias_of_imagenet_that_keeps_job_keys_and_the_paper_labels():
    one = JobSpec(model="cbr-tiny", init="transfer", pretrained="imagenet", dataset="synthetic-retina")
    other = JobSpec(model="cbr-tiny", init="imagenet", pretrained="imagenet", dataset="synthetic-retina")
    assert one.job_key == other.job_key and one.init_label == "imagenet"
    single = _grid(pretrained="synthetic", models=["cbr-tiny"])
    assert {j.init_label for j in single.jobs()} == {"random", "synthetic-transfer", "mean-var@synthetic"}
    assert _grid(pretrained="imagenet").grid_key == _grid(pretrained="imagenet").grid_key
    assert {j.source_label for j in _grid(pretrained="models:/my-chexpert/3", models=["cbr-tiny"]).jobs()} == {
        None,
        "my-chexpert-3",
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pretrained": ["dino-resnet50", "dino-resnet50"]}, "a source is listed twice"),
        ({"pretrained": ["/a/w.pt", "s3://b/w.pt"]}, "share the label 'w'"),
        ({"models": ["cbr-tiny"], "pretrained": ["dino-resnet50"]}, "holds resnet50 weights; it does not fit cbr-tiny"),
        ({"pretrained": ["domain:no-such-set"]}, "unknown dataset 'no-such-set'"),
        ({"pretrained": []}, "at least 1 item"),
    ],
)
def test_bad_source_lists_fail_before_anything_starts_in_one_line(overrides, message):
    with pytest.raises(ValidationError) as bad:
        _grid(**overrides)
    line = format_validation_error(bad.value, where="grid")
    assert message in line and "\n" not in line.strip()


def test_a_missing_cached_source_fails_preflight_in_one_line(session_home, monkeypatch, tmp_path):
    from transfusion.preflight import check_pretrained_sources

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    check_pretrained_sources(["synthetic", "imagenet", "models:/x/1", "s3://bucket/w.pt"])  # resolved later
    for source, needle in [
        ("radimagenet-resnet50", "radimagenet.com"),
        ("timm:convnext_tiny.fb_in1k", "hf download timm/convnext_tiny.fb_in1k"),
        (str(tmp_path / "absent.pt"), "absent.pt"),
    ]:
        with pytest.raises(ValueError) as missing:
            check_pretrained_sources([source])
        assert needle in str(missing.value) and "\n" not in str(missing.value)


def test_https_source_offline_says_where_to_put_the_file(session_home, monkeypatch):
    monkeypatch.setenv("TRANSFUSION_OFFLINE", "1")
    with pytest.raises(ValueError) as missing:
        load_pretrained("dino-resnet50")
    line = str(missing.value)
    assert "TRANSFUSION_OFFLINE" in line and "dino_resnet50_pretrain.pth" in line and "\n" not in line


# --- which source --------------------------------------------------------------------------


def _row(init: str, delta: float, low: float, high: float) -> TransferEffectRow:
    estimate = EffectEstimate(delta, low, high, 3, "3 seeds")
    return TransferEffectRow("resnet50", "5000", init, estimate, estimate)


def test_which_source_ranks_sources_and_claims_a_best_only_when_its_ci_clears_the_rest():
    clear = which_source_markdown([
        _row("transfer@dino-resnet50", 0.010, 0.002, 0.018),
        _row("transfer@radimagenet-resnet50", 0.040, 0.030, 0.050),
        _row("mean-var@dino-resnet50", 0.050, 0.040, 0.060),  # not a plain transfer: not ranked
        _row("imagenet", -0.005, -0.010, 0.000),
    ])  # fmt: skip
    lines = [line for line in clear.splitlines() if line.startswith("| resnet50")]
    assert [line.split("|")[4].strip() for line in lines] == ["radimagenet-resnet50", "dino-resnet50", "imagenet"]
    assert "best: its CI clears every other source's" in lines[0] and "+4.0" in lines[0]
    overlapping = which_source_markdown([
        _row("transfer@dino-resnet50", 0.010, -0.01, 0.03), _row("transfer@radimagenet-resnet50", 0.02, 0.0, 0.04),
    ])  # fmt: skip
    assert "cannot be told from dino-resnet50" in overlapping
    assert which_source_markdown([_row("transfer@dino-resnet50", 0.01, 0.0, 0.02)]) == ""


# --- a grid over two sources, end to end ---------------------------------------------------


def _register_source(home, state: dict[str, torch.Tensor], tmp_path) -> str:
    """A ``models:/`` source in ``home``'s tracking store, as ``transfusion pretrain`` leaves one."""
    from flows.runtime import start_mlflow_server
    from transfusion import tracking

    weights = tmp_path / "model.pt"
    torch.save(state, weights)
    server = start_mlflow_server(home)  # home's own store, whatever server the session uses
    try:
        experiment_id = tracking.ensure_experiment("sources-pretraining", uri=server.url)
        run_id = tracking.client(server.url).create_run(experiment_id).info.run_id
        tracking.log_artifact(run_id, weights, "checkpoint", uri=server.url)
        return tracking.register_model_weights("cbr-tiny-chexpert", run_id, "checkpoint/model.pt", uri=server.url)
    finally:
        server.stop()


@pytest.mark.slow
def test_grid_over_two_sources_labels_tags_keys_and_reports_each(tmp_path):
    import yaml
    from mlflow.tracking import MlflowClient

    from flows.runtime import start_mlflow_server
    from tests.conftest import identity_of, run_cli
    from transfusion.config import load_grid
    from transfusion.pretrained import file_sha256

    home = tmp_path / "home"
    home.mkdir()
    # A self-supervised checkpoint (solo-learn's "backbone." layout) and a registered source.
    byol = tmp_path / "byol-cbr-tiny.pth"
    torch.save(_byol(create_model("cbr-tiny", num_classes=5).state_dict()), byol)
    registered = _register_source(home, create_model("cbr-tiny", num_classes=5).state_dict(), tmp_path)
    grid_file = tmp_path / "two-sources.yaml"
    smoke_train = {"steps": 6, "batch_size": 16, "eval_every": 3, "resolution": 64, "probe_size": 160}
    grid_file.write_text(yaml.safe_dump({
        "name": "two-sources", "dataset": "synthetic-retina", "dataset_options": {"train": 240, "val": 160, "test": 64},
        "models": ["cbr-tiny"], "inits": ["random", "transfer"], "pretrained": [str(byol), registered],
        "data_sizes": [160], "seeds": [0], "train": {**smoke_train, "eval_batch_size": 64},
    }))  # fmt: skip

    result = run_cli("run", str(grid_file), home=home)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Grid two-sources: 3 trained, 0 already done, 0 failed" in result.stdout
    assert "transfer@byol-cbr-tiny" in result.stdout and "transfer@cbr-tiny-chexpert-1" in result.stdout
    assert "### Which source?" in result.stdout  # printed at the end of the run, as in the report

    grid = load_grid(str(grid_file))
    server = start_mlflow_server(home)
    try:
        client = MlflowClient(server.url)
        experiment = client.get_experiment_by_name("two-sources")
        runs = [
            r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("transfusion.role") == "job"
        ]
        assert sorted(r.data.tags["job_key"] for r in runs) == sorted(
            j.model_copy(update=identity_of(runs, j)).job_key for j in grid.jobs()
        )
        by_init = {r.data.tags["init"]: r for r in runs}
        assert set(by_init) == {"random", "transfer@byol-cbr-tiny", "transfer@cbr-tiny-chexpert-1"}
        assert "source" not in by_init["random"].data.tags
        file_run = by_init["transfer@byol-cbr-tiny"]
        assert file_run.data.tags["source"] == "byol-cbr-tiny"
        assert file_run.data.params["pretrained_sha256"] == file_sha256(byol)
        model_run = by_init["transfer@cbr-tiny-chexpert-1"]
        assert (
            model_run.data.tags["source"] == "cbr-tiny-chexpert-1" and model_run.data.tags["source.uri"] == registered
        )
    finally:
        server.stop()

    reports = home / "reports" / "two-sources"
    text = (reports / "report.md").read_text()
    assert "## Does transfer help?" in text and "## Which source?" in text
    which = (reports / "which_source.md").read_text()
    ranked = [line.split("|")[4].strip() for line in which.splitlines() if line.startswith("| cbr-tiny")]
    assert sorted(ranked) == ["byol-cbr-tiny", "cbr-tiny-chexpert-1"]
    effect = (reports / "transfer_effect.md").read_text()
    assert "transfer@byol-cbr-tiny" in effect and "transfer@cbr-tiny-chexpert-1" in effect
    # Figure 2 pairs distinct seeds only: with one seed it has no pair (each source on its own, never
    # pooled: test_analysis checks that on stored probes of two seeds).
    assert "| rand-pretrained" not in text


def test_a_registered_source_sets_the_input_statistics_its_weights_saw():
    from types import SimpleNamespace

    from transfusion.train import build_model

    vit = create_model("vit_small_patch16_224", num_classes=1000).state_dict()
    dataset = SimpleNamespace(num_labels=2, in_channels=3)
    spec = JobSpec(
        model="vit_small_patch16_224", init="transfer", pretrained="timm-vit_small_patch16_224-augreg-in21k-ft-in1k",
        dataset="synthetic-retina",
    )  # fmt: skip
    model = build_model(spec, dataset, source_state=vit)
    assert model.input_mean == (0.5, 0.5, 0.5) and model.input_std == (0.5, 0.5, 0.5)
    cbr = build_model(
        JobSpec(model="cbr-tiny", init="random", dataset="synthetic-retina"), dataset, source_state=None
    )  # fmt: skip
    assert cbr.input_mean == get_pretrained_source("torchvision-resnet50-imagenet1k-v1").preprocessing.mean


@pytest.mark.parametrize(
    ("name", "gmacs"),
    # Published multiply-adds at 224 px (timm's model cards; ResNet-50 as torchvision states it).
    [("vit-small-patch16-224", 4.6), ("convnext-tiny", 4.5), ("efficientnet-b0", 0.39), ("resnet50", 4.09)],
)
def test_forward_flops_count_per_token_linears_and_attention(name, gmacs):
    from transfusion.cost import forward_flops

    flops = forward_flops(create_model(name, num_classes=1000), in_channels=3, resolution=224)
    assert flops / 2e9 == pytest.approx(gmacs, rel=0.03)
