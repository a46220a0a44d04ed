"""The `tiw-facade` command: `serve` (the facade), `emulator` (a stand-in TIW) and `call` (a client).

The composition root: it reads the settings, starts the embedded emulator for `serve --emulator`
(and hands its URL and demo credentials to the settings), then the server.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
import urllib.parse
from collections.abc import Coroutine, Sequence
from typing import Any, NoReturn

from tiw_facade import __version__, settings
from tiw_facade.authz_policy import PolicyError
from tiw_facade.credentials import CredentialsError

# `serve --emulator`'s intake of the emulator's callbacks (TIW_CALLBACK_PORT unless set).
DEMO_CALLBACK_PORT = 8081

log = logging.getLogger("tiw_facade")


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like configuration errors (argparse would print the usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tiw-facade", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = commands.add_parser(
        "serve",
        help="run the gRPC facade",
        description="Run the gRPC facade. Settings come from the environment (see the README); "
        "these flags override it. Credentials come only from the environment.",
    )
    serve.add_argument(
        "--emulator",
        action="store_true",
        help="start an embedded TIW emulator and serve against it with demo credentials "
        "(no Tencent account needed); its address and credentials are logged at start-up",
    )
    serve.add_argument(
        "--emulator-port",
        type=int,
        metavar="PORT",
        help="with --emulator: the embedded emulator's port on 127.0.0.1 (default: any free port)",
    )
    for item in settings.ENVIRONMENT:
        if not item.spec.flag:
            continue
        help = f"{item.spec.help} (overrides {item.env}; default {item.default})".replace("%", "%%")
        if item.is_bool:
            serve.add_argument(item.flag, dest=item.name, action=argparse.BooleanOptionalAction, help=help)
        else:
            serve.add_argument(item.flag, dest=item.name, metavar=item.name.upper(), help=help)

    emulator = commands.add_parser(
        "emulator",
        help="run only the TIW emulator (HTTP)",
        description="Run only the TIW emulator, for a facade started with TIW_ENDPOINT set to its URL "
        "and its demo credentials (docs/emulator.md). POST /_emulator/reset forgets every task and "
        "seeds the documented ones again.",
    )
    emulator.add_argument("--host", default="127.0.0.1")
    emulator.add_argument("--port", type=int, default=8090, help="0: any free port (default: 8090)")
    emulator.add_argument("--rate-limit", type=int, default=20, help="requests per second per action")
    emulator.add_argument(
        "--callback-url",
        default="",
        metavar="URL",
        help="post the tasks' callbacks to URL/callbacks/push|snapshot|video (a facade's intake), "
        "signed with TIW_EMULATOR_CALLBACK_KEY (default: the demo callback key, docs/emulator.md)",
    )
    emulator.add_argument(
        "--log-level", default="INFO", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR")
    )
    from tiw_facade import call

    call.add_arguments(
        commands.add_parser(
            "call",
            help="call one action of a running facade with TIW's JSON; print TIW's JSON answer",
            description=call.DESCRIPTION,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, str | None]:
    """The flags given, as text for the settings' parsers (the same as the environment's)."""
    given: dict[str, str | None] = {}
    for item in settings.ENVIRONMENT:
        value = getattr(args, item.name, None)
        if isinstance(value, bool):
            value = "true" if value else "false"
        given[item.name] = value
    return given


def load_settings(args: argparse.Namespace) -> settings.Settings:
    if not args.emulator:
        return settings.load(overrides=_overrides(args))
    from tiw_facade.emulator import (
        DEMO_CALLBACK_KEY,
        DEMO_CALLBACK_SDK_APP_IDS,
        DEMO_REGION,
        DEMO_SECRET_ID,
        DEMO_SECRET_KEY,
    )

    # The emulator accepts only its demo key; the region is the caller's to choose. Its callbacks
    # come to the intake on 8081 (beside `make serve`'s 8080 and 50051), signed with the demo key.
    demo = {"secret_id": DEMO_SECRET_ID, "secret_key": DEMO_SECRET_KEY, "session_token": ""}
    callbacks = {
        "callback_port": str(DEMO_CALLBACK_PORT),
        "callback_keys": ",".join(f"{app}={DEMO_CALLBACK_KEY}" for app in DEMO_CALLBACK_SDK_APP_IDS),
    }
    defaults = {"region": DEMO_REGION, **callbacks}
    return settings.load(overrides={**_overrides(args), **demo}, defaults=defaults)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "serve" and args.emulator_port is not None and not args.emulator:
        parser.error("--emulator-port needs --emulator")
    if args.command == "call":  # a client: no settings, no logging set-up
        from tiw_facade import call

        return call.main(args)
    from tiw_facade import logs

    if args.command == "emulator":
        logs.configure(args.log_level)
        try:
            return _run(_emulator(args.host, args.port, args.rate_limit, args.callback_url))
        except OSError as exc:  # a busy port
            log.error("cannot start", extra={"error": f"--port {args.port}: {exc.strerror or exc}"})
            return 1

    try:
        config = load_settings(args)
    except settings.SettingsError as exc:
        print(f"tiw-facade: configuration error: {exc}", file=sys.stderr)
        return 2

    # Each Redis URL whole and its password alone: a library may log either.
    urls = (config.redis_url, config.answers_redis_url, config.idempotency_redis_url, config.events_redis_url)
    passwords = tuple(urllib.parse.urlsplit(url).password or "" for url in urls)
    callback_keys = tuple(key for _, key in config.callback_keys)
    secrets = (config.secret_key, config.session_token, *urls, *passwords, *callback_keys)
    logs.configure(config.log_level, secrets=secrets)
    try:
        return _run(_serve(config, with_emulator=args.emulator, emulator_port=args.emulator_port or 0))
    except OSError as exc:  # a busy port: the message names the setting
        log.error("cannot start", extra={"error": str(exc)})
        return 1
    except CredentialsError as exc:  # no source, a half-configured one, or a first STS call refused
        print(f"tiw-facade: credentials: {exc}", file=sys.stderr)
        return 2
    except PolicyError as exc:  # TIW_AUTHZ_POLICY_FILE unreadable or malformed (at start-up)
        print(f"tiw-facade: authorization policy: {exc}", file=sys.stderr)
        return 2


def _announce(url: str, what: str) -> None:
    """Where the emulator listens and the one key it accepts, in words a newcomer can act on (the
    SecretKey is the public demo one, named in docs/emulator.md; the log would redact it anyway)."""
    from tiw_facade.emulator import ADMIN_PREFIX, DEMO_REGION, DEMO_SECRET_ID

    reset = f"{url}{ADMIN_PREFIX}/reset"
    log.info(
        "%s listening on %s; it accepts only its demo key: SecretId %s with the demo SecretKey "
        "(docs/emulator.md), any region (%s by default); `curl -X POST %s` resets its tasks",
        what,
        url,
        DEMO_SECRET_ID,
        DEMO_REGION,
        reset,
        extra={"endpoint": url, "secret_id": DEMO_SECRET_ID, "reset": reset},
    )


async def _serve(config: settings.Settings, *, with_emulator: bool, emulator_port: int = 0) -> int:
    from tiw_facade.server import serve

    if not with_emulator:
        return await serve(config)
    from tiw_facade.emulator import DEMO_CALLBACK_KEY, Emulator, EmulatorConfig

    # Its callbacks go to the facade's intake, whose port must be known now (0 would be chosen later).
    port = config.callback_port
    callback_url = f"http://127.0.0.1:{port}" if port else ""
    emulator = Emulator(EmulatorConfig(callback_url=callback_url, callback_key=DEMO_CALLBACK_KEY))
    try:
        url = await emulator.start("127.0.0.1", emulator_port)
    except OSError as exc:  # main() logs it; the message names the flag
        raise OSError(f"--emulator-port {emulator_port}: {exc.strerror or exc}") from exc
    _announce(url, "embedded TIW emulator")
    try:
        return await serve(dataclasses.replace(config, endpoint=url))
    finally:
        await emulator.stop()  # after the facade drained: in-flight calls still reach it


async def _emulator(host: str, port: int, rate_limit: int, callback_url: str = "") -> int:
    from tiw_facade.emulator import DEMO_CALLBACK_KEY, Emulator, EmulatorConfig

    # The key from the environment only: a command line is visible in `ps`.
    key = os.environ.get("TIW_EMULATOR_CALLBACK_KEY", "") or DEMO_CALLBACK_KEY
    config = EmulatorConfig(rate_limit=rate_limit, callback_url=callback_url.rstrip("/"), callback_key=key)
    emulator = Emulator(config)
    # Handlers of its own, as `serve` has: SIGTERM stops it as Ctrl-C does, and Ctrl-C works even
    # when SIGINT came in ignored (a background job of a script), where Python installs no handler.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    _announce(await emulator.start(host, port), "TIW emulator")
    try:
        await stop.wait()
    finally:
        await emulator.stop()
    return 0


def _run(main: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop  # ~10% less CPU per call on the facade path (performance-notes.md)
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        return runner(main)
    except KeyboardInterrupt:  # Ctrl-C before a command's own handlers are in place
        return 0


if __name__ == "__main__":
    sys.exit(main())
