"""Tokenizers that differ only in their special-token rules, saved as HF folders: the bundled tiny tokenizer
(its post-processor adds BOS), the same with a bos_token that nothing adds, and the same with no bos_token;
plus a BPE tokenizer whose merges cross the prompt/completion boundary."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from maxdpo.data.sources import resolve_path

KINDS = ("adds_bos", "bos_not_added", "no_bos", "bpe_merges")


def make_tokenizer(kind: str, folder: Path) -> Path:
    """Writes tokenizer `kind` to `folder` and returns the folder."""
    if kind == "bpe_merges":
        vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, " ": 3, "a": 4, "b": 5, "ab": 6, "c": 7, "ca": 8, "=": 9}
        core = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("c", "a")]))
        core.pre_tokenizer = pre_tokenizers.Split(" ", "isolated")
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    else:
        tokenizer = AutoTokenizer.from_pretrained(resolve_path("bundled:tiny/tokenizer"))
        if kind != "adds_bos":
            tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
        if kind == "no_bos":
            tokenizer.bos_token = None
    tokenizer.save_pretrained(folder)
    return folder
