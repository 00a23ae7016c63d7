"""Predicted vs real cross-validation scores, from one cache per model.

    python benchmarks/cv_scores.py [--setups NAME ...] [--loo-n 60]

Three float64 setups (lambda is the training L2 coefficient, the optimizers'
weight decay and the estimator's damping):

- ``skorch_digits``: skorch's default classifier form, a
  ``NeuralNetClassifier`` with module Linear(64, 32) - Tanh - Linear(32, 10) -
  Softmax and its default criterion ``NLLLoss`` (on the log of the
  probabilities), on digits / 16 (N = 1797), lambda = 1e-3;
- ``bc_binary``: a plain module Linear(30, 16) - Tanh - Linear(16, 1), binary
  cross-entropy on its logit (``loss="bce_logits"``), on standardized breast
  cancer, lambda = 1e-2;
- ``diabetes_reg``: a plain module Linear(10, 16) - Tanh - Linear(16, 1),
  squared error (``loss="mse"``), on diabetes with X and y standardized,
  lambda = 1e-2.

Folds: KFold(10, shuffle=True, random_state=0), and leave-one-out on
``--loo-n`` seeded random examples (explicit (train, test) index pairs); the
same folds for the estimate and both real CVs.

Estimate (no retraining): each model is trained to the optimum of
(1/N) sum_i l_i + lambda/2 ||theta||^2 (every parameter penalized): the
from-scratch recipe below on all N as a warm-up, then float64 LBFGS runs
(``_refit.lbfgs_minimize``) with a gradient-only damped Newton-CG polish (as
in cv_fidelity.py) to an inf-norm gradient < 1e-9 (the reached norm is
reported). The cache is ``ClusteredInfluenceEstimator(n_clusters=50,
damping=lambda, random_state=0, loss=...)`` (the loss derived from the skorch
criterion, ``nll_proba``, for skorch_digits), every other setting default,
built once and reused by ``InfluenceCV(estimator, cv=folds, scoring=...)``
with ``target="auto"`` (the default; the resolved target is reported) and
with ``target="if"`` (first order).

Real CV, two kinds, on the same folds:

1. from the optimum: for each fold, a warm-started float64 refit (a deep copy
   of the optimum-trained module) of (1/N) sum_{i not in S} l_i +
   lambda/2 ||theta||^2 (the FULL N, as in cv_fidelity.py) to an inf-norm
   gradient < 1e-9 by the same LBFGS and Newton-CG rounds (at most eight; the
   largest gradient reached is reported); the held-out fold is scored. This
   is what the estimate targets. The refit is a local minimum near the
   optimum, not always the same one: on diabetes_reg, where a KFold refit
   moves theta by 25-60 % of its norm, one fold's refit reached a minimum
   with a held-out MSE of 0.548 instead of 0.495 under a smaller LBFGS
   budget.
2. from scratch: the user's own finite-epoch recipe from a fresh seeded
   initialization (the same one in every fold): for skorch_digits
   ``sklearn.model_selection.cross_validate`` with a fresh skorch net (Adam,
   lr 0.01, weight decay lambda, 60 epochs, batch 128, ``train_split=None``);
   for the plain modules a full-batch torch loop (Adam, lr 0.01, weight decay
   lambda, 200 epochs). The cache is still the one built on the
   optimum-trained model: these numbers are reported as measured, against an
   estimate that does not target them.

Scores of the held-out predictions, computed by the same functions for the
estimate (its predicted out-of-fold outputs, checked against
``cv_results_``) and for real CV: classifiers, accuracy and log loss (all
labels given), the mean over folds; the binary one also ROC AUC, the mean over
folds holding both classes for KFold and pooled over all held-out
predictions for leave-one-out (a one-example fold has none); the regressor,
MSE (mean over folds) and R^2 (mean over folds for KFold, pooled over all
held-out predictions for leave-one-out). The "full-data model" column scores
the optimum-trained model on the same held-out examples (no removal).

Also reported per setup and scheme: the Spearman correlation over folds
between the predicted held-out loss (``cv_results_["test_loss"]``, the
training criterion's mean over the fold) and the real one, for the default
target and for first order side by side, against each kind of real CV; the
training, cache build and real CV seconds; the largest inf-norm gradient the
refits from the optimum reached.

Writes benchmarks/results/cv_scores.json and prints Markdown tables.
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _refit import l2, lbfgs_minimize, newton_cg_polish  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    accuracy_score,
    log_loss,
    make_scorer,
    mean_squared_error,
    r2_score,
    roc_auc_score,
)
from sklearn.model_selection import KFold, cross_validate  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from skorch import NeuralNetClassifier  # noqa: E402

from sklearn_cif import ClusteredInfluenceEstimator, InfluenceCV  # noqa: E402
from sklearn_cif.losses import get_loss  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
TOL = 1e-9
EPS = torch.finfo(torch.float64).eps
SETUPS = {
    "skorch_digits": dict(kind="multiclass", lam=1e-3, loss=None),
    "bc_binary": dict(kind="binary", lam=1e-2, loss="bce_logits"),
    "diabetes_reg": dict(kind="regression", lam=1e-2, loss="mse"),
}
RECIPE = dict(lr=0.01, skorch_epochs=60, batch_size=128, torch_epochs=200)
# LBFGS runs of max_iter, then Newton-CG steps, for `rounds` rounds
TRAIN = dict(lbfgs_runs=20, max_iter=1000, rounds=6, newton=8)
REFIT = dict(lbfgs_runs=3, max_iter=300, rounds=8, newton=6)
NEWTON_CG = dict(cg_iter=2000, cg_rtol=1e-3)


def data(name):
    if name == "skorch_digits":
        X, y = load_digits(return_X_y=True)
        return X / 16.0, y.astype(np.int64)
    if name == "bc_binary":
        X, y = load_breast_cancer(return_X_y=True)
        return StandardScaler().fit_transform(X), y.astype(np.int64)
    X, y = load_diabetes(return_X_y=True)
    y = StandardScaler().fit_transform(y[:, None])[:, 0]
    return StandardScaler().fit_transform(X), y


def module(name):
    """The setup's freshly initialized module, the same in every call.

    Seeds torch's global generator, which skorch's batch shuffling then draws from.
    """
    nn = torch.nn
    torch.manual_seed(0)
    if name == "skorch_digits":
        net = nn.Sequential(
            nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10), nn.Softmax(dim=-1)
        )
    elif name == "bc_binary":
        net = nn.Sequential(nn.Linear(30, 16), nn.Tanh(), nn.Linear(16, 1))
    else:
        net = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 1))
    return net.double()


def criterion(name):
    """Per-example training loss ``(outputs, y) -> (n,)``, as the setup trains."""
    if name == "skorch_digits":  # NeuralNetClassifier + NLLLoss: log(p + eps)
        return lambda out, y: F.nll_loss(torch.log(out + EPS), y, reduction="none")
    if name == "bc_binary":
        return lambda out, y: F.binary_cross_entropy_with_logits(
            out[:, 0], y.double(), reduction="none"
        )
    return lambda out, y: (out[:, 0] - y) ** 2


def held_out(name, net, X):
    """Class probabilities (classifiers) or values of a module, as NumPy."""
    with torch.no_grad():
        out = net(torch.as_tensor(X))
    if name == "bc_binary":
        s = torch.sigmoid(out[:, 0])
        out = torch.stack([1 - s, s], dim=1)
    elif name == "diabetes_reg":
        out = out[:, 0]
    return out.numpy()


def skorch_net(lam):
    return NeuralNetClassifier(
        module("skorch_digits"),
        optimizer=torch.optim.Adam,
        lr=RECIPE["lr"],
        optimizer__weight_decay=lam,
        max_epochs=RECIPE["skorch_epochs"],
        batch_size=RECIPE["batch_size"],
        train_split=None,
        verbose=0,
    )


def torch_recipe(name, X, y, lam):
    """The plain modules' recipe: full-batch Adam from the seeded initialization."""
    net, crit = module(name), criterion(name)
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    opt = torch.optim.Adam(net.parameters(), lr=RECIPE["lr"], weight_decay=lam)
    for _ in range(RECIPE["torch_epochs"]):
        opt.zero_grad()
        crit(net(Xt), yt).mean().backward()
        opt.step()
    return net


