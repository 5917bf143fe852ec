"""The `lazycat` console script: `up` runs the box, `manage` is Django's manage.py, `check` shows
the configuration in force, `run NAME` becomes one process of the box (for systemd).

The environment is read by lazycat.settings only; this module just picks the settings module.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

DEFAULT_SETTINGS = "lazycat.settings"


def _load_settings() -> Any:
    """Set Django up; a bad environment value becomes `lazycat: <message>` and exit status 2."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", DEFAULT_SETTINGS)
    import django
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured

    try:
        django.setup()
    except ImproperlyConfigured as exc:
        # The settings module words these for people (variable, value, what it expects); a
        # traceback would only bury that.
        print(f"lazycat: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return settings


def _describe_database(db: dict[str, Any]) -> str:
    engine = str(db.get("ENGINE", "")).rsplit(".", 1)[-1]
    if engine == "sqlite3":
        return f"sqlite {db.get('NAME')}"
    where = str(db.get("HOST") or "localhost")
    if db.get("PORT"):
        where += f":{db['PORT']}"
    user = f"{db['USER']}@" if db.get("USER") else ""
    return f"{engine} {user}{where}/{db.get('NAME')}"


def cmd_up(args: argparse.Namespace) -> int:
    settings = _load_settings()
    from lazycat.supervisor import Supervisor

    return Supervisor(settings, env=dict(os.environ)).run()


def cmd_run(args: argparse.Namespace) -> int:
    """Become one of the box's processes (what the systemd units start), same argv as `up`."""
    settings = _load_settings()
    from lazycat.embedded_redis import EmbeddedRedisError, clear_stale_socket, server_args
    from lazycat.embedded_redis import server_path as redis_server_path
    from lazycat.supervisor import process_specs

    if args.name == "redis":
        if not settings.REDIS_EMBEDDED:
            print("lazycat: REDIS_URL is set, so this box uses that Redis", file=sys.stderr)
            return 2
        try:
            clear_stale_socket(settings.REDIS_SOCKET)
        except EmbeddedRedisError as exc:
            print(f"lazycat: {exc}", file=sys.stderr)
            return 1
        argv = [redis_server_path(), *server_args(settings.REDIS_SOCKET, settings.DATA_DIR)]
    else:
        specs = {spec.name: spec for spec in process_specs(settings)}
        if args.name not in specs:
            names = ", ".join(["redis", *specs])
            print(
                f"lazycat: no process called {args.name!r}; choose one of {names}", file=sys.stderr
            )
            return 2
        argv = list(specs[args.name].argv)
    os.environ["PYTHONUNBUFFERED"] = "1"
    sys.stdout.flush()
    # exec, not a child: under systemd the unit's main PID is then the server itself, so its
    # signals, exit status and restarts are the real process's.
    os.execv(argv[0], argv)  # noqa: S606 - our own fixed argv, no shell involved
    return 0  # not reached


def cmd_check(args: argparse.Namespace) -> int:
    settings = _load_settings()
    from lazycat.supervisor import console_url, redact_url

    if settings.REDIS_EMBEDDED:
        redis_mode = f"embedded, unix socket {settings.REDIS_SOCKET}"
    else:
        redis_mode = f"external, {redact_url(settings.REDIS_URL)}"
    host, port = settings.LISTEN_HOST, settings.LISTEN_PORT
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    print(f"settings:  {os.environ['DJANGO_SETTINGS_MODULE']}")
    print(f"data dir:  {settings.DATA_DIR}")
    print(f"database:  {_describe_database(settings.DATABASES['default'])}")
    print(f"redis:     {redis_mode}")
    print(f"listen:    {listen} ({console_url(host, port)})")
    return 0


def cmd_manage(argv: Sequence[str]) -> int:
    _load_settings()
    from django.core.management import execute_from_command_line

    execute_from_command_line(["lazycat manage", *argv])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lazycat",
        description="lazycat, the network console of a home server.",
        epilog="Configuration comes from the environment; see deploy/lazycat.env.example.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up = commands.add_parser(
        "up",
        help="run the whole box in the foreground (Redis, web, worker, beat); Ctrl-C stops it",
    )
    up.set_defaults(func=cmd_up)
    run = commands.add_parser(
        "run", help="run one process of the box in the foreground (used by the systemd units)"
    )
    run.add_argument("name", help="redis, web, worker, beat or transportd")
    run.set_defaults(func=cmd_run)
    check = commands.add_parser("check", help="load the settings and show what is configured")
    check.set_defaults(func=cmd_check)
    # Only listed here for --help: main() hands everything after `manage` to Django untouched,
    # because argparse would otherwise try to interpret Django's own options.
    commands.add_parser(
        "manage", help="Django's manage.py (migrate, createsuperuser, …)", add_help=False
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "manage":
        return cmd_manage(args_list[1:])
    args = build_parser().parse_args(args_list)
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
