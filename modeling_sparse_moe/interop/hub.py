"""Share a SparseMoE model on the Hugging Face Hub: a complete repository folder, its model card, validation, push.

Not Hub-facing: this module runs only where the package is installed, so it may use huggingface_hub and jinja2.

    from modeling_sparse_moe.interop.hub import ModelCardInfo, push_folder_to_hub, save_for_hub, validate_hub_folder

    save_for_hub(model, "outputs/tiny-moe", tokenizer, max_shard_size="2GB", card=ModelCardInfo(repo_id="me/tiny-moe"))
    validate_hub_folder("outputs/tiny-moe")          # what `scripts/push_to_hub.py --dry-run` runs
    push_folder_to_hub("outputs/tiny-moe", "me/tiny-moe")

A complete folder is a Hub repository that loads on a machine that never installed this package:
  config.json               `auto_map` names every registered head; transformers alone writes only the saved class
  *.py                      the Hub-facing modules the `auto_map` targets live in, plus exactly the sibling modules
                            they import, followed transitively (transformers issue #29714: a missed sibling breaks
                            `trust_remote_code` loading on other machines only)
  model*.safetensors        sharded at `max_shard_size`, with `model.safetensors.index.json` when sharded
  generation_config.json
  tokenizer.json, tokenizer_config.json, ...   when a tokenizer is saved beside the model
  README.md                 the model card, rendered from `model_card_template.md`
"""

from __future__ import annotations

import ast
import glob
import json
import re
import shutil
import sys
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import huggingface_hub
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import filter_repo_objects
from transformers.dynamic_module_utils import get_class_from_dynamic_module, get_imports, get_relative_imports

from .. import AUTO_CLASSES, SparseMoEConfig, __version__
from .export import portable_generation_config

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the Hub-facing model files live at the package's top

try:  # the HTTP client's network-failure base class: httpx2 under huggingface_hub 2.x, httpx under 1.x
    from httpx2 import TransportError
except ImportError:  # pragma: no cover
    from httpx import TransportError

CARD_TEMPLATE = "model_card_template.md"
CARD_FILE = "README.md"
CONFIG_FILE = "config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Packages the Hub-facing modules may import besides the standard library (STYLE.md, rule 2): the only ones a user
# who loads with `trust_remote_code` is guaranteed to have.
REMOTE_CODE_PACKAGES = frozenset({"torch", "transformers"})
# Top-level files a save can leave that never belong in the repository (Trainer output folders hold them).
NOT_UPLOADED = frozenset({"training_args.bin"})
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# Remote weight files an upload deletes unless it sends them again. transformers loads `model.safetensors` before a
# sharded index, so a single file left by an earlier push next to new shards would silently win.
STALE_WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model*.bin.*"]

PIPELINE_TAGS = {
    "AutoModelForCausalLM": "text-generation",
    "AutoModelForSequenceClassification": "text-classification",
    "AutoModelForTokenClassification": "token-classification",
    "AutoModelForQuestionAnswering": "question-answering",
    "AutoModel": "feature-extraction",
}
DEFAULT_INTENDED_USE = (
    "Research on sparse Mixture-of-Experts language models: routing and load-balancing studies, fine-tuning "
    "experiments and as a starting point for further training. It is not tuned to follow instructions and has "
    "not been evaluated for safety; do not deploy it in products that face users without that work."
)
DEFAULT_LIMITATIONS = (
    "The model reproduces the style, errors and biases of its training data and can state false things "
    "fluently. Its quality is bounded by its size and training budget; check the evaluation section before "
    "relying on it. Expert routing is learned: individual experts are not guaranteed to specialise in "
    "anything human-interpretable, and load can be unbalanced on data unlike the training set."
)


class HubFolderError(ValueError):
    """A folder is not a complete Hub repository. `problems` lists every reason, one line each."""

    def __init__(self, folder: str | Path, problems: list[str]):
        self.folder = Path(folder)
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{folder} is not ready for the Hub ({len(self.problems)} problems):\n{lines}")


class HubPushError(RuntimeError):
    """An upload that did not happen or did not finish. The message is one line and says which."""


