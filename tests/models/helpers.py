"""Helpers for the model tests: tiny models of both architectures and hand-built pair batches."""

from __future__ import annotations

import torch

from ddpo.data.records import PairBatch
from ddpo.models.config import ModelConfig

ARCHS = ["llava", "muffin", "omnilmm"]


def tiny_model(arch: str, tokenizer, seed: int = 0, **overrides):
    from ddpo.models.build import build_model

    torch.manual_seed(seed)
    return build_model(ModelConfig(arch=arch, preset="tiny", **overrides), tokenizer=tokenizer)


def pair_batch(
    model, tokenizer, prompt_lengths: list[int], answer_lengths: list[int], padding_side: str = "right", seed: int = 0
) -> PairBatch:
    """B pairs; row i (chosen) and B + i (rejected) share a prompt: BOS, random words, the image
    placeholder, random words; then a random answer. Labels hold the answer only."""
    B = len(prompt_lengths)
    assert len(answer_lengths) == 2 * B
    g = torch.Generator().manual_seed(seed)
    special = set(tokenizer.all_special_ids)
    vocabulary = torch.tensor(sorted(i for i in tokenizer.get_vocab().values() if i not in special))
    placeholder = tokenizer(model.image_placeholder, add_special_tokens=False)["input_ids"]

    def words(n: int) -> list[int]:  # ordinary words only (no special or image tokens)
        return vocabulary[torch.randint(len(vocabulary), (n,), generator=g)].tolist()

    prompts = [[tokenizer.bos_token_id, *words(2), *placeholder, *words(n)] for n in prompt_lengths]
    rows = [(prompts[r % B], words(answer_lengths[r])) for r in range(2 * B)]
    T = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.full((2 * B, T), tokenizer.pad_token_id)
    attention_mask = torch.zeros(2 * B, T, dtype=torch.long)
    labels = torch.full((2 * B, T), -100)
    for r, (prompt, answer) in enumerate(rows):
        length = len(prompt) + len(answer)
        start = 0 if padding_side == "right" else T - length
        input_ids[r, start : start + length] = torch.tensor(prompt + answer)
        attention_mask[r, start : start + length] = 1
        labels[r, start + len(prompt) : start + length] = torch.tensor(answer)
    size = model.image_transform.size
    pixel_values = torch.randn(B, 3, size, size, generator=g)
    return PairBatch(
        pixel_values=pixel_values,
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        corrected=torch.zeros(2 * B, T - 1, dtype=torch.bool),
        row_indices=list(range(B)),
    )


def naive_token_logps(model, batch: PairBatch) -> torch.Tensor:
    """Reference: the HF model's own full forward on 2B rows with each image duplicated, full logits,
    log_softmax, gather; 0 outside the answer. [2B, T-1]."""
    pixel_values = batch.pixel_values.repeat(2, 1, 1, 1)
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model.hf_model(
        input_ids=batch.input_ids,
        pixel_values=pixel_values,
        attention_mask=batch.attention_mask,
        position_ids=position_ids,
        use_cache=False,
    ).logits
    targets = batch.labels[:, 1:]
    logps = logits[:, :-1].float().log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logps * (targets != -100)
