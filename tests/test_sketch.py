import numpy as np
import pytest
import torch

from sklearn_cif.sketch import CountSketch, GaussianSketch, make_sketch


@pytest.mark.parametrize("kind", ["countsketch", "gaussian"])
def test_sketch_is_seeded_and_linear(kind):
    # Same seed: the same map; another seed: another map; linear in the input.
    G = torch.randn(5, 3000, dtype=torch.float64)
    a, b = make_sketch(kind, 3000, 64, 7), make_sketch(kind, 3000, 64, 7)
    assert torch.equal(a(G), b(G))
    assert not torch.allclose(a(G), make_sketch(kind, 3000, 64, 8)(G))
    torch.testing.assert_close(a(2 * G[:2] + G[2:4]), 2 * a(G[:2]) + a(G[2:4]))


@pytest.mark.parametrize("cls", [CountSketch, GaussianSketch])
def test_sketch_preserves_inner_products_in_expectation(cls):
    # JL property: E[<Sg, Sh>] = <g, h>; averaged over 200 seeds the error is small.
    g = torch.randn(1, 500, dtype=torch.float64)
    h = g + 0.5 * torch.randn(1, 500, dtype=torch.float64)
    est = [
        float((s(g) * s(h)).sum()) for s in (cls(500, 32, seed) for seed in range(200))
    ]
    exact = float((g * h).sum())
    assert abs(np.mean(est) - exact) < 0.05 * abs(exact)


def test_countsketch_pickles_small_and_identical():
    # A pickled CountSketch stores only its seed and rebuilds the same map.
    import pickle

    s = CountSketch(100_000, 16, 3)
    blob = pickle.dumps(s)
    assert len(blob) < 1000
    G = torch.randn(2, 100_000)
    assert torch.equal(pickle.loads(blob)(G), s(G))


def test_gaussian_sketch_never_builds_full_matrix():
    # The public call draws the random matrix in blocks of block_size x k
    # (every torch.randn it makes is recorded), and equals the dense map.
    from unittest import mock

    s = GaussianSketch(10_000, 8, 0, block_size=1000)
    G = torch.randn(3, 10_000, dtype=torch.float64)
    with mock.patch.object(torch, "randn", wraps=torch.randn) as draws:
        out = s(G)
    shapes = [call.args[:2] for call in draws.call_args_list]
    assert len(shapes) == 10 and set(shapes) == {(1000, 8)}
    dense = torch.cat(
        [
            torch.randn(
                1000, 8, generator=torch.Generator().manual_seed(b), dtype=torch.float64
            )
            for b in range(10)
        ]
    )
    torch.testing.assert_close(out, G @ dense / 8**0.5)


def test_unknown_sketch_raises():
    # An unknown sketch name is named in the error.
    with pytest.raises(ValueError, match="sketch='srht'"):
        make_sketch("srht", 10, 2, 0)
