"""Progress logging from inside DoFns, at most every few seconds per worker."""

import logging
import time


class Progress:
    """Counts items and logs the running total and rate now and then."""

    def __init__(self, what: str, every_seconds: float = 10.0):
        self.what = what
        self.every = every_seconds
        self.count = 0
        self.start = self.last = time.monotonic()

    def add(self, n: int = 1) -> None:
        self.count += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            logging.info("%s: %s so far (%.0f/s)", self.what, f"{self.count:,}",
                         self.count / max(now - self.start, 1e-9))
