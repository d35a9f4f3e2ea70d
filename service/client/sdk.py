"""Python client SDK for the personalize gRPC API.

    from personalize_service.client import PersonalizeClient
    with PersonalizeClient("127.0.0.1:50051", api_key="...") as client:
        client.feedback("alice", "Say hi", "Hello!", kind="accept")
        print(client.generate("alice", "Say hi").text)

Contract:
- Every call has a deadline (`timeout` seconds, per call, across its retries).
- Idempotent calls are retried on UNAVAILABLE up to `retries` times with a short exponential backoff:
  Generate, GenerateStream (only before its first chunk), GetAdapter, ExportAdapter, DeleteUser, Stats,
  ListNodes, and SubmitFeedback — which is made idempotent by always sending an `event_key` (a random one
  if the caller gives none; the server stores a repeated key once). ImportAdapter is never retried (each
  import makes a new version).
- `PersonalizeClient.discover(registry_url, ...)` gives a RoutingClient (service/client/routing.py) that
  sends each call straight to the worker owning its user instead of through the router.
- Every failure raises `PersonalizeClientError` (a `grpc.RpcError` with `.code()` and `.details()`); the
  subclass for a status also derives from the matching `personalize.errors` class, so
  `except personalize.errors.NotFound` works on both sides of the wire.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self, TypedDict, TypeVar, Unpack

import grpc

from personalize import errors
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from personalize_service.gen.personalize.v1 import personalize_pb2_grpc as pb_grpc
from personalize_service.server.limits import IMPORT_CHUNK_BYTES, IMPORT_FILE_NAMES, USER_ID_METADATA_KEY

if TYPE_CHECKING:
    from personalize_service.client.routing import RoutingClient

T = TypeVar("T")
FeedbackKind = Literal["accept", "reject", "correct", "prefer"]
_KINDS: dict[str, int] = {
    "accept": pb.FeedbackRequest.ACCEPT,
    "reject": pb.FeedbackRequest.REJECT,
    "correct": pb.FeedbackRequest.CORRECT,
    "prefer": pb.FeedbackRequest.PREFER,
}
_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
DEFAULT_NEW_TOKENS = 64
"""max_new_tokens of a generate call that does not say."""


class GenerateOptions(TypedDict, total=False):
    """Keyword options of `generate` and `generate_stream`; one left out takes the GenerateRequest default
    (greedy, top_p 1, no stop strings, the user's adapter), except max_new_tokens (DEFAULT_NEW_TOKENS)."""

    max_new_tokens: int
    temperature: float
    """0 = greedy."""
    top_p: float
    seed: int
    stop: Sequence[str]
    use_base_model: bool
    top_k: int
    """0 = off."""
    repetition_penalty: float
    logprobs: bool


# ---- errors ------------------------------------------------------------------------------------------


class PersonalizeClientError(grpc.RpcError):
    """A failed call: `.code()` is its grpc.StatusCode, `.details()` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class InvalidArgumentError(PersonalizeClientError, errors.InvalidArgument):
    """INVALID_ARGUMENT: fix the request (the message names the field or limit)."""


class NotFoundError(PersonalizeClientError, errors.NotFound):
    """NOT_FOUND: no such user, adapter or version."""


class ConflictError(PersonalizeClientError, errors.Conflict):
    """ABORTED: a concurrent update won; re-read and retry."""


class DataLossError(PersonalizeClientError, errors.CorruptObject):
    """DATA_LOSS: the stored adapter is corrupt and was not served."""


class UnavailableError(PersonalizeClientError, errors.Unavailable):
    """UNAVAILABLE: the service or a dependency is down; retry later (idempotent calls already were)."""


class ResourceExhaustedError(PersonalizeClientError, errors.ResourceExhausted):
    """RESOURCE_EXHAUSTED: a rate or concurrency limit; back off and retry."""


class UnauthenticatedError(PersonalizeClientError, errors.Unauthenticated):
    """UNAUTHENTICATED: missing or unknown API key."""


class PermissionDeniedError(PersonalizeClientError, errors.PermissionDenied):
    """PERMISSION_DENIED: the key may not do this."""


class DeadlineExceededError(PersonalizeClientError, errors.DeadlineExceeded):
    """DEADLINE_EXCEEDED: the call ran out of time."""


_ERROR_OF: dict[grpc.StatusCode, type[PersonalizeClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ABORTED: ConflictError,
    grpc.StatusCode.DATA_LOSS: DataLossError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def error_from(rpc_error: grpc.RpcError) -> PersonalizeClientError:
    """The typed error for a failed call (PersonalizeClientError itself for other codes)."""
    code = rpc_error.code() if callable(getattr(rpc_error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = rpc_error.details() if callable(getattr(rpc_error, "details", None)) else str(rpc_error)
    return _ERROR_OF.get(code, PersonalizeClientError)(code, details or "")


# ---- results -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportedAdapter:
    """An exported adapter: PEFT `files` (name -> bytes) and what the server knows of it."""

    files: dict[str, bytes]
    info: pb.AdapterInfo

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the files into `directory` (created if needed), loadable by PEFT; returns its path.

        Raises ValueError, before writing anything, if a file name is not a plain name in that directory.
        """
        path = Path(directory)
        bad = [name for name in self.files if Path(name).name != name or name in ("", ".", "..")]
        if bad:
            raise ValueError(f"exported file names {bad} are not plain file names; nothing was written")
        path.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            (path / name).write_bytes(data)
        return path


class GenerationStream:
    """A streaming generation: iterate for text pieces as they are produced; after the last one,
    `response` holds the whole GenerateResponse. Use as a context manager (or call `cancel()`) to stop
    early. Iterating raises PersonalizeClientError on failure."""

    def __init__(self, start: Callable[[], Any], retry: RetryPolicy) -> None:
        self._start = start
        self._retry = retry
        self._call: Any = None
        self._iterated = False
        self.response: pb.GenerateResponse | None = None
        """The whole response, set once the last chunk has arrived."""

    def __iter__(self) -> Iterator[str]:
        if self._iterated:
            raise RuntimeError("a GenerationStream can be iterated once; call generate_stream again")
        self._iterated = True
        return self._pieces()

    def _pieces(self) -> Iterator[str]:
        for chunk in self._chunks():
            if chunk.text:
                yield chunk.text
            if chunk.done:
                self.response = chunk.final
                return

    def _chunks(self) -> Iterator[pb.GenerateChunk]:
        """The call's chunks; UNAVAILABLE before the first chunk starts the call again (retry policy)."""
        attempt = 0
        while True:
            self._call = self._start()  # starting never raises; failures surface while iterating
            received = False
            try:
                for chunk in self._call:
                    received = True
                    yield chunk
                return
            except grpc.RpcError as exc:
                if received or not self._retry.should_retry(exc, attempt):
                    raise error_from(exc) from None
            attempt += 1
            self._retry.sleep(attempt)

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cancel()


# ---- retry -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Retry policy: up to `retries` more attempts on UNAVAILABLE, sleeping backoff * 2**n (+ jitter)."""

    retries: int
    backoff: float

    def should_retry(self, exc: grpc.RpcError, attempt: int) -> bool:
        return (
            attempt < self.retries
            and callable(getattr(exc, "code", None))
            and exc.code() == grpc.StatusCode.UNAVAILABLE
        )

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt `attempt` (1 = the first retry): backoff * 2**(attempt-1), +0-25%."""
        return self.backoff * (2 ** (attempt - 1)) * (1.0 + 0.25 * random.random())

    def sleep(self, attempt: int) -> None:
        time.sleep(self.delay(attempt))

    def run(self, fn: Callable[[], T], idempotent: bool) -> T:
        """fn(), retried on UNAVAILABLE if idempotent; raises PersonalizeClientError on failure."""
        attempt = 0
        while True:
            try:
                return fn()
            except grpc.RpcError as exc:
                if not idempotent or not self.should_retry(exc, attempt):
                    raise error_from(exc) from None
            attempt += 1
            self.sleep(attempt)

    async def arun(self, fn: Callable[[], Awaitable[T]], idempotent: bool) -> T:
        """`run` for a call awaited on an event loop: the backoff is an asyncio.sleep."""
        attempt = 0
        while True:
            try:
                return await fn()
            except grpc.RpcError as exc:
                if not idempotent or not self.should_retry(exc, attempt):
                    raise error_from(exc) from None
            attempt += 1
            await asyncio.sleep(self.delay(attempt))


async def await_future(future: grpc.Future) -> Any:
    """The result of a grpc call started with `.future()`, awaited on the running loop: grpc's own poller
    thread wakes the loop when it ends, so no thread is held waiting; cancelling the await cancels the call.
    Raises the call's grpc.RpcError."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle() -> None:
        if not done.done():  # the await may have been cancelled meanwhile
            done.set_result(None)

    def wake(_: Any) -> None:
        loop.call_soon_threadsafe(settle)

    future.add_done_callback(wake)
    try:
        await done
    except asyncio.CancelledError:
        future.cancel()
        raise
    return future.result()


# ---- client ------------------------------------------------------------------------------------------


class PersonalizeClient:
    """A connection to a personalize router (or worker). Thread-safe; one per process is plenty.

    target: host:port. api_key: sent as `authorization: Bearer <key>` (None for a server without keys).
    timeout: seconds per call, retries included. tls: None/False = plaintext, True = TLS with the system
    roots, bytes = TLS with this PEM root certificate, or a ready grpc.ChannelCredentials.
    retries: extra attempts on UNAVAILABLE for idempotent calls (at most 2 by default).
    operator_key: sent on the Admin calls (stats, list_nodes) instead of api_key; a server with keys
    answers them only for an operator key.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        api_key: str | None = None,
        timeout: float = 30.0,
        tls: bool | bytes | grpc.ChannelCredentials | None = None,
        *,
        retries: int = 2,
        backoff: float = 0.05,
        operator_key: str | None = None,
    ) -> None:
        self._configure(api_key, timeout, RetryPolicy(retries=retries, backoff=backoff), operator_key)
        self._channel = open_channel(target, tls)
        self._api = pb_grpc.PersonalizeStub(self._channel)
        self._admin = pb_grpc.AdminStub(self._channel)

    # -- generation --

    def generate(
        self,
        user_id: str,
        prompt: str | Sequence[tuple[str, str]],
        **options: Unpack[GenerateOptions],
    ) -> pb.GenerateResponse:
        """One completion with the user's current adapter (temperature 0 = greedy). `prompt` is text, or a
        chat as (role, content) pairs, rendered with the model's chat template by the server.

        The response says which adapter served (`adapter_version`, 0 = the base model) and where it was
        found (`cache_tier`); `degraded` is true (with `degraded_reason`) when the user's adapter could not
        be loaded and the base model served instead (a server running with degrade_to_base)."""
        request = _generate_request(user_id, prompt, options)
        return self._call("Generate", request, idempotent=True)

    async def agenerate(
        self,
        user_id: str,
        prompt: str | Sequence[tuple[str, str]],
        **options: Unpack[GenerateOptions],
    ) -> pb.GenerateResponse:
        """`generate` awaited on the running event loop (no thread waits for the answer; same retries and
        errors). Call it from that loop's thread: the trace context is read there."""
        request = _generate_request(user_id, prompt, options)
        return await self._acall("Generate", request, idempotent=True)

    def generate_stream(
        self,
        user_id: str,
        prompt: str | Sequence[tuple[str, str]],
        **options: Unpack[GenerateOptions],
    ) -> GenerationStream:
        """The same as `generate`, as text pieces while they are produced; see GenerationStream (its
        `response`, with `degraded`, is set after the last piece)."""
        request = _generate_request(user_id, prompt, options)
        return self._stream(request)

    # -- feedback and adapters --

    def feedback(
        self,
        user_id: str,
        prompt: str | Sequence[tuple[str, str]],
        completion: str,
        kind: FeedbackKind = "accept",
        *,
        correction: str = "",
        rejected: str = "",
        event_key: str = "",
    ) -> pb.FeedbackAck:
        """Record the user's reaction; durable once this returns. `correct` needs `correction`; `prefer`
        takes `completion` as the chosen answer and `rejected` as the other. Without `event_key` a random
        one is sent, so a retry can never store the event twice. `prompt` may be a chat, as in `generate`."""
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {sorted(_KINDS)}, got {kind!r}")
        request = pb.FeedbackRequest(
            user_id=user_id,
            **_question(prompt),
            completion=completion,
            kind=_KINDS[kind],
            correction=correction,
            rejected=rejected,
            event_key=event_key or uuid.uuid4().hex,
        )
        return self._call("SubmitFeedback", request, idempotent=True)

    def get_adapter(self, user_id: str) -> pb.AdapterInfo:
        """What the system knows of the user's adapter; NotFoundError for an unknown user."""
        return self._call("GetAdapter", pb.GetAdapterRequest(user_id=user_id), idempotent=True)

    def delete_user(self, user_id: str) -> pb.DeleteUserResponse:
        """Forget the user entirely (adapter versions, record, cached copies, pending events)."""
        return self._call("DeleteUser", pb.DeleteUserRequest(user_id=user_id), idempotent=True)

    def export_adapter(self, user_id: str, version: int = 0) -> ExportedAdapter:
        """The PEFT files of the user's adapter (version 0 = current)."""
        bundle = self._call("ExportAdapter", pb.ExportAdapterRequest(user_id=user_id, version=version), idempotent=True)
        return ExportedAdapter(files=dict(bundle.files), info=bundle.info)

    def import_adapter(self, user_id: str, files: Mapping[str, bytes] | str | os.PathLike[str]) -> pb.AdapterInfo:
        """Install a PEFT LoRA adapter for the user: a name -> bytes mapping, or a directory holding
        adapter_config.json and adapter_model.safetensors (other files there are ignored). Sent as an
        ImportAdapterStream (chunks of IMPORT_CHUNK_BYTES), so any size up to the server's per-file limit
        imports, whatever the servers' receive limit. Not retried."""
        payload = _read_adapter_dir(files) if isinstance(files, str | os.PathLike) else dict(files)
        return self._call("ImportAdapterStream", ImportChunks(user_id, payload), idempotent=False)

    # -- admin --

    def stats(self) -> pb.StatsResponse:
        return self._unary(self._admin.Stats, pb.StatsRequest(), idempotent=True, metadata=self._operator_metadata)

    def list_nodes(self) -> pb.ListNodesResponse:
        return self._unary(
            self._admin.ListNodes, pb.ListNodesRequest(), idempotent=True, metadata=self._operator_metadata
        )

    # -- lifecycle --

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @classmethod
    def discover(
        cls, registry_url: str, api_key: str | None = None, *, tenant: str | None = None, **options: Any
    ) -> RoutingClient:
        """A RoutingClient: calls go straight to the worker owning each user, found through the membership
        the workers announce in the registry at `registry_url` (no router hop). See routing_client.py."""
        from personalize_service.client.routing import RoutingClient

        return RoutingClient(registry_url, api_key, tenant=tenant, **options)

    def _configure(
        self, api_key: str | None, timeout: float, retry: RetryPolicy, operator_key: str | None = None
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.timeout = timeout
        self._metadata: tuple[tuple[str, str], ...] = ()
        if api_key:
            self._metadata = (("authorization", f"Bearer {api_key}"),)
        self._operator_metadata = (("authorization", f"Bearer {operator_key}"),) if operator_key else self._metadata
        self._retry = retry

    def _call(self, rpc: str, request: Any, *, idempotent: bool) -> Any:
        """One unary Personalize call by method name (the routing client overrides where it goes)."""
        metadata = self._metadata + user_metadata(request.user_id)
        return self._unary(getattr(self._api, rpc), request, idempotent=idempotent, metadata=metadata)

    async def _acall(self, rpc: str, request: Any, *, idempotent: bool) -> Any:
        """`_call` awaited on the running loop (the call started with grpc's `.future()`)."""
        deadline = time.monotonic() + self.timeout
        sent = (*self._metadata, *user_metadata(request.user_id), *_trace_metadata())
        method = getattr(self._api, rpc)
        return await self._retry.arun(
            lambda: await_future(method.future(request, timeout=time_left(deadline), metadata=sent)), idempotent
        )

    def _stream(self, request: pb.GenerateRequest) -> GenerationStream:
        deadline = time.monotonic() + self.timeout
        metadata = self._metadata + user_metadata(request.user_id)
        return GenerationStream(
            lambda: self._api.GenerateStream(
                request, timeout=time_left(deadline), metadata=(*metadata, *_trace_metadata())
            ),
            self._retry,
        )

    def _unary(
        self,
        method: Callable[..., T],
        request: Any,
        *,
        idempotent: bool,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> T:
        deadline = time.monotonic() + self.timeout
        sent = (*(self._metadata if metadata is None else metadata), *_trace_metadata())
        return self._retry.run(lambda: method(request, timeout=time_left(deadline), metadata=sent), idempotent)

    def _call_metadata(self) -> tuple[tuple[str, str], ...]:
        """The API key and, when the caller has a current OpenTelemetry span, its W3C trace context."""
        return (*self._metadata, *_trace_metadata())


def user_metadata(user_id: str) -> tuple[tuple[str, str], ...]:
    """`x-user-id` for a call about `user_id`, so a router routes it without parsing the body; none for
    an id gRPC metadata cannot carry (non-ASCII, control characters, edge spaces), which the router then
    reads from the body."""
    if user_id and user_id.isascii() and user_id.isprintable() and user_id == user_id.strip():
        return ((USER_ID_METADATA_KEY, user_id),)
    return ()


def _trace_metadata() -> tuple[tuple[str, str], ...]:
    """`traceparent`/`tracestate` of the current span; empty without one or without opentelemetry-api."""
    try:
        from opentelemetry import propagate
    except ImportError:
        return ()
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple((k, v) for k, v in carrier.items() if k in ("traceparent", "tracestate"))


def time_left(deadline: float) -> float:
    """Seconds left until `deadline` (a tiny positive number once past, so grpc fails it at once)."""
    return max(deadline - time.monotonic(), 0.001)


def _question(prompt: str | Sequence[tuple[str, str]]) -> dict[str, Any]:
    """The request fields of a prompt: `prompt` for text, `messages` for a chat of (role, content) pairs."""
    if isinstance(prompt, str):
        return {"prompt": prompt}
    return {"messages": [pb.ChatMessage(role=role, content=content) for role, content in prompt]}


def _generate_request(
    user_id: str, prompt: str | Sequence[tuple[str, str]], options: GenerateOptions
) -> pb.GenerateRequest:
    unknown = sorted(set(options) - set(GenerateOptions.__annotations__))
    if unknown:
        raise TypeError(f"generate() got unexpected keyword arguments {unknown}")
    fields: dict[str, Any] = {"max_new_tokens": DEFAULT_NEW_TOKENS, **options}
    fields["stop"] = list(fields.get("stop", ()))
    return pb.GenerateRequest(user_id=user_id, **_question(prompt), **fields)


class ImportChunks:
    """A streamed import's request as `_call` takes one: the `user_id` it is routed by, and an iterator
    (made once, lazily) of ImportAdapterChunks: the first names the user, each carries at most
    IMPORT_CHUNK_BYTES of one file."""

    def __init__(self, user_id: str, files: Mapping[str, bytes]) -> None:
        self.user_id = user_id
        self._chunks = _chunks(user_id, files)

    def __iter__(self) -> Iterator[pb.ImportAdapterChunk]:
        return self

    def __next__(self) -> pb.ImportAdapterChunk:
        return next(self._chunks)


def _chunks(user_id: str, files: Mapping[str, bytes]) -> Iterator[pb.ImportAdapterChunk]:
    yield pb.ImportAdapterChunk(user_id=user_id)
    for name, data in files.items():
        view = memoryview(data)
        for start in range(0, max(len(data), 1), IMPORT_CHUNK_BYTES):
            yield pb.ImportAdapterChunk(file_name=name, data=bytes(view[start : start + IMPORT_CHUNK_BYTES]))


def _read_adapter_dir(directory: str | os.PathLike[str]) -> dict[str, bytes]:
    """The PEFT files of an adapter directory; FileNotFoundError naming a missing one."""
    path = Path(directory)
    missing = [name for name in IMPORT_FILE_NAMES if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} lacks {missing}; a PEFT adapter directory holds {list(IMPORT_FILE_NAMES)}")
    return {name: (path / name).read_bytes() for name in IMPORT_FILE_NAMES}


def open_channel(target: str, tls: bool | bytes | grpc.ChannelCredentials | None) -> grpc.Channel:
    options = [
        ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ]
    if tls is None or tls is False:
        return grpc.insecure_channel(target, options=options)
    if tls is True:
        credentials = grpc.ssl_channel_credentials()
    elif isinstance(tls, bytes):
        credentials = grpc.ssl_channel_credentials(root_certificates=tls)
    else:
        credentials = tls
    return grpc.secure_channel(target, credentials, options=options)
