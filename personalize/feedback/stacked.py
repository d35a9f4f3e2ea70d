"""Many users' adapters stacked into trainable tensors: user u is slot u of every target module."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from personalize.lora.adapter import TARGET_MODULES, Adapter, module_key
from personalize.lora.slots import module_shapes


class StackedAdapters:
    """lora_a [U, r, d_in] and lora_b [U, r, d_out] (B transposed) per (layer, module), as leaf tensors.

    r is the largest rank in the stack; smaller ranks are zero-padded, and a zero pad row of A and B gets
    zero gradient, so it stays zero and the adapter keeps its rank. Offers the `inject` interface.
    """

    def __init__(self, adapters: list[Adapter], hf_config: Any, device: torch.device | str = "cpu") -> None:
        self.rank = max(a.rank for a in adapters)
        self.num_layers = hf_config.num_hidden_layers
        targets = {m for a in adapters for m in a.target_modules}
        self.target_modules = tuple(m for m in TARGET_MODULES if m in targets)
        shapes = module_shapes(hf_config)
        users = len(adapters)
        self.a: dict[tuple[int, str], nn.Parameter] = {}
        self.b: dict[tuple[int, str], nn.Parameter] = {}
        for layer in range(self.num_layers):
            for m in self.target_modules:
                d_out, d_in = shapes[m]
                a = torch.zeros(users, self.rank, d_in, device=device)
                b = torch.zeros(users, self.rank, d_out, device=device)
                for u, adapter in enumerate(adapters):
                    pair = adapter.weights.get(module_key(layer, m))
                    if pair is not None:
                        a[u, : adapter.rank] = pair[0].float()
                        b[u, : adapter.rank] = pair[1].float().T
                self.a[(layer, m)] = nn.Parameter(a)
                self.b[(layer, m)] = nn.Parameter(b)
        self.scaling = torch.tensor([a.scaling for a in adapters], dtype=torch.float32, device=device)

    def module_view(self, layer: int, module: str) -> tuple[Tensor, Tensor]:
        return self.a[(layer, module)], self.b[(layer, module)]

    def parameters(self) -> list[nn.Parameter]:
        return [*self.a.values(), *self.b.values()]

    @torch.no_grad()
    def clip_per_user(self, max_norm: float) -> None:
        """Scale each user's gradient (over all modules) to norm <= max_norm, independently of other users."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return
        sq = torch.stack([g.pow(2).flatten(1).sum(1) for g in grads]).sum(0)  # [U]
        factor = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(factor.view(-1, *([1] * (g.dim() - 1))))

    @torch.no_grad()
    def adapter(self, u: int, rank: int, alpha: float, metadata: dict[str, str]) -> Adapter:
        """User u's adapter cut back to its own rank, in PEFT orientation."""
        weights = {}
        for (layer, m), a in self.a.items():
            b = self.b[(layer, m)]
            weights[module_key(layer, m)] = (a[u, :rank].detach().clone(), b[u, :rank].detach().T.contiguous())
        return Adapter(rank=rank, alpha=alpha, weights=weights, metadata=dict(metadata))


class MaskedAdam:
    """Adam (with decoupled weight decay) over stacked per-user tensors, updating only the users in a mask.

    Dim 0 of every parameter is the user. A user outside the mask is left exactly as it is (moments and step
    count too), which torch's Adam cannot do: its momentum would keep moving a user whose gradient is zero.
    That lets each user train for their own number of steps inside one batched round.
    """

    def __init__(
        self,
        groups: list[tuple[list[nn.Parameter], float]],
        users: int,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup: int = 0,
    ) -> None:
        self.groups = groups
        self.betas, self.eps, self.weight_decay, self.warmup = betas, eps, weight_decay, warmup
        device = groups[0][0][0].device
        self.t = torch.zeros(users, device=device)
        self.m = {id(p): torch.zeros_like(p) for params, _ in groups for p in params}
        self.v = {id(p): torch.zeros_like(p) for params, _ in groups for p in params}

    def zero_grad(self) -> None:
        for params, _ in self.groups:
            for p in params:
                p.grad = None

    @torch.no_grad()
    def step(self, active: Tensor) -> None:
        """One update of the users where `active` (bool [U]) is set."""
        b1, b2 = self.betas
        self.t += active.to(self.t.dtype)
        t = self.t.clamp(min=1)
        ramp = (t / self.warmup).clamp(max=1) if self.warmup else torch.ones_like(t)
        for params, lr in self.groups:
            for p in params:
                if p.grad is None:
                    continue
                shape = (-1, *([1] * (p.dim() - 1)))
                keep = active.view(shape)
                m, v = self.m[id(p)], self.v[id(p)]
                m.copy_(torch.where(keep, b1 * m + (1 - b1) * p.grad, m))
                v.copy_(torch.where(keep, b2 * v + (1 - b2) * p.grad.square(), v))
                m_hat = m / (1 - b1**t).view(shape)
                v_hat = v / (1 - b2**t).view(shape)
                update = lr * ramp.view(shape) * (m_hat / (v_hat.sqrt() + self.eps) + self.weight_decay * p)
                p.sub_(torch.where(keep, update, torch.zeros_like(update)))
