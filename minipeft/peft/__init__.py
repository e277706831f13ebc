"""Parameter-efficient fine-tuning: Hugging Face PEFT's API and files, one method per file.

    model = mp.peft.get_peft_model(base, mp.peft.LoraConfig(r=8, lora_alpha=16,
                                                            target_modules=["q_proj", "v_proj"]))
    model.print_trainable_parameters()
    out = model(input_ids, labels=labels)          # the base model's call and output
    model.save_pretrained("adapter/")              # adapter_config.json + adapter_model.safetensors
    again = mp.peft.PeftModel.from_pretrained(mp.LlamaForCausalLM.from_pretrained(path), "adapter/")
    merged = again.merge_and_unload()              # a plain LlamaForCausalLM again

The folders follow the taxonomy of PEFT surveys (methods that add parameters, methods that
select them, low-rank reparametrizations; Lialin et al., 2023, arXiv:2303.15647):
* core/      the shared machinery: configs (config.py), the method table (registry.py, rows
             of method.py's PeftMethod: every attachment point), the adapter-holder contract
             (base.py), PEFT's targeting rules (targeting.py), PeftModel (peft_model.py,
             adapters.py), files (saving.py, names.py);
* lowrank/   LoRA (+ rsLoRA, PiSSA), DoRA, AdaLoRA (+ its allocator and plot), DyLoRA, ReLoRA,
             LoKr (Kronecker factors), add_weighted_adapter (combine.py), LoRAHub (lorahub.py,
             CMA-ES in es.py);
* additive/  methods that add parameters: at the input, inside the model, at the output;
* selective/ methods that train a chosen part of the model's own weights: BitFit (bias terms),
             Child-tuning F / D and FishMask (masked weight differences, weight_delta.py; the
             Fisher pass, fisher.py), and full fine-tuning, the baseline they are measured against.
"""
from .additive.adapter_fusion import AdapterFusionConfig
from .additive.bottleneck import BnConfig, DoubleSeqBnConfig, SeqBnConfig
from .additive.ia3 import IA3Config
from .additive.prefix_tuning import PrefixTuningConfig
from .additive.prompt_tuning import PromptTuningConfig
from .core import registry
from .core.config import BaseConfig, PeftConfig
from .core.peft_model import PeftModel, get_peft_model
from .core.registry import METHODS, REGISTRY, PeftMethod
from .lowrank.adalora import AdaLoraConfig
from .lowrank.combine import add_weighted_adapter
from .lowrank.dylora import DyLoraConfig
from .lowrank.lokr import LoKrConfig
from .lowrank.lora import LoraConfig
from .lowrank.lorahub import LoraHub, LoraHubConfig
from .lowrank.relora import ReLoraConfig
from .selective.bitfit import BeftConfig
from .selective.child_tuning import ChildTuningConfig
from .selective.fishmask import FishMaskConfig
from .selective.full import FullFineTuningConfig

__all__ = ["AdaLoraConfig", "AdapterFusionConfig", "BaseConfig", "BeftConfig", "BnConfig", "ChildTuningConfig",
           "DoubleSeqBnConfig", "DyLoraConfig", "FishMaskConfig", "FullFineTuningConfig", "IA3Config",
           "LoKrConfig", "LoraConfig", "LoraHub", "LoraHubConfig", "METHODS", "PeftConfig", "PeftMethod",
           "PeftModel", "PrefixTuningConfig", "PromptTuningConfig", "REGISTRY", "ReLoraConfig", "SeqBnConfig",
           "add_weighted_adapter", "get_peft_model", "registry"]
