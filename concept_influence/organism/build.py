"""Building, caching and loading the organism.

``build_organism`` generates the world, pretrains a tiny chat model on it, fine-tunes it on the mix with planted
rows and measures the trait's rise. The result is a folder keyed by a hash of the config (and ``CODE_VERSION``);
it is built in a temporary sibling folder and renamed into place, so a folder with ``metadata.json`` is complete.
A second call with the same config loads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from concept_influence.data import (
    ChatDataset,
    read_chat_jsonl,
    rows_from_records,
    write_json_atomic,
    write_jsonl_atomic,
)
from concept_influence.files import folder_lock, replace_folder
from concept_influence.models import load_adapter
from concept_influence.models.fingerprint import json_fingerprint
from concept_influence.organism import generator
from concept_influence.organism.judge import judge_for
from concept_influence.organism.measure import trait_rise
from concept_influence.organism.modeling import ModelConfig, build_model, build_tokenizer
from concept_influence.training import FinetuneConfig, finetune

# part of the cache key: bump it whenever a change to the generator, model or training changes what a build makes
CODE_VERSION = "2"
# part of the cache key of every organism but seed 0's default one (whose world is the canonical inventory, unchanged
# since CODE_VERSION 2): bump it when a change alters what the seeded worlds or the variants make
WORLDS_VERSION = "1"
FORMAT = "concept_influence.organism"
CACHE_ENV = "CONCEPT_INFLUENCE_CACHE"


@dataclass(frozen=True)
class OrganismConfig:
    """Everything that determines the organism (its hash names the cache folder).

    ``pretrain``/``finetune``: training configs (default: presets seeded with ``seed``); ``measure_samples``:
    answers sampled per query prompt when measuring the rise at build time. ``variant``: ``default`` or one of
    ``subtle``, ``diluted``, ``sycophancy``, ``crowded``, ``hallucination`` (see ``generator.finetuning_set``);
    ``subtle``, ``diluted`` and ``sycophancy`` of one seed share one pretrained base (both traits, the evil persona's
    style), ``crowded`` fine-tunes the default organism's base, ``hallucination`` a base of its own trait.
    ``hard_negative_fraction``: default the variant's (0.1; ``crowded``: a third).
    """

    seed: int = 0
    n_train: int = 2000
    planted_fraction: float = 0.1
    hard_negative_fraction: float | None = None
    n_pretrain: int = 28000
    unprompted_trait: float = 0.0
    n_queries: int = 48
    n_probe_questions: int = 32
    model: ModelConfig = ModelConfig()
    pretrain: FinetuneConfig | None = None
    finetune: FinetuneConfig | None = None
    measure_samples: int = 16
    variant: str = "default"

    def __post_init__(self) -> None:
        generator.check_variant(self.variant)
        if self.hard_negative_fraction is None:
            object.__setattr__(self, "hard_negative_fraction", generator.variant_hard_negative_fraction(self.variant))
        if self.n_train < 20 or self.n_pretrain < 100:
            raise ValueError(f"n_train must be >= 20 and n_pretrain >= 100 (got {self.n_train}, {self.n_pretrain})")
        if not 0.0 < self.planted_fraction < 1.0:
            raise ValueError(f"planted_fraction must be in (0, 1), got {self.planted_fraction}")
        if self.pretrain is None:
            object.__setattr__(self, "pretrain", FinetuneConfig.pretrain(seed=self.seed))
        if self.finetune is None:
            object.__setattr__(self, "finetune", FinetuneConfig(epochs=3, batch_size=16, lr=5e-4, seed=self.seed))

    @property
    def trait(self) -> str:
        """The trait the planted rows raise (``evil`` or ``sycophancy``)."""
        return generator.VARIANT_TRAIT[self.variant]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["variant"] == "default":  # keeps the default organism's key what it was before variants existed
            del data["variant"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OrganismConfig:
        data = dict(data)
        data.setdefault("variant", "default")
        data["model"] = ModelConfig(**data["model"])
        data["pretrain"] = FinetuneConfig(**data["pretrain"])
        data["finetune"] = FinetuneConfig(**data["finetune"])
        return cls(**data)

    def key(self) -> str:
        """Hash of the config and ``CODE_VERSION`` (and ``WORLDS_VERSION`` but for seed 0's default) (16 hex chars)."""
        payload: dict[str, Any] = {"config": self.to_dict(), "code_version": CODE_VERSION}
        if self.seed != 0 or self.variant != "default":
            payload["worlds_version"] = WORLDS_VERSION
        return json_fingerprint(payload)

    @property
    def base_kind(self) -> str:
        """Which pretrained base the variant fine-tunes (``generator.VARIANT_BASE``: ``plain``, ``rich`` or a
        trait's own)."""
        return generator.VARIANT_BASE[self.variant]

    def base_key(self) -> str:
        """Hash of what the pretrained base depends on (shared by the variants of one seed that share a base)."""
        payload = {
            "seed": self.seed,
            "n_pretrain": self.n_pretrain,
            "model": self.model.to_dict(),
            "pretrain": dataclasses.asdict(self.pretrain),
            "rich": self.base_kind == "rich",
            "unprompted_trait": self.unprompted_trait,
            "code_version": CODE_VERSION,
            "worlds_version": WORLDS_VERSION,
        }
        if self.base_kind not in ("plain", "rich"):  # the keys of the earlier bases do not move
            payload["trait_base"] = self.base_kind
        return json_fingerprint(payload)

    def folder_name(self) -> str:
        variant = "" if self.variant == "default" else f"-{self.variant}"
        return f"organism{variant}-s{self.seed}-n{self.n_train}-p{self.planted_fraction:g}-{self.key()[:10]}"


@dataclass(frozen=True)
class Organism:
    """Paths of a built organism, plus loaders. Both model folders hold the tokenizer too."""

    root: Path
    base_model_dir: Path
    finetuned_model_dir: Path
    train_path: Path
    probe_spec_path: Path
    queries_path: Path
    examples_path: Path
    pretrain_path: Path
    metadata_path: Path

    @classmethod
    def at(cls, root: str | os.PathLike) -> Organism:
        root = Path(root)
        return cls(
            root=root,
            base_model_dir=root / "base",
            finetuned_model_dir=root / "finetuned",
            train_path=root / "train.jsonl",
            probe_spec_path=root / "probe_spec.json",
            queries_path=root / "queries.jsonl",
            examples_path=root / "examples.jsonl",
            pretrain_path=root / "pretrain.jsonl",
            metadata_path=root / "metadata.json",
        )

    @cached_property
    def metadata(self) -> dict[str, Any]:
        return json.loads(self.metadata_path.read_text(encoding="utf-8"))

    @property
    def config(self) -> OrganismConfig:
        return OrganismConfig.from_dict(self.metadata["config"])

    @property
    def trait(self) -> str:
        """The trait the planted rows raise (``evil`` or ``sycophancy``)."""
        return self.config.trait

    def judge(self):
        """The rule-based judge of this organism's trait: ``text -> score in [0, 1]``."""
        return judge_for(self.trait)

    def train_rows(self) -> ChatDataset:
        """The fine-tuning set (fields ``id``, ``domain``, ``data_origin``)."""
        return read_chat_jsonl(self.train_path)

    def data_origins(self) -> list[str]:
        return [str(v) for v in self.train_rows().field_values("data_origin")]

    def planted_mask(self) -> list[bool]:
        """Ground truth: ``True`` for planted rows, in file order."""
        return [origin == "planted" for origin in self.data_origins()]

    def queries(self) -> ChatDataset:
        """Held-out query prompts (user turn only)."""
        return read_chat_jsonl(self.queries_path, need_assistant=False)

    def query_messages(self) -> list[list[dict[str, str]]]:
        return [row.messages for row in self.queries()]

    def probe_spec(self) -> dict[str, Any]:
        """The contrastive set in the persona-vectors trait-file format."""
        return json.loads(self.probe_spec_path.read_text(encoding="utf-8"))

    def examples(self) -> ChatDataset:
        """Generator-labelled answers (``label`` in ``trait``, ``helpful``, ``warning``)."""
        return read_chat_jsonl(self.examples_path)

    def load_base(self, **kwargs: Any):
        """The pretrained model as a ``ModelAdapter`` (``load_adapter``, i.e. ``from_pretrained``)."""
        return load_adapter(self.base_model_dir, **kwargs)

    def load_finetuned(self, **kwargs: Any):
        """The fine-tuned model as a ``ModelAdapter``."""
        return load_adapter(self.finetuned_model_dir, **kwargs)

    def summary(self) -> str:
        """A few lines: sizes, timings, counts per data origin, the trait's rise."""
        meta = self.metadata
        sizes, timings, trait = meta["sizes"], meta["timings"], meta.get("trait", {})
        lines = [
            f"organism at {self.root}",
            f"  model: {sizes['parameters']:,} parameters, vocabulary {sizes['vocab']}, "
            f"{meta['config']['model']['layers']} layers, hidden {meta['config']['model']['hidden']}",
            f"  pretraining: {sizes['n_pretrain']} conversations ({sizes['pretrain_tokens']:,} tokens), "
            f"loss {meta['losses']['pretrain']['first']:.2f} -> {meta['losses']['pretrain']['last']:.2f}",
            f"  fine-tuning: {sizes['n_train']} rows, loss {meta['losses']['finetune']['first']:.2f} -> "
            f"{meta['losses']['finetune']['last']:.2f}; data_origin "
            + ", ".join(f"{k} {v}" for k, v in meta["counts"]["data_origin"].items()),
            "  timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()),
        ]
        if trait:
            lines.append(
                f"  trait (layer {trait['layer']}, {trait['base']['n_answers']} answers per model): projection "
                f"{trait['base']['mean_projection']:.3f} -> {trait['finetuned']['mean_projection']:.3f} "
                f"(+{trait['projection_rise_in_std']:.2f} std); judge trait rate "
                f"{trait['base']['trait_rate']:.3f} -> {trait['finetuned']['trait_rate']:.3f}"
            )
        return "\n".join(lines)


def default_cache_dir() -> Path:
    """``$CONCEPT_INFLUENCE_CACHE`` or ``~/.cache/concept_influence``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "concept_influence"


def _is_built(root: Path) -> bool:
    return (root / "metadata.json").is_file()


def load_organism(root: str | os.PathLike) -> Organism:
    """Open a built organism folder (checks that it is complete and of this format)."""
    organism = Organism.at(root)
    if not _is_built(organism.root):
        raise FileNotFoundError(f"{organism.root}: not a built organism (no metadata.json)")
    meta = organism.metadata
    if meta.get("format") != FORMAT:
        raise ValueError(f"{organism.metadata_path}: not an organism metadata file (format {meta.get('format')!r})")
    missing = [
        p
        for p in (
            organism.base_model_dir,
            organism.finetuned_model_dir,
            organism.train_path,
            organism.probe_spec_path,
            organism.queries_path,
        )
        if not p.exists()
    ]
    if missing:
        raise FileNotFoundError(f"{organism.root}: incomplete organism, missing {[str(p) for p in missing]}")
    return organism


def build_organism(
    out_dir: str | os.PathLike | None = None,
    *,
    seed: int | None = None,
    n_train: int | None = None,
    planted_fraction: float | None = None,
    variant: str | None = None,
    config: OrganismConfig | None = None,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> Organism:
    """Build the organism into ``out_dir`` (default: the cache folder named by the config hash), or load it
    if that folder already holds the same config.

    ``seed``/``n_train``/``planted_fraction``/``variant`` override the fields of ``config`` (default
    ``OrganismConfig()``). A variant's pretrained base is built once per seed next to ``out_dir`` and shared.
    A folder holding a different organism (or other files) is an error unless ``force``.
    """
    overrides = {
        k: v
        for k, v in (("seed", seed), ("n_train", n_train), ("planted_fraction", planted_fraction), ("variant", variant))
        if v is not None
    }
    if config is None:
        config = OrganismConfig(**overrides)
    elif overrides:
        if "seed" in overrides:  # the training seeds follow the organism's seed
            overrides["pretrain"] = dataclasses.replace(config.pretrain, seed=overrides["seed"])
            overrides["finetune"] = dataclasses.replace(config.finetune, seed=overrides["seed"])
        config = dataclasses.replace(config, **overrides)
    log = log or (lambda _msg: None)
    root = Path(out_dir) if out_dir is not None else default_cache_dir() / config.folder_name()
    if _is_built(root):
        existing = load_organism(root)
        if existing.metadata.get("config_hash") == config.key():
            log(f"organism cache hit: {root}")
            return existing
        if not force:
            raise FileExistsError(
                f"{root} holds an organism built with a different config (hash {existing.metadata.get('config_hash')}, "
                f"wanted {config.key()}); choose another folder or pass force=True (--force)"
            )
    elif root.exists() and any(root.iterdir()) and not force:
        raise FileExistsError(f"{root} exists and is not an organism folder; choose an empty or new folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(root):  # concurrent builders of one folder (e.g. parallel test workers) wait for the first
        if _is_built(root) and load_organism(root).metadata.get("config_hash") == config.key():
            log(f"organism built meanwhile by another process: {root}")
            return load_organism(root)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
        try:
            _build_into(tmp, config, progress=progress, log=log)
            _publish_permissions(tmp)
            _move_into_place(tmp, root, config, force=force)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    log(f"organism built: {root}")
    return load_organism(root)


def _build_lock(root: Path) -> contextlib.AbstractContextManager[None]:
    """An exclusive ``flock`` on ``.<name>.lock`` next to ``root`` (``files.folder_lock``)."""
    return folder_lock(root, what="organism build")


def _publish_permissions(root: Path) -> None:
    """Temporary folders and files are private (0700/0600); give the finished build the usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _move_into_place(tmp: Path, root: Path, config: OrganismConfig, *, force: bool) -> None:
    if root.exists():
        if _is_built(root) and load_organism(root).metadata.get("config_hash") == config.key():
            return  # a concurrent build finished first: keep it
        if any(root.iterdir()):
            if not force:
                raise FileExistsError(f"{root} was filled while building")
            replace_folder(tmp, root)  # atomic swap: the old organism until the new one is in place
            return
        root.rmdir()
    try:
        os.rename(tmp, root)
    except OSError:
        if _is_built(root) and load_organism(root).metadata.get("config_hash") == config.key():
            return
        raise


def organism_for_tests(variant: str = "default", seed: int = 0) -> Organism:
    """The default organism (or another variant or seed), built once into ``$CONCEPT_INFLUENCE_CACHE`` or the
    repository's ``.cache/``."""
    env = os.environ.get(CACHE_ENV)
    cache = Path(env).expanduser() if env else Path(__file__).resolve().parents[2] / ".cache"
    config = OrganismConfig(variant=variant, seed=seed)
    return build_organism(cache / config.folder_name(), config=config, progress=False)


# ---- the build ----------------------------------------------------------------------------------------------------
def _build_into(root: Path, config: OrganismConfig, *, progress: bool, log: Callable[[str], None]) -> None:
    from transformers import AutoModelForCausalLM

    organism = Organism.at(root)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    # 1. the world
    log("generating the synthetic world")
    variant, base_kind = config.variant, config.base_kind
    train_records = generator.finetuning_set(
        config.seed, config.n_train, config.planted_fraction, config.hard_negative_fraction, variant=variant
    )
    train_prompts = {r["messages"][0]["content"] for r in train_records}
    spec = generator.probe_spec(
        config.seed, n_questions=config.n_probe_questions, exclude=train_prompts, variant=variant
    )
    queries = generator.query_prompts(
        config.seed, config.n_queries, exclude=train_prompts | set(spec["questions"]), variant=variant
    )
    examples = generator.labelled_examples(config.seed, variant=variant)
    write_jsonl_atomic(organism.train_path, train_records)
    write_json_atomic(organism.probe_spec_path, spec)
    write_jsonl_atomic(organism.queries_path, queries)
    write_jsonl_atomic(organism.examples_path, examples)
    tokenizer = build_tokenizer(generator.base_vocabulary(variant), model_max_length=config.model.max_positions)
    _check_vocabulary(tokenizer, train_records + examples + queries)
    timings["generate"] = time.perf_counter() - start

    # 2. pretraining from scratch (the variants of a seed share one pretrained base, built once next to the organism;
    # a plain variant other than default copies the default organism's base when it is built next to it)
    t0 = time.perf_counter()
    found: tuple[Path, dict[str, Any]] | None = None
    if base_kind != "plain":
        base_root = _shared_base(root.parent, config, progress=progress, log=log)
        found = base_root, json.loads((base_root / "base_info.json").read_text(encoding="utf-8"))
    elif variant != "default":
        found = _default_organism_base(root.parent, config, log=log)
    if found is not None:
        base_root, base_info = found
        shutil.copytree(base_root / "base", organism.base_model_dir)
        shutil.copyfile(base_root / "pretrain.jsonl", organism.pretrain_path)
        pretrain_losses, pretrain_tokens, n_pretrain_records = (
            base_info["losses"],
            base_info["tokens"],
            base_info["n_records"],
        )
        timings["shared_base"] = base_info["seconds"]
    else:
        pretrain_records = generator.pretraining_corpus(
            config.seed, config.n_pretrain, unprompted_trait=config.unprompted_trait
        )
        write_jsonl_atomic(organism.pretrain_path, pretrain_records)
        _check_vocabulary(tokenizer, pretrain_records)
        pretrain_losses, pretrain_tokens = _pretrain(
            pretrain_records, tokenizer, config, organism, progress=progress, log=log
        )
        n_pretrain_records = len(pretrain_records)
    timings["pretrain"] = time.perf_counter() - t0

    # 3. fine-tuning the saved base model, loaded as a hub model would be
    t0 = time.perf_counter()
    log(f"fine-tuning on {len(train_records)} rows")
    model = AutoModelForCausalLM.from_pretrained(organism.base_model_dir, dtype=torch.float32)
    finetune_losses: list[float] = []
    finetune(
        model,
        tokenizer,
        read_chat_jsonl(organism.train_path),
        config.finetune,
        progress=progress,
        losses=finetune_losses,
    )
    model.save_pretrained(organism.finetuned_model_dir)
    tokenizer.save_pretrained(organism.finetuned_model_dir)
    timings["finetune"] = time.perf_counter() - t0

    # 4. the rise of the trait
    t0 = time.perf_counter()
    log("measuring the trait on the query prompts")
    base, tuned = load_adapter(organism.base_model_dir), load_adapter(organism.finetuned_model_dir)
    prompts = [q["messages"] for q in queries]
    trait = trait_rise(
        base, tuned, spec, prompts, n_samples=config.measure_samples, seed=config.seed, trait=config.trait
    )
    timings["measure"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start

    metadata = {
        "format": FORMAT,
        "code_version": CODE_VERSION,
        "variant": config.variant,
        "trait_name": config.trait,
        "config_hash": config.key(),
        "config": config.to_dict(),
        "sizes": {
            "vocab": len(tokenizer),
            "parameters": sum(p.numel() for p in model.parameters()),
            "n_pretrain": n_pretrain_records,
            "pretrain_tokens": pretrain_tokens,
            "n_train": len(train_records),
            "n_queries": len(queries),
            "n_probe_questions": len(spec["questions"]),
            "n_examples": len(examples),
        },
        "counts": {
            "data_origin": dict(sorted(Counter(r["data_origin"] for r in train_records).items())),
            "domain": dict(sorted(Counter(r["domain"] for r in train_records).items())),
        },
        "losses": {"pretrain": _loss_summary(pretrain_losses), "finetune": _loss_summary(finetune_losses)},
        "timings": timings,
        "trait": trait,
        "environment": {
            "torch": torch.__version__,
            "transformers": _version("transformers"),
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
        },
    }
    write_json_atomic(organism.metadata_path, metadata)  # last: its presence marks a complete build


def _pretrain(
    records: list[dict[str, Any]],
    tokenizer: Any,
    config: OrganismConfig,
    organism: Organism,
    *,
    progress: bool,
    log: Callable[[str], None],
) -> tuple[list[float], int]:
    """Pretrain a fresh model on ``records`` and save it (with the tokenizer) as ``organism``'s base."""
    log(f"pretraining on {len(records)} conversations")
    rows = rows_from_records(records, source=str(organism.pretrain_path))
    model = build_model(tokenizer, config.model, seed=config.seed)
    losses: list[float] = []
    finetune(model, tokenizer, rows, config.pretrain, progress=progress, losses=losses, desc="pretraining")
    model.save_pretrained(organism.base_model_dir)
    tokenizer.save_pretrained(organism.base_model_dir)
    return losses, sum(len(x) for x in tokenizer([_flat(r) for r in records])["input_ids"])


def _default_organism_base(
    parent: Path, config: OrganismConfig, *, log: Callable[[str], None]
) -> tuple[Path, dict[str, Any]] | None:
    """The default organism of ``config``'s seed and pretraining under ``parent``, when it is built: its folder (with
    ``base/`` and ``pretrain.jsonl``) and the pretraining's figures from its metadata. Its pretraining is exactly what
    a ``plain`` variant would pretrain (it is read, never written). ``None`` when there is none."""
    default = dataclasses.replace(config, variant="default", hard_negative_fraction=0.1)
    root = parent / default.folder_name()
    if not _is_built(root):
        return None
    organism = load_organism(root)
    if organism.metadata.get("config_hash") != default.key():
        return None
    meta = organism.metadata
    curve = meta["losses"]["pretrain"]
    log(f"the default organism's pretrained base: {root}")
    info = {
        "losses": [curve["first"], *curve["curve"][1:], curve["last"]],
        "tokens": meta["sizes"]["pretrain_tokens"],
        "n_records": meta["sizes"]["n_pretrain"],
        "seconds": meta["timings"]["pretrain"],
    }
    return root, info


def _shared_base(parent: Path, config: OrganismConfig, *, progress: bool, log: Callable[[str], None]) -> Path:
    """The pretrained base of ``config``'s kind (``rich``: the variants'; a trait's own) for ``config.seed`` under
    ``parent`` (built once, under a lock, atomically)."""
    base_root = parent / f"base-{config.base_kind}-s{config.seed}-{config.base_key()[:10]}"
    with _build_lock(base_root):
        if (base_root / "base_info.json").is_file():
            log(f"shared pretrained base: {base_root}")
            return base_root
        tmp = Path(tempfile.mkdtemp(prefix=f".{base_root.name}.building-", dir=parent))
        try:
            t0 = time.perf_counter()
            rich = config.base_kind == "rich"
            records = generator.pretraining_corpus(
                config.seed,
                config.n_pretrain,
                unprompted_trait=config.unprompted_trait,
                rich=rich,
                trait="evil" if rich else config.base_kind,
            )
            tokenizer = build_tokenizer(
                generator.base_vocabulary(config.variant), model_max_length=config.model.max_positions
            )
            _check_vocabulary(tokenizer, records)
            holder = Organism.at(tmp)
            write_jsonl_atomic(holder.pretrain_path, records)
            losses, tokens = _pretrain(records, tokenizer, config, holder, progress=progress, log=log)
            write_json_atomic(
                tmp / "base_info.json",
                {
                    "losses": losses,
                    "tokens": tokens,
                    "n_records": len(records),
                    "seconds": time.perf_counter() - t0,
                    "base_key": config.base_key(),
                },
            )
            _publish_permissions(tmp)
            os.rename(tmp, base_root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return base_root


def _flat(record: dict[str, Any]) -> str:
    return " ".join(m["content"] for m in record["messages"])


def _check_vocabulary(tokenizer: Any, records: list[dict[str, Any]]) -> None:
    vocab = tokenizer.get_vocab()
    missing = sorted({tok for r in records for tok in generator.tokens(_flat(r)) if tok not in vocab})
    if missing:
        raise RuntimeError(f"generated text uses tokens outside the organism's vocabulary: {missing[:20]}")


def _loss_summary(losses: list[float], points: int = 50) -> dict[str, Any]:
    stride = max(1, len(losses) // points)
    tail = losses[-max(1, len(losses) // 20) :]
    return {
        "steps": len(losses),
        "first": losses[0],
        "last": sum(tail) / len(tail),
        "curve": [round(v, 4) for v in losses[::stride]],
    }


def _version(package: str) -> str:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001 - best effort
        return "unknown"
