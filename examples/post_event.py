#!/usr/bin/env python3
"""Posts one event to a gateway's webhook listener, signed the way the channel signs it: a way to
try a bot without a Slack workspace or a Telegram bot (and what examples/e2e.sh does).

  slack:    POST /webhooks/slack/events, an Events API `event_callback` (a message, or with
            --reaction a reaction_added), with X-Slack-Request-Timestamp and
            X-Slack-Signature = v0=HMAC-SHA256(signing secret, "v0:{timestamp}:{body}")
  telegram: POST /webhooks/telegram/{bot_id}, an Update with a message, with the secret_token
            given to setWebhook in X-Telegram-Bot-Api-Secret-Token
  messenger: POST /webhooks/facebook, a page webhook body with one message, with
            X-Hub-Signature-256 = sha256=HMAC-SHA256(app secret, body)

--forge signs with a wrong secret (the gateway must answer 401). Prints the HTTP status; exits 1
when it is not --expect. Python 3.11 standard library only.

    python3 examples/post_event.py --inbound http://127.0.0.1:3978 \\
        slack --signing-secret "$SLACK_SIGNING_SECRET" --channel C0123 --text hello
    python3 examples/post_event.py telegram --bot-id my_bot --secret-token "$SECRET" --chat 42 --text hi
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import itertools
import json
import os
import sys
import time
import urllib.error
import urllib.request

# Ids unique enough across runs a second apart: channels dedupe retries by them.
_counter = itertools.count(int(time.time() * 1_000_000) % 10**9)


def slack(args: argparse.Namespace) -> tuple[str, bytes, dict[str, str]]:
    ts = args.ts or f"{time.time():.6f}"
    if args.reaction:
        event = {"type": "reaction_added", "user": args.user, "reaction": args.reaction,
                 "item": {"type": "message", "channel": args.channel, "ts": ts}, "event_ts": ts}
    else:
        event = {"type": "message", "user": args.user, "text": args.text, "channel": args.channel,
                 "channel_type": "channel", "ts": ts, "event_ts": ts}
        if args.thread:
            event["thread_ts"] = args.thread
    body = json.dumps({
        "type": "event_callback",
        "team_id": args.team,
        "event_id": args.event_id or f"Ev{next(_counter)}",
        "event_time": int(time.time()),
        "event": event,
    }).encode()
    stamp = str(int(time.time()))
    secret = "not-the-signing-secret" if args.forge else args.secret
    digest = hmac.new(secret.encode(), f"v0:{stamp}:".encode() + body, hashlib.sha256).hexdigest()
    headers = {"X-Slack-Request-Timestamp": stamp, "X-Slack-Signature": f"v0={digest}"}
    return "/webhooks/slack/events", body, headers


def telegram(args: argparse.Namespace) -> tuple[str, bytes, dict[str, str]]:
    chat = int(args.chat)
    message = {
        "message_id": args.message_id or next(_counter),
        "from": {"id": args.from_id, "is_bot": False, "first_name": "Ada"},
        "chat": {"id": chat, "type": "supergroup" if chat < 0 else "private"},
        "date": int(time.time()),
        "text": args.text,
    }
    if args.topic:
        message["chat"]["is_forum"] = True
        message["message_thread_id"] = args.topic
        message["is_topic_message"] = True
    body = json.dumps({"update_id": args.update_id or next(_counter), "message": message}).encode()
    secret = "not-the-secret-token" if args.forge else args.secret
    return f"/webhooks/telegram/{args.bot_id}", body, {"X-Telegram-Bot-Api-Secret-Token": secret}


def messenger(args: argparse.Namespace) -> tuple[str, bytes, dict[str, str]]:
    now_ms = int(time.time() * 1000)
    item = {
        "sender": {"id": args.psid},
        "recipient": {"id": args.page},
        "timestamp": now_ms,
        "message": {"mid": args.mid or f"m_{next(_counter)}", "text": args.text},
    }
    body = json.dumps({"object": "page", "entry": [{"id": args.page, "time": now_ms, "messaging": [item]}]}).encode()
    secret = "not-the-app-secret" if args.forge else args.secret
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return "/webhooks/facebook", body, {"X-Hub-Signature-256": f"sha256={digest}"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inbound", default=os.environ.get("INBOUND_URL") or "http://127.0.0.1:3978",
                   help="the gateway's webhook listener (inbound.listen)")
    p.add_argument("--expect", type=int, default=200, help="the HTTP status to expect")
    p.add_argument("--forge", action="store_true", help="sign with a wrong secret")
    channels = p.add_subparsers(dest="kind", required=True)

    s = channels.add_parser("slack", help="a Slack Events API event")
    s.set_defaults(build=slack)
    s.add_argument("--signing-secret", dest="secret", default=os.environ.get("SLACK_SIGNING_SECRET"))
    s.add_argument("--channel", required=True, help="the Slack channel id (C...)")
    s.add_argument("--text", default="hello")
    s.add_argument("--thread", help="the thread's ts, for a message in a thread")
    s.add_argument("--ts", help="the message's ts (default: now)")
    s.add_argument("--reaction", help="post a reaction_added with this name to the message --ts instead")
    s.add_argument("--user", default="U0PERSON", help="who writes")
    s.add_argument("--team", default="T0TEAM")
    s.add_argument("--event-id", help="default: a new one (Slack retries carry the same)")

    t = channels.add_parser("telegram", help="a Telegram update with a message")
    t.add_argument("--bot-id", required=True, help="the bot_id as configured in the gateway")
    t.set_defaults(build=telegram)
    t.add_argument("--secret-token", dest="secret", default=os.environ.get("TELEGRAM_SECRET_TOKEN"))
    t.add_argument("--chat", required=True, help="the chat id (negative for groups)")
    t.add_argument("--text", default="hello")
    t.add_argument("--topic", type=int, help="a forum topic's message_thread_id")
    t.add_argument("--message-id", type=int)
    t.add_argument("--update-id", type=int)
    t.add_argument("--from-id", type=int, default=4242, help="who writes")

    f = channels.add_parser("messenger", help="a Messenger page webhook with one message")
    f.set_defaults(build=messenger)
    f.add_argument("--app-secret", dest="secret", default=os.environ.get("MESSENGER_APP_SECRET"))
    f.add_argument("--page", required=True, help="the page id (the bot id of its replies)")
    f.add_argument("--psid", required=True, help="who writes: their page-scoped id")
    f.add_argument("--text", default="hello")
    f.add_argument("--mid", help="the message id (default: a new one; Meta's retries carry the same)")

    args = p.parse_args()
    if not args.secret and not args.forge:
        p.error("the channel's secret is needed (--signing-secret, --secret-token or --app-secret, or the environment)")
    path, body, headers = args.build(args)
    request = urllib.request.Request(args.inbound.rstrip("/") + path, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    print(f"post_event: {args.kind} {path}: {status}")
    if status != args.expect:
        print(f"post_event: expected {args.expect}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
