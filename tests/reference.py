"""Brute-force float64 eNTK: one autograd call per point and output. The oracle for every
fast path of the package."""

import torch
from torch import Tensor, nn


def brute_force_jacobian(model, x, names=None, output_fn=None, output_weights=None) -> Tensor:
    """Per-example Jacobians (N, C, P) by one ``torch.autograd.grad`` call per point and output."""
    named = dict(model.named_parameters())
    names = names or [n for n, p in named.items() if p.requires_grad]
    params = [named[n] for n in names]
    was_training = model.training
    model.eval()
    rows = []
    for xi in x:
        out = model(xi[None])
        out = (out if output_fn is None else output_fn(out))[0]
        if output_weights is not None:
            out = out * output_weights
        per_output = []
        for c in range(out.shape[0]):
            grads = torch.autograd.grad(out[c], params, retain_graph=True, allow_unused=True)
            per_output.append(
                torch.cat(
                    [
                        (torch.zeros_like(p) if g is None else g).reshape(-1)
                        for g, p in zip(grads, params, strict=True)
                    ]
                )
            )
        rows.append(torch.stack(per_output))
    model.train(was_training)
    return torch.stack(rows).detach()


def brute_force_ntk(model, x1, x2=None, mode="trace", **kwargs) -> Tensor:
    """The kernel of ``mode`` from brute-force Jacobians."""
    j1 = brute_force_jacobian(model, x1, **kwargs)
    j2 = j1 if x2 is None else brute_force_jacobian(model, x2, **kwargs)
    full = torch.einsum("nip,mjp->nmij", j1, j2)
    if mode == "full":
        return full
    if mode == "trace":
        return torch.einsum("nmcc->nm", full)
    if mode == "diagonal":
        return torch.einsum("nmcc->nmc", full)
    n1, n2, c, _ = full.shape
    return full.permute(2, 0, 3, 1).reshape(c * n1, c * n2)


def double(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return model.double()
