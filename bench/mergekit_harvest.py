"""mergekit's test configurations, harvested by running its own test functions.

mergekit's tests build each merge as a Python ``MergeConfiguration`` and hand it to
``tests.common.run_and_check_merge``. This script, run with mergekit's own interpreter
(``.venv-mergekit/bin/python``), extracts ``tests/`` from a mergekit checkout (or bare mirror,
at HEAD) into a temporary folder, replaces ``run_and_check_merge`` by a recorder, and calls every
test function of every test module, giving each the fixtures pytest would: the module's own
fixture functions, called once per module (session scope) with a seeded ``torch`` generator, so
the models are mergekit's own tiny test models. A test that builds several configurations
records each one. Output (JSON on stdout, or ``--out``): per configuration its pytest-style
name, the configuration as ``model_dump(exclude_none=True)`` and whether the test expected the
merge to fail; per module that records nothing, the reason.

Two fixture builders are replaced, and the entry says so: ``make_gpt2size`` (a 124M-parameter
GPT-2) builds a GPT-2 of the same depth at tiny width, to keep the corpus light.

    .venv-mergekit/bin/python bench/mergekit_harvest.py --mergekit-repo PATH --fixtures DIR

mergekit's tests import ``pytest`` only for ``fixture``, ``raises`` and ``mark.parametrize``;
mergekit's environment has no pytest, so the runner below provides those three.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import io
import itertools
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

RECORDER = "run_and_check_merge"
TEST_FOLDER = "tests"


# -- the three pytest features mergekit's tests use -------------------------------------------
class Fixture:
    """A function marked ``@pytest.fixture``: called with its own fixtures when a test asks."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function


class DidNotRaise(AssertionError):
    """A ``pytest.raises`` block finished without the expected exception."""


def _fixture(function: Callable[..., Any] | None = None, **_options: Any) -> Any:
    if function is None:
        return lambda inner: Fixture(inner)
    return Fixture(function)


@contextlib.contextmanager
def _raises(expected: Any, **_options: Any) -> Iterator[None]:
    try:
        yield
    except expected:
        return
    raise DidNotRaise(f"did not raise {expected}")


class _Mark:
    """``pytest.mark``: ``parametrize`` is kept on the function; other marks are ignored."""

    @staticmethod
    def parametrize(names: str | list[str], values: list[Any], **_options: Any) -> Callable:
        def mark(function: Callable) -> Callable:
            rules = getattr(function, "parametrize", [])
            function.parametrize = [(names, list(values)), *rules]  # type: ignore[attr-defined]
            return function

        return mark

    def __getattr__(self, _name: str) -> Callable:
        return lambda *args, **kwargs: args[0] if args and callable(args[0]) else lambda f: f


def install_pytest_stand_in() -> None:
    """A ``pytest`` module with the features the tests import, unless pytest is installed."""
    if importlib.util.find_spec("pytest") is not None:
        raise SystemExit("run with mergekit's environment, which has no pytest")
    module = types.ModuleType("pytest")
    module.fixture = _fixture  # type: ignore[attr-defined]
    module.raises = _raises  # type: ignore[attr-defined]
    module.mark = _Mark()  # type: ignore[attr-defined]
    sys.modules["pytest"] = module


