#!/usr/bin/env node
// A Takeoff client in Node.js built from the protos alone (no generated code): it creates an image job
// and a local-container queue, enqueues the job, watches the item until it ends (cancelling it, so that
// it ends whether or not an agent runs containers), then sends a bad Enqueue and decodes the error's
// details. Usage: node client.js [--registry HOST:PORT] [--queue HOST:PORT] [--project ID] [--key-file F]
// Every call presents an API key, `authorization: Bearer KEY`: TAKEOFF_API_KEY, else the file --key-file,
// else the admin key `takeoff up` writes, $TAKEOFF_HOME/keys/admin.key (TAKEOFF_HOME: ~/.takeoff).
'use strict';

const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTOS = path.resolve(__dirname, '..', '..', 'protos');

// camelCase field names, int64 as decimal strings (a JS number loses precision past 2^53), enums by name.
const LOADER_OPTIONS = { keepCase: false, longs: String, enums: String, defaults: true, oneofs: true };
const { takeoff } = grpc.loadPackageDefinition(
  protoLoader.loadSync(['takeoff/v1/jobs.proto', 'takeoff/v1/queue.proto'], {
    ...LOADER_OPTIONS,
    includeDirs: [PROTOS],
  }),
);

// The error details are not part of any service, so they are decoded with protobufjs (which proto-loader
// is built on) from the vendored google/rpc protos.
const errorProtos = new protobuf.Root();
errorProtos.resolvePath = (origin, target) => path.join(PROTOS, target);
errorProtos.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto']);
const Status = errorProtos.lookupType('google.rpc.Status');

const INPUT_SCHEMA = {
  type: 'object',
  properties: { lr: { type: 'number' }, epochs: { type: 'integer', minimum: 1 } },
};

function settings() {
  const { values } = parseArgs({
    options: {
      registry: { type: 'string', default: process.env.TAKEOFF_REGISTRY_ADDRESS ?? '127.0.0.1:50051' },
      queue: { type: 'string', default: process.env.TAKEOFF_QUEUE_ADDRESS ?? '127.0.0.1:50052' },
      project: { type: 'string', default: 'node-example' },
      'key-file': { type: 'string' },
    },
  });
  return values;
}

// The key, found as the Python SDK finds it (a key is never printed).
function apiKey(keyFile) {
  if (process.env.TAKEOFF_API_KEY) return process.env.TAKEOFF_API_KEY.trim();
  const home = process.env.TAKEOFF_HOME || path.join(os.homedir(), '.takeoff');
  const file = keyFile ?? path.join(home, 'keys', 'admin.key');
  try {
    return fs.readFileSync(file, 'utf8').trim();
  } catch {
    throw new Error(`no API key: set TAKEOFF_API_KEY, pass --key-file, or run \`takeoff up\` (it writes ${file})`);
  }
}

// Metadata every call carries: the key as a bearer token.
let callMetadata = new grpc.Metadata();

// google.protobuf.Struct is a message, not a JSON object, to proto-loader: each value names its kind
// (nullValue, numberValue, stringValue, boolValue, structValue, listValue).
function toValue(value) {
  if (value === null) return { nullValue: 'NULL_VALUE' };
  if (Array.isArray(value)) return { listValue: { values: value.map(toValue) } };
  switch (typeof value) {
    case 'number':
      return { numberValue: value };
    case 'string':
      return { stringValue: value };
    case 'boolean':
      return { boolValue: value };
    case 'object':
      return { structValue: toStruct(value) };
    default:
      throw new TypeError(`not a JSON value: ${value}`);
  }
}

function toStruct(object) {
  return { fields: Object.fromEntries(Object.entries(object).map(([key, value]) => [key, toValue(value)])) };
}

function fromValue(value) {
  switch (value.kind) {
    case 'nullValue':
      return null;
    case 'listValue':
      return value.listValue.values.map(fromValue);
    case 'structValue':
      return fromStruct(value.structValue);
    default:
      return value[value.kind];
  }
}

function fromStruct(struct) {
  return Object.fromEntries(Object.entries(struct?.fields ?? {}).map(([key, value]) => [key, fromValue(value)]));
}

// google.protobuf.Timestamp: seconds (an int64, so a string) and nanos.
function isoTime(timestamp) {
  return new Date(Number(timestamp.seconds) * 1000 + Math.floor(timestamp.nanos / 1e6)).toISOString();
}

