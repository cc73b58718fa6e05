"""Counterfactual evaluation of rankings: remove rows, retrain, and measure how much of the fine-tuning's rise of a
concept the removal takes away; and the linear datamodeling score (LDS) over random subsets.

For each seed ``s`` the base model is fine-tuned (``retrain``) on the full data, on each scores table's
remove-top and remove-bottom sets at every fraction, on random removals of the same sizes, and optionally on the
oracle removal (rows known to cause the behaviour). Every model is measured on its own answers to the query prompts:

- ``probe``: the concept's mean readout over the answers' tokens (``ConceptMeasurement``), read by a fixed model,
  ``reader`` (default: the base model), so that every run is measured with the same instrument;
- ``trait_rate``: the share of answers a judge scores above 0, when a judge is given.

``rise_removed = (full_s − filtered_s) / mean_s(full_s − base_s)``: the share of the fine-tuning rise the removal
took away (1 = all of it, 0 = none, negative = the removal raised the concept), with mean and 95% t-interval over
seeds. ``top_minus_random`` / ``top_minus_bottom``: the same seed's remove-top share minus its random / remove-bottom
share, mean and t-interval over seeds (a paired comparison: the full-data run's seed-to-seed spread cancels). Each run's
result is cached in ``out_dir/runs/<key>.json`` (key: model, data, removal, seed, recipe and measurement settings), so
an interrupted evaluation resumes and a second call reuses shared runs.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from concept_influence.attribution.measurements import ConceptMeasurement, answer_queries, tokenize_queries
from concept_influence.attribution.scores import ScoreTable
from concept_influence.concepts.answers import AnswerConfig
from concept_influence.concepts.base import Concept
from concept_influence.data.chat import ChatRow, write_json_atomic
from concept_influence.evaluate.filter import FilterRule, check_alignment, select_removal
from concept_influence.evaluate.retrain import Recipe, retrain
from concept_influence.evaluate.stats import bootstrap_ci, mean_ci, spearman
from concept_influence.models import ModelAdapter
from concept_influence.models.fingerprint import json_fingerprint
from concept_influence.plots import removal_curve_png
from concept_influence.settings import option, same_as

Judge = Callable[[str], float]
METRICS = ("probe", "trait_rate")
ORACLE_LDS = "oracle (count of the oracle rows)"


@dataclass(frozen=True)
class EvaluationConfig:
    """``fractions``: removal sizes (share of rows); ``seeds``: repeats of every run (training order, random
    removals and answer sampling); ``recipe``: how to fine-tune; ``n_samples``/``max_new_tokens``/``temperature``:
    answers sampled per query prompt when measuring; ``lds_subsets``/``lds_fraction``: random subsets (each of
    that share of the rows) for the linear datamodeling score, 0 = no LDS; ``removal``: run the removal curves."""

    fractions: tuple[float, ...] = option((0.05, 0.1, 0.25), help="Shares of rows to remove.", cli=False)
    seeds: int = option(3, help="Repeats of every fine-tune (CI over seeds).")
    recipe: Recipe = option(default_factory=Recipe, help="How to fine-tune.", cli=False)
    n_samples: int = option(8, help="Answers sampled per query prompt per model.")
    max_new_tokens: int = same_as(AnswerConfig, "max_new_tokens", min=None)
    temperature: float = same_as(AnswerConfig, "temperature", min=None)
    lds_subsets: int = option(0, help="Random subsets for the linear datamodeling score (0: no LDS).", cli=False)
    lds_fraction: float = option(0.5, help="--lds: share of rows in each subset.", flag="--subset-fraction")
    removal: bool = option(True, help="Run the removal curves.", cli=False)
    seed: int = option(0, help="Seed of the random removals, subsets and answer sampling.")

    def __post_init__(self) -> None:
        object.__setattr__(self, "fractions", tuple(float(f) for f in self.fractions))
        if any(not 0.0 < f < 1.0 for f in self.fractions):
            raise ValueError(f"--fractions must each be in (0, 1), got {list(self.fractions)}")
        if self.removal and not self.fractions:
            raise ValueError("--fractions: give at least one fraction")
        if self.seeds < 1 or self.n_samples < 1 or self.max_new_tokens < 1:
            raise ValueError("--seeds, --n-samples and --max-new-tokens must be >= 1")
        if self.lds_subsets < 0 or (self.lds_subsets and self.lds_subsets < 3):
            raise ValueError(f"--subsets must be >= 3 for LDS, got {self.lds_subsets}")
        if not 0.0 < self.lds_fraction < 1.0:
            raise ValueError(f"--subset-fraction must be in (0, 1), got {self.lds_fraction}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["recipe"] = self.recipe.to_dict()
        return out


@dataclass(frozen=True)
class Run:
    """One fine-tune: train on every row except ``removed`` (sorted indices) with seed ``seed``; ``train=False``
    measures the base model itself."""

    removed: tuple[int, ...]
    seed: int
    train: bool = True


# ---- measurement ---------------------------------------------------------------------------------------------------
def prompts_only(queries: Sequence[ChatRow]) -> list[ChatRow]:
    """Query rows without their trailing assistant turns: the model answers every prompt itself."""
    out = []
    for row in queries:
        messages = list(row.messages)
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        if not messages:
            raise ValueError(f"query row {row.index} (line {row.line}) has no prompt")
        out.append(ChatRow(row.index, messages, dict(row.fields), row.line))
    return out


def measure_concept(
    model: ModelAdapter,
    queries: Sequence[ChatRow],
    concept: Concept,
    *,
    reader: ModelAdapter | None = None,
    judge: Judge | None = None,
    n_samples: int = 8,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    seed: int = 0,
    max_length: int = 512,
) -> dict[str, float]:
    """The concept on ``model``'s own answers to the query prompts: ``probe`` (mean readout, read by ``reader``,
    default ``model``) and, with a judge, ``trait_rate`` (share of answers the judge scores above 0)."""
    reader = reader or model
    answered = answer_queries(
        model,
        prompts_only(queries),
        n_samples=n_samples,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
    )
    tokenized = tokenize_queries(answered, reader.tokenizer, max_length=max_length)
    out = {"probe": ConceptMeasurement(concept, tokenized).value(reader), "n_answers": float(len(answered))}
    if judge is not None:
        out["trait_rate"] = float(np.mean([float(judge(row.answer)) > 0 for row in answered]))
    return out


def concept_fingerprint(concept: Concept) -> str:
    """Hash of a concept's class, layer and every tensor it holds (directly or in a module)."""
    digest = hashlib.sha256(f"{type(concept).__name__}:{concept.layer}:{getattr(concept, 'reduction', '')}".encode())
    for name, value in sorted(vars(concept).items()):
        tensors = value.state_dict().items() if isinstance(value, torch.nn.Module) else [(name, value)]
        for key, tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                digest.update(key.encode())
                digest.update(tensor.detach().cpu().float().contiguous().numpy().tobytes())
            elif isinstance(tensor, (int, float, str)):
                digest.update(f"{key}={tensor}".encode())
    return digest.hexdigest()[:16]


