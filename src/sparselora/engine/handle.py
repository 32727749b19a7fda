"""`apply_sparselora`: wrap the targeted blocks of one PEFT model and return a handle.

The handle registers one forward pre-hook on the transformers model (to see each micro-batch's
labels and attention mask) and takes over the forward of the sparsified MLP / projection module
instances (see `blocks.py`). Nothing is patched process-wide, no weight is copied, and
`handle.remove()` restores the model exactly.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from sparselora.config import SparseLoRAConfig
from sparselora.engine.blocks import SparseBlock
from sparselora.engine.estimator import (
    Estimator,
    EstimatorCache,
    EstimatorMismatchError,
    Key,
    weights_fingerprint,
)
from sparselora.engine.models import family_for
from sparselora.engine.ops import TokenSplit
from sparselora.engine.peft_compat import base_linear, check_supported
from sparselora.engine.savings import LabelledLogits, output_positions
from sparselora.engine.stats import SparsityStats

logger = logging.getLogger(__name__)

FFN_ESTIMATED = ("gate_proj", "up_proj")
ATTN_ESTIMATED = ("q_proj", "k_proj", "v_proj")
ESTIMATED = FFN_ESTIMATED + ATTN_ESTIMATED


@dataclass
class BatchState:
    """What the sparse blocks need to know about the micro-batch being processed.

    score_mask: (B, L) bool, the tokens channel scores are computed on (real tokens).
    split: the sparse / dense token sets, or None when this forward runs dense.
    unread: (B, L) bool, the positions whose last-layer output no loss reads, or None when the
      last-layer saving is off for this forward.
    """

    forward_id: int
    shape: tuple[int, int]
    score_mask: torch.Tensor
    split: TokenSplit | None
    unread: torch.Tensor | None = None
    _skip_splits: dict[bool, TokenSplit] = field(default_factory=dict)

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


class CovarianceCollector:
    """Accumulates E[x^T x] of block inputs over real tokens, for the whitened estimator.

    Keys are (layer, "mlp") for the FFN input and (layer, "attn") for the attention input.
    Memory: one (H, H) float32 matrix per key.
    """

    def __init__(self, keys: Iterable[tuple[int, str]]) -> None:
        self.keys = set(keys)
        self.sums: dict[tuple[int, str], torch.Tensor] = {}
        self.tokens: dict[tuple[int, str], int] = {}

    @torch.no_grad()
    def add(self, layer: int, kind: str, x: torch.Tensor, mask: torch.Tensor) -> None:
        if (layer, kind) not in self.keys:
            return
        tokens = x.detach()[mask].float()  # (T, H)
        gram = tokens.T @ tokens
        key = (layer, kind)
        self.sums[key] = gram if key not in self.sums else self.sums[key] + gram
        self.tokens[key] = self.tokens.get(key, 0) + tokens.shape[0]

    def min_tokens(self) -> int:
        return min((self.tokens.get(k, 0) for k in self.keys), default=0)

    def covariances(self, keys: Iterable[Key]) -> dict[Key, torch.Tensor]:
        """Per (layer, projection) covariance: q/k/v read the attention input, gate/up the FFN's."""
        out = {}
        for layer, proj in keys:
            kind = "mlp" if proj in FFN_ESTIMATED else "attn"
            out[(layer, proj)] = self.sums[(layer, kind)] / max(1, self.tokens[(layer, kind)])
        return out


