"""Modules loaded on first use, so that `cdpctl --help`, completion and the light
commands do not pay for grpc, cryptography and the generated protobuf modules.

    if TYPE_CHECKING:
        import grpc
    else:
        grpc = lazy.module("grpc")

`module` registers the module in sys.modules at once and runs its code the
first time one of its attributes is read (importlib.util.LazyLoader); its
parent packages are imported at once (they are light here). A module already
imported is returned as it is.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def module(name: str) -> ModuleType:
    loaded = sys.modules.get(name)
    if loaded is not None:
        return loaded
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    loader.exec_module(mod)
    return mod