function call(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, callMetadata, { deadline: Date.now() + 30_000 }, (error, response) =>
      error ? reject(error) : resolve(response),
    );
  });
}

// A Takeoff error carries a google.rpc.Status in the grpc-status-details-bin trailer; its details are
// Any messages: an ErrorInfo (reason, domain "takeoff.dev") and, for bad input, a BadRequest.
function errorDetails(error) {
  const [encoded] = error.metadata?.get('grpc-status-details-bin') ?? [];
  if (encoded === undefined) return {};
  const details = {};
  for (const any of Status.decode(encoded).details) {
    // protobufjs's built-in google.protobuf.Any keeps the proto field name, type_url.
    const type = errorProtos.lookupType(any.type_url.slice(any.type_url.lastIndexOf('/') + 1));
    details[type.name] = type.toObject(type.decode(any.value), LOADER_OPTIONS);
  }
  return details;
}

async function main() {
  const { registry, queue: queueAddress, project, 'key-file': keyFile } = settings();
  callMetadata = new grpc.Metadata();
  callMetadata.set('authorization', `Bearer ${apiKey(keyFile)}`);
  const credentials = grpc.credentials.createInsecure();
  const jobs = new takeoff.v1.JobService(registry, credentials);
  const queues = new takeoff.v1.QueueService(queueAddress, credentials);
  const parent = `projects/${project}`;

  const { version } = await call(jobs, 'CreateJobVersion', {
    parent: `${parent}/jobs/hello-node`,
    allowMissing: true,
    version: {
      source: { image: { reference: 'python:3.12-slim' } },
      entrypoint: ['python', '-c', 'print("hello from a Takeoff item")'],
      inputs: { schema: toStruct(INPUT_SCHEMA), defaults: toStruct({ lr: 0.1, epochs: 3 }) },
    },
  });
  console.log(`job version: ${version.name} (version ${JSON.stringify(version.version)})`);

  const queueName = `${parent}/queues/containers`;
  try {
    await call(queues, 'CreateQueue', {
      parent,
      queueId: 'containers',
      queue: {
        resource: 'RESOURCE_KIND_LOCAL_CONTAINER',
        resourceConfig: toStruct({ cpus: 2, shm_size: '1g' }),
        startTimeout: { seconds: 600, nanos: 0 },
      },
    });
    console.log(`queue: ${queueName} created`);
  } catch (error) {
    if (errorDetails(error).ErrorInfo?.reason !== 'QUEUE_ALREADY_EXISTS') throw error;
    console.log(`queue: ${queueName} exists already`);
  }

  const { item } = await call(queues, 'Enqueue', {
    queue: queueName,
    job: 'hello-node',
    runConfig: toStruct({ lr: 0.05 }),
    priority: 'PRIORITY_HIGH',
    maxRunTime: { seconds: 3600, nanos: 0 },
  });
  console.log(`item: ${item.name} ${item.state}`);
  console.log(`  run config (schema defaults filled in): ${JSON.stringify(fromStruct(item.runConfig))}`);
  console.log(`  epoch ${JSON.stringify(item.epoch)}, enqueued at ${isoTime(item.enqueueTime)}`);

  const watch = queues.WatchItem({ name: item.name }, callMetadata, { deadline: Date.now() + 60_000 });
  let ended = item;
  for await (const { item: now, transition } of watch) {
    ended = now;
    if (transition === null) {
      // The first message is the item as it is now. Cancel it, so it ends without a container runner.
      console.log(`watch: ${now.state}`);
      await call(queues, 'CancelItem', { name: item.name, message: 'cancelled by the Node.js example' });
      continue;
    }
    const message = transition.message ? ` (${transition.message})` : '';
    console.log(`transition: ${transition.fromState} -> ${transition.toState}${message}`);
  }
  console.log(`ended: ${ended.state}`);

  try {
    await call(queues, 'Enqueue', {
      queue: queueName,
      job: 'hello-node',
      runConfig: toStruct({ lr: 'fast' }),
      maxAttempts: 1000,
    });
    throw new Error('the bad Enqueue was accepted');
  } catch (error) {
    if (error.code === undefined) throw error;
    const { ErrorInfo, BadRequest } = errorDetails(error);
    console.log(`error: ${grpc.status[error.code]} ${ErrorInfo.reason} (domain ${ErrorInfo.domain})`);
    for (const violation of BadRequest?.fieldViolations ?? []) {
      console.log(`  field ${violation.field}: ${violation.description}`);
    }
  }
  jobs.close();
  queues.close();
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
