"""ConvBERT (Jiang et al. 2020): BERT with half of its attention heads replaced by a span-based dynamic convolution.

A port of transformers' `modeling_convbert.py` with the same state-dict keys and numbers. The three hot spots
(separable conv, dynamic span conv, grouped linear) go through `convbert_fast.ops`, which dispatch to the chosen
backend. Shapes: B batch, L sequence, C hidden size, E embedding size, H conv (= attention) heads of size D,
A = H * D = C / 2 for the released configs, K the conv kernel size.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from transformers import ConvBertConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN, get_activation
from transformers.modeling_outputs import (
    BaseModelOutputWithCrossAttentions,
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.pytorch_utils import apply_chunking_to_forward

from . import inference_weights, ops, sequences
from .tf_checkpoint import load_tf_weights_in_convbert

FUSED_PROJECTION_CACHE = "_fused_projection_cache"


class ConvBertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout: [B, L] -> [B, L, E]."""

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.embedding_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.embedding_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.embedding_size)
        self.LayerNorm = nn.LayerNorm(config.embedding_size, eps=config.layer_norm_eps)  # TF name, kept for loading
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.register_buffer(
            "position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)), persistent=False
        )
        self.register_buffer(
            "token_type_ids", torch.zeros(self.position_ids.size(), dtype=torch.long), persistent=False
        )

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None):
        seq_len = input_ids.shape[1] if input_ids is not None else inputs_embeds.shape[1]
        if position_ids is None:
            position_ids = self.position_ids[:, :seq_len]
        if token_type_ids is None:
            token_type_ids = self.token_type_ids[:, :seq_len]
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        embeddings = inputs_embeds + self.position_embeddings(position_ids) + self.token_type_embeddings(token_type_ids)
        if ops.backend.fused_layers():  # the fused layers' dropout (ops.dropout: one pass, the mask not kept)
            return ops.dropout(self.LayerNorm(embeddings), self.dropout.p, self.training)
        return self.dropout(self.LayerNorm(embeddings))


class SeparableConv1D(nn.Module):
    """Depthwise conv over the sequence ([C, 1, K]), pointwise C -> A ([A, C, 1]), bias [A, 1]: [B, L, C] -> [B, L, A].

    Unlike transformers' module (which takes [B, C, L]) this one works on [B, L, C]: no transposes around it.
    """

    def __init__(self, config, input_filters, output_filters, kernel_size):
        super().__init__()
        self.depthwise = nn.Conv1d(
            input_filters, input_filters, kernel_size, groups=input_filters, padding=kernel_size // 2, bias=False
        )
        self.pointwise = nn.Conv1d(input_filters, output_filters, kernel_size=1, bias=False)
        self.bias = nn.Parameter(torch.zeros(output_filters, 1))
        self.depthwise.weight.data.normal_(mean=0.0, std=config.initializer_range)
        self.pointwise.weight.data.normal_(mean=0.0, std=config.initializer_range)

    def forward(self, hidden_states, multiplier=None, cu_seqlens=None):  # multiplier [B, L, A]: fused where it can
        return ops.separable_conv1d(
            hidden_states, self.depthwise.weight, self.pointwise.weight, self.bias, multiplier, cu_seqlens
        )


