"""The web dashboard at ``/ui``: the static files of :mod:`halldyll_ray.ui`, served offline.

The page holds no data and no secret: it signs in with an API key the person types (kept in
the browser's session storage) and calls the public HTTP API like any other client, so the
permission matrix, validation and audit apply unchanged. Every response under ``/ui`` carries
a strict Content-Security-Policy (scripts, styles, images and requests from this origin only;
no inline script; no framing).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

#: Where the dashboard is served.
UI_PATH = "/ui"

#: The headers of every answer under ``/ui``.
UI_HEADERS: dict[str, str] = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


def ui_directory() -> Path:
    """The folder of the dashboard's files (``halldyll_ray/ui``, shipped in the wheel)."""
    return Path(str(resources.files("halldyll_ray") / "ui"))


class UiFiles:
    """The dashboard's files (Starlette's StaticFiles, ``index.html`` for a folder) with
    :data:`UI_HEADERS` on every file served (a missing file is the API's JSON 404, which runs
    no script). Plain attributes: picklable, as ``serve.ingress`` needs."""

    def __init__(self, directory: Path) -> None:
        self.files = StaticFiles(directory=directory, html=True)
        #: The Mount serving these files: named as the route of the request metrics.
        self.route: Any = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.route is not None:
            scope.setdefault("route", self.route)  # the metrics count "/ui", not "unmatched"

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                for name, value in UI_HEADERS.items():
                    if name.lower().encode() not in names:
                        headers.append((name.lower().encode(), value.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.files(scope, receive, with_headers)


async def _to_index(request: Request) -> Response:
    # "/ui" → "/ui/": the page's relative asset paths resolve under the folder.
    return RedirectResponse(f"{request.url.path}/", status_code=308, headers=UI_HEADERS)


def mount_ui(app: FastAPI, *, path: str = UI_PATH) -> None:
    """Serve the dashboard at ``path`` (and redirect ``path`` itself to ``path/``); call at
    import, in every process. Outside the OpenAPI schema."""
    app.router.add_route(path, _to_index, methods=["GET", "HEAD"], include_in_schema=False)
    files = UiFiles(ui_directory())
    app.mount(path, files, name="ui")
    files.route = app.router.routes[-1]
