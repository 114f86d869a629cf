"""Muffin / BEiT-3 specifics: the original checkpoint's parameter names load onto ours, multiway split, positions."""

import pytest
import torch
from safetensors.torch import save_file

from ddpo.models.base import scatter_image_features
from ddpo.models.beit3 import POSITION_OFFSET, Multiway
from ddpo.models.build import build_model
from ddpo.models.config import ModelConfig
from tests.models.helpers import pair_batch, tiny_model


def published_muffin_state_dict(model) -> dict[str, torch.Tensor]:
    """A random state dict under the names of an RLHF-V / Muffin checkpoint, enumerated from the
    published structure (Beit3LlavaLlamaForCausalLM + torchscale BEiT-3), not from our module tree."""
    cfg = model.hf_model.config
    text, D, F = cfg.text_config, cfg.vision_hidden_size, cfg.vision_ffn_dim
    P = (cfg.vision_image_size // cfg.vision_patch_size) ** 2
    g = torch.Generator().manual_seed(7)
    shapes = {
        "lm_head.weight": (text.vocab_size, text.hidden_size),
        "model.embed_tokens.weight": (text.vocab_size, text.hidden_size),
        "model.norm.weight": (text.hidden_size,),
        "model.query": (cfg.num_query, D),
        "model.mm_projector.weight": (text.hidden_size, D),
        "model.mm_projector.bias": (text.hidden_size,),
        "model.vision_tower.beit3.vision_embed.proj.weight": (D, 3, cfg.vision_patch_size, cfg.vision_patch_size),
        "model.vision_tower.beit3.vision_embed.proj.bias": (D,),
        "model.vision_tower.beit3.vision_embed.cls_token": (1, 1, D),
        "model.vision_tower.beit3.encoder.embed_positions.A.weight": (P + 1 + 2, D),
        "model.vision_tower.beit3.encoder.embed_positions.B.weight": (cfg.vision_max_source_positions, D),
    }
    for expert in "AB":
        shapes[f"model.vision_tower.beit3.encoder.layer_norm.{expert}.weight"] = (D,)
        shapes[f"model.vision_tower.beit3.encoder.layer_norm.{expert}.bias"] = (D,)
    head = text.hidden_size // text.num_attention_heads
    for i in range(text.num_hidden_layers):
        layer = f"model.layers.{i}"
        for proj in "qo":
            shapes[f"{layer}.self_attn.{proj}_proj.weight"] = (text.hidden_size, text.hidden_size)
        for proj in "kv":
            shapes[f"{layer}.self_attn.{proj}_proj.weight"] = (text.num_key_value_heads * head, text.hidden_size)
        shapes[f"{layer}.mlp.gate_proj.weight"] = shapes[f"{layer}.mlp.up_proj.weight"] = (
            text.intermediate_size,
            text.hidden_size,
        )
        shapes[f"{layer}.mlp.down_proj.weight"] = (text.hidden_size, text.intermediate_size)
        shapes[f"{layer}.input_layernorm.weight"] = shapes[f"{layer}.post_attention_layernorm.weight"] = (
            text.hidden_size,
        )
    for i in range(cfg.vision_num_layers):
        layer = f"model.vision_tower.beit3.encoder.layers.{i}"
        for expert in "AB":
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                shapes[f"{layer}.self_attn.{proj}.{expert}.weight"] = (D, D)
                shapes[f"{layer}.self_attn.{proj}.{expert}.bias"] = (D,)
            for norm in ("self_attn.inner_attn_ln", "self_attn_layer_norm", "final_layer_norm"):
                shapes[f"{layer}.{norm}.{expert}.weight"] = shapes[f"{layer}.{norm}.{expert}.bias"] = (D,)
            shapes[f"{layer}.ffn.{expert}.fc1.weight"], shapes[f"{layer}.ffn.{expert}.fc1.bias"] = (F, D), (F,)
            shapes[f"{layer}.ffn.{expert}.fc2.weight"], shapes[f"{layer}.ffn.{expert}.fc2.bias"] = (D, F), (D,)
            shapes[f"{layer}.ffn.{expert}.ffn_layernorm.weight"] = shapes[
                f"{layer}.ffn.{expert}.ffn_layernorm.bias"
            ] = (F,)
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


def test_published_muffin_checkpoint_loads_every_parameter(word_tokenizer, tmp_path):
    reference = tiny_model("muffin", word_tokenizer)
    state = published_muffin_state_dict(reference)
    assert len(state) == sum(1 for _ in reference.hf_model.state_dict())  # same count, other names
    # Keys the original training deletes / old LLaMA buffers: present in some checkpoints, ignored.
    extra = {
        "model.vision_tower.beit3.text_embed.weight": torch.zeros(5, 64),
        "model.vision_tower.beit3.vision_embed.mask_token": torch.zeros(1, 1, 64),
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(8),
    }
    save_file({**state, **extra}, tmp_path / "muffin.safetensors")

    model = build_model(
        ModelConfig(arch="muffin", preset="tiny", muffin_checkpoint=str(tmp_path / "muffin.safetensors")),
        tokenizer=word_tokenizer,
    )
    ours = dict(model.hf_model.named_parameters())
    assert torch.equal(
        ours["model.language_model.layers.1.mlp.down_proj.weight"], state["model.layers.1.mlp.down_proj.weight"]
    )
    assert torch.equal(ours["model.language_model.embed_tokens.weight"], state["model.embed_tokens.weight"])
    assert torch.equal(ours["model.query"], state["model.query"])
    qb = "model.vision_tower.beit3.encoder.layers.1.self_attn.q_proj.B.weight"
    assert torch.equal(ours[qb], state[qb])
    # Every parameter came from the checkpoint: the multiset of values is the checkpoint's.
    loaded = sorted(float(p.detach().sum()) for p in ours.values())
    assert loaded == pytest.approx(sorted(float(t.sum()) for t in state.values()), rel=1e-6)


@pytest.mark.parametrize("change", ["missing", "unexpected", "shape"])
def test_mismatched_muffin_checkpoint_is_refused(word_tokenizer, tmp_path, change):
    state = published_muffin_state_dict(tiny_model("muffin", word_tokenizer))
    if change == "missing":
        del state["model.vision_tower.beit3.encoder.layers.0.ffn.B.fc1.bias"]
    elif change == "unexpected":
        state["model.vision_tower.beit3.encoder.layers.9.ffn.B.fc1.bias"] = torch.zeros(3)
    else:
        state["model.query"] = torch.zeros(64, 64)
    save_file(state, tmp_path / "muffin.safetensors")
    cfg = ModelConfig(arch="muffin", preset="tiny", muffin_checkpoint=str(tmp_path / "muffin.safetensors"))
    with pytest.raises(
        ValueError,
        match={
            "missing": "1 missing.*ffn.B.fc1.bias",
            "unexpected": "1 unexpected.*layers.9",
            "shape": "model.query.*shape",
        }[change],
    ):
        build_model(cfg, tokenizer=word_tokenizer)


def test_multiway_routes_tokens_before_split_to_A_and_the_rest_to_B():
    way = Multiway(torch.nn.Linear(3, 2), torch.nn.Linear(3, 2))
    x = torch.randn(2, 5, 3)
    out = way(x, 3)
    torch.testing.assert_close(out[:, :3], way.A(x[:, :3]))
    torch.testing.assert_close(out[:, 3:], way.B(x[:, 3:]))
    torch.testing.assert_close(way(x, 5), way.A(x))
    torch.testing.assert_close(way(x, 0), way.B(x))


def test_beit3_positions_number_each_part_from_two(word_tokenizer):
    encoder = tiny_model("muffin", word_tokenizer).hf_model.model.vision_tower.beit3.encoder
    positions = encoder.positions(length=17 + 8, split=17, device=torch.device("cpu"))[0]
    torch.testing.assert_close(positions[:17], encoder.embed_positions.A.weight[POSITION_OFFSET : POSITION_OFFSET + 17])
    torch.testing.assert_close(positions[17:], encoder.embed_positions.B.weight[POSITION_OFFSET : POSITION_OFFSET + 8])


def test_muffin_image_features_come_from_the_queries_and_see_the_image(word_tokenizer):
    model = tiny_model("muffin", word_tokenizer)
    assert model.image_placeholder == "<im_start>" + "<im_patch>" * 8 + "<im_end>"
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.encode_images(pixels)
        assert features.shape == (2, 8, 64)
        torch.testing.assert_close(features[1], model.encode_images(pixels[1:])[0])  # images independent in a batch
        assert not torch.allclose(features[0], features[1])  # queries attend to the patches
    # Only the <im_patch> positions take the features; <im_start>/<im_end> and text keep their embeddings.
    batch = pair_batch(model, word_tokenizer, [2], [3, 3])
    ids = batch.input_ids[:1]
    with torch.no_grad():
        embeds = model.hf_model.get_input_embeddings()(ids)
        features = model.encode_images(batch.pixel_values)
        spliced = scatter_image_features(embeds, ids, model.image_token_id, features)
    patch = ids[0] == model.image_token_id
    assert patch.sum() == 8 and (ids[0] == word_tokenizer.convert_tokens_to_ids("<im_start>")).sum() == 1
    torch.testing.assert_close(spliced[0, patch], features[0])
    torch.testing.assert_close(spliced[0, ~patch], embeds[0, ~patch])
