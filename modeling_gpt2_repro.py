"""GPT-2, written from scratch as a Hugging Face `transformers` model.

Self-contained on purpose (only torch and transformers imports): `save_pretrained` copies this file next to the
weights, so a checkpoint loads anywhere with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.

Reads top to bottom: config -> attention -> MLP -> block -> backbone -> LM head -> interop with OpenAI's weights.
Parameter names are those of the official checkpoint (`transformer.wte`, `transformer.h.N.attn.c_attn`, `lm_head`),
so converting to and from `GPT2LMHeadModel` is one transpose of four matrices per block (Conv1D vs nn.Linear).

Shapes in comments: B batch, T new tokens, S = past + T cached positions, C = n_embd, H = n_head, D = C // H,
V = vocab_size (padded, 50304 by default).
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

logger = logging.get_logger(__name__)

GPT2_VOCAB_SIZE = 50257  # OpenAI's BPE: 50,000 merges + 256 bytes + <|endoftext|>
EOT_ID = 50256


def _field(default, help: str):
    return dataclasses.field(default=default, metadata={"help": help})


# ----------------------------------------------------------------------------------------------------- config
class GPT2ReproConfig(PreTrainedConfig):
    """GPT-2 hyper-parameters; the defaults are the 124M model with the vocabulary padded to 50304 for speed.

    `vocab_size` is the size of the embedding matrix (a multiple of 64/128 makes the LM-head matmul faster);
    `tokenizer_vocab_size` is how many ids the tokenizer really has (50257): logits of the padding ids are the
    dtype's most negative value (zero probability), so neither sampling nor greedy decoding ever emits one, and the
    stock-GPT-2 export drops those rows.
    """

    model_type = "gpt2_repro"
    # Standard names, so generic code (caches, masks, FSDP wrapping) can read them.
    attribute_map = {
        "hidden_size": "n_embd",
        "max_position_embeddings": "n_positions",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
    }

    # The help texts double as the trainer's command-line help (train.py --n_layer ...).
    n_layer: int = _field(12, "transformer blocks")
    n_head: int = _field(12, "attention heads per block")
    n_embd: int = _field(768, "residual stream width")
    n_positions: int = _field(1024, "maximum context length (>= seq_len)")
    vocab_size: int = _field(50304, "embedding rows: GPT-2's 50257 padded to a multiple of 128 for speed")
    tokenizer_vocab_size: int = _field(GPT2_VOCAB_SIZE, "ids the tokenizer really has; the rest are padding")
    dropout: float = _field(0.0, "dropout probability (0 for pretraining, as in the GPT-2 reproductions)")
    layer_norm_epsilon: float = _field(1e-5, "LayerNorm epsilon")
    initializer_range: float = _field(0.02, "std of the normal init (residual projections are scaled down)")
    tie_word_embeddings: bool = True  # must be declared: the v5 base config no longer has it (untied otherwise)
    use_cache: bool = True
    bos_token_id: int | None = EOT_ID
    eos_token_id: int | None = EOT_ID
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.check()

    def check(self) -> None:
        """Raise a ValueError that says what to change when the values cannot make a GPT-2."""
        for name in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size", "tokenizer_vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPT2ReproConfig.{name} must be a positive integer, got {value!r}.")
        if self.n_embd % self.n_head:
            divisors = [h for h in range(1, self.n_embd + 1) if self.n_embd % h == 0 and h <= 64]
            raise ValueError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: every head needs the same width. "
                f"Pick n_head in {divisors} or change n_embd to a multiple of {self.n_head}."
            )
        if self.vocab_size < self.tokenizer_vocab_size:
            raise ValueError(
                f"vocab_size={self.vocab_size} is smaller than the tokenizer's {self.tokenizer_vocab_size} ids "
                f"(GPT-2's BPE has {GPT2_VOCAB_SIZE}): use {GPT2_VOCAB_SIZE}, or 50304 (padded to a multiple of 128)."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r} (GPT-2 pretraining uses 0.0).")
        if self.layer_norm_epsilon <= 0 or self.initializer_range <= 0:
            raise ValueError("layer_norm_epsilon and initializer_range must be positive.")


# -------------------------------------------------------------------------------------------------- attention
def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Reference attention in plain matmuls (what tests compare the fused kernels against).

    query (B, H, T, D); key, value (B, H, S, D); attention_mask None or additive/boolean (B, 1, T, S).
    Returns (B, T, H, D), like every function of transformers' attention interface.
    """
    scores = (query @ key.transpose(-1, -2)) * scaling  # (B, H, T, S)
    if attention_mask is None:  # causal, the T new queries being the last T of the S positions
        t, s = scores.shape[-2:]
        allowed = torch.ones(t, s, dtype=torch.bool, device=scores.device).tril(diagonal=s - t)
        scores = scores.masked_fill(~allowed, float("-inf"))
    elif attention_mask.dtype == torch.bool:  # sdpa's masks (output_attentions falls back to eager)
        # the dtype's minimum, not -inf, as in transformers' additive masks: a query row that sees no key at all
        # (a left-padding position) gets uniform weights instead of NaNs that would spread through the values
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + attention_mask
    probs = F.softmax(scores.float(), dim=-1).to(value.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return (probs @ value).transpose(1, 2), probs


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2ReproConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx  # which slot of the KV cache is ours
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.scaling = self.head_dim**-0.5
        self.is_causal = True  # lets SDPA take its flash / fused causal kernel when no mask is needed
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True  # see GPT2ReproPreTrainedModel._init_weights
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, attention_mask=None, cache: Cache | None = None, output_attentions=False, **kwargs):
        """(output (B, T, C), attention probabilities (B, H, T, S) or None): the weights are only computed by the
        eager implementation, which sdpa falls back to when they are asked for (its masks are eager's)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, H, S, D): past keys/values with ours appended
        implementation = self.config._attn_implementation
        if output_attentions and implementation == "sdpa":
            logger.warning_once(
                "output_attentions=True: attention runs in eager mode for this call (sdpa returns no weights)."
            )
            implementation = "eager"
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention)
        dropout = self.config.dropout if self.training else 0.0
        y, weights = attend(
            self, q, k, v, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs
        )  # (B, T, H, D)
        if implementation != "eager":  # flex returns its log-sum-exp there, not probabilities
            weights = None
        return self.resid_dropout(self.c_proj(y.reshape(B, T, C))), weights


class MLP(nn.Module):
    def __init__(self, config: GPT2ReproConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.act = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):  # (B, T, C) -> (B, T, 4C) -> (B, T, C)
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class GPT2ReproBlock(GradientCheckpointingLayer):
    """Pre-LayerNorm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPT2ReproConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, attention_mask=None, cache=None, **kwargs):
        a, _ = self.attn(self.ln_1(x), attention_mask=attention_mask, cache=cache, **kwargs)
        x = x + a
        return x + self.mlp(self.ln_2(x))


