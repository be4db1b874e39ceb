#!/usr/bin/env node
'use strict';
// SOFA Bolt client built on sofa-rpc-node, direct serverHost (no registry). One JSON line per call. See README.md.
const args = require('./lib/args');
const USAGE = 'bolt_client.js --target HOST:PORT --service IFACE[:VERSION] --method M --args JSON_ARRAY ' +
  '[--count N] [--timeout MS] [--hessian 3|4] [--hold MS] [--heartbeat-ms MS] [--verbose]';
const opt = args.parse(process.argv.slice(2), {
  values: [ 'target', 'service', 'method', 'args', 'count', 'timeout', 'hessian', 'hold', 'heartbeat-ms' ],
  bools: [ 'verbose' ],
  required: [ 'target', 'service', 'method' ],
  usage: USAGE,
});
const target = args.hostPort(opt.target, USAGE);
const callArgs = opt.args === undefined ? [] : args.json(opt.args, 'args', USAGE);
if (!Array.isArray(callArgs)) args.usage('--args must be a JSON array', USAGE);
const count = opt.count === undefined ? 1 : args.int(opt.count, 'count', USAGE);
const timeout = opt.timeout === undefined ? 3000 : args.int(opt.timeout, 'timeout', USAGE);
const hold = opt.hold === undefined ? 0 : args.int(opt.hold, 'hold', USAGE);
const protocol = require('sofa-bolt-node');
if (opt.hessian) {
  if (opt.hessian !== '3' && opt.hessian !== '4') args.usage('--hessian must be 3 or 4', USAGE);
  protocol.setHessianVersion(opt.hessian + '.0');
}
if (opt['heartbeat-ms'] !== undefined) {
  // The client only heartbeats from its 10 s health-window tick, and only when idle > maxIdleTime (30 s).
  // Shrink both so a test can see client heartbeats quickly (see README).
  const ms = args.int(opt['heartbeat-ms'], 'heartbeat-ms', USAGE);
  require('sofa-rpc-node/lib/client/dynamic_config').instance.metric.bucketSizeInMs = ms;
}

// Capture the Bolt response status: sofa-bolt-node turns a non-zero status into a plain Error and drops the code.
const RpcResponseCommand = require('sofa-bolt-node/lib/protocol/rpc_res_cmd');
const origDecode = RpcResponseCommand.decode;
RpcResponseCommand.decode = function(byteBuffer, ctx) {
  const status = byteBuffer.getShort(byteBuffer.position());
  const ret = origDecode.call(this, byteBuffer, ctx);
  if (ret && ret.data && ret.data.error) ret.data.error.boltStatus = status;
  return ret;
};

// Java types for plain JSON values, using sofa's {$class, $} convention. Objects with $class pass through.
function javaArg(v) {
  if (v !== null && typeof v === 'object' && !Array.isArray(v) && v.$class) return v;
  if (typeof v === 'string') return { $class: 'java.lang.String', $: v };
  if (typeof v === 'boolean') return { $class: 'boolean', $: v };
  if (typeof v === 'number') return Number.isInteger(v) ? { $class: 'int', $: v } : { $class: 'double', $: v };
  if (v === null) return { $class: 'java.lang.Object', $: null };
  if (Array.isArray(v)) return { $class: 'java.util.List', $: v.map(javaArg) };
  return { $class: 'java.util.Map', $: v };
}

const report = args.reporter(count);
const { RpcClient } = require('sofa-rpc-node').client;

async function main() {
  const logger = args.stderrLogger(opt.verbose);
  const client = new RpcClient({ logger, responseTimeout: timeout });
  if (opt['heartbeat-ms'] !== undefined) {
    client.options.connectionOpts = Object.assign({}, client.options.connectionOpts,
      { maxIdleTime: args.int(opt['heartbeat-ms'], 'heartbeat-ms', USAGE) });
  }
  client.on('error', err => logger.warn('client error: %s', err && err.message));
  const svc = opt.service;
  const i = svc.indexOf(':');
  const interfaceName = i < 0 ? svc : svc.slice(0, i);
  const version = i < 0 ? '' : svc.slice(i + 1);
  const consumer = client.createConsumer({
    interfaceName, version: version || undefined, serverHost: target.host + ':' + target.port, responseTimeout: timeout,
  });
  if (!version) consumer.options.version = ''; // serverSignature without ":version"
  try {
    await consumer.ready();
  } catch (err) {
    for (let n = 0; n < count; n++) report({ ok: false, error: String(err && err.message), code: null });
    return client;
  }
  for (let n = 0; n < count; n++) {
    try {
      const value = await consumer.invoke(opt.method, callArgs.map(javaArg), { responseTimeout: timeout });
      report({ ok: true, value: value === undefined ? null : value });
    } catch (err) {
      report({ ok: false, error: String(err && err.message), code: err && err.boltStatus !== undefined ? err.boltStatus : null });
    }
  }
  if (hold > 0) await new Promise(r => setTimeout(r, hold));
  return client;
}

main().then(client => {
  Promise.race([ client.close(), new Promise(r => setTimeout(r, 500)) ]).then(() => process.exit(0));
}, err => {
  process.stderr.write('fatal ' + (err && err.stack) + '\n');
  process.exit(0);
});
