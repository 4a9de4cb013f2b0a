// Load a GGUF file in llama.cpp (node-llama-cpp's prebuilt CPU binaries) and greedy-decode.
// Usage: node greedy.mjs REQUEST.json  -> prints one JSON object on stdout.
// REQUEST: {"model": "file.gguf", "prompts": [{"text": "...", "ids": [..]}], "max_new_tokens": 16}
// For each prompt: llama.cpp's own tokenization of "text" (special tokens parsed, no BOS added)
// and the greedy continuation of the given "ids" (end-of-generation tokens included; it goes on past them).
import {readFileSync} from "node:fs";
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const request = JSON.parse(readFileSync(process.argv[2], "utf8"));
// build: "never" - use the prebuilt binary or fail; never download or compile llama.cpp.
const llama = await getLlama({gpu: false, build: "never", logLevel: process.env.LLAMA_LOG ?? LlamaLogLevel.error});
const model = await llama.loadModel({modelPath: request.model, gpuLayers: 0});
const context = await model.createContext({contextSize: request.context_size ?? 512, threads: request.threads ?? 1});
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
    results.push({tokenized, generated});
}
const metadata = model.fileInfo.metadata;
console.log(JSON.stringify({
    architecture: metadata.general?.architecture,
    results,
}));
await context.dispose();
await model.dispose();
await llama.dispose();
