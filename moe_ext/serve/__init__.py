"""Serving: continuous batching over per-row KV caches (engine, scheduler) behind an
OpenAI-compatible HTTP server (launch/serve.py)."""

from moe_ext.serve.engine import (
    ContextTooLong,
    EngineClient,
    EngineStats,
    EngineUnavailable,
    InvalidRequest,
    ProfileWindow,
    QueueFull,
    RequestStream,
    SamplingParams,
    ServeEngine,
    TokenEvent,
)
from moe_ext.serve.scheduler import Scheduler, StepPlan

__all__ = [
    "ContextTooLong",
    "EngineClient",
    "EngineStats",
    "EngineUnavailable",
    "InvalidRequest",
    "ProfileWindow",
    "QueueFull",
    "RequestStream",
    "SamplingParams",
    "Scheduler",
    "ServeEngine",
    "StepPlan",
    "TokenEvent",
]
