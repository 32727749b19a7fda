"""The parts model: one decoder layer of each *kind* of a SparseLoRA layer pattern, with the LM
head, the optimizer and the inputs, each a separately timed `Part` of one training step.

A kind is (FFN sparsity, attention sparsity, last layer). The last layer is its own kind because
the handle skips its q, o_proj and FFN on positions no loss reads (`skip_unread_last_layer`).
The parts model is a `LlamaForCausalLM` of the full model's shape with one decoder layer per
kind (the last kind last, so the handle treats it as the last layer) and random weights, wrapped
in PEFT LoRA and `apply_sparselora` with each kind's sparsity on its parts layer. Its parts:

- each layer, timed forward + backward on an input x (B, L, H) that requires grad (upstream
  layers carry LoRA), with a fixed random output gradient, inside `handle.batch(...)` so it runs
  as in a training forward;
- the final norm, LM head and loss on hidden states (B, L, H) that require grad: LoRA computes
  the logits at every position and transformers' causal-LM loss; SparseLoRA, with
  `labelled_logits`, only at the positions whose next token is labelled
  (`sparselora.engine.savings`);
- AdamW's step and `zero_grad` over LoRA parameters of the shapes of the FULL model (every
  layer's adapters, same rank and targets);
- the embedding lookup with the RoPE tables and the attention mask (forward only).

`sparselora.perf.composed` times them and composes the step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM

from sparselora.config import SparseLoRAConfig
from sparselora.engine.savings import labelled_loss
from sparselora.engine.shapes import ModelShape
from sparselora.perf.common import (
    BenchShape,
    MeasureConfig,
    add_lora_and_sparselora,
    parse_shape,
    synthetic_batch,
)
from sparselora.recipes.loading import llama_config

# -- layer kinds -------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerKind:
    """What decides a decoder layer's cost: its FFN and attention sparsity (None: dense) and
    whether it is the last layer with the unread-position saving on."""

    ffn_sparsity: float | None
    attn_sparsity: float | None
    last: bool

    @property
    def label(self) -> str:
        blocks = []
        if self.ffn_sparsity is not None:
            blocks.append(f"FFN {self.ffn_sparsity:g}")
        if self.attn_sparsity is not None:
            blocks.append(f"attn {self.attn_sparsity:g}")
        text = " + ".join(blocks) or "dense"
        return f"{text}, last layer" if self.last else text

    @property
    def dense(self) -> bool:
        return self == LayerKind(None, None, False)


def layer_kinds(config: SparseLoRAConfig, num_layers: int) -> dict[LayerKind, list[int]]:
    """{kind: full-model layer indices}, kinds in order of first appearance (so the last-layer
    kind, when `skip_unread_last_layer` makes one, comes last)."""
    ffn, attn = config.layer_sparsity(num_layers)
    kinds: dict[LayerKind, list[int]] = {}
    for layer in range(num_layers):
        last = config.skip_unread_last_layer and layer == num_layers - 1
        kinds.setdefault(LayerKind(ffn.get(layer), attn.get(layer), last), []).append(layer)
    return kinds


def layer_spec(layers: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def parts_config(config: SparseLoRAConfig, kinds: Sequence[LayerKind]) -> SparseLoRAConfig:
    """`config` with parts layer i holding kind i's sparsity (other fields unchanged)."""
    return dataclasses.replace(
        config,
        ffn_sparsity={str(i): k.ffn_sparsity for i, k in enumerate(kinds) if k.ffn_sparsity},
        attn_sparsity={str(i): k.attn_sparsity for i, k in enumerate(kinds) if k.attn_sparsity},
    )


# -- parts -------------------------------------------------------------------------------


