"""Self ``delta_loss`` of a CV fold against actual retraining (issue 7).

    python benchmarks/retrain_agreement.py [--models lr mlp] [--refits-only]

Setups (digits, X / 16, lambda = 1e-3 as both weight decay and damping):
multinomial logistic regression (p = 650; "lr" on all 1,797 digits,
"lr500" on the first 500, where each example weighs more) and a 64-32-10 tanh
MLP (p = 2,410), trained by Adam and polished by float64 LBFGS to the optimum of
(1/N) sum_i l_i + lambda/2 ||theta||^2. Folds: KFold(50) + KFold(100)
(shuffled) + 100 ShuffleSplit sets of 2 %.

Actual retraining: warm-started float64 LBFGS on the removal objective
(1/N) sum_{i not in S} l_i + lambda/2 ||theta||^2, to an inf-norm gradient
of 1e-9; its change of the fold's mean loss is the target. Refits are
cached in benchmarks/results/refits_<model>.npz (keyed by the folds).

Estimates: exact first-order per-query IF (``PerQueryInfluence``), plain CiF
(paper), corrected CiF (``target="if"``) and the Newton-step estimate
(``target="retrain"``, the default), C = 50. Reports Spearman within each
split family and the median ratio estimate / actual, and the time of the
Newton-step queries for the 150 KFold folds next to the cache build.

Writes benchmarks/results/retrain_agreement.json and prints a Markdown table.
"""

import argparse
import copy
import hashlib
import json
import pathlib
import time

import numpy as np
import torch
import torch.nn.functional as F
from _refit import l2, lbfgs_minimize
from scipy.stats import spearmanr
from sklearn.datasets import load_digits
from sklearn.model_selection import KFold, ShuffleSplit

from sklearn_cif import ClusteredInfluenceEstimator, PerQueryInfluence

LAM = 1e-3
RESULTS = pathlib.Path(__file__).parent / "results"
FAMILIES = {"K50": slice(0, 50), "K100": slice(50, 150), "SS2%": slice(150, 250)}


def data(name):
    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    # "lr500": the first 500 digits only, so each example weighs more and
    # first-order influence falls further short of retraining.
    return (X[:500], y[:500]) if name == "lr500" else (X, y)


def folds(n):
    idx = np.arange(n)
    out = [np.sort(t) for _, t in KFold(50, shuffle=True, random_state=0).split(idx)]
    out += [np.sort(t) for _, t in KFold(100, shuffle=True, random_state=1).split(idx)]
    ss = ShuffleSplit(100, test_size=0.02, random_state=2)
    return out + [np.sort(t) for _, t in ss.split(idx)]


def objective(net, X, y, n_total):
    loss = F.cross_entropy(net(X), y, reduction="sum") / n_total
    return loss + 0.5 * LAM * l2(net)


def lbfgs(net, X, y, n_total):
    return lbfgs_minimize(
        net,
        lambda m: objective(m, X, y, n_total),
        steps=3,
        max_iter=500,
        tolerance_grad=1e-9,
        tolerance_change=1e-15,
    )


def model(name, X, y):
    torch.manual_seed(0)
    if name.startswith("lr"):
        net = torch.nn.Linear(64, 10).double()
    else:
        net = torch.nn.Sequential(
            torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)
        ).double()
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=LAM)
    for _ in range(600):
        opt.zero_grad()
        F.cross_entropy(net(Xt), yt).backward()
        opt.step()
    return lbfgs(net, Xt, yt, len(y))


def refits(name, net, X, y, fold_list):
    """Actual held-out loss change per fold (cached on disk, resumable)."""
    key = hashlib.sha1(b"".join(f.tobytes() for f in fold_list)).hexdigest()
    path = RESULTS / f"refits_{name}.npz"
    actual, seconds = [], 0.0
    if path.exists():  # a partial file is saved every 10 refits
        saved = np.load(path)
        if str(saved["key"]) == key:
            actual, seconds = list(saved["actual"]), float(saved["seconds"])
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    for k in range(len(actual), len(fold_list)):
        t0, test = time.perf_counter(), fold_list[k]
        keep = np.setdiff1d(np.arange(len(y)), test)
        m = lbfgs(copy.deepcopy(net), Xt[keep], yt[keep], len(y))
        with torch.no_grad():
            before = F.cross_entropy(net(Xt[test]), yt[test]).item()
            actual.append(F.cross_entropy(m(Xt[test]), yt[test]).item() - before)
        seconds += time.perf_counter() - t0
        if k % 10 == 9 or k == len(fold_list) - 1:
            np.savez(path, key=key, actual=np.array(actual), seconds=seconds)
            print(f"  {name}: {k + 1} refits, {seconds:.0f} s", flush=True)
    return np.array(actual), seconds