def padding_bias(config: GPT2ReproConfig, dtype: torch.dtype, device=None) -> torch.Tensor | None:
    """(V,) zeros with the dtype's most negative finite value at the padding ids; None when nothing is padded.

    Padding ids are not tokens: the bias gives them zero probability in the softmax, the loss and every decoding
    (exp(min - max) is exactly 0). Not -inf, as in transformers' attention masks: every logit stays finite, so the
    difference of two logit tensors and an entropy `-(softmax * log_softmax).sum()` (RL and distillation code) are
    numbers, not NaN (-inf - -inf, 0 * -inf). Built in the logits' own dtype, because float32's min is -inf once
    cast to bf16 or fp16. As the bias of the LM-head matmul it costs nothing (fused into the GEMM, a constant with
    no gradient), where filling the logits in place made autograd copy the whole (B, T, V) gradient; it is made
    per call (V numbers) rather than kept as a buffer, so no cast, device move or resize can leave it stale.
    """
    if config.vocab_size == config.tokenizer_vocab_size:
        return None
    bias = torch.zeros(config.vocab_size, dtype=dtype, device=device)
    bias[config.tokenizer_vocab_size :] = torch.finfo(dtype).min
    return bias


# ------------------------------------------------------------------------------------------------ the models
class GPT2ReproPreTrainedModel(PreTrainedModel):
    config_class = GPT2ReproConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["GPT2ReproBlock"]  # FSDP / device_map wrap unit
    # Attention goes through transformers' registry: "sdpa" (default), "eager" (the reference, and the only one
    # that returns attention weights) and "flex_attention" (CUDA: training and inference; CPU: inference only, as
    # PyTorch's flex attention has no CPU backward), each tested against eager. flash_attention_2 is not declared:
    # it needs the flash-attn package, which has not been tested with this model (on GPUs, sdpa already runs
    # PyTorch's flash kernel).
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = True
    _supports_attention_backend = True
    supports_gradient_checkpointing = True
    _can_compile_fullgraph = True
    # output_hidden_states / output_attentions, recorded by transformers' hooks as in its GPT-2: the input of the
    # first block, then every block's output, the last one replaced by the final LayerNorm's (n_layer + 1 in all).
    _can_record_outputs = {"hidden_states": GPT2ReproBlock, "attentions": OutputRecorder(CausalSelfAttention, index=1)}

    def _init_weights(self, module):
        """GPT-2 init: N(0, 0.02) everywhere; the two residual output projections get 0.02 / sqrt(2 * n_layer).

        transformers never calls this on container modules of custom code (their direct parameter list is
        empty), so the residual scaling is flagged on the Linear leaves themselves (RESIDUAL_SCALE_INIT).
        """
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "RESIDUAL_SCALE_INIT", False):
                std = std / math.sqrt(2 * self.config.n_layer)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Embedding:
        """`new_num_tokens` real ids (`len(tokenizer)`), the matrix padded up to `pad_to_multiple_of` if given.

        transformers' resize knows only the matrix size; this keeps `tokenizer_vocab_size` (the real ids), which
        the logit mask follows, so every real id is learnable and every padding id stays masked. The padding rows are
        dropped first, so ids that become real get fresh rows initialised from the real ones (mean_resizing), never
        a padding row that training never reached.
        """
        config = self.config
        if new_num_tokens is None and pad_to_multiple_of is None:
            return self.get_input_embeddings()
        real = config.tokenizer_vocab_size if new_num_tokens is None else new_num_tokens
        if config.vocab_size != config.tokenizer_vocab_size:
            super().resize_token_embeddings(config.tokenizer_vocab_size, mean_resizing=mean_resizing)
        embeddings = super().resize_token_embeddings(real, pad_to_multiple_of, mean_resizing)
        config.tokenizer_vocab_size = real
        return embeddings


