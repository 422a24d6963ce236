"""The shared conv networks (sta/models/networks.py) compute in channels-last layout: the same
weights for a seed as an NCHW build, the same outputs and gradients as the NCHW computation."""
import pytest
import torch

from sta.models import networks
from sta.models.networks import ConvDecoder, ConvEncoder


def _build(cls, args, memory_format, monkeypatch):
    monkeypatch.setattr(networks, "MEMORY_FORMAT", memory_format)
    torch.manual_seed(0)
    return cls(*args)


@pytest.mark.parametrize("cls,args,shape", [
    (ConvEncoder, (3, 10, 28, 8, 32), (5, 3, 28, 28)),
    (ConvDecoder, (6, 3, 28, 8, 32), (5, 6)),
    (ConvEncoder, (2, 4, 9, 4, 16), (3, 2, 9, 9)),  # odd image size
])
def test_channels_last_matches_nchw(cls, args, shape, monkeypatch, one_thread):
    fast = _build(cls, args, torch.channels_last, monkeypatch)
    plain = _build(cls, args, torch.contiguous_format, monkeypatch)
    convs = [m for m in fast.conv if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
        assert torch.equal(a, b), f"{name}: the layout changed the initial weights"
    x = torch.randn(shape)
    out_fast, out_plain = fast(x), plain(x)
    torch.testing.assert_close(out_fast, out_plain, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(out_plain)
    (out_fast * weights).sum().backward()
    (out_plain * weights).sum().backward()
    for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad {name}: {m}")


def test_layout_survives_a_device_move_and_a_state_dict_round_trip():
    torch.manual_seed(0)
    encoder = ConvEncoder(3, 10, 28, 8, 32).to(torch.float64).to("cpu")
    clone = ConvEncoder(3, 10, 28, 8, 32).to(torch.float64)
    clone.load_state_dict(encoder.state_dict())
    for net in (encoder, clone):
        assert net.conv[0].weight.is_contiguous(memory_format=torch.channels_last)
