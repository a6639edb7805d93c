#!/usr/bin/env bash
# End-to-end check of the examples (CI runs it): fake channels (examples/fake_channels.py: a Bot
# Framework connector, the Slack Web API, the Telegram Bot API, the Messenger Send API) and the
# real gateway binary on 127.0.0.1, then
#   1. sending: each language's send example (send.py, send.js) through the gateway, and a check of
#      what the fake connector received: typing, text and a 3-card hero carousel in the bot's
#      conversation, in that order; a create-conversation call and the proactive message in the
#      conversation it created;
#   2. receiving: each language's echo bot (bot.py, bot.js) on the Receive stream while Slack,
#      Telegram and Messenger events signed as those channels sign them are posted to the
#      gateway's webhook listener (examples/post_event.py), and a check that each `echo: <text>`
#      reached the fake in the event's conversation (Slack channel and thread, Telegram chat and
#      topic, Messenger sender) exactly once, that a reaction was received and acked without a
#      reply, and that forged signatures were refused with 401 and never reached a bot; then a
#      hand-over (events the Python bot left unhandled when it stopped are answered by the Node
#      bot, each exactly once), and each bot stopping cleanly on SIGINT and SIGTERM.
#
# Needs python3 (3.11+) with venv, node 20+ with npm, and cargo (unless CHANNEL_GATEWAY_BIN names
# a built gateway). Installs the examples' pinned dependencies (a venv in a temp dir; `npm ci` in
# examples/node). Talks to nothing but 127.0.0.1 and the package registries.
#
#   examples/e2e.sh                                   # builds the gateway with cargo --release
#   CHANNEL_GATEWAY_BIN=target/release/channel-gateway examples/e2e.sh
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
python="${PYTHON:-python3}"

work="$(mktemp -d "${TMPDIR:-/tmp}/channel-gateway-e2e.XXXXXX")"
fake_pid=""
gateway_pid=""
echo_pid=""

log() { printf 'e2e: %s\n' "$*" >&2; }
fail() { printf 'e2e: FAILED: %s\n' "$*" >&2; exit 1; }