class SparseLoRA:
    """Handle on a model wrapped by `apply_sparselora`.

    - `enable()` / `disable()`: switch sparsity on or off (the step schedule calls these).
    - `dense()`: context manager, dense inside (nestable).
    - `remove()`: restore the original modules exactly.
    - `last_selection()`: kept channels per layer and projection from the last sparse forward.
    - `calibrate(batches)`: fit the whitened estimator now instead of on the first batches.
    """

    def __init__(
        self,
        model: nn.Module,
        config: SparseLoRAConfig,
        blocks: dict[int, SparseBlock],
        estimator_keys: list[Key],
        weights: Mapping[Key, torch.Tensor],
        cache: EstimatorCache | None,
        fingerprint: str,
    ) -> None:
        self.model = model
        self.config = config
        self.blocks = blocks
        self.estimator: Estimator | None = None
        self.collector: CovarianceCollector | None = None
        self._estimator_keys = estimator_keys
        self._weights = weights
        self.fingerprint = fingerprint
        self.cache = cache
        self._enabled = True
        self._dense_depth = 0
        self._forward_id = 0
        self._batch: BatchState | None = None
        self._signature = inspect.signature(model.forward)
        self._hook = None
        self._head: LabelledLogits | None = None
        self._installed = False
        self._calibrating = False
        self.stats = SparsityStats()

    # -- switches ------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self._enabled

    def enable(self) -> None:
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    @contextlib.contextmanager
    def dense(self) -> Iterator[None]:
        """Run every forward inside the block densely."""
        self._dense_depth += 1
        try:
            yield
        finally:
            self._dense_depth -= 1

    @property
    def ready(self) -> bool:
        """True once the estimator exists (or no criterion needs one)."""
        return self.estimator is not None or not self._estimator_keys

    def last_selection(self) -> dict[int, dict[str, torch.Tensor]]:
        """{layer: {projection: kept indices}} of the most recent sparse forward.

        gate/up: kept output rows; down: kept input columns (the same FFN channels);
        q/k/v: kept output channels; o: kept input columns. Indices are sorted (k,) int64.
        """
        latest = self._batch.forward_id if self._batch is not None else -1
        return {
            index: dict(block.selection)
            for index, block in self.blocks.items()
            if block.selection and block._selection_forward == latest
        }

    # -- installation --------------------------------------------------------------------

    def _install(self) -> None:
        for block in self.blocks.values():
            block.install()
        self._hook = self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        if self._head is not None:
            self._head.install()
        self._installed = True

    def remove(self) -> nn.Module:
        """Restore every wrapped module's original forward; returns the model."""
        if not self._installed:
            return self.model
        for block in self.blocks.values():
            block.uninstall()
        self._hook.remove()
        if self._head is not None:
            self._head.uninstall()
        self._installed = False
        self._batch = None
        return self.model

    # -- per-forward state ---------------------------------------------------------------

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._forward_id += 1
        self._maybe_finish_calibration()
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        reference = bound.get("input_ids")
        if reference is None:
            reference = bound.get("inputs_embeds")
        if reference is None:
            self._batch = None
            return
        extra = bound.get("kwargs", {})
        reads_everything = bool(
            bound.get("output_hidden_states") or extra.get("output_hidden_states")
        )
        self._batch = self._batch_state(
            tuple(reference.shape[:2]),
            reference.device,
            bound.get("attention_mask"),
            bound.get("labels"),
            module.training,
            reads_everything,
        )

    def _batch_state(
        self, shape, device, attention_mask, labels, training: bool, reads_everything=False
    ) -> BatchState:
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            real = attention_mask.to(device=device, dtype=torch.bool)
        else:
            real = torch.ones(shape, dtype=torch.bool, device=device)
        score_mask = real if self.config.exclude_padding else torch.ones_like(real)
        unread = None
        if (
            self.config.skip_unread_last_layer
            and labels is not None
            and not reads_everything
            and self.exact_savings_active(training)
        ):
            unread = ~output_positions(labels.to(device), "dense")
        return BatchState(
            self._forward_id, shape, score_mask, self._token_split(training, labels, real), unread
        )

    def exact_savings_active(self, training: bool) -> bool:
        """Whether a forward may skip the work no loss reads (training, outside `dense()`)."""
        return self._installed and self._dense_depth == 0 and training

    def record_skipped_head(self, hidden: torch.Tensor, read: torch.Tensor, vocab: int) -> None:
        """Count the LM-head FLOPs the labelled-logits saving skipped in one forward."""
        skipped = hidden.shape[0] * hidden.shape[1] - int(read.sum())
        passes = 2 if torch.is_grad_enabled() else 1
        self.stats.flops_saved += 2 * passes * hidden.shape[-1] * vocab * skipped

    def _token_split(self, training: bool, labels, real: torch.Tensor) -> TokenSplit | None:
        if not (self._enabled and self._dense_depth == 0 and self.ready):
            return None
        if not (training or self.config.sparse_in_eval):
            return None
        if labels is None:
            return TokenSplit(torch.ones_like(real)) if self.config.sparse_without_labels else None
        if self.config.output_tokens == "sparse":
            return TokenSplit(torch.ones_like(real))
        return TokenSplit(~output_positions(labels.to(real.device), self.config.output_tokens))

    @contextlib.contextmanager
    def batch(
        self,
        shape: tuple[int, int],
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        device: torch.device | str = "cpu",
    ) -> Iterator[BatchState]:
        """Declare a micro-batch for calling wrapped blocks directly (benchmarks, research).

        Inside, `layer.mlp(x)` or `layer.self_attn.q_proj(x)` with x of shape (B, L, ...) runs
        as it would inside a training forward on that batch (sparse unless disabled).
        """
        self._forward_id += 1
        self._batch = self._batch_state(
            tuple(shape), torch.device(device), attention_mask, labels, True
        )
        try:
            yield self._batch
        finally:
            self._batch = None

    def batch_for(self, x: torch.Tensor) -> BatchState | None:
        """The current micro-batch's state if `x` (B, L, C) belongs to it, else None."""
        batch = self._batch
        if batch is None or x.dim() != 3 or tuple(x.shape[:2]) != batch.shape:
            return None
        return batch

    def observe(self, layer: int, kind: str, x: torch.Tensor, batch: BatchState | None) -> None:
        """Feed a block input to the calibration collector while one is running."""
        if self.collector is not None and batch is not None:
            self.collector.add(layer, kind, x, batch.score_mask)

    def generator(self, layer: int, part: int) -> torch.Generator:
        """Seeded per forward, layer and part, so recomputation draws the same channels."""
        seed = hash((self.config.seed, self._batch.forward_id, layer, part)) & 0x7FFFFFFF
        return torch.Generator().manual_seed(seed)

    # -- estimator -----------------------------------------------------------------------

    def set_estimator(self, estimator: Estimator) -> None:
        """Use these factors; refuse them if they were built for other weights."""
        fingerprint = self.fingerprint
        if estimator.fingerprint and estimator.fingerprint != fingerprint:
            raise EstimatorMismatchError(
                f"the estimator was built for other weights (fingerprint {estimator.fingerprint}, "
                f"this model: {fingerprint}); rebuild it for this model"
            )
        estimator.check_shapes(self._weights)
        device = next(iter(self._weights.values())).device
        self.estimator = estimator.to(device)
        self.collector = None

    def _start_calibration(self) -> None:
        self.collector = CovarianceCollector(
            (layer, "mlp" if proj in FFN_ESTIMATED else "attn")
            for layer, proj in self._estimator_keys
        )

    def _maybe_finish_calibration(self) -> None:
        collector = self.collector
        if collector is None or self._calibrating:
            return
        if collector.min_tokens() < self.config.calibration_tokens:
            return
        self._finish_calibration()

    def _finish_calibration(self) -> None:
        collector = self.collector
        logger.info("fitting whitened estimator on %d calibration tokens", collector.min_tokens())
        estimator = Estimator.build(
            self._weights,
            "whitened_svd",
            self.config.estimator_rank,
            covariances=collector.covariances(self._weights),
            damping=self.config.calibration_damping,
            model_name=getattr(self.model.config, "_name_or_path", None),
            fingerprint=self.fingerprint,
        )
        self.set_estimator(estimator)
        if self.cache is not None:
            self.cache.store(estimator)

    @torch.no_grad()
    def calibrate(self, batches: Iterable[Mapping[str, torch.Tensor]]) -> Estimator:
        """Fit the whitened estimator on `batches` (dicts of model inputs), run densely."""
        if self.config.estimator != "whitened_svd":
            raise ValueError("calibrate() is for estimator 'whitened_svd'")
        self._start_calibration()
        self._calibrating = True
        try:
            with self.dense():
                for batch in batches:
                    self.model(**{k: v for k, v in batch.items() if k != "labels"})
        finally:
            self._calibrating = False
        if self.collector.min_tokens() == 0:
            self.collector = None
            raise ValueError("calibration batches held no real tokens")
        self._finish_calibration()
        return self.estimator


