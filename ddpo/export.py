"""What a LoRA run leaves behind, and `ddpo export`.

    ddpo export RUN_DIR --merge [--output DIR] [--dtype {auto,float32,bfloat16}]

A full fine-tuning run's final/ is a plain checkpoint (`PreferenceModel.save_pretrained`). A LoRA run's
(model.lora_r > 0) final/ is a PEFT adapter (`models.lora.save_lora_adapters`): adapter_config.json and
adapter_model.safetensors (the adapters alone), the tokenizer and processor, and ddpo_model.json (the
template and image transform it was trained with). Its `base_model_name_or_path` is model.name_or_path
(absolute when it is a local directory). A base built from the config instead (model.name_or_path null: a
random-init preset, or model.muffin_checkpoint's original weights on a preset) is in no checkpoint a loader
reads, so the run writes it when it starts to RUN_DIR/base/, a plain checkpoint (a preset has at most ~12 M
parameters; a 13B Muffin base is a full copy, written once), and the adapter names that directory by its
absolute path (edit the field if the run directory moves). Step checkpoints hold no base
(ddpo/checkpoint.py): each records the SHA-256 of such a base, and a resume that builds another one (another
seed or torch version) stops instead of training the adapters on it.

Opening final/: `peft.PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(BASE), final)`,
or `models.build.load_model(final)` (base + adapters with ddpo's template). `ddpo export RUN_DIR --merge`
writes the adapters merged into the base weights (default RUN_DIR/final-merged): a plain checkpoint that
`load_model` and transformers read without peft, in the adapters' dtype unless --dtype says otherwise.
A LoRA run may start from another LoRA run's final/ (model.name_or_path; RLAIF-V's next iteration): the
earlier adapters are merged into the base, and the new adapter's base is that final/, which `load_model`
follows; for peft, open the earlier run's `ddpo export --merge` as the base.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
from contextlib import AbstractContextManager
from pathlib import Path

from ddpo import distributed as dist
from ddpo.run_identity import FINAL_DIR

BASE_DIR = "base"
MERGED_DIR = "final-merged"
BASE_DIGEST = "lora_base_sha256"  # trainer_state.json key of a random-init LoRA run's checkpoints


# ----------------------------------------------------------------------------------------------
# The base of a LoRA run
# ----------------------------------------------------------------------------------------------
def lora_base_path(cfg) -> str:
    """What a LoRA run's adapters apply to: model.name_or_path (a local directory made absolute, so the
    adapter opens from any working directory; a hub id as it is), or RUN_DIR/base for a random-init base."""
    if cfg.model.name_or_path:
        local = Path(cfg.model.name_or_path).expanduser()
        return str(local.absolute()) if local.is_dir() else cfg.model.name_or_path
    return str((Path(cfg.train.output_dir) / BASE_DIR).absolute())


def base_digest(model) -> str:
    """SHA-256 of the frozen parameters (names, dtypes, shapes and bytes, in the model's order)."""
    import torch

    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        tensor = p.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_lora_base(model, directory: Path, template: str) -> Path:
    """The base without its adapters, as a plain checkpoint (`load_model` and transformers read it),
    written atomically."""
    from ddpo.models.lora import lora_disabled

    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with lora_disabled(model.hf_model):
        model.save_pretrained(tmp, template=template)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


def gathered(engine, model) -> AbstractContextManager:
    """The whole of every parameter on every rank for the block (ZeRO-3 partitions them; else a no-op)."""
    import deepspeed

    params = list(model.parameters())
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=engine.zero_optimization_stage() == 3)


