"""Two-sided projections of per-row weight gradients (pure tensor math: no files, no loops over data).

A weight's row gradient ``G = Σ_t g_t a_tᵀ`` ``[d_out, d_in']`` is stored as ``L G Rᵀ`` ``[r_out, r_in]`` with
``L [r_out, d_out]`` and ``R [r_in, d_in']``, computed as ``Σ_t (L g_t)(R a_t)ᵀ`` so the full gradient is never
formed. A question's preconditioned gradient ``V = (P + λ)⁻¹ ∇f`` is projected the same way, and the score
``−⟨V, G⟩`` is approximated by ``−⟨L V Rᵀ, L G Rᵀ⟩``:

- ``"eigen"`` (EKFAC eigenbasis): the row gradient is rotated into the Kronecker eigenbasis ``Q_Sᵀ G Q_A`` and only
  some components ``(o, i)`` are kept: across all stored weights, the ``Σ_w min(r, d_out)·min(r, d_in')``
  components with the largest ``Λ̂_oi / (Λ̂_oi + λ_w)`` (``Λ̂ = s ⊗ a`` KFAC's eigenvalue products, ``λ_w`` the
  default damping, 0.1 × mean ``Λ̂_w``): the directions the preconditioned score can see, whatever the question;
  known after the fit's first pass, so a store can be written during the fit's ``Λ`` pass. Per weight
  ``L``/``R`` are the rows of ``Q_Sᵀ``/``Q_Aᵀ`` of the output/input directions that own a kept component
  (orthonormal rows), and ``keep`` picks the kept entries of that rectangle. Since ``V``'s rotation is
  ``rot(∇f) / (Λ + λ)``, preconditioning is an exact elementwise division inside the kept subspace, and the score is
  exact when everything is kept.
- ``"logra"`` (LoGra-style): ``L``/``R`` are Gaussian with variance ``1/r`` (``E[LᵀL] = I``), regenerated from a
  seed and never stored; ``⟨L V Rᵀ, L G Rᵀ⟩`` is an unbiased estimate of ``⟨V, G⟩`` (Johnson–Lindenstrauss).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from concept_influence.curvature.config import Damping
from concept_influence.curvature.factors import Factors

KINDS = ("eigen", "logra")


@dataclass
class WeightProjection:
    """``left [r_out, d_out]``, ``right [r_in, d_in']`` (float64) of one weight."""

    name: str
    left: torch.Tensor
    right: torch.Tensor
    rows: torch.Tensor | None = None  # "eigen": the output / input eigen-directions of the rectangle
    cols: torch.Tensor | None = None
    keep: torch.Tensor | None = None  # flat indices of the kept entries of the [r_out, r_in] rectangle (None: all)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.left.shape[0]), int(self.right.shape[0]))

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1] if self.keep is None else int(self.keep.numel())


CALL_MACS = 300_000  # the cost of one more small product per row in multiply-adds (a few µs on a CPU core): what
# splitting a weight's rectangle into blocks must save to be worth it (``row_plan``)


@dataclass(frozen=True)
class RowPlan:
    """How the CPU path forms one weight's kept entries of ``L G_b Rᵀ``, row by row.

    The kept entries of an eigen projection are a staircase: visibility grows with the product of the two sides'
    eigenvalues, so the directions of small output eigenvalue keep only a few input directions of large
    eigenvalue, and the other way round. Forming the whole bounding rectangle costs every kept direction's
    projection on every token. ``split = (rs, cs)`` cuts it into three blocks that cover every kept entry:

    - the *core*, rectangle rows ``rs:`` × cols ``cs:``: ``Σ_t (L g_t)(R a_t)ᵀ`` from the tokens' projections;
    - the *row arm*, rows ``:rs`` × cols ``row_arm`` (within ``cs:``): ``L (Σ_t g_t (R a_t)ᵀ)``, the row's gradient
      against the core's input projections, then those rows of ``L`` once per row, not per token;
    - the *col arm*, rows ``col_arm`` (within ``rs:``) × cols ``:cs``: ``(Σ_t (L g_t) a_tᵀ) Rᵀ`` likewise.

    Rows ``:rs`` keep nothing in cols ``:cs``. The blocks are laid out one after another in ``size`` entries per
    row; ``gather`` picks each kept entry (in the projection's order) from there. The split minimises a count of
    multiply-adds per token (``row_plan``); ``(0, 0)`` is the whole rectangle. The same numbers as the one
    rectangle up to float round-off (summation order)."""

    split: tuple[int, int]
    row_arm: tuple[int, int]
    col_arm: tuple[int, int]
    size: int
    gather: torch.Tensor


