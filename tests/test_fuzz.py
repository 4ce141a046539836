"""Property-based fuzzing: random records and image bytes, random configuration values, damaged checkpoints.

Whatever goes in, each reader either works or rejects with its own error type and a reason: no other
exception, no hang, no unbounded allocation. Examples are derandomised and bounded, so CI always runs the
same few hundred cases in seconds.
"""

import copy
import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_fixtures import tokenizer_dir

REPO = Path(__file__).resolve().parents[1]
FUZZ = settings(max_examples=int(__import__("os").environ.get("FUZZ_EXAMPLES", 40)), deadline=None, derandomize=not __import__("os").environ.get("FUZZ_EXAMPLES"), suppress_health_check=list(HealthCheck))

# JSON values as a careless or hostile user writes them: wrong types, huge and negative numbers, NaN,
# NUL bytes and lone surrogates in text, nesting.
ATOMS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                  st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                  st.sampled_from(["", "\x00", "\ud800", "../x", "/etc/passwd", "1e-6", "false", "bf16"]))
VALUES = st.recursive(ATOMS, lambda children: st.lists(children, max_size=3)
                      | st.dictionaries(st.text(max_size=6), children, max_size=3), max_leaves=6)


def _leaf_paths(tree, prefix=()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield prefix + (key,)
            yield from _leaf_paths(value, prefix + (key,))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield prefix + (index,)
            yield from _leaf_paths(value, prefix + (index,))


@st.composite
def mutated(draw, original: dict):
    """``original`` with one to three fields replaced by random values or deleted."""
    tree = copy.deepcopy(original)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_leaf_paths(tree))
        if not paths:
            break
        *parents, last = draw(st.sampled_from(paths))
        holder = tree
        for key in parents:
            holder = holder[key]
        if draw(st.booleans()) and isinstance(holder, dict):
            del holder[last]
        else:
            holder[last] = draw(VALUES)
    return tree


def _write_json(folder: Path, name: str, value) -> Path:
    path = folder / name
    path.write_text(json.dumps(value))  # NaN and lone surrogates survive a JSON round trip
    return path


# --- configuration loaders --------------------------------------------------------------------------

MODEL_JSON = json.loads((REPO / "examples/llava1.5/model.json").read_text())
DATA_JSON = json.loads((REPO / "examples/llava1.5/data.json").read_text())
INFERENCE_JSON = json.loads((REPO / "examples/llava1.5/inference_llava.json").read_text())


@FUZZ
@given(mutated(MODEL_JSON))
def test_model_json_loads_or_names_the_problem(raw):
    from mm_plugin.config.model import ModelConfigError, load_model_config, parameter_bytes

    with tempfile.TemporaryDirectory() as folder:
        try:
            config = load_model_config(str(_write_json(Path(folder), "model.json", raw)))
        except ModelConfigError as error:
            assert str(error)
            return
    assert all(isinstance(size, int) and size >= 0 for size in parameter_bytes(config).values())


@FUZZ
@given(mutated(DATA_JSON))
def test_data_json_loads_or_names_the_problem(raw):
    from mm_plugin.data.config import load_data_config
    from mm_plugin.data.errors import DataError

    with tempfile.TemporaryDirectory() as folder:
        try:
            config = load_data_config(_write_json(Path(folder), "data.json", raw))
        except DataError as error:
            assert "data.json" in str(error)
            return
    assert all(math.isfinite(v) and v > 0 for v in config.image.image_std)


@FUZZ
@given(mutated(INFERENCE_JSON))
def test_inference_json_loads_or_names_the_problem(raw):
    from mm_plugin.inference.config import InferenceConfigError, load_inference_config
    from mm_plugin.inference.sampling import GenerationConfigError

    with tempfile.TemporaryDirectory() as folder:
        try:
            load_inference_config(_write_json(Path(folder), "inference.json", raw))
        except (InferenceConfigError, GenerationConfigError) as error:
            assert str(error)


# --- the data layer ---------------------------------------------------------------------------------

TURN = st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "system", "", 3]),
                              "value": st.one_of(st.text(max_size=20), st.just("<image>\nWhat is it?"), ATOMS)})
