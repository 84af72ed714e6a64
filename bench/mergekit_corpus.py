"""mergekit's own recipes, run unchanged by mergekit 0.1.5 and by dammerge on tiny local models.

The corpus is every merge recipe in a mergekit checkout: each YAML file under ``examples/`` (and
under ``tests/``, should it hold any: its test configurations are Python objects today), and each
fenced YAML block of its README and ``docs/`` that is a whole recipe (one document with a
``merge_method``). Fragments, ``mergekit-multi`` files of several documents, and evolve or MoE
configurations are listed as skipped, with the reason.

Each recipe is rewritten as a user would, changing only its model references: every model it
names becomes a tiny random-init checkpoint of the same architecture family (guessed from the
name: Mistral, Qwen, Gemma, Phi, GPT-2, else Llama), as deep as the deepest ``layer_range`` it
reads; its ``base_model`` is the tiny base and every other model a seeded "fine-tune" of it, and
a ``base+adapter`` reference gets a PEFT LoRA adapter of the base. Then ``mergekit-yaml`` (from
``.venv-mergekit``) and :func:`dammerge.merge` each run it, and the result records per recipe:
whether each tool ran (mergekit's last error line, dammerge's one-line refusal otherwise), and
when both did, whether they wrote the same tensor names, shapes and dtypes, the largest
difference in units in the last place (ulp) per output dtype, how many entries differ by more
than one ulp, and whether transformers loads dammerge's output. For a half-precision recipe
mergekit also runs it in float32 on copies of the inputs already rounded to the half dtype: that
result rounded once is the correctly rounded one dammerge computes (mergekit computes the
task-arithmetic family in the half dtype itself), so this second comparison separates the
rounding difference docs/mergekit.md describes from any other.

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python bench/mergekit_corpus.py
    ... --mergekit-repo PATH   # a mergekit checkout, or a bare git mirror of one (read at HEAD)
    ... --only TEXT            # rerun the entries whose source contains TEXT (repeatable);
                               # their runs are updated in the results, the others kept

The mergekit checkout is only read (``git show`` for a bare mirror); nothing of it is copied
into this repository. Tiny models and outputs live under bench/.work/ (git-ignored); results go
to bench/results/mergekit_corpus.json and are summarised in docs/mergekit.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
# bench scripts run as files, not as a package: import the shared helpers beside them
from _common import machine_info, timestamp, write_json

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "bench" / ".work" / "mergekit_corpus"
RESULTS = REPO / "bench" / "results" / "mergekit_corpus.json"
DEFAULT_MERGEKIT_REPO = Path("/work/.mirror/arcee-ai+mergekit/repo")
MERGEKIT_BIN = REPO / ".venv-mergekit" / "bin"
DEFAULT_DEPTH = 4  # layers of a tiny model when no layer_range asks for more
WORKER = "mergekit_worker.py"
HARVESTER = "mergekit_harvest.py"
# the first keyword found in a model's name gives its family; anything else is Llama-like
FAMILY_KEYWORDS = (
    ("mistral", "mistral"),
    ("qwen3", "qwen3"),
    ("qwen", "qwen2"),
    ("gemma", "gemma"),
    ("phi", "phi3"),
    ("gpt2", "gpt2"),
)
LAYER_KEYS = {"gpt2": "n_layer"}  # the config key for the layer count, where not the default
LORA_TARGETS = {"gpt2": ("c_attn",)}  # adapter target modules, where not q_proj/v_proj
TOKENIZER_KEYWORDS = {"base", "union"}
FENCE = re.compile(r"^```ya?ml[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


# -- the corpus -------------------------------------------------------------------------------
class MergekitSource:
    """Read-only access to a mergekit checkout, or to a bare git mirror of one at HEAD."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.bare = not (path / "examples").is_dir()

    def _git(self, *args: str) -> str:
        where = ["--git-dir", str(self.path)] if self.bare else ["-C", str(self.path)]
        done = subprocess.run(["git", *where, *args], capture_output=True, text=True, check=True)
        return done.stdout

    def files(self) -> list[str]:
        if self.bare:
            return self._git("ls-tree", "-r", "--name-only", "HEAD").splitlines()
        return sorted(
            p.relative_to(self.path).as_posix()
            for p in self.path.rglob("*")
            if p.is_file() and ".git" not in p.parts
        )

    def read(self, name: str) -> str:
        if self.bare:
            return self._git("show", f"HEAD:{name}")
        return (self.path / name).read_text()

    def revision(self) -> str:
        return self._git("rev-parse", "HEAD").strip()


