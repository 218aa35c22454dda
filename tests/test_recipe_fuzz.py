"""Property-based tests of the recipe loader.

Whatever the document, `parse_recipe(data)` returns a `Recipe` or raises `BadInput`
with a one-line message; `load_recipe(path)` does the same for any file contents.
Nothing else may escape (no pydantic ValidationError, TypeError, KeyError, ...).
"""

from __future__ import annotations

import copy
import math

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tadrop_cli.errors import BadInput
from tadrop_cli.methods import METHODS
from tadrop_cli.parameter_values import value_for_tensor
from tadrop_cli.recipe import Recipe, load_recipe, parse_recipe, recipe_digest

FUZZ = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    derandomize=False,
)

# Every key the schema knows, so that random documents often hit real fields.
KEYS = [
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "name",
    "tadrop",
    "seed",
    "device",
    "output",
    "policies",
    "model",
    "weight",
    "density",
    "gamma",
    "lambda",
    "normalize",
    "rescale",
    "int8_mask",
    "filter",
    "value",
    "enabled",
    "statistic",
    "strength",
    "min_ratio",
    "max_ratio",
    "min_numel",
    "exclude",
    "excluded_ratio",
    "topmass_fraction",
    "preserve_budget",
    "overrides",
    "path",
    "shard_size",
    "missing_tensor",
    "shape_mismatch",
    "slices",
    "sources",
    "layer_range",
    "residual_weight",
    "chat_template",
    "scale",
]
WORDS = [
    *METHODS,
    "ties",
    "kurtosis",
    "rank",
    "minmax",
    "global",
    "none",
    "paper",
    "l1",
    "l2",
    "linf",
    "float16",
    "bf16",
    "error",
    "skip_model",
    "copy_base",
    "cpu",
    "cuda",
    "cuda:0",
    "auto",
    "base",
    "5GB",
    "100KB",
    "2GiB",
    "*mlp*",
    "0",
    "",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 0.5, 1.5, -0.5, 2**63, 2**63 - 1, math.nan, math.inf, -math.inf, 1e308, 5e-324]),
    st.text(max_size=12),
    st.sampled_from(WORDS),
)
keys = st.one_of(
    st.sampled_from(KEYS), st.text(max_size=8), st.integers(-3, 3), st.booleans(), st.none(), st.floats(allow_nan=False)
)
documents = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=6)),
    max_leaves=30,
)


def _valid_recipe(method: str = "ties") -> dict:
    data = {
        "merge_method": method,
        "base_model": "base",
        "models": [
            {"model": "ft0", "parameters": {"weight": 0.6, "density": 0.4}},
            {
                "model": "ft1",
                "parameters": {"weight": [0.2, 0.8], "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.5}]},
                "tadrop": {"strength": 0.4, "overrides": [{"filter": "*attn*", "max_ratio": 0.9}]},
            },
        ],
        "parameters": {"normalize": True, "lambda": 1.2, "rescale": "l2", "int8_mask": False},
        "tadrop": {
            "statistic": "kurtosis",
            "strength": 0.3,
            "min_ratio": 0.05,
            "max_ratio": 0.95,
            "exclude": ["*norm*"],
            "overrides": [{"filter": "*embed*", "enabled": False}],
        },
        "seed": 7,
        "device": "cpu",
        "dtype": "bfloat16",
        "output": {"path": "out", "dtype": "bf16", "shard_size": "100KB"},
        "policies": {"missing_tensor": "skip_model", "shape_mismatch": "copy_base"},
    }
    # only the global parameters this method has (the SVD-based hosts have no normalize or rescale)
    data["parameters"] = {k: v for k, v in data["parameters"].items() if METHODS[method].param(k) is not None}
    # ... the per-model ones it has (model_stock, sce, arcee_fusion take no weight), and as many models as it merges
    for model in data["models"]:
        model["parameters"] = {
            k: v for k, v in model["parameters"].items() if (spec := METHODS[method].param(k)) and spec.per_model
        }
    data["models"] = data["models"][: METHODS[method].model_count[1]]
    return data


def check(data) -> Recipe | None:
    """The property: a Recipe, or a BadInput with a one-line, non-empty message."""
    try:
        recipe = parse_recipe(copy.deepcopy(data))
    except BadInput as error:
        message = str(error)
        assert message.strip() and not set(message) & {"\n", "\r"}, f"not a one-line message: {message!r}"
        return None
    assert isinstance(recipe, Recipe)
    recipe_digest(recipe)  # an accepted recipe can be digested (metadata, resume)
    # every parameter of an accepted recipe resolves for every tensor (the merge does this per tensor)
    slices = [(s.parameters, *(source.parameters for source in s.sources)) for s in recipe.slices or []]
    for params in [recipe.parameters, *(m.parameters for m in recipe.models or []), *(p for s in slices for p in s)]:
        for value in params.values():
            for name, position in [
                ("model.layers.0.mlp.weight", 0.0),
                ("model.layers.3.attn.weight", 0.5),
                ("model.layers.7.mlp.weight", 1.0),
                ("model.embed.weight", None),
            ]:
                resolved = value_for_tensor(value, name, position)
                assert resolved is None or isinstance(resolved, (bool, int, float, str)), (value, resolved)
    return recipe


def test_the_valid_recipe_parses():
    for method in METHODS:
        data = _valid_recipe(method)
        if METHODS[method].sparsifier is None:
            data.pop("tadrop")
            for model in data["models"]:
                model.pop("tadrop", None)
                model["parameters"].pop("density", None)
        spec = METHODS[method]
        for model in data["models"]:  # only the per-model parameters this method has (slerp: none)
            model["parameters"] = {k: v for k, v in model["parameters"].items() if spec.param(k) is not None}
        data["models"] = data["models"][: spec.model_count[1]]  # slerp and nearswap merge one model
        data["parameters"].update({p.name: 0.5 for p in spec.params if p.required})  # slerp's t
        if method == "passthrough":  # one model, weighed by its scale
            data["models"] = [{"model": "ft0", "parameters": {"scale": [0.2, 0.8]}}]
        assert check(data) is not None, method
        if method not in ("passthrough", "linear"):
            assert check(_slices_form(data)) is not None, method


@FUZZ
@given(documents)
@example({"merge_method": "ties", "models": [{"model": "a"}], 3: "x"})
@example({"merge_method": "ties", "base_model": "b", "models": [{"model": "a"}], "bad\nkey": 1})
@example({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": []}}]})
@example({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {None: 1}}]})
@example({"merge_method": "ties", "base_model": "b", "models": [{"model": "a"}], "tadrop": {"strength": math.nan}})
@example({"merge_method": "ties", "base_model": "b", "models": [{"model": "a"}], "seed": math.inf})
@example({"merge_method": "ties", "base_model": "b", "models": [{"model": "a"}], "output": {"shard_size": "1e999GB"}})
@example({"merge_method": "ties", "base_model": "b", "models": [{"model": "a"}], "output": {"shard_size": "0.1B"}})
@example({"merge_method": "ties", "base_model": "b", "models": [{"model": "a"}], "output": {"shard_size": True}})
@example({"merge_method": {"a": 1}, "models": []})
@example({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"density": [[]]}}]})
@example({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": [0.5, "x"]}}]})
@example(
    {"models": [{"model": "a", "parameters": {"density": [{"filter": None, "value": [1]}]}}], "merge_method": "ties"}
)
def test_random_documents(data):
    check(data)


@FUZZ
@given(st.dictionaries(st.sampled_from(KEYS), documents, max_size=8))
def test_random_documents_with_known_keys(data):
    check(data)


def _paths(node, prefix=()):
    """Every (path, value) in a nested document."""
    yield prefix, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*prefix, i))


