"""Bad input: every case ends with one line naming the culprit, exit code 2, no traceback,
and nothing created on disk. Policies for missing tensors and shape mismatches.

Most cases run the CLI in-process (typer's CliRunner: same code path as `tadrop`, without
the ~2 s interpreter start); a few run the real `python -m tadrop_cli` to check the process
itself (exit status, stderr, no traceback).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from conftest import basic_recipe, fine_tune, run_cli, tiny_state, write_checkpoint, write_recipe
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tadrop_cli.cli import app
from tadrop_cli.methods import METHODS

# ---------------------------------------------------------------- helpers


def invoke(*args: object, env: dict | None = None):
    """`tadrop ARGS` in this process; returns click's Result (exit_code, stdout, stderr, exception)."""
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root (hidden ones included) with a digest of its bytes or its link target."""
    state = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            state[rel] = "link:" + str(path.readlink())
        elif path.is_file():
            state[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            state[rel] = "dir"
    return state


def assert_clean_bad_input(result, *culprits: str, before: dict, root: Path) -> str:
    """Exit 2, one line on stderr naming every culprit, no traceback, nothing on disk changed."""
    described = (
        f"exit {result.exit_code}\nstdout: {result.stdout!r}\nstderr: {result.stderr!r}\n"
        f"exception: {result.exception!r}"
    )
    assert result.exit_code == 2, described
    assert result.exception is None or isinstance(result.exception, SystemExit), described
    assert "Traceback" not in result.output, described
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line error\n{described}"
    line = lines[0]
    assert line.startswith("error:"), described
    for culprit in culprits:
        assert culprit in line, f"{culprit!r} not named in the error\n{described}"
    assert result.stdout.strip() == "", described
    assert snapshot(root) == before, f"the failed run changed files on disk\n{described}"
    return line


def bad(root: Path, *args: object, culprits: tuple[str, ...] = ()) -> str:
    """Run `tadrop ARGS`, expecting a clean bad-input failure that leaves `root` unchanged."""
    before = snapshot(root)
    return assert_clean_bad_input(invoke(*args), *culprits, before=before, root=root)


def merge_bad(tmp_path: Path, recipe: dict, *culprits: str, extra: tuple = ()) -> str:
    path = write_recipe(tmp_path, recipe)
    return bad(tmp_path, "merge", path, *extra, culprits=(*culprits,))


def ok(*args: object) -> dict:
    result = invoke(*args, "--json")
    assert result.exit_code == 0, f"stdout: {result.stdout}\nstderr: {result.stderr}\n{result.exception!r}"
    return json.loads(result.stdout)


@pytest.fixture
def recipe(tiny_models, tmp_path) -> dict:
    return basic_recipe(tiny_models, tmp_path / "merged")


# ---------------------------------------------------------------- the recipe file


def test_recipe_not_found(tmp_path):
    bad(tmp_path, "merge", tmp_path / "nope.yaml", culprits=("nope.yaml", "not found"))


def test_recipe_is_a_folder(tmp_path):
    (tmp_path / "folder.yaml").mkdir()
    bad(tmp_path, "merge", tmp_path / "folder.yaml", culprits=("folder.yaml",))


@pytest.mark.parametrize(
    "text",
    [
        "merge_method: ties\nmodels: [\n  - {model: a\n",
        "merge_method: ties\n  models:\n - bad indent\n",
        "merge_method: 'unterminated\n",
        "\tmerge_method: ties\n",
        "a: b: c\n",
    ],
    ids=["unclosed-flow", "indent", "quote", "tab", "double-colon"],
)
def test_recipe_not_yaml(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    bad(tmp_path, "merge", path, culprits=("recipe.yaml", "YAML"))


def test_recipe_binary(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"\xff\xfe\x00\x81binary\x00\x9c")
    bad(tmp_path, "merge", path, culprits=("recipe.yaml",))


@pytest.mark.parametrize(
    "text",
    ["", "# only a comment\n", "- ties\n- dare\n", "just a string\n", "42\n", "~\n", "[1, 2]\n"],
    ids=["empty", "comment", "list", "string", "number", "null", "flow-list"],
)
def test_recipe_not_a_mapping(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    bad(tmp_path, "merge", path, culprits=("recipe.yaml", "mapping"))


# ---------------------------------------------------------------- keys, types, ranges, methods


def _set(recipe: dict, dotted: str, value) -> dict:
    """Set recipe[a][b]... = value; `models.0.parameters` addresses a list element."""
    node = recipe
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return recipe


UNKNOWN_KEYS = [
    # (where, wrong key, value, words the message must hold: the key, and the suggestion)
    ("", "merge_methd", "ties", ("merge_methd", "'merge_method'")),
    ("", "polices", {"missing_tensor": "error"}, ("polices", "'policies'")),
    ("", "base_modle", "x", ("base_modle", "'base_model'")),
    ("output.", "shard_sise", 1000, ("shard_sise", "'shard_size'")),
    ("output.", "dtyp", "float32", ("dtyp", "'dtype'")),
    ("tadrop.", "strenght", 0.3, ("strenght", "'strength'")),
    ("policies.", "missing_tensors", "skip_model", ("missing_tensors", "'missing_tensor'")),
    ("policies.", "shape_missmatch", "skip_model", ("shape_missmatch", "'shape_mismatch'")),
    ("models.0.", "paramters", {"weight": 1.0}, ("paramters", "'parameters'")),
    ("models.0.parameters.", "densty", 0.5, ("densty", "'density'")),
    ("parameters.", "lamda", 0.5, ("lamda", "'lambda'")),
    ("parameters.", "normalise", True, ("normalise", "'normalize'")),
]


@pytest.mark.parametrize("where,key,value,words", UNKNOWN_KEYS, ids=[w + k for w, k, _, _ in UNKNOWN_KEYS])
def test_unknown_key_suggests_the_closest(tmp_path, recipe, where, key, value, words):
    if key == "merge_methd":
        recipe.pop("merge_method")
    if where.startswith("tadrop"):
        recipe["tadrop"] = {}
    merge_bad(tmp_path, _set(recipe, where + key, value), "recipe.yaml", *words)


WRONG_TYPES = [
    ("models", "ft0", "models"),
    ("models", [], "models"),
    ("models.0", "just-a-path", "models[0]"),
    ("models.0.model", 5, "models[0].model"),
    ("models.0.parameters", [0.5], "models[0].parameters"),
    ("merge_method", 3, "merge_method"),
    ("merge_method", ["ties"], "merge_method"),
    ("base_model", 5, "base_model"),
    ("seed", "abc", "seed"),
    ("seed", 1.5, "seed"),
    ("parameters.weight", "heavy", "weight"),
    ("models.1.parameters.weight", {"a": 1}, "weight"),
    ("parameters.normalize", "maybe", "normalize"),
    ("parameters.rescale", 3, "rescale"),
    ("parameters.density", [{"filter": "mlp", "value": "dense"}], "density"),
    ("tadrop", True, "tadrop"),
    ("tadrop.strength", "high", "tadrop.strength"),
    ("tadrop.statistic", "median", "tadrop.statistic"),
    ("tadrop.exclude", "*norm*", "tadrop.exclude"),
    ("output", "out/", "output"),
    ("output.shard_size", "lots", "shard_size"),
    ("output.dtype", "float8", "output.dtype"),
    ("policies.missing_tensor", "ignore", "missing_tensor"),
    ("policies.shape_mismatch", 1, "shape_mismatch"),
    ("policies", "error", "policies"),
    ("device", "tpu", "device"),
]


@pytest.mark.parametrize("key,value,culprit", WRONG_TYPES, ids=[f"{k}={v!r}" for k, v, _ in WRONG_TYPES])
def test_wrong_type(tmp_path, recipe, key, value, culprit):
    merge_bad(tmp_path, _set(recipe, key, value), "recipe.yaml", culprit)


def test_required_key_missing(tmp_path, recipe):
    recipe.pop("merge_method")
    merge_bad(tmp_path, recipe, "merge_method")


OUT_OF_RANGE = [
    ("models.0.parameters.density", 1.5, "density"),
    ("models.0.parameters.density", -0.1, "density"),
    ("models.0.parameters.density", float("nan"), "density"),
    ("parameters.density", float("inf"), "density"),
    ("parameters.density", [0.5, 1.5], "density"),
    ("parameters.density", [{"filter": "mlp", "value": 2.0}, {"value": 0.5}], "density"),
    ("parameters.lambda", 100.0, "lambda"),
    ("parameters.lambda", -11, "lambda"),
    ("tadrop.strength", 1.5, "strength"),
    ("tadrop.strength", -1.5, "strength"),
    ("tadrop.min_ratio", -0.1, "min_ratio"),
    ("tadrop.max_ratio", 1.2, "max_ratio"),
    ("tadrop.topmass_fraction", 0.0, "topmass_fraction"),
    ("tadrop.min_numel", -1, "min_numel"),
    ("models.0.tadrop", {"strength": 3}, "strength"),
    ("models.0.tadrop", {"max_ratio": -1}, "max_ratio"),
    ("tadrop.overrides", [{"filter": "*mlp*", "strength": 2}], "strength"),
    ("tadrop.overrides", [{"filter": "*mlp*", "min_ratio": 1.01}], "min_ratio"),
    ("seed", -1, "seed"),
    ("seed", 2**70, "seed"),
    ("output.shard_size", 0, "shard_size"),
    ("output.shard_size", "-5KB", "shard_size"),
]


@pytest.mark.parametrize("key,value,culprit", OUT_OF_RANGE, ids=[f"{k}={v!r}" for k, v, _ in OUT_OF_RANGE])
def test_out_of_range(tmp_path, recipe, key, value, culprit):
    if key.startswith("tadrop") or key.startswith("models.0.tadrop"):
        recipe.setdefault("tadrop", {})
    merge_bad(tmp_path, _set(recipe, key, value), "recipe.yaml", culprit)


@pytest.mark.parametrize("key", ["models.0.parameters.weight", "models.1.parameters.density", "parameters.lambda"])
def test_empty_parameter_list(tmp_path, recipe, key):
    """`weight: []` is neither a value nor a gradient: refused up front, not a crash mid-merge."""
    merge_bad(tmp_path, _set(recipe, key, []), key.rsplit(".", 1)[1])


def test_min_ratio_above_max_ratio(tmp_path, recipe):
    recipe["tadrop"] = {"min_ratio": 0.9, "max_ratio": 0.5}
    merge_bad(tmp_path, recipe, "min_ratio", "max_ratio")


def test_gamma_out_of_range(tmp_path, recipe):
    recipe["merge_method"] = "breadcrumbs"
    recipe["parameters"] = {"gamma": 1.5}
    merge_bad(tmp_path, recipe, "gamma")


@pytest.mark.parametrize(
    "name,suggestion",
    [("tiez", "ties"), ("TIES", None), ("dare-ties", "dare_ties"), ("slurp", "slerp"), ("frankenmerge", None)],
)
def test_unknown_method_lists_valid_ones(tmp_path, recipe, name, suggestion):
    recipe["merge_method"] = name
    line = merge_bad(tmp_path, recipe, name, *METHODS)
    if suggestion:
        assert f"'{suggestion}'" in line


# ---------------------------------------------------------------- the inputs


def test_base_path_missing(tmp_path, recipe):
    recipe["base_model"] = str(tmp_path / "no-such-base")
    merge_bad(tmp_path, recipe, "no-such-base")


def test_model_path_missing(tmp_path, recipe):
    recipe["models"][1]["model"] = str(tmp_path / "no-such-model")
    merge_bad(tmp_path, recipe, "no-such-model")


def test_model_listed_twice(tmp_path, recipe, tiny_models):
    recipe["models"].append({"model": str(tiny_models["ft0"])})
    merge_bad(tmp_path, recipe, str(tiny_models["ft0"]), "twice")


@pytest.mark.parametrize("spelling", ["trailing-slash", "dot-segment", "symlink"])
def test_model_listed_twice_spelled_differently(tmp_path, recipe, tiny_models, spelling):
    """The same folder under another spelling is still the same model listed twice."""
    ft0 = tiny_models["ft0"]
    if spelling == "trailing-slash":
        other = str(ft0) + "/"
    elif spelling == "dot-segment":
        other = f"{ft0.parent}/./{ft0.name}"
    else:
        (tmp_path / "alias").symlink_to(ft0, target_is_directory=True)
        other = str(tmp_path / "alias")
    recipe["models"].append({"model": other})
    merge_bad(tmp_path, recipe, "twice")


@pytest.mark.parametrize("content", ["nothing", "config-only", "other-files"])
def test_folder_without_weights(tmp_path, recipe, content):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    if content == "config-only":
        (folder / "config.json").write_text("{}")
    elif content == "other-files":
        (folder / "README.md").write_text("weights elsewhere")
        (folder / "model.onnx").write_bytes(b"\x00" * 64)
    recipe["models"][2]["model"] = str(folder)
    merge_bad(tmp_path, recipe, "empty-model")


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) - 1000])
    elif how == "truncated-header":
        path.write_bytes(data[:40])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(b"this is not a safetensors file at all" * 20)
    elif how == "huge-header-length":
        path.write_bytes(struct.pack("<Q", 2**40) + data[8:])
    elif how == "header-not-json":
        (length,) = struct.unpack("<Q", data[:8])
        path.write_bytes(data[:8] + b"{" + b"x" * (length - 1) + data[8 + length :])
    elif how == "offsets-past-end":
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"][1] += 4096
        body = json.dumps(header).encode()
        body += b" " * (-len(body) % 8)
        path.write_bytes(struct.pack("<Q", len(body)) + body + data[8 + length :])
    else:
        raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    ["truncated", "truncated-header", "empty", "garbage", "huge-header-length", "header-not-json", "offsets-past-end"],
)
@pytest.mark.parametrize("which", ["base", "ft1"])
def test_corrupt_safetensors(tmp_path, recipe, tiny_models, how, which):
    _damage(tiny_models[which] / "model.safetensors", how)
    merge_bad(tmp_path, recipe, str(tiny_models[which] / "model.safetensors"))


def _sharded(tmp_path: Path, name: str = "sharded") -> Path:
    return write_checkpoint(tmp_path / name, fine_tune(tiny_state(), 7), shards=3)


def _rewrite_index(folder: Path, change: Callable[[dict], None]) -> Path:
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    change(data["weight_map"])
    index.write_text(json.dumps(data))
    return index


def test_index_names_a_missing_shard(tmp_path, recipe):
    folder = _sharded(tmp_path)
    (folder / "model-00002-of-00003.safetensors").unlink()
    recipe["models"][0]["model"] = str(folder)
    merge_bad(tmp_path, recipe, "model.safetensors.index.json", "model-00002-of-00003.safetensors")


@pytest.mark.parametrize("escape", ["dotdot", "absolute", "nested-dotdot"])
def test_index_path_outside_its_folder(tmp_path, recipe, tiny_models, escape):
    folder = _sharded(tmp_path)
    outside = tiny_models["ft2"] / "model.safetensors"
    target = {
        "dotdot": "../ft2/model.safetensors",
        "absolute": str(outside),
        "nested-dotdot": "sub/../../ft2/model.safetensors",
    }[escape]

    def change(weight_map):
        for name, file in weight_map.items():
            if file == "model-00001-of-00003.safetensors":
                weight_map[name] = target

    _rewrite_index(folder, change)
    recipe["models"][0]["model"] = str(folder)
    merge_bad(tmp_path, recipe, "model.safetensors.index.json", "outside")


@pytest.mark.parametrize(
    "content",
    ["{not json", "[]", '{"weight_map": ["a"]}', '{"metadata": {}}', '{"weight_map": {"x": 3}}'],
    ids=["not-json", "list", "map-is-list", "no-map", "non-string-file"],
)
def test_index_damaged(tmp_path, recipe, content):
    folder = _sharded(tmp_path)
    (folder / "model.safetensors.index.json").write_text(content)
    recipe["models"][0]["model"] = str(folder)
    merge_bad(tmp_path, recipe, "model.safetensors.index.json")


def test_index_maps_a_tensor_its_shard_lacks(tmp_path, recipe):
    folder = _sharded(tmp_path)
    _rewrite_index(folder, lambda wm: wm.update({"model.ghost.weight": "model-00001-of-00003.safetensors"}))
    recipe["models"][0]["model"] = str(folder)
    # Either refuse the inconsistent index, or merge the tensors the shards really hold; never crash.
    result = invoke("merge", write_recipe(tmp_path, recipe))
    assert result.exit_code in (0, 2), f"{result.stderr}\n{result.exception!r}"
    assert "Traceback" not in result.output


# ---------------------------------------------------------------- tensors: missing, shapes, dtypes, NaN


MISSING = "model.layers.1.mlp.weight"


def _without(tmp_path: Path, name: str = MISSING) -> Path:
    state = fine_tune(tiny_state(), 5)
    del state[name]
    return write_checkpoint(tmp_path / "ft-missing", state)


def _reshaped(tmp_path: Path, name: str = MISSING) -> Path:
    state = fine_tune(tiny_state(), 5)
    state[name] = torch.randn(64, 96)
    return write_checkpoint(tmp_path / "ft-reshaped", state)


def test_missing_tensor_is_an_error_by_default(tmp_path, recipe):
    recipe["models"][1]["model"] = str(_without(tmp_path))
    merge_bad(tmp_path, recipe, "ft-missing", MISSING, "missing_tensor")


def test_shape_mismatch_is_an_error_by_default(tmp_path, recipe):
    recipe["models"][1]["model"] = str(_reshaped(tmp_path))
    merge_bad(tmp_path, recipe, "ft-reshaped", MISSING, "shape")


def test_missing_tensor_explicit_error_policy(tmp_path, recipe):
    recipe["models"][1]["model"] = str(_without(tmp_path))
    recipe["policies"] = {"missing_tensor": "error", "shape_mismatch": "copy_base"}
    merge_bad(tmp_path, recipe, MISSING)


def test_missing_tensor_in_the_dry_run(tmp_path, recipe):
    recipe["models"][1]["model"] = str(_without(tmp_path))
    merge_bad(tmp_path, recipe, MISSING, extra=("--dry-run",))


@pytest.mark.parametrize("problem", ["missing_tensor", "shape_mismatch"])
@pytest.mark.parametrize("policy", ["skip_model", "copy_base"])
def test_policies_merge_and_report(tmp_path, recipe, tiny_models, problem, policy):
    odd = _without(tmp_path) if problem == "missing_tensor" else _reshaped(tmp_path)
    recipe["models"][1]["model"] = str(odd)
    recipe["policies"] = {problem: policy}
    path = write_recipe(tmp_path, recipe)

    dry = ok("merge", path, "--dry-run")
    summary = ok("merge", path)
    for report in (dry, summary):
        assert any(MISSING in note and policy in note and str(odd) in note for note in report["notes"]), report["notes"]
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    base = load_file(str(tiny_models["base"] / "model.safetensors"))
    if policy == "copy_base":
        assert torch.equal(merged[MISSING], base[MISSING])
    else:  # the tensor is the merge of the other two models alone
        alone = dict(
            recipe,
            models=[m for i, m in enumerate(recipe["models"]) if i != 1],
            output={"path": str(tmp_path / "alone")},
        )
        alone.pop("policies")
        ok("merge", write_recipe(tmp_path, alone, "alone.yaml"))
        expected = load_file(str(tmp_path / "alone" / "model.safetensors"))
        assert torch.equal(merged[MISSING], expected[MISSING])
        assert not torch.equal(merged[MISSING], base[MISSING])
    # the other tensors are merged from all three models as usual
    assert not torch.equal(merged["model.layers.0.mlp.weight"], base["model.layers.0.mlp.weight"])


@pytest.mark.parametrize("which", ["base", "ft1"])
def test_unsupported_dtype(tmp_path, recipe, tiny_models, which):
    state = load_file(str(tiny_models[which] / "model.safetensors"))
    state["model.layers.0.attn.weight"] = state["model.layers.0.attn.weight"].to(torch.float8_e4m3fn)
    save_file(state, str(tiny_models[which] / "model.safetensors"))
    merge_bad(tmp_path, recipe, "model.layers.0.attn.weight", str(tiny_models[which]))


def test_unsupported_dtype_in_a_bin(tmp_path, recipe):
    state = fine_tune(tiny_state(), 5)
    state["model.layers.0.attn.weight"] = state["model.layers.0.attn.weight"].to(torch.complex64)
    folder = write_checkpoint(tmp_path / "complex-bin", state, fmt="bin")
    recipe["models"][0]["model"] = str(folder)
    merge_bad(tmp_path, recipe, "model.layers.0.attn.weight", "complex-bin")


def test_integer_tensor_where_the_base_is_float(tmp_path, recipe):
    state = fine_tune(tiny_state(), 5)
    state["model.layers.0.attn.weight"] = (state["model.layers.0.attn.weight"] * 100).to(torch.int32)
    recipe["models"][0]["model"] = str(write_checkpoint(tmp_path / "int-model", state))
    merge_bad(tmp_path, recipe, "model.layers.0.attn.weight", "int-model")


@pytest.mark.parametrize(
    "which,tensor,value",
    [
        ("base", "model.layers.0.mlp.weight", math.nan),
        ("ft0", "model.layers.1.attn.weight", math.inf),
        ("ft2", "model.layers.0.mlp.bias", -math.inf),
        ("ft1", "model.layers.1.norm.weight", math.nan),
        ("base", "model.embed.weight", -math.inf),
    ],
)
@pytest.mark.parametrize("method", ["ties", "linear"])
def test_nan_or_inf_in_an_input(tmp_path, recipe, tiny_models, which, tensor, value, method):
    state = load_file(str(tiny_models[which] / "model.safetensors"))
    state[tensor].view(-1)[7] = value
    save_file(state, str(tiny_models[which] / "model.safetensors"))
    recipe["merge_method"] = method
    if method == "linear":
        for entry in recipe["models"]:
            entry["parameters"] = {"weight": 1.0}
    message = merge_bad(tmp_path, recipe, tensor)
    assert str(tiny_models[which]) in message, message  # the model at fault, not only the tensor


@pytest.mark.parametrize("policy", ["copy_base", "skip_model"])
def test_nan_in_a_base_tensor_kept_by_a_policy(tmp_path, recipe, tiny_models, policy):
    """A policy that keeps the base tensor must not let the base's NaN into the output."""
    state = load_file(str(tiny_models["base"] / "model.safetensors"))
    state[MISSING].view(-1)[3] = math.nan
    save_file(state, str(tiny_models["base"] / "model.safetensors"))
    for entry in recipe["models"]:  # every model lacks the tensor: nothing is merged into it
        state = load_file(str(Path(entry["model"]) / "model.safetensors"))
        del state[MISSING]
        save_file(state, str(Path(entry["model"]) / "model.safetensors"))
    recipe["policies"] = {"missing_tensor": policy}
    merge_bad(tmp_path, recipe, MISSING)


