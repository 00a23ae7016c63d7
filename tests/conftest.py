import numpy as np
import pytest
import torch
from _models import make_mlp
from sklearn.datasets import load_digits


@pytest.fixture
def tiny_classification():
    """A tiny float64 MLP (4-5-3) with 30 examples: dense oracles are cheap."""
    rng = np.random.default_rng(0)
    X = torch.as_tensor(rng.normal(size=(30, 4)))
    y = torch.as_tensor(rng.integers(0, 3, size=30))
    return make_mlp(4, 5, 3, seed=0), X, y


@pytest.fixture
def five_classes():
    """A float64 4-5-5 MLP on 30 examples: five outputs, so the Newton
    features take the forward-mode path (``d >= 4``)."""
    rng = np.random.default_rng(2)
    X = torch.as_tensor(rng.normal(size=(30, 4)))
    y = torch.as_tensor(rng.integers(0, 5, size=30))
    return make_mlp(4, 5, 5, seed=2), X, y


@pytest.fixture
def tiny_regression():
    rng = np.random.default_rng(1)
    X = torch.as_tensor(rng.normal(size=(25, 3)))
    y = torch.as_tensor(rng.normal(size=(25, 2)))
    return make_mlp(3, 4, 2, seed=1), X, y


@pytest.fixture(scope="session")
def digits():
    X, y = load_digits(return_X_y=True)
    return (X / 16.0).astype(np.float32), y.astype(np.int64)
