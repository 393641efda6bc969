"""KMS key release bound to attestation.

* :mod:`hermetic.kms.cms` parses and builds ``CiphertextForRecipient`` (BER CMS EnvelopedData);
* :mod:`hermetic.kms.policy` evaluates the key-policy language subset KMS uses for
  ``kms:RecipientAttestation:*`` conditions;
* :mod:`hermetic.kms.keypolicy` writes least-privilege key policies for a release;
* :mod:`hermetic.kms.server` is a local KMS speaking the real AWS JSON 1.1 protocol;
* :mod:`hermetic.kms.client` is the enclave side: botocore plus ``Recipient``.

Submodules are imported on demand so that, e.g., the enclave client does not load starlette.
"""
