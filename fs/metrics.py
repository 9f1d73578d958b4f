"""Kept for old imports: every metric of tidefs is defined in `tidefs.telemetry`."""

from tidefs.telemetry import start_exporters as start_exporters

__all__ = ["start_exporters"]
