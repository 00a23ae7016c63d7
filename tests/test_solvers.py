import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning

from sklearn_cif.solvers import SpectralPreconditioner, batched_cg, block_cg

SOLVERS = pytest.mark.parametrize("solve", [batched_cg, block_cg])


def _spd(p, cond, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))
    evals = torch.logspace(0, np.log10(cond), p, dtype=torch.float64)
    return ((Q * evals) @ Q.T).to(dtype)


@SOLVERS
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("seed", [0, 1])
def test_cg_matches_dense_solve(solve, dtype, tol, seed):
    # Every column's CG solution equals torch.linalg.solve to the tolerance.
    A = _spd(40, 1e3, seed, dtype)
    B = torch.randn(6, 40, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    res = solve(lambda V: V @ A, B, tol=tol, maxiter=2000)
    ref = torch.linalg.solve(A.double(), B.double().T).T
    err = torch.linalg.norm(res.x.double() - ref, dim=1) / torch.linalg.norm(ref, dim=1)
    assert float(err.max()) < 1e3 * tol  # error <= condition number x residual
    assert np.all(res.residuals < 2 * tol)
    assert res.n_iter.shape == (6,) and np.all(res.n_iter > 0)


@SOLVERS
def test_per_column_tolerances(solve):
    # A tolerance per column: each true residual (recomputed against the
    # dense matrix) meets its own, the loose columns stop first, and a miss
    # names the range in the warning.
    A = _spd(60, 1e4, 3)
    B = torch.randn(4, 60, generator=torch.Generator().manual_seed(3), dtype=A.dtype)
    tol = np.array([1e-10, 1e-1, 1e-6, 0.5])
    res = solve(lambda V: V @ A, B, tol=tol, maxiter=2000)
    true = (
        torch.linalg.norm(B - res.x @ A, dim=1) / torch.linalg.norm(B, dim=1)
    ).numpy()
    assert np.all(true <= tol * (1 + 1e-6))
    assert res.n_iter[3] <= res.n_iter[1] < res.n_iter[2] < res.n_iter[0]
    ref = torch.linalg.solve(A, B.T).T
    err = torch.linalg.norm(res.x[0] - ref[0]) / torch.linalg.norm(ref[0])
    assert float(err) < 1e-6
    with pytest.warns(ConvergenceWarning, match=r"cg_tol=1e-12\.\.0\.1 \(per system\)"):
        solve(lambda V: V @ A, B[:2], tol=np.array([1e-12, 0.1]), maxiter=3)


@SOLVERS
def test_zero_rhs_and_deflation(solve):
    # A zero right-hand side needs no iteration; the others still converge.
    A = _spd(20, 10, 0)
    B = torch.randn(3, 20, dtype=torch.float64)
    B[1] = 0
    res = solve(lambda V: V @ A, B, tol=1e-12)
    assert res.n_iter[1] == 0 and torch.all(res.x[1] == 0)
    torch.testing.assert_close(res.x @ A, B)


@SOLVERS
def test_maxiter_gives_convergence_warning_with_residual(solve):
    # Stopping at maxiter warns, names the knobs, and keeps the residuals.
    A = _spd(50, 1e6, 0)
    B = torch.randn(2, 50, dtype=torch.float64)
    with pytest.warns(ConvergenceWarning, match="cg_maxiter.*damping|maxiter=3"):
        res = solve(lambda V: V @ A, B, tol=1e-12, maxiter=3)
    assert np.all(res.residuals > 1e-12) and np.all(res.n_iter == 3)


@SOLVERS
def test_indefinite_operator_raises(solve):
    # A non positive-definite operator is a breakdown, not a result.
    A = -torch.eye(5, dtype=torch.float64)
    with pytest.raises(FloatingPointError, match="damping"):
        solve(lambda V: V @ A, torch.ones(1, 5, dtype=torch.float64))


@SOLVERS
def test_nonfinite_operator_raises(solve):
    # NaN coming out of the operator stops the solve with an error.
    with pytest.raises(FloatingPointError, match="non-finite"):
        solve(lambda V: V * float("nan"), torch.ones(2, 4, dtype=torch.float64))


def test_block_cg_shares_the_krylov_space():
    # Block CG minimizes every column's error over all columns' directions:
    # on right-hand sides drawn from one low-dimensional subspace (as cluster
    # means of one model's gradients are) it needs several times fewer
    # iterations and operator passes than independent CG, to the same answer.
    A = _spd(400, 1e4, 5)
    gen = torch.Generator().manual_seed(2)
    basis = torch.randn(6, 400, generator=gen, dtype=torch.float64)
    B = torch.randn(12, 6, generator=gen, dtype=torch.float64) @ basis
    B += 1e-3 * torch.randn(12, 400, generator=gen, dtype=torch.float64)
    passes = {"block": 0, "batched": 0}

    def counted(name):
        def matmat(V):
            passes[name] += 1
            return V @ A

        return matmat

    block = block_cg(counted("block"), B, tol=1e-8, maxiter=5000)
    batched = batched_cg(counted("batched"), B, tol=1e-8, maxiter=5000)
    assert block.n_iter.max() < batched.n_iter.max() / 3
    assert passes["block"] < passes["batched"] / 3
    ref = torch.linalg.solve(A, B.T).T
    for res in (block, batched):
        err = torch.linalg.norm(res.x - ref, dim=1) / torch.linalg.norm(ref, dim=1)
        assert float(err.max()) < 1e-4 and res.residuals.max() <= 1e-8


def test_block_cg_deflates_converged_columns():
    # An eigenvector right-hand side converges in one iteration and is then
    # frozen; the other column keeps iterating to the tolerance.
    A = _spd(60, 1e3, 6)
    _, vecs = torch.linalg.eigh(A)
    B = torch.stack([vecs[:, 10], torch.randn(60, dtype=torch.float64)])
    res = block_cg(lambda V: V @ A, B, tol=1e-10, max_restarts=0)
    assert res.n_iter[0] == 1 and res.n_iter[1] > 5
    torch.testing.assert_close(res.x, torch.linalg.solve(A, B.T).T)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_block_cg_dependent_rhs_do_not_break_down(dtype, tol):
    # Repeated and proportional right-hand sides make the search block rank
    # deficient; the re-orthonormalization drops the dependent directions
    # instead of dividing by a singular P^T A P (in float32 too).
    A = _spd(80, 1e3, 7, dtype)
    base = torch.randn(3, 80, generator=torch.Generator().manual_seed(3))
    B = torch.cat([base, base, -2 * base, base[:1] + base[1:2]]).to(dtype)
    res = block_cg(lambda V: V @ A, B, tol=tol, maxiter=2000)
    ref = torch.linalg.solve(A.double(), B.double().T).T
    err = torch.linalg.norm(res.x.double() - ref, dim=1) / torch.linalg.norm(ref, dim=1)
    assert float(err.max()) < 1e3 * tol and res.residuals.max() < 2 * tol


def test_block_cg_residuals_are_recomputed_true_residuals():
    # The reported residuals are ||b - A x|| / ||b|| of the returned x, and
    # the product counter counts every operator row, the final check included.
    A = _spd(100, 1e4, 8, torch.float32)
    B = torch.randn(8, 100, generator=torch.Generator().manual_seed(4))
    rows = [0]

    def matmat(V):
        rows[0] += V.shape[0]
        return V @ A

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = block_cg(matmat, B, tol=1e-4, maxiter=3000)
    true = torch.linalg.norm(B - res.x @ A, dim=1) / torch.linalg.norm(B, dim=1)
    np.testing.assert_allclose(res.residuals, true.numpy(), rtol=1e-3)
    assert res.n_products == rows[0]
    # float32 at condition 1e4: whenever a true residual misses tol, it says so
    missed = bool((res.residuals > 1e-4).any())
    assert missed == any(issubclass(w.category, ConvergenceWarning) for w in caught)


def test_preconditioned_block_cg_matches_dense_solve():
    # Block PCG with the spectral preconditioner: same answer, fewer iterations.
    from sklearn_cif.solvers import randomized_eigh

    A = _spd(120, 1e5, 9)
    gen = torch.Generator().manual_seed(5)
    B = torch.randn(5, 120, dtype=torch.float64, generator=gen)
    gen = torch.Generator().manual_seed(0)
    evals, evecs = randomized_eigh(lambda V: V @ A, 120, 20, generator=gen, like=A)
    P = SpectralPreconditioner(evals[:20], evecs[:20], evals[20])
    plain = block_cg(lambda V: V @ A, B, tol=1e-10, maxiter=5000)
    pcg = block_cg(lambda V: V @ A, B, tol=1e-10, maxiter=5000, precond=P)
    assert pcg.n_iter.max() < plain.n_iter.max()
    torch.testing.assert_close(pcg.x, torch.linalg.solve(A, B.T).T)


def test_randomized_eigh_matches_dense_eigh():
    # Top Ritz pairs equal torch.linalg.eigh's top eigenpairs on a matrix with
    # a decaying spectrum.
    from sklearn_cif.solvers import randomized_eigh

    A = _spd(60, 1e4, 3)
    gen = torch.Generator().manual_seed(0)
    # 9 blocks of 4 (36 products) reach 1e-6 on this gap-free spectrum
    evals, evecs = randomized_eigh(
        lambda V: V @ A, 60, 5, block_size=4, n_iter=8, generator=gen, like=A
    )
    ref_vals, ref_vecs = torch.linalg.eigh(A)
    torch.testing.assert_close(evals[:5], ref_vals.flip(0)[:5], rtol=1e-6, atol=0)
    overlap = (evecs[:5] @ ref_vecs.flip(1)[:, :5]).abs().diagonal()
    assert torch.all(overlap > 1 - 1e-6)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-6), (torch.float32, 1e-3)])
