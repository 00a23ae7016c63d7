"""Building a :class:`~sklearn_cif._cache.CiFCache`: the recipe and its steps.

:func:`build_cache` runs the named steps of a CiF fit in order: sketch
(pass 1), cluster, cluster means (pass 2), spectrum and block CG solves,
influences (pass 3), calibration, output Jacobian products (pass 4) and the
Newton features (pass 5). Every loop over the data goes through one
:class:`~sklearn_cif.passes.DataPasses`; nothing here stores an ``N x p``
matrix, and nothing here sees an estimator: the settings arrive as a
:class:`BuildConfig` of plain values.
"""

import dataclasses
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.cluster import MiniBatchKMeans

from sklearn_cif import _newton
from sklearn_cif._cache import CiFCache
from sklearn_cif._checks import data_fingerprint, n_features, n_outputs
from sklearn_cif._complement import fit_background, own_share
from sklearn_cif.curvature import curvature_indices, make_curvature
from sklearn_cif.distributed import agree_on_inputs, agree_on_seeds, make_passes
from sklearn_cif.exceptions import CIFWarning
from sklearn_cif.gradients import output_jvp
from sklearn_cif.passes import Timer, progress_bar, row_sq_norms
from sklearn_cif.sketch import make_sketch
from sklearn_cif.solvers import (
    CGResult,
    SpectralPreconditioner,
    batched_cg,
    block_cg,
    canonical_signs,
    spectral_preconditioner,
)

__all__ = ["DENSE_MAX_FEATURES", "DENSE_MAX_PARAMS", "BuildConfig", "build_cache"]

# optimality_gap above which fit warns: the leftover regularized gradient
# pulls harder than resampling the training set would.
MAX_OPTIMALITY_GAP = 1.0
# correction_rank="auto": ranks tried in turn, until the first eigenvalue left
# out is within (1 + AUTO_RANK_TAIL) of the damping (the complement's inverse
# then errs by at most that factor), or the Newton features N x d x r would
# pass DENSE_MAX_FEATURES.
AUTO_RANKS = (128, 256, 512)
AUTO_RANK_TAIL = 1.0
# cg_tol="auto": the range of the per-cluster tolerances (see solve_tolerances);
# the floor is the default before issue 14, about what float32 block CG reaches.
AUTO_TOL_RANGE = (1e-5, 0.5)
# Bound on the geometric-mean error of the calibration's exact values at which
# its solve stops (see calibrate): beta comes from n_calibration = 16
# examples, whose sampling error is larger.
CALIBRATION_TOL = 1e-2
# solver="auto" factors the curvature when p is at most this (a p x p float64
# matrix: 134 MB and ~9 s of eigh on 2 cores at p = 4096) ...
DENSE_MAX_PARAMS = 4096
# ... and the Newton features of every eigenpair, N x d x p numbers, stay
# within this many (1 GiB in float64).
DENSE_MAX_FEATURES = 2**27


@dataclass(frozen=True)
class BuildConfig:
    """The validated settings of one CiF build (plain values)."""

    n_clusters: int
    sketch: str
    sketch_dim: int
    damping: float | np.ndarray  # uniform, or the (p,) diagonal
    cg_tol: float | str  # or "auto": per cluster, see solve_tolerances
    cg_maxiter: int | None
    batch_size: int
    correction: str  # "full", "cross" or "none"
    solver: str  # "auto", "dense" or "cg"
    correction_rank: int | str  # an int or "auto"
    n_calibration: int
    curvature_samples: int | None
    curvature: str
    verbose: int
    distributed: bool = False  # shard the passes over the process group