# ------------------------------------------------------------------------------------------------------ remote code
def auto_map_for_all_heads() -> dict[str, str]:
    """The `auto_map` of a complete folder: `AutoConfig` and every head registered in `modeling_sparse_moe`, each as
    `"<module file stem>.<class name>"` (the form transformers resolves against files next to `config.json`)."""
    auto_map = {"AutoConfig": _class_reference(SparseMoEConfig)}
    for auto_name, (_, model_class) in AUTO_CLASSES.items():
        auto_map[auto_name] = _class_reference(model_class)
    return auto_map


def _class_reference(cls: type) -> str:
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


def _relative_imports(py_file: Path) -> tuple[set[str], list[str]]:
    """Sibling modules that `py_file` imports relatively, found from its syntax tree (every form, at any depth), and
    problems with imports that cannot work in a flat Hub folder."""
    tree = ast.parse(py_file.read_text(encoding="utf-8"), filename=str(py_file))
    modules: set[str] = set()
    problems: list[str] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        where = f"{py_file.name}:{node.lineno}"
        if node.level > 1:
            problems.append(f"{where}: `from {'.' * node.level}...` reaches outside the repository folder")
        elif node.module is None:  # `from . import a, b`: each name is a sibling module in a flat folder
            modules.update(alias.name for alias in node.names)
        elif "." in node.module:
            problems.append(f"{where}: `from .{node.module} import ...` needs a sub-package; the Hub folder is flat")
        else:
            modules.add(node.module)
    return modules, problems


def remote_code_closure(entry_files: list[Path], source_dirs: list[Path]) -> tuple[list[Path], list[str]]:
    """The entry modules plus every sibling module they import relatively, transitively, each found in the first of
    `source_dirs` that has it. Returns (files in discovery order, problems: missing modules and relative imports
    that cannot work in a flat folder)."""
    found: dict[str, Path] = {}
    problems: list[str] = []
    queue = [(f.stem, f) for f in entry_files]
    while queue:
        name, path = queue.pop(0)
        if name in found:
            continue
        found[name] = path
        imported, bad = _relative_imports(path)
        problems += bad
        for module in sorted(imported - found.keys()):
            source = next((d / f"{module}.py" for d in source_dirs if (d / f"{module}.py").is_file()), None)
            if source is None:
                problems.append(f"{path.name} imports `.{module}` but {module}.py is missing")
            else:
                queue.append((module, source))
    return list(found.values()), problems


def hub_facing_files() -> list[Path]:
    """The package's modules that a complete folder must carry: the modules of `AutoConfig` and every head, plus
    whatever they import relatively (computed from the code, so a new sibling such as a dispatch module is included
    as soon as the modeling file imports it)."""
    entries = {Path(sys.modules[cls.__module__].__file__) for cls in [SparseMoEConfig] + _model_classes()}
    files, problems = remote_code_closure(sorted(entries), [PACKAGE_DIR])
    if problems:
        raise HubFolderError(PACKAGE_DIR, problems)
    return files


def _model_classes() -> list[type]:
    return [model_class for _, model_class in AUTO_CLASSES.values()]


def complete_hub_folder(folder: str | Path) -> list[str]:
    """Make a folder written by `save_pretrained` self-contained: add the `auto_map` entries of every head to
    `config.json`, and copy any Hub-facing module the folder's code imports but transformers did not copy. Existing
    entries and files are kept. Returns what changed, one line each."""
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    config = json.loads(config_path.read_text(encoding="utf-8"))
    changes: list[str] = []
    auto_map = dict(config.get("auto_map") or {})
    for auto_name, reference in auto_map_for_all_heads().items():
        if auto_name not in auto_map:
            auto_map[auto_name] = reference
            changes.append(f"config.json: auto_map[{auto_name!r}] = {reference!r}")
    if changes:
        config["auto_map"] = auto_map
        # Same layout as PreTrainedConfig.to_json_file, so the file reads as if transformers wrote it.
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    package_dir = PACKAGE_DIR
    entries = []
    for stem in sorted({ref.rpartition(".")[0] for ref in auto_map.values() if isinstance(ref, str)}):
        path = folder / f"{stem}.py"
        if not path.is_file() and (package_dir / path.name).is_file():
            path = _copy(package_dir / path.name, folder, changes)
        if path.is_file():
            entries.append(path)
    needed, _ = remote_code_closure(entries, [folder, package_dir])  # what is still unresolved, validation reports
    for path in needed:
        if path.parent != folder:
            _copy(path, folder, changes)
    return changes


