"""Exported checkpoints open in the ecosystem: transformers' Auto classes and TRL's DPOTrainer.

The round trip a user makes: `ddpo convert` RLAIF-V data -> `ddpo train` on it -> `OUTPUT_DIR/final` ->
`AutoProcessor` + `AutoModelForImageTextToText` (same ids, pixels and generations as ddpo) -> TRL's
DPOTrainer trains on that checkpoint with the converted data.
"""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_trainer import TINY, run_ddpo

from ddpo.data.templates import TEXT_TEMPLATES, answer_text, prompt_text
from ddpo.data.tokenizer import build_word_tokenizer
from ddpo.models.base import GenerationOptions, ImageTransform
from ddpo.models.processor import chat_template, image_processor

PAIRS = [  # (question, chosen, rejected) in RLAIF-V's columns
    (
        "Describe the image in detail .",
        "there is a red circle at the top left .",
        "there is a blue circle at the top left .",
    ),
    ("What is in the picture ?", "a green square in the center .", "a green triangle in the center ."),
    (
        "How many objects are there ?",
        "there are two objects : a red square and a blue circle .",
        "there are three objects : a red square and a blue circle .",
    ),
    (
        "Describe the image in detail .",
        "a small yellow cat is at the bottom right .",
        "a large yellow dog is at the bottom right .",
    ),
    ("What is in the picture ?", "one blue frisbee on the left .", "two blue frisbees on the left ."),
]
QUESTION = PAIRS[0][0]


