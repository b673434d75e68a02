"""The algorithm author's kit: ``algodock init``, ``algodock check-image``, ``algodock usage``."""

from algodock.authoring.check_image import Check, Report, check_image
from algodock.authoring.init import init_project

__all__ = ["Check", "Report", "check_image", "init_project"]
