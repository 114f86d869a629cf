"""The one interface every architecture offers to the trainer, the reference cache and evaluation.

A `PreferenceModel` wraps a Hugging Face model (`hf_model`) and its tokenizer. Subclasses say how to
encode images (vision tower + projector) and how to run the decoder to final hidden states; this
module holds what is shared:

* `pair_token_logps(batch)`: per-token log-probs of the chosen and rejected rows of a `PairBatch`. Each
  pair's image is encoded once (B images for 2B rows) and its features are indexed into both rows;
  log-probs come from the final hidden states through `models.logps.chunked_token_logps`, so no
  `[2B, T, V]` logits exist. Position ids come from the attention mask (cumsum - 1), so left and right
  padding give the same log-probs. With `shared_prompt` (on by default, `model.shared_prompt`), a pair's
  prompt runs through the decoder once: `models.shared_prompt` packs [prompt | chosen | rejected] into
  one row with a mask and position ids under which the result equals the two-row computation.
* `generate(images, prompts, GenerationOptions(...))`: batched, left-padded generation through the HF model's
  `generate`.
* freezing (`ModelConfig.freeze_*`), learning-rate-0 parameters, gradient checkpointing, saving.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from ddpo.data.collator import collate_sequences, encode_sequences
from ddpo.data.records import IGNORE_INDEX, PairBatch
from ddpo.data.templates import encode_prompt, generated_prefix
from ddpo.models.config import ConfigError
from ddpo.models.logps import chunked_token_logps
from ddpo.models.lora import merged_lora_state_dict
from ddpo.models.processor import save_processor
from ddpo.models.shared_prompt import shared_prompt_layout

DDPO_MODEL_FILE = "ddpo_model.json"


def flex_attention_has_cpu_backward() -> bool:
    """Whether this torch runs FlexAttention's backward on CPU (2.13 does not: it raises deep inside the
    first decoder layer, so the model checks first and names the fix)."""
    from torch.nn.attention import flex_attention

    try:
        flex_attention._validate_device(*[torch.zeros(1, requires_grad=True)] * 3)
    except NotImplementedError:
        return False
    return True


IMAGE_MODES = ("pad", "crop", "resize")


@dataclass(frozen=True)
class ImageTransform:
    """Deterministic eval transform: RGB -> a size x size square -> scale to [0, 1] -> normalise.

    How a non-square image becomes square (`mode`; LLaVA-1.5 and llava-hf differ, and a 4:3 COCO
    image squashed to a square is distorted by a third):
      pad     LLaVA-1.5 (`image_aspect_ratio: pad`, its training and eval): centre the image on a square
              of the mean colour (`round down(255 * mean)` per channel), then bicubic resize;
      crop    llava-hf's processor and RLAIF-V's DPO training (CLIP processor): bicubic resize of the
              short side to `size` (long side `int(size * long / short)`), then a centred crop;
      resize  Muffin / RLHF-V's eval transform: bicubic resize straight to size x size.
    Square images give the same pixels in all three modes.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mode: str = "resize"

    def __post_init__(self) -> None:
        if self.mode not in IMAGE_MODES:
            raise ValueError(
                f"image preprocessing mode '{self.mode}' is not one of {', '.join(IMAGE_MODES)} (model.image_mode)"
            )

    def square(self, image: Image.Image) -> Image.Image:
        """One RGB PIL image -> the size x size RGB image the tower sees (before scaling)."""
        image = image.convert("RGB")
        width, height = image.size
        if self.mode == "pad" and width != height:
            side = max(width, height)
            canvas = Image.new("RGB", (side, side), tuple(int(255 * m) for m in self.mean))
            canvas.paste(image, ((side - width) // 2, (side - height) // 2))
            image = canvas
        elif self.mode == "crop":
            short, long = min(width, height), max(width, height)
            long_out = int(self.size * long / short)
            new_size = (self.size, long_out) if width <= height else (long_out, self.size)
            image = image.resize(new_size, Image.Resampling.BICUBIC)
            left, top = (new_size[0] - self.size) // 2, (new_size[1] - self.size) // 2
            return image.crop((left, top, left + self.size, top + self.size))
        return image.resize((self.size, self.size), Image.Resampling.BICUBIC)

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """list of B PIL images -> [B, 3, size, size] float32."""
        if len(images) == 0:
            raise ValueError("preprocess_images: got an empty list of images")
        arrays = []
        for i, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise TypeError(f"preprocess_images: image {i} is a {type(image).__name__}, expected a PIL image")
            arrays.append(np.asarray(self.square(image), dtype=np.float32))
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).div_(255.0)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (pixels - mean) / std


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[R, T] 0/1 mask -> [R, T] positions counting real tokens only (pads get 0): padding-side invariant."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def check_image_token_counts(input_ids: torch.Tensor, image_token_id: int, expected: int) -> None:
    """Raise ValueError naming the first row of input_ids [R, T] that does not hold exactly `expected` image tokens."""
    counts = (input_ids == image_token_id).sum(dim=1)
    bad = (counts != expected).nonzero()
    if len(bad):
        row = int(bad[0, 0])
        raise ValueError(
            f"row {row} has {int(counts[row])} image tokens (id {image_token_id}) but the model makes "
            f"{expected} features per image: build prompts with the model's `image_placeholder`"
        )


def scatter_image_features(
    inputs_embeds: torch.Tensor, input_ids: torch.Tensor, image_token_id: int, row_features: torch.Tensor
) -> torch.Tensor:
    """Replace the embeddings at image-token positions with image features, in order.

    inputs_embeds [R, T, D], input_ids [R, T], row_features [R, N, D] (row r's image) -> [R, T, D].
    Every row must hold exactly N image tokens.
    """
    check_image_token_counts(input_ids, image_token_id, row_features.shape[1])
    is_image = input_ids == image_token_id
    return inputs_embeds.masked_scatter(is_image.unsqueeze(-1), row_features.to(inputs_embeds.dtype))


class StopOnStrings(StoppingCriteria):
    """Stop a row once its decoded new text contains a stop string.

    transformers' own `stop_strings` needs a tokenizer whose tokens decode with a prefix intact, which
    word-level tokenizers do not; decoding the (short) answers so far works with any tokenizer.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str], prompt_length: int):
        self.tokenizer, self.stop_strings, self.prompt_length = tokenizer, list(stop_strings), prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        return torch.tensor(
            [any(stop in text for stop in self.stop_strings) for text in texts], device=input_ids.device
        )


@dataclass(frozen=True)
class GenerationOptions:
    """How `PreferenceModel.generate` decodes: the one settings object of generation, from evaluation,
    the demo and online sampling alike (vary it with `dataclasses.replace`).

    `template` None = the model's (`PreferenceModel.template`). `stop_strings` are used as given;
    `data.templates.default_stop_strings(template)` are the template's, which `ddpo eval` applies. With
    `seed`, sampling is reproducible: the batch that starts at prompt i is seeded `seed + i`, and the
    global RNG state is restored afterwards.
    """

    template: str | None = None
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_beams: int = 1
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_strings: Sequence[str] = ()
    batch_size: int = 8

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "num_beams", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"GenerationOptions.{name} is {getattr(self, name)}; it must be >= 1")
        if self.repetition_penalty <= 0:
            raise ValueError(
                f"GenerationOptions.repetition_penalty is {self.repetition_penalty}; it must be > 0 (1.0 = none)"
            )
        if self.do_sample and (self.temperature <= 0 or not 0 < self.top_p <= 1):
            raise ValueError(
                f"GenerationOptions: sampling needs temperature > 0 and top_p in (0, 1], got temperature "
                f"{self.temperature} and top_p {self.top_p}; use do_sample=False for greedy decoding"
            )
        if isinstance(self.stop_strings, str):
            raise TypeError(
                f"GenerationOptions.stop_strings is the string {self.stop_strings!r}; give a list of strings"
            )


class PreferenceModel(nn.Module):
    """Interface + shared logic; subclasses: `models.llava.LlavaPreferenceModel`, `models.muffin.MuffinPreferenceModel`.

    Subclasses implement `encode_images`, `parameter_parts`, `image_placeholder`
    and set `arch`, `hf_model`, `tokenizer`, `image_transform`, `image_token_id`, `num_image_tokens`.
    """

    arch: str = ""
    # Conversation template of this model (data/templates.py): what it was trained with when saved by
    # ddpo (`ddpo_model.json`), else its architecture's: llava_v1 for LLaVA-1.5, vicuna_v0 for Muffin.
    template: str = "vicuna_v0"
    # One packed [prompt | chosen | rejected] row per pair (exact; `model.shared_prompt`).
    shared_prompt: bool = True
    # Ablation for benchmarks only: False encodes each pair's image twice, once per row, as peers do.
    image_once_per_pair: bool = True

    def __init__(
        self,
        hf_model: nn.Module,
        tokenizer,
        image_transform: ImageTransform,
        image_token_id: int,
        num_image_tokens: int,
        logps_chunk_size: int = 256,
    ):
        super().__init__()
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.logps_chunk_size = logps_chunk_size
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token: set tokenizer.pad_token (e.g. to the unk or eos token)")

    # -- what each architecture provides ---------------------------------------------------------
    @property
    def image_placeholder(self) -> str:
        """Text standing for one image, already expanded to `num_image_tokens` image tokens."""
        raise NotImplementedError

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, N, D_llm]: vision tower + projector."""
        raise NotImplementedError

    def decoder_hidden_states(
        self, inputs_embeds: torch.Tensor, attention_mask, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """[R, T, D] embeddings -> [R, T, D] final hidden states (after the last norm). Both architectures
        keep their decoder at `hf_model.model.language_model`; `attention_mask` may be 2-D, a 4-D bias or
        (flex_attention) a `BlockMask`."""
        decoder = self.hf_model.model.language_model
        if (
            self.decoder_attention == "flex_attention"
            and inputs_embeds.device.type == "cpu"
            and torch.is_grad_enabled()
            and (inputs_embeds.requires_grad or any(p.requires_grad for p in decoder.parameters()))
            and not flex_attention_has_cpu_backward()
        ):
            raise ConfigError(
                f"model.attn_implementation 'flex_attention': PyTorch's FlexAttention has no backward pass on CPU "
                f"(torch {torch.__version__}); train on a CUDA device, or set model.attn_implementation: sdpa "
                "(the same mask as a dense bias, same results). Forward-only use on CPU (torch.no_grad: "
                "reference log-probs, eval) works."
            )
        out = decoder(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return out.last_hidden_state

    @property
    def decoder_attention(self) -> str:
        """The decoder's attention implementation: 'sdpa', 'eager' or 'flex_attention' (`model.attn_implementation`)."""
        return self.hf_model.model.language_model.config._attn_implementation

    def set_decoder_attention(self, implementation: str) -> PreferenceModel:
        """Switch the decoder (only: vision towers keep theirs) to `implementation`; returns self."""
        self.hf_model.model.language_model.set_attn_implementation(implementation)
        return self

    def parameter_parts(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by part: 'vision_tower', 'projector', 'llm' (decoder, embeddings, LM head)."""
        raise NotImplementedError

    def zero_lr_parameter_names(self) -> list[str]:
        """Names (as in `named_parameters()`) the optimizer must give learning rate 0; none by default."""
        return []

    # -- shared ------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def lm_head(self) -> nn.Linear:
        return self.hf_model.get_output_embeddings()

    def preprocess_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """list of B PIL images -> [B, C, H, W] float32 (deterministic)."""
        return self.image_transform(images)

    def _input_embeddings(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_index: torch.Tensor | None,
        image_keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings [R, T, D] with image features at the image tokens; image_index [R] maps rows to images;
        image_keep [B, N] (optional) multiplies each image's token features (0 = masked, ddpo/corruption.py)."""
        inputs_embeds = self.hf_model.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            features = self.encode_images(pixel_values.to(self.dtype))  # [B, N, D]
            if image_keep is not None:
                features = features * image_keep.to(features.dtype).unsqueeze(-1)
            if image_index is None:
                image_index = torch.arange(input_ids.shape[0], device=input_ids.device)
            # Indexing (not recomputing): autograd sums both rows' gradients into the one encoding.
            inputs_embeds = scatter_image_features(inputs_embeds, input_ids, self.image_token_id, features[image_index])
        elif (input_ids == self.image_token_id).any():
            raise ValueError("input_ids hold image tokens but pixel_values is None")
        return inputs_embeds

    def _answer_logps(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return chunked_token_logps(
            hidden, self.lm_head.weight, labels, IGNORE_INDEX, self.logps_chunk_size, lm_head_bias=self.lm_head.bias
        )

    def _sequence_hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_index: torch.Tensor | None = None,
        image_keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        inputs_embeds = self._input_embeddings(input_ids, pixel_values, image_index, image_keep)
        return self.decoder_hidden_states(inputs_embeds, attention_mask, position_ids_from_mask(attention_mask))

    def sequence_token_logps(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-token log-probs [R, T-1] (float32) of `labels[:, 1:]`, 0 where the label is -100.

        input_ids / attention_mask / labels [R, T]; pixel_values [B, C, H, W] encoded once; image_index
        [R] long maps each row to its image (default: row r -> image r).
        """
        return self._answer_logps(self._sequence_hidden(input_ids, attention_mask, pixel_values, image_index), labels)

    def shared_prompt_hidden_states(self, batch: PairBatch) -> torch.Tensor:
        """Final hidden states [2B, T, D] of a pair batch in its two-row layout, each pair's prompt (and image)
        run once. Same values and gradients as running the 2B rows (see `models.shared_prompt`)."""
        if batch.pixel_values is not None:  # check the two-row batch, so errors name its rows
            check_image_token_counts(batch.input_ids, self.image_token_id, self.num_image_tokens)
        layout = shared_prompt_layout(batch.input_ids, batch.attention_mask, batch.labels, self.tokenizer.pad_token_id)
        inputs_embeds = self._input_embeddings(
            layout.input_ids, batch.pixel_values, None, batch.image_keep
        )  # packed row i -> image i
        # flex_attention takes the structure as a block mask (skips masked blocks); sdpa / eager a dense bias.
        mask = (
            layout.block_mask()
            if self.decoder_attention == "flex_attention"
            else layout.attention_bias(inputs_embeds.dtype)
        )
        hidden = self.decoder_hidden_states(inputs_embeds, mask, layout.position_ids)
        return hidden.reshape(-1, hidden.shape[-1])[layout.source]  # [2B, T, D]: back in the two-row layout

    def shared_prompt_token_logps(self, batch: PairBatch) -> torch.Tensor:
        """Per-token log-probs [2B, T-1] of a pair batch, each pair's prompt (and image) run once."""
        return self._answer_logps(self.shared_prompt_hidden_states(batch), batch.labels)

    def pair_hidden_states(self, batch: PairBatch, shared_prompt: bool | None = None) -> torch.Tensor:
        """Final hidden states [2B, T, D] of a pair batch (chosen rows, then rejected rows). Image i serves rows
        i and B + i; `shared_prompt` (default: the model's) runs each pair as one packed row, same result."""
        pairs = batch.num_pairs
        if batch.pixel_values is not None and batch.pixel_values.shape[0] != pairs:
            raise ValueError(
                f"PairBatch has {pairs} pairs but {batch.pixel_values.shape[0]} images: expected one image per pair"
            )
        if self.shared_prompt if shared_prompt is None else shared_prompt:
            return self.shared_prompt_hidden_states(batch)
        if self.image_once_per_pair or batch.pixel_values is None:
            image_index = torch.arange(pairs, device=batch.input_ids.device).repeat(2)
            return self._sequence_hidden(
                batch.input_ids, batch.attention_mask, batch.pixel_values, image_index, batch.image_keep
            )
        # benchmark ablation: every row encodes its own copy of its pair's image
        keep = None if batch.image_keep is None else batch.image_keep.repeat(2, 1)
        return self._sequence_hidden(
            batch.input_ids, batch.attention_mask, batch.pixel_values.repeat(2, 1, 1, 1), None, keep
        )

    def pair_token_logps(
        self, batch: PairBatch, shared_prompt: bool | None = None, return_hidden: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """(chosen [B, T-1], rejected [B, T-1]) per-token log-probs, aligned with `batch.labels[:, 1:]`;
        with `return_hidden`, also the final hidden states [2B, T, D] (TDPO's KL reads the full distribution)."""
        hidden = self.pair_hidden_states(batch, shared_prompt)
        logps = self._answer_logps(hidden, batch.labels)
        pairs = batch.num_pairs
        return (logps[:pairs], logps[pairs:], hidden) if return_hidden else (logps[:pairs], logps[pairs:])

    def forward(
        self, batch: PairBatch, shared_prompt: bool | None = None, return_hidden: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """Same as `pair_token_logps` (what a DeepSpeed engine calls)."""
        return self.pair_token_logps(batch, shared_prompt, return_hidden)

    # -- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, images: Sequence[Image.Image], prompts: Sequence[str], options: GenerationOptions | None = None
    ) -> list[str]:
        """Answers to `prompts` (one image each), generated in left-padded batches of `options.batch_size`.

        Returns the generated text only: no prompt, cut before the first stop string, no eos/pad, stripped,
        and without a role prefix the template makes the model write (rlhfv_eval's 'Assistant:').
        `options` None = `GenerationOptions()` (greedy, the model's template, no stop strings).
        """
        options = options or GenerationOptions()
        template = options.template or self.template
        prefix = generated_prefix(template)
        if len(images) != len(prompts):
            raise ValueError(f"generate: {len(images)} images for {len(prompts)} prompts; give one image per prompt")
        was_training = self.training
        self.eval()
        answers: list[str] = []
        try:
            for start in range(0, len(prompts), options.batch_size):
                stop = start + options.batch_size
                ids = [encode_prompt(template, self.tokenizer, p, self.image_placeholder) for p in prompts[start:stop]]
                input_ids, attention_mask = self._left_pad(ids)
                pixel_values = self.preprocess_images(images[start:stop]).to(self.device, self.dtype)
                with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                    if options.seed is not None:
                        # seeded per batch, so a batch's samples do not depend on the batches before it
                        torch.manual_seed(options.seed + start)
                    out = self.hf_model.generate(
                        input_ids=input_ids,
                        attention_mask=attention_mask,
                        pixel_values=pixel_values,
                        **self._hf_generate_kwargs(options, input_ids.shape[1]),
                    )
                new_tokens = out[:, input_ids.shape[1] :]
                answers += [self._decode_answer(row, options.stop_strings, prefix) for row in new_tokens]
        finally:
            self.train(was_training)
        return answers

    def _hf_generate_kwargs(self, options: GenerationOptions, prompt_length: int) -> dict:
        """`options` as the keyword arguments of the HF model's `generate` for a batch of `prompt_length` tokens."""
        kwargs = dict(
            max_new_tokens=options.max_new_tokens,
            do_sample=options.do_sample,
            num_beams=options.num_beams,
            repetition_penalty=options.repetition_penalty,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        if options.do_sample:  # greedy decoding takes no temperature / top_p (transformers warns about them)
            kwargs.update(temperature=options.temperature, top_p=options.top_p)
        if options.stop_strings:
            stop = StopOnStrings(self.tokenizer, options.stop_strings, prompt_length)
            kwargs.update(stopping_criteria=StoppingCriteriaList([stop]))
        return kwargs

    def _left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        length = max(len(s) for s in sequences)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (length - len(s)) + list(s) for s in sequences], device=self.device)
        mask = torch.tensor([[0] * (length - len(s)) + [1] * len(s) for s in sequences], device=self.device)
        return ids, mask

    def _decode_answer(self, new_tokens: torch.Tensor, stop_strings: Sequence[str] | None, prefix: str = "") -> str:
        tokens = new_tokens.tolist()
        eos = self.tokenizer.eos_token_id
        if eos is not None and eos in tokens:
            tokens = tokens[: tokens.index(eos)]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for stop in stop_strings or ():
            text = text.split(stop, 1)[0]
        text = text.strip()
        return text[len(prefix) :].strip() if prefix and text.startswith(prefix) else text

    # -- training set-up -------------------------------------------------------------------------
    def apply_freezing(self, vision_tower: bool = False, projector: bool = False, llm: bool = False) -> None:
        """requires_grad False on the chosen parts (they then get no gradient and no optimizer state)."""
        for part, frozen in (("vision_tower", vision_tower), ("projector", projector), ("llm", llm)):
            for p in self.parameter_parts()[part]:
                p.requires_grad_(not frozen)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute layer activations (decoder and vision encoder) in the backward pass."""
        # Non-reentrant checkpointing: correct even when the inputs of a layer need no gradient (frozen embeddings).
        self.hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    # -- saving ----------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, template: str | None = None) -> None:
        """HF model (safetensors) + tokenizer + `ddpo_model.json` (arch, template, image transform);
        `models.build.load_model` reloads it. Also the processor and a chat template rendering `template`
        (default: the model's, `self.template`) so transformers and TRL open it too (`models.processor`)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf_model.save_pretrained(directory, state_dict=merged_lora_state_dict(self.hf_model))
        self.tokenizer.save_pretrained(directory)
        template = template or self.template
        save_processor(self, directory, template)
        info = {
            "arch": self.arch,
            "template": template,
            "image_transform": asdict(self.image_transform),
            "logps_chunk_size": self.logps_chunk_size,
            "format_version": 1,
        }
        (directory / DDPO_MODEL_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")


@torch.no_grad()
def answer_token_logps(
    model: PreferenceModel,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    answers: Sequence[str],
    template: str,
    batch_size: int = 16,
) -> list[torch.Tensor]:
    """Per-answer-token log-probs under `model`: one float32 CPU tensor [n_answer_tokens] per answer.

    Each (image, prompt, answer) is scored as a "chosen"-like sequence: the template's prompt ids, then
    the labelled answer ids (answer + end marker), exactly the tokens training puts weights on. The
    model is put in eval mode for the call (dropout off) and restored after.
    """
    if not len(images) == len(prompts) == len(answers):
        raise ValueError(
            f"answer_token_logps: {len(images)} images, {len(prompts)} prompts, {len(answers)} answers; "
            "pass one of each per answer"
        )
    encoded = encode_sequences(model.tokenizer, template, model.image_placeholder, prompts, answers)
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    try:
        for start in range(0, len(encoded), batch_size):
            ids, mask, labels = collate_sequences(encoded[start : start + batch_size], model.tokenizer.pad_token_id)
            pixels = model.preprocess_images(images[start : start + batch_size]).to(model.device, model.dtype)
            logps = model.sequence_token_logps(
                ids.to(model.device), mask.to(model.device), labels.to(model.device), pixels
            )
            keep = labels[:, 1:] != IGNORE_INDEX
            out += [row[k].float() for row, k in zip(logps.cpu(), keep)]
    finally:
        model.train(was_training)
    return out
