#!/usr/bin/env node
'use strict';
// Raw Dubbo heartbeat peer: sends N heartbeat requests (dabb e2 00 <id> 00000001 4e) on one socket and prints one JSON
// line per reply frame. Replies are counted, not matched by id (the Node server answers with id 0). See README.md.
const net = require('net');
const args = require('./lib/args');
const USAGE = 'dubbo_heartbeat.js --target HOST:PORT --count N [--start-id ID] [--timeout MS] [--separate] [--hex]';
const opt = args.parse(process.argv.slice(2), {
  values: [ 'target', 'count', 'start-id', 'timeout' ], bools: [ 'separate', 'hex' ],
  required: [ 'target', 'count' ], usage: USAGE,
});
const target = args.hostPort(opt.target, USAGE);
const count = args.int(opt.count, 'count', USAGE);
const startId = opt['start-id'] === undefined ? 1 : args.int(opt['start-id'], 'start-id', USAGE);
const timeout = opt.timeout === undefined ? 3000 : args.int(opt.timeout, 'timeout', USAGE);
const out = o => process.stdout.write(JSON.stringify(o) + '\n');

function heartbeat(id) {
  const b = Buffer.alloc(17);
  b[0] = 0xda; b[1] = 0xbb; b[2] = 0xe2; b[3] = 0;
  b.writeBigInt64BE(BigInt(id), 4);
  b.writeUInt32BE(1, 12);
  b[16] = 0x4e; // hessian null
  return b;
}

let buf = Buffer.alloc(0);
let replies = 0;
let done = false;
const socket = net.connect(target.port, target.host);
function finish(extra) {
  if (done) return;
  done = true;
  if (extra) out(extra);
  socket.destroy();
  process.exit(0);
}
socket.setNoDelay(true);
socket.on('data', chunk => {
  buf = Buffer.concat([ buf, chunk ]);
  while (buf.length >= 16) {
    if (buf[0] !== 0xda || buf[1] !== 0xbb) return finish({ ok: false, error: 'bad magic ' + buf.slice(0, 2).toString('hex') });
    const len = buf.readUInt32BE(12);
    if (buf.length < 16 + len) return;
    const frame = buf.slice(0, 16 + len);
    buf = buf.slice(16 + len);
    const flag = frame[2];
    const isEvent = (flag & 0x20) !== 0;
    const line = {
      kind: isEvent && frame.length === 17 && frame[16] === 0x4e ? 'heartbeat_reply' : 'frame',
      id: Number(frame.readBigInt64BE(4)),
      status: frame[3],
      flag: flag,
      body: frame.slice(16).toString('hex'),
    };
    if (opt.hex) line.hex = frame.toString('hex');
    out(line);
    if (++replies >= count) return finish();
  }
});
socket.on('error', err => finish({ ok: false, error: err.message }));
socket.on('close', () => finish({ ok: false, error: 'closed' }));
socket.on('connect', async () => {
  if (count === 0) return finish();
  const frames = [];
  for (let i = 0; i < count; i++) frames.push(heartbeat(startId + i));
  if (opt.separate) {
    for (const f of frames) { socket.write(f); await new Promise(r => setTimeout(r, 20)); }
  } else {
    socket.write(Buffer.concat(frames));
  }
});
setTimeout(() => finish({ ok: false, error: 'timeout' }), timeout).unref();
