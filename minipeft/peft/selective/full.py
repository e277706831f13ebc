"""Full fine-tuning: every weight of the model trains. The baseline the PEFT methods are measured
against (Howard & Ruder, 2018, "Universal Language Model Fine-tuning for Text Classification",
arXiv:1801.06146, fine-tune all layers of a pretrained LM; the survey's reference point) and the
limit of the selective methods: BitFit, Child-tuning and FishMask train a chosen subset of W, full
fine-tuning the whole of it.

    W' = W + ΔW,  ΔW = −Σ_t lr_t · AdamW_t(∂L/∂W)  for every parameter W of the model

There is no separate ΔW: the optimizer writes W' into W itself. Parameters: all of them,
Σ_W |W| (a tied input embedding / output head counts once), e.g. 260K of stories260K.

Identity at init: yes, nothing is added or changed before the first step.
Merge: a no-op. The trained weights are the model's own, so merge_adapter changes nothing and
merge_and_unload returns the model with its trained weights (mergeable, at no cost).

Files: the trained model itself, in transformers' layout (``LlamaForCausalLM.save_pretrained``:
config.json + model.safetensors, and the base folder's tokenizer files: transformers and
``--model`` load the folder as it is), plus a small marker
``full_finetune.json`` (this config, peft_type "FULL") by which ``PeftModel.from_pretrained``
recognises the folder and loads its weights into the base model it is given. The marker is not
named adapter_config.json on purpose: transformers treats a folder with that file as a PEFT
adapter and would try to load a base model from it.

Departures from PEFT (which has no such method; users call the Trainer on the bare model): the
trained weights are the base weights, so there is no base model to switch back to:
``disable_adapter()`` (with a warning) and ``unload()`` leave the trained weights in place; keep a
copy of the base folder if you need it. One full fine-tuning adapter per model (a second would
train the same weights); it cannot be mixed with other methods (as every method here).
"""
from __future__ import annotations

import dataclasses
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ...errors import CheckpointError, ConfigError
from ...io import read_json, write_json
from ...io.checkpoint import load_model_tensors
from ...models.config import LlamaConfig
from ...nn import Parameter, ParameterGroup
from ..core.base import AdapterHolder
from ..core.config import BaseConfig
from ..core.method import CliSpec, PeftMethod

MARKER = "full_finetune.json"  # beside config.json + model.safetensors: "this folder is a FULL adapter"
HOLDER = "full_finetune"  # the holder's attribute on the model


@dataclass(frozen=True)
class FullFineTuningConfig(BaseConfig):
    """Train every parameter of the model (nothing to choose: BaseConfig's fields only)."""

    peft_type: ClassVar[str] = "FULL"


class FullFineTuning(AdapterHolder):
    """Names the model's own parameters as the adapter's, at ``model.full_finetune``.

    It holds no Parameter of its own: ``adapter_state`` returns the model's parameters (model
    name -> Parameter, tied ones once), kept in a plain dict the module walk does not enter, so
    ``named_parameters`` still lists each weight once, under its checkpoint name. PeftModel.sync
    then unfreezes them all, and the group ``full:<name>`` is the whole model.
    """

    def __init__(self, params: dict[str, Parameter]):
        self._params = params
        self.names: list[str] = []
        super().__init__()

    @property
    def disabled(self) -> bool:
        return self._disabled

    @disabled.setter
    def disabled(self, value: bool) -> None:
        # PeftModel.sync pushes disable_adapter() here: the weights are trained in place, so the
        # model keeps computing the fine-tuned function; say so rather than return it silently.
        if value and self.names:
            warnings.warn("full fine-tuning trains the model's own weights: disable_adapter() cannot give the "
                          "base model back (the outputs are the fine-tuned model's)", stacklevel=4)
        self._disabled = value

    def adapter_names(self) -> list[str]:
        return list(self.names)

    def adapter_state(self, name: str) -> dict[str, Parameter]:
        return dict(self._params) if name in self.names else {}

    def delete_adapter(self, name: str) -> None:
        if name in self.names:
            self.names.remove(name)

    def file_key(self, path: str, key: str) -> str:
        return key  # the model's own names: model.safetensors' keys


def apply(model, config: FullFineTuningConfig, rng, adapter_name: str = "default") -> ParameterGroup:
    """Put the holder on ``model`` and return every parameter of the model as ``full:<adapter_name>``."""
    if isinstance(getattr(model, HOLDER, None), FullFineTuning):
        raise ConfigError(f"the model already has a full fine-tuning adapter "
                          f"({getattr(model, HOLDER).names}); a second would train the same weights")
    params = dict(model.named_parameters())  # a tied weight once, under its first name
    for p in params.values():
        p.requires_grad = True  # unfrozen: this is what the method trains
    holder = FullFineTuning(params)
    holder.names.append(adapter_name)
    holder.active_adapters = [adapter_name]
    setattr(model, HOLDER, holder)
    return ParameterGroup(f"full:{adapter_name}", list(params.values()))


# ----- files: the model folder transformers reads, plus the marker ---------------------------
def write_folder(peft_model, name: str, folder: Path) -> None:
    model = peft_model.base_model.model
    model.save_pretrained(folder)
    config = peft_model.peft_config[name]
    config = config.replace(inference_mode=True,
                            base_model_name_or_path=config.base_model_name_or_path
                            or getattr(model, "name_or_path", None))
    write_json(Path(folder) / MARKER, config.to_dict(), sort_keys=True)
    copy_tokenizer_files(config.base_model_name_or_path, folder)


# the files transformers' AutoTokenizer (and minipeft's Tokenizer) read from a model folder
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def copy_tokenizer_files(base, folder) -> None:
    """The base folder's tokenizer files beside the trained weights, so the folder is a whole model
    (``--model FOLDER``, transformers' ``from_pretrained``); nothing when the base is not a folder."""
    if base is None or not Path(base).is_dir() or Path(base).resolve() == Path(folder).resolve():
        return
    for name in TOKENIZER_FILES:
        if (Path(base) / name).is_file():
            shutil.copyfile(Path(base) / name, Path(folder) / name)


def read_folder_config(folder) -> FullFineTuningConfig | None:
    path = Path(folder) / MARKER
    if not path.exists():
        return None
    return FullFineTuningConfig.from_dict(read_json(path, "full fine-tuning config", ConfigError), source=str(path))


def read_folder_weights(peft_model, name: str, folder: Path) -> None:
    """The folder's weights into the model, after checking its config.json and every key and shape."""
    model = peft_model.base_model.model
    saved = LlamaConfig.from_json(folder / "config.json")
    differ = [f.name for f in dataclasses.fields(LlamaConfig)
              if f.compare and getattr(saved, f.name) != getattr(model.config, f.name)]
    if differ:
        raise CheckpointError(f"'{folder / 'config.json'}' does not describe the model it is loaded into: "
                              + ", ".join(f"{k} is {getattr(saved, k)!r}, the model has {getattr(model.config, k)!r}"
                                          for k in differ[:4]) + " (saved from another base model?)")
    tensors = load_model_tensors(folder)
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # one weight, stored under the embedding's name (as transformers)
    model.load_state_dict(tensors, strict=True, source=str(folder / "model.safetensors"))


def cli_config(args) -> FullFineTuningConfig:
    return FullFineTuningConfig()


METHOD = PeftMethod(
    "FULL", FullFineTuningConfig, apply, FullFineTuning, "full",
    write_folder=write_folder, read_folder_config=read_folder_config, read_folder_weights=read_folder_weights,
    cli=CliSpec({"full": cli_config}, (), "full fine-tuning (every weight; a baseline)"))
