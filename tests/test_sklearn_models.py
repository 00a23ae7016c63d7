"""Fitted scikit-learn models and pipelines as the model, and per-parameter damping.

Every check compares against scikit-learn itself (its decision functions,
its exact efficient LOO, its own refits) or a dense float64 solve written
here, never against the package's own output.
"""

import warnings

import joblib
import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import load_breast_cancer, load_diabetes, make_classification
from sklearn.ensemble import RandomForestClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import (
    LinearRegression,
    LogisticRegression,
    Ridge,
    RidgeCV,
    SGDClassifier,
    SGDRegressor,
)
from sklearn.metrics import log_loss
from sklearn.model_selection import KFold, LeaveOneOut, cross_validate
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from sklearn_cif import ClusteredInfluenceEstimator, InfluenceCV, PerQueryInfluence
from sklearn_cif.adapters import as_functional
from sklearn_cif.sklearn_models import to_torch


@pytest.fixture(scope="module")
def regression():
    X, y = load_diabetes(return_X_y=True)
    return StandardScaler().fit_transform(X[:150]), y[:150]


@pytest.fixture(scope="module")
def binary():
    X, y = load_breast_cancer(return_X_y=True)
    rng = np.random.default_rng(0)
    idx = rng.choice(len(y), 200, replace=False)
    return StandardScaler().fit_transform(X[idx]), y[idx]


@pytest.fixture(scope="module")
def multiclass():
    X, y = make_classification(
        240, 8, n_informative=5, n_classes=3, random_state=0, class_sep=0.8
    )
    return X, y


def _tight_lr(**kw):
    return LogisticRegression(tol=1e-12, max_iter=10_000, **kw)