def test_block_krylov_eigh_on_a_large_decaying_spectrum(dtype, tol):
    # n = 1,500 with a GGN-like power-law spectrum (lambda_i = i^-1.5): the
    # default 9 blocks of rank / 4 vectors (90 products, 6% of n) give the top
    # rank + 1 eigenvalues within 5%, subspace iteration with the same budget
    # (rank + 5 vectors, one power iteration) misses the rank-th by > 10x
    # more; 13 blocks reach `tol`. Ritz vectors stay orthonormal in float32.
    from sklearn_cif.solvers import randomized_eigh

    n, rank = 1500, 40
    g = torch.Generator().manual_seed(11)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    true = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** 1.5 + 1e-4
    A = ((Q * true) @ Q.T).to(dtype)
    products = [0]

    def matmat(V):
        products[0] += V.shape[0]
        return V @ A

    def rel_err(vals):
        return (vals.double() - true[: rank + 1]).abs() / true[: rank + 1]

    gen = torch.Generator().manual_seed(0)
    evals, evecs = randomized_eigh(matmat, n, rank, generator=gen, like=A)
    assert products[0] == 9 * 10 and evals.shape == (rank + 1,)
    default = rel_err(evals)
    assert float(default.max()) < 0.05
    gram = evecs.double() @ evecs.double().T
    assert float((gram - torch.eye(rank + 1, dtype=torch.float64)).abs().max()) < 1e-4
    Y = torch.linalg.qr(torch.randn(n, rank + 5, generator=gen, dtype=dtype)).Q.T
    Y = torch.linalg.qr((Y @ A).T).Q.T  # 45 + 45 products
    ritz = torch.linalg.eigvalsh((Y @ A @ Y.T).double()).flip(0)[: rank + 1]
    assert rel_err(ritz)[rank - 1] > 10 * default[rank - 1]
    longer, _ = randomized_eigh(
        A.__rmatmul__, n, rank, n_iter=12, generator=gen, like=A
    )
    assert float(rel_err(longer).max()) < tol


