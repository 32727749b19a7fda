"""The Phi-3 family: Phi-3, Phi-3.5 and Phi-4 (model_type "phi3"), fused projections.

Decoder layer i is `model.model.layers[i]`. Attention keeps q, k and v in one `qkv_proj` whose
output rows are q (nh*hd), then k (nkv*hd), then v (nkv*hd), head-major as in LLaMA; `o_proj`
is separate. The MLP keeps gate and up in one `gate_up_proj` whose rows are gate (I) then up
(I): `Phi3MLP.forward` chunks its output in two and computes down(up * act(gate)), which is
the gated FFN of the other families. Each logical projection is a `Rows` span of the fused
module, so the kept channels are rows at its offset, and a LoRA adapter (PEFT targets
`qkv_proj`, `gate_up_proj`) is the fused module's: its delta is computed on the full fused
width (or, with `sparse_lora_branch`, on the kept gate and up rows). In the last layer, the
exact saving cannot skip q alone (k and v share its matmul): q runs on every token there,
o_proj and the FFN still skip the unread rows. Partial RoPE (Phi-4-mini) is the model's own
code after the projections and runs unchanged.
"""

from __future__ import annotations

from torch import nn

from sparselora.engine.models.base import BlockModules, ModelFamily, Rows


class Phi3Family(ModelFamily):
    model_types = ("phi3",)

    def block(self, layer: nn.Module, index: int, config) -> BlockModules:
        attn, mlp = layer.self_attn, layer.mlp
        num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = attn.head_dim
        q_width, kv_width = num_heads * head_dim, num_kv_heads * head_dim
        intermediate = config.intermediate_size
        return BlockModules(
            index=index,
            mlp=mlp,
            gate=Rows(mlp.gate_up_proj, 0, intermediate),
            up=Rows(mlp.gate_up_proj, intermediate, intermediate),
            down=mlp.down_proj,
            act=mlp.activation_fn,
            q=Rows(attn.qkv_proj, 0, q_width),
            k=Rows(attn.qkv_proj, q_width, kv_width),
            v=Rows(attn.qkv_proj, q_width + kv_width, kv_width),
            o=attn.o_proj,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            attention=attn,
        )
