"""A decoder-only forward built for serving many adapters at once: Llama and its close relatives.

Reads top to bottom: what differs between the supported families is read once from the config into a
`LayerShape` (norm style, q/k norms, sandwich norms, sliding windows, embedding and query scales); weights
are fused where projections share an input (q,k,v; gate,up), the KV cache is preallocated per batch row,
and every LoRA target adds `lora_lanes` of the row's lane (a per-row copy of its adapter taken when the
request joined). Row n of a call uses KV row and lane `row0 + n`. Rotary tables come from the model's own
rotary module, so every rope scaling transformers implements (llama3, yarn, ...) is computed as it is there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.activations import ACT2FN

from personalize.errors import InvalidArgument
from personalize.lora.slots import GROUPS, LoraGroup, SlotPool, llama_groups


@dataclass(frozen=True)
class Family:
    """How one model family's decoder layer differs from Llama's (read from its config)."""

    norm_offset: float
    """RMSNorm multiplies by (offset + weight): 0 for Llama/Qwen, 1 for Gemma (computed as Gemma does)."""
    qk_norm: bool
    """RMSNorm of each head's q and k before rope (Qwen3, Gemma 3)."""
    sandwich: bool
    """Extra norms after attention and around the MLP (Gemma 2/3)."""
    windows: tuple[int | None, ...]
    """Per layer: sliding-window length (a query sees the last `w` positions, itself included) or None."""
    rope_keys: tuple[str | None, ...]
    """Per layer: which rotary table it uses (Gemma 3 has one per layer type), None = the model's one."""
    query_scale: float | None
    """Attention scale; None = 1/sqrt(head_dim)."""
    attn_softcap: float | None
    """Attention scores become cap * tanh(scores / cap) before the mask (Gemma 2)."""
    final_softcap: float | None


_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")
"""Rope types whose tables depend on the current sequence length: one precomputed table cannot match."""


def _rope_types(cfg: Any) -> set[str]:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    nested = [p for p in params.values() if isinstance(p, dict)] or [params]
    return {str(p.get("rope_type", p.get("type", "default"))) for p in nested}


def read_family(cfg: Any) -> Family:
    """The family description of a transformers config; refuses what this forward does not implement."""
    dependent = _rope_types(cfg) & set(_LENGTH_DEPENDENT_ROPE)
    if dependent:
        raise InvalidArgument(
            f"rope scaling {sorted(dependent)} is not supported (its tables depend on the "
            f"sequence length); supported: default, linear, llama3, yarn"
        )
    gemma = cfg.model_type.startswith("gemma")
    layers = cfg.num_hidden_layers
    layer_types = getattr(cfg, "layer_types", None)
    window = getattr(cfg, "sliding_window", None)
    if layer_types is not None:
        windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
    else:
        windows = (window,) * layers
    rope = getattr(cfg, "rope_parameters", None) or {}
    per_type = bool(layer_types) and all(isinstance(rope.get(t), dict) for t in set(layer_types or ()))
    rope_keys: tuple[str | None, ...] = tuple(layer_types or ()) if per_type else (None,) * layers
    scalar = getattr(cfg, "query_pre_attn_scalar", None)
    return Family(
        norm_offset=1.0 if gemma else 0.0,
        qk_norm=cfg.model_type in ("qwen3", "gemma3_text"),
        sandwich=gemma,
        windows=windows,
        rope_keys=rope_keys,
        query_scale=scalar**-0.5 if scalar else None,
        attn_softcap=getattr(cfg, "attn_logit_softcapping", None),
        final_softcap=getattr(cfg, "final_logit_softcapping", None),
    )


@dataclass
class LayerWeights:
    """One decoder layer, fused: w[group] is [sum of members' d_out, d_in]; norms by name."""

    norms: dict[str, Tensor]
    w: dict[str, Tensor]
    bias: dict[str, Tensor | None]


def rms_norm(x: Tensor, weight: Tensor, eps: float, offset: float = 0.0) -> Tensor:
    """RMSNorm in float32 like the reference: Llama scales after the cast back, Gemma (offset 1) before."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (xf * (offset + weight.float())).to(x.dtype)
    return weight * xf.to(x.dtype)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [N, heads, L, D]; cos, sin: [N, 1, L, D]."""
    return x * cos + rotate_half(x) * sin


def window_mask(q_pos: Tensor, span: int, window: int | None) -> Tensor:
    """Boolean [N, 1, Lq, span]: key j is visible to the query at q_pos [N, Lq] when j <= q_pos and
    j > q_pos - window (the causal mask with transformers' sliding-window overlay)."""
    keys = torch.arange(span, device=q_pos.device).view(1, 1, span)
    q = q_pos.unsqueeze(-1)  # [N, Lq, 1]
    visible = keys <= q
    if window is not None:
        visible = visible & (keys > q - window)
    return visible.unsqueeze(1)


