"""The activation cache: each training row's mean response-token residual stream at chosen layers, written once.

With it, Vector Filter for any linear concept (probe, diff of means, persona vector: ``h · v / ‖v‖``) at a cached
layer is one matrix product, ``means[:, layer] @ unit``, equal to the forward pass's scores up to float round-off
(the mean of the per-token projections is the projection of the mean). Projection Difference reuses the same means
of the rows' final assistant turn and of the model's own (cached) answers. Non-linear concepts (SAE features) are
served from the cached response tokens when the cache keeps them (``keep_tokens``), else by a forward pass. The
scores themselves are formed in ``attribution.cached``; this module writes and reads the arrays.

Layout of a cache folder (next to the gradient store: ``<store folder>/activations``)::

    manifest.json                  {"format", "fingerprints": {"model", "data"}, "layers", "d_model", "dtype",
                                    "n_rows", "shard_rows", "n_shards", "keep_tokens", "n_truncated", "max_length"}
    shard-00000.rows.npy           int64 [rows, 4]: original index, response tokens, final-turn tokens, first token
                                   of the row in the shard's token file
    shard-00000.final.npy          [rows, layers, d_model]: mean over the final assistant turn (only in shards
                                   holding a row with several assistant turns; else equal to the mean)
    shard-00000.tokens.npy         [tokens, layers, d_model]: every response token (``keep_tokens`` only)
    shard-00000.mean.npy           [rows, layers, d_model]: mean over all assistant tokens (written last: a shard
                                   exists once this file does)
    answers-<key>/                 the model's own answers' final-turn means per prompt (Projection Difference)

Every file is written to a temporary name and renamed (``data.atomic``), so an interrupted build resumes with the
shards that are missing, and shards are memory-mapped when read (the process's memory does not grow with the rows).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from concept_influence.concepts.activations import length_sorted_batches, read_residuals
from concept_influence.concepts.answers import sample_answers
from concept_influence.data.chat import ChatRow
from concept_influence.data.tokenize import (
    has_chat_template,
    iter_batches,
    render_prompt,
    tokenize_chat,
    untrainable_rows,
)
from concept_influence.files import atomic_file, folder_lock, write_json_atomic
from concept_influence.models.base import ModelAdapter
from concept_influence.numerics import check_finite
from concept_influence.store.store import GradientStore

FORMAT = "concept_influence.activations/1"
MANIFEST = "manifest.json"
FOLDER = "activations"  # the cache's folder inside the store's folder
DTYPES = {"float32": np.float32, "float64": np.float64}


class ActivationCacheMismatchError(ValueError):
    """A cache built for another model, data set or settings (or an incomplete one)."""


@dataclass(frozen=True)
class ActivationSettings:
    """What the activation cache holds. Each field's ``help`` is the CLI's."""

    layers: tuple[int, ...] | None = field(
        default=None,
        metadata={
            "help": "Layers whose residual stream is cached (default: every layer). Vector Filter and Projection "
            "Difference at any other layer run a forward pass."
        },
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": "float32 | float64: precision of the cached means on disk (float32: equal to the forward pass to "
            "float32 round-off)."
        },
    )
    keep_tokens: bool = field(
        default=False,
        metadata={
            "help": "Also keep every response token's residual (disk grows with the tokens, not the rows): serves "
            "non-linear concepts (SAE features) without a forward pass."
        },
    )
    shard_rows: int = field(default=1024, metadata={"help": "Rows per shard file."})

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"activation cache dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.shard_rows < 1:
            raise ValueError(f"shard_rows must be positive, got {self.shard_rows}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(layer) for layer in self.layers))

    @staticmethod
    def help(name: str) -> str:
        return next(f.metadata["help"] for f in fields(ActivationSettings) if f.name == name)


def bytes_per_row(
    d_model: int, n_layers: int, dtype: str = "float32", *, final_share: float = 0.0, tokens_per_row: float = 0.0
) -> float:
    """Disk bytes per training row: the means (plus the final-turn means of ``final_share`` of the rows, plus
    ``tokens_per_row`` response tokens when they are kept)."""
    item = np.dtype(DTYPES[dtype]).itemsize
    return item * d_model * n_layers * (1.0 + final_share + tokens_per_row) + 32


def _file(folder: Path, shard: int, kind: str) -> Path:
    return folder / f"shard-{shard:05d}.{kind}.npy"


def _save(path: Path, array: np.ndarray) -> None:
    with atomic_file(path) as tmp, tmp.open("wb") as handle:
        np.save(handle, array, allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())


def final_turn_masks(tokenized: Sequence[Any], rows: Sequence[ChatRow], tokenizer: Any) -> list[list[int] | None]:
    """Each row's loss mask restricted to its last assistant turn (``None`` where that is the whole mask: a row
    with one assistant turn), as ``attribution.forward``'s ``final_turn_only`` reads it."""
    out: list[list[int] | None] = []
    for row, chat in zip(tokenized, rows, strict=True):
        if sum(m["role"] == "assistant" for m in chat.messages) < 2:
            out.append(None)
            continue
        prompt = render_prompt(chat.prompt_messages, tokenizer)
        prompt_len = len(tokenizer(prompt, add_special_tokens=not has_chat_template(tokenizer))["input_ids"])
        out.append([m if t >= prompt_len else 0 for t, m in enumerate(row.loss_mask)])
    return out


