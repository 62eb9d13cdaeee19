"""A small byte-level BPE tokenizer for the embedded model, saved so that AutoTokenizer loads it.

Why byte-level BPE: any text encodes (no unknown tokens), while merges learned on the task corpus make
words and template phrases one or two tokens, which keeps the vocabulary (and the shipped embedding
matrices) small. Digits are always split one per token: arithmetic is done digit by digit, and a
merge like "12" would give the same number several tokenisations.
Special tokens follow LLaDA's names: EOS = pad `<|endoftext|>`, mask `<|mdm_mask|>`, BOS
`<|startoftext|>`, chat headers and the end-of-turn token `<|eot_id|>`.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from ..models.tiny import LLADA_CHAT_TEMPLATE
from ..tasks import TASKS, sample

SPECIALS = ("<|endoftext|>", "<|startoftext|>", "<|mdm_mask|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>")
EOS, BOS, MASK, EOT = "<|endoftext|>", "<|startoftext|>", "<|mdm_mask|>", "<|eot_id|>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def corpus(n_per_task: int, seed: int) -> list[str]:
    """Prompts and answers of every task, plus the chat roles, as BPE training text."""
    rng = random.Random(f"tokenizer:{seed}")
    texts = ["user assistant system"] * 100
    for name in TASKS:
        for _ in range(n_per_task):
            ex = sample(name, rng)
            texts += [ex.prompt, ex.answer]
    return texts


def build_tokenizer(vocab_size: int = 512, n_per_task: int = 2000, seed: int = 0):
    """Train the BPE (deterministic for a given corpus) and return a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(n_per_task, seed), trainer=trainer)
    return tok


def save_tokenizer(tok, path: str | Path, model_max_length: int = 1024) -> None:
    """tokenizer.json + tokenizer_config.json (with LLaDA's chat template) + special_tokens_map.json."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "mask_token": MASK}
    tc = dict(special, tokenizer_class="PreTrainedTokenizerFast", model_max_length=model_max_length,
              clean_up_tokenization_spaces=False, chat_template=LLADA_CHAT_TEMPLATE,
              additional_special_tokens=[s for s in SPECIALS if s not in special.values()])
    (path / "tokenizer_config.json").write_text(json.dumps(tc, indent=1) + "\n")
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=1) + "\n")


def special_ids(tok) -> dict[str, int]:
    """Ids of the special tokens by role (for config.json and the trainer)."""
    return {"eos": tok.token_to_id(EOS), "bos": tok.token_to_id(BOS), "mask": tok.token_to_id(MASK),
            "eot": tok.token_to_id(EOT)}


def chat_text(prompt: str) -> str:
    """LLaDA's template for one user turn plus the assistant header, as `apply_chat_template` renders it."""
    return (f"{BOS}<|start_header_id|>user<|end_header_id|>\n\n{prompt.strip()}{EOT}"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Build the tiny model's tokenizer into a folder.")
    ap.add_argument("out")
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    tok = build_tokenizer(a.vocab_size, seed=a.seed)
    save_tokenizer(tok, a.out)
    print(f"wrote {a.out}: vocab {tok.get_vocab_size()}, specials {special_ids(tok)}")


if __name__ == "__main__":
    main()
