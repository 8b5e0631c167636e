"""Training methods by name (``--method``)."""
from __future__ import annotations

import argparse

from mtil.errors import UserError
from mtil.methods.base import Method
from mtil.methods.contrastive import Contrastive
from mtil.methods.finetune import Finetune

METHODS: dict[str, type[Method]] = {"finetune": Finetune, "contrastive": Contrastive}


def build_method(config: argparse.Namespace) -> Method:
    if config.method not in METHODS:
        raise UserError(f"unknown --method {config.method!r}; accepted: {', '.join(METHODS)}")
    return METHODS[config.method](config)
