"""Factor files: ``factors.safetensors`` (+ a readable ``manifest.json``) in a folder, and the partial state of an
interrupted fit.

The manifest records fingerprints of the model's parameters, of the tokenised data and of the fit config (plus
the weight list). Loading factors against a different model or data raises ``FactorMismatchError``: factors are
never reused silently. Layout of the folder::

    manifest.json          {"format", "fingerprints": {"model", "data", "config"}, "config",
                           "weights": [{"name", "d_out", "d_in"}, ...] (in order), "n_rows", "n_tokens", "available"}
    factors.safetensors    "{weight}/activation_eigenvalues", ".../activation_eigenvectors",
                           ".../gradient_eigenvalues", ".../gradient_eigenvectors",
                           ".../eigenvalue_correction", ".../diagonal"   (those the fit produced)
    partial.safetensors    running sums of an unfinished fit, its state (JSON) in the file's metadata (deleted
                           once the fit completes)

Each artifact is one atomic file: ``factors.safetensors`` carries the manifest in its metadata (``manifest.json``
is a copy written after it, for people; the file's copy wins), and a checkpoint's state travels in the same file as
its sums, so a kill at any moment leaves either the old or the new version, never a mix that double-counts rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from concept_influence.curvature.config import FactorConfig
from concept_influence.curvature.eigen import Eigen
from concept_influence.curvature.factors import Factors, WeightFactors
from concept_influence.files import atomic_file, read_json_file, write_json_atomic
from concept_influence.models.fingerprint import ALLOW_MISSING_PROVENANCE, missing_provenance
from concept_influence.numerics import check_finite
from concept_influence.tensorfile import DamagedFileError, read_tensor_file, read_tensor_metadata

logger = logging.getLogger(__name__)

FORMAT = "concept_influence.factors/1"
MANIFEST = "manifest.json"
FACTORS_FILE = "factors.safetensors"
PARTIAL_MANIFEST = "partial.json"  # written by older versions next to the sums; only removed now
PARTIAL_FILE = "partial.safetensors"
PARTS_FOLDER = "parts"  # a bounded fit's finished weights, one file each, until the factors file is written
FOLDER_FILES = (MANIFEST, FACTORS_FILE, PARTIAL_FILE, PARTIAL_MANIFEST, PARTS_FOLDER)  # what a fit writes in its folder
_META_KEY = "concept_influence"

_EIGEN_FIELDS = ("activation_eigen", "gradient_eigen")
_TENSOR_FIELDS = ("eigenvalue_correction", "diagonal")


class FactorMismatchError(ValueError):
    """Saved factors (or a partial fit) made for another model, data set or config."""


def data_fingerprint(rows: Sequence[Any]) -> str:
    """Hash of tokenised rows (``index``, ``input_ids``, ``loss_mask`` of each, in order); 16 hex chars."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(str(row.index).encode())
        digest.update(b"|")
        digest.update(",".join(map(str, row.input_ids)).encode())
        digest.update(b"|")
        digest.update(",".join(map(str, row.loss_mask)).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def config_fingerprint(config: FactorConfig, weights: Sequence[str]) -> str:
    payload = json.dumps({"config": config.to_dict(), "weights": list(weights)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def check_fingerprints(
    found: Mapping[str, str],
    expected: Mapping[str, str | None],
    where: str,
    *,
    allow_missing: bool = False,
    opt_in: str | None = ALLOW_MISSING_PROVENANCE,
) -> None:
    """Raise ``FactorMismatchError`` naming each fingerprint of ``expected`` (non-None) that differs; one that
    ``found`` lacks is a ``MissingProvenanceError`` unless ``allow_missing``."""
    missing = [k for k, v in expected.items() if v is not None and found.get(k) is None]
    if missing and not allow_missing:
        raise missing_provenance(where, " or ".join(missing), opt_in)
    wrong = [k for k, v in expected.items() if v is not None and found.get(k) is not None and found.get(k) != v]
    if wrong:
        details = "; ".join(f"{k}: saved {found.get(k)!r}, current {expected[k]!r}" for k in wrong)
        hints = {
            "model": "a different model (or changed weights)",
            "data": "different training data or tokenisation",
            "config": "a different fit config or weight list",
        }
        raise FactorMismatchError(
            f"{where} were fitted for {', '.join(hints[k] for k in wrong if k in hints)} ({details}). "
            "Refit them (fit-factors) or point to the right folder; factors are never reused across models or data."
        )


def _atomic_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """One file: the tensors plus ``meta`` (JSON) in the safetensors header, renamed into place."""
    with atomic_file(path) as tmp:
        save_file(
            {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
            str(tmp),
            metadata={_META_KEY: json.dumps(meta, sort_keys=True)},
        )


def _file_meta(path: Path) -> dict[str, Any] | None:
    """The JSON this module stored in a safetensors header (None for files written without it); the file is read
    through one descriptor (``tensorfile``), so a writer replacing it meanwhile is never half-seen."""
    return _meta_of(read_tensor_metadata(path), path)


def _meta_of(metadata: Mapping[str, str], path: Path) -> dict[str, Any] | None:
    raw = metadata.get(_META_KEY)
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as error:
        raise DamagedFileError(f"{path}: its stored state is not valid JSON ({error}); the file is damaged") from None
    if not isinstance(meta, dict):
        raise DamagedFileError(f"{path}: its stored state is not a JSON object; the file is damaged")
    return meta


def has_factors(path: str | os.PathLike) -> bool:
    """Whether the folder holds a complete factor fit."""
    return (Path(path) / FACTORS_FILE).exists() or (Path(path) / MANIFEST).exists()


def save_factors(factors: Factors, path: str | os.PathLike) -> Path:
    """Write ``factors`` to the folder ``path`` (created); returns it."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = factor_tensors(factors.weights)
    weights = [{"name": name, "d_out": w.d_out, "d_in": w.d_in} for name, w in factors.weights.items()]
    manifest = {
        "format": FORMAT,
        "fingerprints": dict(factors.fingerprints),
        "config": factors.config.to_dict(),
        "weights": weights,
        "n_rows": factors.n_rows,
        "n_tokens": factors.n_tokens,
        "available": factors.available(),
        "provenance": dict(factors.provenance),
    }
    _atomic_tensors(folder / FACTORS_FILE, tensors, manifest)  # the artifact: complete once this rename is done
    write_json_atomic(folder / MANIFEST, manifest)
    return folder


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the factors in a folder (from ``factors.safetensors``'s header; ``manifest.json`` for
    files written by older versions)."""
    folder = Path(path)
    file = folder / MANIFEST
    manifest = _file_meta(folder / FACTORS_FILE) if (folder / FACTORS_FILE).exists() else None
    if manifest is None:
        if not file.exists():
            raise FileNotFoundError(f"no factors at {folder} (missing {FACTORS_FILE}); fit them with fit-factors")
        manifest = read_json_file(file, error=FactorMismatchError)
    else:
        file = folder / FACTORS_FILE
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise FactorMismatchError(f"{file}: unknown format {found!r} (expected {FORMAT!r})")
    problem = next(
        (
            k
            for k, t in (("fingerprints", dict), ("config", dict), ("weights", list))
            if not isinstance(manifest.get(k), t)
        ),
        None,
    )
    if problem is None:
        problem = next(
            (
                f"weights[{i}]"
                for i, e in enumerate(manifest["weights"])
                if not isinstance(e, dict)
                or not isinstance(e.get("name"), str)
                or any(isinstance(e.get(k), bool) or not isinstance(e.get(k), int) for k in ("d_out", "d_in"))
            ),
            None,
        )
    if problem is not None:
        raise FactorMismatchError(
            f"{file}: the manifest's {problem!r} is missing or of the wrong type (damaged factors); refit them"
        )
    return manifest


def load_factors(
    path: str | os.PathLike,
    *,
    model_fingerprint: str | None = None,
    data_fingerprint: str | None = None,
    config_fingerprint: str | None = None,
    weights: Sequence[str] | None = None,
    allow_missing_provenance: bool = False,
) -> Factors:
    """Read factors from a folder, checking each given fingerprint against the manifest (mismatch: error; a
    fingerprint the manifest lacks: error unless ``allow_missing_provenance``).
    ``weights``: read only these weights' tensors (the rest of the file is not loaded; unknown names: error)."""
    folder = Path(path)
    manifest = read_manifest(folder)
    check_fingerprints(
        manifest["fingerprints"],
        {"model": model_fingerprint, "data": data_fingerprint, "config": config_fingerprint},
        f"the factors in {folder / FACTORS_FILE}",
        allow_missing=allow_missing_provenance,
    )
    entries = manifest["weights"]
    if weights is None:
        tensors = read_tensor_file(folder / FACTORS_FILE).tensors
    else:
        known = {e["name"]: e for e in entries}
        missing = [n for n in weights if n not in known]
        if missing:
            raise KeyError(f"no factors for {missing} in {folder}; it covers {list(known)}")
        entries = [known[n] for n in weights]
        prefixes = tuple(f"{n}/" for n in weights)
        tensors = read_tensor_file(folder / FACTORS_FILE, lambda key: key.startswith(prefixes)).tensors
    found: dict[str, WeightFactors] = {}
    for entry in entries:
        name = entry["name"]
        w = WeightFactors(d_out=int(entry["d_out"]), d_in=int(entry["d_in"]))
        for fld in _EIGEN_FIELDS:
            key = f"{name}/{fld}"
            if key + "values" in tensors:
                setattr(w, fld, Eigen(tensors[key + "values"], tensors[key + "vectors"]))
        for fld in _TENSOR_FIELDS:
            if f"{name}/{fld}" in tensors:
                setattr(w, fld, tensors[f"{name}/{fld}"])
        found[name] = w
    for key, value in tensors.items():
        check_finite(value, f"loading factors from {folder}: {key}", hint="the file is damaged; refit the factors")
    return Factors(
        weights=found,
        config=FactorConfig.from_dict(manifest["config"]),
        n_rows=int(manifest.get("n_rows", 0)),
        n_tokens=int(manifest.get("n_tokens", 0)),
        fingerprints=dict(manifest["fingerprints"]),
        provenance=dict(manifest.get("provenance") or {}),
    )


def save_partial(path: str | os.PathLike, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Save an unfinished fit: ``state`` (JSON: fingerprints, stage, rows done, counts) and its running sums, in one
    file (the state in its header), so the two always belong together."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_tensors(folder / PARTIAL_FILE, tensors, {"format": FORMAT, **state})


def load_partial(
    path: str | os.PathLike, fingerprints: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """The partial state in ``path`` and its running sums, read together from one open file (or None); raises
    ``FactorMismatchError`` if it belongs to another fit. A damaged checkpoint (truncated, malformed, not finite) is
    discarded with a warning and None is returned: the fit then starts over instead of crashing or resuming from
    wrong sums."""
    folder = Path(path)
    file = folder / PARTIAL_FILE
    if not file.exists():
        return None
    try:
        stored = read_tensor_file(file)
        state = _meta_of(stored.metadata, file)
        if state is not None:
            if not isinstance(state.get("stage", "covariance"), str) or not isinstance(state.get("rows_done", 0), int):
                raise DamagedFileError(f"{file}: its stored state has no valid stage or row count")
            for key, value in stored.tensors.items():
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    raise DamagedFileError(f"{file}: the running sum {key!r} holds values that are not finite")
    except DamagedFileError as error:
        logger.warning(
            "discarding a damaged checkpoint of the factor fit (%s): the fit starts again from its first pass", error
        )
        clear_partial(folder)
        return None
    if state is None:  # an older version's checkpoint, whose state file may not match its sums: start over
        return None
    check_fingerprints(state.get("fingerprints", {}), fingerprints, f"the partial fit in {folder}", opt_in=None)
    return state, stored.tensors


def read_partial_state(path: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON state of the partial fit in a folder (stage, rows done, counts, fingerprints), or None."""
    file = Path(path) / PARTIAL_FILE
    return _file_meta(file) if file.exists() else None


def clear_partial(path: str | os.PathLike) -> None:
    folder = Path(path)
    for name in (PARTIAL_FILE, PARTIAL_MANIFEST):
        (folder / name).unlink(missing_ok=True)


def factor_tensors(weights: Mapping[str, WeightFactors]) -> dict[str, torch.Tensor]:
    """The tensors of ``factors.safetensors`` for some weights (covariance matrices are not saved)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        for fld in _EIGEN_FIELDS:
            eig = getattr(w, fld)
            if eig is not None:
                # weights that share an input share its eigendecomposition: safetensors needs separate copies
                tensors[f"{name}/{fld}values"] = eig.values.detach().cpu().clone(memory_format=torch.contiguous_format)
                tensors[f"{name}/{fld}vectors"] = (
                    eig.vectors.detach().cpu().clone(memory_format=torch.contiguous_format)
                )
        for fld in _TENSOR_FIELDS:
            value = getattr(w, fld)
            if value is not None:
                tensors[f"{name}/{fld}"] = value.detach().cpu().contiguous()
    return tensors


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def save_factor_parts(
    factors: Factors,
    weights: Sequence[tuple[str, int, int]],
    sources: Mapping[str, tuple[Path, str]],
    path: str | os.PathLike,
    *,
    partitions: int = 1,
) -> Path:
    """Write one factor folder from the files of a partitioned fit, streaming one tensor at a time (the whole set
    never sits in memory). ``factors`` gives the config, counts, fingerprints and provenance (its ``weights`` are
    ignored); ``weights``: ``(name, d_out, d_in')`` in order; ``sources``: output tensor name -> (file, tensor in
    it) (weights that share an input point to the same eigendecomposition)."""
    from safetensors import safe_open

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    header: dict[str, Any] = {}
    offset = 0
    for key in sorted(sources):
        file, inner = sources[key]
        with safe_open(str(file), framework="pt") as handle:
            piece = handle.get_slice(inner)
            dtype, shape = piece.get_dtype(), piece.get_shape()
        size = _dtype_from_st(dtype).itemsize * int(torch.Size(shape).numel())
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    manifest = {
        "format": FORMAT,
        "fingerprints": dict(factors.fingerprints),
        "config": factors.config.to_dict(),
        "weights": [{"name": n, "d_out": d_out, "d_in": d_in} for n, d_out, d_in in weights],
        "n_rows": factors.n_rows,
        "n_tokens": factors.n_tokens,
        "available": _available(factors.config),
        "provenance": dict(factors.provenance),
        "partitions": partitions,
    }
    header["__metadata__"] = {_META_KEY: json.dumps(manifest, sort_keys=True)}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_file(folder / FACTORS_FILE) as tmp, open(tmp, "wb") as out:
        out.write(len(blob).to_bytes(8, "little"))
        out.write(blob)
        for key in sorted(sources):
            file, inner = sources[key]
            with safe_open(str(file), framework="pt") as handle:
                tensor = handle.get_tensor(inner).contiguous()
            if tensor.numel():
                out.write(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
            del tensor
    write_json_atomic(folder / MANIFEST, manifest)
    return folder


def _dtype_from_st(name: str) -> torch.dtype:
    return {v: k for k, v in _ST_DTYPES.items()}[name]


def _available(config: FactorConfig) -> list[str]:
    kinds = ["identity"]
    if config.needs_per_example_pass:
        kinds.append("diagonal")
    if config.needs_covariances:
        kinds.append("kfac")
        if config.preconditioner == "ekfac":
            kinds.append("ekfac")
    return kinds
