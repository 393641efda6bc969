"""Run enclaves: the emulated launcher (plays the Nitro hypervisor) or ``nitro-cli``.

:mod:`hermetic.launcher.emulated` and :mod:`hermetic.launcher.supervisor` are the local
emulation; :mod:`hermetic.launcher.nitro` drives real Nitro. The CLI picks the driver at
run time with :func:`hermetic.launcher.nitro.available`.
"""
