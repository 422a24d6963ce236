"""Triton kernels of sta, installed as ``sta.kernels``.

Importing this package never imports triton; the kernel modules do. The ``triton`` backend over
them (for every op) is :mod:`sta.backends.triton`, registered with :mod:`sta.backends` when triton
is usable.

Modules: ``flow_step`` (the fused sparse flow step: launchers, the torch ops
``sta::triton_flow_step_fwd`` / ``sta::triton_flow_step_bwd``, ``triton_flow_step``), with
``flow_step_kernels`` (its ``@triton.jit`` kernels), ``configs`` (tiles, precisions, the AOT spill
table; :func:`~sta.kernels.configs.interpreting` is the one reading of ``TRITON_INTERPRET``) and
``routing`` (active pairs sorted by field); ``grid_transport`` (one finite-volume step); ``launch``
(the one launch point: records launches, forces a tile config); ``aot`` (``python -m
sta.kernels.aot``: compiles every kernel for sm_80 / sm_90 without a GPU and reports registers,
spills and shared memory). On a CPU-only machine the kernels run under the Triton interpreter
(``TRITON_INTERPRET=1``, set before triton is imported), for tests only.
"""