# ---- the plan ------------------------------------------------------------------------------------------------------
def removal_sets(scores: np.ndarray, fraction: float) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """``(top, bottom, k)``: indices of the ``k = round(fraction · n)`` highest and lowest scores."""
    rows = [None] * len(scores)
    top = select_removal(rows, scores, FilterRule(remove_top=fraction))
    bottom = select_removal(rows, scores, FilterRule(remove_top=fraction, end="bottom"))
    return tuple(top.removed), tuple(bottom.removed), len(top.removed)


def random_removal(n: int, k: int, seed: int, salt: int) -> tuple[int, ...]:
    rng = np.random.default_rng([seed, salt, k, n])
    return tuple(sorted(int(i) for i in rng.choice(n, size=k, replace=False)))


def lds_subset(n: int, fraction: float, seed: int, j: int) -> tuple[int, ...]:
    """The rows *removed* for LDS subset ``j`` (the kept subset has ``round(fraction · n)`` rows)."""
    rng = np.random.default_rng([seed, 7919, j, n])
    kept = set(int(i) for i in rng.choice(n, size=int(round(fraction * n)), replace=False))
    return tuple(i for i in range(n) if i not in kept)


class Evaluator:
    """Runs (and caches) fine-tunes and measurements for one base model, data set, concept and query set."""

    def __init__(
        self,
        base: ModelAdapter,
        rows: Sequence[ChatRow],
        concept: Concept,
        queries: Sequence[ChatRow],
        config: EvaluationConfig,
        out_dir: str | Path,
        *,
        reader: ModelAdapter | None = None,
        judge: Judge | None = None,
        judge_name: str | None = None,
        progress: bool = True,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if base.tokenizer is None:
            raise ValueError("evaluate needs the base model's tokenizer")
        self.base, self.rows, self.concept, self.queries = base, list(rows), concept, list(queries)
        self.config, self.out_dir = config, Path(out_dir)
        self.reader, self.judge, self.progress = reader or base, judge, progress
        self.log = log or (lambda _msg: None)
        self.context = {
            "base": base.fingerprint(),
            "reader": self.reader.fingerprint(),
            "data": json_fingerprint([[r.messages] for r in self.rows]),
            "concept": concept_fingerprint(concept),
            "queries": json_fingerprint([q.messages for q in self.queries]),
            "recipe": config.recipe.to_dict(),
            "measure": {
                "n_samples": config.n_samples,
                "max_new_tokens": config.max_new_tokens,
                "temperature": config.temperature,
            },
            "judge": judge_name if judge is not None else None,
        }

    def key(self, run: Run) -> str:
        return json_fingerprint({**self.context, "removed": list(run.removed), "seed": run.seed, "train": run.train})

    def result(self, run: Run) -> dict[str, Any]:
        """The measurement of one run, from the cache or computed (and cached)."""
        import json

        path = self.out_dir / "runs" / f"{self.key(run)}.json"
        if path.exists():
            return json.loads(path.read_text(encoding="utf-8"))
        started = time.perf_counter()
        if run.train:
            keep = set(range(len(self.rows))) - set(run.removed)
            model = retrain(self.base, [self.rows[i] for i in sorted(keep)], self.config.recipe, seed=run.seed)
        else:
            model = self.base
        trained = time.perf_counter()
        measured = measure_concept(
            model,
            self.queries,
            self.concept,
            reader=self.reader,
            judge=self.judge,
            n_samples=self.config.n_samples,
            max_new_tokens=self.config.max_new_tokens,
            temperature=self.config.temperature,
            seed=self.config.seed * 1000 + run.seed,
        )
        record = {
            **measured,
            "n_removed": len(run.removed),
            "seed": run.seed,
            "train": run.train,
            "train_seconds": trained - started,
            "measure_seconds": time.perf_counter() - trained,
        }
        write_json_atomic(path, record)
        return record

    def run_all(self, runs: Sequence[Run]) -> dict[Run, dict[str, Any]]:
        unique = list(dict.fromkeys(runs))
        out: dict[Run, dict[str, Any]] = {}
        for run in tqdm(unique, desc="retraining", disable=not self.progress):
            out[run] = self.result(run)
        return out


# ---- summaries -----------------------------------------------------------------------------------------------------
def _metrics(results: Mapping[Run, dict[str, Any]]) -> list[str]:
    return [m for m in METRICS if all(m in r for r in results.values())]


def _entry(
    values: Sequence[dict[str, Any]],
    full: Sequence[dict[str, Any]],
    rise: dict[str, float],
    metrics: Sequence[str],
    **extra: Any,
) -> dict[str, Any]:
    """Mean and CI of each metric over seeds, plus ``rise_removed``; the probe readout is the entry's top level."""
    entry: dict[str, Any] = dict(extra)
    for metric in metrics:
        measured = mean_ci([v[metric] for v in values])
        if rise[metric] != 0:
            removed = mean_ci([(f[metric] - v[metric]) / rise[metric] for v, f in zip(values, full, strict=True)])
        else:
            removed = {"mean": float("nan"), "ci": [float("nan"), float("nan")], "n": len(values), "values": []}
        block = {**measured, "rise_removed": removed}
        if metric == "probe":
            entry.update(block)
        else:
            entry[metric] = block
    return entry


def _paired_difference(a: dict[str, Any], b: dict[str, Any], metrics: Sequence[str]) -> dict[str, Any]:
    """Mean and 95% t-interval over seeds of ``a``'s minus ``b``'s ``rise_removed``, paired by seed: both runs of a
    seed share its training order and answer sampling, and the full-data run cancels out, so the interval is
    usually much narrower than either entry's own. The probe's block is the top level, other metrics nest."""
    out: dict[str, Any] = {}
    for metric in metrics:
        x, y = (e if metric == "probe" else e[metric] for e in (a, b))
        x, y = x["rise_removed"]["values"], y["rise_removed"]["values"]
        if len(x) != len(y) or not x:  # a zero rise leaves no values
            block: dict[str, Any] = {"mean": float("nan"), "ci": [float("nan"), float("nan")], "n": 0, "values": []}
        else:
            block = mean_ci([u - v for u, v in zip(x, y, strict=True)])
        if metric == "probe":
            out.update(block)
        else:
            out[metric] = block
    return out


def evaluate_removals(
    base: ModelAdapter,
    rows: Sequence[ChatRow],
    tables: Mapping[str, ScoreTable],
    concept: Concept,
    queries: Sequence[ChatRow],
    config: EvaluationConfig,
    out_dir: str | Path,
    *,
    reader: ModelAdapter | None = None,
    judge: Judge | None = None,
    judge_name: str | None = None,
    oracle: Sequence[int] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    data_name: str = "data",
    extra_meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Removal curves (and LDS when ``config.lds_subsets``) for each named scores table; writes
    ``out_dir/evaluation.json`` and ``out_dir/removal_curve.png`` and returns the evaluation dict.

    ``tables``: name -> ScoreTable over exactly ``rows``; ``oracle``: row indices to remove as the reference
    (e.g. the planted rows; with LDS, the count of them in a subset is scored as a reference predictor,
    ``lds.methods[ORACLE_LDS]``); ``judge``: ``text -> score`` (trait when > 0) for the trait rate; ``data_name``: how
    errors name the rows (e.g. their file); ``extra_meta``: added to the evaluation dict (e.g. the record of an
    ``--allow-other-data`` override).
    """
    out_dir = Path(out_dir)
    if not tables:
        raise ValueError("evaluate needs at least one scores table")
    n = len(rows)
    aligned = {
        name: check_alignment(rows, table, data_name=data_name, scores_name=str(table.meta.get("path", name)))
        for name, table in tables.items()
    }
    if oracle is not None:
        oracle = tuple(sorted(set(int(i) for i in oracle)))
        if not oracle or oracle[0] < 0 or oracle[-1] >= n:
            raise ValueError(f"oracle removal must name between 1 and {n} valid row indices")
    ev = Evaluator(
        base,
        rows,
        concept,
        queries,
        config,
        out_dir,
        reader=reader,
        judge=judge,
        judge_name=judge_name,
        progress=progress,
        log=log,
    )
    seeds = list(range(config.seeds))
    plan: list[Run] = [Run((), s, train=False) for s in seeds] + [Run((), s) for s in seeds]
    sets: dict[str, dict[float, tuple[tuple[int, ...], tuple[int, ...], int]]] = {}
    if config.removal:  # references first (random, oracle), then each ranking's top and bottom removals
        sets = {name: {f: removal_sets(scores, f) for f in config.fractions} for name, scores in aligned.items()}
        ks = sorted({k for per in sets.values() for (_, _, k) in per.values()})
        plan += [Run(random_removal(n, k, config.seed * 1000 + s, 1), s) for k in ks for s in seeds]
        if oracle is not None:
            plan += [Run(oracle, s) for s in seeds]
        for per_fraction in sets.values():
            for top, bottom, _ in per_fraction.values():
                plan += [Run(top, s) for s in seeds] + [Run(bottom, s) for s in seeds]
    lds_runs: list[list[Run]] = []
    if config.lds_subsets:
        lds_runs = [
            [Run(lds_subset(n, config.lds_fraction, config.seed, j), s) for s in seeds]
            for j in range(config.lds_subsets)
        ]
        plan += [r for runs in lds_runs for r in runs]
    ev.log(f"evaluate: {len(set(plan))} runs ({len(seeds)} seeds) on {n} rows -> {out_dir}")
    results = ev.run_all(plan)
    metrics = _metrics(results)

    base_runs = [results[Run((), s, train=False)] for s in seeds]
    full_runs = [results[Run((), s)] for s in seeds]
    rise = {m: float(np.mean([f[m] - b[m] for f, b in zip(full_runs, base_runs, strict=True)])) for m in metrics}
    evaluation: dict[str, Any] = {
        "format": "concept_influence.evaluation",
        "n_rows": n,
        "seeds": config.seeds,
        "metrics": metrics,
        "config": config.to_dict(),
        "context": ev.context,
        "base": _entry(base_runs, full_runs, rise, metrics),
        "full": _entry(full_runs, full_runs, rise, metrics),
        "rise": rise,
        "methods": {
            name: {"method": t.meta.get("method", t.method), "path": t.meta.get("path")} for name, t in tables.items()
        },
        "results": {},
    }
    if config.removal:
        for name, per_fraction in sets.items():
            evaluation["results"][name] = {}
            for f, (top, bottom, k) in per_fraction.items():
                rand = [results[Run(random_removal(n, k, config.seed * 1000 + s, 1), s)] for s in seeds]
                entries = {
                    "remove_top": _entry([results[Run(top, s)] for s in seeds], full_runs, rise, metrics, k=k),
                    "remove_bottom": _entry([results[Run(bottom, s)] for s in seeds], full_runs, rise, metrics, k=k),
                    "random": _entry(rand, full_runs, rise, metrics, k=k),
                }
                evaluation["results"][name][f"{f:g}"] = {
                    "fraction": f,
                    "k": k,
                    **entries,
                    "top_minus_random": _paired_difference(entries["remove_top"], entries["random"], metrics),
                    "top_minus_bottom": _paired_difference(entries["remove_top"], entries["remove_bottom"], metrics),
                }
        if oracle is not None:
            evaluation["oracle"] = _entry(
                [results[Run(oracle, s)] for s in seeds],
                full_runs,
                rise,
                metrics,
                k=len(oracle),
                fraction=len(oracle) / n,
            )
    if config.lds_subsets:
        predictors = dict(aligned)
        if oracle is not None:  # the reference: a subset's count of the rows known to cause the behaviour
            indicator = np.zeros(n)
            indicator[list(oracle)] = 1.0
            predictors[ORACLE_LDS] = indicator
        evaluation["lds"] = linear_datamodeling(predictors, lds_runs, results, metrics, seed=config.seed)
        evaluation["lds"]["subsets"] = config.lds_subsets
        evaluation["lds"]["subset_fraction"] = config.lds_fraction
    evaluation.update(dict(extra_meta or {}))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "evaluation.json", evaluation)
    if config.removal:
        (out_dir / "removal_curve.png").write_bytes(removal_curve_png(evaluation))
    return evaluation


def linear_datamodeling(
    aligned: Mapping[str, np.ndarray],
    lds_runs: Sequence[Sequence[Run]],
    results: Mapping[Run, dict[str, Any]],
    metrics: Sequence[str],
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """LDS per method and metric: Spearman between the predicted measurement of each subset (the sum of its rows'
    scores) and the actual one (mean over seeds), with a 95% bootstrap interval over subsets."""
    out: dict[str, Any] = {"methods": {}}
    for metric in metrics:
        actual = np.array([np.mean([results[r][metric] for r in runs]) for runs in lds_runs])
        for name, scores in aligned.items():
            total = float(np.nansum(scores))
            predicted = np.array([total - np.nansum(scores[list(runs[0].removed)]) for runs in lds_runs])
            value = spearman(predicted, actual)
            ci = bootstrap_ci(lambda idx, p=predicted, a=actual: spearman(p[idx], a[idx]), len(actual), seed=seed)
            block = {"spearman": value, "ci": ci}
            target = out["methods"].setdefault(name, {})
            if metric == "probe":
                target.update(block)
            else:
                target[metric] = block
        out.setdefault("actual", {})[metric] = actual.tolist()
    return out
