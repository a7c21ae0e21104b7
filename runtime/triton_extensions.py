"""Triton's HTTP protocol extensions that clients and tools query before they infer.

    GET|POST /v2/repository/index                      model repository index
    GET  /v2/models/{m}[/versions/{v}]/config          model configuration
    GET  /v2/models[/{m}[/versions/{v}]]/stats         inference statistics

In the JSON shapes of Triton's `extension_model_repository.md`,
`extension_model_configuration.md` and `extension_statistics.md`, so that
`tritonclient.http`'s get_model_repository_index(), get_model_config() and
get_inference_statistics() work unchanged. A node serves one model, version "1".
The repository's load and unload calls are not served: the model is fixed when
the node starts. Errors are `{"error": ...}` JSON, as everywhere on the endpoint.
"""
from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from aiohttp import web

from . import v2_protocol as v2
from .metrics import Duration, InferenceStats
from .v2_protocol import BadRequest

EXTENSIONS = ("model_repository", "model_configuration", "statistics")

# Triton's config names for the v2 datatypes (model_config.proto's DataType).
CONFIG_TYPES = {"BYTES": "TYPE_STRING", "BOOL": "TYPE_BOOL",
                **{dt: f"TYPE_{dt}" for dt in v2.NUMPY_TYPES}}


class TritonExtensions:
    """The handlers, given how the endpoint finds its runtime, checks a model name in the URL
    (raising its 404) and reads a body (Content-Encoding and all)."""

    def __init__(self, runtime_of: Callable, check_model: Callable, read_body: Callable[..., Awaitable[bytes]]):
        self.runtime_of, self.check_model, self.read_body = runtime_of, check_model, read_body

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v2/repository/index", self.repository_index)
        app.router.add_post("/v2/repository/index", self.repository_index)
        app.router.add_get("/v2/models/stats", self.all_stats)
        for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            app.router.add_get(prefix + "/config", self.model_config)
            app.router.add_get(prefix + "/stats", self.model_stats)

    async def repository_index(self, request: web.Request) -> web.Response:
        rt = self.runtime_of(request)
        ready_only = _index_request(await self.read_body(request)) if request.method == "POST" else False
        entries = [{"name": rt.meta.name, "version": "1", "state": "READY" if rt.ready else "UNAVAILABLE",
                    "reason": "" if rt.ready else "the runtime is starting, stopping, or has no live worker"}]
        return web.json_response([e for e in entries if e["state"] == "READY" or not ready_only])

    async def model_config(self, request: web.Request) -> web.Response:
        return web.json_response(config_of(self.check_model(request)))

    async def model_stats(self, request: web.Request) -> web.Response:
        rt = self.check_model(request)
        return web.json_response({"model_stats": [stats_of(rt.meta.name, rt.metrics.stats)]})

    async def all_stats(self, request: web.Request) -> web.Response:
        rt = self.runtime_of(request)
        return web.json_response({"model_stats": [stats_of(rt.meta.name, rt.metrics.stats)]})


def _index_request(raw: bytes) -> bool:
    """The index request's "ready" flag; tritonclient sends an empty body, Triton's curl examples none."""
    if not raw.strip():
        return False
    body = v2.strict_json(raw)
    if not isinstance(body, dict):
        raise BadRequest("the repository index request must be a JSON object, e.g. {\"ready\": true}")
    ready = body.get("ready", False)
    if not isinstance(ready, bool):
        raise BadRequest(f"the repository index request's 'ready' must be true or false, got {json.dumps(ready)[:60]}")
    return ready


def config_of(rt) -> dict:
    """The model's configuration as Triton's ModelConfig JSON: inputs and outputs without the batch
    dimension (max_batch_size > 0), E3's batching as dynamic batching, its workers as instances."""
    m, b = rt.meta, rt.config.batching
    inputs = [_tensor_config(t["name"], t["datatype"], t["shape"][1:]) for t in v2.input_metadata(m)]
    outputs = [_tensor_config(t["name"], t["datatype"], t["shape"][1:]) for t in v2.output_metadata(m)]
    devices = sorted({w.device for w in rt.workers.values()})
    gpu = any(d.startswith("cuda") for d in devices)
    batch = rt.placement.batch if rt.placement else (b.batch or 0)
    return {
        "name": m.name, "platform": f"e3-early-exit/{m.family}", "backend": "e3",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": rt.config.server.max_inputs,
        "input": inputs, "output": outputs,
        "dynamic_batching": {"preferred_batch_size": [batch] if batch else [],
                             "max_queue_delay_microseconds": int(b.slo_ms * (1 - b.slo_reserve) * 1000)},
        "instance_group": [{"name": f"{m.name}_0", "kind": "KIND_GPU" if gpu else "KIND_CPU",
                            "count": len(rt.workers),
                            "gpus": sorted({int(d.split(":")[1]) for d in devices if d.startswith("cuda:")})}],
        # Triton's parameters map holds strings; E3's own description travels as JSON text.
        "parameters": {"e3": {"string_value": json.dumps(m.describe())},
                       "policy": {"string_value": json.dumps(rt.policy.describe())}},
    }


def _tensor_config(name: str, datatype: str, dims: list[int]) -> dict:
    out = {"name": name, "data_type": CONFIG_TYPES[datatype], "dims": list(dims) or [1]}
    if not dims:     # one value per input: Triton spells it dims [1], reshaped to a scalar
        out["reshape"] = {"shape": []}
    return out


def stats_of(name: str, s: InferenceStats) -> dict:
    """One $model_stat of Triton's statistics extension. E3 times a worker's batch as a whole, so
    compute_infer holds it all and compute_input / compute_output count with 0 ns."""
    unsplit = Duration(s.compute.count, 0)
    return {
        "name": name, "version": "1", "last_inference": s.last_inference_ms,
        "inference_count": s.inference_count, "execution_count": s.execution_count,
        "inference_stats": {
            "success": _duration(s.success), "fail": _duration(s.fail), "queue": _duration(s.queue),
            "compute_input": _duration(unsplit), "compute_infer": _duration(s.compute),
            "compute_output": _duration(unsplit), "cache_hit": _duration(Duration()),
            "cache_miss": _duration(Duration())},
        "batch_stats": [{"batch_size": rows, "compute_input": _duration(Duration(d.count, 0)),
                         "compute_infer": _duration(d), "compute_output": _duration(Duration(d.count, 0))}
                        for rows, d in sorted(s.by_batch.items())],
    }


def _duration(d: Duration) -> dict:
    return {"count": d.count, "ns": d.ns}
