"""Hub sharing: a saved folder is a complete repository that loads, in a fresh Python that cannot import
`modeling_sparse_moe`, into exactly the model that was saved; the card round-trips; the push sends exactly what the
dry run lists, through huggingface_hub's real client with only the HTTP transport replaced.

No test reaches the network: the fresh processes run with HF_HUB_OFFLINE=1, and every Hub call goes to `FakeHub`,
an `httpx2.MockTransport` handler installed with `huggingface_hub.set_client_factory` (huggingface_hub 2.x sends all
requests through one shared `httpx2.Client`).
"""

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from urllib.parse import unquote

import httpx2
import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils._http import default_client_factory, hf_request_event_hook
from safetensors import safe_open
from safetensors.torch import save as safetensors_save

import modeling_sparse_moe
from modeling_sparse_moe import SparseMoEConfig, SparseMoEForCausalLM, SparseMoEForSequenceClassification
from modeling_sparse_moe.recipes.data import lm_blocks, load_text_corpus, train_tokenizer
from modeling_sparse_moe.interop.hub import (
    HubFolderError,
    ModelCardInfo,
    auto_map_for_all_heads,
    build_model_card,
    complete_hub_folder,
    hub_facing_files,
    remote_code_closure,
    save_for_hub,
    validate_hub_folder,
)

from conftest import assert_fp32_close, tiny_config

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "scripts"))
import push_to_hub  # noqa: E402  (the script's main(), run in-process so the fake transport sees its requests)

REPO_ID = "sparse-moe-tests/tiny-moe"
TOKEN = "hf_test_token_not_real"
MAX_SHARD_SIZE = "40KB"  # transformers reads KB as 1000 bytes
PROMPT = "The Python language reference describes"
CLASSIFY = ["A for statement loops over a sequence.", "Exceptions are raised by the raise statement."]
NEW_TOKENS = 12
CARD = ModelCardInfo(
    repo_id=REPO_ID,
    datasets=["python-docs-topics"],
    training_data="Paragraphs of CPython's reference documentation (`pydoc_data.topics`), a few optimizer steps.",
    metrics={"perplexity": 250.5, "loss": 5.52},
    eval_dataset="python-docs-topics",
    eval_dataset_name="Python docs topics",
    eval_split="validation",
    tags=["tiny", "test"],
)


# --------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(load_text_corpus(max_chars=20_000), vocab_size=300)


def _train(model, batches, steps=4):
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def causal_lm(tokenizer):
    torch.manual_seed(0)
    model = SparseMoEForCausalLM(tiny_config(vocab_size=len(tokenizer)))
    blocks = torch.tensor(lm_blocks(tokenizer, load_text_corpus(max_chars=8_000), block_size=32)[:8])
    batches = [{"input_ids": blocks[i : i + 4], "labels": blocks[i : i + 4]} for i in (0, 4)]
    return _train(model, batches)


@pytest.fixture(scope="module")
def classifier(tokenizer):
    torch.manual_seed(1)
    model = SparseMoEForSequenceClassification(tiny_config(vocab_size=len(tokenizer), num_labels=3))
    enc = tokenizer(CLASSIFY, return_tensors="pt", padding=True)
    return _train(model, [{**enc, "labels": torch.tensor([0, 2])}])


@pytest.fixture(scope="module")
def causal_folder(causal_lm, tokenizer, tmp_path_factory):
    return save_for_hub(
        causal_lm, tmp_path_factory.mktemp("causal") / "tiny-moe", tokenizer, max_shard_size=MAX_SHARD_SIZE, card=CARD
    )


@pytest.fixture(scope="module")
def classifier_folder(classifier, tokenizer, tmp_path_factory):
    return save_for_hub(classifier, tmp_path_factory.mktemp("cls") / "tiny-moe-cls", tokenizer)


def _reference_outputs(model, tokenizer, texts, generate):
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = {"input_ids": enc["input_ids"].tolist(), "logits": model(**enc).logits}
        if generate:
            gen = model.generate(**tokenizer([PROMPT], return_tensors="pt"), max_new_tokens=NEW_TOKENS, do_sample=False)
            out["generated"] = gen.tolist()
    return out


