"""sparse-moe: a sparse Mixture-of-Experts causal LM that plugs into Hugging Face Transformers.

Importing the package registers `SparseMoEConfig` (model_type "sparse_moe") and every head with the Auto classes,
and marks them for `auto_map` so `save_pretrained` writes remote code that loads without this package.
"""

import importlib
import importlib.abc
import importlib.util
import sys

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .configuration_sparse_moe import SparseMoEConfig
from .modeling_sparse_moe import (
    SparseMoEAttention,
    SparseMoEBlock,
    SparseMoEDecoderLayer,
    SparseMoEExperts,
    SparseMoEForCausalLM,
    SparseMoEForQuestionAnswering,
    SparseMoEForSequenceClassification,
    SparseMoEForTokenClassification,
    SparseMoEModel,
    SparseMoEPreTrainedModel,
    SparseMoERouter,
    load_balancing_loss,
    router_z_loss,
    update_router_biases,
)

__version__ = "0.1.0"

# Modules that moved into subpackages keep their old import paths (`import modeling_sparse_moe.conversion`,
# `from modeling_sparse_moe.hub import save_for_hub`): the old name is an alias of the new module, imported on first use.
MOVED_MODULES = {
    "conversion": "interop.conversion",
    "export": "interop.export",
    "hub": "interop.hub",
    "memory_planner": "compression.memory_planner",
    "data": "recipes.data",
    "training": "recipes.training",
    "pretraining": "recipes.pretraining",
    "plotting": "recipes.plotting",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `modeling_sparse_moe.<old>` for every entry of MOVED_MODULES and returns the module at its new path."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, name = fullname.rpartition(".")
        if prefix != __name__ or name not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return importlib.import_module(f"{__name__}.{MOVED_MODULES[spec.name.rpartition('.')[2]]}")

    def exec_module(self, module):
        pass  # the new module is already executed


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedModuleFinder())

AUTO_CLASSES = {
    "AutoModel": (AutoModel, SparseMoEModel),
    "AutoModelForCausalLM": (AutoModelForCausalLM, SparseMoEForCausalLM),
    "AutoModelForSequenceClassification": (AutoModelForSequenceClassification, SparseMoEForSequenceClassification),
    "AutoModelForTokenClassification": (AutoModelForTokenClassification, SparseMoEForTokenClassification),
    "AutoModelForQuestionAnswering": (AutoModelForQuestionAnswering, SparseMoEForQuestionAnswering),
}


def _register() -> None:
    AutoConfig.register(SparseMoEConfig.model_type, SparseMoEConfig, exist_ok=True)
    SparseMoEConfig.register_for_auto_class()
    for auto_name, (auto_class, model_class) in AUTO_CLASSES.items():
        auto_class.register(SparseMoEConfig, model_class, exist_ok=True)
        model_class.register_for_auto_class(auto_name)


_register()

__all__ = [
    "SparseMoEConfig",
    "SparseMoEPreTrainedModel",
    "SparseMoEModel",
    "SparseMoEForCausalLM",
    "SparseMoEForSequenceClassification",
    "SparseMoEForTokenClassification",
    "SparseMoEForQuestionAnswering",
    "SparseMoERouter",
    "SparseMoEExperts",
    "SparseMoEBlock",
    "SparseMoEAttention",
    "SparseMoEDecoderLayer",
    "load_balancing_loss",
    "router_z_loss",
    "update_router_biases",
]
