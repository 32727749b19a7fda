"""Exact savings: work whose result no loss reads, skipped without changing loss or gradients.

A causal LM's training loss reads the logits only at the positions that predict a labelled
token (label != -100 one position later). Two consequences, both exact:

- **Labelled logits** (`LabelledLogits`): the LM head and the cross-entropy run on those
  positions only. For a 49k-word vocabulary and a 576-wide model the head is a fifth of the
  forward; with 128 answer tokens in a 512-token sequence, three quarters of it is skipped.
- **Last-layer context tokens** (`SparseBlock` with `last=True`): in the last decoder layer,
  every other position is read only through its keys and values. Its query, attention output,
  o_proj and FFN are skipped (their rows are zero), because nothing downstream reads them.

Both apply to training forwards that carry labels, outside `handle.dense()`. The forward's
`logits` then hold the labelled positions only, flattened to (N, vocab) in row-major order of
(batch, position); call the model without labels (or inside `handle.dense()`) for full logits.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from sparselora.config import IGNORE_INDEX
from sparselora.engine import ops
from sparselora.engine.models.base import CausalLMParts
from sparselora.engine.state import ForwardContext

# Forward arguments the labelled-logits path understands; any other one (a cache, hidden states
# or attentions requested, a tuple return, pre-shifted labels) takes the model's own forward.
_HANDLED = {
    "input_ids",
    "attention_mask",
    "position_ids",
    "inputs_embeds",
    "labels",
    "use_cache",
    "logits_to_keep",
    "num_items_in_batch",
}


def causal_lm_loss(
    logits: torch.Tensor, targets: torch.Tensor, num_items_in_batch=None
) -> torch.Tensor:
    """The transformers causal-LM loss on already-selected rows: (N, V), (N,) -> scalar.

    Float32 logits; mean over the rows, or sum / num_items_in_batch when the Trainer passes the
    token count of the whole accumulated batch (as transformers' `ForCausalLMLoss` does).
    """
    logits = logits.float()
    if num_items_in_batch is None:
        return F.cross_entropy(logits, targets, reduction="mean")
    loss = F.cross_entropy(logits, targets, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def labelled_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: nn.Module,
    num_items_in_batch=None,
    finalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The causal-LM loss with the head applied only where a label is read.

    hidden (B, L, H) final hidden states, labels (B, L); `finalize` is the model's own logit
    transform (soft-capping, scaling), applied to the head's output as the model applies it.
    Returns (loss, logits (N, V) of the N read positions in row-major order, read (B, L-1)).
    """
    targets = labels[:, 1:].to(hidden.device)  # (B, L-1): the token each position predicts
    read = targets != IGNORE_INDEX
    logits = ops.frozen_linear(hidden[:, :-1][read], head)  # (N, V); few rows: (W h^T)^T
    if finalize is not None:
        logits = finalize(logits)
    return causal_lm_loss(logits, targets[read], num_items_in_batch), logits, read


class LabelledLogits:
    """Takes over the causal LM's forward: LM head and loss only at labelled positions.

    `model` is the transformers causal LM (`LlamaForCausalLM`, ...) and `parts` its decoder
    body, output projection and logit transform. Installed on the instance only; it takes the
    shortcut only when the context's current batch allows exact savings.
    """

    def __init__(self, context: ForwardContext, model: nn.Module, parts: CausalLMParts) -> None:
        self.context, self.model, self.parts = context, model, parts
        self._signature = inspect.signature(model.forward)
        self._own = None
        self._installed = False

    def install(self) -> None:
        self._own = self.model.__dict__.get("forward")
        original = self.model.forward

        @functools.wraps(original)  # keeps the signature: the Trainer reads it to pick columns
        def forward(*args, **kwargs):
            if not self._installed:  # removed while another wrapper (TRL's head) sits on top
                return original(*args, **kwargs)
            return self._forward(original, *args, **kwargs)

        self._wrapper = forward
        self.model.forward = forward
        self._installed = True

    def uninstall(self) -> None:
        """Restore the model's forward; if something wrapped ours since (TRL's SFTTrainer
        installs its own LM head that way), leave that chain in place: ours passes through."""
        if not self._installed:
            return
        if self.model.__dict__.get("forward") is self._wrapper:
            if self._own is None:
                del self.model.forward
            else:
                self.model.forward = self._own
        self._installed = False

    def _forward(self, original, *args, **kwargs):
        try:
            bound = self._signature.bind(*args, **kwargs).arguments
        except TypeError:
            return original(*args, **kwargs)
        extra = bound.pop("kwargs", {})
        arguments = {**bound, **extra}
        labels = arguments.get("labels")
        batch = self.context.batch
        if (
            labels is None
            or not self.context.config.labelled_logits
            or batch is None
            or not batch.exact_savings
            or any(k not in _HANDLED and _requested(k, v) for k, v in arguments.items())
            or arguments.get("use_cache")
            or not _keeps_all(arguments.get("logits_to_keep", 0))
        ):
            return original(*args, **kwargs)
        outputs = self.parts.decoder(
            input_ids=arguments.get("input_ids"),
            attention_mask=arguments.get("attention_mask"),
            position_ids=arguments.get("position_ids"),
            inputs_embeds=arguments.get("inputs_embeds"),
            use_cache=False,
        )
        hidden = outputs.last_hidden_state  # (B, L, H)
        loss, logits, read = labelled_loss(
            hidden,
            labels,
            self.parts.head,
            arguments.get("num_items_in_batch"),
            self.parts.finalize,
        )
        self._record_skipped(hidden, read, logits.shape[-1])
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def _record_skipped(self, hidden: torch.Tensor, read: torch.Tensor, vocab: int) -> None:
        """Count the LM-head FLOPs skipped in one forward: hidden (B, L, H), read (B, L-1)."""
        skipped = hidden.shape[0] * hidden.shape[1] - int(read.sum())
        passes = self.context.batch.passes  # forward, plus the input-gradient backward
        self.context.stats.flops_saved += 2 * passes * hidden.shape[-1] * vocab * skipped


def _requested(name: str, value) -> bool:
    """True if a forward argument asks for something the labelled-logits path does not do."""
    if name == "return_dict":
        return value is False
    return value is not None and value is not False


def _keeps_all(logits_to_keep) -> bool:
    return isinstance(logits_to_keep, int) and logits_to_keep == 0
