"""What makes an ``AdaptedModule`` safe to serve from several threads (or asyncio tasks) at once.

- ``ServingLock``: calls hold it shared for their whole run (so many run at once), what changes the adapters or
  the graph (``add_adapter``, ``load_adapter``, ``delete_adapter``) holds it exclusively: it waits for the running
  calls, and calls wait for it. So a call never sees an adapter half added, a row of a deleted adapter reused by
  another, or half-merged weights: it runs with the adapters as they were when it started. Re-entrant in one
  thread; waiting writers go first (no starvation). The module-wide switches (``set_adapter``, ``merge``,
  ``unmerge``), which change what every caller's next call computes, hold it as a ``switch``: exclusively, but
  they refuse with a ``RuntimeError`` while calls are running in other threads, instead of silently changing
  those callers' defaults between two of their calls (servers pass ``adapter_name(s)`` per call).
- ``ContextFlag``: a per-context boolean (``contextvars``): ``disable_adapters()`` in one thread or task does not
  disable the module for the others, and leaves nothing behind however the blocks interleave.

Both pickle and deepcopy as new, unlocked objects.

>>> lock = ServingLock()
>>> with lock.shared(), lock.shared():
...     pass
>>> with lock.exclusive(), lock.shared():  # the writer itself may call
...     pass
>>> with lock.shared(), lock.exclusive("set_adapter"):  # doctest: +ELLIPSIS
...     pass  # a change from inside a call of the same thread
Traceback (most recent call last):
...
RuntimeError: set_adapter: cannot change the adapters from inside a call of the same module ...
>>> flag = ContextFlag()
>>> with flag.set(True):
...     flag.get()
True
>>> flag.get()
False
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import threading
from collections.abc import Callable, Iterator

_FLAGS: contextvars.ContextVar[frozenset] = contextvars.ContextVar("fx_adapters_flags", default=frozenset())
_KEYS = itertools.count()


class ServingLock:
    """A re-entrant readers-writer lock (see the module docstring)."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers: dict[int, int] = {}  # thread id -> depth
        self._writer: int | None = None
        self._writer_depth = 0
        self._waiting_writers = 0

    def __reduce__(self):
        return ServingLock, ()

    def __deepcopy__(self, memo) -> ServingLock:
        return ServingLock()

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._writer != me and me not in self._readers:
                self._cond.wait_for(lambda: self._writer is None and not self._waiting_writers)
            self._readers[me] = self._readers.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._readers[me] -= 1
                if not self._readers[me]:
                    del self._readers[me]
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self, what: str = "", refuse_running_calls: bool = False) -> Iterator[None]:
        """Held alone; ``refuse_running_calls``: raise instead of waiting while other threads are in calls."""
        me = threading.get_ident()
        where = f"{what}: " if what else ""
        with self._cond:
            if self._writer != me:
                if me in self._readers:
                    raise RuntimeError(f"{where}cannot change the adapters from inside a call of the same module "
                                       "(e.g. a forward hook); do it between calls")
                if refuse_running_calls and self._readers:
                    raise RuntimeError(
                        f"{where}{sum(self._readers.values())} call(s) of this module are running in other threads; "
                        "it changes what every caller computes, so it does not run while calls do: call it between "
                        "calls, or pass adapter_name= / adapter_names= per call instead (nothing was changed)")
                self._waiting_writers += 1
                try:
                    self._cond.wait_for(lambda: self._writer is None and not self._readers)
                finally:
                    self._waiting_writers -= 1
                self._writer = me
            self._writer_depth += 1
        try:
            yield
        finally:
            with self._cond:
                self._writer_depth -= 1
                if not self._writer_depth:
                    self._writer = None
                    self._cond.notify_all()




def holding(kind: str) -> Callable[[Callable], Callable]:
    """A decorator running a method of an object with a ``serving`` ``ServingLock`` while holding it ``kind``
    (``"shared"``: a call; ``"exclusive"``: a change; ``"switch"``: a module-wide switch)."""
    def decorate(method: Callable) -> Callable:
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            lock = self.serving
            held = lock.shared() if kind == "shared" else lock.exclusive(method.__name__, kind == "switch")
            with held:
                return method(self, *args, **kwargs)
        return run
    return decorate


exclusive, shared, switch = holding("exclusive"), holding("shared"), holding("switch")


class ContextFlag:
    """A boolean seen per thread / asyncio task (``contextvars``), False unless set in the current context."""

    def __init__(self):
        self.key = next(_KEYS)

    def __reduce__(self):
        return ContextFlag, ()

    def __deepcopy__(self, memo) -> ContextFlag:
        return ContextFlag()

    def get(self) -> bool:
        return self.key in _FLAGS.get()

    @contextlib.contextmanager
    def set(self, value: bool) -> Iterator[None]:
        flags = _FLAGS.get()
        token = _FLAGS.set(flags | {self.key} if value else flags - {self.key})
        try:
            yield
        finally:
            _FLAGS.reset(token)