def _copy(source: Path, folder: Path, changes: list[str]) -> Path:
    target = folder / source.name
    shutil.copyfile(source, target)
    changes.append(f"copied {source.name}")
    return target


# ------------------------------------------------------------------------------------------------------------- card
@dataclass
class ModelCardInfo:
    """What the model card says beyond what `config.json` already knows.

    repo_id: `user/name` used in the loading snippet; `None` leaves a `USER/REPO` placeholder.
    model_name: title of the card and `model-index` name; defaults to the repo name or the folder name.
    license: SPDX-style Hub license id.
    language: languages of the training data (ISO codes).
    datasets: Hub dataset ids the model was trained on (card metadata).
    training_data: prose description of the training data.
    metrics: evaluation results, e.g. `{"perplexity": 23.1}`; written as `model-index` results on `eval_dataset`.
    eval_dataset: Hub dataset id (or local name) the metrics were measured on; required when `metrics` is given.
    eval_dataset_name / eval_split: display name and split of that dataset.
    base_model: Hub id of the model this one was fine-tuned or converted from.
    intended_use / limitations: card sections; sensible defaults for a research checkpoint.
    tags: extra tags; `moe`, `mixture-of-experts`, `sparse-moe` and `custom_code` are always present.
    """

    repo_id: str | None = None
    model_name: str | None = None
    license: str = "apache-2.0"
    language: list[str] = field(default_factory=lambda: ["en"])
    datasets: list[str] = field(default_factory=list)
    training_data: str = "Not documented for this checkpoint."
    metrics: dict[str, float] = field(default_factory=dict)
    eval_dataset: str | None = None
    eval_dataset_name: str | None = None
    eval_split: str | None = None
    base_model: str | None = None
    intended_use: str = DEFAULT_INTENDED_USE
    limitations: str = DEFAULT_LIMITATIONS
    tags: list[str] = field(default_factory=list)


def card_template() -> str:
    """The Jinja template of the card, read from the installed package (`model_card.md` at the repository root is
    the same file, kept for readers of the source)."""
    return resources.files("modeling_sparse_moe").joinpath(CARD_TEMPLATE).read_text(encoding="utf-8")


