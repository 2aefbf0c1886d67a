"""hvdbert: BERT pretraining with Horovod on GPU clusters.

Dependencies are pinned in requirements.txt and installed by tools/setup.sh (`make setup`),
because Horovod must be compiled against the installed torch; install_requires only names them.
"""
from setuptools import find_packages, setup

setup(
    name="hvdbert",
    version="0.1.0",
    description="BERT pretraining with Horovod: scaled recipes, exact resume, elastic training",
    packages=find_packages(include=["hvdbert", "hvdbert.*"]),
    python_requires=">=3.10",
    install_requires=["torch", "transformers", "datasets", "tokenizers", "safetensors", "tqdm", "numpy", "torch-optimi"],
    extras_require={"horovod": ["horovod"], "mpi": ["mpi4py"]},
)
