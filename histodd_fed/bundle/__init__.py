"""Encrypted, signed bundles of synthetic patches: what crosses hospital boundaries.

A bundle is readable only by its recipient centres (HPKE-wrapped AES-256-GCM content key),
provably from its source centre (Ed25519 over the whole file), tamper-evident (authenticated
chunks bound to the header, manifest hashes), replay-resistant (a local ledger) and safe to open
when hostile (typed errors, size limits, nothing written on failure). A relay can verify the
signature without any private key. See ``docs/bundle-format.md``.
"""

from histodd_fed.bundle.errors import (BundleError, DecryptionError, FormatError, KeyCommitmentError,
                                       KeyFileError, KeyPermissionError, LedgerMissingError, ManifestHashError,
                                       NotARecipientError, OutputExistsError, ReplayError, RevokedSignerError,
                                       SemanticError, SignatureError, SizeLimitError, StaleBundleError,
                                       TrustConflictError, UnsupportedAlgorithmError, UntrustedSignerError,
                                       VersionError)
from histodd_fed.bundle.format import BundleHeader, Limits
from histodd_fed.bundle.identity import (Identity, PublicIdentity, generate_identity, load_identity,
                                         load_public_identity, read_passphrase, rekey_identity)
from histodd_fed.bundle.ledger import NO_LEDGER, Ledger
from histodd_fed.bundle.seal import OpenedBundle, inspect, open_bundle, seal, verify
from histodd_fed.bundle.trust import TrustStore

__all__ = [
    "BundleError", "BundleHeader", "DecryptionError", "FormatError", "Identity", "KeyCommitmentError",
    "KeyFileError", "KeyPermissionError", "Ledger", "LedgerMissingError", "Limits", "ManifestHashError",
    "NO_LEDGER", "NotARecipientError", "OpenedBundle", "OutputExistsError", "PublicIdentity", "ReplayError",
    "RevokedSignerError", "SemanticError", "SignatureError", "SizeLimitError", "StaleBundleError",
    "TrustConflictError", "TrustStore", "UnsupportedAlgorithmError", "UntrustedSignerError", "VersionError",
    "generate_identity", "inspect", "load_identity", "load_public_identity", "open_bundle", "read_passphrase",
    "rekey_identity", "seal", "verify",
]
