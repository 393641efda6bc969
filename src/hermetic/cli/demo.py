"""``hermetic demo``: the trust core end to end, on embedded defaults, with real parts.

Every step runs the same ``hermetic`` command a user would type (printed before it runs),
against real local servers started here: the transparency log (SQLite), a witness, the
emulated Nitro launcher and service proxy, the local KMS and the parent's record store.
Nothing is mocked; the only emulated part is the Nitro hardware itself (the dev PKI stands
in for AWS's root). The few steps that have no command of their own (a tenant admin's
signed requests, logging the persistence service's access policy) run in this process
with the library calls a client would make, and say so (``>>>`` instead of ``$``).

It stops at the first failed step with that step's error, so a newcomer sees exactly
which check failed and why, and stops everything it started (enclaves, servers, the
temporary directory) on success, failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from hermetic.errors import HermeticError, UsageError

LOG_ORIGIN = "demo.hermetic.local/log"


class DemoStepError(HermeticError):
    """A step of the demo failed; the message names the step and its output."""


@dataclass
class Demo:
    """The demo's working directory, environment and the servers it started."""

    work: Path
    env: dict[str, str]
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)
    enclaves: list[str] = field(default_factory=list)

    def run(
        self,
        title: str,
        args: Sequence[str],
        *,
        show: int = 12,
        expect_failure: bool = False,
        tool: str = "hermetic",
        env: dict[str, str] | None = None,
    ) -> str:
        """Run ``hermetic ARGS`` (or another ``tool`` from this environment) and print it.

        The command and (the start of) its output are printed. With ``expect_failure`` the
        step passes only if the command is *rejected* (a non-zero exit that is not a crash).
        """
        shown_env = "".join(f"{k}={v} " for k, v in (env or {}).items() if "SECRET" not in k)
        click.secho(f"\n$ {shown_env}{tool} {shlex.join(args)}", fg="cyan")
        if tool == "hermetic":
            argv = [sys.executable, "-m", "hermetic", *args]
        else:
            argv = [str(Path(sys.executable).parent / tool), *args]
        result = subprocess.run(
            argv,
            env={**self.env, **(env or {})},
            cwd=self.work,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        output = (result.stdout + result.stderr).rstrip()
        lines = output.splitlines()
        for line in lines[:show]:
            click.echo(f"  {line}")
        if len(lines) > show:
            click.echo(f"  ... ({len(lines) - show} more lines)")
        if expect_failure:
            if result.returncode not in (1, 254, 255):  # hermetic: 1; the AWS CLI: 254/255
                raise DemoStepError(f"{title}: expected a rejection, got exit {result.returncode}")
            click.secho("  -> rejected, as it must be", fg="green")
        elif result.returncode != 0:
            raise DemoStepError(f"{title}: '{tool} {shlex.join(args)}' exited {result.returncode}")
        return result.stdout

    def start(self, title: str, args: Sequence[str], port: int) -> None:
        """Start a long-running ``hermetic`` server and wait until its port accepts."""
        proc, log = self._spawn(title, args)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise DemoStepError(f"{title}: server exited {proc.returncode}; see {log}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                click.echo(f"  {title} listening on 127.0.0.1:{port}")
                return
            time.sleep(0.1)
        raise DemoStepError(f"{title}: did not listen on port {port} within 60 s")

    def start_background(self, title: str, args: Sequence[str]) -> None:
        """Start a long-running ``hermetic`` process that listens on no port."""
        proc, log = self._spawn(title, args)
        time.sleep(0.5)
        if proc.poll() is not None:
            raise DemoStepError(f"{title}: exited {proc.returncode}; see {log}")
        click.echo(f"  {title} running (log: {log})")

    def start_service(
        self,
        title: str,
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        timeout: float = 120.0,
    ) -> dict[str, Any]:
        """Start a long-running ``hermetic`` command that prints one JSON document once it
        serves (``up``: the enclave, its addresses, its release); that document."""
        out = self.log_path(title).with_suffix(".json")
        proc, log = self._spawn(title, args, env=env, stdout=out)
        deadline = time.monotonic() + timeout
        while True:
            text = out.read_text() if out.exists() else ""
            with contextlib.suppress(ValueError):
                document = json.loads(text)
                if isinstance(document, dict):
                    return document
            if proc.poll() is not None:
                raise DemoStepError(
                    f"{title}: exited {proc.returncode} before serving:\n{_tail(log)}"
                )
            if time.monotonic() > deadline:
                raise DemoStepError(f"{title}: not serving within {timeout:.0f} s; see {log}")
            time.sleep(0.1)

    def log_path(self, title: str) -> Path:
        """Where the output of the server started as ``title`` goes."""
        return self.work / f"{title.replace(' ', '-')}.log"

    def _spawn(
        self,
        title: str,
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        stdout: Path | None = None,
    ) -> tuple[subprocess.Popen[bytes], Path]:
        """Start ``hermetic ARGS`` in its own session, its output in ``TITLE.log`` (its
        stdout in ``stdout``, if given)."""
        shown_env = "".join(f"{k}={v} " for k, v in (env or {}).items() if "SECRET" not in k)
        click.secho(f"\n$ {shown_env}hermetic {shlex.join(args)} &", fg="cyan")
        log = self.log_path(title)
        with contextlib.ExitStack() as files:
            err = files.enter_context(log.open("wb"))
            out = files.enter_context(stdout.open("wb")) if stdout is not None else err
            proc = subprocess.Popen(
                [sys.executable, "-m", "hermetic", *args],
                env={**self.env, **(env or {})},
                cwd=self.work,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        self.started.append(proc)
        return proc, log

    def stop_all(self) -> None:
        """Stop the enclaves, then every server in reverse order of starting: SIGTERM to
        the server itself (``up`` then stops its enclave as ``stop`` would), SIGKILL to
        its whole process group after 20 s or once it is gone (nothing it started may
        outlive it)."""
        for enclave_id in self.enclaves:
            subprocess.run(
                [sys.executable, "-m", "hermetic", "stop", enclave_id],
                env=self.env,
                capture_output=True,
                timeout=60,
                check=False,
            )
        for proc in reversed(self.started):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=20)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


def _tail(path: Path, lines: int = 12) -> str:
    """The last lines of a server's log, indented, for an error message."""
    try:
        text = path.read_text(errors="replace").rstrip().splitlines()
    except OSError:
        return f"  (no log at {path})"
    return "\n".join(f"  {line}" for line in text[-lines:])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def find_example(name: str, folder: str = "examples") -> Path:
    """``FOLDER/NAME`` (an app directory: ``examples/echo``, ``services/persistence``) from
    the working directory or the source checkout."""
    candidates = [
        Path.cwd() / folder / name,
        Path(__file__).resolve().parents[3] / folder / name,
    ]
    for candidate in candidates:
        if (candidate / "hermetic.toml").is_file():
            return candidate
    raise UsageError(f"{folder}/{name} not found (looked in {', '.join(map(str, candidates))})")


def heading(number: int, text: str) -> None:
    click.secho(f"\n== {number}. {text}", bold=True)


def steps(demo: Demo) -> None:
    work = demo.work
    echo_app = find_example("echo")

    heading(1, "Build a reproducible image of the echo service and measure it")
    demo.run("build", ["build", str(echo_app), "-o", "echo.img"])
    measured = json.loads(demo.run("measure", ["image", "measure", "echo.img", "--json"], show=0))
    click.echo(f"  PCR0 {measured['PCR0']}")

    heading(2, "Start a transparency log and a witness; publish the release to the log")
    log_vkey = demo.run("log key", ["log", "key", "--out", "log.key", "--name", LOG_ORIGIN])
    log_vkey = log_vkey.strip()
    witness_vkey = demo.run("witness key", ["log", "witness-key", "--out", "witness.key"]).strip()
    log_port = free_port()
    log_url = f"http://127.0.0.1:{log_port}"
    demo.start(
        "transparency log",
        [
            "log",
            "serve",
            "--db",
            "log.db",
            "--key",
            "log.key",
            "--witness",
            witness_vkey,
            "--listen",
            f"127.0.0.1:{log_port}",
        ],
        log_port,
    )
    publisher_pem = demo.run("publisher key", ["release", "key", "--out", "publisher.key"])
    (work / "publisher.pub.pem").write_text(publisher_pem)
    demo.run(
        "trust file",
        [
            "release",
            "trust",
            "--log-key",
            log_vkey,
            "--witness",
            witness_vkey,
            "--threshold",
            "1",
            "--publisher",
            "demo-publisher=publisher.pub.pem",
            "--nitro-root",
            "dev",
            "--out",
            "trust.json",
        ],
    )
    # The witness cosigns in the background while publish waits for a witnessed checkpoint.
    demo.start_background(
        "witness",
        [
            "log",
            "witness",
            "--log",
            log_url,
            "--log-key",
            log_vkey,
            "--key",
            "witness.key",
            "--state",
            "witness.state",
            "--interval",
            "0.5",
        ],
    )
    demo.run(
        "publish",
        [
            "release",
            "publish",
            "echo.img",
            "--key",
            "publisher.key",
            "--log",
            log_url,
            "--trust",
            "trust.json",
            "--source-revision",
            "demo",
            "--out",
            "echo.endorsement.json",
            "--wait",
            "30",
        ],
    )
    demo.run("verify", ["release", "verify", "echo.endorsement.json", "--trust", "trust.json"])

    heading(3, "Run the image in the emulated enclave, behind the parent's service proxy")
    record = json.loads(
        demo.run("run", ["run", "echo.img", "--endorsement", "echo.endorsement.json"], show=0)
    )
    enclave_id = str(record["EnclaveID"])
    demo.enclaves.append(enclave_id)
    click.echo(f"  enclave {enclave_id} {record['State']} on CID {record['EnclaveCID']}")
    demo.run("ps", ["ps"])
    proxy_port = free_port()
    demo.start(
        "service proxy",
        ["proxy", "--enclave", enclave_id, "--listen", f"127.0.0.1:{proxy_port}"],
        proxy_port,
    )

    heading(4, "Connect: verify the attestation, the release and the log proof, then call")
    url = f"tcp://127.0.0.1:{proxy_port}"
    demo.run(
        "connect",
        [
            "connect",
            url,
            "--trust",
            "trust.json",
            "--call",
            "echo",
            "--json-args",
            '"hello from the demo"',
        ],
        show=40,
    )
    click.echo("\n  The same service, under a client policy that accepts only another service:")
    demo.run(
        "connect (rejected)",
        ["connect", url, "--trust", "trust.json", "--service", "payments", "--call", "echo"],
        show=40,
        expect_failure=True,
    )

    kms_port = kms_step(demo, trust_file="trust.json", log_url=log_url)

    from hermetic.cli.demo_persistence import persistence_step

    persistence_step(
        demo, log_url=log_url, log_vkey=log_vkey, witness_vkey=witness_vkey, kms_port=kms_port
    )


ENCLAVE_ROLE = "arn:aws:iam::111122223333:role/enclave"
ADMIN_USER = "arn:aws:iam::111122223333:user/admin"
# The local KMS accepts any SigV4 signature and takes the access key id as the caller
# (docs/kms.md); these are the parent's credentials, forwarded to the enclave at boot.
ENCLAVE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "enclave", "AWS_SECRET_ACCESS_KEY": "demo-secret"}
ADMIN_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "admin",
    "AWS_SECRET_ACCESS_KEY": "demo-admin-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def kms_step(demo: Demo, *, trust_file: str, log_url: str) -> int:
    """Step 5; the local KMS's port (it keeps serving, for step 6)."""
    work = demo.work
    heading(5, "Release a KMS key only to the measured code (examples/vault)")
    kms_port = free_port()
    kms_url = f"http://127.0.0.1:{kms_port}"
    demo.start("local KMS", ["kms", "serve", "--port", str(kms_port), "--db", "kms.db"], kms_port)

    # The operator's own key signs the runtime config; its public half is measured (PCR2).
    vault = work / "vault"
    shutil.copytree(find_example("vault"), vault, dirs_exist_ok=True)
    demo.run(
        "operator key",
        [
            "config",
            "key",
            "--out",
            "operator.key",
            "--public-out",
            "vault/operator.pub.pem",
            "--force",
        ],
        show=0,
    )
    demo.run("build", ["build", "vault", "-o", "vault.img"])
    demo.run(
        "publish",
        [
            "release",
            "publish",
            "vault.img",
            "--key",
            "publisher.key",
            "--log",
            log_url,
            "--trust",
            trust_file,
            "--source-revision",
            "demo",
            "--out",
            "vault.endorsement.json",
            "--wait",
            "30",
        ],
        show=0,
    )
    demo.run(
        "key policy",
        [
            "kms",
            "policy",
            "--release",
            "vault.endorsement.json",
            "--principal",
            ENCLAVE_ROLE,
            "--admin",
            ADMIN_USER,
            "--immutable",
            "--output",
            "vault-key-policy.json",
        ],
    )
    created = demo.run(
        "create key",
        [
            "kms",
            "create-key",
            "--policy",
            "file://vault-key-policy.json",
            "--bypass-policy-lockout-safety-check",
            "--endpoint-url",
            kms_url,
        ],
        tool="aws",
        env=ADMIN_CREDENTIALS,
        show=6,
    )
    key_id = json.loads(created)["KeyMetadata"]["KeyId"]
    config = {
        "kms": {"endpoint": f"127.0.0.1:{kms_port}", "region": "us-east-1", "scheme": "http"},
        "vault": {"key_id": key_id},
    }
    (work / "vault-config.json").write_text(json.dumps(config, indent=2))
    demo.run(
        "sign config",
        ["config", "sign", "vault-config.json", "--key", "operator.key", "-o", "vault.config"],
    )
    record = json.loads(
        demo.run(
            "run",
            [
                "run",
                "vault.img",
                "--endorsement",
                "vault.endorsement.json",
                "--config",
                "vault.config",
                "--aws-credentials-env",
            ],
            env=ENCLAVE_CREDENTIALS,
            show=0,
        )
    )
    enclave_id = str(record["EnclaveID"])
    demo.enclaves.append(enclave_id)
    click.echo(f"  enclave {enclave_id} {record['State']} on CID {record['EnclaveCID']}")
    proxy_port = free_port()
    demo.start(
        "vault proxy",
        [
            "proxy",
            "--enclave",
            enclave_id,
            "--listen",
            f"127.0.0.1:{proxy_port}",
            "--egress-allow",
            f"127.0.0.1:{kms_port}",
        ],
        proxy_port,
    )
    url = f"tcp://127.0.0.1:{proxy_port}"
    sealed = json.loads(
        demo.run(
            "seal",
            [
                "connect",
                url,
                "--trust",
                trust_file,
                "--call",
                "seal",
                "--json-args",
                '"the quarterly numbers"',
                "--json",
            ],
            show=0,
        )
    )["result"]
    click.echo(
        f"  sealed: ciphertext {sealed['ciphertext'][:32]}..., wrapped key "
        f"{sealed['wrapped_key'][:32]}..."
    )
    (work / "sealed.json").write_text(json.dumps(sealed))
    unsealed = demo.run(
        "unseal",
        [
            "connect",
            url,
            "--trust",
            trust_file,
            "--call",
            "unseal",
            "--json-args",
            json.dumps(sealed),
            "--json",
        ],
        show=0,
    )
    click.echo(f"  unsealed inside the enclave: {json.loads(unsealed)['result']!r}")
    wrapped = work / "wrapped-key.bin"
    wrapped.write_bytes(base64.b64decode(sealed["wrapped_key"]))
    for who, credentials in (
        ("The operator, with the key's admin credentials,", ADMIN_CREDENTIALS),
        (
            "The parent instance, with the enclave role's own credentials but no attestation,",
            {**ENCLAVE_CREDENTIALS, "AWS_DEFAULT_REGION": "us-east-1"},
        ),
    ):
        click.echo(f"\n  {who} tries to unwrap the data key:")
        demo.run(
            "decrypt without attestation (rejected)",
            [
                "kms",
                "decrypt",
                "--ciphertext-blob",
                f"fileb://{wrapped.name}",
                "--encryption-context",
                "service=hermetic-vault",
                "--endpoint-url",
                kms_url,
            ],
            tool="aws",
            env=credentials,
            expect_failure=True,
        )
    return kms_port


@contextlib.contextmanager
def demo_workspace(workdir: Path | None) -> Iterator[Path]:
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    with tempfile.TemporaryDirectory(prefix="hermetic-demo-") as tmp:
        yield Path(tmp)


class DemoInterrupted(BaseException):
    """SIGTERM arrived: unwinds the demo like Ctrl-C, so that it stops what it started."""


def _interrupted(signum: int, frame: object) -> None:
    raise DemoInterrupted(f"signal {signum}")


@contextlib.contextmanager
def _state_dir(state: Path) -> Iterator[None]:
    """This process's own state directory is the demo's too, for the steps that run here
    (the dev log, the dev PKI the trust file pins): nothing outside the workspace."""
    before = os.environ.get("HERMETIC_STATE_DIR")
    os.environ["HERMETIC_STATE_DIR"] = str(state)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HERMETIC_STATE_DIR", None)
        else:
            os.environ["HERMETIC_STATE_DIR"] = before


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait while the demo stops what it started (at most a minute or
    so, each stop has a timeout), so a second Ctrl-C cannot leave an enclave running."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@click.command()
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the demo's keys, image, logs and databases here (default: a temp dir).",
)
def demo(workdir: Path | None) -> None:
    """Walk through the trust core end to end with real local servers.

    Build and log a release of examples/echo, run it in the emulated enclave, connect and
    verify it step by step, release a KMS key to it, then keep a tenant's key in the
    persistence service and let examples/keyreader fetch it with no client connected.
    """
    previous = signal.signal(signal.SIGTERM, _interrupted)
    try:
        with demo_workspace(workdir) as work:
            env = dict(os.environ)
            env["HERMETIC_STATE_DIR"] = str(work / "state")
            session = Demo(work=work.resolve(), env=env)
            try:
                with _state_dir(work / "state"):
                    steps(session)
            except (KeyboardInterrupt, DemoInterrupted):
                click.secho("\nInterrupted: stopping what the demo started.", fg="yellow")
                raise click.exceptions.Abort() from None
            finally:
                with _signals_held():
                    session.stop_all()
    finally:
        signal.signal(signal.SIGTERM, previous)
    click.secho("\nDemo complete: every step above was checked, none was skipped.", bold=True)
