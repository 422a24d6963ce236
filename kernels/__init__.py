"""Triton kernels of sta, installed as ``sta.kernels``.

Importing this package never imports triton; ``sta.kernels.backend`` does, and registers the
``triton`` backend with :mod:`sta.backends` when triton is usable.

Modules: ``flow_step`` (the fused sparse flow step, forward and backward, registered as the
torch ops ``sta::triton_flow_step_fwd`` / ``sta::triton_flow_step_bwd``), ``grid_transport``
(one finite-volume step), ``backend`` (the ``triton`` backend over them), ``launch`` (the one
launch point: records launches, forces a tile config), ``aot`` (``python -m sta.kernels.aot``:
compiles every kernel for sm_80 / sm_90 without a GPU and reports registers, spills and shared
memory). On a CPU-only machine the kernels run under the Triton interpreter
(``TRITON_INTERPRET=1``, set before triton is imported), for tests only.
"""
