"""CLIP zero-shot prompt templates per dataset."""

from __future__ import annotations

from mtil.templates.prompts import TEMPLATES

__all__ = ["TEMPLATES", "get_templates"]


def get_templates(name: str) -> list[str]:
    """Return a copy of the templates for dataset ``name``; KeyError if unknown."""
    if name not in TEMPLATES:
        raise KeyError(f"no templates for dataset {name!r}; known: {sorted(TEMPLATES)}")
    return list(TEMPLATES[name])
