"""What the Python driver programs share: settings from the environment, the statements, the
tenant of each client and the failure convention (a FAIL line on stderr, exit status 1).

The contract the programs follow is in ../README.md.
"""

import os
import sys


def env(name, default=None):
    value = os.environ.get(name, default)
    if value is None:
        fail(f"environment variable {name} is not set")
    return value


def fail(message):
    print(f"FAIL: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


class CheckFailed(Exception):
    """A result differs from what the client must see."""


def check(cond, what):
    if not cond:
        raise CheckFailed(what)


HOST = env("DRIVER_HOST")
PORT = int(env("DRIVER_PORT"))
USER = env("DRIVER_USER")
PASSWORD = env("DRIVER_PASSWORD")
DB = env("DRIVER_DB")
CLIENTS = int(env("DRIVER_CLIENTS", "20"))
TXNS = int(env("DRIVER_TXNS", "50"))
TENANTS = int(env("DRIVER_TENANTS", "3"))
# The proxy's pool size: this many connections in transactions at once hold every server.
POOL_SIZE = int(env("DRIVER_POOL_SIZE", "4"))

# Every tenth transaction inserts a row and rolls back.
COMMITTED = TXNS - TXNS // 10

ITEMS = "SELECT tenant, count(*)::int AS rows FROM items GROUP BY tenant"
SHAPE = "SELECT * FROM public.shape ORDER BY id"


def summary(results, show):
    """Distinct results with how many connections got each, for a progress line."""
    counts = {}
    for r in results:
        counts[show(r)] = counts.get(show(r), 0) + 1
    return " | ".join(f"{n} x {text}" for text, n in counts.items())


def tenant_of(client):
    """Tenant schema of `client`: clients are spread over the tenants round-robin."""
    return f"tenant_{client % TENANTS + 1}"


def rows_of(tenant):
    """Rows in `tenant_N.items` (the Rust test inserts 10 * N)."""
    return 10 * int(tenant.split("_")[1])
