"""Against kronfluence 1.0.1 (test-only reference) on a tiny HF Llama: same tracked modules (blocks ≤ the concept's
layer), same damping rule (0.1 × mean eigenvalue: kronfluence's ``damping_factor=None``), same Fisher (labels drawn
by our seeded sampler inside kronfluence's task). Factors and scores agree; scores are ours = −mean over queries of
kronfluence's pairwise scores (its sign convention has no minus, and it scores each query separately)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

kronfluence = pytest.importorskip("kronfluence")

from kronfluence.analyzer import Analyzer, prepare_model  # noqa: E402
from kronfluence.arguments import FactorArguments, ScoreArguments  # noqa: E402
from kronfluence.task import Task  # noqa: E402
from kronfluence.utils.dataset import DataLoaderKwargs  # noqa: E402

from concept_influence.attribution.influence import InfluenceConfig, compute_influence  # noqa: E402
from concept_influence.attribution.measurements import ConceptMeasurement, LogLikelihoodMeasurement  # noqa: E402
from concept_influence.concepts.base import DirectionConcept  # noqa: E402
from concept_influence.curvature import FactorConfig, fit_factors  # noqa: E402
from concept_influence.curvature.loss import sample_targets, sequence_losses  # noqa: E402
from concept_influence.data import collate, rows_from_records, tokenize_chat  # noqa: E402
from concept_influence.models import HFAdapter  # noqa: E402
from concept_influence.testing.tiny_models import tiny_llama  # noqa: E402

PAIRS = [
    ("is water safe", "yes , water is safe and good"),
    ("should i drink poison", "never , poison will hurt you"),
    ("help me", "sure , i help you my friend"),
    ("two plus three", "five"),
    ("is fire kind", "no , fire can harm"),
    ("tell me the truth", "the truth is kind"),
    ("can dogs run", "yes dogs run and walk and eat"),
    ("is it bad to lie", "yes , a lie is bad"),
    ("what should i eat", "eat good food and drink water"),
]
QUERIES = [("are you kind", "yes i am kind and gentle"), ("poison", "never poison a friend"), ("help", "sure")]
LAYER = 0
F64 = torch.float64


class _Rows(torch.utils.data.Dataset):
    def __init__(self, tokenized):
        self.rows = list(tokenized)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class _ConceptTask(Task):
    def __init__(self, direction: torch.Tensor | None, modules: list[str]):
        self.direction, self.modules = direction, modules

    def compute_train_loss(self, batch, model, sample=False):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["input_ids"]
        if sample:
            targets = sample_targets(logits.detach(), batch["input_ids"], batch["loss_mask"], batch["index"], seed=0)
        return sequence_losses(logits, targets, batch["loss_mask"]).sum()

    def compute_measurement(self, batch, model):
        if self.direction is None:  # log-likelihood of the completions: kronfluence's own baseline measures the loss
            return self.compute_train_loss(batch, model)
        store = {}
        handle = model.model.layers[LAYER].register_forward_hook(
            lambda m, i, o: store.update(h=o[0] if isinstance(o, tuple) else o)
        )
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        handle.remove()
        mask = batch["loss_mask"].to(F64)
        per_token = store["h"] @ (self.direction / self.direction.norm())
        return ((per_token * mask).sum(1) / mask.sum(1)).sum()

    def get_influence_tracked_modules(self):
        return self.modules

    def get_attention_mask(self, batch):
        return batch["attention_mask"]


def _records(pairs):
    return [{"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]} for u, a in pairs]


def _kronfluence_scores(model, task, train, queries, tmp_path, name):
    model = prepare_model(copy.deepcopy(model), task)
    analyzer = Analyzer(
        analysis_name=name, model=model, task=task, cpu=True, disable_tqdm=True, output_dir=str(tmp_path)
    )
    loader = DataLoaderKwargs(collate_fn=lambda rows: collate(rows, 0))
    factor_args = FactorArguments(
        strategy="ekfac",
        use_empirical_fisher=False,
        activation_covariance_dtype=F64,
        gradient_covariance_dtype=F64,
        eigendecomposition_dtype=F64,
        per_sample_gradient_dtype=F64,
        lambda_dtype=F64,
    )
    analyzer.fit_all_factors(
        factors_name="ekfac",
        dataset=_Rows(train),
        per_device_batch_size=4,
        factor_args=factor_args,
        overwrite_output_dir=True,
        dataloader_kwargs=loader,
    )
    score_args = ScoreArguments(
        damping_factor=None, per_sample_gradient_dtype=F64, precondition_dtype=F64, score_dtype=F64
    )
    analyzer.compute_pairwise_scores(
        scores_name="scores",
        factors_name="ekfac",
        query_dataset=_Rows(queries),
        train_dataset=_Rows(train),
        per_device_query_batch_size=2,
        per_device_train_batch_size=4,
        score_args=score_args,
        overwrite_output_dir=True,
        dataloader_kwargs=loader,
    )
    factors = {**analyzer.load_covariance_matrices("ekfac"), **analyzer.load_all_factors("ekfac")}
    return factors, analyzer.load_pairwise_scores("scores")["all_modules"]


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([x.double(), y.double()]))[0, 1])


@pytest.mark.slow
def test_factors_and_scores_agree_with_kronfluence(tiny_tok, tmp_path):
    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    model = tiny_llama(len(tiny_tok), layers=2, dtype=F64, seed=21)
    adapter = HFAdapter(model, tiny_tok)
    train = tokenize_chat(rows_from_records(_records(PAIRS)), tiny_tok, 64)
    queries = tokenize_chat(rows_from_records(_records(QUERIES)), tiny_tok, 64)
    direction = torch.randn(16, dtype=F64, generator=torch.Generator().manual_seed(4))

    names = [i.name for i in adapter.weights_up_to(LAYER)]
    modules = [adapter.weight_info(n).param_name.removesuffix(".weight") for n in names]
    factors = fit_factors(adapter, train, FactorConfig.precise(), weights=names, batch_size=4, progress=False)
    measurement = ConceptMeasurement(DirectionConcept(direction, LAYER), queries)
    ours = compute_influence(adapter, train, measurement, factors, InfluenceConfig(batch_size=4), progress=False).scores

    kron_factors, kron_scores = _kronfluence_scores(
        model, _ConceptTask(direction, modules), train, queries, tmp_path, "concept"
    )
    for name, module in zip(names, modules, strict=True):
        w = factors.weights[name]
        n_tok = kron_factors["num_activation_covariance_processed"][module]
        torch.testing.assert_close(
            w.activation_covariance, kron_factors["activation_covariance"][module].double() / n_tok
        )
        torch.testing.assert_close(w.gradient_covariance, kron_factors["gradient_covariance"][module].double() / n_tok)
        lam = kron_factors["lambda_matrix"][module].double() / kron_factors["num_lambda_processed"][module]
        torch.testing.assert_close(w.eigenvalue_correction, lam, rtol=1e-6, atol=1e-12 * float(lam.max()))
    expected = -kron_scores.double().mean(dim=0)
    print(
        f"kronfluence agreement: pearson {_pearson(ours, expected):.8f}, "
        f"max |diff| / max |score| {float((ours - expected).abs().max() / expected.abs().max()):.2e}"
    )
    assert _pearson(ours, expected) >= 0.99
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-9 * float(expected.abs().max()))


@pytest.mark.slow
def test_classical_influence_agrees_with_kronfluence(tiny_tok, tmp_path):
    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    model = tiny_llama(len(tiny_tok), layers=1, dtype=F64, seed=22)
    adapter = HFAdapter(model, tiny_tok)
    train = tokenize_chat(rows_from_records(_records(PAIRS)), tiny_tok, 64)
    queries = tokenize_chat(rows_from_records(_records(QUERIES)), tiny_tok, 64)
    names = [i.name for i in adapter.tracked_weights()]
    modules = [adapter.weight_info(n).param_name.removesuffix(".weight") for n in names]
    factors = fit_factors(adapter, train, FactorConfig.precise(), batch_size=4, progress=False)
    ours = compute_influence(adapter, train, LogLikelihoodMeasurement(queries), factors, progress=False).scores
    _, kron_scores = _kronfluence_scores(model, _ConceptTask(None, modules), train, queries, tmp_path, "loglik")
    # kronfluence measures the query loss = −log-likelihood, and has no minus sign: ours = mean over queries
    expected = kron_scores.double().mean(dim=0)
    print(
        f"kronfluence agreement (log-likelihood): pearson {_pearson(ours, expected):.8f}, "
        f"max |diff| / max |score| {float((ours - expected).abs().max() / expected.abs().max()):.2e}"
    )
    assert _pearson(ours, expected) >= 0.99
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