@dataclass
class Part:
    """One timed unit of a training step, `count` times in the full model.

    `run()` is the timed work: LoRA under `handle.dense()`, SparseLoRA otherwise. `reset()`
    (untimed, before each run) drops the gradients the previous run left, as `zero_grad` does.
    Layer parts also have `forward()`: the layer's output (B, L, H) on its input `x` (B, L, H)
    and the channels the handle chose in it, for `PartsModel.check_sparse_path`.
    """

    part: str
    label: str
    count: int
    run: Callable[[], None]
    reset: Callable[[], None]
    kind: LayerKind | None = None
    layers: list[int] = field(default_factory=list)
    forward: Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor]]] | None = None
    x: torch.Tensor | None = None


class PartsModel:
    """The parts model of `config` (one decoder layer per kind) wrapped in LoRA and SparseLoRA.

    `model_shape` is the full model's; `lora_parameters` counts the full model's adapters.
    """

    def __init__(
        self,
        config: MeasureConfig,
        sparse_config: SparseLoRAConfig,
        model_shape: ModelShape,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.config, self.model_shape, self.device = config, model_shape, device
        self.kinds = layer_kinds(sparse_config, model_shape.num_layers)
        shape = dataclasses.replace(model_shape, num_layers=len(self.kinds))
        torch.manual_seed(config.seed)
        with device:
            model = AutoModelForCausalLM.from_config(
                llama_config(shape), dtype=dtype, attn_implementation=config.attn_implementation
            )
        self.model = model.to(device).train()  # the LlamaForCausalLM inside the PEFT wrapper
        _, self.handle, self.setup_seconds = add_lora_and_sparselora(
            self.model,
            config,
            parts_config(sparse_config, list(self.kinds)),
            shape.vocab_size,
            parse_shape(config.shapes[0]),
            device,
        )
        self.lora_parameters = sum(size.numel() for size, _ in self.lora_parameter_shapes())

    def lora_parameter_shapes(self) -> list[tuple[torch.Size, torch.dtype]]:
        """Shapes and dtypes of the FULL model's trainable parameters: every decoder layer's
        adapters, as PEFT made them in parts layer 0 (all layers have the same shapes)."""
        layer = self.model.model.layers[0]
        one_layer = [(p.shape, p.dtype) for p in layer.parameters() if p.requires_grad]
        return one_layer * self.model_shape.num_layers

    def parts(self, bench_shape: BenchShape) -> list[Part]:
        """Every part of one training step on B unpadded rows of `bench_shape`, in step order."""
        from transformers.masking_utils import create_causal_mask

        config, device, model, body = self.config, self.device, self.model, self.model.model
        size = (config.batch_size, bench_shape.seq_len)
        batch = synthetic_batch(
            self.model_shape.vocab_size, config.batch_size, bench_shape, "none", config.seed, device
        )
        labels = batch["labels"]  # (B, L), the last `out` tokens of each row labelled
        position_ids = torch.arange(bench_shape.seq_len, device=device).unsqueeze(0)  # (1, L)
        generator = torch.Generator().manual_seed(config.seed)
        dtype = body.embed_tokens.weight.dtype

        def random_hidden() -> torch.Tensor:  # (B, L, H)
            return torch.randn(*size, self.model_shape.hidden, generator=generator).to(
                device, dtype
            )

        def inputs():
            embeds = body.embed_tokens(batch["input_ids"])  # (B, L, H)
            rope = body.rotary_emb(embeds, position_ids)  # (cos, sin), each (1, L, hd)
            mask = create_causal_mask(
                config=model.config,
                inputs_embeds=embeds,
                attention_mask=batch["attention_mask"],
                cache=None,
                position_ids=position_ids,
            )  # None for SDPA (causal kernel), a (B, 1, L, L) mask for eager
            return rope, mask

        rope, mask = inputs()
        parts = [Part("inputs", "embedding, RoPE, mask", 1, inputs, lambda: None)]
        for index, (kind, layers) in enumerate(self.kinds.items()):
            layer = body.layers[index]
            x = random_hidden().requires_grad_()  # upstream layers carry LoRA
            grad_out = random_hidden()

            def forward(index=index, layer=layer, x=x):
                with self.handle.batch(size, labels=labels, device=device):
                    y = layer(
                        x, attention_mask=mask, position_ids=position_ids, position_embeddings=rope
                    )  # (B, L, H)
                    return y, self.handle.last_selection().get(index, {})

            def run(forward=forward, grad_out=grad_out) -> None:
                y, _ = forward()
                y.backward(grad_out)

            def reset(layer=layer, x=x) -> None:
                x.grad = None
                for param in layer.parameters():
                    param.grad = None

            label = f"layer: {kind.label}"
            parts.append(Part("layer", label, len(layers), run, reset, kind, layers, forward, x))

        final_hidden = random_hidden().requires_grad_()

        def head() -> None:
            self.head_loss(final_hidden, labels).backward()

        def head_reset() -> None:
            final_hidden.grad = None

        parts.append(Part("lm_head", "final norm, LM head, loss", 1, head, head_reset))
        parts.append(self._optimizer_part())
        return parts

    def head_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Final norm, LM head and loss on hidden states (B, L, H), as the whole model computes
        them: at every position and with transformers' causal-LM loss under `handle.dense()`;
        else, with `labelled_logits`, only at the positions that predict a labelled token, as
        `sparselora.engine.savings.LabelledLogits` does."""
        model = self.model
        # A training forward outside `handle.dense()` may take the exact savings.
        with self.handle.batch(hidden.shape[:2], labels=labels, device=hidden.device) as state:
            exact = state.exact_savings and self.handle.config.labelled_logits
        normed = model.model.norm(hidden)  # (B, L, H)
        if not exact:
            logits = model.lm_head(normed)  # (B, L, V)
            return model.loss_function(
                logits=logits, labels=labels, vocab_size=model.config.vocab_size
            )
        return labelled_loss(normed, labels, model.lm_head)[0]

    def _optimizer_part(self) -> Part:
        shapes = self.lora_parameter_shapes()
        generator = torch.Generator().manual_seed(self.config.seed)
        params = [
            torch.zeros(s, dtype=d, device=self.device, requires_grad=True) for s, d in shapes
        ]
        grads = [torch.randn(s, generator=generator).to(self.device, d) for s, d in shapes]
        optimizer = torch.optim.AdamW(params, lr=self.config.learning_rate)

        def run() -> None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def reset() -> None:
            for param, grad in zip(params, grads, strict=True):
                param.grad = grad

        label = f"AdamW, {self.lora_parameters / 1e6:.3g}M LoRA parameters"
        return Part("optimizer", label, 1, run, reset)

    @torch.no_grad()
    def check_sparse_path(self, parts: Sequence[Part]) -> None:
        """Raise RuntimeError unless every sparse layer part chose its channels and changed the
        layer's output, and every dense one left it unchanged: no SparseLoRA time may be a dense
        layer's by mistake."""
        for part in parts:
            if part.forward is None:
                continue
            with self.handle.dense():
                dense_out, _ = part.forward()
            sparse_out, chosen = part.forward()
            # In the last layer every context token skips the FFN (output_tokens "dense"), so
            # no FFN channels are chosen there; its keys and values still run sparse.
            skipped_ffn = part.kind.last and self.handle.config.output_tokens == "dense"
            expected = {"gate_proj"} if part.kind.ffn_sparsity and not skipped_ffn else set()
            expected |= {"q_proj"} if part.kind.attn_sparsity is not None else set()
            changed = not torch.equal(dense_out, sparse_out)
            if not expected <= set(chosen) or changed == part.kind.dense:
                raise RuntimeError(
                    f"{part.label}: the SparseLoRA pass did not run as its kind says (channels "
                    f"chosen for {sorted(chosen)}, expected {sorted(expected)}; output "
                    f"{'changed' if changed else 'unchanged'} against LoRA)"
                )

    def remove(self) -> None:
        self.handle.remove()
