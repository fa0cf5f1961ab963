"""The web console: static files under /console, served from the package (server/console/).

The console is a client of the public API like any other: its pages call the same routes with
the tenant's key, so there is no route here but the files. Every file is read once at import
into memory (a few tens of kilobytes), and only those names are served, so no path a client
sends reaches the filesystem.

Each answer carries a strict Content-Security-Policy: scripts and styles only from this origin,
no inline script or style, no plugin, no framing. Tenant text is rendered with textContent by
the pages themselves (docs/console.md); the policy is the second line of defence.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from server.api.errors import error_response

CONSOLE_DIR = Path(__file__).resolve().parent.parent / "console"

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)

HEADERS = {
    "Content-Security-Policy": POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Small files, changed with the package: revalidate rather than serve a stale page.
    "Cache-Control": "no-cache",
}


def read_files(folder: Path) -> dict[str, tuple[bytes, str]]:
    return {
        path.name: (path.read_bytes(), CONTENT_TYPES[path.suffix])
        for path in sorted(folder.iterdir())
        if path.is_file() and path.suffix in CONTENT_TYPES
    }


FILES = read_files(CONSOLE_DIR)

router = APIRouter(include_in_schema=False)


@router.get("/console")
async def console_root(request: Request) -> RedirectResponse:
    """The pages' relative module paths resolve under /console/."""
    return RedirectResponse(f"{request.scope.get('root_path', '')}/console/", headers=HEADERS)


@router.get("/console/")
async def console_index() -> Response:
    return console_file("index.html")


@router.get("/console/{name}")
async def console_asset(name: str) -> Response:
    return console_file(name)


def console_file(name: str) -> Response:
    found = FILES.get(name)
    if found is None:
        response = error_response(404, "not_found", "no such console file")
        response.headers.update(HEADERS)
        return response
    body, content_type = found
    return Response(body, media_type=content_type, headers=HEADERS)
