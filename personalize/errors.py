"""Domain errors. The service maps each class to one precise gRPC status code."""

from __future__ import annotations


class PersonalizeError(Exception):
    """Base of every domain error; the message must tell the caller what to fix."""


class InvalidArgument(PersonalizeError):
    """The caller sent something malformed (bad field, bad adapter file)."""


class AdapterError(InvalidArgument):
    """An adapter is malformed: wrong shapes, non-finite values, unknown target, rank too large."""


class IncompatibleAdapter(AdapterError):
    """An adapter was trained on another base model (fingerprint mismatch)."""


class NotFound(PersonalizeError):
    """The named user, adapter or version does not exist."""


class Conflict(PersonalizeError):
    """A compare-and-set lost to a concurrent writer."""


class CorruptObject(PersonalizeError):
    """A stored object failed its checksum or could not be parsed; it is never served."""


class Unavailable(PersonalizeError):
    """A dependency (store, registry, stream, worker) cannot be reached right now; retry later."""


class ResourceExhausted(PersonalizeError):
    """A limit was hit (slots all pinned, rate limit, size limit)."""


class Unauthenticated(PersonalizeError):
    """No or unknown API key."""


class PermissionDenied(PersonalizeError):
    """The key is valid but not allowed to do this."""


class DeadlineExceeded(PersonalizeError):
    """The request ran out of time or was cancelled."""
