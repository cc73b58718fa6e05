"""Which caches a session's questions need, and building them all in one pass over the training rows.

- the **activation cache** (``store.activations``): Vector Filter, Projection Difference and the forward half of
  every ``combined-*`` method;
- a **gradient store** (``store.store``): for identity-preconditioned questions (the gradient half of every
  ``combined-*`` method) the *identity store*: an eigen store in the KFAC eigenbases of a seeded sample of
  ``IDENTITY_SAMPLE_ROWS`` rows (about a second: covariances and their eigenvectors, no EKFAC fit, no Λ pass), kept
  in ``<store>/basis``; it keeps the ``DEFAULT_IDENTITY_RANK``² most visible eigen-components per weight, where
  the gradients' energy is. ``bench/exploration.py --dims`` measured its rank agreement with the exact identity
  scores against a factor-free LoGra store's (Spearman 0.999 vs 0.82 at the same size); for EKFAC questions the
  eigen store of the fitted EKFAC factors.

``build_caches`` writes both in one pass: each batch's forward fills the activation cache (residual hooks) and its
backward the gradient store's shard; shards already written on either side are skipped (resume), and a shard whose
gradients exist but activations do not is read with a forward pass alone.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist
from tqdm.auto import tqdm

from concept_influence.data.chat import ChatRow
from concept_influence.gradients.capture import gradient_mode
from concept_influence.models.base import ModelAdapter
from concept_influence.store.activations import (
    FOLDER,
    ActivationCache,
    ActivationSettings,
    ShardWriter,
    prepare_cache,
    shard_done,
    write_shard_forward,
)
from concept_influence.store.projection import Projector
from concept_influence.store.store import (
    DEFAULT_IDENTITY_RANK,
    IDENTITY_SAMPLE_ROWS,
    GradientStore,
    StoreConfig,
    check_unchanged,
    prepare_store,
    shard_file,
    write_shard,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheSettings:
    """What ``Attributor.build_store`` builds. Each field's ``help`` is the CLI's."""

    methods: tuple[str, ...] | None = field(
        default=None,
        metadata={
            "help": "The methods the session will ask (default: the recommended method); the caches they read are "
            "built (forward methods: the activation cache; combined-*: it and the identity gradient store, in the "
            "KFAC eigenbases of a small seeded sample, no EKFAC fit; EKFAC methods: the eigen store, after a factor "
            "fit)."
        },
    )
    layers: tuple[int, ...] | None = field(default=None, metadata={"help": ActivationSettings.help("layers")})
    activation_dtype: str = field(default="float32", metadata={"help": ActivationSettings.help("dtype")})
    keep_tokens: bool = field(default=False, metadata={"help": ActivationSettings.help("keep_tokens")})
    identity_rank: int = field(
        default=DEFAULT_IDENTITY_RANK,
        metadata={
            "help": "Rank of the identity gradient store that identity-preconditioned questions (combined-*) read: "
            "about rank x rank eigen-components per weight (4 bytes each per row)."
        },
    )
    identity_sample_rows: int = field(
        default=IDENTITY_SAMPLE_ROWS,
        metadata={"help": "Rows of the seeded sample whose KFAC eigenbases the identity store is written in."},
    )

    def __post_init__(self) -> None:
        if self.methods is not None:
            object.__setattr__(self, "methods", tuple(self.methods))
        if self.identity_rank < 1 or self.identity_sample_rows < 1:
            raise ValueError(
                f"identity_rank and identity_sample_rows must be positive, got {self.identity_rank} and "
                f"{self.identity_sample_rows}"
            )
        ActivationSettings(layers=self.layers, dtype=self.activation_dtype)  # validates

    @staticmethod
    def help(name: str) -> str:
        return next(f.metadata["help"] for f in fields(CacheSettings) if f.name == name)

    def activations(self, shard_rows: int) -> ActivationSettings:
        return ActivationSettings(
            layers=self.layers, dtype=self.activation_dtype, keep_tokens=self.keep_tokens, shard_rows=shard_rows
        )


def build_caches(
    adapter: ModelAdapter,
    data: Sequence[Any],
    chats: Sequence[ChatRow] | None,
    folder: str | os.PathLike,
    *,
    projector: Projector | None,
    config: StoreConfig,
    fingerprints: Mapping[str, str | None],
    activations: ActivationSettings | None,
    batch_size: int = 8,
    overwrite: bool = False,
    progress: bool = True,
    extra: Mapping[str, Any] | None = None,
    shards: Sequence[int] | None = None,
) -> tuple[GradientStore | None, ActivationCache | None]:
    """Write (or finish) the gradient store of ``projector`` in ``folder`` and the activation cache in
    ``folder/activations`` in one pass over ``data`` (tokenised rows; ``chats``: the same rows as ``ChatRow``,
    for the final-turn means of multi-turn rows). Either may be ``None`` (not built). ``shards``: only these
    (default all; under ``torch.distributed`` each rank its own share). Returns the opened store and cache
    (``None`` for one not built, or while shards are missing)."""
    folder = Path(folder)
    base = {"model": str(fingerprints["model"]), "data": str(fingerprints["data"])}
    manifest = None
    if projector is not None:
        manifest = prepare_store(data, folder, projector, config, fingerprints, overwrite=overwrite, extra=extra)
    act_folder = folder / FOLDER
    layers: list[int] = []
    if activations is not None:
        if activations.shard_rows != config.shard_rows:
            raise ValueError("the activation cache and the gradient store share their shards: give one shard_rows")
        layers = sorted({adapter.check_layer(layer) for layer in (activations.layers or range(adapter.n_layers))})
        prepare_cache(
            act_folder,
            len(data),
            layers,
            adapter.d_model,
            activations,
            base,
            overwrite=overwrite,
            extra={"n_truncated": int(getattr(data, "n_truncated", 0)), **dict(extra or {})},
        )
    n_shards = max((len(data) + config.shard_rows - 1) // config.shard_rows, 1)
    distributed = shards is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:  # under torchrun, rank r of w writes shards r, r + w, ... (as store.build_store)
        shards = range(dist.get_rank(), n_shards, dist.get_world_size())
        progress = progress and dist.get_rank() == 0
    wanted = list(range(n_shards)) if shards is None else [s for s in shards if 0 <= s < n_shards]
    todo_g = [s for s in wanted if projector is not None and not shard_file(folder, s).exists()]
    todo_a = [s for s in wanted if activations is not None and not shard_done(act_folder, s)]
    rows_of = {s: min(len(data), (s + 1) * config.shard_rows) - s * config.shard_rows for s in wanted}
    # the store's pages are read back into the page cache as they are written (on the writer's thread) when it fits
    # the share of memory that ``warm`` allows; otherwise they stay on the disk only
    read_back = projector is not None and _fits_memory(len(data) * projector.dim * np.dtype(config.dtype).itemsize)
    started = time.perf_counter()
    with tqdm(
        total=sum(rows_of[s] for s in sorted(set(todo_g) | set(todo_a))),
        desc="building the caches",
        unit="row",
        disable=not progress,
    ) as bar:
        if todo_g:
            assert projector is not None and manifest is not None
            infos = [adapter.weight_info(n) for n in projector.names]
            with gradient_mode(adapter, infos) as params, adapter.capture_residual(layers) as captured:
                for shard in todo_g:
                    check_unchanged(folder, manifest)
                    writer = None
                    if shard in todo_a:
                        assert activations is not None
                        writer = ShardWriter(
                            act_folder, shard, data, chats, adapter.tokenizer, layers, adapter.d_model, activations
                        )
                    hook = None if writer is None else (lambda batch, w=writer: w.add(batch, captured))
                    write_shard(
                        adapter,
                        data,
                        projector,
                        folder,
                        shard,
                        config,
                        batch_size=batch_size,
                        params=params,
                        progress_bar=bar,
                        on_batch=hook,
                        read_back=read_back,
                    )
                    if writer is not None:
                        writer.close()
        for shard in todo_a:
            if shard in todo_g:
                continue
            assert activations is not None
            write_shard_forward(
                adapter, data, chats, act_folder, shard, layers, activations, batch_size=batch_size, progress_bar=bar
            )
    logger.info(
        "caches %s: %d gradient and %d activation shards in %.1fs",
        folder,
        len(todo_g),
        len(todo_a),
        time.perf_counter() - started,
    )
    if distributed:
        dist.barrier()  # every rank's shards are written
    store = None
    if projector is not None and all(shard_file(folder, s).exists() for s in range(n_shards)):
        store = GradientStore.open(folder)
        if todo_g:
            warm(store, skip=todo_g if read_back else ())
    cache = None
    if activations is not None and all(shard_done(act_folder, s) for s in range(n_shards)):
        cache = ActivationCache.open(act_folder)
    return store, cache


WARM_SHARE = 0.25  # the largest share of the machine's memory a store may take in the page cache after its build


def _fits_memory(nbytes: int, share: float = WARM_SHARE) -> bool:
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return False
    return nbytes <= share * memory


def warm(store: GradientStore, share: float = WARM_SHARE, skip: Collection[int] = ()) -> bool:
    """Read a freshly written store once, so that its pages are in the page cache for the first question (the
    shards are written with direct I/O, ``store.shardfile``, which leaves them on the disk only); skipped when the
    store is larger than ``share`` of the machine's memory. ``skip``: shards whose writer read them back already
    (``write_shard(read_back=True)``). Part of the build's one-time cost. Returns whether it read."""
    if not _fits_memory(store.nbytes, share):
        return False
    buffer = bytearray(1 << 24)
    for s in range(len(store.shards)):
        if s in skip:
            continue
        with open(shard_file(store.folder, s), "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass
    return True
