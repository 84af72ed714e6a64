"""A base model with a PEFT LoRA adapter applied: mergekit's ``base+adapter`` model reference.

The adapter is folded in one tensor at a time, when that tensor is read: a weight the adapter
targets comes back as ``W + scaling · B @ A`` (transposed for ``fan_in_fan_out`` layers and for
embeddings), a tensor the adapter stores whole (``modules_to_save``, trained biases, a saved
embedding) comes back as the adapter's copy, and every other tensor as the base's. Nothing is
written to disk and only one tensor's update is alive at a time, so a LoRA reference streams
like a plain folder. The arithmetic is the one ``PeftModel.merge_and_unload()`` does: the
low-rank product in float32 (peft upcasts half-precision adapters), added to the base weight and
rounded once to the base's dtype.

peft reads and validates ``adapter_config.json`` (defaults, ``rank_pattern`` and
``alpha_pattern`` matching, the list of LoRA variants); the adapter's tensors are read lazily
from its safetensors file, like the base's. Every check (adapter type, variants, target modules
the base lacks, shapes, ranks, pickles) runs when the reference is opened, before any compute.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from dammerge.checkpoint.reader import Checkpoint, _data_offsets, _dtype, _pread_tensor
from dammerge.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."  # how PeftModel.save_pretrained names the adapter's tensors
FOLD_HINT = (
    "merge the adapter into its base with peft (merge_and_unload) and list that folder instead"
)
RESAVE_HINT = "save the adapter again with PeftModel.save_pretrained"
FIT_HINT = "apply the adapter to the base model it was trained from"
MAX_LISTED = 8  # mismatches named in one error line
# LoraConfig settings that change what merging means beyond the plain low-rank update
UNSUPPORTED_SETTINGS = (
    "lora_bias",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "use_qalora",
)
LOW_RANK_SUFFIXES = {
    ".lora_A.weight": ("linear", "A"),
    ".lora_B.weight": ("linear", "B"),
    ".lora_embedding_A": ("embedding", "A"),
    ".lora_embedding_B": ("embedding", "B"),
}


def lora_reference_path(base: Path, adapter: Path) -> Path:
    """The identity of base folder ``base`` with adapter folder ``adapter`` applied, as a path
    (what plans and model cards show and key inputs by): the two resolved folders joined by
    ``+``, mergekit's spelling."""
    return Path(f"{base.resolve()}+{adapter.resolve()}")


@dataclass(frozen=True)
class LowRankUpdate:
    """The LoRA update of one base tensor: ``scaling · B @ A`` (transposed when ``transpose``)."""

    a_name: str
    b_name: str
    scaling: float
    transpose: bool


