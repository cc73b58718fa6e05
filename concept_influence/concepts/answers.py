"""The model's own answers to prompts, sampled with ``generate_answers`` (seeded per prompt) and cached on disk.

The cache is one JSONL file per (model fingerprint, sampling settings): ``{prefix}-<hash>.jsonl`` with one record
``{"key", "prompt", "answers"}`` per distinct prompt. A call reads it, samples only the prompts it lacks and rewrites
it atomically, so growing or re-slicing a dataset reuses what was already sampled. This is exact because
``generate_answers`` seeds every (prompt, sample) from the prompt's own tokens, not from its place in the call.
The cache is rewritten after every chunk of prompts (a killed run keeps what it sampled), and writers of one cache
file take turns (a lock held while sampling), so concurrent runs sample each prompt once and agree.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from concept_influence.distributed.runtime import broadcast_object, dist_info, in_step
from concept_influence.files import folder_lock, remove_stale_temps, write_jsonl_atomic
from concept_influence.models.base import ModelAdapter
from concept_influence.models.fingerprint import json_fingerprint
from concept_influence.models.generate import generate_answers
from concept_influence.settings import option

Messages = list[dict[str, str]]
CHUNK_BATCHES = 4  # the cache is saved after every CHUNK_BATCHES batches of new prompts


@dataclass(frozen=True)
class AnswerConfig:
    """How prompt-only queries are answered by the model (``sample_answers``): the settings shared by the methods
    that sample answers (projection difference, the gradient methods' queries)."""

    n_samples: int = option(1, help="Model answers sampled per prompt (projection-difference, queries).", min=1)
    temperature: float = option(1.0, help="Sampling temperature of the model's answers.", min=0.0)
    max_new_tokens: int = option(48, help="Longest sampled answer, in tokens.", min=1)
    seed: int = option(0, help="Seed of every random choice (answer sampling, true-Fisher labels).")
    cache_dir: str | None = option(
        None, help="Where sampled model answers are cached (default: the workdir, else next to --out)."
    )


def prompt_key(prompt: Sequence[dict[str, str]]) -> str:
    """A stable hash of a chat prompt (roles and contents)."""
    text = json.dumps([[m["role"], m["content"]] for m in prompt], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def answer_cache_path(adapter: ModelAdapter, cache_dir: str | os.PathLike, prefix: str, settings: dict) -> Path:
    return Path(cache_dir) / f"{prefix}-{json_fingerprint({'model': adapter.fingerprint(), **settings})}.jsonl"


def _read_cache(path: Path) -> dict[str, dict]:
    """``{key: {"key", "prompt", "answers"}}`` from a cache file (empty, with a warning, if it is unreadable)."""
    if not path.exists():
        return {}
    out: dict[str, dict] = {}
    try:
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                record = json.loads(line)
                out[str(record["key"])] = {
                    "key": str(record["key"]),
                    "prompt": record.get("prompt"),
                    "answers": [str(a) for a in record["answers"]],
                }
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        warnings.warn(f"{path}: unreadable answer cache ({err}); sampling again", stacklevel=3)
        return {}
    return out


def sample_answers(
    adapter: ModelAdapter,
    prompts: Sequence[Sequence[dict[str, str]]],
    *,
    n_samples: int = 1,
    temperature: float = 1.0,
    max_new_tokens: int = 48,
    seed: int = 0,
    batch_size: int = 16,
    cache_dir: str | os.PathLike | None = None,
    prefix: str = "model-answers",
    progress: bool = False,
) -> list[list[str]]:
    """``answers[i][s]``: sample ``s`` of the model's answer to ``prompts[i]``; identical prompts share answers.

    ``cache_dir``: reuse and extend ``{prefix}-<hash>.jsonl`` there (keyed by the model's fingerprint and the
    sampling settings; see the module docstring).
    """
    settings = {"n_samples": n_samples, "temperature": temperature, "max_new_tokens": max_new_tokens, "seed": seed}
    keys = [prompt_key(p) for p in prompts]
    unique: dict[str, Messages] = {}
    for key, prompt in zip(keys, prompts, strict=True):
        unique.setdefault(key, [dict(m) for m in prompt])
    cache_file = None if cache_dir is None else answer_cache_path(adapter, cache_dir, prefix, settings)
    # a model sharded over several processes: every rank generates (in step), rank 0 alone reads and writes the cache
    sharded = in_step(adapter.model)
    keeper = cache_file if not sharded or dist_info()[0] == 0 else None
    lock = folder_lock(keeper, what="answer cache") if keeper is not None else contextlib.nullcontext()
    with lock:
        if keeper is not None:
            remove_stale_temps(keeper.parent, f".{keeper.name}.")  # left by a killed sampler
        cached = _read_cache(keeper) if keeper is not None else {}
        if sharded:
            cached = broadcast_object(cached)
        missing = [k for k in unique if k not in cached]
        chunk = len(missing) if cache_file is None else max(batch_size, 1) * CHUNK_BATCHES
        for start in range(0, len(missing), max(chunk, 1)):
            part = missing[start : start + chunk]
            generated = generate_answers(
                adapter, [unique[k] for k in part], batch_size=batch_size, progress=progress, **settings
            )
            for key, answers in zip(part, generated, strict=True):
                cached[key] = {"key": key, "prompt": unique[key], "answers": answers}
            if keeper is not None:
                write_jsonl_atomic(keeper, cached.values())
    return [list(cached[k]["answers"]) for k in keys]
