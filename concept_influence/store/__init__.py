"""The gradient store: projected per-row gradients in memory-mapped shards, answered by blocked products or FAISS."""

from concept_influence.store.projection import Projector, eigen_projector, logra_projector
from concept_influence.store.search import build_faiss_index, exact_top_k, faiss_search
from concept_influence.store.store import (
    DEFAULT_KIND,
    DEFAULT_RANK,
    GradientStore,
    StoreConfig,
    StoreMismatchError,
    build_store,
    factors_fingerprint,
    make_projector,
    projection_fingerprint,
    write_shard,
)

__all__ = [
    "DEFAULT_KIND",
    "DEFAULT_RANK",
    "GradientStore",
    "Projector",
    "StoreConfig",
    "StoreMismatchError",
    "build_faiss_index",
    "build_store",
    "eigen_projector",
    "exact_top_k",
    "factors_fingerprint",
    "faiss_search",
    "logra_projector",
    "make_projector",
    "projection_fingerprint",
    "write_shard",
]
