#!/usr/bin/env node
'use strict';
// SOFA Bolt server built on sofa-rpc-node (no registry). See README.md.
const args = require('./lib/args');
const USAGE = 'bolt_server.js --port P --name NAME [--hessian 3|4] [--verbose]';
const opt = args.parse(process.argv.slice(2), {
  values: [ 'port', 'name', 'hessian' ], bools: [ 'verbose' ], required: [ 'port', 'name' ], usage: USAGE,
});
const port = args.int(opt.port, 'port', USAGE);
const name = opt.name;
const protocol = require('sofa-bolt-node');
if (opt.hessian) {
  if (opt.hessian !== '3' && opt.hessian !== '4') args.usage('--hessian must be 3 or 4', USAGE);
  protocol.setHessianVersion(opt.hessian + '.0');
}
const { RpcServer } = require('sofa-rpc-node').server;
const logger = args.stderrLogger(opt.verbose);
const ev = line => process.stderr.write('event ' + line + '\n');

// Bind 127.0.0.1 only (the library listens on all interfaces).
class LoopbackServer extends RpcServer {
  _startServer(p) {
    const net = require('net');
    const server = net.createServer();
    server.once('error', err => { this.emit('error', err); });
    server.on('connection', socket => { this._handleSocket(socket); });
    server.listen(p, '127.0.0.1', () => {
      this.publishPort = server.address().port;
    });
    return server;
  }
}

async function main() {
  const server = new LoopbackServer({ appName: 'tessera-bolt-peer', logger, port, publishAddress: '127.0.0.1' });
  server.on('error', err => logger.warn('server error: %s', err && err.message));
  server.on('connection', conn => {
    ev('connection ' + conn.remoteAddress);
    // The connection's decoder emits `heartbeat` for every heartbeat frame (v1 or v2); the library then acks it.
    conn._decoder.on('heartbeat', hb => {
      ev('heartbeat');
      if (opt.verbose) logger.info('heartbeat id=%s bolt=%s crc=%s', hb.packetId, hb.options.boltVersion, hb.options.crcEnable);
    });
  });
  server.on('request', ({ req }) => {
    ev('request ' + req.data.serverSignature + '#' + req.data.methodName + ' id=' + req.packetId);
  });
  server.addService({ interfaceName: 'com.example.EchoService', version: '1.0' }, {
    async echo(s) { return name + ':' + s; },
    async add(a, b) { return a + b; },
  });
  server.addService({ interfaceName: 'com.example.HelloService', version: '1.0' }, {
    async sayHello(s) { return name + ' hello ' + s; },
  });
  await server.start();
  process.stdout.write('listening ' + server._servers[0].address().port + '\n');
}

main().catch(err => { process.stderr.write('fatal ' + (err && err.stack) + '\n'); process.exit(1); });
