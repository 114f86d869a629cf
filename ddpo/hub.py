"""`ddpo push RUN_DIR REPO_ID`: publish a finished run's model on the Hugging Face Hub, with a model card.

    ddpo push runs/llava_ddpo me/llava-1.5-7b-ddpo [--private] [--revision BRANCH] [--dry-run]

What goes up is RUN_DIR/final, the trainer's export: a full model (config.json, weights, tokenizer) or a peft
adapter (adapter_config.json + adapter weights, what a LoRA run saves alone). A README.md model card is written
into final/ first, from the run's own record (run.json, else config.yaml: ddpo/run_identity.py) and its final
metrics (summary.json, else the last rows of metrics.jsonl); `--dry-run` stops there and lists the files that
would go up. A README.md in final/ without the card's marker line is the user's own: it is uploaded as it is.

The token is read from the environment (HF_TOKEN) or from `hf auth login`'s store, never from the command line.
Exit codes: 0 done; 1 a run directory, token or upload that cannot be used (one message naming it and the fix);
2 a command line that cannot be used.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ddpo.run_summary import read_metrics_rows

CARD_FILE = "README.md"
CARD_MARKER = "<!-- Written by `ddpo push`, which rewrites it on each push: delete this line to keep your edits. -->"
CARD_TAGS = ["ddpo", "dpo", "rlhf-v", "vision-language"]
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
LAST_ROWS = 3  # metrics.jsonl rows shown when the run wrote no summary.json
ROW_COLUMNS = ("step", "epoch", "loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")
FULL_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_DATA_SUFFIXES = (".parquet", ".json", ".jsonl", ".arrow", ".csv")  # a path ending so is a local file, not a hub id


class PushError(Exception):
    """A run directory, token or upload that cannot be used; the message names it and the fix."""


@dataclass(frozen=True)
class PushedRun:
    """What the card is written from: the run's config (flattened, missing fields at their defaults), whether
    final/ holds an adapter, and the final metrics (summary.json) or the last logged rows (metrics.jsonl)."""

    directory: Path
    config: dict[str, Any]
    config_source: str
    adapter: bool
    summary: dict[str, Any] | None
    rows: list[dict[str, Any]]

    @property
    def final(self) -> Path:
        return self.directory / "final"


# ----------------------------------------------------------------------------------------------
# Reading the run
# ----------------------------------------------------------------------------------------------
def check_final(final: Path) -> bool:
    """Whether `final` holds a peft adapter (True) or a full model (False); PushError if it is missing or lacks
    a file a loader needs."""
    run = final.parent
    if not final.is_dir():
        raise PushError(
            f"{final} not found: the trainer writes final/ when a run ends. Finish the run (resume it with "
            f"`ddpo train CONFIG --train.output_dir {run} --train.resume auto`), or give the run's "
            "train.output_dir as RUN_DIR"
        )
    if (final / "adapter_config.json").is_file():
        if not any(_nonempty(final / name) for name in ADAPTER_WEIGHTS):
            raise _incomplete(final, f"an adapter_config.json but no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
        base = _adapter_base(final)
        if not is_hub_id(base):  # a random-init or local base: nobody who downloads the adapter can apply it
            raise PushError(
                f"{final} holds LoRA adapters on the local base {base}, which no one downloading them can reach: "
                f"write the merged model (`ddpo export {run} --merge`) and upload {run / 'final-merged'} "
                "(`hf upload REPO_ID DIR`), or train the adapters on a hub model (model.name_or_path 'owner/name')"
            )
        return True
    if not (final / "config.json").is_file():
        raise _incomplete(final, "no config.json (nor adapter_config.json)")
    missing = _missing_weights(final)
    if missing:
        raise _incomplete(final, missing)
    if not (final / "tokenizer_config.json").is_file():
        raise _incomplete(final, "no tokenizer (tokenizer_config.json)")
    return False


def _nonempty(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def _missing_weights(final: Path) -> str | None:
    """What of the model's weights is missing (None when all are there): one file, or a sharded index's shards."""
    for name in FULL_WEIGHTS:
        index = final / f"{name}.index.json"
        if index.is_file():
            try:
                shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            except (OSError, ValueError, KeyError, AttributeError) as e:
                return f"an unreadable {index.name} ({type(e).__name__})"
            absent = sorted(s for s in shards if not _nonempty(final / s))
            return f"shards named in {index.name} are missing: {', '.join(absent[:3])}" if absent else None
        if _nonempty(final / name):
            return None
    return f"no weights ({' or '.join(FULL_WEIGHTS)}, or a sharded index)"


def _incomplete(final: Path, what: str) -> PushError:
    return PushError(
        f"{final} is incomplete: {what}. It was not written by a finished run (or was changed since): re-export "
        "it by resuming the run to its end, or push another run"
    )


def read_run(run_dir: Path) -> PushedRun:
    """The run in `run_dir`, checked: final/ complete, its config readable; PushError naming what is not."""
    from ddpo.run_identity import DEFAULTS, flatten, owner_config

    if not run_dir.is_dir():
        raise PushError(f"{run_dir}: no such directory; give a run's train.output_dir (it holds final/ and run.json)")
    adapter = check_final(run_dir / "final")
    sections, source, unreadable = owner_config(run_dir)
    if unreadable:
        raise PushError(
            f"{run_dir / source} cannot be read ({unreadable}): the card is written from the run's config; "
            "restore the file (run.json or config.yaml, as the trainer wrote it)"
        )
    if sections is None:
        raise PushError(
            f"{run_dir} holds no run.json or config.yaml, so the run's config (base model, data, recipe) is "
            "unknown: push a directory the trainer wrote (train.output_dir), or save the run's config there as "
            "config.yaml"
        )
    return PushedRun(
        directory=run_dir,
        config={**DEFAULTS, **flatten(sections)},
        config_source=source,
        adapter=adapter,
        summary=_read_summary(run_dir / SUMMARY_FILE),
        rows=read_metrics_rows(run_dir / METRICS_FILE),
    )


def _read_summary(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PushError(f"{path} cannot be read ({e}): fix or delete it (the card then shows metrics.jsonl)") from None
    return data if isinstance(data, dict) and data else None


def is_hub_id(value: Any) -> bool:
    """Whether a config value names a hub repository ('owner/name'), not a local path: the loader keeps a hub id
    as written and makes a local input path absolute (ddpo/config.py)."""
    return (
        isinstance(value, str)
        and bool(_HUB_ID.match(value))
        and not value.endswith(_DATA_SUFFIXES)
        and not Path(value).exists()
    )


# ----------------------------------------------------------------------------------------------
# The model card
# ----------------------------------------------------------------------------------------------
def front_matter(run: PushedRun) -> dict[str, Any]:
    """The card's metadata: library, base model and dataset (where they are hub ids), tags."""
    c = run.config
    meta: dict[str, Any] = {"library_name": "peft" if run.adapter else "transformers"}
    base = c["model.name_or_path"] or _adapter_base(run.final)
    if is_hub_id(base):
        meta["base_model"] = base
    if is_hub_id(c["data.path"]):
        meta["datasets"] = [c["data.path"]]
    meta["tags"] = list(CARD_TAGS)
    meta["pipeline_tag"] = "image-text-to-text"
    return meta