# ------------------------------------------------------------------------------------------- fresh isolated process
# Runs with `python -I -S`: no site-packages processing (so no .pth file, no editable-install finder), no current
# directory, no PYTHONPATH. It gets the parent's import path minus every entry that resolves `modeling_sparse_moe`
# (this checkout, an editable install's source tree); if the package sits inside site-packages itself, that directory
# stays (torch is there) and a meta-path finder refuses the package. It then proves the import fails before loading.
FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    from importlib.machinery import PathFinder

    spec = json.load(open(sys.argv[1]))
    PACKAGE = "modeling_sparse_moe"

    class RefusePackage:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
            return None

    hidden = []
    for entry in spec["path"]:
        if PathFinder.find_spec(PACKAGE, [entry]) is None:
            sys.path.append(entry)
        elif entry in spec["site_dirs"]:
            sys.path.append(entry)
            sys.meta_path.insert(0, RefusePackage)
            hidden.append(entry)
        else:
            hidden.append(entry)
    try:
        import modeling_sparse_moe
        importable = True
    except ImportError:
        importable = False
    result = {"package_importable": importable, "hidden": hidden, "jobs": []}

    if not importable:
        import torch
        import transformers

        torch.set_num_threads(spec["threads"])
        for job in spec["jobs"]:
            auto_class = getattr(transformers, job["auto_class"])
            # The tokenizer first, as README's snippet reads: nothing loaded before it has registered the model type.
            tokenizer = transformers.AutoTokenizer.from_pretrained(job["source"], trust_remote_code=True)
            model = auto_class.from_pretrained(job["source"], trust_remote_code=True).eval()
            enc = tokenizer(job["texts"], return_tensors="pt", padding=True)
            with torch.no_grad():
                out = {
                    "class": type(model).__name__,
                    "class_module": type(model).__module__,
                    "input_ids": enc["input_ids"].tolist(),
                    "logits": model(**enc).logits.tolist(),
                }
                if job["generate"]:
                    prompt = tokenizer([job["generate"]], return_tensors="pt")
                    gen = model.generate(**prompt, max_new_tokens=job["max_new_tokens"], do_sample=False)
                    out["generated"] = gen.tolist()
            result["jobs"].append(out)
    result["package_modules"] = sorted(m for m in sys.modules if m.split(".")[0] == PACKAGE)
    json.dump(result, open(spec["out"], "w"))
    """
)


def run_fresh_process(jobs, workdir: Path, hub_cache: Path | None = None) -> dict:
    """Load each job's source in a fresh `python -I -S` that cannot import modeling_sparse_moe; return its JSON."""
    import site

    from transformers.utils import HF_MODULES_CACHE

    modules_cache = Path(HF_MODULES_CACHE).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    site_dirs = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    spec = {
        # "" (the cwd) is passed as a real path so that it gets hidden; transformers' dynamic-module cache is not
        # passed (validation in this process put it on sys.path), as it would shadow the child's own cache.
        "path": [str(Path(p or os.getcwd()).resolve()) for p in sys.path if Path(p or ".").resolve() != modules_cache],
        "site_dirs": site_dirs,
        "threads": torch.get_num_threads(),
        "jobs": jobs,
        "out": str(workdir / "result.json"),
    }
    (workdir / "spec.json").write_text(json.dumps(spec))
    (workdir / "fresh.py").write_text(FRESH_PROCESS)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(workdir / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    if hub_cache is not None:
        env["HF_HUB_CACHE"] = str(hub_cache)
    proc = subprocess.run(
        [sys.executable, "-I", "-S", str(workdir / "fresh.py"), str(workdir / "spec.json")],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # README's loading snippet runs silently: no trust prompt, no model-type fallback warning.
    assert "Do you wish to run the custom code" not in proc.stderr + proc.stdout
    assert "to instantiate a model of type" not in proc.stderr + proc.stdout
    result = json.loads((workdir / "result.json").read_text())
    assert result["package_importable"] is False, "the fresh process could import modeling_sparse_moe"
    assert result["package_modules"] == []
    return result


def assert_same_outputs(loaded: dict, reference: dict):
    assert loaded["class_module"].startswith("transformers_modules."), loaded["class_module"]
    assert loaded["input_ids"] == reference["input_ids"]
    # The fresh process reads the weights memory-mapped at unaligned offsets: equal up to fp32 rounding (conftest).
    assert_fp32_close(torch.tensor(loaded["logits"]), reference["logits"])
    if "generated" in reference:
        assert loaded["generated"] == reference["generated"]


def test_fresh_process_reload_equals_original(
    causal_lm, classifier, tokenizer, causal_folder, classifier_folder, tmp_path
):
    jobs = [
        {"auto_class": "AutoModelForCausalLM", "source": str(causal_folder), "texts": [PROMPT],
         "generate": PROMPT, "max_new_tokens": NEW_TOKENS},
        {"auto_class": "AutoModelForSequenceClassification", "source": str(classifier_folder), "texts": CLASSIFY,
         "generate": None},
    ]
    result = run_fresh_process(jobs, tmp_path)
    package_parent = str(Path(modeling_sparse_moe.__file__).resolve().parents[1])
    if package_parent in {str(Path(p or os.getcwd()).resolve()) for p in sys.path}:
        assert package_parent in result["hidden"]  # the isolation had something to hide, and hid it

    causal, cls = result["jobs"]
    assert causal["class"] == "SparseMoEForCausalLM" and cls["class"] == "SparseMoEForSequenceClassification"
    assert_same_outputs(causal, _reference_outputs(causal_lm, tokenizer, [PROMPT], generate=True))
    assert_same_outputs(cls, _reference_outputs(classifier, tokenizer, CLASSIFY, generate=False))
    assert len(causal["generated"][0]) == len(tokenizer(PROMPT)["input_ids"]) + NEW_TOKENS


# ---------------------------------------------------------------------------------------------- folder contents
def test_folder_is_a_complete_repository(causal_folder, causal_lm):
    config = json.loads((causal_folder / "config.json").read_text())
    assert config["auto_map"] == auto_map_for_all_heads()
    assert set(config["auto_map"]) == {"AutoConfig", *modeling_sparse_moe.AUTO_CLASSES}

    # Exactly the Hub-facing modules: the auto_map targets and what they import, transitively (moe_dispatch.py today).
    package_dir = Path(modeling_sparse_moe.__file__).parent
    entries = [package_dir / "configuration_sparse_moe.py", package_dir / "modeling_sparse_moe.py"]
    closure, problems = remote_code_closure(entries, [package_dir])
    assert problems == []
    assert {p.name for p in causal_folder.glob("*.py")} == {p.name for p in closure} == {
        p.name for p in hub_facing_files()
    }
    for path in closure:  # byte-identical copies of the package's code
        assert (causal_folder / path.name).read_bytes() == path.read_bytes()

    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (causal_folder / name).is_file(), name
    assert json.loads((causal_folder / "generation_config.json").read_text())["eos_token_id"] == 2


def test_max_shard_size_is_respected(causal_folder, causal_lm):
    limit = 40_000
    index = json.loads((causal_folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    assert sorted(p.name for p in causal_folder.glob("*.safetensors")) == shards
    stored = {}
    for shard in shards:
        with safe_open(causal_folder / shard, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        shard_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        assert shard_bytes <= limit or len(tensors) == 1, (shard, shard_bytes)
        assert all(index["weight_map"][k] == shard for k in tensors)
        stored.update(tensors)
    state = causal_lm.state_dict()
    assert stored.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(stored[key], value), key


# --------------------------------------------------------------------------------------------------------- card
def test_card_metadata_round_trips(causal_folder, causal_lm):
    card = ModelCard.load(causal_folder / "README.md")
    data = card.data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation"
    assert data.license == "apache-2.0"
    assert data.datasets == ["python-docs-topics"]
    assert {"moe", "custom_code", "tiny"} <= set(data.tags)
    assert data.model_name == "tiny-moe"
    results = {r.metric_type: r for r in data.eval_results}
    assert {k: r.metric_value for k, r in results.items()} == {"perplexity": 250.5, "loss": 5.52}
    assert {(r.task_type, r.dataset_type, r.dataset_split) for r in results.values()} == {
        ("text-generation", "python-docs-topics", "validation")
    }
    # The metadata parsed back from the file equals what the library built, field for field.
    config = SparseMoEConfig.from_pretrained(causal_folder)
    built = build_model_card(config, CARD, total_params=sum(p.numel() for p in causal_lm.parameters()))
    assert data.to_dict() == built.data.to_dict()
    assert ModelCardData(**data.to_dict()).to_yaml() == data.to_yaml()

    text = card.text
    total, active = config.num_parameters(), config.num_active_parameters()
    assert total == sum(p.numel() for p in causal_lm.parameters())
    assert f"| Total parameters | {total:,}" in text and f"| Active parameters per token | {active:,}" in text
    assert "| Routed experts per MoE layer | 4 " in text and "| Experts per token (top-k) | 2 |" in text
    assert f'AutoModelForCausalLM.from_pretrained("{REPO_ID}", trust_remote_code=True)' in text
    assert "| perplexity | 250.5 | Python docs topics (validation) |" in text
    assert "{{" not in text and "{%" not in text


CARD_SNIPPETS = r"""
import json, re, sys
folder, repo_id, card = sys.argv[1], sys.argv[2], open(sys.argv[3]).read()
blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
for number, block in enumerate(blocks):
    exec(block.replace(repr(repo_id).replace("'", '"'), repr(folder)), {"__name__": f"snippet{number}"})
    print(f"snippet {number} ran")
"""


def test_every_python_snippet_on_the_card_runs_as_written(causal_lm, tokenizer, tmp_path):
    """The card's snippets, executed as written (the repo id pointed at the saved folder) in a fresh process with no
    stdin: a `trust_remote_code` prompt would end it. The recipe's `no_repeat_ngram_size` stays out of the shipped
    generation config (vLLM and llama.cpp have no such setting) and the card shows it passed to `generate()`."""
    import copy

    model = copy.deepcopy(causal_lm)
    model.generation_config.no_repeat_ngram_size = 3
    folder = save_for_hub(model, tmp_path / "tiny-moe", tokenizer, card=CARD)
    shipped = json.loads((folder / "generation_config.json").read_text())
    assert "no_repeat_ngram_size" not in shipped and shipped["eos_token_id"] == model.generation_config.eos_token_id
    card = (folder / "README.md").read_text()
    assert "no_repeat_ngram_size=3)" in card and card.count("```python") == 2
    loads = re.findall(r"from_pretrained\(.*?\)", "".join(re.findall(r"```python\n(.*?)```", card, flags=re.S)))
    assert len(loads) == 4 and all("trust_remote_code=True" in call for call in loads)  # model and tokenizer, twice
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-c", CARD_SNIPPETS, str(folder), REPO_ID, str(folder / "README.md")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(" ran") == 2 and "Do you wish to run the custom code" not in proc.stderr
    # The same snippets loaded the folder's own code: greedy text printed by both (the second with the setting).
    printed = [line for line in proc.stdout.splitlines() if line.startswith(PROMPT_ON_CARD)]
    assert len(printed) == 2


PROMPT_ON_CARD = "The Python language"


def test_card_template_ships_in_the_package():
    shipped = Path(modeling_sparse_moe.__file__).parent / "model_card_template.md"
    assert shipped.read_bytes() == (REPO_ROOT / "model_card.md").read_bytes()
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert '"model_card_template.md"' in pyproject  # package-data, so installed (non-editable) copies have it


def test_card_metrics_need_a_dataset():
    with pytest.raises(ValueError, match="eval_dataset"):
        build_model_card(tiny_config(), ModelCardInfo(metrics={"perplexity": 3.0}))


def test_classifier_card_names_its_head(classifier_folder):
    card = ModelCard.load(classifier_folder / "README.md")
    assert card.data.pipeline_tag == "text-classification"
    assert "AutoModelForSequenceClassification.from_pretrained(" in card.text


# --------------------------------------------------------------------------------------------------- validation
def test_complete_hub_folder_repairs_a_plain_save(causal_lm, tokenizer, causal_folder, tmp_path):
    """transformers writes only the saved head's auto_map entry and copies siblings it finds with a regex; a folder
    that lost one (transformers issue #29714) is refused, then repaired."""
    folder = tmp_path / "plain"
    shutil.copytree(causal_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {k: v for k, v in config["auto_map"].items() if k in ("AutoConfig", "AutoModelForCausalLM")}
    (folder / "config.json").write_text(json.dumps(config))
    entry_modules = {"configuration_sparse_moe.py", "modeling_sparse_moe.py"}
    siblings = sorted(p.name for p in hub_facing_files() if p.name not in entry_modules)
    for name in siblings:
        (folder / name).unlink()

    with pytest.raises(HubFolderError) as err:
        validate_hub_folder(folder, load_weights=False)
    assert "AutoModelForSequenceClassification" in str(err.value)
    for name in siblings:
        assert f"{name} is missing" in str(err.value)

    changes = complete_hub_folder(folder)
    assert {f"copied {name}" for name in siblings} <= set(changes)
    assert json.loads((folder / "config.json").read_text())["auto_map"] == auto_map_for_all_heads()
    report = validate_hub_folder(folder)
    assert sorted(report.files) == sorted(p.name for p in causal_folder.iterdir())


def _drop_a_shard(folder):
    shard = sorted(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())[-1]
    (folder / shard).unlink()
    return f"{shard}, which is missing"


def _break_card(folder):
    text = (folder / "README.md").read_text()
    (folder / "README.md").write_text(text.replace("library_name: transformers", "library_name: [transformers"))
    return "README.md metadata does not parse"


def _import_outside_dependency(folder):
    path = folder / "modeling_sparse_moe.py"
    path.write_text("import numpy\n" + path.read_text())
    return "imports `numpy`"


def _shrink_vocab(folder):
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = 100
    (folder / "config.json").write_text(json.dumps(config))
    return "config.json vocab_size is 100"


@pytest.mark.parametrize("damage", [_drop_a_shard, _break_card, _import_outside_dependency, _shrink_vocab])
def test_validation_names_the_problem(causal_folder, tmp_path, damage):
    folder = tmp_path / "damaged"
    shutil.copytree(causal_folder, folder)
    expected = damage(folder)
    with pytest.raises(HubFolderError) as err:
        validate_hub_folder(folder, load_weights=False)
    assert expected in str(err.value)


def test_closure_follows_every_relative_import_form(tmp_path):
    """Siblings imported as `from . import b`, inside a function, or two hops away are all found; the form that
    transformers' loader cannot see is refused by validation instead of breaking on the user's machine."""
    (tmp_path / "configuration_x.py").write_text(
        "from transformers import PreTrainedConfig\n\nclass XConfig(PreTrainedConfig):\n    model_type = 'x'\n"
    )
    (tmp_path / "modeling_x.py").write_text(
        "from .configuration_x import XConfig\nfrom .a import f\n\n"
        "class XModel:\n    def g(self):\n        from . import b\n"
    )
    (tmp_path / "a.py").write_text("from .c import h\nf = h\n")
    (tmp_path / "b.py").write_text("import os\n")
    (tmp_path / "c.py").write_text("import torch\nh = torch.ones\n")
    (tmp_path / "unused.py").write_text("")
    closure, problems = remote_code_closure([tmp_path / "modeling_x.py"], [tmp_path])
    assert problems == []
    assert [p.name for p in closure] == ["modeling_x.py", "a.py", "b.py", "configuration_x.py", "c.py"]

    auto_map = {"AutoConfig": "configuration_x.XConfig", "AutoModel": "modeling_x.XModel"}
    config = {"architectures": ["XModel"], "auto_map": auto_map}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(HubFolderError) as err:
        validate_hub_folder(tmp_path, load_weights=False)
    assert "modeling_x.py: transformers cannot see the import of sibling `b`" in str(err.value)


# --------------------------------------------------------------------------------------------------------- push
class FakeHub:
    """The Hub's HTTP API, as much of it as create_repo + create_branch + upload_folder + list_repo_tree use: repos
    and commits live in memory; every request is recorded. Files are answered as "regular" uploads (content inline in
    the commit), so hf_xet's own transfer stack, which bypasses httpx, is never involved."""

    def __init__(self):
        self.endpoint = huggingface_hub.constants.ENDPOINT
        self.requests: list[dict] = []
        self.side_requests: list[str] = []
        self.repos: dict[str, dict] = {}
        self.commits: dict[str, dict[str, bytes]] = {}
        self.fail: dict = {}  # route name (or "*" for all) -> status code or exception to answer with
        self.lock = threading.Lock()

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        with self.lock:
            return self._handle(request)

    def _record(self, request, route, body):
        self.requests.append({
            "route": route, "method": request.method, "path": unquote(request.url.path),
            "authorization": request.headers.get("authorization"), "body": body,
        })

    def _handle(self, request):
        parts = unquote(request.url.path).strip("/").split("/")
        model_api = (request.method, parts[4] if parts[:2] == ["api", "models"] and len(parts) > 4 else None)
        route, body = "unknown", None
        if request.method == "POST" and parts[:3] == ["api", "repos", "create"]:
            route, body = "create_repo", json.loads(request.content)
        elif model_api == ("POST", "branch"):
            route, body = "create_branch", json.loads(request.content or b"{}")
        elif model_api == ("POST", "preupload"):
            route, body = "preupload", json.loads(request.content)
        elif model_api == ("POST", "commit"):
            route, body = "commit", [json.loads(line) for line in request.content.splitlines() if line.strip()]
        elif model_api == ("GET", "tree"):
            route = "tree"
        elif request.method == "GET" and parts[:2] == ["api", "models"] and len(parts) == 4:
            route = "repo_info"
        elif request.method == "GET" and parts == ["api", "agent-harnesses"]:
            route = "agent_registry"
        elif request.method == "POST" and parts == ["api", "validate-yaml"]:
            route, body = "validate_yaml", json.loads(request.content)
        if route == "agent_registry":  # huggingface_hub's own best-effort user-agent lookup; not part of a push
            self.side_requests.append(str(request.url))
            return httpx2.Response(404, json={"error": "not served by the fake Hub"})
        self._record(request, route, body)
        failure = self.fail.get(route, self.fail.get("*"))
        if isinstance(failure, Exception):
            raise failure
        if failure is not None:
            message = f"{route} refused by the fake Hub"
            return httpx2.Response(failure, json={"error": message, "errors": [{"message": message}]})
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            return httpx2.Response(401, json={"error": "Invalid credentials"})
        return getattr(self, f"_{route}", self._unknown)(parts, body, request)

    def _unknown(self, parts, body, request):
        return httpx2.Response(404, json={"error": f"FakeHub has no route for {request.method} {request.url.path}"})

    def _create_repo(self, parts, body, request):
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        if repo_id in self.repos:
            url = f"{self.endpoint}/{repo_id}"
            return httpx2.Response(409, json={"error": "You already created this model repo", "url": url})
        self.repos[repo_id] = {"branches": {"main": None}, "visibility": body.get("visibility")}
        return httpx2.Response(200, json={"url": f"{self.endpoint}/{repo_id}", "name": repo_id})

    def _create_branch(self, parts, body, request):
        branches = self.repos[f"{parts[2]}/{parts[3]}"]["branches"]
        branches.setdefault(parts[5], branches["main"])  # a new branch starts at main's head
        return httpx2.Response(200, json={})

    def _repo_info(self, parts, body, request):
        repo = self.repos.get(f"{parts[2]}/{parts[3]}")
        if repo is None:
            headers = {"X-Error-Code": "RepoNotFound"}
            return httpx2.Response(404, json={"error": "Repository not found"}, headers=headers)
        private = repo["visibility"] == "private"
        return httpx2.Response(200, json={"id": f"{parts[2]}/{parts[3]}", "private": private})

    def _validate_yaml(self, parts, body, request):
        ModelCard(body["content"])  # raises on metadata that does not parse, as the Hub would answer 400
        return httpx2.Response(200, json={"errors": [], "warnings": []})

    def _preupload(self, parts, body, request):
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in body["files"]
        ]
        return httpx2.Response(200, json={"files": files})

    def _commit(self, parts, body, request):
        repo_id, revision = f"{parts[2]}/{parts[3]}", "/".join(parts[5:])
        branches = self.repos[repo_id]["branches"]
        if revision not in branches:
            return httpx2.Response(404, json={"error": f"Invalid rev id: {revision}"})
        files = dict(self.commits.get(branches[revision], {}))
        for item in body[1:]:
            if item["key"] == "deletedFile":
                del files[item["value"]["path"]]
                continue
            assert item["key"] == "file" and item["value"]["encoding"] == "base64", item
            files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        tree = sorted((path, hashlib.sha1(data).hexdigest()) for path, data in files.items())
        oid = hashlib.sha1(json.dumps(tree).encode()).hexdigest()  # 40 hex digits, like a git commit id
        self.commits[oid] = files
        branches[revision] = oid
        return httpx2.Response(
            200, json={"commitUrl": f"{self.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}
        )

    def _tree(self, parts, body, request):
        revision = "/".join(parts[5:])
        files = self.commits.get(self.repos[f"{parts[2]}/{parts[3]}"]["branches"].get(revision, revision), {})
        entries = [
            {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            for path, data in sorted(files.items())
        ]
        return httpx2.Response(200, json=entries)

    def routes(self):
        return [r["route"] for r in self.requests]


@pytest.fixture
def fake_hub():
    """Install a FakeHub as the transport of huggingface_hub's shared client: the real client, event hooks (offline
    mode check, request ids) and API code run; only the bytes on the wire are intercepted."""
    hubs = []

    def install():
        hub = FakeHub()
        hubs.append(hub)
        huggingface_hub.set_client_factory(
            lambda: httpx2.Client(
                transport=httpx2.MockTransport(hub), event_hooks={"request": [hf_request_event_hook]},
                follow_redirects=True, timeout=None,
            )
        )
        return hub

    yield install
    huggingface_hub.set_client_factory(default_client_factory)


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


def _listed_files(dry_run_stdout: str) -> list[str]:
    return [line.split()[0] for line in dry_run_stdout.splitlines() if line.startswith("  ")]


def _materialize_hub_cache(hub: FakeHub, repo_id: str, cache: Path) -> Path:
    """Lay the fake Hub's main branch out as huggingface_hub's cache, so an offline `from_pretrained(repo_id)` runs
    the Hub code path (download resolution, remote-code module fetching) on exactly the uploaded bytes."""
    oid = hub.repos[repo_id]["branches"]["main"]
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(oid)
    snapshot = repo_dir / "snapshots" / oid
    snapshot.mkdir(parents=True)
    for path, data in hub.commits[oid].items():
        (snapshot / path).write_bytes(data)
    return cache


@pytest.mark.parametrize("revision,private", [(None, False), ("dev", True)], ids=["main-public", "dev-private"])
def test_push_uploads_exactly_the_dry_run_listing(
    causal_folder, causal_lm, tokenizer, fake_hub, no_token, monkeypatch, capsys, tmp_path, revision, private
):
    hub = fake_hub()
    stale = {}
    if not private:  # the repository exists from an earlier push of a single-file checkpoint with other weights
        zeros = {k: torch.zeros_like(v) for k, v in causal_lm.state_dict().items()}
        stale = {"model.safetensors": safetensors_save(zeros), "notes.md": b"kept: not a weight file\n"}
        hub.commits["0" * 40] = stale
        hub.repos[REPO_ID] = {"branches": {"main": "0" * 40}, "visibility": None}
    args = [str(causal_folder), "--repo-id", REPO_ID] + (["--private"] if private else [])
    args += ["--revision", revision] if revision else []
    message = "Upload tiny MoE (test)"

    assert push_to_hub.main(args + ["--dry-run", "--commit-message", message]) == 0
    dry_run = capsys.readouterr()
    listed = _listed_files(dry_run.out)
    assert hub.requests == []  # the dry run needs neither network nor token
    assert listed == validate_hub_folder(causal_folder).files == sorted(p.name for p in causal_folder.iterdir())
    assert f"commit message: {message}" in dry_run.out

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert push_to_hub.main(args + ["--commit-message", message]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"uploaded {len(listed)} files to {REPO_ID}@{revision or 'main'}")

    expected_routes = ["create_repo"] + (["repo_info"] if private else []) + (["create_branch"] if revision else [])
    expected_routes += ["tree", "validate_yaml", "preupload", "commit", "tree"]  # tree: remote files to delete
    assert hub.routes() == expected_routes, [(r["method"], r["path"]) for r in hub.requests]
    assert {r["authorization"] for r in hub.requests} == {f"Bearer {TOKEN}"}
    create = hub.requests[0]["body"]
    assert (create["organization"], create["name"]) == tuple(REPO_ID.split("/"))
    assert create.get("visibility") == ("private" if private else None)  # public: the namespace's default applies
    by_route = {r["route"]: r for r in hub.requests}
    assert by_route["validate_yaml"]["body"]["content"] == (causal_folder / "README.md").read_text()
    if revision:
        assert by_route["create_branch"]["path"] == f"/api/models/{REPO_ID}/branch/{revision}"
    assert by_route["preupload"]["path"] == f"/api/models/{REPO_ID}/preupload/{revision or 'main'}"
    assert sorted(f["path"] for f in by_route["preupload"]["body"]["files"]) == listed
    commit = by_route["commit"]
    assert commit["path"] == f"/api/models/{REPO_ID}/commit/{revision or 'main'}"
    header, *operations = commit["body"]
    assert header == {"key": "header", "value": {"summary": message, "description": ""}}
    sent = {op["value"]["path"]: base64.b64decode(op["value"]["content"]) for op in operations if op["key"] == "file"}
    assert sorted(sent) == listed
    for name, data in sent.items():
        assert data == (causal_folder / name).read_bytes(), name
    deleted = [op["value"]["path"] for op in operations if op["key"] == "deletedFile"]
    assert deleted == (["model.safetensors"] if stale else [])  # a stale single file would win over the new shards
    final = hub.commits[hub.repos[REPO_ID]["branches"][revision or "main"]]
    assert sorted(final) == sorted(listed + (["notes.md"] if stale else []))

    if revision is None:  # the uploaded bytes, loaded through the Hub code path in a fresh process
        cache = _materialize_hub_cache(hub, REPO_ID, tmp_path / "hub_cache")
        job = {"auto_class": "AutoModelForCausalLM", "source": REPO_ID, "texts": [PROMPT], "generate": PROMPT,
               "max_new_tokens": NEW_TOKENS}
        (loaded,) = run_fresh_process([job], tmp_path / "fresh", hub_cache=cache)["jobs"]
        assert_same_outputs(loaded, _reference_outputs(causal_lm, tokenizer, [PROMPT], generate=True))


# Each scenario sets up the environment and the fake Hub, and returns (words the error must contain, what it must
# say about the upload, extra command-line arguments).
def _offline(monkeypatch, hub):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return "offline mode is on", "nothing was uploaded", []


def _missing_token(monkeypatch, hub):
    return "no Hugging Face token found", "nothing was uploaded", []


def _unreachable(monkeypatch, hub):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.fail["create_repo"] = httpx2.ConnectError("[Errno -3] Temporary failure in name resolution")
    return "cannot reach", "nothing was uploaded", []


def _token_rejected(monkeypatch, hub):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.fail["*"] = 401
    return "refused the token (HTTP 401)", "nothing was uploaded", []


def _private_over_public(monkeypatch, hub):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.repos[REPO_ID] = {"branches": {"main": None}, "visibility": "public"}
    return "already exists and is public", "nothing was uploaded", ["--private"]


def _card_rejected(monkeypatch, hub):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.fail["validate_yaml"] = 400
    return "Invalid metadata in README.md. - validate_yaml refused", "the upload is incomplete", []


def _commit_refused(monkeypatch, hub):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.fail["commit"] = 403
    return "failed while uploading", "the upload is incomplete", []


@pytest.mark.parametrize(
    "scenario",
    [_offline, _missing_token, _unreachable, _token_rejected, _private_over_public, _card_rejected, _commit_refused],
)
def test_push_failures_are_one_line_and_never_claim_success(
    causal_folder, fake_hub, no_token, monkeypatch, capsys, scenario
):
    hub = fake_hub()
    reason, outcome, extra_args = scenario(monkeypatch, hub)
    assert push_to_hub.main([str(causal_folder), "--repo-id", REPO_ID, "--no-load", *extra_args]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert reason in lines[0] and outcome in lines[0]
    assert not hub.commits  # nothing landed
    if outcome == "nothing was uploaded":
        assert "commit" not in hub.routes() and "preupload" not in hub.routes()


def test_cli_without_token_exits_non_zero(causal_folder, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    env.update(HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "push_to_hub.py"), str(causal_folder), "--repo-id", REPO_ID],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "error: no Hugging Face token found: run `hf auth login` or set HF_TOKEN to a token with write access; "
        "nothing was uploaded"
    ]


def test_readme_share_commands_work_as_written(fake_hub, no_token, monkeypatch, capsys, tmp_path):
    """README's "Share on the Hub": its save example runs as written, then its push_to_hub.py command lines (dry run,
    then upload against the fake Hub) succeed and upload what the dry run listed."""
    import re
    import shlex

    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("### Share on the Hub, load anywhere\n", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    save_code = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    commands = [
        shlex.split(line.split("#")[0])
        for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)
        for line in block.splitlines()
        if line.startswith("python scripts/push_to_hub.py")
    ]
    assert [("--dry-run" in c) for c in commands] == [True, False]

    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(REPO_ROOT / "configs")
    exec(compile(save_code, "README.md", "exec"), {})

    hub = fake_hub()
    assert push_to_hub.main(commands[0][2:]) == 0
    listed = _listed_files(capsys.readouterr().out)
    assert hub.requests == [] and {"README.md", *(p.name for p in hub_facing_files())} <= set(listed)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert push_to_hub.main(commands[1][2:]) == 0
    assert capsys.readouterr().out.startswith(f"uploaded {len(listed)} files to USER/tiny-moe@main")
    (commit,) = [r for r in hub.requests if r["route"] == "commit"]
    assert sorted(item["value"]["path"] for item in commit["body"][1:]) == listed
