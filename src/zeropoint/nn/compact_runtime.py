"""The compact runtime for decoder-only causal LMs (Llama, Mistral, Qwen2/2.5, Qwen3, Gemma 2,
Gemma 3, Phi-3): the model's own weights and kernels, without transformers' module tree per
token, over a preallocated KV cache.

At batch 1 a quantized SmolLM2-135M spent about as long in transformers' per-layer Python
(module calls, the cache object, masks, rotary embedding) as in its 121 matmuls. This decoder
reads the model once: per layer its norms' weights and the projections' kernels (a q/k/v or
gate/up group fused by fuse.py, or Phi-3's own qkv_proj and gate_up_proj, is one call), and it
precomputes rotary cos/sin with the model's own rotary module for every position it will decode,
so rope_theta and rope scaling (Llama 3's, linear, longrope, Gemma 3's local and global bases)
come from the model. What differs between families is data (compact_config.DecoderConfig, read
from the HF config): norm weight offset, embedding scale, activation, per-head q/k norms,
norms on the block outputs, attention scale, soft-capping, sliding windows. Two paths share one
preallocated KV cache of keys and values (2 * layers * kv_heads * head_dim floats a position):

- `forward`: any batch, any number of new tokens (the prompt's prefill), any dtype; plain torch
  calls on the model's kernels, attention by scaled_dot_product_attention (or, with soft-capping,
  its eager formula) under a causal and sliding-window mask.
- the one-row step (batch 1, float32, where the C kernels build): each call writes into buffers
  allocated once, a C gemv kernel (gemv.py) is called on their raw pointers, and the small ops
  are C calls (csrc/token_ops.c): per layer the matmuls and four to six C calls, on one torch
  thread (a matmul that torch runs, for float weights, gets the caller's threads): the OpenMP
  fork and join of torch's small ops cost more than their arithmetic at this size.

The arithmetic is the model's: the same kernels on the same inputs, norms and rotary in
transformers' order of operations; only summation orders (attention, the norm's sum of squares)
and libm's tanh/exp differ, at float32 rounding (tests/nn/test_compact_families.py holds both
paths to the HF logits for every family).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ckernels
from ..threads import torch_threads
from .compact_config import SUPPORTED_MODEL_TYPES, DecoderConfig
from .fuse import FusedSlice
from .gemv import GemvKernel
from .qlinear import QLinear

ACCEPTED_MODEL_TYPES = SUPPORTED_MODEL_TYPES


def supports(model) -> bool:
    """True when the compact decoder accepts `model` (its family, activation and rope)."""
    try:
        DecoderConfig.from_model(model)
    except ValueError:
        return False
    return True


def _fused_group(modules):
    """fuse.py's group when `modules` are its members, all of them, in order; else None."""
    kernels = [getattr(m, "kernel", None) for m in modules]
    if not all(isinstance(k, FusedSlice) for k in kernels):
        return None
    group = kernels[0].group
    if len(group.bounds) != len(modules) or any(
            k.group is not group or k.index != i for i, k in enumerate(kernels)):
        return None
    return group


def _linear(module):
    """f(x) -> module(x), calling the kernel or F.linear directly where the module allows."""
    if isinstance(module, QLinear) and not isinstance(module.kernel, FusedSlice):
        kernel, bias = module.kernel, module.bias
        return lambda x: kernel.linear(x, bias)
    if type(module) is nn.Linear:
        weight, bias = module.weight, module.bias
        return lambda x: F.linear(x, weight, bias)
    return module  # a fused member outside its group's order, or another layer: its forward


def _stacked(modules):
    """f(x) -> the modules' outputs concatenated on the last dim, in one call when fused."""
    group = _fused_group(modules)
    if group is not None:
        kernel, bias = group.kernel, group.bias
        return lambda x: kernel.linear(x, bias)
    fns = [_linear(m) for m in modules]
    return lambda x: torch.cat([f(x) for f in fns], dim=-1)


def _threaded(call, threads):
    """`call` on `threads` torch threads, from and back to the one thread of a step."""
    set_threads = torch.set_num_threads
    return lambda: (set_threads(threads), call(), set_threads(1))


def _kernel_into(kernel, bias, x, y):
    """(call, is_gemv): a call that writes kernel.linear(x, bias) into buffer y (x and y are
    fixed buffers), and whether it is a C gemv call that uses no torch thread."""
    if isinstance(kernel, GemvKernel) and x.dtype == torch.float32:
        # GemvKernel.linear checks its input and allocates the output on every call; with
        # buffers that never move, the checks hold once and for all, and the C call is all.
        run, xp, yp = kernel.run_pointers, x.data_ptr(), y.data_ptr()
        if bias is None:
            return (lambda: run(xp, yp)), True
        return (lambda: (run(xp, yp), y.add_(bias))), True
    return (lambda: y.copy_(kernel.linear(x, bias))), False


