"""Pure translations between API messages and library types (no I/O, no gRPC calls).

Request translations also enforce `Limits` and raise the domain errors the interceptor maps, so a handler
is: `args = convert.generate_args(request, limits)`, call the library, `return convert.x(result)`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

from personalize.engine.text import ChatMessage
from personalize.engine.types import GenerationResult, SamplingParams
from personalize.errors import InvalidArgument
from personalize.lora.format import canonical_safetensors
from personalize.worker import AdapterInfo, GenerationInfo, NodeStats
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from personalize_service.server.limits import (
    Limits,
    check_event_key,
    check_feedback_text,
    check_import_chunk,
    check_import_files,
    check_max_new_tokens,
    check_prompt,
    check_size,
    check_stop,
    check_user_id,
)

FEEDBACK_KINDS: dict[int, str] = {
    pb.FeedbackRequest.ACCEPT: "accept",
    pb.FeedbackRequest.REJECT: "reject",
    pb.FeedbackRequest.CORRECT: "correct",
    pb.FeedbackRequest.PREFER: "prefer",
}
"""FeedbackRequest.Kind -> the library's event kind."""


# ---- requests -> library -----------------------------------------------------------------------------


class GenerateArgs(NamedTuple):
    user_id: str
    prompt: str | tuple[ChatMessage, ...]
    """The prompt text, or the chat of `messages`."""
    params: SamplingParams
    use_base_model: bool


def chat_messages(messages: Sequence[pb.ChatMessage], limits: Limits) -> tuple[ChatMessage, ...]:
    """`messages` as the library's ChatMessages: each with a role, all contents together within
    max_prompt_bytes, at most max_chat_messages of them. Raises InvalidArgument naming the field."""
    if len(messages) > limits.max_chat_messages:
        raise InvalidArgument(
            f"messages has {len(messages)} messages; the limit is {limits.max_chat_messages} (max_chat_messages)"
        )
    chat = tuple(ChatMessage(m.role, m.content) for m in messages)
    for n, m in enumerate(chat):
        if not m.role:
            raise InvalidArgument(f"messages[{n}].role is empty (system, user, assistant, ...)")
    check_size("messages", "".join(m.role + m.content for m in chat), limits.max_prompt_bytes, "max_prompt_bytes")
    return chat


def _prompt_or_chat(
    prompt: str, messages: Sequence[pb.ChatMessage], limits: Limits, prompt_name: str = "prompt"
) -> str | tuple[ChatMessage, ...]:
    chat = chat_messages(messages, limits)
    if chat and prompt:
        raise InvalidArgument(f"give exactly one of {prompt_name} and messages, not both")
    return chat or prompt


def generate_args(request: pb.GenerateRequest, limits: Limits) -> GenerateArgs:
    """Validated arguments of Generate/GenerateStream.

    Proto defaults mean: max_new_tokens 0 -> limits.default_new_tokens, temperature 0 -> greedy,
    top_p 0 -> 1.0 (no truncation), top_k 0 -> no limit, repetition_penalty 0 -> 1.0 (none). `prompt` or
    `messages`, not both. Raises InvalidArgument naming the offending field.
    """
    penalty = float(request.repetition_penalty)
    if penalty != penalty or penalty < 0.0:  # NaN or negative: 0 alone means the default
        raise InvalidArgument(f"repetition_penalty must be > 0 (0 = 1.0, none), got {penalty}")
    params = SamplingParams(
        max_new_tokens=check_max_new_tokens(request.max_new_tokens, limits),
        temperature=float(request.temperature),
        top_p=float(request.top_p) if request.top_p != 0.0 else 1.0,
        seed=int(request.seed),
        stop=check_stop(list(request.stop), limits),
        top_k=int(request.top_k),
        repetition_penalty=penalty or 1.0,
        logprobs=bool(request.logprobs),
    )
    prompt = _prompt_or_chat(check_prompt(request.prompt, limits), request.messages, limits)
    return GenerateArgs(check_user_id(request.user_id, limits), prompt, params, bool(request.use_base_model))


class FeedbackArgs(NamedTuple):
    user_id: str
    prompt: str
    completion: str
    kind: str
    """accept, reject, correct or prefer."""
    correction: str
    rejected: str
    event_key: str
    """Client idempotency key; empty = none."""
    messages: tuple[ChatMessage, ...] = ()
    """The chat answered instead of `prompt` (empty = none)."""


def feedback_args(request: pb.FeedbackRequest, limits: Limits) -> FeedbackArgs:
    """Validated arguments of SubmitFeedback: a known kind, CORRECT with a correction, PREFER with a
    rejected answer, every text within max_feedback_text_bytes. Raises InvalidArgument."""
    kind = FEEDBACK_KINDS.get(request.kind)
    if kind is None:
        known = ", ".join(pb.FeedbackRequest.Kind.Name(k) for k in FEEDBACK_KINDS)
        got = "KIND_UNSPECIFIED" if request.kind == pb.FeedbackRequest.KIND_UNSPECIFIED else str(request.kind)
        raise InvalidArgument(f"feedback kind must be one of {known}, got {got}")
    if kind == "correct" and not request.correction:
        raise InvalidArgument("feedback kind CORRECT needs a non-empty correction")
    if kind == "prefer" and not request.rejected:
        raise InvalidArgument("feedback kind PREFER needs a non-empty rejected answer (completion is the chosen one)")
    texts = {
        name: check_feedback_text(name, getattr(request, name), limits)
        for name in ("prompt", "completion", "correction", "rejected")
    }
    question = _prompt_or_chat(texts["prompt"], request.messages, limits)
    return FeedbackArgs(
        user_id=check_user_id(request.user_id, limits),
        kind=kind,
        event_key=check_event_key(request.event_key, limits),
        messages=question if isinstance(question, tuple) else (),
        **texts,
    )


