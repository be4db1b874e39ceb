#!/usr/bin/env node
'use strict';
// Dubbo (dubbo protocol, hessian2) server built on apache-dubbo-service, no registry. See README.md.
const net = require('net');
const args = require('./lib/args');
const USAGE = 'dubbo_server.js --port P --name NAME [--group G] [--demo-version V] [--echo-version V] [--verbose]';
const opt = args.parse(process.argv.slice(2), {
  values: [ 'port', 'name', 'group', 'demo-version', 'echo-version' ], bools: [ 'verbose' ],
  required: [ 'port', 'name' ], usage: USAGE,
});
const port = args.int(opt.port, 'port', USAGE);
const name = opt.name;
const group = opt.group || '';
const demoVersion = opt['demo-version'] || '1.0.0';
const echoVersion = opt['echo-version'] || '0.0.0';
const ev = line => process.stderr.write('event ' + line + '\n');

// Every inbound frame goes through HeartBeat.isHeartBeat(); report the heartbeats (the library then replies itself).
const HeartBeat = require('apache-dubbo-serialization/lib/heartbeat').default;
const origIsHeartBeat = HeartBeat.isHeartBeat;
HeartBeat.isHeartBeat = function(buf) {
  const yes = origIsHeartBeat.call(this, buf);
  if (yes) ev('heartbeat');
  return yes;
};

// Every inbound request frame is decoded by decodeDubboRequest(); report it (also for unknown services).
const dec = require('apache-dubbo-serialization/lib/decode-hessian2');
const origDecodeRequest = dec.decodeDubboRequest;
dec.decodeDubboRequest = function(buf) {
  const r = origDecodeRequest.call(this, buf);
  ev('request ' + r.attachment.path + '#' + r.methodName + ' id=' + r.requestId + ' ' + JSON.stringify(r.attachment));
  return r;
};

const { DubboService, dubboSetting } = require('apache-dubbo-service');
dubboSetting
  .match('org.apache.dubbo.demo.DemoService', { group, version: demoVersion })
  .match('org.apache.dubbo.demo.EchoService', { group, version: echoVersion });

// The constructor insists on a registry object; this stub publishes nothing.
const registry = {
  ready: async () => {},
  registerServices: async () => {},
  close: () => {},
};

const svc = new DubboService({
  registry,
  dubboSetting,
  services: {
    DemoService: {
      dubboInterface: 'org.apache.dubbo.demo.DemoService',
      methods: {
        async sayHello(s) { return name + ' hello ' + s; },
      },
    },
    EchoService: {
      dubboInterface: 'org.apache.dubbo.demo.EchoService',
      methods: {
        async echo(s) { return name + ':' + s; },
        // Returns the request attachments as a JSON string (to check what reached the server).
        async attachments() { return JSON.stringify(arguments[arguments.length - 1].request.attachment); },
      },
    },
  },
});

// Replace the library's listen (random port 20888-30000 on all interfaces) before its nextTick runs:
// bind 127.0.0.1 on the requested port.
svc.listen = async () => {
  svc.port = port;
  svc.server = net.createServer(socket => {
    ev('connection ' + socket.remoteAddress + ':' + socket.remotePort);
    svc.handleSocketRequest(socket);
  });
  svc.server.on('error', err => { process.stderr.write('fatal listen: ' + err.message + '\n'); process.exit(1); });
  svc.server.listen(port, '127.0.0.1', () => {
    svc.port = svc.server.address().port;
    svc.registerServices();
  });
};

svc.ready().then(() => {
  process.stdout.write('listening ' + svc.port + '\n');
}, err => { process.stderr.write('fatal ' + (err && err.stack) + '\n'); process.exit(1); });
