//! Shared by the model's test binaries: the spec's §7 example.

#![allow(dead_code)]

/// Spec §7: the rendered prompt and its ids (checked against openai-harmony 0.0.8).
pub const SPEC_PROMPT: &str = "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2024-06\nCurrent date: 2025-08-05\n\nReasoning: low\n\n# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|><|start|>developer<|message|># Instructions\n\nAnswer briefly.<|end|><|start|>user<|message|>What is 2+2?<|end|><|start|>assistant";
pub const SPEC_PROMPT_TOKENS: [u32; 84] = [
    200006, 17360, 200008, 3575, 553, 17554, 162016, 11, 261, 4410, 6439, 2359, 22203, 656, 7788,
    17527, 558, 87447, 100594, 25, 220, 1323, 19, 12, 3218, 198, 6576, 3521, 25, 220, 1323, 20, 12,
    3062, 12, 2922, 279, 30377, 289, 25, 4465, 279, 2, 13888, 18403, 25, 8450, 11, 49159, 11, 1721,
    13, 21030, 2804, 413, 7360, 395, 1753, 3176, 13, 200007, 200006, 77944, 200008, 2, 68406, 279,
    17045, 51088, 13, 200007, 200006, 1428, 200008, 4827, 382, 220, 17, 10, 17, 30, 200007, 200006,
    173781,
];
pub const SPEC_COMPLETION: &str = "<|channel|>analysis<|message|>Simple.<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>";
pub const SPEC_COMPLETION_TOKENS: [u32; 13] = [
    200005, 35644, 200008, 17958, 13, 200007, 200006, 173781, 200005, 17196, 200008, 19, 200002,
];
