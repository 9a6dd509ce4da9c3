"""Engine failures a caller must tell apart from bad requests (issue 5): bad requests raise
`ValueError` (HTTP 400); these mean "not now" (HTTP 503)."""

from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The engine is not running (not started, shutting down, or its loop failed)."""


class EngineBusyError(EngineDeadError):
    """Too many requests are already queued (`EngineConfig.max_queued_requests`); retry later."""
