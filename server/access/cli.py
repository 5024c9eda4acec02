"""`easel keys create | list | revoke`: manage API keys in the server's database (the server need not be stopped:
every request reads the keys from the database)."""

from __future__ import annotations

import argparse
import sys

from server.access.keys import CUSTOM_PLAN, PLANS, KeyConfigError, KeyStore
from server.jobs.db import create_tables, make_engine
from server.settings import Settings


def _store(settings: Settings) -> KeyStore:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.resolved_database_url)
    create_tables(engine)
    return KeyStore(engine)


def run(args: argparse.Namespace, settings: Settings) -> int:
    store = _store(settings)
    if args.keys_command == "create":
        try:
            key = store.create(args.name, args.plan, args.rate_limit, args.quota, args.admin)
        except KeyConfigError as e:
            print(f"easel: {e}", file=sys.stderr)
            return 2
        quota = "unlimited" if key.quota is None else f"{key.quota} credits"
        print(
            f"created {key.id} ({key.name}): plan {key.plan}, {key.rate_limit} requests/minute, {quota}"
            + (", admin" if key.admin else "")
        )
        print(f"API key (shown once, store it now): {key.secret}")
        print(f"webhook signing secret: {key.webhook_secret}")
        return 0
    if args.keys_command == "list":
        for k in store.list(include_revoked=args.all):
            quota = "unlimited" if k.quota is None else f"{k.credits_used}/{k.quota}"
            state = f"revoked {k.revoked_at:%Y-%m-%d}" if k.revoked_at else "active"
            admin = " admin" if k.admin else ""
            print(f"{k.id}  {k.name}  {k.prefix}…  {k.plan} {k.rate_limit}/min  credits {quota}  {state}{admin}")
        return 0
    revoked = store.revoke(args.key)
    if not revoked:
        print(f"easel: no active key with id or name '{args.key}'", file=sys.stderr)
        return 1
    print(f"revoked {revoked} key(s)")
    return 0


def add_parser(sub: argparse._SubParsersAction, add_common) -> None:
    p_keys = sub.add_parser("keys", help="manage API keys (create, list, revoke)")
    keys_sub = p_keys.add_subparsers(dest="keys_command", required=True)
    p_create = keys_sub.add_parser("create", help="create a key; the secret is printed once")
    p_create.add_argument("--name", required=True, help="who the key is for")
    p_create.add_argument("--plan", default="starter", choices=[*PLANS, CUSTOM_PLAN], help="rate-limit plan")
    p_create.add_argument("--rate-limit", type=int, help="requests per minute (required for --plan custom)")
    p_create.add_argument("--quota", type=int, help="credits (1 per image); default unlimited")
    p_create.add_argument("--admin", action="store_true", help="sees every key's jobs")
    p_list = keys_sub.add_parser("list", help="list keys (never the secrets)")
    p_list.add_argument("--all", action="store_true", help="include revoked keys")
    p_revoke = keys_sub.add_parser("revoke", help="revoke a key by id or name")
    p_revoke.add_argument("key", help="key id (key_…) or name")
    for p in (p_create, p_list, p_revoke):
        add_common(p)
