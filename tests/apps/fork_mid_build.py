"""Run as ``python -m tests.apps.fork_mid_build``, in a process that has not imported
ua_parser: a WSGI middleware answers its first request, whose close() starts the user-agent
parser's build in a thread (see _device.build_soon); the process forks while that build
imports ua_parser (an app forking a helper, gunicorn ``--preload``'s master forking its
workers after a warm-up request) and prints which parser the child then classifies with,
or ``hung``."""

from __future__ import annotations

import io
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterable

from agentsight_middleware import AgentSightWSGIMiddleware, _device


def app(environ: dict[str, object], start_response: object) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])  # type: ignore[operator]
    return iter([b"ok"])


def importing_ua_parser() -> bool:
    spec = getattr(sys.modules.get("ua_parser"), "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


def main() -> None:
    assert "ua_parser" not in sys.modules
    with tempfile.TemporaryDirectory() as folder:
        mw = AgentSightWSGIMiddleware(
            app, widget_pages=["/"], local_store=os.path.join(folder, "events.sqlite3")
        )
        environ = {
            "REQUEST_METHOD": "GET",
            "SCRIPT_NAME": "",
            "PATH_INFO": "/health",
            "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "80",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "127.0.0.1",
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(),
            "wsgi.errors": sys.stderr,
        }
        response = mw(environ, lambda status, headers, exc_info=None: None)
        b"".join(response)
        response.close()  # type: ignore[attr-defined]
        deadline = time.monotonic() + 10
        while not importing_ua_parser():
            assert time.monotonic() < deadline, "the build did not start"
            time.sleep(0.0002)
        pid = os.fork()
        if pid == 0:
            built: list[str] = []
            thread = threading.Thread(target=lambda: built.append(_device.backend()), daemon=True)
            thread.start()
            thread.join(20)
            print(built[0] if built else "hung", flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
        mw.close()


if __name__ == "__main__":
    main()
