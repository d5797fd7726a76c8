"""m2m: diffusion-tensor maps and a whole-brain tractogram predicted from a T1-weighted MRI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("m2m-app")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
