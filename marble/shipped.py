"""What the installed package carries (its configs) and where the source checkout is, when there is one.

`marble/configs` is a link to the repository's `configs/`; a wheel stores the files themselves, so an
installed `marble` finds the shipped configs by name with no repository around it. The benchmarks
(`bench/`), `params.yaml` and the manifests live only in a checkout.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).with_name("configs")


def shipped_config_names() -> list[str]:
    """Names accepted by `--config` in place of a path, e.g. `tiny`, `sd35m-marble`."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def shipped_config(name: str) -> Path | None:
    """The shipped config called `name` (with or without `.yaml`), or None when there is no such config."""
    if "/" in name or "\\" in name:
        return None
    path = CONFIG_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    return path if path.is_file() else None


def checkout_root() -> Path | None:
    """The repository root when marble runs from a source checkout (editable install), else None."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "bench").is_dir() else None