def build_cache(fmodel, X, y, config, seeds, settings):
    """Run every step of a CiF fit; return the new cache (nothing installed).

    Parameters
    ----------
    fmodel : FunctionalModel
    X, y : array-like or tensors
        Validated training data.
    config : BuildConfig
    seeds : Seeds
        One seed per consumer of randomness.
    settings : dict
        The pinned parameter values, stored in the cache.

    Returns
    -------
    cache : CiFCache
    """
    cfg, timer = config, Timer()
    floor = float(np.min(cfg.damping))  # min_j lambda_j
    fingerprint = data_fingerprint(X, y)  # before any pass: fails fast
    passes = make_passes(fmodel, X, y, cfg.batch_size, cfg.distributed)
    if cfg.distributed:
        agree_on_inputs(fingerprint, fmodel.fingerprint())
        seeds = agree_on_seeds(seeds)
    n = passes.n_samples

    def phase(name, total=None, desc=None):
        return _phase(timer, cfg.verbose, name, total, desc)

    # The curvature and solver are settled before any pass.
    curv_idx = curvature_indices(n, cfg.curvature_samples, seeds.curvature)
    curv_passes = passes if curv_idx is None else passes.subset(curv_idx)
    curvature = "ggn" if cfg.curvature == "auto" else cfg.curvature
    op = make_curvature(curvature, curv_passes, cfg.damping)
    full = cfg.correction == "full"  # at C = N the residuals are zero
    n_out = n_outputs(fmodel, X)
    solver = choose_solver(cfg.solver, op, n, n_out)
    if curvature == "hessian" and solver != "dense":
        raise ValueError(
            "curvature='hessian' needs solver='dense' (or 'auto' choosing it): "
            "the spectrum, calibration and error bound of the CG path assume "
            "a curvature at least the damping. Use curvature='auto' or 'ggn'."
        )

    sketch = make_sketch(cfg.sketch, fmodel.n_params, cfg.sketch_dim, seeds.sketch)
    with phase("sketch", n) as bar:
        first = sketch_pass(passes, sketch, bar)
    with phase("cluster"):
        labels = cluster(first["S"], cfg.n_clusters, seeds.kmeans)
    n_clusters = int(labels.max()) + 1
    with phase("cluster_means", n, "means") as bar:
        means = cluster_means(passes, labels, n_clusters, bar)
    opt = optimality(fmodel, first, labels, means, cfg.damping)
    if opt[1] > MAX_OPTIMALITY_GAP:
        warnings.warn(
            f"The model is not at the optimum the estimates assume: the "
            f"regularized gradient (1/N) sum_i g_i + damping * theta has norm "
            f"{opt[0]:.3g}, {opt[1]:.3g} times its sampling noise "
            f"(optimality_gap_ > {MAX_OPTIMALITY_GAP:g}). Predicted effects "
            "are then mixed with the training left unfinished, and "
            "target='auto' gives first order, not the Newton step. Train to "
            "convergence with an L2 penalty equal to `damping` (skorch: "
            "optimizer__weight_decay), or set `damping` to the training one.",
            CIFWarning,
            stacklevel=3,
        )
    # The rank ladder serves the Newton step, which target="auto" answers only
    # at the optimum; off it the first rung keeps the first-order answers.
    at_optimum = not opt[1] > MAX_OPTIMALITY_GAP  # as _resolve_target reads it
    precond = None
    tol = np.zeros(means.shape[0])  # the dense solve is exact: no tolerance
    if solver == "dense":
        if cfg.curvature == "auto" and at_optimum:
            # at its optimum (else the Hessian is no better posed than G)
            op = make_curvature("hessian", curv_passes, cfg.damping)
        with phase("curvature") as bar:
            A, evals, evecs, curvature = dense_curvature(op, cfg.curvature, floor, bar)
            # every eigenpair and no complement: P is A^{-1} itself
            precond = SpectralPreconditioner(
                evals.to(means), evecs.to(means), float("inf")
            )
        with phase("solve", desc="dense solve"):
            sol = dense_solve(A, evals, evecs, means)
        del A, evecs
    else:
        if full:
            with phase("spectrum") as bar:
                like = means[:0]  # dtype and device
                precond = spectrum(
                    op, cfg.correction_rank, seeds.spectrum, like, n * n_out, floor,
                    bar, climb=at_optimum,
                )  # fmt: skip
        tol = np.broadcast_to(  # one per cluster, as the cache keeps them
            solve_tolerances(cfg.cg_tol, first["sq_norms"], labels, means),
            means.shape[:1],
        ).copy()
        with phase("solve", desc="CG") as bar:
            try:
                sol = block_cg(
                    op.matmat, means, tol, cfg.cg_maxiter, precond=precond,
                    progress=bar,
                )  # fmt: skip
            except FloatingPointError as exc:
                if floor > 0:
                    raise
                raise FloatingPointError(
                    f"{exc} Some parameters have no damping, and the curvature "
                    "may be singular along them (the shift of all logits that "
                    "a softmax ignores, for unpenalized output biases): use "
                    "solver='dense' (it leaves flat directions out) or give "
                    "them a small damping."
                ) from exc
    with phase("influence", n) as bar:
        infl = influence_pass(passes, sol.x, means, labels, precond, bar)
    with phase("outputs", n) as bar:
        outs = output_pass(passes, sol.x, bar)
    feats = None
    if full:
        with phase("newton", n) as bar:
            feats = newton_features(
                passes, labels, means, precond, outs["out"], bar,
                probe_seed=seeds.spectrum if solver == "dense" else None,
            )  # fmt: skip
    beta, self_infl = None, np.zeros(n)
    if full and solver == "dense":
        self_infl = infl["kept"]  # every eigenpair kept: nothing outside U
    elif full:
        terms = own_share(infl["rho"], feats)
        with phase("calibration") as bar:
            beta = calibrate(
                passes, op, precond, labels, means, infl["kept"], terms, cfg,
                seeds.calibration, bar,
            )  # fmt: skip
        self_infl = infl["kept"] + terms.form(beta, n)
    return assemble(
        first, labels, means, sol, infl, outs, feats, precond,
        self_influence=self_infl, complement_curvature=beta, tol=tol,
        curv_idx=curv_idx, op=op, passes=passes, cfg=cfg, timer=timer, solver=solver,
        curvature=curvature,
        optimality=opt, floor=floor,
        fmodel=fmodel, data=(X, fingerprint), settings=settings, seeds=seeds,
    )  # fmt: skip