# Stops one process we started: SIGTERM, up to 15 s to exit, then SIGKILL.
stop() {
  local pid="$1"
  [[ -n "$pid" ]] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 150); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    sleep 0.1
  done
  log "pid $pid did not stop in 15 s; killing it"
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local status=$?
  stop "$echo_pid"
  stop "$gateway_pid"
  stop "$fake_pid"
  if [[ $status -ne 0 ]]; then
    for f in gateway.log fake.log python-echo.err node-echo.err; do
      if [[ -s "$work/$f" ]]; then
        log "last lines of $f:"
        tail -n 40 "$work/$f" >&2 || true
      fi
    done
  fi
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A free TCP port on 127.0.0.1 (the kernel picks it; a small race until we bind it is accepted).
free_port() {
  "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# Waits until something accepts TCP connections on 127.0.0.1:$1, while process $2 lives.
wait_for_port() {
  local port="$1" pid="$2" what="$3"
  for _ in $(seq 1 300); do
    kill -0 "$pid" 2>/dev/null || return 1
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  fail "$what did not listen on 127.0.0.1:$port within 30 s"
}

# --- tools ------------------------------------------------------------------------------------
command -v "$python" >/dev/null || fail "$python not found (Python 3.11+ is needed)"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || fail "Python 3.11+ is needed, $python is $("$python" -V 2>&1)"
command -v node >/dev/null || fail "node not found (Node 20+ is needed)"
node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' || fail "Node 20+ is needed, found $(node --version)"
command -v npm >/dev/null || fail "npm not found"

# --- the gateway binary -----------------------------------------------------------------------
if [[ -n "${CHANNEL_GATEWAY_BIN:-}" ]]; then
  gateway_bin="$CHANNEL_GATEWAY_BIN"
else
  log "building the gateway (cargo build --release; nothing to do when it is up to date)"
  cargo build --release --locked --bin channel-gateway
  gateway_bin="$repo/target/release/channel-gateway"
fi
[[ -x "$gateway_bin" ]] || fail "no gateway binary at $gateway_bin"

# --- the examples' dependencies ---------------------------------------------------------------
log "installing the Python example's requirements into a venv in $work"
"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check -r examples/python/requirements.txt
PYTHON="$work/venv/bin/python" examples/python/build.sh

log "installing the Node example's packages (npm ci)"
(cd examples/node && npm ci --no-audit --no-fund --loglevel=error)

# --- the fake channels ----------------------------------------------------------------------
# Made-up credentials: the fake refuses calls without these tokens, the gateway refuses webhooks
# not signed with these secrets.
slack_bot="B0E2EBOT"
slack_token="xoxb-e2e-not-a-secret"
slack_signing_secret="e2e-slack-signing-secret"
telegram_bot="e2e_echo_bot"
telegram_token="123456:e2e-not-a-secret"
telegram_secret_token="e2e-telegram-secret-token"
page_id="100200300"
page_token="e2e-page-token-not-a-secret"
app_secret="e2e-app-secret"

record="$work/requests.jsonl"
"$python" examples/fake_channels.py --host 127.0.0.1 --port 0 --port-file "$work/fake.port" \
  --record "$record" --slack-token "$slack_token" --telegram-token "$telegram_token" \
  --page-token "$page_token" >"$work/fake.log" 2>&1 &
fake_pid=$!
for _ in $(seq 1 100); do
  [[ -s "$work/fake.port" ]] && break
  kill -0 "$fake_pid" 2>/dev/null || fail "the fake channels exited at start"
  sleep 0.1
done
[[ -s "$work/fake.port" ]] || fail "the fake channels did not report their port"
fake_port="$(cat "$work/fake.port")"
service_url="http://127.0.0.1:$fake_port/"
log "fake channels on $service_url"

# --- the gateway ------------------------------------------------------------------------------
bot_id="e2e-bot-app-id"
grpc_port="$(free_port)"
inbound_port="$(free_port)"
inbound_url="http://127.0.0.1:$inbound_port"
start_gateway() {
  # Configuration by environment only, exactly as a deployment would set it.
  env \
    CHANNEL_GATEWAY__CHANNELS__BOTFRAMEWORK__ALLOWED_SERVICE_HOSTS='["127.0.0.1:*"]' \
    CHANNEL_GATEWAY__CHANNELS__BOTFRAMEWORK__TOKEN_URL="${service_url}token" \
    CHANNEL_GATEWAY__CHANNELS__BOTFRAMEWORK__APP_ID="$bot_id" \
    CHANNEL_GATEWAY__CHANNELS__BOTFRAMEWORK__APP_PASSWORD="e2e-password-not-a-secret" \
    CHANNEL_GATEWAY__CHANNELS__SLACK__API_BASE_URL="${service_url}slack/api" \
    CHANNEL_GATEWAY__CHANNELS__SLACK__WORKSPACES="[{bot_id = \"$slack_bot\", token = \"$slack_token\"}]" \
    CHANNEL_GATEWAY__CHANNELS__SLACK__SIGNING_SECRET="$slack_signing_secret" \
    CHANNEL_GATEWAY__CHANNELS__TELEGRAM__API_BASE_URL="${service_url}telegram" \
    CHANNEL_GATEWAY__CHANNELS__TELEGRAM__BOTS="[{bot_id = \"$telegram_bot\", token = \"$telegram_token\", secret_token = \"$telegram_secret_token\"}]" \
    CHANNEL_GATEWAY__CHANNELS__FACEBOOK__GRAPH_BASE_URL="${service_url}facebook" \
    CHANNEL_GATEWAY__CHANNELS__FACEBOOK__PAGE_ID="$page_id" \
    CHANNEL_GATEWAY__CHANNELS__FACEBOOK__ACCESS_TOKEN="$page_token" \
    CHANNEL_GATEWAY__CHANNELS__FACEBOOK__APP_SECRET="$app_secret" \
    CHANNEL_GATEWAY__OUTBOX__BACKEND=memory \
    CHANNEL_GATEWAY__INBOUND__LISTEN="127.0.0.1:$inbound_port" \
    "$@" \
    "$gateway_bin" serve --listen "127.0.0.1:$grpc_port" --data-dir "$work/data" >"$work/gateway.log" 2>&1 &
  gateway_pid=$!
}

# The admin listener (/healthz, /readyz) is moved off its default port so runs never collide.
# A gateway that predates the admin listener refuses the unknown key; it then runs without it.
admin_port="$(free_port)"
start_gateway CHANNEL_GATEWAY__ADMIN__LISTEN="127.0.0.1:$admin_port"
if ! wait_for_port "$grpc_port" "$gateway_pid" "the gateway"; then
  wait "$gateway_pid" 2>/dev/null || true
  gateway_pid=""
  # shellcheck disable=SC2016 # the backticks are literal: serde's words for an unknown key
  if grep -q 'unknown field `admin`' "$work/gateway.log"; then
    log "this gateway has no admin listener (config key admin.listen refused); starting it without"
    admin_port=""
    start_gateway
    wait_for_port "$grpc_port" "$gateway_pid" "the gateway" || fail "the gateway exited at start"
  else
    fail "the gateway exited at start"
  fi
fi
wait_for_port "$inbound_port" "$gateway_pid" "the webhook listener" || fail "the gateway exited"
log "gateway on 127.0.0.1:$grpc_port (pid $gateway_pid), webhooks on $inbound_url"

if [[ -n "$admin_port" ]]; then
  wait_for_port "$admin_port" "$gateway_pid" "the admin listener" || fail "the gateway exited"
  for probe in healthz readyz; do
    "$python" - "http://127.0.0.1:$admin_port/$probe" <<'PY' || fail "admin probe /$probe did not answer 200"
import sys, time, urllib.request
for _ in range(50):
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.1)
sys.exit(1)
PY
  done
  log "admin probes /healthz and /readyz answer 200 on 127.0.0.1:$admin_port"
