"""The last layer's attention core on the query rows some loss reads (an exact saving).

In the last decoder layer the output at a position is read only by the LM head at that
position, so its attention core needs the query rows of the read positions only; the keys and
values of every token stay (the read rows attend to them). transformers' attention modules
call their core as `ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
eager_attention_forward)(self, q, k, v, mask, ...)`. `ReadRowsAttention.install` registers
`read_rows_attention` under the name `READ_ROWS` in transformers' `AttentionInterface` (its
documented extension point: one new name, no existing entry changed) and gives the last
layer's attention module, that instance only, a shallow copy of its config whose
`_attn_implementation` is `READ_ROWS`. Every other module keeps the model's config object;
`uninstall` puts it back on the last one too.

`read_rows_attention` runs the implementation the model's config names at the time of the call
(so `set_attn_implementation` keeps working): on every row, unless the call is one it can make
exact, namely
- a training forward with unread positions (`BatchState.unread`, set by the handle) whose
  queries and keys span the micro-batch (no cache);
- implementation `sdpa` or `eager` (the model file's own `eager_attention_forward`, with its
  soft-capping). Flash and flex kernels take padding and causality in other forms: they run
  every row;
- no attention dropout (fewer rows would draw other dropout masks), no attention weights
  requested, no `position_bias`; a mask that is None or 4-D with one row per query (or one
  row broadcast over all).
Then it gathers the n read positions (`BatchState.read_positions`, the union over the batch)
from the queries, takes the same rows of the mask, runs the same implementation on the
(B, nh, n, hd) queries and scatters its (B, n, nh, hd) output into zeros at the other
positions. A None mask with `sdpa` means causal through `is_causal`, which torch aligns
top-left when there are fewer queries than keys (wrong here), so a boolean causal mask of the
n rows replaces it. The unread rows' zeros reach no loss: the last layer's o_proj skips those
rows, and its output there is read by nothing, so loss and gradients are unchanged. The
returned attention weights are None on this path.
"""

from __future__ import annotations

import copy
import inspect
import weakref
from collections.abc import Callable

import torch
from torch import nn
from transformers import AttentionInterface

from sparselora.engine.models.base import BlockModules
from sparselora.engine.state import ForwardContext

READ_ROWS = "sparselora_read_rows"
EXACT_IMPLEMENTATIONS = ("sdpa", "eager")  # the cores that can run on a subset of query rows

# The installed core of each attention module whose config names READ_ROWS.
_INSTALLED: weakref.WeakKeyDictionary[nn.Module, ReadRowsAttention] = weakref.WeakKeyDictionary()