# ---- writing -------------------------------------------------------------------------------------------------------
def prepare_cache(
    folder: Path,
    n_rows: int,
    layers: Sequence[int],
    d_model: int,
    settings: ActivationSettings,
    fingerprints: Mapping[str, str],
    *,
    overwrite: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write (or check) the cache's manifest; another model, data or settings is an error unless ``overwrite``
    (then the old shards are removed)."""
    folder.mkdir(parents=True, exist_ok=True)
    n_shards = max((n_rows + settings.shard_rows - 1) // settings.shard_rows, 1)
    manifest = {
        "format": FORMAT,
        "fingerprints": dict(fingerprints),
        "layers": list(layers),
        "d_model": int(d_model),
        "dtype": settings.dtype,
        "keep_tokens": settings.keep_tokens,
        "n_rows": int(n_rows),
        "shard_rows": settings.shard_rows,
        "n_shards": n_shards,
        "reduction": "mean over assistant tokens",
        **dict(extra or {}),
    }
    path = folder / MANIFEST
    with folder_lock(folder, what="activation cache"):
        if path.exists():
            saved = json.loads(path.read_text(encoding="utf-8"))
            keys = ("format", "fingerprints", "layers", "d_model", "dtype", "keep_tokens", "n_rows", "shard_rows")
            differ = [k for k in keys if saved.get(k) != manifest[k]]
            if differ and not overwrite:
                raise ActivationCacheMismatchError(
                    f"{folder} holds an activation cache for another model, data or settings ({', '.join(differ)}); "
                    "pass --overwrite to replace it"
                )
            if differ:
                for old in folder.glob("shard-*.npy"):
                    old.unlink()
                for old in folder.glob("answers-*"):
                    for f in old.iterdir():
                        f.unlink()
                    old.rmdir()
        write_json_atomic(path, manifest)
    return manifest


class ShardWriter:
    """Accumulates one shard's rows (``add``: a batch's residuals), then writes its files atomically (``close``)."""

    def __init__(
        self,
        folder: Path,
        shard: int,
        data: Sequence[Any],
        chats: Sequence[ChatRow] | None,
        tokenizer: Any,
        layers: Sequence[int],
        d_model: int,
        settings: ActivationSettings,
    ) -> None:
        self.folder, self.shard, self.layers, self.settings = folder, shard, list(layers), settings
        start = shard * settings.shard_rows
        stop = min(len(data), start + settings.shard_rows)
        self.start, self.rows = start, data[start:stop]
        self.positions = {int(r.index): p for p, r in enumerate(self.rows)}
        n = len(self.rows)
        self.mean = np.zeros((n, len(self.layers), d_model), dtype=np.float64)
        finals = final_turn_masks(self.rows, chats[start:stop], tokenizer) if chats is not None else [None] * n
        self.finals = {p: torch.tensor(m) for p, m in enumerate(finals) if m is not None}
        self.final = np.zeros_like(self.mean) if self.finals else None
        counts = [int(sum(r.loss_mask)) for r in self.rows]
        final_counts = [int(sum(finals[p])) if finals[p] is not None else counts[p] for p in range(n)]
        offsets = np.concatenate([[0], np.cumsum(counts)])[:-1]
        self.meta = np.array(
            [[int(r.index), counts[p], final_counts[p], offsets[p]] for p, r in enumerate(self.rows)], dtype=np.int64
        ).reshape(n, 4)
        self.tokens = (
            np.zeros((int(sum(counts)), len(self.layers), d_model), dtype=DTYPES[settings.dtype])
            if settings.keep_tokens
            else None
        )
        self.done = 0

    def add(self, batch: Mapping[str, torch.Tensor], residuals: Mapping[int, torch.Tensor]) -> None:
        """Take a batch's residuals ``{layer: [B, T, d]}`` (rows of this shard only; others are ignored)."""
        mask = batch["loss_mask"]
        for b, index in enumerate(batch["index"].tolist()):
            p = self.positions.get(int(index))
            if p is None:
                continue
            m = mask[b].to(torch.float64)
            n = float(m.sum())
            picked = m.bool()
            for k, layer in enumerate(self.layers):
                acts = residuals[layer][b].detach().to("cpu", torch.float64)
                if n > 0:
                    self.mean[p, k] = (acts * m[: acts.shape[0], None]).sum(0).numpy() / n
                if p in self.finals:
                    f = self.finals[p].to(torch.float64)
                    fn = float(f.sum())
                    if fn > 0:
                        self.final[p, k] = (acts[: f.shape[0]] * f[:, None]).sum(0).numpy() / fn  # type: ignore[index]
                if self.tokens is not None:
                    start = int(self.meta[p, 3])
                    self.tokens[start : start + int(n), k] = acts[picked[: acts.shape[0]]].numpy()
            self.done += 1

    def close(self) -> None:
        if self.done != len(self.rows):
            raise RuntimeError(f"activation cache shard {self.shard}: {self.done} of {len(self.rows)} rows read")
        check_finite(
            torch.from_numpy(self.mean),
            "build-store: the cached activations",
            [int(i) for i in self.meta[:, 0]],
            hint="the model's activations on this row are not finite",
        )
        dtype = DTYPES[self.settings.dtype]
        _save(_file(self.folder, self.shard, "rows"), self.meta)
        if self.final is not None:
            _save(_file(self.folder, self.shard, "final"), self.final.astype(dtype))
        if self.tokens is not None:
            _save(_file(self.folder, self.shard, "tokens"), self.tokens)
        _save(_file(self.folder, self.shard, "mean"), self.mean.astype(dtype))  # last: the shard now exists