def row_plan(
    shape: tuple[int, int], keep: torch.Tensor | None, d_out: int, d_in: int, tokens_per_row: float
) -> RowPlan:
    """The cheapest ``RowPlan`` of a ``shape`` rectangle keeping ``keep`` (flat indices; ``None``: all) for a weight
    ``[d_out, d_in']`` and rows of ``tokens_per_row`` tokens: multiply-adds per token of each split ``(rs, cs)``
    (the core's two projections and products, each arm's products, ``CALL_MACS`` per product and row), every
    admissible split tried at once."""
    r_out, r_in = shape
    kept = torch.ones(r_out * r_in, dtype=torch.bool)
    if keep is not None:
        kept = torch.zeros(r_out * r_in, dtype=torch.bool)
        kept[keep.long()] = True
    kept = kept.view(r_out, r_in)
    cols = torch.arange(r_in).expand(r_out, r_in)
    rows = torch.arange(r_out)[:, None].expand(r_out, r_in)
    # per row: its first and one past its last kept column (r_in and 0 when it keeps none); per column likewise
    first_col = torch.where(kept, cols, r_in).amin(1)
    end_col = torch.where(kept, cols + 1, 0).amax(1)
    first_row = torch.where(kept, rows, r_out).amin(0)
    end_row = torch.where(kept, rows + 1, 0).amax(0)

    def prefix(values: torch.Tensor, fill: int, op: Any) -> torch.Tensor:  # [n + 1]: op over the first k entries
        return torch.cat([torch.tensor([fill]), op(values, 0).values]) if values.numel() else torch.tensor([fill])

    ca, cb = prefix(first_col, r_in, torch.cummin), prefix(end_col, 0, torch.cummax)  # the row arm's cols, by rs
    ra, rb = prefix(first_row, r_out, torch.cummin), prefix(end_row, 0, torch.cummax)  # the col arm's rows, by cs
    t = float(max(tokens_per_row, 1.0))
    rs = torch.arange(r_out + 1, dtype=torch.float64)[:, None]
    cs = torch.arange(r_in + 1, dtype=torch.float64)[None, :]
    width = (cb - ca).clamp(min=0).double()[:, None]
    height = (rb - ra).clamp(min=0).double()[None, :]
    cost = d_out * (r_out - rs) + d_in * (r_in - cs) + (r_out - rs) * (r_in - cs) + CALL_MACS / t
    cost = cost + torch.where((rs > 0) & (width > 0), d_out * width + (rs * d_out * width + CALL_MACS) / t, 0.0)
    cost = cost + torch.where((cs > 0) & (height > 0), d_in * height + (height * d_in * cs + CALL_MACS) / t, 0.0)
    admissible = (ca.double()[:, None] >= cs) & (rs < r_out) & (cs < r_in)  # rows :rs keep nothing in cols :cs
    cost = torch.where(admissible, cost, math.inf)
    best = int(torch.argmin(cost))
    split_r, split_c = divmod(best, r_in + 1)
    if not bool(admissible.view(-1)[best]):
        split_r = split_c = 0
    row_arm = (int(ca[split_r]), int(cb[split_r])) if split_r else (0, 0)
    col_arm = (int(ra[split_c]), int(rb[split_c])) if split_c else (0, 0)
    core = (r_out - split_r) * (r_in - split_c)
    arm_r = split_r * max(row_arm[1] - row_arm[0], 0)
    o, i = rows[kept], cols[kept]  # the kept entries in the projection's (row-major) order
    in_core = (o >= split_r) & (i >= split_c)
    in_row_arm = o < split_r
    gather = torch.where(
        in_core,
        (o - split_r) * (r_in - split_c) + (i - split_c),
        torch.where(
            in_row_arm,
            core + (i - row_arm[0]) * split_r + o,  # the row arm is laid out [cols, rows]
            core + arm_r + (o - col_arm[0]) * split_c + i,
        ),
    )
    size = core + arm_r + split_c * max(col_arm[1] - col_arm[0], 0)
    return RowPlan((split_r, split_c), row_arm, col_arm, size, gather)


