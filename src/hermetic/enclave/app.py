"""The app framework: what a service author writes inside the enclave.

A service is an :class:`App` with async methods registered by name::

    from hermetic.enclave import App
    app = App()

    @app.method("echo")
    async def echo(arg):
        return arg

The runtime (``hermetic.enclave.runtime``) imports the manifest's ``entry``, binds the
:class:`EnclaveContext` (the NSM, the verified runtime config) and serves the methods.
An App holds no I/O of its own, so tests can call :meth:`App.call` directly.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from hermetic.errors import HermeticError, LauncherError, ServiceError, UsageError

if TYPE_CHECKING:
    from hermetic.channel.session import MakeEvidence, VerifyEvidence
    from hermetic.kms.client import EnclaveKMSClient
    from hermetic.nsm.client import NSMClient, PCRState

HandlerT = TypeVar("HandlerT", bound=Callable[..., Awaitable[Any]])
log = logging.getLogger("hermetic.enclave")
StartT = TypeVar("StartT", bound=Callable[[], Awaitable[object]])


class BoundNSM:
    """The app's view of its NSM: every document it requests carries the config digest.

    The runtime builds it around the NSM client; ``user_data`` is not the app's to choose,
    because it is how a relying party learns which runtime config the enclave runs under
    (None when the enclave booted without a config).
    """

    def __init__(self, client: NSMClient, config_digest: bytes | None) -> None:
        self._client = client
        self.user_data = config_digest

    def attest(self, *, nonce: bytes | None = None, public_key: bytes | None = None) -> bytes:
        """An attestation document with ``user_data`` = SHA-256 of the runtime config."""
        return self._client.attest(user_data=self.user_data, nonce=nonce, public_key=public_key)

    def extend_pcr(self, index: int, data: bytes) -> bytes:
        return self._client.extend_pcr(index, data)

    def lock_pcr(self, index: int) -> None:
        self._client.lock_pcr(index)

    def describe_pcr(self, index: int) -> PCRState:
        return self._client.describe_pcr(index)

    def get_random(self) -> bytes:
        return self._client.get_random()


@dataclass(frozen=True)
class RuntimeConfig:
    """A runtime config the operator signed and the runtime verified.

    ``data`` is the config as delivered (JSON bytes), ``values`` the parsed object and
    ``digest`` its SHA-256, the value every attestation document carries in user_data.
    """

    data: bytes
    values: dict[str, Any]
    digest: bytes


RESERVED_PREFIX = "hermetic."
METHODS_METHOD = "hermetic.methods"
"""Answered by the runtime on every port: ``{"methods": [...], "idempotent": [...]}``."""
RUNTIME_METHODS = (METHODS_METHOD,)


@dataclass(frozen=True)
class SessionInfo:
    """The attested session a call came on: the enclave port it was accepted on and the
    session's Noise handshake hash (unique per session, the channel binding of
    docs/protocol.md), so an app can bind what it signs to one session (the gateway's
    receipts do). ``peer`` is what an XX port's verifier returned, None on an NX port."""

    port: int
    handshake_hash: bytes
    peer: object | None = None


@dataclass(frozen=True)
class EnclaveContext:
    """What an app can reach at run time: its NSM and its verified config (or None).

    ``kms`` is a ready :class:`~hermetic.kms.client.EnclaveKMSClient` when the config has
    a ``kms`` section (``hermetic.enclave.kmsaccess``), else None. It blocks: call it with
    ``await asyncio.to_thread(...)`` so the service keeps answering meanwhile.

    ``evidence`` is the runtime's own evidence provider (a fresh NSM document per
    handshake, this boot's endorsement and config digest): pass it as ``make_evidence`` to
    :func:`hermetic.client.connect` with ``protocol_name=XX`` to call another enclave
    service as an attested peer (``examples/keyreader`` does, with no client connected).
    """

    nsm: BoundNSM
    config: RuntimeConfig | None
    cid: int
    ports: tuple[int, ...]
    kms: EnclaveKMSClient | None = None
    evidence: MakeEvidence | None = None


def _log_start_failure(task: asyncio.Task[object]) -> None:
    """Say on the console why the on_ready hook failed (and mark the exception retrieved)."""
    if task.cancelled():
        return
    exc = task.exception()
    if isinstance(exc, HermeticError):
        log.error("app did not start: %s: %s", type(exc).__name__, exc)
    elif exc is not None:
        log.error("app did not start: %s", type(exc).__name__)