def scores(pred, actual):
    out = {}
    for fam, sl in FAMILIES.items():
        a, p = actual[sl], pred[sl]
        out[fam] = {
            "spearman": float(spearmanr(a, p)[0]),
            "median_ratio": float(np.median(p / a)),
        }
    return out


def run(name, args):
    X, y = data(name)
    net = model(name, X, y)
    fold_list = folds(len(y))
    actual, refit_s = refits(name, net, X, y, fold_list)
    if args.refits_only:
        return None
    kw = dict(loss="cross_entropy", damping=LAM, cg_tol=1e-8, device="cpu")
    preds, timing = {}, {}
    pq = PerQueryInfluence(query_mode="batched", **kw).fit(net, X, y)
    t0 = time.perf_counter()
    preds["IF (per-query, exact)"] = pq.loss_change(fold_list)
    timing["IF"] = time.perf_counter() - t0
    plain = ClusteredInfluenceEstimator(
        50, residual_correction="none", random_state=0, **kw
    ).fit(net, X, y)
    preds["CiF plain (paper)"] = plain.fold_effects(fold_list, target="if").delta_loss
    t0 = time.perf_counter()
    est = ClusteredInfluenceEstimator(50, random_state=0, **kw).fit(net, X, y)
    build = time.perf_counter() - t0
    preds["CiF corrected, target='if'"] = est.fold_effects(
        fold_list, target="if"
    ).delta_loss
    t0 = time.perf_counter()
    est.fold_effects(fold_list[:150], target="retrain")
    query = time.perf_counter() - t0
    preds["CiF target='retrain' (default)"] = est.fold_effects(fold_list).delta_loss
    rows = {k: scores(v, actual) for k, v in preds.items()}
    ranks = {}
    for rank in args.ranks:  # how the Newton estimate depends on correction_rank
        t0 = time.perf_counter()
        e = ClusteredInfluenceEstimator(  # the rank matters for CG only
            50, correction_rank=rank, solver="cg", random_state=0, **kw
        ).fit(net, X, y)
        ranks[rank] = {
            "build_s": time.perf_counter() - t0,
            **scores(e.fold_effects(fold_list).delta_loss, actual),
        }
    return {
        "p": est.n_params_,
        "rows": rows,
        "correction_rank": ranks,
        "build_s": build,
        "build_phases_s": est.timings_,
        "retrain_query_150_folds_s": query,
        "query_over_build": query / build,
        "if_batched_150+100_s": timing["IF"],
        "refits_s": refit_s,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["lr", "lr500", "mlp"])
    ap.add_argument("--refits-only", action="store_true")
    ap.add_argument("--ranks", nargs="*", type=int, default=[16, 32, 128])
    args = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = {name: run(name, args) for name in args.models}
    if args.refits_only:
        return
    (RESULTS / "retrain_agreement.json").write_text(json.dumps(out, indent=2))
    for name, res in out.items():
        print(f"\n### {name} (p = {res['p']}): Spearman / median ratio vs retraining")
        print("| estimate | " + " | ".join(FAMILIES) + " |")
        print("|---|" + "---|" * len(FAMILIES))
        for label, sc in res["rows"].items():
            cells = [
                f"{sc[f]['spearman']:.3f} / {sc[f]['median_ratio']:.2f}"
                for f in FAMILIES
            ]
            print(f"| {label} | " + " | ".join(cells) + " |")
        for rank, sc in res["correction_rank"].items():
            cells = [
                f"{sc[f]['spearman']:.3f} / {sc[f]['median_ratio']:.2f}"
                for f in FAMILIES
            ]
            print(
                f"| target='retrain', correction_rank={rank} "
                f"(build {sc['build_s']:.2f} s) | " + " | ".join(cells) + " |"
            )
        print(
            f"build {res['build_s']:.2f} s; Newton queries for 150 folds "
            f"{res['retrain_query_150_folds_s']:.3f} s "
            f"({res['query_over_build']:.2f}x the build); refits {res['refits_s']:.0f} s"
        )


if __name__ == "__main__":
    main()
