"""The bubblewrap command line, as data: mount order decides what the enclave sees."""

from __future__ import annotations

from pathlib import Path

import pytest

from hermetic.launcher import sandbox


def _spec(tmp_path: Path) -> sandbox.SandboxSpec:
    return sandbox.SandboxSpec(
        image_dir=tmp_path / "image",
        endpoint_dir=tmp_path / "vsock" / "16",
        cid=16,
        boot_module="hermetic.enclave.runtime",
        memory_mib=256,
        cpu_ids=(0,),
        uid=None,
    )


def test_a_runtime_below_tmp_is_bound_after_the_private_tmp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A checkout (and its venv) under /tmp: the enclave's own /tmp must not hide it.
    venv = Path("/tmp/some-checkout/.venv")
    monkeypatch.setattr(sandbox, "python_runtime", lambda: (venv,))
    tools = sandbox.SandboxTools(bwrap="/usr/bin/bwrap", setpriv=None)
    argv = sandbox.command(_spec(tmp_path), tools, seccomp_fd=10, info_fd=11)
    tmpfs = argv.index("--tmpfs")
    assert argv[tmpfs + 1] == "/tmp"
    bound = [i for i, a in enumerate(argv) if a == "--ro-bind" and argv[i + 1] == str(venv)]
    assert bound, argv
    assert bound[0] > tmpfs


def test_the_endpoint_directory_is_read_only_but_for_the_enclaves_own_listeners(
    tmp_path: Path,
) -> None:
    tools = sandbox.SandboxTools(bwrap="/usr/bin/bwrap", setpriv=None)
    spec = _spec(tmp_path)
    argv = sandbox.command(spec, tools, seccomp_fd=10, info_fd=11)
    pairs = list(zip(argv, argv[1:], argv[2:], strict=False))
    inside = "/run/hermetic/vsock/16"
    assert ("--ro-bind", str(spec.endpoint_dir), inside) in pairs
    assert ("--bind", str(spec.endpoint_dir / "enclave"), f"{inside}/enclave") in pairs
    assert not [p for p in pairs if p[0] == "--bind" and p[2] == inside]
