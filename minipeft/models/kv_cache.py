"""The key/value cache for incremental decoding.

Each layer's keys and values after RoPE are kept in buffers preallocated to the
full length of the generation, shape (B, Hkv, capacity, Dh), so a decoding step
writes one position and reads a view — no reallocation per token. The cache
holds constants: it serves inference (``no_grad``); with gradients enabled the
new keys and values are joined to the cached ones with a differentiable concat, and a
cache that was given trainable entries (prefix tuning's keys and values, written first)
keeps them in the graph, so the loss reaches them.
"""
from __future__ import annotations

from ..autograd import ops
from ..autograd.tensor import Tensor, is_grad_enabled
from ..backend import get_array_module


class KVCache:
    def __init__(self, num_layers: int):
        self.keys = [None] * num_layers
        self.values = [None] * num_layers
        self.length = 0  # positions already stored (all layers agree)
        self.graph = [None] * num_layers  # per layer: (K, V) Tensors while gradients flow through the cache

    def reserve(self, batch, kv_heads, capacity, head_dim, dtype, xp):
        """Allocate buffers for ``capacity`` positions (called once before decoding)."""
        for i in range(len(self.keys)):
            self.keys[i] = xp.zeros((batch, kv_heads, capacity, head_dim), dtype=dtype)
            self.values[i] = xp.zeros((batch, kv_heads, capacity, head_dim), dtype=dtype)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new (B, Hkv, T, Dh) keys/values of ``layer``; return all S = length+T."""
        start, end = self.length, self.length + k.shape[2]
        if self.keys[layer] is None or end > self.keys[layer].shape[2]:
            self._grow(layer, k, end)
        past_k, past_v = self.keys[layer][:, :, :start], self.values[layer][:, :, :start]
        self.keys[layer][:, :, start:end] = k.data
        self.values[layer][:, :, start:end] = v.data
        held = self.graph[layer]
        if is_grad_enabled() and (k.requires_grad or v.requires_grad or held is not None):
            if start == 0:
                full = (k, v)
            else:
                past = held if held is not None else (Tensor(past_k), Tensor(past_v))
                full = (ops.concat([past[0], k], axis=2), ops.concat([past[1], v], axis=2))
            self.graph[layer] = full
            return full
        return Tensor(self.keys[layer][:, :, :end]), Tensor(self.values[layer][:, :, :end])

    def advance(self, steps: int) -> None:
        """Mark ``steps`` more positions as stored (after every layer has written them)."""
        self.length += steps

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions (the rest is overwritten by the next update)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length
        self.graph = [None] * len(self.graph)

    def _grow(self, layer, k, needed):
        """Replace ``layer``'s buffers by larger ones (doubling), keeping what is stored."""
        xp = get_array_module(k.data)
        batch, kv_heads, _, head_dim = k.shape
        for store in (self.keys, self.values):
            old = store[layer]
            capacity = max(needed, 2 * (old.shape[2] if old is not None else 0))
            buf = xp.zeros((batch, kv_heads, capacity, head_dim), dtype=k.dtype)
            if old is not None:
                buf[:, :, : self.length] = old[:, :, : self.length]
            store[layer] = buf