def shard_done(folder: Path, shard: int) -> bool:
    return _file(folder, shard, "mean").exists()


@torch.no_grad()
def write_shard_forward(
    adapter: ModelAdapter,
    data: Sequence[Any],
    chats: Sequence[ChatRow] | None,
    folder: Path,
    shard: int,
    layers: Sequence[int],
    settings: ActivationSettings,
    *,
    batch_size: int = 8,
    progress_bar: Any = None,
) -> None:
    """Read one shard's rows with forward passes only (stopping after the deepest cached layer) and write it."""
    writer = ShardWriter(folder, shard, data, chats, adapter.tokenizer, layers, adapter.d_model, settings)
    for batch in iter_batches(writer.rows, batch_size, pad_id=getattr(data, "pad_token_id", 0), by_length=True):
        residuals = read_residuals(adapter, batch["input_ids"], batch["attention_mask"], layers)
        writer.add(batch, residuals)
        if progress_bar is not None:
            progress_bar.update(int(batch["input_ids"].shape[0]))
    writer.close()


# ---- reading -------------------------------------------------------------------------------------------------------
class ActivationCache:
    """An opened cache: memory-mapped shards plus the manifest. ``indices [N]``: each cached row's original index."""

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        self.folder = folder
        self.manifest = manifest
        self.layers = [int(layer) for layer in manifest["layers"]]
        self.n_shards = int(manifest["n_shards"])
        self.fingerprints: dict[str, str] = dict(manifest["fingerprints"])
        self.keep_tokens = bool(manifest.get("keep_tokens"))
        self._means = [
            np.load(_file(folder, s, "mean"), mmap_mode="r", allow_pickle=False) for s in range(self.n_shards)
        ]
        self._meta = [np.load(_file(folder, s, "rows"), allow_pickle=False) for s in range(self.n_shards)]
        meta = np.concatenate(self._meta) if self._meta else np.zeros((0, 4), dtype=np.int64)
        self.indices = meta[:, 0].copy()
        self.counts = meta[:, 1].copy()
        self.final_counts = meta[:, 2].copy()
        if len(self.indices) != int(manifest["n_rows"]):
            raise ActivationCacheMismatchError(
                f"{folder}: shards hold {len(self.indices)} rows, manifest says {manifest['n_rows']}"
            )

    @classmethod
    def open(cls, path: str | os.PathLike) -> ActivationCache:
        folder = Path(path)
        file = folder / MANIFEST
        if not file.exists():
            raise FileNotFoundError(f"no activation cache at {folder} (missing {MANIFEST}); build one with build-store")
        manifest = json.loads(file.read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            raise ActivationCacheMismatchError(
                f"{file}: unknown format {manifest.get('format')!r} (expected {FORMAT!r})"
            )
        try:
            n_rows, shard_rows, n_shards = (int(manifest[k]) for k in ("n_rows", "shard_rows", "n_shards"))
        except (KeyError, TypeError, ValueError):
            raise ActivationCacheMismatchError(
                f"{file}: n_rows, shard_rows and n_shards must be whole numbers"
            ) from None
        if n_rows < 0 or shard_rows < 1 or n_shards != max((n_rows + shard_rows - 1) // shard_rows, 1):
            raise ActivationCacheMismatchError(f"{file}: n_shards {n_shards} does not match n_rows {n_rows}")
        missing = [s for s in range(n_shards) if not shard_done(folder, s)]
        if missing:
            raise ActivationCacheMismatchError(
                f"{folder}: incomplete activation cache ({n_shards - len(missing)} of "
                f"{n_shards} shards written); run build-store again to resume it"
            )
        return cls(folder, manifest)

    def __len__(self) -> int:
        return int(self.manifest["n_rows"])

    def __repr__(self) -> str:
        return (
            f"ActivationCache({str(self.folder)!r}, {len(self)} rows, layers {self.layers}, "
            f"{self.manifest['dtype']}{', tokens' if self.keep_tokens else ''})"
        )

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("shard-*.npy"))

    def check(self, **expected: str | None) -> None:
        """Raise ``ActivationCacheMismatchError`` naming each given fingerprint (``model=``, ``data=``) that differs."""
        wrong = [k for k, v in expected.items() if v is not None and self.fingerprints.get(k) != v]
        if wrong:
            details = "; ".join(f"{k}: cache {self.fingerprints.get(k)!r}, current {expected[k]!r}" for k in wrong)
            raise ActivationCacheMismatchError(
                f"the activation cache in {self.folder} was built for another "
                f"{', '.join(wrong)} ({details}); rebuild it (build-store --overwrite)"
            )

    def project(self, layer: int, direction: np.ndarray, *, final: bool = False) -> np.ndarray:
        """``[N]`` float64: each row's mean residual at ``layer`` (``final``: over its last assistant turn) dotted
        with ``direction`` ``[d_model]``, shard by shard from the memory maps."""
        k = self.layers.index(layer)
        v = np.asarray(direction, dtype=np.float64)
        out = np.empty(len(self), dtype=np.float64)
        start = 0
        for s, means in enumerate(self._means):
            n = means.shape[0]
            out[start : start + n] = np.asarray(means[:, k], dtype=np.float64) @ v
            if final and _file(self.folder, s, "final").exists():
                finals = np.load(_file(self.folder, s, "final"), mmap_mode="r", allow_pickle=False)
                several = self._meta[s][:, 2] != self._meta[s][:, 1]
                if several.any():
                    out[start : start + n][several] = np.asarray(finals[several, k], dtype=np.float64) @ v
            start += n
        return out

    def token_means(self, layer: int, token_readout: Any) -> np.ndarray:
        """``[N]``: the mean over each row's response tokens of ``token_readout(acts [1, tokens, d]) -> [1, tokens]``
        (any concept, linear or not), from the kept tokens."""
        if not self.keep_tokens:
            raise ValueError(f"{self.folder}: the cache keeps no tokens (build it with keep_tokens)")
        k = self.layers.index(layer)
        out = np.empty(len(self), dtype=np.float64)
        start = 0
        for s in range(self.n_shards):
            tokens = np.load(_file(self.folder, s, "tokens"), mmap_mode="r", allow_pickle=False)
            meta = self._meta[s]
            with torch.no_grad():
                values = token_readout(torch.from_numpy(np.ascontiguousarray(tokens[:, k]))[None])[0]
            values = values.double().cpu().numpy()
            for p, (count, offset) in enumerate(zip(meta[:, 1], meta[:, 3], strict=True)):
                out[start + p] = values[int(offset) : int(offset) + int(count)].mean() if count else np.nan
            start += meta.shape[0]
        return out


def open_cache(folder: str | os.PathLike, *, model: str | None = None, data: str | None = None) -> ActivationCache:
    cache = ActivationCache.open(folder)
    cache.check(model=model, data=data)
    return cache


# ---- the model's own answers (Projection Difference) ---------------------------------------------------------------
def answers_key(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(settings), sort_keys=True).encode()).hexdigest()[:12]


