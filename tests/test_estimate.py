"""`ddpo estimate` (ddpo/estimate.py): parameter counts exact against the released architectures, state and
activation memory within 25 % of what the CPU presets measure, and the command on every shipped config.

Measurements, all deterministic (tensor sizes, not the allocator or RSS):
- state (weights + gradients + optimizer): a census of every live tensor storage created since before the
  model was built, taken inside the optimizer's step (the moment the master weights, Adam moments and the
  float32 gradients coexist), through the trainer's DeepSpeed engine;
- saved activations without checkpointing: the unique storages autograd saves for the backward during one
  training forward (`torch.autograd.graph.saved_tensors_hooks`), parameters excluded;
- saved activations with checkpointing (whose layers keep their inputs outside autograd's saved tensors):
  torch's MemTracker, live bytes after the forward minus before it.
"""

from __future__ import annotations

import gc
import io
import json
import os
import warnings
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ddpo import estimate as est
from ddpo.config import load_config
from ddpo.models.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 0.25  # the bound on predicted / measured memory


# ------------------------------------------------------------------------------------------------
# Parameter counts: the arithmetic of the published architectures
# ------------------------------------------------------------------------------------------------
def llama_params(vocab: int, hidden: int, layers: int, ffn: int) -> int:
    """Embeddings + LM head (untied) + per layer (q, k, v, o; gate, up, down; 2 RMSNorms) + final norm."""
    return 2 * vocab * hidden + layers * (4 * hidden * hidden + 3 * hidden * ffn + 2 * hidden) + hidden


