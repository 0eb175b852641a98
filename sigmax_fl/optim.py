"""Adam and momentum SGD as ``torch.optim`` computes them, without ``torch.optim``'s classes.

The first ``torch.optim`` optimiser a process builds imports ``torch._dynamo``: about 0.9 s of
CPU on this machine, before the first training step. Every simulated instance's Ray actor pays
it in round 1, and a deployed SuperNode starts a fresh ClientApp process for every message, so
there it is paid every round by every instance. The updates below are torch 2.13's single-tensor
ones (``torch.optim.adam._single_tensor_adam``, ``torch.optim.sgd._single_tensor_sgd``, the
CPU default) restricted to the options sigmax-fl uses: no weight decay, no AMSGrad, no Nesterov,
no dampening. Same operations in the same order, so the weights are bit-identical;
``tests/test_optim.py`` holds both to ``torch.optim`` step by step. (DP-SGD's per-row gradients
come from ``torch.func``, which imports ``torch._dynamo`` itself: under ``dp = "local"`` the
import stays.)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class Optimizer:
    """The parameters, and ``torch.optim.Optimizer.zero_grad``; subclasses define ``step``."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float) -> None:
        self.params = list(params)
        self.lr = lr

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop (or zero) every gradient before the next backward pass."""
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()


class Adam(Optimizer):
    """Adam (Kingma and Ba, 2015) with torch's defaults: betas (0.9, 0.999), eps 1e-8."""

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__(params, lr)
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.steps = [0] * len(self.params)
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient (torch keeps per-tensor steps)."""
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            grad, exp_avg, exp_avg_sq = p.grad, self.exp_avg[i], self.exp_avg_sq[i]
            self.steps[i] += 1
            step = float(self.steps[i])
            exp_avg.lerp_(grad, 1 - self.beta1)
            exp_avg_sq.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
            bias_correction1 = 1 - self.beta1**step
            bias_correction2 = 1 - self.beta2**step
            step_size = self.lr / bias_correction1
            denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(self.eps)
            p.addcdiv_(exp_avg, denom, value=-step_size)


class SGD(Optimizer):
    """SGD with heavy-ball momentum; the first step's buffer is the gradient itself."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float, momentum: float) -> None:
        super().__init__(params, lr)
        self.momentum = momentum
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient."""
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            buf = self.buffers[i]
            if buf is None:
                buf = self.buffers[i] = p.grad.detach().clone()
            else:
                buf.mul_(self.momentum).add_(p.grad, alpha=1)
            p.add_(buf, alpha=-self.lr)