class Projector:
    """The projections of a list of weights, laid out one after another in a flat row vector of ``dim`` entries."""

    def __init__(self, kind: str, projections: Sequence[WeightProjection]) -> None:
        if kind not in KINDS:
            raise ValueError(f"projection kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.projections = {p.name: p for p in projections}
        self.offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for p in projections:
            self.offsets[p.name] = (start, start + p.size)
            start += p.size
        self.dim = start
        self._cache: dict[tuple[str, str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self._keep_cache: dict[tuple[str, str, torch.dtype], torch.Tensor] = {}
        self._plans: dict[tuple[str, int], RowPlan] = {}
        # weights reading one input (q, k, v; gate, in) usually keep the same input directions: ``R a_t`` is then
        # computed once per batch for the group (the first of a run of consecutive weights with equal ``R``)
        self.right_group: dict[str, str] = {}
        previous: WeightProjection | None = None
        for p in projections:
            same = (
                previous is not None and previous.right.shape == p.right.shape and torch.equal(previous.right, p.right)
            )
            self.right_group[p.name] = self.right_group[previous.name] if same and previous is not None else p.name
            previous = p

    @property
    def names(self) -> list[str]:
        return list(self.projections)

    def matrices(self, name: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (name, str(device), dtype)
        if key not in self._cache:
            p = self.projections[name]
            self._cache[key] = (p.left.to(device=device, dtype=dtype), p.right.to(device=device, dtype=dtype))
        return self._cache[key]

    def project_rows(
        self,
        name: str,
        a: torch.Tensor,
        g: torch.Tensor,
        out: torch.Tensor | None = None,
        memo: dict[tuple[int, str], torch.Tensor] | None = None,
        tokens: tuple[torch.Tensor, int, int] | None = None,
    ) -> torch.Tensor:
        """``L G_b Rᵀ`` flattened, for ``a [B, T, d_in']``, ``g [B, T, d_out]`` -> ``[B, r_out·r_in]`` (the kept
        entries), written into ``out`` when given. With ``tokens = (index [N], B, T)``, ``a [N, d_in']`` and
        ``g [N, d_out]`` hold only the batch's real tokens, at flat positions ``index`` of ``[B·T]`` (sorted; padding
        is neither projected nor summed). ``memo`` (one dict per batch, the same ``a`` tensors alive throughout)
        shares ``R a_t`` between weights of one input with equal ``R``."""
        keep = self.keep_index(name, g.device)
        if tokens is not None and keep is not None and _row_by_row(g.device):
            return self._sum_rows_planned(name, a, g, tokens, out, memo)
        left, right = self.matrices(name, g.device, g.dtype)
        key = (id(a), self.right_group[name])
        projected_a = memo.get(key) if memo is not None else None
        if projected_a is None:
            projected_a = a.to(g.dtype) @ right.T
            if memo is not None:
                memo[key] = projected_a
        projected_g = g @ left.T
        if tokens is not None and _row_by_row(g.device):
            return self._sum_rows(name, projected_g, projected_a, tokens, keep, out)
        if tokens is not None:  # accelerators: one batched product over the zero-padded rows
            index, b, t = tokens

            def spread(x: torch.Tensor) -> torch.Tensor:  # [N, r] -> [B, T, r], zero at the padding
                return x.new_zeros(b * t, x.shape[-1]).index_copy_(0, index, x).view(b, t, -1)

            projected_g, projected_a = spread(projected_g), spread(projected_a)
        rect = torch.bmm(projected_g.transpose(1, 2), projected_a).reshape(projected_g.shape[0], -1)
        kept = rect if keep is None else torch.index_select(rect, 1, keep)
        return kept if out is None else out.copy_(kept)

    def _sum_rows(
        self,
        name: str,
        projected_g: torch.Tensor,
        projected_a: torch.Tensor,
        tokens: tuple[torch.Tensor, int, int],
        keep: torch.Tensor | None,
        out: torch.Tensor | None,
    ) -> torch.Tensor:
        """CPU, every entry of the rectangle kept: ``Σ_t (L g_t)(R a_t)ᵀ`` row by row over each row's run of real
        tokens (no padding in the products), each ``[r_out, r_in]`` rectangle formed straight in the row of ``out``."""
        index, b, t = tokens
        r_out, r_in = self.projections[name].shape
        if out is None:
            out = projected_g.new_empty(b, r_out * r_in if keep is None else int(keep.numel()))
        counts = torch.bincount(torch.div(index, t, rounding_mode="floor"), minlength=b).tolist()
        rect = projected_g.new_empty(r_out, r_in) if keep is not None else None
        start = 0
        for row, count in enumerate(counts):
            x, y = projected_g[start : start + count], projected_a[start : start + count]
            if rect is None:
                torch.mm(x.T, y, out=out[row].view(r_out, r_in))
            else:
                torch.mm(x.T, y, out=rect)
                torch.index_select(rect.view(-1), 0, keep, out=out[row])  # type: ignore[arg-type]
            start += count
        return out

    def row_plan(self, name: str, tokens_per_row: float) -> RowPlan:
        """The weight's ``RowPlan`` for rows of about ``tokens_per_row`` tokens (cached per power of two)."""
        bucket = 1 << max(0, round(math.log2(max(tokens_per_row, 1.0))))
        key = (name, bucket)
        if key not in self._plans:
            p = self.projections[name]
            self._plans[key] = row_plan(p.shape, p.keep, int(p.left.shape[1]), int(p.right.shape[1]), float(bucket))
        return self._plans[key]

    def _sum_rows_planned(
        self,
        name: str,
        a: torch.Tensor,
        g: torch.Tensor,
        tokens: tuple[torch.Tensor, int, int],
        out: torch.Tensor | None,
        memo: dict[tuple[int, str], torch.Tensor] | None,
    ) -> torch.Tensor:
        """CPU, some entries kept: the kept entries of ``L G_b Rᵀ`` by the weight's ``RowPlan`` (a dense core by
        token projections, the staircase's arms from the row's gradient against one side's projection; see
        ``RowPlan``), every row's blocks formed in one buffer, then one selection of the kept entries for the batch.
        ``a [N, d_in']``, ``g [N, d_out]``: the batch's real tokens (``tokens`` as in ``project_rows``)."""
        index, b, t = tokens
        counts = torch.bincount(torch.div(index, t, rounding_mode="floor"), minlength=b).tolist()
        plan = self.row_plan(name, index.numel() / max(b, 1))
        left, right = self.matrices(name, g.device, g.dtype)
        rs, cs = plan.split
        key = (id(a), f"{self.right_group[name]}:{cs}")
        pa = memo.get(key) if memo is not None else None
        if pa is None:
            pa = a.to(g.dtype) @ right[cs:].T  # the core's input side, [N, r_in - cs]
            if memo is not None:
                memo[key] = pa
        pg = g @ left[rs:].T  # the core's output side, [N, r_out - rs]
        core = (left.shape[0] - rs) * (right.shape[0] - cs)
        buffer = g.new_empty(b, plan.size)
        (ca, cb), (ra, rb) = plan.row_arm, plan.col_arm
        row_arm = g.new_empty(b, cb - ca, g.shape[1]) if rs and cb > ca else None  # (R a)ᵀ g of the row arm's cols
        col_arm = g.new_empty(b, rb - ra, a.shape[1]) if cs and rb > ra else None  # (L g)ᵀ a of the col arm's rows
        start = 0
        for row, count in enumerate(counts):
            x, y = pg[start : start + count], pa[start : start + count]
            torch.mm(x.T, y, out=buffer[row, :core].view(x.shape[1], y.shape[1]))
            if row_arm is not None:
                torch.mm(y[:, ca - cs : cb - cs].T, g[start : start + count], out=row_arm[row])
            if col_arm is not None:
                torch.mm(x[:, ra - rs : rb - rs].T, a[start : start + count].to(g.dtype), out=col_arm[row])
            start += count
        offset = core
        if row_arm is not None:  # [B, cb - ca, rs]: each row's (R a)ᵀ g against the arm's rows of L, one product
            size = rs * (cb - ca)
            buffer[:, offset : offset + size] = (row_arm.view(-1, g.shape[1]) @ left[:rs].T).view(b, size)
            offset += size
        if col_arm is not None:  # [B, rb - ra, cs]: each row's (L g)ᵀ a against the arm's cols of R
            size = (rb - ra) * cs
            buffer[:, offset : offset + size] = (col_arm.view(-1, a.shape[1]) @ right[:cs].T).view(b, size)
        gather = self._plan_gather(name, plan, g.device)
        if out is None:
            return torch.index_select(buffer, 1, gather)
        return out.copy_(torch.index_select(buffer, 1, gather))

    def _plan_gather(self, name: str, plan: RowPlan, device: torch.device) -> torch.Tensor:
        cache_key = (f"{name}:{plan.split}", str(device), torch.int64)
        if cache_key not in self._keep_cache:
            self._keep_cache[cache_key] = plan.gather.to(device=device, dtype=torch.int64)
        return self._keep_cache[cache_key]

    def keep_index(self, name: str, device: torch.device) -> torch.Tensor | None:
        """The weight's kept entries of its flattened ``[r_out, r_in]`` rectangle on ``device`` (``None``: all)."""
        keep = self.projections[name].keep
        if keep is None:
            return None
        cache_key = (name, str(device), torch.int64)
        if cache_key not in self._keep_cache:
            self._keep_cache[cache_key] = keep.to(device=device, dtype=torch.int64)
        return self._keep_cache[cache_key]

    def project_rotated(
        self,
        name: str,
        rotated_a: torch.Tensor,
        g: torch.Tensor,
        out: torch.Tensor | None = None,
        memo: dict[tuple[int, str], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``"eigen"`` only: ``L G_b Rᵀ`` flattened (the kept entries) from ``rotated_a = a @ Q_A`` ``[B, T, d_in']``
        (the input already rotated into the whole eigenbasis, as the factor fit's Λ pass does) and
        ``g [B, T, d_out]`` (both zero at padding): the input side is then a column selection, not a product.
        ``memo`` shares the selection between weights of one input, as in ``project_rows``."""
        p = self.projections[name]
        if p.cols is None:
            raise ValueError(f"{name}: only eigen projections can start from rotated inputs")
        left, _ = self.matrices(name, g.device, g.dtype)
        key = (id(rotated_a), self.right_group[name])
        projected_a = memo.get(key) if memo is not None else None
        if projected_a is None:
            full = p.cols.numel() == rotated_a.shape[-1]  # cols are sorted: all of them is the identity selection
            projected_a = (rotated_a if full else rotated_a.index_select(-1, p.cols.to(rotated_a.device))).to(g.dtype)
            if memo is not None:
                memo[key] = projected_a
        rect = torch.bmm((g @ left.T).transpose(1, 2), projected_a).reshape(g.shape[0], -1)
        kept = rect if p.keep is None else torch.index_select(rect, 1, p.keep.to(rect.device))
        return kept if out is None else out.copy_(kept)

    def project_matrix(self, name: str, matrix: torch.Tensor) -> torch.Tensor:
        """``L M Rᵀ`` flattened, for ``M [..., d_out, d_in']`` -> ``[..., r_out·r_in]`` (float64)."""
        left, right = self.matrices(name, matrix.device, torch.float64)
        out = (left @ matrix.to(torch.float64) @ right.T).reshape(*matrix.shape[:-2], -1)
        keep = self.projections[name].keep
        return out if keep is None else out[..., keep.to(out.device)]

    def project(self, matrices: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """A flat ``[..., dim]`` vector from per-weight matrices (weights not given are zero)."""
        first = next(iter(matrices.values()))
        out = torch.zeros(*first.shape[:-2], self.dim, dtype=torch.float64, device=first.device)
        for name, matrix in matrices.items():
            if name not in self.offsets:
                raise KeyError(f"the store has no projection for {name!r}; it covers {self.names}")
            start, end = self.offsets[name]
            out[..., start:end] = self.project_matrix(name, matrix)
        return out

    def inverse_curvature_diagonal(self, name: str, values: torch.Tensor, damping: float) -> torch.Tensor | None:
        """``"eigen"``: the projected ``(P + λ)⁻¹``, which is diagonal in the kept eigen-directions,
        ``1 / (Λ[rows, cols] + λ)`` flattened; ``None`` for projections that do not diagonalise it."""
        p = self.projections[name]
        if p.rows is None or p.cols is None:
            return None
        out = (1.0 / (values.double()[p.rows][:, p.cols] + damping)).reshape(-1)
        return out if p.keep is None else out[p.keep]

    def describe(self) -> list[dict[str, int | str]]:
        return [
            {"name": n, "r_out": p.shape[0], "r_in": p.shape[1], "kept": p.size, "offset": self.offsets[n][0]}
            for n, p in self.projections.items()
        ]


def _row_by_row(device: torch.device) -> bool:
    """Sum each row's tokens with its own small product (CPU: no padding in the products) rather than one batched
    product over zero-padded rows (accelerators, where one large kernel beats many small ones)."""
    return device.type == "cpu"


def visibility(factors: Factors, name: str, damping: Damping = Damping()) -> torch.Tensor:
    """``Λ̂ / (Λ̂ + λ)`` ``[d_out, d_in']`` of a weight, with ``Λ̂ = s ⊗ a`` KFAC's eigenvalue products (``s``, ``a``:
    the eigenvalues of ``S`` and ``A``) and ``λ`` the default damping of ``Λ̂``: how much of each eigen-component
    survives preconditioning, in ``[0, 1)``. KFAC's products rather than EKFAC's ``Λ`` because they are known
    after the fit's first pass, so the store can be written during the ``Λ`` pass itself (measured by
    ``bench/store_error.py``: the same Spearman and PR-AUC as selecting by ``Λ`` at every budget)."""
    w = factors.weights[name]
    if w.gradient_eigen is None or w.activation_eigen is None:
        raise ValueError(
            f"{name}: the eigen store needs KFAC/EKFAC factors (eigenbases); these have {factors.available()}"
        )
    values = torch.outer(w.gradient_eigen.values.double(), w.activation_eigen.values.double()).clamp_(min=0.0)
    return values / (values + damping.resolve(values))


def eigen_projector(
    factors: Factors, names: Sequence[str], rank: int, damping: Damping = Damping(), bins: int = 1 << 20
) -> Projector:
    """``"eigen"`` projections of ``names`` keeping ``Σ_w min(rank, d_out)·min(rank, d_in')`` eigen-components in all,
    those with the largest ``visibility`` (one threshold for every weight, found from a histogram so that no
    weight's values need to be held at once besides its own). A rank at least every weight's sizes keeps all."""
    for name in names:
        if name not in factors.weights:
            raise KeyError(f"no factors for {name!r}; the factors cover {factors.names}")
    shapes = {n: (factors.weights[n].d_out, factors.weights[n].d_in) for n in names}
    counts = visibility_counts(factors, names, damping, bins)
    threshold = visibility_threshold(counts, shapes, rank)
    return Projector("eigen", [eigen_projection(factors, name, threshold, damping) for name in names])


def visibility_counts(factors: Factors, names: Sequence[str], damping: Damping = Damping(), bins: int = 1 << 20):
    """``[bins]`` float64: how many eigen-components of ``names`` fall in each bin of ``visibility`` over [0, 1]
    (histograms of disjoint weight sets add up: a sharded build sums its ranks')."""
    counts = torch.zeros(bins, dtype=torch.float64)
    for name in names:
        vis = visibility(factors, name, damping).flatten()
        counts += torch.bincount((vis * bins).long().clamp_(0, bins - 1), minlength=bins).double()
    return counts


def visibility_threshold(counts: torch.Tensor, shapes: Mapping[str, tuple[int, int]], rank: int) -> float:
    """The visibility above which ``Σ_w min(rank, d_out)·min(rank, d_in')`` components are kept, from the histogram
    ``counts [bins]`` of every weight in ``shapes`` (``{name: (d_out, d_in')}``); ``-1``: keep everything."""
    if rank < 1:
        raise ValueError(f"rank must be positive, got {rank}")
    budget = sum(min(rank, d_out) * min(rank, d_in) for d_out, d_in in shapes.values())
    total = sum(d_out * d_in for d_out, d_in in shapes.values())
    if budget >= total:
        return -1.0
    bins = int(counts.shape[0])
    above = torch.flip(torch.cumsum(torch.flip(counts, [0]), 0), [0])  # above[b] = #values in bins >= b
    b = int(torch.nonzero(above >= budget).max())  # the highest bin that still fills the budget
    return b / bins


def eigen_projection(factors: Factors, name: str, threshold: float, damping: Damping = Damping()) -> WeightProjection:
    """One weight's ``"eigen"`` projection: its components with ``visibility >= threshold`` (at least its most
    visible one; ``threshold < 0``: all)."""
    w = factors.weights[name]
    vis = visibility(factors, name, damping)
    kept = vis >= threshold if threshold >= 0 else torch.ones_like(vis, dtype=torch.bool)
    if not kept.any():  # every weight keeps at least its most visible component
        kept = vis == vis.max()
    rows = torch.nonzero(kept.any(dim=1)).flatten()
    cols = torch.nonzero(kept.any(dim=0)).flatten()
    rect = kept[rows][:, cols].flatten()
    keep = None if bool(rect.all()) else torch.nonzero(rect).flatten()
    q_s, q_a = w.gradient_eigen.vectors.double(), w.activation_eigen.vectors.double()  # type: ignore[union-attr]
    return WeightProjection(name, q_s[:, rows].T.contiguous(), q_a[:, cols].T.contiguous(), rows, cols, keep)


def logra_projector(shapes: Mapping[str, tuple[int, int]], dim: int, seed: int) -> Projector:
    """``"logra"`` projections: Gaussian ``L [k_out, d_out]``, ``R [k_in, d_in']`` with variance ``1/k``,
    ``k = min(dim, d)``; each weight's pair drawn from a generator seeded by ``seed`` and the weight's name."""
    if dim < 1:
        raise ValueError(f"projection dim must be positive, got {dim}")
    projections = []
    for name, (d_out, d_in) in shapes.items():
        digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        k_out, k_in = min(dim, d_out), min(dim, d_in)
        left = torch.randn(k_out, d_out, generator=generator, dtype=torch.float64) / k_out**0.5
        right = torch.randn(k_in, d_in, generator=generator, dtype=torch.float64) / k_in**0.5
        projections.append(WeightProjection(name, left, right))
    return Projector("logra", projections)