def _into(modules, x, y):
    """(call, is_gemv): a call that writes the modules' outputs on buffer x, concatenated, into
    buffer y, and whether all of it is C gemv calls."""
    group = _fused_group(modules)
    if group is not None:
        return _kernel_into(group.kernel, group.bias, x, y)
    calls, all_gemv, start = [], True, 0
    for m in modules:
        part = y.narrow(-1, start, m.out_features)
        start += m.out_features
        if isinstance(m, QLinear) and not isinstance(m.kernel, FusedSlice):
            call, gemv = _kernel_into(m.kernel, m.bias, x, part)
        elif type(m) is nn.Linear:
            x2, y2, w_t, b = x.view(1, -1), part.view(1, -1), m.weight.t(), m.bias
            call, gemv = ((lambda x2=x2, y2=y2, w_t=w_t: torch.mm(x2, w_t, out=y2)) if b is None
                          else (lambda x2=x2, y2=y2, w_t=w_t, b=b: torch.addmm(b, x2, w_t, out=y2))
                          ), False
        else:
            call, gemv = (lambda m=m, part=part: part.copy_(m(x))), False
        calls.append(call)
        all_gemv &= gemv
    if len(calls) == 1:
        return calls[0], all_gemv
    return (lambda: [call() for call in calls]), all_gemv


def _rms_norm(x, weight, eps, cast_last):
    """transformers' RMSNorm, op for op: in float32, then times the weight and cast back (Gemma:
    cast_last, the weight already 1 + w in float32) or cast back, then times it (the others)."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight).to(x.dtype) if cast_last else weight * normed.to(x.dtype)


def _rotate(x, cos, sin_signed):
    """x * cos + rotate_half(x) * sin on the first cos.shape[-1] values of each head (Phi-3's
    partial rotary leaves the rest); x (b, t, heads, d), cos and sin_signed (t, 1, rot)."""
    rot = cos.shape[-1]
    half = rot // 2
    xr = x[..., :rot]
    swapped = torch.cat([xr[..., half:], xr[..., :half]], dim=-1)  # (x2, x1); sin signs (-, +)
    out = xr * cos + swapped * sin_signed
    return out if rot == x.shape[-1] else torch.cat([out, x[..., rot:]], dim=-1)


def _attend(q, k, v, mask, scale, softcap):
    """Attention of q (b, t, heads, d) over k, v (b, end, kv heads, d) under mask (t, end) (True:
    attend, None: all) -> (b, t, heads, d)."""
    q, k, v = (y.transpose(1, 2) for y in (q, k, v))  # (b, heads, ., d)
    if softcap is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                             enable_gqa=True)
        return out.transpose(1, 2)
    # Soft-capping sits between the scores and the softmax, where SDPA has no hook: the eager
    # formula of transformers' Gemma 2 attention.
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    w = torch.matmul(q, k.transpose(2, 3)) * scale  # (b, heads, t, end)
    w = torch.tanh(w / softcap) * softcap
    if mask is not None:
        w = w.masked_fill(~mask, float("-inf"))
    w = w.softmax(-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(w, v).transpose(1, 2)


class _Layer:
    """One decoder layer's weights and kernels, as the decoder reads them."""

    def __init__(self, layer, cfg: DecoderConfig, index: int, norm_weight):
        traits, a, m = cfg.traits, layer.self_attn, layer.mlp
        self.attn_norm = norm_weight(layer.input_layernorm)
        if traits.sandwich_norms:  # Gemma: post_attention_layernorm is on the attention output
            self.attn_out_norm = norm_weight(layer.post_attention_layernorm)
            self.mlp_norm = norm_weight(layer.pre_feedforward_layernorm)
            self.mlp_out_norm = norm_weight(layer.post_feedforward_layernorm)
        else:
            self.attn_out_norm = self.mlp_out_norm = None
            self.mlp_norm = norm_weight(layer.post_attention_layernorm)
        self.q_norm = norm_weight(a.q_norm) if traits.qk_norm else None
        self.k_norm = norm_weight(a.k_norm) if traits.qk_norm else None
        if traits.fused_projections:
            self.qkv_modules, self.gate_up_modules = [a.qkv_proj], [m.gate_up_proj]
        else:
            self.qkv_modules = [a.q_proj, a.k_proj, a.v_proj]
            self.gate_up_modules = [m.gate_proj, m.up_proj]
        self.o_proj, self.down_proj = a.o_proj, m.down_proj
        self.intermediate = sum(mod.out_features for mod in self.gate_up_modules) // 2
        self.qkv, self.o = _stacked(self.qkv_modules), _linear(a.o_proj)
        self.gate_up, self.down = _stacked(self.gate_up_modules), _linear(m.down_proj)
        self.window, self.rope = cfg.windows[index], cfg.rope_keys[index]