def _slices_form(data: dict) -> dict:
    """A models: recipe in the slices: form: two slices, the base in each, a slice base and parameters."""
    data = copy.deepcopy(data)
    models = data.pop("models")
    sources = [{"model": m["model"], "layer_range": [0, 2], "parameters": m["parameters"]} for m in models]
    base = {"model": "ft9", "layer_range": [1, 3]}
    fewest = METHODS[data["merge_method"]].model_count[0]  # nuslerp merges two models in every slice
    data["slices"] = [
        {"sources": [{"model": "base", "layer_range": [0, 2]}, *sources], "parameters": data["parameters"]},
        {"sources": [base, *sources[:fewest]], "base_model": "ft9", "residual_weight": 0.5},
    ]
    data["chat_template"] = "chatml"
    return data


def _valid_slices_recipe(method: str) -> dict:
    return _slices_form(_valid_recipe(method))


@st.composite
def mutated_recipes(draw):
    """A valid recipe (models: or slices: form) with one to four random edits: replace, delete, insert, rename,
    wrap in a list."""
    valid = draw(st.sampled_from([_valid_recipe, _valid_slices_recipe]))
    data = valid(draw(st.sampled_from(sorted(METHODS))))
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p, _ in _paths(data)]
        path = draw(st.sampled_from(paths))
        parent = data
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "delete", "insert", "rename", "wrap", "scalar"]))
        if not path:
            if action in ("replace", "wrap"):
                data = draw(documents) if action == "replace" else [data]
                if not isinstance(data, dict):
                    break
            continue
        last = path[-1]
        if action == "replace":
            parent[last] = draw(documents)
        elif action == "scalar":
            parent[last] = draw(scalars)
        elif action == "wrap":
            parent[last] = [parent[last]]
        elif action == "delete":
            if isinstance(parent, dict):
                del parent[last]
            else:
                parent.pop(last)
        elif action == "insert" and isinstance(parent, dict):
            parent[draw(keys)] = draw(documents)
        elif action == "insert":
            parent.insert(last, draw(documents))
        elif action == "rename" and isinstance(parent, dict):
            key = draw(st.sampled_from(KEYS + [str(last) + "s", str(last)[:-1], str(last).upper()]))
            parent[key] = parent.pop(last)
    return data


@FUZZ
@given(mutated_recipes())
def test_mutated_recipes(data):
    check(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200).map(str.encode),
        mutated_recipes().map(lambda d: yaml.safe_dump(d, allow_unicode=True).encode()),
        st.sampled_from(
            [
                b"a: &x [*x]\n",
                b"!!python/object/apply:os.system ['true']\n",
                b"a: !!binary ZZZ\n",
                b"? [a, b]\n: c\n",
                b"a: 1\na: 2\n",
                b"--- a\n--- b\n",
                b"merge_method: ties\nmodels: {<<: [1]}\n",
                b"\xef\xbb\xbfmerge_method: ties\n",
                b"merge_method: !!float nan\n",
                b"seed: 0x10\n",
                b"seed: 1_000\n",
                b"models: !!set {a, b}\n",
                b"a: !!timestamp 2001-12-14\n",
            ]
        ),
    )
)
def test_any_file_contents(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("fuzz") / "recipe.yaml"
    path.write_bytes(content)
    try:
        recipe = load_recipe(path)
    except BadInput as error:
        assert str(error).strip() and not set(str(error)) & {"\n", "\r"}, f"not a one-line message: {str(error)!r}"
        return
    assert isinstance(recipe, Recipe)
