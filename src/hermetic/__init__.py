"""hermetic: confidential services on AWS Nitro Enclaves, verifiable end to end."""

__version__ = "0.1.0"
