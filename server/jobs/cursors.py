"""Keyset-pagination cursors over job records, shared by the listings that page through jobs (GenPicz history,
/v2/history).

Opaque to clients: the last listed job's (created_at, id) behind a versioned prefix per listing, so new jobs cannot
shift the next page, deleting that job does not break the cursor, and one listing's cursor is refused by another.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime

from server.jobs.db import JobRecord


class BadCursor(ValueError):
    """Not a cursor this listing made."""


def encode_cursor(record: JobRecord, prefix: str) -> str:
    raw = f"{prefix}{record.created_at.isoformat()}|{record.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, prefix: str) -> tuple[datetime, str]:
    """(created_at, job id) of the cursor's job; BadCursor when it is not one of `prefix`'s cursors."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not raw.startswith(prefix):
            raise BadCursor(cursor)
        created_at, _, job_id = raw[len(prefix) :].partition("|")
        when = datetime.fromisoformat(created_at)
        if not job_id or when.tzinfo is None:
            raise BadCursor(cursor)
        return when, job_id
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadCursor(cursor) from None
