"""Start the Streamlit dashboard (dashboard/app.py, installed as rayad._bundled.dashboard) on a runs directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from rayad._bundled import bundled
from rayad.errors import RayadError
from rayad.settings import DASHBOARD_PORT, LOCAL_HOST, check_can_listen


def app_path() -> Path:
    """The installed dashboard app."""
    return bundled("dashboard") / "app.py"


def streamlit_command(runs: Path, host: str, port: int, serve_url: str | None) -> tuple[list[str], dict[str, str]]:
    """The `streamlit run` command line and environment that show `runs`."""
    if not runs.is_dir():
        raise RayadError(f"--runs {runs}: " + ("a file, not a folder" if runs.exists() else "no such directory"))
    app = app_path()
    if not app.is_file():
        raise RayadError(f"{app}: the dashboard app is missing from this rayad installation")
    check_can_listen(host, port)
    env = {**os.environ, "RAYAD_RUNS": str(runs.absolute())}
    if serve_url:
        if not serve_url.startswith(("http://", "https://")):
            raise RayadError(f"--serve-url {serve_url}: needs http:// or https://")
        env["RAYAD_SERVE_URL"] = serve_url
    argv = [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", host, "--server.port", str(port),
            "--server.headless", "true", "--browser.gatherUsageStats", "false", "--client.toolbarMode", "viewer"]
    return argv, env


def run_dashboard(runs: Path, host: str = LOCAL_HOST, port: int = DASHBOARD_PORT, serve_url: str | None = None) -> None:
    """Replace this process with Streamlit's server (so Ctrl-C and signals reach it directly)."""
    argv, env = streamlit_command(runs, host, port, serve_url)
    print(f"rayad dashboard: http://{host}:{port} showing {runs}", flush=True)
    os.execve(argv[0], argv, env)
