"""Johnson-Lindenstrauss sketches of gradient vectors.

Both sketches map ``R^p -> R^k`` linearly, are seeded (the same seed gives
the same map on every call and every device) and never hold a dense
``p x k`` matrix:

- :class:`CountSketch` hashes every coordinate to one of ``k`` buckets with
  a random sign, ``s = S g`` with ``S[h(j), j] = sigma(j)``; memory ``O(p)``,
  cost per example ``O(p)`` whatever ``k``.
- :class:`GaussianSketch` applies ``s = R^T g / sqrt(k)`` with
  ``R ~ N(0, 1)^{p x k}`` generated block by block from a seeded
  ``torch.Generator``; memory ``O(block * k)``.
"""

import torch

__all__ = ["CountSketch", "GaussianSketch", "IdentitySketch", "make_sketch"]


class CountSketch:
    r"""Seeded CountSketch :math:`s_b = \sum_{j: h(j)=b} \sigma(j) g_j`.

    Parameters
    ----------
    n_features : int
        Input dimension ``p``.
    sketch_dim : int
        Output dimension ``k``.
    seed : int
        Seed of the hash and sign functions.
    """

    def __init__(self, n_features, sketch_dim, seed):
        self.n_features = int(n_features)
        self.sketch_dim = int(sketch_dim)
        self.seed = int(seed)
        gen = torch.Generator().manual_seed(self.seed)
        self._bucket = torch.randint(
            self.sketch_dim, (self.n_features,), generator=gen, dtype=torch.int64
        )
        self._sign = (
            torch.randint(0, 2, (self.n_features,), generator=gen).mul_(2).sub_(1)
        )
        self._cache = {}

    def _on(self, device, dtype):
        key = (str(device), dtype)
        if key not in self._cache:
            self._cache = {key: (self._bucket.to(device), self._sign.to(device, dtype))}
        return self._cache[key]

    def __call__(self, G):
        """Sketch the rows of ``G`` ``(n, p)`` into ``(n, k)``."""
        bucket, sign = self._on(G.device, G.dtype)
        out = G.new_zeros(G.shape[0], self.sketch_dim)
        return out.index_add_(1, bucket, G * sign)

    def __getstate__(self):  # regenerate from the seed instead of pickling O(p)
        return {k: getattr(self, k) for k in ("n_features", "sketch_dim", "seed")}

    def __setstate__(self, state):
        self.__init__(**state)


class GaussianSketch:
    r"""Seeded dense Gaussian JL map :math:`s = R^\top g / \sqrt{k}`, in blocks.

    Row block ``b`` of ``R`` (``block_size`` rows) is drawn from a generator
    seeded with ``(seed, b)``, so the map is the same whatever the device and
    only ``block_size x k`` numbers are alive at a time.
    """

    def __init__(self, n_features, sketch_dim, seed, block_size=4096):
        self.n_features = int(n_features)
        self.sketch_dim = int(sketch_dim)
        self.seed = int(seed)
        self.block_size = int(block_size)

    def _block(self, b, rows, dtype, device):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + b)
        R = torch.randn(rows, self.sketch_dim, generator=gen, dtype=torch.float64)
        return R.to(device, dtype).div_(self.sketch_dim**0.5)

    def __call__(self, G):
        out = G.new_zeros(G.shape[0], self.sketch_dim)
        for b, start in enumerate(range(0, self.n_features, self.block_size)):
            stop = min(start + self.block_size, self.n_features)
            out += G[:, start:stop] @ self._block(b, stop - start, G.dtype, G.device)
        return out


class IdentitySketch:
    """The exact gradients, ``s = g``: what a sketch of ``k >= p`` should be.

    A JL map into at least as many dimensions as it starts from compresses
    nothing and only adds distortion (and ``N x k`` memory: ``sketch_dim=1e5``
    at ``p = 1,210`` took 4.6 GB), so :func:`make_sketch` returns this instead.
    """

    def __init__(self, n_features):
        self.n_features = self.sketch_dim = int(n_features)

    def __call__(self, G):
        return G


_SKETCHES = {"countsketch": CountSketch, "gaussian": GaussianSketch}


def make_sketch(kind, n_features, sketch_dim, seed):
    """Build the sketch named ``kind`` (``"countsketch"`` or ``"gaussian"``).

    With ``sketch_dim >= n_features`` the exact gradients are clustered
    (:class:`IdentitySketch`, ``n_features`` dimensions) whatever ``kind``.
    """
    try:
        cls = _SKETCHES[kind]
    except (KeyError, TypeError):
        raise ValueError(
            f"sketch={kind!r} is not supported; expected one of {sorted(_SKETCHES)}."
        ) from None
    if sketch_dim >= n_features:
        return IdentitySketch(n_features)
    return cls(n_features, sketch_dim, seed)
