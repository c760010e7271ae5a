"""Build a marble stage function into a lightweight or a containerized KFP component."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from kfp import dsl

from pipelines.images import IMAGES

if TYPE_CHECKING:  # importing kfp.dsl.python_component first is circular inside kfp 2.17
    from kfp.dsl.python_component import PythonComponent


def make_component(func: Callable, *, role: str, containerized: bool) -> PythonComponent:
    """Wrap a component function as a lightweight or a containerized KFP component.

    `role` chooses the image ('cpu' or 'cuda'). Lightweight components keep the same base image so the
    compiled task would name a pinned image either way; locally the image is not used.
    """
    image = IMAGES[role]
    return dsl.component(
        func,
        base_image=image,
        target_image=image if containerized else None,
        install_kfp_package=False,
    )
