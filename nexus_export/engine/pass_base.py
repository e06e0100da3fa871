"""Pass infrastructure: validated frozen configs, the Pass base class, PassReport and PassResult."""

from __future__ import annotations

import dataclasses
import logging
import time
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from nexus_export.errors import UserError
from nexus_export.graph.program import Program
from nexus_export.memory import RssSampler

log = logging.getLogger(__name__)


def option(default: Any, help: str, choices: tuple[str, ...] | None = None, flag: bool = True) -> Any:
    """A pass option: its default, and the help (and allowed values) its command-line flag is built from; ``flag``
    False keeps it to recipes and the Python API. Adding a pass is adding its config: the flags follow from it."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag})


@dataclass(frozen=True)
class PassConfig:
    """Options of a pass. Subclasses add fields with defaults and override ``validate``."""

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None, pass_name: str = "") -> "PassConfig":
        """Build and validate from a mapping; an unknown option is an error naming the valid ones, a value of the wrong
        type one saying what is expected."""
        if options is not None and not isinstance(options, Mapping):
            raise UserError(f"options of pass {pass_name or cls.__name__} must be a mapping like {{sparsity: 0.5}}, "
                            f"got {type(options).__name__} {options!r}")
        options = dict(options or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise UserError(f"unknown option(s) {', '.join(unknown)} for pass {pass_name or cls.__name__}; "
                            f"valid options: {', '.join(fields) or 'none'}")
        hints = typing.get_type_hints(cls)
        values = {k: check_type(v, hints.get(k), k, f"pass {pass_name or cls.__name__}") for k, v in options.items()}
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise UserError on values that are individually or jointly invalid."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_type(value: Any, hint: Any, key: str, where: str) -> Any:
    """``value`` when its type is one ``hint`` allows (an int where a float is wanted becomes a float); otherwise a
    UserError saying what was expected. Strings are never read as numbers: ``sparsity: "0.5"`` is refused in a recipe
    and in the Python API alike (the command line parses its own flags)."""
    if value is None or hint is None:
        return value
    allowed = [typing.get_origin(t) or t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    for t in allowed:
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t in (bool, str, dict, list) and isinstance(value, t):
            return value
    names = {float: "a number", int: "a whole number", bool: "true or false", str: "a string",
             dict: "a mapping", list: "a list"}
    expected = " or ".join(names.get(t, getattr(t, "__name__", str(t))) for t in allowed)
    hint_text = ""
    if isinstance(value, str) and (float in allowed or int in allowed) and _is_number(value):
        hint_text = " (write it without quotes)"
    elif isinstance(value, bool) and str in allowed:
        hint_text = " (YAML reads on, off, yes and no as true or false: put the word in quotes)"
    raise UserError(f"{key} of {where} must be {expected}, got {type(value).__name__} {value!r}{hint_text}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass
class PassReport:
    """What a pass did, as data: timings, parameter counts and a pass-specific ``changes`` mapping."""

    name: str
    wall_s: float
    params_before: int
    params_after: int
    peak_rss_mb: float
    options: dict = field(default_factory=dict)
    changes: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class PassResult:
    program: Program
    report: PassReport


@dataclass
class PassContext:
    """What a pass may use besides the program: calibration windows and where to checkpoint."""

    calibration_windows: Any = None  # LongTensor [n, seq_len]
    checkpoint_dir: Any = None  # Path: calibrated passes checkpoint each finished block there
    resume: bool = False  # continue from the checkpoint in checkpoint_dir


class Pass:
    """A Program -> Program rewrite. Subclasses set ``name`` and ``config_class`` and implement ``apply``."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[PassConfig]] = PassConfig
    needs_calibration: ClassVar[bool] = False
    keeps_blocks: ClassVar[bool] = False  # checkpoints each finished block's weights for --resume (disk)
    factors_hessians: ClassVar[bool] = False  # a float32 Hessian it factors in place is copied to scratch (disk)
    sparsifies_activations: ClassVar[bool] = False  # the report then measures the linear inputs' zeros
    not_after: ClassVar[dict[str, str]] = {}  # passes this one cannot follow in a recipe -> why (checked before work)
    flag_prefix: ClassVar[str | None] = ""  # its config's command-line flags: --<option>, --<prefix><option>, or none

    def __init__(self, config: PassConfig | Mapping[str, Any] | None = None):
        if not isinstance(config, PassConfig):
            config = self.config_class.from_options(config, self.name)
        self.config = config

    def check(self, program: Program) -> None:
        """Raise UserError if this pass cannot apply to ``program`` (called before any slow work starts)."""

    def nudged(self, program: Program, factor: float) -> Program:
        """For a pass that ``sparsifies_activations``: ``program`` with every threshold it placed multiplied by
        ``factor`` (how far rounding alone moves the result)."""
        raise NotImplementedError(f"{self.name} places no activation thresholds")

    def check_calibration(self, program: Program, windows: Any) -> None:
        """Raise UserError if the calibration windows cannot serve this pass (called before any slow work starts)."""

    def hf_refusal(self) -> str | None:
        """Why the result could not be saved as a Hugging Face folder (--save-hf), or None when transformers can
        still build it from a config."""
        return None

    def apply(self, program: Program, ctx: PassContext) -> tuple[Program, dict]:
        """Rewrite ``program`` and return it with the report's ``changes``."""
        raise NotImplementedError

    def run(self, program: Program, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx or PassContext()
        before = program.num_parameters()
        start = time.perf_counter()
        log.info("pass %s: starting", self.name)
        with RssSampler() as rss:
            program, changes = self.apply(program, ctx)
        wall = time.perf_counter() - start
        log.info("pass %s: done in %.1f s (peak RSS %.0f MiB)", self.name, wall, rss.peak_mb)
        report = PassReport(name=self.name, wall_s=round(wall, 3), params_before=before,
                            params_after=program.num_parameters(), peak_rss_mb=round(rss.peak_mb, 1),
                            options=self.config.to_dict(), changes=changes)
        return PassResult(program=program, report=report)
