"""Where setuptools finds the code and its data (the metadata is in pyproject.toml).

conf/ and campaigns/ stay at the top of the repository and ship inside the luna package as
luna/conf and luna/campaigns (package data), so an installed `luna` finds them without a checkout
(`luna.CONF_DIR`, `luna.CAMPAIGNS_DIR`).
"""
from pathlib import Path

from setuptools import find_packages, setup

PACKAGES = ["luna", "luna.*", "demo", "demo.*", "factory", "factory.*", "extraction", "extraction.*",
            "vault", "vault.*", "projector", "projector.*", "lsd_runtime", "lsd_runtime.*"]
DATA_DIRS = {"luna.conf": "conf", "luna.campaigns": "campaigns"}  # package -> folder at the top
present = {pkg: folder for pkg, folder in DATA_DIRS.items() if Path(__file__).with_name(folder).is_dir()}

setup(
    packages=find_packages(include=PACKAGES) + sorted(present),
    package_dir=present,
    package_data={
        "luna.conf": ["**/*.yaml"],
        "luna.campaigns": ["**/*.yaml", "**/*.txt"],
        "luna.models.configs": ["**/*.json"],
        "luna.models.toy": ["weights/*.safetensors"],  # the toy preset's trained weights
    },
)
