"""Start the Streamlit dashboard (dashboard/app.py) on a runs directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from rayad.errors import RayadError

APP = Path(__file__).resolve().parents[1] / "dashboard" / "app.py"


def streamlit_command(runs: Path, host: str, port: int, serve_url: str | None) -> tuple[list[str], dict[str, str]]:
    """The `streamlit run` command line and environment that show `runs`."""
    if not runs.is_dir():
        raise RayadError(f"--runs {runs}: no such directory")
    if not APP.is_file():
        raise RayadError(f"{APP}: the dashboard app is missing (install rayad from its source tree)")
    if not 0 < port < 65536:
        raise RayadError(f"--port {port}: not a TCP port")
    env = {**os.environ, "RAYAD_RUNS": str(runs.absolute())}
    if serve_url:
        if not serve_url.startswith(("http://", "https://")):
            raise RayadError(f"--serve-url {serve_url}: needs http:// or https://")
        env["RAYAD_SERVE_URL"] = serve_url
    argv = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.address", host, "--server.port", str(port),
            "--server.headless", "true", "--browser.gatherUsageStats", "false", "--client.toolbarMode", "viewer"]
    return argv, env


def run_dashboard(runs: Path, host: str = "127.0.0.1", port: int = 8501, serve_url: str | None = None) -> None:
    """Replace this process with Streamlit's server (so Ctrl-C and signals reach it directly)."""
    argv, env = streamlit_command(runs, host, port, serve_url)
    print(f"rayad dashboard: http://{host}:{port} showing {runs}", flush=True)
    os.execve(argv[0], argv, env)
