"""Online scoring with Ray Serve (see `app.py` for the application)."""

from __future__ import annotations

from ray import serve

from rayad.serve.app import ServeSettings, app_builder, build_app, discover_models

APP_NAME = "rayad"

__all__ = ["APP_NAME", "ServeSettings", "app_builder", "build_app", "discover_models", "start"]


def start(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, proxy_location: str = "HeadOnly"
          ) -> str:
    """Deploy the application on the connected Ray cluster, serving HTTP on host:port; returns its URL.
    One HTTP proxy, on the head node, by default (`serve deploy serve/config.yaml` runs one per node)."""
    serve.start(proxy_location=proxy_location, http_options={"host": host, "port": port})
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"
