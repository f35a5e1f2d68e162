import numpy as np
import pytest
from PIL import Image

from transfusion.data import prepare_dataset


def _folder(root, classes=("cat", "dog", "owl"), train=5, val=4):
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, size=(20, 30, 3), dtype=np.uint8)
                pixels[..., c] = 255  # class-coloured, so labels are checkable
                Image.fromarray(pixels).save(root / split / name / f"{name}_{i}.JPEG", format="JPEG")
    return root


def test_imagenet_style_folder_is_a_multiclass_source(tmp_path):
    source = _folder(tmp_path / "imagenet")
    data = prepare_dataset("imagenet-folder", source=str(source), resolution=16, home=tmp_path / "home")
    assert data.meta["task"] == "multiclass" and data.label_names == ["cat", "dog", "owl"]
    assert data.meta["counts"] == {"train": 15, "val": 6, "test": 6}
    assert data.images.shape == (27, 16, 16, 3)
    labels = data.targets.argmax(axis=1)
    # The class channel is saturated in every image of that class.
    assert np.all(data.images[np.arange(27), :, :, labels].mean(axis=(1, 2)) > 200)
    capped = prepare_dataset("imagenet-folder", source=str(source), resolution=16, home=tmp_path / "home",
                             options={"per_class": 2})  # fmt: skip
    assert capped.meta["counts"]["train"] == 6


def test_imagenet_folder_without_val_is_one_line(tmp_path):
    source = tmp_path / "bad"
    (source / "train" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="val does not exist"):
        prepare_dataset("imagenet-folder", source=str(source), resolution=16, home=tmp_path / "home")
