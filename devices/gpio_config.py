"""Config models of the `gpio` driver (kept apart so `iot-gateway check` needs no gpiozero)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from gateway.configbase import NAME_PATTERN, DeviceBase, FieldType, Strict, finite, unique_names


# gpiozero's pin names: 17, "17", "GPIO17", "BCM17", "BOARD11", "WPI0", and header:pin like "J8:11".
PIN_NAME = re.compile(r"(?:GPIO|BCM|BOARD|WPI)?(?:0|[1-9][0-9]*)|[A-Z][A-Z0-9]*:(?:0|[1-9][0-9]*)")
PIN_HELP = 'a GPIO number like 17 or a name like "GPIO17", "BCM17", "BOARD11", "J8:11" or "WPI0"'

GpioKind = Literal[
    "button",
    "motion_sensor",
    "line_sensor",
    "digital_input",
    "output",
    "led",
    "pwm_output",
    "servo",
    "mcp3008",
    "cpu_temperature",
    "load_average",
    "disk_usage",
]
GPIO_INPUTS = {"button", "motion_sensor", "line_sensor", "digital_input"}
GPIO_OUTPUTS = {"output", "led"}
GPIO_ANALOG_OUT = {"pwm_output", "servo"}
GPIO_PI_SENSORS = {"cpu_temperature", "load_average", "disk_usage"}
GPIO_POLLED = {"mcp3008"} | GPIO_PI_SENSORS
GPIO_NEEDS_PIN = GPIO_INPUTS | GPIO_OUTPUTS | GPIO_ANALOG_OUT
GPIO_SETTABLE = GPIO_OUTPUTS | GPIO_ANALOG_OUT

# Which kinds each kind-specific option applies to; setting it on another kind is an error.
GPIO_OPTIONS: dict[str, set[str]] = {
    "pin": GPIO_NEEDS_PIN,
    "pull_up": GPIO_INPUTS,
    "active_state": GPIO_INPUTS,
    "bounce_time": {"button", "digital_input"},
    "active_high": {"output", "led", "pwm_output"},
    "initial_value": GPIO_SETTABLE,
    "safe_value": GPIO_SETTABLE,
    "frequency": {"pwm_output"},
    "min_pulse_width": {"servo"},
    "max_pulse_width": {"servo"},
    "channel": {"mcp3008"},
    "spi_device": {"mcp3008"},
    "scale": {"mcp3008"},
    "interval": GPIO_POLLED,
    "path": GPIO_PI_SENSORS,
    "minutes": {"load_average"},
}
GPIO_DEFAULT_PATHS = {
    "cpu_temperature": "/sys/class/thermal/thermal_zone0/temp",
    "load_average": "/proc/loadavg",
    "disk_usage": "/",
}
GPIO_UNITS = {"cpu_temperature": "°C", "disk_usage": "%"}
GPIO_DECIMALS = {"cpu_temperature": 1, "disk_usage": 1, "load_average": 2, "mcp3008": 3}
GPIO_RANGES = {"pwm_output": (0.0, 1.0), "servo": (-1.0, 1.0)}


class GpioField(Strict):
    """A field of a `gpio` device; its type, writability and bounds follow from `kind`."""

    name: str = Field(pattern=NAME_PATTERN, max_length=64)
    kind: GpioKind
    pin: int | str | None = None
    unit: str = ""
    decimals: int | None = Field(None, ge=0, le=12)
    description: str = ""
    pull_up: bool | None = None
    active_state: bool | None = None
    bounce_time: float | None = Field(None, gt=0, le=10)
    active_high: bool = True
    initial_value: bool | float | None = None
    safe_value: bool | float | None = None
    frequency: float = Field(100.0, gt=0, le=100_000)
    min_pulse_width: float = Field(0.001, gt=0, le=0.02)
    max_pulse_width: float = Field(0.002, gt=0, le=0.02)
    channel: int = Field(0, ge=0, le=7)
    spi_device: int = Field(0, ge=0, le=1)
    scale: float = 1.0
    interval: float = Field(5.0, gt=0, le=86_400)
    path: str | None = Field(None, min_length=1)
    minutes: Literal[1, 5, 15] = 5

    @field_validator("pin", mode="before")
    @classmethod
    def _pin_name(cls, v: Any) -> Any:
        if v is None:
            return v
        if isinstance(v, bool) or not isinstance(v, (int, str)) or (isinstance(v, int) and v < 0):
            raise ValueError(f"must be {PIN_HELP}, got {v!r}")
        if isinstance(v, str):
            # gpiozero matches names exactly and in upper case: "gpio17" would fail only at start.
            if not PIN_NAME.fullmatch(v.upper()):
                raise ValueError(f"must be {PIN_HELP}, got {v!r}")
            return v.upper()
        return v

    @field_validator("initial_value", "safe_value", mode="before")
    @classmethod
    def _plain_value(cls, v: Any) -> Any:
        # Only TOML booleans and numbers: "on" or "0.5" as text are likely mistakes.
        if v is not None and not isinstance(v, (bool, int, float)):
            raise ValueError(f"must be true/false or a number, got {v!r}")
        return finite(v)

    @model_validator(mode="after")
    def _by_kind(self) -> "GpioField":
        misplaced = [k for k in self.model_fields_set if self.kind not in GPIO_OPTIONS.get(k, {self.kind})]
        if misplaced:
            k = min(misplaced)
            raise ValueError(
                f"`{k}` does not apply to kind {self.kind!r} (only to: {', '.join(sorted(GPIO_OPTIONS[k]))})"
            )
        if self.kind in GPIO_NEEDS_PIN and self.pin is None:
            raise ValueError(f"kind {self.kind!r} needs a `pin`")
        if self.pull_up is not None and self.active_state is not None:
            raise ValueError(
                "`active_state` is only for floating inputs (no internal pull resistor): "
                "remove `pull_up`, or remove `active_state`"
            )
        if self.min_pulse_width >= self.max_pulse_width:
            raise ValueError("`min_pulse_width` must be less than `max_pulse_width`")
        for key in ("initial_value", "safe_value"):
            if getattr(self, key) is not None:
                setattr(self, key, self._check_value(key, getattr(self, key)))
        if "unit" not in self.model_fields_set:
            self.unit = GPIO_UNITS.get(self.kind, "")
        if "decimals" not in self.model_fields_set:
            self.decimals = GPIO_DECIMALS.get(self.kind)
        return self

    def _check_value(self, key: str, v: bool | float) -> bool | float:
        if self.type == "boolean":
            if isinstance(v, bool):
                return v
            if v in (0, 1):
                return bool(v)
            raise ValueError(f"`{key}` for kind {self.kind!r} must be true or false, got {v!r}")
        lo, hi = GPIO_RANGES[self.kind]
        if isinstance(v, bool) or not lo <= v <= hi:
            raise ValueError(
                f"`{key}` for kind {self.kind!r} must be a number from {lo:g} to {hi:g}, got {v!r}"
            )
        return float(v)

    @property
    def type(self) -> FieldType:
        """The value type the kind produces."""
        return "boolean" if self.kind in GPIO_INPUTS | GPIO_OUTPUTS else "numeric"

    @property
    def writable(self) -> bool:
        """Outputs, LEDs, PWM outputs and servos can be set."""
        return self.kind in GPIO_SETTABLE

    @property
    def min(self) -> float | None:
        """Lower bound of a settable analog value."""
        return GPIO_RANGES.get(self.kind, (None, None))[0]

    @property
    def max(self) -> float | None:
        """Upper bound of a settable analog value."""
        return GPIO_RANGES.get(self.kind, (None, None))[1]

    @property
    def pull(self) -> bool | None:
        """gpiozero's `pull_up`: None (floating) when `active_state` is given, else
        `pull_up`, defaulting to True for buttons and False for other inputs."""
        if self.active_state is not None:
            return None
        return self.pull_up if self.pull_up is not None else self.kind == "button"

    @property
    def safe(self) -> bool | float:
        """The value an output takes at start (unless `initial_value`) and at every stop."""
        if self.safe_value is not None:
            return self.safe_value
        return False if self.type == "boolean" else 0.0

    @property
    def start_value(self) -> bool | float:
        """The value an output is given when the gateway starts."""
        return self.initial_value if self.initial_value is not None else self.safe

    @property
    def source(self) -> str:
        """The file or filesystem a Pi sensor reads (`path` or the kind's default)."""
        return self.path or GPIO_DEFAULT_PATHS.get(self.kind, "")


class GpioDevice(DeviceBase):
    """`driver = "gpio"`: pins and the Pi's own sensors through gpiozero."""

    driver: Literal["gpio"]
    pin_factory: Literal["lgpio", "rpigpio", "pigpio", "native", "mock"] | None = None
    fields: list[GpioField] = Field(min_length=1)

    _unique = field_validator("fields")(unique_names)


CONFIG = GpioDevice
