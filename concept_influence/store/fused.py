"""Writing the gradient store inside the factor fit's Λ pass.

``FitStoreWriter`` is the fit's ``RowGradientSink``: the fit runs one forward per batch, backpropagates its Λ
labels (the true Fisher's sampled labels) and then, through the same forward, the data's own labels; the second
backward's output gradients come here weight by weight and are projected straight into the store's shards. For
the eigen store the input side is a column selection of the activations the Λ pass has already rotated
(``a @ Q_A``), so only the output side is a product. With the empirical Fisher the Λ pass's gradients are the
data's, and nothing runs twice.

The projection is chosen from the eigendecompositions alone (``store.projection.visibility``), so the manifest,
fingerprints and numbers are those ``build_store`` gives from the finished factors (up to float rounding).
Only whole shards are written, each atomically: shards already on disk, or whose first row a resumed fit does not
pass over again, are left to ``build_store``, which the caller runs afterwards to finish (and open) the store.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from concept_influence.curvature.factors import Factors
from concept_influence.files import atomic_file
from concept_influence.models.base import ModelAdapter
from concept_influence.numerics import check_finite
from concept_influence.store.projection import Projector
from concept_influence.store.store import (
    STORE_DTYPES,
    StoreConfig,
    check_storable,
    check_unchanged,
    factors_fingerprint,
    make_projector,
    prepare_store,
    projection_fingerprint,
    rows_file,
    save_npy_atomic,
    shard_file,
)

logger = logging.getLogger(__name__)


@dataclass
class _OpenShard:
    """A shard being written: its memory-mapped temp file and how many of its rows are in."""

    shard: int
    start: int
    rows: int
    target: torch.Tensor  # [rows, dim] view of the memory map
    mapped: np.memmap
    file: contextlib.AbstractContextManager[Path]
    tmp: Path
    done: int = 0


class FitStoreWriter:
    """A ``RowGradientSink`` that writes the store of ``data`` (weights ``names``, ``config``) into ``folder``.
    ``fingerprints``: the store's model and data fingerprints (the factor and projection fingerprints are added
    once the fit's eigenbases exist). ``written``: the shards it finished."""

    def __init__(
        self,
        adapter: ModelAdapter,
        data: Sequence[Any],
        folder: str | os.PathLike,
        config: StoreConfig,
        names: Sequence[str],
        fingerprints: Mapping[str, str | None],
        *,
        overwrite: bool = False,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.adapter, self.data, self.folder, self.config = adapter, data, Path(folder), config
        self.names = list(names)
        self.base_fingerprints = dict(fingerprints)
        self.overwrite, self.extra = overwrite, dict(extra or {})
        self.projector: Projector | None = None
        self.manifest: dict[str, Any] | None = None
        self.written: list[int] = []
        self._positions = {int(row.index): p for p, row in enumerate(data)}
        self._open: dict[int, _OpenShard] = {}
        self._work = torch.promote_types(adapter.dtype, torch.float32)
        self._batch: tuple[list[int], torch.Tensor, bool, torch.Tensor] | None = (
            None  # positions, target, buffered, index
        )
        self._memo: dict[tuple[int, str], torch.Tensor] = {}

    @property
    def fingerprints(self) -> dict[str, str | None]:
        return dict(self.manifest["fingerprints"]) if self.manifest is not None else {}

    # ---- RowGradientSink ---------------------------------------------------------------------------------------
    def start(self, factors: Factors) -> None:
        self.projector = make_projector(self.config, self.adapter, self.names, factors)
        fingerprints = {
            **self.base_fingerprints,
            "factors": factors_fingerprint(factors) if self.config.kind == "eigen" else None,
            "projection": projection_fingerprint(self.projector),
        }
        self.manifest = prepare_store(
            self.data,
            self.folder,
            self.projector,
            self.config,
            fingerprints,
            overwrite=self.overwrite,
            extra=self.extra,
        )
        self.overwrite = False  # a resumed pass keeps what this one wrote

    def begin_batch(self, batch: dict[str, torch.Tensor]) -> bool:
        assert self.projector is not None and self.manifest is not None
        positions = [self._positions.get(int(i), -1) for i in batch["index"]]
        if min(positions) < 0:
            return False  # not this store's rows: build_store computes them
        size = self.config.shard_rows
        for shard in sorted({p // size for p in positions}):
            if shard not in self._open and not shard_file(self.folder, shard).exists():
                self._open_shard(shard)  # a resumed pass may not bring all its rows: then close() drops it
        owners = [self._open.get(p // size) for p in positions]
        if all(o is None for o in owners):
            return False
        first, n, one = positions[0], len(positions), owners[0]
        direct = (
            one is not None
            and all(o is one for o in owners)
            and positions == list(range(first, first + n))
            and self.adapter.device.type == "cpu"
            and torch.from_numpy(np.empty(0, dtype=STORE_DTYPES[self.config.dtype])).dtype == self._work
        )
        if direct:
            assert one is not None
            target = one.target[first - one.start : first - one.start + n]
        else:
            target = torch.zeros(n, self.projector.dim, dtype=self._work, device=self.adapter.device)
        self._batch = (positions, target, not direct, batch["index"])
        self._memo = {}
        return True

    def add(self, name: str, a: torch.Tensor, rotated_a: torch.Tensor | None, g: torch.Tensor) -> None:
        if self._batch is None or self.projector is None or name not in self.projector.offsets:
            return
        start, end = self.projector.offsets[name]
        out = self._batch[1][:, start:end]
        if self.projector.kind == "eigen" and rotated_a is not None:
            self.projector.project_rotated(name, rotated_a, g, out=out, memo=self._memo)
        else:
            self.projector.project_rows(name, a, g, out=out, memo=self._memo)

    def end_batch(self) -> None:
        if self._batch is None:
            return
        positions, target, buffered, index = self._batch
        self._batch, self._memo = None, {}
        check_finite(
            target,
            "build-store (in the factor fit's pass): projected row gradients",
            index,
            hint="the model's activations or gradients on this row are not finite",
        )
        check_storable(target, self.config.dtype, self.projector, index, "build-store (in the factor fit's pass)")
        size = self.config.shard_rows
        if buffered and target.device.type != "cpu":
            target = target.to("cpu")  # one transfer, then row copies into the memory maps
        for k, position in enumerate(positions):
            shard = self._open.get(position // size)
            if shard is None:
                continue
            if buffered:
                shard.target[position - shard.start].copy_(target[k])
            shard.done += 1
        for shard in [s for s in self._open.values() if s.done == s.rows]:
            self._finish(shard)

    def close(self) -> None:
        """Drop the shards left unfinished (their temp files); finished ones stay."""
        for shard in list(self._open.values()):
            del self._open[shard.shard]
            shard.mapped.flush()
            del shard.target, shard.mapped
            with contextlib.suppress(RuntimeError):
                shard.file.__exit__(RuntimeError, RuntimeError("the fit stopped inside this shard"), None)
        self._batch = None

    # ---- shards ------------------------------------------------------------------------------------------------
    def _open_shard(self, shard: int) -> None:
        assert self.manifest is not None and self.projector is not None
        check_unchanged(self.folder, self.manifest)
        start = shard * self.config.shard_rows
        stop = min(len(self.data), start + self.config.shard_rows)
        rows = self.data[start:stop]
        meta = np.array([[int(r.index), max(int(sum(r.loss_mask[1:])), 1)] for r in rows], dtype=np.int64)
        save_npy_atomic(rows_file(self.folder, shard), meta)
        file = atomic_file(shard_file(self.folder, shard))
        tmp = file.__enter__()
        mapped = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=STORE_DTYPES[self.config.dtype], shape=(stop - start, self.projector.dim)
        )
        self._open[shard] = _OpenShard(shard, start, stop - start, torch.from_numpy(mapped), mapped, file, tmp)

    def _finish(self, shard: _OpenShard) -> None:
        del self._open[shard.shard]
        shard.mapped.flush()
        del shard.target, shard.mapped
        with open(shard.tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        try:
            check_unchanged(self.folder, self.manifest or {})
        except BaseException as err:
            shard.file.__exit__(type(err), err, None)  # the temp file goes
            raise
        shard.file.__exit__(None, None, None)  # renamed into place
        self.written.append(shard.shard)
