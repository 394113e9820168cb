"""GPU tier: the model on CUDA, in fp32 and under bf16 autocast. Skipped without CUDA."""

import pytest
import torch

from capscore import CapsNet, CapsNetConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_cuda_matches_cpu_and_bf16_is_close():
    torch.manual_seed(0)
    model = CapsNet(CapsNetConfig.mnist())
    images, labels = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    cpu = model(images, labels)
    model = model.cuda()
    gpu = model(images.cuda(), labels.cuda())
    torch.testing.assert_close(gpu.lengths.cpu(), cpu.lengths, rtol=1e-3, atol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        half = model(images.cuda(), labels.cuda())
        loss = model.loss(half, images.cuda(), labels.cuda())
    loss.total.backward()
    torch.testing.assert_close(half.lengths.float().cpu(), cpu.lengths, rtol=5e-2, atol=2e-2)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
