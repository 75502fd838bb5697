"""The baseline: a bare aiohttp server on a Unix socket answering one fixed body.

python -m bench.baseline SOCKET BODYFILE [--uvloop]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from aiohttp import web


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("socket")
    parser.add_argument("body")
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args()
    body = Path(args.body).read_bytes()
    headers = {"Content-Type": "application/json; charset=utf-8", "Cache-Control": "no-store"}

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=body, headers=headers)

    async def ping(request: web.Request) -> web.Response:
        return web.Response(text="healthy", content_type="text/plain")

    app = web.Application()
    app.router.add_get("/ping", ping)
    app.router.add_get("/v1/secrets/{name:.+}", answer)
    if os.path.exists(args.socket):
        os.unlink(args.socket)
    loop_factory = None
    if args.uvloop:
        import uvloop

        loop_factory = uvloop.new_event_loop
    web.run_app(
        app,
        path=args.socket,
        print=None,
        access_log=None,
        loop=loop_factory() if loop_factory else None,
    )


if __name__ == "__main__":
    main()
