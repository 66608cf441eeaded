"""Importing megatron-core for a conversion without torch's compiler stack.

``import megatron.core`` took 2.1-2.8 s here, of which about 1.3 s is not
megatron at all: ``megatron.core.jit`` sets ``jit_fuser = torch.compile``, and
decorating its fused functions with it (``fusions.fused_bias_geglu`` and
others, at import time) imports ``torch._dynamo`` and ``torch._inductor``
(with sympy). A conversion never calls those functions.

:func:`import_megatron` imports megatron-core with ``torch.compile`` swapped,
for the duration of that one import, for a decorator that calls the real
``torch.compile`` on a function's first call. ``torch.compile`` itself
compiles lazily, on the first call, so a function that does run (``plugtron
verify`` runs the model) is compiled at the same moment with the same
arguments as before; only the import of the compiler moves to that moment.
Measured: megatron-core imports in 0.76-0.87 s instead of 2.1-2.8 s.

:func:`settle` then moves everything imported so far out of the garbage
collector's way (``gc.freeze``), in a process that runs one plugtron command
and exits; :func:`collections_paused` keeps collections out of a conversion
called from a user's program. (Skipping megatron's CPU initialisation in meta
builds is the pipeline's job: :mod:`plugtron.pipeline.stages`.)
"""

from __future__ import annotations

import contextlib
import functools
import gc
import sys
from typing import Any, Callable, Iterator


def import_megatron() -> None:
    """Import torch and megatron-core, deferring ``torch.compile``'s imports to a compiled function's first call.

    A no-op when megatron-core is already imported (its decorators are then as they are).
    """
    if "megatron.core" in sys.modules:
        return
    import torch

    real = torch.compile
    torch.compile = compile_on_first_call(real)
    try:
        import megatron.core  # noqa: F401
    finally:
        torch.compile = real


def settle() -> None:
    """``gc.freeze()`` when this process is a plugtron command (the console script or a rank), else nothing.

    Why: torch and megatron-core leave about a million objects to the cyclic
    garbage collector. Every full collection walks them all, and both the
    conversion (its many small objects trigger collections: 0.1 s of a 250M
    model's 0.17 s plan was collections) and the interpreter's shutdown pay
    for it: exit took 0.65 s after importing them, 0.16 s after freezing
    (median of 8 each). Frozen objects are never collected, which is right
    for a process that exits when the command ends, and wrong for a long-lived
    one that calls :func:`plugtron.cli.main` many times (a test session), so
    only the former is frozen.
    """
    from plugtron.cli import is_command_process

    if is_command_process():
        gc.freeze()


def compile_on_first_call(compile_: Callable[..., Any]) -> Callable[..., Any]:
    """A ``torch.compile`` stand-in: ``compile_(fn, **options)`` runs when the decorated function is first called."""

    def deferred(model: Any = None, **options: Any) -> Any:
        if model is None:  # used as @torch.compile(mode=...)
            return lambda fn: deferred(fn, **options)
        compiled: list[Any] = []

        @functools.wraps(model)
        def call(*args: Any, **kwargs: Any) -> Any:
            if not compiled:
                compiled.append(compile_(model, **options))
            return compiled[0](*args, **kwargs)

        return call

    return deferred


@contextlib.contextmanager
def collections_paused() -> Iterator[None]:
    """No automatic garbage collection inside the block (restored after; nested blocks are fine).

    Why: building and loading a model makes tens of thousands of objects, and
    with torch and megatron-core imported each full collection they trigger
    walks about a million others (0.1 s apiece here: most of a 250M model's
    0.17 s plan). What the block leaves unreachable is collected at the next
    automatic collection after it. :func:`settle` makes this moot in a command
    process; this is for the same functions called from a user's program.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
