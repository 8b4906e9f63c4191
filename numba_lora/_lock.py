"""A readers-writer lock: forwards share a layer, state changes have it alone.

Forwards only read W, A and B, so any number may run at once (the kernels
release the GIL).  A state change (merge, unmerge, a new factor, enable,
disable) rewrites W or decides how the next forward reads it, so it waits
until running forwards finish and keeps new ones out until it is done: a
forward never sees a half-merged W, and two merges never both apply.
Waiting writers go first, so a stream of forwards cannot starve a merge.

The lock is not re-entrant: a state change must not call a forward of the
same layer while it holds the lock.
"""

import threading

__all__ = ["RWLock"]


class RWLock:
    """Shared (read) and exclusive (write) locking, writers preferred."""

    __slots__ = ("_mutex", "_cond", "_readers", "_writer", "_waiting_writers")

    def __init__(self):
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    # The read side is on every forward's path, after the forward before it
    # has streamed W through the caches: it touches as little as it can (the
    # mutex directly, no Condition method frames, no notify without a waiter).
    def acquire_read(self):
        cond = self._cond
        mutex = self._mutex
        mutex.acquire()
        try:
            while self._writer or self._waiting_writers:
                cond.wait()
            self._readers += 1
        finally:
            mutex.release()

    def release_read(self):
        mutex = self._mutex
        mutex.acquire()
        try:
            self._readers -= 1
            # Only writers wait for the readers to drain; a writer counts
            # itself in _waiting_writers (under this mutex) before it waits.
            if self._readers == 0 and self._waiting_writers:
                self._cond.notify_all()
        finally:
            mutex.release()

    def acquire_write(self):
        with self._cond:
            self._waiting_writers += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._waiting_writers -= 1
            self._writer = True

    def release_write(self):
        with self._cond:
            self._writer = False
            self._cond.notify_all()

    def read(self):
        """Context manager holding the lock shared."""
        return _Held(self.acquire_read, self.release_read)

    def write(self):
        """Context manager holding the lock exclusively."""
        return _Held(self.acquire_write, self.release_write)

    # A lock belongs to one object in one process: copies and unpickled
    # objects get a fresh, unlocked one.
    def __reduce__(self):
        return (RWLock, ())

    def __deepcopy__(self, memo):
        return RWLock()

    def __copy__(self):
        return RWLock()


class _Held:
    __slots__ = ("_enter", "_exit")

    def __init__(self, enter, exit_):
        self._enter = enter
        self._exit = exit_

    def __enter__(self):
        self._enter()
        return self

    def __exit__(self, *exc):
        self._exit()
        return False
