"""Container images of the pipeline, pinned by digest in ONE place.

`make images` builds `dockerfiles/Dockerfile.cpu` and `dockerfiles/Dockerfile.cuda`, pushes them, and rewrites
the two references below with the digests the registry returned (`python -m pipelines.images pin ...`).
Until then the digests are PLACEHOLDERS (all zeros): the compiled pipeline is well-formed but its
images cannot be pulled. `marble pipeline compile` warns and cluster submissions refuse while any
placeholder is left.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

PLACEHOLDER_DIGEST = "sha256:" + "0" * 64
"""Marks an image that was never pushed: `make images` replaces it."""

# >>> pinned images (rewritten by `make images`; edit through `python -m pipelines.images pin`)
# fmt: off
CPU_IMAGE = "ghcr.io/marble-ml/marble-cpu@sha256:0000000000000000000000000000000000000000000000000000000000000000"
CUDA_IMAGE = "ghcr.io/marble-ml/marble-cuda@sha256:0000000000000000000000000000000000000000000000000000000000000000"
# fmt: on
# <<< pinned images

IMAGES = {"cpu": CPU_IMAGE, "cuda": CUDA_IMAGE}
"""Image per role: `cpu` for prepare / cache-rewards / register, `cuda` for train and evaluate."""

DIGEST_REFERENCE = re.compile(r"^[a-z0-9.\-]+(?::[0-9]+)?/[a-z0-9._/\-]+@sha256:[0-9a-f]{64}$")
"""`registry/path@sha256:<64 hex>`: a reference that always resolves to the same bytes."""

_VARIABLE = {"cpu": "CPU_IMAGE", "cuda": "CUDA_IMAGE"}


def is_pinned(reference: str) -> bool:
    """True when `reference` names an image by digest (placeholders included: they are well-formed)."""
    return bool(DIGEST_REFERENCE.match(reference))


def is_placeholder(reference: str) -> bool:
    return reference.endswith("@" + PLACEHOLDER_DIGEST)


def placeholder_images() -> list[str]:
    """Roles whose image still carries the placeholder digest."""
    return [role for role, ref in IMAGES.items() if is_placeholder(ref)]


MANIFEST_IMAGES = (
    Path(__file__).resolve().parents[1] / "manifests" / "components" / "images" / "kustomization.yaml"
)
"""The kustomize component that pins the same images for manifests/ (kept equal by `pin` and a test)."""


def pin(
    role: str, reference: str, path: Path = Path(__file__), manifest: Path | None = MANIFEST_IMAGES
) -> None:
    """Rewrite the pinned reference of `role` ('cpu' or 'cuda') here and in the kustomize images component."""
    if role not in _VARIABLE:
        raise ValueError(f"image role {role!r}: expected one of {sorted(_VARIABLE)}")
    if not is_pinned(reference) or is_placeholder(reference):
        raise ValueError(
            f"{reference!r} is not a pushed image reference of the form registry/name@sha256:<64 hex>"
        )
    text = path.read_text(encoding="utf-8")
    pattern = re.compile(rf'^{_VARIABLE[role]} = "[^"]*"$', re.MULTILINE)
    if len(pattern.findall(text)) != 1:
        raise ValueError(f'{path}: expected exactly one line `{_VARIABLE[role]} = "..."`')
    if manifest is not None:
        _pin_manifest(role, reference, manifest)
    path.write_text(pattern.sub(f'{_VARIABLE[role]} = "{reference}"', text), encoding="utf-8")


def _pin_manifest(role: str, reference: str, manifest: Path) -> None:
    name, digest = reference.split("@", 1)
    text = manifest.read_text(encoding="utf-8")
    entry = re.compile(rf"(- name: marble-{role}\n\s+newName: )\S+(\n\s+digest: )\S+")
    if len(entry.findall(text)) != 1:
        raise ValueError(
            f"{manifest}: expected one images entry `- name: marble-{role}` with newName and digest"
        )
    manifest.write_text(
        entry.sub(lambda m: f"{m.group(1)}{name}{m.group(2)}{digest}", text), encoding="utf-8"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.images", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("pin", help="record a pushed image digest")
    p.add_argument("role", choices=sorted(_VARIABLE))
    p.add_argument("reference", help="registry/name@sha256:<digest>, e.g. from `docker inspect` RepoDigests")
    sub.add_parser("show", help="print the pinned images")
    args = parser.parse_args(argv)
    if args.action == "show":
        for role, ref in IMAGES.items():
            print(f"{role}: {ref}{'  (PLACEHOLDER: run `make images`)' if is_placeholder(ref) else ''}")
        return 0
    try:
        pin(args.role, args.reference)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"pinned {args.role}: {args.reference}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