class ConvBertSelfAttention(nn.Module):
    """H softmax-attention heads and H span-conv heads of size D, concatenated: [B, L, C] -> [B, L, 2A]."""

    def __init__(self, config):
        super().__init__()
        if config.conv_kernel_size < 1 or config.conv_kernel_size % 2 == 0:
            raise ValueError(
                f"conv_kernel_size must be odd and positive (the span is centred on each token), "
                f"got {config.conv_kernel_size}"
            )
        heads = config.num_attention_heads // config.head_ratio
        if heads < 1:  # head_ratio > num_attention_heads: one head, as transformers does
            self.head_ratio, self.num_attention_heads = config.num_attention_heads, 1
        else:
            self.head_ratio, self.num_attention_heads = config.head_ratio, heads
        if config.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({config.hidden_size}) must be divisible by num_attention_heads // head_ratio "
                f"({self.num_attention_heads})"
            )
        self.conv_kernel_size = config.conv_kernel_size
        self.attention_head_size = (config.hidden_size // self.num_attention_heads) // 2
        self.all_head_size = self.num_attention_heads * self.attention_head_size

        self.query = nn.Linear(config.hidden_size, self.all_head_size)
        self.key = nn.Linear(config.hidden_size, self.all_head_size)
        self.value = nn.Linear(config.hidden_size, self.all_head_size)
        self.key_conv_attn_layer = SeparableConv1D(
            config, config.hidden_size, self.all_head_size, self.conv_kernel_size
        )
        self.conv_kernel_layer = nn.Linear(self.all_head_size, self.num_attention_heads * self.conv_kernel_size)
        self.conv_out_layer = nn.Linear(config.hidden_size, self.all_head_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def split_heads(self, x):  # [B, L, A] -> [B, H, L, D]
        return x.view(*x.shape[:-1], self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def projection_parameters(self):
        layers = (self.query, self.key, self.value, self.conv_out_layer)
        return [layer.weight for layer in layers] + [layer.bias for layer in layers]

    def fused_projection_weights(self, params=None):
        """[4A, C] and [4A]: the query, key, value and conv_out layers stacked, for one GEMM over x.

        Concatenated on every call while autograd needs them (training: the four gradients flow back through
        the cat) or under torch.compile (which folds it); otherwise cached (see convbert_fast.inference_weights)."""
        params = self.projection_parameters() if params is None else params
        autograd = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        key = None if torch.compiler.is_compiling() or autograd else inference_weights.parameters_key(params)
        if key is None:  # (also parameters whose changes cannot be told: see parameters_key)
            return torch.cat(params[:4]), torch.cat(params[4:])
        cache = self.__dict__.get(FUSED_PROJECTION_CACHE)
        if cache is None or cache[0] != key:
            cache = (key, torch.cat(params[:4]), torch.cat(params[4:]))
            self.__dict__[FUSED_PROJECTION_CACHE] = cache  # a plain attribute: not in the state dict
        return cache[1], cache[2]

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        head_mask=None,
        encoder_hidden_states=None,
        output_attentions=False,
        sequences=None,
    ):
        """`sequences` (padding-invariant mode, convbert_fast.sequences): MaskedConvs for padded rows run in place
        (the convs read zeros at the padding), or PackedSequences for packed rows [1, T, C] (the convs take their
        offsets, attention stays inside each sequence)."""
        if ops.backend.fused_layers():
            return self.fused_forward(
                hidden_states, attention_mask, head_mask, encoder_hidden_states, output_attentions, sequences
            )
        # The seed's math, step for step (the `eager` backend), in transformers' order: autograd sums the
        # gradients of x's uses in the reverse order of their creation, so another order rounds differently.
        # Cross-attention takes keys and values from the encoder; the conv half always reads `hidden_states`.
        kv_states = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        cu_seqlens = None if sequences is None else sequences.cu_seqlens
        conv_input = hidden_states if sequences is None else sequences.conv_input(hidden_states)
        mixed_key, mixed_value = self.key(kv_states), self.value(kv_states)  # [B, Lk, A]
        conv_x = self.key_conv_attn_layer(conv_input, None, cu_seqlens)  # [B, L, A]
        mixed_query = self.query(hidden_states)  # [B, L, A]
        query, key, value = self.split_heads(mixed_query), self.split_heads(mixed_key), self.split_heads(mixed_value)

        # Conv half: span weights come from the separable conv of x multiplied by the query.
        kernel_logits = self.conv_kernel_layer(torch.multiply(conv_x, mixed_query))  # [B, L, H*K]
        conv_values = self.conv_out_layer(hidden_states)  # [B, L, A]
        if sequences is not None:
            conv_values = sequences.conv_input(conv_values)
        conv_context = ops.dynamic_span_conv(conv_values, kernel_logits, self.num_attention_heads, None, cu_seqlens)

        # Attention half: ordinary scaled dot-product attention.
        if cu_seqlens is not None:  # packed rows: no attention across sequences
            attention_mask = sequences.block_diagonal_mask(query.dtype)
        probs = self.attention_probs(query, key, attention_mask, head_mask)  # [B, H, L, Lk]
        attn_context = torch.matmul(probs, value).transpose(1, 2).reshape(conv_context.shape)  # [B, L, A]

        context = torch.cat([attn_context, conv_context], dim=-1)  # [B, L, 2A]: attention heads first
        return (context, probs) if output_attentions else (context,)

    def attention_probs(self, query, key, attention_mask, head_mask, fused_dropout=False):
        scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(self.attention_head_size)  # [B, H, L, Lk]
        if attention_mask is not None:
            scores = scores + attention_mask  # additive, [B, 1, 1, Lk]
        probs = nn.functional.softmax(scores, dim=-1)
        probs = ops.dropout(probs, self.dropout.p, self.training) if fused_dropout else self.dropout(probs)
        return probs if head_mask is None else probs * head_mask  # [1, H, 1, 1]

    def fused_forward(
        self, hidden_states, attention_mask, head_mask, encoder_hidden_states, output_attentions, sequences=None
    ):
        """The same math in fewer passes: one GEMM for the four projections of x, the query multiply inside the
        separable conv, scaled_dot_product_attention unless probabilities or a head mask are asked for, and the
        span conv written after the attention half of the context instead of a `cat`."""
        if encoder_hidden_states is None:
            params = self.projection_parameters()
            weight, bias = self.fused_projection_weights(params)
            projections = inference_weights.linear(self, "projections", hidden_states, weight, bias, params)
            # projections [B, L, 4A]
            mixed_query, mixed_key, mixed_value, conv_values = projections.split(self.all_head_size, dim=-1)
        else:  # cross-attention: keys and values from the encoder
            mixed_query, conv_values = self.query(hidden_states), self.conv_out_layer(hidden_states)
            mixed_key, mixed_value = self.key(encoder_hidden_states), self.value(encoder_hidden_states)
        cu_seqlens = None if sequences is None else sequences.cu_seqlens
        conv_input = hidden_states if sequences is None else sequences.conv_input(hidden_states)
        conv_attn = self.key_conv_attn_layer(conv_input, mixed_query, cu_seqlens)  # [B, L, A]
        kernel_logits = linear_layer(self.conv_kernel_layer, conv_attn)  # [B, L, H*K]
        if sequences is not None:
            conv_values = sequences.conv_input(conv_values)

        query = self.split_heads(mixed_query)  # [B, H, L, D]
        key, value = self.split_heads(mixed_key), self.split_heads(mixed_value)  # [B, H, Lk, D]
        probs = None
        dropout_p = self.dropout.p if self.training else 0.0
        # On the CPU, SDPA with dropout takes its math path, which upcasts bf16/fp16 to fp32 and draws torch's dropout
        # mask (a Mersenne Twister number per element): the math written out, in the low precision and with
        # ops.dropout, is faster there (B=8, L=256, 6 heads of 64, forward + backward of the attention alone: 26 against
        # 45 ms in fp32, 12 against 46 in bf16; 43 and 31 with torch's dropout). Packed rows do the same per sequence
        # (sequences.attention), not over a [T, T] block-diagonal mask.
        cpu_dropout = self.training and self.dropout.p > 0 and query.device.type == "cpu" and cu_seqlens is None
        if output_attentions or head_mask is not None or cpu_dropout:
            if cu_seqlens is not None:  # packed rows: no attention across sequences
                attention_mask = sequences.block_diagonal_mask(query.dtype)
            probs = self.attention_probs(query, key, attention_mask, head_mask, fused_dropout=True)  # [B, H, L, Lk]
            attn_context = torch.matmul(probs, value)  # [B, H, L, D]
        elif cu_seqlens is not None:  # packed rows: attention per sequence, [1, T, A] viewed as [1, H, T, D]
            attn_context = sequences.attention(mixed_query, mixed_key, mixed_value, self.num_attention_heads, dropout_p)
            attn_context = self.split_heads(attn_context)
        else:
            if attention_mask is not None and attention_mask.dtype != query.dtype:  # autocast: SDPA wants one dtype
                attention_mask = attention_mask.clamp(min=torch.finfo(query.dtype).min).to(query.dtype)
            attn_context = nn.functional.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=dropout_p
            )  # [B, H, L, D]
        # [B, L, H, D] of attention, then the H conv heads: [B, L, 2A]
        context = ops.dynamic_span_conv(
            conv_values, kernel_logits, self.num_attention_heads, attn_context.transpose(1, 2), cu_seqlens
        )
        return (context, probs) if output_attentions else (context,)


def linear_layer(layer, x, gelu: bool = False):
    """layer(x) (gelu: F.gelu of it) for the fused backends: a plain nn.Linear through inference_weights.layer (packed
    for CPU inference); a subclass (a quantized layer, say) or a layer with hooks through its own call, so that they
    still run."""
    plain = type(layer) is nn.Linear and not (layer._forward_hooks or layer._forward_pre_hooks)
    if plain:
        return inference_weights.layer(layer, x, gelu=gelu)
    return nn.functional.gelu(layer(x)) if gelu else layer(x)


def dense_dropout_add_norm(sublayer, hidden_states, residual):
    """LayerNorm(dropout(dense(x)) + residual): the end of both sublayers; fused into one pass per row after the
    dense layer unless the backend is `eager` (see ops.dropout_add_layer_norm)."""
    if not ops.backend.fused_layers():
        return sublayer.LayerNorm(sublayer.dropout(sublayer.dense(hidden_states)) + residual)
    norm = sublayer.LayerNorm
    return ops.dropout_add_layer_norm(
        linear_layer(sublayer.dense, hidden_states), residual, norm.weight, norm.bias, sublayer.dropout.p, norm.eps, sublayer.training
    )


class ConvBertSelfOutput(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return dense_dropout_add_norm(self, hidden_states, input_tensor)


class ConvBertAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self = ConvBertSelfAttention(config)
        self.output = ConvBertSelfOutput(config)

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        head_mask=None,
        encoder_hidden_states=None,
        output_attentions=False,
        sequences=None,
    ):
        self_outputs = self.self(
            hidden_states, attention_mask, head_mask, encoder_hidden_states, output_attentions, sequences
        )
        return (self.output(self_outputs[0], hidden_states),) + self_outputs[1:]


class GroupedLinearLayer(nn.Module):
    """`num_groups` independent linear maps over equal slices of the features: [..., Din] -> [..., Dout]."""

    def __init__(self, input_size, output_size, num_groups):
        super().__init__()
        if input_size % num_groups or output_size % num_groups:
            raise ValueError(f"num_groups ({num_groups}) must divide both {input_size} and {output_size}")
        self.input_size, self.output_size, self.num_groups = input_size, output_size, num_groups
        self.group_in_dim = input_size // num_groups
        self.group_out_dim = output_size // num_groups
        self.weight = nn.Parameter(torch.empty(num_groups, self.group_in_dim, self.group_out_dim))
        self.bias = nn.Parameter(torch.empty(output_size))

    def forward(self, hidden_states, activation=None):
        return ops.grouped_linear(hidden_states, self.weight, self.bias, activation=activation)


def feed_forward_dense(config, input_size, output_size):
    if config.num_groups == 1:
        return nn.Linear(input_size, output_size)
    return GroupedLinearLayer(input_size, output_size, config.num_groups)


class ConvBertIntermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = feed_forward_dense(config, config.hidden_size, config.intermediate_size)
        act = config.hidden_act
        self.intermediate_act_fn = ACT2FN[act] if isinstance(act, str) else act
        self.activation_name = act if isinstance(act, str) else None

    def forward(self, hidden_states):
        if isinstance(self.dense, GroupedLinearLayer) and self.activation_name == "gelu":
            return self.dense(hidden_states, activation="gelu")  # the bias and GELU fused where possible
        if ops.backend.fused_layers():
            if self.activation_name == "gelu":  # exact GELU, as ACT2FN["gelu"]: fused into the GEMM where it can be
                return linear_layer(self.dense, hidden_states, gelu=True)
            return self.intermediate_act_fn(linear_layer(self.dense, hidden_states))
        return self.intermediate_act_fn(self.dense(hidden_states))


class ConvBertOutput(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = feed_forward_dense(config, config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return dense_dropout_add_norm(self, hidden_states, input_tensor)


class ConvBertLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.chunk_size_feed_forward = config.chunk_size_feed_forward
        self.seq_len_dim = 1
        self.attention = ConvBertAttention(config)
        self.is_decoder = config.is_decoder
        self.add_cross_attention = config.add_cross_attention
        if self.add_cross_attention:
            if not self.is_decoder:
                raise TypeError(f"{self} should be used as a decoder model if cross attention is added")
            self.crossattention = ConvBertAttention(config)
        self.intermediate = ConvBertIntermediate(config)
        self.output = ConvBertOutput(config)

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        head_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        output_attentions=False,
        sequences=None,
    ):
        self_outputs = self.attention(
            hidden_states, attention_mask, head_mask, output_attentions=output_attentions, sequences=sequences
        )
        attention_output, outputs = self_outputs[0], self_outputs[1:]  # outputs: self-attention probs, if asked
        if self.is_decoder and encoder_hidden_states is not None:
            if not hasattr(self, "crossattention"):
                raise AttributeError(
                    f"If `encoder_hidden_states` are passed, {self} has to be instantiated with cross-attention "
                    "layers by setting `config.add_cross_attention=True`"
                )
            cross_outputs = self.crossattention(
                attention_output, encoder_attention_mask, head_mask, encoder_hidden_states, output_attentions, sequences
            )
            attention_output, outputs = cross_outputs[0], outputs + cross_outputs[1:]
        if self.chunk_size_feed_forward:
            layer_output = apply_chunking_to_forward(
                self.feed_forward_chunk, self.chunk_size_feed_forward, self.seq_len_dim, attention_output
            )
        else:  # what apply_chunking_to_forward calls then, without its inspect.signature of every call (~30 us)
            layer_output = self.feed_forward_chunk(attention_output)
        return (layer_output,) + outputs

    def feed_forward_chunk(self, attention_output):
        return self.output(self.intermediate(attention_output), attention_output)


class ConvBertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList([ConvBertLayer(config) for _ in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False  # set by PreTrainedModel.gradient_checkpointing_enable()

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        head_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        output_attentions=False,
        output_hidden_states=False,
        return_dict=True,
        sequences=None,
    ):
        all_hidden_states = () if output_hidden_states else None
        all_self_attentions = () if output_attentions else None
        all_cross_attentions = () if output_attentions and self.config.add_cross_attention else None
        for i, layer in enumerate(self.layer):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            args = (hidden_states, attention_mask, head_mask[i], encoder_hidden_states, encoder_attention_mask)
            if self.gradient_checkpointing and self.training:
                layer_outputs = self._gradient_checkpointing_func(layer.__call__, *args, output_attentions, sequences)
            else:
                layer_outputs = layer(*args, output_attentions, sequences)
            hidden_states = layer_outputs[0]
            if output_attentions:
                all_self_attentions += (layer_outputs[1],)
                if self.config.add_cross_attention:
                    all_cross_attentions += (layer_outputs[2],)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if not return_dict:
            outputs = (hidden_states, all_hidden_states, all_self_attentions, all_cross_attentions)
            return tuple(v for v in outputs if v is not None)
        return BaseModelOutputWithCrossAttentions(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            attentions=all_self_attentions,
            cross_attentions=all_cross_attentions,
        )


class ConvBertPreTrainedModel(PreTrainedModel):
    config_class = ConvBertConfig
    config: ConvBertConfig
    load_tf_weights = load_tf_weights_in_convbert
    base_model_prefix = "convbert"
    supports_gradient_checkpointing = True

    def _init_weights(self, module):
        """Normal(0, initializer_range) for linear, conv and embedding weights, zero biases, unit LayerNorms."""
        super()._init_weights(module)
        if isinstance(module, SeparableConv1D):
            init.zeros_(module.bias)
        elif isinstance(module, GroupedLinearLayer):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            init.zeros_(module.bias)
        elif isinstance(module, ConvBertEmbeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
            init.zeros_(module.token_type_ids)


def enable_checkpointing(model: PreTrainedModel, **checkpoint_kwargs) -> None:
    """Gradient checkpointing of every layer of `model` (ours or a transformers model), with
    `checkpoint_kwargs` for torch.utils.checkpoint. transformers up to 5.17 at least names it
    `gradient_checkpointing_enable`; later 5.x versions `activation_checkpointing_enable` and keep the old
    name as a deprecated alias that warns."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs or None)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs or None)


def _resolve_output_flags(config, output_attentions, output_hidden_states, return_dict):
    return (
        config.output_attentions if output_attentions is None else output_attentions,
        config.output_hidden_states if output_hidden_states is None else output_hidden_states,
        config.return_dict if return_dict is None else return_dict,
    )


def extended_attention_mask(mask, dtype):
    """[B, Lk] of 1 (attend) / 0 (ignore) -> additive [B, 1, 1, Lk] of 0 / dtype's lowest value."""
    if mask.dim() == 2:
        mask = mask[:, None, None, :]
    elif mask.dim() != 3:
        raise ValueError(
            f"attention masks must have shape [batch, seq_len] or [batch, seq_len, seq_len], got {list(mask.shape)}"
        )
    else:
        mask = mask[:, None, :, :]
    return (1.0 - mask.to(dtype)) * torch.finfo(dtype).min


def check_inputs(config, device, packed_rows=False, **inputs):
    """Shapes, dtypes and devices of a forward's inputs, each error naming the argument; never their values
    (that would cost a device sync and break torch.compile's graph). `packed_rows`: rows may hold several
    sequences (the padding-invariant mode with position_ids), so the limit on positions applies to each sequence
    (ConvBertModel.sequence_layout checks it), not to the row."""

    def fail(name, expected, tensor, what="shape"):
        got = list(tensor.shape) if what == "shape" else getattr(tensor, what)
        raise ValueError(f"`{name}` must have {what} {expected}, got {got}")

    for name, t in inputs.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
        if t is not None and t.device != device:
            raise ValueError(f"`{name}` is on {t.device} but the model is on {device}")
    ids, embeds = inputs["input_ids"], inputs["inputs_embeds"]
    if ids is not None:
        if ids.dim() != 2:
            fail("input_ids", "[batch, seq_len]", ids)
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"`input_ids` must hold integer token ids, got {ids.dtype}")
        batch, seq_len = ids.shape
    else:
        if embeds.dim() != 3 or embeds.shape[-1] != config.embedding_size:
            fail("inputs_embeds", f"[batch, seq_len, {config.embedding_size}] (embedding_size)", embeds)
        if not embeds.is_floating_point():
            raise TypeError(f"`inputs_embeds` must have a floating-point dtype, got {embeds.dtype}")
        batch, seq_len = embeds.shape[:2]
    if seq_len > config.max_position_embeddings and not packed_rows:
        raise ValueError(
            f"sequence length {seq_len} exceeds max_position_embeddings = {config.max_position_embeddings}"
        )
    for name in ("token_type_ids", "position_ids"):  # [B, L], or one row for the whole batch
        t = inputs[name]
        if t is not None and tuple(t.shape) not in ((batch, seq_len), (1, seq_len), (seq_len,)):
            fail(name, f"[{batch}, {seq_len}] (or [1, {seq_len}])", t)
    mask = inputs["attention_mask"]
    if mask is not None and tuple(mask.shape) not in ((batch, seq_len), (batch, seq_len, seq_len)):
        fail("attention_mask", f"[{batch}, {seq_len}] (or [{batch}, {seq_len}, {seq_len}])", mask)
    encoder_states, encoder_mask = inputs["encoder_hidden_states"], inputs["encoder_attention_mask"]
    if encoder_states is not None:
        if (
            encoder_states.dim() != 3
            or encoder_states.shape[0] != batch
            or encoder_states.shape[2] != config.hidden_size
        ):
            fail("encoder_hidden_states", f"[{batch}, encoder_len, {config.hidden_size}]", encoder_states)
        if encoder_mask is not None and tuple(encoder_mask.shape) != tuple(encoder_states.shape[:2]):
            fail("encoder_attention_mask", list(encoder_states.shape[:2]), encoder_mask)


class ConvBertModel(ConvBertPreTrainedModel):
    """The bare ConvBERT encoder: [B, L] token ids -> [B, L, C] hidden states."""

    def __init__(self, config):
        super().__init__(config)
        self.embeddings = ConvBertEmbeddings(config)
        if config.embedding_size != config.hidden_size:
            self.embeddings_project = nn.Linear(config.embedding_size, config.hidden_size)
        self.encoder = ConvBertEncoder(config)
        self.config = config
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def per_layer_head_mask(self, head_mask, dtype):
        """[H] or [num_layers, H] of 1 (keep) / 0 (drop) -> one [1, H, 1, 1] multiplier (or None) per layer."""
        num_layers = self.config.num_hidden_layers
        if head_mask is None:
            return [None] * num_layers
        heads = self.encoder.layer[0].attention.self.num_attention_heads
        if head_mask.dim() == 1:
            head_mask = head_mask.expand(num_layers, -1)
        if head_mask.shape != (num_layers, heads):
            raise ValueError(
                f"head_mask must have shape [{heads}] or [{num_layers}, {heads}] (attention heads per layer), "
                f"got {list(head_mask.shape)}"
            )
        return list(head_mask.to(dtype)[:, None, :, None, None])

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        sequence_layout=sequences.UNREAD,
    ):
        """`sequence_layout`: what `self.sequence_layout(...)` gave for these inputs, None included (the heads read it
        first and pass it on, so that the padding-invariant mode reads the mask's values once)."""
        output_attentions, output_hidden_states, return_dict = _resolve_output_flags(
            self.config, output_attentions, output_hidden_states, return_dict
        )
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("You cannot specify both input_ids and inputs_embeds at the same time")
        if input_ids is None and inputs_embeds is None:
            raise ValueError("You have to specify either input_ids or inputs_embeds")
        invariant = sequences.is_padding_invariant(self.config)
        check_inputs(
            self.config,
            self.embeddings.word_embeddings.weight.device,
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            packed_rows=invariant and position_ids is not None,
        )
        if input_ids is not None:
            self.warn_if_padding_and_no_attention_mask(input_ids, attention_mask)
        input_shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:-1]
        batch, seq_len = input_shape
        device = input_ids.device if input_ids is not None else inputs_embeds.device
        plan = "transformers"  # padding as transformers treats it: the attention scores only
        if invariant:
            layout = sequence_layout
            if layout is sequences.UNREAD:
                layout = self.sequence_layout(input_ids, inputs_embeds, attention_mask, position_ids)
            if layout is not None:
                plan = layout.plan(
                    fused=ops.backend.fused_layers(),
                    needs_probabilities=bool(output_attentions) or head_mask is not None,
                    cross_attention=encoder_hidden_states is not None,
                )
            elif attention_mask is not None and torch.compiler.is_compiling():
                plan = "masked"  # traced: no values to read, so padded rows run in place
        if plan in ("packed", "unpad"):
            return self.packed_forward(
                layout, plan, input_ids, inputs_embeds, token_type_ids, position_ids, head_mask, output_attentions,
                output_hidden_states, return_dict,
            )  # fmt: skip
        token_mask = None
        if plan == "masked":  # positions counted inside each row's run of real tokens (left padding too)
            keep = attention_mask.ne(0).view(batch, seq_len)  # viewed so: traced, its sizes are the ids'
            token_mask = keep.unsqueeze(-1)  # [B, L, 1]
            if position_ids is None:
                position_ids = (keep.long().cumsum(1) - 1).clamp(min=0)
        # No mask given: the fused layers take none (SDPA's fastest kernels); the seed's math adds zeros.
        attention_mask_given = attention_mask is not None or not ops.backend.fused_layers()
        if attention_mask is None:
            attention_mask = torch.ones(input_shape, device=device)
        if token_type_ids is None:
            token_type_ids = self.embeddings.token_type_ids[:, :seq_len].expand(batch, seq_len)

        hidden_states = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)  # [B, L, E]
        if hasattr(self, "embeddings_project"):
            hidden_states = self.embeddings_project(hidden_states)  # [B, L, C]
        dtype = hidden_states.dtype
        encoder_mask = None
        if encoder_hidden_states is not None and encoder_attention_mask is not None:
            encoder_mask = extended_attention_mask(encoder_attention_mask, dtype)
        outputs = self.encoder(
            hidden_states,
            attention_mask=extended_attention_mask(attention_mask, dtype) if attention_mask_given else None,
            head_mask=self.per_layer_head_mask(head_mask, dtype),
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
            sequences=None if token_mask is None else sequences.MaskedConvs(token_mask),
        )
        if token_mask is None:
            return outputs
        # the padding's outputs zeroed, as the unpadded path leaves them: the same tensors whichever path ran
        return _map_hidden_states(outputs, return_dict, output_hidden_states, lambda h: h * token_mask.to(h.dtype))

    def sequence_layout(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None):
        """Where the sequences of this batch lie in the padding-invariant mode (convbert_fast.sequences.Layout):
        None when the mode is off, the rows are full, or under tracing without position_ids (padded rows then run
        in place, which needs no host values)."""
        if not sequences.is_padding_invariant(self.config):
            return None
        if position_ids is None and torch.compiler.is_compiling():
            return None
        batch, seq_len = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        layout = sequences.Layout.of(batch, seq_len, attention_mask, position_ids)
        longest = max(layout.lengths) if layout is not None else seq_len
        if longest > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {longest} exceeds max_position_embeddings = {self.config.max_position_embeddings}"
            )
        return layout

    def packed_forward(
        self, layout, plan, input_ids, inputs_embeds, token_type_ids, position_ids, head_mask, output_attentions,
        output_hidden_states, return_dict,
    ):  # fmt: skip
        """Every layer on the T real tokens as one packed row [1, T, C] (plan "unpad": gathered from padded rows;
        "packed": rows that are packed already); the hidden states scattered back to [B, L, C], zeros at the
        padding. Attentions, when asked for, are the packed row's [1, H, T, T] (zero across sequences)."""
        batch, seq_len = layout.batch, layout.seq_len
        device = self.embeddings.word_embeddings.weight.device
        index = layout.token_index(device) if plan == "unpad" else None  # [T]; packed rows: all tokens

        def pack(t):  # [B, L, ...] (or one row for the batch) -> [1, T, ...]
            if t is None:
                return None
            flat = t.expand(batch, seq_len, *t.shape[2:]).reshape(batch * seq_len, *t.shape[2:])
            return (flat if index is None else flat.index_select(0, index))[None]

        def unpack(h):  # [1, T, C] -> [B, L, C]
            if index is None:
                return h.view(batch, seq_len, -1)
            return h.new_zeros(batch * seq_len, h.shape[-1]).index_copy(0, index, h[0]).view(batch, seq_len, -1)

        if position_ids is None:
            position_ids = layout.positions(device)
        if token_type_ids is None:
            token_type_ids = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
        hidden_states = self.embeddings(
            pack(input_ids), pack(token_type_ids.reshape(-1, seq_len)), pack(position_ids.reshape(-1, seq_len)),
            pack(inputs_embeds),
        )  # [1, T, E]  # fmt: skip
        if hasattr(self, "embeddings_project"):
            hidden_states = self.embeddings_project(hidden_states)  # [1, T, C]
        outputs = self.encoder(
            hidden_states,
            head_mask=self.per_layer_head_mask(head_mask, hidden_states.dtype),
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
            sequences=sequences.PackedSequences(layout.lengths, device),
        )
        return _map_hidden_states(outputs, return_dict, output_hidden_states, unpack)


