"""Typed errors of the bundle layer.

Every failure while making, inspecting, verifying or opening a bundle raises a subclass of
:class:`BundleError` (itself a :class:`~histodd_fed.errors.HistoddError`) with a one-line message
that names the file (or object) and the problem. Opening a bundle checks, in order: format and
version, size limits, signer trust, signature, recipient, decryption, manifest hashes, replay,
semantics; each step has its own class below.
"""

from __future__ import annotations

from histodd_fed.errors import HistoddError


class BundleError(HistoddError):
    """Base class of every bundle error."""


class FormatError(BundleError):
    """Not a bundle, or a malformed/non-canonical header, or an inconsistent layout."""


class VersionError(FormatError):
    """A bundle format version this code does not read."""


class UnsupportedAlgorithmError(FormatError):
    """The header names algorithms other than the ones this version allows (downgrade attempt)."""


class SizeLimitError(BundleError):
    """A declared size exceeds a limit, or the declared layout disagrees with the actual size
    (truncated file, appended data)."""


class UntrustedSignerError(BundleError):
    """The signing centre or its key is not in the trust store."""


class RevokedSignerError(UntrustedSignerError):
    """The signing key was revoked in the trust store."""


class SignatureError(BundleError):
    """The Ed25519 signature does not match the bundle bytes (tampered or corrupted)."""


class NotARecipientError(BundleError):
    """The bundle was not encrypted for this centre's key."""


class DecryptionError(BundleError):
    """Unwrapping the content key or authenticated decryption of a chunk failed."""


class ManifestHashError(BundleError):
    """A payload part or the distillation config does not match the hash in the manifest."""


class ReplayError(BundleError):
    """This bundle (signer key id, bundle id) was already opened here."""


class StaleBundleError(ReplayError):
    """The bundle's signed ``created`` time lies outside the freshness window (too old, or in the future)."""


class KeyCommitmentError(DecryptionError):
    """The content key unwrapped for this recipient is not the one committed to in the signed header."""


class SemanticError(BundleError):
    """Authenticated content that is still unusable: bad shapes, dtypes, label ranges, counts."""


class KeyFileError(BundleError):
    """A key file, identity file, trust store or ledger is missing, unreadable or inconsistent."""


class KeyPermissionError(KeyFileError):
    """A private key (or passphrase) file is readable by group or others."""


class LedgerMissingError(KeyFileError):
    """An initialised replay ledger has vanished or was rolled back."""


class TrustConflictError(KeyFileError):
    """Adding a key for a centre that already has a different pinned key (use replace)."""


class OutputExistsError(BundleError):
    """``open_bundle`` refuses to write over an existing output directory."""