@torch.no_grad()
def build_answer_means(
    adapter: ModelAdapter,
    rows: Sequence[ChatRow],
    cache: ActivationCache,
    *,
    n_samples: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    batch_size: int,
    max_length: int,
    cache_dir: str | os.PathLike | None,
    progress: bool = False,
) -> Path:
    """Sample (or reuse) the model's answers to every row's prompt as Projection Difference does, read each
    answer's final-turn mean residual at the cached layers once, and keep per row the mean over its non-empty
    answers (``means.npy [len(rows), layers, d]``, float64) and their number (``counts.npy``). Returns the folder."""
    settings = {
        "n_samples": n_samples,
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "batch_size": batch_size,
        "max_length": max_length,
        "rows": [int(r.index) for r in rows],
    }
    folder = cache.folder / f"answers-{answers_key(settings)}"
    if (folder / MANIFEST).exists():
        return folder
    answers = sample_answers(
        adapter,
        [r.prompt_messages for r in rows],
        n_samples=n_samples,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=batch_size,
        cache_dir=cache_dir,
        prefix="model-answers",
        progress=progress,
    )
    model_rows: list[ChatRow] = []
    owner: list[int] = []
    for i, (row, samples) in enumerate(zip(rows, answers, strict=True)):
        for answer in samples:
            if answer.strip():
                model_rows.append(
                    ChatRow(len(model_rows), [*row.prompt_messages, {"role": "assistant", "content": answer}])
                )
                owner.append(i)
    layers = cache.layers
    sums = np.zeros((len(rows), len(layers), adapter.d_model))
    counts = np.zeros(len(rows))
    if model_rows:
        dataset = tokenize_chat(model_rows, adapter.tokenizer, max_length, warn=False)
        finals = final_turn_masks(dataset.rows, model_rows, adapter.tokenizer)
        for tokenized, mask in zip(dataset.rows, finals, strict=True):
            if mask is not None:
                tokenized.loss_mask = mask
        lost = set(untrainable_rows(dataset, skip_invalid=True))
        for batch in tqdm(
            list(length_sorted_batches(dataset, batch_size)), desc="reading model answers", disable=not progress
        ):
            acts = read_residuals(adapter, batch["input_ids"], batch["attention_mask"], layers)
            mask = batch["loss_mask"].to(torch.float64)
            for b, p in enumerate(batch["position"].tolist()):
                if p in lost:
                    continue
                m = mask[b]
                for k, layer in enumerate(layers):
                    a = acts[layer][b].to("cpu", torch.float64)
                    sums[owner[p], k] += ((a * m[:, None]).sum(0) / m.sum()).numpy()
                counts[owner[p]] += 1.0
    if not counts.any():
        raise ValueError("the model gave only empty answers: raise --max-new-tokens or check the chat template")
    with folder_lock(cache.folder, what="activation cache"):
        folder.mkdir(exist_ok=True)
        _save(folder / "means.npy", sums / np.maximum(counts, 1)[:, None, None])
        _save(folder / "counts.npy", counts)
        _save(folder / "first_answers.npy", np.asarray([s[0] for s in answers], dtype=np.str_))
        write_json_atomic(
            folder / MANIFEST, {"settings": {k: v for k, v in settings.items() if k != "rows"}, "n_rows": len(rows)}
        )
    return folder