class AdapterTensors:
    """The tensors of an adapter file, read one at a time (safetensors, or a pickle when
    allowed)."""

    def __init__(self, folder: Path, *, allow_pickle: bool) -> None:
        safetensors, pickle = folder / ADAPTER_SAFETENSORS, folder / ADAPTER_PICKLE
        self.file = safetensors if safetensors.is_file() else pickle
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        self._pickled: dict[str, torch.Tensor] = {}
        if safetensors.is_file():
            self._open_safetensors()
        elif pickle.is_file():
            if not allow_pickle:
                raise CheckpointError(
                    f"LoRA adapter {folder} holds only pickle weights ({ADAPTER_PICKLE}); "
                    "pickles can run arbitrary code when loaded",
                    "convert it to safetensors, or pass --allow-pickle to load it with "
                    "torch.load(weights_only=True)",
                )
            self._open_pickle()
        else:
            raise CheckpointError(
                f"LoRA adapter {folder} has no {ADAPTER_SAFETENSORS}",
                "point after the '+' at the folder PeftModel.save_pretrained wrote",
            )

    def _open_safetensors(self) -> None:
        try:
            with safe_open(str(self.file), framework="pt", device="cpu") as handle:
                for name in handle.keys():  # noqa: SIM118 (not iterable)
                    sl = handle.get_slice(name)
                    self._meta[name] = (tuple(sl.get_shape()), _dtype(sl.get_dtype()))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"cannot read {self.file}: truncated or corrupt ({str(exc).splitlines()[0]})",
                "download or copy that file again",
            ) from None
        self._offsets = _data_offsets(self.file)

    def _open_pickle(self) -> None:
        try:
            state = torch.load(self.file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # torch raises many types for bad pickles
            raise CheckpointError(
                f"cannot load pickle {self.file}: {str(exc).splitlines()[0]}",
                "even with --allow-pickle only plain tensors are accepted (weights_only=True)",
            ) from None
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise CheckpointError(
                f"{self.file} is not a plain state dict of named tensors", RESAVE_HINT
            )
        self._pickled = state
        self._meta = {name: (tuple(t.shape), t.dtype) for name, t in state.items()}

    def names(self) -> list[str]:
        return list(self._meta)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def get(self, name: str) -> torch.Tensor:
        if name in self._pickled:
            return self._pickled[name]
        try:
            return _pread_tensor(self.file, self._offsets[name], *self._meta[name])
        except OSError as exc:
            raise CheckpointError(
                f"cannot read {name!r} from {self.file}: {exc}", "copy the adapter folder again"
            ) from None


def read_lora_config(folder: Path) -> Any:
    """The adapter's ``adapter_config.json`` as peft's ``LoraConfig``, refused with a one-line
    error when it is missing, not JSON, not a LoRA adapter, or a LoRA variant whose merge is
    more than the low-rank update."""
    from peft import LoraConfig  # imported here: only LoRA references need peft

    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(
            f"LoRA adapter {folder} has no {ADAPTER_CONFIG}",
            "point after the '+' at the folder PeftModel.save_pretrained wrote",
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}", RESAVE_HINT) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object", RESAVE_HINT)
    kind = data.get("peft_type")
    if kind != "LORA":
        raise CheckpointError(
            f"{folder} is a {kind or 'untyped'} adapter; only LoRA adapters (peft_type LORA) "
            "can be applied with model+adapter",
            FOLD_HINT,
        )
    known = {field.name for field in dataclasses.fields(LoraConfig)}
    unknown = sorted(key for key, value in data.items() if key not in known and value)
    if unknown:
        raise CheckpointError(
            f"{path} sets {unknown[0]!r}, which this peft version does not know",
            FOLD_HINT,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns about keys it ignores (checked above)
        try:
            config = LoraConfig.from_pretrained(str(folder))
        except (TypeError, ValueError, KeyError) as exc:
            raise CheckpointError(
                f"{path} is not a valid LoRA config: {exc}", RESAVE_HINT
            ) from None
    _check_plain_lora(config, path)
    return config


def _check_plain_lora(config: Any, path: Path) -> None:
    """Refuse the LoRA variants (DoRA and the others peft tags as variants) and the settings
    whose merge adds more than ``scaling · B @ A``."""
    variants = [
        field.name
        for field in dataclasses.fields(config)
        if field.metadata.get("is_lora_variant") and getattr(config, field.name)
    ]
    init_variants = [
        f"init_lora_weights={config.init_lora_weights}"
        for field in dataclasses.fields(config)
        if field.name == "init_lora_weights"
        and config.init_lora_weights in field.metadata.get("lora_variants", ())
    ]
    settings = [name for name in UNSUPPORTED_SETTINGS if getattr(config, name, None)]
    found = variants + init_variants + settings
    if found:
        raise CheckpointError(
            f"{path} sets {found[0]}: only plain LoRA adapters can be applied with model+adapter",
            FOLD_HINT,
        )
    for key in ("r", "lora_alpha"):
        values = [getattr(config, key)]
        values += list((config.rank_pattern if key == "r" else config.alpha_pattern).values())
        if not all(_is_positive_number(v) for v in values):
            raise CheckpointError(
                f"{path}: '{key}' must be a positive number, got {values}", RESAVE_HINT
            )


def _is_positive_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


class LoraAdapter:
    """A PEFT LoRA adapter folder: which base tensors it changes, and how."""

    def __init__(self, folder: str | Path, *, allow_pickle: bool = False) -> None:
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise CheckpointError(
                f"LoRA adapter folder not found: {folder}",
                "the part after '+' must be a local PEFT adapter folder "
                f"({ADAPTER_CONFIG} + {ADAPTER_SAFETENSORS})",
            )
        self.path = path.resolve()
        self.config = read_lora_config(self.path)
        self.tensors = AdapterTensors(self.path, allow_pickle=allow_pickle)
        self.updates: dict[str, LowRankUpdate] = {}
        self.replacements: dict[str, str] = {}  # base tensor -> adapter tensor stored whole
        self._index()

    @property
    def name(self) -> str:
        return self.path.name

    def _index(self) -> None:
        """Sort the adapter's tensors into low-rank pairs and whole replacements."""
        pairs: dict[str, dict[str, str]] = {}
        kinds: dict[str, str] = {}
        for stored in self.tensors.names():
            if not stored.startswith(PEFT_PREFIX):
                raise CheckpointError(
                    f"LoRA adapter {self.path} holds {stored!r}, not named as peft names "
                    f"adapter tensors ({PEFT_PREFIX}...)",
                    RESAVE_HINT,
                )
            name = stored.removeprefix(PEFT_PREFIX)
            low_rank = next((s for s in LOW_RANK_SUFFIXES if name.endswith(s)), None)
            if low_rank is not None:
                module = name.removesuffix(low_rank)
                kind, factor = LOW_RANK_SUFFIXES[low_rank]
                pairs.setdefault(module, {})[factor] = stored
                kinds[module] = kind
            elif ".lora_" in name:
                raise CheckpointError(
                    f"LoRA adapter {self.path} holds {name!r}, which is not a plain LoRA factor",
                    FOLD_HINT,
                )
            else:
                self.replacements[name.replace(".base_layer.", ".")] = stored
        for module, factors in pairs.items():
            if set(factors) != {"A", "B"}:
                missing = "B" if "A" in factors else "A"
                raise CheckpointError(
                    f"LoRA adapter {self.path} lacks lora_{missing} of {module}",
                    RESAVE_HINT,
                )
            self.updates[f"{module}.weight"] = self._update(module, kinds[module], factors)

    def _update(self, module: str, kind: str, factors: dict[str, str]) -> LowRankUpdate:
        """One module's update, its scaling from the config as peft computes it
        (``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``; per-module patterns)."""
        from peft.utils.other import get_pattern_key

        config = self.config
        rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern, module), config.r)
        alpha = config.alpha_pattern.get(
            get_pattern_key(config.alpha_pattern, module), config.lora_alpha
        )
        a_shape, b_shape = self.tensors.shape(factors["A"]), self.tensors.shape(factors["B"])
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise CheckpointError(
                f"LoRA adapter {self.path}: {module} has factors A {list(a_shape)} and "
                f"B {list(b_shape)}, which do not multiply",
                "the adapter file is corrupt; save it again",
            )
        if a_shape[0] != rank:
            raise CheckpointError(
                f"LoRA adapter {self.path}: {module} has rank {a_shape[0]} but its "
                f"{ADAPTER_CONFIG} says r={rank}",
                "the adapter's config and weights disagree; save it again",
            )
        scaling = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
        transpose = kind == "embedding" or bool(config.fan_in_fan_out)
        return LowRankUpdate(factors["A"], factors["B"], scaling, transpose)

    def update_shape(self, update: LowRankUpdate) -> tuple[int, ...]:
        rows = self.tensors.shape(update.b_name)[0]
        columns = self.tensors.shape(update.a_name)[1]
        return (columns, rows) if update.transpose else (rows, columns)

    def check_fits(self, base: Checkpoint) -> None:
        """Every tensor the adapter changes exists in ``base`` as a float tensor of the
        adapter's shape (all problems at once, the first few listed)."""
        problems: list[str] = []
        wanted = [(name, self.update_shape(u)) for name, u in self.updates.items()]
        wanted += [(name, self.tensors.shape(s)) for name, s in self.replacements.items()]
        for name, shape in wanted:
            if name not in base:
                problems.append(f"the base lacks {name}")
            elif not base.dtype(name).is_floating_point:
                problems.append(f"{name} of the base is not a float tensor")
            elif base.shape(name) != shape:
                problems.append(f"{name}: base {list(base.shape(name))} vs adapter {list(shape)}")
        if problems:
            listed = "; ".join(problems[:MAX_LISTED])
            more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
            raise CheckpointError(
                f"LoRA adapter {self.path} does not fit base {base.folder}: {listed}{more}",
                FIT_HINT,
            )

    def fold(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """Tensor ``name`` with the adapter applied, in ``weight``'s dtype."""
        stored = self.replacements.get(name)
        if stored is not None:
            weight = self.tensors.get(stored).to(weight.dtype)
        update = self.updates.get(name)
        if update is None:
            return weight
        a, b = self.tensors.get(update.a_name), self.tensors.get(update.b_name)
        compute = torch.promote_types(b.dtype, torch.float32)
        product = b.to(compute) @ a.to(compute)
        delta = (product.T if update.transpose else product) * update.scaling
        return (weight + delta).to(weight.dtype)  # one rounding, as peft's in-place add


class LoraCheckpoint(Checkpoint):
    """A base model folder read with a LoRA adapter folded into its tensors.

    ``path`` is the reference's identity (``base+adapter``, see :func:`lora_reference_path`);
    ``folder`` is the base folder, whose config, tokenizer and generation config the merged
    model inherits.
    """

    def __init__(
        self, base: str | Path, adapter: str | Path, *, allow_pickle: bool = False
    ) -> None:
        super().__init__(base, allow_pickle=allow_pickle)
        self._base_folder = self.path
        self.adapter = LoraAdapter(adapter, allow_pickle=allow_pickle)
        self.adapter.check_fits(self)
        self.path = lora_reference_path(self._base_folder, self.adapter.path)

    @property
    def folder(self) -> Path:
        return self._base_folder

    @property
    def name(self) -> str:
        return f"{self._base_folder.name}+{self.adapter.name}"

    def source_folders(self) -> list[Path]:
        return [self._base_folder, self.adapter.path]

    def get(self, name: str, *, pinned: bool = False) -> torch.Tensor:
        """Tensor ``name`` of the base with the adapter folded in (folded on the CPU, then
        copied to page-locked memory when ``pinned``)."""
        folded = self.adapter.fold(name, super().get(name))
        return folded.pin_memory() if pinned and not folded.is_pinned() else folded

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        if name not in self.adapter.updates and name not in self.adapter.replacements:
            return super().get_rows(name, start, stop)
        return self.get(name)[max(0, start) : max(0, stop)].clone()


def open_model(model: str, lora: str | None = None, *, allow_pickle: bool = False) -> Checkpoint:
    """The checkpoint a recipe's model reference names: folder ``model``, with adapter folder
    ``lora`` folded in when given."""
    if lora is None:
        return Checkpoint(model, allow_pickle=allow_pickle)
    return LoraCheckpoint(model, lora, allow_pickle=allow_pickle)
