"""The recipe's ``chat_template:``: a template name, a literal Jinja template, or ``auto``.

- a name (no ``{`` in it) is one of :data:`dammerge.templates.CHAT_TEMPLATES`, the names
  mergekit 0.1.5 ships (``alpaca``, ``chatml``, ``exaone``, ``llama3``, ``mistral``);
- anything with a ``{`` is a Jinja template, checked by compiling it as transformers does;
- ``auto`` takes the template most of the input models' tokenizers carry (the first model's in
  the recipe's order on a tie), and leaves the output's own when none carries one.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dammerge.data.tokenizer import load_tokenizer
from dammerge.errors import ConfigError
from dammerge.templates import CHAT_TEMPLATES
from dammerge.vocabulary.build import has_tokenizer

AUTO = "auto"


class NoChatTemplateWarning(UserWarning):
    """``chat_template: auto`` found no template among the input models."""


def chat_template_text(spec: str, models: Iterable[Path]) -> str | None:
    """The Jinja text ``spec`` stands for (None: ``auto`` found none); ``models`` are the
    recipe's model folders in its order, for ``auto``."""
    if spec == AUTO:
        return _most_common_template(models)
    if "{" not in spec:
        if spec not in CHAT_TEMPLATES:
            raise ConfigError(
                f"unknown chat_template {spec!r}",
                f"use one of {', '.join(sorted(CHAT_TEMPLATES))}, auto, or a Jinja template",
            )
        return CHAT_TEMPLATES[spec]
    _check_jinja(spec)
    return spec


def _check_jinja(template: str) -> None:
    """Compile ``template`` with transformers' chat-template environment."""
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(template)
    except TemplateError as exc:
        line = f" (line {exc.lineno})" if getattr(exc, "lineno", None) else ""
        raise ConfigError(
            f"chat_template is not a valid Jinja template: {exc}{line}".splitlines()[0],
            "fix the template, or name one: " + ", ".join(sorted(CHAT_TEMPLATES)),
        ) from None


def template_of(tokenizer: Any) -> str | None:
    """A tokenizer's chat template (the default one of a named set), stripped."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    return template.strip() if isinstance(template, str) and template.strip() else None


def _most_common_template(models: Iterable[Path]) -> str | None:
    found = []
    for folder in dict.fromkeys(models):
        if has_tokenizer(folder):
            template = template_of(load_tokenizer(folder))
            if template is not None:
                found.append(template)
    if not found:
        warnings.warn(
            "chat_template: auto found no chat template in the models' tokenizers; the "
            "output keeps its tokenizer's",
            NoChatTemplateWarning,
            stacklevel=2,
        )
        return None
    return Counter(found).most_common(1)[0][0]
