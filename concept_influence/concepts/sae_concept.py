"""The SAE-feature concept: the readout is a sae-lens SAE's feature activation ``sae.encode(acts)[..., j]``.

sae-lens's ``encode`` subtracts ``b_dec`` (and applies any input normalisation) before the encoder, so the readout
is *not* ``acts @ W_enc[:, j]``: always go through ``sae.encode``. Training SAEs and picking features is in
``concepts.sae`` (which re-exports this class); saving and loading in ``concepts.io``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from concept_influence.concepts.base import Concept, Reduction, check_reduction

if TYPE_CHECKING:
    from sae_lens import SAE


class SAEFeatureConcept(Concept):
    """Feature ``feature`` of a sae-lens SAE read at ``resid.{layer}``:
    ``token_readout = sae.encode(acts)[..., feature]``.

    Sign: the feature activation is ``>= 0`` for ReLU SAEs; higher means more of the concept. The SAE is frozen
    (``requires_grad_(False)``, eval mode) so that backward passes through the readout reach only the model.
    ``model_fingerprint``/``metrics``/``extra``: provenance carried to and from disk by
    ``save_concept``/``load_concept``; ``reduction``: the default sequence reduction of ``readout``.
    """

    def __init__(
        self,
        sae: SAE,
        feature: int,
        layer: int,
        *,
        model_fingerprint: str | None = None,
        metrics: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        reduction: Reduction = "mean",
    ) -> None:
        from sae_lens import SAE

        if not isinstance(sae, SAE):
            raise TypeError(f"SAEFeatureConcept needs a sae_lens SAE, got {type(sae).__name__}")
        if getattr(sae.cfg, "reshape_activations", "none") != "none":
            raise ValueError(
                f"SAE reshapes its input ({sae.cfg.reshape_activations!r}); residual-stream concepts need "
                "an SAE on [..., d_model] activations"
            )
        if isinstance(feature, bool) or not isinstance(feature, int):
            raise TypeError(f"feature must be an int, got {type(feature).__name__}")
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer must be an int, got {type(layer).__name__}")
        d_sae = int(sae.cfg.d_sae)
        if not 0 <= feature < d_sae:
            raise ValueError(f"feature index {feature} out of range: this SAE has {d_sae} features (0..{d_sae - 1})")
        self.sae = sae.requires_grad_(False).eval()
        self.feature = feature
        self.layer = layer
        self.d_model = int(sae.cfg.d_in)
        self.d_sae = d_sae
        self.model_fingerprint = model_fingerprint
        self.metrics = dict(metrics or {})
        self.extra = dict(extra or {})
        self.reduction = check_reduction(reduction)  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"SAEFeatureConcept(feature={self.feature}, layer={self.layer}, d_model={self.d_model}, d_sae={self.d_sae})"
        )

    def token_readout(self, acts: torch.Tensor) -> torch.Tensor:
        """``acts [batch, seq, d_model]`` -> ``[batch, seq]``, differentiable w.r.t. ``acts``; computed in the SAE's
        dtype and device, returned in ``acts``' dtype and device."""
        if acts.shape[-1] != self.d_model:
            raise ValueError(
                f"SAE concept has d_in {self.d_model} but activations have last dim {acts.shape[-1]} "
                f"(shape {tuple(acts.shape)}); was the SAE trained on another model or site?"
            )
        weight = self.sae.W_enc
        features = self.sae.encode(acts.to(device=weight.device, dtype=weight.dtype))
        return features[..., self.feature].to(device=acts.device, dtype=acts.dtype)

    @property
    def encoder_direction(self) -> torch.Tensor:
        """``W_enc[:, feature]`` ``[d_model]`` (what the feature reads, *after* ``b_dec`` is subtracted)."""
        return self.sae.W_enc[:, self.feature].detach()

    @property
    def decoder_direction(self) -> torch.Tensor:
        """``W_dec[feature]`` ``[d_model]`` (what the feature writes back into the reconstruction)."""
        return self.sae.W_dec[self.feature].detach()
