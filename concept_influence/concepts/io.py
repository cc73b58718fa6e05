"""Concept files: a folder with ``concept.json`` (site, readout, kind, model fingerprint, metrics) and
``concept.safetensors`` (the direction), or for an SAE feature the SAE saved by sae-lens (``sae/``). Never pickle.

Persona vectors saved by the persona-vectors code (``[n_layers + 1, d_model]``, row 0 = embeddings, row ``l + 1`` =
output of block ``l``) are read with ``load_persona_vector``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from concept_influence.concepts.base import Concept, DirectionConcept
from concept_influence.data.chat import write_json_atomic
from concept_influence.models.base import ModelAdapter

FORMAT = "concept_influence.concept/1"
META_FILE = "concept.json"
TENSOR_FILE = "concept.safetensors"


class ConceptFileError(ValueError):
    """A concept file that cannot be read, or that does not fit the model; the message names the file."""


def save_concept(concept: Concept, path: str | os.PathLike, *, model_fingerprint: str | None = None,
                 readout: str = "mean", extra_meta: dict[str, Any] | None = None) -> Path:
    """Write ``concept`` into the folder ``path`` (created; replaced atomically if it exists)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        meta: dict[str, Any] = {"format": FORMAT, "site": f"resid.{concept.layer}", "layer": concept.layer,
                                "d_model": concept.d_model, "readout": readout, "model_fingerprint": model_fingerprint}
        if isinstance(concept, DirectionConcept):
            save_file({"direction": concept.direction.detach().float().contiguous().cpu()}, str(tmp / TENSOR_FILE))
            meta.update(kind=concept.kind, metrics=concept.metrics, extra=concept.extra)
        elif type(concept).__name__ == "SAEFeatureConcept":
            from concept_influence.concepts.sae import save_sae_concept

            save_sae_concept(concept, tmp / "sae", model_fingerprint=model_fingerprint)
            meta.update(kind="sae_feature", feature=int(concept.feature), metrics=getattr(concept, "metrics", {}))
        else:
            raise TypeError(f"cannot save a {type(concept).__name__}")
        meta.update(extra_meta or {})
        write_json_atomic(tmp / META_FILE, meta)
        if path.exists():
            backup = path.with_name(f".{path.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            path.rename(backup)
            tmp.rename(path)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_concept_meta(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    meta_file = path / META_FILE if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"concept not found: {path}")
    if not meta_file.exists() or meta_file.name != META_FILE:
        raise ConceptFileError(f"{path}: not a concept folder (expected {META_FILE} inside; made by train-probe or save_concept)")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConceptFileError(f"{meta_file}: malformed JSON ({err.msg})") from None
    for key in ("format", "layer", "d_model", "kind"):
        if key not in meta:
            raise ConceptFileError(f"{meta_file}: missing key {key!r}")
    if meta["format"] != FORMAT:
        raise ConceptFileError(f"{meta_file}: unknown format {meta['format']!r} (expected {FORMAT!r})")
    return meta


def check_against_model(meta: dict[str, Any], adapter: ModelAdapter, where: str) -> None:
    """Hidden size and layer must fit the model; another fingerprint only warns (a base model's probe applied to
    its fine-tuned model is a normal use)."""
    if int(meta["d_model"]) != adapter.d_model:
        raise ConceptFileError(f"{where}: concept has hidden size {meta['d_model']} but the model has {adapter.d_model}")
    if not 0 <= int(meta["layer"]) < adapter.n_layers:
        raise ConceptFileError(f"{where}: concept reads layer {meta['layer']} but the model has {adapter.n_layers} blocks "
                               f"(0..{adapter.n_layers - 1})")
    fingerprint = meta.get("model_fingerprint")
    if fingerprint and fingerprint != adapter.fingerprint():
        warnings.warn(f"{where}: concept was made on another model (fingerprint {fingerprint}); using it on this one",
                      stacklevel=3)


def load_concept(path: str | os.PathLike, adapter: ModelAdapter | None = None) -> Concept:
    """Read a concept folder; with ``adapter``, check that it fits the model (hidden size, layer)."""
    path = Path(path)
    meta = read_concept_meta(path)
    if adapter is not None:
        check_against_model(meta, adapter, str(path))
    kind = meta["kind"]
    if kind == "sae_feature":
        from concept_influence.concepts.sae import load_sae_concept

        return load_sae_concept(path / "sae")
    tensor_file = path / TENSOR_FILE
    if not tensor_file.exists():
        raise ConceptFileError(f"{path}: missing {TENSOR_FILE}")
    try:
        tensors = load_file(str(tensor_file))
    except Exception as err:  # safetensors raises its own error types on corrupt files
        raise ConceptFileError(f"{tensor_file}: unreadable ({err})") from None
    if "direction" not in tensors:
        raise ConceptFileError(f"{tensor_file}: no 'direction' tensor")
    direction = tensors["direction"]
    if direction.numel() != int(meta["d_model"]):
        raise ConceptFileError(f"{tensor_file}: direction has {direction.numel()} entries but concept.json says d_model {meta['d_model']}")
    return DirectionConcept(direction, int(meta["layer"]), kind=kind, metrics=meta.get("metrics"), extra=meta.get("extra"))


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
    if vectors.ndim == 1:
        direction = vectors
    elif vectors.ndim == 2:
        if adapter is not None and vectors.shape[0] != adapter.n_layers + 1:
            raise ConceptFileError(f"{path}: {vectors.shape[0]} rows, but a persona vector file for this model has "
                                   f"n_layers + 1 = {adapter.n_layers + 1} (row 0 = embeddings)")
        if not 0 <= layer + 1 < vectors.shape[0]:
            raise ConceptFileError(f"{path}: has rows for layers 0..{vectors.shape[0] - 2}; layer {layer} is missing")
        direction = vectors[layer + 1]
    else:
        raise ConceptFileError(f"{path}: expected [n_layers + 1, d_model] or [d_model], got shape {tuple(vectors.shape)}")
    if adapter is not None and direction.numel() != adapter.d_model:
        raise ConceptFileError(f"{path}: vectors have size {direction.numel()} but the model's hidden size is {adapter.d_model}")
    return DirectionConcept(direction, layer, kind="persona_vector", extra={"source": str(path)})
