"""The scoring pass behind influence: the configuration and result types, the weights a measurement reaches, the
preconditioner, one pass over the training rows folding ``−Σ_t g_tᵀ v_w a_t`` per weight (``score_rows``), and the
row aggregation and normalisation applied to its output.

Shared by ``attribution.influence`` (``compute_influence``, ``compute_influence_many``) and the memory-bounded path
``attribution.bounded``; the math and sign conventions are described in ``attribution.influence``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from concept_influence.attribution.measurements import Measurement
from concept_influence.curvature.budget import parse_size
from concept_influence.curvature.config import Damping, PreconditionerKind
from concept_influence.curvature.covariance import fold_bias, per_example_gradients, token_contractions
from concept_influence.curvature.factors import Factors
from concept_influence.curvature.fit import factor_owners
from concept_influence.curvature.io import FactorMismatchError
from concept_influence.curvature.preconditioner import IdentityPreconditioner, Preconditioner
from concept_influence.data.tokenize import iter_batches
from concept_influence.distributed.runtime import dist_info, max_over_ranks, n_batches, side_group
from concept_influence.gradients.capture import gradient_mode, loss_backward
from concept_influence.models.base import ModelAdapter, WeightInfo
from concept_influence.models.fingerprint import missing_provenance
from concept_influence.numerics import check_finite, check_finite_dict
from concept_influence.settings import option


def resolve_damping(damping: Damping | float, absolute_damping: float | None = None) -> Damping:
    """The ``Damping`` of a ``damping`` option (a ``Damping`` or a relative factor) and an ``absolute_damping``
    (which replaces the relative rule unless ``damping`` is a ``Damping`` with its own absolute value)."""
    if isinstance(damping, Damping):
        if absolute_damping is not None and damping.absolute is None:
            return Damping(absolute=absolute_damping)
        return damping
    if absolute_damping is not None:
        return Damping(absolute=absolute_damping)
    return Damping(relative=float(damping))


@dataclass(frozen=True)
class InfluenceConfig:
    """How to score. ``preconditioner``: ``"ekfac"`` (default), ``"kfac"``, ``"diagonal"`` or ``"identity"``
    (plain gradient dot product, needs no factors). ``damping``: per-weight ``λ_w`` (default 0.1 × mean eigenvalue).
    ``token_breakdown``: ``"target"`` splits each score over the row's trained tokens (which tokens, when learned,
    push the measurement; costs one double-backward pass), ``"position"`` over the positions where the weights act
    (free: the contraction before its sum), ``"none"``. ``per_weight`` / ``self_influence``: the other breakdowns.
    ``row_loss``: ``"sum"`` (default) scores the gradient of the row's summed token loss, which is how a row weighs
    in fine-tuning with a per-token mean loss over the batch (and kronfluence's convention); ``"mean"`` scores its
    per-token mean instead (every score divided by the row's number of trained tokens, self-influence by its
    square), which removes the advantage of long rows when ranking. The factors are the same for both.
    ``token_aggregation``: a row's score is the sum of its per-position contributions (``"sum"``, the influence
    itself), their largest single value (``"max"``) or the largest sum over ``window`` consecutive positions
    (``"window"``, as IF-Guide's token-level scores). ``normalization``: ``"length"`` divides by the square root of
    the row's trained tokens (on top of ``row_loss``), ``"unit"`` by ``sqrt(self-influence)``, the cosine in the
    preconditioned metric (RelatIF); costs a per-row gradient pass).
    ``allow_subset``: when the factors miss weights the measurement reaches, score with the covered ones only (and
    say so in the notes); default: an error. ``max_memory`` (bytes or ``"3GiB"``): bound the scoring's peak: each
    weight's factors are read and applied on their own and the weights are scored in module partitions, one pass
    over the rows each (``attribution.bounded``; same scores; no self-influence or unit normalisation).
    ``gradient_checkpointing``: the model's blocks recompute their activations in the backward of each training
    batch (less memory on long rows; same scores; Hugging Face models). ``allow_missing_provenance``: use factors
    that record no model fingerprint (default: an error; the opt-in is recorded in the result's ``meta()``)."""

    preconditioner: PreconditionerKind = option(
        "ekfac",
        help="The curvature: ekfac | kfac | diagonal | identity (plain gradient dot product, needs no factors).",
    )
    damping: Damping | float = option(
        0.1, cli_type=float, help="Relative damping: λ = this × mean eigenvalue, per weight (in Python also a Damping)."
    )
    absolute_damping: float | None = option(None, help="Absolute λ instead of the relative rule.")
    batch_size: int = option(8, help="Rows per batch.", min=1)
    token_breakdown: Literal["none", "position", "target"] = option(
        "none", help="none | target | position: add each row's per-token scores as a token_scores column."
    )
    per_weight: bool = option(False, help="Add each row's score per weight as a weight_scores column.")
    self_influence: bool = option(False, help="Add each row's self-influence as a self_influence column.")
    row_loss: Literal["sum", "mean"] = option(
        "sum", help="A row's loss is its tokens' sum (as training weighs it) or mean (length-neutral)."
    )
    allow_subset: bool = option(
        False,
        help="When the factors miss weights the measurement reaches, score with the covered weights only "
        "(default: an error).",
    )
    token_aggregation: Literal["sum", "max", "window"] = option(
        "sum", help="sum | max | window: a row's score from its per-position contributions."
    )
    window: int = option(8, help="Positions per window for --token-aggregation window.", min=1)
    normalization: Literal["none", "length", "unit"] = option(
        "none", help="none | length (by sqrt(trained tokens)) | unit (by sqrt(self-influence), RelatIF)."
    )
    max_memory: int | str | None = option(
        None,
        help="Bound the peak memory (e.g. 3GiB): factors read one weight at a time, weights scored in module "
        "partitions (and fitted so, if fitted here).",
    )
    gradient_checkpointing: bool = option(
        False, help="Recompute the blocks' activations in the backward (less memory on long rows; same scores)."
    )
    allow_missing_provenance: bool = option(
        False,
        help="Score with factors (or an SAE) that record no model fingerprint; the opt-in is recorded in the "
        "scores' metadata (default: an error).",
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "damping", resolve_damping(self.damping, self.absolute_damping))
        if self.max_memory is not None:
            try:
                parse_size(self.max_memory)  # a bad size is an error here, not after the factors are loaded
            except ValueError as err:
                raise ValueError(f"max_memory (--max-memory): {err}") from None
        if self.token_aggregation not in ("sum", "max", "window"):
            raise ValueError(f"token_aggregation must be 'sum', 'max' or 'window', got {self.token_aggregation!r}")
        if self.window < 1:
            raise ValueError(f"window must be positive, got {self.window}")
        if self.normalization not in ("none", "length", "unit"):
            raise ValueError(f"normalization must be 'none', 'length' or 'unit', got {self.normalization!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.row_loss not in ("sum", "mean"):
            raise ValueError(f"row_loss must be 'sum' or 'mean', got {self.row_loss!r}")
        if self.token_breakdown not in ("none", "position", "target"):
            raise ValueError(f"token_breakdown must be 'none', 'position' or 'target', got {self.token_breakdown!r}")


@dataclass
class InfluenceResult:
    """Scores of the training rows, in the order of the data given.

    ``scores [N]`` (float64); ``indices``: each row's original index; ``weights``: the weights scored over;
    ``per_weight[name] [N]`` (sums to ``scores`` over names); ``per_token[i] [T_i]``: row ``i``'s score split over
    its tokens (``token_breakdown``: entry ``t`` is the part due to learning token ``t`` for ``"target"``, zero off
    the loss mask; the part due to the weights acting at position ``t`` for ``"position"``), summing to
    ``scores[i]``; ``self_influence [N]``: ``∇L(row)ᵀ (G + λI)⁻¹ ∇L(row)``; ``notes``: what was restricted or
    assumed, worth printing; ``row_loss``: ``"sum"`` or ``"mean"`` (see ``InfluenceConfig``);
    ``allow_missing_provenance``: the caller opted in to factors without a model fingerprint (recorded in ``meta()``).
    """

    scores: torch.Tensor
    indices: list[int]
    weights: list[str]
    measurement: str
    preconditioner: str
    damping: dict[str, float]
    per_weight: dict[str, torch.Tensor] | None = None
    per_token: list[torch.Tensor] | None = None
    self_influence: torch.Tensor | None = None
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    row_loss: str = "sum"
    allow_missing_provenance: bool = False

    def per_layer(self) -> dict[int, torch.Tensor]:
        """``per_weight`` summed within each block: ``{layer: [N]}``."""
        if self.per_weight is None:
            raise ValueError("scores were computed without per_weight=True")
        out: dict[int, torch.Tensor] = {}
        for name, values in self.per_weight.items():
            layer = int(name.split(".")[1])
            out[layer] = out[layer] + values if layer in out else values.clone()
        return out

    def meta(self) -> dict[str, Any]:
        """JSON-ready description of how the scores were made (for a scores file's sidecar)."""
        meta = {
            "measurement": self.measurement,
            "preconditioner": self.preconditioner,
            "weights": self.weights,
            "row_loss": self.row_loss,
            "damping": self.damping,
            "notes": self.notes,
            "timings_s": self.timings,
            "sign": "positive = training on the row raises the measurement",
        }
        if self.allow_missing_provenance:
            meta["allow_missing_provenance"] = True
        return meta


def resolve_weights(
    adapter: ModelAdapter,
    measurement: Measurement,
    available: Sequence[str] | None = None,
    *,
    allow_subset: bool = False,
    what: str = "the factors",
) -> tuple[list[str], list[str]]:
    """The weights to score over and notes saying why: the measurement's reach, within ``available`` (the fitted
    factors' or a store's weights). Missing reached weights are an error unless ``allow_subset``."""
    notes = []
    reached = measurement.weights(adapter)
    layer = measurement.reach(adapter)
    if layer is not None and layer < adapter.n_layers - 1:
        notes.append(
            f"the measurement reads layer {layer}: using the {len(reached)} weights of blocks 0..{layer} "
            f"(blocks {layer + 1}..{adapter.n_layers - 1} get no gradient from it)"
        )
    if available is not None:
        missing = [n for n in reached if n not in set(available)]
        reached = [n for n in reached if n in set(available)]
        if not reached:
            raise ValueError(f"{what} cover none of the weights the measurement reaches ({measurement.description})")
        if missing and not allow_subset:
            upto = f" up to layer {layer}" if layer is not None else ""
            raise FactorMismatchError(
                f"{what} cover {len(reached)} of the {len(reached) + len(missing)} weights the measurement reaches "
                f"(missing {missing[:4]}{' ...' if len(missing) > 4 else ''}); fit factors for every weight{upto} "
                "(fit-factors --concept C, or without --up-to-layer), or pass --allow-subset (allow_subset=True) "
                "to score with the covered weights only"
            )
        if missing:
            notes.append(
                f"{len(missing)} reached weights have no factors and are left out: {missing[:6]}"
                + (" ..." if len(missing) > 6 else "")
            )
    return reached, notes


def build_preconditioner(
    adapter: ModelAdapter, names: Sequence[str], factors: Factors | Preconditioner | None, config: InfluenceConfig
) -> Preconditioner:
    if isinstance(factors, Preconditioner):
        return factors.restrict(names)
    if factors is None:
        if config.preconditioner != "identity":
            raise ValueError(
                f"the {config.preconditioner} preconditioner needs fitted factors (fit_factors / fit-factors)"
            )
        shapes = {}
        for name in names:
            info = adapter.weight_info(name)
            shapes[name] = (info.d_out, info.d_in + int(info.has_bias))
        return IdentityPreconditioner(shapes)
    return factors.restrict(names).preconditioner(config.preconditioner, config.damping)


def score_rows(
    adapter: ModelAdapter,
    data: Sequence[Any],
    vectors: dict[str, torch.Tensor],
    *,
    batch_size: int = 8,
    token_breakdown: str = "none",
    per_weight: bool = False,
    self_preconditioner: Preconditioner | None = None,
    windows: Sequence[int] = (),
    window_columns: Sequence[int] | None = None,
    progress: bool = True,
    gradient_checkpointing: bool = False,
    in_step: bool = False,
    filler_row: Any = None,
    owners: Mapping[str, int] | None = None,
    stacked: int = 0,
) -> dict[str, Any]:
    """``score(row) = −Σ_w ⟨v_w, ∇_w L(row)⟩`` for tokenised rows, with ``v_w = P_w⁻¹ ∇_w f`` given
    (``[d_out, d_in']`` per weight). Returns ``{"scores": [N], "per_weight": {name: [N]}?, "per_token": [[T_i]]?,
    "self_influence": [N]?, "windows": {w: [N]}?}`` (float64, CPU) in the order of ``data``; ``windows[w]`` is
    the largest sum of the per-position contributions over ``w`` consecutive positions of each row (``w=1``: the
    largest single position). With several measurements, ``window_columns`` limits the windows to those columns
    (the others stay 0).

    Several measurements in one pass: vectors ``[K, d_out, d_in']`` give scores (and per-weight scores)
    ``[N, K]``; the token breakdown then is not available. ``gradient_checkpointing``: the blocks recompute their
    activations in the backward (less memory on long rows, same scores). ``in_step``: a model sharded over several
    ranks; this rank's share of the rows is padded with dropped batches to the busiest rank's count. ``owners``
    (``{weight: rank}``, every weight scored; sharded questions): ``vectors`` holds this rank's weights only, and
    each weight's ``v_w`` is sent by its owner inside the backward when its output gradient arrives (one weight's
    vector at a time on a rank that does not own it). ``stacked`` (with ``owners``): the number of measurements ``K``
    the vectors stack (``[K, d_out, d_in']``, a rank may hold none to tell); 0: one measurement."""
    infos = [adapter.weight_info(n) for n in (vectors if owners is None else owners)]
    if owners is not None and self_preconditioner is not None:
        raise ValueError("self-influence needs every weight's factors on the rank that scores a row: not sharded")
    if token_breakdown == "target" and adapter.sharded:
        raise ValueError(
            "token_breakdown='target' (--token-breakdown target) differentiates the weights themselves: not "
            "available on a model sharded with FSDP; use 'position'"
        )
    n = len(data)
    extra = tuple(next(iter(vectors.values())).shape[:-2]) if owners is None else ((stacked,) if stacked else ())
    if extra and token_breakdown != "none":
        raise ValueError("the token breakdown needs one measurement at a time")
    scores = torch.zeros(n, *extra, dtype=torch.float64)
    weight_scores = {info.name: torch.zeros(n, *extra, dtype=torch.float64) for info in infos} if per_weight else None
    token_scores: list[torch.Tensor] | None = [torch.empty(0)] * n if token_breakdown != "none" else None
    self_scores = torch.zeros(n, dtype=torch.float64) if self_preconditioner is not None else None
    window_scores = {int(w): torch.zeros(n, *extra, dtype=torch.float64) for w in windows}
    # contract in the model's precision, at least float32 (float64 models stay float64)
    work_dtype = torch.promote_types(adapter.dtype, torch.float32)
    vectors_here = {name: v.to(device=adapter.device, dtype=work_dtype) for name, v in vectors.items()}
    by_name = {info.name: info for info in infos}
    vector_of = _vector_source(adapter, vectors_here, by_name, owners, work_dtype, extra)
    acc: dict[str, torch.Tensor] = {}  # the batch's "rows" [B(, K)] and "tokens" [B, T(, K)], summed over weights
    stash: dict[str, torch.Tensor] = {}  # input activations waiting for their weight's output gradient
    where: dict[str, Any] = {}  # the batch in progress: "rows" (positions in data), "attention"

    def on_activation(name: str, a: torch.Tensor) -> None:
        if name in stash:
            raise RuntimeError(
                f"{name}: the module is called twice in one forward pass; scoring streams one input "
                "and one output gradient per weight and batch"
            )
        stash[name] = a

    def on_output_grad(name: str, g: torch.Tensor) -> None:
        """One weight's contribution, folded in as its output gradient arrives (its a and g are then freed)."""
        if where.get("dummy"):
            if owners is not None:
                vector_of(name)  # a collective: the padding batch receives the vector too
            stash.pop(name, None)
            return
        v = vector_of(name)
        rows = where["rows"]
        a = _fold(stash.pop(name), by_name[name], where["attention"]).to(work_dtype)
        g = g.to(work_dtype)
        grads = None
        if extra and token_breakdown == "none":
            # several measurements: form each row's gradient once, then one inner product per measurement
            # (B·d²·(T + K) instead of B·T·K·d² for the per-token contraction)
            grads = per_example_gradients(a, g)  # [B, d_out, d_in']
            contrib_rows = -torch.einsum("boi,koi->bk", grads, v)
            if window_scores:
                cols = list(range(extra[0])) if window_columns is None else list(window_columns)
                _accumulate(acc, "tokens", -token_contractions(a, g, v[cols]))  # [B, T, K_w]
        else:
            contrib = -token_contractions(a, g, v)  # [B, T] (or [B, T, K])
            contrib_rows = contrib.sum(dim=1)
            _accumulate(acc, "tokens", contrib)
        if weight_scores is not None:
            weight_scores[name][rows] = contrib_rows.double().cpu()
        _accumulate(acc, "rows", contrib_rows)
        if self_scores is not None:
            grads = per_example_gradients(a, g) if grads is None else grads  # [B, d_out, d_in']
            self_scores[rows] += self_preconditioner.inner({name: grads}, {name: grads}).double().cpu()
        del grads

    with (
        gradient_mode(adapter, infos) as params,
        tqdm(total=n, desc="scoring rows", unit="row", disable=not progress) as bar,
    ):
        # rows of similar length together (little padding); every result goes to the row's own position
        def run(batch: dict[str, torch.Tensor], dummy: bool = False) -> None:
            acc.clear()
            stash.clear()
            where.update(rows=batch["position"], attention=batch["attention_mask"], dummy=dummy)
            with adapter.capture_weights(
                list(by_name),
                on_activation=on_activation,
                on_output_grad=on_output_grad,
                checkpointing=gradient_checkpointing,
            ) as capture:
                loss_backward(adapter, batch, capture.outputs, fisher="empirical")
            stash.clear()

        if in_step:  # the busiest rank's number of batches, each rank padding its own with dropped ones
            for _ in range(max_over_ranks(n_batches(n, batch_size)) - n_batches(n, batch_size)):
                run(next(iter_batches([filler_row if filler_row is not None else data[0]], 1)), dummy=True)
        for batch in iter_batches(data, batch_size, pad_id=getattr(data, "pad_token_id", 0), by_length=True):
            B = int(batch["input_ids"].shape[0])
            rows = batch["position"]
            run(batch)
            total_rows = acc.get("rows")
            total_tokens = acc.get("tokens")
            if total_rows is None:  # no tracked weight reached by the loss
                total_rows = torch.zeros(B, *extra, dtype=work_dtype)
                if token_breakdown != "none" or window_scores:
                    total_tokens = torch.zeros(batch["input_ids"].shape + extra, dtype=work_dtype)
            check_finite(
                total_rows if total_rows.ndim == 1 else total_rows.sum(dim=-1),
                "scoring: the training-row gradients' contraction",
                batch["index"],
                hint="the model's activations or gradients on this row are not finite",
            )
            scores[rows] = total_rows.double().cpu()
            if window_scores:
                assert total_tokens is not None
                for w in window_scores:
                    best = window_max(total_tokens.double(), batch["attention_mask"], w).cpu()
                    if extra and token_breakdown == "none" and window_columns is not None:
                        window_scores[w][rows.unsqueeze(1), torch.tensor(list(window_columns))] = best
                    else:
                        window_scores[w][rows] = best
            if token_scores is not None:
                if token_breakdown == "target":
                    total_tokens = target_token_scores(adapter, batch, infos, params, vectors_here)
                lengths = batch["attention_mask"].sum(dim=1).tolist()
                for b in range(B):
                    token_scores[int(rows[b])] = total_tokens[b, : int(lengths[b])].double().cpu()
            bar.update(B)
    out: dict[str, Any] = {"scores": scores}
    if weight_scores is not None:
        out["per_weight"] = weight_scores
    if token_scores is not None:
        out["per_token"] = token_scores
    if self_scores is not None:
        out["self_influence"] = self_scores
    if window_scores:
        out["windows"] = window_scores
    return out


def question_owners(adapter: ModelAdapter, fitted: Sequence[str], names: Sequence[str]) -> dict[str, int]:
    """``{weight: rank}`` of the scored ``names``, as the sharded fit of the ``fitted`` weights owned them (a rank
    scores with the factors it fitted; a rank may own none of ``names``)."""
    owners = factor_owners([adapter.weight_info(n) for n in fitted], dist_info()[1])
    return {name: owners[name] for name in names}


def owned(owners: Mapping[str, int]) -> list[str]:
    """The weights of ``owners`` that this rank owns (in ``owners``' order)."""
    rank = dist_info()[0]
    return [name for name, owner in owners.items() if owner == rank]


def gathered_kind_and_damping(kind: str | None, damping: Mapping[str, float]) -> tuple[str, dict[str, float]]:
    """Every rank's preconditioner kind and ``{weight: damping}`` merged (a collective; ``kind=None``: this rank
    preconditioned no weight)."""
    import torch.distributed as dist

    pieces: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(pieces, (kind, dict(damping)) if kind is not None else None)
    merged_kind = next(piece[0] for piece in pieces if piece is not None)
    return merged_kind, {k: v for piece in pieces if piece is not None for k, v in piece[1].items()}


def _vector_source(
    adapter: ModelAdapter,
    vectors: dict[str, torch.Tensor],
    infos: Mapping[str, WeightInfo],
    owners: Mapping[str, int] | None,
    dtype: torch.dtype,
    extra: tuple[int, ...] = (),
) -> Callable[[str], torch.Tensor]:
    """``name -> v_w [d_out, d_in']``: this rank's own vector, or (``owners``) the owner's, broadcast on the side
    group (a collective: every rank asks for the same weights in the same order, the backward's)."""
    if owners is None:
        return vectors.__getitem__
    import torch.distributed as dist

    group, rank = side_group(), dist.get_rank()  # created now, on every rank, before any backward

    def vector(name: str) -> torch.Tensor:
        src = owners[name]
        if src == rank:
            v = vectors[name].contiguous()  # a collective sends the storage as it lies
        else:
            info = infos[name]
            v = torch.empty(*extra, info.d_out, info.d_in + int(info.has_bias), dtype=dtype, device=adapter.device)
        dist.broadcast(v, src=src, group=group)
        return v

    return vector


def _accumulate(acc: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    acc[key] = value if key not in acc else acc[key] + value


def _fold(a: torch.Tensor, info: WeightInfo, attention: torch.Tensor) -> torch.Tensor:
    """``[B, T, d_in']``: an input activation with padding zeroed and the bias column appended."""
    mask = attention.to(device=a.device, dtype=a.dtype)
    a = a * mask.unsqueeze(-1)
    return fold_bias(a, mask) if info.has_bias else a


def window_max(contributions: torch.Tensor, attention_mask: torch.Tensor, window: int) -> torch.Tensor:
    """``[B]`` (or ``[B, K]``): for each row, the largest sum of ``contributions [B, T(, K)]`` over ``window``
    consecutive positions inside the row (``attention_mask [B, T]``, left-aligned); rows shorter than the window
    give their whole sum."""
    mask = attention_mask.to(contributions.device).bool()
    values = contributions if contributions.ndim == 3 else contributions.unsqueeze(-1)
    values = values * mask.unsqueeze(-1)
    B, T, K = values.shape
    lengths = mask.sum(dim=1)
    w = min(window, T)
    cumulative = torch.cat([values.new_zeros(B, 1, K), values.cumsum(dim=1)], dim=1)  # [B, T+1, K]
    sums = cumulative[:, w:] - cumulative[:, :-w]  # [B, T-w+1, K]: window starting at t
    starts = torch.arange(T - w + 1, device=values.device)
    valid = (starts.unsqueeze(0) + w) <= lengths.unsqueeze(1)  # [B, T-w+1]
    best = sums.masked_fill(~valid.unsqueeze(-1), float("-inf")).amax(dim=1)
    short = lengths < w  # the window does not fit: the whole row
    best[short] = values[short].sum(dim=1)
    return best if contributions.ndim == 3 else best.squeeze(-1)


def score_rows_sharded(
    adapter: ModelAdapter, data: Sequence[Any], vectors: dict[str, torch.Tensor], **options: Any
) -> dict[str, Any]:
    """``score_rows`` over the rows, split across the processes of ``torch.distributed`` when it is initialised
    (e.g. under ``torchrun``): each rank scores a contiguous share and every rank gets all the scores."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return score_rows(adapter, data, vectors, **options)
    rank, world, n = dist.get_rank(), dist.get_world_size(), len(data)
    lo, hi = rank * n // world, (rank + 1) * n // world
    local = score_rows(
        adapter,
        data[lo:hi],
        vectors,
        **{**options, "progress": options.get("progress", True) and rank == 0, "in_step": adapter.sharded},
        filler_row=data[0],
    )

    def gathered(part: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(n, *part.shape[1:], dtype=part.dtype)
        full[lo:hi] = part
        dist.all_reduce(full)
        return full

    out: dict[str, Any] = {"scores": gathered(local["scores"])}
    if "per_weight" in local:
        out["per_weight"] = {name: gathered(values) for name, values in local["per_weight"].items()}
    if "self_influence" in local:
        out["self_influence"] = gathered(local["self_influence"])
    if "windows" in local:
        out["windows"] = {w: gathered(values) for w, values in local["windows"].items()}
    if "per_token" in local:
        pieces: list[Any] = [None] * world
        dist.all_gather_object(pieces, [t.tolist() for t in local["per_token"]])
        out["per_token"] = [torch.tensor(t, dtype=torch.float64) for piece in pieces for t in piece]
    return out


def target_token_scores(
    adapter: ModelAdapter,
    batch: dict[str, torch.Tensor],
    infos: Sequence[WeightInfo],
    params: Sequence[torch.nn.Parameter],
    vectors: dict[str, torch.Tensor],
) -> torch.Tensor:
    """``c[b, s] = −∇_θ ℓ_s(row b)ᵀ v`` for every trained token ``s`` ``[B, T]`` (0 off the loss mask), with
    ``v = P⁻¹∇f`` given per weight in canonical layout.

    ``∇ℓ_sᵀ v = (softmax(z_{s−1}) − e_{y_s})ᵀ (J v)_{s−1}`` where ``J v`` is the derivative of the logits ``z``
    along ``v``, obtained by differentiating ``⟨Jᵀu, v⟩`` with respect to a dummy cotangent ``u`` (double backward;
    attention runs on PyTorch's math kernel here, the fused kernels have no double backward).
    """
    tangents: list[torch.Tensor] = []
    for info in infos:
        v = vectors[info.name]
        weight = adapter.parameter(info.param_name)
        tangents.append(info.from_canonical(v[:, : info.d_in]).to(weight.dtype).reshape(weight.shape))
        if info.bias_name is not None:
            bias = adapter.parameter(info.bias_name)
            tangents.append(v[:, -1].to(bias.dtype).reshape(bias.shape))
    device = adapter.device
    input_ids = batch["input_ids"].to(device)
    loss_mask = batch["loss_mask"].to(device)
    with _math_attention():
        logits = adapter.logits(input_ids, batch["attention_mask"].to(device))
        cotangent = torch.zeros_like(logits, requires_grad=True)
        vjp = torch.autograd.grad(logits, list(params), grad_outputs=cotangent, create_graph=True, allow_unused=True)
        inner = sum((g * t).sum() for g, t in zip(vjp, tangents, strict=True) if g is not None)
        (jvp,) = torch.autograd.grad(inner, cotangent)  # [B, T, V]: derivative of the logits along v
    with torch.no_grad():
        probs = torch.softmax(logits[:, :-1].double(), dim=-1)
        targets = input_ids[:, 1:]
        directional = (probs * jvp[:, :-1].double()).sum(-1) - jvp[:, :-1].double().gather(
            -1, targets.unsqueeze(-1)
        ).squeeze(-1)
        out = -directional * loss_mask[:, 1:].double()
    return torch.cat([torch.zeros_like(out[:, :1]), out], dim=1)


def aggregation_windows(config: InfluenceConfig) -> tuple[int, ...]:
    return {"sum": (), "max": (1,), "window": (config.window,)}[config.token_aggregation]


def aggregate_tokens(out: dict[str, Any], config: InfluenceConfig) -> None:
    """Replace the summed scores by the token aggregation ``config`` asks for (in place)."""
    if config.token_aggregation != "sum":
        out["scores"] = out["windows"][aggregation_windows(config)[0]]


def _trained_tokens(data: Sequence[Any]) -> torch.Tensor:
    return torch.tensor([max(int(sum(row.loss_mask[1:])), 1) for row in data], dtype=torch.float64)


def normalise_rows(out: dict[str, Any], config: InfluenceConfig, data: Sequence[Any]) -> None:
    """Row normalisation (in place, after ``row_loss``): ``length`` divides by ``sqrt(trained tokens)``, ``unit`` by
    ``sqrt(self-influence)`` (the cosine in the preconditioned metric, up to the measurement's norm)."""
    if config.normalization == "length":
        out["scores"] = out["scores"] / _trained_tokens(data).sqrt()
    elif config.normalization == "unit":
        out["scores"] = out["scores"] / out["self_influence"].clamp_min(1e-30).sqrt()


def per_token_mean(out: dict[str, Any], data: Sequence[Any]) -> None:
    """Rescale ``score_rows`` results from the summed to the mean token loss of each row (in place)."""
    counts = _trained_tokens(data)
    out["scores"] = out["scores"] / counts
    if "per_weight" in out:
        out["per_weight"] = {name: values / counts for name, values in out["per_weight"].items()}
    if "per_token" in out:
        out["per_token"] = [values / counts[i] for i, values in enumerate(out["per_token"])]
    if "self_influence" in out:
        out["self_influence"] = out["self_influence"] / counts**2


def _math_attention():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    except ImportError:  # pragma: no cover - older torch
        import contextlib

        return contextlib.nullcontext()


def check_factors_model(
    adapter: ModelAdapter,
    factors: Factors | Preconditioner | None,
    *,
    allow_missing_provenance: bool = False,
    where: str = "the factors given",
) -> list[str]:
    """Factors fitted on another model (parameters, by fingerprint) are an error, never used silently; factors that
    record no model fingerprint are an error unless ``allow_missing_provenance`` (then a note says so). A ready
    ``Preconditioner`` is the caller's own construction and is not checked. Returns the notes."""
    if not isinstance(factors, Factors):
        return []
    fitted_on = factors.fingerprints.get("model")
    if fitted_on is None:
        if not allow_missing_provenance:
            raise missing_provenance(where)
        return [f"{where} record no model fingerprint: used without a check (allow_missing_provenance)"]
    if fitted_on != adapter.fingerprint():
        raise FactorMismatchError(
            f"the factors were fitted for a different model (or changed weights) (model fingerprint: factors "
            f"{fitted_on!r}, this model {adapter.fingerprint()!r}); refit them on this model (fit_factors / "
            "fit-factors)"
        )
    return []


def preconditioned_gradient(
    preconditioner: Preconditioner, grad_f: dict[str, torch.Tensor], what: str
) -> dict[str, torch.Tensor]:
    """``P⁻¹ ∇f`` per weight, with ``∇f`` and the result checked to be finite (errors name the weight)."""
    check_finite_dict(grad_f, f"measurement gradient of {what} over the queries")
    vectors = preconditioner.apply_inverse(grad_f)
    check_finite_dict(vectors, f"preconditioned measurement gradient ({preconditioner.kind}; raise the damping?)")
    return vectors