class GPT2ReproModel(GPT2ReproPreTrainedModel):
    """The backbone: embeddings, n_layer blocks, final LayerNorm. Returns hidden states (B, T, C)."""

    _input_embed_layer = "wte"

    def __init__(self, config: GPT2ReproConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(GPT2ReproBlock(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.post_init()

    def _check_input(
        self, input_ids: torch.Tensor | None, position_ids: torch.Tensor | None, past: int | torch.Tensor, new: int
    ) -> None:
        """Clear errors for ids and positions outside the embedding tables, where they cost nothing.

        The length check reads no tensor data (Python ints): it always runs. The others read values, which on an
        accelerator waits for every queued kernel (a device sync per forward) and under torch.compile is a
        data-dependent branch (fullgraph=True refuses the graph): they run only in eager mode on CPU tensors, where
        reading is free. Elsewhere the embedding lookup still refuses an out-of-range index, with a vaguer message.
        The positions checked are those used: a packed row (position_ids restarting per sequence) may be longer
        than n_positions as long as no position reaches it.
        """
        n_positions = self.config.n_positions
        if position_ids is None and isinstance(past, int):
            self._check_length(past, new)
        if torch.compiler.is_compiling():
            return
        if position_ids is None and isinstance(past, torch.Tensor) and past.device.type == "cpu":
            self._check_length(int(past), new)  # a static cache counts its length in a tensor
        if position_ids is not None and position_ids.device.type == "cpu" and position_ids.numel():
            lo, hi = torch.stack(torch.aminmax(position_ids)).tolist()
            if lo < 0 or hi >= n_positions:
                raise ValueError(
                    f"Position {hi if hi >= n_positions else lo} is outside the position table [0, {n_positions}): "
                    f"the sequence is longer than the model's context n_positions={n_positions}. Truncate it, ask "
                    f"generate() for fewer new tokens, or restart position_ids at 0 for each sequence of a packed row."
                )
        if input_ids is not None and input_ids.device.type == "cpu" and input_ids.numel():
            lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(
                    f"Token id {hi if hi >= self.config.vocab_size else lo} is outside the vocabulary "
                    f"[0, {self.config.vocab_size}). Tokenize with the GPT-2 BPE (ids < {GPT2_VOCAB_SIZE}) or "
                    f"raise vocab_size."
                )

    def _check_length(self, past: int, new: int) -> None:
        if past + new > self.config.n_positions:
            raise ValueError(
                f"Sequence of {past + new} tokens ({past} cached + {new} new) is longer than the model's context "
                f"n_positions={self.config.n_positions}. Truncate the input (keep the last {self.config.n_positions} "
                f"tokens) or ask generate() for fewer new tokens."
            )

    @capture_outputs  # output_hidden_states, output_attentions, return_dict (see _can_record_outputs)
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")  # as transformers' GPT-2: the pre-5.x name warns
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        kwargs.pop("output_hidden_states", None)  # recorded by capture_outputs' hooks
        output_attentions = kwargs.pop("output_attentions", self.config.output_attentions)
        if output_attentions and self.config._attn_implementation not in ("eager", "sdpa"):
            raise ValueError(
                f"output_attentions=True needs attn_implementation='eager' (or 'sdpa', which falls back to it); "
                f"this model runs {self.config._attn_implementation!r}. Load it with attn_implementation='eager'."
            )
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0  # an int, or a 0-d tensor for a static cache
        T = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        self._check_input(input_ids, position_ids, past, T)

        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)  # (B, T, C)
        if position_ids is None:  # arange + past: a tensor past is added on the device, never read back
            position_ids = (torch.arange(T, device=inputs_embeds.device) + past).unsqueeze(0)  # (1, T)
        x = self.drop(inputs_embeds + self.wpe(position_ids))

        # None when nothing is padded and the implementation is sdpa/flash: the fast is_causal path.
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        for block in self.h:
            x = block(
                x,
                attention_mask=mask,
                cache=cache,
                position_ids=position_ids,
                output_attentions=output_attentions,
                **kwargs,
            )
        return BaseModelOutputWithPast(last_hidden_state=self.ln_f(x), cache=cache if use_cache else None)


class GPT2ReproForCausalLM(GPT2ReproPreTrainedModel, GenerationMixin):
    """GPT-2 with its language-model head (tied to the token embedding)."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}  # {target: source}

    def __init__(self, config: GPT2ReproConfig):
        super().__init__(config)
        self.transformer = GPT2ReproModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()
        if self.generation_config.pad_token_id is None:
            self.generation_config.pad_token_id = config.eos_token_id  # no "setting pad to eos" notice per call

    @can_return_tuple  # return_dict=False: a tuple of the non-None fields, as every transformers model
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_logits: bool = True,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Next-token logits (B, T, V) and, given targets, the mean cross-entropy in fp32.

        labels: the transformers convention, `labels=input_ids`; shifted by one inside (position t predicts t+1).
        shift_labels: targets already aligned with the inputs, (B, T) with shift_labels[:, t] = token t+1, as the
            trainer's loader yields them; used as they are, never shifted twice. -100 marks ignored positions.
        return_logits: False drops the logits from the output when a loss is computed (training does not need
            them, and mixed precision would otherwise return a B x T x V fp32 copy).
        """
        out = self.transformer(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        h = out.last_hidden_state  # (B, T, C)
        wants_loss = labels is not None or shift_labels is not None
        if not wants_loss and logits_to_keep:  # generation needs the last position only
            h = h[:, -logits_to_keep:]
        # The logits' dtype: autocast's when it is on (the matmul runs in it and would cast an fp32 bias to -inf).
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        mask = padding_bias(self.config, dtype, h.device)  # (V,): 0 for real ids, the dtype's min for padding
        logits = F.linear(h, self.lm_head.weight, mask)  # (B, T, V)

        loss = None
        if wants_loss:
            if shift_labels is not None:
                shift_labels = shift_labels.contiguous()
            loss = self.loss_function(
                logits, labels, vocab_size=self.config.vocab_size, shift_labels=shift_labels, **kwargs
            )
            if not return_logits:
                logits = None
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=out.cache,
            hidden_states=out.hidden_states,  # (n_layer + 1) x (B, T, C) when asked for
            attentions=out.attentions,  # n_layer x (B, H, T, S) when asked for
        )

    def save_pretrained(self, save_directory, *args, **kwargs):
        # transformers adds only the saved class to `auto_map`; expose the backbone too.
        if getattr(self, "_auto_class", None) is not None:
            module = __name__.rsplit(".", 1)[-1]  # as loaded from a checkpoint: transformers_modules.<hash>.<name>
            auto_map = getattr(self.config, "auto_map", None) or {}
            self.config.auto_map = {**auto_map, "AutoModel": f"{module}.GPT2ReproModel"}
        return super().save_pretrained(save_directory, *args, **kwargs)

    # ----------------------------------------------------------------------------- interop with OpenAI's GPT-2
    @classmethod
    def from_official_gpt2(cls, source="gpt2", vocab_size: int | None = None, **from_pretrained_kwargs):
        """Our model with the weights of an official GPT-2: a Hub id (`gpt2`, `gpt2-medium`, `gpt2-large`,
        `gpt2-xl`, `openai-community/...`), a `GPT2LMHeadModel` folder, or a loaded `GPT2LMHeadModel`.

        vocab_size: keep the official 50257 (default: identical outputs) or pad, e.g. 50304, to fine-tune faster.
        """
        from transformers import GPT2LMHeadModel

        if isinstance(source, GPT2LMHeadModel):
            official = source
        elif isinstance(source, (str, os.PathLike)):
            from_pretrained_kwargs.setdefault("dtype", torch.float32)
            official = GPT2LMHeadModel.from_pretrained(source, **from_pretrained_kwargs)
        else:
            raise TypeError(f"source must be a Hub id, a folder or a GPT2LMHeadModel, not {type(source).__name__}.")
        oc = official.config
        unsupported = {
            "activation_function": oc.activation_function not in ("gelu_new", "gelu_pytorch_tanh"),
            "n_inner": oc.n_inner not in (None, 4 * oc.n_embd),
            "scale_attn_by_inverse_layer_idx": oc.scale_attn_by_inverse_layer_idx,
            "scale_attn_weights": not oc.scale_attn_weights,
            "add_cross_attention": oc.add_cross_attention,
        }
        if any(unsupported.values()):
            bad = [k for k, v in unsupported.items() if v]
            raise ValueError(f"This GPT2LMHeadModel departs from GPT-2 in {bad}; it cannot be converted.")
        config = GPT2ReproConfig(
            n_layer=oc.n_layer,
            n_head=oc.n_head,
            n_embd=oc.n_embd,
            n_positions=oc.n_positions,
            vocab_size=vocab_size or oc.vocab_size,
            tokenizer_vocab_size=oc.vocab_size,
            layer_norm_epsilon=oc.layer_norm_epsilon,
            initializer_range=oc.initializer_range,
        )
        state = transpose_conv1d_weights(official.state_dict())
        model = cls(config).to(official.dtype)
        pad = config.vocab_size - oc.vocab_size
        for key in ("transformer.wte.weight", "lm_head.weight"):
            state[key] = F.pad(state[key], (0, 0, 0, pad))  # zero rows for padding ids (their logits are masked)
        missing, unexpected = model.load_state_dict(state, strict=False)
        unexpected = [k for k in unexpected if not k.endswith((".attn.bias", ".attn.masked_bias"))]  # legacy masks
        if missing or unexpected:
            raise ValueError(f"Official checkpoint does not match: missing {missing}, unexpected {unexpected}.")
        return model.eval()

    def to_official_gpt2(self):
        """A stock `GPT2LMHeadModel` with these weights (vocabulary cut back to `tokenizer_vocab_size`).

        It saves and loads with plain transformers, no remote code, so every tool that knows GPT-2 can use it.
        """
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = self.config
        official_config = GPT2Config(
            vocab_size=cfg.tokenizer_vocab_size,
            n_positions=cfg.n_positions,
            n_embd=cfg.n_embd,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            activation_function="gelu_new",
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            layer_norm_epsilon=cfg.layer_norm_epsilon,
            initializer_range=cfg.initializer_range,
            bos_token_id=cfg.bos_token_id,
            eos_token_id=cfg.eos_token_id,
            tie_word_embeddings=True,
        )
        state = transpose_conv1d_weights(self.state_dict())
        for key in ("transformer.wte.weight", "lm_head.weight"):
            state[key] = state[key][: cfg.tokenizer_vocab_size]
        official = GPT2LMHeadModel(official_config).to(self.dtype)
        # end-of-text pads, as in our generation config and the exported tokenizer
        official.generation_config.pad_token_id = self.generation_config.pad_token_id
        missing, unexpected = official.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]
        if missing or unexpected:
            raise RuntimeError(f"Export to GPT2LMHeadModel failed: missing {missing}, unexpected {unexpected}.")
        return official.to(self.device).eval()


def estimate_flops_per_token(config: GPT2ReproConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), nanoGPT/PaLM style: 6N + 12 * L * H * D * T.

    N counts every matmul weight, the tied embedding as the LM head included, but not the position table
    (a lookup, not a matmul). 124M, T=1024: about 855M FLOPs per token.
    """
    layers, width, heads = config.n_layer, config.n_embd, config.n_head
    n_params = 12 * layers * width**2 + 13 * layers * width + config.vocab_size * width + 2 * width
    return 6 * n_params + 12 * layers * heads * (width // heads) * seq_len


# The four matmul weights that OpenAI's checkpoint stores as Conv1D (in, out) and we as nn.Linear (out, in).
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def transpose_conv1d_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a state dict between the official Conv1D layout and ours; it is its own inverse."""
    return {k: v.t().contiguous() if k.endswith(CONV1D_WEIGHTS) else v for k, v in state_dict.items()}


# `auto_map` entries, so a saved folder (which carries a copy of this file) loads with trust_remote_code=True where
# the project is absent. No AutoConfig/AutoModel registration here: this file is every checkpoint's remote code, and
# a registration run by one trusted load would make every other folder of model_type "gpt2_repro" load without
# trust_remote_code, with the first folder's code. The project registers in-process: gpt2_repro.register_auto_classes.
GPT2ReproConfig.register_for_auto_class()
GPT2ReproModel.register_for_auto_class("AutoModel")
GPT2ReproForCausalLM.register_for_auto_class("AutoModelForCausalLM")