def prepare_lora_base(trainer, resumed: dict | None) -> str | None:
    """At the start of a LoRA run on a base built from the config (model.name_or_path null; else None): its
    digest, which each checkpoint records.
    A fresh start writes RUN_DIR/base; a resume checks that this process built the base the checkpoint's
    adapters trained on (`resumed`: its trainer state) and writes RUN_DIR/base only if it is missing."""
    from ddpo.checkpoint import CheckpointError

    cfg = trainer.cfg
    if cfg.model.lora_r == 0 or cfg.model.name_or_path:
        return None
    base = trainer.output_dir / BASE_DIR
    with gathered(trainer.engine, trainer.model):
        digest = base_digest(trainer.model)
        saved = (resumed or {}).get(BASE_DIGEST)
        if saved is not None and saved != digest:
            raise CheckpointError(
                f"the checkpoint's LoRA adapters were trained on a base with SHA-256 {saved[:16]}..., kept in "
                f"{base}, but this process built another one ({digest[:16]}...) from the config (model.preset and "
                "train.seed, or model.muffin_checkpoint): the torch/transformers version, the tokenizer or that "
                "checkpoint changed. Resume with what the run started with, or start over (train.resume none)"
            )
        if trainer.is_main and (resumed is None or not base.is_dir()):
            write_lora_base(trainer.model, base, cfg.data.template)
    dist.barrier()
    return digest


# ----------------------------------------------------------------------------------------------
# ddpo export
# ----------------------------------------------------------------------------------------------
def merge(run_dir: Path, output: Path | None = None, dtype: str = "auto") -> Path:
    """Write RUN_DIR/final's adapters merged into their base as a plain checkpoint at `output`
    (default RUN_DIR/final-merged); returns it. `dtype` 'auto' = the adapters' dtype."""
    import torch

    from ddpo.checkpoint import CheckpointError
    from ddpo.models.build import load_model

    final = run_dir / FINAL_DIR
    _check_adapter_dir(run_dir, final)
    default = run_dir / MERGED_DIR
    output = output or default
    if output.exists() and output.resolve() != default.resolve():  # only our own earlier export is replaced
        raise CheckpointError(f"--output {output} exists: choose another directory, or remove it first")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype) or _adapter_dtype(final)
    model = load_model(final, dtype=torch_dtype)
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, template=model.template)
    shutil.rmtree(output, ignore_errors=True)
    os.replace(tmp, output)
    return output


def _check_adapter_dir(run_dir: Path, final: Path) -> None:
    from ddpo.checkpoint import CheckpointError
    from ddpo.models.lora import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE

    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is not a directory: pass the train.output_dir of a LoRA run")
    if not final.is_dir():
        raise CheckpointError(
            f"{final} does not exist: the run has not finished (its checkpoints hold no base to merge into). "
            f"Finish it (`ddpo train` with the same config resumes it), then export"
        )
    if not (final / ADAPTER_CONFIG_FILE).is_file():
        what = "a plain checkpoint already" if (final / "config.json").is_file() else "no model"
        raise CheckpointError(
            f"{final} holds no {ADAPTER_CONFIG_FILE} ({what}): only a LoRA run's (model.lora_r > 0) final/ has "
            "adapters to merge; a full fine-tuning run's final/ is used as it is"
        )
    if not (final / ADAPTER_WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{final / ADAPTER_WEIGHTS_FILE} is missing: the adapter is incomplete")


def _adapter_dtype(final: Path):
    from safetensors import safe_open

    from ddpo.models.lora import ADAPTER_WEIGHTS_FILE

    with safe_open(str(final / ADAPTER_WEIGHTS_FILE), framework="pt") as f:
        keys = list(f.keys())
        return f.get_tensor(keys[0]).dtype if keys else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ddpo export",
        description="Export a LoRA run's adapters merged into their base: a plain checkpoint that reloads "
        "without peft (the run's final/ stays the adapter).",
    )
    parser.add_argument("run_dir", type=Path, help="the train.output_dir of a finished LoRA run (model.lora_r > 0)")
    parser.add_argument("--merge", action="store_true", help="merge the adapters into the base weights (required)")
    parser.add_argument("--output", type=Path, help=f"where to write it (default RUN_DIR/{MERGED_DIR})")
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="dtype of the merged weights; auto = the adapters' (what the run trained in)",
    )
    args = parser.parse_args(argv)
    if not args.merge:
        parser.error(f"nothing to do: pass --merge ({args.run_dir}/{FINAL_DIR} already holds the adapters alone)")
    output = merge(args.run_dir, args.output, args.dtype)  # errors: one message, exit 1 (ddpo/cli.py `dispatch`)
    print(f"wrote {output}: the adapters of {args.run_dir / FINAL_DIR} merged into their base")
    return 0


if __name__ == "__main__":
    sys.exit(main())
