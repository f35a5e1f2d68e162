import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from transfusion.data import prepare_dataset
from transfusion.data.prepared import stratified_order
from transfusion.data.synthetic_retina import _stream, generate_split, render_fundus, render_scene


def test_generator_is_deterministic_per_seed():
    a, ga = generate_split(32, 12, seed=3, split_id=0)
    b, gb = generate_split(32, 12, seed=3, split_id=0)
    c, _ = generate_split(32, 12, seed=4, split_id=0)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ga, gb)
    assert not np.array_equal(a, c)


def test_grade_changes_only_small_local_lesions():
    """Same scene, grade 0 vs 4: few pixels differ and the global colour barely moves."""
    for scene_seed in range(5):
        healthy = render_fundus(96, scene_seed=scene_seed, grade=0, lesion_seed=11).astype(float)
        severe = render_fundus(96, scene_seed=scene_seed, grade=4, lesion_seed=11).astype(float)
        changed = np.abs(severe - healthy).max(axis=-1) > 8
        assert 0.002 < changed.mean() < 0.15
        assert np.abs(severe.mean(axis=(0, 1)) - healthy.mean(axis=(0, 1))).max() < 4.0
        # Grade 0 paints nothing: identical to the lesion-free scene plus the same noise.
        again = render_fundus(96, scene_seed=scene_seed, grade=0, lesion_seed=99)
        np.testing.assert_array_equal(again, healthy.astype(np.uint8))


def test_lesion_count_grows_with_grade():
    scene_seed = 5
    base = render_fundus(96, scene_seed=scene_seed, grade=0, lesion_seed=1).astype(float)
    changed = [
        (np.abs(render_fundus(96, scene_seed=scene_seed, grade=g, lesion_seed=1) - base).max(axis=-1) > 8).mean()
        for g in range(5)
    ]
    assert changed[0] == 0
    assert changed[1] < changed[2] < changed[4]


def test_global_colour_does_not_predict_referable_dr():
    images, grades = generate_split(48, 400, seed=1, split_id=0)
    target = grades >= 2
    features = np.concatenate([images.mean(axis=(1, 2)), images.std(axis=(1, 2))], axis=1)
    half = len(images) // 2
    model = LogisticRegression(max_iter=1000).fit(features[:half], target[:half])
    auc = roc_auc_score(target[half:], model.predict_proba(features[half:])[:, 1])
    assert auc < 0.68, f"global colour statistics predict the label (AUC {auc:.2f})"


def test_scene_stream_is_independent_of_grade():
    scene_a, _, _ = render_scene(64, _stream(7))
    scene_b, _, _ = render_scene(64, _stream(7))
    np.testing.assert_array_equal(scene_a, scene_b)


def test_prepared_dataset_labels_splits_and_cache(session_home):
    options = {"train": 120, "val": 30, "test": 40, "seed": 2}
    first = prepare_dataset("synthetic-retina", resolution=24, options=options, home=session_home)
    assert first.meta["counts"] == {"train": 120, "val": 30, "test": 40}
    assert first.images.shape == (190, 24, 24, 3) and first.images.dtype == np.uint8
    np.testing.assert_array_equal(first.targets[:, 0], (first.grades >= 2).astype(np.float32))
    mtime = (first.root / "images.npy").stat().st_mtime_ns
    again = prepare_dataset("synthetic-retina", resolution=24, options=options, home=session_home)
    assert again.root == first.root
    assert (again.root / "images.npy").stat().st_mtime_ns == mtime
    assert not [p for p in first.root.parent.iterdir() if p.name.startswith(".")], "temporary dirs left behind"


def test_training_subsets_are_nested_stratified_and_seeded(tiny_retina):
    small = tiny_retina.training_subset(60, seed=0)
    large = tiny_retina.training_subset(120, seed=0)
    assert set(small) <= set(large)
    assert len(small) == 60 and len(large) == 120
    np.testing.assert_array_equal(small, tiny_retina.training_subset(60, seed=0))
    assert not np.array_equal(small, tiny_retina.training_subset(60, seed=1))
    pool = tiny_retina.indices("train")
    overall = np.bincount(tiny_retina.grades[pool], minlength=5) / len(pool)
    subset = np.bincount(tiny_retina.grades[small], minlength=5) / len(small)
    assert np.abs(overall - subset).max() < 0.04
    assert set(small) <= set(pool)
    with pytest.raises(ValueError, match="data_size 1000 is larger than the 240 training images"):
        tiny_retina.training_subset(1000, seed=0)


def test_stratified_order_prefixes_are_proportional():
    strata = np.array([0] * 80 + [1] * 20)
    order = stratified_order(strata, seed=0)
    assert sorted(order) == list(range(100))
    for n in (10, 25, 50):
        assert abs((strata[order[:n]] == 1).mean() - 0.2) <= 1.0 / n + 0.05
