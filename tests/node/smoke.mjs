// A second-language client: memory3 from Node.js with only the .proto files (proto/memory3/v1),
// @grpc/grpc-js and @grpc/proto-loader, and a memory blob built from docs/memory-blob.md.
// Scenario: tenant, key and bank (admin); write a reference with its memory; retrieve it; fetch it
// and check its bytes and CRC; log and read a trajectory; health; reflection v1.
// Usage: TARGET=127.0.0.1:50051 ADMIN_KEY=... node smoke.mjs   (prints one JSON line; exit 1 on failure)

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const protoRoot = path.resolve(here, "../../proto");
const options = { keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true };
const load = (files, includeDirs) =>
  grpc.loadPackageDefinition(protoLoader.loadSync(files, { ...options, includeDirs }));
const m3 = load(["banks", "memories", "tenants", "trajectories"].map((n) => `memory3/v1/${n}.proto`), [protoRoot])
  .memory3.v1;
const health = load(["health.proto"], [path.join(here, "protos")]).grpc.health.v1;
const reflection = load(["reflection.proto"], [path.join(here, "protos")]).grpc.reflection.v1;

const target = process.env.TARGET;
const credentials = grpc.credentials.createInsecure();
const bearer = (key) => {
  const metadata = new grpc.Metadata();
  metadata.set("authorization", `Bearer ${key}`);
  return metadata;
};
const deadline = () => ({ deadline: Date.now() + 20000 });
const unary = (client, method, request, key) =>
  new Promise((resolve, reject) =>
    client[method](request, bearer(key), deadline(), (err, reply) => (err ? reject(err) : resolve(reply))));
const serverStream = (client, method, request, key) =>
  new Promise((resolve, reject) => {
    const items = [];
    const call = client[method](request, bearer(key), deadline());
    call.on("data", (item) => items.push(item));
    call.on("error", reject);
    call.on("end", () => resolve(items));
  });
const clientStream = (client, method, requests, key) =>
  new Promise((resolve, reject) => {
    const call = client[method](bearer(key), deadline(), (err, reply) => (err ? reject(err) : resolve(reply)));
    for (const request of requests) call.write(request);
    call.end();
  });
const check = (condition, what) => {
  if (!condition) throw new Error(`check failed: ${what}`);
};

