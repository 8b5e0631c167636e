"""``python convert_grad_to_basis.py`` (the original tool's command) runs ``scripts/convert_grad_to_basis.py``."""
import runpy
from pathlib import Path

runpy.run_path(str(Path(__file__).resolve().parent / "scripts" / "convert_grad_to_basis.py"), run_name="__main__")