def objective(net, crit, X, y, n_total, lam, params=None):
    """(1/n_total) sum_i l_i + lam/2 ||theta||^2, at ``params`` when given."""
    if params is None:
        return crit(net(X), y).sum() / n_total + 0.5 * lam * l2(net)
    out = torch.func.functional_call(net, params, (X,))
    sq = sum((p * p).sum() for p in params.values())
    return crit(out, y).sum() / n_total + 0.5 * lam * sq


def grad_inf_norm(net, *problem):
    net.zero_grad()
    objective(net, *problem).backward()
    g = max(p.grad.abs().max().item() for p in net.parameters())
    net.zero_grad()
    return g


def newton_polish(net, problem, steps):
    """:func:`_refit.newton_cg_polish` on any of the setups' objectives."""
    names = [k for k, _ in net.named_parameters()]
    shapes = [q.shape for q in net.parameters()]
    sizes = [q.numel() for q in net.parameters()]

    def obj(flat):
        views = (t.view(s) for t, s in zip(flat.split(sizes), shapes, strict=True))
        return objective(net, *problem, params=dict(zip(names, views, strict=True)))

    theta = torch.cat([q.detach().reshape(-1) for q in net.parameters()])
    theta, _, _ = newton_cg_polish(obj, theta, steps=steps, tol=TOL, **NEWTON_CG)
    with torch.no_grad():
        for p, t in zip(net.parameters(), theta.split(sizes), strict=True):
            p.copy_(t.view(p.shape))


