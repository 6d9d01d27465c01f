"""Where the repository's own files are, and how a user-given path is found.

One place knows the layout: experiment/SLURM YAMLs in pipeline/configs/, DeepSpeed JSONs in
ds_configs/, sbatch templates in slurm/. A relative path is tried against the current folder
first (what the user typed), then against the repository (what the docs show).
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "pipeline" / "configs"
SLURM_TEMPLATE_DIR = REPO_ROOT / "slurm"


def resolve_path(path: str | Path, search: tuple[Path, ...] = (REPO_ROOT,)) -> Path | None:
    """`path` if it exists (absolute or relative to cwd), else relative to one of `search`."""
    candidate = Path(path).expanduser()
    if candidate.exists():
        return candidate.resolve()
    if not candidate.is_absolute():
        for root in search:
            if (root / candidate).exists():
                return (root / candidate).resolve()
    return None


def resolve_config_file(config: str | Path) -> Path | None:
    """A YAML path, or a bare name of pipeline/configs/ (`pretrain_tiny_cpu` or `pretrain_tiny_cpu.yaml`)."""
    found = resolve_path(config)
    if found is None:
        name = str(config) if str(config).endswith((".yaml", ".yml")) else f"{config}.yaml"
        found = resolve_path(CONFIG_DIR / name)
    return found if found is not None and found.is_file() else None


def bundled_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