# -- fixtures ---------------------------------------------------------------------------------
class TmpPathFactory:
    """pytest's ``tmp_path_factory``: numbered folders under one root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.counter = itertools.count()

    def mktemp(self, name: str) -> Path:
        folder = self.root / f"{name}{next(self.counter)}"
        folder.mkdir(parents=True)
        return folder


class FixtureScope:
    """One module's fixtures, each built once on first use (pytest's session scope)."""

    def __init__(self, module: types.ModuleType, root: Path) -> None:
        self.module = module
        self.values: dict[str, Any] = {"tmp_path_factory": TmpPathFactory(root)}

    def get(self, name: str) -> Any:
        if name not in self.values:
            fixture = getattr(self.module, name, None)
            if not isinstance(fixture, Fixture):
                raise LookupError(f"no fixture {name!r}")
            import torch

            # mergekit's fixtures draw unseeded random weights: seed each for a stable corpus
            torch.manual_seed(len(self.values))
            arguments = [self.get(n) for n in inspect.signature(fixture.function).parameters]
            self.values[name] = fixture.function(*arguments)
        return self.values[name]


# -- harvesting -------------------------------------------------------------------------------
def extract_tests(repo: Path, into: Path) -> str:
    """Write the checkout's ``tests/`` under ``into``; returns the revision read."""
    bare = not (repo / TEST_FOLDER).is_dir()
    where = ["--git-dir", str(repo)] if bare else ["-C", str(repo)]
    archive = subprocess.run(
        ["git", *where, "archive", "HEAD", TEST_FOLDER], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    revision = subprocess.run(
        ["git", *where, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    )
    return revision.stdout.strip()


def tiny_gpt2(path: str) -> str:
    """A GPT-2 as deep as mergekit's ``make_gpt2size`` (12 layers) at tiny width."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_ctx=64, n_embd=32, n_head=4, n_layer=12, n_positions=64, vocab_size=64)
    GPT2LMHeadModel(config).save_pretrained(path, safe_serialization=True)
    return str(path)


SHRUNK = {"make_gpt2size": tiny_gpt2}


class Recorder:
    """Stands in for ``run_and_check_merge``: keeps each configuration it is given."""

    def __init__(self) -> None:
        self.configs: list[dict[str, Any]] = []

    def __call__(self, config: Any, *_args: Any, **_kwargs: Any) -> None:
        self.configs.append(config.model_dump(exclude_none=True, mode="json"))


def test_functions(module: types.ModuleType) -> Iterator[tuple[str, Callable]]:
    """Each test of a module as (pytest node name, callable): functions, and methods of
    ``Test*`` classes bound to a fresh instance, as pytest collects them."""
    for name, value in vars(module).items():
        if name.startswith("test_") and inspect.isfunction(value):
            yield name, value
        elif name.startswith("Test") and inspect.isclass(value):
            for method_name, method in vars(value).items():
                if method_name.startswith("test_") and inspect.isfunction(method):
                    yield f"{name}::{method_name}", getattr(value(), method_name)


def parameter_sets(function: Callable) -> list[tuple[str, dict[str, Any]]]:
    """The ``(id, arguments)`` pairs of a test's ``parametrize`` marks (one empty set if none)."""
    sets: list[tuple[str, dict[str, Any]]] = [("", {})]
    for names, values in getattr(function, "parametrize", []):
        keys = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        expanded = []
        for ident, given in sets:
            for value in values:
                row = value if len(keys) > 1 else (value,)
                label = "-".join(str(v) for v in row)
                expanded.append(
                    (
                        f"{ident}-{label}" if ident else label,
                        {**given, **dict(zip(keys, row, strict=True))},
                    )
                )
        sets = expanded
    return sets


def harvest_module(file: str, module: types.ModuleType, root: Path) -> list[dict[str, Any]]:
    """Every configuration the module's tests build, each with its name and outcome."""
    recorder = Recorder()
    setattr(module, RECORDER, recorder)
    scope = FixtureScope(module, root / Path(file).stem)
    entries = []
    for node, function in test_functions(module):
        for ident, given in parameter_sets(function):
            start = len(recorder.configs)
            expected_failure = False
            try:
                names = [n for n in inspect.signature(function).parameters if n not in given]
                function(**given, **{n: scope.get(n) for n in names})
            except DidNotRaise:
                expected_failure = True
            found = recorder.configs[start:]
            for index, config in enumerate(found, start=1):
                label = ident if len(found) == 1 else "-".join(filter(None, [ident, str(index)]))
                entries.append(
                    {
                        "source": f"{file}::{node}" + (f"[{label}]" if label else ""),
                        "config": config,
                        "expects_failure": expected_failure,
                    }
                )
    return entries


def harvest(repo: Path, fixtures: Path) -> dict[str, Any]:
    """Run every test module of the checkout's ``tests/`` with the recorder in place."""
    install_pytest_stand_in()
    shutil.rmtree(fixtures, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(prefix="mergekit-tests-"))
    revision = extract_tests(repo, scratch)
    sys.path.insert(0, str(scratch))
    common = importlib.import_module(f"{TEST_FOLDER}.common")
    shrunk = [name for name in SHRUNK if hasattr(common, name)]
    for name in shrunk:
        setattr(common, name, SHRUNK[name])
    setattr(common, RECORDER, Recorder())
    configs, modules = [], []
    for path in sorted((scratch / TEST_FOLDER).glob("test_*.py")):
        file = f"{TEST_FOLDER}/{path.name}"
        try:
            module = importlib.import_module(f"{TEST_FOLDER}.{path.stem}")
        except Exception as exc:  # a module mergekit 0.1.5 cannot import
            modules.append({"file": file, "configs": 0, "note": f"import failed: {exc}"})
            continue
        if not hasattr(module, RECORDER):
            modules.append({"file": file, "configs": 0, "note": "builds no merge configuration"})
            continue
        for name in shrunk:
            if hasattr(module, name):
                setattr(module, name, SHRUNK[name])
        found = harvest_module(file, module, fixtures)
        configs += found
        modules.append({"file": file, "configs": len(found)})
    return {
        "revision": revision,
        "shrunk_fixtures": shrunk,
        "modules": modules,
        "configs": configs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mergekit-repo", type=Path, required=True)
    parser.add_argument("--fixtures", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    result = json.dumps(harvest(args.mergekit_repo, args.fixtures.resolve()), indent=1)
    if args.out:
        args.out.write_text(result)
    else:
        print(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
