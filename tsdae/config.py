"""How every stage's config is declared: a small frozen pydantic model that refuses unknown keys and wrong
types, so a typo in a YAML file fails at load time with the key's name.

Each stage owns its config (``pipeline.config``, ``tsdae.model.config``, ``tsdae.train.config``,
``tsdae.eval.config``); ``jobs.config.RunConfig`` only composes them. Strict: no silent coercion
("two" is not an int, 2.0 is not an int, "true" is not a bool), except that an int is a valid float and a
YAML 1.1 exponent without a dot (``3e-5``, which PyYAML reads as a string) is read as a float.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

S = TypeVar("S", bound="Section")


def _yaml_float(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


Float = Annotated[float, BeforeValidator(_yaml_float)]

# Ray's own resources, each with a key of its own in the configs (cpus_*, num_gpus, use_gpu).
_RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def _custom_resources(value: Any) -> Any:
    if isinstance(value, dict):
        for name, amount in value.items():
            if name in _RAY_BUILTIN_RESOURCES:
                raise ValueError(f"{name!r} is one of Ray's own resources, set by its own key; custom resources only")
            if isinstance(amount, (int, float)) and not isinstance(amount, bool) and amount <= 0:
                raise ValueError(f"{name!r}: amount must be > 0, got {amount}")
    return value


# Custom Ray resources a process requires, {name: amount}: it runs only on nodes started with
# ``ray start --resources '{"<name>": <total>}'`` (e.g. a label for the nodes that train).
Resources = Annotated[dict[str, Float], BeforeValidator(_custom_resources)]


class ConfigError(ValueError):
    """A config file or key that cannot be used; the message names the file and key."""


def _key(loc: tuple) -> str:
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else f".{part}"
    return key.lstrip(".") or "config"


def describe(error: ValidationError) -> str:
    """Every problem of a failed validation, each named by its dotted key (``eval.custom_sets[0].name``)."""
    problems = []
    for e in error.errors():
        if e["type"] == "extra_forbidden":
            problems.append(f"unknown key {_key(e['loc'])!r}")
            continue
        message = e["msg"].removeprefix("Value error, ")
        shown = "" if e["type"].startswith(("value_error", "assertion")) else f" (got {e['input']!r})"
        problems.append(f"{_key(e['loc'])}: {message}{shown}")
    return "; ".join(problems)


class Section(BaseModel):
    """Base of every config section: frozen, strict, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def replace(self: S, **changes: Any) -> S:
        """A copy with some values changed, validated like a loaded file (pydantic's model_copy is not);
        raises ConfigError naming the keys."""
        try:
            return type(self).model_validate({**self.model_dump(), **changes})
        except ValidationError as e:
            raise ConfigError(describe(e)) from None
