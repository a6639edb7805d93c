#!/usr/bin/env python3
"""A tiny fake Bot Framework Connector for the examples' end-to-end check.

Answers, on 127.0.0.1 only:
  POST /token                                   -> {"token_type", "access_token", "expires_in"}
  POST /v3/conversations                        -> 201 {"id": "a:created-N"}
  POST /v3/conversations/{id}/activities        -> 201 {"id": "activity-N"}
  POST /v3/conversations/{id}/activities/{id}   -> 201 {"id": "activity-N"}
and records every request as one JSON line in --record (path segments percent-decoded; the
token request's client_secret is replaced by "<redacted>").

Python 3.11 standard library only. Stops on SIGTERM or SIGINT.

    python3 examples/fake_connector.py --port 0 --port-file /tmp/port --record /tmp/requests.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote


class Recorder:
    """Appends one JSON object per line, whole lines only, from any thread."""

    def __init__(self, path: str) -> None:
        self._lock = threading.Lock()
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._ids = itertools.count(1)
        self._conversations = itertools.count(1)

    def next_activity_id(self) -> str:
        with self._lock:
            return f"activity-{next(self._ids)}"

    def next_conversation_id(self) -> str:
        with self._lock:
            # A colon, like real Teams ids, so the gateway's percent-encoding is exercised.
            return f"a:created-{next(self._conversations)}"

    def write(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, sort_keys=True)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


class Handler(BaseHTTPRequestHandler):
    server_version = "fake-connector/1"
    protocol_version = "HTTP/1.1"
    recorder: Recorder  # set on the subclass made in main()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        sys.stderr.write("fake-connector: " + (format % args) + "\n")

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def do_POST(self) -> None:  # noqa: N802 (stdlib naming)
        raw = self._body()
        path = self.path.split("?", 1)[0]
        segments = [unquote(s) for s in path.strip("/").split("/")]
        entry: dict[str, Any] = {
            "at": time.time(),
            "method": "POST",
            "path": path,
            "authorization": self.headers.get("Authorization"),
        }

        if segments == ["token"]:
            form = dict(parse_qsl(raw.decode("utf-8", "replace")))
            if "client_secret" in form:
                form["client_secret"] = "<redacted>"
            entry.update(kind="token", body=form)
            self.recorder.write(entry)
            self._reply(200, {"token_type": "Bearer", "access_token": "fake-token", "expires_in": 3600})
            return

        try:
            body = json.loads(raw or b"null")
        except ValueError:
            entry.update(kind="bad_json", body=raw.decode("utf-8", "replace"))
            self.recorder.write(entry)
            self._reply(400, {"error": {"code": "BadSyntax", "message": "body is not JSON"}})
            return

        if segments == ["v3", "conversations"]:
            new_id = self.recorder.next_conversation_id()
            entry.update(kind="create_conversation", body=body, response_id=new_id)
            self.recorder.write(entry)
            self._reply(201, {"id": new_id})
            return

        if len(segments) in (4, 5) and segments[:2] == ["v3", "conversations"] and segments[3] == "activities":
            activity_id = self.recorder.next_activity_id()
            entry.update(
                kind="activity",
                conversation=segments[2],
                reply_to=segments[4] if len(segments) == 5 else None,
                body=body,
                response_id=activity_id,
            )
            self.recorder.write(entry)
            self._reply(201, {"id": activity_id})
            return

        entry.update(kind="unknown", body=body)
        self.recorder.write(entry)
        self._reply(404, {"error": {"code": "NotFound", "message": f"no route for {path}"}})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (loopback only)")
    parser.add_argument("--port", type=int, default=0, help="port; 0 picks a free one")
    parser.add_argument("--port-file", help="write the bound port here once listening")
    parser.add_argument("--record", required=True, help="append every request here as a JSON line")
    args = parser.parse_args()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("the fake connector listens on loopback only")

    recorder = Recorder(args.record)
    handler = type("BoundHandler", (Handler,), {"recorder": recorder})
    server = ThreadingHTTPServer((args.host, args.port), handler)
    server.daemon_threads = True
    port = server.server_address[1]

    def stop(_signum: int, _frame: Any) -> None:
        # shutdown() blocks until serve_forever() returns, so call it from another thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(f"{port}\n")
        # Atomic: a reader never sees a half-written port.
        os.replace(tmp, args.port_file)
    print(f"fake-connector: listening on http://{args.host}:{port}/, recording to {args.record}", file=sys.stderr)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        recorder.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
