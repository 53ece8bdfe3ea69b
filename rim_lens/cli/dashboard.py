"""`rim-lens dashboard [RUNS_DIR]`: the Streamlit dashboard over a folder of runs."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path


def app_path() -> Path:
    import dashboards

    return Path(dashboards.__file__).resolve().parent / "app.py"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dashboard",
        help="browse runs, memory blocks, probes and causal tests in a web dashboard",
        description="Starts Streamlit on the runs folder. It reads only inside RUNS_DIR and writes "
        "(under a run's analysis/) only when you start an analysis from the page. It binds 127.0.0.1; "
        "another --host needs --allow-remote and makes the page read-only unless --allow-actions.",
    )
    p.add_argument(
        "runs", nargs="?", default="runs", metavar="RUNS_DIR", help="folder holding the runs (default: runs)"
    )
    p.add_argument("--port", type=int, default=8501, help="port (default: 8501)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a --host other than loopback: anyone who reaches it sees your runs",
    )
    p.add_argument(
        "--allow-actions",
        action="store_true",
        help="with a remote --host, still let the page start analyses (off by default: read-only)",
    )
    p.set_defaults(func=_dashboard)


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address (127.0.0.0/8, ::1) or localhost."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_only(args: argparse.Namespace) -> bool:
    """Remote dashboards start no analyses unless the user said so."""
    return not is_loopback(args.host) and not args.allow_actions


def command(args: argparse.Namespace) -> list[str]:
    """The streamlit command line for these arguments."""
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(app_path()),
        "--server.headless",
        "true",
        "--server.address",
        args.host,
        "--server.port",
        str(args.port),
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "minimal",
        "--",
        "--runs",
        args.runs,
        *(["--read-only"] if read_only(args) else []),
    ]


def _dashboard(args: argparse.Namespace) -> int:
    from rim_lens.errors import ConfigError, clip

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port}: expected a port number 1..65535")
    runs = Path(args.runs)
    if runs.exists() and not runs.is_dir():
        raise ConfigError(f"RUNS_DIR {clip(args.runs)}: is a file; give the folder that holds the runs")
    if not args.host.strip() or any(c.isspace() for c in args.host):
        raise ConfigError(f"--host {clip(repr(args.host))}: expected an address, e.g. 127.0.0.1")
    if not is_loopback(args.host):
        if not args.allow_remote:
            raise ConfigError(
                f"--host {clip(args.host)}: not a loopback address, so other machines could open the "
                "dashboard; pass --allow-remote if that is what you want"
            )
        actions = "it can start analyses (--allow-actions)" if args.allow_actions else "it is read-only"
        print(
            f"rim-lens: warning: the dashboard listens on {args.host}: anyone who can reach this machine "
            f"can read the runs in {args.runs}; {actions}",
            file=sys.stderr,
        )
    if not runs.is_dir():
        # Not fatal: the page says so too, and the folder may be filled while it runs.
        print(f"rim-lens: warning: runs directory {args.runs} does not exist yet", file=sys.stderr)
    argv = command(args)
    print(
        f"rim-lens dashboard on http://{args.host}:{args.port} (runs: {args.runs}); Ctrl-C stops it",
        flush=True,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)  # streamlit takes over this process: Ctrl-C and signals reach it directly
    return 0  # not reached