def build_model_card(
    config: SparseMoEConfig,
    info: ModelCardInfo | None = None,
    *,
    architecture: str | None = None,
    total_params: int | None = None,
    code_files: list[str] | None = None,
    dropped_generation: dict | None = None,
) -> ModelCard:
    """Fill the card template from a config (architecture, parameter counts, routing) and `info` (data, metrics,
    use). `total_params` overrides the count of the causal LM for other heads; active = total minus the experts a
    token skips. `dropped_generation`: decoding settings left out of the shipped generation config
    (`export.portable_generation_config`); the card shows how to pass them to `generate()`."""
    info = info or ModelCardInfo()
    architecture = architecture or (config.architectures or ["SparseMoEForCausalLM"])[0]
    auto_class = next((a for a, (_, m) in AUTO_CLASSES.items() if m.__name__ == architecture), "AutoModelForCausalLM")
    pipeline_tag = PIPELINE_TAGS[auto_class]
    model_name = info.model_name or (info.repo_id.split("/")[-1] if info.repo_id else "SparseMoE model")
    if info.metrics and not info.eval_dataset:
        raise ValueError("ModelCardInfo.metrics needs eval_dataset: the dataset the metrics were measured on")

    eval_results = [
        EvalResult(
            task_type=pipeline_tag,
            dataset_type=info.eval_dataset,
            dataset_name=info.eval_dataset_name or info.eval_dataset,
            dataset_split=info.eval_split,
            metric_type=name,
            metric_value=value,
        )
        for name, value in info.metrics.items()
    ]
    tags = list(dict.fromkeys(["moe", "mixture-of-experts", "sparse-moe", "custom_code", *info.tags]))
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        license=info.license,
        language=info.language or None,
        datasets=info.datasets or None,
        base_model=info.base_model,
        tags=tags,
        model_name=model_name,
        eval_results=eval_results or None,
        metrics=list(info.metrics) or None,
    )

    causal_total, causal_active = config.num_parameters(), config.num_active_parameters()
    total = total_params if total_params is not None else causal_total
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    shared = "none"
    if config.num_shared_experts:
        shared = f"{config.num_shared_experts} (fused, hidden size {config.shared_expert_intermediate_size})"
        shared += ", sigmoid-gated per token" if config.shared_expert_gate else ""
    return ModelCard.from_template(
        card_data,
        template_str=card_template(),
        model_name=model_name,
        repo_id=info.repo_id or "USER/REPO",
        architecture=architecture,
        auto_class=auto_class,
        other_auto_classes=[a for a in AUTO_CLASSES if a != auto_class],
        head_description=None if auto_class == "AutoModelForCausalLM" else f"a `{architecture}` head",
        num_layers=config.num_hidden_layers,
        num_moe_layers=moe_layers,
        num_dense_layers=config.num_hidden_layers - moe_layers,
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        sliding_window=config.sliding_window,
        num_experts=config.num_experts,
        expert_size=config.moe_intermediate_size,
        top_k=config.num_experts_per_tok,
        shared_experts=shared,
        total_params=_count(total),
        active_params=_count(total - (causal_total - causal_active)),
        vocab_size=config.vocab_size,
        context_length=config.max_position_embeddings,
        routing=describe_routing(config),
        training_data=info.training_data,
        results=[
            {"metric": r.metric_type, "value": r.metric_value, "dataset": _dataset_label(r)} for r in eval_results
        ],
        intended_use=info.intended_use,
        limitations=info.limitations,
        code_files=code_files or sorted(f.name for f in hub_facing_files()),
        dropped_generation=dropped_generation or {},
    )


def _dataset_label(result: EvalResult) -> str:
    return result.dataset_name + (f" ({result.dataset_split})" if result.dataset_split else "")


def _count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n:,} ({n / size:.1f}{unit})"
    return f"{n:,}"


def describe_routing(config: SparseMoEConfig) -> str:
    """One paragraph on how tokens reach experts, in the words of the config fields."""
    e, k = config.num_experts, config.num_experts_per_tok
    text = f"A linear router scores the {e} experts of each MoE layer with a {config.router_type} (in fp32)"
    if config.n_group > 1:
        text += f"; a token may only pick experts from its best {config.topk_group} of {config.n_group} expert groups"
    text += f", and each token goes to its top {k}."
    if config.router_type == "sigmoid" or config.router_bias_update_rate > 0:
        text += " A per-expert correction bias shifts which experts are chosen but not their weights."
    text += (
        f" The {k} chosen weights are renormalised to sum to 1" if config.norm_topk_prob
        else f" The {k} chosen scores are used as combine weights without renormalisation"
    )
    if config.routed_scaling_factor != 1:
        text += f" and scaled by {config.routed_scaling_factor}"
    text += "; expert outputs are combined in a fixed order, so results are deterministic."
    if config.capacity_factor is None:
        text += " Routing is dropless."
    else:
        text += (
            f" In training each expert takes at most capacity factor {config.capacity_factor} x its even share of "
            "assignments and drops the rest; evaluation and generation are dropless."
        )
    losses = []
    if config.router_aux_loss_coef:
        losses.append(f"a load-balancing loss (coefficient {config.router_aux_loss_coef})")
    if config.router_z_loss_coef:
        losses.append(f"a router z-loss (coefficient {config.router_z_loss_coef})")
    if config.router_bias_update_rate:
        losses.append(f"auxiliary-loss-free bias updates (rate {config.router_bias_update_rate})")
    if losses:
        text += " Balancing in training: " + ", ".join(losses) + "."
    return text


