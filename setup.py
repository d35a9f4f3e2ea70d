"""Package discovery (the rest of the metadata is pyproject.toml's): every package under personalize/, and
service/ installed as personalize_service, found rather than listed."""

from setuptools import find_packages, setup

SERVICE = "personalize_service"

setup(
    packages=[
        *find_packages(include=["personalize", "personalize.*"]),
        *(SERVICE + name.removeprefix("service") for name in find_packages(include=["service", "service.*"])),
    ],
    package_dir={SERVICE: "service"},
)
