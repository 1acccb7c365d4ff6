"""Bundle failure classes: one exception per class, each with a stable ``reason`` and exit code.

Callers (the CLI, the agent's intake, the hub) branch on the class or on ``reason``; the
``reason`` strings and exit codes are a public contract (documented in docs/bundle-format.md)
and must never be renumbered. Every message is one line naming what was wrong, because it is
shown verbatim to an operator holding a USB stick.

Exit codes: 0 ok, 1 unexpected error, 2 usage; bundle failures use 10-49.
"""

from __future__ import annotations

from typing import ClassVar


class BundleError(Exception):
    """Base class. ``reason`` is a stable machine label; ``exit_code`` is the CLI exit status."""

    reason: ClassVar[str] = "bundle-error"
    exit_code: ClassVar[int] = 1

    def __init__(self, message: str) -> None:
        # One line, always: newlines in attacker-controlled names would forge log lines.
        super().__init__(" ".join(str(message).split()))

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.reason


class UsageError(BundleError):
    reason = "usage"
    exit_code = 2


# --- envelope, manifest, signatures ------------------------------------------------------------


class EnvelopeTooLarge(BundleError):
    reason = "envelope-too-large"
    exit_code = 10


class EnvelopeInvalid(BundleError):
    """The DSSE envelope is not well-formed, or carries the wrong payload type."""

    reason = "envelope-invalid"
    exit_code = 11


class ManifestInvalid(BundleError):
    """The signed manifest does not parse or violates the schema (checked after signatures)."""

    reason = "manifest-invalid"
    exit_code = 12


class UnknownKey(BundleError):
    """No signature was made by a key of the trust root's role for this bundle."""

    reason = "unknown-key"
    exit_code = 13


class SignatureInvalid(BundleError):
    """A known key's signature does not verify: the manifest was edited after signing."""

    reason = "signature-invalid"
    exit_code = 14


class BelowThreshold(BundleError):
    reason = "below-threshold"
    exit_code = 15


class Expired(BundleError):
    reason = "expired"
    exit_code = 16


class RootExpired(BundleError):
    reason = "root-expired"
    exit_code = 17


class Incompatible(BundleError):
    """Kubernetes version or CPU architecture outside the bundle's declared compatibility."""

    reason = "incompatible"
    exit_code = 18


class ReleaseRollback(BundleError):
    reason = "release-rollback"
    exit_code = 19


class CreatedRollback(BundleError):
    """``created`` is older than the newest bundle this site has seen (no trusted clock)."""

    reason = "created-rollback"
    exit_code = 20


# --- container and payload ---------------------------------------------------------------------


class WrongCompression(BundleError):
    reason = "wrong-compression"
    exit_code = 21


class UnsafeMemberType(BundleError):
    """Symlink, hardlink, device, FIFO, or any tar extension header: only files and dirs."""

    reason = "unsafe-member-type"
    exit_code = 22


class UnsafePath(BundleError):
    """Absolute path, ``..``, empty or control characters, backslashes, over-long names."""

    reason = "unsafe-path"
    exit_code = 23


class DuplicateMember(BundleError):
    reason = "duplicate-member"
    exit_code = 24


class UnlistedFile(BundleError):
    reason = "unlisted-file"
    exit_code = 25


class MissingFile(BundleError):
    reason = "missing-file"
    exit_code = 26


class SizeMismatch(BundleError):
    """A member's size differs from the manifest's."""

    reason = "size-mismatch"
    exit_code = 27


class CapExceeded(BundleError):
    """A size or count goes beyond the verifier's hard caps (files, total, members)."""

    reason = "cap-exceeded"
    exit_code = 28


class DigestMismatch(BundleError):
    reason = "digest-mismatch"
    exit_code = 29


class DecompressionBomb(BundleError):
    reason = "decompression-bomb"
    exit_code = 30


class Truncated(BundleError):
    reason = "truncated"
    exit_code = 31


class Garbled(BundleError):
    """Corrupt compression stream, bad tar header checksum, trailing garbage."""

    reason = "garbled"
    exit_code = 32


# --- trust root ----------------------------------------------------------------------------------


class RootInvalid(BundleError):
    """root.json does not parse, or is not signed by its own threshold."""

    reason = "root-invalid"
    exit_code = 33


class ChainBroken(BundleError):
    """A rotation link is not signed by a threshold of both the old and the new keys."""

    reason = "chain-broken"
    exit_code = 34


class ChainTooLong(BundleError):
    reason = "chain-too-long"
    exit_code = 35


class Unreadable(BundleError):
    """The bundle file cannot be opened or is not a regular file."""

    reason = "unreadable"
    exit_code = 36


# --- local I/O -----------------------------------------------------------------------------------


class StoreError(BundleError):
    """The bundle store, or a bundle/part file being written, could not be written (disk full,
    permissions); nothing was moved in, no half-written file left."""

    reason = "store-error"
    exit_code = 40


class BuildError(BundleError):
    """The build failed: a component could not be rendered, a source is missing, ..."""

    reason = "build-failed"
    exit_code = 41


class KeyInvalid(BundleError):
    """A key file is missing, unreadable, or not an Ed25519 key."""

    reason = "key-invalid"
    exit_code = 42


# --- images, deltas, split bundles (docs/images.md) ----------------------------------------------


class BaseMissing(BundleError):
    """A delta bundle's base bundle is not in this site's store (the message names it)."""

    reason = "base-missing"
    exit_code = 43


class PartMissing(BundleError):
    """A part of a split bundle is missing (the message names it)."""

    reason = "part-missing"
    exit_code = 44


class PartDamaged(BundleError):
    """A part of a split bundle has the wrong size or sha256 (the message names it)."""

    reason = "part-damaged"
    exit_code = 45


ALL: tuple[type[BundleError], ...] = (
    UsageError,
    EnvelopeTooLarge,
    EnvelopeInvalid,
    ManifestInvalid,
    UnknownKey,
    SignatureInvalid,
    BelowThreshold,
    Expired,
    RootExpired,
    Incompatible,
    ReleaseRollback,
    CreatedRollback,
    WrongCompression,
    UnsafeMemberType,
    UnsafePath,
    DuplicateMember,
    UnlistedFile,
    MissingFile,
    SizeMismatch,
    CapExceeded,
    DigestMismatch,
    DecompressionBomb,
    Truncated,
    Garbled,
    RootInvalid,
    ChainBroken,
    ChainTooLong,
    Unreadable,
    StoreError,
    BuildError,
    KeyInvalid,
    BaseMissing,
    PartMissing,
    PartDamaged,
)
