#!/usr/bin/env node
// A gridstor client in another language: @grpc/grpc-js + @grpc/proto-loader over the repo's protos.
//
//   node client.js put FILE OUT [options]   upload FILE (IngestService.Upload), wait for the job
//                                           (Status wait=true), download it (MetaService.Download) into OUT;
//                                           prints {"id", "job", "size", "hash", "downloaded"} as JSON
//   node client.js get ID OUT [options]     download ID into OUT; prints {"id", "size"} as JSON
//
// Options (or environment):
//   --ingest HOST:PORT   ($GRIDSTOR_INGEST, default 127.0.0.1:7102)
//   --meta HOST:PORT     ($GRIDSTOR_META, default 127.0.0.1:7103)
//   --include DIR        proto include dir, repeatable ($GRIDSTOR_PROTO_INCLUDE, ':'-separated); the repo's
//                        protos/ and googleapis-common-protos' dir (the one holding google/api/*.proto)
//   --ca FILE            TLS, trusting this CA ($GRIDSTOR_CA); plain text without it
//   --token TOKEN        bearer token ($GRIDSTOR_TOKEN) for a gateway that is not public
//
// Any failure: a JSON line {"error": {"code", "name", "details"}} on stderr and exit code 1 (2 for bad usage).
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const { once } = require("node:events");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const MESSAGE = 256 * 1024; // upload message size, as the Python clients send
const STATUS_WAIT = 60; // seconds per Status(wait=true); repeated while the job is active
const JOB_DEADLINE_MS = 300 * 1000;
const MAX_MESSAGE = 8 * 1024 * 1024;

class UsageError extends Error {}

function parseArgs(argv) {
  const opts = {
    ingest: process.env.GRIDSTOR_INGEST || "127.0.0.1:7102",
    meta: process.env.GRIDSTOR_META || "127.0.0.1:7103",
    include: (process.env.GRIDSTOR_PROTO_INCLUDE || "").split(path.delimiter).filter(Boolean),
    ca: process.env.GRIDSTOR_CA || "",
    token: process.env.GRIDSTOR_TOKEN || "",
    positional: [],
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new UsageError(`${arg} needs a value`);
      return argv[++i];
    };
    if (arg === "--ingest") opts.ingest = value();
    else if (arg === "--meta") opts.meta = value();
    else if (arg === "--include") opts.include.push(value());
    else if (arg === "--ca") opts.ca = value();
    else if (arg === "--token") opts.token = value();
    else if (arg.startsWith("--")) throw new UsageError(`unknown option ${arg}`);
    else opts.positional.push(arg);
  }
  const [command, ...rest] = opts.positional;
  if (!["put", "get"].includes(command) || rest.length !== 2) {
    throw new UsageError("usage: node client.js put FILE OUT | get ID OUT [--ingest H:P] [--meta H:P] [--include DIR]...");
  }
  if (!opts.include.some((dir) => fs.existsSync(path.join(dir, "gridstor/v1/ingest.proto")))) {
    throw new UsageError("no --include dir holds gridstor/v1/ingest.proto (pass the repo's protos/)");
  }
  if (!opts.include.some((dir) => fs.existsSync(path.join(dir, "google/api/httpbody.proto")))) {
    throw new UsageError("no --include dir holds google/api/httpbody.proto (pass googleapis-common-protos' dir)");
  }
  return { ...opts, command, args: rest };
}

function loadServices(opts) {
  const definition = protoLoader.loadSync(
    ["gridstor/v1/ingest.proto", "gridstor/v1/meta.proto"], // found through includeDirs, as protoc would
    { keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true, includeDirs: opts.include },
  );
  const pkg = grpc.loadPackageDefinition(definition).gridstor.v1;
  const credentials = opts.ca
    ? grpc.credentials.createSsl(fs.readFileSync(opts.ca))
    : grpc.credentials.createInsecure();
  const options = {
    "grpc.max_receive_message_length": MAX_MESSAGE,
    "grpc.max_send_message_length": MAX_MESSAGE,
  };
  return {
    ingest: new pkg.IngestService(opts.ingest, credentials, options),
    meta: new pkg.MetaService(opts.meta, credentials, options),
  };
}

