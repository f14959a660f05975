"""Configuration as data: YAML files in ``configs/`` merged with overrides from the CLI or MONAI Label.

Overrides are ``dotted.key=value`` strings (values parsed as YAML, so ``sam2.n_inserts=2``,
``sam2.dtype=bfloat16``, ``protocol.keep_largest_component=false`` all do what they say) or nested
dicts. Unknown keys are rejected so a typo never silently does nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping, TypeVar

import yaml

PACKAGE_DIR = Path(__file__).resolve().parent


def _config_dir() -> Path:
    """``$SSL_MEDSAM2_CONFIG_DIR`` (deployments), else the copy inside an installed wheel
    (``ssl_medsam2/configs``), else the source tree's top-level ``configs/`` (editable install)."""
    if os.environ.get("SSL_MEDSAM2_CONFIG_DIR"):
        return Path(os.environ["SSL_MEDSAM2_CONFIG_DIR"])
    packaged = PACKAGE_DIR / "configs"
    return packaged if (packaged / "ssl_medsam2.yaml").is_file() else PACKAGE_DIR.parents[1] / "configs"


#: where ``ssl_medsam2.yaml``, ``sam2/*.yaml`` and ``orthanc/`` are read from
CONFIG_DIR = _config_dir()


def config_path(name: str | os.PathLike) -> Path:
    """A config file by path, or by name inside ``configs/`` (``.yaml`` optional)."""
    p = Path(name)
    if p.exists():
        return p
    for cand in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if cand.exists():
            return cand
    raise FileNotFoundError(f"config '{name}' not found (looked in {CONFIG_DIR})")


T = TypeVar("T")


def section_dict(cfg: Mapping, name: str) -> Mapping:
    """The ``name:`` section as it is (for sections with a nested layout, like ``atlas:``'s presets)."""
    sec = cfg.get(name)
    if not isinstance(sec, Mapping):
        raise KeyError(f"config has no '{name}:' section (configs/ssl_medsam2.yaml lists every setting)")
    return sec


def section(cfg: Mapping, name: str, cls: type[T]) -> T:
    """The ``name:`` section of a loaded config as a typed ``cls`` (a dataclass; the keys it names).

    Why: every default lives in ``configs/ssl_medsam2.yaml`` only. A typed view fails here, naming
    the key, when a config lacks a setting, instead of a second default silently written in code.
    """
    sec = section_dict(cfg, name)
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    missing = [f"{name}.{k}" for k in fields if k not in sec]
    if missing:
        raise KeyError(f"config lacks {', '.join(missing)} (configs/ssl_medsam2.yaml lists every setting)")
    try:
        return cls(**{k: sec[k] for k in fields})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config section '{name}': {exc}") from exc


class Section:
    """Base of a typed section (a frozen dataclass): ``SECTION`` names it in the config, :meth:`from_config`
    loads it through :func:`section`, :meth:`_set` converts fields in ``__post_init__``."""

    SECTION: ClassVar[str]

    @classmethod
    def from_config(cls: type[T], cfg: Mapping) -> T:
        return section(cfg, cls.SECTION, cls)

    def _set(self, **values: Any) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)


def load_yaml(name: str | os.PathLike) -> dict:
    with open(config_path(name)) as fh:
        return yaml.safe_load(fh) or {}


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ValueError(f"override '{item}' is not of the form key.sub=value")
    key, value = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else None


def _set(cfg: dict, keys: list[str], value: Any, strict: bool, where: str) -> None:
    node = cfg
    for i, k in enumerate(keys[:-1]):
        if k not in node or not isinstance(node[k], dict):
            if strict:
                raise KeyError(f"unknown config key '{'.'.join(keys[: i + 1])}' ({where})")
            node[k] = {}
        node = node[k]
    if strict and keys[-1] not in node:
        known = ", ".join(sorted(node)) if isinstance(node, dict) else ""
        raise KeyError(f"unknown config key '{'.'.join(keys)}' ({where}); known here: {known}")
    node[keys[-1]] = value


def merge(base: Mapping, overrides: Mapping | Iterable[str] | None, strict: bool = True,
          where: str = "override") -> dict:
    """A deep copy of ``base`` with ``overrides`` applied (dict, or list of ``a.b=value`` strings)."""
    cfg = copy.deepcopy(dict(base))
    if not overrides:
        return cfg
    if isinstance(overrides, Mapping):
        def walk(prefix, node):
            for k, v in node.items():
                if isinstance(v, Mapping) and isinstance(_get(cfg, prefix + [k]), dict):
                    walk(prefix + [k], v)
                else:
                    _set(cfg, prefix + [k], copy.deepcopy(v), strict, where)
        walk([], overrides)
    else:
        for item in overrides:
            keys, value = parse_override(item)
            _set(cfg, keys, value, strict, where)
    return cfg


def _get(cfg: Mapping, keys: list[str]) -> Any:
    node: Any = cfg
    for k in keys:
        if not isinstance(node, Mapping) or k not in node:
            return None
        node = node[k]
    return node


def load_config(name: str | os.PathLike = "ssl_medsam2", overrides=None) -> dict:
    """The project config (``configs/ssl_medsam2.yaml`` by default) with overrides applied."""
    return merge(load_yaml(name), overrides)
