"""Mixtral-8x7B-Instruct's tokenizer as a Hugging Face folder: the v1 SentencePiece model that mistral-common
ships, with the hub's tokenizer_config.json settings (`legacy: true`: a word after a special token keeps
its leading `▁`)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import AutoTokenizer

CONFIG = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
          "legacy": True, "tokenizer_class": "LlamaTokenizer", "pad_token": None, "sp_model_kwargs": {},
          "spaces_between_special_tokens": False, "clean_up_tokenization_spaces": False}


def mixtral_v1_tokenizer(folder: Path) -> dict:
    """Writes the folder; returns {"folder": folder, "tokenizer": the loaded tokenizer}."""
    import mistral_common

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps(CONFIG))
    return {"folder": folder, "tokenizer": AutoTokenizer.from_pretrained(folder)}
