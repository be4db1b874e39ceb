#!/usr/bin/env node
'use strict';
// Dubbo client built on apache-dubbo-consumer's DubboDirectlyInvoker (no registry). One JSON line per call.
const args = require('./lib/args');
const USAGE = 'dubbo_client.js --target HOST:PORT --interface I --method M [--args JSON_ARRAY] [--version V] ' +
  '[--group G] [--attach k=v ...] [--count N] [--timeout MS] [--dubbo-version 2.0.2] [--hold MS] [--verbose]';
const opt = args.parse(process.argv.slice(2), {
  values: [ 'target', 'interface', 'method', 'args', 'version', 'group', 'count', 'timeout', 'dubbo-version', 'hold' ],
  bools: [ 'verbose' ], multi: [ 'attach' ],
  required: [ 'target', 'interface', 'method' ], usage: USAGE,
});
const target = args.hostPort(opt.target, USAGE);
const callArgs = opt.args === undefined ? [] : args.json(opt.args, 'args', USAGE);
if (!Array.isArray(callArgs)) args.usage('--args must be a JSON array', USAGE);
const count = opt.count === undefined ? 1 : args.int(opt.count, 'count', USAGE);
const timeout = opt.timeout === undefined ? 3000 : args.int(opt.timeout, 'timeout', USAGE);
const hold = opt.hold === undefined ? 0 : args.int(opt.hold, 'hold', USAGE);
const attachments = {};
for (const kv of opt.attach) {
  const i = kv.indexOf('=');
  if (i <= 0) args.usage('--attach needs k=v', USAGE);
  attachments[kv.slice(0, i)] = kv.slice(i + 1);
}

// Keep the response status: the library turns any status != 20 into DubboServiceError(body string) without it.
const dec = require('apache-dubbo-serialization/lib/decode-hessian2');
const origDecode = dec.decodeDubboResponse;
dec.decodeDubboResponse = function(bytes) {
  const r = origDecode.call(this, bytes);
  if (r && r.err) r.err.dubboStatus = bytes[3];
  return r;
};

function javaArg(v) {
  if (v !== null && typeof v === 'object' && !Array.isArray(v) && v.$class) return v;
  if (typeof v === 'string') return { $class: 'java.lang.String', $: v };
  if (typeof v === 'boolean') return { $class: 'boolean', $: v };
  if (typeof v === 'number') return Number.isInteger(v) ? { $class: 'int', $: v } : { $class: 'double', $: v };
  if (Array.isArray(v)) return { $class: 'java.util.List', $: v.map(javaArg) };
  if (v === null) return { $class: 'java.lang.Object', $: null };
  return { $class: 'java.util.HashMap', $: v };
}

const report = args.reporter(count);
const { DubboDirectlyInvoker } = require('apache-dubbo-consumer');

async function main() {
  const invoker = DubboDirectlyInvoker.from({
    dubboHost: target.host + ':' + target.port,
    dubboVersion: opt['dubbo-version'] || '2.0.2',
    dubboInvokeTimeout: timeout,
  });
  const proxy = invoker.proxyService({
    dubboInterface: opt.interface,
    version: opt.version,
    group: opt.group,
    attachments,
    methods: { [opt.method]: (...a) => a.map(javaArg) },
  });
  for (let n = 0; n < count; n++) {
    let r;
    try {
      r = await proxy[opt.method](...callArgs);
    } catch (err) {
      r = { err };
    }
    if (r.err) {
      const e = r.err;
      report({ ok: false, error: String(e && (e.message || e)), code: e && e.dubboStatus !== undefined ? e.dubboStatus : null });
    } else {
      report({ ok: true, value: r.res === undefined ? null : r.res });
    }
  }
  if (hold > 0) await new Promise(res => setTimeout(res, hold));
  invoker.close();
}

main().then(() => process.exit(0), err => {
  process.stderr.write('fatal ' + (err && err.stack) + '\n');
  process.exit(0);
});
