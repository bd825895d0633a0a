"""The registry: every reduction method, collected from its module's declaration (`METHOD`). Adding a method is
its module plus one entry in `_MODULES`' list."""

from __future__ import annotations

from lmms_simignore.methods import (dart, divprune, fastv, pdrop, pool, prumerge_plus, random_tokens, simignore, sparsevlm,
                                    visiondrop, vispruner, visionzip)
from lmms_simignore.methods.base import COMMON_ARGUMENTS, Method

_MODULES = (simignore, random_tokens, fastv, pdrop, dart, visionzip, visiondrop, pool, divprune, vispruner, prumerge_plus,
            sparsevlm)


def register(registry: dict[str, Method], method: Method) -> None:
    """Add `method`; refuses a name taken, or an argument name another method (or a common setting) owns."""
    if method.name in registry or method.name == "none":
        raise ValueError(f"a method named {method.name!r} is already registered")
    owners = {name: other.name for other in registry.values() for name in other.argument_names}
    for name in method.argument_names:
        if name in COMMON_ARGUMENTS or name in owners:
            raise ValueError(f"method {method.name}: argument {name} is already {owners.get(name, 'a common setting')}'s")
    registry[method.name] = method


def _collect() -> dict[str, Method]:
    registry: dict[str, Method] = {}
    for module in _MODULES:
        register(registry, module.METHOD)
    return registry


METHODS: dict[str, Method] = _collect()


def argument_owners() -> dict[str, str]:
    """Each method argument's name -> the method it belongs to."""
    return {name: method.name for method in METHODS.values() for name in method.argument_names}
