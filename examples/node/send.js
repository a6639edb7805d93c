#!/usr/bin/env node
// Sends through a running channel-gateway: the calls a bot makes on its own (see bot.js for the loop).
//
// The stubs are built at run time from ../../proto by @grpc/proto-loader; @grpc/grpc-js makes the
// calls. It sends:
//   1. a typing indicator (SendTyping),
//   2. a text (Send, waiting for the channel's acknowledgement),
//   3. a carousel of three hero cards with buttons (Send),
//   4. a proactive message that starts a new conversation with the user (SendProactive with an
//      address without a conversation),
// and prints what the gateway answered for each, as JSON.
//
// Every flag has an environment variable:
//   GATEWAY_ADDRESS (127.0.0.1:50051)   CHANNEL_ID (msteams)   SERVICE_URL   BOT_ID   USER_ID
//   CONVERSATION_ID   TENANT_ID   GATEWAY_TOKEN (sent as `authorization: Bearer ...` when set)
//
//   npm ci && node send.js --bot-id 28:my-app-id --user-id 29:some-user --conversation-id a:1
'use strict';

const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const NAME = 'Node';
const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');

function options() {
  const env = (name, fallback) => process.env[name] || fallback;
  const { values } = parseArgs({
    options: {
      gateway: { type: 'string', default: env('GATEWAY_ADDRESS', '127.0.0.1:50051') },
      'channel-id': { type: 'string', default: env('CHANNEL_ID', 'msteams') },
      'service-url': { type: 'string', default: env('SERVICE_URL', 'https://smba.trafficmanager.net/amer/') },
      'bot-id': { type: 'string', default: env('BOT_ID', '') },
      'user-id': { type: 'string', default: env('USER_ID', '') },
      'conversation-id': { type: 'string', default: env('CONVERSATION_ID', '') },
      'tenant-id': { type: 'string', default: env('TENANT_ID', '') },
      token: { type: 'string', default: env('GATEWAY_TOKEN', '') },
      timeout: { type: 'string', default: '30' },
      help: { type: 'boolean', default: false },
    },
  });
  if (values.help) {
    console.log('usage: node send.js --bot-id ID --user-id ID --conversation-id ID [--gateway HOST:PORT]\n' +
      '       [--channel-id msteams] [--service-url URL] [--tenant-id ID] [--token TOKEN] [--timeout SECONDS]');
    process.exit(0);
  }
  for (const flag of ['bot-id', 'user-id', 'conversation-id']) {
    if (!values[flag]) {
      console.error(`send.js: --${flag} (or ${flag.toUpperCase().replace('-', '_')}) is required`);
      process.exit(2);
    }
  }
  return values;
}

function loadGateway() {
  const definition = protoLoader.loadSync('channelgateway/v1/gateway.proto', {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names exactly as in the proto (snake_case)
    enums: String, // enum values by name, e.g. 'WAIT_MODE_DELIVERED'
    longs: String,
    defaults: false,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).channelgateway.v1.ChannelGateway;
}

// Promisifies one unary call with a deadline and optional metadata.
function call(client, method, request, opts) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + opts.timeoutMs);
    client[method](request, opts.metadata, { deadline }, (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

function show(what, reply) {
  console.log(JSON.stringify({ call: what, reply }));
}

function hero(n) {
  return {
    hero: {
      title: `Option ${n}`,
      subtitle: `from the ${NAME} bot`,
      text: `Card ${n} of 3 in a carousel.`,
      images: [{ url: `https://example.com/images/${n}.png`, alt: `Option ${n}` }],
      buttons: [
        { type: 'ACTION_TYPE_IM_BACK', title: `Choose ${n}`, value: `choose ${n}` },
        { type: 'ACTION_TYPE_OPEN_URL', title: 'Details', value: `https://example.com/options/${n}` },
      ],
    },
  };
}

async function main() {
  const o = options();
  const ChannelGateway = loadGateway();
  const client = new ChannelGateway(o.gateway, grpc.credentials.createInsecure());
  const metadata = new grpc.Metadata();
  if (o.token) metadata.set('authorization', `Bearer ${o.token}`);
  const opts = { metadata, timeoutMs: Number(o.timeout) * 1000 };

  await new Promise((resolve, reject) =>
    client.waitForReady(new Date(Date.now() + opts.timeoutMs), (err) =>
      err ? reject(new Error(`no gateway at ${o.gateway}: ${err.message}`)) : resolve()));

  const address = {
    channel_id: o['channel-id'],
    service_url: o['service-url'],
    bot: { id: o['bot-id'], name: `${NAME} example bot` },
    user: { id: o['user-id'], tenant_id: o['tenant-id'] },
    conversation: { id: o['conversation-id'], tenant_id: o['tenant-id'] },
  };

  try {
    // 1. Typing: in line with the messages, so it shows before the text below.
    show('SendTyping', await call(client, 'SendTyping', { address }, opts));

    // 2. A text; WAIT_MODE_DELIVERED returns once the channel acknowledged it.
    const text = { address, text: `Hello from the ${NAME} bot`, text_format: 'TEXT_FORMAT_PLAIN' };
    show('Send text', await call(client, 'Send', { message: text, wait: 'WAIT_MODE_DELIVERED' }, opts));

    // 3. A carousel of three hero cards with buttons.
    const carousel = {
      address,
      text: `Pick one (${NAME})`,
      attachment_layout: 'ATTACHMENT_LAYOUT_CAROUSEL',
      attachments: [1, 2, 3].map(hero),
    };
    show('Send carousel', await call(client, 'Send', { message: carousel, wait: 'WAIT_MODE_DELIVERED' }, opts));

    // 4. Proactive: an address without a conversation starts a new one with the user; the
    //    answer's address carries the new conversation id to save for later sends.
    const proactiveAddress = { ...address, conversation: o['tenant-id'] ? { tenant_id: o['tenant-id'] } : undefined };
    const reply = await call(client, 'SendProactive', {
      address: proactiveAddress,
      messages: [{ text: `Proactive hello from the ${NAME} bot` }],
      wait: 'WAIT_MODE_DELIVERED',
    }, opts);
    show('SendProactive', reply);
    const failed = reply.results.filter((r) => r.state !== 'DELIVERY_STATE_DELIVERED');
    if (failed.length > 0) {
      throw new Error(`proactive message not delivered: ${JSON.stringify(failed[0].error)}`);
    }
    console.error(`send.js: new conversation ${reply.address.conversation.id}`);
  } finally {
    client.close();
  }
}

main().catch((err) => {
  const code = err.code !== undefined ? `${grpc.status[err.code]}: ` : '';
  console.error(`send.js: ${code}${err.details || err.message}`);
  process.exit(1);
});