@dataclass
class CorpusEntry:
    """One place in the checkout that holds YAML: a recipe, or why it is not one."""

    source: str
    recipe: dict[str, Any] | None = None
    skipped: str | None = None
    local: bool = False  # its models are local folders already (a harvested test config)
    expects_failure: bool = False  # mergekit's test expects this merge to fail


def as_recipe(source: str, text: str) -> CorpusEntry:
    """The YAML ``text`` found at ``source`` as a recipe, or the reason it is not one."""
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError:
        return CorpusEntry(source, skipped="not valid YAML (a fragment with placeholders)")
    if len(documents) > 1:
        return CorpusEntry(source, skipped="several documents (a mergekit-multi file)")
    if not documents or not isinstance(documents[0], dict):
        return CorpusEntry(source, skipped="not a mapping")
    recipe = documents[0]
    if "merge_method" not in recipe:
        return CorpusEntry(source, skipped=f"no merge_method (keys: {', '.join(recipe)})")
    return CorpusEntry(source, recipe=recipe)


def markdown_blocks(text: str) -> list[str]:
    """The fenced ``yaml``/``yml`` code blocks of a markdown text."""
    return [match.group(1) for match in FENCE.finditer(text)]


def collect_corpus(source: MergekitSource) -> list[CorpusEntry]:
    """Every YAML file under examples/ and tests/, and every YAML block of the README and docs/."""
    entries = []
    for name in source.files():
        top = name.split("/", 1)[0]
        if top in ("examples", "tests") and name.endswith((".yml", ".yaml")):
            entries.append(as_recipe(name, source.read(name)))
        elif name.endswith(".md") and (top == "docs" or "/" not in name):
            for index, block in enumerate(markdown_blocks(source.read(name)), start=1):
                entries.append(as_recipe(f"{name}#yaml-{index}", block))
    return entries


TEST_DTYPES = ("float32", "float16", "bfloat16")


