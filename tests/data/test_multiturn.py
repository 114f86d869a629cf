"""Multi-turn TRL prompts: every turn is loaded, encoded through the template and kept out of the labels;
what a format or template cannot carry is a named error with the row, never a silent cut."""

import json

import pytest
from fixtures import PAIRS, all_texts, trl_conversation_rows, trl_rows, write_jsonl, write_trl_parquet

from ddpo.config import DataConfig
from ddpo.data.collator import EncodingSettings, PairCollator, PairDataset, PairEncoder
from ddpo.data.formats import DataError, load_records
from ddpo.data.records import IGNORE_INDEX
from ddpo.data.templates import SYSTEM_PROMPT
from ddpo.data.tokenizer import build_word_tokenizer

PLACEHOLDER = "<image>" * 4
CHAT_TEMPLATE = (  # a multimodal chat template with a system role, earlier turns closed by EOS
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}SYSTEM : {{ m['content'][0]['text'] }}{{ '\n' }}"
    "{% elif m['role'] == 'user' %}USER : {% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>\n{% else %}{{ p['text'] }}{% endif %}{% endfor %}{{ '\n' }}"
    "{% else %}ASSISTANT : {{ m['content'][0]['text'] }}{{ eos_token }}{{ '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_word_tokenizer([*all_texts(), "SYSTEM USER ASSISTANT be brief"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def load(tmp_path, rows, **kw):
    return load_records(DataConfig(format="trl", path=str(write_trl_parquet(tmp_path / "t.parquet", rows)), **kw))


def by_hand(template: str, tokenizer, row: dict) -> str:
    """The prompt text of a TRL row as the template's original code writes the conversation."""
    if template == "chat_template":
        text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        return text.replace("<image>", PLACEHOLDER)
    turns = [(m["role"], "".join(p["text"] for p in m["content"] if p["type"] == "text")) for m in row["prompt"]]
    images = [any(p["type"] == "image" for p in m["content"]) for m in row["prompt"]]
    sep, user, assistant_end = {
        "vicuna_v0": ("\n\n", ("### Human: ", "\n### Assistant:"), "\n"),
        "llava_v1": (" ", ("USER: ", " ASSISTANT:"), tokenizer.eos_token),
    }[template]
    text = SYSTEM_PROMPT + sep
    for (role, content), image in zip(turns, images):
        if role == "user":
            text += user[0] + (PLACEHOLDER + "\n" if image else "") + content + user[1]
        else:
            text += " " + content + assistant_end
    return text


# --- loading: every turn kept ----------------------------------------------------------------------------


@pytest.mark.parametrize("turns", [1, 2, 3])
def test_trl_rows_keep_every_turn(tmp_path, turns):
    records = load(tmp_path, trl_conversation_rows(turns))
    assert [r.prompt for r in records] == [q for q, _, _ in PAIRS]
    if turns == 1:
        assert all(r.history is None for r in records)
        return
    history = records[0].history
    assert len(history) == 2 * (turns - 1)
    assert history[0] == {"role": "user", "content": PAIRS[1][0], "image": True}  # the image stays in turn 1
    assert history[1] == {"role": "assistant", "content": PAIRS[1][1]}
    assert [t["role"] for t in history] == ["user", "assistant"] * (turns - 1)
    assert records[0].texts()[: len(history)] == [t["content"] for t in history]


def test_a_system_message_is_kept(tmp_path):
    (record, *_) = load(tmp_path, trl_conversation_rows(1, system="be brief ."))
    assert record.history == [{"role": "system", "content": "be brief ."}]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p.append({"role": "assistant", "content": [{"type": "text", "text": "a"}]}), "the last message is"),
        (
            lambda p: p.insert(2, dict(p[2])),
            r"message 3 \('user'\) follows another 'user' message; turns must alternate",
        ),
        (lambda p: p.insert(0, dict(p[1])), r"message 0 \('assistant'\) comes before any user message"),
        (lambda p: p[1].update(role="tool"), "message 1 has role 'tool'"),
        (lambda p: p[1]["content"].insert(0, {"type": "image", "text": None}), "its 5 messages have 2 image parts"),
        (lambda p: p[2].update(content=[{"type": "text", "text": " <image> "}]), r"message 2 \('user'\) has no text"),
    ],
)
def test_conversations_that_cannot_be_carried_are_named_errors(tmp_path, edit, message):
    rows = trl_conversation_rows(3)
    edit(rows[4]["prompt"])
    with pytest.raises(DataError, match=f"row 4 of .*t.parquet, field 'prompt': .*{message}"):
        load(tmp_path, rows)


