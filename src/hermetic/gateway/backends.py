"""Backend instances: untrusted hints in, attested and admitted XX sessions out.

The parent tells the gateway where instances of a service might be (a :class:`BackendHint`:
``vsock://CID:PORT`` from ``hermetic ps``, or ``tcp://HOST:PORT`` of a backend's proxy).
A hint is a claim by an untrusted party, so it buys nothing but a connection attempt:

1. the gateway dials the address (through the proxy's egress, :mod:`hermetic.gateway.dialer`
   for vsock), and opens a Noise **XX** session as the initiator, attesting itself with the
   runtime's own evidence provider;
2. it verifies the backend's evidence bundle against the config's ``peers`` trust file
   and the admission policy's rule for the hint's service
   (:meth:`~hermetic.gateway.admission.AdmissionPolicy.service_policy`): the logged
   release must name that service and be admitted; a debug backend only under a rule that
   allows debug. Another service behind the address, an unadmitted image, a debug enclave,
   a replayed or relayed bundle all fail here, each with its own error;
3. it sends one RPC and waits for any answer (``unknown_method`` will do): a backend
   answers only after it verified the gateway's evidence, so an answer means the backend's
   own policy names this gateway; a backend that refuses closes the session instead.

Only then does the instance join its service's :class:`BackendPool` and get traffic. A
refused hint is kept with its reason (``describe``, metrics) and never routed to.

The :class:`BackendSession` is one attested session, reused for every request routed to
that instance (calls are concurrent on it); replacing a session re-runs all three steps,
which is what re-attestation before documents age out (:meth:`Backends.reattest`) and the
re-admission of an instance that died or was drained after missed health checks
(:meth:`Backends.check_health`) do.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from hermetic.channel import aio
from hermetic.channel.noise import XX, StaticKeypair
from hermetic.channel.session import DEFAULT_MAX_MESSAGE_SIZE, MakeEvidence
from hermetic.client.trust import ClientTrust
from hermetic.client.verify import VerifiedPeer, verify_evidence
from hermetic.errors import (
    BackendHintError,
    BackendRefusedError,
    BackendUnavailableError,
    EvidenceRejectedError,
    HermeticError,
    RPCError,
    ServiceNotAcceptedError,
    ServiceURLError,
    UnknownServiceError,
)
from hermetic.gateway.admission import AdmissionPolicy, check_name
from hermetic.gateway.metrics import GatewayMetrics

PROBE_METHOD = "hermetic.methods"
"""The method of the admission round trip, which the runtime answers with the app's
methods and which of them are idempotent (any answer shows the backend accepted us)."""
MAX_DECLARED = 1024
CONNECT_TIMEOUT = 15.0
INSTANCE_STATES = ("attesting", "admitted", "refused", "unreachable", "failed", "unhealthy")
HEALTH_STRIKES = 2
"""Health checks in a row an admitted instance may miss before it is drained."""
CLOSE_TIMEOUT = 5.0
"""How long closing a session may wait on a backend that no longer reads."""
DRAIN_TIMEOUT = 60.0
"""How long a replaced session may finish its requests in flight before it is closed."""
MAX_INSTANCES = 64
"""Instances (hints) per service: a parent cannot grow the gateway's memory without bound."""


@dataclass(frozen=True)
class BackendHint:
    """Where the parent says an instance of ``service`` is: ``vsock://CID:PORT`` or
    ``tcp://HOST:PORT``. Untrusted: it only decides where the gateway tries to attest."""

    service: str
    address: str
    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, service: object, address: object) -> BackendHint:
        from hermetic.client.connect import ServiceURL
        from hermetic.errors import AdmissionPolicyError

        try:
            name = check_name(service, "hint service")
        except AdmissionPolicyError as exc:
            raise BackendHintError(str(exc)) from None
        if not isinstance(address, str) or len(address) > 300:
            raise BackendHintError(f"hint address: expected a URL, got {address!r:.80}")
        try:
            url = ServiceURL.parse(address)
        except ServiceURLError as exc:
            raise BackendHintError(f"hint address: {exc}") from None
        if url.scheme not in ("vsock", "tcp"):
            raise BackendHintError(
                f"hint address {address!r:.80}: expected vsock://CID:PORT or tcp://HOST:PORT"
            )
        return cls(name, f"{url.scheme}://{url.host}:{url.port}", url.scheme, url.host, url.port)

    def to_json(self) -> dict[str, str]:
        return {"service": self.service, "address": self.address}


