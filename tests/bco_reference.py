"""TRL's BCOTrainer on a tiny model, run by test_bco_parity.py in a subprocess whose `trl` is 1.13 (the last TRL that
ships `trl.experimental.bco`): its first batches, each one's loss and logged values, and the gradient norm of
the first two, as gradient accumulation takes them.

python bco_reference.py SPEC.json OUT.npz: SPEC holds policy, ref, tokenizer (folders), rows, beta,
per_device and calls (compute_loss calls, one batch each, no optimizer step between them).
"""
import json
import sys

import numpy as np
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.experimental.bco import BCOConfig, BCOTrainer


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    args = BCOConfig(output_dir=spec["output_dir"], beta=spec["beta"], per_device_train_batch_size=spec["per_device"],
                     max_length=64, report_to=[], use_cpu=True, bf16=False)
    trainer = BCOTrainer(model=AutoModelForCausalLM.from_pretrained(spec["policy"], attn_implementation="eager"),
                         ref_model=AutoModelForCausalLM.from_pretrained(spec["ref"], attn_implementation="eager"),
                         args=args, train_dataset=Dataset.from_list(spec["rows"]),
                         processing_class=AutoTokenizer.from_pretrained(spec["tokenizer"]))
    trainer.model.train()
    trainer.model.zero_grad()
    out, logged = {}, []
    stored = trainer._stored_metrics["train"]
    for call, batch in zip(range(spec["calls"]), trainer.get_train_dataloader()):
        before = {name: len(values) for name, values in stored.items()}
        loss = trainer.compute_loss(trainer.model, batch)
        if call < 2:
            (loss / 2).backward()
        logged.append({"loss": loss.item(), **{name: values[-1] for name, values in stored.items()
                                                if len(values) > before.get(name, 0)}})
        for name in ("completion_input_ids", "completion_attention_mask", "completion_labels"):
            out[f"{call}/{name}"] = batch[name].numpy()
        out[f"{call}/label"] = np.asarray(batch["label"], np.float32)
    grads = [p.grad.double() for p in trainer.model.parameters() if p.grad is not None]
    out["grad_norm"] = np.asarray(torch.sqrt(sum((g ** 2).sum() for g in grads)).item())
    out["logged"] = np.asarray(json.dumps(logged))
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(*sys.argv[1:])