def test_spectral_preconditioner_cuts_cg_iterations():
    # PCG with the top eigenpairs solves the same systems in fewer iterations
    # (counted), to the same answer; with full rank P is the exact inverse.
    from sklearn_cif.solvers import randomized_eigh

    A = _spd(80, 1e5, 4)
    B = torch.randn(
        3, 80, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    gen = torch.Generator().manual_seed(0)
    evals, evecs = randomized_eigh(lambda V: V @ A, 80, 20, generator=gen, like=A)
    P = SpectralPreconditioner(evals[:20], evecs[:20], evals[20])
    plain = batched_cg(lambda V: V @ A, B, tol=1e-10, maxiter=5000)
    pcg = batched_cg(lambda V: V @ A, B, tol=1e-10, maxiter=5000, precond=P)
    assert pcg.n_iter.max() < 0.7 * plain.n_iter.max()
    torch.testing.assert_close(pcg.x, torch.linalg.solve(A, B.T).T)
    full_vals, full_vecs = torch.linalg.eigh(A)
    exact = SpectralPreconditioner(full_vals, full_vecs.T, full_vals.min())
    torch.testing.assert_close(exact(B), torch.linalg.solve(A, B.T).T)
    kept, rest = exact.split_form(B)  # every eigenvector kept: nothing outside
    np.testing.assert_allclose(kept, (B * exact(B)).sum(1).numpy(), rtol=1e-10)
    np.testing.assert_allclose(rest, 0.0, atol=1e-10 * (B * B).sum(1).max().item())
    kept, rest = P.split_form(B)  # 20 kept: r^T P r = kept + rest / theta_21
    np.testing.assert_allclose(
        kept + rest / P.tail, (B * P(B)).sum(1).numpy(), rtol=1e-10
    )
    U = evecs[:20]
    outside = B - (B @ U.T) @ U
    np.testing.assert_allclose(rest, (outside * outside).sum(1).numpy(), rtol=1e-8)


@pytest.mark.parametrize("precondition", [False, True])
def test_gauss_radau_bounds_the_a_norm_error(precondition):
    # With lower_eig = the smallest eigenvalue of M^{-1} A (dense oracle), the
    # stop hook's err is at every iteration an upper bound on each column's
    # squared A-norm error ||x - x_k||_A^2 (from a dense solve), far tighter
    # than ||r_k||^2 / lambda_min once CG runs, and a True from the hook ends
    # the solve there; with lower_eig halved it stays a bound.
    A = _spd(120, 1e4, 5)
    B = torch.randn(
        4, 120, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )
    ref = torch.linalg.solve(A, B.T).T
    P = None
    lam = torch.linalg.eigvalsh(A)
    mu = float(lam[0])
    if precondition:
        vals, vecs = torch.linalg.eigh(A)
        P = SpectralPreconditioner(
            vals.flip(0)[:30], vecs.T.flip(0)[:30], vals.flip(0)[30]
        )
        mu = float(vals[0] / vals.flip(0)[30])  # lambda_min(M^-1 A), exact eigenpairs
    for scale in (1.0, 0.5):
        seen = []

        def stop(X, R, err, seen=seen):
            E = ref - X
            true = ((E @ A) * E).sum(1).numpy()
            trivial = (R * R).sum(1).numpy() / float(lam[0])
            seen.append((err.copy(), true, trivial))
            return len(seen) == 25

        res = batched_cg(
            lambda V: V @ A, B, tol=1e-14, maxiter=500, precond=P, stop=stop,
            lower_eig=mu * scale,
        )  # fmt: skip
        assert len(seen) == 25 and np.all(res.n_iter == 25)
        for err, true, _ in seen:
            assert np.all(err >= true * (1 - 1e-8))
        err, true, trivial = seen[-1]
        assert np.all(err < 0.5 * trivial)
        if scale == 1.0:
            assert np.all(err < 20 * true)


def test_stop_hook_without_lower_eig_gets_no_bound():
    A = _spd(30, 1e2, 1)
    B = torch.randn(
        2, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    got = []
    res = batched_cg(
        lambda V: V @ A, B, tol=1e-12, stop=lambda X, R, err: got.append(err) or True
    )
    assert got == [None] and np.all(res.n_iter == 1)


def test_gauss_radau_fails_safe_and_survives_freezing():
    # A lower_eig above the spectrum cannot make err claim convergence: where
    # the Radau estimate drops below the Gauss one err becomes inf, never 0
    # for a column with error left. A column frozen by its tolerance keeps a
    # valid bound while the others iterate. lower_eig must be positive.
    A = _spd(120, 1e4, 5)
    B = torch.randn(
        3, 120, dtype=torch.float64, generator=torch.Generator().manual_seed(3)
    )
    ref = torch.linalg.solve(A, B.T).T
    mu = float(torch.linalg.eigvalsh(A)[0])

    def true_err(X):
        E = ref - X
        return ((E @ A) * E).sum(1).numpy()

    seen = []
    with pytest.warns(ConvergenceWarning):
        batched_cg(
            lambda V: V @ A, B, tol=1e-14, maxiter=80, lower_eig=20 * mu,
            stop=lambda X, R, err: seen.append((err.copy(), true_err(X))) and False,
        )  # fmt: skip
    errs = np.array([e for e, _ in seen])
    trues = np.array([t for _, t in seen])
    assert not np.any((errs == 0) & (trues > 1e-12 * trues[0]))
    assert np.any(np.isinf(errs))
    seen.clear()
    A = _spd(120, 1e2, 6)  # smallest eigenvalue 1
    ref = torch.linalg.solve(A, B.T).T
    with pytest.warns(ConvergenceWarning):
        res = batched_cg(
            lambda V: V @ A, B, tol=np.array([1e-2, 1e-14, 1e-14]), maxiter=30,
            lower_eig=1.0,
            stop=lambda X, R, err: seen.append((err.copy(), true_err(X))) and False,
        )  # fmt: skip
    assert res.n_iter[0] < res.n_iter[1] == 30
    for err, true in seen:
        assert np.all(err >= true * (1 - 1e-8))
    frozen = [err[0] for err, _ in seen[res.n_iter[0] :]]
    assert len(set(frozen)) == 1 and np.isfinite(frozen[0])
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="lower_eig"):
            batched_cg(lambda V: V @ A, B, lower_eig=bad)