def harvest_test_configs(repo: Path, bin_dir: Path, work: Path) -> tuple[list[CorpusEntry], dict]:
    """mergekit's test configurations (bench/mergekit_harvest.py, run with mergekit's
    interpreter, records each ``MergeConfiguration`` its tests build, on mergekit's own test
    fixtures), each as three entries: in float32, float16 and bfloat16, whatever ``dtype`` the
    test set; and what the harvest says of each test module."""
    out = work / "harvest.json"
    command = [str(bin_dir / "python"), str(Path(__file__).with_name(HARVESTER))]
    command += [
        "--mergekit-repo",
        str(repo),
        "--fixtures",
        str(work / "fixtures"),
        "--out",
        str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run(command, env=env, check=True, capture_output=True)
    harvest = json.loads(out.read_text())
    entries = [
        CorpusEntry(
            config["source"],
            recipe={**config["config"], "dtype": dtype},
            local=True,
            expects_failure=config["expects_failure"],
        )
        for config in harvest["configs"]
        for dtype in TEST_DTYPES
    ]
    about = {key: harvest[key] for key in ("revision", "shrunk_fixtures", "modules")}
    return entries, about


# -- rewriting the model references -----------------------------------------------------------
def model_references(recipe: dict[str, Any]) -> list[str]:
    """Every model reference of a recipe, in order of first appearance, each once:
    ``base_model``, each model, each slice's sources and base, and a model ``tokenizer_source``."""
    found: list[str] = []

    def add(value: Any) -> None:
        if isinstance(value, str) and value not in found:
            found.append(value)

    add(recipe.get("base_model"))
    for entry in recipe.get("models") or []:
        add(entry.get("model") if isinstance(entry, dict) else None)
    for out_slice in recipe.get("slices") or []:
        add(out_slice.get("base_model"))
        for source in out_slice.get("sources") or []:
            add(source.get("model"))
    tokenizer_source = recipe.get("tokenizer_source")
    if tokenizer_source not in TOKENIZER_KEYWORDS:
        add(tokenizer_source)
    return found


def family_of(reference: str) -> str:
    """The architecture family a model name suggests (a recipe's models share the base's)."""
    name = reference.lower()
    return next((family for key, family in FAMILY_KEYWORDS if key in name), "llama")


def recipe_depth(recipe: dict[str, Any]) -> int:
    """Layers the tiny models need: the deepest ``layer_range`` end, or :data:`DEFAULT_DEPTH`."""
    ends = [
        int(source["layer_range"][1])
        for out_slice in recipe.get("slices") or []
        for source in out_slice.get("sources") or []
        if isinstance(source.get("layer_range"), list)
    ]
    return max([DEFAULT_DEPTH, *ends])


@dataclass(frozen=True)
class ModelRole:
    """What a reference becomes: the tiny base (``variant`` None) or its variant number
    ``variant``, plus LoRA adapter number ``adapter`` for a ``base+adapter`` reference."""

    variant: int | None
    adapter: int | None = None


def assign_roles(recipe: dict[str, Any]) -> dict[str, ModelRole]:
    """Each reference's role: the recipe's ``base_model`` is the tiny base, every other model
    its own variant (the same reference is the same model throughout); the part before a
    ``+`` is a model like any other, the part after it an adapter of its own."""
    base = recipe.get("base_model")
    variants: dict[str, int | None] = {}
    if isinstance(base, str):
        variants[base.partition("+")[0]] = None
    roles: dict[str, ModelRole] = {}
    adapters = 0
    for reference in model_references(recipe):
        model, _, adapter = reference.partition("+")
        if model not in variants:
            variants[model] = sum(v is not None for v in variants.values())
        roles[reference] = ModelRole(variants[model], adapters if adapter else None)
        adapters += bool(adapter)
    return roles


def rewrite(node: Any, mapping: dict[str, str]) -> Any:
    """A copy of ``node`` with every string equal to a key of ``mapping`` replaced (model
    references sit in many places: models, slices, tokenizer sources); nothing else changes."""
    if isinstance(node, str):
        return mapping.get(node, node)
    if isinstance(node, dict):
        return {key: rewrite(value, mapping) for key, value in node.items()}
    if isinstance(node, list):
        return [rewrite(value, mapping) for value in node]
    return node


class TinyModels:
    """Tiny checkpoints built once per (family, depth) under ``root`` and reused."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _folder(self, family: str, depth: int) -> Path:
        return self.root / f"{family}-{depth}"

    def base(self, family: str, depth: int) -> Path:
        from dammerge.testing import make_tiny_model

        folder = self._folder(family, depth) / "base"
        if not (folder / "config.json").is_file():
            layers = {LAYER_KEYS.get(family, "num_hidden_layers"): depth}
            make_tiny_model(folder, family, **layers)
        return folder

    def variant(self, family: str, depth: int, index: int) -> Path:
        from dammerge.testing import make_variant

        folder = self._folder(family, depth) / f"ft{index}"
        if not (folder / "config.json").is_file():
            make_variant(self.base(family, depth), folder, seed=100 + index)
        return folder

    def adapter(self, family: str, depth: int, index: int) -> Path:
        from dammerge.testing import make_lora_adapter

        folder = self._folder(family, depth) / f"lora{index}"
        if not (folder / "adapter_config.json").is_file():
            targets = LORA_TARGETS.get(family, ("q_proj", "v_proj"))
            make_lora_adapter(
                self.base(family, depth), folder, seed=index, target_modules=targets, r=4
            )
        return folder

    def rounded(self, folder: Path, dtype: torch.dtype) -> Path:
        """A copy of tiny model ``folder`` with its float tensors stored in ``dtype``."""
        name = str(dtype).removeprefix("torch.")
        copy = folder.parent / f"{folder.name}-{name}"
        if not (copy / "model.safetensors").is_file():
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("*.safetensors"))
            state = {
                key: t.to(dtype) if t.is_floating_point() else t
                for key, t in load_tensors(folder).items()
            }
            save_file(state, copy / "model.safetensors", metadata={"format": "pt"})
        return copy

    def local(self, role: ModelRole, family: str, depth: int) -> str:
        """The folder (or ``base+adapter`` pair) a reference with ``role`` becomes."""
        if role.variant is None:
            model = self.base(family, depth)
        else:
            model = self.variant(family, depth, role.variant)
        if role.adapter is None:
            return str(model)
        return f"{model}+{self.adapter(family, depth, role.adapter)}"


def localise(recipe: dict[str, Any], models: TinyModels) -> tuple[dict[str, Any], dict[str, str]]:
    """The recipe with every model reference replaced by a tiny local model of its family,
    and the replacement made (reference -> local folder, or ``base+adapter`` pair)."""
    references = model_references(recipe)
    anchor = recipe.get("base_model") or (references[0] if references else "")
    family, depth = family_of(str(anchor)), recipe_depth(recipe)
    roles = assign_roles(recipe)
    mapping = {ref: models.local(role, family, depth) for ref, role in roles.items()}
    return rewrite(recipe, mapping), mapping


# -- running and comparing --------------------------------------------------------------------
@dataclass
class Outcome:
    ran: bool
    message: str | None = None  # mergekit's last error line, or dammerge's refusal
    warnings: list[str] = field(default_factory=list)


class MergekitWorker:
    """mergekit run in one long-lived process (bench/mergekit_worker.py, mergekit's own
    interpreter): each recipe file is merged as ``mergekit-yaml`` merges it, without paying
    mergekit's import time once per recipe. Restarted if it dies."""

    def __init__(self, bin_dir: Path, log: Path) -> None:
        self.bin_dir = bin_dir
        self.log = log
        self.process: subprocess.Popen[str] | None = None

    def _start(self) -> subprocess.Popen[str]:
        if self.process is None or self.process.poll() is not None:
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
            self.log.parent.mkdir(parents=True, exist_ok=True)
            self.process = subprocess.Popen(
                [str(self.bin_dir / "python"), str(Path(__file__).with_name(WORKER))],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self.log.open("a"),
                text=True,
                env=env,
            )
        return self.process

    def run(self, recipe: Path, out: Path, cache: Path) -> Outcome:
        """Merge the recipe file into ``out`` (plus a LoRA cache folder, which a
        ``+adapter`` reference needs); a failure is mergekit's last error line."""
        process = self._start()
        assert process.stdin is not None and process.stdout is not None
        request = {"recipe": str(recipe), "out": str(out), "lora_cache": str(cache)}
        process.stdin.write(json.dumps(request) + "\n")
        process.stdin.flush()
        answer = process.stdout.readline()
        if not answer:
            return Outcome(False, f"mergekit's process ended (see {self.log})")
        reply = json.loads(answer)
        return Outcome(reply["ran"], reply["error"])

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            self.process.wait(timeout=60)


def run_dammerge(recipe: Path, out: Path) -> Outcome:
    """:func:`dammerge.merge` on the recipe file; a refusal is its one line and hint."""
    import dammerge
    from dammerge.errors import DammergeError

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            dammerge.merge(recipe, out, progress=False)
        except DammergeError as exc:
            hint = f" (hint: {exc.hint})" if exc.hint else ""
            return Outcome(False, f"{exc.message}{hint}")
        except Exception as exc:  # a crash is a bug to report, not a refusal
            return Outcome(False, f"crashed: {type(exc).__name__}: {exc}".splitlines()[0])
    noted = [str(w.message) for w in caught if "dammerge" in type(w.message).__module__]
    return Outcome(True, warnings=noted)


# methods whose result depends on random draws (mergekit's and dammerge's differ by design)
RANDOM_METHODS = {"dare_linear", "dare_ties", "della", "della_linear"}
HALF = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Entry by entry, how many values of their (shared, float) dtype lie between ``a`` and
    ``b``: 0 when equal (+0 and -0 included), 1 for neighbours."""
    assert a.dtype == b.dtype and a.dtype.is_floating_point
    bits = 8 * a.element_size()

    def ordered(x: torch.Tensor) -> torch.Tensor:
        raw = x.contiguous().view(INT_VIEW[a.element_size()]).long()
        return torch.where(raw < 0, -(2 ** (bits - 1)) - raw, raw)

    return (ordered(a) - ordered(b)).abs()


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def compare(
    ours: Path,
    theirs: Path,
    round_to: torch.dtype | None = None,
    read: Callable[[Path], dict[str, torch.Tensor]] = load_tensors,
) -> dict[str, Any]:
    """The two outputs' tensor names, shapes and dtypes, and per dammerge output dtype the
    largest difference in ulps and the entries more than one ulp apart. A float tensor that
    mergekit wrote in another dtype is rounded to dammerge's before the values are compared (and
    listed under ``dtype_differs``); ``round_to`` rounds all of mergekit's float tensors first
    (a float32 reference rounded once). ``read`` gives a folder's tensors by name: as stored,
    or as transformers loads them (:func:`loaded_tensors`)."""
    a, b = read(ours), read(theirs)
    if round_to is not None:
        b = {k: t.to(round_to) if t.is_floating_point() else t for k, t in b.items()}
    result: dict[str, Any] = {
        "only_dammerge": sorted(set(a) - set(b))[:5],
        "only_mergekit": sorted(set(b) - set(a))[:5],
        "shape_differs": [],
        "dtype_differs": [],
        "max_ulp": {},
        "entries_over_one_ulp": {},
        "entries": {},
    }
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        if x.shape != y.shape:
            result["shape_differs"].append(f"{name}: {list(x.shape)} vs {list(y.shape)}")
            continue
        if x.dtype != y.dtype:
            result["dtype_differs"].append(f"{name}: {x.dtype} vs {y.dtype}")
            y = y.to(x.dtype)
        _add_distance(result, x, y)
    result["dtype_differs"] = _first_few(result["dtype_differs"])
    result["same_tensors"] = not (
        result["only_dammerge"]
        or result["only_mergekit"]
        or result["shape_differs"]
        or result["dtype_differs"]
    )
    result["within_one_ulp"] = not (
        result["only_dammerge"] or result["only_mergekit"] or result["shape_differs"]
    ) and all(v <= 1 for v in result["max_ulp"].values())
    return result


def _add_distance(result: dict[str, Any], x: torch.Tensor, y: torch.Tensor) -> None:
    """Fold the ulp distances of one tensor pair (same dtype) into the per-dtype totals."""
    distance = ulp_distance(x, y) if x.dtype.is_floating_point else (x != y).long()
    key = str(x.dtype).removeprefix("torch.")
    largest = int(distance.max()) if distance.numel() else 0
    result["max_ulp"][key] = max(result["max_ulp"].get(key, 0), largest)
    over = int((distance > 1).sum())
    result["entries_over_one_ulp"][key] = result["entries_over_one_ulp"].get(key, 0) + over
    result["entries"][key] = result["entries"].get(key, 0) + distance.numel()


def _first_few(items: list[str], count: int = 3) -> list[str]:
    """The first ``count`` items, and how many more there are."""
    more = [f"... and {len(items) - count} more"] if len(items) > count else []
    return items[:count] + more


def model_class(folder: Path) -> Any:
    """The transformers class ``config.json``'s ``architectures`` names (a causal LM, or e.g.
    ``LlavaForConditionalGeneration``)."""
    import transformers

    config = json.loads((folder / "config.json").read_text())
    names = config.get("architectures") or ["AutoModelForCausalLM"]
    return getattr(transformers, names[0], transformers.AutoModelForCausalLM)


def transformers_loads(folder: Path) -> bool | str:
    """True when transformers loads the folder as its ``architectures`` class, else its error
    line."""
    try:
        model_class(folder).from_pretrained(folder)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return True


def loaded_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The folder's tensors as transformers loads them, under the model's own parameter names:
    two checkpoints that store one model under different key layouts (transformers 5's
    conversion of multimodal checkpoints) compare equal here. Parameters the checkpoint lacks
    (which transformers initialises at random) are left out."""
    model, info = model_class(folder).from_pretrained(
        folder, dtype="auto", output_loading_info=True
    )
    missing = set(info["missing_keys"])  # initialised at random: not in the checkpoint
    return {n: t.detach() for n, t in model.state_dict().items() if n not in missing}