def test_an_answer_must_be_one_assistant_message(tmp_path):
    rows = trl_rows()
    rows[2]["chosen"] = rows[2]["chosen"] * 2
    with pytest.raises(DataError, match="row 2 of .*field 'chosen': 2 messages; it must be the one assistant message"):
        load(tmp_path, rows)


def test_jsonl_names_the_format_that_carries_conversations(tmp_path):
    rows = [{"image": f"images/{i}.png", "prompt": q, "chosen": c, "rejected": r} for i, (q, c, r) in enumerate(PAIRS)]
    rows[1]["prompt"] = trl_conversation_rows(2)[1]["prompt"]
    path = write_jsonl(tmp_path / "j", rows)
    with pytest.raises(DataError, match=r"row 1 \(line 2\).*field 'prompt': a list .*data.format trl"):
        load_records(DataConfig(format="jsonl", path=str(path)))
    assert json.loads(path.read_text().splitlines()[1])["prompt"][0]["role"] == "user"


# --- encoding: all turns in the prompt ids, only the final answer labelled ----------------------------------


@pytest.mark.parametrize("turns", [1, 2, 3])
@pytest.mark.parametrize("template", ["vicuna_v0", "llava_v1", "chat_template"])
def test_prompt_ids_hold_every_turn_and_labels_only_the_final_answer(tmp_path, tokenizer, template, turns):
    rows = trl_conversation_rows(turns)
    records = load(tmp_path, rows)
    encoder = PairEncoder(tokenizer, PLACEHOLDER, EncodingSettings(template, max_length=512))
    pairs = list(PairDataset(records, encoder))
    for row, pair in zip(rows, pairs):
        text = by_hand(template, tokenizer, row)
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        expected = expected if template == "chat_template" else [tokenizer.bos_token_id, *expected]
        assert pair.prompt_ids == expected
        assert tokenizer.unk_token_id not in pair.prompt_ids
    batch = PairCollator(tokenizer.pad_token_id)(pairs)
    for r, pair in enumerate(pairs):
        labelled = batch.labels[r][batch.labels[r] != IGNORE_INDEX].tolist()
        assert labelled == pair.chosen_ids  # the final chosen answer, nothing of the earlier turns
        assert (batch.labels[r, : len(pair.prompt_ids)] == IGNORE_INDEX).all()
    if turns > 1:  # an earlier answer is in the input ids, unlabelled
        earlier = tokenizer(" " + PAIRS[1][1], add_special_tokens=False)["input_ids"]
        ids = batch.input_ids[0, : len(pairs[0].prompt_ids)].tolist()
        assert any(ids[k : k + len(earlier)] == earlier for k in range(len(ids)))


def test_muffin_label_span_labels_the_final_role_prefix_only(tmp_path, tokenizer):
    records = load(tmp_path, trl_conversation_rows(3))
    encoder = PairEncoder(tokenizer, PLACEHOLDER, EncodingSettings("vicuna_v0", max_length=512, label_span="muffin"))
    pair = encoder.encode(records[0])
    assert tokenizer.convert_ids_to_tokens(pair.chosen_ids[:3]) == ["###", "Assistant", ":"]
    assert tokenizer.convert_ids_to_tokens(pair.prompt_ids).count("Assistant") == 2  # the earlier turns' prefixes


def test_a_conversation_the_template_refuses_names_the_row(tmp_path, tokenizer):
    records = load(tmp_path, trl_conversation_rows(2))
    records[3].history[1]["content"] = "a red </s> circle ."  # EOS text inside an earlier llava_v1 answer
    encoder = PairEncoder(tokenizer, PLACEHOLDER, EncodingSettings("llava_v1", max_length=512))
    with pytest.raises(DataError, match="row 3 of .*t.parquet, field 'prompt': the prompt tokenizes to 2 EOS tokens"):
        PairDataset(records, encoder)
    assert len(PairDataset(records, encoder, skip_bad_rows=True)) == len(PAIRS) - 1