def read_rows_attention(
    module: nn.Module, *args, **kwargs
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention function registered as `READ_ROWS`: `module`'s installed core
    (`ReadRowsAttention.__call__`, same arguments)."""
    core = _INSTALLED.get(module)
    if core is None:
        raise RuntimeError(
            f"{type(module).__name__}'s config names attention implementation {READ_ROWS!r}, "
            "but no SparseLoRA handle is installed on it (a copy of a model with SparseLoRA "
            "applied?): call handle.remove() before copying the model"
        )
    return core(module, *args, **kwargs)


def read_rows_core(context: ForwardContext, modules: BlockModules) -> ReadRowsAttention | None:
    """The read-rows core for the last decoder layer `modules`; None where the layer has no
    softmax-attention module, or its model file no attention registry and eager core through
    which to run the core as the module itself does."""
    if modules.attention is None:
        return None
    model_file = inspect.getmodule(type(modules.attention))
    interface = getattr(model_file, "ALL_ATTENTION_FUNCTIONS", None)
    eager = getattr(model_file, "eager_attention_forward", None)
    if interface is None or eager is None:
        return None
    return ReadRowsAttention(context, modules.attention, modules.index, interface, eager)


class ReadRowsAttention:
    """The attention core of the last decoder layer, on the read query rows when exact.

    attention: layer `index`'s attention module; interface and eager: its model file's
    `ALL_ATTENTION_FUNCTIONS` and `eager_attention_forward`, through which the module itself
    finds its core (eager: the one run for "eager").
    """

    def __init__(
        self,
        context: ForwardContext,
        attention: nn.Module,
        index: int,
        interface: AttentionInterface,
        eager: Callable,
    ) -> None:
        self.context = context
        self.attention = attention
        self.index = index
        self.interface = interface
        self.eager = eager
        self._config = None  # the module's own config while installed

    def install(self) -> None:
        AttentionInterface.register(READ_ROWS, read_rows_attention)
        config = self.attention.config
        view = copy.copy(config)
        # The stored value, not the property's setter: that one also sets the sub-configs,
        # which the shallow copy shares with the model's config.
        view._attn_implementation_internal = READ_ROWS
        self._config = config
        self.attention.config = view
        _INSTALLED[self.attention] = self

    def uninstall(self) -> None:
        if self._config is None:
            return
        self.attention.config = self._config
        self._config = None
        _INSTALLED.pop(self.attention, None)

    def __call__(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """query (B, nh, L, hd), key and value (B, nkv, L, hd), attention_mask None or
        (B or 1, 1 or nh, L or 1, L) -> (B, L, nh, hd_v) and the attention weights (None when
        only the read rows ran)."""
        implementation = self._config._attn_implementation
        original = self.interface.get_interface(implementation, self.eager)
        rows = self._read_rows(implementation, query, key, attention_mask, kwargs)
        if rows is None:
            return original(module, query, key, value, attention_mask, **kwargs)
        mask = self._row_mask(module, implementation, attention_mask, rows, kwargs)
        out, _ = original(module, query.index_select(2, rows), key, value, mask, **kwargs)
        self._record(query, value, rows)
        full = out.new_zeros(out.shape[0], query.shape[2], *out.shape[2:])  # (B, L, nh, hd_v)
        return full.index_copy(1, rows, out), None

    def _read_rows(
        self,
        implementation: str | None,
        query: torch.Tensor,
        key: torch.Tensor,
        mask: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor | None:
        """(n,) the query rows to compute, or None to compute every row (module docstring)."""
        batch = self.context.batch
        if batch is None or batch.unread is None or implementation not in EXACT_IMPLEMENTATIONS:
            return None
        size, length = batch.shape
        if query.dim() != 4 or (query.shape[0], query.shape[2], key.shape[2]) != (
            size,
            length,
            length,
        ):
            return None
        if kwargs.get("dropout") or kwargs.get("output_attentions"):
            return None
        if kwargs.get("position_bias") is not None:
            return None
        if mask is not None and (mask.dim() != 4 or mask.shape[-2] not in (1, length)):
            return None
        rows = batch.read_positions()
        if not 0 < rows.numel() < length:
            return None
        return rows.to(query.device)

    def _row_mask(
        self,
        module: nn.Module,
        implementation: str,
        mask: torch.Tensor | None,
        rows: torch.Tensor,
        kwargs: dict,
    ) -> torch.Tensor | None:
        """The mask of the query rows `rows` (n,), as the full call would have applied it."""
        if mask is not None:
            return mask if mask.shape[-2] == 1 else mask.index_select(-2, rows)
        is_causal = kwargs.get("is_causal")
        if is_causal is None:
            is_causal = getattr(module, "is_causal", True)
        if implementation != "sdpa" or not is_causal:
            return None  # eager without a mask, or non-causal sdpa: every key, as before
        keys = torch.arange(self.context.batch.shape[1], device=rows.device)
        return (keys[None, :] <= rows[:, None])[None, None]  # (1, 1, n, L), True: attended

    def _record(self, query: torch.Tensor, value: torch.Tensor, rows: torch.Tensor) -> None:
        """Count the skipped rows' QK^T and AV, forward and (2x) backward, once per forward."""
        batch = self.context.batch
        if not batch.first_count(f"core {self.index}"):
            return
        size, heads, length, head_dim = query.shape
        skipped = length - rows.numel()
        forward = 2 * size * heads * skipped * length * (head_dim + value.shape[-1])
        self.context.stats.flops_saved += forward * (3 if batch.backward else 1)
