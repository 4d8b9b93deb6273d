"""The arithmetic demo with its teacher behind ``distill-serve``, replies sent as JSON and as
server-sent events.

``distill-serve`` runs the shipped demo teacher as a real subprocess on 127.0.0.1 and the demo
(``examples/arithmetic/opd.toml``) points a ``fireworks`` teacher at it. A few steps show what
holds at any length: streamed and JSON replies train bitwise the same run, and the served
teacher's scores are the local teacher's (the first step, where both runs sampled the same tokens,
agrees to rounding). The whole demo's gain behind the server is measured, not tested here: 600
steps take ~10 minutes on this machine, because distill-serve answers a step's 64 scoring requests
one at a time (figures in docs/remote.md).
"""

import json
from pathlib import Path

import pytest

from distill.config import load_config
from distill.loop import run

from ..plugins.test_fireworks import _serve

DEMO = Path(__file__).resolve().parents[2] / "examples" / "arithmetic"
SHORT = ("train.steps=6", "train.threads=1", "checkpoint.every_steps=0")


@pytest.fixture(scope="module")
def served_teacher():
    """``distill-serve --model examples/arithmetic/teacher`` on 127.0.0.1, one thread (the run holds
    the other core)."""
    proc, base = _serve(DEMO / "teacher", "--served-name", "teacher", env={"OMP_NUM_THREADS": "1"})
    yield base
    proc.terminate()
    proc.wait(timeout=30)


def _run(manager, out: Path, *sets: str) -> list[dict]:
    config = load_config(DEMO / "opd.toml", manager, [*SHORT, *sets, f"output_dir='{out}'"], ["data.eval"])
    run(config, manager, progress=False)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_the_demo_trains_alike_with_its_teacher_served_as_json_or_streamed(served_teacher, tmp_path, manager):
    served = {}
    for stream in ("false", "true"):
        teacher = (f"teachers.0={{backend = 'fireworks', base_url = '{served_teacher}', model = 'teacher', "
                   f"tokenizer = 'teacher', stream = {stream}}}")
        served[stream] = _run(manager, tmp_path / f"stream-{stream}", teacher)
    local = _run(manager, tmp_path / "local")
    for key in ("loss", "teacher_logprob", "completion_tokens", "grad_norm"):
        assert [m[key] for m in served["true"]] == [m[key] for m in served["false"]]
    assert served["false"][0]["completion_tokens"] == local[0]["completion_tokens"]
    assert served["false"][0]["teacher_logprob"] == pytest.approx(local[0]["teacher_logprob"], abs=1e-5)
    summary = json.loads((tmp_path / "stream-true" / "summary.json").read_text())
    (counters,) = summary["teachers"].values()
    assert counters["failed_attempts"] == {} and counters["dropped"] == {}
    assert counters["rows_scored"] == 6 * 16
