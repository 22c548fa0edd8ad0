"""The compact runtime for Llama-family causal LMs: the model's own weights and kernels,
without transformers' module tree per token, over a preallocated KV cache.

At batch 1 a quantized SmolLM2-135M spent about as long in transformers' per-layer Python
(module calls, the cache object, masks, rotary embedding) as in its 121 matmuls. This decoder
reads the model once: per layer the RMSNorm weights and the projections' kernels (a q/k/v or
gate/up group fused by fuse.py is one call on its stacked kernel), and it precomputes rotary
cos/sin with the model's own rotary module for every position it will decode, so rope_theta and
rope scaling come from the model. Two paths share one preallocated KV cache:

- `forward`: any batch, any number of new tokens (the prompt's prefill), any dtype; plain torch
  calls on the model's kernels, causal attention by scaled_dot_product_attention.
- the one-row step (batch 1, float32): each call writes into buffers allocated once, a C gemv
  kernel (gemv.py) is called on their raw pointers, and attention is two batched matmuls over the
  cache; about 30 small torch calls a layer, on one torch thread (a matmul that torch runs, for
  float weights, gets the caller's threads): the OpenMP fork and join of SDPA, bmm and softmax
  cost more than their arithmetic at this size, and far more when the 2 cores are shared.

The arithmetic is the model's: the same kernels on the same inputs, RMSNorm and rotary in
transformers' order of operations; only summation orders (attention, the norm's sum of squares)
differ, at float32 rounding (tests/nn/test_compact_runtime.py holds both paths to the HF logits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ckernels
from .fuse import FusedSlice
from .gemv import GemvKernel
from .qlinear import QLinear

# Checked, layer by layer, against the HF forward (tests/nn/test_compact_runtime.py).
ACCEPTED_MODEL_TYPES = ("llama",)
# Rope types whose cos/sin depend on the length decoded so far: a table built once for the
# final length would differ from what the model computes at each step.
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def supports(model) -> bool:
    """True when CompactLlama accepts `model` (its config's model type and rope type)."""
    try:
        _check(model)
    except ValueError:
        return False
    return True


def _check(model) -> None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ACCEPTED_MODEL_TYPES:
        raise ValueError(
            f"the compact decoder runs Llama-family causal LMs, got model type {model_type!r}; "
            f"accepted: {', '.join(ACCEPTED_MODEL_TYPES)}"
        )
    inner = getattr(model, "model", None)
    if getattr(model, "lm_head", None) is None or not hasattr(inner, "layers"):
        raise ValueError(f"the compact decoder needs a causal LM with model.layers and lm_head, "
                         f"got {type(model).__name__}")
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope in _LENGTH_DEPENDENT_ROPE:
        raise ValueError(f"rope type {rope!r} depends on the decoded length; the compact "
                         "decoder precomputes cos/sin once")


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


def _rms_norm(x, weight, eps):
    # transformers' LlamaRMSNorm, op for op: in float32, cast back, then times the weight.
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class CompactLlama:
    """Greedy generation by a Llama-family LM through its own weights and kernels.

    Built from the model, it keeps references, not copies: a model quantized or edited afterwards
    needs a new decoder. `start(batch, max_len)` allocates the KV cache, `forward` runs token ids
    at the next positions, `greedy` does a whole decode. fast=False keeps batch-1 steps on the
    general path (the tests compare the two)."""

    def __init__(self, model, fast: bool = True):
        _check(model)
        config, inner = model.config, model.model
        self.model, self.fast = model, fast
        self.n_heads = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.hidden = config.hidden_size
        self.dtype = inner.norm.weight.dtype
        self.silu = config.hidden_act == "silu"
        self.blocks = [(layer.input_layernorm, layer.self_attn, layer.post_attention_layernorm,
                        layer.mlp) for layer in inner.layers]
        self.layers = [
            (n1.weight, n1.variance_epsilon, _stacked([a.q_proj, a.k_proj, a.v_proj]),
             _linear(a.o_proj), a.scaling, n2.weight, n2.variance_epsilon,
             _stacked([m.gate_proj, m.up_proj]), _linear(m.down_proj),
             F.silu if self.silu else m.act_fn)
            for n1, a, n2, m in self.blocks]
        self.embed = inner.embed_tokens
        if type(self.embed) is nn.Embedding:
            table = self.embed.weight
            self.embed = lambda ids: F.embedding(ids, table)
        self.final_norm = (inner.norm.weight, inner.norm.variance_epsilon)
        self.lm_head = _linear(model.lm_head)
        self.batch = self.max_len = 0

    @torch.inference_mode()
    def start(self, batch: int, max_len: int) -> None:
        """Empty the cache and make room for `max_len` positions of `batch` sequences."""
        d, n_rows = self.head_dim, self.n_heads + 2 * self.n_kv
        # A position's cache row is the q/k/v projection's whole output, q included (2.5 times
        # the k/v bytes for SmolLM2): the stacked matmul writes it in place and rotary embedding
        # rotates it there, so nothing is copied into the cache.
        self.cache = torch.empty(len(self.layers), batch, max_len, n_rows, d, dtype=self.dtype)
        # The model's own rotary module, once for every position: (1, max_len, d) each.
        positions = torch.arange(max_len).unsqueeze(0)
        cos, sin = self.model.model.rotary_emb(torch.empty(0, dtype=self.dtype), positions)
        half = d // 2
        # rotate_half(x) * sin == swap_halves(x) * sin_signed, sin_signed = (-sin[:h], sin[h:])
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        self.cos = cos[0].unsqueeze(1)  # (max_len, 1, d): broadcasts over (b, t, heads, d)
        self.sin = sin[0].unsqueeze(1)
        self.batch, self.max_len, self.pos = batch, max_len, 0
        self._steps = None
        if self.fast and batch == 1 and self.dtype == torch.float32:
            self._prepare_steps()

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
        n_heads, n_qk, d = self.n_heads, self.n_heads + self.n_kv, self.head_dim
        half = d // 2
        cos, sin = self.cos[pos:end], self.sin[pos:end]
        # Rows of one block see the cache and the rows before them; SDPA's own causal mask says
        # that when the block starts the sequence.
        mask, causal = None, t > 1 and pos == 0
        if t > 1 and pos > 0:
            mask = torch.arange(end) <= torch.arange(pos, end).unsqueeze(1)  # (t, end)
        h = self.embed(ids)  # (b, t, hidden), a fresh tensor: the residual adds go in place
        for (w1, eps1, qkv, o_proj, scale, w2, eps2, gate_up, down, act), rows in zip(
                self.layers, self.cache):
            new = rows.narrow(1, pos, t)  # (b, t, heads + 2 kv heads, d)
            new.copy_(qkv(_rms_norm(h, w1, eps1)).view(b, t, -1, d))
            qk = new[:, :, :n_qk]
            swapped = torch.cat([qk[..., half:], qk[..., :half]], dim=-1).mul_(sin)
            qk.mul_(cos).add_(swapped)  # q and k rotated, in the cache
            a = F.scaled_dot_product_attention(
                new[:, :, :n_heads].transpose(1, 2), rows[:, :end, n_heads:n_qk].transpose(1, 2),
                rows[:, :end, n_qk:].transpose(1, 2), attn_mask=mask, is_causal=causal,
                scale=scale, enable_gqa=True)  # (b, heads, t, d)
            h.add_(o_proj(a.transpose(1, 2).reshape(b, t, n_heads * d)))
            g, u = gate_up(_rms_norm(h, w2, eps2)).chunk(2, dim=-1)  # (b, t, intermediate) each
            h.add_(down(act(g) * u))
        self.pos = end
        if not all_logits:
            h = h[:, -1:]
        return self.lm_head(_rms_norm(h, *self.final_norm))

    def _prepare_steps(self) -> None:
        """Buffers for one-row steps and, per layer, the calls that fill them."""
        d, n_heads, n_kv = self.head_dim, self.n_heads, self.n_kv
        n_qk, n_rows, group = n_heads + n_kv, n_heads + 2 * n_kv, n_heads // n_kv
        model, inner = self.model, self.model.model
        buf = lambda n: torch.empty(1, 1, n)  # noqa: E731
        self.h, self.x, self.attn = buf(self.hidden), buf(self.hidden), buf(n_heads * d)
        y_qkv, o_out, d_out = buf(n_rows * d), buf(self.hidden), buf(self.hidden)
        inter = self.blocks[0][3].gate_proj.out_features
        gu, self.logits = buf(2 * inter), buf(model.lm_head.out_features)
        g, u = gu.narrow(-1, 0, inter), gu.narrow(-1, inter, inter)
        self.swapped = torch.empty(n_qk, d)
        self.attn_out = self.attn.view(n_kv, group, d)  # each kv head's query heads as rows
        self.swap = torch.cat([torch.arange(d // 2, d), torch.arange(d // 2)])
        self.h1 = self.h.view(-1)
        self.n_hidden = torch.tensor(float(self.hidden))
        self.cos1, self.sin1 = self.cos[:, 0], self.sin[:, 0]  # (max_len, d)
        cache = self.cache[:, 0]  # (layers, max_len, heads + 2 kv heads, d)
        self.kt_all = cache[:, :, n_heads:n_qk].permute(0, 2, 3, 1)  # (layers, kv, d, max_len)
        self.v_all = cache[:, :, n_qk:].permute(0, 2, 1, 3)  # (layers, kv, max_len, d)
        row_bytes = n_rows * d * cache.element_size()
        self._steps = []
        self.threads = torch.get_num_threads()

        def into(modules, x, y):
            call, is_gemv = _into(modules, x, y)
            return call if is_gemv else _threaded(call, self.threads)

        for (n1, a, n2, m), rows in zip(self.blocks, cache):
            projections = [a.q_proj, a.k_proj, a.v_proj]
            group = _fused_group(projections)
            if group is not None and isinstance(group.kernel, GemvKernel):
                # The C call writes the position's cache row itself.
                run, xp, base = group.kernel.run_pointers, self.x.data_ptr(), rows.data_ptr()
                bias = group.bias
                qkv = ((lambda pos, row, run=run, base=base: run(xp, base + pos * row_bytes))
                       if bias is None else
                       (lambda pos, row, run=run, base=base, bias=bias: (
                           run(xp, base + pos * row_bytes), row.view(-1).add_(bias))))
            else:
                call = into(projections, self.x, y_qkv)
                qkv = lambda pos, row, call=call: (  # noqa: E731
                    call(), row.copy_(y_qkv.view(n_rows, d)))
            act = ((lambda: F.silu(g, inplace=True)) if self.silu
                   else (lambda m=m: g.copy_(m.act_fn(g))))
            self._steps.append((
                n1.weight, torch.tensor(n1.variance_epsilon), qkv, torch.tensor(a.scaling),
                into([a.o_proj], self.attn, o_out), o_out,
                n2.weight, torch.tensor(n2.variance_epsilon),
                into([m.gate_proj, m.up_proj], self.x, gu), act, g, u,
                into([m.down_proj], g, d_out), d_out))
        self.final = (inner.norm.weight, torch.tensor(inner.norm.variance_epsilon))
        self.head = into([model.lm_head], self.x, self.logits)
        lib = ckernels.library()
        self._glue = None
        if lib is not None and self.silu:
            self._glue = _CGlue(lib, self, cache, o_out, d_out, g, u)

    def _norm_into_x(self, weight, eps):
        # LlamaRMSNorm at one float32 row: the sum of squares by a dot product, then the same
        # mean, epsilon, rsqrt and products (0-d tensor operands: no scalar wrapping per call).
        s = torch.addcdiv(eps, torch.dot(self.h1, self.h1), self.n_hidden).rsqrt_()
        torch.mul(self.h, s, out=self.x)
        self.x.mul_(weight)

    def _step(self, token: torch.Tensor) -> torch.Tensor:
        """Logits (1, 1, vocab) of one token (1, 1) at the next position, in a buffer that the
        next step overwrites."""
        # One torch thread but for the matmuls that torch runs (float weights): the other ops
        # are too small to share, and their OpenMP fork and join (a few us each, far more when
        # another process holds the second core) costs more than it saves.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if self._glue is not None:
                return self._glue.step(token)
            return self._layers_step(token)
        finally:
            torch.set_num_threads(threads)

    def _layers_step(self, token: torch.Tensor) -> torch.Tensor:
        pos = self.pos
        end = pos + 1
        n_heads, n_qk, n_kv = self.n_heads, self.n_heads + self.n_kv, self.n_kv
        h, swapped, swap, attn_out = self.h, self.swapped, self.swap, self.attn_out
        norm = self._norm_into_x
        cos, sin = self.cos1[pos], self.sin1[pos]  # (d,)
        h.copy_(self.embed(token))
        # Per layer views of this position's cache row and of the cache up to it.
        row = self.cache[:, 0, pos]  # (layers, heads + 2 kv heads, d)
        rows, qks = row.unbind(0), row[:, :n_qk].unbind(0)
        qs = row[:, :n_heads].unflatten(1, (n_kv, -1)).unbind(0)  # (kv heads, group, d) each
        kts = self.kt_all.narrow(3, 0, end).unbind(0)  # (kv heads, d, end) each
        vs = self.v_all.narrow(2, 0, end).unbind(0)  # (kv heads, end, d) each
        for (w1, eps1, qkv, scale, o_proj, o_out, w2, eps2, gate_up, act, g, u, down, d_out), \
                row, qk, q, kt, v in zip(self._steps, rows, qks, qs, kts, vs):
            norm(w1, eps1)
            qkv(pos, row)
            torch.index_select(qk, 1, swap, out=swapped)  # (x2, x1) of rotate_half's (-x2, x1)
            swapped.mul_(sin)
            qk.mul_(cos).add_(swapped)  # q and k rotated, in the cache
            w = torch.bmm(q, kt).mul_(scale)  # (kv heads, group, end)
            torch.bmm(w.softmax(-1), v, out=attn_out)
            o_proj()
            h.add_(o_out)
            norm(w2, eps2)
            gate_up()
            act()
            g.mul_(u)
            down()
            h.add_(d_out)
        norm(*self.final)
        self.head()
        self.pos = end
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


class _CGlue:
    """The one-row step with its small operations in C (csrc/token_ops.c): per layer four matmul
    calls and four C calls (norm, attention, norm, gating) instead of about twenty torch calls,
    whose dispatch cost as long as the int4 matmuls themselves. Same buffers, same kernels."""

    def __init__(self, lib, dec: CompactLlama, cache, o_out, d_out, g, u):
        self.dec, self.lib = dec, lib
        ptr = lambda t: t.data_ptr()  # noqa: E731
        n = dec.hidden
        self.h, self.x, self.attn = ptr(dec.h), ptr(dec.x), ptr(dec.attn)
        self.scores = torch.empty(dec.max_len)  # attention weights of one head
        d = dec.head_dim
        self.cos, self.sin = dec.cos1, dec.sin1  # (max_len, d), sin signed as rotate() takes it
        self.d, self.row_bytes = d, d * 4
        self.layers = []
        for (w1, eps1, qkv, scale, o_proj, _, w2, eps2, gate_up, _, _, _, down, _), rows in zip(
                dec._steps, cache):
            self.layers.append((ptr(w1), float(eps1), qkv, rows, ptr(rows), float(scale), o_proj,
                                ptr(w2), float(eps2), gate_up, down))
        self.o_out, self.d_out, self.g, self.u = ptr(o_out), ptr(d_out), ptr(g), ptr(u)
        self.n, self.inter = n, g.shape[-1]
        self.final = (ptr(dec.final[0]), float(dec.final[1]))

    def step(self, token: torch.Tensor) -> torch.Tensor:
        dec, lib = self.dec, self.lib
        norm, attend, gate = lib.zp_add_rmsnorm, lib.zp_llama_attend, lib.zp_silu_mul
        pos, n, h, x, attn = dec.pos, self.n, self.h, self.x, self.attn
        n_heads, n_kv, d = dec.n_heads, dec.n_kv, self.d
        cos, sin, scores = self.cos[pos].data_ptr(), self.sin[pos].data_ptr(), \
            self.scores.data_ptr()
        o_out, d_out, g, u, inter = self.o_out, self.d_out, self.g, self.u, self.inter
        dec.h.copy_(dec.embed(token))
        delta = None  # the residual the next norm adds first: the previous layer's MLP output
        for w1, eps1, qkv, rows, base, scale, o_proj, w2, eps2, gate_up, down in self.layers:
            norm(h, delta, w1, eps1, n, x)
            qkv(pos, rows[pos])
            attend(base, pos, n_heads, n_kv, d, cos, sin, scale, scores, attn)
            o_proj()
            norm(h, o_out, w2, eps2, n, x)
            gate_up()
            gate(g, u, inter)
            down()
            delta = d_out
        norm(h, delta, *self.final, n, x)
        dec.head()
        dec.pos = pos + 1
        return dec.logits