def _fit(model, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return clone(model).fit(X, y)


MODELS = {
    "linear_regression": (lambda: LinearRegression(), "regression"),
    "ridge": (lambda: Ridge(alpha=3.0), "regression"),
    "ridge_no_intercept": (lambda: Ridge(alpha=0.5, fit_intercept=False), "regression"),
    "lr_binary": (lambda: _tight_lr(C=0.5), "binary"),
    "lr_multinomial": (lambda: _tight_lr(C=2.0), "multiclass"),
    "lr_liblinear": (
        lambda: LogisticRegression(
            solver="liblinear", C=0.5, tol=1e-12, intercept_scaling=2.0, max_iter=10_000
        ),
        "binary",
    ),
    "lr_unpenalized": (lambda: _tight_lr(C=np.inf), "regression_binary"),
    "sgd_classifier": (
        lambda: SGDClassifier(loss="log_loss", alpha=1e-2, random_state=0),
        "binary",
    ),
    "sgd_regressor": (lambda: SGDRegressor(alpha=1e-2, random_state=0), "regression"),
    "mlp_classifier": (
        lambda: MLPClassifier(
            (6,), alpha=0.1, solver="lbfgs", tol=1e-12, max_iter=3000, random_state=0
        ),
        "multiclass",
    ),
    "mlp_binary": (
        lambda: MLPClassifier(
            (5,),
            activation="relu",
            alpha=0.3,
            solver="lbfgs",
            tol=1e-12,
            max_iter=3000,
            random_state=0,
        ),  # fmt: skip
        "binary",
    ),
    "mlp_regressor": (
        lambda: MLPRegressor(
            hidden_layer_sizes=(4,),
            activation="logistic",
            alpha=1.0,
            solver="lbfgs",
            tol=1e-12,
            max_iter=5000,
            random_state=0,
        ),  # fmt: skip
        "regression",
    ),
}


def _data_for(kind, regression, binary, multiclass):
    if kind == "regression":
        return regression
    if kind == "multiclass":
        return multiclass
    if kind == "regression_binary":  # separable-free: noisy labels
        X, y = regression
        return X, (y > np.median(y)).astype(int)
    return binary


@pytest.fixture(params=sorted(MODELS))
def fitted(request, regression, binary, multiclass):
    make, kind = MODELS[request.param]
    X, y = _data_for(kind, regression, binary, multiclass)
    return request.param, _fit(make(), X, y), X, y


def _expected_penalty(name, model, n):
    """The L2 coefficient per parameter, from scikit-learn's documented objectives."""
    if name == "linear_regression":
        return 0.0, 0.0
    if name.startswith("ridge"):  # ||y - Xw||^2 + alpha ||w||^2 over mean (y-f)^2
        return 2 * model.alpha / n, 0.0
    if name == "lr_unpenalized":
        return 0.0, 0.0
    if name == "lr_liblinear":  # intercept penalized as a feature of value s
        return 1 / (model.C * n), 1 / (model.C * n * model.intercept_scaling**2)
    if name.startswith("lr"):  # C sum_i l_i + ||w||^2 / 2
        return 1 / (model.C * n), 0.0
    if name == "sgd_classifier":  # mean l_i + alpha/2 ||w||^2
        return model.alpha, 0.0
    if name == "sgd_regressor":  # mean (y-f)^2/2 + alpha/2 ||w||^2
        return 2 * model.alpha, 0.0
    if name == "mlp_regressor":  # mean (y-f)^2/2 + alpha/(2N) ||W||^2
        return 2 * model.alpha / n, 0.0
    return model.alpha / n, 0.0  # mlp classifiers: mean log loss + alpha/(2N) ||W||^2


def _reference_output(name, model, X):
    """scikit-learn's own decision function (logits for the MLP classifiers)."""
    if name.startswith("mlp_classifier"):
        return np.log(model.predict_proba(X))  # softmax logits up to a constant
    if name == "mlp_binary":
        p = model.predict_proba(X)[:, 1]
        return np.log(p / (1 - p))
    if hasattr(model, "decision_function"):
        return model.decision_function(X)
    return model.predict(X)


def test_torch_form_computes_the_models_decision_function(fitted):
    name, model, X, y = fitted
    fm = as_functional(model, device="cpu")
    out = fm.forward(fm.theta, torch.as_tensor(X)).detach().numpy()
    ref = _reference_output(name, model, X)
    if name == "mlp_classifier":  # compare log-softmax
        out = out - np.log(np.exp(out).sum(1, keepdims=True))
    np.testing.assert_allclose(out.reshape(ref.shape), ref, rtol=1e-7, atol=1e-7)
    assert fm.dtype == torch.float64


def test_damping_is_the_models_own_penalty_and_its_optimum_is_stationary(fitted):
    # The resolved per-parameter damping matches scikit-learn's documented
    # objective, and the fitted coefficients are a stationary point of
    # (1/N) sum_i l_i + 1/2 sum_j lambda_j theta_j^2 written here with
    # torch's own losses (a wrong scaling would leave a large gradient).
    name, model, X, y = fitted
    n = len(y)
    est = ClusteredInfluenceEstimator(5, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(model, X, y)
    w_pen, b_pen = _expected_penalty(name, model, n)
    fm = as_functional(model, device="cpu")
    lam = []
    for pname, size in zip(fm.names, fm.sizes, strict=True):
        lam.append(np.full(size, b_pen if pname.endswith("bias") else w_pen))
    lam = np.concatenate(lam)
    got = (
        np.full(fm.n_params, est.damping_floor_)
        if est.damping_diagonal_ is None
        else est.damping_diagonal_
    )
    np.testing.assert_allclose(got, lam, rtol=1e-12, atol=0)
    if name.startswith("sgd"):
        return  # SGD stops short of the optimum (the optimality check says so)
    theta = {k: v.clone().requires_grad_(True) for k, v in fm.theta.items()}
    out = fm.forward(theta, torch.as_tensor(X))
    if fm.loss.name == "cross_entropy":
        data = torch.nn.functional.cross_entropy(out, torch.as_tensor(fm.encode(y)))
    elif fm.loss.name == "bce_logits":
        data = torch.nn.functional.binary_cross_entropy_with_logits(
            out.reshape(-1), torch.as_tensor(fm.encode(y)).double()
        )
    else:
        data = torch.mean((out.reshape(-1) - torch.as_tensor(y)) ** 2)
    flat = torch.cat([theta[k].reshape(-1) for k in fm.names])
    obj = data + 0.5 * (torch.as_tensor(lam) * flat**2).sum()
    if name.startswith("mlp"):
        # scikit-learn's LBFGS stops on the loss change, short of a zero
        # gradient: check the objective value against its own loss_ instead
        # (MLPRegressor's is half the mean squared error).
        want = model.loss_ * (2 if name == "mlp_regressor" else 1)
        assert float(obj) == pytest.approx(want, rel=1e-9)
        return
    grad = torch.autograd.grad(obj, list(theta.values()))
    gnorm = float(torch.cat([g.reshape(-1) for g in grad]).norm())
    assert gnorm < 1e-5, (name, gnorm)


def test_ridge_loo_equals_scikit_learns_exact_efficient_loo(regression):
    # A quadratic objective: one Newton step is the exact refit, so the
    # default LOO equals RidgeCV's closed form to float64 rounding.
    X, y = regression
    for model in (Ridge(alpha=2.0), LinearRegression()):
        model.fit(X, y)
        icv = InfluenceCV(
            ClusteredInfluenceEstimator(random_state=0),
            cv=LeaveOneOut(),
            scoring="neg_mean_squared_error",
        ).fit(model, X, y)
        sq_err = (y - icv.predict_oof()[:, 0]) ** 2
        alpha = getattr(model, "alpha", 1e-12)
        rcv = RidgeCV(alphas=[alpha], store_cv_results=True).fit(X, y)
        np.testing.assert_allclose(sq_err, rcv.cv_results_[:, 0], rtol=1e-8, atol=1e-8)
        np.testing.assert_allclose(
            icv.cv_results_["test_loss"], rcv.cv_results_[:, 0], rtol=1e-8
        )


def test_ridge_kfold_equals_cross_validate(regression):
    X, y = regression
    cv = KFold(5, shuffle=True, random_state=0)
    model = Ridge(alpha=5.0).fit(X, y)
    icv = InfluenceCV(
        ClusteredInfluenceEstimator(random_state=0),
        cv=cv,
        scoring=["neg_mean_squared_error", "r2"],
    ).fit(model, X, y)
    real = cross_validate(
        Ridge(alpha=5.0), X, y, cv=cv, scoring=["neg_mean_squared_error", "r2"]
    )
    for key in ("test_neg_mean_squared_error", "test_r2"):
        np.testing.assert_allclose(icv.cv_results_[key], real[key], rtol=1e-8)


def test_logistic_regression_cv_matches_refits(binary):
    # Not quadratic: the Newton step is approximate. KFold(10) on 200
    # standardized breast-cancer examples against scikit-learn's refits.
    X, y = binary
    model = _tight_lr(C=1.0).fit(X, y)
    cv = KFold(10, shuffle=True, random_state=0)
    icv = InfluenceCV(ClusteredInfluenceEstimator(random_state=0), cv=cv).fit(
        model, X, y
    )
    real_loss, real_acc = [], []
    for train, test in cv.split(X):
        m = _tight_lr(C=1.0).fit(X[train], y[train])
        real_loss.append(log_loss(y[test], m.predict_proba(X[test]), labels=[0, 1]))
        real_acc.append(m.score(X[test], y[test]))
    real_loss = np.array(real_loss)
    pred = icv.cv_results_["test_loss"]
    from scipy.stats import spearmanr

    assert spearmanr(pred, real_loss)[0] >= 0.99
    assert 0.95 <= np.median(pred / real_loss) <= 1.05
    assert abs(icv.cv_results_["test_score"].mean() - np.mean(real_acc)) <= 0.005


def test_pipeline_is_its_last_step_on_transformed_features(binary):
    # The earlier steps are a fixed feature map: fitting on the pipeline with
    # raw X gives the answers of the last step on the transformed X.
    X, y = binary
    X_raw = X * 7.0 + 3.0
    pipe = make_pipeline(StandardScaler(), _tight_lr(C=1.0)).fit(X_raw, y)
    Xt = pipe[:-1].transform(X_raw)
    folds = [np.arange(0, 20), np.arange(50, 90)]
    a = ClusteredInfluenceEstimator(10, random_state=0).fit(pipe, X_raw, y)
    b = ClusteredInfluenceEstimator(10, random_state=0).fit(pipe[-1], Xt, y)
    np.testing.assert_allclose(a.loss_change(folds), b.loss_change(folds), rtol=1e-10)
    np.testing.assert_allclose(
        a.loss_change(folds, X_raw[:30], y[:30]),
        b.loss_change(folds, Xt[:30], y[:30]),
        rtol=1e-10,
    )
    assert a.n_features_in_ == X.shape[1]
    # the scaler refit on other data is a change of the model (queries that
    # need the model refuse; the cached self effects need none)
    pipe[0].fit(X_raw[:100])
    with pytest.raises(ValueError, match="changed since fit"):
        a.loss_change(folds, X_raw[:30], y[:30])


def test_pipeline_ending_in_a_skorch_net(binary):
    from skorch import NeuralNetClassifier

    X, y = binary
    torch.manual_seed(0)
    net = NeuralNetClassifier(
        torch.nn.Sequential(
            torch.nn.Linear(30, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)
        ),
        criterion=torch.nn.CrossEntropyLoss,
        max_epochs=5,
        train_split=None,
        verbose=0,
    )
    X_raw = (X * 5.0 + 1.0).astype(np.float32)
    pipe = make_pipeline(StandardScaler(), net).fit(X_raw, y)
    Xt = pipe[:-1].transform(X_raw).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = ClusteredInfluenceEstimator(5, random_state=0).fit(pipe, X_raw, y)
        b = ClusteredInfluenceEstimator(5, random_state=0).fit(net, Xt, y)
    np.testing.assert_allclose(a.train_influence_, b.train_influence_, rtol=1e-5)


def test_class_labels_are_encoded_by_classes_(multiclass):
    # Labels 3, 5, 7 give the answers of labels 0, 1, 2; unknown labels raise.
    X, y = multiclass
    m_idx = _tight_lr(C=1.0).fit(X, y)
    m_lab = _tight_lr(C=1.0).fit(X, np.array([3, 5, 7])[y])
    a = ClusteredInfluenceEstimator(5, random_state=0).fit(m_idx, X, y)
    b = ClusteredInfluenceEstimator(5, random_state=0).fit(
        m_lab, X, np.array([3, 5, 7])[y]
    )
    np.testing.assert_allclose(a.train_influence_, b.train_influence_, rtol=1e-8)
    with pytest.raises(ValueError, match=r"not among the model's classes_"):
        b.loss_change([np.arange(5)], X[:4], np.array([3, 5, 4, 7]))
    icv = InfluenceCV(b, cv=KFold(4)).fit(m_lab, X, np.array([3, 5, 7])[y])
    assert set(np.unique(icv.predict_oof("predict"))) <= {3, 5, 7}


@pytest.mark.parametrize(
    "model, match",
    [
        (LogisticRegression(penalty="l1", solver="liblinear"), "penalty='l1'"),
        (LogisticRegression(l1_ratio=0.5, solver="saga"), "l1_ratio=0.5"),
        (LogisticRegression(class_weight="balanced"), "class_weight"),
        (SGDClassifier(loss="hinge"), "loss='hinge'"),
        (SGDRegressor(loss="huber"), "loss='huber'"),
        (Ridge(positive=True), "positive=True"),
    ],
)
def test_unsupported_settings_raise_naming_them(multiclass, model, match):
    X, y = multiclass
    y = (y > 0).astype(float if isinstance(model, (SGDRegressor, Ridge)) else int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(X, y)
    with pytest.raises(ValueError, match=match):
        ClusteredInfluenceEstimator(5).fit(model, X, y)


def test_multiclass_one_vs_rest_and_foreign_models_raise(multiclass):
    X, y = multiclass
    sgd = SGDClassifier(loss="log_loss", random_state=0).fit(X, y)
    with pytest.raises(ValueError, match="one-vs-rest"):
        ClusteredInfluenceEstimator(5).fit(sgd, X, y)
    forest = RandomForestClassifier(3, random_state=0).fit(X, y)
    with pytest.raises(TypeError, match="RandomForestClassifier"):
        ClusteredInfluenceEstimator(5).fit(forest, X, y)
    with pytest.raises(TypeError, match="LogisticRegression"):
        to_torch(forest)
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        ClusteredInfluenceEstimator(5).fit(LogisticRegression(), X, y)


def test_edited_model_is_detected_and_estimator_pickles(binary, tmp_path):
    X, y = binary
    model = _tight_lr(C=1.0).fit(X, y)
    est = ClusteredInfluenceEstimator(5, random_state=0).fit(model, X, y)
    S, V = [np.arange(10)], (X[50:60], y[50:60])
    before = est.loss_change(S, *V)
    path = tmp_path / "est.joblib"
    joblib.dump(est, path)
    loaded = joblib.load(path).set_params(model=model)
    np.testing.assert_array_equal(loaded.loss_change(S, *V), before)
    assert clone(est).get_params()["damping"] == "auto"
    coef = model.coef_.copy()
    model.coef_[0, 0] += 1e-3
    with pytest.raises(ValueError, match="changed since fit"):
        est.loss_change(S, *V)
    model.coef_[:] = coef
    np.testing.assert_array_equal(est.loss_change(S, *V), before)


# -- per-parameter damping on torch modules ---------------------------------------
CE = torch.nn.CrossEntropyLoss(reduction="none")


def _dense_if(module, X, y, lam):
    """(G + diag(lam))^{-1} g_i / N for every example (autograd oracles)."""
    from _oracles import dense_ggn, loop_grads

    A = dense_ggn(module, CE, X, y, 0.0) + torch.diag(torch.as_tensor(lam))
    grads = loop_grads(module, CE, X, y)
    return torch.linalg.solve(A, grads.T).T / len(X), grads


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_dict_damping_matches_a_dense_solve(tiny_classification, solver):
    # A dict puts 0.05 on the weights, 0 on the hidden biases and 0.02 on the
    # output biases: with one cluster per example the responses are
    # (G + Lambda)^{-1} g_i of a dense solve.
    net, X, y = tiny_classification
    damping = {"0.weight": 0.05, "0.bias": 0.0, "2.weight": 0.05, "2.bias": 0.02}
    lam = np.concatenate(
        [np.full(p.numel(), damping[n]) for n, p in net.named_parameters()]
    )
    n = len(X)
    est = ClusteredInfluenceEstimator(
        n, loss="cross_entropy", damping=damping, solver=solver, cg_tol=1e-12,
        random_state=0,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(net, X, y)
    np.testing.assert_allclose(est.damping_diagonal_, lam)
    assert est.damping_floor_ == 0.0
    want, _ = _dense_if(net, X, y, lam)
    v = est.responses_[est.labels_]  # cluster labels_[i] holds example i alone
    np.testing.assert_allclose(v, want.numpy() * n, rtol=1e-6, atol=1e-9)
    pq = PerQueryInfluence(
        loss="cross_entropy", damping=damping, cg_tol=1e-12, query_mode="batched"
    ).fit(net, X, y)
    np.testing.assert_allclose(
        pq.param_change([np.array([3])])[0], want[3].numpy(), rtol=1e-6, atol=1e-12
    )
    # no damping floor: the bound uses the dense solver's smallest eigenvalue
    assert np.isfinite(est.error_bound(3).total) == (solver == "dense")


def test_undamped_softmax_shift_is_left_out_by_the_dense_solver(tiny_classification):
    # With no damping on the output biases, adding a constant to every logit
    # is a flat direction: the dense solver answers with the pseudo-inverse
    # (the minimum-norm change).
    net, X, y = tiny_classification
    damping = {"0.weight": 0.05, "0.bias": 0.0, "2.weight": 0.05, "2.bias": 0.0}
    lam = np.concatenate(
        [np.full(p.numel(), damping[n]) for n, p in net.named_parameters()]
    )
    n = len(X)
    est = ClusteredInfluenceEstimator(
        n, loss="cross_entropy", damping=damping, solver="dense", random_state=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(net, X, y)
    _, grads = _dense_if(net, X, y, np.maximum(lam, 1e-3))
    names = [k for k, _ in net.named_parameters()]
    G = _dense_ggn_of(net, X, y) + np.diag(lam)
    want = np.linalg.pinv(G, rcond=1e-10, hermitian=True) @ grads.numpy().T
    np.testing.assert_allclose(
        est.responses_[est.labels_], want.T, rtol=1e-6, atol=1e-8
    )
    assert len(est.spectrum_) == est.n_params_ - 1 and names[-1] == "2.bias"
    # CG on the singular system either converges (it may then keep a
    # component along the flat direction, which changes no output: the
    # predicted loss changes agree) or breaks down naming the fix.
    cg = clone(est).set_params(solver="cg", cg_tol=1e-12)
    folds = [np.arange(5), np.arange(10, 22)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cg.fit(net, X, y)
    except FloatingPointError as exc:
        assert "solver='dense'" in str(exc)
    else:
        np.testing.assert_allclose(
            cg.loss_change(folds, X[:10], y[:10]),
            est.loss_change(folds, X[:10], y[:10]),
            rtol=1e-6,
        )


def _dense_ggn_of(net, X, y):
    from _oracles import dense_ggn

    return dense_ggn(net, CE, X, y, 0.0).numpy()


def test_dict_damping_names_are_checked(tiny_classification):
    net, X, y = tiny_classification
    names = [n for n, _ in net.named_parameters()]
    with pytest.raises(ValueError, match=r"misses \['2.bias'\]"):
        ClusteredInfluenceEstimator(4, loss="cross_entropy", damping={
            n: 0.1 for n in names if n != "2.bias"
        }).fit(net, X, y)  # fmt: skip
    with pytest.raises(ValueError, match=r"damping\['0.weight'\]=-1"):
        ClusteredInfluenceEstimator(4, loss="cross_entropy", damping={
            **{n: 0.1 for n in names}, "0.weight": -1.0
        }).fit(net, X, y)  # fmt: skip
    with pytest.raises(ValueError, match="damping='fast'"):
        ClusteredInfluenceEstimator(4, loss="cross_entropy", damping="fast").fit(
            net, X, y
        )
    # a uniform dict is the float path, bitwise
    a = ClusteredInfluenceEstimator(4, loss="cross_entropy", random_state=0)
    b = clone(a).set_params(damping={n: 1e-3 for n in names})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_array_equal(
            a.fit(net, X, y).responses_, b.fit(net, X, y).responses_
        )
    assert b.damping_diagonal_ is None and b.damping_floor_ == 1e-3


@pytest.mark.parametrize("dtype", [str, object])
def test_string_labels_through_classes_(multiclass, dtype):
    # String labels (NumPy str or object arrays) give the answers of their
    # indices; InfluenceCV predicts labels and scores them like
    # cross_validate; a torch module cannot map labels and says so.
    X, y = multiclass
    names = np.array(["ant", "bee", "cat"]).astype(dtype)[y]
    m_idx = _tight_lr(C=1.0).fit(X, y)
    m_str = _tight_lr(C=1.0).fit(X, names)
    a = ClusteredInfluenceEstimator(5, random_state=0).fit(m_idx, X, y)
    b = ClusteredInfluenceEstimator(5, random_state=0).fit(m_str, X, names)
    np.testing.assert_allclose(a.train_influence_, b.train_influence_, rtol=1e-8)
    np.testing.assert_allclose(
        a.loss_change([np.arange(7)], X[:20], y[:20]),
        b.loss_change([np.arange(7)], X[:20], names[:20]),
        rtol=1e-8,
    )
    assert b.is_current(m_str, X, names) and not b.is_current(m_str, X, names[::-1])
    cv = KFold(4, shuffle=True, random_state=0)
    icv = InfluenceCV(b, cv=cv).fit(m_str, X, names)
    ref = InfluenceCV(a, cv=cv).fit(m_idx, X, y)
    np.testing.assert_allclose(
        icv.cv_results_["test_score"], ref.cv_results_["test_score"]
    )
    assert set(icv.predict_oof("predict")) <= {"ant", "bee", "cat"}
    with pytest.raises(ValueError, match="non-numeric labels"):
        ClusteredInfluenceEstimator(5, loss="cross_entropy").fit(
            torch.nn.Linear(8, 3).double(), X, names
        )
