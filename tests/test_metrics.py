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
