#!/usr/bin/env python3
"""Tiny fake chat channels for the examples' end-to-end check: a Bot Framework Connector, the
Slack Web API, the Telegram Bot API and the Messenger Send API, on one port.

Answers, on 127.0.0.1 only:
  Bot Framework (service URL http://127.0.0.1:PORT/):
    POST /token                                   -> {"token_type", "access_token", "expires_in"}
    POST /v3/conversations                        -> 201 {"id": "a:created-N"}
    POST /v3/conversations/{id}/activities        -> 201 {"id": "activity-N"}
    POST /v3/conversations/{id}/activities/{id}   -> 201 {"id": "activity-N"}
  Slack (api_base_url http://127.0.0.1:PORT/slack/api):
    POST /slack/api/chat.postMessage              -> {"ok": true, "channel", "ts", "message"}
  Telegram (api_base_url http://127.0.0.1:PORT/telegram):
    POST /telegram/bot{token}/sendMessage         -> {"ok": true, "result": {"message_id", "chat", ...}}
    POST /telegram/bot{token}/sendChatAction      -> {"ok": true, "result": true}
  Messenger (graph_base_url http://127.0.0.1:PORT/facebook):
    POST /facebook/{version}/me/messages          -> {"recipient_id", "message_id"}
and records every request as one JSON line in --record (path segments percent-decoded; the
token request's client_secret, the Telegram token in the path and the query string, which
carries the page token, are never written down). With --slack-token, --telegram-token or
--page-token, a call with another token is refused as the channel refuses it (Slack
`invalid_auth`, Telegram 401, Graph 190).

Python 3.11 standard library only. Stops on SIGTERM or SIGINT.

    python3 examples/fake_channels.py --port 0 --port-file /tmp/port --record /tmp/requests.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote


def redact_path(text: str) -> str:
    """A Telegram bot token is part of the URL path, a page token of the query: never written down."""
    text = re.sub(r"/telegram/bot[^/\s]*", "/telegram/bot<redacted>", text)
    return re.sub(r"\?\S*", "?<redacted>", text)


class Recorder:
    """Appends one JSON object per line, whole lines only, from any thread."""

    def __init__(self, path: str) -> None:
        self._lock = threading.Lock()
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._ids = itertools.count(1)
        self._conversations = itertools.count(1)
        self._numbers = itertools.count(1)

    def next_activity_id(self) -> str:
        with self._lock:
            return f"activity-{next(self._ids)}"

    def next_conversation_id(self) -> str:
        with self._lock:
            # A colon, like real Teams ids, so the gateway's percent-encoding is exercised.
            return f"a:created-{next(self._conversations)}"

    def next_number(self) -> int:
        with self._lock:
            return next(self._numbers)

    def write(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, sort_keys=True)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


class Handler(BaseHTTPRequestHandler):
    server_version = "fake-channels/1"
    protocol_version = "HTTP/1.1"
    # Set on the subclass made in main().
    recorder: Recorder
    slack_token: str | None
    telegram_token: str | None
    page_token: str | None

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        sys.stderr.write("fake-channels: " + redact_path(format % args) + "\n")

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
            "path": redact_path(path),
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

        if len(segments) == 3 and segments[:2] == ["slack", "api"]:
            self._slack(entry, segments[2], body)
            return

        if len(segments) == 3 and segments[0] == "telegram" and segments[1].startswith("bot"):
            self._telegram(entry, segments[1].removeprefix("bot"), segments[2], body)
            return

        if len(segments) == 4 and segments[0] == "facebook" and segments[3] == "messages":
            query = dict(parse_qsl(self.path.partition("?")[2]))
            self._messenger(entry, query, body)
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

    def _slack(self, entry: dict[str, Any], method: str, body: Any) -> None:
        """Slack answers HTTP 200 either way; `ok` says whether the call worked."""
        body = body if isinstance(body, dict) else {}
        entry.update(kind="slack", api_method=method, body=body)
        if self.slack_token and entry["authorization"] != f"Bearer {self.slack_token}":
            answer = {"ok": False, "error": "invalid_auth"}
        elif method == "chat.postMessage":
            ts = f"1700000000.{self.recorder.next_number():06d}"
            message = {"ts": ts, "text": body.get("text")}
            if "thread_ts" in body:
                message["thread_ts"] = body["thread_ts"]
            answer = {"ok": True, "channel": body.get("channel"), "ts": ts, "message": message}
        else:
            answer = {"ok": False, "error": "unknown_method"}
        entry.update(ok=answer["ok"])
        self.recorder.write(entry)
        self._reply(200, answer)

    def _telegram(self, entry: dict[str, Any], token: str, method: str, body: Any) -> None:
        body = body if isinstance(body, dict) else {}
        entry.update(kind="telegram", api_method=method, body=body)
        if self.telegram_token and token != self.telegram_token:
            status, answer = 401, {"ok": False, "error_code": 401, "description": "Unauthorized"}
        elif method == "sendMessage":
            chat = body.get("chat_id")
            message = {"message_id": self.recorder.next_number(), "date": int(time.time()),
                       "chat": {"id": chat, "type": "supergroup" if str(chat).startswith("-") else "private"},
                       "text": body.get("text")}
            if "message_thread_id" in body:
                message["message_thread_id"] = body["message_thread_id"]
            status, answer = 200, {"ok": True, "result": message}
        elif method == "sendChatAction":
            status, answer = 200, {"ok": True, "result": True}
        else:
            status, answer = 404, {"ok": False, "error_code": 404, "description": "Not Found: method not found"}
        entry.update(ok=answer["ok"])
        self.recorder.write(entry)
        self._reply(status, answer)

    def _messenger(self, entry: dict[str, Any], query: dict[str, str], body: Any) -> None:
        body = body if isinstance(body, dict) else {}
        recipient = (body.get("recipient") or {}).get("id")
        entry.update(kind="messenger", body=body, query_keys=sorted(query))
        if self.page_token and query.get("access_token") != self.page_token:
            status, answer = 400, {"error": {"message": "Invalid OAuth access token.", "type": "OAuthException",
                                             "code": 190}}
        elif "message" in body:
            status, answer = 200, {"recipient_id": recipient, "message_id": f"m_{self.recorder.next_number()}"}
        else:  # a sender_action such as typing_on
            status, answer = 200, {"recipient_id": recipient}
        entry.update(ok=status == 200)
        self.recorder.write(entry)
        self._reply(status, answer)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (loopback only)")
    parser.add_argument("--port", type=int, default=0, help="port; 0 picks a free one")
    parser.add_argument("--port-file", help="write the bound port here once listening")
    parser.add_argument("--record", required=True, help="append every request here as a JSON line")
    parser.add_argument("--slack-token", help="the bot token Slack calls must carry (default: any)")
    parser.add_argument("--telegram-token", help="the bot token Telegram calls must carry (default: any)")
    parser.add_argument("--page-token", help="the page access token Messenger calls must carry (default: any)")
    args = parser.parse_args()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("the fake channels listen on loopback only")

    recorder = Recorder(args.record)
    handler = type("BoundHandler", (Handler,), {
        "recorder": recorder, "slack_token": args.slack_token, "telegram_token": args.telegram_token,
        "page_token": args.page_token})
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
    print(f"fake-channels: listening on http://{args.host}:{port}/, recording to {args.record}", file=sys.stderr)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        recorder.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
