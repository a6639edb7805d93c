#!/usr/bin/env python3
"""An echo bot in Python: the receiving loop of a channel-gateway bot.

It opens the gateway's Receive stream, and for each event people send on the channels (Slack,
Telegram, Messenger, Bot Framework) it answers `echo: <text>` with Send, using the event's
address unchanged (that keeps the reply in the same conversation, thread or topic), then acks
the event. Events that are not messages (reactions, joins, edits...) are acked without a reply.
An event not acked in time comes again (flagged redelivered); the reply's idempotency key, made
from the event id, keeps a second delivery from echoing twice (within the gateway's
server.idempotency_window, 24 h by default).

Every flag has an environment variable:
    GATEWAY_ADDRESS (127.0.0.1:50051)   BOT_IDS (comma-separated; empty: every bot the caller may
    act as)   CHANNEL_IDS (comma-separated; empty: all)   GROUP (the gateway's `default`)
    GATEWAY_TOKEN (sent as `authorization: Bearer ...` when set)

    ./build.sh && python3 bot.py --bot-id B0123ABCD

Stops cleanly on SIGINT or SIGTERM, or after --max-events events: events it did not handle are
given back to the gateway, which delivers them to the next bot.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import sys
import threading
from pathlib import Path

# The stubs are generated at build time (./build.sh), never committed.
sys.path.insert(0, str(Path(__file__).resolve().parent / "generated"))
try:
    import grpc

    from channelgateway.v1 import gateway_pb2 as pb
    from channelgateway.v1 import gateway_pb2_grpc as pb_grpc
except ImportError as e:  # pragma: no cover - a setup message, not logic
    sys.exit(f"bot.py: {e}. Run `pip install -r requirements.txt` and `./build.sh` first.")


def csv_env(name: str) -> list[str]:
    return [v.strip() for v in os.environ.get(name, "").split(",") if v.strip()]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gateway", default=os.environ.get("GATEWAY_ADDRESS") or "127.0.0.1:50051", help="host:port")
    p.add_argument("--bot-id", action="append", dest="bot_ids", help="receive this bot's events (repeatable)")
    p.add_argument("--channel-id", action="append", dest="channel_ids", help="only this channel (repeatable)")
    p.add_argument("--group", default=os.environ.get("GROUP", ""), help="consumer group (default: `default`)")
    p.add_argument("--token", default=os.environ.get("GATEWAY_TOKEN"), help="bearer token, if the gateway asks")
    p.add_argument("--max-events", type=int, default=0, help="stop after this many events (0: never)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to connect, and for each Send")
    args = p.parse_args()
    args.bot_ids = args.bot_ids or csv_env("BOT_IDS")
    args.channel_ids = args.channel_ids or csv_env("CHANNEL_IDS")
    return args


def log(**fields) -> None:
    """One JSON line per thing that happened, on stdout."""
    print(json.dumps(fields, sort_keys=True), flush=True)


def echo(gateway, event: pb.ReceivedEvent, args, metadata) -> dict:
    """Answers one event; returns what was done, for the log."""
    m = event.message
    if m.type not in (pb.MESSAGE_TYPE_UNSPECIFIED, pb.MESSAGE_TYPE_MESSAGE):
        return {"skipped": pb.MessageType.Name(m.type)}
    if not m.text:
        return {"skipped": "no text"}  # a picture, a file, a sticker...
    reply = pb.Message(address=m.address, text=f"echo: {m.text}")
    sent = gateway.Send(
        # ACCEPTED: the gateway has stored the reply and will deliver it, so the event may be acked.
        pb.SendRequest(message=reply, idempotency_key=f"echo-{event.event_id}", wait=pb.WAIT_MODE_ACCEPTED),
        timeout=args.timeout,
        metadata=metadata,
    )
    return {"reply": sent.message_id}


def main() -> int:
    args = parse_args()
    metadata = [("authorization", f"Bearer {args.token}")] if args.token else None

    # What the bot says on the stream: the subscription, then acks. None ends it (a half-close),
    # after which the gateway takes every ack sent before it and ends the stream.
    outbox: queue.Queue = queue.Queue()
    outbox.put(pb.ReceiveRequest(subscribe=pb.ReceiveSubscription(
        group=args.group, bot_ids=args.bot_ids, channel_ids=args.channel_ids)))
    state = {"stopping": False, "busy": False, "closed": False, "stream": None}

    def close() -> None:
        if not state["closed"]:
            state["closed"] = True
            outbox.put(None)
            if state["stream"] is not None:  # should the gateway not end the stream soon, give up on it
                give_up = threading.Timer(10, state["stream"].cancel)
                give_up.daemon = True
                give_up.start()

    def on_signal(*_) -> None:
        # Signal handlers run on the main thread between two steps of the loop below: an event
        # being handled is finished and acked first.
        state["stopping"] = True
        if not state["busy"]:
            close()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    handled = 0
    with grpc.insecure_channel(args.gateway) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=args.timeout)
        except grpc.FutureTimeoutError:
            print(f"bot.py: no gateway at {args.gateway} after {args.timeout}s", file=sys.stderr)
            return 1
        gateway = pb_grpc.ChannelGatewayStub(channel)
        state["stream"] = stream = gateway.Receive(iter(outbox.get, None), metadata=metadata)
        try:
            for response in stream:
                if response.HasField("subscribed"):
                    s = response.subscribed
                    log(subscribed={"group": s.group, "max_in_flight": s.max_in_flight})
                    continue
                if state["stopping"]:
                    continue  # not acked: the gateway gives it to the next bot
                event = response.event
                state["busy"] = True
                done = echo(gateway, event, args, metadata)
                outbox.put(pb.ReceiveRequest(ack=pb.ReceiveAck(event_ids=[event.event_id])))
                state["busy"] = False
                handled += 1
                a = event.message.address
                log(event_id=event.event_id, attempt=event.attempt, channel_id=a.channel_id,
                    conversation=a.conversation.id, thread=a.thread_id, text=event.message.text, **done)
                if args.max_events and handled >= args.max_events:
                    state["stopping"] = True
                if state["stopping"]:
                    close()
            if not state["stopping"]:
                print("bot.py: the gateway ended the stream", file=sys.stderr)
                return 1
        except grpc.RpcError as e:
            if not (state["stopping"] and e.code() == grpc.StatusCode.CANCELLED):
                print(f"bot.py: {e.code().name}: {e.details()}", file=sys.stderr)
                return 1
        finally:
            close()
    print(f"bot.py: stopped after {handled} events", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