def _map_hidden_states(outputs, return_dict, output_hidden_states, fn):
    """The encoder's outputs with `fn` applied to the last hidden state and each of all_hidden_states."""
    if return_dict:
        outputs.last_hidden_state = fn(outputs.last_hidden_state)
        if output_hidden_states:
            outputs.hidden_states = tuple(fn(h) for h in outputs.hidden_states)
        return outputs
    last, *rest = outputs
    if output_hidden_states:  # the tuple's second entry (ConvBertEncoder.forward)
        rest[0] = tuple(fn(h) for h in rest[0])
    return (fn(last), *rest)


class ConvBertGeneratorPredictions(nn.Module):
    """Dense C -> E, GELU, LayerNorm: the MLM head before the tied vocabulary projection."""

    def __init__(self, config):
        super().__init__()
        self.activation = get_activation("gelu")
        self.LayerNorm = nn.LayerNorm(config.embedding_size, eps=config.layer_norm_eps)
        self.dense = nn.Linear(config.hidden_size, config.embedding_size)

    def forward(self, generator_hidden_states):
        return self.LayerNorm(self.activation(self.dense(generator_hidden_states)))


def _with_loss(loss, outputs):
    return ((loss,) + outputs) if loss is not None else outputs


class ConvBertForMaskedLM(ConvBertPreTrainedModel):
    _tied_weights_keys = {"generator_lm_head.weight": "convbert.embeddings.word_embeddings.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.convbert = ConvBertModel(config)
        self.generator_predictions = ConvBertGeneratorPredictions(config)
        self.generator_lm_head = nn.Linear(config.embedding_size, config.vocab_size)
        self.post_init()

    def get_output_embeddings(self):
        return self.generator_lm_head

    def set_output_embeddings(self, word_embeddings):
        self.generator_lm_head = word_embeddings

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ):
        """labels [B, L]: token ids to predict, -100 where no loss is taken."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.convbert(
            input_ids, attention_mask, token_type_ids, position_ids, head_mask, inputs_embeds,
            output_attentions, output_hidden_states, return_dict,
        )  # fmt: skip
        logits = self.generator_lm_head(self.generator_predictions(outputs[0]))  # [B, L, vocab]
        loss = None
        if labels is not None:
            loss = CrossEntropyLoss()(logits.view(-1, self.config.vocab_size), labels.view(-1))
        if not return_dict:
            return _with_loss(loss, (logits,) + outputs[1:])
        return MaskedLMOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class ConvBertClassificationHead(nn.Module):
    """Dropout, dense, activation, dropout, projection on the first token: [B, L, C] -> [B, num_labels]."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)
        self.config = config

    def forward(self, hidden_states):
        x = self.dropout(hidden_states[:, 0, :])  # the [CLS] token
        x = self.dropout(ACT2FN[self.config.hidden_act](self.dense(x)))
        return self.out_proj(x)


