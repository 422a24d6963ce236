"""Every backend against the reference: one matrix, backend x op x dtype x construction x case.

The matrix is built by tests/parity.py from the registry (every backend but ``torch``, with the
float dtypes it declares), :data:`parity.OPS`, :data:`parity.CONSTRUCTIONS` and
:data:`parity.CASES` (all-off / mixed / all-on coefficients, B = 0, odd D, no potential or no
rotational field). A backend that cannot run here is skipped with the registry's reasons; the
``cuda`` one is marked ``gpu``. Per-backend tests (opcheck, torch.compile, tiles, availability) stay
in tests/test_backend_<name>.py.
"""
import pytest
import torch

from sta import backends
from tests import parity

MATRIX = parity.matrix()


@pytest.mark.parametrize("backend,op,dtype,construction,case", MATRIX)
def test_parity(backend, op, dtype, construction, case, one_thread):
    """Every output and the gradient w.r.t. every input and field parameter; a zero coefficient
    gets exactly zero gradient (it is not evaluated); with all coefficients off nothing moves."""
    res = parity.check_parity(backend, op, dtype, construction, case)
    for name, x, grad in zip(res.inputs.names(), res.inputs.differentiable(), res.grads):
        if name.startswith("g_"):
            assert (grad[x == 0] == 0).all(), f"grad {name} at a zero coefficient"
    if parity.CASES[case].pattern == "off":
        z = next(iter(res.inputs.leaves.values()))
        B, D = z.shape
        assert torch.equal(res.got.z.view(B, -1, D), z.detach().view(B, 1, D).expand(B, res.got.z.numel() // (B * D), D))
        for name in res.got._fields[1:]:
            out = getattr(res.got, name)
            assert out is None or not out.any(), f"{name} with every coefficient off"
        for name, grad in zip(res.inputs.names()[1:], res.grads[1:]):
            assert not grad.any(), f"grad {name} with every coefficient off"


def test_matrix_covers_every_backend_and_op():
    """A registered backend or op cannot escape the matrix: each op has an entry (or a named home)."""
    for op in backends.op_names():
        assert op in parity.OPS or op in parity.OPS_ELSEWHERE, f"{op}: add it to tests/parity.py OPS"
    ids = [p.id for p in MATRIX]
    for name in parity.fast_backends():
        for op in parity.OPS:
            assert any(i.startswith(f"{name}-{op}-") for i in ids), (name, op)
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("backend,dtype", [parity.backend_param(name, dtype) for name in parity.fast_backends()
                                           for dtype in (parity.F32, parity.F64)
                                           if dtype in backends.get_backend(name).dtypes])
@pytest.mark.parametrize("kind", ["potential", "hamiltonian", "mlp"])
def test_terms_non_contiguous(backend, dtype, kind, one_thread):
    """Strided and transposed z and g, non-contiguous parameters, and grad outputs that reach the
    backward transposed or expanded (stride 0)."""
    device = parity.device_for(backend)
    parity.require(backend, "flow_step", dtype, device)
    B, D, H, K = 11, 6, 5, 3
    with torch.device(device):
        z = torch.randn(D, 2 * B, dtype=dtype)[:, ::2].t().requires_grad_()  # (B, D), strides (1, 2B)
        g = parity.coefficients((K, 2 * B), "mixed", dtype, signed=True)[:, ::2].t().requires_grad_()
        assert not z.is_contiguous() and not g.is_contiguous()
        p = parity.term_params(kind, K, H, D, dtype)
        p = type(p)(*[None if x is None else x.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()
                      for x in p])
        grad_outputs = {"velocity": torch.randn(D, B, dtype=dtype).t(),
                        "div": torch.randn(1, dtype=dtype).expand(B)}
        grad_outputs.update({n: torch.randn(K, B, dtype=dtype).t() for n in ("hj", "u", "div_rot", "curl")})
    parity.check_terms(backend, kind, z, g, p, parity.TERMS_WANT[kind], dtype, grad_outputs)
