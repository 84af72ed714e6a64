"""Runs recipe files with mergekit in one long-lived process, as ``mergekit-yaml`` would.

Started by bench/mergekit_corpus.py with mergekit's own interpreter (``.venv-mergekit``): each
line on stdin is a JSON request ``{"recipe": FILE, "out": FOLDER, "lora_cache": FOLDER}``,
answered by one JSON line ``{"ran": bool, "error": str | null}``. The merge is what
``mergekit-yaml FILE FOLDER --lora-merge-cache CACHE`` does with its default options (read the
YAML, validate it as a ``MergeConfiguration``, ``run_merge``); importing torch, transformers and
mergekit once instead of once per recipe is what makes a corpus of a few hundred runs light.
Anything the merge prints goes to stderr, so stdout carries only the answers.
"""

from __future__ import annotations

import contextlib
import json
import sys
import traceback
from typing import Any

import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions


def run_request(request: dict[str, Any]) -> dict[str, Any]:
    """One recipe file merged into ``out``; a failure is its exception's last line."""
    try:
        with open(request["recipe"], encoding="utf-8") as file:
            source = file.read()
        options = MergeOptions(lora_merge_cache=request.get("lora_cache"))
        options.apply_global_options()
        config = MergeConfiguration.model_validate(yaml.safe_load(source))
        run_merge(config, request["out"], options=options, config_source=source)
    except Exception as exc:  # the corpus records why mergekit failed, and goes on
        traceback.print_exc(file=sys.stderr)
        lines = traceback.format_exception_only(exc)[-1].strip().splitlines()
        return {"ran": False, "error": lines[-1] if lines else type(exc).__name__}
    return {"ran": True, "error": None}


def main() -> int:
    answers = sys.stdout
    for line in sys.stdin:
        if not line.strip():
            continue
        with contextlib.redirect_stdout(sys.stderr):
            answer = run_request(json.loads(line))
        answers.write(json.dumps(answer) + "\n")
        answers.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