# ---------------------------------------------------------------- the output


def test_output_exists(tmp_path, recipe):
    """An existing model output (here an empty folder) is replaced only with --overwrite; a folder that holds
    no model never is, and a dry run notes an existing output (test_hostile_output)."""
    out = tmp_path / "merged"
    out.mkdir()
    path = write_recipe(tmp_path, recipe)
    bad(tmp_path, "merge", path, culprits=(str(out), "--overwrite"))
    ok("merge", path, "--overwrite")
    assert (out / "model.safetensors").is_file()
    (out / "keep.txt").write_text("mine")
    ok("merge", path, "--overwrite")  # a previous tadrop output with a note added: still a model output
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


def test_output_exists_given_by_option(tmp_path, recipe):
    other = tmp_path / "other"
    other.mkdir()
    bad(tmp_path, "merge", write_recipe(tmp_path, recipe), "--output", other, culprits=(str(other),))


def test_output_is_a_file(tmp_path, recipe):
    (tmp_path / "merged").write_text("a file")
    bad(tmp_path, "merge", write_recipe(tmp_path, recipe), "--overwrite", culprits=(str(tmp_path / "merged"),))


@pytest.mark.parametrize("where", ["base/merged", "ft1/deep/er/merged", "ft2", "base"])
def test_output_inside_an_input(tmp_path, recipe, where):
    recipe["output"]["path"] = str(tmp_path / where)
    merge_bad(tmp_path, recipe, str(tmp_path / where), "inside", extra=("--overwrite",))


