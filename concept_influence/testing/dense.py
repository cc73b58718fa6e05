"""Dense references for tiny models (float64): exact per-example gradients by autograd, dense Fisher / Gauss-Newton
blocks, materialised preconditioners and influence by a dense solve. Used by tests and benchmarks; everything here
is O(P²) memory in the number of parameters ``P`` and meant for ``P`` up to a few thousand.

Flattening: the parameters of a list of weights are concatenated in the given order, each weight as the row-major
``vec`` of its canonical ``[d_out, d_in']`` gradient (bias last column), matching ``Preconditioner.dense_block``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from concept_influence.attribution.measurements import Measurement, canonical_gradient
from concept_influence.curvature.covariance import fold_bias, masked_covariance_sum
from concept_influence.curvature.preconditioner import Preconditioner
from concept_influence.data.tokenize import iter_batches
from concept_influence.gradients.capture import gradient_mode
from concept_influence.gradients.loss import sample_targets, sequence_losses
from concept_influence.models.base import ModelAdapter


def flatten(grads: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """``{name: [..., d_out, d_in']}`` -> ``[..., P]`` (concatenated row-major vecs, in ``names`` order)."""
    return torch.cat([grads[n].reshape(*grads[n].shape[:-2], -1) for n in names], dim=-1)


def unflatten(flat: torch.Tensor, shapes: Mapping[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Inverse of ``flatten`` for ``[..., P]`` with the weights' ``(d_out, d_in')``, in ``shapes`` order."""
    out, start = {}, 0
    for name, (d_out, d_in) in shapes.items():
        size = d_out * d_in
        out[name] = flat[..., start : start + size].reshape(*flat.shape[:-1], d_out, d_in)
        start += size
    return out


def block_diagonal(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.block_diag(*blocks)


def block_diagonal_part(matrix: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Keep only the diagonal blocks (of the given sizes) of a dense ``[P, P]`` matrix."""
    blocks, start = [], 0
    for size in sizes:
        blocks.append(matrix[start : start + size, start : start + size])
        start += size
    return torch.block_diag(*blocks)


def dense_preconditioner(preconditioner: Preconditioner, names: Sequence[str]) -> torch.Tensor:
    """The preconditioner's undamped block-diagonal matrix ``[P, P]``."""
    return torch.block_diag(*[preconditioner.dense_block(n) for n in names])


def damping_vector(preconditioner: Preconditioner, names: Sequence[str]) -> torch.Tensor:
    """``λ_w`` repeated over each weight's entries: ``[P]``."""
    parts = [
        torch.full((d_out * d_in,), preconditioner.damping[n], dtype=torch.float64)
        for n in names
        for d_out, d_in in [preconditioner.shapes[n]]
    ]
    return torch.cat(parts)


def exact_influence(
    grad_f: torch.Tensor, train_grads: torch.Tensor, curvature: torch.Tensor, damping: torch.Tensor | float
) -> torch.Tensor:
    """``−∇L_nᵀ (G + diag(λ))⁻¹ ∇f`` by a dense solve: ``grad_f [P]``, ``train_grads [N, P]``, ``curvature [P, P]``."""
    damp = (
        damping
        if isinstance(damping, torch.Tensor)
        else torch.full((curvature.shape[0],), float(damping), dtype=torch.float64)
    )
    solved = torch.linalg.solve(curvature.double() + torch.diag(damp.double()), grad_f.double())
    return -(train_grads.double() @ solved)


def per_example_gradients(
    adapter: ModelAdapter,
    data: Sequence[Any],
    names: Sequence[str],
    *,
    fisher: str = "empirical",
    seed: int = 0,
) -> torch.Tensor:
    """``[N, P]``: each row's gradient of its summed training loss by a separate autograd call (no hooks), in
    canonical flattened layout. ``fisher="true"`` uses the same seeded sampled targets as the fit."""
    infos = [adapter.weight_info(n) for n in names]
    rows = []
    with gradient_mode(adapter, infos) as params:
        for batch in iter_batches(data, 1, pad_id=getattr(data, "pad_token_id", 0)):
            logits = adapter.logits(batch["input_ids"], batch["attention_mask"])
            targets = batch["input_ids"]
            if fisher == "true":
                targets = sample_targets(logits.detach(), batch["input_ids"], batch["loss_mask"], batch["index"], seed)
            loss = sequence_losses(logits, targets, batch["loss_mask"]).sum()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            rows.append(flatten(_canonical_grads(infos, params, grads), names))
    return torch.stack(rows).double()


def per_target_gradients(adapter: ModelAdapter, row: Any, names: Sequence[str]) -> torch.Tensor:
    """``[T, P]``: for one tokenised row, the gradient of each target token's cross-entropy ``ℓ_t`` alone
    (zero rows where ``loss_mask[t] = 0``), one autograd call per token."""
    from concept_influence.models.loss import token_cross_entropy

    infos = [adapter.weight_info(n) for n in names]
    input_ids = torch.tensor([row.input_ids])
    loss_mask = torch.tensor([row.loss_mask])
    out = []
    with gradient_mode(adapter, infos) as params:
        per_token = token_cross_entropy(adapter.logits(input_ids), input_ids, loss_mask)[0]
        for t in range(per_token.shape[0]):
            if not loss_mask[0, t]:
                out.append(None)
                continue
            grads = torch.autograd.grad(per_token[t], params, retain_graph=True, allow_unused=True)
            out.append(flatten(_canonical_grads(infos, params, grads), names).double())
    size = next(o for o in out if o is not None).shape[0]
    return torch.stack([o if o is not None else torch.zeros(size, dtype=torch.float64) for o in out])


def measurement_gradient(adapter: ModelAdapter, measurement: Measurement, names: Sequence[str]) -> torch.Tensor:
    """``∇f`` flattened ``[P]`` by one autograd call per query (a reference for ``Measurement.gradient``)."""
    infos = [adapter.weight_info(n) for n in names]
    total = None
    with gradient_mode(adapter, infos) as params:
        for coefficient, queries in measurement.terms():
            for batch in iter_batches(queries, 1):
                value = measurement.per_query(adapter, batch).sum() * (coefficient / len(queries))
                grads = torch.autograd.grad(value, params, allow_unused=True)
                flat = flatten(_canonical_grads(infos, params, grads), names).double()
                total = flat if total is None else total + flat
    assert total is not None
    return total


def _canonical_grads(infos, params, grads) -> dict[str, torch.Tensor]:
    out, k = {}, 0
    for info in infos:
        weight = grads[k] if grads[k] is not None else torch.zeros_like(params[k])
        k += 1
        bias = None
        if info.bias_name is not None:
            bias = grads[k] if grads[k] is not None else torch.zeros_like(params[k])
            k += 1
        out[info.name] = canonical_gradient(info, weight, bias)
    return out


def fisher_from_gradients(per_example: torch.Tensor) -> torch.Tensor:
    """``E_n[g_n g_nᵀ]`` for ``[N, P]`` -> ``[P, P]``."""
    return per_example.T @ per_example / per_example.shape[0]


# ---- plain torch.nn MLPs (no adapter): type-2 Kronecker factors and the dense Gauss-Newton matrix ------------------
def mlp_linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def mlp_kronecker_factors(model: nn.Module, inputs: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Exact ("type-2") KFAC factors of every ``nn.Linear`` for a squared-error loss ``½‖model(x) − y‖²``:
    ``A = E_n[a aᵀ]`` and ``S = E_n[Σ_k g_k g_kᵀ]`` with ``g_k`` the output gradient of the ``k``-th output unit
    (the columns of the output Hessian's square root, here the identity). Inputs ``[N, d]``; bias folded."""
    linears = mlp_linears(model)
    acts: dict[int, torch.Tensor] = {}
    outs: dict[int, torch.Tensor] = {}
    handles = []
    for k, lin in enumerate(linears):

        def hook(_m, inp, out, k=k):
            acts[k] = inp[0].detach()
            outs[k] = out

        handles.append(lin.register_forward_hook(hook))
    try:
        y = model(inputs)
    finally:
        for h in handles:
            h.remove()
    n, n_out = y.shape
    grad_sq = [torch.zeros(lin.out_features, lin.out_features, dtype=torch.float64) for lin in linears]
    for j in range(n_out):
        grads = torch.autograd.grad(y[:, j].sum(), [outs[k] for k in range(len(linears))], retain_graph=True)
        for k, g in enumerate(grads):
            grad_sq[k] += masked_covariance_sum(g.double())
    factors = []
    for k, lin in enumerate(linears):
        a = acts[k].double()
        if lin.bias is not None:
            a = fold_bias(a)
        factors.append((masked_covariance_sum(a) / n, grad_sq[k] / n))
    return factors


def mlp_gauss_newton(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Dense GGN ``E_n[J_nᵀ J_n]`` of a squared-error loss over every ``nn.Linear`` (weights then bias folded as the
    last input column, row-major vec per layer, layers in order): ``[P, P]``."""
    linears = mlp_linears(model)
    names = {id(p): n for n, p in model.named_parameters()}
    params = {names[id(p)]: p for lin in linears for p in ([lin.weight] + ([lin.bias] if lin.bias is not None else []))}
    total = None
    for x in inputs:

        def f(*values, x=x):
            return torch.func.functional_call(model, dict(zip(params, values, strict=True)), (x.unsqueeze(0),)).squeeze(
                0
            )

        jac = torch.func.jacrev(f, argnums=tuple(range(len(params))))(*params.values())
        jac = dict(zip(params, jac, strict=True))
        columns = []
        for lin in linears:
            w = jac[names[id(lin.weight)]]  # [n_out, d_out, d_in]
            if lin.bias is not None:
                w = torch.cat([w, jac[names[id(lin.bias)]].unsqueeze(-1)], dim=-1)
            columns.append(w.reshape(w.shape[0], -1))
        j = torch.cat(columns, dim=1).double().detach()
        total = j.T @ j if total is None else total + j.T @ j
    assert total is not None
    return total / inputs.shape[0]
