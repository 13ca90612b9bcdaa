"""tracetape's `sitecustomize`: imported at interpreter start because `tracetape run` puts this folder first
on PYTHONPATH.

It first runs the next `sitecustomize` found on `sys.path` after this folder (a user's, or
`opentelemetry-instrument`'s), never shadowing it and never itself again, so that an application's own
OpenTelemetry setup registers its tracer provider before tracetape decides whether to be the global one;
an error in that module is reported on stderr like Python reports a failing `sitecustomize`, and does not
stop recording. It then calls `TracetapeInstrumentor().instrument()` (a no-op when the other module
already loaded it through the `opentelemetry_instrumentor` entry point).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from importlib.machinery import PathFinder


def _same_dir(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _load_next_sitecustomize() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    this_module = sys.modules.get(__name__)
    entries = [p or os.getcwd() for p in sys.path]
    start = next((i for i, p in enumerate(entries) if os.path.isdir(p) and _same_dir(p, here)), None)
    if start is None:
        return
    for entry in entries[start + 1 :]:
        if not os.path.isdir(entry) or _same_dir(entry, here):
            continue
        spec = PathFinder.find_spec("sitecustomize", [entry])
        if spec is None or spec.loader is None:
            continue
        if spec.origin and os.path.realpath(spec.origin) == os.path.realpath(__file__):
            continue
        module = importlib.util.module_from_spec(spec)
        sys.modules["sitecustomize"] = module
        try:
            spec.loader.exec_module(module)
        except Exception as err:  # noqa: BLE001 - report like site.execsitecustomize does
            if this_module is not None:
                sys.modules["sitecustomize"] = this_module
            print(
                f"Error in sitecustomize ({spec.origin}); set PYTHONVERBOSE for traceback:\n"
                f"{type(err).__name__}: {err}",
                file=sys.stderr,
            )
        return


def _instrument() -> None:
    try:
        from tracetape.instrumentation.instrumentor import TracetapeInstrumentor

        TracetapeInstrumentor().instrument()
    except Exception as err:  # noqa: BLE001 - the program must run even if recording cannot
        print(f"tracetape: recording is off ({type(err).__name__}: {err})", file=sys.stderr)


_load_next_sitecustomize()
_instrument()