def test_output_inside_an_input_through_a_link(tmp_path, recipe, tiny_models):
    (tmp_path / "link-to-base").symlink_to(tiny_models["base"], target_is_directory=True)
    recipe["output"]["path"] = str(tmp_path / "link-to-base" / "merged")
    merge_bad(tmp_path, recipe, "inside")


def test_output_that_holds_the_inputs_is_refused(tmp_path):
    """--overwrite of a folder that holds the inputs would replace (delete) the inputs themselves."""
    zoo = tmp_path / "zoo"
    base = tiny_state()
    models = {"base": write_checkpoint(zoo / "base", base)}
    models.update({f"ft{i}": write_checkpoint(zoo / f"ft{i}", fine_tune(base, i)) for i in range(2)})
    recipe = basic_recipe(models, zoo)
    merge_bad(tmp_path, recipe, str(zoo), extra=("--overwrite",))
    assert all((p / "model.safetensors").is_file() for p in models.values())


def test_no_output_path(tmp_path, recipe):
    recipe.pop("output")
    merge_bad(tmp_path, recipe, "output")


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu0"])
def test_bad_device_option(tmp_path, recipe, device):
    bad(tmp_path, "merge", write_recipe(tmp_path, recipe), "--device", device, culprits=(device,))


def test_model_path_is_not_a_checkpoint(tmp_path, recipe):
    (tmp_path / "notes.txt").write_text("not weights")
    recipe["models"][0]["model"] = str(tmp_path / "notes.txt")
    merge_bad(tmp_path, recipe, "notes.txt")


