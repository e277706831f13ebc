"""Parameter-efficient fine-tuning: Hugging Face PEFT's API and files, one method per file.

    model = mp.peft.get_peft_model(base, mp.peft.LoraConfig(r=8, lora_alpha=16,
                                                            target_modules=["q_proj", "v_proj"]))
    model.print_trainable_parameters()
    out = model(input_ids, labels=labels)          # the base model's call and output
    model.save_pretrained("adapter/")              # adapter_config.json + adapter_model.safetensors
    again = mp.peft.PeftModel.from_pretrained(mp.LlamaForCausalLM.from_pretrained(path), "adapter/")
    merged = again.merge_and_unload()              # a plain LlamaForCausalLM again

Files: config.py (PeftConfig), targeting.py (PEFT's matching rules), base.py (the
adapter-layer contract, modules_to_save), registry.py (peft_type -> method), one file
per method (lora.py, dora.py, adalora.py, dylora.py, relora.py), peft_model.py / adapters.py / saving.py (PeftModel),
combine.py (add_weighted_adapter), lorahub.py + es.py (LoRAHub's composition and CMA-ES search).
"""
from . import registry
from .adalora import AdaLoraConfig
from .combine import add_weighted_adapter
from .config import PeftConfig
from .dylora import DyLoraConfig
from .lora import LoraConfig
from .lorahub import LoraHub, LoraHubConfig
from .peft_model import PeftModel, get_peft_model
from .registry import REGISTRY, PeftMethod
from .relora import ReLoraConfig

__all__ = ["REGISTRY", "AdaLoraConfig", "LoraConfig", "PeftConfig", "PeftMethod", "PeftModel", "add_weighted_adapter",
           "get_peft_model", "registry"]
__all__ += ["DyLoraConfig", "ReLoraConfig"]
__all__ += ["LoraHub", "LoraHubConfig"]