def minimize(net, problem, *, lbfgs_runs, max_iter, rounds, newton):
    """Rounds of LBFGS runs and Newton-CG polish to an inf-norm gradient < TOL.

    Returns the reached inf-norm gradient.
    """
    g = grad_inf_norm(net, *problem)
    for _ in range(rounds):
        used = 0
        while g >= TOL and used < lbfgs_runs:
            lbfgs_minimize(
                net,
                lambda m: objective(m, *problem),
                steps=1,
                max_iter=max_iter,
                tolerance_grad=TOL,
                tolerance_change=1e-15,
            )
            used += 1
            g_old, g = g, grad_inf_norm(net, *problem)
            if g < 1e-6 or (g < 1e-5 and g > 0.5 * g_old):  # Newton's turn
                break
        if g < TOL:
            break
        newton_polish(net, problem, newton)
        g = grad_inf_norm(net, *problem)
    return g


def folds(n, loo_n):
    """The two fold schemes as lists of (train, test) index arrays."""
    idx = np.arange(n)
    kfold = list(KFold(10, shuffle=True, random_state=0).split(idx))
    loo = np.sort(np.random.default_rng(0).choice(n, loo_n, replace=False))
    return {
        "KFold10": kfold,
        f"LOO{loo_n}": [(np.delete(idx, i), np.array([i])) for i in loo],
    }


def scorers(kind, per_fold_only):
    """Scorers of one fold's held-out predictions (labels given to log loss)."""
    if kind == "regression":
        out = {"neg_mean_squared_error": "neg_mean_squared_error"}
        return out if per_fold_only else {**out, "r2": "r2"}
    labels = np.arange(10 if kind == "multiclass" else 2)
    out = {
        "accuracy": "accuracy",
        "neg_log_loss": make_scorer(
            log_loss,
            greater_is_better=False,
            response_method="predict_proba",
            labels=labels,
        ),
    }
    return (
        out if per_fold_only or kind == "multiclass" else {**out, "roc_auc": "roc_auc"}
    )


def fold_scores(kind, y, pred):
    """Per-fold scores of held-out predictions (probabilities or values)."""
    if kind == "regression":
        return dict(
            mse=mean_squared_error(y, pred),
            r2=r2_score(y, pred) if len(y) > 1 else np.nan,
        )
    labels = np.arange(pred.shape[1])
    out = dict(
        accuracy=accuracy_score(y, pred.argmax(1)),
        log_loss=log_loss(y, pred, labels=labels),
    )
    if kind == "binary":
        both = len(np.unique(y)) == 2
        out["roc_auc"] = roc_auc_score(y, pred[:, 1]) if both else np.nan
    return out


def summarize(kind, y, tests, preds, pooled):
    """Scheme-level scores: means over folds, or pooled where ``pooled``."""
    per = [fold_scores(kind, y[t], p) for t, p in zip(tests, preds, strict=True)]
    yy, pp = y[np.concatenate(tests)], np.concatenate(preds)
    out = {}
    for k in per[0]:
        if pooled and k == "roc_auc":  # nan when the examples hold one class
            both = len(np.unique(yy)) == 2
            out[k] = float(roc_auc_score(yy, pp[:, 1])) if both else np.nan
        elif pooled and k == "r2":
            out[k] = float(r2_score(yy, pp))
        else:
            out[k] = float(np.nanmean([s[k] for s in per]))
    return out, per


def check_against(per, results, names):
    """Our per-fold scores of predictions must be the scorers' own."""
    for ours, theirs, sign in names:
        if theirs in results:
            np.testing.assert_allclose(
                [s[ours] for s in per], sign * results[theirs], rtol=1e-9, atol=1e-12
            )


