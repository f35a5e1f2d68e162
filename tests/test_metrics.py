import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from transfusion.metrics import average_precision, classification_scores, roc_auc


@pytest.mark.parametrize("seed", range(6))
def test_auc_and_ap_agree_with_scikit_learn_including_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(200) < 0.3
    scores = np.round(rng.normal(size=200) + y, 1 if seed % 2 else 6)  # coarse rounding makes ties
    assert roc_auc(y, scores) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    assert average_precision(y, scores) == pytest.approx(average_precision_score(y, scores), abs=1e-12)


def test_a_single_class_label_makes_the_macro_nan_and_is_named():
    scores = np.array([[0.9, 0.1], [0.2, 0.4], [0.8, 0.3], [0.1, 0.2]])
    targets = np.array([[1, 0], [0, np.nan], [1, 0], [0, 0]], dtype=float)
    result = classification_scores(scores, targets, ["a", "b"])
    assert result.per_label_auc == {"a": 1.0} and math.isnan(result.auc) and result.undefined_labels == ("b",)
    # A many-class source's split may lack classes: there the macro is over the defined labels, on request.
    assert classification_scores(scores, targets, ["a", "b"], macro_over_defined=True).auc == 1.0
    # Ignored (NaN) entries are left out of their label; the label stays defined with both classes.
    targets[3, 1] = 1.0
    assert classification_scores(scores, targets, ["a", "b"]).per_label_auc["b"] == pytest.approx(0.5)


def test_stored_test_predictions_are_unsaturated_logits_with_each_images_patient(tmp_path):
    import torch

    from transfusion.data.prepared import SPLITS, PreparedDatasetWriter
    from transfusion.metrics import RunPredictions
    from transfusion.train import evaluate

    n = 12
    rng = np.random.default_rng(0)
    with PreparedDatasetWriter(tmp_path / "toy", num_images=n, image_shape=(4, 4, 1)) as writer:
        writer.images[:] = rng.integers(0, 256, size=(n, 4, 4, 1), dtype=np.uint8)
        dataset = writer.finish(
            meta={"name": "toy", "label_names": ["referable"], "resolution": 4},
            targets=(np.arange(n) % 2).astype(np.float32)[:, None],
            split=np.array([SPLITS["train"], SPLITS["val"]] + [SPLITS["test"]] * (n - 2), dtype=np.int8),
            groups=np.array([f"patient{i // 2:05d}" for i in range(n)]),  # both eyes of a patient
        )

    class Confident(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # Logits 20-30: a float32 sigmoid is exactly 1.0 for all of them, which would tie every image.
            return 20 + 10 * x.mean(dim=(1, 2, 3))[:, None].sigmoid()

    path = tmp_path / "test.npz"
    test = dataset.indices("test")
    metrics = evaluate(Confident(), dataset, test, prefix="test", batch_size=4, device=torch.device("cpu"),
                       predictions_path=path)  # fmt: skip
    stored = RunPredictions.load(path)
    assert len(np.unique(stored.scores)) == len(test) and stored.scores.min() > 20  # logits, no ties
    assert metrics["test/auc"] == pytest.approx(roc_auc(stored.targets[:, 0], stored.scores[:, 0]))
    # Patient codes: the first test image (row 2) shares patient00001 with row 3, then two per patient.
    assert stored.groups.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4] and stored.label_names == ("referable",)
