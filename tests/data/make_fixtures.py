"""Writes the committed data fixtures: small preference files in the shapes of the seed cards' datasets
and a tiny byte-level BPE tokenizer with the special tokens of every built-in chat template.

Run from the repository root: `python tests/data/make_fixtures.py` (the output is committed; tests never
regenerate it, so golden token ids stay fixed).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pyarrow as pa
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

HERE = Path(__file__).parent
FORMATS = HERE / "formats"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

QUESTIONS = [("What is 2 + 3?", "2 + 3 = 5.", "2 + 3 = 6."),
             ("Name a primary colour.", "Red is a primary colour.", "Green is a primary colour."),
             ("Wie heißt die Hauptstadt von Deutschland?", "Die Hauptstadt ist Berlin.", "Die Hauptstadt ist Bonn."),
             ("What is 10 / 2?", "10 / 2 = 5.", "10 / 2 = 4."),
             ("Spell cat backwards.", "tac", "act"),
             ("Is water wet?", "Yes, water makes things wet.", "No."),
             ("What comes after Monday?", "Tuesday comes after Monday.", "Sunday comes after Monday."),
             ("How many legs does a spider have?", "A spider has eight legs.", "A spider has six legs.")]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_tokenizer() -> None:
    corpus = [q + " " + c + " " + r for q, c, r in QUESTIONS] * 4 + [
        "Du bist ein freundlicher und hilfreicher deutscher KI-Assistent.", "You are a helpful AI Assistant.",
        "USER: ASSISTANT: system user assistant model [INST] [/INST] Hello, how are you?",
        "Instruction Model answer Follow-up instruction Input"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = CHATML
    out = HERE / "chat_tokenizer"
    shutil.rmtree(out, ignore_errors=True)
    tokenizer.save_pretrained(out)


def write_formats() -> None:
    shutil.rmtree(FORMATS, ignore_errors=True)
    FORMATS.mkdir(parents=True)
    # plain prompt/chosen/rejected strings
    with open(FORMATS / "plain.jsonl", "w") as f:
        for q, c, r in QUESTIONS:
            f.write(json.dumps({"prompt": q, "chosen": " " + c, "rejected": " " + r}) + "\n")
    # HuggingFaceH4/ultrafeedback_binarized: a hub-shaped folder with train_prefs / test_prefs parquet splits
    rows = [{"prompt": q, "prompt_id": f"{i:04d}", "chosen": [user(q), assistant(c)],
             "rejected": [user(q), assistant(r)], "messages": [user(q), assistant(c)],
             "score_chosen": 8.0, "score_rejected": 3.0} for i, (q, c, r) in enumerate(QUESTIONS)]
    data = FORMATS / "ultrafeedback_binarized" / "data"
    data.mkdir(parents=True)
    datasets.Dataset.from_list(rows[:6]).to_parquet(data / "train_prefs-00000-of-00001.parquet")
    datasets.Dataset.from_list(rows[6:]).to_parquet(data / "test_prefs-00000-of-00001.parquet")
    # argilla/ultrafeedback-binarized-preferences-cleaned: one JSON array
    cleaned = [{"source": "evol_instruct", "prompt": q, "chosen": [user(q), assistant(c)], "chosen-rating": 5.0,
                "chosen-model": "gpt-4", "rejected": [user(q), assistant(r)], "rejected-rating": 2.0,
                "rejected-model": "llama-2"} for q, c, r in QUESTIONS]
    (FORMATS / "ultrafeedback_cleaned.json").write_text(json.dumps(cleaned, ensure_ascii=False, indent=1))
    # argilla/distilabel-math-preference-dpo: instruction / chosen_response / rejected_response
    with open(FORMATS / "distilabel_math.jsonl", "w") as f:
        for q, c, r in QUESTIONS:
            f.write(json.dumps({"metadata": "{}", "instruction": q, "chosen_response": c, "chosen_rating": 9.0,
                                "rejected_response": r, "rejected_rating": 4.0}, ensure_ascii=False) + "\n")
    # explicit multi-turn prompts with completion-only messages, as an Arrow stream file
    turns = [{"prompt": [user("Hi!"), assistant("Hello. How can I help?"), user(q)],
              "chosen": [assistant(c)], "rejected": [assistant(r)]} for q, c, r in QUESTIONS]
    table = datasets.Dataset.from_list(turns).data.table
    with pa.OSFile(str(FORMATS / "multiturn.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    # Anthropic-HH-like implicit text prompts, saved with DatasetDict.save_to_disk
    hh = [{"chosen": f"\n\nHuman: {q}\n\nAssistant: {c}", "rejected": f"\n\nHuman: {q}\n\nAssistant: {r}"}
          for q, c, r in QUESTIONS]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(hh[:6]), "test": datasets.Dataset.from_list(hh[6:])}
                         ).save_to_disk(str(FORMATS / "hh_saved"))


if __name__ == "__main__":
    write_tokenizer()
    write_formats()