# ---------------------------------------------------------------- the real process


def test_real_process_bad_input(tmp_path, recipe, tiny_models):
    """`python -m tadrop_cli` (one real process, ~2 s of CPU; the in-process cases cover the rest):
    exit status 2, one line on stderr, no traceback, nothing written, for a NaN found mid-merge."""
    state = load_file(str(tiny_models["ft1"] / "model.safetensors"))
    state["model.layers.1.attn.weight"][0, 0] = math.nan
    save_file(state, str(tiny_models["ft1"] / "model.safetensors"))
    recipe["output"]["shard_size"] = "20KB"  # several shards: the NaN is met after some are written
    path = write_recipe(tmp_path, recipe)
    before = snapshot(tmp_path)
    proc = run_cli("merge", str(path))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.layers.1.attn.weight" in lines[0], proc.stderr
    assert proc.stdout == ""
    assert snapshot(tmp_path) == before


def test_bad_recipe_yaml_roundtrip_sanity(tmp_path, recipe):
    """Control: the unmodified recipe merges, so the failures above are due to the one change each makes."""
    summary = ok("merge", write_recipe(tmp_path, recipe))
    assert summary["tensors"] == len(tiny_state())
    assert yaml.safe_load((tmp_path / "recipe.yaml").read_text())["merge_method"] == "ties"


