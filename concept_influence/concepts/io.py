"""Concept files. A concept is a folder (written atomically; never pickled):

- ``concept.json``: ``format``, ``kind`` (``direction``, ``probe``, ``diff_of_means``, ``persona_vector``,
  ``sae_feature``), ``site`` (``resid.{layer}``), ``layer``, ``d_model``, ``readout`` (the sequence reduction:
  ``mean`` over response tokens, ``last_prompt`` or ``per_token``), ``token_readout`` (what is read at each token),
  ``model_fingerprint`` (the model it was made on), ``metrics`` (held-out AUC...), ``extra`` (spec name and hash,
  training config...), plus anything the caller adds (``extra_meta``).
- a direction: ``concept.safetensors`` holding ``direction [d_model]``;
- an SAE feature: the SAE as sae-lens saves it (``cfg.json`` + ``sae_weights.safetensors``, ``SAE.load_from_disk``
  reads it back), and ``feature``, ``d_sae``, ``architecture`` and the weights' SHA-256 in ``concept.json``.

Persona vectors saved by the persona-vectors code (``[n_layers + 1, d_model]``, row 0 = embeddings, row ``l + 1`` =
output of block ``l``) are read with ``load_persona_vector``.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from concept_influence.concepts.base import Concept, DirectionConcept, check_reduction
from concept_influence.concepts.sae_concept import SAEFeatureConcept
from concept_influence.files import (
    damaged,
    file_in_folder,
    read_json_file,
    replace_folder,
    temp_folder,
    write_json_atomic,
)
from concept_influence.models.base import ModelAdapter

FORMAT = "concept_influence.concept/1"
META_FILE = "concept.json"
TENSOR_FILE = "concept.safetensors"
DIRECTION_READOUT = "h · v / ‖v‖"
SAE_READOUT = "sae.encode(h)[..., feature]"


class ConceptFileError(ValueError):
    """A concept file that cannot be read, or that does not fit the model; the message names the file."""


def concept_meta(concept: Concept, *, model_fingerprint: str | None = None) -> dict[str, Any]:
    """The ``concept.json`` fields every kind shares (site, layer, d_model, readout, fingerprint, metrics, extra)."""
    if isinstance(concept, SAEFeatureConcept):
        kind, token_readout = "sae_feature", SAE_READOUT
        model_fingerprint = model_fingerprint if model_fingerprint is not None else concept.model_fingerprint
    elif isinstance(concept, DirectionConcept):
        kind, token_readout = concept.kind, DIRECTION_READOUT
    else:
        raise TypeError(f"cannot save a {type(concept).__name__} (DirectionConcept or SAEFeatureConcept)")
    return {
        "format": FORMAT,
        "kind": kind,
        "site": f"resid.{concept.layer}",
        "layer": int(concept.layer),
        "d_model": int(concept.d_model),
        "readout": concept.reduction,
        "token_readout": token_readout,
        "model_fingerprint": model_fingerprint,
        "metrics": jsonable(getattr(concept, "metrics", {})),
        "extra": jsonable(getattr(concept, "extra", {})),
    }


def concept_summary(concept: Concept) -> dict[str, Any]:
    """What a scores file records of the concept it scored: kind, site, readout, the model it was made on, its
    metrics (held-out AUC, and what it reads: ``stance_auc``, ``vocabulary_confound``) and the spec it came from."""
    meta = concept_meta(concept)
    extra = meta.pop("extra", {})
    meta.pop("format", None)
    if isinstance(extra, dict) and "spec" in extra:
        meta["spec"] = extra["spec"]
    return meta


def save_concept(
    concept: Concept,
    path: str | os.PathLike,
    *,
    model_fingerprint: str | None = None,
    extra_meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``concept`` into the folder ``path`` (created; replaced atomically if it exists). Returns the folder.

    ``model_fingerprint``: ``adapter.fingerprint()`` of the model it was made on (checked, with a warning, when
    loaded against another model); ``extra_meta``: more keys for ``concept.json`` (e.g. the model's name).
    """
    path = Path(path)
    if path.exists() and not (path.is_dir() and (not any(path.iterdir()) or (path / META_FILE).exists())):
        raise ConceptFileError(f"{path}: exists and is not a concept folder; not overwriting it")
    meta = concept_meta(concept, model_fingerprint=model_fingerprint)
    clash = sorted(set(extra_meta or {}) & set(meta))
    if clash:
        raise ValueError(f"extra_meta may not override {clash}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_folder(path)
    try:
        if isinstance(concept, SAEFeatureConcept):
            from sae_lens import __version__

            weights_path, config_path = concept.sae.save_model(tmp)
            meta.update(
                feature=int(concept.feature),
                d_sae=int(concept.d_sae),
                architecture=concept.sae.cfg.architecture(),
                sae_files={"weights": Path(weights_path).name, "config": Path(config_path).name},
                weights_sha256=sha256_file(weights_path),
                sae_lens_version=__version__,
            )
        else:
            save_file({"direction": concept.direction.detach().float().contiguous().cpu()}, str(tmp / TENSOR_FILE))
        meta.update(jsonable(extra_meta or {}))
        write_json_atomic(tmp / META_FILE, meta)
        replace_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_concept_meta(path: str | os.PathLike) -> dict[str, Any]:
    """``concept.json`` of a concept folder (``path``: the folder or its ``concept.json``), validated."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"concept not found: {path}")
    meta_file = path / META_FILE if path.is_dir() else path
    if not meta_file.exists() or meta_file.name != META_FILE:
        raise ConceptFileError(
            f"{path}: not a concept folder (expected {META_FILE} inside; made by train-probe, "
            "sae-feature or save_concept)"
        )
    meta = read_json_file(meta_file, error=ConceptFileError, object_only=False)
    if not isinstance(meta, dict):
        raise ConceptFileError(f"{meta_file}: expected a JSON object")
    for key in ("format", "kind", "layer", "d_model"):
        if key not in meta:
            raise ConceptFileError(f"{meta_file}: missing key {key!r}")
    if meta["format"] != FORMAT:
        raise ConceptFileError(f"{meta_file}: unknown format {meta['format']!r} (expected {FORMAT!r})")
    for key in ("layer", "d_model"):
        if isinstance(meta[key], bool) or not isinstance(meta[key], int) or meta[key] < 0:
            raise ConceptFileError(f"{meta_file}: {key!r} must be a non-negative integer, got {meta[key]!r}")
    try:
        check_reduction(meta.get("readout", "mean"))
    except ValueError as err:
        raise ConceptFileError(f"{meta_file}: 'readout': {err}") from None
    if meta["kind"] == "sae_feature":
        missing = [k for k in ("feature", "sae_files") if k not in meta]
        if missing:
            raise ConceptFileError(f"{meta_file}: an sae_feature concept needs keys {missing}")
    return meta


def check_against_model(meta: dict[str, Any], adapter: ModelAdapter, where: str) -> None:
    """Hidden size and layer must fit the model (errors naming ``where``); another fingerprint only warns (a base
    model's probe applied to its fine-tuned model is a normal use)."""
    if int(meta["d_model"]) != adapter.d_model:
        raise ConceptFileError(
            f"{where}: concept has hidden size {meta['d_model']} but the model has {adapter.d_model}"
        )
    if not 0 <= int(meta["layer"]) < adapter.n_layers:
        raise ConceptFileError(
            f"{where}: concept reads layer {meta['layer']} but the model has {adapter.n_layers} blocks "
            f"(0..{adapter.n_layers - 1})"
        )
    fingerprint = meta.get("model_fingerprint")
    if fingerprint and fingerprint != adapter.fingerprint():
        warnings.warn(
            f"{where}: concept was made on another model (fingerprint {fingerprint}); using it on this one",
            stacklevel=3,
        )


def load_concept(path: str | os.PathLike, adapter: ModelAdapter | None = None) -> Concept:
    """Read a concept folder; with ``adapter``, check that it fits the model (hidden size, layer) and put an SAE on
    the model's device. Errors name the file."""
    path = Path(path)
    meta = read_concept_meta(path)
    folder = path if path.is_dir() else path.parent
    try:
        return _load_concept(folder, meta, adapter)
    except (KeyError, TypeError, AttributeError, IndexError) as err:
        raise damaged(folder / META_FILE, err, "concept", ConceptFileError) from None


def _load_concept(folder: Path, meta: dict[str, Any], adapter: ModelAdapter | None) -> Concept:
    if adapter is not None:
        check_against_model(meta, adapter, str(folder))
    if meta["kind"] == "sae_feature":
        return _load_sae_feature(folder, meta, device="cpu" if adapter is None else str(adapter.device))
    tensor_file = folder / TENSOR_FILE
    if not tensor_file.exists():
        raise ConceptFileError(f"{folder}: missing {TENSOR_FILE}")
    try:
        tensors = load_file(str(tensor_file))
    except Exception as err:  # safetensors raises its own error types on corrupt files
        raise ConceptFileError(f"{tensor_file}: unreadable ({err})") from None
    if "direction" not in tensors:
        raise ConceptFileError(f"{tensor_file}: no 'direction' tensor")
    direction = tensors["direction"]
    if direction.numel() != int(meta["d_model"]):
        raise ConceptFileError(
            f"{tensor_file}: direction has {direction.numel()} entries but {META_FILE} says d_model {meta['d_model']}"
        )
    try:
        return DirectionConcept(
            direction,
            int(meta["layer"]),
            kind=meta["kind"],
            metrics=meta.get("metrics"),
            extra=meta.get("extra"),
            reduction=meta.get("readout", "mean"),
        )
    except ValueError as err:
        raise ConceptFileError(f"{tensor_file}: {err}") from None


def _load_sae_feature(folder: Path, meta: dict[str, Any], device: str) -> Concept:
    from sae_lens import SAE

    meta_file = folder / META_FILE
    files = meta["sae_files"]
    if not isinstance(files, dict) or not {"weights", "config"} <= set(files):
        raise ConceptFileError(f"{meta_file}: 'sae_files' must name 'weights' and 'config'")
    try:
        weights = file_in_folder(folder, files["weights"], f"{meta_file}: sae_files.weights")
        config = file_in_folder(folder, files["config"], f"{meta_file}: sae_files.config")
    except ValueError as err:
        raise ConceptFileError(str(err)) from None
    for file in (weights, config):
        if not file.is_file():
            raise ConceptFileError(f"{file}: missing (listed in {meta_file})")
    expected = meta.get("weights_sha256")
    if expected is not None and sha256_file(weights) != expected:
        raise ConceptFileError(f"{weights}: SHA-256 differs from the one recorded in {meta_file} (corrupt or replaced)")
    try:
        sae = SAE.load_from_disk(folder, device=device)
    except Exception as err:  # sae-lens raises json, safetensors, key and shape errors: name the files
        raise ConceptFileError(
            f"cannot load the SAE in {folder} ({config.name}, {weights.name}): {type(err).__name__}: {err}"
        ) from None
    if int(sae.cfg.d_in) != int(meta["d_model"]) or int(sae.cfg.d_sae) != int(meta.get("d_sae", sae.cfg.d_sae)):
        raise ConceptFileError(
            f"{meta_file}: records d_model {meta['d_model']}, d_sae {meta.get('d_sae')} but {config} has "
            f"d_in {sae.cfg.d_in}, d_sae {sae.cfg.d_sae}"
        )
    try:
        return SAEFeatureConcept(
            sae,
            int(meta["feature"]),
            int(meta["layer"]),
            model_fingerprint=meta.get("model_fingerprint"),
            metrics=meta.get("metrics"),
            extra=meta.get("extra"),
            reduction=meta.get("readout", "mean"),
        )
    except (TypeError, ValueError) as err:
        raise ConceptFileError(f"{meta_file}: {err}") from None


def load_persona_vector(path: str | os.PathLike, layer: int, adapter: ModelAdapter | None = None) -> DirectionConcept:
    """A persona vector file ``[n_layers + 1, d_model]`` (persona-vectors layout: row 0 = embeddings) or a single
    ``[d_model]`` vector, from ``.pt`` (loaded with ``weights_only=True``), ``.safetensors`` or ``.npy``; the
    concept reads ``resid.{layer}`` (row ``layer + 1``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"persona vector file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            tensors = load_file(str(path))
            if len(tensors) != 1:
                raise ConceptFileError(f"{path}: expected one tensor, found {sorted(tensors)}")
            vectors = next(iter(tensors.values()))
        elif path.suffix == ".npy":
            import numpy as np

            vectors = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            vectors = torch.load(path, map_location="cpu", weights_only=True)
    except ConceptFileError:
        raise
    except Exception as err:
        raise ConceptFileError(f"{path}: cannot read a tensor ({err})") from None
    if not isinstance(vectors, torch.Tensor):
        raise ConceptFileError(f"{path}: expected a tensor, got {type(vectors).__name__}")
    vectors = vectors.float()
    if adapter is not None:
        layer = adapter.check_layer(layer)
    elif layer < 0:
        raise ValueError(f"layer {layer}: negative layers need the adapter (to count from the end)")
    if vectors.ndim == 1:
        direction = vectors
    elif vectors.ndim == 2:
        if adapter is not None and vectors.shape[0] != adapter.n_layers + 1:
            raise ConceptFileError(
                f"{path}: {vectors.shape[0]} rows, but a persona vector file for this model has "
                f"n_layers + 1 = {adapter.n_layers + 1} (row 0 = embeddings)"
            )
        if not 0 <= layer + 1 < vectors.shape[0]:
            raise ConceptFileError(f"{path}: has rows for layers 0..{vectors.shape[0] - 2}; layer {layer} is missing")
        direction = vectors[layer + 1]
    else:
        raise ConceptFileError(
            f"{path}: expected [n_layers + 1, d_model] or [d_model], got shape {tuple(vectors.shape)}"
        )
    if adapter is not None and direction.numel() != adapter.d_model:
        raise ConceptFileError(
            f"{path}: vectors have size {direction.numel()} but the model's hidden size is {adapter.d_model}"
        )
    try:
        return DirectionConcept(direction, layer, kind="persona_vector", extra={"source": str(path)})
    except ValueError as err:
        raise ConceptFileError(f"{path}: row {layer + 1 if vectors.ndim == 2 else 0}: {err}") from None


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def jsonable(value: Any) -> Any:
    """Metrics -> plain JSON (tensors and numpy values become numbers/lists; non-finite floats become null)."""
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, torch.Tensor):
        return jsonable(value.detach().cpu().tolist())
    if hasattr(value, "tolist") and type(value).__module__ == "numpy":
        return jsonable(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)