def clip_params(width: int, layers: int, ffn: int, image: int, patch: int) -> int:
    """CLIP vision model: patch conv (no bias) + CLS + positions + pre-LN + layers + post-LN."""
    positions = (image // patch) ** 2 + 1
    layer = 4 * (width * width + width) + (width * ffn + ffn) + (ffn * width + width) + 2 * 2 * width
    return 3 * patch * patch * width + width + positions * width + 2 * width + layers * layer + 2 * width


def beit3_params(width: int, layers: int, ffn: int, image: int, patch: int) -> int:
    """BEiT-3 multiway (models/beit3.py): patch conv + CLS, vision (2 + 1 + patches rows) and text (1024 rows)
    position tables, per layer two experts of (LN, q/k/v/out, sub-LN, LN, fc1, FFN sub-LN, fc2), final LN x 2."""
    patches = (image // patch) ** 2
    expert = 2 * width + 4 * (width * width + width) + 2 * width + 2 * width
    expert += (width * ffn + ffn) + 2 * ffn + (ffn * width + width)
    embed = 3 * patch * patch * width + width + width
    return embed + (patches + 3) * width + 1024 * width + layers * 2 * expert + 2 * 2 * width


def released_counts(arch: str, config) -> est.ModelShape:
    return est.model_shape(est.meta_model(arch, config, ModelConfig(arch=arch)))


def test_llava15_parameter_counts_are_exact():
    # LLaMA-7B / Vicuna-7B 6,738,415,616 + CLIP ViT-L/14-336 303,507,456 + 2-layer MLP projector 20,979,712
    assert llama_params(32000, 4096, 32, 11008) == 6_738_415_616
    assert clip_params(1024, 24, 4096, 336, 14) == 303_507_456
    assert 1024 * 4096 + 4096 + 4096 * 4096 + 4096 == 20_979_712
    shape = released_counts("llava", est.llava15_config("7b", vocab_size=32000))
    assert shape.total == 7_062_902_784 == 6_738_415_616 + 303_507_456 + 20_979_712
    assert shape.parts["vision_tower"].params == 303_507_456
    assert shape.parts["projector"].params == 20_979_712
    llm = sum(shape.parts[k].params for k in ("decoder_layers", "embeddings", "lm_head"))
    assert llm == 6_738_415_616
    # 13B: LLaMA-13B 13,015,864,320 + the same tower + a 1024 -> 5120 -> 5120 projector 31,467,520
    assert llama_params(32000, 5120, 40, 13824) == 13_015_864_320
    assert 1024 * 5120 + 5120 + 5120 * 5120 + 5120 == 31_467_520
    assert released_counts("llava", est.llava15_config("13b", vocab_size=32000)).total == 13_350_839_296
    # llava-hf pads the vocabulary to 32064 rows: the checkpoints the configs name have 64 more rows in the
    # embeddings and in the LM head.
    assert released_counts("llava", est.llava15_config("7b")).total == 7_062_902_784 + 2 * 64 * 4096
    assert released_counts("llava", est.llava15_config("13b")).total == 13_350_839_296 + 2 * 64 * 5120


def test_muffin13b_parameter_count_is_exact():
    # BEiT-3 large at 448 px: patches 28 x 28 = 784, vision position table 784 + 3 = 787 rows.
    beit3 = beit3_params(1024, 24, 4096, 448, 16)
    assert beit3 == 607_757_312
    queries = 64 * 1024
    projector = 1024 * 5120 + 5120
    llama = llama_params(32004, 5120, 40, 13824)  # LLaMA's 32000 words + [PAD], <im_patch>, <im_start>, <im_end>
    assert llama == 13_015_864_320 + 2 * 4 * 5120
    shape = released_counts("muffin", est.muffin13b_original_config())
    assert shape.total == beit3 + queries + projector + llama == 13_628_976_128
    assert shape.parts["vision_tower"].params == beit3 + queries  # the queries run inside BEiT-3
    assert shape.image_tokens == 64 and shape.tower.tokens == 784 + 1 + 64


def test_omnilmm12b_counts_what_the_config_header_states():
    shape = released_counts("omnilmm", est.omnilmm12b_original_config())
    # Mistral-7B with 32009 words: GQA 32/8 (k, v 1024 wide), FFN 14336
    mistral = 2 * 32009 * 4096 + 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096) + 4096
    assert sum(shape.parts[k].params for k in ("decoder_layers", "embeddings", "lm_head")) == mistral
    assert round(shape.total / 1e9, 1) == 11.6  # configs/rlaifv/omnilmm12b.yaml: "11.6 B parameters"
    assert shape.image_tokens == 256 and shape.tower.tokens == 32 * 32 + 1


# ------------------------------------------------------------------------------------------------
# The memory arithmetic, by hand
# ------------------------------------------------------------------------------------------------
def test_state_memory_by_hand_for_7b_on_8_gpus():
    shape = released_counts("llava", est.llava15_config("7b"))
    P = shape.total
    plan = est.Plan(weight_bytes=2, gpus_per_node=8, buffers=est.ZeroBuffers(reduce_bucket=500_000_000))
    zero0 = est.state_memory(shape, plan, est.Setting(0, False, False))
    # bf16 weights and gradients, fp32 master copy, fp32 gradient copy at the step, Adam moments: 20 bytes
    assert zero0["weights"] + zero0["optimizer"] == pytest.approx(2 * P + 16 * P)
    assert zero0["gradients"] == 2 * (P - shape.unused_trainable)
    zero3 = est.state_memory(shape, plan, est.Setting(3, False, False))
    assert zero3["weights"] == 2 * P / 8 and zero3["gradients"] == 2 * P / 8
    assert zero3["optimizer"] == pytest.approx(16 * P / 8)
    offload = est.state_memory(shape, plan, est.Setting(3, False, True))
    assert offload["optimizer"] == 0 and offload["host_per_node"] == pytest.approx(16 * P / 8 * 8)
    live = est.state_memory(shape, replace(plan, live_reference=True), est.Setting(2, False, False))
    assert live["reference"] == 2 * P  # a full frozen copy unless ZeRO-3 shards it
    assert live["buffers"] == 2 * 500_000_000  # one reduce bucket (overlap_comm off)


def test_activations_by_hand_for_one_7b_layer():
    shape = released_counts("llava", est.llava15_config("7b"))
    plan = est.Plan(weight_bytes=2)
    # bf16, full fine-tuning: 2 norms x (4 + 2 x 2) x 4096 + 4 x 2 x 4096 + 4 x 2 x 11008 + 4 x 32 per token
    per_token = 2 * 8 * 4096 + 8 * 4096 + 8 * 11008 + 128
    assert est.decoder_layer_bytes(1000, shape, plan) == 1000 * per_token
    pair = est.PairShape(prompt=60, chosen=100, rejected=120)
    rows = est.decoder_rows(shape, plan, pair)
    assert (rows.rows, rows.length, rows.answers) == (1, 576 + 60 + 100 + 120, 220)
    saved, _ = est.activation_memory(shape, plan, rows, checkpointing=False)
    saved_ckpt, transient = est.activation_memory(shape, plan, rows, checkpointing=True)
    assert saved > 32 * est.decoder_layer_bytes(rows.tokens, shape, plan)  # + vision tower, head, mask
    assert saved_ckpt < saved / 10  # a layer input each: 2 x 4096 bytes per token and layer
    assert transient >= est.decoder_layer_bytes(rows.tokens, shape, plan)  # one layer recomputed


def test_flops_follow_6n_per_token_plus_attention():
    shape = released_counts("llava", est.llava15_config("7b"))
    plan = est.Plan()
    pair = est.PairShape(prompt=60, chosen=100, rejected=100)
    flops = est.pair_flops(shape, plan, pair, checkpointing=False)
    decoder_tokens = 576 + 60 + 200
    dense = 6 * shape.parts["decoder_layers"].params * decoder_tokens
    dense += 6 * shape.parts["vision_tower"].params * 577 + 6 * shape.parts["projector"].params * 576
    dense += 6 * shape.parts["lm_head"].params * 200
    pairs = est.attended_pairs(636, 100, 100, shared_prompt=True)
    assert pairs == 636 * 637 // 2 + 2 * (100 * 636 + 100 * 101 // 2)
    attention = 3 * 4 * 4096 * 32 * pairs + 3 * 4 * 1024 * 24 * 577**2
    assert flops.model == pytest.approx(dense + attention, rel=1e-12)
    assert flops.recompute == 0 and flops.reference == 0
    ckpt = est.pair_flops(shape, plan, pair, checkpointing=True)
    # the second forward of the checkpointed layers: everything but the projector and the LM head
    unchecked = 2 * shape.parts["projector"].params * 576 + 2 * shape.parts["lm_head"].params * 200
    assert ckpt.recompute == pytest.approx(flops.forward - unchecked, rel=1e-12)
    hardware = est.Hardware(gpus_per_node=8, mfu=0.5, peak_tflops=1000)
    assert hardware.hours(8 * 0.5 * 1000e12 * 3600) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------
# Measured on CPU: the tiny presets and the bench-size model of experiments/bench_step.py
# ------------------------------------------------------------------------------------------------
def bench_config(tmp_path):
    """experiments/bench_step.py's model (preset bench, vocabulary 8192) and data (4 pairs per micro-batch)."""
    from ddpo.benchmarking import step_config, write_step_fixture

    write_step_fixture(tmp_path)
    return step_config(tmp_path, "grouped", 2, 1, tmp_path / "run")


def config_of(name: str, tmp_path, overrides=()):
    if name == "bench":
        return bench_config(tmp_path)
    return load_config(REPO / "configs" / name, list(overrides))


def model_and_batch(cfg, bf16: bool = False, checkpointing: bool = False):
    """The model and the first micro-batch as the trainer builds them (random init, float32 on CPU)."""
    from ddpo.data.collator import PairCollator, PairDataset, PairEncoder
    from ddpo.data.formats import load_records
    from ddpo.data.tokenizer import build_word_tokenizer
    from ddpo.models.build import build_model, load_config_tokenizer

    records = load_records(cfg.data, seed=cfg.train.seed)
    if cfg.model.tokenizer:
        tokenizer = load_config_tokenizer(cfg.model)
    else:
        tokenizer = build_word_tokenizer(t for r in records for t in r.texts())
    torch.manual_seed(0)
    model_cfg = replace(cfg.model, gradient_checkpointing=checkpointing, dtype="float32")
    model = build_model(model_cfg, tokenizer=tokenizer)
    if bf16:
        model = model.to(torch.bfloat16)
    encoder = PairEncoder.from_config(cfg.data, model.tokenizer, model.image_placeholder)
    dataset = PairDataset(records, encoder)
    collate = PairCollator(model.tokenizer.pad_token_id, cfg.data.padding_side, model.preprocess_images)
    return model.train(), collate([dataset[i] for i in range(cfg.train.micro_batch_size)])


def saved_by_autograd(model, batch) -> int:
    """Bytes of the unique storages autograd saves during one training forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(batch)
    return sum(saved.values())


def live_after_forward(model, batch) -> int:
    """MemTracker's live bytes after one training forward minus before it (all parameters must be trainable:
    MemTracker hooks every parameter's gradient)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model, batch.input_ids, batch.pixel_values, batch.labels, batch.attention_mask)
    with tracker:
        before = tracker.get_tracker_snapshot("current")[torch.device("cpu")]["Total"]
        outputs = model(batch)
        after = tracker.get_tracker_snapshot("current")[torch.device("cpu")]["Total"]
        del outputs
    return after - before


ACTIVATION_CASES = [
    ("tiny.yaml", (), False, False),
    ("tiny.yaml", (), True, False),
    ("tiny.yaml", (), False, True),  # bf16: the RMSNorms' float32 copies
    ("tiny.yaml", ("--model.shared_prompt", "false"), False, False),
    ("tiny.yaml", ("--model.lora_r", "8"), False, False),
    ("tiny.yaml", ("--model.freeze_llm", "true"), False, False),
    ("tiny_muffin.yaml", (), False, False),
    ("tiny_muffin.yaml", (), True, False),
    ("tiny_omnilmm.yaml", (), False, False),
    ("tiny_omnilmm.yaml", (), True, False),
    ("bench", (), False, False),
    ("bench", (), True, False),
]


@pytest.mark.parametrize("name, overrides, checkpointing, bf16", ACTIVATION_CASES)
def test_saved_activations_within_25_percent(name, overrides, checkpointing, bf16, tmp_path):
    cfg = config_of(name, tmp_path, overrides)
    model, batch = model_and_batch(cfg, bf16=bf16, checkpointing=checkpointing)
    measured = live_after_forward(model, batch) if checkpointing else saved_by_autograd(model, batch)
    plan = est.Plan(weight_bytes=2 if bf16 else 4, shared_prompt=model.shared_prompt, device="cpu")
    predicted, _ = est.activation_memory(est.model_shape(model), plan, est.batch_rows(model, batch), checkpointing)
    print(
        f"{name} {overrides} checkpointing={checkpointing} bf16={bf16}: predicted {predicted:.0f} measured {measured}"
    )
    assert measured == pytest.approx(predicted, rel=TOLERANCE)


def live_storages() -> dict[int, int]:
    """data_ptr -> bytes of every CPU tensor storage the garbage collector can reach."""
    found: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance() on torch.distributed's deprecated objects warns
        warnings.simplefilter("ignore")
        objects = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for obj in objects:
        if obj.device.type != "cpu":
            continue
        try:
            storage = obj.untyped_storage()
            pointer = storage.data_ptr()
        except (RuntimeError, NotImplementedError):  # no storage (sparse, wrappers), or fake (left by other tests)
            continue
        if pointer:
            found[pointer] = max(found.get(pointer, 0), storage.nbytes())
    return found


def state_census(cfg, stage: int, bf16: bool, tmp_path) -> tuple[int, est.ModelShape]:
    """Bytes of the tensors created since before the model was built, counted inside the second optimizer step
    of the trainer's DeepSpeed engine (AdamW's moments exist from the first)."""
    import deepspeed

    from ddpo import distributed
    from ddpo.loss import DDPOLoss
    from ddpo.trainer import deepspeed_config

    # Small buckets: their size is DeepSpeed's setting, not the model's (the GPU check measures them).
    zero = dict(stage=stage, reduce_bucket_size=100_000, stage3_prefetch_bucket_size=100_000, overlap_comm=False)
    (tmp_path / "zero.json").write_text(json.dumps({"zero_optimization": zero}))
    cfg = replace(cfg, deepspeed=replace(cfg.deepspeed, config=str(tmp_path / "zero.json")))
    distributed.init_distributed()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        keep = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]  # their addresses cannot be reused
    before = set(live_storages())
    model, batch = model_and_batch(cfg, bf16=bf16)
    shape = est.model_shape(model)  # before ZeRO-3 partitions the parameters
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6, fused=True)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, bf16))
    if stage == 0:
        engine.enable_backward_allreduce = False  # as the trainer does in a world of one
    census = []
    step = optimizer.step

    def counted_step(*args, **kwargs):
        census.append(sum(size for ptr, size in live_storages().items() if ptr not in before))
        return step(*args, **kwargs)

    optimizer.step = counted_step
    loss_fn, batch = DDPOLoss(cfg.loss), batch.to(engine.device)
    zeros = torch.zeros(batch.num_pairs, batch.input_ids.shape[1] - 1)
    for _ in range(2):
        chosen, rejected = engine(batch)
        loss, _ = loss_fn(chosen.float(), rejected.float(), zeros, zeros, batch.answer_mask, batch.corrected)
        engine.backward(loss)
        engine.step()
    engine.destroy()
    del keep
    return census[-1], shape


