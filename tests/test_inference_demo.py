"""After the demo pretraining, inference on held-out synthetic images names what is in them.

The fixture runs ``bash examples/llava1.5/pretrain_llava1_5.sh --demo`` as a user does (a few minutes
on 2 CPU cores); the tests then use its output through the Python API and the shell script.
"""

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from process_pool import free_port

REPO = Path(__file__).resolve().parents[1]
HELD_OUT = 128


def _environment(demo_dir: Path) -> dict:
    python = Path(sys.executable)
    return dict(os.environ, DEMO_DIR=str(demo_dir), PYTHON=str(python), MASTER_PORT=str(free_port()),
                PATH=f"{python.parent}{os.pathsep}{os.environ['PATH']}",
                PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


@pytest.fixture(scope="module")
def demo(demo_run) -> Path:
    return demo_run  # the session's demo pretraining, shared with test_demo.py


def _named(text: str, vocabulary) -> list[str]:
    return [word for word in vocabulary if re.search(rf"\b{word}\b", text)]


def _accuracy(answers, references, vocabulary) -> float:
    hits = [_named(a, vocabulary)[:1] == _named(r, vocabulary)[:1] for a, r in zip(answers, references)]
    return sum(hits) / len(hits)


def test_held_out_images_are_described_far_above_chance(megatron_single, demo):
    from mm_plugin.data.synthetic import COLOURS, SHAPES
    from mm_plugin.inference.config import Query
    from mm_plugin.inference.demo import demo_config
    from mm_plugin.inference.pipeline import LlavaPipeline

    config = demo_config(demo, queries=HELD_OUT)
    pipe = LlavaPipeline.from_config(config, batch_size=32)
    references = [query.reference for query in config.queries]
    answers = [answer.text for answer in pipe.answer(config.queries)]
    shuffled = [query.images for query in config.queries]
    random.Random(0).shuffle(shuffled)
    unrelated = [answer.text for answer in pipe.answer([Query("", images) for images in shuffled])]

    colour, shape = _accuracy(answers, references, COLOURS), _accuracy(answers, references, SHAPES)
    # Chance is 1/8 for the colour and 1/6 for the shape; another image's caption is about chance too.
    assert colour >= 0.5 and shape >= 0.3, (colour, shape, answers[:8])
    assert colour - _accuracy(unrelated, references, COLOURS) >= 0.3
    assert all(answer.strip() and "\n" not in answer for answer in answers)  # a caption, ended by its newline


def test_the_inference_script_runs_on_the_demo(demo):
    result = subprocess.run(["bash", "examples/llava1.5/inference_llava1_5.sh", "--demo", "--max-new-tokens", "12"],
                            cwd=REPO, env=_environment(demo), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = re.findall(r"^A: (.*)$", result.stdout, flags=re.MULTILINE)
    references = re.findall(r"\(reference: (.*)\)$", result.stdout, flags=re.MULTILINE)
    assert len(answers) == len(references) == 8 and all(answers)
    assert "Q:" not in result.stdout  # the plain template asks nothing: no empty question line


def test_without_the_demo_output_the_script_says_which_command_makes_it(tmp_path):
    result = subprocess.run(["bash", "examples/llava1.5/inference_llava1_5.sh", "--demo"], cwd=REPO,
                            env=_environment(tmp_path / "nothing"), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "run `bash examples/llava1.5/pretrain_llava1_5.sh --demo` first" in result.stderr
