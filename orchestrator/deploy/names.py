"""Names that leave this machine in a cluster config: container images and cloud projects, checked
as the registry and the cloud would (full matches: a trailing newline is not a valid name)."""
from __future__ import annotations

import re

from vis4mer.orchestrator.train.config import ConfigError

# Docker's reference grammar: [registry[:port]/]path[:tag][@sha256:digest], path components in
# lower case (distribution/reference); `localhost:5000/vis4mer:0.1.0` is a valid image.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_HOST_PART = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_REGISTRY = rf"(?:{_HOST_PART}(?:\.{_HOST_PART})*(?::[0-9]{{1,5}})?/)"
IMAGE = re.compile(rf"{_REGISTRY}?{_COMPONENT}(?:/{_COMPONENT})*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?"
                   r"(?:@sha256:[a-f0-9]{64})?")
GCP_PROJECT = re.compile(r"[a-z][-a-z0-9]{4,28}[a-z0-9]")  # 6 to 30 characters


def check_image(flag: str, image) -> str:
    if not isinstance(image, str) or len(image) > 255 or not IMAGE.fullmatch(image):
        raise ConfigError(f"{flag}={image!r:.120}: expected an image reference such as "
                          "registry.example.com/vis4mer:0.1.0")
    return image


def check_gcp_project(flag: str, project) -> str:
    if not isinstance(project, str) or not GCP_PROJECT.fullmatch(project):
        raise ConfigError(f"{flag}={project!r:.120}: expected a GCP project id (6-30 lower-case letters, digits "
                          "and '-', starting with a letter)")
    return project