def _adapter_base(final: Path) -> str | None:
    try:
        return json.loads((final / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None


def model_card(run: PushedRun, repo_id: str) -> str:
    """The README.md: YAML front matter, then what was trained, the recipe, data, setup, metrics, loading."""
    meta = yaml.safe_dump(front_matter(run), sort_keys=False, allow_unicode=True)
    parts = [
        f"---\n{meta}---",
        CARD_MARKER,
        f"# {repo_id.split('/')[-1]}\n\n{_what_was_trained(run)}",
        _recipe(run.config),
        _data(run.config),
        _setup(run),
        _metrics(run),
        _loading(run, repo_id),
    ]
    return "\n\n".join(parts) + "\n"


def _base_name(c: dict[str, Any]) -> str:
    base = c["model.name_or_path"] or c["model.muffin_checkpoint"]
    if base is None:
        return f"a randomly initialised `{c['model.arch']}` model (preset `{c['model.preset']}`)"
    if is_hub_id(base):
        return f"[`{base}`](https://huggingface.co/{base})"
    return f"a local checkpoint (`{Path(base).name}`)"  # the folder's name only: the full path is the trainer's disk


def _method(c: dict[str, Any]) -> str:
    weights, gamma, segments = c["loss.token_weights"], c["loss.gamma"], c["data.segments"]
    if weights == "segments" and gamma != 1 and segments != "none":
        return (
            f"Dense DPO (DDPO, RLHF-V: Yu et al., CVPR 2024, arXiv 2312.00849): the tokens of the corrected "
            f"segments (found by `{segments}`) weigh γ = {_fmt(gamma)} in each answer's log-probability, the others 1"
        )
    if weights == "segments":
        return "plain DPO (every answer token weighs 1)"
    return f"dense DPO with token weights from `{weights}` (docs/DENSE_METHODS.md of ddpo)"


def _what_was_trained(run: PushedRun) -> str:
    c = run.config
    what = "LoRA adapters for" if run.adapter else "A fine-tune of"
    path = c["data.path"]
    data = f"the preference pairs of `{path if is_hub_id(path) else Path(path).name}`" if path else "synthetic pairs"
    return f"{what} {_base_name(c)}, trained on {data} with {_method(c)}, by the `ddpo` trainer."


def _recipe(c: dict[str, Any]) -> str:
    from ddpo.run_identity import DEFAULTS

    shown = ("loss.beta", "loss.gamma", "loss.normalize", "loss.loss_type", "loss.token_weights")
    normalize = {
        "mean": "weighted mean of token log-probs (RLHF-V Eq. 5)",
        "sum": "weighted sum (released RLHF-V code)",
    }
    rows = [
        ("β (`loss.beta`)", c["loss.beta"]),
        ("γ (`loss.gamma`)", c["loss.gamma"]),
        ("normalisation (`loss.normalize`)", f"{c['loss.normalize']}: {normalize.get(c['loss.normalize'], '')}"),
        ("loss (`loss.loss_type`)", c["loss.loss_type"]),
        ("token weights (`loss.token_weights`)", c["loss.token_weights"]),
        ("corrected segments (`data.segments`)", c["data.segments"]),
    ]
    others = [(f"`{k}`", v) for k, v in c.items() if k.startswith("loss.") and k not in shown and v != DEFAULTS.get(k)]
    text = "## Recipe\n\n" + _table(("setting", "value"), rows)
    if others:
        return (
            f"{text}\n\nOther method settings (those not at ddpo's defaults):\n\n{_table(('setting', 'value'), others)}"
        )
    return f"{text}\n\nEvery other `loss.*` setting is at ddpo's default."


def _data(c: dict[str, Any]) -> str:
    path = c["data.path"]
    where = f"[`{path}`](https://huggingface.co/datasets/{path})" if is_hub_id(path) else f"`{Path(path or '').name}`"
    rows = [
        ("dataset (`data.path`)", where if path else "generated (synthetic)"),
        ("format", c["data.format"]),
        ("split", c["data.split"]),
        ("pairs used (`data.max_samples`)", "all" if c["data.max_samples"] is None else c["data.max_samples"]),
        ("conversation template", c["data.template"]),
        ("max length (tokens)", c["data.max_length"]),
    ]
    return "## Data\n\n" + _table(("setting", "value"), rows)


def _setup(run: PushedRun) -> str:
    c = run.config
    last = run.rows[-1] if run.rows else {}
    steps = last.get("step", (run.summary or {}).get("step", "not recorded"))
    length = f"max_steps {c['train.max_steps']}" if c["train.max_steps"] > 0 else f"epochs {_fmt(c['train.epochs'])}"
    tuning = (
        f"LoRA r {c['model.lora_r']}, α {c['model.lora_alpha']}, dropout {_fmt(c['model.lora_dropout'])}, "
        f"on `{c['model.lora_target']}`"
        if c["model.lora_r"] > 0
        else "full fine-tuning" + _frozen(c)
    )
    rows = [
        ("base model", _base_name(c)),
        ("parameters trained", tuning),
        ("optimizer steps", f"{steps} (configured: {length})"),
        (
            "batch",
            f"{c['train.micro_batch_size']} pairs per process x {c['train.gradient_accumulation_steps']} gradient "
            f"accumulation = {c['train.micro_batch_size'] * c['train.gradient_accumulation_steps']} pairs per process "
            "per optimizer step (global batch: x the number of processes)",
        ),
        (
            "learning rate",
            f"{_fmt(c['train.learning_rate'])}, {c['train.lr_scheduler']}, warm-up ratio "
            f"{_fmt(c['train.warmup_ratio'])}",
        ),
        ("weight decay", c["train.weight_decay"]),
        ("precision", f"model.dtype {c['model.dtype']}, deepspeed.bf16 {c['deepspeed.bf16']}"),
        ("reference log-probs", c["train.reference"]),
        ("seed", c["train.seed"]),
    ]
    return "## Training setup\n\n" + _table(("setting", "value"), rows)


def _frozen(c: dict[str, Any]) -> str:
    parts = [p for p in ("vision_tower", "projector", "llm", "vision_experts") if c.get(f"model.freeze_{p}")]
    return f" (frozen: {', '.join(parts)})" if parts else ""


def _metrics(run: PushedRun) -> str:
    if run.summary is not None:
        rows = [(f"`{k}`", v) for k, v in _flat_scalars(run.summary).items()]
        return "## Final metrics\n\nFrom the run's `summary.json`:\n\n" + _table(("metric", "value"), rows)
    if not run.rows:
        return "## Final metrics\n\nThe run logged no metrics (no `summary.json` or `metrics.jsonl`)."
    rows = run.rows[-LAST_ROWS:]
    columns = [k for k in ROW_COLUMNS if any(k in r for r in rows)]
    columns += sorted({k for r in rows for k in r if k.startswith("eval") and k not in columns})
    body = _table(columns, [tuple(r.get(k) for k in columns) for r in rows])
    intro = f"The last {len(rows)} logged rows of the run's `metrics.jsonl` (training batches)"
    return f"## Final metrics\n\n{intro}:\n\n{body}"


def _flat_scalars(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'eval': {'loss': 0.5}} -> {'eval/loss': 0.5}; lists and other non-scalars are left out."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat_scalars(value, f"{name}/"))
        elif value is None or isinstance(value, (str, int, float, bool)):
            out[name] = value
    return out


def _loading(run: PushedRun, repo_id: str) -> str:
    c = run.config
    ddpo_load = (
        "```python\nfrom huggingface_hub import snapshot_download\nfrom ddpo.models.build import load_model\n\n"
        f'model = load_model(snapshot_download("{repo_id}"))\n```'
    )
    if run.adapter:
        return (
            "## How to load\n\nThe repository holds LoRA adapters (peft's `adapter_config.json` + weights); ddpo "
            "loads the base model named in `adapter_config.json` and applies them:\n\n" + ddpo_load
        )
    text = f"## How to load\n\nWith ddpo (keeps the `{c['data.template']}` template and the image transform):\n\n"
    text += ddpo_load
    if c["model.arch"] == "llava":
        text += (
            "\n\nWith transformers (the processor's chat template renders the template the model was trained "
            "with):\n\n```python\nfrom transformers import AutoProcessor, LlavaForConditionalGeneration\n\n"
            f'model = LlavaForConditionalGeneration.from_pretrained("{repo_id}", dtype="bfloat16")\n'
            f'processor = AutoProcessor.from_pretrained("{repo_id}")\n```'
        )
    return text


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return format(value, ".6g") if math.isfinite(value) else str(value)
    return str(value)


def _table(header: tuple[str, ...] | list[str], rows: list[tuple]) -> str:
    def line(cells) -> str:
        return "| " + " | ".join(_fmt(v).replace("|", "\\|") for v in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *(line(r) for r in rows)])


# ----------------------------------------------------------------------------------------------
# Writing and uploading
# ----------------------------------------------------------------------------------------------
def write_card(final: Path, card: str) -> bool:
    """Write the card as final/README.md unless a README.md of the user's own (no marker line) is there;
    returns whether it was written."""
    path = final / CARD_FILE
    if path.is_file() and CARD_MARKER not in path.read_text(encoding="utf-8", errors="replace"):
        return False
    path.write_text(card, encoding="utf-8")
    return True


def upload_files(final: Path) -> list[str]:
    """The files of final/ that go up, relative and sorted; hidden files (a download cache, an editor's) stay."""
    return sorted(
        str(p.relative_to(final)).replace("\\", "/")
        for p in final.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(final).parts)
    )