Dial = Callable[[BackendHint], Awaitable[aio.MessagePipe]]
"""Open a byte pipe to a hint's address (through the egress inside the enclave)."""


class BackendSession:
    """One attested, admitted XX session to one backend instance, shared by its requests."""

    def __init__(
        self,
        hint: BackendHint,
        channel: aio.ClientChannel,
        peer: VerifiedPeer,
        idempotent: frozenset[str] = frozenset(),
    ) -> None:
        self.hint = hint
        self.peer = peer
        self.idempotent = idempotent
        """The methods the backend's app declares idempotent (safe to send again)."""
        self.handshake_hash = channel.handshake_hash
        self.opened_at = time.monotonic()
        self.outstanding = 0
        self.failed: HermeticError | None = None
        self._channel = channel

    @property
    def usable(self) -> bool:
        """False once the session failed: a call on it failed, or its reader saw the
        backend close or die (between requests too)."""
        if self.failed is None and self._channel.failure is not None:
            self.failed = self._channel.failure
        return self.failed is None

    async def call(self, method: str, args: Any) -> Any:
        """One request on this session. RPCError is the backend's own answer; any other
        error means the session is gone (:attr:`usable` turns false)."""
        self.outstanding += 1
        try:
            return await self._channel.call(method, args)
        except RPCError:
            raise
        except HermeticError as exc:
            self.failed = exc
            raise
        finally:
            self.outstanding -= 1

    async def ping(self, timeout: float) -> bool:
        """One health check on this session: the runtime's ``hermetic.methods`` (cheap, no
        app code), answered within ``timeout`` seconds. Not counted as a request in flight
        (it must not steer the balancing). False if it timed out; a session that ended is
        marked failed."""
        try:
            async with asyncio.timeout(timeout):
                await self._channel.call(PROBE_METHOD, None)
        except RPCError:
            return True  # an answer all the same
        except TimeoutError:
            return False
        except HermeticError as exc:
            self.failed = self.failed or exc
            return False
        return True

    async def close(self) -> None:
        self.failed = self.failed or BackendUnavailableError("session closed by the gateway")
        with contextlib.suppress(HermeticError, TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._channel.close()


async def attest_backend(
    hint: BackendHint,
    admission: AdmissionPolicy,
    peers: ClientTrust,
    dial: Dial,
    *,
    static: StaticKeypair,
    make_evidence: MakeEvidence,
    timeout: float = CONNECT_TIMEOUT,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
) -> BackendSession:
    """Steps 1-3 of the module docstring; BackendRefusedError naming the failed check, or
    BackendUnavailableError when nothing answers at the address."""
    policy = admission.service_policy(hint.service)

    def verify(bundle: bytes, handshake_hash: bytes, remote_static: bytes) -> VerifiedPeer:
        peer = verify_evidence(bundle, handshake_hash, remote_static, peers, policy)
        if not peer.debug and peer.service != hint.service:
            # A rule that allows debug backends names no service in its verifier policy
            # (a debug peer has none), so a production release is held to the name here.
            raise ServiceNotAcceptedError(
                f"service: {peer.service!r} is not accepted (the hint says {hint.service!r})"
            )
        return peer

    try:
        pipe = await asyncio.wait_for(dial(hint), timeout)
    except TimeoutError:
        raise BackendUnavailableError(f"{hint.address}: no connection within {timeout} s") from None
    except HermeticError as exc:
        raise BackendUnavailableError(f"{hint.address}: {type(exc).__name__}: {exc}") from None
    try:
        channel = await aio.connect(
            pipe, verify, protocol_name=XX, static=static, make_evidence=make_evidence,
            handshake_timeout=timeout, max_message_size=max_message_size,
        )  # fmt: skip
    except EvidenceRejectedError as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, HermeticError) else exc
        raise BackendRefusedError(
            f"{hint.service} at {hint.address}: {type(cause).__name__}: {cause}"
        ) from cause
    except HermeticError as exc:
        with contextlib.suppress(HermeticError):
            await pipe.aclose()
        raise BackendUnavailableError(
            f"{hint.service} at {hint.address}: session did not open: {type(exc).__name__}: {exc}"
        ) from None
    peer = channel.peer_info
    assert isinstance(peer, VerifiedPeer)
    idempotent: frozenset[str] = frozenset()
    try:
        async with asyncio.timeout(timeout):
            described = await channel.call(PROBE_METHOD, None)
        idempotent = _declared(described)
    except RPCError:
        pass  # any answer: the backend verified our evidence and serves us
    except (HermeticError, TimeoutError) as exc:
        with contextlib.suppress(HermeticError):
            await channel.close()
        raise BackendRefusedError(
            f"{hint.service} at {hint.address}: the backend closed the session after its"
            f" evidence verified ({type(exc).__name__}): it refused the gateway's evidence"
            " (its policy does not name this gateway's release) or it died"
        ) from None
    return BackendSession(hint, channel, peer, idempotent)


