"""The registry of model kinds: ``config.model`` names a class (``"sta"`` -> :class:`sta.models.sta.STA`).

A kind registers itself with the :func:`register` class decorator when its module is imported;
``sta.models`` imports every built-in kind, so ``ModelConfig(model=NAME)`` and ``STAModel(config)``
see them all (and so do saved runs, whose config.json holds ``"model": NAME``).
"""
from __future__ import annotations

__all__ = ["KINDS", "register", "kind_class"]

#: name -> model class, in registration order (the order of ``sta.models.MODELS``).
KINDS: dict = {}


def register(cls):
    """Class decorator: make ``cls`` the model built for ``config.model == cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__}: a model kind needs a non-empty class attribute `name`")
    if name in KINDS and KINDS[name] is not cls:
        raise ValueError(f"model kind {name!r} is already registered ({KINDS[name].__name__})")
    KINDS[name] = cls
    return cls


def kind_class(name: str):
    """The class registered for ``name`` (ValueError listing the known kinds otherwise)."""
    try:
        return KINDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"model: expected one of {tuple(KINDS)}, got {name!r}") from None
