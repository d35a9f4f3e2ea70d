"""The worker's gRPC server: Personalize and Admin handlers over a `personalize.worker.Worker`.

Handlers are thin: translate the request (service/server/convert.py, which also enforces the limits), call the
worker with the caller's tenant (`current_tenant()`, set by the auth interceptor), translate back. Domain
errors become status codes in the error interceptor, never here.

    server, port = create_server(ServiceConfig(port=0), worker)   # tests; health stays NOT_SERVING
    serve(ServiceConfig(), worker, stop=threading.Event())        # the CLI: until SIGTERM/SIGINT
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from personalize.engine.types import GenerationResult
from personalize.errors import InvalidArgument
from personalize.feedback.events import FeedbackEvent
from personalize.routing.announce import AnnounceConfig, Announcement, advertised_address
from personalize.worker import GenerationInfo, Worker
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from personalize_service.gen.personalize.v1 import personalize_pb2_grpc as pb_grpc
from personalize_service.server import base, convert
from personalize_service.server.auth import current_tenant
from personalize_service.server.base import (
    NodeState,
    ServiceConfig,
    cancel_with_call,
    concurrency_limiter,
    create,
    feedback_quota,
    time_remaining,
)
from personalize_service.server.leases import SharedConcurrencyLimiter
from personalize_service.server.limits import (
    DEFAULT_LIMITS,
    USER_ID_METADATA_KEY,
    ConcurrencyLimiter,
    FeedbackQuota,
    Limits,
    check_user_id,
)
from personalize_service.server.metrics import ServiceMetrics
from personalize_service.server.observe import current_traceparent, generation_spans

log = logging.getLogger(__name__)


class PersonalizeServicer(pb_grpc.PersonalizeServicer):
    """The app-facing API over one worker."""

    def __init__(
        self,
        worker: Worker,
        limits: Limits = DEFAULT_LIMITS,
        feedback_quota: FeedbackQuota | None = None,
        concurrency: ConcurrencyLimiter | SharedConcurrencyLimiter | None = None,
    ) -> None:
        self.worker = worker
        self.limits = limits
        self.concurrency = concurrency if concurrency is not None else ConcurrencyLimiter(limits)
        self.feedback_quota = feedback_quota if feedback_quota is not None else FeedbackQuota(limits)

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        args = convert.generate_args(request, self.limits)
        tenant = current_tenant()
        with self.concurrency.hold(tenant):
            start = time.time()
            generation = self.worker.generate(tenant, args.user_id, args.prompt, args.params, args.use_base_model)
            cancel_with_call(context, generation.cancel)
            result = generation.result(timeout=time_remaining(context))
        _spans(start, result, generation.info)
        return convert.generate_response(result, generation.info)

    def GenerateStream(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateChunk]:
        args = convert.generate_args(request, self.limits)
        tenant = current_tenant()
        with self.concurrency.hold(tenant):
            start = time.time()
            generation = self.worker.generate(tenant, args.user_id, args.prompt, args.params, args.use_base_model)
            cancel_with_call(context, generation.cancel)
            leftover: list[float] = []  # logprobs of tokens that added no text: the final chunk's
            try:
                for piece in generation.pieces():
                    if piece.text:
                        yield convert.text_chunk(piece.text, piece.logprobs)
                    else:
                        leftover.extend(piece.logprobs)
            except GeneratorExit:  # grpc dropped the stream (client gone): stop generating at once
                generation.cancel()
                raise
            result = generation.result(timeout=time_remaining(context))
        _spans(start, result, generation.info)
        yield convert.final_chunk(result, generation.info, leftover)

    def SubmitFeedback(self, request: pb.FeedbackRequest, context: grpc.ServicerContext) -> pb.FeedbackAck:
        a = convert.feedback_args(request, self.limits)
        tenant = current_tenant()
        self.feedback_quota.check(tenant)
        event = FeedbackEvent(
            tenant,
            a.user_id,
            a.kind,
            a.prompt,
            a.completion,
            a.correction,
            a.rejected,
            a.event_key,
            messages=a.messages,
            trace=current_traceparent(),  # the trainer's round and publish join this call's trace
        )
        event_id, partition = self.worker.submit_feedback(event)  # returns only after the durable append
        return convert.feedback_ack(event_id, partition)

    def GetAdapter(self, request: pb.GetAdapterRequest, context: grpc.ServicerContext) -> pb.AdapterInfo:
        user_id = check_user_id(request.user_id, self.limits)
        return convert.adapter_info(self.worker.get_adapter(current_tenant(), user_id))

    def DeleteUser(self, request: pb.DeleteUserRequest, context: grpc.ServicerContext) -> pb.DeleteUserResponse:
        user_id = check_user_id(request.user_id, self.limits)
        versions, events = self.worker.delete_user(current_tenant(), user_id)
        return convert.delete_response(versions, events)

    def ExportAdapter(self, request: pb.ExportAdapterRequest, context: grpc.ServicerContext) -> pb.AdapterBundle:
        args = convert.export_args(request, self.limits)
        files, info = self.worker.export_adapter(current_tenant(), args.user_id, args.version)
        return convert.adapter_bundle(files, info)

    def ImportAdapter(self, request: pb.ImportAdapterRequest, context: grpc.ServicerContext) -> pb.AdapterInfo:
        args = convert.import_args(request, self.limits)
        return convert.adapter_info(self.worker.import_adapter(current_tenant(), args.user_id, args.files))

    def ImportAdapterStream(
        self, chunks: Iterator[pb.ImportAdapterChunk], context: grpc.ServicerContext
    ) -> pb.AdapterInfo:
        """ImportAdapter of the reassembled chunks (the same validation and import)."""
        return self.ImportAdapter(convert.import_request(chunks, self.limits), context)


def _spans(start: float, result: GenerationResult, info: GenerationInfo) -> None:
    generation_spans(start, result.timings, info.cache_tier, info.adapter_version)


class AdminServicer(pb_grpc.AdminServicer):
    """Operator API for this one node (the router's Admin aggregates nodes)."""

    def __init__(self, worker: Worker, address: str, state: NodeState) -> None:
        self.worker = worker
        self.address = address
        self.state = state

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        return convert.stats_response([self.worker.stats()])

    def ListNodes(self, request: pb.ListNodesRequest, context: grpc.ServicerContext) -> pb.ListNodesResponse:
        engine = self.worker.engine
        node = pb.Node(
            node_id=self.worker.node_id,
            address=self.address,
            state=self.state.state,
            load=engine.running + engine.queue_depth,
            capacity=engine.config.max_batch,
        )
        return pb.ListNodesResponse(nodes=[node])


SERVICE = pb.DESCRIPTOR.services_by_name["Personalize"]


class _Unparseable:
    """A request body that is not a message of its method's type (seen by `_checked`, never a handler)."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


def _parser(message_type: type[Message], received: Any = None) -> Callable[[bytes], Message | _Unparseable]:
    """Parses a request body; counts its bytes in `received` (a Prometheus counter child) when given."""

    def parse(data: bytes) -> Message | _Unparseable:
        if received is not None:
            received.inc(len(data))
        try:
            return message_type.FromString(data)
        except DecodeError:
            return _Unparseable(message_type.DESCRIPTOR.full_name)

    return parse


def _agreeing(request: Any, header: str | None) -> Any:
    """`request` if parsed and its user_id agrees with the `x-user-id` header (an empty one takes it)."""
    if isinstance(request, _Unparseable):
        raise InvalidArgument(f"the request body is not a {request.type_name} message")
    if header is not None:
        if not request.user_id:
            request.user_id = header
        elif request.user_id != header:
            raise InvalidArgument(
                f"{USER_ID_METADATA_KEY} metadata {header!r} differs from the request's user_id {request.user_id!r}"
            )
    return request


def _checked(
    behavior: Callable[[Any, grpc.ServicerContext], Any], streaming: bool = False
) -> Callable[[Any, grpc.ServicerContext], Any]:
    """`behavior` for parsed requests only; an empty user_id takes `x-user-id` metadata, a different one
    is refused (a call is served for the user it was routed by, or not at all). With `streaming`, every
    message of the request stream is held to this as it is read."""

    def run(request: Any, context: grpc.ServicerContext) -> Any:
        header = next((v for k, v in context.invocation_metadata() or () if k == USER_ID_METADATA_KEY), None)
        if streaming:
            return behavior((_agreeing(message, header) for message in request), context)
        return behavior(_agreeing(request, header), context)

    return run


_MAKE_HANDLER = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
}


def add_personalize(
    servicer: pb_grpc.PersonalizeServicer, server: grpc.Server, metrics: ServiceMetrics | None = None
) -> None:
    """Register `servicer` as the generated add_PersonalizeServicer_to_server does, except that a body
    that does not parse is INVALID_ARGUMENT (grpc's own answer would be INTERNAL), `x-user-id`
    metadata must agree with the body (`_checked`) and, with `metrics`, parsed bytes are counted
    (request_bytes_total)."""
    handlers = {}
    for method in SERVICE.methods:
        response_type = getattr(pb, method.output_type.name)
        make = _MAKE_HANDLER[(method.client_streaming, method.server_streaming)]
        received = metrics.request_bytes.labels(rpc=f"{SERVICE.full_name}/{method.name}") if metrics else None
        handlers[method.name] = make(
            _checked(getattr(servicer, method.name), method.client_streaming),
            request_deserializer=_parser(getattr(pb, method.input_type.name), received),
            response_serializer=response_type.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)  # as generated: grpc's faster lookup


def create_server(
    config: ServiceConfig, worker: Worker, metrics: ServiceMetrics | None = None, state: NodeState | None = None
) -> tuple[grpc.Server, int]:
    """A bound, not yet started server with both APIs, health checking and reflection; returns it and its
    port. Health answers NOT_SERVING until `state.serving()` (pass a NodeState to drive it).

    Raises OSError if the address cannot be bound (port taken).
    """

    def register(server: grpc.Server, port: int, state: NodeState) -> None:
        servicer = PersonalizeServicer(worker, config.limits, feedback_quota(config), concurrency_limiter(config))
        add_personalize(servicer, server, metrics)
        address = advertised_address(config.host, port, config.advertise)
        pb_grpc.add_AdminServicer_to_server(AdminServicer(worker, address, state), server)

    return create(config, register, metrics, state, "grpc")


# ---- metrics -----------------------------------------------------------------------------------------


class MetricsRefresher:
    """Copies the worker's counters (cache hits/misses/evictions, loads, tokens, batch and slot occupancy,
    queue depth, finished requests' latencies) into
    `metrics` every `period_s`, on a daemon thread, as increments since the previous copy."""

    def __init__(self, metrics: ServiceMetrics, worker: Worker, period_s: float = 1.0) -> None:
        self.metrics, self.worker, self.period_s = metrics, worker, period_s
        self._hits: dict[str, int] = {}
        self._misses: dict[str, int] = {}
        self._evictions: dict[str, int] = {}
        self._tokens = self._steps = self._occupancy = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-refresh", daemon=True)

    def start(self) -> MetricsRefresher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.refresh()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.refresh()
            except Exception:  # a metrics hiccup must never take the server down
                log.exception("metrics refresh failed")

    def refresh(self) -> None:
        """Apply the changes since the last call."""
        m, stats, engine = self.metrics, self.worker.stats(), self.worker.engine
        for tier, count in stats.hits.items():
            m.cache_hits.labels(tier=tier).inc(count - self._hits.get(tier, 0))
        for tier, count in stats.misses.items():
            m.cache_misses.labels(tier=tier).inc(count - self._misses.get(tier, 0))
        self._hits, self._misses = dict(stats.hits), dict(stats.misses)
        cache = self.worker.cache.stats()
        for tier, count in cache["evictions"].items():
            m.cache_evictions.labels(tier=tier).inc(count - self._evictions.get(tier, 0))
        self._evictions = dict(cache["evictions"])
        slots = cache["slots"]["device"]
        m.slot_occupancy.set(cache["resident"]["device"] / slots if slots else 0.0)
        for result in engine.take_finished():
            m.observe_result(result)
        m.requests_running.set(engine.running)
        m.requests_waiting.set(engine.queue_depth)
        m.lane_occupancy.set(engine.running / engine.config.max_batch)
        for tier, seconds in self.worker.cache.take_load_samples():
            m.adapter_load_seconds.labels(tier=tier).observe(seconds)
        tokens, steps, occupancy = engine.tokens_generated, engine.steps, engine.occupancy_sum
        m.tokens_generated.inc(tokens - self._tokens)
        if steps > self._steps:  # per-step values are not kept: each step of the period gets its mean
            mean = (occupancy - self._occupancy) / (steps - self._steps)
            for _ in range(steps - self._steps):
                m.batch_occupancy.observe(mean)
        self._tokens, self._steps, self._occupancy = tokens, steps, occupancy
        m.queue_depth.set(stats.queue_depth)
        m.feedback_stream_lag.set(stats.stream_lag)


# ---- running until stopped -------------------------------------------------------------------------


class WorkerRole:
    """The worker around the shared server lifecycle (base.serve): the engine, the metrics refresher and,
    with `announce`, its place in membership."""

    name = "worker"

    def __init__(self, worker: Worker, announce: AnnounceConfig | None) -> None:
        self.worker = worker
        self.announce = announce
        self.announcement: Announcement | None = None
        self._config: ServiceConfig | None = None
        self._metrics: ServiceMetrics | None = None
        self._refresher: MetricsRefresher | None = None

    def create(self, config: ServiceConfig, metrics: ServiceMetrics, state: NodeState) -> tuple[grpc.Server, int]:
        self._config, self._metrics = config, metrics
        return create_server(config, self.worker, metrics, state)

    def start(self) -> None:
        assert self._metrics is not None
        self._refresher = MetricsRefresher(self._metrics, self.worker).start()
        self.worker.start()

    def started(self, port: int) -> None:
        if self.announce is not None:
            assert self._config is not None
            address = advertised_address(self._config.host, port, self._config.advertise)
            self.announcement = _announce(self.announce, self.worker, address)
        log.info("node %s", self.worker.node_id)

    def tick(self) -> None:
        pass

    def draining(self) -> None:
        if self.announcement is not None:
            self.announcement.drain()

    def stop(self) -> None:
        if self.announcement is not None:
            self.announcement.leave()
        if self._refresher is not None:
            self._refresher.stop()
        self.worker.stop()


def serve(
    config: ServiceConfig,
    worker: Worker,
    stop: threading.Event,
    metrics: ServiceMetrics | None = None,
    on_ready: Callable[[int, int], None] | None = None,
    announce: AnnounceConfig | None = None,
) -> None:
    """Start the worker and the server, report SERVING, and block until `stop` is set; then shut down
    gracefully (base.serve): announce DRAINING (with `announce`), health NOT_SERVING and new calls refused
    with UNAVAILABLE, calls in flight finish (those still running after grace_s are cancelled), the server
    stops listening, the node leaves membership, then the worker stops. `on_ready(port, metrics_port)` runs
    once SERVING (metrics_port 0 = off). The worker is stopped when this returns or raises.

    With `announce`, the node heartbeats into membership (node id = the worker's, address = the advertised
    one, capacity = engine max_batch, load = running + queued) so routers put it on their ring.

    Raises OSError if the port or metrics port cannot be bound (nothing is left running then), Unavailable
    if membership cannot be reached at start.
    """
    base.serve(config, WorkerRole(worker, announce), stop, metrics, on_ready)


def _announce(config: AnnounceConfig, worker: Worker, address: str) -> Announcement:
    """Join membership as `worker` at `address`; from then on only the users it owns are prefetched."""
    engine = worker.engine
    return Announcement(
        config,
        worker.node_id,
        float(engine.config.max_batch),
        load_fn=lambda: float(engine.running + engine.queue_depth),
        ownership=worker.ownership,
        hot_fn=worker.hot_users,
        warm_fn=worker.warm,
    ).start(address)
