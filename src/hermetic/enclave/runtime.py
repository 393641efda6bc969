"""The enclave side of boot: from a started process to a served app.

This is PID-1-ish code of an enclave (real or emulated): it reads the app's manifest from
the (measured) image, opens the NSM, fetches and verifies the runtime config (and receives
the release endorsement) from the parent, imports the app, listens on the manifest's vsock
ports and tells the parent it is ready. Every service port speaks only the attested channel
(``hermetic.client.serve_attested``: Noise handshake, evidence bundle, then RPC): there is
no plaintext service port, so the parent and its proxy only ever relay ciphertext. A port
the app declares with :meth:`App.xx_port <hermetic.enclave.app.App.xx_port>` speaks Noise
XX instead: the caller attests itself too, and the app's calls see the verified peer.

When the verified config has a ``kms`` section, the runtime also takes the AWS
credentials the parent forwarded at boot and gives the app a ready KMS client
(``app.context.kms``) whose traffic leaves through the proxy's egress
(:mod:`hermetic.enclave.kmsaccess`); without credentials such an enclave refuses to start.

An app's ``on_ready`` hook (:meth:`App.on_ready <hermetic.enclave.app.App.on_ready>`)
starts once the parent was told the enclave is ready, since the proxy, and with it the
egress to KMS or a record store, can only start after that; it is cancelled at shutdown.

If anything a relying party depends on is wrong (unsigned or tampered config, an
endorsement that cannot be sent, a manifest that does not load, an entry point that is not
an :class:`App`) it refuses to start and says why, on the config channel and on its
console.

Nothing here reads the environment except through the pieces that must (the NSM client's
``HERMETIC_NSM_SOCKET``, the vsock emulation's ``HERMETIC_VSOCK_*``), so the launcher can
hand the process an otherwise empty environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from hermetic.channel import aio
from hermetic.channel.noise import NX, XX, StaticKeypair
from hermetic.channel.session import MakeEvidence, VerifyEvidence
from hermetic.client.server import dispatch_handlers
from hermetic.enclave import boot
from hermetic.enclave.app import (
    METHODS_METHOD,
    App,
    BoundNSM,
    EnclaveContext,
    RuntimeConfig,
    SessionInfo,
)
from hermetic.enclave.config import verify_bundle
from hermetic.enclave.kmsaccess import EnclaveKMS, KMSSettings, start_kms
from hermetic.enclave.manifest import Manifest, load_manifest
from hermetic.errors import EnclaveBootError, FrameFormatError, HermeticError, RuntimeConfigError
from hermetic.evidence import EvidenceBundle, make_evidence_provider
from hermetic.kms.client import KMSCredentials
from hermetic.nsm.client import NSMClient
from hermetic.translog.release import Endorsement
from hermetic.transport import vsock
from hermetic.transport.frames import read_frame, write_frame

log = logging.getLogger("hermetic.enclave")


@dataclass(frozen=True)
class BootDelivery:
    """What the parent hands the enclave at boot, checked (config) or well-formed (endorsement)."""

    config: RuntimeConfig | None
    endorsement: Endorsement | None
    credentials: KMSCredentials | None = None
    kms: KMSSettings | None = None

    def __repr__(self) -> str:  # the credentials stay out of any log line
        return f"BootDelivery(config={self.config!r}, kms={self.kms!r})"


def parse_endorsement(data: bytes) -> Endorsement | None:
    """The endorsement frame: empty means none; otherwise it must fit in an evidence bundle.

    The enclave does not verify it (its clients do, against their own trust file); it only
    refuses one it could never send, so the operator learns at boot rather than every client
    at every handshake.
    """
    if not data:
        return None
    try:
        endorsement = Endorsement.loads(data)
        EvidenceBundle(b"\x00", None, endorsement).encode()
    except HermeticError as exc:
        raise EnclaveBootError(f"endorsement: {type(exc).__name__}: {exc}") from None
    return endorsement


async def fetch_config(manifest: Manifest) -> BootDelivery:
    """Get the config bundle and the endorsement from the parent, report the verdict back."""
    stream = await vsock.connect(vsock.PARENT_CID, boot.CONFIG_PORT)
    try:
        bundle = await read_frame(stream.reader)
        endorsement_frame = await read_frame(stream.reader)
        credentials_frame = await read_frame(stream.reader)
        if bundle is None or endorsement_frame is None or credentials_frame is None:
            raise EnclaveBootError(
                "config channel: parent closed it before sending the config, endorsement "
                "and credentials"
            )
        try:
            config = verify_bundle(bundle, manifest.operator_key) if bundle else None
            endorsement = parse_endorsement(endorsement_frame)
            credentials = boot.decode_credentials(credentials_frame)
            kms = KMSSettings.from_config(config.values) if config else None
            if kms is not None and credentials is None:
                raise EnclaveBootError(
                    "config kms: KMS is configured but the parent forwarded no AWS "
                    "credentials (run or proxy with --aws-credentials-env)"
                )
        except (RuntimeConfigError, EnclaveBootError, FrameFormatError) as exc:
            status = boot.BootStatus(False, f"{type(exc).__name__}: {exc}", None)
            await write_frame(stream.writer, boot.encode_status(status))
            raise
        digest = config.digest if config else None
        reason = "config verified" if config else "no config delivered"
        reason += "; endorsement received" if endorsement else "; no endorsement delivered"
        if kms is not None:
            reason += f"; KMS {kms.scheme}://{kms.endpoint} through egress"
        await write_frame(stream.writer, boot.encode_status(boot.BootStatus(True, reason, digest)))
        return BootDelivery(config, endorsement, credentials, kms)
    finally:
        await stream.aclose()


async def report_refusal(reason: str) -> None:
    """Best effort: tell the parent why we refuse when the failure came before config."""
    with contextlib.suppress(HermeticError, OSError):
        stream = await vsock.connect(vsock.PARENT_CID, boot.CONFIG_PORT, timeout=2)
        await read_frame(stream.reader)
        await write_frame(stream.writer, boot.encode_status(boot.BootStatus(False, reason, None)))
        await stream.aclose()


def load_app(manifest: Manifest) -> App:
    module = importlib.import_module(manifest.entry_module)
    target: object = module
    for part in manifest.entry_attribute.split("."):
        target = getattr(target, part, None)
    if not isinstance(target, App):
        raise EnclaveBootError(
            f"entry {manifest.entry!r}: expected a hermetic.enclave.App, "
            f"got {type(target).__name__}"
        )
    return target


def peer_verifiers(
    app: App, context: EnclaveContext, manifest: Manifest
) -> dict[int, VerifyEvidence]:
    """The verifier of each port the app serves with XX (:meth:`App.xx_port`)."""
    verifiers = {}
    for port, make in app.xx_ports.items():
        if port not in manifest.ports:
            raise EnclaveBootError(
                f"app xx_port {port}: expected one of the manifest's ports {list(manifest.ports)}"
            )
        verifiers[port] = make(context)
    return verifiers


async def serve_session(
    app: App,
    port: int,
    stream: vsock.VsockStream,
    provider: MakeEvidence,
    handlers: Mapping[str, aio.Handler],
    static: StaticKeypair,
    verify: VerifyEvidence | None = None,
) -> None:
    """One attested session on ``port``: NX, or XX when ``verify`` checks the caller.

    The same steps as :func:`hermetic.client.serve_attested` (handshake, our evidence, in
    XX the peer's evidence checked by ``verify``, RPC until the peer leaves), with the RPC
    loop run under :meth:`App.serving_session`, so each call knows its port, its session's
    handshake hash and (XX) who is asking. A connection over the port's session limit
    (:meth:`App.limit_sessions`) is closed at once.
    """
    if not app.admit_session(port):
        # Closed before the handshake: no NSM document is made for it (App.limit_sessions).
        log.warning(
            "session refused on port %s: %s sessions open, the limit", port, app.open_sessions(port)
        )
        stream.writer.close()
        return
    try:
        await _serve_admitted(app, port, stream, provider, handlers, static, verify)
    finally:
        app.end_session(port)


async def _serve_admitted(
    app: App,
    port: int,
    stream: vsock.VsockStream,
    provider: MakeEvidence,
    handlers: Mapping[str, aio.Handler],
    static: StaticKeypair,
    verify: VerifyEvidence | None,
) -> None:
    pipe = aio.StreamPipe(stream.reader, stream.writer)
    protocol = XX if verify is not None else NX
    try:
        limit = app.message_limit(port)
        channel = await aio.accept(
            pipe, static, provider, protocol_name=protocol, verify_evidence=verify,
            **({"max_message_size": limit} if limit is not None else {}),
        )  # fmt: skip
        session = SessionInfo(port, channel.handshake_hash, channel.peer_info)
        with app.serving_session(session):
            await aio.serve_rpc(channel, handlers)
        await channel.close()
    except HermeticError as exc:
        log.info("attested %s session ended: %s: %s", protocol[6:8], type(exc).__name__, exc)
        with contextlib.suppress(HermeticError):
            await pipe.aclose()
    finally:
        stream.writer.close()


async def run(app_dir: Path) -> int:
    """Boot and serve until SIGTERM; return the process exit status."""
    try:
        manifest = load_manifest(app_dir)
    except HermeticError as exc:
        log.error("refusing to start: %s", exc)
        await report_refusal(f"{type(exc).__name__}: {exc}")
        return boot.EXIT_REFUSED
    try:
        delivered = await fetch_config(manifest)
    except HermeticError as exc:
        log.error("refusing to start: %s", exc)
        return boot.EXIT_REFUSED
    try:
        app = load_app(manifest)
        nsm = NSMClient.open()
    except HermeticError as exc:
        log.error("refusing to start: %s", exc)
        return boot.EXIT_REFUSED
    config = delivered.config
    digest = config.digest if config else None
    cid = vsock.local_cid()
    kms: EnclaveKMS | None = None
    if delivered.kms is not None and delivered.credentials is not None:
        try:
            # The KMS client gets its own NSM connection: it attests from worker threads
            # while the evidence provider attests on this loop.
            kms = start_kms(delivered.kms, delivered.credentials, NSMClient.open())
        except HermeticError as exc:
            log.error("refusing to start: %s", exc)
            return boot.EXIT_REFUSED
    # One Noise static key per boot; every handshake gets a fresh NSM document binding it
    # (public_key) to that session (nonce = handshake hash). The provider needs the raw NSM
    # client: evidence documents carry hermetic's user_data layout, not the app's.
    static = StaticKeypair.generate()
    provider = make_evidence_provider(nsm, delivered.endorsement, digest)
    context = EnclaveContext(
        BoundNSM(nsm, digest),
        config,
        cid,
        manifest.ports,
        kms.client if kms else None,
        evidence=provider,
    )
    app.bind(context)
    handlers = dispatch_handlers(app.call, app.methods)

    async def describe_methods(_: object) -> dict[str, list[str]]:
        return app.describe_methods()

    handlers[METHODS_METHOD] = describe_methods
    try:
        verifiers = peer_verifiers(app, context, manifest)
    except HermeticError as exc:
        log.error("refusing to start: %s", exc)
        return boot.EXIT_REFUSED

    def on_stream(port: int) -> Callable[[vsock.VsockStream], Awaitable[None]]:
        async def serve(stream: vsock.VsockStream) -> None:
            await serve_session(app, port, stream, provider, handlers, static, verifiers.get(port))

        return serve

    listeners = [await vsock.listen(cid, port, on_stream(port)) for port in manifest.ports]
    ready = await vsock.connect(vsock.PARENT_CID, boot.READY_PORT)
    ready.writer.write(boot.READY_BYTE)
    await ready.writer.drain()
    await ready.aclose()
    log.info(
        "%s %s ready on vsock %s ports %s", manifest.name, manifest.version, cid, manifest.ports
    )
    app.start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await app.stop()
    for listener in listeners:
        await listener.aclose()
    if kms is not None:
        kms.close()
    nsm.close()
    return 0


def main(app_dir: str) -> int:
    """Process entry point used by the launcher's boot stage (see ``launcher.sandbox``)."""
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s enclave %(levelname)s %(message)s",
    )
    return asyncio.run(run(Path(app_dir)))