@contextmanager
def _phase(timer, verbose, name, total=None, desc=None):
    """A timed phase of the build with its progress bar (``None`` when quiet)."""
    with timer(name), progress_bar(verbose, total, desc or name) as bar:
        yield bar


# -- the steps --------------------------------------------------------------------
def optimality(fmodel, first, labels, means, damping):
    r"""How far the model is from the optimum the estimates assume, from the cache.

    The regularized gradient :math:`\nabla J = \frac1N \sum_i g_i +
    \Lambda\theta` (the cluster means weighted by their sizes) in units of
    the sampling noise of a mean gradient, :math:`\sqrt{\overline{\|g_i\|^2}
    / N}`: 0 at the optimum of :math:`\frac1N\sum_i \ell_i +
    \frac\lambda2\|\theta\|^2`. Above 1 the leftover gradient pulls
    harder than resampling the whole training set would, so the model is
    not where removal estimates start from. No extra pass.

    Returns
    -------
    norm, gap : float
        :math:`\|\nabla J\|` and its ratio to the noise scale.
    """
    n = len(labels)
    sizes = torch.as_tensor(
        np.bincount(labels, minlength=means.shape[0]), dtype=torch.float64
    ).to(means.device)
    mean_grad = sizes @ means.double() / n
    theta = fmodel.flatten(fmodel.theta).double()
    lam = torch.as_tensor(damping, dtype=torch.float64).to(theta)
    norm = float(torch.linalg.vector_norm(mean_grad + lam * theta))
    noise = float(np.sqrt(np.mean(first["sq_norms"]) / n))
    return norm, (norm / noise if noise > 0 else 0.0)


def choose_solver(solver, op, n_samples, n_out):
    """``"dense"`` or ``"cg"``: what ``solver`` resolves to for this problem.

    ``"auto"`` is ``"dense"`` when the operator can build its matrix, ``p``
    is at most :data:`DENSE_MAX_PARAMS` and the Newton features of every
    eigenpair (``N d p`` numbers) fit :data:`DENSE_MAX_FEATURES`.
    """
    can = hasattr(op, "dense")
    if solver == "dense" and not can:
        raise ValueError(
            f"solver='dense' needs a curvature that builds its matrix; "
            f"{type(op).__name__} has no dense(). Use solver='cg' or 'auto'."
        )
    if solver != "auto":
        return solver
    p = op.n_params
    fits = p <= DENSE_MAX_PARAMS and n_samples * n_out * p <= DENSE_MAX_FEATURES
    return "dense" if can and fits else "cg"


def spectrum(op, rank, seed, like, rows, floor, bar=None, climb=True):
    """The spectral preconditioner at ``rank``, or grown to it under ``"auto"``.

    ``rows`` is ``N d``, the rows of the Newton features each eigenpair adds;
    ``floor`` the smallest damping, a lower bound on the spectrum. Under
    ``"auto"`` a rung of :data:`AUTO_RANKS` that the decay seen so far says
    cannot reach the target (see :func:`rank_needed`) is skipped: each rung
    is computed from scratch, so on a flat spectrum the ladder's end is
    reached for the price of its first and last rungs. ``climb=False``
    (a model off its optimum, answered to first order) stops at the first
    rung: the calibrated complement model carries the rest.
    """
    if rank != "auto":
        return spectral_preconditioner(
            op.matmat, op.n_params, floor, rank, seed, like, bar
        )
    budget = DENSE_MAX_FEATURES // max(rows, 1)
    ladder = [r for r in AUTO_RANKS if r <= min(op.n_params, budget)] or [AUTO_RANKS[0]]
    target = (1 + AUTO_RANK_TAIL) * floor
    i = 0
    while True:
        precond = spectral_preconditioner(
            op.matmat, op.n_params, floor, ladder[i], seed, like, bar
        )
        if precond.tail <= target or i == len(ladder) - 1 or not climb:
            return precond
        need = rank_needed(precond.evals.cpu().numpy(), precond.tail, target)
        i += 1
        while i < len(ladder) - 1 and 2 * ladder[i] < need:
            i += 1  # a factor-2 margin: a rung is skipped only when far short


