"""Gradient parameters: layer positions (per stack, T5 blocks) and gradients inside filtered values.

mergekit 0.1.5 (plan.py, architecture/*) gives a tensor in layer i of a stack of n layers the
position t = i / (n - 1) (t = 1 when n = 1), counting layers within each stack (module) separately:
a T5 encoder's and decoder's blocks, a VLM's vision tower and language model; tensors outside
numbered layers (embeddings, final norms) take t = 0, the gradient's first value.
"""

from __future__ import annotations

import pytest
from conftest import basic_recipe, write_recipe

from tadrop_cli.errors import BadInput
from tadrop_cli.parameter_values import value_for_tensor
from tadrop_cli.recipe import parse_recipe
from tadrop_cli.tensor_names import layer_positions


def t5_names(encoder: int, decoder: int) -> list[str]:
    names = ["shared.weight", "encoder.final_layer_norm.weight", "decoder.final_layer_norm.weight"]
    for i in range(encoder):
        names += [
            f"encoder.block.{i}.layer.0.SelfAttention.q.weight",
            f"encoder.block.{i}.layer.1.DenseReluDense.wi.weight",
        ]
    for i in range(decoder):
        names += [
            f"decoder.block.{i}.layer.0.SelfAttention.q.weight",
            f"decoder.block.{i}.layer.1.EncDecAttention.q.weight",
            f"decoder.block.{i}.layer.2.DenseReluDense.wi.weight",
        ]
    return names


def test_t5_position_comes_from_the_block_not_the_sub_layer():
    positions = layer_positions(t5_names(5, 5))
    assert positions["encoder.block.3.layer.1.DenseReluDense.wi.weight"] == pytest.approx(3 / 4)
    assert positions["encoder.block.3.layer.0.SelfAttention.q.weight"] == pytest.approx(3 / 4)
    assert positions["decoder.block.0.layer.2.DenseReluDense.wi.weight"] == 0.0
    assert positions["decoder.block.4.layer.0.SelfAttention.q.weight"] == 1.0


def test_t5_encoder_and_decoder_are_positioned_each_in_its_own_stack():
    """mergekit's t5 architecture has an encoder module (num_hidden_layers) and a decoder module
    (num_decoder_layers): with 4 encoder and 2 decoder blocks, decoder block 1 is the decoder's last."""
    positions = layer_positions(t5_names(4, 2))
    assert positions["decoder.block.1.layer.0.SelfAttention.q.weight"] == 1.0
    assert positions["encoder.block.1.layer.0.SelfAttention.q.weight"] == pytest.approx(1 / 3)
    assert positions["encoder.block.3.layer.1.DenseReluDense.wi.weight"] == 1.0
    for outside in ("shared.weight", "encoder.final_layer_norm.weight", "decoder.final_layer_norm.weight"):
        assert positions[outside] is None


def test_vision_tower_and_language_model_are_positioned_each_in_its_own_stack():
    names = [f"vision_tower.vision_model.encoder.layers.{i}.mlp.fc1.weight" for i in range(3)]
    names += [f"language_model.model.layers.{i}.mlp.up_proj.weight" for i in range(5)]
    names += ["multi_modal_projector.linear_1.weight", "language_model.lm_head.weight"]
    positions = layer_positions(names)
    assert positions["vision_tower.vision_model.encoder.layers.2.mlp.fc1.weight"] == 1.0
    assert positions["vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight"] == 0.5
    assert positions["language_model.model.layers.2.mlp.up_proj.weight"] == 0.5
    assert positions["language_model.model.layers.4.mlp.up_proj.weight"] == 1.0
    assert positions["multi_modal_projector.linear_1.weight"] is None