def shards_of(n_rows: int, shard_rows: int) -> Iterable[int]:
    return range(max((n_rows + shard_rows - 1) // shard_rows, 1))


def resolve_activation_cache(
    session: Any, store: Any, *, required: bool = False
) -> tuple[ActivationCache | None, list[str]]:
    """The activation cache a forward question reads: ``store=False``: none (a forward pass); a path: the cache
    in it (``<path>/activations``, or the path itself), checked (a mismatch is an error; no cache there: an error
    when ``required``, else a note); ``None``: the workdir's store folder's cache when one exists and matches (else
    a note and a forward pass)."""
    if store is False:
        return None, ["store=False: forward pass"]
    explicit = store is not None and not isinstance(store, GradientStore)
    if store is None:
        root = getattr(session, "store_dir", None)
    elif isinstance(store, GradientStore):
        root = store.folder
    else:
        root = Path(store)
    if root is None:
        return None, []
    root = Path(root)
    folder = (
        root
        if (root / MANIFEST).exists() and not (root / FOLDER).exists() and _is_activation_cache(root)
        else root / FOLDER
    )
    if not (folder / MANIFEST).exists():
        if explicit and required:
            raise ValueError(
                f"no activation cache in {root} (build-store builds one): store= applies to gradient "
                "methods, and to forward methods where it holds an activation cache"
            )
        return None, ([f"no activation cache in {root}: forward pass"] if explicit else [])
    opened: dict[str, ActivationCache] = session.__dict__.setdefault("_activation_caches", {})
    try:
        cache = opened.get(str(folder)) or ActivationCache.open(folder)
        cache.check(model=session.model_fingerprint(), data=session.data_fingerprint())
    except ActivationCacheMismatchError as err:
        if explicit:
            raise
        return None, [f"the workdir's activation cache is not used ({err}); forward pass"]
    opened[str(folder)] = cache
    return cache, []


def _is_activation_cache(folder: Path) -> bool:
    try:
        return str(json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("format", "")).startswith(
            "concept_influence.activations"
        )
    except (OSError, ValueError):
        return False