class CompactDecoder:
    """Greedy generation by a decoder-only LM of a known family through its own weights and
    kernels.

    Built from the model, it keeps references, not copies: a model quantized or edited afterwards
    needs a new decoder. `start(batch, max_len)` allocates the KV cache, `forward` runs token ids
    at the next positions, `greedy` does a whole decode. fast=False keeps batch-1 steps on the
    general path (the tests compare the two). A model of another family: ValueError naming it
    and the families accepted."""

    def __init__(self, model, fast: bool = True):
        cfg = DecoderConfig.from_model(model)
        inner = model.model
        self.model, self.config, self.fast = model, cfg, fast
        self.n_heads, self.n_kv, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.hidden = cfg.hidden
        self.dtype = inner.norm.weight.dtype
        self.cast_last = cfg.traits.norm_offset != 0.0
        offset = cfg.traits.norm_offset
        # Gemma's 1 + weight in float32, as its RMSNorm computes it; the others' weight itself.
        norm_weight = (lambda n: n.weight.float() + offset) if offset else (lambda n: n.weight)
        self.layers = [_Layer(layer, cfg, i, norm_weight)
                       for i, layer in enumerate(inner.layers[:cfg.layers])]
        self.final_norm = norm_weight(inner.norm)
        embed = inner.embed_tokens
        if isinstance(embed, nn.Embedding):  # Gemma's scaled embedding too: the scale is ours
            table = embed.weight
            self.embed = lambda ids: F.embedding(ids, table)
        else:  # a QEmbedding: its unscaled rows, as the scale is ours
            self.embed = embed.lookup
        self.embed_scale = (None if cfg.embed_scale is None
                            else torch.tensor(cfg.embed_scale).to(self.dtype))
        self.act = F.silu if cfg.activation == "silu" else (
            lambda g: F.gelu(g, approximate="tanh"))
        self.lm_head = _linear(model.lm_head)
        self.batch = self.max_len = 0

    # --- cache and rotary tables ---------------------------------------------------------------

    @torch.inference_mode()
    def start(self, batch: int, max_len: int) -> None:
        """Empty the cache and make room for `max_len` positions of `batch` sequences."""
        cfg = self.config
        # Keys and values only: (layers, k or v, batch, positions, kv heads, head_dim).
        self.kv_cache = torch.empty(cfg.layers, 2, batch, max_len, self.n_kv, self.head_dim,
                                    dtype=self.dtype)
        self.tables = {key: self._rope_tables(key, max_len) for key in set(cfg.rope_keys)}
        self.batch, self.max_len, self.pos = batch, max_len, 0
        self._steps = None
        if (self.fast and batch == 1 and self.dtype == torch.float32
                and ckernels.library() is not None):
            self._prepare_steps()

    def _rotary(self, key, n):
        """The model's own rotary module at positions 0..n-1: (cos, sin_signed), (n, rot) each,
        sin_signed = (-sin[:rot/2], sin[rot/2:]) so that rotate_half(x) * sin is
        swap_halves(x) * sin_signed."""
        positions = torch.arange(n).unsqueeze(0)
        args = (torch.empty(0, dtype=self.dtype), positions) + (() if key is None else (key,))
        cos, sin = self.model.model.rotary_emb(*args)
        half = cos.shape[-1] // 2
        return cos[0], torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)

    def _rope_tables(self, key, max_len):
        """(short, long, switch): the tables at every position, and for longrope the tables of
        a block that ends past `switch` positions (long is None otherwise)."""
        switch = dict(self.config.longrope).get(key, "none")
        if switch == "none":
            return self._rotary(key, max_len), None, None
        # The module picks its factors by the last position it is given: up to `switch`
        # positions the short ones, any further the long ones, for every position of the call.
        short = self._rotary(key, min(max_len, switch))
        long = self._rotary(key, max(max_len, switch + 1)) if max_len > switch else None
        return short, long, switch

    def _block_rope(self, key, pos, end):
        """(cos, sin_signed) of positions pos..end-1 run as one block: (t, 1, rot) each."""
        short, long, switch = self.tables[key]
        cos, sin = long if switch is not None and end > switch else short
        return cos[pos:end].unsqueeze(1), sin[pos:end].unsqueeze(1)

    def _step_rope(self, key):
        """(cos, sin_signed) of each position run alone: (max_len, rot), contiguous."""
        short, long, switch = self.tables[key]
        if long is None:
            return short
        # A one-row step at position p ends at p + 1: long factors from position `switch` on.
        return tuple(torch.cat([s[:switch], lg[switch:self.max_len]]).contiguous()
                     for s, lg in zip(short, long))

    # --- the general path ----------------------------------------------------------------------

    def _norm(self, x, weight):
        return _rms_norm(x, weight, self.config.rms_eps, self.cast_last)

    def _embed(self, ids):
        h = self.embed(ids)  # (b, t, hidden)
        return h * self.embed_scale if self.embed_scale is not None else h

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Logits (batch, 1, vocab) of the last of `ids` (batch, t), run at the next t positions
        of the cache; (batch, t, vocab) with all_logits."""
        b, t = ids.shape
        pos, end = self.pos, self.pos + t
        if b != self.batch or end > self.max_len:
            raise ValueError(f"the cache holds {self.batch} sequences of {self.max_len} positions; "
                             f"got {b} sequences at positions {pos}..{end - 1}")
        if t == 1 and self._steps is not None:
            return self._step(ids).clone()
        cfg = self.config
        n_heads, n_kv, d = self.n_heads, self.n_kv, self.head_dim
        rows, cols = torch.arange(pos, end).unsqueeze(1), torch.arange(end)  # (t, 1), (end,)
        causal = cols <= rows  # (t, end)
        masks = {w: None if t == 1 and (w is None or w >= end) else
                 causal if w is None else causal & (cols > rows - w)
                 for w in set(cfg.windows)}
        h = self._embed(ids)
        for layer, (k_cache, v_cache) in zip(self.layers, self.kv_cache):
            x = self._norm(h, layer.attn_norm)
            qkv = layer.qkv(x).view(b, t, n_heads + 2 * n_kv, d)
            q, k, v = qkv.split([n_heads, n_kv, n_kv], dim=2)
            if layer.q_norm is not None:
                q, k = self._norm(q, layer.q_norm), self._norm(k, layer.k_norm)
            cos, sin = self._block_rope(layer.rope, pos, end)
            k_cache[:, pos:end] = _rotate(k, cos, sin)
            v_cache[:, pos:end] = v
            a = _attend(_rotate(q, cos, sin), k_cache[:, :end], v_cache[:, :end],
                        masks[layer.window], cfg.attention_scale, cfg.attn_softcap)
            o = layer.o(a.reshape(b, t, n_heads * d))
            if layer.attn_out_norm is not None:
                o = self._norm(o, layer.attn_out_norm)
            h = h + o
            g, u = layer.gate_up(self._norm(h, layer.mlp_norm)).chunk(2, dim=-1)  # (b, t, inter)
            y = layer.down(self.act(g) * u)
            if layer.mlp_out_norm is not None:
                y = self._norm(y, layer.mlp_out_norm)
            h = h + y
        self.pos = end
        if not all_logits:
            h = h[:, -1:]
        logits = self.lm_head(self._norm(h, self.final_norm))
        cap = cfg.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    # --- the one-row step ----------------------------------------------------------------------

    def _prepare_steps(self) -> None:
        """Buffers for one-row steps and, per layer, the calls that fill them."""
        cfg, d, n_heads, n_kv = self.config, self.head_dim, self.n_heads, self.n_kv
        lib = ckernels.library()
        buf = lambda n: torch.empty(1, 1, n)  # noqa: E731
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        self.h, self.x = buf(self.hidden), buf(self.hidden)
        self.qkv, self.attn = buf((n_heads + 2 * n_kv) * d), buf(n_heads * d)
        o_out, d_out = buf(self.hidden), buf(self.hidden)
        inter = self.layers[0].intermediate
        gu, self.logits = buf(2 * inter), buf(self.model.lm_head.out_features)
        g, u = gu.narrow(-1, 0, inter), gu.narrow(-1, inter, inter)
        self.scores = torch.empty(self.max_len)  # attention weights of one head
        self.threads = torch.get_num_threads()
        step_tables = {key: self._step_rope(key) for key in self.tables}
        # Every buffer the pointers below point into: the calls hold raw addresses only.
        self._keep = (step_tables, o_out, d_out, gu)

        def into(modules, x, y):
            call, is_gemv = _into(modules, x, y)
            return call if is_gemv else _threaded(call, self.threads)

        self._steps = []
        for layer, kv in zip(self.layers, self.kv_cache[:, :, 0]):  # kv: (2, max_len, kv, d)
            cos, sin = step_tables[layer.rope]
            self._steps.append((
                ptr(layer.attn_norm), into(layer.qkv_modules, self.x, self.qkv),
                ptr(kv[0]), ptr(kv[1]), cos.shape[-1], cos, sin,
                ptr(layer.q_norm), ptr(layer.k_norm), layer.window or 0,
                into([layer.o_proj], self.attn, o_out), ptr(layer.attn_out_norm),
                ptr(layer.mlp_norm), into(layer.gate_up_modules, self.x, gu),
                into([layer.down_proj], g, d_out), ptr(layer.mlp_out_norm)))
        self._head = into([self.model.lm_head], self.x, self.logits)
        self._c = (lib, ptr(self.h), ptr(self.x), ptr(self.qkv), ptr(self.attn), ptr(o_out),
                   ptr(d_out), ptr(g), ptr(u), inter, ptr(self.scores),
                   lib.zp_silu_mul if cfg.activation == "silu" else lib.zp_gelu_tanh_mul)

    def _step(self, token: torch.Tensor) -> torch.Tensor:
        """Logits (1, 1, vocab) of one token (1, 1) at the next position, in a buffer that the
        next step overwrites."""
        # One torch thread but for the matmuls that torch runs (float weights): the other ops
        # are too small to share, and their OpenMP fork and join (a few us each, far more when
        # another process holds the second core) costs more than it saves.
        with torch_threads(1):
            return self._c_step(token)

    def _c_step(self, token: torch.Tensor) -> torch.Tensor:
        cfg, pos = self.config, self.pos
        lib, h, x, qkv, attn, o_out, d_out, g, u, inter, scores, gate = self._c
        norm, attend = lib.zp_add_rmsnorm, lib.zp_decoder_attend
        n, eps, n_heads, n_kv, d = self.hidden, cfg.rms_eps, self.n_heads, self.n_kv, self.head_dim
        scale, softcap = cfg.attention_scale, cfg.attn_softcap or 0.0
        self.h.copy_(self.embed(token))
        if self.embed_scale is not None:
            self.h.mul_(self.embed_scale)
        delta = None  # the residual the next norm adds first: the previous layer's MLP output
        for (w_attn, project_qkv, k_cache, v_cache, rot, cos, sin, q_norm, k_norm, window,
             project_o, w_attn_out, w_mlp, gate_up, down, w_mlp_out) in self._steps:
            norm(h, delta, w_attn, eps, n, x)
            project_qkv()
            attend(qkv, k_cache, v_cache, pos, n_heads, n_kv, d, rot, cos[pos].data_ptr(),
                   sin[pos].data_ptr(), q_norm, k_norm, eps, scale, softcap, window, scores,
                   attn)
            project_o()
            if w_attn_out is not None:  # Gemma: the attention output normalized, in place
                norm(o_out, None, w_attn_out, eps, n, o_out)
            norm(h, o_out, w_mlp, eps, n, x)
            gate_up()
            gate(g, u, inter)
            down()
            if w_mlp_out is not None:
                norm(d_out, None, w_mlp_out, eps, n, d_out)
            delta = d_out
        norm(h, delta, self.final_norm.data_ptr(), eps, n, x)
        self._head()
        if cfg.final_softcap is not None:
            self.logits.div_(cfg.final_softcap).tanh_().mul_(cfg.final_softcap)
        self.pos = pos + 1
        return self.logits

    @torch.inference_mode()
    def greedy(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """(batch, prompt + max_new_tokens): the prompt, then each token the argmax of the last
        logits, never stopping early."""
        b, p = input_ids.shape
        out = torch.empty(b, p + max_new_tokens, dtype=torch.long)
        out[:, :p] = input_ids
        self.start(b, p + max_new_tokens - 1)  # the last token is chosen, never run
        logits = self.forward(input_ids)
        step = self._step if self._steps is not None else self.forward
        for i in range(p, p + max_new_tokens - 1):
            token = out[:, i:i + 1]
            torch.argmax(logits, dim=-1, out=token)  # (b, 1, vocab) -> (b, 1)
            logits = step(token)
        torch.argmax(logits, dim=-1, out=out[:, -1:])
        return out


# The name the rest of zeropoint (generate.py, the benchmarks) knew it by, from Llama days.
CompactLlama = CompactDecoder
