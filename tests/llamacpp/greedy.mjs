// Load a GGUF file in llama.cpp (node-llama-cpp's prebuilt CPU binaries) and greedy-decode.
// Usage: node greedy.mjs REQUEST.json  -> prints one JSON object on stdout.
// REQUEST: {"model": "file.gguf", "prompts": [{"text": "...", "ids": [..]}], "max_new_tokens": 16,
//           optional: "kv_cache_type": "F32", "flash_attention": false, "logits": true}
// For each prompt: llama.cpp's own tokenization of "text" (special tokens parsed, no BOS added)
// and the greedy continuation of the given "ids" (end-of-generation tokens included; it goes on past them).
import {readFileSync} from "node:fs";
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const request = JSON.parse(readFileSync(process.argv[2], "utf8"));
// build: "never" - use the prebuilt binary or fail; never download or compile llama.cpp.
const llama = await getLlama({gpu: false, build: "never", logLevel: process.env.LLAMA_LOG ?? LlamaLogLevel.error});
const model = await llama.loadModel({modelPath: request.model, gpuLayers: 0});
// Exact f32 runs: "kv_cache_type": "F32" keeps keys and values in float32, "flash_attention": false computes
// attention without flash attention; llama.cpp's defaults (F16 cache, flash attention where it picks it) move
// logits by ~1e-2 on tiny models.
const options = {contextSize: request.context_size ?? 512, threads: request.threads ?? 1};
if (request.kv_cache_type) {
    options.experimentalKvCacheKeyType = request.kv_cache_type;
    options.experimentalKvCacheValueType = request.kv_cache_type;
}
if (request.flash_attention === false) options.flashAttention = false;
const context = await model.createContext(options);
const sequence = context.getSequence();
const results = [];
for (const prompt of request.prompts) {
    const tokenized = prompt.text === undefined ? null : Array.from(model.tokenize(prompt.text, true));
    await sequence.clearHistory();
    const generated = [];
    if (prompt.ids) {
        for await (const token of sequence.evaluate(prompt.ids, {temperature: 0, yieldEogToken: true})) {
            generated.push(token);
            if (generated.length >= request.max_new_tokens) break;
        }
    }
    // "logits": true - llama.cpp's raw logits after each prompt token (the prompt's own positions, no sampling),
    // as [[token, logit], ...] per position, for comparing with transformers' logits.
    let logits = null;
    if (request.logits && prompt.ids) {
        await sequence.clearHistory();
        const out = await sequence.controlledEvaluate(prompt.ids.map((t) => [t, {generateNext: {logits: true}}]));
        logits = prompt.ids.map((_, i) => Array.from(out[i]?.next?.logits?.entries() ?? []));
    }
    results.push({tokenized, generated, ...(logits ? {logits} : {})});
}
const metadata = model.fileInfo.metadata;
console.log(JSON.stringify({
    architecture: metadata.general?.architecture,
    results,
}));
await context.dispose();
await model.dispose();
await llama.dispose();