def _declared(described: object) -> frozenset[str]:
    """The idempotent methods in a ``hermetic.methods`` answer; nothing if it is not one.
    The backend is an admitted release (its code is the logged one), so what it declares
    is believed; bounded so an answer cannot grow the gateway's memory."""
    if not isinstance(described, dict):
        return frozenset()
    names = described.get("idempotent")
    if not isinstance(names, list) or len(names) > MAX_DECLARED:
        return frozenset()
    return frozenset(n for n in names if isinstance(n, str) and 0 < len(n) <= 128)


@dataclass
class Instance:
    """What the gateway knows about one hint: its state, why, and the admitted session."""

    hint: BackendHint
    state: str = "attesting"
    reason: str | None = None
    session: BackendSession | None = None
    attempts: int = 0
    strikes: int = 0
    """Health checks missed in a row (:data:`HEALTH_STRIKES` drain the instance)."""
    readmitting: asyncio.Task[None] | None = None

    @property
    def current(self) -> str:
        """The state, with ``failed`` for an admitted instance whose session went away
        (it gets no request; the health checks re-attest it, as adding its address again
        does). ``unhealthy``: drained after missing health checks, re-attested the same
        way."""
        session = self.session
        if self.state == "admitted" and session is not None and not session.usable:
            return "failed"
        return self.state

    @property
    def lost(self) -> bool:
        """Admitted once, now without a usable session: to be re-attested."""
        return self.current in ("failed", "unhealthy")

    def to_json(self) -> dict[str, Any]:
        value: dict[str, Any] = {**self.hint.to_json(), "state": self.current}
        reason = self.reason
        if self.current == "failed" and self.session is not None:
            failed = self.session.failed
            reason = f"session lost: {type(failed).__name__}: {failed}" + (
                f"; {self.reason}" if self.reason else ""
            )
        if reason is not None:
            value["reason"] = reason
        if self.session is not None:
            peer = self.session.peer
            value["release"] = peer.version
            value["pcr0"] = peer.pcrs[0].hex() if 0 in peer.pcrs else None
            value["debug"] = peer.debug
            value["module_id"] = peer.module_id
            value["outstanding"] = self.session.outstanding
        return value


@dataclass
class BackendPool:
    """The instances of one service. Requests go to the admitted, usable session with the
    fewest requests in flight, ties taken in turn."""

    service: str
    instances: dict[str, Instance] = field(default_factory=dict)
    _turn: int = 0

    def pick(self, exclude: frozenset[BackendSession] = frozenset()) -> BackendSession:
        sessions = [
            i.session
            for i in self.instances.values()
            if i.state == "admitted"
            and i.session is not None
            and i.session.usable
            and i.session not in exclude
        ]
        if not sessions:
            raise BackendUnavailableError(
                f"service {self.service!r}: no admitted backend instance"
                f" ({len(self.instances)} known)"
            )
        fewest = min(s.outstanding for s in sessions)
        idle = [s for s in sessions if s.outstanding == fewest]
        self._turn += 1
        return idle[self._turn % len(idle)]