def lora_into(
    y: Tensor, x: Tensor, group: LoraGroup, lane_a: Tensor, lane_b: dict[str, Tensor], lane_scaling: Tensor, r_max: int
) -> None:
    """Add each part's LoRA delta to its columns of the fused output y, in place.

    x: [N, L, d_in]; y: [N, L, d_fused]; lane_a: [N, parts*r, d_in]; lane_b[m]: [N, r, d_out(m)].
    Equals y[..., cols(m)] += lora_lanes(x, A_m, lane_b[m], lane_scaling) for every part m.
    """
    shrunk = torch.bmm(x, lane_a.transpose(1, 2)) * lane_scaling.view(-1, 1, 1)  # [N, L, parts*r]
    for p, m in enumerate(group.parts):
        start, end = group.out_slices[m]
        y[..., start:end] += torch.bmm(shrunk[..., p * r_max : (p + 1) * r_max], lane_b[m])


def _rotary_tables(
    inner: Any, family: Family, max_len: int, dtype: torch.dtype, probe: Tensor
) -> dict[str | None, tuple[Tensor, Tensor]]:
    """cos, sin [max_len, D] per rope key, from the model's own rotary module (float32, then cast)."""
    positions = torch.arange(max_len, device=probe.device).unsqueeze(0)
    tables = {}
    for key in set(family.rope_keys):
        args = (probe.float(), positions) if key is None else (probe.float(), positions, key)
        cos, sin = inner.rotary_emb(*args)  # [1, max_len, D]
        tables[key] = (cos[0].to(dtype), sin[0].to(dtype))
    return tables


_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