def write_rlaifv(folder: Path) -> Path:
    """A small RLAIF-V-Dataset parquet (the public columns the converter reads), PNG bytes inside."""
    import datasets

    def png(i: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (8, 6), ((60 * i) % 256, 255 - 40 * i, 128)).save(buffer, format="PNG")
        return buffer.getvalue()

    rows = [
        {"image": {"bytes": png(i), "path": None}, "question": q, "chosen": c, "rejected": r, "idx": str(i)}
        for i, (q, c, r) in enumerate(PAIRS)
    ]
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "chosen": datasets.Value("string"),
            "rejected": datasets.Value("string"),
            "idx": datasets.Value("string"),
        }
    )
    folder.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(folder / "RLAIF-V-Dataset_000.parquet"))
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Converted RLAIF-V fixture data and the `final/` of a 2-step tiny run on it."""
    root = tmp_path_factory.mktemp("export")
    run_ddpo(
        "convert",
        "--format",
        "rlaif-v",
        "--input",
        str(write_rlaifv(root / "src")),
        "--output",
        str(root / "trl"),
        "--test-size",
        "1",
    )
    out = root / "run"
    run_ddpo(
        "train",
        TINY,
        "--train.output_dir",
        str(out),
        "--train.num_threads",
        "1",
        "--logging.progress_bar",
        "false",
        "--data.format",
        "trl",
        "--data.path",
        str(root / "trl"),
        "--train.max_steps",
        "2",
        "--train.micro_batch_size",
        "2",
    )
    return root / "trl", out / "final"


def _image() -> Image.Image:
    return Image.fromarray((np.arange(37 * 53 * 3) % 251).astype(np.uint8).reshape(37, 53, 3))  # not square


@pytest.mark.slow
def test_final_holds_a_processor_and_a_chat_template(exported):
    _, final = exported
    assert {"processor_config.json", "chat_template.jinja", "tokenizer_config.json", "model.safetensors"} <= {
        p.name for p in final.iterdir()
    }
    assert json.loads((final / "processor_config.json").read_text())["processor_class"] == "LlavaProcessor"


def test_auto_classes_load_the_export_and_generate_as_ddpo(exported):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ddpo.data.templates import encode_prompt
    from ddpo.models.build import load_model

    _, final = exported
    ours = load_model(final)
    processor = AutoProcessor.from_pretrained(final)
    hf = AutoModelForImageTextToText.from_pretrained(final)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[_image()], text=[text], return_tensors="pt", add_special_tokens=False)
    assert inputs["input_ids"][0].tolist() == encode_prompt(
        "vicuna_v0", ours.tokenizer, QUESTION, ours.image_placeholder
    )
    torch.testing.assert_close(inputs["pixel_values"], ours.preprocess_images([_image()]), atol=1e-6, rtol=0)
    generated = hf.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    answer = ours.generate([_image()], [QUESTION], GenerationOptions(template="vicuna_v0", max_new_tokens=12))[0]
    assert processor.tokenizer.decode(generated, skip_special_tokens=True).strip() == answer


@pytest.mark.slow
def test_fine_tuning_an_export_keeps_its_processor(exported, tmp_path):
    trl_data, final = exported
    out = tmp_path / "again"
    run_ddpo(
        "train",
        TINY,
        "--train.output_dir",
        str(out),
        "--train.num_threads",
        "1",
        "--logging.progress_bar",
        "false",
        "--data.format",
        "trl",
        "--data.path",
        str(trl_data),
        "--train.max_steps",
        "1",
        "--train.micro_batch_size",
        "2",
        "--model.name_or_path",
        str(final),
    )
    for name in ("processor_config.json", "chat_template.jinja"):
        assert (out / "final" / name).read_text() == (final / name).read_text(), name


@pytest.mark.parametrize("template", [name for name, spec in TEXT_TEMPLATES.items() if spec.answer is not None])
def test_chat_template_renders_trl_conversations_as_the_training_template(template):
    tokenizer = build_word_tokenizer([text for pair in PAIRS for text in pair])
    tokenizer.chat_template = chat_template(template)
    question, answer = PAIRS[1][0], PAIRS[1][1]
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    chosen = [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    rendered_prompt = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    rendered_full = tokenizer.apply_chat_template(prompt + chosen, tokenize=False)
    assert rendered_prompt == tokenizer.bos_token + prompt_text(template, tokenizer, question, "<image>")
    eos = tokenizer.eos_token if TEXT_TEMPLATES[template].append_eos else ""
    assert rendered_full == rendered_prompt + answer_text(template, tokenizer, answer)[0] + eos
    with pytest.raises(Exception, match="one user turn"):
        tokenizer.apply_chat_template(prompt + chosen + prompt, tokenize=False)


@pytest.mark.parametrize("mode", ["resize", "crop", "pad"])
def test_image_processor_computes_the_training_transform(mode):
    transform = ImageTransform(32, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), mode)
    images = [_image(), _image().transpose(Image.Transpose.ROTATE_90), Image.new("RGB", (40, 40), (10, 200, 30))]
    hf = image_processor(transform)(images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(hf, transform(images), atol=1e-6, rtol=0)


def _our_mean_logps(final: Path, trl_data: Path, rows: int) -> tuple[float, float]:
    """Mean summed log-prob of the chosen and rejected answers of the first `rows` converted pairs, by ddpo."""
    from ddpo.config import DataConfig
    from ddpo.data.collator import EncodingSettings, PairCollator, PairDataset, PairEncoder
    from ddpo.data.formats import load_records
    from ddpo.models.build import load_model

    model = load_model(final).eval()
    records = load_records(DataConfig(format="trl", path=str(trl_data), split="train"))[:rows]
    encoder = PairEncoder(model.tokenizer, model.image_placeholder, EncodingSettings("vicuna_v0", max_length=256))
    batch = PairCollator(model.tokenizer.pad_token_id, image_transform=model.preprocess_images)(
        list(PairDataset(records, encoder))
    )
    with torch.no_grad():
        chosen, rejected = model.pair_token_logps(batch)
    return float(chosen.sum(-1).mean()), float(rejected.sum(-1).mean())


@pytest.mark.slow
def test_trl_dpo_trains_on_the_export_and_the_converted_data(exported, tmp_path):
    """TRL's DPOTrainer starts from our export and our converted data, computes the answers' log-probs as
    ddpo does (same tokens, pixels and model), and its loss goes down on a repeated batch."""
    trl = pytest.importorskip("trl")
    import datasets
    from transformers import AutoModelForImageTextToText, AutoProcessor

    trl_data, final = exported
    pairs = datasets.load_from_disk(str(trl_data))["train"].select(range(2))  # one batch, seen at every step
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        max_length=None,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = trl.DPOTrainer(
        model=AutoModelForImageTextToText.from_pretrained(final),
        args=args,
        train_dataset=pairs,
        processing_class=AutoProcessor.from_pretrained(final),
    )
    trainer.train()
    logs = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logs) == 3
    assert logs[0]["loss"] == pytest.approx(np.log(2), abs=1e-4)  # policy == reference at the first step
    ours = _our_mean_logps(final, trl_data, 2)
    assert (logs[0]["logps/chosen"], logs[0]["logps/rejected"]) == pytest.approx(ours, rel=1e-4)
    assert logs[-1]["loss"] < logs[0]["loss"]
