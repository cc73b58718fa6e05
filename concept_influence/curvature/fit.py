"""The fit driver: loops over the training data with the adapter's weight capture and accumulates the factors.

Pass 1 (KFAC, EKFAC): ``A = Σ a aᵀ / n_tokens`` and ``S = Σ g gᵀ / n_tokens`` over non-padding tokens, with ``g``
the output gradients of the summed training loss (targets sampled from the model for the true Fisher).
Eigendecomposition in float64. Pass 2 (EKFAC, diagonal): per-example gradients ``G_n = Σ_t g_t a_tᵀ`` give
``Λ = Σ_n (Q_Sᵀ G_n Q_A)² / n_rows`` and ``diag = Σ_n G_n ∘ G_n / n_rows`` (materialised per weight per batch).

With ``out_dir`` the driver checkpoints its running sums every ``checkpoint_every`` batches and on interruption
(Ctrl-C, or SIGTERM through the CLI: the sums and counts of the batches committed so far; a batch's update is
computed first and committed in one short step, so an interruption inside a batch just drops that batch), and
resumes from them when called again with the same model, data and config (results are identical to an
uninterrupted fit: label draws are seeded per row).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from concept_influence.curvature.config import FactorConfig
from concept_influence.curvature.covariance import fold_bias, masked_covariance_sum, per_example_gradients
from concept_influence.curvature.eigen import Eigen, eigendecompose, eigenvalue_correction_sum
from concept_influence.curvature.factors import Factors, WeightFactors
from concept_influence.curvature.io import (
    check_fingerprints,
    clear_partial,
    config_fingerprint,
    data_fingerprint,
    has_factors,
    load_factors,
    load_partial,
    read_manifest,
    save_factors,
    save_partial,
)
from concept_influence.curvature.loss import sample_targets, sequence_losses
from concept_influence.data.atomic import folder_lock, remove_stale_temps
from concept_influence.models.base import ModelAdapter, WeightCapture, WeightInfo
from concept_influence.numerics import check_finite

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def gradient_mode(adapter: ModelAdapter, infos: Sequence[WeightInfo]) -> Iterator[list[torch.nn.Parameter]]:
    """Eval mode, grad enabled, and ``requires_grad`` on the tracked weights (and biases); restored on exit.
    Yields the tracked parameters (what ``torch.autograd.grad`` differentiates against)."""
    params: list[torch.nn.Parameter] = []
    for info in infos:
        params.append(adapter.parameter(info.param_name))
        if info.bias_name is not None:
            params.append(adapter.parameter(info.bias_name))
    saved = [p.requires_grad for p in params]
    was_training = adapter.model.training
    adapter.model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield params
    finally:
        for p, flag in zip(params, saved, strict=True):
            p.requires_grad_(flag)
        adapter.model.train(was_training)


def capture_loss_gradients(
    adapter: ModelAdapter,
    batch: dict[str, torch.Tensor],
    infos: Sequence[WeightInfo],
    params: Sequence[torch.nn.Parameter],
    *,
    fisher: str = "empirical",
    seed: int = 0,
) -> tuple[WeightCapture, torch.Tensor]:
    """Forward + backward of the summed training loss of a batch with the weights' capture installed.

    Returns the capture (``activations[name] [B, T, d_in]``, ``output_grads[name] [B, T, d_out]``; output gradients
    of weights the loss does not reach are zeros) and the per-row losses ``[B]`` (detached). ``fisher="true"``
    replaces the targets by seeded draws from the model (``sample_targets``).
    """
    names = [info.name for info in infos]
    device = adapter.device
    input_ids = batch["input_ids"].to(device)
    attention = batch["attention_mask"].to(device)
    loss_mask = batch["loss_mask"].to(device)
    with adapter.capture_weights(names) as capture:
        logits = adapter.logits(input_ids, attention)
        targets = input_ids
        if fisher == "true":
            targets = sample_targets(logits.detach(), input_ids, loss_mask, batch["index"], seed)
        losses = sequence_losses(logits, targets, loss_mask)
        if losses.requires_grad:
            torch.autograd.grad(losses.sum(), list(params), allow_unused=True)
    for info in infos:
        if info.name not in capture.output_grads:
            a = capture.activations[info.name]
            capture.output_grads[info.name] = a.new_zeros(*a.shape[:-1], info.d_out)
    return capture, losses.detach()


def folded_activations(capture: WeightCapture, info: WeightInfo, attention: torch.Tensor) -> torch.Tensor:
    """``[B, T, d_in']``: the captured input activations with padding zeroed and the bias column appended."""
    a = capture.activations[info.name]
    mask = attention.to(device=a.device, dtype=a.dtype).unsqueeze(-1)
    a = a * mask
    return fold_bias(a, attention.to(a.device)) if info.has_bias else a


def fit_fingerprints(adapter: ModelAdapter, data: Sequence[Any], config: FactorConfig, names: Sequence[str]) -> dict[str, str]:
    return {"model": adapter.fingerprint(), "data": data_fingerprint(data), "config": config_fingerprint(config, names)}


def fit_factors(
    adapter: ModelAdapter,
    data: Sequence[Any],
    config: FactorConfig = FactorConfig(),
    *,
    weights: Sequence[str] | None = None,
    batch_size: int = 8,
    out_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = 100,
    overwrite: bool = False,
    progress: bool = True,
    max_batches: int | None = None,
) -> Factors | None:
    """Fit the curvature factors of ``weights`` (default: every tracked weight) on tokenised training rows.

    ``data``: a ``TokenizedDataset`` (or a sequence of ``TokenizedRow``). ``out_dir``: save the factors there
    (folder with ``manifest.json`` and ``factors.safetensors``); an existing complete fit with the same fingerprints
    is loaded instead of refitted, one with different fingerprints is an error unless ``overwrite``.
    ``max_batches``: stop after that many batches in this call, leaving a resumable partial state (for tests and
    time-limited jobs); returns ``None`` in that case. Two fits into one ``out_dir`` take turns (a folder lock);
    the second then finds the first one's factors.
    """
    from concept_influence.data.tokenize import untrainable_rows

    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if len(data) == 0:
        raise ValueError("no training rows to fit factors on")
    untrainable_rows(data)  # a row whose whole answer is truncated away is an error (leave such rows out first)
    infos = adapter.tracked_weights() if weights is None else [adapter.weight_info(n) for n in weights]
    names = [i.name for i in infos]
    if not names:
        raise ValueError("no weights to fit factors for")
    fingerprints = fit_fingerprints(adapter, data, config, names)
    folder = Path(out_dir) if out_dir is not None else None
    lock = folder_lock(folder, what="factors folder") if folder is not None else contextlib.nullcontext()
    with lock:
        return _fit(adapter, data, config, infos, fingerprints, folder, batch_size=batch_size,
                    checkpoint_every=checkpoint_every, overwrite=overwrite, progress=progress, max_batches=max_batches)


def _fit(
    adapter: ModelAdapter,
    data: Sequence[Any],
    config: FactorConfig,
    infos: Sequence[WeightInfo],
    fingerprints: dict[str, str],
    folder: Path | None,
    *,
    batch_size: int,
    checkpoint_every: int | None,
    overwrite: bool,
    progress: bool,
    max_batches: int | None,
) -> Factors | None:
    from concept_influence.data.tokenize import iter_batches

    names = [i.name for i in infos]

    state: dict[str, Any] = {"stage": "covariance", "rows_done": 0, "n_tokens": 0, "n_rows": 0}
    sums: dict[str, torch.Tensor] = {}
    if folder is not None:
        remove_stale_temps(folder)  # temp files of a killed fit (we hold the folder's lock: no live writer)
        if has_factors(folder):
            saved = read_manifest(folder)["fingerprints"]
            if saved == fingerprints:
                logger.info("factors in %s match this model, data and config: loading them", folder)
                clear_partial(folder)  # left by a fit killed after saving its factors
                return load_factors(folder, model_fingerprint=fingerprints["model"], data_fingerprint=fingerprints["data"])
            if not overwrite:
                check_fingerprints(saved, fingerprints, f"the factors in {folder}")
        if overwrite:
            clear_partial(folder)
        partial = load_partial(folder, fingerprints)
        if partial is not None:
            state, sums = partial[0], dict(partial[1])
            logger.info("resuming the %s pass of the fit in %s after %d rows", state["stage"], folder, state["rows_done"])

    stats_dtype = config.torch_dtype
    eigens: dict[str, tuple[Eigen, Eigen]] = {}
    batches_left = [max_batches if max_batches is not None else -1]
    busy = [False]

    def checkpoint() -> None:
        if folder is not None:
            save_partial(folder, {**state, "fingerprints": fingerprints}, sums)

    def run_pass(stage: str, step) -> bool:
        """Iterate the rows not yet done in ``stage``; False if stopped early by ``max_batches``."""
        rows = data[state["rows_done"]:] if state["rows_done"] else data
        n_batches = (len(rows) + batch_size - 1) // batch_size
        done_batches = 0
        with tqdm(total=len(data), initial=state["rows_done"], desc=f"factors: {stage}", unit="row", disable=not progress) as bar:
            try:
                for batch in iter_batches(rows, batch_size, pad_id=getattr(data, "pad_token_id", 0)):
                    if batches_left[0] == 0:
                        checkpoint()
                        return False
                    n = int(batch["input_ids"].shape[0])
                    updates, counts = step(batch)  # an interrupt here leaves the sums and counts untouched
                    busy[0] = True  # the sums are inconsistent with the counts only during this short commit
                    for key, value in updates.items():
                        _add(sums, key, value)
                    for key, value in counts.items():
                        state[key] += value
                    state["rows_done"] += n
                    busy[0] = False
                    bar.update(n)
                    done_batches += 1
                    batches_left[0] -= 1
                    if checkpoint_every and done_batches % checkpoint_every == 0 and done_batches < n_batches:
                        checkpoint()
            except KeyboardInterrupt:  # Ctrl-C, or SIGTERM through the CLI: save what is consistent, then stop
                if not busy[0]:  # interrupted while committing a batch: keep the last checkpoint instead
                    checkpoint()
                raise
        return True

    with gradient_mode(adapter, infos) as params:
        if config.needs_covariances and state["stage"] == "covariance":
            def covariance_step(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
                capture, _ = capture_loss_gradients(adapter, batch, infos, params, fisher=config.fisher, seed=config.seed)
                attention = batch["attention_mask"]
                updates: dict[str, torch.Tensor] = {}
                for info in infos:
                    a = folded_activations(capture, info, attention).to(stats_dtype)
                    g = capture.output_grads[info.name].to(stats_dtype)
                    _check_row_tensors(a, g, info.name, batch, "fit-factors (covariance pass)")
                    mask = attention.to(a.device)
                    updates[f"{info.name}/A"] = masked_covariance_sum(a, mask)
                    updates[f"{info.name}/S"] = masked_covariance_sum(g, mask)
                return updates, {"n_tokens": int(attention.sum())}

            if not run_pass("covariance", covariance_step):
                return None
            state.update(stage="eigen", rows_done=0)
            checkpoint()

        if config.needs_covariances:
            n_tokens = max(int(state["n_tokens"]), 1)
            for name in names:
                eigens[name] = (eigendecompose(sums[f"{name}/S"] / n_tokens), eigendecompose(sums[f"{name}/A"] / n_tokens))

        if config.needs_per_example_pass:
            if state["stage"] in ("covariance", "eigen"):
                state.update(stage="lambda", rows_done=0, n_rows=0)

            def lambda_step(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
                capture, _ = capture_loss_gradients(adapter, batch, infos, params, fisher=config.fisher, seed=config.seed)
                updates: dict[str, torch.Tensor] = {}
                for info in infos:
                    a = folded_activations(capture, info, batch["attention_mask"]).to(stats_dtype)
                    g = capture.output_grads[info.name].to(stats_dtype)
                    _check_row_tensors(a, g, info.name, batch, "fit-factors (eigenvalue-correction pass)")
                    grads = per_example_gradients(a, g)
                    updates[f"{info.name}/diag"] = grads.square().sum(dim=0)
                    if info.name in eigens:
                        s_eig, a_eig = eigens[info.name]
                        q_s, q_a = s_eig.vectors.to(grads.device, stats_dtype), a_eig.vectors.to(grads.device, stats_dtype)
                        updates[f"{info.name}/lambda"] = eigenvalue_correction_sum(grads, q_s, q_a)
                    del grads
                return updates, {"n_rows": int(batch["input_ids"].shape[0])}

            if not run_pass("lambda", lambda_step):
                return None
        else:
            state["n_rows"] = len(data)

    n_tokens = max(int(state["n_tokens"]), 1)
    n_rows = max(int(state["n_rows"]), 1)
    out: dict[str, WeightFactors] = {}
    for info in infos:
        d_in = info.d_in + int(info.has_bias)
        w = WeightFactors(d_out=info.d_out, d_in=d_in)
        if config.needs_covariances:
            w.activation_covariance = (sums[f"{info.name}/A"] / n_tokens).to(torch.float64)
            w.gradient_covariance = (sums[f"{info.name}/S"] / n_tokens).to(torch.float64)
            w.gradient_eigen, w.activation_eigen = eigens[info.name]
        if config.needs_per_example_pass:
            w.diagonal = (sums[f"{info.name}/diag"] / n_rows).to(torch.float64)
            if config.preconditioner == "ekfac":
                w.eigenvalue_correction = (sums[f"{info.name}/lambda"] / n_rows).to(torch.float64)
        out[info.name] = w
    factors = Factors(out, config, n_rows=int(state["n_rows"]), n_tokens=int(state["n_tokens"]), fingerprints=fingerprints)
    check_factors_finite(factors, "fit-factors (result)")
    if folder is not None:
        save_factors(factors, folder)
        clear_partial(folder)
    return factors


def _check_row_tensors(a: torch.Tensor, g: torch.Tensor, name: str, batch: dict[str, torch.Tensor], stage: str) -> None:
    """Activations ``a`` and output gradients ``g`` ``[B, T, ·]`` of a batch must be finite (error names the row)."""
    check_finite(a, f"{stage}: input activations of {name}", batch["index"])
    check_finite(g, f"{stage}: output gradients of {name}", batch["index"])


def check_factors_finite(factors: Factors, stage: str) -> None:
    """Every tensor of every weight's factors must be finite (error names the weight and the tensor)."""
    for name, w in factors.weights.items():
        tensors = {"eigenvalue_correction": w.eigenvalue_correction, "diagonal": w.diagonal}
        for fld in ("activation_eigen", "gradient_eigen"):
            eig = getattr(w, fld)
            if eig is not None:
                tensors[f"{fld}values"], tensors[f"{fld}vectors"] = eig.values, eig.vectors
        for key, value in tensors.items():
            if value is not None:
                check_finite(value, f"{stage}: factors of {name} ({key})", hint="refit the factors")


def _add(sums: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    value = value.detach()
    if key in sums:
        sums[key] = sums[key].to(value.device) + value
    else:
        sums[key] = value.clone()
