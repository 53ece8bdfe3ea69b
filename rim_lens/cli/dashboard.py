"""`rim-lens dashboard [RUNS_DIR]`: the Streamlit dashboard over a folder of runs."""

from __future__ import annotations

import argparse
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
        "(under a run's analysis/) only when you start an analysis from the page.",
    )
    p.add_argument(
        "runs", nargs="?", default="runs", metavar="RUNS_DIR", help="folder holding the runs (default: runs)"
    )
    p.add_argument("--port", type=int, default=8501, help="port (default: 8501)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.set_defaults(func=_dashboard)


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
    ]


def _dashboard(args: argparse.Namespace) -> int:
    from rim_lens.errors import ConfigError

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port}: expected a port number 1..65535")
    if not Path(args.runs).is_dir():
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
