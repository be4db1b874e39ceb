'use strict';
// Tiny argv parser shared by the peer programs (no extra npm dependencies).
// Flags: `--name value`; boolean flags listed in `bools`; repeatable flags listed in `multi`.

function usage(msg, text) {
  process.stderr.write('usage error: ' + msg + '\n' + (text || '') + '\n');
  process.exit(2);
}

function parse(argv, spec) {
  const bools = new Set(spec.bools || []);
  const multi = new Set(spec.multi || []);
  const known = new Set([ ...(spec.values || []), ...bools, ...multi ]);
  const out = {};
  for (const m of multi) out[m] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith('--')) usage('unexpected argument ' + a, spec.usage);
    const key = a.slice(2);
    if (!known.has(key)) usage('unknown flag ' + a, spec.usage);
    if (bools.has(key)) { out[key] = true; continue; }
    if (i + 1 >= argv.length) usage('flag ' + a + ' needs a value', spec.usage);
    const v = argv[++i];
    if (multi.has(key)) out[key].push(v); else out[key] = v;
  }
  for (const r of spec.required || []) {
    if (out[r] === undefined) usage('missing --' + r, spec.usage);
  }
  return out;
}

function int(v, name, text) {
  const n = Number(v);
  if (!Number.isInteger(n)) usage('--' + name + ' must be an integer', text);
  return n;
}

function hostPort(v, text) {
  const i = v.lastIndexOf(':');
  if (i <= 0) usage('--target must be HOST:PORT', text);
  return { host: v.slice(0, i), port: int(v.slice(i + 1), 'target', text) };
}

function json(v, name, text) {
  try { return JSON.parse(v); } catch (e) { return usage('--' + name + ' must be JSON: ' + e.message, text); }
}

// A logger for the sofa/dubbo libraries: everything goes to stderr prefixed `log`, so stdout stays machine-readable.
function stderrLogger(verbose) {
  const w = level => (...a) => {
    if (!verbose && (level === 'debug' || level === 'info')) return;
    const util = require('util');
    process.stderr.write('log ' + level + ' ' + util.format(...a).replace(/\n/g, ' | ') + '\n');
  };
  return { debug: w('debug'), info: w('info'), warn: w('warn'), error: w('error') };
}

// One JSON line per call on stdout. A malformed reply can make a library throw inside its socket handler
// (e.g. a Dubbo error frame with an empty body): the calls not yet reported are reported as failed, so a
// client always prints `count` lines and exits 0.
function reporter(count) {
  let printed = 0;
  const report = o => { printed++; process.stdout.write(JSON.stringify(o) + '\n'); };
  process.on('uncaughtException', err => {
    const msg = 'uncaught: ' + String(err && err.message);
    process.stderr.write('log error ' + String(err && err.stack).replace(/\n/g, ' | ') + '\n');
    while (printed < count) report({ ok: false, error: msg, code: null });
    process.exit(0);
  });
  return report;
}

module.exports = { parse, int, hostPort, json, usage, stderrLogger, reporter };
