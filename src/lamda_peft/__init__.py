"""lamda-peft: fine-tune pretrained models with LaMDA and LaMDA++ (EMNLP 2024).

    from lamda_peft import LamdaConfig, get_lamda_model
    model = get_lamda_model(hf_model, LamdaConfig(r=16, target_modules="all-linear"))
    model.attach_optimizer(optimizer, total_steps=T)   # the PMB freeze then drives itself

Where things are: the adapted layer is `layer.py`, the freezing schedule `schedule.py`, the
spectral maths `spectral.py`, injection `model.py`, files `checkpoint.py`, LoRA export `export.py`,
the PEFT method `integrations/peft_*.py`.
"""

from lamda_peft.checkpoint import AdapterLoadError
from lamda_peft.config import ConfigError, LamdaConfig
from lamda_peft.early_exit import early_exit_profile
from lamda_peft.integrations.distributed import prepare_distributed
from lamda_peft.integrations.peft_registration import PeftIntegrationError, register_on_import, register_with_peft
from lamda_peft.integrations.peft_training import attach_optimizer
from lamda_peft.layer import LamdaLinear, delta_weight
from lamda_peft.model import LamdaModel, get_lamda_model
from lamda_peft.recursive import load_recursive, make_recursive, save_recursive
from lamda_peft.schedule import FreezeSchedule, freeze_steps, frozen_count

# LaMDA becomes a PEFT method on import (peft.get_peft_model, PeftModel.from_pretrained, load_adapter);
# with an unsupported peft this warns, and everything else works on.
register_on_import()

__version__ = "0.1.0"

__all__ = [
    "AdapterLoadError",
    "ConfigError",
    "FreezeSchedule",
    "LamdaConfig",
    "LamdaLinear",
    "LamdaModel",
    "PeftIntegrationError",
    "attach_optimizer",
    "delta_weight",
    "early_exit_profile",
    "freeze_steps",
    "frozen_count",
    "get_lamda_model",
    "prepare_distributed",
    "load_recursive",
    "make_recursive",
    "register_with_peft",
    "save_recursive",
]
