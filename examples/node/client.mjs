// A Node.js client of the managed-agents mesh, using nothing but the .proto files in ../../protos:
// it creates a session, appends a user message, wakes a brain and tails the session's events until the
// turn ends. Usage: node client.mjs STORE_ADDR BRAIN_ADDR "prompt"   (prints one JSON event per line)
// A mesh closed with a mesh secret (as `managed-agents up` makes it) is reached by setting
// MANAGED_AGENTS_MESH_SECRET_FILE (or MANAGED_AGENTS_MESH_SECRET), as for every other mesh process.
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const here = path.dirname(fileURLToPath(import.meta.url));
const protoRoot = path.resolve(here, "../../protos");
const definition = protoLoader.loadSync(
  ["managed_agents/v1/session.proto", "managed_agents/v1/brain.proto"],
  { includeDirs: [protoRoot], keepCase: true, longs: String, enums: String, defaults: false, oneofs: true },
);
const v1 = grpc.loadPackageDefinition(definition).managed_agents.v1;

const [storeAddress, brainAddress, prompt = "Hello from Node.js"] = process.argv.slice(2);
if (!storeAddress || !brainAddress) {
  console.error("usage: node client.mjs STORE_ADDR BRAIN_ADDR [PROMPT]");
  process.exit(2);
}
const secretFile = process.env.MANAGED_AGENTS_MESH_SECRET_FILE;
const secret = (secretFile ? fs.readFileSync(secretFile, "utf8") : process.env.MANAGED_AGENTS_MESH_SECRET ?? "").trim();
const metadata = new grpc.Metadata();
if (secret) {
  metadata.set("authorization", `Bearer ${secret}`);
}
const store = new v1.SessionService(storeAddress, grpc.credentials.createInsecure());
const brain = new v1.BrainService(brainAddress, grpc.credentials.createInsecure());

function call(client, method, request) {
  return new Promise((resolve, reject) =>
    client[method](request, metadata, (error, response) => (error ? reject(error) : resolve(response))),
  );
}

try {
  const { session } = await call(store, "CreateSession", { session: { title: "from node" } });
  console.error(`session ${session.id}`);
  const message = { user_message: { content: [{ text: { text: prompt } }] }, producer: "node-example" };
  await call(store, "EmitEvent", { session_id: session.id, event: message });
  const woken = await call(brain, "Wake", { session_id: session.id });
  console.error(`wake: ${woken.outcome}`);
  const stream = store.WatchSession({ session_id: session.id, after_seq: "0" }, metadata);
  stream.on("data", ({ event }) => {
    console.log(JSON.stringify(event));
    if (event.session_status_idle) {
      stream.cancel();
    }
  });
  stream.on("error", (error) => {
    if (error.code !== grpc.status.CANCELLED) {
      console.error(`stream failed: ${error.message}`);
      process.exit(1);
    }
    process.exit(0);
  });
} catch (error) {
  console.error(`error: ${error.code} ${error.details ?? error.message}`);
  process.exit(1);
}
