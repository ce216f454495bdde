# Copyright 2026 The sparse-moe authors. Licensed under the Apache License, Version 2.0.
"""SparseMoE model configuration.

Hub-facing file: it is copied next to `config.json` and must import only torch, transformers and its siblings.
"""

import math

from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

ROUTER_TYPES = ("softmax", "sigmoid")
QK_NORM_TYPES = ("none", "head", "full")
ROUTER_AUX_LOSS_SCOPES = ("pooled", "per_layer")


class SparseMoEConfig(PreTrainedConfig):
    r"""
    Configuration of a [`SparseMoEModel`]: a decoder-only transformer whose MLPs are sparse Mixture-of-Experts blocks.
    One config covers Mixtral (softmax top-2, renormalised), Qwen2/Qwen3-MoE and OLMoE (softmax top-k, not
    renormalised, shared expert with a sigmoid gate, qk-norm) and DeepSeek-V3 style routing (sigmoid scores, a
    selection-only correction bias, group-limited top-k, shared experts, scaling).

    Transformer:
        vocab_size (`int`, defaults to 32000): number of token ids.
        hidden_size (`int`, defaults to 1024): width D of the residual stream.
        num_hidden_layers (`int`, defaults to 8): number of decoder layers.
        num_attention_heads (`int`, defaults to 16): query heads per attention layer.
        num_key_value_heads (`int`, defaults to 4): key/value heads (GQA); must divide `num_attention_heads`.
        head_dim (`int`, *optional*): per-head width; `None` means `hidden_size // num_attention_heads`.
        hidden_act (`str`, defaults to `"silu"`): activation of the gated (SwiGLU-style) MLPs and experts.
        intermediate_size (`int`, defaults to 2816): hidden width of the dense MLP layers.
        max_position_embeddings (`int`, defaults to 4096): longest sequence the model accepts.
        rope_parameters (`dict`, *optional*): RoPE settings (`rope_type`, `rope_theta`, scaling keys) as in
            transformers' `RopeParameters`; every scaling type transformers provides is accepted.
        rms_norm_eps (`float`, defaults to 1e-6): epsilon of every RMSNorm.
        attention_bias (`bool`, defaults to `False`): bias on the q, k, v (and by default o) projections.
        attention_out_bias (`bool`, *optional*): bias on the o projection; `None` follows `attention_bias`
            (Qwen2-MoE has q/k/v bias but no o bias).
        attention_dropout (`float`, defaults to 0.0): dropout on attention probabilities during training.
        sliding_window (`int`, *optional*): local attention window in tokens; `None` is full causal attention.
        qk_norm (`str`, defaults to `"none"`): RMSNorm on queries and keys: `"none"`, `"head"` (per head, as in
            Qwen3-MoE) or `"full"` (over all heads, as in OLMoE).
        tie_word_embeddings (`bool`, defaults to `False`): share the input embedding with the LM head.
        initializer_range (`float`, defaults to 0.02): std of the normal initialisation of weights.
        pad_token_id / bos_token_id / eos_token_id (`int`, *optional*): special token ids.
        use_cache (`bool`, defaults to `True`): return a KV cache from the forward pass.

    Experts:
        num_experts (`int`, defaults to 8): routed experts E per MoE layer; 0 builds a dense model.
        num_experts_per_tok (`int`, defaults to 2): experts K chosen per token (1 = Switch top-1).
        moe_intermediate_size (`int`, defaults to 1408): hidden width F of each routed expert.
        num_shared_experts (`int`, defaults to 0): experts every token goes through (fused into one MLP).
        shared_expert_intermediate_size (`int`, *optional*): width of that fused shared MLP; `None` means
            `moe_intermediate_size * num_shared_experts`.
        shared_expert_gate (`bool`, defaults to `False`): scale the shared output by a learned per-token sigmoid gate
            (Qwen2-MoE).
        first_k_dense_replace (`int`, defaults to 0): the first k layers use a dense MLP (DeepSeek).
        moe_layer_freq (`int`, defaults to 1): layer i is MoE only when `(i + 1) % moe_layer_freq == 0`
            (Qwen's `decoder_sparse_step`).
        mlp_only_layers (`list[int]`, defaults to `[]`): layer indices forced to a dense MLP.

    Routing:
        router_type (`str`, defaults to `"softmax"`): `"softmax"` (Mixtral, Qwen, OLMoE) or `"sigmoid"` (DeepSeek-V3)
            scores; routing always runs in fp32.
        norm_topk_prob (`bool`, defaults to `True`): renormalise the K chosen weights to sum to 1.
        routed_scaling_factor (`float`, defaults to 1.0): multiplies the routed weights (DeepSeek-V3 uses 2.5).
        n_group (`int`, defaults to 1): expert groups for group-limited routing; must divide `num_experts`.
        topk_group (`int`, defaults to 1): groups a token may choose experts from; `<= n_group`.
        capacity_factor (`float`, *optional*): in training, each expert takes at most
            `ceil(capacity_factor * tokens * K / E)` assignments and drops the rest; `None` is dropless.
            Evaluation and generation are always dropless.
        router_jitter_noise (`float`, defaults to 0.0): multiplicative uniform noise on the router input in training
            (Switch Transformer).
        router_skip_threshold (`float`, defaults to 0.0): gate-threshold skipping at inference (NAEE, arXiv
            2402.14800): a token skips a chosen expert whose score is below this fraction of its top expert's score
            (the remaining weights are renormalised when `norm_topk_prob`); in [0, 1), 0 skips nothing.

    Losses:
        router_aux_loss_coef (`float`, defaults to 0.001): weight of the Switch/Mixtral load-balancing loss.
        router_aux_loss_scope (`str`, defaults to `"pooled"`): `"pooled"` counts every layer's assignments together
            (Mixtral's `load_balancing_loss_func`: one layer's dead expert hides behind the others' load);
            `"per_layer"` is the mean over MoE layers of each layer's own loss (Switch, GShard, DeepSeek), so every
            layer is pushed to balance on its own.
        router_z_loss_coef (`float`, defaults to 0.0): weight of the ST-MoE router z-loss.
        router_bias_update_rate (`float`, defaults to 0.0): step of DeepSeek-V3's aux-loss-free bias balancing
            applied by `update_router_biases`; 0 turns it off.
        output_router_logits (`bool`, defaults to `False`): return per-layer router logits and the aux loss.

    Example:

    ```python
    >>> from modeling_sparse_moe import SparseMoEConfig, SparseMoEForCausalLM
    >>> config = SparseMoEConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    ...                          intermediate_size=128, moe_intermediate_size=32, vocab_size=100)
    >>> model = SparseMoEForCausalLM(config)
    ```
    """

    model_type = "sparse_moe"
    keys_to_ignore_at_inference = ["cache"]
    default_theta = 1_000_000.0

    # Tensor parallel: attention split by heads, experts by their hidden width F (`moe_tp_experts` sums the partial
    # outputs), dense MLPs and the fused shared experts by their hidden width. The router, the shared-expert gate and
    # the norms stay replicated. `base_model_tp_plan` (below) adds the qk-norm rules, which depend on `qk_norm`.
    _tp_plan_common = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
        "layers.*.mlp.experts.down_proj": "rowwise",
        "layers.*.mlp.experts": "moe_tp_experts",
        "layers.*.mlp.shared_experts.gate_proj": "colwise",
        "layers.*.mlp.shared_experts.up_proj": "colwise",
        "layers.*.mlp.shared_experts.down_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    _tp_plan_qk_norm = {
        "none": {},
        # Qwen3-MoE: the per-head norm sees whole heads on every rank; its weight gradient is summed over ranks.
        "head": {
            "layers.*.self_attn.q_norm": "replicated_with_grad_allreduce",
            "layers.*.self_attn.k_norm": "replicated_with_grad_allreduce",
        },
        # OLMoE: the norm spans all heads, so q/k/v are gathered to full width before it and o_proj splits its input
        # (transformers' own OLMoE plan). A head-sharded q would be normalised over a slice: wrong numbers.
        "full": {
            "layers.*.self_attn.q_proj": "colwise_gather_output",
            "layers.*.self_attn.k_proj": "colwise_gather_output",
            "layers.*.self_attn.v_proj": "colwise_gather_output",
            "layers.*.self_attn.o_proj": "rowwise_split_input",
        },
    }
    base_model_ep_plan = {
        "layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
        "layers.*.mlp.experts.down_proj": "grouped_gemm",
        "layers.*.mlp.experts": "ep_dispatch_experts",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    @property
    def base_model_tp_plan(self) -> dict[str, str]:
        """The tensor parallel plan of this config (read by transformers from the instance): the common rules plus
        those its `qk_norm` needs."""
        return {**self._tp_plan_common, **self._tp_plan_qk_norm.get(self.qk_norm, {})}

    @base_model_tp_plan.setter
    def base_model_tp_plan(self, plan) -> None:
        # NOTE: older transformers (5.16, 5.19 seen) assign the plan in `PreTrainedConfig.__post_init__` (adding a rowwise
        # `embed_tokens` rule for tied embeddings, an optional memory saving). Ours is derived from `qk_norm`, so the
        # assignment is dropped: without this setter a Hub folder could not build its config there (vLLM's 5.19).
        pass

    # transformer
    vocab_size: int = 32000
    hidden_size: int = 1024
    num_hidden_layers: int = 8
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 4
    head_dim: int | None = None
    hidden_act: str = "silu"
    intermediate_size: int = 2816
    max_position_embeddings: int = 4096
    rope_parameters: RopeParameters | dict | None = None
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    attention_out_bias: bool | None = None
    attention_dropout: float | int = 0.0
    sliding_window: int | None = None
    qk_norm: str = "none"
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    use_cache: bool = True
    # experts
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 1408
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int | None = None
    shared_expert_gate: bool = False
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    mlp_only_layers: list[int] | None = None
    # routing
    router_type: str = "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: float | int = 1.0
    n_group: int = 1
    topk_group: int = 1
    capacity_factor: float | int | None = None
    router_jitter_noise: float | int = 0.0
    router_skip_threshold: float | int = 0.0
    # losses
    router_aux_loss_coef: float | int = 0.001
    router_aux_loss_scope: str = "pooled"
    router_z_loss_coef: float | int = 0.0
    router_bias_update_rate: float | int = 0.0
    output_router_logits: bool = False

    def __setattr__(self, key, value):
        # NOTE: PreTrainedConfig is a huggingface_hub strict dataclass. Depending on the installed versions its type
        # validators raise `StrictDataclassFieldValidationError`, which is not a ValueError. Re-raise it as ours, so
        # that every bad value reads the same: a ValueError naming the field. (Matched by name: this file imports only
        # torch and transformers.)
        try:
            super().__setattr__(key, value)
        except Exception as error:
            if type(error).__name__ != "StrictDataclassFieldValidationError":
                raise
            cause = error.__cause__ or error
            raise ValueError(f"SparseMoEConfig.{key}={value!r} is invalid: {cause}") from error

    def __post_init__(self, **kwargs):
        self._check_fields_read_by_parent_post_init()
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and isinstance(self.hidden_size, int) and isinstance(self.num_attention_heads, int):
            if self.num_attention_heads > 0:
                self.head_dim = self.hidden_size // self.num_attention_heads
        self._fill_derived_defaults()
        super().__post_init__(**kwargs)
        self._check_sparse_moe_fields()

    def _fill_derived_defaults(self):
        """Fields whose `None` means "derived from others"; also run by `validate`, so that an override such as
        `num_shared_experts=1` on a loaded config gets its default shared width like a fresh config does."""
        if self.attention_out_bias is None:
            self.attention_out_bias = self.attention_bias
        if self.mlp_only_layers is None:
            self.mlp_only_layers = []
        elif isinstance(self.mlp_only_layers, tuple):
            self.mlp_only_layers = list(self.mlp_only_layers)
        if (
            self.shared_expert_intermediate_size is None
            and _is_int(self.num_shared_experts)
            and _is_int(self.moe_intermediate_size)
            and self.num_shared_experts > 0
        ):
            self.shared_expert_intermediate_size = self.moe_intermediate_size * self.num_shared_experts

    # ------------------------------------------------------------------ validation
    def validate(self):
        """Check every field and raise a `ValueError` naming the first invalid one.

        Runs when the config is built, after `from_dict` / `from_pretrained` apply their keyword overrides, after
        `update` / `update_from_string`, and in every model's `__init__` before any layer is built. NOTE: a plain
        `config.field = value` is not checked on the spot, because changing two related fields one after the other
        (say `num_experts` then `n_group`) may pass through an invalid state; the model built from it checks.
        """
        self._fill_derived_defaults()
        self._check_fields_read_by_parent_post_init()
        self._check_sparse_moe_fields()
        parent_validate = getattr(super(), "validate", None)
        if parent_validate is not None:
            parent_validate()

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        # transformers builds the config from the dict, then applies keyword overrides with setattr: validate after.
        result = super().from_dict(config_dict, **kwargs)
        (result[0] if isinstance(result, tuple) else result).validate()
        return result

    def update(self, config_dict):
        self._validated_change(super().update, config_dict)

    def update_from_string(self, update_str: str):
        self._validated_change(super().update_from_string, update_str)

    def _validated_change(self, change, *args):
        """Apply `change`, then validate; if either fails, the config keeps every value it had before."""
        before = dict(self.__dict__)
        try:
            change(*args)
            self.validate()
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(before)
            raise

    def _fail(self, field, rule):
        raise ValueError(f"SparseMoEConfig.{field}={getattr(self, field, None)!r} is invalid: {rule}")

    def _check_fields_read_by_parent_post_init(self):
        """PreTrainedConfig.__post_init__ indexes these fields; a wrong type would crash there with an AttributeError
        or TypeError that does not name the field."""
        if self.rope_parameters is not None and not isinstance(self.rope_parameters, dict):
            self._fail("rope_parameters", "must be a dict of RoPE settings (rope_type, rope_theta, ...) or None")
        for field in ("id2label", "label2id"):
            value = getattr(self, field)
            if value is not None and not isinstance(value, dict):
                self._fail(field, "must be a dict or None")
        if self.id2label is not None:
            try:
                {int(key): label for key, label in self.id2label.items()}
            except (TypeError, ValueError):
                self._fail("id2label", "keys must be label ids (integers, or strings of integers)")
        if self.dtype is not None:
            import torch

            named = getattr(torch, self.dtype, None) if isinstance(self.dtype, str) else self.dtype
            if not isinstance(named, torch.dtype):
                self._fail("dtype", "must be a torch.dtype, the name of one (e.g. 'bfloat16'), or None")

    def _check_rope_parameters(self):
        """RoPE settings must build finite frequencies for our rotary embedding (a flat dict, a known rope_type)."""
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        rope = self.rope_parameters
        rope_type = rope.get("rope_type") if isinstance(rope, dict) else None
        if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
            self._fail("rope_parameters", f"rope_type must be 'default' or one of {sorted(ROPE_INIT_FUNCTIONS)}")
        theta = rope.get("rope_theta")
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 0:
            self._fail("rope_parameters", "rope_theta must be a finite number > 0")
        if "factor" in rope and not (_is_finite_number(rope["factor"]) and rope["factor"] >= 1):
            self._fail("rope_parameters", "factor must be a finite number >= 1")
        try:
            self.validate_rope()
            if rope_type != "default":
                inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](self)
                if not (bool(inv_freq.isfinite().all()) and math.isfinite(attention_factor)):
                    raise ValueError("the settings give non-finite RoPE frequencies")
        except (KeyError, ValueError, TypeError, ZeroDivisionError) as error:
            self._fail("rope_parameters", f"{type(error).__name__}: {error}")

    def _check_sparse_moe_fields(self):
        """Reject invalid values at build time with a `ValueError` that names the field and the rule."""

        fail = self._fail

        def check_int(field, minimum):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                fail(field, "must be an integer")
            if value < minimum:
                fail(field, f"must be >= {minimum}")

        for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                      "head_dim", "intermediate_size", "max_position_embeddings", "moe_intermediate_size",
                      "moe_layer_freq", "n_group", "topk_group", "num_experts_per_tok"):
            check_int(field, 1)
        for field in ("num_experts", "num_shared_experts", "first_k_dense_replace"):
            check_int(field, 0)
        for field in ("rms_norm_eps", "initializer_range", "router_aux_loss_coef", "router_z_loss_coef",
                      "router_bias_update_rate", "router_jitter_noise", "attention_dropout", "router_skip_threshold"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                fail(field, "must be a finite number")
            if value < 0:
                fail(field, "must be >= 0 (coefficients, rates and probabilities cannot be negative)")
        if self.rms_norm_eps <= 0:
            fail("rms_norm_eps", "must be > 0")
        if self.attention_dropout >= 1:
            fail("attention_dropout", "must be < 1")
        if self.router_jitter_noise >= 1:
            fail("router_jitter_noise", "must be < 1 (the noise multiplies the input by U(1 - eps, 1 + eps))")
        if self.router_skip_threshold >= 1:
            fail("router_skip_threshold", "must be < 1 (a fraction of the top expert's score; 1 would skip ties)")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            fail("num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads}")
        if self.head_dim % 2 != 0:
            fail("head_dim", "must be even: RoPE rotates pairs of dimensions (it defaults to "
                 "hidden_size // num_attention_heads)")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in _known_activations():
            fail("hidden_act", f"must be one of transformers' activations, e.g. 'silu', 'gelu'")
        if self.qk_norm not in QK_NORM_TYPES:
            fail("qk_norm", f"must be one of {QK_NORM_TYPES}")
        if self.router_aux_loss_scope not in ROUTER_AUX_LOSS_SCOPES:
            fail("router_aux_loss_scope", f"must be one of {ROUTER_AUX_LOSS_SCOPES}")
        if self.router_type not in ROUTER_TYPES:
            fail("router_type", f"must be one of {ROUTER_TYPES}")
        if self.sliding_window is not None:
            check_int("sliding_window", 1)
        if self.num_experts > 0:
            if self.num_experts_per_tok > self.num_experts:
                fail("num_experts_per_tok", f"top-k cannot exceed num_experts={self.num_experts}")
            if self.num_experts % self.n_group != 0:
                fail("n_group", f"must divide num_experts={self.num_experts}")
            if self.topk_group > self.n_group:
                fail("topk_group", f"cannot exceed n_group={self.n_group}")
            if self.n_group > 1 and self.topk_group * (self.num_experts // self.n_group) < self.num_experts_per_tok:
                fail("topk_group", "the chosen groups must hold at least num_experts_per_tok experts")
        if self.capacity_factor is not None:
            if not _is_finite_number(self.capacity_factor):
                fail("capacity_factor", "must be a finite number or None (dropless)")
            if self.capacity_factor <= 0:
                fail("capacity_factor", "must be > 0, or None for dropless routing")
        if not _is_finite_number(self.routed_scaling_factor):
            fail("routed_scaling_factor", "must be a finite number")
        if self.routed_scaling_factor <= 0:
            fail("routed_scaling_factor", "must be > 0")
        if self.num_shared_experts > 0:
            check_int("shared_expert_intermediate_size", 1)
        elif self.shared_expert_gate:
            fail("shared_expert_gate", "needs num_shared_experts > 0")
        if not isinstance(self.mlp_only_layers, list) or any(
            isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.num_hidden_layers
            for i in self.mlp_only_layers
        ):
            fail("mlp_only_layers", f"must be a list of layer indices in [0, {self.num_hidden_layers})")
        for field in ("attention_bias", "attention_out_bias", "tie_word_embeddings", "norm_topk_prob",
                      "output_router_logits", "use_cache", "is_encoder_decoder", "shared_expert_gate"):
            if not isinstance(getattr(self, field), bool):
                fail(field, "must be True or False")
        for field in ("output_hidden_states", "return_dict"):
            if getattr(self, field) is not None and not isinstance(getattr(self, field), bool):
                fail(field, "must be True, False or None")
        if self.problem_type not in (None, "regression", "single_label_classification", "multi_label_classification"):
            fail("problem_type", "must be None, 'regression', 'single_label_classification' or "
                 "'multi_label_classification'")
        check_int("chunk_size_feed_forward", 0)
        # NOTE: out-of-vocabulary pad ids crash nn.Embedding(padding_idx=...) at build, and a negative one silently
        # means vocab_size - 1 there; bos/eos only need the right type (generation just never emits an unknown id).
        if self.pad_token_id is not None and (
            not _is_int(self.pad_token_id) or not 0 <= self.pad_token_id < self.vocab_size
        ):
            fail("pad_token_id", f"must be None or a token id in [0, vocab_size={self.vocab_size})")
        if self.bos_token_id is not None and not _is_int(self.bos_token_id):
            fail("bos_token_id", "must be None or an integer token id")
        eos = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        if self.eos_token_id is not None and not all(_is_int(i) for i in eos):
            fail("eos_token_id", "must be None, an integer token id or a list of them")
        self._check_rope_parameters()

    # ------------------------------------------------------------------ structure
    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer `layer_idx` uses the MoE block (otherwise a dense gated MLP)."""
        return (
            self.num_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.moe_layer_freq == 0
        )

    def _parameter_counts(self) -> tuple[int, int]:
        """(total, active per token) parameter counts, computed from the shapes the model builds."""
        d, hd = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attn = d * q + 2 * d * kv + q * d
        if self.attention_bias:
            attn += q + 2 * kv
        if self.attention_out_bias:
            attn += d
        if self.qk_norm == "head":
            attn += 2 * hd
        elif self.qk_norm == "full":
            attn += q + kv
        norms = 2 * d
        dense_mlp = 3 * d * self.intermediate_size
        expert = 3 * d * self.moe_intermediate_size
        shared = 3 * d * self.shared_expert_intermediate_size if self.num_shared_experts else 0
        shared += d if self.shared_expert_gate else 0
        router = self.num_experts * d
        total = active = 0
        for i in range(self.num_hidden_layers):
            base = attn + norms
            if self.is_moe_layer(i):
                total += base + router + shared + self.num_experts * expert
                active += base + router + shared + self.num_experts_per_tok * expert
            else:
                total += base + dense_mlp
                active += base + dense_mlp
        embed = self.vocab_size * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        final_norm = d
        return total + embed + head + final_norm, active + embed + head + final_norm

    def num_parameters(self) -> int:
        """Total trainable parameters of `SparseMoEForCausalLM` built from this config."""
        return self._parameter_counts()[0]

    def num_active_parameters(self) -> int:
        """Parameters one token touches in `SparseMoEForCausalLM` (K routed experts instead of E)."""
        return self._parameter_counts()[1]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _known_activations():
    from transformers.activations import ACT2FN

    return ACT2FN


__all__ = ["SparseMoEConfig"]
