"""Tiny random Llama models with a tokenizer trained on the spot, for tests and the offline demo.

They are saved with `save_pretrained` and loaded back through the same loader a real checkpoint takes, so the
tests exercise the real path. The tokenizer is trained deterministically from a fixed corpus, so tiny models of
different seeds share one tokenizer (as GRAPE's generators and target need to compare token counts).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>\n{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}\n"
    "{% else %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]

_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\nInput:",
    "You are a helpful assistant. Please identify the complexity score of the following user query.",
    "Please identify the quality score of the Response corresponding to the Question. #Question# #Response#",
    "##Query: ##Complexity: ##Quality: 1 2 3 4 5 6 7 8 9 0",
    "Give three tips for staying healthy. Eat a balanced diet, exercise regularly and sleep well.",
    "What is the capital of France? The capital of France is Paris.",
    "Write a short poem about the sea. The waves roll in under a silver moon.",
    "Translate the sentence into Spanish. Explain how photosynthesis works in plants.",
    "Summarize the following paragraph in one sentence. List five animals that live in the ocean.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "The quick brown fox jumps over the lazy dog. How can I improve my time management skills?",
    "Describe the process of making bread: mix flour, water, yeast and salt, knead, rise, and bake.",
    "Generate a list of ideas for a birthday party. Compare Python and JavaScript programming languages.",
]


def tiny_build_stamp() -> str:
    """A digest of this file: what a built tiny model depends on besides its seed. Part of the store folder's name,
    so a change to how tiny models are built (config, tokenizer corpus) builds new folders instead of loading the
    ones older code wrote, which every stage key (holding the code version) would otherwise trust."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def tiny_folder_name(seed: int) -> str:
    """The store folder (under store/models/) of `tiny:<seed>` built by this code."""
    return f"tiny-{seed}-{tiny_build_stamp()}"


def train_tokenizer(vocab_size: int = 600, extra_corpus: list[str] | None = None):
    """A byte-level BPE tokenizer (every byte is a token, so any text encodes) wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = _CORPUS * 4 + list(extra_corpus or [])
    tok.train_from_iterator(corpus, trainer=trainer)
    bos = tok.token_to_id("<|bos|>")
    # BOS on plain encodes, as Llama tokenizers do (Cherry's reference relies on it).
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A $B",
                                                       special_tokens=[("<|bos|>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", additional_special_tokens=["<|end|>", "<|user|>",
                                                                                   "<|assistant|>", "<|system|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(out_dir: str | os.PathLike, seed: int = 0, hidden_size: int = 64, layers: int = 2,
                     max_positions: int = 2048) -> Path:
    """Write a tiny random Llama + tokenizer to `out_dir` (about 1 MB) and return the folder."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tokenizer = train_tokenizer()
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max_positions, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, end_id], pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.eos_token_id, end_id],
        pad_token_id=tokenizer.pad_token_id)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():  # another process finished first; its folder is identical
        import shutil

        shutil.rmtree(tmp)
    else:
        os.replace(tmp, out)
    return out
