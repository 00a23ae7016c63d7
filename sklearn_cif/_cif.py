"""The clustered influence estimator (CiF): one cache, any number of subset queries.

Conventions: ``g_i`` is the per-example loss gradient at the fitted
parameters, ``H = G + lambda I`` the damped mean generalized Gauss-Newton
matrix, and removing a subset ``S`` moves the parameters by
``Delta theta_S ~ (1/N) H^{-1} sum_{i in S} g_i`` (see the developer guide,
``doc/developer.rst``).
"""

import numbers

import numpy as np
import torch
from sklearn.base import TransformerMixin
from sklearn.metrics import pairwise_distances_argmin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_scalar

from sklearn_cif import _queries
from sklearn_cif._base import (
    BaseInfluence,
    canonical_param,
    check_target,
    fitted_views,
)
from sklearn_cif._build import (
    MAX_OPTIMALITY_GAP,
    BuildConfig,
    build_cache,
    sketch_pass,
)
from sklearn_cif._cache import CiFCache, draw_seeds, fitted_fields
from sklearn_cif._checks import (
    check_data,
    check_solver_params,
    data_fingerprint,
    resolve_damping,
    resolve_fit_args,
)
from sklearn_cif._newton import MAX_OUTPUTS
from sklearn_cif._persistence import load_cache, save_cache
from sklearn_cif._subsets import SubsetRows, subset_indicator
from sklearn_cif.curvature import check_curvature
from sklearn_cif.distributed import resolve_distributed
from sklearn_cif.passes import n_rows
from sklearn_cif.sketch import make_sketch

__all__ = ["FAST_PRESET", "ClusteredInfluenceEstimator"]


# residual_correction -> what the self effect adds to plain CiF (see Notes).
_CORRECTIONS = {"auto": "full", "full": "full", "cross": "cross", "none": "none"}

#: Parameters of a cheaper CG-path build, ``ClusteredInfluenceEstimator(
#: **FAST_PRESET)``: every cluster solved to a relative residual of 0.1
#: (instead of the noise rule of ``cg_tol="auto"``; the calibration solves
#: stop there too) and the spectral approximation at rank 128 even at the
#: optimum (no ladder: the Newton step keeps less of a flat spectrum's
#: curvature). The user guide's build-cost section gives the measured cost
#: and the answers against the default's and against real CV. Models small
#: enough for the dense solver ignore both.
FAST_PRESET = {"cg_tol": 0.1, "correction_rank": 128}