SCORER_KEYS = [
    ("accuracy", "test_accuracy", 1),
    ("log_loss", "test_neg_log_loss", -1),
    ("roc_auc", "test_roc_auc", 1),
    ("mse", "test_neg_mean_squared_error", -1),
    ("r2", "test_r2", 1),
]


def train_optimum(name, X, y, lam):
    """The model at the optimum: the recipe on all N, then LBFGS and Newton-CG."""
    t0 = time.perf_counter()
    if name == "skorch_digits":
        model = skorch_net(lam).fit(X, y)
        net = model.module_
    else:
        model = net = torch_recipe(name, X, y, lam)
    problem = (criterion(name), torch.as_tensor(X), torch.as_tensor(y), len(y), lam)
    g = minimize(net, problem, **TRAIN)
    return model, net, dict(grad=g, seconds=time.perf_counter() - t0)


def refits_from_optimum(name, net, X, y, lam, splits):
    """Held-out predictions of warm-started refits to convergence, per fold."""
    Xt, yt, crit = torch.as_tensor(X), torch.as_tensor(y), criterion(name)
    preds, losses, grads = [], [], []
    for train, test in splits:
        m = copy.deepcopy(net)
        grads.append(minimize(m, (crit, Xt[train], yt[train], len(y), lam), **REFIT))
        preds.append(held_out(name, m, X[test]))
        with torch.no_grad():
            losses.append(crit(m(Xt[test]), yt[test]).mean().item())
    return preds, np.array(losses), np.array(grads)


def from_scratch(name, X, y, lam, splits, kind):
    """Held-out predictions of the user's finite-epoch recipe, per fold."""
    Xt, yt, crit = torch.as_tensor(X), torch.as_tensor(y), criterion(name)
    if name == "skorch_digits":
        res = cross_validate(
            skorch_net(lam),
            X,
            y,
            cv=splits,
            scoring=scorers(kind, per_fold_only=True),
            return_estimator=True,
        )
        nets = [est.module_ for est in res["estimator"]]
    else:
        res = {}
        nets = [torch_recipe(name, X[train], y[train], lam) for train, _ in splits]
    preds = [
        held_out(name, m, X[test]) for m, (_, test) in zip(nets, splits, strict=True)
    ]
    with torch.no_grad():
        losses = [
            crit(m(Xt[test]), yt[test]).mean().item()
            for m, (_, test) in zip(nets, splits, strict=True)
        ]
    return preds, np.array(losses), res


def spearman(a, b):
    return float(spearmanr(a, b).statistic)


