"""Credits: one per image by default, taken from the key's quota when a job is submitted (before any GPU work),
given back when the job produces nothing, and images counted when it completes. Only API keys have quotas; other
owners (HTTP Basic users, an open server) are not charged."""

from __future__ import annotations

from server.access.keys import KeyStore
from server.errors import ApiError

KEY_ID_PREFIX = "key_"


class Accounting:
    def __init__(self, keys: KeyStore, credits_per_image: int = 1):
        self.keys = keys
        self.credits_per_image = credits_per_image

    @staticmethod
    def _charged(owner: str | None) -> bool:
        return owner is not None and owner.startswith(KEY_ID_PREFIX)

    def charge(self, owner: str | None, images: int) -> int:
        """Take the credits for `images`; returns what was charged. 402 when the quota does not cover them."""
        if not self._charged(owner):
            return 0
        credits = images * self.credits_per_image
        if not self.keys.charge(owner, credits):
            key = self.keys.get(owner)
            left = key.credits_remaining if key is not None else 0
            raise ApiError(
                402,
                f"quota exhausted: this request needs {credits} credit(s) and the key has {left} left",
                code="quota_exceeded",
            )
        return credits

    def refund(self, owner: str | None, credits: int) -> None:
        if credits and self._charged(owner):
            self.keys.refund(owner, credits)

    def count_images(self, owner: str | None, images: int) -> None:
        if images and self._charged(owner):
            self.keys.count_images(owner, images)
