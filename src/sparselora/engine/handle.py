"""`apply_sparselora`: wrap the targeted blocks of one PEFT model and return a handle.

The handle registers one forward pre-hook on the transformers model (to see each micro-batch's
labels and attention mask), publishes what it learns in a `ForwardContext`, and takes over the
forward of the sparsified MLP / projection module instances (see `blocks.py`), which read that
context. Nothing is patched process-wide, no weight is copied, and `handle.remove()` restores
the model exactly. A model carries at most one installed handle. docs/ARCHITECTURE.md follows
one training forward through these objects.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from sparselora.config import ConfigError, SparseLoRAConfig
from sparselora.engine.attention import ReadRowsAttention, read_rows_core
from sparselora.engine.blocks import SparseBlock
from sparselora.engine.estimator import (
    ATTN_ESTIMATED,
    ESTIMATED,
    FFN_ESTIMATED,
    CalibrationDigest,
    CovarianceCollector,
    Estimator,
    EstimatorCache,
    EstimatorMismatchError,
    Key,
    calibration_fingerprint,
    weights_fingerprint,
)
from sparselora.engine.models import BlockModules, family_for
from sparselora.engine.peft_compat import base_linear, check_supported
from sparselora.engine.quant import float_weight
from sparselora.engine.savings import LabelledLogits
from sparselora.engine.state import BatchState, ForwardContext, TokenSplit, output_positions
from sparselora.engine.stats import SparsityStats

logger = logging.getLogger(__name__)


class SparseLoRA:
    """Handle on a model wrapped by `apply_sparselora` (which builds and installs it).

    - `enable()` / `disable()`: switch sparsity on or off (the step schedule calls these).
    - `dense()`: context manager, dense inside (nestable).
    - `remove()`: restore the original modules exactly.
    - `last_selection()`: kept channels per layer and projection from the last sparse forward.
    - `calibrate(batches)`: fit the whitened estimator now instead of on the first batches.
    - `set_estimator(estimator)`: use these factors (checked against the model's weights).
    - `batch(shape, labels)`: declare a micro-batch to call wrapped blocks directly.

    Merging LoRA adapters while the handle is installed: merged in place (`merge_adapter()`),
    the merged layers run dense (a merged weight cannot be sliced) with one warning per merge;
    replaced (`merge_and_unload()`, `unload()`), the next forward raises RuntimeError: call
    `remove()` first, then merge. Both are checked at each forward of the model (a dict lookup
    and an attribute read per wrapped module).
    """

    def __init__(
        self,
        model: nn.Module,
        context: ForwardContext,
        blocks: dict[int, SparseBlock],
        head: LabelledLogits | None,
        weights: Mapping[Key, torch.Tensor],
        fingerprint: str,
        cache: EstimatorCache | None,
        core: ReadRowsAttention | None = None,
    ) -> None:
        """Installs at once: from here on the model's targeted forwards are sparse.

        weights: the frozen weights the estimator needs factors for, by (layer, projection);
        fingerprint: of every projection weight of the model (it keys the estimator cache);
        core: the last layer's attention core on read query rows (`skip_unread_last_layer`).
        """
        self.model = model
        self.config = context.config
        self.blocks = blocks
        self.fingerprint = fingerprint
        self.cache = cache
        self._context = context
        self._head = head
        self._core = core
        self._weights = weights
        self._enabled = True
        self._dense_depth = 0
        self._forward_id = 0
        self._calibrating = False
        self._digest: CalibrationDigest | None = None
        self._next_dense_warning = 10  # warn at 10, 100, 1000, ... dense training forwards
        self._merge_warned = False
        self._signature = inspect.signature(model.forward)
        self._placements = _placements(model, blocks)
        for block in blocks.values():
            block.install()
        if head is not None:
            head.install()
        if core is not None:
            core.install()
        self._hook = model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        self._installed = True

    # -- state ---------------------------------------------------------------------------

    @property
    def stats(self) -> SparsityStats:
        """Kept fractions, estimator time, FLOPs saved and dense steps (see `SparsityStats`)."""
        return self._context.stats

    @property
    def estimator(self) -> Estimator | None:
        """The estimator in use, or None while the whitened estimator still calibrates."""
        return self._context.estimator

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def ready(self) -> bool:
        """True once the estimator exists (or no criterion needs one)."""
        return self._context.estimator is not None or not self._weights

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

    def last_selection(self) -> dict[int, dict[str, torch.Tensor]]:
        """{layer: {projection: kept indices}} of the most recent sparse forward.

        gate/up: kept output rows; down: kept input columns (the same FFN channels);
        q/k/v: kept output channels; o: kept input columns. Indices are sorted (k,) int64.
        """
        batch = self._context.batch
        latest = batch.forward_id if batch is not None else -1
        chosen = {index: block.selection_in(latest) for index, block in self.blocks.items()}
        return {index: selection for index, selection in chosen.items() if selection}

    def remove(self) -> nn.Module:
        """Restore every wrapped module's original forward; returns the model."""
        if not self._installed:
            return self.model
        for block in self.blocks.values():
            block.uninstall()
        self._hook.remove()
        if self._head is not None:
            self._head.uninstall()
        if self._core is not None:
            self._core.uninstall()
        self._installed = False
        self._context.batch = None
        return self.model

    # -- per-forward state ---------------------------------------------------------------

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._forward_id += 1
        self._check_modules()
        self._maybe_finish_calibration()
        if module.training and self._enabled and self._dense_depth == 0 and not self.ready:
            self._count_dense_step()
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        reference = bound.get("input_ids")
        if reference is None:
            reference = bound.get("inputs_embeds")
        if reference is None:
            self._context.batch = None
            return
        if self._context.collector is not None:
            self._digest.update(reference, bound.get("attention_mask"))
        extra = bound.get("kwargs", {})
        reads_everything = any(  # every position of every layer, or its attention rows
            bound.get(name) or extra.get(name)
            for name in ("output_hidden_states", "output_attentions")
        )
        self._context.batch = self._batch_state(
            tuple(reference.shape[:2]),
            reference.device,
            bound.get("attention_mask"),
            bound.get("labels"),
            module.training,
            reads_everything,
        )

    def _check_modules(self) -> None:
        """Refuse a model whose wrapped modules were replaced; warn once per merge in place."""
        for parent, name, module, qualified in self._placements:
            if parent._modules.get(name) is not module:
                raise RuntimeError(
                    f"merge while SparseLoRA is applied: {qualified} is no longer the module it "
                    "was when SparseLoRA was applied (PEFT merge_and_unload() or unload() "
                    "replaced it); call handle.remove() first, then merge"
                )
        merged = [i for i, block in self.blocks.items() if block.merged()]
        if merged and not self._merge_warned:
            logger.warning(
                "LoRA adapters are merged into the weights of layer(s) %s: SparseLoRA runs "
                "those layers dense until they are unmerged (a merged weight cannot be "
                "sliced); to merge for good, call handle.remove() first",
                merged,
            )
        self._merge_warned = bool(merged)

    def _count_dense_step(self) -> None:
        """Count a training forward that runs dense because the estimator is not ready; warn
        at 10, 100, 1000, ... of them."""
        stats = self._context.stats
        stats.dense_steps += 1
        if stats.dense_steps < self._next_dense_warning:
            return
        self._next_dense_warning *= 10
        collector = self._context.collector
        if collector is not None:
            progress = (
                f"calibration has {collector.min_tokens()} of the "
                f"{self.config.calibration_tokens} real tokens it needs in every layer"
            )
        else:
            progress = "no calibration is running: call handle.calibrate(batches)"
        logger.warning(
            "%d training forwards ran dense so far because the whitened estimator is not "
            "ready (%s)",
            stats.dense_steps,
            progress,
        )

    def _batch_state(
        self, shape, device, attention_mask, labels, training: bool, reads_everything=False
    ) -> BatchState:
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            real = attention_mask.to(device=device, dtype=torch.bool)
        else:
            real = torch.ones(shape, dtype=torch.bool, device=device)
        score_mask = real if self.config.exclude_padding else torch.ones_like(real)
        exact_savings = self._installed and self._dense_depth == 0 and training
        unread = None
        if (
            self.config.skip_unread_last_layer
            and labels is not None
            and not reads_everything
            and exact_savings
        ):
            unread = ~output_positions(labels.to(device), "dense")
        split = self._token_split(training, labels, real)
        backward = torch.is_grad_enabled()
        return BatchState(
            self._forward_id, shape, score_mask, split, unread, exact_savings, backward
        )

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
        state = self._batch_state(tuple(shape), torch.device(device), attention_mask, labels, True)
        self._context.batch = state
        try:
            yield state
        finally:
            self._context.batch = None

    # -- estimator -----------------------------------------------------------------------

    def set_estimator(self, estimator: Estimator) -> None:
        """Use these factors; refuse them if they were built for other weights."""
        self._context.estimator = _checked(estimator, self.fingerprint, self._weights)
        self._context.collector = None

    def _start_calibration(self) -> None:
        self._context.collector = CovarianceCollector(self._weights)
        self._digest = CalibrationDigest(self.config.calibration_damping)

    def _maybe_finish_calibration(self) -> None:
        collector = self._context.collector
        if collector is None or self._calibrating:
            return
        if collector.min_tokens() < self.config.calibration_tokens:
            return
        self._finish_calibration()

    def _finish_calibration(self) -> None:
        collector = self._context.collector
        logger.info("fitting whitened estimator on %d calibration tokens", collector.min_tokens())
        estimator = Estimator.build(
            self._weights,
            "whitened_svd",
            self.config.estimator_rank,
            covariances=collector.covariances(self._weights),
            damping=self.config.calibration_damping,
            model_name=getattr(self.model.config, "_name_or_path", None),
            fingerprint=self.fingerprint,
            calibration=self._digest.hexdigest(),
        )
        self.set_estimator(estimator)
        if self.cache is not None:
            self.cache.store(estimator)

    @torch.no_grad()
    def calibrate(self, batches: Iterable[Mapping[str, torch.Tensor]]) -> Estimator:
        """Fit the whitened estimator on `batches` (dicts of model inputs), run densely.

        The estimator records the `CalibrationDigest` of the batches (`estimator.calibration`)
        and is cached under it, so only a run calibrating on the same batches reuses it.
        """
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
        if self._context.collector.min_tokens() == 0:
            self._context.collector = None
            raise ValueError("calibration batches held no real tokens")
        self._finish_calibration()
        return self.estimator


def apply_sparselora(
    model: nn.Module,
    config: SparseLoRAConfig,
    *,
    estimator: Estimator | str | os.PathLike | None = None,
    calibration: Iterable[Mapping[str, torch.Tensor]] | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    reuse_calibration: bool = False,
) -> SparseLoRA:
    """Make the frozen main branch of `model` contextually sparse; returns the handle.

    model: a PEFT model (or a transformers model, with or without LoRA layers), with no
      SparseLoRA handle installed on it (call `.remove()` on the previous handle first).
    estimator: factors to use (an Estimator or a file path); otherwise they come from the cache
      (`cache_dir`, default ~/.cache/sparselora/estimators) or are built: `svd` at once from
      the weights (cached per weights); `whitened_svd` from `calibration` batches if given
      (an iterable of dicts of model inputs, read once into a list; cached per weights and
      calibration fingerprint, so only the same batches reuse it), else from the first
      `config.calibration_tokens` real tokens of training: those forwards run dense (a
      warning says so, `handle.stats` counts them as `dense_steps`).
    reuse_calibration: without `calibration` batches the training tokens are unknown up front,
      so by default no cached whitened estimator is reused; True reuses the most recently
      cached one for these weights and rank, whatever it was calibrated on (logged).
    Raises ValueError if a handle is already installed on the model, ConfigError for layers
    beyond the model depth, NotImplementedError for an unsupported model type or LoRA variant,
    EstimatorFileError for an estimator file that cannot be trusted.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if _installed_handle(base) is not None:
        raise ValueError(
            "this model already has SparseLoRA applied: call .remove() on that handle before "
            "calling apply_sparselora again"
        )
    family = family_for(getattr(base.config, "model_type", None))
    layers = family.decoder_layers(base)
    ffn, attn = config.layer_sparsity(len(layers))

    last = len(layers) - 1
    wrapped = set(ffn) | set(attn) | ({last} if config.skip_unread_last_layer else set())
    modules = {i: family.block(layers[i], i, base.config) for i in sorted(wrapped)}
    _check_attention_layers(attn, modules)
    for i, block in modules.items():
        names = (FFN_PROJECTIONS if i in ffn else ()) + (ATTN_PROJECTIONS if i in attn else ())
        for target in {id(m): m for m in map(block.projection, names)}.values():
            if _is_sharded(base_linear(target).weight):
                raise ValueError(
                    f"layer {i}: the frozen weights are already sharded (a DTensor: FSDP2's "
                    "fully_shard ran first); call apply_sparselora before fully_shard / FSDP "
                    "wrapping, on the whole weights (docs/MULTI_GPU.md)"
                )
            check_supported(target, f"layer {i}")

    weights = ProjectionWeights(modules, _estimator_keys(config, ffn, attn))
    every_layer = {i: family.block(layer, i, base.config) for i, layer in enumerate(layers)}
    fingerprint = weights_fingerprint(
        ProjectionWeights(
            every_layer,
            [(i, p) for i, b in every_layer.items() for p in ESTIMATED if b.rows(p) is not None],
        )
    )
    cache = EstimatorCache(cache_dir) if use_cache else None

    context = ForwardContext(config)
    calibration_id = None
    whitened = config.estimator == "whitened_svd"
    if weights and estimator is None and whitened and calibration is not None:
        calibration = list(calibration)  # read twice: fingerprinted, then run
        calibration_id = calibration_fingerprint(calibration, config.calibration_damping)
    if weights:
        model_name = getattr(base.config, "_name_or_path", None)
        context.estimator = _initial_estimator(
            config,
            estimator,
            cache,
            weights,
            fingerprint,
            model_name,
            calibration_id,
            reuse_calibration,
        )
    blocks = {
        i: SparseBlock(
            context,
            block,
            ffn.get(i),
            attn.get(i),
            last=i == last and config.skip_unread_last_layer,
        )
        for i, block in modules.items()
    }
    parts = family.causal_lm_parts(base) if config.labelled_logits else None
    head = LabelledLogits(context, base, parts) if parts is not None else None
    core = read_rows_core(context, modules[last]) if config.skip_unread_last_layer else None
    handle = SparseLoRA(base, context, blocks, head, weights, fingerprint, cache, core)

    if not handle.ready:
        if calibration is not None:
            handle.calibrate(calibration)
        else:
            logger.warning(
                "whitened estimator: no calibration batches given, so training forwards run "
                "dense until %d real training tokens have calibrated it (pass "
                "calibration=batches to apply_sparselora to calibrate up front)",
                config.calibration_tokens,
            )
            handle._start_calibration()
    logger.info(
        "SparseLoRA on %d FFN and %d attention layers (%s estimator, rank %d)",
        len(ffn),
        len(attn),
        config.estimator,
        config.estimator_rank,
    )
    return handle


FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
ATTN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


class ProjectionWeights(Mapping[Key, torch.Tensor]):
    """The frozen weight (out, in) of each (layer, projection), read when accessed.

    A projection that is a span of a fused module's rows (Phi-3) is a view of that weight; one
    interleaved with other rows (Qwen3.5's q) is gathered at each access, so no copy outlives
    the fit, fingerprint or shape check that reads it. Unfused: a view of the whole weight. A
    bitsandbytes 4-bit weight is dequantized at each access (in its stored dtype), so the
    estimator and the fingerprint see the float matrix the model computes with.
    """

    def __init__(self, blocks: Mapping[int, BlockModules], keys: Iterable[Key]) -> None:
        self._blocks = blocks
        self._keys = dict.fromkeys(keys)

    def __getitem__(self, key: Key) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        rows = self._blocks[key[0]].rows(key[1])
        return rows.take(float_weight(base_linear(rows.module)))

    def __iter__(self) -> Iterator[Key]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _is_sharded(weight: torch.Tensor) -> bool:
    """Whether `weight` is a DTensor shard (FSDP2) rather than the whole weight."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed support
        return False
    return isinstance(weight, DTensor)


def _installed_handle(model: nn.Module) -> SparseLoRA | None:
    """The SparseLoRA handle installed on `model` (its forward pre-hook), if any."""
    for hook in model._forward_pre_hooks.values():
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, SparseLoRA):
            return owner
    return None


def _placements(
    model: nn.Module, blocks: Mapping[int, SparseBlock]
) -> list[tuple[nn.Module, str, nn.Module, str]]:
    """(parent, attribute, module, qualified name) of every module the blocks use and of every
    PEFT adapter layer, so that each forward can check that the model still holds them (PEFT's
    merge_and_unload() and unload() replace adapter layers by their base layers)."""
    used = {id(m): m for block in blocks.values() for m in block.used_modules()}
    used.update({id(m): m for m in model.modules() if hasattr(m, "base_layer")})
    found = []
    for prefix, parent in model.named_modules():
        for name, child in parent._modules.items():
            if child is not None and id(child) in used:
                found.append((parent, name, child, f"{prefix}.{name}" if prefix else name))
    return found


def _check_attention_layers(attn: Mapping[int, float], modules: Mapping[int, BlockModules]) -> None:
    """Refuse attention sparsity on a layer without standard attention of its own."""
    refused = {i: modules[i].no_attention for i in attn if not modules[i].has_attention}
    if refused:
        with_attention = [i for i, m in modules.items() if m.has_attention]
        raise ConfigError(
            "attn_sparsity names layer(s) without standard attention of their own: "
            + ", ".join(f"{i} ({why})" for i, why in refused.items())
            + f"; attention sparsity applies to softmax-attention layers only (of the layers "
            f"named here: {with_attention or 'none'}). Remove them from attn_sparsity."
        )


def _estimator_keys(config: SparseLoRAConfig, ffn: dict, attn: dict) -> list[Key]:
    """The (layer, projection) pairs whose channels an estimator scores under `config`."""
    keys: list[Key] = []
    if config.ffn_criterion in ("seq_mean", "per_token"):
        keys += [(i, p) for i in ffn for p in FFN_ESTIMATED]
    if config.attn_criterion == "norm":
        keys += [(i, p) for i in attn for p in ATTN_ESTIMATED]
    return sorted(keys)


def _initial_estimator(
    config: SparseLoRAConfig,
    given: Estimator | str | os.PathLike | None,
    cache: EstimatorCache | None,
    weights: Mapping[Key, torch.Tensor],
    fingerprint: str,
    model_name: str | None,
    calibration_id: str | None = None,
    reuse_calibration: bool = False,
) -> Estimator | None:
    """The estimator to start with: the one given, a cached one, or an `svd` one built now.

    A cached `whitened_svd` estimator is used if it was calibrated on the batches whose
    fingerprint is `calibration_id`, or, without batches, only with `reuse_calibration`.
    None means the whitened estimator must first be calibrated on real inputs.
    """
    if isinstance(given, (str, os.PathLike)):
        given = Estimator.load(given, fingerprint=fingerprint)
    if given is not None:
        return _checked(given, fingerprint, weights)
    kind, rank = config.estimator, config.estimator_rank
    cached = None
    if cache is not None and kind == "svd":
        cached = cache.load(fingerprint, kind, rank, weights)
    elif cache is not None and calibration_id is not None:
        cached = cache.load(fingerprint, kind, rank, weights, calibration=calibration_id)
    elif cache is not None and reuse_calibration:
        cached = cache.latest(fingerprint, kind, rank, weights)
    if cached is not None:
        path = cache.path(fingerprint, kind, rank, cached.calibration)
        logger.info("loaded estimator from cache %s", path)
        if calibration_id is None and kind != "svd":
            logger.warning(
                "reuse_calibration: reusing the cached whitened estimator calibrated on data "
                "with fingerprint %s, not on this run's training tokens",
                cached.calibration,
            )
        return _checked(cached, fingerprint, weights)
    if config.estimator != "svd":
        return None
    built = Estimator.build(
        weights, "svd", config.estimator_rank, fingerprint=fingerprint, model_name=model_name
    )
    if cache is not None:
        cache.store(built)
    return _checked(built, fingerprint, weights)


def _checked(
    estimator: Estimator, fingerprint: str, weights: Mapping[Key, torch.Tensor]
) -> Estimator:
    """`estimator` on the weights' device, if it was built for these weights; else an error."""
    if estimator.fingerprint and estimator.fingerprint != fingerprint:
        raise EstimatorMismatchError(
            f"the estimator was built for other weights (fingerprint {estimator.fingerprint}, "
            f"this model: {fingerprint}); rebuild it for this model"
        )
    estimator.check_shapes(weights)
    return estimator.to(next(iter(weights.values())).device)
