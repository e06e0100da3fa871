"""Pass infrastructure: validated frozen configs, the Pass base class, PassReport and PassResult."""

from __future__ import annotations

import dataclasses
import logging
import time
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from .errors import UserError
from .memory import RssSampler
from .program import Program

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassConfig:
    """Options of a pass. Subclasses add fields with defaults and override ``validate``."""

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None, pass_name: str = "") -> "PassConfig":
        """Build and validate from a mapping; an unknown option is an error naming the valid ones."""
        options = dict(options or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise UserError(f"unknown option(s) {', '.join(unknown)} for pass {pass_name or cls.__name__}; "
                            f"valid options: {', '.join(fields) or 'none'}")
        hints = typing.get_type_hints(cls)
        values = {k: _coerce(v, hints.get(k), k, pass_name) for k, v in options.items()}
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise UserError on values that are individually or jointly invalid."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value: Any, hint: Any, key: str, pass_name: str) -> Any:
    """Light type coercion for values from YAML or the command line (e.g. "0.5" -> 0.5 for a float field)."""
    if value is None or hint is None:
        return value
    base = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    target = base[0]
    try:
        if target is bool and isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if target in (int, float) and not isinstance(value, bool):
            return target(value)
    except (TypeError, ValueError):
        raise UserError(f"option {key}={value!r} of pass {pass_name} should be a {target.__name__}") from None
    return value


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

    def __init__(self, config: PassConfig | Mapping[str, Any] | None = None):
        if not isinstance(config, PassConfig):
            config = self.config_class.from_options(config, self.name)
        self.config = config

    def check(self, program: Program) -> None:
        """Raise UserError if this pass cannot apply to ``program`` (called before any slow work starts)."""

    def keeps_architecture(self) -> bool:
        """Whether the result is still a model transformers can build from a config (needed for --save-hf)."""
        return True

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
