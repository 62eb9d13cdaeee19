"""Masked-diffusion (LLaDA SFT) training of the embedded default model.

Pieces: `tokenizer` (a small byte-level BPE with LLaDA's special tokens and chat template), `data`
(token-budget batches of synthetic tasks, seeded per step so that a resumed run sees the same data),
`objective` (the LLaDA loss), `trainer` (loop, checkpoint/resume, logs, export to a model folder) and
`quick_eval` (per-task accuracy of an exported folder). Imports no Ray or pydantic, so it runs on a
bare GPU machine with torch + tokenizers + transformers.
"""
