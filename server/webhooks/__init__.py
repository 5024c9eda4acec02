"""Signed webhook deliveries, kept as durable records in the job database (see service.py for the flow).

Dialects call `check_webhook_url` on a submitted `webhook_url` and put it on the JobSpec; `WebhookService` queues a
delivery when the job finishes and delivers it with retries; receivers check signatures with `verify_signature`.
"""

from __future__ import annotations

from typing import Any

from server.webhooks.policy import check_webhook_url
from server.webhooks.service import WebhookService
from server.webhooks.signing import genpicz_signature, verify_signature

__all__ = ["WebhookService", "check_webhook_url", "genpicz_signature", "get_webhook_service", "verify_signature"]


def get_webhook_service(app: Any) -> WebhookService | None:
    """The app's WebhookService, None where none is installed."""
    return getattr(app.state, "webhooks", None)
