"""`MiniCPM4ForCausalLM.forward(labels_BT=...)`: the training losses without logits, packed
documents that cannot see each other, the MTP head's loss, and named errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minicpm4.model import mtp as mtp_mod
from minicpm4.model.transformer import MiniCPM4ForCausalLM
from tests.conftest import tiny_config


def _model(**cfg) -> MiniCPM4ForCausalLM:
    model = MiniCPM4ForCausalLM(tiny_config(**cfg))
    model.init_weights(seed=0)
    return model.eval()


def _ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 512, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_labels_give_the_summed_cross_entropy_of_the_logits() -> None:
    model = _model()
    ids = _ids(2, 20)
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    sums = model(ids, labels_BT=labels)
    expect = F.cross_entropy(model(ids).flatten(0, 1), labels.flatten(), reduction="sum")
    assert sums.mtp is None
    torch.testing.assert_close(sums.ntp, expect, rtol=1e-5, atol=1e-4)


@torch.no_grad()
def test_packed_documents_equal_the_documents_run_alone() -> None:
    """A window holding doc A (7 tokens) then doc B (9 tokens), positions restarting at B,
    gives each token the hidden state it has when its document runs alone."""
    model = _model()
    a, b = _ids(1, 7, 1), _ids(1, 9, 2)
    packed = torch.cat([a, b], 1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 9])
    positions = torch.tensor([list(range(7)) + list(range(9))])
    got = model(packed, positions_BT=positions, doc_ids_BT=doc_ids)
    torch.testing.assert_close(got[:, :7], model(a), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[:, 7:], model(b), rtol=1e-5, atol=1e-5)
    leaky = model(packed, positions_BT=positions)  # without doc ids B sees A
    assert (leaky[:, 7:] - model(b)).abs().max() > 1e-3


@torch.no_grad()
def test_mtp_labels_give_the_mtp_loss_of_forward_with_mtp() -> None:
    model = _model(num_mtp_layers=1)
    ids = _ids(2, 16, 3)
    labels = ids[:, 1:]
    inputs = ids[:, :-1]
    mtp_labels = labels[:, 1:].clone()
    mtp_labels[:, -1] = -100
    sums = model(inputs, labels_BT=labels, mtp_labels_BT=mtp_labels)
    logits, mtp_logits = model.forward_with_mtp(inputs)
    n_mtp = int((mtp_labels != -100).sum())
    torch.testing.assert_close(sums.mtp / n_mtp, mtp_mod.mtp_loss(mtp_logits, inputs),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums.ntp / labels.numel(), F.cross_entropy(
        logits.flatten(0, 1), labels.flatten()), rtol=1e-5, atol=1e-5)


def test_bad_training_inputs_are_named_errors() -> None:
    model, ids = _model(), _ids(2, 8)
    with pytest.raises(ValueError, match="labels shape"):
        model(ids, labels_BT=ids[:, :4])
    with pytest.raises(ValueError, match="doc_ids shape"):
        model(ids, doc_ids_BT=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="mtp_labels_BT needs labels_BT"):
        model(ids, mtp_labels_BT=ids[:, 1:])
    with pytest.raises(ValueError, match="no MTP head"):
        model(ids, labels_BT=ids, mtp_labels_BT=ids[:, 1:])
    with pytest.raises(ValueError, match="mtp_labels must be"):
        _model(num_mtp_layers=1)(ids, labels_BT=ids, mtp_labels_BT=ids)