class App:
    """A set of named async methods plus, once booted, the enclave context."""

    def __init__(self) -> None:
        self._methods: dict[str, Callable[..., Awaitable[Any]]] = {}
        self._idempotent: set[str] = set()
        self._message_limits: dict[int, int] = {}
        self._session_limits: dict[int, int] = {}
        self._open_sessions: dict[int, int] = {}
        self._context: EnclaveContext | None = None
        self._on_ready: Callable[[], Awaitable[object]] | None = None
        self._started: asyncio.Task[object] | None = None
        self._xx_ports: dict[int, Callable[[EnclaveContext], VerifyEvidence]] = {}
        # The verified peer of the session a call came on (None on an NX port); one
        # variable per App, set by the runtime for the tasks of one session.
        self._session: contextvars.ContextVar[SessionInfo | None] = contextvars.ContextVar(
            f"hermetic-session-{id(self)}", default=None
        )

    def method(self, name: str, *, idempotent: bool = False) -> Callable[[HandlerT], HandlerT]:
        """Register the decorated ``async def`` as the handler of ``name``.

        ``idempotent=True`` declares that running it twice with the same argument has the
        effect of running it once, so a caller (the gateway) may send it again to another
        instance when the one running it dies mid-request; without it, such a request
        fails instead of perhaps running twice. Names starting ``hermetic.`` are the
        runtime's (:data:`RUNTIME_METHODS`).
        """
        if not isinstance(name, str) or not name:
            raise UsageError(f"method name: expected non-empty text, got {name!r}")
        if name.startswith(RESERVED_PREFIX):
            raise UsageError(f"method {name!r}: names starting {RESERVED_PREFIX!r} are reserved")

        def register(handler: HandlerT) -> HandlerT:
            if name in self._methods:
                raise UsageError(f"method {name!r}: registered twice")
            self._methods[name] = handler
            if idempotent:
                self._idempotent.add(name)
            return handler

        return register

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(sorted(self._methods))

    @property
    def idempotent_methods(self) -> tuple[str, ...]:
        """The methods registered with ``idempotent=True``."""
        return tuple(sorted(self._idempotent))

    def describe_methods(self) -> dict[str, list[str]]:
        """What the runtime answers to ``hermetic.methods``: every method, and which are
        idempotent."""
        return {"methods": list(self.methods), "idempotent": list(self.idempotent_methods)}

    def xx_port(
        self, port: int
    ) -> Callable[
        [Callable[[EnclaveContext], VerifyEvidence]], Callable[[EnclaveContext], VerifyEvidence]
    ]:
        """Serve ``port`` (one of the manifest's) with Noise XX: the caller must attest
        itself too, and the decorated function, given the booted context, returns the
        verifier of the caller's evidence bundle (e.g. :func:`hermetic.client.verify_evidence`
        against a trust file in the config). Calls on that port see the verified peer as
        :attr:`peer`. The runtime refuses to start if the port is not in the manifest or
        the function raises.

        Why per port and not per method: the Noise pattern is fixed by the responder before
        the first message, so a port is either anonymous-client NX or mutually attested XX.
        """
        if isinstance(port, bool) or not isinstance(port, int):
            raise UsageError(f"xx_port: expected a port number, got {port!r}")

        def register(
            make: Callable[[EnclaveContext], VerifyEvidence],
        ) -> Callable[[EnclaveContext], VerifyEvidence]:
            if port in self._xx_ports:
                raise UsageError(f"xx_port {port}: registered twice")
            self._xx_ports[port] = make
            return make

        return register

    def limit_messages(self, port: int, max_size: int) -> None:
        """Sessions accepted on ``port`` from now on take application messages of at most
        ``max_size`` bytes either way (the channel's default is 16 MiB); a peer that sends
        a larger one has its session closed before the message is reassembled. A service
        whose requests are small keeps what one client can make it hold small."""
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 65536:
            raise UsageError(f"limit_messages: expected at least 65536 bytes, got {max_size!r}")
        self._message_limits[port] = max_size

    def message_limit(self, port: int) -> int | None:
        """The limit set with :meth:`limit_messages`, or None for the channel's default."""
        return self._message_limits.get(port)

    def limit_sessions(self, port: int, max_sessions: int) -> None:
        """At most ``max_sessions`` sessions open at once on ``port``: a connection beyond
        that is closed as it arrives, before any handshake, so it costs no attestation
        document and holds no session state. Without a limit, what an anonymous client can
        make the enclave hold grows with the connections it opens."""
        if isinstance(max_sessions, bool) or not isinstance(max_sessions, int) or max_sessions < 1:
            raise UsageError(f"limit_sessions: expected at least 1 session, got {max_sessions!r}")
        self._session_limits[port] = max_sessions

    def session_limit(self, port: int) -> int | None:
        """The limit set with :meth:`limit_sessions`, or None (no limit)."""
        return self._session_limits.get(port)

    def open_sessions(self, port: int) -> int:
        """Sessions the runtime is serving on ``port`` now (handshakes included)."""
        return self._open_sessions.get(port, 0)

    def admit_session(self, port: int) -> bool:
        """Count one more session on ``port`` if its limit allows; the runtime calls this
        for each connection and :meth:`end_session` when it is done."""
        limit = self._session_limits.get(port)
        count = self._open_sessions.get(port, 0)
        if limit is not None and count >= limit:
            return False
        self._open_sessions[port] = count + 1
        return True

    def end_session(self, port: int) -> None:
        self._open_sessions[port] = max(0, self._open_sessions.get(port, 0) - 1)

    @property
    def xx_ports(self) -> dict[int, Callable[[EnclaveContext], VerifyEvidence]]:
        return dict(self._xx_ports)

    @property
    def peer(self) -> object | None:
        """The verified peer of the current call's session (what the port's verifier
        returned), or None for a call over an NX port (an anonymous client)."""
        session = self._session.get()
        return session.peer if session is not None else None

    @property
    def session(self) -> SessionInfo | None:
        """The session of the current call (port, handshake hash, verified peer), or None
        outside a call (an on_ready hook, a test calling :meth:`call` directly)."""
        return self._session.get()

    @contextmanager
    def serving_session(self, session: SessionInfo) -> Iterator[None]:
        """Used by the runtime around one session's RPC loop: its calls see ``session``."""
        token = self._session.set(session)
        try:
            yield
        finally:
            self._session.reset(token)

    @contextmanager
    def serving_peer(self, peer: object) -> Iterator[None]:
        """Calls in this block see ``peer`` (an XX session with no port or hash known)."""
        with self.serving_session(SessionInfo(0, b"", peer)):
            yield

    @property
    def context(self) -> EnclaveContext:
        """The enclave context; only available once the runtime has booted the app."""
        if self._context is None:
            raise LauncherError("app context: expected a booted enclave runtime, got none")
        return self._context

    def bind(self, context: EnclaveContext) -> None:
        """Called once by the runtime at boot."""
        if self._context is not None:
            raise LauncherError("app context: already bound")
        self._context = context

    def on_ready(self, hook: StartT) -> StartT:
        """Register the decorated ``async def`` to run once the service is ready.

        The runtime starts it as a task after it told the parent the enclave is ready,
        because only then can the parent start the proxy, and with it the egress: a hook
        that reaches KMS or the record store (``services/persistence`` obtains its root key
        this way) must wait for the egress to come up. Methods get its result, or its
        failure, with :meth:`started`.
        """
        if self._on_ready is not None:
            raise UsageError("on_ready: registered twice")
        self._on_ready = hook
        return hook

    def start(self) -> None:
        """Called once by the runtime when the service is ready: start the on_ready hook."""
        if self._on_ready is not None and self._started is None:
            self._started = asyncio.ensure_future(self._on_ready())
            self._started.add_done_callback(_log_start_failure)

    @property
    def start_state(self) -> str:
        """``none`` (no hook), ``starting``, ``ready`` or ``failed``."""
        if self._on_ready is None:
            return "none"
        task = self._started
        if task is None or not task.done():
            return "starting"
        return "failed" if task.cancelled() or task.exception() is not None else "ready"

    async def started(self, timeout: float) -> object:
        """The on_ready hook's result, waiting at most ``timeout`` seconds for it.

        ServiceError (code ``Unavailable``) while it still runs after ``timeout`` or when
        it failed; the failure's type and message say why (hermetic errors carry no secret).
        """
        task = self._started
        if task is None:
            raise ServiceError("service: not started (no on_ready hook running)", "Unavailable")
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            raise ServiceError(
                f"service: still starting after {timeout:g} s", "Unavailable"
            ) from None
        except HermeticError as exc:
            raise ServiceError(
                f"service: did not start: {type(exc).__name__}: {exc}", "Unavailable"
            ) from None
        except Exception as exc:  # a bug in the hook: its type only, the text may hold data
            raise ServiceError(
                f"service: did not start: {type(exc).__name__}", "Unavailable"
            ) from None

    async def stop(self) -> None:
        """Cancel the on_ready hook if it still runs (the runtime calls this at shutdown)."""
        task = self._started
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def call(self, method: str, args: tuple[Any, ...]) -> Any:
        """Run ``method`` with positional ``args``; unknown methods raise ServiceError."""
        handler = self._methods.get(method)
        if handler is None:
            raise ServiceError(f"method: no method named {method!r}", code="UnknownMethod")
        return await handler(*args)
