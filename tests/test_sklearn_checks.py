"""scikit-learn's estimator checks, with a reason for each one that cannot apply."""

import torch
from sklearn.utils.estimator_checks import parametrize_with_checks

from sklearn_cif import ClusteredInfluenceEstimator, InfluenceCV, PerQueryInfluence


class SumFeatures(torch.nn.Module):
    """A model that accepts any number of features (the checks vary it)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(1, 1)

    def forward(self, x):
        return self.lin(x.reshape(x.shape[0], -1).sum(1, keepdim=True))


MODEL = SumFeatures().double()

FIT_SIGNATURE = "fit(model, X, y) is the API contract; fit(X, y) works with model="
MODEL_HASH = (
    "compares joblib.hash of the model with a deepcopy of it, which differs for any "
    "torch module; test_model_is_never_mutated checks the bytes and flags instead"
)
NEEDS_Y = "transform needs y: influence coordinates are loss gradients at (x, y)"
INT_X = (
    "integer X goes to the module unchanged (token indices); this module wants floats"
)

COMMON = {
    "check_fit_score_takes_y": FIT_SIGNATURE,
    "check_estimators_overwrite_params": MODEL_HASH,
}
TRANSFORM_CHECKS = [
    "check_estimators_dtypes",
    "check_dtype_object",
    "check_estimators_pickle",
    "check_f_contiguous_array_estimator",
    "check_transformer_data_not_an_array",
    "check_transformer_general",
    "check_transformer_preserve_dtypes",
    "check_methods_sample_order_invariance",
    "check_methods_subset_invariance",
    "check_dict_unchanged",
    "check_fit_idempotent",
]


def _cif():
    return ClusteredInfluenceEstimator(
        2, sketch_dim=2, loss="mse", model=MODEL, random_state=0
    )


def expected_failed_checks(estimator):
    if not isinstance(estimator, InfluenceCV):
        return {**COMMON, **dict.fromkeys(TRANSFORM_CHECKS, NEEDS_Y)}
    return {**COMMON, "check_estimators_dtypes": INT_X}


@parametrize_with_checks(
    [_cif(), PerQueryInfluence(loss="mse", model=MODEL), InfluenceCV(_cif(), cv=2)],
    expected_failed_checks=expected_failed_checks,
)
def test_sklearn_compatible(estimator, check):
    # Each applicable scikit-learn convention check passes.
    check(estimator)
