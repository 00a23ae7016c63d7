"""Build time and peak memory of a CiF cache as N and p grow (issue 4).

    python benchmarks/scaling.py [--sizes 10000 50000 200000] [--big-p | --big-p-build]

Each configuration runs in its own subprocess so that its peak resident
memory (``ru_maxrss``) is its own; the figure reported is the peak during
``fit`` minus the resident memory just before it (model and data loaded).

*N scaling*: ``make_classification`` (20 features, 2 classes), an MLP
20-32-2 (p = 738) trained for one epoch, C = 50, k = 256, defaults
otherwise (corrected, Newton features). The cache holds about
N (k + C + C d + d r + d^2) + C p numbers; nothing is N x p.

*Large p* (``--big-p``): a 1000-3200-3200-10 MLP (p = 13.5M) on N = 256,
k = 1,024, batch 8: the CountSketch pass alone; ``--big-p-build`` adds the
whole build (C = 10, rank 16; slow on a CPU; ``--sizes --big-p-build
--out scaling_big_p.json`` runs it alone). A dense Gaussian sketch would hold p x k = 13.8G numbers.

Writes benchmarks/results/scaling.json and prints a Markdown table.
"""

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import time

RESULTS = pathlib.Path(__file__).parent / "results"


def _rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def one_n(n):
    import numpy as np
    import torch
    from sklearn.datasets import make_classification

    from sklearn_cif import ClusteredInfluenceEstimator

    X, y = make_classification(n, 20, n_informative=10, n_classes=2, random_state=0)
    X = X.astype(np.float32)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(20, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2)
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-3)
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    for idx in torch.randperm(n).split(256):  # one epoch
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(Xt[idx]), yt[idx]).backward()
        opt.step()
    base = _rss_mb()
    t0 = time.perf_counter()
    est = ClusteredInfluenceEstimator(
        50, loss="cross_entropy", device="cpu", random_state=0, batch_size=1024
    ).fit(net, X, y)
    return {
        "N": n,
        "p": est.n_params_,
        "build_s": time.perf_counter() - t0,
        "phases_s": est.timings_,
        "peak_rss_over_base_mb": _rss_mb() - base,
        "data_passes": est.n_data_passes_,
        "ggn_products": est.n_ggn_products_,
        "cg_iterations_max": int(np.max(est.n_iter_)),
        "cache_numbers": int(
            sum(v.size for v in vars(est).values() if isinstance(v, np.ndarray))
        ),
    }


def big_p(full_build):
    import torch

    from sklearn_cif import ClusteredInfluenceEstimator
    from sklearn_cif.adapters import as_functional
    from sklearn_cif.passes import DataPasses
    from sklearn_cif.sketch import make_sketch

    n = 256
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(1000, 3200),
        torch.nn.Tanh(),
        torch.nn.Linear(3200, 3200),
        torch.nn.Tanh(),
        torch.nn.Linear(3200, 10),
    )
    X = torch.randn(n, 1000)
    y = torch.randint(0, 10, (n,))
    est = ClusteredInfluenceEstimator(
        10,
        sketch_dim=1024,
        correction_rank=16,
        n_calibration=8,
        batch_size=8,
        loss="cross_entropy",
        device="cpu",
        random_state=0,
    )
    fmodel = as_functional(net, loss="cross_entropy", device="cpu")
    p = fmodel.n_params
    base = _rss_mb()
    t0 = time.perf_counter()
    sketch = make_sketch("countsketch", p, 1024, 0)
    DataPasses(fmodel, X, y, 8).map_rows(
        lambda idx, G, _: {"S": sketch(G)}, gradients=True
    )
    sketch_s = time.perf_counter() - t0
    sketch_peak = _rss_mb() - base
    res = {
        "N": n,
        "p": p,
        "k": 1024,
        "sketch_pass_s": sketch_s,
        "sketch_pass_peak_rss_over_base_mb": sketch_peak,
        "batch_gradients_mb": 8 * p * 4 / 2**20,
        "dense_gaussian_sketch_mb": p * 1024 * 4 / 2**20,
    }
    if not full_build:
        return res
    t0 = time.perf_counter()
    est.fit(net, X, y)
    return {
        **res,
        "build_s": time.perf_counter() - t0,
        "phases_s": est.timings_,
        "build_peak_rss_over_base_mb": _rss_mb() - base,
        "responses_mb": est.responses_.nbytes / 2**20,
        "data_passes": est.n_data_passes_,
        "ggn_products": est.n_ggn_products_,
    }


def run_child(arg):
    out = subprocess.run(
        [sys.executable, __file__, "--child", arg],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="*", type=int, default=[10000, 50000, 200000])
    ap.add_argument("--big-p", action="store_true")
    ap.add_argument("--big-p-build", action="store_true")
    ap.add_argument("--child")
    ap.add_argument("--out", default="scaling.json", help="file in results/")
    args = ap.parse_args()
    if args.child:
        if args.child.startswith("big"):
            res = big_p(full_build=args.child == "big-build")
        else:
            res = one_n(int(args.child))
        print(json.dumps(res))
        return
    RESULTS.mkdir(exist_ok=True)
    rows = []
    for n in args.sizes:
        rows.append(run_child(str(n)))
        print(json.dumps(rows[-1]), flush=True)
    big = None
    if args.big_p or args.big_p_build:
        big = run_child("big-build" if args.big_p_build else "big")
    (RESULTS / args.out).write_text(json.dumps({"N": rows, "big_p": big}, indent=2))
    print("\n| N | p | build s | peak RSS MB | data passes | GGN products | CG iters |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['N']} | {r['p']} | {r['build_s']:.1f} | "
            f"{r['peak_rss_over_base_mb']:.0f} | {r['data_passes']} | "
            f"{r['ggn_products']} | {r['cg_iterations_max']} |"
        )
    if big:
        print(
            f"\nbig p = {big['p']:,}, N = {big['N']}, k = 1024: sketch pass "
            f"{big['sketch_pass_s']:.1f} s, +{big['sketch_pass_peak_rss_over_base_mb']:.0f}"
            f" MB peak (one batch of gradients: {big['batch_gradients_mb']:.0f} MB; a "
            f"dense Gaussian sketch would be {big['dense_gaussian_sketch_mb']:.0f} MB)"
        )
        if "build_s" in big:
            phases = ", ".join(f"{k} {v:.1f}" for k, v in big["phases_s"].items())
            print(
                f"full build {big['build_s']:.1f} s, "
                f"+{big['build_peak_rss_over_base_mb']:.0f} MB ({phases}; data "
                f"passes {big['data_passes']}, GGN products {big['ggn_products']})"
            )


if __name__ == "__main__":
    main()
