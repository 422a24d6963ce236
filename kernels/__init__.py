"""Triton kernels of sta, installed as ``sta.kernels``.

Importing this package never imports triton; ``sta.kernels.backend`` does, and registers the
``triton`` backend with :mod:`sta.backends` when triton is usable.
"""