RECORD = st.one_of(
    VALUES,
    st.fixed_dictionaries({"id": ATOMS, "conversations": st.one_of(st.lists(TURN, max_size=4), VALUES)},
                          optional={"image": st.one_of(st.sampled_from(["good.jpg", "random.jpg", "empty.jpg",
                                                                        "missing.jpg", "../good.jpg"]), ATOMS)}),
)


@pytest.fixture(scope="module")
def image_bytes():
    from data_fixtures import save_image

    with tempfile.TemporaryDirectory() as folder:
        return save_image(Path(folder) / "good.jpg", (40, 30)).read_bytes()


@FUZZ
@given(records=st.lists(RECORD, min_size=1, max_size=6), noise=st.binary(max_size=300))
def test_random_records_and_image_bytes_are_samples_or_counted_reasons(image_bytes, records, noise):
    from mm_plugin.data.check import check_dataset
    from mm_plugin.data.config import data_config_json, load_data_config
    from mm_plugin.data.errors import DataError
    from mm_plugin.data.loader import build_datasets
    from mm_plugin.data.tokenization import load_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "images").mkdir()
        (folder / "images" / "good.jpg").write_bytes(image_bytes)
        (folder / "images" / "random.jpg").write_bytes(noise)
        (folder / "images" / "empty.jpg").write_bytes(b"")
        shutil.copytree(tokenizer_dir(), folder / "tokenizer")
        _write_json(folder, "records.json", records)
        _write_json(folder, "data.json", data_config_json(
            data_path="records.json", data_folder="images", tokenizer_path="tokenizer", template="plain",
            image_size=28, model_max_length=64))
        config = load_data_config(folder / "data.json")
        try:
            dataset, _ = build_datasets(config, load_tokenizer(config.tokenizer_path), image_tokens=4,
                                        model_max_length=64)
        except DataError as error:  # e.g. a top level that is not a list of records
            assert "records.json" in str(error)
            return
        report = check_dataset(dataset, max_bad_fraction=1.0, progress=False)
        assert report["valid"] + report["bad"] == len(dataset) == len(records)
        for position in range(len(dataset)):
            try:
                sample = dataset[position]
            except DataError as error:  # every record bad: the data set itself is broken
                assert report["valid"] == 0 and "bad" in str(error)
                continue
            assert len(sample["bad"]) <= 1 and sample["input_ids"].numel() <= 64


# --- checkpoint readers -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_checkpoint(megatron_single, tmp_path_factory):
    from training_fixtures import argv, build_setup, model_json, train

    root = build_setup(tmp_path_factory.mktemp("fuzz-training"))
    model_json(root, "stage1.json", train_language=False)
    save = tmp_path_factory.mktemp("fuzz-checkpoint") / "ckpt"
    train(argv(root, iterations=2, extra=("--save", str(save))))
    return save / "iter_0000002"


@FUZZ
@given(data=st.data())
def test_damaged_checkpoints_are_refused_with_a_reason(saved_checkpoint, data):
    from mm_plugin.safe_io import UnsafeFileError, WeightFileError, check_dist_checkpoint
    from mm_plugin.checkpoint.reading import CheckpointError, reading_checkpoint

    names = sorted(path.name for path in saved_checkpoint.iterdir() if path.name != "manifest.json")
    name = data.draw(st.sampled_from(names))
    with tempfile.TemporaryDirectory() as folder:
        copy_dir = Path(folder) / "iter_0000002"
        shutil.copytree(saved_checkpoint, copy_dir)
        content = bytearray((copy_dir / name).read_bytes())
        if data.draw(st.booleans()) or not content:
            content = content[:data.draw(st.integers(0, max(0, len(content) - 1)))]
        else:
            for position in data.draw(st.lists(st.integers(0, len(content) - 1), min_size=1, max_size=8, unique=True)):
                content[position] = 255 - content[position]
        (copy_dir / name).write_bytes(bytes(content))
        with pytest.raises(CheckpointError, match=rf"{name}"):  # the manifest names the damaged file
            with reading_checkpoint(copy_dir):
                pass
        (copy_dir / "manifest.json").unlink()
        try:  # without one, the structural checks reject what they can read as broken; nothing else escapes
            check_dist_checkpoint(copy_dir)
        except (WeightFileError, UnsafeFileError) as error:
            assert str(copy_dir) in str(error)