def loaded_names(folder: Path) -> dict[str, str]:
    """Each tensor name stored in the folder, mapped to the parameter name transformers loads
    it under (:func:`loaded_tensors`' names): the model class's checkpoint conversion mapping,
    applied by transformers' own renaming function as ``from_pretrained`` applies it (for
    LLaVA, e.g. ``vision_tower.`` becomes ``model.vision_tower.``). A tensor that a conversion
    transforms, not only renames, is left out: what loads under the new name is not the stored
    value."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    model = model_class(folder).from_pretrained(folder, dtype="auto")
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    parameters, prefix = model.state_dict(), model.base_model_prefix
    names = {}
    for stored in load_tensors(folder):
        loaded, converted = rename_source_key(stored, renamings, converters, prefix, parameters)
        if loaded not in parameters and stored in parameters:  # transformers' own fallback
            loaded, converted = rename_source_key(stored, [], [], prefix, parameters)
        if loaded in parameters and converted is None:
            names[stored] = loaded
    return names


def run_entry(entry: CorpusEntry, models: TinyModels, work: Path, mergekit: MergekitWorker) -> dict:
    """Localise one recipe, run both tools on it, compare; outputs are removed afterwards."""
    assert entry.recipe is not None
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{entry.source}-{entry.recipe.get('dtype')}")
    folder = work / "runs" / slug.strip("-")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    recipe = folder / "recipe.yml"
    if entry.local:
        local, mapping = entry.recipe, {ref: ref for ref in model_references(entry.recipe)}
    else:
        local, mapping = localise(entry.recipe, models)
    recipe.write_text(yaml.safe_dump(local, sort_keys=False))
    theirs, ours = folder / "mergekit", folder / "dammerge"
    theirs_outcome = mergekit.run(recipe, theirs, folder / "lora-cache")
    dammerge_outcome = run_dammerge(recipe, ours)
    method = entry.recipe.get("merge_method")
    record: dict[str, Any] = {
        "source": entry.source,
        "merge_method": method,
        "dtype": entry.recipe.get("dtype"),
        "deterministic": method not in RANDOM_METHODS,
        "mergekit": {"ran": theirs_outcome.ran, "error": theirs_outcome.message},
        "dammerge": {
            "ran": dammerge_outcome.ran,
            "refusal": dammerge_outcome.message,
            "warnings": dammerge_outcome.warnings,
        },
    }
    if entry.expects_failure:
        record["expects_failure"] = True
    if dammerge_outcome.ran:
        record["dammerge"]["transformers_loads"] = transformers_loads(ours)
    if theirs_outcome.ran and dammerge_outcome.ran:
        record["comparison"] = compare(ours, theirs)
        read = load_tensors
        if record["comparison"]["only_dammerge"] or record["comparison"]["only_mergekit"]:
            # the same model stored under another key layout: compare what transformers loads
            read = loaded_tensors
            record["stored_names_differ"] = record.pop("comparison")
            record["comparison"] = compare(ours, theirs, read=read)
            compared = record["comparison"]
            record["mergekit_output_incomplete"] = bool(
                compared["only_dammerge"] and not compared["only_mergekit"]
            )
        half = HALF.get(str(entry.recipe.get("dtype")))
        reference, out_dtype = theirs, None
        if half is not None and not any("+" in local for local in mapping.values()):
            rounded = float32_reference(local, mapping, half, models, folder, mergekit)
            if rounded is not None:
                reference, out_dtype = rounded, half
                record["comparison_float32_reference"] = compare(ours, reference, half, read)
        if method in SELECTING:
            # dammerge's output stores the plan's (the input's) names; compared as transformers
            # loads them, each is looked up under its loaded name
            names = None if read is load_tensors else loaded_names(ours)
            record["ties_at_cut"] = classify_ties(recipe, ours, reference, out_dtype, read, names)
        closest = record.get("comparison_float32_reference", record["comparison"])
        if record["deterministic"] and not closest["within_one_ulp"] and half is None:
            exact = float64_reference(local, folder, mergekit)
            if exact is not None:
                record["comparison_float64_reference"] = compare(ours, exact, torch.float32, read)
                record["closer_to_float64"] = closer_to_exact(ours, theirs, exact, read)
    shutil.rmtree(folder, ignore_errors=True)
    return record


def float32_reference(
    local: dict[str, Any],
    mapping: dict[str, str],
    half: torch.dtype,
    models: TinyModels,
    folder: Path,
    mergekit: MergekitWorker,
) -> Path | None:
    """mergekit's output for the recipe computed in float32 on inputs already rounded to the
    recipe's half dtype: rounded once, it is the correctly rounded result dammerge aims at
    (mergekit computes the task-arithmetic family in the half dtype itself)."""
    rounded = {path: str(models.rounded(Path(path), half)) for path in mapping.values()}
    recipe = {**rewrite(local, rounded), "dtype": "float32"}
    recipe.pop("out_dtype", None)
    path = folder / "recipe-float32.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = folder / "mergekit-float32"
    outcome = mergekit.run(path, out, folder / "lora-cache")
    return out if outcome.ran else None


def float64_reference(local: dict[str, Any], folder: Path, mergekit: MergekitWorker) -> Path | None:
    """mergekit's output for a float32 recipe computed in float64: where dammerge and mergekit
    differ by more than one ulp, it says which of the two float32 results is the accurate one."""
    path = folder / "recipe-float64.yml"
    path.write_text(yaml.safe_dump({**local, "dtype": "float64"}, sort_keys=False))
    out = folder / "mergekit-float64"
    return out if mergekit.run(path, out, folder / "lora-cache").ran else None


def closer_to_exact(
    ours: Path, theirs: Path, exact: Path, read: Callable[[Path], dict[str, torch.Tensor]]
) -> dict[str, int]:
    """Of the entries where the two float32 results are more than one ulp apart, how many of
    dammerge's are at least as close to mergekit's float64 result as mergekit's float32 one
    (float32 rounding where terms cancel, not a different computation)."""
    a, b, e = read(ours), read(theirs), read(exact)
    counts = {"entries_over_one_ulp": 0, "dammerge_as_close": 0}
    for name in sorted(set(a) & set(b) & set(e)):
        x, y = a[name], b[name].to(a[name].dtype)
        if not x.is_floating_point() or x.shape != y.shape:
            continue
        over = ulp_distance(x, y) > 1
        reference = e[name].double()
        as_close = (x.double() - reference).abs() <= (y.double() - reference).abs()
        counts["entries_over_one_ulp"] += int(over.sum())
        counts["dammerge_as_close"] += int((over & as_close).sum())
    counts["unexplained"] = counts["entries_over_one_ulp"] - counts["dammerge_as_close"]
    return counts


# methods that keep the top-k entries of a score, and the parameter giving k's share
SELECTING = {"ties": "density", "sce": "select_topk"}
# methods whose every entry depends on the whole selection: SCE weighs each task vector by
# the energy of its selected entries, so a tie settled the other way moves the whole tensor
WHOLE_TENSOR_SELECTION = {"sce"}


def classify_ties(
    recipe: Path,
    ours: Path,
    reference: Path,
    round_to: torch.dtype | None,
    read: Callable[[Path], dict[str, torch.Tensor]] = load_tensors,
    names: dict[str, str] | None = None,
) -> dict[str, int]:
    """Of the entries more than one ulp from the reference, how many sit at a tie at the
    selection cut, where mergekit's unstable sort and dammerge's lowest-index rule may keep
    different entries: the entry's score (``|task vector|`` per model for TIES, the variance
    across task vectors for SCE, on the inputs as the recipe's ``dtype`` rounds them) equals
    the k-th largest score, and so does the (k+1)-th (for SCE, any entry of a tensor with
    such a tie: ``in_tensor_with_tie``). Parameters come from dammerge's plan
    of the recipe, per tensor and per model (gradients and filters resolved). The outputs are
    read with ``read``; ``names`` maps a planned (input) tensor name to its name there when the
    two differ (outputs compared as transformers loads them: :func:`loaded_names`), and the
    inputs are read by their stored names."""
    from dammerge.config import load_config
    from dammerge.plan import build_plan

    plan = build_plan(load_config(recipe))
    ours_tensors, theirs = read(ours), read(reference)
    counts = {"entries_over_one_ulp": 0, "at_tie": 0, "in_tensor_with_tie": 0}
    inputs: dict[Path, dict[str, torch.Tensor]] = {}
    for tensor in plan.tensors:
        name = tensor.name if names is None else names.get(tensor.name)
        if name not in theirs:  # a name only one tool writes is listed by compare()
            continue
        x = ours_tensors[name]
        y = theirs[name].to(round_to or x.dtype).to(x.dtype)
        over = ulp_distance(x, y) > 1 if x.is_floating_point() else x != y
        if not over.any():
            continue
        counts["entries_over_one_ulp"] += int(over.sum())
        if tensor.base_source is None or tensor.rows is not None:
            continue

        def read_input(source: Any) -> torch.Tensor:
            if source.model not in inputs:
                inputs[source.model] = load_tensors(source.model)
            value = inputs[source.model][source.tensor]
            return value.to(plan.input_dtype or value.dtype).float()

        base = read_input(tensor.base_source)
        deltas = [
            read_input(source) - base for source in tensor.sources if source != tensor.base_source
        ]
        tied = tied_at_cut(plan.config.merge_method, tensor, deltas)
        counts["at_tie"] += int((over & tied).sum())
        if plan.config.merge_method in WHOLE_TENSOR_SELECTION and tied.any():
            counts["in_tensor_with_tie"] += int((over & ~tied).sum())
    explained = counts["at_tie"] + counts["in_tensor_with_tie"]
    counts["unexplained"] = counts["entries_over_one_ulp"] - explained
    return counts


def tied_at_cut(method: str, tensor: Any, deltas: list[torch.Tensor]) -> torch.Tensor:
    """The entries whose score ties with the k-th largest where the (k+1)-th ties too."""
    tied = torch.zeros_like(deltas[0], dtype=torch.bool)
    if method == "sce":
        share = float(tensor.params.get("select_topk", 1.0))
        variance = torch.stack(deltas).var(dim=0, unbiased=False)
        scored = [(variance, int(int(variance.count_nonzero()) * share))]
    else:
        participants = [
            p
            for p, s in zip(tensor.model_params, tensor.sources, strict=True)
            if s != tensor.base_source
        ]
        scored = []
        for delta, params in zip(deltas, participants, strict=True):
            density = float(params.get("density", tensor.params.get("density", 1.0)))
            scored.append((delta.abs(), max(1, int(density * delta.numel()))))
    for score, k in scored:
        if 0 < k < score.numel():
            ordered = score.flatten().sort(descending=True).values
            if ordered[k - 1] == ordered[k]:
                tied |= score == ordered[k - 1]
    return tied


def summarise(records: list[dict], work: Path) -> dict[str, Any]:
    """Counts over the corpus, and dammerge's refusals grouped by their message."""
    both = [r for r in records if r["mergekit"]["ran"] and r["dammerge"]["ran"]]
    compared = [r for r in both if r["deterministic"]]
    refusals: dict[str, list[str]] = {}
    for record in records:
        message = record["dammerge"]["refusal"]
        if message:
            refusals.setdefault(message.replace(str(work), "<work>"), []).append(record["source"])
    return {
        "recipes": len(records),
        "mergekit_ran": sum(r["mergekit"]["ran"] for r in records),
        "dammerge_ran": sum(r["dammerge"]["ran"] for r in records),
        "both_ran": len(both),
        "deterministic_both_ran": len(compared),
        "within_one_ulp": sum(r["comparison"]["within_one_ulp"] for r in compared),
        "within_one_ulp_of_float32_reference": sum(
            r.get("comparison_float32_reference", r["comparison"])["within_one_ulp"]
            for r in compared
        ),
        "dammerge_refused_where_mergekit_ran": sum(
            r["mergekit"]["ran"] and not r["dammerge"]["ran"] for r in records
        ),
        "refusals": refusals,
    }


