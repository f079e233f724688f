"""Exponential backoff schedules.

The policy only computes delays; callers do the sleeping (with ``trio.sleep``) and
decide which failures are worth retrying.  Keeping the schedule pure makes it trivially
testable and lets the same policy drive both message sends and entity restarts.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import attrs

from .validation import number

__all__ = ["RetryPolicy"]

# One shared generator instead of a fresh Random() per schedule: seeding a new one
# reads os.urandom, which is needless work on every retried send.
_DEFAULT_RNG = random.Random()


@attrs.frozen
class RetryPolicy:
    """How long to wait between attempts, and when to give up.

    Delays grow as ``base_delay * factor**k``, each capped at ``max_delay``.  ``jitter``
    spreads them out so that many callers failing together do not retry in lockstep:
    each delay ``d`` becomes uniform in ``[d * (1 - jitter), d]`` (``1`` is "full
    jitter", ``0`` none).
    """

    base_delay: float = attrs.field(default=0.05, validator=number(minimum=0))
    factor: float = attrs.field(default=2.0, validator=number(minimum=1))
    max_delay: float = attrs.field(default=5.0, validator=number(minimum=0))
    max_attempts: int = attrs.field(default=5, validator=number(minimum=1, integer=True))
    max_elapsed: float = attrs.field(default=30.0, validator=number(minimum=0))
    jitter: float = attrs.field(default=1.0, validator=number(minimum=0, maximum=1))

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """Yield the sleep before attempt 2, 3, ...; exhaustion means give up.

        At most ``max_attempts - 1`` delays.  The ``max_elapsed`` budget is checked
        against each *nominal* (pre-jitter) delay, and the schedule stops rather than
        shortening the delay that would overrun it: a shortened delay would fire a retry
        right after the previous one, defeating the backoff, and checking before jitter
        makes the number of attempts the same for every random draw.  Jitter only ever
        shortens a delay, so the jittered total stays within ``max_elapsed`` as well.

        ``max_elapsed`` bounds the sleeping only; the policy cannot see how long the
        attempts themselves take.  Wrap the retry loop in ``trio.move_on_after`` when a
        wall-clock deadline matters.

        ``rng`` makes the jitter reproducible in tests.
        """
        draw = _DEFAULT_RNG if rng is None else rng
        spent = 0.0
        for k in range(self.max_attempts - 1):
            nominal = self._nominal_delay(k)
            if spent + nominal > self.max_elapsed:
                return
            spent += nominal
            yield self._jittered(nominal, draw)

    def _nominal_delay(self, k: int) -> float:
        try:
            return min(self.base_delay * self.factor**k, self.max_delay)
        except OverflowError:  # factor**k beyond float range: long past the cap
            return self.max_delay

    def _jittered(self, delay: float, rng: random.Random) -> float:
        if self.jitter == 0:
            return delay
        # uniform() may round a hair past its upper bound; never exceed the nominal
        # delay, or the max_delay and max_elapsed guarantees would break.
        return min(delay, rng.uniform(delay * (1 - self.jitter), delay))
