"""PEP 562 lazy attributes: names a package exports but imports only on first use."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

from imagebind_core.errors import WorkerBroken

# The first interrupted import of this process, and the first WorkerBroken raised, or None.
_interrupted: str | None = None
_broken: str | None = None


def load_module(name: str) -> ModuleType:
    """`importlib.import_module(name)`, for the modules this package loads on first use (the
    decoders, torch with them).

    An interrupt landing in the middle of an import (KeyboardInterrupt: how Ray cancels a
    running task, e.g. those of a job that stopped) leaves the process unable to import that
    package again: compiled extensions initialise once per process, and torch's second import
    fails ("duplicate registrations for aten...") or crashes. Such a process would fail every
    item it is given, each as if the item were bad. So an interrupted import is remembered,
    and a later failed import here raises WorkerBroken: the process must be replaced."""
    global _interrupted, _broken
    try:
        return importlib.import_module(name)
    except Exception as e:
        if _interrupted is not None:
            err = WorkerBroken(name, f"{type(e).__name__}: {e}", _interrupted)
            _broken = _broken or str(err)
            raise err from e
        raise
    except BaseException as e:  # KeyboardInterrupt, SystemExit: the import stopped part way
        if _interrupted is None:
            _interrupted = f"importing {name} was interrupted ({type(e).__name__})"
        raise


def broken() -> str | None:
    """The first WorkerBroken this process raised, as a sentence, or None: once set, the
    process cannot do its work (a health check reports it)."""
    return _broken


def lazy_getattr(
    package: str, table: Mapping[str, str], namespace: dict[str, Any]
) -> Callable[[str], Any]:
    """A module `__getattr__` for `package`: `table` maps an exported name to the submodule
    defining it; the first access imports that submodule and caches the value in `namespace`
    (the package's globals), so later accesses never come back here."""

    def __getattr__(name: str) -> Any:
        mod = table.get(name)
        if mod is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(load_module(f"{package}.{mod}"), name)
        namespace[name] = value
        return value

    return __getattr__
