"""The LLaMA family: LLaMA-2/3/3.1/3.2, SmolLM2/3, Mistral, Ministral, Ministral 3, Qwen2/3 and
OLMo 2/3 share this layout.

Decoder layer i is `model.model.layers[i]` with `self_attn.{q,k,v,o}_proj` (head-major, grouped-
query when num_key_value_heads < num_attention_heads, optional biases) and a gated MLP
`mlp.{gate,up,down}_proj` with `mlp.act_fn` (SiLU for SwiGLU); the causal LM's logits are
`lm_head(model.model(...))` unchanged.

What these models do between the projections is their own code and runs unchanged on the
zero-filled full-width q/k/v (docs/METHOD.md, section 6): Qwen3's per-head q/k RMSNorm, OLMo 2/3's
q/k RMSNorm over the whole projection width and norms after (not before) attention and MLP,
SmolLM3's layers without RoPE (`no_rope_layers`), sliding-window layers (Ministral, Qwen3,
OLMo 3, SmolLM3) and Ministral 3's position-dependent query scale. None of it moves a module.
"""

from __future__ import annotations

from torch import nn

from sparselora.engine.models.base import BlockModules, ModelFamily


class LlamaFamily(ModelFamily):
    model_types = (
        "llama",
        "mistral",
        "ministral",
        "ministral3",
        "qwen2",
        "qwen3",
        "olmo2",
        "olmo3",
        "smollm3",
    )

    def block(self, layer: nn.Module, index: int, config) -> BlockModules:
        attn, mlp = layer.self_attn, layer.mlp
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        return BlockModules(
            index=index,
            mlp=mlp,
            gate=mlp.gate_proj,
            up=mlp.up_proj,
            down=mlp.down_proj,
            act=mlp.act_fn,
            q=attn.q_proj,
            k=attn.k_proj,
            v=attn.v_proj,
            o=attn.o_proj,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            attention=attn,
        )
