"""A real Hugging Face tokenizer built locally from a word list.

Nothing can be downloaded in tests or on an offline machine, so tiny models and the synthetic world
use a word-level tokenizer built here. It is a genuine `PreTrainedTokenizerFast`: it saves and
reloads with `AutoTokenizer`, returns offsets, and carries the image special tokens that the
LLaVA (`<image>`) and Muffin (`<im_start>`, `<im_patch>`, `<im_end>`) templates need.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
}
IMAGE_TOKENS = ["<image>", "<im_start>", "<im_patch>", "<im_end>"]

# Words of the conversation templates (data/templates.py) so every template tokenizes without <unk>.
TEMPLATE_WORDS = (
    "A chat between a curious human and an artificial intelligence assistant . The assistant gives "
    "helpful , detailed , and polite answers to the human ' s questions . ### Human : Assistant : "
    "USER ASSISTANT"
)

_WORD = re.compile(r"\w+|[^\w\s]+")


def words_of(texts: Iterable[str]) -> list[str]:
    """Split texts exactly as the tokenizer's pre-tokenizer does (`Whitespace`: \\w+ | [^\\w\\s]+)."""
    return [w for text in texts for w in _WORD.findall(text)]


def build_word_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer whose vocabulary is the special tokens, the template words and every word
    of `texts`, in first-seen order (so the ids are deterministic)."""
    vocab: dict[str, int] = {}
    for token in [*SPECIAL_TOKENS.values(), *IMAGE_TOKENS, *words_of([TEMPLATE_WORDS]), *words_of(texts)]:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies punctuation
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)
    tokenizer.add_special_tokens({"additional_special_tokens": IMAGE_TOKENS})
    return tokenizer
