#!/usr/bin/env node
'use strict';
// Raw Bolt peer: sofa-bolt-node's own codec on a plain net.Socket. Sends N heartbeats (and optionally one RPC
// request), prints each decoded reply as one JSON line. See README.md.
const net = require('net');
const args = require('./lib/args');
const USAGE = 'bolt_raw.js --target HOST:PORT [--v2] [--crc] --heartbeats N [--request SERVICE,METHOD[,ARG...]] ' +
  '[--timeout MS] [--separate] [--hex] [--hessian 3|4]';
const opt = args.parse(process.argv.slice(2), {
  values: [ 'target', 'heartbeats', 'request', 'timeout', 'hessian' ],
  bools: [ 'v2', 'crc', 'separate', 'hex' ],
  required: [ 'target', 'heartbeats' ],
  usage: USAGE,
});
const target = args.hostPort(opt.target, USAGE);
const heartbeats = args.int(opt.heartbeats, 'heartbeats', USAGE);
const timeout = opt.timeout === undefined ? 3000 : args.int(opt.timeout, 'timeout', USAGE);
if (opt.crc && !opt.v2) args.usage('--crc needs --v2', USAGE);
const bolt = require('sofa-bolt-node');
if (opt.hessian) bolt.setHessianVersion(opt.hessian + '.0');
const protocol = require('sofa-bolt-node/lib/protocol');
const out = o => process.stdout.write(JSON.stringify(o) + '\n');

// Frame-level options: v1 = proto 1; --v2 = proto 2 with ver1 1; --v2 --crc = proto 2, ver1 2, switch bit0 (CRC32).
const frameOpts = {
  protocolType: opt.v2 ? 'bolt2' : 'bolt',
  boltVersion: opt.v2 && opt.crc ? 2 : 1,
  crcEnable: !!opt.crc,
  codecType: 'hessian2',
};

function javaArg(s) {
  let v = s;
  try { v = JSON.parse(s); } catch (_) { /* plain string */ }
  if (typeof v === 'number' && Number.isInteger(v)) return { $class: 'int', $: v };
  if (typeof v === 'number') return { $class: 'double', $: v };
  if (typeof v === 'boolean') return { $class: 'boolean', $: v };
  return { $class: 'java.lang.String', $: String(s) };
}

const frames = [];
let nextId = 1;
const expect = new Map(); // id -> kind
for (let i = 0; i < heartbeats; i++) {
  const id = nextId++;
  frames.push(Buffer.from(protocol.heartbeatEncode(id, { timeout: 3000 }, frameOpts)));
  expect.set(id, 'heartbeat_ack');
}
if (opt.request) {
  const parts = opt.request.split(',');
  if (parts.length < 2) args.usage('--request needs SERVICE,METHOD[,ARG...]', USAGE);
  const id = nextId++;
  const req = {
    serverSignature: parts[0], methodName: parts[1], args: parts.slice(2).map(javaArg),
    timeout: timeout, requestProps: { service: parts[0] }, targetAppName: undefined,
  };
  frames.push(Buffer.from(protocol.requestEncode(id, req, Object.assign({}, frameOpts))));
  expect.set(id, 'response');
}
if (opt.hex) for (const f of frames) process.stderr.write('sent ' + f.toString('hex') + '\n');

// Record the status and raw bytes of each decoded frame (sofa-bolt-node drops the status of error responses).
const RpcResponseCommand = require('sofa-bolt-node/lib/protocol/rpc_res_cmd');
const origResDecode = RpcResponseCommand.decode;
let lastStatus = null;
RpcResponseCommand.decode = function(bb, ctx) {
  lastStatus = bb.getShort(bb.position());
  return origResDecode.call(this, bb, ctx);
};
let lastHex = null;
const origDecode = protocol.decode;
protocol.decode = (buf, options) => {
  lastHex = Buffer.from(buf).toString('hex');
  lastStatus = null;
  return origDecode(buf, options);
};

const decoder = bolt.decoder({ sentReqs: new Map(), classCache: new Map() });
let done = false;
function finish(extra) {
  if (done) return;
  done = true;
  if (extra) out(extra);
  socket.destroy();
  process.exit(0);
}
function got(kind, obj) {
  const line = { kind, id: obj.packetId };
  if (kind === 'response') {
    const st = lastStatus === null ? 0 : lastStatus;
    line.status = st;
    const d = obj.data || {};
    if (d.error) {
      line.value = null;
      line.error = String(d.error.message);
    } else {
      line.value = d.appResponse === undefined ? null : d.appResponse;
      if (d.isError) line.error = String(d.errorMsg);
    }
  } else {
    line.status = 0;
  }
  line.proto = obj.options && obj.options.protocolType === 'bolt2' ? 2 : 1;
  if (obj.options && obj.options.crcEnable) line.crc = true;
  if (opt.hex) line.hex = lastHex;
  out(line);
  expect.delete(obj.packetId);
  if (expect.size === 0) finish();
}
decoder.on('heartbeat_ack', hb => got('heartbeat_ack', hb));
decoder.on('response', res => got('response', res));
decoder.on('error', err => finish({ ok: false, error: 'decode: ' + err.message }));

const socket = net.connect(target.port, target.host);
socket.setNoDelay(true);
socket.on('data', chunk => decoder.write(chunk));
socket.on('error', err => finish({ ok: false, error: err.message }));
socket.on('close', () => finish({ ok: false, error: 'closed' }));
socket.on('connect', async () => {
  if (expect.size === 0) return finish();
  if (opt.separate) {
    for (const f of frames) {
      socket.write(f);
      await new Promise(r => setTimeout(r, 20));
    }
  } else {
    socket.write(Buffer.concat(frames)); // several frames in one write, as sofa-bolt-node itself does
  }
});
setTimeout(() => finish({ ok: false, error: 'timeout' }), timeout).unref();