STATE_CASES = [("tiny.yaml", 0, False), ("tiny.yaml", 2, True), ("tiny.yaml", 3, True), ("bench", 0, False)]


@pytest.fixture
def world_of_one(monkeypatch):
    """The variables ddpo.distributed sets for a world of one, restored afterwards: a later test's subprocess
    must not inherit this process group's MASTER_PORT (it would find the port taken)."""
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if key in os.environ:
            monkeypatch.setenv(key, os.environ[key])
        else:
            monkeypatch.setenv(key, "unset")  # recorded as absent, so the teardown deletes it
            monkeypatch.delenv(key)


@pytest.mark.slow
@pytest.mark.parametrize("name, stage, bf16", STATE_CASES)
def test_state_memory_within_25_percent(name, stage, bf16, tmp_path, world_of_one):
    cfg = config_of(name, tmp_path)
    measured, shape = state_census(cfg, stage, bf16, tmp_path)
    plan = est.Plan(weight_bytes=2 if bf16 else 4, device="cpu")
    state = est.state_memory(shape, plan, est.Setting(stage, False, False))
    predicted = state["weights"] + state["gradients"] + state["optimizer"]
    print(f"{name} ZeRO-{stage} bf16={bf16}: predicted {predicted:.0f} measured {measured}")
    assert measured == pytest.approx(predicted, rel=TOLERANCE)


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------
def run_estimate(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = est.main(list(argv))
    return code, out.getvalue(), err.getvalue()


CONFIGS = sorted(p.relative_to(REPO) for p in (REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_estimate_runs_offline_on_every_config(config, monkeypatch):
    monkeypatch.chdir(REPO)
    code, out, err = run_estimate(str(config))
    assert code == 0, err
    assert "parameters:" in out and "settings" in out and "FLOP per pair" in out
    assert out.count("\nconfig ->  ZeRO-") == 1  # the config's own setting is a row of the table
    assert out.count("\n           ZeRO-") == len(est.SETTINGS) - 1
    assert "suggest    " in out


def test_rlaifv_7b_on_80_and_40_gb(monkeypatch):
    monkeypatch.chdir(REPO)
    code, out, _ = run_estimate("configs/rlaifv/llava15_7b.yaml", "--gpus", "8", "--gpu-memory", "80")
    assert code == 0 and "7,063,427,072 parameters" in out and "83,132 pairs per epoch" in out
    row = next(line for line in out.splitlines() if line.startswith("config ->"))
    assert row.startswith("config ->  ZeRO-2, checkpointing ") and row.endswith("yes")  # the published recipe fits
    code, out40, _ = run_estimate("configs/rlaifv/llava15_7b.yaml", "--gpu-memory", "40")
    zero0 = next(line for line in out40.splitlines() if line.strip().startswith("ZeRO-0, no checkpointing "))
    assert zero0.endswith("no")  # 20 bytes per parameter: 141 GB


def test_13b_through_an_override(monkeypatch):
    monkeypatch.chdir(REPO)
    code, out, _ = run_estimate(
        "configs/rlaifv/llava15_7b.yaml", "--model.name_or_path", "llava-hf/llava-1.5-13b-hf", "--gpus=8"
    )
    assert code == 0 and f"{13_350_839_296 + 2 * 64 * 5120:,} parameters" in out


def test_flags_change_the_time(monkeypatch):
    monkeypatch.chdir(REPO)
    _, slow, _ = run_estimate("configs/rlaifv/llava15_7b.yaml", "--mfu", "0.2", "--pairs", "1000000")
    _, fast, _ = run_estimate("configs/rlaifv/llava15_7b.yaml", "--mfu", "0.4", "--pairs", "1000000")

    def hours(text: str) -> float:
        line = next(line for line in text.splitlines() if "pairs per epoch" in line)
        return float(line.split(": ")[1].split(" h")[0])

    assert "1,000,000 pairs per epoch (--pairs)" in fast
    assert hours(slow) == pytest.approx(2 * hours(fast), rel=0.05)


def test_local_checkpoints_build_from_their_config_json(tmp_path):
    from ddpo.models.replicas import muffin_original_config, write_llava_hf_checkpoint

    llava = write_llava_hf_checkpoint(tmp_path / "llava")  # weights, tokenizer, processor: 2 layers of 32
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["--model.name_or_path", str(llava)])
    result = est.estimate(cfg, est.Hardware(gpus_per_node=1))
    real = est.model_shape(est.meta_model("llava", result.built.model.hf_model.config, cfg.model))
    assert result.shape.total == real.total and result.shape.decoder.layers == 2
    assert result.tokens.note.startswith("measured on 64 pairs")  # its tokenizer read the (synthetic) data
    muffin = tmp_path / "muffin"
    muffin.mkdir()  # a released-layout config.json alone is enough: no weight is read
    (muffin / "config.json").write_text(json.dumps(muffin_original_config(404, hidden=64, layers=3, heads=4)))
    cfg = load_config(REPO / "configs" / "tiny_muffin.yaml", ["--model.muffin_checkpoint", str(muffin)])
    shape = est.estimate(cfg, est.Hardware()).shape
    assert shape.decoder.layers == 3 and shape.decoder.hidden == 64 and shape.decoder.vocab == 404
    assert shape.tower.width == 1024 and shape.tower.layers == 24  # beit3_large_patch16_448


def test_errors_name_the_fix(monkeypatch):
    monkeypatch.chdir(REPO)
    code, _, err = run_estimate("configs/tiny.yaml", "--gpus", "0")
    assert code == 2 and "--gpus must be > 0" in err
    code, _, err = run_estimate("configs/tiny.yaml", "--loss.nope", "1")
    assert code == 2 and "unknown config key 'loss.nope'" in err
    with pytest.raises(est.ConfigError, match="download its config.json"):
        run_estimate("configs/rlaifv/llava15_7b.yaml", "--model.name_or_path", "someone/unknown-model")


def test_the_command_is_registered(capsys):
    from ddpo import commands

    assert "estimate" in commands.COMMANDS
    with pytest.raises(SystemExit) as exit_:
        commands.main(["estimate", "--help"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("usage: ddpo estimate ")
