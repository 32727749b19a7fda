"""Per-forward state: which tokens run sparse, which run dense, which are skipped.

The handle's forward pre-hook describes each micro-batch as a `BatchState` and publishes it in
the model's `ForwardContext`; the wrapped blocks and the labelled-logits head read that context
and nothing else of the handle. Shapes: B batch, L sequence length, H hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparselora.config import IGNORE_INDEX, SparseLoRAConfig
from sparselora.engine.estimator import CovarianceCollector, Estimator
from sparselora.engine.stats import SparsityStats


def output_positions(labels: torch.Tensor, alignment: str = "dense") -> torch.Tensor:
    """(B, L) bool: the positions that run dense. Everything else (context, padding) is sparse.

    The logits at position t predict token t + 1, so with alignment "dense" position t is dense
    when labels[:, t + 1] != -100: exactly the positions whose outputs enter the loss. With
    "dense_labelled" (the reference code) position t is dense when labels[:, t] != -100.
    """
    labelled = labels != IGNORE_INDEX
    if alignment == "dense_labelled":
        return labelled
    shifted = torch.zeros_like(labelled)
    shifted[:, :-1] = labelled[:, 1:]
    return shifted


class TokenSplit:
    """Flattened token positions of one micro-batch, split into sparse, dense and skipped sets.

    `sparse_rows` (n_s,), `dense_rows` (n_d,) and `skip_rows` (n_k,) index the B*L flattened
    tokens; together they are a permutation of 0..B*L-1. Skipped rows (tokens whose output
    nothing reads) take precedence over sparse ones. `merge` puts per-set results back in
    token order, with zeros for skipped rows.
    """

    def __init__(self, sparse_mask: torch.Tensor, skip_mask: torch.Tensor | None = None) -> None:
        sparse = sparse_mask.reshape(-1)  # (B*L,)
        self.sparse_mask = sparse
        self.num_tokens = sparse.numel()
        skip = torch.zeros_like(sparse) if skip_mask is None else skip_mask.reshape(-1)
        self.sparse_rows = (sparse & ~skip).nonzero().squeeze(1)
        self.dense_rows = (~sparse & ~skip).nonzero().squeeze(1)
        self.skip_rows = skip.nonzero().squeeze(1)
        order = torch.cat([self.sparse_rows, self.dense_rows, self.skip_rows])
        self.inverse = torch.empty_like(order)
        self.inverse[order] = torch.arange(order.numel(), device=order.device)

    @property
    def all_sparse(self) -> bool:
        return self.sparse_rows.numel() == self.num_tokens

    @property
    def all_dense(self) -> bool:
        return self.dense_rows.numel() == self.num_tokens

    def merge(self, y_sparse: torch.Tensor, y_dense: torch.Tensor) -> torch.Tensor:
        """(n_s, C) and (n_d, C) -> (B*L, C) in token order, zeros at skipped rows."""
        parts = [y_sparse, y_dense]
        if self.skip_rows.numel():
            parts.append(y_dense.new_zeros(self.skip_rows.numel(), y_dense.shape[-1]))
        return torch.cat(parts).index_select(0, self.inverse)


@dataclass
class BatchState:
    """What the sparse blocks need to know about the micro-batch being processed.

    forward_id: increases with every forward; a recomputation (gradient checkpointing) of the
      same forward sees the same id, so it re-uses the channels chosen the first time.
    score_mask: (B, L) bool, the tokens channel scores are computed on (real tokens).
    split: the sparse / dense token sets, or None when this forward runs dense.
    unread: (B, L) bool, the positions whose last-layer output no loss reads, or None when the
      last-layer saving is off for this forward.
    exact_savings: whether this forward may skip work no loss reads (a training forward
      outside `handle.dense()`); the labelled-logits head reads it.
    backward: whether gradients were on when the model's forward began, so a backward follows.
      Savings are counted from it, not from the grad mode inside a block, which gradient
      checkpointing changes (reentrant: off in the first pass, on in the recomputation).
    """

    forward_id: int
    shape: tuple[int, int]
    score_mask: torch.Tensor
    split: TokenSplit | None
    unread: torch.Tensor | None = None
    exact_savings: bool = False
    backward: bool = False
    _counted: set[str] = field(default_factory=set)
    _skip_splits: dict[bool, TokenSplit] = field(default_factory=dict)
    _read_positions: torch.Tensor | None = None

    @property
    def passes(self) -> int:
        """How often a frozen projection's skipped work would have run: its forward, plus the
        input-gradient backward when a backward follows."""
        return 2 if self.backward else 1

    def first_count(self, name: str) -> bool:
        """True the first time `name` asks within this forward: savings are counted once per
        forward, not again in a gradient-checkpointing recomputation (which re-uses this
        state, as the forward id is unchanged)."""
        if name in self._counted:
            return False
        self._counted.add(name)
        return True

    def skip_split(self, with_sparse: bool) -> TokenSplit:
        """The last layer's split: unread rows skipped, the rest sparse or dense as in `split`.

        with_sparse: whether the calling projection is channel-sparse in that layer.
        """
        if with_sparse not in self._skip_splits:
            unread = self.unread.reshape(-1)
            if with_sparse and self.split is not None:
                sparse = self.split.sparse_mask
            else:
                sparse = torch.zeros_like(unread)
            self._skip_splits[with_sparse] = TokenSplit(sparse, skip_mask=unread)
        return self._skip_splits[with_sparse]

    def read_positions(self) -> torch.Tensor:
        """(n,) ascending int64: the positions some row's loss reads (where `unread` is False
        in at least one row), the query rows the last layer's attention core computes."""
        if self._read_positions is None:
            self._read_positions = (~self.unread).any(0).nonzero().squeeze(1)
        return self._read_positions


class ForwardContext:
    """What the wrapped modules of one model read while a forward runs.

    The handle owns one per model and keeps it current: `batch` before every forward (its
    pre-hook), `estimator` once it is fitted or loaded, `collector` while the whitened estimator
    calibrates. Blocks and the labelled-logits head receive this object, never the handle.
    `stats` is where they record what they kept, skipped and spent.
    """

    def __init__(self, config: SparseLoRAConfig) -> None:
        self.config = config
        self.stats = SparsityStats()
        self.batch: BatchState | None = None
        self.estimator: Estimator | None = None
        self.collector: CovarianceCollector | None = None

    def batch_for(self, x: torch.Tensor) -> BatchState | None:
        """The current micro-batch's state if `x` (B, L, C) belongs to it, else None."""
        batch = self.batch
        if batch is None or x.dim() != 3 or tuple(x.shape[:2]) != batch.shape:
            return None
        return batch

    def observe(self, layer: int, kind: str, x: torch.Tensor, batch: BatchState | None) -> None:
        """Feed a block input (B, L, H) to the calibration collector while one is running."""
        if self.collector is not None and batch is not None:
            self.collector.add(layer, kind, x, batch.score_mask)

    def generator(self, layer: int, part: int) -> torch.Generator:
        """The 'random' criteria's generator, seeded per forward, layer and part, so that a
        recomputation of the same forward draws the same channels."""
        seed = hash((self.config.seed, self.batch.forward_id, layer, part)) & 0x7FFFFFFF
        return torch.Generator().manual_seed(seed)
