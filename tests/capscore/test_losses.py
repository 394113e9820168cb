"""Margin and reconstruction losses on hand-computed cases."""

import pytest
import torch

from capscore import margin_loss, reconstruction_loss
from capscore.losses import capsnet_loss


def test_margin_loss_hand_computed():
    lengths = torch.tensor([[0.95, 0.3, 0.05], [0.5, 0.05, 0.2]])
    targets = torch.tensor([0, 1])
    # example 0: present 0.95 >= 0.9 -> 0; absent 0.3 -> 0.5*0.2^2 = 0.02; absent 0.05 -> 0
    # example 1: present 0.05 -> 0.85^2 = 0.7225; absent 0.5 -> 0.5*0.16 = 0.08; 0.2 -> 0.5*0.01
    expected = (0.02 + (0.7225 + 0.08 + 0.005)) / 2
    torch.testing.assert_close(margin_loss(lengths, targets), torch.tensor(expected))


def test_margin_loss_multi_hot_equals_sum_of_terms():
    lengths = torch.tensor([[0.8, 0.7, 0.15]])
    multi = torch.tensor([[1.0, 1.0, 0.0]])
    expected = 0.1**2 + 0.2**2 + 0.5 * 0.05**2
    torch.testing.assert_close(margin_loss(lengths, multi), torch.tensor(expected))


def test_margin_loss_custom_margins_and_zero_when_perfect():
    lengths = torch.tensor([[1.0, 0.0]])
    assert margin_loss(lengths, torch.tensor([0])) == 0
    torch.testing.assert_close(
        margin_loss(torch.tensor([[0.5, 0.5]]), torch.tensor([0]), m_pos=0.8, m_neg=0.2, lam=1.0),
        torch.tensor(0.3**2 + 0.3**2),
    )


def test_margin_loss_rejects_wrong_multi_hot_width():
    with pytest.raises(ValueError, match="classes"):
        margin_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_reconstruction_loss_is_scaled_per_image_sum():
    recon = torch.zeros(2, 1, 2, 2)
    images = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])
    # per-image SSE: 2 and 4 -> mean 3 -> * 0.0005
    torch.testing.assert_close(reconstruction_loss(recon, images), torch.tensor(0.0015))
    torch.testing.assert_close(reconstruction_loss(recon, images, weight=1.0), torch.tensor(3.0))


def test_capsnet_loss_total_is_sum_of_parts():
    lengths = torch.rand(4, 10)
    recon, images = torch.rand(4, 1, 5, 5), torch.rand(4, 1, 5, 5)
    loss = capsnet_loss(lengths, recon, images, torch.tensor([1, 2, 3, 4]))
    assert set(loss.parts) == {"margin", "reconstruction"}
    torch.testing.assert_close(loss.total, loss.margin + loss.reconstruction)
