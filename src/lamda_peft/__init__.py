"""lamda-peft: fine-tune pretrained models with LaMDA and LaMDA++ (EMNLP 2024).

    from lamda_peft import LamdaConfig, get_lamda_model
    model = get_lamda_model(hf_model, LamdaConfig(r=16, target_modules="all-linear"))
    model.attach_optimizer(optimizer, total_steps=T)   # the PMB freeze then drives itself

Where things are: the adapted layer is `layer.py`, the freezing schedule `schedule.py`, the
spectral maths `spectral.py`, injection `model.py`, files `checkpoint.py`, LoRA export `export.py`.
"""

from lamda_peft.checkpoint import AdapterLoadError
from lamda_peft.config import ConfigError, LamdaConfig
from lamda_peft.layer import LamdaLinear, delta_weight
from lamda_peft.model import LamdaModel, get_lamda_model
from lamda_peft.schedule import FreezeSchedule, freeze_steps, frozen_count

__version__ = "0.1.0"

__all__ = [
    "AdapterLoadError",
    "ConfigError",
    "FreezeSchedule",
    "LamdaConfig",
    "LamdaLinear",
    "LamdaModel",
    "delta_weight",
    "freeze_steps",
    "frozen_count",
    "get_lamda_model",
]
