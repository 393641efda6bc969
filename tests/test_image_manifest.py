"""The app manifest (hermetic.toml): strict fields with messages that name what is wrong."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from hermetic.enclave.manifest import EgressRule, Manifest, load_manifest, parse_manifest
from hermetic.errors import ManifestError

ECHO = Path(__file__).resolve().parents[1] / "examples" / "echo"

GOOD = """
name = "svc"
version = "1.2.3"
entry = "pkg.module:app"
cpus = 2
memory_mib = 512
ports = [5000, 5001]
egress = ["kms.us-east-1.amazonaws.com:443", "[2001:db8::1]:8443"]
metrics = ["requests_total", "latency_seconds"]
operator_key = "keys/operator.pem"
"""


def _pem(key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture
def appdir(tmp_path: Path) -> Path:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "operator.pem").write_bytes(_pem(ed25519.Ed25519PrivateKey.generate()))
    (tmp_path / "hermetic.toml").write_text(GOOD)
    return tmp_path


def _with(appdir: Path, old: str, new: str) -> Manifest:
    text = GOOD.replace(old, new)
    assert text != GOOD or old == new
    (appdir / "hermetic.toml").write_text(text)
    return load_manifest(appdir)


def test_echo_example_manifest_loads() -> None:
    m = load_manifest(ECHO)
    assert (m.name, m.version, m.entry, m.cpus, m.memory_mib) == (
        "echo",
        "0.1.0",
        "echo_service:app",
        2,
        512,
    )
    assert m.ports == (5000,)
    assert m.service_port == 5000
    assert m.egress == ()
    assert m.operator_key_file == "operator.pub.pem"
    assert isinstance(m.operator_public_key(), ed25519.Ed25519PublicKey)


def test_echo_example_commits_no_private_key() -> None:
    for path in ECHO.rglob("*"):
        if path.is_file():
            assert b"PRIVATE KEY" not in path.read_bytes(), path


def test_full_manifest_values(appdir: Path) -> None:
    m = load_manifest(appdir)
    assert m.egress == (
        EgressRule("kms.us-east-1.amazonaws.com", 443),
        EgressRule("2001:db8::1", 8443),
    )
    assert [str(r) for r in m.egress] == ["kms.us-east-1.amazonaws.com:443", "[2001:db8::1]:8443"]
    assert (m.entry_module, m.entry_attribute) == ("pkg.module", "app")
    assert m.summary()["ports"] == [5000, 5001]


@pytest.mark.parametrize(
    "field", ["name", "version", "entry", "cpus", "memory_mib", "ports", "operator_key"]
)
def test_missing_required_field_is_named(appdir: Path, field: str) -> None:
    lines = [line for line in GOOD.splitlines() if not line.startswith(f"{field} ")]
    (appdir / "hermetic.toml").write_text("\n".join(lines))
    with pytest.raises(ManifestError, match=f"missing required field '{field}'"):
        load_manifest(appdir)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("cpus = 2", 'cpus = "2"', "'cpus' must be an integer, got str"),
        ("cpus = 2", "cpus = true", "'cpus' must be an integer, got bool"),
        ("cpus = 2", "cpus = 0", r"'cpus' must be in 1\.\.256, got 0"),
        ("memory_mib = 512", "memory_mib = 16", "'memory_mib' must be in 64"),
        ('name = "svc"', 'name = "Bad Name"', "'name' must be lowercase"),
        ('name = "svc"', "name = 3", "'name' must be a string, got int"),
        ('entry = "pkg.module:app"', 'entry = "pkg.module"', "'entry' must be 'module:callable'"),
        ("ports = [5000, 5001]", "ports = 5000", "'ports' must be a list"),
        ("ports = [5000, 5001]", "ports = []", "at least the service port"),
        ("ports = [5000, 5001]", "ports = [0]", r"ports\[0\] must be a vsock port .* got 0"),
        ("ports = [5000, 5001]", "ports = [5000, 4294967295]", r"ports\[1\] must be a vsock port"),
        ("ports = [5000, 5001]", 'ports = ["5000"]', r"ports\[0\] must be an integer, got str"),
        ("ports = [5000, 5001]", "ports = [5000, 5000]", r"ports\[1\] repeats port 5000"),
        ('"[2001:db8::1]:8443"', '"example.com"', r"egress\[1\] must be 'host:port'"),
        ('"[2001:db8::1]:8443"', '"example.com:70000"', r"egress\[1\] port must be in 1\.\.65535"),
        ('"[2001:db8::1]:8443"', '"bad_host:443"', r"egress\[1\] has a bad host name"),
        ('"[2001:db8::1]:8443"', '"[zz::1]:443"', r"egress\[1\] has a bad IPv6"),
        ('"latency_seconds"', '"latency-seconds"', r"metrics\[1\] must be a Prometheus"),
        ('"latency_seconds"', '"requests_total"', "declares the same name twice"),
        ('version = "1.2.3"', 'version = "1.2.3"\nprots = [1]', "unknown field 'prots'"),
        ('"keys/operator.pem"', '"../operator.pem"', "must stay inside the app directory"),
        ('"keys/operator.pem"', '"/etc/passwd"', "must stay inside the app directory"),
        ('"keys/operator.pem"', '"keys/missing.pem"', "not a regular file"),
        ('"keys/operator.pem"', "42", "'operator_key' must be a PEM string or a file path"),
        ("cpus = 2", "cpus = = 2", "not valid TOML"),
    ],
)
def test_bad_values_are_rejected_with_precise_messages(
    appdir: Path, old: str, new: str, message: str
) -> None:
    with pytest.raises(ManifestError, match=message):
        _with(appdir, old, new)


def test_operator_key_must_be_ed25519_or_ecdsa(appdir: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    (appdir / "keys" / "operator.pem").write_bytes(_pem(rsa_key))
    with pytest.raises(ManifestError, match="Ed25519 or ECDSA"):
        load_manifest(appdir)
    (appdir / "keys" / "operator.pem").write_bytes(b"not a key")
    with pytest.raises(ManifestError, match="not a PEM public key"):
        load_manifest(appdir)
    (appdir / "keys" / "operator.pem").write_bytes(_pem(ec.generate_private_key(ec.SECP384R1())))
    assert isinstance(load_manifest(appdir).operator_public_key(), ec.EllipticCurvePublicKey)


def test_inline_operator_key_pem(appdir: Path) -> None:
    pem = _pem(ed25519.Ed25519PrivateKey.generate()).decode()
    m = _with(appdir, '"keys/operator.pem"', f'"""{pem}"""')
    assert m.operator_key_file is None
    assert m.operator_key.strip() == pem.strip().encode()


def test_operator_key_symlink_is_refused(appdir: Path) -> None:
    (appdir / "keys" / "link.pem").symlink_to(appdir / "keys" / "operator.pem")
    with pytest.raises(ManifestError, match="not a regular file"):
        _with(appdir, '"keys/operator.pem"', '"keys/link.pem"')


def test_dependencies_wheels_and_lock(appdir: Path) -> None:
    (appdir / "wheels").mkdir()
    wheel = "wheels/attrs-24.2.0-py3-none-any.whl"
    (appdir / wheel).write_bytes(b"PK")
    m = _with(appdir, 'version = "1.2.3"', f'version = "1.2.3"\ndependencies = ["{wheel}"]')
    assert m.dependencies == (wheel,)
    (appdir / "requirements.lock").write_text("attrs==24.2.0 --hash=sha256:00\n")
    m = _with(appdir, 'version = "1.2.3"', 'version = "1.2.3"\ndependencies = "requirements.lock"')
    assert m.dependencies == ("requirements.lock",)
    with pytest.raises(ManifestError, match=r"dependencies\[0\] must be a \.whl"):
        _with(appdir, 'version = "1.2.3"', 'version = "1.2.3"\ndependencies = ["x.tar.gz"]')
    with pytest.raises(ManifestError, match="not a file in the app"):
        _with(
            appdir,
            'version = "1.2.3"',
            'version = "1.2.3"\ndependencies = ["a-1-py3-none-any.whl"]',
        )


def test_missing_manifest_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"no hermetic\.toml"):
        load_manifest(tmp_path)


def test_manifest_error_is_exit_2() -> None:
    assert ManifestError("x").exit_code == 2


class _NoFiles:
    def is_file(self, relative: str) -> bool:
        return False

    def read(self, relative: str, limit: int) -> bytes:
        raise ManifestError(f"{relative!r} missing")


_VALUES = st.one_of(
    st.integers(-(2**40), 2**40),
    st.text(max_size=20),
    st.booleans(),
    st.lists(st.one_of(st.integers(-5, 70000), st.text(max_size=12)), max_size=4),
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "name",
                "version",
                "entry",
                "cpus",
                "memory_mib",
                "ports",
                "egress",
                "metrics",
                "operator_key",
                "dependencies",
                "other",
            ]
        ),
        _VALUES,
    )
)
def test_arbitrary_field_values_raise_only_manifest_errors(fields: dict[str, object]) -> None:
    import json

    # TOML accepts JSON-ish inline values for these types; tomllib then sees them as typed.
    lines = [f"{key} = {json.dumps(value)}" for key, value in fields.items()]
    with contextlib.suppress(ManifestError):
        parse_manifest("\n".join(lines), _NoFiles())


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_raise_only_manifest_errors(data: bytes) -> None:
    with contextlib.suppress(ManifestError):
        parse_manifest(data, _NoFiles())


def test_copy_of_echo_with_own_operator_key_changes_only_the_key(tmp_path: Path) -> None:
    app = tmp_path / "echo"
    shutil.copytree(ECHO, app)
    (app / "operator.pub.pem").write_bytes(_pem(ed25519.Ed25519PrivateKey.generate()))
    assert load_manifest(app).operator_key != load_manifest(ECHO).operator_key