class ConvBertForSequenceClassification(ConvBertPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.config = config
        self.convbert = ConvBertModel(config)
        self.classifier = ConvBertClassificationHead(config)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ):
        """labels [B]: class ids (regression when num_labels == 1; float multi-hot for multi-label)."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        layout = self.convbert.sequence_layout(input_ids, inputs_embeds, attention_mask, position_ids)
        outputs = self.convbert(
            input_ids, attention_mask, token_type_ids, position_ids, head_mask, inputs_embeds,
            output_attentions, output_hidden_states, return_dict, sequence_layout=layout,
        )  # fmt: skip
        # [B, num_labels]; packed rows (padding-invariant mode): [N sequences, num_labels]
        logits = self.classifier(sequences.first_tokens(outputs[0], attention_mask, layout, self.config))
        loss = None
        if labels is not None:
            if self.config.problem_type is None:
                if self.num_labels == 1:
                    self.config.problem_type = "regression"
                elif self.num_labels > 1 and labels.dtype in (torch.long, torch.int):
                    self.config.problem_type = "single_label_classification"
                else:
                    self.config.problem_type = "multi_label_classification"
            if self.config.problem_type == "regression":
                if self.num_labels == 1:
                    loss = MSELoss()(logits.squeeze(), labels.squeeze())
                else:
                    loss = MSELoss()(logits, labels)
            elif self.config.problem_type == "single_label_classification":
                loss = CrossEntropyLoss()(logits.view(-1, self.num_labels), labels.view(-1))
            elif self.config.problem_type == "multi_label_classification":
                loss = BCEWithLogitsLoss()(logits, labels)
        if not return_dict:
            return _with_loss(loss, (logits,) + outputs[1:])
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class ConvBertSequenceSummary(nn.Module):
    """One vector per sequence, as transformers' SequenceSummary: `config.summary_type` ("last" by default,
    since ConvBertConfig does not set it), then an optional projection, activation and dropouts."""

    def __init__(self, config):
        super().__init__()
        self.summary_type = getattr(config, "summary_type", "last")
        if self.summary_type not in ("last", "first", "mean", "cls_index"):
            raise ValueError(f"summary_type must be 'last', 'first', 'mean' or 'cls_index', got {self.summary_type!r}")
        self.summary = nn.Identity()
        if getattr(config, "summary_use_proj", False):
            to_labels = getattr(config, "summary_proj_to_labels", False) and config.num_labels > 0
            self.summary = nn.Linear(config.hidden_size, config.num_labels if to_labels else config.hidden_size)
        activation = getattr(config, "summary_activation", None)
        self.activation = get_activation(activation) if activation else nn.Identity()
        first, last = getattr(config, "summary_first_dropout", 0), getattr(config, "summary_last_dropout", 0)
        self.first_dropout = nn.Dropout(first) if first > 0 else nn.Identity()
        self.last_dropout = nn.Dropout(last) if last > 0 else nn.Identity()

    def forward(self, hidden_states, cls_index=None, token_mask=None):  # [N, L, C] -> [N, C]
        """`token_mask` [N, L] (the padding-invariant mode): True at real tokens, which alone are summarised."""
        if token_mask is not None and self.summary_type in ("last", "first"):
            reversed_ = self.summary_type == "last"
            mask = token_mask.flip(1) if reversed_ else token_mask
            index = mask.int().argmax(1)
            index = hidden_states.shape[1] - 1 - index if reversed_ else index
            output = hidden_states.gather(1, index[:, None, None].expand(-1, 1, hidden_states.shape[-1]))[:, 0]
        elif self.summary_type == "last":
            output = hidden_states[:, -1]
        elif self.summary_type == "first":
            output = hidden_states[:, 0]
        elif self.summary_type == "mean" and token_mask is not None:
            weights = token_mask.to(hidden_states.dtype)[..., None]
            output = (hidden_states * weights).sum(1) / weights.sum(1).clamp(min=1)
        elif self.summary_type == "mean":
            output = hidden_states.mean(dim=1)
        else:  # cls_index: the given token, the last one by default
            if cls_index is None:
                cls_index = torch.full_like(hidden_states[..., :1, :], hidden_states.shape[-2] - 1, dtype=torch.long)
            else:
                cls_index = cls_index[..., None, None].expand(*cls_index.shape, 1, hidden_states.size(-1))
            output = hidden_states.gather(-2, cls_index).squeeze(-2)
        return self.last_dropout(self.activation(self.summary(self.first_dropout(output))))


class ConvBertForMultipleChoice(ConvBertPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.convbert = ConvBertModel(config)
        self.sequence_summary = ConvBertSequenceSummary(config)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ):
        """Inputs [B, num_choices, L](, E); labels [B]: the index of the right choice."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        batch, num_choices = (input_ids if input_ids is not None else inputs_embeds).shape[:2]

        def flatten(t, trailing):  # [B, num_choices, L, ...] -> [B * num_choices, L, ...]
            return None if t is None else t.reshape(-1, *t.shape[-trailing:])

        input_ids, inputs_embeds = flatten(input_ids, 1), flatten(inputs_embeds, 2)
        attention_mask, position_ids = flatten(attention_mask, 1), flatten(position_ids, 1)
        layout = self.convbert.sequence_layout(input_ids, inputs_embeds, attention_mask, position_ids)
        if layout is not None and layout.packed:
            raise ValueError("ConvBertForMultipleChoice takes one choice per row: its rows cannot be packed")
        outputs = self.convbert(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=flatten(token_type_ids, 1),
            position_ids=position_ids,
            head_mask=head_mask,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
            sequence_layout=layout,
        )
        # the padding-invariant mode summarises each choice's own tokens ("last": its last real token)
        invariant = sequences.is_padding_invariant(self.config) and attention_mask is not None
        summary = self.sequence_summary(outputs[0], token_mask=attention_mask.ne(0) if invariant else None)
        logits = self.classifier(summary).view(batch, num_choices)  # [B, num_choices]
        loss = CrossEntropyLoss()(logits, labels) if labels is not None else None
        if not return_dict:
            return _with_loss(loss, (logits,) + outputs[1:])
        return MultipleChoiceModelOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class ConvBertForTokenClassification(ConvBertPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.convbert = ConvBertModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ):
        """labels [B, L]: a class per token, -100 where no loss is taken."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.convbert(
            input_ids, attention_mask, token_type_ids, position_ids, head_mask, inputs_embeds,
            output_attentions, output_hidden_states, return_dict,
        )  # fmt: skip
        logits = self.classifier(self.dropout(outputs[0]))  # [B, L, num_labels]
        loss = None
        if labels is not None:
            loss = CrossEntropyLoss()(logits.view(-1, self.num_labels), labels.view(-1))
        if not return_dict:
            return _with_loss(loss, (logits,) + outputs[1:])
        return TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class ConvBertForQuestionAnswering(ConvBertPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.convbert = ConvBertModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        start_positions=None,
        end_positions=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ):
        """start_positions, end_positions [B]: the answer span; positions past the sequence are ignored."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        layout = self.convbert.sequence_layout(input_ids, inputs_embeds, attention_mask, position_ids)
        if layout is not None and layout.packed and (start_positions is not None or end_positions is not None):
            raise ValueError(
                "ConvBertForQuestionAnswering: answer positions index rows, but these rows are packed (position_ids "
                "restarting at 0): pad the sequences instead"
            )
        outputs = self.convbert(
            input_ids, attention_mask, token_type_ids, position_ids, head_mask, inputs_embeds,
            output_attentions, output_hidden_states, return_dict, sequence_layout=layout,
        )  # fmt: skip
        start_logits, end_logits = self.qa_outputs(outputs[0]).split(1, dim=-1)  # [B, L, 1] each
        start_logits = start_logits.squeeze(-1).contiguous()
        end_logits = end_logits.squeeze(-1).contiguous()
        if sequences.is_padding_invariant(self.config) and attention_mask is not None and attention_mask.dim() == 2:
            # no answer in the padding: its logits drop out of the softmax, as if the sequence ran alone
            padding = attention_mask == 0
            start_logits = start_logits.masked_fill(padding, torch.finfo(start_logits.dtype).min)
            end_logits = end_logits.masked_fill(padding, torch.finfo(end_logits.dtype).min)
        total_loss = None
        if start_positions is not None and end_positions is not None:
            if start_positions.dim() > 1:  # multi-GPU gathers add a dimension
                start_positions = start_positions.squeeze(-1)
            if end_positions.dim() > 1:
                end_positions = end_positions.squeeze(-1)
            ignored_index = start_logits.size(1)
            loss_fct = CrossEntropyLoss(ignore_index=ignored_index)
            start_loss = loss_fct(start_logits, start_positions.clamp(0, ignored_index))
            end_loss = loss_fct(end_logits, end_positions.clamp(0, ignored_index))
            total_loss = (start_loss + end_loss) / 2
        if not return_dict:
            return _with_loss(total_loss, (start_logits, end_logits) + outputs[1:])
        return QuestionAnsweringModelOutput(
            loss=total_loss,
            start_logits=start_logits,
            end_logits=end_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