@fitted_views(CiFCache, fitted_fields(CiFCache))
class ClusteredInfluenceEstimator(TransformerMixin, BaseInfluence):
    r"""Clustered influence functions (CiF): one cache, any number of subset queries.

    Sketches the per-example gradients with a seeded Johnson-Lindenstrauss
    map, clusters the sketches with :class:`~sklearn.cluster.MiniBatchKMeans`,
    solves :math:`(G + \lambda I) v_c = \mu_c` for all clusters at once by
    block conjugate gradient (one data pass per iteration, one Krylov space
    shared by the ``C`` systems) and answers every removal query by
    recombining the ``v_c``.

    Parameters
    ----------
    n_clusters : int, default=50
        Number of gradient clusters ``C`` (clusters left empty by k-means are
        dropped, see ``n_clusters_``).
    sketch_dim : int, default=256
        Sketch dimension ``k``.
    damping : "auto", float or dict, default="auto"
        :math:`\lambda`; equals the training L2 coefficient for the removal
        objective :math:`\frac1N \sum_{i \notin S} \ell_i + \frac12
        \sum_j \lambda_j \theta_j^2` (skorch: the optimizer's
        ``weight_decay``). A float puts the same value on every parameter; a
        dict ``{parameter name: float >= 0}`` one per selected parameter
        (e.g. 0 on biases). ``"auto"``: a scikit-learn model's own penalty
        (``1 / (C N)`` on a ``LogisticRegression``'s coefficients, ``2 alpha /
        N`` on a ``Ridge``'s, ``alpha / N`` on an ``MLPClassifier``'s
        weights, 0 on intercepts and biases; see
        :func:`~sklearn_cif.sklearn_models.to_torch`), else ``1e-3``. The
        resolved values are ``damping_floor_`` and ``damping_diagonal_``.
    cg_tol : "auto" or float, default="auto"
        Target relative residual of the CG solves. ``"auto"``: each
        cluster's solve stops once :math:`\|\mu_c - \tilde H v_c\|` is at
        most :math:`\sqrt{s/N}`, the noise of a mean residual gradient
        (:math:`s` = ``within_scatter_``), clipped to [1e-5, 0.5] relative
        (``cg_tol_`` holds the values): for solves that reach it, the error
        bound's solver term is then at most its scatter term for every
        subset of up to half the training set, unless the 1e-5 floor binds
        (always with one example per cluster, where the scatter term is 0;
        such solves are then tighter, and slower, than a fixed ``1e-3``). A
        float applies to every cluster. On two CG-path MLPs ``"auto"`` moved
        fold effects by at most 4.8e-3 (relative) from ``1e-5``, in about
        half the products of ``1e-3`` and about those of ``1e-2``; a fixed
        ``0.1`` moved them by up to 5.5e-2 (see the user guide's build-cost
        section).
    cg_maxiter : int or None, default=None
        CG iteration cap (``None``: 1000).
    batch_size : int, default=256
        Examples per data batch in every pass.
    loss : None, str or callable, default=None
        ``"cross_entropy"`` (logits), ``"nll"`` (log-probabilities), ``"mse"``,
        ``"bce_logits"``, ``"nll_proba"`` (probabilities, skorch's classifier)
        or a callable ``(output, y) -> per-example loss``. Required for a
        plain ``torch.nn.Module``; derived from a skorch net's criterion.
    params : None or list of str, default=None
        Names of the parameters that count; all trainable ones by default.
    sketch : {"countsketch", "gaussian"}, default="countsketch"
        The JL map: a seeded CountSketch (``O(p)`` memory and cost per
        example) or a dense Gaussian generated in seeded blocks.
    residual_correction : {"auto", "full", "cross", "none"}, default="auto"
        What the *self* effect of a subset (a CV fold scored on itself) adds
        to the paper's CiF: ``"none"`` is plain CiF, ``"cross"`` adds the
        exact cluster-mean x residual terms from the cache, ``"full"`` also
        the per-example self-influences :math:`r_i^\top H^{-1} r_i`
        (estimated with a spectral approximation of :math:`H^{-1}` and
        calibrated by exact solves). ``"auto"`` is ``"full"``, which measured
        best (see Notes). ``param_change`` and evaluation-set effects are
        plain CiF whatever this is.
    solver : {"auto", "dense", "cg"}, default="auto"
        How the curvature is inverted. ``"dense"`` builds the damped
        curvature as a ``p x p`` matrix from per-example output Jacobians
        (one pass, ``N d p^2`` multiply-adds), keeps every eigenpair and
        solves exactly: the cluster solves, the self-influences and the
        Newton step are then those of the dense matrix (no calibration, no
        truncation). ``"cg"`` never forms it: block conjugate gradient with
        a rank-``correction_rank`` spectral approximation. ``"auto"`` is
        ``"dense"`` when ``p <= 4096`` and the per-example Newton features
        of every eigenpair (``N d p`` numbers) fit in ``2**27``, else
        ``"cg"`` (the resolved choice is ``solver_``).
    correction_rank : int or "auto", default="auto"
        Eigenpairs of the curvature in the spectral approximation of
        ``solver="cg"`` (the dense solver keeps all of them); they also
        precondition the CG solves. The Newton step of ``target="retrain"``
        needs more of them than the first-order correction: on the digits
        MLP (p = 2,410, KFold(50)) the median ratio to actual retraining was
        0.56 / 0.65 / 0.84 / 1.07 at rank 32 / 64 / 128 / 256. ``"auto"``
        tries 128, 256 and 512 in turn and stops at the first rank whose
        next eigenvalue is within twice the damping (the complement's
        inverse is then off by at most 2x; ``truncation_`` records
        ``1 - damping / theta_{r+1}``), or at the largest whose Newton
        features (``N d r`` numbers) fit in ``2**27``. A rank that a power
        law through the Ritz values seen so far says falls short of the
        target by more than 2x is skipped (each rank is computed from
        scratch, so a flat spectrum costs the first and the last). The
        ladder serves the Newton step, so it is climbed only for a model at
        its optimum (``optimality_gap_ <= 1``, where ``target="auto"`` is the
        step); off it the first rank is kept and the calibrated complement
        carries the rest of the first-order answers. The kept rank is
        ``len(spectrum_)``.
    n_calibration : int, default=16
        Examples solved exactly to calibrate the self-influences' model of
        the curvature outside the kept eigenvectors (``complement_curvature_``).
        Each costs one CG solve. On four CG-path models (one draw per
        size), fold effects at 16 and at 32 differed from those at 64 by
        comparable amounts: at most 1.1-3.2 % and 0.4-3.4 %.
    curvature_samples : int or None, default=None
        Average the curvature ``G`` over this many seeded random training
        examples instead of all ``N`` (cheaper CG iterations and spectrum;
        gradients still use every example). ``None``: all examples. Not a
        free saving: an example outside the sample loses its own share of
        the curvature, so its self-influence grows. On the 19,210-parameter
        MLP of ``benchmarks/build_epochs.py`` (N = 20,000), 4,096 samples
        made first-order fold effects 3.1x and plain CiF's 5.9x those of the
        full curvature.
    curvature : str, default="auto"
        The curvature operator, by its registered name: ``"ggn"`` is the
        damped mean generalized Gauss-Newton matrix
        :math:`\frac1N \sum_i J_i^\top H_i J_i + \lambda I`; ``"hessian"``
        the damped Hessian of the training objective (the Gauss-Newton
        matrix plus the loss-weighted second derivatives of the outputs;
        the same for a model linear in its parameters), dense solver only.
        ``"auto"``: with the dense solver and a model at its optimum
        (``optimality_gap_`` at most 1), the Hessian when it is positive
        definite there (a strict minimum of the damped objective), else,
        with a :class:`~sklearn_cif.exceptions.CIFWarning`, the
        Gauss-Newton matrix; the Gauss-Newton matrix off the optimum and
        with CG. The resolved
        choice is ``curvature_``. A refit lands at the nearby minimum, whose
        position the Hessian governs: on a tanh MLP at its optimum (digits,
        p = 2,410) the Gauss-Newton matrix made the default fold effects
        1.45-1.50x those of warm-started refits, the Hessian 0.90-1.00x
        (see ``curvature`` in the user guide). The Hessian costs ``p``
        more curvature products in the dense pass (a small CNN's build: 7 s
        to 87 s); ``"ggn"`` skips it.
    device : str, default="auto"
        ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
    distributed : "auto" or bool, default="auto"
        Build data-parallel over the processes of the initialized
        :mod:`torch.distributed` group (every rank must call ``fit`` with
        the same model and data; see
        :class:`~sklearn_cif.distributed.ShardedPasses`). ``"auto"``: when a
        group with more than one process is initialized; ``False``: never
        (a rank fitting on its own inside a training job's group); ``True``:
        required (``fit`` raises without such a group). The cache is the
        same either way.
    random_state : int, RandomState instance or None, default=None
        Seeds the sketch, k-means, the spectrum, the calibration sample and
        the curvature subsample (one named seed each).
    verbose : int, default=0
        Progress bars (tqdm) when positive.
    model : skorch net or torch.nn.Module, default=None
        The trained model, so that scikit-learn tools can call ``fit(X, y)``.
        :func:`~sklearn.base.clone` keeps this very object.

    Attributes
    ----------
    labels_ : ndarray of shape (N,)
        Cluster of each training example.
    cluster_sizes_ : ndarray of shape (C,)
        ``n_c``.
    cluster_centers_ : ndarray of shape (C, k)
        Mean sketch of each cluster.
    explained_scatter_ : float
        Fraction of the training gradients' sketch scatter explained by the
        clusters, ``1 - within / total`` (``score`` on new data).
    responses_ : ndarray of shape (C, p)
        ``v_c``, the CG solutions of :math:`(G + \lambda I) v_c = \mu_c`.
    cluster_mean_norms_ : ndarray of shape (C,)
        :math:`\|\mu_c\|`.
    train_influence_ : ndarray of shape (N, C)
        ``A[i, c] = g_i^T v_c``.
    train_loss_ : ndarray of shape (N,)
        Per-example training losses at the fitted parameters.
    train_outputs_ : ndarray of shape (N, d)
        Model outputs ``f(x_i)`` (flattened per example).
    output_responses_ : ndarray of shape (N, C, d)
        ``J(x_i) v_c``: first-order output change per unit of cluster ``c``.
    response_gram_ : ndarray of shape (C, C)
        ``v_c^T v_{c'}``, for parameter-change norms without ``(Q, p)`` arrays.
    loss_name_ : str
        The per-example loss used (``"cross_entropy"``, ``"nll_proba"``, ...).
    residual_sq_norms_ : ndarray of shape (N,)
        :math:`\|g_i - \mu_{c(i)}\|^2`.
    self_influence_ : ndarray of shape (N,)
        :math:`r_i^\top H^{-1} r_i` (zeros unless ``"full"``): exact along
        the kept eigenvectors, modelled outside them (user guide: the
        residual correction).
    complement_curvature_ : float or None
        The background curvature ``beta`` of that model, calibrated on
        ``n_calibration`` exact solves (``None`` when every eigenpair is
        kept or without the ``"full"`` correction).
    mean_response_products_ : ndarray of shape (C, C)
        :math:`v_c^\top \mu_{c'}`.
    correction_ : str
        The resolved ``residual_correction``.
    solver_ : str
        The resolved ``solver``: ``"dense"`` or ``"cg"``.
    curvature_ : str
        The resolved ``curvature``: ``"hessian"`` or ``"ggn"`` (or a
        registered plug-in's name).
    linear_outputs_ : bool
        Whether the model's outputs (where the loss's curvature is split:
        logits, log-probabilities) move exactly linearly with its
        parameters, as a linear or softmax-linear model of fixed features
        does: checked on the dense solver along a seeded random direction,
        every example's loss at the moved model against its linearized
        outputs, to ``sqrt(eps)`` of the model's dtype. Then
        ``target="retrain"`` is the exact refit, from the cache: each
        subset's removal objective is minimized by Newton's method over the
        cached per-example features (``FoldEffects.newton_iterations``).
        ``False`` on the CG path.
    gradient_norm_ : float
        :math:`\|\nabla J\|`, the regularized gradient
        :math:`\frac1N\sum_i g_i + \lambda\theta` at the fitted parameters
        (0 at the optimum the estimates assume).
    optimality_gap_ : float
        ``gradient_norm_`` over the sampling noise of a mean gradient,
        :math:`\sqrt{\overline{\|g_i\|^2}/N}`. Above 1 (fit warns with a
        :class:`~sklearn_cif.exceptions.CIFWarning`) the model is further
        from the regularized optimum than resampling the training set would
        move it: train longer, or match ``damping`` to the training L2.
    within_scatter_ : float
        :math:`\mathrm{tr}(\bar\Sigma) = \frac1N \sum_i \|g_i - \mu_{c(i)}\|^2`.
    cg_residuals_ : ndarray of shape (C,)
        Final relative residual :math:`\rho_c` of each solve (recomputed as
        ``||mu_c - H v_c|| / ||mu_c||``, not the recursion's estimate; the
        rounding error of the dense solver).
    cg_tol_ : ndarray of shape (C,)
        The relative residual each cluster's solve was held to: ``cg_tol``
        itself, or what ``"auto"`` resolved to (zeros for the dense solver,
        which is exact).
    n_iter_ : ndarray of shape (C,)
        Block CG iterations each cluster's column stayed active (a column
        is frozen once it meets its ``cg_tol_``; zeros for the dense solver).
    n_clusters_, n_samples_fit_, n_params_ : int
    curvature_indices_ : ndarray of shape (curvature_samples,) or None
        The examples the curvature averages over (``None``: all).
    n_data_passes_, n_ggn_products_ : int
        Work counters of the fit (curvature-vector products of either
        curvature; the dense Hessian's pass counts ``2 p``).
    timings_ : dict
        Seconds per phase: ``sketch``, ``cluster``, ``cluster_means``,
        ``curvature`` (dense) or ``spectrum`` (CG), ``solve``, ``influence``,
        ``calibration`` (CG), ``outputs`` and ``newton`` (the last three
        with the default ``residual_correction``).
    spectrum_ : ndarray of shape (r,) or None
        Top eigenvalues of the damped curvature (:math:`G + \lambda I`, or
        the Hessian, which may lie below the damping), descending
        (``r = correction_rank``; all ``p`` with the dense solver).
    complement_ : float or None
        The inverse curvature used outside their eigenvectors (0 with the
        dense solver: there is no outside).
    damping_floor_ : float
        The smallest damping :math:`\min_j \lambda_j` (the damping itself
        when it is uniform).
    damping_diagonal_ : ndarray of shape (p,) or None
        The damping of every parameter when it is not uniform (resolved from
        a dict or a scikit-learn model's penalty), else ``None``.
    truncation_ : float or None
        ``1 - damping_floor_ / theta_{r+1}``: the largest relative error of the
        complement's inverse on the eigenvalues left out (0 when nothing
        but the damping is left out, and with the dense solver).
    jacobian_spectral_, jacobian_gram_, output_hessians_ : ndarray or None
        Per example: ``J_i U^T`` (N, d, r), ``J_i J_i^T`` (N, d, d) and the
        loss's output Hessian (N, d, d), for the Newton step of
        ``target="retrain"`` (``None`` without them).
    residual_jacobian_, residual_spectral_ : ndarray or None
        ``J_i r_i`` (N, d) and ``U r_i`` (N, r), ``r_i = g_i - mu_{c(i)}``.
    model_fingerprint_, data_fingerprint_ : str
        SHA-1 of the model parameters and of the training data.
    n_features_in_ : int
        Features per training example.

    All fitted attributes are read-only views of one cache object, installed
    in one assignment at the end of ``fit``: an interrupted or failed fit
    leaves the previous cache whole. Changing a parameter the cache depends
    on after fit (everything but ``batch_size``, ``device``, ``verbose``
    and ``model``) makes queries raise until the estimator is refit.

    Notes
    -----
    For a subset ``S`` with ``m_c(S)`` members in cluster ``c``:

    .. math:: \widehat{\Delta\theta}_S = \frac1N \sum_c m_c(S)\, v_c,
              \qquad
              \widehat{\Delta\ell}_S = \frac{1}{N m}\sum_{i \in S}\sum_c m_c(S) A_{ic}.

    With ``n_clusters = N`` every example is its own cluster and CiF equals
    per-query influence up to the solver tolerance.

    Examples
    --------
    >>> import torch
    >>> from sklearn_cif import ClusteredInfluenceEstimator
    >>> X, y = torch.randn(40, 3), torch.randint(0, 2, (40,))
    >>> net = torch.nn.Linear(3, 2)
    >>> est = ClusteredInfluenceEstimator(4, loss="cross_entropy", random_state=0)
    >>> est.fit(net, X, y).param_change([[0, 1, 2]]).shape
    (1, 8)
    """

    _pinned = (
        "n_clusters",
        "sketch_dim",
        "damping",
        "cg_tol",
        "cg_maxiter",
        "loss",
        "params",
        "sketch",
        "residual_correction",
        "solver",
        "correction_rank",
        "n_calibration",
        "curvature_samples",
        "curvature",
        "random_state",
    )
    _target_hint = (
        " target='retrain' needs residual_correction='auto' or 'full' and at most "
        f"{MAX_OUTPUTS} outputs per example; use target='if'."
    )

    def __init__(
        self,
        n_clusters=50,
        *,
        sketch_dim=256,
        damping="auto",
        cg_tol="auto",
        cg_maxiter=None,
        batch_size=256,
        loss=None,
        params=None,
        sketch="countsketch",
        residual_correction="auto",
        solver="auto",
        correction_rank="auto",
        n_calibration=16,
        curvature_samples=None,
        curvature="auto",
        device="auto",
        distributed="auto",
        random_state=None,
        verbose=0,
        model=None,
    ):
        self.n_clusters = n_clusters
        self.sketch_dim = sketch_dim
        self.damping = damping
        self.cg_tol = cg_tol
        self.cg_maxiter = cg_maxiter
        self.batch_size = batch_size
        self.loss = loss
        self.params = params
        self.sketch = sketch
        self.residual_correction = residual_correction
        self.solver = solver
        self.correction_rank = correction_rank
        self.n_calibration = n_calibration
        self.curvature_samples = curvature_samples
        self.curvature = curvature
        self.device = device
        self.distributed = distributed
        self.random_state = random_state
        self.verbose = verbose
        self.model = model

    def fit(self, model, X=None, y=None):
        """Build the cache: sketch, cluster, cluster means, solves, influences.

        Parameters
        ----------
        model : skorch net or torch.nn.Module
            The trained model. May be omitted (``fit(X, y)``) when the
            ``model`` parameter is set.
        X : array-like or tensor of shape (N, ...)
            Training inputs.
        y : array-like or tensor of shape (N, ...)
            Training targets.

        Returns
        -------
        self : ClusteredInfluenceEstimator
            The fitted estimator.
        """
        model, X, y = resolve_fit_args(self.model, model, X, y)
        X, y = check_data(X, y)
        pinned = self._fit_snapshot()
        fmodel = self._new_fmodel(model, X, y)
        config = self._build_config(n_rows(y, "y"), fmodel)
        seeds = draw_seeds(check_random_state(self.random_state))
        cache = build_cache(fmodel, X, y, config, seeds, self._settings_now(pinned))
        self._install(cache, model, fmodel, pinned)
        return self

    def _canonical(self, name, value):
        if name == "residual_correction" and isinstance(value, str):
            return _CORRECTIONS.get(value, value)
        return canonical_param(name, value)

    def _build_config(self, n, fmodel):
        """Validate the parameters; return them as a :class:`BuildConfig`."""
        check_solver_params(
            self.damping, self.cg_tol, self.cg_maxiter, self.batch_size,
            self.curvature_samples, auto_tol=True,
        )  # fmt: skip
        check_scalar(
            self.n_clusters, "n_clusters", numbers.Integral, min_val=1, max_val=n
        )
        check_scalar(self.sketch_dim, "sketch_dim", numbers.Integral, min_val=1)
        if self.correction_rank != "auto":
            check_scalar(
                self.correction_rank, "correction_rank", numbers.Integral, min_val=1
            )
        check_scalar(self.n_calibration, "n_calibration", numbers.Integral, min_val=1)
        if self.residual_correction not in _CORRECTIONS:
            raise ValueError(
                f"residual_correction={self.residual_correction!r}; expected one of "
                f"{list(_CORRECTIONS)}."
            )
        if self.solver not in ("auto", "dense", "cg"):
            raise ValueError(
                f"solver={self.solver!r}; expected one of ['auto', 'dense', 'cg']."
            )
        if self.curvature != "auto":
            check_curvature(self.curvature)
        distributed = resolve_distributed(self.distributed)
        return BuildConfig(
            n_clusters=int(self.n_clusters),
            sketch=self.sketch,
            sketch_dim=int(self.sketch_dim),
            damping=resolve_damping(self.damping, fmodel, n),
            cg_tol="auto" if self.cg_tol == "auto" else float(self.cg_tol),
            cg_maxiter=self.cg_maxiter,
            batch_size=int(self.batch_size),
            correction=_CORRECTIONS[self.residual_correction],
            solver=self.solver,
            correction_rank=self.correction_rank
            if self.correction_rank == "auto"
            else int(self.correction_rank),
            n_calibration=int(self.n_calibration),
            curvature_samples=self.curvature_samples,
            curvature=self.curvature,
            verbose=self.verbose,
            distributed=distributed,
        )

    def fit_transform(self, model, X=None, y=None):
        """Fit, then return the training influence coordinates ``train_influence_``.

        Parameters
        ----------
        model : skorch net or torch.nn.Module
            As in :meth:`fit`.
        X, y : array-like or tensors
            As in :meth:`fit`.

        Returns
        -------
        A : ndarray of shape (N, C)
            ``g_i^T v_c`` for every training example and cluster.
        """
        return self.fit(model, X, y).train_influence_

    # -- persistence ---------
    def save(self, path):
        """Save the fitted cache to ``path`` in a format that runs no code on load.

        A ``.npz`` file: the cache's declared fields (arrays, and JSON
        metadata with the package version, the parameters and the fit-time
        settings). The model and a callable ``loss`` are not stored. Read it
        back with :meth:`load`; unlike a joblib pickle, loading cannot
        execute code.

        Parameters
        ----------
        path : str or path-like
            Where to write.
        """
        save_cache(self._check_fitted(), self.get_params(), type(self).__name__, path)

    @classmethod
    def load(cls, path):
        """Load a cache written by :meth:`save` (``allow_pickle=False``).

        Model-free queries answer at once; for ``transform``, ``score`` and
        evaluation-set effects call ``set_params(model=...)`` (and ``loss=``
        if it was a callable): the fingerprint check still applies.

        Parameters
        ----------
        path : str or path-like
            A file written by :meth:`save`.

        Returns
        -------
        estimator : ClusteredInfluenceEstimator
            A fitted estimator without a model.
        """
        params, cache = load_cache(path, cls.__name__, CiFCache)
        unknown = sorted(set(params) - set(cls().get_params()))
        if unknown:
            raise ValueError(f"{path!s} holds unknown parameters {unknown}.")
        est = cls(**params)
        est._install(cache, None, None)
        return est

    # -- queries ---------
    def membership(self, subsets, *, assume_unique=False):
        """Count each subset's members per cluster, ``m_c(S)``.

        Parameters
        ----------
        subsets : index array, list of index arrays, (N,) mask or (Q, N) 0/1 matrix
            The subsets.
        assume_unique : bool, default=False
            Skip the check for repeated indices within a subset (a repeated
            index then counts twice). Indices are range-checked regardless.

        Returns
        -------
        counts : scipy.sparse.csr_matrix of shape (Q, C)
            Members of each subset in each cluster.
        """
        cache = self._check_fitted()
        ind = subset_indicator(subsets, cache.n_samples_fit, assume_unique)
        return _queries.membership(cache, ind)

    def param_change(self, subsets, *, assume_unique=False):
        r"""Predicted :math:`\theta_{-S} - \theta` for each subset, ``(Q, p)``.

        Parameters
        ----------
        subsets : index array, list of index arrays, (N,) mask or (Q, N) 0/1 matrix
            The subsets to remove.
        assume_unique : bool, default=False
            As in :meth:`membership`.

        Returns
        -------
        delta : ndarray of shape (Q, p)
            :math:`\frac1N \sum_c m_c(S) v_c` (first order).
        """
        cache = self._check_fitted()
        M = _queries.membership(
            cache, subset_indicator(subsets, cache.n_samples_fit, assume_unique)
        )
        return _queries.param_change(cache, M)

    def loss_change(
        self, subsets, X=None, y=None, *, target="auto", assume_unique=False
    ):
        r"""Predicted change of a mean loss when each subset is removed, ``(Q,)``.

        Parameters
        ----------
        subsets : list of index arrays or bool masks, or a (Q, N) indicator
            The subsets to remove.
        X, y : array-like, default=None
            With ``X=None`` the loss is each subset's own mean training loss
            (the held-out loss of a CV fold); otherwise the mean loss over
            ``(X, y)``: first order in the parameter change, along the
            clustered first-order change (``target`` ``"auto"``/``"if"``)
            or the subset's Newton step (``target="retrain"``).
        target : {"auto", "retrain", "if"}, default="auto"
            What the self effect predicts. ``"retrain"``: the loss change of
            actual retraining without the subset (a leave-k-out Newton step
            from the cache, and the subset's loss at the outputs it
            predicts). ``"if"``: the
            first-order influence-function effect the paper targets.
            ``"auto"`` is ``"retrain"`` when fit cached its features
            (``residual_correction`` ``"auto"``/``"full"``), the loss
            makes it its default (every built-in loss: ``cross_entropy``,
            ``nll``, ``nll_proba``, ``mse``, ``bce_logits``) and the model
            is at its optimum (``optimality_gap_`` at most 1: the step
            expands around it); else ``"if"``. Off the optimum, measured
            against real CV that retrains with the same fixed-epoch
            recipe, the Newton step gave 1.1-10 times the held-out loss
            and first order 0.92-1.8 times (user guide, "Models off their
            optimum").
        assume_unique : bool, default=False
            Skip the check for repeated indices within a subset (as in
            :meth:`membership`); saves about half of an evaluation-set
            query's time.

        Returns
        -------
        delta : ndarray of shape (Q,)
            Positive means removal raises the loss.

        Notes
        -----
        With an evaluation set the answer is
        :math:`\frac1N \sum_c m_c(S)\,\alpha_c` with
        :math:`\alpha_c = \bar g_V^\top v_c` computed once per evaluation set
        and cached: each query costs :math:`O(|S| + C)`, read in cache-sized blocks
        of queries with no ``(Q, N)`` matrix built. That is why ``"auto"``
        stays first order for evaluation sets. ``target="retrain"`` adds
        the Newton step's correction
        :math:`\sum_{i\in S} (J_i H^{-1}\bar g_V)^\top z_i` from the
        cached features (one solve-free pass over ``(X, y)`` for
        :math:`\bar g_V`, then the self effects' per-fold cost); it is exact
        with the dense solver and drops the within-example complement with
        CG.
        """
        cache = self._check_fitted()
        rows = SubsetRows(subsets, cache.n_samples_fit, assume_unique)
        if X is None and y is None:
            ind = rows.indicator()
            if self._resolve_target(target, cache) == "if":  # O(|S| C): no outputs
                M = np.asarray(_queries.membership(cache, ind).todense())
                return _queries.self_effect(cache, ind, M)[0]
            return _queries.fold_effects(cache, ind, "retrain").delta_loss
        check_target(target)
        if target == "retrain":
            self._resolve_target(target, cache)  # raises when not cached
        alpha, g_v = self._eval_alpha(cache, X, y)
        first = _queries.eval_effects(cache, rows, alpha)
        if target != "retrain":
            return first
        return _queries.eval_newton_effects(cache, rows.indicator(), first, g_v)

    def fold_effects(self, subsets, *, target="auto"):
        """Everything a CV fold's prediction needs, for each subset, from the cache.

        Parameters
        ----------
        subsets : index array, list of index arrays, (N,) mask or (Q, N) 0/1 matrix
            The subsets to remove (CV test folds).
        target : {"auto", "retrain", "if"}, default="auto"
            As in :meth:`loss_change`.

        Returns
        -------
        effects : FoldEffects
            ``target`` (resolved), ``delta_loss``, ``delta_loss_if``,
            ``correction_share``, ``param_change_norm``, ``loss_in_sample``
            (each ``(Q,)``), and the out-of-fold outputs ``oof_outputs``
            ``(nnz, d)`` of the members ``oof_indices``, subset ``q`` at
            ``fold_bounds[q]:fold_bounds[q + 1]``. No model is needed.
        """
        cache = self._check_fitted()
        ind = subset_indicator(subsets, cache.n_samples_fit)
        return _queries.fold_effects(cache, ind, self._resolve_target(target, cache))

    def available_targets(self):
        """The concrete targets of self effects these parameters can give.

        Returns
        -------
        targets : tuple of str
            ``("retrain", "if")`` with ``residual_correction`` ``"auto"`` or
            ``"full"`` (fitted: when the Newton features were cached), else
            ``("if",)``.
        """
        if self.__sklearn_is_fitted__() and not self._changed_settings():
            return self._cache_targets(self._cache)
        full = _CORRECTIONS.get(self.residual_correction) == "full"
        return ("retrain", "if") if full else ("if",)

    def _cache_targets(self, cache):
        return ("if",) if cache.jacobian_spectral is None else ("retrain", "if")

    def _resolve_target(self, target, cache):
        # The Newton step expands around the optimum; off it (fit warned)
        # "auto" is first order, and "retrain" is there for who asks for it.
        if target == "auto" and cache.optimality_gap > MAX_OPTIMALITY_GAP:
            return "if"
        return super()._resolve_target(target, cache)

    def _eval_alpha(self, cache, X, y):
        """``alpha_c = g_V^T v_c`` for an evaluation set, cached per (cache, data).

        Repeated queries against one evaluation set then cost ``O(|S| + C)``
        each, with no model pass; the model fingerprint is still checked.
        """
        passes = self._eval_passes(X, y, cache)  # refuses a model changed since fit
        key = data_fingerprint(passes.X, passes.y)
        cached = self.__dict__.get("_alpha_cache")
        if cached is None or cached[0] is not cache or cached[1] != key:
            g_v = passes.mean_gradient().cpu().numpy().astype(np.float64)
            cached = (cache, key, cache.responses.astype(np.float64) @ g_v, g_v)
            self._alpha_cache = cached  # one assignment: safe under threads
        return cached[2], cached[3]

    def transform(self, X, y=None):
        r"""Influence coordinates of each example, ``(n, C)``.

        :math:`\alpha_c(x) = \nabla\ell(x)^\top v_c`; their mean over a set V
        is the paper's :math:`\alpha_c(V)`.

        Parameters
        ----------
        X : array-like or tensor of shape (n, ...)
            Inputs.
        y : array-like or tensor of shape (n, ...)
            Targets (required: the coordinates are loss gradients).

        Returns
        -------
        alpha : ndarray of shape (n, C)
            :math:`g(x_j)^\top v_c` for every example and cluster.
        """
        cache = self._check_fitted()
        passes = self._eval_passes(X, y, cache)
        fm = passes.fmodel
        V = torch.as_tensor(cache.responses, device=fm.device)
        out = passes.map_rows(lambda idx, G, _: {"a": G @ V.T}, gradients=True)
        return out["a"]

    def get_feature_names_out(self, input_features=None):
        """Name :meth:`transform`'s columns: one per cluster.

        Parameters
        ----------
        input_features : None
            Ignored (the columns are clusters, not input features).

        Returns
        -------
        names : ndarray of str of shape (C,)
            ``"cluster0"``, ``"cluster1"``, ...
        """
        cache = self._check_fitted()
        return np.array([f"cluster{c}" for c in range(cache.n_clusters)], dtype=object)

    def score(self, X, y):
        """Fraction of the gradient scatter of (X, y) explained by the clusters.

        ``1 - within / total`` in sketch space, each example assigned to its
        nearest cluster center; 1.0 means every gradient equals its cluster
        center.

        Parameters
        ----------
        X : array-like or tensor of shape (n, ...)
            Inputs.
        y : array-like or tensor of shape (n, ...)
            Targets.

        Returns
        -------
        score : float
            Explained sketch scatter.
        """
        cache = self._check_fitted()
        passes = self._eval_passes(X, y, cache)
        kind, dim = cache.settings["sketch"], cache.settings["sketch_dim"]
        sketch = make_sketch(kind, cache.n_params, dim, cache.seeds[0])
        S = sketch_pass(passes, sketch)["S"]
        nearest = pairwise_distances_argmin(S, cache.cluster_centers)
        within = np.square(S - cache.cluster_centers[nearest]).sum()
        total = np.square(S - S.mean(0)).sum()
        return float(1.0 - within / total) if total > 0 else 1.0

    def error_bound(self, subset_size):
        r"""The paper's bound on :math:`E\|\Delta\theta_S - \widehat{\Delta\theta}_S\|`.

        Parameters
        ----------
        subset_size : int
            ``m = |S|``.

        Returns
        -------
        bound : Bunch
            ``scatter``
            :math:`\frac{1}{\lambda N}\sqrt{\frac{m(N-m)}{N-1}\mathrm{tr}\bar\Sigma}`,
            ``solver`` :math:`\frac{m}{\lambda N}\sum_c \frac{n_c}{N}\rho_c\|\mu_c\|`
            and their sum ``total``, with the damping the cache was built with.
        """
        cache = self._check_fitted()
        m = check_scalar(
            subset_size,
            "subset_size",
            numbers.Integral,
            min_val=1,
            max_val=cache.n_samples_fit,
        )
        return _queries.error_bound(cache, m)
