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

Fused projections (`Rows` in `BlockModules`): a module that computes several projections
(Phi-3's `qkv_proj`, `gate_up_proj`) is wrapped once and computes, in one matmul, the kept
channels of each at its own rows, plus the rows no projection owns (Qwen3.5's attention output
gate); its LoRA delta is the fused module's (dense on its full width, or on the same rows with
`sparse_lora_branch`). An unfused projection is the one-part case: its kept channels are its
rows, used as they are.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from sparselora.engine import ops, selection
from sparselora.engine.models.base import BlockModules, Rows
from sparselora.engine.peft_compat import (
    active_lora_adapters,
    base_linear,
    dora_adapter,
    is_merged,
    plus_adapters,
)
from sparselora.engine.quant import float_weight, frozen_weight
from sparselora.engine.state import BatchState, ForwardContext, TokenSplit

ROW_PROJECTIONS = ("q_proj", "k_proj", "v_proj")  # attention projections with kept output rows
FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


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
        self.gate, self.up = modules.rows("gate_proj"), modules.rows("up_proj")
        self.ffn_width = self.gate.width  # I, the FFN channels
        # q/k/v grouped by the module that computes them, each group named after its first
        # projection: {"q_proj": (("q_proj", Rows), ...), ...}; Phi-3's qkv_proj is "q_proj".
        self.row_parts: dict[str, tuple[tuple[str, Rows], ...]] = {}
        if self.attn_sparsity is not None or (last and modules.has_attention):
            self.row_parts = _group_by_module(modules)
        # Rows of a q/k/v module that no projection owns: computed dense for every token.
        self.unowned = {
            name: rows
            for name, parts in self.row_parts.items()
            if (rows := _unowned_rows(parts)) is not None
        }
        # The last layer skips a module's unread rows only if nothing there but q needs them.
        self.skippable = {"mlp", "o_proj"} | {
            name for name, parts in self.row_parts.items() if [p for p, _ in parts] == ["q_proj"]
        }
        self.targets = self._targets()  # name -> module, fixed for the block's lifetime
        # The MLP's dense tokens run through `_dense_mlp` when `_own_dense_mlp` allows.
        self._ffn_modules = tuple(modules.projection(p) for p in FFN_PROJECTIONS)
        self._unfused_mlp = self.gate.module is not self.up.module
        self._used = self._used_modules()
        self._adapted = tuple(m for m in self._used if hasattr(m, "base_layer"))  # PEFT layers

    # -- installation --------------------------------------------------------------------

    def _targets(self) -> dict[str, torch.nn.Module]:
        """The modules whose forward this block takes over: "mlp", "o_proj" and the q/k/v
        modules by their `row_parts` name."""
        m = self.modules
        out: dict[str, torch.nn.Module] = {}
        if self.ffn_sparsity is not None or self.last:
            out["mlp"] = m.mlp
        attention = self.attn_sparsity is not None
        if attention or (self.last and m.has_attention):
            for name, parts in self.row_parts.items():
                if attention or name in self.skippable:
                    out[name] = parts[0][1].module
            out["o_proj"] = m.o
        return out

    def _used_modules(self) -> tuple[torch.nn.Module, ...]:
        """The targets and, under a wrapped MLP, the modules computing gate, up and down."""
        used = dict.fromkeys(self.targets.values())
        if "mlp" in self.targets:
            used.update(dict.fromkeys(map(self.modules.projection, FFN_PROJECTIONS)))
        return tuple(used)

    def used_modules(self) -> tuple[torch.nn.Module, ...]:
        """Every module this block wraps or computes with; a merge must not replace them."""
        return self._used

    def merged(self) -> bool:
        """Whether a LoRA adapter is merged into a module of this block (those run dense)."""
        return any(is_merged(module) for module in self._adapted)

    def install(self) -> None:
        for name, module in self.targets.items():
            own = module.__dict__.get("forward")  # an instance-level forward (accelerate hooks)
            self._originals[name] = (module, own)
            original = module.forward
            if name == "mlp":
                module.forward = functools.partial(self._mlp_forward, original)
            else:
                module.forward = functools.partial(self._projection_forward, original, name)

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
        x_dense = flat.index_select(0, split.dense_rows)
        if self._own_dense_mlp():
            y_dense = self._dense_mlp(x_dense)
        else:
            y_dense = original(x_dense, *args, **kwargs)
        self._record_skipped(batch, split, "mlp")
        return split.merge(y_sparse, y_dense).view_as(x)

    def _projection_forward(
        self, original: Callable, name: str, x: torch.Tensor, *args, **kwargs
    ) -> torch.Tensor:
        """x: (B, L, in) -> (B, L, out) for o or a module computing q, k and/or v."""
        batch = self.context.batch_for(x)
        if name == "q_proj":
            self.context.observe(self.index, "attn", x, batch)
        split = self._split(batch, name)
        if split is None or split.all_dense or self._merged(name):
            return original(x, *args, **kwargs)
        module = self.targets[name]
        flat = x.reshape(-1, x.shape[-1])
        sparse_fn = self._sparse_o if name == "o_proj" else self._sparse_rows
        if split.all_sparse:
            channels = self._kept(batch, x, name)
            return sparse_fn(module, flat, channels).view(*x.shape[:-1], -1)
        y_sparse = flat.new_zeros(0, base_linear(module).out_features)
        if split.sparse_rows.numel():
            channels = self._kept(batch, x, name)
            y_sparse = sparse_fn(module, flat.index_select(0, split.sparse_rows), channels)
        x_dense = flat.index_select(0, split.dense_rows)
        if not args and not kwargs and _computable(module):
            y_dense = ops.frozen_linear(x_dense, base_linear(module))
            y_dense = plus_adapters(module, y_dense, x_dense)
        else:
            y_dense = original(x_dense, *args, **kwargs)
        self._record_skipped(batch, split, name)
        return split.merge(y_sparse, y_dense).view(*x.shape[:-1], -1)

    def _split(self, batch: BatchState | None, name: str) -> TokenSplit | None:
        """How target `name` treats the tokens of `batch`: None means run the original module."""
        if batch is None:
            return None
        sparse = self.ffn_sparsity is not None if name == "mlp" else self.attn_sparsity is not None
        if sparse and name == "o_proj" and batch.split is not None:
            # o reads the channels q/k/v chose; if they ran dense (merged), o runs dense too.
            sparse = "o_proj" in self.selection_for(batch)
        if self.last and name in self.skippable and batch.unread is not None:
            return batch.skip_split(sparse)
        return batch.split if sparse else None

    def _merged(self, name: str) -> bool:
        """A merged adapter lives in the base weight: slicing it would add the delta twice."""
        m = self.modules
        if name == "mlp":
            modules = [m.projection(p) for p in FFN_PROJECTIONS]
        else:
            modules = [self.targets[name]]
        return any(is_merged(module) for module in modules)

    def _kept(self, batch: BatchState, x: torch.Tensor, name: str) -> torch.Tensor:
        """(k,) what target `name` computes on sparse tokens: o's kept input columns, or the
        rows of a q/k/v module: each projection's kept channels at its rows, plus unowned rows."""
        if name == "o_proj":
            return self._attention_channels(batch, x, "o_proj")
        parts = self.row_parts[name]
        if len(parts) == 1 and name not in self.unowned:
            role, rows = parts[0]
            return rows.rows_of(self._attention_channels(batch, x, role))
        kept = [rows.rows_of(self._attention_channels(batch, x, role)) for role, rows in parts]
        if name in self.unowned:
            kept.append(self.unowned[name])
        return torch.cat(kept).sort().values  # ascending: gathers read the weight in order

    # -- sparse math (tokens of the sparse set only) -------------------------------------

    def _sparse_mlp(self, xs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """xs: (n, H), keep: (k,) FFN channels -> (n, H)."""
        m = self.modules
        down = base_linear(m.down)
        ffn = (m.projection(p) for p in ("gate_proj", "up_proj", "down_proj"))
        dense_lora = not self.config.sparse_lora_branch and any(map(active_lora_adapters, ffn))
        g, u = self._gate_up(xs, keep, dense_lora)  # (n, k) each, or (n, I) with dense LoRA
        h = m.act(g) * u
        if not dense_lora:
            y = ops.cols_linear(h, frozen_weight(down), down.bias, keep)  # (n, H)
            return plus_adapters(m.down, y, h, in_cols=keep)
        # Dense LoRA branch: frozen weights on kept channels, adapters on every channel.
        y = ops.cols_linear(h.index_select(1, keep), frozen_weight(down), down.bias, keep)
        return plus_adapters(m.down, y, h)

    def _own_dense_mlp(self) -> bool:
        """Whether `_dense_mlp` computes what the original MLP would: separate gate and up,
        plain LoRA (or none), and no module hooks that calling the modules would run."""
        return self._unfused_mlp and all(map(_computable, self._ffn_modules))

    def _dense_mlp(self, xd: torch.Tensor) -> torch.Tensor:
        """xd: (n, H) -> (n, H), the whole MLP for the dense tokens as the original module
        computes it, with each frozen GEMM through `ops.frozen_linear`."""
        gate, up, down = self._ffn_modules
        g = plus_adapters(gate, ops.frozen_linear(xd, base_linear(gate)), xd)
        u = plus_adapters(up, ops.frozen_linear(xd, base_linear(up)), xd)
        h = self.modules.act(g) * u
        return plus_adapters(down, ops.frozen_linear(h, base_linear(down)), h)

    def _gate_up(
        self, xs: torch.Tensor, keep: torch.Tensor, dense_lora: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate and up outputs on the kept channels (frozen weight plus LoRA): (n, k) each with
        LoRA on those channels only; with `dense_lora`, (n, I) each, zeros at the frozen
        weight's other channels plus the LoRA delta on all of them. A fused gate_up runs once."""
        gate, up = self.gate, self.up
        if gate.module is not up.module:  # one gather and one GEMM for both frozen weights
            gate_rows, up_rows = gate.rows_of(keep), up.rows_of(keep)
            gate_base, up_base = base_linear(gate.module), base_linear(up.module)
            both = ops.stacked_rows_linear(
                xs,
                (
                    (frozen_weight(gate_base), gate_base.bias, gate_rows),
                    (frozen_weight(up_base), up_base.bias, up_rows),
                ),
            )  # (n, 2k)
            g, u = both.split(keep.numel(), dim=1)
            g = plus_adapters(gate.module, g, xs, rows=gate_rows, full_width=dense_lora)
            u = plus_adapters(up.module, u, xs, rows=up_rows, full_width=dense_lora)
            return (gate.take(g, 1), up.take(u, 1)) if dense_lora else (g, u)
        rows = torch.cat([gate.rows_of(keep), up.rows_of(keep)])
        both = _rows_output(gate.module, xs, rows, dense_lora)  # (n, 2k), or (n, out) fused
        if dense_lora:
            return gate.take(both, 1), up.take(both, 1)
        g, u = both.split(keep.numel(), dim=1)
        return g, u

    def _sparse_rows(self, module, xs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """xs: (n, H) -> (n, out): kept output rows of the frozen weight, dense LoRA."""
        base = base_linear(module)
        base_in = xs.detach() if self.config.detach_sparse_base else xs
        y = ops.rows_linear(base_in, frozen_weight(base), base.bias, rows)  # (n, k)
        return plus_adapters(module, y, xs, rows=rows, full_width=True)  # (n, out)

    def _sparse_o(self, module, xs: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """xs: (n, nh*hd) -> (n, H): kept input columns of the frozen weight, dense LoRA."""
        base = base_linear(module)
        base_in = xs.detach() if self.config.detach_sparse_base else xs
        y = ops.cols_linear(
            base_in.index_select(1, columns), frozen_weight(base), base.bias, columns
        )
        return plus_adapters(module, y, xs)

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
            hidden, width = x.shape[-1], self.ffn_width
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
            skipping = self.last and batch.unread is not None  # unread rows skip q and o
            if not (skipping and "q_proj" in self.skippable):
                removed += q_width - len(chosen["q_proj"])  # q rows
            if not skipping:
                removed += q_width - len(chosen["o_proj"])  # o columns
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
        stats.flops_saved += 2 * batch.passes * macs_per_token * batch.split.sparse_rows.numel()

    def _record_skipped(self, batch: BatchState, split: TokenSplit, name: str) -> None:
        """Count the FLOPs of the rows the last layer skipped, once per forward: the frozen
        projections (forward and input gradient) and their LoRA branches (forward, and
        backward dA, dB, dh and dx: twice the forward)."""
        if not split.skip_rows.numel() or not batch.first_count(f"skip {self.index} {name}"):
            return
        if name == "mlp":
            modules = dict.fromkeys(map(self.modules.projection, FFN_PROJECTIONS))
            frozen = 3 * base_linear(self.gate.module).in_features * self.ffn_width
        else:
            modules = (self.targets[name],)
            base = base_linear(self.targets[name])
            frozen = base.in_features * base.out_features
        lora = 0
        for module in modules:
            base = base_linear(module)
            for adapter in active_lora_adapters(module):
                rank = module.lora_A[adapter].out_features
                lora += rank * (base.in_features + base.out_features)
        per_token = frozen * batch.passes + lora * (3 if batch.backward else 1)
        self.context.stats.flops_saved += 2 * per_token * split.skip_rows.numel()

    def _projector(self, role: str, rows: Rows) -> Callable[[torch.Tensor], torch.Tensor]:
        """(T, in) float32 -> (T, out) float32: the estimator's x A B + b, or the true x W^T + b,
        for projection `role` (its rows of a fused module)."""
        base = base_linear(rows.module)
        bias = None if base.bias is None else rows.take(base.bias)
        if self._criterion(role) == "oracle":

            def project(p: torch.Tensor) -> torch.Tensor:
                weight = rows.take(float_weight(base))
                return F.linear(p.to(weight.dtype), weight, bias).float()

            return project
        estimator = self.context.estimator
        if bias is None:
            return lambda p: estimator.project(self.index, role, p)
        bias = bias.float()
        return lambda p: estimator.project(self.index, role, p).add_(bias)

    def _criterion(self, role: str) -> str:
        config = self.config
        return config.ffn_criterion if role in ("gate_proj", "up_proj") else config.attn_criterion

    def _choose_ffn(self, batch: BatchState, x: torch.Tensor) -> torch.Tensor:
        m = self.modules
        width = self.ffn_width
        k = selection.num_kept(width, self.ffn_sparsity)
        criterion = self._criterion("gate_proj")
        if criterion == "random":
            generator = self.context.generator(self.index, 0)
            return selection.random_channels(width, k, generator).to(x.device)
        scores = selection.ffn_scores(
            x.detach().float(),
            batch.score_mask,
            self._projector("gate_proj", self.gate),
            self._projector("up_proj", self.up),
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
            q_hat = self._projector("q_proj", m.rows("q_proj"))(tokens)  # (T, nh*hd)
            k_hat = self._projector("k_proj", m.rows("k_proj"))(tokens)  # (T, nkv*hd)
            v_hat = self._projector("v_proj", m.rows("v_proj"))(tokens)  # (T, nkv*hd)
            qk = selection.top_k_sorted(selection.qk_kv_scores(q_hat, k_hat, nh, nkv), k)
            v = selection.top_k_sorted(selection.v_kv_scores(v_hat), k)
        qk, v = qk.to(x.device), v.to(x.device)
        return {
            "q_proj": selection.kv_to_query_channels(qk, nh, nkv, hd),
            "k_proj": qk,
            "v_proj": v,
            "o_proj": selection.kv_to_query_channels(v, nh, nkv, hd),
        }


def _computable(module: torch.nn.Module) -> bool:
    """Whether frozen base plus `plus_adapters` computes what calling `module` computes: a float
    nn.Linear base (a 4-bit one keeps PEFT's own casts), plain LoRA (or none), and no module
    hooks, which calling the module would run."""
    base = base_linear(module)
    return type(base) is torch.nn.Linear and not (
        dora_adapter(module) or ops.has_hooks(module) or ops.has_hooks(base)
    )


def _rows_output(
    module: torch.nn.Module, xs: torch.Tensor, rows: torch.Tensor, dense_lora: bool
) -> torch.Tensor:
    """xs (n, in) -> the frozen weight's `rows` (k,) plus LoRA: (n, k) with the LoRA delta on
    those rows only, or with `dense_lora` (n, out), zeros at the other rows plus the full delta."""
    base = base_linear(module)
    y = ops.rows_linear(xs, frozen_weight(base), base.bias, rows)  # (n, k)
    return plus_adapters(module, y, xs, rows=rows, full_width=dense_lora)


def _group_by_module(modules: BlockModules) -> dict[str, tuple[tuple[str, Rows], ...]]:
    """q, k and v grouped by the module that computes them, each group named after its first
    projection (separate modules: q_proj, k_proj, v_proj; Phi-3's fused qkv_proj: q_proj)."""
    groups: dict[int, list[tuple[str, Rows]]] = {}
    for role in ROW_PROJECTIONS:
        rows = modules.rows(role)
        groups.setdefault(id(rows.module), []).append((role, rows))
    return {parts[0][0]: tuple(parts) for parts in groups.values()}


def _unowned_rows(parts: tuple[tuple[str, Rows], ...]) -> torch.Tensor | None:
    """The rows of the parts' module that none of them owns (Qwen3.5's output gate), (u,) on
    the weight's device; None when the projections cover every row."""
    base = base_linear(parts[0][1].module)
    owned = torch.zeros(base.out_features, dtype=torch.bool)
    for _, rows in parts:
        owned[rows.rows_of(torch.arange(rows.width))] = True
    if bool(owned.all()):
        return None
    return (~owned).nonzero().squeeze(1).to(base.weight.device)