function metadataFor(opts) {
  const md = new grpc.Metadata();
  if (opts.token) md.set("authorization", `Bearer ${opts.token}`);
  return md;
}

// Stream FILE in 256 KiB messages; the first carries the name and the declared size.
async function upload(ingest, opts, file) {
  const size = fs.statSync(file).size;
  let call;
  const done = new Promise((resolve, reject) => {
    call = ingest.Upload(metadataFor(opts), (err, res) => (err ? reject(err) : resolve(res)));
  });
  done.catch(() => {}); // a refusal mid-stream is reported where `done` is awaited, below
  let first = true;
  const stream = fs.createReadStream(file, { highWaterMark: MESSAGE });
  for await (const chunk of stream) {
    const msg = { body: { data: chunk } };
    if (first) {
      msg.name = path.basename(file);
      msg.declared_size = size;
      first = false;
    }
    if (!call.write(msg)) await Promise.race([once(call, "drain"), done]);
  }
  if (first) call.write({ name: path.basename(file), declared_size: 0 }); // an empty file is one message
  call.end();
  return done;
}

function status(ingest, job) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + (STATUS_WAIT + 10) * 1000);
    ingest.Status({ job, wait: true, timeout_seconds: STATUS_WAIT }, { deadline }, (err, res) =>
      err ? reject(err) : resolve(res),
    );
  });
}

async function waitJob(ingest, job) {
  const giveUp = Date.now() + JOB_DEADLINE_MS;
  for (;;) {
    const reply = await status(ingest, job);
    if (reply.state === "JOB_STATE_DONE") return reply;
    if (reply.state === "JOB_STATE_ERROR") {
      throw Object.assign(new Error(`job ${job} failed: ${reply.error}`), { name: "JOB_ERROR" });
    }
    if (Date.now() > giveUp) {
      throw Object.assign(new Error(`job ${job} still ${reply.result}`), { name: "JOB_TIMEOUT" });
    }
  }
}

// Write every message of the Download stream to OUT; check the total against x-gridstor-size.
async function download(meta, opts, id, out) {
  const call = meta.Download({ id }, metadataFor(opts));
  let expected = null;
  call.on("metadata", (md) => {
    const v = md.get("x-gridstor-size");
    if (v.length) expected = Number(v[0]);
  });
  const sink = fs.createWriteStream(out);
  let total = 0;
  try {
    for await (const msg of call) {
      total += msg.data.length;
      if (!sink.write(msg.data)) await once(sink, "drain");
    }
  } finally {
    sink.end();
    await once(sink, "close");
  }
  if (expected !== null && expected !== total) {
    throw Object.assign(new Error(`download of ${id} ended after ${total} of ${expected} bytes`), {
      name: "TRUNCATED",
    });
  }
  return total;
}

function errorJson(err) {
  if (err instanceof UsageError) return { code: null, name: "USAGE", details: err.message };
  if (typeof err.code === "number" && err.details !== undefined) {
    // A gRPC status: its number, the name grpc-js knows it by, and the server's message.
    const name = Object.keys(grpc.status).find((k) => grpc.status[k] === err.code) || String(err.code);
    return { code: err.code, name, details: err.details };
  }
  return { code: null, name: err.name || "Error", details: err.message };
}

async function main() {
  let opts;
  try {
    opts = parseArgs(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(JSON.stringify({ error: errorJson(err) }) + "\n");
    return 2;
  }
  const { ingest, meta } = loadServices(opts);
  try {
    if (opts.command === "put") {
      const [file, out] = opts.args;
      const reply = await upload(ingest, opts, file);
      const job = await waitJob(ingest, reply.job);
      const downloaded = await download(meta, opts, job.file_id, out);
      console.log(JSON.stringify({ id: job.file_id, job: reply.job, size: job.size, hash: job.hash, downloaded }));
    } else {
      const [id, out] = opts.args;
      const size = await download(meta, opts, id, out);
      console.log(JSON.stringify({ id, size }));
    }
    return 0;
  } catch (err) {
    process.stderr.write(JSON.stringify({ error: errorJson(err) }) + "\n");
    return 1;
  } finally {
    ingest.close();
    meta.close();
  }
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (err) => {
    process.stderr.write(JSON.stringify({ error: errorJson(err) }) + "\n");
    process.exitCode = 1;
  },
);
