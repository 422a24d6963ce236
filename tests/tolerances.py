"""The one place where test tolerances live.

Comparisons are relative to the scale of the expected tensor (its largest magnitude), because
the outputs are sums whose individual entries can cancel to near zero:

    max |actual - expected| <= rtol * max|expected| + atol_floor

fp32 parity of every backend with the reference is 1e-5 relative (docs/ops.md section 2), forward and
backward. The reference matches the float64 torch.func oracle to 1e-10. Low precision follows the
flash-attention rule: a kernel's error against the float64 reference may be at most
LOW_PRECISION_FACTOR times that of the PyTorch reference run in the same dtype, plus a floor.
"""
from __future__ import annotations

import torch

#: dtype -> (rtol relative to max|expected|, absolute floor)
PARITY = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-7),
    torch.bfloat16: (2e-2, 1e-3),
    torch.float16: (2e-3, 1e-4),
}
#: reference vs the torch.func oracle, float64
ORACLE = (1e-10, 1e-12)
#: symmetry / trace identities, float64
IDENTITY_ATOL = 1e-12
#: Triton "tf32" products, emulated on the CPU (operands rounded to 10 mantissa bits, unit
#: roundoff 2^-11 = 4.9e-4 per operand) vs the float64 reference, small shapes (H <= 19)
TF32 = (5e-3, 1e-5)
#: flash-attention rule for bf16/fp16
LOW_PRECISION_FACTOR = 2.0
LOW_PRECISION_FLOOR = {torch.bfloat16: 1e-3, torch.float16: 1e-4}
#: the same tiny training run (a few dozen Adam steps, fp32) on two backends, or resumed vs
#: uninterrupted: loss curves and final parameters. Measured (tiny preset, 30 steps): torch, cpu
#: and triton losses agree to all 7 printed digits; 1e-4 leaves room for growth over more steps.
TRAINING = (1e-4, 1e-6)


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (in float64); 0/0 counts as 0."""
    a, e = actual.detach().double(), expected.detach().double()
    if e.numel() == 0:
        return 0.0
    scale = e.abs().max().item()
    err = (a - e).abs().max().item()
    return err / scale if scale > 0 else err


def assert_close(actual, expected, dtype=None, tol=None, what: str = "") -> None:
    """Assert ``actual`` matches ``expected`` within the tolerance of ``dtype`` (or ``tol``)."""
    if expected is None or actual is None:
        assert actual is None and expected is None, f"{what}: one side is None ({actual is None}, {expected is None})"
        return
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    rtol, floor = tol if tol is not None else PARITY[dtype or expected.dtype]
    a, e = actual.detach().double(), expected.detach().double()
    if e.numel() == 0:
        return
    assert torch.isfinite(a).all(), f"{what}: non-finite values in actual"
    bound = rtol * e.abs().max().item() + floor
    err = (a - e).abs().max().item()
    assert err <= bound, f"{what}: max abs error {err:.3e} > {bound:.3e} (rtol {rtol:g}, floor {floor:g})"


def assert_low_precision(kernel_out, reference_lowp_out, reference_fp64_out, dtype, what: str = "") -> None:
    """flash-attention rule: err(kernel) <= FACTOR * err(reference in dtype) + floor, both vs fp64."""
    e = reference_fp64_out.detach().double()
    err_kernel = (kernel_out.detach().double() - e).abs().max().item()
    err_ref = (reference_lowp_out.detach().double() - e).abs().max().item()
    bound = LOW_PRECISION_FACTOR * err_ref + LOW_PRECISION_FLOOR[dtype]
    assert err_kernel <= bound, f"{what}: {dtype} error {err_kernel:.3e} > {bound:.3e} (reference {err_ref:.3e})"


def assert_same_nonfinite(actual, expected, dtype=None, tol=None, what: str = "") -> None:
    """Same NaN and +-Inf positions (the non-finite policy: backends propagate like the reference),
    and the finite entries within the tolerance of ``dtype`` (or ``tol``)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach(), expected.detach()
    for name, test in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        assert torch.equal(test(a), test(e)), f"{what}: {name} at different positions"
    finite = torch.isfinite(e)
    assert_close(a[finite], e[finite], dtype or expected.dtype, tol=tol, what=what)
