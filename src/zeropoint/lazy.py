"""A package's exports imported on first use (PEP 562's module __getattr__): importing the
package loads none of its modules, so `zeropoint --help` and the GGUF requantizer, which touch
these packages, never import the torch that the modules behind the names need."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

TYPE_CHECKING = False  # typing's flag without typing's import (2 ms of a GGUF copy)
if TYPE_CHECKING:
    from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str],
                 namespace: dict[str, Any]) -> Callable[[str], Any]:
    """The `__getattr__` of `package` for `exports` (name -> relative module, or
    "module:attribute" where the attribute is named otherwise); each value found is kept in
    `namespace` (the package's globals), so it is looked up once."""

    def __getattr__(name: str) -> Any:
        where = exports.get(name)
        if where is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, attribute = where.partition(":")
        value = getattr(importlib.import_module(module, package), attribute or name)
        namespace[name] = value
        return value

    return __getattr__