fi

# --- 1. sending ---------------------------------------------------------------------------------
run_bot() {
  local name="$1"; shift
  log "running the $name send example"
  if ! GATEWAY_ADDRESS="127.0.0.1:$grpc_port" CHANNEL_ID=msteams SERVICE_URL="$service_url" \
    BOT_ID="$bot_id" TENANT_ID="e2e-tenant" \
    timeout 120 "$@" >"$work/$name.out" 2>"$work/$name.err"; then
    cat "$work/$name.out" "$work/$name.err" >&2
    fail "the $name send example failed"
  fi
  cat "$work/$name.out"
}
run_bot python "$work/venv/bin/python" examples/python/send.py \
  --user-id "29:python-user" --conversation-id "a:python-conversation"
run_bot node node examples/node/send.js \
  --user-id "29:node-user" --conversation-id "a:node-conversation"

# --- what the fake connector received ---------------------------------------------------------
log "checking what the fake connector received"
"$python" - "$record" "$work/python.out" "$work/node.out" <<'PY'
"""Polls the fake's record until every expectation holds (up to 20 s), else names what is missing."""
import json
import sys
import time

record, outputs = sys.argv[1], {"Python": sys.argv[2], "Node": sys.argv[3]}
BOTS = {
    "Python": ("29:python-user", "a:python-conversation"),
    "Node": ("29:node-user", "a:node-conversation"),
}
HERO = "application/vnd.microsoft.card.hero"


