"""What pyproject.toml cannot say: configs/ stays at the repository root (where the guide points:
``configs/default.yaml``) and ships inside the package as ``sab_byon_omni/configs``, so that
``sab-omni train --config lightweight`` finds it from an installed wheel (config.config_dirs)."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["sab_byon_omni", "sab_byon_omni.*"]), "sab_byon_omni.configs"],
    package_dir={"sab_byon_omni.configs": "configs"},
    package_data={"sab_byon_omni.configs": ["*.yaml"]},
)