def tool_version(bin_dir: Path) -> str:
    """The installed mergekit's version, as its own environment reports it."""
    code = "import importlib.metadata as m; print(m.version('mergekit'))"
    done = subprocess.run([str(bin_dir / "python"), "-c", code], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mergekit-repo", type=Path, default=DEFAULT_MERGEKIT_REPO)
    parser.add_argument("--mergekit-bin", type=Path, default=MERGEKIT_BIN)
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--only",
        action="append",
        help="run only the entries whose source contains this text (repeatable: any of them); "
        "their runs replace the same runs in --out, the others stay",
    )
    args = parser.parse_args(argv)
    source = MergekitSource(args.mergekit_repo)
    entries = collect_corpus(source)
    harvested, harvest_about = harvest_test_configs(
        args.mergekit_repo, args.mergekit_bin, args.work
    )
    models = TinyModels(args.work / "models")
    mergekit = MergekitWorker(args.mergekit_bin, args.work / "mergekit.log")
    records = []
    try:
        for entry in entries + harvested:
            if entry.recipe is None or not selected(entry.source, args.only):
                continue
            print(f"{entry.source} ({entry.recipe.get('dtype')}) ...", flush=True)
            records.append(run_entry(entry, models, args.work, mergekit))
    finally:
        mergekit.close()
    result = {
        "benchmark": "mergekit_corpus",
        "timestamp": timestamp(),
        "mergekit_repo": str(args.mergekit_repo),
        "mergekit_revision": source.revision(),
        "mergekit_version": tool_version(args.mergekit_bin),
        "dammerge_commit": subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "machine": machine_info(),
        "summary": summarise([r for r in records if not is_test_config(r)], args.work),
        "summary_test_configs": summarise([r for r in records if is_test_config(r)], args.work),
        "test_modules": harvest_about["modules"],
        "shrunk_fixtures": harvest_about["shrunk_fixtures"],
        "recipes": records,
        "skipped": [{"source": e.source, "reason": e.skipped} for e in entries if e.skipped],
    }
    if args.only and args.out.is_file():
        result = merge_rerun(json.loads(args.out.read_text()), result, args.only, args.work)
    write_json(args.out, result)
    for key in ("summary", "summary_test_configs"):
        summary = result[key]
        print(
            f"{key}: {summary['recipes']} runs: mergekit ran {summary['mergekit_ran']}, dammerge "
            f"ran {summary['dammerge_ran']}, both {summary['both_ran']} (deterministic and "
            f"within one ulp: {summary['within_one_ulp']}, of the float32 reference: "
            f"{summary['within_one_ulp_of_float32_reference']})"
        )
    return 0


