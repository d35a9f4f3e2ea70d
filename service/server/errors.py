"""Domain exception -> gRPC status code: the one table the service uses.

Status choices that need a reason:
- `Conflict` -> ABORTED: a compare-and-set lost to a concurrent writer; gRPC reserves ABORTED for
  exactly that ("retry at a higher level, re-reading state").
- `CorruptObject` -> DATA_LOSS: a stored adapter failed its checksum or did not parse. The server never
  serves it; the caller cannot fix it by changing the request and retrying will not help until a good
  version is written, so neither INVALID_ARGUMENT nor UNAVAILABLE is honest; DATA_LOSS is what it is.
- Request size limits are INVALID_ARGUMENT (the same request never succeeds); RESOURCE_EXHAUSTED is kept
  for rate and concurrency limits, which clear with time.
- Anything not listed (a bug) is INTERNAL with a log line; bad input never gets there.
"""

from __future__ import annotations

import grpc

from personalize import errors

# Most specific first does not matter: lookup walks the exception's MRO, so subclasses
# (AdapterError, IncompatibleAdapter -> InvalidArgument) inherit their parent's code.
STATUS_OF: dict[type[errors.PersonalizeError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.Conflict: grpc.StatusCode.ABORTED,
    errors.CorruptObject: grpc.StatusCode.DATA_LOSS,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_of(exc: BaseException) -> grpc.StatusCode | None:
    """The status code for a domain error (its nearest mapped class), or None if it is not one."""
    for cls in type(exc).__mro__:
        code = STATUS_OF.get(cls)  # type: ignore[call-overload]
        if code is not None:
            return code
    return None


def message_of(exc: BaseException) -> str:
    """The status details sent to the caller: the domain error's message, or its class name if empty."""
    return str(exc) or type(exc).__name__