def solve_tolerances(cg_tol, sq_norms, labels, means):
    r"""The relative residual each cluster's solve stops at.

    A float is returned as it is. ``"auto"``: cluster ``c`` stops once
    :math:`\|\mu_c - \tilde H v_c\| \le \sqrt{s / N}`, with :math:`s`
    the mean squared residual :math:`\overline{\|g_i - \mu_{c(i)}\|^2}`
    (the within-cluster scatter): the noise of a mean residual gradient. The
    error bound's solver term, :math:`\frac{m}{\lambda N}\sum_c
    \frac{n_c}{N}\rho_c\|\mu_c\|`, is then at most :math:`\frac{m}{\lambda
    N}\sqrt{s/N}`, which is at most the scatter term
    :math:`\frac{1}{\lambda N}\sqrt{\frac{m(N-m)}{N-1}s}` for every subset
    of up to half the training set (for solves that reach it, and unless
    the floor binds: always with one example per cluster, where the
    scatter term is 0): no fold of a CV splitter gains from a tighter
    solve. :math:`s` comes from the first pass's
    :math:`\|g_i\|^2` (:math:`s = \overline{\|g_i\|^2} - \sum_c
    \frac{n_c}{N}\|\mu_c\|^2`). The values are clipped to
    :data:`AUTO_TOL_RANGE`; with no scatter (one example per cluster) every
    solve runs to its floor.
    """
    if cg_tol != "auto":
        return float(cg_tol)
    n = len(labels)
    weights = np.bincount(labels, minlength=means.shape[0]) / n
    mean_sq = row_sq_norms(means).cpu().numpy()
    scatter = max(float(np.mean(sq_norms) - weights @ mean_sq), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        tol = np.sqrt(scatter / n) / np.sqrt(mean_sq)
    return np.clip(np.nan_to_num(tol, nan=AUTO_TOL_RANGE[0]), *AUTO_TOL_RANGE)


def rank_needed(evals, tail, target):
    r"""The rank at which the spectrum would fall to ``target``, extrapolated.

    A power law :math:`\theta_k \propto k^{-a}` through the Ritz value at
    half the kept rank and the first one left out (``tail``, at ``r + 1``);
    ``inf`` when the spectrum does not decay there.
    """
    r = len(evals)
    if target <= 0:  # no damping floor: no eigenvalue target to reach
        return float("inf")
    if r < 2:
        return float(r)
    mid = float(evals[r // 2 - 1])  # theta at index r / 2
    decay = np.log(mid / tail) / np.log((r + 1) / (r // 2))
    if not decay > 0:
        return float("inf")
    return (r + 1) * (tail / target) ** (1 / decay)


def dense_curvature(op, requested, floor, bar=None):
    """The dense damped curvature, its eigenpairs and its name.

    ``requested`` ``"auto"`` (with a Hessian operator): the Hessian of the
    damped objective when it is positive definite (flat directions aside),
    else the Gauss-Newton matrix with a :class:`CIFWarning`. (The build asks
    for the Hessian only for a model at its optimum: off it the optimality
    warning has spoken and the Gauss-Newton matrix is used directly.) Returns
    ``(A, evals, evecs, name)`` with ``name`` ``"hessian"`` or ``"ggn"``.
    """
    if not hasattr(op, "dense_terms"):  # the Gauss-Newton matrix or a plug-in
        A = op.dense(bar)
        return (A, *dense_eigh(A, floor), requested if requested != "auto" else "ggn")
    G, R = op.dense_terms(bar)
    A = G + R
    del R
    # The Hessian may lie below the damping, so no floor; its products carry
    # the model dtype's rounding, so an eigenvalue within p of its epsilons of
    # the largest is unresolved: left out as flat where some parameters are
    # undamped (as for G), a failure where all are damped.
    eps = torch.finfo(op.dtype).eps
    try:
        return (A, *dense_eigh(A, 0.0, eps=eps, flat_ok=floor <= 0), "hessian")
    except FloatingPointError as exc:
        if requested == "hessian":
            raise
        lowest = exc.args[1] if len(exc.args) > 1 else float("nan")
    del A
    warnings.warn(
        "The Hessian of the damped training objective is not positive definite "
        f"at the model (smallest eigenvalue {lowest:.3g}): it is not at a strict "
        "minimum of that objective, so a refit has no nearby optimum to move "
        "to. Using the Gauss-Newton matrix instead (curvature_ = 'ggn'); train "
        "to convergence with an L2 penalty equal to `damping` for the Hessian. "
        "A piecewise-linear activation (ReLU) stops at a kink, where no "
        "training gets there: use a smooth one (tanh, logistic) instead.",
        CIFWarning,
        stacklevel=4,
    )
    return (G, *dense_eigh(G, floor), "ggn")


def dense_eigh(A, floor, eps=None, flat_ok=True):
    """Every eigenpair of the dense damped curvature, descending, in float64.

    With a positive damping floor the matrix must be positive definite.
    Where some parameters are not damped (``floor`` 0), directions in which
    the objective is flat (eigenvalues within ``p`` epsilons ``eps``,
    float64's by default, of the largest: the shift of all logits that a
    softmax ignores, collinear features) are left out, so every solve is
    the pseudo-inverse's (the minimum-norm change, as ``lstsq`` would
    give). ``flat_ok=False`` (with ``floor`` 0): such an eigenvalue is a
    failure instead. A failure raises ``FloatingPointError(message,
    smallest eigenvalue)``.
    """
    evals, evecs = torch.linalg.eigh(A)  # ascending
    if not bool(torch.isfinite(evals).all()):
        raise FloatingPointError("The dense curvature has non-finite eigenvalues.")
    cutoff = 0.0
    if floor <= 0:
        eps = torch.finfo(torch.float64).eps if eps is None else eps
        cutoff = float(evals[-1]) * A.shape[0] * eps
    lowest = float(evals[0])
    if lowest < -cutoff or float(evals[-1]) <= 0 or (not flat_ok and lowest <= cutoff):
        raise FloatingPointError(
            "The dense curvature is not positive definite (smallest eigenvalue "
            f"{lowest:.3g}); increase `damping` or check the model.",
            lowest,
        )
    keep = evals > cutoff
    return evals[keep].flip(0), canonical_signs(evecs[:, keep].T.flip(0))


def dense_solve(A, evals, evecs, B):
    """``A^{-1} B`` through the float64 eigenbasis, with true relative residuals."""
    B64 = B.double()
    X = ((B64 @ evecs.T) / evals) @ evecs
    norms = torch.linalg.vector_norm(B64, dim=1).clamp_min(1e-300)
    resid = torch.linalg.vector_norm(B64 - X @ A, dim=1) / norms
    n = B.shape[0]
    return CGResult(X.to(B.dtype), resid.cpu().numpy(), np.zeros(n, dtype=np.int64), n)


def sketch_pass(passes, sketch, bar=None):
    """Pass 1: sketches ``S`` (N, k), squared norms ``||g_i||^2`` and losses."""

    def kernel(idx, G, ell):
        return {"S": sketch(G), "sq_norms": row_sq_norms(G), "losses": ell}

    return passes.map_rows(kernel, gradients=True, progress=bar)


def cluster(S, n_clusters, seed):
    """Cluster the sketches; returns compact labels (no empty cluster)."""
    n = S.shape[0]
    if n_clusters == n:  # each example its own cluster: exact per-example IF
        return np.arange(n)
    km = MiniBatchKMeans(
        n_clusters=n_clusters,
        random_state=seed,
        n_init=3,
        batch_size=min(n, 2048),
    ).fit(S)
    # A cluster MiniBatchKMeans left empty has no mean gradient: drop it.
    _, labels = np.unique(km.labels_, return_inverse=True)
    return labels.astype(np.int64)


def cluster_means(passes, labels, n_clusters, bar=None):
    """Pass 2: full-space means ``mu_c`` (C, p), no per-example gradients.

    ``mu_c`` is the gradient of cluster ``c``'s mean loss, so each batch of
    one cluster's examples (taken in cluster order) costs one ordinary
    forward/backward pass.
    """
    fm = passes.fmodel
    if n_clusters == len(labels):
        # One example per cluster (exact per-example IF): the same per-example
        # gradients as the later passes, so every residual is exactly zero.
        G = passes.map_rows(lambda i, G, _: {"G": G}, gradients=True, dtype=None)
        sums = torch.zeros(n_clusters, fm.n_params, dtype=fm.dtype, device=fm.device)
        sums[torch.as_tensor(labels, device=fm.device)] = torch.as_tensor(
            G["G"], device=fm.device
        )
        return sums
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(n_clusters + 1))
    groups = [order[bounds[c] : bounds[c + 1]] for c in range(n_clusters)]
    sums = passes.group_sums(groups, progress=bar)
    if not bool(torch.isfinite(sums).all()):
        bad = np.flatnonzero(~torch.isfinite(sums).all(1).cpu().numpy())
        raise FloatingPointError(f"Non-finite gradient sums in clusters {bad[:10]}.")
    counts = torch.as_tensor(
        np.bincount(labels, minlength=n_clusters), dtype=sums.dtype, device=sums.device
    )
    return sums / counts[:, None]


def influence_pass(passes, V, means, labels, precond=None, bar=None):
    """Pass 3: ``A[i, c] = g_i^T v_c``, ``||r_i||^2`` and ``r_i`` split by ``U``.

    ``r_i = g_i - mu_{c(i)}`` is the residual plain CiF drops. With a
    spectral preconditioner, also ``kept`` (the exact kept part of
    ``r_i^T H^{-1} r_i``) and ``rho`` (``||r_i||^2`` outside the kept
    eigenvectors), zeros without one. ``||r_i||^2`` is taken from ``r_i``
    itself, not as ``||g_i||^2 - 2 g_i^T mu + ||mu||^2`` (which cancels when
    a cluster is tight).
    """
    lab = torch.as_tensor(labels, device=passes.fmodel.device)

    def kernel(idx, G, _):
        R = G - means[lab[idx]]
        part = {"A": G @ V.T, "resid_sq": row_sq_norms(R)}
        if precond is not None:
            part["kept"], part["rho"] = precond.split_form(R)
        return part

    out = passes.map_rows(kernel, gradients=True, progress=bar)
    if precond is None:
        out["kept"] = out["rho"] = np.zeros(passes.n_samples)
    return out


def calibrate(passes, op, precond, labels, means, kept, terms, cfg, seed, bar=None):
    """The complement's background curvature ``beta``, from exact solves.

    ``n_calibration`` random examples with a non-zero residual are solved
    (preconditioned CG, one recursion each) for ``r_i^T H^{-1} r_i``;
    :func:`~sklearn_cif._complement.fit_background` finds the ``beta``
    between the damping floor and the first eigenvalue left out at which
    the model matches them. The solve runs to a relative residual of 1e-3
    (or ``cg_tol`` if looser) and stops earlier once the geometric mean of
    the examples' values, what the fit matches, is known to
    :data:`CALIBRATION_TOL`. For any ``x`` with residual ``q = r - H x``,
    ``(r + q)^T x = 2 r^T x - x^T H x`` falls short of ``r^T H^{-1} r`` by
    exactly ``q^T H^{-1} q``, the squared ``H``-norm error of ``x``; CG's
    Gauss-Radau quadrature bounds it from above given a lower bound on the
    spectrum of the preconditioned matrix (see
    :func:`~sklearn_cif.solvers.batched_cg`). That bound is ``floor /
    tail``: the damping floor bounds ``H`` from below (the GGN is positive
    semi-definite) and the preconditioner maps the complement of the kept
    eigenvectors by ``1 / tail``; it assumes the kept Ritz pairs are
    eigenpairs (the Ritz space close to invariant), and was checked against
    solves to 1e-6 on four models (:func:`calibration_stop`). Without a
    damping floor only the residual rule applies.
    """
    n = len(labels)
    floor, tail = float(np.min(cfg.damping)), float(precond.tail)
    high = tail
    low = min(floor, high) if floor > 0 else high * 1e-12
    rng = np.random.RandomState(seed)
    candidates = np.flatnonzero((kept > 0) | (terms.rho > 0))
    if candidates.size == 0 or high <= low:
        return high
    size = min(cfg.n_calibration, candidates.size)
    idx = np.sort(rng.choice(candidates, size, replace=False))
    lab = torch.as_tensor(labels[idx], device=means.device)

    def kernel(rows, G, _):
        return {"R": G - means[lab[rows]]}

    R = passes.subset(idx).map_rows(kernel, gradients=True, dtype=None)["R"]
    R = torch.as_tensor(R, device=means.device)
    tol = 1e-3 if cfg.cg_tol == "auto" else max(float(cfg.cg_tol), 1e-3)
    stop, mu = calibration_stop(R, floor, tail)
    sol = batched_cg(
        op.matmat, R, tol, cfg.cg_maxiter, precond=precond, progress=bar,
        stop=stop, lower_eig=mu,
    )  # fmt: skip
    exact = _rows64(R, sol.x)
    return fit_background(kept[idx], exact, terms.take(idx), n, low, high)


def calibration_stop(R, floor, tail):
    """The calibration solve's ``stop`` hook and spectrum bound (see :func:`calibrate`).

    ``(None, None)`` without a damping floor. The hook ends the solve once
    ``mean_i log(1 + err_i / lower_i) <= CALIBRATION_TOL``: ``lower_i =
    (r_i + q_i)^T x_i`` and ``err_i`` the Gauss-Radau bound on
    ``r_i^T H^{-1} r_i - lower_i``.

    Measured against solves to 1e-6 on the issue-14 MLP, the
    ``cg_tolerance.py`` regression and ``off_optimum.py``'s digits ReLU and
    tanh SGD nets (tails of 252, 144, 15 and 350 times the damping): the
    bound held at every iteration, 1.5-3 times the true error; the solve
    ended after 28, 18, 6 and 28 iterations (block CG with the bound
    ``||q||^2 / floor``: 31, 23, 6 and 36), its values within 0.4 % of the
    exact ones in geometric mean.
    """
    if not floor > 0:
        return None, None

    def stop(X, res, err):
        lower = _rows64(R + res, X)  # a lower bound for any X
        if not np.all(lower > 0):
            return False
        return float(np.mean(np.log1p(err / lower))) <= CALIBRATION_TOL

    return stop, floor / tail


def _rows64(A, B):
    """``sum_j A_ij B_ij`` per row, in float64 (a few calibration rows)."""
    return (A.double() * B.double()).sum(1).cpu().numpy()


def centers(S, labels, n_clusters):
    """Mean sketch of each cluster, ``(C, k)``."""
    sums = np.zeros((n_clusters, S.shape[1]))
    np.add.at(sums, labels, S)
    return sums / np.bincount(labels, minlength=n_clusters)[:, None]


def output_pass(passes, V, bar=None):
    """Pass 4: outputs ``f(x_i)`` (N, d), ``J(x_i) v_c`` (N, C, d), targets (N, t).

    They make out-of-fold outputs model-free at query time,
    ``f(x_i) + (1/N) sum_c m_c(S) J(x_i) v_c``, and the loss at them (the
    targets as the loss prepared them, flattened per example, in float64).
    """
    fm = passes.fmodel

    def kernel(idx, x, t):
        out, JV = output_jvp(fm, x, V)
        return {
            "out": out.reshape(out.shape[0], -1).detach(),
            "jv": JV.reshape(JV.shape[0], JV.shape[1], -1).transpose(0, 1),
            "y": t.reshape(t.shape[0], -1).double(),
        }

    return passes.map_rows(kernel, dtype=None, progress=bar)


def newton_features(passes, labels, means, precond, outputs, bar=None, probe_seed=None):
    """Pass 5: the per-example features of the Newton step, or ``None``.

    ``None`` (with a :class:`~sklearn_cif.exceptions.CIFWarning`) when the
    output has more than ``MAX_OUTPUTS`` numbers per example. With a
    ``probe_seed``, also each example's ``nonlinearity`` along a seeded
    random direction (:func:`sklearn_cif._newton.nonlinearity`).
    """
    d = outputs.shape[1]
    if d > _newton.MAX_OUTPUTS:
        warnings.warn(
            f"The model has {d} outputs per example (> {_newton.MAX_OUTPUTS}); the "
            "Newton-step features are not cached and target='retrain' is "
            "unavailable.",
            CIFWarning,
            stacklevel=4,
        )
        return None
    probe = None
    if probe_seed is not None:
        gen = torch.Generator().manual_seed(probe_seed)
        probe = torch.randn(passes.fmodel.n_params, generator=gen, dtype=torch.float64)
        probe = probe.to(means)
    kernel = _newton.jacobian_kernel(
        passes.fmodel, labels, means, precond.evecs, probe=probe
    )
    return passes.map_rows(kernel, dtype=None, progress=bar)


def linear_outputs(feats, eps):
    """Whether the probe found the outputs linear in the parameters, to rounding.

    The largest :func:`~sklearn_cif._newton.nonlinearity` is at most
    ``sqrt(eps)``, ``eps`` that of the model's dtype (``False`` without a
    probe).
    """
    if not feats or "nonlinearity" not in feats:
        return False
    gap = feats["nonlinearity"]
    return bool(gap.size == 0 or np.max(gap) <= np.sqrt(eps))


def assemble(first, labels, means, sol, infl, outs, feats, precond, **kw):
    """The :class:`CiFCache` from the steps' results (derived arrays computed here)."""
    S, n, n_clusters = first["S"], len(labels), int(labels.max()) + 1
    cluster_centers = centers(S, labels, n_clusters)
    total = np.square(S - S.mean(0)).sum()
    within = np.square(S - cluster_centers[labels]).sum()
    mean_sq = row_sq_norms(means).cpu().numpy()
    resid_sq = infl["resid_sq"]
    feats = dict(feats or {})
    X, fingerprint = kw["data"]
    fmodel = kw["fmodel"]
    eps = torch.finfo(fmodel.flatten(fmodel.theta).dtype).eps
    linear = linear_outputs(feats, eps)
    feats.pop("nonlinearity", None)
    return _check_finite(
        CiFCache(
            labels=labels,
            cluster_sizes=np.bincount(labels, minlength=n_clusters),
            cluster_centers=cluster_centers,
            explained_scatter=float(1 - within / total) if total > 0 else 1.0,
            responses=sol.x.cpu().numpy(),
            response_gram=(sol.x @ sol.x.T).cpu().numpy().astype(np.float64),
            mean_response_products=(sol.x @ means.T).cpu().numpy().astype(np.float64),
            cluster_mean_norms=np.sqrt(mean_sq),
            train_influence=infl["A"],
            train_loss=first["losses"],
            train_outputs=outs["out"],
            train_targets=outs["y"],
            output_responses=outs["jv"],
            residual_sq_norms=resid_sq,
            within_scatter=float(resid_sq.mean()),
            self_influence=np.asarray(kw["self_influence"], dtype=np.float64),
            complement_curvature=kw["complement_curvature"],
            correction=kw["cfg"].correction,
            solver=kw["solver"],
            curvature=kw["curvature"],
            linear_outputs=linear,
            gradient_norm=kw["optimality"][0],
            optimality_gap=kw["optimality"][1],
            spectrum=None if precond is None else precond.evals.cpu().numpy(),
            complement=None if precond is None else 1.0 / precond.tail,
            truncation=None
            if precond is None
            else 0.0  # nothing left out
            if kw["solver"] == "dense"
            else float(1.0 - kw["floor"] / precond.tail),
            damping_floor=kw["floor"],
            damping_diagonal=None
            if np.ndim(kw["cfg"].damping) == 0
            else np.asarray(kw["cfg"].damping, dtype=np.float64),
            spectral_basis=None if not feats else precond.evecs.cpu().numpy(),
            jacobian_spectral=feats.get("F"),
            jacobian_gram=feats.get("gram"),
            output_hessians=feats.get("hess"),
            residual_jacobian=feats.get("Jr"),
            residual_spectral=feats.get("Ur"),
            cg_residuals=sol.residuals,
            cg_tol=kw["tol"],
            n_iter=sol.n_iter,
            curvature_indices=kw["curv_idx"],
            loss_name=fmodel.loss.name,
            n_clusters=n_clusters,
            n_samples_fit=n,
            n_features_in=n_features(X),
            n_params=fmodel.n_params,
            n_data_passes=kw["passes"].n_passes,
            n_ggn_products=kw["op"].n_products,
            timings=dict(kw["timer"]),
            model_fingerprint=fmodel.fingerprint(),
            data_fingerprint=fingerprint,
            settings=kw["settings"],
            seeds=tuple(kw["seeds"]),
        )
    )


def _check_finite(cache):
    """Refuse a cache with non-finite numbers: answers would be NaN silently."""
    bad = [
        f.name
        for f in dataclasses.fields(cache)
        if isinstance(getattr(cache, f.name), np.ndarray)
        and getattr(cache, f.name).dtype.kind == "f"
        and not np.all(np.isfinite(getattr(cache, f.name)))
    ]
    bad += [
        name
        for name in ("explained_scatter", "within_scatter")
        if not np.isfinite(getattr(cache, name))
    ]
    if bad:
        raise FloatingPointError(
            f"The fit produced non-finite values in {bad} (overflow in the "
            "model's precision?); nothing was installed. Use float64 parameters, "
            "rescale the model's outputs or increase `damping`."
        )
    return cache