def write_model_card(
    folder: str | Path,
    info: ModelCardInfo | None = None,
    *,
    total_params: int | None = None,
    dropped_generation: dict | None = None,
) -> Path:
    """Render the card for the model saved in `folder` (its `config.json` is the source of truth) into README.md."""
    folder = Path(folder)
    info = info or ModelCardInfo()
    if info.model_name is None and info.repo_id is None:
        info = replace(info, model_name=folder.resolve().name)
    config = SparseMoEConfig.from_pretrained(folder)
    code_files = sorted(p.name for p in folder.glob("*.py"))
    card = build_model_card(config, info, total_params=total_params, code_files=code_files or None,
                            dropped_generation=dropped_generation)
    path = folder / CARD_FILE
    card.save(path)
    return path


# ------------------------------------------------------------------------------------------------------------- save
def save_for_hub(
    model,
    folder: str | Path,
    tokenizer=None,
    *,
    max_shard_size: int | str = "5GB",
    card: ModelCardInfo | None = None,
) -> Path:
    """Save `model` (and `tokenizer`) as a complete Hub repository: sharded safetensors, generation config (without
    the settings serving engines lack, `export.ENGINE_UNSUPPORTED_GENERATION`),
    self-contained remote code with every head in `auto_map`, and the model card. Returns the folder."""
    folder = Path(folder)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    complete_hub_folder(folder)
    # NOTE: settings only `generate()` applies (no_repeat_ngram_size) stay out of the shipped generation config, so
    # that vLLM and llama.cpp serving this folder decode as transformers does; the card says how to add them back.
    dropped = portable_generation_config(folder)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once
    write_model_card(folder, card, total_params=total, dropped_generation=dropped)
    return folder


# --------------------------------------------------------------------------------------------------------- validate
@dataclass
class HubFolderReport:
    """What `validate_hub_folder` found in a folder that passed: the files an upload sends (and their sizes), the
    head it loads as, and notes that do not block an upload."""

    folder: Path
    files: list[str]
    sizes: dict[str, int]
    architecture: str
    auto_map: dict[str, str]
    code_files: list[str]
    weight_files: list[str]
    card: ModelCard
    notes: list[str]

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())


def hub_files(folder: str | Path) -> tuple[list[str], list[str]]:
    """(files an upload sends, entries it skips). The repository is flat: top-level files only, without hidden files
    (except .gitattributes), bytecode and Trainer leftovers; sub-folders such as `checkpoint-*/` stay local."""
    folder = Path(folder)
    files, skipped = [], []
    for path in sorted(folder.iterdir()):
        name = path.name
        if path.is_dir():
            skipped.append(name + "/")
        elif (name.startswith(".") and name != ".gitattributes") or name.endswith(".pyc") or name in NOT_UPLOADED:
            skipped.append(name)
        else:
            files.append(name)
    return files, skipped


