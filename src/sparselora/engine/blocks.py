"""Sparse execution of one decoder block: channel selection and the sparse FFN / projections.

`SparseBlock` takes over the `forward` of the block's MLP module (FFN sparsity) and of its
q/k/v/o projections (attention sparsity) on that module instance only: parameters, state_dict
keys, PEFT save/merge and FSDP wrapping are untouched, and `uninstall` restores the original
forwards. Each micro-batch's tokens are split (per token, not as a slab): the sparse set runs on
the kept channels of the frozen weights, the dense set runs the original module.

Semantics of the sparse set (the masked-dense reference in the tests computes the same thing):
- FFN: frozen gate/up produce only the kept rows, frozen down reads only the kept columns. LoRA
  branches stay dense (full width) unless `sparse_lora_branch`, which restricts them to the
  kept channels as well.
- Attention: frozen q/k/v produce only the kept output channels (zeros elsewhere), frozen o
  reads only the kept input columns; their LoRA branches are dense. RoPE and the attention core
  run unchanged on the full head dim.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from sparselora.engine import ops, selection
from sparselora.engine.models.base import BlockModules
from sparselora.engine.peft_compat import active_lora_adapters, base_linear, is_merged, lora_delta
from sparselora.engine.state import BatchState, ForwardContext, TokenSplit

ATTN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
SKIPPABLE = ("mlp", "q_proj", "o_proj")  # what the last layer skips for unread tokens


class SparseBlock:
    """The sparse FFN and/or attention of decoder layer `modules.index`."""

    def __init__(
        self,
        context: ForwardContext,
        modules: BlockModules,
        ffn_sparsity: float | None,
        attn_sparsity: float | None,
        last: bool = False,
    ) -> None:
        self.context = context
        self.config = context.config
        self.modules = modules
        self.index = modules.index
        self.ffn_sparsity = ffn_sparsity
        self.attn_sparsity = attn_sparsity
        self.last = last  # the model's last decoder layer: unread tokens skip q, o and the FFN
        self.selection: dict[str, torch.Tensor] = {}
        self._selection_forward = -1
        self._originals: dict[str, tuple[torch.nn.Module, object]] = {}
        self.targets = self._roles()  # role -> module, fixed for the block's lifetime

    # -- installation --------------------------------------------------------------------

    def _roles(self) -> dict[str, torch.nn.Module]:
        """The modules whose forward this block takes over, by role."""
        m = self.modules
        out: dict[str, torch.nn.Module] = {}
        if self.ffn_sparsity is not None:
            out["mlp"] = m.mlp
        if self.attn_sparsity is not None:
            out.update(q_proj=m.q, k_proj=m.k, v_proj=m.v, o_proj=m.o)
        if self.last:
            out["mlp"] = m.mlp
            if m.has_attention:
                out.update(q_proj=m.q, o_proj=m.o)
        return out

    def install(self) -> None:
        for role, module in self.targets.items():
            own = module.__dict__.get("forward")  # an instance-level forward (accelerate hooks)
            self._originals[role] = (module, own)
            original = module.forward
            if role == "mlp":
                module.forward = functools.partial(self._mlp_forward, original)
            else:
                module.forward = functools.partial(self._projection_forward, original, role)

    def uninstall(self) -> None:
        for module, own in self._originals.values():
            if own is None:
                del module.forward
            else:
                module.forward = own
        self._originals.clear()

    # -- wrapped forwards ----------------------------------------------------------------

    def _mlp_forward(self, original: Callable, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """x: (B, L, H) -> (B, L, H)."""
        batch = self.context.batch_for(x)
        self.context.observe(self.index, "mlp", x, batch)
        split = self._split(batch, "mlp")
        if split is None or split.all_dense or self._merged("mlp"):
            return original(x, *args, **kwargs)
        flat = x.reshape(-1, x.shape[-1])  # (B*L, H)
        if split.all_sparse:
            return self._sparse_mlp(flat, self._ffn_channels(batch, x)).view_as(x)
        y_sparse = flat.new_zeros(0, x.shape[-1])
        if split.sparse_rows.numel():
            keep = self._ffn_channels(batch, x)
            y_sparse = self._sparse_mlp(flat.index_select(0, split.sparse_rows), keep)
        y_dense = original(flat.index_select(0, split.dense_rows), *args, **kwargs)
        self._record_skipped(batch, split, "mlp")
        return split.merge(y_sparse, y_dense).view_as(x)

    def _projection_forward(
        self, original: Callable, role: str, x: torch.Tensor, *args, **kwargs
    ) -> torch.Tensor:
        """x: (B, L, in) -> (B, L, out) for one of q/k/v/o."""
        batch = self.context.batch_for(x)
        if role == "q_proj":
            self.context.observe(self.index, "attn", x, batch)
        split = self._split(batch, role)
        if split is None or split.all_dense or self._merged(role):
            return original(x, *args, **kwargs)
        module = self.targets[role]
        flat = x.reshape(-1, x.shape[-1])
        sparse_fn = self._sparse_o if role == "o_proj" else self._sparse_qkv
        if split.all_sparse:
            channels = self._attention_channels(batch, x, role)
            return sparse_fn(module, flat, channels).view(*x.shape[:-1], -1)
        y_sparse = flat.new_zeros(0, base_linear(module).out_features)
        if split.sparse_rows.numel():
            channels = self._attention_channels(batch, x, role)
            y_sparse = sparse_fn(module, flat.index_select(0, split.sparse_rows), channels)
        y_dense = original(flat.index_select(0, split.dense_rows), *args, **kwargs)
        self._record_skipped(batch, split, role)
        return split.merge(y_sparse, y_dense).view(*x.shape[:-1], -1)

    def _split(self, batch: BatchState | None, role: str) -> TokenSplit | None:
        """How `role` treats the tokens of `batch`: None means run the original module."""
        if batch is None:
            return None
        sparse = self.ffn_sparsity is not None if role == "mlp" else self.attn_sparsity is not None
        if sparse and role == "o_proj" and batch.split is not None:
            # o reads the channels q/k/v chose; if they ran dense (merged), o runs dense too.
            sparse = "o_proj" in self.selection_for(batch)
        if self.last and role in SKIPPABLE and batch.unread is not None:
            return batch.skip_split(sparse)
        return batch.split if sparse else None

    def _merged(self, role: str) -> bool:
        """A merged adapter lives in the base weight: slicing it would add the delta twice."""
        m = self.modules
        modules = (m.gate, m.up, m.down) if role == "mlp" else (m.projection(role),)
        return any(is_merged(module) for module in modules)

    # -- sparse math (tokens of the sparse set only) -------------------------------------

    def _sparse_mlp(self, xs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """xs: (n, H), keep: (k,) FFN channels -> (n, H)."""
        m = self.modules
        gate, up, down = base_linear(m.gate), base_linear(m.up), base_linear(m.down)
        g = ops.rows_linear(xs, gate.weight, gate.bias, keep)  # (n, k)
        u = ops.rows_linear(xs, up.weight, up.bias, keep)  # (n, k)
        has_lora = any(active_lora_adapters(p) for p in (m.gate, m.up, m.down))
        if self.config.sparse_lora_branch or not has_lora:
            g = _plus(g, lora_delta(m.gate, xs, out_rows=keep))
            u = _plus(u, lora_delta(m.up, xs, out_rows=keep))
            h = m.act(g) * u  # (n, k)
            y = ops.cols_linear(h, down.weight, down.bias, keep)  # (n, H)
            return _plus(y, lora_delta(m.down, h, in_cols=keep))
        # Dense LoRA branch: frozen weights on kept channels, adapters on every channel.
        width = gate.out_features
        g = _plus(ops.scatter_channels(g, keep, width), lora_delta(m.gate, xs))  # (n, I)
        u = _plus(ops.scatter_channels(u, keep, width), lora_delta(m.up, xs))  # (n, I)
        h = m.act(g) * u  # (n, I)
        y = ops.cols_linear(h.index_select(1, keep), down.weight, down.bias, keep)
        return _plus(y, lora_delta(m.down, h))

    def _sparse_qkv(self, module, xs: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        """xs: (n, H) -> (n, out): kept output channels of the frozen weight, dense LoRA."""
        base = base_linear(module)
        base_in = xs.detach() if self.config.detach_sparse_base else xs
        y = ops.rows_linear(base_in, base.weight, base.bias, channels)  # (n, k)
        y = ops.scatter_channels(y, channels, base.out_features)  # (n, out)
        return _plus(y, lora_delta(module, xs))

    def _sparse_o(self, module, xs: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """xs: (n, nh*hd) -> (n, H): kept input columns of the frozen weight, dense LoRA."""
        base = base_linear(module)
        base_in = xs.detach() if self.config.detach_sparse_base else xs
        y = ops.cols_linear(base_in.index_select(1, columns), base.weight, base.bias, columns)
        return _plus(y, lora_delta(module, xs))

    # -- selection -----------------------------------------------------------------------

    def selection_in(self, forward_id: int) -> dict[str, torch.Tensor]:
        """The channels this block kept in forward `forward_id` (empty if it chose none)."""
        return dict(self.selection) if self._selection_forward == forward_id else {}

    def selection_for(self, batch: BatchState) -> dict[str, torch.Tensor]:
        """This block's kept channels in `batch`'s forward (empty before they are chosen).

        Keyed by forward id, so a gradient-checkpointing recomputation of the same forward
        reuses the channels chosen the first time.
        """
        if self._selection_forward != batch.forward_id:
            self.selection = {}
            self._selection_forward = batch.forward_id
        return self.selection

    def _ffn_channels(self, batch: BatchState, x: torch.Tensor) -> torch.Tensor:
        chosen = self.selection_for(batch)
        if "gate_proj" not in chosen:
            start = time.perf_counter()
            with torch.no_grad():
                keep = self._choose_ffn(batch, x)
            chosen.update(gate_proj=keep, up_proj=keep, down_proj=keep)
            hidden, width = x.shape[-1], base_linear(self.modules.gate).out_features
            self._record(
                start, "ffn_kept", len(keep) / width, batch, 3 * hidden * (width - len(keep))
            )
        return chosen["gate_proj"]

    def _attention_channels(self, batch: BatchState, x: torch.Tensor, role: str) -> torch.Tensor:
        chosen = self.selection_for(batch)
        if role not in chosen:
            start = time.perf_counter()
            with torch.no_grad():
                chosen.update(self._choose_attention(batch, x))
            m = self.modules
            hidden, q_width, kv_width = (
                x.shape[-1],
                m.num_heads * m.head_dim,
                m.num_kv_heads * m.head_dim,
            )
            removed = 2 * (kv_width - len(chosen["v_proj"]))  # k rows and v rows
            if not (self.last and batch.unread is not None):  # else q and o skip these rows
                removed += 2 * (q_width - len(chosen["q_proj"]))  # q rows and o columns
            self._record(
                start, "attn_kept", len(chosen["k_proj"]) / kv_width, batch, hidden * removed
            )
        return chosen[role]

    def _record(
        self, start: float, name: str, kept: float, batch: BatchState, macs_per_token: int
    ) -> None:
        """Log one selection: its time, kept fraction and the frozen FLOPs it saves."""
        stats = self.context.stats
        stats.add("estimator_seconds", time.perf_counter() - start)
        stats.add(name, kept)
        passes = 2 if torch.is_grad_enabled() else 1  # forward, plus the input-gradient backward
        stats.flops_saved += 2 * passes * macs_per_token * batch.split.sparse_rows.numel()

    def _record_skipped(self, batch: BatchState, split: TokenSplit, role: str) -> None:
        """Count the frozen FLOPs of the rows the last layer skipped."""
        if not split.skip_rows.numel():
            return
        base = base_linear(self.modules.gate if role == "mlp" else self.targets[role])
        macs = base.in_features * base.out_features * (3 if role == "mlp" else 1)
        passes = 2 if torch.is_grad_enabled() else 1
        self.context.stats.flops_saved += 2 * passes * macs * split.skip_rows.numel()

    def _projector(self, role: str, module) -> Callable[[torch.Tensor], torch.Tensor]:
        """(T, in) float32 -> (T, out) float32: the estimator's x A B + b, or the true x W^T + b."""
        base = base_linear(module)
        if self._criterion(role) == "oracle":

            def project(p: torch.Tensor) -> torch.Tensor:
                return F.linear(p.to(base.weight.dtype), base.weight, base.bias).float()

            return project
        estimator = self.context.estimator
        if base.bias is None:
            return lambda p: estimator.project(self.index, role, p)
        bias = base.bias.float()
        return lambda p: estimator.project(self.index, role, p).add_(bias)

    def _criterion(self, role: str) -> str:
        config = self.config
        return config.ffn_criterion if role in ("gate_proj", "up_proj") else config.attn_criterion

    def _choose_ffn(self, batch: BatchState, x: torch.Tensor) -> torch.Tensor:
        m = self.modules
        width = base_linear(m.gate).out_features
        k = selection.num_kept(width, self.ffn_sparsity)
        criterion = self._criterion("gate_proj")
        if criterion == "random":
            generator = self.context.generator(self.index, 0)
            return selection.random_channels(width, k, generator).to(x.device)
        scores = selection.ffn_scores(
            x.detach().float(),
            batch.score_mask,
            self._projector("gate_proj", m.gate),
            self._projector("up_proj", m.up),
            m.act,
            per_token=criterion != "seq_mean",
            max_tokens=self.config.max_score_tokens,
        )
        return selection.top_k_sorted(scores, k)

    def _choose_attention(self, batch: BatchState, x: torch.Tensor) -> dict[str, torch.Tensor]:
        m = self.modules
        nh, nkv, hd = m.num_heads, m.num_kv_heads, m.head_dim
        k = selection.num_kept(nkv * hd, self.attn_sparsity)
        if self._criterion("q_proj") == "random":
            qk = selection.random_channels(nkv * hd, k, self.context.generator(self.index, 1))
            v = selection.random_channels(nkv * hd, k, self.context.generator(self.index, 2))
        else:
            limit = self.config.max_score_tokens
            tokens = selection.scored_tokens(x.detach(), batch.score_mask, limit).float()  # (T, H)
            q_hat = self._projector("q_proj", m.q)(tokens)  # (T, nh*hd)
            k_hat = self._projector("k_proj", m.k)(tokens)  # (T, nkv*hd)
            v_hat = self._projector("v_proj", m.v)(tokens)  # (T, nkv*hd)
            qk = selection.top_k_sorted(selection.qk_kv_scores(q_hat, k_hat, nh, nkv), k)
            v = selection.top_k_sorted(selection.v_kv_scores(v_hat), k)
        qk, v = qk.to(x.device), v.to(x.device)
        return {
            "q_proj": selection.kv_to_query_channels(qk, nh, nkv, hd),
            "k_proj": qk,
            "v_proj": v,
            "o_proj": selection.kv_to_query_channels(v, nh, nkv, hd),
        }


def _plus(y: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    """y + a LoRA delta, summed in the wider dtype and rounded once to y's, as PEFT does."""
    return y if delta is None else (y + delta).to(y.dtype)
