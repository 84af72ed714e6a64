"""What each tensor of a checkpoint is, kept as data rather than code branches.

Every merge method and the DAM engine need the same few facts about a tensor: is it an embedding,
the output head, a norm, a linear weight inside a transformer block (and which of its dimensions
are the *input* columns), or a bias; and which block it belongs to. Those facts differ between
architectures only in naming, so each architecture is a :class:`ArchitectureSpec` of regular
expressions. An unknown architecture falls back to generic name patterns and says so.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class TensorKind(str, Enum):
    EMBEDDING = "embedding"
    LM_HEAD = "lm_head"
    NORM = "norm"
    LINEAR = "linear"
    BIAS = "bias"
    OTHER = "other"


@dataclass(frozen=True)
class TensorInfo:
    """Facts about one named tensor.

    ``layer`` is the transformer block index (None outside the blocks); ``input_dim`` is the
    dimension that indexes input features of a linear weight (1 for ``nn.Linear``'s
    ``(out, in)``, 0 for GPT-2's transposed ``Conv1D``), None for other kinds.
    """

    name: str
    kind: TensorKind
    layer: int | None = None
    input_dim: int | None = None
    module: str | None = None  # short module type, e.g. "q_proj", "mlp.c_fc"


@dataclass(frozen=True)
class ArchitectureSpec:
    """Naming rules of one architecture family (matched with ``re.search`` on tensor names)."""

    model_types: tuple[str, ...]
    layer_pattern: str
    embeddings: tuple[str, ...]
    lm_head: tuple[str, ...]
    norms: tuple[str, ...]
    linears: tuple[str, ...]
    transposed_linears: tuple[str, ...] = ()
    # tensors with one row per token id (the rows a tokenizer change permutes and extends)
    vocabulary: tuple[str, ...] = (r"embed_tokens\.weight$", r"^lm_head\.weight$")
    num_layers_keys: tuple[str, ...] = ("num_hidden_layers",)
    tie_default: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


_LLAMA_LINEARS = (
    r"self_attn\.(q_proj|k_proj|v_proj|o_proj)\.weight$",
    r"mlp\.(gate_proj|up_proj|down_proj)\.weight$",
)
_DECODER_NORMS = (r"norm\.weight$", r"norm\.bias$", r"layernorm\.weight$")

ARCHITECTURES: tuple[ArchitectureSpec, ...] = (
    ArchitectureSpec(
        model_types=("llama", "mistral", "qwen2", "qwen3", "olmo2"),
        layer_pattern=r"\.layers\.(\d+)\.",
        embeddings=(r"embed_tokens\.weight$",),
        lm_head=(r"^lm_head\.weight$",),
        norms=_DECODER_NORMS,
        linears=_LLAMA_LINEARS,
    ),
    ArchitectureSpec(
        model_types=("gemma", "gemma2", "gemma3_text"),
        layer_pattern=r"\.layers\.(\d+)\.",
        embeddings=(r"embed_tokens\.weight$",),
        lm_head=(r"^lm_head\.weight$",),
        norms=_DECODER_NORMS,
        linears=_LLAMA_LINEARS,
        tie_default=True,
    ),
    ArchitectureSpec(
        model_types=("phi3",),
        layer_pattern=r"\.layers\.(\d+)\.",
        embeddings=(r"embed_tokens\.weight$",),
        lm_head=(r"^lm_head\.weight$",),
        norms=_DECODER_NORMS,
        linears=(
            r"self_attn\.(qkv_proj|o_proj)\.weight$",
            r"mlp\.(gate_up_proj|down_proj)\.weight$",
        ),
    ),
    ArchitectureSpec(
        model_types=("gpt2",),
        layer_pattern=r"(?:^|\.)h\.(\d+)\.",
        embeddings=(r"wte\.weight$", r"wpe\.weight$"),
        lm_head=(r"^lm_head\.weight$",),
        norms=(r"ln_\w+\.(weight|bias)$",),
        linears=(),
        transposed_linears=(r"(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$",),
        vocabulary=(r"wte\.weight$", r"^lm_head\.weight$"),  # not wpe: one row per position
        num_layers_keys=("n_layer", "num_hidden_layers"),
        tie_default=True,
    ),
)

GENERIC = ArchitectureSpec(
    model_types=(),
    layer_pattern=r"\.(?:layers|h|blocks|block|layer)\.(\d+)\.",
    embeddings=(r"(embed|wte|wpe|word_embeddings)[\w.]*\.weight$",),
    lm_head=(r"^(lm_head|output|embed_out)\.weight$",),
    norms=(r"(norm|ln)[\w]*\.(weight|bias)$",),
    linears=(r"\.weight$",),
    vocabulary=(
        r"(embed_tokens|wte|word_embeddings)\.weight$",
        r"^(lm_head|output|embed_out)\.weight$",
    ),
)


def find_architecture(config: dict[str, Any]) -> ArchitectureSpec:
    """The spec for a ``config.json``; the generic fallback (with a warning) if unknown."""
    model_type = str(config.get("model_type", ""))
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    warnings.warn(
        f"architecture {model_type or '<no model_type>'!r} is not known to dammerge; tensors "
        "are classified by generic name patterns (block linears: 2-D '.weight' inside "
        "'layers.N'). Check the plan with --dry-run.",
        stacklevel=2,
    )
    return GENERIC


def _matches(patterns: tuple[str, ...], name: str) -> re.Match[str] | None:
    for pattern in patterns:
        match = re.search(pattern, name)
        if match:
            return match
    return None


@dataclass
class Architecture:
    """An architecture spec bound to one model's ``config.json``."""

    spec: ArchitectureSpec
    config: dict[str, Any]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Architecture:
        return cls(find_architecture(config), config)

    @property
    def num_layers(self) -> int | None:
        for key in self.spec.num_layers_keys:
            value = self.config.get(key)
            if isinstance(value, int):
                return value
        text = self.config.get("text_config")
        if isinstance(text, dict) and isinstance(text.get("num_hidden_layers"), int):
            return int(text["num_hidden_layers"])
        return None

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", self.spec.tie_default))

    def is_vocabulary(self, name: str) -> bool:
        """Whether tensor ``name`` has one row (first dimension) per token id: the input
        embedding and the output head, whose rows follow the tokenizer."""
        return _matches(self.spec.vocabulary, name) is not None

    def layer_index(self, name: str) -> int | None:
        match = re.search(self.spec.layer_pattern, name)
        return int(match.group(1)) if match else None

    def classify(self, name: str, ndim: int) -> TensorInfo:
        """Classify one tensor from its name and rank."""
        layer = self.layer_index(name)
        if _matches(self.spec.lm_head, name):
            return TensorInfo(name, TensorKind.LM_HEAD, None, 1 if ndim == 2 else None, "lm_head")
        if _matches(self.spec.embeddings, name):
            return TensorInfo(name, TensorKind.EMBEDDING, None, None, "embedding")
        if _matches(self.spec.norms, name):
            return TensorInfo(name, TensorKind.NORM, layer, None, "norm")
        if name.endswith(".bias"):
            return TensorInfo(name, TensorKind.BIAS, layer, None, _module_name(name))
        if ndim == 2 and layer is not None:
            if _matches(self.spec.transposed_linears, name):
                return TensorInfo(name, TensorKind.LINEAR, layer, 0, _module_name(name))
            if _matches(self.spec.linears, name):
                return TensorInfo(name, TensorKind.LINEAR, layer, 1, _module_name(name))
        return TensorInfo(name, TensorKind.OTHER, layer, None, _module_name(name))

    def depth_fraction(self, info: TensorInfo) -> float:
        """Position in [0, 1] used to interpolate gradient parameters over depth.

        Block tensors use ``layer / (num_layers - 1)`` (a single block sits at 1, as in
        mergekit); tensors before the blocks (embeddings) sit at 0 and tensors after them (final
        norm, ``lm_head``) at 1.
        """
        n = self.num_layers or 1
        if info.layer is not None:
            return 1.0 if n <= 1 else min(info.layer / (n - 1), 1.0)
        return 0.0 if info.kind == TensorKind.EMBEDDING else 1.0


def _module_name(name: str) -> str:
    parts = name.split(".")
    if parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    return parts[-1] if parts else name
