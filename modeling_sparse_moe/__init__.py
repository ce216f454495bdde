"""sparse-moe: a sparse Mixture-of-Experts causal LM that plugs into Hugging Face Transformers.

Importing the package registers `SparseMoEConfig` (model_type "sparse_moe") and every head with the Auto classes,
and marks them for `auto_map` so `save_pretrained` writes remote code that loads without this package.
"""

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
