"""Credits: one per image by default, for API keys only (HTTP Basic users and an open server are not charged).

Reserved when the work is submitted (before any GPU work; 402 when the quota does not cover it), charged when it
completes, given back when it fails, is cancelled, or is found interrupted when the server restarts (seed 003
charges on completion; the reservation is what keeps concurrent requests from overdrawing a quota). Each
reservation is a row in `credit_reservations`, closed exactly once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from server.access.keys import KeyStore
from server.errors import ApiError

KEY_ID_PREFIX = "key_"

log = logging.getLogger("easel.access")


@dataclass(frozen=True)
class Reservation:
    """Credits held for one piece of work; `id` None when nothing was reserved (an owner without a quota)."""

    id: str | None = None
    owner: str | None = None
    credits: int = 0


NOTHING = Reservation()


class Accounting:
    def __init__(self, keys: KeyStore, credits_per_image: int = 1):
        self.keys = keys
        self.credits_per_image = credits_per_image

    @staticmethod
    def _charged(owner: str | None) -> bool:
        return owner is not None and owner.startswith(KEY_ID_PREFIX)

    def reserve(
        self, owner: str | None, images: int, job_id: str | None = None, runner: str | None = None
    ) -> Reservation:
        """Hold the credits for `images`. 402 when the quota does not cover them."""
        if not self._charged(owner):
            return NOTHING
        credits = images * self.credits_per_image
        reservation_id = self.keys.reserve(owner, credits, job_id, runner) if credits else None
        if credits and reservation_id is None:
            key = self.keys.get(owner)
            left = key.credits_remaining if key is not None else 0
            raise ApiError(
                402,
                f"quota exhausted: this request needs {credits} credit(s) and the key has {left} left",
                code="quota_exceeded",
            )
        return Reservation(reservation_id, owner, credits)

    def complete(self, reservation: Reservation, images: int) -> None:
        """The work completed with `images` images: the reserved credits are charged."""
        if reservation.id is not None or (images and self._charged(reservation.owner)):
            self.keys.settle(reservation.id, reservation.owner if self._charged(reservation.owner) else None, images)

    def release(self, reservation: Reservation) -> None:
        """The work produced nothing (refused, failed, cancelled, interrupted): the credits go back, once."""
        if reservation.id is not None:
            self.keys.release(reservation.id)

    def release_job(self, job_id: str) -> None:
        """Give back what a job holds, whoever reserved it (a job cancelled that no live process runs)."""
        reservation_id = self.keys.reservation_of_job(job_id)
        if reservation_id is not None:
            self.keys.release(reservation_id)

    def recover(self, stale_before: datetime | None = None) -> None:
        """At start-up (and, with a shared database, now and then): close what stopped processes left open."""
        charged, returned = self.keys.recover_reservations(stale_before)
        if returned:
            log.warning("gave back %d credit(s) held by work a stopped server left unfinished", returned)
        if charged:
            log.info("charged %d completed job(s) whose credits a stopped server left reserved", charged)
