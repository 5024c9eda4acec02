"""The access settings, checked strictly: a value that does not say exactly who may do what stops the server instead
of quietly opening it (an `EASEL_API_AUTH` that yields no user would otherwise leave it without authentication).

`check_access_settings` is run by `easel serve` before anything starts (one line, exit 2) and again when the app is
built, so an app made some other way (Ray ingress, tests) fails closed too. Messages never repeat a password.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.settings import Settings

API_AUTH_FORMAT = "expected user:password[,user2:password2]"
MIN_WEBHOOK_SECRET_CHARS = 16


class AccessSettingError(ValueError):
    """A malformed access setting; the message names the setting and says what is wrong."""


@dataclass(frozen=True)
class BasicUsers:
    """A1111 `--api-auth` users (HTTP Basic on the A1111 routes) and which of them are admins."""

    passwords: dict[str, str]
    admins: frozenset[str]


def parse_api_auth(spec: str) -> dict[str, str]:
    """A1111's `--api-auth` format, strictly: every comma-separated entry is `user:password`, both non-empty."""
    if not spec.strip():
        raise AccessSettingError(f"EASEL_API_AUTH is set but empty ({API_AUTH_FORMAT}); unset it to use API keys only")
    users: dict[str, str] = {}
    for number, entry in enumerate(spec.split(","), start=1):
        user, sep, password = entry.strip().partition(":")
        where = f"EASEL_API_AUTH entry {number}"
        if not entry.strip():
            raise AccessSettingError(f"{where} is empty ({API_AUTH_FORMAT}, no stray commas)")
        if not sep:
            raise AccessSettingError(f"{where} has no ':' ({API_AUTH_FORMAT})")
        if not user:
            raise AccessSettingError(f"{where} has an empty user name ({API_AUTH_FORMAT})")
        if not password:
            raise AccessSettingError(f"{where} (user '{user}') has an empty password ({API_AUTH_FORMAT})")
        if user in users:
            raise AccessSettingError(f"{where}: user '{user}' is listed twice")
        users[user] = password
    return users


def basic_users(settings: Settings) -> BasicUsers:
    """The Basic-auth users of `settings`; raises AccessSettingError for anything malformed."""
    passwords = parse_api_auth(settings.api_auth.get_secret_value()) if settings.api_auth is not None else {}
    admins = frozenset(settings.api_auth_admins)
    if unknown := sorted(admins - set(passwords)):
        raise AccessSettingError(
            f"EASEL_API_AUTH_ADMINS names user(s) not in EASEL_API_AUTH: {', '.join(unknown)}"
            if passwords
            else "EASEL_API_AUTH_ADMINS is set but EASEL_API_AUTH has no users"
        )
    return BasicUsers(passwords, admins)


def check_access_settings(settings: Settings) -> BasicUsers:
    """Every access setting well-formed, or AccessSettingError saying which is not."""
    users = basic_users(settings)
    if settings.webhook_secret is not None and len(settings.webhook_secret.get_secret_value().strip()) < (
        MIN_WEBHOOK_SECRET_CHARS
    ):
        raise AccessSettingError(
            f"EASEL_WEBHOOK_SECRET is shorter than {MIN_WEBHOOK_SECRET_CHARS} characters: deliveries signed with it "
            "could be forged; set a long random value or unset it (a random one is then kept in the data directory)"
        )
    wildcard = "*" in settings.cors_allow_origins or settings.cors_allow_origin_regex in (".*", "^.*$")
    if settings.cors_allow_credentials and wildcard:
        raise AccessSettingError(
            "EASEL_CORS_ALLOW_CREDENTIALS with every origin allowed would let any web page call this server with a "
            "visitor's credentials: list the origins in EASEL_CORS_ALLOW_ORIGINS"
        )
    return users
