"""A Llama-family forward built for serving many adapters at once.

Reads top to bottom: weights are fused where projections share an input (q,k,v; gate,up), the KV cache is
preallocated per batch row, and every LoRA target adds `lora_lanes` of the row's lane (a per-row copy of
its adapter taken when the request joined). Row n of a call uses KV row and lane `row0 + n`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from personalize.lora.slots import GROUPS, LoraGroup, SlotPool, llama_groups


@dataclass
class LayerWeights:
    """One decoder layer, fused: w[group] is [sum of members' d_out, d_in]."""

    input_norm: Tensor
    post_norm: Tensor
    w: dict[str, Tensor]
    bias: dict[str, Tensor | None]


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama RMSNorm, computed in float32 like the reference implementation."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [N, heads, L, D]; cos, sin: [N, 1, L, D]."""
    return x * cos + rotate_half(x) * sin


def lora_into(y: Tensor, x: Tensor, group: LoraGroup, lane_a: Tensor, lane_b: dict[str, Tensor],
              lane_scaling: Tensor, r_max: int) -> None:
    """Add each part's LoRA delta to its columns of the fused output y, in place.

    x: [N, L, d_in]; y: [N, L, d_fused]; lane_a: [N, parts*r, d_in]; lane_b[m]: [N, r, d_out(m)].
    Equals y[..., cols(m)] += lora_lanes(x, A_m, lane_b[m], lane_scaling) for every part m.
    """
    shrunk = torch.bmm(x, lane_a.transpose(1, 2)) * lane_scaling.view(-1, 1, 1)  # [N, L, parts*r]
    for p, m in enumerate(group.parts):
        start, end = group.out_slices[m]
        y[..., start:end] += torch.bmm(shrunk[..., p * r_max:(p + 1) * r_max], lane_b[m])


class FastLlama:
    """Inference-only Llama forward over preallocated KV rows and LoRA lanes (see module docstring)."""

    def __init__(self, hf_model: Any, max_batch: int, max_len: int, lanes: SlotPool | None) -> None:
        cfg = hf_model.config
        self.cfg = cfg
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps = cfg.rms_norm_eps
        self.act: Any = {"silu": F.silu, "gelu": F.gelu}[cfg.hidden_act]
        self.max_batch, self.max_len = max_batch, max_len
        self.lanes = lanes
        self.groups = lanes.groups if lanes is not None else llama_groups(cfg, ())
        """Fused projection groups of a layer (which members carry LoRA), fixed for the model's life."""
        inner = hf_model.model
        self.embed = inner.embed_tokens.weight
        self.final_norm = inner.norm.weight
        self.lm_head = hf_model.lm_head.weight
        self.layers = [self._fuse(layer) for layer in inner.layers]
        device, dtype = self.embed.device, self.embed.dtype
        cache_shape = (max_batch, self.kv_heads, max_len, self.head_dim)
        self.k_cache = [torch.zeros(cache_shape, dtype=dtype, device=device) for _ in self.layers]
        self.v_cache = [torch.zeros(cache_shape, dtype=dtype, device=device) for _ in self.layers]
        positions = torch.arange(max_len, device=device).unsqueeze(0)
        cos, sin = inner.rotary_emb(self.embed[:1].unsqueeze(0), positions)  # [1, max_len, D]
        self.cos, self.sin = cos[0].to(dtype), sin[0].to(dtype)

    @staticmethod
    def _fuse(layer: Any) -> LayerWeights:
        attn, mlp = layer.self_attn, layer.mlp
        mods = {"q_proj": attn.q_proj, "k_proj": attn.k_proj, "v_proj": attn.v_proj, "o_proj": attn.o_proj,
                "gate_proj": mlp.gate_proj, "up_proj": mlp.up_proj, "down_proj": mlp.down_proj}
        members = dict(GROUPS)  # the slots' fused groups: the engine fuses the same projections
        w, bias = {}, {}
        for g, names in members.items():
            w[g] = torch.cat([mods[n].weight for n in names]).contiguous()
            biases = [mods[n].bias for n in names]
            bias[g] = torch.cat(biases).contiguous() if all(b is not None for b in biases) else None
        return LayerWeights(layer.input_layernorm.weight, layer.post_attention_layernorm.weight, w, bias)

    def _proj(self, x: Tensor, layer: int, group: LoraGroup, rows: slice) -> Tensor:
        lw = self.layers[layer]
        y = F.linear(x, lw.w[group.name], lw.bias[group.name])
        if self.lanes is not None and group.parts:
            lanes = self.lanes
            lane_b = {m: lanes.lora_b[layer][m][rows] for m in group.parts}
            lora_into(y, x, group, lanes.lora_a[layer][group.name][rows], lane_b, lanes.scaling[rows], lanes.r_max)
        return y

    def _layer(self, h: Tensor, i: int, rows: slice, attend: Any, groups: tuple[LoraGroup, ...]) -> Tensor:
        lw = self.layers[i]
        qkv_g, o_g, gate_up_g, down_g = groups
        n, length, _ = h.shape
        x = rms_norm(h, lw.input_norm, self.eps)
        qkv = self._proj(x, i, qkv_g, rows)
        dq, dk = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q = qkv[..., :dq].view(n, length, self.heads, self.head_dim).transpose(1, 2)
        k = qkv[..., dq:dq + dk].view(n, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = qkv[..., dq + dk:].view(n, length, self.kv_heads, self.head_dim).transpose(1, 2)
        attn = attend(i, q, k, v)  # [N, heads, L, D]
        attn = attn.transpose(1, 2).reshape(n, length, dq)
        h = h + self._proj(attn, i, o_g, rows)
        x = rms_norm(h, lw.post_norm, self.eps)
        gate_up = self._proj(x, i, gate_up_g, rows)
        inter = gate_up.shape[-1] // 2
        mid = self.act(gate_up[..., :inter]) * gate_up[..., inter:]
        return h + self._proj(mid, i, down_g, rows)


    def _logits(self, h: Tensor) -> Tensor:
        return F.linear(rms_norm(h, self.final_norm, self.eps), self.lm_head).float()

    @torch.inference_mode()
    def prefill(self, ids: Tensor, lengths: Tensor, row0: int) -> Tensor:
        """Run padded prompts ids [N, L] (right-padded; lengths [N]) into KV rows row0..row0+N-1.

        Returns logits [N, vocab] (float32) at each prompt's last token.
        """
        n, length = ids.shape
        rows = slice(row0, row0 + n)
        cos, sin = self.cos[:length].expand(n, 1, length, -1), self.sin[:length].expand(n, 1, length, -1)

        def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            self.k_cache[i][rows, :, :length] = k
            self.v_cache[i][rows, :, :length] = v
            # Right padding + causal mask: a real token never attends to a pad.
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads)

        h = F.embedding(ids, self.embed)
        groups = self.groups
        for i in range(len(self.layers)):
            h = self._layer(h, i, rows, attend, groups)
        last = h[torch.arange(n, device=h.device), lengths - 1]  # [N, hidden]
        return self._logits(last)

    @torch.inference_mode()
    def decode(self, ids: Tensor, positions: Tensor) -> Tensor:
        """One token for each of rows 0..B-1: ids [B] at positions [B]. Returns logits [B, vocab]."""
        b = ids.shape[0]
        rows = slice(0, b)
        span = int(positions.max()) + 1
        cos, sin = self.cos[positions].view(b, 1, 1, -1), self.sin[positions].view(b, 1, 1, -1)
        row_idx = torch.arange(b, device=ids.device)
        mask = (torch.arange(span, device=ids.device).view(1, span) <= positions.view(b, 1)).view(b, 1, 1, span)

        def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            self.k_cache[i][row_idx, :, positions] = k[:, :, 0]
            self.v_cache[i][row_idx, :, positions] = v[:, :, 0]
            keys, values = self.k_cache[i][:b, :, :span], self.v_cache[i][:b, :, :span]
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                  enable_gqa=self.kv_heads != self.heads)

        h = F.embedding(ids.view(b, 1), self.embed)
        groups = self.groups
        for i in range(len(self.layers)):
            h = self._layer(h, i, rows, attend, groups)
        return self._logits(h[:, 0])

    def move_row(self, src: int, dst: int) -> None:
        """Move a request's KV row and lane from row src to row dst (compaction when a row leaves)."""
        for kc, vc in zip(self.k_cache, self.v_cache, strict=True):
            kc[dst].copy_(kc[src])
            vc[dst].copy_(vc[src])
        if self.lanes is not None:
            self.lanes.copy_slot(self.lanes, src, dst)
