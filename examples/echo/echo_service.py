"""The echo service: returns its argument, so clients can test an attested session end to end."""

from __future__ import annotations

from hermetic.enclave import App

app = App()


@app.method("echo")
async def echo(arg: object) -> object:
    """Return the argument unchanged."""
    return arg
