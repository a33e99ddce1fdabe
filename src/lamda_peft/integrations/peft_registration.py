"""Make LaMDA a PEFT method, so that PEFT's own entry points accept it:

    import lamda_peft                      # registers (once per process)
    model = peft.get_peft_model(hf_model, lamda_peft.LamdaConfig(r=16, target_modules="all-linear"))
    peft.PeftModel.from_pretrained(base, "folder/")      # a fresh process: import lamda_peft first

How: PEFT has no public way to add a method from outside. `peft.utils.register_peft_method` fills
PEFT's four mappings (config class, tuner class, parameter prefix) but accepts only names that are
members of the `PeftType` enum, and enums are closed. So registration (1) adds the member `LAMDA`
to `PeftType`, the same way Python's enum machinery adds its own members (`_add_member_` where the
Python version has it), and (2) calls `register_peft_method`. Nothing else in peft is touched.

Version guard: `register_peft_method`'s contract and the tuner hooks `LamdaTuner` relies on are
tested on the peft minor releases in `TESTED_PEFT`; any other version is refused with
`PeftIntegrationError` unless `LAMDA_PEFT_ALLOW_UNTESTED_PEFT=1` is set. `import lamda_peft` never
fails because of it (the core library needs no registration): it warns once instead.
"""

from __future__ import annotations

import enum
import os
import warnings

import peft
from packaging.version import Version

from lamda_peft.config import PEFT_TYPE, LamdaConfig

METHOD_NAME = "lamda"  # PEFT's lower-case method name; the enum member is PEFT_TYPE ("LAMDA")
TESTED_PEFT = ("0.20", "0.21")  # minor releases the test suite runs on
ALLOW_UNTESTED_ENV = "LAMDA_PEFT_ALLOW_UNTESTED_PEFT"


class PeftIntegrationError(RuntimeError):
    """LaMDA cannot be registered with the installed peft (unsupported version or internals)."""


class PeftIntegrationWarning(UserWarning):
    """`import lamda_peft` could not register LaMDA with peft; the core library still works."""


def peft_support_problem(version: str | None = None) -> str | None:
    """Why LaMDA cannot be registered with peft `version` (default: the installed one), or None if it can."""
    version = peft.__version__ if version is None else version
    try:
        parsed = Version(version)
    except Exception:
        return f"peft version {version!r} is not a valid version string"
    minor = f"{parsed.major}.{parsed.minor}"
    if minor not in TESTED_PEFT and os.environ.get(ALLOW_UNTESTED_ENV) != "1":
        return (
            f"peft {version} is not supported by lamda-peft's PEFT integration (tested: "
            f"{', '.join(v + '.x' for v in TESTED_PEFT)}). Install one of those (pip install 'peft>=0.20,<0.22'), "
            f"or set {ALLOW_UNTESTED_ENV}=1 to try anyway. Without it, use lamda_peft.get_lamda_model / "
            "LamdaModel.from_pretrained (no PEFT needed) or export the adapter as plain LoRA (export_lora)"
        )
    from peft.utils import PeftType

    if not hasattr(peft.utils, "register_peft_method"):
        return f"peft {version} has no peft.utils.register_peft_method"
    if not (issubclass(PeftType, str) and issubclass(PeftType, enum.Enum)):
        return f"peft {version}'s PeftType is not a str Enum"
    return None


def _add_enum_member(enum_cls: type[enum.Enum], name: str) -> None:
    """Add `name = name` to a closed str Enum, as the enum machinery builds its own members."""
    member = str.__new__(enum_cls, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    if hasattr(enum_cls, "_add_member_"):  # Python >= 3.13: class attribute + _member_map_
        enum_cls._add_member_(name, member)
    else:
        setattr(enum_cls, name, member)  # EnumType allows new names, refuses to rebind members
        enum_cls._member_map_[name] = member
    enum_cls._member_names_.append(name)
    enum_cls._value2member_map_[name] = member


def is_registered() -> bool:
    """True once `peft.get_peft_model` and `PeftModel.from_pretrained` accept LaMDA in this process."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType

    from lamda_peft.integrations.peft_tuner import LamdaTuner

    member = PeftType.__members__.get(PEFT_TYPE)
    return member is not None and PEFT_TYPE_TO_TUNER_MAPPING.get(member) is LamdaTuner


def register_with_peft() -> None:
    """Register LaMDA as PEFT method "LAMDA" (idempotent; `import lamda_peft` already calls it).

    Raises:
        PeftIntegrationError: the installed peft is not a supported version, or another package
            already registered a different "LAMDA" method.
    """
    if is_registered():
        return
    problem = peft_support_problem()
    if problem:
        raise PeftIntegrationError(problem)
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType, register_peft_method

    from lamda_peft.integrations.peft_tuner import PREFIX, LamdaTuner

    member = PeftType.__members__.get(PEFT_TYPE)
    if member is not None and (member in PEFT_TYPE_TO_TUNER_MAPPING or member in PEFT_TYPE_TO_CONFIG_MAPPING):
        raise PeftIntegrationError(
            f"peft already has a method {PEFT_TYPE!r} ({PEFT_TYPE_TO_TUNER_MAPPING.get(member)}) that is not lamda-peft's"
        )
    if member is None:
        _add_enum_member(PeftType, PEFT_TYPE)
    try:
        register_peft_method(name=METHOD_NAME, config_cls=LamdaConfig, model_cls=LamdaTuner, prefix=PREFIX)
    except (KeyError, ValueError, TypeError) as err:
        raise PeftIntegrationError(f"peft {peft.__version__} refused the LaMDA registration: {err}") from err


def register_on_import() -> bool:
    """`register_with_peft` that warns instead of raising (the core library does not need PEFT)."""
    try:
        register_with_peft()
    except PeftIntegrationError as err:
        warnings.warn(
            f"LaMDA is not registered as a PEFT method, so peft.get_peft_model / PeftModel.from_pretrained "
            f"will not accept LaMDA configs or folders: {err}",
            PeftIntegrationWarning,
            stacklevel=3,
        )
        return False
    return True
