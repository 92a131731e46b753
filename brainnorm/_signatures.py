"""Constructor signatures for classes built on ``brainstate.graph.Node``.

brainstate's node metaclass, ``GraphNodeMeta``, defines
``__call__(cls, *args, **kwargs)`` to create an instance. :func:`inspect.signature`
looks at a metaclass ``__call__`` before the class's ``__init__``, so every
brainstate module reports ``(*args, **kwargs)``: ``help()``, IDEs and sphinx
autodoc all lose the constructor's parameters and defaults. Both
:func:`inspect.signature` and autodoc read a class attribute ``__signature__``
first; :class:`_ConstructorSignature` provides it, computed from the class's own
``__init__`` when it is looked up, so subclasses (a user's subclass of
``LayerNorm`` with another ``__init__``) report theirs.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

__all__ = ["expose_signatures"]


class _ConstructorSignature:
    """``__signature__`` of a class: its ``__init__`` without ``self``.

    On an instance it is None, which tells :func:`inspect.signature` to go on to
    the instance's ``__call__`` (a layer's call signature).
    """

    def __get__(self, instance: object, owner: type) -> inspect.Signature | None:
        if instance is not None:
            return None
        signature = inspect.signature(vars(owner).get("__init__") or inspect.getattr_static(owner, "__init__"))
        parameters = list(signature.parameters.values())[1:]  # drop ``self``
        return signature.replace(parameters=parameters, return_annotation=inspect.Signature.empty)


def _metaclass_hides_init(cls: type) -> bool:
    """True when ``type(cls)`` overrides ``__call__``, which is what :func:`inspect.signature` reports."""
    return any("__call__" in vars(meta) for meta in inspect.getmro(type(cls)) if meta is not type)


def expose_signatures(namespace: Mapping[str, Any]) -> list[str]:
    """Give each public class of ``namespace`` its constructor's signature.

    Parameters
    ----------
    namespace : mapping
        A module's namespace (``globals()``) with an ``__all__`` list.

    Returns
    -------
    list of str
        Names of the classes that were given a ``__signature__``: those whose
        metaclass defines ``__call__`` and that do not set ``__signature__``
        themselves.

    Examples
    --------
    >>> import inspect, brainnorm
    >>> list(inspect.signature(brainnorm.LayerNorm).parameters)[:3]
    ['in_size', 'reduction_axes', 'feature_axes']
    """
    exposed = []
    for name in namespace.get("__all__", ()):
        obj = namespace.get(name)
        if not isinstance(obj, type) or "__signature__" in vars(obj) or not _metaclass_hides_init(obj):
            continue
        type.__setattr__(obj, "__signature__", _ConstructorSignature())
        exposed.append(name)
    return exposed