class Backends:
    """Every service's pool; hints added and removed while the gateway serves."""

    def __init__(
        self,
        admission: AdmissionPolicy,
        peers: ClientTrust,
        dial: Dial,
        *,
        make_evidence: MakeEvidence,
        metrics: GatewayMetrics,
        static: StaticKeypair | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self.admission = admission
        self.peers = peers
        self.metrics = metrics
        self._dial = dial
        self._make_evidence = make_evidence
        self._static = static if static is not None else StaticKeypair.generate()
        self._max_message_size = max_message_size
        self.pools = {name: BackendPool(name) for name in admission.services}
        self._retiring: set[asyncio.Task[None]] = set()
        self._gauges()

    def pool(self, service: str) -> BackendPool:
        pool = self.pools.get(service)
        if pool is None:
            raise UnknownServiceError(
                f"service {service!r:.80}: not in the gateway's admission policy"
            )
        return pool

    async def add(self, hint: BackendHint) -> Instance:
        """Attest the instance a hint points at; it gets traffic only if admitted.

        Adding a known address again re-attests it: the old session keeps serving while
        the new one is attested, then the new one takes the traffic and the old one is
        closed once its requests in flight are answered (:meth:`_retire`). If the instance
        no longer passes, it gets no further request either way.
        """
        pool = self.pool(hint.service)
        instance = pool.instances.get(hint.address)
        if instance is None:
            if len(pool.instances) >= MAX_INSTANCES:
                raise BackendHintError(
                    f"service {hint.service!r}: already {MAX_INSTANCES} instances known;"
                    " remove one first"
                )
            instance = pool.instances[hint.address] = Instance(hint)
        instance.attempts += 1
        old = instance.session
        if old is None or not old.usable:
            instance.state, instance.reason = "attesting", None
        self._gauges()
        try:
            session = await attest_backend(
                hint, self.admission, self.peers, self._dial,
                static=self._static, make_evidence=self._make_evidence,
                max_message_size=self._max_message_size,
            )  # fmt: skip
        except BackendRefusedError as exc:
            cause = exc.__cause__ if isinstance(exc.__cause__, HermeticError) else exc
            self.metrics.refusals.labels(hint.service, type(cause).__name__).inc()
            instance.state, instance.reason = "refused", f"{type(exc).__name__}: {exc}"
            instance.session = None
        except BackendUnavailableError as exc:
            self.metrics.refusals.labels(hint.service, type(exc).__name__).inc()
            instance.state, instance.reason = "unreachable", f"{type(exc).__name__}: {exc}"
            instance.session = None
        else:
            if pool.instances.get(hint.address) is instance:
                instance.state, instance.reason, instance.session = "admitted", None, session
                instance.strikes = 0
                self.metrics.admissions.labels(hint.service).inc()
            else:  # removed while it was being attested
                await session.close()
        finally:
            if old is not None and old is not instance.session:
                self._retire(old)
            self._gauges()
        return instance

    def _retire(self, session: BackendSession) -> None:
        """Close a replaced session once its requests in flight are answered (at most
        :data:`DRAIN_TIMEOUT` seconds); it gets no new request meanwhile."""

        async def drain() -> None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + DRAIN_TIMEOUT
            while session.outstanding and session.usable and loop.time() < deadline:
                await asyncio.sleep(0.05)
            await session.close()

        task = asyncio.get_running_loop().create_task(drain())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def reattest(self, max_age: float) -> int:
        """Re-attest every admitted instance whose session is older than ``max_age``
        seconds (a fresh document from the backend, checked against the policy again);
        returns how many were re-attested."""
        now = time.monotonic()
        due = [
            instance.hint
            for pool in self.pools.values()
            for instance in pool.instances.values()
            if instance.state == "admitted"
            and instance.session is not None
            and now - instance.session.opened_at >= max_age
        ]
        for hint in due:
            await self.add(hint)
        return len(due)

    async def keep_attested(self, max_age: float) -> None:
        """Run :meth:`reattest` for ever, so no session outlives ``max_age`` by much (the
        gateway starts it at boot with the config's ``reattest``)."""
        while True:
            await asyncio.sleep(max(max_age / 4, 0.5))
            await self.reattest(max_age)

    async def check_health(self, timeout: float) -> dict[str, int]:
        """One round of health checks (:meth:`keep_healthy` runs it for ever).

        Every admitted instance is pinged on its session (:meth:`BackendSession.ping`).
        One that misses :data:`HEALTH_STRIKES` in a row is **drained**: ``unhealthy``, no
        new request, and its session closed, so the requests it holds fail over as if it
        had died (the idempotent ones are sent to another instance, the others fail as not
        retried) instead of waiting on a backend that stopped answering. Every instance
        that was admitted and is now ``failed`` or ``unhealthy`` is re-attested in the
        background (one attempt at a time each, a fresh session and document against the
        policy, as :meth:`add` does); it gets traffic again only once admitted. Returns
        the round's counts (``ok``, ``missed``, ``drained``, ``readmitting``).
        """
        admitted = [
            (i, i.session)
            for pool in self.pools.values()
            for i in pool.instances.values()
            if i.current == "admitted" and i.session is not None
        ]
        answers = await asyncio.gather(*(session.ping(timeout) for _, session in admitted))
        counts = {"ok": 0, "missed": 0, "drained": 0, "readmitting": 0}
        for (instance, session), answered in zip(admitted, answers, strict=True):
            service = instance.hint.service
            if answered:
                instance.strikes = 0
                counts["ok"] += 1
                self.metrics.health_checks.labels(service, "ok").inc()
                continue
            counts["missed"] += 1
            self.metrics.health_checks.labels(service, "missed").inc()
            if instance.session is not session or not session.usable:
                continue  # replaced meanwhile, or it ended (failed: re-attested below)
            instance.strikes += 1
            if instance.strikes >= HEALTH_STRIKES:
                counts["drained"] += 1
                self.metrics.drains.labels(service).inc()
                instance.state = "unhealthy"
                instance.reason = (
                    f"drained: {instance.strikes} health checks in a row not answered"
                    f" within {timeout:g} s"
                )
                await session.close()
        for pool in self.pools.values():
            for instance in pool.instances.values():
                attempt = instance.readmitting
                if instance.lost and (attempt is None or attempt.done()):
                    counts["readmitting"] += 1
                    instance.readmitting = asyncio.get_running_loop().create_task(
                        self._readmit(instance)
                    )
        self._gauges()
        return counts

    async def _readmit(self, instance: Instance) -> None:
        """Re-attest a lost instance; it changes state only when admitted again, or when
        its evidence is refused (another image there now: ``refused``, not retried). While
        nothing answers it stays ``failed`` or ``unhealthy`` and is tried again next
        round."""
        hint = instance.hint
        pool = self.pools[hint.service]
        try:
            session = await attest_backend(
                hint, self.admission, self.peers, self._dial,
                static=self._static, make_evidence=self._make_evidence,
                max_message_size=self._max_message_size,
            )  # fmt: skip
        except BackendRefusedError as exc:
            if pool.instances.get(hint.address) is instance and instance.lost:
                cause = exc.__cause__ if isinstance(exc.__cause__, HermeticError) else exc
                self.metrics.refusals.labels(hint.service, type(cause).__name__).inc()
                self.metrics.health_checks.labels(hint.service, "readmit_refused").inc()
                instance.state, instance.reason = "refused", f"{type(exc).__name__}: {exc}"
                old, instance.session = instance.session, None
                if old is not None:
                    await old.close()
        except BackendUnavailableError as exc:
            self.metrics.health_checks.labels(hint.service, "readmit_unreachable").inc()
            if instance.lost:
                before = (instance.reason or "").split("; re-admission")[0]
                instance.reason = f"{before}; re-admission: {type(exc).__name__}: {exc}".lstrip(
                    "; "
                )
        else:
            if pool.instances.get(hint.address) is instance and instance.lost:
                old = instance.session
                instance.state, instance.reason, instance.session = "admitted", None, session
                instance.strikes = 0
                self.metrics.admissions.labels(hint.service).inc()
                self.metrics.health_checks.labels(hint.service, "readmitted").inc()
                if old is not None:
                    await old.close()
            else:  # removed, re-added or refused meanwhile
                await session.close()
        finally:
            instance.readmitting = None
            self._gauges()

    async def keep_healthy(self, interval: float, timeout: float) -> None:
        """Run :meth:`check_health` every ``interval`` seconds for ever (the gateway starts
        it at boot with the config's ``health_interval`` and ``health_timeout``)."""
        while True:
            await asyncio.sleep(interval)
            await self.check_health(timeout)

    async def remove(self, service: str, address: str) -> bool:
        """Forget an instance: no new request goes to it; its session is closed."""
        hint = BackendHint.parse(service, address)
        instance = self.pool(hint.service).instances.pop(hint.address, None)
        if instance is None:
            return False
        if instance.readmitting is not None:
            instance.readmitting.cancel()
        if instance.session is not None:
            await instance.session.close()
        self._gauges()
        return True

    def describe(self) -> dict[str, list[dict[str, Any]]]:
        self._gauges()
        return {
            name: [i.to_json() for i in pool.instances.values()]
            for name, pool in sorted(self.pools.items())
        }

    def _gauges(self) -> None:
        for name, pool in self.pools.items():
            for state in INSTANCE_STATES:
                count = sum(1 for i in pool.instances.values() if i.current == state)
                self.metrics.backends.labels(name, state).set(count)

    async def aclose(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        for pool in self.pools.values():
            for instance in pool.instances.values():
                if instance.readmitting is not None:
                    instance.readmitting.cancel()
                if instance.session is not None:
                    await instance.session.close()
