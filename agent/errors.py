"""The domain errors, and what each one means to a caller.

Every error the agent raises on purpose derives from :class:`AgentError`. Each
class carries a stable ``code`` (used in JSON error bodies) and an HTTP status,
so the server maps errors to responses in one place. Messages never contain a
secret value: they name secrets, versions, files and reasons only.

Two questions matter to callers:

* *Retry?* Only :class:`BackendUnavailable` (and subclasses) is transient: the
  store or a key provider could not be reached, timed out or throttled us. The
  cache may serve the last good value on it (stale-if-error).
* *Give up?* Everything else is permanent for this input: not found, access
  denied, a tampered envelope, a bad config. Never served from stale data.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base class of every error the agent raises on purpose."""

    code = "internal"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(AgentError):
    """The configuration is invalid; ``path`` is the YAML path of the bad field."""

    code = "config_error"
    status = 500

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.reason = message


class BadRequest(AgentError):
    """A request or argument is malformed (bad name, unknown stage, bad query)."""

    code = "bad_request"
    status = 400


class InvalidName(BadRequest):
    """A secret name breaks the naming rules."""

    code = "invalid_name"


class NotFound(AgentError):
    """No such secret, version, stage or key (to a caller allowed to ask)."""

    code = "not_found"
    status = 404


class SecretNotFound(NotFound):
    """The secret does not exist in the store."""

    code = "secret_not_found"


class VersionNotFound(NotFound):
    """The secret exists but has no such version or stage."""

    code = "version_not_found"


class KeyNotFound(NotFound):
    """The secret's value is not a JSON object with the requested key."""

    code = "key_not_found"


class AccessDenied(AgentError):
    """The caller (or the agent itself, at a key provider) may not do this."""

    code = "access_denied"
    status = 403


class Conflict(AgentError):
    """A write lost a race (stage moved by someone else, version id taken)."""

    code = "conflict"
    status = 409


class TooManyRequests(AgentError):
    """A connection or rate limit was hit."""

    code = "too_many_requests"
    status = 429


class BackendUnavailable(AgentError):
    """Transient: the store or a key provider is unreachable, slow or throttling.

    ``retry_after`` is a hint in seconds for HTTP ``Retry-After``.
    """

    code = "backend_unavailable"
    status = 503

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class MalformedStoreData(BackendUnavailable):
    """Transient: the store answered, but an object in it (a stage map) is malformed,
    too large or too deeply nested. Cached values stay in service until it is fixed.
    """

    code = "malformed_store_data"


class StaleTooLong(BackendUnavailable):
    """The store has been failing for longer than ``max_stale``; no value is served."""

    code = "stale"


class KeyUnavailable(BackendUnavailable):
    """Transient: a key provider could not be reached or throttled us."""

    code = "key_unavailable"


class DecryptionError(AgentError):
    """Permanent: an envelope is malformed, tampered, misplaced or cannot be unwrapped.

    The last good value stays in service; the refused envelope is never retried
    until it changes in the store.
    """

    code = "decryption_failed"
    status = 502


class UnsupportedEnvelope(DecryptionError):
    """The envelope names a format version or algorithm this agent does not know."""

    code = "unsupported_envelope"


class KeyRevoked(DecryptionError):
    """A master key is disabled, deleted or access to it was revoked.

    Data keys it wrapped are dropped from the cache when this is seen.
    """

    code = "key_revoked"

    def __init__(self, message: str, *, provider: str = "", key: str = "") -> None:
        super().__init__(message)
        self.provider = provider
        self.key = key
