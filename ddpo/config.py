"""Typed experiment configuration: typed dataclasses, one per section, are the single source of truth.
A section lives with the package that reads it where there is one (`model:` in ddpo/models/config.py,
`loss:` in ddpo/loss.py); this module holds the others and composes them all into `Config`.

A YAML file in `configs/` fills them section by section; any field can then be overridden on the
command line as `--<section>.<field> VALUE` (`--loss.gamma 5`). Every field carries a one-line doc
(`metadata["help"]`) that `ddpo train --help` prints. Unknown keys, wrong types and invalid
combinations fail at start-up with a message that names the key and what is allowed. A relative input
path in a YAML (INPUT_PATHS: data, model, DeepSpeed and resume paths) is looked up next to the YAML first,
then in the working directory: a config whose paths are relative to its own folder runs from anywhere.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ddpo.loss import LossConfig
from ddpo.models.config import ConfigError, ModelConfig, config_field


@dataclass
class DataConfig:
    format: Literal["rlhf-v", "rlaif-v", "trl", "jsonl", "synthetic"] = config_field(
        "rlhf-v",
        "Dataset schema: RLHF-V-Dataset, RLAIF-V-Dataset, TRL conversational preference, JSONL + image folder, or the "
        "synthetic world.",
    )
    path: str | None = config_field(None, "Local file/directory or hub id of the dataset (unused for 'synthetic').")
    split: str = config_field("train", "Split to train on.")
    image_dir: str | None = config_field(
        None,
        "Folder that relative image paths in the data are looked up in (every format: JSONL `image`, TRL `images`, "
        "RLHF-V/RLAIF-V `image` paths); null = the folder of data.path.",
    )
    template: Literal["vicuna_v0", "llava_v1", "omnilmm", "chat_template"] = config_field(
        "vicuna_v0",
        "Conversation template: Vicuna v0 (### Human/### Assistant, Muffin), LLaVA v1 (USER/ASSISTANT), OmniLMM "
        "(Zephyr's <|user|>/<|assistant|>, OmniLMM-12B / RLAIF-V-12B), or the tokenizer's own chat template.",
    )
    max_length: int = config_field(
        2048,
        "Longest prompt + image tokens + answer; longer answers are cut from their end (counted), a prompt that cannot "
        "fit is an error or a counted skip.",
    )
    max_samples: int | None = config_field(None, "Use only the first N rows (after filtering); null = all.")
    padding_side: Literal["right", "left"] = config_field("right", "Side that batches are padded on.")
    skip_bad_rows: bool = config_field(
        False, "Skip malformed rows with a counted, logged summary instead of stopping at the first one."
    )
    long_answers: Literal["truncate", "error"] = config_field(
        "truncate",
        "An answer longer than the room max_length leaves after its prompt: 'truncate' cuts it from its end (the pairs "
        "cut are counted in one log line at start), 'error' stops naming the row and its lengths (with skip_bad_rows: "
        "a counted skip).",
    )
    segments: Literal["token_diff", "word_diff", "spans", "none"] = config_field(
        "token_diff",
        "How corrected segments are found: RLHF-V token-id diff, a word-level diff mapped to tokens, explicit "
        "character spans in the data, or none (vanilla DPO weights).",
    )
    min_match: int = config_field(
        3, "Diff matching blocks shorter than this many tokens are absorbed into the surrounding edit (RLHF-V: 3)."
    )
    include_insertions: bool = config_field(
        False, "Also weigh gaps present on one side only (pure insertions/deletions); RLHF-V weighs replacements only."
    )
    segment_diff: Literal["answer", "muffin"] = config_field(
        "answer",
        "token_diff input: 'answer' = the two answers, plain longest-match diff; 'muffin' = exact replication of the "
        "released code: prompt (minus BOS) + answer, difflib autojunk on (changes which tokens get gamma on long "
        "sequences).",
    )
    label_span: Literal["answer", "muffin"] = config_field(
        "answer",
        "Labelled tokens: 'answer' = the answer and its end marker; 'muffin' = also the '### Assistant:' role prefix, "
        "as the released Muffin code (vicuna_v0 only).",
    )
    synthetic_pairs: int = config_field(64, "Number of preference pairs generated when format is 'synthetic'.")
    length_grouping: bool = config_field(
        False, "Group pairs of similar length into batches to cut padding (changes the data order, seeded)."
    )
    eval_fraction: float = config_field(
        0.0,
        "Share in [0, 1) of the loaded pairs held out of training and evaluated (train.eval_steps): the first "
        "round(share x pairs) (at least 1) of a permutation drawn from train.seed, so the same seed holds out the "
        "same pairs; 0 = none. Excludes data.eval_path.",
    )
    eval_path: str | None = config_field(
        None,
        "A separate evaluation file in data.format (read like data.path, all its rows; relative images: data.image_dir "
        "or its own folder); null = none. Excludes data.eval_fraction.",
    )


@dataclass
class TrainConfig:
    output_dir: str = config_field(
        "runs/ddpo", "Directory for checkpoints, metrics.jsonl, the resolved config and the final model."
    )
    seed: int = config_field(42, "Seed of every random generator (data order, dropout, init).")
    epochs: float = config_field(1.0, "Passes over the data when max_steps is not set.")
    max_steps: int = config_field(-1, "Optimizer steps to run; -1 = derived from epochs.")
    micro_batch_size: int = config_field(1, "Preference pairs per process per forward/backward.")
    gradient_accumulation_steps: int = config_field(1, "Micro-batches accumulated per optimizer step.")
    learning_rate: float = config_field(5e-7, "Peak learning rate of AdamW.")
    weight_decay: float = config_field(0.0, "AdamW weight decay (not applied to biases and norms).")
    adam_beta1: float = config_field(0.9, "AdamW beta1.")
    adam_beta2: float = config_field(0.999, "AdamW beta2.")
    adam_eps: float = config_field(1e-8, "AdamW epsilon.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = config_field("cosine", "Decay after the warm-up.")
    warmup_ratio: float = config_field(
        0.1, "Fraction of the steps spent warming the learning rate up from 0 (paper 10%)."
    )
    max_grad_norm: float = config_field(1.0, "Gradient clipping norm; 0 = off.")
    save_steps: int = config_field(0, "Write a resumable checkpoint every N optimizer steps; 0 = only at the end.")
    save_total_limit: int = config_field(2, "Keep this many most recent step checkpoints; 0 = keep all.")
    logging_steps: int = config_field(1, "Write metrics every N optimizer steps.")
    eval_steps: int = config_field(
        0,
        "Evaluate the held-out pairs (data.eval_fraction or data.eval_path) every N optimizer steps, as eval/ rows "
        "of metrics.jsonl; 0 = only once, at the end. An eval set is always evaluated at the end.",
    )
    resume: str = config_field(
        "none", "'none', 'auto' (latest checkpoint in output_dir, if any) or a checkpoint directory."
    )
    overwrite_output_dir: bool = config_field(
        False,
        "When output_dir holds a run of another config: move that run aside to <output_dir>.replaced-<time> (nothing "
        "is deleted) and start over; false = refuse to start (ddpo/run_identity.py).",
    )
    reference: Literal["cached", "live"] = config_field(
        "cached",
        "Reference log-probs: 'cached' = precomputed per-token cache, no reference model held; 'live' = a frozen "
        "reference model.",
    )
    reference_cache: str | None = config_field(
        None, "Directory of the reference log-prob cache; null = <output_dir>/reference_cache."
    )
    num_threads: int = config_field(0, "CPU threads per process (torch.set_num_threads); 0 = leave torch's default.")


@dataclass
class DeepSpeedConfig:
    config: str | None = config_field(
        None, "DeepSpeed JSON file (configs/deepspeed/*.json); null = built from the fields below."
    )
    zero_stage: int | None = config_field(None, "ZeRO stage 0, 1, 2 or 3; null = the JSON's stage (0 without a JSON).")
    bf16: Literal["auto", "true", "false"] = config_field(
        "auto", "bfloat16 training: auto = on where the accelerator supports it, off on CPU."
    )
    offload_optimizer: bool = config_field(False, "Keep optimizer states on the CPU (ZeRO-2/3).")


@dataclass
class LoggingConfig:
    wandb: Literal["disabled", "offline", "online"] = config_field(
        "disabled", "Weights & Biases mode; 'online' needs WANDB_API_KEY in the environment."
    )
    project: str = config_field("ddpo", "wandb project.")
    entity: str | None = config_field(None, "wandb entity (team); null = your default.")
    run_name: str | None = config_field(None, "Run name; null = the output directory's name.")
    progress_bar: bool = config_field(True, "Show a tqdm progress bar on rank 0.")
    tensorboard: bool = config_field(
        False, "Also write TensorBoard event files to <output_dir>/tensorboard (train/ and eval/ scalars, rank 0)."
    )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def validate(self) -> Config:
        """Every check, section by section, then across sections; each message names the key(s) and the fix."""
        try:  # the loss section's checks live with the loss (one home)
            self.loss.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        checks = [
            *_train_checks(self.train),
            *_deepspeed_checks(self.deepspeed),
            *_data_checks(self.data),
            *_model_checks(self.model),
            *_method_checks(self.loss, self.train, self.deepspeed),
            *_eval_checks(self.data, self.train),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self


Checks = list[tuple[bool, str]]  # (condition that must hold, message naming the key and the fix)


def _train_checks(t: TrainConfig) -> Checks:
    return [
        (t.micro_batch_size >= 1, "train.micro_batch_size must be >= 1"),
        (t.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps must be >= 1"),
        (t.max_steps > 0 or t.epochs > 0, "set train.max_steps > 0 or train.epochs > 0"),
        (t.learning_rate >= 0, "train.learning_rate must be >= 0"),
        (0 <= t.warmup_ratio < 1, "train.warmup_ratio must be in [0, 1)"),
        (t.max_grad_norm >= 0, "train.max_grad_norm must be >= 0 (0 = no clipping)"),
        (t.save_steps >= 0 and t.logging_steps >= 1, "train.save_steps must be >= 0 and train.logging_steps >= 1"),
        (
            t.resume in ("none", "auto") or Path(t.resume).is_dir(),
            f"train.resume must be 'none', 'auto' or an existing checkpoint directory, got '{t.resume}'",
        ),
    ]


def _deepspeed_checks(ds: DeepSpeedConfig) -> Checks:
    return [
        (ds.zero_stage in (None, 0, 1, 2, 3), f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {ds.zero_stage}"),
        (
            ds.config is None or Path(ds.config).is_file(),
            f"deepspeed.config: file not found: {ds.config} (see configs/deepspeed/)",
        ),
    ]


def _data_checks(d: DataConfig) -> Checks:
    return [
        (d.max_length >= 16, "data.max_length must be >= 16"),
        (d.min_match >= 1, "data.min_match must be >= 1"),
        (
            d.format == "synthetic" or d.path,
            f"data.path is required for data.format '{d.format}' (a local path or hub id)",
        ),
        (
            d.label_span == "answer" or d.template == "vicuna_v0",
            "data.label_span 'muffin' labels vicuna_v0's '### Assistant:' role prefix (Muffin's layout); "
            f"data.template is '{d.template}'",
        ),
        (
            d.segment_diff == "answer" or d.segments == "token_diff",
            "data.segment_diff 'muffin' is the released token-id diff: it needs data.segments 'token_diff', "
            f"not '{d.segments}'",
        ),
    ]


def _eval_checks(d: DataConfig, t: TrainConfig) -> Checks:
    """The held-out evaluation set: one source at most, and evaluation only where there is one."""
    return [
        (
            0 <= d.eval_fraction < 1,
            f"data.eval_fraction must be in [0, 1) (the share of pairs held out; 0 = none), got {d.eval_fraction}",
        ),
        (
            not (d.eval_fraction > 0 and d.eval_path),
            f"data.eval_fraction {d.eval_fraction} and data.eval_path '{d.eval_path}' both name an eval set: keep "
            "one (set data.eval_fraction 0 or data.eval_path null)",
        ),
        (
            not (d.eval_path and d.format == "synthetic"),
            "data.eval_path is a file in data.format, and the synthetic world has no files: use data.eval_fraction "
            "to hold out synthetic pairs, or set data.eval_path null",
        ),
        (t.eval_steps >= 0, f"train.eval_steps must be >= 0 (0 = evaluate at the end only), got {t.eval_steps}"),
        (
            t.eval_steps == 0 or d.eval_fraction > 0 or bool(d.eval_path),
            f"train.eval_steps {t.eval_steps} evaluates an eval set, and there is none: set data.eval_fraction "
            "(e.g. 0.05) or data.eval_path, or set train.eval_steps 0",
        ),
    ]


def _model_checks(m: ModelConfig) -> Checks:
    return [
        (m.image_size is None or m.image_size > 0, "model.image_size must be > 0"),
        (m.patch_size is None or m.patch_size > 0, "model.patch_size must be > 0 (null = the preset's)"),
        (m.logps_chunk_size >= 1, "model.logps_chunk_size must be >= 1"),
        (
            m.attn_implementation != "flex_attention"
            or importlib.util.find_spec("torch.nn.attention.flex_attention") is not None,
            "model.attn_implementation 'flex_attention' needs torch >= 2.5 (torch.nn.attention.flex_attention); "
            "upgrade torch or use 'sdpa'",
        ),
        (m.lora_r >= 0, "model.lora_r must be >= 0 (0 = full fine-tuning)"),
        (
            not (m.freeze_vision_tower and m.freeze_projector and m.freeze_llm and m.lora_r == 0),
            "model.freeze_vision_tower, freeze_projector and freeze_llm are all true: nothing would train",
        ),
        (
            not m.freeze_vision_experts or m.arch == "muffin",
            "model.freeze_vision_experts applies to model.arch 'muffin' only",
        ),
    ]


def _method_checks(loss: LossConfig, t: TrainConfig, ds: DeepSpeedConfig) -> Checks:
    """What the loss settings ask of the reference and the engine."""
    return [
        (
            not (t.reference == "cached" and loss.reference_free),
            "loss.reference_free needs no reference: set train.reference to 'live' or drop reference_free",
        ),
        (
            loss.tdpo_alpha == 0 or (t.reference == "live" and not loss.reference_free),
            f"loss.tdpo_alpha {loss.tdpo_alpha} (TDPO's sequential KL) needs the reference's full next-token "
            "distribution at every answer position, which the per-token reference cache does not hold "
            "(docs/DENSE_METHODS.md measures why): set train.reference live (and loss.reference_free false), "
            "or loss.tdpo_alpha 0",
        ),
        (
            loss.tdpo_alpha == 0 or ds.zero_stage != 3,
            "loss.tdpo_alpha > 0 reads the LM heads outside the forward pass, which "
            "ZeRO-3 partitions: use deepspeed.zero_stage 0, 1 or 2, or loss.tdpo_alpha 0",
        ),
        (
            not loss.tpo_score or (t.reference == "live" and not loss.reference_free),
            "loss.tpo_score (TPO) needs the reference's own answer-token logits given the real and the noised image, "
            "which the per-token reference cache does not hold: set train.reference live (and loss.reference_free "
            "false), or loss.tpo_score false",
        ),
        (
            not loss.tpo_score or ds.zero_stage != 3,
            "loss.tpo_score reads the LM heads outside the forward pass, which ZeRO-3 partitions: use "
            "deepspeed.zero_stage 0, 1 or 2, or loss.tpo_score false",
        ),
        (
            loss.corruption_draw == "pair"
            or loss.image_conditional_weight == 0
            or t.reference == "live"
            or loss.reference_free,
            f"loss.corruption_draw {loss.corruption_draw!r} redraws the corrupted image during training, so the "
            "reference's log-probs given it cannot be cached before: set train.reference live, or "
            "loss.corruption_draw pair",
        ),
    ]


SECTIONS: dict[str, type] = {
    f.name: f.type if isinstance(f.type, type) else eval(f.type) for f in dataclasses.fields(Config)
}


# ----------------------------------------------------------------------------------------------
# YAML loading, command-line overrides, type checking
# ----------------------------------------------------------------------------------------------
def _field_types(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any, from_string: bool) -> Any:
    """Check (and, for command-line strings, parse) one value against its annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (from_string and str(value).lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg, from_string)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        candidate = value
        if from_string and isinstance(value, str):
            for a in allowed:
                if str(a) == value:
                    candidate = a
        if isinstance(candidate, bool) and not any(isinstance(a, bool) for a in allowed):
            candidate = str(candidate).lower()  # YAML reads `true` for bf16: "true"
        if candidate not in allowed:
            raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
        return candidate
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_string and str(value).lower() in ("true", "1", "yes", "false", "0", "no"):
            return str(value).lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected a boolean (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_string:
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-7" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if from_string or isinstance(value, (int, float)):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - guards new field types


def _set(cfg: Config, dotted: str, value: Any, from_string: bool) -> None:
    section_name, _, field_name = dotted.partition(".")
    if section_name not in SECTIONS or not field_name:
        raise ConfigError(
            f"unknown config key '{dotted}': keys are <section>.<field> with section one of {', '.join(SECTIONS)}"
        )
    section = getattr(cfg, section_name)
    types_ = _field_types(type(section))
    if field_name not in types_:
        raise ConfigError(f"unknown config key '{dotted}': {section_name} has {', '.join(types_)}")
    setattr(section, field_name, _coerce(dotted, value, types_[field_name], from_string))


def _flatten(mapping: Any, source: str) -> list[tuple[str, Any]]:
    if not isinstance(mapping, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections ({', '.join(SECTIONS)})")
    items = []
    for section, values in mapping.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section '{section}'; sections are {', '.join(SECTIONS)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{section}' must be a mapping of field: value")
        items += [(f"{section}.{k}", v) for k, v in values.items()]
    return items


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | None = None, check_paths: bool = False
) -> Config:
    """Defaults <- YAML file <- `--section.field VALUE` overrides, then validation. A relative input path
    of the YAML (INPUT_PATHS) found next to the YAML becomes that absolute path; else it stays relative
    to the working directory. `check_paths`: every local input path must exist (what `ddpo train` needs;
    a library caller may load a config whose inputs are written later); deepspeed.config and train.resume
    must always."""
    cfg, tried = Config(), {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (from the working directory {Path.cwd()})")
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        for key, value in _flatten(data, str(path)):
            try:
                _set(cfg, key, value, from_string=False)
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None
        tried = _resolve_input_paths(cfg, path)
    for key, value in parse_overrides(overrides or []):
        _set(cfg, key, value, from_string=True)
        tried.pop(key, None)  # a command-line value is relative to the shell's directory only
    _check_input_paths(cfg, tried, INPUT_PATHS if check_paths else ("deepspeed.config", "train.resume"))
    return cfg.validate()


# Input paths a config may give relative to its own file: looked up next to the config file first, then in the
# working directory (a value given on the command line: the working directory only). The outputs
# (train.output_dir, train.reference_cache) are not among them: they are written where the command runs, and a
# place that depended on what already exists would move them between runs.
INPUT_PATHS = (
    "data.path",
    "data.eval_path",
    "data.image_dir",
    "model.name_or_path",
    "model.tokenizer",
    "model.muffin_checkpoint",
    "deepspeed.config",
    "train.resume",
)
# Of those, the ones that may name a hub id ('name' or 'owner/name'): kept as written when no such path exists.
HUB_ID_KEYS = ("data.path", "data.eval_path", "model.name_or_path", "model.tokenizer")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_DATA_FILES = (".parquet", ".json", ".jsonl", ".arrow", ".csv")  # a data.path ending so is a file, not a hub id


def _path_value(cfg: Config, key: str) -> str | None:
    """The value of input-path `key`, or None where it names no path (null or '', train.resume 'none'/'auto')."""
    section, _, name = key.partition(".")
    value = getattr(getattr(cfg, section), name)
    return None if not value or (key == "train.resume" and value in ("none", "auto")) else value


def _resolve_input_paths(cfg: Config, config_file: Path) -> dict[str, list[Path]]:
    """Point each relative input path found next to `config_file` there (absolute); return the places tried
    for those found in neither place."""
    tried = {}
    for key in INPUT_PATHS:
        value = _path_value(cfg, key)
        if value is None or Path(value).expanduser().is_absolute():
            continue
        beside = Path(os.path.abspath(config_file.parent / value))
        if beside.exists():
            section, _, name = key.partition(".")
            setattr(getattr(cfg, section), name, str(beside))
        elif not Path(value).exists():
            tried[key] = [beside, Path(os.path.abspath(value))]
    return tried


def _check_input_paths(cfg: Config, tried: dict[str, list[Path]], keys: tuple[str, ...]) -> None:
    for key in keys:
        value = _path_value(cfg, key)
        if value is None or Path(value).expanduser().exists():
            continue
        if key in HUB_ID_KEYS and _HUB_ID.match(value) and not value.endswith(_DATA_FILES):
            continue  # a hub id: the loader says whether it can be had
        if key in tried:
            beside, cwd = tried[key]
            where = f"tried {beside} (next to the config file) and {cwd} (the working directory)"
        elif Path(value).expanduser().is_absolute():
            where = "no such file or folder"
        else:
            where = f"tried {os.path.abspath(value)} (a command-line path is relative to the working directory)"
        raise ConfigError(f"{key} '{value}' not found: {where}; fix the path{_PATH_HINTS.get(key, '')}")


_PATH_HINTS = {
    "data.path": ", or give a hub id 'owner/name'",
    "data.eval_path": ", or give a hub id 'owner/name', or set it null (no separate eval file)",
    "model.name_or_path": ", or give a hub id 'owner/name'",
    "model.tokenizer": ", or give a hub id 'owner/name'",
    "deepspeed.config": " (configs/deepspeed/ has the shipped ones), or set it null",
    "train.resume": ", or set it 'auto' (the latest checkpoint in train.output_dir) or 'none'",
}


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """['--loss.gamma', '5', '--train.seed=3'] -> [('loss.gamma', '5'), ('train.seed', '3')]."""
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(
                f"unexpected argument '{arg}': overrides look like --<section>.<field> VALUE (e.g. --loss.gamma 5)"
            )
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override '{arg}' needs a value")
            key, value = arg[2:], args[i + 1]
            i += 2
        pairs.append((key, value))
    return pairs


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (loads back with load_config)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")


def fields_help(cfg: Config | None = None) -> str:
    """Every field with its type, default and one-line doc, as `ddpo train --help` prints them; with `cfg`,
    each field's value in it first (`ddpo train CONFIG --help`)."""
    lines = []
    for section_name, section_cls in SECTIONS.items():
        lines.append(f"\n{section_name}:")
        hints = _field_types(section_cls)
        for f in dataclasses.fields(section_cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            value = "" if cfg is None else f" {json.dumps(getattr(getattr(cfg, section_name), f.name))} "
            kind = f"({_describe(hints[f.name])}, default {json.dumps(default)})"
            lines.append(f"  --{section_name}.{f.name}{value} {kind}")
            relative = " Relative: next to the config file if there, else the working directory."
            lines.append(f"      {f.metadata['help']}{relative if f'{section_name}.{f.name}' in INPUT_PATHS else ''}")
    return "\n".join(lines)
