"""mtil: continual learning and few-shot adaptation of CLIP models."""
import warnings

# clip-anytorch 2.6.0 imports pkg_resources (hence setuptools<81); its deprecation warning is noise for users.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)

__version__ = "0.1.0"
