"""The Python SDK: `PersonalizeClient` (one target) and `RoutingClient` (every worker, routed by user).

from personalize_service.client import PersonalizeClient
"""

from personalize_service.client.sdk import (
    ConflictError,
    DataLossError,
    DeadlineExceededError,
    ExportedAdapter,
    GenerationStream,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    PersonalizeClient,
    PersonalizeClientError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    error_from,
)

__all__ = [
    "ConflictError",
    "DataLossError",
    "DeadlineExceededError",
    "ExportedAdapter",
    "GenerationStream",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "PersonalizeClient",
    "PersonalizeClientError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "error_from",
]
