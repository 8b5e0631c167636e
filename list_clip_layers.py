"""``python list_clip_layers.py`` (the original tool's command) runs ``scripts/list_clip_layers.py``."""
import runpy
from pathlib import Path

runpy.run_path(str(Path(__file__).resolve().parent / "scripts" / "list_clip_layers.py"), run_name="__main__")
