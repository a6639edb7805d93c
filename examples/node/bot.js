#!/usr/bin/env node
// An echo bot in Node: the receiving loop of a channel-gateway bot.
//
// It opens the gateway's Receive stream, and for each event people send on the channels (Slack,
// Telegram, Messenger, Bot Framework) it answers `echo: <text>` with Send, using the event's
// address unchanged (that keeps the reply in the same conversation, thread or topic), then acks
// the event. Events that are not messages (reactions, joins, edits...) are acked without a reply.
// An event not acked in time comes again (flagged redelivered); the reply's idempotency key, made
// from the event id, keeps a second delivery from echoing twice (within the gateway's
// server.idempotency_window, 24 h by default).
//
// Every flag has an environment variable:
//   GATEWAY_ADDRESS (127.0.0.1:50051)   BOT_IDS (comma-separated; empty: every bot the caller may
//   act as)   CHANNEL_IDS (comma-separated; empty: all)   GROUP (the gateway's `default`)
//   GATEWAY_TOKEN (sent as `authorization: Bearer ...` when set)
//
//   npm ci && node bot.js --bot-id B0123ABCD
//
// Stops cleanly on SIGINT or SIGTERM, or after --max-events events: events it did not handle are
// given back to the gateway, which delivers them to the next bot.
'use strict';

const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');

function options() {
  const list = (name) => (process.env[name] || '').split(',').map((s) => s.trim()).filter(Boolean);
  const { values } = parseArgs({
    options: {
      gateway: { type: 'string', default: process.env.GATEWAY_ADDRESS || '127.0.0.1:50051' },
      'bot-id': { type: 'string', multiple: true, default: list('BOT_IDS') },
      'channel-id': { type: 'string', multiple: true, default: list('CHANNEL_IDS') },
      group: { type: 'string', default: process.env.GROUP || '' },
      token: { type: 'string', default: process.env.GATEWAY_TOKEN || '' },
      'max-events': { type: 'string', default: '0' },
      timeout: { type: 'string', default: '30' },
      help: { type: 'boolean', default: false },
    },
  });
  if (values.help) {
    console.log('usage: node bot.js [--bot-id ID]... [--channel-id ID]... [--gateway HOST:PORT] [--group NAME]\n' +
      '       [--token TOKEN] [--max-events N] [--timeout SECONDS]');
    process.exit(0);
  }
  return values;
}

function loadGateway() {
  const definition = protoLoader.loadSync('channelgateway/v1/gateway.proto', {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names exactly as in the proto (snake_case)
    enums: String, // enum values by name, e.g. 'MESSAGE_TYPE_MESSAGE'
    longs: String,
    defaults: false, // a field at its default is absent (a plain message may have no `type`)
    oneofs: true, // `kind` names the field a oneof holds
  });
  return grpc.loadPackageDefinition(definition).channelgateway.v1.ChannelGateway;
}

function send(client, request, opts) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + opts.timeoutMs);
    client.Send(request, opts.metadata, { deadline }, (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

// Answers one event; returns what was done, for the log.
async function echo(client, event, opts) {
  const m = event.message || {};
  const kind = m.type || 'MESSAGE_TYPE_UNSPECIFIED';
  if (!['MESSAGE_TYPE_UNSPECIFIED', 'MESSAGE_TYPE_MESSAGE'].includes(kind)) return { skipped: kind };
  if (!m.text) return { skipped: 'no text' }; // a picture, a file, a sticker...
  const reply = await send(client, {
    message: { address: m.address, text: `echo: ${m.text}` },
    idempotency_key: `echo-${event.event_id}`,
    // ACCEPTED: the gateway has stored the reply and will deliver it, so the event may be acked.
    wait: 'WAIT_MODE_ACCEPTED',
  }, opts);
  return { reply: reply.message_id };
}

async function main() {
  const o = options();
  const maxEvents = Number(o['max-events']);
  const ChannelGateway = loadGateway();
  const client = new ChannelGateway(o.gateway, grpc.credentials.createInsecure());
  const metadata = new grpc.Metadata();
  if (o.token) metadata.set('authorization', `Bearer ${o.token}`);
  const opts = { metadata, timeoutMs: Number(o.timeout) * 1000 };

  await new Promise((resolve, reject) =>
    client.waitForReady(new Date(Date.now() + opts.timeoutMs), (err) =>
      err ? reject(new Error(`no gateway at ${o.gateway}: ${err.message}`)) : resolve()));

  const stream = client.Receive(metadata);
  stream.write({ subscribe: { group: o.group, bot_ids: o['bot-id'], channel_ids: o['channel-id'] } });

  let stopping = false;
  let busy = 0; // events being answered: their acks go out before the stream is closed
  let handled = 0;
  let closed = false;
  const close = () => {
    if (closed || busy > 0) return;
    closed = true;
    // A half-close: the gateway takes every ack sent before it, then ends the stream. Should it
    // not do so soon, give up on it.
    stream.end();
    setTimeout(() => stream.cancel(), 10_000).unref();
  };
  const stop = () => {
    stopping = true;
    close();
  };
  process.on('SIGINT', stop);
  process.on('SIGTERM', stop);

  const log = (fields) => console.log(JSON.stringify(fields));

  stream.on('data', async (response) => {
    if (response.subscribed) {
      log({ subscribed: { group: response.subscribed.group, max_in_flight: response.subscribed.max_in_flight } });
      return;
    }
    if (stopping) return; // not acked: the gateway gives it to the next bot
    const event = response.event;
    busy += 1;
    try {
      const done = await echo(client, event, opts);
      stream.write({ ack: { event_ids: [event.event_id] } });
      handled += 1;
      const a = event.message.address || {};
      log({
        event_id: event.event_id, attempt: event.attempt || 0, channel_id: a.channel_id,
        conversation: (a.conversation || {}).id, thread: a.thread_id, text: event.message.text, ...done,
      });
      if (maxEvents > 0 && handled >= maxEvents) stopping = true;
    } catch (err) {
      // Not acked: the gateway gives it back once the stream ends, to this bot restarted or another.
      fail(err);
    } finally {
      busy -= 1;
    }
    if (stopping) close();
  });

  const fail = (err) => {
    if (process.exitCode) return;
    const code = err.code !== undefined ? `${grpc.status[err.code]}: ` : '';
    console.error(`bot.js: ${code}${err.details || err.message}`);
    process.exitCode = 1;
    stopping = true;
    stream.cancel();
  };

  await new Promise((resolve) => {
    stream.on('error', (err) => {
      if (!(stopping && err.code === grpc.status.CANCELLED)) fail(err);
      resolve();
    });
    stream.on('end', () => {
      if (!stopping) fail(new Error('the gateway ended the stream'));
      resolve();
    });
  });
  client.close();
  console.error(`bot.js: stopped after ${handled} events`);
}

main().catch((err) => {
  const code = err.code !== undefined ? `${grpc.status[err.code]}: ` : '';
  console.error(`bot.js: ${code}${err.details || err.message}`);
  process.exit(1);
});