// CRC-32 (IEEE, as zlib.crc32)
const crcTable = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});
const crc32 = (bytes) => {
  let c = 0xffffffff;
  for (const b of bytes) c = crcTable[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
};

// docs/memory-blob.md, scheme fp16, shape (L, H, T, D) = (1, 1, 1, 2), uncompressed
function memoryBlob(fingerprint) {
  const positions = Buffer.from([3]);
  const halves = [0x3800, 0xbc00, 0x4000, 0x3400]; // K = [0.5, -1.0], V = [2.0, 0.25] as IEEE half floats
  const kv = Buffer.alloc(8);
  halves.forEach((h, i) => kv.writeUInt16LE(h, 2 * i));
  const body = Buffer.concat([positions, kv]);
  const fp = Buffer.from(fingerprint, "ascii");
  const header = Buffer.alloc(30);
  header.write("M3KV", 0, "ascii");
  header.writeUInt16LE(1, 4); // format version
  header.writeUInt8(0, 6); // scheme fp16
  header.writeUInt8(0, 7); // flags: not compressed, uint8 positions
  [1, 1, 1, 2].forEach((v, i) => header.writeUInt16LE(v, 8 + 2 * i)); // L, H, T, D
  header.writeUInt32LE(0, 16); // codebook version
  header.writeUInt32LE(body.length, 20); // stored size
  header.writeUInt32LE(body.length, 24); // raw size
  header.writeUInt8(fp.length, 28);
  header.writeUInt8(0, 29);
  const blob = Buffer.concat([header, fp, body]);
  const trailer = Buffer.alloc(4);
  trailer.writeUInt32LE(crc32(blob), 0);
  return Buffer.concat([blob, trailer]);
}

async function main() {
  const adminKey = process.env.ADMIN_KEY;
  const tenants = new m3.Tenants(target, credentials);
  const banks = new m3.Banks(target, credentials);
  const memories = new m3.Memories(target, credentials);
  const trajectories = new m3.Trajectories(target, credentials);
  const tenantName = `node-${process.pid}`;
  await unary(tenants, "CreateTenant", { name: tenantName }, adminKey);
  const { api_key: key } = await unary(tenants, "IssueKey", { tenant: tenantName, label: "node smoke" }, adminKey);
  check(key.startsWith("m3_"), "IssueKey returns an m3_ key");

  const fingerprint = "cd".repeat(8);
  await unary(banks, "CreateBank", {
    bank: {
      name: "kb", model_fingerprint: fingerprint,
      memory_spec: { memory_layers: [0], kv_heads: 1, head_dim: 2, tokens_per_head: 1, reference_length: 16, codec: "fp16" },
      embedder: { name: "client", dimension: 2, metric: "l2" },
    },
  }, key);
  const blob = memoryBlob(fingerprint);
  const summary = await clientStream(memories, "Write", [
    { bank: "kb" },
    { reference: { external_id: "r1", text: "from node", metadata: { lang: "js" }, embedding: [1, 0],
                   memory_size: blob.length, memory_chunk: blob } },
  ], key);
  check(Number(summary.inserted) === 1, `Write inserted 1 (${JSON.stringify(summary)})`);

  const retrieved = await serverStream(memories, "Retrieve",
    { bank: "kb", vector: { values: [1, 0] }, top_k: 1, include_text: true }, key);
  const hit = retrieved.flatMap((m) => m.frames)[0].reference;
  check(hit.external_id === "r1" && hit.text === "from node", "Retrieve finds r1 with its text");

  const fetched = await serverStream(memories, "Fetch", { bank: "kb", external_ids: ["r1"], include_memory: true }, key);
  const frames = fetched.flatMap((m) => m.frames);
  const memory = Buffer.concat(frames.map((f) => f.memory_chunk));
  check(memory.equals(blob), "Fetch returns the memory byte for byte");
  check(frames[0].reference.memory_crc32 === crc32(blob.subarray(0, blob.length - 4)), "memory_crc32 is the blob's CRC");

  const logged = await clientStream(trajectories, "Log", [{ episodes: [{
    episode_id: "node-e1", model_fingerprint: fingerprint, prompt_ids: [1, 2], response_ids: [3],
    decision_position: [0], decision_token: [3], decision_llm_prob: [0.5], decision_rank: [0],
    decision_p_accept: [0.75], decision_accepted: [true], decision_rejections: [0], rewards: { rule: 1 },
  }] }], key);
  check(Number(logged.logged) === 1, "Log stores the episode");
  const pages = await serverStream(trajectories, "Read", {}, key);
  const episodes = pages.flatMap((p) => p.episodes);
  check(episodes.length === 1 && episodes[0].episode_id === "node-e1" && episodes[0].rewards.rule === 1,
        "Read returns the episode with its reward");

  const status = await new Promise((resolve, reject) =>
    new health.Health(target, credentials).Check({ service: "" }, deadline(),
      (err, reply) => (err ? reject(err) : resolve(reply.status))));
  check(status === "SERVING", "health is SERVING");

  const services = await new Promise((resolve, reject) => {
    const call = new reflection.ServerReflection(target, credentials).ServerReflectionInfo(deadline());
    call.on("data", (reply) => { resolve(reply.list_services_response.service.map((s) => s.name)); call.end(); });
    call.on("error", reject);
    call.write({ list_services: "" });
  });
  check(services.includes("memory3.v1.Memories"), "reflection v1 lists memory3.v1.Memories");

  console.log(JSON.stringify({ ok: true, tenant: tenantName, services: services.length }));
}

main().then(() => process.exit(0), (err) => {
  console.log(JSON.stringify({ ok: false, error: String(err && err.message || err) }));
  process.exit(1);
});
