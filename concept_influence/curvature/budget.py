"""Memory arithmetic of a factor fit, from shapes only (no tensors): what ``fit_factors(max_memory=...)`` uses to
choose its module partitions and what ``concept-influence plan`` prints.

A weight ``[d_out, d_in']`` (``d_in' = d_in + 1`` with a folded bias) whose input may be shared with other weights
(q/k/v read one input, so do gate/up: their activation covariance is accumulated and decomposed once) costs, while
its partition is being fitted, with ``s`` the bytes of the statistics' dtype:

- running sums ``A`` (once per shared input) and ``S`` until their eigendecomposition: ``s·(d_in'² + d_out²)``;
- the eigenbases in the statistics' dtype for the Λ pass: ``s·(d_in'² + d_out²)``;
- the float64 eigendecompositions, unless they go to disk as soon as computed (``on_disk``): ``8·(d_in'² + d_out²)``;
- the Λ and diagonal sums ``2s·d_out·d_in'``, and their float64 results ``16·d_out·d_in'`` unless on disk.

One eigendecomposition at a time needs about ``4·8·d²`` bytes of work space (float64 copy, eigenvectors, LAPACK).
Weights that share an input are kept in one partition when they fit together, else split (their shared
covariance is then accumulated once per partition).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from concept_influence.curvature.config import FactorConfig

GiB = 1024**3
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
# kinds that read the same input tensor as another weight of their block
_SHARED_INPUT = {
    "attn.q": "attn.in",
    "attn.k": "attn.in",
    "attn.v": "attn.in",
    "mlp.gate": "mlp.in",
    "mlp.in": "mlp.in",
}


def parse_size(text: str | int | float) -> int:
    """``"3GiB"``, ``"512MiB"``, ``"2.5GB"``, ``"1e9"`` or a number -> bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    try:
        return int(float(text))
    except ValueError:
        pass
    match = _SIZE.match(text)
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a memory size: {text!r} (examples: 3GiB, 512MiB, 2.5GB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(n: float) -> str:
    for unit, size in (("TiB", 1024**4), ("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class WeightShape:
    """A tracked weight as the budget sees it: canonical ``d_out × d_in`` (``d_in`` includes a folded bias) and the
    key of the input it shares with other weights (``None``: its own)."""

    name: str
    d_in: int
    d_out: int
    shared_input: str | None = None


def shared_input_key(name: str, has_bias: bool) -> str | None:
    """``blocks.3.attn.k`` -> ``blocks.3.attn.in`` (q/k/v and gate/up read one input); ``None`` for the rest."""
    parts = name.split(".")
    if len(parts) < 3 or parts[0] != "blocks":
        return None
    key = _SHARED_INPUT.get(".".join(parts[2:]))
    return None if key is None else f"blocks.{parts[1]}.{key}/bias={int(has_bias)}"


def _stats_bytes(config: FactorConfig) -> int:
    return 8 if config.dtype == "float64" else 4


def weights_bytes(shapes: Sequence[WeightShape], config: FactorConfig, *, on_disk: bool = False) -> int:
    """Bytes held while fitting ``shapes`` in one partition (see the module docstring; no work space)."""
    s = _stats_bytes(config)
    per_matrix = 2 * s + (0 if on_disk else 8)  # sums (or eigenbasis for Λ), float64 eigen unless on disk
    seen: set[str] = set()
    total = 0
    for w in shapes:
        if config.needs_covariances:
            if w.shared_input is None or w.shared_input not in seen:
                total += per_matrix * w.d_in * w.d_in
            if w.shared_input is not None:
                seen.add(w.shared_input)
            total += per_matrix * w.d_out * w.d_out
        if config.needs_per_example_pass:
            n_stats = 2 if config.preconditioner == "ekfac" else 1
            total += n_stats * (s + (0 if on_disk else 8)) * w.d_out * w.d_in
    return total


def eigen_workspace_bytes(shapes: Sequence[WeightShape], config: FactorConfig) -> int:
    """Work space of the largest single eigendecomposition (0 without covariances)."""
    if not config.needs_covariances or not shapes:
        return 0
    d = max(max(w.d_in, w.d_out) for w in shapes)
    return 4 * 8 * d * d


def factor_bytes(shapes: Sequence[WeightShape]) -> int:
    """The KFAC factors ``A`` and ``S`` of every weight, float32, each weight counted on its own."""
    return sum(4 * (w.d_in * w.d_in + w.d_out * w.d_out) for w in shapes)


def partitions(
    shapes: Sequence[WeightShape], budget: int | None, config: FactorConfig, *, on_disk: bool = False
) -> list[list[WeightShape]]:
    """Split ``shapes`` (in order) into consecutive partitions each costing at most ``budget`` bytes
    (``weights_bytes``), keeping weights that share an input together when they fit together. ``None``: one
    partition. Raises ``ValueError`` when one weight alone does not fit."""
    if budget is None:
        return [list(shapes)]
    groups: list[list[WeightShape]] = []
    for w in shapes:
        if groups and w.shared_input is not None and groups[-1][-1].shared_input == w.shared_input:
            groups[-1].append(w)
        else:
            groups.append([w])
    out: list[list[WeightShape]] = []
    current: list[WeightShape] = []
    for group in groups:
        pieces = [group] if weights_bytes(group, config, on_disk=on_disk) <= budget else [[w] for w in group]
        for piece in pieces:
            need = weights_bytes(piece, config, on_disk=on_disk)
            if need > budget:
                raise ValueError(
                    f"the factors of {piece[0].name} alone need {format_size(need)}, more than the "
                    f"{format_size(budget)} the memory budget leaves for factors"
                )
            if current and weights_bytes(current + piece, config, on_disk=on_disk) > budget:
                out.append(current)
                current = []
            current = current + piece
    if current:
        out.append(current)
    return out


@dataclass(frozen=True)
class ModelShape:
    """What the activation estimate needs: sizes of the model and of one batch."""

    n_layers: int
    d_model: int
    d_ff: int
    vocab: int
    n_params: int
    param_bytes: int = 4


def activation_bytes(shape: ModelShape, batch_rows: int, row_tokens: int, *, head_chunk_elements: int) -> int:
    """Forward graph and backward work space of one batch through every block (about ``16·d_model + 5·d_ff``
    values per token and block, in the model's dtype, at least float32 for the loss), plus the loss head's logits
    for ``head_chunk_elements`` at a time (logits, their softmax and gradient: 3 float32 copies)."""
    tokens = batch_rows * row_tokens
    per_token = 16 * shape.d_model + 5 * shape.d_ff
    blocks = shape.n_layers * tokens * per_token * max(shape.param_bytes, 2)
    head = 3 * 4 * min(head_chunk_elements, tokens * shape.vocab)
    return blocks + head


def score_vector_bytes(w: WeightShape, work_bytes: int = 4) -> int:
    """Bytes one weight holds while it is scored: its measurement gradient and its preconditioned vector
    ``[d_out, d_in']`` in the scoring precision (``work_bytes``: 4 for float32, 8 for a float64 model)."""
    return 2 * work_bytes * w.d_out * w.d_in


def precondition_workspace_bytes(shapes: Sequence[WeightShape]) -> int:
    """The largest single weight's factors read back for preconditioning (float64 eigenbases ``d_out² + d_in'²``,
    Λ and the diagonal ``d_out·d_in'``) plus two rotated copies of its gradient."""
    if not shapes:
        return 0
    return max(8 * (w.d_out * w.d_out + w.d_in * w.d_in + 4 * w.d_out * w.d_in) for w in shapes)


def score_partitions(shapes: Sequence[WeightShape], budget: int | None, work_bytes: int = 4) -> list[list[WeightShape]]:
    """Consecutive partitions of ``shapes`` whose vectors (``score_vector_bytes``) fit in ``budget`` bytes each, for
    a scoring pass per partition. ``None``: one partition. Raises ``ValueError`` when one weight alone does not fit."""
    if budget is None:
        return [list(shapes)]
    out: list[list[WeightShape]] = []
    current: list[WeightShape] = []
    used = 0
    for w in shapes:
        need = score_vector_bytes(w, work_bytes)
        if need > budget:
            raise ValueError(
                f"the scoring vectors of {w.name} alone need {format_size(need)}, more than the "
                f"{format_size(budget)} the memory budget leaves for them"
            )
        if current and used + need > budget:
            out.append(current)
            current, used = [], 0
        current.append(w)
        used += need
    if current:
        out.append(current)
    return out