def _estimator_keys(config: SparseLoRAConfig, ffn: dict, attn: dict) -> list[Key]:
    keys: list[Key] = []
    if config.ffn_criterion in ("seq_mean", "per_token"):
        keys += [(i, p) for i in ffn for p in FFN_ESTIMATED]
    if config.attn_criterion == "norm":
        keys += [(i, p) for i in attn for p in ATTN_ESTIMATED]
    return sorted(keys)


def apply_sparselora(
    model: nn.Module,
    config: SparseLoRAConfig,
    *,
    estimator: Estimator | str | os.PathLike | None = None,
    calibration: Iterable[Mapping[str, torch.Tensor]] | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> SparseLoRA:
    """Make the frozen main branch of `model` contextually sparse; returns the handle.

    model: a PEFT model (or a transformers model, with or without LoRA layers).
    estimator: factors to use (an Estimator or a file path); otherwise they come from the cache
      (`cache_dir`, default ~/.cache/sparselora/estimators) or are built: `svd` at once from
      the weights; `whitened_svd` from `calibration` batches if given, else from the first
      `config.calibration_tokens` real tokens of training (those forwards run dense).
    Raises ConfigError for layers beyond the model depth and NotImplementedError for an
    unsupported model type or LoRA variant.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    family = family_for(getattr(base.config, "model_type", None))
    layers = family.decoder_layers(base)
    ffn, attn = config.layer_sparsity(len(layers))

    last = len(layers) - 1
    wrapped = set(ffn) | set(attn) | ({last} if config.skip_unread_last_layer else set())
    modules = {i: family.block(layers[i], i, base.config) for i in sorted(wrapped)}
    for i, block in modules.items():
        targets = ([block.gate, block.up, block.down] if i in ffn else []) + (
            [block.q, block.k, block.v, block.o] if i in attn else []
        )
        for target in targets:
            base_linear(target)
            check_supported(target, f"layer {i}")

    keys = _estimator_keys(config, ffn, attn)
    weights = {(i, p): base_linear(modules[i].projection(p)).weight for i, p in keys}
    cache = EstimatorCache(cache_dir) if use_cache else None
    every_layer = [family.block(layer, i, base.config) for i, layer in enumerate(layers)]
    fingerprint = weights_fingerprint(
        {(b.index, p): base_linear(b.projection(p)).weight for b in every_layer for p in ESTIMATED}
    )
    handle = SparseLoRA(base, config, {}, keys, weights, cache, fingerprint)
    handle.blocks = {
        i: SparseBlock(
            handle, block, ffn.get(i), attn.get(i), last=i == last and config.skip_unread_last_layer
        )
        for i, block in modules.items()
    }
    parts = family.causal_lm_parts(base) if config.labelled_logits else None
    if parts is not None:
        handle._head = LabelledLogits(handle, base, *parts)

    if keys:
        _provide_estimator(handle, config, estimator, calibration, cache, weights, fingerprint)
    handle._install()
    if calibration is not None and not handle.ready:
        handle.calibrate(calibration)
    logger.info(
        "SparseLoRA on %d FFN and %d attention layers (%s estimator, rank %d)",
        len(ffn),
        len(attn),
        config.estimator,
        config.estimator_rank,
    )
    return handle


def _provide_estimator(handle, config, estimator, calibration, cache, weights, fingerprint) -> None:
    if isinstance(estimator, (str, os.PathLike)):
        estimator = Estimator.load(estimator, fingerprint=fingerprint)
    if estimator is not None:
        handle.set_estimator(estimator)
        return
    if cache is not None:
        cached = cache.load(fingerprint, config.estimator, config.estimator_rank, weights)
        if cached is not None:
            logger.info(
                "loaded estimator from cache %s",
                cache.path(fingerprint, config.estimator, config.estimator_rank),
            )
            handle.set_estimator(cached)
            return
    if config.estimator == "svd":
        built = Estimator.build(
            weights,
            "svd",
            config.estimator_rank,
            fingerprint=fingerprint,
            model_name=getattr(handle.model.config, "_name_or_path", None),
        )
        handle.set_estimator(built)
        if cache is not None:
            cache.store(built)
    elif calibration is None:
        logger.info(
            "whitened estimator: the first %d training tokens run dense to calibrate it",
            config.calibration_tokens,
        )
        handle._start_calibration()
