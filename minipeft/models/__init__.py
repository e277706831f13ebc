"""LLaMA-family models: config, the Transformer, KV cache, generation, HF folders."""
from .config import LlamaConfig
from .generation import generate, select_next_tokens
from .kv_cache import KVCache
from .llama import CausalLMOutput, LlamaForCausalLM, LlamaModel
from .prompt_cache import PromptCache

__all__ = ["CausalLMOutput", "KVCache", "LlamaConfig", "LlamaForCausalLM", "LlamaModel", "PromptCache", "generate",
           "select_next_tokens"]
