"""CKDSNN's training objective (snnkd_fast/methods/nld.py): CE + SAMD + NLD as the released code
composes them, the KD-weight schedule, and CE alone in evaluation."""
import pytest
import torch
import torch.nn.functional as F

from snnkd_fast.losses import nld_loss
from snnkd_fast.methods import CKDSNNObjective, samd_loss

from tolerances import assert_value_close

T, B, K, CH = 3, 4, 10, 6


def make_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        student_logits=torch.randn(T, B, K, generator=g).requires_grad_(),
        labels=torch.randint(0, K, (B,), generator=g),
        teacher_logits=torch.randn(B, K, generator=g),
        student_features=(torch.rand(T, B, CH, 4, 4, generator=g) < 0.4).float().requires_grad_(),
        teacher_features=torch.randn(B, 7, 4, 4, generator=g),
        classifier_weight=torch.randn(K, 7, generator=g),
    )


def expected_terms(batch, nld_seed):
    ce = F.cross_entropy(batch["student_logits"].mean(0), batch["labels"])
    samd = samd_loss(batch["student_features"], batch["teacher_features"], batch["classifier_weight"],
                     teacher_logits=batch["teacher_logits"], temperature=2.0)
    nld = nld_loss(batch["student_logits"], batch["teacher_logits"], temperature=2.0, noise_weight=0.1,
                   generator=torch.Generator().manual_seed(nld_seed))
    return ce, samd, nld


def test_released_code_composition():
    batch = make_batch()
    objective = CKDSNNObjective(generator=torch.Generator().manual_seed(42))
    loss, terms = objective(**batch, return_terms=True)
    ce, samd, nld = expected_terms(batch, 42)
    assert_value_close(loss, ce + samd + nld, torch.float32, "CE + SAMD + NLD, weights 1")
    assert_value_close(terms["nld"], nld, torch.float32, "nld term (same seed drawn from the same generator)")
    assert_value_close(terms["samd"], samd, torch.float32, "samd term")
    loss.backward()
    assert batch["student_logits"].grad.abs().sum() > 0
    assert batch["student_features"].grad.abs().sum() > 0


def test_weights_and_optional_samd():
    batch = make_batch(1)
    objective = CKDSNNObjective(ce_weight=0.5, samd_weight=0.0, nld_weight=2.0,
                                generator=torch.Generator().manual_seed(3))
    loss = objective(batch["student_logits"], batch["labels"], batch["teacher_logits"])  # no features needed
    ce, _, nld = expected_terms(batch, 3)
    assert_value_close(loss, 0.5 * ce + 2.0 * nld, torch.float32, "weighted")
    with pytest.raises(ValueError, match="student_features"):
        CKDSNNObjective()(batch["student_logits"], batch["labels"], batch["teacher_logits"])
    with pytest.raises(ValueError, match="teacher_logits"):
        CKDSNNObjective(samd_weight=0.0)(batch["student_logits"], batch["labels"])


def test_evaluation_is_ce_alone():
    batch = make_batch(2)
    objective = CKDSNNObjective().eval()
    ce = F.cross_entropy(batch["student_logits"].mean(0), batch["labels"])
    assert_value_close(objective(batch["student_logits"], batch["labels"]), ce, torch.float32, "eval = CE")
    assert_value_close(objective(**batch), ce, torch.float32, "eval ignores the teacher")
    assert_value_close(CKDSNNObjective.evaluation_loss(batch["student_logits"], batch["labels"]), ce,
                       torch.float32, "static")


@pytest.mark.parametrize("epoch,factor", [(0, 0.0), (1, 0.25), (2.5, 0.625), (4, 1.0), (9, 1.0)])
def test_linear_warmup(epoch, factor):
    batch = make_batch(4)
    objective = CKDSNNObjective(schedule="linear_warmup", warmup_epochs=4, generator=torch.Generator().manual_seed(5))
    objective.set_epoch(epoch)
    assert objective.kd_factor() == factor
    loss, terms = objective(**batch, return_terms=True)
    ce, samd, nld = expected_terms(batch, 5)
    assert terms["factor"] == factor
    assert_value_close(loss, ce + factor * (samd + nld), torch.float32, f"epoch {epoch}")


def test_constant_schedule_and_validation():
    objective = CKDSNNObjective()
    objective.set_epoch(0)
    assert objective.kd_factor() == 1.0
    with pytest.raises(ValueError, match="schedule"):
        CKDSNNObjective(schedule="cosine")
    with pytest.raises(ValueError, match="samd_weight"):
        CKDSNNObjective(samd_weight=-1.0)
    with pytest.raises(ValueError, match="epoch"):
        objective.set_epoch(-1)
