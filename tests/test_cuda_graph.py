"""A whole training step (ELBO forward + backward + Adam) captured in a CUDA graph replays to the eager result.

This is what ``elbo`` having no host synchronisation (tests/test_model_sync.py) buys on a GPU. The
flow runs on backend ``torch`` here: the ``cuda`` and ``triton`` backends count the active pairs of
a step on the host to size their launches (a device-to-host copy), which a CUDA graph cannot hold.
Needs a CUDA GPU; not run on the CPU-only machines of this project so far.
"""
import copy

import pytest
import torch

from sta.model import ModelConfig, STAModel

pytestmark = pytest.mark.gpu


def _step(model, optimizer, x):
    terms = model.elbo(x, temperature=0.5, slab=True, kl_weight=1.0)
    terms.loss.backward()
    optimizer.step()
    return terms.loss.detach()


def test_training_step_replays_in_a_cuda_graph():
    torch.manual_seed(0)
    config = ModelConfig(latent=8, num_fields=3, hidden=16, conv=8, transitions=3, image_size=16, backend="torch")
    device = torch.device("cuda")
    graphed = STAModel(config).to(device)
    eager = copy.deepcopy(graphed)
    x = torch.rand(4, 4, 3, 16, 16, device=device)
    # capturable Adam keeps its step counter on the device; grads are zeroed in place (not set to None)
    opt_graphed = torch.optim.Adam(graphed.parameters(), lr=1e-3, capturable=True)
    opt_eager = torch.optim.Adam(eager.parameters(), lr=1e-3, capturable=True)
    for p in graphed.parameters():
        p.grad = torch.zeros_like(p)
    for p in eager.parameters():
        p.grad = torch.zeros_like(p)

    # warm-up on a side stream (allocator and lazy state), as torch.cuda.graphs requires
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for model, optimizer in ((graphed, opt_graphed), (eager, opt_eager)):
            torch.cuda.manual_seed(1)
            optimizer.zero_grad(set_to_none=False)
            _step(model, optimizer, x)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    opt_graphed.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        static_loss = _step(graphed, opt_graphed, x)
    # the capture ran no kernel: undo nothing, replay from the warmed-up state, compare with eager
    for i in range(3):
        torch.cuda.manual_seed(100 + i)  # the replay reads the generator's seed and offset, as eager does
        opt_graphed.zero_grad(set_to_none=False)
        graph.replay()
        torch.cuda.manual_seed(100 + i)
        opt_eager.zero_grad(set_to_none=False)
        eager_loss = _step(eager, opt_eager, x)
        torch.cuda.synchronize()
        assert torch.isfinite(static_loss)
        torch.testing.assert_close(static_loss, eager_loss, rtol=1e-4, atol=1e-3)
        for (name, p), q in zip(graphed.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} after replay {i}: {m}")
