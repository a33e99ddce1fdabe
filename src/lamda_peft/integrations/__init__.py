"""Framework integrations: Hugging Face Trainer (callback), PEFT, Accelerate."""
