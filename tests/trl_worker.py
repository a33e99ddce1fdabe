"""Worker for tests/test_trl.py: `SFTTrainer` + `LamdaCallback` under `accelerate launch` (DDP).

Writes `rank{R}.json` (world size, wrapper, find_unused_parameters, trainable count per step, dB
reductions) to the model folder given as the first argument.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from lamda_peft import LamdaConfig
from lamda_peft.integrations.distributed import grad_sync_of
from lamda_peft.integrations.hf_trainer import LamdaCallback


def main() -> None:
    model_dir, out = sys.argv[1], Path(sys.argv[2])
    dataset = Dataset.from_dict({"text": [f"{i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(48)]})
    callback = LamdaCallback()
    config = SFTConfig(
        output_dir=str(out / "sft"),
        max_steps=6,
        learning_rate=3e-3,
        per_device_train_batch_size=4,
        ddp_find_unused_parameters=False,  # the Trainer's default for a PeftModel is True; LaMDA does not need it
        save_strategy="no",
        use_cpu=True,
    )
    trainer = SFTTrainer(
        model=model_dir,
        train_dataset=dataset,
        args=config,
        peft_config=LamdaConfig(r=4, target_modules="all-linear", freeze_fraction=0.5),
        callbacks=[callback],
    )
    trainer.train()
    wrapped = trainer.model_wrapped
    report = {
        "world": trainer.args.world_size,
        "wrapper": type(wrapped).__name__,
        "find_unused_parameters": getattr(wrapped, "find_unused_parameters", None),
        "history": callback.history,
        "reductions": grad_sync_of(trainer.model).reductions,
    }
    (out / f"rank{trainer.args.process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
