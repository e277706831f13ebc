"""Chat-template fixtures shared by the chat tests: SmolLM2's template and a small ChatML tokenizer.

SMOLLM2_CHAT_TEMPLATE is copied verbatim from the "chat_template" of tokenizer_config.json in
the Hugging Face repository HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0 license,
(c) Hugging Face). It is ChatML with a default system prompt when the conversation has none.
GENERATION_MARKED is the same template with {% generation %} markers around the assistant's
text (content and <|im_end|>), the form transformers' return_assistant_tokens_mask reads.

chatml_tokenizer_folder() writes a model folder whose tokenizer.json is a small byte-level BPE
(the GPT-2 / SmolLM2 kind) trained here with ``tokenizers`` on a few sentences, with ChatML's
special tokens, so both minipeft and transformers can load it offline.
"""
from __future__ import annotations

import json
from pathlib import Path

SMOLLM2_CHAT_TEMPLATE = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"

GENERATION_MARKED = (  # SmolLM2's template with the assistant's text marked as transformers expects
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CORPUS = [
    "Once upon a time there was a little cat who liked to sit on the mat.",
    "What is the capital of France? The capital of France is Paris.",
    "You are a helpful assistant. Answer briefly and politely, please.",
    "Hello! How are you today? I am fine, thank you. Goodbye.",
    "system user assistant: 1 + 2 = 3, and 12 * 12 = 144.",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def chatml_tokenizer_folder(folder, chat_template=SMOLLM2_CHAT_TEMPLATE, **config) -> Path:
    """A folder with tokenizer.json (byte-level BPE + ChatML specials) and tokenizer_config.json
    (SmolLM2's special tokens; ``chat_template`` and ``config`` entries written into it)."""
    import tokenizers  # noqa: PLC0415
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers  # noqa: PLC0415

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.save(str(folder / "tokenizer.json"))
    settings = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
                "pad_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
                "clean_up_tokenization_spaces": False, "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": 8192}
    if chat_template is not None:
        settings["chat_template"] = chat_template
    settings.update(config)
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")
    return folder