class ExportArgs(NamedTuple):
    user_id: str
    version: int
    """0 = current."""


def export_args(request: pb.ExportAdapterRequest, limits: Limits) -> ExportArgs:
    return ExportArgs(check_user_id(request.user_id, limits), int(request.version))


class ImportArgs(NamedTuple):
    user_id: str
    files: dict[str, bytes]
    """adapter_config.json and adapter_model.safetensors."""


def import_args(request: pb.ImportAdapterRequest, limits: Limits) -> ImportArgs:
    """Validated arguments of ImportAdapter: exactly the PEFT files, each within max_import_file_bytes."""
    return ImportArgs(check_user_id(request.user_id, limits), check_import_files(dict(request.files), limits))


def import_request(chunks: Iterable[pb.ImportAdapterChunk], limits: Limits) -> pb.ImportAdapterRequest:
    """The ImportAdapterRequest a streamed import's chunks make up (for import_args: one validation path).

    Each chunk is checked as it arrives (check_import_chunk), so a bad one ends the stream before the rest
    is read. InvalidArgument for an empty stream or a chunk naming another user than the first.
    """
    user_id: str | None = None
    files: dict[str, list[bytes]] = {}
    sizes: dict[str, int] = {}
    for index, chunk in enumerate(chunks):
        if user_id is None:
            user_id = chunk.user_id
        elif chunk.user_id and chunk.user_id != user_id:
            raise InvalidArgument(
                f"import chunk {index} is for user_id {chunk.user_id!r}; the first chunk's is {user_id!r}"
            )
        if not chunk.file_name and not chunk.data:
            continue
        received = sizes.get(chunk.file_name, 0)
        check_import_chunk(index, chunk.file_name, len(chunk.data), received, limits)
        sizes[chunk.file_name] = received + len(chunk.data)
        files.setdefault(chunk.file_name, []).append(chunk.data)
    if user_id is None:
        raise InvalidArgument("the import stream ended before its first chunk; the first chunk names the user")
    return pb.ImportAdapterRequest(user_id=user_id, files={name: b"".join(parts) for name, parts in files.items()})


# ---- library -> responses ----------------------------------------------------------------------------


def generate_response(result: GenerationResult, info: GenerationInfo) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        text=result.text,
        adapter_version=info.adapter_version,
        node_id=info.node_id,
        cache_tier=info.cache_tier,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        finish_reason=result.finish_reason,
        degraded=info.degraded,
        degraded_reason=info.degraded_reason,
        token_logprobs=result.logprobs,
    )


def text_chunk(text: str, logprobs: Sequence[float] = ()) -> pb.GenerateChunk:
    """A streamed piece of the completion (not the last chunk), with the logprobs of its tokens."""
    return pb.GenerateChunk(text=text, token_logprobs=logprobs)


def final_chunk(result: GenerationResult, info: GenerationInfo, logprobs: Sequence[float] = ()) -> pb.GenerateChunk:
    """The last chunk: no text of its own (the pieces were streamed), `final` holds the whole response;
    `logprobs` are those of the tokens no streamed piece carried (an EOS, a stop string's tokens)."""
    return pb.GenerateChunk(done=True, final=generate_response(result, info), token_logprobs=logprobs)


def feedback_ack(event_id: str, partition: int) -> pb.FeedbackAck:
    return pb.FeedbackAck(event_id=event_id, partition=partition)


def adapter_info(info: AdapterInfo) -> pb.AdapterInfo:
    return pb.AdapterInfo(
        user_id=info.user_id,
        version=info.version,
        rank=info.rank,
        examples_seen=info.examples_seen,
        base_fingerprint=info.base_fingerprint,
        updated_at_unix_ms=info.updated_at_unix_ms,
        pending_events=info.pending_events,
        owner_node=info.owner_node,
    )


def adapter_bundle(files: Mapping[str, bytes], info: AdapterInfo) -> pb.AdapterBundle:
    """The exported files, each safetensors file in canonical form (so one adapter exports to the same bytes)."""
    canonical = {
        name: canonical_safetensors(data) if name.endswith(".safetensors") else data for name, data in files.items()
    }
    return pb.AdapterBundle(files=canonical, info=adapter_info(info))


def delete_response(versions_deleted: int, events_deleted: int) -> pb.DeleteUserResponse:
    return pb.DeleteUserResponse(versions_deleted=versions_deleted, events_deleted=events_deleted)


def node_stats(stats: NodeStats) -> pb.NodeStats:
    return pb.NodeStats(
        node_id=stats.node_id,
        resident=stats.resident,
        bytes=stats.bytes,
        hits=stats.hits,
        misses=stats.misses,
        batch_occupancy=stats.batch_occupancy,
        max_batch_occupancy=stats.max_batch_occupancy,
        queue_depth=stats.queue_depth,
        stream_lag=stats.stream_lag,
        slot_bytes=stats.slot_bytes,
        device_slots=stats.device_slots,
    )


def stats_response(nodes: Iterable[NodeStats], degraded: bool = False) -> pb.StatsResponse:
    """`degraded`: some nodes did not answer and are missing from `nodes`."""
    return pb.StatsResponse(nodes=[node_stats(n) for n in nodes], degraded=degraded)
