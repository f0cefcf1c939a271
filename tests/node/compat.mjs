// The official Node `openai` package against batchimg's mock: what a Node client sees.
//
//   BASE_URL=http://127.0.0.1:PORT/v1 KEY=sk-... node tests/node/compat.mjs
//
// Streams a generation with partial images, streams a multipart edit, sends JSON edits (by data
// URL and by file id: the package has no JSON-edit method, so they go through `client.post`),
// and reads the headers of a plain answer. Exits 1 at the first mismatch; prints one JSON line
// of what it did on success (tests/test_mock_node.py checks the mock's records against it).
import OpenAI, { toFile } from "openai";

const { BASE_URL, KEY } = process.env;
if (!BASE_URL || !KEY) {
  console.error("set BASE_URL and KEY");
  process.exit(2);
}
const client = new OpenAI({ baseURL: BASE_URL, apiKey: KEY, maxRetries: 0 });

function check(condition, message) {
  if (!condition) {
    console.error(`mismatch: ${message}`);
    process.exit(1);
  }
}

// The image format a file's first bytes show (Node has no image decoder of its own).
function formatOf(b64) {
  const bytes = Buffer.from(b64, "base64");
  if (bytes.subarray(0, 8).equals(Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]))) {
    return "png";
  }
  if (bytes[0] === 0xff && bytes[1] === 0xd8 && bytes[2] === 0xff) return "jpeg";
  if (bytes.toString("latin1", 0, 4) === "RIFF" && bytes.toString("latin1", 8, 12) === "WEBP") {
    return "webp";
  }
  return null;
}

function checkUsage(usage, where) {
  check(usage && usage.output_tokens > 0, `${where}: usage.output_tokens`);
  check(usage.input_tokens_details, `${where}: usage.input_tokens_details`);
  const details = usage.output_tokens_details;
  check(details && details.image_tokens === usage.output_tokens, `${where}: output_tokens_details`);
  check(details.text_tokens === 0, `${where}: output_tokens_details.text_tokens`);
  check(usage.total_tokens === usage.input_tokens + usage.output_tokens, `${where}: total_tokens`);
}

async function collect(stream) {
  const events = [];
  for await (const event of stream) events.push(event);
  return events;
}

// 1. A streamed generation: two webp drafts, then the completed image with its usage.
const generated = await collect(
  await client.images.generate({
    model: "gpt-image-2",
    prompt: "node: a lighthouse, streamed",
    size: "1024x1024",
    quality: "low",
    output_format: "webp",
    stream: true,
    partial_images: 2,
  }),
);
const types = generated.map((event) => event.type);
check(
  JSON.stringify(types) ===
    JSON.stringify([
      "image_generation.partial_image",
      "image_generation.partial_image",
      "image_generation.completed",
    ]),
  `generation events ${types}`,
);
generated.slice(0, 2).forEach((event, index) => {
  check(event.partial_image_index === index, `partial_image_index ${event.partial_image_index}`);
  check(formatOf(event.b64_json) === "webp", "a partial image is not a webp");
  check(event.size === "1024x1024" && event.output_format === "webp", "partial image fields");
});
const done = generated[2];
check(formatOf(done.b64_json) === "webp", "the completed image is not a webp");
check(done.quality === "low" && typeof done.created_at === "number", "completed event fields");
checkUsage(done.usage, "completed generation");

// 2. A plain generation (a PNG to edit below), and the headers every answer carries.
const { data: plain, response } = await client.images
  .generate({ model: "gpt-image-2", prompt: "node: a red door", size: "1024x1024" })
  .withResponse();
const png = plain.data[0].b64_json;
check(formatOf(png) === "png", "the plain answer is not a png");
checkUsage(plain.usage, "plain generation");
for (const name of [
  "x-request-id",
  "openai-version",
  "openai-processing-ms",
  "x-ratelimit-limit-requests",
  "x-ratelimit-remaining-requests",
  "x-ratelimit-reset-requests",
  "x-ratelimit-limit-tokens",
  "x-ratelimit-remaining-tokens",
  "x-ratelimit-reset-tokens",
]) {
  check(response.headers.get(name) !== null, `header ${name} missing`);
}
check(response.headers.get("openai-version") === "2020-10-01", "openai-version");

// 3. A streamed multipart edit of that PNG.
const input = Buffer.from(png, "base64");
const edited = await collect(
  await client.images.edit({
    model: "gpt-image-2",
    image: await toFile(input, "door.png", { type: "image/png" }),
    prompt: "node: paint the door blue",
    stream: true,
    partial_images: 1,
  }),
);
check(
  JSON.stringify(edited.map((event) => event.type)) ===
    JSON.stringify(["image_edit.partial_image", "image_edit.completed"]),
  `edit events ${edited.map((event) => event.type)}`,
);
checkUsage(edited[1].usage, "completed edit");
check(edited[1].usage.input_tokens_details.image_tokens > 0, "the edit billed no input image");

// 4. JSON edits: the image by data URL, then by the id of an uploaded file.
const byUrl = await client.post("/images/edits", {
  body: {
    model: "gpt-image-2",
    prompt: "node: a JSON edit by data URL",
    images: [{ image_url: `data:image/png;base64,${png}` }],
    output_format: "jpeg",
  },
});
check(formatOf(byUrl.data[0].b64_json) === "jpeg", "the JSON edit's answer is not a jpeg");
checkUsage(byUrl.usage, "JSON edit by data URL");
check(byUrl.usage.input_tokens_details.image_tokens > 0, "the JSON edit billed no input image");

const uploaded = await client.files.create({
  file: await toFile(input, "door.png", { type: "image/png" }),
  purpose: "vision",
});
check(uploaded.id.startsWith("file-") && uploaded.bytes === input.length, "the uploaded file");
const byFile = await client.post("/images/edits", {
  body: {
    model: "gpt-image-2",
    prompt: "node: a JSON edit by file id",
    images: [{ file_id: uploaded.id }],
  },
});
check(formatOf(byFile.data[0].b64_json) === "png", "the file-id edit's answer is not a png");

let refused = null;
try {
  await client.post("/images/edits", {
    body: { model: "gpt-image-2", prompt: "node: no such file", images: [{ file_id: "file-nope" }] },
  });
} catch (error) {
  refused = error;
}
check(refused instanceof OpenAI.NotFoundError, `an unknown file id gave ${refused}`);

console.log(JSON.stringify({ ok: true, file_id: uploaded.id, request_id: response.headers.get("x-request-id") }));