def validate_hub_folder(
    folder: str | Path, *, load_weights: bool = True, repo_id: str | None = None
) -> HubFolderReport:
    """Check that `folder` is a complete Hub repository, without network: `auto_map` covers every head and its targets
    exist; the remote code carries every module it imports and imports nothing but the standard library, torch and
    transformers; shards and index agree; the tokenizer fits the vocabulary; the card metadata parses; and (with
    `load_weights`) the weights load into the folder's own code with no missing or unexpected keys.

    Raises `HubFolderError` listing every problem; returns a `HubFolderReport` otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HubFolderError(folder, [f"{folder} is not a directory"])
    problems: list[str] = []
    notes: list[str] = []
    files, skipped = hub_files(folder)
    if skipped:
        notes.append(f"not uploaded (sub-folders, hidden files, Trainer leftovers): {', '.join(skipped)}")

    config, auto_map, architecture = _check_config(folder, problems)
    code_files = _check_remote_code(folder, auto_map, problems, notes)
    weight_files = _check_weights(folder, files, problems)
    if config is not None:
        _check_tokenizer(folder, files, config, problems, notes)
        if architecture == "SparseMoEForCausalLM" and "generation_config.json" not in files:
            notes.append("no generation_config.json: generate() will use transformers' defaults")
    card = _check_card(folder, problems, notes, repo_id)
    if load_weights and not problems:
        _check_loading(folder, auto_map, architecture, problems)
    if problems:
        raise HubFolderError(folder, problems)
    return HubFolderReport(
        folder=folder,
        files=files,
        sizes={f: (folder / f).stat().st_size for f in files},
        architecture=architecture,
        auto_map=auto_map,
        code_files=code_files,
        weight_files=weight_files,
        card=card,
        notes=notes,
    )


def _check_config(folder: Path, problems: list[str]) -> tuple[dict | None, dict[str, str], str]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        problems.append("config.json is missing")
        return None, {}, ""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        problems.append(f"config.json does not parse: {err}")
        return None, {}, ""
    auto_map = config.get("auto_map") or {}
    missing = [name for name in auto_map_for_all_heads() if name not in auto_map]
    if missing:
        problems.append(
            f"config.json auto_map lacks {', '.join(missing)}: run modeling_sparse_moe.interop.hub.complete_hub_folder(folder)"
        )
    architectures = config.get("architectures") or []
    architecture = architectures[0] if architectures else ""
    if not architecture:
        problems.append("config.json has no `architectures`: save the model with save_pretrained")
    elif not any(ref.endswith(f".{architecture}") for ref in auto_map.values()):
        problems.append(f"config.json auto_map has no entry for its own architecture {architecture}")
    return config, auto_map, architecture


def _check_remote_code(folder: Path, auto_map: dict[str, str], problems: list[str], notes: list[str]) -> list[str]:
    entries = []
    for auto_name, reference in sorted(auto_map.items()):
        if isinstance(reference, (list, tuple)) or "--" in reference:
            problems.append(f"auto_map[{auto_name!r}] = {reference!r}: expected `module.Class` in this folder")
            continue
        module, _, class_name = reference.rpartition(".")
        path = folder / f"{module}.py"
        if not path.is_file():
            problems.append(f"auto_map[{auto_name!r}] points to {module}.py, which is missing")
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if not any(isinstance(n, ast.ClassDef) and n.name == class_name for n in tree.body):
            problems.append(f"auto_map[{auto_name!r}]: {module}.py defines no class {class_name}")
        entries.append(path)
    code, closure_problems = remote_code_closure(sorted(set(entries)), [folder])
    problems += closure_problems
    allowed = REMOTE_CODE_PACKAGES | set(sys.stdlib_module_names)
    for path in code:
        if not path.is_file():
            continue
        seen_by_ast, _ = _relative_imports(path)
        # transformers finds sibling modules with a regex (get_relative_imports), both when it copies them next to a
        # local folder's code and when it downloads them from the Hub: a sibling it cannot see is never fetched.
        unseen = seen_by_ast - set(get_relative_imports(path))
        for module in sorted(unseen):
            problems.append(
                f"{path.name}: transformers cannot see the import of sibling `{module}` "
                f"(write it as `from .{module} import name`)"
            )
        for package in get_imports(path):
            if package not in allowed:
                problems.append(
                    f"{path.name} imports `{package}`, which a machine without this package may not have "
                    f"(Hub-facing code may import only the standard library, torch and transformers)"
                )
    names = sorted(p.name for p in code)
    extra = sorted(p.name for p in folder.glob("*.py") if p.name not in names)
    if extra:
        notes.append(f"{', '.join(extra)}: not imported by the auto_map modules; uploaded but never run")
    return names


def _check_weights(folder: Path, files: list[str], problems: list[str]) -> list[str]:
    from safetensors import safe_open

    for name in PICKLED_WEIGHTS:
        if name in files:
            problems.append(f"{name}: pickled weights; save with safetensors (the default of save_pretrained)")
    shards = sorted(f for f in files if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", f))
    if SAFE_WEIGHTS_INDEX in files:
        index = json.loads((folder / SAFE_WEIGHTS_INDEX).read_text(encoding="utf-8"))
        weight_map: dict[str, str] = index.get("weight_map", {})
        listed = sorted(set(weight_map.values()))
        for name in sorted(set(listed) - set(shards)):
            problems.append(f"{SAFE_WEIGHTS_INDEX} names {name}, which is missing")
        for name in sorted(set(shards) - set(listed)):
            problems.append(f"{name} is not in {SAFE_WEIGHTS_INDEX} (left over from an earlier save?)")
        for name in sorted(set(listed) & set(shards)):
            with safe_open(folder / name, framework="pt") as shard:
                stored = set(shard.keys())
            expected = {k for k, v in weight_map.items() if v == name}
            if stored != expected:
                problems.append(f"{name} holds {len(stored)} tensors but the index maps {len(expected)} to it")
        return [SAFE_WEIGHTS_INDEX] + listed
    if SAFE_WEIGHTS in files:
        extra = [s for s in shards if s != SAFE_WEIGHTS]
        if extra:
            problems.append(f"{', '.join(extra)}: shards without {SAFE_WEIGHTS_INDEX}")
        return [SAFE_WEIGHTS]
    problems.append("no safetensors weights (model.safetensors or model.safetensors.index.json)")
    return []


def _check_tokenizer(folder: Path, files: list[str], config: dict, problems: list[str], notes: list[str]) -> None:
    if not any(name in files for name in TOKENIZER_FILES):
        notes.append("no tokenizer files: users must bring their own tokenizer, and the Hub widget will not work")
        return
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # noqa: BLE001 - any failure means users cannot load it either
        problems.append(f"the tokenizer does not load: {type(err).__name__}: {_one_line(err)}")
        return
    if len(tokenizer) > config.get("vocab_size", 0):
        problems.append(
            f"the tokenizer has {len(tokenizer)} tokens but config.json vocab_size is {config.get('vocab_size')}"
        )


def _check_card(folder: Path, problems: list[str], notes: list[str], repo_id: str | None) -> ModelCard | None:
    path = folder / CARD_FILE
    if not path.is_file():
        problems.append("README.md (the model card) is missing: write it with modeling_sparse_moe.interop.hub.write_model_card")
        return None
    try:
        card = ModelCard.load(path)
    except Exception as err:  # noqa: BLE001 - the Hub rejects a card whose metadata does not parse
        problems.append(f"README.md metadata does not parse: {_one_line(err)}")
        return None
    data = card.data
    if data.library_name != "transformers":
        problems.append(f"README.md metadata: library_name is {data.library_name!r}, expected 'transformers'")
    if not data.pipeline_tag:
        problems.append("README.md metadata has no pipeline_tag")
    missing_tags = {"moe", "custom_code"} - set(data.tags or [])
    if missing_tags:
        problems.append(f"README.md metadata tags lack {', '.join(sorted(missing_tags))}")
    if repo_id and repo_id not in card.text:
        notes.append(f"README.md never mentions {repo_id}: its loading snippet may name another repository")
    return card


def _check_loading(folder: Path, auto_map: dict[str, str], architecture: str, problems: list[str]) -> None:
    """Resolve every auto_map target through transformers' remote-code loader, then load the saved head's weights
    into the folder's own code (not this package's)."""
    classes = {}
    for auto_name, reference in auto_map.items():
        try:
            classes[auto_name] = get_class_from_dynamic_module(reference, str(folder))
        except Exception as err:  # noqa: BLE001
            problems.append(f"auto_map[{auto_name!r}] does not import: {type(err).__name__}: {_one_line(err)}")
    if problems:
        return
    model_class = next(c for c in classes.values() if c.__name__ == architecture)
    try:
        _, info = model_class.from_pretrained(str(folder), output_loading_info=True)
    except Exception as err:  # noqa: BLE001
        problems.append(f"{architecture}.from_pretrained fails: {type(err).__name__}: {_one_line(err)}")
        return
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(map(str, info.get(kind) or []))
        if keys:
            problems.append(f"loading {architecture}: {len(keys)} {kind.replace('_', ' ')}, e.g. {keys[:3]}")


def _one_line(err: BaseException | str, limit: int = 400) -> str:
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or repr(err)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------------------------- push
@dataclass
class PushResult:
    repo_id: str
    revision: str
    commit_url: str
    commit_oid: str
    files: list[str]


def push_folder_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    load_weights: bool = True,
) -> PushResult:
    """Validate `folder`, then upload exactly `validate_hub_folder(folder).files` to `repo_id` with `create_repo` +
    `upload_folder`, and check that the commit holds every file at its size. The token comes from `token`, else
    `HF_TOKEN`, else `hf auth login`.

    Raises `HubPushError` (one line, says whether anything reached the Hub) or `HubFolderError`."""
    if huggingface_hub.constants.is_offline_mode():
        raise HubPushError("offline mode is on (HF_HUB_OFFLINE=1): unset it to upload; nothing was uploaded")
    token = token or huggingface_hub.get_token()
    if not token:
        raise HubPushError(
            "no Hugging Face token found: run `hf auth login` or set HF_TOKEN to a token with write access; "
            "nothing was uploaded"
        )
    report = validate_hub_folder(folder, load_weights=load_weights, repo_id=repo_id)
    commit_message = commit_message or default_commit_message(report)
    api = HfApi(token=token)
    stage, nothing_sent = "creating the repository", True
    try:
        api.create_repo(repo_id, private=private or None, exist_ok=True)  # None: the namespace's default
        if private and not api.repo_info(repo_id).private:  # create_repo leaves an existing repo's visibility as is
            raise HubPushError(
                f"{repo_id} already exists and is public: --private does not change an existing repository's "
                "visibility (change it in the repo settings); nothing was uploaded"
            )
        if revision and revision != huggingface_hub.constants.DEFAULT_REVISION:
            stage = f"creating branch {revision}"
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        stage, nothing_sent = "uploading", False
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=report.folder,
            allow_patterns=[glob.escape(name) for name in report.files],
            delete_patterns=STALE_WEIGHT_PATTERNS,  # files sent again are kept; only stale weights go
            commit_message=commit_message,
            revision=revision,
        )
        stage = "checking the commit"
        remote = {
            entry.path: entry.size
            for entry in api.list_repo_tree(repo_id, revision=commit.oid)
            if isinstance(entry, RepoFile)
        }
    # ValueError: huggingface_hub's answer to a Hub that rejects the card metadata (POST /api/validate-yaml).
    except (HfHubHTTPError, OfflineModeIsEnabled, TransportError, OSError, ValueError) as err:
        raise HubPushError(_push_failure(repo_id, stage, nothing_sent, err)) from err
    wrong = [name for name in report.files if remote.get(name) != report.sizes[name]]
    stale = sorted(set(filter_repo_objects(remote, allow_patterns=STALE_WEIGHT_PATTERNS)) - set(report.files))
    if wrong or stale:
        problem = f"lacks or truncates {', '.join(wrong)}" if wrong else f"still holds stale {', '.join(stale)}"
        raise HubPushError(
            f"upload to {repo_id} is incomplete: commit {commit.oid[:12]} {problem}; re-run the command to finish it"
        )
    return PushResult(
        repo_id=repo_id,
        revision=revision or huggingface_hub.constants.DEFAULT_REVISION,
        commit_url=str(commit.commit_url),
        commit_oid=commit.oid,
        files=report.files,
    )


def default_commit_message(report: HubFolderReport) -> str:
    return f"Upload {report.architecture} ({len(report.files)} files) with sparse-moe {__version__}"


def _push_failure(repo_id: str, stage: str, nothing_sent: bool, err: BaseException) -> str:
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, OfflineModeIsEnabled):
        reason = "offline mode is on (HF_HUB_OFFLINE=1)"
    elif status in (401, 403):
        reason = f"the Hub refused the token (HTTP {status}): it needs write access to {repo_id.split('/')[0]}"
    elif status is not None:
        reason = f"HTTP {status}: {_one_line(err)}"
    elif isinstance(err, ValueError):
        reason = _one_line(err)
    else:
        reason = f"cannot reach {huggingface_hub.constants.ENDPOINT} ({type(err).__name__}: {_one_line(err)})"
    outcome = (
        "nothing was uploaded"
        if nothing_sent
        else "the upload is incomplete; re-run the command to finish it (files already committed are skipped)"
    )
    return f"push to {repo_id} failed while {stage}: {reason}; {outcome}"


__all__ = [
    "HubFolderError",
    "HubFolderReport",
    "HubPushError",
    "ModelCardInfo",
    "PushResult",
    "auto_map_for_all_heads",
    "build_model_card",
    "complete_hub_folder",
    "hub_facing_files",
    "hub_files",
    "push_folder_to_hub",
    "remote_code_closure",
    "save_for_hub",
    "validate_hub_folder",
    "write_model_card",
]
