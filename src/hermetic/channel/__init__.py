"""The attested Noise channel (sans-IO), its stream framing, an RPC layer and asyncio adapters.

Evidence is produced and verified through callbacks the assembly code supplies, so this
package never imports attestation, translog or transport code (Project Oak's separation).
The wire protocol is specified in docs/protocol.md.
"""
