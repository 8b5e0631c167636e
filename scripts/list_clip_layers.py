"""List a CLIP model's layers: what ``--lora-target-modules`` (and ``--freeze`` / ``--ogd-params`` patterns) can name.

Random weights are fine (only names and shapes are printed), so any model name works offline:

    python scripts/list_clip_layers.py --model ViT-B/16               # every module with its type
    python scripts/list_clip_layers.py --model tiny-vit --linear-only # nn.Linear / nn.MultiheadAttention, with dims
    python scripts/list_clip_layers.py --model RN50 --params          # every parameter with its shape

The last lines say which names ``--lora-target-modules`` accepts (suffix patterns: a name matches every module
called so or ending in ``.NAME``; below an attention ``attn``, the part names ``attn.in_proj`` (q, k, v),
``attn.out_proj`` (o), ``attn.q``, ``attn.k``, ``attn.v``, ``attn.o``) and which linears it refuses (the ResNet
attention pool's projections: read functionally by their parent module, so an adapter there would have no effect).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mtil.errors import UserError  # noqa: E402
from mtil.models.clip_loading import load_clip  # noqa: E402
from mtil.models.lora import accepted_targets, linear_layers  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B/16",
                        help="Any --model name (OpenAI, tiny-vit, tiny-rn, micro-vit) or a weights file.")
    parser.add_argument("--linear-only", "--linear_only", action="store_true",
                        help="Only nn.Linear and nn.MultiheadAttention modules, with their input/output widths.")
    parser.add_argument("--params", action="store_true", help="Every parameter with its shape instead of modules.")
    args = parser.parse_args(argv)
    try:
        model = load_clip(args.model, untrained=True, seed=0).model
    except UserError as exc:
        print(f"list_clip_layers: error: {exc}", file=sys.stderr)
        return 2

    if args.params:
        for name, param in model.named_parameters():
            print(f"{name:<60} {'x'.join(map(str, param.shape)) or 'scalar'}")
        print(f"# {sum(p.numel() for p in model.parameters()):,} parameters")
    elif args.linear_only:
        for layer in linear_layers(model):
            note = ""
            if layer.is_out_proj:
                note = "  (read functionally: adapted as part o of its attention, e.g. target 'attn.out_proj')"
            elif not layer.adaptable:
                note = "  (read functionally: not adaptable)"
            print(f"{layer.name:<50} {layer.kind:<20} in {layer.in_features:>5}  out {layer.out_features:>5}{note}")
    else:
        for name, module in model.named_modules():
            if not name:
                continue
            extra = ""
            if isinstance(module, nn.MultiheadAttention):
                extra = f"  embed {module.embed_dim}, heads {module.num_heads}"
            elif isinstance(module, nn.Linear):
                extra = f"  in {module.in_features}, out {module.out_features}"
            print(f"{name:<50} {type(module).__name__}{extra}")

    accepted = accepted_targets(model)
    refused = sorted({layer.pattern for layer in linear_layers(model) if not layer.adaptable and not layer.is_out_proj})
    print("# --lora-target-modules accepts: " + (", ".join(f"{p} ({d})" for p, d in accepted.items()) or "nothing"))
    print("#   'attn' adapts q, k, v and o of each nn.MultiheadAttention; 'attn.in_proj' (or 'attn.in_proj_weight') "
          "q, k and v; 'attn.out_proj' o; 'attn.q', 'attn.k', 'attn.v', 'attn.o' one part each; several targets on "
          "one attention adapt the union of their parts")
    print("#   a name matches every module called so or ending in '.NAME' (e.g. 'resblocks.0.attn' = layer 0 of both "
          "encoders, 'resblocks.0.attn.q' = its q)")
    if refused:
        print("# refused (read functionally by their parent, an adapter would have no effect): " + ", ".join(refused))
    return 0


if __name__ == "__main__":
    sys.exit(main())