def load(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def proactive_reply(name):
    for line in load(outputs[name]):
        if line.get("call") == "SendProactive":
            return line["reply"]
    return None


def problems(entries):
    out = []
    acts = [e for e in entries if e["kind"] == "activity"]
    creates = [e for e in entries if e["kind"] == "create_conversation"]
    for e in entries:
        if e["kind"] in ("unknown", "bad_json"):
            out.append(f"unexpected request {e['path']}: {e['body']!r}")
        if e["kind"] in ("activity", "create_conversation") and e.get("authorization") != "Bearer fake-token":
            out.append(f"{e['path']} arrived without the bearer token from /token")
    if not any(e["kind"] == "token" for e in entries):
        out.append("no token request reached /token")
    for name, (user, conv) in BOTS.items():
        mine = [a for a in acts if a["conversation"] == conv]
        def index(pred, what):
            for i, a in enumerate(mine):
                if pred(a["body"]):
                    return i
            out.append(f"{name} bot: no {what} in conversation {conv}")
            return None
        typing = index(lambda b: b.get("type") == "typing", "typing activity")
        text = index(lambda b: b.get("type") == "message" and b.get("text") == f"Hello from the {name} bot",
                     f"text 'Hello from the {name} bot'")
        carousel = index(
            lambda b: b.get("attachmentLayout") == "carousel"
            and len(b.get("attachments", [])) == 3
            and all(a.get("contentType") == HERO and a.get("content", {}).get("buttons") for a in b["attachments"]),
            "carousel (attachmentLayout carousel, 3 hero cards with buttons)",
        )
        if None not in (typing, text, carousel) and not typing < text < carousel:
            out.append(f"{name} bot: order in {conv} is not typing, text, carousel")
        made = [c for c in creates if any(m.get("id") == user for m in c["body"].get("members", []))]
        if not made:
            out.append(f"{name} bot: no create-conversation call with member {user}")
            continue
        new_id = made[-1]["response_id"]
        if not any(a["conversation"] == new_id and a["body"].get("text") == f"Proactive hello from the {name} bot"
                   for a in acts):
            out.append(f"{name} bot: the proactive message did not reach the new conversation {new_id}")
        reply = proactive_reply(name)
        got = (reply or {}).get("address", {}).get("conversation", {}).get("id")
        if got != new_id:
            out.append(f"{name} bot: SendProactive answered conversation {got!r}, the fake created {new_id!r}")
    return out


deadline = time.monotonic() + 20
while True:
    entries = load(record)
    found = problems(entries)
    if not found:
        break
    if time.monotonic() > deadline:
        print("e2e: FAILED: the fake connector did not receive what the bots sent:", file=sys.stderr)
        for p in found:
            print(f"  - {p}", file=sys.stderr)
        print(f"e2e: the fake received {len(entries)} requests:", file=sys.stderr)
        for e in entries:
            print("  " + json.dumps(e, sort_keys=True)[:400], file=sys.stderr)
        sys.exit(1)
    time.sleep(0.2)

kinds = {}
for e in entries:
    kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
print(f"e2e: the fake received {len(entries)} requests {kinds}: every expectation holds")
PY

log "sending OK: the Python and Node examples sent text, carousel, typing and a proactive message"

# --- 2. receiving -------------------------------------------------------------------------------
# Posts one event to the webhook listener as the channel would (examples/post_event.py).
post() {
  SLACK_SIGNING_SECRET="$slack_signing_secret" TELEGRAM_SECRET_TOKEN="$telegram_secret_token" \
    MESSENGER_APP_SECRET="$app_secret" "$python" examples/post_event.py --inbound "$inbound_url" "$@" >&2 || fail "posting an event: $*"
}

# Runs one echo bot: it subscribes, the events for it are posted (and two forgeries), and it must
# stop by itself after handling them (--max-events), having acked each.
run_echo_bot() {
  local name="$1" n="$2"; shift 2
  local tag="${name^^}"
  log "running the $name echo bot"
  "$@" --gateway "127.0.0.1:$grpc_port" --bot-id "$slack_bot" --bot-id "$telegram_bot" --bot-id "$page_id" \
    --max-events 6 \
    >"$work/$name-echo.out" 2>"$work/$name-echo.err" &
  echo_pid=$!
  for _ in $(seq 1 300); do
    grep -q '"subscribed"' "$work/$name-echo.out" 2>/dev/null && break
    kill -0 "$echo_pid" 2>/dev/null || { cat "$work/$name-echo.err" >&2; fail "the $name echo bot exited at start"; }
    sleep 0.1
  done
  grep -q '"subscribed"' "$work/$name-echo.out" || fail "the $name echo bot did not subscribe within 30 s"

  # Forgeries first: were one stored, the bot would take it for one of its six.
  post --forge --expect 401 slack --channel "C0E2E$tag" --text "forged ($name)"
  post --forge --expect 401 telegram --bot-id "$telegram_bot" --chat "500$n" --from-id "500$n" --text "forged ($name)"
  post --forge --expect 401 messenger --page "$page_id" --psid "700$n" --text "forged ($name)"
  # Six events: a Slack message, one in a thread, a reaction; a Telegram message in a forum
  # topic, one in a private chat; a Messenger message.
  post slack --channel "C0E2E$tag" --text "hello from slack ($name)"
  post slack --channel "C0E2E$tag" --thread 1700000000.000100 --text "in a thread ($name)"
  post slack --channel "C0E2E$tag" --ts 1700000000.000100 --reaction thumbsup
  post telegram --bot-id "$telegram_bot" --chat "-100777$n" --topic 55 --message-id 321 --text "in a topic ($name)"
  post telegram --bot-id "$telegram_bot" --chat "500$n" --from-id "500$n" --text "hello from telegram ($name)"
  post messenger --page "$page_id" --psid "700$n" --text "hello from messenger ($name)"

  local status=0
  for _ in $(seq 1 600); do
    kill -0 "$echo_pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$echo_pid" 2>/dev/null; then
    cat "$work/$name-echo.out" "$work/$name-echo.err" >&2
    fail "the $name echo bot did not stop by itself within 60 s of the events"
  fi
  wait "$echo_pid" || status=$?
  echo_pid=""
  cat "$work/$name-echo.out"
  if [[ $status -ne 0 ]]; then
    cat "$work/$name-echo.err" >&2
    fail "the $name echo bot exited with status $status"
  fi
}
run_echo_bot python 1 "$work/venv/bin/python" examples/python/bot.py
run_echo_bot node 2 node examples/node/bot.js

log "checking the echoes the fake Slack, Telegram and Messenger received"
"$python" - "$record" "$work/python-echo.out" "$work/node-echo.out" <<'PY'
"""Polls the fake's record until every echo arrived (up to 20 s), else names what is missing."""
import json
import sys
import time

record, outputs = sys.argv[1], {"python": sys.argv[2], "node": sys.argv[3]}
BOTS = {"python": ("C0E2EPYTHON", "1"), "node": ("C0E2ENODE", "2")}


def load(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def problems(entries):
    out = []
    slack = [e for e in entries if e["kind"] == "slack"]
    telegram = [e for e in entries if e["kind"] == "telegram" and e["api_method"] == "sendMessage"]
    messenger = [e for e in entries if e["kind"] == "messenger" and "message" in e["body"]]
    for e in slack + telegram + messenger:
        if not e["ok"]:
            out.append(f"the fake refused {e['path']} (wrong token?): {e['body']!r}")
        if "forged" in json.dumps(e["body"]):
            out.append(f"a forged event was answered: {e['body']!r}")
    for name, (channel, n) in BOTS.items():
        posts = [e["body"] for e in slack if e["api_method"] == "chat.postMessage" and e["body"].get("channel") == channel]
        top = [b for b in posts if b.get("text") == f"echo: hello from slack ({name})"]
        threaded = [b for b in posts if b.get("text") == f"echo: in a thread ({name})"]
        if len(top) != 1 or "thread_ts" in top[0]:
            out.append(f"{name}: want one top-level 'echo: hello from slack' in {channel}, got {top}")
        if len(threaded) != 1 or threaded[0].get("thread_ts") != "1700000000.000100":
            out.append(f"{name}: want one 'echo: in a thread' in thread 1700000000.000100 of {channel}, got {threaded}")
        if len(posts) != 2:
            out.append(f"{name}: want 2 Slack messages in {channel} (none for the reaction), got {posts}")
        topic = [e["body"] for e in telegram if str(e["body"].get("chat_id")) == f"-100777{n}"]
        if len(topic) != 1 or topic[0].get("text") != f"echo: in a topic ({name})" \
                or topic[0].get("message_thread_id") != 55 \
                or (topic[0].get("reply_parameters") or {}).get("message_id") != 321:
            out.append(f"{name}: want one 'echo: in a topic' in topic 55 of chat -100777{n}, replying to 321, got {topic}")
        private = [e["body"] for e in telegram if str(e["body"].get("chat_id")) == f"500{n}"]
        if [b.get("text") for b in private] != [f"echo: hello from telegram ({name})"]:
            out.append(f"{name}: want one 'echo: hello from telegram' in chat 500{n}, got {private}")
        to_psid = [e["body"]["message"] for e in messenger if (e["body"].get("recipient") or {}).get("id") == f"700{n}"]
        if [m.get("text") for m in to_psid] != [f"echo: hello from messenger ({name})"]:
            out.append(f"{name}: want one 'echo: hello from messenger' to PSID 700{n}, got {to_psid}")
        lines = load(outputs[name])
        if not any(line.get("skipped") == "MESSAGE_TYPE_MESSAGE_REACTION" for line in lines):
            out.append(f"{name}: the bot did not report the reaction as received and skipped")
    return out


deadline = time.monotonic() + 20
while True:
    entries = load(record)
    found = problems(entries)
    if not found:
        break
    if time.monotonic() > deadline:
        print("e2e: FAILED: the fake channels did not receive the echoes:", file=sys.stderr)
        for p in found:
            print(f"  - {p}", file=sys.stderr)
        for e in entries:
            if e["kind"] in ("slack", "telegram", "messenger"):
                print("  " + json.dumps(e, sort_keys=True)[:400], file=sys.stderr)
        sys.exit(1)
    time.sleep(0.2)
print("e2e: each echo reached its conversation, thread, topic or sender once; the reactions got none; forgeries none")
PY

# Hand-over: three events wait in the inbox; the Python bot handles one and stops, the Node bot
# takes the two it gave back. Each is answered exactly once.
log "hand-over: three events waiting, the Python bot takes one, the Node bot the other two"
for n in 1 2 3; do
  post telegram --bot-id "$telegram_bot" --chat "600$n" --from-id "600$n" --text "waiting $n"
done
for bot in "python 1 $work/venv/bin/python examples/python/bot.py" "node 2 node examples/node/bot.js"; do
  read -r name count cmd script <<<"$bot"
  timeout 60 "$cmd" "$script" --gateway "127.0.0.1:$grpc_port" --max-events "$count" \
    >"$work/$name-handover.out" 2>"$work/$name-handover.err" \
    || { cat "$work/$name-handover.err" >&2; fail "the $name echo bot failed in the hand-over"; }
  cat "$work/$name-handover.out"
done
"$python" - "$record" <<'PY'
import json, sys, time
deadline = time.monotonic() + 20
while True:
    with open(sys.argv[1], encoding="utf-8") as f:
        sent = [json.loads(line)["body"] for line in f if '"sendMessage"' in line]
    got = sorted((str(b.get("chat_id")), b.get("text")) for b in sent if str(b.get("chat_id")).startswith("600"))
    want = [(f"600{n}", f"echo: waiting {n}") for n in (1, 2, 3)]
    if got == want:
        break
    if time.monotonic() > deadline:
        sys.exit(f"e2e: FAILED: hand-over: want each of {want} once, the fake got {got}")
    time.sleep(0.2)
print("e2e: hand-over: each waiting event answered exactly once")
PY

# Each echo bot, idle on its stream, stops on SIGINT and on SIGTERM: exit status 0 within 15 s.
stop_echo_bot() {
  local name="$1" signal="$2"; shift 2
  "$@" --gateway "127.0.0.1:$grpc_port" >"$work/$name-stop.out" 2>"$work/$name-stop.err" &
  echo_pid=$!
  for _ in $(seq 1 300); do
    grep -q '"subscribed"' "$work/$name-stop.out" 2>/dev/null && break
    kill -0 "$echo_pid" 2>/dev/null || { cat "$work/$name-stop.err" >&2; fail "the $name echo bot exited at start"; }
    sleep 0.1
  done
  kill "-$signal" "$echo_pid"
  for _ in $(seq 1 150); do
    kill -0 "$echo_pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -0 "$echo_pid" 2>/dev/null && fail "the $name echo bot did not stop within 15 s of SIG$signal"
  local status=0
  wait "$echo_pid" || status=$?
  echo_pid=""
  [[ $status -eq 0 ]] || { cat "$work/$name-stop.err" >&2; fail "the $name echo bot exited with status $status on SIG$signal"; }
  log "the $name echo bot stopped on SIG$signal: $(tail -n 1 "$work/$name-stop.err")"
}
for signal in INT TERM; do
  stop_echo_bot python "$signal" "$work/venv/bin/python" examples/python/bot.py
  stop_echo_bot node "$signal" node examples/node/bot.js
done

log "OK: the examples sent through the gateway, and the echo bots answered signed Slack, Telegram and Messenger events in place"
