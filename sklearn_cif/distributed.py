"""A data-parallel cache build on :mod:`torch.distributed`.

When a default process group is initialized (``torchrun``; gloo on CPUs,
NCCL on GPUs) with more than one process, every rank calls ``fit`` with the
same model and the same ``(X, y)``, and the build runs data-parallel
(``distributed="auto"``, the default; ``False`` keeps a rank's fit to
itself): each
rank reads a contiguous shard of the rows (from its rank and the world
size), and :class:`ShardedPasses` combines what must be global through the
two hooks of :class:`~sklearn_cif.passes.DataPasses`:

- ``reduce``: every sum over rows is all-reduced: the cluster gradient sums
  (``C x p``), each curvature product of every CG and block Krylov
  iteration (``r x p``), the dense curvature (``p x p``);
- ``gather``: every per-row array is all-gathered: the sketches (``N x k``,
  so every rank runs the same seeded k-means), losses, influences, outputs
  and the Newton features.

The seeds are rank 0's, broadcast; ranks given other data or weights than
rank 0 all raise before the first pass. Every rank ends with the same cache
(tested equal to a single-process build to 1e-6 in float64), which pickles
and saves like any other; queries afterwards are local to each rank.

A rank that fails mid-build (non-finite gradients on its shard, a crash)
makes the others fail in their next collective, when its connection closes
or when the process group's ``timeout`` passes; no rank installs a cache.
"""

import numpy as np
import torch

from sklearn_cif.passes import DataPasses

__all__ = [
    "ShardedPasses",
    "agree_on_inputs",
    "agree_on_seeds",
    "make_passes",
    "process_group",
    "resolve_distributed",
]


def process_group():
    """``(rank, world_size)`` of the default process group, or ``None``.

    ``None`` when :mod:`torch.distributed` is unavailable or not
    initialized, or when the world has a single process.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    return None if world == 1 else (dist.get_rank(), world)


def resolve_distributed(distributed):
    """The ``distributed`` parameter as a bool (see the estimator)."""
    if distributed == "auto":
        return process_group() is not None
    if distributed is True or distributed is False:
        if distributed and process_group() is None:
            raise ValueError(
                "distributed=True needs an initialized torch.distributed process "
                "group with more than one process (e.g. started by torchrun)."
            )
        return distributed
    raise ValueError(f"distributed={distributed!r}; expected 'auto', True or False.")


def make_passes(fmodel, X, y, batch_size, distributed):
    """:class:`ShardedPasses` when ``distributed``, else ``DataPasses``."""
    if distributed:
        return ShardedPasses(fmodel, X, y, batch_size)
    return DataPasses(fmodel, X, y, batch_size)


def agree_on_seeds(seeds):
    """Rank 0's seeds on every rank (the identity outside a process group)."""
    if process_group() is None:
        return seeds
    box = [tuple(seeds)]
    torch.distributed.broadcast_object_list(box, src=0)
    return type(seeds)(*box[0])


def agree_on_inputs(data_fingerprint, model_fingerprint):
    """Raise on every rank unless all ranks hold the same data and model.

    A rank given other data would silently mix two datasets into one cache;
    the check is one small all-gather before the first pass.
    """
    group = process_group()
    if group is None:
        return
    mine = (data_fingerprint, model_fingerprint)
    everyone = [None] * group[1]
    torch.distributed.all_gather_object(everyone, mine)
    odd = [r for r, theirs in enumerate(everyone) if theirs != everyone[0]]
    if odd:
        raise ValueError(
            f"Ranks {odd} were given other data or model weights than rank 0 "
            "(fingerprint mismatch); a data-parallel build needs the same "
            "model and the same (X, y) on every rank."
        )


def _shard(n, rank, world):
    return slice(n * rank // world, n * (rank + 1) // world)


class ShardedPasses(DataPasses):
    """:class:`~sklearn_cif.passes.DataPasses` over this rank's shard of the rows.

    Every rank holds the whole dataset and reads rows
    ``[N r / W, N (r + 1) / W)``; sums are all-reduced and per-row arrays
    all-gathered, so every consumer above the data-pass layer sees the
    same numbers on every rank. A subset is sharded again.

    Parameters
    ----------
    fmodel, X, y, batch_size, budget
        As :class:`~sklearn_cif.passes.DataPasses`.

    Raises
    ------
    RuntimeError
        Outside an initialized multi-process group.
    ValueError
        When some rank would get no row (fewer rows than processes).
    """

    def __init__(self, fmodel, X, y, batch_size, **kwargs):
        super().__init__(fmodel, X, y, batch_size, **kwargs)
        group = process_group()
        if group is None:
            raise RuntimeError(
                "ShardedPasses needs an initialized torch.distributed process "
                "group with more than one process."
            )
        self.rank, self.world_size = group
        if self.n_samples < self.world_size:
            raise ValueError(
                f"{self.n_samples} rows cannot be sharded over {self.world_size} "
                "processes: every rank needs at least one row of each pass."
            )
        shards = [
            _shard(self.n_samples, r, self.world_size) for r in range(self.world_size)
        ]
        self._sizes = [sl.stop - sl.start for sl in shards]

    def rows(self):
        """This rank's contiguous shard of the rows."""
        return _shard(self.n_samples, self.rank, self.world_size)

    def _collective_device(self, tensor):
        nccl = torch.distributed.get_backend() == "nccl"
        return tensor.to(self.fmodel.device) if nccl else tensor.cpu()

    def reduce(self, total):
        """All-reduce (sum) a tensor summed over this rank's rows."""
        buf = self._collective_device(total)
        torch.distributed.all_reduce(buf)
        return buf.to(total.device)

    def gather(self, arrays):
        """All-gather per-row arrays filled on this rank's rows (in row order)."""
        own = self.rows()
        width = max(self._sizes)
        out = {}
        for key, arr in arrays.items():
            part = torch.from_numpy(np.ascontiguousarray(arr[own]))
            buf = torch.zeros((width, *part.shape[1:]), dtype=part.dtype)
            buf[: part.shape[0]] = part
            buf = self._collective_device(buf)
            parts = [torch.empty_like(buf) for _ in range(self.world_size)]
            torch.distributed.all_gather(parts, buf)
            out[key] = torch.cat(
                [p[:size].cpu() for p, size in zip(parts, self._sizes, strict=True)]
            ).numpy()
        return out
