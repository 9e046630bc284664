"""An export's tokenizer is the training tokenizer: every built-in template's text tokenises the same from the
exported folder as from the run's own, for each kind of tokenizer settings (Mixtral's legacy SentencePiece,
word-level tokenizers that add a BOS, define one without adding it, or have none; BPE merges), and the run's
chat template travels with it. (Saving through transformers 5.x instead drops Mixtral's `legacy` flag, and
the reloaded tokenizer splits `[INST]` after `</s>` as `[` instead of `▁[`.)"""
import pytest
from transformers import AutoTokenizer

from maxdpo.configure import load_config
from maxdpo.data.run_data import export_tokenizer, load_tokenizer
from maxdpo.data.templates import BUILTIN_TEMPLATES, ChatRenderer, TemplateError
from mixtral_tokenizer import mixtral_v1_tokenizer
from test_template_references import CONVERSATIONS
from tokenizer_kinds import KINDS, make_tokenizer


def template_texts(tokenizer) -> list[str]:
    texts = []
    for template in BUILTIN_TEMPLATES.values():
        for conversation in CONVERSATIONS:
            try:
                texts += ChatRenderer(tokenizer, template)(conversation[:-1], conversation[-1:])
            except TemplateError:  # a template that writes bos_token, with a tokenizer that has none
                continue
    return texts


@pytest.mark.parametrize("kind", ("mixtral",) + KINDS)
def test_the_exported_tokenizer_tokenises_as_training_did(tmp_path, kind):
    folder = (mixtral_v1_tokenizer(tmp_path / kind)["folder"] if kind == "mixtral"
              else make_tokenizer(kind, tmp_path / kind))
    cfg = load_config(None, [f"tokenizer.path={folder}", "data.chat_template=mistral"])
    trained = load_tokenizer(cfg)
    out = tmp_path / "export"
    out.mkdir()
    export_tokenizer(cfg, out)
    exported = AutoTokenizer.from_pretrained(out)
    for text in template_texts(trained):
        for special_tokens in (False, True):  # rendered conversations, and plain text as TRL tokenises it
            assert (exported(text, add_special_tokens=special_tokens)["input_ids"]
                    == trained(text, add_special_tokens=special_tokens)["input_ids"]), (text, special_tokens)
    assert exported.chat_template == BUILTIN_TEMPLATES["mistral"]