def _token() -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise PushError(
            "no Hugging Face token: set HF_TOKEN in the environment to a token with write access "
            "(https://huggingface.co/settings/tokens), or run `hf auth login` once; `--dry-run` needs none"
        )
    return token


def _upload(run: PushedRun, args: argparse.Namespace, files: list[str], token: str) -> str:
    """create_repo (exist_ok), the branch if --revision names one, then upload_folder of the listed files; the
    commit's URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    steps = run.rows[-1].get("step") if run.rows else None
    message = f"ddpo push: {run.directory.name}" + (f" ({steps} steps)" if steps is not None else "")
    try:
        api.create_repo(args.repo_id, private=True if args.private else None, exist_ok=True)
        if args.revision:
            api.create_branch(args.repo_id, branch=args.revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=args.repo_id,
            folder_path=str(run.final),
            revision=args.revision,
            commit_message=message,
            allow_patterns=files,
        )
    except (HfHubHTTPError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PushError(
            f"upload of {run.final} to {args.repo_id} failed: {first}. Check that the token (HF_TOKEN or "
            "`hf auth login`) has write access to the repository's owner and that the Hub can be reached; "
            "`--dry-run` checks everything else"
        ) from None
    return str(getattr(info, "commit_url", "") or f"https://huggingface.co/{args.repo_id}")


# ----------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddpo push",
        description=__doc__.split("\n\n")[0],
        epilog="The token is read from HF_TOKEN or `hf auth login`, never from the command line.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished run's train.output_dir (it holds final/)")
    parser.add_argument("repo_id", metavar="REPO_ID", help="hub model repository, 'owner/name' (or 'name': yours)")
    parser.add_argument("--private", action="store_true", help="create the repository private (if it is new)")
    parser.add_argument("--revision", metavar="R", help="branch to commit to (created if missing); default main")
    parser.add_argument(
        "--dry-run", action="store_true", help="write final/README.md and list the files; upload nothing"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(args.repo_id)
    except HFValidationError as e:
        parser.error(f"REPO_ID '{args.repo_id}' is not a hub repository id ('owner/name'): {e}")
    try:
        return _push(args)
    except PushError as e:
        print(f"ddpo push: error: {e}", file=sys.stderr)
        return 1


def _push(args: argparse.Namespace) -> int:
    run = read_run(Path(args.run_dir))
    token = None if args.dry_run else _token()  # before anything is written: a push that cannot upload changes nothing
    written = write_card(run.final, model_card(run, args.repo_id))
    files = upload_files(run.final)
    card_note = "written" if written else "kept (it has no ddpo marker line: the user's own)"
    print(f"{run.final / CARD_FILE}: model card {card_note}")
    print(f"{len(files)} files from {run.final}:")
    for name in files:
        print(f"  {name}  ({_size(run.final / name)})")
    if args.dry_run:
        print(f"dry run: nothing uploaded; `ddpo push {args.run_dir} {args.repo_id}` (without --dry-run) uploads")
        return 0
    url = _upload(run, args, files, token)
    print(f"pushed to {args.repo_id}: {url}")
    return 0


def _size(path: Path) -> str:
    size = float(path.stat().st_size)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""  # pragma: no cover - the loop always returns