def test_single_stack_positions_are_unchanged():
    names = [f"model.layers.{i}.mlp.weight" for i in range(5)] + ["model.embed_tokens.weight", "lm_head.weight"]
    positions = layer_positions(names)
    assert [positions[f"model.layers.{i}.mlp.weight"] for i in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert positions["model.embed_tokens.weight"] is None and positions["lm_head.weight"] is None


def test_a_one_layer_stack_is_at_position_one_as_in_mergekit():
    """mergekit: `t = idx / (num_layers - 1) if num_layers > 1 else 1`."""
    positions = layer_positions(["model.layers.0.mlp.weight", "model.embed.weight"])
    assert positions["model.layers.0.mlp.weight"] == 1.0
    assert value_for_tensor([0.2, 0.8], "model.layers.0.mlp.weight", 1.0) == pytest.approx(0.8)


def test_experts_inside_a_layer_take_the_layer_position():
    names = [f"model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight" for i in range(3) for e in range(8)]
    positions = layer_positions(names)
    assert positions["model.layers.1.block_sparse_moe.experts.7.w1.weight"] == 0.5


# ---------------------------------------------------------------- gradients inside filtered values

FILTERED_GRADIENTS = [
    {"filter": "attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
]


def test_a_filtered_value_may_be_a_gradient(tiny_models, tmp_path):
    recipe = basic_recipe(tiny_models, tmp_path / "out", method="task_arithmetic")
    recipe["parameters"] = {"lambda": FILTERED_GRADIENTS}
    parsed = parse_recipe(recipe)
    value = parsed.parameters["lambda"]
    assert value_for_tensor(value, "model.layers.0.attn.weight", 0.0) == 0
    assert value_for_tensor(value, "model.layers.1.attn.weight", 1 / 8) == pytest.approx(0.25)
    assert value_for_tensor(value, "model.layers.1.attn.weight", 0.625) == pytest.approx(0.5)  # 0.3 + 0.5 * 0.4
    assert value_for_tensor(value, "model.layers.3.mlp.weight", 0.75) == pytest.approx(0.3)
    assert value_for_tensor(value, "model.layers.3.mlp.weight", 1.0) == 0
    assert value_for_tensor(value, "model.embed.weight", None) == 0.5
    assert value_for_tensor(value, "model.layers.3.attn.weight", None) == 0  # outside layers: the first value


def test_a_single_filtered_mapping_is_a_value_as_in_mergekit(tiny_models, tmp_path):
    """mergekit's ParameterSetting takes one {filter, value} as well as a list of them."""
    recipe = basic_recipe(tiny_models, tmp_path / "out", method="task_arithmetic")
    recipe["parameters"] = {"lambda": {"filter": "mlp", "value": [0.5, 1.5]}}
    value = parse_recipe(recipe).parameters["lambda"]
    assert value_for_tensor(value, "model.layers.1.mlp.weight", 0.5) == pytest.approx(1.0)
    assert value_for_tensor(value, "model.layers.1.attn.weight", 0.5) is None  # no filter matches: the default


def test_filtered_gradients_merge_per_layer(tiny_models, tmp_path):
    """task_arithmetic with a per-filter lambda gradient gives base + lambda(tensor) * tau, with lambda
    interpolated by layer (layers 0 and 1: positions 0 and 1)."""
    import torch
    from safetensors.torch import load_file

    from tadrop_cli.run import MergeOptions, run_merge

    recipe = basic_recipe(tiny_models, tmp_path / "out", method="task_arithmetic")
    recipe["models"] = [{"model": str(tiny_models["ft0"])}]
    recipe["parameters"] = {"lambda": [{"filter": "attn", "value": [0.25, 0.75]}, {"value": 0.5}]}
    run_merge(parse_recipe(recipe), MergeOptions())
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    base = load_file(str(tiny_models["base"] / "model.safetensors"))
    ft = load_file(str(tiny_models["ft0"] / "model.safetensors"))
    for name, lam in [
        ("model.layers.0.attn.weight", 0.25),
        ("model.layers.1.attn.weight", 0.75),
        ("model.layers.1.mlp.weight", 0.5),
        ("model.embed.weight", 0.5),
    ]:
        expected = base[name].double() + lam * (ft[name].double() - base[name].double())
        torch.testing.assert_close(out[name].double(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "value,words",
    [
        ([{"filter": "mlp", "value": []}], ["parameters.lambda", "empty"]),
        ([{"filter": "mlp", "value": [0.5, "x"]}], ["parameters.lambda"]),
        ([{"filter": "mlp", "value": [0.5, 20]}], ["parameters.lambda", "between"]),
        ([{"filter": "mlp", "value": [0.5, True]}], ["parameters.lambda"]),
        ({"filter": "mlp"}, ["parameters.lambda"]),
    ],
)
def test_bad_filtered_gradients_are_one_line_errors(tiny_models, tmp_path, value, words):
    recipe = basic_recipe(tiny_models, tmp_path / "out", method="task_arithmetic")
    recipe["parameters"] = {"lambda": value}
    with pytest.raises(BadInput) as error:
        parse_recipe(recipe, "recipe.yaml")
    line = str(error.value)
    assert "\n" not in line and all(w in line for w in words), line


def test_a_filtered_gradient_in_a_yaml_file_merges(tiny_models, tmp_path):
    from conftest import run_cli

    recipe = basic_recipe(tiny_models, tmp_path / "out", method="ties")
    recipe["parameters"] = {"density": FILTERED_GRADIENTS}
    result = run_cli("merge", str(write_recipe(tmp_path, recipe)), "--quiet")
    assert result.returncode == 0, result.stderr


def test_a_t5_merge_takes_each_stacks_positions(tmp_path):
    """The engine's gradients use the per-stack positions: with 4 encoder and 2 decoder blocks, a
    lambda gradient [0, 1] is 1/3 at encoder block 1 and 1 at decoder block 1 (its last), whatever
    the sub-layer index (layer.2); names outside blocks take the first value."""
    import torch
    from conftest import write_checkpoint
    from safetensors.torch import load_file

    from tadrop_cli.run import MergeOptions, run_merge

    g = torch.Generator().manual_seed(0)
    base = {name: torch.randn(8, 8, generator=g) for name in t5_names(4, 2)}
    tuned = {name: tensor + torch.randn(8, 8, generator=g) for name, tensor in base.items()}
    paths = {"base": write_checkpoint(tmp_path / "base", base), "ft": write_checkpoint(tmp_path / "ft", tuned)}
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(paths["base"]),
        "models": [{"model": str(paths["ft"])}],
        "parameters": {"lambda": [0.0, 1.0]},
        "output": {"path": str(tmp_path / "out")},
    }
    run_merge(parse_recipe(recipe), MergeOptions())
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, lam in [
        ("encoder.block.1.layer.1.DenseReluDense.wi.weight", 1 / 3),
        ("encoder.block.3.layer.0.SelfAttention.q.weight", 1.0),
        ("decoder.block.1.layer.2.DenseReluDense.wi.weight", 1.0),
        ("decoder.block.0.layer.1.EncDecAttention.q.weight", 0.0),
        ("shared.weight", 0.0),
    ]:
        expected = base[name].double() + lam * (tuned[name].double() - base[name].double())
        torch.testing.assert_close(out[name].double(), expected, atol=1e-6, rtol=0)