class FastLlama:
    """Inference-only decoder forward over preallocated KV rows and LoRA lanes (see module docstring)."""

    def __init__(self, hf_model: Any, max_batch: int, max_len: int, lanes: SlotPool | None) -> None:
        cfg = hf_model.config
        self.cfg = cfg
        self.family = read_family(cfg)
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps = cfg.rms_norm_eps
        self.act: Any = ACT2FN[getattr(cfg, "hidden_activation", None) or cfg.hidden_act]
        self.max_batch, self.max_len = max_batch, max_len
        self.lanes = lanes
        self.groups = lanes.groups if lanes is not None else llama_groups(cfg, ())
        """Fused projection groups of a layer (which members carry LoRA), fixed for the model's life."""
        inner = hf_model.model
        self.embed = inner.embed_tokens.weight
        scale = getattr(inner.embed_tokens, "embed_scale", None)
        self.embed_scale = None if scale is None else scale.to(self.embed.dtype)
        self.final_norm = inner.norm.weight
        self.lm_head = hf_model.lm_head.weight
        self.layers = [self._fuse(layer) for layer in inner.layers]
        device, dtype = self.embed.device, self.embed.dtype
        cache_shape = (max_batch, self.kv_heads, max_len, self.head_dim)
        self.k_cache = [torch.zeros(cache_shape, dtype=dtype, device=device) for _ in self.layers]
        self.v_cache = [torch.zeros(cache_shape, dtype=dtype, device=device) for _ in self.layers]
        self.rope = _rotary_tables(inner, self.family, max_len, dtype, self.embed[:1].unsqueeze(0))

    @staticmethod
    def _fuse(layer: Any) -> LayerWeights:
        attn, mlp = layer.self_attn, layer.mlp
        mods = {
            "q_proj": attn.q_proj,
            "k_proj": attn.k_proj,
            "v_proj": attn.v_proj,
            "o_proj": attn.o_proj,
            "gate_proj": mlp.gate_proj,
            "up_proj": mlp.up_proj,
            "down_proj": mlp.down_proj,
        }
        members = dict(GROUPS)  # the slots' fused groups: the engine fuses the same projections
        w, bias = {}, {}
        for g, names in members.items():
            w[g] = torch.cat([mods[n].weight for n in names]).contiguous()
            biases = [mods[n].bias for n in names]
            if any(b is not None for b in biases) and not all(b is not None for b in biases):
                raise InvalidArgument(f"projections {names} must all have a bias or none")
            bias[g] = torch.cat(biases).contiguous() if all(b is not None for b in biases) else None
        norms = {n: getattr(layer, n).weight for n in _NORMS if hasattr(layer, n)}
        for n in ("q_norm", "k_norm"):
            if hasattr(attn, n):
                norms[n] = getattr(attn, n).weight
        return LayerWeights(norms, w, bias)

    def _norm(self, x: Tensor, weight: Tensor) -> Tensor:
        return rms_norm(x, weight, self.eps, self.family.norm_offset)

    def _proj(self, x: Tensor, layer: int, group: LoraGroup, rows: slice) -> Tensor:
        lw = self.layers[layer]
        y = F.linear(x, lw.w[group.name], lw.bias[group.name])
        if self.lanes is not None and group.parts:
            lanes = self.lanes
            lane_b = {m: lanes.lora_b[layer][m][rows] for m in group.parts}
            lora_into(y, x, group, lanes.lora_a[layer][group.name][rows], lane_b, lanes.scaling[rows], lanes.r_max)
        return y

    def _heads(self, t: Tensor, heads: int, norm: Tensor | None) -> Tensor:
        """[N, L, heads*D] -> [N, heads, L, D], with the per-head RMSNorm where the family has one."""
        n, length, _ = t.shape
        t = t.view(n, length, heads, self.head_dim)
        if norm is not None:
            t = self._norm(t, norm)
        return t.transpose(1, 2)

    def _layer(self, h: Tensor, i: int, rows: slice, attend: Any, groups: tuple[LoraGroup, ...]) -> Tensor:
        lw, fam = self.layers[i], self.family
        qkv_g, o_g, gate_up_g, down_g = groups
        n, length, _ = h.shape
        x = self._norm(h, lw.norms["input_layernorm"])
        qkv = self._proj(x, i, qkv_g, rows)
        dq, dk = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q = self._heads(qkv[..., :dq], self.heads, lw.norms.get("q_norm") if fam.qk_norm else None)
        k = self._heads(qkv[..., dq : dq + dk], self.kv_heads, lw.norms.get("k_norm") if fam.qk_norm else None)
        v = self._heads(qkv[..., dq + dk :], self.kv_heads, None)
        attn = attend(i, q, k, v)  # [N, heads, L, D]
        attn = self._proj(attn.transpose(1, 2).reshape(n, length, dq), i, o_g, rows)
        if fam.sandwich:
            h = h + self._norm(attn, lw.norms["post_attention_layernorm"])
            x = self._norm(h, lw.norms["pre_feedforward_layernorm"])
        else:
            h = h + attn
            x = self._norm(h, lw.norms["post_attention_layernorm"])
        gate_up = self._proj(x, i, gate_up_g, rows)
        inter = gate_up.shape[-1] // 2
        mlp = self._proj(self.act(gate_up[..., :inter]) * gate_up[..., inter:], i, down_g, rows)
        if fam.sandwich:
            mlp = self._norm(mlp, lw.norms["post_feedforward_layernorm"])
        return h + mlp

    def _embed(self, ids: Tensor) -> Tensor:
        h = F.embedding(ids, self.embed)
        return h if self.embed_scale is None else h * self.embed_scale

    def _logits(self, h: Tensor) -> Tensor:
        logits = F.linear(self._norm(h, self.final_norm), self.lm_head).float()
        cap = self.family.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        if self.family.attn_softcap is not None:
            return self._capped_attention(q, k, v, mask, causal, self.family.attn_softcap)
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal,
            scale=self.family.query_scale,
            enable_gqa=self.kv_heads != self.heads,
        )

    def _capped_attention(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, cap: float
    ) -> Tensor:
        """Attention with soft-capped scores, as transformers' eager Gemma 2 attention (softmax in float32).

        q: [N, heads, Lq, D]; k, v: [N, kv_heads, Lk, D]; mask: boolean [N, 1, Lq, Lk] or None (causal)."""
        groups = self.heads // self.kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scale = self.family.query_scale or self.head_dim**-0.5
        scores = torch.tanh(torch.matmul(q, k.transpose(2, 3)) * scale / cap) * cap  # [N, heads, Lq, Lk]
        if mask is None and causal:
            lq, lk = q.shape[2], k.shape[2]
            mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)

    @torch.inference_mode()
    def prefill(self, ids: Tensor, lengths: Tensor, row0: int) -> Tensor:
        """Run padded prompts ids [N, L] (right-padded; lengths [N]) into KV rows row0..row0+N-1.

        Returns logits [N, vocab] (float32) at each prompt's last token.
        """
        n, length = ids.shape
        rows = slice(row0, row0 + n)
        q_pos = torch.arange(length, device=ids.device).expand(n, length)
        masks = {w: window_mask(q_pos, length, w) for w in set(self.family.windows) if w is not None}

        def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            cos, sin = (t[:length].expand(n, 1, length, -1) for t in self.rope[self.family.rope_keys[i]])
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            self.k_cache[i][rows, :, :length] = k
            self.v_cache[i][rows, :, :length] = v
            # Right padding + causal mask: a real token never attends to a pad.
            window = self.family.windows[i]
            if window is None or window >= length:
                return self._sdpa(q, k, v, None, True)
            return self._sdpa(q, k, v, masks[window], False)

        h = self._embed(ids)
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
        row_idx = torch.arange(b, device=ids.device)
        masks = {w: window_mask(positions.view(b, 1), span, w) for w in set(self.family.windows)}

        def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            cos, sin = (t[positions].view(b, 1, 1, -1) for t in self.rope[self.family.rope_keys[i]])
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            self.k_cache[i][row_idx, :, positions] = k[:, :, 0]
            self.v_cache[i][row_idx, :, positions] = v[:, :, 0]
            keys, values = self.k_cache[i][:b, :, :span], self.v_cache[i][:b, :, :span]
            return self._sdpa(q, keys, values, masks[self.family.windows[i]], False)

        h = self._embed(ids.view(b, 1))
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
