"""The engine's backends by name, each behind a circuit breaker.

A backend that is down or hung must cost one timeout, not one per request. Each
backend's ``Breaker`` is in one of three states:

* **closed**: calls go through. A failure saying the backend cannot answer
  (``BackendUnavailable``: refused, reset, gone; or a timeout: a hung server)
  opens it at once.
* **open**: ``usable`` answers False, so reads go to parity shards up front and
  writes go to other backends, at no cost. After ``retry`` seconds (1 s the
  first time, doubling on every failed probe up to ``cooldown``) the next look
  at the backend starts
* **half-open**: one probe (``Backend.info`` within ``probe_timeout``) runs in
  the background; callers are still refused meanwhile and never wait on it.
  Success closes the breaker, failure opens it again for twice as long.

Health checks probe every backend through the same breakers (``probe_all``), so
a backend that died while idle is found without a request paying for it, and
one that came back closes within a readiness interval.

Answers that are refusals, not silence (a full or read-only namespace, a
denied password), leave the breaker closed: reads still work. Writes skip such
a backend for ``cooldown`` seconds (``refused_write``).

``generation`` grows whenever a breaker closes after being open: maint's repair
queue uses it to retry under-replicated files as soon as a backend returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.common.backends.base import Backend
from services.common.errors import BackendError, BackendUnavailable, InvalidInput

log = logging.getLogger(__name__)

FIRST_RETRY = 1.0  # seconds an opened breaker waits before its first probe
PROBE_TIMEOUT = 3.0  # seconds a probe (Backend.info) may take
SLOW_STRIKES = 3  # reads in a row missing hedge_after (no answer in between) open a breaker: a hung backend


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


def is_outage(exc: BaseException) -> bool:
    """Whether a failure means the backend cannot answer now (opens its breaker)."""
    return isinstance(exc, BackendUnavailable | TimeoutError)


@dataclass
class Breaker:
    """One backend's circuit breaker; see the module docstring."""

    cooldown: float
    clock: Callable[[], float] = time.monotonic
    state: State = State.CLOSED
    retry_at: float = 0.0
    wait: float = FIRST_RETRY
    down_since: float | None = None  # when it last opened from closed
    reason: str = ""
    opened: int = 0  # times it opened from closed (for logs and tests)
    strikes: int = 0  # reads in a row that missed hedge_after

    def due(self) -> bool:
        """Whether an open breaker's wait is over (a probe may start)."""
        return self.state is State.OPEN and self.clock() >= self.retry_at

    def success(self) -> bool:
        """The backend answered; True when this closed an open breaker."""
        was_down = self.state is not State.CLOSED
        self.strikes = 0
        self.state = State.CLOSED
        self.wait = min(FIRST_RETRY, self.cooldown)
        self.down_since = None
        self.reason = ""
        return was_down

    def failure(self, reason: str) -> bool:
        """The backend did not answer; True when this opened a closed breaker."""
        now = self.clock()
        first = self.state is State.CLOSED
        self.strikes = 0
        if first:
            self.wait = min(FIRST_RETRY, self.cooldown)
            self.down_since = now
            self.opened += 1
        else:
            self.wait = min(self.wait * 2, self.cooldown)
        self.state = State.OPEN
        self.retry_at = now + self.wait
        self.reason = reason
        return first


