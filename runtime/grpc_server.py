"""The KServe v2 / Open Inference Protocol gRPC endpoint, on the node's event loop (grpc.aio).

Service `inference.GRPCInferenceService`, the path Triton's and KServe's clients call:

    ServerLive, ServerReady, ServerMetadata     health and server metadata
    ModelReady, ModelMetadata                   per model (version "1" or empty)
    ModelInfer                                  raw_input_contents or typed contents in,
                                                raw_output_contents out (grpc_protocol.py)

Every other method of the specification (streaming, model config, statistics,
repository, shared memory) is answered UNIMPLEMENTED by grpc itself.

Admission, answers and errors are the HTTP endpoint's: the same parsing and
rendering (v2_protocol.py through grpc_protocol.py) and the same Runtime.infer.
Errors are gRPC statuses whose details name the problem: INVALID_ARGUMENT for a
bad request, NOT_FOUND for an unknown model or version, UNAVAILABLE for overload
or a runtime not ready (with a `retry-after` trailer in seconds), DEADLINE_EXCEEDED,
FAILED_PRECONDITION where HTTP says 409, and INTERNAL only for server faults.
grpc itself answers RESOURCE_EXHAUSTED past the message size limit
(server.max_body_bytes) or past the concurrent call limit (batching.max_queue).
"""
from __future__ import annotations

import asyncio
import logging

import grpc

from e3.models.errors import ModelError

from . import grpc_protocol as gp
from .errors import RuntimeError_
from .proto import grpc_inference_pb2 as pb
from .runtime import Runtime
from .v2_protocol import BadRequest

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
PARSE_INLINE_BYTES = 64 * 1024     # requests above this are converted on a thread, as over HTTP
STATUS_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
                409: grpc.StatusCode.FAILED_PRECONDITION, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
                429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE,
                504: grpc.StatusCode.DEADLINE_EXCEEDED}


class UnknownModel(RuntimeError_):
    """Raised for a model name or version this node does not serve (NOT_FOUND, as HTTP's 404)."""

    status = 404


class InferenceService:
    """The handlers, one per method of the service, named as in the .proto."""

    def __init__(self, runtime: Runtime):
        self.rt = runtime

    async def ServerLive(self, request, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.rt.ready)

    async def ServerMetadata(self, request, context) -> pb.ServerMetadataResponse:
        # As GET /v2 says, less binary_tensor_data: an HTTP extension.
        return pb.ServerMetadataResponse(name="e3", version="0.1.0", extensions=["e3-early-exit"])

    async def ModelReady(self, request, context) -> pb.ModelReadyResponse:
        self._check_model(request.name, request.version)
        return pb.ModelReadyResponse(ready=self.rt.ready)

    async def ModelMetadata(self, request, context) -> pb.ModelMetadataResponse:
        self._check_model(request.name, request.version)
        return gp.model_metadata(self.rt.meta)

    async def ModelInfer(self, request, context) -> pb.ModelInferResponse:
        self._check_model(request.model_name, request.model_version)
        meta = self.rt.meta
        if request.ByteSize() > PARSE_INLINE_BYTES:
            call = await asyncio.get_running_loop().run_in_executor(None, gp.parse_infer, request, meta)
        else:
            call = gp.parse_infer(request, meta)
        limit = self.rt.config.server.max_inputs
        if len(call.inputs) > limit:
            raise BadRequest(f"{len(call.inputs)} inputs in one request; the limit is {limit}")
        results = await self._infer(call.inputs, context.time_remaining())
        return gp.render_infer(call, meta, results, self.rt.epoch)

    async def _infer(self, inputs: list, remaining_s: float | None) -> list:
        """Runtime.infer within the client's deadline; a call the client cancels (or whose
        deadline passes) leaves its admitted inputs to be answered, and counted, by the runtime."""
        timeout_s = self.rt.config.batching.timeout_ms / 1000
        if remaining_s is not None:
            timeout_s = max(min(timeout_s, remaining_s), 1e-3)
        task = asyncio.ensure_future(self.rt.infer(inputs, timeout_s=timeout_s))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_retrieve)
            raise

    def _check_model(self, name: str, version: str) -> None:
        if name != self.rt.meta.name:
            raise UnknownModel(f"unknown model {name!r}; this node serves {self.rt.meta.name!r}")
        if version not in ("", "1"):
            raise UnknownModel(f"unknown version {version!r} of model {name!r}; only '1' exists")


def _retrieve(task: asyncio.Task) -> None:
    """Take a finished task's outcome so that asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


class ErrorMapper:
    """Turns what a handler raised into a gRPC status, counting bad requests like HTTP does."""

    def __init__(self, runtime: Runtime):
        self.rt = runtime

    def wrap(self, handler):
        async def call(request, context):
            try:
                return await handler(request, context)
            except Exception as exc:
                code, message, retry_after = self.status(exc)
            if retry_after is not None:
                context.set_trailing_metadata((("retry-after", str(retry_after)),))
            await context.abort(code, message)
        return call

    def status(self, exc: Exception) -> tuple[grpc.StatusCode, str, int | None]:
        """The code, details and retry-after (seconds, or None) for `exc`; called while handling it."""
        if isinstance(exc, (BadRequest, ModelError)):
            status = 400
        elif isinstance(exc, RuntimeError_):
            status = exc.status
        else:
            log.exception("unexpected error in a gRPC call")
            return grpc.StatusCode.INTERNAL, "internal error (see the node's log)", None
        if status < 500:
            self.rt.metrics.bad_request(status)
        code = STATUS_CODES.get(status, grpc.StatusCode.INVALID_ARGUMENT if status < 500 else grpc.StatusCode.INTERNAL)
        return code, str(exc), getattr(exc, "retry_after_s", None)


def make_handler(runtime: Runtime) -> grpc.GenericRpcHandler:
    """The service's handlers, with each method's messages taken from the .proto."""
    service, errors = InferenceService(runtime), ErrorMapper(runtime)
    methods = {}
    for m in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        methods[m.name] = grpc.unary_unary_rpc_method_handler(
            errors.wrap(getattr(service, m.name)),
            request_deserializer=getattr(pb, m.input_type.name).FromString,
            response_serializer=getattr(pb, m.output_type.name).SerializeToString)
    return grpc.method_handlers_generic_handler(SERVICE, methods)


class GrpcServer:
    """The gRPC listener of a runtime that the caller starts before it and closes after it."""

    def __init__(self, runtime: Runtime, host: str, port: int):
        self.rt, self.host, self.port = runtime, host, port
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def start(self) -> None:
        """Listen on host:port (port 0: a free one, then in self.port)."""
        config = self.rt.config
        server = grpc.aio.server(
            # Each call holds at least one input, and more than max_queue waiting inputs are refused.
            maximum_concurrent_rpcs=config.batching.max_queue,
            options=[("grpc.max_receive_message_length", config.server.max_body_bytes),
                     # Linux would otherwise let a second node share a taken port silently.
                     ("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers((make_handler(self.rt),))
        try:
            self.port = server.add_insecure_port(self.address)
        except RuntimeError as exc:
            await server.stop(None)
            raise RuntimeError_(f"cannot listen on {self.address} for gRPC: the address is in use "
                                "or cannot be bound") from exc
        await server.start()
        self._server = server

    async def stop(self, grace_s: float = 5.0) -> None:
        """Refuse new calls, give running ones `grace_s` to finish, then cancel the rest."""
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
