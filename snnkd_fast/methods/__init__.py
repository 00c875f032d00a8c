"""Distillation methods built on snnkd_fast's neurons and fused losses.

* :mod:`.samd` -- CKDSNN's saliency-scaled activation-map distillation (SAMD) [code: SinoLeu/CKDSNN].
* :mod:`.nld` -- CKDSNN's training objective CE + SAMD + NLD [code; weight schedule ours].
* :mod:`.stars` -- STARS data-free ANN -> SNN KD: BN matching, relational consistency alignment,
  tail-aware regularization, a BN-guided synthesizer [abstract; formulas ours].
* :mod:`.hybrid` -- hybrid block-wise replacement distillation [Fig. 1 caption; the rest ours].

Definitions and their sources: the project's method specification (shared/methods.md).
"""
from ._util import reset_neurons
from .hybrid import HybridDistiller, HybridOutputs, TimeDistributed, direct_encoding, make_align_module
from .nld import CKDSNNObjective
from .samd import SAMDLoss, samd_loss, samd_loss_reference
from .stars import (BNRecord, BNStatisticsHook, SmallGenerator, Synthesizer, bn_matching_loss, gaussian_tail_mass,
                    relational_consistency_loss, relational_gram, soft_tail_exceedance, tail_aware_regularization,
                    train_student_step)

__all__ = [
    "samd_loss", "samd_loss_reference", "SAMDLoss",
    "CKDSNNObjective",
    "BNRecord", "BNStatisticsHook", "bn_matching_loss", "relational_gram", "relational_consistency_loss",
    "gaussian_tail_mass", "soft_tail_exceedance", "tail_aware_regularization", "SmallGenerator", "Synthesizer",
    "train_student_step",
    "HybridDistiller", "HybridOutputs", "TimeDistributed", "direct_encoding", "make_align_module",
    "reset_neurons",
]