class BackendPool:
    """Named backends, each behind a ``Breaker``; see the module docstring."""

    def __init__(
        self,
        backends: dict[str, Backend],
        cooldown: float = 30.0,
        *,
        probe_timeout: float = PROBE_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not backends:
            raise InvalidInput("no backends configured")
        self.backends = dict(backends)
        self.cooldown = cooldown
        self.probe_timeout = probe_timeout
        self.generation = 0
        self._clock = clock
        self._breakers = {name: Breaker(cooldown, clock) for name in self.backends}
        self._no_writes_until: dict[str, float] = {}
        self._probes: set[asyncio.Task[bool]] = set()

    @property
    def names(self) -> list[str]:
        return list(self.backends)

    def get(self, name: str) -> Backend | None:
        return self.backends.get(name)

    def breaker(self, name: str) -> Breaker:
        return self._breakers[name]

    # -- what callers ask ---------------------------------------------------------------

    def usable(self, name: str) -> bool:
        """Whether calls to ``name`` should go out now (its breaker is closed); starts a due probe."""
        breaker = self._breakers.get(name)
        if breaker is None:
            return False
        if breaker.state is State.CLOSED:
            return True
        if breaker.due():
            self._start_probe(name)
        return False

    def healthy(self) -> list[str]:
        """Names whose breaker is closed, in configuration order."""
        return [n for n in self.backends if self.usable(n)]

    def writable(self, name: str) -> bool:
        """Whether ``name`` should get new shards now: usable and not refusing writes lately."""
        return self.usable(name) and self._no_writes_until.get(name, 0.0) <= self._clock()

    def down_for(self, name: str) -> float:
        """Seconds since ``name``'s breaker opened (0 while closed)."""
        breaker = self._breakers.get(name)
        if breaker is None or breaker.down_since is None:
            return 0.0
        return self._clock() - breaker.down_since

    def states(self) -> dict[str, str]:
        """Every backend's breaker state (closed / open / half-open)."""
        return {n: b.state.value for n, b in self._breakers.items()}

    # -- what callers report ------------------------------------------------------------

    def succeeded(self, name: str) -> None:
        """``name`` answered (any answer that is not an outage)."""
        breaker = self._breakers.get(name)
        if breaker is not None and breaker.state is State.CLOSED:
            breaker.strikes = 0
            return
        if breaker is not None and breaker.success():
            self.generation += 1
            log.info("backend %s answers again; its circuit breaker is closed", name)

    def failed(self, name: str, exc: BaseException) -> None:
        """A call to ``name`` failed with ``exc``; an outage opens its breaker."""
        if not is_outage(exc):
            self.succeeded(name)
            return
        breaker = self._breakers.get(name)
        if breaker is None:
            return
        reason = str(exc) or f"no answer within the time allowed ({type(exc).__name__})"
        if breaker.failure(reason):
            log.warning(
                "backend %s is down; its circuit breaker is open (reads use parity, writes skip it): %s",
                name,
                reason,
            )

    def slow(self, name: str) -> None:
        """A read from ``name`` missed ``hedge_after``; SLOW_STRIKES in a row without an answer open its breaker.

        A hung backend (a stopped process: the kernel accepts connections, nothing
        answers) never fails a read that parity overtakes, since the read is
        cancelled first: without this it would cost every chunk ``hedge_after``.
        """
        breaker = self._breakers.get(name)
        if breaker is None or breaker.state is not State.CLOSED:
            return
        breaker.strikes += 1
        if breaker.strikes >= SLOW_STRIKES:
            self.failed(
                name, BackendUnavailable(name, f"{breaker.strikes} reads in a row got no answer in time (hung?)")
            )

    def refused_write(self, name: str, exc: BackendError) -> None:
        """``name`` answered a write with a refusal (full, read-only ...): no new shards for ``cooldown`` s."""
        if is_outage(exc):
            self.failed(name, exc)
            return
        self._no_writes_until[name] = self._clock() + self.cooldown

    # -- probes -------------------------------------------------------------------------

    def _start_probe(self, name: str) -> None:
        breaker = self._breakers[name]
        if breaker.state is State.HALF_OPEN:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        breaker.state = State.HALF_OPEN
        task = loop.create_task(self.probe(name), name=f"probe-{name}")
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    async def probe(self, name: str) -> bool:
        """Probe ``name`` now (whatever its state), update its breaker; whether it answered."""
        try:
            async with asyncio.timeout(self.probe_timeout):
                await self.backends[name].info()
        except (BackendError, TimeoutError, OSError) as exc:
            self.failed(name, exc if is_outage(exc) else BackendUnavailable(name, f"probe failed: {exc}"))
            return False
        self.succeeded(name)
        return True

    async def probe_all(self) -> int:
        """Probe every backend whose breaker is closed or due (an open one waits out its time); how many answer.

        Health checks call this: it finds a backend that died while idle, and brings back one that returned.
        """
        names = [n for n, b in self._breakers.items() if b.state is State.CLOSED or b.due()]
        for n in names:
            if self._breakers[n].state is State.OPEN:
                self._breakers[n].state = State.HALF_OPEN
        results = await asyncio.gather(*(self.probe(n) for n in names))
        return sum(results)

    async def wait_probes(self) -> None:
        """Wait for the probes running in the background (tests, shutdown)."""
        if self._probes:
            await asyncio.gather(*self._probes, return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._probes):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._probes, return_exceptions=True)
        await asyncio.gather(*(b.close() for b in self.backends.values()), return_exceptions=True)
