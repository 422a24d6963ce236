"""One way to give an op to the torch op library: the triad schema, fake kernel, autograd formula.

Every ``torch.ops.sta.*`` op is registered through :func:`register_torch_op`, whether its kernel is
C++/CUDA (the schema comes from ``TORCH_LIBRARY`` in csrc/, :mod:`sta.backends.compiled` adds the
rest once the extension is loaded) or Triton (the schema is inferred from the Python
implementation's annotations, :mod:`sta.kernels.flow_step`, :mod:`sta.kernels.grid_transport`).
With the triad in place ``torch.compile(fullgraph=True)`` traces through the op as one node,
``torch.library.opcheck`` can check it, and autograd calls its backward op.

An op made of other registered ops (``sta::flow_path``: T flow steps) is registered with
:func:`register_composite_op` instead: its fake kernel and autograd formula are those of the ops it
calls (``CompositeImplicitAutograd``), so they cannot disagree with them.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["register_torch_op", "register_composite_op"]


def register_torch_op(qualname: str, fake: Callable, impl: Optional[Callable] = None,
                      backward: Optional[Callable] = None, setup_context: Optional[Callable] = None):
    """Register op ``qualname`` (``"sta::name"``) with the torch op library; returns ``torch.ops.sta.name``.

    impl: the implementation of an op defined in Python (its schema is inferred from the type
        annotations, no input is mutated); None for an op whose schema and kernels come from C++.
    fake: the fake (meta) kernel: output shapes and dtypes from the inputs' (no data is read).
    backward, setup_context: the autograd formula (``torch.library.register_autograd``); None for
        an op that is not differentiable or is the backward of another op.
    """
    namespace, _, name = qualname.partition("::")
    if not name:
        raise ValueError(f"qualname: expected 'namespace::name', got {qualname!r}")
    if impl is not None:
        torch.library.custom_op(qualname, impl, mutates_args=())
    torch.library.register_fake(qualname, fake)
    if backward is not None:
        torch.library.register_autograd(qualname, backward, setup_context=setup_context)
    return getattr(getattr(torch.ops, namespace), name)


def register_composite_op(qualname: str, schema: str, impl: Callable):
    """Register op ``qualname`` (``"sta::name"``) with ``schema`` (``"name(Tensor x, ...) -> ..."``)
    and the Python implementation ``impl`` as its ``CompositeImplicitAutograd`` kernel: ``impl``
    calls other ops, and autograd, fake tensors, ``torch.compile`` and ``opcheck`` see through it to
    them. Returns ``torch.ops.sta.name``."""
    namespace, _, name = qualname.partition("::")
    if not name or not schema.startswith(name + "("):
        raise ValueError(f"qualname, schema: expected 'namespace::name' and 'name(...) -> ...', "
                         f"got {qualname!r}, {schema[:40]!r}")
    torch.library.define(qualname, schema[len(name):])
    torch.library.impl(qualname, "CompositeImplicitAutograd")(impl)
    return getattr(getattr(torch.ops, namespace), name)
