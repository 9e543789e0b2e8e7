"""modules/fifo_lock.py: a FIFO lock that a thread cannot take twice (the real one then waits forever; this
stand-in raises, so a test fails instead of hanging)."""
import threading


class FIFOLock:
    def __init__(self):
        self._lock = threading.Lock()
        self._owner = None

    def acquire(self, blocking=True):
        if self._owner == threading.get_ident():
            raise RuntimeError("deadlock: queue_lock acquired twice by one thread (it is not re-entrant)")
        acquired = self._lock.acquire(blocking)
        if acquired:
            self._owner = threading.get_ident()
        return acquired

    def release(self):
        self._owner = None
        self._lock.release()

    __enter__ = acquire

    def __exit__(self, t, v, tb):
        self.release()
