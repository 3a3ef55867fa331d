"""What pyproject.toml cannot say: the pages' assets live in the top-level static/ and
ship inside the package as codehub/static (codehub.gateway.pages reads them there)."""

from setuptools import find_namespace_packages, setup

setup(
    packages=[*find_namespace_packages(include=["codehub", "codehub.*"]), "codehub.static"],
    package_dir={"codehub.static": "static"},
    package_data={"codehub": ["migrations/*.sql"], "codehub.static": ["*"]},
)
