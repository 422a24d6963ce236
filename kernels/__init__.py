"""Triton kernels of sta, installed as ``sta.kernels``.

Importing this package never imports triton; ``sta.kernels.backend`` does, and registers the
``triton`` backend with :mod:`sta.backends` when triton is usable.

Modules: ``flow_step`` (the fused sparse flow step, forward and backward, registered as the
torch ops ``sta::triton_flow_step_fwd`` / ``sta::triton_flow_step_bwd``), ``backend`` (the
``triton`` backend over it). On a CPU-only machine the kernels run under the Triton interpreter
(``TRITON_INTERPRET=1``, set before triton is imported), for tests only.
"""