def selected(source: str, only: list[str] | None) -> bool:
    """Whether an entry runs: every entry without ``--only``, else those whose source contains
    one of its texts (``test_nuslerp_VLM_merges[3]`` names one test configuration)."""
    return not only or any(text in source for text in only)


def run_key(record: dict) -> tuple[str, str | None]:
    """A run's identity in the results: its source and the dtype it ran in."""
    return record["source"], record["dtype"]


def merge_rerun(previous: dict, rerun: dict, only: list[str], work: Path) -> dict:
    """The ``previous`` results with the runs of ``rerun`` (the same corpus, some entries run
    again) in place of the same runs, runs new to it appended, the summaries recomputed over
    all runs and the rerun listed under ``updates``; the top-level commit and timestamp stay
    those of the full run. Results of another mergekit revision or version are not mixed."""
    for key in ("mergekit_revision", "mergekit_version"):
        if previous.get(key) != rerun[key]:
            raise SystemExit(
                f"{key} is {rerun[key]}, the results to update have {previous.get(key)}: "
                "run the whole corpus (without --only) instead"
            )
    fresh = {run_key(r): r for r in rerun["recipes"]}
    records = [fresh.pop(run_key(r), r) for r in previous["recipes"]]
    records += list(fresh.values())
    update = {key: rerun[key] for key in ("timestamp", "dammerge_commit")}
    update |= {"only": only, "runs": [f"{s} ({d})" for s, d in map(run_key, rerun["recipes"])]}
    return {
        **previous,
        "summary": summarise([r for r in records if not is_test_config(r)], work),
        "summary_test_configs": summarise([r for r in records if is_test_config(r)], work),
        "recipes": records,
        "updates": [*previous.get("updates", []), update],
    }


def is_test_config(record: dict) -> bool:
    """Whether a record is a harvested test configuration (named ``tests/<file>.py::...``)."""
    return "::" in record["source"]


if __name__ == "__main__":
    raise SystemExit(main())
