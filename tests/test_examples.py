"""Every example in `examples/` runs at a small size and shows what its docstring says.

Each lesson is imported from its file and `main(small=True)` is called under the test-wide
settings (strict dtype promotion, rank promotion that raises, warnings as errors), so an
example that rots, or that teaches a habit the library's own tests refuse, fails here.
`main` returns what it printed as numbers, and the check beside it holds the lesson to it
(one trace per bucket shape, an exact resume, no attention across documents, ...).

Three examples are run by the test files of what they exercise, with the settings they
need; `test_every_example_is_run_somewhere` keeps that list honest and catches a new
example that nothing runs.
"""

import functools
import importlib.util
import pathlib
import sys
from collections.abc import Callable
from types import ModuleType

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
TESTS = pathlib.Path(__file__).resolve().parent

# Run by another test file, which is named here and must mention the example's file name.
RUN_ELSEWHERE = {
    "demo.py": "test_demo.py",  # `--quick`, with the `demo` extra
    "custom_batcher.py": "test_testing.py",  # its `check_batcher` report
    "sharded_training.py": "test_sharding.py",  # 4 devices, set by conftest before any op
    "host_feed.py": "test_host.py",  # writes a token corpus, trains, resumes mid-epoch
}


@functools.cache
def load(name: str) -> ModuleType:
    """`examples/<name>.py` as a module (cached: its jitted functions compile once)."""
    module_name = f"jaxbatch_example_{name}"
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def check_quickstart(r: dict) -> None:
    assert (r["batches"], r["rows"]) == (3, 10)  # 10 elements in 4s: the last one padded
    np.testing.assert_array_equal(r["x_sum"], r["expected_x_sum"])  # padding masked out
    assert r["stats"]["batch_count"] == 3 and r["stats"]["padded_count"] == 2
    assert r["stats"]["applied_count"] == r["stats"]["emitted_count"] == 10
    assert r["buffered"] == 2 and r["continued_batches"] == 1


def check_training_loop(r: dict) -> None:
    assert r["traces_after_epochs"] == 1  # every epoch reuses one program
    assert r["same_steps"] and r["gap"] == 0.0  # three calls train as one
    assert r["resumed_identical"]
    assert r["accuracy"] > 0.6  # three classes: well above chance (1/3) after 12 small epochs


def check_packing(r: dict) -> None:
    assert r["tokens"] == r["expected_tokens"] == r["split_tokens"]  # nothing lost
    assert r["max_cross"] == 0.0  # no token attends to another document
    assert r["efficiency"] > r["alone"]


def check_bucketing(r: dict) -> None:
    assert sorted(r["traces"].values()) == [1, 1, 1, 1]  # one trace per bucket shape
    assert len(r["traces"]) == 4
    assert r["real_tokens"] == r["expected_tokens"]
    assert r["bucketed"] > 2 * r["single"]
    assert r["accuracy"] > 0.8


def check_shuffling(r: dict) -> None:
    assert all(v for k, v in r.items() if k != "moved"), r
    assert 0 < r["moved"] < 100 / 3  # a buffer of 16 moves elements less than a permutation


def check_streaming(r: dict) -> None:
    assert r["generator"]
    if importlib.util.find_spec("grain") is not None:
        assert r["grain"]


def check_maxtext_packing(r: dict) -> None:
    # (Its arrays equal MaxText's Grain path: tests/test_pack.py runs Grain beside it.)
    assert r["tokens"] == r["expected_tokens"]  # every token in a row, none lost
    assert r["loss_tokens"] == r["tokens"] - r["rows"]  # the shift: one target fewer per row
    size = r["batch_size"]
    assert r["batches"] * size >= r["rows"] > (r["batches"] - 1) * size  # full, then the last


def check_mixture(r: dict) -> None:
    # Grain's schedule: each source's share of the positions, to within a row.
    for count, weight in zip(r["counts"], (0.5, 0.3, 0.2)):
        assert abs(count - weight * r["positions"]) <= 1, r["counts"]
    for count, weight in zip(r["drawn"], (0.2, 0.2, 0.6)):  # after the weights changed
        assert abs(count - weight * r["then"]) <= 1, r["drawn"]
    assert all(t > 0 for t in r["tokens"]) and r["efficiency"] > 0.5


def check_elastic_pipeline(r: dict) -> None:
    # Stopped mid-epoch with half-packed rows, resumed on half the hosts: every document
    # packed once per epoch, none lost in the old buffers, none read twice.
    assert r["carried"] > 0 and 0 < r["stopped_at"] < len(r["counts"])
    assert set(r["counts"]) == {r["epochs"]}


CHECKS: dict[str, Callable[[dict], None]] = {
    "quickstart": check_quickstart,
    "training_loop": check_training_loop,
    "packing": check_packing,
    "bucketing": check_bucketing,
    "shuffling": check_shuffling,
    "streaming": check_streaming,
    "maxtext_packing": check_maxtext_packing,
    "mixture": check_mixture,
    "elastic_pipeline": check_elastic_pipeline,
}


def test_every_example_is_run_somewhere():
    found = {path.name for path in EXAMPLES.glob("*.py")}
    here = {f"{name}.py" for name in CHECKS}
    assert found == here | set(RUN_ELSEWHERE), (
        "An example that no test runs (add it to CHECKS or RUN_ELSEWHERE), or a listed one "
        f"that is gone: {sorted(found ^ (here | set(RUN_ELSEWHERE)))}"
    )
    for example, test_file in RUN_ELSEWHERE.items():
        assert example in (TESTS / test_file).read_text(), f"{test_file} does not run {example}"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_example_runs_small_and_shows_its_lesson(name, capsys):
    module = load(name)
    doc = module.__doc__ or ""
    assert "What it teaches" in doc and f"python examples/{name}.py" in doc
    result = module.main(small=True)
    printed = capsys.readouterr().out
    assert printed.strip(), "an example prints what it shows"
    CHECKS[name](result)