def run_scheme(name, cfg, est, model, net, X, y, splits, loo):
    kind, lam = cfg["kind"], cfg["lam"]
    tests = [test for _, test in splits]
    loss = get_loss(est.loss_name_)
    predicted, pred_loss, targets = {}, {}, {}
    for label, target in (("default", "auto"), ("first_order", "if")):
        icv = InfluenceCV(
            est, cv=splits, scoring=scorers(kind, per_fold_only=loo), target=target
        ).fit(model, X, y)
        assert icv.fit_time_ == 0.0, "InfluenceCV rebuilt the cache"
        out = icv.oof_outputs_
        out = loss.to_proba(out) if loss.is_classifier else out[:, 0]
        bounds = np.cumsum([0, *icv.cv_results_["n_test"]])
        preds = [out[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
        predicted[label], per = summarize(kind, y, tests, preds, loo)
        check_against(per, icv.cv_results_, SCORER_KEYS)
        pred_loss[label] = icv.cv_results_["test_loss"]
        targets[label] = icv.target_
    full = summarize(kind, y, tests, [held_out(name, net, X[t]) for t in tests], loo)

    t0 = time.perf_counter()
    preds, opt_loss, grads = refits_from_optimum(name, net, X, y, lam, splits)
    opt_s = time.perf_counter() - t0
    optimum = summarize(kind, y, tests, preds, loo)[0]

    t0 = time.perf_counter()
    preds, scratch_loss, cv_res = from_scratch(name, X, y, lam, splits, kind)
    scratch_s = time.perf_counter() - t0
    scratch, per = summarize(kind, y, tests, preds, loo)
    check_against(per, cv_res, SCORER_KEYS)
    return dict(
        n_folds=len(splits),
        targets=targets,
        scores=dict(
            full_data_model=full[0],
            predicted_default=predicted["default"],
            predicted_first_order=predicted["first_order"],
            real_from_optimum=optimum,
            real_from_scratch=scratch,
        ),
        spearman={
            f"{label}_vs_{real}": spearman(pred_loss[label], actual)
            for real, actual in (("optimum", opt_loss), ("scratch", scratch_loss))
            for label in ("default", "first_order")
        },
        real_cv_s=dict(optimum=opt_s, scratch=scratch_s),
        refit_grad_max=float(grads.max()),
        refits_above_tol=int((grads >= TOL).sum()),
        per_fold=dict(
            predicted_loss_default=pred_loss["default"].tolist(),
            predicted_loss_first_order=pred_loss["first_order"].tolist(),
            real_loss_optimum=opt_loss.tolist(),
            real_loss_scratch=scratch_loss.tolist(),
            refit_grad=grads.tolist(),
        ),
    )


def run(name, loo_n):
    cfg = SETUPS[name]
    X, y = data(name)
    model, net, trained = train_optimum(name, X, y, cfg["lam"])
    print(
        f"{name}: N = {len(y)}, p = {sum(q.numel() for q in net.parameters())}, "
        f"trained to an inf-norm gradient of {trained['grad']:.1e} "
        f"({trained['seconds']:.0f} s)",
        flush=True,
    )
    t0 = time.perf_counter()
    est = ClusteredInfluenceEstimator(
        n_clusters=50, damping=cfg["lam"], random_state=0, loss=cfg["loss"]
    ).fit(model, X, y)
    build_s = time.perf_counter() - t0
    schemes = {}
    for scheme, splits in folds(len(y), loo_n).items():
        schemes[scheme] = run_scheme(
            name, cfg, est, model, net, X, y, splits, scheme.startswith("LOO")
        )
        r = schemes[scheme]
        print(
            f"  {scheme}: real CV {r['real_cv_s']['optimum']:.0f} s from the optimum "
            f"(max refit grad {r['refit_grad_max']:.1e}), "
            f"{r['real_cv_s']['scratch']:.0f} s from scratch",
            flush=True,
        )
    return dict(
        lam=cfg["lam"],
        N=len(y),
        loss_name_=est.loss_name_,
        solver_=est.solver_,
        curvature_=est.curvature_,
        optimality_gap_=float(est.optimality_gap_),
        training=trained,
        build_s=build_s,
        schemes=schemes,
    )


def tables(out):
    cols = (
        "full_data_model",
        "predicted_default",
        "predicted_first_order",
        "real_from_optimum",
        "real_from_scratch",
    )
    print(
        "\n| setup | scheme | metric | full-data model | predicted default | "
        "predicted 1st order | real from optimum | real from scratch |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, res in out.items():
        for scheme, r in res["schemes"].items():
            for metric in r["scores"]["real_from_optimum"]:
                vals = " | ".join(f"{r['scores'][c][metric]:.4f}" for c in cols)
                print(f"| {name} | {scheme} | {metric} | {vals} |")
    print(
        "\n| setup | scheme | default target | Spearman default / 1st order vs "
        "optimum refits | vs from scratch | train s | build s | real CV s optimum "
        "| real CV s scratch | max refit grad |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, res in out.items():
        for scheme, r in res["schemes"].items():
            s = r["spearman"]
            print(
                f"| {name} | {scheme} | {r['targets']['default']} | "
                f"{s['default_vs_optimum']:.3f} / {s['first_order_vs_optimum']:.3f} | "
                f"{s['default_vs_scratch']:.3f} / {s['first_order_vs_scratch']:.3f} | "
                f"{res['training']['seconds']:.0f} | {res['build_s']:.1f} | "
                f"{r['real_cv_s']['optimum']:.0f} | {r['real_cv_s']['scratch']:.0f} | "
                f"{r['refit_grad_max']:.1e} |"
            )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    ap.add_argument(
        "--loo-n",
        type=int,
        default=60,
        help="seeded random examples left out one at a time",
    )
    args = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    out = {name: run(name, args.loo_n) for name in args.setups}
    total = time.perf_counter() - t0
    for name, res in out.items():
        print(
            f"{name}: loss {res['loss_name_']}, {res['solver_']} solver, curvature "
            f"{res['curvature_']}, optimality gap {res['optimality_gap_']:.1e}"
        )
    tables(out)
    print(f"\ntotal {total:.0f} s")
    doc = dict(
        loo_n=args.loo_n,
        recipe=RECIPE,
        tolerance=TOL,
        total_s=total,
        setups=out,
    )
    (RESULTS / "cv_scores.json").write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
