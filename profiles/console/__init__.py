"""The operator and auditor console: static pages served by the API process at /console.

Plain HTML, CSS and JavaScript with no build step: the browser calls the same /v1 API
with the key typed into the console, so the console can do nothing its key may not.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(str(files("profiles.console").joinpath("static")))


def mount_console(app: FastAPI, path: str = "/console") -> None:
    """Serve the console's files under `path` (index.html at `path`/)."""

    @app.get(path, include_in_schema=False)
    def console_root() -> RedirectResponse:
        return RedirectResponse(f"{path}/")

    app.mount(path, StaticFiles(directory=STATIC, html=True), name="console")
