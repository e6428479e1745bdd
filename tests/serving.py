"""Helpers for the server's tests (tests/test_serve.py, tests/test_serve_browser.py): the built-in model loaded once,
a server on 127.0.0.1 and a free port, in this process (uvicorn in a thread) or as a `flux serve` subprocess, always
shut down."""

import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STARTUP_SECONDS = 180  # loading the tiny model and importing torch on a loaded, shared 2-core machine


@contextlib.contextmanager
def serving(pipe, **options):
    """(base URL, app) of flux.serve.app.create_app(pipe, **options) served by uvicorn in a thread."""
    import uvicorn

    from flux.pipelines.snapshots import BUILTIN
    from flux.serve.app import create_app

    app = create_app(pipe, model_id="flux-tiny", model_name=str(BUILTIN), **options)
    listener = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the in-process server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(60)
        listener.close()


@contextlib.contextmanager
def serve_process(*arguments):
    """The base URL of `python -m flux serve --port 0 ARGUMENTS`, read from its 'ready at' line; ended after."""
    process = subprocess.Popen([sys.executable, "-m", "flux", "serve", "--port", "0", *arguments], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines, url = [], []

    def read():  # drains the output, so that the server never blocks on a full pipe
        for line in process.stdout:
            lines.append(line)
            found = re.search(r"ready at (http://\S+)", line)
            if found:
                url.append(found[1])

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while not url:
            assert process.poll() is None, f"flux serve exited with {process.returncode}:\n{''.join(lines)}"
            assert time.monotonic() < deadline, f"flux serve not ready in {STARTUP_SECONDS} s:\n{''.join(lines)}"
            time.sleep(0.1)
        yield url[0]
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