def test_auto_device_without_a_gpu_driver_asks_nothing_of_torch(monkeypatch, tmp_path):
    """On Linux without a GPU driver's device node, `auto` is the CPU, found without torch (whose
    import takes 1-2 s); where a node exists, torch decides."""
    import torch

    from tadrop_cli import devices

    def no_torch_please():
        raise AssertionError("torch.cuda.is_available was asked")

    monkeypatch.setattr(devices.sys, "platform", "linux")
    monkeypatch.setattr(devices, "_GPU_NODES", (str(tmp_path / "nvidiactl"),))
    monkeypatch.setattr(torch.cuda, "is_available", no_torch_please)
    assert devices.choose_device("auto") == "cpu"
    (tmp_path / "nvidiactl").touch()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.choose_device("auto") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.choose_device("auto") == "cpu"


@pytest.mark.parametrize(
    "method,where,parameters,message",
    [
        ("nearswap", "parameters", {"t": -0.1}, "parameters.t: must be at least 0.0 (got -0.1)"),
        (
            "sce",
            "model",
            {"weight": 1.0},
            "models[0].parameters.weight: not a parameter of sce; sce takes none per model",
        ),
    ],
)
def test_parameter_refusals_say_what_is_allowed(method, where, parameters, message):
    """A bound with no upper end is said as such (not "between 0.0 and None"), and a method with no
    per-model parameter says so (not an empty "allowed:" list)."""
    from tadrop_cli.errors import BadInput
    from tadrop_cli.recipe import parse_recipe

    recipe = {"merge_method": method, "base_model": "base", "models": [{"model": "a"}]}
    if where == "model":
        recipe["models"][0]["parameters"] = parameters
    else:
        recipe["parameters"] = parameters
    with pytest.raises(BadInput) as error:
        parse_recipe(recipe)
    assert str(error.value).endswith(message), str(error.value)
