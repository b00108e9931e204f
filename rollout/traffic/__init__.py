"""Where a pilot's requests come from. One module per source (like metric providers in progressive-delivery
tools): `dataset` (the use case's validated dataset, finite) and `request_log` (captured production
prompts, streamed). Every source hands out each request id at most once per pilot, never invents ids and
never hands out a prompt twice (`prompt_key`): a pilot can never know more than its distinct requests tell
it (docs/flows.md, "Traffic")."""

from rollout.traffic.base import (
    Request,
    TrafficError,
    TrafficSource,
    exhaustion_note,
    importable,
    prompt_key,
    source_for,
    traffic_order_key,
)
from rollout.traffic.dataset import DatasetSource
from rollout.traffic.request_log import RequestLogSource

__all__ = [
    "DatasetSource",
    "Request",
    "RequestLogSource",
    "TrafficError",
    "TrafficSource",
    "exhaustion_note",
    "importable",
    "prompt_key",
    "source_for",
    "traffic_order_key",
]
