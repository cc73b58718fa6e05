"""SAE-feature concepts: the readout is a sae-lens SAE's feature activation ``sae.encode(acts)[..., j]``.

sae-lens's ``encode`` subtracts ``b_dec`` (and applies any input normalisation) before the encoder, so the readout
is *not* ``acts @ W_enc[:, j]``: always go through ``sae.encode``.

Pipeline: ``collect_token_activations`` (residual activations of chat rows) -> ``train_sae`` (sae-lens
``StandardTrainingSAE`` + ``SAETrainer``, in memory, offline, wandb off) -> ``save_sae``/``load_sae`` (sae-lens's
own ``cfg.json`` + safetensors, plus ``sae_info.json``: layer, model fingerprint, metrics) -> pick features
(``features_aligned_with`` a probe direction, ``features_separating`` two sets of activations, or
``features_for_spec`` a concept spec's positive and negative answers) -> ``SAEFeatureConcept`` -> ``save_concept``
/``load_concept`` (``concepts.io``; never pickle).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from concept_influence.concepts.activations import labelled_conversations, read_residuals
from concept_influence.concepts.base import Concept, DirectionConcept, Reduction
from concept_influence.concepts.io import jsonable, load_concept
from concept_influence.concepts.sae_concept import SAEFeatureConcept
from concept_influence.concepts.spec import ConceptSpec, load_spec
from concept_influence.concepts.train import ProbeConfig
from concept_influence.data.chat import ChatRow, rows_from_records
from concept_influence.data.tokenize import TokenizedDataset, iter_batches, tokenize_chat
from concept_influence.files import read_json_file, replace_folder, temp_folder, write_json_atomic
from concept_influence.models.fingerprint import missing_provenance

if TYPE_CHECKING:
    from sae_lens import SAE

    from concept_influence.models.base import ModelAdapter

SAE_INFO = "sae_info.json"
SAE_FORMAT = "concept_influence.sae/1"
_ENCODE_CHUNK = 8192  # tokens per sae.encode call when scoring many activations without gradients


# ---- activations ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def collect_token_activations(
    adapter: ModelAdapter,
    rows: Sequence[ChatRow] | TokenizedDataset,
    layer: int,
    *,
    batch_size: int = 16,
    max_length: int = 256,
    only_response: bool = False,
) -> torch.Tensor:
    """Residual activations ``resid.{layer}`` of every real token of ``rows`` -> ``[n_tokens, d_model]`` (CPU, the
    model's dtype), in row order then token order.

    ``rows``: chat rows (tokenised with the adapter's tokenizer, truncated at ``max_length``) or an already
    tokenised dataset. ``only_response``: keep only assistant tokens (``loss_mask``), else every non-pad token.
    """
    layer = adapter.check_layer(layer)
    if isinstance(rows, TokenizedDataset):
        dataset = rows
    else:
        if adapter.tokenizer is None:
            raise ValueError("collect_token_activations: the adapter has no tokenizer; pass a TokenizedDataset")
        dataset = tokenize_chat(list(rows), adapter.tokenizer, max_length)
    if len(dataset) == 0:
        raise ValueError("collect_token_activations: no rows")

    chunks: list[torch.Tensor] = []
    for batch in iter_batches(dataset, batch_size):
        acts = read_residuals(adapter, batch["input_ids"], batch["attention_mask"], [layer])[layer]
        keep = (batch["loss_mask"] if only_response else batch["attention_mask"]).bool()
        chunks.append(acts[keep.to(acts.device)].cpu())
    acts = torch.cat(chunks)
    if acts.shape[0] == 0:
        raise ValueError("collect_token_activations: no tokens selected (only_response=True and no assistant tokens?)")
    return acts


# ---- training ------------------------------------------------------------------------------------------------------
def train_sae(
    activations: torch.Tensor,
    *,
    d_sae: int | None = None,
    l1_coefficient: float = 1.0,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 3e-3,
    l1_warm_up_fraction: float = 0.05,
    lr_decay_fraction: float = 0.2,
    normalize: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    num_threads: int | Literal["auto"] | None = "auto",
) -> tuple[SAE, dict[str, Any]]:
    """Train a sae-lens standard (ReLU, L1) SAE on token activations ``[n_tokens, d_model]``; offline, wandb off.

    Uses sae-lens's ``StandardTrainingSAE`` and ``SAETrainer.fit`` (Adam, grad clipping, L1 warm-up over
    ``l1_warm_up_fraction`` of the steps, linear LR decay to 0 over the last ``lr_decay_fraction``) on seeded,
    reshuffled-every-epoch minibatches of ``activations`` held in memory. ``normalize``: sae-lens's
    ``expected_average_only_in`` scaling (mean input norm ``sqrt(d_model)`` during training, so ``l1_coefficient``
    does not depend on the activations' scale), folded into the weights at the end: the returned SAE reads raw
    activations. Returns an inference ``StandardSAE`` (``d_sae`` default ``4 * d_model``) and metrics measured on
    ``activations``: ``mse`` (per element), ``explained_variance`` (``1 - Σ‖x - x̂‖² / Σ‖x - mean‖²``), ``l0``
    (mean active features per token), ``dead_features`` (never active), plus the training config.
    ``num_threads``: torch threads during training (restored afterwards); ``"auto"``: one thread for a small SAE
    on CPU (``d_in * d_sae <= 2**20``; several threads only slow such small matrix products down, badly so on a
    busy machine), else torch's setting; ``None``: torch's setting. Seeded (the global RNG is left untouched); the
    result does not depend on the thread count.
    """
    from sae_lens import SAE, StandardTrainingSAE, StandardTrainingSAEConfig, __version__
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    acts = _check_activations(activations, "train_sae")
    n_tokens, d_in = acts.shape
    d_sae = 4 * d_in if d_sae is None else int(d_sae)
    if d_sae < 1 or steps < 1 or batch_size < 1:
        raise ValueError(
            f"train_sae: d_sae, steps and batch_size must be positive (got {d_sae}, {steps}, {batch_size})"
        )
    if not (l1_coefficient >= 0 and lr > 0 and 0 <= l1_warm_up_fraction < 1 and 0 <= lr_decay_fraction < 1):
        raise ValueError("train_sae: need l1_coefficient >= 0, lr > 0 and fractions in [0, 1)")
    batch_size = min(batch_size, n_tokens)
    acts = acts.to(device=device, dtype=dtype)
    config = {
        "architecture": "standard",
        "d_in": d_in,
        "d_sae": d_sae,
        "l1_coefficient": l1_coefficient,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "l1_warm_up_fraction": l1_warm_up_fraction,
        "lr_decay_fraction": lr_decay_fraction,
        "normalize": normalize,
        "seed": seed,
        "dtype": str(dtype).removeprefix("torch."),
        "n_tokens": n_tokens,
        "sae_lens_version": __version__,
    }
    sae_cfg = StandardTrainingSAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        dtype=config["dtype"],
        device=str(device),
        l1_coefficient=l1_coefficient,
        l1_warm_up_steps=int(l1_warm_up_fraction * steps),
        normalize_activations="expected_average_only_in" if normalize else "none",
    )
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * batch_size,
        train_batch_size_samples=batch_size,
        lr=lr,
        lr_end=lr,  # the constant scheduler ignores it; the final linear decay goes from lr to 0
        lr_decay_steps=int(lr_decay_fraction * steps),
        device=str(device),
        dead_feature_window=steps,
        feature_sampling_window=steps,
        n_batches_for_norm_estimate=max(1, min(1000, math.ceil(n_tokens / batch_size))),
        logger=LoggingConfig(log_to_wandb=False),
    )
    if num_threads == "auto":
        num_threads = 1 if torch.device(device).type == "cpu" and d_in * d_sae <= 2**20 else None
    target = torch.device(device)
    rng_devices = [target.index or 0] if target.type == "cuda" else []
    start = time.perf_counter()
    with _threads(num_threads), torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        training_sae = StandardTrainingSAE(sae_cfg)
        trainer = SAETrainer(trainer_cfg, training_sae, _minibatches(acts, batch_size, seed))
        trainer.fit()  # folds the normalisation scale into the weights
        # the inference SAE of the same architecture, as sae-lens's save_inference_model + load_from_disk would give
        state = training_sae.state_dict()
        training_sae.process_state_dict_for_saving_inference(state)
        sae = SAE.from_dict(training_sae.cfg.get_inference_sae_cfg_dict())
        sae.load_state_dict(state)
    sae = sae.to(device=device, dtype=dtype).eval()
    metrics = sae_metrics(sae, acts)
    metrics["train_seconds"] = round(time.perf_counter() - start, 3)
    metrics["config"] = config
    return sae, metrics


@torch.no_grad()
def sae_metrics(sae: SAE, activations: torch.Tensor) -> dict[str, Any]:
    """Reconstruction metrics of ``sae`` on ``activations [n_tokens, d_in]``: ``mse`` (mean squared error per
    element), ``explained_variance`` (``1 - Σ‖x - x̂‖² / Σ‖x - mean(x)‖²``), ``l0`` (mean number of active features
    per token), ``dead_features``/``dead_fraction`` (features active on no token), ``n_tokens``."""
    acts = _check_activations(activations, "sae_metrics")
    weight = sae.W_enc
    sse = 0.0
    l0 = 0.0
    fired = torch.zeros(int(sae.cfg.d_sae), dtype=torch.bool, device=weight.device)
    for chunk in acts.split(_ENCODE_CHUNK):
        x = chunk.to(device=weight.device, dtype=weight.dtype)
        features = sae.encode(x)
        recon = sae.decode(features)
        sse += float((recon.double() - x.double()).pow(2).sum())
        active = features > 0
        l0 += float(active.sum())
        fired |= active.any(dim=0)
    acts64 = acts.double()
    total = float((acts64 - acts64.mean(dim=0)).pow(2).sum())
    n_tokens, d_in = acts.shape
    dead = int((~fired).sum())
    return {
        "mse": sse / (n_tokens * d_in),
        "explained_variance": 1.0 - sse / total if total > 0 else float("nan"),
        "l0": l0 / n_tokens,
        "dead_features": dead,
        "dead_fraction": dead / int(sae.cfg.d_sae),
        "n_tokens": n_tokens,
    }


def _minibatches(acts: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless seeded minibatches of exactly ``batch_size`` rows, reshuffled every epoch (the ragged tail of each
    epoch is dropped: sae-lens counts every batch as ``batch_size`` samples)."""
    generator = torch.Generator().manual_seed(seed + 1)
    n = acts.shape[0]
    while True:
        order = torch.randperm(n, generator=generator).to(acts.device)
        for start in range(0, n - batch_size + 1, batch_size):
            yield acts[order[start : start + batch_size]]


@contextlib.contextmanager
def _threads(num_threads: int | None) -> Iterator[None]:
    if num_threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(int(num_threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _check_activations(activations: torch.Tensor, where: str) -> torch.Tensor:
    acts = torch.as_tensor(activations).detach()
    if acts.ndim != 2 or acts.shape[0] < 1 or acts.shape[1] < 1:
        raise ValueError(f"{where}: activations must be [n_tokens, d_model], got shape {tuple(acts.shape)}")
    if not acts.is_floating_point():
        raise TypeError(f"{where}: activations must be floating point, got {acts.dtype}")
    if not bool(torch.isfinite(acts).all()):
        raise ValueError(f"{where}: activations contain NaN or inf")
    return acts


# ---- feature selection ---------------------------------------------------------------------------------------------
@torch.no_grad()
def features_aligned_with(
    sae: SAE,
    direction: torch.Tensor,
    k: int = 5,
    *,
    using: Literal["decoder", "encoder"] = "decoder",
) -> list[tuple[int, float]]:
    """The ``k`` features whose direction has the highest cosine with ``direction [d_model]``, best first.

    ``using="decoder"``: ``W_dec[j]`` (what feature ``j`` adds to the residual stream when it fires);
    ``"encoder"``: ``W_enc[:, j]`` (what it reads, after ``b_dec`` is subtracted). Signed: a positive cosine means the
    feature firing moves activations along ``direction`` (raises a probe readout ``h · v``); to find features that
    point against a probe pass ``-direction``.
    """
    direction = torch.as_tensor(direction).detach().flatten()
    d_in, d_sae = int(sae.cfg.d_in), int(sae.cfg.d_sae)
    if direction.numel() != d_in:
        raise ValueError(f"direction has {direction.numel()} entries but the SAE's d_in is {d_in}")
    if using == "decoder":
        vectors = sae.W_dec.detach()
    elif using == "encoder":
        vectors = sae.W_enc.detach().T
    else:
        raise ValueError(f"using must be 'decoder' or 'encoder', got {using!r}")
    vectors = vectors.double().cpu()
    direction = direction.double().cpu()
    if not float(direction.norm()) > 0:
        raise ValueError("direction has zero norm")
    cosines = (vectors @ direction) / (vectors.norm(dim=1).clamp_min(1e-30) * direction.norm())
    values, indices = cosines.topk(_check_k(k, d_sae))
    return [(int(i), float(v)) for i, v in zip(indices, values, strict=True)]


@torch.no_grad()
def features_separating(
    sae: SAE,
    pos_acts: torch.Tensor,
    neg_acts: torch.Tensor,
    k: int = 5,
) -> list[tuple[int, float]]:
    """The ``k`` features that fire more on ``pos_acts [N, d_model]`` than on ``neg_acts [M, d_model]``, best first.

    Effect of feature ``j``: standardised difference of mean activations (Cohen's d),
    ``(mean_pos[j] - mean_neg[j]) / pooled_std[j]``. Positive: the feature is more active on the positive set;
    features active on neither set get 0. For features that mark the negative set, swap the arguments.
    """
    d_in, d_sae = int(sae.cfg.d_in), int(sae.cfg.d_sae)
    stats = []
    for name, acts in (("pos_acts", pos_acts), ("neg_acts", neg_acts)):
        acts = _check_activations(
            torch.as_tensor(acts).reshape(-1, torch.as_tensor(acts).shape[-1]), "features_separating"
        )
        if acts.shape[1] != d_in:
            raise ValueError(f"features_separating: {name} has d_model {acts.shape[1]} but the SAE's d_in is {d_in}")
        stats.append(_feature_moments(sae, acts))
    (n_pos, mean_pos, var_pos), (n_neg, mean_neg, var_neg) = stats
    dof = max(n_pos + n_neg - 2, 1)
    pooled = ((n_pos - 1) * var_pos + (n_neg - 1) * var_neg) / dof
    diff = mean_pos - mean_neg
    effect = diff / (pooled + 1e-12).sqrt()
    effect[(mean_pos == 0) & (mean_neg == 0)] = 0.0
    values, indices = effect.topk(_check_k(k, d_sae))
    return [(int(i), float(v)) for i, v in zip(indices, values, strict=True)]


def _feature_moments(sae: SAE, acts: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Count, mean and unbiased variance ``[d_sae]`` (float64, CPU) of the feature activations of ``acts``."""
    weight = sae.W_enc
    total = torch.zeros(int(sae.cfg.d_sae), dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for chunk in acts.split(_ENCODE_CHUNK):
        features = sae.encode(chunk.to(device=weight.device, dtype=weight.dtype)).double().cpu()
        total += features.sum(dim=0)
        total_sq += features.pow(2).sum(dim=0)
    n = acts.shape[0]
    mean = total / n
    var = ((total_sq - n * mean.pow(2)) / max(n - 1, 1)).clamp_min(0.0)
    return n, mean, var


def _check_k(k: int, d_sae: int) -> int:
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    return min(int(k), d_sae)


# ---- feature selection from a concept spec --------------------------------------------------------------------------
def features_for_spec(
    adapter: ModelAdapter,
    sae: SAE,
    spec: ConceptSpec,
    layer: int,
    k: int = 5,
    config: ProbeConfig | None = None,
    *,
    judge: Callable[[str], float] | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> list[tuple[int, float]]:
    """The ``k`` features that fire most on the spec's positive answers relative to its negative ones, best first
    (``features_separating`` on the response-token activations at ``resid.{layer}``).

    The labelled answers are the ones ``train_concept`` reads (same ``config``, seeded sampling, ``cache_dir``):
    instruction-pair answers read without the system prompt, plus the spec's labelled examples.
    """

    config = ProbeConfig() if config is None else config
    layer = adapter.check_layer(layer)
    data = labelled_conversations(
        adapter,
        spec,
        n_samples=config.n_samples,
        temperature=config.temperature,
        max_new_tokens=config.max_new_tokens,
        seed=config.seed,
        judge=judge,
        cache_dir=cache_dir,
        progress=progress,
    )
    sets = []
    for label in (1, 0):
        conversations = [c for c, y in zip(data.conversations, data.labels, strict=True) if y == label]
        rows = rows_from_records([{"messages": c} for c in conversations], source=f"{spec.name} (label {label})")
        sets.append(
            collect_token_activations(
                adapter, rows, layer, batch_size=config.batch_size, max_length=config.max_length, only_response=True
            )
        )
    return features_separating(sae, sets[0], sets[1], k=k)


# ---- a trained SAE on disk -----------------------------------------------------------------------------------------
def save_sae(
    sae: SAE,
    path: str | os.PathLike,
    *,
    layer: int,
    model_fingerprint: str | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write ``sae`` into the folder ``path`` with sae-lens's ``save_model`` (``cfg.json`` +
    ``sae_weights.safetensors``, readable by ``SAE.load_from_disk``) and ``sae_info.json`` (the site it reads,
    the model's fingerprint, training metrics). Written in a temporary folder, then renamed into place."""

    path = Path(path)
    if path.exists() and not (path.is_dir() and (not any(path.iterdir()) or (path / SAE_INFO).exists())):
        raise ValueError(f"{path}: exists and is not an SAE folder; not overwriting it")
    tmp = temp_folder(path)
    try:
        sae.save_model(tmp)
        write_json_atomic(
            tmp / SAE_INFO,
            {
                "format": SAE_FORMAT,
                "site": f"resid.{int(layer)}",
                "layer": int(layer),
                "d_in": int(sae.cfg.d_in),
                "d_sae": int(sae.cfg.d_sae),
                "model_fingerprint": model_fingerprint,
                "metrics": jsonable(metrics or {}),
            },
        )
        replace_folder(tmp, path)  # atomic swap: the old SAE until the new one is in place
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_sae(path: str | os.PathLike, *, device: str = "cpu") -> tuple[SAE, dict[str, Any]]:
    """A sae-lens SAE folder (ours from ``save_sae``, or any saved with sae-lens's ``save_model``) -> the SAE and
    its ``sae_info.json`` (``{}`` when absent: then the caller must say which layer it reads). Errors name the
    folder."""
    from sae_lens import SAE

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"SAE folder not found: {path}")
    info: dict[str, Any] = {}
    if (path / SAE_INFO).exists():
        info = read_json_file(path / SAE_INFO)  # strict: one error naming the file
        for key, kind in (("layer", int), ("model_fingerprint", str), ("metrics", dict)):
            if info.get(key) is not None and (isinstance(info[key], bool) or not isinstance(info[key], kind)):
                raise ValueError(f"{path / SAE_INFO}: {key!r} must be {kind.__name__}, got {info[key]!r}")
    try:
        sae = SAE.load_from_disk(path, device=device)
    except Exception as err:  # json, safetensors, key and shape errors from sae-lens
        raise ValueError(f"cannot load the SAE in {path}: {type(err).__name__}: {err}") from None
    return sae, info


def sae_feature_concept(
    adapter: ModelAdapter,
    sae_path: str | os.PathLike,
    *,
    feature: int | None = None,
    spec: ConceptSpec | str | os.PathLike | None = None,
    probe: Concept | str | os.PathLike | None = None,
    layer: int | None = None,
    k: int = 5,
    reduction: Reduction = "mean",
    config: ProbeConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    allow_missing_provenance: bool = False,
) -> SAEFeatureConcept:
    """Feature ``feature`` of the SAE saved in ``sae_path`` as a concept, or the best of ``k`` candidates chosen by a
    concept ``spec`` (Cohen's d, positive vs negative answer tokens) or a direction ``probe`` (cosine of ``W_dec[j]``
    with it). Exactly one of ``feature``/``spec``/``probe``. ``concept.extra["selection"]`` records the choice and
    the candidates ``[[j, statistic], ...]``. ``layer``: the site the SAE reads (default: its ``sae_info.json``).

    The concept carries the SAE's ``model_fingerprint`` (from ``sae_info.json``); an SAE that records none (one
    saved by sae-lens alone) is an error naming the file unless ``allow_missing_provenance`` (then the concept
    carries no fingerprint and ``extra["allow_missing_provenance"]`` records the opt-in; it is never stamped with
    this model's fingerprint)."""

    if sum(x is not None for x in (spec, probe, feature)) != 1:
        raise ValueError("give exactly one of --spec, --probe or --feature")
    loaded, info = load_sae(sae_path, device=str(adapter.device))
    if layer is None:
        if "layer" not in info:
            raise ValueError(f"{sae_path}: no sae_info.json saying which layer the SAE reads: pass --layer")
        layer = int(info["layer"])
    layer = adapter.check_layer(layer)
    if int(loaded.cfg.d_in) != adapter.d_model:
        raise ValueError(
            f"{sae_path}: the SAE reads {loaded.cfg.d_in}-dim activations but the model's hidden size is "
            f"{adapter.d_model}"
        )
    fingerprint = info.get("model_fingerprint")
    if fingerprint is None and not allow_missing_provenance:
        raise missing_provenance(str(Path(sae_path) / SAE_INFO))
    selection: dict[str, Any] = {}
    if feature is None:
        if spec is not None:
            concept_spec = spec if isinstance(spec, ConceptSpec) else load_spec(spec)
            candidates = features_for_spec(
                adapter, loaded, concept_spec, layer, k, config or ProbeConfig(), cache_dir=cache_dir, progress=progress
            )
            selection = {
                "by": "spec",
                "spec": concept_spec.name,
                "statistic": "Cohen's d, positive vs negative answer tokens",
            }
            if not isinstance(spec, ConceptSpec):
                selection["spec_path"] = str(spec)
        else:
            direction = probe if isinstance(probe, Concept) else load_concept(probe, adapter)  # type: ignore[arg-type]
            if not isinstance(direction, DirectionConcept):
                raise ValueError(f"{probe}: --probe needs a direction concept (probe, diff of means, persona vector)")
            candidates = features_aligned_with(loaded, direction.direction, k)
            selection = {"by": "probe", "statistic": "cosine of W_dec[j] with the probe direction"}
            if not isinstance(probe, Concept):
                selection["probe_path"] = str(probe)
        feature = candidates[0][0]
        selection["candidates"] = [[j, v] for j, v in candidates]
    extra: dict[str, Any] = {"selection": selection, "sae_path": str(sae_path)}
    if fingerprint is None:
        extra["allow_missing_provenance"] = True  # the SAE records no model: the caller opted in
    return SAEFeatureConcept(
        loaded,
        feature,
        layer,
        model_fingerprint=fingerprint,
        metrics={"sae": info.get("metrics", {})},
        extra=extra,
        reduction=reduction,
    )
