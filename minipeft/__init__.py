"""minipeft: parameter-efficient fine-tuning of LLaMA-style models, from scratch on NumPy.

    import minipeft as mp
    path = mp.bundled_model_path()
    model = mp.LlamaForCausalLM.from_pretrained(path)
    tok = mp.Tokenizer.from_pretrained(path)
    out = model(input_ids, labels=labels)     # out.logits, out.loss
    out.loss.backward()
    model.generate(input_ids, max_new_tokens=64, temperature=0.0)
"""
from . import peft, train
from .autograd import Tensor, no_grad
from .data import bundled_model_path
from .errors import CheckpointError, ConfigError, DataError, DeviceError, InputError, MiniPeftError
from .io.tokenizer import Tokenizer
from .models import KVCache, LlamaConfig, LlamaForCausalLM, PromptCache
from .peft.additive.proxy_tuning import ProxyTuning
from .profiler import profile_step
from .threads import get_num_threads, set_num_threads

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "DataError", "DeviceError", "InputError", "KVCache", "LlamaConfig",
    "LlamaForCausalLM", "MiniPeftError", "PromptCache", "ProxyTuning", "Tensor", "Tokenizer", "bundled_model_path",
    "no_grad", "peft", "profile_step",
    "get_num_threads", "set_num_threads", "train",
]
