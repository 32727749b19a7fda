"""The Qwen3.5 family (text model, model_type "qwen3_5_text"): a hybrid of Gated DeltaNet
linear-attention layers and gated full-attention layers.

Decoder layer i is `model.model.layers[i]`; `config.layer_types[i]` says which mixer it has.
Every layer has the gated MLP `mlp.{gate,up,down}_proj` with `mlp.act_fn`: FFN sparsity
applies to every layer.

- Linear-attention layers (`linear_attn`, Gated DeltaNet): no q/k/v/o of the softmax kind, a
  recurrent state instead of an attention matrix. Their mixer runs dense; attention sparsity
  there is a ConfigError; as the last layer they skip only the FFN's unread rows.
- Full-attention layers (`self_attn`): `q_proj` is double width. `Qwen3_5Attention.forward`
  views its output as (nh, 2*hd) and chunks the last dim: per head, hd query rows then hd rows
  of the output gate, which multiplies the attention output (sigmoid) before o_proj. q is
  therefore `Rows(q_proj, 0, nh*hd, group=hd, stride=2*hd)`: kept query channel h*hd + d is
  row h*2*hd + d. The gate rows belong to no projection and run dense for every token (they
  gate every column o_proj's LoRA reads). k, v and o are LLaMA's; q_norm / k_norm (per-head
  RMSNorm) and partial RoPE run unchanged on the zero-filled full-width q and k.
"""

from __future__ import annotations

from torch import nn

from sparselora.engine.models.base import BlockModules, ModelFamily, Rows

LINEAR_ATTENTION = "linear attention (Gated DeltaNet)"


class Qwen35Family(ModelFamily):
    model_types = ("qwen3_5_text",)

    def block(self, layer: nn.Module, index: int, config) -> BlockModules:
        mlp = layer.mlp
        attn = getattr(layer, "self_attn", None)  # None in a linear-attention layer
        num_heads, head_dim = config.num_attention_heads, config.head_dim
        q = k = v = o = None
        if attn is not None:
            q = Rows(attn.q_proj, 0, num_heads * head_dim, group=head_dim, stride=2 * head_dim)
            k, v, o = attn.k_proj, attn.v_proj, attn.o_proj
        return BlockModules(
            index=index,
            mlp=mlp,
            gate=mlp.gate_proj,
            up=mlp.up_proj,
            down=mlp.down_proj,
            act=mlp.act_fn,
            q=q,
            k=k,
            v=v,
            o=o,
            num_heads=num_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            no_attention=None if attn is not None else LINEAR_ATTENTION,
            attention=attn,
        )
